"""Additional Child SAs in one IKE SA (RFC 7296 §1.3.1, §2.9, §2.17, §2.25), both roles, in
memory.

Our initiator and responder are paired (tests/unit/test_ike_responder.py) and must agree on
SPIs, selectors and keys; where the peer's request is built by hand, the new Child SA's keys are
checked against an independent prf+ over hashlib/hmac and X25519 from the cryptography package
(KEYMAT = prf+(SK_d, [g^ir] | Ni | Nr) with the requester as initiator).
"""

from __future__ import annotations

import ipaddress
from dataclasses import replace

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.core.ike.child import ChildPolicy
from services.core.ike.constants import ExchangeType, NotifyType, ProtocolId, TransformType
from services.core.ike.exchange import Ikev2Initiator
from services.core.ike.informational import MAX_CHILD_SAS, InfoEvent, InfoSession
from services.core.ike.message import (
    KE,
    SA,
    Delete,
    Message,
    Nonce,
    Notify,
    Proposal,
    TrafficSelector,
    Transform,
    TSi,
    TSr,
)
from services.core.ike.responder import Ikev2Responder, ResponderConfig
from services.core.ike.sk import decrypt_message, encrypt_message
from services.core.ike.suites import parse_esp_list
from services.core.sa import Mode
from tests.unit.test_ike_informational import _ciphers, _established
from tests.unit.test_ike_rekey import NI, PEER_SPI, _offer, _prf_plus, _request
from tests.unit.test_ike_responder import _counter_rand, _ini_config, _resp_config, _run

# the initiator's second Child SA: 10.1.0.0/24 (its side) <-> 10.2.0.0/24 (the responder's)
INI_B = ChildPolicy.of_ranges("b", ("10.1.0.0", "10.1.0.255"), ("10.2.0.0", "10.2.0.255"))
# the responder accepts wider ranges for "b" (narrowed to the initiator's), and "c"
RESP_B = ChildPolicy.of_ranges("b", ("10.2.0.0", "10.2.255.255"), ("10.1.0.0", "10.1.255.255"))
RESP_C = ChildPolicy.of_ranges("c", ("10.4.0.0", "10.4.0.255"), ("10.3.0.0", "10.3.0.255"))
INI_C = ChildPolicy.of_ranges("c", ("10.3.0.0", "10.3.0.255"), ("10.4.0.0", "10.4.0.255"))


def _info(x: Ikev2Initiator | Ikev2Responder) -> InfoSession:
    info = x.info
    assert info is not None
    return info


def _pair(
    ini_children: tuple[ChildPolicy, ...] = (INI_B, INI_C),
    resp_children: tuple[ChildPolicy, ...] = (RESP_B, RESP_C),
) -> tuple[Ikev2Initiator, Ikev2Responder, InfoSession, InfoSession]:
    ini, resp, _r = _established()
    a, b = _info(ini), _info(resp)
    a.configure_children(ini_children, first="a")
    b.configure_children(resp_children, first="a")
    return ini, resp, a, b


def _deliver(ini: Ikev2Initiator, resp: Ikev2Responder, out: list[bytes], *, to_resp: bool) -> None:
    """Carry datagrams back and forth until both sides are quiet."""
    for _ in range(20):
        if not out:
            return
        nxt: list[bytes] = []
        for d in out:
            nxt += resp.receive(d, 1.0) if to_resp else ini.receive(d, 1.0)
        out, to_resp = nxt, not to_resp
    raise AssertionError("the exchanges did not settle")


def _sel(first: str, last: str) -> TrafficSelector:
    a, b = ipaddress.ip_address(first).packed, ipaddress.ip_address(last).packed
    return TrafficSelector(0, 0, 65535, a, b)


def _created(x: Ikev2Initiator | Ikev2Responder) -> InfoEvent:
    (e,) = [e for e in x.take_events() if e.kind == "child_created"]
    return e


