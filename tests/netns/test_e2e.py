"""End to end through two dataplane workers in two network namespaces: ping and a TCP transfer
(SHA-256 checked at both ends) in transport and tunnel mode (RFC 4303 §3.1, RFC 4302 §3.1),
IPv4 and IPv6, raw ESP, ESP-in-UDP (RFC 3948), AH and an ESP+AH bundle (RFC 4301 §4.5).

A capture on the veth link is the oracle: without keys tshark must see nothing but ESP/AH
(plus ARP / neighbour discovery), with our keys in its esp_sa table it must decrypt every ESP
frame to the inner ICMP/TCP with a good ICV, and it must flag no frame malformed or as an
error. For AH, whose payload is visible by design, every inner packet must be inside AH, and
scapy must verify the ICV of every AH frame (tshark does not check AH ICVs).
"""

from __future__ import annotations

import base64
import ipaddress
from pathlib import Path
from typing import Any

import pytest

from services.core.iana import Encr, Integ, IpProto
from services.core.sa import Direction, Mode
from services.dataplane.lab import Encap, Lab, SaProfile, SaSet, make_sa_set
from tests.netns import tshark as ts

pytestmark = pytest.mark.netns

TRANSFER_BYTES = 1 << 20
PING_COUNT = 3

PROFILES = [
    pytest.param(p, id=p.label())
    for p in [
        SaProfile(mode=mode, family=fam, encap=encap)
        for mode in (Mode.TRANSPORT, Mode.TUNNEL)
        for fam in (4, 6)
        for encap in (Encap.ESP, Encap.ESP_UDP, Encap.AH)
    ]
    + [
        SaProfile(mode=Mode.TRANSPORT, family=4, encap=Encap.ESP_AH),
        SaProfile(mode=Mode.TUNNEL, family=6, encap=Encap.ESP_AH),
    ]
]
# a non-combined cipher too, so tshark also checks our CBC layout and HMAC ICV
CBC_PROFILE = SaProfile(
    mode=Mode.TUNNEL,
    family=4,
    encap=Encap.ESP_UDP,
    encr_id=Encr.AES_CBC,
    encr_bits=128,
    integ_id=Integ.HMAC_SHA2_256_128,
)


SCAPY_INTEG: dict[int, str] = {
    Integ.HMAC_SHA2_256_128: "SHA2-256-128",
    Integ.HMAC_SHA2_384_192: "SHA2-384-192",
    Integ.HMAC_SHA2_512_256: "SHA2-512-256",
}


def _verify_ah_with_scapy(pcap: Path, sa_set: SaSet) -> int:
    """tshark does not check AH ICVs; scapy (an independent implementation) does. Every AH
    frame on the link must verify with its SA's key. Returns the number verified."""
    from scapy.layers.inet import IP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.ipsec import AH, SecurityAssociation
    from scapy.utils import rdpcap

    by_spi = {c.spi: c for c in sa_set.all_sas() if c.protocol == IpProto.AH}
    verified = 0
    for frame in rdpcap(str(pcap)):
        if AH not in frame:
            continue
        cfg = by_spi[frame[AH].spi]
        outer = frame[IP] if IP in frame else frame[IPv6]
        kw: dict[str, Any] = {}
        if cfg.mode == Mode.TUNNEL:
            layer = IP if len(cfg.src) == 4 else IPv6
            kw["tunnel_header"] = layer(
                src=str(ipaddress.ip_address(cfg.src)), dst=str(ipaddress.ip_address(cfg.dst))
            )
        sa = SecurityAssociation(  # type: ignore[no-untyped-call]
            AH, spi=cfg.spi, auth_algo=SCAPY_INTEG[cfg.integ_id], auth_key=cfg.integ_key, **kw
        )
        sa.decrypt(outer.copy())  # type: ignore[no-untyped-call]  # raises on a bad ICV
        verified += 1
    return verified


