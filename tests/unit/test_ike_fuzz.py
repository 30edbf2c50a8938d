"""Malformed-IKE robustness: the IKEv2 decoder and every receiving state machine, fuzzed.

RFC 7296 §2.5 (version numbers, the critical bit), §3.1/§3.2 (header, generic payload header,
Next Payload chain), §2.21 (error handling), RFC 7383 §2.6 (fragment reassembly).

Inputs are arbitrary bytes and structured mutations of valid messages (truncation, rewritten
length fields, critical bits, unknown and IKEv1 payload types inserted, huge counts), plus
messages that are validly encrypted with the real keys of an in-memory handshake but carry
malformed inner payloads. What may happen: ``decode_*`` raise IkeDecodeError; ``decrypt_*``
SkError or IkeDecodeError; ``InfoSession.handle`` those or InfoDrop / InvalidKeyExchange (its
documented drops); ``Ikev2Responder.receive`` and ``Ikev2Initiator.receive`` never raise. State
stays bounded, and the legitimate continuation of the exchange still works afterwards.

Where the exact answer is known (unknown payload with / without the critical bit, truncation,
major version) it is checked exactly, and so are the error answers of RFC 7296 §2.5 / §2.21
(UNSUPPORTED_CRITICAL_PAYLOAD, INVALID_MAJOR_VERSION, INVALID_SYNTAX) and the bounds on Child
SA rekeys (§2.25).

``IKE_FUZZ_EXAMPLES=20000`` runs every property as a longer campaign.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.core.iana import Encr, Integ
from services.core.ike.constants import (
    IKE_HEADER_LEN,
    ExchangeType,
    IdType,
    NotifyType,
    PayloadType,
    ProtocolId,
)
from services.core.ike.dh import GROUPS, InvalidKeyExchange
from services.core.ike.exchange import IkeSaResult, Ikev2Initiator, State, ike_proposal
from services.core.ike.informational import InfoDrop, InfoEvent, InfoSession
from services.core.ike.message import (
    CP,
    EAP,
    KE,
    MAX_PAYLOADS,
    SA,
    Auth,
    Cert,
    CertReq,
    ConfigAttribute,
    Delete,
    IDi,
    IDr,
    IkeDecodeError,
    IkeHeader,
    Message,
    Nonce,
    Notify,
    Payload,
    Proposal,
    RawTrafficSelector,
    TrafficSelector,
    Transform,
    TransformAttribute,
    TSi,
    TSr,
    UnknownPayload,
    VendorId,
    decode_message,
    decode_payloads,
    encode_message,
    encode_payloads,
)
from services.core.ike.payloads import DECODERS
from services.core.ike.responder import Ikev2Responder, ResponderState
from services.core.ike.sk import (
    FragmentReassembler,
    SkCipher,
    SkError,
    decrypt_message,
    encrypt_message,
)
from tests.unit.test_ike_responder import I_EP, R_EP, _pair, _run

_N = int(os.environ.get("IKE_FUZZ_EXAMPLES", "0"))


def _fuzz(n: int) -> settings:
    return settings(
        max_examples=_N or n,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


GCM = Encr.AES_GCM_16
_GENERIC = struct.Struct("!BBH")
# Payload types nobody dissects here: IKEv1 (1..13), reserved (14..32), GSPM, IDg, GSA, KD, PS,
# unassigned and private use. Critical -> UNSUPPORTED_CRITICAL_PAYLOAD (RFC 7296 §2.5).
UNKNOWN_TYPES = [t for t in range(1, 256) if t not in DECODERS]
IKEV1_TYPES = list(range(1, 14))
assert set(IKEV1_TYPES) <= set(UNKNOWN_TYPES)


# -- corpus -------------------------------------------------------------------------------------


def _transcript() -> tuple[list[tuple[str, bytes]], IkeSaResult]:
    ini, resp = _pair()
    log: list[tuple[str, bytes]] = []
    _run(ini, resp, log=log)
    assert resp.result is not None and resp.state is ResponderState.ESTABLISHED
    return log, resp.result


_LOG, _RESULT = _transcript()
REQ1, RESP1, REQ2, RESP2 = (d for _, d in _LOG)


def _i2r() -> SkCipher:
    return SkCipher(GCM, _RESULT.keys.sk_ei, key_bits=256)


def _r2i() -> SkCipher:
    return SkCipher(GCM, _RESULT.keys.sk_er, key_bits=256)


_AUTH_INNER = decrypt_message(REQ2, _i2r()).payloads
_RICH_PAYLOADS: tuple[Payload, ...] = (
    SA(
        (
            Proposal(1, ProtocolId.IKE, ike_proposal().transforms),
            Proposal(
                2,
                ProtocolId.ESP,
                (
                    Transform(1, 12, (TransformAttribute.key_length(128),)),
                    Transform(3, 12, (TransformAttribute(17, b"tlv"),)),
                ),
                b"\x00\x00\x10\x01",
            ),
        )
    ),
    KE(31, bytes(range(32))),
    Nonce(bytes(32)),
    Notify(NotifyType.REKEY_SA, b"", ProtocolId.ESP, b"\x01\x02\x03\x04"),
    Notify(NotifyType.NAT_DETECTION_SOURCE_IP, bytes(20)),
    Delete(ProtocolId.ESP, 4, (b"\x00\x00\x01\x00", b"\x00\x00\x02\x00")),
    Delete(ProtocolId.IKE),
    TSi(
        (
            TrafficSelector(0, 0, 65535, bytes(4), b"\xff" * 4),
            TrafficSelector(6, 80, 80, bytes(16), b"\xff" * 16),
            RawTrafficSelector(10, 0, b"label"),
        )
    ),
    TSr((TrafficSelector(17, 500, 4500, b"\xc0\x00\x02\x00", b"\xc0\x00\x02\xff"),)),
    IDi(IdType.ID_IPV4_ADDR, b"\xc0\x00\x02\x01"),
    IDr(IdType.ID_FQDN, b"vpn.example"),
    Auth(2, bytes(32)),
    Cert(4, b"cert"),
    CertReq(4, bytes(20)),
    VendorId(b"vendor"),
    CP(1, (ConfigAttribute(1), ConfigAttribute(3, b"\x08\x08\x08\x08"))),
    EAP(b"\x01\x01\x00\x05\x01"),
    UnknownPayload(49, False, b"gspm"),
)
RICH = encode_message(
    Message(bytes(range(1, 9)), bytes(range(9, 17)), 37, 5, _RICH_PAYLOADS, initiator=True)
)
CORPUS = (REQ1, RESP1, REQ2, RESP2, RICH)


def _chain(data: bytes) -> list[tuple[int, int, int]]:
    """(payload type, offset of its generic header, Payload Length) of a well-formed message."""
    out: list[tuple[int, int, int]] = []
    ptype, off = data[16], IKE_HEADER_LEN
    while ptype != 0:
        nxt, _, plen = _GENERIC.unpack_from(data, off)
        out.append((ptype, off, plen))
        if ptype in (PayloadType.SK, PayloadType.SKF):
            break
        ptype, off = nxt, off + plen
    return out


def _decode_or_error(data: bytes) -> Message | None:
    """decode_message must return a Message or raise IkeDecodeError, nothing else; a decoded
    message re-encodes to something that decodes to the same message."""
    try:
        msg = decode_message(data)
    except IkeDecodeError as e:
        assert e.notify_type in (
            NotifyType.INVALID_SYNTAX,
            NotifyType.UNSUPPORTED_CRITICAL_PAYLOAD,
            NotifyType.INVALID_MAJOR_VERSION,
        )
        return None
    assert decode_message(encode_message(msg)) == msg
    return msg


# -- mutations ----------------------------------------------------------------------------------


@st.composite
def mutated(draw: st.DrawFn, corpus: tuple[bytes, ...] = CORPUS) -> bytes:
    """A corpus message with 1..4 structural mutations (each keeps the bytes a bytes)."""
    data = bytearray(draw(st.sampled_from(corpus)))
    chain = _chain(bytes(data))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(
            st.sampled_from(
                ["truncate", "length", "hdr_length", "critical", "ptype", "byte", "count", "junk"]
            )
        )
        if op == "truncate":
            del data[draw(st.integers(0, len(data))) :]
        elif op == "hdr_length" and len(data) >= IKE_HEADER_LEN:
            struct.pack_into("!I", data, 24, draw(st.sampled_from([0, 27, 28, 29, 0xFFFFFFFF])))
        elif op in ("length", "critical", "ptype", "count") and chain:
            _, off, plen = draw(st.sampled_from(chain))
            if off + 4 > len(data):
                continue
            if op == "length":
                v = draw(st.sampled_from([0, 1, 3, 4, 5, plen - 1, plen + 1, 0xFFFF]))
                struct.pack_into("!H", data, off + 2, max(0, min(v, 0xFFFF)))
            elif op == "critical":
                data[off + 1] ^= 0x80
            elif op == "ptype":  # the type of the NEXT payload, as named by this one
                data[off] = draw(st.sampled_from([0, *UNKNOWN_TYPES, *DECODERS]))
            elif off + 8 <= len(data):  # first octets of the body: counts, sizes, numbers
                i = off + 4 + draw(st.integers(0, 3))
                data[i] = draw(st.sampled_from([0, 1, 0x7F, 0xFF]))
        elif op == "byte" and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
        elif op == "junk":
            data += draw(st.binary(min_size=1, max_size=64))
    return bytes(data)


@st.composite
def header_then_garbage(draw: st.DrawFn) -> bytes:
    """A consistent IKE header (Length right) in front of arbitrary payload bytes."""
    body = draw(st.binary(max_size=400))
    first = draw(st.sampled_from([0, 46, 53, *DECODERS, *UNKNOWN_TYPES[:20]]))
    hdr = IkeHeader(
        bytes(8),
        bytes(8),
        first,
        draw(st.integers(0, 255)),
        draw(st.integers(0, 3)),
        IKE_HEADER_LEN + len(body),
        initiator=draw(st.booleans()),
        response=draw(st.booleans()),
    )
    return hdr.encode() + body


# -- the codec ----------------------------------------------------------------------------------


@_fuzz(400)
@given(st.binary(max_size=700))
def test_decode_arbitrary_bytes(data: bytes) -> None:
    _decode_or_error(data)


@_fuzz(400)
@given(header_then_garbage())
def test_decode_consistent_header_then_garbage(data: bytes) -> None:
    _decode_or_error(data)


@_fuzz(300)
@given(st.integers(0, 255), st.binary(max_size=400))
def test_decode_payloads_arbitrary_chain(first: int, data: bytes) -> None:
    try:
        payloads = decode_payloads(first, data)
    except IkeDecodeError:
        return
    t, again = encode_payloads(payloads)
    assert decode_payloads(t, again) == payloads


@_fuzz(500)
@given(mutated())
def test_decode_structured_mutations(data: bytes) -> None:
    _decode_or_error(data)


def test_corpus_is_well_formed_and_round_trips() -> None:
    for d in CORPUS:
        assert encode_message(decode_message(d)) == d


@_fuzz(150)
@given(
    st.sampled_from([RICH, REQ1, RESP1]),
    st.data(),
    st.sampled_from(UNKNOWN_TYPES),
    st.binary(max_size=40),
    st.booleans(),
)
def test_unknown_payload_critical_bit_rfc7296_2_5(
    data: bytes, draw: st.DataObject, ptype: int, body: bytes, critical: bool
) -> None:
    """RFC 7296 §2.5/§3.2: an unknown payload type without the critical bit is skipped (kept as
    UnknownPayload, the rest of the message intact); with it, the whole message is rejected
    with UNSUPPORTED_CRITICAL_PAYLOAD whose data is the one-octet payload type."""
    msg = decode_message(data)
    i = draw.draw(st.integers(0, len(msg.payloads)))
    odd = UnknownPayload(ptype, critical, body)
    raw = encode_message(
        dataclasses.replace(msg, payloads=(*msg.payloads[:i], odd, *msg.payloads[i:]))
    )
    if critical:
        with pytest.raises(IkeDecodeError) as e:
            decode_message(raw)
        assert e.value.notify_type == NotifyType.UNSUPPORTED_CRITICAL_PAYLOAD
        assert e.value.data == bytes((ptype,))
        assert e.value.header is not None and e.value.header.message_id == msg.message_id
    else:
        got = decode_message(raw)
        assert got.payloads == (*msg.payloads[:i], odd, *msg.payloads[i:])


def test_unknown_critical_payload_inside_sk_is_reported_with_the_header() -> None:
    inner = (*_AUTH_INNER[:2], UnknownPayload(5, True, b"ikev1 proposal"), *_AUTH_INNER[2:])
    msg = Message(_RESULT.spi_i, _RESULT.spi_r, ExchangeType.IKE_AUTH, 1, inner, initiator=True)
    (raw,) = encrypt_message(msg, _i2r())
    with pytest.raises(IkeDecodeError) as e:
        decrypt_message(raw, _i2r())
    assert e.value.notify_type == NotifyType.UNSUPPORTED_CRITICAL_PAYLOAD
    assert e.value.data == b"\x05"
    assert e.value.header is not None and e.value.header.spi_r == _RESULT.spi_r


@_fuzz(100)
@given(st.sampled_from([RICH, REQ1]), st.data())
def test_critical_bit_on_known_payloads_is_ignored(data: bytes, draw: st.DataObject) -> None:
    """§3.2: the critical bit MUST be ignored when the payload type is understood."""
    msg = decode_message(data)
    flags = draw.draw(
        st.lists(st.booleans(), min_size=len(msg.payloads), max_size=len(msg.payloads))
    )
    payloads = tuple(
        p if isinstance(p, UnknownPayload) else dataclasses.replace(p, critical=c)
        for p, c in zip(msg.payloads, flags, strict=True)
    )
    got = decode_message(encode_message(dataclasses.replace(msg, payloads=payloads)))
    assert got.payloads == payloads


@pytest.mark.parametrize("data", CORPUS, ids=["req1", "resp1", "req2", "resp2", "rich"])
def test_every_truncation_is_a_syntax_error(data: bytes) -> None:
    """Cut anywhere, with the header Length left alone or fixed up to the cut: INVALID_SYNTAX
    (or "shorter than a header"), never a partial message."""
    for cut in range(len(data)):
        for fixed in (False, True):
            d = bytearray(data[:cut])
            if fixed and cut >= IKE_HEADER_LEN:
                struct.pack_into("!I", d, 24, cut)
            with pytest.raises(IkeDecodeError) as e:
                decode_message(bytes(d))
            assert e.value.notify_type == NotifyType.INVALID_SYNTAX


@pytest.mark.parametrize(
    ("version", "ok"),
    [(0x10, False), (0x30, False), (0x00, False), (0xF0, False), (0x20, True), (0x2F, True)],
)
def test_major_version_rfc7296_2_5(version: int, ok: bool) -> None:
    """§2.5: major version other than 2 -> INVALID_MAJOR_VERSION; the minor version is ignored."""
    d = bytearray(REQ1)
    d[17] = version
    if ok:
        assert decode_message(bytes(d)).minor_version == version & 0x0F
    else:
        with pytest.raises(IkeDecodeError) as e:
            decode_message(bytes(d))
        assert e.value.notify_type == NotifyType.INVALID_MAJOR_VERSION


def test_ikev1_main_mode_header_and_payloads() -> None:
    """An IKEv1 (ISAKMP, RFC 2408) Main Mode message: version 1.0, payloads SA(1)/VID(13)."""
    sa = _GENERIC.pack(13, 0, 12) + bytes(8)
    vid = _GENERIC.pack(0, 0, 20) + bytes(16)
    hdr = bytes(range(1, 9)) + bytes(8) + bytes((1, 0x10, 2, 0)) + struct.pack("!II", 0, 60)
    with pytest.raises(IkeDecodeError) as e:
        decode_message(hdr + sa + vid)
    assert e.value.notify_type == NotifyType.INVALID_MAJOR_VERSION
    # the same chain under an IKEv2 header: non-critical IKEv1 types are skipped...
    v2 = bytearray(hdr + sa + vid)
    v2[17] = 0x20
    assert [type(p) for p in decode_message(bytes(v2)).payloads] == [UnknownPayload] * 2
    # ...and critical ones reject the message
    v2[28 + 1] = 0x80
    with pytest.raises(IkeDecodeError) as e:
        decode_message(bytes(v2))
    assert (
        e.value.notify_type == NotifyType.UNSUPPORTED_CRITICAL_PAYLOAD and e.value.data == b"\x01"
    )


def test_huge_counts_are_syntax_errors() -> None:
    def one(p: bytes) -> bytes:
        return p[4:]  # body after the generic header

    _, ts = encode_payloads((TSi((TrafficSelector(0, 0, 65535, bytes(4), bytes(4)),)),))
    bad = {
        PayloadType.TSi: b"\xff" + one(ts)[1:],  # Number of TSs 255, one present
        PayloadType.DELETE: struct.pack("!BBH", 3, 4, 0xFFFF) + bytes(8),
        PayloadType.NOTIFY: struct.pack("!BBH", 3, 0xFF, 16390) + bytes(4),
        PayloadType.SA: struct.pack("!BBHBBBB", 0, 0, 16, 1, 1, 0, 0xFF) + bytes(8),
        PayloadType.SKF: struct.pack("!HH", 0xFFFF, 3) + bytes(20),
        PayloadType.CP: bytes(4) + struct.pack("!HH", 1, 0xFFFF),
    }
    for ptype, body in bad.items():
        with pytest.raises(IkeDecodeError) as e:
            decode_payloads(ptype, _GENERIC.pack(0, 0, 4 + len(body)) + body)
        assert e.value.notify_type == NotifyType.INVALID_SYNTAX, ptype
    # the payload count bound: MAX_PAYLOADS tiny payloads decode, one more does not
    for n, ok in ((MAX_PAYLOADS, True), (MAX_PAYLOADS + 1, False)):
        chain = b"".join(_GENERIC.pack(43 if i < n - 1 else 0, 0, 4) for i in range(n))
        if ok:
            assert len(decode_payloads(43, chain)) == n
        else:
            with pytest.raises(IkeDecodeError):
                decode_payloads(43, chain)


# -- SK / SKF -----------------------------------------------------------------------------------


def _ciphers() -> list[SkCipher]:
    return [
        SkCipher(GCM, bytes(36), key_bits=256),
        SkCipher(Encr.CHACHA20_POLY1305, bytes(range(36))),
        SkCipher(Encr.AES_CBC, bytes(32), Integ.HMAC_SHA2_256_128, bytes(32), key_bits=256),
    ]


_SK_CIPHERS = _ciphers()


def _seal_raw(
    cipher: SkCipher, inner: bytes, first: int, *, mid: int = 2, exchange: int = 37
) -> bytes:
    """An SK message whose plaintext is ``inner`` verbatim (well-formed or not)."""
    plen = 4 + cipher.sealed_len(len(inner))
    hdr = IkeHeader(_RESULT.spi_i, _RESULT.spi_r, 46, exchange, mid, IKE_HEADER_LEN + plen, True)
    prefix = hdr.encode() + _GENERIC.pack(first, 0, plen)
    return prefix + cipher.seal(prefix, inner)


def _seal_fragment(
    cipher: SkCipher, chunk: bytes, number: int, total: int, first: int = 0, mid: int = 2
) -> bytes:
    plen = 8 + cipher.sealed_len(len(chunk))
    hdr = IkeHeader(_RESULT.spi_i, _RESULT.spi_r, 53, 37, mid, IKE_HEADER_LEN + plen, True)
    prefix = hdr.encode() + _GENERIC.pack(first, 0, plen) + struct.pack("!HH", number, total)
    return prefix + cipher.seal(prefix, chunk)


@_fuzz(300)
@given(st.integers(0, 2), st.integers(0, 10_000), st.integers(1, 255), st.integers(0, 8))
def test_tampered_ciphertext_never_decrypts(which: int, pos: int, xor: int, cut: int) -> None:
    """Any changed or removed octet of an SK message: SkError or IkeDecodeError, never a
    message (integrity covers header .. ICV)."""
    c = _SK_CIPHERS[which]
    (raw,) = encrypt_message(Message(bytes(8), bytes(8), 37, 2, _AUTH_INNER, initiator=True), c)
    i = pos % len(raw)
    bad = raw[:i] + bytes((raw[i] ^ xor,)) + raw[i + 1 :]
    for d in (bad, raw[: len(raw) - cut] if cut else bad):
        with pytest.raises((SkError, IkeDecodeError)):
            decrypt_message(d, c)


@_fuzz(300)
@given(st.integers(0, 2), st.sampled_from([0, *DECODERS, *UNKNOWN_TYPES[:20]]), st.binary())
def test_authentic_garbage_plaintext(which: int, first: int, inner: bytes) -> None:
    """Validly encrypted, arbitrary inner bytes: a message or IkeDecodeError with the header."""
    c = _SK_CIPHERS[which]
    try:
        msg = decrypt_message(_seal_raw(c, inner, first), c)
    except IkeDecodeError as e:
        assert e.header is not None and e.header.spi_r == _RESULT.spi_r
        return
    assert msg.spi_i == _RESULT.spi_i


@_fuzz(300)
@given(mutated(corpus=(REQ2, RESP2)))
def test_decrypt_mutated_sk_messages(data: bytes) -> None:
    for c in (_i2r(), _r2i()):
        try:
            decrypt_message(data, c)
        except (SkError, IkeDecodeError):
            pass


_FRAG = st.tuples(
    st.integers(0, 70),  # Fragment Number (0 and > total are malformed)
    st.sampled_from([1, 2, 3, 64, 65, 0xFFFF]),  # Total Fragments (64 = MAX_FRAGMENTS)
    st.integers(0, 3),  # message ID: a few sets in parallel
    st.binary(min_size=0, max_size=600),
    st.booleans(),  # tamper with it
)


@_fuzz(200)
@given(st.lists(_FRAG, max_size=40))
def test_fragment_reassembler_is_bounded(frags: list[tuple[int, int, int, bytes, bool]]) -> None:
    """Authentic and tampered SKF fragments in any order: only SkError / IkeDecodeError, at most
    ``max_sets`` sets pending, never more than ``max_size`` octets stored per set."""
    c = SkCipher(GCM, bytes(36), key_bits=256)
    r = FragmentReassembler(max_sets=2, max_size=2000)
    for number, total, mid, chunk, tamper in frags:
        raw = _seal_fragment(c, chunk, number, total, 43 if number == 1 else 0, mid)
        if tamper:
            raw = raw[:-1] + bytes((raw[-1] ^ 1,))
        try:
            r.add(raw, c)
        except (SkError, IkeDecodeError):
            pass
        assert len(r) <= 2
        assert all(s.size <= 2000 for s in r._sets.values())


def test_fragment_flood_with_max_total_is_dropped_not_stored() -> None:
    c = SkCipher(GCM, bytes(36), key_bits=256)
    r = FragmentReassembler()
    for n in range(1, 200):
        assert r.add(_seal_fragment(c, b"x" * 100, n, 0xFFFF), c) is None
    assert len(r) == 0 and r.dropped == 199


# -- the responder at every state ---------------------------------------------------------------


def _responder(state: ResponderState) -> Ikev2Responder:
    _ini, resp = _pair()
    if state is ResponderState.WAIT_SA_INIT:
        return resp
    resp.receive(REQ1, 0.0, remote=I_EP, local=R_EP)
    if state is ResponderState.WAIT_AUTH:
        return resp
    resp.receive(REQ2, 0.0)
    if state is ResponderState.CLOSED:
        (d,) = encrypt_message(
            Message(_RESULT.spi_i, _RESULT.spi_r, 37, 2, (Delete(1),), initiator=True), _i2r()
        )
        resp.receive(d, 0.0)
    assert resp.state is state
    return resp


def _liveness(mid: int) -> bytes:
    (d,) = encrypt_message(
        Message(_RESULT.spi_i, _RESULT.spi_r, 37, mid, (), initiator=True), _i2r()
    )
    return d


_STATES = [
    ResponderState.WAIT_SA_INIT,
    ResponderState.WAIT_AUTH,
    ResponderState.ESTABLISHED,
    ResponderState.CLOSED,
]


@st.composite
def responder_garbage(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return draw(mutated())
    if kind == 1:
        return draw(header_then_garbage())
    # validly encrypted with the real IKE SA keys, malformed or odd inner payloads
    first = draw(st.sampled_from([0, *DECODERS, *IKEV1_TYPES, 60, 200]))
    if kind == 2:
        inner = draw(st.binary(max_size=200))
    else:
        _, inner = encode_payloads(
            tuple(draw(st.lists(st.sampled_from(_RICH_PAYLOADS + _AUTH_INNER), max_size=6)))
        )
        first = first if inner else 0
    mid = draw(st.sampled_from([1, 2, 3]))
    exchange = draw(st.sampled_from([34, 35, 36, 37, 99]))
    return _seal_raw(_i2r(), inner, first, mid=mid, exchange=exchange)


@pytest.mark.parametrize("state", _STATES, ids=lambda s: s.value)
@_fuzz(120)
@given(st.lists(responder_garbage(), min_size=1, max_size=5))
def test_responder_survives_garbage_at_every_state(
    state: ResponderState, garbage: list[bytes]
) -> None:
    resp = _responder(state)
    before = resp.dropped
    for g in garbage:
        out = resp.receive(g, 1.0, remote=I_EP, local=R_EP)
        assert isinstance(out, list) and all(isinstance(d, bytes) for d in out)
    assert resp.dropped - before <= len(garbage)
    if resp._info is not None:
        assert len(resp._info.events) <= len(garbage)
        assert len(resp._info.children) <= 1 + len(garbage)
    # no stall: the legitimate continuation still works
    # (the responder's rand may have been drawn on by garbage, so its SPI and nonce differ)
    if state is ResponderState.WAIT_SA_INIT and resp.state is ResponderState.WAIT_SA_INIT:
        (ans,) = resp.receive(REQ1, 2.0, remote=I_EP, local=R_EP)
        got = decode_message(ans)
        assert got.response and [type(p) for p in got.payloads][:3] == [SA, KE, Nonce]
        assert resp.state is ResponderState.WAIT_AUTH
    elif state is ResponderState.WAIT_AUTH and resp.state is ResponderState.WAIT_AUTH:
        (ans,) = resp.receive(REQ2, 2.0)
        assert decrypt_message(ans, _r2i()).message_id == 1
        assert resp.state is ResponderState.ESTABLISHED
    if resp.state is ResponderState.ESTABLISHED:
        assert resp._info is not None
        mid = resp._info._sa.peer_mid
        (ans,) = resp.receive(_liveness(mid), 3.0)
        assert decrypt_message(ans, _r2i()).message_id == mid


def test_responder_counts_each_dropped_datagram() -> None:
    resp = _responder(ResponderState.WAIT_AUTH)
    bad = [b"", b"\x00" * 27, REQ2[:-1], REQ2[:-1] + b"\x00", REQ1[:40], b"\xff" * 2000]
    for d in bad:
        assert resp.receive(d, 0.0) == []
    assert resp.dropped == len(bad)
    (ans,) = resp.receive(REQ2, 0.0)
    assert decrypt_message(ans, _r2i()).message_id == 1


def test_responder_invalid_ke_in_sa_init_keeps_no_state() -> None:
    """KE of group 31 that is a small-order X25519 point (shared secret all zero, RFC 8031 §2.2),
    of the wrong length, and KE in an unsupported group: no state, no crash."""
    msg = decode_message(REQ1)
    ke_i = next(i for i, p in enumerate(msg.payloads) if isinstance(p, KE))
    bad_kes = [KE(31, bytes(32)), KE(31, b"\x01" + bytes(31)), KE(31, bytes(31)), KE(31, b"")]
    for ke in bad_kes:
        resp = _responder(ResponderState.WAIT_SA_INIT)
        p = list(msg.payloads)
        p[ke_i] = ke
        assert resp.receive(encode_message(dataclasses.replace(msg, payloads=tuple(p))), 0.0) == []
        assert resp.state is ResponderState.WAIT_SA_INIT and resp.dropped == 1
        assert len(resp.receive(REQ1, 0.0, remote=I_EP, local=R_EP)) == 1
        assert resp.state is ResponderState.WAIT_AUTH
    # an unsupported group (and the ECP group 19 with an invalid point): INVALID_KE_PAYLOAD(31)
    for ke in (KE(0xFFFF, b"x"), KE(19, bytes(64)), KE(1, bytes(96))):
        resp = _responder(ResponderState.WAIT_SA_INIT)
        p = list(msg.payloads)
        p[ke_i] = ke
        (ans,) = resp.receive(encode_message(dataclasses.replace(msg, payloads=tuple(p))), 0.0)
        (n,) = decode_message(ans).payloads
        assert isinstance(n, Notify) and n.notify_type == NotifyType.INVALID_KE_PAYLOAD
        assert n.data == b"\x00\x1f" and resp.state is ResponderState.WAIT_SA_INIT


# -- InfoSession: strict exception set, repeated deletes ----------------------------------------


def _info_session() -> InfoSession:
    resp = _responder(ResponderState.ESTABLISHED)
    assert resp._info is not None
    return resp._info


@_fuzz(200)
@given(st.lists(responder_garbage(), min_size=1, max_size=5))
def test_info_session_raises_only_documented_drops(garbage: list[bytes]) -> None:
    info = _info_session()
    for g in garbage:
        try:
            out = info.handle(g)
        except (InfoDrop, SkError, IkeDecodeError, InvalidKeyExchange):
            continue
        for d in out:
            assert decrypt_message(d, _r2i()).response


def test_repeated_deletes_are_answered_and_state_stays_bounded() -> None:
    resp = _responder(ResponderState.ESTABLISHED)
    child = (Delete(ProtocolId.ESP, 4, (_RESULT.child.spi_out,)),)
    many = (Delete(ProtocolId.ESP, 4, tuple(i.to_bytes(4, "big") for i in range(300, 2300))),)
    for mid in range(2, 102):
        payloads = child if mid % 2 else many
        (d,) = encrypt_message(
            Message(_RESULT.spi_i, _RESULT.spi_r, 37, mid, payloads, initiator=True), _i2r()
        )
        (ans,) = resp.receive(d, float(mid))
        got = decrypt_message(ans, _r2i())
        assert got.message_id == mid
        # only the first Delete of our child's SPI is answered with our SPI (RFC 7296 §1.4.1)
        want = (Delete(ProtocolId.ESP, 4, (_RESULT.child.spi_in,)),) if mid == 3 else ()
        assert got.payloads == want
        assert resp.receive(d, float(mid)) == [ans]  # retransmit: cached answer
    events = resp.take_events()
    assert [e.kind for e in events].count("child_deleted") == 1 and len(events) == 100
    assert resp._info is not None and resp._info.children == []
    # repeated Deletes of the IKE SA: the first closes, the rest are dropped
    for mid in (102, 103, 104):
        (d,) = encrypt_message(
            Message(_RESULT.spi_i, _RESULT.spi_r, 37, mid, (Delete(1),), initiator=True), _i2r()
        )
        out = resp.receive(d, 0.0)
        assert (out != []) == (mid == 102)
    assert resp.state is ResponderState.CLOSED


# -- the initiator at every state ---------------------------------------------------------------


def _initiator(state: State) -> Ikev2Initiator:
    ini, _ = _pair()
    ini.start(0.0)
    if state is State.SA_INIT_SENT:
        return ini
    ini.receive(RESP1, 0.0)
    if state is State.AUTH_SENT:
        return ini
    ini.receive(RESP2, 0.0)
    assert ini.state is state
    return ini


@st.composite
def initiator_garbage(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 2))
    if kind == 0:
        return draw(mutated())
    if kind == 1:
        return draw(header_then_garbage())
    inner = draw(st.binary(max_size=200))
    first = draw(st.sampled_from([0, *DECODERS, *IKEV1_TYPES]))
    c = _r2i()
    plen = 4 + c.sealed_len(len(inner))
    mid = draw(st.sampled_from([0, 1, 2]))
    hdr = IkeHeader(
        _RESULT.spi_i,
        _RESULT.spi_r,
        46,
        draw(st.sampled_from([35, 37])),
        mid,
        IKE_HEADER_LEN + plen,
        initiator=False,
        response=draw(st.booleans()),
    )
    prefix = hdr.encode() + _GENERIC.pack(first, 0, plen)
    return prefix + c.seal(prefix, inner)


@pytest.mark.parametrize(
    "state", [State.SA_INIT_SENT, State.AUTH_SENT, State.ESTABLISHED], ids=lambda s: s.value
)
@_fuzz(120)
@given(st.lists(initiator_garbage(), min_size=1, max_size=5))
def test_initiator_survives_garbage_at_every_state(state: State, garbage: list[bytes]) -> None:
    ini = _initiator(state)
    for g in garbage:
        out = ini.receive(g, 1.0)
        assert isinstance(out, list) and all(isinstance(d, bytes) for d in out)
    # Unauthenticated IKE_SA_INIT garbage never ends the attempt at once (§2.21.1); the real
    # responses still complete the exchange.
    # A garbage IKE_SA_INIT response that happens to be well formed is taken (nothing
    # authenticates it): the genuine IKE_AUTH response then fails integrity and the attempt
    # ends by retransmission timeout, which stays armed.
    if ini.state is State.SA_INIT_SENT:
        ini.receive(RESP1, 2.0)
    if ini.state is State.AUTH_SENT:
        ini.receive(RESP2, 2.0)
    assert ini.state in (State.ESTABLISHED, State.FAILED, State.CLOSED, State.AUTH_SENT)
    if ini.state is State.AUTH_SENT:
        assert state is State.SA_INIT_SENT and ini.next_timeout is not None
    if state is State.ESTABLISHED:
        assert ini.state in (State.ESTABLISHED, State.CLOSED)
    if ini.state is State.FAILED:
        # unauthenticated IKE_SA_INIT garbage, or an authentic (responder-keyed) IKE_AUTH
        # response without IDr / AUTH: a readable reason, nothing left to retransmit
        assert ini.failure_reason and ini.next_timeout is None


# -- error answers: RFC 7296 §2.5, §2.21, §3.10.1; Child SA rekey bounds (§2.25) -----------------


def _with_unknown_critical(raw: bytes) -> bytes:
    msg = decode_message(raw)
    p = (*msg.payloads, UnknownPayload(200, True, b"must be understood"))
    return encode_message(dataclasses.replace(msg, payloads=p))


def test_sa_init_with_unknown_critical_payload_gets_unsupported_critical_payload() -> None:
    resp = _responder(ResponderState.WAIT_SA_INIT)
    (ans,) = resp.receive(_with_unknown_critical(REQ1), 0.0, remote=I_EP, local=R_EP)
    (n,) = decode_message(ans).payloads
    assert isinstance(n, Notify) and n.notify_type == NotifyType.UNSUPPORTED_CRITICAL_PAYLOAD
    assert n.data == bytes((200,))


def test_informational_with_unknown_critical_payload_is_answered() -> None:
    resp = _responder(ResponderState.ESTABLISHED)
    (d,) = encrypt_message(
        Message(
            _RESULT.spi_i,
            _RESULT.spi_r,
            37,
            2,
            (UnknownPayload(200, True, b"x"),),
            initiator=True,
        ),
        _i2r(),
    )
    (ans,) = resp.receive(d, 0.0)
    (n,) = decrypt_message(ans, _r2i()).payloads
    assert isinstance(n, Notify) and n.notify_type == NotifyType.UNSUPPORTED_CRITICAL_PAYLOAD


def test_authenticated_malformed_request_gets_invalid_syntax() -> None:
    resp = _responder(ResponderState.ESTABLISHED)
    # a Delete payload whose length disagrees with SPI size x Num of SPIs
    body = struct.pack("!BBH", 3, 4, 2) + bytes(4)
    d = _seal_raw(_i2r(), _GENERIC.pack(0, 0, 4 + len(body)) + body, PayloadType.DELETE)
    (ans,) = resp.receive(d, 0.0)
    (n,) = decrypt_message(ans, _r2i()).payloads
    assert isinstance(n, Notify) and n.notify_type == NotifyType.INVALID_SYNTAX


def test_rekey_with_invalid_ke_point_gets_an_error_response() -> None:
    from services.core.ike.child import esp_proposal

    resp = _responder(ResponderState.ESTABLISHED)
    sa = esp_proposal(b"\x00\x00\x99\x99")
    offer = dataclasses.replace(sa, transforms=(*sa.transforms, Transform(4, 31)))
    payloads = (
        Notify(NotifyType.REKEY_SA, b"", ProtocolId.ESP, _RESULT.child.spi_out),
        SA((offer,)),
        Nonce(bytes(32)),
        KE(31, bytes(32)),  # the all-zero X25519 point: shared secret all zero
        TSi(_RESULT.child.ts_i),
        TSr(_RESULT.child.ts_r),
    )
    (d,) = encrypt_message(
        Message(_RESULT.spi_i, _RESULT.spi_r, 36, 2, payloads, initiator=True), _i2r()
    )
    (ans,) = resp.receive(d, 0.0)
    (n,) = decrypt_message(ans, _r2i()).payloads
    assert isinstance(n, Notify) and n.notify_type == NotifyType.INVALID_SYNTAX


def test_initiator_is_not_killed_by_one_forged_sa_init_response() -> None:
    ini = _initiator(State.SA_INIT_SENT)
    msg = decode_message(RESP1)
    p = tuple(KE(31, bytes(32)) if isinstance(x, KE) else x for x in msg.payloads)
    ini.receive(encode_message(dataclasses.replace(msg, payloads=p)), 0.0)
    ini.receive(RESP1, 0.0)
    assert ini.state is State.AUTH_SENT


# -- key exchange data ---------------------------------------------------------------------------


@_fuzz(60)
@given(st.sampled_from(sorted(GROUPS)), st.data())
def test_peer_ke_data_raises_only_invalid_key_exchange(gid: int, draw: st.DataObject) -> None:
    """Any KE data of any length in any group: a shared secret or InvalidKeyExchange (RFC 6989
    §2.1/§2.2 checks; RFC 8031 §2.2 all-zero X25519/X448 secret)."""
    g = GROUPS[gid]
    n = g.ke_len
    peer = draw.draw(
        st.one_of(
            st.binary(min_size=n, max_size=n),
            st.binary(max_size=n + 2),
            st.sampled_from(
                [bytes(n), b"\xff" * n, (1).to_bytes(n, "big"), (1).to_bytes(n, "little")]
            ),
        )
    )
    try:
        z = _DH_PRIV[gid].shared(peer)
    except InvalidKeyExchange as e:
        assert len(peer) < 4 or peer.hex() not in str(e)  # no key bytes in the text
        return
    assert len(z) == (n // 2 if gid in (19, 20, 21) else n) and any(z)


_DH_PRIV = {gid: g.generate() for gid, g in GROUPS.items()}


def test_repeated_rekeys_of_one_child_sa_stay_bounded() -> None:
    from services.core.ike.child import esp_proposal

    resp = _responder(ResponderState.ESTABLISHED)
    assert resp._info is not None
    for mid in range(2, 52):
        payloads = (
            Notify(NotifyType.REKEY_SA, b"", ProtocolId.ESP, _RESULT.child.spi_out),
            SA((esp_proposal(mid.to_bytes(4, "big")),)),
            Nonce(bytes(32)),
            TSi(_RESULT.child.ts_i),
            TSr(_RESULT.child.ts_r),
        )
        (d,) = encrypt_message(
            Message(_RESULT.spi_i, _RESULT.spi_r, 36, mid, payloads, initiator=True), _i2r()
        )
        resp.receive(d, 0.0)
    assert len(resp._info.children) <= 8, len(resp._info.children)


def test_higher_major_version_gets_invalid_major_version() -> None:
    resp = _responder(ResponderState.WAIT_SA_INIT)
    d = bytearray(REQ1)
    d[17] = 0x30
    (ans,) = resp.receive(bytes(d), 0.0, remote=I_EP, local=R_EP)
    (n,) = decode_message(ans).payloads
    assert isinstance(n, Notify) and n.notify_type == NotifyType.INVALID_MAJOR_VERSION
    assert resp.state is ResponderState.WAIT_SA_INIT


# -- error answers: the edges ------------------------------------------------------------------


def _critical(ptype: int, body: bytes = b"x") -> bytes:
    """A lone payload of type ``ptype`` with the critical bit, as an inner chain."""
    return _GENERIC.pack(0, 0x80, 4 + len(body)) + body


@pytest.mark.parametrize("ptype", [200, 5, 13], ids=["unassigned", "ikev1_sa", "ikev1_vid"])
def test_sa_init_critical_unknown_answer_is_stateless(ptype: int) -> None:
    """§2.5: the answer names the type, goes out unencrypted with SPIr zero; no state is kept,
    so the genuine IKE_SA_INIT that follows is answered normally."""
    resp = _responder(ResponderState.WAIT_SA_INIT)
    msg = decode_message(REQ1)
    bad = encode_message(
        dataclasses.replace(msg, payloads=(*msg.payloads, UnknownPayload(ptype, True, b"!")))
    )
    (ans,) = resp.receive(bad, 0.0, remote=I_EP, local=R_EP)
    a = decode_message(ans)
    assert a.response and not a.initiator and a.exchange_type == ExchangeType.IKE_SA_INIT
    assert (a.spi_i, a.spi_r, a.message_id) == (msg.spi_i, bytes(8), 0)
    assert a.payloads == (Notify(NotifyType.UNSUPPORTED_CRITICAL_PAYLOAD, bytes((ptype,))),)
    assert resp.state is ResponderState.WAIT_SA_INIT and resp.error_answers == 1
    assert resp.receive(REQ1, 0.0, remote=I_EP, local=R_EP) == [RESP1]
    assert resp.state is ResponderState.WAIT_AUTH
    # the same type without the critical bit is skipped (§2.5) and the request answered
    fresh = _responder(ResponderState.WAIT_SA_INIT)
    skip = dataclasses.replace(msg, payloads=(*msg.payloads, UnknownPayload(ptype, False, b"!")))
    (ok,) = fresh.receive(encode_message(skip), 0.0, remote=I_EP, local=R_EP)
    assert any(isinstance(x, KE) for x in decode_message(ok).payloads)


def test_sa_init_other_malformations_stay_unanswered() -> None:
    """Only the §2.5 answers go out unauthenticated: a length error in IKE_SA_INIT is dropped."""
    resp = _responder(ResponderState.WAIT_SA_INIT)
    d = bytearray(REQ1)
    struct.pack_into("!H", d, IKE_HEADER_LEN + 2, 3)  # first payload length below 4
    assert resp.receive(bytes(d), 0.0, remote=I_EP, local=R_EP) == []
    assert resp.dropped == 1 and resp.error_answers == 0


def test_ike_auth_with_unknown_critical_payload_is_answered_encrypted() -> None:
    """§2.5 / §2.21.2: an IKE_AUTH request that verifies but carries a critical payload we do
    not know gets an encrypted UNSUPPORTED_CRITICAL_PAYLOAD; the IKE SA fails; a retransmit gets
    the same answer; a forged one (bad ICV) gets nothing."""
    resp = _responder(ResponderState.WAIT_AUTH)
    forged = _seal_raw(_r2i(), _critical(200), 200, mid=1, exchange=ExchangeType.IKE_AUTH)
    assert resp.receive(forged, 0.0) == [] and resp.state is ResponderState.WAIT_AUTH
    d = _seal_raw(_i2r(), _critical(200), 200, mid=1, exchange=ExchangeType.IKE_AUTH)
    (ans,) = resp.receive(d, 0.0)
    m = decrypt_message(ans, _r2i())
    assert m.response and m.exchange_type == ExchangeType.IKE_AUTH and m.message_id == 1
    assert m.payloads == (Notify(NotifyType.UNSUPPORTED_CRITICAL_PAYLOAD, bytes((200,))),)
    assert resp.state is ResponderState.FAILED
    assert (resp.failure_reason or "").startswith("UNSUPPORTED_CRITICAL_PAYLOAD")
    assert resp.receive(d, 0.0) == [ans]


def test_ike_auth_with_malformed_inner_payloads_gets_invalid_syntax() -> None:
    resp = _responder(ResponderState.WAIT_AUTH)
    body = struct.pack("!BBH", 3, 4, 2) + bytes(4)  # Delete: length disagrees with the count
    raw = _GENERIC.pack(0, 0, 4 + len(body)) + body
    d = _seal_raw(_i2r(), raw, PayloadType.DELETE, mid=1, exchange=ExchangeType.IKE_AUTH)
    (ans,) = resp.receive(d, 0.0)
    assert decrypt_message(ans, _r2i()).payloads == (Notify(NotifyType.INVALID_SYNTAX),)
    assert resp.state is ResponderState.FAILED


@pytest.mark.parametrize("exchange", [ExchangeType.INFORMATIONAL, ExchangeType.CREATE_CHILD_SA])
def test_authenticated_error_answers_consume_the_message_id(exchange: int) -> None:
    """§2.21.3 / §3.10.1: the answer is encrypted, the message ID is consumed (the next request
    is mid + 1), a retransmit gets the cached answer, a forged copy (bad ICV) nothing."""
    resp = _responder(ResponderState.ESTABLISHED)
    assert resp._info is not None
    d = _seal_raw(_i2r(), _critical(77), 77, mid=2, exchange=exchange)
    forged = _seal_raw(_r2i(), _critical(77), 77, mid=2, exchange=exchange)
    assert resp.receive(forged, 0.0) == []
    (ans,) = resp.receive(d, 0.0)
    m = decrypt_message(ans, _r2i())
    assert m.response and m.message_id == 2 and m.exchange_type == exchange
    assert m.payloads == (Notify(NotifyType.UNSUPPORTED_CRITICAL_PAYLOAD, bytes((77,))),)
    assert resp.receive(d, 1.0) == [ans]  # a retransmit: the cached answer, unchanged
    (live,) = resp.receive(_liveness(3), 2.0)
    assert decrypt_message(live, _r2i()).payloads == ()
    assert resp.state is ResponderState.ESTABLISHED and len(resp._info.children) == 1
    assert resp.take_events() == [InfoEvent("liveness")]


def test_malformed_request_outside_the_window_stays_dropped() -> None:
    """Only the expected message ID is answered; one of a later ID is dropped unanswered."""
    resp = _responder(ResponderState.ESTABLISHED)
    d = _seal_raw(_i2r(), _critical(77), 77, mid=5)
    assert resp.receive(d, 0.0) == []
    (live,) = resp.receive(_liveness(2), 0.0)  # message ID 2 is still the next one
    assert decrypt_message(live, _r2i()).message_id == 2


def test_ike_rekey_with_invalid_ke_gets_invalid_syntax() -> None:
    """The peer's IKE SA rekey (§1.3.2) with a KE that fails the RFC 6989 / RFC 8031 checks:
    INVALID_SYNTAX, and the IKE SA stays as it was."""
    resp = _responder(ResponderState.ESTABLISHED)
    assert resp._info is not None
    offer = ike_proposal(b"\x11" * 8)
    payloads = (SA((offer,)), Nonce(bytes(32)), KE(31, bytes(32)))
    (d,) = encrypt_message(
        Message(_RESULT.spi_i, _RESULT.spi_r, 36, 2, payloads, initiator=True), _i2r()
    )
    (ans,) = resp.receive(d, 0.0)
    assert decrypt_message(ans, _r2i()).payloads == (Notify(NotifyType.INVALID_SYNTAX),)
    assert resp._info.spis == (_RESULT.spi_i, _RESULT.spi_r) and not resp.take_events()


def _child_rekey(spi_out: bytes, mid: int, new_spi: bytes) -> bytes:
    from services.core.ike.child import esp_proposal

    payloads = (
        Notify(NotifyType.REKEY_SA, b"", ProtocolId.ESP, spi_out),
        SA((esp_proposal(new_spi),)),
        Nonce(bytes(32)),
        TSi(_RESULT.child.ts_i),
        TSr(_RESULT.child.ts_r),
    )
    (d,) = encrypt_message(
        Message(_RESULT.spi_i, _RESULT.spi_r, 36, mid, payloads, initiator=True), _i2r()
    )
    return d


def test_rekey_of_an_already_rekeyed_child_sa_gets_temporary_failure() -> None:
    """§2.25: the Child SA a rekey replaced waits for its Delete; another rekey of it gets
    TEMPORARY_FAILURE (nothing added); once the peer deletes it, CHILD_SA_NOT_FOUND."""
    resp = _responder(ResponderState.ESTABLISHED)
    assert resp._info is not None
    old = _RESULT.child.spi_out
    (ans,) = resp.receive(_child_rekey(old, 2, b"\x00\x00\x10\x01"), 0.0)
    assert any(isinstance(p, SA) for p in decrypt_message(ans, _r2i()).payloads)
    (ans,) = resp.receive(_child_rekey(old, 3, b"\x00\x00\x10\x02"), 0.0)
    assert decrypt_message(ans, _r2i()).payloads == (Notify(NotifyType.TEMPORARY_FAILURE),)
    assert len(resp._info.children) == 2
    (d,) = encrypt_message(
        Message(_RESULT.spi_i, _RESULT.spi_r, 37, 4, (Delete(3, 4, (old,)),), initiator=True),
        _i2r(),
    )
    resp.receive(d, 0.0)
    assert len(resp._info.children) == 1
    (ans,) = resp.receive(_child_rekey(old, 5, b"\x00\x00\x10\x03"), 0.0)
    (n,) = decrypt_message(ans, _r2i()).payloads
    assert isinstance(n, Notify) and n.notify_type == NotifyType.CHILD_SA_NOT_FOUND


def test_child_sas_per_ike_sa_are_capped() -> None:
    """Rekeys of the newest Child SA each time, the old ones never deleted: at MAX_CHILD_SAS
    live Child SAs further rekeys get TEMPORARY_FAILURE until the peer deletes some."""
    from services.core.ike.informational import MAX_CHILD_SAS

    resp = _responder(ResponderState.ESTABLISHED)
    info = resp._info
    assert info is not None
    mid = 2
    for i in range(MAX_CHILD_SAS + 3):
        newest = info.children[-1]
        (ans,) = resp.receive(_child_rekey(newest[1], mid, (0x2000 + i).to_bytes(4, "big")), 0.0)
        mid += 1
        payloads = decrypt_message(ans, _r2i()).payloads
        if i < MAX_CHILD_SAS - 1:
            assert any(isinstance(p, SA) for p in payloads), (i, payloads)
        else:
            assert payloads == (Notify(NotifyType.TEMPORARY_FAILURE),), (i, payloads)
    assert len(info.children) == MAX_CHILD_SAS
    first = info.children[0]
    (d,) = encrypt_message(
        Message(
            _RESULT.spi_i, _RESULT.spi_r, 37, mid, (Delete(3, 4, (first[1],)),), initiator=True
        ),
        _i2r(),
    )
    resp.receive(d, 0.0)
    (ans,) = resp.receive(_child_rekey(info.children[-1][1], mid + 1, b"\x00\x00\x30\x00"), 0.0)
    assert any(isinstance(p, SA) for p in decrypt_message(ans, _r2i()).payloads)
    assert len(info.children) == MAX_CHILD_SAS


@pytest.mark.parametrize(
    "notify",
    [NotifyType.NO_PROPOSAL_CHOSEN, NotifyType.INVALID_SYNTAX, NotifyType.AUTHENTICATION_FAILED],
)
def test_initiator_waits_out_a_forged_error_then_fails_with_its_name(notify: int) -> None:
    """§2.21.1: an unauthenticated error Notify is not acted on at once; the genuine response
    still wins, and without one the attempt fails when the retransmission timer fires, with
    the Notify's name as the reason (not "no response")."""
    msg = decode_message(RESP1)
    err = encode_message(Message(msg.spi_i, bytes(8), 34, 0, (Notify(notify),), response=True))
    ini = _initiator(State.SA_INIT_SENT)
    assert ini.receive(err, 0.1) == [] and ini.state is State.SA_INIT_SENT
    assert ini.next_timeout is not None
    ini.receive(RESP1, 0.2)
    assert ini.state is State.AUTH_SENT
    ini = _initiator(State.SA_INIT_SENT)
    ini.receive(err, 0.1)
    deadline = ini.next_timeout
    assert deadline is not None
    assert ini.on_timer(deadline - 0.01) == [] and ini.state is State.SA_INIT_SENT
    assert ini.on_timer(deadline) == []
    assert ini.state is State.FAILED and (ini.failure_reason or "").startswith(
        NotifyType(notify).name
    )
    assert ini.next_timeout is None


