"""Sequence-number leases of outbound SAs (services/keymgr/leases.py and keymgr's use of them).

Store: marks survive a reopen; a rename that fails (a crash between write and rename) leaves
the previous file and the in-memory marks intact and raises, so no lease is granted on a mark
that is not durable; corrupt files are refused with a readable error. Arithmetic: extension by
one block, capped at 2^32-1 (2^64-1 with ESN). keymgr: the outbound SA is installed with the
lease [1, block] whose mark is on disk before the install; LeaseLow extends it by one block
with the mark on disk before UpdateSA; at the end of the sequence space, or when the store
fails, keymgr rekeys instead; deleting the SA removes its mark.
"""

from __future__ import annotations

import json
import os
import pathlib
import secrets
from concurrent.futures import Future
from dataclasses import replace
from typing import Any

import pytest

from services.core.events import LeaseLow, SaRef
from services.core.ike.constants import ExchangeType
from services.core.ike.exchange import Ikev2Initiator, State
from services.core.ike.message import decode_header
from services.core.ike.suites import parse_esp
from services.core.sa import MAX_SEQ_32, MAX_SEQ_64, Direction
from services.dataplane.client import ApplyFuture, WorkerEvent
from services.keymgr.config import Connection
from services.keymgr.daemon import Keymgr
from services.keymgr.leases import (
    STORE_FILE,
    LeaseKey,
    LeaseStore,
    LeaseStoreError,
    first_lease,
    next_lease,
)
from tests.unit.test_keymgr_lifecycle import DeletingClient
from tests.unit.test_keymgr_lifetimes import _talk
from tests.unit.test_keymgr_responder import NET_A, NET_B, A, B, FakeStream, _initiator

K1 = LeaseKey(0x1001, bytes([192, 0, 2, 2]), 50)
K2 = LeaseKey(0x1002, bytes(15) + b"\x01", 50)


def _on_disk(directory: pathlib.Path) -> dict[LeaseKey, int]:
    """The marks as a fresh process would read them."""
    return LeaseStore.open(directory).marks()


# --- the store ---------------------------------------------------------------------------------


def test_marks_survive_reopen_and_removal(tmp_path: pathlib.Path) -> None:
    st = LeaseStore.open(tmp_path / "state")
    st.record(K1, 256)
    st.record(K2, 1 << 40)
    st.record(K1, 512)
    assert _on_disk(tmp_path / "state") == {K1: 512, K2: 1 << 40}
    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "state" / STORE_FILE).stat().st_mode & 0o777 == 0o600
    st.remove(K1)
    assert _on_disk(tmp_path / "state") == {K2: 1 << 40}
    with pytest.raises(ValueError, match="never goes down"):
        st.record(K2, 5)
    st.record(K2, 5, new_sa=True)  # a new SA that reuses the id starts again
    assert _on_disk(tmp_path / "state") == {K2: 5}
    assert not list((tmp_path / "state").glob(".*tmp"))


