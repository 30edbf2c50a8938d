"""``make demo``: policy applied over REST, enforced end to end between two sites.

Topology (network namespaces; every name carries a random tag, everything is removed at the
end, also on failure or Ctrl-C)::

    host a1 10.1.1.10 -- gw a1 (worker a1, 192.0.2.1) ---.
                                                          >-- gw b (strongSwan 5.9.8) -- host b
    host a2 10.1.2.10 -- gw a2 (worker a2, 192.0.2.5) ---'    192.0.2.2 / 192.0.2.6      10.2.0.10
                                                                                          10.2.0.53

Site A is ours: policyd (SQLite, REST on loopback, watch stream on a unix socket), one keymgr
driving both dataplane workers (one per gateway namespace, each its own node), all over mTLS.
keymgr needs no network: it reaches the workers over their unix sockets. Site B is charon
(kernel-libipsec) with one tunnel per site-A gateway.

The policy document (:data:`POLICY`, applied with ``POST /v1/apply``) says, for each site-A
subnet to site B's LAN: negotiate ESP (AES-GCM-256) in a tunnel to site B's gateway,
except TCP port 23, which is blocked, and host 10.2.0.53, which is exempt (permit, in clear).
Nothing is configured on keymgr or the workers beyond where policyd is.

The demo then shows: the tunnels are negotiated on first traffic (the worker's ACQUIRE),
ping and a SHA-256-checked TCP stream cross them, the blocked flow crosses nothing, the
exempt flow crosses in clear, a clear packet from site B that should have been protected is
dropped by the gateway ("require security"), and a status table (the revision each component
enforces, the SAs, the worker counters). Exit status 0 when every check held.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scripts import bench_strongswan as bsw
from services.dataplane.client import DataplaneClient
from services.dataplane.convert import WorkerStats
from services.dataplane.demo import _table
from services.dataplane.lab import ns_tcp_sha256
from services.runtime import devpki

REPO = Path(__file__).resolve().parents[1]
TOKEN_NAME = "demo-admin"  # noqa: S105 - a name, not a secret
PSK_REF = "site-b"
B_LAN, B_HOST, B_EXEMPT = "10.2.0.0/24", "10.2.0.10", "10.2.0.53"


@dataclass(frozen=True)
class Gateway:
    """One site-A gateway: its worker's node name, WAN address, site B's address facing it
    and the LAN behind it."""

    name: str
    wan: str
    peer: str
    lan_gw: str
    host: str
    lan: str


GATEWAYS = (
    Gateway("a1", "192.0.2.1", "192.0.2.2", "10.1.1.1", "10.1.1.10", "10.1.1.0/24"),
    Gateway("a2", "192.0.2.5", "192.0.2.6", "10.1.2.1", "10.1.2.10", "10.1.2.0/24"),
)


def policy_document() -> dict[str, Any]:
    """The policy the demo applies: one shared policy (block telnet, exempt one host) for both
    gateways and one tunnel policy per gateway."""
    both = [g.lan for g in GATEWAYS]
    return {
        "filter_lists": [
            {
                "name": "telnet-to-b",
                "description": "telnet from site A to site B",
                "filters": [
                    {"source": s, "destination": B_LAN, "protocol": "tcp", "destination_port": 23}
                    for s in both
                ],
            },
            {
                "name": "exempt-host-b",
                "description": "site B's resolver, reached in clear",
                "filters": [{"source": s, "destination": B_EXEMPT} for s in both],
            },
            *(
                {
                    "name": f"{g.name}-to-b",
                    "description": f"site A subnet {g.lan} to site B",
                    "filters": [{"source": g.lan, "destination": B_LAN}],
                }
                for g in GATEWAYS
            ),
        ],
        "filter_actions": [
            {"name": "permit", "action": "permit"},
            {"name": "block", "action": "block"},
            {
                "name": "require-esp",
                "action": "negotiate",
                "security_methods": [
                    {"protocol": "esp", "esp": "aes256gcm16", "lifetime_seconds": 3600}
                ],
            },
        ],
        "policies": [
            {
                "name": "site-a-common",
                "description": "what every site-A gateway enforces",
                "assigned_to": [g.name for g in GATEWAYS],
                "rules": [
                    {
                        "name": "block-telnet",
                        "filter_list": "telnet-to-b",
                        "filter_action": "block",
                    },
                    {
                        "name": "exempt-resolver",
                        "filter_list": "exempt-host-b",
                        "filter_action": "permit",
                    },
                ],
            },
            *(
                {
                    "name": f"{g.name}-vpn",
                    "description": f"gateway {g.name}: tunnel to site B",
                    "assigned_to": [g.name],
                    "main_mode": {"proposals": [bsw.IKE_PROPOSAL], "lifetime_minutes": 60},
                    "rules": [
                        {
                            "name": "to-site-b",
                            "filter_list": f"{g.name}-to-b",
                            "filter_action": "require-esp",
                            "auth_methods": [{"method": "psk", "psk_ref": PSK_REF}],
                            "tunnel_endpoint": g.peer,
                        }
                    ],
                }
                for g in GATEWAYS
            ),
        ],
    }


def swanctl_conf(psk: str) -> str:
    """Site B's charon: one tunnel per site-A gateway, responder only."""
    conns = []
    for g in GATEWAYS:
        conns.append(
            f"""    {g.name} {{
        version = 2
        local_addrs = {g.peer}
        remote_addrs = {g.wan}
        proposals = {bsw.IKE_PROPOSAL}
        local {{
            auth = psk
            id = {g.peer}
        }}
        remote {{
            auth = psk
            id = {g.wan}
        }}
        children {{
            {g.name} {{
                mode = tunnel
                local_ts = {B_LAN}
                remote_ts = {g.lan}
                esp_proposals = {bsw.ESP_PROPOSAL}
                start_action = none
            }}
        }}
    }}
"""
        )
    secrets_ = "".join(
        f"""    ike-{g.name} {{
        id-a = {g.wan}
        id-b = {g.peer}
        secret = "{psk}"
    }}
"""
        for g in GATEWAYS
    )
    return "connections {\n" + "".join(conns) + "}\nsecrets {\n" + secrets_ + "}\n"


