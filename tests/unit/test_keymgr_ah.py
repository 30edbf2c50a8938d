"""keymgr with AH Child SAs (no worker, no network): ``ah_proposals`` in the configuration,
what keymgr installs for an AH Child SA in both roles (protocol AH, integrity keys of the right
direction, never UDP-encapsulated, an SPD entry whose bundle is AH), the refusal of an AH Child
SA across NAT (log and event with the reason) and the AH record of the key export, which tshark
must accept."""

from __future__ import annotations

import logging
import pathlib
import secrets
import shutil

import pytest

from services.core.iana import Integ, IpProto
from services.core.ike.exchange import (
    AH_NAT_REASON,
    Ikev2Initiator,
    InitiatorConfig,
    State,
)
from services.core.ike.suites import parse_ah_list
from services.core.sa import Direction, Mode
from services.dataplane.convert import (
    sa_config_from_pb,
    sa_config_to_pb,
    spd_entry_from_pb,
    spd_entry_to_pb,
)
from services.keymgr import events as ev
from services.keymgr.config import ConfigError, Connection, config_from_json
from services.keymgr.daemon import child_sa_configs, connection_spd
from services.keymgr.events import WS_ESP_INTEG, esp_uat
from tests.unit.test_keymgr_keyexport_formats import _tshark_accepts
from tests.unit.test_keymgr_suites import _exchange, _keymgr

A, B = "192.0.2.1", "192.0.2.2"
TS_A, TS_B = "198.51.100.0/24", "203.0.113.1/32"


def _psk(tmp_path: pathlib.Path) -> tuple[bytes, pathlib.Path]:
    psk = secrets.token_bytes(32)
    f = tmp_path / "psk"
    f.write_bytes(b"0x" + psk.hex().encode())
    return psk, f


def _responder(f: pathlib.Path, ah: tuple[str, ...], mode: str = "tunnel") -> Connection:
    ts_a, ts_b = (f"{A}/32", f"{B}/32") if mode == "transport" else (TS_A, TS_B)
    return Connection(
        "ah-r", A, B, f, ts_a, ts_b, start_action="respond", ah_proposals=ah, mode=mode
    )


def _initiator(psk: bytes, ah: tuple[str, ...], mode: str, local: str = B) -> Ikev2Initiator:
    ts_b, ts_a = ((B, B), (A, A)) if mode == "transport" else (("203.0.113.1",) * 2, None)
    return Ikev2Initiator(
        InitiatorConfig(
            local_addr=local,
            remote_addr=A,
            psk=psk,
            ts_local=ts_b,
            ts_remote=ts_a or ("198.51.100.0", "198.51.100.255"),
            local_id=B,
            esp_suites=parse_ah_list(list(ah)),
            mode=Mode.TRANSPORT if mode == "transport" else Mode.TUNNEL,
        ),
        now=0.0,
    )


@pytest.mark.parametrize("mode", ["tunnel", "transport"])
def test_responder_installs_ah_sas_and_an_ah_spd_entry(tmp_path: pathlib.Path, mode: str) -> None:
    psk, f = _psk(tmp_path)
    km, client, stream = _keymgr(_responder(f, ("sha512", "sha256-esn"), mode))
    ini = _initiator(psk, ("sha256-esn",), mode)
    _exchange(km, stream, ini, A, B)
    assert ini.state is State.ESTABLISHED, ini.failure_reason
    assert ini.port_float  # IKE moved to 4500 ...
    assert ini.result is not None
    child = ini.result.child
    by_dir = {s.direction: s for s in client.sas}
    inbound, outbound = by_dir[Direction.INBOUND], by_dir[Direction.OUTBOUND]
    for sa in (inbound, outbound):
        assert sa.protocol == IpProto.AH
        assert sa.encap is None  # ... but AH is never UDP-encapsulated (RFC 3948: ESP only)
        assert (sa.encr_id, sa.encr_key) == (0, b"")
        assert sa.integ_id == Integ.HMAC_SHA2_256_128 and len(sa.integ_key) == 32 and sa.esn
        assert sa.mode is (Mode.TRANSPORT if mode == "transport" else Mode.TUNNEL)
        sa.validate()
        assert sa_config_from_pb(sa_config_to_pb(sa)) == sa  # the worker's converter takes it
    # keymgr responds: the initiator->responder integrity key protects its inbound SA
    assert inbound.integ_key == child.keys.integ_i and outbound.integ_key == child.keys.integ_r
    assert inbound.spi == int.from_bytes(child.spi_out, "big")
    ((entries, _rev),) = client.spd
    assert [e.protocols for e in entries] == [(int(IpProto.AH),)]
    assert spd_entry_from_pb(spd_entry_to_pb(entries[0])) == entries[0]
    (view,) = km.child_sa_views()
    assert (view.protocol, view.encryption, view.integrity, view.udp_encap) == (
        "ah",
        "",
        "HMAC_SHA2_256_128",
        False,
    )


