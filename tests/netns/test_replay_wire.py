"""Anti-replay and integrity on the wire (RFC 4303 §3.4.3-§3.4.4, RFC 4302 §3.4.3-§3.4.4).

Worker A sends a few packets while worker B does not yet hold the inbound SA, so B has never
processed them; a capture on the link keeps them. After B gets the inbound SA, one captured
packet is re-injected from namespace A (AF_PACKET, the exact frame):

1. with one bit of its ciphertext (AH: payload) flipped -> B counts ``auth_failed`` and the
   packet must not move the replay window;
2. unchanged -> accepted (its sequence number is still fresh, which proves step 1 did not
   touch the window);
3. unchanged again -> B counts ``replay``.

Afterwards both workers still answer gRPC and still forward a ping.
"""

from __future__ import annotations

import ipaddress
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from services.core.engine import SaStatus
from services.core.iana import IpProto
from services.core.packet import checksum
from services.core.sa import Direction, Mode, SaConfig
from services.dataplane.lab import Encap, Lab, Node, SaProfile, make_sa_set

pytestmark = pytest.mark.netns

PROFILES = [
    SaProfile(mode=Mode.TUNNEL, family=4, encap=Encap.ESP),
    SaProfile(mode=Mode.TUNNEL, family=4, encap=Encap.ESP_UDP),
    SaProfile(mode=Mode.TRANSPORT, family=6, encap=Encap.ESP),
    SaProfile(mode=Mode.TUNNEL, family=6, encap=Encap.ESP_UDP),
    SaProfile(mode=Mode.TRANSPORT, family=4, encap=Encap.AH),
]


def read_pcap(path: Path) -> list[bytes]:
    """Frames of a classic pcap file (what ``tcpdump -w`` writes)."""
    data = path.read_bytes()
    if len(data) < 24:
        return []
    magic = data[:4]
    endian = "<" if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
    frames: list[bytes] = []
    off = 24
    while off + 16 <= len(data):
        _, _, incl, _ = struct.unpack_from(endian + "IIII", data, off)
        off += 16
        frames.append(data[off : off + incl])
        off += incl
    return frames


class WireEsp:
    """Offsets of the IPsec header inside one captured Ethernet frame."""

    def __init__(self, frame: bytes) -> None:
        self.frame = frame
        ethertype = int.from_bytes(frame[12:14], "big")
        self.l3 = 14
        if ethertype == 0x0800:
            self.version = 4
            ihl = (frame[14] & 0x0F) * 4
            self.proto = frame[14 + 9]
            self.src = frame[14 + 12 : 14 + 16]
            self.l4 = 14 + ihl
        elif ethertype == 0x86DD:
            self.version = 6
            self.proto = frame[14 + 6]  # the lab's workers send no extension headers
            self.src = frame[14 + 8 : 14 + 24]
            self.l4 = 14 + 40
        else:
            self.version = 0
            self.proto = -1
            self.src = b""
            self.l4 = 0
        self.udp = self.proto == IpProto.UDP
        self.ipsec = self.l4 + 8 if self.udp else self.l4

    def is_ipsec(self, spi: int) -> bool:
        if self.proto == IpProto.UDP:
            dport = int.from_bytes(self.frame[self.l4 + 2 : self.l4 + 4], "big")
            at = self.ipsec
            return dport == 4500 and self.frame[at : at + 4] == spi.to_bytes(4, "big")
        if self.proto == IpProto.ESP:
            return self.frame[self.ipsec : self.ipsec + 4] == spi.to_bytes(4, "big")
        if self.proto == IpProto.AH:
            return self.frame[self.ipsec + 4 : self.ipsec + 8] == spi.to_bytes(4, "big")
        return False

    def seq(self) -> int:
        at = self.ipsec + (8 if self.proto == IpProto.AH else 4)
        return int.from_bytes(self.frame[at : at + 4], "big")

    def flipped(self) -> bytes:
        """The frame with one bit flipped in ESP ciphertext (after SPI, seq and the 8-byte IV)
        or, for AH, in the last payload byte; ESP-in-UDP gets a valid UDP checksum again so
        the receiving kernel hands the datagram to the worker."""
        b = bytearray(self.frame)
        if self.proto == IpProto.AH:
            b[-1] ^= 0x01
        else:
            b[self.ipsec + 16 + 3] ^= 0x10
        return self.with_udp_checksum(bytes(b))

    def with_udp_checksum(self, frame: bytes) -> bytes:
        """A capture on the sending veth can hold an unfinished (offloaded) UDP checksum;
        re-injected frames need a real one (IPv4: zero, as RFC 3948 §2.1 allows)."""
        if not self.udp:
            return frame
        b = bytearray(frame)
        c = self.l4 + 6
        b[c : c + 2] = b"\x00\x00"
        if self.version == 6:
            ip = b[self.l3 : self.l3 + 40]
            udp = bytes(b[self.l4 :])
            pseudo = ip[8:40] + len(udp).to_bytes(4, "big") + b"\x00\x00\x00\x11"
            csum = checksum(bytes(pseudo) + udp) or 0xFFFF
            b[c : c + 2] = csum.to_bytes(2, "big")
        return bytes(b)


