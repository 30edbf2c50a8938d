"""RFC 7296 §2.6 COOKIEs: services.core.ike.cookies and keymgr's use of it.

Checks: the cookie format (version ID | SHA-256(Ni | IPi | SPIi | secret), recomputed here from
the secret the guard drew from our ``rand``); secret rotation driven by ``now`` and acceptance
of the previous secret for one period only; tampered cookies and a wrong IP (v4 and v6), SPIi
or nonce are refused and answered with a fresh cookie; a COOKIE that is not the first payload
does not count; the threshold switches the demand on and the low water mark off (hysteresis);
malformed requests never raise; the stateless response decodes (also in scapy) and carries
only the COOKIE; the responder accepts an IKE_SA_INIT with a COOKIE first and echoes none;
keymgr answers over the threshold with a COOKIE and keeps no state until the cookie returns.
"""

from __future__ import annotations

import hashlib
import ipaddress
import pathlib
import random
import secrets
from collections.abc import Callable

import pytest

from services.core.ike.constants import ExchangeType, NotifyType
from services.core.ike.cookies import COOKIE_LEN, DROP, CookieGuard
from services.core.ike.exchange import Ikev2Initiator, InitiatorConfig
from services.core.ike.message import (
    Message,
    Nonce,
    Notify,
    decode_message,
    encode_message,
)
from services.core.ike.responder import Ikev2Responder, ResponderConfig, ResponderState
from services.dataplane.client import IkeDatagram
from services.keymgr.config import Connection
from services.keymgr.daemon import Keymgr

A, B = "192.0.2.1", "192.0.2.2"
IP_B = ipaddress.IPv4Address(B).packed
IP6 = ipaddress.IPv6Address("2001:db8::2").packed


class RecordingRand:
    """A ``rand`` that remembers what it handed out (to recompute cookies independently)."""

    def __init__(self) -> None:
        self.out: list[bytes] = []

    def __call__(self, n: int) -> bytes:
        b = secrets.token_bytes(n)
        self.out.append(b)
        return b


def _sa_init(psk: bytes = b"k" * 32) -> bytes:
    cfg = InitiatorConfig(
        local_addr=B,
        remote_addr=A,
        psk=psk,
        ts_local=("203.0.113.1", "203.0.113.1"),
        ts_remote=("198.51.100.0", "198.51.100.255"),
    )
    (data,) = Ikev2Initiator(cfg, now=0.0).start(0.0)
    return data


def _with_cookie(request: bytes, cookie: bytes, *, first: bool = True) -> bytes:
    msg = decode_message(request)
    ck = Notify(NotifyType.COOKIE, cookie)
    payloads = (ck, *msg.payloads) if first else (*msg.payloads, ck)
    return encode_message(
        Message(msg.spi_i, msg.spi_r, msg.exchange_type, 0, payloads, initiator=True)
    )


def _cookie_of(response: bytes) -> bytes:
    msg = decode_message(response)
    assert msg.response and not msg.initiator and msg.message_id == 0
    assert msg.exchange_type == ExchangeType.IKE_SA_INIT and msg.spi_r == bytes(8)
    (n,) = msg.payloads
    assert isinstance(n, Notify) and n.notify_type == NotifyType.COOKIE and n.protocol_id == 0
    return n.data


def _nonce(request: bytes) -> bytes:
    return next(p.data for p in decode_message(request).payloads if isinstance(p, Nonce))


def test_cookie_format_matches_section_2_6() -> None:
    rand = RecordingRand()
    g = CookieGuard(now=0.0, rand=rand, threshold=0)
    version, secret = rand.out  # 4-octet version ID, then the 32-octet secret
    req = _sa_init()
    resp = g.check(req, IP_B, 1.0, half_open=0)
    assert resp
    cookie = _cookie_of(resp)
    spi_i = decode_message(req).spi_i
    want = hashlib.sha256(_nonce(req) + IP_B + spi_i + secret).digest()
    assert len(cookie) == COOKIE_LEN == 36
    assert cookie == version + want
    assert decode_message(resp).spi_i == spi_i
    assert g.stats.sent == 1 and g.stats.valid == 0
    assert secret.hex() not in repr(g) and secret.hex() not in repr(g.stats)


