"""Conversion and validation between ipsec.v1 protobuf messages and core types: SAD entries
(RFC 4301 §4.4.2), SPD entries and traffic selectors (§4.4.1), dataplane events, punted IKE
datagrams (RFC 7296 §2, RFC 3948 §2.2).

This is the only module besides grpc_api that touches ``*_pb2`` message types; the client uses
its request builders and response parsers. Every ``*_from_pb`` function treats its input as
hostile: it returns a value or raises :class:`ConversionError`, whose message never contains
key bytes (at most a key's length).
"""

from __future__ import annotations

import functools
import ipaddress
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from services.core.engine import SaStatus
from services.core.events import (
    Acquire,
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
from services.core.replay import MAX_WINDOW
from services.core.sa import ConfigError, Direction, Lifetime, Mode, SaConfig, UdpEncap
from services.core.selectors import Prefix, Selector
from services.core.spd import Action, SpdEntry
from services.pb.ipsec.v1 import dataplane_pb2 as pb

U32 = 0xFFFFFFFF
U64 = 0xFFFFFFFFFFFFFFFF
MAX_KEY_BYTES = 512  # far above any registered algorithm's key material
MAX_SELECTORS = 256
MAX_SPD_ENTRIES = 65536
MAX_BATCH_INSTALLS = 256  # ApplySAs
MAX_BATCH_DELETES = 256
MAX_IKE_BYTES = 65503  # 65535 - IPv4 header - UDP header - non-ESP marker
MAX_ADDR_TEXT = 64
MAX_KEEPALIVE_INTERVAL = 3600.0
DEFAULT_ENCAP_PORT = 4500


class ConversionError(ValueError):
    """A message that cannot be converted; the text names the field, never key bytes."""


class SaId(NamedTuple):
    """RFC 4301 §4.1: (SPI, destination, protocol), plus the direction."""

    spi: int
    dst: bytes
    protocol: int
    direction: Direction


@dataclass(frozen=True, slots=True)
class SaUpdate:
    id: SaId
    lease_end: int | None
    lifetime: Lifetime | None


@dataclass(frozen=True, slots=True)
class SaBatch:
    """An ApplySAs request after validation: deletes, installs, and an optional full SPD
    replacement as (entries, revision)."""

    installs: tuple[SaConfig, ...]
    deletes: tuple[SaId, ...]
    spd: tuple[list[SpdEntry], int] | None


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """What ApplySAs reports: per delete item (request order) whether the SA existed, how many
    SAs were installed (all of them, since a batch is all or nothing) and the SPD revision
    enforced after the batch."""

    existed: tuple[bool, ...]
    installed: int
    spd_revision: int


@dataclass(frozen=True, slots=True)
class WorkerStats:
    worker_id: str
    spd_revision: int
    rx_packets: int
    rx_bytes: int
    tx_packets: int
    tx_bytes: int
    bypass_packets: int
    keepalives: int
    drops: dict[str, int]
    sa_count: int
    interfaces: tuple[str, ...] = ()
    local_addresses: tuple[str, ...] = ()
    internal_errors: int = 0
    keepalives_sent: int = 0
    policy_revision: int = 0
    inbound_filter: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class WorkerEvent:
    """A core event as published by a worker; ``direction`` of the SA it names, when known."""

    worker_id: str
    time: float  # wall clock, seconds since the epoch
    event: Event
    direction: Direction | None = None


@dataclass(frozen=True, slots=True)
class IkeDatagram:
    """An IKE message punted from, or injected into, a worker's UDP 500/4500 socket.
    ``data`` excludes the non-ESP marker and is left out of repr."""

    local_addr: str
    local_port: int
    remote_addr: str
    remote_port: int
    data: bytes = field(repr=False)


# --- primitives ------------------------------------------------------------------------------


def _addr(text: str, what: str, *, allow_unspecified: bool = False) -> bytes:
    if len(text) <= MAX_ADDR_TEXT:
        return _addr_cached(text, what, allow_unspecified)
    raise ConversionError(f"{what}: not an IP address")


@functools.lru_cache(maxsize=4096)
def _addr_cached(text: str, what: str, allow_unspecified: bool) -> bytes:
    """_addr, remembered: every SA, SPD entry and IKE datagram names the same few addresses.
    (A refused address raises each time: exceptions are not cached.)"""
    if not text:
        raise ConversionError(f"{what}: an address is required")
    if len(text) > MAX_ADDR_TEXT or "%" in text:
        raise ConversionError(f"{what}: not an IP address")
    try:
        a = ipaddress.ip_address(text)
    except ValueError:
        raise ConversionError(f"{what}: not an IP address") from None
    if a.is_unspecified and not allow_unspecified:
        raise ConversionError(f"{what}: the unspecified address is not allowed")
    return a.packed


def addr_text(packed: bytes) -> str:
    """Textual form of a packed 4- or 16-byte address."""
    if len(packed) not in (4, 16):
        raise ConversionError("address must be 4 or 16 bytes")
    return _addr_text(packed)


@functools.lru_cache(maxsize=4096)
def _addr_text(packed: bytes) -> str:
    return str(ipaddress.ip_address(packed))


def normalize_addr(text: str, what: str = "address") -> str:
    """Canonical text of an address (e.g. '2001:DB8::0001' -> '2001:db8::1')."""
    return addr_text(_addr(text, what))


def _u(value: int, bits: int = 64) -> int:
    """Clamp an int into an unsigned protobuf field."""
    return min(max(int(value), 0), (1 << bits) - 1)


def _port(value: int, what: str, *, default: int | None = None) -> int:
    if value == 0 and default is not None:
        return default
    if not 1 <= value <= 0xFFFF:
        raise ConversionError(f"{what}: port must be 1..65535")
    return value


_PROTOCOLS: dict[int, int] = {pb.PROTOCOL_ESP: int(IpProto.ESP), pb.PROTOCOL_AH: int(IpProto.AH)}
_DIRECTIONS: dict[int, Direction] = {
    pb.DIRECTION_INBOUND: Direction.INBOUND,
    pb.DIRECTION_OUTBOUND: Direction.OUTBOUND,
}
_MODES: dict[int, Mode] = {pb.MODE_TRANSPORT: Mode.TRANSPORT, pb.MODE_TUNNEL: Mode.TUNNEL}
_ACTIONS: dict[int, Action] = {
    pb.ACTION_BYPASS: Action.BYPASS,
    pb.ACTION_DISCARD: Action.DISCARD,
    pb.ACTION_PROTECT: Action.PROTECT,
}
_EXPIRY = {
    ExpiryKind.TIME: pb.EXPIRY_KIND_TIME,
    ExpiryKind.BYTES: pb.EXPIRY_KIND_BYTES,
    ExpiryKind.PACKETS: pb.EXPIRY_KIND_PACKETS,
    ExpiryKind.SEQUENCE: pb.EXPIRY_KIND_SEQUENCE,
}
_EXPIRY_BACK = {v: k for k, v in _EXPIRY.items()}


def _protocol(value: int, what: str = "protocol") -> int:
    try:
        return _PROTOCOLS[value]
    except KeyError:
        raise ConversionError(f"{what}: must be PROTOCOL_ESP or PROTOCOL_AH") from None


def _direction(value: int) -> Direction:
    try:
        return _DIRECTIONS[value]
    except KeyError:
        raise ConversionError("direction: must be INBOUND or OUTBOUND") from None


def _protocol_pb(protocol: int) -> pb.Protocol:
    return pb.PROTOCOL_ESP if protocol == IpProto.ESP else pb.PROTOCOL_AH


def _direction_pb(direction: Direction | None) -> pb.Direction:
    if direction is None:
        return pb.DIRECTION_UNSPECIFIED
    return pb.DIRECTION_INBOUND if direction == Direction.INBOUND else pb.DIRECTION_OUTBOUND


# --- SA identity, lifetimes, selectors ------------------------------------------------------


def sa_id_from_pb(m: pb.SAId) -> SaId:
    if not 1 <= m.spi <= U32:
        raise ConversionError("id.spi: must be 1..4294967295")
    return SaId(
        m.spi, _addr(m.dst, "id.dst"), _protocol(m.protocol, "id.protocol"), _direction(m.direction)
    )


def sa_id_to_pb(spi: int, dst: bytes, protocol: int, direction: Direction | None) -> pb.SAId:
    return pb.SAId(
        spi=_u(spi, 32),
        dst=addr_text(dst),
        protocol=_protocol_pb(protocol),
        direction=_direction_pb(direction),
    )


def lifetime_from_pb(m: pb.Lifetime) -> Lifetime:
    for name in ("soft_seconds", "hard_seconds"):
        v = getattr(m, name)
        if not math.isfinite(v) or v < 0:
            raise ConversionError(f"lifetime.{name}: must be a finite number >= 0")
    lt = Lifetime(
        m.soft_seconds, m.hard_seconds, m.soft_bytes, m.hard_bytes, m.soft_packets, m.hard_packets
    )
    for soft, hard, what in (
        (lt.soft_seconds, lt.hard_seconds, "seconds"),
        (lt.soft_bytes, lt.hard_bytes, "bytes"),
        (lt.soft_packets, lt.hard_packets, "packets"),
    ):
        if soft and hard and soft > hard:
            raise ConversionError(f"lifetime: soft {what} exceeds hard {what}")
    return lt


def lifetime_to_pb(lt: Lifetime) -> pb.Lifetime:
    return pb.Lifetime(
        soft_seconds=float(lt.soft_seconds),
        hard_seconds=float(lt.hard_seconds),
        soft_bytes=_u(lt.soft_bytes),
        hard_bytes=_u(lt.hard_bytes),
        soft_packets=_u(lt.soft_packets),
        hard_packets=_u(lt.hard_packets),
    )


def _port_range(lo: int, hi: int, what: str) -> tuple[int, int]:
    if lo == 0 and hi == 0:
        return 0, 0xFFFF
    if not lo <= hi <= 0xFFFF:
        raise ConversionError(f"{what}: need lo <= hi <= 65535 (0, 0 = any)")
    return lo, hi


def selector_from_pb(m: pb.TrafficSelector, what: str = "selector") -> Selector:
    for name in ("src", "dst"):
        text = getattr(m, name)
        if not text or len(text) > MAX_ADDR_TEXT + 4 or "%" in text:
            raise ConversionError(f"{what}.{name}: a prefix such as 192.0.2.0/24 is required")
    if m.proto > 255:
        raise ConversionError(f"{what}.proto: must be 0..255")
    sport = _port_range(m.sport_lo, m.sport_hi, f"{what}.sport")
    dport = _port_range(m.dport_lo, m.dport_hi, f"{what}.dport")
    try:
        return _selector(m.src, m.dst, m.proto, sport, dport)
    except ValueError:
        raise ConversionError(
            f"{what}: src and dst must be prefixes of the same IP version"
        ) from None


@functools.lru_cache(maxsize=4096)
def _selector(
    src: str, dst: str, proto: int, sport: tuple[int, int], dport: tuple[int, int]
) -> Selector:
    """Selector.make, remembered (immutable; each Child SA of a policy repeats it)."""
    return Selector.make(src, dst, proto, sport, dport)


def _prefix_text(p: Prefix) -> str:
    return str(p)


def selector_to_pb(s: Selector) -> pb.TrafficSelector:
    def rng(lo: int, hi: int) -> tuple[int, int]:
        return (0, 0) if (lo, hi) == (0, 0xFFFF) else (lo, hi)

    slo, shi = rng(s.sport_lo, s.sport_hi)
    dlo, dhi = rng(s.dport_lo, s.dport_hi)
    return pb.TrafficSelector(
        src=_prefix_text(s.src),
        dst=_prefix_text(s.dst),
        proto=s.proto,
        sport_lo=slo,
        sport_hi=shi,
        dport_lo=dlo,
        dport_hi=dhi,
    )


# --- SAs ---------------------------------------------------------------------------------------


def sa_config_from_pb(m: pb.SAConfig) -> SaConfig:
    """Validate an SAConfig message field by field and build the core SaConfig.

    Algorithm and key-length checks are left to the core (it raises ConfigError at install,
    which the API maps to INVALID_ARGUMENT), so there is one source of truth for them.
    """
    if not m.HasField("id"):
        raise ConversionError("id: required")
    sid = sa_id_from_pb(m.id)
    if sid.spi < 256:
        raise ConversionError("id.spi: must be 256..4294967295 (RFC 4303 §2.1)")
    try:
        mode = _MODES[m.mode]
    except KeyError:
        raise ConversionError("mode: must be TRANSPORT or TUNNEL") from None
    src = _addr(m.src, "src")
    if len(src) != len(sid.dst):
        raise ConversionError("src and id.dst must both be IPv4 or both IPv6")
    for name in ("encr_key", "integ_key"):
        if len(getattr(m, name)) > MAX_KEY_BYTES:
            raise ConversionError(f"{name}: longer than {MAX_KEY_BYTES} bytes")
    if m.replay_window > MAX_WINDOW:
        raise ConversionError(f"replay_window: must be 0..{MAX_WINDOW}")
    encap: UdpEncap | None = None
    if m.HasField("encap"):
        if sid.protocol != IpProto.ESP:
            raise ConversionError("encap: UDP encapsulation applies to ESP only (RFC 3948)")
        ka = m.encap.keepalive_interval
        if not math.isfinite(ka) or not 0 <= ka <= MAX_KEEPALIVE_INTERVAL:
            raise ConversionError(
                f"encap.keepalive_interval: must be 0..{MAX_KEEPALIVE_INTERVAL} seconds"
            )
        encap = UdpEncap(
            _port(m.encap.sport, "encap.sport", default=DEFAULT_ENCAP_PORT),
            _port(m.encap.dport, "encap.dport", default=DEFAULT_ENCAP_PORT),
            ka,
        )
    lifetime = lifetime_from_pb(m.lifetime) if m.HasField("lifetime") else Lifetime()
    seq_max = U64 if m.esn else U32
    start = m.seq_lease_start or 1
    if start > seq_max:
        raise ConversionError("seq_lease_start: beyond the sequence space (ESN off: 2^32-1)")
    if m.seq_lease_end and m.seq_lease_end < start:
        raise ConversionError("seq_lease_end: precedes seq_lease_start")
    if m.tfc_pad_to > 0xFFFF:
        raise ConversionError("tfc_pad_to: must be 0..65535")
    if len(m.selectors) > MAX_SELECTORS:
        raise ConversionError(f"selectors: at most {MAX_SELECTORS}")
    selectors = tuple(selector_from_pb(s, f"selectors[{i}]") for i, s in enumerate(m.selectors))
    for i, s in enumerate(selectors):
        if s.src.version != (4 if len(src) == 4 else 6) and mode == Mode.TRANSPORT:
            raise ConversionError(f"selectors[{i}]: transport mode selectors must match src family")
    cfg = SaConfig(
        spi=sid.spi,
        protocol=sid.protocol,
        direction=sid.direction,
        mode=mode,
        src=src,
        dst=sid.dst,
        encr_id=m.encr_id,
        encr_key=m.encr_key,
        integ_id=m.integ_id,
        integ_key=m.integ_key,
        esn=m.esn,
        replay_window=m.replay_window,
        encap=encap,
        lifetime=lifetime,
        seq_lease_start=start,
        seq_lease_end=m.seq_lease_end,
        tfc_pad_to=m.tfc_pad_to,
        reqid=m.reqid,
        selectors=selectors,
        allow_legacy=m.allow_legacy,
    )
    try:
        cfg.validate()
    except ConfigError as e:
        raise ConversionError(str(e)) from None
    return cfg


def sa_config_to_pb(cfg: SaConfig) -> pb.SAConfig:
    m = pb.SAConfig(
        id=sa_id_to_pb(cfg.spi, cfg.dst, cfg.protocol, cfg.direction),
        mode=pb.MODE_TUNNEL if cfg.mode == Mode.TUNNEL else pb.MODE_TRANSPORT,
        src=addr_text(cfg.src),
        encr_id=cfg.encr_id,
        encr_key=cfg.encr_key,
        integ_id=cfg.integ_id,
        integ_key=cfg.integ_key,
        esn=cfg.esn,
        replay_window=cfg.replay_window,
        lifetime=lifetime_to_pb(cfg.lifetime),
        seq_lease_start=cfg.seq_lease_start,
        seq_lease_end=cfg.seq_lease_end,
        tfc_pad_to=cfg.tfc_pad_to,
        reqid=cfg.reqid,
        selectors=[selector_to_pb(s) for s in cfg.selectors],
        allow_legacy=cfg.allow_legacy,
    )
    if cfg.encap is not None:
        m.encap.CopyFrom(
            pb.UdpEncap(
                sport=cfg.encap.sport,
                dport=cfg.encap.dport,
                keepalive_interval=cfg.encap.keepalive_interval,
            )
        )
    return m


def install_request(cfg: SaConfig) -> pb.InstallSARequest:
    return pb.InstallSARequest(sa=sa_config_to_pb(cfg))


def install_from_pb(req: pb.InstallSARequest) -> SaConfig:
    if not req.HasField("sa"):
        raise ConversionError("sa: required")
    return sa_config_from_pb(req.sa)


def update_from_pb(req: pb.UpdateSARequest) -> SaUpdate:
    if not req.HasField("id"):
        raise ConversionError("id: required")
    sid = sa_id_from_pb(req.id)
    lifetime = lifetime_from_pb(req.lifetime) if req.HasField("lifetime") else None
    return SaUpdate(sid, req.seq_lease_end or None, lifetime)


def update_request(
    sid: SaId, *, seq_lease_end: int | None = None, lifetime: Lifetime | None = None
) -> pb.UpdateSARequest:
    m = pb.UpdateSARequest(id=sa_id_to_pb(*sid), seq_lease_end=_u(seq_lease_end or 0))
    if lifetime is not None:
        m.lifetime.CopyFrom(lifetime_to_pb(lifetime))
    return m


def delete_from_pb(req: pb.DeleteSARequest) -> SaId:
    if not req.HasField("id"):
        raise ConversionError("id: required")
    return sa_id_from_pb(req.id)


def delete_request(sid: SaId) -> pb.DeleteSARequest:
    return pb.DeleteSARequest(id=sa_id_to_pb(*sid))


def delete_response(existed: bool) -> pb.DeleteSAResponse:
    return pb.DeleteSAResponse(existed=existed)


def delete_existed(resp: pb.DeleteSAResponse) -> bool:
    return bool(resp.existed)


# --- SPD ---------------------------------------------------------------------------------------


def spd_entry_from_pb(m: pb.SPDEntry, what: str = "entry") -> SpdEntry:
    try:
        action = _ACTIONS[m.action]
    except KeyError:
        raise ConversionError(f"{what}.action: must be BYPASS, DISCARD or PROTECT") from None
    if not m.HasField("selector"):
        raise ConversionError(f"{what}.selector: required")
    sel = selector_from_pb(m.selector, f"{what}.selector")
    protocols = tuple(_protocol(p, f"{what}.protocols") for p in m.protocols)
    if len(set(protocols)) != len(protocols):
        raise ConversionError(f"{what}.protocols: duplicates")
    if action == Action.PROTECT and not protocols:
        protocols = (int(IpProto.ESP),)
    if action != Action.PROTECT and (m.accept_clear or m.clear_fallback):
        raise ConversionError(f"{what}: accept_clear and clear_fallback are for PROTECT entries")
    return SpdEntry(
        m.policy_id,
        m.priority,
        action,
        sel,
        m.reqid,
        protocols or (50,),
        accept_clear=m.accept_clear,
        clear_fallback=m.clear_fallback,
    )


def spd_from_pb(req: pb.ReplaceSPDRequest) -> tuple[list[SpdEntry], int]:
    if len(req.entries) > MAX_SPD_ENTRIES:
        raise ConversionError(f"entries: at most {MAX_SPD_ENTRIES}")
    entries = [spd_entry_from_pb(e, f"entries[{i}]") for i, e in enumerate(req.entries)]
    ids = [e.policy_id for e in entries]
    if len(set(ids)) != len(ids):
        raise ConversionError("entries: duplicate policy_id")
    return entries, req.revision


def spd_entry_to_pb(e: SpdEntry) -> pb.SPDEntry:
    action = {
        Action.BYPASS: pb.ACTION_BYPASS,
        Action.DISCARD: pb.ACTION_DISCARD,
        Action.PROTECT: pb.ACTION_PROTECT,
    }[e.action]
    return pb.SPDEntry(
        policy_id=_u(e.policy_id, 32),
        priority=e.priority,
        action=action,
        selector=selector_to_pb(e.selector),
        reqid=_u(e.reqid, 32),
        protocols=[_protocol_pb(p) for p in e.protocols],
        accept_clear=e.accept_clear,
        clear_fallback=e.clear_fallback,
    )


def replace_spd_request(entries: Iterable[SpdEntry], revision: int) -> pb.ReplaceSPDRequest:
    return pb.ReplaceSPDRequest(revision=revision, entries=[spd_entry_to_pb(e) for e in entries])


def replace_spd_response(revision: int) -> pb.ReplaceSPDResponse:
    return pb.ReplaceSPDResponse(revision=_u(revision))


def replace_spd_revision(resp: pb.ReplaceSPDResponse) -> int:
    return int(resp.revision)


# --- batches (ApplySAs) -----------------------------------------------------------------------


def _item(what: str, e: ConversionError) -> ConversionError:
    return ConversionError(f"{what}: {e}")


def apply_from_pb(req: pb.ApplySAsRequest) -> SaBatch:
    """Validate a whole batch with the single-RPC converters; the error names the item."""
    if len(req.install) > MAX_BATCH_INSTALLS:
        raise ConversionError(f"install: at most {MAX_BATCH_INSTALLS} SAs per batch")
    if len(req.delete) > MAX_BATCH_DELETES:
        raise ConversionError(f"delete: at most {MAX_BATCH_DELETES} SAs per batch")
    installs: list[SaConfig] = []
    for i, m in enumerate(req.install):
        try:
            installs.append(sa_config_from_pb(m))
        except ConversionError as e:
            raise _item(f"install[{i}]", e) from None
    deletes: list[SaId] = []
    for i, d in enumerate(req.delete):
        try:
            deletes.append(sa_id_from_pb(d))
        except ConversionError as e:
            raise _item(f"delete[{i}]", e) from None
    spd: tuple[list[SpdEntry], int] | None = None
    if req.HasField("spd"):
        try:
            spd = spd_from_pb(req.spd)
        except ConversionError as e:
            raise _item("spd", e) from None
    return SaBatch(tuple(installs), tuple(deletes), spd)


def apply_request(
    installs: Iterable[SaConfig],
    deletes: Iterable[SaId],
    spd: tuple[Iterable[SpdEntry], int] | None = None,
) -> pb.ApplySAsRequest:
    m = pb.ApplySAsRequest(
        install=[sa_config_to_pb(c) for c in installs],
        delete=[sa_id_to_pb(*sid) for sid in deletes],
    )
    if spd is not None:
        m.spd.CopyFrom(replace_spd_request(*spd))
    return m


def apply_response(existed: Sequence[bool], installed: int, revision: int) -> pb.ApplySAsResponse:
    return pb.ApplySAsResponse(
        existed=list(existed), installed=_u(installed, 32), spd_revision=_u(revision)
    )


def apply_result(resp: pb.ApplySAsResponse) -> ApplyResult:
    return ApplyResult(tuple(resp.existed), int(resp.installed), int(resp.spd_revision))


# --- status ------------------------------------------------------------------------------------


def sa_info_to_pb(s: SaStatus) -> pb.SAInfo:
    """From a core SaStatus (which holds no keys)."""
    return pb.SAInfo(
        id=sa_id_to_pb(s.spi, s.dst, s.protocol, s.direction),
        mode=pb.MODE_TUNNEL if s.mode == "tunnel" else pb.MODE_TRANSPORT,
        src=addr_text(s.src),
        reqid=_u(s.reqid, 32),
        encr=s.encr,
        integ_id=_u(s.integ, 32),
        esn=s.esn,
        udp_encap=s.encap,
        replay_window=_u(s.replay_window, 32),
        packets=_u(s.packets),
        bytes=_u(s.bytes),
        replay_drops=_u(s.replay_drops),
        auth_drops=_u(s.auth_drops),
        other_drops=_u(s.other_drops),
        next_seq=_u(s.next_seq),
        lease_end=_u(s.lease_end),
        replay_top=_u(s.replay_top),
        soft_expired=s.soft_expired,
        hard_expired=s.hard_expired,
        age_seconds=float(s.age),
    )


def list_sas_request() -> pb.ListSAsRequest:
    return pb.ListSAsRequest()


def list_sas_response(infos: Sequence[pb.SAInfo]) -> pb.ListSAsResponse:
    return pb.ListSAsResponse(sas=list(infos))


def sa_infos_from_pb(resp: pb.ListSAsResponse) -> list[SaStatus]:
    return [sa_info_from_pb(i) for i in resp.sas]


def sa_info_from_pb(m: pb.SAInfo) -> SaStatus:
    """To a core SaStatus (client side)."""
    sid = sa_id_from_pb(m.id)
    return SaStatus(
        spi=sid.spi,
        protocol=sid.protocol,
        direction=sid.direction,
        mode="tunnel" if m.mode == pb.MODE_TUNNEL else "transport",
        src=_addr(m.src, "src"),
        dst=sid.dst,
        reqid=m.reqid,
        encr=m.encr,
        integ=m.integ_id,
        esn=m.esn,
        encap=m.udp_encap,
        replay_window=m.replay_window,
        packets=m.packets,
        bytes=m.bytes,
        replay_drops=m.replay_drops,
        auth_drops=m.auth_drops,
        other_drops=m.other_drops,
        next_seq=m.next_seq,
        lease_end=m.lease_end,
        replay_top=m.replay_top,
        soft_expired=m.soft_expired,
        hard_expired=m.hard_expired,
        age=m.age_seconds,
    )


def get_stats_request() -> pb.GetStatsRequest:
    return pb.GetStatsRequest()


def stats_to_pb(s: WorkerStats) -> pb.GetStatsResponse:
    return pb.GetStatsResponse(
        worker_id=s.worker_id,
        spd_revision=_u(s.spd_revision),
        rx_packets=_u(s.rx_packets),
        rx_bytes=_u(s.rx_bytes),
        tx_packets=_u(s.tx_packets),
        tx_bytes=_u(s.tx_bytes),
        bypass_packets=_u(s.bypass_packets),
        keepalives=_u(s.keepalives),
        drops={k: _u(v) for k, v in s.drops.items()},
        sa_count=_u(s.sa_count, 32),
        interfaces=list(s.interfaces),
        local_addresses=list(s.local_addresses),
        internal_errors=_u(s.internal_errors),
        keepalives_sent=_u(s.keepalives_sent),
        policy_revision=_u(s.policy_revision),
        inbound_filter={k: _u(v) for k, v in s.inbound_filter.items()},
    )


def stats_from_pb(m: pb.GetStatsResponse) -> WorkerStats:
    return WorkerStats(
        worker_id=m.worker_id,
        spd_revision=m.spd_revision,
        rx_packets=m.rx_packets,
        rx_bytes=m.rx_bytes,
        tx_packets=m.tx_packets,
        tx_bytes=m.tx_bytes,
        bypass_packets=m.bypass_packets,
        keepalives=m.keepalives,
        drops=dict(m.drops),
        sa_count=m.sa_count,
        interfaces=tuple(m.interfaces),
        local_addresses=tuple(m.local_addresses),
        internal_errors=m.internal_errors,
        keepalives_sent=m.keepalives_sent,
        policy_revision=m.policy_revision,
        inbound_filter=dict(m.inbound_filter),
    )


# --- events ------------------------------------------------------------------------------------


def watch_events_request() -> pb.WatchEventsRequest:
    return pb.WatchEventsRequest()


def event_to_pb(we: WorkerEvent) -> pb.Event:
    out = pb.Event(worker_id=we.worker_id, time=we.time)
    ev = we.event

    def sid(ref: SaRef) -> pb.SAId:
        return sa_id_to_pb(ref.spi, ref.dst, ref.protocol, we.direction)

    if isinstance(ev, Acquire):
        out.acquire.CopyFrom(
            pb.AcquireEvent(
                policy_id=_u(ev.policy_id, 32),
                reqid=_u(ev.reqid, 32),
                src=addr_text(ev.src),
                dst=addr_text(ev.dst),
                proto=_u(ev.proto, 32),
                sport=_u(ev.sport, 32),
                dport=_u(ev.dport, 32),
            )
        )
    elif isinstance(ev, SoftExpire | HardExpire):
        out.expire.CopyFrom(
            pb.ExpireEvent(
                id=sid(ev.sa),
                reqid=_u(ev.sa.reqid, 32),
                kind=_EXPIRY[ev.kind],
                hard=isinstance(ev, HardExpire),
            )
        )
    elif isinstance(ev, LeaseLow):
        out.lease_low.CopyFrom(
            pb.LeaseLowEvent(id=sid(ev.sa), next_seq=_u(ev.next_seq), lease_end=_u(ev.lease_end))
        )
    elif isinstance(ev, ReplayDetected):
        out.replay.CopyFrom(pb.ReplayEvent(id=sid(ev.sa), seq=_u(ev.seq), count=_u(ev.count)))
    elif isinstance(ev, IntegrityFailed):
        out.integrity_failure.CopyFrom(pb.IntegrityFailureEvent(id=sid(ev.sa), count=_u(ev.count)))
    else:
        raise ConversionError(f"unknown event type {type(ev).__name__}")
    return out


def _ref_from_pb(m: pb.SAId, reqid: int = 0) -> tuple[SaRef, Direction | None]:
    if not 1 <= m.spi <= U32:
        raise ConversionError("id.spi: must be 1..4294967295")
    ref = SaRef(m.spi, _addr(m.dst, "id.dst"), _protocol(m.protocol, "id.protocol"), reqid)
    direction = _DIRECTIONS.get(m.direction)
    return ref, direction


def event_from_pb(m: pb.Event) -> WorkerEvent:
    kind = m.WhichOneof("kind")
    ev: Event
    direction: Direction | None = None
    if kind == "acquire":
        a = m.acquire
        ev = Acquire(
            a.policy_id,
            a.reqid,
            _addr(a.src, "acquire.src", allow_unspecified=True),
            _addr(a.dst, "acquire.dst", allow_unspecified=True),
            a.proto,
            a.sport,
            a.dport,
        )
    elif kind == "expire":
        e = m.expire
        ref, direction = _ref_from_pb(e.id, e.reqid)
        try:
            ek = _EXPIRY_BACK[e.kind]
        except KeyError:
            raise ConversionError("expire.kind: unknown") from None
        ev = HardExpire(ref, ek) if e.hard else SoftExpire(ref, ek)
    elif kind == "lease_low":
        ref, direction = _ref_from_pb(m.lease_low.id)
        ev = LeaseLow(ref, m.lease_low.next_seq, m.lease_low.lease_end)
    elif kind == "replay":
        ref, direction = _ref_from_pb(m.replay.id)
        ev = ReplayDetected(ref, m.replay.seq, m.replay.count)
    elif kind == "integrity_failure":
        ref, direction = _ref_from_pb(m.integrity_failure.id)
        ev = IntegrityFailed(ref, m.integrity_failure.count)
    else:
        raise ConversionError("event: no kind set")
    if not math.isfinite(m.time):
        raise ConversionError("event.time: not finite")
    return WorkerEvent(m.worker_id, m.time, ev, direction)


# --- punt / inject -----------------------------------------------------------------------------


def ike_from_pb(m: pb.IkeDatagram) -> IkeDatagram:
    local = _addr(m.local_addr, "local_addr")
    remote = _addr(m.remote_addr, "remote_addr")
    if len(local) != len(remote):
        raise ConversionError("local_addr and remote_addr must be the same IP version")
    lport = _port(m.local_port, "local_port")
    rport = _port(m.remote_port, "remote_port")
    if not 1 <= len(m.data) <= MAX_IKE_BYTES:
        raise ConversionError(f"data: must be 1..{MAX_IKE_BYTES} bytes")
    return IkeDatagram(addr_text(local), lport, addr_text(remote), rport, m.data)


def ike_to_pb(d: IkeDatagram) -> pb.IkeDatagram:
    return pb.IkeDatagram(
        local_addr=d.local_addr,
        local_port=_u(d.local_port, 32),
        remote_addr=d.remote_addr,
        remote_port=_u(d.remote_port, 32),
        data=d.data,
    )


def ike_batch_to_pb(batch: Iterable[IkeDatagram]) -> pb.IkeDatagramBatch:
    return pb.IkeDatagramBatch(datagrams=[ike_to_pb(d) for d in batch])


def ike_batch_from_pb(m: pb.IkeDatagramBatch) -> list[IkeDatagram]:
    return [ike_from_pb(d) for d in m.datagrams]


# --- empty responses ---------------------------------------------------------------------------


def install_response() -> pb.InstallSAResponse:
    return pb.InstallSAResponse()


def update_response() -> pb.UpdateSAResponse:
    return pb.UpdateSAResponse()
