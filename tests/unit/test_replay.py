"""Anti-replay and sequence numbers: RFC 4303 §3.3.3, §3.4.3 and Appendix A.

The window (services.core.replay.ReplayWindow) is checked directly and through real SAs in the
engine: in-order and out-of-order delivery, duplicates, too-old packets, window sizes, window 0,
ESN high-half inference (Appendix A2.2 Case A and Case B), the sender's ESN wrap and the non-ESN
end of the sequence space, ICV failures never moving the window, and outbound sequence-number
leases.
"""

from __future__ import annotations

import ipaddress
import random

import pytest

from services.core.engine import Dataplane
from services.core.esp import EspSa
from services.core.events import (
    DropReason,
    ExpiryKind,
    HardExpire,
    LeaseLow,
    ReplayDetected,
)
from services.core.iana import Encr, IpProto
from services.core.replay import MAX_WINDOW, ReplayError, ReplayWindow
from services.core.sa import ConfigError, Direction, Mode, SaConfig
from services.core.selectors import Selector
from services.core.spd import Action, SpdEntry

M32 = 0xFFFFFFFF


def accept(w: ReplayWindow, seq_low: int) -> int:
    """What the SA does for an authenticated packet: check, then update."""
    seq = w.check(seq_low)
    w.update(seq)
    return seq


def rejected(w: ReplayWindow, seq_low: int) -> bool:
    try:
        w.check(seq_low)
    except ReplayError:
        return True
    return False


# --- the window itself (32-bit sequence numbers) -------------------------------------------


def test_in_order_sequence_is_accepted_and_each_number_only_once() -> None:
    w = ReplayWindow(64, esn=False)
    for s in range(1, 500):
        assert accept(w, s) == s
        assert rejected(w, s)
    assert w.top == 499


def test_sequence_number_zero_is_never_accepted() -> None:
    assert rejected(ReplayWindow(64, esn=False), 0)
    assert rejected(ReplayWindow(64, esn=True), 0)


def test_out_of_order_within_the_window_is_accepted_once() -> None:
    w = ReplayWindow(64, esn=False)
    accept(w, 100)
    late = list(range(37, 100))  # 100 - 63 .. 99: all inside a 64-wide window
    random.Random(1).shuffle(late)
    for s in late:
        assert accept(w, s) == s
    for s in [*late, 100]:
        assert rejected(w, s), s
    assert w.top == 100


def test_too_old_is_rejected_at_exactly_the_window_edge() -> None:
    w = ReplayWindow(64, esn=False)
    accept(w, 100)
    assert rejected(w, 36)  # 100 - 64: just outside
    assert not rejected(w, 37)  # 100 - 63: the oldest slot


def test_a_big_jump_forgets_the_old_bitmap() -> None:
    w = ReplayWindow(64, esn=False)
    for s in range(1, 65):
        accept(w, s)
    accept(w, 1000)
    assert not rejected(w, 999) and not rejected(w, 937)
    assert rejected(w, 936) and rejected(w, 64)


@pytest.mark.parametrize("size", [32, 64, 1024, 4096, MAX_WINDOW])
def test_window_sizes(size: int) -> None:
    w = ReplayWindow(size, esn=False)
    top = size * 3 + 7
    accept(w, top)
    oldest = top - size + 1
    assert not rejected(w, oldest)
    assert rejected(w, oldest - 1)
    accept(w, oldest)
    accept(w, top - 1)
    assert rejected(w, oldest) and rejected(w, top - 1) and rejected(w, top)
    # sliding by less than the window keeps what was seen
    accept(w, top + 5)
    assert rejected(w, top - 1)
    assert rejected(w, oldest), "now beyond the edge"
    assert not rejected(w, top + 4)


def test_window_larger_than_the_maximum_is_refused() -> None:
    with pytest.raises(ValueError):
        ReplayWindow(MAX_WINDOW + 1, esn=False)
    with pytest.raises(ConfigError):
        SaConfig(
            spi=0x1000,
            protocol=IpProto.ESP,
            direction=Direction.INBOUND,
            mode=Mode.TUNNEL,
            src=bytes(4),
            dst=bytes(4),
            replay_window=MAX_WINDOW + 1,
        ).validate()


