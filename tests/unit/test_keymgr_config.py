"""keymgr configuration loading (services/keymgr/config.py): JSON file -> Connection objects.

Valid files give the expected connections; every kind of bad or hostile input (bad JSON,
missing or unknown fields, wrong types, bad addresses, IPv6/mixed families, unknown
start_action, huge values, missing/unreadable/invalid psk_file) raises ConfigError and nothing
else; hypothesis throws random JSON values at each field. The PSK never appears in the repr or
str of a Connection nor in any error message.
"""

from __future__ import annotations

import json
import os
import pathlib
import secrets
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.keymgr.config import (
    MAX_CONFIG_BYTES,
    ConfigError,
    Connection,
    KeymgrConfig,
    config_from_json,
    connection_from_dict,
    load_config,
)

FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

PSK_HEX = "5ec2e7" + secrets.token_hex(29)


def _conn(**over: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "name": "site-b",
        "local_addr": "192.0.2.1",
        "remote_addr": "192.0.2.2",
        "local_id": "192.0.2.1",
        "remote_id": "192.0.2.2",
        "psk_file": "psk",
        "local_ts": "198.51.100.0/24",
        "remote_ts": "203.0.113.1/32",
        "start_action": "start",
    }
    d.update(over)
    return {k: v for k, v in d.items() if v is not _DROP}


_DROP = object()


@pytest.fixture
def cfgdir(tmp_path: pathlib.Path) -> Iterator[pathlib.Path]:
    psk = tmp_path / "psk"
    psk.write_text(f"0x{PSK_HEX}\n")
    psk.chmod(0o600)
    yield tmp_path


def _write(d: pathlib.Path, doc: Any) -> pathlib.Path:
    p = d / "keymgr.json"
    p.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return p


def _load_error(d: pathlib.Path, doc: Any) -> ConfigError:
    with pytest.raises(ConfigError) as ei:
        load_config(_write(d, doc))
    msg = str(ei.value)
    assert PSK_HEX not in msg.lower()
    return ei.value


# --- valid -----------------------------------------------------------------------------------


def test_valid_file_gives_connections(cfgdir: pathlib.Path) -> None:
    doc = {
        "connections": [
            _conn(),
            _conn(
                name="from-c",
                remote_addr="192.0.2.3",
                remote_id=_DROP,
                local_id=_DROP,
                psk_file=str(cfgdir / "psk"),
                start_action="respond",
            ),
            _conn(name="passive", remote_addr="192.0.2.4", start_action="none"),
            _conn(name="default-action", remote_addr="192.0.2.5", start_action=_DROP),
            _conn(name="on-demand", remote_addr="192.0.2.6", start_action="trap"),
        ]
    }
    cfg = load_config(_write(cfgdir, doc))
    assert isinstance(cfg, KeymgrConfig)
    a, b, c, d, e = cfg.connections
    assert e.start_action == "trap" and not e.responds
    assert all(isinstance(x, Connection) for x in cfg.connections)
    assert a.name == "site-b" and a.local_addr == "192.0.2.1" and a.remote_addr == "192.0.2.2"
    assert a.psk_file == cfgdir / "psk"  # relative to the config file's directory
    assert a.ts_range("local") == ("198.51.100.0", "198.51.100.255")
    assert a.ts_range("remote") == ("203.0.113.1", "203.0.113.1")
    assert a.start_action == "start" and not a.responds
    assert b.local_id is None and b.remote_id is None and b.psk_file == cfgdir / "psk"
    assert b.responds and c.responds and not d.responds and d.start_action == "start"
    assert a.read_psk() == bytes.fromhex(PSK_HEX)


def test_raw_psk_is_stripped(cfgdir: pathlib.Path) -> None:
    (cfgdir / "psk").write_text("  not hex, raw octets \n")
    cfg = load_config(_write(cfgdir, {"connections": [_conn()]}))
    assert cfg.connections[0].read_psk() == b"not hex, raw octets"


