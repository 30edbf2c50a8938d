"""NAT keepalives (RFC 3948 §2.3 format, §4 only after an idle interval) on outbound
ESP-in-UDP SAs; scapy parses what we send."""

from __future__ import annotations

import os

import pytest
from scapy.all import IP, UDP, IPv6, Raw

from services.core.engine import Dataplane, UdpKind, classify_udp_encap
from services.core.iana import Encr, IpProto
from services.core.sa import ConfigError, Direction, Mode, SaConfig, UdpEncap

V4 = (bytes([192, 0, 2, 1]), bytes([192, 0, 2, 2]))
V6 = (
    bytes.fromhex("20010db8000100000000000000000001"),
    bytes.fromhex("20010db8000100000000000000000002"),
)


def _engine(addrs: tuple[bytes, bytes], interval: float) -> Dataplane:
    dp = Dataplane()
    dp.install_sa(
        SaConfig(
            spi=0x4444,
            protocol=IpProto.ESP,
            direction=Direction.OUTBOUND,
            mode=Mode.TUNNEL,
            src=addrs[0],
            dst=addrs[1],
            encr_id=Encr.AES_GCM_16,
            encr_key=os.urandom(20),
            encap=UdpEncap(4500, 4501, interval),
        ),
        100.0,
    )
    return dp


@pytest.mark.parametrize("addrs", [V4, V6], ids=["v4", "v6"])
def test_keepalive_only_after_an_idle_interval_and_scapy_parses_it(
    addrs: tuple[bytes, bytes],
) -> None:
    dp = _engine(addrs, 20.0)
    assert dp.nat_keepalives(110.0) == []  # 10 s after install: not yet
    (ka,) = dp.nat_keepalives(120.0)
    assert dp.nat_keepalives(125.0) == []  # the keepalive restarted the interval
    assert dp.keepalives_sent == 1 and dp.keepalives == 0  # sent, not received
    pkt = (IP if len(addrs[0]) == 4 else IPv6)(ka.packet)
    udp = pkt[UDP]
    assert (udp.sport, udp.dport) == (4500, 4501) and bytes(udp.payload) == b"\xff"
    assert ka.packet[ka.udp_offset :] == b"\xff" and ka.dport == 4501
    assert classify_udp_encap(ka.packet[ka.udp_offset :]) is UdpKind.KEEPALIVE
    if len(addrs[0]) == 16:  # the UDP checksum is mandatory over IPv6 and must verify
        original = udp.chksum
        del pkt[UDP].chksum
        assert (IPv6(bytes(pkt)))[UDP].chksum == original


def test_traffic_suppresses_keepalives() -> None:
    dp = _engine(V4, 20.0)
    sa = dp.outbound_sas[0][IpProto.ESP][0]
    sa.protect(bytes(IP(src="198.51.100.1", dst="203.0.113.1") / Raw(b"x")), 115.0)
    assert dp.nat_keepalives(130.0) == []  # last packet 15 s ago
    assert len(dp.nat_keepalives(135.0)) == 1


def test_keepalives_off_by_default_and_interval_validated() -> None:
    assert _engine(V4, 0.0).nat_keepalives(1e9) == []
    with pytest.raises(ConfigError):
        _engine(V4, float("nan"))
    with pytest.raises(ConfigError):
        _engine(V4, -1.0)
