"""IKEv2 identities and the authentication seam: RFC 7296 §2.15 (signed octets, PSK AUTH), §3.5.

Both exchange roles authenticate through two small interfaces, so the method (pre-shared key
here; certificates in :mod:`services.core.ike.certauth`) is chosen by configuration and never by
the state machines:

* :class:`LocalAuth` produces our AUTH payload over the signed octets (§2.15: RealMessage |
  peer's Nonce | prf(SK_p, ID')) and the CERT payloads that go with it;
* :class:`PeerAuth` verifies the peer's AUTH (and, for certificates, the chain and that the
  identity is bound to the certificate), raising :class:`AuthFailure` with a reason an
  administrator can act on. It also says which CERTREQ payloads and RFC 7427
  SIGNATURE_HASH_ALGORITHMS to announce.

:class:`Identity` is an ID payload's type and data (§3.5) with the usual text forms: an IPv4 or
IPv6 address, ``@fqdn`` or a bare host name (ID_FQDN), ``user@domain`` (ID_RFC822_ADDR),
``@#hex`` (ID_KEY_ID) and an X.501 distinguished name written most significant RDN first as
strongSwan does (``C=CH, O=Example, CN=moon``; ID_DER_ASN1_DN). Distinguished names compare by
attribute type and value, ignoring case and string types, like strongSwan's DN matching.
"""

from __future__ import annotations

import hmac
import ipaddress
from dataclasses import dataclass, field
from typing import Protocol

from cryptography import x509
from cryptography.x509.oid import NameOID

from services.core.ike.constants import AuthMethod, IdType, NotifyType
from services.core.ike.message import Auth, Cert, CertReq, Notify, Payload
from services.core.ike.prf import PrfLike, prf

__all__ = [
    "KEY_PAD",
    "AuthFailure",
    "Identity",
    "LocalAuth",
    "PeerAuth",
    "PskAuth",
    "hash_algorithms_notify",
    "peer_hash_algorithms",
    "signed_octets",
]

KEY_PAD = b"Key Pad for IKEv2"  # RFC 7296 §2.15
MAX_ID_LEN = 1024  # octets of identity data we accept in configuration

_DN_ATTRS: dict[str, x509.ObjectIdentifier] = {
    "C": NameOID.COUNTRY_NAME,
    "ST": NameOID.STATE_OR_PROVINCE_NAME,
    "S": NameOID.STATE_OR_PROVINCE_NAME,
    "L": NameOID.LOCALITY_NAME,
    "O": NameOID.ORGANIZATION_NAME,
    "OU": NameOID.ORGANIZATIONAL_UNIT_NAME,
    "CN": NameOID.COMMON_NAME,
    "E": NameOID.EMAIL_ADDRESS,
    "EMAIL": NameOID.EMAIL_ADDRESS,
    "EMAILADDRESS": NameOID.EMAIL_ADDRESS,
    "DC": NameOID.DOMAIN_COMPONENT,
    "UID": NameOID.USER_ID,
    "SN": NameOID.SURNAME,
    "SERIALNUMBER": NameOID.SERIAL_NUMBER,
    "T": NameOID.TITLE,
    "G": NameOID.GIVEN_NAME,
}
_DN_NAMES = {
    NameOID.COUNTRY_NAME: "C",
    NameOID.STATE_OR_PROVINCE_NAME: "ST",
    NameOID.LOCALITY_NAME: "L",
    NameOID.ORGANIZATION_NAME: "O",
    NameOID.ORGANIZATIONAL_UNIT_NAME: "OU",
    NameOID.COMMON_NAME: "CN",
    NameOID.EMAIL_ADDRESS: "E",
    NameOID.DOMAIN_COMPONENT: "DC",
    NameOID.USER_ID: "UID",
    NameOID.SURNAME: "SN",
    NameOID.SERIAL_NUMBER: "serialNumber",
    NameOID.TITLE: "T",
    NameOID.GIVEN_NAME: "G",
}