def _check_create(*, initiator_starts: bool, pfs: bool) -> None:
    ini, resp, a, b = _pair()
    me, peer = (a, b) if initiator_starts else (b, a)
    suites = parse_esp_list(["aes256gcm16-x25519" if pfs else "aes128gcm16"])
    if initiator_starts:
        policy = ChildPolicy("b", INI_B.our_ts, INI_B.peer_ts, suites)
        b.policies = (ChildPolicy("b", RESP_B.our_ts, RESP_B.peer_ts, suites), RESP_C)
    else:
        policy = ChildPolicy("b", RESP_B.our_ts, RESP_B.peer_ts, suites)
        a.policies = (ChildPolicy("b", INI_B.our_ts, INI_B.peer_ts, suites), INI_C)
    (req,) = me.create_child(1.0, policy)
    assert me.create_child(1.0, policy) == []  # already outstanding: not twice
    i2r, r2i = _ciphers(ini.result or resp.result)  # type: ignore[arg-type]
    msg = decrypt_message(req, i2r if initiator_starts else r2i)
    assert msg.exchange_type == ExchangeType.CREATE_CHILD_SA and not msg.response
    assert msg.message_id == (2 if initiator_starts else 0)
    notes = [p for p in msg.payloads if isinstance(p, Notify)]
    assert notes == []  # no REKEY_SA, no USE_TRANSPORT_MODE: a new tunnel-mode Child SA
    assert [p.dh_group for p in msg.payloads if isinstance(p, KE)] == ([31] if pfs else [])
    assert next(p for p in msg.payloads if isinstance(p, TSi)).selectors == policy.our_ts
    assert next(p for p in msg.payloads if isinstance(p, TSr)).selectors == policy.peer_ts
    first = (resp if initiator_starts else ini).receive(req, 1.0)
    (ans,) = first
    # a retransmitted request gets the cached answer and creates nothing more
    assert (resp if initiator_starts else ini).receive(req, 1.0) == [ans]
    assert (ini if initiator_starts else resp).receive(ans, 1.0) == []
    ev_me = _created(ini if initiator_starts else resp)
    ev_peer = _created(resp if initiator_starts else ini)
    assert (ini if initiator_starts else resp).take_events() == []
    assert ev_me.initiated and not ev_peer.initiated
    assert ev_me.name == ev_peer.name == "b"
    mine, theirs = ev_me.child, ev_peer.child
    assert mine is not None and theirs is not None
    assert (mine.spi_in, mine.spi_out) == (theirs.spi_out, theirs.spi_in)
    assert mine.keys == theirs.keys  # both call the requester "initiator" (§2.17)
    assert mine.dh == (31 if pfs else 0) and mine.key_bits == (256 if pfs else 128)
    # narrowed to the /24s (the side with the wider /16 ranges narrows, §2.9)
    net1, net2 = _sel("10.1.0.0", "10.1.0.255"), _sel("10.2.0.0", "10.2.0.255")
    assert (mine.ts_i, mine.ts_r) == (
        ((net1,), (net2,)) if initiator_starts else ((net2,), (net1,))
    )
    assert mine.ts_i == theirs.ts_i and mine.ts_r == theirs.ts_r
    if not pfs:  # independent KEYMAT (with PFS g^ir is not visible here)
        ans_msg = decrypt_message(ans, r2i if initiator_starts else i2r)
        nr = next(p for p in ans_msg.payloads if isinstance(p, Nonce)).data
        ni = next(p for p in msg.payloads if isinstance(p, Nonce)).data
        r = ini.result
        assert r is not None
        km = _prf_plus(r.keys.sk_d, ni + nr, 2 * 20)
        assert mine.keys.encr_i == km[:20] and mine.keys.encr_r == km[20:]
    assert len(me.children) == len(peer.children) == 2
    assert me.child_name(mine.spi_in) == peer.child_name(theirs.spi_in) == "b"
    assert me.child_name(me.children[0][0]) == "a"
    assert me.children_named("b") == [(mine.spi_in, mine.spi_out)]
    # the new Child SA is rekeyed with its own selectors and suites, the first one's untouched
    (rk,) = peer.rekey_child(2.0, theirs.spi_in)
    rk_msg = decrypt_message(rk, r2i if initiator_starts else i2r)
    rk_tsi = next(p for p in rk_msg.payloads if isinstance(p, TSi)).selectors
    assert rk_tsi == theirs.ts_r
    _deliver(ini, resp, [rk], to_resp=not initiator_starts)
    rekeyed = [e for e in me.take_events() if e.kind == "child_rekeyed"]
    assert [(e.name, e.spi_in) for e in rekeyed] == [("b", mine.spi_in)]
    names = sorted(me.child_name(c[0]) for c in me.children)
    assert names == ["a", "b"]  # the old "b" was deleted after the rekey
    # deleting "b" leaves "a" and the IKE SA
    (pair,) = me.children_named("b")
    _deliver(ini, resp, me.delete_child(3.0, pair[0]), to_resp=initiator_starts)
    assert [c[0] for c in me.children] == [me.children_named("a")[0][0]]
    assert len(peer.children) == 1 and not me.closed and not peer.closed


