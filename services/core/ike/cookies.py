"""Responder COOKIEs against spoofed IKE_SA_INIT floods: RFC 7296 §2.6 (and §3.10.1, COOKIE).

A :class:`CookieGuard` sits in front of the responder. While few IKE SAs are half-open it lets
every IKE_SA_INIT through. Once ``half_open`` reaches ``threshold`` it demands cookies: an
IKE_SA_INIT request whose *first* payload is not a COOKIE notify that verifies gets a stateless
IKE_SA_INIT response carrying only a COOKIE notify, and the caller keeps no state for it. The
initiator retries with the COOKIE as first payload (§2.6), which proves it receives at its
address. Cookies stop being demanded when ``half_open`` falls to ``low_water`` or below
(hysteresis, so the mode does not flap at the threshold). A cookie that does not verify is
treated as absent (§2.6: "process the message as if no cookie had been included").

The cookie is the §2.6 suggestion: ``<VersionIDofSecret> | Hash(Ni | IPi | SPIi | <secret>)``,
with a 4-octet version ID, SHA-256 and IPi the initiator's address octets (4 for IPv4, 16 for
IPv6), 36 octets in all. The 32-octet secret comes from ``rand`` and is replaced every
``period`` seconds (driven by ``now``); a cookie made with the previous secret still verifies
for one more period, so an initiator that got its cookie just before a rotation is not refused.
After two idle periods both secrets are new.

Pure: time comes in as ``now``, randomness from ``rand``. The secrets never appear in a repr or
in ``CookieGuard.stats``. :meth:`CookieGuard.check` never raises for what arrives on the
wire.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

from services.core.ike.constants import ExchangeType, NotifyType
from services.core.ike.message import (
    IkeDecodeError,
    Message,
    Nonce,
    Notify,
    decode_message,
    encode_message,
)

__all__ = [
    "COOKIE_LEN",
    "DROP",
    "CookieGuard",
    "CookieStats",
    "cookie_response",
    "first_cookie",
]

Rand = Callable[[int], bytes]

VERSION_LEN = 4
SECRET_LEN = 32
COOKIE_LEN = VERSION_LEN + hashlib.sha256().digest_size  # 36 (§3.10.1 allows 1..64)
DEFAULT_THRESHOLD = 10
DEFAULT_PERIOD = 60.0
DROP = b""  # check(): neither go on nor answer (not an IKE_SA_INIT request we can judge)
_ZERO_SPI = bytes(8)


@dataclass
class CookieStats:
    """Counters (no secrets): cookie responses sent, requests with a cookie that verified or
    did not, and requests dropped because they could not be judged while cookies were on."""

    sent: int = 0
    valid: int = 0
    invalid: int = 0
    malformed: int = 0


@dataclass(frozen=True)
class _Secret:
    version: int
    value: bytes = field(repr=False)


def first_cookie(msg: Message) -> bytes | None:
    """The COOKIE notify's data if it is the message's first payload (§2.6), else None."""
    if msg.payloads:
        p = msg.payloads[0]
        if isinstance(p, Notify) and p.notify_type == NotifyType.COOKIE and not p.spi:
            return p.data
    return None


def cookie_response(spi_i: bytes, cookie: bytes) -> bytes:
    """The stateless IKE_SA_INIT response: responder SPI zero, only the COOKIE notify."""
    msg = Message(
        spi_i,
        _ZERO_SPI,
        ExchangeType.IKE_SA_INIT,
        0,
        (Notify(NotifyType.COOKIE, cookie),),
        response=True,
    )
    return encode_message(msg)


class CookieGuard:
    """Decides, per new IKE_SA_INIT request, whether a cookie is demanded (RFC 7296 §2.6).

    ``check(request, remote_ip, now, half_open)`` returns ``None`` (go on: create the
    responder), a datagram to send back (the COOKIE response; keep no state) or :data:`DROP`
    (cookies are demanded and the request is not a well-formed IKE_SA_INIT with a nonce).
    """

    def __init__(
        self,
        *,
        now: float,
        rand: Rand = secrets.token_bytes,
        threshold: int = DEFAULT_THRESHOLD,
        period: float = DEFAULT_PERIOD,
        low_water: int | None = None,
    ) -> None:
        if threshold < 0:
            raise ValueError("cookie threshold must be >= 0")
        if not period > 0:
            raise ValueError("cookie secret period must be > 0 seconds")
        low = threshold // 2 if low_water is None else low_water
        if not 0 <= low <= threshold:
            raise ValueError("cookie low water mark must be between 0 and the threshold")
        self.threshold = threshold
        self.low_water = low
        self.period = float(period)
        self._rand = rand
        self.stats = CookieStats()
        self.demanding = False
        version = int.from_bytes(self._octets(VERSION_LEN), "big")
        self._current = _Secret(version, self._octets(SECRET_LEN))
        self._previous: _Secret | None = None
        self._rotated_at = now

    def __repr__(self) -> str:
        return (
            f"CookieGuard(threshold={self.threshold}, low_water={self.low_water}, "
            f"period={self.period}, demanding={self.demanding}, "
            f"version={self._current.version:08x}, stats={self.stats})"
        )

    # -- secrets --------------------------------------------------------------------------------

    def _octets(self, n: int) -> bytes:
        b = self._rand(n)
        if len(b) != n:
            raise ValueError("rand returned the wrong number of octets")
        return b

    def _rotate(self, now: float) -> None:
        if now < self._rotated_at + self.period:
            return
        stale = now >= self._rotated_at + 2 * self.period
        self._previous = None if stale else self._current
        version = (self._current.version + (2 if stale else 1)) & 0xFFFFFFFF
        self._current = _Secret(version, self._octets(SECRET_LEN))
        self._rotated_at = now

    @property
    def version(self) -> int:
        """The current secret's version ID (what a new cookie starts with)."""
        return self._current.version

    @staticmethod
    def _digest(secret: _Secret, ni: bytes, ip: bytes, spi_i: bytes) -> bytes:
        return hashlib.sha256(ni + ip + spi_i + secret.value).digest()

    @staticmethod
    def _check_ip(ip: bytes) -> None:
        if len(ip) not in (4, 16):
            raise ValueError("remote_ip must be 4 (IPv4) or 16 (IPv6) address octets")

    def make_cookie(self, ni: bytes, remote_ip: bytes, spi_i: bytes, now: float) -> bytes:
        """``<VersionIDofSecret> | SHA-256(Ni | IPi | SPIi | <secret>)`` with the current secret."""
        self._check_ip(remote_ip)
        self._rotate(now)
        s = self._current
        return s.version.to_bytes(VERSION_LEN, "big") + self._digest(s, ni, remote_ip, spi_i)

    def verify(self, cookie: bytes, ni: bytes, remote_ip: bytes, spi_i: bytes, now: float) -> bool:
        """Whether ``cookie`` was made (by us, with the current or previous secret) for exactly
        this nonce, address and SPIi."""
        self._check_ip(remote_ip)
        self._rotate(now)
        if len(cookie) != COOKIE_LEN:
            return False
        version = int.from_bytes(cookie[:VERSION_LEN], "big")
        for s in (self._current, self._previous):
            if s is not None and s.version == version:
                want = self._digest(s, ni, remote_ip, spi_i)
                return hmac.compare_digest(want, cookie[VERSION_LEN:])
        return False

    # -- the decision ---------------------------------------------------------------------------

    def update(self, half_open: int) -> bool:
        """Switch the cookie demand on at ``threshold`` half-open SAs and off at ``low_water``."""
        if half_open >= self.threshold:
            self.demanding = True
        elif half_open <= self.low_water:
            self.demanding = False
        return self.demanding

    def check(
        self, request: Message | bytes, remote_ip: bytes, now: float, half_open: int
    ) -> bytes | None:
        """None (go on), the COOKIE response to send (no state), or :data:`DROP`."""
        self._check_ip(remote_ip)
        self._rotate(now)
        if not self.update(half_open):
            return None
        if isinstance(request, Message):
            msg = request
        else:
            try:
                msg = decode_message(bytes(request))
            except (IkeDecodeError, ValueError):
                self.stats.malformed += 1
                return DROP
        nonce = next((p for p in msg.payloads if isinstance(p, Nonce)), None)
        if (
            msg.exchange_type != ExchangeType.IKE_SA_INIT
            or msg.message_id != 0
            or msg.response
            or not msg.initiator
            or len(msg.spi_i) != 8
            or msg.spi_i == _ZERO_SPI
            or msg.spi_r != _ZERO_SPI
            or nonce is None
        ):
            self.stats.malformed += 1
            return DROP
        cookie = first_cookie(msg)
        if cookie is not None:
            if self.verify(cookie, nonce.data, remote_ip, msg.spi_i, now):
                self.stats.valid += 1
                return None
            self.stats.invalid += 1
        self.stats.sent += 1
        return cookie_response(msg.spi_i, self.make_cookie(nonce.data, remote_ip, msg.spi_i, now))