def test_initiator_bad_ke_response_then_timeout_names_the_ke() -> None:
    ini = _initiator(State.SA_INIT_SENT)
    msg = decode_message(RESP1)
    p = tuple(KE(31, bytes(32)) if isinstance(x, KE) else x for x in msg.payloads)
    ini.receive(encode_message(dataclasses.replace(msg, payloads=p)), 0.0)
    assert ini.state is State.SA_INIT_SENT
    deadline = ini.next_timeout
    assert deadline is not None
    ini.on_timer(deadline)
    assert ini.state is State.FAILED and "invalid KE" in (ini.failure_reason or "")


@pytest.mark.parametrize("state", [ResponderState.WAIT_SA_INIT, ResponderState.ESTABLISHED])
def test_invalid_major_version_answer_header(state: ResponderState) -> None:
    """§2.5 / §1.5: dropped, answered unauthenticated with SPIs, exchange type and Message ID of
    the request, Response flag set, and version 2.0 (what we support, §3.10.1) in the header."""
    resp = _responder(state)
    for major in (3, 15):
        d = bytearray(_liveness(7) if state is ResponderState.ESTABLISHED else REQ1)
        d[17] = major << 4 | 1
        (ans,) = resp.receive(bytes(d), 0.0, remote=I_EP, local=R_EP)
        assert ans[17] == 0x20 and ans[19] & 0x20 and not ans[19] & 0x08  # R set, I clear
        a = decode_message(ans)
        assert a.payloads == (Notify(NotifyType.INVALID_MAJOR_VERSION),)
        assert (a.spi_i, a.spi_r, a.exchange_type, a.message_id) == (
            bytes(d[:8]),
            bytes(d[8:16]),
            d[18],
            struct.unpack_from("!I", d, 20)[0],
        )
    assert resp.state is state and resp.error_answers == 2
    # a response with a higher version, IKEv1, and a short datagram: no answer
    d = bytearray(REQ1)
    d[17], d[19] = 0x30, 0x20
    assert resp.receive(bytes(d), 0.0) == []
    d = bytearray(REQ1)
    d[17] = 0x10
    assert resp.receive(bytes(d), 0.0) == []
    assert resp.receive(b"\x30" * 20, 0.0) == []
    # not an IKE header: Length other than the datagram's, or a zero SPIi
    d = bytearray(REQ1)
    d[17] = 0x30
    assert resp.receive(bytes(d) + b"x", 0.0) == []
    d[:8] = bytes(8)
    assert resp.receive(bytes(d), 0.0) == []
    assert resp.error_answers == 2