class AuthFailure(Exception):
    """The peer did not authenticate; ``str()`` is a reason for an administrator (no secrets)."""


def _split_dn(text: str) -> list[str]:
    parts: list[str] = []
    cur: list[str] = []
    escaped = False
    for ch in text:
        if escaped:
            cur.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch in ",/":
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def parse_dn(text: str) -> x509.Name:
    """``C=CH, O=Example, CN=moon`` (most significant first) -> an X.501 Name; ValueError if bad."""
    attrs: list[x509.NameAttribute[str]] = []
    for part in _split_dn(text):
        key, sep, value = part.partition("=")
        oid = _DN_ATTRS.get(key.strip().upper())
        if not sep or oid is None or not value.strip():
            raise ValueError(f"not a distinguished-name attribute: {part[:40]!r}")
        attrs.append(x509.NameAttribute(oid, value.strip()))
    if not attrs:
        raise ValueError("empty distinguished name")
    return x509.Name(attrs)


def dn_text(name: x509.Name) -> str:
    """An X.501 Name in strongSwan's order and notation (``C=CH, O=Example, CN=moon``)."""
    out = []
    for rdn in name.rdns:
        for a in rdn:
            label = _DN_NAMES.get(a.oid, a.oid.dotted_string)
            value = a.value if isinstance(a.value, str) else a.value.hex()
            out.append(f"{label}={value}")
    return ", ".join(out)


def _dn_key(der: bytes) -> tuple[tuple[str, str], ...] | None:
    try:
        name = _parse_name_der(der)
    except ValueError:
        return None
    key: list[tuple[str, str]] = []
    for rdn in name.rdns:
        for a in rdn:
            value = a.value if isinstance(a.value, str) else a.value.hex()
            key.append((a.oid.dotted_string, " ".join(value.split()).casefold()))
    return tuple(key)


def _der_len(buf: bytes, off: int) -> tuple[int, int]:
    if off >= len(buf):
        raise ValueError("truncated DER")
    first = buf[off]
    off += 1
    if first < 0x80:
        return first, off
    n = first & 0x7F
    if n == 0 or n > 4 or off + n > len(buf):
        raise ValueError("bad DER length")
    return int.from_bytes(buf[off : off + n], "big"), off + n


def _der_tlv(buf: bytes, off: int) -> tuple[int, bytes, int]:
    if off >= len(buf):
        raise ValueError("truncated DER")
    tag = buf[off]
    length, start = _der_len(buf, off + 1)
    end = start + length
    if end > len(buf):
        raise ValueError("truncated DER")
    return tag, buf[start:end], end


