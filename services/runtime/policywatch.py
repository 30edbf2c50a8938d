"""policyd's watch stream: the delta format (shared by policyd and its consumers) and the
consumer library that keymgr and the workers use to follow their node's compiled policy.

The compiled policy travels as the JSON of ``CompiledPolicy.to_dict()`` (what ``GET
/v1/compiled`` returns). A delta names, for each of its four lists (``entries``,
``connections``, ``conflicts``, ``unsupported``), the items removed by their stable key and
the items added with their new position; an item's key is the digest of its canonical JSON
without its position fields (``policy_id`` and ``priority`` of an SPD entry, which are its
position + 1), with ``#n`` appended to the n-th repeat of the same item. The digest of a
whole policy is the sha256 of its canonical JSON (sorted keys, no spaces).

:class:`PolicyWatcher` runs a thread that watches policyd, rebuilds the policy from
snapshots and deltas (checking the digest of every result), writes the last revision and
policy atomically to a state file (temp file, fsync, rename), loads it at start so the node
keeps enforcing it while policyd is down, reconnects with back-off, calls ``on_update`` for
each new revision and reports the revision it enforces.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from services.core.selectors import Prefix, Selector
from services.core.spd import Action, SpdEntry
from services.pb.ipsec.v1 import policy_pb2 as pb
from services.pb.ipsec.v1 import policy_pb2_grpc as pb_grpc
from services.runtime import tls

log = logging.getLogger("services.runtime.policywatch")

LISTS = ("entries", "connections", "conflicts", "unsupported")
POSITION_FIELDS = {"entries": ("policy_id", "priority")}
STATE_VERSION = 1
MAX_MESSAGE = 64 * 1024 * 1024  # a snapshot of a large policy


class DeltaError(ValueError):
    """A delta that does not apply to the policy the consumer has."""


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def digest(policy: Mapping[str, Any]) -> str:
    """sha256 hex of the canonical JSON of a compiled policy (its ``to_dict()``)."""
    return hashlib.sha256(canonical(policy)).hexdigest()


def normalise(policy: Mapping[str, Any]) -> dict[str, Any]:
    """A compiled policy as plain JSON values (tuples become lists)."""
    out: dict[str, Any] = json.loads(canonical(policy))
    return out


def _stripped(kind: str, item: Mapping[str, Any]) -> dict[str, Any]:
    drop = POSITION_FIELDS.get(kind, ())
    return {k: v for k, v in item.items() if k not in drop}


def item_keys(kind: str, items: Sequence[Mapping[str, Any]]) -> list[str]:
    """The stable key of each item of list ``kind`` (see the module docstring)."""
    seen: dict[str, int] = {}
    keys: list[str] = []
    for item in items:
        base = hashlib.sha256(canonical(_stripped(kind, item))).hexdigest()[:24]
        n = seen.get(base, 0)
        seen[base] = n + 1
        keys.append(base if n == 0 else f"{base}#{n}")
    return keys


def _positioned(kind: str, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if kind in POSITION_FIELDS:
        return [
            {**item, **{f: i + 1 for f in POSITION_FIELDS[kind]}} for i, item in enumerate(items)
        ]
    return items


def diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> pb.PolicyDelta:
    """The delta that turns ``old`` into ``new`` (both ``to_dict()`` forms)."""
    delta = pb.PolicyDelta()
    for kind in LISTS:
        old_items, new_items = list(old[kind]), list(new[kind])
        old_keys, new_keys = item_keys(kind, old_items), item_keys(kind, new_items)
        kept = set(old_keys) & set(new_keys)
        part: pb.ListDelta = getattr(delta, kind)
        part.removed.extend(k for k in old_keys if k not in kept)
        for i, (key, item) in enumerate(zip(new_keys, new_items, strict=True)):
            if key not in kept:
                part.added.add(key=key, position=i, json=canonical(_stripped(kind, item)))
    return delta


def apply_delta(old: Mapping[str, Any], delta: pb.PolicyDelta, revision: int) -> dict[str, Any]:
    """``old`` with ``delta`` applied, at ``revision``. DeltaError when it does not apply."""
    out: dict[str, Any] = {**normalise(old), "revision": revision}
    for kind in LISTS:
        part: pb.ListDelta = getattr(delta, kind)
        items = list(out[kind])
        keys = item_keys(kind, items)
        removed = set(part.removed)
        if len(removed) != len(part.removed) or not removed <= set(keys):
            raise DeltaError(f"{kind}: the delta removes items the policy does not have")
        rest = [
            _stripped(kind, item)
            for key, item in zip(keys, items, strict=True)
            if key not in removed
        ]
        for added in sorted(part.added, key=lambda a: a.position):
            if added.position > len(rest):
                raise DeltaError(f"{kind}: an added item is out of range")
            try:
                value = json.loads(added.json)
            except ValueError:
                raise DeltaError(f"{kind}: an added item is not JSON") from None
            if not isinstance(value, dict):
                raise DeltaError(f"{kind}: an added item is not an object")
            rest.insert(added.position, value)
        out[kind] = _positioned(kind, rest)
    return out


def check_delta(old: Mapping[str, Any], new: Mapping[str, Any], delta: pb.PolicyDelta) -> bool:
    """True when ``delta`` applied to ``old`` gives exactly ``new`` (policyd checks each delta
    before sending it and sends a snapshot otherwise)."""
    try:
        got = apply_delta(old, delta, int(new["revision"]))
    except DeltaError:
        return False
    return digest(got) == digest(new)


def spd_entries(policy: Mapping[str, Any]) -> tuple[SpdEntry, ...]:
    """The SPD of a compiled policy in ``to_dict()`` form, as the dataplane's entries (what
    ``CompiledPolicy.entries`` holds). ValueError for a malformed entry."""
    out: list[SpdEntry] = []
    try:
        for e in policy["entries"]:
            sel = Selector(
                Prefix.parse(e["source"]),
                Prefix.parse(e["destination"]),
                int(e["protocol"]),
                int(e["source_ports"][0]),
                int(e["source_ports"][1]),
                int(e["destination_ports"][0]),
                int(e["destination_ports"][1]),
            )
            out.append(
                SpdEntry(
                    int(e["policy_id"]),
                    int(e["priority"]),
                    Action[str(e["action"]).upper()],
                    sel,
                    int(e["reqid"]),
                    tuple(int(p) for p in e["protocols"]),
                    bool(e["accept_clear"]),
                    bool(e["clear_fallback"]),
                )
            )
    except (KeyError, TypeError, IndexError) as e:
        raise ValueError(f"malformed SPD entry ({type(e).__name__})") from None
    return tuple(out)


def connection_configs(policy: Mapping[str, Any]) -> list[dict[str, Any]]:
    """keymgr's JSON configuration objects of the policy's connections, in order, each with
    the explicit reqids its SPD entries carry."""
    return [dict(c["config"]) for c in policy["connections"]]


# -- state file ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PolicyState:
    """What a consumer enforces: a revision and its compiled policy (``to_dict()`` form)."""

    revision: int
    digest: str
    policy: dict[str, Any]


def save_state(path: Path, state: PolicyState) -> None:
    """Write ``state`` atomically: a temp file in the same directory, fsync, rename, fsync of
    the directory. A crash leaves the old state or the new one, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = canonical(
        {
            "version": STATE_VERSION,
            "revision": state.revision,
            "digest": state.digest,
            "policy": state.policy,
        }
    )
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def load_state(path: Path) -> PolicyState | None:
    """The saved state, or None when there is none or it is unreadable or damaged (logged)."""
    try:
        raw = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("policy state unreadable; starting without", extra={"error": str(e)[:200]})
        return None
    try:
        if raw["version"] != STATE_VERSION:
            raise ValueError("version")
        policy = raw["policy"]
        revision = int(raw["revision"])
        if not isinstance(policy, dict) or digest(policy) != raw["digest"]:
            raise ValueError("digest")
        if policy.get("revision") != revision:
            raise ValueError("revision")
    except (KeyError, TypeError, ValueError) as e:
        log.warning("policy state damaged; starting without", extra={"error": str(e)[:200]})
        return None
    return PolicyState(revision, raw["digest"], policy)


