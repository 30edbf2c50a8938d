"""Command line for the dataplane worker: ``python -m services.dataplane --help``.

Every flag has a DATAPLANE_<NAME> environment variable (services.dataplane.settings); a flag
given on the command line wins over the environment.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from services.dataplane.settings import Settings
from services.runtime.logging import configure_logging, get_logger


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m services.dataplane",
        description="IPsec dataplane worker: ESP/AH in a TUN + raw/UDP socket shell around the "
        "sans-IO core, managed over mutual-TLS gRPC (ipsec.v1.Dataplane). Needs CAP_NET_ADMIN "
        "and CAP_NET_RAW. Flags override DATAPLANE_* environment variables.",
    )
    a = ap.add_argument
    a("--worker-id", help="worker identity reported in stats and events (default: hostname)")
    a(
        "--grpc-listen",
        metavar="ADDR",
        help="gRPC listen address: unix:/path/worker.sock or HOST:PORT "
        "(default: unix:/run/ipsec-dataplane/worker.sock)",
    )
    a(
        "--tls-dir",
        metavar="DIR",
        help="directory with ca.pem, server.pem, server.key; clients must present a certificate "
        "chaining to ca.pem (mTLS is mandatory) (default: /etc/ipsec/tls)",
    )
    a(
        "--tls-cert-name",
        metavar="NAME",
        help="use NAME.pem / NAME.key from --tls-dir instead of server.pem / server.key",
    )
    a("--tun", metavar="NAME", help="TUN device name (default: ipsec0)")
    a(
        "--tun-address",
        metavar="CIDR",
        action="append",
        help="address for the TUN (repeatable; IPv4 and/or IPv6)",
    )
    a("--tun-mtu", metavar="N", help="TUN MTU (default: 1400)")
    a(
        "--route",
        metavar="CIDR",
        action="append",
        help="destination whose traffic is routed into the TUN (repeatable)",
    )
    a(
        "--local-address",
        metavar="ADDR",
        action="append",
        help="this worker's outer address; UDP 500 and 4500 are bound on each (repeatable)",
    )
    a("--fwmark", metavar="N", help="mark on the worker's own sockets (default: 0x1)")
    a("--table", metavar="N", help="routing table for --route prefixes (default: 100)")
    a("--rule-priority", metavar="N", help="priority of the 'not fwmark' rules (default: 1000)")
    a(
        "--metrics-listen",
        metavar="ADDR:PORT",
        help="Prometheus /metrics address; empty disables (default: 127.0.0.1:9109)",
    )
    a(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        type=str.lower,
        help="log level (default: info)",
    )
    a(
        "--policyd",
        metavar="ADDR",
        help="follow this node's compiled policy from policyd's watch stream (mTLS gRPC, "
        "unix:/path or HOST:PORT) as the SPD's policy layer; empty: off (default)",
    )
    a("--node", metavar="NAME", help="node name in policyd (default: the worker id)")
    a(
        "--policy-state",
        metavar="FILE",
        help="cache of the last policy, enforced at start and while policyd is down "
        "(default: /var/lib/ipsec-dataplane/<worker-id>/policy.json)",
    )
    a(
        "--policyd-server-name",
        metavar="NAME",
        help="name in policyd's server certificate (default: policyd)",
    )
    a(
        "--policyd-cert-name",
        metavar="NAME",
        help="client certificate NAME.pem / NAME.key in --tls-dir presented to policyd "
        "(default: the --tls-cert-name certificate)",
    )
    a(
        "--policyd-retry-max",
        metavar="SECONDS",
        help="longest back-off between attempts to reach policyd (default: 30)",
    )
    a(
        "--inbound-filter",
        choices=["on", "off"],
        type=str.lower,
        help="drop inbound clear packets from --route prefixes that the SPD blocks or that "
        "require security, with nftables (default: on with --policyd, else off)",
    )
    return ap


def settings_from_args(argv: Sequence[str] | None = None) -> Settings:
    args = build_parser().parse_args(argv)
    given: dict[str, Any] = {k: v for k, v in vars(args).items() if v is not None}
    return Settings(**given)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = settings_from_args(argv)
    except ValidationError as e:
        for err in e.errors():
            where = ".".join(str(x) for x in err["loc"]) or "settings"
            print(f"invalid setting {where}: {err['msg']}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, background=True)
    from services.dataplane.worker import Worker

    get_logger("services.dataplane").info("starting", extra={"worker_id": settings.worker_id})
    return Worker(settings).run()


if __name__ == "__main__":
    sys.exit(main())
