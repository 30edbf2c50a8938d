"""Sans-IO IKEv2 responder (services.core.ike.responder) against our initiator, in memory.

RFC 7296 §1.2 (IKE_SA_INIT, IKE_AUTH), §2.1 (retransmissions), §2.7 (proposal choice),
§2.9 (traffic selector narrowing), §2.15 (PSK AUTH), §2.17 (Child SA keys), §2.23 (NAT-D).
The independent oracle is tests/netns/test_ike_responder_strongswan.py (strongSwan initiates).
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.core.ike.constants import (
    AuthMethod,
    ExchangeType,
    IdType,
    NotifyType,
    ProtocolId,
    TransformType,
)
from services.core.ike.exchange import (
    Ikev2Initiator,
    InitiatorConfig,
    State,
    ike_proposal,
    nat_detection_hash,
)
from services.core.ike.message import (
    KE,
    SA,
    Auth,
    Delete,
    IDi,
    Message,
    Nonce,
    Notify,
    Payload,
    Proposal,
    TrafficSelector,
    Transform,
    TransformAttribute,
    TSi,
    decode_message,
    encode_message,
)
from services.core.ike.responder import (
    Ikev2Responder,
    ResponderConfig,
    ResponderState,
    choose_esp_proposal,
    choose_ike_proposal,
    narrow,
)
from services.core.ike.sk import SkCipher, decrypt_message, encrypt_message

PSK = b"an example pre-shared key, 32 o"
I_ADDR, R_ADDR = "192.0.2.1", "192.0.2.2"
TS_I, TS_R = "198.51.100.1", "203.0.113.1"
I_EP = (ipaddress.IPv4Address(I_ADDR).packed, 500)
R_EP = (ipaddress.IPv4Address(R_ADDR).packed, 500)


def _counter_rand(tag: bytes) -> Callable[[int], bytes]:
    state = {"n": 0}

    def rand(n: int) -> bytes:
        out = b""
        while len(out) < n:
            state["n"] += 1
            out += hashlib.sha256(tag + state["n"].to_bytes(4, "big")).digest()
        return out[:n]

    return rand


def _ini_config(psk: bytes = PSK, ts_local: str = TS_I, ts_remote: str = TS_R) -> InitiatorConfig:
    return InitiatorConfig(
        local_addr=I_ADDR,
        remote_addr=R_ADDR,
        psk=psk,
        ts_local=(ts_local, ts_local),
        ts_remote=(ts_remote, ts_remote),
    )


def _resp_config(
    psk: bytes = PSK,
    ts_local: tuple[str, str] = ("203.0.113.0", "203.0.113.255"),
    ts_remote: tuple[str, str] = ("198.51.100.0", "198.51.100.255"),
) -> ResponderConfig:
    return ResponderConfig(
        local_addr=R_ADDR,
        psk=psk,
        ts_local=ts_local,
        ts_remote=ts_remote,
        remote_id=I_ADDR,
    )


def _run(
    ini: Ikev2Initiator, resp: Ikev2Responder, *, log: list[tuple[str, bytes]] | None = None
) -> None:
    """Shuttle datagrams until neither side has anything more to say."""
    to_resp = ini.start(0.0)
    for _ in range(10):
        if not to_resp:
            return
        to_ini: list[bytes] = []
        for d in to_resp:
            if log is not None:
                log.append(("i", d))
            port = 4500 if ini.port_float else 500
            to_ini += resp.receive(d, 0.0, remote=(I_EP[0], port), local=(R_EP[0], port))
        to_resp = []
        for d in to_ini:
            if log is not None:
                log.append(("r", d))
            to_resp += ini.receive(d, 0.0)


def _pair(
    ini_cfg: InitiatorConfig | None = None, resp_cfg: ResponderConfig | None = None
) -> tuple[Ikev2Initiator, Ikev2Responder]:
    ini = Ikev2Initiator(ini_cfg or _ini_config(), now=0.0, rand=_counter_rand(b"i"))
    resp = Ikev2Responder(resp_cfg or _resp_config(), now=0.0, rand=_counter_rand(b"r"))
    return ini, resp


def test_establishes_with_our_initiator() -> None:
    ini, resp = _pair()
    _run(ini, resp)
    assert ini.state is State.ESTABLISHED, ini.failure_reason
    assert resp.state is ResponderState.ESTABLISHED, resp.failure_reason
    a, b = ini.result, resp.result
    assert a is not None and b is not None
    assert (a.spi_i, a.spi_r) == (b.spi_i, b.spi_r)
    assert a.keys == b.keys  # same IKE SA keys on both sides (RFC 7296 §2.14)
    # Child SA: each side's inbound SPI is the other's outbound SPI.
    assert a.child.spi_in == b.child.spi_out and a.child.spi_out == b.child.spi_in
    assert a.child.keys.encr_i == b.child.keys.encr_i  # initiator -> responder
    assert a.child.keys.encr_r == b.child.keys.encr_r  # responder -> initiator
    assert a.child.keys.encr_i != a.child.keys.encr_r
    assert len(b.child.keys.encr_i) == 36 and b.child.keys.integ_i == b""
    # NAT-D was exchanged, so IKE_AUTH went to 4500 on both ends.
    assert ini.port_float and resp.nat_t and b.nat_t
    # Narrowed to the initiator's /32 selectors (inside the configured /24s).
    assert [ipaddress.IPv4Address(s.start_address) for s in b.child.ts_i] == [
        ipaddress.IPv4Address(TS_I)
    ]
    assert a.child.ts_r == b.child.ts_r
    assert int.from_bytes(b.child.spi_in, "big") >= 256
    assert "psk" not in repr(resp.config) and PSK.hex() not in repr(resp.config)
    assert str(PSK) not in repr(resp.config)


def test_sa_init_response_carries_correct_nat_detection() -> None:
    ini, resp = _pair()
    req = ini.start(0.0)[0]
    (raw,) = resp.receive(req, 0.0, remote=I_EP, local=R_EP)
    msg = decode_message(raw)
    assert msg.response and not msg.initiator and msg.exchange_type == ExchangeType.IKE_SA_INIT
    nd = {p.notify_type: p.data for p in msg.payloads if isinstance(p, Notify)}
    assert nd[NotifyType.NAT_DETECTION_SOURCE_IP] == nat_detection_hash(
        msg.spi_i, msg.spi_r, R_EP[0], 500
    )
    assert nd[NotifyType.NAT_DETECTION_DESTINATION_IP] == nat_detection_hash(
        msg.spi_i, msg.spi_r, I_EP[0], 500
    )


def test_wrong_psk_gives_authentication_failed_on_both_sides() -> None:
    ini, resp = _pair(ini_cfg=_ini_config(psk=b"some other key"))
    _run(ini, resp)
    assert ini.state is State.FAILED and ini.failure_reason == "AUTHENTICATION_FAILED"
    assert resp.state is ResponderState.FAILED
    assert resp.failure_reason is not None
    assert resp.failure_reason.startswith("AUTHENTICATION_FAILED")
    assert resp.result is None


def test_sa_keys_exist_from_ike_sa_init_on_even_when_auth_fails() -> None:
    """For the opt-in key export: both sides expose the same IKE SA keys once IKE_SA_INIT is
    done, also when IKE_AUTH then fails (so a capture of the failure can be decrypted)."""
    ini, resp = _pair(ini_cfg=_ini_config(psk=b"some other key"))
    assert ini.sa_keys is None and resp.sa_keys is None
    _run(ini, resp)
    assert ini.state is State.FAILED and resp.state is ResponderState.FAILED
    a, b = ini.sa_keys, resp.sa_keys
    assert a is not None and b is not None and a == b
    assert a[0] == ini.spi_i and a[1] == resp.spi_r and a[3] == b[3]
    assert a[2].sk_ei.hex() not in repr(ini) + repr(resp)


def test_wrong_initiator_identity_gives_authentication_failed() -> None:
    cfg = ResponderConfig(
        local_addr=R_ADDR,
        psk=PSK,
        ts_local=(TS_R, TS_R),
        ts_remote=(TS_I, TS_I),
        remote_id="192.0.2.99",
    )
    ini, resp = _pair(resp_cfg=cfg)
    _run(ini, resp)
    assert ini.failure_reason == "AUTHENTICATION_FAILED"
    assert resp.failure_reason and "identity" in resp.failure_reason


def _sa_init_request(proposals: tuple[Proposal, ...], dh_group: int = 31) -> bytes:
    ini = Ikev2Initiator(_ini_config(), now=0.0, rand=_counter_rand(b"x"))
    orig = decode_message(ini.start(0.0)[0])
    payloads = tuple(
        SA(proposals)
        if isinstance(p, SA)
        else KE(dh_group, p.data)
        if isinstance(p, KE) and dh_group != 31
        else p
        for p in orig.payloads
    )
    return encode_message(
        Message(orig.spi_i, orig.spi_r, ExchangeType.IKE_SA_INIT, 0, payloads, initiator=True)
    )


def test_no_acceptable_ike_proposal_gives_no_proposal_chosen() -> None:
    aes128 = Proposal(
        1,
        ProtocolId.IKE,
        (
            Transform(TransformType.ENCR, 20, (TransformAttribute.key_length(128),)),
            Transform(TransformType.PRF, 5),
            Transform(TransformType.DH, 31),
        ),
    )
    resp = Ikev2Responder(_resp_config(), now=0.0)
    req = _sa_init_request((aes128,))
    (raw,) = resp.receive(req, 0.0)
    msg = decode_message(raw)
    assert msg.spi_r == bytes(8) and msg.response
    assert [p.notify_type for p in msg.payloads if isinstance(p, Notify)] == [
        NotifyType.NO_PROPOSAL_CHOSEN
    ]
    assert resp.state is ResponderState.FAILED and (resp.failure_reason or "").startswith(
        "NO_PROPOSAL_CHOSEN"
    )
    assert resp.receive(req, 1.0) == [raw]  # retransmission: same answer


def test_initiator_sees_no_proposal_chosen() -> None:
    ini, resp = _pair()
    req = decode_message(ini.start(0.0)[0])
    # Make the responder accept nothing: its IKE suite is not in the offer.
    other = Proposal(1, ProtocolId.IKE, (Transform(TransformType.ENCR, 12),))
    tampered = encode_message(
        Message(
            req.spi_i,
            req.spi_r,
            ExchangeType.IKE_SA_INIT,
            0,
            tuple(SA((other,)) if isinstance(p, SA) else p for p in req.payloads),
            initiator=True,
        )
    )
    out = resp.receive(tampered, 0.0)
    assert ini.receive(out[0], 0.0) == []
    # unauthenticated (RFC 7296 §2.21.1): acted on when the retransmission timer fires
    assert ini.state is State.SA_INIT_SENT and ini.next_timeout is not None
    assert ini.on_timer(ini.next_timeout) == []
    assert ini.state is State.FAILED
    assert (ini.failure_reason or "").startswith("NO_PROPOSAL_CHOSEN")


def test_other_ke_group_gives_invalid_ke_payload_with_group_31() -> None:
    resp = Ikev2Responder(_resp_config(), now=0.0)
    two_groups = Proposal(
        1,
        ProtocolId.IKE,
        (*ike_proposal().transforms, Transform(TransformType.DH, 19)),
    )
    (raw,) = resp.receive(_sa_init_request((two_groups,), dh_group=19), 0.0)
    (n,) = [p for p in decode_message(raw).payloads if isinstance(p, Notify)]
    assert n.notify_type == NotifyType.INVALID_KE_PAYLOAD and n.data == b"\x00\x1f"
    assert resp.state is ResponderState.WAIT_SA_INIT  # stateless: the initiator may retry
    (ok,) = resp.receive(_sa_init_request((two_groups,)), 0.0)
    assert any(isinstance(p, Nonce) for p in decode_message(ok).payloads)


def test_proposal_choice_picks_the_acceptable_one() -> None:
    bad = Proposal(1, ProtocolId.IKE, (Transform(TransformType.ENCR, 12),))
    good = Proposal(
        2,
        ProtocolId.IKE,
        (
            *ike_proposal().transforms,
            Transform(TransformType.INTEG, 0),
            Transform(TransformType.PRF, 7),
        ),
    )
    chosen = choose_ike_proposal((bad, good))
    assert chosen is not None and chosen.number == 2
    assert {t.transform_type for t in chosen.transforms} == {1, 2, 4}
    esp = Proposal(
        3,
        ProtocolId.ESP,
        (
            Transform(TransformType.ENCR, 20, (TransformAttribute.key_length(256),)),
            Transform(TransformType.ESN, 1),
            Transform(TransformType.ESN, 0),
        ),
        b"\x01\x02\x03\x04",
    )
    picked = choose_esp_proposal((esp,), b"\xaa\xbb\xcc\xdd")
    assert picked is not None
    offered, ours = picked
    assert offered is esp and ours.number == 3 and ours.spi == b"\xaa\xbb\xcc\xdd"
    esn_only = Proposal(3, ProtocolId.ESP, (esp.transforms[0], esp.transforms[1]), esp.spi)
    assert choose_esp_proposal((esn_only,), b"\xaa\xbb\xcc\xdd") is None


def test_narrowing() -> None:
    a = ipaddress.IPv4Address
    wide = TrafficSelector(6, 0, 65535, a("10.0.0.0").packed, a("10.255.255.255").packed)
    out = narrow((wide,), (a("10.1.0.0").packed, a("10.1.0.255").packed))
    assert out == (TrafficSelector(6, 0, 65535, a("10.1.0.0").packed, a("10.1.0.255").packed),)
    assert narrow((wide,), (a("11.0.0.0").packed, a("11.0.0.1").packed)) == ()


def test_ts_outside_the_configured_range_gives_ts_unacceptable() -> None:
    ini, resp = _pair(ini_cfg=_ini_config(ts_remote="10.9.9.9"))
    _run(ini, resp)
    assert ini.state is State.FAILED and ini.failure_reason == "TS_UNACCEPTABLE"
    assert resp.state is ResponderState.FAILED and resp.failure_reason == "TS_UNACCEPTABLE"


def test_retransmitted_requests_get_the_cached_response() -> None:
    ini, resp = _pair()
    log: list[tuple[str, bytes]] = []
    _run(ini, resp, log=log)
    assert resp.state is ResponderState.ESTABLISHED
    (req1, resp1, req2, resp2) = (d for _, d in log)
    assert resp.receive(req2, 5.0) == [resp2]  # IKE_AUTH retransmission after ESTABLISHED
    assert resp.receive(req2, 6.0) == [resp2]
    # IKE_SA_INIT retransmission while waiting for IKE_AUTH.
    ini2, resp2_ = _pair()
    first = ini2.start(0.0)[0]
    a = resp2_.receive(first, 0.0, remote=I_EP, local=R_EP)
    assert resp2_.receive(first, 1.0, remote=I_EP, local=R_EP) == a
    assert resp2_.state is ResponderState.WAIT_AUTH
    assert resp.result is not None and resp.result.spi_r == decode_message(resp1).spi_r
    assert decode_message(req1).message_id == 0


def test_tampered_ike_auth_is_dropped_and_the_exchange_still_completes() -> None:
    ini, resp = _pair()
    (sa_init,) = ini.start(0.0)
    (r1,) = resp.receive(sa_init, 0.0, remote=I_EP, local=R_EP)
    (auth,) = ini.receive(r1, 0.0)
    bad = auth[:-1] + bytes((auth[-1] ^ 1,))
    assert resp.receive(bad, 0.0) == []
    assert resp.state is ResponderState.WAIT_AUTH and resp.dropped == 1
    (r2,) = resp.receive(auth, 0.0)
    ini.receive(r2, 0.0)
    final: ResponderState = resp.state
    assert ini.state is State.ESTABLISHED and final is ResponderState.ESTABLISHED


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_random_bytes_never_raise(data: bytes) -> None:
    resp = Ikev2Responder(_resp_config(), now=0.0)
    assert resp.receive(data, 0.0) == [] or resp.state is not ResponderState.ESTABLISHED


def _transcript() -> list[tuple[str, bytes]]:
    ini, resp = _pair()
    log: list[tuple[str, bytes]] = []
    _run(ini, resp, log=log)
    return log


_LOG = _transcript()
_REQ1, _REQ2 = _LOG[0][1], _LOG[2][1]


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(_REQ1)), st.integers(0, len(_REQ2)), st.binary(max_size=8))
def test_truncated_and_mutated_requests_never_raise(cut1: int, cut2: int, junk: bytes) -> None:
    _, resp = _pair()
    resp.receive(_REQ1[:cut1] + junk, 0.0)
    resp.receive(_REQ1, 0.0, remote=I_EP, local=R_EP)
    # The same IKE_SA_INIT again is a retransmission; truncated IKE_AUTH is dropped.
    resp.receive(_REQ2[:cut2] + junk, 0.0)
    assert resp.state in (ResponderState.WAIT_AUTH, ResponderState.ESTABLISHED)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 10_000), st.integers(0, 255))
def test_bit_flips_never_raise(pos: int, xor: int) -> None:
    for req in (_REQ1, _REQ2):
        _, resp = _pair()
        if req is _REQ2:
            resp.receive(_REQ1, 0.0, remote=I_EP, local=R_EP)
        i = pos % len(req)
        resp.receive(req[:i] + bytes((req[i] ^ xor,)) + req[i + 1 :], 0.0)


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        ResponderConfig(local_addr=R_ADDR, psk=b"", ts_local=(TS_R, TS_R), ts_remote=(TS_I, TS_I))
    with pytest.raises(ValueError):
        ResponderConfig(
            local_addr=R_ADDR, psk=PSK, ts_local=(TS_R, "1.1.1.1"), ts_remote=(TS_I, TS_I)
        )


def test_informational_after_established_is_answered_and_delete_closes() -> None:
    ini, resp = _pair()
    _run(ini, resp)
    r = resp.result
    assert r is not None
    to_r = SkCipher(20, r.keys.sk_ei, key_bits=256)
    from_r = SkCipher(20, r.keys.sk_er, key_bits=256)

    def request(mid: int, payloads: tuple[Delete, ...] = ()) -> bytes:
        msg = Message(r.spi_i, r.spi_r, ExchangeType.INFORMATIONAL, mid, payloads, initiator=True)
        (d,) = encrypt_message(msg, to_r)
        return d

    assert resp.receive(request(5), 0.0) == []  # not the next message ID
    (liveness,) = resp.receive(request(2), 0.0)
    answer = decrypt_message(liveness, from_r)
    assert answer.response and answer.message_id == 2 and answer.payloads == ()
    assert resp.receive(request(2), 0.0) == [liveness]  # retransmission
    (bye,) = resp.receive(request(3, (Delete(ProtocolId.IKE),)), 0.0)
    assert decrypt_message(bye, from_r).message_id == 3
    assert resp.state is ResponderState.CLOSED


def test_time_comes_in_as_now() -> None:
    ini, resp = _pair()
    assert resp.created_at == 0.0
    (req,) = ini.start(0.0)
    resp.receive(req, 42.0)
    assert resp.last_activity == 42.0


def _auth_plaintext() -> tuple[Message, bytes, bytes]:
    """The IKE_AUTH request of the deterministic transcript, decrypted, and SK_ei / SK_er."""
    ini, resp = _pair()
    _run(ini, resp)
    r = resp.result
    assert r is not None
    req = decrypt_message(_REQ2, SkCipher(20, r.keys.sk_ei, key_bits=256))
    return req, r.keys.sk_ei, r.keys.sk_er


_AUTH_REQ, _SK_EI, _SK_ER = _auth_plaintext()
_EXTRA = (
    TSi((TrafficSelector(0, 0, 65535, bytes(16), b"\xff" * 16),)),
    SA((Proposal(1, ProtocolId.ESP, (), b"\x00\x00\x00\x01"),)),
    IDi(IdType.ID_IPV4_ADDR, b"\x01"),
    Auth(AuthMethod.SHARED_KEY_MIC, b""),
    Notify(NotifyType.INITIAL_CONTACT),
    Notify(NotifyType.USE_TRANSPORT_MODE),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(_AUTH_REQ.payloads + _EXTRA), max_size=10))
def test_hostile_authenticated_ike_auth_contents_never_raise(
    payloads: list[Payload],
) -> None:
    """A peer that knows the IKE SA keys sends any mix of payloads in IKE_AUTH: the responder
    answers (encrypted, decryptable) or drops, and never raises."""
    _, resp = _pair()
    resp.receive(_REQ1, 0.0, remote=I_EP, local=R_EP)
    msg = Message(
        _AUTH_REQ.spi_i, _AUTH_REQ.spi_r, ExchangeType.IKE_AUTH, 1, tuple(payloads), initiator=True
    )
    (raw,) = encrypt_message(msg, SkCipher(20, _SK_EI, key_bits=256))
    for d in resp.receive(raw, 0.0):
        answer = decrypt_message(d, SkCipher(20, _SK_ER, key_bits=256))
        assert answer.response and answer.message_id == 1
    if resp.state is ResponderState.ESTABLISHED:
        assert resp.result is not None and resp.result.child.ts_i and resp.result.child.ts_r
