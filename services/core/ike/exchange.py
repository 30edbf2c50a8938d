"""A minimal sans-IO IKEv2 initiator: RFC 7296 §1.2 (IKE_SA_INIT + IKE_AUTH), §2.14, §2.15, §2.17.

Scope: one IKE SA and its first Child SA, authenticated through the
:mod:`services.core.ike.authn` seam (pre-shared key or certificates; identities of any §3.5
type) and one IPv4 traffic selector per side. The IKE proposal is fixed to
ENCR_AES_GCM_16 with a 256-bit key, PRF_HMAC_SHA2_256 and Curve25519 (group 31); the ESP
proposal to AES-GCM-16 256 without ESN. The initiator sends NAT_DETECTION_SOURCE_IP /
NAT_DETECTION_DESTINATION_IP (§2.23, SHA-1 of SPIi | SPIr | IP | port); when the responder
answers with NAT-D notifies it moves to UDP 4500 for IKE_AUTH (``port_float``): the I/O shell
then sends the IKE_AUTH datagrams from and to port 4500 with the 4-octet non-ESP marker
(RFC 3948 §2.2) and strips it on receipt.

IKE fragmentation (RFC 7383): IKEV2_FRAGMENTATION_SUPPORTED is announced in IKE_SA_INIT unless
``fragment_size`` is 0; when the responder announced it too, IKE_AUTH goes out as SKF fragments
if it does not fit ``fragment_size`` octets of IP packet (all of them retransmitted together)
and a fragmented response is reassembled (:class:`~services.core.ike.sk.FragmentReassembler`).

Out of scope: COOKIE and INVALID_KE_PAYLOAD retries, EAP, CREATE_CHILD_SA started by us.
An error Notify from the responder (NO_PROPOSAL_CHOSEN, AUTHENTICATION_FAILED, ...) ends in
:attr:`State.FAILED` with the Notify's name as ``failure_reason``. Time comes in as ``now``
(seconds, any monotonic origin); randomness from ``rand`` (``secrets.token_bytes`` by
default). No key appears in any repr.

After ESTABLISHED, INFORMATIONAL exchanges (liveness, Delete of the Child SA or of the IKE SA ->
:attr:`State.CLOSED`, our own ``delete_ike``) and the peer's CREATE_CHILD_SA (Child SA rekey)
are handled by :mod:`services.core.ike.informational`; ``take_events`` reports what they did.
"""

from __future__ import annotations

import hashlib
import ipaddress
import secrets
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from services.core.ike.authn import (
    AuthFailure,
    Identity,
    LocalAuth,
    PeerAuth,
    PskAuth,
    hash_algorithms_notify,
    peer_hash_algorithms,
    signed_octets,
)
from services.core.ike.child import ENCR_ID, ENCR_KEY_BITS, esp_proposal
from services.core.ike.constants import (
    ExchangeType,
    NotifyType,
    ProtocolId,
    TransformType,
)
from services.core.ike.dh import DhGroupId, DhPrivate, InvalidKeyExchange, group
from services.core.ike.informational import InfoDrop, InfoEvent, InfoSession
from services.core.ike.keys import ChildKeys, IkeKeys, child_keys, derive_ike_keys, skeyseed
from services.core.ike.message import (
    KE,
    SA,
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
    TrafficSelector,
    Transform,
    TransformAttribute,
    TSi,
    TSr,
    decode_message,
    encode_message,
)
from services.core.ike.prf import Prf
from services.core.ike.sk import (
    FragmentReassembler,
    SkCipher,
    SkError,
    decrypt_message,
    encrypt_message,
)

Rand = Callable[[int], bytes]

NONCE_LEN = 32  # RFC 7296 §2.10: at least half the PRF key size, 16..256 octets
NAT_T_PORT = 4500  # RFC 3948
NON_ESP_MARKER = b"\x00\x00\x00\x00"  # RFC 3948 §2.2
GCM_SALT_LEN = 4  # RFC 5282 §7.1 (IKE), RFC 4106 §8.1 (ESP)
PRF_ID = Prf.HMAC_SHA2_256
DH_ID = DhGroupId.CURVE25519
RETRANSMIT_INITIAL = 1.0  # seconds; doubled per retry (RFC 7296 §2.1 leaves the policy open)
RETRANSMIT_TRIES = 5
_ERROR_NOTIFY_MAX = 16383  # RFC 7296 §3.10.1: types below 16384 are errors
FRAGMENT_SIZE = 1280  # RFC 7383 §2.5.1: largest IP packet of a fragment (strongSwan's default)
_UDP_HEADER = 8