def test_initiator_creates_child_without_pfs() -> None:
    _check_create(initiator_starts=True, pfs=False)


def test_initiator_creates_child_with_pfs() -> None:
    _check_create(initiator_starts=True, pfs=True)


def test_responder_creates_child_without_pfs() -> None:
    _check_create(initiator_starts=False, pfs=False)


def test_responder_creates_child_with_pfs() -> None:
    _check_create(initiator_starts=False, pfs=True)


def test_peer_request_checked_independently_and_second_policy_picked() -> None:
    """A hand-built CREATE_CHILD_SA with PFS for the responder's second child "c"."""
    _ini, resp, r = _established()
    _info(resp).configure_children((RESP_B, RESP_C), first="a")
    i2r, r2i = _ciphers(r)
    priv = X25519PrivateKey.generate()
    ke = KE(31, priv.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))
    ts = (TSi((_sel("10.3.0.7", "10.3.0.7"),)), TSr((_sel("10.4.0.0", "10.4.255.255"),)))
    payloads = (SA((_offer(31),)), Nonce(NI), ke, *ts)
    req = _request(r, i2r, 2, payloads, from_initiator=True)
    (out,) = resp.receive(req, 0.0)
    ans = decrypt_message(out, r2i)
    assert ans.response and ans.exchange_type == ExchangeType.CREATE_CHILD_SA
    assert not any(isinstance(p, Notify) for p in ans.payloads)
    nr = next(p for p in ans.payloads if isinstance(p, Nonce)).data
    (ker,) = [p for p in ans.payloads if isinstance(p, KE)]
    g_ir = priv.exchange(X25519PublicKey.from_public_bytes(ker.data))
    # narrowed: TSi as asked (a /32 inside "c"), TSr cut to "c"'s /24
    assert next(p for p in ans.payloads if isinstance(p, TSi)).selectors == (
        _sel("10.3.0.7", "10.3.0.7"),
    )
    assert next(p for p in ans.payloads if isinstance(p, TSr)).selectors == (
        _sel("10.4.0.0", "10.4.0.255"),
    )
    (ev,) = resp.take_events()
    assert ev.kind == "child_created" and ev.name == "c" and not ev.initiated
    new = ev.child
    assert new is not None and new.spi_out == PEER_SPI and new.dh == 31
    km = _prf_plus(r.keys.sk_d, g_ir + NI + nr, 72)
    assert new.keys.encr_i == km[:36] and new.keys.encr_r == km[36:]
    assert resp.receive(req, 0.0) == [out] and resp.take_events() == []  # retransmit
    # the peer deletes the new Child SA: only it goes
    delete = (Delete(ProtocolId.ESP, 4, (PEER_SPI,)),)
    d = Message(r.spi_i, r.spi_r, ExchangeType.INFORMATIONAL, 3, delete, initiator=True)
    (dreq,) = encrypt_message(d, i2r)
    (dans,) = resp.receive(dreq, 0.0)
    assert decrypt_message(dans, r2i).payloads == (Delete(ProtocolId.ESP, 4, (new.spi_in,)),)
    assert resp.take_events() == [InfoEvent("child_deleted", new.spi_in, PEER_SPI)]
    assert _info(resp).children == [(r.child.spi_in, r.child.spi_out)]


