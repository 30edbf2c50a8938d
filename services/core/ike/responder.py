"""A minimal sans-IO IKEv2 responder: RFC 7296 §1.2 (IKE_SA_INIT + IKE_AUTH), §2.1, §2.9, §2.15.

The counterpart of :mod:`services.core.ike.exchange` (the initiator), with the same scope: one
IKE SA and its first Child SA (ESP, tunnel mode), authentication through the
:mod:`services.core.ike.authn` seam (PSK or certificates; identities of any §3.5 type), IPv4
or IPv6 addresses and traffic selectors. The IKE and ESP suites are configured
(:mod:`services.core.ike.suites`; default IKE ENCR_AES_GCM_16-256 / PRF_HMAC_SHA2_256 /
Curve25519 and ESP AES-GCM-16-256 without ESN): we take the first of *our* suites that the
initiator offers (§2.7, strongSwan's default).

Behaviour:

* IKE_SA_INIT: no acceptable IKE proposal -> unencrypted NO_PROPOSAL_CHOSEN (state FAILED);
  the chosen suite's group differs from the KE payload's (and no other acceptable suite of
  ours is in the KE's group) -> INVALID_KE_PAYLOAD naming the chosen suite's group (§1.3; no
  state is kept, the initiator may retry). NAT_DETECTION_SOURCE_IP /
  NAT_DETECTION_DESTINATION_IP (§2.23) are answered with ours when the initiator sent them and
  the addresses are known (``remote`` / ``local`` of :meth:`Ikev2Responder.receive`, or the
  config); the initiator then moves to UDP 4500, where the I/O shell strips the non-ESP marker
  (RFC 3948 §2.2) before calling ``receive``. ``nat_detected``: the initiator's NAT-D hashes
  differ from the addresses and ports the datagram carried.
* IKE_AUTH: the initiator's AUTH is checked by the configured :class:`PeerAuth` (for a PSK in
  constant time); a failure (or an IDi other than the configured ``remote_id``) is answered
  with an encrypted AUTHENTICATION_FAILED (§2.21.2) and ends in FAILED with the reason.
  Otherwise IDr and our AUTH are sent; the Child SA needs an acceptable ESP or AH proposal
  (the protocol of our Child SA suites, §3.3.1; else NO_PROPOSAL_CHOSEN; an AH Child SA while
  NAT was detected too, as AH cannot cross NAT) and TSi/TSr that overlap the configured
  ranges, which are narrowed to the intersection (§2.9; else TS_UNACCEPTABLE).
  USE_TRANSPORT_MODE (§1.3.1): a request for transport is accepted (the notify is echoed)
  when ``mode`` is TRANSPORT and declined (tunnel, no notify) when it is TUNNEL; a responder
  configured for TRANSPORT refuses an initiator that does not ask for it with
  NO_PROPOSAL_CHOSEN (the RFC gives the responder no way to impose transport, and tunnel is
  not what it is configured for). A Child SA error still authenticates the IKE SA to the
  peer, but here it ends in FAILED (no Child SA, no result).
* A retransmitted request (the message ID of the last request answered) gets the cached
  response again, unchanged (§2.1). Malformed, unauthenticated or unrelated datagrams are
  dropped: ``receive`` never raises for what arrives on the wire.
* Error answers of §2.5 / §2.21: an IKE_SA_INIT request with a payload type we do not know and
  the critical bit set gets an unencrypted N(UNSUPPORTED_CRITICAL_PAYLOAD) naming the type (no
  state is kept); a request with a higher major version is dropped and answered with an
  unauthenticated N(INVALID_MAJOR_VERSION) (:func:`~services.core.ike.message.version_answer`);
  an IKE_AUTH request whose integrity check passes but whose inner payloads are malformed gets
  an encrypted UNSUPPORTED_CRITICAL_PAYLOAD or INVALID_SYNTAX and ends in FAILED. Other
  malformed IKE_SA_INIT requests are dropped (they are unauthenticated). ``error_answers``
  counts these answers, ``dropped`` the datagrams dropped.

* IKE fragmentation (RFC 7383): when the initiator announced IKEV2_FRAGMENTATION_SUPPORTED
  (and ``fragment_size`` is not 0) we announce it too, reassemble a fragmented IKE_AUTH request
  and send our IKE_AUTH response as SKF fragments when it does not fit ``fragment_size``
  octets of IP packet. A retransmitted request is answered (all fragments again) on its first
  fragment only.

* Several configured Child SAs (``children``, RFC 7296 §1.3.1, §2.9): IKE_AUTH's TSi / TSr are
  matched against ``ts_remote`` / ``ts_local`` first, then against each
  :class:`~services.core.ike.child.ChildPolicy` in order; the first whose ranges both
  intersect gives the ranges, ESP suites and mode of the Child SA (``child_name`` says which:
  "" for the top-level one). After IKE_AUTH the InfoSession knows them all.

Out of scope: COOKIEs, EAP, more than one IKE SA per instance.
INFORMATIONAL and CREATE_CHILD_SA exchanges after ESTABLISHED are handled by
:mod:`services.core.ike.informational` (liveness, Delete of the Child SA or of the IKE SA ->
CLOSED, ``delete_ike``, the peer's Child SA rekey). Time comes in as ``now``; randomness from
``rand``. No key appears in any repr.
"""