class DemoError(RuntimeError):
    """A step failed; the message says which and why."""


def _say(msg: str = "") -> None:
    print(msg, flush=True)


def _env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH", "")
    return {
        **os.environ,
        "PYTHONPATH": f"{REPO}{os.pathsep}{path}" if path else str(REPO),
        "PYTHONUNBUFFERED": "1",
    }


def _run(argv: Sequence[str], *, check: bool = True, timeout: float = 30.0) -> str:
    try:
        res = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, check=False, env=_env()
        )
    except subprocess.TimeoutExpired as e:
        raise DemoError(f"timed out after {timeout:.0f} s: {shlex.join(argv)}") from e
    if check and res.returncode != 0:
        raise DemoError(f"failed ({res.returncode}): {shlex.join(argv)}: {res.stderr.strip()}")
    return res.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait(what: str, cond: Callable[[], bool], timeout: float, *, step: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(step)
    raise DemoError(f"{what}: not within {timeout:.0f} s")


@dataclass
class Demo:
    """Everything one run creates, so that :meth:`cleanup` removes exactly that."""

    workdir: Path
    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    namespaces: list[str] = field(default_factory=list)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    psk: str = field(default_factory=lambda: secrets.token_hex(24))
    rest_port: int = field(default_factory=_free_port)

    # -- names -------------------------------------------------------------------------------

    def ns(self, name: str) -> str:
        return f"ipdemo{self.tag}-{name}"

    @property
    def pki(self) -> Path:
        return self.workdir / "pki"

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.rest_port}"

    def sock(self, name: str) -> Path:
        return self.workdir / f"{name}.sock"

    # -- topology ----------------------------------------------------------------------------

    def _ip(self, ns: str, *args: str) -> None:
        _run(["ip", "-n", self.ns(ns), *args])

    def _link(self, a: str, a_if: str, b: str, b_if: str) -> None:
        _run(
            [
                "ip",
                "-n",
                self.ns(a),
                "link",
                "add",
                a_if,
                "type",
                "veth",
                "peer",
                "name",
                b_if,
                "netns",
                self.ns(b),
            ]
        )
        self._ip(a, "link", "set", a_if, "up")
        self._ip(b, "link", "set", b_if, "up")

    def build(self) -> None:
        names = ["b", "hb"] + [n for g in GATEWAYS for n in (g.name, f"h{g.name}")]
        for n in names:
            _run(["ip", "netns", "add", self.ns(n)])
            self.namespaces.append(self.ns(n))
            self._ip(n, "link", "set", "lo", "up")
        for n in ["b", *(g.name for g in GATEWAYS)]:
            _run(["ip", "netns", "exec", self.ns(n), "sysctl", "-qw", "net.ipv4.ip_forward=1"])
        # site B: gateway with one WAN link per site-A gateway, LAN with host b (two addresses)
        self._link("b", "lan0", "hb", "eth0")
        self._ip("b", "addr", "add", "10.2.0.1/24", "dev", "lan0")
        self._ip("hb", "addr", "add", f"{B_HOST}/24", "dev", "eth0")
        self._ip("hb", "addr", "add", f"{B_EXEMPT}/24", "dev", "eth0")
        self._ip("hb", "route", "add", "default", "via", "10.2.0.1")
        for i, g in enumerate(GATEWAYS):
            self._link(g.name, "wan0", "b", f"wan{i}")
            self._ip(g.name, "addr", "add", f"{g.wan}/30", "dev", "wan0")
            self._ip("b", "addr", "add", f"{g.peer}/30", "dev", f"wan{i}")
            self._link(g.name, "lan0", f"h{g.name}", "eth0")
            self._ip(g.name, "addr", "add", f"{g.lan_gw}/24", "dev", "lan0")
            self._ip(f"h{g.name}", "addr", "add", f"{g.host}/24", "dev", "eth0")
            self._ip(f"h{g.name}", "route", "add", "default", "via", g.lan_gw)
            # clear traffic (the exemption) leaves through the main table
            self._ip(g.name, "route", "add", B_LAN, "via", g.peer)
            self._ip("b", "route", "add", g.lan, "via", g.wan)
        # Site B: what charon tunnels is routed by its own table 220 (priority 220); the exempt
        # host's answers and the gateway's own LAN address use the main table: clear.
        for src in (B_EXEMPT, "10.2.0.1"):
            self._ip("b", "rule", "add", "priority", "100", "from", src, "lookup", "main")
        for g in GATEWAYS:
            _wait(
                f"link {g.name} - b",
                lambda g=g: (
                    subprocess.run(  # type: ignore[misc]
                        ["ip", "netns", "exec", self.ns(g.name), "ping", "-c1", "-W1", g.peer],
                        capture_output=True,
                        check=False,
                    ).returncode
                    == 0
                ),
                10,
            )

    # -- daemons -----------------------------------------------------------------------------

    def _popen(self, name: str, argv: Sequence[str], ns: str | None = None) -> None:
        cmd = list(argv) if ns is None else ["ip", "netns", "exec", self.ns(ns), *argv]
        with (self.workdir / f"{name}.log").open("ab") as log:
            self.procs[name] = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env=_env(),
                start_new_session=True,
            )

    def log_tail(self, name: str, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            text = (self.workdir / f"{name}.log").read_text(errors="replace").splitlines()
            return "\n".join("    " + t for t in text[-lines:])
        return ""

    def _exited(self, name: str) -> bool:
        """False while ``name`` runs; raises (with its log) once it has exited."""
        proc = self.procs[name]
        if proc.poll() is not None:
            raise DemoError(f"{name} exited with {proc.returncode}:\n{self.log_tail(name)}")
        return False

    def start_policyd(self) -> None:
        tokens = self.workdir / "tokens.json"
        tokens.write_text(
            json.dumps({"tokens": [{"name": TOKEN_NAME, "role": "admin", "token": self.token}]})
        )
        tokens.chmod(0o600)
        self._popen(
            "policyd",
            [
                sys.executable,
                "-m",
                "services.policyd",
                "--database-url",
                f"sqlite:///{self.workdir / 'policyd.db'}",
                "--tokens-file",
                str(tokens),
                "--listen",
                f"127.0.0.1:{self.rest_port}",
                "--grpc-listen",
                f"unix:{self.sock('policyd')}",
                "--tls-dir",
                str(self.pki),
                "--tls-cert-name",
                "policyd",
                "--secrets-dir",
                str(self.workdir / "secrets"),
                "--revision-poll",
                "0.5",
                "--log-level",
                "warning",
            ],
        )

        def up() -> bool:
            self._exited("policyd")
            try:
                with urllib.request.urlopen(f"{self.base}/healthz", timeout=1) as r:  # noqa: S310
                    return bool(r.status == 200)
            except OSError:
                return False

        _wait("policyd /healthz", up, 30)

    def start_worker(self, node: str, wan: str, routes: Sequence[str] = (B_LAN,)) -> None:
        """Start node ``node``'s worker in the namespace of the same name; it follows its
        node's policy from policyd (state file under the working directory)."""
        state = self.workdir / node
        state.mkdir(exist_ok=True)
        argv = [
            sys.executable, "-m", "services.dataplane",
            "--worker-id", node,
            "--grpc-listen", f"unix:{self.sock(node)}",
            "--tls-dir", str(self.pki), "--tls-cert-name", "dataplane",
            "--tun", "ipsec0",
            "--local-address", wan,
            "--policyd", f"unix:{self.sock('policyd')}",
            "--node", node,
            "--policy-state", str(state / "policy.json"),
            "--log-level", "info",
        ]  # fmt: skip
        for r in routes:
            argv += ["--route", r]
        self._popen(f"worker-{node}", argv, ns=node)
        _wait(
            f"worker {node} socket",
            lambda: self._exited(f"worker-{node}") or self.sock(node).exists(),
            30,
        )

    def start_keymgr(self, nodes: Sequence[str]) -> None:
        argv = [
            sys.executable, "-m", "services.keymgr",
            "--policyd", f"unix:{self.sock('policyd')}",
            "--tls-dir", str(self.pki),
            "--server-name", "dataplane", "--client-name", "keymgr",
            "--state-dir", str(self.workdir / "keymgr"),
            "--policy-state-dir", str(self.workdir / "keymgr"),
            "--api-listen", f"unix:{self.sock('keymgr')}",
            "--log-level", "info",
        ]  # fmt: skip
        for n in nodes:
            argv += ["--dataplane", f"{n}=unix:{self.sock(n)}"]
        self._popen("keymgr", argv)
        _wait(
            "keymgr API socket", lambda: self._exited("keymgr") or self.sock("keymgr").exists(), 30
        )

    def stats(self, node: str) -> WorkerStats:
        with DataplaneClient(
            f"unix:{self.sock(node)}", self.pki, server_name="dataplane", client_name="keymgr"
        ) as c:
            return c.stats()

    def enforced(self) -> dict[tuple[str, str], tuple[int, str]]:
        """(node, component) -> (revision it reports enforcing, when it reported)."""
        items = self.rest("GET", "/v1/enforced")["enforced"]
        return {(i["node"], i["component"]): (int(i["revision"]), i["reported_at"]) for i in items}

    def start_strongswan(self) -> None:
        d = self.workdir / "charon"
        (d / "swanctl").mkdir(parents=True)
        (d / "strongswan.conf").write_text(bsw._strongswan_conf(self.workdir, "b"))
        conf = d / "swanctl" / "swanctl.conf"
        conf.write_text(swanctl_conf(self.psk))
        conf.chmod(0o600)
        inner = (
            f"mount -t tmpfs tmpfs /run && "
            f"mount --bind {shlex.quote(str(d / 'swanctl'))} /etc/swanctl && exec {bsw.CHARON}"
        )
        self._popen(
            "charon",
            [
                "env",
                f"STRONGSWAN_CONF={d / 'strongswan.conf'}",
                "unshare",
                "-m",
                "--propagation",
                "private",
                "sh",
                "-c",
                inner,
            ],
            ns="b",
        )
        vici = self.workdir / "charon-b.vici"

        def ready() -> bool:
            self._exited("charon")
            if not vici.exists():
                return False
            res = subprocess.run(
                ["swanctl", "--stats", "--uri", f"unix://{vici}"],
                capture_output=True,
                check=False,
                timeout=5,
            )
            return res.returncode == 0

        _wait("charon vici", ready, 20)
        self.swanctl("--load-all", "--file", str(conf))

    def swanctl(self, *args: str) -> str:
        return _run(["swanctl", *args, "--uri", f"unix://{self.workdir / 'charon-b.vici'}"])

    # -- REST and ipsecctl ---------------------------------------------------------------------

    def rest(self, method: str, path: str, body: Any = None, *, if_match: str = "") -> Any:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}
        if if_match:
            headers["If-Match"] = if_match
        req = urllib.request.Request(  # noqa: S310 - loopback URL built here
            self.base + path, data=data, method=method, headers=headers
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as r:  # noqa: S310
                return json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            raise DemoError(f"{method} {path}: {e.code} {e.read()[:500]!r}") from None

    def ipsecctl(self, *args: str) -> str:
        env = {
            "IPSECCTL_POLICYD_URL": self.base,
            "IPSECCTL_TOKEN": self.token,
            "IPSECCTL_KEYMGR_API": f"unix:{self.sock('keymgr')}",
            "IPSECCTL_TLS_DIR": str(self.pki),
            "IPSECCTL_SERVER_NAME": "keymgr",
            "IPSECCTL_CLIENT_NAME": "admin",
        }
        res = subprocess.run(
            [sys.executable, "-m", "services.ctl", *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            env={**_env(), **env},
            cwd=REPO,
        )
        if res.returncode != 0:
            raise DemoError(f"ipsecctl {' '.join(args)}: {res.returncode} {res.stderr.strip()}")
        return res.stdout

    # -- traffic -----------------------------------------------------------------------------

    def ping(self, ns: str, dst: str, *, count: int = 3, src: str | None = None) -> int:
        argv = [
            "ip",
            "netns",
            "exec",
            self.ns(ns),
            "ping",
            "-n",
            "-q",
            "-c",
            str(count),
            "-i",
            "0.2",
            "-W",
            "1",
        ]
        if src:
            argv += ["-I", src]
        out = _run([*argv, dst], check=False, timeout=count * 2 + 10)
        for line in out.splitlines():
            if "received" in line:
                return int(line.split(",")[1].split()[0])
        return 0

    def tcp_attempt(self, ns: str, dst: str, port: int) -> bool:
        """Whether a TCP connection to ``dst:port`` got any answer (SYN-ACK or RST) in 2 s."""
        code = (
            "import socket,sys\n"
            "s=socket.socket(); s.settimeout(2)\n"
            "try:\n s.connect((sys.argv[1], int(sys.argv[2]))); print('open')\n"
            "except ConnectionRefusedError: print('refused')\n"
            "except OSError: print('silent')\n"
        )
        out = _run(
            ["ip", "netns", "exec", self.ns(ns), sys.executable, "-c", code, dst, str(port)],
            timeout=15,
        )
        return out.strip() != "silent"

    @contextlib.contextmanager
    def capture(self, ns: str, iface: str, name: str) -> Iterator[Path]:
        path = self.workdir / f"{name}.pcap"
        proc = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                self.ns(ns),
                "tcpdump",
                "-i",
                iface,
                "-U",
                "-n",
                "--immediate-mode",
                "-w",
                str(path),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            assert proc.stderr is not None
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and b"listening" not in proc.stderr.readline():
                pass
            yield path
        finally:
            time.sleep(0.5)
            proc.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def packets(self, pcap: Path, display_filter: str) -> int:
        out = _run(
            [
                "tshark",
                "-r",
                str(pcap),
                "-n",
                "-Y",
                display_filter,
                "-T",
                "fields",
                "-e",
                "frame.number",
            ],
            check=False,
            timeout=60,
        )
        return len([x for x in out.splitlines() if x.strip()])

    # -- teardown ----------------------------------------------------------------------------

    def cleanup(self) -> None:
        # keymgr first (it deletes its SAs through the workers), policyd last
        order = sorted(self.procs, key=lambda n: (n != "keymgr", n == "policyd", n))
        for name in order:
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=8)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for ns in reversed(self.namespaces):
            _run(["ip", "netns", "del", ns], check=False)
        self.namespaces.clear()


def _missing() -> list[str]:
    need = ["ip", "ping", "tcpdump", "tshark", "swanctl", "nft"]
    out = [t for t in need if shutil.which(t) is None]
    if not os.access(bsw.CHARON, os.X_OK):
        out.append(str(bsw.CHARON))
    return out


@dataclass
class Check:
    flow: str
    expected: str
    observed: str
    ok: bool


def run_demo(d: Demo) -> list[Check]:
    checks: list[Check] = []
    g1 = GATEWAYS[0]
    _say("[1/7] building the two sites in network namespaces")
    d.build()
    devpki.create(d.pki, ["policyd", "dataplane", "keymgr", "admin"])
    secrets_dir = d.workdir / "secrets"
    secrets_dir.mkdir(mode=0o700)
    (secrets_dir / PSK_REF).write_text(d.psk)
    (secrets_dir / PSK_REF).chmod(0o600)

    _say("[2/7] starting policyd (SQLite), both workers, keymgr and site B's strongSwan")
    d.start_policyd()
    for g in GATEWAYS:
        d.start_worker(g.name, g.wan)
    d.start_keymgr([g.name for g in GATEWAYS])
    d.start_strongswan()

    _say("[3/7] applying the policy document over REST (POST /v1/apply)")
    doc = policy_document()
    (d.workdir / "policy.json").write_text(json.dumps(doc, indent=2))
    res = d.rest("POST", "/v1/apply", doc)
    revision = int(res["revision"])
    _say(
        f"      revision {revision}; {len(doc['policies'])} policies, "
        f"{sum(len(p['rules']) for p in doc['policies'])} rules"
    )

    def enforced() -> dict[tuple[str, str], int]:
        return {k: rev for k, (rev, _at) in d.enforced().items()}

    want = {(g.name, c) for g in GATEWAYS for c in (g.name, "keymgr")}
    _wait(
        "every worker and keymgr enforcing the revision",
        lambda: all(enforced().get(k, -1) >= revision for k in want),
        30,
    )
    _say("      workers a1, a2 and keymgr report it enforced")

    _say("[4/7] first traffic: the worker's ACQUIRE makes keymgr negotiate with strongSwan")
    with d.capture("b", "wan0", "tunnel-a1") as pcap:
        t0 = time.monotonic()
        first = {g.name: d.ping(f"h{g.name}", B_HOST, count=2) for g in GATEWAYS}
        for g in GATEWAYS:
            _wait(
                f"tunnel {g.name} installed on strongSwan",
                lambda g=g: "INSTALLED" in d.swanctl("--list-sas", "--child", g.name),  # type: ignore[misc]
                30,
            )
        up = time.monotonic() - t0
        _say(
            f"      both tunnels up {up:.1f} s after the first packet (replies to the first two "
            f"pings while negotiating: {', '.join(f'{k} {v}/2' for k, v in first.items())})"
        )
        got = {g.name: d.ping(f"h{g.name}", B_HOST, count=5) for g in GATEWAYS}
        sha_a, sha_b, n = ns_tcp_sha256(
            d.ns(f"h{g1.name}"), g1.host, d.ns("hb"), B_HOST, nbytes=1 << 20
        )
    for g in GATEWAYS:
        checks.append(
            Check(
                f"ping h{g.name} -> {B_HOST}",
                "through tunnel",
                f"{got[g.name]}/5 replies",
                got[g.name] == 5,
            )
        )
    ok_tcp = sha_a == sha_b and n == 1 << 20
    checks.append(
        Check(
            f"TCP 1 MiB h{g1.name} -> {B_HOST}",
            "through tunnel, intact",
            f"{n} bytes, sha256 {'equal' if ok_tcp else 'DIFFERENT'}",
            ok_tcp,
        )
    )
    clear_a1 = d.packets(pcap, f"ip.addr == {g1.host}")
    esp_a1 = d.packets(pcap, "esp")
    checks.append(
        Check(
            "wire a1 <-> b during that",
            "ESP only",
            f"{esp_a1} ESP, {clear_a1} clear",
            esp_a1 > 0 and clear_a1 == 0,
        )
    )

    _say("[5/7] blocked flow (TCP 23) and exempt flow (host 10.2.0.53)")
    with d.capture("b", "wan0", "block-a1") as pcap:
        answered = d.tcp_attempt(f"h{g1.name}", B_HOST, 23)
    blocked_wire = d.packets(pcap, "esp or tcp.port == 23")
    checks.append(
        Check(
            f"TCP h{g1.name} -> {B_HOST}:23",
            "blocked, nothing on the wire",
            f"{'answered' if answered else 'no answer'}, {blocked_wire} packets",
            not answered and blocked_wire == 0,
        )
    )
    with d.capture("b", "wan0", "exempt-a1") as pcap:
        got_ex = d.ping(f"h{g1.name}", B_EXEMPT, count=3)
    clear_ex = d.packets(pcap, f"icmp and ip.addr == {B_EXEMPT}")
    checks.append(
        Check(
            f"ping h{g1.name} -> {B_EXEMPT}",
            "exempt: clear both ways",
            f"{got_ex}/3 replies, {clear_ex} clear ICMP",
            got_ex == 3 and clear_ex >= 6,
        )
    )
    before = d.stats(g1.name).inbound_filter.get("require", 0)
    with d.capture(g1.name, "wan0", "require-a1") as pcap:
        got_rq = d.ping("b", g1.host, count=3, src="10.2.0.1")
    arrived = d.packets(pcap, f"icmp and ip.src == 10.2.0.1 and ip.dst == {g1.host}")
    dropped = d.stats(g1.name).inbound_filter.get("require", 0) - before
    checks.append(
        Check(
            f"clear ping 10.2.0.1 -> h{g1.name}",
            "dropped at a1 (require security)",
            f"{arrived} arrived clear, {dropped} dropped by a1, {got_rq}/3 replies",
            arrived == 3 and dropped == 3 and got_rq == 0,
        )
    )

    _say("[6/7] a policy change over REST, enforced without restart: block the exempt host")
    spis_before = _child_spis(d)
    rule = d.rest("GET", "/v1/policies/site-a-common/rules/exempt-resolver")
    etag = f'"r{rule["revision"]}"'
    body = {k: v for k, v in rule.items() if k not in ("revision", "policy")}
    body["filter_action"] = "block"
    res = d.rest("PUT", "/v1/policies/site-a-common/rules/exempt-resolver", body, if_match=etag)
    revision2 = int(res["revision"])
    t0 = time.monotonic()
    _wait(
        "every worker and keymgr enforcing the new revision",
        lambda: all(enforced().get(k, -1) >= revision2 for k in want),
        30,
    )
    took = time.monotonic() - t0
    with d.capture("b", "wan0", "changed-a1") as pcap:
        got_ex2 = d.ping(f"h{g1.name}", B_EXEMPT, count=3)
    wire_ex2 = d.packets(pcap, f"icmp and ip.addr == {B_EXEMPT}")
    checks.append(
        Check(
            f"ping h{g1.name} -> {B_EXEMPT} after the change",
            "blocked",
            f"{got_ex2}/3 replies, {wire_ex2} on the wire",
            got_ex2 == 0 and wire_ex2 == 0,
        )
    )
    spis_after = _child_spis(d)
    checks.append(
        Check(
            "tunnels across the change",
            "untouched (same SPIs)",
            "same SPIs" if spis_after == spis_before else f"{spis_before} -> {spis_after}",
            bool(spis_before) and spis_after == spis_before,
        )
    )
    _say(f"      revision {revision2} enforced by a1, a2 and keymgr {took:.1f} s after the PUT")

    _say("[7/7] status")
    for args in (("status",), ("sa", "list")):
        _say(f"$ ipsecctl {' '.join(args)}")
        _say(d.ipsecctl(*args).rstrip())
    rows = []
    for g in GATEWAYS:
        st = d.stats(g.name)
        drops = ", ".join(f"{k} {v}" for k, v in sorted(st.drops.items()) if v) or "-"
        inbound = ", ".join(f"{k} {v}" for k, v in sorted(st.inbound_filter.items()) if v)
        rows.append(
            (g.name, st.policy_revision, st.sa_count, st.tx_packets, st.rx_packets,
             st.bypass_packets, drops, inbound or "-")
        )  # fmt: skip
    _say("$ worker counters (GetStats)")
    _say(
        _table(
            ["worker", "policy rev", "SAs", "ESP out", "ESP in", "clear out (permit)",
             "dropped out", "inbound clear filter"],
            rows,
        )
    )  # fmt: skip
    return checks


def _child_spis(d: Demo) -> dict[str, tuple[str, ...]]:
    """site B's view: the SPIs of each installed Child SA, by connection."""
    out: dict[str, tuple[str, ...]] = {}
    for g in GATEWAYS:
        text = d.swanctl("--list-sas", "--child", g.name)
        out[g.name] = tuple(
            w for line in text.splitlines() if "SPIs" in line for w in line.split() if len(w) == 8
        )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m services.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--keep", action="store_true", help="keep the working directory (logs)")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        _say("the demo needs root (network namespaces)")
        return 2
    missing = _missing()
    if missing:
        _say(f"missing: {', '.join(missing)} (make demo installs them)")
        return 2
    d = Demo(Path(tempfile.mkdtemp(prefix="ipsec-demo-")))
    old = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    checks: list[Check] = []
    try:
        checks = run_demo(d)
    except (DemoError, KeyboardInterrupt) as e:
        _say(f"demo failed: {e}")
        for name in d.procs:
            _say(f"--- {name} log (last lines)\n{d.log_tail(name)}")
        return 1
    finally:
        d.cleanup()
        signal.signal(signal.SIGTERM, old)
        if args.keep:
            _say(f"logs kept in {d.workdir}")
        else:
            shutil.rmtree(d.workdir, ignore_errors=True)
    _say(
        _table(
            ["flow", "expected", "observed", "result"],
            [(c.flow, c.expected, c.observed, "ok" if c.ok else "FAIL") for c in checks],
        )
    )
    return 0 if all(c.ok for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