def test_peer_requests_that_are_refused() -> None:
    _ini, resp, r = _established()
    i2r, r2i = _ciphers(r)
    info = _info(resp)
    mid = 2

    def ask(*payloads: object) -> tuple[object, ...]:
        nonlocal mid
        req = _request(r, i2r, mid, payloads, from_initiator=True)  # type: ignore[arg-type]
        mid += 1
        (out,) = resp.receive(req, 0.0)
        return decrypt_message(out, r2i).payloads

    inside = (TSi((_sel("10.1.0.1", "10.1.0.1"),)), TSr((_sel("10.2.0.1", "10.2.0.1"),)))
    # no children configured: as before, NO_ADDITIONAL_SAS
    assert ask(SA((_offer(None),)), Nonce(NI), *inside) == (Notify(NotifyType.NO_ADDITIONAL_SAS),)
    info.configure_children((RESP_B,), first="a")
    # selectors outside every configured child -> TS_UNACCEPTABLE
    outside = (TSi((_sel("10.9.0.1", "10.9.0.1"),)), TSr((_sel("10.2.0.1", "10.2.0.1"),)))
    assert ask(SA((_offer(None),)), Nonce(NI), *outside) == (Notify(NotifyType.TS_UNACCEPTABLE),)
    # no acceptable ESP proposal -> NO_PROPOSAL_CHOSEN
    info.policies = (
        ChildPolicy("b", RESP_B.our_ts, RESP_B.peer_ts, parse_esp_list(["aes128gcm16"])),
    )
    assert ask(SA((_offer(None),)), Nonce(NI), *inside) == (Notify(NotifyType.NO_PROPOSAL_CHOSEN),)
    # KE in a group we do not take while one we take is offered -> INVALID_KE_PAYLOAD
    pfs = parse_esp_list(["aes256gcm16-x25519"])
    info.policies = (ChildPolicy("b", RESP_B.our_ts, RESP_B.peer_ts, pfs),)
    both = _offer(31)
    ke19 = KE(19, b"\x04" * 64)
    two = Proposal(1, ProtocolId.ESP, (*both.transforms, Transform(TransformType.DH, 19)), PEER_SPI)
    assert ask(SA((two,)), Nonce(NI), ke19, *inside) == (
        Notify(NotifyType.INVALID_KE_PAYLOAD, (31).to_bytes(2, "big")),
    )
    # transport configured, not asked for -> NO_PROPOSAL_CHOSEN
    info.policies = (replace_mode(RESP_B, Mode.TRANSPORT),)
    assert ask(SA((_offer(None),)), Nonce(NI), *inside) == (Notify(NotifyType.NO_PROPOSAL_CHOSEN),)
    # missing Nonce -> INVALID_SYNTAX
    info.policies = (RESP_B,)
    assert ask(SA((_offer(None),)), *inside) == (Notify(NotifyType.INVALID_SYNTAX),)
    assert resp.take_events() == [] and info.children == [(r.child.spi_in, r.child.spi_out)]
    # fill up to MAX_CHILD_SAS, then NO_ADDITIONAL_SAS
    for n in range(MAX_CHILD_SAS - 1):
        spi = (0x1000 + n).to_bytes(4, "big")
        base = _offer(None)
        offer = Proposal(base.number, base.protocol_id, base.transforms, spi)
        got = ask(SA((offer,)), Nonce(NI), *inside)
        assert not any(isinstance(p, Notify) for p in got)
    assert len(info.children) == MAX_CHILD_SAS
    assert ask(SA((_offer(None),)), Nonce(NI), *inside) == (Notify(NotifyType.NO_ADDITIONAL_SAS),)


def replace_mode(p: ChildPolicy, mode: Mode) -> ChildPolicy:
    return ChildPolicy(p.name, p.our_ts, p.peer_ts, p.esp_suites, mode)


