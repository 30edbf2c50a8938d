"""Dataplane workers as processes: several side by side in one namespace, and their metrics.

1. Two workers in one network namespace of this test's own, each with its own TUN, outer
   address, fwmark, routing table and ``not fwmark`` rule priority (docs: wg-quick style policy
   routing, services.dataplane.tun). Both answer GetStats with their own identity; SIGTERM to
   one removes exactly its TUN, rules and routes and leaves the other worker, with its SAs,
   untouched.
2. The Prometheus endpoint of a lab worker (services.dataplane.metrics) after a ping through
   an ESP tunnel: worker-level packet counters moved, every installed SA has per-SA packet
   counters labelled with its SPI, the drops-by-reason family is exported, and the scraped
   text carries no key material.

All addresses are documentation ranges (RFC 5737); traffic stays inside namespaces the tests
create, and everything they create is removed afterwards, also when they fail.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.core.iana import Encr, IpProto
from services.core.sa import SaConfig
from services.dataplane.client import DataplaneClient, sa_config
from services.dataplane.convert import addr_text
from services.dataplane.lab import METRICS_PORT, REPO_ROOT, Lab, Node, SaProfile, make_sa_set
from services.dataplane.lab import netns_supported as lab_netns_supported

pytestmark = pytest.mark.netns

PREFIX = "ipsec_dataplane"
START_TIMEOUT = 30.0
PING_COUNT = 3

# Fetch /metrics from inside a namespace; argv[1] is the port. Writes the body unchanged.
SCRAPE = (
    "import sys, urllib.request\n"
    "url = 'http://127.0.0.1:%s/metrics' % sys.argv[1]\n"
    "sys.stdout.write(urllib.request.urlopen(url, timeout=10).read().decode())\n"
)


# --- helpers shared by both tests ---------------------------------------------------------------


Families = dict[str, Any]  # metric family name -> prometheus_client Metric


def parse_metrics(text: str) -> Families:
    return {f.name: f for f in text_string_to_metric_families(text)}


def metric_values(fams: Families, name: str, **labels: str) -> list[float]:
    """Values of the samples of family ``name`` (counter samples end in ``_total``) whose
    labels include ``labels``."""
    fam = fams.get(name)
    assert fam is not None, f"metric family {name} missing; have {sorted(fams)}"
    return [
        s.value
        for s in fam.samples
        if s.name in (name, f"{name}_total") and labels.items() <= s.labels.items()
    ]


def metric_value(fams: Families, name: str, **labels: str) -> float:
    values = metric_values(fams, name, **labels)
    assert len(values) == 1, f"{name}{labels}: expected one sample, got {values}"
    return values[0]


def key_forms(configs: Sequence[SaConfig]) -> list[bytes]:
    """Every key of ``configs`` raw, as hex (both cases) and base64."""
    keys = [k for c in configs for k in (c.encr_key, c.integ_key) if k]
    assert keys, "no keys to look for (the check would be vacuous)"
    return [
        form
        for k in keys
        for form in (k, k.hex().encode(), k.hex().upper().encode(), base64.b64encode(k))
    ]


def scrape(exec_prefix: Sequence[str], port: int, *, timeout: float = 10.0) -> str:
    """GET /metrics on 127.0.0.1:``port`` from inside a namespace, retrying until the
    endpoint answers (the worker starts it last)."""
    deadline = time.monotonic() + timeout
    while True:
        res = subprocess.run(
            [*exec_prefix, sys.executable, "-c", SCRAPE, str(port)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if res.returncode == 0:
            return res.stdout
        if time.monotonic() > deadline:
            raise AssertionError(f"scraping port {port} failed: {res.stderr.strip()[-500:]}")
        time.sleep(0.2)


# --- 1. two workers side by side in one namespace -----------------------------------------------


@dataclass(frozen=True)
class WorkerSpec:
    worker_id: str
    tun: str
    tun_address: str
    route: str
    local: str
    fwmark: int
    table: int
    priority: int
    metrics_port: int


W1 = WorkerSpec(
    "w1", "ipsw1", "192.0.2.101/32", "198.51.100.0/24", "192.0.2.1", 0x11, 111, 1011, 9201
)
W2 = WorkerSpec(
    "w2", "ipsw2", "192.0.2.111/32", "203.0.113.0/24", "192.0.2.11", 0x12, 112, 1012, 9202
)


@dataclass
class RunningWorker:
    spec: WorkerSpec
    proc: subprocess.Popen[bytes]
    client: DataplaneClient
    log_path: Path

    def log(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class OwnNamespace:
    """A namespace and temporary directory of this test's own, and the workers started in it.
    :meth:`close` removes all of it and is safe after a partial setup."""

    name: str
    workdir: Path
    workers: dict[str, RunningWorker] = field(default_factory=dict)

    @property
    def pki(self) -> Path:
        return self.workdir / "pki"

    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(
            ["ip", "-n", self.name, *args], capture_output=True, text=True, timeout=30, check=False
        )
        if check and res.returncode != 0:
            raise AssertionError(f"ip -n {self.name} {' '.join(args)}: {res.stderr.strip()}")
        return res

    def create(self) -> None:
        subprocess.run(["ip", "netns", "add", self.name], check=True, timeout=30)
        self.ip("link", "set", "lo", "up")
        for spec in (W1, W2):
            self.ip("addr", "add", f"{spec.local}/32", "dev", "lo")
        devpki = [sys.executable, "-m", "services.runtime.devpki", str(self.pki)]
        res = subprocess.run(
            [*devpki, "--names", "w1,w2,client"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO_ROOT,
            check=False,
        )
        assert res.returncode == 0, f"devpki failed: {res.stderr}"

    def start(self, spec: WorkerSpec) -> RunningWorker:
        sock = self.workdir / f"{spec.worker_id}.sock"
        argv = [
            *self.exec_prefix(),
            sys.executable,
            "-m",
            "services.dataplane",
            "--worker-id",
            spec.worker_id,
            "--grpc-listen",
            f"unix:{sock}",
            "--tls-dir",
            str(self.pki),
            "--tls-cert-name",
            spec.worker_id,
            "--tun",
            spec.tun,
            "--tun-address",
            spec.tun_address,
            "--route",
            spec.route,
            "--local-address",
            spec.local,
            "--fwmark",
            hex(spec.fwmark),
            "--table",
            str(spec.table),
            "--rule-priority",
            str(spec.priority),
            "--metrics-listen",
            f"127.0.0.1:{spec.metrics_port}",
        ]
        log_path = self.workdir / f"{spec.worker_id}.log"
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=REPO_ROOT,
                start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        client = DataplaneClient(
            f"unix:{sock}", self.pki, server_name=spec.worker_id, client_name="client"
        )
        worker = RunningWorker(spec, proc, client, log_path)
        self.workers[spec.worker_id] = worker
        deadline = time.monotonic() + START_TIMEOUT
        last: Exception | None = None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(
                    f"{spec.worker_id} exited with {proc.returncode}:\n{worker.log()}"
                )
            if sock.exists():
                try:
                    client.wait_ready(timeout=2)
                    client.stats()
                    return worker
                except (grpc.FutureTimeoutError, grpc.RpcError) as e:
                    last = e
            time.sleep(0.1)
        raise AssertionError(f"{spec.worker_id} not ready ({last!r}):\n{worker.log()}")

    def stop(self, worker_id: str, *, timeout: float = 10.0) -> int:
        """SIGTERM one worker and wait for it; SIGKILL if it hangs."""
        w = self.workers[worker_id]
        w.client.close()
        if w.proc.poll() is None:
            w.proc.send_signal(signal.SIGTERM)
            try:
                w.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait(timeout=5)
        return w.proc.returncode

    def close(self) -> None:
        for worker_id in list(self.workers):
            with contextlib.suppress(Exception):
                self.stop(worker_id, timeout=5)
        # anything else still inside this namespace was started by this test
        res = subprocess.run(
            ["ip", "netns", "pids", self.name], capture_output=True, text=True, check=False
        )
        for pid in res.stdout.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, check=False)
        shutil.rmtree(self.workdir, ignore_errors=True)


@pytest.fixture
def own_ns() -> Iterator[OwnNamespace]:
    ok, why = lab_netns_supported()
    if not ok:
        pytest.skip(f"netns tests skipped: {why}")
    name = f"ipsw-{secrets.token_hex(4)}"
    ns = OwnNamespace(name, Path(tempfile.mkdtemp(prefix=f"{name}-")))
    try:
        ns.create()
        yield ns
    finally:
        ns.close()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    assert name not in listed.stdout, f"namespace {name} left behind"
    assert not ns.workdir.exists(), f"{ns.workdir} left behind"


def rules(ns: OwnNamespace, family: str) -> list[dict[str, Any]]:
    res = ns.ip("-j", family, "rule", "show")
    return list(json.loads(res.stdout or "[]"))


def worker_rules(ns: OwnNamespace, family: str, spec: WorkerSpec) -> list[dict[str, Any]]:
    """The ``not fwmark <mark> lookup <table>`` rules of ``spec`` at its priority."""
    return [
        r
        for r in rules(ns, family)
        if r.get("priority") == spec.priority
        and "not" in r
        and int(str(r.get("fwmark", "0")), 0) == spec.fwmark
        and str(r.get("table")) == str(spec.table)
    ]


def table_routes(ns: OwnNamespace, table: int) -> list[dict[str, Any]]:
    res = ns.ip("-j", "-4", "route", "show", "table", str(table), check=False)
    if res.returncode != 0:  # some iproute2 versions: "FIB table does not exist"
        return []
    return list(json.loads(res.stdout or "[]"))


def link_exists(ns: OwnNamespace, name: str) -> bool:
    return ns.ip("link", "show", "dev", name, check=False).returncode == 0


def single_sa(spec: WorkerSpec) -> SaConfig:
    """An inbound ESP tunnel SA towards ``spec``'s own outer address, freshly keyed."""
    return sa_config(
        spi=0x1000 + secrets.randbelow(0xFFFF0000),
        protocol="esp",
        direction="inbound",
        mode="tunnel",
        src="192.0.2.200",
        dst=spec.local,
        encr_id=Encr.AES_GCM_16,
        encr_key=secrets.token_bytes(36),
        reqid=spec.table,
    )


