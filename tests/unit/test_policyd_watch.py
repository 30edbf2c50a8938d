"""policyd's watch stream (gRPC PolicyWatch) and its consumer library: policyd in process
(REST writes through FastAPI's TestClient) with a real gRPC server on a unix socket, mutual TLS.
Every policy a consumer rebuilds from snapshots and deltas is compared with a full compilation
of the exported document (the oracle: services.core.policy.compile_policy)."""

from __future__ import annotations

import json
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from services.core.policy import CompiledPolicy, NodeContext, compile_policy
from services.keymgr.config import connection_from_dict
from services.pb.ipsec.v1 import policy_pb2 as pb
from services.pb.ipsec.v1 import policy_pb2_grpc as pb_grpc
from services.policyd.api import create_app
from services.policyd.auth import TokenStore
from services.policyd.watch import WatchHub, WatchServer
from services.runtime import devpki, tls
from services.runtime.policywatch import (
    DeltaError,
    PolicyState,
    PolicyWatcher,
    apply_delta,
    canonical,
    check_delta,
    connection_configs,
    diff,
    digest,
    load_state,
    mtls_channel_factory,
    normalise,
    save_state,
    spd_entries,
)
from tests.unit.policyd_support import ADMIN, READER, TOKENS, db_url, engine, pg_server  # noqa: F401 - fixtures
from tests.unit.test_policyd_server import Policyd

NODE = "gw-a"
ADDRS = ("192.0.2.1", "2001:db8::1")
SECRET = b"very-secret-psk-value-0123456789"
TUNNEL = {
    "prefix": "gw",
    "local_subnet": "10.1.0.0/16",
    "remote_subnet": "10.2.0.0/16",
    "local_gateway": "192.0.2.1",
    "remote_gateway": "192.0.2.2",
    "auth": [{"method": "psk", "psk_ref": "site-b"}],
    "assigned_to": [NODE],
}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    devpki.create(d, ["server", "client"])
    return d


@dataclass
class Env:
    engine: Engine
    hub: WatchHub
    api: TestClient
    pki: Path
    sockdir: Path
    secrets: Path
    servers: list[WatchServer] = field(default_factory=list)
    watchers: list[PolicyWatcher] = field(default_factory=list)

    @property
    def target(self) -> str:
        return f"unix:{self.sockdir / 'watch.sock'}"

    def serve(self, hub: WatchHub | None = None, name: str = "watch.sock") -> WatchServer:
        creds = tls.server_credentials(self.pki)
        server = WatchServer(hub or self.hub, f"unix:{self.sockdir / name}", creds, max_streams=8)
        server.start()
        self.servers.append(server)
        return server

    def channel(self, name: str = "watch.sock") -> grpc.Channel:
        return mtls_channel_factory(f"unix:{self.sockdir / name}", self.pki)()

    def watcher(
        self, state_file: Path, on_update: Callable[[PolicyState], None] | None = None, **kw: Any
    ) -> PolicyWatcher:
        name = kw.pop("sock", "watch.sock")
        w = PolicyWatcher(
            mtls_channel_factory(f"unix:{self.sockdir / name}", self.pki),
            node=kw.pop("node", NODE),
            component=kw.pop("component", "keymgr"),
            addresses=kw.pop("addresses", ADDRS),
            state_file=state_file,
            on_update=on_update,
            backoff=(0.05, 0.3),
        )
        self.watchers.append(w)
        return w

    def compiled(self, addresses: tuple[str, ...] = ADDRS) -> CompiledPolicy:
        """The full compilation of the current document (independent of the stream)."""
        doc = self.api.get("/v1/document", headers=READER).json()
        rev = doc.pop("revision")
        ctx = NodeContext(NODE, addresses, secrets_dir=str(self.secrets))
        return compile_policy(doc, rev, ctx)

    def oracle(self, addresses: tuple[str, ...] = ADDRS) -> dict[str, Any]:
        return normalise(self.compiled(addresses).to_dict())

    def check(self, state: PolicyState | None) -> None:
        """``state`` is the current compilation: as a document, as SPD entries and as
        keymgr connections."""
        full = self.compiled()
        assert state is not None and state.policy == normalise(full.to_dict())
        assert state.revision == full.revision and state.digest == digest(full.to_dict())
        assert spd_entries(state.policy) == full.entries
        configs = connection_configs(state.policy)
        assert configs == [normalise(c.config()) for c in full.connections]
        for cfg in configs:
            connection_from_dict(cfg)  # keymgr accepts it

    def revision(self) -> int:
        rev: int = self.api.get("/v1/revision", headers=READER).json()["revision"]
        return rev


