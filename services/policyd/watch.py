"""policyd's watch stream (gRPC ``ipsec.v1.PolicyWatch``): each node's compiled policy pushed
to keymgr and the workers, as a snapshot and then as deltas, and the revisions they report.

:class:`WatchHub` knows the current revision: policyd's writers notify it after each commit
(in-process), and a poller reads the revision row every ``poll_interval`` seconds so a change
committed by another policyd process on the same database is seen too. It compiles the policy
per (revision, node, addresses) once and caches the last few. :class:`PolicyWatchService` is
the gRPC servicer; :class:`WatchServer` serves it over mutual TLS on a unix socket or TCP.
The delta format is in :mod:`services.runtime.policywatch`.
"""

from __future__ import annotations

import ipaddress
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import grpc
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from services.core.policy import (
    DEFAULT_CA_DIR,
    DEFAULT_SECRETS_DIR,
    CompileError,
    NodeContext,
    compile_policy,
)
from services.pb.ipsec.v1 import policy_pb2 as pb
from services.pb.ipsec.v1 import policy_pb2_grpc as pb_grpc
from services.policyd import store
from services.policyd.db import session_factory
from services.policyd.schemas import NAME_PATTERN
from services.runtime.logging import describe_exception, get_logger
from services.runtime.policywatch import canonical, check_delta, diff, digest, normalise

log = get_logger("policyd.watch")

MAX_ADDRESSES = 64
MAX_REQUEST = 64 * 1024  # bytes of a request message
MAX_SEND = 64 * 1024 * 1024
CACHE_SIZE = 256
MAX_ENFORCED = 10_000  # (node, component) pairs remembered
_NAME = re.compile(NAME_PATTERN)
_COMPONENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")


@dataclass(frozen=True, slots=True)
class Compiled:
    revision: int
    policy: dict[str, Any]  # to_dict(), as plain JSON values
    digest: str
    assigned: bool  # some policy is assigned to the node


@dataclass(frozen=True, slots=True)
class Enforced:
    node: str
    component: str
    revision: int
    digest: str
    reported_at: float  # seconds since the epoch


class WatchHub:
    """Current revision, compiled-policy cache and enforced revisions of one policyd."""

    def __init__(
        self,
        engine: Engine,
        *,
        secrets_dir: str = DEFAULT_SECRETS_DIR,
        ca_dir: str = DEFAULT_CA_DIR,
        poll_interval: float = 0.5,
    ) -> None:
        self._factory = session_factory(engine)
        self.secrets_dir = secrets_dir
        self.ca_dir = ca_dir
        self.poll_interval = poll_interval
        self._cond = threading.Condition()
        self._revision = -1
        self._doc: tuple[int, dict[str, Any]] | None = None
        self._cache: OrderedDict[tuple[int, str, tuple[str, ...]], Compiled] = OrderedDict()
        self._compile_lock = threading.Lock()
        self._enforced: dict[tuple[str, str], Enforced] = {}
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None

    # -- revisions --

    @property
    def revision(self) -> int:
        with self._cond:
            return self._revision

    def notify(self, revision: int) -> None:
        """A revision was committed (or seen in the database); wakes the watchers."""
        with self._cond:
            if revision != self._revision:
                self._revision = revision
                self._cond.notify_all()

    def wait_change(self, known: int, timeout: float) -> int:
        """The current revision once it differs from ``known``, or after ``timeout``."""
        with self._cond:
            self._cond.wait_for(lambda: self._revision != known, timeout)
            return self._revision

    def poll_once(self) -> None:
        with self._factory() as s:
            self.notify(store.current_revision(s))

    def start(self) -> None:
        self.poll_once()
        self._stop.clear()
        self._poller = threading.Thread(target=self._poll, name="policyd-revision", daemon=True)
        self._poller.start()

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._poller is not None:
            self._poller.join(5)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_interval):
            try:
                self.poll_once()
            except SQLAlchemyError as e:
                log.warning("revision poll failed", extra=describe_exception(e))

    # -- compilation --

    def _document(self) -> tuple[int, dict[str, Any]]:
        with self._factory() as s, s.begin():
            rev, doc = store.export_document(s)
        self.notify(rev)
        return rev, doc

    def compiled(self, node: str, addresses: tuple[str, ...]) -> Compiled:
        """The current revision compiled for the node (cached per revision, node, addresses)."""
        with self._compile_lock:
            rev = self.revision
            hit = self._cache.get((rev, node, addresses))
            if hit is not None:
                self._cache.move_to_end((rev, node, addresses))
                return hit
            if self._doc is None or self._doc[0] != rev:
                self._doc = self._document()
            rev, doc = self._doc
            key = (rev, node, addresses)
            hit = self._cache.get(key)
            if hit is not None:
                return hit
            ctx = NodeContext(node, addresses, secrets_dir=self.secrets_dir, ca_dir=self.ca_dir)
            policy = normalise(compile_policy(doc, rev, ctx).to_dict())
            assigned = any(node in (p.get("assigned_to") or []) for p in doc.get("policies", []))
            result = Compiled(rev, policy, digest(policy), assigned)
            self._cache[key] = result
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
            return result

    def cached(self, revision: int, node: str, addresses: tuple[str, ...]) -> Compiled | None:
        with self._compile_lock:
            return self._cache.get((revision, node, addresses))

    # -- enforced revisions --

    def report(self, node: str, component: str, revision: int, digest_: str) -> bool:
        key = (node, component)
        with self._cond:
            if key not in self._enforced and len(self._enforced) >= MAX_ENFORCED:
                return False
            self._enforced[key] = Enforced(node, component, revision, digest_, time.time())
            return True

    def enforced(self) -> list[Enforced]:
        with self._cond:
            return sorted(self._enforced.values(), key=lambda e: (e.node, e.component))


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _abort(context: grpc.ServicerContext, e: _Abort) -> NoReturn:
    context.abort(e.code, e.message)
    raise AssertionError("unreachable")