def fragment_limit(fragment_size: int, remote_addr: str, nat_t: bool) -> int | None:
    """RFC 7383 §2.5.1: the largest IKE message (header included) fitting ``fragment_size``
    octets of IP packet to ``remote_addr`` (IPv4 or IPv6 header, UDP header and, on UDP 4500,
    the non-ESP marker subtracted); None when fragmentation is disabled (size 0)."""
    if fragment_size <= 0:
        return None
    ip_header = 40 if ipaddress.ip_address(remote_addr).version == 6 else 20
    return fragment_size - ip_header - _UDP_HEADER - (len(NON_ESP_MARKER) if nat_t else 0)


def fragmentation_notify(fragment_size: int) -> tuple[Notify, ...]:
    """IKEV2_FRAGMENTATION_SUPPORTED (RFC 7383 §2.3) unless fragmentation is disabled."""
    return (Notify(NotifyType.IKEV2_FRAGMENTATION_SUPPORTED),) if fragment_size > 0 else ()


def peer_supports_fragmentation(payloads: tuple[Payload, ...]) -> bool:
    return any(
        isinstance(p, Notify) and p.notify_type == NotifyType.IKEV2_FRAGMENTATION_SUPPORTED
        for p in payloads
    )


class State(Enum):
    INITIAL = "initial"
    SA_INIT_SENT = "sa_init_sent"
    AUTH_SENT = "auth_sent"
    ESTABLISHED = "established"
    FAILED = "failed"
    CLOSED = "closed"


def _ipv4(text: str) -> bytes:
    return ipaddress.IPv4Address(text).packed


ANY_ID = "%any"  # configured remote identity: accept whatever the authenticated peer claims


def identity_of(value: str | Identity | None, default_addr: str | None) -> Identity | None:
    """A configured identity: an :class:`Identity`, its text form, ``"%any"`` (None: any
    identity) or None (then the address ``default_addr`` as ID_IPV4/IPV6_ADDR, if given)."""
    if isinstance(value, Identity):
        return value
    if value is None:
        if default_addr is None:
            return None
        return Identity.address(ipaddress.ip_address(default_addr).packed)
    if value.strip() == ANY_ID:
        return None
    return Identity.parse(value)


def credentials(
    psk: bytes | None, local_auth: LocalAuth | None, peer_auth: PeerAuth | None
) -> tuple[LocalAuth, PeerAuth]:
    """Our authentication and the peer's: explicit objects, else the PSK for both directions."""
    if psk is not None and not psk:
        raise ValueError("empty pre-shared key")
    shared = PskAuth(psk) if psk else None
    mine = local_auth or shared
    theirs = peer_auth or shared
    if mine is None or theirs is None:
        raise ValueError("no authentication configured (a pre-shared key or certificates)")
    return mine, theirs


@dataclass(frozen=True, kw_only=True)
class InitiatorConfig:
    """What the initiator proposes. Addresses are IPv4 dotted quads; secrets are never in repr.

    Authentication: ``psk`` (both directions) or ``local_auth`` / ``peer_auth`` objects of the
    :mod:`services.core.ike.authn` seam (e.g. certificates). ``local_id`` defaults to the local
    address (ID_IPV4_ADDR); ``remote_id`` to the remote address, and ``"%any"`` sends no IDr and
    accepts whichever identity the peer proves. Identities are :class:`Identity` or its text
    form. ``ts_local`` and ``ts_remote`` are inclusive (start, end) IPv4 ranges: TSi and TSr, all
    protocols and ports. ``local_port`` / ``remote_port`` are the IKE_SA_INIT ports the NAT-D
    hashes cover. ``fragment_size`` is the largest IP packet of an RFC 7383 fragment of our
    encrypted messages when both sides announced IKEV2_FRAGMENTATION_SUPPORTED (0: we do not
    announce it and never fragment).
    """

    local_addr: str
    remote_addr: str
    ts_local: tuple[str, str]
    ts_remote: tuple[str, str]
    psk: bytes | None = field(default=None, repr=False)
    local_auth: LocalAuth | None = field(default=None, repr=False)
    peer_auth: PeerAuth | None = field(default=None, repr=False)
    local_id: str | Identity | None = None
    remote_id: str | Identity | None = None
    local_port: int = 500
    remote_port: int = 500
    fragment_size: int = FRAGMENT_SIZE

    def __post_init__(self) -> None:
        if self.fragment_size and self.fragment_size < 576:
            raise ValueError("fragment_size must be 0 or at least 576")  # RFC 7383 §2.5.1
        for a in (self.local_addr, self.remote_addr, *self.ts_local, *self.ts_remote):
            _ipv4(a)
        identity_of(self.local_id, self.local_addr)
        identity_of(self.remote_id, self.remote_addr)
        credentials(self.psk, self.local_auth, self.peer_auth)


