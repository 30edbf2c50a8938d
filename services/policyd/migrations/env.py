"""Alembic environment for policyd: runs on the engine the caller put in the config."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Engine

from services.policyd.models import Base

config = context.config
target_metadata = Base.metadata


def run() -> None:
    engine = config.attributes.get("engine")
    if not isinstance(engine, Engine):
        raise RuntimeError("policyd migrations run through services.policyd.db.upgrade")
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=connection.dialect.name == "sqlite",
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()


run()
