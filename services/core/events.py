"""Dataplane events and drop reasons (RFC 4301 §5.2 audit events, RFC 4303 §3.4.3/§3.4.4)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class DropReason(str, Enum):  # noqa: UP042 -- str() stays "DropReason.X" for callers
    """Why a packet was not forwarded; every drop is counted under one of these."""

    MALFORMED = "malformed"
    NO_SA = "no_sa"
    REPLAY = "replay"
    AUTH = "auth_failed"
    PADDING = "bad_padding"
    DUMMY = "tfc_dummy"
    NO_POLICY = "no_policy"
    POLICY_DISCARD = "policy_discard"
    NO_OUTBOUND_SA = "acquire_pending"
    SELECTOR = "selector_mismatch"
    SA_EXPIRED = "sa_expired"
    SEQ_EXHAUSTED = "seq_exhausted"
    FRAGMENT = "transport_fragment"
    TOO_BIG = "too_big"
    UNSUPPORTED = "unsupported"


class Drop(Exception):
    """Raised inside the core when a packet is dropped; caught and counted by the engine."""

    def __init__(self, reason: DropReason) -> None:
        super().__init__(reason.value)
        self.reason = reason


class ExpiryKind(str, Enum):  # noqa: UP042
    TIME = "time"
    BYTES = "bytes"
    PACKETS = "packets"
    SEQUENCE = "sequence"


@dataclass(frozen=True, slots=True)
class SaRef:
    """How an SA is named outside the worker: (SPI, destination, protocol) per RFC 4301 §4.1."""

    spi: int
    dst: bytes
    protocol: int
    reqid: int
    direction: int = 0  # sa.Direction value (1 inbound, 2 outbound); 0 when unknown


@dataclass(frozen=True, slots=True)
class Acquire:
    """Traffic matched a PROTECT entry but no outbound SA exists (RFC 4301 §5.1.1)."""

    policy_id: int
    reqid: int
    src: bytes
    dst: bytes
    proto: int
    sport: int
    dport: int


@dataclass(frozen=True, slots=True)
class SoftExpire:
    sa: SaRef
    kind: ExpiryKind


@dataclass(frozen=True, slots=True)
class HardExpire:
    sa: SaRef
    kind: ExpiryKind


@dataclass(frozen=True, slots=True)
class LeaseLow:
    """The outbound sequence-number lease is nearly used up: keymgr should extend or rekey."""

    sa: SaRef
    next_seq: int
    lease_end: int


@dataclass(frozen=True, slots=True)
class ReplayDetected:
    sa: SaRef
    seq: int
    count: int  # replays on this SA so far


@dataclass(frozen=True, slots=True)
class IntegrityFailed:
    sa: SaRef
    count: int  # ICV failures on this SA so far


Event = Acquire | SoftExpire | HardExpire | LeaseLow | ReplayDetected | IntegrityFailed
