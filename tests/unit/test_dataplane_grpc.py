"""The dataplane worker's gRPC API (ipsec.v1.Dataplane) in-process over a unix socket with mTLS,
without packet I/O; plus the packet loop's error containment and the fan-out queues."""

from __future__ import annotations

import base64
import ipaddress
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from prometheus_client import generate_latest

from services.core.engine import Dataplane, Outbound, UdpKind
from services.core.events import Acquire
from services.core.packet import build_ipv4
from services.core.sa import Direction, Lifetime, Mode, SaConfig, UdpEncap
from services.core.selectors import Selector
from services.core.spd import Action, SpdEntry
from services.dataplane import convert, metrics
from services.dataplane.client import DataplaneClient, sa_config
from services.dataplane.convert import IkeDatagram
from services.dataplane.grpc_api import GrpcServer, load_server_credentials
from services.dataplane.worker import EngineHost, FanOut, PacketLoop, TunSource
from services.pb.ipsec.v1 import dataplane_pb2 as pb
from services.pb.ipsec.v1 import dataplane_pb2_grpc as pb_grpc
from services.runtime import devpki
from services.runtime.logging import StderrHandler, configure_logging

LOCAL4, PEER4 = "192.0.2.1", "192.0.2.2"
LOCAL6, PEER6 = "2001:db8::1", "2001:db8::2"


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tls")
    devpki.create(d, ["server", "client"])
    return d


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tls-other")
    devpki.create(d, ["server", "client"])
    return d


@dataclass
class FakeInjector:
    sent: list[IkeDatagram] = field(default_factory=list)

    def inject(self, d: IkeDatagram) -> None:
        self.sent.append(d)


@dataclass
class Env:
    host: EngineHost
    server: GrpcServer
    target: str
    injector: FakeInjector


@pytest.fixture
def env(pki: Path) -> Iterator[Env]:
    d = tempfile.mkdtemp(prefix="dpt", dir="/tmp")  # short: unix socket paths max 107 bytes
    target = f"unix:{d}/worker.sock"
    host = EngineHost("w-test", local_addresses=[LOCAL4, LOCAL6], interfaces=["ipsec0"])
    inj = FakeInjector()
    server = GrpcServer(host, target, load_server_credentials(pki), injector=inj)
    server.start()
    try:
        yield Env(host, server, target, inj)
    finally:
        server.stop(0)
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def client(env: Env, pki: Path) -> Iterator[DataplaneClient]:
    c = DataplaneClient(env.target, pki, server_name="server", client_name="client", timeout=10)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def stub(client: DataplaneClient) -> pb_grpc.DataplaneStub:
    return pb_grpc.DataplaneStub(client.channel)


def esp_out(spi: int = 0x1001, key: bytes | None = None, **kw: object) -> SaConfig:
    fields: dict[str, object] = dict(
        spi=spi,
        protocol="esp",
        direction="outbound",
        mode="tunnel",
        src=LOCAL4,
        dst=PEER4,
        encr_id=20,
        encr_key=key if key is not None else os.urandom(20),
        reqid=1,
    )
    fields.update(kw)
    return sa_config(**fields)


def valid_pb(key: bytes) -> pb.SAConfig:
    return pb.SAConfig(
        id=pb.SAId(spi=0x2001, dst=PEER4, protocol=pb.PROTOCOL_ESP, direction=pb.DIRECTION_INBOUND),
        mode=pb.MODE_TUNNEL,
        src=LOCAL4,
        encr_id=20,
        encr_key=key,
        reqid=3,
    )


# --- the SA API --------------------------------------------------------------------------------


def test_health_serving(client: DataplaneClient) -> None:
    assert client.serving()


