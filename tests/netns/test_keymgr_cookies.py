"""keymgr as IKEv2 responder under a spoofed IKE_SA_INIT flood: COOKIEs (RFC 7296 §2.6).

The lab of ``test_keymgr_responder_strongswan`` (namespace A: our worker, keymgr on the host
behind it; namespace B: charon as a legitimate initiator) plus a flood. keymgr only answers
IKE_SA_INITs from configured peers, so the flood that costs it state is one that spoofs
configured peers' addresses: keymgr gets one responder connection per address of the
test-only prefix 198.18.0.0/24 (RFC 2544 benchmarking space) besides the one for charon. A
sender inside B writes IKE_SA_INIT requests (made by our initiator, a fresh SPIi per packet)
with raw sockets from 240 spoofed sources of that prefix to keymgr's worker. A routes the
prefix to B and B blackholes it, so every answer to a spoofed address ends inside B.

Asserts, while the flood runs: keymgr switched cookies on (its "ike cookies demanded" line)
after exactly ``threshold`` responders for spoofed addresses; no further state was created for
them (log and counters); charon, which handles the COOKIE itself, still establishes — its log
shows it parsed our ``N(COOKIE)`` and sent it back first, and keymgr counted that cookie
valid; ping through the tunnel works. After: tshark decodes the answers captured in B as
IKE_SA_INIT responses carrying only a COOKIE notify, as many as keymgr counted for the flood;
keymgr's log holds no PSK. Everything (processes, namespaces, files) is removed also on
failure.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from scripts import bench_strongswan as bsw
from services.core.ike.exchange import Ikev2Initiator, InitiatorConfig
from tests.netns.test_keymgr_responder_strongswan import ResponderLab
from tests.netns.test_keymgr_strongswan import CLIENT, WORKER_ID, _skip_reason

pytestmark = pytest.mark.netns

SPOOF_NET = ipaddress.IPv4Network("198.18.0.0/24")
SPOOFED = [str(SPOOF_NET[i]) for i in range(10, 250)]  # 240 source addresses
THRESHOLD = 10
FLOOD_PPS = 200
FLOOD_SECONDS = 25  # below keymgr's 30 s half-open expiry: the flood's state never expires

# Runs inside namespace B: argv = templates file, pps, seconds, sources (comma separated).
# Raw IPv4 (IPPROTO_RAW: the header is ours, the kernel fills in the checksum and ID); UDP
# checksum 0 (none, allowed over IPv4). Bounded in count and time; prints the count sent.
FLOOD_SENDER = r"""
import os, socket, struct, sys, time
templates = [bytes.fromhex(x) for x in open(sys.argv[1]).read().split()]
pps, seconds, sources = int(sys.argv[2]), float(sys.argv[3]), sys.argv[4].split(",")
dst = sys.argv[5]
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
sent, start = 0, time.monotonic()
while sent < pps * seconds and time.monotonic() - start < seconds + 5:
    ike = os.urandom(8) + templates[sent % len(templates)][8:]
    udp = struct.pack("!HHHH", 500, 500, 8 + len(ike), 0) + ike
    src = sources[sent % len(sources)]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    s.sendto(ip + udp, (dst, 0))
    sent += 1
    time.sleep(max(0.0, start + sent / pps - time.monotonic()))
