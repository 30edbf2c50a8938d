"""services.runtime.devpki: the dev CA and certificates form a valid mTLS chain (RFC 5280)."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from services.runtime import devpki


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pki")
    assert devpki.main([str(out), "--names", "worker-a,worker-b,keymgr"]) == 0
    return out


def test_files_and_permissions(pki: Path) -> None:
    for name in ("worker-a", "worker-b", "keymgr"):
        assert (pki / f"{name}.pem").is_file()
        mode = stat.S_IMODE((pki / f"{name}.key").stat().st_mode)
        assert mode == 0o600, oct(mode)
    assert stat.S_IMODE((pki / "ca.key").stat().st_mode) == 0o600
    assert (pki / "ca.pem").is_file()


def test_ca_is_a_p256_ca(pki: Path) -> None:
    ca = _cert(pki / "ca.pem")
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca is True
    pub = ca.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    assert isinstance(pub.curve, ec.SECP256R1)
    ca.verify_directly_issued_by(ca)  # self-signed


@pytest.mark.parametrize("name", ["worker-a", "worker-b", "keymgr"])
def test_leaf_chains_to_ca(pki: Path, name: str) -> None:
    ca = _cert(pki / "ca.pem")
    leaf = _cert(pki / f"{name}.pem")
    leaf.verify_directly_issued_by(ca)
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == name
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert ExtendedKeyUsageOID.CLIENT_AUTH in eku
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {name, "localhost"}
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    # the key file matches the certificate
    key = serialization.load_pem_private_key((pki / f"{name}.key").read_bytes(), password=None)
    assert key.public_key().public_numbers() == leaf.public_key().public_numbers()  # type: ignore[union-attr]


def test_full_chain_verification(pki: Path) -> None:
    """The leaf verifies as a TLS server certificate for its DNS name against the CA store."""
    from cryptography.x509.verification import PolicyBuilder, Store

    store = Store([_cert(pki / "ca.pem")])
    verifier = PolicyBuilder().store(store).build_server_verifier(x509.DNSName("worker-a"))
    chain = verifier.verify(_cert(pki / "worker-a.pem"), [])
    assert chain[-1] == _cert(pki / "ca.pem")


def test_other_ca_does_not_verify(pki: Path, tmp_path: Path) -> None:
    from cryptography.exceptions import InvalidSignature
    from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

    devpki.create(tmp_path, ["worker-a"])
    intruder = _cert(tmp_path / "worker-a.pem")
    with pytest.raises((ValueError, InvalidSignature)):
        intruder.verify_directly_issued_by(_cert(pki / "ca.pem"))
    store = Store([_cert(pki / "ca.pem")])
    verifier = PolicyBuilder().store(store).build_server_verifier(x509.DNSName("worker-a"))
    with pytest.raises(VerificationError):
        verifier.verify(intruder, [])


def test_existing_ca_is_reused(tmp_path: Path) -> None:
    devpki.create(tmp_path, ["a"])
    ca1 = (tmp_path / "ca.pem").read_bytes()
    devpki.create(tmp_path, ["b"])
    assert (tmp_path / "ca.pem").read_bytes() == ca1
    _cert(tmp_path / "b.pem").verify_directly_issued_by(_cert(tmp_path / "ca.pem"))


@pytest.mark.parametrize("bad", ["", "ca", "a/b", "x" * 64, "sp ace"])
def test_bad_names_rejected(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError):
        devpki.create(tmp_path, [bad])
