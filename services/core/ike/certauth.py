"""Certificate authentication for IKEv2: RFC 7296 §2.15, §3.6-§3.8, RFC 7427 §3-§4, RFC 4754 §7,
RFC 4055 §3.1 (RSASSA-PSS parameters).

Two implementations of the :mod:`services.core.ike.authn` seam:

* :class:`CertLocalAuth` signs the §2.15 octets with our private key and sends our certificate
  (then any intermediates) as CERT payloads (X.509 Certificate - Signature, encoding 4). When the
  peer announced RFC 7427 SIGNATURE_HASH_ALGORITHMS the AUTH method is DIGITAL_SIGNATURE (14):
  a one-octet length, the signature's AlgorithmIdentifier (DER) and the signature, with a hash
  the peer announced: sha256/384/512WithRSAEncryption (PKCS#1 v1.5), ecdsa-with-SHA256/384/512
  (DER ECDSA-Sig-Value) or Ed25519 / Ed448 ("identity" hash); RSASSA-PSS (RFC 4055 parameters)
  is verified but not produced. Without the announcement the classic methods are used: RSA_SIG
  (1, PKCS#1 v1.5 with SHA-1, only if ``allow_sha1``) and ECDSA_SHA256_P256 / SHA384_P384 /
  SHA512_P521 (9/10/11, r || s per RFC 4754); keys with no classic method (Ed25519, RSA without
  SHA-1) still use DIGITAL_SIGNATURE. ECDSA nonces are deterministic (RFC 6979), so signing
  draws no randomness; PKCS#1 v1.5 and EdDSA are deterministic anyway.
* :class:`CertPeerAuth` checks, in this order, that the CERT payloads parse, that the peer's
  identity is bound to its end-entity certificate (ID_IPV4/IPV6_ADDR -> subjectAltName
  iPAddress, ID_FQDN -> dNSName, ID_RFC822_ADDR -> rfc822Name, ID_DER_ASN1_DN -> the subject or a
  directoryName, ID_KEY_ID -> the subjectKeyIdentifier), that a chain leads through the received
  intermediates to a configured trust anchor (signatures, validity at ``now``, basicConstraints
  cA and pathLenConstraint for issuers, keyUsage keyCertSign / digitalSignature when present),
  that no certificate of the chain is listed in a configured CRL signed by its issuer and already
  in force, and finally the AUTH signature with the end entity's key (every method above; a
  RFC 7427 hash we do not support or did not announce is refused). Each failure raises
  :class:`AuthFailure` with a reason an administrator can act on.

Times are POSIX seconds (``now``); certificates' dates are compared via their UTC timestamps.
CERTREQ (§3.7): one payload of encoding 4 whose data is the SHA-1 of each trust anchor's
SubjectPublicKeyInfo. No private key appears in any repr or exception.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from ipaddress import IPv4Address, IPv6Address

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from services.core.ike.authn import (
    AuthFailure,
    Identity,
    _der_tlv,
    _oid_from_der,
    dn_text,
)
from services.core.ike.constants import AuthMethod, CertEncoding, IdType
from services.core.ike.message import Auth, Cert, CertReq
from services.core.ike.prf import PrfLike

__all__ = [
    "ALGORITHM_IDENTIFIERS",
    "CertLocalAuth",
    "CertPeerAuth",
    "HashAlg",
    "PrivateKey",
    "PublicKey",
    "signature_algorithm",
]

PrivateKey = (
    rsa.RSAPrivateKey
    | ec.EllipticCurvePrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
)
PublicKey = (
    rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey
)

MAX_CHAIN = 8  # certificates between the end entity and the trust anchor, both included


class HashAlg(IntEnum):
    """RFC 7427 §7 Hash Algorithm Identifiers (SIGNATURE_HASH_ALGORITHMS)."""

    SHA1 = 1
    SHA2_256 = 2
    SHA2_384 = 3
    SHA2_512 = 4
    IDENTITY = 5  # RFC 8420


_HASHES: dict[int, type[hashes.HashAlgorithm]] = {
    HashAlg.SHA1: hashes.SHA1,
    HashAlg.SHA2_256: hashes.SHA256,
    HashAlg.SHA2_384: hashes.SHA384,
    HashAlg.SHA2_512: hashes.SHA512,
}

# (key kind, RFC 7427 hash) -> the DER AlgorithmIdentifier sent in a DIGITAL_SIGNATURE AUTH
# (RFC 7427 Appendix A; RSA with NULL parameters, ECDSA and EdDSA without).
ALGORITHM_IDENTIFIERS: dict[tuple[str, int], bytes] = {
    ("rsa", HashAlg.SHA1): bytes.fromhex("300d06092a864886f70d0101050500"),
    ("rsa", HashAlg.SHA2_256): bytes.fromhex("300d06092a864886f70d01010b0500"),
    ("rsa", HashAlg.SHA2_384): bytes.fromhex("300d06092a864886f70d01010c0500"),
    ("rsa", HashAlg.SHA2_512): bytes.fromhex("300d06092a864886f70d01010d0500"),
    ("ecdsa", HashAlg.SHA2_256): bytes.fromhex("300a06082a8648ce3d040302"),
    ("ecdsa", HashAlg.SHA2_384): bytes.fromhex("300a06082a8648ce3d040303"),
    ("ecdsa", HashAlg.SHA2_512): bytes.fromhex("300a06082a8648ce3d040304"),
    ("ed25519", HashAlg.IDENTITY): bytes.fromhex("300506032b6570"),
    ("ed448", HashAlg.IDENTITY): bytes.fromhex("300506032b6571"),
}

_OIDS: dict[str, tuple[str, int]] = {
    "1.2.840.113549.1.1.5": ("rsa", HashAlg.SHA1),
    "1.2.840.113549.1.1.11": ("rsa", HashAlg.SHA2_256),
    "1.2.840.113549.1.1.12": ("rsa", HashAlg.SHA2_384),
    "1.2.840.113549.1.1.13": ("rsa", HashAlg.SHA2_512),
    "1.2.840.10045.4.3.2": ("ecdsa", HashAlg.SHA2_256),
    "1.2.840.10045.4.3.3": ("ecdsa", HashAlg.SHA2_384),
    "1.2.840.10045.4.3.4": ("ecdsa", HashAlg.SHA2_512),
    "1.3.101.112": ("ed25519", HashAlg.IDENTITY),
    "1.3.101.113": ("ed448", HashAlg.IDENTITY),
}

# RFC 4754 §7: method -> (curve name, hash, octets of r and of s)
_CLASSIC_ECDSA: dict[int, tuple[str, int, int]] = {
    AuthMethod.ECDSA_SHA256_P256: ("secp256r1", HashAlg.SHA2_256, 32),
    AuthMethod.ECDSA_SHA384_P384: ("secp384r1", HashAlg.SHA2_384, 48),
    AuthMethod.ECDSA_SHA512_P521: ("secp521r1", HashAlg.SHA2_512, 66),
}
_CURVE_METHOD = {curve: method for method, (curve, _, _) in _CLASSIC_ECDSA.items()}
_CURVE_HASH = {curve: h for _, (curve, h, _) in _CLASSIC_ECDSA.items()}


def _kind(key: PrivateKey | PublicKey | object) -> str:
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return "rsa"
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        return "ecdsa"
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return "ed25519"
    if isinstance(key, ed448.Ed448PrivateKey | ed448.Ed448PublicKey):
        return "ed448"
    return type(key).__name__


_RSASSA_PSS = "1.2.840.113549.1.1.10"
_MGF1 = "1.2.840.113549.1.1.8"
_HASH_OIDS = {
    "1.3.14.3.2.26": HashAlg.SHA1,
    "2.16.840.1.101.3.4.2.1": HashAlg.SHA2_256,
    "2.16.840.1.101.3.4.2.2": HashAlg.SHA2_384,
    "2.16.840.1.101.3.4.2.3": HashAlg.SHA2_512,
}


def _algorithm_identifier(der: bytes) -> tuple[str, bytes]:
    """A whole DER AlgorithmIdentifier -> (dotted OID, DER of its parameters or b"")."""
    tag, body, end = _der_tlv(der, 0)
    if tag != 0x30 or end != len(der):
        raise ValueError("AlgorithmIdentifier is not one DER SEQUENCE")
    otag, oid_body, off = _der_tlv(body, 0)
    if otag != 0x06:
        raise ValueError("AlgorithmIdentifier lacks its OID")
    return _oid_from_der(oid_body).dotted_string, body[off:]


def _hash_of(der: bytes) -> int:
    oid, params = _algorithm_identifier(der)
    if oid not in _HASH_OIDS or params not in (b"", b"\x05\x00"):
        raise ValueError(f"hash algorithm {oid} is not supported in RSASSA-PSS")
    return _HASH_OIDS[oid]


def _pss_params(params: bytes) -> tuple[int, int]:
    """RFC 4055 §3.1 RSASSA-PSS-params -> (hash, salt length); the MGF1 hash must match."""
    h, mgf_h, salt = int(HashAlg.SHA1), int(HashAlg.SHA1), 20  # the DEFAULTs
    tag, body, end = _der_tlv(params, 0)
    if tag != 0x30 or end != len(params):
        raise ValueError("RSASSA-PSS parameters are not one DER SEQUENCE")
    off = 0
    while off < len(body):
        t, v, off = _der_tlv(body, off)
        if t == 0xA0:
            h = _hash_of(v)
        elif t == 0xA1:
            oid, mgf_params = _algorithm_identifier(v)
            if oid != _MGF1:
                raise ValueError(f"mask generation function {oid} is not supported")
            mgf_h = _hash_of(mgf_params)
        elif t == 0xA2:
            itag, num, iend = _der_tlv(v, 0)
            if itag != 0x02 or iend != len(v) or not 0 < len(num) <= 2:
                raise ValueError("bad RSASSA-PSS saltLength")
            salt = int.from_bytes(num, "big", signed=True)
        elif t == 0xA3:
            if v != b"\x02\x01\x01":
                raise ValueError("RSASSA-PSS trailerField other than 1")
        else:
            raise ValueError("unexpected field in RSASSA-PSS parameters")
    if mgf_h != h or salt < 0:
        raise ValueError("RSASSA-PSS with an MGF1 hash other than its hash or a negative salt")
    return h, salt


def _parse_signature(blob: bytes) -> tuple[str, int, int, int | None]:
    """(key kind, hash, offset of the signature, RSASSA-PSS salt length or None)."""
    if not blob:
        raise ValueError("empty DIGITAL_SIGNATURE AUTH data")
    n = blob[0]
    alg = blob[1 : 1 + n]
    if n == 0 or len(alg) != n:
        raise ValueError("DIGITAL_SIGNATURE AlgorithmIdentifier truncated")
    oid, params = _algorithm_identifier(alg)
    if oid == _RSASSA_PSS:
        if not params:
            raise ValueError("RSASSA-PSS without parameters is not supported")
        h, salt = _pss_params(params)
        return "rsa", h, 1 + n, salt
    known = _OIDS.get(oid)
    if known is None:
        raise ValueError(f"signature algorithm {oid} is not supported")
    kind, h = known
    if params and not (kind == "rsa" and params == b"\x05\x00"):
        raise ValueError(f"unexpected parameters for signature algorithm {oid}")
    return kind, h, 1 + n, None


def signature_algorithm(blob: bytes) -> tuple[str, int, int]:
    """Split an RFC 7427 §3 AUTH body into (key kind, hash, offset of the signature).

    ValueError for a malformed body or an AlgorithmIdentifier we do not know (its OID is in the
    message). RSA parameters may be NULL or absent; ECDSA and EdDSA take none; RSASSA-PSS
    (RFC 4055, verification only) needs explicit parameters whose MGF1 hash is its hash.
    """
    kind, h, off, _ = _parse_signature(blob)
    return kind, h, off


def _sign(key: PrivateKey, h: int, data: bytes) -> bytes:
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(data, padding.PKCS1v15(), _HASHES[h]())
    if isinstance(key, ec.EllipticCurvePrivateKey):
        # RFC 6979 deterministic nonces: no randomness outside the core's ``rand``
        return key.sign(data, ec.ECDSA(_HASHES[h](), deterministic_signing=True))
    return key.sign(data)


def _verify(key: PublicKey, h: int, sig: bytes, data: bytes) -> None:
    """Raise InvalidSignature; ECDSA ``sig`` is DER."""
    if isinstance(key, rsa.RSAPublicKey):
        key.verify(sig, data, padding.PKCS1v15(), _HASHES[h]())
    elif isinstance(key, ec.EllipticCurvePublicKey):
        key.verify(sig, data, ec.ECDSA(_HASHES[h]()))
    else:
        key.verify(sig, data)


@dataclass(frozen=True)
class CertLocalAuth:
    """Our certificate authentication: ``private_key`` and ``chain`` (end entity first, then
    intermediates to send). ``allow_sha1`` permits RSA_SIG (SHA-1) towards peers without RFC 7427.
    """

    private_key: PrivateKey = field(repr=False)
    chain: tuple[x509.Certificate, ...]
    allow_sha1: bool = False

    def __post_init__(self) -> None:
        if not self.chain:
            raise ValueError("certificate authentication needs our certificate")
        kind = _kind(self.private_key)
        if kind not in ("rsa", "ecdsa", "ed25519", "ed448"):
            raise ValueError(f"unsupported private key type {kind}")
        if isinstance(self.private_key, ec.EllipticCurvePrivateKey) and (
            self.private_key.curve.name not in _CURVE_METHOD
        ):
            raise ValueError(f"unsupported curve {self.private_key.curve.name}")
        ours = (
            self.chain[0]
            .public_key()
            .public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        mine = self.private_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        if ours != mine:
            raise ValueError("the private key does not belong to the certificate")

    def cert_payloads(self) -> tuple[Cert, ...]:
        der = serialization.Encoding.DER
        return tuple(Cert(CertEncoding.X509_SIGNATURE, c.public_bytes(der)) for c in self.chain)

    def _pick_hash(self, peer_hashes: frozenset[int]) -> int | None:
        key = self.private_key
        if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
            return HashAlg.IDENTITY if HashAlg.IDENTITY in peer_hashes else None
        order: list[int] = [HashAlg.SHA2_256, HashAlg.SHA2_384, HashAlg.SHA2_512]
        if isinstance(key, ec.EllipticCurvePrivateKey):
            preferred = _CURVE_HASH[key.curve.name]
            order.remove(preferred)
            order.insert(0, preferred)
        return next((h for h in order if h in peer_hashes), None)

    def auth_payload(self, octets: bytes, prf_alg: PrfLike, peer_hashes: frozenset[int]) -> Auth:
        key = self.private_key
        kind = _kind(key)
        h = self._pick_hash(peer_hashes) if peer_hashes else None
        if h is None:
            if isinstance(key, ec.EllipticCurvePrivateKey):  # RFC 4754: r || s
                method = _CURVE_METHOD[key.curve.name]
                _, ch, size = _CLASSIC_ECDSA[method]
                r, s = decode_dss_signature(_sign(key, ch, octets))
                return Auth(method, r.to_bytes(size, "big") + s.to_bytes(size, "big"))
            if isinstance(key, rsa.RSAPrivateKey) and self.allow_sha1 and not peer_hashes:
                return Auth(AuthMethod.RSA_SIG, _sign(key, HashAlg.SHA1, octets))
            # no classic method (or none the peer announced): the peer's best chance
            h = HashAlg.IDENTITY if kind in ("ed25519", "ed448") else HashAlg.SHA2_256
        alg = ALGORITHM_IDENTIFIERS[(kind, h)]
        return Auth(AuthMethod.DIGITAL_SIGNATURE, bytes((len(alg),)) + alg + _sign(key, h, octets))


def _der_cert(c: x509.Certificate) -> bytes:
    return c.public_bytes(serialization.Encoding.DER)


def _who(c: x509.Certificate) -> str:
    try:
        return f'"{dn_text(c.subject)}"'
    except ValueError:
        return "(unreadable subject)"


def _ext(c: x509.Certificate, cls: type[x509.ExtensionType]) -> x509.ExtensionType | None:
    try:
        return c.extensions.get_extension_for_class(cls).value
    except x509.ExtensionNotFound:
        return None


def _spki(c: x509.Certificate) -> bytes:
    return c.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _fmt_time(ts: float) -> str:
    """POSIX seconds as a UTC date (no datetime in the core): proleptic Gregorian arithmetic."""
    days, rem = divmod(int(ts), 86400)
    # Howard Hinnant's civil_from_days
    z = days + 719468
    era = z // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    y = yoe + era * 400
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    d = doy - (153 * mp + 2) // 5 + 1
    m = mp + 3 if mp < 10 else mp - 9
    y += m <= 2
    return f"{y:04d}-{m:02d}-{d:02d} {rem // 3600:02d}:{rem % 3600 // 60:02d}:{rem % 60:02d}Z"


@dataclass(frozen=True)
class CertPeerAuth:
    """Verify the peer by certificate: ``trust_anchors`` (CA certificates), ``crls``.

    ``hashes`` are the RFC 7427 hash algorithms we announce and accept (SHA-1 is never in the
    default). ``allow_sha1`` additionally accepts the classic RSA_SIG method (PKCS#1 v1.5 with
    SHA-1). ``max_chain`` bounds the certificates from end entity to anchor. Validity is
    checked at ``now`` as passed to :meth:`verify` (POSIX seconds), unless ``clock`` is given:
    a source of POSIX seconds injected by the I/O shell for exchanges that run on a monotonic
    clock (the keymgr daemon passes the wall clock).
    """

    trust_anchors: tuple[x509.Certificate, ...]
    crls: tuple[x509.CertificateRevocationList, ...] = ()
    hashes: frozenset[int] = frozenset(
        {HashAlg.SHA2_256, HashAlg.SHA2_384, HashAlg.SHA2_512, HashAlg.IDENTITY}
    )
    allow_sha1: bool = False
    max_chain: int = MAX_CHAIN
    clock: Callable[[], float] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.trust_anchors:
            raise ValueError("certificate authentication needs at least one trusted CA")
        unknown = set(self.hashes) - set(HashAlg)
        if unknown:
            raise ValueError(f"unknown RFC 7427 hash algorithm(s) {sorted(unknown)}")

    # -- announcements ---------------------------------------------------------------------

    def cert_requests(self) -> tuple[CertReq, ...]:
        digests = b"".join(
            hashlib.sha1(_spki(c)).digest()  # noqa: S324 - RFC 7296 §3.7 mandates SHA-1
            for c in self.trust_anchors
        )
        return (CertReq(CertEncoding.X509_SIGNATURE, digests),)

    def hash_algorithms(self) -> frozenset[int]:
        return frozenset(self.hashes)

    # -- verification ----------------------------------------------------------------------

    def verify(
        self,
        auth: Auth,
        octets: bytes,
        prf_alg: PrfLike,
        peer_id: Identity,
        certs: tuple[Cert, ...],
        now: float,
    ) -> None:
        if auth.method == AuthMethod.SHARED_KEY_MIC:
            raise AuthFailure("peer used a pre-shared key, we expect a certificate")
        if self.clock is not None:
            now = self.clock()
        try:
            self._verify(auth, octets, peer_id, certs, now)
        except AuthFailure:
            raise
        except (ValueError, TypeError, UnsupportedAlgorithm) as e:
            # lazily parsed certificate fields (extensions, keys) of a malformed certificate
            raise AuthFailure(f"malformed or unsupported certificate data: {e}") from None

    def _verify(
        self, auth: Auth, octets: bytes, peer_id: Identity, certs: tuple[Cert, ...], now: float
    ) -> None:
        received: list[x509.Certificate] = []
        for i, c in enumerate(certs, 1):
            if c.encoding != CertEncoding.X509_SIGNATURE:
                continue  # other encodings (hash and URL, raw keys) are not used
            try:
                received.append(x509.load_der_x509_certificate(c.data))
            except ValueError:
                raise AuthFailure(f"CERT payload {i} is not a DER X.509 certificate") from None
        if not received:
            raise AuthFailure(f"peer {peer_id} sent no X.509 certificate (CERT encoding 4)")
        ee = received[0]
        self._check_identity(ee, peer_id)
        chain = self._build_chain(ee, received[1:], now)
        self._check_revocation(chain, now)
        self._check_auth(auth, octets, ee)

    def _check_identity(self, ee: x509.Certificate, peer_id: Identity) -> None:
        kind = peer_id.id_type
        if kind == IdType.ID_DER_ASN1_DN and peer_id.matches(
            Identity(IdType.ID_DER_ASN1_DN, ee.subject.public_bytes())
        ):
            return
        san = _ext(ee, x509.SubjectAlternativeName)
        names: list[x509.GeneralName] = (
            list(san) if isinstance(san, x509.SubjectAlternativeName) else []
        )
        for n in names:
            if kind in (IdType.ID_IPV4_ADDR, IdType.ID_IPV6_ADDR) and isinstance(n, x509.IPAddress):
                addr = n.value
                if isinstance(addr, IPv4Address | IPv6Address) and addr.packed == peer_id.data:
                    return
            elif kind == IdType.ID_FQDN and isinstance(n, x509.DNSName):
                if n.value.encode("ascii", "replace").lower() == peer_id.data.lower():
                    return
            elif kind == IdType.ID_RFC822_ADDR and isinstance(n, x509.RFC822Name):
                if n.value.encode("ascii", "replace").lower() == peer_id.data.lower():
                    return
            elif kind == IdType.ID_DER_ASN1_DN and isinstance(n, x509.DirectoryName):
                if peer_id.matches(Identity(IdType.ID_DER_ASN1_DN, n.value.public_bytes())):
                    return
        if kind == IdType.ID_KEY_ID:
            ski = _ext(ee, x509.SubjectKeyIdentifier)
            if isinstance(ski, x509.SubjectKeyIdentifier) and ski.digest == peer_id.data:
                return
        raise AuthFailure(f"identity {peer_id} is not in the certificate of {_who(ee)}")

    def _check_time(self, c: x509.Certificate, now: float, what: str) -> None:
        start = c.not_valid_before_utc.timestamp()
        end = c.not_valid_after_utc.timestamp()
        if now < start:
            raise AuthFailure(f"{what} {_who(c)} is not valid before {_fmt_time(start)}")
        if now > end:
            raise AuthFailure(f"{what} {_who(c)} expired on {_fmt_time(end)}")

    @staticmethod
    def _signed_by(c: x509.Certificate, issuer: x509.Certificate) -> bool:
        try:
            c.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
            return False
        return True

    def _check_issuer(self, issuer: x509.Certificate, below: int, anchor: bool) -> None:
        """``issuer`` may sign certificates; ``below`` intermediates sit under it."""
        bc = _ext(issuer, x509.BasicConstraints)
        if isinstance(bc, x509.BasicConstraints):
            if not bc.ca:
                raise AuthFailure(f"issuer {_who(issuer)} is not a CA (basicConstraints)")
            if bc.path_length is not None and below > bc.path_length:
                raise AuthFailure(
                    f"path length {below} below {_who(issuer)} exceeds its pathLenConstraint "
                    f"{bc.path_length}"
                )
        elif not anchor:
            raise AuthFailure(f"intermediate {_who(issuer)} lacks basicConstraints cA")
        ku = _ext(issuer, x509.KeyUsage)
        if isinstance(ku, x509.KeyUsage) and not ku.key_cert_sign:
            raise AuthFailure(f"issuer {_who(issuer)} may not sign certificates (keyUsage)")

    def _build_chain(
        self, ee: x509.Certificate, pool: list[x509.Certificate], now: float
    ) -> list[x509.Certificate]:
        """End entity .. trust anchor, every link checked; AuthFailure otherwise."""
        self._check_time(ee, now, "certificate")
        ku = _ext(ee, x509.KeyUsage)
        if isinstance(ku, x509.KeyUsage) and not ku.digital_signature:
            raise AuthFailure(f"certificate {_who(ee)} may not sign (keyUsage)")
        chain = [ee]
        anchors = {_der_cert(a) for a in self.trust_anchors}
        if _der_cert(ee) in anchors:
            return chain  # the peer's certificate itself is configured as trusted
        cur = ee
        while len(chain) < self.max_chain:
            for a in self.trust_anchors:
                if a.subject == cur.issuer and self._signed_by(cur, a):
                    self._check_time(a, now, "CA certificate")
                    self._check_issuer(a, len(chain) - 1, anchor=True)
                    chain.append(a)
                    return chain
            nxt = next(
                (
                    p
                    for p in pool
                    if p.subject == cur.issuer and p not in chain and self._signed_by(cur, p)
                ),
                None,
            )
            if nxt is None:
                issuer = dn_text(cur.issuer)
                named = [p for p in (*pool, *self.trust_anchors) if p.subject == cur.issuer]
                if named:
                    raise AuthFailure(
                        f'signature of {_who(cur)} does not verify with the key of "{issuer}"'
                    )
                raise AuthFailure(f'no trusted CA for issuer "{issuer}" of {_who(cur)}')
            self._check_time(nxt, now, "intermediate CA certificate")
            self._check_issuer(nxt, len(chain) - 1, anchor=False)
            chain.append(nxt)
            cur = nxt
        raise AuthFailure(f"certificate chain of {_who(ee)} longer than {self.max_chain}")

    def _check_revocation(self, chain: list[x509.Certificate], now: float) -> None:
        for cert, issuer in itertools.pairwise(chain):
            for crl in self.crls:
                if crl.issuer != issuer.subject:
                    continue
                try:
                    ok = crl.is_signature_valid(issuer.public_key())  # type: ignore[arg-type]
                except (TypeError, ValueError, UnsupportedAlgorithm):
                    ok = False
                if not ok or crl.last_update_utc.timestamp() > now:
                    continue  # not this CA's (same name, other key) or not yet issued
                entry = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
                if entry is not None and entry.revocation_date_utc.timestamp() <= now:
                    raise AuthFailure(
                        f"certificate of {_who(cert)} revoked by CRL of {_who(issuer)} "
                        f"on {_fmt_time(entry.revocation_date_utc.timestamp())}"
                    )

    def _check_auth(self, auth: Auth, octets: bytes, ee: x509.Certificate) -> None:
        key = ee.public_key()
        kind = _kind(key)
        if not isinstance(
            key,
            rsa.RSAPublicKey
            | ec.EllipticCurvePublicKey
            | ed25519.Ed25519PublicKey
            | ed448.Ed448PublicKey,
        ):
            raise AuthFailure(f"certificate {_who(ee)} has an unsupported key type {kind}")
        method = auth.method
        try:
            if method == AuthMethod.DIGITAL_SIGNATURE:
                try:
                    sig_kind, h, off, pss_salt = _parse_signature(auth.data)
                except ValueError as e:
                    raise AuthFailure(f"AUTH of {_who(ee)}: {e}") from None
                if h not in self.hashes:
                    raise AuthFailure(
                        f"AUTH of {_who(ee)} uses hash {HashAlg(h).name}, which we did not announce"
                    )
                if sig_kind != kind:
                    raise AuthFailure(
                        f"AUTH of {_who(ee)} is a {sig_kind} signature but the certificate "
                        f"holds a {kind} key"
                    )
                if pss_salt is not None and isinstance(key, rsa.RSAPublicKey):
                    hash_alg = _HASHES[h]()
                    pss = padding.PSS(mgf=padding.MGF1(hash_alg), salt_length=pss_salt)
                    key.verify(auth.data[off:], octets, pss, hash_alg)
                else:
                    _verify(key, h, auth.data[off:], octets)
            elif method == AuthMethod.RSA_SIG:
                if not self.allow_sha1:
                    raise AuthFailure(f"AUTH of {_who(ee)} is RSA with SHA-1, which we refuse")
                if not isinstance(key, rsa.RSAPublicKey):
                    raise AuthFailure(f"AUTH of {_who(ee)} is RSA but the key is {kind}")
                _verify(key, HashAlg.SHA1, auth.data, octets)
            elif method in _CLASSIC_ECDSA:
                curve, h, size = _CLASSIC_ECDSA[method]
                name = AuthMethod(method).name
                if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != curve:
                    raise AuthFailure(f"AUTH of {_who(ee)} is {name} but the key is not on it")
                if len(auth.data) != 2 * size:
                    raise AuthFailure(f"AUTH of {_who(ee)}: {name} signature not {2 * size} octets")
                r = int.from_bytes(auth.data[:size], "big")
                s = int.from_bytes(auth.data[size:], "big")
                _verify(key, h, encode_dss_signature(r, s), octets)
            else:
                raise AuthFailure(f"AUTH method {method} of {_who(ee)} is not supported")
        except InvalidSignature:
            raise AuthFailure(
                f"AUTH signature of {_who(ee)} does not verify (wrong key or tampered)"
            ) from None
