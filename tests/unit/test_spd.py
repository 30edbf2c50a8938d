"""SPD and selectors: RFC 4301 §4.4.1 (ordered entries; BYPASS / DISCARD / PROTECT), §4.4.1.1
(selectors: addresses, next-layer protocol, port ranges, ICMP type/code in the port fields),
§5.1.1 (ACQUIRE when a PROTECT entry has no SA), §5.2 (inbound tunnel selectors).

The flow cache must return exactly what a linear first-match scan over the entries in priority
order returns; that is checked against an independent matcher built on ``ipaddress``.
"""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.core.engine import Dataplane
from services.core.events import Acquire, DropReason
from services.core.iana import Encr, IpProto
from services.core.packet import build_ipv4, build_ipv6, flow_key
from services.core.sa import Direction, Mode, SaConfig
from services.core.selectors import FlowKey, Prefix, Selector
from services.core.spd import Action, Spd, SpdEntry

ANY4 = ("0.0.0.0/0", "0.0.0.0/0")


def _a(s: str) -> bytes:
    return ipaddress.ip_address(s).packed


def _l4(proto: int, sport: int, dport: int, payload: bytes = b"data") -> bytes:
    if proto in (IpProto.TCP,):
        return (
            sport.to_bytes(2, "big")
            + dport.to_bytes(2, "big")
            + bytes(8)
            + b"\x50\x02"
            + bytes(6)
            + payload
        )
    if proto == IpProto.UDP:
        return (
            sport.to_bytes(2, "big")
            + dport.to_bytes(2, "big")
            + (8 + len(payload)).to_bytes(2, "big")
            + b"\x00\x00"
            + payload
        )
    if proto in (IpProto.ICMP, IpProto.ICMPV6):
        return bytes([sport, dport]) + b"\x00\x00" + b"\x00\x01\x00\x01" + payload
    return payload


def pkt4(
    src: str, dst: str, proto: int = IpProto.UDP, sport: int = 1000, dport: int = 2000
) -> bytes:
    body = _l4(proto, sport, dport)
    return build_ipv4(_a(src), _a(dst), proto, len(body)) + body


def pkt6(
    src: str, dst: str, proto: int = IpProto.UDP, sport: int = 1000, dport: int = 2000
) -> bytes:
    body = _l4(proto, sport, dport)
    return build_ipv6(_a(src), _a(dst), proto, len(body)) + body


def _esp_out(reqid: int, spi: int = 0x3000, v6: bool = False) -> SaConfig:
    s, d = ("2001:db8::1", "2001:db8::2") if v6 else ("192.0.2.1", "192.0.2.2")
    return SaConfig(
        spi=spi,
        protocol=IpProto.ESP,
        direction=Direction.OUTBOUND,
        mode=Mode.TUNNEL,
        src=_a(s),
        dst=_a(d),
        encr_id=Encr.AES_GCM_16,
        encr_key=bytes(20),
        reqid=reqid,
    )


# --- ordering and actions -----------------------------------------------------------------


def test_lower_priority_value_wins_regardless_of_list_order() -> None:
    broad = SpdEntry(1, 100, Action.BYPASS, Selector.make(*ANY4))
    narrow = SpdEntry(2, 10, Action.DISCARD, Selector.make("10.0.0.0/8", "10.0.0.0/8"))
    for order in ([broad, narrow], [narrow, broad]):
        spd = Spd()
        spd.replace(order, 1)
        assert [e.policy_id for e in spd.entries] == [2, 1]
        assert spd.lookup(flow_key(pkt4("10.1.1.1", "10.2.2.2"))) is narrow
        assert spd.lookup(flow_key(pkt4("192.168.1.1", "10.2.2.2"))) is broad


def test_equal_priorities_keep_the_installed_order() -> None:
    a = SpdEntry(1, 5, Action.DISCARD, Selector.make(*ANY4))
    b = SpdEntry(2, 5, Action.BYPASS, Selector.make(*ANY4))
    spd = Spd()
    spd.replace([a, b], 1)
    assert spd.lookup(flow_key(pkt4("1.1.1.1", "2.2.2.2"))) is a
    spd.replace([b, a], 2)
    assert spd.lookup(flow_key(pkt4("1.1.1.1", "2.2.2.2"))) is b


