"""``python -m services.policyd``: the policy store's REST API (uvicorn).

Settings come from flags or ``POLICYD_*`` environment variables (flags win): the database URL
(SQLite file by default, ``postgresql+psycopg://...`` for PostgreSQL), the tokens file and the
listen address (HOST:PORT or a unix socket, ``unix:/PATH``). The schema is migrated to the
newest version at start. With
``--grpc-listen`` (and ``--tls-dir``) the same process serves the policy watch stream
(gRPC ``ipsec.v1.PolicyWatch`` over mutual TLS) to keymgr and the workers.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import uvicorn

from services.core.policy import DEFAULT_CA_DIR, DEFAULT_SECRETS_DIR
from services.policyd.api import create_app
from services.policyd.auth import TokensError, TokenStore
from services.policyd.db import make_engine, upgrade
from services.policyd.watch import WatchHub, WatchServer
from services.runtime import tls
from services.runtime.logging import configure_logging, get_logger

log = get_logger("policyd")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(
        prog="python -m services.policyd",
        description="policyd: IPsec policy in SQL behind a REST API. "
        "Flags override POLICYD_* environment variables.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--database-url",
        default=env("POLICYD_DATABASE_URL", "sqlite:///policyd.db"),
        help="SQLAlchemy URL: sqlite:///FILE or postgresql+psycopg://USER@HOST/DB "
        "(POLICYD_DATABASE_URL)",
    )
    p.add_argument(
        "--tokens-file",
        default=env("POLICYD_TOKENS_FILE"),
        required=env("POLICYD_TOKENS_FILE") is None,
        help="JSON file of bearer tokens and roles (POLICYD_TOKENS_FILE)",
    )
    p.add_argument(
        "--listen",
        default=env("POLICYD_LISTEN", "127.0.0.1:8080"),
        help="HOST:PORT or unix:/PATH (a unix socket) to serve on (POLICYD_LISTEN)",
    )
    p.add_argument(
        "--secrets-dir",
        default=env("POLICYD_SECRETS_DIR", DEFAULT_SECRETS_DIR),
        help="where nodes mount PSK secrets: compiled connections name <dir>/<psk_ref> "
        "(POLICYD_SECRETS_DIR)",
    )
    p.add_argument(
        "--ca-dir",
        default=env("POLICYD_CA_DIR", DEFAULT_CA_DIR),
        help="where nodes keep CA certificates: compiled connections name <dir>/<ca>.pem "
        "(POLICYD_CA_DIR)",
    )
    p.add_argument(
        "--grpc-listen",
        default=env("POLICYD_GRPC_LISTEN"),
        help="serve the policy watch stream (gRPC, mutual TLS) on HOST:PORT or unix:/PATH; "
        "default off (POLICYD_GRPC_LISTEN)",
    )
    p.add_argument(
        "--tls-dir",
        default=env("POLICYD_TLS_DIR"),
        help="mTLS directory for --grpc-listen: ca.pem and <cert-name>.pem/.key (POLICYD_TLS_DIR)",
    )
    p.add_argument(
        "--tls-cert-name",
        default=env("POLICYD_TLS_CERT_NAME", "server"),
        help="the server certificate's file name in --tls-dir (POLICYD_TLS_CERT_NAME)",
    )
    p.add_argument(
        "--revision-poll",
        type=float,
        default=float(env("POLICYD_REVISION_POLL", "0.5")),
        help="seconds between reads of the revision row, so the watch stream sees changes "
        "made by another policyd on the same database (POLICYD_REVISION_POLL)",
    )
    p.add_argument(
        "--grpc-max-streams",
        type=int,
        default=int(env("POLICYD_GRPC_MAX_STREAMS", "256")),
        help="watch streams served at once (each holds a thread); more are refused with "
        "RESOURCE_EXHAUSTED and the consumer retries (POLICYD_GRPC_MAX_STREAMS)",
    )
    p.add_argument("--log-level", default=env("POLICYD_LOG_LEVEL", "info"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.log_level)
    uds = args.listen.removeprefix("unix:") if args.listen.startswith("unix:") else None
    host, sep, port = args.listen.rpartition(":")
    if uds is not None:
        if not uds.startswith("/"):
            print(f"--listen: expected unix:/ABSOLUTE/PATH, got {args.listen!r}", file=sys.stderr)
            return 2
    elif not sep or not port.isdigit() or not 0 < int(port) < 65536:
        print(f"--listen: expected HOST:PORT or unix:/PATH, got {args.listen!r}", file=sys.stderr)
        return 2
    try:
        tokens = TokenStore.load(Path(args.tokens_file))
    except TokensError as e:
        print(f"--tokens-file: {e}", file=sys.stderr)
        return 2
    engine = make_engine(args.database_url)
    upgrade(engine)
    hub = WatchHub(
        engine, secrets_dir=args.secrets_dir, ca_dir=args.ca_dir, poll_interval=args.revision_poll
    )
    app = create_app(engine, tokens, secrets_dir=args.secrets_dir, ca_dir=args.ca_dir, hub=hub)
    grpc_server: WatchServer | None = None
    if args.grpc_listen:
        if not args.tls_dir:
            print("--grpc-listen needs --tls-dir (mutual TLS)", file=sys.stderr)
            return 2
        try:
            creds = tls.server_credentials(Path(args.tls_dir), args.tls_cert_name)
            grpc_server = WatchServer(
                hub, args.grpc_listen, creds, max_streams=args.grpc_max_streams
            )
        except (tls.TlsConfigError, RuntimeError) as e:
            print(f"--grpc-listen: {e}", file=sys.stderr)
            return 2
        grpc_server.start()
    log.info(
        "policyd listening", extra={"listen": args.listen, "db": engine.url.render_as_string()}
    )
    try:
        if uds is not None:
            uvicorn.run(app, uds=uds, log_level=args.log_level)
        else:
            uvicorn.run(
                app,
                host=host.strip("[]") or "0.0.0.0",  # noqa: S104
                port=int(port),
                log_level=args.log_level,
            )
    finally:
        if grpc_server is not None:
            grpc_server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
