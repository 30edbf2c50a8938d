"""keymgr certificate configuration (config.py fields, credentials.py loading).

Keys, certificates and CRLs come from strongSwan's ``pki`` (PEM) and are also converted to DER;
the loaded objects must authenticate through the core (CertLocalAuth signs, CertPeerAuth
verifies). Bad files raise ConfigError naming the file, never echoing a private key.
"""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from services.core.ike.authn import AuthFailure, Identity, PskAuth
from services.core.ike.certauth import CertLocalAuth, CertPeerAuth
from services.keymgr.config import ConfigError, config_from_json
from services.keymgr.credentials import authentication
from tests.unit.pki_tool import PkiTool

pytestmark = pytest.mark.skipif(not PkiTool.available(), reason="strongSwan pki not installed")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    d = tmp_path_factory.mktemp("creds")
    p = PkiTool(d)
    ca = p.self_signed("ca", "p256", "C=CH, O=Test, CN=CA")
    inter = p.issue("int", "p256", "C=CH, O=Test, CN=Int", ca, ca=True)
    moon = p.issue("moon", "ed25519", "C=CH, O=Test, CN=moon", inter, sans=("moon.example.org",))
    p.issue("sun", "p256", "C=CH, O=Test, CN=sun", inter, sans=("sun.example.org",))
    p.crl("int", inter, (moon,))
    (d / "chain.crt").write_bytes(moon.cert.read_bytes() + inter.cert.read_bytes())
    c = x509.load_pem_x509_certificate(ca.cert.read_bytes())
    (d / "ca.der").write_bytes(c.public_bytes(serialization.Encoding.DER))
    k = serialization.load_pem_private_key((d / "sun.key").read_bytes(), None)
    der = k.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    (d / "sun.der").write_bytes(der)
    enc = k.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pass phrase"),
    )
    (d / "enc.key").write_bytes(enc)
    (d / "psk").write_text("0x" + "ab" * 32)
    (d / "junk").write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64\n")
    return d


def _conn(**over: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "name": "certs",
        "local_addr": "192.0.2.1",
        "remote_addr": "192.0.2.2",
        "local_id": "@moon.example.org",
        "remote_id": "%any",
        "auth": "pubkey",
        "cert_file": "chain.crt",
        "key_file": "moon.key",
        "ca_files": ["ca.der"],
        "crl_files": ["int.crl"],
        "local_ts": "198.51.100.1/32",
        "remote_ts": "203.0.113.1/32",
    }
    d.update(over)
    return {k: v for k, v in d.items() if v is not None}


def test_pubkey_connection_loads_and_authenticates(files: pathlib.Path) -> None:
    cfg = config_from_json(json.dumps({"connections": [_conn()]}), base=files)
    (c,) = cfg.connections
    assert c.auth == "pubkey" and c.ca_files == (files / "ca.der",)
    assert c.crl_files == (files / "int.crl",) and c.fragment_size == 1280
    mine, theirs = authentication(c)
    assert isinstance(mine, CertLocalAuth) and isinstance(theirs, CertPeerAuth)
    assert len(mine.chain) == 2  # our certificate, then the intermediate
    sun = config_from_json(
        json.dumps({"connections": [_conn(cert_file="sun.crt", key_file="sun.der")]}), base=files
    ).connections[0]
    sun_local, sun_peer = authentication(sun)
    octets = b"signed octets" * 10
    # sun verifies moon: moon's certificate is revoked by the configured CRL
    auth = mine.auth_payload(octets, 5, theirs.hash_algorithms())
    with pytest.raises(AuthFailure, match="revoked by CRL"):
        sun_peer.verify(
            auth, octets, 5, Identity.parse("@moon.example.org"), mine.cert_payloads(), 0.0
        )
    # moon verifies sun (no intermediate sent by sun: moon cannot build the chain)
    auth = sun_local.auth_payload(octets, 5, theirs.hash_algorithms())
    with pytest.raises(AuthFailure, match="no trusted CA for issuer"):
        theirs.verify(
            auth, octets, 5, Identity.parse("@sun.example.org"), sun_local.cert_payloads(), 0.0
        )
    with pytest.raises(AuthFailure, match=r"no X\.509"):
        theirs.verify(auth, octets, 5, Identity.parse("@sun.example.org"), (), time.time())
    sun_chain = config_from_json(
        json.dumps({"connections": [_conn(cert_file="sun.crt", key_file="sun.key", crl_files=[])]}),
        base=files,
    ).connections[0]
    sl, _ = authentication(sun_chain)
    sl2 = CertLocalAuth(sl.private_key, (*sl.chain, mine.chain[1]))  # type: ignore[attr-defined]
    auth = sl2.auth_payload(octets, 5, theirs.hash_algorithms())
    theirs.verify(auth, octets, 5, Identity.parse("@sun.example.org"), sl2.cert_payloads(), 0.0)


def test_psk_connection_still_works(files: pathlib.Path) -> None:
    conn = {
        "name": "psk",
        "local_addr": "192.0.2.1",
        "remote_addr": "192.0.2.2",
        "psk_file": "psk",
        "local_ts": "198.51.100.1/32",
        "remote_ts": "203.0.113.1/32",
    }
    (c,) = config_from_json(json.dumps({"connections": [conn]}), base=files).connections
    mine, theirs = authentication(c)
    assert isinstance(mine, PskAuth) and mine is theirs


@pytest.mark.parametrize(
    ("over", "match"),
    [
        ({"auth": "rsa"}, "auth must be one of"),
        ({"ca_files": None}, "lacks field"),
        ({"ca_files": []}, "at least one CA"),
        ({"ca_files": "ca.der"}, "list"),
        ({"cert_file": "missing.crt"}, "cannot read certificate file"),
        ({"cert_file": "junk"}, "no valid X.509 certificate"),
        ({"key_file": "junk"}, "no valid private key"),
        ({"key_file": "enc.key"}, "encrypted"),
        ({"key_file": "sun.key"}, "does not belong"),
        ({"crl_files": ["ca.der"]}, "no valid X.509 CRL"),
        ({"local_id": "%any"}, "only allowed for the remote"),
        ({"remote_id": "C=CH, =x"}, "not a valid identity"),
        ({"fragment_size": 100}, "fragment_size"),
        ({"fragment_size": True}, "fragment_size"),
    ],
)
def test_bad_pubkey_config(files: pathlib.Path, over: dict[str, Any], match: str) -> None:
    doc = _conn(**{k: v for k, v in over.items() if v is not None})
    for k, v in over.items():
        if v is None:
            doc.pop(k, None)
    with pytest.raises(ConfigError, match=match) as ei:
        config_from_json(json.dumps({"connections": [doc]}), base=files)
    key_text = (files / "moon.key").read_text()
    body = "".join(key_text.splitlines()[1:-1])
    assert body[:40] not in str(ei.value)


def test_fragment_size_zero_disables(files: pathlib.Path) -> None:
    (c,) = config_from_json(
        json.dumps({"connections": [_conn(fragment_size=0)]}), base=files
    ).connections
    assert c.fragment_size == 0
