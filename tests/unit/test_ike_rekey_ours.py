"""Rekeys we start, the peer's IKE SA rekey, collisions, retransmission and liveness checks
(RFC 7296 §1.3.2, §1.3.3, §2.1, §2.4, §2.8, §2.8.1, §2.8.2, §2.18, §2.25), in memory.

Where the peer is built by hand, its keys come from an independent prf / prf+ over
hashlib/hmac and X25519 from the cryptography package, so SKEYSEED = prf(SK_d (old), g^ir (new)
| Ni | Nr) and the §2.14 / §2.17 key cuts are checked against our core rather than with it.
Elsewhere our initiator and responder are paired and must agree on every SPI and key.
"""

from __future__ import annotations

import hashlib
import hmac

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from services.core.ike.constants import ExchangeType, NotifyType, ProtocolId, TransformType
from services.core.ike.exchange import Ikev2Initiator, ike_proposal
from services.core.ike.informational import InfoSession
from services.core.ike.message import (
    KE,
    SA,
    Delete,
    Message,
    Nonce,
    Notify,
    Payload,
    Proposal,
    Transform,
    TransformAttribute,
    TSi,
    TSr,
    decode_header,
)
from services.core.ike.responder import Ikev2Responder
from services.core.ike.sk import SkCipher, decrypt_message, encrypt_message
from tests.unit.test_ike_informational import _ciphers, _established
from tests.unit.test_ike_rekey import _prf_plus

NR = bytes(range(100, 132))


def _info(x: Ikev2Initiator | Ikev2Responder) -> InfoSession:
    info = x.info
    assert info is not None
    return info


def _shuttle(a: Ikev2Initiator, b: Ikev2Responder, first: list[bytes], *, from_a: bool) -> None:
    """Deliver datagrams back and forth until both sides are quiet."""
    to_b, to_a = (first, []) if from_a else ([], first)
    for _ in range(20):
        if not to_a and not to_b:
            return
        nxt_a: list[bytes] = []
        nxt_b: list[bytes] = []
        for d in to_b:
            nxt_a += b.receive(d, 1.0)
        for d in to_a:
            nxt_b += a.receive(d, 1.0)
        to_a, to_b = nxt_a, nxt_b
    raise AssertionError("the exchanges did not settle")


# -- CHILD SA rekey started by us -------------------------------------------------------------


