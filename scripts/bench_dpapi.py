"""The dataplane worker's SA API per IKE handshake: the unary calls vs one ApplySAs each way.

What keymgr asks of a worker per Child SA is measured without IKE: ``n`` iterations of
{install an inbound and an outbound SA + replace the SPD, then delete both SAs}, either as the
five unary calls keymgr makes today (InstallSA x2, ReplaceSPD, DeleteSA x2) or as two ApplySAs
calls (install + SPD, then delete). The worker side is the worker's own gRPC server and engine
host (services.dataplane.grpc_api.GrpcServer on an EngineHost, logging at its default level
"info" to /dev/null) in a child process, reached over mTLS on a unix socket, so client and
worker run in parallel as keymgr and a worker do; it has no packet I/O (no TUN, no sockets), so
it needs no root. Each variant runs with one handshake in flight (sequential) and with eight:
eight client threads on one channel, and for ApplySAs also one thread keeping eight
apply_sas_async futures in flight. Every ReplaceSPD / SPD replacement carries the same one
entry and revision (a revision may repeat, never go backwards, and concurrent calls arrive in
any order). CPU is the client process's (this one) and the worker process's, per handshake.

Run alone: ``python scripts/bench_dpapi.py [n]`` (prints the markdown section); ``make bench``
writes it into docs/benchmarks.md (BENCH_ONLY=dpapi to run only this part).
"""

from __future__ import annotations

import os
import pathlib
import queue
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.core.sa import Direction, SaConfig  # noqa: E402
from services.core.selectors import Selector  # noqa: E402
from services.core.spd import Action, SpdEntry  # noqa: E402
from services.dataplane.client import DataplaneClient, sa_config  # noqa: E402

LOCAL, PEER = "192.0.2.1", "192.0.2.2"
N = 2000
WARMUP = 50
ROUNDS = 4
IN_FLIGHT = 8
SPD = ([SpdEntry(1, 10, Action.PROTECT, Selector.make("198.51.100.1/32", "203.0.113.1/32"), 1)], 1)


def serve(tls_dir: pathlib.Path, target: str) -> None:
    """Child process: the worker's gRPC server on an engine host until stdin closes."""
    from services.dataplane.grpc_api import GrpcServer, load_server_credentials
    from services.dataplane.worker import EngineHost
    from services.runtime.logging import configure_logging

    configure_logging("info")
    host = EngineHost("bench", local_addresses=[LOCAL])
    server = GrpcServer(host, target, load_server_credentials(tls_dir))
    server.start()
    print("ready", flush=True)
    sys.stdin.read()
    server.stop(0)


def proc_cpu(pid: int) -> float:
    """utime + stime of a process in seconds."""
    from scripts.bench_ike import parse_proc_stat

    ticks = parse_proc_stat(pathlib.Path(f"/proc/{pid}/stat").read_text())[1]
    return ticks / os.sysconf("SC_CLK_TCK")


def handshake_sas(i: int) -> tuple[SaConfig, SaConfig]:
    """The Child SA pair of handshake ``i`` (AES-GCM-16-256, own SPIs, ESP-in-UDP)."""
    common = dict(protocol="esp", mode="tunnel", encr_id=20, reqid=1, encap=True)
    spi = 0x10000 + 2 * i
    return (
        sa_config(
            spi=spi, direction="inbound", src=PEER, dst=LOCAL, encr_key=os.urandom(36), **common
        ),
        sa_config(
            spi=spi + 1,
            direction="outbound",
            src=LOCAL,
            dst=PEER,
            encr_key=os.urandom(36),
            **common,
        ),
    )


def _ids(pair: tuple[SaConfig, SaConfig]) -> list[tuple[int, bytes, int, Direction]]:
    return [(c.spi, c.dst, c.protocol, c.direction) for c in pair]


def unary(dp: DataplaneClient, pair: tuple[SaConfig, SaConfig]) -> None:
    dp.install_sa(pair[0])
    dp.install_sa(pair[1])
    dp.replace_spd(*SPD)
    for c in pair:
        dp.delete_sa(c.spi, c.dst, c.protocol, c.direction)


