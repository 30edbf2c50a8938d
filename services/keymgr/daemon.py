"""The keymgr daemon: IKEv2 initiator sessions whose datagrams travel through a dataplane
worker's punt/inject stream, and whose Child SAs are installed into that worker.

Flow per connection with ``start_action == "start"`` (RFC 7296 §1.2):

1. an :class:`~services.core.ike.exchange.Ikev2Initiator` produces IKE_SA_INIT; keymgr injects
   it through the worker's Punt stream from (local_addr, 500) to (remote_addr, 500);
2. punted datagrams whose (local, remote) address pair matches the connection are fed to
   ``receive()``; after ``port_float`` (the responder sent NAT-D) IKE moves to UDP 4500 — the
   worker adds and strips the RFC 3948 non-ESP marker itself, so keymgr never sees it;
3. ``on_timer()`` drives retransmission;
4. on ESTABLISHED the inbound and outbound ESP SAs (the negotiated ESP suite and mode, tunnel or
   transport; ESP-in-UDP 4500/4500 when IKE floated) and one SPD PROTECT entry are installed
   with a shared reqid.

IKE and ESP proposals, mode and identities come from the connection (``ike_proposals``,
``esp_proposals``, ``mode``, ``local_id`` / ``remote_id``); addresses may be IPv4 or IPv6.

Responder role, per connection with ``start_action`` ``"none"`` / ``"respond"``: a punted
IKE_SA_INIT request whose (local, remote) address pair matches the connection starts an
:class:`~services.core.ike.responder.Ikev2Responder`, keyed by the initiator's IKE SPI; its
answers go back through punt-inject on the ports the request arrived on (500, or 4500 after
the initiator floated). Before a responder is created a
:class:`~services.core.ike.cookies.CookieGuard` is asked (RFC 7296 §2.6): from
``cookie_threshold`` half-open responders on, an IKE_SA_INIT without a valid COOKIE gets a
stateless COOKIE response instead. At most ``MAX_HALF_OPEN`` responders may be half-open (not
yet ESTABLISHED) whatever the cookies say; further IKE_SA_INIT requests are dropped and counted.
Half-open responders expire after ``HALF_OPEN_TIMEOUT``. On ESTABLISHED the same
installation path as the initiator's runs, with the keys of the responder's side; the IKE_AUTH
response is held until the worker applied the install (so the peer's first ESP packet finds the
SAs, as with strongSwan), while other datagrams are handled meanwhile.

Worker calls: every change of the worker's SAD/SPD (install, rekey, delete, DPD, operator
terminate, shutdown) is ONE atomic ApplySAs call (both SAs, plus the connection's SPD entry
only when it is not installed already or must be withdrawn), sent without waiting; its answer
comes back through the main loop's queue, where the caller's continuation logs and publishes
the result. A call for an IKE SA first waits for that IKE SA's call still in flight, and an SPD
change for earlier SPD changes in flight, so a Delete never overtakes the install of the same
SAs and SPD revisions reach the worker in order. The batches made in one turn of the main loop
(the datagrams and answers queued at that moment) leave together in one joined ApplySAs call; if
the worker refuses it (nothing applied), each batch is sent again alone.

After ESTABLISHED (RFC 7296 §1.4): punted datagrams are routed to their IKE SA by the SPIs in
the IKE header and INFORMATIONAL requests are answered by the core. A peer's Delete of the
Child SA removes both ESP SAs from the worker and withdraws the connection's SPD entry (a
higher SPD revision) unless another IKE SA of the connection still has a Child SA under
it; a Delete of the IKE SA does the same for all of its Child
SAs (the connection is not initiated again). ``stop()`` (SIGTERM) sends a Delete of the IKE SA
for every established IKE SA, waits up to ``SHUTDOWN_WAIT`` for the responses, then removes the
SAs from the worker.

A CHILD SA rekey (CREATE_CHILD_SA, RFC 7296 §2.8), started by the peer or by us, installs the
new pair under the same reqid and removes the old pair once its Delete completed
(make-before-break). Lifetimes per connection: the CHILD SA is rekeyed at ``rekey_time`` (minus
a random part of ``rand_time``) or when the worker reports a soft byte/packet expiry, and
deleted at ``life_time``; the IKE SA is rekeyed at ``ike_rekey_time`` (RFC 7296 §2.18), after
which its datagrams are routed by the new SPIs. With ``dpd_delay`` an idle IKE SA gets a
liveness check; a request never answered means the peer is dead and ``dpd_action`` applies
(clear, restart, or hold/trap: keep the policy and initiate again on the worker's ACQUIRE).

Operator commands (services/keymgr/api.py) run on the main loop too: a gRPC thread hands a
callable to :meth:`Keymgr.submit`, which queues it next to the punted datagrams and returns a
future. Every SA lifecycle step is published on :attr:`Keymgr.events` (up, down, child_up,
child_down, rekeyed, auth_failed, negotiation_failed). With a :class:`KeyExporter` the IKE and
ESP keys of each new SA are appended to its file (troubleshooting only, off by default).

Authentication (PSK or certificates, :mod:`services.keymgr.credentials`) is read from the
connection's files again whenever one of them changed (checked with stat each time an IKE SA
starts), so rotated secrets and certificates are used;
an authentication failure is logged with the core's reason (untrusted CA, revoked, identity
not in the certificate, wrong PSK, ...).

Sequence-number leases (with a :class:`~services.keymgr.leases.LeaseStore`): every outbound SA
is installed with the lease [1, ``seq_lease_block``] and extended by one block on the worker's
LeaseLow, each new high-water mark made durable before the worker gets it; at the end of the
sequence space, or when the store fails, the Child SA is rekeyed instead. When NAT detection
found us behind a NAT, outbound ESP-in-UDP SAs carry the connection's NAT keepalive interval.
Child SAs (RFC 7296 §1.3.1): a connection's first child (``Connection.child_names``) is
negotiated in IKE_AUTH; once the IKE SA is up, an initiator creates its other children with
``start_action`` start by CREATE_CHILD_SA, and a child with ``trap`` gets its PROTECT entry
without SAs, whose ACQUIRE creates it (initiating the IKE SA first when there is none). The
peer may create any configured child (:meth:`InfoSession.configure_children`). Every child
has its own reqid, SPD entry (the first child's is keyed by the connection's name, as before),
SAs, lifetimes and events; the operator can create and delete one child by name.

Reqids come from the configuration (:func:`~services.keymgr.config.connection_reqids`:
explicit ones, as policyd's compiled connections carry, else positional). Policy mode
(``policy_mode``, docs/keymgr.md "Policy mode"): the worker's SPD policy layer holds the
PROTECT entries, so keymgr sends no SPD change at all and only installs SAs under the policy's
reqids. :meth:`Keymgr.reconfigure` replaces the connections live: removed ones have their IKE
SAs deleted, added ones start, changed ones both, unchanged ones are not touched. Several
workers run one Keymgr each (``ike_sa_ids`` keeps the operator's IKE SA IDs apart).

Scope: one IKE SA per connection. Keys are never logged: only SPIs appear in logs.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import math
import os
import queue
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import grpc

from services.core.events import Acquire, ExpiryKind, HardExpire, LeaseLow, SoftExpire
from services.core.iana import Integ, IpProto
from services.core.ike.authn import LocalAuth, PeerAuth
from services.core.ike.child import ChildPolicy
from services.core.ike.constants import ExchangeType
from services.core.ike.cookies import DEFAULT_PERIOD, DEFAULT_THRESHOLD, CookieGuard
from services.core.ike.dh import DhGroupId
from services.core.ike.exchange import (
    AH_NAT_REASON,
    NAT_T_PORT,
    ChildSaResult,
    IkeSaResult,
    Ikev2Initiator,
    InitiatorConfig,
    State,
)
from services.core.ike.informational import InfoEvent, InfoSession
from services.core.ike.keys import IkeKeys
from services.core.ike.message import IkeDecodeError, IkeHeader, decode_header, version_answer
from services.core.ike.prf import Prf
from services.core.ike.responder import Ikev2Responder, ResponderConfig, ResponderState
from services.core.ike.suites import DEFAULT_IKE, IkeSuite
from services.core.sa import Direction, Lifetime, SaConfig, UdpEncap
from services.core.selectors import Selector
from services.core.spd import Action, SpdEntry
from services.dataplane.client import (
    ApplyFuture,
    DataplaneClient,
    EventStream,
    IkeDatagram,
    PuntStream,
    WorkerEvent,
)
from services.dataplane.convert import MAX_BATCH_DELETES, MAX_BATCH_INSTALLS
from services.keymgr import events as ev
from services.keymgr.config import ConfigError, Connection, connection_reqids
from services.keymgr.credentials import authentication
from services.keymgr.events import ChildSaView, EventBus, IkeSaView, KeyExporter, KeymgrEvent
from services.keymgr.leases import (
    DEFAULT_BLOCK,
    LeaseKey,
    LeaseStore,
    LeaseStoreError,
    first_lease,
    next_lease,
)

log = logging.getLogger("keymgr")

IKE_PORT = 500
SPD_PRIORITY = 100
RETRY_AFTER_FAILURE = 5.0  # seconds before a failed connection is initiated again
TICK = 0.5  # longest wait for a punted datagram when no retransmit is due
# The timers (retransmissions, lifetimes, liveness, half-open expiry) visit every IKE SA: the
# main loop sweeps them when the earliest deadline is due and otherwise at most this often
# after handling something, not once per datagram (IKE timers are of seconds).
SWEEP_INTERVAL = 0.05
BURST = 32  # queued items the main loop handles in one turn at most
MAX_HALF_OPEN = 64  # responders not yet ESTABLISHED; more IKE_SA_INITs are dropped
HALF_OPEN_TIMEOUT = 30.0  # seconds a half-open (or failed) responder is kept
SHUTDOWN_WAIT = 2.0  # seconds to wait for the peers' responses to our Delete on stop()
MAX_RESPONDERS = 1024  # all responder IKE SAs kept (established ones answer liveness checks)
MAX_EXPORTED_IKE = 65536  # SPI pairs remembered so each IKE SA's keys are exported once
REKEY_RETRY = 10.0  # seconds before a rekey that failed is tried again
IKE_RAND_FRACTION = 0.1  # an IKE SA rekey starts up to 10 % of ike_rekey_time early
COOKIE_LOG_INTERVAL = 5.0  # at most one "ike cookies" counters line per this many seconds
TERMINATE_WAIT = 5.0  # seconds an operator's Delete of an IKE SA waits for the peer's response
T = TypeVar("T")
# the core's IKE SA states as the operator API names them
_STATE_NAMES = {
    "initial": "connecting",
    "sa_init_sent": "connecting",
    "auth_sent": "connecting",
    "wait_sa_init": "connecting",
    "wait_auth": "connecting",
}


class KeymgrStopped(RuntimeError):
    """keymgr's main loop is not running (stopping, or stopped): commands cannot run."""


@dataclass
class _Call:
    """A command from another thread, run on the main loop with the current time."""

    fn: Callable[[float], Any]
    future: Future[Any]


_SaRef = tuple[int, bytes, int, Direction]  # an SA to delete: SPI, destination, protocol, direction


@dataclass(eq=False)
class _Apply:
    """One ApplySAs batch in flight for IKE SA ``key`` (None: the SPD alone). ``then(error)``
    runs on the main loop once the worker answered (error None on success)."""

    key: bytes | None
    future: ApplyFuture | None
    then: Callable[[BaseException | None], object]
    spd_before: dict[str, SpdEntry] | None  # the SPD to restore if the batch is refused
    started: float
    error: BaseException | None = None
    done: bool = False
    leases_freed: tuple[LeaseKey, ...] = ()  # outbound SAs deleted: their marks go once done
    leases_granted: tuple[LeaseKey, ...] = ()  # outbound SAs installed: marks go if refused
    # deletes only (no install, no SPD change): removals queued meanwhile join the next one
    removal: bool = False
    # the request (installs, deletes, SPD batch), kept until it is sent (see Keymgr._flush)
    request: tuple[tuple[SaConfig, ...], list[_SaRef], tuple[list[SpdEntry], int] | None] = (
        (),
        [],
        None,
    )
    # the batches sent together with this one in one call (None: sent alone)
    group: list[_Apply] | None = None


class RandomPool:
    """Random octets for the IKE core (its ``rand``): ``os.urandom`` read in blocks of
    ``block`` octets and handed out in order, each octet once. One system call per block
    instead of several per handshake; each such call lets the process's other threads take
    the interpreter lock, which the IKE loop then waits to get back."""

    def __init__(self, block: int = 4096) -> None:
        self.block = block
        self._buf = b""
        self._pos = 0
        self._lock = threading.Lock()

    def __call__(self, n: int) -> bytes:
        if n > self.block // 4:
            return os.urandom(n)
        with self._lock:
            if self._pos + n > len(self._buf):
                self._buf, self._pos = os.urandom(self.block), 0
            out = self._buf[self._pos : self._pos + n]
            self._pos += n
            return out


class _Outbox:
    """keymgr's side of the punt stream: between hold() and release() (one turn of the main
    loop) the datagrams to inject are kept and then handed over together, so the stream
    sends them in one message; otherwise each goes at once."""

    def __init__(self, stream: PuntStream) -> None:
        self.stream = stream
        self._held: list[IkeDatagram] | None = None

    def send(self, d: IkeDatagram) -> None:
        if self._held is None:
            self.stream.send(d)
        else:
            self._held.append(d)

    def hold(self) -> None:
        if self._held is None:
            self._held = []

    def release(self) -> None:
        held, self._held = self._held, None
        if held:
            send_many = getattr(self.stream, "send_many", None)
            if send_many is not None:
                send_many(held)
            else:
                for d in held:
                    self.stream.send(d)


@dataclass
class IkeRecord:
    """An established IKE SA as the operator API shows it (no keys)."""

    id: int
    conn: Connection
    role: str
    spi_i: bytes
    spi_r: bytes
    port: int
    established_at: float  # seconds since the epoch
    child_installed_at: float
    suite: IkeSuite = DEFAULT_IKE  # the negotiated IKE algorithms
    closing: str = ""  # why we sent a Delete of this IKE SA ("" = we did not)
    close_deadline: float = 0.0
    resend_at: float = 0.0


