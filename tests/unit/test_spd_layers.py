"""The engine's two SPD layers (services.core.engine, docs/design.md "SPD layers"): keymgr's
entries first, then policyd's, each layer with its own revision; lookups, ACQUIRE and the flow
cache work on the merged SPD; GetStats carries both revisions."""

from __future__ import annotations

import ipaddress
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.core.engine import POLICY_ID_BASE, BatchRejected, Dataplane
from services.core.events import Acquire, DropReason
from services.core.iana import IpProto
from services.core.packet import build_ipv4
from services.core.selectors import Selector
from services.core.spd import Action, SpdEntry
from services.dataplane.client import DataplaneClient
from services.dataplane.grpc_api import GrpcServer, load_server_credentials
from services.dataplane.worker import EngineHost, policy_updater
from services.runtime import devpki
from services.runtime.policywatch import PolicyState


def _pkt(src: str, dst: str, sport: int = 1000, dport: int = 2000) -> bytes:
    body = sport.to_bytes(2, "big") + dport.to_bytes(2, "big") + b"\x00\x0c\x00\x00data"
    a = ipaddress.ip_address
    return build_ipv4(a(src).packed, a(dst).packed, IpProto.UDP, len(body)) + body


def entry(
    pid: int, action: Action, src: str, dst: str, *, prio: int = 10, reqid: int = 0
) -> SpdEntry:
    return SpdEntry(pid, prio, action, Selector.make(src, dst), reqid or pid)


def test_keymgr_layer_comes_first_whatever_the_priorities() -> None:
    dp = Dataplane()
    dp.replace_policy([entry(1, Action.DISCARD, "10.1.0.0/16", "10.2.0.0/16", prio=1)], 7)
    dp.replace_spd([entry(1, Action.BYPASS, "10.1.0.0/16", "10.2.0.0/16", prio=500)], 3)
    out = dp.outbound(_pkt("10.1.0.1", "10.2.0.1"), 0.0)
    assert out is not None and dp.bypass_packets == 1  # keymgr's entry wins
    assert [e.policy_id for e in dp.spd.entries] == [1, POLICY_ID_BASE + 1]
    assert [e.priority for e in dp.spd.entries] == [500, 1]  # the rank decides, not these
    assert dp.spd.revision == 3 and dp.policy_revision == 7
    # the policy layer decides what keymgr does not cover
    assert dp.outbound(_pkt("10.1.0.1", "10.3.0.1"), 0.0) is None
    assert dp.drops[DropReason.NO_POLICY] == 1


def test_each_layer_keeps_its_priority_order() -> None:
    dp = Dataplane()
    dp.replace_policy(
        [
            entry(2, Action.BYPASS, "10.1.0.0/16", "10.2.0.0/16", prio=2),
            entry(1, Action.DISCARD, "10.1.0.0/16", "10.2.0.5/32", prio=1),
        ],
        1,
    )
    dp.replace_spd(
        [
            entry(9, Action.DISCARD, "10.1.0.0/16", "10.9.0.0/16", prio=20),
            entry(8, Action.BYPASS, "10.1.0.0/16", "10.9.0.7/32", prio=5),
        ],
        1,
    )
    ids = [e.policy_id for e in dp.spd.entries]
    assert ids == [8, 9, POLICY_ID_BASE + 1, POLICY_ID_BASE + 2]
    assert dp.outbound(_pkt("10.1.0.1", "10.2.0.5"), 0.0) is None  # policy DISCARD first
    assert dp.outbound(_pkt("10.1.0.1", "10.2.0.6"), 0.0) is not None
    assert dp.outbound(_pkt("10.1.0.1", "10.9.0.7"), 0.0) is not None  # keymgr BYPASS first
    assert dp.outbound(_pkt("10.1.0.1", "10.9.0.8"), 0.0) is None


