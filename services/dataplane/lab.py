"""Local lab: two network namespaces ("hosts") joined by a veth pair, one dataplane worker in
each, plus helpers to build matching SA pairs and SPD entries and to drive test traffic.

Topology (see docs/lab.md)::

    netns <prefix>-<pid>-<rand>-a                    netns <prefix>-<pid>-<rand>-b
    lo:     198.51.100.1/32  2001:db8:a::1/128       lo:     203.0.113.1/32  2001:db8:b::1/128
    ipsec0: TUN of worker-a                          ipsec0: TUN of worker-b
    lab0:   192.0.2.1/24     2001:db8:1::1/64 <====> lab0:   192.0.2.2/24    2001:db8:1::2/64

Each worker routes the peer's outer address (transport mode) and the peer's site address
(tunnel mode) of both families into its TUN; its own ESP/AH/UDP sockets carry a fwmark that
skips that routing table (wg-quick style). SA pairs follow RFC 4301 §4.4.2: for each direction
an outbound SA on the sender and the matching inbound SA on the receiver, with one SPD PROTECT
entry per side (§4.4.1) whose reqid names the outbound SA bundle.

Addresses come from the documentation ranges (RFC 5737, RFC 3849). All traffic the lab sends
stays inside the namespaces it created; everything it creates is removed when :func:`lab`
exits, also on errors, KeyboardInterrupt and SIGTERM. ``python -m services.dataplane.lab``
offers small in-namespace helpers (TCP sender/receiver, raw frame injection), ``up`` for an
interactive lab and ``cleanup`` for namespaces left behind by killed runs.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import ipaddress
import json
import os
import re
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from services.core.algorithms import ENCR, INTEG
from services.core.iana import Encr, Integ, IpProto
from services.core.sa import Direction, Mode, SaConfig, UdpEncap
from services.core.selectors import Selector
from services.core.spd import Action, SpdEntry

if TYPE_CHECKING:
    from services.dataplane.client import DataplaneClient

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PREFIX = "ipsl"
LINK_IF = "lab0"
TUN_IF = "ipsec0"
DEFAULT_TUN_MTU = 1380  # leaves room for IPv6 + AH + ESP (the largest bundle) within 1500
FWMARK = 0x1EE
ROUTE_TABLE = 1450
METRICS_PORT = 9108
WORKER_START_TIMEOUT = 30.0
TCP_PORTS = (5201, 7200)  # test transfers use these ports (captures decode them as plain data)


class LabError(RuntimeError):
    """The lab could not be built or a lab operation failed."""


# --- addressing ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Side:
    """Static addresses of one lab host."""

    label: str  # "a" or "b"
    outer4: str
    outer6: str
    site4: str
    site6: str

    def outer(self, family: int) -> str:
        return self.outer4 if family == 4 else self.outer6

    def site(self, family: int) -> str:
        return self.site4 if family == 4 else self.site6

    def inner(self, family: int, mode: Mode) -> str:
        """The address traffic protected in ``mode`` uses on this host."""
        return self.site(family) if mode == Mode.TUNNEL else self.outer(family)


SIDE_A = Side("a", "192.0.2.1", "2001:db8:1::1", "198.51.100.1", "2001:db8:a::1")
SIDE_B = Side("b", "192.0.2.2", "2001:db8:1::2", "203.0.113.1", "2001:db8:b::1")
LINK_PREFIX = {4: 24, 6: 64}
HOST_PREFIX = {4: 32, 6: 128}
LAB_ADDRESSES = frozenset(
    a for s in (SIDE_A, SIDE_B) for a in (s.outer4, s.outer6, s.site4, s.site6)
)


def _packed(addr: str) -> bytes:
    return ipaddress.ip_address(addr).packed


def _family(addr: str) -> int:
    return ipaddress.ip_address(addr).version


# --- SA profiles and matching SA pairs ------------------------------------------------------


class Encap(StrEnum):
    """How the protected traffic is carried."""

    ESP = "esp"  # raw ESP, IP protocol 50
    ESP_UDP = "esp-udp"  # ESP-in-UDP, 4500 <-> 4500 (RFC 3948)
    AH = "ah"  # AH only, IP protocol 51 (integrity, no confidentiality)
    ESP_AH = "esp+ah"  # bundle: ESP first, then AH over it (RFC 4301 §4.5)

    @property
    def protocols(self) -> tuple[int, ...]:
        return {
            Encap.ESP: (IpProto.ESP,),
            Encap.ESP_UDP: (IpProto.ESP,),
            Encap.AH: (IpProto.AH,),
            Encap.ESP_AH: (IpProto.ESP, IpProto.AH),
        }[self]


@dataclass(frozen=True, slots=True)
class SaProfile:
    """What kind of SA pair to build. ``integ_id`` is ESP's integrity transform (only with a
    non-combined cipher; defaults to HMAC-SHA2-256-128 then); ``ah_integ_id`` is AH's."""

    mode: Mode = Mode.TUNNEL
    family: int = 4
    encap: Encap = Encap.ESP
    encr_id: int = Encr.AES_GCM_16
    encr_bits: int = 256
    integ_id: int = Integ.NONE
    ah_integ_id: int = Integ.HMAC_SHA2_256_128
    replay_window: int = 64
    esn: bool = False

    def label(self) -> str:
        return f"{self.mode.name.lower()}-v{self.family}-{self.encap.value}"


