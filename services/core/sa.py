"""Security association state shared by ESP and AH: RFC 4301 §4.4.2 (SAD fields), lifetimes
(§4.4.2.1), sequence numbers (RFC 4303 §3.3.3) with outbound sequence-number leases."""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum

from services.core.events import (
    Drop,
    DropReason,
    Event,
    ExpiryKind,
    HardExpire,
    IntegrityFailed,
    LeaseLow,
    ReplayDetected,
    SaRef,
    SoftExpire,
)
from services.core.iana import IpProto
from services.core.replay import MAX_WINDOW, ReplayWindow
from services.core.selectors import Selector

MAX_SEQ_32 = 0xFFFFFFFF
MAX_SEQ_64 = 0xFFFFFFFFFFFFFFFF


class Mode(IntEnum):
    TRANSPORT = 1
    TUNNEL = 2


class Direction(IntEnum):
    INBOUND = 1
    OUTBOUND = 2


class ConfigError(ValueError):
    """An SA or policy configuration that cannot be installed (message never contains keys)."""


@dataclass(frozen=True, slots=True)
class Lifetime:
    """Soft and hard limits; 0 means no limit (RFC 4301 §4.4.2.1)."""

    soft_seconds: float = 0
    hard_seconds: float = 0
    soft_bytes: int = 0
    hard_bytes: int = 0
    soft_packets: int = 0
    hard_packets: int = 0


@dataclass(frozen=True, slots=True)
class UdpEncap:
    """ESP-in-UDP ports (RFC 3948 §2.1)."""

    sport: int = 4500
    dport: int = 4500
    keepalive_interval: float = 0.0  # outbound: NAT keepalive after this much silence; 0 = off


@dataclass(frozen=True, slots=True)
class SaConfig:
    """Everything needed to install one SA. Keys are excluded from repr."""

    spi: int
    protocol: int  # IpProto.ESP or IpProto.AH
    direction: Direction
    mode: Mode
    src: bytes  # outer source address (packed, 4 or 16 bytes)
    dst: bytes  # outer destination address
    encr_id: int = 0
    encr_key: bytes = field(default=b"", repr=False)
    integ_id: int = 0
    integ_key: bytes = field(default=b"", repr=False)
    esn: bool = False
    replay_window: int = 64
    encap: UdpEncap | None = None
    lifetime: Lifetime = Lifetime()
    seq_lease_start: int = 1  # first outbound sequence number this worker may use
    seq_lease_end: int = 0  # last one it may use; 0: up to the end of the sequence space
    tfc_pad_to: int = 0  # tunnel mode: pad inner packets up to this many bytes (RFC 4303 §2.7)
    reqid: int = 0  # ties SAs to the SPD entry (policy) they serve
    selectors: tuple[Selector, ...] = ()  # inbound: allowed inner (remote -> local) traffic
    allow_legacy: bool = False
    ttl: int = 64

    def validate(self) -> None:
        if not 256 <= self.spi <= 0xFFFFFFFF:
            raise ConfigError("SPI must be in 256..2^32-1 (RFC 4303 §2.1)")
        if self.protocol not in (IpProto.ESP, IpProto.AH):
            raise ConfigError("protocol must be ESP (50) or AH (51)")
        if len(self.src) not in (4, 16) or len(self.src) != len(self.dst):
            raise ConfigError("src and dst must both be IPv4 or both IPv6 addresses")
        if not 0 <= self.replay_window <= MAX_WINDOW:
            raise ConfigError(f"replay window must be 0..{MAX_WINDOW}")
        if self.encap is not None:
            if self.protocol != IpProto.ESP:
                raise ConfigError("UDP encapsulation applies to ESP only (RFC 3948)")
            for port in (self.encap.sport, self.encap.dport):
                if not 1 <= port <= 0xFFFF:
                    raise ConfigError("UDP encapsulation ports must be 1..65535")
            ka = self.encap.keepalive_interval
            if not math.isfinite(ka) or ka < 0:
                raise ConfigError("keepalive interval must be finite and not negative")
        seq_max = MAX_SEQ_64 if self.esn else MAX_SEQ_32
        if not 1 <= self.seq_lease_start <= seq_max:
            raise ConfigError(f"sequence lease start must be 1..{seq_max} (ESN {self.esn})")
        if self.seq_lease_end > MAX_SEQ_64:
            raise ConfigError("sequence lease end exceeds 2^64-1")
        if self.seq_lease_end and self.seq_lease_end < self.seq_lease_start:
            raise ConfigError("sequence lease end precedes its start")
        if not 0 <= self.tfc_pad_to <= 0xFFFF:
            raise ConfigError("TFC padding target must be 0..65535")
        if not 1 <= self.ttl <= 255:
            raise ConfigError("ttl must be 1..255")
        lt = self.lifetime
        for soft, hard, what in (
            (lt.soft_seconds, lt.hard_seconds, "seconds"),
            (lt.soft_bytes, lt.hard_bytes, "bytes"),
            (lt.soft_packets, lt.hard_packets, "packets"),
        ):
            if not (math.isfinite(soft) and math.isfinite(hard)) or soft < 0 or hard < 0:
                raise ConfigError(f"lifetime {what} must be finite and not negative")
            if soft and hard and soft > hard:
                raise ConfigError(f"soft lifetime {what} exceeds the hard one")

    @property
    def ref(self) -> SaRef:
        return SaRef(self.spi, self.dst, self.protocol, self.reqid, int(self.direction))

    def describe(self) -> str:
        """Human description without keys, for logs."""
        return (
            f"{'esp' if self.protocol == IpProto.ESP else 'ah'} spi=0x{self.spi:08x} "
            f"{self.direction.name.lower()} {self.mode.name.lower()} "
            f"{ipaddress.ip_address(self.src)}->{ipaddress.ip_address(self.dst)}"
        )


