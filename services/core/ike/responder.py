"""A minimal sans-IO IKEv2 responder: RFC 7296 §1.2 (IKE_SA_INIT + IKE_AUTH), §2.1, §2.9, §2.15.

The counterpart of :mod:`services.core.ike.exchange` (the initiator), with the same scope: one
IKE SA and its first Child SA (ESP, tunnel mode), authentication through the
:mod:`services.core.ike.authn` seam (PSK or certificates; identities of any §3.5 type), IPv4
traffic selectors. Accepted are exactly the initiator module's algorithms:
IKE ENCR_AES_GCM_16-256 / PRF_HMAC_SHA2_256 / Curve25519 (group 31) and ESP AES-GCM-16-256
without ESN, picked from whatever the initiator offers (§2.7).

Behaviour:

* IKE_SA_INIT: no acceptable IKE proposal -> unencrypted NO_PROPOSAL_CHOSEN (state FAILED);
  group 31 offered but the KE payload is in another group -> INVALID_KE_PAYLOAD carrying
  group 31 (§1.3; no state is kept, the initiator may retry). NAT_DETECTION_SOURCE_IP /
  NAT_DETECTION_DESTINATION_IP (§2.23) are answered with ours when the initiator sent them and
  the addresses are known (``remote`` / ``local`` of :meth:`Ikev2Responder.receive`, or the
  config); the initiator then moves to UDP 4500, where the I/O shell strips the non-ESP marker
  (RFC 3948 §2.2) before calling ``receive``.
* IKE_AUTH: the initiator's AUTH is checked by the configured :class:`PeerAuth` (for a PSK in
  constant time); a failure (or an IDi other than the configured ``remote_id``) is answered
  with an encrypted AUTHENTICATION_FAILED (§2.21.2) and ends in FAILED with the reason.
  Otherwise IDr and our AUTH are sent; the Child SA needs an acceptable ESP
  proposal (else NO_PROPOSAL_CHOSEN) and TSi/TSr that overlap the configured ranges, which are
  narrowed to the intersection (§2.9; else TS_UNACCEPTABLE). A Child SA error still
  authenticates the IKE SA to the peer, but here it ends in FAILED (no Child SA, no result).
* A retransmitted request (the message ID of the last request answered) gets the cached
  response again, unchanged (§2.1). Malformed, unauthenticated or unrelated datagrams are
  dropped: ``receive`` never raises for what arrives on the wire.

* IKE fragmentation (RFC 7383): when the initiator announced IKEV2_FRAGMENTATION_SUPPORTED
  (and ``fragment_size`` is not 0) we announce it too, reassemble a fragmented IKE_AUTH request
  and send our IKE_AUTH response as SKF fragments when it does not fit ``fragment_size``
  octets of IP packet. A retransmitted request is answered (all fragments again) on its first
  fragment only.

Out of scope: COOKIEs, CREATE_CHILD_SA started by us, EAP, more than one IKE SA per instance.
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
from services.core.ike.child import (
    ENCR_ID,
    ENCR_KEY_BITS,
    choose_esp_proposal,
    narrow,
    transforms_by_type,
)
from services.core.ike.constants import (
    ExchangeType,
    NotifyType,
    ProtocolId,
    TransformType,
)
from services.core.ike.dh import DhPrivate, InvalidKeyExchange, group
from services.core.ike.exchange import (
    DH_ID,
    FRAGMENT_SIZE,
    GCM_SALT_LEN,
    NAT_T_PORT,
    PRF_ID,
    ChildSaResult,
    IkeSaResult,
    Rand,
    _ipv4,
    credentials,
    fragment_limit,
    fragmentation_notify,
    identity_of,
    ike_proposal,
    nat_detection_hash,
    peer_supports_fragmentation,
)
from services.core.ike.informational import InfoEvent, InfoSession
from services.core.ike.keys import IkeKeys, child_keys, derive_ike_keys, skeyseed
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
)
from services.core.ike.sk import (
    FragmentReassembler,
    SkCipher,
    SkError,
    decrypt_message,
    encrypt_message,
)

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

Address = tuple[bytes, int]  # (4-octet IPv4 address, UDP port)
_NONCE_LEN = 32
_ENCR_KEY_LEN = ENCR_KEY_BITS // 8 + GCM_SALT_LEN
_ZERO_SPI = bytes(8)
_IPV4_ALL = (b"\x00\x00\x00\x00", b"\xff\xff\xff\xff")


class ResponderState(Enum):
    WAIT_SA_INIT = "wait_sa_init"
    WAIT_AUTH = "wait_auth"
    ESTABLISHED = "established"
    FAILED = "failed"
    CLOSED = "closed"


@dataclass(frozen=True, kw_only=True)
class ResponderConfig:
    """What the responder accepts. Addresses are IPv4 dotted quads; secrets are never in repr.

    Authentication: ``psk`` (both directions) or ``local_auth`` / ``peer_auth`` objects of the
    :mod:`services.core.ike.authn` seam. ``local_id`` defaults to ``local_addr`` (sent as IDr,
    ID_IPV4_ADDR). ``remote_id``, when set (an :class:`Identity` or its text form), is the only
    IDi accepted; None or ``"%any"`` accepts whichever identity the initiator proves.
    ``ts_local`` / ``ts_remote`` are inclusive (start, end) IPv4
    ranges the Child SA may cover on our side (TSr) and the initiator's side (TSi).
    ``remote_addr`` / ports are only the defaults for NAT detection when ``receive`` is not
    told the datagram's addresses. ``fragment_size``: the largest IP packet of an RFC 7383
    fragment we send (0: fragmentation not announced).
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
    fragment_size: int = FRAGMENT_SIZE

    def __post_init__(self) -> None:
        if self.fragment_size and self.fragment_size < 576:
            raise ValueError("fragment_size must be 0 or at least 576")  # RFC 7383 §2.5.1
        for a in (self.local_addr, *self.ts_local, *self.ts_remote):
            _ipv4(a)
        if self.remote_addr is not None:
            _ipv4(self.remote_addr)
        identity_of(self.local_id, self.local_addr)
        identity_of(self.remote_id, None)
        for lo, hi in (self.ts_local, self.ts_remote):
            if _ipv4(lo) > _ipv4(hi):
                raise ValueError("traffic selector range start after end")
        credentials(self.psk, self.local_auth, self.peer_auth)


