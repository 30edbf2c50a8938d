"""keymgr's operator API (ipsec.v1.KeyManager) in process: a real gRPC server on a unix socket
with mutual TLS (development PKI), a real Keymgr main loop in a thread, a fake worker (punt
stream + SA calls in memory) and our own Ikev2Initiator as the peer.

Checks: listing while negotiating and after ESTABLISHED (fields match the peer's view: SPIs,
ports after NAT-T, algorithms; the worker's counters attached), WatchEvents streams up /
child_up / child_down / down with the operator as the reason, Terminate sends a Delete the peer
accepts, a wrong PSK gives auth_failed with an actionable reason, bad requests (unknown
connection, responder-only connection, huge or binary names, no target, unknown ids) get clear
status codes and the server keeps serving, a client without a certificate from our CA is
refused, no response carries key bytes, and a stopped keymgr answers UNAVAILABLE. The event
bus drops the oldest events of a slow subscriber and counts them. The key export writes a
0600 file whose lines are exactly tests/netns/tshark.py's esp_sa records and the
ikev2_decryption_table records of test_ike_sk, and logs a warning without keys.
"""

from __future__ import annotations

import logging
import pathlib
import queue
import secrets
import stat
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from services.core.ike.exchange import NAT_T_PORT, Ikev2Initiator, InitiatorConfig, State
from services.core.sa import Direction, Mode, SaConfig
from services.dataplane.client import ApplyFuture, IkeDatagram
from services.keymgr import ctl
from services.keymgr import events as ev
from services.keymgr.api import ApiServer
from services.keymgr.config import Connection
from services.keymgr.daemon import Keymgr
from services.keymgr.events import EventBus, KeyExporter, KeymgrEvent
from services.pb.ipsec.v1 import keymgr_pb2 as pb
from services.pb.ipsec.v1 import keymgr_pb2_grpc as pb_grpc
from services.runtime import devpki, tls
from tests.netns import tshark

A, B, C = "192.0.2.1", "192.0.2.2", "192.0.2.9"
NET_A, NET_B = "198.51.100.0/24", "203.0.113.1/32"
WAIT = 10.0


# --- a fake worker --------------------------------------------------------------------------


class FakePunt:
    """The punt stream: the test puts datagrams into ``inbox``; keymgr's sends land in ``out``."""

    def __init__(self) -> None:
        self.inbox: queue.Queue[IkeDatagram] = queue.Queue()
        self.out: queue.Queue[IkeDatagram] = queue.Queue()
        self._cancelled = threading.Event()

    def __iter__(self) -> Iterator[IkeDatagram]:
        while not self._cancelled.is_set():
            try:
                yield self.inbox.get(timeout=0.05)
            except queue.Empty:
                continue

    def send(self, d: IkeDatagram) -> None:
        self.out.put(d)

    def cancel(self) -> None:
        self._cancelled.set()


@dataclass
class Counter:
    spi: int
    direction: Direction
    packets: int
    bytes: int


class _NoEvents:
    def __iter__(self) -> Any:
        return iter(())

    def cancel(self) -> None:
        pass


@dataclass
class FakeClient:
    target: str = "fake"
    punt_stream: FakePunt = field(default_factory=FakePunt)
    sas: list[SaConfig] = field(default_factory=list)
    deleted: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def wait_ready(self, timeout: float = 10.0) -> None:
        pass

    def punt(self) -> FakePunt:
        return self.punt_stream

    def install_sa(self, cfg: SaConfig) -> None:
        with self.lock:
            self.sas.append(cfg)

    def delete_sa(self, spi: int, dst: bytes, protocol: int, direction: Direction) -> bool:
        with self.lock:
            self.deleted.append(spi)
            self.sas = [s for s in self.sas if s.spi != spi]
        return True

    def replace_spd(self, entries: Any, revision: int) -> int:
        return revision

    def apply_sas_async(self, install: Any = (), delete: Any = (), spd: Any = None) -> ApplyFuture:
        """The batch as the unary calls it stands for, answered at once."""
        for ref in delete:
            self.delete_sa(*ref)
        for cfg in install:
            self.install_sa(cfg)
        fut: Future[Any] = Future()
        fut.set_result(None)
        return ApplyFuture(fut)

    def events(self) -> Any:
        """No worker events in these tests (an empty stream that can be cancelled)."""
        return _NoEvents()

    def list_sas(self) -> list[Counter]:
        with self.lock:
            return [Counter(s.spi, s.direction, 7 + s.direction, 700) for s in self.sas]


