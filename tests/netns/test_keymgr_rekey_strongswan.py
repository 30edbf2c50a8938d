"""keymgr answers strongSwan's CHILD SA rekey (RFC 7296 §1.3.3, §2.8) — same lab as
tests/netns/test_keymgr_strongswan.py (keymgr initiates towards charon in namespace B through
our worker in namespace A; unique namespace names; everything removed on failure).

After the tunnel is up and ping passes, ``swanctl --rekey --child`` on B makes charon send
CREATE_CHILD_SA { N(REKEY_SA), SA, Ni, [KEi], TSi, TSr } and then Delete the old Child SA.
Asserted: charon lists exactly one INSTALLED Child SA with new SPIs, our worker holds exactly
that pair (the old one deleted, same reqid), a ping loop running across the rekey is reported
(lost packets printed) and a ping afterwards passes. Two cases: ESP without PFS
(``aes256gcm16``) and with PFS (``aes256gcm16-x25519``).
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest

from scripts import bench_strongswan as bsw
from services.core.sa import Direction
from tests.netns.test_keymgr_strongswan import KeymgrLab, _skip_reason

pytestmark = pytest.mark.netns


@pytest.fixture
def lab() -> Iterator[KeymgrLab]:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    kl = None
    try:
        kl = KeymgrLab()
        yield kl
    finally:
        if kl is not None:
            kl.cleanup()


def _start_responder(kmlab: KeymgrLab, esp: str) -> None:
    b = kmlab.bench
    conf = bsw.swanctl_conf(bsw.OUTER_B, bsw.OUTER_A, bsw.INNER_B, bsw.INNER_A, kmlab.psk)
    conf = conf.replace(f"esp_proposals = {bsw.ESP_PROPOSAL}", f"esp_proposals = {esp}")
    assert f"esp_proposals = {esp}" in conf
    proc = b.start_charon("b", b.ns_b, conf)
    b.wait_vici("b", proc)
    b.swanctl("b", "--load-all", "--noprompt", "--file", str(b.workdir / "b/swanctl/swanctl.conf"))


def _wait(cond: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.2)
    return False


def _b_spis(sas: str) -> list[tuple[int, int]]:
    """(B's inbound = our outbound, B's outbound = our inbound) of each INSTALLED child."""
    ins = [int(x, 16) for x in re.findall(r"\bin\s+([0-9a-f]{8})", sas)]
    outs = [int(x, 16) for x in re.findall(r"\bout\s+([0-9a-f]{8})", sas)]
    return list(zip(ins, outs, strict=False))


def _ours(kmlab: KeymgrLab) -> tuple[int, int] | None:
    assert kmlab.client is not None
    sas = kmlab.client.list_sas()
    if len(sas) != 2:
        return None
    by_dir = {s.direction: s for s in sas}
    if set(by_dir) != {Direction.INBOUND, Direction.OUTBOUND}:
        return None
    return by_dir[Direction.OUTBOUND].spi, by_dir[Direction.INBOUND].spi


@pytest.mark.parametrize("esp", ["aes256gcm16", "aes256gcm16-x25519"])
def test_strongswan_rekeys_child_keymgr_installs_new_pair(lab: KeymgrLab, esp: str) -> None:
    kmlab = lab
    _start_responder(kmlab, esp)
    kmlab.start_worker()
    keymgr = kmlab.start_keymgr()
    client = kmlab.client
    assert client is not None
    assert _wait(lambda: "INSTALLED" in kmlab.list_sas_b() and _ours(kmlab) is not None, 20), (
        kmlab.logs()
    )
    before_b = _b_spis(kmlab.list_sas_b())
    old = _ours(kmlab)
    assert before_b == [old], f"{before_b} {old}"
    reqid = client.list_sas()[0].reqid
    ping = kmlab.ping()
    assert ping.returncode == 0, f"{ping.stdout}{ping.stderr}\n{kmlab.logs()}"

    # a ping loop across the rekey (100 ms interval, about 6 s)
    loop_cmd = ["ip", "netns", "exec", kmlab.bench.ns_a, "ping", "-c", "60", "-i", "0.1"]
    loop_cmd += ["-W", "1", "-I", bsw.INNER_A, bsw.INNER_B]
    loop = subprocess.Popen(loop_cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(1.5)
        print(kmlab.bench.swanctl("b", "--rekey", "--child", bsw.CONN))
        # charon: exactly one INSTALLED child with SPIs other than the old ones
        assert _wait(
            lambda: (
                len(_b_spis(kmlab.list_sas_b())) == 1
                and _b_spis(kmlab.list_sas_b()) != [old]
                and kmlab.list_sas_b().count("INSTALLED") == 1
            )
        ), f"{kmlab.list_sas_b()}\n{kmlab.logs()}"
        new_b = _b_spis(kmlab.list_sas_b())
        # our worker: exactly the new pair (the old one deleted after charon's Delete)
        assert _wait(lambda: _ours(kmlab) == new_b[0]), (
            f"ours={_ours(kmlab)} b={new_b} {client.list_sas()}\n{kmlab.logs()}"
        )
        out, _ = loop.communicate(timeout=30)
    finally:
        if loop.poll() is None:
            loop.kill()
            loop.wait()
    sas_b = kmlab.list_sas_b()
    print(sas_b)
    assert new_b[0][0] != old[0] and new_b[0][1] != old[1]
    assert all(s.reqid == reqid for s in client.list_sas())
    if "x25519" in esp:
        assert re.search(r"ESP:AES_GCM_16-256/CURVE_25519", sas_b), sas_b
    stats = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    assert stats, out
    sent, got = int(stats.group(1)), int(stats.group(2))
    print(f"ping loop across the rekey ({esp}): {sent} sent, {got} received, {sent - got} lost")
    ping = kmlab.ping()
    print(ping.stdout)
    assert ping.returncode == 0, f"{ping.stdout}{ping.stderr}\n{kmlab.logs()}"
    assert re.search(r"3 packets transmitted, 3 received", ping.stdout), ping.stdout
    counts = {s.direction.name.lower(): s.packets for s in client.list_sas()}
    print(f"new SA packets: {counts}")
    assert counts["outbound"] >= 3 and counts["inbound"] >= 3, counts
    assert keymgr.poll() is None, kmlab.logs()
    log_text = (kmlab.workdir / "keymgr.log").read_text(errors="replace")
    print("\n".join(x for x in log_text.splitlines() if "rekeyed" in x or "old child" in x))
    assert "child rekeyed" in log_text and "old child removed" in log_text, log_text
    assert kmlab.psk not in log_text.lower()
    keymgr.terminate()
    assert keymgr.wait(timeout=10) == 0, kmlab.logs()
    assert client.list_sas() == []
