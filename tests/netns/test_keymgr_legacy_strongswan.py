"""The legacy IKE suite ``aes128-sha1-modp2048`` (PRF HMAC-SHA1, INTEG HMAC-SHA1-96) against
strongSwan 5.9.8, with the labs and checks of test_keymgr_matrix.py.

With ``allow_legacy: true``, in both roles: charon lists the IKE SA as
AES_CBC-128/HMAC_SHA1_96/PRF_HMAC_SHA1/MODP_2048 and the Child SA as ESP AES_CBC-128 /
HMAC_SHA1_96 with our worker's SPIs, ping and a 256 KiB TCP transfer (SHA-256 compared) cross
the tunnel, and tshark decrypts every captured IKE message with the exported keys. Without it:
keymgr refuses the configuration at start (exit 2, the log names the legacy token), and as
responder with its default suites it answers charon's SHA-1-only offer with
NO_PROPOSAL_CHOSEN.
"""

from __future__ import annotations

import time

import pytest

from tests.netns.test_keymgr_matrix import (
    _case,
    _check_established,
    _check_traffic,
    _records,
    _wait_log,
    make_lab,  # noqa: F401 - the fixture
)
from tests.netns.test_keymgr_responder_strongswan import ResponderLab
from tests.netns.test_keymgr_strongswan import KeymgrLab

pytestmark = pytest.mark.netns

IKE = "aes128-sha1-modp2048"
ESP = "aes128-sha1"
IKE_ALGS = "AES_CBC-128/HMAC_SHA1_96/PRF_HMAC_SHA1/MODP_2048"
ESP_ALGS = "ESP:AES_CBC-128/HMAC_SHA1_96"
LEGACY = {"allow_legacy": True}


def _check_log(lab: KeymgrLab, role: str) -> None:
    text = _wait_log(lab, "child installed")
    (ike,) = _records(text, "ike established")
    assert ike["ike"] == "aes128-sha1-prfsha1-modp2048" and ike["role"] == role, ike
    (child,) = _records(text, "child installed")
    assert child["esp"] == ESP, child
    assert lab.psk not in text.lower()


def test_keymgr_initiates_sha1_suite_with_allow_legacy(make_lab: list[KeymgrLab]) -> None:  # noqa: F811
    lab = KeymgrLab(_case(IKE, ESP, ipv6=False))
    make_lab.append(lab)
    lab.start_responder()
    lab.start_worker()
    keymgr = lab.start_keymgr(LEGACY)
    sas = ""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert keymgr.poll() is None, f"keymgr exited {keymgr.returncode}\n{lab.logs()}"
        sas = lab.list_sas_b()
        if "ESTABLISHED" in sas and "INSTALLED" in sas:
            break
        time.sleep(0.3)
    print(sas)
    _check_established(lab, sas, IKE_ALGS, ESP_ALGS)
    _check_traffic(lab, ping_from_a=True)
    _check_log(lab, "initiator")


def test_strongswan_initiates_sha1_suite_to_keymgr(make_lab: list[KeymgrLab]) -> None:  # noqa: F811
    lab = ResponderLab(_case(IKE, ESP, ipv6=False))
    make_lab.append(lab)
    lab.start_worker()
    keymgr = lab.start_responder_keymgr(LEGACY)
    lab.wait_punt_connected(keymgr)
    lab.start_initiator_charon()
    init = lab.initiate()
    print(init.stdout[-1500:])
    assert init.returncode == 0, f"{init.stdout[-2000:]}\n{lab.logs()}"
    sas = lab.list_sas_b()
    print(sas)
    _check_established(lab, sas, IKE_ALGS, ESP_ALGS)
    _check_traffic(lab, ping_from_a=False)
    _check_log(lab, "responder")


def test_sha1_suite_refused_without_allow_legacy(make_lab: list[KeymgrLab]) -> None:  # noqa: F811
    lab = KeymgrLab(_case(IKE, ESP, ipv6=False))
    make_lab.append(lab)
    lab.skip_ike_check("keymgr refuses its configuration and sends no IKE")
    lab.start_worker()
    keymgr = lab.start_keymgr()
    assert keymgr.wait(timeout=30) == 2, lab.logs()
    text = (lab.workdir / "keymgr.log").read_text(errors="replace")
    (rec,) = _records(text, "invalid configuration")
    assert "'sha1' is legacy" in str(rec["reason"]), rec


def test_keymgr_without_legacy_answers_no_proposal_chosen(make_lab: list[KeymgrLab]) -> None:  # noqa: F811
    # charon offers only the SHA-1 suite; keymgr responds with its default (SHA-2) suites
    case = _case(
        IKE,
        ESP,
        ipv6=False,
        keymgr_ike=("aes128-sha256-modp2048",),
        keymgr_esp=(ESP.replace("sha1", "sha256"),),
    )
    lab = ResponderLab(case)
    make_lab.append(lab)
    lab.start_worker()
    keymgr = lab.start_responder_keymgr()
    lab.wait_punt_connected(keymgr)
    lab.start_initiator_charon()
    init = lab.initiate()
    print(init.stdout[-2000:])
    assert init.returncode != 0
    assert "received NO_PROPOSAL_CHOSEN notify" in init.stdout, init.stdout
    text = _wait_log(lab, "NO_PROPOSAL_CHOSEN")
    assert "NO_PROPOSAL_CHOSEN" in text, text
    assert lab.client is not None and lab.client.list_sas() == []
