"""keymgr live reconfiguration (Keymgr.reconfigure) and policy mode, without a worker (fakes
of tests/unit/test_keymgr_responder.py; the peer is our own core).

Checked: an unchanged connection keeps its IKE SA and Child SAs untouched (no worker call, no
IKE message) while others are added, removed or changed; a removed connection's IKE SA gets a
Delete to the peer, its SAs leave the worker and its state is dropped; a changed one is removed
and started again; a "config" event names the revision and the changes; a configuration with
clashing reqids is refused and changes nothing. In policy mode keymgr never sends an SPD
change (trap, install, removal, dead peer hold), and the ACQUIRE of the policy's reqid
initiates.
"""

from __future__ import annotations

import dataclasses
import pathlib
import secrets
import threading
from concurrent.futures import Future
from typing import Any

import pytest

from services.core.events import Acquire
from services.core.ike.constants import ExchangeType
from services.core.ike.exchange import State
from services.core.ike.message import decode_header
from services.core.ike.responder import Ikev2Responder, ResponderConfig, ResponderState
from services.dataplane.client import ApplyFuture, IkeDatagram, WorkerEvent
from services.keymgr import events as ev
from services.keymgr.config import ConfigError, Connection
from services.keymgr.daemon import Keymgr
from tests.unit.test_keymgr_lifecycle import DeletingClient
from tests.unit.test_keymgr_responder import NET_A, NET_B, A, B, FakeStream, _initiator

ACQ = Acquire(1, 1 << 20, b"\xc6\x33\x64\x01", b"\xcb\x00\x71\x01", 1, 0, 0)
C = "192.0.2.3"  # the address of connections that are only trapped (nobody answers there)


def _peer(psk: bytes) -> Ikev2Responder:
    return Ikev2Responder(
        ResponderConfig(
            local_addr=B,
            psk=psk,
            ts_local=("203.0.113.1", "203.0.113.1"),
            ts_remote=("198.51.100.0", "198.51.100.255"),
            remote_addr=A,
        ),
        now=0.0,
    )


def _talk(km: Keymgr, stream: FakeStream, peer: Ikev2Responder, n: int, now: float) -> int:
    """Deliver keymgr's datagrams from index ``n`` on to the peer (those for B) and its
    answers back until quiet; returns the new index."""
    for _ in range(8):
        out, n = stream.sent[n:], len(stream.sent)
        out = [d for d in out if d.remote_addr == B]
        if not out:
            return n
        for d in out:
            here = (bytes([192, 0, 2, 1]), d.local_port)
            there = (bytes([192, 0, 2, 2]), d.remote_port)
            for ans in peer.receive(d.data, now, remote=here, local=there):
                km._dispatch(IkeDatagram(A, d.local_port, B, d.remote_port, ans), now)
    return n


class Lab:
    def __init__(self, tmp: pathlib.Path, *, policy_mode: bool = False) -> None:
        self.psk = secrets.token_bytes(32)
        self.f = tmp / "psk"
        self.f.write_bytes(b"0x" + self.psk.hex().encode())
        self.c = self.conn("c", B, "start", reqid=1 << 20)
        self.d = self.conn("d", C, "trap", reqid=(1 << 20) + 1)
        self.client = DeletingClient()
        self.km = Keymgr(
            self.client,  # type: ignore[arg-type]
            (self.c, self.d),
            jitter=lambda x: 0.0,
            policy_mode=policy_mode,
        )
        self.stream = FakeStream()
        self.km._stream = self.stream  # type: ignore[assignment]
        self.events = self.km.events.subscribe()
        self.peer = _peer(self.psk)
        self.n = 0

    def conn(self, name: str, remote: str, action: str, **kw: object) -> Connection:
        return Connection(
            name, A, remote, self.f, NET_A, NET_B, remote_id=remote, start_action=action, **kw
        )  # type: ignore[arg-type]

    def start(self) -> None:
        for s in list(self.km.sessions):
            self.km._start(s, 0.0)
        self.n = _talk(self.km, self.stream, self.peer, 0, 0.0)
        assert self.peer.state is ResponderState.ESTABLISHED
        assert len(self.client.sas) == 2

    def kinds(self) -> list[str]:
        out = []
        while (e := self.events.get_nowait()) is not None:
            out.append(e.kind if e.kind != ev.CONFIG else f"config: {e.reason}")
        return out


