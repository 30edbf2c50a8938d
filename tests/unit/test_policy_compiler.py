"""policyd's SPD compiler (services/core/policy.py): templates, ordering against a brute-force
reference, mirrored filters, IKE exemptions, "me", conflicts, keymgr connections."""

from __future__ import annotations

import copy
import ipaddress
import json
import pathlib
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.core.policy import (
    REQID_BASE,
    REQID_LIMIT,
    CompiledPolicy,
    CompileError,
    NodeContext,
    compile_policy,
    stable_reqids,
)
from services.core.selectors import FlowKey
from services.core.spd import Action, Spd
from services.keymgr.config import (
    MAX_CHILDREN,
    Connection,
    config_from_specs,
    connection_from_spec,
)
from services.keymgr.daemon import Keymgr, connection_spd
from services.policyd.schemas import PolicyDocument
from services.policyd.templates import TEMPLATES
from tests.unit.test_keymgr_api import FakeClient

ME4, ME6 = "10.0.0.1", "2001:db8::1"
NODE = NodeContext("n1", (ME4, ME6), secrets_dir="/run/secrets/ipsec", ca_dir="/etc/ipsec/ca")

TEMPLATE_PARAMS: dict[str, dict[str, Any]] = {
    "server-to-server": {
        "endpoints1": [ME4],
        "endpoints2": ["10.0.0.2", "10.9.0.0/24"],
        "auth": [{"method": "psk", "psk_ref": "s2s"}],
    },
    "tunnel": {
        "local_subnet": "10.1.0.0/16",
        "remote_subnet": "10.2.0.0/16",
        "local_gateway": ME4,
        "remote_gateway": "192.0.2.2",
        "auth": [{"method": "kerberos"}, {"method": "certificate", "ca": "corp"}],
    },
    "authentication-exemption": {"addresses": ["10.0.0.9"]},
    "isolation": {"exempt": ["10.0.0.10-10.0.0.20"], "auth": [{"method": "psk", "psk_ref": "x"}]},
}


def _doc(raw: dict[str, Any]) -> dict[str, Any]:
    """A document as policyd validates and exports it."""
    return PolicyDocument.model_validate(raw).model_dump()


def _key(
    version: int, src: str, dst: str, proto: int = 6, sport: int = 1, dport: int = 1
) -> FlowKey:
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    assert s.version == d.version == version
    return (version, s.packed, d.packed, proto, sport, dport)


def _first(c: CompiledPolicy, key: FlowKey) -> int | None:
    for i, e in enumerate(c.entries):
        if e.selector.matches(key):
            return i
    return None


def _policy(rules: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"name": "p", "assigned_to": ["n1"], "rules": rules, **extra}


PERMIT = {"name": "permit", "action": "permit"}
BLOCK = {"name": "block", "action": "block"}
REQUIRE = {
    "name": "require",
    "action": "negotiate",
    "security_methods": [
        {"protocol": "esp", "esp": "aes256gcm16", "lifetime_seconds": 1800},
        {"protocol": "esp", "esp": "aes128gcm16", "lifetime_seconds": 1800},
    ],
}
REQUEST = {**REQUIRE, "name": "request", "accept_unsecured": True, "allow_fallback": True}
PSK = [{"method": "psk", "psk_ref": "peer-b"}]


# -- templates ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_every_template_compiles(name: str) -> None:
    t = TEMPLATES[name]
    params = t.params.model_validate({**TEMPLATE_PARAMS.get(name, {}), "assigned_to": ["n1"]})
    doc = t.build(params).model_dump()
    c = compile_policy(doc, 7, NODE)
    assert c.revision == 7 and c.node == "n1" and c.entries
    assert len(c.entries) == len(c.origins)
    Spd().replace(list(c.entries), c.revision)  # the dataplane accepts it (ids, bundles)
    negotiates = any(e.action is Action.PROTECT for e in c.entries)
    exempt = [o.rule == "ike-exemption" and o.filter_index == -1 for o in c.origins]
    if negotiates:  # the built-in IKE exemptions come first
        n = exempt.count(True)
        assert n == 16 and exempt[:n] == [True] * n
    else:
        assert not any(exempt)
    for spec in c.connections:
        conn = connection_from_spec(spec)  # keymgr's validation accepts it
        assert conn.start_action in ("trap", "none")
    json.dumps(c.to_dict())  # serialisable
    # the same document from another node: nothing assigned
    assert not compile_policy(doc, 7, NodeContext("other", (ME4,))).entries


def test_default_kerberos_templates_report_it_and_make_no_connection() -> None:
    t = TEMPLATES["secure-server-require-security"]
    doc = t.build(t.params.model_validate({"assigned_to": ["n1"]})).model_dump()
    c = compile_policy(doc, 1, NODE)
    assert c.connections == ()
    items = {(u.rule, u.item): u.reason for u in c.unsupported}
    assert "kerberos" in items[("all-ip", "auth_methods[0]")]
    assert "no connection" in items[("all-ip", "auth_methods")]
    # require: PROTECT without the request flags
    protect = [e for e in c.entries if e.action is Action.PROTECT]
    assert protect and not any(e.accept_clear or e.clear_fallback for e in protect)


# -- ordering: a hypothesis property against a brute-force reference ----------------------------

