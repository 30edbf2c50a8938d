"""The dataplane worker: a thin I/O shell around the sans-IO core (services.core.engine).

Pieces, from the inside out:

* :class:`EngineHost` — the engine, the one lock that guards it, the event and punt fan-outs
  and I/O counters. It does no I/O, so the gRPC servicer can run on it alone (unit tests).
* :class:`PacketLoop` — ONE thread multiplexing non-blocking fds with epoll (selectors):
  it drains up to ``batch`` packets from every ready fd, takes the lock once per batch to run
  the engine on all of them, releases it, then writes/sends the results. It ticks the engine
  about once a second and publishes events after each batch/tick. Every per-packet step is
  guarded: an unexpected exception is counted (``internal_errors``) and logged by type and code
  location only — never packet bytes or keys — and the loop carries on.
* :class:`Wire` — the sockets: raw ESP/AH receive (IPv4 delivers the IP header, IPv6 does not:
  the packet is rebuilt from the recvmsg source, IPV6_PKTINFO destination and hop limit), raw
  IPPROTO_RAW send (header included), UDP 4500 (ESP-in-UDP, RFC 3948) and UDP 500 (IKE, punted)
  per local address. Every socket that sends carries SO_MARK = fwmark, so the worker's own
  traffic uses the main table and not the TUN (see services.dataplane.tun).
* :class:`Worker` — wires settings, TUN + routing, sockets, gRPC, metrics and signals together
  and tears everything down again on SIGTERM/SIGINT. With ``--policyd`` it follows the node's
  compiled policy (services.runtime.policywatch) into the SPD's policy layer
  (:func:`policy_updater`; docs/policyd.md, "Consumers"); with the inbound filter on it keeps an
  nftables filter equal to the enforced SPD for clear packets from the routed prefixes
  (services.dataplane.nftfilter, RFC 4301 §5.2).
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import logging
import os
import queue
import selectors
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from types import FrameType
from typing import TYPE_CHECKING, Generic, NamedTuple, Protocol, TypeVar

from services.core.engine import (
    NON_ESP_MARKER,
    Dataplane,
    Outbound,
    SaStatus,
    UdpKind,
)
from services.core.events import (
    Acquire,
    Event,
)
from services.core.iana import ESP_UDP_PORT, IKE_UDP_PORT, IpProto
from services.core.packet import MalformedPacket, build_ipv6
from services.core.sa import Direction
from services.core.spd import SpdEntry
from services.dataplane.convert import IkeDatagram, WorkerEvent, WorkerStats, addr_text
from services.dataplane.settings import Settings
from services.runtime.logging import describe_exception
from services.runtime.policywatch import PolicyState, spd_entries

if TYPE_CHECKING:
    from services.dataplane.nftfilter import FilterSync
    from services.runtime.policywatch import PolicyWatcher

log = logging.getLogger("services.dataplane.worker")

T = TypeVar("T")

BATCH = 64
TICK_INTERVAL = 1.0
RECV_BUF = 65535
ERROR_LOG_INTERVAL = 5.0
_CMSG_SPACE = socket.CMSG_SPACE(20) + socket.CMSG_SPACE(4)


@functools.lru_cache(maxsize=1024)
def _packed_addr(text: str) -> bytes:
    """The packed form of one of the few local addresses IKE is injected from."""
    return ipaddress.ip_address(text).packed


# --- fan-out -----------------------------------------------------------------------------------


class _Wake:
    """Queue sentinel: wake the consumer so it re-checks its stop conditions."""


WAKE = _Wake()


class Subscription(Generic[T]):
    """One consumer's bounded queue. When full, the oldest item is dropped and counted."""

    def __init__(self, hub: FanOut[T], maxsize: int) -> None:
        self._hub = hub
        self._q: queue.Queue[T | _Wake] = queue.Queue(maxsize)
        self.dropped = 0
        self.closed = False

    def _put(self, item: T | _Wake) -> bool:
        """Enqueue; return True if an older item had to be dropped."""
        dropped = False
        while True:
            try:
                self._q.put_nowait(item)
                return dropped
            except queue.Full:
                with contextlib.suppress(queue.Empty):
                    self._q.get_nowait()
                    dropped = True
                    self.dropped += 1

    def get(self, timeout: float | None = None) -> T | None:
        """The next item, or None after ``timeout`` or a wake-up."""
        try:
            item = self._q.get(timeout=timeout)
        except queue.Empty:
            return None
        return None if isinstance(item, _Wake) else item

    def get_nowait(self) -> T | None:
        """The next item if one is queued, else None (also for a wake-up)."""
        try:
            item = self._q.get_nowait()
        except queue.Empty:
            return None
        return None if isinstance(item, _Wake) else item

    def wake(self) -> None:
        self._put(WAKE)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._hub._remove(self)
            self.wake()