def _drops(lb: Lab) -> dict[str, dict[str, int]]:
    return {n.label: dict(n.dp().stats().drops) for n in lb.nodes}


def _run_traffic(lb: Lab, sa_set: SaSet, name: str) -> tuple[list[ts.Frame], list[ts.Frame]]:
    """Install ``sa_set``, ping and transfer A -> B under capture; return (clear, decrypted)."""
    lb.install(sa_set)
    before = _drops(lb)
    a_addr, b_addr = sa_set.addresses()
    with lb.capturing(lb.a, name) as cap:
        ping = lb.ping(lb.a, b_addr, src=a_addr, count=PING_COUNT)
        assert ping.ok, f"ping {a_addr} -> {b_addr} failed:\n{ping.output}\n{lb.diagnostics()}"
        xfer = lb.tcp_transfer(lb.a, a_addr, lb.b, b_addr, TRANSFER_BYTES)
    assert xfer.ok, f"TCP transfer corrupted or short: {xfer}"
    after = _drops(lb)
    for label in ("a", "b"):
        for reason in ("auth_failed", "replay", "malformed", "bad_padding"):
            n = after[label].get(reason, 0) - before[label].get(reason, 0)
            assert n == 0, f"worker-{label} dropped {n} packet(s) as {reason}"
    clear = ts.frames(cap.path)
    decrypted = ts.frames(cap.path, sas=sa_set.all_sas())
    if IpProto.AH in sa_set.profile.encap.protocols:
        n_ah = sum("ah" in f.protocols for f in clear)
        assert _verify_ah_with_scapy(cap.path, sa_set) == n_ah > 0
    return clear, decrypted


def _check_counters(lb: Lab, sa_set: SaSet) -> None:
    """Both workers counted traffic on every SA and no ICV / replay failures."""
    for node in lb.nodes:
        sas = {(s.spi, s.direction): s for s in node.dp().list_sas()}
        for cfg in sa_set.for_side(node.label):
            st = sas.get((cfg.spi, cfg.direction))
            assert st is not None, f"{node.worker_id} lost SA {cfg.describe()}"
            assert st.packets > 0, f"{node.worker_id}: no packets on {cfg.describe()}"
            assert st.auth_drops == 0 and st.replay_drops == 0, (node.worker_id, st)
        stats = node.dp().stats()
        assert stats.internal_errors == 0, stats


def _check_wire(profile: SaProfile, clear: list[ts.Frame], decrypted: list[ts.Frame]) -> None:
    summary = ts.summary(clear)
    # 1. without keys: the link carried only ESP/AH (and ARP / ND / MLD)
    leaked = [f.number for f in clear if not f.protected and not f.link_control]
    assert not leaked, f"frames outside ESP/AH on the link: {leaked[:10]}; {summary}"
    carrier = "ah" if profile.encap in (Encap.AH, Encap.ESP_AH) else "esp"
    protected = [f for f in clear if carrier in f.protocols]
    assert len(protected) >= 2 * PING_COUNT, summary
    if profile.encap == Encap.AH:
        # AH does not hide the payload (RFC 4302 §1): every inner packet must be inside AH
        inner = [f for f in clear if f.inner_l4()]
        assert inner, f"no inner packets visible under AH: {summary}"
        assert all(f.wrapped_in("ah") for f in inner), summary
    else:
        readable = [f.number for f in clear if f.inner_l4()]
        assert not readable, f"inner traffic readable without keys: {readable[:10]}; {summary}"
    if profile.encap == Encap.ESP_UDP:
        assert all("udpencap" in f.protocols for f in protected), summary
    bad = [(f.number, f.messages) for f in clear if f.malformed]
    assert not bad, f"tshark flags frames (no keys): {bad[:5]}"

    # 2. with keys: every ESP frame decrypts, ICV verified, inner ICMP and TCP visible
    flagged = [(f.number, f.protocols, f.messages) for f in decrypted if f.malformed]
    assert not flagged, f"tshark flags frames (decrypted): {flagged[:5]}"
    esp = [f for f in decrypted if "esp" in f.protocols]
    if profile.encap != Encap.AH:
        assert esp, ts.summary(decrypted)
        undecrypted = [f.number for f in esp if f.inner_l4() is None]
        assert not undecrypted, f"tshark could not decrypt: {undecrypted[:10]}"
        bad_icv = [f.number for f in esp if f.icv_bad or not f.icv_good]
        assert not bad_icv, f"ICV not verified by tshark: {bad_icv[:10]}"
    inner = [f for f in decrypted if f.inner_l4()]
    assert all(f.wrapped_in(carrier) for f in inner)
    echo = [f for f in inner if set(f.icmp_types) & {0, 8} or set(f.icmpv6_types) & {128, 129}]
    assert len(echo) >= 2 * PING_COUNT, f"echo request/reply missing: {ts.summary(decrypted)}"
    assert any(f.inner_l4() == "tcp" for f in inner), ts.summary(decrypted)
    ip = "ip" if profile.family == 4 else "ipv6"
    want_ip_headers = 2 if profile.mode == Mode.TUNNEL else 1
    wrong = [f.number for f in inner if f.protocols.count(ip) != want_ip_headers]
    assert not wrong, f"{profile.mode.name.lower()} mode needs {want_ip_headers} IP header(s)"


