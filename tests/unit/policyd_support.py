"""Fixtures for the policyd tests: the same tests run on SQLite and on a real PostgreSQL server
that the tests start themselves (initdb + pg_ctl in a temporary directory, unix socket only,
run as the ``postgres`` user when we are root) and always stop.

``db_url`` is parametrised over both backends; each test gets a fresh, migrated database.
PostgreSQL tests skip (with the reason) only when the server binaries are not installed.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, create_engine, text

from services.policyd.api import create_app
from services.policyd.auth import TokenStore
from services.policyd.db import make_engine, upgrade

ADMIN_TOKEN = "admin-token-0123456789abcdef"
READER_TOKEN = "reader-token-0123456789abcdef"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
READER = {"Authorization": f"Bearer {READER_TOKEN}"}
TOKENS = {
    "tokens": [
        {"name": "alice", "role": "admin", "token": ADMIN_TOKEN},
        {"name": "bob", "role": "reader", "token": READER_TOKEN},
    ]
}
TEMPLATE_DB = "policyd_template"


def pg_bindir() -> Path | None:
    """The newest installed PostgreSQL server's bin directory, or None."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: (
            int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0
        ),
    )
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


class PgServer:
    """A throw-away PostgreSQL cluster on a unix socket in a temporary directory."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="policyd-pg-"))
        self.data = self.root / "data"
        self.sock = self.root / "sock"
        self.port = 5432  # names the socket file only; no TCP listener
        self._as: list[str] = []
        self.started = False

    def _run(self, *args: str) -> None:
        subprocess.run(
            [*self._as, *args], check=True, capture_output=True, timeout=120, cwd=self.root
        )

    def start(self) -> None:
        os.chmod(self.root, 0o755)
        self.data.mkdir()
        self.sock.mkdir()
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            pw = pwd.getpwnam("postgres")
            for p in (self.data, self.sock):
                os.chown(p, pw.pw_uid, pw.pw_gid)
            log = self.root / "log"
            log.touch()
            os.chown(log, pw.pw_uid, pw.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
        self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        )
        opts = f"-c listen_addresses='' -k {self.sock} -p {self.port} -c fsync=off"
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.root / "log"),
            "-w",
            "-t",
            "60",
            "-o",
            opts,
            "start",
        )
        self.started = True

    def stop(self) -> None:
        if self.started:
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                self._run(
                    str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"
                )
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, db: str) -> str:
        return f"postgresql+psycopg://postgres@/{db}?host={self.sock}&port={self.port}"

    def admin_engine(self) -> Engine:
        return create_engine(self.url("postgres"), isolation_level="AUTOCOMMIT")


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    bindir = pg_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (Debian package postgresql) are not installed")
    server = PgServer(bindir)
    try:
        server.start()
        admin = server.admin_engine()
        with admin.connect() as c:
            c.execute(text(f"CREATE DATABASE {TEMPLATE_DB}"))
        admin.dispose()
        tmpl = make_engine(server.url(TEMPLATE_DB))
        upgrade(tmpl)
        tmpl.dispose()
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def pg_database(server: PgServer, *, migrated: bool = True) -> Iterator[str]:
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = server.admin_engine()
    try:
        with admin.connect() as c:
            tmpl = f" TEMPLATE {TEMPLATE_DB}" if migrated else ""
            c.execute(text(f"CREATE DATABASE {name}{tmpl}"))
        yield server.url(name)
    finally:
        with admin.connect() as c:
            c.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, migrated database on each backend."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'policyd.db'}"
        engine = make_engine(url)
        upgrade(engine)
        engine.dispose()
        yield url
    else:
        server: PgServer = request.getfixturevalue("pg_server")
        with pg_database(server) as url:
            yield url


@pytest.fixture
def empty_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database without any table (for the migration tests); backend from ``param``."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'empty.db'}"
    else:
        server: PgServer = request.getfixturevalue("pg_server")
        with pg_database(server, migrated=False) as url:
            yield url


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    e = make_engine(db_url)
    yield e
    e.dispose()


@pytest.fixture
def api(engine: Engine) -> Iterator[TestClient]:
    with TestClient(create_app(engine, TokenStore.from_mapping(TOKENS))) as client:
        yield client
