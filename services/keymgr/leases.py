"""Outbound sequence-number leases (RFC 4303 §3.3.3: a sender never reuses a sequence number
under one key) and their durable high-water marks.

keymgr installs every outbound SA with a lease ``[1, block]`` and extends it by ``block`` when
the worker reports ``LeaseLow``. The lease end it grants is the high-water mark of that SA: the
worker never sends a sequence number beyond it. A mark is written to the :class:`LeaseStore`
(a small JSON file in keymgr's state directory, replaced atomically: write a temporary file,
fsync, rename, fsync the directory) BEFORE the lease is granted, so after a crash the file
never names less than what a worker may have used. Marks are keyed by the outbound SA's
(SPI, destination, protocol) and removed when the SA is deleted.

The arithmetic (:func:`first_lease`, :func:`next_lease`) stops at the end of the sequence
space (2^32-1 without ESN, 2^64-1 with it); beyond that the SA must be rekeyed.

Scope today: keymgr writes and removes marks; nothing resumes an SA from them yet (after a
restart keymgr negotiates new SAs instead of guessing a counter). Failover and restart will
read :meth:`LeaseStore.marks`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import pathlib
from collections.abc import Callable
from dataclasses import dataclass

from services.core.sa import MAX_SEQ_32, MAX_SEQ_64

__all__ = [
    "DEFAULT_BLOCK",
    "STORE_FILE",
    "LeaseKey",
    "LeaseStore",
    "LeaseStoreError",
    "first_lease",
    "next_lease",
    "seq_max",
]

DEFAULT_BLOCK = 1 << 20  # sequence numbers per grant
STORE_FILE = "seq-leases.json"
_FORMAT = 1
MAX_ENTRIES = 1 << 16  # a bound on what a corrupt or hostile file can make us load


class LeaseStoreError(Exception):
    """The store could not be read or a mark could not be made durable."""


@dataclass(frozen=True, slots=True, order=True)
class LeaseKey:
    """An outbound SA as RFC 4301 §4.1 names it: (SPI, destination address, protocol)."""

    spi: int
    dst: bytes  # packed IPv4 or IPv6 address
    protocol: int

    def text(self) -> str:
        return f"{self.spi:08x}@{ipaddress.ip_address(self.dst)}/{self.protocol}"


def seq_max(esn: bool) -> int:
    """The last sequence number of the space (RFC 4303 §3.3.3; 64 bits with ESN)."""
    return MAX_SEQ_64 if esn else MAX_SEQ_32


def first_lease(block: int, esn: bool) -> int:
    """The end of a new outbound SA's first lease ``[1, end]``."""
    if block < 1:
        raise ValueError("lease block must be at least 1")
    return min(block, seq_max(esn))


def next_lease(current_end: int, block: int, esn: bool) -> int | None:
    """The end of the lease after ``current_end``, capped at the sequence space; None when
    ``current_end`` already is its end (the SA must be rekeyed instead)."""
    if block < 1:
        raise ValueError("lease block must be at least 1")
    top = seq_max(esn)
    if current_end >= top:
        return None
    return min(current_end + block, top)


