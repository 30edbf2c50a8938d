"""The sans-IO dataplane: SAD keyed by (SPI, destination, protocol) (RFC 4301 §4.4.2), SPD
decisions on outbound traffic (§5.1), inbound processing of nested AH/ESP (§5.2), ESP-in-UDP
demultiplexing and NAT keepalives (RFC 3948 §2.2, §2.3), ACQUIRE and lifetime events.

Two SPD layers (docs/design.md, "SPD layers"): the *keymgr layer* (``replace_spd`` /
``apply_batch``: the entries keymgr installs for its connections, revision ``spd.revision``)
and the *policy layer* (``replace_policy``: policyd's compiled policy for this node, revision
``policy_revision``). Each layer has its own revision that must not go backwards. The enforced
SPD (``spd``, one index and flow cache) is the keymgr layer first, then the policy layer, each
in its own priority order, ranked 0..n-1 in exactly that order (the entries keep their own
``priority`` values; the rank decides): explicit local entries from keymgr are the more
specific configuration. Policy layer entries carry ``POLICY_ID_BASE + policy_id`` in the
merged SPD (and so in ACQUIRE events), so the two layers' ids never collide.

A worker feeds datagrams and ``now`` in and sends what comes back; nothing here does I/O.
"""

from __future__ import annotations

import struct
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import Enum
from typing import NamedTuple

from services.core.ah import AhSa
from services.core.esp import NAT_KEEPALIVE, EspSa
from services.core.events import Acquire, Drop, DropReason, Event
from services.core.iana import IpProto
from services.core.packet import MalformedPacket, build_ipv4, build_ipv6, flow_key, parse_ip
from services.core.sa import ConfigError, Direction, Lifetime, SaConfig
from services.core.spd import Action, Spd, SpdEntry, check_entries

SaKey = tuple[int, bytes, int]  # (spi, outer destination, protocol)
SaIdent = tuple[int, bytes, int, Direction]  # (spi, outer destination, protocol, direction)
AnySa = EspSa | AhSa

_U32 = struct.Struct("!I")
NON_ESP_MARKER = b"\x00\x00\x00\x00"  # RFC 3948 §2.2
ACQUIRE_INTERVAL = 1.0  # at most one ACQUIRE per policy per interval
MAX_NESTING = 3
POLICY_ID_BASE = 1 << 31  # policy layer ids in the merged SPD (policy_id is a uint32 on the wire)


class UdpKind(Enum):
    ESP = "esp"
    IKE = "ike"
    KEEPALIVE = "keepalive"
    INVALID = "invalid"


def classify_udp_encap(payload: bytes | memoryview) -> UdpKind:
    """Demultiplex a datagram received on UDP 4500 (RFC 3948 §2.2, §2.3)."""
    n = len(payload)
    if n == 1 and payload[0] == NAT_KEEPALIVE[0]:
        return UdpKind.KEEPALIVE
    if n >= 4 and payload[:4] == NON_ESP_MARKER:
        return UdpKind.IKE
    if n >= 8:
        return UdpKind.ESP
    return UdpKind.INVALID


class BatchFault(Enum):
    INVALID = "invalid"  # an item the core refuses (algorithm, key length, SPD entry)
    EXISTS = "exists"  # an install whose SA id is taken
    STALE = "stale"  # an SPD revision older than the enforced one


class BatchRejected(ConfigError):
    """A batch refused as a whole (nothing changed). ``item`` names the offending entry, e.g.
    ``install[2]`` or ``spd``; the message never contains key material."""

    def __init__(self, item: str, fault: BatchFault, detail: str) -> None:
        super().__init__(f"{item}: {detail}")
        self.item = item
        self.fault = fault


class Outbound(NamedTuple):
    """A datagram to put on the wire. When ``udp_offset`` is non-zero the packet is ESP-in-UDP
    and ``packet[udp_offset:]`` is the UDP payload (for a worker that sends through its UDP 4500
    socket); ``dport`` is then the peer's port."""

    packet: bytes
    udp_offset: int = 0
    dport: int = 0


@dataclass(frozen=True, slots=True)
class SaStatus:
    """What list/status APIs may show about an SA: never keys."""

    spi: int
    protocol: int
    direction: Direction
    mode: str
    src: bytes
    dst: bytes
    reqid: int
    encr: str
    integ: int
    esn: bool
    encap: bool
    replay_window: int
    packets: int
    bytes: int
    replay_drops: int
    auth_drops: int
    other_drops: int
    next_seq: int
    lease_end: int
    replay_top: int
    soft_expired: bool
    hard_expired: bool
    age: float