def test_failed_rename_never_loses_a_granted_mark(tmp_path: pathlib.Path) -> None:
    st = LeaseStore.open(tmp_path)
    st.record(K1, 256)  # granted
    before = (tmp_path / STORE_FILE).read_bytes()

    def crash(src: pathlib.Path, dst: pathlib.Path) -> None:
        raise OSError(5, "simulated crash before the rename")

    st._rename = crash
    with pytest.raises(LeaseStoreError, match="cannot write"):
        st.record(K1, 512)
    with pytest.raises(LeaseStoreError):
        st.record(K2, 256)
    with pytest.raises(LeaseStoreError):
        st.remove(K1)
    # what a restart reads is the last durable state, byte for byte, and memory agrees
    assert (tmp_path / STORE_FILE).read_bytes() == before
    assert _on_disk(tmp_path) == {K1: 256} == st.marks()
    assert not list(tmp_path.glob(".*tmp"))
    st._rename = os.replace
    st.record(K1, 512)
    assert _on_disk(tmp_path) == {K1: 512}


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[]",
        '{"format": 2, "marks": []}',
        '{"format": 1, "marks": {}}',
        '{"format": 1, "marks": [1]}',
        '{"format": 1, "marks": [{"spi": 1, "dst": "192.0.2.1", "protocol": 50}]}',
        '{"format": 1, "marks": [{"spi": 1, "dst": "nope", "protocol": 50, "mark": 3}]}',
        '{"format": 1, "marks": [{"spi": 1, "dst": "192.0.2.1", "protocol": 50, "mark": 0}]}',
        '{"format": 1, "marks": [{"spi": -1, "dst": "192.0.2.1", "protocol": 50, "mark": 1}]}',
        '{"format": 1, "marks": [{"spi": 1, "dst": "192.0.2.1", "protocol": 50, "mark": 1.5}]}',
        '{"format": 1, "marks": [{"spi": true, "dst": "192.0.2.1", "protocol": 50, "mark": 1}]}',
    ],
)
def test_corrupt_store_is_refused_readably(tmp_path: pathlib.Path, text: str) -> None:
    (tmp_path / STORE_FILE).write_text(text)
    with pytest.raises(LeaseStoreError, match=STORE_FILE):
        LeaseStore.open(tmp_path)


def test_store_file_is_plain_json(tmp_path: pathlib.Path) -> None:
    LeaseStore.open(tmp_path).record(K2, 7)
    doc = json.loads((tmp_path / STORE_FILE).read_text())
    assert doc == {
        "format": 1,
        "marks": [{"spi": 0x1002, "dst": "::1", "protocol": 50, "mark": 7}],
    }


# --- lease arithmetic --------------------------------------------------------------------------


def test_lease_arithmetic_caps_at_the_sequence_space() -> None:
    assert first_lease(256, esn=False) == 256
    assert first_lease(1 << 40, esn=False) == MAX_SEQ_32
    assert first_lease(1 << 40, esn=True) == 1 << 40
    assert next_lease(256, 256, esn=False) == 512
    assert next_lease(MAX_SEQ_32 - 10, 256, esn=False) == MAX_SEQ_32
    assert next_lease(MAX_SEQ_32, 256, esn=False) is None
    assert next_lease(MAX_SEQ_32, 256, esn=True) == MAX_SEQ_32 + 256
    assert next_lease(MAX_SEQ_64 - 1, 256, esn=True) == MAX_SEQ_64
    assert next_lease(MAX_SEQ_64, 256, esn=True) is None
    with pytest.raises(ValueError):
        first_lease(0, esn=False)


# --- keymgr ------------------------------------------------------------------------------------


class LeaseClient(DeletingClient):
    """Records UpdateSA calls and what the store file held when each install / update came."""

    def __init__(self, state: pathlib.Path) -> None:
        super().__init__()
        self.state = state
        self.updates: list[tuple[int, int]] = []
        self.disk_at_install: list[dict[LeaseKey, int]] = []
        self.disk_at_update: list[dict[LeaseKey, int]] = []

    def install_sa(self, cfg: Any) -> None:
        self.disk_at_install.append(_on_disk(self.state))
        super().install_sa(cfg)

    def update_sa(self, spi: int, dst: Any, protocol: Any, direction: Any, **kw: Any) -> None:
        assert direction is Direction.OUTBOUND
        self.disk_at_update.append(_on_disk(self.state))
        self.updates.append((spi, kw["seq_lease_end"]))


def _leased_km(
    tmp_path: pathlib.Path, block: int = 256, esn: bool = False
) -> tuple[Keymgr, LeaseClient, FakeStream, Any]:
    psk = secrets.token_bytes(32)
    f = tmp_path / "psk"
    f.write_bytes(b"0x" + psk.hex().encode())
    esp = ("aes256gcm16-esn",) if esn else ("aes256gcm16",)
    conn = Connection(
        "c", A, B, f, NET_A, NET_B, remote_id=B, start_action="respond", esp_proposals=esp
    )
    state = tmp_path / "state"
    client = LeaseClient(state)
    store = LeaseStore.open(state)
    km = Keymgr(
        client,  # type: ignore[arg-type]
        (conn,),
        jitter=lambda x: 0.0,
        leases=store,
        seq_lease_block=block,
    )
    stream = FakeStream()
    km._stream = stream  # type: ignore[assignment]
    ini = _initiator(psk)
    if esn:
        ini = Ikev2Initiator(replace(ini.config, esp_suites=(parse_esp(esp[0]),)), now=0.0)
    _talk(km, stream, ini, 0.0, ini.start(0.0))
    assert ini.state is State.ESTABLISHED and len(client.sas) == 2
    return km, client, stream, ini