def batched(dp: DataplaneClient, pair: tuple[SaConfig, SaConfig]) -> None:
    dp.apply_sas(install=pair, spd=SPD)
    res = dp.apply_sas(delete=_ids(pair))
    if res.existed != (True, True):
        raise RuntimeError("an SA was not there to delete")


def run_threads(
    dp: DataplaneClient,
    step: Callable[[DataplaneClient, tuple[SaConfig, SaConfig]], None],
    pairs: list[tuple[SaConfig, SaConfig]],
    threads: int,
) -> None:
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            for p in pairs[k::threads]:
                step(dp, p)
        except BaseException as e:  # reported after the join
            errors.append(e)

    ts = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errors:
        raise errors[0]


def run_futures(dp: DataplaneClient, pairs: list[tuple[SaConfig, SaConfig]], window: int) -> None:
    """One thread keeps ``window`` handshakes in flight with apply_sas_async: when a slot's
    install completes it sends the delete, when that completes it starts the next handshake."""
    done: queue.Queue[tuple[int, str, object]] = queue.Queue()
    todo = iter(range(len(pairs)))
    running = 0

    def start(i: int, stage: str) -> None:
        p = pairs[i]
        if stage == "install":
            fut = dp.apply_sas_async(install=p, spd=SPD)
        else:
            fut = dp.apply_sas_async(delete=_ids(p))
        fut.add_done_callback(lambda f: done.put((i, stage, f)))

    for _ in range(window):
        i = next(todo, None)
        if i is not None:
            start(i, "install")
            running += 1
    while running:
        i, stage, f = done.get(timeout=30)
        f.result()  # type: ignore[attr-defined]
        if stage == "install":
            start(i, "delete")
            continue
        nxt = next(todo, None)
        if nxt is None:
            running -= 1
        else:
            start(nxt, "install")


@dataclass
class Row:
    api: str
    calls_per_handshake: int
    in_flight: str
    seconds: float
    n: int
    client_cpu: float
    worker_cpu: float

    @property
    def handshakes_per_s(self) -> float:
        return self.n / self.seconds

    @property
    def calls_per_s(self) -> float:
        return self.n * self.calls_per_handshake / self.seconds


