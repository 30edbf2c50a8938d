"""Small helpers for netns tests that drive plain namespaces by name (no Lab object).

``tcp_sha256`` sends random bytes over TCP between two addresses inside test namespaces with
the lab's ``tcp-recv`` / ``tcp-send`` commands; both ends hash what they saw, so a caller can
assert the stream crossed the tunnel intact.
"""

from __future__ import annotations

import json
import pathlib
import secrets
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[2]


def _readline(proc: subprocess.Popen[str], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return proc.stdout.readline()
        line = proc.stdout.readline()
        if line:
            return line
    return ""


def tcp_sha256(
    ns_src: str, src: str, ns_dst: str, dst: str, nbytes: int = 1 << 20, timeout: float = 60.0
) -> tuple[str, str, int]:
    """(sender's sha256, receiver's sha256, bytes received) of one TCP stream src -> dst."""
    port = 20000 + secrets.randbelow(20000)
    lab = [sys.executable, "-m", "services.dataplane.lab"]
    recv_cmd = ["ip", "netns", "exec", ns_dst, *lab, "tcp-recv", "--bind", dst]
    recv_cmd += ["--port", str(port), "--timeout", str(timeout)]
    send_cmd = ["ip", "netns", "exec", ns_src, *lab, "tcp-send", "--source", src, "--connect", dst]
    send_cmd += ["--port", str(port), "--bytes", str(nbytes), "--timeout", str(timeout)]
    recv = subprocess.Popen(
        recv_cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        line = _readline(recv, 15.0)
        if not line.startswith("listening"):
            raise AssertionError(f"tcp-recv did not start: {line!r}")
        send = subprocess.run(
            send_cmd,
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=timeout + 15,
            check=False,
        )
        if send.returncode != 0:
            raise AssertionError(f"tcp-send failed ({send.returncode}): {send.stderr[-500:]}")
        sent = json.loads(send.stdout.strip().splitlines()[-1])
        out, err = recv.communicate(timeout=15)
        if recv.returncode != 0:
            raise AssertionError(f"tcp-recv failed ({recv.returncode}): {err[-500:]}")
        got = json.loads(out.strip().splitlines()[-1])
    finally:
        if recv.poll() is None:
            recv.kill()
            recv.wait()
    return str(sent["sha256"]), str(got["sha256"]), int(got["bytes"])
