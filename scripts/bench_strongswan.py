"""Reference throughput: strongSwan 5.9.8 (userspace ESP, kernel-libipsec) in two namespaces.

An independent baseline for our dataplane numbers (see /work/shared/notes/ORACLES.md): two
network namespaces joined by a veth pair (192.0.2.1/24 <-> 192.0.2.2/24), one charon per
namespace with its own strongswan.conf, swanctl.conf, private /run and private vici socket,
IKEv2 PSK with aes256gcm16-prfsha256-x25519, ESP aes256gcm16 in tunnel mode between
198.51.100.1/32 (on ``lo`` of A) and 203.0.113.1/32 (on ``lo`` of B). After one ping through the
tunnel, iperf3 TCP runs from A to B and the receiver's bits_per_second is reported.

The kernel here has no XFRM ESP, so charon uses the ``kernel-libipsec`` plugin (a TUN device
``ipsec0``, ESP always inside UDP 4500). Needs root. ``strongswan_throughput`` installs nothing;
running this file as a script installs the Debian packages first if they are missing.

Everything created (namespaces, daemons, iperf3, temporary directory) is removed in a
``finally`` block, also on failure. Traffic only goes to addresses inside the namespaces
created here.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

CHARON = pathlib.Path("/usr/lib/ipsec/charon")
LABEL = "strongSwan 5.9.8 kernel-libipsec"
APT_PACKAGES = (
    "strongswan-charon",
    "strongswan-swanctl",
    "libcharon-extra-plugins",
    "libstrongswan-extra-plugins",
    "libstrongswan-standard-plugins",
    "iperf3",
)
# Without kdf the IKEv2 key derivation fails ("KDF_PRF ... not supported") on 5.9.8.
PLUGINS = (
    "random nonce kdf openssl pem pkcs1 pkcs8 x509 revocation constraints pubkey curve25519 "
    "gmp hmac sha1 sha2 aes gcm kernel-libipsec kernel-netlink socket-default vici updown"
)
OUTER_A, OUTER_B = "192.0.2.1", "192.0.2.2"
INNER_A, INNER_B = "198.51.100.1", "203.0.113.1"
IKE_PROPOSAL = "aes256gcm16-prfsha256-x25519"
ESP_PROPOSAL = "aes256gcm16"
CONN = "bench"


class BenchError(RuntimeError):
    """A step of the benchmark failed; the message is reported in the result row."""


def _run(
    cmd: list[str], timeout: float = 30.0, check: bool = True
) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"timeout after {timeout:.0f} s: {' '.join(cmd)}") from exc
    if check and proc.returncode != 0:
        err = (proc.stderr or proc.stdout).strip().splitlines()
        raise BenchError(
            f"{' '.join(cmd[:6])} ... exit {proc.returncode}: {err[-1] if err else ''}"
        )
    return proc


def _missing_tools() -> list[str]:
    missing = [] if os.access(CHARON, os.X_OK) else [str(CHARON)]
    missing += [tool for tool in ("swanctl", "iperf3") if shutil.which(tool) is None]
    return missing


def _strongswan_version() -> str:
    try:
        out = _run([str(CHARON), "--version"], timeout=10).stdout.split()
    except (BenchError, OSError):
        return "?"
    return out[-1] if out else "?"


def _strongswan_conf(workdir: pathlib.Path, name: str, extra: str = "") -> str:
    """strongswan.conf of one benchmark charon; ``extra`` holds more settings of the
    ``charon`` section (one per line, e.g. ``cookie_threshold = 1000``)."""
    return f"""# private config of the benchmark's charon {name}; no include of /etc/strongswan.d
