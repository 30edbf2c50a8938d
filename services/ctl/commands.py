"""The commands of ipsecctl (docs/ipsecctl.md): policyd's objects over its REST API
(docs/policyd.md "API": declarative apply, ETag/If-Match, revisions, audit, compiled SPD,
enforced revisions) and keymgr's SAs over its operator gRPC API (services/ctl/sa.py).

Each command takes the parsed arguments and a :class:`Context` and returns the exit status;
errors are raised as :class:`services.ctl.errors.CtlError`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import yaml

from services.ctl import sa as sa_api
from services.ctl.config import Settings
from services.ctl.errors import EXIT_OK, CtlError, ServerError, UsageError
from services.ctl.output import clean, dump, table
from services.ctl.rest import Policyd, expect_dict

MAX_POLICY_FILE = 16 * 1024 * 1024


@dataclass
class Context:
    settings: Settings
    out: TextIO = field(default_factory=lambda: sys.stdout)
    _policyd: Policyd | None = None

    @property
    def policyd(self) -> Policyd:
        if self._policyd is None:
            s = self.settings
            self._policyd = Policyd(s.policyd_url, s.token, timeout=s.timeout, ca_file=s.ca_file)
        return self._policyd

    def keymgr(self) -> sa_api.Keymgr:
        s = self.settings
        return sa_api.Keymgr(
            s.keymgr_api,
            s.tls_dir,
            server_name=s.server_name,
            client_name=s.client_name,
            timeout=s.timeout,
        )

    def print(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)


def _q(name: str) -> str:
    return urllib.parse.quote(name, safe="")


def _emit(ctx: Context, args: argparse.Namespace, data: Any, render: Callable[[], str]) -> int:
    fmt = getattr(args, "output", "table")
    ctx.print(render() if fmt == "table" else dump(data, fmt))
    return EXIT_OK


def _rows(items: list[Any], what: str) -> list[dict[str, Any]]:
    if not all(isinstance(i, dict) for i in items):
        raise ServerError(f"policyd's {what} list holds something that is not an object")
    return items


# -- policy document: apply, export ------------------------------------------------------------


class _AliasFound(Exception):
    pass


class _NoAliasLoader(yaml.SafeLoader):  # type: ignore[misc]  # PyYAML has no stubs here
    """policyd refuses YAML anchors/aliases ("billion laughs"); so do we, before expanding."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise _AliasFound
        return super().compose_node(parent, index)


def load_policy_file(path: str) -> tuple[bytes, str, dict[str, Any]]:
    """The file's bytes, its content type and its parsed form; malformed input is a
    UsageError that names the file and the line."""
    try:
        if path == "-":
            raw = sys.stdin.buffer.read(MAX_POLICY_FILE + 1)
        else:
            with open(path, "rb") as f:
                raw = f.read(MAX_POLICY_FILE + 1)
    except OSError as e:
        raise UsageError(f"cannot read policy file {path}: {e.strerror}") from None
    if len(raw) > MAX_POLICY_FILE:
        raise UsageError(f"policy file {path} is over {MAX_POLICY_FILE // 2**20} MiB")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"policy file {path} is not UTF-8 text (byte {e.start})") from None
    is_json = path.endswith(".json") or (
        not path.endswith((".yaml", ".yml")) and text.lstrip().startswith(("{", "["))
    )
    try:
        if is_json:
            doc = json.loads(text)
        else:
            doc = yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader
    except json.JSONDecodeError as e:
        raise UsageError(
            f"policy file {path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
        ) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise UsageError(f"policy file {path} is not valid YAML: {problem}{where}") from None
    except RecursionError:
        raise UsageError(f"policy file {path} is nested too deeply") from None
    except _AliasFound:
        raise UsageError(
            f"policy file {path} uses YAML anchors/aliases, which policyd refuses; "
            "write the values out"
        ) from None
    if not isinstance(doc, dict):
        raise UsageError(
            f"policy file {path}: expected a document with filter_lists, filter_actions and "
            "policies (a mapping), got " + ("nothing" if doc is None else type(doc).__name__)
        )
    return raw, "application/json" if is_json else "application/yaml", doc