# --- the lab ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    d = tmp_path_factory.mktemp("pki")
    assert devpki.main([str(d), "--names", "keymgr,admin"]) == 0
    return d


class Api:
    def __init__(self, tmp: pathlib.Path, pki: pathlib.Path, psk: bytes) -> None:
        self.psk = psk
        f = tmp / "psk"
        f.write_bytes(b"0x" + psk.hex().encode())
        conns = (
            Connection("dial", A, C, f, NET_A, NET_B, start_action="start"),
            Connection("resp", A, B, f, NET_A, NET_B, remote_id=B, start_action="respond"),
        )
        self.client = FakeClient()
        self.keys = tmp / "keys.txt"
        self.exporter = KeyExporter(self.keys)
        self.exporter.open()
        self.km = Keymgr(self.client, conns, key_export=self.exporter)  # type: ignore[arg-type]
        self.sock = tmp / "api.sock"
        self.server = ApiServer.with_tls(self.km, f"unix:{self.sock}", pki, "keymgr")
        self.server.start()
        self.thread = threading.Thread(target=self.km.run, daemon=True)
        self.thread.start()
        self.channel = tls.secure_channel(
            f"unix:{self.sock}", pki, server_name="keymgr", client_name="admin"
        )
        self.stub = pb_grpc.KeyManagerStub(self.channel)
        self.punt = self.client.punt_stream

    def close(self) -> None:
        self.km.stop()
        self.thread.join(timeout=10)
        self.server.stop()
        self.channel.close()

    def exchange(self, ini: Ikev2Initiator, out: list[bytes]) -> None:
        """Carry the peer's datagrams to keymgr and its answers back until nothing is left."""
        for _ in range(6):
            port = NAT_T_PORT if ini.port_float else 500
            for data in out:
                self.punt.inbox.put(IkeDatagram(A, port, B, port, data))
            out = []
            try:
                while True:
                    r = self.punt.out.get(timeout=0.5)
                    if r.remote_addr == B:
                        out += ini.receive(r.data, time.monotonic())
            except queue.Empty:
                pass
            if not out and ini.state is not State.SA_INIT_SENT:
                return


@pytest.fixture
def api(tmp_path: pathlib.Path, pki: pathlib.Path) -> Iterator[Api]:
    a = Api(tmp_path, pki, secrets.token_bytes(32))
    try:
        yield a
    finally:
        a.close()


def peer(psk: bytes) -> Ikev2Initiator:
    cfg = InitiatorConfig(
        local_addr=B,
        remote_addr=A,
        psk=psk,
        ts_local=("203.0.113.1", "203.0.113.1"),
        ts_remote=("198.51.100.0", "198.51.100.255"),
    )
    return Ikev2Initiator(cfg, now=time.monotonic())


class Watcher:
    """Collects WatchEvents in a thread; subscribed once the constructor returns."""

    def __init__(self, stub: pb_grpc.KeyManagerStub) -> None:
        self.events: queue.Queue[pb.KeymgrEvent] = queue.Queue()
        self.call = stub.WatchEvents(pb.WatchEventsKeymgrRequest())
        self.call.initial_metadata()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for e in self.call:
                self.events.put(e)
        except grpc.RpcError:
            pass

    def until(self, kind: int, timeout: float = WAIT) -> list[pb.KeymgrEvent]:
        seen: list[pb.KeymgrEvent] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                e = self.events.get(timeout=0.1)
            except queue.Empty:
                continue
            seen.append(e)
            if e.kind == kind:
                return seen
        raise AssertionError(f"no event {kind} within {timeout}s; saw {seen}")

    def close(self) -> None:
        self.call.cancel()


