"""Tampered, replayed and truncated packets: always a counted drop, never an exception.

For several ESP algorithms and AH, both modes: every single-bit flip of a valid packet is fed
to engine.inbound.

* Every bit from the ESP/AH header to the end (SPI, sequence number, IV, ciphertext, padding,
  ICV) must be dropped and counted; ICV failures are counted on the SA; the window never moves,
  so the genuine packet is still accepted afterwards.
* Outer IP header bits: ESP does not protect the outer header, so a flip there may be delivered
  (with that field changed) or dropped -- but never raises, and is always accounted for. With
  AH, only the mutable fields (RFC 4302 §3.3.3.1: IPv4 TOS, flags/fragment offset, TTL,
  checksum; IPv6 traffic class, flow label, hop limit) may change without a drop.

Replays are dropped as REPLAY, counted, and raise a ReplayDetected event; truncation to every
shorter length is a counted drop.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from services.core.engine import Dataplane
from services.core.events import DropReason, ReplayDetected
from services.core.iana import Encr, Integ, IpProto
from services.core.packet import build_ipv4, build_ipv6, checksum
from services.core.sa import Direction, Mode, SaConfig
from services.core.selectors import Selector
from services.core.spd import Action, SpdEntry


@dataclass(frozen=True)
class Alg:
    name: str
    protocol: int
    encr_id: int
    encr_key_len: int
    integ_id: int
    integ_key_len: int
    legacy: bool = False


ALGS = [
    Alg("aes-gcm-128", IpProto.ESP, Encr.AES_GCM_16, 20, 0, 0),
    Alg("chacha20-poly1305", IpProto.ESP, Encr.CHACHA20_POLY1305, 36, 0, 0),
    Alg("aes-cbc-256-sha256", IpProto.ESP, Encr.AES_CBC, 32, Integ.HMAC_SHA2_256_128, 32),
    Alg("null-sha512", IpProto.ESP, Encr.NULL, 0, Integ.HMAC_SHA2_512_256, 64),
    Alg("aes-gmac-256", IpProto.ESP, Encr.NULL_AUTH_AES_GMAC, 36, 0, 0),
    Alg("3des-sha1", IpProto.ESP, Encr.TRIPLE_DES, 24, Integ.HMAC_SHA1_96, 20, legacy=True),
    Alg("ah-sha384", IpProto.AH, 0, 0, Integ.HMAC_SHA2_384_192, 48),
]

MODES = [pytest.param(Mode.TRANSPORT, id="transport"), pytest.param(Mode.TUNNEL, id="tunnel")]
FAMILIES = [pytest.param(False, id="ipv4"), pytest.param(True, id="ipv6")]


def _a(s: str) -> bytes:
    return ipaddress.ip_address(s).packed


def _inner(v6: bool, tag: int = 0) -> bytes:
    body = bytes([0x13, 0x88, 0x00, 0x35]) + bytes(4) + bytes([tag]) * 33  # UDP-ish payload
    if v6:
        return (
            build_ipv6(
                _a("2001:db8:1::1"), _a("2001:db8:2::1"), IpProto.UDP, len(body), hop_limit=50
            )
            + body
        )
    return (
        build_ipv4(_a("10.0.0.1"), _a("10.0.0.2"), IpProto.UDP, len(body), ttl=50, ident=0x777)
        + body
    )


def _outer(v6: bool, mode: Mode) -> tuple[bytes, bytes]:
    if mode == Mode.TRANSPORT:
        return (
            (_a("2001:db8:1::1"), _a("2001:db8:2::1")) if v6 else (_a("10.0.0.1"), _a("10.0.0.2"))
        )
    return (_a("2001:db8::a"), _a("2001:db8::b")) if v6 else (_a("192.0.2.1"), _a("192.0.2.2"))


def _cfg(alg: Alg, mode: Mode, v6: bool, direction: Direction) -> SaConfig:
    s, d = _outer(v6, mode)
    return SaConfig(
        spi=0x5150,
        protocol=alg.protocol,
        direction=direction,
        mode=mode,
        src=s,
        dst=d,
        encr_id=alg.encr_id,
        encr_key=bytes(range(1, alg.encr_key_len + 1)),
        integ_id=alg.integ_id,
        integ_key=bytes(range(2, alg.integ_key_len + 2)),
        allow_legacy=alg.legacy,
        reqid=1,
    )


def _valid_packet(alg: Alg, mode: Mode, v6: bool, n: int = 1) -> list[bytes]:
    dp = Dataplane()
    dp.install_sa(_cfg(alg, mode, v6, Direction.OUTBOUND), 0.0)
    sel = Selector.make("::/0", "::/0") if v6 else Selector.make("0.0.0.0/0", "0.0.0.0/0")
    dp.replace_spd([SpdEntry(1, 1, Action.PROTECT, sel, reqid=1, protocols=(alg.protocol,))], 1)
    out = []
    for i in range(n):
        o = dp.outbound(_inner(v6, i), 0.0)
        assert o is not None, dp.drops
        out.append(o.packet)
    return out


def _receiver(alg: Alg, mode: Mode, v6: bool) -> tuple[Dataplane, object]:
    dp = Dataplane()
    sa = dp.install_sa(_cfg(alg, mode, v6, Direction.INBOUND), 0.0)
    return dp, sa


def _flip(pkt: bytes, bit: int) -> bytes:
    b = bytearray(pkt)
    b[bit // 8] ^= 0x80 >> (bit % 8)
    return bytes(b)


def _feed(dp: Dataplane, pkt: bytes) -> bytes | None:
    """engine.inbound must not raise, and a None result must be exactly one counted drop."""
    before = dp.drops.total()
    got = dp.inbound(pkt, 0.0)
    assert dp.drops.total() == before + (got is None)
    return got


def _mutable_bit(v6: bool, bit: int) -> bool:
    """Bits of the outer header that AH excludes from its ICV (RFC 4302 §3.3.3.1)."""
    byte = bit // 8
    if v6:
        return 4 <= bit < 32 or byte == 7  # traffic class, flow label; hop limit
    return byte in (1, 6, 7, 8, 10, 11)  # TOS; flags + fragment offset; TTL; checksum


@pytest.mark.parametrize("v6", FAMILIES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("alg", ALGS, ids=lambda a: a.name)
def test_every_bit_flip_is_a_counted_drop_and_never_an_exception(
    alg: Alg, mode: Mode, v6: bool
) -> None:
    pkt = _valid_packet(alg, mode, v6)[0]
    hlen = 40 if v6 else 20
    dp, sa = _receiver(alg, mode, v6)
    allowed = {DropReason.AUTH, DropReason.NO_SA, DropReason.REPLAY}
    if alg.protocol == IpProto.AH:
        allowed.add(DropReason.MALFORMED)  # a flipped payload-length field
    for bit in range(hlen * 8, len(pkt) * 8):
        assert _feed(dp, _flip(pkt, bit)) is None, f"bit {bit} of {len(pkt) * 8} accepted"
    assert set(dp.drops) <= allowed, dp.drops
    assert dp.drops.total() == (len(pkt) - hlen) * 8
    assert sa.auth_drops == dp.drops[DropReason.AUTH] > 0  # type: ignore[attr-defined]
    assert dp.drops[DropReason.NO_SA] == 32  # every SPI bit
    # nothing moved the window: the genuine packet is still accepted
    assert dp.inbound(pkt, 0.0) == _inner(v6)

    # outer header bits: no exception, always accounted; AH lets only mutable fields through
    for bit in range(hlen * 8):
        hdp, _ = _receiver(alg, mode, v6)
        flipped = _flip(pkt, bit)
        got = _feed(hdp, flipped)
        if got is not None and got == flipped:
            # the protocol byte no longer says ESP/AH: passed through untouched as clear
            # traffic (nothing was decapsulated; clear inbound traffic is not policed here)
            assert bit // 8 == (6 if v6 else 9), f"bit {bit}: returned unprocessed"
            assert flipped[6 if v6 else 9] not in (IpProto.ESP, IpProto.AH, IpProto.UDP)
            continue
        if alg.protocol == IpProto.AH and got is not None:
            assert _mutable_bit(v6, bit), f"AH accepted a flip of immutable header bit {bit}"
        if (
            alg.protocol == IpProto.AH
            and _mutable_bit(v6, bit)
            and not (not v6 and bit // 8 in (6, 7) and bit % 16 >= 2)
        ):
            # mutable fields (except a non-zero fragment offset / MF, which makes the datagram
            # a fragment that must be reassembled first) never fail AH verification
            assert got is not None, f"AH rejected a flip of mutable header bit {bit}"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("alg", ALGS, ids=lambda a: a.name)
def test_replayed_packet_is_dropped_counted_and_reported(alg: Alg, mode: Mode) -> None:
    pkts = _valid_packet(alg, mode, False, n=3)
    dp, sa = _receiver(alg, mode, False)
    for i, p in enumerate(pkts):
        assert dp.inbound(p, 0.0) == _inner(False, i)
    assert dp.inbound(pkts[1], 0.5) is None
    assert dp.drops == {DropReason.REPLAY: 1}
    assert sa.replay_drops == 1  # type: ignore[attr-defined]
    events = [e for e in dp.events if isinstance(e, ReplayDetected)]
    assert len(events) == 1 and events[0].seq == 2 and events[0].count == 1
    assert events[0].sa.spi == 0x5150 and events[0].sa.protocol == alg.protocol


def _fix_lengths(pkt: bytes, v6: bool) -> bytes:
    """Make a truncated datagram self-consistent again (IP length field and checksum)."""
    b = bytearray(pkt)
    if v6:
        b[4:6] = (len(b) - 40).to_bytes(2, "big")
    else:
        b[2:4] = len(b).to_bytes(2, "big")
        b[10:12] = b"\x00\x00"
        b[10:12] = checksum(bytes(b[:20])).to_bytes(2, "big")
    return bytes(b)


@pytest.mark.parametrize("v6", FAMILIES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("alg", ALGS, ids=lambda a: a.name)
def test_truncation_to_every_length_is_a_counted_drop(alg: Alg, mode: Mode, v6: bool) -> None:
    pkt = _valid_packet(alg, mode, v6)[0]
    hlen = 40 if v6 else 20
    dp, _ = _receiver(alg, mode, v6)
    for n in range(len(pkt)):
        assert _feed(dp, pkt[:n]) is None
    assert dp.drops == {DropReason.MALFORMED: len(pkt)}  # the IP length no longer fits
    dp2, _ = _receiver(alg, mode, v6)
    for n in range(hlen, len(pkt)):
        assert _feed(dp2, _fix_lengths(pkt[:n], v6)) is None, n
    assert dp2.drops.total() == len(pkt) - hlen
    assert set(dp2.drops) <= {DropReason.MALFORMED, DropReason.AUTH}, dp2.drops
    assert dp2.inbound(pkt, 0.0) == _inner(v6)


@pytest.mark.parametrize("alg", ALGS, ids=lambda a: a.name)
def test_trailing_bytes_beyond_the_ip_length_are_ignored(alg: Alg) -> None:
    """Link layers may pad short frames; the datagram is what the IP length says."""
    pkt = _valid_packet(alg, Mode.TUNNEL, False)[0]
    dp, _ = _receiver(alg, Mode.TUNNEL, False)
    assert dp.inbound(pkt + b"\x00" * 6, 0.0) == _inner(False)


def _zero_icv(pkt: bytes, alg: Alg, hlen: int) -> bytes:
    icv = {
        Integ.HMAC_SHA2_384_192: 24,
        Integ.HMAC_SHA1_96: 12,
        Integ.HMAC_SHA2_256_128: 16,
        Integ.HMAC_SHA2_512_256: 32,
    }.get(alg.integ_id, 16)
    if alg.protocol == IpProto.AH:
        at = hlen + 12
        return pkt[:at] + bytes(icv) + pkt[at + icv :]
    return pkt[:-icv] + bytes(icv)


def _swap_halves(pkt: bytes, alg: Alg, hlen: int) -> bytes:
    body = pkt[hlen + 8 :]  # after SPI + sequence number (ESP) / first 8 octets (AH)
    half = len(body) // 2
    return pkt[: hlen + 8] + body[half:] + body[:half]


GARBAGE: list[tuple[str, Callable[[bytes, Alg, int], bytes]]] = [
    ("zero-icv", _zero_icv),
    ("swapped-halves", _swap_halves),
]


@pytest.mark.parametrize("name,mangle", GARBAGE, ids=[g[0] for g in GARBAGE])
@pytest.mark.parametrize("alg", ALGS, ids=lambda a: a.name)
def test_structural_mangling_is_a_counted_drop(
    alg: Alg, name: str, mangle: Callable[[bytes, Alg, int], bytes]
) -> None:
    pkt = _valid_packet(alg, Mode.TUNNEL, False)[0]
    bad = mangle(pkt, alg, 20)
    assert len(bad) == len(pkt) and bad != pkt
    dp, sa = _receiver(alg, Mode.TUNNEL, False)
    assert _feed(dp, bad) is None
    assert set(dp.drops) <= {DropReason.AUTH, DropReason.MALFORMED}
    assert sa.auth_drops == dp.drops[DropReason.AUTH]  # type: ignore[attr-defined]
    assert dp.inbound(pkt, 0.0) == _inner(False)


@pytest.mark.parametrize(
    "alg", [a for a in ALGS if a.protocol == IpProto.ESP], ids=lambda a: a.name
)
def test_dummy_packet_is_discarded_counted_and_still_advances_the_window(alg: Alg) -> None:
    """RFC 4303 §2.6: a packet with next header 59 is a dummy; the receiver discards it after
    verification, so it still counts for anti-replay."""
    body = b"tfc" * 7
    s, d = _outer(False, Mode.TRANSPORT)
    dummy = build_ipv4(s, d, IpProto.IPV6_NONXT, len(body)) + body
    tx = Dataplane()
    tx.install_sa(_cfg(alg, Mode.TRANSPORT, False, Direction.OUTBOUND), 0.0)
    tx.replace_spd(
        [SpdEntry(1, 1, Action.PROTECT, Selector.make("0.0.0.0/0", "0.0.0.0/0"), reqid=1)], 1
    )
    out = tx.outbound(dummy, 0.0)
    assert out is not None
    dp, sa = _receiver(alg, Mode.TRANSPORT, False)
    assert _feed(dp, out.packet) is None
    assert dp.drops == {DropReason.DUMMY: 1}
    assert sa.replay.top == 1  # type: ignore[attr-defined]
    assert _feed(dp, out.packet) is None
    assert dp.drops[DropReason.REPLAY] == 1
