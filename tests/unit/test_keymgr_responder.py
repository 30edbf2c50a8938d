"""keymgr responder role without a worker: our own Ikev2Initiator talks to Keymgr's dispatch
through a fake punt stream and a fake dataplane client.

Checks: the SAs installed for the responder role use the initiator->responder key inbound
(our SPI) and the responder->initiator key outbound (the peer's SPI), ESP-in-UDP when IKE came
over 4500, the shared reqid and a PROTECT SPD entry local_ts->remote_ts, installed in one
ApplySAs call and not replaced again for a further IKE SA of the connection; responses go back
on the ports the request arrived on; half-open responders
are bounded and the refused IKE_SA_INITs counted; responders are keyed by the initiator's SPI.
"""

from __future__ import annotations

import pathlib
import secrets
from concurrent.futures import Future
from typing import Any

import pytest

from services.core.ike.exchange import NAT_T_PORT, Ikev2Initiator, InitiatorConfig, State
from services.core.sa import Direction, SaConfig
from services.core.spd import Action, SpdEntry
from services.dataplane.client import ApplyFuture, IkeDatagram
from services.keymgr import daemon
from services.keymgr.config import Connection
from services.keymgr.daemon import Keymgr

A, B = "192.0.2.1", "192.0.2.2"
NET_A, NET_B = "198.51.100.0/24", "203.0.113.1/32"


class FakeStream:
    def __init__(self) -> None:
        self.sent: list[IkeDatagram] = []

    def send(self, d: IkeDatagram) -> None:
        self.sent.append(d)

    def cancel(self) -> None:
        pass


class FakeClient:
    target = "fake"

    def __init__(self) -> None:
        self.sas: list[SaConfig] = []
        self.spd: list[tuple[list[SpdEntry], int]] = []
        self.applies: list[tuple[list[SaConfig], list[Any], Any]] = []

    def install_sa(self, cfg: SaConfig) -> None:
        self.sas.append(cfg)

    def replace_spd(self, entries: Any, revision: int) -> int:
        self.spd.append((list(entries), revision))
        return revision

    def delete_sa(self, spi: int, dst: Any, protocol: int, direction: Any) -> bool:
        return True

    def apply_sas_async(self, install: Any = (), delete: Any = (), spd: Any = None) -> ApplyFuture:
        """The batch as the unary calls it stands for, answered at once; ``applies`` records
        every call (installs, deletes, SPD)."""
        self.applies.append((list(install), list(delete), spd))
        for ref in delete:
            self.delete_sa(*ref)
        for cfg in install:
            self.install_sa(cfg)
        if spd is not None:
            self.replace_spd(*spd)
        fut: Future[Any] = Future()
        fut.set_result(None)
        return ApplyFuture(fut)


def _keymgr(tmp_path: pathlib.Path, psk: bytes) -> tuple[Keymgr, FakeClient, FakeStream]:
    f = tmp_path / "psk"
    f.write_bytes(b"0x" + psk.hex().encode())
    conns = (
        Connection("init", A, "192.0.2.9", f, NET_A, NET_B, start_action="start"),
        Connection("resp", A, B, f, NET_A, NET_B, remote_id=B, start_action="respond"),
    )
    client = FakeClient()
    km = Keymgr(client, conns)  # type: ignore[arg-type]
    stream = FakeStream()
    km._stream = stream  # type: ignore[assignment]
    return km, client, stream


def _initiator(psk: bytes) -> Ikev2Initiator:
    cfg = InitiatorConfig(
        local_addr=B,
        remote_addr=A,
        psk=psk,
        ts_local=("203.0.113.1", "203.0.113.1"),
        ts_remote=("198.51.100.0", "198.51.100.255"),
    )
    return Ikev2Initiator(cfg, now=0.0)


def _run_exchange(km: Keymgr, stream: FakeStream, ini: Ikev2Initiator) -> None:
    out = ini.start(0.0)
    for _ in range(4):
        port = NAT_T_PORT if ini.port_float else 500
        n = len(stream.sent)
        for data in out:
            km._dispatch(IkeDatagram(A, port, B, port, data), 0.0)
        replies = stream.sent[n:]
        assert all((r.local_port, r.remote_port) == (port, port) for r in replies)
        out = []
        for r in replies:
            out += ini.receive(r.data, 0.0)
        if ini.state in (State.ESTABLISHED, State.FAILED):
            return


