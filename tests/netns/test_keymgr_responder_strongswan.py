"""keymgr as IKEv2 responder against strongSwan 5.9.8 as initiator, end to end.

Namespace A (our side): a dataplane worker (TUN ipsec0, outer 192.0.2.1, site 198.51.100.1/32
on lo, 203.0.113.1/32 routed into the TUN); keymgr runs on the host with a connection whose
``start_action`` is ``"respond"`` and reaches the worker only over its mTLS unix socket.
Namespace B: charon (kernel-libipsec) with local_ts 203.0.113.1/32, remote_ts 198.51.100.1/32,
started with ``swanctl --initiate --child``: its IKE_SA_INIT is punted by our worker to keymgr,
whose answers are injected back (UDP 500, then 4500 after the float).

Asserts: swanctl on B reports the IKE SA ESTABLISHED and the Child SA INSTALLED with the SPIs
our worker holds; ``ping -I 203.0.113.1 198.51.100.1`` from B (strongSwan's side) gets replies
through our worker; both of our worker's SAs counted packets; keymgr's log never contains the
PSK. A wrong PSK on strongSwan's side installs nothing. keymgr, the worker, charon, the
namespaces (prefix 'kmr') and the temporary directory are removed also on failure.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence

import pytest

from scripts import bench_strongswan as bsw
from services.core.engine import SaStatus
from services.core.sa import Direction
from tests.netns.test_keymgr_strongswan import (
    CLIENT,
    WORKER_ID,
    Case,
    KeymgrLab,
    open_lab,
)

pytestmark = pytest.mark.netns


class ResponderLab(KeymgrLab):
    """KeymgrLab with namespaces prefixed 'kmr', charon as initiator and keymgr responding."""

    def __init__(self, case: Case | None = None) -> None:
        super().__init__(case, prefix="kmr")  # self.psk is keymgr's
        self.psk_for_strongswan = self.psk

    def start_initiator_charon(self) -> None:
        if self.case != Case():
            self.start_charon_b(self.psk_for_strongswan)
            return
        b = self.bench
        proc = b.start_charon("b", b.ns_b, self.charon_conf(self.psk_for_strongswan))
        self.charon_files(b.workdir / "b" / "swanctl")
        b.wait_vici("b", proc)
        b.swanctl(
            "b", "--load-all", "--noprompt", "--file", str(b.workdir / "b/swanctl/swanctl.conf")
        )

    def start_responder_keymgr(
        self, extra: dict[str, object] | None = None, extra_args: Sequence[str] = ()
    ) -> subprocess.Popen[bytes]:
        """Start keymgr responding; ``extra`` adds connection fields (lifetimes, dpd, ...),
        ``extra_args`` command-line flags."""
        psk_file = self.workdir / "psk"
        fd = os.open(psk_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"0x{self.psk}\n")
        cfg = {"connections": [self.keymgr_connection("from-b", psk_file, "respond", extra)]}
        cfg_file = self.workdir / "keymgr.json"
        cfg_file.write_text(json.dumps(cfg))
        argv = [sys.executable, "-m", "services.keymgr", "--config", str(cfg_file)]
        argv += ["--dataplane", f"unix:{self.sock}", "--tls-dir", str(self.pki)]
        argv += ["--server-name", WORKER_ID, "--client-name", CLIENT, "--log-level", "debug"]
        return self._popen([*argv, *extra_args], "keymgr.log")

    def wait_punt_connected(self, keymgr: subprocess.Popen[bytes], timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert keymgr.poll() is None, f"keymgr exited {keymgr.returncode}\n{self.logs()}"
            if "punt stream connected" in self.log("keymgr.log", 200):
                return
            time.sleep(0.1)
        pytest.fail(f"keymgr did not connect its punt stream\n{self.logs()}")

    def initiate(self, child: str = bsw.CONN) -> subprocess.CompletedProcess[str]:
        cmd = ["swanctl", "--initiate", "--child", child, "--timeout", "20"]
        cmd += ["--uri", self.bench.vici("b")]
        return bsw._run(cmd, timeout=30, check=False)

    def ping_from_b(self, inner: tuple[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """3 pings from B's protected address to A's (``inner``: another (A, B) pair)."""
        in_a, in_b = inner or self.case.inner
        cmd = ["ip", "netns", "exec", self.bench.ns_b, "ping", "-c", "3", "-i", "0.3", "-W", "2"]
        cmd += ["-I", in_b, in_a]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)


@pytest.fixture
def rlab() -> Iterator[ResponderLab]:
    yield from open_lab(ResponderLab)


def test_strongswan_initiates_to_keymgr_responder_and_traffic_flows(rlab: ResponderLab) -> None:
    rlab.start_worker()
    keymgr = rlab.start_responder_keymgr()
    rlab.wait_punt_connected(keymgr)
    rlab.start_initiator_charon()

    init = rlab.initiate()
    print(init.stdout[-1500:])
    assert init.returncode == 0, f"{init.stdout[-2000:]}\n{rlab.logs()}"
    sas = rlab.list_sas_b()
    print(sas)
    # "bench: #1, ESTABLISHED, IKEv2, <spi_i>_i* <spi_r>_r"  (B initiated: '*' on _i)
    assert re.search(r"ESTABLISHED, IKEv2, [0-9a-f]{16}_i\* [0-9a-f]{16}_r", sas), sas
    assert re.search(r"INSTALLED, TUNNEL-in-UDP, .*ESP:AES_GCM_16-256", sas), sas
    assert f"local  {bsw.INNER_B}/32" in sas and f"remote {bsw.INNER_A}/32" in sas, sas

    assert rlab.client is not None
    ours: list[SaStatus] = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        ours = rlab.client.list_sas()
        if len(ours) == 2:
            break
        time.sleep(0.1)
    assert len(ours) == 2, f"{ours}\n{rlab.logs()}"
    by_dir = {s.direction: s for s in ours}
    # On B, "in" is B's SPI (our outbound), "out" is ours (our inbound).
    spi_in_b = re.search(r"\bin\s+([0-9a-f]{8})", sas)
    spi_out_b = re.search(r"\bout\s+([0-9a-f]{8})", sas)
    assert spi_in_b and spi_out_b, sas
    assert by_dir[Direction.OUTBOUND].spi == int(spi_in_b.group(1), 16)
    assert by_dir[Direction.INBOUND].spi == int(spi_out_b.group(1), 16)
    assert all(s.encap and s.reqid == ours[0].reqid != 0 for s in ours), ours

    ping = rlab.ping_from_b()
    print(ping.stdout)
    assert ping.returncode == 0, f"{ping.stdout}{ping.stderr}\n{rlab.logs()}"
    assert re.search(r"3 packets transmitted, 3 received", ping.stdout), ping.stdout

    counts = {s.direction.name.lower(): s.packets for s in rlab.client.list_sas()}
    print(f"worker SA packets: {counts}")
    assert counts["outbound"] >= 3 and counts["inbound"] >= 3, counts
    sas = rlab.list_sas_b()
    print(sas)
    assert re.search(r"\bin\s+[0-9a-f]{8},\s+\d+ bytes,\s+[3-9]\d* packets", sas), sas

    keymgr.terminate()
    assert keymgr.wait(timeout=10) == 0, rlab.logs()
    log_text = (rlab.workdir / "keymgr.log").read_text(errors="replace")
    print(log_text)
    assert "ike responding" in log_text and "child installed" in log_text, log_text
    assert '"role":"responder"' in log_text.replace(" ", ""), log_text
    assert rlab.psk not in log_text.lower()


def test_strongswan_wrong_psk_keymgr_responder_installs_nothing(rlab: ResponderLab) -> None:
    rlab.psk_for_strongswan = secrets.token_hex(32)
    rlab.start_worker()
    keymgr = rlab.start_responder_keymgr()
    rlab.wait_punt_connected(keymgr)
    rlab.start_initiator_charon()
    init = rlab.initiate()
    assert init.returncode != 0, init.stdout[-2000:]
    # charon may give up before keymgr's log line is flushed: wait for it briefly.
    log_text = ""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        log_text = (rlab.workdir / "keymgr.log").read_text(errors="replace")
        if "AUTHENTICATION_FAILED" in log_text:
            break
        time.sleep(0.1)
    assert "ike failed" in log_text and "AUTHENTICATION_FAILED" in log_text, rlab.logs()
    assert "ESTABLISHED" not in rlab.list_sas_b()
    assert rlab.client is not None and rlab.client.list_sas() == []
    assert keymgr.poll() is None, rlab.logs()
    for secret in (rlab.psk, rlab.psk_for_strongswan):
        assert secret not in log_text.lower()