class FanOut(Generic[T]):
    """Publish each item to every subscriber's bounded queue (drop-oldest when full)."""

    def __init__(self, maxsize: int = 1024) -> None:
        self._maxsize = maxsize
        self._subs: list[Subscription[T]] = []
        self._lock = threading.Lock()
        self.dropped = 0
        self.published = 0
        self.closed = False

    def subscribe(self) -> Subscription[T]:
        sub = Subscription(self, self._maxsize)
        with self._lock:
            if self.closed:
                sub.closed = True
            else:
                self._subs.append(sub)
        return sub

    def _remove(self, sub: Subscription[T]) -> None:
        with self._lock, contextlib.suppress(ValueError):
            self._subs.remove(sub)

    @property
    def subscribers(self) -> int:
        with self._lock:
            return len(self._subs)

    def publish(self, items: Sequence[T]) -> None:
        if not items:
            return
        with self._lock:
            self.published += len(items)
            for sub in self._subs:
                for item in items:
                    if sub._put(item):
                        self.dropped += 1

    def close(self) -> None:
        """End every subscription (server shutdown)."""
        with self._lock:
            self.closed = True
            subs, self._subs = self._subs, []
        for sub in subs:
            sub.closed = True
            sub.wake()


# --- the engine host ---------------------------------------------------------------------------


