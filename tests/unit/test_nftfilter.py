"""Inbound clear-traffic filter (services.dataplane.nftfilter, RFC 4301 §5.2): the nft script
generated from an SPD (each action, mirrored addresses and ports, IPv4/IPv6, exemptions), the
counter parser, the reload logic, and the worker settings that switch it on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from services.core.engine import POLICY_ID_BASE
from services.core.selectors import Selector
from services.core.spd import Action, SpdEntry
from services.dataplane.__main__ import settings_from_args
from services.dataplane.nftfilter import (
    DECISIONS,
    FilterConfig,
    FilterSync,
    entry_rules,
    parse_counters,
    ruleset,
    table_name,
)
from services.dataplane.settings import Settings

CFG = FilterConfig(
    "ipsec_w1", "ipsec0", ("10.2.0.0/16", "fd00:2::/64"), ("192.0.2.1", "2001:db8:1::1")
)


def e(
    action: Action,
    src: str = "10.1.0.0/16",
    dst: str = "10.2.0.0/16",
    proto: int = 0,
    sport: tuple[int, int] = (0, 65535),
    dport: tuple[int, int] = (0, 65535),
    *,
    accept_clear: bool = False,
    pid: int = 1,
) -> SpdEntry:
    return SpdEntry(
        pid,
        pid,
        action,
        Selector.make(src, dst, proto, sport, dport),
        7,
        (50,),
        accept_clear,
        accept_clear,
    )


@pytest.mark.parametrize(
    ("entry", "verdict"),
    [
        (e(Action.BYPASS), 'counter name "bypass" accept'),
        (e(Action.DISCARD), 'counter name "discard" drop'),
        (e(Action.PROTECT, accept_clear=True), 'counter name "request" accept'),
        (e(Action.PROTECT), 'counter name "require" drop'),
    ],
)
def test_each_action_has_its_verdict(entry: SpdEntry, verdict: str) -> None:
    assert entry_rules(entry) == [
        f"meta nfproto ipv4 ip saddr 10.2.0.0/16 ip daddr 10.1.0.0/16 {verdict}"
    ]


def test_addresses_and_ports_are_mirrored() -> None:
    rule = entry_rules(e(Action.BYPASS, proto=6, sport=(1024, 2047), dport=(443, 443)))
    assert rule == [
        "meta nfproto ipv4 ip saddr 10.2.0.0/16 ip daddr 10.1.0.0/16 meta l4proto 6 "
        'th sport 443 th dport 1024-2047 counter name "bypass" accept'
    ]


def test_ipv6_and_any_address() -> None:
    r6 = entry_rules(e(Action.DISCARD, "fd00:1::/64", "::/0", 17, dport=(53, 53)))
    assert r6 == [
        "meta nfproto ipv6 ip6 daddr fd00:1::/64 meta l4proto 17 th sport 53 "
        'counter name "discard" drop'
    ]
    assert entry_rules(e(Action.BYPASS, "0.0.0.0/0", "0.0.0.0/0")) == [
        'meta nfproto ipv4 counter name "bypass" accept'
    ]


def test_icmp_type_code_are_not_swapped() -> None:
    r = entry_rules(e(Action.BYPASS, proto=1, sport=(8, 8), dport=(0, 255)))
    assert r == [
        "meta nfproto ipv4 ip saddr 10.2.0.0/16 ip daddr 10.1.0.0/16 meta l4proto 1 "
        '@th,0,8 8 counter name "bypass" accept'
    ]


def test_any_protocol_with_ports() -> None:
    r = entry_rules(e(Action.PROTECT, sport=(0, 100), accept_clear=True))
    assert len(r) == 2
    assert "meta l4proto { 6, 17, 132 } th dport 0-100" in r[0]
    assert "meta l4proto != { 1, 6, 17, 58, 132 }" in r[1]  # their ports are 0: in range
    r = entry_rules(e(Action.PROTECT, sport=(10, 100)))
    assert len(r) == 1  # 0 is not in range: only port protocols match


def test_entries_that_cannot_match_give_no_rule() -> None:
    mixed = SpdEntry(
        1,
        1,
        Action.BYPASS,
        Selector(Selector.make("10.0.0.0/8", "0.0.0.0/0").src, Selector.make("::/0", "::/0").dst),
    )
    assert entry_rules(mixed) == []
    assert entry_rules(e(Action.BYPASS, proto=47, dport=(5, 5))) == []  # GRE has no ports


def test_ruleset_order_exemptions_and_default_drop() -> None:
    entries = [
        e(Action.DISCARD, dst="10.2.0.5/32", pid=1),
        e(Action.BYPASS, pid=2),
        e(Action.PROTECT, "fd00:1::/64", "fd00:2::/64", pid=3),
    ]
    text = ruleset(entries, CFG)
    lines = [ln.strip() for ln in text.splitlines()]
    assert lines[0] == "table inet ipsec_w1 {"
    assert "flush chain inet ipsec_w1 spd" in lines
    assert "type filter hook prerouting priority raw; policy accept;" in text
    i_tun = lines.index('iifname { "ipsec0", "lo" } accept')
    i_v4 = lines.index("meta nfproto ipv4 ip saddr != { 10.2.0.0/16 } accept")
    i_v6 = lines.index("meta nfproto ipv6 ip6 saddr != { fd00:2::/64 } accept")
    i_esp = lines.index(
        'ip daddr { 192.0.2.1 } meta l4proto { 50, 51 } counter name "exempt" accept'
    )
    i_ike = lines.index(
        'ip6 daddr { 2001:db8:1::1 } udp dport { 500, 4500 } counter name "exempt" accept'
    )
    i_jump = lines.index("jump spd")
    assert i_tun < i_v4 < i_v6 < i_esp < i_ike < i_jump
    spd = lines[lines.index("chain spd {") + 1 :]
    assert "10.2.0.5/32" in spd[0] and "discard" in spd[0]
    assert "bypass" in spd[1]
    assert "ip6 saddr fd00:2::/64" in spd[2] and "require" in spd[2]
    assert spd[3] == 'counter name "nomatch" drop'
    for d in DECISIONS:
        assert f"counter {d} {{ }}" in text


def test_ruleset_without_routes_of_a_family_or_local_addresses() -> None:
    cfg = FilterConfig("ipsec_w1", "tun9", ("10.2.0.0/16",))
    text = ruleset([], cfg)
    assert "meta nfproto ipv6 accept" in text
    assert "fib daddr type local meta l4proto { 50, 51 }" in text


def test_filter_config_refuses_names_nft_would_misread() -> None:
    with pytest.raises(ValueError, match="table"):
        FilterConfig('x"; flush ruleset', "ipsec0", ())
    with pytest.raises(ValueError, match="interface"):
        FilterConfig("ipsec_x", 'a" accept', ())


def test_table_name_is_sanitised_and_unique() -> None:
    assert table_name("worker_1") == "ipsec_worker_1"
    a, b = table_name("worker-a"), table_name("worker.a")
    assert a != b and a.startswith("ipsec_worker_a_")
    assert len(table_name("x" * 128)) <= 64


def test_parse_counters_takes_known_names_only() -> None:
    doc = {
        "nftables": [
            {"metainfo": {"version": "1.0.6"}},
            {"counter": {"name": "require", "packets": 4, "bytes": 400}},
            {"counter": {"name": "exempt", "packets": 2}},
            {"counter": {"name": "evil", "packets": 9}},
            {"counter": {"name": "bypass", "packets": -1}},
            "junk",
        ]
    }
    assert parse_counters(json.dumps(doc)) == {"require": 4, "exempt": 2}
    assert parse_counters("not json") == {}
    assert parse_counters("[1, 2]") == {}


class FakeRunner:
    def __init__(self) -> None:
        self.scripts: list[str] = []
        self.removed = 0
        self.fail = False

    def apply(self, script: str) -> None:
        if self.fail:
            raise RuntimeError("nft said no")
        self.scripts.append(script)

    def remove(self) -> None:
        self.removed += 1

    def counters(self) -> dict[str, int]:
        return {"nomatch": 5}


def test_filter_sync_reloads_only_on_change_and_cleans_up() -> None:
    current: list[tuple[SpdEntry, ...]] = [()]
    published: list[dict[str, int]] = []
    runner = FakeRunner()
    sync = FilterSync(runner, CFG, lambda: current[0], published.append, interval=3600)
    sync.start()
    try:
        assert runner.removed == 1 and len(runner.scripts) == 1  # stale table removed first
        assert not sync.sync()
        current[0] = (e(Action.BYPASS),)
        assert sync.sync()
        assert "bypass" in runner.scripts[-1]
        runner.fail = True
        current[0] = (e(Action.DISCARD),)
        with pytest.raises(RuntimeError):
            sync.sync()
        runner.fail = False
        assert sync.sync()  # retried: still differs from what was loaded
        sync.read_counters()
        assert published == [{"nomatch": 5}]
    finally:
        sync.stop()
    assert runner.removed == 2


# --- settings ---------------------------------------------------------------------------------


def test_policyd_settings_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("DATAPLANE_POLICYD", "DATAPLANE_INBOUND_FILTER", "DATAPLANE_NODE"):
        monkeypatch.delenv(k, raising=False)
    s = Settings(worker_id="w-1", route=["10.2.0.0/16"])
    assert s.policyd == "" and not s.inbound_filter_enabled  # today's behaviour
    assert s.policy_node == "w-1"
    assert s.policy_state_file == Path("/var/lib/ipsec-dataplane/w-1/policy.json")
    assert s.policyd_client_cert == "server" and s.policyd_server_name == "policyd"
    s = Settings(worker_id="w-1", route=["10.2.0.0/16"], policyd="unix:/run/p.sock")
    assert s.inbound_filter_enabled
    s = settings_from_args(
        [
            "--worker-id=w/../x",
            "--route=10.2.0.0/16",
            "--policyd=127.0.0.1:9443",
            "--inbound-filter=OFF",
            "--node=site-a",
            "--tls-cert-name=worker-a",
            "--policy-state=/tmp/p.json",
        ]
    )
    assert not s.inbound_filter_enabled and s.policy_node == "site-a"
    assert s.policyd_client_cert == "worker-a" and s.policy_state == Path("/tmp/p.json")
    assert ".." not in Settings(worker_id="../x").policy_state_file.parts


def test_policyd_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATAPLANE_POLICYD", "unix:/run/policyd/grpc.sock")
    monkeypatch.setenv("DATAPLANE_INBOUND_FILTER", "off")
    monkeypatch.setenv("DATAPLANE_POLICYD_CERT_NAME", "dataplane")
    s = Settings(worker_id="w")
    assert s.policyd == "unix:/run/policyd/grpc.sock" and not s.inbound_filter_enabled
    assert s.policyd_client_cert == "dataplane"


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"policyd": "unix:"}, "needs a path"),
        ({"policyd": "policyd"}, "unix:/path or HOST:PORT"),
        ({"policyd": "host:99999"}, "unix:/path or HOST:PORT"),
        ({"inbound_filter": "maybe"}, "inbound_filter"),
        ({"inbound_filter": "on"}, "needs at least one --route"),
    ],
)
def test_policyd_settings_validation(kw: dict[str, str], match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        Settings(worker_id="w", **kw)  # type: ignore[arg-type]


def test_policy_layer_entries_are_matched_as_they_are() -> None:
    """policyd compiles both directions of a mirrored filter; a one-way filter must not admit
    the reverse traffic, so policy layer entries are not mirrored (keymgr's are)."""
    pe = e(Action.BYPASS, proto=6, sport=(1024, 2047), dport=(443, 443), pid=POLICY_ID_BASE + 1)
    assert entry_rules(pe, mirror=False) == [
        "meta nfproto ipv4 ip saddr 10.1.0.0/16 ip daddr 10.2.0.0/16 meta l4proto 6 "
        'th sport 1024-2047 th dport 443 counter name "bypass" accept'
    ]
    text = ruleset([e(Action.DISCARD, pid=3), pe], CFG)
    spd = [ln.strip() for ln in text.splitlines()]
    spd = spd[spd.index("chain spd {") + 1 :]
    assert spd[0].startswith("meta nfproto ipv4 ip saddr 10.2.0.0/16 ip daddr 10.1.0.0/16")
    assert spd[1].startswith("meta nfproto ipv4 ip saddr 10.1.0.0/16 ip daddr 10.2.0.0/16")


def test_neighbour_discovery_is_exempt() -> None:
    assert 'icmpv6 type { 133, 134, 135, 136 } counter name "exempt" accept' in ruleset([], CFG)
