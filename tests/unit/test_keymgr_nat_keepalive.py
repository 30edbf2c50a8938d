"""NAT detection says which side is behind the NAT (RFC 7296 §2.23), and keymgr asks the worker
for NAT keepalives (RFC 3948 §2.3) only when it is itself behind one.

The core: an in-memory initiator/responder pair whose datagrams are given the addresses and
ports a NAT would show; the NAT-D hashes they exchange are computed by the peer, so each side's
``local_behind_nat`` is checked against what the other side really saw (and by an independent
SHA-1 of the RFC's layout). keymgr: the outbound ESP-in-UDP SA carries the connection's
``keepalive`` exactly when we are behind the NAT, never the inbound SA, never without NAT or
with ``keepalive: 0``; the configuration field is validated.
"""

from __future__ import annotations

import hashlib
import json
import pathlib

import pytest

from services.core.ike.constants import NotifyType
from services.core.ike.exchange import (
    NAT_T_PORT,
    IkeSaResult,
    Ikev2Initiator,
    InitiatorConfig,
    State,
    nat_changed,
)
from services.core.ike.message import Notify
from services.core.ike.responder import Ikev2Responder, ResponderConfig, ResponderState
from services.core.sa import Direction
from services.keymgr.config import ConfigError, Connection, config_from_json
from services.keymgr.daemon import child_sa_configs

PSK = b"nat keepalive test key 0123456789"
I_ADDR, R_ADDR, NAT_ADDR = "192.0.2.1", "192.0.2.2", "198.51.100.77"


def _pack(a: str) -> bytes:
    return bytes(int(x) for x in a.split("."))


def _handshake(
    seen_i: tuple[str, int], seen_r: tuple[str, int]
) -> tuple[Ikev2Initiator, Ikev2Responder]:
    """Run IKE_SA_INIT + IKE_AUTH; the responder receives from ``seen_i`` (the initiator's
    address and port after any NAT) on ``seen_r`` (its own address and port as the packet
    arrives, after any port forwarding)."""
    ini = Ikev2Initiator(
        InitiatorConfig(
            local_addr=I_ADDR,
            remote_addr=R_ADDR,
            psk=PSK,
            ts_local=("10.1.0.0", "10.1.0.255"),
            ts_remote=("10.2.0.0", "10.2.0.255"),
        ),
        now=0.0,
    )
    resp = Ikev2Responder(
        ResponderConfig(
            local_addr=R_ADDR,
            psk=PSK,
            ts_local=("10.2.0.0", "10.2.0.255"),
            ts_remote=("10.1.0.0", "10.1.0.255"),
        ),
        now=0.0,
    )
    out = ini.start(0.0)
    for _ in range(4):
        port_shift = NAT_T_PORT - 500 if ini.port_float else 0
        remote = (_pack(seen_i[0]), seen_i[1] + port_shift)
        local = (_pack(seen_r[0]), seen_r[1] + port_shift)
        back: list[bytes] = []
        for d in out:
            back += resp.receive(d, 0.0, remote=remote, local=local)
        out = []
        for d in back:
            out += ini.receive(d, 0.0)
        if ini.state is State.ESTABLISHED:
            break
    assert ini.state is State.ESTABLISHED and resp.state is ResponderState.ESTABLISHED
    return ini, resp


def _results(ini: Ikev2Initiator, resp: Ikev2Responder) -> tuple[IkeSaResult, IkeSaResult]:
    assert ini.result is not None and resp.result is not None
    return ini.result, resp.result


def test_no_nat_nobody_behind_one() -> None:
    ri, rr = _results(*_handshake((I_ADDR, 500), (R_ADDR, 500)))
    assert ri.nat_t and rr.nat_t  # NAT-D exchanged: IKE floats to 4500 anyway
    assert not ri.local_behind_nat and not rr.local_behind_nat


def test_initiator_behind_nat_knows_it_responder_does_not() -> None:
    ri, rr = _results(*_handshake((NAT_ADDR, 40123), (R_ADDR, 500)))
    assert ri.local_behind_nat and not rr.local_behind_nat


