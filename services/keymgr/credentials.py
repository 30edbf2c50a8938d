"""keymgr credentials: a connection's PSK or certificate files -> the IKE core's auth objects.

:func:`authentication` returns the :class:`~services.core.ike.authn.LocalAuth` and
:class:`~services.core.ike.authn.PeerAuth` for a :class:`~services.keymgr.config.Connection`:
:class:`~services.core.ike.authn.PskAuth` for ``auth: "psk"``, else
:class:`~services.core.ike.certauth.CertLocalAuth` (our certificate chain and private key) and
:class:`~services.core.ike.certauth.CertPeerAuth` (trusted CAs and CRLs). Files may be PEM
(several certificates in one file are a chain, ours first) or DER. Problems raise
:class:`~services.keymgr.config.ConfigError` naming the file and what is wrong, never the key's
content; private keys must not be encrypted (mount them as secrets). The exchanges run on a
monotonic clock, so the certificate checks get the wall clock (``time.time``) injected.
"""

from __future__ import annotations

import pathlib
import time

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from services.core.ike.authn import LocalAuth, PeerAuth, PskAuth
from services.core.ike.certauth import CertLocalAuth, CertPeerAuth, PrivateKey
from services.keymgr.config import ConfigError, Connection

__all__ = ["authentication", "load_certificates", "load_crls", "load_private_key"]

MAX_CRED_BYTES = 1 << 20
_PEM = b"-----BEGIN"


def _read(path: pathlib.Path, what: str) -> bytes:
    try:
        with path.open("rb") as f:
            blob = f.read(MAX_CRED_BYTES + 1)
    except (OSError, ValueError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
        raise ConfigError(f"cannot read {what} {path}: {reason}") from None
    if len(blob) > MAX_CRED_BYTES:
        raise ConfigError(f"{what} {path} is larger than {MAX_CRED_BYTES} bytes")
    if not blob.strip():
        raise ConfigError(f"{what} {path} is empty")
    return blob


def load_certificates(path: pathlib.Path) -> tuple[x509.Certificate, ...]:
    """All certificates of a PEM file (in order) or the one of a DER file."""
    blob = _read(path, "certificate file")
    try:
        if _PEM in blob:
            certs = tuple(x509.load_pem_x509_certificates(blob))
        else:
            certs = (x509.load_der_x509_certificate(blob),)
    except ValueError:
        raise ConfigError(f"certificate file {path} holds no valid X.509 certificate") from None
    return certs


def load_crls(path: pathlib.Path) -> x509.CertificateRevocationList:
    blob = _read(path, "CRL file")
    try:
        if _PEM in blob:
            return x509.load_pem_x509_crl(blob)
        return x509.load_der_x509_crl(blob)
    except ValueError:
        raise ConfigError(f"CRL file {path} holds no valid X.509 CRL") from None


def load_private_key(path: pathlib.Path) -> PrivateKey:
    """An unencrypted RSA, ECDSA, Ed25519 or Ed448 private key (PKCS#8, PKCS#1 or SEC1)."""
    blob = _read(path, "private key file")
    try:
        if _PEM in blob:
            key = serialization.load_pem_private_key(blob, password=None)
        else:
            key = serialization.load_der_private_key(blob, password=None)
    except TypeError:
        raise ConfigError(f"private key file {path} is encrypted (not supported)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(f"private key file {path} holds no valid private key") from None
    if not isinstance(
        key,
        rsa.RSAPrivateKey
        | ec.EllipticCurvePrivateKey
        | ed25519.Ed25519PrivateKey
        | ed448.Ed448PrivateKey,
    ):
        raise ConfigError(f"private key file {path}: unsupported key type {type(key).__name__}")
    return key


def authentication(conn: Connection) -> tuple[LocalAuth, PeerAuth]:
    """Our authentication and the peer's for ``conn``, read from its files now."""
    if conn.auth == "psk":
        psk = PskAuth(conn.read_psk())
        return psk, psk
    assert conn.cert_file is not None and conn.key_file is not None
    w = f"connection {conn.name!r}"
    chain = load_certificates(conn.cert_file)
    key = load_private_key(conn.key_file)
    try:
        local = CertLocalAuth(key, chain)
    except ValueError as e:
        raise ConfigError(f"{w}: {conn.cert_file}: {e}") from None
    anchors = tuple(c for f in conn.ca_files for c in load_certificates(f))
    crls = tuple(load_crls(f) for f in conn.crl_files)
    try:
        peer = CertPeerAuth(anchors, crls, clock=time.time)  # validity: wall clock
    except ValueError as e:
        raise ConfigError(f"{w}: {e}") from None
    return local, peer
