"""IKEv2 message codec: RFC 7296 §3.1 (IKE header), §3.2 (generic payload header, Next Payload
chain, critical bit) and §2.5 (version numbers); payload bodies are in ike.payloads.

``decode_message`` takes one whole message (a UDP datagram's payload after any non-ESP marker)
and either returns a Message or raises IkeDecodeError, whose ``notify_type`` says which error
Notify a responder would send: INVALID_MAJOR_VERSION (major version not 2),
UNSUPPORTED_CRITICAL_PAYLOAD (a payload type we do not dissect with the critical bit set) or
INVALID_SYNTAX (anything else). Payloads of other types without the critical bit are kept as
UnknownPayload (IKEv1 payload types 1..13 included). An SK or SKF payload must be the last
payload of its chain; its Next Payload is the first inner payload type and is kept on it.
``decode_payloads`` walks an inner chain, e.g. the plaintext of an SK payload (padding removed).

Reserved bits and octets are sent as zero and ignored on receipt, so decode -> encode gives back
the original bytes for every well-formed message.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from services.core.ike.constants import (
    GENERIC_HEADER_LEN,
    IKE_HEADER_LEN,
    IKE_MAJOR_VERSION,
    HeaderFlag,
    NotifyType,
    PayloadType,
)
from services.core.ike.payloads import (
    CP,
    DECODERS,
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
    Nonce,
    Notify,
    Payload,
    Proposal,
    RawTrafficSelector,
    Selector,
    TrafficSelector,
    Transform,
    TransformAttribute,
    TSi,
    TSr,
    UnknownPayload,
    VendorId,
    syntax_error,
)

__all__ = [
    "CP",
    "EAP",
    "KE",
    "MAX_ATTRIBUTES",
    "MAX_PAYLOADS",
    "MAX_PROPOSALS",
    "SA",
    "SK",
    "SKF",
    "Auth",
    "Cert",
    "CertReq",
    "ConfigAttribute",
    "Delete",
    "IDi",
    "IDr",
    "IkeDecodeError",
    "IkeHeader",
    "Message",
    "Nonce",
    "Notify",
    "Payload",
    "Proposal",
    "RawTrafficSelector",
    "Selector",
    "TSi",
    "TSr",
    "TrafficSelector",
    "Transform",
    "TransformAttribute",
    "UnknownPayload",
    "VendorId",
    "decode_header",
    "decode_message",
    "decode_payloads",
    "encode_message",
    "encode_payloads",
    "error_notify",
    "version_answer",
]

_HDR = struct.Struct("!8s8sBBBBII")
# the header flags as plain ints: IntFlag arithmetic costs microseconds per operation
_INITIATOR = int(HeaderFlag.INITIATOR)
_RESPONSE = int(HeaderFlag.RESPONSE)
_VERSION = int(HeaderFlag.VERSION)
_GENERIC = struct.Struct("!BBH")
_CRITICAL = 0x80
_SEALED = (PayloadType.SK, PayloadType.SKF)


@dataclass(frozen=True)
class IkeHeader:
    """RFC 7296 §3.1 IKE header as on the wire (major version is always 2)."""

    spi_i: bytes
    spi_r: bytes
    next_payload: int
    exchange_type: int
    message_id: int
    length: int
    initiator: bool = False
    response: bool = False
    higher_version: bool = False  # the V flag
    minor_version: int = 0

    def encode(self) -> bytes:
        if len(self.spi_i) != 8 or len(self.spi_r) != 8:
            raise ValueError("IKE SPIs are 8 octets")
        if not 0 <= self.minor_version <= 15:
            raise ValueError("minor version is 4 bits")
        flags = (
            (_INITIATOR if self.initiator else 0)
            | (_VERSION if self.higher_version else 0)
            | (_RESPONSE if self.response else 0)
        )
        version = IKE_MAJOR_VERSION << 4 | self.minor_version
        try:
            return _HDR.pack(
                self.spi_i,
                self.spi_r,
                self.next_payload,
                version,
                self.exchange_type,
                flags,
                self.message_id,
                self.length,
            )
        except struct.error as e:
            raise ValueError(f"IKE header field out of range: {e}") from None


@dataclass(frozen=True)
class Message:
    """An IKEv2 message: header fields (Next Payload and Length derive from ``payloads``)."""

    spi_i: bytes
    spi_r: bytes
    exchange_type: int
    message_id: int
    payloads: tuple[Payload, ...] = ()
    initiator: bool = False
    response: bool = False
    higher_version: bool = False
    minor_version: int = 0


def decode_header(data: bytes | bytearray | memoryview) -> IkeHeader:
    """Parse the 28-octet IKE header at the start of ``data`` (payloads are not looked at).

    Checks the major version and that Length covers at least the header; whether Length
    matches the datagram is decode_message's check.
    """
    if len(data) < IKE_HEADER_LEN:
        raise syntax_error("shorter than an IKE header")
    spi_i, spi_r, nxt, version, xchg, flags, mid, length = _HDR.unpack_from(data)
    if version >> 4 != IKE_MAJOR_VERSION:
        raise IkeDecodeError(
            NotifyType.INVALID_MAJOR_VERSION, f"IKE major version {version >> 4}, not 2"
        )
    if length < IKE_HEADER_LEN:
        raise syntax_error("IKE header Length below 28")
    return IkeHeader(
        spi_i,
        spi_r,
        nxt,
        xchg,
        mid,
        length,
        initiator=bool(flags & _INITIATOR),
        response=bool(flags & _RESPONSE),
        higher_version=bool(flags & _VERSION),
        minor_version=version & 0x0F,
    )


def decode_payloads(first_type: int, data: bytes | bytearray | memoryview) -> list[Payload]:
    """Walk a Next Payload chain that starts with ``first_type`` and must fill ``data`` exactly."""
    buf = bytes(data)
    out: list[Payload] = []
    ptype, off, n = first_type, 0, len(buf)
    while ptype != PayloadType.NONE:
        if len(out) >= MAX_PAYLOADS:
            raise syntax_error(f"more than {MAX_PAYLOADS} payloads")
        if n - off < GENERIC_HEADER_LEN:
            raise syntax_error(f"payload {ptype}: truncated generic payload header")
        nxt, flags, plen = _GENERIC.unpack_from(buf, off)
        if plen < GENERIC_HEADER_LEN or plen > n - off:
            raise syntax_error(f"payload {ptype}: Payload Length {plen} does not fit")
        critical = bool(flags & _CRITICAL)
        body = buf[off + GENERIC_HEADER_LEN : off + plen]
        off += plen
        decoder = DECODERS.get(ptype)
        if decoder is not None:
            out.append(decoder(body, critical, nxt))
        elif critical:
            raise IkeDecodeError(
                NotifyType.UNSUPPORTED_CRITICAL_PAYLOAD,
                f"unsupported critical payload type {ptype}",
                bytes((ptype,)),
            )
        else:
            out.append(UnknownPayload(ptype, False, body))
        if ptype in _SEALED:
            if off != n:
                raise syntax_error("data after the Encrypted payload")
            return out
        ptype = nxt
    if off != n:
        raise syntax_error("data after the last payload")
    return out


def decode_message(data: bytes | bytearray | memoryview) -> Message:
    """Decode one IKEv2 message; raise IkeDecodeError (only) if it is malformed."""
    hdr = decode_header(data)
    if hdr.length != len(data):
        raise syntax_error(f"IKE header Length {hdr.length} but {len(data)} octets received")
    try:
        payloads = decode_payloads(hdr.next_payload, bytes(data[IKE_HEADER_LEN:]))
    except IkeDecodeError as e:
        e.header = hdr
        raise
    return Message(
        hdr.spi_i,
        hdr.spi_r,
        hdr.exchange_type,
        hdr.message_id,
        tuple(payloads),
        hdr.initiator,
        hdr.response,
        hdr.higher_version,
        hdr.minor_version,
    )


def encode_payloads(payloads: Sequence[Payload]) -> tuple[int, bytes]:
    """Chain ``payloads``; return (type of the first payload, or 0 if none, and the bytes).

    Raises ValueError for what the wire format cannot carry (or decode_payloads would reject).
    """
    if len(payloads) > MAX_PAYLOADS:
        raise ValueError(f"more than {MAX_PAYLOADS} payloads")
    parts: list[bytes] = []
    last = len(payloads) - 1
    for i, p in enumerate(payloads):
        if isinstance(p, SK | SKF):
            if i != last:
                raise ValueError("an SK / SKF payload must be the last payload")
            nxt = p.next_payload
        else:
            nxt = payloads[i + 1].payload_type if i != last else PayloadType.NONE
        if isinstance(p, UnknownPayload) and (
            p.payload_type in DECODERS or p.payload_type == PayloadType.NONE
        ):
            raise ValueError(f"payload type {p.payload_type} has its own class")
        try:
            body = p.encode_body()
            parts.append(
                _GENERIC.pack(nxt, _CRITICAL if p.critical else 0, GENERIC_HEADER_LEN + len(body))
            )
        except struct.error as e:
            raise ValueError(f"{type(p).__name__}: field out of range: {e}") from None
        parts.append(body)
    first = payloads[0].payload_type if payloads else PayloadType.NONE
    return int(first), b"".join(parts)


def encode_message(msg: Message) -> bytes:
    """Encode ``msg``, computing the header's Next Payload and Length."""
    first, body = encode_payloads(msg.payloads)
    hdr = IkeHeader(
        msg.spi_i,
        msg.spi_r,
        first,
        msg.exchange_type,
        msg.message_id,
        IKE_HEADER_LEN + len(body),
        msg.initiator,
        msg.response,
        msg.higher_version,
        msg.minor_version,
    )
    return hdr.encode() + body