@dataclass
class IoCounters:
    """Worker-level I/O counters (the engine keeps its own packet/drop counters)."""

    tun_rx_packets: int = 0
    tun_tx_packets: int = 0
    wire_rx_packets: int = 0
    wire_tx_packets: int = 0
    punted: int = 0
    injected: int = 0
    inject_errors: int = 0
    send_errors: int = 0
    recv_errors: int = 0
    tun_write_errors: int = 0
    internal_errors: int = 0

    def snapshot(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class EngineHost:
    """The engine plus everything the I/O layers share: one lock, fan-outs, counters."""

    def __init__(
        self,
        worker_id: str,
        *,
        local_addresses: Sequence[str] = (),
        interfaces: Sequence[str] = (),
        clock: Callable[[], float] = time.monotonic,
        wallclock: Callable[[], float] = time.time,
        queue_size: int = 1024,
    ) -> None:
        self.worker_id = worker_id
        self.engine = Dataplane()
        self.lock = threading.Lock()
        self.events: FanOut[WorkerEvent] = FanOut(queue_size)
        self.punts: FanOut[IkeDatagram] = FanOut(queue_size)
        self.io = IoCounters()
        self._io_lock = threading.Lock()
        self.local_addresses = tuple(str(ipaddress.ip_address(a)) for a in local_addresses)
        self.interfaces = tuple(interfaces)
        self.clock = clock
        self.wallclock = wallclock
        self._last_error_log: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._filter_counters: dict[str, int] = {}

    def set_filter_counters(self, counters: dict[str, int]) -> None:
        """Publish the inbound filter's packet counters (read from nftables by the worker)."""
        with self._io_lock:
            self._filter_counters = dict(counters)

    def filter_counters(self) -> dict[str, int]:
        with self._io_lock:
            return dict(self._filter_counters)

    def now(self) -> float:
        return self.clock()

    def count(self, name: str, n: int = 1) -> None:
        with self._io_lock:
            setattr(self.io, name, getattr(self.io, name) + n)

    @contextlib.contextmanager
    def locked(self) -> Iterator[Dataplane]:
        """Hold the engine lock; events the engine queued are published on the way out."""
        events: list[WorkerEvent] = []
        try:
            with self.lock:
                try:
                    yield self.engine
                finally:
                    events = self.drain_events_locked()
        finally:
            self.events.publish(events)

    def drain_events_locked(self) -> list[WorkerEvent]:
        """Pop every queued engine event (call with the lock held)."""
        out: list[WorkerEvent] = []
        eng = self.engine
        t = self.wallclock()
        while (ev := eng.next_event()) is not None:
            try:
                direction = self._direction_of(ev)
            except Exception as e:  # never lose the event over a lookup
                self.internal_error("event-direction", e)
                direction = None
            out.append(WorkerEvent(self.worker_id, t, ev, direction))
        return out

    def _direction_of(self, ev: Event) -> Direction | None:
        """Direction of the SA an event names (None for ACQUIRE, which names a policy)."""
        if isinstance(ev, Acquire):
            return None
        return Direction(ev.sa.direction) if ev.sa.direction else None

    def tick(self) -> None:
        with self.locked() as eng:
            eng.tick(self.now())

    def list_sas(self) -> list[SaStatus]:
        with self.locked() as eng:
            now = self.now()
            return [eng.status(sa, now) for sa in eng.all_sas()]

    def stats(self) -> WorkerStats:
        with self.locked() as eng:
            s = WorkerStats(
                worker_id=self.worker_id,
                spd_revision=eng.spd.revision,
                rx_packets=eng.rx_packets,
                rx_bytes=eng.rx_bytes,
                tx_packets=eng.tx_packets,
                tx_bytes=eng.tx_bytes,
                bypass_packets=eng.bypass_packets,
                keepalives=eng.keepalives,
                drops={r.value: n for r, n in eng.drops.items() if n},
                sa_count=len(eng.all_sas()),
                interfaces=self.interfaces,
                local_addresses=self.local_addresses,
                internal_errors=self.io.internal_errors,
                keepalives_sent=eng.keepalives_sent,
                policy_revision=eng.policy_revision,
                inbound_filter=self.filter_counters(),
            )
        return s

    def owns(self, addr: str, port: int) -> bool:
        """Whether injected IKE may be sent from addr:port (a local address, port 500/4500)."""
        return addr in self.local_addresses and port in (IKE_UDP_PORT, ESP_UDP_PORT)

    def internal_error(self, stage: str, exc: BaseException) -> None:
        """Count an unexpected exception; log its type and code location (rate-limited per
        stage), never its message, packet bytes or keys."""
        self.count("internal_errors")
        now = self.clock()
        last = self._last_error_log.get(stage)
        if last is not None and now - last < ERROR_LOG_INTERVAL:
            self._suppressed[stage] = self._suppressed.get(stage, 0) + 1
            return
        self._last_error_log[stage] = now
        suppressed = self._suppressed.pop(stage, 0)
        log.error(
            "internal error",
            extra={"stage": stage, "suppressed": suppressed, **describe_exception(exc)},
        )


# --- packet sources and sinks ------------------------------------------------------------------


class TunItem(NamedTuple):
    """A clear datagram read from the TUN device (to protect)."""

    pkt: bytes


class IpItem(NamedTuple):
    """A full ESP/AH IP datagram from a raw socket (to unprotect)."""

    pkt: bytes


class UdpItem(NamedTuple):
    """A datagram from a UDP 4500 socket (ESP-in-UDP, IKE, keepalive)."""

    src: bytes
    dst: bytes
    sport: int
    dport: int
    payload: bytes


class IkeItem(NamedTuple):
    """A datagram from a UDP 500 socket (always IKE: punted)."""

    dgram: IkeDatagram


Item = TunItem | IpItem | UdpItem | IkeItem


class Source(Protocol):
    """A non-blocking fd that yields one item per read, or None when it would block."""

    name: str

    def fileno(self) -> int: ...

    def read(self) -> Item | None: ...


class TunIO(Protocol):
    def fileno(self) -> int: ...

    def read(self) -> bytes | None: ...

    def write(self, pkt: bytes) -> None: ...


class Sender(Protocol):
    def send(self, out: Outbound) -> None: ...


class TunSource:
    name = "tun"

    def __init__(self, tun: TunIO) -> None:
        self._tun = tun

    def fileno(self) -> int:
        return self._tun.fileno()

    def read(self) -> Item | None:
        pkt = self._tun.read()
        return None if pkt is None else TunItem(pkt)


def _strip_scope(host: str) -> str:
    return host.split("%", 1)[0]


class RawSource:
    """Raw IPPROTO_ESP / IPPROTO_AH receive socket (IPv4: header included; IPv6: rebuilt)."""

    def __init__(self, sock: socket.socket, proto: int) -> None:
        self.sock = sock
        self.proto = proto
        self.v6 = sock.family == socket.AF_INET6
        self.name = f"raw{'6' if self.v6 else '4'}-{proto}"

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self) -> Item | None:
        if not self.v6:
            try:
                return IpItem(self.sock.recv(RECV_BUF))
            except BlockingIOError:
                return None
        try:
            data, anc, flags, addr = self.sock.recvmsg(RECV_BUF, _CMSG_SPACE)
        except BlockingIOError:
            return None
        if flags & socket.MSG_TRUNC:
            raise MalformedPacket("truncated")
        dst = None
        hop = 64
        for level, typ, cdata in anc:
            if level == socket.IPPROTO_IPV6 and typ == socket.IPV6_PKTINFO and len(cdata) >= 16:
                dst = bytes(cdata[:16])
            elif level == socket.IPPROTO_IPV6 and typ == socket.IPV6_HOPLIMIT and len(cdata) >= 4:
                hop = int.from_bytes(cdata[:4], "little") & 0xFF
        if dst is None:
            raise MalformedPacket("no IPV6_PKTINFO")
        src = socket.inet_pton(socket.AF_INET6, _strip_scope(addr[0]))
        return IpItem(build_ipv6(src, dst, self.proto, len(data), hop_limit=hop) + data)