def test_error_answers_to_our_request_are_reported_and_the_sa_lives_on() -> None:
    # the responder has no child matching "c": TS_UNACCEPTABLE
    ini, resp, a, b = _pair(resp_children=(RESP_B,))
    _deliver(ini, resp, a.create_child(1.0, INI_C), to_resp=True)
    (ev,) = ini.take_events()
    assert ev == InfoEvent("child_failed", reason="create_child: TS_UNACCEPTABLE", name="c")
    assert len(a.children) == len(b.children) == 1 and not a.busy
    # no children configured on the peer: NO_ADDITIONAL_SAS
    b.policies = ()
    _deliver(ini, resp, a.create_child(1.0, INI_B), to_resp=True)
    (ev,) = ini.take_events()
    assert ev.kind == "child_failed" and ev.reason == "create_child: NO_ADDITIONAL_SAS"
    # another suite: NO_PROPOSAL_CHOSEN
    b.policies = (ChildPolicy("b", RESP_B.our_ts, RESP_B.peer_ts, parse_esp_list(["aes128gcm16"])),)
    _deliver(ini, resp, a.create_child(1.0, INI_B), to_resp=True)
    (ev,) = ini.take_events()
    assert ev.reason == "create_child: NO_PROPOSAL_CHOSEN" and ev.name == "b"
    assert resp.take_events() == [] and len(a.children) == len(b.children) == 1
    assert not a.closed and not b.closed and not a.busy


def test_invalid_ke_answer_is_retried_in_the_group_asked_for() -> None:
    ours = parse_esp_list(["aes256gcm16-x25519", "aes256gcm16-ecp256"])
    theirs = parse_esp_list(["aes256gcm16-ecp256"])
    ini, resp, a, _b = _pair(
        (ChildPolicy("b", INI_B.our_ts, INI_B.peer_ts, ours),),
        (ChildPolicy("b", RESP_B.our_ts, RESP_B.peer_ts, theirs),),
    )
    (req,) = a.create_child(1.0, a.policies[0])
    (ans,) = resp.receive(req, 1.0)
    assert decrypt_message(ans, _ciphers(resp.result)[1]).payloads == (  # type: ignore[arg-type]
        Notify(NotifyType.INVALID_KE_PAYLOAD, (19).to_bytes(2, "big")),
    )
    (again,) = ini.receive(ans, 1.0)  # the same request with a KE in group 19
    msg = decrypt_message(again, _ciphers(ini.result)[0])  # type: ignore[arg-type]
    assert [p.dh_group for p in msg.payloads if isinstance(p, KE)] == [19]
    _deliver(ini, resp, [again], to_resp=True)
    ev = _created(ini)
    assert ev.child is not None and ev.child.dh == 19 and _created(resp).child is not None


def test_temporary_failure_during_a_peer_ike_rekey_is_retried_later() -> None:
    """Collision with a rekey (§2.25): the peer's IKE SA rekey is outstanding when our
    CREATE_CHILD_SA arrives; ours gets TEMPORARY_FAILURE and succeeds after the rekey."""
    ini, resp, a, b = _pair()
    (ike_req,) = b.rekey_ike(1.0)  # the responder's IKE SA rekey, outstanding
    (child_req,) = a.create_child(1.0, INI_B)
    (ans,) = resp.receive(child_req, 1.0)
    assert ini.receive(ans, 1.0) == []  # TEMPORARY_FAILURE: not failed, retried later
    assert ini.take_events() == [] and a.busy
    # the IKE SA rekey completes (our CREATE_CHILD_SA is no longer outstanding)
    _deliver(ini, resp, [ike_req], to_resp=False)
    assert [e.kind for e in ini.take_events()] == ["ike_rekeyed"]
    resp.take_events()
    assert a.next_timeout is not None and 3.0 <= a.next_timeout <= 5.0
    retry = a.on_timer(5.0)
    assert retry
    _deliver(ini, resp, retry, to_resp=True)
    ev = _created(ini)
    assert ev.name == "b" and _created(resp).name == "b"
    assert len(a.children) == len(b.children) == 2


