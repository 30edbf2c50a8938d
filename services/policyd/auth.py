"""Bearer-token authentication for policyd's API, with two roles: ``reader`` and ``admin``.

Tokens come from a JSON file (``--tokens-file``)::

    {"tokens": [
        {"name": "alice", "role": "admin", "sha256": "<hex SHA-256 of the token>"},
        {"name": "monitor", "role": "reader", "token": "<the token itself>"}
    ]}

``sha256`` keeps the token itself out of the file; ``token`` is accepted for development.
Every request but ``/healthz`` and the OpenAPI document needs a token: a missing or unknown
token gets 401 (with ``WWW-Authenticate: Bearer``), a reader's write gets 403. The entry's
``name`` is what the audit log records as the actor; tokens are never logged or returned.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROLES = ("reader", "admin")
MAX_TOKENS_FILE = 1 << 20
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")


class TokensError(ValueError):
    """An unusable tokens file (the message never quotes a token)."""

    log_safe = True


@dataclass(frozen=True)
class Principal:
    name: str
    role: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


@dataclass(frozen=True)
class _Entry:
    digest: bytes
    principal: Principal

    def __repr__(self) -> str:  # never show the digest
        return f"_Entry({self.principal!r})"


class TokenStore:
    """Token digests -> principals; lookups compare digests in constant time."""

    def __init__(self, entries: list[_Entry]) -> None:
        self._entries = entries

    @classmethod
    def from_mapping(cls, doc: Any) -> TokenStore:
        if not isinstance(doc, dict) or not isinstance(doc.get("tokens"), list):
            raise TokensError('the tokens file must be {"tokens": [...]}')
        entries: list[_Entry] = []
        names: set[str] = set()
        for i, item in enumerate(doc["tokens"]):
            where = f"tokens[{i}]"
            if not isinstance(item, dict) or set(item) - {"name", "role", "sha256", "token"}:
                raise TokensError(f"{where}: expected name, role and sha256 (or token)")
            name, role = item.get("name"), item.get("role")
            if not isinstance(name, str) or not _NAME.match(name):
                raise TokensError(f"{where}: name must be 1-64 letters, digits or ._@-")
            if name in names:
                raise TokensError(f"{where}: the name {name} is used twice")
            names.add(name)
            if role not in ROLES:
                raise TokensError(f"{where}: role must be one of {', '.join(ROLES)}")
            if ("sha256" in item) == ("token" in item):
                raise TokensError(f"{where}: give exactly one of sha256 and token")
            if "sha256" in item:
                hexd = item["sha256"]
                if not isinstance(hexd, str) or not _HEX64.match(hexd.lower()):
                    raise TokensError(f"{where}: sha256 must be 64 hex digits")
                digest = bytes.fromhex(hexd)
            else:
                tok = item["token"]
                if not isinstance(tok, str) or len(tok) < 16 or not tok.isprintable():
                    raise TokensError(f"{where}: a token must be at least 16 printable characters")
                digest = hashlib.sha256(tok.encode()).digest()
            entries.append(_Entry(digest, Principal(name, role)))
        return cls(entries)

    @classmethod
    def load(cls, path: Path) -> TokenStore:
        try:
            with path.open("rb") as f:
                raw = f.read(MAX_TOKENS_FILE + 1)
        except OSError as e:
            raise TokensError(f"cannot read the tokens file: {e.strerror}") from None
        if len(raw) > MAX_TOKENS_FILE:
            raise TokensError("the tokens file is larger than 1 MiB")
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise TokensError("the tokens file is not valid JSON") from None
        return cls.from_mapping(doc)

    def lookup(self, token: str) -> Principal | None:
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        found: Principal | None = None
        for e in self._entries:  # no early exit: the time does not depend on the match
            if hmac.compare_digest(e.digest, digest):
                found = e.principal
        return found

    def __repr__(self) -> str:
        return f"TokenStore({len(self._entries)} tokens)"
