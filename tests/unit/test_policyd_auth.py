"""policyd's tokens file and start-up flags."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from services.policyd.__main__ import main
from services.policyd.auth import Principal, TokensError, TokenStore

TOKEN = "s3cret-token-for-tests-0001"


def test_sha256_and_plain_entries() -> None:
    store = TokenStore.from_mapping(
        {
            "tokens": [
                {
                    "name": "alice",
                    "role": "admin",
                    "sha256": hashlib.sha256(TOKEN.encode()).hexdigest(),
                },
                {"name": "bob", "role": "reader", "token": "another-token-0123456"},
            ]
        }
    )
    assert store.lookup(TOKEN) == Principal("alice", "admin")
    assert store.lookup("another-token-0123456") == Principal("bob", "reader")
    assert store.lookup(TOKEN + "x") is None
    assert store.lookup("") is None
    assert store.lookup("\udcff") is None
    assert TOKEN not in repr(store)
    assert "another-token" not in repr(store)


@pytest.mark.parametrize(
    ("doc", "words"),
    [
        ([], '{"tokens": [...]}'),
        ({"tokens": [{"name": "a", "role": "root", "token": TOKEN}]}, "role must be"),
        ({"tokens": [{"name": "a", "role": "admin"}]}, "exactly one of sha256 and token"),
        ({"tokens": [{"name": "a", "role": "admin", "token": "short"}]}, "at least 16"),
        ({"tokens": [{"name": "a", "role": "admin", "sha256": "zz"}]}, "64 hex digits"),
        ({"tokens": [{"name": "", "role": "admin", "token": TOKEN}]}, "name must be"),
        (
            {
                "tokens": [
                    {"name": "a", "role": "admin", "token": TOKEN},
                    {"name": "a", "role": "reader", "token": TOKEN + "2"},
                ]
            },
            "used twice",
        ),
        ({"tokens": [{"name": "a", "role": "admin", "token": TOKEN, "x": 1}]}, "expected name"),
    ],
)
def test_bad_tokens_files(doc: Any, words: str) -> None:
    with pytest.raises(TokensError, match=None) as e:
        TokenStore.from_mapping(doc)
    assert words in str(e.value)
    assert TOKEN not in str(e.value)


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(TokensError, match="cannot read"):
        TokenStore.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(TokensError, match="not valid JSON"):
        TokenStore.load(bad)
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"tokens": [{"name": "a", "role": "admin", "token": TOKEN}]}))
    assert TokenStore.load(good).lookup(TOKEN) == Principal("a", "admin")


def test_main_refuses_bad_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "t.json"
    bad.write_text(json.dumps({"tokens": [{"name": "a", "role": "admin", "token": "short"}]}))
    assert main(["--tokens-file", str(bad)]) == 2
    assert "at least 16" in capsys.readouterr().err
    assert main(["--tokens-file", str(bad), "--listen", "nowhere"]) == 2
    assert "HOST:PORT" in capsys.readouterr().err