V4_POOL = ["any", "me", "10.0.0.1", "10.0.0.2", "10.0.0.0/30", "10.0.0.0/29", "10.0.0.3-10.0.0.6"]
V6_POOL = ["any", "me", "2001:db8::1", "2001:db8::/126", "2001:db8::2-2001:db8::5"]
PORTS = [None, 53, 500, "50-60", "0-1000"]
PKT_PORTS = [53, 55, 500, 4500, 999, 5000]
# the node's own addresses weigh more: "me" and host filters meet there
PKT_V4 = [f"10.0.0.{i}" for i in range(8)] + ["192.0.2.1", ME4, ME4, ME4]
PKT_V6 = [f"2001:db8::{i}" for i in range(6)] + [ME6, ME6, ME6]


@st.composite
def filters(draw: st.DrawFn) -> dict[str, Any]:
    pool = draw(st.sampled_from([V4_POOL, V6_POOL]))
    src = draw(st.sampled_from(pool))
    dst = draw(st.sampled_from([a for a in pool if not (a == src == "me")]))
    proto = draw(st.sampled_from([None, 6, 17, 1]))
    f: dict[str, Any] = {"source": src, "destination": dst, "protocol": proto}
    if proto in (6, 17):
        f["source_port"] = draw(st.sampled_from(PORTS))
        f["destination_port"] = draw(st.sampled_from(PORTS))
    f["mirrored"] = draw(st.booleans())
    return f


@st.composite
def documents(draw: st.DrawFn) -> dict[str, Any]:
    n = draw(st.integers(1, 6))
    lists, rules = [], []
    for i in range(n):
        fl = draw(st.lists(filters(), min_size=1, max_size=3))
        lists.append({"name": f"fl{i}", "filters": fl})
        action = draw(st.sampled_from(["permit", "block", "require", "request"]))
        rule: dict[str, Any] = {"name": f"r{i}", "filter_list": f"fl{i}", "filter_action": action}
        if action in ("require", "request"):
            rule["auth_methods"] = PSK
        rule["enabled"] = draw(st.booleans()) or draw(st.booleans())
        rules.append(rule)
    rules.reverse()  # the document order, not the names, is the rule order
    return _doc(
        {
            "filter_lists": lists,
            "filter_actions": [PERMIT, BLOCK, REQUIRE, REQUEST],
            "policies": [_policy(rules)],
        }
    )


def _size(text: str, version: int) -> int | None:
    """The number of addresses of a filter side in ``version``; None: none of that version."""
    if text == "any":
        return 1 << (32 if version == 4 else 128)
    if text == "me":
        return 1
    if "/" in text:
        net = ipaddress.ip_network(text)
        return net.num_addresses if net.version == version else None
    if "-" in text:
        a, b = (ipaddress.ip_address(x) for x in text.split("-"))
        return int(b) - int(a) + 1 if a.version == version else None
    return 1 if ipaddress.ip_address(text).version == version else None


def _in(text: str, addr: str) -> bool:
    ip = ipaddress.ip_address(addr)
    if text == "any":
        return True
    if text == "me":
        return addr in (ME4, ME6)
    if "/" in text:
        net = ipaddress.ip_network(text)
        return net.version == ip.version and ip in net
    if "-" in text:
        a, b = (ipaddress.ip_address(x) for x in text.split("-"))
        return a.version == ip.version and int(a) <= int(ip) <= int(b)
    return ipaddress.ip_address(text) == ip


def _ports_of(value: Any) -> tuple[int, int]:
    if value is None:
        return 0, 65535
    if isinstance(value, int):
        return value, value
    a, b = value.split("-")
    return int(a), int(b)


def _reference(
    doc: dict[str, Any], pkt: tuple[int, str, str, int, int, int]
) -> tuple[str, int, bool] | None:
    """The winning (rule, filter, mirrored) by the documented rule, found by brute force."""
    version, src, dst, proto, sport, dport = pkt
    lists = {fl["name"]: fl["filters"] for fl in doc["filter_lists"]}
    actions = {fa["name"]: fa["action"] for fa in doc["filter_actions"]}
    rules = [r for r in doc["policies"][0]["rules"] if r["enabled"]]
    if any(actions[r["filter_action"]] == "negotiate" for r in rules):
        ike = proto == 17 and (sport in (500, 4500) or dport in (500, 4500))
        if ike and (src in (ME4, ME6) or dst in (ME4, ME6)):
            return ("ike-exemption", -1, False)
    best: tuple[tuple[int, ...], tuple[str, int, bool]] | None = None
    for order, r in enumerate(rules):
        for i, f in enumerate(lists[r["filter_list"]]):
            sides = [
                (False, f["source"], f["destination"], f["source_port"], f["destination_port"])
            ]
            if f["mirrored"]:
                sides.append(
                    (True, f["destination"], f["source"], f["destination_port"], f["source_port"])
                )
            for mirrored, s_t, d_t, sp, dp in sides:
                s_size, d_size = _size(s_t, version), _size(d_t, version)
                if s_size is None or d_size is None:
                    continue
                if not (_in(s_t, src) and _in(d_t, dst)):
                    continue
                if f["protocol"] is not None and f["protocol"] != proto:
                    continue
                (slo, shi), (dlo, dhi) = _ports_of(sp), _ports_of(dp)
                if not (slo <= sport <= shi and dlo <= dport <= dhi):
                    continue
                key = (
                    s_size * d_size,
                    0 if f["protocol"] is not None else 1,
                    (shi - slo + 1) * (dhi - dlo + 1),
                    order,
                    i,
                    int(mirrored),
                )
                if best is None or key < best[0]:
                    best = (key, (r["name"], i, mirrored))
    return None if best is None else best[1]