def test_bypass_discard_protect_and_no_match_through_the_engine() -> None:
    dp = Dataplane()
    dp.replace_spd(
        [
            SpdEntry(1, 1, Action.BYPASS, Selector.make("10.0.0.0/24", "10.9.0.0/16")),
            SpdEntry(2, 2, Action.DISCARD, Selector.make("10.0.0.0/24", "10.8.0.0/16")),
            SpdEntry(3, 3, Action.PROTECT, Selector.make("10.0.0.0/24", "10.7.0.0/16"), reqid=7),
            SpdEntry(4, 4, Action.PROTECT, Selector.make("10.0.0.0/24", "10.6.0.0/16"), reqid=8),
        ],
        1,
    )
    dp.install_sa(_esp_out(7), 0.0)
    clear = pkt4("10.0.0.5", "10.9.1.1")
    out = dp.outbound(clear, 0.0)
    assert out is not None and out.packet == clear and dp.bypass_packets == 1
    assert dp.outbound(pkt4("10.0.0.5", "10.8.1.1"), 0.0) is None
    assert dp.drops == {DropReason.POLICY_DISCARD: 1}
    prot = dp.outbound(pkt4("10.0.0.5", "10.7.1.1"), 0.0)
    assert prot is not None and prot.packet[9] == IpProto.ESP
    assert prot.packet[16:20] == _a("192.0.2.2")
    assert dp.outbound(pkt4("10.0.0.5", "10.6.1.1"), 0.0) is None  # PROTECT, no SA yet
    assert dp.drops[DropReason.NO_OUTBOUND_SA] == 1
    assert [e.policy_id for e in dp.events if isinstance(e, Acquire)] == [4]
    assert dp.outbound(pkt4("10.5.0.6", "10.7.1.1"), 0.0) is None  # no entry
    assert dp.drops[DropReason.NO_POLICY] == 1
    assert dp.tx_packets == 1


def test_malformed_clear_packet_is_a_counted_drop() -> None:
    dp = Dataplane()
    dp.replace_spd([SpdEntry(1, 1, Action.BYPASS, Selector.make(*ANY4))], 1)
    assert dp.outbound(b"\x45\x00", 0.0) is None
    assert dp.drops == {DropReason.MALFORMED: 1}


# --- selectors ------------------------------------------------------------------------------


@pytest.mark.parametrize("proto", [IpProto.TCP, IpProto.UDP])
def test_port_ranges_are_inclusive(proto: int) -> None:
    sel = Selector.make(*ANY4, proto=proto, sport=(1024, 2047), dport=(443, 443))
    cases = {
        (1023, 443): False,
        (1024, 443): True,
        (2047, 443): True,
        (2048, 443): False,
        (1500, 442): False,
        (1500, 444): False,
    }
    for (sp, dp_), want in cases.items():
        assert sel.matches_packet(pkt4("1.1.1.1", "2.2.2.2", proto, sp, dp_)) is want, (sp, dp_)
    other = IpProto.UDP if proto == IpProto.TCP else IpProto.TCP
    assert not sel.matches_packet(pkt4("1.1.1.1", "2.2.2.2", other, 1500, 443))


def test_icmp_type_and_code_stand_in_for_the_ports() -> None:
    echo_req = Selector.make(*ANY4, proto=IpProto.ICMP, sport=(8, 8), dport=(0, 0))
    assert flow_key(pkt4("1.1.1.1", "2.2.2.2", IpProto.ICMP, 8, 0))[4:] == (8, 0)
    assert echo_req.matches_packet(pkt4("1.1.1.1", "2.2.2.2", IpProto.ICMP, 8, 0))
    assert not echo_req.matches_packet(pkt4("1.1.1.1", "2.2.2.2", IpProto.ICMP, 0, 0))
    unreach = Selector.make(*ANY4, proto=IpProto.ICMP, sport=(3, 3), dport=(0, 15))
    assert unreach.matches_packet(pkt4("1.1.1.1", "2.2.2.2", IpProto.ICMP, 3, 4))
    assert not unreach.matches_packet(pkt4("1.1.1.1", "2.2.2.2", IpProto.ICMP, 11, 0))
    v6_echo = Selector.make("::/0", "::/0", proto=IpProto.ICMPV6, sport=(128, 128))
    assert v6_echo.matches_packet(pkt6("2001:db8::1", "2001:db8::2", IpProto.ICMPV6, 128, 0))
    assert not v6_echo.matches_packet(pkt6("2001:db8::1", "2001:db8::2", IpProto.ICMPV6, 129, 0))