def test_window_zero_disables_replay_protection() -> None:
    w = ReplayWindow(0, esn=False)
    for s in (5, 5, 1, 1000, 3, 1000):
        assert accept(w, s) == s
    assert w.top == 1000


# --- ESN inference (Appendix A2.2) ---------------------------------------------------------


def test_esn_case_a_window_inside_one_subspace() -> None:
    """Tl >= W - 1: Seql >= Tl - W + 1 is in subspace Th; anything lower is Th + 1."""
    w = ReplayWindow(64, esn=True)
    w.update((5 << 32) | 1000)
    assert w.infer(1000 - 63) == (5 << 32) | 937  # oldest in-window
    assert w.infer(5000) == (5 << 32) | 5000  # ahead, same subspace
    assert w.infer(1000 - 64) == (6 << 32) | 936  # below the window: next subspace
    assert w.infer(0) == (6 << 32)


def test_esn_case_b_window_spans_two_subspaces() -> None:
    """Tl < W - 1: Seql >= Tl - W + 1 (mod 2^32) is in Th - 1; anything lower is Th."""
    w = ReplayWindow(64, esn=True)
    w.update((5 << 32) | 10)
    assert w.infer(M32) == (4 << 32) | M32
    assert w.infer((10 - 63) & M32) == (4 << 32) | ((10 - 63) & M32)  # oldest in-window
    assert w.infer(11) == (5 << 32) | 11
    assert w.infer(0) == 5 << 32
    assert w.infer((10 - 64) & M32) == (5 << 32) | ((10 - 64) & M32)  # below: Th


def test_esn_receiver_follows_the_sender_across_2_32() -> None:
    w = ReplayWindow(64, esn=True)
    w.update(M32 - 40)
    got = [accept(w, s & M32) for s in range(M32 - 39, M32 + 41)]
    assert got == list(range(M32 - 39, M32 + 41))
    assert w.top == M32 + 40 == (1 << 32) | 39
    # a late packet from before the wrap, still inside the window (Case B)
    w2 = ReplayWindow(64, esn=True)
    w2.update(M32 - 3)
    accept(w2, 2)  # 2^32 + 2: crosses
    assert w2.top == (1 << 32) | 2
    assert accept(w2, M32) == M32  # inferred in the previous subspace
    assert accept(w2, 0) == 1 << 32
    assert rejected(w2, M32) and rejected(w2, 2)


@pytest.mark.parametrize("size", [32, 1024])
def test_esn_duplicates_and_old_numbers_after_the_wrap(size: int) -> None:
    w = ReplayWindow(size, esn=True)
    w.update((1 << 32) | 5)
    oldest_low = ((1 << 32) + 5 - size + 1) & M32
    assert w.check(oldest_low) == (1 << 32) + 5 - size + 1  # in the old subspace, in window
    assert rejected(w, 5)


# --- SAs in the engine ---------------------------------------------------------------------

KEY = bytes(range(20))
SRC, DST = ipaddress.ip_address("192.0.2.1").packed, ipaddress.ip_address("192.0.2.2").packed


def _cfg(
    direction: Direction, *, esn: bool = False, window: int = 64, start: int = 1, end: int = 0
) -> SaConfig:
    return SaConfig(
        spi=0x2000,
        protocol=IpProto.ESP,
        direction=direction,
        mode=Mode.TUNNEL,
        src=SRC,
        dst=DST,
        encr_id=Encr.AES_GCM_16,
        encr_key=KEY,
        esn=esn,
        replay_window=window,
        reqid=1,
        seq_lease_start=start,
        seq_lease_end=end,
    )


def _inner(i: int = 0) -> bytes:
    from services.core.packet import build_ipv4

    body = i.to_bytes(4, "big") * 4
    return build_ipv4(bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]), IpProto.UDP, len(body)) + body