class UdpSource:
    """UDP 4500 (ESP-in-UDP / IKE / keepalive) or UDP 500 (IKE) socket on one local address."""

    def __init__(self, sock: socket.socket, local: str, port: int) -> None:
        self.sock = sock
        self.local = local
        self.local_packed = ipaddress.ip_address(local).packed
        self.port = port
        self.family = sock.family
        self.name = f"udp{port}"
        self._packed: dict[str, bytes] = {}  # peer address text -> packed

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self) -> Item | None:
        try:
            data, addr = self.sock.recvfrom(RECV_BUF)
        except BlockingIOError:
            return None
        if len(data) >= RECV_BUF:
            raise MalformedPacket("truncated")
        src = self._packed.get(addr[0])
        if src is None:
            if len(self._packed) > 4096:
                self._packed.clear()
            src = self._packed[addr[0]] = socket.inet_pton(self.family, _strip_scope(addr[0]))
        sport = int(addr[1])
        if self.port == ESP_UDP_PORT:
            return UdpItem(src, self.local_packed, sport, self.port, data)
        return IkeItem(IkeDatagram(self.local, self.port, addr_text(src), sport, data))


# --- the sockets -------------------------------------------------------------------------------


def keep_ipv4_ident(pkt: bytes) -> bytes:
    """Stop Linux from rewriting the IPv4 Identification of an AH datagram.

    A header-included raw send assigns a fresh ID when the ID is 0 and DF is clear
    (raw_send_hdrinc -> ip_select_ident). The ID is immutable for AH (RFC 4302 §3.3.3.1.1.1),
    so the ICV would no longer verify — the core builds IPv4 AH tunnel headers with ID 0.
    Setting DF (a mutable field, zeroed for the ICV) makes the kernel keep ID 0; the kernel
    recomputes the header checksum of hdrincl datagrams anyway.
    """
    if (
        len(pkt) >= 20
        and pkt[9] == IpProto.AH
        and pkt[4] == 0
        and pkt[5] == 0
        and not pkt[6] & 0x40
        and not (((pkt[6] & 0x3F) << 8) | pkt[7])  # not a fragment (MF / offset)
    ):
        return pkt[:6] + bytes((pkt[6] | 0x40,)) + pkt[7:]
    return pkt


class InjectError(ValueError):
    """An injected datagram names a local address/port this worker has no socket for."""