def policy_apply(args: argparse.Namespace, ctx: Context) -> int:
    raw, ctype, doc = load_policy_file(args.file)
    if "revision" in doc:  # an export (GET /v1/document) carries its revision: not applied
        doc = {k: v for k, v in doc.items() if k != "revision"}
        raw, ctype = json.dumps(doc).encode(), "application/json"
    headers = {"If-Match": f'"r{args.if_revision}"'} if args.if_revision is not None else {}
    res, _ = ctx.policyd.call(
        "POST",
        "/v1/apply",
        query={
            "prune": "true" if args.prune else None,
            "dry_run": "true" if args.dry_run else None,
        },
        body=raw,
        content_type=ctype,
        headers=headers,
        what="the policy",
    )
    res = expect_dict(res, "POST /v1/apply")

    def render() -> str:
        changes = _rows(list(res.get("changes") or []), "change")
        lines = []
        if changes:
            lines.append(
                table(
                    ["operation", "kind", "name"],
                    [[c.get("operation"), c.get("kind"), c.get("name")] for c in changes],
                )
            )
        rev = res.get("revision")
        if args.dry_run:
            lines.append(
                f"dry run: {len(changes)} change(s) would be made; revision stays {cell_int(rev)}"
                if changes
                else f"dry run: no change; revision {cell_int(rev)}"
            )
        elif res.get("changed"):
            lines.append(f"applied {len(changes)} change(s); revision {cell_int(rev)}")
        else:
            lines.append(f"no change; revision {cell_int(rev)}")
        return "\n".join(lines)

    return _emit(ctx, args, res, render)


def cell_int(v: Any) -> str:
    return str(v) if isinstance(v, int) else clean(v, 40)


def policy_export(args: argparse.Namespace, ctx: Context) -> int:
    doc = expect_dict(ctx.policyd.get("/v1/document"), "GET /v1/document")
    rev = doc.pop("revision", None)
    fmt = "json" if args.output == "json" else "yaml"
    text = dump(doc, fmt)
    if fmt == "yaml":
        text = f"# policyd revision {cell_int(rev)}\n{text}"
    if args.file:
        try:
            Path(args.file).write_text(text + "\n")
        except OSError as e:
            raise UsageError(f"cannot write {args.file}: {e.strerror}") from None
        print(f"exported revision {cell_int(rev)} to {args.file}", file=sys.stderr)
    else:
        ctx.print(text)
    return EXIT_OK


# -- objects: policies, rules, filter lists, filter actions -----------------------------------


def _policy_rows(items: list[dict[str, Any]]) -> str:
    return table(
        ["name", "assigned_to", "ike proposals", "revision", "description"],
        [
            [
                p.get("name"),
                p.get("assigned_to"),
                (p.get("main_mode") or {}).get("proposals")
                if isinstance(p.get("main_mode"), dict)
                else None,
                p.get("revision"),
                p.get("description"),
            ]
            for p in items
        ],
    )


def _rule_rows(items: list[dict[str, Any]]) -> str:
    def auth(r: dict[str, Any]) -> str:
        ms = r.get("auth_methods") or []
        if not isinstance(ms, list):
            return "?"
        out = []
        for m in ms:
            if isinstance(m, dict):
                ref = m.get("ca") or m.get("psk_ref")
                out.append(f"{m.get('method')}" + (f"({ref})" if ref else ""))
        return ",".join(out)

    return table(
        ["rule", "filter_list", "filter_action", "auth", "tunnel", "enabled", "revision"],
        [
            [
                r.get("name"),
                r.get("filter_list"),
                r.get("filter_action"),
                auth(r),
                r.get("tunnel_endpoint") or "transport",
                r.get("enabled"),
                r.get("revision"),
            ]
            for r in items
        ],
    )


