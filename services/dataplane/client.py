"""A small typed mTLS client for the ipsec.v1.Dataplane gRPC API (used by keymgr, tests, demo).

    with DataplaneClient("unix:/run/w/worker.sock", Path("tls"), server_name="server",
                         client_name="client") as dp:
        dp.install_sa(spi=0x1001, protocol="esp", direction="outbound", mode="tunnel",
                      src="192.0.2.1", dst="192.0.2.2", encr_id=20, encr_key=key, reqid=1)
        dp.replace_spd([...], revision=1)
        for ev in dp.events():       # WorkerEvent; ev.event is a core event (Acquire, ...)
            ...

Several changes in one atomic call (deletes, then installs, then an optional SPD replacement;
all or nothing), blocking or as a future to overlap with other work::

        res = dp.apply_sas(install=[sa_in, sa_out], spd=(entries, revision))
        fut = dp.apply_sas_async(delete=[(0x1001, "192.0.2.2", "esp", "outbound")])
        ...
        fut.result().existed      # (True,)

Failed calls raise grpc.RpcError (``e.code()`` is the status). The TLS directory holds
``ca.pem`` and ``<client_name>.pem`` / ``.key``; ``server_name`` must be a DNS name in the
server certificate (services.runtime.tls explains why unix sockets need it).
"""

from __future__ import annotations

import ipaddress
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.core.engine import SaStatus
from services.core.iana import IpProto
from services.core.sa import Direction, Lifetime, Mode, SaConfig, UdpEncap
from services.core.spd import SpdEntry
from services.dataplane import convert
from services.dataplane.convert import (
    ApplyResult,
    IkeDatagram,
    SaId,
    WorkerEvent,
    WorkerStats,
)
from services.pb.ipsec.v1 import dataplane_pb2_grpc as pb_grpc
from services.runtime import tls

__all__ = [
    "ApplyFuture",
    "ApplyResult",
    "DataplaneClient",
    "EventStream",
    "IkeDatagram",
    "PuntStream",
    "WorkerEvent",
    "WorkerStats",
    "sa_config",
]


def _packed(addr: str | bytes) -> bytes:
    if isinstance(addr, bytes):
        return ipaddress.ip_address(addr).packed
    return ipaddress.ip_address(addr).packed


def _protocol(p: int | str) -> int:
    if isinstance(p, str):
        return {"esp": int(IpProto.ESP), "ah": int(IpProto.AH)}[p.lower()]
    return int(p)


def _direction(d: Direction | str) -> Direction:
    return Direction[d.upper()] if isinstance(d, str) else Direction(d)


def _mode(m: Mode | str) -> Mode:
    return Mode[m.upper()] if isinstance(m, str) else Mode(m)


def sa_config(**fields: Any) -> SaConfig:
    """Build a core SaConfig from friendly field values: addresses as text or packed bytes,
    protocol 'esp'/'ah'/50/51, direction 'inbound'/'outbound', mode 'transport'/'tunnel',
    encap True (ports 4500) or a UdpEncap, lifetime a Lifetime or a dict of its fields."""
    f = dict(fields)
    for k in ("src", "dst"):
        if k in f:
            f[k] = _packed(f[k])
    if "protocol" in f:
        f["protocol"] = _protocol(f["protocol"])
    if "direction" in f:
        f["direction"] = _direction(f["direction"])
    if "mode" in f:
        f["mode"] = _mode(f["mode"])
    if f.get("encap") is True:
        f["encap"] = UdpEncap()
    elif f.get("encap") is False:
        f["encap"] = None
    if isinstance(f.get("lifetime"), dict):
        f["lifetime"] = Lifetime(**f["lifetime"])
    if "selectors" in f:
        f["selectors"] = tuple(f["selectors"])
    return SaConfig(**f)


SaRef = tuple[int, str | bytes, int | str, Direction | str]  # (spi, dst, protocol, direction)


def _sa_id(ref: SaId | Sequence[Any]) -> SaId:
    spi, dst, protocol, direction = ref
    return SaId(int(spi), _packed(dst), _protocol(protocol), _direction(direction))


class ApplyFuture:
    """An ApplySAs call in flight. ``result()`` blocks and returns the :class:`ApplyResult` or
    raises grpc.RpcError; ``call`` is the underlying grpc future."""

    def __init__(self, call: Any) -> None:
        self.call = call

    def result(self, timeout: float | None = None) -> ApplyResult:
        return convert.apply_result(self.call.result(timeout=timeout))

    def exception(self, timeout: float | None = None) -> BaseException | None:
        exc: BaseException | None = self.call.exception(timeout=timeout)
        return exc

    def done(self) -> bool:
        return bool(self.call.done())

    def cancel(self) -> bool:
        return bool(self.call.cancel())

    def add_done_callback(self, fn: Callable[[ApplyFuture], object]) -> None:
        """Call ``fn(self)`` when the call completes (from a gRPC thread, or at once if done)."""
        self.call.add_done_callback(lambda _call: fn(self))


