"""keymgr end to end against strongSwan 5.9.8: IKEv2 through our worker's punt/inject stream,
Child SA installed into our worker, ICMP through our dataplane and strongSwan's libipsec.

Namespace A (our side): a dataplane worker (TUN ipsec0, outer 192.0.2.1, site 198.51.100.1/32
on lo, 203.0.113.1/32 routed into the TUN). keymgr runs as a plain process on the host and
reaches the worker only over its mTLS unix socket. Namespace B: charon (kernel-libipsec) as a
PSK responder with local_ts 203.0.113.1/32, remote_ts 198.51.100.1/32 — it never initiates.

Asserts: swanctl on B shows the IKE SA ESTABLISHED and the Child SA INSTALLED with the SPIs our
worker holds; ``ping -I 198.51.100.1 203.0.113.1`` from A gets replies; both of our worker's
SAs counted packets; keymgr's log never contains the PSK. keymgr, worker, charon, the
namespaces and the temporary directory are removed also on failure.

:class:`KeymgrLab` takes the proposals, the mode and the address family of a case (see
:class:`Case`; the defaults are the fixed suite of this file's tests), so
``test_keymgr_matrix.py`` runs the same lab across algorithms, IPv4 / IPv6 and tunnel /
transport in both roles.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import pytest

from scripts import bench_strongswan as bsw
from services.core.engine import SaStatus
from services.core.sa import Direction
from services.dataplane.client import DataplaneClient
from tests.netns import tshark

pytestmark = pytest.mark.netns

REPO = pathlib.Path(__file__).resolve().parents[2]
WORKER_ID = "worker-a"
CLIENT = "keymgr"
# IPv6 twins of the bench addresses (RFC 3849 documentation prefix)
OUTER6_A, OUTER6_B = "2001:db8::1", "2001:db8::2"
INNER6_A, INNER6_B = "2001:db8:a::1", "2001:db8:b::1"


@dataclass(frozen=True)
class Case:
    """One interop case: charon's proposals (swanctl syntax, comma-separated alternatives),
    keymgr's (lists), the mode and the address family. The defaults are the fixed suite."""

    charon_ike: str = bsw.IKE_PROPOSAL
    charon_esp: str = bsw.ESP_PROPOSAL
    keymgr_ike: tuple[str, ...] = (bsw.IKE_PROPOSAL,)
    keymgr_esp: tuple[str, ...] = (bsw.ESP_PROPOSAL,)
    mode: str = "tunnel"
    ipv6: bool = False
    plugins: tuple[str, ...] = field(default=())  # extra charon plugins (e.g. chapoly)
    charon_settings: tuple[str, ...] = field(default=())  # extra "key = value" in charon { }
    ah: bool = False  # the Child SA proposals are AH ones (ah_proposals on both sides)

    @property
    def outer(self) -> tuple[str, str]:
        return (OUTER6_A, OUTER6_B) if self.ipv6 else (bsw.OUTER_A, bsw.OUTER_B)

    @property
    def inner(self) -> tuple[str, str]:
        """(A's, B's) protected address: the loopback sites in tunnel mode, the outer
        addresses themselves in transport mode."""
        if self.mode == "transport":
            return self.outer
        return (INNER6_A, INNER6_B) if self.ipv6 else (bsw.INNER_A, bsw.INNER_B)

    @property
    def host_len(self) -> int:
        return 128 if self.ipv6 else 32

    def swanctl_conf(self, psk: str) -> str:
        """charon (namespace B) configuration for this case, from the bench's template."""
        conf = bsw.swanctl_conf(bsw.OUTER_B, bsw.OUTER_A, bsw.INNER_B, bsw.INNER_A, psk)
        (out_a, out_b), (in_a, in_b) = self.outer, self.inner
        h = self.host_len
        subs = [
            (f"local_addrs = {bsw.OUTER_B}", f"local_addrs = {out_b}"),
            (f"remote_addrs = {bsw.OUTER_A}", f"remote_addrs = {out_a}"),
            (f"id = {bsw.OUTER_B}", f"id = {out_b}"),
            (f"id = {bsw.OUTER_A}", f"id = {out_a}"),
            (f"id-a = {bsw.OUTER_A}", f"id-a = {out_a}"),
            (f"id-b = {bsw.OUTER_B}", f"id-b = {out_b}"),
            (f"local_ts = {bsw.INNER_B}/32", f"local_ts = {in_b}/{h}"),
            (f"remote_ts = {bsw.INNER_A}/32", f"remote_ts = {in_a}/{h}"),
            (f"proposals = {bsw.IKE_PROPOSAL}", f"proposals = {self.charon_ike}"),
            (
                f"esp_proposals = {bsw.ESP_PROPOSAL}",
                f"{'ah' if self.ah else 'esp'}_proposals = {self.charon_esp}",
            ),
            ("mode = tunnel", f"mode = {self.mode}"),
        ]
        for old, new in subs:
            assert conf.count(old) == 1, f"template changed: {old!r}"
            conf = conf.replace(old, new)
        return conf


