"""``make demo``: two dataplane workers in two network namespaces carrying ESP.

Builds the lab (services.dataplane.lab), installs one AES-GCM-16-256 tunnel-mode SA pair per
direction (ESP-in-UDP 4500 by default, ``--encap esp`` for raw ESP), pings site to site through
the tunnel, sends a TCP stream (SHA-256 checked at both ends), then prints each worker's SAs
(ListSAs: no keys) and counters (GetStats), and a summary of a capture of the veth link
showing it carried only ESP. Exits 0 on success and non-zero with a message otherwise; the
namespaces, workers and temporary files are always removed.
"""

from __future__ import annotations

import argparse
import ipaddress
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from services.core.sa import Mode
from services.dataplane.lab import (
    Encap,
    Lab,
    LabError,
    SaProfile,
    Terminated,
    lab,
    make_sa_set,
    netns_supported,
)

LINK_CONTROL = ("arp", "icmpv6")  # ARP, neighbour discovery / MLD on the veth itself


class DemoFailed(RuntimeError):
    pass


def _say(msg: str) -> None:
    print(msg, flush=True)


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join("  " + line.rstrip() for line in lines)


def _addr(packed: bytes) -> str:
    return str(ipaddress.ip_address(packed))


def _sa_table(lb: Lab) -> str:
    rows = []
    for node in lb.nodes:
        for s in sorted(node.dp().list_sas(), key=lambda s: (int(s.direction), s.spi)):
            rows.append(
                (
                    node.worker_id,
                    s.direction.name.lower(),
                    "esp" if s.protocol == 50 else "ah",
                    f"0x{s.spi:08x}",
                    s.mode,
                    f"{_addr(s.src)} -> {_addr(s.dst)}",
                    s.encr or "-",
                    "udp-4500" if s.encap else "-",
                    s.packets,
                    s.bytes,
                    s.replay_drops,
                    s.auth_drops,
                    s.next_seq if s.direction.name == "OUTBOUND" else s.replay_top,
                )
            )
    headers = (
        "worker",
        "dir",
        "proto",
        "spi",
        "mode",
        "outer",
        "encr",
        "encap",
        "packets",
        "bytes",
        "replay",
        "auth",
        "seq",
    )
    return _table(headers, rows)


def _stats_table(lb: Lab) -> str:
    rows = []
    for node in lb.nodes:
        st = node.dp().stats()
        drops = ", ".join(f"{k}={v}" for k, v in sorted(st.drops.items()) if v) or "none"
        rows.append(
            (
                st.worker_id,
                st.spd_revision,
                st.sa_count,
                st.rx_packets,
                st.rx_bytes,
                st.tx_packets,
                st.tx_bytes,
                drops,
            )
        )
    headers = (
        "worker",
        "spd rev",
        "SAs",
        "rx pkts",
        "rx bytes",
        "tx pkts",
        "tx bytes",
        "drops by reason",
    )
    return _table(headers, rows)