def test_revisions_are_per_layer_and_never_go_back() -> None:
    dp = Dataplane()
    dp.replace_spd([], 10)
    dp.replace_policy([entry(1, Action.BYPASS, "10.1.0.0/16", "10.2.0.0/16")], 2)
    assert (dp.spd.revision, dp.policy_revision) == (10, 2)  # keymgr's revision unchanged
    with pytest.raises(ValueError, match="older"):
        dp.replace_policy([], 1)
    with pytest.raises(ValueError, match="older"):
        dp.replace_spd([], 9)
    dp.replace_policy([], 2)  # the same revision again is fine
    assert dp.policy_entries == () and dp.spd.entries == ()
    # a stale keymgr batch is refused as before, the policy layer does not count
    with pytest.raises(BatchRejected):
        dp.apply_batch([], [], ([], 5), 0.0)


def test_a_refused_policy_changes_nothing() -> None:
    dp = Dataplane()
    good = [entry(1, Action.BYPASS, "10.1.0.0/16", "10.2.0.0/16")]
    dp.replace_policy(good, 3)
    before = dp.spd.entries
    dup = [good[0], entry(1, Action.DISCARD, "10.1.0.0/16", "10.3.0.0/16")]
    with pytest.raises(ValueError, match="duplicate"):
        dp.replace_policy(dup, 4)
    with pytest.raises(ValueError, match="out of range"):
        dp.replace_policy([entry(POLICY_ID_BASE, Action.BYPASS, "10.1.0.0/16", "0.0.0.0/0")], 4)
    bad = SpdEntry(2, 1, Action.PROTECT, Selector.make("10.1.0.0/16", "10.2.0.0/16"), 1, (6,))
    with pytest.raises(ValueError, match="protocols"):
        dp.replace_policy([bad], 4)
    assert dp.spd.entries is before and dp.policy_revision == 3


def test_flow_cache_follows_either_layer() -> None:
    dp = Dataplane()
    p = _pkt("10.1.0.1", "10.2.0.1")
    dp.replace_policy([entry(1, Action.BYPASS, "10.1.0.0/16", "10.2.0.0/16")], 1)
    assert dp.outbound(p, 0.0) is not None
    assert dp.outbound(p, 0.0) is not None and dp.spd.cache_hits >= 1
    dp.replace_policy([entry(1, Action.DISCARD, "10.1.0.0/16", "10.2.0.0/16")], 2)
    assert dp.outbound(p, 0.0) is None  # not the cached BYPASS
    dp.replace_spd([entry(5, Action.BYPASS, "10.1.0.1/32", "10.2.0.1/32")], 1)
    assert dp.outbound(p, 0.0) is not None
    dp.replace_spd([], 2)
    assert dp.outbound(p, 0.0) is None
    assert dp.drops[DropReason.POLICY_DISCARD] == 2


def test_acquire_from_a_policy_entry_names_the_merged_id() -> None:
    dp = Dataplane()
    dp.replace_policy(
        [entry(3, Action.PROTECT, "10.1.0.0/16", "10.2.0.0/16", reqid=42)],
        1,
    )
    assert dp.outbound(_pkt("10.1.0.1", "10.2.0.1"), 0.0) is None
    ev = dp.next_event()
    assert isinstance(ev, Acquire)
    assert (ev.policy_id, ev.reqid) == (POLICY_ID_BASE + 3, 42)
    assert dp.drops[DropReason.NO_OUTBOUND_SA] == 1


def _policy(revision: int, entries: list[dict[str, object]]) -> PolicyState:
    return PolicyState(revision, "d", {"revision": revision, "entries": entries})


def _entry_json(pid: int, action: str) -> dict[str, object]:
    return {
        "policy_id": pid,
        "priority": pid,
        "action": action,
        "source": "10.1.0.0/16",
        "destination": "10.2.0.0/16",
        "protocol": 0,
        "source_ports": [0, 65535],
        "destination_ports": [0, 65535],
        "reqid": 0,
        "protocols": [50],
        "accept_clear": False,
        "clear_fallback": False,
    }


def test_policy_updater_replaces_the_layer_and_refuses_malformed() -> None:
    host = EngineHost("w")
    update = policy_updater(host)
    update(_policy(4, [_entry_json(1, "bypass")]))
    assert host.engine.policy_revision == 4
    assert host.stats().policy_revision == 4
    broken = _entry_json(2, "bypass")
    del broken["source"]
    with pytest.raises(ValueError, match="malformed"):
        update(_policy(5, [broken]))
    with pytest.raises(ValueError):
        update(_policy(6, [_entry_json(2, "teleport")]))  # unknown action
    assert host.engine.policy_revision == 4
    assert [e.action for e in host.engine.spd.entries] == [Action.BYPASS]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    devpki.create(d)
    return d