from __future__ import annotations

import ipaddress
import secrets
import struct
from dataclasses import dataclass, field
from enum import Enum

from services.core.algorithms import AlgorithmError
from services.core.ike.authn import (
    AuthFailure,
    Identity,
    LocalAuth,
    PeerAuth,
    hash_algorithms_notify,
    peer_hash_algorithms,
    signed_octets,
)
from services.core.ike.child import ChildPolicy, choose_esp_proposal, hull, narrow
from services.core.ike.constants import ExchangeType, NotifyType
from services.core.ike.dh import DhPrivate, InvalidKeyExchange, group
from services.core.ike.exchange import (
    AH_NAT_REASON,
    FRAGMENT_SIZE,
    NAT_T_PORT,
    ChildSaResult,
    IkeSaResult,
    Rand,
    _check_range,
    _ipv4,
    _transport_requested,
    check_suites,
    child_protocol_name,
    credentials,
    esp_child_keys,
    fragment_limit,
    fragmentation_notify,
    identity_of,
    ike_keys,
    nat_detection,
    nat_detection_hash,
    peer_supports_fragmentation,
    sk_ciphers,
)
from services.core.ike.informational import InfoEvent, InfoSession
from services.core.ike.keys import IkeKeys
from services.core.ike.message import (
    KE,
    SA,
    SKF,
    Auth,
    Cert,
    IDi,
    IDr,
    IkeDecodeError,
    Message,
    Nonce,
    Notify,
    Payload,
    Proposal,
    TSi,
    TSr,
    decode_header,
    decode_message,
    encode_message,
    error_notify,
    version_answer,
)
from services.core.ike.sk import (
    FragmentReassembler,
    SkCipher,
    SkError,
    answers_retransmission,
    decrypt_message,
    encrypt_message,
)
from services.core.ike.suites import (
    DEFAULT_ESP,
    DEFAULT_IKE,
    EspSuite,
    IkeSuite,
    choose_esp,
    choose_ike,
)
from services.core.sa import Mode

__all__ = [
    "NAT_T_PORT",
    "Address",
    "Ikev2Responder",
    "ResponderConfig",
    "ResponderState",
    "choose_esp_proposal",
    "choose_ike_proposal",
    "narrow",
]

Address = tuple[bytes, int]  # (4- or 16-octet IP address, UDP port)
_NONCE_LEN = 32
_ZERO_SPI = bytes(8)


class ResponderState(Enum):
    WAIT_SA_INIT = "wait_sa_init"
    WAIT_AUTH = "wait_auth"
    ESTABLISHED = "established"
    FAILED = "failed"
    CLOSED = "closed"


