"""keymgr end to end against strongSwan 5.9.8: IKEv2 through our worker's punt/inject stream,
Child SA installed into our worker, ICMP through our dataplane and strongSwan's libipsec.

Namespace A (our side): a dataplane worker (TUN ipsec0, outer 192.0.2.1, site 198.51.100.1/32
on lo, 203.0.113.1/32 routed into the TUN). keymgr runs as a plain process on the host and
reaches the worker only over its mTLS unix socket. Namespace B: charon (kernel-libipsec) as a
PSK responder with local_ts 203.0.113.1/32, remote_ts 198.51.100.1/32 — it never initiates.

Asserts: swanctl on B shows the IKE SA ESTABLISHED and the Child SA INSTALLED with the SPIs our
worker holds; ``ping -I 198.51.100.1 203.0.113.1`` from A gets replies; both of our worker's
SAs counted packets; keymgr's log never contains the PSK. keymgr, worker, charon, the
namespaces and the temporary directory are removed also on failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from scripts import bench_strongswan as bsw
from services.core.engine import SaStatus
from services.core.sa import Direction
from services.dataplane.client import DataplaneClient

pytestmark = pytest.mark.netns

REPO = pathlib.Path(__file__).resolve().parents[2]
WORKER_ID = "worker-a"
CLIENT = "keymgr"


def _skip_reason() -> str | None:
    if not os.access(bsw.CHARON, os.X_OK):
        return f"strongSwan not installed ({bsw.CHARON} missing)"
    for tool in ("swanctl", "ping", "ip"):
        if shutil.which(tool) is None:
            return f"{tool} not installed"
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    return None


def _env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH", "")
    return {
        **os.environ,
        "PYTHONPATH": f"{REPO}{os.pathsep}{path}" if path else str(REPO),
        "PYTHONUNBUFFERED": "1",
    }


class KeymgrLab:
    """Namespaces A and B (veth), charon responder in B, our worker in A, keymgr on the host."""

    def __init__(self) -> None:
        self.bench = bsw.StrongSwanPair()
        tag = secrets.token_hex(4)
        self.bench.ns_a = f"kmg{tag}a"
        self.bench.ns_b = f"kmg{tag}b"
        self.workdir = self.bench.workdir
        self.pki = self.workdir / "pki"
        self.sock = self.workdir / "a.sock"
        self.psk = secrets.token_hex(32)  # strongSwan's
        self.psk_for_keymgr = self.psk  # a test may hand keymgr a different one
        self.client: DataplaneClient | None = None
        self.conn_extra: dict[str, Any] = {}  # merged into keymgr's connection (None: removed)
        self.bench.netns()  # also puts 198.51.100.1/32 on A's lo, 203.0.113.1/32 on B's lo

    def _popen(self, argv: list[str], log_name: str) -> subprocess.Popen[bytes]:
        with (self.workdir / log_name).open("wb") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env=_env(),
                start_new_session=True,
            )
        self.bench.procs.append(proc)  # bench.cleanup() kills the process group
        return proc

    def log(self, name: str, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            text = (self.workdir / name).read_text(errors="replace").splitlines()
            return "\n".join(text[-lines:])
        return ""

    def logs(self) -> str:
        return (
            f"--- keymgr ---\n{self.log('keymgr.log')}\n--- worker ---\n{self.log('worker.log')}"
            f"\n--- charon b ---\n{self.log('charon-b.log')}"
        )

    def charon_conf(self, psk: str) -> str:
        """swanctl.conf for charon in B (a test may return a certificate configuration)."""
        return bsw.swanctl_conf(bsw.OUTER_B, bsw.OUTER_A, bsw.INNER_B, bsw.INNER_A, psk)

    def charon_files(self, swanctl_dir: pathlib.Path) -> None:
        """Hook: put credentials into charon's swanctl directory before they are loaded."""

    def keymgr_connection(self, conn: dict[str, Any]) -> dict[str, Any]:
        merged = {**conn, **self.conn_extra}
        return {k: v for k, v in merged.items() if v is not None}

    def start_responder(self) -> None:
        b = self.bench
        proc = b.start_charon("b", b.ns_b, self.charon_conf(self.psk))
        self.charon_files(b.workdir / "b" / "swanctl")
        b.wait_vici("b", proc)
        b.swanctl(
            "b", "--load-all", "--noprompt", "--file", str(b.workdir / "b/swanctl/swanctl.conf")
        )

    def start_worker(self) -> None:
        devpki = [sys.executable, "-m", "services.runtime.devpki", str(self.pki)]
        subprocess.run(
            [*devpki, "--names", f"{WORKER_ID},{CLIENT}"],
            cwd=REPO,
            env=_env(),
            check=True,
            capture_output=True,
        )
        argv = ["ip", "netns", "exec", self.bench.ns_a, sys.executable, "-m", "services.dataplane"]
        argv += ["--worker-id", WORKER_ID, "--grpc-listen", f"unix:{self.sock}"]
        argv += ["--tls-dir", str(self.pki), "--tls-cert-name", WORKER_ID]
        argv += ["--tun", "ipsec0", "--tun-mtu", "1380", "--route", f"{bsw.INNER_B}/32"]
        argv += ["--local-address", bsw.OUTER_A, "--fwmark", "0x1ee", "--table", "1450"]
        argv += ["--metrics-listen", ""]
        proc = self._popen(argv, "worker.log")
        self.client = DataplaneClient(
            f"unix:{self.sock}", self.pki, server_name=WORKER_ID, client_name=CLIENT
        )
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, f"worker exited\n{self.log('worker.log')}"
            try:
                self.client.list_sas()
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def start_keymgr(self) -> subprocess.Popen[bytes]:
        psk_file = self.workdir / "psk"
        fd = os.open(psk_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"0x{self.psk_for_keymgr}\n")
        conn = {
            "name": "to-b",
            "local_addr": bsw.OUTER_A,
            "remote_addr": bsw.OUTER_B,
            "local_id": bsw.OUTER_A,
            "remote_id": bsw.OUTER_B,
            "psk_file": str(psk_file),
            "local_ts": f"{bsw.INNER_A}/32",
            "remote_ts": f"{bsw.INNER_B}/32",
            "start_action": "start",
        }
        cfg = {"connections": [self.keymgr_connection(conn)]}
        cfg_file = self.workdir / "keymgr.json"
        cfg_file.write_text(json.dumps(cfg))
        argv = [sys.executable, "-m", "services.keymgr", "--config", str(cfg_file)]
        argv += ["--dataplane", f"unix:{self.sock}", "--tls-dir", str(self.pki)]
        argv += ["--server-name", WORKER_ID, "--client-name", CLIENT, "--log-level", "debug"]
        return self._popen(argv, "keymgr.log")

    def list_sas_b(self) -> str:
        return self.bench.swanctl("b", "--list-sas")

    def ping(self) -> subprocess.CompletedProcess[str]:
        cmd = ["ip", "netns", "exec", self.bench.ns_a, "ping", "-c", "3", "-i", "0.3", "-W", "2"]
        cmd += ["-I", bsw.INNER_A, bsw.INNER_B]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)

    def cleanup(self) -> None:
        if self.client is not None:
            self.client.close()
        # keymgr first, then the worker and charon (reverse start order), namespaces, workdir
        for proc in reversed(self.bench.procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        self.bench.cleanup()


@pytest.fixture
def kmlab() -> Iterator[KeymgrLab]:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    lab = None
    try:
        lab = KeymgrLab()
        yield lab
    finally:
        if lab is not None:
            lab.cleanup()


def test_keymgr_establishes_with_strongswan_and_traffic_flows(kmlab: KeymgrLab) -> None:
    kmlab.start_responder()
    kmlab.start_worker()
    keymgr = kmlab.start_keymgr()

    sas = ""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        assert keymgr.poll() is None, f"keymgr exited {keymgr.returncode}\n{kmlab.logs()}"
        sas = kmlab.list_sas_b()
        if "ESTABLISHED" in sas and "INSTALLED" in sas:
            break
        time.sleep(0.3)
    print(sas)
    assert "ESTABLISHED" in sas and "INSTALLED" in sas, f"{sas}\n{kmlab.logs()}"
    assert re.search(r"INSTALLED, TUNNEL-in-UDP, .*ESP:AES_GCM_16-256", sas), sas
    assert f"local  {bsw.INNER_B}/32" in sas and f"remote {bsw.INNER_A}/32" in sas, sas

    # keymgr installs right after ESTABLISHED; wait until both SAs are in our worker.
    assert kmlab.client is not None
    ours: list[SaStatus] = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        ours = kmlab.client.list_sas()
        if len(ours) == 2:
            break
        time.sleep(0.1)
    assert len(ours) == 2, f"{ours}\n{kmlab.logs()}"
    by_dir = {s.direction: s for s in ours}
    # On B, "in" is B's SPI (our outbound), "out" is ours (our inbound).
    spi_in_b = re.search(r"\bin\s+([0-9a-f]{8})", sas)
    spi_out_b = re.search(r"\bout\s+([0-9a-f]{8})", sas)
    assert spi_in_b and spi_out_b, sas
    assert by_dir[Direction.OUTBOUND].spi == int(spi_in_b.group(1), 16)
    assert by_dir[Direction.INBOUND].spi == int(spi_out_b.group(1), 16)
    assert all(s.encap and s.reqid == ours[0].reqid != 0 for s in ours), ours

    ping = kmlab.ping()
    print(ping.stdout)
    assert ping.returncode == 0, f"{ping.stdout}{ping.stderr}\n{kmlab.logs()}"
    assert re.search(r"3 packets transmitted, 3 received", ping.stdout), ping.stdout

    counts = {s.direction.name.lower(): s.packets for s in kmlab.client.list_sas()}
    print(f"worker SA packets: {counts}")
    assert counts["outbound"] >= 3 and counts["inbound"] >= 3, counts

    # SIGTERM ends keymgr cleanly after deleting the IKE SA (see test_keymgr_delete_strongswan).
    keymgr.terminate()
    assert keymgr.wait(timeout=10) == 0, kmlab.logs()
    assert kmlab.client.list_sas() == []

    log_text = (kmlab.workdir / "keymgr.log").read_text(errors="replace")
    print(log_text)
    assert "ike established" in log_text and "child installed" in log_text, log_text
    assert kmlab.psk not in log_text.lower()


def test_keymgr_wrong_psk_installs_nothing(kmlab: KeymgrLab) -> None:
    kmlab.start_responder()
    kmlab.start_worker()
    kmlab.psk_for_keymgr = secrets.token_hex(32)
    keymgr = kmlab.start_keymgr()
    deadline = time.monotonic() + 15
    log_text = ""
    while time.monotonic() < deadline:
        assert keymgr.poll() is None, f"keymgr exited {keymgr.returncode}\n{kmlab.logs()}"
        log_text = (kmlab.workdir / "keymgr.log").read_text(errors="replace")
        if "AUTHENTICATION_FAILED" in log_text:
            break
        time.sleep(0.3)
    assert "ike failed" in log_text and "AUTHENTICATION_FAILED" in log_text, kmlab.logs()
    assert "ESTABLISHED" not in kmlab.list_sas_b()
    assert kmlab.client is not None and kmlab.client.list_sas() == []
    for secret in (kmlab.psk, kmlab.psk_for_keymgr):
        assert secret not in log_text.lower()