@pytest.fixture
def served(pki: Path) -> Iterator[tuple[EngineHost, DataplaneClient]]:
    d = tempfile.mkdtemp(prefix="dpl", dir="/tmp")
    target = f"unix:{d}/worker.sock"
    host = EngineHost("w-layers")
    server = GrpcServer(host, target, load_server_credentials(pki))
    server.start()
    client = DataplaneClient(target, pki, server_name="server", client_name="client", timeout=10)
    try:
        yield host, client
    finally:
        client.close()
        server.stop(0)
        shutil.rmtree(d, ignore_errors=True)


def test_get_stats_carries_both_revisions(served: tuple[EngineHost, DataplaneClient]) -> None:
    host, client = served
    client.replace_spd([entry(1, Action.BYPASS, "10.1.0.0/16", "10.2.0.0/16")], 5)
    with host.locked() as eng:
        eng.replace_policy([entry(1, Action.DISCARD, "10.1.0.0/16", "10.3.0.0/16")], 9)
    host.set_filter_counters({"nomatch": 3})
    st = client.stats()
    assert (st.spd_revision, st.policy_revision) == (5, 9)
    assert st.inbound_filter == {"nomatch": 3}
    # ReplaceSPD keeps its own revision check and leaves the policy layer alone
    client.replace_spd([], 6)
    assert [e.policy_id for e in host.engine.spd.entries] == [POLICY_ID_BASE + 1]


def test_policy_entries_with_out_of_range_selectors_are_refused() -> None:
    """spd_entries builds selectors without Selector.make's checks; the engine checks."""
    dp = Dataplane()
    ok = Selector.make("10.1.0.0/16", "10.2.0.0/16")
    for sel in (
        Selector(ok.src, ok.dst, 256),
        Selector(ok.src, ok.dst, 6, 5, 4),
        Selector(ok.src, ok.dst, 6, 0, 65535, 0, 70000),
        Selector(ok.src, ok.dst, 6, -1, 10),
    ):
        with pytest.raises(ValueError, match="policy 1"):
            dp.replace_policy([SpdEntry(1, 1, Action.BYPASS, sel)], 1)
    assert dp.spd.entries == () and dp.policy_revision == 0


def test_colliding_ids_between_the_layers_are_refused() -> None:
    dp = Dataplane()
    dp.replace_spd([entry(POLICY_ID_BASE + 1, Action.BYPASS, "10.1.0.0/16", "10.9.0.0/16")], 1)
    with pytest.raises(ValueError, match="policy layer"):
        dp.replace_policy([entry(1, Action.DISCARD, "10.1.0.0/16", "10.2.0.0/16")], 1)
    assert dp.policy_revision == 0 and len(dp.spd.entries) == 1
    dp.replace_policy([entry(2, Action.DISCARD, "10.1.0.0/16", "10.2.0.0/16")], 1)
    with pytest.raises(ValueError, match="below"):
        dp.replace_spd([entry(POLICY_ID_BASE + 2, Action.BYPASS, "10.1.0.0/16", "0.0.0.0/0")], 2)
    assert dp.spd.revision == 1 and len(dp.spd.entries) == 2


def test_policy_updater_reloads_the_inbound_filter_before_the_revision_counts() -> None:
    """The watcher reports a revision once on_update returned: the inbound filter must be
    loaded by then (``after``), and a failed load must make on_update fail."""
    host = EngineHost("w")
    seen: list[int] = []
    update = policy_updater(host, after=lambda: seen.append(host.engine.policy_revision))
    update(_policy(4, [_entry_json(1, "bypass")]))
    assert seen == [4]

    def broken() -> None:
        raise RuntimeError("nft failed")

    with pytest.raises(RuntimeError):
        policy_updater(host, after=broken)(_policy(5, [_entry_json(1, "bypass")]))
