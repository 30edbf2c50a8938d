"""SPD index: RFC 4301 §4.4.1 first match in order, found without a scan over the entries.

The oracle is a brute-force linear first-match over the entries in (priority, position) order
whose address test is ``ipaddress`` membership, independent of the code under test. Random
entry sets mix both families, overlapping prefixes of every length, port ranges, single ports,
protocols and priority ties, with enough entries sharing both prefixes to split leaves by
protocol and port.
"""

from __future__ import annotations

import ipaddress
import random
from array import array

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.core import spd as spd_mod
from services.core.selectors import FlowKey, Prefix, Selector
from services.core.spd import LEAF_SCAN, Action, Spd, SpdEntry

BASES = {
    4: [0x0A000000, 0x0A010200, 0x0A0102FF, 0xAC100000],
    6: [0x20010DB8 << 96, (0x20010DB8 << 96) | (1 << 80) | 5, 0xFE80 << 112],
}
PROTOS = [0, 0, 1, 6, 17, 58, 132]
PORT_EDGES = [0, 1, 7, 8, 53, 443, 1023, 1024, 65534, 65535]


def _net(version: int, value: int, length: int) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    value &= (1 << (32 if version == 4 else 128)) - 1
    if version == 4:
        return ipaddress.IPv4Network((value, length), strict=False)
    return ipaddress.IPv6Network((value, length), strict=False)


@st.composite
def prefixes(draw: st.DrawFn, version: int) -> str:
    bits = 32 if version == 4 else 128
    base = draw(st.sampled_from(BASES[version]))
    common = st.sampled_from([0, 8, 24, bits])  # few shapes: many entries per shape
    odd = st.sampled_from([1, 16, 23, 25, 31, bits - 1])
    length = draw(common | common | odd)
    noise = draw(st.sampled_from([0, 0, 0, 0, 1, 3]))  # nearby prefixes that overlap or miss
    return str(_net(version, base ^ (noise << (bits - max(length, 1))), length))


@st.composite
def port_ranges(draw: st.DrawFn) -> tuple[int, int]:
    kind = draw(st.sampled_from(["any", "one", "range", "range"]))
    if kind == "any":
        return (0, 0xFFFF)
    lo = draw(st.sampled_from(PORT_EDGES) | st.integers(0, 0xFFFF))
    if kind == "one":
        return (lo, lo)
    hi = draw(st.sampled_from(PORT_EDGES) | st.integers(0, 0xFFFF))
    return (min(lo, hi), max(lo, hi))


Spec = tuple[int, Action, str, str, int, tuple[int, int], tuple[int, int]]


@st.composite
def specs(draw: st.DrawFn) -> Spec:
    version = draw(st.sampled_from([4, 4, 6]))
    return (
        draw(st.integers(0, 6)),  # priority, with ties
        draw(st.sampled_from(list(Action))),
        draw(prefixes(version)),
        draw(prefixes(version)),
        draw(st.sampled_from(PROTOS)),
        draw(port_ranges()),
        draw(port_ranges()),
    )


@st.composite
def spec_lists(draw: st.DrawFn) -> list[Spec]:
    """Random entries, some of them copies of one address pair with other protocols and
    ports (so that leaves grow past LEAF_SCAN and get split)."""
    out = draw(st.lists(specs(), max_size=40))
    if out and draw(st.booleans()):
        _, _, src, dst, _, _, _ = out[0]
        extra = draw(st.lists(st.tuples(specs(), st.integers(0, 6)), max_size=3 * LEAF_SCAN))
        out += [(prio, a, src, dst, p, sp, dp) for (_, a, _, _, p, sp, dp), prio in extra]
    return out


def _entries(items: list[Spec]) -> list[SpdEntry]:
    return [
        SpdEntry(i + 1, prio, action, Selector.make(s, d, p, sp, dp), reqid=i)
        for i, (prio, action, s, d, p, sp, dp) in enumerate(items)
    ]