@st.composite
def packets(draw: st.DrawFn) -> tuple[int, str, str, int, int, int]:
    version = draw(st.sampled_from([4, 6]))
    pool = PKT_V4 if version == 4 else PKT_V6
    return (
        version,
        draw(st.sampled_from(pool)),
        draw(st.sampled_from(pool)),
        draw(st.sampled_from([6, 17, 1, 50])),
        draw(st.sampled_from(PKT_PORTS)),
        draw(st.sampled_from(PKT_PORTS)),
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=documents(), pkts=st.lists(packets(), min_size=1, max_size=20))
def test_first_matching_entry_is_the_most_specific_filter(
    doc: dict[str, Any], pkts: list[tuple[int, str, str, int, int, int]]
) -> None:
    c = compile_policy(doc, 1, NODE)
    for pkt in pkts:
        version, src, dst, proto, sport, dport = pkt
        i = _first(c, _key(version, src, dst, proto, sport, dport))
        want = _reference(doc, pkt)
        got = (
            None
            if i is None
            else (c.origins[i].rule, c.origins[i].filter_index, c.origins[i].mirrored)
        )
        if want is not None and want[0] != "ike-exemption" and got is not None:
            # a filter whose mirror is itself is compiled once, as the filter
            f = {fl["name"]: fl["filters"] for fl in doc["filter_lists"]}[
                next(r for r in doc["policies"][0]["rules"] if r["name"] == want[0])["filter_list"]
            ][want[1]]
            same = (f["source"], f["source_port"]) == (f["destination"], f["destination_port"])
            if same:
                want = (want[0], want[1], False)
        assert got == want, (pkt, got, want)


def test_order_most_specific_first_with_rule_order_as_tie_break() -> None:
    doc = _doc(
        {
            "filter_lists": [
                {"name": "wide", "filters": [{"source": "10.0.0.0/8", "destination": "any"}]},
                {"name": "narrow", "filters": [{"source": "10.1.0.0/16", "destination": "any"}]},
                {
                    "name": "web",
                    "filters": [
                        {"source": "10.0.0.0/8", "destination": "any", "protocol": "tcp"},
                        {
                            "source": "10.0.0.0/8",
                            "destination": "any",
                            "protocol": "tcp",
                            "destination_port": 80,
                        },
                    ],
                },
                {"name": "wide2", "filters": [{"source": "10.0.0.0/8", "destination": "any"}]},
            ],
            "filter_actions": [PERMIT, BLOCK],
            "policies": [
                _policy(
                    [
                        {"name": "a-wide", "filter_list": "wide", "filter_action": "block"},
                        {"name": "b-narrow", "filter_list": "narrow", "filter_action": "permit"},
                        {"name": "c-web", "filter_list": "web", "filter_action": "permit"},
                        {"name": "d-wide", "filter_list": "wide2", "filter_action": "permit"},
                    ]
                )
            ],
        }
    )
    c = compile_policy(doc, 1, NODE)
    forward = [(o.rule, o.filter_index) for o in c.origins if not o.mirrored]
    assert forward == [("b-narrow", 0), ("c-web", 1), ("c-web", 0), ("a-wide", 0), ("d-wide", 0)]
    assert [e.priority for e in c.entries] == sorted(e.priority for e in c.entries)


# -- mirrored, exemptions, me -------------------------------------------------------------------


def _one_rule(f: dict[str, Any], action: dict[str, Any], **rule: Any) -> dict[str, Any]:
    return _doc(
        {
            "filter_lists": [{"name": "fl", "filters": [f]}],
            "filter_actions": [action],
            "policies": [
                _policy(
                    [{"name": "r", "filter_list": "fl", "filter_action": action["name"], **rule}]
                )
            ],
        }
    )


@pytest.mark.parametrize("mirrored", [True, False])
def test_mirrored_filters_are_expanded_into_both_directions(mirrored: bool) -> None:
    f = {
        "source": "me",
        "destination": "10.0.0.0/24",
        "protocol": "tcp",
        "destination_port": 443,
        "mirrored": mirrored,
    }
    c = compile_policy(_one_rule(f, BLOCK), 1, NodeContext("n1", (ME4,)))
    out = _key(4, ME4, "10.0.0.7", 6, 40000, 443)
    back = _key(4, "10.0.0.7", ME4, 6, 443, 40000)
    assert _first(c, out) is not None
    assert (_first(c, back) is not None) is mirrored
    assert [o.mirrored for o in c.origins] == ([False, True] if mirrored else [False])
    if mirrored:
        s = c.entries[1].selector
        assert (str(s.src), str(s.dst), s.sport_lo, s.sport_hi, s.dport_lo, s.dport_hi) == (
            "10.0.0.0/24", "10.0.0.1/32", 443, 443, 0, 65535,
        )  # fmt: skip


