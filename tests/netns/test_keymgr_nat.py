"""keymgr against strongSwan 5.9.8 through a real NAT (nft masquerade in a middle namespace).

Topology (three namespaces per test, random names)::

    A (our worker, keymgr's peer side)        R (router, nft masquerade)        B (charon)
    192.0.2.1/31 ──────────────── 192.0.2.0/31 │ 192.0.2.3/31 ──────────────── 192.0.2.2/31
    198.51.100.1/32 on lo                                                     203.0.113.1/32 on lo

* keymgr behind the NAT initiates: R masquerades what leaves toward B, so charon sees the
  IKE and ESP of 192.0.2.1 coming from 192.0.2.3. NAT detection (RFC 7296 §2.23) moves IKE to
  4500 and the worker sends ESP in UDP (RFC 3948).
* charon behind the NAT initiates to keymgr: R masquerades what leaves toward A, keymgr sees
  charon (identity 192.0.2.2) at 192.0.2.0, the NAT's address, which its connection names as
  the peer's address.

keymgr's log names who is behind the NAT (``behind_nat`` true only in the first case): only
then are NAT keepalives asked for; a third case captures them at charon's side.

Each case asserts: IKE SA ESTABLISHED and Child SA INSTALLED on charon with the NAT's address
as the peer's, ping through the tunnel and a 1 MiB TCP stream whose SHA-256 is equal at both
ends, the masquerade rule's counter moved, and keymgr's log holds no PSK. Everything created
is removed also on failure.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest

from scripts import bench_strongswan as bsw
from tests.netns import tshark as ts
from tests.netns.nstools import tcp_sha256
from tests.netns.test_keymgr_responder_strongswan import ResponderLab
from tests.netns.test_keymgr_strongswan import KeymgrLab, open_lab

pytestmark = pytest.mark.netns

R_A, R_B = "192.0.2.0", "192.0.2.3"  # the router's addresses toward A and toward B


def _ip(*args: str) -> None:
    bsw._run(["ip", *args])


class NatPair(bsw.StrongSwanPair):
    """A — R — B with an nft masquerade on R's link toward ``toward`` ("a" or "b")."""

    def __init__(self, prefix: str, toward: str) -> None:
        super().__init__()
        tag = secrets.token_hex(3)
        self.ns_a, self.ns_b, self.ns_r = (f"{prefix}{tag}{s}" for s in ("a", "b", "r"))
        self.toward = toward

    def netns(self) -> None:
        for ns in (self.ns_a, self.ns_b, self.ns_r):
            _ip("netns", "add", ns)
            self.created_ns.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        # Each veth is created inside its end namespace, the peer moved into R: no host names.
        _ip("-n", self.ns_a, "link", "add", "veth0", "type", "veth", "peer", "name", "va")
        _ip("-n", self.ns_a, "link", "set", "va", "netns", self.ns_r)
        _ip("-n", self.ns_b, "link", "add", "veth0", "type", "veth", "peer", "name", "vb")
        _ip("-n", self.ns_b, "link", "set", "vb", "netns", self.ns_r)
        for ns, outer, inner, gw in (
            (self.ns_a, bsw.OUTER_A, bsw.INNER_A, R_A),
            (self.ns_b, bsw.OUTER_B, bsw.INNER_B, R_B),
        ):
            _ip("-n", ns, "addr", "add", f"{inner}/32", "dev", "lo")
            _ip("-n", ns, "addr", "add", f"{outer}/31", "dev", "veth0")
            _ip("-n", ns, "link", "set", "veth0", "up")
            _ip("-n", ns, "route", "add", "default", "via", gw)
        _ip("-n", self.ns_r, "addr", "add", f"{R_A}/31", "dev", "va")
        _ip("-n", self.ns_r, "addr", "add", f"{R_B}/31", "dev", "vb")
        _ip("-n", self.ns_r, "link", "set", "va", "up")
        _ip("-n", self.ns_r, "link", "set", "vb", "up")
        r = ["ip", "netns", "exec", self.ns_r]
        bsw._run([*r, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
        out_if = "vb" if self.toward == "b" else "va"
        ruleset = (
            "table ip labnat {\n"
            "  chain post {\n"
            "    type nat hook postrouting priority srcnat; policy accept;\n"
            f'    oifname "{out_if}" counter masquerade\n'
            "  }\n"
            "}\n"
        )
        subprocess.run([*r, "nft", "-f", "-"], input=ruleset, text=True, check=True)
        for _ in range(20):
            ping = ["ip", "netns", "exec", self.ns_a, "ping", "-c1", "-W1", bsw.OUTER_B]
            if bsw._run(ping, check=False).returncode == 0:
                return
            time.sleep(0.1)
        raise bsw.BenchError("A cannot reach B through the router")

    def masquerade_packets(self) -> int:
        out = bsw._run(["ip", "netns", "exec", self.ns_r, "nft", "list", "table", "ip", "labnat"])
        m = re.search(r"counter packets (\d+)", out.stdout)
        return int(m.group(1)) if m else 0


def _init_nat_lab(lab: KeymgrLab, prefix: str, toward: str) -> None:
    """The attributes KeymgrLab.__init__ sets, over a NatPair instead of the two-namespace pair."""
    lab.bench = NatPair(prefix, toward)
    lab.workdir = lab.bench.workdir
    lab.pki = lab.workdir / "pki"
    lab.sock = lab.workdir / "a.sock"
    lab.client = None
    lab.bench.netns()


class KeymgrBehindNat(KeymgrLab):
    def __init__(self) -> None:
        _init_nat_lab(self, "kmn", toward="b")
        self.psk = secrets.token_hex(32)
        self.psk_for_keymgr = self.psk

    def start_responder(self) -> None:
        # charon cannot know which address the NAT gives A: accept IKE from any address.
        b = self.bench
        conf = bsw.swanctl_conf(bsw.OUTER_B, bsw.OUTER_A, bsw.INNER_B, bsw.INNER_A, self.psk)
        conf = conf.replace(f"remote_addrs = {bsw.OUTER_A}", "remote_addrs = %any")
        proc = b.start_charon("b", b.ns_b, conf)
        b.wait_vici("b", proc)
        b.swanctl(
            "b", "--load-all", "--noprompt", "--file", str(b.workdir / "b/swanctl/swanctl.conf")
        )


class StrongswanBehindNat(ResponderLab):
    def __init__(self) -> None:
        _init_nat_lab(self, "kmm", toward="a")
        self.psk = secrets.token_hex(32)
        self.psk_for_strongswan = self.psk


def _lab(cls: type[KeymgrLab]) -> Iterator[KeymgrLab]:
    if subprocess.run(["which", "nft"], capture_output=True).returncode != 0:
        pytest.skip("nft not installed (`make setup` installs nftables)")
    yield from open_lab(cls)


@pytest.fixture
def natlab() -> Iterator[KeymgrLab]:
    yield from _lab(KeymgrBehindNat)


@pytest.fixture
def rnatlab() -> Iterator[KeymgrLab]:
    yield from _lab(StrongswanBehindNat)


def _wait_installed(lab: KeymgrLab, proc: subprocess.Popen[bytes], timeout: float = 20) -> str:
    sas = ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"keymgr exited {proc.returncode}\n{lab.logs()}"
        sas = lab.list_sas_b()
        if "ESTABLISHED" in sas and "INSTALLED" in sas:
            break
        time.sleep(0.3)
    assert "ESTABLISHED" in sas and "INSTALLED" in sas, f"{sas}\n{lab.logs()}"
    assert lab.client is not None
    deadline = time.monotonic() + 5
    while len(lab.client.list_sas()) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(lab.client.list_sas()) == 2, lab.logs()
    return sas


def _traffic(lab: KeymgrLab, src_ns: str, src: str, dst_ns: str, dst: str) -> None:
    ping = subprocess.run(
        ["ip", "netns", "exec", src_ns, "ping", "-c", "3", "-i", "0.3", "-W", "2", "-I", src, dst],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    print(ping.stdout)
    assert ping.returncode == 0, f"{ping.stdout}{ping.stderr}\n{lab.logs()}"
    sent, got, n = tcp_sha256(src_ns, src, dst_ns, dst, 1 << 20)
    print(f"TCP 1 MiB through the tunnel across the NAT: {n} bytes, sha256 {got[:16]}...")
    assert n == 1 << 20 and sent == got, lab.logs()


def test_keymgr_behind_nat_initiates_to_strongswan(natlab: KeymgrLab) -> None:
    pair = natlab.bench
    assert isinstance(pair, NatPair)
    natlab.start_responder()
    natlab.start_worker()
    keymgr = natlab.start_keymgr()
    sas = _wait_installed(natlab, keymgr)
    print(sas)
    # charon sees our IKE from the NAT's address, after the float to 4500.
    assert re.search(rf"remote '{bsw.OUTER_A}' @ {R_B}\[\d+\]", sas), sas
    assert re.search(r"INSTALLED, TUNNEL-in-UDP", sas), sas
    _traffic(natlab, pair.ns_a, bsw.INNER_A, pair.ns_b, bsw.INNER_B)
    assert pair.masquerade_packets() > 0
    log_text = (natlab.workdir / "keymgr.log").read_text(errors="replace")
    assert '"nat_t": true' in log_text.replace('"nat_t":true', '"nat_t": true'), log_text
    assert re.search(r'"behind_nat": ?true', log_text), log_text  # NAT-D: we are behind it
    assert natlab.psk not in log_text.lower()


def test_strongswan_behind_nat_initiates_to_keymgr(rnatlab: KeymgrLab) -> None:
    lab = rnatlab
    assert isinstance(lab, StrongswanBehindNat)
    pair = lab.bench
    assert isinstance(pair, NatPair)
    # The peer's address as keymgr sees it is the NAT's; its identity stays 192.0.2.2.
    lab.start_worker()
    keymgr = lab.start_responder_keymgr({"remote_addr": R_A, "remote_id": bsw.OUTER_B})
    lab.wait_punt_connected(keymgr)
    lab.start_initiator_charon()
    init = lab.initiate()
    assert init.returncode == 0, f"{init.stdout[-2000:]}\n{lab.logs()}"
    sas = _wait_installed(lab, keymgr)
    print(sas)
    assert re.search(rf"local  '{bsw.OUTER_B}' @ {bsw.OUTER_B}\[4500\]", sas), sas
    assert re.search(r"INSTALLED, TUNNEL-in-UDP", sas), sas
    _traffic(lab, pair.ns_b, bsw.INNER_B, pair.ns_a, bsw.INNER_A)
    assert pair.masquerade_packets() > 0
    log_text = (lab.workdir / "keymgr.log").read_text(errors="replace")
    assert re.search(r'"behind_nat": ?false', log_text), log_text  # only the peer is: no keepalives
    assert lab.psk not in log_text.lower()


def test_keymgr_behind_nat_sends_nat_keepalives(natlab: KeymgrLab) -> None:
    """keymgr finds itself behind the NAT (NAT-D), so its outbound SA carries ``keepalive: 1``:
    while the tunnel is idle, the worker's NAT keepalives (RFC 3948 §2.3, one 0xFF octet on
    UDP 4500) reach charon's side from the NAT's address about once a second, as many as the
    worker counts in ``keepalives_sent``."""
    if not ts.available():
        pytest.skip("tshark is needed")
    pair = natlab.bench
    assert isinstance(pair, NatPair)
    natlab.start_responder()
    natlab.start_worker()
    keymgr = natlab.start_keymgr({"keepalive": 1})
    _wait_installed(natlab, keymgr)
    log_text = (natlab.workdir / "keymgr.log").read_text(errors="replace")
    assert re.search(r'"behind_nat": ?true', log_text), log_text
    pcap = natlab.workdir / "keepalive-b.pcap"
    argv = [
        "ip",
        "netns",
        "exec",
        pair.ns_b,
        "tcpdump",
        "-i",
        "veth0",
        "-U",
        "-n",
        "--immediate-mode",
    ]
    argv += ["--immediate-mode", "-w", str(pcap), "udp port 4500"]
    err = natlab.workdir / "tcpdump-b.log"
    with err.open("wb") as out:
        cap = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=out, start_new_session=True)
    pair.procs.append(cap)  # killed by cleanup on failure
    deadline = time.monotonic() + 10
    while "listening on" not in err.read_text(errors="replace"):
        assert cap.poll() is None and time.monotonic() < deadline, err.read_text()
        time.sleep(0.1)
    assert natlab.client is not None
    sent_before = natlab.client.stats().keepalives_sent
    time.sleep(6.5)  # idle tunnel
    sent = natlab.client.stats().keepalives_sent - sent_before
    with contextlib.suppress(ProcessLookupError):
        os.killpg(cap.pid, signal.SIGINT)
    cap.wait(timeout=10)
    rows = ts.run_fields(
        pcap,
        ["frame.time_relative", "ip.src", "udp.srcport", "udp.length"],
        display_filter="udpencap.nat_keepalive",
    )
    times = [float(r["frame.time_relative"][0]) for r in rows]
    print(f"NAT keepalives at charon's side: {len(rows)}, at {[round(t, 2) for t in times]}")
    print(f"our worker counted {sent} NAT keepalives sent meanwhile")
    assert abs(sent - len(rows)) <= 1, (sent, len(rows))  # the ones captured are the worker's
    assert all(r["ip.src"] == [R_B] and r["udp.length"] == ["9"] for r in rows), rows
    assert len(rows) >= 4, rows
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(0.7 <= g <= 2.3 for g in gaps), gaps
