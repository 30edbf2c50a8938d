"""keymgr against strongSwan 5.9.8 across negotiated algorithms, IPv4 / IPv6 and modes, in both
roles, with the labs of test_keymgr_strongswan.py (keymgr initiates, charon responds) and
test_keymgr_responder_strongswan.py (charon initiates, keymgr responds).

The matrix (not a cross product: every value appears in both directions at least once):

=====  ============  ===========================================  ===================  ====
dir    family        IKE (DH group)                               ESP                  mode
=====  ============  ===========================================  ===================  ====
K->C   IPv4          aes128gcm16-prfsha256-ecp256 (19) [1]        aes128gcm16          tun
K->C   IPv6          aes256-sha256-modp2048 (14)                  aes256-sha256        tun
K->C   IPv4          chacha20poly1305-prfsha256-x25519 (31)       chacha20poly1305     tun
K->C   IPv6          aes256gcm16-prfsha384-x25519 (31)            aes256gcm16          tun
C->K   IPv6          aes256gcm16-prfsha256-x25519 (31) [2]        aes256gcm16          tun
C->K   IPv4          aes256-sha256-modp2048 (14)                  aes256-sha256        tun
C->K   IPv6          chacha20poly1305-prfsha256-ecp256 (19)       chacha20poly1305     tun
C->K   IPv4          aes128gcm16-prfsha256-x25519 (31)            aes128gcm16          tun
K->C   IPv4          aes256gcm16-prfsha256-x25519                 aes256gcm16          trn
C->K   IPv6          aes256gcm16-prfsha256-x25519                 aes256gcm16          trn
=====  ============  ===========================================  ===================  ====

K->C: keymgr initiates, charon responds; C->K: the other way round. [1] keymgr proposes
ecp384 first, charon only takes ecp256: charon answers INVALID_KE_PAYLOAD(19) and keymgr
retries (RFC 7296 §1.3). [2] charon's first KE group is ecp256, keymgr only takes x25519:
keymgr answers INVALID_KE_PAYLOAD(31) and charon retries. ChaCha20-Poly1305 needs charon's
``chapoly`` plugin, loaded for those cases.

Every tunnel case checks: swanctl shows the IKE SA ESTABLISHED with the expected algorithms
(strongSwan's own names, an independent reading of what was negotiated) and the Child SA
INSTALLED with the expected ESP algorithm and mode and the SPIs our worker holds; ping through
the tunnel; a 256 KiB TCP transfer through the tunnel whose SHA-256 is computed by the sender
and by the receiver and compared; both of our worker's SAs counted packets; keymgr logs the
suite and mode; the PSK is not in keymgr's log.

Transport mode: this kernel has no XFRM ESP, and strongSwan's kernel-libipsec (the only way
charon does ESP here) installs tunnel-mode SAs only ("IPsec SA: unsupported mode"). So the
transport cases prove the negotiation against charon, not traffic: keymgr initiating sends
USE_TRANSPORT_MODE, charon accepts it, fails to install the transport SA and answers
NO_PROPOSAL_CHOSEN, which keymgr reports ("... in transport mode") and installs nothing;
charon initiating with mode = transport gets USE_TRANSPORT_MODE back from keymgr, which
installs a transport-mode pair into our worker, then charon fails to install its side and
deletes the Child SA, and keymgr removes its pair. Transport-mode traffic between two of our
keymgrs (both roles) is in test_keymgr_transport.py.

Also: no common proposal in both directions (NO_PROPOSAL_CHOSEN readable in charon's log /
swanctl's output and in keymgr's log), and keymgr answering charon's COOKIE (RFC 7296 §2.6).
Run time: about 5-10 s per case, about a minute in all.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from scripts import bench_strongswan as bsw
from services.core.ike.suites import parse_ike
from services.core.sa import Direction
from tests.netns.test_keymgr_responder_strongswan import ResponderLab
from tests.netns.test_keymgr_strongswan import (
    REPO,
    Case,
    KeymgrLab,
    _env,
    _skip_reason,
)

pytestmark = pytest.mark.netns

CHAPOLY = ("chapoly",)


def _case(ike: str, esp: str, *, ipv6: bool, mode: str = "tunnel", **kw: object) -> Case:
    plugins = CHAPOLY if "chacha" in ike + esp else ()
    args: dict[str, object] = {
        "charon_ike": ike,
        "charon_esp": esp,
        "keymgr_ike": (ike,),
        "keymgr_esp": (esp,),
        "mode": mode,
        "ipv6": ipv6,
        "plugins": plugins,
    }
    args.update(kw)
    return Case(**args)  # type: ignore[arg-type]


# (case, strongSwan's IKE algorithm line, strongSwan's ESP algorithm text)
INITIATOR_CASES = {
    "v4-aesgcm128-ecp256-invalid-ke": (
        _case(
            "aes128gcm16-prfsha256-ecp256",
            "aes128gcm16",
            ipv6=False,
            keymgr_ike=("aes128gcm16-prfsha256-ecp384", "aes128gcm16-prfsha256-ecp256"),
        ),
        "AES_GCM_16-128/PRF_HMAC_SHA2_256/ECP_256",
        "ESP:AES_GCM_16-128",
    ),
    "v6-aescbc256-sha256-modp2048": (
        _case("aes256-sha256-modp2048", "aes256-sha256", ipv6=True),
        "AES_CBC-256/HMAC_SHA2_256_128/PRF_HMAC_SHA2_256/MODP_2048",
        "ESP:AES_CBC-256/HMAC_SHA2_256_128",
    ),
    "v4-chacha20poly1305-x25519": (
        _case("chacha20poly1305-prfsha256-x25519", "chacha20poly1305", ipv6=False),
        "CHACHA20_POLY1305/PRF_HMAC_SHA2_256/CURVE_25519",
        "ESP:CHACHA20_POLY1305",
    ),
    "v6-aesgcm256-prfsha384-x25519": (
        _case("aes256gcm16-prfsha384-x25519", "aes256gcm16", ipv6=True),
        "AES_GCM_16-256/PRF_HMAC_SHA2_384/CURVE_25519",
        "ESP:AES_GCM_16-256",
    ),
}

RESPONDER_CASES = {
    "v6-aesgcm256-x25519-invalid-ke": (
        _case(
            "aes256gcm16-prfsha256-ecp256-x25519",
            "aes256gcm16",
            ipv6=True,
            keymgr_ike=("aes256gcm16-prfsha256-x25519",),
        ),
        "AES_GCM_16-256/PRF_HMAC_SHA2_256/CURVE_25519",
        "ESP:AES_GCM_16-256",
    ),
    "v4-aescbc256-sha256-modp2048": (
        _case("aes256-sha256-modp2048", "aes256-sha256", ipv6=False),
        "AES_CBC-256/HMAC_SHA2_256_128/PRF_HMAC_SHA2_256/MODP_2048",
        "ESP:AES_CBC-256/HMAC_SHA2_256_128",
    ),
    "v6-chacha20poly1305-ecp256": (
        _case("chacha20poly1305-prfsha256-ecp256", "chacha20poly1305", ipv6=True),
        "CHACHA20_POLY1305/PRF_HMAC_SHA2_256/ECP_256",
        "ESP:CHACHA20_POLY1305",
    ),
    "v4-aesgcm128-x25519": (
        _case("aes128gcm16-prfsha256-x25519", "aes128gcm16", ipv6=False),
        "AES_GCM_16-128/PRF_HMAC_SHA2_256/CURVE_25519",
        "ESP:AES_GCM_16-128",
    ),
}


@pytest.fixture
def make_lab() -> Iterator[list[KeymgrLab]]:
    """Labs a test builds (with its case); all of them are cleaned up, also on failure."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    labs: list[KeymgrLab] = []
    try:
        yield labs
    finally:
        for lab in labs:
            lab.cleanup()