def test_ike_exemptions_come_first_and_beat_a_host_specific_negotiate_rule() -> None:
    f = {"source": "me", "destination": "10.0.0.2"}
    c = compile_policy(_one_rule(f, REQUIRE, auth_methods=PSK), 1, NODE)
    n = sum(o.rule == "ike-exemption" for o in c.origins)
    assert n == 16  # 2 addresses x 2 ports x 2 directions x (source or destination port)
    assert all(e.action is Action.BYPASS for e in c.entries[:n])
    for sport, dport in ((500, 500), (4500, 4500), (5000, 4500), (500, 12345)):
        for src, dst in ((ME4, "10.0.0.2"), ("10.0.0.2", ME4)):
            i = _first(c, _key(4, src, dst, 17, sport, dport))
            assert i is not None and i < n and c.entries[i].action is Action.BYPASS
    i = _first(c, _key(4, ME4, "10.0.0.2", 17, 5000, 53))
    assert i is not None and c.entries[i].action is Action.PROTECT
    # no negotiate rule: no exemption (a block policy does not open UDP 500)
    c = compile_policy(_one_rule(f, BLOCK), 1, NODE)
    assert not any(o.rule == "ike-exemption" for o in c.origins)
    assert (
        c.entries[_first(c, _key(4, ME4, "10.0.0.2", 17, 500, 500)) or 0].action is Action.DISCARD
    )


def test_me_resolves_to_each_node_address() -> None:
    f = {"source": "me", "destination": "any"}
    c = compile_policy(_one_rule(f, BLOCK), 1, NodeContext("n1", (ME4, "10.0.0.5", ME6)))
    srcs = sorted(
        str(e.selector.src) for e, o in zip(c.entries, c.origins, strict=True) if not o.mirrored
    )
    assert srcs == ["10.0.0.1/32", "10.0.0.5/32", "2001:db8::1/128"]
    assert _first(c, _key(4, "10.0.0.5", "192.0.2.1")) is not None
    assert _first(c, _key(4, "10.0.0.6", "192.0.2.1")) is None
    # a node without addresses: "me" matches nothing, and that is reported
    c = compile_policy(_one_rule(f, BLOCK), 1, NodeContext("n1", ()))
    assert c.entries == ()
    assert any("matches nothing" in u.reason for u in c.unsupported)


def test_a_range_that_is_not_a_prefix_becomes_its_exact_cover() -> None:
    f = {"source": "me", "destination": "10.0.0.3-10.0.0.9", "mirrored": False}
    c = compile_policy(_one_rule(f, BLOCK), 1, NodeContext("n1", (ME4,)))
    assert [str(e.selector.dst) for e in c.entries] == ["10.0.0.3/32", "10.0.0.4/30", "10.0.0.8/31"]
    hits = [i for i in range(16) if _first(c, _key(4, ME4, f"10.0.0.{i}")) is not None]
    assert hits == list(range(3, 10))


def test_disabled_rules_are_skipped() -> None:
    c = compile_policy(_one_rule({"source": "me"}, BLOCK, enabled=False), 1, NODE)
    assert c.entries == () and c.conflicts == ()


# -- request / require --------------------------------------------------------------------------


def test_request_and_require_flags_on_protect_entries() -> None:
    f = {"source": "me", "destination": "10.0.0.2"}
    req = compile_policy(_one_rule(f, REQUEST, auth_methods=PSK), 1, NODE)
    strict = compile_policy(_one_rule(f, REQUIRE, auth_methods=PSK), 1, NODE)
    for c, flag in ((req, True), (strict, False)):
        protect = [e for e in c.entries if e.action is Action.PROTECT]
        assert protect and all(e.accept_clear is flag and e.clear_fallback is flag for e in protect)
        assert not any(
            e.accept_clear or e.clear_fallback for e in c.entries if e.action is not Action.PROTECT
        )
    # each flag alone: "accept unsecured" accepts clear inbound only; "allow fallback" also
    # sends clear while there is no SA, and so accepts the peer's clear answers too
    for extra, accept, fallback in (
        ({"accept_unsecured": True}, True, False),
        ({"allow_fallback": True}, True, True),
    ):
        action = {**REQUIRE, "name": "one", **extra}
        c = compile_policy(_one_rule(f, action, auth_methods=PSK), 1, NODE)
        protect = [e for e in c.entries if e.action is Action.PROTECT]
        assert protect and all(
            (e.accept_clear, e.clear_fallback) == (accept, fallback) for e in protect
        )
    respond = {**REQUEST, "name": "respond", "initiate": False}
    c = compile_policy(_one_rule(f, respond, auth_methods=PSK), 1, NODE)
    assert [s.start_action for s in c.connections] == ["none"]


# -- conflicts ----------------------------------------------------------------------------------


def _two(f1: dict[str, Any], a1: str, f2: dict[str, Any], a2: str) -> CompiledPolicy:
    doc = _doc(
        {
            "filter_lists": [{"name": "l1", "filters": [f1]}, {"name": "l2", "filters": [f2]}],
            "filter_actions": [PERMIT, BLOCK],
            "policies": [
                _policy(
                    [
                        {"name": "one", "filter_list": "l1", "filter_action": a1},
                        {"name": "two", "filter_list": "l2", "filter_action": a2},
                    ]
                )
            ],
        }
    )
    return compile_policy(doc, 1, NODE)


