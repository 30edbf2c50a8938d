"""Anti-replay window: RFC 4303 §3.4.3 and Appendix A (A2 for extended sequence numbers).

``check`` runs before the ICV is verified and changes nothing; ``update`` runs only after the
ICV verified, so a forged packet never moves the window (RFC 4303 §3.4.3).
"""

from __future__ import annotations

MAX_WINDOW = 1 << 16
_M32 = 0xFFFFFFFF


class ReplayError(Exception):
    """Duplicate or too-old sequence number."""


class ReplayWindow:
    """Sliding window of ``size`` bits; bit i set means (top - i) was received."""

    __slots__ = ("_bitmap", "_mask", "esn", "size", "top")

    def __init__(self, size: int, *, esn: bool, top: int = 0) -> None:
        if not 0 <= size <= MAX_WINDOW:
            raise ValueError(f"replay window must be 0..{MAX_WINDOW}")
        self.size = size
        self.esn = esn
        self.top = top
        self._mask = (1 << size) - 1
        self._bitmap = 1 if top else 0

    def infer(self, seq_low: int) -> int:
        """The full 64-bit sequence number for a received low half (Appendix A2.2)."""
        if not self.esn:
            return seq_low
        w = max(self.size, 1)
        th, tl = self.top >> 32, self.top & _M32
        if tl >= w - 1:  # window within one sequence-number subspace
            seqh = th if seq_low >= tl - w + 1 else th + 1
        else:  # window spans two subspaces
            seqh = th - 1 if seq_low >= ((tl - w + 1) & _M32) else th
        if seqh < 0:
            return -1
        return (seqh << 32) | seq_low

    def check(self, seq_low: int) -> int:
        """Return the full sequence number if the packet may be processed, else raise."""
        seq = self.infer(seq_low)
        if seq <= 0:
            raise ReplayError
        if self.size == 0 or seq > self.top:
            return seq
        diff = self.top - seq
        if diff >= self.size or (self._bitmap >> diff) & 1:
            raise ReplayError
        return seq

    def update(self, seq: int) -> None:
        """Record an authenticated sequence number (call only after the ICV verified)."""
        if self.size == 0:
            self.top = max(self.top, seq)
            return
        if seq > self.top:
            shift = seq - self.top
            self._bitmap = ((self._bitmap << shift) | 1) & self._mask if shift < self.size else 1
            self.top = seq
        else:
            self._bitmap |= 1 << (self.top - seq)

    def received(self, seq: int) -> bool:
        """Whether ``seq`` is marked as received (for tests and status)."""
        diff = self.top - seq
        return 0 <= diff < self.size and bool((self._bitmap >> diff) & 1)
