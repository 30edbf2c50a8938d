"""gRPC service ipsec.v1.KeyManager (proto/ipsec/v1/keymgr.proto): keymgr's operator API, over
mutual TLS (services/runtime/tls.py, the scheme the dataplane worker uses).

Threading: keymgr's IKE state belongs to its main loop. Every handler that reads or changes it
hands a callable to :meth:`Keymgr.submit` and waits (at most ``CALL_TIMEOUT``) for the result;
no handler touches IKE state itself. The worker's per-SA counters for ListChildSas are fetched
from the handler's thread (the dataplane client's channel is thread-safe), after the main loop
produced its snapshot. WatchEvents subscribes to keymgr's event bus (drop-oldest per subscriber).

Status codes: a malformed request (missing target, a name that cannot be a connection name)
-> INVALID_ARGUMENT; an unknown connection or IKE SA -> NOT_FOUND; initiating a connection that
only responds -> FAILED_PRECONDITION; an unknown child or Child SA -> NOT_FOUND; keymgr
stopping or its loop not
answering in time -> UNAVAILABLE; anything unexpected -> INTERNAL (logged by type only). No
response or event carries key material.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import grpc

from services.core.sa import Direction
from services.keymgr.config import MAX_NAME_LEN
from services.keymgr.daemon import Keymgr, KeymgrStopped
from services.keymgr.events import ChildSaView, IkeSaView, KeymgrEvent
from services.pb.ipsec.v1 import keymgr_pb2 as pb
from services.pb.ipsec.v1 import keymgr_pb2_grpc as pb_grpc
from services.runtime import tls

log = logging.getLogger("keymgr.api")

SERVICE_NAME = "ipsec.v1.KeyManager"
CALL_TIMEOUT = 10.0  # seconds a handler waits for keymgr's main loop
STREAM_POLL = 0.5
R = TypeVar("R")

EVENT_KINDS = {
    "up": pb.KEYMGR_EVENT_KIND_UP,
    "down": pb.KEYMGR_EVENT_KIND_DOWN,
    "child_up": pb.KEYMGR_EVENT_KIND_CHILD_UP,
    "child_down": pb.KEYMGR_EVENT_KIND_CHILD_DOWN,
    "rekeyed": pb.KEYMGR_EVENT_KIND_REKEYED,
    "auth_failed": pb.KEYMGR_EVENT_KIND_AUTH_FAILED,
    "negotiation_failed": pb.KEYMGR_EVENT_KIND_NEGOTIATION_FAILED,
    "config": pb.KEYMGR_EVENT_KIND_CONFIG,
}


class Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, msg: str) -> NoReturn:
    context.abort(code, msg)
    raise AssertionError("unreachable")  # context.abort raises


def _unary(name: str) -> Callable[[Callable[..., R]], Callable[..., R]]:
    """Map a unary handler's exceptions to status codes; never let one escape."""

    def deco(fn: Callable[..., R]) -> Callable[..., R]:
        @functools.wraps(fn)
        def wrapper(self: KeyManagerService, request: Any, context: grpc.ServicerContext) -> R:
            try:
                return fn(self, request, context)
            except Abort as e:
                code, msg = e.code, e.message
            except LookupError as e:
                code, msg = grpc.StatusCode.NOT_FOUND, str(e.args[0] if e.args else e)
            except ValueError as e:
                code, msg = grpc.StatusCode.FAILED_PRECONDITION, str(e)
            except KeymgrStopped as e:
                code, msg = grpc.StatusCode.UNAVAILABLE, str(e)
            except Exception as e:
                log.error("rpc failed", extra={"rpc": name, "error": type(e).__name__})
                code, msg = grpc.StatusCode.INTERNAL, "internal error"
            log.info("rpc rejected", extra={"rpc": name, "code": code.name, "detail": msg})
            _abort(context, code, msg)

        return wrapper

    return deco


def check_name(name: str, *, required: bool = True) -> str:
    """A connection name as the config allows it, or Abort(INVALID_ARGUMENT)."""
    if not name:
        if required:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT, "connection name is empty")
        return name
    if len(name) > MAX_NAME_LEN or not name.isprintable():
        raise Abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"connection names are at most {MAX_NAME_LEN} printable characters",
        )
    return name


def ike_sa_to_pb(v: IkeSaView) -> pb.IkeSaInfo:
    return pb.IkeSaInfo(
        id=v.id,
        connection=v.connection,
        role=v.role,
        state=v.state,
        local_addr=v.local_addr,
        local_port=v.local_port,
        remote_addr=v.remote_addr,
        remote_port=v.remote_port,
        spi_i=v.spi_i,
        spi_r=v.spi_r,
        encryption=v.encryption,
        integrity=v.integrity,
        prf=v.prf,
        dh_group=v.dh_group,
        nat_t=v.nat_t,
        established_time=v.established_time,
        failure_reason=v.failure_reason,
    )


