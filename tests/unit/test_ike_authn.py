"""Identities and the PSK side of the authentication seam (services/core/ike/authn.py).

Distinguished names are checked against certificates made by strongSwan's ``pki`` tool (an
independent encoder of "C=.., O=.., CN=.." strings) when it is installed.
"""

from __future__ import annotations

import hashlib
import hmac
import shutil
import subprocess

import pytest
from cryptography import x509

from services.core.ike.authn import (
    AuthFailure,
    Identity,
    PskAuth,
    hash_algorithms_notify,
    parse_dn,
    peer_hash_algorithms,
    signed_octets,
)
from services.core.ike.constants import AuthMethod, IdType, NotifyType
from services.core.ike.message import Auth, Notify


@pytest.mark.parametrize(
    ("text", "kind", "data"),
    [
        ("192.0.2.1", IdType.ID_IPV4_ADDR, bytes([192, 0, 2, 1])),
        ("fd00::1", IdType.ID_IPV6_ADDR, bytes([0xFD] + [0] * 14 + [1])),
        ("@moon.example.org", IdType.ID_FQDN, b"moon.example.org"),
        ("moon.example.org", IdType.ID_FQDN, b"moon.example.org"),
        ("carol@example.org", IdType.ID_RFC822_ADDR, b"carol@example.org"),
        ("@#0a0b0c", IdType.ID_KEY_ID, b"\x0a\x0b\x0c"),
    ],
)
def test_parse_text_forms(text: str, kind: int, data: bytes) -> None:
    ident = Identity.parse(text)
    assert (ident.id_type, ident.data) == (kind, data)
    assert Identity.parse(str(ident)).matches(ident)


@pytest.mark.parametrize("bad", ["", " ", "XX=1", "C=CH, =x", "@#zz", "x" * 2000])
def test_parse_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        Identity.parse(bad)


def test_dn_order_is_most_significant_first() -> None:
    name = parse_dn("C=CH, O=Example Org, CN=moon.example.org")
    assert next(a.oid for rdn in name.rdns for a in rdn) == x509.oid.NameOID.COUNTRY_NAME
    assert name.rfc4514_string() == "CN=moon.example.org,O=Example Org,C=CH"
    ident = Identity.parse("C=CH, O=Example Org, CN=moon.example.org")
    assert str(ident) == "C=CH, O=Example Org, CN=moon.example.org"


def test_dn_matching_ignores_case_spacing_and_string_type() -> None:
    a = Identity.parse("C=CH, O=Example Org, CN=moon")
    b = Identity.parse("c=ch,  o=EXAMPLE   org , cn=MOON")
    assert a.matches(b)
    assert not a.matches(Identity.parse("C=CH, O=Example Org, CN=sun"))
    assert not a.matches(Identity.parse("O=Example Org, C=CH, CN=moon"))  # order matters
    assert not a.matches(Identity(IdType.ID_DER_ASN1_DN, b"\x30\x03\x31"))  # malformed DER
    assert not Identity(IdType.ID_DER_ASN1_DN, b"garbage").matches(a)


def test_other_types_match_exactly() -> None:
    assert Identity.parse("@Moon.Example").matches(Identity.parse("@moon.example"))
    assert not Identity.parse("192.0.2.1").matches(Identity.parse("192.0.2.2"))
    assert not Identity.parse("192.0.2.1").matches(Identity.parse("@192.0.2.1"))


def test_str_never_raises_on_garbage() -> None:
    for kind in (1, 2, 3, 5, 9, 11, 200):
        assert str(Identity(kind, b"\xff\xfe\x00garbage"))


@pytest.mark.skipif(shutil.which("pki") is None, reason="strongSwan pki not installed")
def test_dn_encoding_matches_strongswan_pki() -> None:
    dn = "C=CH, O=strongSwan Project, OU=Test, CN=moon.strongswan.org"
    key = subprocess.run(
        ["pki", "--gen", "--type", "ed25519", "--outform", "der"], capture_output=True, check=True
    ).stdout
    cert_der = subprocess.run(
        ["pki", "--self", "--type", "ed25519", "--dn", dn, "--outform", "der"],
        input=key,
        capture_output=True,
        check=True,
    ).stdout
    subject = x509.load_der_x509_certificate(cert_der).subject
    ours = Identity.parse(dn)
    theirs = Identity(IdType.ID_DER_ASN1_DN, subject.public_bytes())
    assert ours.matches(theirs)
    assert str(theirs) == dn


def test_signed_octets_and_psk_mac_by_hand() -> None:
    psk = b"a shared secret"
    msg, nonce, sk_p = b"\x01" * 100, b"\x02" * 32, b"\x03" * 32
    id_body = Identity.parse("192.0.2.1").body()
    octets = signed_octets(5, msg, nonce, sk_p, id_body)  # PRF_HMAC_SHA2_256
    assert octets == msg + nonce + hmac.new(sk_p, id_body, hashlib.sha256).digest()
    key = hmac.new(psk, b"Key Pad for IKEv2", hashlib.sha256).digest()
    want = hmac.new(key, octets, hashlib.sha256).digest()
    auth = PskAuth(psk)
    assert auth.auth_payload(octets, 5, frozenset()) == Auth(AuthMethod.SHARED_KEY_MIC, want)
    peer = Identity.parse("192.0.2.1")
    auth.verify(Auth(AuthMethod.SHARED_KEY_MIC, want), octets, 5, peer, (), 0.0)
    with pytest.raises(AuthFailure, match="wrong pre-shared key"):
        auth.verify(Auth(AuthMethod.SHARED_KEY_MIC, bytes(32)), octets, 5, peer, (), 0.0)
    with pytest.raises(AuthFailure, match="method"):
        auth.verify(Auth(AuthMethod.DIGITAL_SIGNATURE, want), octets, 5, peer, (), 0.0)
    assert "shared secret" not in repr(auth)
    with pytest.raises(ValueError):
        PskAuth(b"")


def test_hash_algorithms_notify_roundtrip() -> None:
    assert hash_algorithms_notify(frozenset()) == ()
    (n,) = hash_algorithms_notify(frozenset({4, 2, 3}))
    assert n == Notify(NotifyType.SIGNATURE_HASH_ALGORITHMS, bytes([0, 2, 0, 3, 0, 4]))
    assert peer_hash_algorithms((n,)) == {2, 3, 4}
    odd = Notify(NotifyType.SIGNATURE_HASH_ALGORITHMS, bytes([0, 2, 0]))
    assert peer_hash_algorithms((odd,)) == {2}
    assert peer_hash_algorithms(()) == frozenset()
