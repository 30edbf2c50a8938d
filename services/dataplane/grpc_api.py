"""gRPC service ipsec.v1.Dataplane (proto/ipsec/v1/dataplane.proto) over mutual TLS, plus the
standard gRPC health service (grpc.health.v1).

Handlers convert and validate with services.dataplane.convert, then mutate the engine under the
host's one lock. Status codes: malformed or unacceptable input (including the core's
ConfigError) -> INVALID_ARGUMENT; an SA that already exists -> ALREADY_EXISTS; UpdateSA on a
missing SA -> NOT_FOUND; an SPD revision older than the enforced one -> FAILED_PRECONDITION;
anything unexpected -> INTERNAL (counted and logged by type and location only). No message ever
carries key bytes. DeleteSA is idempotent (``existed`` says whether it was there).

ApplySAs converts every item of a batch with the same converters as the single RPCs, then
applies its deletes, installs and SPD replacement in one hold of the engine lock (the lock the
packet thread holds while it processes a batch of packets), so packets see the SAD/SPD from
before the batch or from after it. A refused batch changes nothing; its status code is the one
the single RPC would return and its message names the item ("install[1]: ...", "spd: ...").

Streams: WatchEvents and Punt each hold one server thread. Punt is bidirectional: punted IKE
datagrams flow to the client; datagrams the client sends are injected from the worker's UDP
socket on local_addr:local_port (500 or 4500; 4500 prepends the non-ESP marker). A local
address the worker does not own ends the stream with INVALID_ARGUMENT; the client half-closing
its side ends the stream normally. PuntBatch is the same stream with IkeDatagramBatch messages:
each message sent carries every punted datagram queued at that moment (up to PUNT_BATCH or
about PUNT_BATCH_BYTES), and each message received is injected datagram by datagram, in order.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NoReturn, Protocol, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.core.engine import BatchFault, BatchRejected
from services.core.sa import ConfigError
from services.dataplane import convert
from services.dataplane.convert import ConversionError, IkeDatagram
from services.dataplane.worker import EngineHost, InjectError
from services.pb.ipsec.v1 import dataplane_pb2 as pb
from services.pb.ipsec.v1 import dataplane_pb2_grpc as pb_grpc
from services.runtime import tls

log = logging.getLogger("services.dataplane.grpc")

SERVICE_NAME = "ipsec.v1.Dataplane"
STREAM_POLL = 0.5
PUNT_BATCH = 64  # datagrams per PuntBatch message at most
PUNT_BATCH_BYTES = 1 << 20  # no datagram joins a batch already this large (gRPC allows 4 MiB)
R = TypeVar("R")
_BATCH_CODES = {
    BatchFault.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    BatchFault.EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    BatchFault.STALE: grpc.StatusCode.FAILED_PRECONDITION,
}


class Injector(Protocol):
    """Sends IKE from one of the worker's UDP sockets (services.dataplane.worker.Wire)."""

    def inject(self, d: IkeDatagram) -> None: ...


