"""IPv4 / IPv6 header parsing and building: RFC 791 §3.1, RFC 1071 (checksum), RFC 8200 §4
(extension headers), and the ESP/AH insertion point of RFC 4303 §3.1.1 / RFC 4302 §3.1.1."""

from __future__ import annotations

import struct
from typing import NamedTuple

from services.core.iana import IpProto

_V4 = struct.Struct("!BBHHHBBH4s4s")
_V6 = struct.Struct("!IHBB16s16s")
_PORTS = struct.Struct("!HH")


class MalformedPacket(ValueError):
    """The packet is not a well-formed IP datagram."""


def ones_sum(data: bytes | bytearray | memoryview) -> int:
    """RFC 1071 one's-complement sum of 16-bit words (odd length padded with a zero byte).

    Uses 2**16 == 1 (mod 0xFFFF): the one's-complement sum is the big-endian integer value of
    the data reduced modulo 0xFFFF, with 0xFFFF standing for a non-zero multiple.
    """
    v = int.from_bytes(data, "big")
    if len(data) % 2:
        v <<= 8
    r = v % 0xFFFF
    return r if r or not v else 0xFFFF


def checksum(data: bytes | bytearray | memoryview) -> int:
    """RFC 1071 Internet checksum."""
    return ~ones_sum(data) & 0xFFFF


def fold(s: int) -> int:
    """Fold a sum of one's-complement sums into 16 bits."""
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def build_ipv4(
    src: bytes,
    dst: bytes,
    proto: int,
    payload_len: int,
    *,
    ttl: int = 64,
    tos: int = 0,
    ident: int = 0,
    df: bool = False,
) -> bytes:
    """A 20-byte IPv4 header with a correct header checksum."""
    total = 20 + payload_len
    if total > 0xFFFF:
        raise MalformedPacket("IPv4 datagram too long")
    flags = 0x4000 if df else 0
    hdr = _V4.pack(0x45, tos, total, ident, flags, ttl, proto, 0, src, dst)
    c = checksum(hdr)
    return hdr[:10] + c.to_bytes(2, "big") + hdr[12:]


def build_ipv6(
    src: bytes,
    dst: bytes,
    next_header: int,
    payload_len: int,
    *,
    hop_limit: int = 64,
    traffic_class: int = 0,
    flow_label: int = 0,
) -> bytes:
    if payload_len > 0xFFFF:
        raise MalformedPacket("IPv6 payload too long (jumbograms unsupported)")
    first = (6 << 28) | (traffic_class << 20) | (flow_label & 0xFFFFF)
    return _V6.pack(first, payload_len, next_header, hop_limit, src, dst)


def fix_ipv4_header(hdr: bytearray) -> None:
    """Recompute the checksum of an IPv4 header held in ``hdr`` (any IHL)."""
    hdr[10:12] = b"\x00\x00"
    hdr[10:12] = checksum(hdr).to_bytes(2, "big")


class IpInfo(NamedTuple):
    """Where things are in an IP datagram.

    ``insert_at`` is where ESP/AH goes in transport mode (after IPv4 options, or after the IPv6
    extension headers that must stay visible: hop-by-hop, routing, fragment, and destination
    options that precede a routing header). ``proto_offset`` is the byte that holds the protocol
    value naming what follows ``insert_at``.
    """

    version: int
    src: bytes
    dst: bytes
    proto: int  # upper-layer protocol after all extension headers
    insert_at: int
    proto_offset: int
    next_proto: int  # protocol value at proto_offset (what follows insert_at)
    l4_offset: int  # where the upper-layer header (or ESP/AH on receipt) starts
    l4_proto_offset: int  # byte that holds ``proto``
    length: int  # datagram length per its header (may be < len(buffer) with trailing pad)
    fragment: bool


