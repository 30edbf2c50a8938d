"""Property tests (hypothesis) for the core's robustness and correctness.

* engine.inbound / inbound_udp / outbound never raise, whatever the bytes: random bytes,
  IP-shaped datagrams with random extension headers / options aimed at installed SAs, and
  mutated valid packets. A ``None`` result is always exactly one counted drop.
* parse_ip and flow_key raise nothing but MalformedPacket.
* protect -> unprotect round trips for random payloads and sizes across every algorithm, both
  modes, both families, ESN, ESP-in-UDP and TFC padding, including several packets per SA
  delivered in a random order (the persistent CBC contexts must not care about order).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from services.core.engine import Dataplane, UdpKind
from services.core.events import DropReason
from services.core.iana import Encr, Integ, IpProto
from services.core.packet import (
    MalformedPacket,
    build_ipv4,
    build_ipv6,
    checksum,
    flow_key,
    parse_ip,
)
from services.core.sa import Direction, Mode, SaConfig, UdpEncap
from services.core.selectors import Selector
from services.core.spd import Action, SpdEntry

FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ROUND = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _a(s: str) -> bytes:
    return ipaddress.ip_address(s).packed


@dataclass(frozen=True)
class Alg:
    name: str
    protocol: int
    encr_id: int
    encr_key_len: int
    integ_id: int = 0
    integ_key_len: int = 0
    legacy: bool = False


ALGS = [
    Alg("aes-gcm-128", IpProto.ESP, Encr.AES_GCM_16, 20),
    Alg("aes-gcm-256", IpProto.ESP, Encr.AES_GCM_16, 36),
    Alg("chacha20-poly1305", IpProto.ESP, Encr.CHACHA20_POLY1305, 36),
    Alg("aes-cbc-128-sha256", IpProto.ESP, Encr.AES_CBC, 16, Integ.HMAC_SHA2_256_128, 32),
    Alg("aes-cbc-256-sha512", IpProto.ESP, Encr.AES_CBC, 32, Integ.HMAC_SHA2_512_256, 64),
    Alg("null-sha384", IpProto.ESP, Encr.NULL, 0, Integ.HMAC_SHA2_384_192, 48),
    Alg("aes-gmac-128", IpProto.ESP, Encr.NULL_AUTH_AES_GMAC, 20),
    Alg("3des-sha1", IpProto.ESP, Encr.TRIPLE_DES, 24, Integ.HMAC_SHA1_96, 20, legacy=True),
    Alg("aes-cbc-legacy-no-integ", IpProto.ESP, Encr.AES_CBC, 16, legacy=True),
    Alg("ah-sha256", IpProto.AH, 0, 0, Integ.HMAC_SHA2_256_128, 32),
    Alg("ah-sha1", IpProto.AH, 0, 0, Integ.HMAC_SHA1_96, 20, legacy=True),
]

GW4 = (_a("192.0.2.1"), _a("192.0.2.2"))
GW6 = (_a("2001:db8::a"), _a("2001:db8::b"))
H4 = (_a("10.0.0.1"), _a("10.0.0.2"))
H6 = (_a("2001:db8:1::1"), _a("2001:db8:2::1"))


def _cfg(
    alg: Alg,
    direction: Direction,
    mode: Mode,
    v6: bool,
    *,
    spi: int,
    esn: bool = False,
    encap: bool = False,
    tfc: int = 0,
    reqid: int = 1,
) -> SaConfig:
    if mode == Mode.TUNNEL:
        s, d = GW6 if v6 else GW4
    else:
        s, d = H6 if v6 else H4
    return SaConfig(
        spi=spi,
        protocol=alg.protocol,
        direction=direction,
        mode=mode,
        src=s,
        dst=d,
        encr_id=alg.encr_id,
        encr_key=bytes((i * 7 + 3) & 0xFF for i in range(alg.encr_key_len)),
        integ_id=alg.integ_id,
        integ_key=bytes((i * 11 + 5) & 0xFF for i in range(alg.integ_key_len)),
        esn=esn,
        allow_legacy=alg.legacy,
        encap=UdpEncap() if encap else None,
        tfc_pad_to=tfc if mode == Mode.TUNNEL else 0,
        reqid=reqid,
    )


def _inner(v6: bool, payload: bytes, proto: int = IpProto.UDP) -> bytes:
    body = payload
    if proto == IpProto.UDP:
        body = struct.pack("!HHHH", 1234, 5678, 8 + len(payload), 0) + payload
    s, d = H6 if v6 else H4
    if v6:
        return build_ipv6(s, d, proto, len(body)) + body
    return build_ipv4(s, d, proto, len(body)) + body


def _inner_with_options(v6: bool, payload: bytes) -> bytes:
    """A UDP datagram with IPv4 options (Router Alert: immutable; Timestamp: mutable) or IPv6
    hop-by-hop and destination options (with and without the change-en-route bit)."""
    body = struct.pack("!HHHH", 1234, 5678, 8 + len(payload), 0) + payload
    if v6:
        hbh = bytes([60, 1]) + b"\x05\x02\x00\x00" + b"\x3e\x04abcd" + b"\x01\x02\x00\x00"
        dst = bytes([IpProto.UDP, 0]) + b"\x1e\x02xy" + b"\x01\x00"
        ext = hbh + dst
        return build_ipv6(H6[0], H6[1], 0, len(ext) + len(body)) + ext + body
    options = b"\x94\x04\x00\x00" + b"\x44\x08\x05\x00\x01\x02\x03\x04" + b"\x01\x01\x01\x00"
    hdr = bytearray(build_ipv4(H4[0], H4[1], IpProto.UDP, len(options) + len(body)))
    hdr[0] = 0x45 + len(options) // 4
    hdr[2:4] = (20 + len(options) + len(body)).to_bytes(2, "big")
    hdr += options
    hdr[10:12] = b"\x00\x00"
    hdr[10:12] = checksum(bytes(hdr)).to_bytes(2, "big")
    return bytes(hdr) + body


# --- a victim dataplane with many SAs, and valid seed packets -----------------------------

SEED_SPECS = [
    (alg, mode, v6, esn, encap)
    for alg in ALGS
    for mode in (Mode.TRANSPORT, Mode.TUNNEL)
    for v6 in (False, True)
    for esn, encap in ((False, False), (True, alg.protocol == IpProto.ESP))
]


def _victim() -> tuple[Dataplane, list[bytes], list[int]]:
    """An inbound dataplane holding one SA per seed spec, and one valid packet for each."""
    rx = Dataplane()
    seeds: list[bytes] = []
    spis: list[int] = []
    for i, (alg, mode, v6, esn, encap) in enumerate(SEED_SPECS):
        spi = 0x1000 + i
        rx.install_sa(_cfg(alg, Direction.INBOUND, mode, v6, spi=spi, esn=esn, encap=encap), 0.0)
        tx = Dataplane()
        tx.install_sa(
            _cfg(alg, Direction.OUTBOUND, mode, v6, spi=spi, esn=esn, encap=encap, reqid=9), 0.0
        )
        sel = Selector.make("::/0", "::/0") if v6 else Selector.make("0.0.0.0/0", "0.0.0.0/0")
        tx.replace_spd([SpdEntry(1, 1, Action.PROTECT, sel, reqid=9, protocols=(alg.protocol,))], 1)
        make = _inner_with_options if mode == Mode.TRANSPORT and i % 2 else _inner
        out = tx.outbound(make(v6, bytes([i]) * (i % 40)), 0.0)
        assert out is not None, (alg.name, tx.drops)
        seeds.append(out.packet)
        spis.append(spi)
    return rx, seeds, spis


VICTIM, SEEDS, SPIS = _victim()

# (spi, outer destination, protocol, encap, AH payload-length byte) of every victim SA, so that
# generated datagrams reach SA processing instead of stopping at NO_SA
_TARGETS = [
    (
        sa.spi,
        sa.cfg.dst,
        sa.cfg.protocol,
        sa.cfg.encap is not None,
        (getattr(sa, "ah_len", lambda v: 0)(6 if len(sa.cfg.dst) == 16 else 4) // 4 - 2) & 0xFF,
    )
    for sa in VICTIM.inbound_sas.values()
]
TARGETS4 = [t for t in _TARGETS if len(t[1]) == 4]
TARGETS6 = [t for t in _TARGETS if len(t[1]) == 16]


def _ipsec_body(draw: st.DrawFn, target: tuple[int, bytes, int, bool, int]) -> tuple[int, bytes]:
    """(protocol, bytes after the IP header) aimed at ``target``: a plausible ESP, ESP-in-UDP
    or AH header with the SA's SPI, then random bytes."""
    spi, _, proto, encap, ah_pl = target
    tail = draw(st.binary(max_size=160))
    seq = draw(st.sampled_from([0, 1, 2, 0xFFFFFFFF])).to_bytes(4, "big")
    if proto == IpProto.AH:
        nh = draw(st.sampled_from([4, 41, 50, 6, 17, 59, 0]))
        pl = draw(st.one_of(st.just(ah_pl), st.integers(0, 255)))
        return proto, bytes([nh, pl, 0, 0]) + spi.to_bytes(4, "big") + seq + tail
    esp = spi.to_bytes(4, "big") + seq + tail
    if encap:
        return IpProto.UDP, struct.pack("!HHHH", 4500, 4500, 8 + len(esp), 0) + esp
    return proto, esp