def test_conflicts_name_both_filters_the_overlap_and_the_winner() -> None:
    wide = {"source": "10.0.0.0/16", "destination": "any", "mirrored": False}
    narrow = {"source": "10.0.1.0/24", "destination": "any", "mirrored": False}
    c = _two(wide, "block", narrow, "permit")
    assert len(c.conflicts) == 1
    k = c.conflicts[0]
    assert (k.winner.rule, k.winner.action, k.loser.rule, k.loser.action) == (
        "two", "permit", "one", "block",
    )  # fmt: skip
    assert k.kind == "exception"
    assert (str(k.overlap.src), str(k.overlap.dst)) == ("10.0.1.0/24", "0.0.0.0/0")
    d = k.to_dict()
    assert d["winner"]["rule"] == "two" and d["overlap"]["source"] == "10.0.1.0/24"
    # equal selectors: the earlier rule wins
    c = _two(narrow, "block", narrow, "permit")
    assert [(k.kind, k.winner.rule, k.loser.rule) for k in c.conflicts] == [("equal", "one", "two")]
    # partial: ports on one, a protocol on the other
    p1 = {"source": "10.0.1.0/24", "destination": "any", "protocol": "tcp", "mirrored": False}
    p2 = {
        "source": "10.0.0.0/16",
        "destination": "any",
        "protocol": "tcp",
        "destination_port": 80,
        "mirrored": False,
    }
    c = _two(p1, "block", p2, "permit")
    assert [k.kind for k in c.conflicts] == ["partial"]
    o = c.conflicts[0].overlap
    assert (str(o.src), o.proto, o.dport_lo, o.dport_hi) == ("10.0.1.0/24", 6, 80, 80)
    # same action, or no overlap: no conflict
    assert _two(wide, "block", narrow, "block").conflicts == ()
    other = {"source": "10.9.0.0/16", "destination": "any", "mirrored": False}
    assert _two(wide, "block", other, "permit").conflicts == ()
    udp = {"source": "10.0.1.0/24", "destination": "any", "protocol": "udp", "mirrored": False}
    assert _two(p1, "block", udp, "permit").conflicts == ()


# -- negotiate -> keymgr connections ------------------------------------------------------------


def test_negotiate_rule_becomes_a_keymgr_connection() -> None:
    action = {
        "name": "strong",
        "action": "negotiate",
        "security_methods": [
            {"protocol": "esp", "esp": "aes256gcm16", "lifetime_seconds": 1800,
             "lifetime_kilobytes": 100000},
            {"protocol": "esp", "esp": "aes256-sha256", "lifetime_seconds": 1800,
             "lifetime_kilobytes": 100000},
        ],
        "session_key_pfs": True,
        "pfs_group": "ecp256",
    }  # fmt: skip
    doc = _doc(
        {
            "filter_lists": [
                {
                    "name": "subnets",
                    "filters": [
                        {"source": "10.1.0.0/24", "destination": "10.2.0.0/24"},
                        {"source": "10.1.1.0/24", "destination": "10.2.1.0-10.2.1.255"},
                    ],
                }
            ],
            "filter_actions": [action],
            "policies": [
                _policy(
                    [
                        {
                            "name": "gw",
                            "filter_list": "subnets",
                            "filter_action": "strong",
                            "auth_methods": [{"method": "psk", "psk_ref": "site-b/psk"}],
                            "tunnel_endpoint": "192.0.2.2",
                        }
                    ],
                    main_mode={
                        "proposals": ["aes256gcm16-prfsha384-ecp384", "aes128-sha256-x25519"],
                        "lifetime_minutes": 120,
                    },
                )
            ],
        }
    )
    c = compile_policy(doc, 4, NODE)
    assert len(c.connections) == 1
    spec = c.connections[0]
    conn = connection_from_spec(spec)
    assert isinstance(conn, Connection)
    assert (conn.name, conn.local_addr, conn.remote_addr, conn.mode) == (
        "p.gw", ME4, "192.0.2.2", "tunnel",
    )  # fmt: skip
    assert conn.start_action == "trap"
    assert conn.ike_proposals == ("aes256gcm16-prfsha384-ecp384", "aes128-sha256-x25519")
    assert conn.esp_proposals == ("aes256gcm16-ecp256", "aes256-sha256-ecp256")
    assert conn.ah_proposals == ()
    assert conn.auth == "psk" and conn.psk_file == pathlib.Path("/run/secrets/ipsec/site-b/psk")
    assert (conn.life_time, conn.rekey_time) == (1800.0, 1620.0)
    assert conn.rekey_bytes == 100000 * 1024 * 9 // 10
    assert conn.ike_rekey_time == 7200.0
    assert [(ch.local_ts, ch.remote_ts) for ch in conn.child_configs] == [
        ("10.1.0.0/24", "10.2.0.0/24"),
        ("10.1.1.0/24", "10.2.1.0/24"),
    ]
    # the PROTECT entries carry the reqid keymgr gives each child, and keymgr's own PROTECT
    # entry for that reqid has the compiled forward selector
    km = Keymgr(FakeClient(), (conn,))  # type: ignore[arg-type]
    for child, reqid in zip(spec.children, spec.reqids, strict=True):
        assert km._child_ids[(conn.name, child.name)][0] == reqid
        theirs = connection_spd(conn.child(child.name), reqid).selector
        ours = [
            e
            for e, o in zip(c.entries, c.origins, strict=True)
            if e.reqid == reqid and not o.mirrored
        ]
        assert [e.selector for e in ours] == [theirs]
        assert all(e.protocols == (50,) for e in ours)
    # the whole output is JSON without secrets
    text = json.dumps(c.to_dict())
    assert "/run/secrets/ipsec/site-b/psk" in text


def _negotiate_rule(name: str, fl: str) -> dict[str, Any]:
    return {"name": name, "filter_list": fl, "filter_action": "require", "auth_methods": PSK}