@dataclass(frozen=True)
class ChildSaResult:
    """The first Child SA (ESP, tunnel mode). ``spi_in`` is ours (the responder sends to it),
    ``spi_out`` the responder's. ``keys.encr_i`` protects initiator→responder traffic, i.e. it
    goes with ``spi_out``; each encryption key is 32 octets of AES key then 4 of salt."""

    spi_in: bytes
    spi_out: bytes
    encr_id: int
    key_bits: int
    esn: bool
    keys: ChildKeys = field(repr=False)
    ts_i: tuple[TrafficSelector, ...]
    ts_r: tuple[TrafficSelector, ...]


@dataclass(frozen=True)
class IkeSaResult:
    spi_i: bytes
    spi_r: bytes
    keys: IkeKeys = field(repr=False)
    child: ChildSaResult
    nat_t: bool  # IKE moved to UDP 4500


def nat_detection_hash(spi_i: bytes, spi_r: bytes, addr: bytes, port: int) -> bytes:
    """RFC 7296 §2.23: SHA-1(SPIi | SPIr | IP address | port); SPIr is zero in the request."""
    return hashlib.sha1(spi_i + spi_r + addr + struct.pack("!H", port)).digest()  # noqa: S324


def _nonzero(rand: Rand, n: int, minimum: int) -> bytes:
    while True:
        b = rand(n)
        if len(b) != n:
            raise ValueError("rand returned the wrong number of octets")
        if int.from_bytes(b, "big") >= minimum:
            return b


def _notify_name(t: int) -> str:
    try:
        return NotifyType(t).name
    except ValueError:
        return f"error notify {t}"


def ike_proposal(spi: bytes = b"") -> Proposal:
    return Proposal(
        1,
        ProtocolId.IKE,
        (
            Transform(TransformType.ENCR, ENCR_ID, (TransformAttribute.key_length(ENCR_KEY_BITS),)),
            Transform(TransformType.PRF, PRF_ID),
            Transform(TransformType.DH, DH_ID),
        ),
        spi,
    )


def _transform_set(p: Proposal) -> set[tuple[int, int, int | None]]:
    return {(t.transform_type, t.transform_id, t.key_length) for t in p.transforms}


def _first(payloads: tuple[Payload, ...], cls: type[Payload]) -> Payload | None:
    for p in payloads:
        if isinstance(p, cls):
            return p
    return None


class IkeFailure(Exception):
    """Internal: ends the exchange with a readable reason."""


