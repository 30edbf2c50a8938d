"""Workers enforce policyd's compiled policy (docs/policyd.md, "Consumers"): policyd on SQLite
with its watch stream on a unix socket (mutual TLS, the lab PKI), two workers in the lab's
namespaces following it (``--policyd``), a policy with permit / block / negotiate rules
applied over REST.

Checked: both workers report the revision (GET /v1/enforced); a permitted flow crosses clear,
a blocked one never reaches the wire; inbound clear packets (injected on the link, so that
they do not pass the sending worker) to a "require security" destination are dropped by the
receiving worker's nftables filter while a "request security" one is delivered (RFC 4301
§5.2); with policyd stopped, a restarted worker enforces its state file; a policy changed
while policyd was down reaches the worker without a restart once policyd is back.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.core.iana import IpProto
from services.core.packet import build_ipv4
from services.dataplane.lab import LINK_IF, SIDE_A, SIDE_B, Lab, Node, lab
from services.runtime import devpki
from tests.netns.conftest import skip_reason
from tests.unit.policyd_support import ADMIN, READER
from tests.unit.test_policyd_server import Policyd

pytestmark = pytest.mark.netns

BLOCKED_PORT = 7009
REQUIRE_PORT = 7210
REQUEST_PORT = 7310


def _doc(blocked_action: str) -> dict[str, Any]:
    site_a, site_b = SIDE_A.site4, SIDE_B.site4

    def flist(name: str, **f: Any) -> dict[str, Any]:
        return {"name": name, "filters": [{"source": site_a, "destination": site_b, **f}]}

    negotiate = {"action": "negotiate", "security_methods": [{"esp": "aes256gcm16"}]}
    auth = [{"method": "psk", "psk_ref": "lab"}]
    return {
        "filter_lists": [
            flist("ping", protocol="icmp"),
            flist("blocked", protocol="udp", destination_port=BLOCKED_PORT),
            flist("secure", protocol="udp", destination_port=REQUIRE_PORT),
            flist("optional", protocol="udp", destination_port=REQUEST_PORT),
        ],
        "filter_actions": [
            {"name": "permit", "action": "permit"},
            {"name": "block", "action": "block"},
            {"name": "require", **negotiate},
            {"name": "request", **negotiate, "accept_unsecured": True, "allow_fallback": True},
        ],
        "policies": [
            {
                "name": "lab",
                "main_mode": {"proposals": ["aes256gcm16-prfsha256-x25519"]},
                "assigned_to": ["worker-a", "worker-b"],
                "rules": [
                    {"name": "ping", "filter_list": "ping", "filter_action": "permit"},
                    {"name": "blocked", "filter_list": "blocked", "filter_action": blocked_action},
                    {
                        "name": "secure",
                        "filter_list": "secure",
                        "filter_action": "require",
                        "auth_methods": auth,
                    },
                    {
                        "name": "optional",
                        "filter_list": "optional",
                        "filter_action": "request",
                        "auth_methods": auth,
                    },
                ],
            }
        ],
    }


def wait_for(what: str, cond: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if cond():
                return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _apply(pd: Policyd, doc: dict[str, Any]) -> int:
    r = httpx.post(f"{pd.base}/v1/apply", json=doc, headers=ADMIN, timeout=30)
    assert r.status_code == 200, r.text
    rev = httpx.get(f"{pd.base}/v1/revision", headers=READER, timeout=10).json()
    return int(rev["revision"])


def _enforced(pd: Policyd) -> dict[str, int]:
    body = httpx.get(f"{pd.base}/v1/enforced", headers=READER, timeout=10).json()
    return {e["component"]: int(e["revision"]) for e in body["enforced"]}


def _worker_args(the_lab: Lab, node: Node, sock: Path) -> list[str]:
    return [
        "--policyd",
        f"unix:{sock}",
        "--policyd-server-name",
        "policyd",
        "--policy-state",
        str(the_lab.workdir / f"{node.worker_id}-policy.json"),
        "--policyd-retry-max",
        "1",
    ]


def _send_udp(node: Node, src: str, dst: str, port: int) -> None:
    code = (
        "import socket,sys\n"
        "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
        "s.bind((sys.argv[1],0))\n"
        "s.sendto(b'policy-test',(sys.argv[2],int(sys.argv[3])))\n"
    )
    node.run(sys.executable, "-c", code, src, dst, str(port))


def _mac(node: Node) -> bytes:
    out = node.run("ip", "-j", "link", "show", LINK_IF).stdout
    return bytes.fromhex(json.loads(out)[0]["address"].replace(":", ""))


def _udp_frame(dst_mac: bytes, src_mac: bytes, src: str, dst: str, dport: int) -> bytes:
    payload = b"clear-inbound"
    udp = (40000).to_bytes(2, "big") + dport.to_bytes(2, "big")
    udp += (8 + len(payload)).to_bytes(2, "big") + b"\x00\x00" + payload  # checksum 0: none
    ip = build_ipv4(
        ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed, IpProto.UDP, len(udp)
    )
    return dst_mac + src_mac + b"\x08\x00" + ip + udp


RECEIVER = """
import json, select, socket, sys, time
socks = []
for p in sys.argv[2:]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((sys.argv[1], int(p)))
    socks.append(s)
print("listening", flush=True)
got = []
end = time.monotonic() + 20  # the last port's packet is sent last: after it, drain briefly
while time.monotonic() < end:
    r, _, _ = select.select(socks, [], [], 0.2)
    for s in r:
        got.append(s.getsockname()[1])
        s.recv(2048)
    if int(sys.argv[-1]) in got:
        end = min(end, time.monotonic() + 0.5)
