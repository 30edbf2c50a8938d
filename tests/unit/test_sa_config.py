"""SA configuration validation and in-place updates (RFC 4301 §4.4.2.1 lifetimes, RFC 4303
§3.3.3 sequence-number limits)."""

from __future__ import annotations

import math
import os

import pytest

from services.core.engine import Dataplane
from services.core.iana import Encr, Integ, IpProto
from services.core.packet import parse_ip
from services.core.sa import ConfigError, Direction, Lifetime, Mode, SaConfig

A, B = bytes([192, 0, 2, 1]), bytes([192, 0, 2, 2])


def _cfg(**kw: object) -> SaConfig:
    base: dict[str, object] = dict(
        spi=0x2000,
        protocol=IpProto.ESP,
        direction=Direction.OUTBOUND,
        mode=Mode.TUNNEL,
        src=A,
        dst=B,
        encr_id=Encr.AES_GCM_16,
        encr_key=os.urandom(20),
    )
    base.update(kw)
    return SaConfig(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -1.0])
def test_non_finite_or_negative_lifetimes_are_refused(bad: float) -> None:
    with pytest.raises(ConfigError):
        _cfg(lifetime=Lifetime(hard_seconds=bad)).validate()


def test_lease_start_beyond_32_bits_needs_esn() -> None:
    with pytest.raises(ConfigError):
        _cfg(seq_lease_start=2**32).validate()
    _cfg(seq_lease_start=2**32, esn=True).validate()


def test_update_with_invalid_lifetime_changes_nothing() -> None:
    dp = Dataplane()
    sa = dp.install_sa(_cfg(seq_lease_end=100), 0.0)
    with pytest.raises(ConfigError):
        dp.update_sa(
            0x2000,
            B,
            IpProto.ESP,
            Direction.OUTBOUND,
            lease_end=1000,
            lifetime=Lifetime(soft_bytes=10, hard_bytes=5),
        )
    assert sa.lease_end == 100
    dp.update_sa(
        0x2000,
        B,
        IpProto.ESP,
        Direction.OUTBOUND,
        lease_end=1000,
        lifetime=Lifetime(hard_packets=7),
    )
    assert sa.lease_end == 1000 and sa.cfg.lifetime.hard_packets == 7


def test_ipv4_tunnel_outer_headers_never_carry_ip_id_zero() -> None:
    """A zero ID would be rewritten by Linux on a header-included raw send, breaking AH's ICV."""
    inner = bytes.fromhex("4500001c0000000040010000c6336401cb007101") + bytes(8)
    for proto, extra in (
        (
            IpProto.AH,
            dict(
                encr_id=0, encr_key=b"", integ_id=Integ.HMAC_SHA2_256_128, integ_key=os.urandom(32)
            ),
        ),
        (IpProto.ESP, {}),
    ):
        dp = Dataplane()
        sa = dp.install_sa(_cfg(protocol=proto, **extra), 0.0)
        ids = set()
        for _ in range(3):
            out = sa.protect(inner, 0.0)
            parse_ip(out)
            ids.add(int.from_bytes(out[4:6], "big"))
        assert 0 not in ids and len(ids) == 3