@dataclass
class _Child:
    """One installed Child SA of an IKE SA: the child's view of its connection
    (:meth:`Connection.child`), its name, the key of its SPD entry, and the installed pair."""

    conn: Connection
    name: str
    spd_key: str
    pair: tuple[SaConfig, SaConfig]
    installed_at: float  # seconds since the epoch


@dataclass
class Session:
    """One connection's IKE SA attempt and what was installed for it."""

    conn: Connection
    reqid: int
    initiator: Ikev2Initiator | None = None
    installed: bool = False
    retry_at: float | None = None
    spd: SpdEntry | None = None
    spis: dict[str, str] = field(default_factory=dict)
    held: bool = False  # dpd_action hold/trap: initiate again on the worker's ACQUIRE
    installing: bool = False  # the Child SA's ApplySAs is in flight
    want: set[str] = field(default_factory=set)  # children to create once the IKE SA is up


@dataclass
class IkeSaState:
    """Lifetimes and liveness of one established IKE SA (either role). ``key`` is SPIi | SPIr
    as of IKE_AUTH (the key of the installed Child SAs; it survives IKE SA rekeys)."""

    conn: Connection
    key: bytes
    role: str
    result: IkeSaResult
    info: InfoSession
    send: Callable[[list[bytes]], None]
    session: Session | None = None
    responder: ResponderSession | None = None
    ike_rekey_at: float = math.inf
    child_rekey_at: dict[bytes, float] = field(default_factory=dict)  # our inbound SPI -> when
    child_hard_at: dict[bytes, float] = field(default_factory=dict)


@dataclass
class ResponderSession:
    """One IKE SA that a peer initiated towards a responder connection."""

    conn: Connection
    reqid: int
    responder: Ikev2Responder
    installed: bool = False
    installing: bool = False  # the Child SA's ApplySAs is in flight (IKE_AUTH response held)
    port: int = IKE_PORT  # the UDP port IKE uses (500, or 4500 after the initiator floated)
    dropped: bool = False  # its connection was removed by reconfigure()