def test_unchanged_connection_keeps_its_sas_while_others_come_and_go(
    tmp_path: pathlib.Path,
) -> None:
    lab = Lab(tmp_path)
    lab.start()
    km, client = lab.km, lab.client
    assert sorted(e.reqid for e in client.spd[-1][0]) == [1 << 20, (1 << 20) + 1]
    lab.kinds()
    applies, sent = len(client.applies), len(lab.stream.sent)
    e = lab.conn("e", C, "trap", reqid=(1 << 20) + 2)
    out = km.reconfigure((lab.c, e), 1.0, revision=7)
    assert out == {"added": ["e"], "removed": ["d"], "changed": []}
    # c: nothing sent to the peer, nothing deleted; d's trap entry withdrawn, e's installed
    assert len(lab.stream.sent) == sent and client.deleted == []
    assert sorted(x.reqid for x in client.spd[-1][0]) == [1 << 20, (1 << 20) + 2]
    assert len(client.applies) == applies + 2
    assert all(not inst and not dele for inst, dele, _ in client.applies[applies:])
    assert [s.conn.name for s in km.sessions] == ["c", "e"]
    assert ("d", "d") not in km._child_ids and km._child_ids[("e", "e")][0] == (1 << 20) + 2
    assert km.policy_revision == 7 and len(km.records) == 1
    assert lab.kinds() == ["config: revision 7: added e; removed d"]
    # the same configuration again: no change at all
    assert km.reconfigure((lab.c, e), 2.0, revision=8) == {
        "added": [],
        "removed": [],
        "changed": [],
    }
    assert len(client.applies) == applies + 2 and len(lab.stream.sent) == sent
    assert lab.kinds() == ["config: revision 8: no change"]


def test_changed_connection_is_deleted_then_started_again(tmp_path: pathlib.Path) -> None:
    lab = Lab(tmp_path)
    lab.start()
    km, client = lab.km, lab.client
    old = {sa.spi for sa in client.sas}
    lab.kinds()
    c2 = dataclasses.replace(lab.c, rekey_time=1800.0)
    assert km.reconfigure((c2, lab.d), 1.0)["changed"] == ["c"]
    # a Delete of the IKE SA went to the peer, which deletes it; keymgr does not wait for it
    dele = lab.stream.sent[lab.n]
    assert decode_header(dele.data).exchange_type == ExchangeType.INFORMATIONAL
    lab.peer.receive(
        dele.data,
        1.0,
        remote=(bytes([192, 0, 2, 1]), dele.local_port),
        local=(bytes([192, 0, 2, 2]), dele.remote_port),
    )
    assert lab.peer.state is ResponderState.CLOSED
    assert {x[0] for x in client.deleted} == old
    # the changed connection starts again at once (start_action start)
    ini = next(s for s in km.sessions if s.conn.name == "c")
    assert ini.conn is c2 and ini.initiator is not None
    assert ini.initiator.state is State.SA_INIT_SENT
    assert decode_header(lab.stream.sent[-1].data).exchange_type == ExchangeType.IKE_SA_INIT
    assert km.records == {} and km._ikes == {} and km._children == {}
    kinds = lab.kinds()
    assert kinds[:2] == ["child_down", "down"] and kinds[-1] == "config: revision 0: changed c"
    # a fresh peer establishes the new one under the same reqid
    lab.peer = _peer(lab.psk)
    _talk(km, lab.stream, lab.peer, len(lab.stream.sent) - 1, 2.0)
    assert lab.peer.state is ResponderState.ESTABLISHED
    assert len(client.sas) == 4 and [sa.reqid for sa in client.sas[2:]] == [1 << 20] * 2


def test_removed_connection_drops_all_its_state(tmp_path: pathlib.Path) -> None:
    lab = Lab(tmp_path)
    lab.start()
    km, client = lab.km, lab.client
    km.reconfigure((lab.d,), 1.0)
    assert client.sas == [] or len(client.deleted) == 2
    assert [s.conn.name for s in km.sessions] == ["d"]
    assert not any(k[0] == "c" for k in km._child_ids)
    assert "c" not in km._auth_cache and km.records == {}
    assert [e.reqid for e in client.spd[-1][0]] == [(1 << 20) + 1]
    with pytest.raises(LookupError):
        km.connection("c")