print(sent, flush=True)
"""


class CookieLab(ResponderLab):
    """ResponderLab with keymgr also configured for the spoofed peers, and the flood."""

    def start_keymgr_with_spoofed_peers(self) -> subprocess.Popen[bytes]:
        psk_file = self.workdir / "psk"
        fd = os.open(psk_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"0x{self.psk}\n")
        conn: dict[str, Any] = {
            "local_addr": bsw.OUTER_A,
            "local_id": bsw.OUTER_A,
            "psk_file": str(psk_file),
            "local_ts": f"{bsw.INNER_A}/32",
            "remote_ts": f"{bsw.INNER_B}/32",
            "start_action": "respond",
        }
        conns = [{**conn, "name": "from-b", "remote_addr": bsw.OUTER_B}]
        conns += [{**conn, "name": f"spoofed-{a}", "remote_addr": a} for a in SPOOFED]
        cfg_file = self.workdir / "keymgr.json"
        cfg_file.write_text(json.dumps({"connections": conns}))
        argv = [sys.executable, "-m", "services.keymgr", "--config", str(cfg_file)]
        argv += ["--dataplane", f"unix:{self.sock}", "--tls-dir", str(self.pki)]
        # debug: the check counts the "ike responding" lines (one per responder created)
        argv += ["--server-name", WORKER_ID, "--client-name", CLIENT, "--log-level", "debug"]
        argv += ["--cookie-threshold", str(THRESHOLD), "--cookie-period", "5"]
        return self._popen(argv, "keymgr.log")

    def route_spoofed_prefix(self) -> None:
        """Answers to the spoofed prefix go from A to B, and B drops them (never beyond)."""
        b = self.bench
        bsw._run(["ip", "-n", b.ns_b, "route", "add", "blackhole", str(SPOOF_NET)])
        bsw._run(["ip", "-n", b.ns_a, "route", "add", str(SPOOF_NET), "via", bsw.OUTER_B])

    def start_capture(self) -> subprocess.Popen[bytes]:
        pcap = self.workdir / "spoofed.pcap"
        argv = [
            "ip",
            "netns",
            "exec",
            self.bench.ns_b,
            "tcpdump",
            "-i",
            "veth0",
            "-n",
            "-U",
            "--immediate-mode",
        ]
        argv += ["-w", str(pcap), "udp and dst net", str(SPOOF_NET)]
        proc = self._popen(argv, "tcpdump.log")
        deadline = time.monotonic() + 10
        while "listening on" not in self.log("tcpdump.log"):
            assert proc.poll() is None and time.monotonic() < deadline, self.log("tcpdump.log")
            time.sleep(0.1)
        return proc

    def start_flood(self) -> subprocess.Popen[bytes]:
        templates = []
        for i in range(8):  # IKE_SA_INITs from our initiator; the sender varies the SPIi
            cfg = InitiatorConfig(
                local_addr=SPOOFED[i],
                remote_addr=bsw.OUTER_A,
                psk=b"flood",
                ts_local=(bsw.INNER_B, bsw.INNER_B),
                ts_remote=(bsw.INNER_A, bsw.INNER_A),
            )
            (data,) = Ikev2Initiator(cfg, now=0.0).start(0.0)
            templates.append(data.hex())
        tfile = self.workdir / "templates.txt"
        tfile.write_text("\n".join(templates))
        argv = ["ip", "netns", "exec", self.bench.ns_b, sys.executable, "-c", FLOOD_SENDER]
        argv += [str(tfile), str(FLOOD_PPS), str(FLOOD_SECONDS), ",".join(SPOOFED), bsw.OUTER_A]
        return self._popen(argv, "flood.log")

    def records(self) -> list[dict[str, Any]]:
        out = []
        text = (self.workdir / "keymgr.log").read_text(errors="replace")
        for line in text.splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
        return out

    def wait_log(self, msg: str, keymgr: subprocess.Popen[bytes], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any(r.get("msg") == msg for r in self.records()):
            assert keymgr.poll() is None, f"keymgr exited\n{self.logs()}"
            if time.monotonic() > deadline:
                pytest.fail(f"no {msg!r} in keymgr's log\n{self.logs()}")
            time.sleep(0.2)


@pytest.fixture
def clab() -> Iterator[CookieLab]:
    reason = _skip_reason() or next(
        (f"{t} not installed" for t in ("tcpdump", "tshark") if shutil.which(t) is None), None
    )
    if reason:
        pytest.skip(reason)
    lab = None
    try:
        lab = CookieLab()
        yield lab
    finally:
        if lab is not None:
            lab.cleanup()  # keymgr, worker, charon, flood, tcpdump, namespaces, workdir


def test_cookies_under_spoofed_flood_and_strongswan_still_establishes(clab: CookieLab) -> None:
    clab.route_spoofed_prefix()
    clab.start_worker()
    keymgr = clab.start_keymgr_with_spoofed_peers()
    clab.wait_punt_connected(keymgr)
    clab.start_initiator_charon()
    capture = clab.start_capture()

    flood = clab.start_flood()
    clab.wait_log("ike cookies demanded", keymgr, timeout=15)
    t_on = time.monotonic()

    init = clab.initiate()  # charon: IKE_SA_INIT -> N(COOKIE) -> retry with it -> IKE_AUTH
    print(init.stdout[-1500:])
    assert init.returncode == 0, f"{init.stdout[-2000:]}\n{clab.logs()}"
    sas = clab.list_sas_b()
    assert re.search(r"ESTABLISHED, IKEv2, [0-9a-f]{16}_i\* [0-9a-f]{16}_r", sas), sas
    ping = clab.ping_from_b()
    print(ping.stdout)
    assert ping.returncode == 0, f"{ping.stdout}{ping.stderr}\n{clab.logs()}"
    assert re.search(r"3 packets transmitted, 3 received", ping.stdout), ping.stdout
    assert flood.poll() is None, "the flood ended before charon established and pinged"
    during = time.monotonic() - t_on
    print(f"established and pinged {during:.1f} s after cookies were switched on")

    flood.wait(timeout=FLOOD_SECONDS + 30)
    assert flood.returncode == 0, clab.log("flood.log")
    flood_sent = int(clab.log("flood.log").split()[-1])
    assert flood_sent >= FLOOD_PPS * FLOOD_SECONDS * 0.9, flood_sent
    time.sleep(6.5)  # the counters line is rate-limited to one per 5 s
    capture.terminate()
    capture.wait(timeout=10)

    recs = clab.records()
    counters = [r for r in recs if r.get("msg") == "ike cookies"]
    assert counters, clab.logs()
    last = counters[-1]
    print(f"flood sent {flood_sent}; keymgr cookie counters: {last}")
    # state: exactly `threshold` responders for spoofed peers, then none; one for charon
    responding = [r for r in recs if r.get("msg") == "ike responding"]
    spoofed = [r for r in responding if ipaddress.ip_address(r["remote"]) in SPOOF_NET]
    assert len(spoofed) == THRESHOLD, [r["remote"] for r in responding]
    assert [r["remote"] for r in responding if r not in spoofed] == [bsw.OUTER_B]
    assert all(c["half_open"] <= THRESHOLD + 1 for c in counters), counters
    assert all(c["responders"] <= THRESHOLD + 1 for c in counters), counters
    assert last["demanding"] is True
    assert last["valid"] == 1  # charon's retry: the only initiator that can see its cookie
    assert last["sent"] >= (flood_sent - THRESHOLD) * 0.9, (last, flood_sent)
    assert last["invalid"] == 0 and last["malformed"] == 0, last
    dropped = [r for r in recs if "too many half-open" in str(r.get("msg"))]
    assert not dropped, "the hard cap was never needed"

    # strongSwan as the oracle for the COOKIE notify format: parsed, and sent back first
    charon = (clab.workdir / "charon-b.log").read_text(errors="replace")
    assert re.search(r"parsed IKE_SA_INIT response 0 \[ N\(COOKIE\) \]", charon), charon[-3000:]
    assert re.search(r"generating IKE_SA_INIT request 0 \[ N\(COOKIE\) SA KE No", charon), charon[
        -3000:
    ]

    # tshark: what reached B for the spoofed addresses is only COOKIE responses from keymgr
    fields = ["ip.src", "ip.dst", "isakmp.exchangetype", "isakmp.rspi", "isakmp.notify.msgtype"]
    cmd = ["tshark", "-r", str(clab.workdir / "spoofed.pcap"), "-d", "udp.port==500,isakmp"]
    cmd += ["-T", "fields", "-E", "separator=|"]
    for f in fields:
        cmd += ["-e", f]
    rows = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
    frames = [line.split("|") for line in rows.splitlines() if line]
    cookie_frames = [
        f
        for f in frames
        if f[0] == bsw.OUTER_A and f[2] == "34" and f[3] == "0000000000000000" and f[4] == "16390"
    ]
    other = [f for f in frames if f not in cookie_frames]
    print(f"{len(frames)} frames to spoofed addresses, {len(cookie_frames)} COOKIE responses")
    assert len(other) == THRESHOLD, other[:20]  # the responses of the first `threshold`
    assert all(ipaddress.ip_address(f[1]) in SPOOF_NET for f in frames)
    # every cookie keymgr sent for the flood was seen in B (charon's one went to B's address)
    assert last["sent"] - 2 <= len(cookie_frames) <= last["sent"] - 1, (len(cookie_frames), last)

    keymgr.terminate()
    assert keymgr.wait(timeout=10) == 0, clab.logs()
    assert clab.psk not in (clab.workdir / "keymgr.log").read_text(errors="replace").lower()