def _fresh_victim() -> Dataplane:
    """Same SAs, fresh replay state (the module-level victim is shared across examples)."""
    return VICTIM


def _checked_inbound(dp: Dataplane, pkt: bytes) -> bytes | None:
    before = dp.drops.total()
    got = dp.inbound(pkt, 1.0)
    assert dp.drops.total() == before + (got is None)
    return got


def _checked_outbound(dp: Dataplane, pkt: bytes) -> None:
    before = dp.drops.total()
    got = dp.outbound(pkt, 1.0)
    assert dp.drops.total() == before + (got is None)


def _sender() -> Dataplane:
    tx = Dataplane()
    tx.install_sa(_cfg(ALGS[0], Direction.OUTBOUND, Mode.TUNNEL, False, spi=0x900, reqid=1), 0.0)
    tx.install_sa(_cfg(ALGS[9], Direction.OUTBOUND, Mode.TRANSPORT, False, spi=0x901, reqid=2), 0.0)
    tx.install_sa(_cfg(ALGS[3], Direction.OUTBOUND, Mode.TRANSPORT, True, spi=0x902, reqid=3), 0.0)
    tx.install_sa(_cfg(ALGS[10], Direction.OUTBOUND, Mode.TRANSPORT, True, spi=0x903, reqid=3), 0.0)
    tx.install_sa(
        _cfg(ALGS[1], Direction.OUTBOUND, Mode.TUNNEL, True, spi=0x904, reqid=4, encap=True), 0.0
    )
    tx.replace_spd(
        [
            SpdEntry(1, 1, Action.BYPASS, Selector.make("10.9.0.0/16", "0.0.0.0/0")),
            SpdEntry(2, 2, Action.DISCARD, Selector.make("10.8.0.0/16", "0.0.0.0/0")),
            SpdEntry(3, 3, Action.PROTECT, Selector.make("0.0.0.0/0", "10.0.0.0/8"), reqid=1),
            SpdEntry(
                4,
                4,
                Action.PROTECT,
                Selector.make("0.0.0.0/0", "0.0.0.0/0", IpProto.TCP),
                reqid=2,
                protocols=(51,),
            ),
            SpdEntry(
                5,
                5,
                Action.PROTECT,
                Selector.make("2001:db8::/32", "::/0"),
                reqid=3,
                protocols=(50, 51),
            ),
            SpdEntry(6, 6, Action.PROTECT, Selector.make("::/0", "::/0", IpProto.UDP), reqid=4),
            SpdEntry(7, 7, Action.PROTECT, Selector.make("0.0.0.0/0", "0.0.0.0/0"), reqid=99),
        ],
        1,
    )
    return tx


