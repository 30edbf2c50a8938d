"""``ipsecctl`` / ``python -m services.ctl``: the administrator's command line for policyd
(REST, bearer token) and keymgr (gRPC, mutual TLS). Commands, settings and exit status are in
docs/ipsecctl.md; ``ipsecctl --help`` and ``ipsecctl COMMAND --help`` list them.

Exit status: 0 ok, 1 the server refused (its message is printed) or answered something
unusable, 2 usage (bad flags, a malformed input file: nothing was sent), 3 cannot connect.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TextIO

from services.ctl import commands as c
from services.ctl.config import resolve
from services.ctl.errors import EXIT_USAGE, CtlError

EPILOG = """\
settings: flags, then IPSECCTL_POLICYD_URL, IPSECCTL_TOKEN / IPSECCTL_TOKEN_FILE,
IPSECCTL_KEYMGR_API, IPSECCTL_TLS_DIR, IPSECCTL_SERVER_NAME, IPSECCTL_CLIENT_NAME,
IPSECCTL_CA_FILE, IPSECCTL_TIMEOUT, then ~/.config/ipsecctl.toml or /etc/ipsec/ipsecctl.toml.
exit status: 0 ok, 1 refused by the server, 2 usage, 3 cannot connect."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="ipsecctl",
        description="Administer IPsec policy (policyd) and security associations (keymgr).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("connection")
    g.add_argument("--policyd-url", dest="policyd_url", help="http://HOST:PORT or unix:/PATH")
    g.add_argument("--token-file", dest="token_file", help="file holding the bearer token")
    g.add_argument("--ca-file", dest="ca_file", help="CA bundle for an https:// policyd URL")
    g.add_argument("--keymgr-api", dest="keymgr_api", help="keymgr: unix:/PATH or HOST:PORT")
    g.add_argument("--tls-dir", dest="tls_dir", help="ca.pem and <client-name>.pem/.key")
    g.add_argument("--server-name", dest="server_name", help="name in keymgr's certificate")
    g.add_argument("--client-name", dest="client_name", help="our certificate's file name")
    g.add_argument("--timeout", dest="timeout", help="seconds per request (15)")
    g.add_argument("--config", dest="config", help="TOML settings file")

    out = _Parser(add_help=False)
    out.add_argument(
        "-o", "--output", choices=("table", "json", "yaml"), default="table", help="format"
    )
    ifrev = _Parser(add_help=False)
    ifrev.add_argument(
        "--if-revision",
        type=int,
        metavar="N",
        help="only if the object is still at revision N (else 412); default: the one read now",
    )

    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    # policy
    pol = sub.add_parser("policy", help="IPsec policies and the whole policy document")
    ps = pol.add_subparsers(dest="action", required=True, metavar="ACTION", parser_class=_Parser)
    a = ps.add_parser("apply", parents=[out], help="apply a policy document (JSON or YAML)")
    a.add_argument("file", help="the document; - reads standard input")
    a.add_argument("--dry-run", action="store_true", help="report the changes, make none")
    a.add_argument("--prune", action="store_true", help="delete objects not in the document")
    a.add_argument(
        "--if-revision", type=int, metavar="N", help="refuse (412) if the revision is not N"
    )
    a.set_defaults(func=c.policy_apply)
    a = ps.add_parser("export", parents=[out], help="the whole document (apply takes it back)")
    a.add_argument("-f", "--file", help="write to FILE instead of standard output")
    a.set_defaults(func=c.policy_export)
    ps.add_parser("list", parents=[out], help="list policies").set_defaults(func=c.policy_list)
    a = ps.add_parser("get", parents=[out], help="a policy and its rules (all without NAME)")
    a.add_argument("name", nargs="?")
    a.set_defaults(func=c.policy_get)
    a = ps.add_parser("delete", parents=[ifrev], help="delete a policy and its rules")
    a.add_argument("name")
    a.set_defaults(func=c.policy_delete)

    # rules
    r = sub.add_parser("rule", help="rules of a policy")
    rs = r.add_subparsers(dest="action", required=True, metavar="ACTION", parser_class=_Parser)
    a = rs.add_parser("list", parents=[out], help="a policy's rules")
    a.add_argument("policy")
    a.set_defaults(func=c.rule_list)
    a = rs.add_parser("get", parents=[out], help="one rule")
    a.add_argument("policy")
    a.add_argument("name")
    a.set_defaults(func=c.rule_get)
    a = rs.add_parser("delete", parents=[ifrev], help="delete one rule")
    a.add_argument("policy")
    a.add_argument("name")
    a.set_defaults(func=c.rule_delete)

    for cmd, what, fns in (
        (
            "filter-list",
            "filter lists",
            (c.filter_list_list, c.filter_list_get, c.filter_list_delete),
        ),
        (
            "filter-action",
            "filter actions",
            (c.filter_action_list, c.filter_action_get, c.filter_action_delete),
        ),
    ):
        f = sub.add_parser(cmd, help=what)
        fs = f.add_subparsers(dest="action", required=True, metavar="ACTION", parser_class=_Parser)
        fs.add_parser("list", parents=[out], help=f"list {what}").set_defaults(func=fns[0])
        a = fs.add_parser("get", parents=[out], help="one, by name")
        a.add_argument("name")
        a.set_defaults(func=fns[1])
        a = fs.add_parser("delete", parents=[ifrev], help="delete one (refused while used)")
        a.add_argument("name")
        a.set_defaults(func=fns[2])

    t = sub.add_parser("template", help="built-in policy templates")
    ts = t.add_subparsers(dest="action", required=True, metavar="ACTION", parser_class=_Parser)
    ts.add_parser("list", parents=[out], help="templates and their parameters").set_defaults(
        func=c.template_list
    )
    a = ts.add_parser("apply", parents=[out], help="create a template's objects")
    a.add_argument("name")
    a.add_argument("-p", "--param", action="append", metavar="KEY=VALUE", help="VALUE may be JSON")
    a.set_defaults(func=c.template_apply)

    sub.add_parser(
        "revision", parents=[out], help="policyd's current policy revision"
    ).set_defaults(func=c.revision)
    a = sub.add_parser("audit", parents=[out], help="the audit log, oldest first")
    a.add_argument("--limit", type=int, default=100, help="at most N entries (100)")
    a.add_argument("--since-revision", type=int, default=0, help="entries after revision N")
    a.set_defaults(func=c.audit)
    a = sub.add_parser("compiled", parents=[out], help="the compiled SPD of a node")
    a.add_argument("--node", required=True, help="the node or worker name (assigned_to)")
    a.add_argument("--address", action="append", help="the node's address (what me means)")
    a.set_defaults(func=c.compiled)
    sub.add_parser(
        "status", parents=[out], help="revisions enforced by each component; SA summary"
    ).set_defaults(func=c.status)

    # SAs
    s = sub.add_parser("sa", help="keymgr's IKE and Child SAs")
    ss = s.add_subparsers(dest="action", required=True, metavar="ACTION", parser_class=_Parser)
    a = ss.add_parser("list", parents=[out], help="IKE and Child SAs (no keys)")
    a.add_argument("connection", nargs="?", help="only this connection")
    a.set_defaults(func=c.sa_list)
    a = ss.add_parser("initiate", parents=[out], help="start a connection or one child")
    a.add_argument("connection")
    a.add_argument("--child", help="only this child (CREATE_CHILD_SA if the IKE SA is up)")
    a.set_defaults(func=c.sa_initiate)
    a = ss.add_parser("terminate", parents=[out], help="delete a connection's SAs or one IKE SA")
    a.add_argument("connection", nargs="?")
    a.add_argument("--child", help="only this child's Child SAs")
    a.add_argument("--id", type=int, help="one IKE SA, by its id from sa list")
    a.set_defaults(func=c.sa_terminate)
    a = ss.add_parser("events", parents=[out], help="stream SA events (json: one per line)")
    a.add_argument("--count", type=int, default=0, help="stop after N events")
    a.set_defaults(func=c.sa_events)
    return p


SETTING_FLAGS = (
    "policyd_url",
    "token_file",
    "ca_file",
    "keymgr_api",
    "tls_dir",
    "server_name",
    "client_name",
    "timeout",
    "config",
)


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    try:
        settings = resolve({k: getattr(args, k) for k in SETTING_FLAGS})
        ctx = c.Context(settings, out or sys.stdout)
        status: int = args.func(args, ctx)
        return status
    except CtlError as e:
        print(f"ipsecctl: {e}", file=sys.stderr)
        return e.status
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
