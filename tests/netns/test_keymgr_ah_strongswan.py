"""AH Child SAs against strongSwan 5.9.8: the negotiation, as far as charon goes on this kernel.

charon here does IPsec with kernel-libipsec only (no XFRM ESP/AH in this kernel), and libipsec
implements ESP only: charon negotiates an AH proposal and then fails to install it ("IPsec SA:
protocol not supported"), answering NO_PROPOSAL_CHOSEN. kernel-libipsec also needs UDP
encapsulation, so charon fakes its NAT_DETECTION_SOURCE_IP hash to force it (RFC 7296 §2.23,
strongSwan's ``encap``): keymgr therefore sees NAT towards charon, and an AH Child SA across NAT
is refused by keymgr too. What these tests prove:

* keymgr initiates with ``ah_proposals: ["sha256"]``: charon parses our IKE_AUTH SA payload and
  selects ``AH:HMAC_SHA2_256_128/NO_EXT_SEQ`` (charon's own reading of our AH proposal, protocol
  ID 2), then fails to install it; the IKE SA is ESTABLISHED on charon's side (AUTH verified
  both ways); keymgr logs the failure with NO_PROPOSAL_CHOSEN, names its AH proposals and the
  NAT, and installs nothing.
* charon initiates with ``ah_proposals = sha256``: keymgr (responder) parses charon's AH
  proposal, detects the (faked) NAT and answers NO_PROPOSAL_CHOSEN with that reason; charon
  reports "received NO_PROPOSAL_CHOSEN notify, no CHILD_SA built"; keymgr installs nothing.

Both labs capture IKE on the link and check, at cleanup, that tshark decrypts every IKEv2
message with keymgr's exported keys (``check_ike_capture``). AH traffic is proven between two
keymgrs in test_keymgr_ah.py.
"""

from __future__ import annotations

import pytest

from services.core.ike.exchange import AH_NAT_REASON
from tests.netns.test_keymgr_matrix import _case, _records, _wait_log, make_lab  # noqa: F401
from tests.netns.test_keymgr_responder_strongswan import ResponderLab
from tests.netns.test_keymgr_strongswan import KeymgrLab

pytestmark = pytest.mark.netns

IKE = "aes256gcm16-prfsha256-x25519"


def test_keymgr_initiates_ah_to_strongswan(make_lab: list[KeymgrLab]) -> None:  # noqa: F811
    lab = KeymgrLab(_case(IKE, "sha256", ipv6=False, ah=True))
    make_lab.append(lab)
    lab.start_responder()
    lab.start_worker()
    lab.start_keymgr()
    text = _wait_log(lab, "ike failed", timeout=20)
    charon = lab.log("charon-b.log", 400)
    print(charon)
    # charon took our AH proposal and failed only at installing it (libipsec: ESP only)
    assert "selected proposal: AH:HMAC_SHA2_256_128/NO_EXT_SEQ" in charon, charon
    assert "IPsec SA: protocol not supported" in charon, charon
    assert "IKE_SA bench[1] established" in charon, charon
    sas = lab.list_sas_b()
    assert "ESTABLISHED" in sas and "INSTALLED" not in sas, sas
    (failed,) = _records(text, "ike failed")
    assert failed["reason"] == (
        "NO_PROPOSAL_CHOSEN: the responder accepted none of our AH proposals (sha256); "
        + AH_NAT_REASON
    ), failed
    (init,) = _records(text, "ike initiating")
    assert init["ah_proposals"] == "sha256", init
    assert lab.client is not None and lab.client.list_sas() == []


def test_strongswan_initiates_ah_to_keymgr(make_lab: list[KeymgrLab]) -> None:  # noqa: F811
    lab = ResponderLab(_case(IKE, "sha256", ipv6=True, ah=True))
    make_lab.append(lab)
    lab.start_worker()
    keymgr = lab.start_responder_keymgr()
    lab.wait_punt_connected(keymgr)
    lab.start_initiator_charon()
    init = lab.initiate()
    print(init.stdout[-2500:])
    assert "remote host is behind NAT" not in init.stdout  # we do not fake NAT-D, charon does:
    assert "faking NAT situation to enforce UDP encapsulation" in init.stdout, init.stdout
    assert "received NO_PROPOSAL_CHOSEN notify, no CHILD_SA built" in init.stdout, init.stdout
    text = _wait_log(lab, "ike failed", timeout=10)
    (failed,) = _records(text, "ike failed")
    assert failed["role"] == "responder" and failed["reason"] == (
        f"NO_PROPOSAL_CHOSEN: {AH_NAT_REASON}"
    ), failed
    assert _records(text, "child installed") == []
    assert lab.client is not None and lab.client.list_sas() == []
