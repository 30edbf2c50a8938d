"""IKEv2 Child SA negotiation shared by every exchange: RFC 7296 §2.7 / §1.3.1 / §3.3.6 (the ESP
or AH proposal we accept and send, through :mod:`services.core.ike.suites`), §2.9 (traffic-selector
narrowing, TS_IPV4_ADDR_RANGE and TS_IPV6_ADDR_RANGE), §1.3.1 / §2.9 (the configured Child SAs
of an IKE SA that a new Child SA is created for or matched against: :class:`ChildPolicy`)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from services.core.ike.message import Proposal, TrafficSelector
from services.core.ike.suites import DEFAULT_ESP, EspSuite, choose_esp
from services.core.sa import Mode

ENCR_ID = DEFAULT_ESP.encr  # the default ESP suite's (kept for callers of the fixed-suite era)
ENCR_KEY_BITS = DEFAULT_ESP.key_bits


def range_selector(first: str, last: str) -> TrafficSelector:
    """TS_IPV4_ADDR_RANGE / TS_IPV6_ADDR_RANGE over an inclusive address range, all protocols
    and ports (ValueError for bad or mixed-family addresses)."""
    lo, hi = ipaddress.ip_address(first).packed, ipaddress.ip_address(last).packed
    if len(lo) != len(hi) or lo > hi:
        raise ValueError("traffic selector range: addresses of one family, first <= last")
    return TrafficSelector(0, 0, 65535, lo, hi)


def hull(sels: tuple[TrafficSelector, ...]) -> tuple[bytes, bytes] | None:
    """The address range spanning the selectors of the first one's family (IPv4 or IPv6),
    None for no selectors."""
    if not sels:
        return None
    n = len(sels[0].start_address)
    same = [s for s in sels if len(s.start_address) == n]
    return min(s.start_address for s in same), max(s.end_address for s in same)


@dataclass(frozen=True)
class ChildPolicy:
    """One configured Child SA of an IKE SA (RFC 7296 §1.3.1, §2.9).

    ``name`` identifies it to the I/O shell (events carry it). ``our_ts`` / ``peer_ts``: the
    selectors we send as TSi / TSr when we create it, and the ranges a peer's TSr / TSi are
    narrowed to when the peer creates it. ``esp_suites``: what we offer and accept, in our
    order of preference (a suite naming a DH group means PFS in CREATE_CHILD_SA). ``mode``:
    TUNNEL, or TRANSPORT (asked for with USE_TRANSPORT_MODE; a peer that does not ask is
    refused, as in IKE_AUTH)."""

    name: str
    our_ts: tuple[TrafficSelector, ...]
    peer_ts: tuple[TrafficSelector, ...]
    esp_suites: tuple[EspSuite, ...] = (DEFAULT_ESP,)
    mode: Mode = Mode.TUNNEL

    @classmethod
    def of_ranges(
        cls,
        name: str,
        ts_local: tuple[str, str],
        ts_remote: tuple[str, str],
        esp_suites: tuple[EspSuite, ...] = (DEFAULT_ESP,),
        mode: Mode = Mode.TUNNEL,
    ) -> ChildPolicy:
        """From inclusive (first, last) address ranges in text form."""
        return cls(
            name,
            (range_selector(*ts_local),),
            (range_selector(*ts_remote),),
            esp_suites,
            mode,
        )


def esp_proposal(spi: bytes, suite: EspSuite = DEFAULT_ESP) -> Proposal:
    """One ESP (or AH) suite as proposal 1 (without its PFS group)."""
    return Proposal(1, suite.protocol, suite.transforms(dh=0), spi)


def choose_esp_proposal(
    proposals: tuple[Proposal, ...],
    our_spi: bytes,
    ke_group: int | None = None,
    suites: tuple[EspSuite, ...] = (DEFAULT_ESP,),
) -> tuple[Proposal, Proposal] | None:
    """(the offered proposal, our answer) for ``suites`` (see
    :func:`services.core.ike.suites.choose_esp`), or None."""
    c = choose_esp(proposals, suites, our_spi, ke_group)
    return None if c is None else (c.offered, c.answer)


def narrow(
    offered: tuple[object, ...], allowed: tuple[bytes, bytes] | None
) -> tuple[TrafficSelector, ...]:
    """Offered selectors intersected with the ``allowed`` address range (RFC 7296 §2.9).

    ``allowed`` is an inclusive (first, last) range of packed IPv4 or IPv6 addresses; selectors
    of the other family and other selector types are dropped. Protocol and ports are kept as
    offered; empty intersections vanish. ``allowed`` None allows nothing.
    """
    if allowed is None:
        return ()
    lo, hi = allowed
    out: list[TrafficSelector] = []
    for s in offered:
        if not isinstance(s, TrafficSelector) or len(s.start_address) != len(lo):
            continue
        if len(s.end_address) != len(lo):
            continue
        start, end = max(s.start_address, lo), min(s.end_address, hi)
        if start > end or s.start_port > s.end_port:
            continue
        ts = TrafficSelector(s.ip_protocol, s.start_port, s.end_port, start, end)
        if ts not in out:
            out.append(ts)
    return tuple(out)