def event_to_pb(e: KeymgrEvent) -> pb.KeymgrEvent:
    return pb.KeymgrEvent(
        kind=EVENT_KINDS.get(e.kind, pb.KEYMGR_EVENT_KIND_UNSPECIFIED),
        time=e.time,
        connection=e.connection,
        role=e.role,
        ike_sa_id=e.ike_sa_id,
        spi_i=e.spi_i,
        spi_r=e.spi_r,
        spi_in=e.spi_in,
        spi_out=e.spi_out,
        old_spi_in=e.old_spi_in,
        old_spi_out=e.old_spi_out,
        reason=e.reason,
        child=e.child,
    )


Counters = dict[tuple[int, Direction], tuple[int, int]]


def child_sa_to_pb(v: ChildSaView, counters: Counters | None) -> pb.ChildSaInfo:
    msg = pb.ChildSaInfo(
        ike_sa_id=v.ike_sa_id,
        connection=v.connection,
        state=v.state,
        spi_in=f"{v.spi_in:08x}",
        spi_out=f"{v.spi_out:08x}",
        protocol=v.protocol,
        mode=v.mode,
        encryption=v.encryption,
        integrity=v.integrity,
        esn=v.esn,
        udp_encap=v.udp_encap,
        local_ts=list(v.local_ts),
        remote_ts=list(v.remote_ts),
        reqid=v.reqid,
        install_time=v.install_time,
        name=v.name,
    )
    if counters is not None:
        cin = counters.get((v.spi_in, Direction.INBOUND))
        cout = counters.get((v.spi_out, Direction.OUTBOUND))
        if cin is not None and cout is not None:
            msg.counters_known = True
            msg.packets_in, msg.bytes_in = cin
            msg.packets_out, msg.bytes_out = cout
    return msg