def check_node(node: str) -> str:
    if not _NAME.fullmatch(node):
        raise _Abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            "node: expected a name of 1-64 letters, digits, '.', '_' or '-'",
        )
    return node


def check_addresses(values: list[str]) -> tuple[str, ...]:
    """Canonical node addresses (the rules of GET /v1/compiled)."""
    if len(values) > MAX_ADDRESSES:
        raise _Abort(
            grpc.StatusCode.INVALID_ARGUMENT, f"addresses: at most {MAX_ADDRESSES} addresses"
        )
    out: list[str] = []
    for text in values:
        try:
            addr = ipaddress.ip_address(text) if len(text) <= 45 else None
        except ValueError:
            addr = None
        if addr is None:
            raise _Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "addresses: expected IP addresses of the node, e.g. 192.0.2.1, 2001:db8::1",
            )
        if str(addr) not in out:
            out.append(str(addr))
    return tuple(out)


class PolicyWatchService(pb_grpc.PolicyWatchServicer):
    def __init__(self, hub: WatchHub, *, wake_interval: float = 1.0) -> None:
        self.hub = hub
        self.wake_interval = wake_interval

    def _compiled(self, node: str, addresses: tuple[str, ...]) -> Compiled:
        try:
            return self.hub.compiled(node, addresses)
        except CompileError as e:
            raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, f"cannot compile: {e}") from None
        except SQLAlchemyError as e:
            log.warning("watch: database error", extra=describe_exception(e))
            raise _Abort(grpc.StatusCode.UNAVAILABLE, "the database is unavailable") from None
        except Exception as e:  # a bug: never a traceback or a value to the client
            log.error("watch: compilation failed", extra=describe_exception(e))
            raise _Abort(grpc.StatusCode.INTERNAL, "internal error") from None

    def Watch(
        self, request: pb.WatchRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.PolicyUpdate]:
        try:
            node = check_node(request.node)
            addresses = check_addresses(list(request.addresses))
            current = self._compiled(node, addresses)
            if not current.assigned and request.revision == 0:
                raise _Abort(
                    grpc.StatusCode.NOT_FOUND,
                    f"no policy is assigned to node {node}; assign one (assigned_to) first",
                )
        except _Abort as e:
            _abort(context, e)
        have_rev, have_digest = request.revision, request.digest
        log.info("watch", extra={"node": node, "peer": context.peer(), "revision": have_rev})
        while context.is_active() and not self.hub.stopping:
            try:
                current = self._compiled(node, addresses)
            except _Abort as e:
                _abort(context, e)
            if current.revision == have_rev and current.digest == have_digest:
                self.hub.wait_change(have_rev, self.wake_interval)
                continue
            yield self._update(current, have_rev, have_digest, node, addresses)
            have_rev, have_digest = current.revision, current.digest

    def _update(
        self,
        new: Compiled,
        have_rev: int,
        have_digest: str,
        node: str,
        addresses: tuple[str, ...],
    ) -> pb.PolicyUpdate:
        old = self.hub.cached(have_rev, node, addresses) if have_rev else None
        if old is not None and old.digest == have_digest and have_rev < new.revision:
            delta = diff(old.policy, new.policy)
            if check_delta(old.policy, new.policy, delta):
                return pb.PolicyUpdate(
                    revision=new.revision, digest=new.digest, base_revision=have_rev, delta=delta
                )
        return pb.PolicyUpdate(
            revision=new.revision, digest=new.digest, snapshot=canonical(new.policy)
        )

    def ReportEnforced(
        self, request: pb.ReportEnforcedRequest, context: grpc.ServicerContext
    ) -> pb.ReportEnforcedResponse:
        try:
            node = check_node(request.node)
            if not _COMPONENT.fullmatch(request.component):
                raise _Abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "component: expected a name of 1-64 letters, digits, '.', '_', ':' or '-'",
                )
            if request.digest and not re.fullmatch(r"[0-9a-f]{64}", request.digest):
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "digest: expected sha256 hex")
            if not self.hub.report(node, request.component, request.revision, request.digest):
                raise _Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many components reported")
        except _Abort as e:
            _abort(context, e)
        return pb.ReportEnforcedResponse(current_revision=max(self.hub.revision, 0))


class WatchServer:
    """The PolicyWatch service over mutual TLS on ``listen`` (``host:port`` or ``unix:/path``)."""

    def __init__(
        self,
        hub: WatchHub,
        listen: str,
        credentials: grpc.ServerCredentials,
        *,
        max_streams: int = 256,
    ) -> None:
        self.hub = hub
        self.listen = listen
        self.service = PolicyWatchService(hub)
        self.server = grpc.server(
            # a Watch stream holds a thread while it is open; a few more for ReportEnforced
            ThreadPoolExecutor(max_workers=max_streams + 8, thread_name_prefix="policywatch"),
            options=[
                ("grpc.so_reuseport", 0),
                ("grpc.max_receive_message_length", MAX_REQUEST),
                ("grpc.max_send_message_length", MAX_SEND),
            ],
            maximum_concurrent_rpcs=max_streams + 8,
        )
        pb_grpc.add_PolicyWatchServicer_to_server(  # type: ignore[no-untyped-call]
            self.service, self.server
        )
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

    def start(self) -> None:
        self.hub.start()
        self.server.start()
        log.info("policy watch listening", extra={"listen": self.listen})

    def stop(self, grace: float = 1.0) -> None:
        self.hub.stop()
        self.server.stop(grace).wait(grace + 1)
        if self._unix_path is not None:
            self._unix_path.unlink(missing_ok=True)