def test_initiator_side_configs_use_the_initiator_keys(tmp_path: pathlib.Path) -> None:
    psk, f = _psk(tmp_path)
    km, client, stream = _keymgr(_responder(f, ("sha384",)))
    ini = _initiator(psk, ("sha384",), "tunnel")
    _exchange(km, stream, ini, A, B)
    r = ini.result
    assert r is not None, ini.failure_reason
    mine = Connection("ah-i", B, A, f, TS_B, TS_A, ah_proposals=("sha384",))
    inbound, outbound, spd = child_sa_configs(mine, r, 3, initiator=True)
    assert (inbound.protocol, outbound.protocol) == (IpProto.AH, IpProto.AH)
    assert outbound.integ_key == r.child.keys.integ_i and inbound.integ_key == r.child.keys.integ_r
    assert len(inbound.integ_key) == 48 and inbound.integ_id == Integ.HMAC_SHA2_384_192
    assert spd.protocols == (int(IpProto.AH),) and spd.reqid == 3
    theirs = {s.direction: s for s in client.sas}
    assert theirs[Direction.INBOUND].integ_key == outbound.integ_key  # both ends agree
    assert theirs[Direction.INBOUND].spi == outbound.spi
    # the same result marked as crossing NAT is refused (the core refuses it first)
    from dataclasses import replace

    with pytest.raises(ValueError, match="cannot cross NAT"):
        child_sa_configs(mine, replace(r, nat_detected=True), 3, initiator=True)
    # ESP connections keep their ESP bundle
    esp = Connection("esp", B, A, f, TS_B, TS_A)
    assert connection_spd(esp, 1).protocols == (int(IpProto.ESP),)


def test_ah_child_across_nat_fails_with_a_reason(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    psk, f = _psk(tmp_path)
    km, client, stream = _keymgr(_responder(f, ("sha256",)))
    sub = km.events.subscribe()
    # the initiator sits behind a NAT: it hashes 10.0.0.5, its packets arrive from B
    ini = _initiator(psk, ("sha256",), "tunnel", local="10.0.0.5")
    with caplog.at_level(logging.INFO, logger="services.keymgr.daemon"):
        _exchange(km, stream, ini, A, B)
    assert ini.state is State.FAILED and ini.failure_reason is not None
    assert AH_NAT_REASON in ini.failure_reason
    assert client.sas == [] and client.spd == []  # nothing installed
    failed = [r for r in caplog.records if r.getMessage() == "ike failed"]
    assert [getattr(r, "reason", "") for r in failed] == [f"NO_PROPOSAL_CHOSEN: {AH_NAT_REASON}"]
    events = []
    while (e := sub.get(timeout=0.1)) is not None:
        events.append(e)
    (e,) = [e for e in events if e.kind == ev.NEGOTIATION_FAILED]
    assert AH_NAT_REASON in e.reason and "use esp_proposals" in e.reason


def test_config_ah_proposals() -> None:
    doc = """{"connections": [{"name": "ah", "local_addr": "192.0.2.1",
        "remote_addr": "192.0.2.2", "psk_file": "/nonexistent", "local_ts": "192.0.2.1/32",
        "remote_ts": "192.0.2.2/32", "ah_proposals": ["sha512-esn", "sha256-x25519"],
        "mode": "transport"}]}"""
    (c,) = config_from_json(doc, check_psk=False).connections
    assert c.ah and [s.name for s in c.child_suites] == ["sha512-esn", "sha256-x25519"]
    assert all(s.ah for s in c.child_suites) and c.child_proposals == c.ah_proposals
    both = doc.replace('"mode"', '"esp_proposals": ["aes256gcm16"], "mode"')
    # (aes256gcm16 is the default ESP suite: naming it explicitly is still giving both)
    with pytest.raises(ConfigError, match="either esp_proposals or ah_proposals"):
        config_from_json(both, check_psk=False)
    with pytest.raises(ConfigError, match="either esp_proposals or ah_proposals"):
        Connection("m", A, B, pathlib.Path("/x"), TS_A, TS_B, esp_proposals=("aes128gcm16",),
                   ah_proposals=("sha256",))  # fmt: skip
    with pytest.raises(ConfigError, match="AH has no encryption"):
        config_from_json(doc.replace('"sha512-esn"', '"aes256-sha256"'), check_psk=False)
    with pytest.raises(ConfigError, match="legacy"):
        config_from_json(doc.replace('"sha512-esn"', '"sha1"'), check_psk=False)
    legacy = doc.replace('"sha512-esn"', '"sha1"').replace('"mode"', '"allow_legacy": true, "mode"')
    (c,) = config_from_json(legacy, check_psk=False).connections
    assert c.child_suites[0].integ == Integ.HMAC_SHA1_96
    with pytest.raises(ConfigError, match="must not be empty"):
        config_from_json(doc.replace('["sha512-esn", "sha256-x25519"]', "[]"), check_psk=False)
    # without ah_proposals nothing changes
    plain = Connection("p", A, B, pathlib.Path("/x"), TS_A, TS_B)
    assert not plain.ah and plain.child_suites == plain.esp_suites and plain.ah_suites == ()


def test_key_export_writes_ah_in_the_esp_sa_table(tmp_path: pathlib.Path) -> None:
    psk, f = _psk(tmp_path)
    km, client, stream = _keymgr(_responder(f, ("sha256",)))
    _exchange(km, stream, _initiator(psk, ("sha256",), "tunnel"), A, B)
    inbound = next(s for s in client.sas if s.direction is Direction.INBOUND)
    rec = esp_uat(inbound)
    assert rec == (
        f'uat:esp_sa:"IPv4","{B}","{A}","0x{inbound.spi:08x}","NULL","",'
        f'"{WS_ESP_INTEG[Integ.HMAC_SHA2_256_128]}","0x{inbound.integ_key.hex()}"'
    )
    if shutil.which("tshark") is not None:
        res = _tshark_accepts(tmp_path, [rec])
        assert res.returncode == 0, res.stderr[-300:]
