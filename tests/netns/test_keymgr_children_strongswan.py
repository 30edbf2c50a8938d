"""Two Child SAs in one IKE SA between keymgr and strongSwan 5.9.8, both directions (RFC 7296
§1.3.1 CREATE_CHILD_SA for a new Child SA, §1.4.1 Delete of one Child SA).

The labs of tests/netns/test_keymgr_strongswan.py (keymgr initiating) and
test_keymgr_responder_strongswan.py (charon initiating), with a second pair of protected
addresses: child 1 carries 198.51.100.1 <-> 203.0.113.1 as in every lab, child 2
10.77.1.1 <-> 10.77.2.1 (loopback addresses in A and B; the worker routes both of B's into
its TUN). charon's connection has the two children "bench" and "net2"; keymgr's has "net1" and
"net2".

* keymgr initiates with both children start_action start: "net1" goes in IKE_AUTH, "net2"
  follows by CREATE_CHILD_SA; charon lists both INSTALLED in one IKE SA; ping and a TCP
  transfer (SHA-256 compared by both ends) go through each child. ``ctl --terminate to-b
  --child net2`` sends our INFORMATIONAL Delete of that child: charon lists "net2" gone and
  the IKE SA and "bench" still there; traffic of child 1 still flows, child 2's does not.
* charon initiates "bench", then ``swanctl --initiate --child net2`` on the same IKE SA (and
  the other way round: "net2" in IKE_AUTH, which keymgr matches to its second child, then
  "bench"): keymgr as responder answers the CREATE_CHILD_SA and installs it; ping and TCP
  through both; terminating "net2" through keymgr's API leaves charon with "bench" only.

Each lab captures IKE on the link and keymgr exports its keys: at cleanup tshark must parse
and decrypt every captured IKEv2 message (CREATE_CHILD_SA and INFORMATIONAL included).
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from scripts import bench_strongswan as bsw
from tests.netns.test_keymgr_responder_strongswan import ResponderLab
from tests.netns.test_keymgr_strongswan import CLIENT, REPO, KeymgrLab, _env, open_lab

pytestmark = pytest.mark.netns

ADMIN = "admin"
WAIT = 20.0
A2, B2 = "10.77.1.1", "10.77.2.1"  # child 2's protected addresses in A and B
KEYMGR_CHILDREN = [
    {"name": "net1", "local_ts": f"{bsw.INNER_A}/32", "remote_ts": f"{bsw.INNER_B}/32"},
    {"name": "net2", "local_ts": f"{A2}/32", "remote_ts": f"{B2}/32"},
]


class _Children(KeymgrLab):
    """What both labs add: child 2's addresses and route, charon's second child, the API."""

    extra_routes = (f"{B2}/32",)

    def add_child2(self) -> None:
        for ns, addr in ((self.bench.ns_a, A2), (self.bench.ns_b, B2)):
            bsw._run(["ip", "-n", ns, "addr", "add", f"{addr}/32", "dev", "lo"])
        subprocess.run(
            [sys.executable, "-m", "services.runtime.devpki", str(self.pki), "--names", ADMIN],
            cwd=REPO,
            env=_env(),
            check=True,
            capture_output=True,
        )

    def charon_conf(self, psk: str) -> str:
        conf = bsw.swanctl_conf(bsw.OUTER_B, bsw.OUTER_A, bsw.INNER_B, bsw.INNER_A, psk)
        end = "        }\n    }\n}\nsecrets"
        assert conf.count(end) == 1, "template changed"
        net2 = (
            "            net2 {\n"
            "                mode = tunnel\n"
            f"                local_ts = {B2}/32\n"
            f"                remote_ts = {A2}/32\n"
            f"                esp_proposals = {bsw.ESP_PROPOSAL}\n"
            "                start_action = none\n"
            "            }\n"
        )
        return conf.replace(end, net2 + end)

    @property
    def api_sock(self) -> str:
        return f"unix:{self.workdir}/api.sock"

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``python -m services.keymgr.ctl`` against this lab's keymgr, as the admin."""
        argv = [sys.executable, "-m", "services.keymgr.ctl", "--api", self.api_sock]
        argv += ["--tls-dir", str(self.pki), "--server-name", CLIENT, "--client-name", ADMIN]
        return subprocess.run(
            [*argv, *args], capture_output=True, text=True, timeout=60, cwd=REPO, env=_env(),
            check=False,
        )  # fmt: skip


class ChildrenLab(_Children):
    pass


class ChildrenResponderLab(_Children, ResponderLab):
    pass


@pytest.fixture
def clab() -> Iterator[ChildrenLab]:
    yield from open_lab(ChildrenLab)


