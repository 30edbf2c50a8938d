"""Security Policy Database: RFC 4301 §4.4.1 (ordered entries, BYPASS / DISCARD / PROTECT) with
a per-flow decision cache (§4.4.1.2 notes caching is permitted) so that the per-packet cost
does not grow with the number of rules."""

from __future__ import annotations

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
FLOW_CACHE_MAX = 65536


class Spd:
    """Ordered SPD with an exact-match flow cache invalidated on every replace."""

    def __init__(self) -> None:
        self.revision = 0
        self.entries: tuple[SpdEntry, ...] = ()
        self._cache: dict[FlowKey, SpdEntry | None] = {}
        self.cache_hits = 0
        self.cache_misses = 0

    def replace(self, entries: list[SpdEntry], revision: int) -> None:
        """Install a whole new SPD; revisions must not go backwards."""
        if revision < self.revision:
            raise ValueError(f"SPD revision {revision} is older than {self.revision}")
        ids = [e.policy_id for e in entries]
        if len(set(ids)) != len(ids):
            raise ValueError("duplicate policy_id in SPD")
        for e in entries:
            if e.action == Action.PROTECT and (not e.protocols or not set(e.protocols) <= {50, 51}):
                raise ValueError("PROTECT entries need protocols from {50, 51}")
        self.entries = tuple(sorted(entries, key=lambda e: e.priority))
        self.revision = revision
        self._cache = {}

    def lookup(self, key: FlowKey) -> SpdEntry | None:
        cache = self._cache
        try:
            hit = cache[key]
        except KeyError:
            pass
        else:
            self.cache_hits += 1
            return hit
        self.cache_misses += 1
        found = NO_MATCH
        for e in self.entries:
            if e.selector.matches(key):
                found = e
                break
        if len(cache) >= FLOW_CACHE_MAX:
            cache.clear()
        cache[key] = found
        return found