def _our_child_rekey(initiator_starts: bool, pfs: bool) -> None:
    ini, resp, r = _established()
    me, peer = (_info(ini), _info(resp)) if initiator_starts else (_info(resp), _info(ini))
    me.pfs_group = 31 if pfs else None
    old_me, old_peer = me.child, peer.child
    assert old_me is not None and old_peer is not None
    (req,) = me.rekey_child(1.0)
    assert me.rekey_child(1.0) == []  # already queued: not twice
    i2r, r2i = _ciphers(r)
    mine = i2r if initiator_starts else r2i
    msg = decrypt_message(req, mine)
    assert msg.exchange_type == ExchangeType.CREATE_CHILD_SA and not msg.response
    assert msg.message_id == (2 if initiator_starts else 0)
    rekey = next(p for p in msg.payloads if isinstance(p, Notify))
    # §1.3.3: REKEY_SA names the SPI the requester expects inbound: our old inbound SPI
    assert rekey.notify_type == NotifyType.REKEY_SA and rekey.spi == old_me[0]
    assert [type(p) for p in msg.payloads if isinstance(p, KE)] == ([KE] if pfs else [])
    ni = next(p for p in msg.payloads if isinstance(p, Nonce)).data
    # the peer (our other role) answers; the requester then installs and deletes the old one
    if initiator_starts:
        (ans,) = resp.receive(req, 1.0)
        follow = ini.receive(ans, 1.0)
    else:
        (ans,) = ini.receive(req, 1.0)
        follow = resp.receive(ans, 1.0)
    (ev_peer,) = (resp if initiator_starts else ini).take_events()
    (ev_me,) = (ini if initiator_starts else resp).take_events()
    assert ev_me.kind == ev_peer.kind == "child_rekeyed"
    assert ev_me.initiated and not ev_peer.initiated
    assert (ev_me.spi_in, ev_me.spi_out) == old_me
    new_me, new_peer = ev_me.child, ev_peer.child
    assert new_me is not None and new_peer is not None
    assert (new_me.spi_in, new_me.spi_out) == (new_peer.spi_out, new_peer.spi_in)
    assert new_me.keys == new_peer.keys  # both call the starter "initiator" (§2.17)
    ans_msg = decrypt_message(ans, r2i if initiator_starts else i2r)
    nr = next(p for p in ans_msg.payloads if isinstance(p, Nonce)).data
    if not pfs:  # independent KEYMAT (with PFS g^ir is not visible here)
        km = _prf_plus(r.keys.sk_d, ni + nr, 72)
        assert new_me.keys.encr_i == km[:36] and new_me.keys.encr_r == km[36:]
    else:
        kinds = {
            (t.transform_type, t.transform_id)
            for p in ans_msg.payloads
            if isinstance(p, SA)
            for t in p.proposals[0].transforms
        }
        assert (TransformType.DH, 31) in kinds
    # make-before-break: the Delete of the old Child SA follows the answer
    (delete,) = follow
    d = decrypt_message(delete, mine)
    assert d.payloads == (Delete(ProtocolId.ESP, 4, (old_me[0],)),)
    assert me.children == [old_me, (new_me.spi_in, new_me.spi_out)]
    if initiator_starts:
        (dans,) = resp.receive(delete, 1.0)
        assert ini.receive(dans, 1.0) == []
    else:
        (dans,) = ini.receive(delete, 1.0)
        assert resp.receive(dans, 1.0) == []
    peer_events = (resp if initiator_starts else ini).take_events()
    my_events = (ini if initiator_starts else resp).take_events()
    assert [(e.kind, e.spi_in) for e in peer_events] == [("child_deleted", old_peer[0])]
    assert [(e.kind, e.spi_in) for e in my_events] == [("child_deleted", old_me[0])]
    assert me.children == [(new_me.spi_in, new_me.spi_out)]
    assert peer.children == [(new_peer.spi_in, new_peer.spi_out)]
    assert not me.busy and not peer.busy


def test_initiator_rekeys_child_without_pfs() -> None:
    _our_child_rekey(True, False)


def test_initiator_rekeys_child_with_pfs() -> None:
    _our_child_rekey(True, True)


def test_responder_rekeys_child_without_pfs() -> None:
    _our_child_rekey(False, False)


def test_responder_rekeys_child_with_pfs() -> None:
    _our_child_rekey(False, True)


# -- IKE SA rekey against a hand-built peer ---------------------------------------------------


def _x25519() -> tuple[X25519PrivateKey, bytes]:
    k = X25519PrivateKey.generate()
    return k, k.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _ike_keys(
    sk_d_old: bytes, g_ir: bytes, ni: bytes, nr: bytes, spi_i: bytes, spi_r: bytes
) -> list[bytes]:
    """Independent §2.18 + §2.14: [SK_d, SK_ei, SK_er] for AES-GCM-256 / HMAC-SHA2-256."""
    seed = hmac.new(sk_d_old, g_ir + ni + nr, hashlib.sha256).digest()
    km = _prf_plus(seed, ni + nr + spi_i + spi_r, 32 + 36 + 36 + 32 + 32)
    return [km[:32], km[32:68], km[68:104]]


