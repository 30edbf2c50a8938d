"""keymgr configuration: explicit reqids per connection and per child, validated and unique
(services/keymgr/config.py connection_reqids)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from services.keymgr.config import ConfigError, KeymgrConfig, config_from_json


def _conn(name: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "local_addr": "192.0.2.1",
        "remote_addr": "192.0.2.2",
        "psk_file": "/run/secrets/psk",
        "local_ts": "10.1.0.0/24",
        "remote_ts": "10.2.0.0/24",
        **extra,
    }


def _cfg(*conns: dict[str, Any]) -> KeymgrConfig:
    return config_from_json(json.dumps({"connections": list(conns)}), check_psk=False)


KIDS = [
    {"name": "n1", "local_ts": "10.1.0.0/24", "remote_ts": "10.2.0.0/24"},
    {"name": "n2", "local_ts": "10.1.1.0/24", "remote_ts": "10.2.1.0/24"},
]


def test_positional_reqids_as_before() -> None:
    cfg = _cfg(_conn("a", children=KIDS), _conn("b"), _conn("c", children=KIDS))
    # first children: position + 1; further children after all connections, in order
    assert cfg.reqids == {"a": (1, 4), "b": (2,), "c": (3, 5)}


def test_explicit_reqids_per_connection_and_child() -> None:
    kids = [{**KIDS[0]}, {**KIDS[1], "reqid": 70000}]
    cfg = _cfg(_conn("a", reqid=1 << 20, children=kids), _conn("b"), _conn("c", reqid=99))
    assert cfg.reqids == {"a": (1 << 20, 70000), "b": (2,), "c": (99,)}
    kids0 = [{**KIDS[0], "reqid": 5000}, KIDS[1]]
    cfg = _cfg(_conn("a", children=kids0))
    assert cfg.reqids == {"a": (5000, 2)}


@pytest.mark.parametrize("bad", [0, -1, 1 << 32, True, "7", 1.5, None])
def test_reqid_range_and_type(bad: object) -> None:
    with pytest.raises(ConfigError, match=r"connection 'a' reqid must be an integer in 1\.\."):
        _cfg(_conn("a", reqid=bad)) if bad is not None else _cfg(_conn("a", reqid=[]))
    kids = [KIDS[0], {**KIDS[1], "reqid": bad if bad is not None else []}]
    with pytest.raises(ConfigError, match=r"children\[1\]\.reqid must be an integer"):
        _cfg(_conn("a", children=kids))


def test_reqid_extremes_accepted() -> None:
    assert _cfg(_conn("a", reqid=(1 << 32) - 1)).reqids == {"a": ((1 << 32) - 1,)}
    assert _cfg(_conn("a", reqid=1)).reqids == {"a": (1,)}


def test_duplicate_explicit_reqids_refused() -> None:
    with pytest.raises(ConfigError, match=r"connection 'b' reqid: reqid 7 is also the reqid of "):
        _cfg(_conn("a", reqid=7), _conn("b", reqid=7))
    kids = [{**KIDS[0], "reqid": 9}, {**KIDS[1], "reqid": 9}]
    with pytest.raises(ConfigError, match=r"children\[1\]\.reqid: reqid 9"):
        _cfg(_conn("a", children=kids))


def test_explicit_reqid_colliding_with_positional_refused() -> None:
    # 'b' is second: its positional reqid 2 is taken by a's explicit one
    with pytest.raises(ConfigError, match=r"connection 'b' child 'b' \(positional\): reqid 2"):
        _cfg(_conn("a", reqid=2), _conn("b"))
    # a further child's positional number (after all 3 connections: 4) clashes too
    with pytest.raises(ConfigError, match=r"child 'n2' \(positional\): reqid 4"):
        _cfg(_conn("a", children=KIDS), _conn("b"), _conn("c", reqid=4))


def test_first_child_and_connection_reqid_must_agree() -> None:
    kids = [{**KIDS[0], "reqid": 5}, KIDS[1]]
    with pytest.raises(ConfigError, match=r"reqid 6 and children\[0\]\.reqid 5 differ"):
        _cfg(_conn("a", reqid=6, children=kids))
    assert _cfg(_conn("a", reqid=5, children=kids)).reqids == {"a": (5, 2)}