def test_ipv6_selectors_and_families_never_cross() -> None:
    sel6 = Selector.make("2001:db8:1::/48", "2001:db8:2::/48", proto=IpProto.TCP)
    assert sel6.matches_packet(pkt6("2001:db8:1:5::1", "2001:db8:2::9", IpProto.TCP))
    assert not sel6.matches_packet(pkt6("2001:db8:3::1", "2001:db8:2::9", IpProto.TCP))
    assert not sel6.matches_packet(pkt6("2001:db8:1::1", "2001:db8:2::9", IpProto.UDP))
    assert not Selector.make(*ANY4).matches_packet(pkt6("2001:db8::1", "2001:db8::2"))
    assert not Selector.make("::/0", "::/0").matches_packet(pkt4("1.1.1.1", "2.2.2.2"))
    with pytest.raises(ValueError):
        Selector.make("10.0.0.0/8", "2001:db8::/32")
    spd = Spd()
    e6 = SpdEntry(1, 1, Action.DISCARD, Selector.make("::/0", "::/0"))
    e4 = SpdEntry(2, 2, Action.BYPASS, Selector.make(*ANY4))
    spd.replace([e6, e4], 1)
    assert spd.lookup(flow_key(pkt4("1.1.1.1", "2.2.2.2"))) is e4
    assert spd.lookup(flow_key(pkt6("::1", "::2"))) is e6


def test_selector_validation() -> None:
    with pytest.raises(ValueError):
        Selector.make(*ANY4, proto=256)
    with pytest.raises(ValueError):
        Selector.make(*ANY4, sport=(10, 9))
    with pytest.raises(ValueError):
        Selector.make(*ANY4, dport=(0, 65536))


# --- the flow cache is the linear scan (hypothesis) ------------------------------------

PREFIXES4 = [
    "0.0.0.0/0",
    "10.0.0.0/8",
    "10.1.0.0/16",
    "10.1.2.0/24",
    "10.1.2.3/32",
    "192.168.0.0/16",
]
PREFIXES6 = ["::/0", "2001:db8::/32", "2001:db8:1::/48", "2001:db8:1::5/128"]
ADDRS4 = ["10.1.2.3", "10.1.2.4", "10.1.9.9", "10.7.7.7", "192.168.1.1", "8.8.8.8"]
ADDRS6 = ["2001:db8:1::5", "2001:db8:1::6", "2001:db8:2::1", "2001:db9::1"]
PROTOS = [0, IpProto.TCP, IpProto.UDP, IpProto.ICMP]
PORTS = [0, 1, 53, 443, 1023, 1024, 65535]
RANGES = [(0, 0xFFFF), (0, 1023), (1024, 0xFFFF), (53, 53), (443, 443), (0, 0)]


@st.composite
def rule_specs(draw: st.DrawFn) -> tuple[int, int, str, str, int, tuple[int, int], tuple[int, int]]:
    v6 = draw(st.booleans())
    pool = PREFIXES6 if v6 else PREFIXES4
    return (
        draw(st.integers(0, 5)),  # priority (ties on purpose)
        draw(st.sampled_from(list(Action))),
        draw(st.sampled_from(pool)),
        draw(st.sampled_from(pool)),
        draw(st.sampled_from(PROTOS)),
        draw(st.sampled_from(RANGES)),
        draw(st.sampled_from(RANGES)),
    )


@st.composite
def flow_keys(draw: st.DrawFn) -> FlowKey:
    v6 = draw(st.booleans())
    pool = ADDRS6 if v6 else ADDRS4
    return (
        6 if v6 else 4,
        _a(draw(st.sampled_from(pool))),
        _a(draw(st.sampled_from(pool))),
        draw(st.sampled_from([IpProto.TCP, IpProto.UDP, IpProto.ICMP, 47])),
        draw(st.sampled_from(PORTS)),
        draw(st.sampled_from(PORTS)),
    )


def _reference(specs: list[tuple], key: FlowKey) -> int | None:  # type: ignore[type-arg]
    """Index of the first matching spec by (priority, position), matched with ipaddress."""
    version, src, dst, proto, sport, dport = key
    best = None
    for i, (prio, _, s, d, p, (slo, shi), (dlo, dhi)) in enumerate(specs):
        ns, nd = ipaddress.ip_network(s), ipaddress.ip_network(d)
        if ns.version != version:
            continue
        if ipaddress.ip_address(src) not in ns or ipaddress.ip_address(dst) not in nd:
            continue
        if p and p != proto:
            continue
        if not (slo <= sport <= shi and dlo <= dport <= dhi):
            continue
        if best is None or prio < specs[best][0]:
            best = i
    return best