class Ikev2Initiator:
    """IKE_SA_INIT then IKE_AUTH with PSK, as a state machine fed with datagrams.

    ``start(now)`` and ``receive(data, now)`` return the datagrams (IKE messages, no non-ESP
    marker) to send; after ``port_float`` turns true they go to UDP 4500. ``on_timer(now)``
    retransmits the outstanding request (or fails after RETRANSMIT_TRIES sends).
    """

    def __init__(
        self, config: InitiatorConfig, *, now: float, rand: Rand = secrets.token_bytes
    ) -> None:
        self.config = config
        self._rand = rand
        self._state = State.INITIAL
        self.failure_reason: str | None = None
        self.result: IkeSaResult | None = None
        self.port_float = False
        self._spi_i = _nonzero(rand, 8, 1)
        self._spi_r = bytes(8)
        self._ni = rand(NONCE_LEN)
        self._nr = b""
        self._dh: DhPrivate = group(DH_ID).generate(rand)
        self._child_spi = _nonzero(rand, 4, 256)  # SPIs 1..255 are reserved (RFC 4303 §2.1)
        self._msg1 = b""
        self._msg2 = b""
        self._keys: IkeKeys | None = None
        self._out: SkCipher | None = None
        self._in: SkCipher | None = None
        self._pending: list[bytes] = []
        self._expect_mid = 0
        self._sent_at = now
        self._interval = RETRANSMIT_INITIAL
        self._tries = 0
        self._info: InfoSession | None = None
        self._local_id = identity_of(config.local_id, config.local_addr)
        self._remote_id = identity_of(config.remote_id, config.remote_addr)
        self._local_auth, self._peer_auth = credentials(
            config.psk, config.local_auth, config.peer_auth
        )
        self._peer_hashes: frozenset[int] = frozenset()
        self._fragment = False  # both sides announced RFC 7383 fragmentation
        self._reassembler = FragmentReassembler()

    def __repr__(self) -> str:
        return f"Ikev2Initiator(state={self._state.value}, spi_i={self._spi_i.hex()})"

    @property
    def state(self) -> State:
        return self._state

    @property
    def spi_i(self) -> bytes:
        return self._spi_i

    @property
    def next_timeout(self) -> float | None:
        """When on_timer should next be called, or None when nothing is outstanding."""
        if self._state not in (State.SA_INIT_SENT, State.AUTH_SENT):
            return None
        return self._sent_at + self._interval

    def take_events(self) -> list[InfoEvent]:
        """Events of INFORMATIONAL exchanges since the last call (child / IKE SA deleted)."""
        return self._info.take_events() if self._info is not None else []

    def delete_ike(self, now: float) -> list[bytes]:
        """An INFORMATIONAL Delete of the IKE SA (RFC 7296 §1.4.1); its response -> CLOSED."""
        if self._state is not State.ESTABLISHED or self._info is None:
            return []
        return self._info.delete_ike()

    # -- driving ----------------------------------------------------------------------------

    def start(self, now: float) -> list[bytes]:
        if self._state is not State.INITIAL:
            raise RuntimeError("start() called twice")
        cfg = self.config
        payloads: tuple[Payload, ...] = (
            SA((ike_proposal(),)),
            KE(DH_ID, self._dh.public_bytes()),
            Nonce(self._ni),
            Notify(
                NotifyType.NAT_DETECTION_SOURCE_IP,
                nat_detection_hash(self._spi_i, bytes(8), _ipv4(cfg.local_addr), cfg.local_port),
            ),
            Notify(
                NotifyType.NAT_DETECTION_DESTINATION_IP,
                nat_detection_hash(self._spi_i, bytes(8), _ipv4(cfg.remote_addr), cfg.remote_port),
            ),
            *hash_algorithms_notify(self._peer_auth.hash_algorithms()),
            *fragmentation_notify(cfg.fragment_size),
        )
        msg = Message(self._spi_i, bytes(8), ExchangeType.IKE_SA_INIT, 0, payloads, initiator=True)
        self._msg1 = encode_message(msg)
        self._state = State.SA_INIT_SENT
        return self._send([self._msg1], now)

    def on_timer(self, now: float) -> list[bytes]:
        deadline = self.next_timeout
        if deadline is None or now < deadline:
            return []
        if self._tries >= RETRANSMIT_TRIES:
            self._fail(f"no response after {self._tries} transmissions")
            return []
        self._interval *= 2
        self._tries += 1
        self._sent_at = now
        return list(self._pending)

    def receive(self, data: bytes, now: float) -> list[bytes]:
        """Process one received IKE message; malformed or unrelated datagrams are dropped."""
        if self._state is State.ESTABLISHED and self._info is not None:
            try:
                out = self._info.handle(bytes(data))
            except (InfoDrop, IkeDecodeError, SkError, ValueError):
                return []  # ValueError: a bad KE in a CREATE_CHILD_SA request, too
            if self._info.closed:
                self._state = State.CLOSED
            return out
        if self._state not in (State.SA_INIT_SENT, State.AUTH_SENT):
            return []
        try:
            msg = decode_message(data)
        except IkeDecodeError:
            return []
        if (
            msg.spi_i != self._spi_i
            or not msg.response
            or msg.initiator
            or msg.message_id != self._expect_mid
        ):
            return []
        try:
            if self._state is State.SA_INIT_SENT:
                if msg.exchange_type != ExchangeType.IKE_SA_INIT:
                    return []
                return self._on_sa_init(msg, bytes(data), now)
            if msg.exchange_type != ExchangeType.IKE_AUTH or msg.spi_r != self._spi_r:
                return []
            return self._on_auth(bytes(data), now)
        except IkeFailure as e:
            self._fail(str(e))
            return []

    # -- internals --------------------------------------------------------------------------

    def _fail(self, reason: str) -> None:
        self._state = State.FAILED
        self.failure_reason = reason
        self._pending = []

    def _send(self, datagrams: list[bytes], now: float) -> list[bytes]:
        self._pending = list(datagrams)
        self._sent_at = now
        self._interval = RETRANSMIT_INITIAL
        self._tries = 1
        return list(datagrams)

    @staticmethod
    def _check_errors(payloads: tuple[Payload, ...]) -> None:
        for p in payloads:
            if isinstance(p, Notify) and p.notify_type <= _ERROR_NOTIFY_MAX:
                raise IkeFailure(_notify_name(p.notify_type))

    def _on_sa_init(self, msg: Message, raw: bytes, now: float) -> list[bytes]:
        self._check_errors(msg.payloads)
        if any(isinstance(p, Notify) and p.notify_type == NotifyType.COOKIE for p in msg.payloads):
            raise IkeFailure("responder asked for a COOKIE (not supported)")
        sa = _first(msg.payloads, SA)
        ke = _first(msg.payloads, KE)
        nonce = _first(msg.payloads, Nonce)
        if not isinstance(sa, SA) or not isinstance(ke, KE) or not isinstance(nonce, Nonce):
            raise IkeFailure("IKE_SA_INIT response lacks SA, KE or Nonce")
        if msg.spi_r == bytes(8):
            raise IkeFailure("IKE_SA_INIT response with a zero responder SPI")
        if len(sa.proposals) != 1:
            raise IkeFailure("responder chose more than one IKE proposal")
        chosen = sa.proposals[0]
        if chosen.protocol_id != ProtocolId.IKE or _transform_set(chosen) != _transform_set(
            ike_proposal()
        ):
            raise IkeFailure("responder chose an IKE proposal we did not offer")
        if ke.dh_group != DH_ID:
            raise IkeFailure(f"responder KE in group {ke.dh_group}, not {int(DH_ID)}")
        if not 16 <= len(nonce.data) <= 256:
            raise IkeFailure("responder nonce not 16..256 octets")
        try:
            g_ir = self._dh.shared(ke.data)
        except InvalidKeyExchange as e:
            raise IkeFailure(f"invalid KE from responder: {e}") from None
        self._spi_r = msg.spi_r
        self._nr = nonce.data
        self._peer_hashes = peer_hash_algorithms(msg.payloads)
        self._fragment = self.config.fragment_size > 0 and peer_supports_fragmentation(msg.payloads)
        self._msg2 = raw
        seed = skeyseed(PRF_ID, self._ni, self._nr, g_ir)
        self._keys = derive_ike_keys(
            PRF_ID,
            seed,
            self._ni,
            self._nr,
            self._spi_i,
            self._spi_r,
            encr_key_len=ENCR_KEY_BITS // 8 + GCM_SALT_LEN,
            integ_key_len=0,
        )
        self._out = SkCipher(ENCR_ID, self._keys.sk_ei, key_bits=ENCR_KEY_BITS)
        self._in = SkCipher(ENCR_ID, self._keys.sk_er, key_bits=ENCR_KEY_BITS)
        self.port_float = any(
            isinstance(p, Notify)
            and p.notify_type
            in (NotifyType.NAT_DETECTION_SOURCE_IP, NotifyType.NAT_DETECTION_DESTINATION_IP)
            for p in msg.payloads
        )
        return self._send_auth(now)

    def _send_auth(self, now: float) -> list[bytes]:
        assert self._keys is not None and self._out is not None
        cfg = self.config
        assert self._local_id is not None  # identity_of with an address never gives None
        idi = IDi(self._local_id.id_type, self._local_id.data)
        octets = signed_octets(PRF_ID, self._msg1, self._nr, self._keys.sk_pi, idi.encode_body())
        auth = self._local_auth.auth_payload(octets, PRF_ID, self._peer_hashes)
        idr: tuple[Payload, ...] = ()
        if self._remote_id is not None:
            idr = (IDr(self._remote_id.id_type, self._remote_id.data),)
        inner: tuple[Payload, ...] = (
            idi,
            *self._local_auth.cert_payloads(),
            *self._peer_auth.cert_requests(),
            *idr,
            auth,
            SA((esp_proposal(self._child_spi),)),
            TSi((_selector(cfg.ts_local),)),
            TSr((_selector(cfg.ts_remote),)),
        )
        msg = Message(self._spi_i, self._spi_r, ExchangeType.IKE_AUTH, 1, inner, initiator=True)
        limit = None
        if self._fragment:
            limit = fragment_limit(cfg.fragment_size, cfg.remote_addr, self.port_float)
        datagrams = encrypt_message(msg, self._out, fragment_size=limit)
        self._expect_mid = 1
        self._state = State.AUTH_SENT
        return self._send(datagrams, now)

    def _reject(self, reason: str) -> list[bytes]:
        """The responder did not authenticate: fail, and tell it so in an INFORMATIONAL request
        carrying AUTHENTICATION_FAILED (RFC 7296 §2.21.2; sent once, no response awaited)."""
        assert self._out is not None
        note = (Notify(NotifyType.AUTHENTICATION_FAILED),)
        msg = Message(self._spi_i, self._spi_r, ExchangeType.INFORMATIONAL, 2, note, initiator=True)
        out = encrypt_message(msg, self._out)
        self._fail(reason)
        return out

    def _on_auth(self, raw: bytes, now: float) -> list[bytes]:
        assert self._keys is not None and self._in is not None
        try:
            # an SK message, or RFC 7383 fragments (SKF) reassembled once all are in
            if self._fragment:
                whole = self._reassembler.add(raw, self._in)
            else:
                whole = decrypt_message(raw, self._in)
        except SkError:
            return []  # RFC 7296 §2.21.2: a message that fails integrity is dropped
        except IkeDecodeError:
            return []
        if whole is None:
            return []  # more fragments to come
        msg = whole
        self._pending = []
        self._check_errors(msg.payloads)
        idr = _first(msg.payloads, IDr)
        auth = _first(msg.payloads, Auth)
        if not isinstance(idr, IDr) or not isinstance(auth, Auth):
            raise IkeFailure("IKE_AUTH response lacks IDr or AUTH")
        peer = Identity(idr.id_type, idr.data)
        if self._remote_id is not None and not self._remote_id.matches(peer):
            return self._reject(
                f"responder identity {peer} differs from the configured {self._remote_id}"
            )
        octets = signed_octets(PRF_ID, self._msg2, self._ni, self._keys.sk_pr, idr.encode_body())
        certs = tuple(p for p in msg.payloads if isinstance(p, Cert))
        try:
            self._peer_auth.verify(auth, octets, PRF_ID, peer, certs, now)
        except AuthFailure as e:
            return self._reject(f"responder not authenticated: {e}")
        sa = _first(msg.payloads, SA)
        tsi = _first(msg.payloads, TSi)
        tsr = _first(msg.payloads, TSr)
        if not isinstance(sa, SA) or not isinstance(tsi, TSi) or not isinstance(tsr, TSr):
            raise IkeFailure("IKE_AUTH response lacks SA, TSi or TSr (no Child SA)")
        if len(sa.proposals) != 1:
            raise IkeFailure("responder chose more than one ESP proposal")
        chosen = sa.proposals[0]
        if (
            chosen.protocol_id != ProtocolId.ESP
            or len(chosen.spi) != 4
            or _transform_set(chosen) != _transform_set(esp_proposal(self._child_spi))
        ):
            raise IkeFailure("responder chose an ESP proposal we did not offer")
        ck = child_keys(
            PRF_ID,
            self._keys.sk_d,
            self._ni,
            self._nr,
            encr_key_len=ENCR_KEY_BITS // 8 + GCM_SALT_LEN,
            integ_key_len=0,
        )
        child = ChildSaResult(
            spi_in=self._child_spi,
            spi_out=chosen.spi,
            encr_id=ENCR_ID,
            key_bits=ENCR_KEY_BITS,
            esn=False,
            keys=ck,
            ts_i=tuple(s for s in tsi.selectors if isinstance(s, TrafficSelector)),
            ts_r=tuple(s for s in tsr.selectors if isinstance(s, TrafficSelector)),
        )
        self.result = IkeSaResult(self._spi_i, self._spi_r, self._keys, child, self.port_float)
        assert self._out is not None
        self._info = InfoSession(
            spi_i=self._spi_i,
            spi_r=self._spi_r,
            we_initiated=True,
            cin=self._in,
            cout=self._out,
            child=(child.spi_in, child.spi_out),
            our_next_mid=2,
            peer_next_mid=0,
            sk_d=self._keys.sk_d,
            peer_ts=child.ts_r,
            our_ts=child.ts_i,
            rand=self._rand,
        )
        self._state = State.ESTABLISHED
        return []


def _selector(rng: tuple[str, str]) -> TrafficSelector:
    return TrafficSelector(0, 0, 65535, _ipv4(rng[0]), _ipv4(rng[1]))