def _fsync_dir(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LeaseStore:
    """High-water marks of outbound sequence numbers, one per outbound SA, in ``directory``.

    Every change rewrites the whole (small) file atomically; :meth:`record` returns only once
    the new mark is durable, and raises :class:`LeaseStoreError` (leaving the previous file
    and the in-memory marks as they were) when it is not. ``rename`` is the replace step
    (tests inject a failing one).
    """

    def __init__(
        self,
        directory: pathlib.Path,
        *,
        rename: Callable[[pathlib.Path, pathlib.Path], None] = os.replace,
    ) -> None:
        self.directory = pathlib.Path(directory)
        self.path = self.directory / STORE_FILE
        self._rename = rename
        self._marks: dict[LeaseKey, int] = {}
        self.writes = 0

    @classmethod
    def open(
        cls,
        directory: pathlib.Path,
        *,
        rename: Callable[[pathlib.Path, pathlib.Path], None] = os.replace,
    ) -> LeaseStore:
        """The store of ``directory`` (created with mode 0700 if missing), marks loaded."""
        store = cls(directory, rename=rename)
        try:
            store.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            text = store.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return store
        except OSError as e:
            raise LeaseStoreError(f"cannot read {STORE_FILE}: {e.strerror}") from None
        store._marks = _parse(text)
        return store

    def marks(self) -> dict[LeaseKey, int]:
        """A copy of every mark (SA -> last sequence number granted)."""
        return dict(self._marks)

    def get(self, key: LeaseKey) -> int | None:
        return self._marks.get(key)

    def __len__(self) -> int:
        return len(self._marks)

    def record(self, key: LeaseKey, mark: int, *, new_sa: bool = False) -> None:
        """Make ``mark`` the durable high-water mark of ``key``; raises LeaseStoreError when
        it is not durable. A mark only grows, unless ``new_sa``: the first lease of an SA just
        negotiated (new keys), which replaces whatever an older SA with the same id left."""
        if not 1 <= mark <= MAX_SEQ_64:
            raise ValueError("a mark is a sequence number: 1..2^64-1")
        old = self._marks.get(key)
        if old is not None and mark < old and not new_sa:
            raise ValueError("a high-water mark never goes down")
        if old == mark:
            return
        marks = {**self._marks, key: mark}
        self._write(marks)
        self._marks = marks

    def remove(self, *keys: LeaseKey) -> None:
        """Forget the marks of deleted SAs (raises LeaseStoreError if not durable)."""
        marks = {k: v for k, v in self._marks.items() if k not in keys}
        if len(marks) == len(self._marks):
            return
        self._write(marks)
        self._marks = marks

    def _write(self, marks: dict[LeaseKey, int]) -> None:
        doc = {
            "format": _FORMAT,
            "marks": [
                {
                    "spi": k.spi,
                    "dst": str(ipaddress.ip_address(k.dst)),
                    "protocol": k.protocol,
                    "mark": v,
                }
                for k, v in sorted(marks.items())
            ],
        }
        data = json.dumps(doc, separators=(",", ":")).encode()
        tmp = self.directory / f".{STORE_FILE}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            self._rename(tmp, self.path)
            _fsync_dir(self.directory)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise LeaseStoreError(f"cannot write {STORE_FILE}: {e.strerror or e}") from None
        self.writes += 1


def _parse(text: str) -> dict[LeaseKey, int]:
    """The marks of a store file; LeaseStoreError naming what is wrong (never a crash)."""
    try:
        doc = json.loads(text)
    except ValueError:
        raise LeaseStoreError(f"{STORE_FILE} is not JSON") from None
    if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
        raise LeaseStoreError(f"{STORE_FILE}: unknown format")
    items = doc.get("marks")
    if not isinstance(items, list) or len(items) > MAX_ENTRIES:
        raise LeaseStoreError(f"{STORE_FILE}: 'marks' must be a list of at most {MAX_ENTRIES}")
    out: dict[LeaseKey, int] = {}
    for i, it in enumerate(items):
        try:
            spi, dst, proto, mark = it["spi"], it["dst"], it["protocol"], it["mark"]
            if not all(type(x) is int for x in (spi, proto, mark)) or not isinstance(dst, str):
                raise TypeError
            if not (0 <= spi <= 0xFFFFFFFF and 0 <= proto <= 255 and 1 <= mark <= MAX_SEQ_64):
                raise ValueError
            key = LeaseKey(spi, ipaddress.ip_address(dst).packed, proto)
        except (KeyError, TypeError, ValueError):
            raise LeaseStoreError(f"{STORE_FILE}: marks[{i}] is malformed") from None
        out[key] = max(mark, out.get(key, 0))
    return out
