"""Hostile input on the real wire (RFC 4303 §3.4, RFC 4302 §3.4, RFC 3948 §2.2): thousands of
random and mutated datagrams on ESP, AH, UDP 4500 and UDP 500 reach a live worker; it neither
crashes nor raises out of its receive loop, counts the garbage, and keeps forwarding."""

from __future__ import annotations

import subprocess
import sys

import pytest

from services.core.sa import Direction
from services.dataplane.lab import FWMARK, SIDE_B, Encap, Lab, SaProfile, make_sa_set

pytestmark = pytest.mark.netns

# Runs inside namespace A; sends only to worker B's outer addresses (lab addresses).
SENDER = r"""
import os, random, socket, struct, sys
dst4, dst6 = sys.argv[1], sys.argv[2]
spi_esp, spi_udp, count, mark = (int(x, 0) for x in sys.argv[3:7])
rnd = random.Random(4303)
socks = {}
def sock(fam, typ, proto=0):
    key = (fam, typ, proto)
    if key not in socks:
        s = socks[key] = socket.socket(fam, typ, proto)
        # the lab routes the peer into worker A's TUN unless marked (as A's own sockets are)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
    return socks[key]
def body(spi):
    kind = rnd.randrange(4)
    if kind == 0:
        return os.urandom(rnd.randrange(0, 200))
    if kind == 1:  # a known SPI with a random sequence number and junk
        return struct.pack("!II", spi, rnd.getrandbits(32)) + os.urandom(rnd.randrange(0, 1500))
    if kind == 2:  # truncated header
        return struct.pack("!I", spi)[: rnd.randrange(0, 4)]
    return struct.pack("!II", spi, 1) + bytes(rnd.randrange(0, 64))  # zeros
sent = 0
for i in range(count):
    v6 = i % 2 == 1
    fam, dst = (socket.AF_INET6, dst6) if v6 else (socket.AF_INET, dst4)
    target = i % 4
    try:
        if target == 0:
            sock(fam, socket.SOCK_RAW, 50).sendto(body(spi_esp), (dst, 0))
        elif target == 1:
            ah = bytes([rnd.randrange(256), rnd.randrange(256)]) + b"\0\0"
            ah += struct.pack("!II", spi_esp, rnd.getrandbits(32)) + os.urandom(rnd.randrange(300))
            sock(fam, socket.SOCK_RAW, 51).sendto(ah, (dst, 0))
        elif target == 2:
            ike = b"\0\0\0\0" + os.urandom(rnd.randrange(0, 400))
            data = rnd.choice([b"\xff", ike, body(spi_udp)])
            sock(fam, socket.SOCK_DGRAM).sendto(data, (dst, 4500))
        else:
            sock(fam, socket.SOCK_DGRAM).sendto(os.urandom(rnd.randrange(0, 600)), (dst, 500))
        sent += 1
    except OSError:
        pass
print(sent)
"""


def test_live_worker_survives_random_and_mutated_datagrams(netns_lab: Lab) -> None:
    # SAs on B so that part of the garbage carries SPIs that exist (ICV / replay paths run)
    sa_set = make_sa_set(SaProfile(encap=Encap.ESP_UDP))
    netns_lab.install(sa_set)
    a, b = netns_lab.nodes
    inbound_b = [c for c in sa_set.for_side("b") if c.direction == Direction.INBOUND]
    spi = inbound_b[0].spi
    before = b.dp().stats()
    res = subprocess.run(
        [
            *a.exec_argv(sys.executable, "-c", SENDER),
            SIDE_B.outer4,
            SIDE_B.outer6,
            str(spi),
            str(spi),
            "4000",
            str(FWMARK),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    sent = int(res.stdout.strip())
    assert sent >= 3500, res.stderr
    assert b.worker_alive(), b.worker_log()
    after = b.dp().stats()
    assert after.internal_errors == before.internal_errors == 0, b.worker_log()
    garbage = sum(after.drops.values()) - sum(before.drops.values())
    assert garbage >= 1000, f"only {garbage} drops counted for {sent} garbage datagrams"
    assert after.keepalives > before.keepalives  # the 0xFF datagrams on 4500
    # and it still does its job
    assert netns_lab.ping(a, "203.0.113.1", src="198.51.100.1").ok, b.worker_log()
