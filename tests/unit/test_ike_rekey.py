"""CHILD SA rekey started by the peer (RFC 7296 §1.3.3, §2.8, §2.17), both roles in memory.

The peer's CREATE_CHILD_SA requests are built by hand with the IKE SA keys (helpers of
tests/unit/test_ike_informational.py); the new Child SA keys are checked against an
independent prf+ (RFC 7296 §2.13) over hashlib/hmac, with the peer as the exchange initiator.
"""

from __future__ import annotations

import hashlib
import hmac

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from services.core.ike.constants import (
    Esn,
    ExchangeType,
    NotifyType,
    ProtocolId,
    TransformType,
)
from services.core.ike.exchange import IkeSaResult
from services.core.ike.informational import InfoEvent
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
)
from services.core.ike.responder import ResponderState
from services.core.ike.sk import SkCipher, decrypt_message, encrypt_message
from tests.unit.test_ike_informational import _ciphers, _established

PEER_SPI = b"\xca\xfe\x00\x01"
NI = bytes(range(32))


def _prf_plus(key: bytes, seed: bytes, n: int) -> bytes:
    out, t, i = b"", b"", 1
    while len(out) < n:
        t = hmac.new(key, t + seed + bytes([i]), hashlib.sha256).digest()
        out += t
        i += 1
    return out[:n]


def _offer(pfs_group: int | None) -> Proposal:
    ts: list[Transform] = [
        Transform(TransformType.ENCR, 12, (TransformAttribute.key_length(128),)),  # AES-CBC
        Transform(TransformType.ENCR, 20, (TransformAttribute.key_length(256),)),
    ]
    if pfs_group is not None:
        ts.append(Transform(TransformType.DH, pfs_group))
    ts.append(Transform(TransformType.ESN, Esn.NO_ESN))
    return Proposal(1, ProtocolId.ESP, tuple(ts), PEER_SPI)


def _request(
    r: IkeSaResult,
    cipher: SkCipher,
    mid: int,
    payloads: tuple[Payload, ...],
    *,
    from_initiator: bool,
) -> bytes:
    msg = Message(
        r.spi_i, r.spi_r, ExchangeType.CREATE_CHILD_SA, mid, payloads, initiator=from_initiator
    )
    (d,) = encrypt_message(msg, cipher)
    return d


def _rekey_payloads(
    r: IkeSaResult, old_spi: bytes, peer_side: TSi, our_side: TSr, ke: KE | None
) -> tuple[Payload, ...]:
    head: tuple[Payload, ...] = (
        Notify(NotifyType.REKEY_SA, b"", ProtocolId.ESP, old_spi),
        SA((_offer(ke.dh_group if ke else None),)),
        Nonce(NI),
    )
    return (*head, *((ke,) if ke else ()), peer_side, our_side)