def test_peer_ike_rekey_while_our_create_child_is_outstanding_gets_temporary_failure() -> None:
    ini, resp, a, b = _pair()
    (child_req,) = a.create_child(1.0, INI_B)  # outstanding
    (ike_req,) = b.rekey_ike(1.0)
    (ike_ans,) = ini.receive(ike_req, 1.0)
    assert resp.receive(ike_ans, 1.0) == []  # TEMPORARY_FAILURE for the IKE SA rekey
    assert [e.kind for e in resp.take_events()] == []
    _deliver(ini, resp, [child_req], to_resp=True)
    assert _created(ini).name == "b"


def test_our_request_is_retransmitted_and_the_peer_answers_once() -> None:
    ini, resp, a, b = _pair()
    (req,) = a.create_child(1.0, INI_B)
    assert a.on_timer(1.5) == []  # not yet
    assert a.on_timer(2.0) == [req]  # retransmitted as is
    (ans,) = resp.receive(req, 2.0)
    assert resp.receive(req, 2.1) == [ans]
    assert ini.receive(ans, 2.2) == []
    assert _created(ini).name == "b" and _created(resp).name == "b"
    assert ini.receive(ans, 2.3) == [] and ini.take_events() == []  # a duplicate: dropped
    assert len(a.children) == 2 and len(b.children) == 2


def test_window_of_one_queues_create_child_behind_a_rekey() -> None:
    ini, resp, a, _b = _pair()
    (rekey,) = a.rekey_child(1.0)
    assert a.create_child(1.0, INI_B) == []  # queued behind the rekey
    _deliver(ini, resp, [rekey], to_resp=True)
    kinds = [e.kind for e in ini.take_events()]
    assert "child_rekeyed" in kinds and "child_created" in kinds
    assert sorted(a.child_name(c[0]) for c in a.children) == ["a", "b"]


def test_ike_auth_may_ask_for_another_configured_child() -> None:
    """RFC 7296 §2.9: the responder matches IKE_AUTH's selectors against its top-level child
    first, then its other configured children; the chosen one's suites and name are used."""
    suites = parse_esp_list(["aes128gcm16"])
    c = ChildPolicy("c", RESP_C.our_ts, RESP_C.peer_ts, suites)
    resp_cfg: ResponderConfig = replace(_resp_config(), children=(RESP_B, c))
    ini_cfg = replace(
        _ini_config(),
        ts_local=("10.3.0.9", "10.3.0.9"),
        ts_remote=("10.4.0.0", "10.4.0.255"),
        esp_suites=parse_esp_list(["aes256gcm16", "aes128gcm16"]),
    )
    ini = Ikev2Initiator(ini_cfg, now=0.0, rand=_counter_rand(b"i"))
    resp = Ikev2Responder(resp_cfg, now=0.0, rand=_counter_rand(b"r"))
    _run(ini, resp)
    assert resp.result is not None and ini.result is not None, resp.failure_reason
    assert resp.child_name == "c"
    child = resp.result.child
    assert child.key_bits == 128  # "c"'s suite, not the top-level aes256gcm16
    assert child.ts_i == (_sel("10.3.0.9", "10.3.0.9"),)
    assert child.ts_r == (_sel("10.4.0.0", "10.4.0.255"),)
    # selectors that fit nothing configured: TS_UNACCEPTABLE, as before
    ini2 = Ikev2Initiator(
        replace(ini_cfg, ts_local=("10.9.0.1", "10.9.0.1")), now=0.0, rand=_counter_rand(b"j")
    )
    resp2 = Ikev2Responder(resp_cfg, now=0.0, rand=_counter_rand(b"s"))
    _run(ini2, resp2)
    assert resp2.result is None and "TS_UNACCEPTABLE" in (resp2.failure_reason or "")