def _inside(draw: st.DrawFn, text: str) -> bytes:
    net = ipaddress.ip_network(text)
    host = draw(st.integers(0, (1 << (net.max_prefixlen - net.prefixlen)) - 1))
    return (int(net.network_address) | host).to_bytes(net.max_prefixlen // 8, "big")


def _port_in(draw: st.DrawFn, lo: int, hi: int) -> int:
    port = draw(st.sampled_from([lo, hi]) | st.integers(lo, hi))
    if draw(st.integers(0, 4)) == 0:  # just outside, now and then
        port = min(max(port + draw(st.sampled_from([-1, 1])), 0), 0xFFFF)
    return port


@st.composite
def flow_keys(draw: st.DrawFn, items: list[Spec]) -> FlowKey:
    """Mostly a key inside one entry's selector (its prefixes, protocol and port edges, now
    and then one port just outside), else a key from anywhere."""
    if items and draw(st.integers(0, 4)) > 0:
        _, _, s, d, p, (slo, shi), (dlo, dhi) = draw(st.sampled_from(items))
        version = ipaddress.ip_network(s).version
        src, dst = _inside(draw, s), _inside(draw, d)
        if draw(st.integers(0, 5)) == 0:  # the source of another entry of that family
            same = [it[2] for it in items if ipaddress.ip_network(it[2]).version == version]
            src = _inside(draw, draw(st.sampled_from(same)))
        proto = p or draw(st.sampled_from([1, 6, 17, 47, 58, 132]))
        return (version, src, dst, proto, _port_in(draw, slo, shi), _port_in(draw, dlo, dhi))
    version = draw(st.sampled_from([4, 6]))
    bits = 32 if version == 4 else 128
    addr = st.sampled_from(BASES[version]) | st.integers(0, (1 << bits) - 1)
    src, dst = (draw(addr).to_bytes(bits // 8, "big") for _ in range(2))
    port = st.sampled_from(PORT_EDGES) | st.integers(0, 0xFFFF)
    proto = draw(st.sampled_from([1, 6, 17, 47, 58, 132]))
    return (version, src, dst, proto, draw(port), draw(port))


def reference(items: list[Spec], key: FlowKey) -> int | None:
    """policy_id of the first matching spec by (priority, position): a plain scan."""
    version, src, dst, proto, sport, dport = key
    order = sorted(range(len(items)), key=lambda i: items[i][0])
    for i in order:
        _, _, s, d, p, (slo, shi), (dlo, dhi) = items[i]
        ns, nd = ipaddress.ip_network(s), ipaddress.ip_network(d)
        if ns.version != version or len(src) * 8 != ns.max_prefixlen:
            continue
        if ipaddress.ip_address(src) not in ns or ipaddress.ip_address(dst) not in nd:
            continue
        if p and p != proto:
            continue
        if slo <= sport <= shi and dlo <= dport <= dhi:
            return i + 1
    return None


def _pid(e: SpdEntry | None) -> int | None:
    return None if e is None else e.policy_id


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_indexed_lookup_is_the_linear_first_match(data: st.DataObject) -> None:
    items = data.draw(spec_lists())
    spd = Spd()
    spd.replace(_entries(items), 1)
    keys = data.draw(st.lists(flow_keys(items), min_size=1, max_size=40))
    for _ in range(2):  # the first pass runs the index, the second hits the cache
        for key in keys:
            want = reference(items, key)
            assert _pid(spd._index.first_match(key)) == want, key
            assert _pid(spd.lookup(key)) == want, key
    assert spd.cache_hits >= len(keys)


def _sel(
    proto: int = 0, sport: tuple[int, int] = (0, 0xFFFF), dport: tuple[int, int] = (0, 0xFFFF)
) -> Selector:
    return Selector.make("10.1.2.0/24", "172.16.0.0/16", proto, sport, dport)


def test_a_split_leaf_keeps_the_order_across_ports_protocols_and_wildcards() -> None:
    entries = [SpdEntry(100 + p, 50, Action.PROTECT, _sel(6, dport=(p, p))) for p in range(20)]
    entries += [
        SpdEntry(1, 40, Action.DISCARD, _sel(6, dport=(5, 5))),  # beats the exact-port entry
        SpdEntry(2, 60, Action.BYPASS, _sel(6, dport=(0, 1023))),
        SpdEntry(3, 45, Action.BYPASS, _sel(17, dport=(10, 12))),
        SpdEntry(4, 70, Action.DISCARD, _sel()),
        SpdEntry(5, 30, Action.BYPASS, _sel(0, sport=(7, 7))),
    ]
    spd = Spd()
    spd.replace(entries, 1)
    src, dst = bytes([10, 1, 2, 9]), bytes([172, 16, 3, 4])
    cases = {
        (6, 1000, 5): 1,
        (6, 1000, 6): 106,
        (6, 1000, 500): 2,
        (6, 7, 6): 5,
        (17, 1000, 11): 3,
        (17, 1000, 13): 4,
        (6, 1000, 2000): 4,
        (1, 8, 0): 4,
    }
    for (proto, sport, dport), pid in cases.items():
        assert _pid(spd.lookup((4, src, dst, proto, sport, dport))) == pid, (proto, sport, dport)
    assert spd.lookup((4, bytes([10, 1, 3, 9]), dst, 6, 1000, 5)) is None


def test_keys_that_no_packet_yields_are_answered_like_the_scan() -> None:
    odd = Selector(Prefix.parse("10.0.0.0/8"), Prefix.parse("2001:db8::/32"))  # mixed families
    entries = [
        SpdEntry(1, 1, Action.DISCARD, odd),
        SpdEntry(2, 2, Action.BYPASS, Selector.make("0.0.0.0/0", "0.0.0.0/0")),
    ]
    spd = Spd()
    spd.replace(entries, 1)
    v6 = ipaddress.ip_address("2001:db8::1").packed
    for key in [
        (4, bytes(4), bytes(4), 6, 1, 2),
        (4, bytes([10, 0, 0, 1]), v6, 6, 1, 2),  # matches the mixed entry
        (4, bytes(3), bytes(4), 6, 1, 2),
        (5, bytes(4), bytes(4), 6, 1, 2),
        (6, bytes(4), bytes(4), 6, 1, 2),
    ]:
        assert spd.lookup(key) is spd._index.scan(key), key


def test_prefix_lengths_out_of_range_are_refused_and_change_nothing() -> None:
    spd = Spd()
    good = [SpdEntry(1, 1, Action.BYPASS, Selector.make("0.0.0.0/0", "0.0.0.0/0"))]
    spd.replace(good, 1)
    bad = Selector(Prefix(4, 0, 33), Prefix(4, 0, 0))
    with pytest.raises(ValueError, match="prefix length"):
        spd.replace([SpdEntry(2, 1, Action.DISCARD, bad)], 2)
    assert spd.revision == 1 and spd.entries == tuple(good)
    assert _pid(spd.lookup((4, bytes(4), bytes(4), 6, 1, 2))) == 1


# --- the flow cache ---------------------------------------------------------------------------


def _key(i: int) -> FlowKey:
    return (4, bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]), 17, i, 53)


def test_the_cache_is_bounded_and_keeps_the_active_flows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spd_mod, "FLOW_CACHE_MAX", 64)
    spd = Spd()
    spd.replace([SpdEntry(1, 1, Action.BYPASS, Selector.make("0.0.0.0/0", "0.0.0.0/0"))], 1)
    hot = _key(0)
    for i in range(1, 1000):  # a scan of new flows, with one active flow in between
        spd.lookup(_key(i))
        assert spd.cached_flows() <= 64
        if i % 16 == 0:
            misses = spd.cache_misses
            assert _pid(spd.lookup(hot)) == 1
            assert spd.cache_misses == misses + (i == 16)  # only its first packet misses
    assert spd.cache_misses == 1000 and spd.cached_flows() >= 32


