"""Sans-IO IKEv2 initiator (services.core.ike.exchange), RFC 7296 §1.2, §2.14, §2.15, §2.17, §2.23.

A tiny responder built in this file from the codec, the DH groups and the SK layer drives the
initiator through IKE_SA_INIT and IKE_AUTH. The responder recomputes SKEYSEED, the initiator's
AUTH and the Child SA KEYMAT with plain ``hmac`` (not services.core.ike.prf), so the initiator's
key schedule and AUTH are checked against a second, hand-written computation. The real
independent oracle is tests/netns/test_ike_strongswan.py (strongSwan as responder).
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from services.core.ike.authn import PskAuth, signed_octets
from services.core.ike.constants import (
    AuthMethod,
    ExchangeType,
    IdType,
    NotifyType,
    PayloadType,
    ProtocolId,
    TransformType,
)
from services.core.ike.dh import group
from services.core.ike.exchange import (
    RETRANSMIT_TRIES,
    Ikev2Initiator,
    InitiatorConfig,
    State,
    nat_detection_hash,
)
from services.core.ike.message import (
    KE,
    SA,
    SK,
    Auth,
    IDi,
    IDr,
    Message,
    Nonce,
    Notify,
    Payload,
    Proposal,
    TSi,
    TSr,
    decode_header,
    decode_message,
    encode_message,
)
from services.core.ike.sk import SkCipher, decrypt_message, encrypt_message

PSK = b"an example pre-shared key, 32 o"
LOCAL, REMOTE = "192.0.2.1", "192.0.2.2"
TS_I, TS_R = "198.51.100.1", "203.0.113.1"


def _config(psk: bytes = PSK) -> InitiatorConfig:
    return InitiatorConfig(
        local_addr=LOCAL,
        remote_addr=REMOTE,
        psk=psk,
        ts_local=(TS_I, TS_I),
        ts_remote=(TS_R, TS_R),
    )


def _counter_rand() -> Callable[[int], bytes]:
    """Deterministic 'randomness' (a SHA-256 counter stream), to make runs reproducible."""
    state = {"n": 0}

    def rand(n: int) -> bytes:
        out = b""
        while len(out) < n:
            state["n"] += 1
            out += hashlib.sha256(b"rand" + state["n"].to_bytes(4, "big")).digest()
        return out[:n]

    return rand


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def _prf_plus(key: bytes, seed: bytes, n: int) -> bytes:
    out, t, i = b"", b"", 1
    while len(out) < n:
        t = _hmac(key, t + seed + bytes((i,)))
        out += t
        i += 1
    return out[:n]


def _find(payloads: tuple[Payload, ...], cls: type) -> list[Payload]:
    return [p for p in payloads if isinstance(p, cls)]


@dataclass
class Responder:
    """Minimal PSK responder (hand-written key schedule), enough for one IKE_SA_INIT/IKE_AUTH."""

    psk: bytes = PSK
    spi_r: bytes = bytes.fromhex("1122334455667788")
    nr: bytes = bytes(range(32))
    child_spi: bytes = bytes.fromhex("c0ffee01")
    sa_init_error: int | None = None
    auth_error: int | None = None
    send_nat_d: bool = True
    keys: dict[str, bytes] = field(default_factory=dict)
    msg1: bytes = b""
    msg2: bytes = b""
    ni: bytes = b""
    auth_ok: bool | None = None

    def sa_init(self, data: bytes) -> bytes:
        self.msg1 = data
        req = decode_message(data)
        if self.sa_init_error is not None:
            err = Message(
                req.spi_i,
                bytes(8),
                ExchangeType.IKE_SA_INIT,
                0,
                (Notify(self.sa_init_error),),
                response=True,
            )
            return encode_message(err)
        (sa,) = _find(req.payloads, SA)
        (ke,) = _find(req.payloads, KE)
        (nonce,) = _find(req.payloads, Nonce)
        assert isinstance(sa, SA) and isinstance(ke, KE) and isinstance(nonce, Nonce)
        self.ni = nonce.data
        dh = group(31).generate(lambda n: b"\x42" * n)
        g_ir = dh.shared(ke.data)
        payloads: list[Payload] = [
            SA(sa.proposals[:1]),
            KE(31, dh.public_bytes()),
            Nonce(self.nr),
        ]
        if self.send_nat_d:
            ports = struct.pack("!H", 500)
            for t, addr in (
                (NotifyType.NAT_DETECTION_SOURCE_IP, bytes([192, 0, 2, 2])),
                (NotifyType.NAT_DETECTION_DESTINATION_IP, bytes([192, 0, 2, 1])),
            ):
                h = hashlib.sha1(req.spi_i + self.spi_r + addr + ports).digest()
                payloads.append(Notify(t, h))
        resp = Message(
            req.spi_i,
            self.spi_r,
            ExchangeType.IKE_SA_INIT,
            0,
            tuple(payloads),
            response=True,
        )
        self.msg2 = encode_message(resp)
        # RFC 7296 §2.14 by hand: SKEYSEED, then prf+ cut into 32|0|0|36|36|32|32.
        seed = _hmac(self.ni + self.nr, g_ir)
        km = _prf_plus(seed, self.ni + self.nr + req.spi_i + self.spi_r, 32 + 36 + 36 + 32 + 32)
        self.keys = {
            "sk_d": km[:32],
            "sk_ei": km[32:68],
            "sk_er": km[68:104],
            "sk_pi": km[104:136],
            "sk_pr": km[136:168],
        }
        return self.msg2

    def auth(self, data: bytes) -> bytes:
        req = decrypt_message(data, SkCipher(20, self.keys["sk_ei"], key_bits=256))
        assert req.exchange_type == ExchangeType.IKE_AUTH and req.message_id == 1
        (idi,) = _find(req.payloads, IDi)
        (auth,) = _find(req.payloads, Auth)
        (sa,) = _find(req.payloads, SA)
        (tsi,) = _find(req.payloads, TSi)
        (tsr,) = _find(req.payloads, TSr)
        assert isinstance(idi, IDi) and isinstance(auth, Auth) and isinstance(sa, SA)
        assert isinstance(tsi, TSi) and isinstance(tsr, TSr)
        # RFC 7296 §2.15 by hand.
        signed = self.msg1 + self.nr + _hmac(self.keys["sk_pi"], idi.encode_body())
        want = _hmac(_hmac(self.psk, b"Key Pad for IKEv2"), signed)
        self.auth_ok = hmac.compare_digest(want, auth.data)
        inner: tuple[Payload, ...]
        if not self.auth_ok:
            inner = (Notify(NotifyType.AUTHENTICATION_FAILED),)
        elif self.auth_error is not None:
            inner = (Notify(self.auth_error),)
        else:
            idr = IDr(IdType.ID_IPV4_ADDR, bytes([192, 0, 2, 2]))
            signed_r = self.msg2 + self.ni + _hmac(self.keys["sk_pr"], idr.encode_body())
            auth_r = _hmac(_hmac(self.psk, b"Key Pad for IKEv2"), signed_r)
            prop = sa.proposals[0]
            chosen = Proposal(prop.number, prop.protocol_id, prop.transforms, self.child_spi)
            inner = (
                idr,
                Auth(AuthMethod.SHARED_KEY_MIC, auth_r),
                SA((chosen,)),
                tsi,
                tsr,
            )
        resp = Message(req.spi_i, req.spi_r, ExchangeType.IKE_AUTH, 1, inner, response=True)
        (out,) = encrypt_message(resp, SkCipher(20, self.keys["sk_er"], key_bits=256))
        return out


def _run(ini: Ikev2Initiator, resp: Responder) -> None:
    (m1,) = ini.start(0.0)
    out = ini.receive(resp.sa_init(m1), 0.1)
    if ini.state is State.SA_INIT_SENT and out == []:
        # an unusable IKE_SA_INIT response is not acted on at once (RFC 7296 §2.21.1): the
        # attempt fails when the retransmission timer fires without a valid one
        deadline = ini.next_timeout
        assert deadline is not None
        assert ini.on_timer(deadline) == []
    if ini.state is State.FAILED:
        assert out == []
        return
    assert len(out) == 1
    assert ini.receive(resp.auth(out[0]), 0.2) == []


# -- IKE_SA_INIT request ---------------------------------------------------------------------


def test_first_message_carries_sa_ke_nonce_and_nat_detection() -> None:
    ini = Ikev2Initiator(_config(), now=0.0, rand=_counter_rand())
    (m1,) = ini.start(0.0)
    assert ini.state is State.SA_INIT_SENT
    msg = decode_message(m1)
    assert msg.exchange_type == ExchangeType.IKE_SA_INIT and msg.message_id == 0
    assert msg.initiator and not msg.response
    assert msg.spi_i == ini.spi_i and msg.spi_r == bytes(8) and any(msg.spi_i)
    types = [p.payload_type for p in msg.payloads]
    assert types[:3] == [PayloadType.SA, PayloadType.KE, PayloadType.NONCE]
    (sa,) = _find(msg.payloads, SA)
    assert isinstance(sa, SA)
    (prop,) = sa.proposals
    assert prop.protocol_id == ProtocolId.IKE and prop.spi == b""
    got = {(t.transform_type, t.transform_id, t.key_length) for t in prop.transforms}
    assert got == {
        (TransformType.ENCR, 20, 256),
        (TransformType.PRF, 5, None),
        (TransformType.DH, 31, None),
    }
    (ke,) = _find(msg.payloads, KE)
    assert isinstance(ke, KE) and ke.dh_group == 31 and len(ke.data) == 32
    (nonce,) = _find(msg.payloads, Nonce)
    assert isinstance(nonce, Nonce) and len(nonce.data) == 32
    notes = {p.notify_type: p.data for p in _find(msg.payloads, Notify) if isinstance(p, Notify)}
    port = struct.pack("!H", 500)
    zero = bytes(8)
    src = hashlib.sha1(msg.spi_i + zero + bytes([192, 0, 2, 1]) + port).digest()
    dst = hashlib.sha1(msg.spi_i + zero + bytes([192, 0, 2, 2]) + port).digest()
    assert notes[NotifyType.NAT_DETECTION_SOURCE_IP] == src
    assert notes[NotifyType.NAT_DETECTION_DESTINATION_IP] == dst
    assert nat_detection_hash(msg.spi_i, zero, bytes([192, 0, 2, 1]), 500) == src


def test_psk_auth_matches_hand_computation() -> None:
    msg, nonce, sk_p = b"\x01" * 300, b"\x02" * 32, b"\x03" * 32
    id_body = bytes((IdType.ID_IPV4_ADDR, 0, 0, 0, 192, 0, 2, 1))
    inner = hmac.new(PSK, b"Key Pad for IKEv2", hashlib.sha256).digest()
    macced = hmac.new(sk_p, id_body, hashlib.sha256).digest()
    want = hmac.new(inner, msg + nonce + macced, hashlib.sha256).digest()
    octets = signed_octets(5, msg, nonce, sk_p, id_body)
    assert PskAuth(PSK).auth_payload(octets, 5, frozenset()).data == want


def test_config_repr_hides_psk() -> None:
    cfg = _config(b"super-secret-psk-value")
    assert "super-secret" not in repr(cfg)
    assert "super-secret" not in repr(Ikev2Initiator(cfg, now=0.0))
    with pytest.raises(ValueError):
        InitiatorConfig(
            local_addr="not an address",
            remote_addr=REMOTE,
            psk=PSK,
            ts_local=(TS_I, TS_I),
            ts_remote=(TS_R, TS_R),
        )


# -- full exchange against the in-test responder ----------------------------------------------


def test_establishes_ike_and_child_sa() -> None:
    ini = Ikev2Initiator(_config(), now=0.0, rand=_counter_rand())
    resp = Responder()
    _run(ini, resp)
    assert resp.auth_ok is True
    assert ini.state is State.ESTABLISHED, ini.failure_reason
    assert ini.port_float is True
    r = ini.result
    assert r is not None
    assert r.spi_i == ini.spi_i and r.spi_r == resp.spi_r and r.nat_t
    assert r.keys.sk_d == resp.keys["sk_d"]
    assert r.keys.sk_ei == resp.keys["sk_ei"] and r.keys.sk_er == resp.keys["sk_er"]
    assert r.keys.sk_pi == resp.keys["sk_pi"] and r.keys.sk_pr == resp.keys["sk_pr"]
    assert r.keys.sk_ai == b"" and r.keys.sk_ar == b""
    c = r.child
    assert c.spi_out == resp.child_spi and len(c.spi_in) == 4
    assert int.from_bytes(c.spi_in, "big") >= 256
    assert (c.encr_id, c.key_bits, c.esn) == (20, 256, False)
    # §2.17 by hand: KEYMAT = prf+(SK_d, Ni | Nr); initiator->responder 36 octets first.
    km = _prf_plus(resp.keys["sk_d"], resp.ni + resp.nr, 72)
    assert c.keys.encr_i == km[:36] and c.keys.encr_r == km[36:]
    assert c.keys.integ_i == b"" and c.keys.integ_r == b""
    assert [s.start_address for s in c.ts_i] == [bytes([198, 51, 100, 1])]
    assert [s.start_address for s in c.ts_r] == [bytes([203, 0, 113, 1])]
    assert "sk_d" not in repr(r) and r.keys.sk_d.hex() not in repr(r)
    assert c.keys.encr_i.hex() not in repr(r)


def test_ike_auth_request_is_encrypted_with_the_expected_inner_payloads() -> None:
    ini = Ikev2Initiator(_config(), now=0.0, rand=_counter_rand())
    resp = Responder()
    (m1,) = ini.start(0.0)
    (m3,) = ini.receive(resp.sa_init(m1), 0.1)
    outer = decode_message(m3)
    assert outer.exchange_type == ExchangeType.IKE_AUTH and outer.message_id == 1
    assert [type(p) for p in outer.payloads] == [SK]
    inner = decrypt_message(m3, SkCipher(20, resp.keys["sk_ei"], key_bits=256))
    assert [p.payload_type for p in inner.payloads] == [
        PayloadType.IDi,
        PayloadType.IDr,
        PayloadType.AUTH,
        PayloadType.SA,
        PayloadType.TSi,
        PayloadType.TSr,
    ]
    (sa,) = _find(inner.payloads, SA)
    assert isinstance(sa, SA)
    (prop,) = sa.proposals
    assert prop.protocol_id == ProtocolId.ESP and len(prop.spi) == 4
    got = {(t.transform_type, t.transform_id, t.key_length) for t in prop.transforms}
    assert got == {(TransformType.ENCR, 20, 256), (TransformType.ESN, 0, None)}


def test_no_nat_detection_means_no_port_float() -> None:
    ini = Ikev2Initiator(_config(), now=0.0)
    _run(ini, Responder(send_nat_d=False))
    assert ini.state is State.ESTABLISHED
    assert ini.port_float is False


def test_no_proposal_chosen_fails_with_reason() -> None:
    ini = Ikev2Initiator(_config(), now=0.0)
    _run(ini, Responder(sa_init_error=NotifyType.NO_PROPOSAL_CHOSEN))
    assert ini.state is State.FAILED
    assert (ini.failure_reason or "").startswith("NO_PROPOSAL_CHOSEN: the responder accepted none")
    assert ini.next_timeout is None and ini.on_timer(100.0) == []


def test_wrong_psk_at_responder_gives_authentication_failed() -> None:
    ini = Ikev2Initiator(_config(), now=0.0)
    resp = Responder(psk=b"another pre-shared key")
    _run(ini, resp)
    assert resp.auth_ok is False
    assert ini.state is State.FAILED
    assert ini.failure_reason == "AUTHENTICATION_FAILED"
    assert ini.result is None


def test_child_error_in_ike_auth_fails_with_reason() -> None:
    ini = Ikev2Initiator(_config(), now=0.0)
    _run(ini, Responder(auth_error=NotifyType.TS_UNACCEPTABLE))
    assert ini.state is State.FAILED and ini.failure_reason == "TS_UNACCEPTABLE"


def test_responder_auth_that_does_not_verify_fails() -> None:
    """A responder AUTH made with a wrong SK_pr (so a wrong key) is rejected."""
    ini = Ikev2Initiator(_config(), now=0.0)
    resp = Responder()
    (m1,) = ini.start(0.0)
    (m3,) = ini.receive(resp.sa_init(m1), 0.1)
    resp.keys["sk_pr"] = bytes(32)
    # RFC 7296 §2.21.2: the responder is told in an INFORMATIONAL request (AUTHENTICATION_FAILED)
    (info,) = ini.receive(resp.auth(m3), 0.2)
    hdr = decode_header(info)
    assert (hdr.exchange_type, hdr.message_id, hdr.response) == (37, 2, False)
    assert ini.state is State.FAILED
    assert ini.failure_reason is not None and "AUTH does not verify" in ini.failure_reason


def test_unrelated_and_malformed_datagrams_are_ignored() -> None:
    ini = Ikev2Initiator(_config(), now=0.0)
    resp = Responder()
    (m1,) = ini.start(0.0)
    m2 = resp.sa_init(m1)
    assert ini.receive(b"garbage", 0.1) == []
    other = bytearray(m2)
    other[0] ^= 0xFF  # another SPIi
    assert ini.receive(bytes(other), 0.1) == []
    assert ini.receive(m1, 0.1) == []  # our own request (not a response)
    assert ini.state is State.SA_INIT_SENT
    (m3,) = ini.receive(m2, 0.1)
    tampered = bytearray(resp.auth(m3))
    tampered[-1] ^= 1  # ICV fails: dropped, still waiting
    assert ini.receive(bytes(tampered), 0.2) == []
    assert ini.state.value == State.AUTH_SENT.value


def test_retransmits_then_gives_up() -> None:
    ini = Ikev2Initiator(_config(), now=0.0)
    (m1,) = ini.start(10.0)
    assert ini.on_timer(10.5) == []
    t = 10.0
    for _ in range(RETRANSMIT_TRIES - 1):
        nxt = ini.next_timeout
        assert nxt is not None and nxt > t
        t = nxt
        assert ini.on_timer(t) == [m1]
    t = ini.next_timeout or 0.0
    assert ini.on_timer(t) == []
    assert ini.state is State.FAILED
    assert ini.failure_reason is not None and "no response" in ini.failure_reason


def test_cookie_request_fails_readably() -> None:
    ini = Ikev2Initiator(_config(), now=0.0)
    _run(ini, Responder(sa_init_error=NotifyType.COOKIE))
    assert ini.state is State.FAILED
    assert ini.failure_reason is not None and "COOKIE" in ini.failure_reason