def _sender(**kw: object) -> tuple[Dataplane, EspSa]:
    dp = Dataplane()
    sa = dp.install_sa(_cfg(Direction.OUTBOUND, **kw), 0.0)  # type: ignore[arg-type]
    dp.replace_spd(
        [SpdEntry(1, 1, Action.PROTECT, Selector.make("0.0.0.0/0", "0.0.0.0/0"), reqid=1)], 1
    )
    assert isinstance(sa, EspSa)
    return dp, sa


def _receiver(**kw: object) -> tuple[Dataplane, EspSa]:
    dp = Dataplane()
    sa = dp.install_sa(_cfg(Direction.INBOUND, **kw), 0.0)  # type: ignore[arg-type]
    assert isinstance(sa, EspSa)
    return dp, sa


def _send(dp: Dataplane, n: int, t: float = 0.0) -> list[bytes]:
    out = []
    for i in range(n):
        o = dp.outbound(_inner(i), t)
        assert o is not None, dp.drops
        out.append(o.packet)
    return out


def _wire_seq(pkt: bytes) -> int:
    return int.from_bytes(pkt[24:28], "big")


def test_engine_in_order_out_of_order_and_duplicates() -> None:
    tx, _ = _sender()
    rx, sa = _receiver()
    pkts = _send(tx, 100)
    order = [99, *range(40, 99), *range(0, 40)]
    for i in order:
        got = rx.inbound(pkts[i], 0.0)
        if i >= 99 - 63:
            assert got == _inner(i)
        else:
            assert got is None  # 99 - 63 = 36: older ones are outside the window
    assert sa.replay_drops == 36 == rx.drops[DropReason.REPLAY]
    for i in (99, 50, 36):
        assert rx.inbound(pkts[i], 1.0) is None
    assert sa.replay_drops == 39


def test_replay_event_is_emitted_and_rate_limited() -> None:
    tx, _ = _sender()
    rx, sa = _receiver()
    p = _send(tx, 1)[0]
    assert rx.inbound(p, 0.0) is not None
    for t in (0.1, 0.2, 0.3):
        assert rx.inbound(p, t) is None
    assert rx.inbound(p, 1.5) is None
    events = [e for e in rx.events if isinstance(e, ReplayDetected)]
    assert [(e.seq, e.count) for e in events] == [(1, 1), (1, 4)]
    assert sa.replay_drops == 4


def test_sender_esn_wrap_low_half_rolls_to_zero_and_receiver_keeps_up() -> None:
    tx, out_sa = _sender(esn=True, start=2**32 - 2)
    rx, in_sa = _receiver(esn=True)
    in_sa.replay.update(2**32 - 3)  # as if everything before had been received
    pkts = _send(tx, 4)
    assert [_wire_seq(p) for p in pkts] == [M32 - 1, M32, 0, 1]
    assert out_sa.next_seq == 2**32 + 2
    for i, p in enumerate(pkts):
        assert rx.inbound(p, 0.0) == _inner(i), rx.drops
    assert in_sa.replay.top == 2**32 + 1
    assert not tx.drops and not rx.drops


def test_without_esn_the_sa_stops_at_2_32_minus_1_with_a_hard_expiry() -> None:
    tx, sa = _sender(start=2**32 - 2)
    pkts = _send(tx, 2)
    assert [_wire_seq(p) for p in pkts] == [M32 - 1, M32]
    assert tx.outbound(_inner(), 0.0) is None
    assert tx.drops == {DropReason.SEQ_EXHAUSTED: 1}
    assert [e for e in tx.events if isinstance(e, HardExpire)] == [
        HardExpire(sa.ref, ExpiryKind.SEQUENCE)
    ]
    assert sa.dead
    assert tx.outbound(_inner(), 0.0) is None  # and it stays dead; never wraps to 0
    assert tx.drops[DropReason.SA_EXPIRED] == 1
    assert sum(isinstance(e, HardExpire) for e in tx.events) == 1


