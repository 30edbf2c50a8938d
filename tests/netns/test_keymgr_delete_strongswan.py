"""keymgr SA lifecycle against strongSwan 5.9.8 (RFC 7296 §1.4.1): Delete in both directions.

Same lab as tests/netns/test_keymgr_strongswan.py (keymgr initiates towards charon in namespace
B through our worker in namespace A; unique namespace names; everything removed on failure).

* charon terminates the IKE SA (``swanctl --terminate --ike``): keymgr answers the Delete,
  logs it (SPIs only) and our worker's SA list becomes empty.
* keymgr gets SIGTERM: it sends a Delete of the IKE SA, charon no longer lists an IKE SA, our
  worker holds no SA and keymgr exits 0.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest

from scripts import bench_strongswan as bsw
from tests.netns.test_keymgr_strongswan import KeymgrLab, open_lab

pytestmark = pytest.mark.netns


@pytest.fixture
def lab() -> Iterator[KeymgrLab]:
    yield from open_lab(KeymgrLab)


def _up(kmlab: KeymgrLab) -> subprocess.Popen[bytes]:
    """Start everything; return once the tunnel is up and ping passes."""
    kmlab.start_responder()
    kmlab.start_worker()
    keymgr = kmlab.start_keymgr()
    assert kmlab.client is not None
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert keymgr.poll() is None, f"keymgr exited {keymgr.returncode}\n{kmlab.logs()}"
        sas = kmlab.list_sas_b()
        if "INSTALLED" in sas and len(kmlab.client.list_sas()) == 2:
            break
        time.sleep(0.3)
    assert len(kmlab.client.list_sas()) == 2, kmlab.logs()
    ping = kmlab.ping()
    assert ping.returncode == 0, f"{ping.stdout}{ping.stderr}\n{kmlab.logs()}"
    assert re.search(r"3 packets transmitted, 3 received", ping.stdout), ping.stdout
    return keymgr


def _wait(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.2)
    return False


def test_strongswan_terminates_ike_keymgr_removes_sas(lab: KeymgrLab) -> None:
    kmlab = lab
    keymgr = _up(kmlab)
    assert kmlab.client is not None
    out = kmlab.bench.swanctl("b", "--terminate", "--ike", bsw.CONN)
    print(out)
    client = kmlab.client
    assert _wait(lambda: client.list_sas() == []), f"{client.list_sas()}\n{kmlab.logs()}"
    assert _wait(lambda: "ESTABLISHED" not in kmlab.list_sas_b())
    assert keymgr.poll() is None, kmlab.logs()
    # keymgr logs the removal once the worker's answer arrived (just after list_sas saw it)
    assert _wait(lambda: "child removed" in kmlab.log("keymgr.log", 400)), kmlab.logs()
    log_text = (kmlab.workdir / "keymgr.log").read_text(errors="replace")
    print(log_text)
    assert "ike deleted" in log_text and "child removed" in log_text, log_text
    assert kmlab.psk not in log_text.lower()


def test_keymgr_sigterm_deletes_ike_sa_at_strongswan(lab: KeymgrLab) -> None:
    kmlab = lab
    keymgr = _up(kmlab)
    assert kmlab.client is not None
    assert "ESTABLISHED" in kmlab.list_sas_b()
    t0 = time.monotonic()
    keymgr.terminate()
    assert keymgr.wait(timeout=10) == 0, kmlab.logs()
    print(f"keymgr exited after {time.monotonic() - t0:.2f}s")
    assert _wait(lambda: kmlab.list_sas_b().strip() == ""), kmlab.list_sas_b()
    assert kmlab.client.list_sas() == []
    log_text = (kmlab.workdir / "keymgr.log").read_text(errors="replace")
    print(log_text)
    assert "ike deleting" in log_text and "ike deleted" in log_text, log_text
    assert "not every peer answered" not in log_text, log_text
    assert kmlab.psk not in log_text.lower()


def test_strongswan_terminates_child_keymgr_removes_sas_keeps_ike(lab: KeymgrLab) -> None:
    kmlab = lab
    keymgr = _up(kmlab)
    client = kmlab.client
    assert client is not None
    print(kmlab.bench.swanctl("b", "--terminate", "--child", bsw.CONN))
    assert _wait(lambda: client.list_sas() == []), f"{client.list_sas()}\n{kmlab.logs()}"
    assert _wait(lambda: "INSTALLED" not in kmlab.list_sas_b())
    sas = kmlab.list_sas_b()
    print(sas)
    assert "ESTABLISHED" in sas, sas  # only the Child SA went away
    assert keymgr.poll() is None, kmlab.logs()
    assert _wait(lambda: "child removed" in kmlab.log("keymgr.log", 400)), kmlab.logs()
    log_text = (kmlab.workdir / "keymgr.log").read_text(errors="replace")
    assert "child deleted by peer" in log_text and "child removed" in log_text, log_text
    # SIGTERM still deletes the IKE SA (no Child SA left in the worker)
    keymgr.terminate()
    assert keymgr.wait(timeout=10) == 0, kmlab.logs()
    assert _wait(lambda: kmlab.list_sas_b().strip() == ""), kmlab.list_sas_b()
