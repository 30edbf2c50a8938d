"""AH Child SAs negotiated by keymgr in both roles, with traffic, between two of our workers.

strongSwan cannot carry AH on this kernel: its kernel-libipsec implements ESP only (charon
negotiates the AH proposal and then logs "IPsec SA: protocol not supported" at install; see
test_keymgr_ah_strongswan.py). Here one keymgr initiates (worker A) and one responds (worker B)
in the dataplane lab (services/dataplane/lab.py), with ``ah_proposals``, in tunnel mode (site
to site) and in transport mode (host to host), IPv4 and IPv6, ESN off and on.

Oracles, on a capture of A's link taken from before keymgr starts:

* scapy's ``SecurityAssociation(AH, ...)``, keyed from keymgr A's ``--export-keys`` file
  (``esp_sa`` records with NULL encryption), verifies the ICV of every AH packet in both
  directions and finds ICMP / TCP inside; the same packet with one octet changed, or with the
  other direction's key, fails (the oracle can fail);
* tshark dissects every frame without a malformed packet or expert error, finds the ping and
  the TCP transfer inside AH and nothing of it in the clear;
* tshark decrypts every IKEv2 message with an Encrypted payload with the exported IKE SA keys
  (``check_ike_capture``).

A Child SA rekey started by keymgr A (PFS, 4 s): the new AH pair replaces the old one in
both workers, pings before and after verify on the old and then the new SPIs, and the
CREATE_CHILD_SA and Delete exchanges decrypt too.

Also: both keymgrs log the Child SA installed as AH with the configured suite and mode; both
workers hold AH SAs (not UDP-encapsulated although IKE moved to 4500) with the same SPIs
crosswise; ping and a 256 KiB TCP transfer (SHA-256 compared) go through and are counted.
keymgr processes, workers and namespaces are removed also on failure.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import secrets
import subprocess
import time
from collections.abc import Iterator

import pytest
from scapy.layers.inet import ICMP, IP, TCP
from scapy.layers.inet6 import ICMPv6EchoReply, ICMPv6EchoRequest, IPv6
from scapy.layers.ipsec import AH, IPSecIntegrityError, SecurityAssociation
from scapy.packet import Packet
from scapy.utils import rdpcap

from services.core.engine import SaStatus
from services.core.iana import IpProto
from services.core.sa import Direction, Mode
from services.dataplane.lab import SIDE_A, SIDE_B, Lab, lab, netns_supported
from tests.netns import tshark as ts
from tests.netns.test_keymgr_transport import _installed, _keymgr, _stop, _wait

pytestmark = pytest.mark.netns

# Wireshark's esp_sa authentication names -> scapy's AUTH_ALGOS
SCAPY_AUTH = {
    "HMAC-SHA-256-128 [RFC4868]": "SHA2-256-128",
    "HMAC-SHA-384-192 [RFC4868]": "SHA2-384-192",
    "HMAC-SHA-512-256 [RFC4868]": "SHA2-512-256",
}
_ESP_SA = re.compile(
    r'^uat:esp_sa:"(IPv4|IPv6)","([^"]+)","([^"]+)","0x([0-9a-f]{8})","NULL","",'
    r'"([^"]+)","0x([0-9a-f]+)"$'
)


@pytest.fixture
def ahlab() -> Iterator[Lab]:
    ok, why = netns_supported()
    if not ok:
        pytest.skip(why)
    for tool in ("tshark", "tcpdump", "ping"):
        if not any(
            os.access(os.path.join(d, tool), os.X_OK) for d in os.environ["PATH"].split(":")
        ):
            pytest.skip(f"{tool} not installed")
    with lab(prefix="kmah") as lb:
        yield lb


def _ah_sas(key_file: pathlib.Path, *, esn: bool, tunnel: bool) -> dict[int, SecurityAssociation]:
    """scapy SAs for every AH record of keymgr's key export, by SPI."""
    out: dict[int, SecurityAssociation] = {}
    for line in key_file.read_text().splitlines():
        m = _ESP_SA.match(line)
        if m is None:
            continue
        fam, src, dst, spi, auth, key = m.groups()
        hdr = (IP if fam == "IPv4" else IPv6)(src=src, dst=dst) if tunnel else None
        out[int(spi, 16)] = SecurityAssociation(
            AH,
            spi=int(spi, 16),
            auth_algo=SCAPY_AUTH[auth],
            auth_key=bytes.fromhex(key),
            tunnel_header=hdr,
            esn_en=esn,
            esn=0,
        )
    return out


def _ip(frame: Packet) -> Packet:
    """The IP packet of a captured Ethernet frame, re-dissected from its bytes."""
    if frame.haslayer(IP):
        return IP(bytes(frame[IP]))
    return IPv6(bytes(frame[IPv6]))


