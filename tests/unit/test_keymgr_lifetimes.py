"""keymgr lifetimes, rekeys it starts, the peer's IKE SA rekey and dead-peer actions, without a
worker (fakes of tests/unit/test_keymgr_responder.py; the peer is our own core, driven by hand).

Checked: a CHILD SA rekey by time installs the new pair (our outbound key is the exchange
initiator's, RFC 7296 §2.17) before the Delete of the old pair, which is removed once the peer
answered; an IKE SA rekey by time moves the IKE SA to new SPIs that keymgr then routes; a soft
expiry event of the worker starts a CHILD SA rekey; a peer that stops answering is declared dead
and its SAs and SPD entry are removed (``clear``), initiated again (``restart``) or held until
ACQUIRE (``hold``); the lifetime fields of the configuration are validated.
"""

from __future__ import annotations

import json
import pathlib
import secrets
from typing import Any

import pytest

from services.core.events import Acquire, SaRef, SoftExpire
from services.core.ike.constants import ExchangeType
from services.core.ike.exchange import NAT_T_PORT, Ikev2Initiator, State
from services.core.ike.message import decode_header
from services.core.ike.responder import Ikev2Responder, ResponderConfig, ResponderState
from services.core.sa import Direction, ExpiryKind
from services.dataplane.client import IkeDatagram, WorkerEvent
from services.keymgr.config import ConfigError, Connection, config_from_json
from services.keymgr.daemon import Keymgr
from tests.unit.test_keymgr_lifecycle import DeletingClient
from tests.unit.test_keymgr_responder import NET_A, NET_B, A, B, FakeStream, _initiator

PORT = NAT_T_PORT


def _km(
    tmp_path: pathlib.Path, psk: bytes, action: str, **lifetimes: Any
) -> tuple[Keymgr, DeletingClient, FakeStream]:
    f = tmp_path / "psk"
    f.write_bytes(b"0x" + psk.hex().encode())
    conn = Connection("c", A, B, f, NET_A, NET_B, remote_id=B, start_action=action, **lifetimes)
    client = DeletingClient()
    km = Keymgr(client, (conn,), jitter=lambda x: 0.0)  # type: ignore[arg-type]
    stream = FakeStream()
    km._stream = stream  # type: ignore[assignment]
    return km, client, stream


def _talk(
    km: Keymgr,
    stream: FakeStream,
    peer: Ikev2Initiator | Ikev2Responder,
    now: float,
    first: list[bytes] | None = None,
) -> int:
    """Deliver keymgr's new datagrams to ``peer`` and the answers back until quiet; returns
    how many datagrams keymgr sent."""
    n0 = n = len(stream.sent)
    to_km = list(first or [])
    for _ in range(20):
        for d in to_km:
            km._dispatch(IkeDatagram(A, PORT, B, PORT, d), now)
        out = stream.sent[n:]
        n = len(stream.sent)
        if not out:
            return n - n0
        to_km = []
        for d in out:
            if isinstance(peer, Ikev2Responder):
                to_km += peer.receive(
                    d.data,
                    now,
                    remote=(bytes([192, 0, 2, 1]), PORT),
                    local=(bytes([192, 0, 2, 2]), PORT),
                )
            else:
                to_km += peer.receive(d.data, now)
    raise AssertionError("no quiet")


def _responder_role(
    tmp_path: pathlib.Path, **lifetimes: Any
) -> tuple[Keymgr, DeletingClient, FakeStream, Ikev2Initiator]:
    psk = secrets.token_bytes(32)
    km, client, stream = _km(tmp_path, psk, "respond", **lifetimes)
    ini = _initiator(psk)
    _talk(km, stream, ini, 0.0, ini.start(0.0))
    assert ini.state is State.ESTABLISHED and len(client.sas) == 2
    return km, client, stream, ini