@pytest.fixture
def env(pki: Path, tmp_path: Path, engine: Engine) -> Iterator[Env]:
    """policyd on a fresh database of each backend (SQLite, PostgreSQL)."""
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "site-b").write_bytes(SECRET)
    hub = WatchHub(engine, secrets_dir=str(secrets), poll_interval=0.1)
    sockdir = Path(tempfile.mkdtemp(prefix="pw-"))  # short: unix socket paths are limited
    app = create_app(engine, TokenStore.from_mapping(TOKENS), secrets_dir=str(secrets), hub=hub)
    with TestClient(app) as api:
        e = Env(engine, hub, api, pki, sockdir, secrets)
        try:
            yield e
        finally:
            for w in e.watchers:
                w.stop()
            for s in e.servers:
                s.stop(0)
            shutil.rmtree(sockdir, ignore_errors=True)


def wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError("timed out")


def tunnel(env: Env, **kw: Any) -> None:
    r = env.api.post("/v1/templates/tunnel", json={**TUNNEL, **kw}, headers=ADMIN)
    assert r.status_code == 200, r.text


def exemption(env: Env, prefix: str, *addresses: str) -> None:
    body = {"prefix": prefix, "addresses": list(addresses), "assigned_to": [NODE]}
    r = env.api.post("/v1/templates/authentication-exemption", json=body, headers=ADMIN)
    assert r.status_code == 200, r.text


def set_rule_enabled(env: Env, policy: str, rule: str, enabled: bool) -> None:
    r = env.api.get(f"/v1/policies/{policy}/rules/{rule}", headers=READER)
    assert r.status_code == 200, r.text
    body = {k: v for k, v in r.json().items() if k not in ("revision", "policy")}
    body["enabled"] = enabled
    r = env.api.put(
        f"/v1/policies/{policy}/rules/{rule}",
        json=body,
        headers={**ADMIN, "If-Match": r.headers["ETag"]},
    )
    assert r.status_code == 200, r.text


def delete_policy(env: Env, name: str) -> None:
    r = env.api.delete(f"/v1/policies/{name}", headers={**ADMIN, "If-Match": "*"})
    assert r.status_code == 204, r.text


def read_stream(
    stub: pb_grpc.PolicyWatchStub, req: pb.WatchRequest, n: int, timeout: float
) -> list[pb.PolicyUpdate]:
    """Up to ``n`` updates within ``timeout`` seconds."""
    out: list[pb.PolicyUpdate] = []
    call = stub.Watch(req, timeout=timeout)
    try:
        for u in call:
            out.append(u)
            if len(out) == n:
                call.cancel()
                break
    except grpc.RpcError as e:
        assert e.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED), e
    return out


# -- the delta format --------------------------------------------------------------------------


def _random_policy(rng: random.Random, revision: int) -> dict[str, Any]:
    pool = [{"action": a, "source": f"10.0.{i}.0/24"} for i in range(12) for a in ("p", "d")]
    entries = [dict(e) for e in rng.sample(pool, rng.randrange(0, 10))]
    if entries and rng.random() < 0.3:
        entries.append(dict(entries[0]))  # a repeated item (keyed #1)
    return {
        "revision": revision,
        "node": NODE,
        "entries": [{**e, "policy_id": i + 1, "priority": i + 1} for i, e in enumerate(entries)],
        "connections": [
            {"config": {"name": f"c{i}"}} for i in rng.sample(range(6), rng.randrange(4))
        ],
        "conflicts": [],
        "unsupported": [{"item": f"u{i}"} for i in rng.sample(range(5), rng.randrange(3))],
    }