def _random_key(nbytes: int) -> bytes:
    return secrets.token_bytes(nbytes) if nbytes else b""


def _esp_keys(profile: SaProfile) -> tuple[int, bytes, int, bytes]:
    """(encr_id, encr_key incl. salt, integ_id, integ_key) with fresh random keys."""
    alg = ENCR[profile.encr_id]
    bits = profile.encr_bits if profile.encr_bits in alg.key_bits else alg.key_bits[-1]
    encr_key = _random_key(bits // 8 + alg.salt_len)
    integ_id = int(profile.integ_id)
    if alg.aead:
        integ_id = 0
    elif not integ_id:
        integ_id = Integ.HMAC_SHA2_256_128
    integ_key = _random_key(INTEG[integ_id].key_len) if integ_id else b""
    return int(profile.encr_id), encr_key, integ_id, integ_key


@dataclass(frozen=True, slots=True)
class SaBundle:
    """One direction: the SAs the sender applies (in SPD protocol order) and the identical
    configurations, as inbound SAs, on the receiver."""

    sender: str  # "a" or "b"
    outbound: tuple[SaConfig, ...]
    inbound: tuple[SaConfig, ...]


@dataclass(frozen=True, slots=True)
class SaSet:
    """Everything to install on both workers for one profile."""

    profile: SaProfile
    reqid: int
    a_to_b: SaBundle
    b_to_a: SaBundle
    spd_a: tuple[SpdEntry, ...]
    spd_b: tuple[SpdEntry, ...]

    def for_side(self, label: str) -> list[SaConfig]:
        """SAs that belong on worker ``label``: its outbound ones and its inbound ones."""
        if label == "a":
            return [*self.a_to_b.outbound, *self.b_to_a.inbound]
        return [*self.b_to_a.outbound, *self.a_to_b.inbound]

    def spd_for_side(self, label: str) -> tuple[SpdEntry, ...]:
        return self.spd_a if label == "a" else self.spd_b

    def all_sas(self) -> list[SaConfig]:
        """Each SA once (the outbound configuration of each direction)."""
        return [*self.a_to_b.outbound, *self.b_to_a.outbound]

    def addresses(self) -> tuple[str, str]:
        """(address on A, address on B) that traffic protected by this set uses."""
        p = self.profile
        return SIDE_A.inner(p.family, p.mode), SIDE_B.inner(p.family, p.mode)


def _unique_spi(taken: set[int]) -> int:
    while True:
        spi = 0x1000 + secrets.randbelow(0xFFFFFFFF - 0x1000)
        if spi not in taken:
            taken.add(spi)
            return spi


def _bundle(profile: SaProfile, reqid: int, src: Side, dst: Side, taken: set[int]) -> SaBundle:
    fam = profile.family
    outer_src, outer_dst = _packed(src.outer(fam)), _packed(dst.outer(fam))
    plen = HOST_PREFIX[fam]
    # the receiver only accepts inner traffic from the sender's inner to its own inner address
    selectors: tuple[Selector, ...] = ()
    if profile.mode == Mode.TUNNEL:
        selectors = (
            Selector.make(
                f"{src.inner(fam, profile.mode)}/{plen}", f"{dst.inner(fam, profile.mode)}/{plen}"
            ),
        )
    configs: list[SaConfig] = []
    for proto in profile.encap.protocols:
        spi = _unique_spi(taken)
        if proto == IpProto.ESP:
            encr_id, encr_key, integ_id, integ_key = _esp_keys(profile)
            mode = profile.mode
            encap = UdpEncap(4500, 4500) if profile.encap == Encap.ESP_UDP else None
            sel = selectors
        else:
            encr_id, encr_key, encap = 0, b"", None
            integ_id = int(profile.ah_integ_id)
            integ_key = _random_key(INTEG[integ_id].key_len)
            # AH after ESP in a bundle authenticates the outer header in transport mode
            # (ESP already made the tunnel); alone it takes the profile's mode.
            bundled = profile.encap == Encap.ESP_AH
            mode = Mode.TRANSPORT if bundled else profile.mode
            sel = () if bundled else selectors
        configs.append(
            SaConfig(
                spi=spi,
                protocol=proto,
                direction=Direction.OUTBOUND,
                mode=mode,
                src=outer_src,
                dst=outer_dst,
                encr_id=encr_id,
                encr_key=encr_key,
                integ_id=integ_id,
                integ_key=integ_key,
                esn=profile.esn,
                replay_window=profile.replay_window,
                encap=encap,
                reqid=reqid,
                selectors=sel,
            )
        )
    outbound = tuple(configs)
    inbound = tuple(_as_inbound(c) for c in outbound)
    return SaBundle(src.label, outbound, inbound)


def _as_inbound(cfg: SaConfig) -> SaConfig:
    from dataclasses import replace

    return replace(cfg, direction=Direction.INBOUND)


def make_sa_set(profile: SaProfile, *, reqid: int | None = None) -> SaSet:
    """Build a matching SA pair per direction plus an SPD PROTECT entry per side, with random
    SPIs and keys (``secrets``)."""
    if profile.family not in (4, 6):
        raise ValueError("family must be 4 or 6")
    rid = reqid if reqid is not None else 1 + secrets.randbelow(0xFFFF)
    taken: set[int] = set()
    a_to_b = _bundle(profile, rid, SIDE_A, SIDE_B, taken)
    b_to_a = _bundle(profile, rid, SIDE_B, SIDE_A, taken)
    plen = HOST_PREFIX[profile.family]
    spd: dict[str, tuple[SpdEntry, ...]] = {}
    for local, remote in ((SIDE_A, SIDE_B), (SIDE_B, SIDE_A)):
        sel = Selector.make(
            f"{local.inner(profile.family, profile.mode)}/{plen}",
            f"{remote.inner(profile.family, profile.mode)}/{plen}",
        )
        spd[local.label] = (
            SpdEntry(
                policy_id=rid,
                priority=100,
                action=Action.PROTECT,
                selector=sel,
                reqid=rid,
                protocols=tuple(int(p) for p in profile.encap.protocols),
            ),
        )
    return SaSet(profile, rid, a_to_b, b_to_a, spd["a"], spd["b"])


# --- processes and namespaces ---------------------------------------------------------------


def _child_env() -> dict[str, str]:
    """Environment for child processes: ``python -m services...`` works from any cwd."""
    path = os.environ.get("PYTHONPATH", "")
    return {
        **os.environ,
        "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{path}" if path else str(REPO_ROOT),
    }


def _run(
    argv: Sequence[str], *, timeout: float = 30.0, check: bool = True, input_text: str | None = None
) -> subprocess.CompletedProcess[str]:
    try:
        res = subprocess.run(  # noqa: S603 - fixed argv, no shell
            list(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input_text,
            check=False,
            cwd=REPO_ROOT,
            env=_child_env(),
        )
    except subprocess.TimeoutExpired as e:
        raise LabError(f"timed out after {timeout:.0f}s: {' '.join(argv)}") from e
    if check and res.returncode != 0:
        raise LabError(f"command failed ({res.returncode}): {' '.join(argv)}\n{res.stderr.strip()}")
    return res


def netns_supported() -> tuple[bool, str]:
    """Whether this process can create namespaces; the reason when it cannot."""
    if os.geteuid() != 0:
        return False, "needs root (network namespaces, TUN, raw sockets)"
    if shutil.which("ip") is None:
        return False, "iproute2 'ip' command not found"
    try:
        res = _run(["ip", "netns", "list"], timeout=10, check=False)
    except (LabError, OSError) as e:
        return False, f"'ip netns' unusable: {e}"
    if res.returncode != 0:
        return False, f"'ip netns list' failed: {res.stderr.strip()}"
    if not Path("/dev/net/tun").exists():
        return False, "/dev/net/tun is missing"
    return True, ""


def _ns_pids(ns: str) -> list[int]:
    res = _run(["ip", "netns", "pids", ns], check=False, timeout=10)
    return [int(p) for p in res.stdout.split() if p.isdigit()]


def _delete_namespace(ns: str) -> None:
    for pid in _ns_pids(ns):  # only processes inside a namespace this lab created
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _run(["ip", "netns", "del", ns], check=False, timeout=10)


def cleanup_stale(prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Delete lab namespaces (and temporary directories) whose creating process no longer
    exists, as left behind by a run killed with SIGKILL."""
    removed: list[str] = []
    res = _run(["ip", "netns", "list"], check=False, timeout=10)
    pat = re.compile(rf"^{re.escape(prefix)}-(\d+)-[0-9a-f]+-[ab]$")
    for line in res.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = pat.match(name)
        if not m:
            continue
        pid = int(m.group(1))
        if pid != os.getpid() and not Path(f"/proc/{pid}").exists():
            _delete_namespace(name)
            removed.append(name)
    dir_pat = re.compile(rf"^{re.escape(prefix)}-(\d+)-[0-9a-f]+-")
    for d in Path(tempfile.gettempdir()).iterdir():
        m = dir_pat.match(d.name)
        if m and d.is_dir() and not Path(f"/proc/{m.group(1)}").exists():
            shutil.rmtree(d, ignore_errors=True)
            removed.append(str(d))
    return removed


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


@dataclass(frozen=True, slots=True)
class PingResult:
    """``ping -c count -w deadline``: ping keeps sending until ``count`` replies arrived or the
    deadline passed, so ``ok`` means every requested reply arrived in time."""

    count: int
    transmitted: int
    received: int
    output: str

    @property
    def ok(self) -> bool:
        return self.received >= self.count > 0


@dataclass(frozen=True, slots=True)
class TransferResult:
    nbytes: int
    sender_sha256: str
    receiver_sha256: str
    received_bytes: int
    seconds: float

    @property
    def ok(self) -> bool:
        return self.received_bytes == self.nbytes and self.sender_sha256 == self.receiver_sha256

    @property
    def mbit_per_s(self) -> float:
        return self.nbytes * 8 / 1e6 / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Node:
    """One lab host: its namespace, addresses and (optionally) its worker."""

    side: Side
    netns: str
    worker_id: str
    socket_path: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    client: DataplaneClient | None = None
    spd_revision: int = 0
    installed: list[SaConfig] = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.side.label

    def exec_argv(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *argv]

    def run(
        self, *argv: str, timeout: float = 30.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return _run(self.exec_argv(*argv), timeout=timeout, check=check)

    def worker_alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def worker_log(self, lines: int = 30) -> str:
        return _tail(self.log_path, lines)

    def dp(self) -> DataplaneClient:
        if self.client is None:
            raise LabError(f"{self.worker_id} has no client (lab started without workers?)")
        return self.client


class Capture:
    """A running tcpdump on the lab link inside one namespace, writing a pcap file."""

    def __init__(self, proc: subprocess.Popen[bytes], path: Path) -> None:
        self.proc = proc
        self.path = path
        self.stderr = ""

    def stop(self, settle: float = 0.3) -> Path:
        if self.proc.poll() is None:
            time.sleep(settle)  # let the last packets reach the file (-U writes per packet)
            self.proc.send_signal(signal.SIGINT)
            try:
                _, err = self.proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                _, err = self.proc.communicate()
            self.stderr += err.decode(errors="replace")
        return self.path


class Lab:
    """A built lab; create it with :func:`lab`."""

    def __init__(self, workdir: Path, a: Node, b: Node, *, tun_mtu: int) -> None:
        self.workdir = workdir
        self.a = a
        self.b = b
        self.tun_mtu = tun_mtu
        self.pki = workdir / "pki"
        self._procs: list[subprocess.Popen[bytes]] = []
        self._lock = threading.Lock()
        self._port = TCP_PORTS[0] - 1

    @property
    def nodes(self) -> tuple[Node, Node]:
        return self.a, self.b

    def node(self, label: str) -> Node:
        return self.a if label == "a" else self.b

    def peer(self, node: Node) -> Node:
        return self.b if node is self.a else self.a

    def diagnostics(self, lines: int = 20) -> str:
        """Drop counters and log tails of both workers, for failure messages."""
        out = []
        for n in self.nodes:
            try:
                drops = dict(n.dp().stats().drops) if n.worker_alive() else "worker not running"
            except Exception as e:  # the worker may be the thing that broke
                drops = f"GetStats failed: {e!r}"
            out.append(f"{n.worker_id} drops: {drops}")
        return "\n".join(out) + "\n" + self.worker_logs(lines)

    def worker_logs(self, lines: int = 40) -> str:
        """Both workers' log tails, for error messages."""
        return "\n".join(f"--- {n.worker_id} log ---\n{n.worker_log(lines)}" for n in self.nodes)

    def namespaces(self) -> list[str]:
        return [self.a.netns, self.b.netns]

    def _track(self, proc: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
        with self._lock:
            self._procs = [p for p in self._procs if p.poll() is None]
            self._procs.append(proc)
        return proc

    def popen(self, node: Node, *argv: str, **kw: Any) -> subprocess.Popen[bytes]:
        """Start a process inside ``node``'s namespace; it is killed when the lab closes."""
        kw.setdefault("cwd", REPO_ROOT)
        kw.setdefault("env", _child_env())
        return self._track(subprocess.Popen(node.exec_argv(*argv), **kw))  # noqa: S603

    # --- workers ---------------------------------------------------------------------------

    def start_worker(
        self,
        node: Node,
        *,
        timeout: float = WORKER_START_TIMEOUT,
        extra_args: Sequence[str] = (),
    ) -> None:
        """Start ``node``'s worker (with ``extra_args`` appended to its command line) and wait
        until its gRPC API answers ListSAs."""
        from services.dataplane.client import DataplaneClient

        peer = self.peer(node).side
        routes: list[str] = []
        for fam in (4, 6):
            plen = HOST_PREFIX[fam]
            routes += [
                "--route",
                f"{peer.outer(fam)}/{plen}",
                "--route",
                f"{peer.site(fam)}/{plen}",
            ]
        argv = [
            sys.executable,
            "-m",
            "services.dataplane",
            "--worker-id",
            node.worker_id,
            "--grpc-listen",
            f"unix:{node.socket_path}",
            "--tls-dir",
            str(self.pki),
            "--tls-cert-name",
            node.worker_id,
            "--tun",
            TUN_IF,
            "--tun-mtu",
            str(self.tun_mtu),
            *routes,
            "--local-address",
            node.side.outer4,
            "--local-address",
            node.side.outer6,
            "--fwmark",
            str(FWMARK),
            "--table",
            str(ROUTE_TABLE),
            "--metrics-listen",
            f"127.0.0.1:{METRICS_PORT}",
            *extra_args,
        ]
        with node.log_path.open("ab") as log:
            node.proc = subprocess.Popen(  # noqa: S603
                node.exec_argv(*argv),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=REPO_ROOT,
                start_new_session=True,
                env={**_child_env(), "PYTHONUNBUFFERED": "1"},
            )
        node.client = DataplaneClient(
            target=f"unix:{node.socket_path}",
            tls_dir=self.pki,
            server_name=node.worker_id,
            client_name="client",
        )
        deadline = time.monotonic() + timeout
        last_err: Exception | None = None
        while time.monotonic() < deadline:
            if node.proc.poll() is not None:
                raise LabError(
                    f"{node.worker_id} exited with status {node.proc.returncode}; log:\n"
                    f"{node.worker_log()}"
                )
            if node.socket_path.exists():
                try:
                    if node.client.serving():
                        node.client.list_sas()
                        return
                except Exception as e:  # not ready yet: any client error means "retry"
                    last_err = e
            time.sleep(0.1)
        raise LabError(
            f"{node.worker_id} did not answer ListSAs within {timeout:.0f}s ({last_err!r}); "
            f"log:\n{node.worker_log()}"
        )

    def stop_worker(self, node: Node, *, timeout: float = 5.0) -> int | None:
        """SIGTERM the worker (it removes its TUN, routes and rules), SIGKILL if it hangs."""
        if node.client is not None:
            close = getattr(node.client, "close", None)
            if callable(close):
                with contextlib.suppress(Exception):
                    close()
            node.client = None
        proc, node.proc = node.proc, None
        node.installed = []
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        return proc.returncode

    # --- SAs and policy --------------------------------------------------------------------

    def clear_sas(self) -> None:
        """Delete every SA this lab installed (the SPD stays until the next install)."""
        for node in self.nodes:
            if node.client is None:
                continue
            for cfg in node.installed:
                with contextlib.suppress(Exception):
                    node.client.delete_sa(cfg.spi, cfg.dst, cfg.protocol, cfg.direction)
            node.installed = []

    def install(self, sa_set: SaSet) -> None:
        """Replace whatever this lab installed before by ``sa_set`` on both workers."""
        self.clear_sas()
        for node in self.nodes:
            client = node.dp()
            for cfg in sa_set.for_side(node.label):
                client.install_sa(cfg)
                node.installed.append(cfg)
        for node in self.nodes:
            self.replace_spd(node, list(sa_set.spd_for_side(node.label)))

    def install_sas(self, node: Node, configs: Sequence[SaConfig]) -> None:
        """Install single SAs (for tests that stage an SA pair by hand)."""
        for cfg in configs:
            node.dp().install_sa(cfg)
            node.installed.append(cfg)

    def replace_spd(self, node: Node, entries: list[SpdEntry]) -> None:
        node.spd_revision += 1
        node.dp().replace_spd(entries, node.spd_revision)

    # --- traffic (only to addresses inside this lab) ---------------------------------------

    @staticmethod
    def _check_lab_address(*addrs: str) -> None:
        for a in addrs:
            if a not in LAB_ADDRESSES:
                raise LabError(f"{a} is not a lab address; the lab only talks to its own hosts")

    def ping(
        self,
        node: Node,
        dst: str,
        *,
        src: str | None = None,
        count: int = 3,
        interval: float = 0.2,
        deadline: float = 10.0,
    ) -> PingResult:
        """Ping from inside ``node``; ``src`` binds the source (tunnel mode: the site)."""
        self._check_lab_address(dst)
        argv = ["ping", "-n", "-q", "-c", str(count), "-i", str(interval), "-w", str(int(deadline))]
        if src:
            argv += ["-I", src]
        if _family(dst) == 6:
            argv.insert(1, "-6")
        res = node.run(*argv, dst, timeout=deadline + 10, check=False)
        m = re.search(r"(\d+) packets transmitted, (\d+) (?:packets )?received", res.stdout)
        tx, rx = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
        return PingResult(count, tx, rx, (res.stdout + res.stderr).strip())

    def _next_port(self) -> int:
        with self._lock:
            lo, hi = TCP_PORTS
            self._port = lo + (self._port + 1 - lo) % (hi - lo + 1)
            return self._port

    def tcp_transfer(
        self,
        src_node: Node,
        src: str,
        dst_node: Node,
        dst: str,
        nbytes: int,
        *,
        timeout: float = 60.0,
    ) -> TransferResult:
        """Send ``nbytes`` random bytes over TCP from ``src`` (in ``src_node``) to ``dst``
        (in ``dst_node``); both ends compute SHA-256 and the receiver reports its digest back
        over the connection."""
        self._check_lab_address(src, dst)
        port = self._next_port()
        py = [sys.executable, "-m", "services.dataplane.lab"]
        recv = self.popen(
            dst_node,
            *py,
            "tcp-recv",
            "--bind",
            dst,
            "--port",
            str(port),
            "--timeout",
            str(timeout),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            line = _readline(recv, 15.0)
            if not line.startswith("listening"):
                raise LabError(f"receiver did not start: {line!r} {_drain(recv)}")
            t0 = time.monotonic()
            res = _run(
                src_node.exec_argv(
                    *py,
                    "tcp-send",
                    "--source",
                    src,
                    "--connect",
                    dst,
                    "--port",
                    str(port),
                    "--bytes",
                    str(nbytes),
                    "--timeout",
                    str(timeout),
                ),
                timeout=timeout + 15,
                check=False,
            )
            seconds = time.monotonic() - t0
            if res.returncode != 0:
                raise LabError(f"tcp-send failed ({res.returncode}): {res.stderr.strip()}")
            sent = json.loads(res.stdout.strip().splitlines()[-1])
            out, err = recv.communicate(timeout=15)
            if recv.returncode != 0:
                raise LabError(f"tcp-recv failed ({recv.returncode}): {err.decode()}")
            got = json.loads(out.decode().strip().splitlines()[-1])
        finally:
            if recv.poll() is None:
                recv.kill()
                recv.wait()
        if sent["peer_sha256"] != got["sha256"]:
            raise LabError("receiver reported a different digest to the sender than it printed")
        return TransferResult(nbytes, sent["sha256"], got["sha256"], got["bytes"], seconds)

    def capture(self, node: Node, name: str, *, timeout: float = 10.0) -> Capture:
        """Start tcpdump on ``node``'s lab link; returns once tcpdump is capturing."""
        path = self.workdir / f"{name}.pcap"
        proc = self.popen(
            node,
            "tcpdump",
            "-i",
            LINK_IF,
            "-n",
            "-U",
            "-s",
            "0",
            "-Z",
            "root",
            "--immediate-mode",
            "-w",
            str(path),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        cap = Capture(proc, path)
        line = _readline(proc, timeout, stream="stderr")
        if "listening on" not in line:
            cap.stop(settle=0)
            raise LabError(f"tcpdump did not start: {line!r} {cap.stderr}")
        return cap

    @contextlib.contextmanager
    def capturing(self, node: Node, name: str) -> Iterator[Capture]:
        cap = self.capture(node, name)
        try:
            yield cap
        finally:
            cap.stop()

    def inject(self, node: Node, frame: bytes, *, iface: str = LINK_IF) -> None:
        """Send one raw Ethernet frame out of ``node``'s lab link (AF_PACKET)."""
        py = [sys.executable, "-m", "services.dataplane.lab"]
        node.run(*py, "inject", "--iface", iface, "--hex", frame.hex(), timeout=20)

    # --- teardown --------------------------------------------------------------------------

    def close(self) -> None:
        """Stop everything and delete the namespaces. Safe to call more than once."""
        for node in self.nodes:
            with contextlib.suppress(Exception):
                self.stop_worker(node)
        with self._lock:
            procs, self._procs = self._procs, []
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                with contextlib.suppress(Exception):
                    p.wait(timeout=5)
        for ns in self.namespaces():
            with contextlib.suppress(Exception):
                _delete_namespace(ns)


def _readline(proc: subprocess.Popen[bytes], timeout: float, *, stream: str = "stdout") -> str:
    """One line from a child's pipe, or '' after ``timeout`` / EOF."""
    pipe = proc.stdout if stream == "stdout" else proc.stderr
    assert pipe is not None
    fd = pipe.fileno()
    buf = b""
    deadline = time.monotonic() + timeout
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            break
        chunk = os.read(fd, 1)
        if not chunk:
            break
        buf += chunk
    return buf.decode(errors="replace").strip()


def _drain(proc: subprocess.Popen[bytes]) -> str:
    if proc.poll() is None:
        proc.kill()
    try:
        out, err = proc.communicate(timeout=5)
    except Exception:
        return ""
    return (out or b"").decode(errors="replace") + (err or b"").decode(errors="replace")


def _setup_host(ns: str, side: Side, *, sites: bool) -> None:
    sysctls = [
        "net.ipv4.conf.all.rp_filter=0",
        "net.ipv4.conf.default.rp_filter=0",
        f"net.ipv4.conf.{LINK_IF}.rp_filter=0",
        "net.ipv4.conf.lo.rp_filter=0",
        "net.ipv6.conf.all.accept_dad=0",
        "net.ipv6.conf.default.accept_dad=0",
        "net.ipv6.conf.all.disable_ipv6=0",
        "net.ipv6.conf.default.disable_ipv6=0",
    ]
    _run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", *sysctls])
    cmds = [
        "link set lo up",
        f"addr add {side.outer4}/{LINK_PREFIX[4]} dev {LINK_IF}",
        f"addr add {side.outer6}/{LINK_PREFIX[6]} dev {LINK_IF} nodad",
        f"link set {LINK_IF} up",
    ]
    if sites:
        cmds += [f"addr add {side.site4}/32 dev lo", f"addr add {side.site6}/128 dev lo"]
    _run(["ip", "-n", ns, "-batch", "-"], input_text="\n".join(cmds) + "\n")


def _wait_link(lab_: Lab, timeout: float = 10.0) -> None:
    """Plain reachability over the veth before any worker owns routes."""
    deadline = time.monotonic() + timeout
    while True:
        r4 = lab_.a.run("ping", "-n", "-q", "-c", "1", "-W", "1", SIDE_B.outer4, check=False)
        r6 = lab_.a.run("ping", "-6", "-n", "-q", "-c", "1", "-W", "1", SIDE_B.outer6, check=False)
        if r4.returncode == 0 and r6.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise LabError(f"veth link not up:\n{r4.stdout}{r6.stdout}")
        time.sleep(0.2)


def _make_pki(outdir: Path) -> None:
    res = _run(
        [
            sys.executable,
            "-m",
            "services.runtime.devpki",
            str(outdir),
            "--names",
            "worker-a,worker-b,client",
        ],
        timeout=60,
        check=False,
    )
    if res.returncode != 0:
        raise LabError(f"devpki failed: {res.stderr.strip()}")


class Terminated(BaseException):
    """SIGTERM turned into an exception so that cleanup runs."""


@contextlib.contextmanager
def _sigterm_as_exception() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise Terminated(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextlib.contextmanager
def lab(
    *,
    workers: bool = True,
    sites: bool = True,
    prefix: str = DEFAULT_PREFIX,
    tun_mtu: int = DEFAULT_TUN_MTU,
    keep_workdir: bool = False,
) -> Iterator[Lab]:
    """Build the two-namespace lab, start a worker in each, yield it, always tear it down.

    Teardown kills the workers and any process started through the lab, deletes both
    namespaces and removes the temporary directory (pcaps, logs, PKI) unless
    ``keep_workdir``. It also runs on KeyboardInterrupt and, in the main thread, SIGTERM.
    """
    ok, why = netns_supported()
    if not ok:
        raise LabError(why)
    cleanup_stale(prefix)
    tag = f"{prefix}-{os.getpid()}-{secrets.token_hex(3)}"
    workdir = Path(tempfile.mkdtemp(prefix=f"{tag}-"))
    nodes = [
        Node(
            side,
            f"{tag}-{side.label}",
            f"worker-{side.label}",
            workdir / f"worker-{side.label}.sock",
            workdir / f"worker-{side.label}.log",
        )
        for side in (SIDE_A, SIDE_B)
    ]
    the_lab = Lab(workdir, nodes[0], nodes[1], tun_mtu=tun_mtu)
    with _sigterm_as_exception():
        try:
            for n in nodes:
                _run(["ip", "netns", "add", n.netns])
            _run(
                [
                    "ip",
                    "-n",
                    nodes[0].netns,
                    "link",
                    "add",
                    LINK_IF,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    LINK_IF,
                    "netns",
                    nodes[1].netns,
                ]
            )
            for n in nodes:
                _setup_host(n.netns, n.side, sites=sites)
            _wait_link(the_lab)
            if workers:
                _make_pki(the_lab.pki)
                for n in nodes:
                    the_lab.start_worker(n)
            yield the_lab
        finally:
            the_lab.close()
            if keep_workdir:
                kept = workdir.with_name(f"{prefix}-kept-{workdir.name[len(prefix) + 1 :]}")
                with contextlib.suppress(OSError):
                    workdir.rename(kept)
                    workdir = kept
                print(f"lab files kept in {workdir}", file=sys.stderr)
            else:
                shutil.rmtree(workdir, ignore_errors=True)


# --- in-namespace helpers (python -m services.dataplane.lab ...) ----------------------------

CHUNK = 64 * 1024


def _tcp_recv(bind: str, port: int, timeout: float) -> int:
    fam = socket.AF_INET6 if _family(bind) == 6 else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as srv:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((bind, port))
        srv.listen(1)
        srv.settimeout(timeout)
        print("listening", flush=True)
        conn, _ = srv.accept()
        with conn:
            conn.settimeout(timeout)
            h = hashlib.sha256()
            n = 0
            while True:
                data = conn.recv(CHUNK)
                if not data:
                    break
                h.update(data)
                n += len(data)
            digest = h.hexdigest()
            conn.sendall(json.dumps({"bytes": n, "sha256": digest}).encode() + b"\n")
    print(json.dumps({"bytes": n, "sha256": digest}), flush=True)
    return 0


def _tcp_send(source: str, connect: str, port: int, nbytes: int, timeout: float) -> int:
    fam = socket.AF_INET6 if _family(connect) == 6 else socket.AF_INET
    h = hashlib.sha256()
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.bind((source, 0))
        s.connect((connect, port))
        left = nbytes
        while left:
            data = os.urandom(min(CHUNK, left))
            h.update(data)
            s.sendall(data)
            left -= len(data)
        s.shutdown(socket.SHUT_WR)
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            reply += chunk
    peer = json.loads(reply.decode()) if reply else {}
    digest = h.hexdigest()
    print(
        json.dumps(
            {
                "bytes": nbytes,
                "sha256": digest,
                "peer_sha256": peer.get("sha256"),
                "peer_bytes": peer.get("bytes"),
            }
        ),
        flush=True,
    )
    return 0 if peer.get("sha256") == digest and peer.get("bytes") == nbytes else 1


def _inject(iface: str, frame: bytes) -> int:
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
        s.bind((iface, 0))
        s.send(frame)
    return 0


def _up(args: argparse.Namespace) -> int:
    profile = SaProfile(mode=Mode[args.mode.upper()], family=args.family, encap=Encap(args.encap))
    with lab(keep_workdir=args.keep) as lb:
        sa_set = make_sa_set(profile)
        lb.install(sa_set)
        a_addr, b_addr = sa_set.addresses()
        print(f"lab up: {profile.label()}  A={lb.a.netns}  B={lb.b.netns}  dir={lb.workdir}")
        print(f"  try: ip netns exec {lb.a.netns} ping -I {a_addr} {b_addr}")
        print("Ctrl-C to tear down")
        with contextlib.suppress(KeyboardInterrupt):
            while lb.a.worker_alive() and lb.b.worker_alive():
                time.sleep(1)
    return 0


def _readline_text(proc: subprocess.Popen[str], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return proc.stdout.readline()
        line = proc.stdout.readline()
        if line:
            return line
    return ""


def ns_tcp_sha256(
    ns_src: str, src: str, ns_dst: str, dst: str, nbytes: int = 1 << 20, timeout: float = 60.0
) -> tuple[str, str, int]:
    """Send ``nbytes`` random octets over TCP from ``src`` (in namespace ``ns_src``) to
    ``dst`` (in ``ns_dst``) with the ``tcp-send`` / ``tcp-recv`` commands of this module; both
    ends hash what they saw. Returns (sender's sha256, receiver's sha256, bytes received)."""
    port = 20000 + secrets.randbelow(20000)
    labcmd = [sys.executable, "-m", "services.dataplane.lab"]
    recv_cmd = ["ip", "netns", "exec", ns_dst, *labcmd, "tcp-recv", "--bind", dst]
    recv_cmd += ["--port", str(port), "--timeout", str(timeout)]
    send_cmd = [
        "ip",
        "netns",
        "exec",
        ns_src,
        *labcmd,
        "tcp-send",
        "--source",
        src,
        "--connect",
        dst,
    ]
    send_cmd += ["--port", str(port), "--bytes", str(nbytes), "--timeout", str(timeout)]
    recv = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
        recv_cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
        env=_child_env(),
    )
    try:
        line = _readline_text(recv, 15.0)
        if not line.startswith("listening"):
            raise LabError(f"tcp-recv did not start: {line!r}")
        send = subprocess.run(  # noqa: S603 - fixed argv, no shell
            send_cmd,
            capture_output=True,
            text=True,
            cwd=REPO_ROOT,
            env=_child_env(),
            timeout=timeout + 15,
            check=False,
        )
        if send.returncode != 0:
            raise LabError(f"tcp-send failed ({send.returncode}): {send.stderr[-500:]}")
        sent = json.loads(send.stdout.strip().splitlines()[-1])
        out, err = recv.communicate(timeout=15)
        if recv.returncode != 0:
            raise LabError(f"tcp-recv failed ({recv.returncode}): {err[-500:]}")
        got = json.loads(out.strip().splitlines()[-1])
    finally:
        if recv.poll() is None:
            recv.kill()
            recv.wait()
    return str(sent["sha256"]), str(got["sha256"]), int(got["bytes"])


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m services.dataplane.lab",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("tcp-recv", help="receive one TCP stream, print its size and SHA-256")
    r.add_argument("--bind", required=True)
    r.add_argument("--port", type=int, required=True)
    r.add_argument("--timeout", type=float, default=60.0)
    s = sub.add_parser("tcp-send", help="send random bytes over TCP, print SHA-256s")
    s.add_argument("--source", required=True)
    s.add_argument("--connect", required=True)
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--bytes", type=int, required=True)
    s.add_argument("--timeout", type=float, default=60.0)
    i = sub.add_parser("inject", help="send one raw Ethernet frame (hex) out of an interface")
    i.add_argument("--iface", default=LINK_IF)
    i.add_argument("--hex", required=True)
    u = sub.add_parser("up", help="build the lab with one SA set and wait for Ctrl-C")
    u.add_argument("--mode", choices=["transport", "tunnel"], default="tunnel")
    u.add_argument("--family", type=int, choices=[4, 6], default=4)
    u.add_argument("--encap", choices=[e.value for e in Encap], default=Encap.ESP.value)
    u.add_argument("--keep", action="store_true", help="keep logs and PKI afterwards")
    c = sub.add_parser("cleanup", help="delete lab namespaces whose creator is gone")
    c.add_argument("--prefix", default=DEFAULT_PREFIX)
    args = p.parse_args(argv)
    if args.cmd == "tcp-recv":
        return _tcp_recv(args.bind, args.port, args.timeout)
    if args.cmd == "tcp-send":
        return _tcp_send(args.source, args.connect, args.port, args.bytes, args.timeout)
    if args.cmd == "inject":
        return _inject(args.iface, bytes.fromhex(args.hex))
    if args.cmd == "up":
        return _up(args)
    removed = cleanup_stale(args.prefix)
    print("\n".join(removed) if removed else "nothing to clean up")
    return 0


if __name__ == "__main__":
    sys.exit(main())