class Keymgr:
    """Drives the sessions for a set of connections over one worker connection.

    ``run()`` blocks until ``stop()`` is called. All IKE state is touched from the thread that
    runs ``run()``; a helper thread only moves punted datagrams into a queue.
    """

    def __init__(
        self,
        client: DataplaneClient,
        connections: tuple[Connection, ...],
        *,
        clock: Callable[[], float] = time.monotonic,
        cookie_threshold: int = DEFAULT_THRESHOLD,
        cookie_period: float = DEFAULT_PERIOD,
        events: EventBus | None = None,
        key_export: KeyExporter | None = None,
        jitter: Callable[[float], float] | None = None,
        leases: LeaseStore | None = None,
        seq_lease_block: int = DEFAULT_BLOCK,
        policy_mode: bool = False,
        ike_sa_ids: tuple[int, int] = (0, 1),
    ) -> None:
        self.client = client
        # policy mode: the worker's SPD comes from policyd (its policy layer); keymgr never
        # sends SPD changes, only SAs under the policy's reqids
        self.policy_mode = policy_mode
        self.policy_revision = 0  # the policy revision last applied by reconfigure()
        # sequence-number leases of outbound SAs (None: whole sequence space, no durable marks)
        self.leases = leases
        self.seq_lease_block = seq_lease_block
        first_lease(seq_lease_block, False)  # ValueError for a block below 1
        self.lease_extensions = 0  # leases extended on the worker's LeaseLow
        self.clock = clock
        # RFC 7296 §2.6 COOKIEs for the responder role (its secret is never logged)
        self.cookies = CookieGuard(now=clock(), threshold=cookie_threshold, period=cookie_period)
        self._cookie_logged: tuple[float, tuple[int, ...]] = (float("-inf"), (0, 0, 0, 0))
        self.events = events if events is not None else EventBus()
        self.key_export = key_export
        self._exported_ike: set[bytes] = set()  # SPIi | SPIr of IKE SAs whose keys were exported
        self.records: dict[bytes, IkeRecord] = {}  # established IKE SAs, key SPIi | SPIr
        # operator IDs of IKE SAs: base + k * step, so several shards of one process (one per
        # worker, sharing one API) never hand out the same ID
        self._next_id, self._id_step = ike_sa_ids
        self.rand = RandomPool()  # SPIs, nonces and DH private keys of new IKE SAs
        # a random delay in [0, x] (rekey jitter, strongSwan's rand_time)
        self.jitter = jitter or (lambda x: random.uniform(0.0, x) if x > 0 else 0.0)  # noqa: S311
        self._ikes: dict[bytes, IkeSaState] = {}  # established IKE SAs by ``key``
        self._wev: queue.Queue[WorkerEvent] = queue.Queue()
        self._events: EventStream | None = None
        reqids = connection_reqids(connections)  # ConfigError for clashing reqids
        self.sessions = [Session(c, reqid=reqids[c.name][0]) for c in connections if not c.responds]
        self.responder_conns = [(c, reqids[c.name][0]) for c in connections if c.responds]
        # keyed by the initiator's IKE SPI (from the IKE header)
        self.responders: dict[bytes, ResponderSession] = {}
        self.half_open_dropped = 0  # IKE_SA_INIT requests refused by the MAX_HALF_OPEN bound
        # per connection: datagrams a responder dropped after the IKE header was read, and
        # requests it refused with an error Notify (RFC 7296 §2.5, §2.21)
        self.responder_drops: dict[str, int] = {}
        self.responder_error_answers: dict[str, int] = {}
        self._drops_logged: tuple[float, tuple[int, int]] = (float("-inf"), (0, 0))
        self._spd: dict[str, SpdEntry] = {}  # installed PROTECT entry per connection name
        self._rx: queue.Queue[IkeDatagram | _Call | _Apply] = queue.Queue()
        # ApplySAs batches in flight, in the order they were sent (at most one per IKE SA)
        self._pending: list[_Apply] = []
        # removals waiting for the removal batch in flight: (continuation, SAs to delete)
        self._removals: list[tuple[Callable[[BaseException | None], object], tuple[SaConfig, ...]]]
        self._removals = []
        # worker round trips: count, total and longest seconds from request to answer
        self.apply_stats = [0, 0.0, 0.0]
        # batches made during one turn of the main loop, sent together at its end (see _flush);
        # None: each is sent at once
        self._staged: list[_Apply] | None = None
        self.apply_calls = 0  # ApplySAs calls sent (a joined call counts once)
        self._auth_cache: dict[str, tuple[tuple[Any, ...], tuple[LocalAuth, PeerAuth]]] = {}
        self._responder_cfgs: dict[
            str, tuple[Connection, tuple[LocalAuth, PeerAuth], ResponderConfig]
        ] = {}
        self._stop = threading.Event()
        self._stream: PuntStream | _Outbox | None = None
        self._spd_revision = 0
        # (connection, child) -> (reqid, SPD entry key): a connection's first child has the
        # connection's name as SPD key (reqids: config.connection_reqids)
        self._child_ids: dict[tuple[str, str], tuple[int, str]] = {}
        for c in connections:
            self._set_child_ids(c, reqids[c.name])
        # installed Child SAs per (IKE SA key SPIi | SPIr, child name)
        self._children: dict[tuple[bytes, str], _Child] = {}
        # Child SAs replaced by a rekey, kept until the peer deletes them (make-before-break)
        self._retiring: dict[tuple[bytes, str], list[tuple[SaConfig, SaConfig]]] = {}
        self.failed = False  # the punt stream broke (worker gone): the caller should exit non-zero

    def _set_child_ids(self, c: Connection, reqids: tuple[int, ...]) -> None:
        for j, (child, reqid) in enumerate(zip(c.child_names, reqids, strict=True)):
            # names are printable: a newline cannot make two keys equal
            self._child_ids[(c.name, child)] = (reqid, c.name if j == 0 else f"{c.name}\n{child}")

    # --- lifecycle --------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask run() to return; it first deletes the established IKE SAs (see _shutdown)."""
        self._stop.set()

    def submit(self, fn: Callable[[float], T]) -> Future[T]:
        """Run ``fn(now)`` on the main loop (thread-safe); its result or exception arrives in
        the returned future. Raises :class:`KeymgrStopped` once keymgr is stopping."""
        if self._stop.is_set():
            raise KeymgrStopped("keymgr is stopping")
        fut: Future[T] = Future()
        self._rx.put(_Call(fn, fut))
        return fut

    def _run_call(self, call: _Call, now: float) -> None:
        if not call.future.set_running_or_notify_cancel():
            return
        try:
            call.future.set_result(call.fn(now))
        except Exception as e:
            call.future.set_exception(e)

    def _refuse_calls(self) -> None:
        """Fail the commands still queued (run() is ending)."""
        while True:
            try:
                item = self._rx.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Apply):
                self._finish(item)
            elif isinstance(item, _Call) and item.future.set_running_or_notify_cancel():
                item.future.set_exception(KeymgrStopped("keymgr is stopping"))

    def _reader(self, stream: PuntStream) -> None:
        try:
            for d in stream:
                self._rx.put(d)
        except grpc.RpcError as e:
            if not self._stop.is_set():
                log.error("punt stream ended", extra={"code": str(e.code())})
                self.failed = True
                self._stop.set()
        except Exception:
            if not self._stop.is_set():
                log.exception("punt stream reader failed")
                self.failed = True
                self._stop.set()
            return
        if not self._stop.is_set():
            log.error("punt stream closed by the worker")
            self.failed = True
            self._stop.set()

    def run(self) -> None:
        self.client.wait_ready(timeout=30.0)
        stream = self.client.punt()
        outbox = _Outbox(stream)
        self._stream = outbox
        reader = threading.Thread(target=self._reader, args=(stream,), daemon=True)
        reader.start()
        log.info("punt stream connected", extra={"target": self.client.target})
        self._watch_events()
        if self.leases is not None and len(self.leases):
            # SAs of an earlier run: never resumed with a guessed counter; new SAs are
            # negotiated instead, and the old marks stay in the store
            log.warning(
                "sequence leases of an earlier run not resumed", extra={"sas": len(self.leases)}
            )
        try:
            now = self.clock()
            for s in self.sessions:
                self._start(s, now)
            sweep_at = now  # the timers' next sweep (see SWEEP_INTERVAL)
            while not self._stop.is_set():
                try:
                    d = self._rx.get(timeout=max(0.0, sweep_at - self.clock()))
                except queue.Empty:
                    d = None
                # what else is queued already is handled in the same turn, and the datagrams
                # it makes leave together (one punt stream message, see _Outbox)
                burst = [d]
                while d is not None and len(burst) < BURST:
                    try:
                        burst.append(self._rx.get_nowait())
                    except queue.Empty:
                        break
                outbox.hold()
                self._staged = []
                try:
                    now = self.clock()
                    for d in burst:
                        now = self.clock()
                        if isinstance(d, _Call):
                            self._run_call(d, now)
                        elif isinstance(d, _Apply):
                            self._finish(d)
                        elif d is not None:
                            self._dispatch(d, now)
                    handled = burst[0] is not None or not self._wev.empty()
                    self._worker_events(now)
                    if now >= sweep_at:
                        self._timers(now)
                        sweep_at = now + max(self._wait(), SWEEP_INTERVAL)
                    elif handled:
                        # what was just handled may have set an earlier deadline
                        sweep_at = min(sweep_at, now + SWEEP_INTERVAL)
                finally:
                    self._flush(keep=False)
                    outbox.release()
            if not self.failed:
                self._shutdown()
        finally:
            self._settle_all()
            stream.cancel()
            if self._events is not None:
                self._events.cancel()
            reader.join(timeout=2.0)
            for rec in list(self.records.values()):
                self._down(rec, "keymgr stopped")
            self._refuse_calls()

    # --- sessions ---------------------------------------------------------------------------

    def _start(self, s: Session, now: float) -> None:
        """Start an initiating connection per its start_action (and its trap children)."""
        if s.conn.start_action == "trap":
            self._trap(s, now)
        else:
            self._initiate(s, now)
        for child in s.conn.child_names[1:]:
            if s.conn.child(child).start_action == "trap":
                self._trap_child(s, child)

    def _wait(self) -> float:
        now = self.clock()
        deadline = now + TICK
        for s in self.sessions:
            ini = s.initiator
            if ini is not None and ini.next_timeout is not None:
                deadline = min(deadline, ini.next_timeout)
            if s.retry_at is not None:
                deadline = min(deadline, s.retry_at)
        for st in self._ikes.values():
            deadline = min(deadline, self._next_lifetime_event(st))
        return max(0.0, deadline - now)

    def _initiate(self, s: Session, now: float) -> None:
        c = s.conn
        try:
            mine, theirs = self._authentication(c)
            first = c.child(c.child_names[0])  # the child that goes in IKE_AUTH
            cfg = InitiatorConfig(
                local_addr=c.local_addr,
                remote_addr=c.remote_addr,
                local_auth=mine,
                peer_auth=theirs,
                ts_local=first.ts_range("local"),
                ts_remote=first.ts_range("remote"),
                local_id=c.local_id,
                remote_id=c.remote_id,
                ike_suites=c.ike_suites,
                esp_suites=first.child_suites,
                mode=first.sa_mode,
                fragment_size=c.fragment_size,
            )
        except ValueError as e:
            log.error("cannot start connection", extra={"conn": c.name, "reason": str(e)})
            s.retry_at = now + RETRY_AFTER_FAILURE
            return
        ini = Ikev2Initiator(cfg, now=now, rand=self.rand)
        s.initiator = ini
        s.retry_at = None
        log.info(
            "ike initiating",
            extra={
                "conn": c.name,
                "spi_i": ini.spi_i.hex(),
                "remote": c.remote_addr,
                "ike_proposals": ",".join(c.ike_proposals),
                ("ah_proposals" if c.ah else "esp_proposals"): ",".join(c.child_proposals),
                "mode": c.mode,
            },
        )
        self._send(s, ini.start(now))

    def _send(self, s: Session, datagrams: list[bytes]) -> None:
        ini = s.initiator
        assert ini is not None and self._stream is not None
        port = NAT_T_PORT if ini.port_float else IKE_PORT
        for data in datagrams:
            self._stream.send(IkeDatagram(s.conn.local_addr, port, s.conn.remote_addr, port, data))

    def _dispatch(self, d: IkeDatagram, now: float) -> None:
        for c, reqid in self.responder_conns:
            if _matches(d, c):
                self._respond(c, reqid, d, now)
                return
        if self.responders and self._peer_ike_sa(d, now):
            return
        for s in self.sessions:
            c = s.conn
            if not _matches(d, c):
                continue
            if _is_sa_init_request(d):
                # the peer initiates (its traffic came first, or both sides' traps fired): a
                # start/trap connection answers like a responder one, as strongSwan does
                self._respond(c, s.reqid, d, now)
                return
            ini = s.initiator
            if ini is not None and ini.state is State.ESTABLISHED:
                self._established_datagram(s, ini, d, now)
                return
            if ini is None or ini.state not in (State.SA_INIT_SENT, State.AUTH_SENT):
                log.debug("ignoring IKE datagram", extra={"conn": c.name})
                return
            before = ini.retries
            self._send(s, ini.receive(d.data, now))
            self._export_sa_keys(ini)
            after = ini.retries
            if after[:2] != before[:2]:
                log.info(
                    "ike_sa_init resent",
                    extra={
                        "conn": c.name,
                        "reason": "INVALID_KE_PAYLOAD" if after[0] != before[0] else "COOKIE",
                        "dh_group": after[2],
                    },
                )
            self._check(s, now)
            return
        log.debug("IKE datagram for no connection", extra={"remote": d.remote_addr})

    def _peer_ike_sa(self, d: IkeDatagram, now: float) -> bool:
        """A datagram of an IKE SA that the peer initiated towards one of our start/trap
        connections (answered with :meth:`_respond`); True when it was handled."""
        try:
            hdr = decode_header(d.data)
        except IkeDecodeError:
            return False
        rs = self.responders.get(hdr.spi_i)
        if rs is None or rs.conn.responds or not _matches(d, rs.conn):
            return False
        self._respond(rs.conn, rs.reqid, d, now)
        return True

    # --- responder role --------------------------------------------------------------------

    def _half_open(self) -> int:
        """Responder IKE SAs not ESTABLISHED (waiting for IKE_AUTH, or failed and not expired)."""
        return sum(
            1
            for r in self.responders.values()
            if r.responder.state is not ResponderState.ESTABLISHED
        )

    def _cookie_gate(self, c: Connection, d: IkeDatagram, now: float) -> bool:
        """Ask the cookie guard about a new IKE_SA_INIT; True when it was answered (a stateless
        COOKIE response) or dropped, so no responder may be created for it."""
        was = self.cookies.demanding
        remote_ip = _packed(d.remote_addr)
        reply = self.cookies.check(d.data, remote_ip, now, self._half_open())
        if self.cookies.demanding != was:
            log.warning(
                "ike cookies demanded"
                if self.cookies.demanding
                else "ike cookies no longer demanded",
                extra={"conn": c.name, "half_open": self._half_open()},
            )
        if reply is None:
            return False
        if reply and self._stream is not None:
            self._stream.send(
                IkeDatagram(d.local_addr, d.local_port, d.remote_addr, d.remote_port, reply)
            )
        self._cookie_report(now)
        return True

    def _cookie_report(self, now: float) -> None:
        """Log the cookie counters when they changed, at most once per COOKIE_LOG_INTERVAL."""
        st = self.cookies.stats
        counts = (st.sent, st.valid, st.invalid, st.malformed)
        last_at, last = self._cookie_logged
        if counts == last or now - last_at < COOKIE_LOG_INTERVAL:
            return
        self._cookie_logged = (now, counts)
        log.info(
            "ike cookies",
            extra={
                "sent": st.sent,
                "valid": st.valid,
                "invalid": st.invalid,
                "malformed": st.malformed,
                "demanding": self.cookies.demanding,
                "half_open": self._half_open(),
                "responders": len(self.responders),
            },
        )

    def _responder_drop(
        self, c: Connection, hdr: IkeHeader, rs: ResponderSession, *, dropped: bool, now: float
    ) -> None:
        """Count and log (debug) a datagram the responder dropped or refused with an error
        Notify; the totals go to an info line at most once per COOKIE_LOG_INTERVAL."""
        counter = self.responder_drops if dropped else self.responder_error_answers
        counter[c.name] = counter.get(c.name, 0) + 1
        log.debug(
            "IKE datagram dropped by the responder"
            if dropped
            else "IKE request refused with an error notify",
            extra={
                "conn": c.name,
                "spi_i": hdr.spi_i.hex(),
                "exchange": hdr.exchange_type,
                "message_id": hdr.message_id,
                "state": rs.responder.state.value,
                "total": counter[c.name],
            },
        )
        totals = (sum(self.responder_drops.values()), sum(self.responder_error_answers.values()))
        last_at, last = self._drops_logged
        if totals != last and now - last_at >= COOKIE_LOG_INTERVAL:
            self._drops_logged = (now, totals)
            log.info(
                "ike responder drops",
                extra={
                    "dropped": dict(self.responder_drops),
                    "error_answers": dict(self.responder_error_answers),
                },
            )

    def _respond(self, c: Connection, reqid: int, d: IkeDatagram, now: float) -> None:
        try:
            hdr = decode_header(d.data)
        except IkeDecodeError:
            answer = version_answer(d.data)  # a higher major version: INVALID_MAJOR_VERSION
            log.debug(
                "malformed IKE datagram dropped",
                extra={"conn": c.name, "answered": answer is not None},
            )
            if answer is not None and self._stream is not None:
                self._stream.send(
                    IkeDatagram(d.local_addr, d.local_port, d.remote_addr, d.remote_port, answer)
                )
            return
        rs = self.responders.get(hdr.spi_i)
        if rs is not None and rs.conn is not c:
            log.debug("IKE SPI belongs to another connection", extra={"conn": c.name})
            return
        if rs is None:
            if (
                hdr.exchange_type != ExchangeType.IKE_SA_INIT
                or hdr.response
                or not hdr.initiator
                or hdr.message_id != 0
            ):
                log.debug("IKE datagram for no IKE SA", extra={"conn": c.name})
                return
            if self._cookie_gate(c, d, now):
                return
            if self._half_open() >= MAX_HALF_OPEN or len(self.responders) >= MAX_RESPONDERS:
                self.half_open_dropped += 1
                log.warning(
                    "IKE_SA_INIT dropped: too many half-open IKE SAs",
                    extra={
                        "conn": c.name,
                        "limit": MAX_HALF_OPEN,
                        "dropped_total": self.half_open_dropped,
                    },
                )
                return
            try:
                cfg = self._responder_config(c)
            except ValueError as e:
                log.error("cannot answer IKE_SA_INIT", extra={"conn": c.name, "reason": str(e)})
                return
            rs = ResponderSession(c, reqid, Ikev2Responder(cfg, now=now, rand=self.rand))
        local = (_packed(d.local_addr), d.local_port)
        remote = (_packed(d.remote_addr), d.remote_port)
        before = rs.responder.state
        ke_before = rs.responder.invalid_ke_sent
        counts = (rs.responder.dropped, rs.responder.error_answers)
        out = rs.responder.receive(d.data, now, remote=remote, local=local)
        self._export_sa_keys(rs.responder)
        if (rs.responder.dropped, rs.responder.error_answers) != counts:
            self._responder_drop(c, hdr, rs, dropped=rs.responder.dropped != counts[0], now=now)
        if rs.responder.invalid_ke_sent != ke_before:
            log.info(
                "INVALID_KE_PAYLOAD sent",
                extra={"conn": c.name, "spi_i": hdr.spi_i.hex(), "remote": d.remote_addr},
            )
        if hdr.spi_i not in self.responders:
            if rs.responder.state is ResponderState.WAIT_SA_INIT and not out:
                return  # dropped before any state (malformed request)
            if rs.responder.state is not ResponderState.WAIT_SA_INIT:
                self.responders[hdr.spi_i] = rs
                log.debug(  # info: "ike established" (a half-open IKE SA may be spoofed)
                    "ike responding",
                    extra={
                        "conn": c.name,
                        "spi_i": hdr.spi_i.hex(),
                        "spi_r": rs.responder.spi_r.hex(),
                        "remote": d.remote_addr,
                    },
                )
        assert self._stream is not None
        st = rs.responder.state
        reply = functools.partial(self._reply, d)
        if st is ResponderState.ESTABLISHED and before is not ResponderState.ESTABLISHED:
            pass  # the IKE_AUTH response waits for the Child SA's install (below)
        else:
            reply(out)
        if st is ResponderState.FAILED and before is not ResponderState.FAILED:
            log.warning(
                "ike failed",
                extra={"conn": c.name, "role": "responder", "reason": rs.responder.failure_reason},
            )
            self._failed(c, "responder", rs.responder.spi_i, rs.responder.failure_reason)
        elif st is ResponderState.ESTABLISHED and not rs.installed and not rs.installing:
            res = rs.responder.result
            assert res is not None
            r: IkeSaResult = res
            encap = d.local_port == NAT_T_PORT
            rs.port = d.local_port
            rs.installing = True
            spi_i = hdr.spi_i

            def installed(ok: bool) -> None:
                # RFC 7296 §1.2 as strongSwan does it: our SAs are in the worker before the
                # peer learns that the Child SA exists, so its first ESP packet finds them
                rs.installing = False
                if rs.dropped:  # its connection was removed meanwhile (reconfigure)
                    return
                if not ok:
                    if self.responders.get(spi_i) is rs:
                        del self.responders[spi_i]
                    return
                rs.installed = True
                reply(out)
                if rs.responder.info is not None:
                    send = functools.partial(self._send_responder, rs)
                    self._track(
                        c, r, "responder", rs.responder.info, send, now, responder=rs, first=child
                    )

            child = rs.responder.child_name or c.child_names[0]
            reqid = self._child_ids.get((c.name, child), (rs.reqid, ""))[0]
            self._install(c, r, reqid, initiator=False, encap=encap, then=installed, child=child)
        elif before is ResponderState.ESTABLISHED:
            r = rs.responder.result
            assert r is not None
            self._info_events(c, r, rs.responder.take_events(), "responder", now)
            if st is ResponderState.CLOSED:
                self._forget_responder(rs)
                self._down_key(r.spi_i + r.spi_r, "deleted by the peer")

    # --- after ESTABLISHED (RFC 7296 §1.4) ---------------------------------------------------

    def _established_datagram(
        self, s: Session, ini: Ikev2Initiator, d: IkeDatagram, now: float
    ) -> None:
        try:
            hdr = decode_header(d.data)
        except IkeDecodeError:
            return
        info = ini.info
        if info is None or (hdr.spi_i, hdr.spi_r) not in info.all_spis:
            log.debug("IKE datagram for another IKE SA", extra={"conn": s.conn.name})
            return
        self._send(s, ini.receive(d.data, now))
        assert ini.result is not None
        self._info_events(s.conn, ini.result, ini.take_events(), "initiator", now)
        if ini.state is State.CLOSED:
            s.installed = False
            self._down_key(ini.result.spi_i + ini.result.spi_r, "deleted by the peer")

    def _info_events(
        self, c: Connection, r: IkeSaResult, events: list[InfoEvent], role: str, now: float
    ) -> None:
        key = r.spi_i + r.spi_r
        st = self._ikes.get(key)
        spi_i, spi_r = st.info.spis if st is not None else (r.spi_i, r.spi_r)
        ike = {"conn": c.name, "role": role, "spi_i": spi_i.hex(), "spi_r": spi_r.hex()}
        for e in events:
            if e.kind == "child_deleted":
                log.info(
                    "child deleted" if e.initiated else "child deleted by peer",
                    extra={**ike, "spi_in": e.spi_in.hex(), "spi_out": e.spi_out.hex()},
                )
                if st is not None:
                    st.child_rekey_at.pop(e.spi_in, None)
                    st.child_hard_at.pop(e.spi_in, None)
                if not self._remove_retired(key, e.spi_in, e.spi_out):
                    self._remove_current(key, e.spi_in, e.spi_out)
            elif e.kind == "child_rekeyed" and e.child is not None:
                self._rekeyed(
                    r, e.spi_in, e.spi_out, e.child, ike, initiator=e.initiated, name=e.name
                )
                if st is not None:
                    st.child_rekey_at.pop(e.spi_in, None)
                    st.child_hard_at.pop(e.spi_in, None)
                    self._schedule_child(st, e.child.spi_in, now, e.name)
            elif e.kind == "child_created" and e.child is not None and st is not None:
                self._child_created(st, e.name, e.child, ike, now, initiator=e.initiated)
            elif e.kind == "child_failed":
                log.warning("child failed", extra={**ike, "child": e.name, "reason": e.reason})
                self._emit(
                    ev.NEGOTIATION_FAILED,
                    c,
                    self.records.get(key),
                    child=e.name,
                    reason=ev.failure_hint(e.reason.removeprefix("create_child: ")),
                )
            elif e.kind == "ike_rekeyed":
                new_i, new_r = e.ike_spis
                if self.key_export is not None and e.ike_keys is not None and e.ike_suite:
                    self._export_ike(new_i, new_r, e.ike_keys, e.ike_suite)
                log.info(
                    "ike rekeyed",
                    extra={
                        "conn": c.name,
                        "role": role,
                        "old_spi_i": e.old_ike_spis[0].hex(),
                        "old_spi_r": e.old_ike_spis[1].hex(),
                        "spi_i": new_i.hex(),
                        "spi_r": new_r.hex(),
                        "started_by": "us" if e.initiated else "peer",
                        "ike": st.info.ike_suite.name
                        if st is not None and st.info.ike_suite is not None
                        else "",
                    },
                )
                rec = self.records.get(key)
                if st is not None and rec is not None and st.info.ike_suite is not None:
                    rec.suite = st.info.ike_suite  # the new IKE SA's negotiated algorithms
                if st is not None:
                    self._schedule_ike(st, now)
            elif e.kind == "rekey_failed":
                log.warning("rekey failed", extra={**ike, "reason": e.reason})
                if st is not None:
                    if e.spi_in and any(x[0] == e.spi_in for x in st.info.children):
                        st.child_rekey_at[e.spi_in] = now + REKEY_RETRY
                    elif not e.spi_in:
                        st.ike_rekey_at = now + REKEY_RETRY
            elif e.kind == "dead":
                log.warning("peer dead", extra={**ike, "reason": e.reason, "action": c.dpd_action})
                self._dead(key, now)
            elif e.kind == "ike_deleted":
                log.info("ike deleted", extra=ike)
                rec = self.records.get(r.spi_i + r.spi_r)
                why = rec.closing if rec is not None and rec.closing else "deleted by the peer"
                self._remove_children(r.spi_i + r.spi_r, why)
                self._down_key(r.spi_i + r.spi_r, why)
                self._untrack(key)
            else:
                log.debug("informational answered", extra=ike)
        if st is not None and st.responder is not None and st.key in self._ikes:
            # route every live IKE SA of the session (rekeys add SPIs, Deletes retire them)
            live = {ike_spi_i for ike_spi_i, _ in st.info.all_spis}
            for k in [k for k, v in self.responders.items() if v is st.responder]:
                if k not in live:
                    del self.responders[k]
            for k in live:
                self.responders.setdefault(k, st.responder)

    def _rekeyed(
        self,
        r: IkeSaResult,
        old_in: bytes,
        old_out: bytes,
        child: ChildSaResult,
        ike: dict[str, str],
        *,
        initiator: bool = False,
        name: str = "",
    ) -> None:
        """A Child SA was rekeyed (RFC 7296 §2.8): install the new pair under the same reqid
        (the worker sends on the newest outbound SA of a reqid) and keep the old pair until the
        Delete of it completes (make-before-break). ``initiator``: we started the
        CREATE_CHILD_SA, so our outbound key is ``encr_i`` (§2.17); else our inbound one.
        ``name``: the configured child (default: the IKE SA's only one)."""
        key = r.spi_i + r.spi_r
        self._settle(key)
        ckey = self._ckey(key, name, old_in, old_out)
        entry = self._children.get(ckey) if ckey is not None else None
        if entry is None or ckey is None:
            return
        c, (cur_in, cur_out) = entry.conn, entry.pair
        try:
            inbound, outbound, _spd = child_sa_configs(
                c,
                replace(r, child=child),
                cur_in.reqid,
                initiator=initiator,
                encap=cur_in.encap is not None,
                seq_lease_block=self._lease_block,
            )
        except ValueError as e:
            _log_failure("rekeyed child install failed", ike, e)
            return
        found = ckey

        def done(err: BaseException | None) -> None:
            if err is not None:
                _log_failure("rekeyed child install failed", ike, err)
                return
            self._rekey_installed(
                found,
                c,
                (cur_in, cur_out),
                (inbound, outbound),
                old_in,
                old_out,
                child,
                ike,
                initiator=initiator,
            )

        self._apply(key, done, install=(inbound, outbound))

    def _child_created(
        self,
        st: IkeSaState,
        name: str,
        child: ChildSaResult,
        ike: dict[str, str],
        now: float,
        *,
        initiator: bool,
    ) -> None:
        """A new Child SA of configured child ``name`` (RFC 7296 §1.3.1, either side started
        it): install its pair under the child's reqid with its SPD entry, in one ApplySAs call.
        ``initiator``: we started the CREATE_CHILD_SA (our outbound key is ``encr_i``). A pair
        of the same child already installed on this IKE SA retires (as after a rekey)."""
        c = st.conn
        key = st.key
        try:
            view = c.child(name)
        except LookupError:
            log.warning("child of no configured name", extra={**ike, "child": name})
            st.send(st.info.delete_child(now, child.spi_in))
            return
        reqid, spd_key = self._child_ids[(c.name, name)]
        rec = self.records.get(key)
        first = next((ch for k, ch in self._children.items() if k[0] == key), None)
        if first is not None:
            encap = first.pair[0].encap is not None
        else:
            encap = rec.port == NAT_T_PORT if rec is not None else st.result.nat_t
        try:
            inbound, outbound, spd = child_sa_configs(
                view, replace(st.result, child=child), reqid, initiator=initiator, encap=encap
            )
        except ValueError as e:
            _log_failure("child install failed", {**ike, "child": name}, e)
            st.send(st.info.delete_child(now, child.spi_in))
            return
        ckey = (key, name)
        before = self._children.get(ckey)
        entry = _Child(view, name, spd_key, (inbound, outbound), time.time())
        self._children[ckey] = entry
        if before is not None:
            self._retiring.setdefault(ckey, []).append(before.pair)
        self._schedule_child(st, child.spi_in, now, name)

        def done(err: BaseException | None) -> None:
            if err is not None:
                if self._children.get(ckey) is entry:
                    if before is not None:
                        self._retiring.get(ckey, []).remove(before.pair)
                        self._children[ckey] = before
                    else:
                        del self._children[ckey]
                _log_failure("child install failed", {**ike, "child": name}, err)
                self._spd_repair(c, spd_key, spd)
                if key in self._ikes:
                    st.send(st.info.delete_child(self.clock(), child.spi_in))
                return
            log.info(
                "child installed",
                extra={
                    **ike,
                    "child": name,
                    "spi_in": child.spi_in.hex(),
                    "spi_out": child.spi_out.hex(),
                    "reqid": reqid,
                    "esp": child.suite_name,
                    "mode": child.mode.name.lower(),
                    "started_by": "us" if initiator else "peer",
                    "spd_revision": self._spd_revision,
                },
            )
            if self.key_export is not None:
                self.key_export.child_sas((inbound, outbound))
            self._emit(
                ev.CHILD_UP,
                c,
                self.records.get(key),
                spi_in=child.spi_in.hex(),
                spi_out=child.spi_out.hex(),
                child=name,
            )

        self._apply(key, done, install=(inbound, outbound), spd=(spd_key, spd))

    def _ckey(
        self, key: bytes, name: str, spi_in: bytes = b"", spi_out: bytes = b""
    ) -> tuple[bytes, str] | None:
        """The installed child of IKE SA ``key`` whose current pair is (spi_in, spi_out),
        else the one named ``name``, else its only child."""
        mine = [k for k in self._children if k[0] == key]
        want = (int.from_bytes(spi_in, "big"), int.from_bytes(spi_out, "big"))
        for k in mine:
            pair = self._children[k].pair
            if (pair[0].spi, pair[1].spi) == want:
                return k
        if name and (key, name) in self._children:
            return (key, name)
        return mine[0] if len(mine) == 1 else None

    def _rekey_installed(
        self,
        ckey: tuple[bytes, str],
        c: Connection,
        old: tuple[SaConfig, SaConfig],
        new: tuple[SaConfig, SaConfig],
        old_in: bytes,
        old_out: bytes,
        child: ChildSaResult,
        ike: dict[str, str],
        *,
        initiator: bool,
    ) -> None:
        """The worker installed the rekeyed pair ``new``: ``old`` retires."""
        (cur_in, cur_out), (inbound, outbound) = old, new
        key, name = ckey
        entry = self._children.get(ckey)
        if entry is not None:
            entry.pair = (inbound, outbound)
            entry.installed_at = time.time()
        self._retiring.setdefault(ckey, []).append((cur_in, cur_out))
        if self.key_export is not None:
            self.key_export.child_sas((inbound, outbound))
        rec = self.records.get(key)
        if rec is not None:
            rec.child_installed_at = time.time()
        self._emit(
            ev.REKEYED,
            c,
            rec,
            spi_in=child.spi_in.hex(),
            spi_out=child.spi_out.hex(),
            old_spi_in=old_in.hex(),
            old_spi_out=old_out.hex(),
            child=name,
        )
        log.info(
            "child rekeyed",
            extra={
                **ike,
                "child": name,
                "old_spi_in": old_in.hex(),
                "old_spi_out": old_out.hex(),
                "spi_in": child.spi_in.hex(),
                "spi_out": child.spi_out.hex(),
                "reqid": cur_in.reqid,
                "esp": child.suite_name,
                "protocol": "ah" if child.ah else "esp",
                "mode": child.mode.name.lower(),
                "started_by": "us" if initiator else "peer",
            },
        )

    def _remove_retired(self, key: bytes, spi_in: bytes, spi_out: bytes) -> bool:
        """Delete a Child SA pair replaced by a rekey; False if (spi_in, spi_out) is none."""
        self._settle(key)
        want = (int.from_bytes(spi_in, "big"), int.from_bytes(spi_out, "big"))
        for ckey, pairs in self._retiring.items():
            if ckey[0] != key:
                continue
            for pair in pairs:
                if (pair[0].spi, pair[1].spi) != want:
                    continue
                pairs.remove(pair)
                rec = self.records.get(key)
                name = ckey[1]

                def done(
                    err: BaseException | None, rec: IkeRecord | None = rec, name: str = name
                ) -> None:
                    if err is not None:
                        _log_failure("old child removal failed", {}, err)
                    else:
                        log.info(
                            "old child removed",
                            extra={"spi_in": spi_in.hex(), "spi_out": spi_out.hex()},
                        )
                    if rec is not None:
                        self._emit(
                            ev.CHILD_DOWN,
                            rec.conn,
                            rec,
                            spi_in=spi_in.hex(),
                            spi_out=spi_out.hex(),
                            reason="replaced by a rekey",
                            child=name,
                        )

                self._apply(key, done, delete=pair)
                return True
        return False

    def _remove_children(self, key: bytes, reason: str = "") -> None:
        """Delete every Child SA of an IKE SA (and any pair still retiring after a rekey)
        from the worker, each child's SPD entry withdrawn unless another IKE SA still has a
        Child SA installed under it."""
        ckeys = [k for k in (*self._children, *self._retiring) if k[0] == key]
        for ckey in dict.fromkeys(ckeys):
            self._remove_child(ckey, reason)

    def _remove_child(self, ckey: tuple[bytes, str], reason: str = "") -> None:
        """Delete one child of an IKE SA (and its pairs still retiring after a rekey) from the
        worker and withdraw its SPD entry (replace_spd with a higher revision) unless another
        IKE SA of the connection still has that child installed."""
        key = ckey[0]
        self._settle(key)
        old = tuple(sa for pair in self._retiring.pop(ckey, []) for sa in pair)
        entry = self._children.pop(ckey, None)
        if entry is None:
            if old:
                self._apply(
                    key,
                    _on_error("old child removal failed", {}),
                    delete=old,
                )
            return
        c, sas = entry.conn, entry.pair
        # Another IKE SA of the same connection (a responder answers many) still has its Child
        # SA installed under the child's entry: withdrawing it would cut that traffic off.
        still_used = any(ch.spd_key == entry.spd_key for ch in self._children.values())
        rec = self.records.get(key)

        def done(err: BaseException | None) -> None:
            if err is not None:
                _log_failure("child removal failed", {"conn": c.name}, err)
                return
            log.debug(  # the IKE SA's "ike deleted" / "child deleted" line is the info one
                "child removed",
                extra={
                    "conn": c.name,
                    "child": entry.name,
                    "spi_in": sas[0].spi.to_bytes(4, "big").hex(),
                    "spi_out": sas[1].spi.to_bytes(4, "big").hex(),
                    "spd_revision": self._spd_revision,
                },
            )
            self._emit(
                ev.CHILD_DOWN,
                c,
                rec,
                spi_in=f"{sas[0].spi:08x}",
                spi_out=f"{sas[1].spi:08x}",
                reason=reason,
                child=entry.name,
            )

        spd = None if still_used else (entry.spd_key, None)
        self._apply(key, done, delete=(*old, *sas), spd=spd)

    # --- lifetimes, rekeying and dead peers (RFC 7296 §1.3.2, §1.3.3, §2.4, §2.8) ------------

    def _track(
        self,
        c: Connection,
        r: IkeSaResult,
        role: str,
        info: InfoSession,
        send: Callable[[list[bytes]], None],
        now: float,
        *,
        session: Session | None = None,
        responder: ResponderSession | None = None,
        first: str = "",
    ) -> None:
        """Start the lifetime and liveness clocks of a freshly established IKE SA; ``first``
        names the child IKE_AUTH created (default: the connection's first)."""
        info.dpd_delay = c.dpd_delay
        info.retransmit_timeout = c.retransmit_timeout
        info.retransmit_tries = c.retransmit_tries
        st = IkeSaState(c, r.spi_i + r.spi_r, role, r, info, send, session, responder)
        self._ikes[st.key] = st
        first = first or c.child_names[0]
        # RFC 7296 §1.3.1: the children the peer may create, and the names of ours
        info.configure_children(tuple(child_policy(c, n) for n in c.child_names), first=first)
        self._schedule_child(st, r.child.spi_in, now, first)
        self._schedule_ike(st, now)
        info.on_timer(now)  # the liveness clock starts now
        if session is not None:
            # our further children: start ones now, trap ones on ACQUIRE, asked-for ones now
            want = {n for n in c.child_names[1:] if c.child(n).start_action == "start"}
            want |= session.want
            session.want = set()
            for n in c.child_names[1:]:
                if n in want:
                    self._create_child(st, n, now)

    def _create_child(self, st: IkeSaState, name: str, now: float) -> bool:
        """Send (or queue) a CREATE_CHILD_SA for child ``name`` on IKE SA ``st`` (§1.3.1)."""
        policy = next((p for p in st.info.policies if p.name == name), None)
        if policy is None or st.info.closed:
            return False
        log.info(
            "child initiating",
            extra={"conn": st.conn.name, "child": name, "spi_i": st.info.spis[0].hex()},
        )
        out = st.info.create_child(now, policy)
        if out:
            st.send(out)
        return True

    def _untrack(self, key: bytes) -> IkeSaState | None:
        return self._ikes.pop(key, None)

    def _schedule_child(self, st: IkeSaState, spi_in: bytes, now: float, name: str = "") -> None:
        """The rekey and hard-expiry times of a new Child SA, from child ``name``'s lifetimes."""
        try:
            c = st.conn.child(name) if name else st.conn
        except LookupError:
            c = st.conn
        if c.rekey_time > 0:
            st.child_rekey_at[spi_in] = now + c.rekey_time - self.jitter(c.child_rand_time)
        if c.child_life_time > 0:
            st.child_hard_at[spi_in] = now + c.child_life_time

    def _schedule_ike(self, st: IkeSaState, now: float) -> None:
        t = st.conn.ike_rekey_time
        st.ike_rekey_at = now + t - self.jitter(t * IKE_RAND_FRACTION) if t > 0 else math.inf

    @staticmethod
    def _next_lifetime_event(st: IkeSaState) -> float:
        times = [st.ike_rekey_at, *st.child_rekey_at.values(), *st.child_hard_at.values()]
        nxt = st.info.next_timeout
        if nxt is not None:
            times.append(nxt)
        return min(times)

    def _lifetime_timers(self, st: IkeSaState, now: float) -> None:
        """Retransmissions and liveness checks of the core, then rekeys and hard expiries."""
        info = st.info
        ike = {"conn": st.conn.name, "role": st.role, "spi_i": info.spis[0].hex()}
        out = info.on_timer(now)
        if now >= st.ike_rekey_at and not info.closed:
            st.ike_rekey_at = math.inf  # rescheduled by ike_rekeyed / rekey_failed
            log.info("ike rekey starting", extra=ike)
            out += info.rekey_ike(now)
        for spi, at in list(st.child_rekey_at.items()):
            if now >= at:
                del st.child_rekey_at[spi]
                log.info("child rekey starting", extra={**ike, "spi_in": spi.hex()})
                out += info.rekey_child(now, spi)
        for spi, at in list(st.child_hard_at.items()):
            if now >= at:
                del st.child_hard_at[spi]
                log.warning("child hard lifetime expired", extra={**ike, "spi_in": spi.hex()})
                out += info.delete_child(now, spi)
        if out:
            st.send(out)
        events = info.take_events()
        if events:
            self._info_events(st.conn, st.result, events, st.role, now)

    def _dead(self, key: bytes, now: float) -> None:
        """The peer did not answer (RFC 7296 §2.4): remove the IKE SA's Child SAs and apply the
        connection's dpd_action. ``restart`` initiates again at once (and keeps retrying until
        the peer answers); ``hold`` / ``trap`` keep the SPD entry without SAs, so the worker
        reports matching traffic as ACQUIRE, which initiates again. A connection on which we
        only respond can do neither: it waits for the peer."""
        st = self._untrack(key)
        self._remove_children(key)
        if st is None:
            return
        if st.responder is not None:
            self._forget_responder(st.responder)
        s = st.session
        if s is None:
            return
        s.installed = False
        s.initiator = None
        action = st.conn.dpd_action
        if action == "restart":
            s.retry_at = now
        elif action in ("hold", "trap") and s.spd is not None:
            s.held = True

            def done(err: BaseException | None) -> None:
                if err is not None:
                    _log_failure("hold policy install failed", {}, err)
                    s.retry_at = now  # like restart
                    return
                log.info("holding for traffic", extra={"conn": s.conn.name, "reqid": s.reqid})

            self._apply(None, done, spd=(s.conn.name, s.spd))

    @property
    def _trap_msg(self) -> str:
        # policy mode: the worker's policy layer has the PROTECT entry, keymgr installs nothing
        return "trap waiting for acquire" if self.policy_mode else "trap installed"

    def _trap(self, s: Session, now: float) -> None:
        """start_action trap: install the connection's PROTECT entry without SAs; the first
        matching packet makes the worker report an ACQUIRE, which initiates (_worker_events)."""
        s.spd = connection_spd(s.conn, s.reqid)
        s.held = True

        def done(err: BaseException | None) -> None:
            if err is not None:
                _log_failure("trap policy install failed", {"conn": s.conn.name}, err)
                s.held = False
                s.retry_at = now + RETRY_AFTER_FAILURE  # then like start_action start
                return
            log.info(self._trap_msg, extra={"conn": s.conn.name, "reqid": s.reqid})

        self._apply(None, done, spd=(s.conn.name, s.spd))

    def _trap_child(self, s: Session, child: str) -> None:
        """start_action trap of a further child: its PROTECT entry without SAs; the worker's
        ACQUIRE for its reqid creates it (_worker_events)."""
        reqid, spd_key = self._child_ids[(s.conn.name, child)]
        spd = connection_spd(s.conn.child(child), reqid)
        extra = {"conn": s.conn.name, "child": child, "reqid": reqid}

        def done(err: BaseException | None) -> None:
            if err is not None:
                _log_failure("trap policy install failed", extra, err)
                return
            log.info(self._trap_msg, extra=extra)

        self._apply(None, done, spd=(spd_key, spd))

    def _states(self, name: str) -> list[IkeSaState]:
        """The established IKE SAs of connection ``name`` (oldest first)."""
        return [st for st in self._ikes.values() if st.conn.name == name and not st.info.closed]

    def _want_child(self, s: Session, child: str, now: float) -> str:
        """Create ``child`` of session ``s``: on its IKE SA if it is up, else after initiating
        the IKE SA (the first child goes in IKE_AUTH, this one follows)."""
        states = [st for st in self._states(s.conn.name) if st.session is s]
        if states:
            self._create_child(states[-1], child, now)
            return "CREATE_CHILD_SA sent"
        s.want.add(child)
        ini = s.initiator
        if ini is None or ini.state in (State.FAILED, State.CLOSED):
            self._initiate(s, now)
            if s.initiator is None:
                return f"cannot start: see keymgr's log; retrying in {RETRY_AFTER_FAILURE}s"
            return "IKE_SA_INIT sent; the child follows once the IKE SA is up"
        return "the child follows once the IKE SA being negotiated is up"

    def _forget_responder(self, rs: ResponderSession) -> None:
        for spi in [k for k, v in self.responders.items() if v is rs]:
            del self.responders[spi]

    def _remove_current(self, key: bytes, spi_in: bytes, spi_out: bytes) -> None:
        """Delete a child's current Child SA pair (spi_in, spi_out): a pair still installed
        from a rekey takes over; without one the child's SPD entry is withdrawn too."""
        self._settle(key)
        want = (int.from_bytes(spi_in, "big"), int.from_bytes(spi_out, "big"))
        ckey = next(
            (
                k
                for k, ch in self._children.items()
                if k[0] == key and (ch.pair[0].spi, ch.pair[1].spi) == want
            ),
            None,
        )
        if ckey is None:
            return
        entry = self._children[ckey]
        c, (cur_in, cur_out) = entry.conn, entry.pair
        older = self._retiring.get(ckey)
        if not older:
            self._remove_child(ckey)
            return
        entry.pair = older.pop()

        def done(err: BaseException | None) -> None:
            if err is not None:
                _log_failure("child removal failed", {"conn": c.name}, err)
                return
            log.info(
                "redundant child removed",
                extra={"conn": c.name, "spi_in": spi_in.hex(), "spi_out": spi_out.hex()},
            )

        self._apply(key, done, delete=(cur_in, cur_out))

    def _watch_events(self) -> None:
        """Subscribe to the worker's events: byte/packet soft and hard expiries of our Child
        SAs, LeaseLow of their outbound SAs and ACQUIREs for held connections. Without them
        keymgr still rekeys by time (and an outbound SA stops at the end of its lease)."""
        try:
            events = self.client.events()
        except grpc.RpcError as e:
            log.warning("worker events unavailable", extra={"code": str(e.code())})
            return
        self._events = events

        def reader() -> None:
            try:
                for item in events:
                    self._wev.put(item)
                    # wake the main loop: a LeaseLow must be answered before the lease runs out
                    self._rx.put(_Call(_nothing, Future()))
            except grpc.RpcError as e:
                if not self._stop.is_set():
                    log.warning("worker event stream ended", extra={"code": str(e.code())})

        threading.Thread(target=reader, daemon=True).start()

    def _worker_events(self, now: float) -> None:
        while True:
            try:
                wev = self._wev.get_nowait()
            except queue.Empty:
                return
            e = wev.event
            if isinstance(e, Acquire):
                for s in self.sessions:
                    if s.held and s.reqid == e.reqid and s.initiator is None:
                        log.info("acquire: initiating", extra={"conn": s.conn.name})
                        s.held = False
                        self._initiate(s, now)
                    for child in s.conn.child_names[1:]:
                        if self._child_ids[(s.conn.name, child)][0] != e.reqid:
                            continue
                        if any(k[1] == child for k in self._children if k[0] in self._ikes):
                            continue  # installed meanwhile (a packet queued before that)
                        log.info("acquire: child", extra={"conn": s.conn.name, "child": child})
                        self._want_child(s, child, now)
            elif isinstance(e, (SoftExpire, HardExpire)):
                self._expired(e, now)
            elif isinstance(e, LeaseLow):
                self._lease_low(e, now)

    @property
    def _lease_block(self) -> int:
        """The first lease of new outbound SAs (0: leases off, no store)."""
        return self.seq_lease_block if self.leases is not None else 0

    def _outbound_sa(self, key: LeaseKey) -> SaConfig | None:
        """Our installed (or retiring) outbound SA named ``key``."""
        for ch in self._children.values():
            out = ch.pair[1]
            if _lease_key(out) == key:
                return out
        for pairs in self._retiring.values():
            for _in, out in pairs:
                if _lease_key(out) == key:
                    return out
        return None

    def _lease_low(self, e: LeaseLow, now: float) -> None:
        """The worker used 3/4 of an outbound SA's sequence-number lease: record the next
        mark durably, then extend the lease by one block (UpdateSA). At the end of the
        sequence space, or when the mark cannot be made durable, rekey the Child SA instead."""
        if self.leases is None:
            return
        key = LeaseKey(e.sa.spi, e.sa.dst, e.sa.protocol)
        mark = self.leases.get(key)
        sa = self._outbound_sa(key)
        if mark is None or sa is None:
            return  # not ours, or deleted meanwhile
        extra = {"spi_out": f"{sa.spi:08x}", "next_seq": e.next_seq, "lease_end": mark}
        new_end = next_lease(max(mark, e.lease_end), self.seq_lease_block, sa.esn)
        if new_end is None:
            log.info("sequence space nearly used up: rekeying", extra=extra)
            self._expired(SoftExpire(e.sa, ExpiryKind.SEQUENCE), now)
            return
        try:
            self.leases.record(key, new_end)
        except LeaseStoreError as err:
            log.error("sequence lease not extended: rekeying", extra={**extra, "reason": str(err)})
            self._expired(SoftExpire(e.sa, ExpiryKind.SEQUENCE), now)
            return
        try:
            self.client.update_sa(
                sa.spi, sa.dst, sa.protocol, Direction.OUTBOUND, seq_lease_end=new_end
            )
        except grpc.RpcError as err:
            _log_failure("sequence lease extension failed", {"spi_out": f"{sa.spi:08x}"}, err)
            return
        self.lease_extensions += 1
        log.info("sequence lease extended", extra={**extra, "new_lease_end": new_end})

    def _expired(self, e: SoftExpire | HardExpire, now: float) -> None:
        """A worker lifetime (bytes, packets or time) of one of our Child SAs ran out: soft ->
        rekey it now, hard -> delete it."""
        spi = e.sa.spi.to_bytes(4, "big")
        for st in self._ikes.values():
            pair = next((p for p in st.info.children if spi in p), None)
            if pair is None:
                continue
            hard = isinstance(e, HardExpire)
            log.info(
                "child lifetime expired",
                extra={
                    "conn": st.conn.name,
                    "spi_in": pair[0].hex(),
                    "kind": e.kind.name.lower(),
                    "hard": hard,
                },
            )
            if hard:
                st.child_hard_at[pair[0]] = now
            else:
                st.child_rekey_at[pair[0]] = now
            self._lifetime_timers(st, now)
            return

    def _shutdown(self) -> None:
        """Send a Delete of each established IKE SA (best effort), wait up to SHUTDOWN_WAIT for
        the responses, and remove every installed Child SA from the worker."""
        assert self._stream is not None
        now = self.clock()
        waiting: list[tuple[Ikev2Initiator | Ikev2Responder, Callable[[list[bytes]], None]]] = []
        for s in self.sessions:
            ini = s.initiator
            if ini is not None and ini.state is State.ESTABLISHED:
                log.info("ike deleting", extra={"conn": s.conn.name, "spi_i": ini.spi_i.hex()})
                waiting.append((ini, functools.partial(self._send, s)))
        for rs in self.responders.values():
            resp = rs.responder
            if resp.state is ResponderState.ESTABLISHED:
                log.info("ike deleting", extra={"conn": rs.conn.name, "spi_i": resp.spi_i.hex()})
                waiting.append((resp, functools.partial(self._send_responder, rs)))
        for rec in self.records.values():
            rec.closing = rec.closing or "keymgr stopping"
        for x, send in waiting:
            send(x.delete_ike(now))
        deadline = now + SHUTDOWN_WAIT
        closed = (State.CLOSED, ResponderState.CLOSED)
        while not all(x.state in closed for x, _ in waiting) and not self.failed:
            left = deadline - self.clock()
            if left <= 0:
                log.warning("not every peer answered our Delete", extra={"waited": SHUTDOWN_WAIT})
                break
            try:
                d = self._rx.get(timeout=min(left, TICK))
            except queue.Empty:
                for x, send in waiting:  # retransmit the outstanding Delete (RFC 7296 §2.1)
                    if x.state not in closed:
                        send(x.delete_ike(self.clock()))
                continue
            if isinstance(d, _Call):
                if d.future.set_running_or_notify_cancel():
                    d.future.set_exception(KeymgrStopped("keymgr is stopping"))
                continue
            if isinstance(d, _Apply):
                self._finish(d)
                continue
            self._dispatch(d, self.clock())
        for key in dict.fromkeys(k[0] for k in self._children):
            self._remove_children(key, "keymgr stopping")
        self._settle_all()
        for rec in list(self.records.values()):
            self._down(rec, "keymgr stopping")

    def _reply(self, d: IkeDatagram, datagrams: list[bytes]) -> None:
        """Send datagrams back on the addresses and ports ``d`` arrived on."""
        assert self._stream is not None
        for data in datagrams:
            self._stream.send(
                IkeDatagram(d.local_addr, d.local_port, d.remote_addr, d.remote_port, data)
            )

    def _send_responder(self, rs: ResponderSession, datagrams: list[bytes]) -> None:
        assert self._stream is not None
        c = rs.conn
        for data in datagrams:
            self._stream.send(IkeDatagram(c.local_addr, rs.port, c.remote_addr, rs.port, data))

    def _expire_responders(self, now: float) -> None:
        for spi, rs in list(self.responders.items()):
            st = rs.responder.state
            if st is ResponderState.ESTABLISHED:
                continue
            if now - rs.responder.last_activity >= HALF_OPEN_TIMEOUT:
                log.info(
                    "half-open IKE SA expired",
                    extra={"conn": rs.conn.name, "spi_i": spi.hex(), "state": st.value},
                )
                del self.responders[spi]

    def _timers(self, now: float) -> None:
        self._expire_responders(now)
        self._cookie_report(now)
        self._closing_timers(now)
        for st in list(self._ikes.values()):
            self._lifetime_timers(st, now)
        for s in self.sessions:
            if s.retry_at is not None and now >= s.retry_at:
                self._initiate(s, now)
                continue
            ini = s.initiator
            if ini is not None and ini.next_timeout is not None and now >= ini.next_timeout:
                self._send(s, ini.on_timer(now))
                self._check(s, now)

    def _check(self, s: Session, now: float) -> None:
        ini = s.initiator
        assert ini is not None
        if ini.state is State.FAILED:
            extra: dict[str, object] = {
                "conn": s.conn.name,
                "reason": ini.failure_reason,
                "retry_in": RETRY_AFTER_FAILURE,
            }
            if ini.failure_reason == "AUTHENTICATION_FAILED":
                c = s.conn
                extra["hint"] = (
                    f"the responder refused our authentication ({c.auth}) as "
                    f"{c.local_id or c.local_addr} or did not accept to be "
                    f"{c.remote_id or c.remote_addr}; its log has the reason"
                )
            log.warning("ike failed", extra=extra)
            s.retry_at = now + RETRY_AFTER_FAILURE
            self._failed(s.conn, "initiator", ini.spi_i, ini.failure_reason)
        elif (
            ini.state is State.ESTABLISHED
            and not s.installed
            and not s.installing
            and ini.result is not None
        ):
            self._established(s, ini.result, now)

    def _established(self, s: Session, r: IkeSaResult, now: float) -> None:
        ini = s.initiator
        s.installing = True

        def done(ok: bool) -> None:
            s.installing = False
            if s.initiator is not ini:
                return  # abandoned meanwhile (its SAs are in _children: removed on stop)
            if not ok:
                s.initiator = None
                s.retry_at = now + RETRY_AFTER_FAILURE
                return
            s.installed = True
            s.held = False
            # (policy mode: the policy's entry, which keymgr does not send, keeps dpd hold/trap)
            s.spd = (
                connection_spd(s.conn, s.reqid) if self.policy_mode else self._spd.get(s.conn.name)
            )
            s.spis = {"in": r.child.spi_in.hex(), "out": r.child.spi_out.hex()}
            if ini is not None and ini.info is not None:
                send = functools.partial(self._send, s)
                self._track(s.conn, r, "initiator", ini.info, send, now, session=s)

        self._install(s.conn, r, s.reqid, initiator=True, encap=r.nat_t, then=done)

    def _install(
        self,
        c: Connection,
        r: IkeSaResult,
        reqid: int,
        *,
        initiator: bool,
        encap: bool,
        then: Callable[[bool], None],
        child: str = "",
    ) -> None:
        """Install an established IKE SA's Child SA pair and, unless it is installed already
        and unchanged, its child's SPD entry, in one ApplySAs call (see _apply). ``child``:
        the configured child IKE_AUTH created (default: the connection's first).

        The one installation path for both roles; ``then(ok)`` runs when the worker answered,
        with False (logged) when it refused.
        """
        role = "initiator" if initiator else "responder"
        log.info(
            "ike established",
            extra={
                "conn": c.name,
                "role": role,
                "spi_i": r.spi_i.hex(),
                "spi_r": r.spi_r.hex(),
                "nat_t": encap,
                "behind_nat": r.local_behind_nat,
                "ike": r.suite.name,
                "spi_in": r.child.spi_in.hex(),
                "spi_out": r.child.spi_out.hex(),
                "esp": r.child.suite_name,
                "mode": r.child.mode.name.lower(),
            },
        )
        key = r.spi_i + r.spi_r
        name = child or c.child_names[0]  # the child negotiated in IKE_AUTH
        view = c.child(name)
        spd_key = self._child_ids.get((c.name, name), (reqid, c.name))[1]
        try:
            inbound, outbound, spd = child_sa_configs(
                view, r, reqid, initiator=initiator, encap=encap, seq_lease_block=self._lease_block
            )
        except ValueError as e:
            # our own reason (no key material), e.g. an AH Child SA across NAT
            _log_failure("child install failed", {"conn": c.name, "reason": str(e)}, e)
            self._failed(c, role, r.spi_i, str(e))
            then(False)
            return
        # counted as installed while in flight, so no Delete of another IKE SA of the
        # connection withdraws the SPD entry meanwhile
        ckey = (key, name)
        self._children[ckey] = _Child(view, name, spd_key, (inbound, outbound), time.time())

        def done(err: BaseException | None) -> None:
            if err is not None:
                entry = self._children.get(ckey)
                if entry is not None and entry.pair[0] is inbound:
                    del self._children[ckey]
                _log_failure("child install failed", {"conn": c.name}, err)
                self._spd_repair(c, spd_key, spd)
                then(False)
                return
            self._installed(c, r, reqid, role, encap, (inbound, outbound), name)
            then(True)

        self._apply(key, done, install=(inbound, outbound), spd=(spd_key, spd))

    def _installed(
        self,
        c: Connection,
        r: IkeSaResult,
        reqid: int,
        role: str,
        encap: bool,
        sas: tuple[SaConfig, SaConfig],
        child: str,
    ) -> None:
        proto = "ah" if r.child.ah else "esp"
        log.debug(  # info: "ike established" names the Child SA already
            "child installed",
            extra={
                "conn": c.name,
                "child": child,
                "role": role,
                "spi_in": r.child.spi_in.hex(),
                "spi_out": r.child.spi_out.hex(),
                "reqid": reqid,
                "esp": r.child.suite_name,
                "protocol": proto,
                "mode": r.child.mode.name.lower(),
                "encap": "udp-4500" if sas[0].encap is not None else proto,
                "spd_revision": self._spd_revision,
            },
        )
        self._up(c, r, role, encap, sas, child)

    def _spd_repair(self, c: Connection, spd_key: str, spd: SpdEntry) -> None:
        """After a refused install of a child of connection ``c``: its SPD entry (``spd_key``)
        is wanted exactly while another Child SA of it is installed (or in flight, relying on
        the refused batch's entry) or a held session keeps it; set or withdraw it."""
        used = any(ch.spd_key == spd_key for ch in self._children.values())
        if used:
            self._apply(
                None, _on_error("child install failed", {"conn": c.name}), spd=(spd_key, spd)
            )
        elif not any(s.held and s.conn.name == c.name for s in self.sessions):
            self._apply(
                None, _on_error("child removal failed", {"conn": c.name}), spd=(spd_key, None)
            )

    # --- the worker's SAD and SPD: one ApplySAs call per change --------------------------------

    def _apply(
        self,
        key: bytes | None,
        then: Callable[[BaseException | None], object],
        *,
        install: tuple[SaConfig, ...] = (),
        delete: tuple[SaConfig, ...] = (),
        spd: tuple[str, SpdEntry | None] | None = None,
    ) -> None:
        """The one path to the worker's SAD and SPD: delete and install SAs of IKE SA ``key``
        and set (an entry) or withdraw (None) the SPD entry of connection ``spd[0]`` in ONE
        atomic ApplySAs call, sent without waiting for the answer. The SPD part is left out
        when the entry already is as wanted (no call at all when nothing is left).

        Ordering: a batch for an IKE SA first waits for that IKE SA's batch still in flight (a
        Delete never overtakes the install of the same SAs), and a batch that changes the SPD
        first waits for every earlier one that did (revisions reach the worker in order).
        ``then(error)`` runs on the main loop once the worker answered (error None: applied).

        Removals (deletes alone) made while another removal is in flight wait for it and then
        go together in one call: deleting cannot be refused (a missing SA is reported, not an
        error), so joining them changes no outcome, and a busy responder makes one call for
        several IKE SAs' removals instead of one each.

        During a turn of the main loop the batch is staged instead and leaves with the turn's
        others in one call (see _flush); waiting for a staged batch sends the turn first.
        """
        if key is not None:
            self._settle(key)
        entries = self._spd_change(spd)
        if entries is not None and any(op.spd_before is not None for op in self._pending):
            for op in [op for op in self._pending if op.spd_before is not None]:
                self._settle_op(op)
            entries = self._spd_change(spd)
        removal = not install and bool(delete) and entries is None
        # (a removal not sent yet takes this one along: both go in this turn's call)
        if removal and any(op.removal and op.future is not None for op in self._pending):
            self._removals.append((then, delete))
            return
        op = _Apply(key, None, then, None, self.clock(), removal=removal)
        if not install and not delete and entries is None:
            op.done = True
            then(None)
            return
        if self.leases is not None:
            try:  # durable BEFORE the worker may use the lease
                for sa in install:
                    if sa.direction is Direction.OUTBOUND and sa.seq_lease_end:
                        self.leases.record(_lease_key(sa), sa.seq_lease_end, new_sa=True)
            except LeaseStoreError as e:
                log.error("sequence lease not durable", extra={"reason": str(e)})
                op.error = e
                self._finish(op)
                return
            op.leases_freed = tuple(
                _lease_key(sa) for sa in delete if sa.direction is Direction.OUTBOUND
            )
            op.leases_granted = tuple(
                _lease_key(sa)
                for sa in install
                if sa.direction is Direction.OUTBOUND and sa.seq_lease_end
            )
        batch: tuple[list[SpdEntry], int] | None = None
        if entries is not None:
            self._spd_revision += 1
            batch = (list(entries.values()), self._spd_revision)
            op.spd_before, self._spd = self._spd, entries
        op.request = (
            install,
            [(sa.spi, sa.dst, sa.protocol, sa.direction) for sa in delete],
            batch,
        )
        self._pending.append(op)
        if self._staged is not None:
            if self._staged and (
                sum(len(o.request[0]) for o in self._staged) + len(install) > MAX_BATCH_INSTALLS
                or sum(len(o.request[1]) for o in self._staged) + len(delete) > MAX_BATCH_DELETES
            ):
                self._flush()  # a joined call stays within ApplySAs' limits
            self._staged.append(op)  # sent with the others of this turn (see _flush)
            return
        self._send_ops([op])

    def _flush(self, *, keep: bool = True) -> None:
        """Send the batches staged in this turn of the main loop: one alone as it is, several
        joined into ONE ApplySAs call (their deletes, their installs, and the SPD batch of the
        one that changes the SPD: _apply settles an earlier SPD change first, so a turn stages
        at most one). The worker applies a call atomically, so the joined call applies all of
        them or none; if it is refused, each is sent again alone (see _finish), so a bad batch
        fails alone as before. ``keep``: go on staging (False at the end of the turn)."""
        staged = self._staged
        self._staged = [] if keep else None
        if staged:
            self._send_ops(staged)

    def _send_ops(self, ops: list[_Apply]) -> None:
        """Send ``ops`` (in _pending, in order) in one ApplySAs call."""
        if len(ops) == 1:
            install, refs, batch = ops[0].request
        else:
            install = tuple(sa for op in ops for sa in op.request[0])
            refs = [ref for op in ops for ref in op.request[1]]
            batch = next((op.request[2] for op in ops if op.request[2] is not None), None)
        try:
            future = self.client.apply_sas_async(install, refs, batch)
        except (grpc.RpcError, ValueError) as e:
            if len(ops) > 1:
                for op in ops:
                    self._send_ops([op])
                return
            ops[0].error = e
            self._finish(ops[0])
            return
        self.apply_calls += 1
        group = ops if len(ops) > 1 else None
        for op in ops:
            op.future, op.group = future, group

        def answered(_f: ApplyFuture) -> None:
            for op in ops:
                self._rx.put(op)

        future.add_done_callback(answered)
        if future.done():
            for op in ops:
                self._finish(op)

    def _spd_change(self, spd: tuple[str, SpdEntry | None] | None) -> dict[str, SpdEntry] | None:
        """The SPD after setting (withdrawing) a connection's entry; None when unchanged. The
        view includes batches in flight (a refused one restores it, see _finish)."""
        if spd is None or self.policy_mode:  # policy mode: the policy layer has the entries
            return None
        name, entry = spd
        if entry is None:
            if name not in self._spd:
                return None
            return {k: v for k, v in self._spd.items() if k != name}
        if self._spd.get(name) == entry:
            return None
        return {**self._spd, name: entry}

    def _finish(self, op: _Apply) -> None:
        """The worker answered ``op`` (or its call failed): run its continuation."""
        if op.done:
            return
        if op.future is not None and op.error is None:
            if not op.future.done():
                return  # the answer to a joined call that was sent again alone (below)
            try:
                op.error = op.future.exception()
            except Exception as e:  # cancelled
                op.error = e
        if op.error is not None and op.group is not None:
            # the joined call was refused (nothing of it applied): each batch again alone
            for other in op.group:
                if not other.done:
                    other.group, other.future, other.error = None, None, None
                    self._send_ops([other])
            return
        op.done = True
        if op in self._pending:
            self._pending.remove(op)
        took = self.clock() - op.started
        st = self.apply_stats
        st[0] += 1
        st[1] += took
        st[2] = max(st[2], took)
        if op.error is not None and op.spd_before is not None:
            self._spd = op.spd_before  # nothing of the batch was applied
        gone = op.leases_freed if op.error is None else op.leases_granted
        if gone and self.leases is not None:
            try:  # deleted SAs, or SAs the worker refused to install
                self.leases.remove(*gone)
            except LeaseStoreError as e:  # a stale mark only wastes a line of the file
                log.warning("sequence lease marks not removed", extra={"reason": str(e)})
        op.then(op.error)
        if op.removal and self._removals:
            waiting, self._removals = self._removals, []

            def joined(err: BaseException | None) -> None:
                for then, _sas in waiting:
                    then(err)

            self._apply(None, joined, delete=tuple(sa for _then, sas in waiting for sa in sas))

    def _settle_op(self, op: _Apply) -> None:
        """Wait for ``op``'s answer (its call has the client's deadline) and finish it."""
        if op.future is None and self._staged and op in self._staged:
            self._flush()  # not sent yet: send this turn's batches now
        while not op.done and op.future is not None:
            try:
                op.future.exception()
            except Exception as e:
                op.error = e
            self._finish(op)  # a refused joined call sends it again alone: wait for that
        self._finish(op)

    def _settle(self, key: bytes) -> None:
        """Finish the batch of IKE SA ``key`` still in flight, if any."""
        for op in [op for op in self._pending if op.key == key]:
            self._settle_op(op)

    def _settle_all(self) -> None:
        while self._pending:
            self._settle_op(self._pending[0])
        n, total, longest = self.apply_stats
        if n:
            log.info(
                "worker calls",
                extra={
                    "apply_sas": n,
                    "calls": self.apply_calls,
                    "mean_ms": round(1000 * total / n, 2),
                    "max_ms": round(1000 * longest, 2),
                },
            )

    def _responder_config(self, c: Connection) -> ResponderConfig:
        """The (validated, immutable) ResponderConfig of connection ``c``, built again only when
        the connection or its credentials changed."""
        auth = self._authentication(c)
        hit = self._responder_cfgs.get(c.name)
        if hit is not None and hit[0] is c and hit[1] is auth:
            return hit[2]
        mine, theirs = auth
        first = c.child(c.child_names[0])
        cfg = ResponderConfig(
            local_addr=c.local_addr,
            local_auth=mine,
            peer_auth=theirs,
            ts_local=first.ts_range("local"),
            ts_remote=first.ts_range("remote"),
            local_id=c.local_id,
            remote_id=c.remote_id or c.remote_addr,
            remote_addr=c.remote_addr,
            ike_suites=c.ike_suites,
            esp_suites=first.child_suites,
            mode=first.sa_mode,
            fragment_size=c.fragment_size,
            # IKE_AUTH may ask for another configured child (RFC 7296 §2.9)
            children=tuple(child_policy(c, n) for n in c.child_names[1:]),
        )
        self._responder_cfgs[c.name] = (c, auth, cfg)
        return cfg

    def _authentication(self, c: Connection) -> tuple[LocalAuth, PeerAuth]:
        """authentication(c), read from the files again only when one of them changed."""
        paths = (c.psk_file, c.cert_file, c.key_file, *c.ca_files, *c.crl_files)
        try:
            stamp = tuple(
                (str(p), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
                for p in paths
                if p is not None
                for st in (os.stat(p),)
            )
        except OSError:
            return authentication(c)  # which reports the error
        hit = self._auth_cache.get(c.name)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        auth = authentication(c)
        self._auth_cache[c.name] = (stamp, auth)
        return auth

    # --- operator view, commands and events (services/keymgr/api.py) -------------------------

    def _export_sa_keys(self, x: Ikev2Initiator | Ikev2Responder) -> None:
        """Export an IKE SA's keys as soon as IKE_SA_INIT derived them (if asked), so that a
        capture of an IKE_AUTH that then fails can be decrypted too."""
        if self.key_export is None:
            return
        got = x.sa_keys
        if got is not None:
            self._export_ike(*got)

    def _export_ike(self, spi_i: bytes, spi_r: bytes, keys: IkeKeys, suite: IkeSuite) -> None:
        """One ikev2_decryption_table record per IKE SA (by its SPIs)."""
        if self.key_export is None or spi_i + spi_r in self._exported_ike:
            return
        if len(self._exported_ike) >= MAX_EXPORTED_IKE:
            self._exported_ike.clear()  # only a bound on memory: a record may then repeat
        self._exported_ike.add(spi_i + spi_r)
        self.key_export.ike_sa(
            spi_i,
            spi_r,
            keys,
            encr_id=suite.encr,
            key_bits=suite.key_bits,
            integ_id=suite.integ,
        )

    def _up(
        self,
        c: Connection,
        r: IkeSaResult,
        role: str,
        encap: bool,
        sas: tuple[SaConfig, SaConfig],
        child: str = "",
    ) -> None:
        """Record a newly established IKE SA, export its keys if asked, publish up/child_up."""
        if self.key_export is not None:
            self._export_ike(r.spi_i, r.spi_r, r.keys, r.suite)
            self.key_export.child_sas(sas)
        self._next_id += self._id_step
        wall = time.time()
        rec = IkeRecord(
            id=self._next_id,
            conn=c,
            role=role,
            spi_i=r.spi_i,
            spi_r=r.spi_r,
            port=NAT_T_PORT if encap else IKE_PORT,
            established_at=wall,
            child_installed_at=wall,
            suite=r.suite,
        )
        self.records[r.spi_i + r.spi_r] = rec
        self._emit(ev.UP, c, rec)
        self._emit(
            ev.CHILD_UP,
            c,
            rec,
            spi_in=r.child.spi_in.hex(),
            spi_out=r.child.spi_out.hex(),
            child=child or c.child_names[0],
        )

    def _emit(self, kind: str, c: Connection, rec: IkeRecord | None, **kw: str) -> None:
        self.events.publish(
            KeymgrEvent(
                kind=kind,
                time=time.time(),
                connection=c.name,
                role=rec.role if rec is not None else kw.pop("role", ""),
                ike_sa_id=rec.id if rec is not None else 0,
                spi_i=rec.spi_i.hex() if rec is not None else kw.pop("spi_i", ""),
                spi_r=rec.spi_r.hex() if rec is not None else "",
                **kw,
            )
        )

    def _failed(self, c: Connection, role: str, spi_i: bytes, reason: str | None) -> None:
        kind = ev.failure_kind(reason)
        hint = ev.failure_hint(reason)
        self._emit(kind, c, None, role=role, spi_i=spi_i.hex(), reason=hint)

    def _down(self, rec: IkeRecord, reason: str) -> None:
        key = rec.spi_i + rec.spi_r
        if self.records.pop(key, None) is not None:
            # after the child_down of a removal still in flight, as when removals blocked
            self._after(key, lambda: self._emit(ev.DOWN, rec.conn, rec, reason=reason))

    def _after(self, key: bytes, fn: Callable[[], None]) -> None:
        """Run ``fn`` once IKE SA ``key``'s worker call in flight finished (now if none)."""
        op = next((op for op in self._pending if op.key == key and not op.done), None)
        if op is None:
            fn()
            return
        first = op.then

        def chained(err: BaseException | None) -> None:
            first(err)
            fn()

        op.then = chained

    def _down_key(self, key: bytes, reason: str) -> None:
        rec = self.records.get(key)
        if rec is not None:
            self._down(rec, rec.closing or reason)

    def _ike_of(
        self, rec: IkeRecord
    ) -> tuple[Ikev2Initiator | Ikev2Responder, Callable[[list[bytes]], None]] | None:
        """The live IKE SA object of a record and how to send for it."""
        for s in self.sessions:
            ini = s.initiator
            if ini is not None and ini.result is not None and ini.spi_i == rec.spi_i:
                if ini.result.spi_r == rec.spi_r:
                    return ini, functools.partial(self._send, s)
        rs = self.responders.get(rec.spi_i)
        if rs is not None and rs.responder.spi_r == rec.spi_r:
            return rs.responder, functools.partial(self._send_responder, rs)
        return None

    def connection(self, name: str) -> Connection:
        """The configured connection ``name``; LookupError if there is none."""
        for s in self.sessions:
            if s.conn.name == name:
                return s.conn
        for c, _ in self.responder_conns:
            if c.name == name:
                return c
        raise LookupError(f"no connection named {name!r}")

    def initiate(self, name: str, now: float, child: str = "") -> tuple[bool, str]:
        """Start connection ``name``, or only its child ``child`` (main loop only): a
        CREATE_CHILD_SA on its IKE SA when one is up (RFC 7296 §1.3.1), else the IKE SA
        first. LookupError:
        unknown connection or child; ValueError: a responder-only connection without an IKE
        SA. (False, why) when it is up or being negotiated already."""
        c = self.connection(name)
        session = next((s for s in self.sessions if s.conn is c), None)
        if child:
            c.child(child)  # LookupError for an unknown child
            states = self._states(name)
            if any((st.key, child) in self._children for st in states):
                return False, f"child {child!r} already up"
            if states:
                if not self._create_child(states[-1], child, now):
                    return False, "the IKE SA is closing"
                return True, "CREATE_CHILD_SA sent"
            if session is not None and child != c.child_names[0]:
                detail = self._want_child(session, child, now)
                return session.initiator is not None, detail
        if session is None:
            raise ValueError(
                f"connection {name!r} only responds (start_action {c.start_action!r}); "
                "the peer must initiate it"
            )
        ini = session.initiator
        if ini is not None and ini.state is State.ESTABLISHED:
            return False, "IKE SA already established"
        if ini is not None and ini.state in (State.SA_INIT_SENT, State.AUTH_SENT):
            return False, "IKE SA negotiation already in progress"
        self._initiate(session, now)
        if session.initiator is None:
            return False, f"cannot start: see keymgr's log; retrying in {RETRY_AFTER_FAILURE}s"
        return True, "IKE_SA_INIT sent"

    def terminate_child(
        self, now: float, *, name: str = "", child: str = "", spi_in: int | None = None
    ) -> tuple[int, str]:
        """Send an INFORMATIONAL Delete (RFC 7296 §1.4.1) of connection ``name``'s Child SAs
        of child ``child``, or of the Child SA with our inbound SPI ``spi_in``; the IKE SA and
        its other children stay (main loop only). LookupError when nothing matches."""
        if spi_in is None:
            self.connection(name).child(child)  # LookupError when unknown
        sent = 0
        for st in list(self._ikes.values()):
            if st.info.closed:
                continue
            if spi_in is None:
                if st.conn.name != name:
                    continue
                pairs = st.info.children_named(child)
            else:
                pairs = [p for p in st.info.children if int.from_bytes(p[0], "big") == spi_in]
            out: list[bytes] = []
            for pair in pairs:
                log.info(
                    "child deleting",
                    extra={
                        "conn": st.conn.name,
                        "child": st.info.child_name(pair[0]),
                        "spi_in": pair[0].hex(),
                        "by": "operator",
                    },
                )
                out += st.info.delete_child(now, pair[0])
                sent += 1
            if out:
                st.send(out)
        if spi_in is not None and not sent:
            raise LookupError(f"no Child SA with inbound SPI {spi_in:08x}")
        if not sent:
            return 0, f"no Child SA of child {child!r} is up"
        return sent, f"Delete sent for {sent} Child SA(s)"

    def terminate(
        self, now: float, *, name: str | None = None, ike_sa_id: int | None = None
    ) -> tuple[int, str]:
        """Send a Delete of the matching IKE SAs (main loop only); an initiator still
        negotiating is abandoned. LookupError when nothing matches the name or id."""
        if name is not None:
            self.connection(name)
            recs = [r for r in self.records.values() if r.conn.name == name]
        else:
            recs = [r for r in self.records.values() if r.id == ike_sa_id]
            if not recs:
                raise LookupError(f"no established IKE SA with id {ike_sa_id}")
        aborted = 0
        if name is not None:
            for s in self.sessions:
                ini = s.initiator
                if s.conn.name == name and (
                    s.retry_at is not None
                    or (ini is not None and ini.state in (State.SA_INIT_SENT, State.AUTH_SENT))
                ):
                    s.initiator, s.retry_at = None, None
                    aborted += 1
        sent = 0
        for rec in recs:
            found = self._ike_of(rec)
            if found is None or rec.closing:
                continue
            ike, send = found
            log.info(
                "ike deleting",
                extra={"conn": rec.conn.name, "spi_i": rec.spi_i.hex(), "by": "operator"},
            )
            rec.closing = "terminated by the operator"
            rec.close_deadline = now + TERMINATE_WAIT
            rec.resend_at = now + 1.0
            send(ike.delete_ike(now))
            sent += 1
        detail = f"Delete sent for {sent} IKE SA(s)"
        if aborted:
            detail += f"; {aborted} negotiation(s) abandoned"
        return sent, detail

    # --- live reconfiguration ---------------------------------------------------------------

    def connections(self) -> tuple[Connection, ...]:
        """The connections keymgr runs now (initiating ones, then responding ones)."""
        return (*(s.conn for s in self.sessions), *(c for c, _ in self.responder_conns))

    def _reqids(self, c: Connection) -> tuple[int, ...]:
        return tuple(self._child_ids[(c.name, n)][0] for n in c.child_names)

    def reconfigure(
        self, connections: Sequence[Connection], now: float, *, revision: int = 0
    ) -> dict[str, list[str]]:
        """Replace the running connections by ``connections`` without a restart (main loop
        only; other threads use :meth:`submit`). Connections are compared by name, full
        configuration and reqids: a removed one has its IKE SAs deleted (a Delete sent to the
        peer, its Child SAs removed from the worker) and its state dropped; an added one starts
        per its start_action (trap: its reqid's ACQUIRE initiates); a changed one is removed,
        then added. Unchanged connections and their SAs are not touched. ``revision``: the
        policy revision this configuration comes from (0: none), published with the "config"
        event. ConfigError (nothing changed) for duplicate names or clashing reqids."""
        names = [c.name for c in connections]
        if len(set(names)) != len(names):
            raise ConfigError("duplicate connection name")
        reqids = connection_reqids(connections)
        old = {c.name: (c, self._reqids(c)) for c in self.connections()}
        new = {c.name: (c, reqids[c.name]) for c in connections}
        removed = [n for n in old if n not in new]
        changed = [n for n in old if n in new and old[n] != new[n]]
        added = [n for n in new if n not in old]
        for n in removed:
            self._drop_connection(n, now, "connection removed from the configuration")
        for n in changed:
            self._drop_connection(n, now, "connection changed in the configuration")
        for c in connections:
            if c.name in added or c.name in changed:
                self._add_connection(c, reqids[c.name], now)
        if revision:
            self.policy_revision = revision
        out = {"added": added, "removed": removed, "changed": changed}
        log.info(
            "configuration applied",
            extra={"revision": revision, **{k: ",".join(v) for k, v in out.items()}},
        )
        parts = [f"{k} {','.join(v)}" for k, v in out.items() if v]
        self.events.publish(
            KeymgrEvent(
                kind=ev.CONFIG,
                time=time.time(),
                connection="",
                reason=f"revision {revision}: " + ("; ".join(parts) or "no change"),
            )
        )
        return out

    def _add_connection(self, c: Connection, reqids: tuple[int, ...], now: float) -> None:
        self._set_child_ids(c, reqids)
        if c.responds:
            self.responder_conns.append((c, reqids[0]))
            return
        s = Session(c, reqid=reqids[0])
        self.sessions.append(s)
        if self._stream is not None:  # running (else run() starts it)
            self._start(s, now)

    def _drop_connection(self, name: str, now: float, reason: str) -> None:
        """Forget connection ``name``: one Delete of each of its IKE SAs to the peer (not
        retransmitted: the connection is gone, and a peer that misses it finds out by its
        liveness checks), its Child SAs removed from the worker with their SPD entries (file
        mode), negotiations abandoned, and every per-connection state dropped."""
        for rec in [r for r in self.records.values() if r.conn.name == name]:
            found = self._ike_of(rec)
            if found is not None and not rec.closing:
                ike, send = found
                log.info(
                    "ike deleting",
                    extra={"conn": name, "spi_i": rec.spi_i.hex(), "by": "reconfiguration"},
                )
                rec.closing = reason
                send(ike.delete_ike(now))
        # abandoned first: an install in flight that finishes while its removal waits for it
        # (_settle) must neither answer the peer nor track the IKE SA
        for rs in self.responders.values():
            if rs.conn.name == name:
                rs.dropped = True
        for s in [s for s in self.sessions if s.conn.name == name]:
            s.initiator, s.retry_at, s.held, s.want = None, None, False, set()
            self.sessions.remove(s)
        keys = [k for k, st in self._ikes.items() if st.conn.name == name]
        keys += [k[0] for k, ch in self._children.items() if ch.conn.name == name]
        for key in dict.fromkeys(keys):
            self._untrack(key)
            self._remove_children(key, reason)
        for key in [k for k, st in self._ikes.items() if st.conn.name == name]:
            self._untrack(key)
        for rec in [r for r in self.records.values() if r.conn.name == name]:
            self._down(rec, reason)
        self.responder_conns = [(c, r) for c, r in self.responder_conns if c.name != name]
        for spi in [spi for spi, rs in self.responders.items() if rs.conn.name == name]:
            del self.responders[spi]
        for k in [k for k in self._child_ids if k[0] == name]:
            del self._child_ids[k]
        self._auth_cache.pop(name, None)
        self._responder_cfgs.pop(name, None)
        self.responder_drops.pop(name, None)
        self.responder_error_answers.pop(name, None)
        # trap / hold entries without SAs (file mode; policy mode keeps no SPD)
        for spd_key in [k for k in self._spd if k == name or k.startswith(name + "\n")]:
            self._apply(
                None, _on_error("policy withdrawal failed", {"conn": name}), spd=(spd_key, None)
            )

    def _closing_timers(self, now: float) -> None:
        """Retransmit our operator-requested Deletes; give up after TERMINATE_WAIT."""
        for key, rec in list(self.records.items()):
            if not rec.closing:
                continue
            found = self._ike_of(rec)
            if found is not None and now < rec.close_deadline:
                if now >= rec.resend_at:
                    rec.resend_at = now + 1.0
                    found[1](found[0].delete_ike(now))
                continue
            log.warning(
                "peer did not answer our Delete",
                extra={"conn": rec.conn.name, "spi_i": rec.spi_i.hex()},
            )
            for s in self.sessions:
                if s.initiator is not None and s.initiator.spi_i == rec.spi_i:
                    s.initiator, s.installed = None, False
            if rec.role == "responder":
                self.responders.pop(rec.spi_i, None)
            self._remove_children(key, rec.closing + " (the peer did not answer)")
            self._down(rec, rec.closing + " (the peer did not answer)")

    def ike_sa_views(self) -> list[IkeSaView]:
        """Every IKE SA keymgr knows: established, being negotiated, or failed (main loop)."""
        out: list[IkeSaView] = []

        def algs(suite: IkeSuite) -> dict[str, str]:
            return {
                "encryption": ev.algorithm_name(suite.encr, suite.key_bits),
                "integrity": Integ(suite.integ).name,
                "prf": Prf(suite.prf).name,
                "dh_group": DhGroupId(suite.dh).name,
            }

        def view(
            c: Connection,
            role: str,
            state: str,
            spi_i: bytes,
            spi_r: bytes,
            port: int,
            nat_t: bool,
            reason: str | None,
        ) -> IkeSaView:
            rec = self.records.get(spi_i + spi_r)
            # the negotiated suite once established, else our first proposal
            suite = rec.suite if rec is not None else c.ike_suites[0]
            return IkeSaView(
                id=rec.id if rec is not None else 0,
                connection=c.name,
                role=role,
                state="closing" if rec is not None and rec.closing else state,
                local_addr=c.local_addr,
                local_port=rec.port if rec is not None else port,
                remote_addr=c.remote_addr,
                remote_port=rec.port if rec is not None else port,
                spi_i=spi_i.hex(),
                spi_r=spi_r.hex(),
                nat_t=nat_t,
                established_time=rec.established_at if rec is not None else 0.0,
                failure_reason=ev.failure_hint(reason) if state == "failed" else "",
                **algs(suite),
            )

        for s in self.sessions:
            ini = s.initiator
            if ini is None:
                continue
            spi_r = ini.result.spi_r if ini.result is not None else bytes(8)
            port = NAT_T_PORT if ini.port_float else IKE_PORT
            st = _STATE_NAMES.get(ini.state.value, ini.state.value)
            out.append(
                view(
                    s.conn,
                    "initiator",
                    st,
                    ini.spi_i,
                    spi_r,
                    port,
                    ini.port_float,
                    ini.failure_reason,
                )
            )
        for rs in self.responders.values():
            r = rs.responder
            st = _STATE_NAMES.get(r.state.value, r.state.value)
            out.append(
                view(rs.conn, "responder", st, r.spi_i, r.spi_r, rs.port, r.nat_t, r.failure_reason)
            )
        return out

    def child_sa_views(self) -> list[ChildSaView]:
        """The Child SAs installed in the worker (main loop)."""
        out: list[ChildSaView] = []
        for (key, name), ch in self._children.items():
            c, pair = ch.conn, ch.pair
            rec = self.records.get(key)
            retiring = self._retiring.get((key, name), [])
            states = [("installed", pair), *(("retiring", p) for p in retiring)]
            for state, (inbound, outbound) in states:
                out.append(
                    ChildSaView(
                        ike_sa_id=rec.id if rec is not None else 0,
                        connection=c.name,
                        state=state,
                        spi_in=inbound.spi,
                        spi_out=outbound.spi,
                        dst_in=inbound.dst,
                        dst_out=outbound.dst,
                        encryption=ev.sa_encryption(inbound),
                        integrity=ev.sa_integrity(inbound),
                        esn=inbound.esn,
                        udp_encap=inbound.encap is not None,
                        mode=inbound.mode.name.lower(),
                        protocol="ah" if inbound.protocol == IpProto.AH else "esp",
                        local_ts=(c.local_ts,),
                        remote_ts=(c.remote_ts,),
                        reqid=inbound.reqid,
                        install_time=ch.installed_at,
                        name=name,
                    )
                )
        return out


def _nothing(_now: float) -> None:
    """A command that only wakes the main loop."""


def _on_error(msg: str, extra: dict[str, str]) -> Callable[[BaseException | None], None]:
    """A continuation for _apply that only logs a failure."""

    def then(err: BaseException | None) -> None:
        if err is not None:
            _log_failure(msg, extra, err)

    return then


def _log_failure(msg: str, extra: dict[str, str], err: BaseException) -> None:
    """Log a refused or failed worker call: the gRPC status code and the error's type."""
    code = err.code() if isinstance(err, grpc.RpcError) else None
    log.error(msg, extra={**extra, "code": str(code), "error": type(err).__name__})


def _lease_key(sa: SaConfig) -> LeaseKey:
    return LeaseKey(sa.spi, sa.dst, sa.protocol)


@functools.lru_cache(maxsize=4096)
def _packed(addr: str) -> bytes:
    """The packed form of a textual IP address (the same few addresses on every datagram)."""
    return ipaddress.ip_address(addr).packed


@functools.lru_cache(maxsize=1024)
def _selector(src: str, dst: str) -> Selector:
    """Selector.make for a connection's prefixes (immutable; the same for each Child SA)."""
    return Selector.make(src, dst)


def _same_addr(a: str, b: str) -> bool:
    """Textual IP addresses equal as addresses (IPv6 has several spellings)."""
    if a == b:
        return True
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return False


def _is_sa_init_request(d: IkeDatagram) -> bool:
    """An IKE_SA_INIT request (RFC 7296 §1.2): message ID 0, Initiator flag, no SPIr."""
    try:
        hdr = decode_header(d.data)
    except IkeDecodeError:
        return False
    return (
        hdr.exchange_type == ExchangeType.IKE_SA_INIT
        and hdr.initiator
        and not hdr.response
        and hdr.message_id == 0
        and not any(hdr.spi_r)
    )


def _matches(d: IkeDatagram, c: Connection) -> bool:
    return _same_addr(d.local_addr, c.local_addr) and _same_addr(d.remote_addr, c.remote_addr)


def child_sa_configs(
    c: Connection,
    r: IkeSaResult,
    reqid: int,
    *,
    initiator: bool = True,
    encap: bool | None = None,
    seq_lease_block: int = 0,
) -> tuple[SaConfig, SaConfig, SpdEntry]:
    """The inbound and outbound ESP or AH SAs and the SPD entry for an established IKE SA.

    ``child.spi_in`` is always our SPI (inbound, remote→local) and ``spi_out`` the peer's
    (outbound, local→remote). RFC 7296 §2.17: the initiator→responder key is ``encr_i``, so as
    initiator inbound uses ``encr_r`` and outbound ``encr_i``; as responder the other way
    round (integrity keys likewise). Encryption keys carry the cipher's salt (RFC 4106 §8.1,
    RFC 7634 §2). The negotiated algorithms, ESN and mode (tunnel / transport) come from the
    Child SA result. ``encap`` (default: the result's ``nat_t``) selects ESP-in-UDP 4500/4500;
    when NAT detection found us behind a NAT the outbound SA sends NAT keepalives every
    ``c.keepalive`` seconds of silence. An AH Child SA (RFC 4302; integrity keys only) is never
    UDP-encapsulated (RFC 3948 covers ESP only) and is refused (ValueError) when NAT was
    detected: AH authenticates the addresses a NAT rewrites.
    ``seq_lease_block`` > 0: the outbound SA may send sequence numbers [1, block] only (a
    lease, extended on the worker's LeaseLow); 0: the whole sequence space.
    """
    child = r.child
    if child.ah and r.nat_detected:
        raise ValueError(AH_NAT_REASON)
    local = _packed(c.local_addr)
    remote = _packed(c.remote_addr)
    use_encap = (r.nat_t if encap is None else encap) and not child.ah
    encap_cfg = UdpEncap(NAT_T_PORT, NAT_T_PORT) if use_encap else None
    # RFC 3948 §2.3: the peer behind the NAT keeps its mapping open, so only when we are
    keepalive = c.keepalive if use_encap and r.local_behind_nat else 0.0
    k = child.keys
    (key_in, integ_in), (key_out, integ_out) = (
        ((k.encr_r, k.integ_r), (k.encr_i, k.integ_i))
        if initiator
        else ((k.encr_i, k.integ_i), (k.encr_r, k.integ_r))
    )
    sel_out = _selector(c.local_ts, c.remote_ts)
    sel_in = _selector(c.remote_ts, c.local_ts)
    inbound = SaConfig(
        spi=int.from_bytes(child.spi_in, "big"),
        protocol=int(IpProto.AH if child.ah else IpProto.ESP),
        direction=Direction.INBOUND,
        mode=child.mode,
        src=remote,
        dst=local,
        encr_id=int(child.encr_id),
        encr_key=key_in,
        integ_id=int(child.integ_id),
        integ_key=integ_in,
        esn=child.esn,
        encap=encap_cfg,
        allow_legacy=c.allow_legacy,  # the worker refuses HMAC-SHA1-96 / 3DES without it
        reqid=reqid,
        selectors=(sel_in,),
        lifetime=Lifetime(
            hard_seconds=c.child_life_time,
            soft_bytes=c.rekey_bytes,
            soft_packets=c.rekey_packets,
        ),
    )
    outbound = replace(
        inbound,
        spi=int.from_bytes(child.spi_out, "big"),
        direction=Direction.OUTBOUND,
        src=local,
        dst=remote,
        encr_key=key_out,
        integ_key=integ_out,
        selectors=(sel_out,),
        encap=replace(encap_cfg, keepalive_interval=keepalive) if encap_cfg else None,
        seq_lease_end=first_lease(seq_lease_block, child.esn) if seq_lease_block else 0,
    )
    return inbound, outbound, connection_spd(c, reqid)


def connection_spd(c: Connection, reqid: int) -> SpdEntry:
    """The connection's PROTECT entry (local_ts -> remote_ts) with its reqid; its SA bundle is
    the connection's Child SA protocol, ESP or AH."""
    return SpdEntry(
        policy_id=reqid,
        priority=SPD_PRIORITY,
        action=Action.PROTECT,
        selector=_selector(c.local_ts, c.remote_ts),
        reqid=reqid,
        protocols=(int(IpProto.AH if c.ah else IpProto.ESP),),
    )


def child_policy(c: Connection, name: str) -> ChildPolicy:
    """Child ``name`` of connection ``c`` as the IKE core negotiates it (selectors, ESP
    suites, mode)."""
    v = c.child(name)
    return ChildPolicy.of_ranges(
        name, v.ts_range("local"), v.ts_range("remote"), v.child_suites, v.sa_mode
    )
