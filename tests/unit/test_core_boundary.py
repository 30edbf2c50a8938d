"""The core stays sans-IO: no sockets, event loops, RPC, SQL, web, netlink or wall clock."""

from __future__ import annotations

import ast
import pathlib

import pytest

CORE = pathlib.Path(__file__).resolve().parents[2] / "services" / "core"

FORBIDDEN = {
    "socket",
    "asyncio",
    "selectors",
    "select",
    "threading",
    "subprocess",
    "grpc",
    "sqlalchemy",
    "fastapi",
    "pyroute2",
    "time",
    "datetime",
    "random",
    "services.dataplane",
    "services.keymgr",
    "services.policyd",
    "services.runtime",
    "services.pb",
    "logging",
    "os",
}


def _imports(path: pathlib.Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def _forbidden(name: str) -> bool:
    return any(name == f or name.startswith(f + ".") for f in FORBIDDEN)


@pytest.mark.parametrize("path", sorted(CORE.rglob("*.py")), ids=lambda p: p.name)
def test_core_module_imports_nothing_that_does_io(path: pathlib.Path) -> None:
    bad = [n for n in _imports(path) if _forbidden(n)]
    assert not bad, f"{path.name} imports {bad}"


def test_boundary_check_detects_a_forbidden_import(tmp_path: pathlib.Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("import os\nfrom socket import socket\ndef f():\n    import grpc\n")
    assert [n for n in _imports(f) if _forbidden(n)] == ["os", "socket", "grpc"]


def test_every_core_module_cites_its_rfc_sections() -> None:
    for path in CORE.rglob("*.py"):
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if path.name == "__init__.py":
            continue
        assert "RFC" in doc.splitlines()[0] if doc else False, f"{path.name}: no RFC in docstring"
