"""``make demo`` end to end: the two-site demo (services/demo.py) must pass every one of its
checks (tunnels negotiated on first traffic against strongSwan, blocked, exempt and
require-security flows, a live policy change) and leave no namespace behind."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from scripts import bench_strongswan as bsw
from services import demo

pytestmark = pytest.mark.netns


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")
@pytest.mark.skipif(not os.access(bsw.CHARON, os.X_OK), reason="strongSwan not installed")
@pytest.mark.skipif(shutil.which("nft") is None, reason="nft not installed")
def test_make_demo_passes_every_check(capsys: pytest.CaptureFixture[str]) -> None:
    before = _namespaces()
    code = demo.main([])
    out = capsys.readouterr().out
    assert code == 0, out[-6000:]
    assert "FAIL" not in out
    for flow in ("through tunnel", "blocked, nothing on the wire", "exempt: clear both ways",
                 "dropped at a1 (require security)", "untouched (same SPIs)"):  # fmt: skip
        assert flow in out
    left = {n for n in _namespaces() - before if n.startswith("ipdemo")}
    assert not left, left
