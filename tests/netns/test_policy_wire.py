"""What crosses the wire for every filter-action combination of the policy model.

One policyd, one keymgr driving two workers (node ``a`` in namespace A, node ``b`` in B, joined
by a veth pair 192.0.2.1 <-> 192.0.2.2; sites 10.1.0.1 and 10.2.0.1 on their loopbacks). Each
case applies one policy document over REST (``prune``: the previous case's policies go away),
waits until both workers and keymgr report the revision, pings across and classifies a capture
of A's link: clear ICMP, ESP, AH or nothing. keymgr negotiates between its two shards through
the real wire (IKEv2, PSK); tshark dissects every packet. The cases:

* permit / permit: clear both ways; block on A: nothing leaves A; block on B: A's clear
  requests arrive and B's inbound filter drops them (no reply);
* negotiate ESP and AH, tunnel and transport: only ESP / only AH on the wire;
* require on A, peer without IPsec: nothing (IKE only); with "allow fallback": clear;
* "accept unsecured, respond with IPsec" on A, a respond-only peer that talks clear first: the
  first request arrives clear, A answers through a negotiated SA (ESP), then ESP both ways;
* clear inbound to a "require" rule: dropped;
* ESP+AH bundles: reported unsupported by the compiler; the rule's traffic crosses nothing.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from services.demo import Demo, _run, _wait
from services.runtime import devpki

pytestmark = pytest.mark.netns

A_OUT, B_OUT = "192.0.2.1", "192.0.2.2"
A_SITE, B_SITE = "10.1.0.1", "10.2.0.1"
PSK_REF = "ab"


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    for tool in ("ip", "ping", "tcpdump", "tshark", "nft"):
        if shutil.which(tool) is None:
            return f"{tool} not installed"
    return None


@dataclass(frozen=True)
class Side:
    """One side's filter action (a filter action object without its name) and mode."""

    action: dict[str, Any]
    mode: str = "tunnel"  # or transport: the outer addresses are the protected ones


PERMIT = {"action": "permit"}
BLOCK = {"action": "block"}


def esp(**extra: Any) -> dict[str, Any]:
    return {
        "action": "negotiate",
        "security_methods": [{"protocol": "esp", "esp": "aes256gcm16"}],
        **extra,
    }


def ah(**extra: Any) -> dict[str, Any]:
    return {
        "action": "negotiate",
        "security_methods": [{"protocol": "ah", "ah": "sha256"}],
        **extra,
    }


def _side_policy(node: str, case: str, side: Side) -> tuple[dict[str, Any], ...]:
    """(filter list, filter action, policy) of one side for one case."""
    me, peer = (A_OUT, B_OUT) if node == "a" else (B_OUT, A_OUT)
    if side.mode == "transport":
        src, dst = me, peer
    else:
        src, dst = (A_SITE, B_SITE) if node == "a" else (B_SITE, A_SITE)
    name = f"{case}-{node}"
    fl = {
        "name": name,
        "filters": [{"source": src, "destination": dst, "protocol": "icmp"}],
    }
    fa = {"name": name, **side.action}
    rule: dict[str, Any] = {"name": case, "filter_list": name, "filter_action": name}
    if side.action["action"] == "negotiate":
        rule["auth_methods"] = [{"method": "psk", "psk_ref": PSK_REF}]
        if side.mode == "tunnel":
            rule["tunnel_endpoint"] = peer
    policy = {"name": f"p{node}", "assigned_to": [node], "rules": [rule]}
    return fl, fa, policy


def document(case: str, a: Side, b: Side) -> dict[str, Any]:
    fa_, aa, pa = _side_policy("a", case, a)
    fb, ab, pb = _side_policy("b", case, b)
    return {"filter_lists": [fa_, fb], "filter_actions": [aa, ab], "policies": [pa, pb]}


@dataclass(frozen=True)
class Wire:
    clear: int  # ICMP outside any ESP/AH
    esp: int
    ah: int
    ike: int = 0  # IKE datagrams (UDP 500/4500 without ESP)