def _check_rekey(pfs: bool, responder_role: bool) -> None:
    ini, resp, r0 = _established()
    me = resp if responder_role else ini
    r = resp.result if responder_role else ini.result
    assert r is not None and r0 is not None
    i2r, r2i = _ciphers(r)
    peer_out, our_out = (i2r, r2i) if responder_role else (r2i, i2r)
    mid = 2 if responder_role else 0
    # the peer's side of the traffic selectors: TSi of this exchange is the requester's
    c = r.child
    peer_ts, our_ts = (c.ts_i, c.ts_r) if responder_role else (c.ts_r, c.ts_i)
    priv = X25519PrivateKey.generate()
    ke = KE(31, priv.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)) if pfs else None
    # REKEY_SA names the peer's inbound SPI of the old child = our outbound SPI (§1.3.3)
    payloads = _rekey_payloads(r, r.child.spi_out, TSi(peer_ts), TSr(our_ts), ke)
    req = _request(r, peer_out, mid, payloads, from_initiator=responder_role)
    (out,) = me.receive(req, 0.0)
    ans = decrypt_message(out, our_out)
    assert ans.response and ans.exchange_type == ExchangeType.CREATE_CHILD_SA
    assert ans.message_id == mid and ans.initiator == (not responder_role)
    sa = next(p for p in ans.payloads if isinstance(p, SA))
    nr = next(p for p in ans.payloads if isinstance(p, Nonce)).data
    (chosen,) = sa.proposals
    kinds = {(t.transform_type, t.transform_id) for t in chosen.transforms}
    assert (TransformType.ENCR, 20) in kinds and (TransformType.ESN, Esn.NO_ESN) in kinds
    assert ((TransformType.DH, 31) in kinds) is pfs
    assert len(chosen.spi) == 4 and chosen.spi not in (r.child.spi_in, PEER_SPI)
    assert next(p for p in ans.payloads if isinstance(p, TSi)).selectors == peer_ts
    assert next(p for p in ans.payloads if isinstance(p, TSr)).selectors == our_ts
    kes = [p for p in ans.payloads if isinstance(p, KE)]
    g_ir = b""
    if pfs:
        (ker,) = kes
        assert ker.dh_group == 31
        g_ir = priv.exchange(X25519PublicKey.from_public_bytes(ker.data))
    else:
        assert kes == []
    (ev,) = me.take_events()
    assert ev.kind == "child_rekeyed"
    assert (ev.spi_in, ev.spi_out) == (r.child.spi_in, r.child.spi_out)
    new = ev.child
    assert new is not None
    assert new.spi_in == chosen.spi and new.spi_out == PEER_SPI and not new.esn
    # independent KEYMAT: Ni is the peer's (initiator of CREATE_CHILD_SA), Nr ours (§2.17)
    km = _prf_plus(r.keys.sk_d, g_ir + NI + nr, 72)
    assert new.keys.encr_i == km[:36]  # peer -> us (our new inbound SPI)
    assert new.keys.encr_r == km[36:]  # us -> peer
    assert new.keys.integ_i == new.keys.integ_r == b""
    assert new.keys.encr_i != r.child.keys.encr_i
    # retransmit: the cached response, no second event, no new state
    assert me.receive(req, 0.0) == [out]
    assert me.take_events() == []
    # the peer deletes the OLD child: its inbound SPI of the old pair = our old outbound
    d = Delete(ProtocolId.ESP, 4, (r.child.spi_out,))
    msg = Message(
        r.spi_i,
        r.spi_r,
        ExchangeType.INFORMATIONAL,
        mid + 1,
        (d,),
        initiator=responder_role,
    )
    (dreq,) = encrypt_message(msg, peer_out)
    (dout,) = me.receive(dreq, 0.0)
    assert decrypt_message(dout, our_out).payloads == (
        Delete(ProtocolId.ESP, 4, (r.child.spi_in,)),
    )
    assert me.take_events() == [InfoEvent("child_deleted", r.child.spi_in, r.child.spi_out)]
    # a second rekey, of the new child this time, names the new pair
    ke2 = None
    payloads2 = _rekey_payloads(r, PEER_SPI, TSi(peer_ts), TSr(our_ts), ke2)
    me.receive(_request(r, peer_out, mid + 2, payloads2, from_initiator=responder_role), 0.0)
    (ev2,) = me.take_events()
    assert ev2.kind == "child_rekeyed" and (ev2.spi_in, ev2.spi_out) == (new.spi_in, PEER_SPI)


def test_responder_rekey_without_pfs() -> None:
    _check_rekey(pfs=False, responder_role=True)


def test_responder_rekey_with_pfs_x25519() -> None:
    _check_rekey(pfs=True, responder_role=True)


def test_initiator_rekey_without_pfs() -> None:
    _check_rekey(pfs=False, responder_role=False)


def test_initiator_rekey_with_pfs_x25519() -> None:
    _check_rekey(pfs=True, responder_role=False)