def test_scapy_reads_the_cookie_response() -> None:
    from scapy.contrib.ikev2 import IKEv2, IKEv2_Notify

    g = CookieGuard(now=0.0, threshold=0)
    resp = g.check(_sa_init(), IP_B, 0.0, 0)
    assert resp
    pkt = IKEv2(resp)
    assert pkt.exch_type == 34 and pkt.flags == 0x20 and pkt.resp_SPI == bytes(8)
    notify = pkt[IKEv2_Notify]
    assert notify.type == 16390 and bytes(notify.notify) == _cookie_of(resp)
    assert notify.next_payload == 0


def test_valid_cookie_goes_on_and_wrong_binding_is_refused() -> None:
    g = CookieGuard(now=0.0, threshold=0)
    req = _sa_init()
    cookie = _cookie_of(g.check(req, IP_B, 0.0, 0) or b"")
    assert g.check(_with_cookie(req, cookie), IP_B, 1.0, 0) is None
    assert g.stats.valid == 1
    # the same cookie from another address, for another SPIi or with another nonce
    other_ip = ipaddress.IPv4Address("192.0.2.3").packed
    resp = g.check(_with_cookie(req, cookie), other_ip, 1.0, 0)
    assert resp and _cookie_of(resp) != cookie
    other = _sa_init()  # new SPIi and nonce
    assert g.check(_with_cookie(other, cookie), IP_B, 1.0, 0)
    msg = decode_message(req)
    new_nonce = tuple(
        Nonce(secrets.token_bytes(32)) if isinstance(p, Nonce) else p for p in msg.payloads
    )
    renonced = encode_message(
        Message(msg.spi_i, msg.spi_r, msg.exchange_type, 0, new_nonce, initiator=True)
    )
    assert g.check(_with_cookie(renonced, cookie), IP_B, 1.0, 0)
    respi = decode_message(req)
    spi_swapped = encode_message(
        Message(bytes(7) + b"\x01", respi.spi_r, 34, 0, respi.payloads, initiator=True)
    )
    assert g.check(_with_cookie(spi_swapped, cookie), IP_B, 1.0, 0)
    assert g.stats.invalid == 4 and g.stats.valid == 1 and g.stats.sent == 5
    # a cookie that is not the first payload is no cookie (§2.6)
    assert g.check(_with_cookie(req, cookie, first=False), IP_B, 1.0, 0)
    assert g.stats.invalid == 4 and g.stats.sent == 6


def test_ipv6_addresses_are_bound_too() -> None:
    g = CookieGuard(now=0.0, threshold=0)
    req = _sa_init()
    cookie = _cookie_of(g.check(req, IP6, 0.0, 0) or b"")
    assert g.check(_with_cookie(req, cookie), IP6, 0.0, 0) is None
    assert g.check(_with_cookie(req, cookie), IP6[:-1] + b"\x03", 0.0, 0)
    assert g.check(_with_cookie(req, cookie), IP_B, 0.0, 0)
    with pytest.raises(ValueError):
        g.check(req, b"\x01\x02\x03", 0.0, 0)  # our own bug, not wire input


@pytest.mark.parametrize(
    "tamper",
    [
        lambda c: c[:-1] + bytes([c[-1] ^ 1]),
        lambda c: bytes([c[0] ^ 0x80]) + c[1:],  # version ID
        lambda c: c[:-1],
        lambda c: c + b"\x00",
        lambda c: b"",
        lambda c: bytes(COOKIE_LEN),
    ],
    ids=["hash-bit", "version", "short", "long", "empty", "zeros"],
)
def test_tampered_cookie_is_refused(tamper: Callable[[bytes], bytes]) -> None:
    g = CookieGuard(now=0.0, threshold=0)
    req = _sa_init()
    cookie = _cookie_of(g.check(req, IP_B, 0.0, 0) or b"")
    resp = g.check(_with_cookie(req, tamper(cookie)), IP_B, 0.0, 0)
    assert resp and _cookie_of(resp) == cookie  # a fresh cookie (same secret, same binding)
    assert g.stats.invalid == 1 and g.stats.valid == 0


