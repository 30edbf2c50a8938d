"""``python -m services.keymgr.ctl``: keymgr's operator command line with its original flags,
kept as a thin alias of ``ipsecctl sa ...`` (services/ctl/sa.py holds the implementation;
docs/ipsecctl.md). Operates keymgr's mutual-TLS gRPC API (proto/ipsec/v1/keymgr.proto).

::

    python -m services.keymgr.ctl --api unix:/run/keymgr/api.sock --tls-dir /etc/ipsec/tls \\
        --server-name keymgr --client-name admin --list-sas
    ... --initiate site-b            # send IKE_SA_INIT for a configured connection
    ... --terminate site-b           # Delete every IKE SA of the connection
    ... --terminate-id 3             # Delete one IKE SA (id from --list-sas)
    ... --initiate site-b --child net2   # create one child (CREATE_CHILD_SA if the IKE SA is up)
    ... --terminate site-b --child net2  # Delete that child's Child SAs only
    ... --events                     # print SA events until Ctrl-C (or --count N)

Exit status: 0 on success, 1 when keymgr answered with an error (its status and message are
printed), 2 on bad usage, 3 when keymgr cannot be reached.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
from collections.abc import Sequence

from services.ctl.errors import CtlError
from services.ctl.sa import KIND_NAMES, Keymgr, format_event, format_sas

__all__ = ["KIND_NAMES", "format_event", "format_sas", "main", "parse_args", "run"]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(
        prog="python -m services.keymgr.ctl",
        description="Operate keymgr over its mutual-TLS gRPC API (also: ipsecctl sa ...).",
    )
    p.add_argument(
        "--api",
        default=env("KEYMGR_API", "unix:/run/keymgr/api.sock"),
        help="keymgr's API address: unix:/path.sock or HOST:PORT",
    )
    p.add_argument(
        "--tls-dir",
        type=pathlib.Path,
        default=pathlib.Path(env("KEYMGR_TLS_DIR", "/etc/ipsec/tls")),
        help="directory with ca.pem and <client-name>.pem / .key",
    )
    p.add_argument(
        "--server-name",
        default=env("KEYMGR_API_SERVER_NAME", "keymgr"),
        help="DNS name expected in keymgr's certificate",
    )
    p.add_argument("--client-name", default=env("KEYMGR_CTL_CLIENT_NAME", "admin"))
    p.add_argument("--timeout", type=float, default=15.0, help="seconds per request")
    cmd = p.add_mutually_exclusive_group(required=True)
    cmd.add_argument("--list-sas", action="store_true", help="list IKE and Child SAs")
    cmd.add_argument("--initiate", metavar="NAME", help="start a connection")
    cmd.add_argument("--terminate", metavar="NAME", help="delete a connection's IKE SAs")
    cmd.add_argument("--terminate-id", metavar="ID", type=int, help="delete one IKE SA")
    cmd.add_argument("--events", action="store_true", help="stream SA events")
    p.add_argument("--count", type=int, default=0, help="--events: stop after N events")
    p.add_argument(
        "--child", metavar="CHILD", default="", help="--initiate / --terminate: only this child"
    )
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    with Keymgr(
        args.api,
        args.tls_dir,
        server_name=args.server_name,
        client_name=args.client_name,
        timeout=args.timeout,
    ) as km:
        if args.list_sas:
            print(format_sas(*km.list()))
        elif args.initiate is not None:
            r = km.initiate(args.initiate, args.child)
            print(f"{args.initiate}{'/' + args.child if args.child else ''}: {r.detail}")
        elif args.terminate is not None:
            r = km.terminate(args.terminate, args.child)
            print(f"{args.terminate}{'/' + args.child if args.child else ''}: {r.detail}")
        elif args.terminate_id is not None:
            r = km.terminate(ike_sa_id=args.terminate_id)
            print(f"#{args.terminate_id}: {r.detail}")
        else:
            seen = 0
            events = km.events()
            try:
                for e in events:
                    print(format_event(e), flush=True)
                    seen += 1
                    if args.count and seen >= args.count:
                        break
            except KeyboardInterrupt:
                pass
            finally:
                events.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except CtlError as e:
        print(f"keymgr ctl: {e}", file=sys.stderr)
        return e.status


if __name__ == "__main__":
    sys.exit(main())