class PolicyLab:
    def __init__(self) -> None:
        self.d = Demo(Path(tempfile.mkdtemp(prefix="policy-wire-")))

    def build(self) -> None:
        d = self.d
        for n, site in (("a", A_SITE), ("b", B_SITE)):
            _run(["ip", "netns", "add", d.ns(n)])
            d.namespaces.append(d.ns(n))
            _run(["ip", "-n", d.ns(n), "link", "set", "lo", "up"])
            _run(["ip", "-n", d.ns(n), "addr", "add", f"{site}/32", "dev", "lo"])
        _run(["ip", "-n", d.ns("a"), "link", "add", "wan0", "type", "veth", "peer", "name",
              "wan0", "netns", d.ns("b")])  # fmt: skip
        for n, out, peer_site, peer in (("a", A_OUT, B_SITE, B_OUT), ("b", B_OUT, A_SITE, A_OUT)):
            _run(["ip", "-n", d.ns(n), "addr", "add", f"{out}/24", "dev", "wan0"])
            _run(["ip", "-n", d.ns(n), "link", "set", "wan0", "up"])
            # what the worker sends in clear (permit) leaves through the main table
            _run(["ip", "-n", d.ns(n), "route", "add", f"{peer_site}/32", "via", peer])
        devpki.create(d.pki, ["policyd", "dataplane", "keymgr", "admin"])
        (d.workdir / "secrets").mkdir(mode=0o700)
        (d.workdir / "secrets" / PSK_REF).write_text(d.psk)
        d.start_policyd()
        d.start_worker("a", A_OUT, routes=(f"{B_SITE}/32", f"{B_OUT}/32"))
        d.start_worker("b", B_OUT, routes=(f"{A_SITE}/32", f"{A_OUT}/32"))
        d.start_keymgr(["a", "b"])

    def apply(self, doc: dict[str, Any]) -> int:
        res = self.d.rest("POST", "/v1/apply?prune=true", doc)
        revision = int(res["revision"])
        want = {("a", "a"), ("b", "b"), ("a", "keymgr"), ("b", "keymgr")}

        def current() -> bool:
            got = self.d.enforced()
            return all(got.get(k, (-1, ""))[0] >= revision for k in want)

        _wait(f"revision {revision} enforced by both workers and keymgr", current, 30)
        return revision

    def ping(self, src_node: str, mode: str, count: int) -> int:
        if mode == "transport":
            src, dst = (A_OUT, B_OUT) if src_node == "a" else (B_OUT, A_OUT)
        else:
            src, dst = (A_SITE, B_SITE) if src_node == "a" else (B_SITE, A_SITE)
        return self.d.ping(src_node, dst, count=count, src=src)

    @staticmethod
    def _icmp_filter(mode: str) -> str:
        if mode == "transport":
            return f"icmp and ip.addr == {B_OUT} and not esp and not ah"
        return f"icmp and ip.addr == {B_SITE} and not esp and not ah"

    def measure(self, name: str, src_node: str, mode: str, count: int = 4) -> tuple[int, Wire]:
        with self.d.capture("a", "wan0", name) as pcap:
            replies = self.ping(src_node, mode, count)
        return replies, Wire(
            clear=self.d.packets(pcap, self._icmp_filter(mode)),
            esp=self.d.packets(pcap, "esp"),
            ah=self.d.packets(pcap, "ah"),
            ike=self.d.packets(pcap, "isakmp"),
        )

    def close(self) -> None:
        self.d.cleanup()
        shutil.rmtree(self.d.workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def plab() -> Iterator[PolicyLab]:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    lab = PolicyLab()
    try:
        lab.build()
        yield lab
    except BaseException:
        for name in lab.d.procs:
            print(f"--- {name}\n{lab.d.log_tail(name, 30)}")
        raise
    finally:
        lab.close()


def _logs(plab: PolicyLab) -> str:
    return "\n".join(f"--- {n}\n{plab.d.log_tail(n, 20)}" for n in plab.d.procs)


def test_permit_both_ways_crosses_in_clear(plab: PolicyLab) -> None:
    plab.apply(document("permit", Side(PERMIT), Side(PERMIT)))
    replies, wire = plab.measure("permit", "a", "tunnel")
    assert replies == 4, _logs(plab)
    assert (wire.clear, wire.esp, wire.ah) == (8, 0, 0)


def test_block_on_the_sender_puts_nothing_on_the_wire(plab: PolicyLab) -> None:
    plab.apply(document("block-out", Side(BLOCK), Side(PERMIT)))
    replies, wire = plab.measure("block-out", "a", "tunnel")
    assert replies == 0
    assert (wire.clear, wire.esp, wire.ah) == (0, 0, 0)


def test_block_on_the_receiver_drops_clear_inbound(plab: PolicyLab) -> None:
    plab.apply(document("block-in", Side(PERMIT), Side(BLOCK)))
    replies, wire = plab.measure("block-in", "a", "tunnel")
    assert replies == 0
    assert (wire.clear, wire.esp, wire.ah) == (4, 0, 0)  # A's requests only: B answers none


@pytest.mark.parametrize(
    ("case", "make", "mode"),
    [
        ("esp-tunnel", esp, "tunnel"),
        ("esp-transport", esp, "transport"),
        ("ah-tunnel", ah, "tunnel"),
        ("ah-transport", ah, "transport"),
    ],
)
def test_negotiate_puts_only_esp_or_ah_on_the_wire(
    plab: PolicyLab, case: str, make: Any, mode: str
) -> None:
    plab.apply(document(case, Side(make(), mode), Side(make(), mode)))
    # the first packets start the negotiation (the worker's ACQUIRE); then all must pass
    _wait(f"{case}: tunnel up", lambda: plab.ping("a", mode, 1) == 1, 20, step=0.5)
    replies, wire = plab.measure(case, "a", mode)
    assert replies == 4, _logs(plab)
    assert wire.clear == 0
    if make is esp:
        assert (wire.esp >= 8, wire.ah) == (True, 0)
    else:
        assert (wire.ah >= 8, wire.esp) == (True, 0)


def test_require_without_a_peer_that_negotiates_puts_nothing_on_the_wire(
    plab: PolicyLab,
) -> None:
    plab.apply(document("require", Side(esp()), Side(PERMIT)))
    replies, wire = plab.measure("require", "a", "tunnel")
    assert replies == 0
    assert (wire.clear, wire.esp, wire.ah) == (0, 0, 0)


def test_allow_fallback_talks_clear_to_a_peer_without_ipsec(plab: PolicyLab) -> None:
    plab.apply(document("fallback", Side(esp(allow_fallback=True)), Side(PERMIT)))
    replies, wire = plab.measure("fallback", "a", "tunnel")
    assert replies == 4, _logs(plab)
    assert (wire.clear, wire.esp, wire.ah) == (8, 0, 0)


def test_clear_inbound_to_a_require_rule_is_dropped(plab: PolicyLab) -> None:
    plab.apply(document("require-in", Side(esp()), Side(PERMIT)))
    replies, wire = plab.measure("require-in", "b", "tunnel")
    assert replies == 0
    # B's requests and nothing else: A dropped them on arrival, so it never answered and never
    # started a negotiation to protect an answer
    assert wire == Wire(clear=4, esp=0, ah=0, ike=0)


def test_accept_unsecured_answers_a_clear_request_through_ipsec(plab: PolicyLab) -> None:
    respond_only = esp(initiate=False, accept_unsecured=True, allow_fallback=True)
    plab.apply(document("request", Side(esp(accept_unsecured=True)), Side(respond_only)))
    # B (respond only, fallback) talks clear first; A accepts it and answers with IPsec
    replies, first = plab.measure("request-first", "b", "tunnel", count=1)
    assert first.clear >= 1 and replies == 0
    _wait("request: tunnel up", lambda: plab.ping("b", "tunnel", 1) == 1, 20, step=0.5)
    replies, wire = plab.measure("request", "b", "tunnel")
    assert replies == 4, _logs(plab)
    assert (wire.clear, wire.esp >= 8) == (0, True)


def test_esp_plus_ah_is_reported_unsupported_and_crosses_nothing(plab: PolicyLab) -> None:
    both = {
        "action": "negotiate",
        "security_methods": [{"protocol": "esp+ah", "esp": "aes256gcm16", "ah": "sha256"}],
    }
    plab.apply(document("esp-ah", Side(both), Side(both)))
    compiled = plab.d.rest("GET", f"/v1/compiled?node=a&addresses={A_OUT}")
    assert any("ESP+AH" in u["reason"] for u in compiled["unsupported"])
    replies, wire = plab.measure("esp-ah", "a", "tunnel")
    assert replies == 0
    assert (wire.clear, wire.esp, wire.ah) == (0, 0, 0)