def test_child_rekey_by_time_installs_new_pair_before_deleting_old(tmp_path: pathlib.Path) -> None:
    km, client, stream, ini = _responder_role(tmp_path, rekey_time=100, life_time=200)
    old_in, old_out = client.sas
    assert old_in.lifetime.hard_seconds == 200
    km._timers(99.0)
    assert len(stream.sent) == 2  # IKE_SA_INIT and IKE_AUTH answers only: not yet
    km._timers(100.0)
    (req,) = stream.sent[2:]
    assert decode_header(req.data).exchange_type == ExchangeType.CREATE_CHILD_SA
    (ans,) = ini.receive(req.data, 100.0)
    (ev,) = ini.take_events()
    assert ev.kind == "child_rekeyed" and not ev.initiated and ev.child is not None
    n = len(stream.sent)
    km._dispatch(IkeDatagram(A, PORT, B, PORT, ans), 100.0)
    # the new pair is installed, the old one is still there, the Delete of it went out
    assert len(client.sas) == 4 and client.deleted == []
    new_in, new_out = client.sas[2:]
    assert new_in.direction is Direction.INBOUND and new_out.direction is Direction.OUTBOUND
    assert new_in.spi == int.from_bytes(ev.child.spi_out, "big")
    assert new_out.spi == int.from_bytes(ev.child.spi_in, "big")
    # keymgr started the exchange: its outbound key is encr_i (§2.17)
    assert new_out.encr_key == ev.child.keys.encr_i and new_in.encr_key == ev.child.keys.encr_r
    assert new_in.reqid == old_in.reqid
    (dele,) = stream.sent[n:]
    _talk(km, stream, ini, 100.0, ini.receive(dele.data, 100.0))
    assert sorted(x[0] for x in client.deleted) == sorted([old_in.spi, old_out.spi])
    assert [e.kind for e in ini.take_events()] == ["child_deleted"]
    assert client.spd[-1][1] == 1  # the SPD entry stays
    st = next(iter(km._ikes.values()))
    assert list(st.child_rekey_at.values()) == [200.0]  # the new child's rekey is scheduled


def test_ike_rekey_by_time_moves_to_new_spis(tmp_path: pathlib.Path) -> None:
    km, client, stream, ini = _responder_role(tmp_path, ike_rekey_time=50, rekey_time=0)
    km._timers(50.0)
    (req,) = stream.sent[2:]
    _talk(km, stream, ini, 50.0, ini.receive(req.data, 50.0))
    info = ini.info
    assert info is not None
    new_spis = info.spis
    assert new_spis[0] != ini.spi_i and info.all_spis == (new_spis,)
    assert new_spis[0] in km.responders  # the new IKE SA's SPIi routes to the same session
    assert ini.spi_i not in km.responders  # the old one is deleted: no longer routed
    # the peer uses the new IKE SA: a Child SA rekey of its own is answered and installed
    n = len(client.sas)
    _talk(km, stream, ini, 51.0, info.rekey_child(51.0))
    assert len(client.sas) == n + 2 and len(client.deleted) == 2
    assert km.responders[new_spis[0]].responder.state is ResponderState.ESTABLISHED


def test_soft_expiry_event_starts_child_rekey(tmp_path: pathlib.Path) -> None:
    km, client, stream, ini = _responder_role(tmp_path, rekey_packets=1000, rekey_time=0)
    assert client.sas[0].lifetime.soft_packets == 1000
    out = client.sas[1]
    ref = SaRef(out.spi, out.dst, 50, out.reqid, int(Direction.OUTBOUND))
    km._wev.put(WorkerEvent("w", 0.0, SoftExpire(ref, ExpiryKind.PACKETS)))
    km._worker_events(5.0)
    (req,) = stream.sent[2:]
    assert decode_header(req.data).exchange_type == ExchangeType.CREATE_CHILD_SA
    _talk(km, stream, ini, 5.0, ini.receive(req.data, 5.0))
    assert len(client.sas) == 4 and len(client.deleted) == 2


def test_dead_peer_clear_removes_sas(tmp_path: pathlib.Path) -> None:
    km, client, stream, _ini = _responder_role(
        tmp_path, dpd_delay=10, retransmit_timeout=1, retransmit_tries=2
    )
    t = 0.0
    while t < 30 and km._ikes:
        t += 0.5
        km._timers(t)
    # liveness check at 10 s, retransmitted at 11 s, dead at 13 s
    assert 12.5 <= t <= 13.5, t
    sent = [decode_header(d.data) for d in stream.sent[2:]]
    assert len(sent) == 2 and all(h.exchange_type == ExchangeType.INFORMATIONAL for h in sent)
    assert sorted(x[0] for x in client.deleted) == sorted(s.spi for s in client.sas)
    assert client.spd[-1][0] == [] and km.responders == {}


def _initiator_role(
    tmp_path: pathlib.Path, action: str
) -> tuple[Keymgr, DeletingClient, FakeStream, Ikev2Responder]:
    psk = secrets.token_bytes(32)
    km, client, stream = _km(
        tmp_path, psk, "start", dpd_delay=5, dpd_action=action, retransmit_tries=1
    )
    peer = Ikev2Responder(
        ResponderConfig(
            local_addr=B,
            psk=psk,
            ts_local=("203.0.113.1", "203.0.113.1"),
            ts_remote=("198.51.100.0", "198.51.100.255"),
            remote_addr=A,
        ),
        now=0.0,
    )
    (s,) = km.sessions
    km._initiate(s, 0.0)
    n = 0
    for _ in range(6):
        out, n = stream.sent[n:], len(stream.sent)
        for d in out:
            here, there = (
                (bytes([192, 0, 2, 1]), d.local_port),
                (bytes([192, 0, 2, 2]), d.remote_port),
            )
            for ans in peer.receive(d.data, 0.0, remote=here, local=there):
                km._dispatch(IkeDatagram(A, d.local_port, B, d.remote_port, ans), 0.0)
    assert s.installed and len(client.sas) == 2
    return km, client, stream, peer