def _kept_in_same_order(old: list[Any], new: list[Any]) -> bool:
    """Whether the items in both lists come in the same relative order (by content)."""
    strip = [{k: v for k, v in x.items() if k not in ("policy_id", "priority")} for x in old]
    strip_new = [{k: v for k, v in x.items() if k not in ("policy_id", "priority")} for x in new]

    def kept(a: list[Any], b: list[Any]) -> list[Any]:
        left = list(b)
        out = []
        for x in a:  # with repeats: as many as the other list has
            if x in left:
                left.remove(x)
                out.append(x)
        return out

    return kept(strip, strip_new) == kept(strip_new, strip)


def test_delta_rebuilds_the_new_policy_exactly() -> None:
    rng = random.Random(7)
    applied = refused = 0
    for _ in range(400):
        old, new = _random_policy(rng, 3), _random_policy(rng, 4)
        delta = diff(old, new)
        if all(
            _kept_in_same_order(old[k], new[k]) for k in ("entries", "connections", "unsupported")
        ):
            assert apply_delta(old, delta, 4) == new
            assert check_delta(old, new, delta)
            applied += 1
        else:  # kept items moved: a positional delta cannot say so; policyd sends a snapshot
            assert not check_delta(old, new, delta)
            refused += 1
    assert applied > 50 and refused > 50


def test_a_delta_that_does_not_apply_is_refused() -> None:
    rng = random.Random(3)
    old = _random_policy(rng, 1)
    old["entries"] = old["entries"][:2] or [{"action": "p", "policy_id": 1, "priority": 1}]
    new = {**old, "revision": 2, "entries": []}
    delta = diff(old, new)
    other = {**old, "entries": [{"action": "x", "policy_id": 1, "priority": 1}]}
    with pytest.raises(DeltaError):
        apply_delta(other, delta, 2)
    bad = pb.PolicyDelta()
    bad.entries.added.add(key="k", position=50, json=b"{}")
    with pytest.raises(DeltaError):
        apply_delta(old, bad, 2)
    bad = pb.PolicyDelta()
    bad.entries.added.add(key="k", position=0, json=b"not json")
    with pytest.raises(DeltaError):
        apply_delta(old, bad, 2)


def test_state_file_is_atomic_and_checked(tmp_path: Path) -> None:
    policy = _random_policy(random.Random(1), 5)
    path = tmp_path / "state" / "policy.json"
    save_state(path, PolicyState(5, digest(policy), policy))
    assert load_state(path) == PolicyState(5, digest(policy), normalise(policy))
    assert [p.name for p in path.parent.iterdir()] == ["policy.json"]  # no temp file left
    assert path.stat().st_mode & 0o077 == 0
    raw = json.loads(path.read_bytes())
    raw["policy"]["entries"] = []
    path.write_text(json.dumps(raw))
    assert load_state(path) is None  # digest mismatch: damaged
    path.write_text("{trunc")
    assert load_state(path) is None
    assert load_state(tmp_path / "missing.json") is None


# -- the stream --------------------------------------------------------------------------------


def test_snapshot_then_deltas_equal_the_full_compilation(env: Env, tmp_path: Path) -> None:
    tunnel(env)
    env.serve()
    seen: list[int] = []
    w = env.watcher(tmp_path / "state.json", lambda s: seen.append(s.revision))
    w.start()
    wait_for(lambda: w.revision == env.revision())
    assert w.snapshots == 1 and w.deltas == 0
    env.check(w.state)
    state = w.state
    assert state is not None and state.policy["connections"]
    assert any(e["action"] == "protect" for e in state.policy["entries"])

    changes: list[Callable[[], None]] = [
        lambda: exemption(env, "ex1", "198.51.100.7"),
        lambda: exemption(env, "ex2", "198.51.100.0/24", "203.0.113.9"),
        lambda: set_rule_enabled(env, "gw", "tunnel", False),
        lambda: set_rule_enabled(env, "gw", "tunnel", True),
        lambda: delete_policy(env, "ex1"),
        lambda: tunnel(env, prefix="gw2", remote_subnet="10.3.0.0/16"),
    ]
    for change in changes:
        before = w.revision
        change()
        rev = env.revision()
        assert rev > before
        wait_for(lambda rev=rev: w.revision == rev)  # type: ignore[misc]
        env.check(w.state)
    assert w.deltas >= len(changes) - 1  # deltas, not snapshots, once the consumer is current
    assert seen == sorted(seen) and seen[-1] == env.revision()
    # the enforced revision is reported and shown by GET /v1/enforced
    wait_for(
        lambda: any(
            e["revision"] == env.revision()
            for e in env.api.get("/v1/enforced", headers=READER).json()["enforced"]
        )
    )
    body = env.api.get("/v1/enforced", headers=READER).json()
    (e,) = body["enforced"]
    assert (e["node"], e["component"], e["current"]) == (NODE, "keymgr", True)
    assert e["digest"] == digest(env.oracle())
    assert env.api.get("/v1/enforced").status_code == 401


