"""The PRF HMAC-SHA1 (RFC 2104, IKEv2 transform 2) with INTEG HMAC-SHA1-96 (RFC 2404) for IKE
SAs, accepted only with ``allow_legacy`` (RFC 8247 §2.2/§2.3 demote SHA-1).

Checked against independent oracles: the IKE SA keys of suite ``aes128-sha1-modp2048`` equal
NIST's SP 800-135 IKEv2 KDF sample ([SHA-1] COUNT 0, whose 132-octet DKM is exactly one
AES-128 / HMAC-SHA1-96 / PRF-HMAC-SHA1 key set; data in tests/unit/test_ike_keys.py); the PSK
AUTH value computed by the core equals HMAC-SHA1 computed with the ``cryptography`` package
over the RFC 7296 §2.15 layout; an in-memory handshake of both roles establishes with the suite
and installs HMAC-SHA1-96 ESP. Without ``allow_legacy`` the suite is refused at parse time
(keymgr: ConfigError naming it) and a responder that does not allow it answers
NO_PROPOSAL_CHOSEN to an initiator offering only it.
"""

from __future__ import annotations

import json
import pathlib
from dataclasses import replace

import pytest
from cryptography.hazmat.primitives import hashes, hmac

from services.core.engine import Dataplane
from services.core.iana import Encr, Integ
from services.core.ike.authn import KEY_PAD, PskAuth, signed_octets
from services.core.ike.exchange import State, ike_keys
from services.core.ike.prf import Prf
from services.core.ike.responder import ResponderState
from services.core.ike.suites import SuiteError, choose_ike, ike_proposals, parse_ike
from services.keymgr.config import ConfigError, Connection, config_from_json
from services.keymgr.daemon import child_sa_configs
from tests.unit.test_ike_keys import KDF_CASES
from tests.unit.test_ike_suites import V4, _configs, _shuttle

SUITE = "aes128-sha1-modp2048"


def _hmac_sha1(key: bytes, data: bytes) -> bytes:
    h = hmac.HMAC(key, hashes.SHA1())
    h.update(data)
    return h.finalize()


def test_suite_parses_only_with_allow_legacy() -> None:
    with pytest.raises(SuiteError, match="legacy"):
        parse_ike(SUITE)
    with pytest.raises(SuiteError, match="legacy"):
        parse_ike("aes256gcm16-prfsha1-x25519")
    s = parse_ike(SUITE, allow_legacy=True)
    assert (s.encr, s.key_bits, s.integ, s.prf) == (
        Encr.AES_CBC,
        128,
        Integ.HMAC_SHA1_96,
        Prf.HMAC_SHA1,
    )
    assert s.name == "aes128-sha1-prfsha1-modp2048"
    assert (s.encr_key_len, s.integ_key_len, s.prf_key_len) == (16, 20, 20)


def test_ike_sa_keys_equal_the_nist_cavs_sha1_sample() -> None:
    case = KDF_CASES[0]
    assert case.name == "cavs-sample-sha1"
    s = parse_ike(SUITE, allow_legacy=True)
    k = ike_keys(s, case.ni, case.nr, case.g_ir, case.spi_i, case.spi_r)
    got = k.sk_d + k.sk_ai + k.sk_ar + k.sk_ei + k.sk_er + k.sk_pi + k.sk_pr
    assert got == case.dkm


def test_psk_auth_is_hmac_sha1_of_the_signed_octets() -> None:
    alg = parse_ike(SUITE, allow_legacy=True).prf_alg
    psk, sk_p = b"a pre-shared key for the test", bytes(range(20))
    msg, nonce, id_body = b"\x01" * 60, b"\x02" * 32, b"\x01\x00\x00\x00\xc0\x00\x02\x01"
    octets = signed_octets(alg, msg, nonce, sk_p, id_body)
    assert octets == msg + nonce + _hmac_sha1(sk_p, id_body)
    want = _hmac_sha1(_hmac_sha1(psk, KEY_PAD), octets)
    assert PskAuth(psk).auth_payload(octets, alg, frozenset()).data == want
    with pytest.raises(Exception, match="legacy"):  # the bare transform ID stays refused
        PskAuth(psk).auth_payload(octets, Prf.HMAC_SHA1, frozenset())


def test_handshake_with_sha1_prf_both_roles() -> None:
    ini, resp = _configs(V4, [SUITE], [SUITE], ["aes128-sha1"], ["aes128-sha1"], legacy=True)
    _shuttle(ini, resp, V4)
    assert ini.state is State.ESTABLISHED, ini.failure_reason
    assert resp.state is ResponderState.ESTABLISHED, resp.failure_reason
    assert ini.result is not None and resp.result is not None
    assert ini.result.suite.prf == Prf.HMAC_SHA1 == resp.result.suite.prf
    assert ini.result.child.integ_id == Integ.HMAC_SHA1_96
    assert ini.result.keys.sk_d == resp.result.keys.sk_d and len(ini.result.keys.sk_d) == 20


def test_responder_without_allow_legacy_chooses_nothing() -> None:
    offered = ike_proposals([parse_ike(SUITE, allow_legacy=True)])
    ours = (parse_ike("aes128-sha256-modp2048"),)
    assert choose_ike(offered, ours) is None  # -> NO_PROPOSAL_CHOSEN


def test_keymgr_config_refuses_sha1_without_allow_legacy(tmp_path: pathlib.Path) -> None:
    conn = {
        "name": "legacy",
        "local_addr": "192.0.2.1",
        "remote_addr": "192.0.2.2",
        "psk_file": str(tmp_path / "psk"),
        "local_ts": "10.1.0.0/24",
        "remote_ts": "10.2.0.0/24",
        "ike_proposals": [SUITE],
    }
    with pytest.raises(ConfigError, match=r"'sha1' is legacy"):
        config_from_json(_doc(conn), check_psk=False)
    ok = config_from_json(_doc({**conn, "allow_legacy": True}), check_psk=False)
    assert ok.connections[0].ike_suites[0].prf == Prf.HMAC_SHA1


def _doc(conn: dict[str, object]) -> str:
    return json.dumps({"connections": [conn]})


def test_keymgr_installs_legacy_esp_with_allow_legacy(tmp_path: pathlib.Path) -> None:
    """A legacy ESP suite reaches the worker marked allow_legacy (the worker refuses
    HMAC-SHA1-96 otherwise) and the engine builds both SAs."""
    ini, resp = _configs(V4, [SUITE], [SUITE], ["aes128-sha1"], ["aes128-sha1"], legacy=True)
    _shuttle(ini, resp, V4)
    assert ini.result is not None
    c = Connection(
        "c",
        V4[0],
        V4[1],
        tmp_path / "psk",
        f"{V4[2]}/32",
        f"{V4[3]}/32",
        ike_proposals=(SUITE,),
        esp_proposals=("aes128-sha1",),
        allow_legacy=True,
    )
    inbound, outbound, _spd = child_sa_configs(c, ini.result, 1, initiator=True)
    assert inbound.allow_legacy and outbound.allow_legacy
    assert outbound.integ_id == Integ.HMAC_SHA1_96
    dp = Dataplane()
    dp.install_sa(inbound, 0.0)
    dp.install_sa(outbound, 0.0)
    with pytest.raises(ValueError, match="legacy"):
        Dataplane().install_sa(replace(outbound, allow_legacy=False), 0.0)
