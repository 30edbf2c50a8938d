"""The flow-key fast path (RFC 4301 §4.4.1.1 selectors) agrees with the full header walk."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.all import ICMP, IP, TCP, UDP, IPv6, IPv6ExtHdrHopByHop, Raw
from scapy.layers.inet6 import ICMPv6EchoRequest

from services.core.packet import MalformedPacket, flow_key, flow_key_general


def _same(pkt: bytes) -> None:
    try:
        expected = flow_key_general(pkt)
    except MalformedPacket:
        try:
            flow_key(pkt)
        except MalformedPacket:
            return
        raise AssertionError("fast path accepted a packet the full walk rejects") from None
    assert flow_key(pkt) == expected


def test_fast_path_matches_for_common_shapes() -> None:
    for p in (
        IP(src="192.0.2.1", dst="192.0.2.2") / TCP(sport=1, dport=2) / Raw(b"x"),
        IP(src="192.0.2.1", dst="192.0.2.2", flags="MF") / UDP(sport=1, dport=2),
        IP(src="192.0.2.1", dst="192.0.2.2", frag=3) / UDP(sport=1, dport=2),
        IP(src="192.0.2.1", dst="192.0.2.2") / ICMP(type=8, code=0),
        IP(src="192.0.2.1", dst="192.0.2.2", options=[b"\x94\x04\x00\x00"]) / UDP(),
        IPv6(src="2001:db8::1", dst="2001:db8::2") / TCP(sport=3, dport=4),
        IPv6(src="2001:db8::1", dst="2001:db8::2") / ICMPv6EchoRequest(),
        IPv6(src="2001:db8::1", dst="2001:db8::2") / IPv6ExtHdrHopByHop() / UDP(sport=5, dport=6),
    ):
        _same(bytes(p))


@settings(max_examples=400, deadline=None)
@given(st.binary(min_size=0, max_size=80), st.sampled_from([0x45, 0x46, 0x60, 0x00]))
def test_fast_path_matches_on_random_headers(tail: bytes, first: int) -> None:
    _same(bytes([first]) + tail)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 255), st.integers(20, 60), st.binary(min_size=0, max_size=40))
def test_fast_path_matches_on_length_and_protocol_variants(
    proto: int, total: int, body: bytes
) -> None:
    hdr = bytearray(bytes(IP(src="192.0.2.1", dst="192.0.2.2", proto=proto)))
    pkt = bytes(hdr) + body
    pkt = pkt[:2] + total.to_bytes(2, "big") + pkt[4:]
    _same(pkt)


@pytest.mark.parametrize(("version", "proto"), [(4, 58), (6, 1)])
def test_the_other_versions_icmp_has_no_type_and_code(version: int, proto: int) -> None:
    """ICMPv6 inside IPv4 (and ICMP inside IPv6) is only a protocol number: both paths give
    ports 0 (hypothesis once found the general walk reading its type and code)."""
    if version == 4:
        pkt = bytes(IP(src="192.0.2.1", dst="192.0.2.2", proto=proto)) + b"\x01\x02\x03\x04"
    else:
        pkt = bytes(IPv6(src="2001:db8::1", dst="2001:db8::2", nh=proto)) + b"\x01\x02\x03\x04"
    assert flow_key(pkt)[3:] == flow_key_general(pkt)[3:] == (proto, 0, 0)
