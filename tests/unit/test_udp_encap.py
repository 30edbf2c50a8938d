"""UDP encapsulation of ESP, RFC 3948: demultiplexing on port 4500 (§2.2 non-ESP marker,
§2.3 NAT keepalive), and the UDP header we build (§2.1: checksum zero over IPv4; over IPv6 a
zero checksum is not allowed, RFC 8200 §8.1, so it must be correct)."""

from __future__ import annotations

import ipaddress

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.ipsec import NAT_KEEPALIVE, NON_ESP

from services.core.engine import Dataplane, UdpKind, classify_udp_encap
from services.core.events import DropReason
from services.core.iana import Encr, IpProto
from services.core.packet import build_ipv4, build_ipv6
from services.core.sa import Direction, Mode, SaConfig, UdpEncap
from services.core.selectors import Selector
from services.core.spd import Action, SpdEntry

IKE_MSG = bytes(range(28)) + b"\x29\x00\x00\x08" + b"abcd"  # an IKE header and a payload


def _a(s: str) -> bytes:
    return ipaddress.ip_address(s).packed


# --- demultiplexing ------------------------------------------------------------------------


def test_classify() -> None:
    assert classify_udp_encap(b"\xff") is UdpKind.KEEPALIVE
    assert classify_udp_encap(bytes(NAT_KEEPALIVE())) is UdpKind.KEEPALIVE
    assert classify_udp_encap(b"\x00\x00\x00\x00" + IKE_MSG) is UdpKind.IKE
    assert classify_udp_encap(bytes(NON_ESP()) + IKE_MSG) is UdpKind.IKE
    assert classify_udp_encap(b"\x00\x00\x01\x00" + bytes(12)) is UdpKind.ESP  # SPI 256
    assert classify_udp_encap(memoryview(b"\x12\x34\x56\x78\x00\x00\x00\x01")) is UdpKind.ESP
    for short in (b"", b"\x00", b"\xfe", b"\xff\xff", b"\x01\x02\x03", b"\x01" * 7):
        assert classify_udp_encap(short) is UdpKind.INVALID, short


def test_keepalive_is_counted_not_dropped() -> None:
    dp = Dataplane()
    assert dp.inbound_udp(_a("198.51.100.1"), _a("192.0.2.2"), 4500, 4500, b"\xff", 0.0) == (
        UdpKind.KEEPALIVE,
        None,
    )
    assert dp.keepalives == 1 and not dp.drops and dp.rx_packets == 0


def test_non_esp_marker_goes_to_ike_with_the_marker_stripped() -> None:
    dp = Dataplane()
    kind, msg = dp.inbound_udp(
        _a("198.51.100.1"), _a("192.0.2.2"), 4500, 4500, b"\x00\x00\x00\x00" + IKE_MSG, 0.0
    )
    assert kind is UdpKind.IKE and msg == IKE_MSG
    assert not dp.drops


@pytest.mark.parametrize("payload", [b"", b"\x01", b"\x00\x00\x00", b"\x01" * 7])
def test_short_datagrams_are_invalid_and_counted(payload: bytes) -> None:
    dp = Dataplane()
    assert dp.inbound_udp(_a("198.51.100.1"), _a("192.0.2.2"), 4500, 4500, payload, 0.0) == (
        UdpKind.INVALID,
        None,
    )
    assert dp.drops == {DropReason.MALFORMED: 1}


def test_esp_too_short_for_the_sa_or_unknown_spi_is_a_counted_drop() -> None:
    dp = Dataplane()
    dp.install_sa(_cfg(Direction.INBOUND, Mode.TUNNEL, False), 0.0)
    src, dst = _a("192.0.2.1"), _a("192.0.2.2")
    assert dp.inbound_udp(src, dst, 4500, 4500, (0x7000).to_bytes(4, "big") + bytes(8), 0.0) == (
        UdpKind.ESP,
        None,
    )
    assert dp.inbound_udp(src, dst, 4500, 4500, (0x7001).to_bytes(4, "big") + bytes(60), 0.0) == (
        UdpKind.ESP,
        None,
    )
    assert dp.drops == {DropReason.MALFORMED: 1, DropReason.NO_SA: 1}


