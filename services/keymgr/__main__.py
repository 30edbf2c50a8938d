"""``python -m services.keymgr``: the IKE daemon (minimal: IKEv2 PSK initiator/responder, no rekey).

keymgr needs no host network: IKE travels through the dataplane worker's punt/inject gRPC
stream and the negotiated SAs are installed into the same worker, both over mutual TLS.
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import signal
import sys
from types import FrameType

from services.core.ike.cookies import DEFAULT_PERIOD, DEFAULT_THRESHOLD
from services.dataplane.client import DataplaneClient
from services.keymgr.api import ApiServer
from services.keymgr.config import ConfigError, load_config
from services.keymgr.daemon import Keymgr
from services.keymgr.events import KeyExporter
from services.keymgr.leases import DEFAULT_BLOCK, LeaseStore, LeaseStoreError
from services.runtime.logging import configure_logging
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
        required=env("KEYMGR_CONFIG") is None,
        help="JSON file with the connections (see services/keymgr/config.py)",
    )
    p.add_argument(
        "--dataplane",
        default=env("KEYMGR_DATAPLANE", "unix:/run/ipsec-dataplane/worker.sock"),
        help="the worker's gRPC address: unix:/path/worker.sock or HOST:PORT",
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
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        log.error("invalid configuration", extra={"reason": str(e)})
        return 2
    client = DataplaneClient(
        args.dataplane, args.tls_dir, server_name=args.server_name, client_name=args.client_name
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
    )
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
        if api is not None:
            api.stop()
        km.events.close()
        client.close()
    return 1 if km.failed else 0


if __name__ == "__main__":
    sys.exit(main())