class Wire:
    """All sockets on the outer (wire) side. Needs CAP_NET_RAW and CAP_NET_ADMIN (SO_MARK)."""

    def __init__(self, local_addresses: Sequence[str], fwmark: int) -> None:
        self._text: dict[bytes, str] = {}  # packed address -> text, for sendto
        self.local_addresses = [str(ipaddress.ip_address(a)) for a in local_addresses]
        self.fwmark = fwmark
        self.sources: list[Source] = []
        self._raw_send: dict[int, socket.socket] = {}
        self._udp: dict[tuple[bytes, int], socket.socket] = {}
        self._all: list[socket.socket] = []

    def _sock(self, family: int, type_: int, proto: int = 0) -> socket.socket:
        s = socket.socket(family, type_ | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC, proto)
        self._all.append(s)
        return s

    def _mark(self, s: socket.socket) -> None:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self.fwmark)

    def open(self) -> None:
        """Create every socket; on failure the ones already created are closed."""
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        families = {4 if ":" not in a else 6 for a in self.local_addresses} or {4, 6}
        # Raw ESP/AH receive sockets are bound to this worker's outer addresses, so that the
        # kernel hands each worker only its own traffic when several share a namespace.
        # Without --local-address one unbound socket per family receives everything.
        binds: list[tuple[int, str | None]] = [
            (4 if ":" not in a else 6, a) for a in self.local_addresses
        ] or [(4, None), (6, None)]
        for v, addr in binds:
            fam = socket.AF_INET if v == 4 else socket.AF_INET6
            for proto in (IpProto.ESP, IpProto.AH):
                s = self._sock(fam, socket.SOCK_RAW, proto)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
                if v == 6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVHOPLIMIT, 1)
                if addr is not None:
                    s.bind((addr, 0))
                self.sources.append(RawSource(s, int(proto)))
        for v in sorted(families):
            fam = socket.AF_INET if v == 4 else socket.AF_INET6
            send = self._sock(fam, socket.SOCK_RAW, socket.IPPROTO_RAW)
            if v == 4:
                send.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
            self._mark(send)
            self._raw_send[v] = send
        for addr in self.local_addresses:
            ip = ipaddress.ip_address(addr)
            fam = socket.AF_INET if ip.version == 4 else socket.AF_INET6
            for port in (IKE_UDP_PORT, ESP_UDP_PORT):
                s = self._sock(fam, socket.SOCK_DGRAM)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if fam == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
                self._mark(s)
                s.bind((addr, port))
                self._udp[(ip.packed, port)] = s
                self.sources.append(UdpSource(s, addr, port))

    def close(self) -> None:
        for s in self._all:
            with contextlib.suppress(OSError):
                s.close()
        self._all.clear()
        self.sources.clear()
        self._raw_send.clear()
        self._udp.clear()

    def send(self, out: Outbound) -> None:
        """Put one engine output on the wire (raises OSError on failure)."""
        pkt = out.packet
        v = pkt[0] >> 4
        if v == 4:
            src, dst = pkt[12:16], pkt[16:20]
        else:
            src, dst = pkt[8:24], pkt[24:40]
        dst_text = self._text.get(dst)
        if dst_text is None:
            if len(self._text) > 4096:
                self._text.clear()
            fam = socket.AF_INET if v == 4 else socket.AF_INET6
            dst_text = self._text[dst] = socket.inet_ntop(fam, dst)
        if out.udp_offset:
            sock = self._udp.get((src, ESP_UDP_PORT))
            if sock is not None:
                sock.sendto(pkt[out.udp_offset :], (dst_text, out.dport))
                return
            # no socket on that source address: the engine built the UDP header, send it raw
        raw = self._raw_send.get(v)
        if raw is None:
            raise OSError(f"no raw socket for IPv{v}")
        if v == 4:
            pkt = keep_ipv4_ident(pkt)
        raw.sendto(pkt, (dst_text, 0))

    def inject(self, d: IkeDatagram) -> None:
        """Send IKE from local_addr:local_port (4500 prepends the non-ESP marker, RFC 3948)."""
        local = _packed_addr(d.local_addr)
        sock = self._udp.get((local, d.local_port))
        if sock is None:
            raise InjectError("no socket on that local address and port")
        data = NON_ESP_MARKER + d.data if d.local_port == ESP_UDP_PORT else d.data
        sock.sendto(data, (d.remote_addr, d.remote_port))


# --- the packet loop ---------------------------------------------------------------------------