def test_rotation_keeps_the_previous_secret_for_one_period() -> None:
    g = CookieGuard(now=100.0, threshold=0, period=60.0)
    v0 = g.version
    req = _sa_init()
    c0 = _cookie_of(g.check(req, IP_B, 159.0, 0) or b"")
    assert g.version == v0 and int.from_bytes(c0[:4], "big") == v0
    assert g.check(_with_cookie(req, c0), IP_B, 160.0, 0) is None  # rotated: previous secret
    v1 = g.version
    assert v1 == (v0 + 1) & 0xFFFFFFFF
    c1 = _cookie_of(g.check(req, IP_B, 161.0, 0) or b"")
    assert c1 != c0 and int.from_bytes(c1[:4], "big") == v1
    assert g.check(_with_cookie(req, c0), IP_B, 219.0, 0) is None  # still within the period
    assert g.check(_with_cookie(req, c0), IP_B, 220.0, 0)  # second rotation: c0 is gone
    assert g.check(_with_cookie(req, c1), IP_B, 220.0, 0) is None  # c1 is the previous one
    assert g.stats.valid == 3 and g.stats.invalid == 1


def test_idle_for_two_periods_drops_both_secrets() -> None:
    g = CookieGuard(now=0.0, threshold=0, period=10.0)
    req = _sa_init()
    c0 = _cookie_of(g.check(req, IP_B, 9.0, 0) or b"")
    assert g.check(_with_cookie(req, c0), IP_B, 25.0, 0)  # refused: two periods passed
    assert g.stats.invalid == 1
    # the clock going backwards neither rotates nor breaks anything
    c = _cookie_of(g.check(req, IP_B, 3.0, 0) or b"")
    assert g.check(_with_cookie(req, c), IP_B, 4.0, 0) is None


def test_threshold_hysteresis() -> None:
    g = CookieGuard(now=0.0, threshold=10)
    assert g.low_water == 5
    req = _sa_init()
    assert g.check(req, IP_B, 0.0, half_open=9) is None and not g.demanding
    assert g.check(req, IP_B, 0.0, half_open=10) and g.demanding
    for n in (9, 7, 6):  # above the low water mark: still demanded
        assert g.check(req, IP_B, 0.0, half_open=n) and g.demanding
    assert g.check(req, IP_B, 0.0, half_open=5) is None and not g.demanding
    assert g.check(req, IP_B, 0.0, half_open=9) is None  # off again until the threshold
    assert g.stats.sent == 4
    custom = CookieGuard(now=0.0, threshold=4, low_water=4)
    assert custom.update(4) and not custom.update(3)
    # a request with a cookie while none is demanded just goes on (the cookie is not checked)
    assert g.check(_with_cookie(req, b"x" * 36), IP_B, 0.0, 0) is None
    with pytest.raises(ValueError):
        CookieGuard(now=0.0, threshold=3, low_water=4)
    with pytest.raises(ValueError):
        CookieGuard(now=0.0, period=0)
    with pytest.raises(ValueError):
        CookieGuard(now=0.0, threshold=-1)


def test_malformed_requests_never_raise() -> None:
    g = CookieGuard(now=0.0, threshold=0)
    req = _sa_init()
    msg = decode_message(req)
    rng = random.Random(7297)
    cases = [b"", b"\x00" * 27, b"junk" * 10, req[:-1], req + b"\x00"]
    cases += [
        bytes(
            b ^ (1 << rng.randrange(8)) if i == rng.randrange(len(req)) else b
            for i, b in enumerate(req)
        )
        for _ in range(200)
    ]
    cases += [rng.randbytes(rng.randrange(0, 300)) for _ in range(200)]
    # well-formed but not an IKE_SA_INIT request we can judge
    no_nonce = tuple(p for p in msg.payloads if not isinstance(p, Nonce))
    for m in (
        Message(msg.spi_i, bytes(8), 34, 0, no_nonce, initiator=True),
        Message(msg.spi_i, bytes(8), 34, 0, msg.payloads, initiator=True, response=True),
        Message(msg.spi_i, bytes(8), 35, 0, msg.payloads, initiator=True),
        Message(msg.spi_i, bytes(8), 34, 1, msg.payloads, initiator=True),
        Message(bytes(8), bytes(8), 34, 0, msg.payloads, initiator=True),
        Message(msg.spi_i, b"\x01" * 8, 34, 0, msg.payloads, initiator=True),
        Message(msg.spi_i, bytes(8), 34, 0, msg.payloads),
    ):
        assert g.check(encode_message(m), IP_B, 0.0, 0) == DROP
        assert g.check(m, IP_B, 0.0, 0) == DROP
    for data in cases:
        out = g.check(data, IP_B, 0.0, 0)
        assert out is None or isinstance(out, bytes)
        if out:
            _cookie_of(out)
    assert g.stats.malformed >= 14


