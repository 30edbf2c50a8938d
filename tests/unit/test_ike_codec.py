"""IKEv2 message codec (services.core.ike, RFC 7296 §3, RFC 7383 §2.5).

* hypothesis round trips for every payload type and for whole messages;
* hostile input (random bytes, mutated valid messages) raises nothing but IkeDecodeError;
* independent oracles: scapy's IKEv2 layer (both directions) and tshark's ISAKMP dissector;
* the IKEv2 message of RFC 7634 Appendix B.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.contrib.ikev2 import ConfigurationAttribute as ScapyCfgAttr
from scapy.contrib.ikev2 import (
    IKEv2,
    IKEv2_AUTH,
    IKEv2_CERTREQ,
    IKEv2_CP,
    IKEv2_Delete,
    IKEv2_Encrypted,
    IKEv2_Encrypted_Fragment,
    IKEv2_IDi,
    IKEv2_KE,
    IKEv2_Nonce,
    IKEv2_Notify,
    IKEv2_Proposal,
    IKEv2_SA,
    IKEv2_Transform,
    IKEv2_TSi,
    IKEv2_TSr,
    IKEv2_VendorID,
    IPv4TrafficSelector,
    IPv6TrafficSelector,
)

from services.core.iana import Encr, Integ, IpProto
from services.core.ike.constants import (
    AuthMethod,
    CertEncoding,
    CfgType,
    ConfigAttr,
    Esn,
    ExchangeType,
    IdType,
    NotifyType,
    PayloadType,
    ProtocolId,
    TransformType,
)
from services.core.ike.message import (
    CP,
    EAP,
    KE,
    MAX_ATTRIBUTES,
    MAX_PAYLOADS,
    MAX_PROPOSALS,
    SA,
    SK,
    SKF,
    Auth,
    Cert,
    CertReq,
    ConfigAttribute,
    Delete,
    IDi,
    IDr,
    IkeDecodeError,
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
    decode_header,
    decode_message,
    decode_payloads,
    encode_message,
    encode_payloads,
)
from services.core.ike.payloads import DECODERS
from tests.vectors import rfc7634

ROUND = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])

PRF_HMAC_SHA2_256 = 5  # RFC 4868 / IANA Transform Type 2
ECP_256 = 19  # RFC 5903 / IANA Transform Type 4
CURVE25519 = 31  # RFC 8031

SPI_I = bytes.fromhex("0102030405060708")
SPI_R = bytes.fromhex("a1a2a3a4a5a6a7a8")

# --- strategies --------------------------------------------------------------------------------

u8 = st.integers(0, 0xFF)
u15 = st.integers(0, 0x7FFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
blob = st.binary(max_size=40)
crit = st.booleans()


def _tuples(s: st.SearchStrategy[object], lo: int = 0, hi: int = 4) -> st.SearchStrategy[tuple]:
    return st.lists(s, min_size=lo, max_size=hi).map(tuple)


def _fixed(n: int) -> st.SearchStrategy[bytes]:
    return st.binary(min_size=n, max_size=n)


attributes = st.one_of(
    st.builds(TransformAttribute, u15, u16), st.builds(TransformAttribute, u15, blob)
)
transforms = st.builds(Transform, u8, u16, _tuples(attributes, 0, 3))
proposals = st.builds(Proposal, u8, u8, _tuples(transforms, 0, 5), st.binary(max_size=8))
selectors = st.one_of(
    st.sampled_from([4, 16]).flatmap(
        lambda n: st.builds(TrafficSelector, u8, u16, u16, _fixed(n), _fixed(n))
    ),
    st.builds(RawTrafficSelector, u8.filter(lambda t: t not in (7, 8)), u8, blob),
)

PAYLOADS: dict[str, st.SearchStrategy[Payload]] = {
    "SA": st.builds(SA, _tuples(proposals, 1, 3), critical=crit),
    "KE": st.builds(KE, u16, blob, critical=crit),
    "IDi": st.builds(IDi, u8, blob, critical=crit),
    "IDr": st.builds(IDr, u8, blob, critical=crit),
    "CERT": st.builds(Cert, u8, blob, critical=crit),
    "CERTREQ": st.builds(CertReq, u8, blob, critical=crit),
    "AUTH": st.builds(Auth, u8, blob, critical=crit),
    "Nonce": st.builds(Nonce, blob, critical=crit),
    "Notify": st.builds(Notify, u16, blob, u8, st.binary(max_size=8), critical=crit),
    "Delete": st.integers(0, 8).flatmap(
        lambda size: st.builds(
            Delete, u8, st.just(size), _tuples(_fixed(size), 0, 4 if size else 0), critical=crit
        )
    ),
    "VendorId": st.builds(VendorId, blob, critical=crit),
    "TSi": st.builds(TSi, _tuples(selectors), critical=crit),
    "TSr": st.builds(TSr, _tuples(selectors), critical=crit),
    "SK": st.builds(SK, u8, blob, critical=crit),
    "SKF": st.integers(1, 0xFFFF).flatmap(
        lambda total: st.builds(SKF, st.integers(1, total), st.just(total), u8, blob, critical=crit)
    ),
    "CP": st.builds(CP, u8, _tuples(st.builds(ConfigAttribute, u15, blob)), critical=crit),
    "EAP": st.builds(EAP, blob, critical=crit),
    "Unknown": st.builds(
        UnknownPayload, u8.filter(lambda t: t and t not in DECODERS), st.just(False), blob
    ),
}
_CHAINABLE = st.one_of(*(s for k, s in PAYLOADS.items() if k not in ("SK", "SKF")))
_SEALED = st.one_of(PAYLOADS["SK"], PAYLOADS["SKF"])
payload_chains = st.tuples(st.lists(_CHAINABLE, max_size=6), st.lists(_SEALED, max_size=1)).map(
    lambda t: tuple(t[0] + t[1])
)
messages = st.builds(
    Message,
    _fixed(8),
    _fixed(8),
    u8,
    u32,
    payload_chains,
    st.booleans(),
    st.booleans(),
    st.booleans(),
    st.integers(0, 15),
)


def test_every_dissected_payload_type_has_a_strategy() -> None:
    classes = {"SA": SA, "KE": KE, "IDi": IDi, "IDr": IDr, "CERT": Cert, "CERTREQ": CertReq}
    classes |= {"AUTH": Auth, "Nonce": Nonce, "Notify": Notify, "Delete": Delete, "CP": CP}
    classes |= {"VendorId": VendorId, "TSi": TSi, "TSr": TSr, "SK": SK, "SKF": SKF, "EAP": EAP}
    assert set(PAYLOADS) == {*classes, "Unknown"}
    assert {c.payload_type for c in classes.values()} == set(DECODERS)


# --- 1. round trips ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(PAYLOADS))
@ROUND
@given(data=st.data())
def test_payload_round_trip(kind: str, data: st.DataObject) -> None:
    p = data.draw(PAYLOADS[kind])
    first, wire = encode_payloads([p])
    assert first == p.payload_type
    assert decode_payloads(first, wire) == [p]
    msg = Message(SPI_I, SPI_R, ExchangeType.INFORMATIONAL, 7, (p,), initiator=True)
    raw = encode_message(msg)
    assert decode_message(raw) == msg
    assert encode_message(decode_message(raw)) == raw


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages)
def test_message_round_trip(msg: Message) -> None:
    raw = encode_message(msg)
    assert len(raw) == int.from_bytes(raw[24:28], "big")
    back = decode_message(raw)
    assert back == msg
    assert encode_message(back) == raw
    hdr = decode_header(raw)
    assert (hdr.spi_i, hdr.spi_r, hdr.message_id, hdr.length) == (
        msg.spi_i,
        msg.spi_r,
        msg.message_id,
        len(raw),
    )
    assert hdr.next_payload == (msg.payloads[0].payload_type if msg.payloads else 0)


def _sa_init_request() -> Message:
    ike = Proposal(
        1,
        ProtocolId.IKE,
        (
            Transform(TransformType.ENCR, Encr.AES_CBC, (TransformAttribute.key_length(256),)),
            Transform(TransformType.PRF, PRF_HMAC_SHA2_256),
            Transform(TransformType.INTEG, Integ.HMAC_SHA2_256_128),
            Transform(TransformType.DH, ECP_256),
        ),
    )
    aead = Proposal(
        2,
        ProtocolId.IKE,
        (
            Transform(TransformType.ENCR, Encr.AES_GCM_16, (TransformAttribute.key_length(128),)),
            Transform(TransformType.PRF, PRF_HMAC_SHA2_256),
            Transform(TransformType.DH, CURVE25519),
        ),
    )
    return Message(
        SPI_I,
        bytes(8),
        ExchangeType.IKE_SA_INIT,
        0,
        (
            SA((ike, aead)),
            KE(ECP_256, bytes(range(64))),
            Nonce(bytes(range(100, 132))),
            Notify(NotifyType.NAT_DETECTION_SOURCE_IP, b"\x11" * 20),
            Notify(NotifyType.NAT_DETECTION_DESTINATION_IP, b"\x22" * 20),
            Notify(NotifyType.IKEV2_FRAGMENTATION_SUPPORTED),
            VendorId(b"ipsec-suite codec test"),
        ),
        initiator=True,
    )


def _sa_init_response() -> Message:
    chosen = Proposal(
        1,
        ProtocolId.IKE,
        (
            Transform(TransformType.ENCR, Encr.AES_CBC, (TransformAttribute.key_length(256),)),
            Transform(TransformType.PRF, PRF_HMAC_SHA2_256),
            Transform(TransformType.INTEG, Integ.HMAC_SHA2_256_128),
            Transform(TransformType.DH, ECP_256),
        ),
    )
    return Message(
        SPI_I,
        SPI_R,
        ExchangeType.IKE_SA_INIT,
        0,
        (
            SA((chosen,)),
            KE(ECP_256, bytes(range(64, 128))),
            Nonce(bytes(range(200, 232))),
            CertReq(CertEncoding.X509_SIGNATURE, b"\x5a" * 20),
            Notify(NotifyType.NAT_DETECTION_SOURCE_IP, b"\x33" * 20),
            Notify(NotifyType.MULTIPLE_AUTH_SUPPORTED),
        ),
        response=True,
    )


def _ike_auth_cleartext() -> Message:
    """IKE_AUTH request payloads as they look inside SK (sent here in the clear for oracles)."""
    child = Proposal(
        1,
        ProtocolId.ESP,
        (
            Transform(TransformType.ENCR, Encr.AES_GCM_16, (TransformAttribute.key_length(256),)),
            Transform(TransformType.ESN, Esn.NO_ESN),
        ),
        spi=b"\xc1\xc2\xc3\xc4",
    )
    return Message(
        SPI_I,
        SPI_R,
        ExchangeType.IKE_AUTH,
        1,
        (
            IDi(IdType.ID_FQDN, b"client.example"),
            Auth(AuthMethod.SHARED_KEY_MIC, b"\x55" * 32),
            CP(CfgType.CFG_REQUEST, (ConfigAttribute(ConfigAttr.INTERNAL_IP4_ADDRESS),)),
            SA((child,)),
            TSi(
                (
                    TrafficSelector(0, 0, 65535, bytes([192, 0, 2, 0]), bytes([192, 0, 2, 255])),
                    TrafficSelector(
                        IpProto.UDP,
                        500,
                        500,
                        bytes.fromhex("20010db8000000000000000000000000"),
                        bytes.fromhex("20010db800000000ffffffffffffffff"),
                    ),
                )
            ),
            TSr(
                (
                    TrafficSelector(
                        IpProto.TCP, 80, 443, bytes([198, 51, 100, 1]), bytes([198, 51, 100, 9])
                    ),
                )
            ),
        ),
        initiator=True,
    )


def _ike_auth_sealed() -> Message:
    return Message(
        SPI_I,
        SPI_R,
        ExchangeType.IKE_AUTH,
        1,
        (SK(PayloadType.IDi, bytes(range(16)) + b"\xee" * 48 + b"\x77" * 16),),
        initiator=True,
    )


def _ike_auth_fragment(n: int) -> Message:
    return Message(
        SPI_I,
        SPI_R,
        ExchangeType.IKE_AUTH,
        1,
        (SKF(n, 2, PayloadType.IDi if n == 1 else 0, bytes([n]) * 16 + b"\xdd" * 40),),
        initiator=True,
    )


def _informational_delete() -> Message:
    return Message(
        SPI_I,
        SPI_R,
        ExchangeType.INFORMATIONAL,
        2,
        (
            Delete(ProtocolId.ESP, 4, (b"\xc1\xc2\xc3\xc4", b"\xd1\xd2\xd3\xd4")),
            Delete(ProtocolId.IKE),
        ),
        response=True,
    )


SAMPLES = {
    "sa_init_request": _sa_init_request,
    "sa_init_response": _sa_init_response,
    "ike_auth_cleartext": _ike_auth_cleartext,
    "ike_auth_sk": _ike_auth_sealed,
    "ike_auth_skf1": lambda: _ike_auth_fragment(1),
    "ike_auth_skf2": lambda: _ike_auth_fragment(2),
    "informational_delete": _informational_delete,
}


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_sample_messages_round_trip(name: str) -> None:
    msg = SAMPLES[name]()
    raw = encode_message(msg)
    assert decode_message(raw) == msg
    assert encode_message(decode_message(raw)) == raw


def test_sa_init_request_bytes_by_hand() -> None:
    """Spot-check the layout of RFC 7296 §3.1 / §3.2 / §3.3 against hand-computed offsets."""
    raw = encode_message(_sa_init_request())
    assert raw[:16] == SPI_I + bytes(8)
    assert raw[16:20] == bytes([PayloadType.SA, 0x20, ExchangeType.IKE_SA_INIT, 0x08])
    assert raw[20:24] == bytes(4)
    # SA generic header: next = KE, not critical, then proposal #1 with "more" marker 2
    assert raw[28] == PayloadType.KE and raw[29] == 0
    assert raw[32] == 2 and raw[36:40] == bytes([1, ProtocolId.IKE, 0, 4])
    # first transform: more (3), length 12, ENCR, AES-CBC, then TV attribute 0x800e 0x0100
    assert raw[40:52] == bytes.fromhex("0300000c0100000c800e0100")
    assert Transform(1, 12, (TransformAttribute.key_length(256),)).key_length == 256


# --- 2. hostile input --------------------------------------------------------------------------


def _decode_or_error(data: bytes) -> Message | None:
    try:
        msg = decode_message(data)
    except IkeDecodeError as e:
        assert e.notify_type in (
            NotifyType.INVALID_SYNTAX,
            NotifyType.UNSUPPORTED_CRITICAL_PAYLOAD,
            NotifyType.INVALID_MAJOR_VERSION,
        )
        return None
    # whatever decodes re-encodes to a canonical form that decodes to the same message, and
    # octet for octet (only reserved bits may differ): nothing was skipped or invented
    again = encode_message(msg)
    assert decode_message(again) == msg
    assert len(again) == len(data)
    return msg


def _hdr(next_payload: int, length: int, version: int = 0x20) -> bytes:
    return SPI_I + SPI_R + bytes([next_payload, version, 34, 0x08]) + struct.pack("!II", 0, length)


@FUZZ
@given(st.binary(max_size=400))
def test_random_bytes(data: bytes) -> None:
    _decode_or_error(data)


_TYPES = st.one_of(st.sampled_from(sorted(DECODERS)), u8)


@FUZZ
@given(_TYPES, st.binary(max_size=300))
def test_random_payload_chain_behind_a_valid_header(first: int, body: bytes) -> None:
    _decode_or_error(_hdr(first, 28 + len(body)) + body)
    try:
        decode_payloads(first, body)
    except IkeDecodeError:
        pass


def _payload_offsets(raw: bytes) -> list[int]:
    """Offsets of the generic payload headers of a well-formed message."""
    out, off, nxt = [], 28, raw[16]
    while nxt and off < len(raw):
        out.append(off)
        if nxt in (PayloadType.SK, PayloadType.SKF):
            break
        nxt = raw[off]
        off += int.from_bytes(raw[off + 2 : off + 4], "big")
    return out


@FUZZ
@given(messages, st.data())
def test_mutated_messages(msg: Message, data: st.DataObject) -> None:
    raw = bytearray(encode_message(msg))
    how = data.draw(st.sampled_from(["truncate", "length", "bit", "byte", "append"]))
    offsets = _payload_offsets(bytes(raw))
    if how == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif how == "length" and offsets:
        off = data.draw(st.sampled_from(offsets))
        old = int.from_bytes(raw[off + 2 : off + 4], "big")
        new = data.draw(st.one_of(u16, st.integers(max(0, old - 12), old + 12)))
        raw[off + 2 : off + 4] = new.to_bytes(2, "big")
    elif how == "bit":
        i = data.draw(st.integers(0, len(raw) * 8 - 1))
        raw[i // 8] ^= 1 << (i % 8)
    elif how == "byte":
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(u8)
    else:
        raw += data.draw(st.binary(min_size=1, max_size=16))
    if data.draw(st.booleans()) and len(raw) >= 28:  # keep the header Length honest: go deeper
        raw[24:28] = struct.pack("!I", len(raw))
    _decode_or_error(bytes(raw))


@pytest.mark.parametrize("kind", sorted(PAYLOADS))
@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_payload_bodies(kind: str, data: st.DataObject) -> None:
    """Near-valid bodies behind consistent headers: every body decoder sees them."""
    p = data.draw(PAYLOADS[kind])
    body = bytearray(p.encode_body())
    how = data.draw(st.sampled_from(["truncate", "byte", "nudge", "insert"]))
    if how == "truncate" and body:
        short = st.integers(0, min(len(body) - 1, 12))
        body = body[: data.draw(st.one_of(short, st.integers(0, len(body) - 1)))]
    elif how in ("byte", "nudge") and body:
        i = data.draw(st.integers(0, len(body) - 1))
        delta = data.draw(st.integers(-3, 3))
        body[i] = data.draw(u8) if how == "byte" else (body[i] + delta) % 256
    else:
        i = data.draw(st.integers(0, len(body)))
        body[i:i] = data.draw(st.binary(min_size=1, max_size=8))
    first, chain = _chain([(p.payload_type, bytes(body))])
    _decode_or_error(_hdr(first, 28 + len(chain)) + chain)


def _chain(types_and_bodies: list[tuple[int, bytes]], critical: int = 0) -> tuple[int, bytes]:
    out = b""
    for i, (_t, body) in enumerate(types_and_bodies):
        nxt = types_and_bodies[i + 1][0] if i + 1 < len(types_and_bodies) else 0
        out += struct.pack("!BBH", nxt, critical, 4 + len(body)) + body
    return types_and_bodies[0][0], out


def _error(data: bytes) -> IkeDecodeError:
    with pytest.raises(IkeDecodeError) as ei:
        decode_message(data)
    return ei.value


@pytest.mark.parametrize("ptype", [1, 2, 5, 13, 49, 54, 200])
def test_unknown_payloads_and_the_critical_bit(ptype: int) -> None:
    """IKEv1 types (1..13) and unassigned ones are unknown: skipped unless critical."""
    first, body = _chain([(PayloadType.NONCE, b"n" * 16), (ptype, b"xyz")])
    msg = decode_message(_hdr(first, 28 + len(body)) + body)
    assert msg.payloads == (Nonce(b"n" * 16), UnknownPayload(ptype, False, b"xyz"))
    assert encode_message(msg) == _hdr(first, 28 + len(body)) + body

    hot = bytearray(body)
    hot[20 + 1] = 0x80  # critical bit of the second payload
    e = _error(_hdr(first, 28 + len(hot)) + bytes(hot))
    assert e.notify_type == NotifyType.UNSUPPORTED_CRITICAL_PAYLOAD
    assert e.data == bytes([ptype])
    assert e.header is not None and e.header.spi_i == SPI_I


def test_critical_bit_on_a_known_payload_is_kept_not_rejected() -> None:
    first, body = _chain([(PayloadType.NONCE, b"n" * 16)], critical=0x80)
    msg = decode_message(_hdr(first, 28 + len(body)) + body)
    assert msg.payloads == (Nonce(b"n" * 16, critical=True),)


@pytest.mark.parametrize("version", [0x10, 0x30, 0xF0, 0x00])
def test_major_version_other_than_2(version: int) -> None:
    e = _error(_hdr(0, 28, version))
    assert e.notify_type == NotifyType.INVALID_MAJOR_VERSION


def test_minor_version_and_reserved_bits() -> None:
    msg = decode_message(_hdr(0, 28, 0x21))
    assert msg.minor_version == 1 and msg.payloads == ()
    # reserved header flag bits and generic-header reserved bits are ignored on receipt
    first, body = _chain([(PayloadType.NONCE, b"n" * 16)], critical=0x7F)
    raw = bytearray(_hdr(first, 28 + len(body)) + body)
    raw[19] |= 0xC7
    assert decode_message(bytes(raw)).payloads == (Nonce(b"n" * 16),)
    assert decode_message(bytes(raw)).initiator


@pytest.mark.parametrize(
    "data",
    [
        b"",
        _hdr(0, 28)[:27],
        _hdr(0, 29),  # Length beyond the datagram
        _hdr(0, 27),  # Length below the header
        _hdr(0, 29) + b"\0",  # data after the last payload (Length honest)
        _hdr(PayloadType.NONCE, 28),  # Next Payload but nothing follows
        _hdr(PayloadType.NONCE, 31) + b"\0\0\0",
        _hdr(PayloadType.NONCE, 32) + b"\0\0\0\3",  # Payload Length below 4
        _hdr(PayloadType.NONCE, 32) + b"\0\0\0\5",  # Payload Length beyond the message
    ],
)
def test_truncations_and_bad_lengths(data: bytes) -> None:
    e = _error(data)
    assert e.notify_type == NotifyType.INVALID_SYNTAX


def test_header_length_must_match_the_datagram() -> None:
    assert _error(_hdr(0, 29) + b"\0\0").notify_type == NotifyType.INVALID_SYNTAX
    assert _error(_hdr(0, 28) + b"\0").notify_type == NotifyType.INVALID_SYNTAX


def _single(ptype: int, body: bytes) -> bytes:
    first, chain = _chain([(ptype, body)])
    return _hdr(first, 28 + len(chain)) + chain


@pytest.mark.parametrize(
    ("ptype", "body"),
    [
        (PayloadType.SA, b""),  # no proposals
        (PayloadType.SA, bytes.fromhex("0000000801010001")),  # 1 transform announced, none
        (PayloadType.SA, bytes.fromhex("0200000801010000")),  # last proposal marked "more"
        (PayloadType.SA, bytes.fromhex("0000000801010000") * 2),  # marker 0 but not last
        (PayloadType.SA, bytes.fromhex("000000090101000000")),  # 1 stray octet after SPI
        (PayloadType.SA, bytes.fromhex("0000000c010100010000000c")),  # transform past proposal
        (PayloadType.SA, bytes.fromhex("00000010010100010300000801000001")),  # transform marker 3
        (PayloadType.SA, bytes.fromhex("00000014010100010000000c010000010e0e00ff")),  # TLV overrun
        (PayloadType.SA, bytes.fromhex("00000010010100010000000601000001")),  # transform length < 8
        (PayloadType.SA, bytes.fromhex("00000016010100020300000601000000000801000001")),  # ditto
        (PayloadType.SA, bytes.fromhex("0000000801010400")),  # SPI overruns the proposal
        (PayloadType.KE, b"\0\x13\0"),
        (PayloadType.IDi, b"\x02\0\0"),
        (PayloadType.CERT, b""),
        (PayloadType.AUTH, b"\x02"),
        (PayloadType.NOTIFY, b"\0\x05\x40\x00abcd"),  # SPI size 5 > 4 octets left
        (PayloadType.DELETE, b"\x03\x04\x00\x02" + b"\0" * 7),
        (PayloadType.DELETE, b"\x01\x00\x00\x01"),  # SPI size 0, one SPI
        (PayloadType.TSi, b"\x01\0\0\0"),  # one TS announced, none there
        (PayloadType.TSi, b"\x01\0\0\0" + bytes.fromhex("0700000f") + b"\0" * 11),  # IPv4 TS != 16
        (PayloadType.TSi, b"\x01\0\0\0" + bytes.fromhex("08000010") + b"\0" * 12),  # IPv6 TS != 40
        (PayloadType.TSi, b"\x00\0\0\0" + bytes.fromhex("07000010") + b"\0" * 12),  # extra TS
        (PayloadType.TSr, b"\x01\0\0\0" + bytes.fromhex("09000003")),  # selector length < 4
        (PayloadType.TSr, b"\x01\0\0\0" + bytes.fromhex("07000010")),  # IPv4 TS cut after 4
        (PayloadType.SKF, b"\0\x01\0"),
        (PayloadType.SKF, b"\0\x00\0\x02"),  # fragment 0
        (PayloadType.SKF, b"\0\x03\0\x02"),  # fragment 3 of 2
        (PayloadType.CP, b"\x01\0\0"),
        (PayloadType.CP, b"\x01\0\0\0\0\x01\0\x05abcd"),  # attribute overruns
        (PayloadType.CP, b"\x01\0\0\0\0\x01\0"),  # truncated attribute header
    ],
)
def test_malformed_payload_bodies(ptype: int, body: bytes) -> None:
    e = _error(_single(ptype, body))
    assert e.notify_type == NotifyType.INVALID_SYNTAX
    assert e.header is not None


def test_sealed_payload_must_be_last() -> None:
    first, body = _chain([(PayloadType.SK, b"iv+ct+icv"), (PayloadType.NONCE, b"n" * 16)])
    assert _error(_hdr(first, 28 + len(body)) + body).notify_type == NotifyType.INVALID_SYNTAX
    with pytest.raises(ValueError, match="last"):
        encode_payloads([SK(0, b""), Nonce(b"")])


def test_bounds_on_payloads_proposals_and_attributes() -> None:
    ok = [(PayloadType.VENDOR_ID, b"")] * MAX_PAYLOADS
    first, body = _chain(ok)
    assert len(decode_message(_hdr(first, 28 + len(body)) + body).payloads) == MAX_PAYLOADS
    first, body = _chain([*ok, (PayloadType.VENDOR_ID, b"")])
    assert _error(_hdr(first, 28 + len(body)) + body).notify_type == NotifyType.INVALID_SYNTAX
    with pytest.raises(ValueError):
        encode_payloads([VendorId(b"")] * (MAX_PAYLOADS + 1))

    prop = bytes.fromhex("0200000801010000")
    many = prop * MAX_PROPOSALS + bytes.fromhex("0000000801010000")
    assert _error(_single(PayloadType.SA, many)).notify_type == NotifyType.INVALID_SYNTAX
    fine = prop * (MAX_PROPOSALS - 1) + bytes.fromhex("0000000801010000")
    (sa_payload,) = decode_message(_single(PayloadType.SA, fine)).payloads
    assert isinstance(sa_payload, SA) and len(sa_payload.proposals) == MAX_PROPOSALS

    attrs = bytes.fromhex("800e0080") * (MAX_ATTRIBUTES + 1)
    trans = struct.pack("!BBHBBH", 0, 0, 8 + len(attrs), 1, 0, 12) + attrs
    sa = struct.pack("!BBHBBBB", 0, 0, 8 + len(trans), 1, 1, 0, 1) + trans
    assert _error(_single(PayloadType.SA, sa)).notify_type == NotifyType.INVALID_SYNTAX
    cp = b"\x01\0\0\0" + b"\0\x01\0\0" * (MAX_ATTRIBUTES + 1)
    assert _error(_single(PayloadType.CP, cp)).notify_type == NotifyType.INVALID_SYNTAX


@pytest.mark.parametrize(
    "payload",
    [
        TSi((TrafficSelector(0, 0, 0, b"\0" * 4, b"\0" * 16),)),
        TSi((RawTrafficSelector(7, 0, b""),)),
        Delete(ProtocolId.ESP, 4, (b"\0\0\0",)),
        Delete(ProtocolId.ESP, 0, (b"",)),
        UnknownPayload(PayloadType.NONCE, False, b""),
        UnknownPayload(0, False, b""),
        SA(()),
        KE(0x10000, b""),
        Transform(1, 1, (TransformAttribute(0x8000, 1),)),
        CP(1, (ConfigAttribute(0x8000),)),
        Notify(1, spi=b"\0" * 256),
        Nonce(b"\0" * 0xFFFC),
    ],
    ids=lambda p: type(p).__name__,
)
def test_encoder_refuses_what_the_wire_cannot_carry(payload: object) -> None:
    if isinstance(payload, Transform):
        payload = SA((Proposal(1, 1, (payload,)),))
    with pytest.raises(ValueError):
        encode_payloads([payload])  # type: ignore[list-item]


def test_encoder_checks_the_header() -> None:
    with pytest.raises(ValueError):
        encode_message(Message(b"short", SPI_R, 34, 0))
    with pytest.raises(ValueError):
        encode_message(Message(SPI_I, SPI_R, 34, 1 << 32))
    with pytest.raises(ValueError):
        encode_message(Message(SPI_I, SPI_R, 34, 0, minor_version=16))


# --- 3. scapy oracle ---------------------------------------------------------------------------


def _scapy_transforms(*specs: tuple[int, int, int | None]) -> object:
    chain = None
    for ttype, tid, keylen in specs:
        t = (
            IKEv2_Transform(transform_type=ttype, transform_id=tid, length=12, key_length=keylen)
            if keylen
            else IKEv2_Transform(transform_type=ttype, transform_id=tid)
        )
        chain = t if chain is None else chain / t
    return chain


def test_scapy_built_ike_sa_init_request_decodes() -> None:
    pkt = (
        IKEv2(init_SPI=SPI_I, resp_SPI=bytes(8), exch_type=34, flags="Initiator", id=0)
        / IKEv2_SA(
            prop=IKEv2_Proposal(
                proposal=1,
                proto=1,
                trans_nb=4,
                trans=_scapy_transforms((1, 12, 256), (2, 5, None), (3, 12, None), (4, 19, None)),
            )
            / IKEv2_Proposal(
                proposal=2,
                proto=1,
                trans_nb=3,
                trans=_scapy_transforms((1, 20, 128), (2, 5, None), (4, 31, None)),
            )
        )
        / IKEv2_KE(group=19, ke=bytes(range(64)))
        / IKEv2_Nonce(nonce=bytes(range(100, 132)))
        / IKEv2_Notify(type=16388, notify=b"\x11" * 20)
        / IKEv2_Notify(type=16389, notify=b"\x22" * 20)
        / IKEv2_Notify(type=16430)
        / IKEv2_VendorID(vendorID=b"ipsec-suite codec test")
    )
    raw = bytes(pkt)
    msg = decode_message(raw)
    assert msg == _sa_init_request()  # same content built independently
    assert encode_message(msg) == raw  # and the same bytes
    sa = msg.payloads[0]
    assert isinstance(sa, SA) and sa.proposals[0].transforms[0].key_length == 256


def test_scapy_built_ike_auth_shaped_message_decodes() -> None:
    pkt = (
        IKEv2(init_SPI=SPI_I, resp_SPI=SPI_R, exch_type=35, flags="Initiator", id=1)
        / IKEv2_IDi(IDtype=2, ID=b"client.example")
        / IKEv2_AUTH(auth_type=2, load=b"\x55" * 32)
        / IKEv2_CP(CFGType=1, attributes=[ScapyCfgAttr(type=1)])
        / IKEv2_SA(
            prop=IKEv2_Proposal(
                proposal=1,
                proto=3,
                SPI=b"\xc1\xc2\xc3\xc4",
                trans_nb=2,
                trans=_scapy_transforms((1, 20, 256), (5, 0, None)),
            )
        )
        / IKEv2_TSi(
            traffic_selector=[
                IPv4TrafficSelector(
                    IP_protocol_ID=0,
                    starting_address_v4="192.0.2.0",
                    ending_address_v4="192.0.2.255",
                ),
                # scapy's default IPv6 selector length is 20; RFC 7296 §3.13.1 says 40
                IPv6TrafficSelector(
                    length=40,
                    IP_protocol_ID=17,
                    start_port=500,
                    end_port=500,
                    starting_address_v6="2001:db8::",
                    ending_address_v6="2001:db8::ffff:ffff:ffff:ffff",
                ),
            ]
        )
        / IKEv2_TSr(
            traffic_selector=[
                IPv4TrafficSelector(
                    IP_protocol_ID=6,
                    start_port=80,
                    end_port=443,
                    starting_address_v4="198.51.100.1",
                    ending_address_v4="198.51.100.9",
                )
            ]
        )
    )
    raw = bytes(pkt)
    assert decode_message(raw) == _ike_auth_cleartext()
    assert encode_message(decode_message(raw)) == raw


def test_scapy_built_delete_sk_and_skf_decode() -> None:
    # scapy computes Delete's SPI Size as the total SPI octets; RFC 7296 §3.11 wants one SPI's
    pkt = (
        IKEv2(init_SPI=SPI_I, resp_SPI=SPI_R, exch_type=37, flags="Response", id=2)
        / IKEv2_Delete(proto=3, SPIsize=4, SPInum=2, SPI=[b"\xc1\xc2\xc3\xc4", b"\xd1\xd2\xd3\xd4"])
        / IKEv2_Delete(proto=1, SPIsize=0, SPInum=0)
    )
    assert decode_message(bytes(pkt)) == _informational_delete()
    sk = IKEv2(
        init_SPI=SPI_I, resp_SPI=SPI_R, exch_type=35, flags="Initiator", id=1
    ) / IKEv2_Encrypted(next_payload=35, load=bytes(range(16)) + b"\xee" * 48 + b"\x77" * 16)
    assert decode_message(bytes(sk)) == _ike_auth_sealed()
    skf = IKEv2(
        init_SPI=SPI_I, resp_SPI=SPI_R, exch_type=35, flags="Initiator", id=1
    ) / IKEv2_Encrypted_Fragment(
        next_payload=35, frag_number=1, frag_total=2, load=b"\x01" * 16 + b"\xdd" * 40
    )
    assert decode_message(bytes(skf)) == _ike_auth_fragment(1)


def _scapy_payload_types(pkt: object) -> list[int]:
    out, layer = [], pkt.payload  # type: ignore[attr-defined]
    prev = pkt.next_payload  # type: ignore[attr-defined]
    while prev:
        out.append(int(prev))
        if prev in (46, 53):
            break
        prev, layer = layer.next_payload, layer.payload
    return out


def test_our_encoding_parsed_by_scapy() -> None:
    req = IKEv2(encode_message(_sa_init_request()))
    assert (req.init_SPI, req.resp_SPI, req.exch_type, req.id) == (SPI_I, bytes(8), 34, 0)
    assert req.flags == 0x08 and req.length == len(encode_message(_sa_init_request()))
    assert _scapy_payload_types(req) == [33, 34, 40, 41, 41, 41, 43]
    prop = req[IKEv2_SA].prop
    got = []
    while isinstance(prop, IKEv2_Proposal):
        t, ts = prop.trans, []
        while isinstance(t, IKEv2_Transform):
            ts.append((t.transform_type, t.transform_id, t.key_length if t.length > 8 else None))
            t = t.payload
        got.append((prop.proposal, prop.proto, prop.trans_nb, ts))
        prop = prop.payload
    assert got == [
        (1, 1, 4, [(1, 12, 256), (2, 5, None), (3, 12, None), (4, 19, None)]),
        (2, 1, 3, [(1, 20, 128), (2, 5, None), (4, 31, None)]),
    ]
    assert (req[IKEv2_KE].group, req[IKEv2_KE].ke) == (19, bytes(range(64)))
    assert req[IKEv2_Nonce].nonce == bytes(range(100, 132))
    assert [(n.type, n.notify) for n in _layers(req, IKEv2_Notify)] == [
        (16388, b"\x11" * 20),
        (16389, b"\x22" * 20),
        (16430, b""),
    ]

    auth = IKEv2(encode_message(_ike_auth_cleartext()))
    assert auth.exch_type == 35 and auth.id == 1
    assert _scapy_payload_types(auth) == [35, 39, 47, 33, 44, 45]
    assert (auth[IKEv2_IDi].IDtype, auth[IKEv2_IDi].ID) == (2, b"client.example")
    assert (auth[IKEv2_AUTH].auth_type, auth[IKEv2_AUTH].load) == (2, b"\x55" * 32)
    assert [a.type for a in auth[IKEv2_CP].attributes] == [1]
    assert auth[IKEv2_SA].prop.SPI == b"\xc1\xc2\xc3\xc4" and auth[IKEv2_SA].prop.proto == 3
    tsi = auth[IKEv2_TSi].traffic_selector
    assert (tsi[0].starting_address_v4, tsi[0].ending_address_v4) == ("192.0.2.0", "192.0.2.255")
    assert (tsi[1].IP_protocol_ID, tsi[1].start_port, tsi[1].starting_address_v6) == (
        17,
        500,
        "2001:db8::",
    )
    tsr = auth[IKEv2_TSr].traffic_selector[0]
    assert (tsr.IP_protocol_ID, tsr.start_port, tsr.end_port, tsr.ending_address_v4) == (
        6,
        80,
        443,
        "198.51.100.9",
    )

    resp = IKEv2(encode_message(_sa_init_response()))
    assert resp.flags == 0x20 and resp.resp_SPI == SPI_R
    assert (resp[IKEv2_CERTREQ].cert_encoding, resp[IKEv2_CERTREQ].cert_authority) == (
        4,
        b"\x5a" * 20,
    )

    dele = IKEv2(encode_message(_informational_delete()))
    d = _layers(dele, IKEv2_Delete)
    assert [(x.proto, x.SPInum, x.SPI) for x in d] == [
        (3, 2, [b"\xc1\xc2\xc3\xc4", b"\xd1\xd2\xd3\xd4"]),
        (1, 0, []),
    ]

    sk = IKEv2(encode_message(_ike_auth_sealed()))
    assert sk[IKEv2_Encrypted].next_payload == 35 and len(sk[IKEv2_Encrypted].load) == 80
    skf = IKEv2(encode_message(_ike_auth_fragment(2)))
    f = skf[IKEv2_Encrypted_Fragment]
    assert (f.next_payload, f.frag_number, f.frag_total, f.load) == (
        0,
        2,
        2,
        b"\x02" * 16 + b"\xdd" * 40,
    )


def _layers(pkt: object, cls: type) -> list[object]:
    out, i = [], 1
    while (layer := pkt.getlayer(cls, i)) is not None:  # type: ignore[attr-defined]
        out.append(layer)
        i += 1
    return out


# --- 4. tshark oracle --------------------------------------------------------------------------

_TSHARK = shutil.which("tshark")
_FIELDS = [
    "frame.number",
    "_ws.malformed",
    "_ws.expert.severity",
    "_ws.expert.message",
    "isakmp.ispi",
    "isakmp.rspi",
    "isakmp.exchangetype",
    "isakmp.messageid",
    "isakmp.flag_i",
    "isakmp.flag_r",
    "isakmp.length",
    "isakmp.typepayload",
    "isakmp.notify.msgtype",
    "isakmp.tf.type",
    "isakmp.frag.number",
    "isakmp.frag.total",
    "isakmp.delete.spi",
    "isakmp.ts.start_ipv4",
    "isakmp.ts.end_ipv6",
]
_MAC_A, _MAC_B = "02:00:00:00:00:01", "02:00:00:00:00:02"  # explicit: no ARP lookups
_WS_WARN = 0x00600000  # PI_WARN; malformed packets are PI_ERROR (0x00800000)


def _tshark(
    messages: list[bytes],
    tmp_path: Path,
    fields: list[str] = _FIELDS,
    prefs: tuple[str, ...] = (),
) -> list[dict[str, list[str]]]:
    from scapy.all import IP, UDP, Ether, Raw, wrpcap

    pcap = tmp_path / "ike.pcap"
    wrpcap(
        str(pcap),
        [
            Ether(src=_MAC_A, dst=_MAC_B)
            / IP(src="192.0.2.1", dst="192.0.2.2")
            / UDP(sport=500, dport=500)
            / Raw(m)
            for m in messages
        ],
    )
    cmd = [
        str(_TSHARK),
        "-n",
        "-r",
        str(pcap),
        "-T",
        "fields",
        "-E",
        "separator=|",
        "-E",
        "aggregator=;",
    ]
    for pref in prefs:
        cmd += ["-o", pref]
    for f in fields:
        cmd += ["-e", f]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=60).stdout
    rows = []
    for line in out.splitlines():
        cols = line.split("|")
        rows.append({f: [v for v in c.split(";") if v] for f, c in zip(fields, cols, strict=True)})
    assert len(rows) == len(messages)
    return rows


@pytest.mark.skipif(_TSHARK is None, reason="tshark is not installed")
def test_tshark_dissects_our_messages(tmp_path: Path) -> None:
    names = sorted(SAMPLES)
    msgs = [SAMPLES[n]() for n in names]
    raws = [encode_message(m) for m in msgs]
    broken = bytearray(raws[names.index("sa_init_request")])
    broken[30:32] = b"\x00\x05"  # SA Payload Length 5: a negative control for the oracle
    rows = _tshark([*raws, bytes(broken)], tmp_path)

    for name, msg, raw, row in zip(names, msgs, raws, rows, strict=False):
        severities = [int(s, 0) for s in row["_ws.expert.severity"]]
        assert not row["_ws.malformed"], (name, row["_ws.expert.message"])
        assert all(s < _WS_WARN for s in severities), (name, row["_ws.expert.message"])
        assert row["isakmp.ispi"] == [msg.spi_i.hex()] and row["isakmp.rspi"] == [msg.spi_r.hex()]
        assert row["isakmp.exchangetype"] == [str(msg.exchange_type)]
        assert int(row["isakmp.messageid"][0], 16) == msg.message_id
        assert row["isakmp.flag_i"] == [str(int(msg.initiator))]
        assert row["isakmp.flag_r"] == [str(int(msg.response))]
        assert row["isakmp.length"] == [str(len(raw))]
        # typepayload also lists Proposal (2) / Transform (3) substructures
        types = [int(t) for t in row["isakmp.typepayload"] if t not in ("2", "3")]
        assert types == [p.payload_type for p in msg.payloads], name
        notifies = [p.notify_type for p in msg.payloads if isinstance(p, Notify)]
        assert [int(t) for t in row["isakmp.notify.msgtype"]] == notifies
        tf = [
            t.transform_type
            for p in msg.payloads
            if isinstance(p, SA)
            for pr in p.proposals
            for t in pr.transforms
        ]
        assert [int(t) for t in row["isakmp.tf.type"]] == tf

    by = dict(zip(names, rows, strict=False))
    assert by["ike_auth_skf1"]["isakmp.frag.number"] == ["1"]
    assert by["ike_auth_skf2"]["isakmp.frag.number"] == ["2"]
    assert by["ike_auth_skf2"]["isakmp.frag.total"] == ["2"]
    assert by["informational_delete"]["isakmp.delete.spi"] == ["c1c2c3c4", "d1d2d3d4"]
    assert by["ike_auth_cleartext"]["isakmp.ts.start_ipv4"] == ["192.0.2.0", "198.51.100.1"]
    assert by["ike_auth_cleartext"]["isakmp.ts.end_ipv6"] == ["2001:db8::ffff:ffff:ffff:ffff"]
    assert rows[-1]["_ws.malformed"] or any(
        int(s, 0) >= _WS_WARN for s in rows[-1]["_ws.expert.severity"]
    )


# --- 5. RFC 7634 Appendix B --------------------------------------------------------------------


@pytest.mark.parametrize("case", rfc7634.IKE_CASES, ids=lambda c: c.name)
def test_rfc7634_appendix_b_message(case: rfc7634.IkeChaChaCase) -> None:
    msg = decode_message(case.ike_message)
    assert msg.spi_i == bytes(range(0xC0, 0xC8))
    assert msg.spi_r == bytes(range(0xD0, 0xD8))
    assert msg.exchange_type == ExchangeType.INFORMATIONAL
    assert msg.message_id == 9
    assert not (msg.initiator or msg.response or msg.higher_version) and msg.minor_version == 0
    # one Encrypted payload whose first inner payload is a Notify; body = IV || ct || ICV
    assert msg.payloads == (SK(PayloadType.NOTIFY, case.iv + case.ciphertext + case.tag),)
    assert encode_message(msg) == case.ike_message
    assert encode_message(msg)[:32] == case.aad  # AAD = IKE header || SK generic header

    pad_len = case.plaintext[-1]
    inner = decode_payloads(PayloadType.NOTIFY, case.plaintext[: -1 - pad_len])
    assert inner == [Notify(NotifyType.SET_WINDOW_SIZE, (10).to_bytes(4, "big"))]
    assert encode_payloads(inner) == (PayloadType.NOTIFY, case.notify_payload)