class PacketLoop:
    """The single packet thread (see the module docstring)."""

    def __init__(
        self,
        host: EngineHost,
        sources: Sequence[Source] = (),
        *,
        tun: TunIO | None = None,
        sender: Sender | None = None,
        batch: int = BATCH,
        tick_interval: float = TICK_INTERVAL,
    ) -> None:
        self.host = host
        self.sources = list(sources)
        self.tun = tun
        self.sender = sender
        self.batch = batch
        self.tick_interval = tick_interval
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._thread: threading.Thread | None = None
        self._io_log_at: dict[str, float] = {}
        self.iterations = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="packet-loop", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("packet loop did not stop in time")
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def run(self) -> None:
        host = self.host
        sel = selectors.DefaultSelector()
        sel.register(self._wake_r, selectors.EVENT_READ, None)
        for src in self.sources:
            sel.register(src.fileno(), selectors.EVENT_READ, src)
        next_tick = host.clock() + self.tick_interval
        log.info("packet loop started", extra={"sources": [s.name for s in self.sources]})
        try:
            while not self._stop.is_set():
                try:
                    timeout = max(0.0, next_tick - host.clock())
                    ready = sel.select(timeout)
                    items: list[Item] = []
                    for key, _ in ready:
                        src = key.data
                        if src is None:
                            with contextlib.suppress(OSError):
                                os.read(self._wake_r, 4096)
                            continue
                        self._drain(src, items)
                    now = host.clock()
                    do_tick = now >= next_tick
                    if do_tick:
                        next_tick = now + self.tick_interval
                    if items or do_tick:
                        self.process(items, now, tick=do_tick)
                    self.iterations += 1
                except Exception as e:  # the loop must never die
                    host.internal_error("loop", e)
                    time.sleep(0.01)
        finally:
            sel.close()
            log.info("packet loop stopped")

    def _drain(self, src: Source, items: list[Item]) -> None:
        for _ in range(self.batch):
            try:
                item = src.read()
            except MalformedPacket:
                self.host.count("recv_errors")
                continue
            except OSError as e:
                self.host.count("recv_errors")
                self._log_io_error("recv", src.name, e)
                return
            except Exception as e:
                self.host.internal_error(f"read-{src.name}", e)
                continue
            if item is None:
                return
            items.append(item)

    def process(self, items: Sequence[Item], now: float, *, tick: bool = False) -> None:
        """Run the engine on one batch under the lock, then do the resulting I/O."""
        host = self.host
        to_tun: list[bytes] = []
        to_wire: list[Outbound] = []
        punts: list[IkeDatagram] = []
        errors: list[tuple[str, Exception]] = []
        tun_rx = wire_rx = 0
        with host.lock:
            eng = host.engine
            for item in items:
                try:
                    if isinstance(item, TunItem):
                        tun_rx += 1
                        out = eng.outbound(item.pkt, now)
                        if out is not None:
                            to_wire.append(out)
                    elif isinstance(item, IpItem):
                        wire_rx += 1
                        clear = eng.inbound(item.pkt, now)
                        if clear is not None:
                            to_tun.append(clear)
                    elif isinstance(item, UdpItem):
                        wire_rx += 1
                        kind, data = eng.inbound_udp(
                            item.src, item.dst, item.sport, item.dport, item.payload, now
                        )
                        if kind is UdpKind.ESP and data is not None:
                            to_tun.append(data)
                        elif kind is UdpKind.IKE and data is not None:
                            punts.append(
                                IkeDatagram(
                                    addr_text(item.dst),
                                    item.dport,
                                    addr_text(item.src),
                                    item.sport,
                                    bytes(data),
                                )
                            )
                    else:
                        wire_rx += 1
                        if item.dgram.data:
                            punts.append(item.dgram)
                except Exception as e:
                    errors.append((type(item).__name__, e))
            if tick:
                try:
                    eng.tick(now)
                    to_wire.extend(eng.nat_keepalives(now))
                except Exception as e:
                    errors.append(("tick", e))
            try:
                events = host.drain_events_locked()
            except Exception as e:
                errors.append(("events", e))
                events = []
        for stage, exc in errors:
            host.internal_error(stage, exc)
        host.events.publish(events)
        if punts:
            host.punts.publish(punts)
        self._write_tun(to_tun)
        self._send(to_wire)
        with host._io_lock:
            io = host.io
            io.tun_rx_packets += tun_rx
            io.wire_rx_packets += wire_rx
            io.punted += len(punts)

    def _write_tun(self, pkts: list[bytes]) -> None:
        tun = self.tun
        write = None if tun is None else tun.write
        self._emit(pkts, write, "tun-write", "tun", "tun_tx_packets", "tun_write_errors")

    def _send(self, outs: list[Outbound]) -> None:
        sender = self.sender
        send = None if sender is None else sender.send
        self._emit(outs, send, "send", "wire", "wire_tx_packets", "send_errors")

    def _emit(
        self,
        items: Sequence[T],
        put: Callable[[T], None] | None,
        op: str,
        where: str,
        ok_counter: str,
        err_counter: str,
    ) -> None:
        """Hand each item to ``put``; count successes and failures, never raise."""
        if not items:
            return
        ok = err = 0
        for item in items:
            try:
                if put is None:
                    raise OSError(f"no {where} device")
                put(item)
                ok += 1
            except OSError as e:
                err += 1
                self._log_io_error(op, where, e)
            except Exception as e:
                err += 1
                self.host.internal_error(op, e)
        io = self.host.io
        with self.host._io_lock:
            setattr(io, ok_counter, getattr(io, ok_counter) + ok)
            setattr(io, err_counter, getattr(io, err_counter) + err)

    def _log_io_error(self, op: str, where: str, e: OSError) -> None:
        now = self.host.clock()
        key = f"{op}:{where}:{e.errno}"
        if now - self._io_log_at.get(key, -1e9) >= ERROR_LOG_INTERVAL:
            self._io_log_at[key] = now
            log.warning(
                "i/o error",
                extra={"op": op, "where": where, "errno": e.errno, "strerror": e.strerror},
            )


