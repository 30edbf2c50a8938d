"""The keymgr daemon: IKEv2 initiator sessions whose datagrams travel through a dataplane
worker's punt/inject stream, and whose Child SAs are installed into that worker.

Flow per connection with ``start_action == "start"`` (RFC 7296 §1.2):

1. an :class:`~services.core.ike.exchange.Ikev2Initiator` produces IKE_SA_INIT; keymgr injects
   it through the worker's Punt stream from (local_addr, 500) to (remote_addr, 500);
2. punted datagrams whose (local, remote) address pair matches the connection are fed to
   ``receive()``; after ``port_float`` (the responder sent NAT-D) IKE moves to UDP 4500 — the
   worker adds and strips the RFC 3948 non-ESP marker itself, so keymgr never sees it;
3. ``on_timer()`` drives retransmission;
4. on ESTABLISHED the inbound and outbound ESP SAs (AES-GCM-16, tunnel mode, ESP-in-UDP
   4500/4500 when IKE floated) and one SPD PROTECT entry are installed with a shared reqid.

Responder role, per connection with ``start_action`` ``"none"`` / ``"respond"``: a punted
IKE_SA_INIT request whose (local, remote) address pair matches the connection starts an
:class:`~services.core.ike.responder.Ikev2Responder`, keyed by the initiator's IKE SPI; its
answers go back through punt-inject on the ports the request arrived on (500, or 4500 after
the initiator floated). At most ``MAX_HALF_OPEN`` responders may be half-open (not yet
ESTABLISHED); further IKE_SA_INIT requests are dropped and counted (cookies: future work).
Half-open responders expire after ``HALF_OPEN_TIMEOUT``. On ESTABLISHED the same
installation path as the initiator's runs, with the keys of the responder's side.

After ESTABLISHED (RFC 7296 §1.4): punted datagrams are routed to their IKE SA by the SPIs in
the IKE header and INFORMATIONAL requests are answered by the core. A peer's Delete of the
Child SA removes both ESP SAs from the worker and withdraws the connection's SPD entry (a
replace_spd with a higher revision); a Delete of the IKE SA does the same for all of its Child
SAs (the connection is not initiated again). ``stop()`` (SIGTERM) sends a Delete of the IKE SA
for every established IKE SA, waits up to ``SHUTDOWN_WAIT`` for the responses, then removes the
SAs from the worker.

A CHILD SA rekey started by the peer (CREATE_CHILD_SA, RFC 7296 §2.8) installs the new pair
under the same reqid and removes the old pair when the peer's Delete of it arrives.

Authentication (PSK or certificates, :mod:`services.keymgr.credentials`) is read from the
connection's files each time an IKE SA starts, so rotated secrets and certificates are used;
an authentication failure is logged with the core's reason (untrusted CA, revoked, identity
not in the certificate, wrong PSK, ...).

Scope: one IKE SA per connection, we start no rekey, no ACQUIRE-triggered negotiation. Keys are
never logged: only SPIs appear in logs.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import grpc

from services.core.iana import IpProto
from services.core.ike.constants import ExchangeType
from services.core.ike.exchange import (
    NAT_T_PORT,
    ChildSaResult,
    IkeSaResult,
    Ikev2Initiator,
    InitiatorConfig,
    State,
)
from services.core.ike.informational import InfoEvent
from services.core.ike.message import IkeDecodeError, decode_header
from services.core.ike.responder import Ikev2Responder, ResponderConfig, ResponderState
from services.core.sa import Direction, Mode, SaConfig, UdpEncap
from services.core.selectors import Selector
from services.core.spd import Action, SpdEntry
from services.dataplane.client import DataplaneClient, IkeDatagram, PuntStream
from services.keymgr.config import Connection
from services.keymgr.credentials import authentication

log = logging.getLogger("keymgr")

IKE_PORT = 500
SPD_PRIORITY = 100
RETRY_AFTER_FAILURE = 5.0  # seconds before a failed connection is initiated again
TICK = 0.5  # longest wait for a punted datagram when no retransmit is due
MAX_HALF_OPEN = 64  # responders not yet ESTABLISHED; more IKE_SA_INITs are dropped
HALF_OPEN_TIMEOUT = 30.0  # seconds a half-open (or failed) responder is kept
SHUTDOWN_WAIT = 2.0  # seconds to wait for the peers' responses to our Delete on stop()
MAX_RESPONDERS = 1024  # all responder IKE SAs kept (established ones answer liveness checks)


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


@dataclass
class ResponderSession:
    """One IKE SA that a peer initiated towards a responder connection."""

    conn: Connection
    reqid: int
    responder: Ikev2Responder
    installed: bool = False
    port: int = IKE_PORT  # the UDP port IKE uses (500, or 4500 after the initiator floated)


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
    ) -> None:
        self.client = client
        self.clock = clock
        self.sessions = [
            Session(c, reqid=i + 1) for i, c in enumerate(connections) if not c.responds
        ]
        self.responder_conns = [(c, i + 1) for i, c in enumerate(connections) if c.responds]
        # keyed by the initiator's IKE SPI (from the IKE header)
        self.responders: dict[bytes, ResponderSession] = {}
        self.half_open_dropped = 0  # IKE_SA_INIT requests refused by the MAX_HALF_OPEN bound
        self._spd: dict[str, SpdEntry] = {}  # installed PROTECT entry per connection name
        self._rx: queue.Queue[IkeDatagram] = queue.Queue()
        self._stop = threading.Event()
        self._stream: PuntStream | None = None
        self._spd_revision = 0
        # installed Child SAs per IKE SA (key: SPIi | SPIr): connection and (inbound, outbound)
        self._children: dict[bytes, tuple[Connection, tuple[SaConfig, SaConfig]]] = {}
        # Child SAs replaced by a rekey, kept until the peer deletes them (make-before-break)
        self._retiring: dict[bytes, list[tuple[SaConfig, SaConfig]]] = {}
        self.failed = False  # the punt stream broke (worker gone): the caller should exit non-zero

    # --- lifecycle --------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask run() to return; it first deletes the established IKE SAs (see _shutdown)."""
        self._stop.set()

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
        self._stream = stream
        reader = threading.Thread(target=self._reader, args=(stream,), daemon=True)
        reader.start()
        log.info("punt stream connected", extra={"target": self.client.target})
        try:
            now = self.clock()
            for s in self.sessions:
                self._initiate(s, now)
            while not self._stop.is_set():
                try:
                    d = self._rx.get(timeout=self._wait())
                except queue.Empty:
                    d = None
                now = self.clock()
                if d is not None:
                    self._dispatch(d, now)
                self._timers(now)
            if not self.failed:
                self._shutdown()
        finally:
            stream.cancel()
            reader.join(timeout=2.0)

    # --- sessions ---------------------------------------------------------------------------

    def _wait(self) -> float:
        now = self.clock()
        deadline = now + TICK
        for s in self.sessions:
            ini = s.initiator
            if ini is not None and ini.next_timeout is not None:
                deadline = min(deadline, ini.next_timeout)
            if s.retry_at is not None:
                deadline = min(deadline, s.retry_at)
        return max(0.0, deadline - now)

    def _initiate(self, s: Session, now: float) -> None:
        c = s.conn
        try:
            mine, theirs = authentication(c)
            cfg = InitiatorConfig(
                local_addr=c.local_addr,
                remote_addr=c.remote_addr,
                local_auth=mine,
                peer_auth=theirs,
                ts_local=c.ts_range("local"),
                ts_remote=c.ts_range("remote"),
                local_id=c.local_id,
                remote_id=c.remote_id,
                fragment_size=c.fragment_size,
            )
        except ValueError as e:
            log.error("cannot start connection", extra={"conn": c.name, "reason": str(e)})
            s.retry_at = now + RETRY_AFTER_FAILURE
            return
        ini = Ikev2Initiator(cfg, now=now)
        s.initiator = ini
        s.retry_at = None
        log.info(
            "ike initiating",
            extra={"conn": c.name, "spi_i": ini.spi_i.hex(), "remote": c.remote_addr},
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
            if (d.local_addr, d.remote_addr) == (c.local_addr, c.remote_addr):
                self._respond(c, reqid, d, now)
                return
        for s in self.sessions:
            c = s.conn
            if (d.local_addr, d.remote_addr) != (c.local_addr, c.remote_addr):
                continue
            ini = s.initiator
            if ini is not None and ini.state is State.ESTABLISHED:
                self._established_datagram(s, ini, d, now)
                return
            if ini is None or ini.state not in (State.SA_INIT_SENT, State.AUTH_SENT):
                log.debug("ignoring IKE datagram", extra={"conn": c.name})
                return
            self._send(s, ini.receive(d.data, now))
            self._check(s, now)
            return
        log.debug("IKE datagram for no connection", extra={"remote": d.remote_addr})

    # --- responder role --------------------------------------------------------------------

    def _half_open(self) -> int:
        """Responder IKE SAs not ESTABLISHED (waiting for IKE_AUTH, or failed and not expired)."""
        return sum(
            1
            for r in self.responders.values()
            if r.responder.state is not ResponderState.ESTABLISHED
        )

    def _respond(self, c: Connection, reqid: int, d: IkeDatagram, now: float) -> None:
        try:
            hdr = decode_header(d.data)
        except IkeDecodeError:
            log.debug("malformed IKE datagram dropped", extra={"conn": c.name})
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
                mine, theirs = authentication(c)
                cfg = ResponderConfig(
                    local_addr=c.local_addr,
                    local_auth=mine,
                    peer_auth=theirs,
                    ts_local=c.ts_range("local"),
                    ts_remote=c.ts_range("remote"),
                    local_id=c.local_id,
                    remote_id=c.remote_id or c.remote_addr,
                    remote_addr=c.remote_addr,
                    fragment_size=c.fragment_size,
                )
            except ValueError as e:
                log.error("cannot answer IKE_SA_INIT", extra={"conn": c.name, "reason": str(e)})
                return
            rs = ResponderSession(c, reqid, Ikev2Responder(cfg, now=now))
        local = (ipaddress.IPv4Address(d.local_addr).packed, d.local_port)
        remote = (ipaddress.IPv4Address(d.remote_addr).packed, d.remote_port)
        before = rs.responder.state
        out = rs.responder.receive(d.data, now, remote=remote, local=local)
        if hdr.spi_i not in self.responders:
            if rs.responder.state is ResponderState.WAIT_SA_INIT and not out:
                return  # dropped before any state (malformed request)
            if rs.responder.state is not ResponderState.WAIT_SA_INIT:
                self.responders[hdr.spi_i] = rs
                log.info(
                    "ike responding",
                    extra={
                        "conn": c.name,
                        "spi_i": hdr.spi_i.hex(),
                        "spi_r": rs.responder.spi_r.hex(),
                        "remote": d.remote_addr,
                    },
                )
        assert self._stream is not None
        for data in out:
            self._stream.send(
                IkeDatagram(d.local_addr, d.local_port, d.remote_addr, d.remote_port, data)
            )
        st = rs.responder.state
        if st is ResponderState.FAILED and before is not ResponderState.FAILED:
            log.warning(
                "ike failed",
                extra={"conn": c.name, "role": "responder", "reason": rs.responder.failure_reason},
            )
        elif st is ResponderState.ESTABLISHED and not rs.installed:
            r = rs.responder.result
            assert r is not None
            encap = d.local_port == NAT_T_PORT
            rs.port = d.local_port
            rs.installed = self._install(c, r, rs.reqid, initiator=False, encap=encap)
            if not rs.installed:
                self.responders.pop(hdr.spi_i, None)
        elif before is ResponderState.ESTABLISHED:
            r = rs.responder.result
            assert r is not None
            self._info_events(c, r, rs.responder.take_events(), "responder")
            if st is ResponderState.CLOSED:
                self.responders.pop(hdr.spi_i, None)

    # --- after ESTABLISHED (RFC 7296 §1.4) ---------------------------------------------------

    def _established_datagram(
        self, s: Session, ini: Ikev2Initiator, d: IkeDatagram, now: float
    ) -> None:
        try:
            hdr = decode_header(d.data)
        except IkeDecodeError:
            return
        if hdr.spi_i != ini.spi_i:
            log.debug("IKE datagram for another IKE SA", extra={"conn": s.conn.name})
            return
        self._send(s, ini.receive(d.data, now))
        assert ini.result is not None
        self._info_events(s.conn, ini.result, ini.take_events(), "initiator")
        if ini.state is State.CLOSED:
            s.installed = False

    def _info_events(
        self, c: Connection, r: IkeSaResult, events: list[InfoEvent], role: str
    ) -> None:
        ike = {"conn": c.name, "role": role, "spi_i": r.spi_i.hex(), "spi_r": r.spi_r.hex()}
        for e in events:
            if e.kind == "child_deleted":
                log.info(
                    "child deleted by peer",
                    extra={**ike, "spi_in": e.spi_in.hex(), "spi_out": e.spi_out.hex()},
                )
                if not self._remove_retired(r.spi_i + r.spi_r, e.spi_in, e.spi_out):
                    self._remove_children(r.spi_i + r.spi_r)
            elif e.kind == "child_rekeyed" and e.child is not None:
                self._rekeyed(r, e.spi_in, e.spi_out, e.child, ike)
            elif e.kind == "ike_deleted":
                log.info("ike deleted", extra=ike)
                self._remove_children(r.spi_i + r.spi_r)
            else:
                log.debug("informational answered", extra=ike)

    def _rekeyed(
        self,
        r: IkeSaResult,
        old_in: bytes,
        old_out: bytes,
        child: ChildSaResult,
        ike: dict[str, str],
    ) -> None:
        """The peer rekeyed a Child SA (RFC 7296 §2.8): install the new pair under the same
        reqid (the worker sends on the newest outbound SA of a reqid) and keep the old pair
        until the peer's Delete of it. The peer started the CREATE_CHILD_SA, so it is the
        "initiator" for the new keys (§2.17): our inbound key is ``encr_i``."""
        key = r.spi_i + r.spi_r
        entry = self._children.get(key)
        if entry is None:
            return
        c, (cur_in, cur_out) = entry
        try:
            inbound, outbound, _spd = child_sa_configs(
                c,
                replace(r, child=child),
                cur_in.reqid,
                initiator=False,
                encap=cur_in.encap is not None,
            )
            self.client.install_sa(inbound)
            self.client.install_sa(outbound)
        except (grpc.RpcError, ValueError) as e:
            code = e.code() if isinstance(e, grpc.RpcError) else None
            log.error(
                "rekeyed child install failed",
                extra={**ike, "code": str(code), "error": type(e).__name__},
            )
            return
        self._children[key] = (c, (inbound, outbound))
        self._retiring.setdefault(key, []).append((cur_in, cur_out))
        log.info(
            "child rekeyed",
            extra={
                **ike,
                "old_spi_in": old_in.hex(),
                "old_spi_out": old_out.hex(),
                "spi_in": child.spi_in.hex(),
                "spi_out": child.spi_out.hex(),
                "reqid": cur_in.reqid,
            },
        )

    def _remove_retired(self, key: bytes, spi_in: bytes, spi_out: bytes) -> bool:
        """Delete a Child SA pair replaced by a rekey; False if (spi_in, spi_out) is none."""
        pairs = self._retiring.get(key, [])
        want = (int.from_bytes(spi_in, "big"), int.from_bytes(spi_out, "big"))
        for pair in pairs:
            if (pair[0].spi, pair[1].spi) != want:
                continue
            pairs.remove(pair)
            try:
                for sa in pair:
                    self.client.delete_sa(sa.spi, sa.dst, sa.protocol, sa.direction)
            except grpc.RpcError as e:
                log.error("old child removal failed", extra={"code": str(e.code())})
            else:
                log.info(
                    "old child removed",
                    extra={"spi_in": spi_in.hex(), "spi_out": spi_out.hex()},
                )
            return True
        return False

    def _remove_children(self, key: bytes) -> None:
        """Delete an IKE SA's Child SAs (and any pair still retiring after a rekey) from the
        worker and withdraw the connection's SPD entry (replace_spd with a higher revision)."""
        for pair in self._retiring.pop(key, []):
            try:
                for sa in pair:
                    self.client.delete_sa(sa.spi, sa.dst, sa.protocol, sa.direction)
            except grpc.RpcError as e:
                log.error("old child removal failed", extra={"code": str(e.code())})
        entry = self._children.pop(key, None)
        if entry is None:
            return
        c, sas = entry
        try:
            for sa in sas:
                self.client.delete_sa(sa.spi, sa.dst, sa.protocol, sa.direction)
            entries = {k: v for k, v in self._spd.items() if k != c.name}
            self._spd_revision += 1
            self.client.replace_spd(list(entries.values()), self._spd_revision)
            self._spd = entries
        except grpc.RpcError as e:
            log.error("child removal failed", extra={"conn": c.name, "code": str(e.code())})
            return
        log.info(
            "child removed",
            extra={
                "conn": c.name,
                "spi_in": sas[0].spi.to_bytes(4, "big").hex(),
                "spi_out": sas[1].spi.to_bytes(4, "big").hex(),
                "spd_revision": self._spd_revision,
            },
        )

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
            self._dispatch(d, self.clock())
        for key in list(self._children):
            self._remove_children(key)

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
        elif ini.state is State.ESTABLISHED and not s.installed and ini.result is not None:
            self._established(s, ini.result, now)

    def _established(self, s: Session, r: IkeSaResult, now: float) -> None:
        if not self._install(s.conn, r, s.reqid, initiator=True, encap=r.nat_t):
            s.initiator = None
            s.retry_at = now + RETRY_AFTER_FAILURE
            return
        s.installed = True
        s.spd = self._spd.get(s.conn.name)
        s.spis = {"in": r.child.spi_in.hex(), "out": r.child.spi_out.hex()}

    def _install(
        self, c: Connection, r: IkeSaResult, reqid: int, *, initiator: bool, encap: bool
    ) -> bool:
        """Install an established IKE SA's Child SA pair and the connection's SPD entry.

        The one installation path for both roles; returns False (and logs) when the worker
        refused it.
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
            },
        )
        try:
            inbound, outbound, spd = child_sa_configs(c, r, reqid, initiator=initiator, encap=encap)
            self.client.install_sa(inbound)
            self.client.install_sa(outbound)
            self._children[r.spi_i + r.spi_r] = (c, (inbound, outbound))
            entries = {**self._spd, c.name: spd}
            self._spd_revision += 1
            self.client.replace_spd(list(entries.values()), self._spd_revision)
        except (grpc.RpcError, ValueError) as e:
            code = e.code() if isinstance(e, grpc.RpcError) else None
            log.error(
                "child install failed",
                extra={"conn": c.name, "code": str(code), "error": type(e).__name__},
            )
            return False
        self._spd = entries
        log.info(
            "child installed",
            extra={
                "conn": c.name,
                "role": role,
                "spi_in": r.child.spi_in.hex(),
                "spi_out": r.child.spi_out.hex(),
                "reqid": reqid,
                "encap": "udp-4500" if encap else "esp",
                "spd_revision": self._spd_revision,
            },
        )
        return True


def child_sa_configs(
    c: Connection,
    r: IkeSaResult,
    reqid: int,
    *,
    initiator: bool = True,
    encap: bool | None = None,
) -> tuple[SaConfig, SaConfig, SpdEntry]:
    """The inbound and outbound ESP SAs and the SPD entry for an established IKE SA.

    ``child.spi_in`` is always our SPI (inbound, remote→local) and ``spi_out`` the peer's
    (outbound, local→remote). RFC 7296 §2.17: the initiator→responder key is ``encr_i``, so as
    initiator inbound uses ``encr_r`` and outbound ``encr_i``; as responder the other way
    round. Keys include the 4-octet AES-GCM salt (RFC 4106 §8.1). ``encap`` (default: the
    result's ``nat_t``) selects ESP-in-UDP 4500/4500.
    """
    child = r.child
    local = ipaddress.IPv4Address(c.local_addr).packed
    remote = ipaddress.IPv4Address(c.remote_addr).packed
    use_encap = r.nat_t if encap is None else encap
    encap_cfg = UdpEncap(NAT_T_PORT, NAT_T_PORT) if use_encap else None
    key_in, key_out = (
        (child.keys.encr_r, child.keys.encr_i)
        if initiator
        else (child.keys.encr_i, child.keys.encr_r)
    )
    sel_out = Selector.make(c.local_ts, c.remote_ts)
    sel_in = Selector.make(c.remote_ts, c.local_ts)
    inbound = SaConfig(
        spi=int.from_bytes(child.spi_in, "big"),
        protocol=int(IpProto.ESP),
        direction=Direction.INBOUND,
        mode=Mode.TUNNEL,
        src=remote,
        dst=local,
        encr_id=int(child.encr_id),
        encr_key=key_in,
        esn=child.esn,
        encap=encap_cfg,
        reqid=reqid,
        selectors=(sel_in,),
    )
    outbound = replace(
        inbound,
        spi=int.from_bytes(child.spi_out, "big"),
        direction=Direction.OUTBOUND,
        src=local,
        dst=remote,
        encr_key=key_out,
        selectors=(sel_out,),
    )
    spd = SpdEntry(
        policy_id=reqid,
        priority=SPD_PRIORITY,
        action=Action.PROTECT,
        selector=sel_out,
        reqid=reqid,
    )
    return inbound, outbound, spd