def _verify_ah(pcap: pathlib.Path, sas: dict[int, SecurityAssociation]) -> dict[str, int]:
    """Verify every AH packet of ``pcap`` with scapy; count what was inside."""
    seen = {"ah": 0, "icmp": 0, "tcp": 0}
    spis: set[int] = set()
    for frame in rdpcap(str(pcap)):
        if not frame.haslayer(AH):
            continue
        pkt = _ip(frame)
        spi = pkt[AH].spi
        assert spi in sas, f"AH packet with SPI {spi:#x} not in the key export"
        out = bytes(sas[spi].decrypt(pkt))  # raises IPSecIntegrityError on a bad ICV
        seen["ah"] += 1
        spis.add(spi)
        inner = IP(out) if out[0] >> 4 == 4 else IPv6(out)  # tunnel: inner; transport: stripped
        if (
            inner.haslayer(ICMP)
            or inner.haslayer(ICMPv6EchoRequest)
            or inner.haslayer(ICMPv6EchoReply)
        ):
            seen["icmp"] += 1
        if inner.haslayer(TCP):
            seen["tcp"] += 1
    assert len(spis) >= 2, f"AH seen on SPIs {sorted(spis)}: both directions expected"
    seen["spis"] = len(spis)
    return seen


def _oracle_can_fail(pcap: pathlib.Path, sas: dict[int, SecurityAssociation]) -> None:
    frame = next(f for f in rdpcap(str(pcap)) if f.haslayer(AH))
    pkt = _ip(frame)
    raw = bytearray(bytes(pkt))
    raw[-1] ^= 0x01  # one payload octet
    with pytest.raises(IPSecIntegrityError):
        sas[pkt[AH].spi].decrypt(type(pkt)(bytes(raw)))
    # the other direction's key on this packet
    sa = sas[pkt[AH].spi]
    other = next(x for spi, x in sas.items() if spi != pkt[AH].spi)
    wrong = SecurityAssociation(
        AH,
        spi=pkt[AH].spi,
        auth_algo=sa.auth_algo.name,
        auth_key=other.auth_key,
        tunnel_header=sa.tunnel_header,
        esn_en=sa.esn_en,
        esn=0,
    )
    with pytest.raises(IPSecIntegrityError):
        wrong.decrypt(_ip(frame))


