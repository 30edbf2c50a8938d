"""Our IKEv2 responder against strongSwan 5.9.8 as initiator (RFC 7296 §1.2, PSK §2.15).

The independent oracle: charon (kernel-libipsec, see /work/shared/notes/ORACLES.md) runs in
namespace B as a PSK initiator for aes256gcm16-prfsha256-x25519 / ESP aes256gcm16 with
local_ts 203.0.113.1/32 and remote_ts 198.51.100.1/32 and is started with
``swanctl --initiate --child``. Our responder runs in namespace A
(tests/netns/ike_responder_peer.py does its socket I/O on UDP 500/4500). The test asserts that
our side reaches ESTABLISHED and that ``swanctl --list-sas`` on B shows the same IKE SA
ESTABLISHED and the Child SA INSTALLED with the SPIs our responder reports, and that an ICMP
echo through the Child SA works both ways; with a wrong PSK our responder fails the initiator's
AUTH and strongSwan reports the AUTHENTICATION_FAILED notify. Namespaces (prefix 'iker'),
charon, the helper and the temporary directory are removed in the fixture, also on failure.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import secrets
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from scripts import bench_strongswan as bsw

pytestmark = pytest.mark.netns

REPO = pathlib.Path(__file__).resolve().parents[2]


def _skip_reason() -> str | None:
    if not os.access(bsw.CHARON, os.X_OK):
        return f"strongSwan not installed ({bsw.CHARON} missing)"
    if subprocess.run(["which", "swanctl"], capture_output=True, check=False).returncode:
        return "swanctl not installed"
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    return None


class Lab:
    """Two namespaces (prefix 'iker'): our responder in A, charon as initiator in B."""

    def __init__(self) -> None:
        self.bench = bsw.StrongSwanPair()
        tag = secrets.token_hex(4)
        self.bench.ns_a = f"iker{tag}a"
        self.bench.ns_b = f"iker{tag}b"
        self.bench.netns()
        self.helper: subprocess.Popen[str] | None = None

    def start_charon(self, psk_hex: str) -> None:
        b = self.bench
        conf = bsw.swanctl_conf(bsw.OUTER_B, bsw.OUTER_A, bsw.INNER_B, bsw.INNER_A, psk_hex)
        proc = b.start_charon("b", b.ns_b, conf)
        b.wait_vici("b", proc)
        path = b.workdir / "b" / "swanctl" / "swanctl.conf"
        b.swanctl("b", "--load-all", "--noprompt", "--file", str(path))

    def start_responder(self, psk_hex: str, *, ping: bool = False) -> None:
        cfg = self.bench.workdir / "responder.json"
        fd = os.open(cfg, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(
                {
                    "local": bsw.OUTER_A,
                    "remote_id": bsw.OUTER_B,
                    "psk_hex": psk_hex,
                    "ts_local": bsw.INNER_A,
                    "ts_remote": bsw.INNER_B,
                    "timeout": 30,
                    "linger": 1.0,
                    "ping": ping,
                },
                f,
            )
        cmd = ["ip", "netns", "exec", self.bench.ns_a, sys.executable]
        cmd += ["-m", "tests.netns.ike_responder_peer", str(cfg)]
        self.helper = subprocess.Popen(
            cmd,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # own process group: cleanup can signal all of it
        )
        self.bench.procs.append(self.helper)  # type: ignore[arg-type]
        assert self.helper.stdout is not None
        first = self.helper.stdout.readline()
        if json.loads(first or "{}").get("ready") is not True:
            _, err = self.helper.communicate(timeout=10)
            pytest.fail(f"responder helper did not start: {first!r} {err[-2000:]}")

    def initiate(self) -> subprocess.CompletedProcess[str]:
        cmd = ["swanctl", "--initiate", "--child", bsw.CONN, "--timeout", "20"]
        cmd += ["--uri", self.bench.vici("b")]
        return bsw._run(cmd, timeout=30, check=False)

    def responder_result(self) -> dict[str, Any]:
        assert self.helper is not None
        out, err = self.helper.communicate(timeout=60)
        assert self.helper.returncode == 0, f"responder helper failed: {err[-2000:]}"
        result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        return result

    def list_sas(self) -> str:
        return self.bench.swanctl("b", "--list-sas")

    def log(self, lines: int = 40) -> str:
        return self.bench.log_tail("b", lines)


@pytest.fixture
def lab() -> Iterator[Lab]:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    lb = None
    try:
        lb = Lab()
        yield lb
    finally:
        if lb is not None:
            lb.bench.cleanup()  # kills charon and the helper (process groups), namespaces, tmp


def test_strongswan_initiator_establishes_with_our_responder(lab: Lab) -> None:
    psk = secrets.token_hex(32)
    lab.start_charon(psk)
    lab.start_responder(psk, ping=True)
    init = lab.initiate()
    res = lab.responder_result()
    assert init.returncode == 0, f"{init.stdout[-2000:]} {res} {lab.log()}"
    assert res["state"] == "established", f"{res} {lab.log()}"
    assert res["nat_t"] is True and res["received"]["4500"] >= 1  # IKE_AUTH came on 4500
    assert res["child_encr_key_lens"] == [36, 36]
    assert res["ts_i"] == [bsw.INNER_B] and res["ts_r"] == [bsw.INNER_A]
    sas = lab.list_sas()
    print(sas)
    # "bench: #1, ESTABLISHED, IKEv2, <spi_i>_i* <spi_r>_r"  (B is the initiator: '*' on _i)
    ike = re.search(r"ESTABLISHED, IKEv2, ([0-9a-f]{16})_i\*? ([0-9a-f]{16})_r", sas)
    assert ike, sas
    assert (ike.group(1), ike.group(2)) == (res["spi_i"], res["spi_r"])
    assert "AES_GCM_16-256/PRF_HMAC_SHA2_256/CURVE_25519" in sas
    assert re.search(r"INSTALLED, TUNNEL(-in-UDP)?, ESP:AES_GCM_16-256", sas), sas
    # On B, "in" is the SPI B chose (we send to it), "out" the one we chose.
    spi_in = re.search(r"\bin\s+([0-9a-f]{8})", sas)
    spi_out = re.search(r"\bout\s+([0-9a-f]{8})", sas)
    assert spi_in and spi_out, sas
    assert spi_in.group(1) == res["child_spi_out"]
    assert spi_out.group(1) == res["child_spi_in"]
    assert f"local  {bsw.INNER_B}/32" in sas and f"remote {bsw.INNER_A}/32" in sas
    # The Child SA keys work both ways: strongSwan decrypted our ESP echo request (sent with
    # the responder->initiator key) and we decrypted its reply.
    assert res["echo_reply"] is True, f"{res} {lab.log()}"
    sas = lab.list_sas()
    assert re.search(r"\bin\s+[0-9a-f]{8},\s+\d+ bytes,\s+1 packets", sas), sas
    assert re.search(r"\bout\s+[0-9a-f]{8},\s+\d+ bytes,\s+1 packets", sas), sas


def test_wrong_psk_on_strongswan_gives_authentication_failed(lab: Lab) -> None:
    lab.start_charon(secrets.token_hex(32))
    lab.start_responder(secrets.token_hex(32))
    init = lab.initiate()
    res = lab.responder_result()
    assert init.returncode != 0, init.stdout[-2000:]
    assert res["state"] == "failed", res
    assert res["reason"].startswith("AUTHENTICATION_FAILED"), res
    log = (lab.bench.workdir / "charon-b.log").read_text(errors="replace")
    assert "received AUTHENTICATION_FAILED notify error" in log, log[-3000:]
    assert "ESTABLISHED" not in lab.list_sas()
