"""A minimal sans-IO IKEv2 initiator: RFC 7296 §1.2 (IKE_SA_INIT + IKE_AUTH), §2.14, §2.15, §2.17.

Scope: one IKE SA and its first Child SA, authenticated through the
:mod:`services.core.ike.authn` seam (pre-shared key or certificates; identities of any §3.5
type) and one IPv4 or IPv6 traffic selector per side (TS_IPV4_ADDR_RANGE /
TS_IPV6_ADDR_RANGE, §3.13.1). The IKE and ESP proposals are built from the configured suites
(:mod:`services.core.ike.suites`, one proposal per suite; default ENCR_AES_GCM_16-256 /
PRF_HMAC_SHA2_256 / Curve25519 and ESP AES-GCM-16-256 without ESN); the KE payload is in the
first IKE suite's group. An INVALID_KE_PAYLOAD answer naming another group of our suites is
retried with that group (§1.3, at most MAX_KE_RETRIES times) and a COOKIE answer by resending
IKE_SA_INIT with the COOKIE notify first (§2.6, at most MAX_COOKIE_RETRIES times). With
``mode`` TRANSPORT the IKE_AUTH request carries USE_TRANSPORT_MODE (§1.3.1); a responder that
declines it (answers without the notify) would give a tunnel-mode SA, which the RFC says the
initiator must then delete: we fail the exchange instead of installing it. The initiator
sends NAT_DETECTION_SOURCE_IP /
NAT_DETECTION_DESTINATION_IP (§2.23, SHA-1 of SPIi | SPIr | IP | port); when the responder
answers with NAT-D notifies it moves to UDP 4500 for IKE_AUTH (``port_float``): the I/O shell
then sends the IKE_AUTH datagrams from and to port 4500 with the 4-octet non-ESP marker
(RFC 3948 §2.2) and strips it on receipt. ``nat_detected`` is true when the responder's NAT-D
hashes differ from the addresses and ports we used (a NAT on the path, or a peer that fakes
NAT-D to force UDP encapsulation).

The Child SA is ESP or AH, whichever protocol the configured Child SA suites have (RFC 7296
§3.3.1, §3.3.3; AH: integrity only, its keys cut from KEYMAT as §2.17 says with no encryption
key). AH authenticates the IP addresses and cannot cross NAT (RFC 3948 encapsulates ESP only):
an AH Child SA negotiated while NAT was detected is not used; the exchange fails with that
reason and our INFORMATIONAL Delete of the IKE SA tells the responder.

IKE fragmentation (RFC 7383): IKEV2_FRAGMENTATION_SUPPORTED is announced in IKE_SA_INIT unless
``fragment_size`` is 0; when the responder announced it too, IKE_AUTH goes out as SKF fragments
if it does not fit ``fragment_size`` octets of IP packet (all of them retransmitted together)
and a fragmented response is reassembled (:class:`~services.core.ike.sk.FragmentReassembler`).
After IKE_AUTH the same limit applies to our CREATE_CHILD_SA and INFORMATIONAL messages and
fragmented requests and responses are reassembled there too.

Out of scope: EAP. IKE_AUTH creates one Child SA; further ones are created afterwards with
CREATE_CHILD_SA (:meth:`~services.core.ike.informational.InfoSession.create_child`). An
error Notify from the responder (NO_PROPOSAL_CHOSEN, AUTHENTICATION_FAILED, ...) ends in
:attr:`State.FAILED` with the Notify's name as ``failure_reason``. An IKE_SA_INIT response is
unauthenticated and may be forged (§2.21.1: the recipient should not act on an error at once
unless the RFC defines a corrective action, as for COOKIE and INVALID_KE_PAYLOAD): one that
carries an error Notify or is otherwise unusable (bad KE, a proposal we did not offer, ...) is
remembered, and we keep waiting for a valid response until the retransmission timer of the
IKE_SA_INIT request fires; then the attempt fails with the remembered reason. Time comes in
as ``now`` (seconds, any monotonic origin); randomness from ``rand`` (``secrets.token_bytes`` by
default). No key appears in any repr.

After ESTABLISHED, INFORMATIONAL exchanges (liveness, Delete of the Child SA or of the IKE SA ->
:attr:`State.CLOSED`, our own ``delete_ike``) and the peer's CREATE_CHILD_SA (Child SA rekey)
are handled by :mod:`services.core.ike.informational`; ``take_events`` reports what they did.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import secrets
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum

from services.core.algorithms import AlgorithmError
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
from services.core.ike.constants import (
    ExchangeType,
    NotifyType,
    ProtocolId,
)
from services.core.ike.dh import DhPrivate, InvalidKeyExchange, group
from services.core.ike.informational import InfoDrop, InfoEvent, InfoSession
from services.core.ike.keys import ChildKeys, IkeKeys, child_keys, derive_ike_keys, skeyseed
from services.core.ike.message import (
    KE,
    SA,
    Auth,
    Cert,
    Delete,
    IDi,
    IDr,
    IkeDecodeError,
    Message,
    Nonce,
    Notify,
    Payload,
    Proposal,
    TrafficSelector,
    TSi,
    TSr,
    decode_message,
    encode_message,
)
from services.core.ike.prf import PrfLike
from services.core.ike.sk import (
    FragmentReassembler,
    SkCipher,
    SkError,
    decrypt_message,
    encrypt_message,
)
from services.core.ike.suites import (
    DEFAULT_ESP,
    DEFAULT_IKE,
    EspSuite,
    IkeSuite,
    esp_proposals,
    ike_proposals,
    match_esp,
    match_ike,
)
from services.core.sa import Mode

Rand = Callable[[int], bytes]

NONCE_LEN = 32  # RFC 7296 §2.10: at least half the PRF key size, 16..256 octets
NAT_T_PORT = 4500  # RFC 3948
NON_ESP_MARKER = b"\x00\x00\x00\x00"  # RFC 3948 §2.2
_NATD_SRC = NotifyType.NAT_DETECTION_SOURCE_IP
_NATD_DST = NotifyType.NAT_DETECTION_DESTINATION_IP
GCM_SALT_LEN = 4  # RFC 5282 §7.1 (IKE), RFC 4106 §8.1 (ESP)
PRF_ID = DEFAULT_IKE.prf  # the default suite's (kept for callers of the fixed-suite era)
DH_ID = DEFAULT_IKE.dh
MAX_KE_RETRIES = 2  # IKE_SA_INIT resent with another group after INVALID_KE_PAYLOAD (§1.3)
MAX_COOKIE_RETRIES = 2  # IKE_SA_INIT resent with a COOKIE (§2.6)
MAX_COOKIE_LEN = 64  # RFC 7296 §2.6: a cookie SHOULD be 1..64 octets
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
    ip_header = 40 if len(_ipv4(remote_addr)) == 16 else 20
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


@functools.lru_cache(maxsize=4096)
def _ipv4(text: str) -> bytes:
    """A textual IPv4 or IPv6 address, packed (4 or 16 octets); ValueError otherwise.
    Remembered: every message of every IKE SA names the same few configured addresses."""
    return ipaddress.ip_address(text).packed


def _check_range(rng: tuple[str, str], what: str) -> int:
    lo, hi = _ipv4(rng[0]), _ipv4(rng[1])
    if len(lo) != len(hi):
        raise ValueError(f"{what}: start and end are of different address families")
    if lo > hi:
        raise ValueError(f"{what}: traffic selector range start after end")
    return len(lo)


def check_suites(ike: tuple[IkeSuite, ...] | None, esp: tuple[EspSuite, ...]) -> None:
    if ike is not None and (not ike or not all(isinstance(s, IkeSuite) for s in ike)):
        raise ValueError("ike_suites must be a non-empty tuple of IkeSuite")
    if not esp or not all(isinstance(s, EspSuite) for s in esp):
        raise ValueError("esp_suites must be a non-empty tuple of EspSuite")
    if len({s.protocol for s in esp}) != 1:
        raise ValueError("esp_suites must be all ESP or all AH suites (no ESP+AH bundles)")


def child_protocol_name(suites: tuple[EspSuite, ...]) -> str:
    """``ESP`` or ``AH``: the protocol of a connection's Child SA suites (for reasons)."""
    return "AH" if suites and suites[0].ah else "ESP"