# -- the consumer ------------------------------------------------------------------------------


OnUpdate = Callable[[PolicyState], None]


class PolicyWatcher:
    """Follows one node's compiled policy from policyd (see the module docstring).

    ``channel_factory`` makes a new gRPC channel for each connection attempt (use
    :func:`mtls_channel_factory`). ``on_update`` is called from the watcher's thread with each
    new state (also once at start with the saved state, when there is one); when it raises,
    the revision is not reported as enforced nor saved, and the watcher reconnects."""

    def __init__(
        self,
        channel_factory: Callable[[], grpc.Channel],
        *,
        node: str,
        component: str,
        addresses: Sequence[str] = (),
        state_file: Path,
        on_update: OnUpdate | None = None,
        backoff: tuple[float, float] = (0.5, 30.0),
    ) -> None:
        self._factory = channel_factory
        self.node = node
        self.component = component
        self.addresses = tuple(addresses)
        self.state_file = state_file
        self._on_update = on_update
        self._backoff = backoff
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._channel: grpc.Channel | None = None
        self._state = load_state(state_file)
        self._resync = False
        self.connected = threading.Event()
        self.updates = 0  # updates applied (snapshots + deltas)
        self.snapshots = 0
        self.deltas = 0
        self.errors = 0
        self.last_error = ""

    @property
    def state(self) -> PolicyState | None:
        with self._lock:
            return self._state

    @property
    def revision(self) -> int:
        s = self.state
        return s.revision if s else 0

    def start(self) -> None:
        if self._state is not None and self._on_update is not None:
            self._on_update(self._state)  # enforce the saved policy before policyd answers
        self._thread = threading.Thread(
            target=self._run, name=f"policywatch-{self.component}", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        with self._lock:
            ch = self._channel
        if ch is not None:
            ch.close()  # ends a blocked stream read
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        delay = self._backoff[0]
        while not self._stop.is_set():
            channel = self._factory()
            with self._lock:
                self._channel = channel
            try:
                if self._watch(channel):
                    delay = self._backoff[0]
            except grpc.RpcError as e:
                self.errors += 1
                code = e.code() if isinstance(e, grpc.Call) else None
                self.last_error = f"{code.name if code else 'error'}: {_details(e)}"
                if not self._stop.is_set():
                    log.info("policyd watch interrupted", extra={"error": self.last_error})
            except (DeltaError, ValueError) as e:
                self.errors += 1
                self.last_error = str(e)[:200]
                self._resync = True  # ask for a snapshot next time
                log.warning("policyd update refused", extra={"error": self.last_error})
            except Exception as e:  # on_update failed: retry the revision after the back-off
                self.errors += 1
                self.last_error = f"on_update: {type(e).__name__}"
                log.warning("policy update not applied", extra={"error": self.last_error})
            finally:
                self.connected.clear()
                with self._lock:
                    self._channel = None
                channel.close()
            if self._stop.wait(delay * (0.5 + random.random() / 2)):  # noqa: S311 - jitter
                break
            delay = min(delay * 2, self._backoff[1])

    def _watch(self, channel: grpc.Channel) -> bool:
        """One stream; True when it got at least one update or was current."""
        stub = pb_grpc.PolicyWatchStub(channel)  # type: ignore[no-untyped-call]
        have = self.state
        req = pb.WatchRequest(
            node=self.node,
            addresses=list(self.addresses),
            revision=have.revision if have else 0,
            digest=have.digest if have and not self._resync else "",
        )
        stream: Iterator[pb.PolicyUpdate] = stub.Watch(req)
        self.connected.set()
        if have is not None:
            self._report(stub, have)
        progressed = False
        for update in stream:
            state = self._apply(update)
            if self._on_update is not None:
                self._on_update(state)
            save_state(self.state_file, state)
            with self._lock:
                self._state = state
            self.updates += 1
            self._resync = False
            progressed = True
            self._report(stub, state)
        return progressed

    def _apply(self, update: pb.PolicyUpdate) -> PolicyState:
        have = self.state
        if update.WhichOneof("body") == "snapshot":
            try:
                policy = json.loads(update.snapshot)
            except ValueError:
                raise DeltaError("the snapshot is not JSON") from None
            if not isinstance(policy, dict):
                raise DeltaError("the snapshot is not an object")
            self.snapshots += 1
        elif update.WhichOneof("body") == "delta":
            if have is None or have.revision != update.base_revision:
                raise DeltaError("a delta for another revision than ours")
            policy = apply_delta(have.policy, update.delta, update.revision)
            self.deltas += 1
        else:
            raise DeltaError("an update without a body")
        got = digest(policy)
        if got != update.digest or policy.get("revision") != update.revision:
            raise DeltaError("the rebuilt policy does not match policyd's digest")
        if have is not None and update.revision < have.revision:
            log.warning(
                "policyd revision went back",
                extra={"have": have.revision, "got": update.revision},
            )
        return PolicyState(update.revision, got, policy)

    def _report(self, stub: pb_grpc.PolicyWatchStub, state: PolicyState) -> None:
        try:
            stub.ReportEnforced(
                pb.ReportEnforcedRequest(
                    node=self.node,
                    component=self.component,
                    revision=state.revision,
                    digest=state.digest,
                ),
                timeout=5.0,
            )
        except grpc.RpcError as e:
            log.info("enforced revision not reported", extra={"error": _details(e)})


def _details(e: grpc.RpcError) -> str:
    d = e.details() if isinstance(e, grpc.Call) else ""
    return (d or "")[:200]


def mtls_channel_factory(
    target: str,
    tls_dir: Path,
    *,
    server_name: str = tls.DEFAULT_SERVER_NAME,
    client_name: str = tls.DEFAULT_CLIENT_NAME,
) -> Callable[[], grpc.Channel]:
    """Channels to policyd over mutual TLS (``host:port`` or ``unix:/path``)."""
    creds = tls.channel_credentials(tls_dir, client_name)
    options = [*tls.channel_options(server_name), ("grpc.max_receive_message_length", MAX_MESSAGE)]

    def make() -> grpc.Channel:
        return grpc.secure_channel(target, creds, options=options)

    return make


__all__ = [
    "DeltaError",
    "PolicyState",
    "PolicyWatcher",
    "apply_delta",
    "canonical",
    "check_delta",
    "connection_configs",
    "diff",
    "digest",
    "item_keys",
    "load_state",
    "mtls_channel_factory",
    "normalise",
    "save_state",
    "spd_entries",
]