def _wait_log(lab: KeymgrLab, needle: str, timeout: float = 15.0) -> str:
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = (lab.workdir / "keymgr.log").read_text(errors="replace")
        if needle in text:
            return text
        time.sleep(0.2)
    return text


def _records(text: str, msg: str) -> list[dict[str, object]]:
    """keymgr's JSON log records with this message."""
    out = []
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("msg") == msg:
            out.append(rec)
    return out


def _check_established(lab: KeymgrLab, sas: str, ike_algs: str, esp_algs: str) -> None:
    """swanctl's view matches the case and our worker holds the same Child SA."""
    case = lab.case
    assert "ESTABLISHED" in sas, f"{sas}\n{lab.logs()}"
    assert ike_algs in sas, f"IKE algorithms {ike_algs!r} not in\n{sas}"
    assert re.search(rf"INSTALLED, TUNNEL-in-UDP, .*{re.escape(esp_algs)}\b", sas), sas
    h = case.host_len
    assert f"local  {case.inner[1]}/{h}" in sas and f"remote {case.inner[0]}/{h}" in sas, sas
    assert lab.client is not None
    ours = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        ours = lab.client.list_sas()
        if len(ours) == 2:
            break
        time.sleep(0.1)
    assert len(ours) == 2, f"{ours}\n{lab.logs()}"
    by_dir = {s.direction: s for s in ours}
    spi_in_b = re.search(r"\bin\s+([0-9a-f]{8})", sas)
    spi_out_b = re.search(r"\bout\s+([0-9a-f]{8})", sas)
    assert spi_in_b and spi_out_b, sas
    assert by_dir[Direction.OUTBOUND].spi == int(spi_in_b.group(1), 16)
    assert by_dir[Direction.INBOUND].spi == int(spi_out_b.group(1), 16)


