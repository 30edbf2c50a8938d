"""``python -m services.keymgr``: the IKE daemon (minimal: IKEv2 PSK initiator/responder, no rekey).

keymgr needs no host network: IKE travels through the dataplane worker's punt/inject gRPC
stream and the negotiated SAs are installed into the same worker, both over mutual TLS.

Connections come from ``--config`` (file mode) or, with ``--policyd``, from the compiled policy
of the worker's node, followed live (policy mode, :mod:`services.keymgr.policymode`; docs/keymgr.md
"Policy mode"): then keymgr sends the worker no SPD changes, and a ``--config`` file may be
given only without connections.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import pathlib
import signal
import sys
import threading
from types import FrameType

import grpc

from services.core.ike.cookies import DEFAULT_PERIOD, DEFAULT_THRESHOLD
from services.dataplane.client import DataplaneClient
from services.keymgr.api import ApiServer
from services.keymgr.config import ConfigError, Connection, KeymgrConfig, load_config
from services.keymgr.daemon import Keymgr
from services.keymgr.events import EventBus, KeyExporter
from services.keymgr.leases import DEFAULT_BLOCK, LeaseStore, LeaseStoreError
from services.keymgr.policymode import PolicyFollower, state_file
from services.runtime.logging import configure_logging
from services.runtime.policywatch import PolicyWatcher, mtls_channel_factory
from services.runtime.tls import TlsConfigError

log = logging.getLogger("keymgr")


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def _positive_int(text: str) -> int:
    value = _non_negative_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError("must be a positive number of seconds")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m services.keymgr",
        description=(
            "IKE daemon: runs IKEv2 (PSK) initiators for the configured connections (or answers "
            "the peer's IKE_SA_INIT for start_action none/respond), sends and "
            "receives IKE through a dataplane worker's punt/inject stream and installs the "
            "resulting ESP SAs and SPD entries into that worker over mutual-TLS gRPC. "
            "Flags override KEYMGR_* environment variables."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    env = os.environ.get
    p.add_argument(
        "--config",
        type=pathlib.Path,
        default=env("KEYMGR_CONFIG"),
        help="JSON file with the connections (see services/keymgr/config.py); required "
        "without --policyd, and without connections with it",
    )
    p.add_argument(
        "--dataplane",
        action="append",
        metavar="[NODE=]ADDR",
        help="a worker's gRPC address: unix:/path/worker.sock or HOST:PORT, optionally with "
        "its policy node (default: the worker's id); repeat for several workers (one shard "
        "each). KEYMGR_DATAPLANE: comma-separated "
        "(default: unix:/run/ipsec-dataplane/worker.sock)",
    )
    p.add_argument(
        "--policyd",
        default=env("KEYMGR_POLICYD", ""),
        metavar="ADDR",
        help="policy mode: follow the worker's node's compiled policy from policyd's watch "
        "stream (unix:/path or HOST:PORT, mutual TLS with --tls-dir) instead of --config",
    )
    p.add_argument(
        "--policyd-server-name",
        default=env("KEYMGR_POLICYD_SERVER_NAME", "policyd"),
        help="DNS name expected in policyd's certificate",
    )
    p.add_argument(
        "--policy-state-dir",
        type=pathlib.Path,
        default=pathlib.Path(env("KEYMGR_POLICY_STATE_DIR", "/var/lib/ipsec-keymgr")),
        metavar="DIR",
        help="policy mode: the last policy revision of each node, enforced at start "
        "before policyd answers (one file per node)",
    )
    p.add_argument(
        "--tls-dir",
        type=pathlib.Path,
        default=pathlib.Path(env("KEYMGR_TLS_DIR", "/etc/ipsec/tls")),
        help="directory with ca.pem and <client-name>.pem / .key",
    )
    p.add_argument(
        "--server-name",
        default=env("KEYMGR_SERVER_NAME", "server"),
        help="DNS name expected in the worker's certificate",
    )
    p.add_argument(
        "--client-name",
        default=env("KEYMGR_CLIENT_NAME", "keymgr"),
        help="use <client-name>.pem / .key from --tls-dir as the client certificate",
    )
    p.add_argument(
        "--cookie-threshold",
        type=_non_negative_int,
        default=env("KEYMGR_COOKIE_THRESHOLD", str(DEFAULT_THRESHOLD)),
        help="half-open responder IKE SAs from which an IKE_SA_INIT must carry a valid COOKIE "
        "(RFC 7296 section 2.6); 0 demands cookies always. Demand stops at half of it",
    )
    p.add_argument(
        "--cookie-period",
        type=_positive_float,
        default=env("KEYMGR_COOKIE_PERIOD", str(DEFAULT_PERIOD)),
        help="seconds between cookie secret rotations (a cookie stays valid up to two periods)",
    )
    p.add_argument(
        "--api-listen",
        default=env("KEYMGR_API_LISTEN", ""),
        help="serve the operator gRPC API (mutual TLS) on unix:/path.sock or HOST:PORT; "
        "empty: no API",
    )
    p.add_argument(
        "--api-cert-name",
        default=env("KEYMGR_API_CERT_NAME"),
        help="use <name>.pem / .key from --tls-dir as the API's server certificate "
        "(default: the --client-name certificate)",
    )
    p.add_argument(
        "--export-keys",
        type=pathlib.Path,
        default=env("KEYMGR_EXPORT_KEYS") or None,
        metavar="FILE",
        help="TROUBLESHOOTING ONLY: append every IKE and ESP SA's keys to FILE (mode 0600) "
        "in Wireshark's ikev2_decryption_table / esp_sa formats; off by default",
    )
    p.add_argument(
        "--state-dir",
        type=pathlib.Path,
        default=env("KEYMGR_STATE_DIR") or None,
        metavar="DIR",
        help="directory for durable state: the high-water marks of outbound sequence-number "
        "leases; without it outbound SAs get the whole sequence space (no leases)",
    )
    p.add_argument(
        "--seq-lease-block",
        type=_positive_int,
        default=env("KEYMGR_SEQ_LEASE_BLOCK", str(DEFAULT_BLOCK)),
        help="sequence numbers per lease of an outbound SA (first lease and each extension)",
    )
    p.add_argument(
        "--log-level",
        default=env("KEYMGR_LOG_LEVEL", "info"),
        choices=("debug", "info", "warning", "error"),
    )
    args = p.parse_args(argv)
    if not args.dataplane:
        default = env("KEYMGR_DATAPLANE", "unix:/run/ipsec-dataplane/worker.sock")
        args.dataplane = [t.strip() for t in default.split(",") if t.strip()]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.log_level, background=True)
    cfg = KeymgrConfig(())
    if args.config is None and not args.policyd:
        log.error("no connections: give --config FILE (KEYMGR_CONFIG) or --policyd ADDR")
        return 2
    if args.config is not None:
        try:
            cfg = load_config(args.config)
        except ConfigError as e:
            log.error("invalid configuration", extra={"reason": str(e)})
            return 2
    if args.policyd and cfg.connections:
        log.error(
            "--config has connections and --policyd is given: in policy mode the connections "
            "come from policyd; remove them from the file or leave out --policyd"
        )
        return 2
    targets = [_target(t) for t in args.dataplane]
    clients = [
        DataplaneClient(
            addr, args.tls_dir, server_name=args.server_name, client_name=args.client_name
        )
        for _node, addr in targets
    ]
    shards: list[Keymgr] = []
    watchers: list[PolicyWatcher] = []
    api = None
    try:
        exporter = None
        if args.export_keys is not None:
            exporter = KeyExporter(args.export_keys)  # thread-safe: shared by the shards
            try:
                exporter.open()
            except OSError as e:
                log.error("cannot open the key export file", extra={"reason": e.strerror})
                return 2
        if args.state_dir is None:
            log.warning("no --state-dir: outbound SAs get no sequence-number leases")
        try:
            nodes, conns = _shard_plan(clients, targets, cfg, several=len(clients) > 1)
        except (grpc.RpcError, ConfigError) as e:
            log.error("cannot place the connections on the workers", extra={"reason": _details(e)})
            return 2
        events = EventBus()  # one bus: the operator API's WatchEvents sees every shard
        for k, (client, node) in enumerate(zip(clients, nodes, strict=True)):
            leases = None
            if args.state_dir is not None:
                # one worker: the directory as it is; several: one subdirectory per node
                d = args.state_dir if len(clients) == 1 else args.state_dir / node
                try:
                    leases = LeaseStore.open(d)
                except (LeaseStoreError, OSError) as e:
                    log.error("cannot open the state directory", extra={"reason": str(e)})
                    return 2
            km = Keymgr(
                client,
                conns[k],
                cookie_threshold=args.cookie_threshold,
                cookie_period=args.cookie_period,
                events=events,
                key_export=exporter,
                leases=leases,
                seq_lease_block=args.seq_lease_block,
                policy_mode=bool(args.policyd),
                ike_sa_ids=(k, len(clients)),
            )
            shards.append(km)
            if args.policyd:
                try:
                    watchers.append(_policy_mode(km, args, node))
                except (grpc.RpcError, TlsConfigError, OSError, ConfigError) as e:
                    log.error("cannot start policy mode", extra={"reason": _details(e)})
                    return 2
        if args.api_listen:
            try:
                api = ApiServer.with_tls(
                    shards, args.api_listen, args.tls_dir, args.api_cert_name or args.client_name
                )
            except (TlsConfigError, RuntimeError) as e:
                log.error("cannot serve the operator API", extra={"reason": str(e)})
                return 2
            api.start()

        def _stop(signum: int, _frame: FrameType | None) -> None:
            log.info("stopping", extra={"signal": signal.Signals(signum).name})
            for km in shards:
                km.stop()

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
        log.info(
            "keymgr starting",
            extra={
                "connections": [c.name for km in shards for c in km.connections()],
                **({"workers": nodes} if len(shards) > 1 else {}),
            },
        )
        return _run(shards)
    finally:
        for w in watchers:
            w.stop()
        if api is not None:
            api.stop()
        if shards:
            shards[0].events.close()
        for client in clients:
            client.close()


def _target(text: str) -> tuple[str, str]:
    """``[NODE=]ADDR`` -> (node or "", address)."""
    node, _, addr = text.rpartition("=")
    return node, addr


def _shard_plan(
    clients: list[DataplaneClient],
    targets: list[tuple[str, str]],
    cfg: KeymgrConfig,
    *,
    several: bool,
) -> tuple[list[str], list[tuple[Connection, ...]]]:
    """Each worker's node (given, else its worker id) and its connections. One worker: all of
    them, without asking it anything (as keymgr always did). Several: each connection goes to
    the first worker whose GetStats local_addresses hold its local_addr (ConfigError for one
    that no worker owns)."""
    if not several:
        return [targets[0][0]], [cfg.connections]
    nodes: list[str] = []
    owned: list[set[str]] = []
    for client, (node, _addr) in zip(clients, targets, strict=True):
        client.wait_ready(timeout=30.0)
        stats = client.stats()
        nodes.append(node or stats.worker_id)
        owned.append({_norm(a) for a in stats.local_addresses})
    if len(set(nodes)) != len(nodes):
        raise ConfigError(f"two --dataplane workers have the same node: {nodes}")
    conns: list[list[Connection]] = [[] for _ in clients]
    for c in cfg.connections:
        k = next((i for i, addrs in enumerate(owned) if _norm(c.local_addr) in addrs), None)
        if k is None:
            have = ", ".join(f"{n}: {sorted(a)}" for n, a in zip(nodes, owned, strict=True))
            raise ConfigError(
                f"connection {c.name!r}: local_addr {c.local_addr} is not an address of any "
                f"worker ({have}); "
                "start the worker with --local-address or fix local_addr"
            )
        conns[k].append(c)
    return nodes, [tuple(x) for x in conns]


def _norm(addr: str) -> str:
    try:
        return str(ipaddress.ip_address(addr))
    except ValueError:
        return addr


def _run(shards: list[Keymgr]) -> int:
    """Run the shards' main loops (one worker: on this thread, as always; several: a thread
    each, and when one ends — its worker gone — the others are stopped too)."""
    if len(shards) == 1:
        km = shards[0]
        try:
            km.run()
        except Exception:
            log.exception("keymgr failed")
            return 1
        return 1 if km.failed else 0
    crashed: list[Keymgr] = []
    done = threading.Event()

    def run(km: Keymgr) -> None:
        try:
            km.run()
        except Exception:
            log.exception("keymgr failed", extra={"target": km.client.target})
            crashed.append(km)
        finally:
            done.set()

    threads = [
        threading.Thread(target=run, args=(km,), name=f"keymgr-{k}") for k, km in enumerate(shards)
    ]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        if done.wait(0.5):
            for km in shards:
                km.stop()  # one worker gone: stop all (the orchestrator restarts keymgr)
    for t in threads:
        t.join()
    return 1 if crashed or any(km.failed for km in shards) else 0


def _details(e: BaseException) -> str:
    if isinstance(e, grpc.Call):
        return f"{e.code().name}: {e.details()}"
    return str(e) or type(e).__name__


def _policy_mode(km: Keymgr, args: argparse.Namespace, node: str) -> PolicyWatcher:
    """Follow the worker's node's policy: the saved revision is enforced at once (keymgr
    starts with its connections), then the watcher's updates reconfigure keymgr live. The
    watcher asks for the node with the worker's local addresses (the compiler's ``me``), so
    keymgr and the worker compile with the same addresses."""
    km.client.wait_ready(timeout=30.0)
    stats = km.client.stats()
    node = node or stats.worker_id
    path = state_file(args.policy_state_dir, node)
    follower = PolicyFollower(km)
    initial = follower.initial(path)
    km.reconfigure(initial, km.clock(), revision=follower.revision)  # not running yet
    watcher = PolicyWatcher(
        mtls_channel_factory(
            args.policyd,
            args.tls_dir,
            server_name=args.policyd_server_name,
            client_name=args.client_name,
        ),
        node=node,
        component="keymgr",
        addresses=stats.local_addresses,
        state_file=path,
        on_update=follower.on_update,
    )
    log.info(
        "policy mode",
        extra={
            "policyd": args.policyd,
            "node": node,
            "addresses": list(stats.local_addresses),
            "revision": follower.revision,
        },
    )
    # started beside the main loop: the saved state's on_update waits for nothing (enforced
    # already), later ones wait for the loop that km.run() is about to start
    threading.Thread(target=watcher.start, name="policywatch-start", daemon=True).start()
    return watcher


if __name__ == "__main__":
    sys.exit(main())