def test_initiator_rekeys_ike_sa_checked_independently() -> None:
    ini, _resp, r = _established()
    info = _info(ini)
    i2r, r2i = _ciphers(r)
    (req,) = info.rekey_ike(1.0)
    msg = decrypt_message(req, i2r)
    assert msg.exchange_type == ExchangeType.CREATE_CHILD_SA and msg.message_id == 2
    (sa,) = [p for p in msg.payloads if isinstance(p, SA)]
    (prop,) = sa.proposals
    assert prop.protocol_id == ProtocolId.IKE and len(prop.spi) == 8
    assert set(prop.transforms) == set(ike_proposal().transforms)
    ni = next(p for p in msg.payloads if isinstance(p, Nonce)).data
    kei = next(p for p in msg.payloads if isinstance(p, KE))
    assert kei.dh_group == 31 and not any(isinstance(p, (TSi, TSr)) for p in msg.payloads)
    priv, pub = _x25519()
    g_ir = priv.exchange(X25519PublicKey.from_public_bytes(kei.data))
    new_spi_r = b"\x5e" * 8
    answer = (SA((Proposal(1, ProtocolId.IKE, prop.transforms, new_spi_r),)), Nonce(NR))
    resp_msg = Message(
        r.spi_i,
        r.spi_r,
        ExchangeType.CREATE_CHILD_SA,
        2,
        (*answer, KE(31, pub)),
        response=True,
    )
    (follow,) = ini.receive(encrypt_message(resp_msg, r2i)[0], 1.0)
    (ev,) = ini.take_events()
    assert ev.kind == "ike_rekeyed" and ev.initiated
    assert ev.ike_spis == (prop.spi, new_spi_r) and ev.old_ike_spis == (r.spi_i, r.spi_r)
    assert info.spis == (prop.spi, new_spi_r) and info.we_initiated
    # the Delete of the old IKE SA goes on the old SA, with its next message ID
    dele = decrypt_message(follow, i2r)
    assert decode_header(follow).spi_i == r.spi_i and dele.message_id == 3
    assert dele.payloads == (Delete(ProtocolId.IKE),)
    sk_d, sk_ei, sk_er = _ike_keys(r.keys.sk_d, g_ir, ni, NR, prop.spi, new_spi_r)
    new_i2r = SkCipher(20, sk_ei, key_bits=256)
    new_r2i = SkCipher(20, sk_er, key_bits=256)
    # the old SA's Delete is answered; only the old SA goes
    ok = Message(r.spi_i, r.spi_r, ExchangeType.INFORMATIONAL, 3, (), response=True)
    assert ini.receive(encrypt_message(ok, r2i)[0], 1.0) == []
    assert ini.take_events() == [] and info.all_spis == ((prop.spi, new_spi_r),)
    # the new SA: message IDs from 0, we are its initiator; a liveness request of the peer
    # under the independently derived SK_er is answered under SK_ei
    live = Message(prop.spi, new_spi_r, ExchangeType.INFORMATIONAL, 0, ())
    (out,) = ini.receive(encrypt_message(live, new_r2i)[0], 1.0)
    back = decrypt_message(out, new_i2r)
    assert back.response and back.initiator and back.message_id == 0
    assert [e.kind for e in ini.take_events()] == ["liveness"]
    # a Child SA rekey now uses the new SK_d (§2.17 after §2.18)
    (creq,) = info.rekey_child(2.0)
    cmsg = decrypt_message(creq, new_i2r)
    assert cmsg.message_id == 0 and decode_header(creq).spi_i == prop.spi
    cni = next(p for p in cmsg.payloads if isinstance(p, Nonce)).data
    csa = next(p for p in cmsg.payloads if isinstance(p, SA))
    cnr = b"\x33" * 32
    chosen = Proposal(1, ProtocolId.ESP, csa.proposals[0].transforms, b"\xab\xcd\x00\x01")
    tsi = next(p for p in cmsg.payloads if isinstance(p, TSi))
    tsr = next(p for p in cmsg.payloads if isinstance(p, TSr))
    cans = Message(
        prop.spi,
        new_spi_r,
        ExchangeType.CREATE_CHILD_SA,
        0,
        (SA((chosen,)), Nonce(cnr), tsi, tsr),
        response=True,
    )
    ini.receive(encrypt_message(cans, new_r2i)[0], 2.0)
    (cev,) = ini.take_events()
    assert cev.kind == "child_rekeyed" and cev.child is not None
    km = _prf_plus(sk_d, cni + cnr, 72)
    assert cev.child.keys.encr_i == km[:36] and cev.child.keys.encr_r == km[36:]