def test_responder_installs_sas_with_responder_keys(tmp_path: pathlib.Path) -> None:
    psk = secrets.token_bytes(32)
    km, client, stream = _keymgr(tmp_path, psk)
    assert [s.conn.name for s in km.sessions] == ["init"]
    ini = _initiator(psk)
    _run_exchange(km, stream, ini)
    assert ini.state is State.ESTABLISHED and ini.result is not None
    assert ini.port_float
    child = ini.result.child
    by_dir = {s.direction: s for s in client.sas}
    inbound, outbound = by_dir[Direction.INBOUND], by_dir[Direction.OUTBOUND]
    # the peer's outbound SPI is our inbound one and vice versa
    assert inbound.spi == int.from_bytes(child.spi_out, "big")
    assert outbound.spi == int.from_bytes(child.spi_in, "big")
    assert inbound.encr_key == child.keys.encr_i and len(inbound.encr_key) == 36
    assert outbound.encr_key == child.keys.encr_r
    assert inbound.encr_id == outbound.encr_id == 20
    assert inbound.dst == bytes([192, 0, 2, 1]) and outbound.dst == bytes([192, 0, 2, 2])
    assert inbound.encap is not None and inbound.encap.sport == inbound.encap.dport == 4500
    assert inbound.reqid == outbound.reqid == 2
    (entries, rev) = client.spd[-1]
    assert rev == 1 and len(entries) == 1
    assert entries[0].action is Action.PROTECT and entries[0].reqid == 2
    assert ini.spi_i in km.responders and km.responders[ini.spi_i].installed

    # one ApplySAs call: both SAs and the SPD entry
    assert len(client.applies) == 1 and client.applies[0][2] is not None

    # A second peer IKE SA (new SPI) of the same connection: its SAs are installed in one call
    # and the connection's SPD entry, installed already and unchanged, is left alone (no new
    # SPD revision).
    ini2 = _initiator(psk)
    _run_exchange(km, stream, ini2)
    assert ini2.state is State.ESTABLISHED
    assert [r for _, r in client.spd] == [1]
    assert len(client.applies) == 2
    installs, deletes, spd = client.applies[1]
    assert len(installs) == 2 and deletes == [] and spd is None
    assert len(km.responders) == 2


def test_wrong_psk_installs_nothing(tmp_path: pathlib.Path) -> None:
    km, client, stream = _keymgr(tmp_path, secrets.token_bytes(32))
    ini = _initiator(secrets.token_bytes(32))
    _run_exchange(km, stream, ini)
    assert ini.state is State.FAILED and "AUTHENTICATION_FAILED" in (ini.failure_reason or "")
    assert client.sas == [] and client.spd == []


def test_changed_psk_reaches_the_next_responder(tmp_path: pathlib.Path) -> None:
    """The responder configuration is reused per connection, but not past a PSK change."""
    old, new = secrets.token_bytes(32), secrets.token_bytes(32)
    km, client, stream = _keymgr(tmp_path, old)
    resp = km.responder_conns[0][0]
    assert client.applies == []
    assert km._responder_config(resp) is km._responder_config(resp)
    ini = _initiator(old)
    _run_exchange(km, stream, ini)
    assert ini.state is State.ESTABLISHED
    (tmp_path / "psk").write_bytes(b"0x" + new.hex().encode() + b"\n")  # size changes too
    ini = _initiator(old)
    _run_exchange(km, stream, ini)
    assert ini.state is State.FAILED
    ini = _initiator(new)
    _run_exchange(km, stream, ini)
    assert ini.state is State.ESTABLISHED


def test_half_open_bound_and_expiry(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(daemon, "MAX_HALF_OPEN", 3)
    psk = secrets.token_bytes(32)
    km, client, stream = _keymgr(tmp_path, psk)
    for _ in range(5):
        ini = _initiator(psk)
        for data in ini.start(0.0):
            km._dispatch(IkeDatagram(A, 500, B, 500, data), 0.0)
    assert len(km.responders) == 3 and km.half_open_dropped == 2
    assert len(stream.sent) == 3
    # other addresses or garbage never create responders
    km._dispatch(IkeDatagram(A, 500, "192.0.2.77", 500, b"\x00" * 40), 0.0)
    km._dispatch(IkeDatagram(A, 500, B, 500, b"junk"), 0.0)
    assert len(km.responders) == 3
    km._timers(daemon.HALF_OPEN_TIMEOUT + 1)
    assert km.responders == {}
    ini = _initiator(psk)
    _run_exchange(km, stream, ini)
    assert ini.state is State.ESTABLISHED and len(client.sas) == 2


def test_outbox_hands_over_one_turns_datagrams_together() -> None:
    class ManyStream(FakeStream):
        def __init__(self) -> None:
            super().__init__()
            self.handed: list[list[IkeDatagram]] = []

        def send_many(self, ds: list[IkeDatagram]) -> None:
            self.handed.append(list(ds))
            self.sent += ds

    ds = [IkeDatagram(A, 500, B, 500, bytes([i])) for i in range(5)]
    for stream in (FakeStream(), ManyStream()):
        out = daemon._Outbox(stream)  # type: ignore[arg-type]
        out.send(ds[0])
        assert stream.sent == ds[:1]  # not holding: at once
        out.hold()
        for d in ds[1:4]:
            out.send(d)
        assert stream.sent == ds[:1]
        out.release()
        assert stream.sent == ds[:4]
        out.release()  # nothing held: nothing sent
        out.send(ds[4])
        assert stream.sent == ds
        if isinstance(stream, ManyStream):
            assert stream.handed == [ds[1:4]]


def test_random_pool_hands_out_each_octet_once(monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[int] = []
    counter = iter(range(1 << 30))

    def fake_urandom(n: int) -> bytes:
        reads.append(n)
        return bytes(next(counter) % 256 for _ in range(n))

    monkeypatch.setattr(daemon.os, "urandom", fake_urandom)
    pool = daemon.RandomPool(block=128)
    got = b"".join(pool(n) for n in (8, 32, 4, 8, 8, 32, 1, 16, 32))
    assert len(got) == 141 and reads == [128, 128]
    # in order, nothing repeated: the first 109 octets of block one, then block two
    assert got[:109] == bytes(range(109)) and got[109:] == bytes(range(128, 160))
    assert len(pool(33)) == 33 and reads[-1] == 33  # large requests go straight through
    real = daemon.RandomPool()
    monkeypatch.undo()
    assert len({real(8) for _ in range(1000)}) == 1000