def test_replace_empties_both_cache_generations(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spd_mod, "FLOW_CACHE_MAX", 8)
    spd = Spd()
    spd.replace([SpdEntry(1, 1, Action.BYPASS, Selector.make("0.0.0.0/0", "0.0.0.0/0"))], 1)
    keys = [_key(i) for i in range(6)]  # the first four end up in the older generation
    for k in keys:
        spd.lookup(k)
    spd.replace([SpdEntry(2, 1, Action.DISCARD, Selector.make("10.0.0.0/8", "0.0.0.0/0"))], 2)
    assert spd.cached_flows() == 0
    assert all(_pid(spd.lookup(k)) == 2 for k in keys)
    spd.replace([], 3)
    assert all(spd.lookup(k) is None for k in keys)


def test_a_later_group_can_hold_an_earlier_entry() -> None:
    """Groups (one per pair of prefix lengths) are probed lowest rank first, but a hit in one
    group does not end the search: a later group may hold a matching entry of lower rank."""
    entries = [
        SpdEntry(1, 1, Action.DISCARD, Selector.make("10.9.9.9/32", "172.16.1.0/24")),
        SpdEntry(2, 2, Action.BYPASS, Selector.make("10.1.0.0/16", "172.16.0.0/16")),
        SpdEntry(3, 3, Action.PROTECT, Selector.make("10.1.2.3/32", "172.16.1.0/24")),
        SpdEntry(4, 4, Action.PROTECT, Selector.make("10.1.0.0/16", "172.16.0.0/16", 6)),
    ]
    for split in (False, True):
        if split:  # the same through a leaf split by protocol and port
            entries += [
                SpdEntry(10 + i, 5, Action.BYPASS, Selector.make("10.1.2.3/32", "172.16.1.0/24"))
                for i in range(LEAF_SCAN)
            ]
        spd = Spd()
        spd.replace(entries, 1)
        key = (4, bytes([10, 1, 2, 3]), bytes([172, 16, 1, 7]), 6, 1000, 80)
        assert _pid(spd.lookup(key)) == 2
        assert _pid(spd.lookup((4, bytes([10, 1, 2, 3]), bytes([172, 16, 2, 7]), 6, 1, 2))) == 2


