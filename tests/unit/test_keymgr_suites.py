"""keymgr with configured suites, IPv6, transport mode and text identities (no worker, no
network): the responder role installs exactly what was negotiated, with the keys of the right
direction, and the configuration model accepts / refuses the new fields readably."""

from __future__ import annotations

import pathlib
import secrets

import pytest

from services.core.iana import Encr, Integ
from services.core.ike.exchange import NAT_T_PORT, Ikev2Initiator, InitiatorConfig, State
from services.core.ike.suites import parse_esp_list, parse_ike_list
from services.core.sa import Direction, Mode
from services.dataplane.client import IkeDatagram
from services.keymgr.config import ConfigError, Connection, config_from_json
from services.keymgr.daemon import Keymgr, child_sa_configs
from tests.unit.test_keymgr_responder import FakeClient, FakeStream

A6, B6 = "2001:db8::1", "2001:db8::2"


def _keymgr(conn: Connection) -> tuple[Keymgr, FakeClient, FakeStream]:
    client = FakeClient()
    km = Keymgr(client, (conn,))  # type: ignore[arg-type]
    stream = FakeStream()
    km._stream = stream  # type: ignore[assignment]
    return km, client, stream


def _exchange(km: Keymgr, stream: FakeStream, ini: Ikev2Initiator, local: str, remote: str) -> None:
    out = ini.start(0.0)
    for _ in range(6):
        port = NAT_T_PORT if ini.port_float else 500
        n = len(stream.sent)
        for data in out:
            # the worker reports addresses in its own spelling; keymgr compares them as addresses
            km._dispatch(IkeDatagram(local, port, remote, port, data), 0.0)
        out = [x for r in stream.sent[n:] for x in ini.receive(r.data, 0.0)]
        if ini.state in (State.ESTABLISHED, State.FAILED):
            return


@pytest.mark.parametrize("mode", ["tunnel", "transport"])
def test_ipv6_cbc_hmac_responder_installs_the_negotiated_suite(
    tmp_path: pathlib.Path, mode: str
) -> None:
    psk = secrets.token_bytes(32)
    f = tmp_path / "psk"
    f.write_bytes(b"0x" + psk.hex().encode())
    ts_a = f"{A6}/128" if mode == "transport" else "2001:db8:a::/64"
    ts_b = f"{B6}/128" if mode == "transport" else "2001:db8:b::1/128"
    conn = Connection(
        "resp6",
        A6,
        B6,
        f,
        ts_a,
        ts_b,
        local_id="@a.example",
        remote_id="%any",
        start_action="respond",
        ike_proposals=("aes256gcm16-prfsha256-x25519", "aes256-sha384-prfsha384-ecp384"),
        esp_proposals=("aes256-sha256", "aes256gcm16"),
        mode=mode,
    )
    km, client, stream = _keymgr(conn)
    ini = Ikev2Initiator(
        InitiatorConfig(
            local_addr=B6,
            remote_addr=A6,
            psk=psk,
            ts_local=(ts_b.split("/")[0], ts_b.split("/")[0]),
            ts_remote=(A6, A6) if mode == "transport" else ("2001:db8:a::", "2001:db8:a::ffff"),
            local_id="@b.example",
            remote_id="@a.example",
            ike_suites=parse_ike_list(["aes256-sha384-prfsha384-ecp384"]),
            esp_suites=parse_esp_list(["aes128gcm16", "aes256-sha256"]),
            mode=Mode.TRANSPORT if mode == "transport" else Mode.TUNNEL,
        ),
        now=0.0,
    )
    _exchange(km, stream, ini, "2001:0db8:0:0::1", B6)
    assert ini.state is State.ESTABLISHED, ini.failure_reason
    assert ini.result is not None and ini.result.suite.dh == 20
    child = ini.result.child
    by_dir = {s.direction: s for s in client.sas}
    inbound, outbound = by_dir[Direction.INBOUND], by_dir[Direction.OUTBOUND]
    assert inbound.encr_id == outbound.encr_id == Encr.AES_CBC
    assert inbound.integ_id == outbound.integ_id == Integ.HMAC_SHA2_256_128
    # keymgr is the responder: the initiator->responder keys protect its inbound SA
    assert (inbound.encr_key, inbound.integ_key) == (child.keys.encr_i, child.keys.integ_i)
    assert (outbound.encr_key, outbound.integ_key) == (child.keys.encr_r, child.keys.integ_r)
    assert len(inbound.encr_key) == 32 and len(inbound.integ_key) == 32
    assert inbound.mode is outbound.mode is (Mode.TRANSPORT if mode == "transport" else Mode.TUNNEL)
    assert len(inbound.dst) == 16 and inbound.dst == bytes.fromhex("20010db8" + "0" * 23 + "1")
    for sa in (inbound, outbound):
        sa.validate()
    # the operator API views report the negotiated mode and algorithms
    (view,) = km.child_sa_views()
    assert (view.mode, view.encryption) == (mode, "AES_CBC-256")
    (ike_view,) = [v for v in km.ike_sa_views() if v.state == "established"]
    assert (ike_view.encryption, ike_view.dh_group) == ("AES_CBC-256", "ECP_384")


