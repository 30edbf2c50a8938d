"""keymgr with several workers: connections placed on the worker that owns their local
address, one operator API over all shards (commands go to the shard holding the connection,
lists are merged, IKE SA IDs never collide), one worker exactly as before."""

from __future__ import annotations

import pathlib
import secrets
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest

from services.core.ike.exchange import State
from services.keymgr.__main__ import _shard_plan, _target, parse_args
from services.keymgr.api import KeyManagerService
from services.keymgr.config import ConfigError, Connection, KeymgrConfig
from services.keymgr.daemon import Keymgr
from tests.unit.test_keymgr_lifecycle import DeletingClient
from tests.unit.test_keymgr_lifetimes import _talk
from tests.unit.test_keymgr_policymode import InlineKeymgr
from tests.unit.test_keymgr_responder import NET_A, NET_B, A, B, FakeStream, _initiator

T = TypeVar("T")


@dataclass
class Stats:
    worker_id: str
    local_addresses: tuple[str, ...]


class StatsClient:
    def __init__(self, worker_id: str, *addrs: str) -> None:
        self.s = Stats(worker_id, addrs)
        self.asked = 0

    def wait_ready(self, timeout: float = 10.0) -> None:
        pass

    def stats(self) -> Stats:
        self.asked += 1
        return self.s


def _conn(name: str, local: str, remote: str = "192.0.2.200", **kw: Any) -> Connection:
    return Connection(name, local, remote, pathlib.Path("/nonexistent/psk"), NET_A, NET_B, **kw)


def test_dataplane_targets_and_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _target("unix:/run/a.sock") == ("", "unix:/run/a.sock")
    assert _target("node-a=10.0.0.1:50051") == ("node-a", "10.0.0.1:50051")
    args = parse_args(["--config", "x.json"])
    assert args.dataplane == ["unix:/run/ipsec-dataplane/worker.sock"]
    args = parse_args(["--dataplane", "a=unix:/a", "--dataplane", "unix:/b"])
    assert args.dataplane == ["a=unix:/a", "unix:/b"]
    monkeypatch.setenv("KEYMGR_DATAPLANE", "unix:/a, n=unix:/b")
    assert parse_args([]).dataplane == ["unix:/a", "n=unix:/b"]


def test_one_worker_gets_every_connection_without_being_asked() -> None:
    client = StatsClient("w1", "192.0.2.1")
    cfg = KeymgrConfig((_conn("a", "192.0.2.1"), _conn("b", "198.51.100.9")))
    nodes, conns = _shard_plan([client], [("", "unix:/a")], cfg, several=False)  # type: ignore[list-item]
    assert nodes == [""] and conns == [cfg.connections] and client.asked == 0


def test_several_workers_get_the_connections_of_their_addresses() -> None:
    w1, w2 = StatsClient("w1", "192.0.2.1"), StatsClient("w2", "2001:db8::1", "192.0.2.5")
    cfg = KeymgrConfig(
        (
            _conn("a", "192.0.2.1"),
            _conn("b", "2001:db8:0::1", remote="2001:db8::2"),
            _conn("c", "192.0.2.5"),
        )
    )
    targets = [("", "unix:/a"), ("site-2", "unix:/b")]
    nodes, conns = _shard_plan([w1, w2], targets, cfg, several=True)  # type: ignore[list-item]
    assert nodes == ["w1", "site-2"]
    assert [[c.name for c in x] for x in conns] == [["a"], ["b", "c"]]
    bad = KeymgrConfig((_conn("z", "192.0.2.77"),))
    with pytest.raises(ConfigError, match=r"connection 'z': local_addr 192\.0\.2\.77 is not an"):
        _shard_plan([w1, w2], targets, bad, several=True)  # type: ignore[list-item]
    with pytest.raises(ConfigError, match="same node"):
        _shard_plan([w1, w1], [("", "a"), ("", "b")], cfg, several=True)  # type: ignore[list-item]


def _shard(k: int, n: int, *conns: Connection) -> InlineKeymgr:
    km = InlineKeymgr(DeletingClient(), conns, ike_sa_ids=(k, n))  # type: ignore[arg-type]
    km._stream = FakeStream()  # type: ignore[assignment]
    return km


def test_api_over_shards_finds_the_connection_and_merges_lists() -> None:
    one = _shard(0, 2, _conn("a", "192.0.2.1", start_action="none"))
    two = _shard(1, 2, _conn("b", "192.0.2.5", start_action="none"))
    svc = KeyManagerService([one, two])
    # a command goes to the shard that has the connection; unknown everywhere: LookupError
    with pytest.raises(ValueError, match="only responds"):
        svc._pairs(lambda km, now: km.initiate("b", now))
    with pytest.raises(LookupError, match="no connection named 'zz'"):
        svc._pairs(lambda km, now: km.terminate(now, name="zz"))
    assert svc._pairs(lambda km, now: km.terminate(now, name="a")) == (
        0,
        "Delete sent for 0 IKE SA(s)",
    )
    # merged from both shards
    names = [c.name for cs in svc._all(lambda km, _now: km.connections()) for c in cs]
    assert names == ["a", "b"]
    # one shard: as before
    solo = KeyManagerService(_shard(0, 1, _conn("a", "192.0.2.1", start_action="none")))
    assert solo.km is solo.shards[0] and solo.km._next_id == 0 and solo.km._id_step == 1


def test_ike_sa_ids_of_a_shard_follow_its_stride(tmp_path: pathlib.Path) -> None:
    psk = secrets.token_bytes(32)
    f = tmp_path / "psk"
    f.write_bytes(b"0x" + psk.hex().encode())
    conn = Connection("c", A, B, f, NET_A, NET_B, remote_id=B, start_action="respond")
    km = Keymgr(DeletingClient(), (conn,), ike_sa_ids=(1, 3))  # type: ignore[arg-type]
    stream = FakeStream()
    km._stream = stream  # type: ignore[assignment]
    for _ in range(2):
        ini = _initiator(psk)
        _talk(km, stream, ini, 0.0, ini.start(0.0))
        assert ini.state is State.ESTABLISHED
    # shard 1 of 3: 1 + 3k; shard 0 and 2 would hand out 3, 6 and 5, 8
    assert sorted(r.id for r in km.records.values()) == [4, 7]
