"""keymgr configuration of several Child SAs per connection (services/keymgr/config.py
``children``): inheritance from the connection, backward compatibility, and every bad input
a clear ConfigError naming the field."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import pytest

from services.keymgr.config import (
    ChildConfig,
    ConfigError,
    Connection,
    config_from_json,
    connection_from_dict,
)


def _conn(**over: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "name": "site-b",
        "local_addr": "192.0.2.1",
        "remote_addr": "192.0.2.2",
        "psk_file": "/nonexistent/psk",
        "esp_proposals": ["aes256gcm16"],
        "rekey_time": 600,
    }
    d.update(over)
    return d


TWO = [
    {"name": "net1", "local_ts": "10.1.0.0/24", "remote_ts": "10.2.0.0/24"},
    {
        "name": "net2",
        "local_ts": "10.3.0.0/24",
        "remote_ts": "10.4.0.0/24",
        "esp_proposals": ["aes128gcm16-x25519"],
        "rekey_time": 300,
        "start_action": "trap",
    },
]


def test_children_inherit_the_connections_values() -> None:
    c = connection_from_dict(_conn(children=TWO))
    assert c.child_names == ("net1", "net2")
    one, two = c.child_configs
    assert one == ChildConfig(
        "net1", "10.1.0.0/24", "10.2.0.0/24", ("aes256gcm16",), "tunnel", "start",
        600.0, 660.0, 60.0, 0, 0,
    )  # fmt: skip
    assert two.esp_proposals == ("aes128gcm16-x25519",) and two.start_action == "trap"
    assert (two.rekey_time, two.life_time, two.rand_time) == (300, 330, 30)
    # the top-level selectors default to the first child's
    assert (c.local_ts, c.remote_ts) == ("10.1.0.0/24", "10.2.0.0/24")
    v = c.child("net2")
    assert (v.name, v.local_ts, v.remote_ts, v.rekey_time) == (
        "site-b",
        "10.3.0.0/24",
        "10.4.0.0/24",
        300,
    )
    assert v.esp_suites[0].dh == 31 and v.children == ()
    with pytest.raises(LookupError):
        c.child("net3")


def test_without_children_one_child_named_after_the_connection() -> None:
    c = connection_from_dict(_conn(local_ts="10.1.0.0/24", remote_ts="10.2.0.0/24"))
    assert c.children == () and c.child_names == ("site-b",)
    (only,) = c.child_configs
    assert (only.name, only.local_ts, only.remote_ts) == ("site-b", "10.1.0.0/24", "10.2.0.0/24")
    assert c.child("site-b") == c  # the connection itself


def test_the_model_without_json() -> None:
    c = Connection(
        name="x",
        local_addr="192.0.2.1",
        remote_addr="192.0.2.2",
        psk_file=pathlib.Path("/p"),
        local_ts="10.0.0.0/8",
        remote_ts="172.16.0.0/12",
        children=(ChildConfig("a"), ChildConfig("b", local_ts="10.9.0.0/16")),
    )
    assert [ch.local_ts for ch in c.child_configs] == ["10.0.0.0/8", "10.9.0.0/16"]
    assert [ch.remote_ts for ch in c.child_configs] == ["172.16.0.0/12"] * 2
    with pytest.raises(ConfigError, match=r"children\[1\]\.name: duplicate"):
        Connection(
            name="x",
            local_addr="192.0.2.1",
            remote_addr="192.0.2.2",
            psk_file=pathlib.Path("/p"),
            local_ts="10.0.0.0/8",
            remote_ts="172.16.0.0/12",
            children=(ChildConfig("a"), ChildConfig("a")),
        )


@pytest.mark.parametrize(
    ("children", "needle"),
    [
        ([], "children must be a list of 1..8"),
        ("net1", "children must be a list"),
        ([{"local_ts": "10.1.0.0/24"}], "children[0] lacks field 'name'"),
        ([{"name": "a", "colour": 1}], "children[0]: unknown field(s): 'colour'"),
        ([{"name": ""}], "children[0].name must be a non-empty string"),
        ([{"name": "a"}, {"name": "a"}], "children[1].name: duplicate child name 'a'"),
        (
            [{"name": "a", "local_ts": "10.1.0.1/24"}],
            "children[0] ('a'): local_ts: not an IP prefix",
        ),
        ([{"name": "a", "local_ts": 7}], "children[0].local_ts must be a string"),
        ([{"name": "a", "esp_proposals": "aes"}], "children[0].esp_proposals: expected a list"),
        ([{"name": "a", "esp_proposals": ["nope"]}], "children[0] ('a')"),
        ([{"name": "a", "mode": "sideways"}], "children[0] ('a'): mode must be one of"),
        ([{"name": "a", "start_action": "later"}], "children[0] ('a'): start_action must be"),
        ([{"name": "a", "rekey_time": -1}], "children[0] ('a'): rekey_time"),
        ([{"name": "a", "rekey_time": 100, "life_time": 50}], "life_time must exceed rekey_time"),
        ([{"name": "a", "remote_ts": "2001:db8::/64"}], "different IP versions"),
        ([{"name": str(i)} for i in range(9)], "children must be a list of 1..8"),
    ],
)
def test_bad_children_name_the_field(children: object, needle: str) -> None:
    d = _conn(local_ts="10.1.0.0/24", remote_ts="10.2.0.0/24", children=children)
    with pytest.raises(ConfigError) as e:
        connection_from_dict(d)
    assert needle in str(e.value)
    assert "site-b" in str(e.value) or "children" in str(e.value)


def test_children_need_selectors_somewhere() -> None:
    with pytest.raises(ConfigError, match="lacks field"):
        connection_from_dict(_conn(children=[{"name": "a"}]))


def test_json_document_with_children() -> None:
    doc = json.dumps({"connections": [_conn(children=TWO)]})
    cfg = config_from_json(doc, check_psk=False)
    assert cfg.connections[0].child_names == ("net1", "net2")