def _lease_low(km: Keymgr, out: Any, next_seq: int, lease_end: int, now: float = 1.0) -> None:
    ref = SaRef(out.spi, out.dst, 50, out.reqid, int(Direction.OUTBOUND))
    km._wev.put(WorkerEvent("w", 0.0, LeaseLow(ref, next_seq, lease_end), Direction.OUTBOUND))
    km._worker_events(now)


def test_outbound_sa_gets_first_lease_recorded_before_install(tmp_path: pathlib.Path) -> None:
    _km, client, _stream, _ini = _leased_km(tmp_path, block=256)
    inbound, out = client.sas
    key = LeaseKey(out.spi, out.dst, 50)
    assert out.direction is Direction.OUTBOUND and out.seq_lease_start == 1
    assert out.seq_lease_end == 256 and inbound.seq_lease_end == 0
    # the mark was on disk when the worker got the install (the inbound SA comes first)
    assert all(d == {key: 256} for d in client.disk_at_install)


def test_lease_low_extends_by_one_block_after_recording(tmp_path: pathlib.Path) -> None:
    km, client, stream, _ini = _leased_km(tmp_path, block=256)
    out = client.sas[1]
    key = LeaseKey(out.spi, out.dst, 50)
    _lease_low(km, out, 193, 256)
    _lease_low(km, out, 449, 512)
    _lease_low(km, out, 705, 768)
    assert client.updates == [(out.spi, 512), (out.spi, 768), (out.spi, 1024)]
    assert [d[key] for d in client.disk_at_update] == [512, 768, 1024]
    assert km.lease_extensions == 3
    _lease_low(km, out, 706, 512)  # a stale event: the mark still grows from the highest
    assert client.updates[-1] == (out.spi, 1280)
    # an SA that is not ours (or gone) is left alone
    other = SaRef(out.spi ^ 1, out.dst, 50, out.reqid, int(Direction.OUTBOUND))
    km._wev.put(WorkerEvent("w", 0.0, LeaseLow(other, 10, 20), Direction.OUTBOUND))
    km._worker_events(2.0)
    assert len(client.updates) == 4 and len(stream.sent) == 2


def test_lease_stops_at_2_32_minus_1_and_then_rekeys(tmp_path: pathlib.Path) -> None:
    km, client, stream, ini = _leased_km(tmp_path, block=1 << 31)
    out = client.sas[1]
    assert out.seq_lease_end == 1 << 31
    _lease_low(km, out, 3 << 29, 1 << 31)
    assert client.updates == [(out.spi, MAX_SEQ_32)]
    assert len(stream.sent) == 2  # no rekey yet
    _lease_low(km, out, MAX_SEQ_32 - (1 << 28), MAX_SEQ_32)
    assert client.updates == [(out.spi, MAX_SEQ_32)]  # never beyond the sequence space
    (req,) = stream.sent[2:]
    assert decode_header(req.data).exchange_type == ExchangeType.CREATE_CHILD_SA
    _talk(km, stream, ini, 1.0, ini.receive(req.data, 1.0))
    new_out = client.sas[3]
    assert new_out.direction is Direction.OUTBOUND and new_out.seq_lease_end == 1 << 31
    # the old pair is deleted: its mark is gone, the new SA's is there
    assert _on_disk(tmp_path / "state") == {LeaseKey(new_out.spi, new_out.dst, 50): 1 << 31}