def _skip_reason() -> str | None:
    if not os.access(bsw.CHARON, os.X_OK):
        return f"strongSwan not installed ({bsw.CHARON} missing)"
    for tool in ("swanctl", "ping", "ip", "tcpdump", "tshark"):
        if shutil.which(tool) is None:
            return f"{tool} not installed"
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    return None


def _env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH", "")
    return {
        **os.environ,
        "PYTHONPATH": f"{REPO}{os.pathsep}{path}" if path else str(REPO),
        "PYTHONUNBUFFERED": "1",
    }


class KeymgrLab:
    """Namespaces A and B (veth), charon responder in B, our worker in A, keymgr on the host.

    IKE capture check: the first keymgr a lab starts is preceded by tcpdump on A's veth (IKE on
    UDP 500 and 4500, see :data:`tshark.IKE_CAPTURE_FILTER`) and runs with ``--export-keys``
    (unless the test gives its own file). :meth:`cleanup` stops keymgr (its Deletes are
    captured), then the capture, and — unless the test failed or opted out with
    :meth:`skip_ike_check` — asserts with :func:`tshark.check_ike_capture` that every captured
    IKEv2 message parses and every encrypted one is decrypted with the exported keys, and
    prints the one-line summary."""

    case = Case()  # the fixed suite, also for subclasses that set up their own namespaces
    # class-level defaults: subclasses that build their own namespaces skip __init__
    _ike_capture: subprocess.Popen[bytes] | None = None
    _ike_skip: str = ""
    _ike_undecryptable: str = ""
    _ike_garbage: tuple[tuple[float, float], ...] = ()
    _keymgrs: tuple[subprocess.Popen[bytes], ...] = ()
    _keys_file: pathlib.Path | None = None
    ike_summary: str = ""  # the check's summary line once cleanup() ran it
    extra_routes: tuple[str, ...] = ()  # more prefixes the worker routes into its TUN

    @property
    def ike_pcap(self) -> pathlib.Path:
        return self.workdir / "ike-check.pcap"

    @property
    def keys_file(self) -> pathlib.Path:
        """The key file keymgr exports to (``--export-keys``)."""
        return self._keys_file or self.workdir / "ike-keys.txt"

    @property
    def tshark_undecryptable(self) -> str:
        """Why tshark cannot decrypt this case's IKE SAs ("" when it can)."""
        if self._ike_undecryptable:
            return self._ike_undecryptable
        ike = ",".join((self.case.charon_ike, *self.case.keymgr_ike))
        return f"ChaCha20-Poly1305, {tshark.TSHARK_CANNOT}" if "chacha20poly1305" in ike else ""

    def expect_undecryptable(self, reason: str) -> None:
        """Encrypted messages of IKE SAs keymgr exported no keys for are expected (``reason``
        says why, e.g. an IKE SA that never established): they are counted, not failed; every
        message must still parse and those of exported IKE SAs must still decrypt."""
        self._ike_undecryptable = reason

    def skip_ike_check(self, reason: str) -> None:
        """Opt this test out of the capture check (the reason is printed at cleanup)."""
        self._ike_skip = reason

    @contextlib.contextmanager
    def ike_garbage(self) -> Iterator[None]:
        """Frames captured inside this block are deliberate garbage: counted, not checked."""
        start = time.time()
        try:
            yield
        finally:
            self._ike_garbage = (*self._ike_garbage, (start - 0.05, time.time() + 0.05))

    def _start_ike_capture(self) -> None:
        log_name = "tcpdump-ike.log"
        argv = [
            "ip",
            "netns",
            "exec",
            self.bench.ns_a,
            "tcpdump",
            "-i",
            "veth0",
            "-U",
            "-n",
            "--immediate-mode",
        ]
        argv += ["--immediate-mode", "-w", str(self.ike_pcap), tshark.IKE_CAPTURE_FILTER]
        proc = self._popen(argv, log_name)
        self._ike_capture = proc
        deadline = time.monotonic() + 10
        while "listening on" not in self.log(log_name):
            assert proc.poll() is None, f"tcpdump exited\n{self.log(log_name)}"
            assert time.monotonic() < deadline, f"tcpdump did not start\n{self.log(log_name)}"
            time.sleep(0.05)

    def _keymgr_argv(self, argv: list[str]) -> list[str]:
        """Start the capture before the first keymgr and add ``--export-keys`` (and a
        ``--state-dir`` in the lab's directory, so sequence-number leases are on)."""
        if self._ike_capture is None:
            self._start_ike_capture()
        if "--state-dir" not in argv:
            argv = [*argv, "--state-dir", str(self.workdir / "keymgr-state")]
        if "--export-keys" in argv:
            self._keys_file = pathlib.Path(argv[argv.index("--export-keys") + 1])
            return argv
        return [*argv, "--export-keys", str(self.keys_file)]

    def _finish_ike_check(self) -> str | None:
        """Stop keymgr and the capture; run the check. Returns the failure text, if any."""
        cap = self._ike_capture
        if cap is None:
            return None
        for proc in self._keymgrs:  # SIGTERM: keymgr deletes its IKE SAs first
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in self._keymgrs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
        time.sleep(0.3)  # the peer's answer to our last Delete
        with contextlib.suppress(ProcessLookupError):
            os.killpg(cap.pid, signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            cap.wait(timeout=10)
        # pytest keeps the exception of a failed test in sys.last_value until the next test
        if getattr(sys, "last_value", None) is not None:
            print("tshark: IKE capture not checked: the test failed")
            return None
        if self._ike_skip:
            print(f"tshark: IKE capture not checked: {self._ike_skip}")
            return None
        res = tshark.check_ike_capture(
            self.ike_pcap,
            self.keys_file,
            undecryptable=self.tshark_undecryptable,
            garbage=self._ike_garbage,
        )
        self.ike_summary = res.summary()
        print(self.ike_summary)
        if res.ok:
            return None
        return "\n".join((res.summary(), *res.problems[:40], self.logs()))

    def __init__(self, case: Case | None = None, prefix: str = "kmg") -> None:
        self.case = case or Case()
        self.bench = bsw.StrongSwanPair()
        tag = secrets.token_hex(4)
        self.bench.ns_a = f"{prefix}{tag}a"
        self.bench.ns_b = f"{prefix}{tag}b"
        self.workdir = self.bench.workdir
        self.pki = self.workdir / "pki"
        self.sock = self.workdir / "a.sock"
        self.psk = secrets.token_hex(32)  # strongSwan's
        self.psk_for_keymgr = self.psk  # a test may hand keymgr a different one
        self.client: DataplaneClient | None = None
        self.bench.netns()  # also puts 198.51.100.1/32 on A's lo, 203.0.113.1/32 on B's lo
        if self.case.ipv6:
            self._add_ipv6()

    def _add_ipv6(self) -> None:
        """IPv6 twins of the bench's addresses (no DAD, so they are usable at once)."""
        ns_a, ns_b = self.bench.ns_a, self.bench.ns_b
        for ns, outer, inner in ((ns_a, OUTER6_A, INNER6_A), (ns_b, OUTER6_B, INNER6_B)):
            bsw._run(["ip", "-n", ns, "addr", "add", f"{outer}/64", "dev", "veth0", "nodad"])
            bsw._run(["ip", "-n", ns, "addr", "add", f"{inner}/128", "dev", "lo", "nodad"])
        for _ in range(30):
            ping = ["ip", "netns", "exec", ns_a, "ping", "-6", "-c1", "-W1", OUTER6_B]
            if bsw._run(ping, check=False).returncode == 0:
                return
            time.sleep(0.1)
        raise bsw.BenchError("IPv6 between the namespaces does not pass traffic")

    def _popen(self, argv: list[str], log_name: str) -> subprocess.Popen[bytes]:
        keymgr = "services.keymgr" in argv and argv[argv.index("services.keymgr") - 1] == "-m"
        if keymgr:
            argv = self._keymgr_argv(argv)
        with (self.workdir / log_name).open("wb") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env=_env(),
                start_new_session=True,
            )
        self.bench.procs.append(proc)  # bench.cleanup() kills the process group
        if keymgr:
            self._keymgrs = (*self._keymgrs, proc)
        return proc

    def log(self, name: str, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            text = (self.workdir / name).read_text(errors="replace").splitlines()
            return "\n".join(text[-lines:])
        return ""

    def logs(self) -> str:
        return (
            f"--- keymgr ---\n{self.log('keymgr.log')}\n--- worker ---\n{self.log('worker.log')}"
            f"\n--- charon b ---\n{self.log('charon-b.log')}"
        )

    def start_charon_b(self, psk: str) -> None:
        """charon in B with this case's configuration (loaded, not initiated)."""
        b = self.bench
        base = bsw._strongswan_conf
        case = self.case

        def conf(workdir: pathlib.Path, name: str, extra: str = "") -> str:
            text = base(workdir, name, extra)
            load = f"load = {bsw.PLUGINS}"
            assert text.count(load) == 1, "template changed"
            return text.replace(load, " ".join((load, *case.plugins)))

        settings = "".join(f"    {kv}\n" for kv in case.charon_settings)
        bsw._strongswan_conf = conf  # start_charon writes strongswan.conf through it
        try:
            proc = b.start_charon("b", b.ns_b, self.case.swanctl_conf(psk), settings)
        finally:
            bsw._strongswan_conf = base
        b.wait_vici("b", proc)
        b.swanctl(
            "b", "--load-all", "--noprompt", "--file", str(b.workdir / "b/swanctl/swanctl.conf")
        )

    def charon_conf(self, psk: str) -> str:
        """swanctl.conf for charon in B (a test may return a certificate configuration)."""
        return bsw.swanctl_conf(bsw.OUTER_B, bsw.OUTER_A, bsw.INNER_B, bsw.INNER_A, psk)

    def charon_files(self, swanctl_dir: pathlib.Path) -> None:
        """Hook: put credentials into charon's swanctl directory before they are loaded."""

    def start_responder(self) -> None:
        if self.case != Case():
            self.start_charon_b(self.psk)
            return
        b = self.bench
        proc = b.start_charon("b", b.ns_b, self.charon_conf(self.psk))
        self.charon_files(b.workdir / "b" / "swanctl")
        b.wait_vici("b", proc)
        b.swanctl(
            "b", "--load-all", "--noprompt", "--file", str(b.workdir / "b/swanctl/swanctl.conf")
        )

    def start_worker(self) -> None:
        devpki = [sys.executable, "-m", "services.runtime.devpki", str(self.pki)]
        subprocess.run(
            [*devpki, "--names", f"{WORKER_ID},{CLIENT}"],
            cwd=REPO,
            env=_env(),
            check=True,
            capture_output=True,
        )
        argv = ["ip", "netns", "exec", self.bench.ns_a, sys.executable, "-m", "services.dataplane"]
        argv += ["--worker-id", WORKER_ID, "--grpc-listen", f"unix:{self.sock}"]
        argv += ["--tls-dir", str(self.pki), "--tls-cert-name", WORKER_ID]
        route = f"{self.case.inner[1]}/{self.case.host_len}"
        argv += ["--tun", "ipsec0", "--tun-mtu", "1380", "--route", route]
        for extra in self.extra_routes:
            argv += ["--route", extra]
        argv += ["--local-address", self.case.outer[0], "--fwmark", "0x1ee", "--table", "1450"]
        argv += ["--metrics-listen", ""]
        proc = self._popen(argv, "worker.log")
        self.client = DataplaneClient(
            f"unix:{self.sock}", self.pki, server_name=WORKER_ID, client_name=CLIENT
        )
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, f"worker exited\n{self.log('worker.log')}"
            try:
                self.client.list_sas()
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def keymgr_connection(
        self,
        name: str,
        psk_file: pathlib.Path,
        start_action: str,
        extra: dict[str, object] | None = None,
    ) -> dict[str, object]:
        """keymgr's connection for this case (the default case leaves the suite fields out);
        ``extra`` adds or replaces fields (lifetimes, dpd, addresses, certificates, ...); a
        field given as None is left out (e.g. ``psk_file`` with certificates)."""
        c = self.case
        (out_a, out_b), (in_a, in_b) = c.outer, c.inner
        conn: dict[str, object] = {
            "name": name,
            "local_addr": out_a,
            "remote_addr": out_b,
            "local_id": out_a,
            "remote_id": out_b,
            "psk_file": str(psk_file),
            "local_ts": f"{in_a}/{c.host_len}",
            "remote_ts": f"{in_b}/{c.host_len}",
            "start_action": start_action,
        }
        if c != Case():
            conn["ike_proposals"] = list(c.keymgr_ike)
            conn["ah_proposals" if c.ah else "esp_proposals"] = list(c.keymgr_esp)
            conn["mode"] = c.mode
        conn.update(extra or {})
        return {k: v for k, v in conn.items() if v is not None}

    def start_keymgr(
        self, extra: dict[str, object] | None = None, extra_args: Sequence[str] = ()
    ) -> subprocess.Popen[bytes]:
        """Start keymgr; ``extra`` adds connection fields (see :meth:`keymgr_connection`),
        ``extra_args`` command-line flags."""
        psk_file = self.workdir / "psk"
        fd = os.open(psk_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"0x{self.psk_for_keymgr}\n")
        cfg = {"connections": [self.keymgr_connection("to-b", psk_file, "start", extra)]}
        cfg_file = self.workdir / "keymgr.json"
        cfg_file.write_text(json.dumps(cfg))
        argv = [sys.executable, "-m", "services.keymgr", "--config", str(cfg_file)]
        argv += ["--dataplane", f"unix:{self.sock}", "--tls-dir", str(self.pki)]
        argv += ["--server-name", WORKER_ID, "--client-name", CLIENT, "--log-level", "debug"]
        return self._popen([*argv, *extra_args], "keymgr.log")

    def list_sas_b(self) -> str:
        return self.bench.swanctl("b", "--list-sas")

    def ping(self, inner: tuple[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """3 pings from A's protected address to B's (``inner``: another (A, B) pair)."""
        src, dst = inner or self.case.inner
        cmd = ["ip", "netns", "exec", self.bench.ns_a, "ping", "-c", "3", "-i", "0.3", "-W", "2"]
        cmd += ["-I", src, dst]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)

    def tcp_transfer(
        self, from_a: bool, nbytes: int = 256 * 1024, inner: tuple[str, str] | None = None
    ) -> tuple[dict, dict]:
        """``nbytes`` random octets over TCP between the protected addresses (A -> B when
        ``from_a``; ``inner``: another (A, B) pair), through the tunnel; returns (sender's
        report, receiver's report), each with the SHA-256 its end computed
        (services.dataplane.lab tcp-send / tcp-recv)."""
        in_a, in_b = inner or self.case.inner
        (ns_s, src), (ns_r, dst) = (
            ((self.bench.ns_a, in_a), (self.bench.ns_b, in_b))
            if from_a
            else ((self.bench.ns_b, in_b), (self.bench.ns_a, in_a))
        )
        port = str(20000 + secrets.randbelow(20000))
        py = [sys.executable, "-m", "services.dataplane.lab"]
        recv = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                ns_r,
                *py,
                "tcp-recv",
                "--bind",
                dst,
                "--port",
                port,
                "--timeout",
                "20",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=REPO,
            env=_env(),
            start_new_session=True,
        )
        self.bench.procs.append(recv)  # killed by cleanup() if still running
        try:
            assert recv.stdout is not None
            line = recv.stdout.readline().decode()
            assert line.startswith("listening"), f"tcp-recv: {line!r}"
            send = subprocess.run(
                [
                    "ip",
                    "netns",
                    "exec",
                    ns_s,
                    *py,
                    "tcp-send",
                    "--source",
                    src,
                    "--connect",
                    dst,
                    "--port",
                    port,
                    "--bytes",
                    str(nbytes),
                    "--timeout",
                    "20",
                ],
                capture_output=True,
                text=True,
                timeout=40,
                cwd=REPO,
                env=_env(),
                check=False,
            )
            out, err = recv.communicate(timeout=30)
        finally:
            if recv.poll() is None:
                recv.kill()
                recv.wait()
        assert send.returncode == 0, f"tcp-send: {send.stdout}{send.stderr}\n{self.logs()}"
        assert recv.returncode == 0, f"tcp-recv: {err.decode()}"
        return json.loads(send.stdout.strip().splitlines()[-1]), json.loads(
            out.decode().strip().splitlines()[-1]
        )

    def cleanup(self) -> None:
        """Check the IKE capture (see the class), then remove everything, also on failure."""
        problem = None
        try:
            if self.client is not None:
                self.client.close()
            problem = self._finish_ike_check()
        finally:
            # keymgr first, then the worker and charon (reverse start order), namespaces, workdir
            for proc in reversed(self.bench.procs):
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGTERM)
            self.bench.cleanup()
        if problem:
            pytest.fail(f"IKE capture check failed\n{problem}", pytrace=False)


