"""SAD behaviour of the engine (RFC 4301 §4.4.2): make-before-break selection of the newest
outbound SA, and falling back / ACQUIRE when SAs go away, through the SA-bundle cache."""

from __future__ import annotations

import os

from scapy.all import ICMP, IP, Raw

from services.core.engine import Dataplane
from services.core.events import Acquire
from services.core.iana import Encr, IpProto
from services.core.sa import Direction, Mode, SaConfig
from services.core.selectors import Selector
from services.core.spd import Action, SpdEntry

A, B = bytes([192, 0, 2, 1]), bytes([192, 0, 2, 2])
PKT = bytes(IP(src="198.51.100.1", dst="203.0.113.1") / ICMP())


def _sa(spi: int) -> SaConfig:
    return SaConfig(
        spi=spi,
        protocol=IpProto.ESP,
        direction=Direction.OUTBOUND,
        mode=Mode.TUNNEL,
        src=A,
        dst=B,
        encr_id=Encr.AES_GCM_16,
        encr_key=os.urandom(36),
        reqid=7,
    )


def _spi_of(dp: Dataplane) -> int | None:
    out = dp.outbound(PKT, 0.0)
    return None if out is None else int.from_bytes(out.packet[20:24], "big")


def test_newest_outbound_sa_carries_traffic_and_deletion_falls_back() -> None:
    dp = Dataplane()
    dp.replace_spd(
        [
            SpdEntry(
                1, 1, Action.PROTECT, Selector.make("198.51.100.0/24", "203.0.113.0/24"), reqid=7
            )
        ],
        1,
    )
    assert _spi_of(dp) is None
    assert isinstance(dp.next_event(), Acquire)
    dp.install_sa(_sa(0x1111), 0.0)
    assert _spi_of(dp) == 0x1111
    dp.install_sa(_sa(0x2222), 0.0)  # rekeyed: the new SA takes over at once
    assert _spi_of(dp) == 0x2222
    assert dp.delete_sa(0x2222, B, IpProto.ESP, Direction.OUTBOUND)
    assert _spi_of(dp) == 0x1111
    assert dp.delete_sa(0x1111, B, IpProto.ESP, Direction.OUTBOUND)
    assert _spi_of(dp) is None


def test_replacing_the_spd_drops_cached_bundles() -> None:
    dp = Dataplane()
    sel = Selector.make("198.51.100.0/24", "203.0.113.0/24")
    dp.install_sa(_sa(0x3333), 0.0)
    dp.replace_spd([SpdEntry(1, 1, Action.PROTECT, sel, reqid=7)], 1)
    assert _spi_of(dp) == 0x3333
    dp.replace_spd([SpdEntry(1, 1, Action.DISCARD, sel)], 2)
    assert _spi_of(dp) is None
    dp.replace_spd([SpdEntry(1, 1, Action.PROTECT, sel, reqid=8)], 3)
    assert _spi_of(dp) is None  # reqid 8 has no SA: ACQUIRE, not the cached reqid-7 bundle


def test_events_name_the_direction_of_their_sa() -> None:
    from services.core.events import HardExpire, IntegrityFailed
    from services.core.sa import Lifetime

    dp = Dataplane()
    out_cfg = SaConfig(
        spi=0x5555,
        protocol=IpProto.ESP,
        direction=Direction.OUTBOUND,
        mode=Mode.TUNNEL,
        src=A,
        dst=B,
        encr_id=Encr.AES_GCM_16,
        encr_key=os.urandom(36),
        reqid=7,
        lifetime=Lifetime(hard_packets=1),
    )
    sa = dp.install_sa(out_cfg, 0.0)
    in_cfg = SaConfig(
        spi=0x6666,
        protocol=IpProto.ESP,
        direction=Direction.INBOUND,
        mode=Mode.TUNNEL,
        src=B,
        dst=A,
        encr_id=Encr.AES_GCM_16,
        encr_key=os.urandom(36),
    )
    dp.install_sa(in_cfg, 0.0)
    esp = sa.protect(PKT, 0.0)  # reaches the hard packet limit
    spi_and_rest = (0x6666).to_bytes(4, "big") + esp[24:]  # our SPI, someone else's keys
    forged = bytes(IP(src="192.0.2.2", dst="192.0.2.1", proto=50) / Raw(spi_and_rest))
    assert dp.inbound(forged, 0.0) is None
    events = [e for e in iter(dp.next_event, None)]
    hard = [e for e in events if isinstance(e, HardExpire)]
    icv = [e for e in events if isinstance(e, IntegrityFailed)]
    assert hard and hard[0].sa.direction == Direction.OUTBOUND
    assert icv and icv[0].sa.direction == Direction.INBOUND