@settings(max_examples=150, deadline=None)
@given(st.lists(rule_specs(), max_size=12), st.lists(flow_keys(), min_size=1, max_size=25))
def test_flow_cache_returns_the_same_decision_as_a_linear_scan(
    specs: list[tuple],
    keys: list[FlowKey],  # type: ignore[type-arg]
) -> None:
    entries = [
        SpdEntry(i + 1, prio, action, Selector.make(s, d, p, sp, dp_), reqid=i)
        for i, (prio, action, s, d, p, sp, dp_) in enumerate(specs)
    ]
    spd = Spd()
    spd.replace(entries, 1)
    for _ in range(2):  # first pass fills the cache, second pass hits it
        for key in keys:
            want = _reference(specs, key)
            got = spd.lookup(key)
            assert (None if got is None else got.policy_id - 1) == want
    assert spd.cache_hits >= len(keys)


def test_prefix_contains_matches_ipaddress() -> None:
    for text in PREFIXES4 + PREFIXES6:
        p = Prefix.parse(text)
        net = ipaddress.ip_network(text)
        for a in ADDRS4 + ADDRS6:
            addr = ipaddress.ip_address(a)
            assert p.contains(addr.packed) is (addr.version == net.version and addr in net)
        assert str(p) == str(net)


def test_replace_invalidates_the_cache() -> None:
    spd = Spd()
    key = flow_key(pkt4("10.0.0.1", "10.0.0.2"))
    spd.replace([SpdEntry(1, 1, Action.BYPASS, Selector.make(*ANY4))], 1)
    assert spd.lookup(key).action == Action.BYPASS  # type: ignore[union-attr]
    spd.replace([SpdEntry(1, 1, Action.DISCARD, Selector.make(*ANY4))], 2)
    assert spd.lookup(key).action == Action.DISCARD  # type: ignore[union-attr]
    spd.replace([], 3)
    assert spd.lookup(key) is None


# --- revisions and validation ---------------------------------------------------------------


def test_revision_going_backwards_is_refused_and_changes_nothing() -> None:
    spd = Spd()
    first = [SpdEntry(1, 1, Action.BYPASS, Selector.make(*ANY4))]
    spd.replace(first, 5)
    with pytest.raises(ValueError):
        spd.replace([SpdEntry(9, 1, Action.DISCARD, Selector.make(*ANY4))], 4)
    assert spd.revision == 5 and spd.entries == tuple(first)
    spd.replace(first, 5)  # re-pushing the same revision is fine
    spd.replace([], 6)
    assert spd.revision == 6 and spd.entries == ()


def test_duplicate_policy_ids_and_bad_bundles_are_refused() -> None:
    spd = Spd()
    sel = Selector.make(*ANY4)
    with pytest.raises(ValueError):
        spd.replace([SpdEntry(1, 1, Action.BYPASS, sel), SpdEntry(1, 2, Action.BYPASS, sel)], 1)
    for protocols in [(), (50, 6), (17,)]:
        with pytest.raises(ValueError):
            spd.replace([SpdEntry(1, 1, Action.PROTECT, sel, protocols=protocols)], 1)
    assert spd.revision == 0


# --- ACQUIRE ----------------------------------------------------------------------------------


def _acquires(dp: Dataplane) -> list[Acquire]:
    return [e for e in dp.events if isinstance(e, Acquire)]


def test_acquire_is_emitted_once_per_interval_per_policy() -> None:
    dp = Dataplane()
    dp.replace_spd(
        [
            SpdEntry(11, 1, Action.PROTECT, Selector.make("10.0.0.0/8", "10.7.0.0/16"), reqid=3),
            SpdEntry(12, 2, Action.PROTECT, Selector.make("10.0.0.0/8", "10.8.0.0/16"), reqid=4),
        ],
        1,
    )
    for t in (0.0, 0.2, 0.5, 0.99):
        assert dp.outbound(pkt4("10.0.0.1", "10.7.0.1", IpProto.TCP, 5555, 80), t) is None
    assert _acquires(dp) == [Acquire(11, 3, _a("10.0.0.1"), _a("10.7.0.1"), IpProto.TCP, 5555, 80)]
    dp.outbound(pkt4("10.0.0.1", "10.8.0.1"), 0.5)  # another policy: its own limiter
    assert [a.policy_id for a in _acquires(dp)] == [11, 12]
    dp.outbound(pkt4("10.0.0.1", "10.7.0.1"), 1.0)
    assert [a.policy_id for a in _acquires(dp)] == [11, 12, 11]
    assert dp.drops == {DropReason.NO_OUTBOUND_SA: 6}
    dp.replace_spd(list(dp.spd.entries), 2)  # a new SPD resets the limiter
    dp.outbound(pkt4("10.0.0.1", "10.7.0.1"), 1.1)
    assert [a.policy_id for a in _acquires(dp)] == [11, 12, 11, 11]


