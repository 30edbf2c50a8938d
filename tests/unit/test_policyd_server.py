"""policyd as a process (``python -m services.policyd`` on loopback): concurrent writers and
SIGKILL during a burst of writes, on SQLite and PostgreSQL. No acknowledged change is lost."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.unit.policyd_support import ADMIN, READER, TOKENS, db_url, pg_server  # noqa: F401 - fixtures

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Policyd:
    def __init__(self, db_url: str, workdir: Path, extra: tuple[str, ...] = ()) -> None:
        self.db_url = db_url
        self.extra = extra  # more flags
        self.tokens = workdir / "tokens.json"
        self.tokens.write_text(json.dumps(TOKENS))
        self.log = workdir / "policyd.log"
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "POLICYD_TOKENS_FILE": str(self.tokens)}
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "services.policyd",
                    "--database-url",
                    self.db_url,
                    "--listen",
                    f"127.0.0.1:{self.port}",
                    "--log-level",
                    "warning",
                    *self.extra,
                ],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-2000:]
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.base}/healthz", timeout=1).status_code == 200:
                    return
            time.sleep(0.1)
        raise AssertionError("policyd did not start: " + self.log.read_text()[-2000:])

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture
def policyd(db_url: str, tmp_path: Path) -> Iterator[Policyd]:
    server = Policyd(db_url, tmp_path)
    try:
        server.start()
        yield server
    finally:
        server.kill()


def _create(client: httpx.Client, name: str) -> int:
    body = {"name": name, "filters": [{"source": "me", "destination": "192.0.2.1"}]}
    try:
        return client.post("/v1/filter-lists", json=body, headers=ADMIN).status_code
    except httpx.HTTPError:
        return 0


def test_sigkill_during_a_burst_loses_no_acknowledged_change(policyd: Policyd) -> None:
    acked: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def writer(tid: int) -> None:
        with httpx.Client(base_url=policyd.base, timeout=10) as c:
            for i in range(10_000):
                if stop.is_set():
                    return
                name = f"t{tid}-{i}"
                status = _create(c, name)
                if status == 201:
                    with lock:
                        acked.append(name)
                elif status == 0:
                    return  # the server is gone

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(acked) < 60 and time.monotonic() < deadline:
        time.sleep(0.01)
    policyd.kill()  # SIGKILL while the writers are busy
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert len(acked) >= 60
    policyd.start()
    with httpx.Client(base_url=policyd.base, timeout=10) as c:
        names: set[str] = set()
        after = None
        while True:
            params = {"limit": 500, **({"after": after} if after else {})}
            page = c.get("/v1/filter-lists", params=params, headers=READER).json()
            names |= {x["name"] for x in page["items"]}
            after = page["next"]
            if after is None:
                break
        assert set(acked) <= names
        # at most the requests in flight at the kill may have committed without an answer
        assert len(names) - len(acked) <= len(threads)
        # one revision per committed create, with its audit row
        rev = c.get("/v1/revision", headers=READER).json()["revision"]
        assert rev == len(names)
        audit = c.get("/v1/audit", params={"limit": 500}, headers=READER).json()["items"]
        assert {a["name"] for a in audit} <= names
        # the restarted server takes writes again
        assert _create(c, "after-restart") == 201
        assert c.get("/v1/revision", headers=READER).json()["revision"] == rev + 1


def test_concurrent_writers(policyd: Policyd) -> None:
    with httpx.Client(base_url=policyd.base, timeout=30) as c:
        assert _create(c, "shared") == 201
        tag = c.get("/v1/filter-lists/shared", headers=READER).headers["ETag"]
    results: list[tuple[str, int]] = []
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def worker(tid: int) -> None:
        with httpx.Client(base_url=policyd.base, timeout=30) as c:
            barrier.wait()
            body = {"name": "shared", "description": f"by {tid}"}
            r = c.put("/v1/filter-lists/shared", json=body, headers={**ADMIN, "If-Match": tag})
            statuses = [("put", r.status_code)]
            statuses += [("create", _create(c, f"w{tid}-{i}")) for i in range(5)]
            with lock:
                results.extend(statuses)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    puts = sorted(s for k, s in results if k == "put")
    assert puts == [200] + [412] * 7  # exactly one writer wins the same ETag
    assert [s for k, s in results if k == "create"] == [201] * 40
    with httpx.Client(base_url=policyd.base, timeout=30) as c:
        assert c.get("/v1/revision", headers=READER).json()["revision"] == 1 + 1 + 40
        audit = c.get("/v1/audit", params={"limit": 500}, headers=READER).json()["items"]
        revs = [a["revision"] for a in audit]
        assert revs == list(range(1, 43))  # gap-free, one per committed change