def test_responder_answers_peer_ike_rekey_checked_independently() -> None:
    _ini, resp, r = _established()
    info = _info(resp)
    i2r, r2i = _ciphers(r)
    priv, pub = _x25519()
    ni = b"\x42" * 32
    new_spi_i = b"\x1d" * 8
    req = Message(
        r.spi_i,
        r.spi_r,
        ExchangeType.CREATE_CHILD_SA,
        2,
        (SA((ike_proposal(new_spi_i),)), Nonce(ni), KE(31, pub)),
        initiator=True,
    )
    (out,) = resp.receive(encrypt_message(req, i2r)[0], 1.0)
    ans = decrypt_message(out, r2i)
    assert ans.response and ans.message_id == 2
    (sa,) = [p for p in ans.payloads if isinstance(p, SA)]
    (chosen,) = sa.proposals
    assert len(chosen.spi) == 8 and set(chosen.transforms) == set(ike_proposal().transforms)
    nr = next(p for p in ans.payloads if isinstance(p, Nonce)).data
    ker = next(p for p in ans.payloads if isinstance(p, KE))
    g_ir = priv.exchange(X25519PublicKey.from_public_bytes(ker.data))
    (ev,) = resp.take_events()
    assert ev.kind == "ike_rekeyed" and ev.ike_spis == (new_spi_i, chosen.spi)
    assert not ev.initiated
    assert info.spis == (new_spi_i, chosen.spi) and not info.we_initiated
    _sk_d, sk_ei, sk_er = _ike_keys(r.keys.sk_d, g_ir, ni, nr, new_spi_i, chosen.spi)
    # the event carries the new SA's keys for an opt-in export, hidden from its repr
    assert ev.ike_keys is not None and ev.ike_suite is not None
    assert (ev.ike_keys.sk_d, ev.ike_keys.sk_ei, ev.ike_keys.sk_er) == (_sk_d, sk_ei, sk_er)
    assert repr(sk_ei) not in repr(ev) and sk_ei.hex() not in repr(ev) + repr(info)
    new_i2r = SkCipher(20, sk_ei, key_bits=256)
    new_r2i = SkCipher(20, sk_er, key_bits=256)
    # the peer deletes the old IKE SA on the old SA: answered, the session lives on
    dele = Message(
        r.spi_i, r.spi_r, ExchangeType.INFORMATIONAL, 3, (Delete(ProtocolId.IKE),), initiator=True
    )
    (dans,) = resp.receive(encrypt_message(dele, i2r)[0], 1.0)
    assert decrypt_message(dans, r2i).payloads == ()
    assert resp.take_events() == [] and not info.closed
    assert info.all_spis == ((new_spi_i, chosen.spi),)
    # the new SA works with message ID 0, and our own request goes there too
    live = Message(new_spi_i, chosen.spi, ExchangeType.INFORMATIONAL, 0, (), initiator=True)
    (out,) = resp.receive(encrypt_message(live, new_i2r)[0], 1.0)
    assert decrypt_message(out, new_r2i).message_id == 0
    (mine,) = info.liveness(2.0)
    m = decrypt_message(mine, new_r2i)
    assert m.message_id == 0 and not m.response
    assert decode_header(mine).spi_i == new_spi_i and not decode_header(mine).initiator