class EventStream:
    """Iterator over a worker's events; ``cancel()`` (or leaving a ``with``) ends it."""

    def __init__(self, call: Any) -> None:
        self._call = call

    def __iter__(self) -> Iterator[WorkerEvent]:
        try:
            for m in self._call:
                yield convert.event_from_pb(m)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                raise

    def cancel(self) -> None:
        self._call.cancel()

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()


_END = object()


PUNT_BATCH = 64  # datagrams per PuntBatch message at most
PUNT_BATCH_BYTES = 1 << 20  # no datagram joins a batch already this large


class PuntStream:
    """The bidirectional punt stream: ``send()`` injects IKE through the worker, iteration
    yields IKE the worker received. ``close()`` half-closes (the server then ends the stream);
    ``cancel()`` aborts it. ``batch``: the PuntBatch call, whose messages carry every datagram
    queued when one is sent (fewer messages and hand-offs between threads under load);
    otherwise Punt, one datagram per message."""

    def __init__(
        self, stub: pb_grpc.DataplaneStub, timeout: float | None, *, batch: bool = True
    ) -> None:
        self._out: queue.Queue[object] = queue.Queue()
        self._closed = threading.Event()
        self.batch = batch
        if batch:
            self._call = stub.PuntBatch(self._batches(), timeout=timeout)
        else:
            self._call = stub.Punt(self._requests(), timeout=timeout)

    def _requests(self) -> Iterator[Any]:
        while True:
            item = self._out.get()
            if item is _END:
                return
            for d in item if isinstance(item, list) else (item,):
                assert isinstance(d, IkeDatagram)
                yield convert.ike_to_pb(d)

    def _batches(self) -> Iterator[Any]:
        pending: list[IkeDatagram] = []  # queued but not yet sent
        end = False
        while pending or not end:
            if not pending:
                item = self._out.get()
                if item is _END:
                    return
                pending = list(item) if isinstance(item, list) else [item]
            while not end and len(pending) < PUNT_BATCH:
                try:
                    more = self._out.get_nowait()
                except queue.Empty:
                    break
                if more is _END:
                    end = True
                else:
                    pending += more if isinstance(more, list) else [more]
            batch, size = [], 0
            while pending and len(batch) < PUNT_BATCH and size < PUNT_BATCH_BYTES:
                d = pending.pop(0)
                assert isinstance(d, IkeDatagram)
                batch.append(d)
                size += len(d.data)
            yield convert.ike_batch_to_pb(batch)

    def send(self, d: IkeDatagram) -> None:
        if self._closed.is_set():
            raise RuntimeError("punt stream is closed")
        self._out.put(d)

    def send_many(self, ds: Sequence[IkeDatagram]) -> None:
        """send() each, in order; on PuntBatch they leave in one message (up to the limits)."""
        if self._closed.is_set():
            raise RuntimeError("punt stream is closed")
        if ds:
            self._out.put(list(ds))

    def __iter__(self) -> Iterator[IkeDatagram]:
        try:
            if self.batch:
                for m in self._call:
                    yield from convert.ike_batch_from_pb(m)
            else:
                for m in self._call:
                    yield convert.ike_from_pb(m)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                raise

    def wait_connected(self) -> None:
        """Block until the server has subscribed this stream."""
        self._call.initial_metadata()

    def unimplemented(self) -> bool:
        """After wait_connected(): the server ended the call as UNIMPLEMENTED (a worker
        without PuntBatch)."""
        return bool(self._call.done()) and self._call.code() == grpc.StatusCode.UNIMPLEMENTED

    def close(self) -> None:
        if not self._closed.is_set():
            self._closed.set()
            self._out.put(_END)

    def cancel(self) -> None:
        self.close()
        self._call.cancel()

    def __enter__(self) -> PuntStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()