def test_initiator_port_only_translated() -> None:
    ri, rr = _results(*_handshake((I_ADDR, 1025), (R_ADDR, 500)))
    assert ri.local_behind_nat and not rr.local_behind_nat


def test_responder_behind_port_forwarding_knows_it() -> None:
    # the initiator sends to R_ADDR; a NAT forwards it to the responder's private address
    ini, resp = _handshake((I_ADDR, 500), ("10.9.9.9", 500))
    ri, rr = _results(ini, resp)
    assert rr.local_behind_nat and not ri.local_behind_nat


def test_nat_changed_against_an_independent_hash() -> None:
    spi_i, spi_r = bytes.fromhex("0011223344556677"), bytes(8)
    # RFC 7296 §2.23: SHA-1(SPIi | SPIr | IP | port), computed here from the RFC's layout
    h = hashlib.sha1(spi_i + spi_r + _pack(R_ADDR) + (500).to_bytes(2, "big")).digest()
    dst = NotifyType.NAT_DETECTION_DESTINATION_IP
    payloads = (Notify(dst, h),)
    assert not nat_changed(payloads, dst, spi_i, spi_r, _pack(R_ADDR), 500)
    assert nat_changed(payloads, dst, spi_i, spi_r, _pack(R_ADDR), 4500)
    assert nat_changed(payloads, dst, spi_i, spi_r, _pack(NAT_ADDR), 500)
    assert not nat_changed((), dst, spi_i, spi_r, _pack(R_ADDR), 500)  # no NAT-D: no verdict


def _conn(tmp_path: pathlib.Path, **kw: object) -> Connection:
    return Connection("c", I_ADDR, R_ADDR, tmp_path / "psk", "10.1.0.0/24", "10.2.0.0/24", **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("seen_i", "keepalive", "expected"),
    [
        ((NAT_ADDR, 40123), None, 20.0),  # default interval
        ((NAT_ADDR, 40123), 1.0, 1.0),
        ((NAT_ADDR, 40123), 0, 0.0),  # off
        ((I_ADDR, 500), 5.0, 0.0),  # no NAT: no keepalives
    ],
)
def test_keymgr_outbound_sa_keepalive(
    tmp_path: pathlib.Path, seen_i: tuple[str, int], keepalive: float | None, expected: float
) -> None:
    ini, _resp = _handshake(seen_i, (R_ADDR, 500))
    r = ini.result
    assert r is not None
    kw = {} if keepalive is None else {"keepalive": keepalive}
    inbound, outbound, _spd = child_sa_configs(_conn(tmp_path, **kw), r, 1, initiator=True)
    assert outbound.direction is Direction.OUTBOUND
    assert outbound.encap is not None and inbound.encap is not None
    assert outbound.encap.keepalive_interval == expected
    assert inbound.encap.keepalive_interval == 0.0


def test_responder_only_peer_behind_nat_sends_none(tmp_path: pathlib.Path) -> None:
    _ini, resp = _handshake((NAT_ADDR, 40123), (R_ADDR, 500))
    r = resp.result
    assert r is not None
    c = Connection("c", R_ADDR, NAT_ADDR, tmp_path / "psk", "10.2.0.0/24", "10.1.0.0/24")
    _inb, outbound, _spd = child_sa_configs(c, r, 1, initiator=False)
    assert outbound.encap is not None and outbound.encap.keepalive_interval == 0.0


@pytest.mark.parametrize("bad", [-1, "20", True, 3601, float("nan")])
def test_keepalive_config_validated(bad: object) -> None:
    doc = {
        "connections": [
            {
                "name": "c",
                "local_addr": I_ADDR,
                "remote_addr": R_ADDR,
                "psk_file": "/nonexistent",
                "local_ts": "10.1.0.0/24",
                "remote_ts": "10.2.0.0/24",
                "keepalive": bad,
            }
        ]
    }
    with pytest.raises(ConfigError, match="keepalive"):
        config_from_json(json.dumps(doc), check_psk=False)