def test_current_consumer_gets_nothing_until_the_next_change(env: Env) -> None:
    tunnel(env)
    env.serve()
    stub = pb_grpc.PolicyWatchStub(env.channel())
    (first,) = read_stream(stub, pb.WatchRequest(node=NODE, addresses=ADDRS), 1, 5)
    assert first.WhichOneof("body") == "snapshot" and first.base_revision == 0
    have = json.loads(first.snapshot)
    assert have == env.oracle() and first.digest == digest(have)
    current = pb.WatchRequest(
        node=NODE, addresses=ADDRS, revision=first.revision, digest=first.digest
    )
    assert read_stream(stub, current, 1, 1.0) == []  # current: nothing
    # a stale digest at the same revision: a snapshot
    stale = pb.WatchRequest(node=NODE, addresses=ADDRS, revision=first.revision, digest="0" * 64)
    (u,) = read_stream(stub, stale, 1, 5)
    assert u.WhichOneof("body") == "snapshot"
    # a change while watching arrives as a delta against what the consumer has
    call = stub.Watch(current, timeout=10)
    exemption(env, "ex1", "198.51.100.7")
    u = next(iter(call))
    call.cancel()
    assert u.WhichOneof("body") == "delta" and u.base_revision == first.revision
    assert u.revision == env.revision()
    assert apply_delta(have, u.delta, u.revision) == env.oracle()
    # the old revision with the right digest (still cached): a delta; another node's
    # addresses never get it
    (u2,) = read_stream(stub, current, 1, 5)
    assert u2.WhichOneof("body") == "delta" and u2.delta == u.delta
    other = pb.WatchRequest(
        node=NODE, addresses=["192.0.2.1"], revision=first.revision, digest=first.digest
    )
    (u3,) = read_stream(stub, other, 1, 5)
    assert u3.WhichOneof("body") == "snapshot"
    assert json.loads(u3.snapshot) == env.oracle(("192.0.2.1",))


def test_consumer_restarts_from_its_state_file(env: Env, tmp_path: Path) -> None:
    tunnel(env)
    env.serve()
    path = tmp_path / "state.json"
    w = env.watcher(path)
    w.start()
    wait_for(lambda: w.revision == env.revision())
    w.stop()
    saved = load_state(path)
    assert saved is not None and saved.policy == env.oracle()
    # a new consumer enforces the saved policy at once, and policyd sends it nothing more
    seen: list[PolicyState] = []
    w2 = env.watcher(path, seen.append, component="worker-0")
    assert w2.revision == saved.revision
    w2.start()
    assert seen == [saved]
    wait_for(lambda: w2.connected.is_set())
    wait_for(
        lambda: any(
            e["component"] == "worker-0"
            for e in env.api.get("/v1/enforced", headers=READER).json()["enforced"]
        )
    )
    time.sleep(0.5)
    assert w2.updates == 0 and seen == [saved]
    exemption(env, "ex1", "198.51.100.7")
    wait_for(lambda: w2.revision == env.revision())
    assert w2.snapshots == 0 and w2.deltas == 1  # the server still had the base revision
    state = w2.state
    assert state is not None and state.policy == env.oracle()