@dataclass(frozen=True, kw_only=True)
class ResponderConfig:
    """What the responder accepts. Addresses are IPv4 or IPv6 text; secrets are never in repr.

    Authentication: ``psk`` (both directions) or ``local_auth`` / ``peer_auth`` objects of the
    :mod:`services.core.ike.authn` seam. ``local_id`` defaults to ``local_addr`` (sent as IDr,
    ID_IPV4_ADDR). ``remote_id``, when set (an :class:`Identity` or its text form), is the only
    IDi accepted; None or ``"%any"`` accepts whichever identity the initiator proves.
    ``ts_local`` / ``ts_remote`` are inclusive (start, end) address
    ranges the Child SA may cover on our side (TSr) and the initiator's side (TSi).
    ``ike_suites`` / ``esp_suites``: what we accept, in our order of preference; ``mode``:
    TUNNEL, or TRANSPORT (only with an initiator that asks for it, see the module docstring).
    ``remote_addr`` / ports are only the defaults for NAT detection when ``receive`` is not
    told the datagram's addresses. ``fragment_size``: the largest IP packet of an RFC 7383
    fragment we send (0: fragmentation not announced). ``children``: further Child SAs the
    IKE_AUTH request may ask for instead (see the module docstring).
    """

    local_addr: str
    ts_local: tuple[str, str]
    ts_remote: tuple[str, str]
    psk: bytes | None = field(default=None, repr=False)
    local_auth: LocalAuth | None = field(default=None, repr=False)
    peer_auth: PeerAuth | None = field(default=None, repr=False)
    local_id: str | Identity | None = None
    remote_id: str | Identity | None = None
    remote_addr: str | None = None
    local_port: int = 500
    remote_port: int = 500
    ike_suites: tuple[IkeSuite, ...] = (DEFAULT_IKE,)
    esp_suites: tuple[EspSuite, ...] = (DEFAULT_ESP,)
    mode: Mode = Mode.TUNNEL
    fragment_size: int = FRAGMENT_SIZE
    children: tuple[ChildPolicy, ...] = ()

    def __post_init__(self) -> None:
        if self.fragment_size and self.fragment_size < 576:
            raise ValueError("fragment_size must be 0 or at least 576")  # RFC 7383 §2.5.1
        for child in self.children:
            if not child.our_ts or not child.peer_ts or not child.esp_suites:
                raise ValueError(f"child {child.name!r} needs selectors and ESP suites")
        _ipv4(self.local_addr)
        if self.remote_addr is not None:
            _ipv4(self.remote_addr)
        identity_of(self.local_id, self.local_addr)
        identity_of(self.remote_id, None)
        _check_range(self.ts_local, "ts_local")
        _check_range(self.ts_remote, "ts_remote")
        check_suites(self.ike_suites, self.esp_suites)
        if self.mode not in (Mode.TUNNEL, Mode.TRANSPORT):
            raise ValueError("mode must be Mode.TUNNEL or Mode.TRANSPORT")
        credentials(self.psk, self.local_auth, self.peer_auth)


# -- negotiation helpers (pure) ---------------------------------------------------------------


def choose_ike_proposal(
    proposals: tuple[Proposal, ...], suites: tuple[IkeSuite, ...] = (DEFAULT_IKE,)
) -> Proposal | None:
    """Our answer to an IKE offer (RFC 7296 §2.7, §3.3.6): the first of ``suites`` that some
    offered proposal contains, with the offer's number; None if nothing fits (see
    :func:`services.core.ike.suites.choose_ike`)."""
    c = choose_ike(proposals, suites)
    return None if c is None else c[0]


def _first(payloads: tuple[Payload, ...], cls: type[Payload]) -> Payload | None:
    for p in payloads:
        if isinstance(p, cls):
            return p
    return None


def _has_notify(payloads: tuple[Payload, ...], t: int) -> Notify | None:
    for p in payloads:
        if isinstance(p, Notify) and p.notify_type == t:
            return p
    return None


def _nonzero(rand: Rand, n: int, minimum: int) -> bytes:
    while True:
        b = rand(n)
        if len(b) != n:
            raise ValueError("rand returned the wrong number of octets")
        if int.from_bytes(b, "big") >= minimum:
            return b


class _Drop(Exception):
    """Internal: the datagram is ignored."""