def test_transport_children_reqids_match_keymgr_for_several_connections() -> None:
    hosts = [f"10.0.0.{i}" for i in range(2, 5)]
    lists = [
        {"name": "a", "filters": [{"source": "me", "destination": h} for h in hosts]},
        {"name": "b", "filters": [{"source": "me", "destination": "10.0.0.9", "protocol": "tcp"}]},
    ]
    doc = _doc(
        {
            "filter_lists": lists,
            "filter_actions": [REQUIRE],
            "policies": [_policy([_negotiate_rule(n, fl) for n, fl in (("ra", "a"), ("rb", "b"))])],
        }
    )
    c = compile_policy(doc, 1, NodeContext("n1", (ME4,)))
    cfg = config_from_specs(c.connections)
    assert [x.remote_addr for x in cfg.connections] == [*hosts, "10.0.0.9"]
    assert all(x.mode == "transport" and x.local_addr == ME4 for x in cfg.connections)
    km = Keymgr(FakeClient(), cfg.connections)  # type: ignore[arg-type]
    for spec in c.connections:
        for child, reqid in zip(spec.children, spec.reqids, strict=True):
            assert km._child_ids[(spec.name, child.name)][0] == reqid
    for e, o in zip(c.entries, c.origins, strict=True):
        if e.action is Action.PROTECT:
            spec = next(s for s in c.connections if s.name == o.connection)
            assert e.reqid in spec.reqids


def test_more_children_than_keymgr_allows_are_split_into_connections() -> None:
    fl = [
        {"source": f"10.1.{i}.0/24", "destination": "10.2.0.0/16"} for i in range(MAX_CHILDREN + 3)
    ]
    doc = _doc(
        {
            "filter_lists": [{"name": "many", "filters": fl}],
            "filter_actions": [REQUIRE],
            "policies": [
                _policy(
                    [
                        {
                            "name": "gw",
                            "filter_list": "many",
                            "filter_action": "require",
                            "auth_methods": PSK,
                            "tunnel_endpoint": "192.0.2.2",
                        }
                    ]
                )
            ],
        }
    )
    c = compile_policy(doc, 1, NODE)
    assert [len(s.children) for s in c.connections] == [MAX_CHILDREN, 3]
    cfg = config_from_specs(c.connections)
    assert len({x.name for x in cfg.connections}) == 2
    km = Keymgr(FakeClient(), cfg.connections)  # type: ignore[arg-type]
    ids = [r for s in c.connections for r in s.reqids]
    assert len(set(ids)) == len(ids)
    assert all(REQID_BASE <= r < REQID_LIMIT for r in ids)
    for spec in c.connections:
        for child, reqid in zip(spec.children, spec.reqids, strict=True):
            assert km._child_ids[(spec.name, child.name)][0] == reqid


def test_certificate_and_ah_connections() -> None:
    ah = {
        "name": "ah",
        "action": "negotiate",
        "security_methods": [{"protocol": "ah", "ah": "sha384"}],
    }
    f = {"source": "me", "destination": "10.0.0.2"}
    ctx = NodeContext("n1", (ME4,), ca_files=(("Corp Root CA", "/pki/corp.pem"),))
    c = compile_policy(
        _one_rule(f, ah, auth_methods=[{"method": "certificate", "ca": "Corp Root CA"}]), 1, ctx
    )
    conn = connection_from_spec(c.connections[0])
    assert conn.auth == "pubkey" and conn.ca_files == (pathlib.Path("/pki/corp.pem"),)
    assert conn.cert_file == pathlib.Path(ctx.cert_file) and conn.remote_id == "%any"
    assert conn.ah_proposals == ("sha384",) and conn.mode == "transport"
    assert all(e.protocols == (51,) for e in c.entries if e.action is Action.PROTECT)


def test_unsupported_items_are_reported_not_dropped() -> None:
    bundle = {
        "name": "bundle",
        "action": "negotiate",
        "security_methods": [{"protocol": "esp+ah"}, {"protocol": "esp"}],
    }
    f = {"source": "me", "destination": "10.0.0.2"}
    c = compile_policy(
        _one_rule(f, bundle, auth_methods=PSK, connection_type="lan"),
        1,
        NODE,
    )
    reasons = " | ".join(f"{u.item}: {u.reason}" for u in c.unsupported)
    assert "ESP+AH" in reasons and "connection_type" in reasons
    assert c.connections == ()
    # the traffic is still PROTECT (never silently permitted), with the bundle's protocols
    protect = [e for e in c.entries if e.action is Action.PROTECT]
    assert protect and all(e.protocols == (50, 51) and e.reqid == 0 for e in protect)
    # kerberos only; a PSK reference that leaves the secrets directory; a CA without a file
    for auth, needle in (
        ([{"method": "kerberos"}], "kerberos"),
        ([{"method": "psk", "psk_ref": "a/../../etc/shadow"}], "not a secret name"),
        ([{"method": "certificate", "ca": "a/b"}], "no certificate file"),
    ):
        c = compile_policy(_one_rule(f, REQUIRE, auth_methods=auth), 1, NODE)
        assert c.connections == ()
        assert any(needle in u.reason for u in c.unsupported), auth
    # transport mode to a prefix: no single peer
    c = compile_policy(
        _one_rule({"source": "me", "destination": "10.0.0.0/24"}, REQUIRE, auth_methods=PSK),
        1,
        NODE,
    )
    assert c.connections == () and any("one peer address" in u.reason for u in c.unsupported)


