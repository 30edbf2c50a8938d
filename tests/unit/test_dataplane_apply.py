"""ApplySAs: one atomic batch of SA deletes, SA installs and an SPD replacement, in-process over
a unix socket with mTLS (as tests/unit/test_dataplane_grpc.py), plus the engine's batch apply
and the packet path during batches."""

from __future__ import annotations

import logging
import os
import random
import shutil
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.ipsec import ESP, SecurityAssociation

from services.core.engine import BatchFault, BatchRejected, Dataplane
from services.core.events import DropReason
from services.core.packet import build_ipv4
from services.core.sa import Direction, SaConfig
from services.core.selectors import Selector
from services.core.spd import Action, SpdEntry
from services.dataplane import convert
from services.dataplane.client import ApplyFuture, DataplaneClient, sa_config
from services.dataplane.convert import (
    MAX_BATCH_DELETES,
    MAX_BATCH_INSTALLS,
    SaId,
    sa_config_to_pb,
)
from services.dataplane.grpc_api import GrpcServer, load_server_credentials
from services.dataplane.worker import EngineHost, PacketLoop, TunItem
from services.pb.ipsec.v1 import dataplane_pb2 as pb
from services.pb.ipsec.v1 import dataplane_pb2_grpc as pb_grpc
from services.runtime import devpki
from tests.unit.test_dataplane_grpc import INVALID, LOCAL4, PEER4, ListSender, valid_pb

INNER_A, INNER_B = "10.1.0.1", "10.2.0.1"
PEER4_PACKED = bytes([192, 0, 2, 2])
LOCAL4_PACKED = bytes([192, 0, 2, 1])


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tls")
    devpki.create(d, ["server", "client"])
    return d


@dataclass
class Env:
    host: EngineHost
    server: GrpcServer
    client: DataplaneClient
    stub: pb_grpc.DataplaneStub


@pytest.fixture
def env(pki: Path) -> Iterator[Env]:
    d = tempfile.mkdtemp(prefix="dpa", dir="/tmp")  # short: unix socket paths max 107 bytes
    target = f"unix:{d}/worker.sock"
    host = EngineHost("w-apply", local_addresses=[LOCAL4])
    server = GrpcServer(host, target, load_server_credentials(pki))
    server.start()
    client = DataplaneClient(target, pki, server_name="server", client_name="client", timeout=10)
    try:
        yield Env(host, server, client, pb_grpc.DataplaneStub(client.channel))
    finally:
        client.close()
        server.stop(0)
        shutil.rmtree(d, ignore_errors=True)


def pair(spi: int, reqid: int = 1, key: bytes | None = None) -> tuple[SaConfig, SaConfig]:
    """An inbound and an outbound AES-GCM-16-128 tunnel SA (SPIs spi and spi + 1)."""
    common = dict(protocol="esp", mode="tunnel", encr_id=20, reqid=reqid)
    inbound = sa_config(
        spi=spi, direction="inbound", src=PEER4, dst=LOCAL4, encr_key=os.urandom(20), **common
    )
    outbound = sa_config(
        spi=spi + 1,
        direction="outbound",
        src=LOCAL4,
        dst=PEER4,
        encr_key=key if key is not None else os.urandom(20),
        **common,
    )
    return inbound, outbound


def policy(reqid: int = 1, policy_id: int = 1) -> SpdEntry:
    sel = Selector.make(f"{INNER_A}/32", f"{INNER_B}/32")
    return SpdEntry(policy_id, 10, Action.PROTECT, sel, reqid=reqid)


def ids(host: EngineHost) -> set[tuple[int, Direction]]:
    return {(s.spi, s.direction) for s in host.list_sas()}


def clear_packet() -> bytes:
    a, b = bytes([10, 1, 0, 1]), bytes([10, 2, 0, 1])
    return build_ipv4(a, b, 17, 12) + b"\x30\x39\x00\x35\x00\x0c\x00\x00ping"


