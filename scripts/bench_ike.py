"""IKEv2 handshakes per second: keymgr (behind our dataplane worker) vs strongSwan's charon.

Topology (docs/lab.md, the helpers of scripts/bench_strongswan.py): two network namespaces
joined by a veth, the responder at 192.0.2.1 in namespace A, the load generator at 192.0.2.2
in namespace B. The responder is either

* keymgr with one ``start_action: respond`` connection, reaching our dataplane worker in A over
  mTLS gRPC (IKE is punted and injected through the worker, Child SAs are installed into it), as
  in tests/netns/test_keymgr_responder_strongswan.py; or
* charon 5.9.8 with kernel-libipsec (Child SAs installed into its userspace ESP).

Both use the same PSK, IKE proposal aes256gcm16-prfsha256-x25519, ESP aes256gcm16 and traffic
selectors 198.51.100.1/32 <-> 203.0.113.1/32.

The load generator (``generate``, run in namespace B as a child process) is the project's own
sans-IO :class:`~services.core.ike.exchange.Ikev2Initiator` in a non-blocking UDP loop: it keeps
``window`` handshakes in flight, each a fresh IKE SA with its own SPI, all from 192.0.2.2 UDP
500 (IKE_SA_INIT) and 4500 (IKE_AUTH after the NAT-D float, with the non-ESP marker). Both
responders key their state by the IKE SPIs, so one address and port pair suffices. Each slot
runs IKE_SA_INIT, IKE_AUTH, then an INFORMATIONAL Delete of the IKE SA; a new handshake starts
in the slot once the Delete is answered. So neither responder accumulates SAs and both do the
same work per handshake (create and install a Child SA, then remove it). The figure reported is
the number of IKE_AUTH responses that completed an IKE SA per second of the measurement window
(after a warm-up); the generator's own CPU time over that window and the responder's (keymgr +
worker, or charon) are reported beside it.

Half-open limits: keymgr refuses IKE_SA_INIT beyond ``MAX_HALF_OPEN`` (64) half-open SAs and
by default answers with COOKIEs from 10 half-open SAs on (``--cookie-threshold``); charon by
default asks for COOKIEs above 10 half-open SAs (``cookie_threshold``) and drops requests
above 5 half-open SAs per peer address (``block_threshold``). The window (default 16) stays
below keymgr's bound, and both responders get their cookie thresholds (and charon its block
threshold) raised so that no limit is what is measured. Larger windows did not raise either
rate on the 2-core development machine (4 s trials on 2026-11-23: charon 424/s at 32 and
531/s at 48 against 451-694/s at 16; keymgr 108/s at 48 against 112-115/s at 16), so the
window is not what limits the measured rates there.

The keymgr lab leaves out the interop tests' IKE capture and key export (a tcpdump beside
the responder would be measured too).

Run alone (as root): ``python scripts/bench_ike.py``. Everything created (namespaces, daemons,
temporary directories) is removed also on failure.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import pstats
import secrets
import select
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

IKE_HEADING = "## IKEv2 handshakes per second: keymgr vs strongSwan's charon"
WINDOW = 16
WARMUP = 3.0
DURATION = 10.0
ROUNDS = 3
DELETE_RETRY = 1.0  # seconds before the generator resends an unanswered Delete
DELETE_TRIES = 4
# charon's defaults would ask for COOKIEs / drop requests long before the window is reached
CHARON_LIMITS = """    cookie_threshold = 100000
    cookie_threshold_ip = 100000
    block_threshold = 100000
    init_limit_half_open = 0