def test_oversized_datagram_is_invalid_not_an_exception() -> None:
    dp = Dataplane()
    kind, clear = dp.inbound_udp(
        _a("192.0.2.1"), _a("192.0.2.2"), 4500, 4500, b"\x00\x00\x70\x00" + bytes(65_530), 0.0
    )
    assert (kind, clear) == (UdpKind.INVALID, None)
    assert dp.drops == {DropReason.MALFORMED: 1}


# --- the UDP header we build -----------------------------------------------------------------


def _cfg(direction: Direction, mode: Mode, v6: bool, encap: UdpEncap | None = None) -> SaConfig:
    if mode == Mode.TUNNEL:
        s, d = ("2001:db8::a", "2001:db8::b") if v6 else ("192.0.2.1", "192.0.2.2")
    else:
        s, d = ("2001:db8:1::1", "2001:db8:2::1") if v6 else ("10.0.0.1", "10.0.0.2")
    return SaConfig(
        spi=0x7000,
        protocol=IpProto.ESP,
        direction=direction,
        mode=mode,
        src=_a(s),
        dst=_a(d),
        encr_id=Encr.AES_GCM_16,
        encr_key=bytes(range(20)),
        encap=encap or UdpEncap(),
        reqid=1,
    )


def _inner(v6: bool, size: int) -> bytes:
    body = bytes([0x30, 0x39, 0x00, 0x35, (8 + size) >> 8, (8 + size) & 0xFF, 0, 0]) + (
        bytes([0x5A]) * size
    )
    if v6:
        return build_ipv6(_a("2001:db8:1::1"), _a("2001:db8:2::1"), IpProto.UDP, len(body)) + body
    return build_ipv4(_a("10.0.0.1"), _a("10.0.0.2"), IpProto.UDP, len(body)) + body


def _protect(
    mode: Mode, v6: bool, size: int, encap: UdpEncap | None = None
) -> tuple[bytes, int, int]:
    dp = Dataplane()
    dp.install_sa(_cfg(Direction.OUTBOUND, mode, v6, encap), 0.0)
    sel = Selector.make("::/0", "::/0") if v6 else Selector.make("0.0.0.0/0", "0.0.0.0/0")
    dp.replace_spd([SpdEntry(1, 1, Action.PROTECT, sel, reqid=1)], 1)
    out = dp.outbound(_inner(v6, size), 0.0)
    assert out is not None, dp.drops
    return out.packet, out.udp_offset, out.dport


SIZES = [0, 1, 2, 3, 17, 100, 1001]
MODES = [pytest.param(Mode.TRANSPORT, id="transport"), pytest.param(Mode.TUNNEL, id="tunnel")]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("mode", MODES)
def test_ipv6_esp_in_udp_has_a_correct_udp_checksum(mode: Mode, size: int) -> None:
    wire, off, dport = _protect(mode, True, size)
    p = IPv6(wire)
    assert p.nh == IpProto.UDP and off == 48 and dport == 4500
    ours = p[UDP].chksum
    assert ours != 0
    del p[UDP].chksum
    assert IPv6(bytes(p))[UDP].chksum == ours  # scapy recomputes the same value
    # and a flipped payload bit would be caught by it
    bad = bytearray(wire)
    bad[-1] ^= 1
    q = IPv6(bytes(bad))
    del q[UDP].chksum
    assert IPv6(bytes(q))[UDP].chksum != ours


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("mode", MODES)
def test_ipv4_esp_in_udp_uses_checksum_zero(mode: Mode, size: int) -> None:
    wire, off, dport = _protect(mode, False, size)
    p = IP(wire)
    assert p.proto == IpProto.UDP and off == 28 and dport == 4500
    assert p[UDP].chksum == 0
    assert (p[UDP].sport, p[UDP].dport, p[UDP].len) == (4500, 4500, len(wire) - 20)
    q = IP(wire)
    del q.chksum
    assert IP(bytes(q)).chksum == p.chksum  # the IPv4 header checksum is right


def test_nat_mapped_peer_port_is_used_and_reported() -> None:
    wire, off, dport = _protect(Mode.TUNNEL, False, 10, UdpEncap(sport=4500, dport=61234))
    p = IP(wire)
    assert (p[UDP].sport, p[UDP].dport) == (4500, 61234) and dport == 61234
    assert wire[off : off + 4] == (0x7000).to_bytes(4, "big")  # the UDP payload starts at the SPI