def _oid_from_der(body: bytes) -> x509.ObjectIdentifier:
    if not body:
        raise ValueError("empty OID")
    arcs = [body[0] // 40 if body[0] < 80 else 2, body[0] % 40 if body[0] < 80 else body[0] - 80]
    value = 0
    for b in body[1:]:
        value = (value << 7) | (b & 0x7F)
        if not b & 0x80:
            arcs.append(value)
            value = 0
    if body[-1] & 0x80:
        raise ValueError("truncated OID")
    return x509.ObjectIdentifier(".".join(str(a) for a in arcs))


_STRING_TAGS = {0x0C: "utf-8", 0x13: "ascii", 0x16: "ascii", 0x14: "latin-1", 0x1E: "utf-16-be"}


def _parse_name_der(der: bytes) -> x509.Name:
    """A DER Name (SEQUENCE OF SET OF AttributeTypeAndValue) -> x509.Name; ValueError if bad."""
    tag, body, end = _der_tlv(der, 0)
    if tag != 0x30 or end != len(der):
        raise ValueError("not a DER Name")
    rdns: list[x509.RelativeDistinguishedName] = []
    off = 0
    while off < len(body):
        tag, rdn_body, off = _der_tlv(body, off)
        if tag != 0x31:
            raise ValueError("RDN is not a SET")
        attrs: list[x509.NameAttribute[str]] = []
        roff = 0
        while roff < len(rdn_body):
            tag, atv, roff = _der_tlv(rdn_body, roff)
            if tag != 0x30:
                raise ValueError("attribute is not a SEQUENCE")
            otag, oid_body, voff = _der_tlv(atv, 0)
            if otag != 0x06:
                raise ValueError("attribute type is not an OID")
            vtag, value, vend = _der_tlv(atv, voff)
            if vend != len(atv):
                raise ValueError("trailing octets in attribute")
            codec = _STRING_TAGS.get(vtag)
            text = value.decode(codec) if codec else value.hex()
            attrs.append(x509.NameAttribute(_oid_from_der(oid_body), text, _validate=False))
        if not attrs:
            raise ValueError("empty RDN")
        rdns.append(x509.RelativeDistinguishedName(attrs))
    return x509.Name(rdns)


@dataclass(frozen=True)
class Identity:
    """An IKEv2 identity (RFC 7296 §3.5): ID Type and the data as carried in the ID payload."""

    id_type: int
    data: bytes

    @classmethod
    def parse(cls, text: str) -> Identity:
        """Parse the text forms described in the module docstring; ValueError if invalid."""
        t = text.strip()
        if not t or len(t) > MAX_ID_LEN:
            raise ValueError("identity empty or too long")
        try:
            addr = ipaddress.ip_address(t)
        except ValueError:
            pass
        else:
            kind = IdType.ID_IPV4_ADDR if addr.version == 4 else IdType.ID_IPV6_ADDR
            return cls(kind, addr.packed)
        if t.startswith("@#"):
            return cls(IdType.ID_KEY_ID, bytes.fromhex(t[2:]))
        if t.startswith("@"):
            return cls(IdType.ID_FQDN, t[1:].encode("ascii"))
        if "=" in t:
            return cls(IdType.ID_DER_ASN1_DN, parse_dn(t).public_bytes())
        if "@" in t:
            return cls(IdType.ID_RFC822_ADDR, t.encode("ascii"))
        return cls(IdType.ID_FQDN, t.encode("ascii"))

    @classmethod
    def address(cls, packed: bytes) -> Identity:
        kind = IdType.ID_IPV4_ADDR if len(packed) == 4 else IdType.ID_IPV6_ADDR
        return cls(kind, packed)

    def body(self) -> bytes:
        """The ID payload body the AUTH covers (§2.15): type, three reserved octets, data."""
        return bytes((self.id_type, 0, 0, 0)) + self.data

    def matches(self, other: Identity) -> bool:
        """Same identity: DNs by attributes (case and string type ignored), FQDNs and mail
        addresses case-insensitively, everything else octet for octet."""
        if self.id_type != other.id_type:
            return False
        if self.id_type == IdType.ID_DER_ASN1_DN:
            mine = _dn_key(self.data)
            return mine is not None and mine == _dn_key(other.data)
        if self.id_type in (IdType.ID_FQDN, IdType.ID_RFC822_ADDR):
            return self.data.lower() == other.data.lower()
        return self.data == other.data

    def __str__(self) -> str:
        try:
            if self.id_type in (IdType.ID_IPV4_ADDR, IdType.ID_IPV6_ADDR):
                return str(ipaddress.ip_address(self.data))
            if self.id_type == IdType.ID_FQDN:
                return self.data.decode("ascii")
            if self.id_type == IdType.ID_RFC822_ADDR:
                return self.data.decode("ascii")
            if self.id_type == IdType.ID_KEY_ID:
                return "@#" + self.data.hex()
            if self.id_type == IdType.ID_DER_ASN1_DN:
                return dn_text(_parse_name_der(self.data))
        except ValueError:
            pass
        return f"id-type-{self.id_type}:{self.data[:32].hex()}"


def signed_octets(
    prf_alg: PrfLike, real_message: bytes, nonce: bytes, sk_p: bytes, id_body: bytes
) -> bytes:
    """RFC 7296 §2.15: RealMessage | peer's Nonce | prf(SK_p, ID'), the octets AUTH covers."""
    return real_message + nonce + prf(prf_alg, sk_p, id_body)


def hash_algorithms_notify(algs: frozenset[int]) -> tuple[Notify, ...]:
    """RFC 7427 §4: SIGNATURE_HASH_ALGORITHMS listing ``algs`` (nothing when empty)."""
    if not algs:
        return ()
    data = b"".join(a.to_bytes(2, "big") for a in sorted(algs))
    return (Notify(NotifyType.SIGNATURE_HASH_ALGORITHMS, data),)


def peer_hash_algorithms(payloads: tuple[Payload, ...]) -> frozenset[int]:
    """The hash algorithms a peer announced in IKE_SA_INIT (RFC 7427 §4); odd octets ignored."""
    for p in payloads:
        if isinstance(p, Notify) and p.notify_type == NotifyType.SIGNATURE_HASH_ALGORITHMS:
            d = p.data
            return frozenset(int.from_bytes(d[i : i + 2], "big") for i in range(0, len(d) - 1, 2))
    return frozenset()


class LocalAuth(Protocol):
    """How we prove our identity in IKE_AUTH."""

    def auth_payload(self, octets: bytes, prf_alg: PrfLike, peer_hashes: frozenset[int]) -> Auth:
        """Our AUTH over ``octets``; ``peer_hashes`` are the peer's RFC 7427 hash algorithms."""
        ...

    def cert_payloads(self) -> tuple[Cert, ...]:
        """CERT payloads to send before AUTH (end entity first); empty for PSK."""
        ...


class PeerAuth(Protocol):
    """How we check the peer's proof in IKE_AUTH."""

    def verify(
        self,
        auth: Auth,
        octets: bytes,
        prf_alg: PrfLike,
        peer_id: Identity,
        certs: tuple[Cert, ...],
        now: float,
    ) -> None:
        """Raise :class:`AuthFailure` unless ``auth`` proves ``peer_id``."""
        ...

    def cert_requests(self) -> tuple[CertReq, ...]:
        """CERTREQ payloads naming the CAs we trust; empty for PSK."""
        ...

    def hash_algorithms(self) -> frozenset[int]:
        """RFC 7427 hash algorithms we verify with (announced in SIGNATURE_HASH_ALGORITHMS)."""
        ...


@dataclass(frozen=True)
class PskAuth:
    """Pre-shared key authentication in both directions (RFC 7296 §2.15):
    AUTH = prf(prf(Shared Secret, "Key Pad for IKEv2"), <signed octets>)."""

    psk: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not self.psk:
            raise ValueError("empty pre-shared key")

    def mac(self, octets: bytes, prf_alg: PrfLike) -> bytes:
        return prf(prf_alg, prf(prf_alg, self.psk, KEY_PAD), octets)

    def auth_payload(self, octets: bytes, prf_alg: PrfLike, peer_hashes: frozenset[int]) -> Auth:
        return Auth(AuthMethod.SHARED_KEY_MIC, self.mac(octets, prf_alg))

    def cert_payloads(self) -> tuple[Cert, ...]:
        return ()

    def verify(
        self,
        auth: Auth,
        octets: bytes,
        prf_alg: PrfLike,
        peer_id: Identity,
        certs: tuple[Cert, ...],
        now: float,
    ) -> None:
        if auth.method != AuthMethod.SHARED_KEY_MIC:
            raise AuthFailure(f"peer used AUTH method {auth.method}, we expect a pre-shared key")
        if not hmac.compare_digest(self.mac(octets, prf_alg), auth.data):
            raise AuthFailure(f"AUTH does not verify for {peer_id} (wrong pre-shared key?)")

    def cert_requests(self) -> tuple[CertReq, ...]:
        return ()

    def hash_algorithms(self) -> frozenset[int]:
        return frozenset()
