"""keymgr finds a dead strongSwan peer (RFC 7296 §2.4) and applies the connection's dpd_action
— same lab as tests/netns/test_keymgr_strongswan.py (keymgr initiates towards charon in
namespace B through our worker in namespace A; unique namespace names; everything removed on
failure).

keymgr runs with ``dpd_delay`` 2 s, ``retransmit_timeout`` 0.5 s and ``retransmit_tries`` 3:
after the tunnel is up (ping passes), charon is killed with SIGKILL, so it answers nothing and
sends no Delete. keymgr must send a liveness check within ``dpd_delay`` of silence, retransmit
it, and declare the peer dead at most dpd_delay + 0.5 + 1 + 2 s (plus its 0.5 s timer tick and
polling slack) after the kill; then our worker holds no SA. Per action:

* ``clear``: nothing is initiated again;
* ``restart``: keymgr initiates again at once and keeps retrying; once a new charon runs in B,
  a new IKE SA and Child SA come up (new SPIs on both sides) and ping passes;
* ``hold``: the SPD entry stays without SAs; once a new charon runs, a ping (traffic) makes the
  worker report ACQUIRE and keymgr initiates; ping then passes.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable, Iterator

import pytest

from scripts import bench_strongswan as bsw
from tests.netns.test_keymgr_rekey_strongswan import _b_spis, _log_records, _ours
from tests.netns.test_keymgr_strongswan import KeymgrLab, open_lab

pytestmark = pytest.mark.netns

DPD = {"dpd_delay": 2, "retransmit_timeout": 0.5, "retransmit_tries": 3}
DETECT_BOUND = 2 + 0.5 + 1 + 2 + 0.5 + 1.5  # dpd_delay, the retransmissions, tick, slack


@pytest.fixture
def lab() -> Iterator[KeymgrLab]:
    yield from open_lab(KeymgrLab)


def _wait(cond: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return False


def _start_charon(kmlab: KeymgrLab, name: str) -> None:
    b = kmlab.bench
    conf = bsw.swanctl_conf(bsw.OUTER_B, bsw.OUTER_A, bsw.INNER_B, bsw.INNER_A, kmlab.psk)
    proc = b.start_charon(name, b.ns_b, conf)
    b.wait_vici(name, proc)
    conf_file = str(b.workdir / name / "swanctl" / "swanctl.conf")
    b.swanctl(name, "--load-all", "--noprompt", "--file", conf_file)


@pytest.mark.parametrize("action", ["clear", "restart", "hold"])
def test_dead_peer_detected_and_dpd_action_applied(lab: KeymgrLab, action: str) -> None:
    kmlab = lab
    _start_charon(kmlab, "b")
    charon = kmlab.bench.procs[-1]
    kmlab.start_worker()
    keymgr = kmlab.start_keymgr({**DPD, "dpd_action": action})
    client = kmlab.client
    assert client is not None
    assert _wait(lambda: "INSTALLED" in kmlab.list_sas_b() and _ours(kmlab) is not None, 20), (
        kmlab.logs()
    )
    old = _ours(kmlab)
    assert old is not None
    ping = kmlab.ping()
    assert ping.returncode == 0, f"{ping.stdout}{ping.stderr}\n{kmlab.logs()}"
    time.sleep(3)  # a liveness check or two are answered while charon lives
    assert _log_records(kmlab, "peer dead") == [] and _ours(kmlab) == old, kmlab.logs()

    os.kill(charon.pid, signal.SIGKILL)
    charon.wait(timeout=5)
    killed = time.monotonic()
    assert _wait(lambda: client.list_sas() == [], DETECT_BOUND + 2), kmlab.logs()
    detected = time.monotonic() - killed
    print(f"dead peer detected and SAs removed {detected:.1f} s after SIGKILL ({action})")
    assert detected <= DETECT_BOUND, f"{detected:.1f} s\n{kmlab.logs()}"
    (dead,) = _log_records(kmlab, "peer dead")
    assert dead["action"] == action and "3 transmissions" in str(dead["reason"]), dead

    if action == "clear":
        time.sleep(3)
        assert client.list_sas() == []
        assert len(_log_records(kmlab, "ike initiating")) == 1, kmlab.logs()
    else:
        _start_charon(kmlab, "b2")
        if action == "hold":
            assert len(_log_records(kmlab, "ike initiating")) == 1, kmlab.logs()
            kmlab.ping()  # traffic into the held policy: ACQUIRE

        def up() -> bool:
            sas = kmlab.bench.swanctl("b2", "--list-sas")
            return "INSTALLED" in sas and _ours(kmlab) in _b_spis(sas)

        assert _wait(up, 40), f"{kmlab.bench.swanctl('b2', '--list-sas')}\n{kmlab.logs()}"
        new = _ours(kmlab)
        assert new is not None and new[0] != old[0] and new[1] != old[1]
        print(f"re-established after the peer came back: Child SA {old} -> {new}")
        if action == "hold":
            assert _log_records(kmlab, "acquire: initiating"), kmlab.logs()
        ping = kmlab.ping()
        print(ping.stdout)
        assert ping.returncode == 0, f"{ping.stdout}{ping.stderr}\n{kmlab.logs()}"
        assert re.search(r"3 packets transmitted, 3 received", ping.stdout), ping.stdout
    assert keymgr.poll() is None, kmlab.logs()
    keymgr.terminate()
    assert keymgr.wait(timeout=15) == 0, kmlab.logs()
    assert client.list_sas() == []