def wire_summary(pcap: Path) -> tuple[str, int]:
    """A per-protocol frame count of the capture and the number of frames that were neither
    ESP nor link control (ARP, ND). Uses tshark, or tcpdump when tshark is missing."""
    if shutil.which("tshark"):
        res = subprocess.run(  # noqa: S603
            ["tshark", "-n", "-r", str(pcap), "-T", "fields", "-e", "frame.protocols"],  # noqa: S607
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if res.returncode != 0:
            raise DemoFailed(f"tshark failed: {res.stderr.strip()}")
        stacks = Counter(
            ":".join(p for p in line.split(":") if p not in ("eth", "ethertype"))
            for line in res.stdout.splitlines()
        )
        tool = "tshark"
    else:
        res = subprocess.run(  # noqa: S603
            ["tcpdump", "-n", "-r", str(pcap)],  # noqa: S607
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        stacks = Counter(
            "esp" if "ESP(" in line else ("arp" if "ARP" in line else line.split(" ", 3)[-1][:40])
            for line in res.stdout.splitlines()
        )
        tool = "tcpdump"
    other = 0
    lines = []
    for stack, n in stacks.most_common():
        parts = stack.split(":")
        if "esp" in parts or "udpencap" in parts:
            kind = "ESP"
        elif any(p in LINK_CONTROL for p in parts) and not {"tcp", "udp"} & set(parts):
            kind = "link control"
        else:
            kind = "NOT ESP"
            other += n
        lines.append(f"  {n:7d}  {stack:40s} {kind}")
    return f"  ({tool}, {sum(stacks.values())} frames)\n" + "\n".join(lines), other


def run(encap: Encap, nbytes: int, *, keep: bool) -> None:
    t0 = time.monotonic()
    profile = SaProfile(mode=Mode.TUNNEL, family=4, encap=encap)
    with lab(keep_workdir=keep) as lb:
        _say(f"[{time.monotonic() - t0:5.1f}s] lab up: {lb.a.netns} <-veth-> {lb.b.netns}")
        sa_set = make_sa_set(profile)
        lb.install(sa_set)
        a_addr, b_addr = sa_set.addresses()
        alg = "AES-GCM-16-256"
        _say(
            f"[{time.monotonic() - t0:5.1f}s] SAs installed: tunnel mode, {alg}, "
            f"{'ESP-in-UDP 4500' if encap == Encap.ESP_UDP else 'raw ESP'}, reqid {sa_set.reqid}"
        )
        with lb.capturing(lb.a, "demo") as cap:
            ping = lb.ping(lb.a, b_addr, src=a_addr, count=5)
            if not ping.ok:
                raise DemoFailed(
                    f"ping {a_addr} -> {b_addr} failed\n{ping.output}\n{lb.diagnostics()}"
                )
            _say(
                f"[{time.monotonic() - t0:5.1f}s] ping {a_addr} -> {b_addr}: "
                f"{ping.received}/{ping.transmitted} replies"
            )
            xfer = lb.tcp_transfer(lb.a, a_addr, lb.b, b_addr, nbytes)
        if not xfer.ok:
            raise DemoFailed(f"TCP transfer corrupted: {xfer}")
        _say(
            f"[{time.monotonic() - t0:5.1f}s] TCP {a_addr} -> {b_addr}: {nbytes / 1e6:.1f} MB "
            f"in {xfer.seconds:.2f}s ({xfer.mbit_per_s:.0f} Mbit/s), "
            f"sha256 {xfer.receiver_sha256[:16]}... equal at both ends"
        )
        _say("\nSecurity associations (ListSAs; keys are never returned):")
        _say(_sa_table(lb))
        _say("\nWorker counters (GetStats):")
        _say(_stats_table(lb))
        text, other = wire_summary(cap.path)
        _say(f"\nWhat the veth link carried (capture in {lb.a.netns}):")
        _say(text)
        if other:
            raise DemoFailed(f"{other} frame(s) on the link were not ESP")
        _say(f"\n[{time.monotonic() - t0:5.1f}s] OK: the link carried only ESP; cleaning up")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m services.dataplane.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--encap",
        choices=[Encap.ESP_UDP.value, Encap.ESP.value],
        default=Encap.ESP_UDP.value,
        help="ESP-in-UDP 4500 (default) or raw ESP",
    )
    p.add_argument("--megabytes", type=float, default=5.0, help="TCP transfer size")
    p.add_argument("--keep", action="store_true", help="keep logs, PKI and pcap afterwards")
    args = p.parse_args(argv)
    ok, why = netns_supported()
    if not ok:
        print(f"demo: cannot run: {why}", file=sys.stderr)
        return 2
    try:
        run(Encap(args.encap), int(args.megabytes * 1e6), keep=args.keep)
    except (LabError, DemoFailed) as e:
        print(f"demo FAILED: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("demo interrupted; lab removed", file=sys.stderr)
        return 130
    except Terminated:
        print("demo terminated; lab removed", file=sys.stderr)
        return 143
    return 0


if __name__ == "__main__":
    sys.exit(main())