def _code_and_details(fn: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as ei:
        fn()  # type: ignore[operator]
    return ei.value.code(), ei.value.details() or ""


# --- success -----------------------------------------------------------------------------------


def test_install_with_spd_then_delete(env: Env) -> None:
    key = os.urandom(20)
    inbound, outbound = pair(0x1000, key=key)
    res = env.client.apply_sas(install=[inbound, outbound], spd=([policy()], 3))
    assert (res.installed, res.existed, res.spd_revision) == (2, (), 3)
    assert ids(env.host) == {(0x1000, Direction.INBOUND), (0x1001, Direction.OUTBOUND)}
    assert env.client.stats().spd_revision == 3

    # The installed outbound SA carries the policy's traffic: scapy (an independent ESP
    # implementation) decrypts what the engine sends with the key the batch installed.
    with env.host.locked() as eng:
        out = eng.outbound(clear_packet(), 0.0)
    assert out is not None
    sa = SecurityAssociation(
        ESP,
        spi=0x1001,
        crypt_algo="AES-GCM",
        crypt_key=key,
        tunnel_header=IP(src=LOCAL4, dst=PEER4),
    )
    inner = sa.decrypt(IP(out.packet))
    assert inner[IP].src == INNER_A and bytes(inner[UDP].payload) == b"ping"

    res = env.client.apply_sas(
        delete=[
            (0x1000, LOCAL4, "esp", "inbound"),
            (0x1001, PEER4, "esp", Direction.OUTBOUND),
            (0x7777, PEER4, "esp", "outbound"),  # unknown: reported, not fatal
            (0x1000, LOCAL4, "esp", "inbound"),  # twice in one batch: gone the second time
        ]
    )
    assert (res.installed, res.existed, res.spd_revision) == (0, (True, True, False, False), 3)
    assert ids(env.host) == set()
    assert env.host.io.internal_errors == 0


def test_empty_batch_changes_nothing(env: Env) -> None:
    env.client.replace_spd([policy()], 5)
    res = env.client.apply_sas()
    assert (res.installed, res.existed, res.spd_revision) == (0, (), 5)
    assert env.client.stats().spd_revision == 5


def test_rekey_in_one_batch_deletes_first(env: Env) -> None:
    old_in, old_out = pair(0x2000)
    env.client.apply_sas(install=[old_in, old_out], spd=([policy()], 1))
    new_in, new_out = pair(0x3000)
    again = sa_config(**{**_fields(old_in), "encr_key": os.urandom(20)})  # same id, new key
    res = env.client.apply_sas(
        install=[new_in, new_out, again],
        delete=[(0x2000, LOCAL4, "esp", "inbound"), (0x2001, PEER4, "esp", "outbound")],
    )
    assert res.existed == (True, True) and res.installed == 3
    assert ids(env.host) == {
        (0x2000, Direction.INBOUND),
        (0x3000, Direction.INBOUND),
        (0x3001, Direction.OUTBOUND),
    }


def _fields(cfg: SaConfig) -> dict[str, object]:
    return {f: getattr(cfg, f) for f in cfg.__dataclass_fields__}


def test_async_calls_overlap(env: Env) -> None:
    futures: list[ApplyFuture] = []
    called = threading.Event()
    for i in range(8):
        inbound, outbound = pair(0x4000 + 2 * i, reqid=i + 1)
        futures.append(env.client.apply_sas_async(install=[inbound, outbound]))
    futures[0].add_done_callback(lambda f: called.set())
    results = [f.result(timeout=10) for f in futures]
    assert all(r.installed == 2 for r in results)
    assert called.wait(5) and all(f.done() and f.exception() is None for f in futures)
    assert len(env.host.list_sas()) == 16
    # a refused call surfaces as grpc.RpcError from result()
    bad = env.client.apply_sas_async(install=[pair(0x4000)[0]])
    with pytest.raises(grpc.RpcError) as ei:
        bad.result(timeout=10)
    assert ei.value.code() == grpc.StatusCode.ALREADY_EXISTS


# --- all or nothing ----------------------------------------------------------------------------


@pytest.fixture
def populated(env: Env) -> Env:
    """One SA pair and SPD revision 5 in place: what every refused batch must leave alone."""
    env.client.apply_sas(install=list(pair(0x1000)), spd=([policy()], 5))
    return env


def assert_untouched(env: Env) -> None:
    assert ids(env.host) == {(0x1000, Direction.INBOUND), (0x1001, Direction.OUTBOUND)}
    st = env.client.stats()
    assert st.spd_revision == 5 and st.sa_count == 2
    with env.host.locked() as eng:
        assert [e.policy_id for e in eng.spd.entries] == [1]
    assert env.host.io.internal_errors == 0


def _batch_with(bad: SaConfig) -> dict[str, object]:
    """A batch that would delete the existing pair, install a good pair, then ``bad`` as
    install[2], and replace the SPD."""
    return dict(
        install=[*pair(0x5000, reqid=2), bad],
        delete=[(0x1000, LOCAL4, "esp", "inbound"), (0x1001, PEER4, "esp", "outbound")],
        spd=([policy(), policy(reqid=2, policy_id=2)], 6),
    )


def test_one_bad_sa_refuses_the_whole_batch(populated: Env) -> None:
    # the wrong key length passes conversion and is refused by the core when the SA is built,
    # i.e. after the deletes and the good installs of the batch were already checked
    bad = sa_config(**{**_fields(pair(0x6000)[1]), "encr_key": os.urandom(17)})
    code, details = _code_and_details(lambda: populated.client.apply_sas(**_batch_with(bad)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("install[2]: "), details
    assert_untouched(populated)


def test_existing_id_refuses_the_batch(populated: Env) -> None:
    taken = pair(0x1000)[0]  # exists and is not deleted by this batch
    code, details = _code_and_details(
        lambda: populated.client.apply_sas(install=[*pair(0x5000, reqid=2), taken])
    )
    assert code == grpc.StatusCode.ALREADY_EXISTS and details.startswith("install[2]: ")
    # the same id twice in one batch
    twice = pair(0x5000, reqid=2)[1]
    code, details = _code_and_details(
        lambda: populated.client.apply_sas(install=[twice, twice], spd=([policy()], 9))
    )
    assert code == grpc.StatusCode.ALREADY_EXISTS and details.startswith("install[1]: ")
    # an outbound id is unique across reqids, as for InstallSA
    other_reqid = sa_config(**{**_fields(pair(0x1000)[1]), "reqid": 9})
    code, details = _code_and_details(lambda: populated.client.apply_sas(install=[other_reqid]))
    assert code == grpc.StatusCode.ALREADY_EXISTS and details.startswith("install[0]: ")
    assert_untouched(populated)


def test_stale_spd_revision_refuses_the_batch(populated: Env) -> None:
    code, details = _code_and_details(
        lambda: populated.client.apply_sas(install=list(pair(0x5000, reqid=2)), spd=([], 4))
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION and details.startswith("spd: ")
    assert_untouched(populated)


def test_engine_refuses_a_bad_spd_after_checking_the_sas() -> None:
    """Spd.replace's own checks run after every SA was built: still nothing changes."""
    eng = Dataplane()
    a_in, a_out = pair(0x1000)
    eng.apply_batch([a_in, a_out], [], ([policy()], 1), 0.0)
    bad = SpdEntry(2, 5, Action.PROTECT, policy().selector, reqid=2, protocols=(17,))
    with pytest.raises(BatchRejected) as ei:
        eng.apply_batch(
            list(pair(0x5000, reqid=2)),
            [(0x1001, PEER4_PACKED, 50, Direction.OUTBOUND)],
            ([bad], 2),
            0.0,
        )
    assert ei.value.item == "spd" and ei.value.fault is BatchFault.INVALID
    assert {s.spi for s in eng.all_sas()} == {0x1000, 0x1001}
    assert eng.spd.revision == 1 and [e.policy_id for e in eng.spd.entries] == [1]


# --- limits and malformed requests -------------------------------------------------------------


def test_batch_size_limits(env: Env) -> None:
    many = [pair(0x10000 + 2 * i, reqid=i + 1)[0] for i in range(MAX_BATCH_INSTALLS + 1)]
    code, details = _code_and_details(lambda: env.client.apply_sas(install=many))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("install: at most 256")
    dels = [(0x9000 + i, PEER4, "esp", "outbound") for i in range(MAX_BATCH_DELETES + 1)]
    code, details = _code_and_details(lambda: env.client.apply_sas(delete=dels))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("delete: at most 256")
    assert ids(env.host) == set()
    # exactly at the limits: accepted
    res = env.client.apply_sas(install=many[:MAX_BATCH_INSTALLS], delete=dels[:-1])
    assert res.installed == MAX_BATCH_INSTALLS and res.existed == (False,) * MAX_BATCH_DELETES
    assert len(env.host.list_sas()) == MAX_BATCH_INSTALLS


@pytest.mark.parametrize(("what", "mutate"), INVALID, ids=[w for w, _ in INVALID])
def test_each_invalid_sa_field_names_its_item(env: Env, what: str, mutate: object) -> None:
    """Every field InstallSA refuses is refused inside a batch too, naming the item."""
    key = os.urandom(20)
    m = valid_pb(key)
    mutate(m)  # type: ignore[operator]
    good = sa_config_to_pb(pair(0x5000)[1])
    req = pb.ApplySAsRequest(install=[good, m])
    code, details = _code_and_details(lambda: env.stub.ApplySAs(req, timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert details.startswith("install[1]: "), details
    assert key.hex() not in details.lower()
    assert env.host.list_sas() == [] and env.host.io.internal_errors == 0


BAD_IDS = [
    ("spi zero", pb.SAId(spi=0, dst=PEER4, protocol=pb.PROTOCOL_ESP, direction=1)),
    ("dst", pb.SAId(spi=300, dst="nope", protocol=pb.PROTOCOL_ESP, direction=1)),
    ("dst scoped", pb.SAId(spi=300, dst="fe80::1%eth0", protocol=pb.PROTOCOL_ESP, direction=1)),
    ("protocol", pb.SAId(spi=300, dst=PEER4, protocol=0, direction=1)),
    ("direction", pb.SAId(spi=300, dst=PEER4, protocol=pb.PROTOCOL_AH, direction=7)),
]


@pytest.mark.parametrize(("what", "sid"), BAD_IDS, ids=[w for w, _ in BAD_IDS])
def test_invalid_delete_ids_name_their_item(populated: Env, what: str, sid: pb.SAId) -> None:
    good = pb.SAId(spi=0x1000, dst=LOCAL4, protocol=pb.PROTOCOL_ESP, direction=1)
    req = pb.ApplySAsRequest(delete=[good, sid])
    code, details = _code_and_details(lambda: populated.stub.ApplySAs(req, timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("delete[1]: ")
    assert_untouched(populated)


def test_invalid_spd_entry_names_it(populated: Env) -> None:
    req = pb.ApplySAsRequest(
        install=[sa_config_to_pb(pair(0x5000)[0])],
        spd=pb.ReplaceSPDRequest(
            revision=7,
            entries=[pb.SPDEntry(policy_id=2, selector=pb.TrafficSelector(src="10.0.0.0/8"))],
        ),
    )
    code, details = _code_and_details(lambda: populated.stub.ApplySAs(req, timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("spd: entries[0]")
    assert_untouched(populated)


def test_mutated_requests_never_crash(env: Env) -> None:
    """Bit-flipped and truncated encodings of a valid batch: each call ends with a status (OK or
    a refusal), the handler never fails internally and the server keeps serving."""
    rng = random.Random(7)
    wire = convert.apply_request(
        pair(0x8000), [SaId(0x9000, PEER4_PACKED, 50, Direction.OUTBOUND)], ([policy()], 1)
    ).SerializeToString()
    raw = env.client.channel.unary_unary(
        "/ipsec.v1.Dataplane/ApplySAs",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    codes: set[grpc.StatusCode] = set()
    for i in range(300):
        data = bytearray(wire)
        if i % 3 == 0:
            data = data[: rng.randrange(len(data))]
        else:
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        try:
            raw(bytes(data), timeout=10)
            codes.add(grpc.StatusCode.OK)
        except grpc.RpcError as e:
            codes.add(e.code())
            # INTERNAL only from gRPC's own parse failure, never from the handler
            assert e.code() != grpc.StatusCode.INTERNAL or "deserializ" in (e.details() or "")
    assert grpc.StatusCode.INVALID_ARGUMENT in codes
    assert env.host.io.internal_errors == 0
    assert env.client.serving()


def test_batch_log_has_no_keys(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    inbound, outbound = pair(0x1000)
    env.client.apply_sas(install=[inbound, outbound])
    env.client.apply_sas(delete=[(0x1000, LOCAL4, "esp", "inbound")])
    text = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert "sas applied" in text
    for k in (inbound.encr_key, outbound.encr_key):
        assert k.hex() not in text and repr(k) not in text


# --- the packet path during batches ------------------------------------------------------------


def test_packets_never_see_a_half_applied_rekey(env: Env) -> None:
    """The packet thread processes batches of clear packets (under the engine lock, as the
    worker's loop does) while the API replaces the outbound SA of the policy 100 times, each
    time deleting the old one and installing the new one in one batch. With the two steps as
    separate calls, a packet between them would find no outbound SA; in a batch none does."""
    host = env.host
    inbound, outbound = pair(0x1000)
    env.client.apply_sas(install=[inbound, outbound], spd=([policy()], 1))
    sender = ListSender()
    loop = PacketLoop(host, sender=sender)
    stop = threading.Event()
    rounds = [0]

    def packets() -> None:
        item = TunItem(clear_packet())
        while not stop.is_set() and rounds[0] < 100_000:
            loop.process([item] * 8, host.now())
            rounds[0] += 1

    t = threading.Thread(target=packets, daemon=True)
    t.start()
    try:
        spi = 0x1001
        for i in range(100):
            new = sa_config(**{**_fields(outbound), "spi": 0x20000 + i})
            env.client.apply_sas(install=[new], delete=[(spi, PEER4, "esp", "outbound")])
            spi = new.spi
    finally:
        stop.set()
        t.join(10)
    loop.stop()
    assert rounds[0] > 0
    with host.locked() as eng:
        assert eng.drops[DropReason.NO_OUTBOUND_SA] == 0
        assert eng.tx_packets == 8 * rounds[0]
    assert len(sender.sent) == 8 * rounds[0]
    assert host.io.internal_errors == 0


def _ident(spi: int, inbound: bool) -> tuple[int, bytes, int, Direction]:
    if inbound:
        return (spi, LOCAL4_PACKED, 50, Direction.INBOUND)
    return (spi, PEER4_PACKED, 50, Direction.OUTBOUND)


def test_engine_batches_match_a_set_model() -> None:
    """Random batches over a small id pool (so deletes of missing SAs, re-installs, taken ids
    and bad keys all occur) against a plain set model of the SAD: after every batch the engine
    holds exactly the model's ids, and a refused batch leaves both unchanged."""
    rng = random.Random(11)
    eng = Dataplane()
    model: set[tuple[int, Direction]] = set()
    refused = accepted = 0
    for _ in range(400):
        installs: list[SaConfig] = []
        for _ in range(rng.randint(0, 3)):
            spi = 0x100 + rng.randrange(12)
            inbound, outbound = pair(spi, reqid=rng.randint(1, 2))
            cfg = inbound if rng.random() < 0.5 else outbound
            if rng.random() < 0.05:
                cfg = sa_config(**{**_fields(cfg), "encr_key": os.urandom(19)})
            installs.append(cfg)
        deletes = [
            _ident(0x100 + rng.randrange(13), rng.random() < 0.5) for _ in range(rng.randint(0, 4))
        ]
        # the model: deletes first, then installs; refused if an id is taken or a key is bad
        after = set(model)
        existed = []
        for spi, _dst, _p, d in deletes:
            existed.append((spi, d) in after)
            after.discard((spi, d))
        ok = True
        for c in installs:
            if (c.spi, c.direction) in after or len(c.encr_key) != 20:
                ok = False
                break
            after.add((c.spi, c.direction))
        try:
            got = eng.apply_batch(installs, deletes, None, 0.0)
        except BatchRejected:
            assert not ok
            refused += 1
        else:
            assert ok and got == existed
            model = after
            accepted += 1
        assert {(s.spi, s.cfg.direction) for s in eng.all_sas()} == model
    assert refused > 20 and accepted > 100