def test_responder_accepts_cookie_first_and_echoes_none() -> None:
    g = CookieGuard(now=0.0, threshold=0)
    req = _sa_init()
    cookie = _cookie_of(g.check(req, IP_B, 0.0, 0) or b"")
    retry = _with_cookie(req, cookie)
    assert g.check(retry, IP_B, 0.0, 0) is None
    r = Ikev2Responder(
        ResponderConfig(
            local_addr=A,
            psk=b"k" * 32,
            ts_local=("198.51.100.0", "198.51.100.255"),
            ts_remote=("203.0.113.1", "203.0.113.1"),
        ),
        now=0.0,
    )
    (resp,) = r.receive(
        retry, 0.0, remote=(IP_B, 500), local=(ipaddress.IPv4Address(A).packed, 500)
    )
    assert r.state is ResponderState.WAIT_AUTH
    out = decode_message(resp)
    assert out.spi_r != bytes(8)
    assert not any(
        isinstance(p, Notify) and p.notify_type == NotifyType.COOKIE for p in out.payloads
    )
    assert cookie not in resp
    # AUTH covers the first message as received, COOKIE included (RFC 7296 §2.15)
    assert r._msg1 == retry


class _Stream:
    def __init__(self) -> None:
        self.sent: list[IkeDatagram] = []

    def send(self, d: IkeDatagram) -> None:
        self.sent.append(d)


def test_keymgr_demands_cookies_over_the_threshold(tmp_path: pathlib.Path) -> None:
    psk_file = tmp_path / "psk"
    psk_file.write_bytes(b"0x" + (b"ab" * 32))
    conn = Connection(
        "resp", A, B, psk_file, "198.51.100.0/24", "203.0.113.1/32", start_action="respond"
    )
    km = Keymgr(object(), (conn,), cookie_threshold=2)  # type: ignore[arg-type]
    stream = _Stream()
    km._stream = stream  # type: ignore[assignment]
    for _ in range(2):
        km._dispatch(IkeDatagram(A, 500, B, 500, _sa_init()), 0.0)
    assert len(km.responders) == 2 and not km.cookies.demanding
    req = _sa_init()
    km._dispatch(IkeDatagram(A, 500, B, 500, req), 0.0)
    assert len(km.responders) == 2 and km.cookies.demanding  # no state for it
    reply = stream.sent[-1]
    assert (reply.local_addr, reply.remote_addr, reply.remote_port) == (A, B, 500)
    cookie = _cookie_of(reply.data)
    # a forged cookie gets a new COOKIE response, the real one a responder
    km._dispatch(IkeDatagram(A, 500, B, 500, _with_cookie(req, bytes(36))), 0.0)
    assert len(km.responders) == 2 and _cookie_of(stream.sent[-1].data) == cookie
    km._dispatch(IkeDatagram(A, 500, B, 500, _with_cookie(req, cookie)), 0.0)
    assert len(km.responders) == 3
    assert decode_message(stream.sent[-1].data).spi_r != bytes(8)
    assert (km.cookies.stats.sent, km.cookies.stats.valid, km.cookies.stats.invalid) == (2, 1, 1)
    # the hard cap still holds over it; expiry brings the demand back down
    km._timers(1000.0)
    assert km.responders == {}
    km._dispatch(IkeDatagram(A, 500, B, 500, _sa_init()), 1000.0)
    assert not km.cookies.demanding and len(km.responders) == 1
