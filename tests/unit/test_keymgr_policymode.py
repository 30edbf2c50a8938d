"""keymgr policy mode (services/keymgr/policymode.py): a compiled policy becomes keymgr's
connections with the compiler's reqids, each new revision is applied by Keymgr.reconfigure, a
policy keymgr refuses raises (so the watcher neither saves nor reports it) and the saved
state is enforced at start."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import pytest

from services.core.policy import compile_policy
from services.keymgr.config import ConfigError
from services.keymgr.daemon import Keymgr
from services.keymgr.policymode import PolicyFollower, connections_from_policy, state_file
from services.runtime.policywatch import PolicyState, digest, normalise, save_state
from tests.unit.test_keymgr_lifecycle import DeletingClient
from tests.unit.test_keymgr_responder import FakeStream
from tests.unit.test_policy_compiler import NODE, _gateway_rules

T = TypeVar("T")


def _policy(names: list[str], revision: int = 1) -> dict[str, Any]:
    return normalise(compile_policy(_gateway_rules(names), revision, NODE).to_dict())


def _state(policy: dict[str, Any]) -> PolicyState:
    return PolicyState(policy["revision"], digest(policy), policy)


class InlineKeymgr(Keymgr):
    """submit() runs the call at once (the tests have no main loop)."""

    def submit(self, fn: Callable[[float], T]) -> Future[T]:
        fut: Future[T] = Future()
        try:
            fut.set_result(fn(1.0))
        except Exception as e:
            fut.set_exception(e)
        return fut


def _km() -> tuple[InlineKeymgr, DeletingClient]:
    client = DeletingClient()
    km = InlineKeymgr(client, (), policy_mode=True)  # type: ignore[arg-type]
    km._stream = FakeStream()  # type: ignore[assignment]
    return km, client


def test_connections_carry_the_compiled_reqids() -> None:
    policy = _policy(["a", "b"])
    conns = connections_from_policy(json.loads(json.dumps(policy)))
    km, _ = _km()
    km.reconfigure(conns, 0.0)
    for spec in policy["connections"]:
        name = spec["config"]["name"]
        got = tuple(km._child_ids[(name, ch)][0] for ch in spec["child_names"])
        assert got == tuple(spec["reqids"])
    protect = {e["reqid"] for e in policy["entries"] if e["action"] == "protect"}
    assert protect == {r for s in policy["connections"] for r in s["reqids"]}


def test_a_bad_connection_is_refused_naming_it() -> None:
    policy = _policy(["a", "b"])
    policy["connections"][1]["config"]["mode"] = "sideways"
    with pytest.raises(ConfigError, match=r"policy connections\[1\]: .*mode"):
        connections_from_policy(policy)
    with pytest.raises(ConfigError, match="no usable connections list"):
        connections_from_policy({"entries": []})


def test_follower_applies_new_revisions_and_raises_for_bad_ones(
    caplog: pytest.LogCaptureFixture,
) -> None:
    km, client = _km()
    f = PolicyFollower(km)
    one = _policy(["a", "b"], 1)
    f.on_update(_state(one))
    assert [s.conn.name for s in km.sessions] == ["p.a", "p.b"] and km.policy_revision == 1
    two = _policy(["a", "b", "c"], 2)
    f.on_update(_state(two))
    assert [s.conn.name for s in km.sessions] == ["p.a", "p.b", "p.c"]
    assert (f.revision, km.policy_revision) == (2, 2)
    bad = _policy(["a"], 3)
    bad["connections"][0]["config"]["reqid"] = 0
    with pytest.raises(ConfigError):
        f.on_update(_state(bad))
    assert f.revision == 2 and km.policy_revision == 2 and f.failures == 1
    (rec,) = [r for r in caplog.records if r.getMessage() == "policy not enforced"]
    assert rec.revision == 3 and "reqid must be an integer" in rec.reason  # type: ignore[attr-defined]
    assert [s.conn.name for s in km.sessions] == ["p.a", "p.b", "p.c"]
    assert client.spd == []  # policy mode: never an SPD change


def test_saved_state_is_enforced_first(tmp_path: pathlib.Path) -> None:
    path = state_file(tmp_path, "node-1")
    assert path.name == "policy-node-1.json"
    assert state_file(tmp_path, "../x").parent == tmp_path
    km, _ = _km()
    f = PolicyFollower(km)
    assert f.initial(path) == ()
    policy = _policy(["a"], 5)
    save_state(path, _state(policy))
    conns = f.initial(path)
    assert [c.name for c in conns] == ["p.a"] and f.revision == 5
    km.reconfigure(conns, 0.0, revision=f.revision)
    f.on_update(_state(policy))  # the watcher's start: enforced already, nothing to do
    assert km.policy_revision == 5 and [s.conn.name for s in km.sessions] == ["p.a"]
