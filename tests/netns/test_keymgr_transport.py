"""Transport mode negotiated by keymgr in both roles, with traffic, between two of our workers.

strongSwan cannot carry transport-mode traffic on this kernel (kernel-libipsec installs tunnel
SAs only; see test_keymgr_matrix.py, which proves the USE_TRANSPORT_MODE negotiation against
charon in both roles). Here one keymgr initiates (worker A) and one responds (worker B) in the
dataplane lab (services/dataplane/lab.py: two namespaces, a worker in each that routes the
peer's outer address into its TUN), configured for transport mode with AES-CBC-256 +
HMAC-SHA2-256 over an ECP-384 IKE SA, for IPv4 and IPv6.

Asserts: both keymgrs log the Child SA installed in transport mode with that suite; both
workers hold transport-mode SAs with the same SPIs crosswise; ping between the outer addresses
and a 256 KiB TCP transfer (SHA-256 computed by sender and receiver, compared) go through the
SAs, which count the packets; tshark, reading the capture on the link, finds every frame of
that traffic inside ESP (no clear TCP/ICMP). keymgr processes, workers and namespaces are
removed also on failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from services.core.sa import Direction, Mode
from services.dataplane.lab import SIDE_A, SIDE_B, Lab, lab, netns_supported
from tests.netns import tshark as ts

pytestmark = pytest.mark.netns

REPO = pathlib.Path(__file__).resolve().parents[2]
IKE = "aes256gcm16-prfsha384-ecp384"
ESP = "aes256-sha256"


@pytest.fixture
def tlab() -> Iterator[Lab]:
    ok, why = netns_supported()
    if not ok:
        pytest.skip(why)
    for tool in ("tshark", "tcpdump", "ping"):
        if not any(
            os.access(os.path.join(d, tool), os.X_OK) for d in os.environ["PATH"].split(":")
        ):
            pytest.skip(f"{tool} not installed")
    with lab(prefix="kmt") as lb:
        yield lb


def _keymgr(
    lb: Lab,
    procs: list[subprocess.Popen[bytes]],
    side: str,
    fam: int,
    psk_file: pathlib.Path,
    *,
    mode: str = "transport",
    child: dict[str, object] | None = None,
    extra_args: tuple[str, ...] = (),
) -> pathlib.Path:
    """Start keymgr for lab side ``side`` (a initiates, b responds); ``child`` replaces the
    Child SA proposals (e.g. ``{"ah_proposals": [...]}``, other connection fields may come
    along), ``extra_args`` go to keymgr."""
    me, peer = (SIDE_A, SIDE_B) if side == "a" else (SIDE_B, SIDE_A)
    plen = 32 if fam == 4 else 128
    sa_mode = Mode.TRANSPORT if mode == "transport" else Mode.TUNNEL
    conn = {
        "name": f"{mode}-{side}",
        "local_addr": me.outer(fam),
        "remote_addr": peer.outer(fam),
        "psk_file": str(psk_file),
        "local_ts": f"{me.inner(fam, sa_mode)}/{plen}",
        "remote_ts": f"{peer.inner(fam, sa_mode)}/{plen}",
        "start_action": "start" if side == "a" else "respond",
        "ike_proposals": [IKE],
        **(child or {"esp_proposals": [ESP]}),
        "mode": mode,
    }
    cfg = lb.workdir / f"keymgr-{side}.json"
    cfg.write_text(json.dumps({"connections": [conn]}))
    log = lb.workdir / f"keymgr-{side}.log"
    node = lb.node(side)
    argv = [sys.executable, "-m", "services.keymgr", "--config", str(cfg)]
    argv += ["--dataplane", f"unix:{node.socket_path}", "--tls-dir", str(lb.pki)]
    argv += ["--server-name", node.worker_id, "--client-name", "client", "--log-level", "debug"]
    argv += extra_args
    path = os.environ.get("PYTHONPATH", "")
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{path}", "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as out:
        procs.append(
            subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env=env,
                start_new_session=True,
            )
        )
    return log


def _wait(log: pathlib.Path, needle: str, proc: subprocess.Popen[bytes], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"keymgr exited {proc.returncode}\n{text}"
        text = log.read_text(errors="replace")
        if needle in text:
            return text
        time.sleep(0.2)
    pytest.fail(f"{needle!r} not logged by {log.name}:\n{text}")


def _installed(text: str) -> dict[str, object]:
    recs = [json.loads(x) for x in text.splitlines() if '"child installed"' in x]
    assert len(recs) == 1, text
    rec: dict[str, object] = recs[0]
    return rec


@pytest.mark.parametrize("fam", [4, 6])
def test_transport_mode_between_two_keymgrs(tlab: Lab, fam: int) -> None:
    lb = tlab
    psk_file = lb.workdir / "psk"
    fd = os.open(psk_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    secret = secrets.token_hex(32)
    with os.fdopen(fd, "w") as f:
        f.write(f"0x{secret}\n")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        log_b = _keymgr(lb, procs, "b", fam, psk_file)
        _wait(log_b, "punt stream connected", procs[0], 20)
        log_a = _keymgr(lb, procs, "a", fam, psk_file)
        text_a = _wait(log_a, "child installed", procs[1], 20)
        text_b = _wait(log_b, "child installed", procs[0], 5)
        for text, role in ((text_a, "initiator"), (text_b, "responder")):
            rec = _installed(text)
            assert (rec["mode"], rec["esp"], rec["role"]) == ("transport", ESP, role), rec
            assert secret not in text.lower()
        sas = {n.label: {s.direction: s for s in n.dp().list_sas()} for n in lb.nodes}
        for label in ("a", "b"):
            assert {s.mode for s in sas[label].values()} == {"transport"}, sas[label]
            assert all(s.encap and s.integ for s in sas[label].values()), sas[label]
        assert sas["a"][Direction.OUTBOUND].spi == sas["b"][Direction.INBOUND].spi
        assert sas["b"][Direction.OUTBOUND].spi == sas["a"][Direction.INBOUND].spi

        a_addr, b_addr = SIDE_A.outer(fam), SIDE_B.outer(fam)
        with lb.capturing(lb.a, f"transport{fam}") as cap:
            ping = lb.ping(lb.a, b_addr, src=a_addr, count=3)
            assert ping.ok, f"{ping.output}\n{lb.diagnostics()}"
            xfer = lb.tcp_transfer(lb.a, a_addr, lb.b, b_addr, 256 * 1024)
        assert xfer.ok, xfer
        assert xfer.sender_sha256 == xfer.receiver_sha256
        counts = {s.direction: s.packets for s in lb.a.dp().list_sas()}
        assert counts[Direction.OUTBOUND] >= 10 and counts[Direction.INBOUND] >= 10, counts
        frames = ts.frames(cap.path)
        traffic = [f for f in frames if not f.link_control]
        assert sum("esp" in f.protocols for f in traffic) >= 20, ts.summary(frames)
        clear = [f for f in traffic if not f.protected and f.inner_l4() in ("tcp", "icmp")]
        assert clear == [], ts.summary(clear)
    finally:
        _stop(procs)


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """Stop the keymgr processes (SIGTERM, then SIGKILL after 10 s), newest first."""
    for p in reversed(procs):
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=5)