@pytest.mark.parametrize(
    ("mode", "fam", "ah"),
    [
        ("tunnel", 4, "sha256"),
        ("transport", 4, "sha512"),
        ("tunnel", 6, "sha384-esn"),
        ("transport", 6, "sha256-esn"),
    ],
    ids=["tunnel-v4-sha256", "transport-v4-sha512", "tunnel-v6-sha384-esn", "transport-v6-esn"],
)
def test_ah_between_two_keymgrs(ahlab: Lab, mode: str, fam: int, ah: str) -> None:
    lb = ahlab
    psk_file = lb.workdir / "psk"
    fd = os.open(psk_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    secret = secrets.token_hex(32)
    with os.fdopen(fd, "w") as f:
        f.write(f"0x{secret}\n")
    keys_a = lb.workdir / "keys-a.txt"
    sa_mode = Mode.TRANSPORT if mode == "transport" else Mode.TUNNEL
    child = {"ah_proposals": [ah]}
    procs: list[subprocess.Popen[bytes]] = []
    cap = lb.capture(lb.a, f"ah-{mode}{fam}")
    try:
        log_b = _keymgr(lb, procs, "b", fam, psk_file, mode=mode, child=child)
        _wait(log_b, "punt stream connected", procs[0], 20)
        log_a = _keymgr(
            lb,
            procs,
            "a",
            fam,
            psk_file,
            mode=mode,
            child=child,
            extra_args=("--export-keys", str(keys_a)),
        )
        text_a = _wait(log_a, "child installed", procs[1], 20)
        text_b = _wait(log_b, "child installed", procs[0], 5)
        for text, role in ((text_a, "initiator"), (text_b, "responder")):
            rec = _installed(text)
            assert (rec["mode"], rec["esp"], rec["protocol"], rec["role"]) == (
                mode,
                ah,
                "ah",
                role,
            ), rec
            assert rec["encap"] == "ah", rec
            assert secret not in text.lower()
        sas = {n.label: {s.direction: s for s in n.dp().list_sas()} for n in lb.nodes}
        for label in ("a", "b"):
            assert {s.protocol for s in sas[label].values()} == {int(IpProto.AH)}, sas[label]
            assert {s.mode for s in sas[label].values()} == {mode}, sas[label]
            assert all(s.integ and not s.encap for s in sas[label].values()), sas[label]
        assert sas["a"][Direction.OUTBOUND].spi == sas["b"][Direction.INBOUND].spi
        assert sas["b"][Direction.OUTBOUND].spi == sas["a"][Direction.INBOUND].spi

        a_addr, b_addr = SIDE_A.inner(fam, sa_mode), SIDE_B.inner(fam, sa_mode)
        ping = lb.ping(lb.a, b_addr, src=a_addr, count=3)
        assert ping.ok, f"{ping.output}\n{lb.diagnostics()}"
        xfer = lb.tcp_transfer(lb.a, a_addr, lb.b, b_addr, 256 * 1024)
        assert xfer.ok, xfer
        assert xfer.sender_sha256 == xfer.receiver_sha256
        counts = {s.direction: s.packets for s in lb.a.dp().list_sas()}
        assert counts[Direction.OUTBOUND] >= 10 and counts[Direction.INBOUND] >= 10, counts
    finally:
        path = cap.stop()
        _stop(procs)

    # scapy: every AH packet's ICV, with the keys keymgr exported
    scapy_sas = _ah_sas(keys_a, esn=ah.endswith("-esn"), tunnel=mode == "tunnel")
    assert len(scapy_sas) == 2, keys_a.read_text().count("esp_sa")
    seen = _verify_ah(path, scapy_sas)
    assert seen["ah"] >= 20 and seen["icmp"] >= 6 and seen["tcp"] >= 10, seen
    _oracle_can_fail(path, scapy_sas)
    print(f"scapy: {seen['ah']} AH packets, every ICV verified ({seen})")

    # tshark: no malformed frame, traffic only inside AH
    frames = ts.frames(path)
    bad = [f for f in frames if f.malformed]
    assert bad == [], [(f.number, f.messages) for f in bad]
    traffic = [f for f in frames if not f.link_control and "isakmp" not in f.protocols]
    ah_frames = [f for f in traffic if f.wrapped_in("ah")]
    assert len(ah_frames) == seen["ah"], ts.summary(traffic)
    assert "esp" not in {p for f in traffic for p in f.protocols}, ts.summary(traffic)
    clear = [f for f in traffic if not f.protected and f.inner_l4() in ("tcp", "icmp", "icmpv6")]
    assert clear == [], ts.summary(clear)

    # tshark: the IKEv2 messages decrypt with the exported IKE SA keys
    check = ts.check_ike_capture(path, keys_a)
    print(check.summary())
    assert check.ok, check.problems
    assert check.messages >= 4 and check.encrypted >= 2, check.summary()


def test_ah_child_rekey_between_two_keymgrs(ahlab: Lab) -> None:
    """keymgr A rekeys its AH Child SA (with PFS) after 4 s: CREATE_CHILD_SA with REKEY_SA for
    protocol AH, the new AH pair installed make-before-break, the old one deleted; traffic
    before and after is AH with valid ICVs on the old and then the new SPIs."""
    lb = ahlab
    psk_file = lb.workdir / "psk"
    fd = os.open(psk_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"0x{secrets.token_hex(32)}\n")
    keys_a = lb.workdir / "keys-a.txt"
    ah = "sha256-x25519"
    procs: list[subprocess.Popen[bytes]] = []
    cap = lb.capture(lb.a, "ah-rekey")
    try:
        log_b = _keymgr(lb, procs, "b", 4, psk_file, mode="tunnel", child={"ah_proposals": [ah]})
        _wait(log_b, "punt stream connected", procs[0], 20)
        rekeying = {"ah_proposals": [ah], "rekey_time": 4, "life_time": 60, "rand_time": 0}
        log_a = _keymgr(
            lb,
            procs,
            "a",
            4,
            psk_file,
            mode="tunnel",
            child=rekeying,
            extra_args=("--export-keys", str(keys_a)),
        )
        _wait(log_a, "child installed", procs[1], 20)
        a_addr, b_addr = SIDE_A.inner(4, Mode.TUNNEL), SIDE_B.inner(4, Mode.TUNNEL)
        first = {s.direction: s.spi for s in lb.a.dp().list_sas()}
        assert lb.ping(lb.a, b_addr, src=a_addr, count=2).ok
        text_a = _wait(log_a, '"child rekeyed"', procs[1], 20)
        (rec,) = [json.loads(x) for x in text_a.splitlines() if '"child rekeyed"' in x][:1]
        assert (rec["protocol"], rec["esp"], rec["started_by"]) == ("ah", ah, "us"), rec
        _wait(log_b, '"child rekeyed"', procs[0], 5)
        # make-before-break, then the old pair goes with its Delete
        deadline = time.monotonic() + 10
        now_sas: list[SaStatus] = []
        while time.monotonic() < deadline:
            now_sas = lb.a.dp().list_sas()
            if len(now_sas) == 2 and first[Direction.INBOUND] not in {s.spi for s in now_sas}:
                break
            time.sleep(0.2)
        assert len(now_sas) == 2 and all(s.protocol == IpProto.AH for s in now_sas), now_sas
        assert {s.spi for s in now_sas}.isdisjoint(first.values()), (now_sas, first)
        ping = lb.ping(lb.a, b_addr, src=a_addr, count=3)
        assert ping.ok, f"{ping.output}\n{lb.diagnostics()}"
    finally:
        path = cap.stop()
        _stop(procs)
    scapy_sas = _ah_sas(keys_a, esn=False, tunnel=True)
    assert len(scapy_sas) >= 4, keys_a.read_text().count("esp_sa")
    seen = _verify_ah(path, scapy_sas)
    assert seen["spis"] >= 4 and seen["icmp"] >= 10, seen  # old and new pair both carried pings
    print(f"scapy: {seen['ah']} AH packets on {seen['spis']} SPIs, every ICV verified")
    check = ts.check_ike_capture(path, keys_a)
    print(check.summary())
    assert check.ok and check.encrypted >= 6, check.summary()  # AUTH, CREATE_CHILD_SA, Delete