SENDER = _sender()


# --- strategies --------------------------------------------------------------------------------


@st.composite
def ipv4_shaped(draw: st.DrawFn) -> bytes:
    """An IPv4 datagram with consistent lengths, random options (mutable and immutable ones
    for AH's zeroing) and flags, aimed at an installed SA so processing reaches the SA code."""
    target = draw(st.sampled_from(TARGETS4))
    proto, body = _ipsec_body(draw, target)
    if draw(st.integers(0, 5)) == 0:
        proto, body = draw(st.sampled_from([6, 17, 4, 255])), draw(st.binary(max_size=80))
    options = b"".join(
        draw(
            st.lists(
                st.one_of(
                    st.sampled_from(
                        [
                            b"\x01",
                            b"\x00",
                            b"\x94\x04\x00\x00",
                            b"\x07\x07\x04\x00\x00\x00\x00",
                            b"\x44\x08\x05\x00\x00\x00\x00\x00",
                            b"\x82\x03\x00",
                        ]
                    ),
                    st.binary(min_size=1, max_size=6),
                ),
                max_size=6,
            )
        )
    )
    options = options[:40]
    options += bytes(-len(options) % 4)
    dst = target[1] if draw(st.integers(0, 9)) else _a("203.0.113.9")
    flags = draw(st.sampled_from([0, 0, 0x4000, 0x2000, 0x0001]))
    hdr = struct.pack(
        "!BBHHHBBH4s4s",
        0x45 + len(options) // 4,
        draw(st.integers(0, 255)),
        20 + len(options) + len(body),
        0,
        flags,
        64,
        proto,
        0,
        H4[0],
        dst,
    )
    return hdr + options + body