def test_dead_peer_restart_initiates_again(tmp_path: pathlib.Path) -> None:
    km, client, stream, _peer = _initiator_role(tmp_path, "restart")
    (s,) = km.sessions
    t = 0.0
    while t < 20 and s.installed:
        t += 0.5
        km._timers(t)
    assert not s.installed and len(client.deleted) == 2  # dead at 5 + 1 s
    assert 5.5 <= t <= 7.0, t
    km._timers(t + 0.5)
    assert s.initiator is not None and s.initiator.state is State.SA_INIT_SENT
    assert decode_header(stream.sent[-1].data).exchange_type == ExchangeType.IKE_SA_INIT


def test_dead_peer_hold_keeps_policy_and_initiates_on_acquire(tmp_path: pathlib.Path) -> None:
    km, client, stream, _peer = _initiator_role(tmp_path, "hold")
    (s,) = km.sessions
    t = 0.0
    while t < 20 and s.installed:
        t += 0.5
        km._timers(t)
    assert not s.installed and len(client.deleted) == 2
    entries, _rev = client.spd[-1]
    assert [e.reqid for e in entries] == [s.reqid]  # the policy stays, without SAs
    n = len(stream.sent)
    km._timers(t + 10)
    assert len(stream.sent) == n and s.initiator is None  # nothing until traffic
    km._wev.put(
        WorkerEvent(
            "w", 0.0, Acquire(1, s.reqid, b"\xc6\x33\x64\x01", b"\xcb\x00\x71\x01", 1, 0, 0)
        )
    )
    km._worker_events(t + 11)
    assert s.initiator is not None
    assert decode_header(stream.sent[-1].data).exchange_type == ExchangeType.IKE_SA_INIT


# -- configuration --------------------------------------------------------------------------------


def _conn_json(**extra: Any) -> str:
    c = {
        "name": "x",
        "local_addr": A,
        "remote_addr": B,
        "psk_file": "psk",
        "local_ts": NET_A,
        "remote_ts": NET_B,
        **extra,
    }
    return json.dumps({"connections": [c]})


def test_lifetime_fields_parse_with_strongswan_defaults() -> None:
    (c,) = config_from_json(_conn_json(), check_psk=False).connections
    assert (c.rekey_time, c.ike_rekey_time, c.dpd_delay, c.dpd_action) == (
        3600.0,
        14400.0,
        0.0,
        "clear",
    )
    assert c.child_life_time == pytest.approx(3960.0) and c.child_rand_time == pytest.approx(360)
    blob = _conn_json(
        rekey_time=60,
        life_time=90,
        rand_time=5,
        dpd_delay=10,
        dpd_action="trap",
        rekey_bytes=10**6,
        ike_rekey_time=0,
        retransmit_tries=3,
    )
    (c,) = config_from_json(blob, check_psk=False).connections
    assert (c.child_life_time, c.child_rand_time, c.dpd_action, c.rekey_bytes) == (
        90,
        5,
        "trap",
        10**6,
    )


@pytest.mark.parametrize(
    "bad",
    [
        {"dpd_action": "explode"},
        {"rekey_time": 60, "life_time": 60},
        {"rekey_time": 60, "rand_time": 61, "life_time": 200},
        {"dpd_delay": -1},
        {"dpd_delay": "10"},
        {"rekey_time": float("inf")},
        {"rekey_bytes": -1},
        {"retransmit_tries": 0},
        {"retransmit_timeout": 0},
    ],
)
def test_bad_lifetime_fields_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        config_from_json(_conn_json(**bad), check_psk=False)


def test_hard_lifetime_deletes_child_that_was_not_rekeyed(tmp_path: pathlib.Path) -> None:
    km, client, stream, ini = _responder_role(tmp_path, rekey_time=0, life_time=30)
    assert client.sas[0].lifetime.hard_seconds == 30
    km._timers(29.0)
    assert len(stream.sent) == 2
    km._timers(30.0)
    (req,) = stream.sent[2:]
    assert decode_header(req.data).exchange_type == ExchangeType.INFORMATIONAL
    _talk(km, stream, ini, 30.0, ini.receive(req.data, 30.0))
    assert [e.kind for e in ini.take_events()] == ["child_deleted"]
    assert sorted(x[0] for x in client.deleted) == sorted(s.spi for s in client.sas)
    assert client.spd[-1][0] == []  # no Child SA left: the SPD entry is withdrawn