@_fuzz(200)
@given(st.binary(min_size=IKE_HEADER_LEN, max_size=120))
def test_random_datagrams_get_no_version_answer(data: bytes) -> None:
    """Random bytes are not answered with INVALID_MAJOR_VERSION (nor anything else)."""
    resp = _responder(ResponderState.WAIT_SA_INIT)
    d = bytearray(data)
    struct.pack_into("!I", d, 24, len(d) + 1)
    assert resp.receive(bytes(d), 0.0) == []


def test_tshark_dissects_our_unauthenticated_error_answers(tmp_path: pathlib.Path) -> None:
    """An independent parser (tshark's ISAKMP dissector) reads our §2.5 answers: a response,
    version 2.0, the Notify type and its data, nothing malformed."""
    from tests.unit.test_ike_codec import _TSHARK, _tshark

    if _TSHARK is None:
        pytest.skip("tshark is not installed")
    resp = _responder(ResponderState.WAIT_SA_INIT)
    (ucp,) = resp.receive(_with_unknown_critical(REQ1), 0.0, remote=I_EP, local=R_EP)
    d = bytearray(REQ1)
    d[17] = 0x31
    (imv,) = resp.receive(bytes(d), 0.0, remote=I_EP, local=R_EP)
    fields = [
        "_ws.malformed",
        "isakmp.mjver",
        "isakmp.mnver",
        "isakmp.flag_r",
        "isakmp.flag_i",
        "isakmp.ispi",
        "isakmp.exchangetype",
        "isakmp.notify.msgtype",
        "isakmp.notify.data",
    ]
    rows = _tshark([ucp, imv], tmp_path, fields)
    # tshark shows empty Notification Data as "<MISSING>" (so it does for NO_PROPOSAL_CHOSEN)
    for row, notify, data in zip(rows, ("1", "5"), (["c8"], ["<MISSING>"]), strict=True):
        assert not row["_ws.malformed"], row
        assert row["isakmp.mjver"] == ["0x02"] and row["isakmp.mnver"] == ["0x00"], row
        assert row["isakmp.flag_r"] == ["1"] and row["isakmp.flag_i"] == ["0"], row
        assert row["isakmp.ispi"] == [REQ1[:8].hex()] and row["isakmp.exchangetype"] == ["34"]
        assert row["isakmp.notify.msgtype"] == [notify], row
        assert row["isakmp.notify.data"] == data, row