def policy_list(args: argparse.Namespace, ctx: Context) -> int:
    items = _rows(ctx.policyd.get_all("/v1/policies"), "policy")
    return _emit(ctx, args, items, lambda: _policy_rows(items) if items else "no policies")


def policy_get(args: argparse.Namespace, ctx: Context) -> int:
    if not args.name:
        items = _rows(ctx.policyd.get_all("/v1/policies"), "policy")
        for p in items:
            name = p.get("name")
            if isinstance(name, str):
                p["rules"] = _rows(ctx.policyd.get_all(f"/v1/policies/{_q(name)}/rules"), "rule")
        data: Any = items
    else:
        pol = expect_dict(ctx.policyd.get(f"/v1/policies/{_q(args.name)}"), "GET policy")
        pol["rules"] = _rows(ctx.policyd.get_all(f"/v1/policies/{_q(args.name)}/rules"), "rule")
        data = pol

    def render() -> str:
        blocks = []
        for p in data if isinstance(data, list) else [data]:
            rules = p.get("rules") or []
            blocks.append(_policy_rows([p]) + "\n\n" + (_rule_rows(rules) if rules else "no rules"))
        return "\n\n".join(blocks) if blocks else "no policies"

    return _emit(ctx, args, data, render)


def _delete(ctx: Context, path: str, what: str, if_revision: int | None) -> int:
    """GET the object for its ETag, then DELETE with If-Match: a concurrent change in between
    is a 412, reported as such (RFC 9110 §13.1.1)."""
    if if_revision is not None:
        etag = f'"r{if_revision}"'
    else:
        _, a = ctx.policyd.call("GET", path, what=what)
        etag = a.etag or ""
        if not etag:
            raise ServerError(f"policyd answered GET {path} without an ETag; cannot delete safely")
    ctx.policyd.call("DELETE", path, headers={"If-Match": etag}, what=what)
    ctx.print(f"deleted {what}")
    return EXIT_OK


def policy_delete(args: argparse.Namespace, ctx: Context) -> int:
    return _delete(
        ctx, f"/v1/policies/{_q(args.name)}", f"policy {clean(args.name)}", args.if_revision
    )


def rule_list(args: argparse.Namespace, ctx: Context) -> int:
    items = _rows(ctx.policyd.get_all(f"/v1/policies/{_q(args.policy)}/rules"), "rule")
    return _emit(ctx, args, items, lambda: _rule_rows(items) if items else "no rules")


def rule_get(args: argparse.Namespace, ctx: Context) -> int:
    r = expect_dict(
        ctx.policyd.get(f"/v1/policies/{_q(args.policy)}/rules/{_q(args.name)}"), "GET rule"
    )
    return _emit(ctx, args, r, lambda: _rule_rows([r]))


def rule_delete(args: argparse.Namespace, ctx: Context) -> int:
    return _delete(
        ctx,
        f"/v1/policies/{_q(args.policy)}/rules/{_q(args.name)}",
        f"rule {clean(args.policy)}/{clean(args.name)}",
        args.if_revision,
    )


def _filter_rows(fl: dict[str, Any]) -> str:
    filters = fl.get("filters") or []
    if not isinstance(filters, list):
        filters = []
    return table(
        ["#", "source", "destination", "protocol", "sport", "dport", "mirrored", "description"],
        [
            [
                i,
                f.get("source"),
                f.get("destination"),
                f.get("protocol") if f.get("protocol") is not None else "any",
                f.get("source_port") if f.get("source_port") is not None else "any",
                f.get("destination_port") if f.get("destination_port") is not None else "any",
                f.get("mirrored"),
                f.get("description"),
            ]
            for i, f in enumerate(filters)
            if isinstance(f, dict)
        ],
    )