@pytest.fixture
def crlab() -> Iterator[ChildrenResponderLab]:
    yield from open_lab(ChildrenResponderLab)


def _child_line(sas: str, name: str) -> re.Match[str] | None:
    return re.search(rf"^\s+{name}: #\d+, reqid \d+, INSTALLED, TUNNEL", sas, re.MULTILINE)


def _wait_b(lab: KeymgrLab, pred: object, what: str, keymgr: subprocess.Popen[bytes]) -> str:
    deadline = time.monotonic() + WAIT
    sas = ""
    while time.monotonic() < deadline:
        assert keymgr.poll() is None, f"keymgr exited {keymgr.returncode}\n{lab.logs()}"
        sas = lab.list_sas_b()
        if pred(sas):  # type: ignore[operator]
            return sas
        time.sleep(0.3)
    raise AssertionError(f"charon: {what}\n{sas}\n{lab.logs()}")


def _ping_ok(p: subprocess.CompletedProcess[str], lab: KeymgrLab) -> None:
    print(p.stdout.strip().splitlines()[-2] if p.stdout.strip() else p.stderr)
    assert p.returncode == 0, f"{p.stdout}{p.stderr}\n{lab.logs()}"
    assert re.search(r"3 packets transmitted, 3 received", p.stdout), p.stdout


def _tcp_ok(lab: KeymgrLab, inner: tuple[str, str]) -> None:
    sent, got = lab.tcp_transfer(True, 128 * 1024, inner=inner)
    assert got["bytes"] == sent["bytes"] == 128 * 1024, (sent, got)
    assert sent["sha256"] == got["sha256"] == sent["peer_sha256"], (sent, got)
    print(f"tcp {inner[0]} -> {inner[1]}: {got['bytes']} bytes, sha256 equal")


def _wait_api(lab: KeymgrLab, keymgr: subprocess.Popen[bytes]) -> None:
    sock = lab.workdir / "api.sock"
    deadline = time.monotonic() + WAIT
    while not sock.exists():
        assert keymgr.poll() is None, f"keymgr exited\n{lab.logs()}"
        assert time.monotonic() < deadline, lab.logs()
        time.sleep(0.1)


def test_keymgr_initiates_two_children_and_terminates_one(clab: ChildrenLab) -> None:
    clab.add_child2()
    clab.start_responder()
    clab.start_worker()
    keymgr = clab.start_keymgr(
        extra={"children": KEYMGR_CHILDREN}, extra_args=["--api-listen", clab.api_sock]
    )
    sas = _wait_b(
        clab,
        lambda t: _child_line(t, bsw.CONN) and _child_line(t, "net2"),
        "both children installed",
        keymgr,
    )
    print(sas)
    assert sas.count("ESTABLISHED") == 1, sas  # one IKE SA carries both
    assert f"local  {B2}/32" in sas and f"remote {A2}/32" in sas, sas
    for inner in ((bsw.INNER_A, bsw.INNER_B), (A2, B2)):
        _ping_ok(clab.ping(inner), clab)
        _tcp_ok(clab, inner)
    _wait_api(clab, keymgr)
    listing = clab.ctl("--list-sas")
    print(listing.stdout)
    assert listing.returncode == 0, listing.stderr
    assert "  net1: INSTALLED" in listing.stdout and "  net2: INSTALLED" in listing.stdout

    term = clab.ctl("--terminate", "to-b", "--child", "net2")
    print(term.stdout.strip())
    assert term.returncode == 0 and "Delete sent for 1 Child SA" in term.stdout, term
    sas = _wait_b(clab, lambda t: not _child_line(t, "net2"), "net2 gone", keymgr)
    print(sas)
    assert _child_line(sas, bsw.CONN) and "ESTABLISHED" in sas, sas
    _ping_ok(clab.ping(), clab)
    _tcp_ok(clab, (bsw.INNER_A, bsw.INNER_B))
    gone = clab.ping((A2, B2))
    assert gone.returncode != 0, gone.stdout  # no Child SA carries child 2's traffic now
    listing = clab.ctl("--list-sas")
    assert "  net1: INSTALLED" in listing.stdout and "net2" not in listing.stdout