# --- policyd ----------------------------------------------------------------------------------


class PolicyStateError(RuntimeError):
    """The saved policy cannot be enforced at start (the message names the file and the
    reason; policies hold no secrets)."""

    log_safe = True


def policy_updater(
    host: EngineHost, after: Callable[[], object] | None = None
) -> Callable[[PolicyState], None]:
    """The PolicyWatcher callback: replace the engine's policy layer with a new revision under
    the engine lock, then run ``after`` (the inbound filter's reload), so the revision is
    reported as enforced only once both directions enforce it. A policy the engine cannot hold
    (malformed entry, revision going back) raises ValueError: nothing changes, the revision is
    not reported as enforced, and the reason is logged here; an ``after`` that raises also
    keeps the revision unreported (the watcher retries it)."""

    def on_update(state: PolicyState) -> None:
        try:
            entries = spd_entries(state.policy)
            with host.locked() as eng:
                eng.replace_policy(entries, state.revision)
        except ValueError as e:
            log.error(
                "policy refused",
                extra={"revision": state.revision, "reason": str(e)[:300]},
            )
            raise
        if after is not None:
            after()
        log.info(
            "policy enforced",
            extra={"revision": state.revision, "entries": len(entries)},
        )

    return on_update


# --- the whole worker --------------------------------------------------------------------------


