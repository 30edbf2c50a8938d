"""Certificate authentication (services/core/ike/certauth.py): RFC 7427 signatures, RFC 4754
ECDSA, chains, CRLs and identity binding.

Oracles: RFC 7427 Appendix A's published AlgorithmIdentifier octet strings; certificates, keys
and CRLs made by strongSwan's ``pki`` tool (an independent X.509 encoder: its certificates'
own signatureAlgorithm fields must equal our AlgorithmIdentifiers, its key IDs our CERTREQ
hashes); and certificates made with ``cryptography`` for cases ``pki`` cannot produce.
"""

from __future__ import annotations

import datetime
import hashlib
import pathlib
import random
import subprocess
from collections.abc import Iterator

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import NameOID

from services.core.ike.authn import AuthFailure, Identity
from services.core.ike.certauth import (
    ALGORITHM_IDENTIFIERS,
    CertLocalAuth,
    CertPeerAuth,
    PrivateKey,
    signature_algorithm,
)
from services.core.ike.constants import AuthMethod, CertEncoding
from services.core.ike.message import Auth, Cert
from tests.unit.pki_tool import Issued, PkiTool

PRF = 5
OCTETS = bytes(range(256)) * 3
ALL_HASHES = frozenset({2, 3, 4, 5})

# RFC 7427 Appendix A (A.1.x, A.3.x, and RFC 8420 §2 for Ed25519), transcribed octet strings.
RFC7427_APPENDIX_A = {
    ("rsa", 1): "300d 0609 2a86 4886 f70d 0101 0505 00",
    ("rsa", 2): "300d 0609 2a86 4886 f70d 0101 0b05 00",
    ("rsa", 3): "300d 0609 2a86 4886 f70d 0101 0c05 00",
    ("rsa", 4): "300d 0609 2a86 4886 f70d 0101 0d05 00",
    ("ecdsa", 2): "300a 0608 2a86 48ce 3d04 0302",
    ("ecdsa", 3): "300a 0608 2a86 48ce 3d04 0303",
    ("ecdsa", 4): "300a 0608 2a86 48ce 3d04 0304",
    ("ed25519", 5): "3005 0603 2b65 70",
}

pytestmark = pytest.mark.skipif(not PkiTool.available(), reason="strongSwan pki not installed")


class Lab:
    """A root (RSA) -> intermediate (P-384) -> end entities hierarchy made by pki."""

    def __init__(self, d: pathlib.Path) -> None:
        self.pki = PkiTool(d)
        p = self.pki
        self.root = p.self_signed("root", "rsa2048", "C=CH, O=Test, CN=Test Root")
        self.inter = p.issue("int", "p384", "C=CH, O=Test, CN=Test Int", self.root, ca=True)
        sans = ("moon.example.org", "192.0.2.2", "moon@example.org", "fd00::2")
        self.ee: dict[str, Issued] = {
            kind: p.issue(
                f"ee-{kind}", kind, f"C=CH, O=Test, CN=moon {kind}", self.inter, sans=sans
            )
            for kind in ("rsa2048", "p256", "p384", "ed25519")
        }
        self.revoked = p.issue("rev", "p256", "C=CH, O=Test, CN=revoked", self.inter, sans=sans)
        self.crl = p.crl("int", self.inter, (self.revoked,))
        # a CA with the intermediate's name but another key, revoking the good P-256 cert
        self.impostor = p.self_signed("imp", "p256", "C=CH, O=Test, CN=Test Int")
        self.other_crl = p.crl("imp", self.impostor, (self.ee["p256"],))
        self.other_root = p.self_signed("other", "p256", "C=CH, O=Other, CN=Other Root")
        self.expired = p.issue(
            "old",
            "p256",
            "C=CH, O=Test, CN=old",
            self.inter,
            sans=sans,
            not_before="2020-01-01 00:00:00",
            not_after="2021-01-01 00:00:00",
        )
        self.future = p.issue(
            "new",
            "p256",
            "C=CH, O=Test, CN=new",
            self.inter,
            sans=sans,
            not_before="2090-01-01 00:00:00",
            not_after="2091-01-01 00:00:00",
        )
        self.int0 = p.issue(
            "int0", "p256", "C=CH, O=Test, CN=Int pathlen 0", self.root, ca=True, pathlen=0
        )
        self.int01 = p.issue("int01", "p256", "C=CH, O=Test, CN=Int below", self.int0, ca=True)
        self.deep = p.issue("deep", "p256", "C=CH, O=Test, CN=deep", self.int01, sans=sans)