def _action_rows(items: list[dict[str, Any]]) -> str:
    def methods(a: dict[str, Any]) -> str:
        ms = a.get("security_methods") or []
        out = []
        for m in ms if isinstance(ms, list) else []:
            if isinstance(m, dict):
                alg = "+".join(str(m[k]) for k in ("esp", "ah") if m.get(k))
                out.append(f"{m.get('protocol')}:{alg}/{m.get('lifetime_seconds')}s")
        return " ".join(out)

    def mode(a: dict[str, Any]) -> str:
        if a.get("action") != "negotiate":
            return ""
        flags = [
            n
            for n, on in (
                ("accept-unsecured", a.get("accept_unsecured")),
                ("fallback", a.get("allow_fallback")),
                ("respond-only", a.get("initiate") is False),
                (f"pfs:{a.get('pfs_group')}", a.get("session_key_pfs")),
            )
            if on
        ]
        return ",".join(flags) or "require"

    return table(
        ["name", "action", "security methods", "options", "revision", "description"],
        [
            [
                a.get("name"),
                a.get("action"),
                methods(a),
                mode(a),
                a.get("revision"),
                a.get("description"),
            ]
            for a in items
        ],
    )


def filter_list_list(args: argparse.Namespace, ctx: Context) -> int:
    items = _rows(ctx.policyd.get_all("/v1/filter-lists"), "filter list")

    def render() -> str:
        rows = [
            [f.get("name"), len(f.get("filters") or []), f.get("revision"), f.get("description")]
            for f in items
        ]
        return (
            table(["name", "filters", "revision", "description"], rows)
            if items
            else "no filter lists"
        )

    return _emit(ctx, args, items, render)


def filter_list_get(args: argparse.Namespace, ctx: Context) -> int:
    fl = expect_dict(ctx.policyd.get(f"/v1/filter-lists/{_q(args.name)}"), "GET filter list")

    def render() -> str:
        head = f"filter list {clean(fl.get('name'))} (revision {cell_int(fl.get('revision'))})"
        return f"{head}\n{_filter_rows(fl)}"

    return _emit(ctx, args, fl, render)


def filter_list_delete(args: argparse.Namespace, ctx: Context) -> int:
    return _delete(
        ctx,
        f"/v1/filter-lists/{_q(args.name)}",
        f"filter list {clean(args.name)}",
        args.if_revision,
    )


def filter_action_list(args: argparse.Namespace, ctx: Context) -> int:
    items = _rows(ctx.policyd.get_all("/v1/filter-actions"), "filter action")
    return _emit(ctx, args, items, lambda: _action_rows(items) if items else "no filter actions")


def filter_action_get(args: argparse.Namespace, ctx: Context) -> int:
    fa = expect_dict(ctx.policyd.get(f"/v1/filter-actions/{_q(args.name)}"), "GET filter action")
    return _emit(ctx, args, fa, lambda: _action_rows([fa]))


def filter_action_delete(args: argparse.Namespace, ctx: Context) -> int:
    return _delete(
        ctx,
        f"/v1/filter-actions/{_q(args.name)}",
        f"filter action {clean(args.name)}",
        args.if_revision,
    )


def template_list(args: argparse.Namespace, ctx: Context) -> int:
    got = ctx.policyd.get("/v1/templates")
    if not isinstance(got, list):
        raise ServerError("policyd's answer to GET /v1/templates is not a list")
    items = _rows(got, "template")

    def render() -> str:
        def params(t: dict[str, Any]) -> str:
            schema = t.get("parameters")
            props = schema.get("properties") if isinstance(schema, dict) else None
            req = set(schema.get("required") or []) if isinstance(schema, dict) else set()
            if not isinstance(props, dict):
                return ""
            return ",".join(f"{k}{'*' if k in req else ''}" for k in props)

        return table(
            ["name", "title", "parameters (* required)"],
            [[t.get("name"), t.get("title"), params(t)] for t in items],
        )

    return _emit(ctx, args, items, render)