def test_rekey_of_unknown_spi_gets_child_sa_not_found() -> None:
    _ini, resp, r = _established()
    i2r, r2i = _ciphers(r)
    unknown = b"\x01\x02\x03\x04"
    payloads = _rekey_payloads(r, unknown, TSi(r.child.ts_i), TSr(r.child.ts_r), None)
    req = _request(r, i2r, 2, payloads, from_initiator=True)
    (out,) = resp.receive(req, 0.0)
    ans = decrypt_message(out, r2i)
    assert ans.exchange_type == ExchangeType.CREATE_CHILD_SA
    assert ans.payloads == (Notify(NotifyType.CHILD_SA_NOT_FOUND, b"", ProtocolId.ESP, unknown),)
    assert resp.take_events() == []
    assert resp.receive(req, 0.0) == [out]  # retransmit -> cached
    assert resp.state is ResponderState.ESTABLISHED


def test_unsupported_requests_are_refused() -> None:
    _ini, resp, r = _established()
    i2r, r2i = _ciphers(r)
    ts = (TSi(r.child.ts_i), TSr(r.child.ts_r))
    # a new Child SA (no REKEY_SA) -> NO_ADDITIONAL_SAS
    new_child = (SA((_offer(None),)), Nonce(NI), *ts)
    (out,) = resp.receive(_request(r, i2r, 2, new_child, from_initiator=True), 0.0)
    assert decrypt_message(out, r2i).payloads == (Notify(NotifyType.NO_ADDITIONAL_SAS),)
    # an IKE SA rekey offering only a DH transform -> NO_PROPOSAL_CHOSEN
    ike = Proposal(1, ProtocolId.IKE, (Transform(TransformType.DH, 31),), b"\x11" * 8)
    (out,) = resp.receive(
        _request(r, i2r, 3, (SA((ike,)), Nonce(NI), KE(31, b"\x09" * 32)), from_initiator=True),
        0.0,
    )
    assert decrypt_message(out, r2i).payloads == (Notify(NotifyType.NO_PROPOSAL_CHOSEN),)
    # only AES-CBC offered -> NO_PROPOSAL_CHOSEN
    cbc = Proposal(
        1,
        ProtocolId.ESP,
        (Transform(TransformType.ENCR, 12, (TransformAttribute.key_length(128),)),),
        PEER_SPI,
    )
    rekey = Notify(NotifyType.REKEY_SA, b"", ProtocolId.ESP, r.child.spi_out)
    (out,) = resp.receive(
        _request(r, i2r, 4, (rekey, SA((cbc,)), Nonce(NI), *ts), from_initiator=True), 0.0
    )
    assert decrypt_message(out, r2i).payloads == (Notify(NotifyType.NO_PROPOSAL_CHOSEN),)
    # KE offered in a group the proposal does not list -> NO_PROPOSAL_CHOSEN
    (out,) = resp.receive(
        _request(
            r,
            i2r,
            5,
            (rekey, SA((_offer(None),)), Nonce(NI), KE(31, b"\x09" * 32), *ts),
            from_initiator=True,
        ),
        0.0,
    )
    assert decrypt_message(out, r2i).payloads == (Notify(NotifyType.NO_PROPOSAL_CHOSEN),)
    # X25519 offered but the KE is MODP-1024 (legacy, not taken) -> INVALID_KE_PAYLOAD(31)
    (out,) = resp.receive(
        _request(
            r,
            i2r,
            6,
            (rekey, SA((_offer(31),)), Nonce(NI), KE(2, b"\x09" * 128), *ts),
            from_initiator=True,
        ),
        0.0,
    )
    assert decrypt_message(out, r2i).payloads == (
        Notify(NotifyType.INVALID_KE_PAYLOAD, b"\x00\x1f"),
    )
    assert resp.take_events() == []
    assert resp.state is ResponderState.ESTABLISHED
    # the old child is still the one to rekey: a proper request after all these works
    (out,) = resp.receive(
        _request(
            r,
            i2r,
            7,
            _rekey_payloads(r, r.child.spi_out, *ts, None),
            from_initiator=True,
        ),
        0.0,
    )
    assert [e.kind for e in resp.take_events()] == ["child_rekeyed"]
