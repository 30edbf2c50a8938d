"""keymgr after ESTABLISHED without a worker (RFC 7296 §1.4): our Ikev2Initiator is the peer of
Keymgr's responder role through a fake punt stream and a fake dataplane client.

Checks: the peer's Delete of the Child SA removes both SAs from the worker and withdraws the SPD
entry with a higher revision; the peer's Delete of the IKE SA removes the SAs too; on shutdown
keymgr sends a Delete of the IKE SA, the peer's response closes it and the SAs are removed.
"""

from __future__ import annotations

import pathlib
import secrets
from typing import Any

from services.core.ike.constants import ExchangeType, ProtocolId
from services.core.ike.exchange import NAT_T_PORT, Ikev2Initiator, State
from services.core.ike.message import Delete, Message
from services.core.ike.responder import ResponderState
from services.core.ike.sk import SkCipher, decrypt_message, encrypt_message
from services.dataplane.client import IkeDatagram
from services.keymgr.daemon import Keymgr
from tests.unit.test_keymgr_responder import (
    A,
    B,
    FakeClient,
    FakeStream,
    _initiator,
    _keymgr,
    _run_exchange,
)


class DeletingClient(FakeClient):
    def __init__(self) -> None:
        super().__init__()
        self.deleted: list[tuple[int, Any, int, Any]] = []

    def delete_sa(self, spi: int, dst: Any, protocol: int, direction: Any) -> bool:
        self.deleted.append((spi, dst, protocol, direction))
        return True


def _setup(tmp_path: pathlib.Path) -> tuple[Keymgr, DeletingClient, FakeStream, Ikev2Initiator]:
    psk = secrets.token_bytes(32)
    km, _, stream = _keymgr(tmp_path, psk)
    client = DeletingClient()
    km.client = client  # type: ignore[assignment]
    ini = _initiator(psk)
    _run_exchange(km, stream, ini)
    assert ini.state is State.ESTABLISHED
    assert len(client.sas) == 2 and client.spd[-1][1] == 1
    return km, client, stream, ini


def _to_km(km: Keymgr, stream: FakeStream, data: bytes) -> list[bytes]:
    n = len(stream.sent)
    km._dispatch(IkeDatagram(A, NAT_T_PORT, B, NAT_T_PORT, data), 1.0)
    return [d.data for d in stream.sent[n:]]


def test_peer_child_delete_removes_sas_and_spd(tmp_path: pathlib.Path) -> None:
    km, client, stream, ini = _setup(tmp_path)
    r = ini.result
    assert r is not None
    i2r = SkCipher(20, r.keys.sk_ei, key_bits=256)
    r2i = SkCipher(20, r.keys.sk_er, key_bits=256)
    # liveness first: empty answer, nothing removed
    msg = Message(r.spi_i, r.spi_r, ExchangeType.INFORMATIONAL, 2, (), initiator=True)
    (ans,) = _to_km(km, stream, encrypt_message(msg, i2r)[0])
    assert decrypt_message(ans, r2i).payloads == () and client.deleted == []
    d = Delete(ProtocolId.ESP, 4, (r.child.spi_in,))
    msg = Message(r.spi_i, r.spi_r, ExchangeType.INFORMATIONAL, 3, (d,), initiator=True)
    (ans,) = _to_km(km, stream, encrypt_message(msg, i2r)[0])
    assert decrypt_message(ans, r2i).payloads == (Delete(ProtocolId.ESP, 4, (r.child.spi_out,)),)
    assert sorted(x[0] for x in client.deleted) == sorted(s.spi for s in client.sas)
    entries, rev = client.spd[-1]
    assert entries == [] and rev == 2
    assert km.responders[ini.spi_i].responder.state is ResponderState.ESTABLISHED


def test_peer_ike_delete_removes_sas(tmp_path: pathlib.Path) -> None:
    km, client, stream, ini = _setup(tmp_path)
    (req,) = ini.delete_ike(1.0)
    (ans,) = _to_km(km, stream, req)
    assert ini.receive(ans, 1.0) == [] and ini.state is State.CLOSED
    assert len(client.deleted) == 2 and client.spd[-1] == ([], 2)
    assert ini.spi_i not in km.responders


class AnsweringStream(FakeStream):
    """The peer answers at once: its responses land in keymgr's receive queue."""

    def __init__(self, km: Keymgr, ini: Ikev2Initiator) -> None:
        super().__init__()
        self.km, self.ini = km, ini

    def send(self, d: IkeDatagram) -> None:
        super().send(d)
        for out in self.ini.receive(d.data, 1.0):
            self.km._rx.put(IkeDatagram(A, d.local_port, B, d.remote_port, out))


def test_shutdown_deletes_ike_sa_and_removes_sas(tmp_path: pathlib.Path) -> None:
    km, client, _, ini = _setup(tmp_path)
    km._stream = AnsweringStream(km, ini)  # type: ignore[assignment]
    km._shutdown()
    assert ini.state is State.CLOSED
    assert len(client.deleted) == 2 and client.spd[-1] == ([], 2)
    assert ini.spi_i not in km.responders


def test_shutdown_without_answer_still_removes_sas(tmp_path: pathlib.Path) -> None:
    km, client, stream, ini = _setup(tmp_path)
    n = len(stream.sent)
    t = [0.0]

    def clock() -> float:
        t[0] += 0.5
        return t[0]

    km.clock = clock
    km._shutdown()
    assert len(client.deleted) == 2 and client.spd[-1] == ([], 2)
    assert ini.state is State.ESTABLISHED
    sent = [d.data for d in stream.sent[n:]]
    assert len(sent) >= 2 and len(set(sent)) == 1  # the same Delete, retransmitted