def test_ike_rekey_between_our_roles_then_child_rekey_and_delete() -> None:
    ini, resp, r = _established()
    a, b = _info(ini), _info(resp)
    _shuttle(ini, resp, a.rekey_ike(1.0), from_a=True)
    assert [e.kind for e in ini.take_events()] == ["ike_rekeyed"]
    assert [e.kind for e in resp.take_events()] == ["ike_rekeyed"]
    assert a.spis == b.spis != (r.spi_i, r.spi_r)
    assert a.all_spis == b.all_spis == (a.spis,)  # the old one is deleted on both sides
    # now the responder rekeys the IKE SA back, then the Child SA on the newest IKE SA
    _shuttle(ini, resp, b.rekey_ike(2.0), from_a=False)
    assert b.spis == a.spis and b.we_initiated and not a.we_initiated
    ini.take_events(), resp.take_events()
    _shuttle(ini, resp, a.rekey_child(3.0), from_a=True)
    ev_a = [e.kind for e in ini.take_events()]
    assert ev_a == ["child_rekeyed", "child_deleted"], ev_a
    assert a.children == [(c[1], c[0]) for c in b.children] and len(a.children) == 1
    # and the Delete of the IKE SA ends both
    _shuttle(ini, resp, a.delete_ike(4.0), from_a=True)
    assert a.closed and b.closed


# -- collisions (§2.8.1, §2.8.2) ----------------------------------------------------------------


def test_simultaneous_child_rekeys_leave_one_child() -> None:
    ini, resp, _ = _established()
    a, b = _info(ini), _info(resp)
    (ra,) = a.rekey_child(1.0)
    (rb,) = b.rekey_child(1.0)
    # both requests cross: each side answers the other's before its own answer arrives
    (ans_b,) = resp.receive(ra, 1.0)
    (ans_a,) = ini.receive(rb, 1.0)
    follow_a = ini.receive(ans_b, 1.0)
    follow_b = resp.receive(ans_a, 1.0)
    assert len(follow_a) + len(follow_b) == 2  # each side deletes exactly one Child SA
    _shuttle(ini, resp, follow_a, from_a=True)
    _shuttle(ini, resp, follow_b, from_a=False)
    assert len(a.children) == 1 and a.children == [(c[1], c[0]) for c in b.children]
    kinds_a = [e.kind for e in ini.take_events()]
    kinds_b = [e.kind for e in resp.take_events()]
    assert kinds_a.count("child_rekeyed") == 2 and kinds_b.count("child_rekeyed") == 2
    assert kinds_a.count("child_deleted") == 2 and kinds_b.count("child_deleted") == 2
    assert not a.busy and not b.busy


def test_simultaneous_ike_rekeys_agree_on_one_new_ike_sa() -> None:
    ini, resp, r = _established()
    a, b = _info(ini), _info(resp)
    (ra,) = a.rekey_ike(1.0)
    (rb,) = b.rekey_ike(1.0)
    (ans_b,) = resp.receive(ra, 1.0)
    (ans_a,) = ini.receive(rb, 1.0)
    follow_a = ini.receive(ans_b, 1.0)
    follow_b = resp.receive(ans_a, 1.0)
    _shuttle(ini, resp, follow_a, from_a=True)
    _shuttle(ini, resp, follow_b, from_a=False)
    assert a.spis == b.spis and a.spis != (r.spi_i, r.spi_r)
    assert a.all_spis == b.all_spis == (a.spis,)  # old and redundant SAs deleted
    assert a.we_initiated != b.we_initiated
    # the survivor carries traffic: a Child SA rekey over it works
    _shuttle(ini, resp, b.rekey_child(2.0), from_a=False)
    assert len(a.children) == 1 and a.children == [(c[1], c[0]) for c in b.children]


