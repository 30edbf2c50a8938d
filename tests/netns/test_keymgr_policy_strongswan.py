"""keymgr in policy mode against strongSwan 5.9.8: its connections come from policyd's compiled
policy for the worker's node (watch stream over mutual TLS on a unix socket), and policy
changes apply live without touching tunnels they do not concern.

Lab: tests/netns/test_keymgr_strongswan.py's KeymgrLab (charon responder in B, our worker in
A), plus policyd on SQLite in the lab's directory with ``--grpc-listen unix:...`` and the dev
PKI. The test plays the worker's policy layer: it pushes the compiled PROTECT entries (the
policy's reqids) with ReplaceSPD itself; keymgr in policy mode never sends SPD changes.

Steps: a tunnel policy (template ``tunnel``, PSK by reference) over REST -> keymgr enforces
its revision (policyd's GET /v1/enforced) and waits (trap) -> ping triggers the worker's
ACQUIRE -> tunnel up -> an unrelated rule is added over REST -> keymgr reports the new revision
and the tunnel keeps its SPIs (worker and charon) and passes traffic -> keymgr restarts while
policyd is down: it enforces its saved revision and traffic brings the tunnel up again ->
policyd back: keymgr reports the revision again -> the tunnel policy is deleted -> keymgr
deletes the IKE SA: charon shows none and the worker holds no SA.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from scripts import bench_strongswan as bsw
from services.runtime.policywatch import spd_entries
from tests.netns.test_keymgr_strongswan import CLIENT, REPO, WORKER_ID, KeymgrLab, _env, open_lab

pytestmark = pytest.mark.netns

ADMIN_TOKEN = "admin-token-0123456789abcdef"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
POLICYD = "policyd"  # its certificate's name in the dev PKI


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(pred: Callable[[], object], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


class PolicyLab(KeymgrLab):
    policyd: subprocess.Popen[bytes] | None = None

    def start_policyd(self) -> httpx.Client:
        subprocess.run(
            [sys.executable, "-m", "services.runtime.devpki", str(self.pki), "--names", POLICYD],
            cwd=REPO,
            env=_env(),
            check=True,
            capture_output=True,
        )
        tokens = self.workdir / "tokens.json"
        tokens.write_text(
            json.dumps({"tokens": [{"name": "admin", "role": "admin", "token": ADMIN_TOKEN}]})
        )
        self.secrets = self.workdir / "secrets"
        self.secrets.mkdir()
        psk = self.secrets / "site-b"  # the rule's psk_ref, a file in --secrets-dir
        psk.write_text(f"0x{self.psk}\n")
        psk.chmod(0o600)
        self.watch_sock = self.workdir / "policyd.sock"
        port = _free_port()
        argv = [sys.executable, "-m", "services.policyd"]
        argv += ["--database-url", f"sqlite:///{self.workdir / 'policyd.db'}"]
        argv += ["--listen", f"127.0.0.1:{port}", "--secrets-dir", str(self.secrets)]
        argv += ["--grpc-listen", f"unix:{self.watch_sock}", "--tls-dir", str(self.pki)]
        argv += ["--tls-cert-name", POLICYD, "--revision-poll", "0.2", "--log-level", "info"]
        self._policyd_cmd = (argv, {**_env(), "POLICYD_TOKENS_FILE": str(tokens)})
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10, headers=ADMIN)
        self.restart_policyd()
        return self.http

    def restart_policyd(self) -> None:
        """Start policyd (again: same database, sockets and port)."""
        argv, env = self._policyd_cmd
        with (self.workdir / "policyd.log").open("ab") as out:
            self.policyd = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env=env,
                start_new_session=True,
            )
        self.bench.procs.append(self.policyd)

        def up() -> bool:
            assert self.policyd is not None and self.policyd.poll() is None, self.log("policyd.log")
            with contextlib.suppress(httpx.HTTPError):
                return self.http.get("/healthz").status_code == 200
            return False

        _wait(up, "policyd did not start")

    def stop_policyd(self) -> None:
        assert self.policyd is not None
        self.policyd.send_signal(signal.SIGKILL)
        self.policyd.wait(timeout=10)

    def start_policy_keymgr(self) -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-m", "services.keymgr", "--policyd", f"unix:{self.watch_sock}"]
        argv += ["--policyd-server-name", POLICYD]
        argv += ["--policy-state-dir", str(self.workdir / "policy-state")]
        argv += ["--dataplane", f"unix:{self.sock}", "--tls-dir", str(self.pki)]
        argv += ["--server-name", WORKER_ID, "--client-name", CLIENT, "--log-level", "debug"]
        return self._popen(argv, "keymgr.log")

    def logs(self) -> str:
        return f"{super().logs()}\n--- policyd ---\n{self.log('policyd.log')}"


@pytest.fixture
def plab() -> Iterator[PolicyLab]:
    yield from open_lab(PolicyLab)


def _compiled(http: httpx.Client) -> dict[str, Any]:
    r = http.get("/v1/compiled", params={"node": WORKER_ID, "addresses": bsw.OUTER_A})
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def _enforced(http: httpx.Client) -> int:
    r = http.get("/v1/enforced")
    assert r.status_code == 200, r.text
    for e in r.json()["enforced"]:
        if e["node"] == WORKER_ID and e["component"] == "keymgr":
            return int(e["revision"])
    return 0


def _push_policy_layer(plab: PolicyLab, policy: dict[str, Any]) -> list[int]:
    """What the worker's policy layer will hold: the policy's PROTECT entries (their forward
    direction, as keymgr's own entry was). Returns their reqids."""
    entries = spd_entries(policy)
    keep = [
        e
        for e, raw in zip(entries, policy["entries"], strict=True)
        if raw["action"] == "protect" and not raw["origin"]["mirrored"]
    ]
    assert plab.client is not None
    plab.client.replace_spd(keep, int(policy["revision"]))
    return [e.reqid for e in keep]


def _spis(plab: PolicyLab) -> set[int]:
    assert plab.client is not None
    return {s.spi for s in plab.client.list_sas()}


def test_keymgr_follows_policyd_and_live_changes_keep_the_tunnel(plab: PolicyLab) -> None:
    plab.start_responder()
    plab.start_worker()
    http = plab.start_policyd()
    tunnel = {
        "prefix": "gw",
        "local_subnet": f"{bsw.INNER_A}/32",
        "remote_subnet": f"{bsw.INNER_B}/32",
        "local_gateway": bsw.OUTER_A,
        "remote_gateway": bsw.OUTER_B,
        "auth": [{"method": "psk", "psk_ref": "site-b"}],
        "assigned_to": [WORKER_ID],
    }
    r = http.post("/v1/templates/tunnel", json=tunnel)
    assert r.status_code == 200, r.text
    policy = _compiled(http)
    (conn,) = policy["connections"]
    reqids = _push_policy_layer(plab, policy)
    assert reqids and set(reqids) <= set(conn["reqids"]) and min(reqids) >= 1 << 20

    keymgr = plab.start_policy_keymgr()
    rev1 = int(policy["revision"])

    def enforced(rev: int) -> Callable[[], bool]:
        def check() -> bool:
            assert keymgr.poll() is None, f"keymgr exited\n{plab.logs()}"
            with contextlib.suppress(httpx.HTTPError):
                return _enforced(http) == rev
            return False

        return check

    _wait(enforced(rev1), f"keymgr never reported revision {rev1}\n{plab.logs()}")
    time.sleep(1.0)
    assert "ESTABLISHED" not in plab.list_sas_b(), "keymgr initiated before any traffic"
    ok = False
    deadline = time.monotonic() + 20
    while not ok and time.monotonic() < deadline:
        ok = plab.ping().returncode == 0  # the first packets make the worker ACQUIRE
    assert ok, plab.logs()
    sas_b = plab.list_sas_b()
    assert "ESTABLISHED" in sas_b and "INSTALLED" in sas_b, sas_b
    spis = _spis(plab)
    assert len(spis) == 2
    assert plab.client is not None
    assert {s.reqid for s in plab.client.list_sas()} == {conn["reqids"][0]}
    log_text = plab.log("keymgr.log", 400)
    assert "acquire: initiating" in log_text, log_text

    # an unrelated rule: a new revision, the tunnel's connection (and reqid) unchanged
    body = {"prefix": "ex1", "addresses": ["198.51.100.7"], "assigned_to": [WORKER_ID]}
    r = http.post("/v1/templates/authentication-exemption", json=body)
    assert r.status_code == 200, r.text
    policy2 = _compiled(http)
    rev2 = int(policy2["revision"])
    assert rev2 > rev1 and policy2["connections"] == policy["connections"]
    assert _push_policy_layer(plab, policy2) == reqids
    _wait(enforced(rev2), f"keymgr never reported revision {rev2}\n{plab.logs()}")
    assert _spis(plab) == spis
    ping = plab.ping()
    assert ping.returncode == 0, f"{ping.stdout}\n{plab.logs()}"
    sas_b2 = plab.list_sas_b()
    assert "ESTABLISHED" in sas_b2 and all(f"{spi:08x}" in sas_b2 for spi in spis), sas_b2
    log_text = plab.log("keymgr.log", 600)
    assert "ike deleting" not in log_text, log_text

    # keymgr restarts while policyd is down: it enforces its saved revision, and traffic
    # brings the tunnel up again without policyd
    keymgr.send_signal(signal.SIGTERM)
    assert keymgr.wait(timeout=15) == 0, plab.logs()
    plab.stop_policyd()
    _wait(lambda: not _spis(plab), f"keymgr left SAs behind\n{plab.logs()}")
    keymgr = plab.start_policy_keymgr()
    ok = False
    deadline = time.monotonic() + 20
    while not ok and time.monotonic() < deadline:
        assert keymgr.poll() is None, f"keymgr exited\n{plab.logs()}"
        ok = plab.ping().returncode == 0
    assert ok, plab.logs()
    log_text = plab.log("keymgr.log", 800)
    assert f'"msg":"saved policy loaded","revision":{rev2}' in log_text, log_text
    spis = _spis(plab)
    assert len(spis) == 2
    plab.restart_policyd()
    _wait(enforced(rev2), f"keymgr did not report {rev2} again\n{plab.logs()}", timeout=40)
    assert _spis(plab) == spis

    # the tunnel's policy goes: keymgr deletes its IKE SA
    r = http.delete("/v1/policies/gw", headers={**ADMIN, "If-Match": "*"})
    assert r.status_code == 204, r.text
    rev3 = _enforced_after(http, rev2)
    _wait(enforced(rev3), f"keymgr never reported revision {rev3}\n{plab.logs()}")
    _wait(lambda: "ESTABLISHED" not in plab.list_sas_b(), f"charon kept the IKE SA\n{plab.logs()}")
    _wait(lambda: _spis(plab) == set(), f"the worker kept SAs\n{plab.logs()}")
    log_text = plab.log("keymgr.log", 800)
    assert "reconfiguration" in log_text and plab.psk not in log_text.lower()
    assert plab.psk not in (plab.workdir / "policyd.log").read_text(errors="replace").lower()
    # keymgr never sent the worker an SPD change: the revision is still the test's
    assert plab.client.stats().spd_revision == rev2
    keymgr.send_signal(signal.SIGTERM)
    assert keymgr.wait(timeout=15) == 0, plab.logs()
    state = list((plab.workdir / "policy-state").iterdir())
    assert [p.name for p in state] == [f"policy-{WORKER_ID}.json"]
    assert os.stat(state[0]).st_mode & 0o077 == 0


def _enforced_after(http: httpx.Client, rev: int) -> int:
    r = http.get("/v1/revision")
    assert r.status_code == 200, r.text
    now = int(r.json()["revision"])
    assert now > rev
    return now