def test_psk_not_in_repr_or_str(cfgdir: pathlib.Path) -> None:
    cfg = load_config(_write(cfgdir, {"connections": [_conn()]}))
    c = cfg.connections[0]
    assert c.read_psk()
    for text in (repr(c), str(c), repr(cfg), str(cfg)):
        assert PSK_HEX not in text.lower()
        assert bytes.fromhex(PSK_HEX).hex() not in text


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "doc",
    [
        "",
        "{",
        "not json",
        "[]",
        "null",
        '"connections"',
        "{}",
        '{"connections": {}}',
        '{"connections": [1]}',
        '{"connections": [null]}',
        '{"connections": [[]]}',
        "[" * 100_000 + "]" * 100_000,  # deep nesting
        '{"connections": [' + "9" * 10_000 + "]}",  # integer beyond the str->int limit
        '{"connections": NaN}',
    ],
)
def test_bad_json_or_shape(cfgdir: pathlib.Path, doc: str) -> None:
    _load_error(cfgdir, doc)


def test_not_utf8_and_missing_and_directory(cfgdir: pathlib.Path) -> None:
    p = cfgdir / "bin.json"
    p.write_bytes(b'{"connections": ["\xff\xfe"]}')
    with pytest.raises(ConfigError):
        load_config(p)
    with pytest.raises(ConfigError):
        load_config(cfgdir / "missing.json")
    with pytest.raises(ConfigError):
        load_config(cfgdir)


def test_huge_file(cfgdir: pathlib.Path) -> None:
    err = _load_error(cfgdir, " " * (MAX_CONFIG_BYTES + 1) + "{}")
    assert "larger" in str(err)


@pytest.mark.parametrize(
    "field",
    ["name", "local_addr", "remote_addr", "psk_file", "local_ts", "remote_ts"],
)
def test_missing_required_field(cfgdir: pathlib.Path, field: str) -> None:
    err = _load_error(cfgdir, {"connections": [_conn(**{field: _DROP})]})
    assert field in str(err)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("name", ""),
        ("name", 5),
        ("name", None),
        ("name", ["a"]),
        ("name", "x" * 65),
        ("name", "bad\nname"),
        ("local_addr", "192.0.2.256"),
        ("local_addr", "2001:db8::1"),  # mixed families: IPv6 local, IPv4 remote
        ("remote_addr", "2001:db8::2"),
        ("local_addr", 3221225985),
        ("local_addr", None),
        ("remote_addr", "host.example"),
        ("remote_addr", "192.0.2.2/32"),
        ("local_id", "%any"),  # only the remote identity may be "any"
        ("local_id", "CN=x, =y"),
        ("local_id", None),
        ("remote_id", 7),
        ("remote_id", ""),
        ("ike_proposals", "aes256gcm16-prfsha256-x25519"),  # a string, not a list
        ("ike_proposals", []),
        ("ike_proposals", ["aes256gcm16-prfsha1-x25519"]),  # legacy without allow_legacy
        ("ike_proposals", ["aes256gcm16-x25519"]),  # AEAD without PRF
        ("esp_proposals", [5]),
        ("esp_proposals", ["aes256"]),  # CBC without integrity
        ("mode", "beet"),
        ("mode", None),
        ("allow_legacy", "yes"),
        ("local_id", "C=CH, =x"),  # identity text forms are checked (Identity.parse)
        ("remote_id", "@#zz"),
        ("local_ts", "198.51.100.1/24"),  # host bits set
        ("local_ts", "2001:db8::/64"),  # mixed families: IPv6 local_ts, IPv4 remote_ts
        ("local_ts", "198.51.100.0/33"),
        ("remote_ts", 24),
        ("remote_ts", {"a": 1}),
        ("start_action", "add"),
        ("start_action", "START"),
        ("start_action", None),
        ("start_action", ["start"]),
        ("start_action", 1),
        ("psk_file", ""),
        ("psk_file", 5),
        ("psk_file", None),
        ("psk_file", "a\x00b"),
        ("psk_file", "p" * 5000),
        ("psk_file", "does-not-exist"),
        ("psk_file", "/"),
        ("local_addr", "1" * 100_000),
        ("name", "n" * 1_000_000),
    ],
)
def test_bad_field_values(cfgdir: pathlib.Path, field: str, value: Any) -> None:
    err = _load_error(cfgdir, {"connections": [_conn(**{field: value})]})
    assert len(str(err)) < 300  # huge values are not echoed