def test_rekey_of_a_child_being_deleted_gets_temporary_failure_and_is_retried() -> None:
    ini, resp, _ = _established()
    a, b = _info(ini), _info(resp)
    old_b = b.child
    assert old_b is not None
    (dreq,) = b.delete_child(1.0)  # outstanding
    (rreq,) = a.rekey_child(1.0)
    (ans,) = resp.receive(rreq, 1.0)
    m = decode_header(ans)
    assert m.exchange_type == ExchangeType.CREATE_CHILD_SA
    assert ini.receive(ans, 1.0) == []  # TEMPORARY_FAILURE: retried later, not failed
    assert a.busy and a.next_timeout is not None and a.next_timeout > 1.0
    assert [e.kind for e in ini.take_events()] == []
    # the Delete completes
    (dans,) = ini.receive(dreq, 1.0)
    assert resp.receive(dans, 1.0) == []
    assert a.children == [] and b.children == []
    # the retry finds no Child SA to rekey: nothing is sent
    assert a.on_timer(10.0) == [] and not a.busy


# -- retransmission, dead peer, liveness -------------------------------------------------------


def test_unanswered_request_is_retransmitted_with_backoff_then_peer_is_dead() -> None:
    ini, _resp, _ = _established()
    a = _info(ini)
    a.retransmit_timeout, a.retransmit_tries = 1.0, 3
    (req,) = a.liveness(0.0)
    assert a.on_timer(0.9) == []
    assert a.on_timer(1.0) == [req]  # 1 s
    assert a.on_timer(2.9) == []
    assert a.on_timer(3.0) == [req]  # then 2 s
    assert a.on_timer(6.9) == []
    assert a.on_timer(7.0) == []  # 4 s after the third send: dead
    assert a.closed
    (ev,) = ini.take_events()
    assert ev.kind == "dead" and "3 transmissions" in ev.reason
    assert a.next_timeout is None and a.rekey_child(8.0) == []


def test_window_of_one_queues_our_requests() -> None:
    ini, resp, _ = _established()
    a = _info(ini)
    (first,) = a.liveness(0.0)
    assert a.rekey_child(0.0) == [] and a.rekey_ike(0.0) == []  # queued behind it
    (ans,) = resp.receive(first, 0.0)
    (nxt,) = ini.receive(ans, 0.0)  # the answer releases the next request
    assert decode_header(nxt).exchange_type == ExchangeType.CREATE_CHILD_SA


def test_dpd_sends_liveness_after_idle_delay() -> None:
    ini, resp, _ = _established()
    a = _info(ini)
    a.dpd_delay = 10.0
    assert a.on_timer(0.0) == []
    assert a.next_timeout == 10.0
    assert a.on_timer(9.0) == []
    (req,) = a.on_timer(10.0)
    assert decrypt_message(req, _ciphers(ini.result)[0]).payloads == ()  # type: ignore[arg-type]
    (ans,) = resp.receive(req, 10.0)
    assert ini.receive(ans, 10.5) == []
    assert a.on_timer(11.0) == []  # the answer counts as activity
    assert a.next_timeout == 21.0
    assert not a.closed and ini.take_events() == []


# -- hostile input ------------------------------------------------------------------------------


