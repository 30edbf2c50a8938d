"""Traffic selectors: RFC 4301 §4.4.1.1 (addresses, next-layer protocol, ports; ICMP type/code
carried in the port fields)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from services.core.packet import MalformedPacket, flow_key

FlowKey = tuple[int, bytes, bytes, int, int, int]  # version, src, dst, proto, sport, dport


@dataclass(frozen=True, slots=True)
class Prefix:
    """An address prefix held as integers for fast matching."""

    version: int
    value: int
    length: int

    @classmethod
    def parse(cls, text: str) -> Prefix:
        net = ipaddress.ip_network(text, strict=False)
        return cls(net.version, int(net.network_address), net.prefixlen)

    def contains(self, addr: bytes) -> bool:
        bits = 32 if self.version == 4 else 128
        if len(addr) * 8 != bits:
            return False
        shift = bits - self.length
        return (int.from_bytes(addr, "big") >> shift) == (self.value >> shift)

    def __str__(self) -> str:
        addr = (
            ipaddress.ip_address(self.value)
            if self.version == 4
            else ipaddress.IPv6Address(self.value)
        )
        return f"{addr}/{self.length}"


@dataclass(frozen=True, slots=True)
class Selector:
    """Source and destination prefix, protocol (0 = any) and port ranges (inclusive)."""

    src: Prefix
    dst: Prefix
    proto: int = 0
    sport_lo: int = 0
    sport_hi: int = 0xFFFF
    dport_lo: int = 0
    dport_hi: int = 0xFFFF

    @classmethod
    def make(
        cls,
        src: str,
        dst: str,
        proto: int = 0,
        sport: tuple[int, int] = (0, 0xFFFF),
        dport: tuple[int, int] = (0, 0xFFFF),
    ) -> Selector:
        s, d = Prefix.parse(src), Prefix.parse(dst)
        if s.version != d.version:
            raise ValueError("selector source and destination must be the same IP version")
        if not 0 <= proto <= 255:
            raise ValueError("protocol must be 0..255")
        for lo, hi in (sport, dport):
            if not 0 <= lo <= hi <= 0xFFFF:
                raise ValueError("port range must satisfy 0 <= lo <= hi <= 65535")
        return cls(s, d, proto, sport[0], sport[1], dport[0], dport[1])

    def matches(self, key: FlowKey) -> bool:
        version, src, dst, proto, sport, dport = key
        if version != self.src.version:
            return False
        if self.proto and proto != self.proto:
            return False
        if not self.sport_lo <= sport <= self.sport_hi:
            return False
        if not self.dport_lo <= dport <= self.dport_hi:
            return False
        return self.src.contains(src) and self.dst.contains(dst)

    def matches_packet(self, pkt: bytes | memoryview) -> bool:
        try:
            return self.matches(flow_key(pkt))
        except MalformedPacket:
            return False

    def specificity(self) -> tuple[int, int, int, int]:
        """Larger is more specific (used to order filters like Windows does)."""
        ports = (self.sport_lo, self.sport_hi) != (0, 0xFFFF) or (self.dport_lo, self.dport_hi) != (
            0,
            0xFFFF,
        )
        return (self.src.length + self.dst.length, int(self.proto != 0), int(ports), 0)