def test_an_unusable_answer_is_deleted_not_installed() -> None:
    """The peer answers our CREATE_CHILD_SA with selectors outside ours: child_failed, and
    the Child SA the peer created is deleted at once (RFC 7296 §1.3.1)."""
    ini, _resp, a, _b = _pair()
    (req,) = a.create_child(1.0, INI_B)
    r = ini.result
    assert r is not None
    i2r, r2i = _ciphers(r)
    msg = decrypt_message(req, i2r)
    offered = next(p for p in msg.payloads if isinstance(p, SA)).proposals[0]
    their_spi = b"\x0b\x0b\x0b\x0b"
    answer = (
        SA((Proposal(1, ProtocolId.ESP, offered.transforms, their_spi),)),
        Nonce(NI),
        TSi((_sel("10.9.0.0", "10.9.0.255"),)),  # not inside 10.1.0.0/24
        TSr(INI_B.peer_ts),
    )
    reply = Message(
        r.spi_i, r.spi_r, ExchangeType.CREATE_CHILD_SA, msg.message_id, answer,
        initiator=False, response=True,
    )  # fmt: skip
    (data,) = encrypt_message(reply, r2i)
    (delete,) = ini.receive(data, 1.0)
    (ev,) = ini.take_events()
    assert ev.kind == "child_failed" and "outside ours" in ev.reason and ev.name == "b"
    d = decrypt_message(delete, i2r)
    assert d.exchange_type == ExchangeType.INFORMATIONAL
    assert len(d.payloads) == 1 and isinstance(d.payloads[0], Delete)
    assert len(a.children) == 2  # until the peer answers the Delete
    assert a.children[1][1] == their_spi and d.payloads[0].spis == (a.children[1][0],)


# -- hostile requests for new Child SAs ---------------------------------------------------------


@st.composite
def _selector(draw: st.DrawFn) -> TrafficSelector:
    n = draw(st.sampled_from([4, 4, 16]))
    a = draw(st.binary(min_size=n, max_size=n))
    b = draw(st.binary(min_size=n, max_size=n))
    lo, hi = draw(st.integers(0, 65535)), draw(st.integers(0, 65535))
    return TrafficSelector(draw(st.integers(0, 255)), lo, hi, a, b)


@st.composite
def _new_child_request(draw: st.DrawFn) -> tuple[object, ...]:
    spi = draw(st.binary(min_size=4, max_size=4))
    base = draw(st.sampled_from([_offer(None), _offer(31), _offer(19)]))
    props = (Proposal(1, ProtocolId.ESP, base.transforms, spi),)
    out: list[object] = []
    if draw(st.booleans()):
        out.append(Notify(NotifyType.USE_TRANSPORT_MODE))
    if draw(st.integers(0, 5)):
        out.append(SA(props))
    if draw(st.integers(0, 5)):
        out.append(Nonce(draw(st.binary(min_size=0, max_size=64))))
    if draw(st.booleans()):
        gid = draw(st.sampled_from([31, 19, 14, 2, 999]))
        out.append(KE(gid, draw(st.binary(min_size=0, max_size=80))))
    inside = (TSi((_sel("10.1.0.1", "10.1.0.1"),)), TSr((_sel("10.2.0.1", "10.2.0.1"),)))
    if draw(st.booleans()):
        out += inside
    else:
        out += [
            TSi(tuple(draw(st.lists(_selector(), max_size=3)))),
            TSr(tuple(draw(st.lists(_selector(), max_size=3)))),
        ]
    return tuple(out)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_new_child_request(), min_size=1, max_size=12))
def test_hostile_new_child_requests_are_answered_and_bounded(
    reqs: list[tuple[object, ...]],
) -> None:
    _ini, resp, r = _established()
    _info(resp).configure_children((RESP_B, RESP_C), first="a")
    i2r, r2i = _ciphers(r)
    for mid, payloads in enumerate(reqs, start=2):
        req = _request(r, i2r, mid, payloads, from_initiator=True)  # type: ignore[arg-type]
        out = resp.receive(req, 0.0)
        assert out, "every authentic request is answered"
        for d in out:
            ans = decrypt_message(d, r2i)
            assert ans.response and ans.message_id == mid
        assert len(_info(resp).children) <= MAX_CHILD_SAS
    for e in resp.take_events():
        assert e.kind == "child_created" and e.name in ("b", "c") and e.child is not None
        assert e.child.keys.encr_i.hex() not in repr(e)
    assert resp.state.value == "established"
