"""Structured logging for every service: one JSON object per line on stderr.

Usage::

    from services.runtime.logging import configure_logging, get_logger

    configure_logging("info")
    log = get_logger(__name__)
    log.info("sa installed", extra={"sa": cfg.describe()})

Fields passed with ``extra=`` become keys of the JSON object. As defence in depth against
leaking keys or packet contents, any ``bytes``, ``bytearray`` or ``memoryview`` value — in
``extra`` fields or in ``%``-style message arguments — is replaced by ``<N bytes>``; callers
must still never log key material or an SaConfig with keys (use ``SaConfig.describe()``).

The daemons call ``configure_logging(level, background=True)``: the logging thread then only
merges %-style arguments into the message and queues the record; a listener thread builds the
JSON and writes it (``logging.handlers.QueueHandler`` / ``QueueListener``; after writing
several records it pauses 50 ms, so that it wakes up rarely under load), and the caller's
source location is not looked up (the JSON has no field for it). ``shutdown_logging()`` (also
run at exit) writes what is still queued.
"""

from __future__ import annotations

import atexit
import json
import logging
import logging.handlers
import os
import queue
import sys
import time
import traceback
from pathlib import Path
from typing import Any, TextIO

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys()
    | {"message", "asctime", "taskName"}
)


def redact(value: object) -> object:
    """Replace binary values (which could hold keys or packets) by their length."""
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(value)} bytes>"
    return value


def describe_exception(exc: BaseException | None) -> dict[str, Any]:
    """Type and code location of an exception, without its message (messages may quote data).

    The message is included only for OSError (errno and strerror) and for exception classes
    that declare ``log_safe = True`` (their messages are written never to contain secrets);
    an integer ``code`` attribute (e.g. pyroute2's NetlinkError) is included as ``errno``.
    """
    if exc is None:
        return {}
    out: dict[str, Any] = {"exc_type": type(exc).__name__}
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if f"{os.sep}services{os.sep}" in f.filename]
    out["exc_where"] = [
        f"{Path(f.filename).name}:{f.lineno}:{f.name}" for f in (ours or frames)[-6:]
    ]
    if isinstance(exc, OSError):
        out["errno"] = exc.errno
        out["strerror"] = exc.strerror
    elif getattr(exc, "log_safe", False) is True:
        out["detail"] = str(exc)
    code = getattr(exc, "code", None)
    if "errno" not in out and isinstance(code, int):
        out["errno"] = code
    return out


def _merge_args(record: logging.LogRecord) -> None:
    """Merge %-style arguments, binary ones redacted, into ``record.msg``."""
    if record.args:
        if isinstance(record.args, dict):
            record.args = {k: redact(v) for k, v in record.args.items()}
        else:
            record.args = tuple(redact(a) for a in record.args)
        record.msg = record.getMessage()
        record.args = None


class JsonFormatter(logging.Formatter):
    """Format a record as a single JSON line: ts, level, logger, msg, and extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        _merge_args(record)
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in record.__dict__.items():
            if k not in _STANDARD and not k.startswith("_"):
                out[k] = redact(v)
        if record.exc_info and record.exc_info[0] is not None:
            out.update(describe_exception(record.exc_info[1]))
        return json.dumps(out, default=str, separators=(",", ":"))


class StderrHandler(logging.StreamHandler[TextIO]):
    """A stream handler that looks up ``sys.stderr`` on every record (so pytest's capsys and
    redirected stderr both see the output)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        pass


class _QueueingHandler(logging.handlers.QueueHandler):
    """Queues records for the listener thread; only the arguments are merged here (they may
    be mutable), the JSON is built by the listener's handler."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        _merge_args(record)
        return record


class _BatchingListener(logging.handlers.QueueListener):
    """A QueueListener that, when it has just written several records and the queue is
    empty, pauses ``linger`` seconds before it waits again: under load it wakes up a few
    times per second for many records instead of once per record (each wake-up costs the
    logging process a thread switch), while a lone record is written at once."""

    linger = 0.05

    def __init__(self, q: queue.SimpleQueue[logging.LogRecord], handler: logging.Handler) -> None:
        super().__init__(q, handler)
        self._q = q
        self._run = 0  # records taken since the queue was last found empty

    def dequeue(self, block: bool) -> logging.LogRecord:
        try:
            record = self._q.get_nowait()
        except queue.Empty:
            if self._run > 1:
                time.sleep(self.linger)
            self._run = 0
            record = self._q.get(block)
        self._run += 1
        return record


_listener: logging.handlers.QueueListener | None = None


def shutdown_logging() -> None:
    """Stop the background listener (if any) after it wrote every queued record."""
    global _listener
    listener, _listener = _listener, None
    if listener is not None:
        listener.stop()


atexit.register(shutdown_logging)


def configure_logging(level: str | int = "info", *, background: bool = False) -> None:
    """Install the JSON handler on the root logger (idempotent: replaces an earlier one).

    ``background``: records are written by a listener thread (see the module docstring)."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, StderrHandler | _QueueingHandler):
            root.removeHandler(h)
    shutdown_logging()
    handler = StderrHandler()
    handler.setFormatter(JsonFormatter())
    if background:
        global _listener
        q: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
        _listener = _BatchingListener(q, handler)
        _listener.start()
        root.addHandler(_QueueingHandler(q))
        logging._srcfile = None  # no caller lookup per record (the JSON has no field for it)
    else:
        root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)
