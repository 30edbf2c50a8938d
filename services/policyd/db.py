"""Database engine for policyd: SQLite (default) or PostgreSQL by URL, Alembic migrations.

SQLite runs in WAL mode with ``synchronous=FULL`` (a commit is on disk before it returns, so a
change is acknowledged only once it survives a crash), foreign keys on, and a busy timeout so
writers queue instead of failing. Transactions are real ones (``BEGIN`` is sent by us, not
the sqlite3 module's implicit one), so a read of several tables sees one snapshot.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, insert, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from services.policyd.models import Revision

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
SQLITE_BUSY_MS = 30000


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for ``url`` with policyd's durability settings."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = create_engine(
            url, connect_args={"timeout": SQLITE_BUSY_MS / 1000, "check_same_thread": False}
        )

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # we send BEGIN ourselves (see "begin" below)
            cur = dbapi_conn.cursor()
            if parsed.database not in (None, "", ":memory:"):
                cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_MS}")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN")

        return engine
    return create_engine(url, pool_pre_ping=True, **kwargs)


def alembic_config(engine: Engine | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if engine is not None:
        cfg.attributes["engine"] = engine
    return cfg


def upgrade(engine: Engine) -> None:
    """Bring the schema to the newest migration and make sure the revision row exists."""
    command.upgrade(alembic_config(engine), "head")
    with Session(engine) as s, s.begin():
        if s.scalar(select(Revision.value).where(Revision.id == 1)) is None:
            s.execute(insert(Revision).values(id=1, value=0))


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)
