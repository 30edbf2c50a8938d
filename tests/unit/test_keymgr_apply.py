"""keymgr's one path to the worker's SAD/SPD (ApplySAs), without a worker: our Ikev2Initiator
talks to Keymgr's responder role through a fake punt stream, and a fake client whose ApplySAs
answers only when the test says so.

Checks: one ApplySAs call per Child SA install (both SAs + the SPD entry) and per removal; the
IKE_AUTH response leaves only once the worker applied the install, while other handshakes go on
meanwhile; a refused install is logged with the worker's status code, sends no IKE_AUTH
response, keeps nothing and restores the SPD view; a Delete never overtakes the install of the
same SAs; SAs whose install was in flight at shutdown are removed too.
"""

from __future__ import annotations

import logging
import pathlib
import secrets
import threading
from concurrent.futures import Future
from typing import Any

import grpc
import pytest

from services.core.ike.exchange import Ikev2Initiator, State
from services.core.sa import SaConfig
from services.dataplane.client import ApplyFuture, IkeDatagram
from services.keymgr import events as ev
from services.keymgr.daemon import Keymgr, _Apply
from tests.unit.test_keymgr_responder import A, B, FakeStream, _initiator, _keymgr


class Refused(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.ALREADY_EXISTS


class Call:
    def __init__(self, install: list[SaConfig], delete: list[Any], spd: Any) -> None:
        self.install, self.delete, self.spd = install, delete, spd
        self.future: Future[Any] = Future()
        self.earlier_done: list[bool] = []  # were the earlier calls answered when this was sent


class HeldClient:
    """ApplySAs futures that the test answers (answer()); a model of the worker's SAD."""

    target = "fake"

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.sad: set[int] = set()
        self.lock = threading.Lock()

    def apply_sas_async(self, install: Any = (), delete: Any = (), spd: Any = None) -> ApplyFuture:
        call = Call(list(install), list(delete), spd)
        with self.lock:
            call.earlier_done = [c.future.done() for c in self.calls]
            self.calls.append(call)
        return ApplyFuture(call.future)

    def answer(self, i: int, err: BaseException | None = None) -> None:
        call = self.calls[i]
        if err is not None:
            call.future.set_exception(err)
            return
        with self.lock:
            for ref in call.delete:
                self.sad.discard(ref[0])
            self.sad.update(sa.spi for sa in call.install)
        call.future.set_result(None)


def _setup(tmp_path: pathlib.Path) -> tuple[Keymgr, HeldClient, FakeStream, bytes]:
    psk = secrets.token_bytes(32)
    km, _, stream = _keymgr(tmp_path, psk)
    client = HeldClient()
    km.client = client  # type: ignore[assignment]
    return km, client, stream, psk


def _to_auth(km: Keymgr, stream: FakeStream, ini: Ikev2Initiator) -> int:
    """IKE_SA_INIT, then IKE_AUTH to keymgr; returns how many datagrams keymgr answered to
    the IKE_AUTH request."""
    out = ini.start(0.0)
    n = len(stream.sent)
    for data in out:
        km._dispatch(IkeDatagram(A, 500, B, 500, data), 0.0)
    auth: list[bytes] = []
    for r in stream.sent[n:]:
        auth += ini.receive(r.data, 0.0)
    assert ini.port_float and auth
    n = len(stream.sent)
    for data in auth:
        km._dispatch(IkeDatagram(A, 4500, B, 4500, data), 0.0)
    return len(stream.sent) - n


def _pump(km: Keymgr) -> None:
    """What the main loop does with answers from the worker."""
    while not km._rx.empty():
        item = km._rx.get_nowait()
        assert isinstance(item, _Apply)
        km._finish(item)


def _deliver(km: Keymgr, stream: FakeStream, ini: Ikev2Initiator, since: int) -> None:
    for r in stream.sent[since:]:
        assert ini.receive(r.data, 0.0) == []


def test_one_apply_per_install_response_after_install_and_pipelined(
    tmp_path: pathlib.Path,
) -> None:
    km, client, stream, psk = _setup(tmp_path)
    first, second = _initiator(psk), _initiator(psk)
    assert _to_auth(km, stream, first) == 0  # the IKE_AUTH response waits for the install
    mark = len(stream.sent)
    assert _to_auth(km, stream, second) == 0  # the next handshake went on meanwhile
    assert len(client.calls) == 2 and not client.calls[1].earlier_done[0]  # both in flight
    one, two = client.calls
    assert len(one.install) == 2 and one.delete == [] and one.spd is not None
    entries, rev = one.spd
    assert rev == 1 and len(entries) == 1
    # the second IKE SA of the connection: the entry is there (in flight) and unchanged
    assert len(two.install) == 2 and two.spd is None
    assert first.state is State.AUTH_SENT and km.records == {}

    client.answer(1)
    _pump(km)
    _deliver(km, stream, second, mark)
    assert second.state is State.ESTABLISHED and first.state is State.AUTH_SENT
    client.answer(0)
    n = len(stream.sent)
    _pump(km)
    _deliver(km, stream, first, n)
    assert first.state is State.ESTABLISHED
    assert client.sad == {sa.spi for c in client.calls for sa in c.install}
    assert len(km.records) == 2 and all(rs.installed for rs in km.responders.values())

    # removal: the pair in one call; the entry only goes with the connection's last pair
    for i, ini in enumerate((first, second)):
        (req,) = ini.delete_ike(1.0)
        n = len(stream.sent)
        km._dispatch(IkeDatagram(A, 4500, B, 4500, req), 1.0)
        _deliver(km, stream, ini, n)
        assert ini.state is State.CLOSED
        call = client.calls[-1]
        assert len(client.calls) == 3 + i and len(call.delete) == 2 and call.install == []
        assert call.spd == (None if i == 0 else ([], 2))
        client.answer(len(client.calls) - 1)
        _pump(km)
    assert client.sad == set() and km._children == {} and km._spd == {}


def test_refused_install_is_reported_and_keeps_nothing(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    km, client, stream, psk = _setup(tmp_path)
    ini = _initiator(psk)
    assert _to_auth(km, stream, ini) == 0
    assert km._spd  # the view counts the entry while in flight
    client.answer(0, Refused())
    with caplog.at_level(logging.ERROR, logger="keymgr"):
        n = len(stream.sent)
        _pump(km)
    (rec,) = [r for r in caplog.records if r.getMessage() == "child install failed"]
    assert rec.__dict__["code"] == "StatusCode.ALREADY_EXISTS"
    assert rec.__dict__["error"] == "Refused"
    assert stream.sent[n:] == []  # the peer never learns of a Child SA we do not have
    assert ini.spi_i not in km.responders and km._children == {} and km.records == {}
    assert km._spd == {} and client.sad == set()

    # the next IKE SA of the connection installs the SPD entry again (a new revision)
    again = _initiator(psk)
    _to_auth(km, stream, again)
    call = client.calls[-1]
    assert call.spd is not None and call.spd[1] == 2


def test_delete_never_overtakes_the_install(tmp_path: pathlib.Path) -> None:
    km, client, stream, psk = _setup(tmp_path)
    ini = _initiator(psk)
    _to_auth(km, stream, ini)
    client.answer(0)
    _pump(km)
    _deliver(km, stream, ini, 0)
    assert ini.state is State.ESTABLISHED
    # a Child SA rekey by the peer: the new pair's install is still in flight when the peer
    # deletes the old pair; the delete must reach the worker after the install was answered
    out = ini.info.rekey_child(1.0, ini.result.child.spi_in)  # type: ignore[union-attr]
    n = len(stream.sent)
    for data in out:
        km._dispatch(IkeDatagram(A, 4500, B, 4500, data), 1.0)
    assert len(client.calls) == 2 and len(client.calls[1].install) == 2
    for r in stream.sent[n:]:
        out = ini.receive(r.data, 1.0)
    threading.Timer(0.2, client.answer, (1,)).start()
    n = len(stream.sent)
    for data in out:  # the Delete of the old pair
        km._dispatch(IkeDatagram(A, 4500, B, 4500, data), 1.0)
    delete = client.calls[-1]
    assert len(client.calls) == 3 and len(delete.delete) == 2
    assert delete.earlier_done == [True, True]  # sent only after the install's answer
    client.answer(2)
    _pump(km)
    assert client.sad == {sa.spi for sa in client.calls[1].install}


def test_shutdown_removes_sas_whose_install_was_in_flight(tmp_path: pathlib.Path) -> None:
    km, client, stream, psk = _setup(tmp_path)
    ini = _initiator(psk)
    _to_auth(km, stream, ini)
    t = [0.0]

    def clock() -> float:
        t[0] += 1.0
        return t[0]

    km.clock = clock
    threading.Timer(0.2, client.answer, (0,)).start()

    def answer_rest() -> None:
        for i in range(1, len(client.calls)):
            if not client.calls[i].future.done():
                client.answer(i)

    orig = client.apply_sas_async

    def apply_and_answer(*a: Any, **kw: Any) -> ApplyFuture:
        fut = orig(*a, **kw)
        threading.Timer(0.05, answer_rest).start()
        return fut

    client.apply_sas_async = apply_and_answer  # type: ignore[method-assign]
    km._shutdown()
    assert km._pending == [] and km._children == {}
    assert client.sad == set()  # installed, then removed: nothing leaked


def test_down_follows_child_down_of_a_removal_in_flight(tmp_path: pathlib.Path) -> None:
    km, client, stream, psk = _setup(tmp_path)
    published: list[str] = []
    km.events.publish = lambda e: published.append(e.kind)  # type: ignore[method-assign]
    ini = _initiator(psk)
    _to_auth(km, stream, ini)
    client.answer(0)
    _pump(km)
    _deliver(km, stream, ini, 0)
    assert published == [ev.UP, ev.CHILD_UP] and ini.state is State.ESTABLISHED
    (req,) = ini.delete_ike(1.0)
    km._dispatch(IkeDatagram(A, 4500, B, 4500, req), 1.0)
    assert km.records == {} and published == [ev.UP, ev.CHILD_UP]  # removal in flight
    client.answer(1)
    _pump(km)
    assert published == [ev.UP, ev.CHILD_UP, ev.CHILD_DOWN, ev.DOWN]


def test_removals_made_while_one_is_in_flight_go_together(tmp_path: pathlib.Path) -> None:
    """Deleting cannot be refused, so removals queued behind the removal in flight leave in
    one call once it is answered; each keeps its own continuation (CHILD_DOWN, DOWN)."""
    km, client, stream, psk = _setup(tmp_path)
    published: list[str] = []
    km.events.publish = lambda e: published.append(e.kind)  # type: ignore[method-assign]
    inis = [_initiator(psk) for _ in range(4)]
    for i, ini in enumerate(inis):
        _to_auth(km, stream, ini)
        client.answer(i)
        _pump(km)
        _deliver(km, stream, ini, 0)
        assert ini.state is State.ESTABLISHED
    installed = {sa.spi for c in client.calls for sa in c.install}
    assert client.sad == installed and len(installed) == 8
    published.clear()

    def delete(ini: Ikev2Initiator) -> None:
        (req,) = ini.delete_ike(1.0)
        n = len(stream.sent)
        km._dispatch(IkeDatagram(A, 4500, B, 4500, req), 1.0)
        _deliver(km, stream, ini, n)  # the Delete is answered at once
        assert ini.state is State.CLOSED

    delete(inis[0])
    assert len(client.calls) == 5  # the first removal is in flight
    delete(inis[1])
    delete(inis[2])
    assert len(client.calls) == 5  # these two wait for it
    client.answer(4)
    _pump(km)
    assert len(client.calls) == 6
    joined = client.calls[5]
    assert joined.install == [] and joined.spd is None and len(joined.delete) == 4
    assert published.count(ev.CHILD_DOWN) == 1  # the first; the joined call is in flight
    client.answer(5)
    _pump(km)
    assert published.count(ev.CHILD_DOWN) == 3 and published.count(ev.DOWN) == 3
    # the connection's last Child SA: its removal also withdraws the SPD entry (sent at once)
    delete(inis[3])
    last = client.calls[-1]
    assert len(client.calls) == 7 and last.spd is not None and last.spd[0] == []
    client.answer(6)
    _pump(km)
    assert client.sad == set() and km._children == {} and km._spd == {}
    assert km._removals == [] and km._pending == []


def _turn(km: Keymgr, fn: Any) -> None:
    """``fn()`` as one turn of the main loop: its batches leave together at the end."""
    km._staged = []
    try:
        fn()
    finally:
        km._flush(keep=False)


def test_installs_of_one_turn_go_in_one_call(tmp_path: pathlib.Path) -> None:
    """Two IKE_AUTH requests handled in one turn: both installs (and the connection's SPD
    entry, once) in one ApplySAs call; its answer releases both IKE_AUTH responses."""
    km, client, stream, psk = _setup(tmp_path)
    first, second = _initiator(psk), _initiator(psk)
    auths: list[list[bytes]] = []
    for ini in (first, second):
        n = len(stream.sent)
        for data in ini.start(0.0):
            km._dispatch(IkeDatagram(A, 500, B, 500, data), 0.0)
        auth: list[bytes] = []
        for r in stream.sent[n:]:
            auth += ini.receive(r.data, 0.0)
        auths.append(auth)
    mark = len(stream.sent)

    def both() -> None:
        for auth in auths:
            for data in auth:
                km._dispatch(IkeDatagram(A, 4500, B, 4500, data), 0.0)
        assert client.calls == []  # staged until the end of the turn

    _turn(km, both)
    assert stream.sent[mark:] == []  # both responses wait for the install
    (call,) = client.calls
    assert len(call.install) == 4 and call.delete == [] and call.spd is not None
    assert call.spd[1] == 1 and len(call.spd[0]) == 1
    assert km.apply_calls == 1 and len(km._pending) == 2
    client.answer(0)
    _pump(km)
    _deliver(km, stream, first, mark)
    _deliver(km, stream, second, mark)
    assert first.state is State.ESTABLISHED and second.state is State.ESTABLISHED
    assert client.sad == {sa.spi for sa in call.install} and len(km.records) == 2
    assert km._pending == [] and km.apply_stats[0] == 2  # two batches, one call

    # both IKE SAs deleted in one turn: one call removes the four SAs and withdraws the entry
    def deletes() -> None:
        for ini in (first, second):
            (req,) = ini.delete_ike(1.0)
            km._dispatch(IkeDatagram(A, 4500, B, 4500, req), 1.0)

    _turn(km, deletes)
    assert len(client.calls) == 2
    removal = client.calls[1]
    assert removal.install == [] and len(removal.delete) == 4
    assert removal.spd is not None and removal.spd[0] == [] and removal.spd[1] == 2
    client.answer(1)
    _pump(km)
    assert client.sad == set() and km._children == {} and km._spd == {} and km.records == {}


def test_refused_joined_call_sends_each_batch_alone(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A joined call that the worker refuses applied nothing: each batch is sent again alone,
    so only the bad one fails (logged, no IKE_AUTH response) and the other establishes."""
    km, client, stream, psk = _setup(tmp_path)
    good, bad = _initiator(psk), _initiator(psk)
    auths: list[list[bytes]] = []
    for ini in (good, bad):
        n = len(stream.sent)
        for data in ini.start(0.0):
            km._dispatch(IkeDatagram(A, 500, B, 500, data), 0.0)
        auth: list[bytes] = []
        for r in stream.sent[n:]:
            auth += ini.receive(r.data, 0.0)
        auths.append(auth)
    mark = len(stream.sent)

    def both() -> None:
        for auth in auths:
            for data in auth:
                km._dispatch(IkeDatagram(A, 4500, B, 4500, data), 0.0)

    _turn(km, both)
    assert len(client.calls) == 1 and len(client.calls[0].install) == 4
    client.answer(0, Refused())
    _pump(km)
    assert stream.sent[mark:] == []  # no outcome yet: each batch went again alone
    assert len(client.calls) == 3
    alone_good, alone_bad = client.calls[1], client.calls[2]
    assert [len(c.install) for c in (alone_good, alone_bad)] == [2, 2]
    assert alone_good.spd == client.calls[0].spd and alone_bad.spd is None  # revision 1 again
    assert {sa.spi for sa in alone_good.install} | {sa.spi for sa in alone_bad.install} == {
        sa.spi for sa in client.calls[0].install
    }
    client.answer(2, Refused())
    with caplog.at_level(logging.ERROR, logger="keymgr"):
        _pump(km)
    assert [r.getMessage() for r in caplog.records].count("child install failed") == 1
    assert stream.sent[mark:] == [] and km._spd  # the good one's entry still in flight
    client.answer(1)
    _pump(km)
    _deliver(km, stream, good, mark)
    assert good.state is State.ESTABLISHED and bad.state is State.AUTH_SENT
    assert client.sad == {sa.spi for sa in alone_good.install}
    assert len(km.records) == 1 and km._pending == [] and km.apply_calls == 3


def test_settling_a_staged_batch_sends_the_turn_first(tmp_path: pathlib.Path) -> None:
    """A batch that must wait for one staged in the same turn (same IKE SA) sends the turn's
    batches first and waits for their answer, so the order per IKE SA holds."""
    km, client, stream, psk = _setup(tmp_path)
    ini = _initiator(psk)
    out = ini.start(0.0)
    n = len(stream.sent)
    for data in out:
        km._dispatch(IkeDatagram(A, 500, B, 500, data), 0.0)
    auth: list[bytes] = []
    for r in stream.sent[n:]:
        auth += ini.receive(r.data, 0.0)
    key = ini.spi_i

    def install_then_wait() -> None:
        for data in auth:
            km._dispatch(IkeDatagram(A, 4500, B, 4500, data), 0.0)
        assert client.calls == [] and len(km._pending) == 1
        threading.Timer(0.1, client.answer, (0,)).start()
        (op,) = km._pending
        assert op.key is not None and op.key.startswith(key)
        km._settle(op.key)  # what _apply does before a later batch of the same IKE SA
        assert len(client.calls) == 1 and op.done and km._pending == []

    _turn(km, install_then_wait)
    assert len(client.calls) == 1


def test_joined_call_stays_within_apply_limits(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch that would take the turn's joined call over ApplySAs' install limit sends
    what is staged first."""
    from services.keymgr import daemon

    monkeypatch.setattr(daemon, "MAX_BATCH_INSTALLS", 4)
    km, client, stream, psk = _setup(tmp_path)
    inis = [_initiator(psk) for _ in range(3)]
    auths: list[list[bytes]] = []
    for ini in inis:
        n = len(stream.sent)
        for data in ini.start(0.0):
            km._dispatch(IkeDatagram(A, 500, B, 500, data), 0.0)
        auth: list[bytes] = []
        for r in stream.sent[n:]:
            auth += ini.receive(r.data, 0.0)
        auths.append(auth)

    def all_three() -> None:
        for auth in auths:
            for data in auth:
                km._dispatch(IkeDatagram(A, 4500, B, 4500, data), 0.0)

    _turn(km, all_three)
    assert [len(c.install) for c in client.calls] == [4, 2]
    for i in range(2):
        client.answer(i)
    mark = 0
    _pump(km)
    for ini in inis:
        _deliver(km, stream, ini, mark)
    assert all(ini.state is State.ESTABLISHED for ini in inis) and len(km.records) == 3
