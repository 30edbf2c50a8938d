"""keymgr driving two dataplane workers at once (one daemon shard per worker, one process)
against strongSwan 5.9.8.

Namespace A: worker-a (TUN ipsec0, outer 192.0.2.1, routes 203.0.113.1/32) and worker-b (TUN
ipsec1, outer 192.0.2.11, routes 203.0.113.2/32), each with its own fwmark, table and rule
priority. Namespace B: charon with two responder connections, one per worker's address.
keymgr gets both workers (``--dataplane`` twice) and one configuration with both connections;
it places each on the worker owning its ``local_addr``.

Asserts: charon has both IKE SAs established; each worker holds exactly the two SAs of its own
connection; ping passes through each tunnel (198.51.100.1 -> 203.0.113.1 via worker-a,
198.51.100.2 -> 203.0.113.2 via worker-b) and each worker's SAs counted it. Both workers
present the same server certificate (keymgr has one ``--server-name``). Everything is removed
also on failure.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator

import pytest

from scripts import bench_strongswan as bsw
from services.dataplane.client import DataplaneClient
from tests.netns.test_keymgr_strongswan import CLIENT, WORKER_ID, KeymgrLab, open_lab

pytestmark = pytest.mark.netns

WORKER_B = "worker-b"
OUTER_A2 = "192.0.2.11"
INNER_A2, INNER_B2 = "198.51.100.2", "203.0.113.2"


def _charon_conf(psk: str) -> str:
    conns = []
    for name, remote, lts, rts in (
        ("one", bsw.OUTER_A, bsw.INNER_B, bsw.INNER_A),
        ("two", OUTER_A2, INNER_B2, INNER_A2),
    ):
        conns.append(
            f"""    {name} {{
        version = 2
        local_addrs = {bsw.OUTER_B}
        remote_addrs = {remote}
        proposals = {bsw.IKE_PROPOSAL}
        local {{
            auth = psk
            id = {bsw.OUTER_B}
        }}
        remote {{
            auth = psk
            id = {remote}
        }}
        children {{
            {name} {{
                mode = tunnel
                local_ts = {lts}/32
                remote_ts = {rts}/32
                esp_proposals = {bsw.ESP_PROPOSAL}
                start_action = none
            }}
        }}
    }}
"""
        )
    return (
        "connections {\n"
        + "".join(conns)
        + f"""}}
secrets {{
    ike-all {{
        id-a = {bsw.OUTER_A}
        id-a2 = {OUTER_A2}
        id-b = {bsw.OUTER_B}
        secret = 0x{psk}
    }}
}}
"""
    )


class TwoWorkerLab(KeymgrLab):
    def __init__(self) -> None:
        super().__init__(prefix="kmw")
        ns_a, ns_b = self.bench.ns_a, self.bench.ns_b
        bsw._run(["ip", "-n", ns_a, "addr", "add", f"{OUTER_A2}/24", "dev", "veth0"])
        bsw._run(["ip", "-n", ns_a, "addr", "add", f"{INNER_A2}/32", "dev", "lo"])
        bsw._run(["ip", "-n", ns_b, "addr", "add", f"{INNER_B2}/32", "dev", "lo"])
        self.sock_b = self.workdir / "b.sock"
        self.client_b: DataplaneClient | None = None

    def charon_conf(self, psk: str) -> str:
        return _charon_conf(psk)

    def start_worker_b(self) -> None:
        argv = ["ip", "netns", "exec", self.bench.ns_a, sys.executable, "-m", "services.dataplane"]
        argv += ["--worker-id", WORKER_B, "--grpc-listen", f"unix:{self.sock_b}"]
        # the same server certificate as worker-a: keymgr has one --server-name for all
        argv += ["--tls-dir", str(self.pki), "--tls-cert-name", WORKER_ID]
        argv += ["--tun", "ipsec1", "--tun-mtu", "1380", "--route", f"{INNER_B2}/32"]
        argv += ["--local-address", OUTER_A2, "--fwmark", "0x1ef", "--table", "1451"]
        argv += ["--rule-priority", "1001", "--metrics-listen", ""]
        proc = self._popen(argv, "worker-b.log")
        self.client_b = DataplaneClient(
            f"unix:{self.sock_b}", self.pki, server_name=WORKER_ID, client_name=CLIENT
        )
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, f"worker-b exited\n{self.log('worker-b.log')}"
            try:
                self.client_b.list_sas()
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def logs(self) -> str:
        return f"{super().logs()}\n--- worker-b ---\n{self.log('worker-b.log')}"

    def cleanup(self) -> None:
        if self.client_b is not None:
            self.client_b.close()
        super().cleanup()


@pytest.fixture
def wlab() -> Iterator[TwoWorkerLab]:
    yield from open_lab(TwoWorkerLab)


def test_one_keymgr_two_workers(wlab: TwoWorkerLab) -> None:
    wlab.start_responder()
    wlab.start_worker()
    wlab.start_worker_b()
    psk_file = wlab.workdir / "psk"
    psk_file.write_text(f"0x{wlab.psk}\n")
    psk_file.chmod(0o600)
    conns = [
        {
            "name": "via-a",
            "local_addr": bsw.OUTER_A,
            "remote_addr": bsw.OUTER_B,
            "psk_file": str(psk_file),
            "local_ts": f"{bsw.INNER_A}/32",
            "remote_ts": f"{bsw.INNER_B}/32",
        },
        {
            "name": "via-b",
            "local_addr": OUTER_A2,
            "remote_addr": bsw.OUTER_B,
            "psk_file": str(psk_file),
            "local_ts": f"{INNER_A2}/32",
            "remote_ts": f"{INNER_B2}/32",
        },
    ]
    cfg = wlab.workdir / "keymgr.json"
    cfg.write_text(json.dumps({"connections": conns}))
    argv = [sys.executable, "-m", "services.keymgr", "--config", str(cfg)]
    argv += ["--dataplane", f"unix:{wlab.sock}", "--dataplane", f"unix:{wlab.sock_b}"]
    argv += ["--tls-dir", str(wlab.pki), "--client-name", CLIENT, "--log-level", "debug"]
    argv += ["--server-name", WORKER_ID]  # both workers present worker-a's certificate
    keymgr = wlab._popen(argv, "keymgr.log")
    assert wlab.client is not None and wlab.client_b is not None
    deadline = time.monotonic() + 25
    while time.monotonic() < deadline:
        assert keymgr.poll() is None, f"keymgr exited {keymgr.returncode}\n{wlab.logs()}"
        if len(wlab.client.list_sas()) == 2 and len(wlab.client_b.list_sas()) == 2:
            break
        time.sleep(0.3)
    sas_b = wlab.list_sas_b()
    assert sas_b.count("ESTABLISHED") == 2, f"{sas_b}\n{wlab.logs()}"
    a_sas, b_sas = wlab.client.list_sas(), wlab.client_b.list_sas()
    assert len(a_sas) == 2 and len(b_sas) == 2, wlab.logs()
    pairs = (((bsw.INNER_A, bsw.INNER_B), wlab.client), ((INNER_A2, INNER_B2), wlab.client_b))
    for inner, client in pairs:
        ping = wlab.ping(inner)
        assert ping.returncode == 0, f"{inner}: {ping.stdout}{ping.stderr}\n{wlab.logs()}"
        counts = {s.direction.name.lower(): s.packets for s in client.list_sas()}
        assert counts["outbound"] >= 3 and counts["inbound"] >= 3, counts
