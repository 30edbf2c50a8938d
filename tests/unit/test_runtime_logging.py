"""services.runtime.logging: the background (queue + listener thread) mode writes the same
JSON lines as the direct one, in order, with binary values redacted, and flushes on shutdown."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator

import pytest

from services.runtime import logging as rlog


@pytest.fixture
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level, srcfile = list(root.handlers), root.level, logging._srcfile
    try:
        yield
    finally:
        rlog.shutdown_logging()
        root.handlers[:] = handlers
        root.setLevel(level)
        logging._srcfile = srcfile


def _records(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("background", [False, True])
def test_json_lines_redacted_and_in_order(
    background: bool, restore_root: None, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = bytes(range(32))
    rlog.configure_logging("info", background=background)
    log = logging.getLogger("t.bg")
    for i in range(200):
        log.info("line %d %s", i, secret, extra={"n": i, "blob": secret, "ok": "x"})
    log.debug("not at info")
    try:
        raise OSError(5, "io")
    except OSError:
        log.exception("failed")
    rlog.shutdown_logging()
    text = capsys.readouterr().err
    recs = _records(text)
    assert [r["n"] for r in recs[:200]] == list(range(200))
    assert recs[7]["msg"] == "line 7 <32 bytes>" and recs[7]["blob"] == "<32 bytes>"
    assert recs[7]["logger"] == "t.bg" and recs[7]["level"] == "info"
    assert recs[-1]["msg"] == "failed" and recs[-1]["errno"] == 5
    assert len(recs) == 201
    assert secret.hex() not in text and repr(secret) not in text


def test_background_caller_does_not_format(
    restore_root: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """The logging thread only queues: the JSON is built in the listener thread."""
    rlog.configure_logging("info", background=True)
    caller = threading.get_ident()
    seen: list[int] = []
    fmt = rlog.JsonFormatter.format

    def spy(self: rlog.JsonFormatter, record: logging.LogRecord) -> str:
        seen.append(threading.get_ident())
        return fmt(self, record)

    rlog.JsonFormatter.format = spy  # type: ignore[method-assign]
    try:
        logging.getLogger("t.bg").info("hello", extra={"k": 1})
        rlog.shutdown_logging()
    finally:
        rlog.JsonFormatter.format = fmt  # type: ignore[method-assign]
    assert seen and caller not in seen
    assert _records(capsys.readouterr().err)[0]["msg"] == "hello"


def test_reconfigure_replaces_the_handler(
    restore_root: None, capsys: pytest.CaptureFixture[str]
) -> None:
    rlog.configure_logging("info", background=True)
    rlog.configure_logging("info", background=True)
    rlog.configure_logging("info")
    logging.getLogger("t.bg").info("once")
    rlog.shutdown_logging()
    assert [r["msg"] for r in _records(capsys.readouterr().err)] == ["once"]