def test_policyd_down_consumer_keeps_its_revision_and_resumes(env: Env, tmp_path: Path) -> None:
    tunnel(env)
    server = env.serve()
    w = env.watcher(tmp_path / "state.json")
    w.start()
    wait_for(lambda: w.revision == env.revision())
    kept = w.state
    server.stop(0)
    wait_for(lambda: not w.connected.is_set())
    exemption(env, "ex1", "198.51.100.7")  # committed while the stream is down
    time.sleep(0.5)
    assert w.state == kept  # still enforcing the last revision it had
    assert w.errors >= 1
    env.serve()  # policyd is back on the same socket
    wait_for(lambda: w.revision == env.revision())
    state = w.state
    assert state is not None and state.policy == env.oracle()


def test_change_by_another_policyd_process_is_seen_by_polling(env: Env, tmp_path: Path) -> None:
    tunnel(env)
    # a second policyd on the same database: its hub is never told of the REST writes
    other = WatchHub(env.engine, secrets_dir=str(env.secrets), poll_interval=0.1)
    env.serve(other, name="other.sock")
    w = env.watcher(tmp_path / "state.json", sock="other.sock")
    w.start()
    wait_for(lambda: w.revision == env.revision())
    exemption(env, "ex1", "198.51.100.7")
    wait_for(lambda: w.revision == env.revision(), timeout=5)
    state = w.state
    assert state is not None and state.policy == env.oracle()


