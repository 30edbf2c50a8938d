"""``python -m services.keymgr.ctl``: operator command line for keymgr's gRPC API (mutual TLS).

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
printed), 2 on bad usage.
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import sys
from collections.abc import Sequence

import grpc

from services.pb.ipsec.v1 import keymgr_pb2 as pb
from services.pb.ipsec.v1 import keymgr_pb2_grpc as pb_grpc
from services.runtime import tls

KIND_NAMES = {v: k for k, v in pb.KeymgrEventKind.items()}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(
        prog="python -m services.keymgr.ctl",
        description="Operate keymgr over its mutual-TLS gRPC API.",
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


def _when(t: float) -> str:
    if not t:
        return "-"
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def format_sas(ike: Sequence[pb.IkeSaInfo], children: Sequence[pb.ChildSaInfo]) -> str:
    """swanctl-like text for ListIkeSas + ListChildSas."""
    lines: list[str] = []
    for s in ike:
        lines.append(
            f"{s.connection}: #{s.id}, {s.state.upper()}, IKEv2, {s.spi_i}_i {s.spi_r}_r"
            + (" (NAT-T)" if s.nat_t else "")
        )
        lines.append(
            f"  local  {s.local_addr}[{s.local_port}]  remote {s.remote_addr}[{s.remote_port}]"
            f"  role {s.role}"
        )
        lines.append(f"  {s.encryption}/{s.integrity}/{s.prf}/{s.dh_group}")
        if s.established_time:
            lines.append(f"  established {_when(s.established_time)}")
        if s.failure_reason:
            lines.append(f"  failed: {s.failure_reason}")
        for c in children:
            if c.ike_sa_id != s.id or not s.id:
                continue
            lines.append(
                f"  {c.name or c.connection}: {c.state.upper()}, {c.mode.upper()}"
                f"{'-in-UDP' if c.udp_encap else ''}, reqid {c.reqid}, "
                f"{c.protocol.upper()}:"
                + "/".join(
                    x for x in (c.encryption, c.integrity if c.integrity != "NONE" else "") if x
                )
            )
            counters = (
                f"{c.bytes_in} bytes_i ({c.packets_in} pkts), "
                f"{c.bytes_out} bytes_o ({c.packets_out} pkts)"
                if c.counters_known
                else "counters unavailable"
            )
            lines.append(f"    installed {_when(c.install_time)}")
            lines.append(f"    in  {c.spi_in},  out {c.spi_out}; {counters}")
            lines.append(f"    local  {' '.join(c.local_ts)}")
            lines.append(f"    remote {' '.join(c.remote_ts)}")
    orphans = [c for c in children if c.ike_sa_id not in {s.id for s in ike if s.id}]
    for c in orphans:
        lines.append(
            f"{c.connection}: child {c.name + ' ' if c.name else ''}"
            f"{c.spi_in}/{c.spi_out} {c.state.upper()}"
        )
    return "\n".join(lines) if lines else "no SAs"


def format_event(e: pb.KeymgrEvent) -> str:
    kind = KIND_NAMES.get(e.kind, str(e.kind)).removeprefix("KEYMGR_EVENT_KIND_").lower()
    parts = [_when(e.time), kind, e.connection]
    if e.ike_sa_id:
        parts.append(f"#{e.ike_sa_id}")
    if e.spi_i:
        parts.append(f"ike {e.spi_i}_i {e.spi_r}_r")
    if e.child:
        parts.append(f"child {e.child}")
    if e.spi_in:
        parts.append(f"child in {e.spi_in} out {e.spi_out}")
    if e.old_spi_in:
        parts.append(f"replaces in {e.old_spi_in} out {e.old_spi_out}")
    if e.reason:
        parts.append(f"- {e.reason}")
    return " ".join(parts)


def run(args: argparse.Namespace) -> int:
    channel = tls.secure_channel(
        args.api, args.tls_dir, server_name=args.server_name, client_name=args.client_name
    )
    stub = pb_grpc.KeyManagerStub(channel)
    t = args.timeout
    try:
        if args.list_sas:
            ike = stub.ListIkeSas(pb.ListIkeSasRequest(), timeout=t).ike_sas
            children = stub.ListChildSas(pb.ListChildSasRequest(), timeout=t).child_sas
            print(format_sas(ike, children))
        elif args.initiate is not None:
            req = pb.InitiateRequest(connection=args.initiate, child=args.child)
            r = stub.Initiate(req, timeout=t)
            print(f"{args.initiate}{'/' + args.child if args.child else ''}: {r.detail}")
        elif args.terminate is not None and args.child:
            ref = pb.ChildSaRef(connection=args.terminate, child=args.child)
            r = stub.Terminate(pb.TerminateRequest(child_sa=ref), timeout=t)
            print(f"{args.terminate}/{args.child}: {r.detail}")
        elif args.terminate is not None:
            r = stub.Terminate(pb.TerminateRequest(connection=args.terminate), timeout=t)
            print(f"{args.terminate}: {r.detail}")
        elif args.terminate_id is not None:
            r = stub.Terminate(pb.TerminateRequest(ike_sa_id=args.terminate_id), timeout=t)
            print(f"#{args.terminate_id}: {r.detail}")
        else:
            seen = 0
            for e in stub.WatchEvents(pb.WatchEventsKeymgrRequest()):
                print(format_event(e), flush=True)
                seen += 1
                if args.count and seen >= args.count:
                    break
    except grpc.RpcError as e:
        print(f"keymgr: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    finally:
        channel.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except tls.TlsConfigError as e:
        print(f"keymgr ctl: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