def parse_ip(pkt: bytes | memoryview) -> IpInfo:
    """Parse an IPv4 or IPv6 datagram; raise MalformedPacket on anything inconsistent."""
    n = len(pkt)
    if n < 1:
        raise MalformedPacket("empty")
    version = pkt[0] >> 4
    if version == 4:
        if n < 20:
            raise MalformedPacket("short IPv4 header")
        ihl = (pkt[0] & 0x0F) * 4
        total = (pkt[2] << 8) | pkt[3]
        if ihl < 20 or total < ihl or total > n:
            raise MalformedPacket("bad IPv4 lengths")
        frag = ((pkt[6] << 8) | pkt[7]) & 0x3FFF
        proto = pkt[9]
        return IpInfo(
            4, bytes(pkt[12:16]), bytes(pkt[16:20]), proto, ihl, 9, proto, ihl, 9, total, frag != 0
        )
    if version == 6:
        if n < 40:
            raise MalformedPacket("short IPv6 header")
        plen = (pkt[4] << 8) | pkt[5]
        total = 40 + plen
        if total > n:
            raise MalformedPacket("bad IPv6 payload length")
        nh = pkt[6]
        off = 40
        nh_off = 6
        insert_at, ins_nh_off, ins_nh = 40, 6, nh
        fragment = False
        for _ in range(16):  # bound the walk
            if nh in (IpProto.HOPOPT, IpProto.IPV6_ROUTE, IpProto.IPV6_OPTS):
                if off + 8 > total:
                    raise MalformedPacket("truncated extension header")
                hlen = (pkt[off + 1] + 1) * 8
                if off + hlen > total:
                    raise MalformedPacket("truncated extension header")
                stays_outside = nh != IpProto.IPV6_OPTS or pkt[off] == IpProto.IPV6_ROUTE
                nh_off, nh = off, pkt[off]
                off += hlen
                if stays_outside:
                    insert_at, ins_nh_off, ins_nh = off, nh_off, nh
            elif nh == IpProto.IPV6_FRAG:
                if off + 8 > total:
                    raise MalformedPacket("truncated fragment header")
                fragment = True
                nh_off, nh = off, pkt[off]
                off += 8
                insert_at, ins_nh_off, ins_nh = off, nh_off, nh
            else:
                break
        else:
            raise MalformedPacket("too many extension headers")
        return IpInfo(
            6,
            bytes(pkt[8:24]),
            bytes(pkt[24:40]),
            nh,
            insert_at,
            ins_nh_off,
            ins_nh,
            off,
            nh_off,
            total,
            fragment,
        )
    raise MalformedPacket("not IPv4 or IPv6")


def flow_key(pkt: bytes | memoryview) -> tuple[int, bytes, bytes, int, int, int]:
    """(version, src, dst, proto, sport, dport) for SPD lookup; ports 0 when not TCP/UDP/SCTP.

    For ICMP/ICMPv6 the type and code stand in for the ports (RFC 4301 §4.4.1.1). The common
    shapes (IPv4 without options, IPv6 without extension headers) take a fast path that gives
    the same answer as the general one.
    """
    n = len(pkt)
    if n >= 20 and pkt[0] == 0x45:
        total = (pkt[2] << 8) | pkt[3]
        if 20 <= total <= n and not (pkt[6] & 0x3F or pkt[7]):
            proto = pkt[9]
            if proto in _PORT_PROTOS and total >= 24:
                sport, dport = _PORTS.unpack_from(pkt, 20)
                return 4, bytes(pkt[12:16]), bytes(pkt[16:20]), proto, sport, dport
            if proto == IpProto.ICMP and total >= 24:
                return 4, bytes(pkt[12:16]), bytes(pkt[16:20]), proto, pkt[20], pkt[21]
            return 4, bytes(pkt[12:16]), bytes(pkt[16:20]), proto, 0, 0
    elif n >= 40 and pkt[0] >> 4 == 6:
        proto = pkt[6]
        total = 40 + ((pkt[4] << 8) | pkt[5])
        if total <= n:
            if proto in _PORT_PROTOS and total >= 44:
                sport, dport = _PORTS.unpack_from(pkt, 40)
                return 6, bytes(pkt[8:24]), bytes(pkt[24:40]), proto, sport, dport
            if proto == IpProto.ICMPV6 and total >= 44:
                return 6, bytes(pkt[8:24]), bytes(pkt[24:40]), proto, pkt[40], pkt[41]
    return flow_key_general(pkt)


def flow_key_general(pkt: bytes | memoryview) -> tuple[int, bytes, bytes, int, int, int]:
    """flow_key through the full header walk (the reference for the fast path)."""
    info = parse_ip(pkt)
    sport = dport = 0
    if not info.fragment and info.l4_offset + 4 <= info.length:
        if info.proto in _PORT_PROTOS:
            sport, dport = _PORTS.unpack_from(pkt, info.l4_offset)
        elif info.proto == (IpProto.ICMP if info.version == 4 else IpProto.ICMPV6):
            # type and code of the version's own ICMP (ICMPv6 inside IPv4 is just a protocol)
            sport, dport = pkt[info.l4_offset], pkt[info.l4_offset + 1]
    return info.version, info.src, info.dst, info.proto, sport, dport


_PORT_PROTOS = frozenset({IpProto.TCP, IpProto.UDP, 132})
