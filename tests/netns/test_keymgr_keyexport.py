"""keymgr's operator API and Wireshark key export against strongSwan 5.9.8, with tshark as the
oracle.

Same lab as tests/netns/test_keymgr_strongswan.py (KeymgrLab: keymgr initiates towards charon
in namespace B through our worker in namespace A; unique namespace names; everything removed on
failure). keymgr runs with ``--api-listen`` (mTLS unix socket) and ``--export-keys``; tcpdump
in namespace A captures all IKE (UDP 500/4500) and ESP on the veth.

Sequence: first IKE SA up (start_action start) -> ping -> ``ctl --list-sas`` and the API list
the SAs with the SPIs charon shows -> ``ctl --terminate`` (INFORMATIONAL Delete from us) ->
Initiate through the API -> ping -> Terminate by IKE SA id -> SIGTERM.

Asserts: the API listed the IKE and Child SAs (SPIs equal to charon's, worker counters >= the
pings), WatchEvents streamed up / child_up / child_down / down with the operator as the reason,
tshark decrypts EVERY captured IKEv2 message that has an Encrypted payload with the exported
ikev2_decryption_table lines (IKE_AUTH and INFORMATIONAL of both IKE SAs, both directions; no
malformed frame, no expert error) and every ESP packet with the exported esp_sa lines (ICV good,
ICMP inside); without the key file tshark decrypts nothing (the check can fail); the key file
is mode 0600 and keymgr's log holds no key and a single key-export warning.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator

import grpc
import pytest

from scripts import bench_strongswan as bsw
from services.pb.ipsec.v1 import keymgr_pb2 as pb
from services.pb.ipsec.v1 import keymgr_pb2_grpc as pb_grpc
from services.runtime import tls
from tests.netns import tshark
from tests.netns.test_keymgr_strongswan import (
    CLIENT,
    REPO,
    KeymgrLab,
    _env,
    _skip_reason,
    open_lab,
)
from tests.unit.test_keymgr_api import Watcher

pytestmark = pytest.mark.netns

ADMIN = "admin"
WAIT = 20.0


@pytest.fixture
def lab() -> Iterator[KeymgrLab]:
    reason = _skip_reason()
    if reason is None and not (tshark.available() and os.access("/usr/bin/tcpdump", os.X_OK)):
        reason = "tshark and tcpdump are needed"
    if reason:
        pytest.skip(reason)
    yield from open_lab(KeymgrLab)


def start_capture(kl: KeymgrLab) -> subprocess.Popen[bytes]:
    """tcpdump on A's veth (IKE on 500/4500, ESP in UDP, plain ESP); returns once capturing."""
    pcap = kl.workdir / "link.pcap"
    argv = [
        "ip",
        "netns",
        "exec",
        kl.bench.ns_a,
        "tcpdump",
        "-i",
        "veth0",
        "-U",
        "-n",
        "--immediate-mode",
    ]
    argv += ["-w", str(pcap), "udp port 500 or udp port 4500 or esp"]
    err = kl.workdir / "tcpdump.log"
    with err.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=out, start_new_session=True)
    kl.bench.procs.append(proc)
    deadline = time.monotonic() + 10
    while "listening on" not in err.read_text(errors="replace"):
        assert proc.poll() is None, err.read_text(errors="replace")
        assert time.monotonic() < deadline, "tcpdump did not start"
        time.sleep(0.1)
    return proc


def stop_capture(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout=10)


def ctl(kl: KeymgrLab, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "services.keymgr.ctl", "--api", f"unix:{kl.workdir}/api.sock"]
    argv += ["--tls-dir", str(kl.pki), "--server-name", CLIENT, "--client-name", ADMIN, *args]
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=60, cwd=REPO, env=_env(), check=False
    )


def wait_established(stub: pb_grpc.KeyManagerStub, kl: KeymgrLab, not_id: int = 0) -> pb.IkeSaInfo:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        with contextlib.suppress(grpc.RpcError):
            for sa in stub.ListIkeSas(pb.ListIkeSasRequest(), timeout=5).ike_sas:
                if sa.state == "established" and sa.id != not_id:
                    kids = stub.ListChildSas(pb.ListChildSasRequest(), timeout=5).child_sas
                    if any(c.ike_sa_id == sa.id for c in kids):
                        return sa
        time.sleep(0.2)
    raise AssertionError(f"no established IKE SA\n{kl.logs()}")