def cert(i: Issued) -> x509.Certificate:
    return x509.load_pem_x509_certificate(i.cert.read_bytes())


def key(i: Issued) -> PrivateKey:
    k = serialization.load_pem_private_key(i.key.read_bytes(), None)
    assert isinstance(k, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey)
    return k


def crl(path: pathlib.Path) -> x509.CertificateRevocationList:
    return x509.load_pem_x509_crl(path.read_bytes())


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    yield Lab(tmp_path_factory.mktemp("pki"))


def now() -> float:
    return datetime.datetime.now(datetime.UTC).timestamp()


def local(lab: Lab, i: Issued, *chain: Issued) -> CertLocalAuth:
    return CertLocalAuth(key(i), (cert(i), *(cert(c) for c in chain)))


def peer(lab: Lab, **kw: object) -> CertPeerAuth:
    kw.setdefault("trust_anchors", (cert(lab.root),))
    return CertPeerAuth(**kw)  # type: ignore[arg-type]


MOON = Identity.parse("moon.example.org")


def check(
    lab: Lab,
    who: Issued,
    *,
    verifier: CertPeerAuth | None = None,
    ident: Identity = MOON,
    chain: tuple[Issued, ...] | None = None,
    at: float | None = None,
    hashes_: frozenset[int] = ALL_HASHES,
) -> Auth:
    me = local(lab, who, *(chain if chain is not None else (lab.inter,)))
    auth = me.auth_payload(OCTETS, PRF, hashes_)
    v = verifier or peer(lab)
    v.verify(auth, OCTETS, PRF, ident, me.cert_payloads(), now() if at is None else at)
    return auth


# -- encodings -------------------------------------------------------------------------------


def test_algorithm_identifiers_are_rfc7427_appendix_a() -> None:
    for k, text in RFC7427_APPENDIX_A.items():
        assert ALGORITHM_IDENTIFIERS[k] == bytes.fromhex(text.replace(" ", "")), k
        kind, h, off = signature_algorithm(
            bytes((len(ALGORITHM_IDENTIFIERS[k]),)) + ALGORITHM_IDENTIFIERS[k]
        )
        assert (kind, h, off) == (k[0], k[1], 1 + len(ALGORITHM_IDENTIFIERS[k]))


def _sig_alg_der(c: x509.Certificate) -> bytes:
    """The outer signatureAlgorithm of a DER certificate (second element of the SEQUENCE)."""
    der = c.public_bytes(serialization.Encoding.DER)
    from services.core.ike.authn import _der_tlv

    _, body, _ = _der_tlv(der, 0)
    _, _, off = _der_tlv(body, 0)  # tbsCertificate
    start = off
    _, _, end = _der_tlv(body, off)
    return body[start:end]


def test_algorithm_identifiers_equal_pki_certificate_signature_algorithms(lab: Lab) -> None:
    # root (RSA, pki's default sha256WithRSAEncryption) signed the intermediate; the P-384
    # intermediate signed end entities with ecdsa-with-SHA384; a P-256 CA with SHA-256.
    assert _sig_alg_der(cert(lab.inter)) == ALGORITHM_IDENTIFIERS[("rsa", 2)]
    assert _sig_alg_der(cert(lab.ee["p256"])) == ALGORITHM_IDENTIFIERS[("ecdsa", 3)]
    assert _sig_alg_der(cert(lab.int01)) == ALGORITHM_IDENTIFIERS[("ecdsa", 2)]
    ed = lab.pki.self_signed("edroot", "ed25519", "C=CH, CN=ed")
    assert _sig_alg_der(cert(ed)) == ALGORITHM_IDENTIFIERS[("ed25519", 5)]