def error_notify(e: IkeDecodeError) -> Notify:
    """The Notify that answers a request the codec rejected (RFC 7296 §2.5, §3.10.1):
    UNSUPPORTED_CRITICAL_PAYLOAD with the one-octet payload type, else INVALID_SYNTAX.
    (INVALID_MAJOR_VERSION has its own answer, :func:`version_answer`.)"""
    if e.notify_type == NotifyType.UNSUPPORTED_CRITICAL_PAYLOAD:
        return Notify(NotifyType.UNSUPPORTED_CRITICAL_PAYLOAD, e.data)
    return Notify(NotifyType.INVALID_SYNTAX)


def version_answer(data: bytes | bytearray | memoryview) -> bytes | None:
    """RFC 7296 §2.5: a request with a higher major version is dropped and SHOULD be answered
    with an unauthenticated N(INVALID_MAJOR_VERSION); the version we support (2.0) is in the
    answer's header (§3.10.1). Like the other one-way answers of §1.5 it goes back with the
    request's SPIs, exchange type and Message ID, the Response flag set and the Initiator flag
    the opposite of the request's. None for anything else: a response, major version 2 or
    lower (IKEv1 is not answered), and what does not look like an IKE header at all (fewer
    than 28 octets, a Length field other than the datagram's, a zero SPIi), so that random
    datagrams are not answered."""
    if len(data) < IKE_HEADER_LEN:
        return None
    spi_i, spi_r, _nxt, version, xchg, flags, mid, length = _HDR.unpack_from(data)
    if version >> 4 <= IKE_MAJOR_VERSION or flags & HeaderFlag.RESPONSE:
        return None
    if length != len(data) or spi_i == bytes(8):
        return None
    answer = Message(
        spi_i,
        spi_r,
        xchg,
        mid,
        (Notify(NotifyType.INVALID_MAJOR_VERSION),),
        initiator=not flags & HeaderFlag.INITIATOR,
        response=True,
    )
    return encode_message(answer)