def _wait_for(what: str, cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _sa_status(node: Node, cfg: SaConfig) -> SaStatus:
    for s in node.dp().list_sas():
        if s.spi == cfg.spi and s.direction == cfg.direction:
            return s
    raise AssertionError(f"{node.worker_id} has no SA {cfg.describe()}")


@pytest.mark.parametrize("profile", PROFILES, ids=SaProfile.label)
def test_replayed_and_corrupted_packets_are_dropped(netns_lab: Lab, profile: SaProfile) -> None:
    lb = netns_lab
    sa_set = make_sa_set(profile)
    a_addr, b_addr = sa_set.addresses()
    (out_cfg,) = sa_set.a_to_b.outbound  # one SA: ESP or AH
    (in_cfg,) = sa_set.a_to_b.inbound

    # stage everything except B's inbound SA for A -> B
    lb.clear_sas()
    lb.install_sas(lb.a, sa_set.for_side("a"))
    lb.install_sas(lb.b, sa_set.b_to_a.outbound)
    lb.replace_spd(lb.a, list(sa_set.spd_a))
    lb.replace_spd(lb.b, list(sa_set.spd_b))
    with lb.capturing(lb.a, f"replay-{profile.label()}") as cap:
        lost = lb.ping(lb.a, b_addr, src=a_addr, count=2, interval=0.2, deadline=1)
    assert lost.received == 0, "B answered without its inbound SA"

    outer_a = ipaddress.ip_address(out_cfg.src).packed
    sent = [w for w in map(WireEsp, read_pcap(cap.path)) if w.src == outer_a]
    sent = [w for w in sent if w.is_ipsec(out_cfg.spi)]
    assert sent, "no IPsec packet from A captured"
    pkt = min(sent, key=WireEsp.seq)
    original = pkt.with_udp_checksum(pkt.frame)

    lb.install_sas(lb.b, [in_cfg])
    before = lb.b.dp().stats()
    st0 = _sa_status(lb.b, in_cfg)

    # 1. one flipped bit: integrity failure, counted, window untouched
    lb.inject(lb.a, pkt.flipped())
    _wait_for("auth_failed drop", lambda: _sa_status(lb.b, in_cfg).auth_drops == st0.auth_drops + 1)
    stats = lb.b.dp().stats()
    assert stats.drops.get("auth_failed", 0) == before.drops.get("auth_failed", 0) + 1, stats
    assert _sa_status(lb.b, in_cfg).packets == st0.packets

    # 2. the untouched packet is still fresh: accepted
    lb.inject(lb.a, original)
    _wait_for("accepted packet", lambda: _sa_status(lb.b, in_cfg).packets == st0.packets + 1)

    # 3. the same packet again: replay, counted
    lb.inject(lb.a, original)
    _wait_for("replay drop", lambda: _sa_status(lb.b, in_cfg).replay_drops == st0.replay_drops + 1)
    stats = lb.b.dp().stats()
    assert stats.drops.get("replay", 0) == before.drops.get("replay", 0) + 1, stats
    st = _sa_status(lb.b, in_cfg)
    assert st.packets == st0.packets + 1 and st.auth_drops == st0.auth_drops + 1

    # the workers survived and still forward
    assert lb.a.worker_alive() and lb.b.worker_alive(), lb.worker_logs()
    ping = lb.ping(lb.a, b_addr, src=a_addr, count=2)
    assert ping.ok, f"{ping.output}\n{lb.diagnostics()}"
    assert _sa_status(lb.b, in_cfg).direction == Direction.INBOUND