def measure(n: int = N) -> list[Row]:
    import shutil

    from services.runtime import devpki

    d = pathlib.Path(tempfile.mkdtemp(prefix="dpb", dir="/tmp"))  # unix socket paths are short
    proc: subprocess.Popen[str] | None = None
    try:
        devpki.create(d, ["server", "client"])
        target = f"unix:{d}/worker.sock"
        proc = subprocess.Popen(
            [sys.executable, str(pathlib.Path(__file__).resolve()), "--serve", str(d), target],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            cwd=ROOT,
        )
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the worker's gRPC server did not start")
        with DataplaneClient(target, d, server_name="server", client_name="client") as dp:
            dp.wait_ready()
            variants: list[
                tuple[str, int, str, Callable[[list[tuple[SaConfig, SaConfig]]], None]]
            ] = [
                (
                    "unary (InstallSA x2, ReplaceSPD, DeleteSA x2)",
                    5,
                    "1",
                    lambda ps: run_threads(dp, unary, ps, 1),
                ),
                (
                    "ApplySAs (install + SPD, delete)",
                    2,
                    "1",
                    lambda ps: run_threads(dp, batched, ps, 1),
                ),
                (
                    "unary (InstallSA x2, ReplaceSPD, DeleteSA x2)",
                    5,
                    f"{IN_FLIGHT} (threads)",
                    lambda ps: run_threads(dp, unary, ps, IN_FLIGHT),
                ),
                (
                    "ApplySAs (install + SPD, delete)",
                    2,
                    f"{IN_FLIGHT} (threads)",
                    lambda ps: run_threads(dp, batched, ps, IN_FLIGHT),
                ),
                (
                    "ApplySAs (install + SPD, delete)",
                    2,
                    f"{IN_FLIGHT} (futures, 1 thread)",
                    lambda ps: run_futures(dp, ps, IN_FLIGHT),
                ),
            ]
            # Interleaved rounds, so that load from elsewhere on the machine hits every
            # variant alike; each row adds up its rounds.
            rows = [Row(api, calls, flight, 0.0, 0, 0.0, 0.0) for api, calls, flight, _ in variants]
            base = 0
            per_round = [n // ROUNDS + (1 if r < n % ROUNDS else 0) for r in range(ROUNDS)]
            for r, m in enumerate(per_round):
                for row, (_api, _calls, _flight, fn) in zip(rows, variants, strict=True):
                    warm = [handshake_sas(base + i) for i in range(WARMUP if r == 0 else 0)]
                    pairs = [handshake_sas(base + len(warm) + i) for i in range(m)]
                    base += len(warm) + m
                    fn(warm)
                    c0, w0, t0 = time.process_time(), proc_cpu(proc.pid), time.perf_counter()
                    fn(pairs)
                    t1, c1, w1 = time.perf_counter(), time.process_time(), proc_cpu(proc.pid)
                    row.seconds += t1 - t0
                    row.n += m
                    row.client_cpu += c1 - c0
                    row.worker_cpu += w1 - w0
                    if dp.stats().sa_count != 0:
                        raise RuntimeError("SAs left behind")
        return rows
    finally:
        if proc is not None:
            if proc.stdin is not None:
                proc.stdin.close()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(d, ignore_errors=True)


def dpapi_section(n: int = N) -> list[str]:
    lines = [
        "## Dataplane SA API per handshake: unary calls vs ApplySAs",
        "",
        f"What keymgr asks of a worker per Child SA, without IKE: {n} iterations of {{install an "
        "inbound and an outbound SA (AES-GCM-16-256, ESP-in-UDP) + replace the SPD (one "
        "entry), then delete both SAs}, as the five unary calls keymgr makes today or as two "
        "ApplySAs calls, over mTLS on a unix socket to the worker's gRPC server and engine in "
        "another process (its default log level, no packet I/O; scripts/bench_dpapi.py). "
        f"After {WARMUP} warm-up iterations per row; the rows run in {ROUNDS} interleaved rounds "
        "and add them up. In flight 8: eight client threads on one "
        "channel, or one thread keeping eight `apply_sas_async` futures going. CPU per "
        "handshake: this client process and the worker process, in ms; where the worker's CPU "
        "per handshake comes close to the wall time per handshake, the worker (one Python "
        "process serving gRPC) is busy all the time and is what limits the rate.",
        "",
        "| API | calls per handshake | in flight | handshakes/s | calls/s | wall ms per handshake "
        "| worker CPU ms per handshake | client CPU ms per handshake |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    try:
        rows = measure(n)
    except Exception as e:  # a benchmark reports failures instead of hiding the table
        return [*lines, f"| (failed: {type(e).__name__}: {e}) | | | | | | | |"]
    for r in rows:
        lines.append(
            f"| {r.api} | {r.calls_per_handshake} | {r.in_flight} | {r.handshakes_per_s:.0f} | "
            f"{r.calls_per_s:.0f} | {1000 * r.seconds / r.n:.2f} | "
            f"{1000 * r.worker_cpu / r.n:.2f} | {1000 * r.client_cpu / r.n:.2f} |"
        )
    seq = {r.api.split()[0]: r for r in rows if r.in_flight == "1"}
    par = {r.api.split()[0]: r for r in rows if r.in_flight.endswith("(threads)")}
    if "unary" in seq and "ApplySAs" in seq and "unary" in par and "ApplySAs" in par:
        ratio_seq = seq["ApplySAs"].handshakes_per_s / seq["unary"].handshakes_per_s
        ratio_par = par["ApplySAs"].handshakes_per_s / par["unary"].handshakes_per_s
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        lines += [
            "",
            f"ApplySAs vs the unary calls: {ratio_seq:.1f}x the handshakes/s sequentially, "
            f"{ratio_par:.1f}x with {IN_FLIGHT} in flight (threads). Load average (1, 5, 15 min) "
            f"at the end: {load} (the machine is shared; figures vary between runs).",
        ]
    return lines


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "--serve":
        serve(pathlib.Path(argv[1]), argv[2])
        return 0
    n = int(argv[0]) if argv else N
    print("\n".join(dpapi_section(n)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