def template_apply(args: argparse.Namespace, ctx: Context) -> int:
    params: dict[str, Any] = {}
    for p in args.param or []:
        key, sep, value = p.partition("=")
        if not sep or not key:
            raise UsageError(f"--param {clean(p)}: write KEY=VALUE (VALUE may be JSON)")
        try:
            params[key] = json.loads(value)
        except ValueError:
            params[key] = value
    res, _ = ctx.policyd.call(
        "POST", f"/v1/templates/{_q(args.name)}", body=json.dumps(params).encode()
    )
    res = expect_dict(res, "POST template")

    def render() -> str:
        changes = _rows(list(res.get("changes") or []), "change")
        rows = [[c.get("operation"), c.get("kind"), c.get("name")] for c in changes]
        head = table(["operation", "kind", "name"], rows) + "\n" if rows else ""
        return (
            head
            + f"revision {cell_int(res.get('revision'))}"
            + ("" if res.get("changed") else " (no change)")
        )

    return _emit(ctx, args, res, render)


# -- revision, audit, compiled, status ----------------------------------------------------------


def revision(args: argparse.Namespace, ctx: Context) -> int:
    r = expect_dict(ctx.policyd.get("/v1/revision"), "GET /v1/revision")
    return _emit(ctx, args, r, lambda: cell_int(r.get("revision")))


def audit(args: argparse.Namespace, ctx: Context) -> int:
    items: list[Any] = []
    after: str | None = None
    while len(items) < args.limit:
        page = expect_dict(
            ctx.policyd.get(
                "/v1/audit",
                limit=min(500, args.limit - len(items)),
                after=after,
                since_revision=args.since_revision or None,
            ),
            "GET /v1/audit",
        )
        got = page.get("items")
        if not isinstance(got, list):
            raise ServerError("policyd's audit page has no items list")
        items += got
        nxt = page.get("next")
        if not nxt or not got or nxt == after or not isinstance(nxt, str):
            break
        after = nxt
    items = _rows(items[: args.limit], "audit")
    return _emit(
        ctx,
        args,
        items,
        lambda: (
            table(
                ["id", "revision", "at", "actor", "operation", "kind", "name", "via"],
                [
                    [
                        a.get("id"),
                        a.get("revision"),
                        a.get("at"),
                        a.get("actor"),
                        a.get("operation"),
                        a.get("kind"),
                        a.get("name"),
                        a.get("via"),
                    ]
                    for a in items
                ],
            )
            if items
            else "no audit entries"
        ),
    )


def _ports(v: Any) -> str:
    if isinstance(v, list) and len(v) == 2:
        lo, hi = v
        if lo == 0 and hi == 65535:
            return "any"
        return str(lo) if lo == hi else f"{lo}-{hi}"
    return clean(v, 20)


def _proto(v: Any) -> str:
    names = {
        0: "any",
        1: "icmp",
        6: "tcp",
        17: "udp",
        58: "ipv6-icmp",
        132: "sctp",
        50: "esp",
        51: "ah",
    }
    return names.get(v, str(v)) if isinstance(v, int) else clean(v, 20)


def _overlap(o: Any) -> str:
    if not isinstance(o, dict):
        return "?"
    return f"{clean(o.get('source'), 60)} > {clean(o.get('destination'), 60)}"


