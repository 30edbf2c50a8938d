"""After IKE_AUTH, sans-IO: RFC 7296 §1.3.2-§1.3.3, §1.4, §2.1, §2.4, §2.8, §2.18, §2.25; RFC 7383.

Shared by both roles (:mod:`services.core.ike.exchange`, :mod:`services.core.ike.responder`),
which hand every datagram received after IKE_AUTH to :meth:`InfoSession.handle`.

The Child SAs are ESP or AH, the protocol of the configured Child SA suites (``esp_suites``,
RFC 7296 §3.3.1): REKEY_SA, our Deletes and the proposals of our rekeys carry that protocol,
and a peer's rekey naming another protocol gets CHILD_SA_NOT_FOUND.

Peer requests (each IKE SA keeps its own message-ID window and response cache, §2.1; a
retransmit of the last request gets the cached response, anything else outside the window is
dropped as :class:`InfoDrop`):

* INFORMATIONAL: empty (liveness) -> empty response; Delete of ESP/AH SPIs naming the peer's
  outbound SPI of one of our Child SAs -> a Delete of our inbound SPI (none when we are deleting
  that Child SA ourselves, §1.4.1) and ``child_deleted``; Delete of the IKE SA -> ``closed`` and
  ``ike_deleted`` (on an IKE SA replaced by a rekey: only that SA goes away).
* CREATE_CHILD_SA with N(REKEY_SA) (§1.3.3): answered with the first of our ESP suites the
  offer contains (:func:`~services.core.ike.suites.choose_esp`), with PFS when the offer carries
  a KE (same group; a KE in a group we do not take gets INVALID_KE_PAYLOAD naming one we take),
  in transport mode when the Child SA is and the request carries USE_TRANSPORT_MODE (§1.3.1);
  ``child_rekeyed``. Unknown SPI -> CHILD_SA_NOT_FOUND; a Child SA we are deleting, or any
  request while our own IKE SA rekey is outstanding -> TEMPORARY_FAILURE (§2.25).
* CREATE_CHILD_SA with an IKE proposal (§1.3.2): IKE SA rekey. Answered with the first of our
  IKE suites the offer contains (:func:`~services.core.ike.suites.choose_ike`), our new SPI, Nr
  and KE; the new IKE SA (SKEYSEED = prf(SK_d (old), g^ir (new) | Ni | Nr), §2.18, then the
  chosen suite's keys and ciphers) takes over the Child SAs, starts its message IDs at 0, and
  the peer is expected to delete the old one; ``ike_rekeyed``.
* CREATE_CHILD_SA without REKEY_SA and with an ESP proposal (§1.3.1): a new Child SA. The
  first configured :class:`~services.core.ike.child.ChildPolicy` (:meth:`configure_children`)
  whose ranges the peer's TSi / TSr intersect is taken and the selectors are narrowed to it
  (§2.9); no such child -> TS_UNACCEPTABLE. Proposal, PFS, transport mode and keys (§2.17, Ni
  | Nr and g^ir with a KE) are handled exactly as for a Child SA rekey (one implementation);
  ``child_created`` names the policy. No children configured, or MAX_CHILD_SAS live Child SAs
  already -> NO_ADDITIONAL_SAS; while our IKE SA rekey or Delete is outstanding ->
  TEMPORARY_FAILURE.
* A Child SA already replaced by a rekey (awaiting its Delete) is not rekeyed again:
  TEMPORARY_FAILURE (§2.25, as for a Child SA being closed); a rekey that would take the IKE SA
  above MAX_CHILD_SAS live Child SAs -> TEMPORARY_FAILURE too (the replaced ones are expected
  to be deleted first).
* Errors (§2.5, §2.21.3, §3.10.1): a request whose integrity check passes but whose inner
  payloads are malformed is answered (encrypted) with N(UNSUPPORTED_CRITICAL_PAYLOAD) naming
  the payload type or N(INVALID_SYNTAX); its message ID is consumed and the answer cached for
  retransmits like any other. A KE payload that fails the RFC 6989 checks (dh.py) in a
  CREATE_CHILD_SA request -> INVALID_SYNTAX. Integrity failures (SkError) stay silent drops.

Our requests (:meth:`InfoSession.rekey_child`, :meth:`~InfoSession.rekey_ike`,
:meth:`~InfoSession.create_child`, :meth:`~InfoSession.delete_child`,
:meth:`~InfoSession.delete_ike`, liveness checks) are queued
and sent one at a time (window size 1, §2.3), retransmitted with back-off from
:meth:`~InfoSession.on_timer`; a request never answered after ``retransmit_tries`` sends ends the
IKE SA with a ``dead`` event (§2.4). With ``dpd_delay`` > 0 an empty INFORMATIONAL is sent when
nothing arrived from the peer for that long. Our rekeys offer our configured suites: a CHILD
SA rekey our ESP suites (with the PFS group of the first one that names a group, else
``pfs_group``; USE_TRANSPORT_MODE for a transport-mode Child SA), an IKE SA rekey our IKE suites
(KE in the first one's group); the answer must be one of them, and the new SA's keys follow the
chosen suite. An INVALID_KE_PAYLOAD answer naming a group one of our suites takes is retried
once in that group. A CHILD SA rekey of ours installs the new SA first
(``child_rekeyed`` with ``initiated``) and then deletes the old one (``child_deleted`` once the
peer answered); an IKE SA rekey of ours moves everything to the new IKE SA and deletes the old
one on the old SA. A TEMPORARY_FAILURE answer is retried after a random delay. A new Child SA
of ours (:meth:`~InfoSession.create_child`, §1.3.1): CREATE_CHILD_SA { [N(USE_TRANSPORT_MODE)],
SA, Ni, [KEi], TSi, TSr } with the policy's suites and selectors, built and answered by the
same code as a CHILD SA rekey without REKEY_SA; ``child_created`` (``initiated``) on success,
``child_failed`` with the error notify's name otherwise (NO_PROPOSAL_CHOSEN, TS_UNACCEPTABLE,
NO_ADDITIONAL_SAS, ...; INVALID_KE_PAYLOAD is retried once in the group asked for,
TEMPORARY_FAILURE after a random delay).

Simultaneous rekeys (§2.8.1 CHILD, §2.8.2 IKE): when the peer rekeyed the same SA while our
rekey was outstanding, the exchange holding the lowest of the four nonces produced the
redundant SA; whoever created it deletes it, and the creator of the surviving one deletes the
old SA. No key material appears in any repr or event text.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, TypeVar

from services.core.algorithms import AlgorithmError
from services.core.ike.child import ChildPolicy, narrow
from services.core.ike.child import hull as _hull
from services.core.ike.constants import (
    ExchangeType,
    NotifyType,
    ProtocolId,
)
from services.core.ike.dh import DhPrivate, InvalidKeyExchange, group
from services.core.ike.keys import (
    SPI_LEN,
    IkeKeys,
    child_keys,
    derive_ike_keys,
    rekey_skeyseed,
)
from services.core.ike.message import (
    KE,
    SA,
    Delete,
    IkeDecodeError,
    Message,
    Nonce,
    Notify,
    Payload,
    Proposal,
    TrafficSelector,
    TSi,
    TSr,
    decode_header,
    error_notify,
)
from services.core.ike.prf import PrfLike
from services.core.ike.sk import (
    FragmentReassembler,
    SkCipher,
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
    esp_ke_hint,
    esp_proposals,
    ike_proposals,
    match_esp,
    match_ike,
)
from services.core.sa import Mode

if TYPE_CHECKING:
    from services.core.ike.exchange import ChildSaResult

_P = TypeVar("_P")
_NONCE_LEN = 32
_ERROR_NOTIFY_MAX = 16383  # RFC 7296 §3.10.1
RETRANSMIT_TIMEOUT = 1.0  # seconds before the first retransmission; doubled each time
RETRANSMIT_TRIES = 5  # sends of one request before the peer is declared dead
RETRY_DELAY = 2.0  # base delay before retrying a request answered with TEMPORARY_FAILURE
MAX_CHILD_SAS = 8  # live Child SAs per IKE SA (a rekey adds one until the old one is deleted)


class InfoDrop(ValueError):
    """The datagram is ignored (wrong SPI, flags, message ID or exchange)."""


@dataclass(frozen=True)
class InfoEvent:
    """What an exchange did.

    ``kind``: ``liveness`` (a peer request changed nothing), ``child_deleted``,
    ``child_rekeyed``, ``child_created`` (a new Child SA: ``child``, ``spi_in`` / ``spi_out``
    empty), ``ike_rekeyed``, ``ike_deleted``, ``dead`` (a request of ours was never
    answered; the IKE SA is closed), ``rekey_failed`` or ``child_failed`` (our new Child SA
    was refused; ``reason`` names the error notify). ``name``: the configured Child SA
    (:class:`~services.core.ike.child.ChildPolicy`) the event is about ("" for the first Child
    SA when :meth:`InfoSession.configure_children` did not name it).
    ``spi_in`` / ``spi_out`` name the Child SA (ours / the peer's) for ``child_deleted``, and
    the OLD Child SA for ``child_rekeyed``, whose ``child`` is the new one. ``initiated``: we
    started the CREATE_CHILD_SA; the new child's keys follow RFC 7296 §2.17 with the starter as
    initiator: ``keys.encr_i`` protects starter→other traffic. So when ``initiated`` is False
    ``keys.encr_i`` is the key of our ``spi_in``, when True the key of ``spi_out``. ``ts_i`` is
    the starter's side. For ``child_deleted`` and ``ike_rekeyed``, ``initiated`` says that our
    Delete / our rekey request did it. ``ike_spis`` / ``old_ike_spis``: (SPIi, SPIr) of the new
    and the replaced IKE SA for ``ike_rekeyed``, ``ike_keys`` / ``ike_suite`` the new SA's keys
    and algorithms (for an opt-in key export; never in a repr)."""

    kind: str
    spi_in: bytes = b""
    spi_out: bytes = b""
    child: ChildSaResult | None = None
    initiated: bool = False
    ike_spis: tuple[bytes, bytes] = (b"", b"")
    old_ike_spis: tuple[bytes, bytes] = (b"", b"")
    reason: str = ""
    ike_keys: IkeKeys | None = field(default=None, repr=False)  # ike_rekeyed: the new SA's
    ike_suite: IkeSuite | None = None  # ike_rekeyed: the new SA's algorithms
    name: str = ""  # the Child SA's configured name (child events)


@dataclass(eq=False)
class _IkeSa:
    """One IKE SA's protection and message-ID windows (RFC 7296 §2.1, §2.2). ``initiator`` is
    our I flag on it; ``nonces`` (Ni, Nr) of the rekey that created it (collisions)."""

    spi_i: bytes
    spi_r: bytes
    initiator: bool
    cin: SkCipher = field(repr=False)
    cout: SkCipher = field(repr=False)
    sk_d: bytes = field(repr=False)
    prf_id: PrfLike
    our_mid: int
    peer_mid: int
    last_mid: int | None = None
    last_exchange: int = ExchangeType.INFORMATIONAL
    last_response: list[bytes] = field(default_factory=list, repr=False)
    nonces: tuple[bytes, bytes] = field(default=(b"", b""), repr=False)
    suite: IkeSuite | None = None  # its negotiated algorithms (None: not told)
    keys: IkeKeys | None = field(default=None, repr=False)  # of a rekeyed SA (key export)

    @property
    def spis(self) -> tuple[bytes, bytes]:
        return self.spi_i, self.spi_r


@dataclass(eq=False)
class _Request:
    """One request of ours. ``kind``: liveness, delete_child, delete_ike, rekey_child,
    rekey_ike, create_child. ``sa``: the IKE SA it must go on (None: the current one when
    sent)."""

    kind: str
    sa: _IkeSa | None = None
    pair: tuple[bytes, bytes] = (b"", b"")  # the Child SA deleted / rekeyed
    policy: ChildPolicy | None = None  # create_child: the Child SA to create
    not_before: float = 0.0
    # while outstanding
    on: _IkeSa | None = None
    mid: int = -1
    exchange: int = ExchangeType.INFORMATIONAL
    datagrams: list[bytes] = field(default_factory=list, repr=False)
    sent_at: float = 0.0
    interval: float = RETRANSMIT_TIMEOUT
    tries: int = 0
    # rekey state (never shown)
    nonce: bytes = field(default=b"", repr=False)
    dh: DhPrivate | None = field(default=None, repr=False)
    new_spi: bytes = b""
    pfs_group: int | None = None  # rekey_child: the KE group (None: no PFS)
    ke_group: int | None = None  # rekey_ike, or a retry after INVALID_KE_PAYLOAD: KE group
    ke_retried: bool = False
    offered_esp: tuple[EspSuite, ...] = ()
    mode: Mode = Mode.TUNNEL  # rekey_child / create_child: the Child SA's


class InfoSession:
    """Post-ESTABLISHED message handling for one IKE SA and its successors after rekeys.

    ``we_initiated``: we are the original initiator (our I flag). ``peer_next_mid``: the message
    ID the peer's next request must carry; ``last``: (message ID, exchange type, cached
    response) of the last peer request answered, for retransmits. Time reaches the session
    through :meth:`on_timer` and the ``now`` arguments; datagrams that ``handle`` sends on its
    own (the next queued request) are timed from the last ``now`` seen.

    ``ike_suite``: the IKE SA's negotiated suite (its PRF is ``prf_id`` when not given);
    ``ike_suites`` / ``esp_suites``: what we offer in our rekeys and accept in the peer's, in
    our order of preference; ``mode``: the first Child SA's mode (each Child SA keeps its own).
    ``fragment_size``: when IKE fragmentation was agreed in IKE_SA_INIT (RFC 7383), the largest
    IKE message we send whole (:func:`~services.core.ike.exchange.fragment_limit`); larger
    CREATE_CHILD_SA and INFORMATIONAL messages go out as SKF fragments, and received fragments
    are reassembled. None: no fragments sent, received ones dropped.
    """

    def __init__(
        self,
        *,
        spi_i: bytes,
        spi_r: bytes,
        we_initiated: bool,
        cin: SkCipher,
        cout: SkCipher,
        child: tuple[bytes, bytes],
        our_next_mid: int,
        peer_next_mid: int,
        last: tuple[int, int, list[bytes]] | None = None,
        sk_d: bytes = b"",
        peer_ts: tuple[TrafficSelector, ...] = (),
        our_ts: tuple[TrafficSelector, ...] = (),
        rand: Callable[[int], bytes] = secrets.token_bytes,
        prf_id: PrfLike = DEFAULT_IKE.prf,
        dpd_delay: float = 0.0,
        retransmit_timeout: float = RETRANSMIT_TIMEOUT,
        retransmit_tries: int = RETRANSMIT_TRIES,
        pfs_group: int | None = None,
        ike_suite: IkeSuite | None = None,
        ike_suites: tuple[IkeSuite, ...] = (DEFAULT_IKE,),
        esp_suites: tuple[EspSuite, ...] = (DEFAULT_ESP,),
        mode: Mode = Mode.TUNNEL,
        fragment_size: int | None = None,
    ) -> None:
        if not ike_suites or not esp_suites:
            raise ValueError("ike_suites and esp_suites must not be empty")
        if ike_suite is not None:
            prf_id = ike_suite.prf_alg
        self._sa = _IkeSa(
            spi_i,
            spi_r,
            we_initiated,
            cin,
            cout,
            sk_d,
            prf_id,
            our_next_mid,
            peer_next_mid,
            last[0] if last else None,
            last[1] if last else ExchangeType.INFORMATIONAL,
            list(last[2]) if last else [],
            suite=ike_suite,
        )
        self._others: list[_IkeSa] = []  # replaced / redundant IKE SAs still being deleted
        # (spi_in, spi_out) of our live Child SAs, newest last (a rekey adds one; Delete drops)
        self.children: list[tuple[bytes, bytes]] = [child]
        self._rand = rand
        self.dpd_delay = dpd_delay
        self.retransmit_timeout = retransmit_timeout
        self.retransmit_tries = retransmit_tries
        self.pfs_group = pfs_group  # DH group of our CHILD SA rekeys when no ESP suite names one
        self._ike_suites = ike_suites
        self._esp_suites = esp_suites
        self._child_protocol = int(esp_suites[0].protocol)  # ESP or AH, for every Child SA
        # spi_in -> the live Child SA's name, negotiated selectors, suites and mode (§1.3.1)
        self._meta: dict[bytes, ChildPolicy] = {
            child[0]: ChildPolicy("", tuple(our_ts), tuple(peer_ts), esp_suites, mode)
        }
        self.policies: tuple[ChildPolicy, ...] = ()  # Child SAs the peer may create (§1.3.1)
        # RFC 7383: the largest IKE message we send whole (None: fragmentation not agreed)
        self.fragment_size = fragment_size
        self._requests = FragmentReassembler()  # the peer's fragmented requests
        self._responses = FragmentReassembler()  # fragmented responses to ours
        self._queue: list[_Request] = []
        self._out: _Request | None = None  # the outstanding request (window size 1)
        self._now: float | None = None
        self._rx = 0  # authenticated messages received (liveness bookkeeping)
        self._rx_seen = -1
        self._last_rx = 0.0
        self._deleting: set[bytes] = set()  # spi_in of Child SAs we are deleting
        self._replaced: set[bytes] = set()  # spi_in of Child SAs a rekey replaced (§2.8)
        # Child SA rekeys of the peer answered while our rekey of the same SA was outstanding:
        # old spi_in -> (the peer's exchange nonces, new pair)
        self._peer_child_rekeys: dict[bytes, tuple[tuple[bytes, bytes], tuple[bytes, bytes]]] = {}
        self._peer_ike_rekey: _IkeSa | None = None  # the peer's new IKE SA during a collision
        self.closed = False
        self.events: list[InfoEvent] = []

    # -- state --------------------------------------------------------------------------------

    @property
    def child(self) -> tuple[bytes, bytes] | None:
        """The newest live Child SA (spi_in, spi_out), None once all are deleted."""
        return self.children[-1] if self.children else None

    @property
    def spis(self) -> tuple[bytes, bytes]:
        """(SPIi, SPIr) of the current IKE SA (changes on an IKE SA rekey)."""
        return self._sa.spis

    @property
    def all_spis(self) -> tuple[tuple[bytes, bytes], ...]:
        """Every IKE SA this session answers for: the current one first, then replaced or
        redundant ones still being deleted, then the peer's new one during a rekey collision."""
        pending = (self._peer_ike_rekey.spis,) if self._peer_ike_rekey is not None else ()
        return (self._sa.spis, *(o.spis for o in self._others), *pending)

    @property
    def ike_suite(self) -> IkeSuite | None:
        """The current IKE SA's negotiated suite (changes with an IKE SA rekey)."""
        return self._sa.suite

    def mode_of(self, spi_in: bytes) -> Mode:
        """The mode of our Child SA with inbound SPI ``spi_in`` (tunnel if unknown)."""
        meta = self._meta.get(spi_in)
        return meta.mode if meta is not None else Mode.TUNNEL

    def child_name(self, spi_in: bytes) -> str:
        """The configured name of our Child SA with inbound SPI ``spi_in`` ("" if unknown)."""
        meta = self._meta.get(spi_in)
        return meta.name if meta is not None else ""

    def children_named(self, name: str) -> list[tuple[bytes, bytes]]:
        """The live Child SAs (spi_in, spi_out) of configured child ``name``, oldest first."""
        return [c for c in self.children if self.child_name(c[0]) == name]

    def configure_children(self, policies: tuple[ChildPolicy, ...], first: str = "") -> None:
        """The Child SAs the peer may create and we may create on this IKE SA
        (:meth:`create_child`); ``first`` names the Child SA negotiated in IKE_AUTH."""
        self.policies = tuple(policies)
        for spi_in, meta in list(self._meta.items()):
            if not meta.name:
                self._meta[spi_in] = replace(meta, name=first)

    @property
    def we_initiated(self) -> bool:
        """Our I flag on the current IKE SA (after a rekey: we started that rekey)."""
        return self._sa.initiator

    @property
    def busy(self) -> bool:
        """A request of ours is outstanding or queued."""
        return self._out is not None or bool(self._queue)

    @property
    def pending(self) -> list[bytes]:
        """The datagrams of our outstanding request (empty when none)."""
        return list(self._out.datagrams) if self._out is not None else []

    def take_events(self) -> list[InfoEvent]:
        out, self.events = self.events, []
        return out

    @property
    def next_timeout(self) -> float | None:
        """When :meth:`on_timer` has something to do next (None: nothing is scheduled)."""
        if self.closed:
            return None
        if self._out is not None:
            return self._out.sent_at + self._out.interval
        times = [r.not_before for r in self._queue]
        if self.dpd_delay > 0:
            times.append(self._last_rx + self.dpd_delay)
        return min(times) if times else None

    # -- our requests -------------------------------------------------------------------------

    def rekey_child(self, now: float, spi_in: bytes | None = None) -> list[bytes]:
        """Queue a rekey of the Child SA with our inbound SPI ``spi_in`` (default: the newest);
        returns what can be sent now. Nothing happens for an unknown or dying Child SA or when
        a rekey of it is already queued."""
        pair = self._find_child(spi_in)
        if pair is None or pair[0] in self._deleting or self._queued("rekey_child", pair):
            return []
        self._queue.append(_Request("rekey_child", pair=pair))
        return self._pump(now)

    def create_child(self, now: float, policy: ChildPolicy) -> list[bytes]:
        """Queue a CREATE_CHILD_SA for a new Child SA of ``policy`` (§1.3.1); returns what can
        be sent now. ``child_created`` or ``child_failed`` follows the peer's answer. Nothing
        happens when the IKE SA is closed or a creation of that policy is already queued."""
        if self.closed or not policy.our_ts or not policy.peer_ts or not policy.esp_suites:
            return []
        reqs = [*self._queue, *((self._out,) if self._out is not None else ())]
        if any(r.kind == "create_child" and r.policy == policy for r in reqs):
            return []
        self._queue.append(_Request("create_child", policy=policy))
        return self._pump(now)

    def rekey_ike(self, now: float) -> list[bytes]:
        """Queue a rekey of the IKE SA (§1.3.2); returns what can be sent now."""
        if self.closed or self._queued("rekey_ike", None):
            return []
        self._queue.append(_Request("rekey_ike"))
        return self._pump(now)

    def delete_child(self, now: float, spi_in: bytes | None = None) -> list[bytes]:
        """Queue an INFORMATIONAL Delete of a Child SA (§1.4.1); ``child_deleted`` follows the
        peer's answer."""
        pair = self._find_child(spi_in)
        if pair is None or pair[0] in self._deleting:
            return []
        self._deleting.add(pair[0])
        self._queue.append(_Request("delete_child", pair=pair))
        return self._pump(now)

    def liveness(self, now: float) -> list[bytes]:
        """Queue an empty INFORMATIONAL request (a liveness check, §1.4)."""
        if self.closed or self._queued("liveness", None):
            return []
        self._queue.append(_Request("liveness"))
        return self._pump(now)

    def delete_ike(self, now: float | None = None) -> list[bytes]:
        """Our INFORMATIONAL request with a Delete of the IKE SA (§1.4.1). While another request
        is outstanding, that one is retransmitted and the Delete follows it."""
        if self.closed:
            return []
        if self._out is not None:
            if now is not None:
                self._now = now
            if self._out.kind != "delete_ike" or self._out.on is not self._sa:
                if not any(r.kind == "delete_ike" and r.sa is None for r in self._queue):
                    self._queue.insert(0, _Request("delete_ike"))
            return list(self._out.datagrams)
        self._queue.insert(0, _Request("delete_ike"))
        return self._pump(now)

    def on_timer(self, now: float) -> list[bytes]:
        """Retransmit, declare the peer dead, start queued requests and liveness checks."""
        self._now = now
        if self._rx != self._rx_seen:
            self._rx_seen = self._rx
            self._last_rx = now
        if self.closed:
            return []
        out = self._out
        if out is not None:
            if now < out.sent_at + out.interval:
                return []
            if out.tries >= self.retransmit_tries:
                return self._unanswered(out, now)
            out.tries += 1
            out.interval *= 2
            out.sent_at = now
            return list(out.datagrams)
        if not self._queue and self.dpd_delay > 0 and now - self._last_rx >= self.dpd_delay:
            self._queue.append(_Request("liveness"))
        return self._pump(now)

    # -- received datagrams -------------------------------------------------------------------

    def handle(self, data: bytes) -> list[bytes]:
        """One received message of this IKE SA; raises InfoDrop / SkError / IkeDecodeError
        for what is dropped (an authentic request with malformed inner payloads is answered)."""
        if self.closed:
            raise InfoDrop("IKE SA closed")
        hdr = decode_header(data)
        sa = self._sa_of(hdr.spi_i, hdr.spi_r)
        if hdr.initiator == sa.initiator:
            raise InfoDrop("our own I flag")  # the peer's messages carry the other I flag
        if hdr.response:
            out = self._out
            if out is None or out.on is not sa or hdr.message_id != out.mid:
                raise InfoDrop("not a response to our request")
            if hdr.exchange_type != out.exchange:
                raise InfoDrop("response with another exchange type")
            whole = self._open(data, sa, self._responses)
            if whole is None:
                return []  # more fragments to come (RFC 7383 §2.6)
            self._rx += 1
            self._out = None
            follow = self._response(out, whole.payloads)
            return follow + self._pump(None)
        if sa.last_mid is not None and hdr.message_id == sa.last_mid:
            if hdr.exchange_type != sa.last_exchange:
                raise InfoDrop("retransmit with another exchange type")
            # forged "retransmissions" are dropped; fragments: answered on the first (RFC 7383);
            # an authentic request answered with an error is malformed again: same answer
            try:
                if self.fragment_size is None:
                    decrypt_message(data, sa.cin)
                elif not answers_retransmission(data, sa.cin):
                    raise InfoDrop("a later fragment of a retransmitted request")
            except IkeDecodeError as e:
                if not e.authenticated:
                    raise
            self._rx += 1
            return list(sa.last_response)
        if hdr.message_id != sa.peer_mid:
            raise InfoDrop("message ID outside the window")
        if hdr.exchange_type not in (ExchangeType.INFORMATIONAL, ExchangeType.CREATE_CHILD_SA):
            raise InfoDrop("only INFORMATIONAL and CREATE_CHILD_SA are handled after IKE_AUTH")
        close = False
        after: Callable[[], None] | None = None
        inner: list[Payload]
        events: list[InfoEvent] = []
        try:
            msg = self._open(data, sa, self._requests)
        except IkeDecodeError as e:
            if not e.authenticated:
                raise  # unauthenticated: dropped (§2.21)
            self._rx += 1
            inner = [error_notify(e)]  # authentic but malformed: answered (§2.21.3, §3.10.1)
        else:
            if msg is None:
                return []  # more fragments to come (RFC 7383 §2.6)
            self._rx += 1
            if hdr.exchange_type == ExchangeType.CREATE_CHILD_SA:
                inner, events, after = self._create_child_sa(sa, msg.payloads)
            else:
                inner, events, close = self._informational(sa, msg.payloads)
        resp = Message(
            sa.spi_i,
            sa.spi_r,
            hdr.exchange_type,
            hdr.message_id,
            tuple(inner),
            initiator=sa.initiator,
            response=True,
        )
        answer = encrypt_message(resp, sa.cout, fragment_size=self.fragment_size)
        sa.peer_mid = hdr.message_id + 1
        sa.last_mid = hdr.message_id
        sa.last_exchange = hdr.exchange_type
        sa.last_response = list(answer)
        if after is not None:
            after()  # e.g. switch to a new IKE SA only once the old one's response is built
        if close:
            if sa is self._sa:
                self.closed = True
                self._queue.clear()
                self._out = None
            else:
                self._drop_other(sa)
        self.events.extend(events)
        return list(answer) + self._pump(None)

    def _open(self, data: bytes, sa: _IkeSa, reassembler: FragmentReassembler) -> Message | None:
        """Verify and decrypt one message; with fragmentation agreed, SKF fragments are
        collected (None until the last one is in, RFC 7383 §2.6). SkError / IkeDecodeError."""
        if self.fragment_size is None:
            return decrypt_message(data, sa.cin)
        return reassembler.add(data, sa.cin)

    # -- internals: our requests --------------------------------------------------------------

    def _find_child(self, spi_in: bytes | None) -> tuple[bytes, bytes] | None:
        if self.closed or not self.children:
            return None
        if spi_in is None:
            return self.children[-1]
        return next((c for c in self.children if c[0] == spi_in), None)

    def _queued(self, kind: str, pair: tuple[bytes, bytes] | None) -> bool:
        reqs = [*self._queue, *((self._out,) if self._out is not None else ())]
        return any(r.kind == kind and (pair is None or r.pair == pair) for r in reqs)

    def _pump(self, now: float | None) -> list[bytes]:
        """Send the next queued request when none is outstanding."""
        if now is not None:
            self._now = now
        t = self._now if self._now is not None else 0.0
        while self._out is None and self._queue and not self.closed:
            ready = [r for r in self._queue if r.not_before <= t]
            if not ready:
                return []
            req = ready[0]
            self._queue.remove(req)
            built = self._build(req)
            if built is None:
                continue  # no longer applicable (the Child SA is gone, ...)
            on, exchange, payloads = built
            mid = on.our_mid
            on.our_mid += 1
            msg = Message(
                on.spi_i, on.spi_r, exchange, mid, tuple(payloads), initiator=on.initiator
            )
            req.on, req.mid, req.exchange = on, mid, exchange
            req.datagrams = encrypt_message(msg, on.cout, fragment_size=self.fragment_size)
            req.sent_at, req.interval, req.tries = t, self.retransmit_timeout, 1
            self._out = req
            return list(req.datagrams)
        return []

    def _build(self, req: _Request) -> tuple[_IkeSa, int, list[Payload]] | None:
        sa = req.sa or self._sa
        if req.sa is not None and req.sa is not self._sa and req.sa not in self._others:
            return None
        if req.kind == "liveness":
            return sa, ExchangeType.INFORMATIONAL, []
        if req.kind == "delete_ike":
            return sa, ExchangeType.INFORMATIONAL, [Delete(ProtocolId.IKE)]
        if req.kind == "delete_child":
            if req.pair not in self.children:
                self._deleting.discard(req.pair[0])
                return None
            delete = Delete(self._child_protocol, 4, (req.pair[0],))
            return sa, ExchangeType.INFORMATIONAL, [delete]
        if req.kind == "rekey_child":
            if req.pair not in self.children or req.pair[0] in self._deleting:
                return None
            return sa, ExchangeType.CREATE_CHILD_SA, self._child_rekey_request(req)
        if req.kind == "rekey_ike":
            return sa, ExchangeType.CREATE_CHILD_SA, self._ike_rekey_request(req)
        if req.kind == "create_child" and req.policy is not None:
            if len(self.children) >= MAX_CHILD_SAS:
                reason = f"create_child: {MAX_CHILD_SAS} Child SAs on this IKE SA already"
                self.events.append(InfoEvent("child_failed", reason=reason, name=req.policy.name))
                return None
            return sa, ExchangeType.CREATE_CHILD_SA, self._child_request(req, req.policy)
        return None

    def _new_child_spi(self) -> bytes:
        ours = {c[0] for c in self.children}
        spi = b""
        while int.from_bytes(spi, "big") < 256 or spi in ours:  # RFC 4303 §2.1
            spi = self._rand(4)
            if len(spi) != 4:
                raise ValueError("rand returned the wrong number of octets")
        return spi

    def _new_ike_spi(self) -> bytes:
        taken = {s for pair in self.all_spis for s in pair}
        spi = bytes(SPI_LEN)
        while spi == bytes(SPI_LEN) or spi in taken:
            spi = self._rand(SPI_LEN)
            if len(spi) != SPI_LEN:
                raise ValueError("rand returned the wrong number of octets")
        return spi

    def _rekey_pfs_group(self, suites: tuple[EspSuite, ...]) -> int | None:
        """The KE group of our CHILD SA requests: the first ESP suite's that names one, else
        ``pfs_group`` (None: no PFS)."""
        named = next((s.dh for s in suites if s.dh), 0)
        return named or self.pfs_group

    def _child_rekey_request(self, req: _Request) -> list[Payload]:
        """CREATE_CHILD_SA { [N(USE_TRANSPORT_MODE)], N(REKEY_SA), SA, Ni, [KEi], TSi, TSr }
        (§1.3.3): one proposal per ESP suite of the Child SA, its selectors and mode."""
        meta = self._meta.get(req.pair[0]) or ChildPolicy("", (), (), self._esp_suites)
        return self._child_request(req, replace(meta, mode=self.mode_of(req.pair[0])))

    def _child_request(self, req: _Request, meta: ChildPolicy) -> list[Payload]:
        """A new Child SA (§1.3.1) or, for ``rekey_child``, the rekey of ``req.pair`` (§1.3.3,
        with N(REKEY_SA)): one proposal per ESP suite of ``meta``, PFS with the first group a
        suite names (or ``pfs_group``), TSi / TSr from ``meta``, USE_TRANSPORT_MODE for
        transport."""
        req.new_spi = self._new_child_spi()
        req.nonce = self._rand(_NONCE_LEN)
        pfs = req.ke_group if req.ke_group is not None else self._rekey_pfs_group(meta.esp_suites)
        req.pfs_group = pfs
        # a suite naming a group offers that group, one without a group the KE's (none when
        # no suite names a group and ``pfs_group`` is None); the KE is in ``pfs``
        req.offered_esp = tuple(replace(s, dh=s.dh or (pfs or 0)) for s in meta.esp_suites)
        req.mode = meta.mode
        payloads: list[Payload] = []
        if req.mode is Mode.TRANSPORT:
            payloads.append(Notify(NotifyType.USE_TRANSPORT_MODE))  # §1.3.1
        if req.kind == "rekey_child":
            # §1.3.3: REKEY_SA names the SPI we expect inbound on the old Child SA
            payloads.append(Notify(NotifyType.REKEY_SA, b"", self._child_protocol, req.pair[0]))
        props = esp_proposals(req.offered_esp, req.new_spi, pfs=pfs is not None)
        payloads += [SA(props), Nonce(req.nonce)]
        if pfs is not None:
            req.dh = group(pfs).generate(self._rand)
            payloads.append(KE(pfs, req.dh.public_bytes()))
        payloads += [TSi(meta.our_ts), TSr(meta.peer_ts)]
        return payloads

    def _ike_rekey_request(self, req: _Request) -> list[Payload]:
        """CREATE_CHILD_SA { SA, Ni, KEi } for the IKE SA (§1.3.2): one proposal per IKE suite
        of ours, KE in the first one's group (or the group the peer asked for)."""
        req.new_spi = self._new_ike_spi()
        req.nonce = self._rand(_NONCE_LEN)
        props = tuple(
            Proposal(p.number, p.protocol_id, p.transforms, req.new_spi)
            for p in ike_proposals(self._ike_suites)
        )
        dh_id = req.ke_group if req.ke_group is not None else self._ike_suites[0].dh
        req.ke_group = dh_id
        req.dh = group(dh_id).generate(self._rand)
        return [SA(props), Nonce(req.nonce), KE(dh_id, req.dh.public_bytes())]

    def _ke_retry(self, req: _Request, notify: Notify) -> bool:
        """INVALID_KE_PAYLOAD (§1.3, §2.7) naming a group one of our suites takes: queue the
        same rekey once more with a KE in that group."""
        if req.ke_retried or len(notify.data) != 2:
            return False
        want = int.from_bytes(notify.data, "big")
        if want == (req.ke_group if req.kind == "rekey_ike" else req.pfs_group):
            return False
        if req.kind == "rekey_ike":
            ok = any(s.dh == want for s in self._ike_suites)
        else:
            ok = any(s.dh == want for s in req.offered_esp)
        if not ok:
            return False
        again = _Request(
            req.kind, sa=req.sa, pair=req.pair, policy=req.policy, ke_group=want, ke_retried=True
        )
        self._queue.insert(0, again)
        return True

    def _retry_later(self, req: _Request) -> None:
        """TEMPORARY_FAILURE (§2.25): try again after RETRY_DELAY plus up to as much jitter."""
        t = self._now if self._now is not None else 0.0
        jitter = self._rand(1)[0] / 255 if RETRY_DELAY > 0 else 0.0
        again = _Request(req.kind, sa=req.sa, pair=req.pair, policy=req.policy)
        again.not_before = t + RETRY_DELAY * (1 + jitter)
        self._queue.append(again)

    def _unanswered(self, req: _Request, now: float) -> list[bytes]:
        self._out = None
        if req.on is not None and req.on is not self._sa:
            # a Delete on a replaced IKE SA: forget that SA, the current one lives on
            self._drop_other(req.on)
            return self._pump(now)
        self.closed = True
        self._queue.clear()
        self.events.append(
            InfoEvent("dead", reason=f"no answer to {req.kind} after {req.tries} transmissions")
        )
        return []

    def _drop_other(self, sa: _IkeSa) -> None:
        if sa in self._others:
            self._others.remove(sa)
        if self._out is not None and self._out.on is sa:
            self._requeue(self._out)
            self._out = None

    def _requeue(self, req: _Request) -> None:
        if req.kind in ("rekey_child", "create_child", "delete_child", "liveness"):
            self._queue.insert(0, _Request(req.kind, pair=req.pair, policy=req.policy))

    def _response(self, req: _Request, payloads: tuple[Payload, ...]) -> list[bytes]:
        errors = [
            p for p in payloads if isinstance(p, Notify) and p.notify_type <= _ERROR_NOTIFY_MAX
        ]
        if req.kind == "delete_ike":
            if req.on is self._sa:
                self.closed = True
                self._queue.clear()
                self.events.append(InfoEvent("ike_deleted"))
            elif req.on is not None:
                self._drop_other(req.on)
            return []
        if req.kind == "delete_child":
            self._deleting.discard(req.pair[0])
            if req.pair in self.children:
                self.children.remove(req.pair)
                self.events.append(
                    InfoEvent("child_deleted", req.pair[0], req.pair[1], initiated=True)
                )
            return []
        if req.kind == "liveness":
            return []
        if errors:
            first = errors[0].notify_type
            self._peer_child_rekeys.pop(req.pair[0], None)
            if first == NotifyType.TEMPORARY_FAILURE:
                self._retry_later(req)
                return []
            if (
                first == NotifyType.INVALID_KE_PAYLOAD
                and not (req.kind == "rekey_ike" and self._peer_ike_rekey is not None)
                and self._ke_retry(req, errors[0])
            ):
                return []
            try:
                name = NotifyType(first).name
            except ValueError:
                name = f"error notify {first}"
            self.events.append(self._failed(req, f"{req.kind}: {name}"))
            if req.kind == "rekey_ike" and self._peer_ike_rekey is not None:
                self._adopt_peer_ike(self._peer_ike_rekey)
            return []
        try:
            if req.kind == "rekey_child":
                self._child_rekeyed(req, payloads)
            elif req.kind == "rekey_ike":
                self._ike_rekeyed(req, payloads)
            elif req.kind == "create_child":
                self._child_created(req, payloads)
        except (AlgorithmError, ValueError) as e:
            self.events.append(self._failed(req, f"{req.kind}: {e}"))
            if req.kind == "create_child":
                self._delete_unusable(req, payloads)
        return []

    def _delete_unusable(self, req: _Request, payloads: tuple[Payload, ...]) -> None:
        """The peer created a Child SA we cannot use (another mode, selectors outside ours,
        ...): it is deleted (§1.3.1: "MUST delete"), never reported as created."""
        sa = _one(payloads, SA)
        if sa is None or len(sa.proposals) != 1 or len(sa.proposals[0].spi) != 4:
            return
        pair = (req.new_spi, sa.proposals[0].spi)
        if pair[0] and pair not in self.children:
            self.children.append(pair)
            self.delete_child_queued(pair, front=True)

    def _failed(self, req: _Request, reason: str) -> InfoEvent:
        if req.kind == "create_child":
            name = req.policy.name if req.policy is not None else ""
            return InfoEvent("child_failed", reason=reason, name=name)
        return InfoEvent("rekey_failed", req.pair[0], req.pair[1], reason=reason)

    def _child_created(self, req: _Request, payloads: tuple[Payload, ...]) -> None:
        """The answer to our new Child SA (§1.3.1)."""
        assert req.policy is not None
        new, _nr = self._child_answer(req, payloads, req.policy)
        self._set_child(new, req.policy, initiated=True)
        self.children.append((new.spi_in, new.spi_out))
        name = req.policy.name
        self.events.append(InfoEvent("child_created", child=new, initiated=True, name=name))

    def _child_rekeyed(self, req: _Request, payloads: tuple[Payload, ...]) -> None:
        """The answer to our CHILD SA rekey: new SA first, then (collisions aside) the Delete of
        the old one (§1.3.3, §2.8)."""
        meta = self._meta.get(req.pair[0]) or ChildPolicy("", (), (), self._esp_suites)
        new, nr = self._child_answer(req, payloads, meta)
        self._set_child(new, meta, initiated=True)
        new_pair = (new.spi_in, new.spi_out)
        self.children.append(new_pair)
        self._replaced.add(req.pair[0])
        self.events.append(
            InfoEvent("child_rekeyed", req.pair[0], req.pair[1], new, True, name=meta.name)
        )
        theirs = self._peer_child_rekeys.pop(req.pair[0], None)
        if theirs is None:
            if req.pair in self.children:
                self.delete_child_queued(req.pair, front=True)
            return
        # §2.8.1: the exchange with the lowest nonce made the redundant SA; its maker deletes it
        ours_low = min(req.nonce, nr)
        if ours_low < min(theirs[0]):
            self.delete_child_queued(new_pair, front=True)  # ours is redundant
        elif req.pair in self.children:
            self.delete_child_queued(req.pair, front=True)  # ours survives: the old one goes

    def _child_answer(
        self, req: _Request, payloads: tuple[Payload, ...], meta: ChildPolicy
    ) -> tuple[ChildSaResult, bytes]:
        """Check the answer to our CHILD SA request (rekey or new) and derive the new Child
        SA's keys (§2.17: Ni | Nr, g^ir with PFS): (the new Child SA, Nr). ValueError when
        the answer is unusable."""
        sa = _one(payloads, SA)
        nonce = _one(payloads, Nonce)
        ke = _one(payloads, KE)
        tsi = _one(payloads, TSi)
        tsr = _one(payloads, TSr)
        if sa is None or nonce is None or tsi is None or tsr is None or len(sa.proposals) != 1:
            raise ValueError("response lacks SA, Nr, TSi or TSr")
        chosen = sa.proposals[0]
        suite = next((s for s in req.offered_esp if match_esp(chosen, (s,), pfs_group=s.dh)), None)
        if suite is None:
            raise ValueError("the peer chose a proposal we did not offer")
        if suite.dh != (req.pfs_group or 0):
            raise ValueError("the peer chose a proposal in another group than our KE")
        transport = any(
            isinstance(p, Notify) and p.notify_type == NotifyType.USE_TRANSPORT_MODE
            for p in payloads
        )
        if transport != (req.mode is Mode.TRANSPORT):
            # §1.3.1: the rekeyed Child SA keeps its mode
            raise ValueError("the peer's answer changes the Child SA's mode")
        g_ir: bytes | None = None
        if req.pfs_group is not None:
            if ke is None or ke.dh_group != req.pfs_group or req.dh is None:
                raise ValueError("response lacks the KE of the PFS group")
            g_ir = req.dh.shared(ke.data)
        ts_i = narrow(tsi.selectors, _hull(meta.our_ts))
        ts_r = narrow(tsr.selectors, _hull(meta.peer_ts))
        if not ts_i or not ts_r:
            raise ValueError("the peer's traffic selectors are outside ours")
        keys = child_keys(
            self._sa.prf_id,
            self._sa.sk_d,
            req.nonce,
            nonce.data,
            encr_key_len=suite.encr_key_len,
            integ_key_len=suite.integ_key_len,
            g_ir_new=g_ir,
        )
        from services.core.ike.exchange import ChildSaResult  # import cycle: exchange -> here

        new = ChildSaResult(
            spi_in=req.new_spi,
            spi_out=chosen.spi,
            encr_id=suite.encr,
            key_bits=suite.key_bits,
            esn=suite.esn,
            keys=keys,
            ts_i=ts_i,
            ts_r=ts_r,
            integ_id=suite.integ,
            mode=req.mode,
            dh=req.pfs_group or 0,
            protocol=suite.protocol,
        )
        return new, nonce.data

    def delete_child_queued(self, pair: tuple[bytes, bytes], *, front: bool = False) -> None:
        """Queue the Delete of ``pair`` without sending (the caller pumps)."""
        if pair[0] in self._deleting or pair not in self.children:
            return
        self._deleting.add(pair[0])
        req = _Request("delete_child", pair=pair)
        if front:
            self._queue.insert(0, req)
        else:
            self._queue.append(req)

    def _ike_rekeyed(self, req: _Request, payloads: tuple[Payload, ...]) -> None:
        """The answer to our IKE SA rekey (§1.3.2, §2.18)."""
        sa = _one(payloads, SA)
        nonce = _one(payloads, Nonce)
        ke = _one(payloads, KE)
        if sa is None or nonce is None or ke is None or len(sa.proposals) != 1:
            raise ValueError("response lacks SA, Nr or KEr")
        chosen = sa.proposals[0]
        suite = match_ike(
            Proposal(chosen.number, chosen.protocol_id, chosen.transforms), self._ike_suites
        )
        if suite is None:
            raise ValueError("the peer chose an IKE proposal we did not offer")
        if len(chosen.spi) != SPI_LEN or chosen.spi == bytes(SPI_LEN) or req.dh is None:
            raise ValueError("the peer's new IKE SPI is not 8 non-zero octets")
        if suite.dh != int(req.dh.group.transform_id) or ke.dh_group != suite.dh:
            raise ValueError("KEr in another group")
        g_ir = req.dh.shared(ke.data)
        new = self._new_ike_sa(
            suite, g_ir, req.nonce, nonce.data, req.new_spi, chosen.spi, initiator=True
        )
        theirs = self._peer_ike_rekey
        self._peer_ike_rekey = None
        if theirs is not None and min(req.nonce, nonce.data) < min(theirs.nonces):
            # §2.8.2: ours is redundant: delete it (on itself); the peer deletes the old SA
            self._others.append(new)
            self._queue.insert(0, _Request("delete_ike", sa=new))
            self._adopt_peer_ike(theirs)
            return
        old = self._sa
        self._switch(new)
        if theirs is not None:
            self._others.append(theirs)  # the peer deletes its redundant SA
        self._queue.insert(0, _Request("delete_ike", sa=old))

    def _adopt_peer_ike(self, theirs: _IkeSa) -> None:
        self._peer_ike_rekey = None
        self._switch(theirs)

    def _switch(self, new: _IkeSa) -> None:
        old = self._sa
        self._others.append(old)
        self._sa = new
        self.events.append(
            InfoEvent(
                "ike_rekeyed",
                initiated=new.initiator,
                ike_spis=new.spis,
                old_ike_spis=old.spis,
                ike_keys=new.keys,
                ike_suite=new.suite,
            )
        )

    def _new_ike_sa(
        self,
        suite: IkeSuite,
        g_ir: bytes,
        ni: bytes,
        nr: bytes,
        spi_i: bytes,
        spi_r: bytes,
        *,
        initiator: bool,
    ) -> _IkeSa:
        """Keys of a rekeyed IKE SA: SKEYSEED from the old SA's SK_d and PRF (§2.18), the rest
        with the new SA's suite (§2.14)."""
        from services.core.ike.exchange import sk_ciphers  # import cycle: exchange -> here

        seed = rekey_skeyseed(self._sa.prf_id, self._sa.sk_d, g_ir, ni, nr)
        keys = derive_ike_keys(
            suite.prf_alg,
            seed,
            ni,
            nr,
            spi_i,
            spi_r,
            encr_key_len=suite.encr_key_len,
            integ_key_len=suite.integ_key_len,
        )
        cin, cout = sk_ciphers(suite, keys, initiator=initiator)
        return _IkeSa(
            spi_i,
            spi_r,
            initiator,
            cin,
            cout,
            keys.sk_d,
            suite.prf_alg,
            0,
            0,
            nonces=(ni, nr),
            suite=suite,
            keys=keys,
        )

    def _set_child(self, new: ChildSaResult, meta: ChildPolicy, *, initiated: bool) -> None:
        """Remember a new Child SA's name, suites, negotiated selectors and mode (TSi is the
        side of whoever started the exchange: ours when ``initiated``); forget those of Child
        SAs that are gone."""
        live = {c[0] for c in self.children} | {new.spi_in}
        self._meta = {k: v for k, v in self._meta.items() if k in live}
        self._replaced &= live
        ours, theirs = (new.ts_i, new.ts_r) if initiated else (new.ts_r, new.ts_i)
        self._meta[new.spi_in] = replace(meta, our_ts=ours, peer_ts=theirs, mode=new.mode)

    # -- internals: peer requests -------------------------------------------------------------

    def _sa_of(self, spi_i: bytes, spi_r: bytes) -> _IkeSa:
        for sa in (self._sa, *self._others):
            if sa.spi_i == spi_i and sa.spi_r == spi_r:
                return sa
        if self._peer_ike_rekey is not None and self._peer_ike_rekey.spis == (spi_i, spi_r):
            return self._peer_ike_rekey
        raise InfoDrop("other IKE SA")

    def _informational(
        self, sa: _IkeSa, payloads: tuple[Payload, ...]
    ) -> tuple[list[Payload], list[InfoEvent], bool]:
        inner: list[Payload] = []
        events: list[InfoEvent] = []
        for p in payloads:
            if not isinstance(p, Delete):
                continue
            if p.protocol_id == ProtocolId.IKE:
                if sa is not self._sa:
                    return [], [], True  # a replaced or redundant IKE SA goes, not the session
                return [], [InfoEvent("ike_deleted")], True
            if p.protocol_id == self._child_protocol:  # ESP or AH, as negotiated
                for spi_in, spi_out in list(self.children):
                    if spi_out in p.spis:
                        if spi_in not in self._deleting:  # crossing Deletes: none back (§1.4.1)
                            inner.append(Delete(p.protocol_id, 4, (spi_in,)))
                        events.append(InfoEvent("child_deleted", spi_in, spi_out))
                        self.children.remove((spi_in, spi_out))
        return inner, events or [InfoEvent("liveness")], False

    def _outstanding(self, kind: str) -> _Request | None:
        return self._out if self._out is not None and self._out.kind == kind else None

    def _create_child_sa(
        self, sa: _IkeSa, payloads: tuple[Payload, ...]
    ) -> tuple[list[Payload], list[InfoEvent], Callable[[], None] | None]:
        """The peer's CREATE_CHILD_SA request (RFC 7296 §1.3): a new Child SA, Child SA and IKE
        SA rekeys."""
        rekey: Notify | None = None
        transport = False
        sa_p = ke = nonce = tsi = tsr = None
        for p in payloads:
            if isinstance(p, Notify) and p.notify_type == NotifyType.USE_TRANSPORT_MODE:
                transport = True
            elif isinstance(p, Notify) and p.notify_type == NotifyType.REKEY_SA:
                rekey = p
            elif isinstance(p, SA):
                sa_p = p
            elif isinstance(p, KE):
                ke = p
            elif isinstance(p, Nonce):
                nonce = p
            elif isinstance(p, TSi):
                tsi = p
            elif isinstance(p, TSr):
                tsr = p
        if not sa.sk_d:
            return [Notify(NotifyType.NO_ADDITIONAL_SAS)], [], None
        if sa is not self._sa or self._outstanding("delete_ike") is not None:
            return [Notify(NotifyType.TEMPORARY_FAILURE)], [], None  # this IKE SA is going
        if (
            rekey is None
            and tsi is None
            and sa_p is not None
            and any(p.protocol_id == ProtocolId.IKE for p in sa_p.proposals)
        ):
            return self._peer_ike_rekey_request(sa_p, nonce, ke)
        if rekey is None:
            return self._peer_new_child(sa, sa_p, nonce, ke, tsi, tsr, transport)
        if sa_p is None or nonce is None or tsi is None or tsr is None:
            return [Notify(NotifyType.INVALID_SYNTAX)], [], None
        # §1.3.3: REKEY_SA carries the SPI the request's sender expects inbound, i.e. the
        # peer's inbound SPI of the old Child SA = our outbound one.
        old = next((c for c in self.children if c[1] == rekey.spi), None)
        if old is None or rekey.protocol_id != self._child_protocol:
            notify = Notify(NotifyType.CHILD_SA_NOT_FOUND, b"", rekey.protocol_id, rekey.spi)
            return [notify], [], None
        if old[0] in self._deleting or self._outstanding("rekey_ike") is not None:
            return [Notify(NotifyType.TEMPORARY_FAILURE)], [], None  # §2.25
        if old[0] in self._replaced or len(self.children) >= MAX_CHILD_SAS:
            # already rekeyed (its Delete is due) / too many live Child SAs: not now (§2.25)
            return [Notify(NotifyType.TEMPORARY_FAILURE)], [], None
        meta = self._meta.get(old[0]) or ChildPolicy("", (), (), self._esp_suites)
        # §1.3.1: a rekey of a transport-mode Child SA asks for transport again; we keep the
        # mode of the Child SA (tunnel when the request does not ask for transport).
        transport_ok = transport and self.mode_of(old[0]) is Mode.TRANSPORT
        mode = Mode.TRANSPORT if transport_ok else Mode.TUNNEL
        inner, new = self._answer_child(sa, sa_p, nonce, ke, tsi, tsr, meta, mode)
        if new is None:
            return inner, [], None
        self._set_child(new, meta, initiated=False)
        self.children.append((new.spi_in, new.spi_out))
        self._replaced.add(old[0])
        ours = self._outstanding("rekey_child")
        nr = next(p.data for p in inner if isinstance(p, Nonce))
        if ours is not None and ours.pair == old:
            # a collision (§2.8.1): settled when the answer to our request arrives
            self._peer_child_rekeys[old[0]] = ((nonce.data, nr), (new.spi_in, new.spi_out))
        else:
            # the peer rekeyed it first: a rekey of ours still queued is moot
            self._queue = [
                r for r in self._queue if not (r.kind == "rekey_child" and r.pair == old)
            ]
        event = InfoEvent("child_rekeyed", old[0], old[1], new, name=meta.name)
        return inner, [event], None

    def _peer_new_child(
        self,
        sa: _IkeSa,
        sa_p: SA | None,
        nonce: Nonce | None,
        ke: KE | None,
        tsi: TSi | None,
        tsr: TSr | None,
        transport: bool,
    ) -> tuple[list[Payload], list[InfoEvent], Callable[[], None] | None]:
        """The peer creates a Child SA (§1.3.1): the first configured Child SA whose ranges
        its TSi / TSr intersect (§2.9), answered like a rekey of it."""
        if not self.policies or len(self.children) >= MAX_CHILD_SAS:
            return [Notify(NotifyType.NO_ADDITIONAL_SAS)], [], None
        if sa_p is None or nonce is None or tsi is None or tsr is None:
            return [Notify(NotifyType.INVALID_SYNTAX)], [], None
        if self._outstanding("rekey_ike") is not None:
            return [Notify(NotifyType.TEMPORARY_FAILURE)], [], None  # §2.25
        policy = next(
            (
                pol
                for pol in self.policies
                if narrow(tsi.selectors, _hull(pol.peer_ts))
                and narrow(tsr.selectors, _hull(pol.our_ts))
            ),
            None,
        )
        if policy is None:
            return [Notify(NotifyType.TS_UNACCEPTABLE)], [], None
        if policy.mode is Mode.TRANSPORT and not transport:
            # as in IKE_AUTH: the RFC gives us no way to impose transport mode
            return [Notify(NotifyType.NO_PROPOSAL_CHOSEN)], [], None
        mode = Mode.TRANSPORT if transport and policy.mode is Mode.TRANSPORT else Mode.TUNNEL
        inner, new = self._answer_child(sa, sa_p, nonce, ke, tsi, tsr, policy, mode)
        if new is None:
            return inner, [], None
        self._set_child(new, policy, initiated=False)
        self.children.append((new.spi_in, new.spi_out))
        return inner, [InfoEvent("child_created", child=new, name=policy.name)], None

    def _answer_child(
        self,
        sa: _IkeSa,
        offer: SA,
        nonce: Nonce,
        ke: KE | None,
        tsi: TSi,
        tsr: TSr,
        meta: ChildPolicy,
        mode: Mode,
    ) -> tuple[list[Payload], ChildSaResult | None]:
        """Our answer to the peer's CREATE_CHILD_SA for a Child SA (new or rekey, §1.3.1,
        §1.3.3): the first of ``meta``'s ESP suites the offer contains (PFS in the KE's group;
        INVALID_KE_PAYLOAD naming a group we take, else NO_PROPOSAL_CHOSEN), the selectors
        narrowed to ``meta``'s (§2.9; else TS_UNACCEPTABLE), our SPI, Nr, [KEr], and the new
        Child SA's keys (§2.17 with the peer as initiator). (error answer, None) on refusal."""
        our_spi = self._new_child_spi()
        picked = choose_esp(
            offer.proposals,
            meta.esp_suites,
            our_spi,
            ke.dh_group if ke is not None else None,
            create_child=True,
        )
        if picked is None:
            hint = esp_ke_hint(offer.proposals, meta.esp_suites) if ke is not None else None
            if hint is not None and ke is not None and hint != ke.dh_group:
                # §1.3: the KE is in a group we do not take, but one we take is offered
                data = hint.to_bytes(2, "big")
                return [Notify(NotifyType.INVALID_KE_PAYLOAD, data)], None
            return [Notify(NotifyType.NO_PROPOSAL_CHOSEN)], None
        ts_i = narrow(tsi.selectors, _hull(meta.peer_ts))
        ts_r = narrow(tsr.selectors, _hull(meta.our_ts))
        if not ts_i or not ts_r:
            return [Notify(NotifyType.TS_UNACCEPTABLE)], None
        g_ir: bytes | None = None
        inner: list[Payload] = [SA((picked.answer,))]
        if mode is Mode.TRANSPORT:
            inner.insert(0, Notify(NotifyType.USE_TRANSPORT_MODE))
        nr = self._rand(_NONCE_LEN)
        inner.append(Nonce(nr))
        if ke is not None:
            dh = group(ke.dh_group).generate(self._rand)
            try:
                g_ir = dh.shared(ke.data)
            except InvalidKeyExchange:  # RFC 6989 checks failed: a malformed request
                return [Notify(NotifyType.INVALID_SYNTAX)], None
            inner.append(KE(ke.dh_group, dh.public_bytes()))
        inner += [TSi(ts_i), TSr(ts_r)]
        keys = child_keys(
            sa.prf_id,
            sa.sk_d,
            nonce.data,
            nr,
            encr_key_len=picked.suite.encr_key_len,
            integ_key_len=picked.suite.integ_key_len,
            g_ir_new=g_ir,
        )
        from services.core.ike.exchange import ChildSaResult  # import cycle: exchange -> here

        new = ChildSaResult(
            spi_in=our_spi,
            spi_out=picked.offered.spi,
            encr_id=picked.suite.encr,
            key_bits=picked.suite.key_bits,
            esn=picked.suite.esn,
            keys=keys,
            ts_i=ts_i,
            ts_r=ts_r,
            integ_id=picked.suite.integ,
            mode=mode,
            dh=picked.dh,
            protocol=picked.suite.protocol,
        )
        return inner, new

    def _peer_ike_rekey_request(
        self, offer: SA, nonce: Nonce | None, ke: KE | None
    ) -> tuple[list[Payload], list[InfoEvent], Callable[[], None] | None]:
        """The peer rekeys the IKE SA (§1.3.2): SA (with the new SPIi), Ni, KEi. Answered with
        the first of our IKE suites the offer contains."""
        if nonce is None or ke is None:
            return [Notify(NotifyType.INVALID_SYNTAX)], [], None
        if (
            self._outstanding("rekey_child") is not None
            or self._outstanding("create_child") is not None
            or self._outstanding("delete_child") is not None
        ):
            return [Notify(NotifyType.TEMPORARY_FAILURE)], [], None  # a Child SA task first
        usable = [
            p
            for p in offer.proposals
            if p.protocol_id == ProtocolId.IKE and len(p.spi) == SPI_LEN and any(p.spi)
        ]
        # the chooser takes IKE_SA_INIT offers (no SPI): offer the proposals without it
        picked = choose_ike(
            [Proposal(p.number, p.protocol_id, p.transforms) for p in usable],
            self._ike_suites,
            ke.dh_group,
        )
        if picked is None:
            return [Notify(NotifyType.NO_PROPOSAL_CHOSEN)], [], None
        chosen, suite = picked
        their_spi = next(p.spi for p in usable if p.number == chosen.number)
        dh_id = suite.dh
        if ke.dh_group != dh_id:
            return [Notify(NotifyType.INVALID_KE_PAYLOAD, dh_id.to_bytes(2, "big"))], [], None
        dh = group(dh_id).generate(self._rand)
        try:
            g_ir = dh.shared(ke.data)
        except InvalidKeyExchange:  # RFC 6989 checks failed: a malformed request
            return [Notify(NotifyType.INVALID_SYNTAX)], [], None
        our_spi = self._new_ike_spi()
        nr = self._rand(_NONCE_LEN)
        answer = Proposal(chosen.number, ProtocolId.IKE, chosen.transforms, our_spi)
        new = self._new_ike_sa(suite, g_ir, nonce.data, nr, their_spi, our_spi, initiator=False)
        inner: list[Payload] = [SA((answer,)), Nonce(nr), KE(dh_id, dh.public_bytes())]
        if self._outstanding("rekey_ike") is not None:
            self._peer_ike_rekey = new  # a collision (§2.8.2): settled by our answer
            return inner, [], None
        return inner, [], lambda: self._switch(new)


def _one(payloads: tuple[Payload, ...], cls: type[_P]) -> _P | None:
    return next((p for p in payloads if isinstance(p, cls)), None)