# -- determinism and bad input ------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(doc=documents(), data=st.data())
def test_same_document_gives_equal_output(doc: dict[str, Any], data: st.DataObject) -> None:
    a = compile_policy(doc, 3, NODE)
    shuffled = copy.deepcopy(doc)
    shuffled["filter_lists"] = data.draw(st.permutations(shuffled["filter_lists"]))
    shuffled["filter_actions"] = data.draw(st.permutations(shuffled["filter_actions"]))
    b = compile_policy(shuffled, 3, NODE)
    assert a == b
    assert json.dumps(a.to_dict()) == json.dumps(b.to_dict())


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.pop("policies"),
        lambda d: d["policies"][0].pop("assigned_to"),
        lambda d: d["filter_lists"][0]["filters"][0].update(source=5),
        lambda d: d["filter_lists"][0]["filters"][0].update(source="10.0.0.300"),
        lambda d: d["filter_lists"][0]["filters"][0].update(destination="10.0.0.9-10.0.0.1"),
        lambda d: d["filter_lists"][0]["filters"][0].update(protocol=300),
        lambda d: d["filter_lists"][0]["filters"][0].update(destination_port="x"),
        lambda d: d["filter_lists"][0].update(filters="nope"),
        lambda d: d["filter_actions"][0].update(action="maybe"),
        lambda d: d["policies"][0]["rules"][0].update(name=None),
        lambda d: d.update(filter_actions=[1]),
        lambda d: d["policies"][0]["rules"][0].update(auth_methods=7),
        lambda d: d["filter_actions"][0].update(security_methods=[{"protocol": 5}]),
        lambda d: d["policies"][0]["rules"][0].update(tunnel_endpoint="nowhere"),
        lambda d: d["policies"][0].update(main_mode=None),
    ],
)
def test_a_malformed_document_is_a_compile_error(mutate: Any) -> None:
    f = {"source": "me", "destination": "10.0.0.2", "protocol": "tcp"}
    doc = _one_rule(f, REQUIRE, auth_methods=PSK)
    compile_policy(doc, 1, NODE)  # valid before the change
    mutate(doc)
    with pytest.raises(CompileError):
        compile_policy(doc, 1, NODE)


def test_missing_filter_list_is_reported() -> None:
    doc = _one_rule({"source": "me"}, BLOCK)
    doc["filter_lists"] = []
    c = compile_policy(doc, 1, NODE)
    assert c.entries == () and [u.item for u in c.unsupported] == ["filter_list"]


@pytest.mark.parametrize(
    ("first", "second", "src"),
    [
        ("me", ME4, ME4),  # "me" counts as one host
        ("10.0.0.4-10.0.0.7", "10.0.0.4/30", "10.0.0.5"),  # a range counts its addresses
        ("10.0.0.3-10.0.0.6", "10.0.0.4/30", "10.0.0.5"),  # ... even when it is no prefix
    ],
)
@pytest.mark.parametrize("swap", [False, True])
def test_equally_specific_filters_go_by_rule_order(
    first: str, second: str, src: str, swap: bool
) -> None:
    a, b = (second, first) if swap else (first, second)
    c = _two(
        {"source": a, "destination": "any", "mirrored": False},
        "block",
        {"source": b, "destination": "any", "mirrored": False},
        "permit",
    )
    i = _first(c, _key(4, src, "192.0.2.1"))
    assert i is not None and c.origins[i].rule == "one"
    assert [k.winner.rule for k in c.conflicts] == ["one"]


# -- the worker side of request / require -------------------------------------------------------


@pytest.mark.parametrize("fallback", [False, True])
def test_worker_sends_clear_on_fallback_only_and_still_acquires(fallback: bool) -> None:
    from scapy.all import ICMP, IP

    from services.core.engine import Dataplane
    from services.core.events import Acquire

    f = {"source": "me", "destination": "10.0.0.2"}
    action = REQUEST if fallback else REQUIRE
    c = compile_policy(_one_rule(f, action, auth_methods=PSK), 1, NodeContext("n1", (ME4,)))
    dp = Dataplane()
    dp.replace_spd(list(c.entries), c.revision)
    pkt = bytes(IP(src=ME4, dst="10.0.0.2") / ICMP())
    out = dp.outbound(pkt, 0.0)
    assert isinstance(dp.next_event(), Acquire)  # negotiation starts either way
    if fallback:
        assert out is not None and out.packet == pkt and dp.fallback_packets == 1
    else:
        assert out is None and dp.fallback_packets == 0


def test_request_flags_cross_the_worker_api() -> None:
    from services.dataplane.convert import (
        ConversionError,
        replace_spd_request,
        spd_entry_from_pb,
        spd_entry_to_pb,
        spd_from_pb,
    )

    f = {"source": "me", "destination": "10.0.0.2"}
    c = compile_policy(_one_rule(f, REQUEST, auth_methods=PSK), 5, NODE)
    entries, rev = spd_from_pb(replace_spd_request(c.entries, c.revision))
    assert (tuple(entries), rev) == (c.entries, 5)
    assert any(e.accept_clear and e.clear_fallback for e in entries)
    bypass = next(e for e in c.entries if e.action is Action.BYPASS)
    m = spd_entry_to_pb(bypass)
    m.clear_fallback = True
    with pytest.raises(ConversionError, match="PROTECT"):
        spd_entry_from_pb(m)