class Ikev2Responder:
    """IKE_SA_INIT then IKE_AUTH with PSK, answering one initiator; fed with datagrams.

    ``receive(data, now, remote=..., local=...)`` takes one IKE message (no non-ESP marker) and
    returns the datagrams to send back to where it came from (same socket, so UDP 4500 with the
    non-ESP marker when the request arrived there). ``remote`` / ``local`` are the datagram's
    (IPv4 address octets, UDP port) and feed NAT detection.

    ``result.child``: ``spi_in`` is our Child SA SPI (the initiator sends to it, protected with
    ``keys.encr_i``); ``spi_out`` is the initiator's (we send to it with ``keys.encr_r``).
    """

    def __init__(
        self, config: ResponderConfig, *, now: float, rand: Rand = secrets.token_bytes
    ) -> None:
        self.config = config
        self._rand = rand
        self._state = ResponderState.WAIT_SA_INIT
        self.failure_reason: str | None = None
        self.result: IkeSaResult | None = None
        self.created_at = now
        self.last_activity = now
        self.nat_t = False  # NAT-D exchanged: IKE_AUTH is expected on UDP 4500
        self.nat_detected = False  # the initiator's NAT-D hashes differ from what we see
        self.local_behind_nat = False  # NAT-D: a NAT rewrote our address or port (§2.23)
        self.dropped = 0
        self.invalid_ke_sent = 0  # INVALID_KE_PAYLOAD answers (stateless, §1.3)
        self.error_answers = 0  # UNSUPPORTED_CRITICAL_PAYLOAD / INVALID_MAJOR_VERSION / ... sent
        self._spi_i = _ZERO_SPI
        self._spi_r = _ZERO_SPI
        self._ni = b""
        self._nr = b""
        self._msg1 = b""
        self._msg2 = b""
        self._keys: IkeKeys | None = None
        self._suite: IkeSuite | None = None
        self._in: SkCipher | None = None
        self._out: SkCipher | None = None
        self._child_spi = b""
        self.child_name = ""  # the configured child IKE_AUTH created ("": the top-level one)
        # RFC 7296 §2.1: the last request's message ID and the response(s) sent for it.
        self._last_exchange = 0
        self._last_mid: int | None = None
        self._last_response: list[bytes] = []
        self._info: InfoSession | None = None
        local_id = identity_of(config.local_id, config.local_addr)
        assert local_id is not None  # defaults to the address
        self._local_id = local_id
        self._remote_id = identity_of(config.remote_id, None)
        self._local_auth, self._peer_auth = credentials(
            config.psk, config.local_auth, config.peer_auth
        )
        self._peer_hashes: frozenset[int] = frozenset()
        self._fragment = False  # both sides announced RFC 7383 fragmentation
        self._reassembler = FragmentReassembler()
        self._peer_addr = config.remote_addr or config.local_addr  # for the IP header size

    def __repr__(self) -> str:
        return (
            f"Ikev2Responder(state={self._state.value}, spi_i={self._spi_i.hex()}, "
            f"spi_r={self._spi_r.hex()})"
        )

    @property
    def state(self) -> ResponderState:
        return self._state

    @property
    def spi_i(self) -> bytes:
        return self._spi_i

    @property
    def sa_keys(self) -> tuple[bytes, bytes, IkeKeys, IkeSuite] | None:
        """(SPIi, SPIr, keys, suite) once IKE_SA_INIT derived them, else None: for the opt-in
        key export only (also of IKE SAs whose IKE_AUTH then fails). Never in a repr."""
        if self._keys is None or self._suite is None:
            return None
        return self._spi_i, self._spi_r, self._keys, self._suite

    @property
    def spi_r(self) -> bytes:
        return self._spi_r

    def take_events(self) -> list[InfoEvent]:
        """Events of INFORMATIONAL exchanges since the last call (child / IKE SA deleted)."""
        return self._info.take_events() if self._info is not None else []

    @property
    def info(self) -> InfoSession | None:
        """The ESTABLISHED IKE SA's exchanges (rekeys, liveness, timers); None before."""
        return self._info

    def delete_ike(self, now: float) -> list[bytes]:
        """An INFORMATIONAL Delete of the IKE SA (RFC 7296 §1.4.1); its response -> CLOSED."""
        if self._state is not ResponderState.ESTABLISHED or self._info is None:
            return []
        return self._info.delete_ike()

    # -- driving ------------------------------------------------------------------------------

    def receive(
        self,
        data: bytes,
        now: float,
        *,
        remote: Address | None = None,
        local: Address | None = None,
    ) -> list[bytes]:
        """Process one received IKE message; return the response datagram(s), maybe none."""
        try:
            out = self._receive(bytes(data), now, remote, local)
        except IkeDecodeError as e:
            answer = version_answer(data) if e.header is None else None
            if answer is None:
                self.dropped += 1
                return []
            self.error_answers += 1  # §2.5: dropped, and answered without any state
            return [answer]
        except (_Drop, SkError, AlgorithmError, InvalidKeyExchange, ValueError):
            self.dropped += 1
            return []
        self.last_activity = now
        return out

    # -- internals ----------------------------------------------------------------------------

    def _receive(
        self, data: bytes, now: float, remote: Address | None, local: Address | None
    ) -> list[bytes]:
        if self._state is ResponderState.ESTABLISHED and self._info is not None:
            hdr = decode_header(data)
            if (
                hdr.message_id == self._last_mid
                and hdr.exchange_type == ExchangeType.IKE_AUTH
                and hdr.next_payload == SKF.payload_type
                and not hdr.response
            ):  # a retransmitted fragmented IKE_AUTH request (RFC 7383 §2.6.1)
                self._check_retransmit(data)
                return list(self._last_response)
            out = self._info.handle(data)  # InfoDrop is a ValueError -> dropped
            if self._info.closed:
                self._state = ResponderState.CLOSED
            return out
        hdr = decode_header(data)
        if hdr.response or not hdr.initiator:
            raise _Drop
        if self._state is ResponderState.WAIT_SA_INIT:
            if hdr.exchange_type != ExchangeType.IKE_SA_INIT or hdr.message_id != 0:
                raise _Drop
            if hdr.spi_r != _ZERO_SPI or hdr.spi_i == _ZERO_SPI:
                raise _Drop
            try:
                msg = decode_message(data)
            except IkeDecodeError as e:
                if e.notify_type != NotifyType.UNSUPPORTED_CRITICAL_PAYLOAD:
                    raise
                # §2.5: reject it with the payload type; keep no state (as INVALID_KE_PAYLOAD)
                self.error_answers += 1
                return [self._error_sa_init(hdr.spi_i, error_notify(e))]
            return self._on_sa_init(msg, data, remote, local)
        if hdr.spi_i != self._spi_i:
            raise _Drop
        # A retransmission of the last request: resend the cached response (§2.1). For
        # IKE_SA_INIT the responder SPI in the request is still zero.
        if hdr.message_id == self._last_mid and self._last_response:
            want_spi_r = _ZERO_SPI if hdr.message_id == 0 else self._spi_r
            if hdr.spi_r == want_spi_r and hdr.exchange_type == self._last_exchange:
                self._check_retransmit(data)
                return list(self._last_response)
            raise _Drop
        if self._state is ResponderState.WAIT_AUTH:
            if (
                hdr.exchange_type != ExchangeType.IKE_AUTH
                or hdr.message_id != 1
                or hdr.spi_r != self._spi_r
            ):
                raise _Drop
            return self._on_auth(data, now)
        raise _Drop

    def _check_retransmit(self, data: bytes) -> None:
        """Drop a malformed "retransmission", and every fragment of one but the first."""
        msg = decode_message(data)
        last = msg.payloads[-1] if msg.payloads else None
        if isinstance(last, SKF):  # SkError -> drop
            if self._in is None or not answers_retransmission(data, self._in):
                raise _Drop

    def _fail(self, reason: str) -> None:
        self._state = ResponderState.FAILED
        self.failure_reason = reason

    def _answer(self, exchange: int, mid: int, datagrams: list[bytes]) -> list[bytes]:
        self._last_exchange = exchange
        self._last_mid = mid
        self._last_response = list(datagrams)
        return list(datagrams)

    def _error_sa_init(self, spi_i: bytes, notify: Notify) -> bytes:
        msg = Message(spi_i, _ZERO_SPI, ExchangeType.IKE_SA_INIT, 0, (notify,), response=True)
        return encode_message(msg)

    def _on_sa_init(
        self, msg: Message, raw: bytes, remote: Address | None, local: Address | None
    ) -> list[bytes]:
        sa = _first(msg.payloads, SA)
        ke = _first(msg.payloads, KE)
        nonce = _first(msg.payloads, Nonce)
        if not isinstance(sa, SA) or not isinstance(ke, KE) or not isinstance(nonce, Nonce):
            raise _Drop
        if not 16 <= len(nonce.data) <= 256:
            raise _Drop
        choice = choose_ike(sa.proposals, self.config.ike_suites, ke.dh_group)
        if choice is None:
            self._spi_i = msg.spi_i
            self._fail(
                "NO_PROPOSAL_CHOSEN: no IKE proposal of the initiator matches ours ("
                + ", ".join(s.name for s in self.config.ike_suites)
                + ")"
            )
            err = self._error_sa_init(msg.spi_i, Notify(NotifyType.NO_PROPOSAL_CHOSEN))
            return self._answer(ExchangeType.IKE_SA_INIT, 0, [err])
        chosen, suite = choice
        if ke.dh_group != suite.dh:
            # §1.3: tell the initiator which group we want; keep no state (it retries with
            # the same SPIi and message ID 0).
            self.invalid_ke_sent += 1
            return [
                self._error_sa_init(
                    msg.spi_i, Notify(NotifyType.INVALID_KE_PAYLOAD, struct.pack("!H", suite.dh))
                )
            ]
        dh: DhPrivate = group(suite.dh, allow_legacy=suite.allow_legacy).generate(self._rand)
        g_ir = dh.shared(ke.data)  # InvalidKeyExchange -> dropped
        spi_r = _nonzero(self._rand, 8, 1)
        nr = self._rand(_NONCE_LEN)
        payloads: list[Payload] = [SA((chosen,)), KE(suite.dh, dh.public_bytes()), Nonce(nr)]
        payloads.extend(self._peer_auth.cert_requests())
        payloads.extend(hash_algorithms_notify(self._peer_auth.hash_algorithms()))
        if peer_supports_fragmentation(msg.payloads):
            payloads.extend(fragmentation_notify(self.config.fragment_size))
            self._fragment = self.config.fragment_size > 0
        nat_src = _has_notify(msg.payloads, NotifyType.NAT_DETECTION_SOURCE_IP)
        nat_dst = _has_notify(msg.payloads, NotifyType.NAT_DETECTION_DESTINATION_IP)
        cfg = self.config
        here = local or (_ipv4(cfg.local_addr), cfg.local_port)
        there = remote
        if there is None and cfg.remote_addr is not None:
            there = (_ipv4(cfg.remote_addr), cfg.remote_port)
        if nat_src is not None and nat_dst is not None and there is not None:
            payloads.append(
                Notify(
                    NotifyType.NAT_DETECTION_SOURCE_IP,
                    nat_detection_hash(msg.spi_i, spi_r, here[0], here[1]),
                )
            )
            payloads.append(
                Notify(
                    NotifyType.NAT_DETECTION_DESTINATION_IP,
                    nat_detection_hash(msg.spi_i, spi_r, there[0], there[1]),
                )
            )
            self.nat_t = True
            self.nat_detected, self.local_behind_nat = nat_detection(
                msg.payloads, msg.spi_i, _ZERO_SPI, (there[0], there[1]), (here[0], here[1])
            )
        resp = encode_message(
            Message(msg.spi_i, spi_r, ExchangeType.IKE_SA_INIT, 0, tuple(payloads), response=True)
        )
        keys = ike_keys(suite, nonce.data, nr, g_ir, msg.spi_i, spi_r)
        self._keys = keys
        self._suite = suite
        self._in, self._out = sk_ciphers(suite, keys, initiator=False)
        self._spi_i, self._spi_r = msg.spi_i, spi_r
        self._ni, self._nr = nonce.data, nr
        self._peer_hashes = peer_hash_algorithms(msg.payloads)
        self._msg1, self._msg2 = raw, resp
        if there is not None:
            self._peer_addr = str(ipaddress.ip_address(there[0]))
        self._state = ResponderState.WAIT_AUTH
        return self._answer(ExchangeType.IKE_SA_INIT, 0, [resp])

    def _encrypted(self, exchange: int, mid: int, inner: tuple[Payload, ...]) -> list[bytes]:
        assert self._out is not None
        msg = Message(self._spi_i, self._spi_r, exchange, mid, inner, response=True)
        limit = None
        if self._fragment:
            limit = fragment_limit(self.config.fragment_size, self._peer_addr, self.nat_t)
        return encrypt_message(msg, self._out, fragment_size=limit)

    def _check_initiator(self, msg: Message, idi: IDi, auth: Auth, now: float) -> str | None:
        """Why the initiator is not authenticated (a reason for the log), or None."""
        assert self._keys is not None and self._suite is not None
        prf_id = self._suite.prf_alg
        peer = Identity(idi.id_type, idi.data)
        if self._remote_id is not None and not self._remote_id.matches(peer):
            return f"initiator identity {peer} is not the configured {self._remote_id}"
        idr_req = _first(msg.payloads, IDr)
        if isinstance(idr_req, IDr) and not self._local_id.matches(
            Identity(idr_req.id_type, idr_req.data)
        ):
            wanted = Identity(idr_req.id_type, idr_req.data)
            return f"initiator asked for responder identity {wanted}, we are {self._local_id}"
        octets = signed_octets(prf_id, self._msg1, self._nr, self._keys.sk_pi, idi.encode_body())
        certs = tuple(p for p in msg.payloads if isinstance(p, Cert))
        try:
            self._peer_auth.verify(auth, octets, prf_id, peer, certs, now)
        except AuthFailure as e:
            return str(e)
        return None

    def _on_auth(self, raw: bytes, now: float) -> list[bytes]:
        assert self._keys is not None and self._in is not None and self._suite is not None
        prf_id = self._suite.prf_alg
        # SkError / IkeDecodeError -> dropped (§2.21.2); SKF fragments only if negotiated.
        # Malformed inner payloads behind a good ICV are answered (§2.5, §2.21.2, §3.10.1).
        try:
            if self._fragment:
                whole = self._reassembler.add(raw, self._in)
                if whole is None:
                    return []  # more fragments to come
                msg = whole
            else:
                msg = decrypt_message(raw, self._in)
        except IkeDecodeError as e:
            if not e.authenticated:
                raise
            notify = error_notify(e)
            self._fail(f"{NotifyType(notify.notify_type).name}: malformed IKE_AUTH request ({e})")
            self.error_answers += 1
            out = self._encrypted(ExchangeType.IKE_AUTH, 1, (notify,))
            return self._answer(ExchangeType.IKE_AUTH, 1, out)
        cfg = self.config
        idi = _first(msg.payloads, IDi)
        auth = _first(msg.payloads, Auth)
        if not isinstance(idi, IDi) or not isinstance(auth, Auth):
            raise _Drop
        my_id = IDr(self._local_id.id_type, self._local_id.data)
        why = self._check_initiator(msg, idi, auth, now)
        reason = None if why is None else f"AUTHENTICATION_FAILED: {why}"
        if reason is not None:
            self._fail(reason)
            out = self._encrypted(
                ExchangeType.IKE_AUTH, 1, (Notify(NotifyType.AUTHENTICATION_FAILED),)
            )
            return self._answer(ExchangeType.IKE_AUTH, 1, out)
        octets = signed_octets(prf_id, self._msg2, self._ni, self._keys.sk_pr, my_id.encode_body())
        my_auth = self._local_auth.auth_payload(octets, prf_id, self._peer_hashes)
        my_certs = self._local_auth.cert_payloads()
        sa = _first(msg.payloads, SA)
        tsi = _first(msg.payloads, TSi)
        tsr = _first(msg.payloads, TSr)
        if not isinstance(sa, SA) or not isinstance(tsi, TSi) or not isinstance(tsr, TSr):
            self._fail("no Child SA requested (SA, TSi or TSr missing)")
            out = self._encrypted(ExchangeType.IKE_AUTH, 1, (my_id, *my_certs, my_auth))
            return self._answer(ExchangeType.IKE_AUTH, 1, out)
        self._child_spi = _nonzero(self._rand, 4, 256)  # RFC 4303 §2.1: 1..255 reserved
        # §2.9: the top-level Child SA, else the first configured child the selectors fit
        peer_range = (_ipv4(cfg.ts_remote[0]), _ipv4(cfg.ts_remote[1]))
        our_range = (_ipv4(cfg.ts_local[0]), _ipv4(cfg.ts_local[1]))
        esp_suites, child_mode = cfg.esp_suites, cfg.mode
        ts_i = narrow(tsi.selectors, peer_range)
        ts_r = narrow(tsr.selectors, our_range)
        if not ts_i or not ts_r:
            for alt in cfg.children:
                ci = narrow(tsi.selectors, hull(alt.peer_ts))
                cr = narrow(tsr.selectors, hull(alt.our_ts))
                if ci and cr:
                    ts_i, ts_r, esp_suites, child_mode = ci, cr, alt.esp_suites, alt.mode
                    self.child_name = alt.name
                    break
        picked = choose_esp(sa.proposals, esp_suites, self._child_spi)
        error: int | None = None
        why = ""
        transport = _transport_requested(msg.payloads)
        if picked is None:
            error = NotifyType.NO_PROPOSAL_CHOSEN
            why = (
                f": no {child_protocol_name(esp_suites)} proposal of the initiator matches "
                "ours (" + ", ".join(s.name for s in esp_suites) + ")"
            )
        elif picked.suite.ah and self.nat_detected:
            error = NotifyType.NO_PROPOSAL_CHOSEN
            why = f": {AH_NAT_REASON}"
        elif child_mode is Mode.TRANSPORT and not transport:
            error = NotifyType.NO_PROPOSAL_CHOSEN
            why = ": we are configured for transport mode, the initiator did not ask for it"
        elif not ts_i or not ts_r:
            error = NotifyType.TS_UNACCEPTABLE
        if error is not None or picked is None:
            error = error or NotifyType.NO_PROPOSAL_CHOSEN
            self._fail(NotifyType(error).name + why)
            out = self._encrypted(
                ExchangeType.IKE_AUTH, 1, (my_id, *my_certs, my_auth, Notify(error))
            )
            return self._answer(ExchangeType.IKE_AUTH, 1, out)
        esp = picked.suite
        ck = esp_child_keys(esp, prf_id, self._keys.sk_d, self._ni, self._nr)
        # §1.3.1: transport only when asked for and configured; otherwise tunnel, no notify.
        mode = Mode.TRANSPORT if transport and child_mode is Mode.TRANSPORT else Mode.TUNNEL
        child = ChildSaResult(
            spi_in=self._child_spi,
            spi_out=picked.offered.spi,
            encr_id=esp.encr,
            key_bits=esp.key_bits,
            esn=esp.esn,
            keys=ck,
            ts_i=ts_i,
            ts_r=ts_r,
            integ_id=esp.integ,
            mode=mode,
            protocol=esp.protocol,
        )
        use_transport: tuple[Payload, ...] = ()
        if mode is Mode.TRANSPORT:
            use_transport = (Notify(NotifyType.USE_TRANSPORT_MODE),)
        out = self._encrypted(
            ExchangeType.IKE_AUTH,
            1,
            (
                my_id,
                *my_certs,
                my_auth,
                *use_transport,
                SA((picked.answer,)),
                TSi(ts_i),
                TSr(ts_r),
            ),
        )
        self.result = IkeSaResult(
            self._spi_i,
            self._spi_r,
            self._keys,
            child,
            self.nat_t,
            self._suite,
            nat_detected=self.nat_detected,
            local_behind_nat=self.local_behind_nat,
        )
        assert self._out is not None
        self._info = InfoSession(
            spi_i=self._spi_i,
            spi_r=self._spi_r,
            we_initiated=False,
            cin=self._in,
            cout=self._out,
            child=(child.spi_in, child.spi_out),
            our_next_mid=0,
            peer_next_mid=2,
            last=(1, ExchangeType.IKE_AUTH, out),
            sk_d=self._keys.sk_d,
            peer_ts=child.ts_i,
            our_ts=child.ts_r,
            rand=self._rand,
            ike_suite=self._suite,
            ike_suites=cfg.ike_suites,
            esp_suites=esp_suites,
            mode=mode,
            fragment_size=fragment_limit(cfg.fragment_size, self._peer_addr, self.nat_t)
            if self._fragment
            else None,
        )
        self._state = ResponderState.ESTABLISHED
        return self._answer(ExchangeType.IKE_AUTH, 1, out)