class DataplaneClient:
    """Typed wrapper around the Dataplane stub on one mTLS channel."""

    def __init__(
        self,
        target: str,
        tls_dir: Path,
        *,
        server_name: str,
        client_name: str,
        timeout: float = 10.0,
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.channel = tls.secure_channel(
            target, Path(tls_dir), server_name=server_name, client_name=client_name
        )
        self._stub = pb_grpc.DataplaneStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    # --- lifecycle ------------------------------------------------------------------------------

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> DataplaneClient:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until the channel is connected (raises grpc.FutureTimeoutError)."""
        grpc.channel_ready_future(self.channel).result(timeout=timeout)

    def serving(self) -> bool:
        """The gRPC health status of the Dataplane service."""
        resp = self._health.Check(
            health_pb2.HealthCheckRequest(service="ipsec.v1.Dataplane"), timeout=self.timeout
        )
        return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)

    # --- SAD ------------------------------------------------------------------------------------

    def install_sa(self, cfg: SaConfig | None = None, /, **fields: Any) -> None:
        """Install one SA, given as a core SaConfig or as SaConfig fields (see sa_config)."""
        if cfg is None:
            cfg = sa_config(**fields)
        elif fields:
            raise TypeError("pass either an SaConfig or fields, not both")
        self._stub.InstallSA(convert.install_request(cfg), timeout=self.timeout)

    def update_sa(
        self,
        spi: int,
        dst: str | bytes,
        protocol: int | str,
        direction: Direction | str,
        *,
        seq_lease_end: int | None = None,
        lifetime: Lifetime | None = None,
    ) -> None:
        sid = SaId(spi, _packed(dst), _protocol(protocol), _direction(direction))
        self._stub.UpdateSA(
            convert.update_request(sid, seq_lease_end=seq_lease_end, lifetime=lifetime),
            timeout=self.timeout,
        )

    def delete_sa(
        self, spi: int, dst: str | bytes, protocol: int | str, direction: Direction | str
    ) -> bool:
        """Delete an SA; return whether it existed."""
        sid = SaId(spi, _packed(dst), _protocol(protocol), _direction(direction))
        resp = self._stub.DeleteSA(convert.delete_request(sid), timeout=self.timeout)
        return convert.delete_existed(resp)

    def apply_sas(
        self,
        install: Iterable[SaConfig] = (),
        delete: Iterable[SaId | SaRef] = (),
        spd: tuple[Iterable[SpdEntry], int] | None = None,
    ) -> ApplyResult:
        """Delete, install and (optionally) replace the whole SPD in one atomic call.

        ``delete`` items are (spi, dst, protocol, direction) in the friendly forms of
        :meth:`delete_sa`; ``spd`` is (entries, revision). Deletes are applied first, then the
        installs, then the SPD. Either all of it is applied or none of it (grpc.RpcError, the
        details naming the refused item). The result says, per delete, whether the SA existed.
        """
        req = convert.apply_request(install, [_sa_id(d) for d in delete], spd)
        # the blocking call, not a future's result(): it saves a hand-off between threads
        return convert.apply_result(self._stub.ApplySAs(req, timeout=self.timeout))

    def apply_sas_async(
        self,
        install: Iterable[SaConfig] = (),
        delete: Iterable[SaId | SaRef] = (),
        spd: tuple[Iterable[SpdEntry], int] | None = None,
    ) -> ApplyFuture:
        """:meth:`apply_sas` without waiting: returns an :class:`ApplyFuture` at once."""
        req = convert.apply_request(install, [_sa_id(d) for d in delete], spd)
        return ApplyFuture(self._stub.ApplySAs.future(req, timeout=self.timeout))

    def list_sas(self) -> list[SaStatus]:
        resp = self._stub.ListSAs(convert.list_sas_request(), timeout=self.timeout)
        return convert.sa_infos_from_pb(resp)

    # --- SPD, stats -----------------------------------------------------------------------------

    def replace_spd(self, entries: Iterable[SpdEntry], revision: int) -> int:
        """Replace the whole SPD; return the revision now enforced."""
        resp = self._stub.ReplaceSPD(
            convert.replace_spd_request(entries, revision), timeout=self.timeout
        )
        return convert.replace_spd_revision(resp)

    def stats(self) -> WorkerStats:
        return convert.stats_from_pb(
            self._stub.GetStats(convert.get_stats_request(), timeout=self.timeout)
        )

    # --- streams --------------------------------------------------------------------------------

    def events(self, *, timeout: float | None = None) -> EventStream:
        """Subscribe to events. Returns once the worker has registered the subscription, so
        events emitted after this call are delivered."""
        call = self._stub.WatchEvents(convert.watch_events_request(), timeout=timeout)
        call.initial_metadata()
        return EventStream(call)

    def punt(self, *, timeout: float | None = None, batch: bool = True) -> PuntStream:
        """Open the punt/inject stream (subscribed once this returns): PuntBatch, or Punt
        when ``batch`` is False or the worker does not implement PuntBatch."""
        stream = PuntStream(self._stub, timeout, batch=batch)
        stream.wait_connected()
        if batch and stream.unimplemented():
            stream = PuntStream(self._stub, timeout, batch=False)
            stream.wait_connected()
        return stream