def assert_owns_its_interfaces(ns: OwnNamespace, spec: WorkerSpec) -> None:
    assert link_exists(ns, spec.tun), f"TUN {spec.tun} missing:\n{ns.ip('link').stdout}"
    assert worker_rules(ns, "-4", spec), f"rule of {spec.worker_id} missing: {rules(ns, '-4')}"
    routes = table_routes(ns, spec.table)
    assert [(r["dst"], r.get("dev"), r.get("prefsrc")) for r in routes] == [
        (spec.route, spec.tun, spec.local)
    ], f"table {spec.table}: {routes}"


def test_two_workers_side_by_side_in_one_namespace(own_ns: OwnNamespace) -> None:
    ns = own_ns
    w1, w2 = ns.start(W1), ns.start(W2)

    # each answers with its own identity and addresses, and holds only its own SA
    sas = {W1.worker_id: single_sa(W1), W2.worker_id: single_sa(W2)}
    for w in (w1, w2):
        st = w.client.stats()
        assert st.worker_id == w.spec.worker_id
        assert st.local_addresses == (w.spec.local,)
        assert st.interfaces == (w.spec.tun,)
        w.client.install_sa(sas[w.spec.worker_id])
    for w in (w1, w2):
        cfg = sas[w.spec.worker_id]
        assert [(s.spi, s.direction) for s in w.client.list_sas()] == [(cfg.spi, cfg.direction)]
        assert w.client.stats().sa_count == 1
        fams = parse_metrics(scrape(ns.exec_prefix(), w.spec.metrics_port))
        assert metric_value(fams, f"{PREFIX}_sas", worker=w.spec.worker_id) == 1
        assert metric_values(fams, f"{PREFIX}_sa_packets", spi=f"0x{cfg.spi:08x}") == [0]

    # each has its own TUN, rule and routing table
    links = ns.ip("link").stdout
    assert f"{W1.tun}:" in links and f"{W2.tun}:" in links, links
    rule_text = ns.ip("rule").stdout
    for spec in (W1, W2):
        assert f"{spec.priority}:\tnot from all fwmark {hex(spec.fwmark)} lookup {spec.table}" in (
            rule_text
        ), rule_text
        assert_owns_its_interfaces(ns, spec)
    w2_v6_rules = worker_rules(ns, "-6", W2)  # present when the namespace has IPv6

    # SIGTERM w1: a clean exit that removes exactly its TUN, rules and routes
    assert ns.stop(W1.worker_id) == 0, w1.log()
    assert "cleanup step failed" not in w1.log_path.read_text(), w1.log()
    assert not link_exists(ns, W1.tun), ns.ip("link").stdout
    assert not worker_rules(ns, "-4", W1), rules(ns, "-4")
    assert not worker_rules(ns, "-6", W1), rules(ns, "-6")
    assert not [r for r in rules(ns, "-4") if r.get("priority") == W1.priority]
    assert table_routes(ns, W1.table) == []

    # w2 is intact: interfaces, rules, routes, API, SA and metrics
    assert w2.proc.poll() is None, w2.log()
    assert_owns_its_interfaces(ns, W2)
    assert worker_rules(ns, "-6", W2) == w2_v6_rules
    st = w2.client.stats()
    assert (st.worker_id, st.sa_count, st.interfaces) == (W2.worker_id, 1, (W2.tun,))
    cfg = sas[W2.worker_id]
    assert [(s.spi, s.direction) for s in w2.client.list_sas()] == [(cfg.spi, cfg.direction)]
    fams = parse_metrics(scrape(ns.exec_prefix(), W2.metrics_port))
    assert metric_value(fams, f"{PREFIX}_sas", worker=W2.worker_id) == 1
    gone = subprocess.run(
        [*ns.exec_prefix(), sys.executable, "-c", SCRAPE, str(W1.metrics_port)],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert gone.returncode != 0, "w1's metrics endpoint still answers after SIGTERM"


# --- 2. the metrics endpoint of a lab worker ----------------------------------------------------


def test_each_worker_receives_only_esp_for_its_own_addresses(own_ns: OwnNamespace) -> None:
    """Raw ESP receive sockets are bound per local address: ESP to w2 is not seen by w1, and a
    freshly started worker has counted no drops at all (no IPv6 chatter from its TUN)."""
    w1, w2 = own_ns.start(W1), own_ns.start(W2)
    cfg = single_sa(W2)
    w2.client.install_sa(cfg)
    assert dict(w1.client.stats().drops) == {} and dict(w2.client.stats().drops) == {}
    bogus = struct.pack("!II", cfg.spi, 1) + bytes(48)  # right SPI, fails the ICV
    send = (
        "import socket,sys; s=socket.socket(socket.AF_INET,socket.SOCK_RAW,50); "
        "s.sendto(bytes.fromhex(sys.argv[1]),(sys.argv[2],0))"
    )
    subprocess.run(
        [*own_ns.exec_prefix(), sys.executable, "-c", send, bogus.hex(), "192.0.2.11"],
        check=True,
        timeout=10,
    )
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not dict(w2.client.stats().drops):
        time.sleep(0.05)
    assert dict(w2.client.stats().drops) == {"auth_failed": 1}
    assert dict(w1.client.stats().drops) == {}


def scrape_node(node: Node) -> str:
    return scrape(node.exec_argv(), METRICS_PORT)


def test_metrics_endpoint_reports_per_sa_and_drop_counters(netns_lab: Lab) -> None:
    sa_set = make_sa_set(SaProfile())
    netns_lab.install(sa_set)
    a, _b = netns_lab.nodes
    texts = {n.label: scrape_node(n) for n in netns_lab.nodes}
    before = {label: parse_metrics(t) for label, t in texts.items()}

    ping = netns_lab.ping(a, "203.0.113.1", src="198.51.100.1", count=PING_COUNT)
    assert ping.ok, f"{ping.output}\n{netns_lab.diagnostics()}"

    for node in netns_lab.nodes:
        w = node.worker_id
        grpc_drops = node.dp().stats().drops
        text = scrape_node(node)
        texts[f"{node.label}-after"] = text
        fams = parse_metrics(text)

        # worker-level counters moved by at least the ping, in both directions
        for short in ("rx_packets", "tx_packets", "tun_rx_packets", "tun_tx_packets"):
            name = f"{PREFIX}_{short}"
            assert fams[name].type == "counter"
            delta = metric_value(fams, name, worker=w) - metric_value(
                before[node.label], name, worker=w
            )
            assert delta >= PING_COUNT, f"{w}: {name} grew by {delta}"
        for name in ("wire_rx_packets", "wire_tx_packets"):
            assert metric_value(fams, f"{PREFIX}_{name}", worker=w) >= PING_COUNT

        # one per-SA packets/bytes sample per installed SA, keyed by SPI, all carried the ping
        for cfg in sa_set.for_side(node.label):
            labels = {
                "worker": w,
                "spi": f"0x{cfg.spi:08x}",
                "direction": cfg.direction.name.lower(),
                "protocol": "esp",
                "dst": addr_text(cfg.dst),
            }
            assert cfg.protocol == IpProto.ESP
            packets = metric_value(fams, f"{PREFIX}_sa_packets", **labels)
            assert packets >= PING_COUNT, f"{w}: {cfg.describe()} counted {packets} packets"
            assert metric_value(fams, f"{PREFIX}_sa_bytes", **labels) > 0
            for kind in ("replay", "auth"):
                assert metric_value(fams, f"{PREFIX}_sa_drops", **labels, kind=kind) == 0
        spis = {s.labels["spi"] for s in fams[f"{PREFIX}_sa_packets"].samples}
        assert spis >= {f"0x{c.spi:08x}" for c in sa_set.for_side(node.label)}
        assert metric_value(fams, f"{PREFIX}_sas", worker=w) == len(sa_set.for_side(node.label))

        # drops by reason: the family is there (possibly without samples when nothing was
        # dropped), labelled by worker and reason, and agrees with GetStats read just before
        drops = fams.get(f"{PREFIX}_drops")
        assert drops is not None and drops.type == "counter", sorted(fams)
        assert all(set(s.labels) == {"worker", "reason"} for s in drops.samples)
        for reason, n in grpc_drops.items():
            assert metric_value(fams, f"{PREFIX}_drops", worker=w, reason=reason) >= n

    # no key material in any scraped text, in any encoding
    forms = key_forms(sa_set.all_sas())
    for label, text in texts.items():
        body = text.encode()
        for form in forms:
            assert form not in body, f"key material in the /metrics text ({label})"