@st.composite
def ipv6_shaped(draw: st.DrawFn) -> bytes:
    """An IPv6 datagram with a random chain of extension headers (hop-by-hop, routing,
    fragment, destination options; options with and without the change-en-route bit, random
    bytes) ending in ESP/AH/ESP-in-UDP aimed at an installed SA, or in something else."""
    target = draw(st.sampled_from(TARGETS6))
    last, body = _ipsec_body(draw, target)
    if draw(st.integers(0, 5)) == 0:
        last, body = draw(st.sampled_from([59, 6, 17])), draw(st.binary(max_size=80))
    chain = draw(st.lists(st.sampled_from([0, 43, 44, 60]), max_size=4))
    nhs = [*chain[1:], last]
    ext = b""
    for kind, nh in zip(chain, nhs, strict=False):  # empty chain: nothing to emit
        if kind == 44:
            ext += bytes([nh, 0]) + draw(
                st.sampled_from([bytes(6), b"\x00\x01" + bytes(4), b"\xff\xf9" + bytes(4)])
            )
        elif kind == 43:
            units = draw(st.integers(0, 2))
            ext += bytes(
                [nh, units, draw(st.sampled_from([0, 2, 4])), draw(st.sampled_from([0, 0, 1]))]
            ) + bytes(4 + units * 8)
        else:
            units = draw(st.integers(0, 3))
            opts = b"".join(
                draw(
                    st.lists(
                        st.sampled_from(
                            [
                                b"\x00",
                                b"\x01\x00",
                                b"\x05\x02\x00\x00",
                                b"\x3e\x04abcd",
                                b"\x1e\x02xy",
                                b"\x01\x07" + bytes(7),
                                b"\xc2\x04\x00\x01\x00\x00",
                            ]
                        ),
                        max_size=5,
                    )
                )
            )
            room = 6 + units * 8
            opts = opts[:room]
            opts += draw(st.sampled_from([b"\x00", b"\x01"])) * 0 + bytes(room - len(opts))
            if draw(st.integers(0, 4)) == 0:
                opts = draw(st.binary(min_size=room, max_size=room))
            ext += bytes([nh, units]) + opts
    dst = target[1] if draw(st.integers(0, 9)) else _a("2001:db8::dead")
    first = chain[0] if chain else last
    return build_ipv6(H6[0], dst, first, len(ext) + len(body)) + ext + body