def test_esn_lease_extends_past_2_32(tmp_path: pathlib.Path) -> None:
    km, client, _stream, _ini = _leased_km(tmp_path, block=1 << 31, esn=True)
    out = client.sas[1]
    assert out.esn
    _lease_low(km, out, 1, 1 << 31)
    _lease_low(km, out, 1, 1 << 32)
    assert client.updates == [(out.spi, 1 << 32), (out.spi, 3 << 31)]


def test_store_failure_means_rekey_not_extension(tmp_path: pathlib.Path) -> None:
    km, client, stream, _ini = _leased_km(tmp_path, block=256)
    out = client.sas[1]
    assert km.leases is not None

    def crash(src: pathlib.Path, dst: pathlib.Path) -> None:
        raise OSError(28, "No space left on device")

    km.leases._rename = crash
    _lease_low(km, out, 193, 256)
    assert client.updates == []  # not granted: the mark is not durable
    (req,) = stream.sent[2:]
    assert decode_header(req.data).exchange_type == ExchangeType.CREATE_CHILD_SA
    assert _on_disk(tmp_path / "state") == {LeaseKey(out.spi, out.dst, 50): 256}


def test_install_refused_when_first_mark_is_not_durable(tmp_path: pathlib.Path) -> None:
    psk = secrets.token_bytes(32)
    f = tmp_path / "psk"
    f.write_bytes(b"0x" + psk.hex().encode())
    conn = Connection("c", A, B, f, NET_A, NET_B, remote_id=B, start_action="respond")
    store = LeaseStore(tmp_path / "missing-dir")  # not created: every write fails
    client = LeaseClient(tmp_path / "missing-dir")
    km = Keymgr(client, (conn,), leases=store, seq_lease_block=256)  # type: ignore[arg-type]
    stream = FakeStream()
    km._stream = stream  # type: ignore[assignment]
    ini = _initiator(psk)
    _talk(km, stream, ini, 0.0, ini.start(0.0))
    assert client.sas == [] and len(store) == 0
    assert ini.state is not State.ESTABLISHED  # no IKE_AUTH answer without installed SAs


def test_without_store_no_lease(tmp_path: pathlib.Path) -> None:
    psk = secrets.token_bytes(32)
    f = tmp_path / "psk"
    f.write_bytes(b"0x" + psk.hex().encode())
    conn = Connection("c", A, B, f, NET_A, NET_B, remote_id=B, start_action="respond")
    client = LeaseClient(tmp_path)
    km = Keymgr(client, (conn,), seq_lease_block=256)  # type: ignore[arg-type]
    km._stream = FakeStream()  # type: ignore[assignment]
    ini = _initiator(psk)
    _talk(km, km._stream, ini, 0.0, ini.start(0.0))  # type: ignore[arg-type]
    assert [sa.seq_lease_end for sa in client.sas] == [0, 0]


def test_refused_install_leaves_no_mark(tmp_path: pathlib.Path) -> None:
    psk = secrets.token_bytes(32)
    f = tmp_path / "psk"
    f.write_bytes(b"0x" + psk.hex().encode())
    conn = Connection("c", A, B, f, NET_A, NET_B, remote_id=B, start_action="respond")
    state = tmp_path / "state"

    class Refusing(LeaseClient):
        def apply_sas_async(self, install: Any = (), delete: Any = (), spd: Any = None) -> Any:
            self.disk_at_install.append(_on_disk(self.state))
            fut: Future[Any] = Future()
            fut.set_exception(RuntimeError("refused"))
            return ApplyFuture(fut)

    client = Refusing(state)
    store = LeaseStore.open(state)
    km = Keymgr(client, (conn,), leases=store, seq_lease_block=256)  # type: ignore[arg-type]
    stream = FakeStream()
    km._stream = stream  # type: ignore[assignment]
    ini = _initiator(psk)
    _talk(km, stream, ini, 0.0, ini.start(0.0))
    assert [len(d) for d in client.disk_at_install][:1] == [1]  # durable before the call
    assert len(store) == 0 and _on_disk(state) == {}