def wait_b_empty(kl: KeymgrLab) -> None:
    deadline = time.monotonic() + WAIT
    while "ESTABLISHED" in kl.list_sas_b():
        assert time.monotonic() < deadline, f"charon still has an IKE SA\n{kl.logs()}"
        time.sleep(0.2)


def ping_ok(kl: KeymgrLab) -> None:
    p = kl.ping()
    assert p.returncode == 0, f"{p.stdout}{p.stderr}\n{kl.logs()}"
    assert re.search(r"3 packets transmitted, 3 received", p.stdout), p.stdout


def test_api_and_exported_keys_decrypt_every_ike_message_and_esp(lab: KeymgrLab) -> None:
    kl = lab
    subprocess.run(
        [sys.executable, "-m", "services.runtime.devpki", str(kl.pki), "--names", ADMIN],
        cwd=REPO,
        env=_env(),
        check=True,
        capture_output=True,
    )
    kl.start_responder()
    kl.start_worker()
    cap = start_capture(kl)
    keys = kl.workdir / "keys.txt"
    api_sock = kl.workdir / "api.sock"
    keymgr = kl.start_keymgr(
        extra_args=["--api-listen", f"unix:{api_sock}", "--export-keys", str(keys)]
    )
    deadline = time.monotonic() + WAIT
    while not api_sock.exists():
        assert keymgr.poll() is None, f"keymgr exited\n{kl.logs()}"
        assert time.monotonic() < deadline, kl.logs()
        time.sleep(0.1)
    ch = tls.secure_channel(f"unix:{api_sock}", kl.pki, server_name=CLIENT, client_name=ADMIN)
    stub = pb_grpc.KeyManagerStub(ch)
    watcher = Watcher(stub)
    try:
        # --- first IKE SA (start_action start) ---------------------------------------------
        sa1 = wait_established(stub, kl)
        ping_ok(kl)
        b_sas = kl.list_sas_b()
        assert sa1.spi_i in b_sas and sa1.spi_r in b_sas, b_sas
        assert (sa1.connection, sa1.role, sa1.local_addr, sa1.remote_addr) == (
            "to-b",
            "initiator",
            bsw.OUTER_A,
            bsw.OUTER_B,
        )
        assert sa1.encryption == "AES_GCM_16-256" and sa1.established_time > 0
        (c1,) = stub.ListChildSas(pb.ListChildSasRequest(), timeout=5).child_sas
        # charon's "in" SPI is our outbound one, its "out" our inbound one
        m_in = re.search(r"\bin\s+([0-9a-f]{8})", b_sas)
        m_out = re.search(r"\bout\s+([0-9a-f]{8})", b_sas)
        assert m_in and m_out, b_sas
        assert (c1.spi_in, c1.spi_out) == (m_out.group(1), m_in.group(1))
        assert c1.udp_encap and c1.counters_known, c1
        assert c1.packets_in >= 3 and c1.packets_out >= 3, c1
        assert list(c1.local_ts) == [f"{bsw.INNER_A}/32"]

        listing = ctl(kl, "--list-sas")
        print(listing.stdout)
        assert listing.returncode == 0, listing.stderr
        assert f"#{sa1.id}, ESTABLISHED" in listing.stdout and c1.spi_in in listing.stdout

        # --- terminate through the command line: our INFORMATIONAL Delete ------------------
        term = ctl(kl, "--terminate", "to-b")
        assert term.returncode == 0 and "Delete sent for 1" in term.stdout, term
        seen = watcher.until(pb.KEYMGR_EVENT_KIND_DOWN)
        down = seen[-1]
        assert down.ike_sa_id == sa1.id and "operator" in down.reason, seen
        assert any(
            e.kind == pb.KEYMGR_EVENT_KIND_CHILD_DOWN and e.spi_in == c1.spi_in for e in seen
        ), seen
        wait_b_empty(kl)
        bad = ctl(kl, "--initiate", "no-such-connection")
        assert bad.returncode == 1 and "NOT_FOUND" in bad.stderr, bad

        # --- second IKE SA through the API -------------------------------------------------
        r = stub.Initiate(pb.InitiateRequest(connection="to-b"), timeout=10)
        assert r.started, r.detail
        seen = watcher.until(pb.KEYMGR_EVENT_KIND_CHILD_UP)
        kinds = [e.kind for e in seen]
        assert pb.KEYMGR_EVENT_KIND_UP in kinds, seen
        sa2 = wait_established(stub, kl, not_id=sa1.id)
        assert sa2.id != sa1.id and sa2.spi_i != sa1.spi_i
        ping_ok(kl)
        t = stub.Terminate(pb.TerminateRequest(ike_sa_id=sa2.id), timeout=10)
        assert t.ike_sas == 1, t
        seen = watcher.until(pb.KEYMGR_EVENT_KIND_DOWN)
        assert seen[-1].ike_sa_id == sa2.id, seen
        wait_b_empty(kl)
    finally:
        watcher.close()
        ch.close()

    keymgr.terminate()
    assert keymgr.wait(timeout=15) == 0, kl.logs()
    stop_capture(cap)
    pcap = kl.workdir / "link.pcap"

    # --- the key file ------------------------------------------------------------------------
    assert stat.S_IMODE(keys.stat().st_mode) == 0o600
    lines = keys.read_text().splitlines()
    ike_lines = [x for x in lines if x.startswith("uat:ikev2_decryption_table:")]
    esp_lines = [x for x in lines if x.startswith("uat:esp_sa:")]
    assert len(ike_lines) == 2 and len(esp_lines) == 4, lines
    assert ike_lines[0].startswith(f"uat:ikev2_decryption_table:{sa1.spi_i},{sa1.spi_r},")

    # --- tshark: every IKEv2 message ---------------------------------------------------------
    prefs = tshark.key_file_prefs(keys)
    ike = tshark.ike_frames(pcap, prefs=prefs)
    for f in ike:
        print(f)
    encrypted = [f for f in ike if f.exchange != tshark.IKE_SA_INIT]
    # per IKE SA at least IKE_AUTH and our Delete, each a request and a response
    assert len([f for f in ike if f.exchange == tshark.IKE_SA_INIT]) >= 4, ike
    assert len(encrypted) >= 8, ike
    assert {f.exchange for f in encrypted} >= {35, 37}  # IKE_AUTH, INFORMATIONAL
    assert {f.spi_i for f in ike} == {sa1.spi_i, sa2.spi_i}, ike
    for f in ike:
        assert not f.malformed, f
    for f in encrypted:
        assert f.encrypted and f.decrypted, f
    auth = [f for f in encrypted if f.exchange == 35]
    # decrypted IKE_AUTH requests show IDi (35) and AUTH (39) from inside the SK payload
    assert all(35 in f.payloads and 39 in f.payloads for f in auth[::2]), auth
    deletes = [f for f in encrypted if f.exchange == 37 and 42 in f.payloads]
    assert len(deletes) >= 2, encrypted  # our two Delete requests, decrypted

    # the oracle can fail: without the keys nothing is decrypted
    plain = tshark.ike_frames(pcap)
    assert not any(f.decrypted for f in plain if f.exchange != tshark.IKE_SA_INIT)

    # --- tshark: every ESP packet ------------------------------------------------------------
    frames = tshark.frames(pcap, prefs=prefs)
    esp = [f for f in frames if "esp" in f.protocols]
    print(tshark.summary(frames))
    assert len(esp) >= 12, tshark.summary(frames)  # 2 pings x 3 echo x 2 directions
    for f in esp:
        assert f.icv_good and not f.icv_bad and f.inner_l4() == "icmp", f
        assert not f.malformed, f
    undecrypted = tshark.frames(pcap)
    assert not any(f.inner_l4() == "icmp" for f in undecrypted if "esp" in f.protocols)

    # --- no keys in the log; one warning ------------------------------------------------------
    log_text = (kl.workdir / "keymgr.log").read_text(errors="replace")
    assert log_text.count("key export is ON") == 1
    for line in lines:
        for secret in re.findall(r"(?:0x)?([0-9a-f]{40,})", line):
            assert secret not in log_text
    assert kl.psk not in log_text.lower()