print(json.dumps(sorted(set(got))), flush=True)
"""


def _captured(path: Path, bpf: str) -> int:
    res = subprocess.run(
        ["tcpdump", "-r", str(path), "-n", bpf],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return len([ln for ln in res.stdout.splitlines() if ln.strip()])


@pytest.fixture
def env(tmp_path: Path) -> Iterator[tuple[Lab, Policyd, Path]]:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    with lab(workers=False, prefix="ippw") as the_lab:
        the_lab.pki.mkdir()
        devpki.create(the_lab.pki, ["worker-a", "worker-b", "client", "policyd"])
        # what a worker sends clear (BYPASS) leaves with its fwmark, through the main table
        for n in the_lab.nodes:
            peer = the_lab.peer(n).side
            n.run("ip", "route", "add", f"{peer.site4}/32", "via", peer.outer4, "dev", LINK_IF)
        sock = the_lab.workdir / "policyd.sock"
        grpc_flags = (
            "--grpc-listen",
            f"unix:{sock}",
            "--tls-dir",
            str(the_lab.pki),
            "--tls-cert-name",
            "policyd",
            "--revision-poll",
            "0.2",
        )
        pd = Policyd(f"sqlite:///{tmp_path / 'policyd.db'}", tmp_path, grpc_flags)
        try:
            pd.start()
            yield the_lab, pd, sock
        finally:
            pd.kill()


def test_workers_enforce_policyd_policy(env: tuple[Lab, Policyd, Path]) -> None:
    the_lab, pd, sock = env
    a, b = the_lab.a, the_lab.b
    rev = _apply(pd, _doc("block"))
    for n in (a, b):
        the_lab.start_worker(n, extra_args=_worker_args(the_lab, n, sock))

    # both workers enforce and report the revision
    wait_for(
        "both workers report the revision",
        lambda: (
            _enforced(pd)
            == {
                "worker-a": rev,
                "worker-b": rev,
            }
        ),
    )
    for n in (a, b):
        assert n.dp().stats().policy_revision == rev

    # permitted (ICMP) crosses clear; blocked UDP never reaches the wire
    with the_lab.capturing(b, "policy-b") as cap:
        ping = the_lab.ping(a, SIDE_B.site4, src=SIDE_A.site4, count=2)
        _send_udp(a, SIDE_A.site4, SIDE_B.site4, BLOCKED_PORT)
    assert ping.ok, ping.output + the_lab.diagnostics()
    assert _captured(cap.path, f"icmp and host {SIDE_B.site4}") >= 4  # requests + replies
    assert _captured(cap.path, f"udp port {BLOCKED_PORT}") == 0
    wait_for("the drop", lambda: a.dp().stats().drops.get("policy_discard", 0) >= 1)

    # inbound clear packets that bypass worker-a: "require" dropped, "request" delivered
    recv = the_lab.popen(
        b,
        sys.executable,
        "-c",
        RECEIVER,
        SIDE_B.site4,
        str(REQUIRE_PORT),
        str(REQUEST_PORT),
        stdout=subprocess.PIPE,
    )
    assert recv.stdout is not None
    assert recv.stdout.readline().strip() == b"listening"
    mac_a, mac_b = _mac(a), _mac(b)
    for port in (REQUIRE_PORT, REQUEST_PORT):
        the_lab.inject(a, _udp_frame(mac_b, mac_a, SIDE_A.site4, SIDE_B.site4, port))
    out, _ = recv.communicate(timeout=30)
    assert json.loads(out.decode().strip().splitlines()[-1]) == [REQUEST_PORT]
    wait_for(
        "filter counters",
        lambda: (
            b.dp().stats().inbound_filter.get("require", 0) >= 1
            and b.dp().stats().inbound_filter.get("request", 0) >= 1
        ),
    )

    # policyd down: a restarted worker enforces its state file
    pd.kill()
    the_lab.stop_worker(a)
    the_lab.start_worker(a, extra_args=_worker_args(the_lab, a, sock))
    assert a.dp().stats().policy_revision == rev
    before = a.dp().stats().drops.get("policy_discard", 0)
    _send_udp(a, SIDE_A.site4, SIDE_B.site4, BLOCKED_PORT)
    wait_for("the drop", lambda: a.dp().stats().drops.get("policy_discard", 0) == before + 1)
    assert the_lab.ping(a, SIDE_B.site4, src=SIDE_A.site4, count=1).ok

    # the policy changes while the watch stream is down (REST only), then policyd comes back
    rest_only = Policyd(pd.db_url, pd.log.parent)
    try:
        rest_only.start()
        new_rev = _apply(rest_only, _doc("permit"))
    finally:
        rest_only.kill()
    assert new_rev == rev + 1
    assert a.dp().stats().policy_revision == rev
    pd.start()
    wait_for("worker-a picks up the new revision", lambda: _enforced(pd).get("worker-a") == new_rev)
    assert a.dp().stats().policy_revision == new_rev
    bypassed = a.dp().stats().bypass_packets
    _send_udp(a, SIDE_A.site4, SIDE_B.site4, BLOCKED_PORT)
    wait_for("the bypass", lambda: a.dp().stats().bypass_packets == bypassed + 1)
    # the worker leaves its nftables table behind on no exit path
    the_lab.stop_worker(a)
    assert "ipsec_worker_a" not in a.run("nft", "list", "tables").stdout