def test_bad_requests_get_clear_grpc_errors(env: Env) -> None:
    tunnel(env)
    env.serve()
    stub = pb_grpc.PolicyWatchStub(env.channel())

    def error(req: pb.WatchRequest) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Watch(req, timeout=5))
        return info.value

    e = error(pb.WatchRequest(node="nobody", addresses=ADDRS))
    assert e.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
    assert "no policy is assigned to node nobody" in e.details()  # type: ignore[attr-defined]
    e = error(pb.WatchRequest(node="bad name"))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and e.details().startswith("node:")  # type: ignore[attr-defined]
    e = error(pb.WatchRequest(node=NODE, addresses=["10.0.0.1", "nope"]))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "nope" not in e.details()  # type: ignore[attr-defined]
    many = [f"10.0.{i // 250}.{i % 250 + 1}" for i in range(65)]
    e = error(pb.WatchRequest(node=NODE, addresses=many))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most 64" in e.details()  # type: ignore[attr-defined]
    huge = [f"2001:db8::{i:x}" for i in range(20000)]  # a request over the size limit
    e = error(pb.WatchRequest(node=NODE, addresses=huge))
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.RpcError) as info:
        stub.ReportEnforced(
            pb.ReportEnforcedRequest(node=NODE, component="", revision=1), timeout=5
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    # the server still serves after all that
    (u,) = read_stream(stub, pb.WatchRequest(node=NODE, addresses=ADDRS), 1, 5)
    assert u.revision == env.revision()
    # without a client certificate: refused
    insecure = grpc.insecure_channel(env.target)
    with pytest.raises(grpc.RpcError):
        list(pb_grpc.PolicyWatchStub(insecure).Watch(pb.WatchRequest(node=NODE), timeout=3))
    insecure.close()


def test_no_secrets_in_the_stream_or_the_state_file(env: Env, tmp_path: Path) -> None:
    tunnel(env)
    env.serve()
    stub = pb_grpc.PolicyWatchStub(env.channel())
    (snap,) = read_stream(stub, pb.WatchRequest(node=NODE, addresses=ADDRS), 1, 5)
    have = json.loads(snap.snapshot)
    req = pb.WatchRequest(node=NODE, addresses=ADDRS, revision=snap.revision, digest=snap.digest)
    call = stub.Watch(req, timeout=10)
    tunnel(env, prefix="gw2", remote_subnet="10.3.0.0/16")
    delta = next(iter(call))
    call.cancel()
    assert delta.WhichOneof("body") == "delta"
    (conn,) = have["connections"]
    assert conn["config"]["psk_file"] == str(env.secrets / "site-b")
    for msg in (snap, delta):
        assert SECRET not in msg.SerializeToString()
    w = env.watcher(tmp_path / "state.json")
    w.start()
    wait_for(lambda: w.revision == env.revision())
    assert SECRET not in (tmp_path / "state.json").read_bytes()
    assert SECRET not in canonical(env.api.get("/v1/enforced", headers=READER).json())


def test_unassigned_node_with_a_revision_gets_an_empty_policy(env: Env) -> None:
    tunnel(env)
    env.serve()
    stub = pb_grpc.PolicyWatchStub(env.channel())
    (first,) = read_stream(stub, pb.WatchRequest(node=NODE, addresses=ADDRS), 1, 5)
    delete_policy(env, "gw")  # the node loses its only policy
    # a consumer that had a policy is told it has none now (not NOT_FOUND: it must stop
    # enforcing the old one)
    req = pb.WatchRequest(node=NODE, addresses=ADDRS, revision=first.revision, digest=first.digest)
    (u,) = read_stream(stub, req, 1, 5)
    policy = apply_delta(json.loads(first.snapshot), u.delta, u.revision)
    assert policy == env.oracle() and policy["entries"] == [] and policy["connections"] == []


def test_failed_on_update_is_retried_and_not_reported(env: Env, tmp_path: Path) -> None:
    tunnel(env)
    env.serve()
    calls: list[int] = []

    def flaky(state: PolicyState) -> None:
        calls.append(state.revision)
        if len(calls) == 1:
            raise RuntimeError("cannot apply")

    w = env.watcher(tmp_path / "state.json", flaky)
    w.start()
    wait_for(lambda: w.revision == env.revision())
    assert calls == [env.revision(), env.revision()] and w.errors == 1
    assert load_state(tmp_path / "state.json") == w.state


def test_policyd_process_serves_the_watch_stream(pki: Path, tmp_path: Path) -> None:
    sockdir = Path(tempfile.mkdtemp(prefix="pw-"))
    sock = sockdir / "watch.sock"
    flags = ("--grpc-listen", f"unix:{sock}", "--tls-dir", str(pki), "--revision-poll", "0.2")
    server = Policyd(f"sqlite:///{tmp_path / 'policyd.db'}", tmp_path, flags)
    w: PolicyWatcher | None = None
    try:
        server.start()
        http = httpx.Client(base_url=server.base, timeout=10, headers=ADMIN)
        r = http.post("/v1/templates/tunnel", json=TUNNEL)
        assert r.status_code == 200, r.text
        w = PolicyWatcher(
            mtls_channel_factory(f"unix:{sock}", pki),
            node=NODE,
            component="keymgr",
            addresses=ADDRS,
            state_file=tmp_path / "state.json",
            backoff=(0.05, 0.3),
        )
        w.start()

        def current() -> int:
            rev: int = http.get("/v1/revision").json()["revision"]
            return rev

        wait_for(lambda: w is not None and w.revision == current(), timeout=20)
        kept = w.state
        server.kill()  # policyd gone: the consumer keeps its policy
        wait_for(lambda: w is not None and not w.connected.is_set())
        time.sleep(0.3)
        assert w.state == kept and kept is not None
        server.start()
        body = {"prefix": "ex1", "addresses": ["198.51.100.7"], "assigned_to": [NODE]}
        assert http.post("/v1/templates/authentication-exemption", json=body).status_code == 200
        wait_for(lambda: w is not None and w.revision == current(), timeout=20)
        doc = http.get("/v1/document").json()
        rev = doc.pop("revision")
        want = compile_policy(doc, rev, NodeContext(NODE, ADDRS))
        state = w.state
        assert state is not None and state.policy == normalise(want.to_dict())
        wait_for(lambda: http.get("/v1/enforced").json()["enforced"][0]["current"], timeout=10)
        (enforced,) = http.get("/v1/enforced").json()["enforced"]
        assert (enforced["node"], enforced["revision"]) == (NODE, rev)
        http.close()
    finally:
        if w is not None:
            w.stop()
        server.kill()
        shutil.rmtree(sockdir, ignore_errors=True)