def test_install_list_update_delete_round_trip(client: DataplaneClient) -> None:
    sel = Selector.make("10.1.0.0/16", "10.2.0.0/16", 6, dport=(443, 443))
    out = esp_out(
        spi=0x1001,
        lifetime=Lifetime(soft_seconds=100, hard_seconds=120, hard_bytes=10**9),
        selectors=(sel,),
        encap=UdpEncap(4500, 4501),
        seq_lease_end=1000,
    )
    ah_in = sa_config(
        spi=0x3003,
        protocol="ah",
        direction="inbound",
        mode="transport",
        src=PEER6,
        dst=LOCAL6,
        integ_id=12,
        integ_key=os.urandom(32),
        esn=True,
        replay_window=1024,
        reqid=2,
    )
    client.install_sa(out)
    client.install_sa(ah_in)
    sas = {(s.spi, s.direction): s for s in client.list_sas()}
    assert set(sas) == {(0x1001, Direction.OUTBOUND), (0x3003, Direction.INBOUND)}
    o = sas[(0x1001, Direction.OUTBOUND)]
    assert (o.protocol, o.mode, o.encr, o.encap, o.reqid) == (50, "tunnel", "aes-gcm-16", True, 1)
    assert (o.src, o.dst, o.lease_end, o.next_seq) == (out.src, out.dst, 1000, 1)
    a = sas[(0x3003, Direction.INBOUND)]
    assert (a.protocol, a.mode, a.integ, a.esn, a.replay_window) == (
        51,
        "transport",
        12,
        True,
        1024,
    )
    assert a.dst == ipaddress.ip_address(LOCAL6).packed

    client.update_sa(
        0x1001,
        PEER4,
        "esp",
        "outbound",
        seq_lease_end=5000,
        lifetime=Lifetime(soft_seconds=10, hard_seconds=20),
    )
    o2 = next(s for s in client.list_sas() if s.spi == 0x1001)
    assert o2.lease_end == 5000
    with pytest.raises(grpc.RpcError) as ei:
        client.update_sa(0x9999, PEER4, "esp", "outbound", seq_lease_end=5)
    assert ei.value.code() == grpc.StatusCode.NOT_FOUND

    st = client.stats()
    assert (st.worker_id, st.sa_count, st.interfaces) == ("w-test", 2, ("ipsec0",))
    assert st.local_addresses == (LOCAL4, LOCAL6)

    assert client.delete_sa(0x1001, PEER4, "esp", "outbound") is True
    assert client.delete_sa(0x1001, PEER4, "esp", "outbound") is False
    assert client.delete_sa(0x3003, LOCAL6, "ah", Direction.INBOUND) is True
    assert client.list_sas() == []


def test_duplicate_install_is_already_exists(client: DataplaneClient) -> None:
    cfg = esp_out(spi=0x4444)
    client.install_sa(cfg)
    with pytest.raises(grpc.RpcError) as ei:
        client.install_sa(cfg)
    assert ei.value.code() == grpc.StatusCode.ALREADY_EXISTS
    # the same SPI under another reqid still names the same SA: refused as well
    with pytest.raises(grpc.RpcError) as ei:
        client.install_sa(esp_out(spi=0x4444, reqid=77))
    assert ei.value.code() == grpc.StatusCode.ALREADY_EXISTS


INVALID: list[tuple[str, object]] = [
    ("spi reserved", lambda m: setattr(m.id, "spi", 255)),
    ("spi zero", lambda m: setattr(m.id, "spi", 0)),
    ("dst not an address", lambda m: setattr(m.id, "dst", "not-an-ip")),
    ("dst empty", lambda m: setattr(m.id, "dst", "")),
    ("src unspecified", lambda m: setattr(m, "src", "0.0.0.0")),
    ("mixed families", lambda m: setattr(m, "src", LOCAL6)),
    ("protocol unspecified", lambda m: setattr(m.id, "protocol", 0)),
    ("protocol unknown", lambda m: setattr(m.id, "protocol", 17)),
    ("direction unspecified", lambda m: setattr(m.id, "direction", 0)),
    ("mode unspecified", lambda m: setattr(m, "mode", 0)),
    ("encap port", lambda m: m.encap.CopyFrom(pb.UdpEncap(sport=70000))),
    ("lifetime negative", lambda m: setattr(m.lifetime, "soft_seconds", -1.0)),
    ("lifetime nan", lambda m: setattr(m.lifetime, "hard_seconds", float("nan"))),
    ("lifetime inf", lambda m: setattr(m.lifetime, "hard_seconds", float("inf"))),
    ("soft over hard", lambda m: m.lifetime.CopyFrom(pb.Lifetime(soft_bytes=10, hard_bytes=5))),
    ("replay window", lambda m: setattr(m, "replay_window", 10**6)),
    ("key length", lambda m: setattr(m, "encr_key", m.encr_key[:-3])),
    ("key huge", lambda m: setattr(m, "encr_key", m.encr_key * 100)),
    ("unknown cipher", lambda m: setattr(m, "encr_id", 999)),
    ("legacy cipher", lambda m: setattr(m, "encr_id", 3)),
    ("aead with integ", lambda m: setattr(m, "integ_id", 12)),
    (
        "lease end before start",
        lambda m: (setattr(m, "seq_lease_start", 10), setattr(m, "seq_lease_end", 5)),
    ),
    ("lease start beyond 32 bits", lambda m: setattr(m, "seq_lease_start", 2**40)),
    ("tfc", lambda m: setattr(m, "tfc_pad_to", 70000)),
    ("selector prefix", lambda m: m.selectors.add(src="10.0.0.0/99", dst="10.0.0.0/8")),
    ("selector families", lambda m: m.selectors.add(src="10.0.0.0/8", dst="::/0")),
    (
        "selector ports",
        lambda m: m.selectors.add(src="10.0.0.0/8", dst="10.0.0.0/8", dport_lo=10, dport_hi=5),
    ),
    ("selector proto", lambda m: m.selectors.add(src="10.0.0.0/8", dst="10.0.0.0/8", proto=300)),
    ("no id", lambda m: m.ClearField("id")),
]