charon {{
    load = {PLUGINS}
{extra}    filelog {{
        {name} {{
            path = {workdir}/charon-{name}.log
            time_format = %T
            default = 1
            ike_name = yes
            flush_line = yes
        }}
    }}
    syslog {{
        identifier = charon-{name}
    }}
    plugins {{
        vici {{
            socket = unix://{workdir}/charon-{name}.vici
        }}
    }}
}}
"""


def swanctl_conf(local: str, remote: str, local_ts: str, remote_ts: str, psk: str) -> str:
    return f"""connections {{
    {CONN} {{
        version = 2
        local_addrs = {local}
        remote_addrs = {remote}
        proposals = {IKE_PROPOSAL}
        local {{
            auth = psk
            id = {local}
        }}
        remote {{
            auth = psk
            id = {remote}
        }}
        children {{
            {CONN} {{
                mode = tunnel
                local_ts = {local_ts}/32
                remote_ts = {remote_ts}/32
                esp_proposals = {ESP_PROPOSAL}
                start_action = none
            }}
        }}
    }}
}}
secrets {{
    ike-{CONN} {{
        id-a = {OUTER_A}
        id-b = {OUTER_B}
        secret = 0x{psk}
    }}
}}
"""


class StrongSwanPair:
    """State of one run, so that cleanup knows exactly what was created."""

    def __init__(self) -> None:
        tag = secrets.token_hex(4)
        self.ns_a = f"bsw{tag}a"
        self.ns_b = f"bsw{tag}b"
        self.created_ns: list[str] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self.workdir = pathlib.Path(tempfile.mkdtemp(prefix="bsw-"))
        self.psk = secrets.token_hex(32)

    # -- topology -----------------------------------------------------------------------------

    def netns(self) -> None:
        for ns in (self.ns_a, self.ns_b):
            _run(["ip", "netns", "add", ns])
            self.created_ns.append(ns)
        # Created inside ns A and the peer moved to ns B: no name on the host can clash.
        veth = "link add veth0 type veth peer name veth0 netns".split()
        _run(["ip", "-n", self.ns_a, *veth, self.ns_b])
        for ns, outer, inner in ((self.ns_a, OUTER_A, INNER_A), (self.ns_b, OUTER_B, INNER_B)):
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
            _run(["ip", "-n", ns, "addr", "add", f"{inner}/32", "dev", "lo"])
            _run(["ip", "-n", ns, "addr", "add", f"{outer}/24", "dev", "veth0"])
            _run(["ip", "-n", ns, "link", "set", "veth0", "up"])
        # Fail fast if the veth does not carry traffic (outer addresses only, own namespaces).
        for _ in range(20):
            ping = ["ip", "netns", "exec", self.ns_a, "ping", "-c1", "-W1", OUTER_B]
            if _run(ping, check=False).returncode == 0:
                return
            time.sleep(0.1)
        raise BenchError("veth between the namespaces does not pass traffic")

    # -- daemons ------------------------------------------------------------------------------

    def _popen(self, cmd: list[str], log: pathlib.Path) -> subprocess.Popen[bytes]:
        with log.open("wb") as out:
            proc = subprocess.Popen(  # own session: the whole group can be signalled
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    def vici(self, name: str) -> str:
        return f"unix://{self.workdir}/charon-{name}.vici"

    def swanctl(self, name: str, *args: str, timeout: float = 30.0) -> str:
        return _run(["swanctl", *args, "--uri", self.vici(name)], timeout=timeout).stdout

    def start_charon(
        self, name: str, ns: str, conf: str, extra: str = ""
    ) -> subprocess.Popen[bytes]:
        d = self.workdir / name
        (d / "swanctl").mkdir(parents=True)
        (d / "strongswan.conf").write_text(_strongswan_conf(self.workdir, name, extra))
        (d / "swanctl" / "swanctl.conf").write_text(conf)
        (d / "swanctl" / "swanctl.conf").chmod(0o600)
        # Private /run (pid file) and /etc/swanctl so two daemons never share either.
        inner = (
            f"mount -t tmpfs tmpfs /run && "
            f"mount --bind {shlex.quote(str(d / 'swanctl'))} /etc/swanctl && exec {CHARON}"
        )
        env = f"STRONGSWAN_CONF={d / 'strongswan.conf'}"
        cmd = ["ip", "netns", "exec", ns, "env", env, "unshare", "-m", "--propagation", "private"]
        cmd += ["sh", "-c", inner]
        return self._popen(cmd, self.workdir / f"charon-{name}.out")

    def wait_vici(self, name: str, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise BenchError(
                    f"charon {name} exited with {proc.returncode}{self.log_tail(name)}"
                )
            if (self.workdir / f"charon-{name}.vici").exists():
                ok = _run(["swanctl", "--stats", "--uri", self.vici(name)], timeout=5, check=False)
                if ok.returncode == 0:
                    return
            time.sleep(0.1)
        raise BenchError(f"charon {name}: vici socket not ready after {timeout:.0f} s")

    def log_tail(self, name: str, lines: int = 3) -> str:
        for path in (self.workdir / f"charon-{name}.log", self.workdir / f"charon-{name}.out"):
            with contextlib.suppress(OSError):
                text = path.read_text(errors="replace").strip().splitlines()
                if text:
                    return " | " + " / ".join(t.strip() for t in text[-lines:])
        return ""

    def wait_child_installed(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            outs = [self.swanctl(n, "--list-sas", "--child", CONN) for n in ("a", "b")]
            if all("INSTALLED" in out for out in outs):
                return
            time.sleep(0.2)
        raise BenchError(f"CHILD_SA not installed on both peers{self.log_tail('a')}")

    # -- measurement --------------------------------------------------------------------------

    def ping_through_tunnel(self) -> None:
        for _ in range(5):
            cmd = ["ip", "netns", "exec", self.ns_a, "ping", "-c1", "-W2", "-I", INNER_A, INNER_B]
            if _run(cmd, timeout=10, check=False).returncode == 0:
                return
        raise BenchError(f"ping {INNER_A} -> {INNER_B} through the tunnel failed")

    def iperf3(self, seconds: int) -> float:
        server = self._popen(
            ["ip", "netns", "exec", self.ns_b, "iperf3", "-s", "-1", "-B", INNER_B],
            self.workdir / "iperf3-server.out",
        )
        client = ["ip", "netns", "exec", self.ns_a, "iperf3", "-c", INNER_B, "-B", INNER_A]
        client += ["-t", str(seconds), "-J"]
        proc = None
        for _ in range(30):  # the server needs a moment to listen
            if server.poll() is not None:
                raise BenchError(f"iperf3 server exited with {server.returncode}")
            proc = _run(client, timeout=seconds + 30, check=False)
            if proc.returncode == 0 or "connection refused" not in proc.stdout.lower():
                break
            time.sleep(0.2)
        assert proc is not None
        try:
            result = json.loads(proc.stdout)
        except json.JSONDecodeError as exc:
            raise BenchError(f"iperf3 output is not JSON (exit {proc.returncode})") from exc
        if "error" in result:
            raise BenchError(f"iperf3: {result['error']}")
        try:
            return float(result["end"]["sum_received"]["bits_per_second"])
        except (KeyError, TypeError, ValueError) as exc:
            raise BenchError("iperf3 JSON has no end.sum_received.bits_per_second") from exc

    # -- cleanup ------------------------------------------------------------------------------

    def cleanup(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=5)
        for ns in reversed(self.created_ns):
            with contextlib.suppress(BenchError, OSError):
                _run(["ip", "netns", "del", ns], timeout=15, check=False)
        shutil.rmtree(self.workdir, ignore_errors=True)


def strongswan_throughput(seconds: int = 5) -> list[tuple[str, str]]:
    """iperf3 TCP throughput through a strongSwan-to-strongSwan tunnel, as ``(setup, value)``.

    Returns ``(LABEL, "(not installed)")`` if charon, swanctl or iperf3 are missing, and a
    ``"(failed: reason)"`` value if any step fails. Always removes what it created.
    """
    if _missing_tools():
        return [(LABEL, "(not installed)")]
    version = _strongswan_version()
    name = f"strongSwan {version} kernel-libipsec, tunnel, AES-GCM-256"
    if os.geteuid() != 0:
        return [(name, "(failed: needs root for network namespaces)")]
    bench = StrongSwanPair()
    try:
        bench.netns()
        charons = {
            "a": bench.start_charon(
                "a", bench.ns_a, swanctl_conf(OUTER_A, OUTER_B, INNER_A, INNER_B, bench.psk)
            ),
            "b": bench.start_charon(
                "b", bench.ns_b, swanctl_conf(OUTER_B, OUTER_A, INNER_B, INNER_A, bench.psk)
            ),
        }
        for n, proc in charons.items():
            bench.wait_vici(n, proc)
            conf = bench.workdir / n / "swanctl" / "swanctl.conf"
            bench.swanctl(n, "--load-all", "--noprompt", "--file", str(conf))
        try:
            bench.swanctl("a", "--initiate", "--child", CONN, "--timeout", "20", timeout=30)
        except BenchError as exc:
            raise BenchError(f"initiate failed: {exc}{bench.log_tail('a')}") from exc
        bench.wait_child_installed()
        bench.ping_through_tunnel()
        bps = bench.iperf3(seconds)
        return [(name, f"{bps / 1e9:.2f} Gbit/s")]
    except (BenchError, OSError) as exc:
        return [(name, f"(failed: {exc})")]
    finally:
        bench.cleanup()


# -- script entry: install packages, keep system-wide strongSwan services off ------------------


def _install_packages() -> None:
    missing = [
        p
        for p in APT_PACKAGES
        if subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", p], capture_output=True, text=True, check=False
        ).stdout.strip()
        != "install ok installed"
    ]
    if not missing:
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
    if subprocess.run(cmd, env=env, check=False).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, check=True)
        subprocess.run(cmd, env=env, check=True)


def _stop_system_strongswan() -> None:
    """Stop and disable a system-wide strongSwan the package install may have started."""
    if pathlib.Path("/run/systemd/system").is_dir():  # systemd is PID 1
        for unit in ("strongswan-starter.service", "strongswan.service"):
            active = subprocess.run(
                ["systemctl", "is-active", "--quiet", unit], capture_output=True, check=False
            )
            if active.returncode == 0:
                print(f"stopping and disabling system-wide {unit}", file=sys.stderr)
                subprocess.run(["systemctl", "disable", "--now", unit], check=False)
        return
    # No systemd: nothing is started on install, but a sysv-started daemon would show a pid file.
    for pidfile in ("/run/starter.charon.pid", "/run/charon.pid"):
        with contextlib.suppress(OSError, ValueError):
            pid = int(pathlib.Path(pidfile).read_text().strip())
            os.kill(pid, 0)
            if shutil.which("ipsec"):
                print(f"stopping system-wide strongSwan (pid {pid})", file=sys.stderr)
                subprocess.run(["ipsec", "stop"], check=False, capture_output=True)
            break


def main() -> int:
    if os.geteuid() != 0:
        print("run as root (network namespaces, apt-get)", file=sys.stderr)
        return 1
    _install_packages()
    _stop_system_strongswan()
    rows = strongswan_throughput()
    for setup, value in rows:
        print(f"{setup}: {value}")
    return 0 if all(not v.startswith("(") for _, v in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