def _check_traffic(lab: KeymgrLab, ping_from_a: bool) -> None:
    ping = lab.ping() if ping_from_a else lab.ping_from_b()  # type: ignore[attr-defined]
    assert ping.returncode == 0, f"{ping.stdout}{ping.stderr}\n{lab.logs()}"
    assert "3 packets transmitted, 3 received" in ping.stdout, ping.stdout
    sent, got = lab.tcp_transfer(from_a=ping_from_a)
    print(f"tcp: sender {sent}, receiver {got}")
    assert got["bytes"] == sent["bytes"] == 256 * 1024
    assert sent["sha256"] == got["sha256"] == sent["peer_sha256"]
    assert lab.client is not None
    counts = {s.direction.name.lower(): s.packets for s in lab.client.list_sas()}
    assert counts["outbound"] >= 10 and counts["inbound"] >= 10, counts


def _check_keymgr_log(lab: KeymgrLab, text: str, role: str) -> None:
    (rec,) = _records(text, "child installed")
    assert rec["esp"] == lab.case.keymgr_esp[0] and rec["mode"] == lab.case.mode, rec
    assert rec["role"] == role, rec
    (ike,) = _records(text, "ike established")
    assert ike["ike"] in {parse_ike(s).name for s in lab.case.keymgr_ike}, ike
    assert lab.psk not in text.lower()


@pytest.mark.parametrize("name", list(INITIATOR_CASES))
def test_keymgr_initiates_to_strongswan(make_lab: list[KeymgrLab], name: str) -> None:
    case, ike_algs, esp_algs = INITIATOR_CASES[name]
    lab = KeymgrLab(case)
    make_lab.append(lab)
    lab.start_responder()
    lab.start_worker()
    keymgr = lab.start_keymgr()
    sas = ""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert keymgr.poll() is None, f"keymgr exited {keymgr.returncode}\n{lab.logs()}"
        sas = lab.list_sas_b()
        if "ESTABLISHED" in sas and "INSTALLED" in sas:
            break
        time.sleep(0.3)
    print(sas)
    _check_established(lab, sas, ike_algs, esp_algs)
    _check_traffic(lab, ping_from_a=True)
    text = _wait_log(lab, "child installed")
    _check_keymgr_log(lab, text, "initiator")
    if "invalid-ke" in name:
        (rec,) = _records(text, "ike_sa_init resent")
        assert rec["reason"] == "INVALID_KE_PAYLOAD" and rec["dh_group"] == 19, rec
        charon = lab.log("charon-b.log", 400)
        assert "DH group ECP_384 unacceptable, requesting ECP_256" in charon, charon