AH_NAT_REASON = (
    "NAT detected between the peers: an AH Child SA cannot cross NAT (AH authenticates the "
    "IP addresses, RFC 4302 §3.3.3; only ESP can be UDP-encapsulated, RFC 3948)"
)


def nat_detection(
    payloads: tuple[Payload, ...],
    spi_i: bytes,
    spi_r: bytes,
    source: tuple[bytes, int],
    destination: tuple[bytes, int],
) -> tuple[bool, bool]:
    """RFC 7296 §2.23: (any NAT between us, WE are behind it) from the peer's NAT-D notifies.

    ``source`` is the peer's address and port as we see them, ``destination`` ours. A NAT is
    detected when the peer's NAT_DETECTION_SOURCE_IP or _DESTINATION_IP hashes differ from
    them; we are behind it (and send NAT keepalives, RFC 3948 §2.3) when the DESTINATION hash
    differs. (False, False) when the peer sent no NAT-D notifies."""
    ours = nat_changed(payloads, _NATD_DST, spi_i, spi_r, *destination)
    theirs = nat_changed(payloads, _NATD_SRC, spi_i, spi_r, *source)
    return ours or theirs, ours


ANY_ID = "%any"  # configured remote identity: accept whatever the authenticated peer claims


def identity_of(value: str | Identity | None, default_addr: str | None) -> Identity | None:
    """A configured identity: an :class:`Identity`, its text form, ``"%any"`` (None: any
    identity) or None (then the address ``default_addr`` as ID_IPV4/IPV6_ADDR, if given)."""
    if isinstance(value, Identity):
        return value
    if value is None:
        if default_addr is None:
            return None
        return Identity.address(_ipv4(default_addr))
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
    """What the initiator proposes. Addresses are IPv4 or IPv6 (text); secrets are never in
    repr.

    Authentication: ``psk`` (both directions) or ``local_auth`` / ``peer_auth`` objects of the
    :mod:`services.core.ike.authn` seam (e.g. certificates). ``local_id`` defaults to the local
    address (ID_IPV4_ADDR); ``remote_id`` to the remote address, and ``"%any"`` sends no IDr and
    accepts whichever identity the peer proves. Identities are :class:`Identity` or its text
    form. ``ts_local`` and ``ts_remote`` are inclusive (start, end) address ranges (IPv4 or
    IPv6): TSi and TSr, all protocols and ports. ``local_port`` / ``remote_port`` are the
    IKE_SA_INIT ports the NAT-D hashes cover. ``ike_suites`` / ``esp_suites`` are what we
    propose, in order of preference; ``mode`` TRANSPORT asks for USE_TRANSPORT_MODE.
    ``fragment_size`` is the largest IP packet of an RFC 7383 fragment of our encrypted messages
    when both sides announced IKEV2_FRAGMENTATION_SUPPORTED (0: we do not announce it and never
    fragment).
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
    ike_suites: tuple[IkeSuite, ...] = (DEFAULT_IKE,)
    esp_suites: tuple[EspSuite, ...] = (DEFAULT_ESP,)
    mode: Mode = Mode.TUNNEL
    fragment_size: int = FRAGMENT_SIZE

    def __post_init__(self) -> None:
        if self.fragment_size and self.fragment_size < 576:
            raise ValueError("fragment_size must be 0 or at least 576")  # RFC 7383 §2.5.1
        if len(_ipv4(self.local_addr)) != len(_ipv4(self.remote_addr)):
            raise ValueError("local_addr and remote_addr are of different address families")
        _check_range(self.ts_local, "ts_local")
        _check_range(self.ts_remote, "ts_remote")
        check_suites(self.ike_suites, self.esp_suites)
        if self.mode not in (Mode.TUNNEL, Mode.TRANSPORT):
            raise ValueError("mode must be Mode.TUNNEL or Mode.TRANSPORT")
        identity_of(self.local_id, self.local_addr)
        identity_of(self.remote_id, self.remote_addr)
        credentials(self.psk, self.local_auth, self.peer_auth)


@dataclass(frozen=True)
class ChildSaResult:
    """A Child SA (ESP or AH: ``protocol``, RFC 7296 §3.3.1). ``spi_in`` is ours (the peer sends
    to it), ``spi_out`` the peer's.
    ``keys.encr_i`` / ``keys.integ_i`` protect initiator→responder traffic, i.e. as initiator
    they go with ``spi_out``; encryption keys carry the cipher's salt last (AES-GCM and
    ChaCha20-Poly1305: 4 octets). ``encr_id`` / ``key_bits`` / ``integ_id`` (0 for combined
    mode) / ``esn`` are the negotiated ESP transforms, ``dh`` the PFS group (0: none) and
    ``mode`` tunnel or transport (USE_TRANSPORT_MODE, RFC 7296 §1.3.1). An AH Child SA has
    ``encr_id`` and ``key_bits`` 0 and empty encryption keys; ``integ_id`` is its algorithm."""

    spi_in: bytes
    spi_out: bytes
    encr_id: int
    key_bits: int
    esn: bool
    keys: ChildKeys = field(repr=False)
    ts_i: tuple[TrafficSelector, ...]
    ts_r: tuple[TrafficSelector, ...]
    integ_id: int = 0
    mode: Mode = Mode.TUNNEL
    dh: int = 0
    protocol: int = ProtocolId.ESP

    @property
    def ah(self) -> bool:
        return self.protocol == ProtocolId.AH

    @property
    def suite_name(self) -> str:
        """The negotiated ESP or AH suite in proposal-string form (for logs)."""
        return EspSuite(
            self.encr_id,
            self.key_bits,
            self.integ_id,
            self.esn,
            self.dh,
            allow_legacy=True,
            protocol=self.protocol,
        ).name


@dataclass(frozen=True)
class IkeSaResult:
    spi_i: bytes
    spi_r: bytes
    keys: IkeKeys = field(repr=False)
    child: ChildSaResult
    nat_t: bool  # IKE moved to UDP 4500
    suite: IkeSuite = DEFAULT_IKE  # the negotiated IKE suite
    nat_detected: bool = False  # the NAT-D hashes did not match (RFC 7296 §2.23)
    # NAT-D (RFC 7296 §2.23): the peer saw our address or port changed, i.e. WE are behind a
    # NAT (and should send NAT keepalives, RFC 3948 §2.3); False when only the peer is
    local_behind_nat: bool = False


def nat_detection_hash(spi_i: bytes, spi_r: bytes, addr: bytes, port: int) -> bytes:
    """RFC 7296 §2.23: SHA-1(SPIi | SPIr | IP address | port); SPIr is zero in the request."""
    return hashlib.sha1(spi_i + spi_r + addr + struct.pack("!H", port)).digest()  # noqa: S324


def nat_changed(
    payloads: Iterable[Payload],
    notify_type: int,
    spi_i: bytes,
    spi_r: bytes,
    addr: bytes,
    port: int,
) -> bool:
    """RFC 7296 §2.23: the NAT-D notifies of ``notify_type`` are there and none of them is the
    hash of (``addr``, ``port``): a NAT rewrote that address or port on the way."""
    hashes = [p.data for p in payloads if isinstance(p, Notify) and p.notify_type == notify_type]
    return bool(hashes) and nat_detection_hash(spi_i, spi_r, addr, port) not in hashes


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
    """The default IKE suite as proposal 1."""
    p = DEFAULT_IKE.proposal(1)
    return Proposal(p.number, p.protocol_id, p.transforms, spi)


def sk_ciphers(suite: IkeSuite, keys: IkeKeys, *, initiator: bool) -> tuple[SkCipher, SkCipher]:
    """(inbound, outbound) SK protection of an IKE SA for one role (RFC 7296 §2.14)."""
    i = SkCipher(
        suite.encr,
        keys.sk_ei,
        suite.integ,
        keys.sk_ai,
        key_bits=suite.key_bits,
        allow_legacy=suite.allow_legacy,
    )
    r = SkCipher(
        suite.encr,
        keys.sk_er,
        suite.integ,
        keys.sk_ar,
        key_bits=suite.key_bits,
        allow_legacy=suite.allow_legacy,
    )
    return (r, i) if initiator else (i, r)


def ike_keys(
    suite: IkeSuite, ni: bytes, nr: bytes, g_ir: bytes, spi_i: bytes, spi_r: bytes
) -> IkeKeys:
    """SKEYSEED and the seven SK_* keys for ``suite`` (RFC 7296 §2.14)."""
    seed = skeyseed(suite.prf_alg, ni, nr, g_ir)
    return derive_ike_keys(
        suite.prf_alg,
        seed,
        ni,
        nr,
        spi_i,
        spi_r,
        encr_key_len=suite.encr_key_len,
        integ_key_len=suite.integ_key_len,
    )


def esp_child_keys(
    suite: EspSuite, prf_id: PrfLike, sk_d: bytes, ni: bytes, nr: bytes, g_ir: bytes | None = None
) -> ChildKeys:
    """A Child SA's keys for ``suite`` (RFC 7296 §2.17): encryption (with salt), integrity."""
    return child_keys(
        prf_id,
        sk_d,
        ni,
        nr,
        encr_key_len=suite.encr_key_len,
        integ_key_len=suite.integ_key_len,
        g_ir_new=g_ir,
    )