_L = TypeVar("_L", bound=KeymgrLab)


def open_lab(cls: Callable[[], _L]) -> Iterator[_L]:
    """A fixture body for any keymgr lab: skip when the tools are missing, build the lab, and
    always clean it up (keymgr, worker, charon, namespaces, workdir), also on failure."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    lab = None
    try:
        lab = cls()
        yield lab
    finally:
        if lab is not None:
            lab.cleanup()


@pytest.fixture
def kmlab() -> Iterator[KeymgrLab]:
    yield from open_lab(KeymgrLab)


def test_keymgr_establishes_with_strongswan_and_traffic_flows(kmlab: KeymgrLab) -> None:
    kmlab.start_responder()
    kmlab.start_worker()
    keymgr = kmlab.start_keymgr()

    sas = ""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        assert keymgr.poll() is None, f"keymgr exited {keymgr.returncode}\n{kmlab.logs()}"
        sas = kmlab.list_sas_b()
        if "ESTABLISHED" in sas and "INSTALLED" in sas:
            break
        time.sleep(0.3)
    print(sas)
    assert "ESTABLISHED" in sas and "INSTALLED" in sas, f"{sas}\n{kmlab.logs()}"
    assert re.search(r"INSTALLED, TUNNEL-in-UDP, .*ESP:AES_GCM_16-256", sas), sas
    assert f"local  {bsw.INNER_B}/32" in sas and f"remote {bsw.INNER_A}/32" in sas, sas

    # keymgr installs right after ESTABLISHED; wait until both SAs are in our worker.
    assert kmlab.client is not None
    ours: list[SaStatus] = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        ours = kmlab.client.list_sas()
        if len(ours) == 2:
            break
        time.sleep(0.1)
    assert len(ours) == 2, f"{ours}\n{kmlab.logs()}"
    by_dir = {s.direction: s for s in ours}
    # On B, "in" is B's SPI (our outbound), "out" is ours (our inbound).
    spi_in_b = re.search(r"\bin\s+([0-9a-f]{8})", sas)
    spi_out_b = re.search(r"\bout\s+([0-9a-f]{8})", sas)
    assert spi_in_b and spi_out_b, sas
    assert by_dir[Direction.OUTBOUND].spi == int(spi_in_b.group(1), 16)
    assert by_dir[Direction.INBOUND].spi == int(spi_out_b.group(1), 16)
    assert all(s.encap and s.reqid == ours[0].reqid != 0 for s in ours), ours

    ping = kmlab.ping()
    print(ping.stdout)
    assert ping.returncode == 0, f"{ping.stdout}{ping.stderr}\n{kmlab.logs()}"
    assert re.search(r"3 packets transmitted, 3 received", ping.stdout), ping.stdout

    counts = {s.direction.name.lower(): s.packets for s in kmlab.client.list_sas()}
    print(f"worker SA packets: {counts}")
    assert counts["outbound"] >= 3 and counts["inbound"] >= 3, counts

    # SIGTERM ends keymgr cleanly after deleting the IKE SA (see test_keymgr_delete_strongswan).
    keymgr.terminate()
    assert keymgr.wait(timeout=10) == 0, kmlab.logs()
    assert kmlab.client.list_sas() == []

    log_text = (kmlab.workdir / "keymgr.log").read_text(errors="replace")
    print(log_text)
    assert "ike established" in log_text and "child installed" in log_text, log_text
    assert kmlab.psk not in log_text.lower()


def test_keymgr_wrong_psk_installs_nothing(kmlab: KeymgrLab) -> None:
    kmlab.start_responder()
    kmlab.start_worker()
    kmlab.psk_for_keymgr = secrets.token_hex(32)
    keymgr = kmlab.start_keymgr()
    deadline = time.monotonic() + 15
    log_text = ""
    while time.monotonic() < deadline:
        assert keymgr.poll() is None, f"keymgr exited {keymgr.returncode}\n{kmlab.logs()}"
        log_text = (kmlab.workdir / "keymgr.log").read_text(errors="replace")
        if "AUTHENTICATION_FAILED" in log_text:
            break
        time.sleep(0.3)
    assert "ike failed" in log_text and "AUTHENTICATION_FAILED" in log_text, kmlab.logs()
    assert "ESTABLISHED" not in kmlab.list_sas_b()
    assert kmlab.client is not None and kmlab.client.list_sas() == []
    for secret in (kmlab.psk, kmlab.psk_for_keymgr):
        assert secret not in log_text.lower()


def test_keymgr_trap_initiates_on_first_packet(kmlab: KeymgrLab) -> None:
    """start_action trap: the PROTECT entry is installed without SAs, no IKE is sent until a
    packet matches it; the worker's ACQUIRE makes keymgr initiate and the tunnel comes up."""
    kmlab.start_responder()
    kmlab.start_worker()
    keymgr = kmlab.start_keymgr({"start_action": "trap"})
    deadline = time.monotonic() + 15
    while "trap installed" not in kmlab.log("keymgr.log", 200):
        assert keymgr.poll() is None, kmlab.logs()
        assert time.monotonic() < deadline, kmlab.logs()
        time.sleep(0.1)
    time.sleep(1.5)
    assert "ESTABLISHED" not in kmlab.list_sas_b(), "keymgr initiated before any traffic"
    assert "ike initiating" not in kmlab.log("keymgr.log", 200)
    ok = False
    deadline = time.monotonic() + 20
    while not ok and time.monotonic() < deadline:
        ok = kmlab.ping().returncode == 0  # the first packets trigger the ACQUIRE
    log_text = kmlab.log("keymgr.log", 400)
    assert ok, kmlab.logs()
    assert "acquire: initiating" in log_text and "child installed" in log_text, log_text
    sas = kmlab.list_sas_b()
    assert "ESTABLISHED" in sas and "INSTALLED" in sas, sas
