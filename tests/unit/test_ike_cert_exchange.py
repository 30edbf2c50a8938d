"""Our initiator against our responder with certificates and RFC 7383 fragmentation, in memory.

Certificates are made with ``cryptography`` here (fast); the strongSwan interop tests
(tests/netns/test_keymgr_certs.py) prove the same paths against charon. Checks: both sides
establish with RSA / ECDSA / Ed25519 chains; a chain too large for 1280-octet packets goes out as
SKF fragments from both sides, every datagram within the limit (IP and UDP headers and the
non-ESP marker subtracted); a lost fragment is recovered by retransmitting all of them; the
responder answers a retransmitted fragmented request on its first fragment only; without the
peer's IKEV2_FRAGMENTATION_SUPPORTED nothing is fragmented; an untrusted certificate ends both
sides with AUTHENTICATION_FAILED and a readable reason.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
from collections.abc import Callable

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from services.core.ike.certauth import CertLocalAuth, CertPeerAuth, PrivateKey
from services.core.ike.child import ENCR_ID, ENCR_KEY_BITS
from services.core.ike.constants import NotifyType
from services.core.ike.exchange import (
    Ikev2Initiator,
    InitiatorConfig,
    State,
    fragment_limit,
)
from services.core.ike.message import SK, SKF, Notify, decode_message
from services.core.ike.responder import Ikev2Responder, ResponderConfig, ResponderState
from services.core.ike.sk import SkCipher, decrypt_message, encrypt_message

I_ADDR, R_ADDR = "192.0.2.1", "192.0.2.2"
TS_I, TS_R = "198.51.100.1", "203.0.113.1"
I_EP = ipaddress.IPv4Address(I_ADDR).packed
R_EP = ipaddress.IPv4Address(R_ADDR).packed
NOW = datetime.datetime.now(datetime.UTC)


def _wall() -> float:
    """The POSIX clock the certificate checks use (the exchanges here run at t = 0, 5, ...)."""
    return NOW.timestamp()


def _rand(tag: bytes) -> Callable[[int], bytes]:
    state = {"n": 0}

    def rand(n: int) -> bytes:
        out = b""
        while len(out) < n:
            state["n"] += 1
            out += hashlib.sha256(tag + state["n"].to_bytes(4, "big")).digest()
        return out[:n]

    return rand


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "CH"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _cert(
    cn: str,
    key: PrivateKey,
    issuer: tuple[x509.Name, PrivateKey] | None,
    *,
    ca: bool,
    san: str = "",
) -> x509.Certificate:
    iname, ikey = issuer or (_name(cn), key)
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(iname)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(hours=1))
        .not_valid_after(NOW + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if san:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(san)]), critical=False)
    algo = None if isinstance(ikey, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return b.sign(ikey, algo)


class Pki:
    """A root, ``depth`` intermediates and two end entities (moon, sun) of one key kind."""

    def __init__(self, make: Callable[[], PrivateKey], depth: int = 1, root: str = "Root") -> None:
        root_key = make()
        self.root = _cert(root, root_key, None, ca=True)
        issuer: tuple[x509.Name, PrivateKey] = (self.root.subject, root_key)
        self.inters: list[x509.Certificate] = []
        for i in range(depth):
            k = make()
            c = _cert(f"Intermediate {i}", k, issuer, ca=True)
            self.inters.insert(0, c)
            issuer = (c.subject, k)
        self.ee: dict[str, CertLocalAuth] = {}
        for host in ("moon", "sun"):
            k = make()
            c = _cert(host, k, issuer, ca=False, san=f"{host}.example.org")
            self.ee[host] = CertLocalAuth(k, (c, *self.inters))


def _rsa(bits: int = 2048) -> Callable[[], PrivateKey]:
    return lambda: rsa.generate_private_key(65537, bits)


def _configs(
    pki: Pki, *, trust: x509.Certificate | None = None, frag_i: int = 1280, frag_r: int = 1280
) -> tuple[InitiatorConfig, ResponderConfig]:
    anchors = (trust or pki.root,)
    ini = InitiatorConfig(
        local_addr=I_ADDR,
        remote_addr=R_ADDR,
        ts_local=(TS_I, TS_I),
        ts_remote=(TS_R, TS_R),
        local_auth=pki.ee["moon"],
        peer_auth=CertPeerAuth(anchors, clock=_wall),
        local_id="@moon.example.org",
        remote_id="@sun.example.org",
        fragment_size=frag_i,
    )
    resp = ResponderConfig(
        local_addr=R_ADDR,
        ts_local=(TS_R, TS_R),
        ts_remote=(TS_I, TS_I),
        local_auth=pki.ee["sun"],
        peer_auth=CertPeerAuth((pki.root,), clock=_wall),
        local_id="@sun.example.org",
        remote_id="%any",
        fragment_size=frag_r,
    )
    return ini, resp


def _run(
    ini: Ikev2Initiator,
    resp: Ikev2Responder,
    log: list[tuple[str, bytes]],
    drop: Callable[[str, bytes], bool] = lambda side, d: False,
    t: float = 0.0,
) -> None:
    to_resp = ini.start(t)
    for _ in range(12):
        to_ini: list[bytes] = []
        for d in to_resp:
            log.append(("i", d))
            if drop("i", d):
                continue
            port = 4500 if ini.port_float else 500
            to_ini += resp.receive(d, t, remote=(I_EP, port), local=(R_EP, port))
        to_resp = []
        for d in to_ini:
            log.append(("r", d))
            if drop("r", d):
                continue
            to_resp += ini.receive(d, t)
        if not to_resp:
            t += 5.0  # let the initiator's retransmission timer fire
            to_resp = ini.on_timer(t)
            if not to_resp:
                return


def _kinds(log: list[tuple[str, bytes]], side: str) -> list[str]:
    out = []
    for s, d in log:
        if s != side:
            continue
        last = decode_message(d).payloads[-1]
        out.append("SKF" if isinstance(last, SKF) else "SK" if isinstance(last, SK) else "plain")
    return out


def _notifies(d: bytes) -> set[int]:
    return {p.notify_type for p in decode_message(d).payloads if isinstance(p, Notify)}


@pytest.mark.parametrize(
    ("make", "kind"),
    [
        (_rsa(), "SKF"),  # two RSA-2048 certificates and a signature exceed 1248 octets
        (lambda: ec.generate_private_key(ec.SECP256R1()), "SK"),
        (ed25519.Ed25519PrivateKey.generate, "SK"),
    ],
    ids=["rsa", "p256", "ed25519"],
)
def test_certificates_establish(make: Callable[[], PrivateKey], kind: str) -> None:
    ini_cfg, resp_cfg = _configs(Pki(make))
    ini = Ikev2Initiator(ini_cfg, now=0.0, rand=_rand(b"i"))
    resp = Ikev2Responder(resp_cfg, now=0.0, rand=_rand(b"r"))
    log: list[tuple[str, bytes]] = []
    _run(ini, resp, log)
    assert ini.state is State.ESTABLISHED, ini.failure_reason
    assert resp.state is ResponderState.ESTABLISHED, resp.failure_reason
    for side in ("i", "r"):
        kinds = _kinds(log, side)
        assert kinds[0] == "plain" and set(kinds[1:]) == {kind}, kinds
    frag = NotifyType.IKEV2_FRAGMENTATION_SUPPORTED
    assert frag in _notifies(log[0][1]) and frag in _notifies(log[1][1])


@pytest.fixture(scope="module")
def big() -> Pki:
    return Pki(_rsa(3072), depth=3)  # four 3072-bit RSA certificates per side: > 4 kB


def test_large_chain_is_fragmented_both_ways(big: Pki) -> None:
    ini_cfg, resp_cfg = _configs(big)
    ini = Ikev2Initiator(ini_cfg, now=0.0, rand=_rand(b"i"))
    resp = Ikev2Responder(resp_cfg, now=0.0, rand=_rand(b"r"))
    log: list[tuple[str, bytes]] = []
    _run(ini, resp, log)
    assert ini.state is State.ESTABLISHED, ini.failure_reason
    assert resp.state is ResponderState.ESTABLISHED, resp.failure_reason
    limit = fragment_limit(1280, R_ADDR, nat_t=True)
    assert limit == 1280 - 20 - 8 - 4
    for side in ("i", "r"):
        kinds = _kinds(log, side)
        assert kinds[0] == "plain" and set(kinds[1:]) == {"SKF"} and len(kinds) >= 5, kinds
        assert all(len(d) <= limit for s, d in log[2:] if s == side)
    first = decode_message(log[2][1]).payloads[-1]
    assert isinstance(first, SKF) and first.total_fragments == len(_kinds(log, "i")) - 1


def test_lost_fragments_are_recovered_by_retransmission(big: Pki) -> None:
    ini_cfg, resp_cfg = _configs(big)
    ini = Ikev2Initiator(ini_cfg, now=0.0, rand=_rand(b"i"))
    resp = Ikev2Responder(resp_cfg, now=0.0, rand=_rand(b"r"))
    log: list[tuple[str, bytes]] = []
    lost: set[tuple[str, int]] = set()

    def drop(side: str, d: bytes) -> bool:
        last = decode_message(d).payloads[-1]
        if isinstance(last, SKF) and last.fragment_number == 2 and (side, 2) not in lost:
            lost.add((side, 2))  # the first fragment 2 of each side is lost once
            return True
        return False

    _run(ini, resp, log, drop)
    assert lost == {("i", 2), ("r", 2)}
    assert ini.state is State.ESTABLISHED, ini.failure_reason
    assert resp.state is ResponderState.ESTABLISHED, resp.failure_reason
    n = decode_message(log[2][1]).payloads[-1]
    assert isinstance(n, SKF)
    # the request was sent 3 times in all (original, two retransmissions), all fragments each
    assert _kinds(log, "i").count("SKF") == 3 * n.total_fragments


def test_responder_resends_on_first_fragment_only(big: Pki) -> None:
    ini_cfg, resp_cfg = _configs(big)
    ini = Ikev2Initiator(ini_cfg, now=0.0, rand=_rand(b"i"))
    resp = Ikev2Responder(resp_cfg, now=0.0, rand=_rand(b"r"))
    log: list[tuple[str, bytes]] = []
    _run(ini, resp, log)
    assert resp.state is ResponderState.ESTABLISHED
    request = [d for s, d in log if s == "i"][1:]
    response = [d for s, d in log if s == "r"][1:]
    assert resp.receive(request[1], 1.0) == []
    assert resp.receive(request[0], 1.0) == response
    tampered = request[0][:-1] + bytes((request[0][-1] ^ 1,))
    assert resp.receive(tampered, 1.0) == []


def test_no_fragments_without_both_announcements(big: Pki) -> None:
    for frag_i, frag_r in ((0, 1280), (1280, 0)):
        ini_cfg, resp_cfg = _configs(big, frag_i=frag_i, frag_r=frag_r)
        ini = Ikev2Initiator(ini_cfg, now=0.0, rand=_rand(b"i"))
        resp = Ikev2Responder(resp_cfg, now=0.0, rand=_rand(b"r"))
        log: list[tuple[str, bytes]] = []
        _run(ini, resp, log)
        assert ini.state is State.ESTABLISHED, ini.failure_reason
        assert _kinds(log, "i") == ["plain", "SK"] and _kinds(log, "r") == ["plain", "SK"]
        frag = NotifyType.IKEV2_FRAGMENTATION_SUPPORTED
        assert (frag in _notifies(log[0][1])) == bool(frag_i)
        assert frag not in _notifies(log[1][1])
    with pytest.raises(ValueError):
        _configs(big, frag_i=500)


def test_untrusted_responder_certificate_fails_both_sides() -> None:
    pki = Pki(lambda: ec.generate_private_key(ec.SECP384R1()))
    other = Pki(lambda: ec.generate_private_key(ec.SECP256R1()), depth=0, root="Other Root")
    ini_cfg, resp_cfg = _configs(pki, trust=other.root)
    ini = Ikev2Initiator(ini_cfg, now=0.0, rand=_rand(b"i"))
    resp = Ikev2Responder(resp_cfg, now=0.0, rand=_rand(b"r"))
    _run(ini, resp, [])
    assert ini.state is State.FAILED
    assert ini.failure_reason is not None
    assert 'no trusted CA for issuer "C=CH, CN=Root" of "C=CH, CN=Intermediate 0"' in (
        ini.failure_reason
    )

    # and the initiator's certificate untrusted by the responder: AUTHENTICATION_FAILED
    ini_cfg, _ = _configs(pki)
    _, resp_cfg = _configs(other)
    resp_cfg = ResponderConfig(
        local_addr=R_ADDR,
        ts_local=(TS_R, TS_R),
        ts_remote=(TS_I, TS_I),
        local_auth=pki.ee["sun"],
        peer_auth=CertPeerAuth((other.root,), clock=_wall),
        local_id="@sun.example.org",
    )
    ini = Ikev2Initiator(ini_cfg, now=0.0, rand=_rand(b"i"))
    resp = Ikev2Responder(resp_cfg, now=0.0, rand=_rand(b"r"))
    _run(ini, resp, [])
    assert resp.state is ResponderState.FAILED and ini.state is State.FAILED
    assert resp.failure_reason is not None and "no trusted CA" in resp.failure_reason
    assert ini.failure_reason == "AUTHENTICATION_FAILED"


def test_fragment_limit_subtracts_headers() -> None:
    assert fragment_limit(1280, "192.0.2.2", nat_t=False) == 1280 - 20 - 8
    assert fragment_limit(1280, "2001:db8::2", nat_t=True) == 1280 - 40 - 8 - 4
    assert fragment_limit(0, "192.0.2.2", nat_t=True) is None


def test_fragments_refused_when_not_negotiated(big: Pki) -> None:
    """A responder that did not agree to RFC 7383 drops SKF fragments, even authentic ones."""
    ini_cfg, _ = _configs(big)
    _, resp_cfg = _configs(big, frag_r=0)
    ini = Ikev2Initiator(ini_cfg, now=0.0, rand=_rand(b"i"))
    resp = Ikev2Responder(resp_cfg, now=0.0, rand=_rand(b"r"))
    (m1,) = ini.start(0.0)
    (m2,) = resp.receive(m1, 0.0, remote=(I_EP, 500), local=(R_EP, 500))
    (single,) = ini.receive(m2, 0.0)  # no fragmentation agreed: one SK message
    keys = ini._keys  # the test plays a misbehaving initiator with the real SK_ei
    assert keys is not None
    msg = decrypt_message(single, SkCipher(ENCR_ID, keys.sk_ei, key_bits=ENCR_KEY_BITS))
    frags = encrypt_message(
        msg, SkCipher(ENCR_ID, keys.sk_ei, key_bits=ENCR_KEY_BITS), fragment_size=600
    )
    assert len(frags) > 2
    for f in frags:
        assert resp.receive(f, 0.0, remote=(I_EP, 4500), local=(R_EP, 4500)) == []
    assert resp.state is ResponderState.WAIT_AUTH and resp.dropped == len(frags)
    assert resp.receive(single, 0.0, remote=(I_EP, 4500), local=(R_EP, 4500))
    assert resp.state is ResponderState.ESTABLISHED, resp.failure_reason
