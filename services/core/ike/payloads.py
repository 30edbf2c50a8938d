"""IKEv2 payload bodies, RFC 7296 §3.3-§3.16 and RFC 7383 §2.5 (SKF): dataclasses and codecs.

Each payload class knows its Payload Type and how to encode / decode the bytes that follow the
generic payload header (§3.2); chaining, the header and the Next Payload walk are in
services.core.ike.message. Decoding is structural: every length and count is checked against
the buffer it claims to describe and anything inconsistent raises IkeDecodeError carrying the
Notify type a responder would answer with. Semantic rules (proposal numbering, nonce size, which
payloads an exchange needs) belong to the exchange logic, not to the codec.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Self

from services.core.ike.constants import NotifyType, PayloadType, TransformAttr, TsType

if TYPE_CHECKING:
    from services.core.ike.message import IkeHeader

MAX_PAYLOADS = 256  # per payload chain (a message, or the inner payloads of SK)
MAX_PROPOSALS = 256  # per SA payload
MAX_ATTRIBUTES = 256  # per transform, per CP payload
# Transforms per proposal are bounded by the one-octet Num Transforms field (255).

_PROP = struct.Struct("!BBHBBBB")  # last, reserved, length, num, protocol, SPI size, #transforms
_TRANS = struct.Struct("!BBHBBH")  # last, reserved, length, type, reserved, transform ID
_ATTR = struct.Struct("!HH")  # AF|type, length-or-value
_HH = struct.Struct("!HH")
_BBH = struct.Struct("!BBH")
_TS = struct.Struct("!BBHHH")  # TS type, IP protocol, selector length, start port, end port

_LAST_PROPOSAL, _MORE_PROPOSALS = 0, 2  # RFC 7296 §3.3.1 Last Substruc
_LAST_TRANSFORM, _MORE_TRANSFORMS = 0, 3  # RFC 7296 §3.3.2 Last Substruc
_AF_TV = 0x8000  # RFC 7296 §3.3.5 Attribute Format bit
_TS_LEN = {TsType.TS_IPV4_ADDR_RANGE: 16, TsType.TS_IPV6_ADDR_RANGE: 40}


class IkeDecodeError(ValueError):
    """A received IKE message (or payload chain) is malformed.

    ``notify_type`` is the error Notify the responder should answer with (RFC 7296 §3.10.1:
    INVALID_SYNTAX, UNSUPPORTED_CRITICAL_PAYLOAD or INVALID_MAJOR_VERSION) and ``data`` its
    Notification Data (the one-octet payload type for UNSUPPORTED_CRITICAL_PAYLOAD). ``header``
    is the message's IKE header when it was itself well formed (so a reply can be addressed).
    ``authenticated``: the error is in payloads that were inside an Encrypted payload whose
    integrity check passed (RFC 7296 §3.10.1: only then may INVALID_SYNTAX be answered).
    """

    def __init__(self, notify_type: int, message: str, data: bytes = b"") -> None:
        super().__init__(message)
        self.notify_type = notify_type
        self.data = data
        self.header: IkeHeader | None = None
        self.authenticated = False


def syntax_error(message: str) -> IkeDecodeError:
    return IkeDecodeError(NotifyType.INVALID_SYNTAX, message)


def _need(body: bytes, n: int, what: str) -> None:
    if len(body) < n:
        raise syntax_error(f"{what} payload body shorter than {n} octets")


def _check(ok: bool, message: str) -> None:
    """Encoder-side validation (the caller built something the wire format cannot carry)."""
    if not ok:
        raise ValueError(message)


# --- SA payload substructures (§3.3) -----------------------------------------------------------


@dataclass(frozen=True)
class TransformAttribute:
    """RFC 7296 §3.3.5 attribute: TV format (AF=1) when ``value`` is an int, else TLV."""

    attr_type: int
    value: int | bytes

    @classmethod
    def key_length(cls, bits: int) -> TransformAttribute:
        return cls(TransformAttr.KEY_LENGTH, bits)

    def encode(self) -> bytes:
        _check(0 <= self.attr_type <= 0x7FFF, "attribute type must fit 15 bits")
        if isinstance(self.value, int):
            return _ATTR.pack(_AF_TV | self.attr_type, self.value)
        return _ATTR.pack(self.attr_type, len(self.value)) + self.value


@dataclass(frozen=True)
class Transform:
    """RFC 7296 §3.3.2 Transform Substructure."""

    transform_type: int
    transform_id: int
    attributes: tuple[TransformAttribute, ...] = ()

    @property
    def key_length(self) -> int | None:
        """The Key Length attribute (bits), if present in TV form."""
        for a in self.attributes:
            if a.attr_type == TransformAttr.KEY_LENGTH and isinstance(a.value, int):
                return a.value
        return None

    def encode(self, last: bool) -> bytes:
        _check(len(self.attributes) <= MAX_ATTRIBUTES, "too many transform attributes")
        attrs = b"".join(a.encode() for a in self.attributes)
        marker = _LAST_TRANSFORM if last else _MORE_TRANSFORMS
        hdr = _TRANS.pack(marker, 0, 8 + len(attrs), self.transform_type, 0, self.transform_id)
        return hdr + attrs


@dataclass(frozen=True)
class Proposal:
    """RFC 7296 §3.3.1 Proposal Substructure (``spi`` is empty in IKE_SA_INIT)."""

    number: int
    protocol_id: int
    transforms: tuple[Transform, ...]
    spi: bytes = b""

    def encode(self, last: bool) -> bytes:
        n = len(self.transforms)
        _check(n <= 255, "at most 255 transforms per proposal")
        body = b"".join(t.encode(i == n - 1) for i, t in enumerate(self.transforms))
        marker = _LAST_PROPOSAL if last else _MORE_PROPOSALS
        length = 8 + len(self.spi) + len(body)
        hdr = _PROP.pack(marker, 0, length, self.number, self.protocol_id, len(self.spi), n)
        return hdr + self.spi + body


def _decode_attributes(buf: bytes, off: int, end: int) -> tuple[TransformAttribute, ...]:
    out: list[TransformAttribute] = []
    while off < end:
        if len(out) >= MAX_ATTRIBUTES:
            raise syntax_error("too many transform attributes")
        if end - off < 4:
            raise syntax_error("truncated transform attribute")
        atype, lv = _ATTR.unpack_from(buf, off)
        off += 4
        if atype & _AF_TV:
            out.append(TransformAttribute(atype & 0x7FFF, lv))
        else:
            if lv > end - off:
                raise syntax_error("transform attribute overruns its transform")
            out.append(TransformAttribute(atype, buf[off : off + lv]))
            off += lv
    return tuple(out)


def _decode_transforms(buf: bytes, off: int, end: int, count: int) -> tuple[Transform, ...]:
    out: list[Transform] = []
    while off < end:
        if len(out) >= count:
            raise syntax_error("more transforms than Num Transforms")
        if end - off < 8:
            raise syntax_error("truncated transform substructure")
        marker, _, tlen, ttype, _, tid = _TRANS.unpack_from(buf, off)
        tend = off + tlen
        if tlen < 8 or tend > end:
            raise syntax_error("bad transform length")
        if marker not in (_LAST_TRANSFORM, _MORE_TRANSFORMS) or (
            (marker == _LAST_TRANSFORM) != (tend == end)
        ):
            raise syntax_error("transform Last Substruc does not match its position")
        out.append(Transform(ttype, tid, _decode_attributes(buf, off + 8, tend)))
        off = tend
    if len(out) != count:
        raise syntax_error("fewer transforms than Num Transforms")
    return tuple(out)


# --- payloads ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SA:
    """RFC 7296 §3.3 Security Association payload (one or more proposals)."""

    payload_type: ClassVar[int] = PayloadType.SA
    proposals: tuple[Proposal, ...]
    critical: bool = field(default=False, kw_only=True)

    def encode_body(self) -> bytes:
        n = len(self.proposals)
        _check(1 <= n <= MAX_PROPOSALS, f"an SA payload holds 1..{MAX_PROPOSALS} proposals")
        return b"".join(p.encode(i == n - 1) for i, p in enumerate(self.proposals))

    @classmethod
    def decode_body(cls, body: bytes, critical: bool, next_payload: int) -> Self:
        props: list[Proposal] = []
        off, n = 0, len(body)
        while off < n:
            if len(props) >= MAX_PROPOSALS:
                raise syntax_error("too many proposals")
            if n - off < 8:
                raise syntax_error("truncated proposal substructure")
            marker, _, plen, num, proto, spi_size, ntrans = _PROP.unpack_from(body, off)
            end = off + plen
            if plen < 8 + spi_size or end > n:
                raise syntax_error("bad proposal length")
            if marker not in (_LAST_PROPOSAL, _MORE_PROPOSALS) or (
                (marker == _LAST_PROPOSAL) != (end == n)
            ):
                raise syntax_error("proposal Last Substruc does not match its position")
            start = off + 8 + spi_size
            transforms = _decode_transforms(body, start, end, ntrans)
            props.append(Proposal(num, proto, transforms, body[off + 8 : start]))
            off = end
        if not props:
            raise syntax_error("SA payload without proposals")
        return cls(tuple(props), critical=critical)


@dataclass(frozen=True)
class KE:
    """RFC 7296 §3.4 Key Exchange payload."""

    payload_type: ClassVar[int] = PayloadType.KE
    dh_group: int
    data: bytes
    critical: bool = field(default=False, kw_only=True)

    def encode_body(self) -> bytes:
        return _HH.pack(self.dh_group, 0) + self.data

    @classmethod
    def decode_body(cls, body: bytes, critical: bool, next_payload: int) -> Self:
        _need(body, 4, "KE")
        return cls(_HH.unpack_from(body)[0], body[4:], critical=critical)


@dataclass(frozen=True)
class _Identification:
    """RFC 7296 §3.5 Identification payload (IDi / IDr); ``data`` as sent."""

    payload_type: ClassVar[int]
    id_type: int
    data: bytes
    critical: bool = field(default=False, kw_only=True)

    def encode_body(self) -> bytes:
        return bytes((self.id_type, 0, 0, 0)) + self.data

    @classmethod
    def decode_body(cls, body: bytes, critical: bool, next_payload: int) -> Self:
        _need(body, 4, "ID")
        return cls(body[0], body[4:], critical=critical)


@dataclass(frozen=True)
class IDi(_Identification):
    """RFC 7296 §3.5 Identification - Initiator."""

    payload_type: ClassVar[int] = PayloadType.IDi


@dataclass(frozen=True)
class IDr(_Identification):
    """RFC 7296 §3.5 Identification - Responder."""

    payload_type: ClassVar[int] = PayloadType.IDr


@dataclass(frozen=True)
class _EncodingAndData:
    payload_type: ClassVar[int]
    encoding: int
    data: bytes
    critical: bool = field(default=False, kw_only=True)

    def encode_body(self) -> bytes:
        return bytes((self.encoding,)) + self.data

    @classmethod
    def decode_body(cls, body: bytes, critical: bool, next_payload: int) -> Self:
        _need(body, 1, "CERT/CERTREQ")
        return cls(body[0], body[1:], critical=critical)


@dataclass(frozen=True)
class Cert(_EncodingAndData):
    """RFC 7296 §3.6 Certificate payload."""

    payload_type: ClassVar[int] = PayloadType.CERT


@dataclass(frozen=True)
class CertReq(_EncodingAndData):
    """RFC 7296 §3.7 Certificate Request payload (``data``: Certification Authority)."""

    payload_type: ClassVar[int] = PayloadType.CERTREQ


@dataclass(frozen=True)
class Auth:
    """RFC 7296 §3.8 Authentication payload."""

    payload_type: ClassVar[int] = PayloadType.AUTH
    method: int
    data: bytes
    critical: bool = field(default=False, kw_only=True)

    def encode_body(self) -> bytes:
        return bytes((self.method, 0, 0, 0)) + self.data

    @classmethod
    def decode_body(cls, body: bytes, critical: bool, next_payload: int) -> Self:
        _need(body, 4, "AUTH")
        return cls(body[0], body[4:], critical=critical)


@dataclass(frozen=True)
class _Opaque:
    payload_type: ClassVar[int]
    data: bytes
    critical: bool = field(default=False, kw_only=True)

    def encode_body(self) -> bytes:
        return self.data

    @classmethod
    def decode_body(cls, body: bytes, critical: bool, next_payload: int) -> Self:
        return cls(body, critical=critical)


@dataclass(frozen=True)
class Nonce(_Opaque):
    """RFC 7296 §3.9 Nonce payload (16..256 octets is the exchange layer's check)."""

    payload_type: ClassVar[int] = PayloadType.NONCE


@dataclass(frozen=True)
class VendorId(_Opaque):
    """RFC 7296 §3.12 Vendor ID payload."""

    payload_type: ClassVar[int] = PayloadType.VENDOR_ID


@dataclass(frozen=True)
class EAP(_Opaque):
    """RFC 7296 §3.16 EAP payload: the EAP message (RFC 3748), undissected."""

    payload_type: ClassVar[int] = PayloadType.EAP


@dataclass(frozen=True)
class Notify:
    """RFC 7296 §3.10 Notify payload."""

    payload_type: ClassVar[int] = PayloadType.NOTIFY
    notify_type: int
    data: bytes = b""
    protocol_id: int = 0
    spi: bytes = b""
    critical: bool = field(default=False, kw_only=True)

    def encode_body(self) -> bytes:
        return _BBH.pack(self.protocol_id, len(self.spi), self.notify_type) + self.spi + self.data

    @classmethod
    def decode_body(cls, body: bytes, critical: bool, next_payload: int) -> Self:
        _need(body, 4, "Notify")
        proto, spi_size, ntype = _BBH.unpack_from(body)
        if 4 + spi_size > len(body):
            raise syntax_error("Notify SPI overruns the payload")
        return cls(ntype, body[4 + spi_size :], proto, body[4 : 4 + spi_size], critical=critical)


@dataclass(frozen=True)
class Delete:
    """RFC 7296 §3.11 Delete payload (IKE SA: protocol IKE, SPI size 0, no SPIs)."""

    payload_type: ClassVar[int] = PayloadType.DELETE
    protocol_id: int
    spi_size: int = 0
    spis: tuple[bytes, ...] = ()
    critical: bool = field(default=False, kw_only=True)

    def encode_body(self) -> bytes:
        _check(all(len(s) == self.spi_size for s in self.spis), "every SPI must be spi_size long")
        _check(self.spi_size > 0 or not self.spis, "SPIs need a non-zero spi_size")
        hdr = _BBH.pack(self.protocol_id, self.spi_size, len(self.spis))
        return hdr + b"".join(self.spis)

    @classmethod
    def decode_body(cls, body: bytes, critical: bool, next_payload: int) -> Self:
        _need(body, 4, "Delete")
        proto, size, num = _BBH.unpack_from(body)
        if size == 0 and num:
            raise syntax_error("Delete lists SPIs of size zero")
        if len(body) != 4 + size * num:
            raise syntax_error("Delete payload length does not match SPI size x Num of SPIs")
        spis = tuple(body[i : i + size] for i in range(4, len(body), size)) if size else ()
        return cls(proto, size, spis, critical=critical)


@dataclass(frozen=True)
class TrafficSelector:
    """RFC 7296 §3.13.1 TS_IPV4_ADDR_RANGE / TS_IPV6_ADDR_RANGE (by address length 4 / 16)."""

    ip_protocol: int
    start_port: int
    end_port: int
    start_address: bytes
    end_address: bytes

    @property
    def ts_type(self) -> TsType:
        if len(self.start_address) == 4:
            return TsType.TS_IPV4_ADDR_RANGE
        return TsType.TS_IPV6_ADDR_RANGE

    def encode(self) -> bytes:
        alen = len(self.start_address)
        _check(alen in (4, 16) and len(self.end_address) == alen, "addresses: 4 or 16 octets")
        ts_type = self.ts_type
        hdr = _TS.pack(ts_type, self.ip_protocol, _TS_LEN[ts_type], self.start_port, self.end_port)
        return hdr + self.start_address + self.end_address


@dataclass(frozen=True)
class RawTrafficSelector:
    """A traffic selector of another type (e.g. RFC 4595 FC, RFC 9478 security label).

    ``second_octet`` is octet 1 of the selector (IP Protocol ID, or reserved); ``data`` is what
    follows the 4-octet type/length header.
    """

    ts_type: int
    second_octet: int
    data: bytes

    def encode(self) -> bytes:
        _check(self.ts_type not in _TS_LEN, "use TrafficSelector for IPv4 / IPv6 ranges")
        return _BBH.pack(self.ts_type, self.second_octet, 4 + len(self.data)) + self.data


Selector = TrafficSelector | RawTrafficSelector


@dataclass(frozen=True)
class _TrafficSelectors:
    payload_type: ClassVar[int]
    selectors: tuple[Selector, ...]
    critical: bool = field(default=False, kw_only=True)

    def encode_body(self) -> bytes:
        _check(len(self.selectors) <= 255, "at most 255 traffic selectors")
        return bytes((len(self.selectors), 0, 0, 0)) + b"".join(s.encode() for s in self.selectors)

    @classmethod
    def decode_body(cls, body: bytes, critical: bool, next_payload: int) -> Self:
        _need(body, 4, "TS")
        out: list[Selector] = []
        off, n = 4, len(body)
        for _ in range(body[0]):
            if n - off < 4:
                raise syntax_error("truncated traffic selector")
            ts_type, second, slen = _BBH.unpack_from(body, off)
            if slen < 4 or off + slen > n:
                raise syntax_error("bad traffic selector length")
            want = _TS_LEN.get(ts_type)
            if want is None:
                out.append(RawTrafficSelector(ts_type, second, body[off + 4 : off + slen]))
            elif slen != want:
                raise syntax_error(f"TS type {ts_type} must be {want} octets")
            else:
                _, proto, _, sport, eport = _TS.unpack_from(body, off)
                alen = (want - 8) // 2
                a = off + 8
                sel = TrafficSelector(
                    proto, sport, eport, body[a : a + alen], body[a + alen : a + 2 * alen]
                )
                out.append(sel)
            off += slen
        if off != n:
            raise syntax_error("TS payload longer than its Number of TSs")
        return cls(tuple(out), critical=critical)


@dataclass(frozen=True)
class TSi(_TrafficSelectors):
    """RFC 7296 §3.13 Traffic Selector - Initiator."""

    payload_type: ClassVar[int] = PayloadType.TSi


@dataclass(frozen=True)
class TSr(_TrafficSelectors):
    """RFC 7296 §3.13 Traffic Selector - Responder."""

    payload_type: ClassVar[int] = PayloadType.TSr


@dataclass(frozen=True)
class SK:
    """RFC 7296 §3.14 Encrypted and Authenticated payload, still sealed.

    ``next_payload`` is the type of the first inner payload; ``data`` is IV || ciphertext ||
    ICV exactly as on the wire (decryption and its length rules are the crypto layer's job).
    """

    payload_type: ClassVar[int] = PayloadType.SK
    next_payload: int
    data: bytes
    critical: bool = field(default=False, kw_only=True)

    def encode_body(self) -> bytes:
        return self.data

    @classmethod
    def decode_body(cls, body: bytes, critical: bool, next_payload: int) -> Self:
        return cls(next_payload, body, critical=critical)


@dataclass(frozen=True)
class SKF:
    """RFC 7383 §2.5 Encrypted Fragment payload, still sealed.

    ``next_payload`` is the first inner payload type in fragment 1 and zero in the others.
    """

    payload_type: ClassVar[int] = PayloadType.SKF
    fragment_number: int
    total_fragments: int
    next_payload: int
    data: bytes
    critical: bool = field(default=False, kw_only=True)

    def encode_body(self) -> bytes:
        return _HH.pack(self.fragment_number, self.total_fragments) + self.data

    @classmethod
    def decode_body(cls, body: bytes, critical: bool, next_payload: int) -> Self:
        _need(body, 4, "SKF")
        number, total = _HH.unpack_from(body)
        if not 1 <= number <= total:
            raise syntax_error("SKF Fragment Number not in 1..Total Fragments")
        return cls(number, total, next_payload, body[4:], critical=critical)


@dataclass(frozen=True)
class ConfigAttribute:
    """RFC 7296 §3.15.1 Configuration Attribute."""

    attr_type: int
    value: bytes = b""

    def encode(self) -> bytes:
        _check(0 <= self.attr_type <= 0x7FFF, "attribute type must fit 15 bits")
        return _HH.pack(self.attr_type, len(self.value)) + self.value


@dataclass(frozen=True)
class CP:
    """RFC 7296 §3.15 Configuration payload."""

    payload_type: ClassVar[int] = PayloadType.CP
    cfg_type: int
    attributes: tuple[ConfigAttribute, ...] = ()
    critical: bool = field(default=False, kw_only=True)

    def encode_body(self) -> bytes:
        _check(len(self.attributes) <= MAX_ATTRIBUTES, "too many configuration attributes")
        attrs = b"".join(a.encode() for a in self.attributes)
        return bytes((self.cfg_type, 0, 0, 0)) + attrs

    @classmethod
    def decode_body(cls, body: bytes, critical: bool, next_payload: int) -> Self:
        _need(body, 4, "CP")
        out: list[ConfigAttribute] = []
        off, n = 4, len(body)
        while off < n:
            if len(out) >= MAX_ATTRIBUTES:
                raise syntax_error("too many configuration attributes")
            if n - off < 4:
                raise syntax_error("truncated configuration attribute")
            atype, alen = _HH.unpack_from(body, off)
            if alen > n - off - 4:
                raise syntax_error("configuration attribute overruns the payload")
            out.append(ConfigAttribute(atype & 0x7FFF, body[off + 4 : off + 4 + alen]))
            off += 4 + alen
        return cls(body[0], tuple(out), critical=critical)


@dataclass(frozen=True)
class UnknownPayload:
    """A payload of a type this codec does not dissect (non-critical, or built to be sent)."""

    payload_type: int
    critical: bool
    body: bytes

    def encode_body(self) -> bytes:
        return self.body


Payload = (
    SA
    | KE
    | IDi
    | IDr
    | Cert
    | CertReq
    | Auth
    | Nonce
    | Notify
    | Delete
    | VendorId
    | TSi
    | TSr
    | SK
    | SKF
    | CP
    | EAP
    | UnknownPayload
)

_DISSECTED = (SA, KE, IDi, IDr, Cert, CertReq, Auth, Nonce, Notify, Delete, VendorId, TSi, TSr)
DECODERS: dict[int, Callable[[bytes, bool, int], Payload]] = {
    cls.payload_type: cls.decode_body for cls in (*_DISSECTED, SK, SKF, CP, EAP)
}
"""Payload types this codec dissects, with their body decoders."""