@pytest.mark.parametrize(("what", "mutate"), INVALID, ids=[w for w, _ in INVALID])
def test_invalid_fields_are_invalid_argument(
    stub: pb_grpc.DataplaneStub, env: Env, what: str, mutate: object
) -> None:
    key = os.urandom(20)
    m = valid_pb(key)
    mutate(m)  # type: ignore[operator]
    with pytest.raises(grpc.RpcError) as ei:
        stub.InstallSA(pb.InstallSARequest(sa=m), timeout=10)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT, ei.value.details()
    details = ei.value.details() or ""
    assert key.hex() not in details.lower()
    assert env.host.list_sas() == []
    assert env.host.io.internal_errors == 0


def test_missing_sa_is_invalid_argument(stub: pb_grpc.DataplaneStub) -> None:
    with pytest.raises(grpc.RpcError) as ei:
        stub.InstallSA(pb.InstallSARequest(), timeout=10)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_valid_pb_installs(stub: pb_grpc.DataplaneStub, env: Env) -> None:
    stub.InstallSA(pb.InstallSARequest(sa=valid_pb(os.urandom(20))), timeout=10)
    assert len(env.host.list_sas()) == 1


# --- SPD ---------------------------------------------------------------------------------------


def test_replace_spd_revisions(client: DataplaneClient, stub: pb_grpc.DataplaneStub) -> None:
    e = SpdEntry(1, 10, Action.PROTECT, Selector.make("10.0.0.0/8", "10.0.0.0/8"), reqid=1)
    assert client.replace_spd([e], 5) == 5
    assert client.replace_spd([e], 5) == 5  # same revision: re-applied
    with pytest.raises(grpc.RpcError) as ei:
        client.replace_spd([e], 4)
    assert ei.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert client.stats().spd_revision == 5
    bad = pb.ReplaceSPDRequest(
        revision=6,
        entries=[
            pb.SPDEntry(
                policy_id=1,
                action=pb.ACTION_BYPASS,
                selector=pb.TrafficSelector(src="10.0.0.0/8", dst="10.0.0.0/8"),
            ),
            pb.SPDEntry(
                policy_id=1,
                action=pb.ACTION_BYPASS,
                selector=pb.TrafficSelector(src="10.0.0.0/8", dst="10.0.0.0/8"),
            ),
        ],
    )
    with pytest.raises(grpc.RpcError) as ei:
        stub.ReplaceSPD(bad, timeout=10)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    no_action = pb.ReplaceSPDRequest(
        revision=6,
        entries=[
            pb.SPDEntry(
                policy_id=2, selector=pb.TrafficSelector(src="10.0.0.0/8", dst="10.0.0.0/8")
            )
        ],
    )
    with pytest.raises(grpc.RpcError) as ei:
        stub.ReplaceSPD(no_action, timeout=10)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert client.stats().spd_revision == 5


# --- mTLS --------------------------------------------------------------------------------------


def _call_with(creds: grpc.ChannelCredentials, target: str) -> grpc.StatusCode:
    ch = grpc.secure_channel(target, creds, options=[("grpc.ssl_target_name_override", "server")])
    try:
        pb_grpc.DataplaneStub(ch).InstallSA(
            pb.InstallSARequest(sa=valid_pb(os.urandom(20))), timeout=5
        )
    except grpc.RpcError as e:
        return e.code()
    finally:
        ch.close()
    return grpc.StatusCode.OK