class Dataplane:
    """SAD + SPD + counters + events for one worker."""

    def __init__(self) -> None:
        self.spd = Spd()  # the enforced (merged) SPD; spd.revision is the keymgr layer's
        self.keymgr_entries: tuple[SpdEntry, ...] = ()  # in rank order
        self.policy_entries: tuple[SpdEntry, ...] = ()  # as policyd numbered them, in order
        self.policy_revision = 0
        self._policy_merged: tuple[SpdEntry, ...] = ()  # policy_entries with merged ids
        self.inbound_sas: dict[SaKey, AnySa] = {}
        self.outbound_sas: dict[int, dict[int, list[AnySa]]] = {}  # reqid -> proto -> SAs
        self.events: deque[Event] = deque(maxlen=10000)
        self.drops: Counter[DropReason] = Counter()
        self.rx_packets = self.rx_bytes = self.tx_packets = self.tx_bytes = 0
        self.bypass_packets = 0
        self.fallback_packets = 0  # sent clear by a PROTECT entry's clear_fallback (no SA)
        self.keepalives = 0  # NAT keepalives received
        self.keepalives_sent = 0  # NAT keepalives built by nat_keepalives()
        self._acquire_at: dict[int, float] = {}
        self._chains: dict[int, tuple[AnySa, ...]] = {}  # policy_id -> SA bundle

    # --- events -------------------------------------------------------------------------------

    def emit(self, event: Event) -> None:
        self.events.append(event)

    def next_event(self) -> Event | None:
        return self.events.popleft() if self.events else None

    # --- SAD management -----------------------------------------------------------------------

    def install_sa(self, cfg: SaConfig, now: float) -> AnySa:
        """Add an SA; raises ConfigError (no key material in the message) if invalid."""
        sa = self._new_sa(cfg, now)
        self._insert(sa)
        return sa

    def _new_sa(self, cfg: SaConfig, now: float) -> AnySa:
        """Build (and so validate) an SA without adding it; raises ConfigError."""
        if cfg.protocol == IpProto.ESP:
            return EspSa(cfg, now, self.emit)
        return AhSa(cfg, now, self.emit)

    def _insert(self, sa: AnySa) -> None:
        cfg = sa.cfg
        if cfg.direction == Direction.INBOUND:
            key = (cfg.spi, cfg.dst, cfg.protocol)
            if key in self.inbound_sas:
                raise ConfigError("an inbound SA with this SPI, destination and protocol exists")
            self.inbound_sas[key] = sa
        else:
            by_proto = self.outbound_sas.setdefault(cfg.reqid, {})
            lst = by_proto.setdefault(cfg.protocol, [])
            if any(s.spi == cfg.spi and s.cfg.dst == cfg.dst for s in lst):
                raise ConfigError("an outbound SA with this SPI and destination exists")
            lst.append(sa)  # newest last: make-before-break, the newest carries traffic
            self._chains.clear()
            for entry in self.spd.entries:  # the ACQUIRE limiter is keyed by policy_id
                if entry.reqid == cfg.reqid:
                    self._acquire_at.pop(entry.policy_id, None)

    def apply_batch(
        self,
        installs: Sequence[SaConfig],
        deletes: Sequence[SaIdent],
        spd: tuple[list[SpdEntry], int] | None,
        now: float,
    ) -> list[bool]:
        """Delete SAs, install SAs and replace the SPD as one change: all of it, or (on
        :class:`BatchRejected`) none of it. Deletes come first, so a batch may re-install an id
        it deletes; an install whose id exists otherwise, or that the batch installs twice, is
        refused (an outbound id is unique across reqids). Returns, per delete in order, whether
        the SA existed; deleting a missing SA is not an error."""
        # 1. everything that can fail, changing nothing
        gone: set[SaIdent] = set()
        existed: list[bool] = []
        for d in deletes:
            found = d not in gone and self.find_sa(*d) is not None
            if found:
                gone.add(d)
            existed.append(found)
        added: set[SaIdent] = set()
        built: list[AnySa] = []
        for i, cfg in enumerate(installs):
            ident = (cfg.spi, cfg.dst, cfg.protocol, cfg.direction)
            if ident in added or (ident not in gone and self.find_sa(*ident) is not None):
                raise BatchRejected(f"install[{i}]", BatchFault.EXISTS, "an SA with this id exists")
            added.add(ident)
            try:
                built.append(self._new_sa(cfg, now))
            except ConfigError as e:
                raise BatchRejected(f"install[{i}]", BatchFault.INVALID, str(e)) from None
        if spd is not None:
            entries, revision = spd
            if revision < self.spd.revision:
                raise BatchRejected(
                    "spd",
                    BatchFault.STALE,
                    f"SPD revision {revision} is older than the enforced {self.spd.revision}",
                )
            # 2. the changes. Spd.replace checks everything before it changes anything, so it
            # goes first; what follows cannot fail after the checks above.
            try:
                self.replace_spd(entries, revision)
            except ValueError as e:
                raise BatchRejected("spd", BatchFault.INVALID, str(e)) from None
        for d in gone:
            self.delete_sa(*d)
        for sa in built:
            self._insert(sa)
        return existed

    def find_sa(self, spi: int, dst: bytes, protocol: int, direction: Direction) -> AnySa | None:
        if direction == Direction.INBOUND:
            return self.inbound_sas.get((spi, dst, protocol))
        for by_proto in self.outbound_sas.values():
            for s in by_proto.get(protocol, ()):
                if s.spi == spi and s.cfg.dst == dst:
                    return s
        return None

    def update_sa(
        self,
        spi: int,
        dst: bytes,
        protocol: int,
        direction: Direction,
        *,
        lease_end: int | None = None,
        lifetime: Lifetime | None = None,
    ) -> AnySa | None:
        sa = self.find_sa(spi, dst, protocol, direction)
        if sa is None:
            return None
        new_cfg = None
        if lifetime is not None:  # validate everything before changing anything
            new_cfg = replace(sa.cfg, lifetime=lifetime)
            new_cfg.validate()
        if lease_end is not None:
            sa.extend_lease(lease_end)
        if new_cfg is not None:
            sa.set_config(new_cfg)
        return sa

    def delete_sa(self, spi: int, dst: bytes, protocol: int, direction: Direction) -> bool:
        if direction == Direction.INBOUND:
            return self.inbound_sas.pop((spi, dst, protocol), None) is not None
        for by_proto in self.outbound_sas.values():
            lst = by_proto.get(protocol, [])
            for i, s in enumerate(lst):
                if s.spi == spi and s.cfg.dst == dst:
                    del lst[i]
                    self._chains.clear()
                    return True
        return False

    def all_sas(self) -> list[AnySa]:
        out: list[AnySa] = list(self.inbound_sas.values())
        for by_proto in self.outbound_sas.values():
            for lst in by_proto.values():
                out.extend(lst)
        return out

    def replace_spd(self, entries: Sequence[SpdEntry], revision: int) -> None:
        """Replace the keymgr layer (ValueError, nothing changed, for an older revision or an
        entry the SPD cannot hold)."""
        if revision < self.spd.revision:
            raise ValueError(f"SPD revision {revision} is older than {self.spd.revision}")
        check_entries(entries)
        keymgr = tuple(sorted(entries, key=lambda e: e.priority))
        self._install(keymgr, self.policy_entries, self._policy_merged, revision)

    def replace_policy(self, entries: Sequence[SpdEntry], revision: int) -> None:
        """Replace the policy layer with policyd's compiled entries of ``revision``
        (ValueError, nothing changed, for an older revision or an entry the SPD cannot hold:
        duplicate or out-of-range policy_id, bad bundle, bad prefix)."""
        if revision < self.policy_revision:
            raise ValueError(
                f"policy revision {revision} is older than the enforced {self.policy_revision}"
            )
        check_entries(entries)
        for e in entries:
            if not 0 <= e.policy_id < POLICY_ID_BASE:
                raise ValueError(f"policy_id {e.policy_id} out of range 0..{POLICY_ID_BASE - 1}")
        policy = tuple(sorted(entries, key=lambda e: e.priority))
        merged = tuple(
            SpdEntry(
                POLICY_ID_BASE + e.policy_id,
                e.priority,
                e.action,
                e.selector,
                e.reqid,
                e.protocols,
                e.accept_clear,
                e.clear_fallback,
            )
            for e in policy
        )
        self._install(self.keymgr_entries, policy, merged, self.spd.revision)
        self.policy_revision = revision

    def _install(
        self,
        keymgr: tuple[SpdEntry, ...],
        policy: tuple[SpdEntry, ...],
        policy_merged: tuple[SpdEntry, ...],
        revision: int,
    ) -> None:
        """Rank the layers (keymgr first) into the enforced SPD; the flow cache, SA bundle
        cache and ACQUIRE limiter start afresh. Both layers are checked already; their ids
        collide only if keymgr uses ids from POLICY_ID_BASE up (refused then)."""
        if policy_merged and any(e.policy_id >= POLICY_ID_BASE for e in keymgr):
            taken = {e.policy_id for e in policy_merged}
            for e in keymgr:
                if e.policy_id in taken:
                    raise ValueError(
                        f"policy_id {e.policy_id} is the policy layer's; keymgr's SPD entries "
                        f"need ids below {POLICY_ID_BASE} while a policy is enforced"
                    )
        self.spd.replace(keymgr + policy_merged, revision, in_order=True, checked=True)
        self.keymgr_entries = keymgr
        self.policy_entries = policy
        self._policy_merged = policy_merged
        self._chains.clear()
        self._acquire_at.clear()

    def tick(self, now: float) -> None:
        """Time-based lifetimes; call about once a second."""
        for sa in self.all_sas():
            sa.tick(now)

    def nat_keepalives(self, now: float) -> list[Outbound]:
        """NAT keepalives due on outbound ESP-in-UDP SAs (RFC 3948 §4); call with tick()."""
        out: list[Outbound] = []
        for by_proto in self.outbound_sas.values():
            for sa in by_proto.get(IpProto.ESP, ()):
                pkt = sa.keepalive(now) if isinstance(sa, EspSa) else None
                if pkt is not None:
                    enc = sa.cfg.encap
                    assert enc is not None
                    out.append(Outbound(pkt, len(pkt) - 1, enc.dport))
                    self.keepalives_sent += 1
        return out

    def status(self, sa: AnySa, now: float) -> SaStatus:
        c = sa.cfg
        return SaStatus(
            spi=c.spi,
            protocol=c.protocol,
            direction=c.direction,
            mode=c.mode.name.lower(),
            src=c.src,
            dst=c.dst,
            reqid=c.reqid,
            encr=sa.alg.name if isinstance(sa, EspSa) else "",
            integ=c.integ_id,
            esn=c.esn,
            encap=c.encap is not None,
            replay_window=c.replay_window,
            packets=sa.packets,
            bytes=sa.bytes,
            replay_drops=sa.replay_drops,
            auth_drops=sa.auth_drops,
            other_drops=sa.other_drops,
            next_seq=sa.next_seq,
            lease_end=sa.lease_end,
            replay_top=sa.replay.top,
            soft_expired=sa.soft_fired,
            hard_expired=sa.dead,
            age=now - sa.created,
        )

    # --- outbound: clear traffic from the TUN device ------------------------------------------

    def outbound(self, pkt: bytes, now: float) -> Outbound | None:
        """Apply the SPD to one clear datagram; return what to send, or None (counted drop)."""
        try:
            key = flow_key(pkt)
        except MalformedPacket:
            self.drops[DropReason.MALFORMED] += 1
            return None
        entry = self.spd.lookup(key)
        if entry is None:
            self.drops[DropReason.NO_POLICY] += 1
            return None
        action = entry.action
        if action is not Action.PROTECT:
            if action is Action.BYPASS:
                self.bypass_packets += 1
                return Outbound(pkt)
            self.drops[DropReason.POLICY_DISCARD] += 1
            return None
        chain = self._chains.get(entry.policy_id)
        if chain is None:
            chain = self._resolve_chain(entry)
        if not chain:
            self._acquire(entry, key, now)
            if entry.clear_fallback:  # "request security": clear until an SA exists
                self.fallback_packets += 1
                return Outbound(pkt)
            self.drops[DropReason.NO_OUTBOUND_SA] += 1
            return None
        try:
            out = pkt
            for sa in chain:
                out = sa.protect(out, now)
        except Drop as d:
            self.drops[d.reason] += 1
            return None
        self.tx_packets += 1
        self.tx_bytes += len(out)
        enc = chain[0].cfg.encap if len(chain) == 1 else None
        if enc is not None:
            hl = (out[0] & 0x0F) * 4 if out[0] >> 4 == 4 else _v6_l4(out)
            return Outbound(out, hl + 8, enc.dport)
        return Outbound(out)

    def _resolve_chain(self, entry: SpdEntry) -> tuple[AnySa, ...]:
        """The SAs (newest per protocol) that carry a PROTECT entry's traffic, cached until the
        SAD or SPD changes; empty when one is missing (ACQUIRE)."""
        by_proto = self.outbound_sas.get(entry.reqid) or {}
        chain: list[AnySa] = []
        for proto in entry.protocols:
            lst = by_proto.get(proto)
            if not lst:
                chain = []
                break
            chain.append(lst[-1])
        result = tuple(chain)
        self._chains[entry.policy_id] = result
        return result

    def _acquire(
        self, entry: SpdEntry, key: tuple[int, bytes, bytes, int, int, int], now: float
    ) -> None:
        last = self._acquire_at.get(entry.policy_id)
        if last is not None and now - last < ACQUIRE_INTERVAL:
            return
        self._acquire_at[entry.policy_id] = now
        _, src, dst, proto, sport, dport = key
        self.emit(Acquire(entry.policy_id, entry.reqid, src, dst, proto, sport, dport))

    # --- inbound: ESP / AH from the wire ------------------------------------------------------

    def inbound(self, pkt: bytes, now: float) -> bytes | None:
        """Process one received ESP or AH datagram (full IP packet); return the clear datagram
        to deliver, or None (the drop is counted)."""
        self.rx_packets += 1
        n = len(pkt)
        self.rx_bytes += n
        # fast path: IPv4 without options, ESP or ESP-in-UDP, to a tunnel-mode SA
        if n >= 28 and pkt[0] == 0x45 and not (pkt[6] & 0x3F or pkt[7]):
            proto = pkt[9]
            off = 20 if proto == IpProto.ESP else 28 if proto == IpProto.UDP else 0
            total = (pkt[2] << 8) | pkt[3]
            if off and off + 8 <= total <= n:
                sa = self.inbound_sas.get((_U32.unpack_from(pkt, off)[0], pkt[16:20], IpProto.ESP))
                if sa is not None and sa.tunnel:
                    try:
                        return sa.unprotect_tunnel(pkt[off:total], now)  # type: ignore[union-attr]
                    except Drop as d:
                        self.drops[d.reason] += 1
                        return None
        try:
            for depth in range(MAX_NESTING):
                info = parse_ip(pkt)
                off = info.l4_offset
                proto = info.proto
                if proto == IpProto.UDP and depth == 0:
                    # ESP-in-UDP: skip the UDP header (the worker checked the port). Only the
                    # received datagram: UDP inside a transport-mode SA is clear traffic.
                    off += 8
                    proto = IpProto.ESP
                elif proto not in (IpProto.ESP, IpProto.AH):
                    return pkt
                if off + 8 > info.length:
                    raise Drop(DropReason.MALFORMED)
                spi_at = off if proto == IpProto.ESP else off + 4
                spi = int.from_bytes(pkt[spi_at : spi_at + 4], "big")
                sa = self.inbound_sas.get((spi, info.dst, proto))
                if sa is None:
                    raise Drop(DropReason.NO_SA)
                pkt = sa.unprotect(pkt, info, off, now)
                if sa.tunnel:
                    return pkt
            raise Drop(DropReason.UNSUPPORTED)
        except MalformedPacket:
            self.drops[DropReason.MALFORMED] += 1
        except Drop as d:
            self.drops[d.reason] += 1
        return None

    def inbound_udp(
        self, src: bytes, dst: bytes, sport: int, dport: int, payload: bytes, now: float
    ) -> tuple[UdpKind, bytes | None]:
        """A datagram from the UDP 4500 socket. Returns (ESP, clear datagram or None),
        (IKE, IKE message without the non-ESP marker), (KEEPALIVE, None) or (INVALID, None)."""
        kind = classify_udp_encap(payload)
        if kind is UdpKind.KEEPALIVE:
            self.keepalives += 1
            return kind, None
        if kind is UdpKind.IKE:
            return kind, payload[4:]
        if kind is UdpKind.INVALID:
            self.drops[DropReason.MALFORMED] += 1
            return kind, None
        n = 8 + len(payload)
        try:
            if n > 0xFFFF:
                raise MalformedPacket("UDP datagram too long")
            udp = (
                sport.to_bytes(2, "big")
                + dport.to_bytes(2, "big")
                + n.to_bytes(2, "big")
                + b"\x00\x00"
            )
            if len(src) == 4:
                hdr = build_ipv4(src, dst, IpProto.UDP, n)
            else:
                hdr = build_ipv6(src, dst, IpProto.UDP, n)
        except MalformedPacket:
            self.drops[DropReason.MALFORMED] += 1
            return UdpKind.INVALID, None
        return kind, self.inbound(hdr + udp + payload, now)


def _v6_l4(pkt: bytes) -> int:
    return parse_ip(pkt).l4_offset