class Abort(Exception):
    """End an RPC with a status code (raised inside handlers, outside the engine lock)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _unary(name: str) -> Callable[[Callable[..., R]], Callable[..., R]]:
    """Map exceptions of a unary handler to status codes."""

    def deco(fn: Callable[..., R]) -> Callable[..., R]:
        @functools.wraps(fn)
        def wrapper(self: DataplaneService, request: Any, context: grpc.ServicerContext) -> R:
            try:
                return fn(self, request, context)
            except Abort as e:
                code, msg = e.code, e.message
            except (ConversionError, ConfigError) as e:
                code, msg = grpc.StatusCode.INVALID_ARGUMENT, str(e)
            except Exception as e:
                self.host.internal_error(f"grpc.{name}", e)
                code, msg = grpc.StatusCode.INTERNAL, "internal error"
            log.info("rpc rejected", extra={"rpc": name, "code": code.name, "detail": msg})
            _abort(context, code, msg)

        return wrapper

    return deco


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, msg: str) -> NoReturn:
    context.abort(code, msg)
    raise AssertionError("unreachable")  # context.abort raises


class DataplaneService(pb_grpc.DataplaneServicer):
    """The servicer. Needs only an EngineHost; an Injector enables sending IKE."""

    def __init__(self, host: EngineHost, injector: Injector | None = None) -> None:
        self.host = host
        self.injector = injector
        self._stopping = threading.Event()

    def shutdown(self) -> None:
        """Wake and end every stream."""
        self._stopping.set()
        self.host.events.close()
        self.host.punts.close()

    # --- SAD ------------------------------------------------------------------------------------

    @_unary("InstallSA")
    def InstallSA(
        self, request: pb.InstallSARequest, context: grpc.ServicerContext
    ) -> pb.InstallSAResponse:
        cfg = convert.install_from_pb(request)
        with self.host.locked() as eng:
            if eng.find_sa(cfg.spi, cfg.dst, cfg.protocol, cfg.direction) is not None:
                raise Abort(grpc.StatusCode.ALREADY_EXISTS, "an SA with this id exists")
            eng.install_sa(cfg, self.host.now())
        log.info(
            "sa installed",
            extra={"sa": cfg.describe(), "reqid": cfg.reqid, "encap": cfg.encap is not None},
        )
        return convert.install_response()

    @_unary("UpdateSA")
    def UpdateSA(
        self, request: pb.UpdateSARequest, context: grpc.ServicerContext
    ) -> pb.UpdateSAResponse:
        upd = convert.update_from_pb(request)
        sid = upd.id
        with self.host.locked() as eng:
            sa = eng.update_sa(
                sid.spi,
                sid.dst,
                sid.protocol,
                sid.direction,
                lease_end=upd.lease_end,
                lifetime=upd.lifetime,
            )
            if sa is None:
                raise Abort(grpc.StatusCode.NOT_FOUND, "no such SA")
            desc = sa.cfg.describe()
        log.info(
            "sa updated",
            extra={"sa": desc, "lease_end": upd.lease_end, "lifetime": upd.lifetime is not None},
        )
        return convert.update_response()

    @_unary("DeleteSA")
    def DeleteSA(
        self, request: pb.DeleteSARequest, context: grpc.ServicerContext
    ) -> pb.DeleteSAResponse:
        sid = convert.delete_from_pb(request)
        with self.host.locked() as eng:
            existed = eng.delete_sa(sid.spi, sid.dst, sid.protocol, sid.direction)
        log.info(
            "sa deleted",
            extra={
                "spi": f"0x{sid.spi:08x}",
                "dst": convert.addr_text(sid.dst),
                "direction": sid.direction.name.lower(),
                "existed": existed,
            },
        )
        return convert.delete_response(existed)

    # --- SPD ------------------------------------------------------------------------------------

    @_unary("ReplaceSPD")
    def ReplaceSPD(
        self, request: pb.ReplaceSPDRequest, context: grpc.ServicerContext
    ) -> pb.ReplaceSPDResponse:
        entries, revision = convert.spd_from_pb(request)
        with self.host.locked() as eng:
            current = eng.spd.revision
            if revision < current:
                raise Abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"SPD revision {revision} is older than the enforced {current}",
                )
            try:
                eng.replace_spd(entries, revision)
            except ValueError as e:
                raise Abort(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        log.info("spd replaced", extra={"revision": revision, "entries": len(entries)})
        return convert.replace_spd_response(revision)

    # --- batches ------------------------------------------------------------------------------

    @_unary("ApplySAs")
    def ApplySAs(
        self, request: pb.ApplySAsRequest, context: grpc.ServicerContext
    ) -> pb.ApplySAsResponse:
        batch = convert.apply_from_pb(request)  # every item validated before the lock
        with self.host.locked() as eng:
            try:
                existed = eng.apply_batch(batch.installs, batch.deletes, batch.spd, self.host.now())
            except BatchRejected as e:
                raise Abort(_BATCH_CODES[e.fault], str(e)) from None
            revision = eng.spd.revision
        if log.isEnabledFor(logging.DEBUG):  # keymgr logs each IKE SA up and down at info
            log.debug(
                "sas applied",
                extra={
                    "installed": [c.describe() for c in batch.installs],
                    "deleted": [
                        f"0x{sid.spi:08x} {convert.addr_text(sid.dst)} {sid.direction.name.lower()}"
                        for sid, ex in zip(batch.deletes, existed, strict=True)
                        if ex
                    ],
                    "missing": existed.count(False),
                    "spd_revision": revision if batch.spd is not None else None,
                },
            )
        return convert.apply_response(existed, len(batch.installs), revision)

    # --- status ---------------------------------------------------------------------------------

    @_unary("ListSAs")
    def ListSAs(
        self, request: pb.ListSAsRequest, context: grpc.ServicerContext
    ) -> pb.ListSAsResponse:
        return convert.list_sas_response([convert.sa_info_to_pb(s) for s in self.host.list_sas()])

    @_unary("GetStats")
    def GetStats(
        self, request: pb.GetStatsRequest, context: grpc.ServicerContext
    ) -> pb.GetStatsResponse:
        return convert.stats_to_pb(self.host.stats())

    # --- streams --------------------------------------------------------------------------------

    def WatchEvents(
        self, request: pb.WatchEventsRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.Event]:
        sub = self.host.events.subscribe()
        context.add_callback(sub.wake)
        # Headers out now: a client that waits for them knows it is subscribed.
        context.send_initial_metadata((("x-worker-id", self.host.worker_id),))
        log.info("event watcher connected", extra={"peer": context.peer()})
        try:
            while not sub.closed and context.is_active() and not self._stopping.is_set():
                we = sub.get(STREAM_POLL)
                if we is None:
                    continue
                try:
                    msg = convert.event_to_pb(we)
                except Exception as e:
                    self.host.internal_error("grpc.WatchEvents", e)
                    continue
                yield msg
        finally:
            sub.close()
            log.info("event watcher gone", extra={"peer": context.peer(), "dropped": sub.dropped})

    def Punt(
        self, request_iterator: Iterator[pb.IkeDatagram], context: grpc.ServicerContext
    ) -> Iterator[pb.IkeDatagram]:
        for batch in self._punt(((m,) for m in request_iterator), context):
            for d in batch:
                yield convert.ike_to_pb(d)

    def PuntBatch(
        self, request_iterator: Iterator[pb.IkeDatagramBatch], context: grpc.ServicerContext
    ) -> Iterator[pb.IkeDatagramBatch]:
        for batch in self._punt((m.datagrams for m in request_iterator), context):
            yield convert.ike_batch_to_pb(batch)

    def _punt(
        self, received: Iterator[Iterable[pb.IkeDatagram]], context: grpc.ServicerContext
    ) -> Iterator[list[IkeDatagram]]:
        """Punt and PuntBatch: inject what the client sends (``received`` yields each
        message's datagrams); yield the punted datagrams queued at each moment."""
        sub = self.host.punts.subscribe()
        done = threading.Event()
        failure: list[Abort] = []
        context.add_callback(sub.wake)
        counts = {"messages_in": 0, "messages_out": 0, "punted": 0}

        def inject(m: pb.IkeDatagram) -> bool:
            try:
                d = convert.ike_from_pb(m)
            except ConversionError as e:
                failure.append(Abort(grpc.StatusCode.INVALID_ARGUMENT, str(e)))
                return False
            if not self.host.owns(d.local_addr, d.local_port):
                failure.append(
                    Abort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"local_addr {d.local_addr} port {d.local_port} is not owned by "
                        f"worker {self.host.worker_id}",
                    )
                )
                return False
            if self.injector is None:
                failure.append(
                    Abort(grpc.StatusCode.FAILED_PRECONDITION, "this worker has no wire sockets")
                )
                return False
            try:
                self.injector.inject(d)
                self.host.count("injected")
            except InjectError as e:
                failure.append(Abort(grpc.StatusCode.INVALID_ARGUMENT, str(e)))
                return False
            except OSError as e:
                self.host.count("inject_errors")
                log.warning("inject failed", extra={"errno": e.errno, "strerror": e.strerror})
            return True

        def reader() -> None:
            try:
                for items in received:
                    counts["messages_in"] += 1
                    for m in items:
                        if not inject(m):
                            return
            except grpc.RpcError:
                pass  # the call ended (cancelled / deadline); the sender loop notices
            except Exception as e:
                self.host.internal_error("grpc.Punt.reader", e)
            finally:
                done.set()
                sub.wake()

        threading.Thread(target=reader, name="punt-reader", daemon=True).start()
        context.send_initial_metadata((("x-worker-id", self.host.worker_id),))
        log.info("punt stream connected", extra={"peer": context.peer()})
        try:
            while True:
                if failure:
                    f = failure[0]
                    log.info(
                        "punt stream rejected", extra={"code": f.code.name, "detail": f.message}
                    )
                    _abort(context, f.code, f.message)
                if (
                    done.is_set()
                    or sub.closed
                    or not context.is_active()
                    or self._stopping.is_set()
                ):
                    return
                d = sub.get(STREAM_POLL)
                if d is None:
                    continue
                batch, size = [d], len(d.data)
                while len(batch) < PUNT_BATCH and size < PUNT_BATCH_BYTES:
                    more = sub.get_nowait()
                    if more is None:
                        break
                    batch.append(more)
                    size += len(more.data)
                counts["messages_out"] += 1
                counts["punted"] += len(batch)
                yield batch
        finally:
            sub.close()
            log.info(
                "punt stream gone",
                extra={"peer": context.peer(), "dropped": sub.dropped, **counts},
            )