def test_bad_ike_rekey_requests_get_errors_or_drops_and_the_sa_lives_on() -> None:
    _ini, resp, r = _established()
    info = _info(resp)
    i2r, r2i = _ciphers(r)
    _priv, pub = _x25519()
    good = ike_proposal(b"\x1d" * 8)
    no_spi = Proposal(1, ProtocolId.IKE, good.transforms, b"")
    zero_spi = Proposal(1, ProtocolId.IKE, good.transforms, bytes(8))
    cases: list[tuple[tuple[Payload, ...], Notify | None]] = [
        ((SA((no_spi,)), Nonce(NR), KE(31, pub)), Notify(NotifyType.NO_PROPOSAL_CHOSEN)),
        ((SA((zero_spi,)), Nonce(NR), KE(31, pub)), Notify(NotifyType.NO_PROPOSAL_CHOSEN)),
        ((SA((good,)), Nonce(NR)), Notify(NotifyType.INVALID_SYNTAX)),
        ((SA((good,)), KE(31, pub)), Notify(NotifyType.INVALID_SYNTAX)),
        (
            (SA((good,)), Nonce(NR), KE(19, b"\x04" * 64)),
            Notify(NotifyType.INVALID_KE_PAYLOAD, b"\x00\x1f"),
        ),
        # bad KE data (RFC 6989 checks): a malformed request, INVALID_SYNTAX (RFC 7296 §2.21.3)
        ((SA((good,)), Nonce(NR), KE(31, b"\x01" * 7)), Notify(NotifyType.INVALID_SYNTAX)),
        ((SA((good,)), Nonce(NR), KE(31, bytes(32))), Notify(NotifyType.INVALID_SYNTAX)),
    ]
    mid = 2
    for payloads, want in cases:
        req = Message(r.spi_i, r.spi_r, ExchangeType.CREATE_CHILD_SA, mid, payloads, initiator=True)
        out = resp.receive(encrypt_message(req, i2r)[0], 1.0)
        (ans,) = out
        assert decrypt_message(ans, r2i).payloads == (want,), payloads
        mid += 1
    assert resp.take_events() == [] and info.spis == (r.spi_i, r.spi_r) and not info.closed
    req = Message(
        r.spi_i,
        r.spi_r,
        ExchangeType.CREATE_CHILD_SA,
        mid,
        (SA((good,)), Nonce(NR), KE(31, pub)),
        initiator=True,
    )
    assert resp.receive(encrypt_message(req, i2r)[0], 1.0) != []
    assert [e.kind for e in resp.take_events()] == ["ike_rekeyed"]


def test_bad_answers_to_our_rekeys_are_reported_and_the_sa_lives_on() -> None:
    ini, _resp, r = _established()
    info = _info(ini)
    _i2r, r2i = _ciphers(r)
    mid = 2
    bad_answers: list[tuple[Payload, ...]] = [
        (),  # nothing
        (Nonce(NR),),  # no SA
        (Notify(NotifyType.NO_PROPOSAL_CHOSEN),),
        (
            SA((Proposal(1, ProtocolId.IKE, ike_proposal().transforms[:1], b"\x5e" * 8),)),
            Nonce(NR),
            KE(31, b"\x09" * 32),
        ),
    ]
    for payloads in bad_answers:
        (req,) = info.rekey_ike(1.0)
        assert decode_header(req).message_id == mid
        ans = Message(r.spi_i, r.spi_r, ExchangeType.CREATE_CHILD_SA, mid, payloads, response=True)
        assert ini.receive(encrypt_message(ans, r2i)[0], 1.0) == []
        (ev,) = ini.take_events()
        assert ev.kind == "rekey_failed" and ev.reason.startswith("rekey_ike"), ev
        assert info.spis == (r.spi_i, r.spi_r) and not info.closed and not info.busy
        mid += 1
    # a Child SA rekey answered with a proposal we did not offer (AES-CBC) fails the same way
    (req,) = info.rekey_child(1.0)
    cbc = Proposal(
        1,
        ProtocolId.ESP,
        (Transform(TransformType.ENCR, 12, (TransformAttribute.key_length(128),)),),
        b"\x01\x02\x03\x04",
    )
    c = r.child
    ans = Message(
        r.spi_i,
        r.spi_r,
        ExchangeType.CREATE_CHILD_SA,
        mid,
        (SA((cbc,)), Nonce(NR), TSi(c.ts_i), TSr(c.ts_r)),
        response=True,
    )
    assert ini.receive(encrypt_message(ans, r2i)[0], 1.0) == []
    (ev,) = ini.take_events()
    assert ev.kind == "rekey_failed" and len(info.children) == 1
    # the IKE SA still answers and carries requests
    (live,) = info.liveness(2.0)
    assert decode_header(live).message_id == mid + 1