class Worker:
    """Run a worker from Settings until SIGTERM/SIGINT, then clean up everything it created."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._stop = threading.Event()
        self.watcher: PolicyWatcher | None = None
        self._filter: FilterSync | None = None

    def _sync_filter(self) -> None:
        """Load the inbound filter for the SPD just replaced (once the filter runs)."""
        if self._filter is not None:
            self._filter.sync()

    def request_stop(self, signum: int | None = None, _frame: FrameType | None = None) -> None:
        if signum is not None:
            log.info("signal received", extra={"signal": signal.Signals(signum).name})
        self._stop.set()

    def _start_policy_watch(
        self, host: EngineHost, cleanup: list[tuple[str, Callable[[], object]]]
    ) -> None:
        """Follow policyd; the saved policy is enforced before this returns."""
        from services.runtime.policywatch import PolicyWatcher, mtls_channel_factory

        s = self.settings
        factory = mtls_channel_factory(
            s.policyd,
            s.tls_dir,
            server_name=s.policyd_server_name,
            client_name=s.policyd_client_cert,
        )
        watcher = PolicyWatcher(
            factory,
            node=s.policy_node,
            component=s.worker_id,
            addresses=s.local_address,
            state_file=s.policy_state_file,
            on_update=policy_updater(host, after=self._sync_filter),
            backoff=(min(0.5, s.policyd_retry_max), s.policyd_retry_max),
        )
        try:
            watcher.start()
        except ValueError as e:
            raise PolicyStateError(
                f"the saved policy in {s.policy_state_file} cannot be enforced ({e}); remove "
                "the file to start from policyd's current policy"
            ) from None
        cleanup.append(("policy-watch", watcher.stop))
        self.watcher = watcher
        log.info(
            "following policyd",
            extra={
                "policyd": s.policyd,
                "node": s.policy_node,
                "state_file": str(s.policy_state_file),
                "revision": watcher.revision,
            },
        )

    def _start_inbound_filter(
        self, host: EngineHost, tun_name: str, cleanup: list[tuple[str, Callable[[], object]]]
    ) -> None:
        """Load the nftables filter for the enforced SPD and keep it current."""
        from services.dataplane import nftfilter

        s = self.settings
        cfg = nftfilter.FilterConfig(
            table=nftfilter.table_name(s.worker_id),
            tun=tun_name,
            routes=tuple(s.route),
            local_addresses=tuple(s.local_address),
        )

        def entries() -> tuple[SpdEntry, ...]:
            with host.lock:
                return host.engine.spd.entries

        sync = nftfilter.FilterSync(
            nftfilter.NftRunner(cfg.table), cfg, entries, host.set_filter_counters
        )
        cleanup.append(("inbound-filter", sync.stop))  # also removes a half-loaded table
        sync.start()
        self._filter = sync

    def run(self) -> int:
        from services.dataplane import grpc_api, metrics, tun  # they import this module

        s = self.settings
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        cleanup: list[tuple[str, Callable[[], object]]] = []
        rc = 0
        try:
            creds = grpc_api.load_server_credentials(s.tls_dir, s.tls_cert_name)
            device = tun.TunDevice.open(s.tun)
            cleanup.append(("tun", device.close))
            routing = tun.Routing(tun.RoutingPlan.from_settings(s, device.name))
            cleanup.append(("routing", routing.teardown))
            routing.setup()
            wire = Wire(s.local_address, s.fwmark)
            wire.open()
            cleanup.append(("sockets", wire.close))
            host = EngineHost(
                s.worker_id, local_addresses=s.local_address, interfaces=(device.name,)
            )
            if s.policyd:
                self._start_policy_watch(host, cleanup)
            if s.inbound_filter_enabled:
                self._start_inbound_filter(host, device.name, cleanup)
            loop = PacketLoop(host, [TunSource(device), *wire.sources], tun=device, sender=wire)
            loop.start()
            cleanup.append(("packet-loop", loop.stop))
            server = grpc_api.GrpcServer(host, s.grpc_listen, creds, injector=wire)
            server.start()
            cleanup.append(("grpc", server.stop))
            if s.metrics_listen:
                m = metrics.serve(host, s.metrics_listen)
                cleanup.append(("metrics", m.stop))
            log.info(
                "worker ready",
                extra={
                    "worker_id": s.worker_id,
                    "grpc": s.grpc_listen,
                    "tun": device.name,
                    "routes": s.route,
                    "local_addresses": s.local_address,
                    "metrics": s.metrics_listen or None,
                    "policyd": s.policyd or None,
                    "inbound_filter": s.inbound_filter_enabled,
                },
            )
            while not self._stop.wait(1.0):
                if not loop.alive:
                    log.error("packet loop thread died; stopping")
                    rc = 1
                    break
        except Exception as e:
            log.error("worker failed", extra=describe_exception(e))
            rc = 1
        finally:
            for what, fn in reversed(cleanup):
                try:
                    fn()
                except Exception as e:
                    log.warning(
                        "cleanup step failed", extra={"step": what, **describe_exception(e)}
                    )
            log.info("worker stopped", extra={"worker_id": s.worker_id})
        return rc


__all__ = [
    "EngineHost",
    "FanOut",
    "InjectError",
    "PacketLoop",
    "Subscription",
    "Wire",
    "Worker",
]
