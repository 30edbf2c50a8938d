"""CHILD SA and IKE SA rekeys between keymgr and strongSwan 5.9.8, started by either side
(RFC 7296 §1.3.2, §1.3.3, §2.8, §2.18) — same lab as tests/netns/test_keymgr_strongswan.py
(keymgr initiates towards charon in namespace B through our worker in namespace A; unique
namespace names; everything removed on failure).

Cases (each while a ping loop with a 20 ms interval runs through the tunnel):

* ``charon-child`` / ``charon-child-pfs``: ``swanctl --rekey --child`` on B (ESP ``aes256gcm16``
  and ``aes256gcm16-x25519``);
* ``keymgr-child``: keymgr's ``rekey_time`` (6 s, no jitter) starts the CHILD SA rekey;
* ``keymgr-ike``: keymgr's ``ike_rekey_time`` (6 s) starts the IKE SA rekey;
* ``charon-ike``: ``swanctl --rekey --ike`` on B.

The ``keymgr-child``, ``keymgr-ike`` and ``charon-ike`` cases run a second time with keymgr
as IKE responder (charon initiated the IKE SA; lab of
tests/netns/test_keymgr_responder_strongswan.py), so the IKE SA rekey's new SPIs are routed to
a responder session too.

After each rekey: charon lists exactly one Child SA (one IKE SA) with SPIs other than the old
ones, our worker holds exactly the same Child SA pair (the old pair deleted, same reqid), and
for IKE rekeys the new IKE SPIs charon lists are the ones keymgr logged. After an IKE rekey a
CHILD SA rekey by charon proves the new IKE SA's keys (SK_d) agree. Lost pings are printed and
bounded; a ping afterwards passes; keymgr's SIGTERM Delete is answered on the (new) IKE SA.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from scripts import bench_strongswan as bsw
from services.core.sa import Direction
from tests.netns.test_keymgr_responder_strongswan import ResponderLab
from tests.netns.test_keymgr_strongswan import KeymgrLab, open_lab

pytestmark = pytest.mark.netns

PING_INTERVAL = 0.02
PING_COUNT = 400  # 8 s
MAX_LOST = 10  # pings lost across one rekey (2.5 %)


@dataclass(frozen=True)
class Case:
    esp: str = "aes256gcm16"
    conn: dict[str, object] = field(default_factory=dict)  # keymgr connection fields
    charon: tuple[str, ...] = ()  # swanctl arguments that start the rekey on B
    ike: bool = False  # the IKE SA is rekeyed (else the CHILD SA)
    by_keymgr: bool = False


CASES = {
    "charon-child": Case(charon=("--rekey", "--child", bsw.CONN)),
    "charon-child-pfs": Case(esp="aes256gcm16-x25519", charon=("--rekey", "--child", bsw.CONN)),
    "keymgr-child": Case(conn={"rekey_time": 6, "rand_time": 0, "life_time": 60}, by_keymgr=True),
    "keymgr-ike": Case(conn={"ike_rekey_time": 6, "rekey_time": 0}, ike=True, by_keymgr=True),
    "charon-ike": Case(charon=("--rekey", "--ike", bsw.CONN), ike=True),
}
# keymgr as IKE responder (charon initiated the IKE SA): the rekeys of either side
RESPONDER_CASES = {
    "keymgr-child": CASES["keymgr-child"],
    "keymgr-ike": CASES["keymgr-ike"],
    "charon-ike": CASES["charon-ike"],
}


@pytest.fixture
def lab() -> Iterator[KeymgrLab]:
    yield from open_lab(KeymgrLab)


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


def _b_ike(sas: str) -> list[tuple[str, str]]:
    """(SPIi, SPIr) of each IKE SA charon lists."""
    return re.findall(r"\b([0-9a-f]{16})_i\*? ([0-9a-f]{16})_r\*?", sas)


def _ours(kmlab: KeymgrLab) -> tuple[int, int] | None:
    assert kmlab.client is not None
    sas = kmlab.client.list_sas()
    if len(sas) != 2:
        return None
    by_dir = {s.direction: s for s in sas}
    if set(by_dir) != {Direction.INBOUND, Direction.OUTBOUND}:
        return None
    return by_dir[Direction.OUTBOUND].spi, by_dir[Direction.INBOUND].spi


def _log_records(kmlab: KeymgrLab, msg: str) -> list[dict[str, object]]:
    text = (kmlab.workdir / "keymgr.log").read_text(errors="replace")
    out = []
    for line in text.splitlines():
        if f'"msg":"{msg}"' in line:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def _child_rekeyed(kmlab: KeymgrLab, old: tuple[int, int]) -> tuple[int, int]:
    """Wait until charon and our worker both hold exactly one Child SA pair, not ``old``."""

    def done() -> bool:
        sas = kmlab.list_sas_b()
        b = _b_spis(sas)
        return len(b) == 1 and b != [old] and sas.count("INSTALLED") == 1 and _ours(kmlab) == b[0]

    assert _wait(done, 15), f"{kmlab.list_sas_b()}\nours={_ours(kmlab)}\n{kmlab.logs()}"
    (new,) = _b_spis(kmlab.list_sas_b())
    assert new[0] != old[0] and new[1] != old[1]
    return new


def _ping_loop(kmlab: KeymgrLab) -> subprocess.Popen[str]:
    cmd = ["ip", "netns", "exec", kmlab.bench.ns_a, "ping", "-c", str(PING_COUNT)]
    cmd += ["-i", str(PING_INTERVAL), "-W", "1", "-I", bsw.INNER_A, bsw.INNER_B]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture
def rlab() -> Iterator[ResponderLab]:
    yield from open_lab(ResponderLab)


@pytest.mark.parametrize("name", list(CASES))
def test_rekey_with_strongswan_under_traffic(lab: KeymgrLab, name: str) -> None:
    case = CASES[name]
    _start_responder(lab, case.esp)
    lab.start_worker()
    keymgr = lab.start_keymgr(case.conn)
    _exercise(lab, keymgr, case, name)


@pytest.mark.parametrize("name", list(RESPONDER_CASES))
def test_rekey_keymgr_responder_with_strongswan_under_traffic(
    rlab: ResponderLab, name: str
) -> None:
    case = RESPONDER_CASES[name]
    rlab.start_worker()
    keymgr = rlab.start_responder_keymgr(case.conn)
    rlab.wait_punt_connected(keymgr)
    rlab.start_initiator_charon()
    init = rlab.initiate()
    assert init.returncode == 0, f"{init.stdout[-2000:]}\n{rlab.logs()}"
    _exercise(rlab, keymgr, case, f"{name}, keymgr responding")


def _exercise(kmlab: KeymgrLab, keymgr: subprocess.Popen[bytes], case: Case, name: str) -> None:
    client = kmlab.client
    assert client is not None
    assert _wait(lambda: "INSTALLED" in kmlab.list_sas_b() and _ours(kmlab) is not None, 20), (
        kmlab.logs()
    )
    sas_b = kmlab.list_sas_b()
    old = _ours(kmlab)
    assert old is not None and _b_spis(sas_b) == [old], sas_b
    (old_ike,) = _b_ike(sas_b)
    reqid = client.list_sas()[0].reqid
    ping = kmlab.ping()
    assert ping.returncode == 0, f"{ping.stdout}{ping.stderr}\n{kmlab.logs()}"

    loop = _ping_loop(kmlab)
    try:
        time.sleep(1.0)
        if case.charon:
            print(kmlab.bench.swanctl("b", *case.charon))
        if case.ike:
            # one IKE SA with new SPIs on charon, the same that keymgr logged; Child SA kept
            def ike_done() -> bool:
                ike = _b_ike(kmlab.list_sas_b())
                logged = [(r["spi_i"], r["spi_r"]) for r in _log_records(kmlab, "ike rekeyed")]
                return len(ike) == 1 and ike != [old_ike] and ike[0] in logged

            assert _wait(ike_done, 15), f"{kmlab.list_sas_b()}\n{kmlab.logs()}"
            assert _b_spis(kmlab.list_sas_b()) == [old] and _ours(kmlab) == old
            new_ike = _b_ike(kmlab.list_sas_b())[0]
            print(f"IKE SA {old_ike} -> {new_ike}")
        else:
            new = _child_rekeyed(kmlab, old)
            print(f"Child SA {old} -> {new}")
        out, _ = loop.communicate(timeout=60)
    finally:
        if loop.poll() is None:
            loop.kill()
            loop.wait()
    stats = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    assert stats, out
    sent, got = int(stats.group(1)), int(stats.group(2))
    print(f"ping loop across the rekey ({name}): {sent} sent, {got} received, {sent - got} lost")
    assert sent - got <= MAX_LOST, f"{sent - got} pings lost\n{kmlab.logs()}"

    rekeyed = _log_records(kmlab, "ike rekeyed" if case.ike else "child rekeyed")
    assert rekeyed, kmlab.logs()
    assert rekeyed[0]["started_by"] == ("us" if case.by_keymgr else "peer"), rekeyed[0]
    if case.ike:
        # the new IKE SA's SK_d: a CHILD SA rekey over it gives keys both sides agree on
        print(kmlab.bench.swanctl("b", "--rekey", "--child", bsw.CONN))
        new = _child_rekeyed(kmlab, old)
    assert all(s.reqid == reqid for s in client.list_sas())
    sas_b = kmlab.list_sas_b()
    print(sas_b)
    if "x25519" in case.esp:
        assert re.search(r"ESP:AES_GCM_16-256/CURVE_25519", sas_b), sas_b
    ping = kmlab.ping()
    print(ping.stdout)
    assert ping.returncode == 0, f"{ping.stdout}{ping.stderr}\n{kmlab.logs()}"
    assert re.search(r"3 packets transmitted, 3 received", ping.stdout), ping.stdout
    assert keymgr.poll() is None, kmlab.logs()
    log_text = (kmlab.workdir / "keymgr.log").read_text(errors="replace")
    print("\n".join(x for x in log_text.splitlines() if "rekey" in x or "child removed" in x))
    assert kmlab.psk not in log_text.lower()
    keymgr.terminate()
    assert keymgr.wait(timeout=10) == 0, kmlab.logs()
    assert client.list_sas() == []
    # charon saw our Delete of the (current) IKE SA
    assert _wait(lambda: "ESTABLISHED" not in kmlab.list_sas_b(), 5), kmlab.list_sas_b()