"""
KEYMGR_LOG_LEVEL = "info"  # keymgr's default; charon logs at its filelog default (level 1)
# keymgr's default (10) would answer part of the window with COOKIEs: raised like charon's
KEYMGR_COOKIE_THRESHOLD = "100000"


# --- pure helpers (tests/unit/test_bench_ike.py) ---------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunResult:
    """One measurement against one responder."""

    responder: str
    completed: int  # IKE_AUTH responses that established an IKE SA inside the window
    seconds: float  # length of the measurement window
    failed: int = 0
    gen_cpu_s: float = 0.0  # generator process CPU (user + system) over the window
    resp_cpu: tuple[tuple[str, float], ...] = ()  # (process, CPU seconds) over the window
    latency_ms: tuple[float, float] = (0.0, 0.0)  # median and 95th percentile, start -> AUTH
    error: str = ""
    # keymgr's ApplySAs calls: count, mean and longest ms from sending to handling the answer
    apply_ms: tuple[int, float, float] = (0, 0.0, 0.0)
    # ApplySAs calls sent (batches of one main-loop turn share one); 0: not logged
    apply_calls: int = 0

    @property
    def rate(self) -> float:
        return self.completed / self.seconds if self.seconds > 0 else 0.0


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) by nearest rank; 0.0 for no values."""
    if not values:
        return 0.0
    if not 0.0 <= q <= 1.0:
        raise ValueError("q must be within 0..1")
    ordered = sorted(values)
    rank = max(1, -(-q * len(ordered) // 1))  # ceil(q * n), at least 1
    return ordered[int(rank) - 1]


def cpu_share(cpu_s: float, wall_s: float) -> str:
    """CPU seconds over a wall-clock window as a percentage of one core ("97%")."""
    if wall_s <= 0:
        return "-"
    return f"{100.0 * cpu_s / wall_s:.0f}%"


def parse_proc_stat(text: str) -> tuple[int, int]:
    """(session id, utime + stime in clock ticks) from the text of /proc/PID/stat.

    The command name (field 2) may hold spaces and parentheses; fields after the last ')'
    start with the state (field 3). Raises ValueError on malformed text.
    """
    end = text.rfind(")")
    if end < 0:
        raise ValueError("no command name in /proc stat")
    rest = text[end + 1 :].split()
    if len(rest) < 13:
        raise ValueError("short /proc stat")
    # rest[0] is field 3 (state): session is field 6, utime 14, stime 15
    return int(rest[3]), int(rest[11]) + int(rest[12])


def summarize(results: Iterable[RunResult]) -> dict[str, float]:
    """Median rate per responder over the rounds that did not fail."""
    by: dict[str, list[float]] = {}
    for r in results:
        if not r.error:
            by.setdefault(r.responder, []).append(r.rate)
    return {k: statistics.median(v) for k, v in by.items()}


def format_section(
    results: Sequence[RunResult],
    *,
    date: str,
    machine: str,
    window: int,
    warmup: float,
    duration: float,
    notes: Sequence[str] = (),
) -> list[str]:
    """The markdown section for docs/benchmarks.md."""
    lines = [
        IKE_HEADING,
        "",
        f"Run on {date}; machine: {machine}.",
        "",
        "Two namespaces joined by a veth; the responder at 192.0.2.1 is either keymgr "
        "(`start_action: respond`) behind one of our dataplane workers (IKE punted and "
        "injected over the worker's gRPC stream, Child SAs installed into the worker) or "
        "charon 5.9.8 with kernel-libipsec. Same PSK, IKE aes256gcm16-prfsha256-x25519, ESP "
        "aes256gcm16, traffic selectors 198.51.100.1/32 <-> 203.0.113.1/32. The load generator "
        "in the other namespace is our own sans-IO IKEv2 initiator in a single-threaded UDP "
        f"loop with {window} handshakes in flight, each a fresh IKE SA (own SPI) from "
        "192.0.2.2 port 500, then 4500 after the NAT-D float. Each handshake is followed by an "
        "INFORMATIONAL Delete of the IKE SA, and its slot starts the next handshake once the "
        "Delete is answered, so no responder accumulates SAs and both install and remove one "
        "Child SA per handshake. Rate = IKE_AUTH responses that established an IKE SA per "
        f"second over {duration:.0f} s after a {warmup:.0f} s warm-up; rounds alternate between "
        "the responders, each round with freshly started daemons. CPU columns are the share "
        "of one core used during the window by the generator and by the responder (keymgr + "
        "worker, or charon); a generator near 100% means the generator, not the responder, "
        "was the limit.",
        "",
        "| round | responder | handshakes/s | failed | latency median / p95 (ms) "
        "| generator CPU | responder CPU |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    rounds: dict[str, int] = {}
    for r in results:
        rounds[r.responder] = rounds.get(r.responder, 0) + 1
        n = rounds[r.responder]
        if r.error:
            why = " ".join(r.error.split()).replace("|", "/")
            lines.append(f"| {n} | {r.responder} | (failed: {why}) | | | | |")
            continue
        lines.append(
            f"| {n} | {r.responder} | {r.rate:.0f} | {r.failed} | "
            f"{r.latency_ms[0]:.1f} / {r.latency_ms[1]:.1f} | "
            f"{cpu_share(r.gen_cpu_s, r.seconds)} | "
            + " + ".join(f"{name} {cpu_share(c, r.seconds)}" for name, c in r.resp_cpu)
            + " |"
        )
    med = summarize(results)
    if med:
        lines += [
            "",
            "Median over the rounds: " + ", ".join(f"{k} {v:.0f}/s" for k, v in med.items()),
        ]
        km = [v for k, v in med.items() if k.startswith("keymgr")]
        sw = [v for k, v in med.items() if k.startswith("charon")]
        if km and sw:
            verdict = "met" if km[0] >= sw[0] else "NOT met"
            lines[-1] += f". Goal keymgr >= charon: {verdict} (ratio {km[0] / sw[0]:.2f})."
    for note in notes:
        lines += ["", note]
    return lines


# --- the load generator (runs inside the generator's namespace) -----------------------------


@dataclasses.dataclass
class _Slot:
    ini: Any  # Ikev2Initiator
    started: float
    deleting: bool = False
    delete_at: float = 0.0
    delete_tries: int = 0


def generate(cfg: dict[str, Any]) -> dict[str, Any]:
    """Drive handshakes against cfg["remote"] for warmup + duration seconds; return counts.

    Prints "measure-start" and "measure-end" on stdout (flushed) at the window's edges, so the
    parent can sample the responder's CPU at the same moments.
    """
    from services.core.ike.exchange import (
        NAT_T_PORT,
        NON_ESP_MARKER,
        Ikev2Initiator,
        InitiatorConfig,
        State,
    )

    local, remote = cfg["local"], cfg["remote"]
    icfg = InitiatorConfig(
        local_addr=local,
        remote_addr=remote,
        psk=bytes.fromhex(cfg["psk"]),
        ts_local=(cfg["ts_local"], cfg["ts_local"]),
        ts_remote=(cfg["ts_remote"], cfg["ts_remote"]),
    )
    window, warmup, duration = int(cfg["window"]), float(cfg["warmup"]), float(cfg["duration"])
    socks = {}
    for port in (500, NAT_T_PORT):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
        s.bind((local, port))
        s.setblocking(False)
        socks[port] = s
    by_fd = {s.fileno(): (port, s) for port, s in socks.items()}
    slots: dict[bytes, _Slot] = {}
    failures: Counter[str] = Counter()
    latencies: list[float] = []
    counts = Counter[str]()

    def send(ini: Any, datagrams: list[bytes]) -> None:
        for data in datagrams:
            try:
                if ini.port_float:
                    socks[NAT_T_PORT].sendto(NON_ESP_MARKER + data, (remote, NAT_T_PORT))
                else:
                    socks[500].sendto(data, (remote, 500))
            except (BlockingIOError, OSError):
                counts["send_dropped"] += 1  # retransmission recovers

    t0 = time.monotonic()
    m_start, m_end = t0 + warmup, t0 + warmup + duration
    drain_until = m_end + 5.0
    measuring = done = False
    cpu0 = cpu1 = 0.0
    next_scan = t0
    while True:
        now = time.monotonic()
        if not measuring and not done and now >= m_start:
            measuring, cpu0 = True, time.process_time()
            print("measure-start", flush=True)
        if measuring and now >= m_end:
            measuring, done, cpu1 = False, True, time.process_time()
            print("measure-end", flush=True)
        if done and (not slots or now >= drain_until):
            break
        while not done and len(slots) < window:
            ini = Ikev2Initiator(icfg, now=now)
            slots[ini.spi_i] = _Slot(ini, now)
            counts["started"] += 1
            send(ini, ini.start(now))
        ready, _, _ = select.select(list(socks.values()), [], [], 0.05)
        now = time.monotonic()
        for s in ready:
            port, sock = by_fd[s.fileno()]
            while True:
                try:
                    data = sock.recv(65535)
                except BlockingIOError:
                    break
                if port == NAT_T_PORT:
                    if data[:4] != NON_ESP_MARKER:
                        continue  # keepalive or ESP: not ours to count
                    data = data[4:]
                slot = slots.get(data[:8])
                if slot is None:
                    continue
                ini = slot.ini
                if slot.deleting:
                    ini.receive(data, now)
                    if ini.state is State.CLOSED:
                        del slots[ini.spi_i]
                        counts["deleted"] += 1
                    continue
                send(ini, ini.receive(data, now))
                if ini.state is State.ESTABLISHED:
                    if measuring:
                        counts["completed"] += 1
                        latencies.append(now - slot.started)
                    slot.deleting, slot.delete_at, slot.delete_tries = True, now, 1
                    send(ini, ini.delete_ike(now))
                elif ini.state is State.FAILED:
                    if measuring:
                        failures[str(ini.failure_reason)] += 1
                    del slots[ini.spi_i]
        if now >= next_scan:
            next_scan = now + 0.05
            for spi, slot in list(slots.items()):
                ini = slot.ini
                if slot.deleting:
                    if now - slot.delete_at < DELETE_RETRY:
                        continue
                    if slot.delete_tries >= DELETE_TRIES:
                        counts["delete_unanswered"] += 1
                        del slots[spi]
                        continue
                    slot.delete_at, slot.delete_tries = now, slot.delete_tries + 1
                    send(ini, ini.delete_ike(now))
                    continue
                if ini.next_timeout is not None and now >= ini.next_timeout:
                    send(ini, ini.on_timer(now))
                    if ini.state is State.FAILED:
                        if measuring:
                            failures[str(ini.failure_reason)] += 1
                        del slots[spi]
    for s in socks.values():
        s.close()
    return {
        "completed": counts["completed"],
        "started": counts["started"],
        "deleted": counts["deleted"],
        "delete_unanswered": counts["delete_unanswered"],
        "send_dropped": counts["send_dropped"],
        "failed": sum(failures.values()),
        "failures": dict(failures),
        "seconds": duration,
        "cpu_s": cpu1 - cpu0,
        "latency_ms": [1000 * percentile(latencies, 0.5), 1000 * percentile(latencies, 0.95)],
        "left_in_flight": len(slots),
    }


# --- orchestration (root, namespaces) --------------------------------------------------------


def session_cpu_seconds(sids: Iterable[int]) -> float:
    """CPU seconds (user + system) of every live process in the given sessions."""
    want = set(sids)
    ticks = 0
    for d in pathlib.Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            sid, t = parse_proc_stat((d / "stat").read_text())
        except (OSError, ValueError):
            continue
        if sid in want:
            ticks += t
    return ticks / os.sysconf("SC_CLK_TCK")


class BenchFailed(RuntimeError):
    """A step failed; the message goes into the result row."""


def _run_generator(
    ns: str,
    workdir: pathlib.Path,
    psk: str,
    sids: dict[str, int],
    label: str,
    cfg: dict[str, Any],
) -> RunResult:
    """Run the generator in ``ns``; sample the CPU of each responder process session (name ->
    session id) at the edges of the measurement window."""
    from scripts import bench_strongswan as bsw

    conf = {
        "local": bsw.OUTER_B,
        "remote": bsw.OUTER_A,
        "psk": psk,
        "ts_local": bsw.INNER_B,
        "ts_remote": bsw.INNER_A,
        **cfg,
    }
    path = workdir / f"generator-{secrets.token_hex(3)}.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # holds the PSK
    with os.fdopen(fd, "w") as f:
        json.dump(conf, f)
    argv = ["ip", "netns", "exec", ns, sys.executable, str(ROOT / "scripts" / "bench_ike.py")]
    argv += ["generate", str(path)]
    err_path = workdir / "generator.err"
    with err_path.open("wb") as err_file:
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=err_file,
            text=True,
            cwd=ROOT,
            start_new_session=True,
        )
    resp0: dict[str, float] = {}
    resp1: dict[str, float] = {}
    result: dict[str, Any] | None = None
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.strip()
            if line == "measure-start":
                resp0 = {k: session_cpu_seconds([sid]) for k, sid in sids.items()}
            elif line == "measure-end":
                resp1 = {k: session_cpu_seconds([sid]) for k, sid in sids.items()}
            elif line.startswith("{"):
                result = json.loads(line)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
        path.unlink(missing_ok=True)
    err: list[str] = []
    if result is None:
        with contextlib.suppress(OSError):
            err = err_path.read_text(errors="replace").strip().splitlines()
        raise BenchFailed(f"generator exit {proc.returncode}: {err[-1] if err else ''}")
    return RunResult(
        responder=label,
        completed=int(result["completed"]),
        seconds=float(result["seconds"]),
        failed=int(result["failed"]),
        gen_cpu_s=float(result["cpu_s"]),
        resp_cpu=tuple((k, resp1.get(k, 0.0) - resp0.get(k, 0.0)) for k in sids),
        latency_ms=(float(result["latency_ms"][0]), float(result["latency_ms"][1])),
    )


def worker_calls(log_text: str) -> tuple[int, float, float]:
    """(calls, mean ms, max ms) from keymgr's "worker calls" log line (written on stop)."""
    for line in reversed(log_text.splitlines()):
        if '"worker calls"' not in line:
            continue
        with contextlib.suppress(ValueError, KeyError, TypeError):
            rec = json.loads(line)
            return int(rec["apply_sas"]), float(rec["mean_ms"]), float(rec["max_ms"])
    return (0, 0.0, 0.0)


def worker_call_count(log_text: str) -> int:
    """ApplySAs calls sent (``calls`` of keymgr's "worker calls" line); 0 when not logged."""
    for line in reversed(log_text.splitlines()):
        if '"worker calls"' not in line:
            continue
        with contextlib.suppress(ValueError, KeyError, TypeError):
            return int(json.loads(line)["calls"])
    return 0


def cpu_per_handshake(results: Sequence[RunResult]) -> str:
    """A sentence: the responder's CPU per established handshake (median over the rounds),
    per process."""
    by: dict[str, list[tuple[tuple[str, float], ...]]] = {}
    for r in results:
        if not r.error and r.completed > 0:
            per = tuple((name, 1000 * c / r.completed) for name, c in r.resp_cpu)
            by.setdefault(r.responder, []).append(per)
    parts = []
    for responder, rows in by.items():
        names = [name for name, _ in rows[0]]
        med = [statistics.median(dict(row).get(n, 0.0) for row in rows) for n in names]
        detail = " + ".join(f"{n} {m:.1f}" for n, m in zip(names, med, strict=True))
        parts.append(f"{responder} {sum(med):.1f} ms ({detail})")
    if not parts:
        return ""
    return "Responder CPU per handshake (median over the rounds): " + "; ".join(parts) + "."


def _wait_log(path: pathlib.Path, text: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchFailed(f"keymgr exited with {proc.returncode}")
        with contextlib.suppress(OSError):
            if text in path.read_text(errors="replace"):
                return
        time.sleep(0.1)
    raise BenchFailed(f"keymgr: no '{text}' after {timeout:.0f} s")


def keymgr_round(cfg: dict[str, Any], profile: pathlib.Path | None = None) -> RunResult:
    """keymgr + our worker as responder in A, generator in B."""
    from tests.netns.test_keymgr_responder_strongswan import ResponderLab

    class _Lab(ResponderLab):
        """ResponderLab with keymgr at its default log level, optionally under cProfile, and
        without the interop tests' IKE capture and key export (a tcpdump beside the responder
        and a key line per IKE SA would be measured too, and tshark cannot take the keys of
        thousands of IKE SAs)."""

        def _keymgr_argv(self, argv: list[str]) -> list[str]:
            return argv

        def _popen(self, argv: list[str], log_name: str) -> subprocess.Popen[bytes]:
            if log_name == "keymgr.log":
                argv = list(argv)
                i = argv.index("--log-level")
                argv[i + 1] = KEYMGR_LOG_LEVEL
                argv += ["--cookie-threshold", KEYMGR_COOKIE_THRESHOLD]
                if profile is not None:
                    argv[1:1] = ["-m", "cProfile", "-o", str(profile)]
            return super()._popen(argv, log_name)

    label = "keymgr + dataplane worker"
    lab = None
    try:
        lab = _Lab()
        lab.start_worker()
        keymgr = lab.start_responder_keymgr()
        _wait_log(lab.workdir / "keymgr.log", "punt stream connected", keymgr, 20)
        # each started in its own session (start_new_session), worker first
        sids = {"worker": lab.bench.procs[0].pid, "keymgr": keymgr.pid}
        res = _run_generator(lab.bench.ns_b, lab.workdir, lab.psk, sids, label, cfg)
        # SIGTERM: keymgr returns from run(), logs its worker call times (and cProfile writes)
        keymgr.terminate()
        keymgr.wait(timeout=20)
        with contextlib.suppress(OSError):
            text = (lab.workdir / "keymgr.log").read_text(errors="replace")
            res = dataclasses.replace(
                res, apply_ms=worker_calls(text), apply_calls=worker_call_count(text)
            )
        return res
    except (BenchFailed, OSError, subprocess.SubprocessError, AssertionError) as e:
        return RunResult(label, 0, 0.0, error=str(e)[:200])
    except Exception as e:  # the lab helpers raise plain exceptions too
        return RunResult(label, 0, 0.0, error=f"{type(e).__name__}: {str(e)[:200]}")
    finally:
        if lab is not None:
            lab.cleanup()


def charon_round(cfg: dict[str, Any]) -> RunResult:
    """charon (kernel-libipsec) as responder in A, generator in B."""
    from scripts import bench_strongswan as bsw

    label = "charon kernel-libipsec"
    bench = bsw.StrongSwanPair()
    try:
        bench.netns()
        conf = bsw.swanctl_conf(bsw.OUTER_A, bsw.OUTER_B, bsw.INNER_A, bsw.INNER_B, bench.psk)
        proc = bench.start_charon("a", bench.ns_a, conf, extra=CHARON_LIMITS)
        bench.wait_vici("a", proc)
        bench.swanctl(
            "a", "--load-all", "--noprompt", "--file", str(bench.workdir / "a/swanctl/swanctl.conf")
        )
        return _run_generator(
            bench.ns_b, bench.workdir, bench.psk, {"charon": proc.pid}, label, cfg
        )
    except (bsw.BenchError, BenchFailed, OSError, subprocess.SubprocessError) as e:
        return RunResult(label, 0, 0.0, error=str(e)[:200])
    finally:
        bench.cleanup()


# Call sites in keymgr's main loop whose cumulative wall time the profile summary reports:
# (file name suffix, function name, label).
PROFILE_SITES = (
    ("services/keymgr/daemon.py", "run", "Keymgr.run (whole main loop)"),
    ("queue.py", "get", "waiting for punted IKE (queue.get; idle)"),
    ("services/keymgr/daemon.py", "_respond", "handling a punted datagram (_respond)"),
    ("services/core/ike/responder.py", "receive", "IKE core: Ikev2Responder.receive"),
    ("services/keymgr/daemon.py", "_authentication", "credentials (cached; stat per IKE SA)"),
    ("services/keymgr/config.py", "read_psk", "reading the PSK file"),
    ("services/keymgr/daemon.py", "_install", "installing the Child SA (_install)"),
    ("services/keymgr/daemon.py", "_remove_children", "removing the Child SA (_remove_children)"),
    ("services/keymgr/daemon.py", "_finish", "worker answered: continuation (_finish)"),
    ("services/dataplane/client.py", "apply_sas_async", "gRPC ApplySAs sent (apply_sas_async)"),
    ("services/keymgr/daemon.py", "_settle_op", "gRPC ApplySAs waited for (ordering)"),
    ("services/dataplane/client.py", "send", "punt stream send (inject)"),
    ("services/dataplane/client.py", "send_many", "punt stream send, several at once (inject)"),
    ("logging/__init__.py", "_log", "logging"),
    ("services/keymgr/daemon.py", "_expire_responders", "half-open expiry scan"),
)


def profile_sites(stats: dict[Any, Any]) -> tuple[float, list[tuple[str, int, float]]]:
    """(wall time of Keymgr.run, [(call site label, calls, cumulative seconds)]) from
    ``pstats.Stats(...).stats``: {(file, line, name): (cc, nc, tt, ct, callers)}."""
    rows: list[tuple[str, int, float]] = []
    total = 0.0
    for suffix, fname, label in PROFILE_SITES:
        nc, ct = 0, 0.0
        for (filename, _line, name), (_cc, n, _tt, c, _callers) in stats.items():
            if name == fname and filename.replace("\\", "/").endswith(suffix):
                nc, ct = nc + n, ct + c
        if label.startswith("Keymgr.run"):
            total = ct
        rows.append((label, nc, ct))
    return total, rows


def profile_summary(stats: dict[Any, Any], top: int = 6) -> list[str]:
    """keymgr's main-thread wall time by call site (cumulative), then the top functions by
    own time, as markdown tables."""
    total, rows = profile_sites(stats)
    if total <= 0:
        return ["(no Keymgr.run in the profile)"]
    lines = ["| call site (cumulative wall time) | calls | share of run() |", "|---|---:|---:|"]
    for label, nc, ct in rows:
        lines.append(f"| {label} | {nc} | {100 * ct / total:.0f}% |")
    own = sorted(((v[2], v[1], k) for k, v in stats.items()), key=lambda x: x[0], reverse=True)
    lines += ["", "| function (own time) | calls | share of run() |", "|---|---:|---:|"]
    for tt, nc, (filename, line, name) in own[:top]:
        short = f"{pathlib.Path(filename).name}:{line}({name})" if line else name
        lines.append(f"| `{short}` | {nc} | {100 * tt / total:.0f}% |")
    return lines


def profile_verdict(stats: dict[Any, Any]) -> str:
    """One sentence naming where keymgr's main thread spent its time in the profile."""
    total, rows = profile_sites(stats)
    if total <= 0:
        return ""
    by = {label: (nc, ct / total) for label, nc, ct in rows}

    def share(prefix: str) -> float:
        return sum(v[1] for k, v in by.items() if k.startswith(prefix))

    def calls(prefix: str) -> int:
        return sum(v[0] for k, v in by.items() if k.startswith(prefix))

    handshakes = max(1, calls("installing the Child SA"))
    rpcs = calls("gRPC ApplySAs sent")
    idle = share("waiting for punted IKE")
    return (
        f"In this profile keymgr's IKE thread was busy {100 * (1 - idle):.0f}% of the time. "
        f"{100 * share('gRPC '):.0f}% of it went to the worker's SA API "
        f"({rpcs / handshakes:.1f} ApplySAs calls per handshake, sent without waiting: "
        f"{100 * share('gRPC ApplySAs sent'):.0f}% building and sending them, "
        f"{100 * share('gRPC ApplySAs waited'):.0f}% waiting where ordering required it). "
        f"{100 * share('IKE core'):.0f}% went to the IKE core (parsing, x25519, key derivation, "
        f"SK payload encryption), {100 * share('logging'):.0f}% to logging and "
        f"{100 * share('punt stream send'):.0f}% to injecting the responses."
    )


WHERE_TIME_GOES = (
    "Where the CPU per handshake goes: both processes spend most of it outside the IKE work "
    "proper, in gRPC and in switching between their threads (the Python gRPC runtime hands "
    "every stream message and unary call between several threads; a sampling profile of the "
    "worker showed a quarter of its CPU in the kernel's task switching). The changes so far "
    "cut messages, calls and wake-ups per handshake: the punt stream carries every datagram "
    "queued at the moment in one message (PuntBatch, both directions), keymgr handles what "
    "is queued in one turn of its main loop, hands the responses to the stream together and "
    "sends the worker changes of that turn (installs and removals of several IKE SAs) in one "
    "joined ApplySAs call (sent again one by one if the worker refuses it), a removal made "
    "while another is in flight joins the next call, the log lines are written by a "
    "listener thread that wakes a few times per second under load (one info line per IKE SA "
    "up and one per down; the per-handshake details and the worker's per-call line at "
    "debug), the timers (which visit every IKE SA) are swept when due instead of after "
    "every datagram, and repeated parsing (addresses, prefixes, selectors, the responder "
    "configuration, IntFlag tests in the IKE header codec) is done once. "
    "What remains: the IKE work itself on keymgr's one thread (x25519, prf+, AES-GCM of the "
    "SK payloads, parsing; about half of keymgr's Python time), still about one ApplySAs "
    "unary call per handshake (a turn of keymgr's loop rarely holds more than two or three "
    "changes), and the gRPC thread hand-offs per message in both processes. charon does all "
    "of it in C inside one process. Further steps, by expected gain: the worker's gRPC "
    "server on grpc.aio (one event loop instead of a thread per stream and per call), Child "
    "SA changes carried on a long-lived stream instead of unary calls, and several keymgr "
    "processes sharing the IKE SPI space so that both cores do IKE work."
)


def ike_handshake_rate(
    *,
    rounds: int = ROUNDS,
    window: int = WINDOW,
    warmup: float = WARMUP,
    duration: float = DURATION,
    profile: bool = True,
    date: str = "",
    machine: str = "",
) -> list[str]:
    """Run the rounds (keymgr, charon, keymgr, charon, ...) and return the doc section."""
    from scripts import bench_strongswan as bsw

    cfg = {"window": window, "warmup": warmup, "duration": duration}
    if os.geteuid() != 0:
        return [IKE_HEADING, "", "(skipped: needs root for network namespaces)"]
    if bsw._missing_tools():
        return [IKE_HEADING, "", "(skipped: strongSwan not installed; `make setup` installs it)"]
    load = os.getloadavg()
    results: list[RunResult] = []
    for _ in range(rounds):
        for fn in (keymgr_round, charon_round):
            r = fn(cfg)
            print(
                f"{r.responder}: {r.rate:.0f}/s failed={r.failed} gen_cpu={r.gen_cpu_s:.1f}s "
                f"resp_cpu={r.resp_cpu} {r.error}",
                file=sys.stderr,
            )
            results.append(r)
    applies = [(r.apply_ms, r.apply_calls) for r in results if r.apply_ms[0] > 0]
    notes = [cpu_per_handshake(results)]
    if applies:
        notes.append(
            "keymgr's worker changes (one per Child SA install, one per removal; removals made "
            "while another is in flight share one) and the ApplySAs calls that carried them "
            "(the changes of one main-loop turn share one call), with the time from sending to "
            "handling the answer on its main loop, per keymgr round: "
            + "; ".join(
                f"{n} changes in {c} calls, mean {m:.1f} ms, max {x:.1f} ms"
                for (n, m, x), c in applies
            )
            + ". keymgr holds the IKE_AUTH response until its install is applied (as charon "
            "does), so this is what an install adds to a handshake's latency; sending the "
            "response first would instead open a window of this length in which the peer's "
            "first ESP packets find no inbound SA."
        )
    notes += [
        f"Load average (1, 5, 15 min) when this part started: {load[0]:.2f}, {load[1]:.2f}, "
        f"{load[2]:.2f} (other work shares the machine; the spread between rounds shows it). "
        "keymgr runs at its default log level (info), charon at its default file log level "
        "(1)."
    ]
    med = summarize(results)
    km = next((v for k, v in med.items() if k.startswith("keymgr")), None)
    sw = next((v for k, v in med.items() if k.startswith("charon")), None)
    if profile and km is not None and sw is not None:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="bike-") as tmp:
            prof = pathlib.Path(tmp) / "keymgr.prof"
            r = keymgr_round(cfg, profile=prof)
            if prof.exists():
                stats = pstats.Stats(str(prof)).stats  # type: ignore[attr-defined]
                notes.append(
                    "One more keymgr round ran under cProfile "
                    f"({r.rate:.0f}/s with the profiler on). Where its main thread's wall time "
                    "went, by call site (cumulative) and by function (own time):"
                )
                notes.append("\n".join(profile_summary(stats)))
                notes.append(profile_verdict(stats))
                notes.append(WHERE_TIME_GOES)
            else:
                notes.append(f"(profiled keymgr round wrote no profile: {r.error})")
    return format_section(
        results,
        date=date,
        machine=machine,
        window=window,
        warmup=warmup,
        duration=duration,
        notes=notes,
    )


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "generate":
        cfg = json.loads(pathlib.Path(argv[1]).read_text())
        print(json.dumps(generate(cfg)), flush=True)
        return 0
    import datetime

    from scripts.bench import machine

    lines = ike_handshake_rate(
        date=datetime.date.today().isoformat(),
        machine=machine(),
        rounds=int(os.environ.get("BENCH_IKE_ROUNDS", ROUNDS)),
    )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