def test_client_without_certificate_is_refused(env: Env, pki: Path) -> None:
    creds = grpc.ssl_channel_credentials(root_certificates=(pki / "ca.pem").read_bytes())
    assert _call_with(creds, env.target) == grpc.StatusCode.UNAVAILABLE
    assert env.host.list_sas() == []


def test_client_cert_from_another_ca_is_refused(env: Env, pki: Path, other_pki: Path) -> None:
    creds = grpc.ssl_channel_credentials(
        root_certificates=(pki / "ca.pem").read_bytes(),  # trusts the server...
        private_key=(other_pki / "client.key").read_bytes(),  # ...but is not trusted by it
        certificate_chain=(other_pki / "client.pem").read_bytes(),
    )
    assert _call_with(creds, env.target) == grpc.StatusCode.UNAVAILABLE
    assert env.host.list_sas() == []


def test_insecure_client_is_refused(env: Env) -> None:
    ch = grpc.insecure_channel(env.target)
    with pytest.raises(grpc.RpcError) as ei:
        pb_grpc.DataplaneStub(ch).ListSAs(pb.ListSAsRequest(), timeout=5)
    ch.close()
    assert ei.value.code() == grpc.StatusCode.UNAVAILABLE


def test_client_rejects_server_from_another_ca(env: Env, other_pki: Path) -> None:
    c = DataplaneClient(
        env.target, other_pki, server_name="server", client_name="client", timeout=5
    )
    with pytest.raises(grpc.RpcError) as ei:
        c.list_sas()
    c.close()
    assert ei.value.code() == grpc.StatusCode.UNAVAILABLE


# --- keys never leak ---------------------------------------------------------------------------


@pytest.fixture
def json_logs() -> Iterator[None]:
    root = logging.getLogger()
    old_level = root.level
    configure_logging("debug")
    try:
        yield
    finally:
        for h in list(root.handlers):
            if isinstance(h, StderrHandler):
                root.removeHandler(h)
        root.setLevel(old_level)


def _forms(key: bytes) -> list[bytes]:
    return [key, key.hex().encode(), key.hex().upper().encode(), base64.b64encode(key)]


