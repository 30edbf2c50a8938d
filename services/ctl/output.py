"""Output for ipsecctl: fixed-width tables (no dependency), JSON and YAML (docs/ipsecctl.md).

Every string that came from a server goes through :func:`clean` before it reaches the
terminal: control characters (escape sequences a hostile server could send) are shown as
``\\xNN`` and very long values are cut.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

import yaml

MAX_CELL = 80  # characters of one table cell
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def clean(value: object, limit: int = 4096) -> str:
    """``value`` as one safe line: control characters escaped, at most ``limit`` characters."""
    text = value if isinstance(value, str) else str(value)
    if len(text) > limit:
        text = text[:limit] + f"... ({len(text) - limit} more characters)"
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def cell(value: object) -> str:
    """A table cell: ``-`` for nothing, lists joined with commas, cut at MAX_CELL."""
    if value is None or value == "" or value == []:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        return clean(",".join(str(v) for v in value), MAX_CELL)
    return clean(value, MAX_CELL)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Rows under upper-case headers, columns padded to their widest cell."""
    cells = [[cell(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, c in enumerate(row):
            widths[i] = max(widths[i], len(c))
    lines = ["  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def dump(obj: Any, fmt: str) -> str:
    """``obj`` as JSON (indented, sorted as given) or YAML (block style, order kept)."""
    if fmt == "yaml":
        text: str = yaml.safe_dump(obj, sort_keys=False, allow_unicode=False)
        return text.rstrip("\n")
    return json.dumps(obj, indent=2, ensure_ascii=True)