def test_tshark_decrypts_and_reads_our_encrypted_error_answers(tmp_path: pathlib.Path) -> None:
    """tshark, given the IKE SA keys, decrypts our encrypted answers and finds the Notify:
    UNSUPPORTED_CRITICAL_PAYLOAD (type 77 as data) and INVALID_SYNTAX (§2.21.3), and
    TEMPORARY_FAILURE for the second rekey of one Child SA (§2.25)."""
    from tests.netns.tshark import ike_uat
    from tests.unit.test_ike_codec import _TSHARK, _tshark

    if _TSHARK is None:
        pytest.skip("tshark is not installed")
    resp = _responder(ResponderState.ESTABLISHED)
    (ucp,) = resp.receive(_seal_raw(_i2r(), _critical(77), 77, mid=2), 0.0)
    body = struct.pack("!BBH", 3, 4, 2) + bytes(4)
    bad_delete = _GENERIC.pack(0, 0, 4 + len(body)) + body
    (syntax,) = resp.receive(_seal_raw(_i2r(), bad_delete, PayloadType.DELETE, mid=3), 0.0)
    old = _RESULT.child.spi_out
    resp.receive(_child_rekey(old, 4, b"\x00\x00\x10\x01"), 0.0)
    (temp,) = resp.receive(_child_rekey(old, 5, b"\x00\x00\x10\x02"), 0.0)
    k = _RESULT.keys
    uat = ike_uat(
        _RESULT.spi_i, _RESULT.spi_r, k.sk_ei, k.sk_er, "AES-GCM-256 with 16 octet ICV [RFC5282]"
    )
    fields = ["_ws.malformed", "isakmp.enc.pad_length", "isakmp.notify.msgtype"]
    fields.append("isakmp.notify.data")
    rows = _tshark([ucp, syntax, temp], tmp_path, fields, prefs=(uat,))
    want = [("1", ["4d"]), ("7", ["<MISSING>"]), ("43", ["<MISSING>"])]
    for row, (notify, data) in zip(rows, want, strict=True):
        assert not row["_ws.malformed"] and row["isakmp.enc.pad_length"], row  # decrypted
        assert row["isakmp.notify.msgtype"] == [notify] and row["isakmp.notify.data"] == data, row
