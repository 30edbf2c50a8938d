"""Shared fixtures of the unit tests."""

from tests.unit.policyd_support import api, db_url, empty_db_url, engine, pg_server  # noqa: F401