@pytest.mark.parametrize("profile", PROFILES)
def test_ping_and_tcp_are_protected_on_the_wire(netns_lab: Lab, profile: SaProfile) -> None:
    sa_set = make_sa_set(profile)
    clear, decrypted = _run_traffic(netns_lab, sa_set, profile.label())
    _check_wire(profile, clear, decrypted)
    _check_counters(netns_lab, sa_set)


def test_aes_cbc_hmac_sha256_decrypts_in_tshark(netns_lab: Lab) -> None:
    sa_set = make_sa_set(CBC_PROFILE)
    clear, decrypted = _run_traffic(netns_lab, sa_set, "cbc")
    _check_wire(CBC_PROFILE, clear, decrypted)
    _check_counters(netns_lab, sa_set)


def test_list_sas_never_returns_keys(netns_lab: Lab) -> None:
    sa_set = make_sa_set(SaProfile())
    netns_lab.install(sa_set)
    keys = [c.encr_key for c in sa_set.all_sas()] + [c.integ_key for c in sa_set.all_sas()]
    for node in netns_lab.nodes:
        listed = node.dp().list_sas()
        assert {(s.spi, s.direction) for s in listed} >= {
            (c.spi, c.direction) for c in sa_set.for_side(node.label)
        }
        text = repr(listed).encode() + repr(node.dp().stats()).encode()
        for k in keys:
            if k:
                assert k not in text and k.hex().encode() not in text
        assert all(s.direction in (Direction.INBOUND, Direction.OUTBOUND) for s in listed)


def test_worker_logs_never_contain_keys(netns_lab: Lab) -> None:
    """The real worker processes, after installs, traffic, updates and deletes, logged no key
    material in any encoding (raw, hex either case, base64)."""
    sa_set = make_sa_set(SaProfile(encap=Encap.ESP_UDP))
    netns_lab.install(sa_set)
    a, _b = netns_lab.nodes
    assert netns_lab.ping(a, "203.0.113.1", src="198.51.100.1").ok
    netns_lab.clear_sas()
    keys = [k for c in sa_set.all_sas() for k in (c.encr_key, c.integ_key) if k]
    assert keys
    for node in netns_lab.nodes:
        log = node.log_path.read_bytes()
        assert log, f"{node.worker_id} wrote no log at all (the check would be vacuous)"
        for k in keys:
            for form in (k, k.hex().encode(), k.hex().upper().encode(), base64.b64encode(k)):
                assert form not in log, f"key material in {node.worker_id}'s log"