# --- the filter in front of the large groups --------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_the_group_filter_never_hides_the_first_match(data: st.DataObject) -> None:
    """With tiny thresholds every group of a random entry set is filtered, with few slots many
    cut pairs share one; the answer stays the linear first match."""
    items = data.draw(spec_lists())
    keys = data.draw(st.lists(flow_keys(items), min_size=1, max_size=40))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(spd_mod, "FILTER_MIN", data.draw(st.sampled_from([1, 2, 4])))
        mp.setattr(spd_mod, "FILTER_SLOTS", data.draw(st.sampled_from([1, 8])))
        spd = Spd()
        spd.replace(_entries(items), 1)
    for key in keys:
        assert _pid(spd.lookup(key)) == reference(items, key), key


def _ip(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def test_a_large_policy_is_filtered_and_answers_like_the_scan() -> None:
    """Thousands of host and subnet rules between 10/8 and 172.16/12 plus broad rules: the large
    groups sit behind the filter, a key outside all of them probes none of them, and the index
    agrees with the scan on keys inside every entry and on random ones."""
    rng = random.Random(7)
    entries = []
    for i in range(3000):
        kind = i % 4
        src = f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(256)}"
        dst = f"172.{16 + rng.randrange(16)}.{rng.randrange(256)}.{rng.randrange(256)}"
        if kind == 0:
            sel = Selector.make(f"{src}/32", f"{dst}/24")
        elif kind == 1:
            sel = Selector.make(f"{src}/32", f"{dst}/32", 6, dport=(443, 443))
        elif kind == 2:
            sel = Selector.make(f"{src}/24", f"{dst}/24", 17, dport=(1000, 2000))
        else:
            sel = Selector.make(f"2001:db8:{i:x}::/64", f"2001:db8:ffff:{i:x}::/64")
        entries.append(SpdEntry(i + 1, rng.randrange(100), Action.PROTECT, sel, reqid=i))
    entries.append(SpdEntry(9001, 200, Action.DISCARD, Selector.make("10.0.0.0/8", "0.0.0.0/0")))
    entries.append(SpdEntry(9002, 201, Action.BYPASS, Selector.make("::/0", "::/0")))
    spd = Spd()
    spd.replace(entries, 1)
    index = spd._index
    assert index.f4 is not None and index.f6 is not None
    _, _, _, _, _, variants = index.f4
    assert min(len(v) for v in variants) == 1  # only the broad rule's group
    key = (4, _ip("10.1.2.3"), _ip("192.0.2.1"), 6, 1000, 443)
    assert _pid(spd.lookup(key)) == 9001
    keys: list[FlowKey] = []
    for e in entries:
        sel = e.selector
        size = 4 if sel.src.version == 4 else 16
        for _ in range(2):
            src = (sel.src.value | rng.getrandbits(8 * size) >> sel.src.length).to_bytes(size)
            dst = (sel.dst.value | rng.getrandbits(8 * size) >> sel.dst.length).to_bytes(size)
            keys.append(
                (sel.src.version, src, dst, rng.choice([6, 17]), 1000, rng.choice([443, 1500]))
            )
        keys.append((4, rng.randbytes(4), rng.randbytes(4), 6, 1000, 443))
    for key in keys:
        assert index.first_match(key) is index.scan(key), key


def test_a_filter_naming_more_than_256_group_combinations() -> None:
    """Nine large groups (destination /24 to /32) whose entries share cut pairs in 300
    different combinations: slots name their variant in two bytes, answers stay right."""
    entries = []
    for m in range(1, 301):
        src = f"10.0.{m >> 8}.{m & 0xFF}/32"
        for b in range(9):
            if m >> b & 1:
                dst = f"172.16.{m & 0xFF}.{m >> 8 << 7}/{24 + b}"
                entries.append(
                    SpdEntry(len(entries) + 1, 0, Action.BYPASS, Selector.make(src, dst))
                )
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(spd_mod, "FILTER_MIN", 1)
        spd = Spd()
        spd.replace(entries, 1)
    index = spd._index
    assert index.f4 is not None
    assert isinstance(index.f4[4], array)
    for m in range(1, 301):
        for host in (0, 1, 127, 128, 255):
            key = (4, bytes([10, 0, m >> 8, m & 0xFF]), bytes([172, 16, m & 0xFF, host]), 6, 1, 2)
            assert index.first_match(key) is index.scan(key), key