# -- negotiation helpers (pure) ---------------------------------------------------------------


_IKE_TYPES = frozenset(
    {TransformType.ENCR, TransformType.PRF, TransformType.INTEG, TransformType.DH}
)


def choose_ike_proposal(proposals: tuple[Proposal, ...]) -> Proposal | None:
    """Pick our IKE suite from the offer (RFC 7296 §2.7, §3.3.6); None if nothing fits.

    A proposal is acceptable when each of its transform types offers our transform: ENCR
    AES-GCM-16 with a 256-bit key, PRF HMAC-SHA2-256, DH 31, and INTEG (if present at all)
    NONE. A proposal with any other transform type, or with an SPI, is not acceptable. The
    returned proposal keeps the offer's number.
    """
    for p in proposals:
        if p.protocol_id != ProtocolId.IKE or p.spi:
            continue
        by_type = transforms_by_type(p, _IKE_TYPES)
        if by_type is None:
            continue
        if (ENCR_ID, ENCR_KEY_BITS) not in by_type.get(TransformType.ENCR, []):
            continue
        if not any(i == PRF_ID for i, _ in by_type.get(TransformType.PRF, [])):
            continue
        integ = by_type.get(TransformType.INTEG)
        if integ is not None and not any(i == 0 for i, _ in integ):
            continue
        if any(i == DH_ID for i, _ in by_type.get(TransformType.DH, [])):
            return Proposal(p.number, ProtocolId.IKE, ike_proposal().transforms)
    return None


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
        self.dropped = 0
        self._spi_i = _ZERO_SPI
        self._spi_r = _ZERO_SPI
        self._ni = b""
        self._nr = b""
        self._msg1 = b""
        self._msg2 = b""
        self._keys: IkeKeys | None = None
        self._in: SkCipher | None = None
        self._out: SkCipher | None = None
        self._child_spi = b""
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
    def spi_r(self) -> bytes:
        return self._spi_r

    def take_events(self) -> list[InfoEvent]:
        """Events of INFORMATIONAL exchanges since the last call (child / IKE SA deleted)."""
        return self._info.take_events() if self._info is not None else []

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
        except (_Drop, IkeDecodeError, SkError, AlgorithmError, InvalidKeyExchange, ValueError):
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
            return self._on_sa_init(decode_message(data), data, remote, local)
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
        if isinstance(last, SKF):
            if last.fragment_number != 1 or self._in is None:
                raise _Drop
            self._in.open(data[: len(data) - len(last.data)], last.data)  # SkError -> drop

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
        chosen = choose_ike_proposal(sa.proposals)
        if chosen is None:
            self._spi_i = msg.spi_i
            self._fail("NO_PROPOSAL_CHOSEN")
            err = self._error_sa_init(msg.spi_i, Notify(NotifyType.NO_PROPOSAL_CHOSEN))
            return self._answer(ExchangeType.IKE_SA_INIT, 0, [err])
        if ke.dh_group != DH_ID:
            # §1.3: tell the initiator which group we want; keep no state (it retries with
            # the same SPIi and message ID 0).
            return [
                self._error_sa_init(
                    msg.spi_i, Notify(NotifyType.INVALID_KE_PAYLOAD, struct.pack("!H", DH_ID))
                )
            ]
        dh: DhPrivate = group(DH_ID).generate(self._rand)
        g_ir = dh.shared(ke.data)  # InvalidKeyExchange -> dropped
        spi_r = _nonzero(self._rand, 8, 1)
        nr = self._rand(_NONCE_LEN)
        payloads: list[Payload] = [SA((chosen,)), KE(DH_ID, dh.public_bytes()), Nonce(nr)]
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
        resp = encode_message(
            Message(msg.spi_i, spi_r, ExchangeType.IKE_SA_INIT, 0, tuple(payloads), response=True)
        )
        seed = skeyseed(PRF_ID, nonce.data, nr, g_ir)
        keys = derive_ike_keys(
            PRF_ID,
            seed,
            nonce.data,
            nr,
            msg.spi_i,
            spi_r,
            encr_key_len=_ENCR_KEY_LEN,
            integ_key_len=0,
        )
        self._keys = keys
        self._in = SkCipher(ENCR_ID, keys.sk_ei, key_bits=ENCR_KEY_BITS)
        self._out = SkCipher(ENCR_ID, keys.sk_er, key_bits=ENCR_KEY_BITS)
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
        assert self._keys is not None
        peer = Identity(idi.id_type, idi.data)
        if self._remote_id is not None and not self._remote_id.matches(peer):
            return f"initiator identity {peer} is not the configured {self._remote_id}"
        idr_req = _first(msg.payloads, IDr)
        if isinstance(idr_req, IDr) and not self._local_id.matches(
            Identity(idr_req.id_type, idr_req.data)
        ):
            wanted = Identity(idr_req.id_type, idr_req.data)
            return f"initiator asked for responder identity {wanted}, we are {self._local_id}"
        octets = signed_octets(PRF_ID, self._msg1, self._nr, self._keys.sk_pi, idi.encode_body())
        certs = tuple(p for p in msg.payloads if isinstance(p, Cert))
        try:
            self._peer_auth.verify(auth, octets, PRF_ID, peer, certs, now)
        except AuthFailure as e:
            return str(e)
        return None

    def _on_auth(self, raw: bytes, now: float) -> list[bytes]:
        assert self._keys is not None and self._in is not None
        # SkError / IkeDecodeError -> dropped (§2.21.2); SKF fragments only if negotiated
        if self._fragment:
            whole = self._reassembler.add(raw, self._in)
            if whole is None:
                return []  # more fragments to come
            msg = whole
        else:
            msg = decrypt_message(raw, self._in)
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
        octets = signed_octets(PRF_ID, self._msg2, self._ni, self._keys.sk_pr, my_id.encode_body())
        my_auth = self._local_auth.auth_payload(octets, PRF_ID, self._peer_hashes)
        my_certs = self._local_auth.cert_payloads()
        sa = _first(msg.payloads, SA)
        tsi = _first(msg.payloads, TSi)
        tsr = _first(msg.payloads, TSr)
        if not isinstance(sa, SA) or not isinstance(tsi, TSi) or not isinstance(tsr, TSr):
            self._fail("no Child SA requested (SA, TSi or TSr missing)")
            out = self._encrypted(ExchangeType.IKE_AUTH, 1, (my_id, *my_certs, my_auth))
            return self._answer(ExchangeType.IKE_AUTH, 1, out)
        self._child_spi = _nonzero(self._rand, 4, 256)  # RFC 4303 §2.1: 1..255 reserved
        picked = choose_esp_proposal(sa.proposals, self._child_spi)
        error: int | None = None
        ts_i = narrow(tsi.selectors, (_ipv4(cfg.ts_remote[0]), _ipv4(cfg.ts_remote[1])))
        ts_r = narrow(tsr.selectors, (_ipv4(cfg.ts_local[0]), _ipv4(cfg.ts_local[1])))
        if picked is None:
            error = NotifyType.NO_PROPOSAL_CHOSEN
        elif not ts_i or not ts_r:
            error = NotifyType.TS_UNACCEPTABLE
        if error is not None or picked is None:
            error = error or NotifyType.NO_PROPOSAL_CHOSEN
            self._fail(NotifyType(error).name)
            out = self._encrypted(
                ExchangeType.IKE_AUTH, 1, (my_id, *my_certs, my_auth, Notify(error))
            )
            return self._answer(ExchangeType.IKE_AUTH, 1, out)
        ck = child_keys(
            PRF_ID,
            self._keys.sk_d,
            self._ni,
            self._nr,
            encr_key_len=_ENCR_KEY_LEN,
            integ_key_len=0,
        )
        offered, chosen = picked
        child = ChildSaResult(
            spi_in=self._child_spi,
            spi_out=offered.spi,
            encr_id=ENCR_ID,
            key_bits=ENCR_KEY_BITS,
            esn=False,
            keys=ck,
            ts_i=ts_i,
            ts_r=ts_r,
        )
        out = self._encrypted(
            ExchangeType.IKE_AUTH,
            1,
            (my_id, *my_certs, my_auth, SA((chosen,)), TSi(ts_i), TSr(ts_r)),
        )
        self.result = IkeSaResult(self._spi_i, self._spi_r, self._keys, child, self.nat_t)
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
        )
        self._state = ResponderState.ESTABLISHED
        return self._answer(ExchangeType.IKE_AUTH, 1, out)