@st.composite
def mutated_seed(draw: st.DrawFn) -> bytes:
    pkt = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "cut", "grow", "delete", "insert"]))
        n = len(pkt)
        if op in ("flip", "set") and n:
            i = draw(st.integers(0, n - 1))
            pkt[i] = (
                pkt[i] ^ (1 << draw(st.integers(0, 7)))
                if op == "flip"
                else draw(st.integers(0, 255))
            )
        elif op == "cut":
            del pkt[draw(st.integers(0, n)) :]
        elif op == "grow":
            pkt += draw(st.binary(min_size=1, max_size=40))
        elif op == "delete" and n:
            i = draw(st.integers(0, n - 1))
            del pkt[i : i + draw(st.integers(1, 16))]
        elif op == "insert":
            i = draw(st.integers(0, n))
            pkt[i:i] = draw(st.binary(min_size=1, max_size=16))
    if draw(st.booleans()) and len(pkt) >= 20:  # keep the IP length field consistent
        if pkt[0] >> 4 == 4:
            pkt[2:4] = min(len(pkt), 0xFFFF).to_bytes(2, "big")
        elif pkt[0] >> 4 == 6 and len(pkt) >= 40:
            pkt[4:6] = min(len(pkt) - 40, 0xFFFF).to_bytes(2, "big")
    return bytes(pkt)


ANY_PACKET = st.one_of(st.binary(max_size=300), ipv4_shaped(), ipv6_shaped(), mutated_seed())


# --- never raise -------------------------------------------------------------------------------


@FUZZ
@given(ANY_PACKET)
def test_parse_ip_and_flow_key_raise_only_malformed_packet(data: bytes) -> None:
    for fn in (parse_ip, flow_key):
        try:
            fn(data)
            fn(memoryview(data))
        except MalformedPacket:
            pass


@FUZZ
@given(ANY_PACKET)
def test_inbound_never_raises_and_counts_every_drop(data: bytes) -> None:
    _checked_inbound(VICTIM, data)


@FUZZ
@given(ANY_PACKET)
def test_outbound_never_raises_and_counts_every_drop(data: bytes) -> None:
    _checked_outbound(SENDER, data)


@FUZZ
@given(
    st.sampled_from([(GW4[0], GW4[1]), (H4[0], H4[1]), (GW6[0], GW6[1]), (H6[0], H6[1])]),
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFF),
    st.one_of(
        st.binary(max_size=120),
        st.sampled_from(SPIS).flatmap(
            lambda s: st.binary(max_size=120).map(lambda b: s.to_bytes(4, "big") + b)
        ),
        mutated_seed().map(lambda p: p[28:] if p and p[0] >> 4 == 4 else p[48:]),
    ),
)
def test_inbound_udp_never_raises(
    addrs: tuple[bytes, bytes], sport: int, dport: int, payload: bytes
) -> None:
    before = VICTIM.drops.total()
    kind, clear = VICTIM.inbound_udp(addrs[0], addrs[1], sport, dport, payload, 1.0)
    if kind in (UdpKind.KEEPALIVE, UdpKind.INVALID):
        assert clear is None
    assert VICTIM.drops.total() - before <= 1


def test_seeds_are_valid_and_reach_every_sa() -> None:
    """The fuzz seeds are real packets: a fresh receiver accepts every one of them."""
    rx, seeds, _ = _victim()
    for pkt in seeds:
        assert rx.inbound(pkt, 0.0) is not None, rx.drops
    assert not rx.drops


# --- round trips ---------------------------------------------------------------------------