def code_of(fn: Any, *args: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as ei:
        fn(*args, timeout=WAIT)
    return ei.value.code()  # type: ignore[no-any-return]


def wait_for(pred: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# --- tests ------------------------------------------------------------------------------------


def test_lists_a_connecting_initiator_and_refuses_a_second_initiate(api: Api) -> None:
    wait_for(lambda: api.stub.ListIkeSas(pb.ListIkeSasRequest(), timeout=WAIT).ike_sas, "dial")
    (sa,) = api.stub.ListIkeSas(pb.ListIkeSasRequest(), timeout=WAIT).ike_sas
    assert (sa.connection, sa.role, sa.state, sa.id) == ("dial", "initiator", "connecting", 0)
    assert (sa.local_addr, sa.remote_addr, sa.local_port) == (A, C, 500)
    assert sa.spi_r == "00" * 8 and len(sa.spi_i) == 16 and sa.spi_i != "00" * 8
    # what keymgr actually sent: an IKE_SA_INIT with that SPI towards C
    d = api.punt.out.get(timeout=WAIT)
    assert d.remote_addr == C and d.data[:8].hex() == sa.spi_i
    r = api.stub.Initiate(pb.InitiateRequest(connection="dial"), timeout=WAIT)
    assert not r.started and "in progress" in r.detail
    assert api.stub.ListChildSas(pb.ListChildSasRequest(), timeout=WAIT).child_sas == []
    assert api.stub.ListIkeSas(pb.ListIkeSasRequest(connection="resp"), timeout=WAIT).ike_sas == []
    # terminating the negotiation abandons it (no Delete: there is no IKE SA yet) ...
    t = api.stub.Terminate(pb.TerminateRequest(connection="dial"), timeout=WAIT)
    assert t.ike_sas == 0 and "abandoned" in t.detail
    assert api.stub.ListIkeSas(pb.ListIkeSasRequest(), timeout=WAIT).ike_sas == []
    # ... and Initiate starts it again with a new SPI
    r = api.stub.Initiate(pb.InitiateRequest(connection="dial"), timeout=WAIT)
    assert r.started, r.detail
    (sa2,) = api.stub.ListIkeSas(pb.ListIkeSasRequest(), timeout=WAIT).ike_sas
    assert sa2.state == "connecting" and sa2.spi_i != sa.spi_i


def test_bad_requests_get_clear_status_and_the_server_keeps_serving(api: Api) -> None:
    s = api.stub
    cases = [
        (s.Initiate, pb.InitiateRequest(connection="nope"), grpc.StatusCode.NOT_FOUND),
        (s.Initiate, pb.InitiateRequest(connection=""), grpc.StatusCode.INVALID_ARGUMENT),
        (s.Initiate, pb.InitiateRequest(connection="x" * 5000), grpc.StatusCode.INVALID_ARGUMENT),
        (s.Initiate, pb.InitiateRequest(connection="a\x00b"), grpc.StatusCode.INVALID_ARGUMENT),
        (s.Initiate, pb.InitiateRequest(connection="resp"), grpc.StatusCode.FAILED_PRECONDITION),
        (
            s.Initiate,
            pb.InitiateRequest(connection="y" * (2 << 20)),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        ),
        (s.Terminate, pb.TerminateRequest(), grpc.StatusCode.INVALID_ARGUMENT),
        (s.Terminate, pb.TerminateRequest(connection="nope"), grpc.StatusCode.NOT_FOUND),
        (s.Terminate, pb.TerminateRequest(ike_sa_id=0), grpc.StatusCode.INVALID_ARGUMENT),
        (s.Terminate, pb.TerminateRequest(ike_sa_id=2**64 - 1), grpc.StatusCode.NOT_FOUND),
        (
            s.Terminate,
            pb.TerminateRequest(child_sa=pb.ChildSaRef(spi_in=0x1234)),
            grpc.StatusCode.NOT_FOUND,
        ),
        (s.ListIkeSas, pb.ListIkeSasRequest(connection="z" * 65), grpc.StatusCode.INVALID_ARGUMENT),
        (s.ListChildSas, pb.ListChildSasRequest(connection="\n"), grpc.StatusCode.INVALID_ARGUMENT),
    ]
    for rpc, req, want in cases:
        with pytest.raises(grpc.RpcError) as ei:
            rpc(req, timeout=WAIT)
        assert ei.value.code() == want, (req, ei.value.details())
        assert ei.value.details(), req
    with pytest.raises(grpc.RpcError) as ei:
        s.Initiate(pb.InitiateRequest(connection="nope"), timeout=WAIT)
    assert "nope" in ei.value.details()
    with pytest.raises(grpc.RpcError) as ei:
        s.Initiate(pb.InitiateRequest(connection="resp"), timeout=WAIT)
    assert "peer must initiate" in ei.value.details()
    # a request that is not a protobuf message at all
    raw = api.channel.unary_unary("/ipsec.v1.KeyManager/Initiate")
    with pytest.raises(grpc.RpcError) as ei:
        raw(b"\xff\xff\xff\xff", timeout=WAIT)
    assert ei.value.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.INVALID_ARGUMENT)
    # still serving, main loop alive
    assert s.ListIkeSas(pb.ListIkeSasRequest(), timeout=WAIT) is not None
    assert api.thread.is_alive() and not api.km.failed


def test_a_client_without_our_ca_is_refused(api: Api, tmp_path: pathlib.Path) -> None:
    other = tmp_path / "other-pki"
    assert devpki.main([str(other), "--names", "admin"]) == 0
    ch = tls.secure_channel(f"unix:{api.sock}", other, server_name="keymgr", client_name="admin")
    try:
        stub = pb_grpc.KeyManagerStub(ch)
        assert code_of(stub.ListIkeSas, pb.ListIkeSasRequest()) == grpc.StatusCode.UNAVAILABLE
    finally:
        ch.close()


def test_responder_lifecycle_listed_streamed_and_terminated(api: Api) -> None:
    w = Watcher(api.stub)
    try:
        ini = peer(api.psk)
        api.exchange(ini, ini.start(time.monotonic()))
        assert ini.state is State.ESTABLISHED and ini.result is not None
        r = ini.result
        ups = w.until(pb.KEYMGR_EVENT_KIND_CHILD_UP)
        kinds = [e.kind for e in ups]
        assert kinds.index(pb.KEYMGR_EVENT_KIND_UP) < kinds.index(pb.KEYMGR_EVENT_KIND_CHILD_UP)
        up = ups[-1]
        assert (up.connection, up.role, up.spi_i, up.spi_r) == (
            "resp",
            "responder",
            r.spi_i.hex(),
            r.spi_r.hex(),
        )
        # the peer's outbound SPI is our inbound one
        assert (up.spi_in, up.spi_out) == (r.child.spi_out.hex(), r.child.spi_in.hex())
        assert abs(up.time - time.time()) < 30

        resp = api.stub.ListIkeSas(pb.ListIkeSasRequest(connection="resp"), timeout=WAIT)
        (sa,) = resp.ike_sas
        assert sa.id == up.ike_sa_id != 0
        assert (sa.role, sa.state, sa.spi_i, sa.spi_r) == (
            "responder",
            "established",
            r.spi_i.hex(),
            r.spi_r.hex(),
        )
        assert sa.nat_t == ini.port_float and sa.local_port == (4500 if ini.port_float else 500)
        assert (sa.encryption, sa.integrity, sa.prf, sa.dh_group) == (
            "AES_GCM_16-256",
            "NONE",
            "HMAC_SHA2_256",
            "CURVE25519",
        )
        assert abs(sa.established_time - time.time()) < 30 and sa.rekey_time == 0

        cresp = api.stub.ListChildSas(pb.ListChildSasRequest(), timeout=WAIT)
        (ch,) = cresp.child_sas
        assert (ch.ike_sa_id, ch.connection, ch.state) == (sa.id, "resp", "installed")
        assert (ch.spi_in, ch.spi_out) == (r.child.spi_out.hex(), r.child.spi_in.hex())
        assert (ch.protocol, ch.mode, ch.encryption, ch.integrity) == (
            "esp",
            "tunnel",
            "AES_GCM_16-256",
            "NONE",
        )
        assert list(ch.local_ts) == [NET_A] and list(ch.remote_ts) == [NET_B]
        assert ch.udp_encap == ini.port_float and ch.reqid == 2
        # the fake worker's counters: 7 + direction packets, 700 bytes
        assert ch.counters_known
        assert (ch.packets_in, ch.packets_out, ch.bytes_in) == (8, 9, 700)

        # no key material anywhere in the answers
        keys = r.child.keys
        blobs = resp.SerializeToString() + cresp.SerializeToString() + up.SerializeToString()
        text = str(resp) + str(cresp) + str(up)
        for k in (keys.encr_i, keys.encr_r, r.keys.sk_ei, r.keys.sk_er, r.keys.sk_d):
            assert k not in blobs and k.hex() not in text

        # a child the connection does not have: clear status, nothing happens
        ref = pb.ChildSaRef(connection="resp", child="nope")
        with pytest.raises(grpc.RpcError) as ei:
            api.stub.Terminate(pb.TerminateRequest(child_sa=ref), timeout=WAIT)
        assert ei.value.code() == grpc.StatusCode.NOT_FOUND
        assert "nope" in ei.value.details()
        assert ch.name == "resp"  # the only child is named after the connection

        # Terminate by id: keymgr sends a Delete of the IKE SA; the peer answers it
        t = api.stub.Terminate(pb.TerminateRequest(ike_sa_id=sa.id), timeout=WAIT)
        assert t.ike_sas == 1
        delete = api.punt.out.get(timeout=WAIT)
        assert delete.data[:16] == r.spi_i + r.spi_r
        answer = ini.receive(delete.data, time.monotonic())
        assert ini.state is State.CLOSED and answer
        port = NAT_T_PORT if ini.port_float else 500
        for data in answer:
            api.punt.inbox.put(IkeDatagram(A, port, B, port, data))
        downs = w.until(pb.KEYMGR_EVENT_KIND_DOWN)
        child_down = [e for e in downs if e.kind == pb.KEYMGR_EVENT_KIND_CHILD_DOWN]
        assert child_down and child_down[0].spi_in == ch.spi_in
        assert downs[-1].ike_sa_id == sa.id
        assert "operator" in downs[-1].reason
        wait_for(lambda: not api.client.sas, "SAs removed from the worker")
        listed = api.stub.ListIkeSas(pb.ListIkeSasRequest(connection="resp"), timeout=WAIT)
        assert all(x.state != "established" for x in listed.ike_sas)
        assert api.stub.ListChildSas(pb.ListChildSasRequest(), timeout=WAIT).child_sas == []
    finally:
        w.close()

    # the key export has this IKE SA and both ESP SAs, in tshark's formats
    lines = api.keys.read_text().splitlines()
    assert lines[0] == tshark.ike_uat(
        r.spi_i, r.spi_r, r.keys.sk_ei, r.keys.sk_er, "AES-GCM-256 with 16 octet ICV [RFC5282]"
    )
    assert tshark.key_file_prefs(api.keys)[2:] == lines
    esp = sorted(lines[1:])
    assert len(esp) == 2 and all(x.startswith('uat:esp_sa:"IPv4",') for x in esp)
    assert any(f'"0x{r.child.spi_in.hex()}"' in x and keys.encr_r.hex() in x for x in esp)
    assert any(f'"0x{r.child.spi_out.hex()}"' in x and keys.encr_i.hex() in x for x in esp)


def test_wrong_psk_streams_auth_failed_with_a_hint(api: Api) -> None:
    w = Watcher(api.stub)
    try:
        ini = peer(secrets.token_bytes(32))
        api.exchange(ini, ini.start(time.monotonic()))
        assert ini.state is not State.ESTABLISHED
        seen = w.until(pb.KEYMGR_EVENT_KIND_AUTH_FAILED)
        e = seen[-1]
        assert (e.connection, e.role, e.ike_sa_id) == ("resp", "responder", 0)
        assert e.spi_i == ini.spi_i.hex()
        assert "AUTHENTICATION_FAILED" in e.reason and "pre-shared key" in e.reason
        assert not any(x.kind == pb.KEYMGR_EVENT_KIND_UP for x in seen)
        (sa,) = api.stub.ListIkeSas(pb.ListIkeSasRequest(connection="resp"), timeout=WAIT).ike_sas
        assert sa.state == "failed" and "AUTHENTICATION_FAILED" in sa.failure_reason
    finally:
        w.close()


def test_stopped_keymgr_answers_unavailable(api: Api) -> None:
    api.km.stop()
    api.thread.join(timeout=10)
    assert not api.thread.is_alive()
    req = pb.InitiateRequest(connection="dial")
    assert code_of(api.stub.Initiate, req) == grpc.StatusCode.UNAVAILABLE
    assert code_of(api.stub.ListIkeSas, pb.ListIkeSasRequest()) == grpc.StatusCode.UNAVAILABLE


def test_event_bus_drops_the_oldest_for_a_slow_subscriber() -> None:
    bus = EventBus(maxsize=2)
    slow, other = bus.subscribe(), bus.subscribe()
    for i in range(5):
        bus.publish(KeymgrEvent(kind=ev.UP, time=float(i), connection=f"c{i}"))
    got = [slow.get(0), slow.get(0), slow.get(0)]
    assert [e.connection if e else None for e in got] == ["c3", "c4", None]
    assert slow.dropped == 3 and other.dropped == 3 and bus.dropped == 6
    assert bus.published == 5 and bus.subscribers == 2
    other.close()
    assert bus.subscribers == 1
    bus.close()
    assert slow.closed


def test_failure_kind_and_hint() -> None:
    assert ev.failure_kind("peer sent AUTHENTICATION_FAILED") == ev.AUTH_FAILED
    assert ev.failure_kind("NO_PROPOSAL_CHOSEN") == ev.NEGOTIATION_FAILED
    assert ev.failure_kind(None) == ev.NEGOTIATION_FAILED
    assert "UDP 500/4500" in ev.failure_hint("no response after 5 transmissions")
    assert "proposals" in ev.failure_hint("NO_PROPOSAL_CHOSEN")


def test_key_export_formats_mode_and_warning(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "k" / "keys.txt"
    path.parent.mkdir()
    exp = KeyExporter(path)
    with caplog.at_level(logging.WARNING, logger="keymgr"):
        exp.open()
        exp.open()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    warnings = [r for r in caplog.records if "key export is ON" in r.getMessage()]
    assert len(warnings) == 1
    key = secrets.token_bytes(36)
    sa = SaConfig(
        spi=0x0102A0B0,
        protocol=50,
        direction=Direction.OUTBOUND,
        mode=Mode.TUNNEL,
        src=bytes([192, 0, 2, 1]),
        dst=bytes([192, 0, 2, 2]),
        encr_id=20,
        encr_key=key,
    )
    exp.child_sas((sa,))
    (line,) = path.read_text().splitlines()
    # the same record tests/netns/tshark.py builds for tshark's -o uat:esp_sa
    (rec,) = tshark.esp_records([sa])
    assert line == f"uat:esp_sa:{rec.uat()}"
    assert line.count(key.hex()) == 1
    assert all(key.hex() not in r.getMessage() for r in caplog.records)
    # an existing file is narrowed to 0600; a symlink is refused
    path.chmod(0o644)
    KeyExporter(path).open()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    link = tmp_path / "k" / "link.txt"
    link.symlink_to(path)
    with pytest.raises(OSError):
        KeyExporter(link).open()
    # a cipher Wireshark cannot name is skipped (counted), nothing half-written
    chacha = SaConfig(
        spi=0x0102A0B1,
        protocol=50,
        direction=Direction.OUTBOUND,
        mode=Mode.TUNNEL,
        src=bytes([192, 0, 2, 1]),
        dst=bytes([192, 0, 2, 2]),
        encr_id=28,
        encr_key=key,
    )
    exp.child_sas((chacha,))
    assert exp.failures == 1 and len(path.read_text().splitlines()) == 1


def test_stopping_keymgr_reports_down_with_the_reason(api: Api) -> None:
    ini = peer(api.psk)
    api.exchange(ini, ini.start(time.monotonic()))
    assert ini.state is State.ESTABLISHED
    sub = api.km.events.subscribe()
    api.km.stop()  # sends a Delete the peer never answers; SAs removed after the wait
    api.thread.join(timeout=10)
    seen: list[KeymgrEvent] = []
    while (e := sub.get(0)) is not None:
        seen.append(e)
    assert [e.kind for e in seen] == [ev.CHILD_DOWN, ev.DOWN], seen
    assert all(e.reason == "keymgr stopping" for e in seen), seen
    assert not api.client.sas


def test_ctl_lists_initiates_and_reports_errors(
    api: Api, pki: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["--api", f"unix:{api.sock}", "--tls-dir", str(pki), "--server-name", "keymgr"]
    base += ["--client-name", "admin"]
    wait_for(lambda: api.stub.ListIkeSas(pb.ListIkeSasRequest(), timeout=WAIT).ike_sas, "dial")
    assert ctl.main([*base, "--list-sas"]) == 0
    out = capsys.readouterr().out
    assert "dial: #0, CONNECTING, IKEv2" in out and f"{A}[500]" in out
    assert ctl.main([*base, "--initiate", "nope"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
    assert ctl.main([*base, "--terminate", "dial"]) == 0
    assert "abandoned" in capsys.readouterr().out
    got: list[int] = []
    t = threading.Thread(target=lambda: got.append(ctl.main([*base, "--events", "--count", "1"])))
    t.start()
    wait_for(lambda: api.km.events.subscribers == 1, "ctl subscribed")
    ini = peer(secrets.token_bytes(32))  # wrong PSK: one auth_failed event
    api.exchange(ini, ini.start(time.monotonic()))
    t.join(timeout=WAIT)
    assert got == [0]
    line = capsys.readouterr().out
    assert " auth_failed resp " in line and "pre-shared key" in line