def test_unknown_field_and_duplicate_name(cfgdir: pathlib.Path) -> None:
    err = _load_error(cfgdir, {"connections": [{**_conn(), "psk": PSK_HEX}]})
    assert "unknown" in str(err)
    _load_error(cfgdir, {"connections": [_conn(), _conn(remote_addr="192.0.2.9")]})


def test_too_many_connections(cfgdir: pathlib.Path) -> None:
    conns = [_conn(name=f"c{i}") for i in range(1025)]
    _load_error(cfgdir, {"connections": conns})


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"   \n",
        b"0x",
        b"0xZZ" + PSK_HEX.encode(),
        b"0x" + PSK_HEX.encode() + b"0",
        b"x" * 5000,
    ],
)
def test_bad_psk_file_content(cfgdir: pathlib.Path, content: bytes) -> None:
    (cfgdir / "psk").write_bytes(content)
    _load_error(cfgdir, {"connections": [_conn()]})
    # without the eager check the problem surfaces when the connection starts
    cfg = load_config(_write(cfgdir, {"connections": [_conn()]}), check_psk=False)
    with pytest.raises(ConfigError) as ei:
        cfg.connections[0].read_psk()
    assert PSK_HEX not in str(ei.value).lower()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files regardless of mode")
def test_unreadable_psk_file_as_user(cfgdir: pathlib.Path) -> None:
    (cfgdir / "psk").chmod(0)
    _load_error(cfgdir, {"connections": [_conn()]})


def test_unreadable_psk_file(cfgdir: pathlib.Path) -> None:
    # A directory cannot be read as a file, even by root.
    (cfgdir / "pskdir").mkdir()
    err = _load_error(cfgdir, {"connections": [_conn(psk_file="pskdir")]})
    assert "psk_file" in str(err)
    (cfgdir / "psk").unlink()
    err = _load_error(cfgdir, {"connections": [_conn()]})
    assert "psk_file" in str(err)


def test_connection_from_dict_rejects_non_mapping() -> None:
    for bad in (None, 1, "x", [("name", "a")]):
        with pytest.raises(ConfigError):
            connection_from_dict(bad)  # type: ignore[arg-type]


# --- hypothesis ------------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text()
    | st.sampled_from(["192.0.2.1", "10.0.0.0/8", "start", "none", "respond", "psk", ""]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=10,
)


@FUZZ
@given(
    field=st.sampled_from(
        [
            "name",
            "local_addr",
            "remote_addr",
            "local_id",
            "remote_id",
            "psk_file",
            "local_ts",
            "remote_ts",
            "start_action",
            "ike_proposals",
            "esp_proposals",
            "mode",
            "allow_legacy",
        ]
    ),
    value=json_values,
)
def test_fuzz_each_field(cfgdir: pathlib.Path, field: str, value: Any) -> None:
    doc = json.dumps({"connections": [_conn(**{field: value})]})
    try:
        cfg = config_from_json(doc, base=cfgdir)
    except ConfigError as e:
        assert PSK_HEX not in str(e).lower()
        return
    (c,) = cfg.connections
    assert isinstance(c, Connection)
    assert PSK_HEX not in repr(c).lower()


@FUZZ
@given(doc=json_values)
def test_fuzz_whole_document(cfgdir: pathlib.Path, doc: Any) -> None:
    for wrapped in (doc, {"connections": doc}, {"connections": [doc]}):
        try:
            config_from_json(json.dumps(wrapped), base=cfgdir)
        except ConfigError as e:
            assert PSK_HEX not in str(e).lower()


@FUZZ
@given(blob=st.binary(max_size=200))
def test_fuzz_raw_bytes(cfgdir: pathlib.Path, blob: bytes) -> None:
    try:
        config_from_json(blob, base=cfgdir)
    except ConfigError:
        pass