def test_certreq_is_sha1_of_spki_like_pki_keyid(lab: Lab) -> None:
    v = peer(lab, trust_anchors=(cert(lab.root), cert(lab.other_root)))
    (req,) = v.cert_requests()
    assert req.encoding == CertEncoding.X509_SIGNATURE
    out = subprocess.run(
        ["pki", "--keyid", "--type", "x509", "--in", str(lab.root.cert)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    keyid = out.split("subjectPublicKeyInfo):")[1].split()[0].replace(":", "")
    assert req.data[:20].hex() == keyid
    assert len(req.data) == 40
    assert v.hash_algorithms() == {2, 3, 4, 5}


# -- good signatures -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "hashes_", "method", "alg"),
    [
        ("rsa2048", ALL_HASHES, AuthMethod.DIGITAL_SIGNATURE, ("rsa", 2)),
        ("rsa2048", frozenset({4}), AuthMethod.DIGITAL_SIGNATURE, ("rsa", 4)),
        ("p256", ALL_HASHES, AuthMethod.DIGITAL_SIGNATURE, ("ecdsa", 2)),
        ("p384", ALL_HASHES, AuthMethod.DIGITAL_SIGNATURE, ("ecdsa", 3)),
        ("p384", frozenset({2}), AuthMethod.DIGITAL_SIGNATURE, ("ecdsa", 2)),
        ("ed25519", ALL_HASHES, AuthMethod.DIGITAL_SIGNATURE, ("ed25519", 5)),
        ("p256", frozenset(), AuthMethod.ECDSA_SHA256_P256, None),
        ("p384", frozenset(), AuthMethod.ECDSA_SHA384_P384, None),
        ("ed25519", frozenset(), AuthMethod.DIGITAL_SIGNATURE, ("ed25519", 5)),
        ("rsa2048", frozenset(), AuthMethod.DIGITAL_SIGNATURE, ("rsa", 2)),
    ],
)
def test_sign_and_verify(
    lab: Lab, kind: str, hashes_: frozenset[int], method: int, alg: tuple[str, int] | None
) -> None:
    auth = check(lab, lab.ee[kind], hashes_=hashes_)
    assert auth.method == method
    if alg is not None:
        a = ALGORITHM_IDENTIFIERS[alg]
        assert auth.data[0] == len(a) and auth.data[1 : 1 + len(a)] == a
    if method == AuthMethod.ECDSA_SHA384_P384:
        assert len(auth.data) == 96  # RFC 4754 r || s
    for ident in ("192.0.2.2", "fd00::2", "moon@example.org", f"C=CH, O=Test, CN=moon {kind}"):
        check(lab, lab.ee[kind], ident=Identity.parse(ident), hashes_=hashes_)


def test_rsa_pkcs1_signature_checked_by_hand(lab: Lab) -> None:
    me = local(lab, lab.ee["rsa2048"], lab.inter)
    auth = me.auth_payload(OCTETS, PRF, frozenset({2}))
    sig = auth.data[1 + 15 :]
    pub = cert(lab.ee["rsa2048"]).public_key()
    assert isinstance(pub, rsa.RSAPublicKey)
    # RSA verification primitive by hand: s^e mod n = EMSA-PKCS1-v1_5(SHA-256(octets))
    n, e = pub.public_numbers().n, pub.public_numbers().e
    em = pow(int.from_bytes(sig, "big"), e, n).to_bytes(256, "big")
    t = bytes.fromhex("3031300d060960864801650304020105000420") + hashlib.sha256(OCTETS).digest()
    assert em == b"\x00\x01" + b"\xff" * (256 - 3 - len(t)) + b"\x00" + t


def test_rsa_sig_sha1_only_when_allowed(lab: Lab) -> None:
    i = lab.ee["rsa2048"]
    me = CertLocalAuth(key(i), (cert(i), cert(lab.inter)), allow_sha1=True)
    auth = me.auth_payload(OCTETS, PRF, frozenset())
    assert auth.method == AuthMethod.RSA_SIG
    with pytest.raises(AuthFailure, match="SHA-1"):
        peer(lab).verify(auth, OCTETS, PRF, MOON, me.cert_payloads(), now())
    peer(lab, allow_sha1=True).verify(auth, OCTETS, PRF, MOON, me.cert_payloads(), now())
    pub = cert(i).public_key()
    assert isinstance(pub, rsa.RSAPublicKey)
    pub.verify(auth.data, OCTETS, padding.PKCS1v15(), hashes.SHA1())


def test_end_entity_signed_directly_by_root_and_anchor_is_peer(lab: Lab) -> None:
    direct = lab.pki.issue(
        "direct", "p256", "C=CH, CN=direct", lab.root, sans=("moon.example.org",)
    )
    check(lab, direct, chain=())
    # the peer's own certificate configured as the trust anchor
    check(lab, direct, chain=(), verifier=peer(lab, trust_anchors=(cert(direct),)))


# -- failures --------------------------------------------------------------------------------


def test_tampered_signature_and_octets(lab: Lab) -> None:
    for kind in ("rsa2048", "p256", "ed25519"):
        me = local(lab, lab.ee[kind], lab.inter)
        for hs in (ALL_HASHES, frozenset()):
            auth = me.auth_payload(OCTETS, PRF, hs)
            bad = Auth(auth.method, auth.data[:-1] + bytes((auth.data[-1] ^ 1,)))
            with pytest.raises(AuthFailure, match="does not verify"):
                peer(lab).verify(bad, OCTETS, PRF, MOON, me.cert_payloads(), now())
            with pytest.raises(AuthFailure, match="does not verify"):
                peer(lab).verify(auth, OCTETS + b"x", PRF, MOON, me.cert_payloads(), now())


def test_wrong_key_type_and_method(lab: Lab) -> None:
    ec_auth = local(lab, lab.ee["p256"], lab.inter).auth_payload(OCTETS, PRF, ALL_HASHES)
    rsa_certs = local(lab, lab.ee["rsa2048"], lab.inter).cert_payloads()
    with pytest.raises(AuthFailure, match="ecdsa signature but the certificate holds a rsa"):
        peer(lab).verify(ec_auth, OCTETS, PRF, MOON, rsa_certs, now())
    classic = local(lab, lab.ee["p384"], lab.inter).auth_payload(OCTETS, PRF, frozenset())
    p256_certs = local(lab, lab.ee["p256"], lab.inter).cert_payloads()
    with pytest.raises(AuthFailure, match="ECDSA_SHA384_P384"):
        peer(lab).verify(classic, OCTETS, PRF, MOON, p256_certs, now())
    with pytest.raises(AuthFailure, match="pre-shared key"):
        peer(lab).verify(
            Auth(AuthMethod.SHARED_KEY_MIC, b"x" * 32), OCTETS, PRF, MOON, p256_certs, 0
        )
    with pytest.raises(AuthFailure, match="not supported"):
        peer(lab).verify(Auth(AuthMethod.DSS_SIG, b"x" * 40), OCTETS, PRF, MOON, p256_certs, now())


def test_hash_not_announced_or_unknown(lab: Lab) -> None:
    me = local(lab, lab.ee["p384"], lab.inter)
    auth = me.auth_payload(OCTETS, PRF, frozenset({3}))
    narrow = peer(lab, hashes=frozenset({2}))
    with pytest.raises(AuthFailure, match="SHA2_384, which we did not announce"):
        narrow.verify(auth, OCTETS, PRF, MOON, me.cert_payloads(), now())
    # sha1WithRSAEncryption in a DIGITAL_SIGNATURE AUTH
    rk = key(lab.ee["rsa2048"])
    assert isinstance(rk, rsa.RSAPrivateKey)
    alg = ALGORITHM_IDENTIFIERS[("rsa", 1)]
    sha1 = Auth(14, bytes((len(alg),)) + alg + rk.sign(OCTETS, padding.PKCS1v15(), hashes.SHA1()))
    rsa_certs = local(lab, lab.ee["rsa2048"], lab.inter).cert_payloads()
    with pytest.raises(AuthFailure, match="SHA1, which we did not announce"):
        peer(lab).verify(sha1, OCTETS, PRF, MOON, rsa_certs, now())
    # an OID we do not know (sha224WithRSAEncryption), truncated and garbage bodies
    odd = bytes.fromhex("300d06092a864886f70d01010e0500")
    for data in (bytes((len(odd),)) + odd + b"sig", b"", b"\x20\x30", b"\x03\x04\x01\x00"):
        with pytest.raises(AuthFailure):
            peer(lab).verify(Auth(14, data), OCTETS, PRF, MOON, rsa_certs, now())


def test_validity_period(lab: Lab) -> None:
    with pytest.raises(
        AuthFailure, match=r'"C=CH, O=Test, CN=old" expired on 2021-01-01 00:00:00Z'
    ):
        check(lab, lab.expired)
    with pytest.raises(AuthFailure, match=r"not valid before 2090-01-01 00:00:00Z"):
        check(lab, lab.future)
    # a good certificate at a time outside its (or its CA's) validity
    with pytest.raises(AuthFailure, match="not valid before"):
        check(lab, lab.ee["p256"], at=now() - 86400 * 400)
    with pytest.raises(AuthFailure, match="expired"):
        check(lab, lab.ee["p256"], at=now() + 86400 * 400)


def test_unknown_ca(lab: Lab) -> None:
    v = peer(lab, trust_anchors=(cert(lab.other_root),))
    with pytest.raises(AuthFailure, match='no trusted CA for issuer "C=CH, O=Test, CN=Test Root"'):
        check(lab, lab.ee["p256"], verifier=v)
    # no intermediate sent
    with pytest.raises(AuthFailure, match='no trusted CA for issuer "C=CH, O=Test, CN=Test Int"'):
        check(lab, lab.ee["p256"], chain=())
    # an impostor with the intermediate's name but another key
    with pytest.raises(AuthFailure, match="does not verify with the key of"):
        check(lab, lab.ee["p256"], chain=(lab.impostor,))


def test_revoked_by_crl(lab: Lab) -> None:
    v = peer(lab, crls=(crl(lab.crl),))
    with pytest.raises(
        AuthFailure,
        match=r'certificate of "C=CH, O=Test, CN=revoked" revoked by CRL of "C=CH, O=Test, '
        r'CN=Test Int"',
    ):
        check(lab, lab.revoked, verifier=v)
    check(lab, lab.ee["p256"], verifier=v)  # not listed
    check(lab, lab.revoked)  # no CRL configured
    # listed by a CRL of another CA (same name, other key): not revoked
    check(lab, lab.ee["p256"], verifier=peer(lab, crls=(crl(lab.other_crl),)))


def test_issuer_constraints(lab: Lab) -> None:
    with pytest.raises(AuthFailure, match="exceeds its pathLenConstraint 0"):
        check(lab, lab.deep, chain=(lab.int01, lab.int0))


def test_identity_not_in_certificate(lab: Lab) -> None:
    for ident in ("@sun.example.org", "192.0.2.9", "sun@example.org", "C=CH, O=Test, CN=sun"):
        with pytest.raises(AuthFailure, match=r"identity .* is not in the certificate of"):
            check(lab, lab.ee["p256"], ident=Identity.parse(ident))


def test_malformed_cert_payloads_never_crash(lab: Lab) -> None:
    me = local(lab, lab.ee["p256"], lab.inter)
    auth = me.auth_payload(OCTETS, PRF, ALL_HASHES)
    good = me.cert_payloads()
    v = peer(lab)
    with pytest.raises(AuthFailure, match=r"no X\.509 certificate"):
        v.verify(auth, OCTETS, PRF, MOON, (), now())
    with pytest.raises(AuthFailure, match=r"no X\.509 certificate"):
        v.verify(auth, OCTETS, PRF, MOON, (Cert(CertEncoding.CRL, b"x"),), now())
    with pytest.raises(AuthFailure, match=r"not a DER X\.509"):
        v.verify(auth, OCTETS, PRF, MOON, (Cert(4, b"\x30\x03\x02\x01"),), now())
    rng = random.Random(7427)
    for _ in range(300):
        der = bytearray(good[0].data)
        for _ in range(rng.randint(1, 4)):
            der[rng.randrange(len(der))] = rng.randrange(256)
        cut = bytes(der[: rng.randint(1, len(der))]) if rng.random() < 0.3 else bytes(der)
        try:
            v.verify(auth, OCTETS, PRF, MOON, (Cert(4, cut), good[1]), now())
        except AuthFailure:
            pass


def test_local_auth_checks_key_and_chain(lab: Lab) -> None:
    with pytest.raises(ValueError, match="does not belong"):
        CertLocalAuth(key(lab.ee["p256"]), (cert(lab.ee["p384"]),))
    with pytest.raises(ValueError):
        CertLocalAuth(key(lab.ee["p256"]), ())
    me = local(lab, lab.ee["p256"], lab.inter)
    assert "PrivateKey" not in repr(me) and "private_key" not in repr(me)
    assert [c.data for c in me.cert_payloads()] == [
        cert(i).public_bytes(serialization.Encoding.DER) for i in (lab.ee["p256"], lab.inter)
    ]


# -- certificates made with cryptography (P-521, keyUsage) ---------------------------------------


def _mk(
    subject: str,
    pub: object,
    issuer_key: PrivateKey,
    issuer: x509.Name | None,
    *,
    ca: bool,
    ku: x509.KeyUsage | None = None,
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    t = datetime.datetime.now(datetime.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(pub)  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(t - datetime.timedelta(hours=1))
        .not_valid_after(t + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("sun.example.org")]), False)
    )
    if ku is not None:
        b = b.add_extension(ku, critical=True)
    algo = None if isinstance(issuer_key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return b.sign(issuer_key, algo)  # type: ignore[arg-type]


def _ku(*, sign: bool, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(sign, False, False, False, False, cert_sign, cert_sign, False, False)


def test_cryptography_chain_p521_and_key_usage() -> None:
    ca_key = ed25519.Ed25519PrivateKey.generate()
    ca = _mk("ed root", ca_key.public_key(), ca_key, None, ca=True)
    ee_key = ec.generate_private_key(ec.SECP521R1())
    ee = _mk("sun", ee_key.public_key(), ca_key, ca.subject, ca=False)
    me = CertLocalAuth(ee_key, (ee,))
    sun = Identity.parse("@sun.example.org")
    v = CertPeerAuth((ca,))
    for hs, method in ((frozenset(), 11), (ALL_HASHES, 14)):
        auth = me.auth_payload(OCTETS, PRF, hs)
        assert auth.method == method
        v.verify(auth, OCTETS, PRF, sun, me.cert_payloads(), now())
    assert len(me.auth_payload(OCTETS, PRF, frozenset()).data) == 132
    assert (
        me.auth_payload(OCTETS, PRF, ALL_HASHES).data[1:13] == ALGORITHM_IDENTIFIERS[("ecdsa", 4)]
    )

    # end entity whose keyUsage forbids signing; CA whose keyUsage forbids keyCertSign
    ee2 = _mk(
        "sun",
        ee_key.public_key(),
        ca_key,
        ca.subject,
        ca=False,
        ku=_ku(sign=False, cert_sign=False),
    )
    me2 = CertLocalAuth(ee_key, (ee2,))
    with pytest.raises(AuthFailure, match="may not sign"):
        v.verify(
            me2.auth_payload(OCTETS, PRF, ALL_HASHES), OCTETS, PRF, sun, me2.cert_payloads(), now()
        )
    ca3 = _mk(
        "ed root", ca_key.public_key(), ca_key, None, ca=True, ku=_ku(sign=True, cert_sign=False)
    )
    with pytest.raises(AuthFailure, match="may not sign certificates"):
        CertPeerAuth((ca3,)).verify(
            me.auth_payload(OCTETS, PRF, ALL_HASHES), OCTETS, PRF, sun, me.cert_payloads(), now()
        )
    # an end entity (cA false) used as an issuer; pki refuses to make this chain
    sub_key = ec.generate_private_key(ec.SECP256R1())
    sub = _mk("sun", sub_key.public_key(), ee_key, ee.subject, ca=False)
    me4 = CertLocalAuth(sub_key, (sub, ee))
    with pytest.raises(AuthFailure, match=r'issuer "CN=sun" is not a CA'):
        v.verify(
            me4.auth_payload(OCTETS, PRF, ALL_HASHES), OCTETS, PRF, sun, me4.cert_payloads(), now()
        )


# -- RSASSA-PSS (verification only) --------------------------------------------------------------


def _tlv(tag: int, body: bytes) -> bytes:
    assert len(body) < 128
    return bytes((tag, len(body))) + body


def _pss_alg(hash_oid: bytes, mgf_hash_oid: bytes, salt: int) -> bytes:
    """RFC 4055 §3.1 RSASSA-PSS AlgorithmIdentifier, built by hand (hash with NULL params)."""
    h = _tlv(0x30, _tlv(0x06, hash_oid) + b"\x05\x00")
    mh = _tlv(0x30, _tlv(0x06, mgf_hash_oid) + b"\x05\x00")
    mgf = _tlv(0x30, _tlv(0x06, bytes.fromhex("2a864886f70d010108")) + mh)
    params = _tlv(0xA0, h) + _tlv(0xA1, mgf) + _tlv(0xA2, _tlv(0x02, bytes((salt,))))
    return _tlv(0x30, _tlv(0x06, bytes.fromhex("2a864886f70d01010a")) + _tlv(0x30, params))


SHA256_OID = bytes.fromhex("608648016503040201")
SHA384_OID = bytes.fromhex("608648016503040202")


def test_rsassa_pss_signatures_verify(lab: Lab) -> None:
    i = lab.ee["rsa2048"]
    k = key(i)
    assert isinstance(k, rsa.RSAPrivateKey)
    certs = local(lab, i, lab.inter).cert_payloads()
    for hash_oid, h, salt in ((SHA256_OID, hashes.SHA256(), 32), (SHA384_OID, hashes.SHA384(), 48)):
        alg = _pss_alg(hash_oid, hash_oid, salt)
        sig = k.sign(OCTETS, padding.PSS(mgf=padding.MGF1(h), salt_length=salt), h)
        auth = Auth(14, bytes((len(alg),)) + alg + sig)
        peer(lab).verify(auth, OCTETS, PRF, MOON, certs, now())
        with pytest.raises(AuthFailure, match="does not verify"):
            peer(lab).verify(auth, OCTETS + b"!", PRF, MOON, certs, now())
        with pytest.raises(AuthFailure, match="did not announce"):
            peer(lab, hashes=frozenset({5})).verify(auth, OCTETS, PRF, MOON, certs, now())
    # the salt length in the parameters is the one checked
    alg = _pss_alg(SHA256_OID, SHA256_OID, 20)
    sig = k.sign(
        OCTETS, padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32), hashes.SHA256()
    )
    with pytest.raises(AuthFailure, match="does not verify"):
        peer(lab).verify(Auth(14, bytes((len(alg),)) + alg + sig), OCTETS, PRF, MOON, certs, now())
    # MGF1 with another hash than the signature's, and PSS without parameters: refused
    for bad in (_pss_alg(SHA256_OID, SHA384_OID, 32), bytes.fromhex("300b06092a864886f70d01010a")):
        with pytest.raises(AuthFailure, match="RSASSA-PSS"):
            peer(lab).verify(
                Auth(14, bytes((len(bad),)) + bad + sig), OCTETS, PRF, MOON, certs, now()
            )


def test_ecdsa_signature_is_rfc6979_deterministic() -> None:
    """RFC 6979 A.2.5 (P-256, SHA-256, message "sample"): our RFC 4754 r || s equals the
    published r and s, so signing draws no randomness."""
    x = int("C9AFA9D845BA75166B5C215767B1D6934E50C3DB36E89B127B8A622B120F6721", 16)
    k = ec.derive_private_key(x, ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rfc6979")])
    t = datetime.datetime.now(datetime.UTC)
    c = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(k.public_key())
        .serial_number(1)
        .not_valid_before(t - datetime.timedelta(hours=1))
        .not_valid_after(t + datetime.timedelta(hours=1))
        .sign(k, hashes.SHA256())
    )
    auth = CertLocalAuth(k, (c,)).auth_payload(b"sample", PRF, frozenset())
    assert auth.method == AuthMethod.ECDSA_SHA256_P256
    assert auth.data.hex().upper() == (
        "EFD48B2AACB6A8FD1140DD9CD45E81D69D2C877B56AAF991C34D0EA84EAF3716"
        "F7CB1C942D657C41D436C7A1B6E29F65F3E900DBB9AFF4064DC4AB2F843ACDA8"
    )
