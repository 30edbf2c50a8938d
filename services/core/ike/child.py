"""IKEv2 Child SA negotiation shared by every exchange: RFC 7296 §2.7 / §1.3.1 / §3.3.6 (the ESP
or AH proposal we accept and send, through :mod:`services.core.ike.suites`), §2.9 (traffic-selector
narrowing, TS_IPV4_ADDR_RANGE and TS_IPV6_ADDR_RANGE)."""

from __future__ import annotations

from services.core.ike.message import Proposal, TrafficSelector
from services.core.ike.suites import DEFAULT_ESP, EspSuite, choose_esp

ENCR_ID = DEFAULT_ESP.encr  # the default ESP suite's (kept for callers of the fixed-suite era)
ENCR_KEY_BITS = DEFAULT_ESP.key_bits


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