def test_exemptions_cover_a_local_tunnel_endpoint_outside_the_node_addresses() -> None:
    f = {"source": "10.1.0.0/16", "destination": "10.2.0.0/16"}
    doc = _one_rule(
        f,
        REQUIRE,
        auth_methods=PSK,
        tunnel_endpoint="192.0.2.2",
        local_tunnel_endpoint="198.51.100.7",
    )
    c = compile_policy(doc, 1, NodeContext("n1", (ME4,)))
    assert [s.local_addr for s in c.connections] == ["198.51.100.7"]
    i = _first(c, _key(4, "198.51.100.7", "192.0.2.2", 17, 500, 500))
    assert i is not None and c.origins[i].rule == "ike-exemption"
    # traffic between the subnets is protected, the other way round too (mirrored)
    for src, dst in (("10.1.2.3", "10.2.3.4"), ("10.2.3.4", "10.1.2.3")):
        i = _first(c, _key(4, src, dst))
        assert i is not None and c.entries[i].reqid == c.connections[0].reqids[0]


def test_transport_from_a_prefix_holding_the_node_is_reported() -> None:
    f = {"source": "10.0.0.0/24", "destination": "10.0.9.9"}
    c = compile_policy(_one_rule(f, REQUIRE, auth_methods=PSK), 1, NODE)
    assert c.connections == ()
    assert any("host to host" in u.reason for u in c.unsupported)


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out: list[tuple[Any, ...]] = [prefix] if prefix else []
    items = (
        obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else []
    )
    for k, v in items:
        out.extend(_paths(v, (*prefix, k)))
    return out


JUNK = [None, 0, -1, 1 << 70, "", "x", "10.0.0.1/33", "1-2-3", [], {}, [1], True, 1.5]


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_any_damaged_document_compiles_or_is_a_compile_error(data: st.DataObject) -> None:
    f = {"source": "me", "destination": "10.0.0.2-10.0.0.3", "protocol": "tcp", "source_port": 80}
    doc = _one_rule(f, REQUEST, auth_methods=PSK, tunnel_endpoint="192.0.2.2")
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(_paths(doc)))
        target = doc
        for k in path[:-1]:
            target = target[k]
        # a fresh copy: the junk lists and dicts must not be shared (nor grow into cycles)
        target[path[-1]] = copy.deepcopy(data.draw(st.sampled_from(JUNK)))
    try:
        c = compile_policy(doc, 1, NODE)
    except CompileError:
        return
    json.dumps(c.to_dict())


def _gateway_rules(names: list[str]) -> dict[str, Any]:
    """One tunnel rule per name, each to its own peer and its own remote network."""
    lists = [
        {"name": f"fl-{n}", "filters": [{"source": "10.1.0.0/24", "destination": f"10.{i}.0.0/24"}]}
        for i, n in enumerate(names, start=2)
    ]
    rules = [
        {
            "name": n,
            "filter_list": f"fl-{n}",
            "filter_action": "require",
            "auth_methods": PSK,
            "tunnel_endpoint": f"192.0.2.{i + 2}",
        }
        for i, n in enumerate(names)
    ]
    return _doc({"filter_lists": lists, "filter_actions": [REQUIRE], "policies": [_policy(rules)]})


def _reqids_by_connection(names: list[str]) -> dict[str, tuple[int, ...]]:
    c = compile_policy(_gateway_rules(names), 1, NODE)
    out = {s.name: s.reqids for s in c.connections}
    # the PROTECT entries carry them, and keymgr's configuration says them explicitly
    protect = {e.reqid for e in c.entries if e.action is Action.PROTECT}
    assert protect == {r for ids in out.values() for r in ids}
    cfg = config_from_specs(c.connections)
    assert cfg.reqids == out
    return out


def test_reqids_are_stable_when_rules_are_added_or_removed() -> None:
    base = _reqids_by_connection(["b", "c", "d"])
    assert len({r for ids in base.values() for r in ids}) == 3
    # a rule added before the others (it sorts and is listed first) shifts nothing
    grown = _reqids_by_connection(["a", "b", "c", "d"])
    assert {k: v for k, v in grown.items() if k in base} == base
    # removing one leaves the rest alone
    shrunk = _reqids_by_connection(["b", "d"])
    assert shrunk == {k: v for k, v in base.items() if k in shrunk}
    assert all(REQID_BASE <= r < REQID_LIMIT for ids in grown.values() for r in ids)


def test_stable_reqids_probe_on_collisions_deterministically() -> None:
    conns = [(f"c{i}", [f"c{i}", f"c{i}.1"]) for i in range(300)]
    ids = stable_reqids(conns)
    flat = [r for v in ids.values() for r in v]
    assert len(set(flat)) == len(flat) == 600
    assert stable_reqids(list(reversed(conns))) == ids  # the listed order does not matter
    # the same function of the names whatever else is there
    assert stable_reqids([("c7", ["c7", "c7.1"])])["c7"] == ids["c7"]


def test_stable_reqids_collision_takes_the_next_value(monkeypatch: pytest.MonkeyPatch) -> None:
    import services.core.policy as policy

    class Same:
        def __init__(self, _data: bytes) -> None:
            pass

        def digest(self) -> bytes:
            return bytes(32)

    monkeypatch.setattr(policy.hashlib, "sha256", Same)
    ids = stable_reqids([("b", ["b"]), ("a", ["a", "a.1"])])
    # every pair hashes alike: (connection, child) name order decides who probes
    assert ids == {"a": (REQID_BASE, REQID_BASE + 1), "b": (REQID_BASE + 2,)}