# --- server ------------------------------------------------------------------------------------


def load_server_credentials(tls_dir: Path, cert_name: str = "server") -> grpc.ServerCredentials:
    """mTLS server credentials (see services.runtime.tls)."""
    return tls.server_credentials(tls_dir, cert_name)


class GrpcServer:
    """grpc.server + Dataplane servicer + health service on one listen address."""

    def __init__(
        self,
        host: EngineHost,
        listen: str,
        credentials: grpc.ServerCredentials,
        *,
        injector: Injector | None = None,
        max_workers: int = 32,
    ) -> None:
        self.host = host
        self.listen = listen
        self.service = DataplaneService(host, injector)
        self.health = health.HealthServicer()
        self.server = grpc.server(
            ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
            options=[("grpc.so_reuseport", 0)],
        )
        pb_grpc.add_DataplaneServicer_to_server(self.service, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._unix_path: Path | None = None
        if listen.startswith("unix:"):
            path = Path(listen[5:].removeprefix("//"))
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.is_socket():
                path.unlink()  # stale socket from an earlier run
            self._unix_path = path
        port = self.server.add_secure_port(listen, credentials)
        if not port:
            raise RuntimeError(f"cannot listen on {listen}")
        self.port = port
        self._stopped = False

    def start(self) -> None:
        self.server.start()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("grpc listening", extra={"listen": self.listen})

    def stop(self, grace: float = 2.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.health.enter_graceful_shutdown()
        self.service.shutdown()
        self.server.stop(grace).wait(grace + 1)
        if self._unix_path is not None:
            try:
                self._unix_path.unlink(missing_ok=True)
            except OSError:
                pass
        log.info("grpc stopped", extra={"listen": self.listen})