@pytest.mark.parametrize("name", list(RESPONDER_CASES))
def test_strongswan_initiates_to_keymgr(make_lab: list[KeymgrLab], name: str) -> None:
    case, ike_algs, esp_algs = RESPONDER_CASES[name]
    lab = ResponderLab(case)
    make_lab.append(lab)
    lab.start_worker()
    keymgr = lab.start_responder_keymgr()
    lab.wait_punt_connected(keymgr)
    lab.start_initiator_charon()
    init = lab.initiate()
    print(init.stdout[-1500:])
    assert init.returncode == 0, f"{init.stdout[-2000:]}\n{lab.logs()}"
    sas = lab.list_sas_b()
    print(sas)
    _check_established(lab, sas, ike_algs, esp_algs)
    _check_traffic(lab, ping_from_a=False)
    text = _wait_log(lab, "child installed")
    _check_keymgr_log(lab, text, "responder")
    if "invalid-ke" in name:
        assert len(_records(text, "INVALID_KE_PAYLOAD sent")) == 1, text
        assert "peer didn't accept DH group ECP_256, it requested CURVE_25519" in init.stdout, (
            init.stdout
        )


# --- transport mode: negotiation against charon (see the module docstring) ----------------------


def test_transport_mode_keymgr_initiates(make_lab: list[KeymgrLab]) -> None:
    case = _case("aes256gcm16-prfsha256-x25519", "aes256gcm16", ipv6=False, mode="transport")
    lab = KeymgrLab(case)
    make_lab.append(lab)
    lab.start_responder()
    lab.start_worker()
    lab.start_keymgr()
    text = _wait_log(lab, "ike failed", timeout=20)
    charon = lab.log("charon-b.log", 400)
    print(charon)
    # our IKE_AUTH asks for transport mode; charon (responder) accepts it and tries to install
    # a transport-mode SA, which kernel-libipsec refuses, so it answers NO_PROPOSAL_CHOSEN
    assert "parsed IKE_AUTH request 1 [ IDi IDr AUTH N(USE_TRANSP) SA TSi TSr ]" in charon
    assert "IPsec SA: unsupported mode" in charon, charon
    failed = _records(text, "ike failed")
    assert failed and str(failed[0]["reason"]).endswith(
        "ESP proposals (aes256gcm16) in transport mode"
    ), failed
    assert lab.client is not None and lab.client.list_sas() == []


def test_transport_mode_strongswan_initiates(make_lab: list[KeymgrLab]) -> None:
    case = _case("aes256gcm16-prfsha256-x25519", "aes256gcm16", ipv6=True, mode="transport")
    lab = ResponderLab(case)
    make_lab.append(lab)
    lab.start_worker()
    keymgr = lab.start_responder_keymgr()
    lab.wait_punt_connected(keymgr)
    lab.start_initiator_charon()
    init = lab.initiate()
    print(init.stdout[-2500:])
    text = _wait_log(lab, "child installed", timeout=5)
    # keymgr (responder) answered USE_TRANSPORT_MODE and installed transport SAs; charon
    # had asked for it and then could not install it with kernel-libipsec
    recs = _records(text, "child installed")
    assert len(recs) == 1 and recs[0]["mode"] == "transport", f"{text}\n{init.stdout}"
    assert "parsed IKE_AUTH response 1 [ IDr AUTH N(USE_TRANSP) SA TSi TSr ]" in init.stdout
    assert "IPsec SA: unsupported mode" in init.stdout
    # charon then deletes the Child SA it could not install; keymgr removes its pair
    assert _records(_wait_log(lab, "child removed"), "child removed"), lab.logs()
    assert lab.client is not None and lab.client.list_sas() == []


# --- no common proposal --------------------------------------------------------------------------


def test_no_common_proposal_keymgr_initiates(make_lab: list[KeymgrLab]) -> None:
    case = _case(
        "aes256-sha256-modp3072",
        "aes256gcm16",
        ipv6=False,
        keymgr_ike=("aes128gcm16-prfsha256-x25519",),
    )
    lab = KeymgrLab(case)
    make_lab.append(lab)
    lab.start_responder()
    lab.start_worker()
    lab.start_keymgr()
    text = _wait_log(lab, "NO_PROPOSAL_CHOSEN")
    print(text)
    failed = _records(text, "ike failed")
    assert failed, lab.logs()
    assert failed[0]["reason"] == (
        "NO_PROPOSAL_CHOSEN: the responder accepted none of our IKE proposals "
        "(aes128gcm16-prfsha256-x25519)"
    ), failed
    charon = lab.log("charon-b.log", 400)
    print(charon)
    assert "received proposals: IKE:AES_GCM_16_128/PRF_HMAC_SHA2_256/CURVE_25519" in charon
    assert "received proposals unacceptable" in charon, charon
    assert "generating IKE_SA_INIT response 0 [ N(NO_PROP) ]" in charon, charon
    assert "ESTABLISHED" not in lab.list_sas_b()
    assert lab.client is not None and lab.client.list_sas() == []