def _transport_requested(payloads: tuple[Payload, ...]) -> bool:
    return any(
        isinstance(p, Notify) and p.notify_type == NotifyType.USE_TRANSPORT_MODE for p in payloads
    )


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
        self.nat_detected = False  # the responder's NAT-D hashes differ from our addresses
        self.local_behind_nat = False  # NAT-D: a NAT rewrote our address or port (§2.23)
        self._spi_i = _nonzero(rand, 8, 1)
        self._spi_r = bytes(8)
        self._ni = rand(NONCE_LEN)
        self._nr = b""
        self._ike_suites = config.ike_suites
        self._esp_suites = config.esp_suites
        self._suite: IkeSuite | None = None
        self._dh_group = config.ike_suites[0].dh
        self._dh: DhPrivate = self._new_dh(self._dh_group)
        self._cookie: bytes | None = None
        self._ke_retries = 0
        self._cookie_retries = 0
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
        self._rejected: str | None = None  # why the last unusable IKE_SA_INIT response was
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
    def sa_keys(self) -> tuple[bytes, bytes, IkeKeys, IkeSuite] | None:
        """(SPIi, SPIr, keys, suite) once IKE_SA_INIT derived them, else None: for the opt-in
        key export only (also of IKE SAs whose IKE_AUTH then fails). Never in a repr."""
        if self._keys is None or self._suite is None:
            return None
        return self._spi_i, self._spi_r, self._keys, self._suite

    @property
    def retries(self) -> tuple[int, int, int]:
        """(INVALID_KE_PAYLOAD retries, COOKIE retries, the DH group of our current KE)."""
        return self._ke_retries, self._cookie_retries, self._dh_group

    @property
    def next_timeout(self) -> float | None:
        """When on_timer should next be called, or None when nothing is outstanding."""
        if self._state not in (State.SA_INIT_SENT, State.AUTH_SENT):
            return None
        return self._sent_at + self._interval

    def take_events(self) -> list[InfoEvent]:
        """Events of INFORMATIONAL exchanges since the last call (child / IKE SA deleted)."""
        return self._info.take_events() if self._info is not None else []

    @property
    def info(self) -> InfoSession | None:
        """The ESTABLISHED IKE SA's exchanges (rekeys, liveness, timers); None before."""
        return self._info

    def delete_ike(self, now: float) -> list[bytes]:
        """An INFORMATIONAL Delete of the IKE SA (RFC 7296 §1.4.1); its response -> CLOSED."""
        if self._state is not State.ESTABLISHED or self._info is None:
            return []
        return self._info.delete_ike()

    # -- driving ----------------------------------------------------------------------------

    def start(self, now: float) -> list[bytes]:
        if self._state is not State.INITIAL:
            raise RuntimeError("start() called twice")
        self._state = State.SA_INIT_SENT
        return self._send_sa_init(now)

    def _new_dh(self, group_id: int) -> DhPrivate:
        legacy = any(s.allow_legacy for s in self._ike_suites if s.dh == group_id)
        return group(group_id, allow_legacy=legacy).generate(self._rand)

    def _send_sa_init(self, now: float) -> list[bytes]:
        """IKE_SA_INIT (message ID 0), with our COOKIE first when the responder sent one."""
        cfg = self.config
        cookie: tuple[Payload, ...] = ()
        if self._cookie is not None:
            cookie = (Notify(NotifyType.COOKIE, self._cookie),)
        payloads: tuple[Payload, ...] = (
            *cookie,
            SA(ike_proposals(self._ike_suites)),
            KE(self._dh_group, self._dh.public_bytes()),
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
        return self._send([self._msg1], now)

    def on_timer(self, now: float) -> list[bytes]:
        deadline = self.next_timeout
        if deadline is None or now < deadline:
            return []
        if self._rejected is not None:  # no valid response came after the rejected one
            self._fail(self._rejected)
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
            if self._state is State.SA_INIT_SENT:
                self._rejected = str(e)  # unauthenticated: maybe forged (§2.21.1), wait
                return []
            self._fail(str(e))
            return []
        except AlgorithmError as e:  # a suite the registry cannot run (never key material)
            self._fail(f"algorithm error: {e}")
            return []

    # -- internals --------------------------------------------------------------------------

    def _fail(self, reason: str) -> None:
        self._state = State.FAILED
        self.failure_reason = reason
        self._pending = []

    def _send(self, datagrams: list[bytes], now: float) -> list[bytes]:
        self._rejected = None
        self._pending = list(datagrams)
        self._sent_at = now
        self._interval = RETRANSMIT_INITIAL
        self._tries = 1
        return list(datagrams)

    @staticmethod
    def _check_errors(payloads: tuple[Payload, ...], offered: str = "") -> None:
        """An error notify ends the exchange; NO_PROPOSAL_CHOSEN names what we ``offered``."""
        for p in payloads:
            if isinstance(p, Notify) and p.notify_type <= _ERROR_NOTIFY_MAX:
                reason = _notify_name(p.notify_type)
                if p.notify_type == NotifyType.NO_PROPOSAL_CHOSEN and offered:
                    reason += f": the responder accepted none of our {offered}"
                raise IkeFailure(reason)

    def _retry_sa_init(self, msg: Message, now: float) -> list[bytes] | None:
        """COOKIE (§2.6) and INVALID_KE_PAYLOAD (§1.3) answers: the resent IKE_SA_INIT, [] for a
        stale duplicate of an answer already acted on, None when neither applies."""
        cookie = next(
            (
                p
                for p in msg.payloads
                if isinstance(p, Notify) and p.notify_type == NotifyType.COOKIE
            ),
            None,
        )
        if cookie is not None:
            if cookie.data == self._cookie:
                return []  # a retransmitted answer to the request we already replaced
            if not 1 <= len(cookie.data) <= MAX_COOKIE_LEN:
                raise IkeFailure(f"responder COOKIE of {len(cookie.data)} octets (RFC 7296 §2.6)")
            if self._cookie_retries >= MAX_COOKIE_RETRIES:
                raise IkeFailure(f"responder asked for a COOKIE {self._cookie_retries + 1} times")
            self._cookie_retries += 1
            self._cookie = cookie.data
            return self._send_sa_init(now)
        for p in msg.payloads:
            if not isinstance(p, Notify) or p.notify_type != NotifyType.INVALID_KE_PAYLOAD:
                continue
            if len(p.data) != 2:
                raise IkeFailure("INVALID_KE_PAYLOAD without a 2-octet group")
            wanted = struct.unpack("!H", p.data)[0]
            if wanted == self._dh_group:
                return []  # stale: we already use that group
            ours = [s.dh for s in self._ike_suites]
            if wanted not in ours:
                raise IkeFailure(
                    f"INVALID_KE_PAYLOAD: responder wants DH group {wanted}, "
                    f"not in our proposals {sorted(set(ours))}"
                )
            if self._ke_retries >= MAX_KE_RETRIES:
                raise IkeFailure(
                    f"INVALID_KE_PAYLOAD: responder wants DH group {wanted} after "
                    f"{self._ke_retries} retries"
                )
            self._ke_retries += 1
            self._dh_group = wanted
            self._dh = self._new_dh(wanted)
            return self._send_sa_init(now)
        return None

    def _on_sa_init(self, msg: Message, raw: bytes, now: float) -> list[bytes]:
        retry = self._retry_sa_init(msg, now)
        if retry is not None:
            return retry
        names = ", ".join(x.name for x in self._ike_suites)
        self._check_errors(msg.payloads, f"IKE proposals ({names})")
        sa = _first(msg.payloads, SA)
        ke = _first(msg.payloads, KE)
        nonce = _first(msg.payloads, Nonce)
        if not isinstance(sa, SA) or not isinstance(ke, KE) or not isinstance(nonce, Nonce):
            raise IkeFailure("IKE_SA_INIT response lacks SA, KE or Nonce")
        if msg.spi_r == bytes(8):
            raise IkeFailure("IKE_SA_INIT response with a zero responder SPI")
        if len(sa.proposals) != 1:
            raise IkeFailure("responder chose more than one IKE proposal")
        suite = match_ike(sa.proposals[0], self._ike_suites)
        if suite is None:
            raise IkeFailure("responder chose an IKE proposal we did not offer")
        if suite.dh != self._dh_group:
            raise IkeFailure(
                f"responder chose DH group {suite.dh}, our KE is in group {self._dh_group}"
            )
        if ke.dh_group != self._dh_group:
            raise IkeFailure(f"responder KE in group {ke.dh_group}, not {self._dh_group}")
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
        self._suite = suite
        self._keys = ike_keys(suite, self._ni, self._nr, g_ir, self._spi_i, self._spi_r)
        self._in, self._out = sk_ciphers(suite, self._keys, initiator=True)
        self.port_float = any(
            isinstance(p, Notify)
            and p.notify_type
            in (NotifyType.NAT_DETECTION_SOURCE_IP, NotifyType.NAT_DETECTION_DESTINATION_IP)
            for p in msg.payloads
        )
        cfg = self.config
        self.nat_detected, self.local_behind_nat = nat_detection(
            msg.payloads,
            self._spi_i,
            self._spi_r,
            (_ipv4(cfg.remote_addr), cfg.remote_port),
            (_ipv4(cfg.local_addr), cfg.local_port),
        )
        return self._send_auth(now)

    def _send_auth(self, now: float) -> list[bytes]:
        assert self._keys is not None and self._out is not None and self._suite is not None
        cfg = self.config
        prf_id = self._suite.prf_alg
        assert self._local_id is not None  # identity_of with an address never gives None
        idi = IDi(self._local_id.id_type, self._local_id.data)
        octets = signed_octets(prf_id, self._msg1, self._nr, self._keys.sk_pi, idi.encode_body())
        auth = self._local_auth.auth_payload(octets, prf_id, self._peer_hashes)
        transport: tuple[Payload, ...] = ()
        if cfg.mode is Mode.TRANSPORT:
            transport = (Notify(NotifyType.USE_TRANSPORT_MODE),)
        idr: tuple[Payload, ...] = ()
        if self._remote_id is not None:
            idr = (IDr(self._remote_id.id_type, self._remote_id.data),)
        inner: tuple[Payload, ...] = (
            idi,
            *self._local_auth.cert_payloads(),
            *self._peer_auth.cert_requests(),
            *idr,
            auth,
            *transport,
            SA(esp_proposals(self._esp_suites, self._child_spi, pfs=False)),
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

    def _abandon(self, reason: str) -> list[bytes]:
        """The IKE SA is authenticated but its Child SA unusable: fail, and delete the IKE SA
        at the responder with an INFORMATIONAL request (RFC 7296 §1.4.1; sent once, no
        response awaited)."""
        assert self._out is not None
        note = (Delete(ProtocolId.IKE),)
        msg = Message(self._spi_i, self._spi_r, ExchangeType.INFORMATIONAL, 2, note, initiator=True)
        out = encrypt_message(msg, self._out)
        self._fail(reason)
        return out

    def _on_auth(self, raw: bytes, now: float) -> list[bytes]:
        assert self._keys is not None and self._in is not None and self._suite is not None
        prf_id = self._suite.prf_alg
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
        names = ", ".join(x.without_dh().name for x in self._esp_suites)
        mode = " in transport mode" if self.config.mode is Mode.TRANSPORT else ""
        proto = child_protocol_name(self._esp_suites)
        if proto == "AH" and self.nat_detected:
            mode += f"; {AH_NAT_REASON}"
        self._check_errors(msg.payloads, f"{proto} proposals ({names}){mode}")
        idr = _first(msg.payloads, IDr)
        auth = _first(msg.payloads, Auth)
        if not isinstance(idr, IDr) or not isinstance(auth, Auth):
            raise IkeFailure("IKE_AUTH response lacks IDr or AUTH")
        peer = Identity(idr.id_type, idr.data)
        if self._remote_id is not None and not self._remote_id.matches(peer):
            return self._reject(
                f"responder identity {peer} differs from the configured {self._remote_id}"
            )
        octets = signed_octets(prf_id, self._msg2, self._ni, self._keys.sk_pr, idr.encode_body())
        certs = tuple(p for p in msg.payloads if isinstance(p, Cert))
        try:
            self._peer_auth.verify(auth, octets, prf_id, peer, certs, now)
        except AuthFailure as e:
            return self._reject(f"responder not authenticated: {e}")
        sa = _first(msg.payloads, SA)
        tsi = _first(msg.payloads, TSi)
        tsr = _first(msg.payloads, TSr)
        if not isinstance(sa, SA) or not isinstance(tsi, TSi) or not isinstance(tsr, TSr):
            raise IkeFailure("IKE_AUTH response lacks SA, TSi or TSr (no Child SA)")
        if len(sa.proposals) != 1:
            raise IkeFailure(f"responder chose more than one {proto} proposal")
        chosen = sa.proposals[0]
        esp = match_esp(chosen, self._esp_suites)
        if esp is None:
            raise IkeFailure(f"responder chose a Child SA proposal we did not offer ({proto})")
        if esp.ah and self.nat_detected:
            return self._abandon(AH_NAT_REASON)
        transport = _transport_requested(msg.payloads)
        if transport and self.config.mode is not Mode.TRANSPORT:
            raise IkeFailure("responder answered USE_TRANSPORT_MODE, which we did not request")
        if self.config.mode is Mode.TRANSPORT and not transport:
            # RFC 7296 §1.3.1: the Child SA would be tunnel mode; unacceptable here, so it is
            # not installed (the initiator "MUST delete the SA").
            raise IkeFailure("responder declined USE_TRANSPORT_MODE (tunnel mode not accepted)")
        ck = esp_child_keys(esp, prf_id, self._keys.sk_d, self._ni, self._nr)
        child = ChildSaResult(
            spi_in=self._child_spi,
            spi_out=chosen.spi,
            encr_id=esp.encr,
            key_bits=esp.key_bits,
            esn=esp.esn,
            keys=ck,
            ts_i=tuple(s for s in tsi.selectors if isinstance(s, TrafficSelector)),
            ts_r=tuple(s for s in tsr.selectors if isinstance(s, TrafficSelector)),
            integ_id=esp.integ,
            mode=self.config.mode,
            protocol=esp.protocol,
        )
        self.result = IkeSaResult(
            self._spi_i,
            self._spi_r,
            self._keys,
            child,
            self.port_float,
            self._suite,
            nat_detected=self.nat_detected,
            local_behind_nat=self.local_behind_nat,
        )
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
            ike_suite=self._suite,
            ike_suites=self._ike_suites,
            esp_suites=self._esp_suites,
            mode=child.mode,
            fragment_size=fragment_limit(
                self.config.fragment_size, self.config.remote_addr, self.port_float
            )
            if self._fragment
            else None,
        )
        self._state = State.ESTABLISHED
        return []


def _selector(rng: tuple[str, str]) -> TrafficSelector:
    return TrafficSelector(0, 0, 65535, _ipv4(rng[0]), _ipv4(rng[1]))