def test_clashing_reqids_are_refused_and_change_nothing(tmp_path: pathlib.Path) -> None:
    lab = Lab(tmp_path)
    lab.start()
    km = lab.km
    bad = lab.conn("e", C, "trap", reqid=1 << 20)
    with pytest.raises(ConfigError, match="reqid 1048576 is also the reqid of"):
        km.reconfigure((lab.c, lab.d, bad), 1.0)
    with pytest.raises(ConfigError, match="duplicate connection name"):
        km.reconfigure((lab.c, lab.c), 1.0)
    assert [s.conn.name for s in km.sessions] == ["c", "d"] and len(km.records) == 1


def test_policy_mode_sends_no_spd_changes(tmp_path: pathlib.Path) -> None:
    lab = Lab(tmp_path, policy_mode=True)
    km, client = lab.km, lab.client
    lab.c = lab.conn(
        "c", B, "trap", reqid=1 << 20, dpd_delay=5, dpd_action="trap", retransmit_tries=1
    )
    km.reconfigure((lab.c, lab.d), 0.0, revision=3)  # c changed: started again as trap
    assert lab.stream.sent == [] and client.applies == []  # trapped: nothing until traffic
    km._wev.put(WorkerEvent("w", 0.0, ACQ))
    km._worker_events(0.0)
    _talk(km, lab.stream, lab.peer, 0, 0.0)
    assert lab.peer.state is ResponderState.ESTABLISHED
    assert len(client.sas) == 2 and all(sa.reqid == 1 << 20 for sa in client.sas)
    # the peer goes silent: dead, dpd_action trap keeps waiting for an ACQUIRE
    (s,) = [s for s in km.sessions if s.conn.name == "c"]
    t = 0.0
    while t < 30 and s.installed:
        t += 0.5
        km._timers(t)
    assert not s.installed and s.held and len(client.deleted) == 2
    km._wev.put(WorkerEvent("w", 0.0, ACQ))
    km._worker_events(t)
    assert s.initiator is not None and s.initiator.state is State.SA_INIT_SENT
    km.reconfigure((lab.d,), t, revision=4)
    assert client.spd == [] and all(spd is None for _, _, spd in client.applies)
    assert km._spd == {} and km.policy_revision == 4


class DeferredClient(DeletingClient):
    """Answers ApplySAs only when the test says so."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting: list[Future[Any]] = []

    def apply_sas_async(self, install: Any = (), delete: Any = (), spd: Any = None) -> ApplyFuture:
        self.applies.append((list(install), list(delete), spd))
        for ref in delete:
            self.delete_sa(*ref)
        for cfg in install:
            self.install_sa(cfg)
        fut: Future[Any] = Future()
        self.waiting.append(fut)
        return ApplyFuture(fut)

    def answer_soon(self) -> None:
        """Answer every call in flight from another thread (keymgr waits for them)."""

        def answer() -> None:
            for fut in self.waiting:
                fut.set_result(None)

        threading.Timer(0.2, answer).start()


def test_responder_removed_while_its_install_is_in_flight(tmp_path: pathlib.Path) -> None:
    psk = secrets.token_bytes(32)
    f = tmp_path / "psk"
    f.write_bytes(b"0x" + psk.hex().encode())
    conn = Connection("r", A, B, f, NET_A, NET_B, remote_id=B, start_action="respond")
    client = DeferredClient()
    km = Keymgr(client, (conn,))  # type: ignore[arg-type]
    stream = FakeStream()
    km._stream = stream  # type: ignore[assignment]
    ini = _initiator(psk)
    (init,) = ini.start(0.0)
    km._dispatch(IkeDatagram(A, 500, B, 500, init), 0.0)
    (resp,) = [d.data for d in stream.sent]
    (auth,) = ini.receive(resp, 0.0)
    km._dispatch(IkeDatagram(A, 500, B, 500, auth), 0.0)
    assert len(client.sas) == 2 and len(stream.sent) == 1  # IKE_AUTH response held
    client.answer_soon()
    km.reconfigure((), 0.5)  # the removal waits for the install in flight
    for fut in client.waiting:
        if not fut.done():
            fut.set_result(None)  # the removals
    km._settle_all()
    # the held response never leaves, nothing is tracked, the SAs are removed again
    assert len(stream.sent) == 1 and km._ikes == {} and km.responders == {}
    assert sorted(x[0] for x in client.deleted) == sorted(sa.spi for sa in client.sas)
    assert km._children == {} and km.records == {}