def test_child_sa_configs_as_initiator_uses_initiator_keys(tmp_path: pathlib.Path) -> None:
    psk = secrets.token_bytes(32)
    f = tmp_path / "psk"
    f.write_bytes(b"0x" + psk.hex().encode())
    conn = Connection(
        "c",
        "192.0.2.1",
        "192.0.2.2",
        f,
        "198.51.100.1/32",
        "203.0.113.1/32",
        esp_proposals=("chacha20poly1305-esn",),
    )
    km, client, stream = _keymgr(
        Connection(
            "r",
            "192.0.2.2",
            "192.0.2.1",
            f,
            "203.0.113.1/32",
            "198.51.100.1/32",
            start_action="respond",
            esp_proposals=("chacha20poly1305-esn",),
        )
    )
    ini = Ikev2Initiator(
        InitiatorConfig(
            local_addr="192.0.2.1",
            remote_addr="192.0.2.2",
            psk=psk,
            ts_local=("198.51.100.1", "198.51.100.1"),
            ts_remote=("203.0.113.1", "203.0.113.1"),
            esp_suites=conn.esp_suites,
        ),
        now=0.0,
    )
    _exchange(km, stream, ini, "192.0.2.2", "192.0.2.1")
    assert ini.result is not None, ini.failure_reason
    inbound, outbound, spd = child_sa_configs(conn, ini.result, 7, initiator=True)
    k = ini.result.child.keys
    assert inbound.encr_key == k.encr_r and outbound.encr_key == k.encr_i
    assert inbound.encr_id == Encr.CHACHA20_POLY1305 and inbound.esn and outbound.esn
    assert inbound.integ_id == 0 and inbound.integ_key == b""
    assert spd.reqid == 7
    theirs = {s.direction: s for s in client.sas}
    assert theirs[Direction.INBOUND].encr_key == outbound.encr_key  # both ends agree


def test_config_new_fields() -> None:
    doc = """{"connections": [{"name": "v6", "local_addr": "2001:db8::1",
        "remote_addr": "2001:db8::2", "psk_file": "/nonexistent", "local_ts": "2001:db8:a::/64",
        "remote_ts": "2001:db8:b::/64", "local_id": "@a.example", "remote_id": "%any",
        "ike_proposals": ["aes128gcm16-prfsha384-ecp256", "aes256-sha256-modp3072"],
        "esp_proposals": ["aes256gcm16-esn", "aes256-sha256"], "mode": "tunnel"}]}"""
    (c,) = config_from_json(doc, check_psk=False).connections
    assert [s.name for s in c.ike_suites] == [
        "aes128gcm16-prfsha384-ecp256",
        "aes256-sha256-prfsha256-modp3072",
    ]
    assert c.esp_suites[0].esn and c.sa_mode is Mode.TUNNEL
    assert c.ts_range("local") == ("2001:db8:a::", "2001:db8:a:0:ffff:ffff:ffff:ffff")
    d = config_from_json(
        doc.replace('"mode": "tunnel"', '"mode": "tunnel", "allow_legacy": true').replace(
            "aes256-sha256-modp3072", "aes128-sha1-prfsha256-modp1024"
        ),
        check_psk=False,
    )
    assert d.connections[0].ike_suites[1].allow_legacy
    with pytest.raises(ConfigError, match="legacy"):
        config_from_json(
            doc.replace("aes256-sha256-modp3072", "aes128-sha1-prfsha256-modp1024"), check_psk=False
        )
    with pytest.raises(ConfigError, match="transport mode needs"):
        config_from_json(
            doc.replace('"2001:db8:a::/64"', '"10.0.0.0/8"')
            .replace('"2001:db8:b::/64"', '"10.1.0.0/16"')
            .replace('"mode": "tunnel"', '"mode": "transport"'),
            check_psk=False,
        )
    # IPv4 selectors inside an IPv6 tunnel are a valid configuration
    config_from_json(
        doc.replace('"2001:db8:a::/64"', '"10.0.0.0/8"').replace(
            '"2001:db8:b::/64"', '"10.1.0.0/16"'
        ),
        check_psk=False,
    )