def render_compiled(c: dict[str, Any]) -> str:
    def lst(key: str) -> list[dict[str, Any]]:
        v = c.get(key) or []
        return [x for x in v if isinstance(x, dict)] if isinstance(v, list) else []

    entries = lst("entries")
    out = [f"node {clean(c.get('node'))}, revision {cell_int(c.get('revision'))}", ""]
    rows = []
    for i, e in enumerate(entries, 1):
        o = e.get("origin") if isinstance(e.get("origin"), dict) else {}
        assert isinstance(o, dict)
        if o.get("policy"):
            origin = f"{o.get('policy')}/{o.get('rule')}[{o.get('filter_index')}]" + (
                " mirror" if o.get("mirrored") else ""
            )
        else:
            origin = "(IKE exemption)"
        action = e.get("action")
        if action == "protect":
            prot = {50: "esp", 51: "ah"}
            ps = e.get("protocols")
            ps = ps if isinstance(ps, list) else []
            action = "protect(" + "+".join(prot.get(p, str(p)) for p in ps) + ")"
            if e.get("accept_clear"):
                action += " accept-clear"
            if e.get("clear_fallback"):
                action += " fallback"
        rows.append(
            [
                i,
                action,
                e.get("source"),
                e.get("destination"),
                _proto(e.get("protocol")),
                f"{_ports(e.get('source_ports'))}>{_ports(e.get('destination_ports'))}",
                e.get("reqid") or "-",
                origin,
            ]
        )
    out.append(
        table(
            ["#", "action", "src", "dst", "proto", "ports (src>dst)", "reqid", "origin rule"], rows
        )
        if rows
        else "SPD: no entries (no policy assigned to this node?)"
    )
    conns = lst("connections")
    if conns:
        crow = []
        for cn in conns:
            cfg = cn.get("config") if isinstance(cn.get("config"), dict) else {}
            assert isinstance(cfg, dict)
            crow.append(
                [
                    cfg.get("name"),
                    f"{cn.get('policy')}/{cn.get('rule')}",
                    cfg.get("mode"),
                    f"{cfg.get('local_addr') or '%any'} - {cfg.get('remote_addr')}",
                    cfg.get("auth"),
                    cfg.get("start_action"),
                    cn.get("reqids"),
                    cfg.get("esp_proposals") or cfg.get("ah_proposals"),
                ]
            )
        out += [
            "",
            "connections:",
            table(
                [
                    "name",
                    "rule",
                    "mode",
                    "local - remote",
                    "auth",
                    "start",
                    "reqids",
                    "child proposals",
                ],
                crow,
            ),
        ]
    conflicts = lst("conflicts")
    if conflicts:

        def ref(r: Any) -> str:
            if not isinstance(r, dict):
                return "?"
            return f"{r.get('policy')}/{r.get('rule')}[{r.get('filter_index')}] {r.get('action')}"

        out += [
            "",
            "conflicts:",
            table(
                ["kind", "winner", "loser", "overlap"],
                [
                    [
                        k.get("kind"),
                        ref(k.get("winner")),
                        ref(k.get("loser")),
                        _overlap(k.get("overlap")),
                    ]
                    for k in conflicts
                ],
            ),
        ]
    unsupported = lst("unsupported")
    if unsupported:
        out += ["", "unsupported:"]
        for u in unsupported:
            out.append(
                f"  {clean(u.get('policy'))}/{clean(u.get('rule'))} {clean(u.get('item'))}: "
                f"{clean(u.get('reason'), 1000)}"
            )
    return "\n".join(out)


def compiled(args: argparse.Namespace, ctx: Context) -> int:
    c = expect_dict(
        ctx.policyd.get("/v1/compiled", node=args.node, addresses=args.address or None),
        "GET /v1/compiled",
    )
    return _emit(ctx, args, c, lambda: render_compiled(c))


def _age(reported_at: Any, now: dt.datetime) -> str:
    if not isinstance(reported_at, str):
        return "?"
    try:
        t = dt.datetime.fromisoformat(reported_at.replace("Z", "+00:00"))
    except ValueError:
        return "?"
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    s = int((now - t).total_seconds())
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    return f"{s // 3600}h"