@ROUND
@given(
    alg=st.sampled_from(ALGS),
    mode=st.sampled_from([Mode.TRANSPORT, Mode.TUNNEL]),
    v6=st.booleans(),
    esn=st.booleans(),
    encap=st.booleans(),
    tfc=st.sampled_from([0, 0, 200, 1400]),
    payloads=st.lists(st.binary(max_size=1500), min_size=1, max_size=5),
    order=st.randoms(use_true_random=False),
    proto=st.sampled_from([IpProto.UDP, IpProto.TCP, IpProto.ICMP, 59]),
)
def test_protect_then_unprotect_round_trips(
    alg: Alg,
    mode: Mode,
    v6: bool,
    esn: bool,
    encap: bool,
    tfc: int,
    payloads: list[bytes],
    order: object,
    proto: int,
) -> None:
    encap = encap and alg.protocol == IpProto.ESP
    assume(not (proto == 59 and mode == Mode.TRANSPORT and alg.protocol == IpProto.ESP))
    start = (1 << 32) - 2 if esn else 1  # ESN runs cross the 2^32 boundary
    tx = Dataplane()
    cfg = _cfg(alg, Direction.OUTBOUND, mode, v6, spi=0x5000, esn=esn, encap=encap, tfc=tfc)
    tx.install_sa(
        SaConfig(
            **{
                **{f: getattr(cfg, f) for f in SaConfig.__dataclass_fields__},
                "seq_lease_start": start,
            }
        ),
        0.0,
    )
    sel = Selector.make("::/0", "::/0") if v6 else Selector.make("0.0.0.0/0", "0.0.0.0/0")
    tx.replace_spd([SpdEntry(1, 1, Action.PROTECT, sel, reqid=1, protocols=(alg.protocol,))], 1)
    rx = Dataplane()
    in_sa = rx.install_sa(
        _cfg(alg, Direction.INBOUND, mode, v6, spi=0x5000, esn=esn, encap=encap), 0.0
    )
    if esn:
        in_sa.replay.update(start - 1)
    sent = []
    for p in payloads:
        inner = _inner(v6, p, proto)
        out = tx.outbound(inner, 0.0)
        assert out is not None, tx.drops
        if encap:
            assert out.udp_offset and out.packet[out.udp_offset - 8 : out.udp_offset - 6] == (
                b"\x11\x94"
            )
        sent.append((inner, out.packet))
    idx = list(range(len(sent)))
    order.shuffle(idx)  # type: ignore[attr-defined]
    for i in idx:
        inner, wire = sent[i]
        assert rx.inbound(wire, 0.0) == inner, (alg.name, rx.drops)
        if encap:  # and through the UDP socket path, as a replay
            uo = (wire[0] & 0x0F) * 4 + 8 if not v6 else 48
            s, d = (GW6 if v6 else GW4) if mode == Mode.TUNNEL else (H6 if v6 else H4)
            kind, clear = rx.inbound_udp(s, d, 4500, 4500, wire[uo:], 0.0)
            assert kind is UdpKind.ESP and clear is None
    assert in_sa.packets == len(sent)
    assert in_sa.replay_drops == (len(sent) if encap else 0)
    assert in_sa.auth_drops == 0


# --- sizes at the 64 KiB limit -----------------------------------------------------------------


def _big_inner(v6: bool, total: int) -> bytes:
    """A UDP datagram of exactly ``total`` octets (IPv6: header included)."""
    n = total - (40 if v6 else 20) - 8
    return _inner(v6, bytes(n))


SIZE_CASES = [
    pytest.param(
        alg,
        mode,
        v6,
        encap,
        id=f"{alg.name}-{mode.name.lower()}-{'ipv6' if v6 else 'ipv4'}{'-udp' if encap else ''}",
    )
    for alg in (ALGS[0], ALGS[3], ALGS[9])
    for mode in (Mode.TRANSPORT, Mode.TUNNEL)
    for v6 in (False, True)
    for encap in ((False, True) if alg.protocol == IpProto.ESP else (False,))
]


@pytest.mark.parametrize("alg,mode,v6,encap", SIZE_CASES)
def test_packets_at_the_size_limit_round_trip_or_are_a_counted_too_big_drop(
    alg: Alg, mode: Mode, v6: bool, encap: bool
) -> None:
    tx = Dataplane()
    tx.install_sa(_cfg(alg, Direction.OUTBOUND, mode, v6, spi=0x6000, encap=encap), 0.0)
    sel = Selector.make("::/0", "::/0") if v6 else Selector.make("0.0.0.0/0", "0.0.0.0/0")
    tx.replace_spd([SpdEntry(1, 1, Action.PROTECT, sel, reqid=1, protocols=(alg.protocol,))], 1)
    rx = Dataplane()
    rx.install_sa(_cfg(alg, Direction.INBOUND, mode, v6, spi=0x6000, encap=encap), 0.0)
    limit = 0xFFFF + (40 if v6 else 0)  # the largest datagram the inner header can describe
    delivered = dropped = 0
    for total in [*range(limit - 160, limit + 1, 5), limit]:
        inner = _big_inner(v6, total)
        out = tx.outbound(inner, 0.0)
        if out is None:
            dropped += 1
            assert set(tx.drops) == {DropReason.TOO_BIG}
        else:
            delivered += 1
            assert rx.inbound(out.packet, 0.0) == inner
    assert tx.drops[DropReason.TOO_BIG] == dropped
    assert dropped > 0 and delivered > 0
    assert not rx.drops