def test_keys_never_in_responses_or_logs(
    client: DataplaneClient,
    stub: pb_grpc.DataplaneStub,
    env: Env,
    json_logs: None,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    keys: list[bytes] = []

    def k(n: int) -> bytes:
        key = os.urandom(n)
        keys.append(key)
        return key

    client.install_sa(esp_out(spi=0x5001, key=k(20), encap=True))
    client.install_sa(esp_out(spi=0x5002, key=k(36), direction="inbound", src=PEER4, dst=LOCAL4))
    client.install_sa(
        sa_config(
            spi=0x5003,
            protocol="esp",
            direction="outbound",
            mode="transport",
            src=LOCAL6,
            dst=PEER6,
            encr_id=12,
            encr_key=k(16),
            integ_id=12,
            integ_key=k(32),
        )
    )
    client.install_sa(
        sa_config(
            spi=0x5004,
            protocol="ah",
            direction="inbound",
            mode="tunnel",
            src=PEER6,
            dst=LOCAL6,
            integ_id=14,
            integ_key=k(64),
        )
    )
    # rejected installs carry keys too
    for cfg in (valid_pb(k(13)), valid_pb(k(20))):
        cfg.integ_id = 12
        cfg.integ_key = k(31)
        with pytest.raises(grpc.RpcError):
            stub.InstallSA(pb.InstallSARequest(sa=cfg), timeout=10)
    with pytest.raises(grpc.RpcError):
        client.install_sa(esp_out(spi=0x5001, key=k(20), encap=True))  # duplicate
    client.update_sa(0x5001, PEER4, "esp", "outbound", seq_lease_end=99)

    listed = stub.ListSAs(pb.ListSAsRequest(), timeout=10)
    stats = stub.GetStats(pb.GetStatsRequest(), timeout=10)
    assert len(listed.sas) == 4
    scraped = generate_latest(metrics.registry_for(env.host))
    assert b'spi="0x00005001"' in scraped
    blobs = {
        "ListSAs": listed.SerializeToString() + str(listed).encode(),
        "GetStats": stats.SerializeToString() + str(stats).encode(),
        "metrics": scraped,
        "caplog": caplog.text.encode(),
        "records": "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records).encode(),
        "stderr": capsys.readouterr().err.encode(),
        "sa_repr": repr(client.list_sas()).encode(),
    }
    assert blobs["stderr"], "the JSON log handler wrote nothing"
    assert b'"msg":"sa installed"' in blobs["stderr"]
    for where, blob in blobs.items():
        for key in keys:
            for form in _forms(key):
                assert form not in blob, f"key material in {where}"
                assert form.lower() not in blob.lower() or len(form) < 8, where


def test_log_formatter_redacts_bytes(json_logs: None, capsys: pytest.CaptureFixture[str]) -> None:
    secret = os.urandom(16)
    logging.getLogger("t").warning("value %s", secret, extra={"blob": secret})
    err = capsys.readouterr().err
    assert "<16 bytes>" in err
    assert secret.hex() not in err
    assert repr(secret) not in err


# --- events ------------------------------------------------------------------------------------


def test_watch_events_delivers_acquire(client: DataplaneClient, env: Env) -> None:
    entry = SpdEntry(42, 1, Action.PROTECT, Selector.make("10.0.0.0/24", "10.9.0.0/24"), reqid=7)
    client.replace_spd([entry], 1)
    stream = client.events()  # subscribed when this returns
    got: list[object] = []

    def consume() -> None:
        for we in stream:
            got.append(we)
            return

    t = threading.Thread(target=consume, daemon=True)
    t.start()
    src = ipaddress.ip_address("10.0.0.5").packed
    dst = ipaddress.ip_address("10.9.0.9").packed
    pkt = build_ipv4(src, dst, 17, 8) + b"\x30\x39\x00\x35\x00\x08\x00\x00"
    with env.host.locked() as eng:
        assert eng.outbound(pkt, env.host.now()) is None  # no SA: ACQUIRE, packet dropped
    t.join(10)
    stream.cancel()
    assert got, "no event delivered"
    we = got[0]
    assert we.worker_id == "w-test"  # type: ignore[attr-defined]
    ev = we.event  # type: ignore[attr-defined]
    assert isinstance(ev, Acquire)
    assert (ev.policy_id, ev.reqid, ev.src, ev.dst, ev.proto, ev.sport, ev.dport) == (
        42,
        7,
        src,
        dst,
        17,
        12345,
        53,
    )
    assert client.stats().drops.get("acquire_pending") == 1


def test_event_direction_is_resolved(env: Env) -> None:
    sub = env.host.events.subscribe()
    with env.host.locked() as eng:
        eng.install_sa(esp_out(spi=0x7777, lifetime=Lifetime(soft_seconds=1)), 0.0)
        eng.tick(5.0)
    we = sub.get(1)
    assert we is not None
    assert we.direction == Direction.OUTBOUND


# --- punt / inject -----------------------------------------------------------------------------


def test_punt_stream_delivers_and_injects(client: DataplaneClient, env: Env) -> None:
    with client.punt() as stream:
        d = IkeDatagram(LOCAL4, 500, PEER4, 500, b"\x01" * 28)
        env.host.punts.publish([d])
        it = iter(stream)
        assert next(it) == d
        stream.send(IkeDatagram(LOCAL6, 4500, PEER6, 4501, b"ike"))
        deadline = time.monotonic() + 10
        while not env.injector.sent and time.monotonic() < deadline:
            time.sleep(0.01)
        assert env.injector.sent == [IkeDatagram(LOCAL6, 4500, PEER6, 4501, b"ike")]
    assert _wait(lambda: env.host.punts.subscribers == 0)
    assert env.host.io.internal_errors == 0
    assert env.host.io.injected == 1


@pytest.mark.parametrize(
    "dgram",
    [
        IkeDatagram("192.0.2.99", 500, PEER4, 500, b"x"),  # not our address
        IkeDatagram(LOCAL4, 501, PEER4, 500, b"x"),  # not our port
    ],
)
def test_punt_rejects_foreign_local_address(
    client: DataplaneClient, env: Env, dgram: IkeDatagram
) -> None:
    stream = client.punt()
    stream.send(dgram)
    with pytest.raises(grpc.RpcError) as ei:
        for _ in stream:
            pass
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert env.injector.sent == []


def test_punt_half_close_ends_stream(client: DataplaneClient) -> None:
    stream = client.punt()
    stream.close()
    assert list(stream) == []


def test_cancelled_streams_are_not_errors(client: DataplaneClient, env: Env) -> None:
    ev = client.events()
    pu = client.punt()
    assert _wait(lambda: env.host.events.subscribers == 1 and env.host.punts.subscribers == 1)
    ev.cancel()
    pu.cancel()
    assert _wait(lambda: env.host.events.subscribers == 0 and env.host.punts.subscribers == 0)
    assert env.host.io.internal_errors == 0
    assert client.serving()


def test_punt_batch_carries_what_is_queued_in_order(stub: pb_grpc.DataplaneStub, env: Env) -> None:
    """PuntBatch: datagrams queued together travel in few messages, in order."""
    sent = [IkeDatagram(LOCAL4, 500, PEER4, 500, i.to_bytes(2, "big") * 14) for i in range(150)]
    stop = threading.Event()

    def requests() -> Iterator[pb.IkeDatagramBatch]:
        stop.wait(10)  # half-closing would end the stream
        yield from ()

    call = stub.PuntBatch(requests(), timeout=10)
    call.initial_metadata()
    assert _wait(lambda: env.host.punts.subscribers == 1)
    env.host.punts.publish(sent)
    got: list[IkeDatagram] = []
    sizes: list[int] = []
    for m in call:
        sizes.append(len(m.datagrams))
        got += [convert.ike_from_pb(x) for x in m.datagrams]
        if len(got) >= len(sent):
            break
    stop.set()
    call.cancel()
    assert got == sent
    assert len(sizes) < len(sent) and max(sizes) <= 64, sizes


def test_punt_batch_injects_in_order_and_stops_at_a_bad_datagram(
    client: DataplaneClient, stub: pb_grpc.DataplaneStub, env: Env
) -> None:
    good = [IkeDatagram(LOCAL4, 4500, PEER4, 4500, bytes([i]) * 30) for i in range(5)]
    bad = IkeDatagram("192.0.2.99", 500, PEER4, 500, b"x")
    msgs = [
        convert.ike_batch_to_pb(good[:3]),
        convert.ike_batch_to_pb([]),
        convert.ike_batch_to_pb([*good[3:], bad, good[0]]),
    ]
    call = stub.PuntBatch(iter(msgs), timeout=10)
    with pytest.raises(grpc.RpcError) as ei:
        for _ in call:
            pass
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert env.injector.sent == good


def test_punt_stream_sends_many_in_order(client: DataplaneClient, env: Env) -> None:
    many = [IkeDatagram(LOCAL6, 500, PEER6, 500, i.to_bytes(4, "big")) for i in range(300)]
    with client.punt() as stream:
        assert stream.batch
        for d in many:
            stream.send(d)
        assert _wait(lambda: len(env.injector.sent) == len(many))
    assert env.injector.sent == many


def test_punt_falls_back_to_single_messages_without_punt_batch(
    pki: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker without PuntBatch (UNIMPLEMENTED): the client uses Punt."""
    from services.dataplane import grpc_api

    class OldService(grpc_api.DataplaneService):
        PuntBatch = pb_grpc.DataplaneServicer.PuntBatch  # type: ignore[assignment]

    monkeypatch.setattr(grpc_api, "DataplaneService", OldService)
    d = tempfile.mkdtemp(prefix="dpt", dir="/tmp")
    host = EngineHost("w-old", local_addresses=[LOCAL4])
    inj = FakeInjector()
    server = GrpcServer(host, f"unix:{d}/w.sock", load_server_credentials(pki), injector=inj)
    server.start()
    c = DataplaneClient(f"unix:{d}/w.sock", pki, server_name="server", client_name="client")
    try:
        with c.punt() as stream:
            assert not stream.batch
            host.punts.publish([IkeDatagram(LOCAL4, 500, PEER4, 500, b"\x02" * 28)])
            assert next(iter(stream)).data == b"\x02" * 28
            stream.send(IkeDatagram(LOCAL4, 500, PEER4, 500, b"ike"))
            assert _wait(lambda: len(inj.sent) == 1)
    finally:
        c.close()
        server.stop(0)
        shutil.rmtree(d, ignore_errors=True)


def test_keep_ipv4_ident_sets_df_only_for_ah_with_zero_id() -> None:
    from services.core.packet import checksum
    from services.dataplane.worker import keep_ipv4_ident

    a, b = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
    ah = build_ipv4(a, b, 51, 24) + bytes(24)
    fixed = keep_ipv4_ident(ah)
    assert fixed[6] & 0x40 and fixed[:6] == ah[:6] and fixed[7:] == ah[7:]
    assert checksum(ah[:20]) == 0  # the kernel recomputes the checksum of hdrincl sends
    for untouched in (
        build_ipv4(a, b, 50, 24) + bytes(24),  # ESP: ID not covered by an ICV
        build_ipv4(a, b, 51, 24, ident=7) + bytes(24),  # ID already set
        build_ipv4(a, b, 51, 24, df=True) + bytes(24),  # DF already set
    ):
        assert keep_ipv4_ident(untouched) == untouched


# --- fan-out -----------------------------------------------------------------------------------


def test_fanout_drops_oldest_when_full() -> None:
    hub: FanOut[int] = FanOut(maxsize=3)
    sub = hub.subscribe()
    hub.publish([1, 2, 3, 4, 5])
    assert [sub.get(0), sub.get(0), sub.get(0), sub.get(0)] == [3, 4, 5, None]
    assert sub.dropped == 2 and hub.dropped == 2
    sub.close()
    assert hub.subscribers == 0


# --- the packet loop ---------------------------------------------------------------------------


class PairTun:
    """A TUN stand-in: one end of a SOCK_DGRAM socketpair (packet boundaries preserved)."""

    def __init__(self) -> None:
        self.ours, self.theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.ours.setblocking(False)

    def fileno(self) -> int:
        return self.ours.fileno()

    def read(self) -> bytes | None:
        try:
            return self.ours.recv(65535)
        except BlockingIOError:
            return None

    def write(self, pkt: bytes) -> None:
        self.ours.send(pkt)


@dataclass
class ListSender:
    sent: list[Outbound] = field(default_factory=list)

    def send(self, out: Outbound) -> None:
        self.sent.append(out)


def _wait(cond: object, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return True
        time.sleep(0.01)
    return False


def test_packet_loop_survives_engine_exceptions(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.DEBUG)
    host = EngineHost("w-loop")
    tun = PairTun()
    sender = ListSender()
    loop = PacketLoop(host, [TunSource(tun)], tun=tun, sender=sender, tick_interval=0.05)
    bypass = SpdEntry(1, 1, Action.BYPASS, Selector.make("0.0.0.0/0", "0.0.0.0/0"))
    host.engine.replace_spd([bypass], 1)
    marker = b"SECRET-PAYLOAD-MARKER"
    pkt = build_ipv4(b"\x0a\0\0\1", b"\x0a\0\0\2", 17, 8 + len(marker)) + bytes(8) + marker
    real = host.engine.outbound
    calls = {"n": 0}

    def flaky(p: bytes, now: float) -> Outbound | None:
        calls["n"] += 1
        if calls["n"] % 2:
            raise KeyError(p)  # an exception whose message would quote the packet
        return real(p, now)

    monkeypatch.setattr(host.engine, "outbound", flaky)
    loop.start()
    try:
        for _ in range(10):
            tun.theirs.send(pkt)
        assert _wait(lambda: calls["n"] == 10 and len(sender.sent) == 5)
        assert host.io.internal_errors == 5
        assert loop.alive
        ticks = loop.iterations
        assert _wait(lambda: loop.iterations > ticks)  # still ticking
    finally:
        loop.stop()
    assert not loop.alive
    assert host.io.tun_rx_packets == 10
    assert all(o.packet == pkt for o in sender.sent)
    text = caplog.text + " ".join(str(r.__dict__) for r in caplog.records)
    assert "internal error" in text
    assert marker.decode() not in text and marker.hex() not in text


def test_inbound_transport_udp_is_delivered() -> None:
    """Regression: the core once re-parsed a transport-mode SA's clear UDP datagram as
    ESP-in-UDP and dropped it as no_sa (fixed in Dataplane.inbound: only the first pass)."""
    a, b = ipaddress.ip_address(LOCAL4).packed, ipaddress.ip_address(PEER4).packed
    key = os.urandom(20)
    common = dict(
        spi=0x1000,
        protocol=50,
        mode=Mode.TRANSPORT,
        src=a,
        dst=b,
        encr_id=20,
        encr_key=key,
        reqid=1,
    )
    tx, rx = Dataplane(), Dataplane()
    tx.install_sa(SaConfig(direction=Direction.OUTBOUND, **common), 0)  # type: ignore[arg-type]
    rx.install_sa(SaConfig(direction=Direction.INBOUND, **common), 0)  # type: ignore[arg-type]
    policy = SpdEntry(1, 1, Action.PROTECT, Selector.make(f"{LOCAL4}/32", f"{PEER4}/32"), reqid=1)
    tx.replace_spd([policy], 1)
    for proto in (6, 17):
        payload = b"\x12\x34\x00\x35\x00\x10\x00\x00abcdefgh"
        pkt = build_ipv4(a, b, proto, len(payload)) + payload
        out = tx.outbound(pkt, 0)
        assert out is not None
        assert rx.inbound(out.packet, 0) == pkt, proto
    # ESP-in-UDP still works through inbound_udp
    tx2, rx2 = Dataplane(), Dataplane()
    enc = dict(common, encap=UdpEncap(), spi=0x2000)
    tx2.install_sa(SaConfig(direction=Direction.OUTBOUND, **enc), 0)  # type: ignore[arg-type]
    rx2.install_sa(SaConfig(direction=Direction.INBOUND, **enc), 0)  # type: ignore[arg-type]
    tx2.replace_spd([policy], 1)
    pkt = build_ipv4(a, b, 17, 16) + b"\x12\x34\x00\x35\x00\x10\x00\x00abcdefgh"
    out = tx2.outbound(pkt, 0)
    assert out is not None and out.udp_offset == 28
    kind, clear = rx2.inbound_udp(a, b, 4500, 4500, out.packet[out.udp_offset :], 0)
    assert kind is UdpKind.ESP and clear == pkt


# --- settings / CLI ----------------------------------------------------------------------------


def test_flags_override_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.dataplane.__main__ import settings_from_args

    monkeypatch.setenv("DATAPLANE_WORKER_ID", "from-env")
    monkeypatch.setenv("DATAPLANE_ROUTE", "10.1.0.0/16, fd00:1::/64")
    monkeypatch.setenv("DATAPLANE_FWMARK", "0x20")
    monkeypatch.setenv("DATAPLANE_TUN_MTU", "1300")
    s = settings_from_args(
        [
            "--worker-id",
            "from-flag",
            "--local-address",
            "192.0.2.1",
            "--local-address",
            "2001:db8::1",
            "--table",
            "200",
            "--metrics-listen",
            "",
        ]
    )
    assert s.worker_id == "from-flag"
    assert s.route == ["10.1.0.0/16", "fd00:1::/64"]
    assert (s.fwmark, s.table, s.tun_mtu, s.metrics_listen) == (0x20, 200, 1300, "")
    assert s.local_address == ["192.0.2.1", "2001:db8::1"]
    s2 = settings_from_args(["--route", "10.3.0.0/24"])
    assert s2.route == ["10.3.0.0/24"] and s2.worker_id == "from-env"


@pytest.mark.parametrize(
    "argv",
    [
        ["--table", "254"],
        ["--local-address", "0.0.0.0"],
        ["--route", "nope"],
        ["--grpc-listen", "localhost"],
        ["--tun-mtu", "100"],
        ["--tun", "x" * 16],
    ],
)
def test_bad_settings_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from services.dataplane.__main__ import main

    assert main(argv) == 2
    assert "invalid setting" in capsys.readouterr().err


class _CaptureStub:
    """Stands in for the Dataplane stub: keeps the request iterator PuntStream hands over."""

    def __init__(self) -> None:
        self.requests: Iterator[pb.IkeDatagramBatch] | None = None

    def PuntBatch(self, requests: Iterator[pb.IkeDatagramBatch], timeout: object) -> None:
        self.requests = requests


def test_punt_stream_batches_what_is_queued_within_limits() -> None:
    from services.dataplane import client as dpc

    stub = _CaptureStub()
    stream = dpc.PuntStream(stub, None)  # type: ignore[arg-type]
    ds = [IkeDatagram(LOCAL4, 500, PEER4, 500, i.to_bytes(2, "big")) for i in range(150)]
    stream.send(ds[0])
    stream.send_many(ds[1:5])
    stream.send_many([])
    stream.send_many(ds[5:])
    stream.close()
    assert stub.requests is not None
    msgs = [[convert.ike_from_pb(x) for x in m.datagrams] for m in stub.requests]
    assert [len(m) for m in msgs] == [64, 64, 22]
    assert [d for m in msgs for d in m] == ds
    big = IkeDatagram(LOCAL4, 500, PEER4, 500, b"\x01" * 60000)
    stream = dpc.PuntStream(stub, None)  # type: ignore[arg-type]
    stream.send_many([big] * 20)
    stream.close()
    sizes = [len(m.datagrams) for m in stub.requests]
    assert sum(sizes) == 20 and max(sizes) == 18  # about 1 MiB per message
    with pytest.raises(RuntimeError):
        stream.send_many([big])