@pytest.mark.parametrize("first", [bsw.CONN, "net2"])
def test_strongswan_starts_child_two_and_keymgr_terminates_it(
    crlab: ChildrenResponderLab, first: str
) -> None:
    crlab.add_child2()
    crlab.start_initiator_charon()
    crlab.start_worker()
    keymgr = crlab.start_responder_keymgr(
        extra={"children": KEYMGR_CHILDREN}, extra_args=["--api-listen", crlab.api_sock]
    )
    crlab.wait_punt_connected(keymgr)
    # the first child in IKE_AUTH (keymgr matches it against each configured child), the
    # other by CREATE_CHILD_SA on the same IKE SA
    for child in (first, "net2" if first == bsw.CONN else bsw.CONN):
        init = crlab.initiate(child)
        assert init.returncode == 0, f"{init.stdout}{init.stderr}\n{crlab.logs()}"
    sas = _wait_b(
        crlab,
        lambda t: _child_line(t, bsw.CONN) and _child_line(t, "net2"),
        "both children installed",
        keymgr,
    )
    print(sas)
    assert sas.count("ESTABLISHED") == 1, sas
    for inner in ((bsw.INNER_A, bsw.INNER_B), (A2, B2)):
        _ping_ok(crlab.ping_from_b(inner), crlab)
        _tcp_ok(crlab, inner)
    _wait_api(crlab, keymgr)
    term = crlab.ctl("--terminate", "from-b", "--child", "net2")
    assert term.returncode == 0 and "Delete sent for 1 Child SA" in term.stdout, term
    sas = _wait_b(crlab, lambda t: not _child_line(t, "net2"), "net2 gone", keymgr)
    print(sas)
    assert _child_line(sas, bsw.CONN) and "ESTABLISHED" in sas, sas
    _ping_ok(crlab.ping_from_b(), crlab)


def _spis(sas: str, name: str) -> list[str]:
    """charon's inbound SPIs of child ``name`` (one per installed Child SA)."""
    out: list[str] = []
    blocks = re.split(r"\n(?=\s{2}\S+: #\d+, reqid)", sas)
    for b in blocks:
        if re.match(rf"\s+{name}: #\d+, reqid \d+, INSTALLED", b):
            m = re.search(r"\bin\s+([0-9a-f]{8})", b)
            if m:
                out.append(m.group(1))
    return out


@pytest.mark.parametrize("ike_up", [True, False], ids=["ike-up", "ike-trapped-too"])
def test_trap_child_comes_up_on_traffic_and_rekeys_alone(clab: ChildrenLab, ike_up: bool) -> None:
    """net2 trap with a short rekey_time: its PROTECT entry waits for traffic, whose ACQUIRE
    makes keymgr send CREATE_CHILD_SA on the IKE SA (up already with net1 start; or, with the
    connection trapped too, initiated first with net1 in IKE_AUTH); then keymgr rekeys net2
    on its own timer while net1 keeps its SAs."""
    clab.add_child2()
    clab.start_responder()
    clab.start_worker()
    children = [
        KEYMGR_CHILDREN[0],
        {
            **KEYMGR_CHILDREN[1],
            "start_action": "trap",
            "rekey_time": 6,
            "life_time": 30,
            "rand_time": 1,
        },
    ]
    extra: dict[str, object] = {"children": children}
    if not ike_up:
        extra["start_action"] = "trap"  # net1 inherits it
    keymgr = clab.start_keymgr(extra=extra)
    if ike_up:
        _wait_b(clab, lambda t: _child_line(t, bsw.CONN), "net1 installed", keymgr)
    else:
        deadline = time.monotonic() + WAIT
        while clab.log("keymgr.log", 200).count("trap installed") < 2:
            assert keymgr.poll() is None and time.monotonic() < deadline, clab.logs()
            time.sleep(0.1)
    time.sleep(1.0)
    sas = clab.list_sas_b()
    assert not _child_line(sas, "net2"), f"net2 created before any traffic\n{sas}"
    assert ("ESTABLISHED" in sas) is ike_up, sas
    ok = False
    deadline = time.monotonic() + 20
    while not ok and time.monotonic() < deadline:
        ok = clab.ping((A2, B2)).returncode == 0  # the first packets trigger the ACQUIRE
    log_text = clab.log("keymgr.log", 400)
    assert ok, clab.logs()
    assert "acquire: child" in log_text and "child initiating" in log_text, log_text
    sas = clab.list_sas_b()
    print(sas)
    assert sas.count("ESTABLISHED") == 1 and _child_line(sas, "net2"), sas
    first_net2 = _spis(sas, "net2")
    assert len(first_net2) == 1, sas
    net1 = _spis(sas, bsw.CONN)
    assert len(net1) == 1, sas
    # keymgr rekeys net2 (rekey_time 6 s, up to rand_time earlier): new SPIs, the old deleted
    sas = _wait_b(
        clab,
        lambda t: len(_spis(t, "net2")) == 1 and _spis(t, "net2") != first_net2,
        "net2 rekeyed",
        keymgr,
    )
    print(sas)
    assert _spis(sas, bsw.CONN) == net1, sas  # net1 untouched
    assert "child rekeyed" in clab.log("keymgr.log", 400)
    _ping_ok(clab.ping((A2, B2)), clab)
    _ping_ok(clab.ping(), clab)