def status(args: argparse.Namespace, ctx: Context) -> int:
    """policyd's revision, what every component enforces (stale ones marked) and, when
    keymgr's API is configured, an SA summary. Exit status: the worst of the parts."""
    worst = EXIT_OK
    data: dict[str, Any] = {}
    lines: list[str] = []
    try:
        enf = expect_dict(ctx.policyd.get("/v1/enforced"), "GET /v1/enforced")
        rev = enf.get("revision")
        comps = _rows(list(enf.get("enforced") or []), "enforced")
        now = dt.datetime.now(dt.UTC)
        stale = [e for e in comps if e.get("revision") != rev]
        data["policyd"] = {"url": ctx.policyd.url, "revision": rev, "enforced": comps}
        lines.append(f"policyd {ctx.policyd.url}: revision {cell_int(rev)}")
        if comps:
            lines.append(
                table(
                    ["node", "component", "revision", "digest", "age", "state"],
                    [
                        [
                            e.get("node"),
                            e.get("component"),
                            e.get("revision"),
                            str(e.get("digest") or "")[:12],
                            _age(e.get("reported_at"), now),
                            "current" if e.get("revision") == rev else "STALE",
                        ]
                        for e in comps
                    ],
                )
            )
            lines.append(f"{len(comps) - len(stale)} current, {len(stale)} stale")
        else:
            lines.append("no component has reported an enforced revision")
    except CtlError as e:
        worst = max(worst, e.status)
        data["policyd"] = {"url": ctx.policyd.url, "error": str(e)}
        lines.append(f"policyd: {e}")
    if ctx.settings.keymgr_configured or (
        Path(ctx.settings.keymgr_api.removeprefix("unix:")).exists()
        and ctx.settings.keymgr_api.startswith("unix:")
    ):
        try:
            with ctx.keymgr() as km:
                ike, children = km.list()
            data["keymgr"] = {
                "api": ctx.settings.keymgr_api,
                "ike_sas": len(ike),
                "child_sas": len(children),
                "ike_states": {s.state: sum(1 for x in ike if x.state == s.state) for s in ike},
            }
            lines.append(f"keymgr {ctx.settings.keymgr_api}: {sa_api.summary(ike, children)}")
        except CtlError as e:
            worst = max(worst, e.status)
            data["keymgr"] = {"api": ctx.settings.keymgr_api, "error": str(e)}
            lines.append(f"keymgr: {e}")
    fmt = getattr(args, "output", "table")
    ctx.print("\n".join(lines) if fmt == "table" else dump(data, fmt))
    return worst


# -- SAs (keymgr) -------------------------------------------------------------------------------


def sa_list(args: argparse.Namespace, ctx: Context) -> int:
    with ctx.keymgr() as km:
        ike, children = km.list(args.connection or "")
    return _emit(
        ctx, args, sa_api.sa_dicts(ike, children), lambda: sa_api.format_sas(ike, children)
    )


def sa_initiate(args: argparse.Namespace, ctx: Context) -> int:
    with ctx.keymgr() as km:
        r = km.initiate(args.connection, args.child or "")
    name = args.connection + (f"/{args.child}" if args.child else "")
    data = {"started": r.started, "detail": r.detail}
    return _emit(ctx, args, data, lambda: f"{clean(name)}: {clean(r.detail)}")


def sa_terminate(args: argparse.Namespace, ctx: Context) -> int:
    if (args.connection is None) == (args.id is None):
        raise UsageError("sa terminate: give a connection name or --id N (from sa list)")
    if args.child and args.connection is None:
        raise UsageError("sa terminate: --child needs the connection name")
    with ctx.keymgr() as km:
        r = km.terminate(args.connection or "", args.child or "", args.id or 0)
    name = (
        f"#{args.id}"
        if args.id is not None
        else args.connection + (f"/{args.child}" if args.child else "")
    )
    data = {"ike_sas": r.ike_sas, "child_sas": r.child_sas, "detail": r.detail}
    return _emit(ctx, args, data, lambda: f"{clean(name)}: {clean(r.detail)}")


def sa_events(args: argparse.Namespace, ctx: Context) -> int:
    seen = 0
    with ctx.keymgr() as km:
        events = km.events()
        try:
            for e in events:
                if args.output == "table":
                    ctx.print(sa_api.format_event(e))
                else:
                    ctx.print(json.dumps(sa_api.event_dict(e)))
                seen += 1
                if args.count and seen >= args.count:
                    break
        except KeyboardInterrupt:
            pass
        finally:
            events.close()
    return EXIT_OK