def test_installing_the_sa_resets_the_acquire_limiter_of_its_policies_only() -> None:
    """policy_id and reqid are different numbers: installing an SA for reqid 3 must reset the
    limiter of the policies with reqid 3 (policy 11), not of a policy whose id is 3."""
    dp = Dataplane()
    dp.replace_spd(
        [
            SpdEntry(11, 1, Action.PROTECT, Selector.make("10.0.0.0/8", "10.7.0.0/16"), reqid=3),
            SpdEntry(3, 2, Action.PROTECT, Selector.make("10.0.0.0/8", "10.8.0.0/16"), reqid=9),
        ],
        1,
    )
    dp.outbound(pkt4("10.0.0.1", "10.7.0.1"), 0.0)
    dp.outbound(pkt4("10.0.0.1", "10.8.0.1"), 0.0)
    assert [a.policy_id for a in _acquires(dp)] == [11, 3]
    sa = dp.install_sa(_esp_out(3), 0.1)
    assert dp.outbound(pkt4("10.0.0.1", "10.7.0.1"), 0.2) is not None
    assert dp.delete_sa(sa.spi, sa.cfg.dst, IpProto.ESP, Direction.OUTBOUND)
    dp.outbound(pkt4("10.0.0.1", "10.7.0.1"), 0.3)  # SA gone again: ask at once
    dp.outbound(pkt4("10.0.0.1", "10.8.0.1"), 0.3)  # policy 3 is still rate-limited
    assert [a.policy_id for a in _acquires(dp)] == [11, 3, 11]


# --- inbound tunnel selectors -------------------------------------------------------------


def test_inbound_tunnel_packet_outside_the_sa_selectors_is_dropped() -> None:
    key = bytes(range(20))
    base = dict(
        spi=0x4444,
        protocol=IpProto.ESP,
        mode=Mode.TUNNEL,
        src=_a("192.0.2.1"),
        dst=_a("192.0.2.2"),
        encr_id=Encr.AES_GCM_16,
        encr_key=key,
        reqid=1,
    )
    sel = (
        Selector.make("10.1.0.0/16", "10.2.0.0/16"),
        Selector.make("10.3.0.0/16", "10.2.0.0/16", proto=IpProto.UDP, dport=(53, 53)),
    )
    tx = Dataplane()
    tx.install_sa(SaConfig(direction=Direction.OUTBOUND, **base), 0.0)  # type: ignore[arg-type]
    tx.replace_spd(
        [
            SpdEntry(1, 1, Action.PROTECT, Selector.make(*ANY4), reqid=1),
            SpdEntry(2, 2, Action.PROTECT, Selector.make("::/0", "::/0"), reqid=1),
        ],
        1,
    )
    rx = Dataplane()
    in_sa = rx.install_sa(
        SaConfig(
            direction=Direction.INBOUND,
            selectors=sel,  # type: ignore
            **base,
        ),
        0.0,
    )
    cases = [
        (pkt4("10.1.5.5", "10.2.0.9"), True),
        (pkt4("10.3.5.5", "10.2.0.9", IpProto.UDP, 4000, 53), True),
        (pkt4("10.3.5.5", "10.2.0.9", IpProto.UDP, 4000, 54), False),
        (pkt4("10.9.5.5", "10.2.0.9"), False),
        (pkt6("2001:db8::1", "2001:db8::2"), False),
    ]
    for inner, ok in cases:
        out = tx.outbound(inner, 0.0)
        assert out is not None
        assert (
            (rx.inbound(out.packet, 0.0) == inner) if ok else (rx.inbound(out.packet, 0.0) is None)
        )
    assert rx.drops == {DropReason.SELECTOR: 3}
    assert in_sa.other_drops == 3 and in_sa.packets == 2
