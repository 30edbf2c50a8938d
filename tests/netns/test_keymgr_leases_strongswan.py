"""Sequence-number leases against strongSwan 5.9.8: keymgr (initiator, ``--seq-lease-block
256``) extends the outbound SA's lease on the worker's LeaseLow while thousands of packets
flow, and no (SPI, sequence number) pair ever repeats on the wire.

Checked: 3000 echo requests at 1 ms intervals get 3000 replies through the tunnel (no packet
dropped for an exhausted lease); keymgr logged at least 10 ``sequence lease extended`` lines,
each one block beyond the last, and the worker's outbound SA ends with a lease end above its
next sequence number; the state directory's store holds the outbound SA's mark, which is at
least every sequence number used; in the ESP-in-UDP capture (tshark dissects ``esp.spi`` /
``esp.sequence``) the outbound SA's sequence numbers are unique and strictly increasing, with
no gap, from 1 to beyond 3000; charon counts the same number of packets in. After SIGTERM the
mark is gone with the SA.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import time
from collections.abc import Iterator

import pytest

from scripts import bench_strongswan as bsw
from services.core.sa import Direction
from services.keymgr.leases import STORE_FILE
from tests.netns import tshark
from tests.netns.test_keymgr_keyexport import start_capture, stop_capture
from tests.netns.test_keymgr_strongswan import KeymgrLab, _skip_reason, open_lab

pytestmark = pytest.mark.netns

BLOCK = 256
COUNT = 3000


@pytest.fixture
def lab() -> Iterator[KeymgrLab]:
    reason = _skip_reason()
    if reason is None and not (tshark.available() and os.access("/usr/bin/tcpdump", os.X_OK)):
        reason = "tshark and tcpdump are needed"
    if reason:
        pytest.skip(reason)
    yield from open_lab(KeymgrLab)


def test_lease_extensions_keep_traffic_flowing_without_reuse(lab: KeymgrLab) -> None:
    lab.start_responder()
    lab.start_worker()
    state = lab.workdir / "keymgr-state"
    keymgr = lab.start_keymgr(
        extra_args=["--seq-lease-block", str(BLOCK), "--state-dir", str(state)]
    )
    sas = ""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert keymgr.poll() is None, f"keymgr exited {keymgr.returncode}\n{lab.logs()}"
        sas = lab.list_sas_b()
        if "ESTABLISHED" in sas and "INSTALLED" in sas:
            break
        time.sleep(0.3)
    assert "ESTABLISHED" in sas and "INSTALLED" in sas, f"{sas}\n{lab.logs()}"
    assert lab.client is not None
    deadline = time.monotonic() + 5
    while len(lab.client.list_sas()) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    out = next(s for s in lab.client.list_sas() if s.direction == Direction.OUTBOUND)
    assert out.lease_end == BLOCK, out
    spi = f"0x{out.spi:08x}"

    cap = start_capture(lab)
    ping = ["ip", "netns", "exec", lab.bench.ns_a, "ping", "-q", "-c", str(COUNT)]
    ping += ["-i", "0.001", "-W", "2", "-I", bsw.INNER_A, bsw.INNER_B]
    res = subprocess.run(ping, capture_output=True, text=True, timeout=120, check=False)
    print(res.stdout)
    _settle(cap_path(lab))
    stop_capture(cap)
    assert f"{COUNT} packets transmitted, {COUNT} received" in res.stdout, (
        f"{res.stdout}{res.stderr}\n{lab.logs()}"
    )

    after = next(s for s in lab.client.list_sas() if s.spi == out.spi)
    print(f"outbound SA: next_seq {after.next_seq}, lease_end {after.lease_end}")
    assert after.next_seq > COUNT and after.lease_end >= after.next_seq
    assert after.other_drops == 0, after

    log_text = (lab.workdir / "keymgr.log").read_text(errors="replace")
    ext = [json.loads(line) for line in log_text.splitlines() if "sequence lease extended" in line]
    ends = [e["new_lease_end"] for e in ext]
    print(f"keymgr extended the lease {len(ext)} times, last end {ends[-1] if ends else None}")
    assert len(ext) >= 10, log_text[-3000:]
    assert ends == [BLOCK * (i + 2) for i in range(len(ends))], ends
    assert ends[-1] == after.lease_end

    doc = json.loads((state / STORE_FILE).read_text())
    marks = {(m["spi"], m["dst"]): m["mark"] for m in doc["marks"]}
    assert marks == {(out.spi, bsw.OUTER_B): after.lease_end}, doc
    assert after.next_seq - 1 <= after.lease_end

    rows = tshark.run_fields(
        cap_path(lab), ["esp.spi", "esp.sequence"], display_filter=f"esp.spi == {spi}"
    )
    seqs = [int(r["esp.sequence"][0]) for r in rows]
    print(f"capture: {len(seqs)} ESP packets on {spi}, sequence {seqs[0]}..{seqs[-1]}")
    assert len(seqs) >= COUNT
    assert len(set(seqs)) == len(seqs), "an (SPI, sequence number) pair was sent twice"
    assert seqs == sorted(seqs) and seqs[0] == 1 and seqs[-1] == after.next_seq - 1
    assert seqs == list(range(1, len(seqs) + 1)), "sequence numbers skipped"

    charon = lab.list_sas_b()  # its "in" SA is our outbound one
    m = re.search(rf"\bin\s+{out.spi:08x},\s+\d+ bytes,\s+(\d+) packets", charon)
    assert m and int(m.group(1)) == after.next_seq - 1, charon

    keymgr.terminate()
    assert keymgr.wait(timeout=15) == 0, lab.logs()
    assert json.loads((state / STORE_FILE).read_text())["marks"] == []


def cap_path(lab: KeymgrLab) -> pathlib.Path:
    return lab.workdir / "link.pcap"


def _settle(pcap: pathlib.Path, timeout: float = 15.0) -> None:
    """Wait until tcpdump has written what it captured (the file stops growing)."""
    size, deadline = -1, time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = pcap.stat().st_size
        if now == size:
            return
        size = now