Emit = Callable[[Event], None]

# Rate limit for per-SA failure events; counters are always exact.
FAILURE_EVENT_INTERVAL = 1.0
LEASE_LOW_FRACTION = 0.25


class SaBase:
    """State common to ESP and AH SAs: counters, lifetimes, sequence numbers, replay window."""

    def __init__(self, cfg: SaConfig, now: float, emit: Emit) -> None:
        cfg.validate()
        self.cfg = cfg
        self.ref = cfg.ref
        self.spi = cfg.spi
        self.created = now
        self.emit = emit
        self.packets = 0
        self.bytes = 0
        self.replay_drops = 0
        self.auth_drops = 0
        self.other_drops = 0
        self.soft_fired = False
        self.dead = False
        self._last_replay_event = -1e18
        self._last_auth_event = -1e18
        self.seq_max = MAX_SEQ_64 if cfg.esn else MAX_SEQ_32
        self.lease_end = min(cfg.seq_lease_end or self.seq_max, self.seq_max)
        self.next_seq = cfg.seq_lease_start
        self._lease_low_at = self._lease_low_threshold()
        self._lease_low_fired = False
        self.replay = ReplayWindow(cfg.replay_window, esn=cfg.esn)
        self._set_limits(cfg.lifetime)

    def _set_limits(self, lt: Lifetime) -> None:
        self._soft_bytes = lt.soft_bytes or 1 << 64
        self._hard_bytes = lt.hard_bytes or 1 << 64
        self._soft_packets = lt.soft_packets or 1 << 64
        self._hard_packets = lt.hard_packets or 1 << 64

    def set_config(self, cfg: SaConfig) -> None:
        """Adopt a new configuration that differs only in lifetimes (validated by the caller)."""
        self.cfg = cfg
        self._set_limits(cfg.lifetime)

    # --- outbound sequence numbers (RFC 4303 §3.3.3) -----------------------------------------

    def _lease_low_threshold(self) -> int:
        if not self.cfg.seq_lease_end:
            return self.seq_max + 1
        span = self.lease_end - self.next_seq + 1
        return self.lease_end - int(span * LEASE_LOW_FRACTION)

    def take_seq(self) -> int:
        """Allocate the next outbound sequence number; never reuses one."""
        seq = self.next_seq
        if seq > self.lease_end:
            self.other_drops += 1
            if seq > self.seq_max and not self.dead:
                self._hard(ExpiryKind.SEQUENCE)
            raise Drop(DropReason.SEQ_EXHAUSTED)
        self.next_seq = seq + 1
        if seq >= self._lease_low_at and not self._lease_low_fired:
            self._lease_low_fired = True
            self.emit(LeaseLow(self.ref, seq + 1, self.lease_end))
        return seq

    def extend_lease(self, new_end: int) -> None:
        """keymgr granted more sequence numbers; the lease only ever grows."""
        new_end = min(new_end, self.seq_max)
        if new_end > self.lease_end:
            self.lease_end = new_end
            self._lease_low_at = self._lease_low_threshold()
            self._lease_low_fired = False

    # --- accounting and lifetimes (RFC 4301 §4.4.2.1) ----------------------------------------

    def account(self, nbytes: int) -> None:
        self.packets += 1
        self.bytes += nbytes
        if self.bytes >= self._soft_bytes or self.packets >= self._soft_packets:
            self._soft(ExpiryKind.BYTES if self.bytes >= self._soft_bytes else ExpiryKind.PACKETS)
        if self.bytes >= self._hard_bytes or self.packets >= self._hard_packets:
            self._hard(ExpiryKind.BYTES if self.bytes >= self._hard_bytes else ExpiryKind.PACKETS)

    def tick(self, now: float) -> None:
        lt = self.cfg.lifetime
        age = now - self.created
        if lt.soft_seconds and age >= lt.soft_seconds:
            self._soft(ExpiryKind.TIME)
        if lt.hard_seconds and age >= lt.hard_seconds:
            self._hard(ExpiryKind.TIME)

    def _soft(self, kind: ExpiryKind) -> None:
        if not self.soft_fired and not self.dead:
            self.soft_fired = True
            self.emit(SoftExpire(self.ref, kind))

    def _hard(self, kind: ExpiryKind) -> None:
        if not self.dead:
            self.dead = True
            self.soft_fired = True
            self.emit(HardExpire(self.ref, kind))

    def check_alive(self) -> None:
        if self.dead:
            self.other_drops += 1
            raise Drop(DropReason.SA_EXPIRED)

    # --- inbound failures --------------------------------------------------------------------

    def replay_failed(self, seq: int, now: float) -> Drop:
        self.replay_drops += 1
        if now - self._last_replay_event >= FAILURE_EVENT_INTERVAL:
            self._last_replay_event = now
            self.emit(ReplayDetected(self.ref, seq, self.replay_drops))
        return Drop(DropReason.REPLAY)

    def auth_failed(self, now: float) -> Drop:
        self.auth_drops += 1
        if now - self._last_auth_event >= FAILURE_EVENT_INTERVAL:
            self._last_auth_event = now
            self.emit(IntegrityFailed(self.ref, self.auth_drops))
        return Drop(DropReason.AUTH)

    def check_selectors(self, inner: bytes | memoryview) -> None:
        if self.cfg.selectors and not any(s.matches_packet(inner) for s in self.cfg.selectors):
            self.other_drops += 1
            raise Drop(DropReason.SELECTOR)
