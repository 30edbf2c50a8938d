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
from services.keymgr.config import ConfigError, KeymgrConfig, load_config
from services.keymgr.daemon import Keymgr
from services.keymgr.events import KeyExporter
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
        default=env("KEYMGR_DATAPLANE", "unix:/run/ipsec-dataplane/worker.sock"),
        metavar="[NODE=]ADDR",
        help="the worker's gRPC address: unix:/path/worker.sock or HOST:PORT, optionally "
        "with the policy node it enforces (default: the worker's id)",
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
    return p.parse_args(argv)


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
    node, _, address = args.dataplane.rpartition("=")
    client = DataplaneClient(
        address, args.tls_dir, server_name=args.server_name, client_name=args.client_name
    )
    exporter = None
    if args.export_keys is not None:
        exporter = KeyExporter(args.export_keys)
        try:
            exporter.open()
        except OSError as e:
            log.error("cannot open the key export file", extra={"reason": e.strerror})
            client.close()
            return 2
    leases = None
    if args.state_dir is not None:
        try:
            leases = LeaseStore.open(args.state_dir)
        except (LeaseStoreError, OSError) as e:
            log.error("cannot open the state directory", extra={"reason": str(e)})
            client.close()
            return 2
    else:
        log.warning("no --state-dir: outbound SAs get no sequence-number leases")
    km = Keymgr(
        client,
        cfg.connections,
        cookie_threshold=args.cookie_threshold,
        cookie_period=args.cookie_period,
        key_export=exporter,
        leases=leases,
        seq_lease_block=args.seq_lease_block,
        policy_mode=bool(args.policyd),
    )
    watcher = None
    if args.policyd:
        try:
            watcher = _policy_mode(km, args, node)
        except (grpc.RpcError, TlsConfigError, OSError, ConfigError) as e:
            reason = _details(e)
            log.error("cannot start policy mode", extra={"reason": reason})
            client.close()
            return 2
    api = None
    if args.api_listen:
        try:
            api = ApiServer.with_tls(
                km, args.api_listen, args.tls_dir, args.api_cert_name or args.client_name
            )
        except (TlsConfigError, RuntimeError) as e:
            log.error("cannot serve the operator API", extra={"reason": str(e)})
            client.close()
            return 2
        api.start()

    def _stop(signum: int, _frame: FrameType | None) -> None:
        log.info("stopping", extra={"signal": signal.Signals(signum).name})
        km.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    log.info("keymgr starting", extra={"connections": [c.name for c in cfg.connections]})
    try:
        km.run()
    except Exception:
        log.exception("keymgr failed")
        return 1
    finally:
        if watcher is not None:
            watcher.stop()
        if api is not None:
            api.stop()
        km.events.close()
        client.close()
    return 1 if km.failed else 0


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