def test_no_common_proposal_strongswan_initiates(make_lab: list[KeymgrLab]) -> None:
    case = _case(
        "aes256gcm16-prfsha256-x25519",
        "aes128gcm16",
        ipv6=True,
        keymgr_esp=("chacha20poly1305",),
    )
    lab = ResponderLab(case)
    make_lab.append(lab)
    lab.start_worker()
    keymgr = lab.start_responder_keymgr()
    lab.wait_punt_connected(keymgr)
    lab.start_initiator_charon()
    init = lab.initiate()
    print(init.stdout[-2000:])
    assert init.returncode != 0
    assert "received NO_PROPOSAL_CHOSEN notify" in init.stdout, init.stdout
    text = _wait_log(lab, "NO_PROPOSAL_CHOSEN")
    print(text)
    assert "ike failed" in text, text
    assert (
        "NO_PROPOSAL_CHOSEN: no ESP proposal of the initiator matches ours (chacha20poly1305)"
        in (text)
    ), text
    assert lab.client is not None and lab.client.list_sas() == []


# --- COOKIE (RFC 7296 §2.6) ------------------------------------------------------------------

_HALF_OPEN = """
import socket, sys
from services.core.ike.exchange import Ikev2Initiator, InitiatorConfig
a, b = sys.argv[1], sys.argv[2]
cfg = InitiatorConfig(local_addr=a, remote_addr=b, psk=b"x" * 32, ts_local=(a, a),
                      ts_remote=(b, b), local_port=5000)
(msg,) = Ikev2Initiator(cfg, now=0.0).start(0.0)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((a, 5000))
s.settimeout(3)
s.sendto(msg, (b, 500))
print(len(s.recv(4096)))
"""


def test_keymgr_answers_strongswan_cookie(make_lab: list[KeymgrLab]) -> None:
    """charon demands cookies once one IKE SA is half-open (cookie_threshold = 1): a first
    IKE_SA_INIT from another port of A leaves one half-open; keymgr's IKE_SA_INIT then gets a
    COOKIE, which it sends back first in a new IKE_SA_INIT, and the SA comes up."""
    case = Case(charon_settings=("cookie_threshold = 1",))
    lab = KeymgrLab(case)
    make_lab.append(lab)
    lab.start_responder()
    lab.start_worker()
    addrs = (bsw.OUTER_A, bsw.OUTER_B)
    half = subprocess.run(
        ["ip", "netns", "exec", lab.bench.ns_a, sys.executable, "-c", _HALF_OPEN, *addrs],
        capture_output=True,
        text=True,
        timeout=20,
        cwd=REPO,
        env=_env(),
        check=False,
    )
    assert half.returncode == 0, half.stderr
    keymgr = lab.start_keymgr()
    sas = ""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert keymgr.poll() is None, lab.logs()
        sas = lab.list_sas_b()
        if sas.count("ESTABLISHED") == 1 and "INSTALLED" in sas:
            break
        time.sleep(0.3)
    charon = lab.log("charon-b.log", 400)
    print(charon)
    assert "generating IKE_SA_INIT response 0 [ N(COOKIE) ]" in charon, charon
    assert re.search(r"parsed IKE_SA_INIT request 0 \[ N\(COOKIE\) SA KE No", charon), charon
    assert "INSTALLED" in sas, f"{sas}\n{lab.logs()}"
    text = _wait_log(lab, "child installed")
    (rec,) = _records(text, "ike_sa_init resent")
    assert rec["reason"] == "COOKIE", rec
    ping = lab.ping()
    assert ping.returncode == 0, f"{ping.stdout}{ping.stderr}\n{lab.logs()}"
