"""Development PKI for mTLS (RFC 5280 profile, ECDSA P-256): a CA and one certificate per name.

    python -m services.runtime.devpki OUTDIR [--names worker-a,worker-b,keymgr]

writes ``ca.pem`` (and ``ca.key``), and for every name ``<name>.pem`` / ``<name>.key``. Each
certificate carries both the serverAuth and clientAuth extended key usages, so one pair serves a
component as gRPC server and as client. Subject alternative names: the name itself (DNS),
``localhost`` (DNS) and ``127.0.0.1`` / ``::1`` (IP). The default names are ``server`` and
``client`` (the file names services.runtime.tls uses by default). Private keys are mode 0600.
An existing CA in OUTDIR is reused, so names can be added later. For development and tests
only: production certificates come from the cluster's issuer (e.g. cert-manager).
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_NAMES = ("server", "client")
VALIDITY = datetime.timedelta(days=365)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)


def _validate_name(name: str) -> str:
    name = name.strip()
    if not name or len(name) > 63 or not all(c.isalnum() or c in "-." for c in name):
        raise ValueError(f"invalid certificate name {name!r} (letters, digits, '-', '.')")
    if name == "ca":
        raise ValueError("'ca' is reserved for the CA files")
    return name


def create_ca(outdir: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Load the CA in ``outdir`` or create a new one."""
    key_path, cert_path = outdir / "ca.key", outdir / "ca.pem"
    if key_path.exists() and cert_path.exists():
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError("existing ca.key is not an EC key")
        return key, x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ipsec-suite dev CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    outdir.mkdir(parents=True, exist_ok=True)
    _write_private(key_path, _key_pem(key))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert


def issue(
    outdir: Path, name: str, ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate
) -> Path:
    """Write ``<name>.pem`` and ``<name>.key`` signed by the CA; return the certificate path."""
    name = _validate_name(name)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    sans: list[x509.GeneralName] = [x509.DNSName(name)]
    if name != "localhost":
        sans.append(x509.DNSName("localhost"))
    sans += [
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write_private(outdir / f"{name}.key", _key_pem(key))
    path = outdir / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def create(outdir: Path, names: Sequence[str] = DEFAULT_NAMES) -> list[Path]:
    """Create (or reuse) the CA in ``outdir`` and issue a certificate for every name."""
    checked = [_validate_name(n) for n in names]
    outdir.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = create_ca(outdir)
    return [issue(outdir, n, ca_key, ca_cert) for n in checked]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m services.runtime.devpki",
        description="Create a development CA and mTLS certificates (ECDSA P-256).",
    )
    ap.add_argument("outdir", type=Path, help="directory to write ca.pem, <name>.pem, <name>.key")
    ap.add_argument(
        "--names",
        default=",".join(DEFAULT_NAMES),
        help="comma-separated certificate names (default: %(default)s)",
    )
    args = ap.parse_args(argv)
    names = [n for n in args.names.split(",") if n.strip()]
    try:
        paths = create(args.outdir, names)
    except ValueError as e:
        print(f"devpki: {e}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
