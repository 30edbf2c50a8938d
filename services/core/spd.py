"""Security Policy Database: RFC 4301 §4.4.1 (ordered entries, BYPASS / DISCARD / PROTECT;
first match in order), §4.4.1.1 (selectors) and §4.4.1.2 (decision caching is permitted).

The first matching entry is found through an index instead of a scan over the entries, so the
cost of a decision does not grow with the number of entries; decisions are also kept in a
bounded per-flow cache.

Index. Entries are ranked by (priority, position). Per IP version, they are grouped by their
pair of (destination, source) prefix lengths, one dict per pair keyed by both masked addresses.
A leaf holds the entries sharing both prefixes in rank order; a large leaf is split by
(protocol, single destination port), by protocol alone and "any protocol", so that
port-specific rules between the same two prefixes are not scanned one by one. A lookup probes
the groups lowest rank first and keeps the lowest rank that matches; groups whose lowest rank
cannot beat the best match so far are skipped. The number of probes depends on how many
distinct prefix-length pairs the policy uses (at most 33 x 33 for IPv4), not on how many
entries it has.

Filter. At 100k entries the probe count stays the same but each probe into a large table
waits for memory, and most probes find nothing. Groups with at least FILTER_MIN keys are
therefore put behind a filter: a key's addresses are cut to the shortest destination and
source prefix lengths among those groups, and that cut pair, hashed into a bytes table of
FILTER_SLOTS slots per key, names the list of groups the key can match (the small groups
plus the large ones holding an entry whose prefixes, cut the same way, equal the key's).
One read from a table a few bytes per entry replaces the misses in the large tables; a
shared slot only costs a wasted probe, never a wrong answer. Small groups are not filtered:
their tables sit in the CPU caches, and their short prefixes would cut the pair to nothing.

Entries whose two prefixes are of different versions can never match a flow key (both
addresses of a key have the same version) and are left out; a key whose address lengths do
not fit its version is answered by a plain scan.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

from services.core.selectors import FlowKey, Selector


class Action(IntEnum):
    BYPASS = 1  # Windows "permit"
    DISCARD = 2  # Windows "block"
    PROTECT = 3  # Windows "negotiate security"


@dataclass(frozen=True, slots=True)
class SpdEntry:
    """One outbound policy entry. ``reqid`` names the SA bundle that protects it."""

    policy_id: int
    priority: int  # lower first
    action: Action
    selector: Selector
    reqid: int = 0
    protocols: tuple[int, ...] = (50,)  # SA bundle applied in order: (50,), (51,) or (50, 51)
    # PROTECT only (policyd's "request security"; both False = "require"):
    accept_clear: bool = False  # inbound clear packets matching the entry are accepted
    clear_fallback: bool = False  # outbound with no SA: ACQUIRE, then send the packet clear


NO_MATCH: SpdEntry | None = None
FLOW_CACHE_MAX = 65536  # decisions kept at most (two generations of half this size)
LEAF_SCAN = 8  # a leaf with more entries than this is split by protocol and port
FILTER_MIN = 64  # a group with at least this many keys is only probed when the filter says so
FILTER_SLOTS = 8  # filter slots per key of the filtered groups

_NEVER = 1 << 62  # a rank no entry has

# (rank, proto (0 = any), sport_lo, sport_hi, dport_lo, dport_hi, entry)
_Row = tuple[int, int, int, int, int, int, SpdEntry]


def _first(rows: list[_Row], best: int, proto: int, sport: int, dport: int) -> int:
    """Index in ``rows`` (rank order) of the first row below rank ``best`` that matches, or -1."""
    for i, (rank, p, slo, shi, dlo, dhi, _) in enumerate(rows):
        if rank >= best:
            return -1
        if (not p or p == proto) and slo <= sport <= shi and dlo <= dport <= dhi:
            return i
    return -1


class _Leaf:
    """The entries sharing one destination and one source prefix, in rank order."""

    __slots__ = ("by_port", "by_proto", "min_rank", "rows", "wild")

    def __init__(self, rows: list[_Row]) -> None:
        self.min_rank = rows[0][0]
        self.rows = rows
        self.by_port: dict[tuple[int, int], list[_Row]] | None = None
        self.by_proto: dict[int, list[_Row]] = {}
        self.wild: list[_Row] = []
        if len(rows) > LEAF_SCAN:
            by_port: dict[tuple[int, int], list[_Row]] = {}
            for row in rows:
                _, p, _, _, dlo, dhi, _ = row
                if not p:
                    self.wild.append(row)
                elif dlo == dhi:
                    by_port.setdefault((p, dlo), []).append(row)
                else:
                    self.by_proto.setdefault(p, []).append(row)
            self.by_port = by_port

    def first(self, best: int, proto: int, sport: int, dport: int) -> _Row | None:
        """The lowest-ranked matching row with a rank below ``best``."""
        by_port = self.by_port
        if by_port is None:
            i = _first(self.rows, best, proto, sport, dport)
            return self.rows[i] if i >= 0 else None
        found: _Row | None = None
        for rows in (by_port.get((proto, dport)), self.by_proto.get(proto), self.wild):
            if rows:
                i = _first(rows, best, proto, sport, dport)
                if i >= 0:
                    found = rows[i]
                    best = found[0]
        return found


_Hit = _Row | _Leaf  # one row, or a leaf of several rows sharing both prefixes
# (lowest rank, dst shift, src shift, src length, {(dst >> dshift) << slen | src >> sshift: hit})
_Group = tuple[int, int, int, int, dict[int, _Hit]]


def _build(entries: tuple[SpdEntry, ...], version: int) -> list[_Group]:
    """The groups of one IP version, lowest rank first."""
    bits = 32 if version == 4 else 128
    tables: dict[tuple[int, int], dict[int, _Row | list[_Row]]] = {}
    low: dict[tuple[int, int], int] = {}
    for rank, e in enumerate(entries):
        sel = e.selector
        src, dst = sel.src, sel.dst
        if src.version != version or dst.version != version:
            continue
        dshift, sshift = bits - dst.length, bits - src.length
        shape = (dshift, sshift)
        table = tables.get(shape)
        if table is None:
            table = tables[shape] = {}
            low[shape] = rank
        k = ((dst.value >> dshift) << src.length) | (src.value >> sshift)
        row = (rank, sel.proto, sel.sport_lo, sel.sport_hi, sel.dport_lo, sel.dport_hi, e)
        prev = table.get(k)
        if prev is None:
            table[k] = row
        elif isinstance(prev, list):
            prev.append(row)
        else:
            table[k] = [prev, row]
    groups: list[_Group] = []
    for (dshift, sshift), table in tables.items():
        hits: dict[int, _Hit] = {
            k: _Leaf(v) if isinstance(v, list) else v for k, v in table.items()
        }
        groups.append((low[(dshift, sshift)], dshift, sshift, bits - sshift, hits))
    groups.sort(key=lambda g: g[0])
    return groups


def _prime_at_least(n: int) -> int:
    """The smallest prime >= ``n`` (trial division; ``n`` is at most a few million)."""
    n = max(n, 2)
    while True:
        if n == 2 or (n % 2 and all(n % f for f in range(3, int(n**0.5) + 1, 2))):
            return n
        n += 1


# (dst shift, src length, src shift, modulus, slot -> variant, variants): the groups a key can
# match are variants[slots[(((dst >> dshift) << slen) | (src >> sshift)) % modulus]]
_Filter = tuple[int, int, int, int, "bytes | array[int]", list[list[_Group]]]


def _filter(groups: list[_Group], bits: int) -> _Filter | None:
    """A filter that tells, from a key's addresses cut to the shortest prefix lengths of the
    large groups, which large groups may hold an entry for it; None when no group is large.

    An entry can only match a key whose addresses, cut to those lengths, equal its own prefixes
    cut the same way, so the slot of that cut pair has the entry's group among its groups: the
    filter skips probes that cannot hit, never one that can. Two cut pairs may share a slot
    (a wasted probe, not a wrong answer)."""
    large = [g for g in groups if len(g[4]) >= FILTER_MIN]
    if not large:
        return None
    dlen = min(bits - g[1] for g in large)
    slen = min(g[3] for g in large)
    modulus = _prime_at_least(FILTER_SLOTS * sum(len(g[4]) for g in large))
    masks: dict[int, int] = {}  # slot -> bit set of the large groups with a key there
    for bit, (_, dshift, _, glen, table) in enumerate(large):
        dcut, scut, smask = bits - dshift - dlen, glen - slen, (1 << glen) - 1
        for k in table:
            slot = (((k >> glen) >> dcut) << slen | (k & smask) >> scut) % modulus
            masks[slot] = masks.get(slot, 0) | 1 << bit
    variant_of: dict[int, int] = {0: 0}
    for mask in masks.values():
        variant_of.setdefault(mask, len(variant_of))
    if len(variant_of) > 0xFFFF:
        return None  # too many combinations of large groups to name in a slot
    slots: bytes | array[int]
    if len(variant_of) <= 0x100:
        buf = bytearray(modulus)
        for slot, mask in masks.items():
            buf[slot] = variant_of[mask]
        slots = bytes(buf)
    else:
        slots = array("H", bytes(2 * modulus))
        for slot, mask in masks.items():
            slots[slot] = variant_of[mask]
    ids = {id(g): bit for bit, g in enumerate(large)}
    variants = [
        [g for g in groups if id(g) not in ids or mask >> ids[id(g)] & 1] for mask in variant_of
    ]
    return bits - dlen, slen, bits - slen, modulus, slots, variants


class _Index:
    """First match by (priority, position) without a scan over the entries."""

    __slots__ = ("entries", "f4", "f6", "v4", "v6")

    def __init__(self, entries: tuple[SpdEntry, ...]) -> None:
        self.entries = entries
        self.v4 = _build(entries, 4)
        self.v6 = _build(entries, 6)
        self.f4 = _filter(self.v4, 32)
        self.f6 = _filter(self.v6, 128)

    def first_match(self, key: FlowKey) -> SpdEntry | None:
        version, src, dst, proto, sport, dport = key
        if version == 4:
            groups, size, f = self.v4, 4, self.f4
        elif version == 6:
            groups, size, f = self.v6, 16, self.f6
        else:
            return None  # no prefix has another version
        if len(src) != size or len(dst) != size:
            return self.scan(key)
        d = int.from_bytes(dst, "big")
        s = int.from_bytes(src, "big")
        if f is not None:
            fd, fl, fs, modulus, slots, variants = f
            groups = variants[slots[(((d >> fd) << fl) | (s >> fs)) % modulus]]
        best = _NEVER
        found: SpdEntry | None = None
        for low, dshift, sshift, slen, table in groups:
            if low >= best:
                break
            hit = table.get(((d >> dshift) << slen) | (s >> sshift))
            if hit is None:
                continue
            if isinstance(hit, tuple):
                rank, p, slo, shi, dlo, dhi, e = hit
                if (
                    rank < best
                    and (not p or p == proto)
                    and slo <= sport <= shi
                    and dlo <= dport <= dhi
                ):
                    best = rank
                    found = e
            else:
                row = hit.first(best, proto, sport, dport)
                if row is not None:
                    best = row[0]
                    found = row[6]
        return found

    def scan(self, key: FlowKey) -> SpdEntry | None:
        """The linear first-match scan (the definition the index implements)."""
        for e in self.entries:
            if e.selector.matches(key):
                return e
        return None


def check_entries(entries: Sequence[SpdEntry]) -> None:
    """ValueError naming the first entry the SPD cannot hold (duplicate policy_id, PROTECT
    without an ESP/AH bundle, prefix length out of range)."""
    ids = {e.policy_id for e in entries}
    if len(ids) != len(entries):
        raise ValueError("duplicate policy_id in SPD")
    for e in entries:
        if e.action == Action.PROTECT and (not e.protocols or not set(e.protocols) <= {50, 51}):
            raise ValueError("PROTECT entries need protocols from {50, 51}")
        sel = e.selector
        if not 0 <= sel.proto <= 255:
            raise ValueError(f"policy {e.policy_id}: protocol must be 0..255")
        if not (0 <= sel.sport_lo <= sel.sport_hi <= 0xFFFF) or not (
            0 <= sel.dport_lo <= sel.dport_hi <= 0xFFFF
        ):
            raise ValueError(f"policy {e.policy_id}: port ranges must be 0 <= lo <= hi <= 65535")
        for p in (e.selector.src, e.selector.dst):
            if not 0 <= p.length <= (32 if p.version == 4 else 128):
                raise ValueError(f"policy {e.policy_id}: prefix length out of range")


class Spd:
    """Ordered SPD with an index for first-match lookups and a bounded flow cache; both are
    rebuilt on every replace."""

    def __init__(self) -> None:
        self.revision = 0
        self.entries: tuple[SpdEntry, ...] = ()
        self._index = _Index(())
        # two generations: new decisions go to _cache; when it holds FLOW_CACHE_MAX // 2 it
        # becomes _old and a fresh _cache starts. A hit in _old moves the flow back, so active
        # flows stay and at most FLOW_CACHE_MAX decisions are kept.
        self._cache: dict[FlowKey, SpdEntry | None] = {}
        self._old: dict[FlowKey, SpdEntry | None] = {}
        self.cache_hits = 0
        self.cache_misses = 0

    def replace(
        self,
        entries: Sequence[SpdEntry],
        revision: int,
        *,
        in_order: bool = False,
        checked: bool = False,
    ) -> None:
        """Install a whole new SPD; revisions must not go backwards. Everything is checked and
        the index built before anything changes. Entries are ranked by priority (stable), or,
        with ``in_order``, exactly in the order given; ``checked`` skips
        :func:`check_entries` for entries the caller has checked."""
        if revision < self.revision:
            raise ValueError(f"SPD revision {revision} is older than {self.revision}")
        if not checked:
            check_entries(entries)
        ordered = tuple(entries) if in_order else tuple(sorted(entries, key=lambda e: e.priority))
        index = _Index(ordered)
        self.entries = ordered
        self._index = index
        self.revision = revision
        self._cache = {}
        self._old = {}

    def lookup(self, key: FlowKey) -> SpdEntry | None:
        """The first entry (by priority, then position) whose selector matches ``key``."""
        cache = self._cache
        try:
            hit = cache[key]
        except KeyError:
            pass
        else:
            self.cache_hits += 1
            return hit
        old = self._old
        if key in old:
            self.cache_hits += 1
            found = old.pop(key)
        else:
            self.cache_misses += 1
            found = self._index.first_match(key)
        if len(cache) >= FLOW_CACHE_MAX // 2:
            self._old = cache
            cache = self._cache = {}
        cache[key] = found
        return found

    def cached_flows(self) -> int:
        """How many flow decisions the cache holds (at most FLOW_CACHE_MAX)."""
        return len(self._cache) + len(self._old)