def test_a_packet_just_below_the_window_after_the_wrap_is_rejected_by_the_icv() -> None:
    """After the wrap, an old packet just below the window is inferred into the next
    subspace (A2.2); its ICV then fails, and the window does not move."""
    tx, _ = _sender(esn=True, start=2**32 - 70)
    rx, sa = _receiver(esn=True)
    sa.replay.update(2**32 - 71)
    pkts = _send(tx, 80)  # 2^32-70 .. 2^32+9
    assert rx.inbound(pkts[-1], 0.0) is not None  # top = 2^32 + 9
    top = sa.replay.top
    assert top == 2**32 + 9
    below = pkts[top - 64 - (2**32 - 70)]  # seq top - 64: just outside the window
    assert _wire_seq(below) == (top - 64) & M32
    assert rx.inbound(below, 0.0) is None
    assert rx.drops == {DropReason.AUTH: 1} and sa.auth_drops == 1
    assert sa.replay.top == top
    oldest = pkts[top - 63 - (2**32 - 70)]  # the oldest in-window one still works
    assert rx.inbound(oldest, 0.0) is not None


def _tamper(pkt: bytes) -> bytes:
    b = bytearray(pkt)
    b[-1] ^= 0x01  # the ICV
    return bytes(b)


@pytest.mark.parametrize("esn", [False, True])
def test_failed_icv_never_moves_the_window(esn: bool) -> None:
    tx, _ = _sender(esn=esn)
    pkts = _send(tx, 10)
    far_tx, _ = _sender(esn=esn, start=5000)
    far = _send(far_tx, 1)[0]
    rx, sa = _receiver(esn=esn)
    assert rx.inbound(_tamper(far), 0.0) is None
    assert rx.inbound(_tamper(pkts[9]), 0.0) is None
    assert rx.drops == {DropReason.AUTH: 2} and sa.auth_drops == 2
    assert sa.replay.top == 0
    for i in range(10):  # the genuine lower packets are still accepted
        assert rx.inbound(pkts[i], 0.0) == _inner(i)
    assert rx.inbound(far, 0.0) == _inner(0)  # and the genuine high one afterwards
    assert sa.replay.top == 5000


# --- outbound sequence-number leases -----------------------------------------------------


def test_lease_stops_at_its_end_fires_lease_low_once_and_can_be_extended() -> None:
    tx, sa = _sender(start=1, end=100)
    pkts = _send(tx, 100)
    assert [_wire_seq(p) for p in pkts] == list(range(1, 101))
    low = [e for e in tx.events if isinstance(e, LeaseLow)]
    assert low == [LeaseLow(sa.ref, 76, 100)]  # at 75 %: seq 75 used, 76 next
    assert tx.outbound(_inner(), 0.0) is None
    assert tx.drops == {DropReason.SEQ_EXHAUSTED: 1}
    assert not any(isinstance(e, HardExpire) for e in tx.events)  # only the lease ran out
    assert not sa.dead
    updated = tx.update_sa(sa.spi, sa.cfg.dst, IpProto.ESP, Direction.OUTBOUND, lease_end=200)
    assert updated is sa and sa.lease_end == 200
    more = _send(tx, 100)
    assert [_wire_seq(p) for p in more] == list(range(101, 201))
    low = [e for e in tx.events if isinstance(e, LeaseLow)]
    assert len(low) == 2 and low[1].lease_end == 200
    assert tx.outbound(_inner(), 0.0) is None
    assert tx.drops[DropReason.SEQ_EXHAUSTED] == 2


def test_lease_never_shrinks_and_never_passes_the_sequence_space() -> None:
    _, sa = _sender(start=1, end=100)
    sa.extend_lease(50)
    assert sa.lease_end == 100
    sa.extend_lease(2**40)
    assert sa.lease_end == M32  # without ESN
    _, esa = _sender(esn=True, start=1, end=100)
    esa.extend_lease(2**70)
    assert esa.lease_end == 2**64 - 1


def test_lease_starting_mid_space_uses_exactly_its_numbers() -> None:
    tx, _ = _sender(start=1_000_000, end=1_000_003)
    pkts = _send(tx, 4)
    assert [_wire_seq(p) for p in pkts] == [1_000_000, 1_000_001, 1_000_002, 1_000_003]
    assert tx.outbound(_inner(), 0.0) is None


def test_lease_end_before_start_is_refused() -> None:
    with pytest.raises(ConfigError):
        _cfg(Direction.OUTBOUND, start=10, end=9).validate()
