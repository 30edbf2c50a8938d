"""policyd's Alembic migrations build exactly the schema of the models, on both backends."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, select

from services.policyd.db import make_engine, upgrade
from services.policyd.models import Base, Revision
from tests.unit.policyd_support import empty_db_url, pg_server  # noqa: F401 - fixtures


@pytest.mark.parametrize("empty_db_url", ["sqlite", "postgresql"], indirect=True)
def test_upgrade_from_empty_matches_models(empty_db_url: str) -> None:
    engine = make_engine(empty_db_url)
    try:
        assert inspect(engine).get_table_names() == []
        upgrade(engine)
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            diff = compare_metadata(ctx, Base.metadata)
            assert diff == []
            assert conn.execute(select(Revision.value)).scalars().all() == [0]
        tables = set(inspect(engine).get_table_names())
        assert set(Base.metadata.tables) | {"alembic_version"} == tables
        upgrade(engine)  # a second upgrade is a no-op
        with engine.connect() as conn:
            assert conn.execute(select(Revision.value)).scalars().all() == [0]
    finally:
        engine.dispose()


@pytest.mark.parametrize("empty_db_url", ["sqlite"], indirect=True)
def test_compare_detects_a_drift(empty_db_url: str) -> None:
    """The comparison above can fail: a model the migrations lack is reported."""
    from sqlalchemy import Column, Integer, MetaData, Table

    engine = make_engine(empty_db_url)
    try:
        upgrade(engine)
        md = MetaData()
        for t in Base.metadata.tables.values():
            t.to_metadata(md)
        Table("extra", md, Column("id", Integer, primary_key=True))
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), md)
        assert [d[0] for d in diff] == ["add_table"]
    finally:
        engine.dispose()


def test_sqlite_is_durable(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'd.db'}")
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    finally:
        engine.dispose()