class KeyManagerService(pb_grpc.KeyManagerServicer):
    """The servicer: thin glue between gRPC threads and keymgr's main loop."""

    def __init__(
        self, km: Keymgr | Sequence[Keymgr], *, call_timeout: float = CALL_TIMEOUT
    ) -> None:
        # one shard per worker; they share one event bus (the first shard's)
        self.shards: tuple[Keymgr, ...] = (km,) if isinstance(km, Keymgr) else tuple(km)
        self.km = self.shards[0]
        self.call_timeout = call_timeout
        self._stopping = threading.Event()

    def shutdown(self) -> None:
        self._stopping.set()

    def _call_on(self, km: Keymgr, fn: Callable[[Keymgr, float], R]) -> R:
        fut = km.submit(lambda now: fn(km, now))
        try:
            return fut.result(timeout=self.call_timeout)
        except FutureTimeout:
            fut.cancel()
            raise Abort(
                grpc.StatusCode.UNAVAILABLE,
                f"keymgr did not answer within {self.call_timeout:g}s (busy or not running)",
            ) from None

    def _all(self, fn: Callable[[Keymgr, float], R]) -> list[R]:
        """``fn`` on every shard's main loop; shards raising LookupError (not theirs) are left
        out, and when every shard raises it, the first one's error is raised."""
        out: list[R] = []
        first: LookupError | None = None
        for km in self.shards:
            try:
                out.append(self._call_on(km, fn))
            except LookupError as e:
                first = first or e
        if not out and first is not None:
            raise first
        return out

    def _pairs(self, fn: Callable[[Keymgr, float], tuple[Any, str]]) -> tuple[Any, str]:
        """A command for the shard(s) holding its target: one shard's answer as it is, the
        answers of several combined (counts summed, started if any started)."""
        got = self._all(fn)
        if len(got) == 1:
            return got[0]
        first = got[0][0]
        total = any(v for v, _ in got) if isinstance(first, bool) else sum(v for v, _ in got)
        return total, "; ".join(d for _, d in got)

    @_unary("Initiate")
    def Initiate(
        self, request: pb.InitiateRequest, context: grpc.ServicerContext
    ) -> pb.InitiateResponse:
        name = check_name(request.connection)
        child = check_name(request.child, required=False)
        started, detail = self._pairs(lambda km, now: km.initiate(name, now, child))
        log.info("operator initiate", extra={"conn": name, "child": child, "started": started})
        return pb.InitiateResponse(started=started, detail=detail)

    @_unary("Terminate")
    def Terminate(
        self, request: pb.TerminateRequest, context: grpc.ServicerContext
    ) -> pb.TerminateResponse:
        which = request.WhichOneof("target")
        if which == "connection":
            name = check_name(request.connection)
            sent, detail = self._pairs(lambda km, now: km.terminate(now, name=name))
        elif which == "ike_sa_id":
            sa_id = request.ike_sa_id
            if sa_id == 0:
                raise Abort(grpc.StatusCode.INVALID_ARGUMENT, "ike_sa_id 0 names no IKE SA")
            sent, detail = self._pairs(lambda km, now: km.terminate(now, ike_sa_id=sa_id))
        elif which == "child_sa":
            ref = request.child_sa
            if ref.connection or ref.child:
                name = check_name(ref.connection)
                child = check_name(ref.child)
                n, detail = self._pairs(
                    lambda km, now: km.terminate_child(now, name=name, child=child)
                )
            elif ref.spi_in:
                spi = ref.spi_in
                n, detail = self._pairs(lambda km, now: km.terminate_child(now, spi_in=spi))
            else:
                raise Abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "child_sa needs spi_in, or connection and child",
                )
            log.info("operator terminate", extra={"target": which, "child_sas": n})
            return pb.TerminateResponse(ike_sas=0, child_sas=n, detail=detail)
        else:
            raise Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "say what to terminate: connection, ike_sa_id or child_sa",
            )
        log.info("operator terminate", extra={"target": which, "ike_sas": sent})
        return pb.TerminateResponse(ike_sas=sent, detail=detail)

    @_unary("ListIkeSas")
    def ListIkeSas(
        self, request: pb.ListIkeSasRequest, context: grpc.ServicerContext
    ) -> pb.ListIkeSasResponse:
        name = check_name(request.connection, required=False)
        views = [v for vs in self._all(lambda km, _now: km.ike_sa_views()) for v in vs]
        return pb.ListIkeSasResponse(
            ike_sas=[ike_sa_to_pb(v) for v in views if not name or v.connection == name]
        )

    @_unary("ListChildSas")
    def ListChildSas(
        self, request: pb.ListChildSasRequest, context: grpc.ServicerContext
    ) -> pb.ListChildSasResponse:
        name = check_name(request.connection, required=False)
        views = [
            v
            for vs in self._all(lambda km, _now: km.child_sa_views())
            for v in vs
            if not name or v.connection == name
        ]
        counters: Counters | None = None
        if views:
            counters = self._counters()
        return pb.ListChildSasResponse(child_sas=[child_sa_to_pb(v, counters) for v in views])

    def _counters(self) -> Counters | None:
        """Per-SA packet and byte counters from the worker, None if it cannot say."""
        out: Counters = {}
        for km in self.shards:
            try:
                sas = km.client.list_sas()
            except grpc.RpcError as e:
                log.info("worker counters unavailable", extra={"code": str(e.code())})
                return None
            out.update({(s.spi, s.direction): (s.packets, s.bytes) for s in sas})
        return out

    def WatchEvents(
        self, request: pb.WatchEventsKeymgrRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.KeymgrEvent]:
        sub = self.km.events.subscribe()
        context.add_callback(sub.wake)
        context.send_initial_metadata((("x-keymgr-subscribed", "1"),))
        log.info("event watcher connected", extra={"peer": context.peer()})
        try:
            while not sub.closed and context.is_active() and not self._stopping.is_set():
                e = sub.get(STREAM_POLL)
                if e is not None:
                    yield event_to_pb(e)
        finally:
            sub.close()
            log.info("event watcher gone", extra={"peer": context.peer(), "dropped": sub.dropped})


class ApiServer:
    """grpc.server with the KeyManager servicer on one mTLS listen address
    (``unix:/path`` or ``host:port``)."""

    def __init__(
        self,
        km: Keymgr | Sequence[Keymgr],
        listen: str,
        credentials: grpc.ServerCredentials,
        *,
        max_workers: int = 8,
    ) -> None:
        self.listen = listen
        self.service = KeyManagerService(km)
        self.server = grpc.server(
            ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="keymgr-api"),
            options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 64 * 1024)],
        )
        pb_grpc.add_KeyManagerServicer_to_server(self.service, self.server)
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

    @classmethod
    def with_tls(
        cls, km: Keymgr | Sequence[Keymgr], listen: str, tls_dir: Path, cert_name: str
    ) -> ApiServer:
        return cls(km, listen, tls.server_credentials(tls_dir, cert_name))

    def start(self) -> None:
        self.server.start()
        log.info("operator api listening", extra={"listen": self.listen})

    def stop(self, grace: float = 1.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.service.shutdown()
        self.server.stop(grace).wait(grace + 1)
        if self._unix_path is not None:
            try:
                self._unix_path.unlink(missing_ok=True)
            except OSError:
                pass
