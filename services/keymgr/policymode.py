"""keymgr in policy mode: its connections are the compiled policy of its worker's node, followed
live from policyd's watch stream (docs/keymgr.md "Policy mode", docs/policyd.md "Watch
stream"; ARCHITECTURE.md data flow 1: each consumer caches the last revision on local disk,
keeps enforcing it while policyd is unreachable and reports the revision it enforces).

:class:`PolicyFollower` is the ``on_update`` of a
:class:`~services.runtime.policywatch.PolicyWatcher`: it turns the policy's connections
(``ConnectionSpec.config()`` objects, with the compiler's stable reqids) into keymgr
:class:`~services.keymgr.config.Connection` objects, validated like a configuration file's,
and applies them with :meth:`Keymgr.reconfigure` on keymgr's main loop. A policy keymgr
cannot apply (a connection it refuses) raises, so the watcher neither saves nor reports that
revision; the reason is logged. Secrets are never part of a policy: connections name their PSK
files, read when a connection starts.
"""

from __future__ import annotations

import hashlib
import logging
import pathlib
import re
import threading
from collections.abc import Mapping
from typing import Any

from services.keymgr.config import ConfigError, Connection, KeymgrConfig, connection_from_dict
from services.keymgr.daemon import Keymgr
from services.runtime.policywatch import PolicyState, connection_configs, load_state

log = logging.getLogger("keymgr")

APPLY_TIMEOUT = 60.0  # seconds an update waits for keymgr's main loop (the worker may be slow)
_SAFE_NODE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def connections_from_policy(policy: Mapping[str, Any]) -> tuple[Connection, ...]:
    """keymgr's connections of a compiled policy (``CompiledPolicy.to_dict()`` form).
    ConfigError naming the connection for anything keymgr refuses."""
    try:
        items = connection_configs(policy)
    except (KeyError, TypeError) as e:
        raise ConfigError(f"policy has no usable connections list ({type(e).__name__})") from None
    out: list[Connection] = []
    for i, item in enumerate(items):
        try:
            out.append(connection_from_dict(item))
        except ConfigError as e:
            raise ConfigError(f"policy connections[{i}]: {e}") from None
    return KeymgrConfig(tuple(out)).connections  # unique names and reqids


def state_file(directory: pathlib.Path, node: str) -> pathlib.Path:
    """The state file of ``node`` in ``directory`` (one per node; an unusual node name is
    replaced by its digest so it cannot leave the directory)."""
    if _SAFE_NODE.fullmatch(node):
        return directory / f"policy-{node}.json"
    return directory / f"policy-{hashlib.sha256(node.encode()).hexdigest()[:32]}.json"


class PolicyFollower:
    """Applies each policy revision the watcher delivers to a :class:`Keymgr` (see the
    module docstring)."""

    def __init__(self, km: Keymgr, *, timeout: float = APPLY_TIMEOUT) -> None:
        self.km = km
        self.timeout = timeout
        self.digest = ""  # of the policy enforced now
        self.revision = 0
        self.failures = 0
        self._lock = threading.Lock()

    def initial(self, path: pathlib.Path) -> tuple[Connection, ...]:
        """The connections of the saved policy (enforced before policyd answers); none when
        there is no usable saved state (logged)."""
        saved = load_state(path)
        if saved is None:
            return ()
        try:
            conns = connections_from_policy(saved.policy)
        except ConfigError as e:
            log.error(
                "saved policy not enforced",
                extra={"revision": saved.revision, "reason": str(e)},
            )
            return ()
        self.digest, self.revision = saved.digest, saved.revision
        log.info(
            "saved policy loaded",
            extra={"revision": saved.revision, "connections": [c.name for c in conns]},
        )
        return conns

    def on_update(self, state: PolicyState) -> None:
        """The watcher's callback (its thread): apply ``state`` or raise (not enforced)."""
        with self._lock:
            if state.digest == self.digest:
                return  # enforced already (the saved state at start)
            try:
                conns = connections_from_policy(state.policy)
                km = self.km
                fut = km.submit(lambda now: km.reconfigure(conns, now, revision=state.revision))
                fut.result(timeout=self.timeout)
            except Exception as e:
                self.failures += 1
                log.error(
                    "policy not enforced",
                    extra={"revision": state.revision, "reason": str(e) or type(e).__name__},
                )
                raise
            self.digest, self.revision = state.digest, state.revision
            log.info(
                "policy enforced",
                extra={"revision": state.revision, "connections": [c.name for c in conns]},
            )
