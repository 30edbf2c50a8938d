"""policyd's REST API (FastAPI): CRUD for every object, revisions, audit, declarative apply,
templates. See docs/policyd.md for the contract; :func:`create_app` builds the application.

Writes answer only after the transaction committed (SQLite WAL with synchronous=FULL, or
PostgreSQL's commit), so an acknowledged change survives a crash of policyd or the machine.
"""

import datetime as dt
import ipaddress
import json
import logging
from collections.abc import Iterator
from typing import Annotated, Any, TypeVar

import yaml
from fastapi import Body, Depends, FastAPI, Header, Path, Query, Request, Response
from fastapi.exceptions import HTTPException, RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError
from sqlalchemy import Engine, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.core.policy import (
    DEFAULT_CA_DIR,
    DEFAULT_SECRETS_DIR,
    NodeContext,
    compile_policy,
)
from services.policyd import store
from services.policyd.auth import Principal, TokenStore
from services.policyd.db import session_factory
from services.policyd.models import AuditEntry, FilterAction, FilterList, Policy, Rule
from services.policyd.schemas import (
    NAME_PATTERN,
    ApplyResult,
    AuditOut,
    Change,
    CompiledOut,
    DocumentOut,
    EnforcedListOut,
    EnforcedOut,
    ErrorOut,
    FilterActionIn,
    FilterActionOut,
    FilterListIn,
    FilterListOut,
    Page,
    PolicyDocument,
    PolicyIn,
    PolicyOut,
    RevisionOut,
    RuleIn,
    RuleOut,
    TemplateOut,
)
from services.policyd.store import PolicyError, Writer, etag
from services.policyd.templates import TEMPLATES
from services.policyd.watch import WatchHub
from services.runtime.logging import describe_exception

log = logging.getLogger("policyd")

MAX_BODY = 4 << 20
YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml")
# fields whose name says the client tried to send a secret: answer without echoing it
SECRET_FIELDS = {"psk", "secret", "key", "pre_shared_key", "preshared_key", "password", "token"}

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorOut, "description": "unreadable body"},
    401: {"model": ErrorOut, "description": "no or unknown bearer token"},
    403: {"model": ErrorOut, "description": "the token's role may not do this"},
    413: {"model": ErrorOut, "description": "body too large"},
    422: {"model": ErrorOut, "description": "invalid request; errors name the field and fix"},
}
ITEM_ERRORS: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    404: {"model": ErrorOut, "description": "no such object"},
}
WRITE_ERRORS: dict[int | str, dict[str, Any]] = {
    **ITEM_ERRORS,
    409: {"model": ErrorOut, "description": "conflict (exists, or still in use)"},
    412: {"model": ErrorOut, "description": "If-Match does not match the current ETag"},
    428: {"model": ErrorOut, "description": "If-Match is required"},
}

NamePath = Annotated[str, Path(pattern=NAME_PATTERN, description="the object's name")]
IfMatch = Annotated[
    str | None,
    Header(max_length=1024, description='the ETag from your last GET, e.g. "r42" (or *)'),
]
Limit = Annotated[int, Query(ge=1, le=500, description="page size")]
After = Annotated[
    str | None, Query(pattern=NAME_PATTERN, description="the next value of the previous page")
]


def _error(status: int, detail: str, errors: list[dict[str, str]] | None = None) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"detail": detail, "errors": errors or []}, status, headers=headers)


def _field(loc: tuple[Any, ...] | list[Any]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or "body"


def validation_errors(errors: list[Any]) -> list[dict[str, str]]:
    """pydantic errors as {field, message}, never quoting the input (it may hold a secret)."""
    out: list[dict[str, str]] = []
    for e in errors[:50]:
        loc = tuple(e.get("loc", ()))
        field = _field(loc)
        last = str(loc[-1]) if loc else ""
        kind = e.get("type", "")
        if kind == "extra_forbidden" and last.lower() in SECRET_FIELDS:
            msg = (
                "policyd never stores secrets; keep the key in your secret store and "
                "name it with psk_ref (auth method psk)"
            )
        elif kind == "extra_forbidden":
            msg = "unknown field; remove it (see the OpenAPI document for the fields)"
        elif kind == "json_invalid":
            msg = "the body is not valid JSON"
        else:
            msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        out.append({"field": field, "message": msg})
    return out


class BodyLimit:
    """Refuse bodies over ``limit`` bytes (413) and turn YAML bodies into JSON for the API."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v for k, v in scope["headers"]}
        length = headers.get("content-length", b"")
        if length and (not length.isdigit() or int(length) > self.limit):
            await _send_error(send, 413, f"the body is larger than {self.limit} bytes")
            return
        ctype = headers.get("content-type", b"").decode("latin-1").split(";")[0].strip().lower()
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            msg = await receive()
            if msg["type"] != "http.request":
                return
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await _send_error(send, 413, f"the body is larger than {self.limit} bytes")
                return
            chunks.append(chunk)
            more = msg.get("more_body", False)
        body = b"".join(chunks)
        if ctype in YAML_TYPES and body:
            try:
                body = json.dumps(load_yaml(body)).encode()
            except ValueError as e:
                await _send_error(send, 400, str(e))
                return
            raw = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-type"]
            scope = {**scope, "headers": [*raw, (b"content-type", b"application/json")]}
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


async def _send_error(send: Send, status: int, detail: str) -> None:
    payload = json.dumps({"detail": detail, "errors": []}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": payload})


class _AliasRefused(Exception):
    pass


class _NoAliasLoader(yaml.SafeLoader):  # type: ignore[misc]  # PyYAML has no stubs here
    """YAML without anchors/aliases (no 'billion laughs') and only safe types."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise _AliasRefused
        return super().compose_node(parent, index)


def load_yaml(body: bytes) -> Any:
    """A YAML document as plain data; ValueError with a short reason if it is not usable."""
    try:
        data = yaml.load(body, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
        json.dumps(data)  # dates and other non-JSON values are refused here
    except _AliasRefused:
        raise ValueError("YAML anchors and aliases are not accepted; write values out") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ValueError(f"the body is not valid YAML{where}") from None
    except (TypeError, ValueError, RecursionError):
        raise ValueError("the YAML document holds values JSON cannot carry (e.g. dates)") from None
    return data


MAX_NODE_ADDRESSES = 64


def node_addresses(values: list[str]) -> tuple[str, ...]:
    """The ``addresses`` query parameter (repeated, or comma-separated) as canonical IP
    addresses; PolicyError 422 naming the bad one."""
    out: list[str] = []
    for value in values:
        for part in value.split(","):
            text = part.strip()
            if not text:
                continue
            try:
                addr = ipaddress.ip_address(text) if len(text) <= 45 else None
            except ValueError:
                addr = None
            if addr is None:
                raise PolicyError(
                    422,
                    "expected IP addresses of the node, e.g. 192.0.2.1,2001:db8::1",
                    "addresses",
                )
            if str(addr) not in out:
                out.append(str(addr))
    if len(out) > MAX_NODE_ADDRESSES:
        raise PolicyError(422, f"at most {MAX_NODE_ADDRESSES} addresses", "addresses")
    return tuple(out)


def create_app(
    engine: Engine,
    tokens: TokenStore,
    *,
    secrets_dir: str = DEFAULT_SECRETS_DIR,
    ca_dir: str = DEFAULT_CA_DIR,
    hub: WatchHub | None = None,
) -> FastAPI:
    """The policyd application on a migrated database ``engine``. ``secrets_dir`` and
    ``ca_dir`` are where the nodes find PSK files (``<secrets_dir>/<psk_ref>``) and CA
    certificates (``<ca_dir>/<ca>.pem``) in compiled connections. ``hub`` is the watch
    stream's (made here when not given; ``app.state.watch_hub``): told every committed
    revision, and the source of ``GET /v1/enforced``."""
    factory = session_factory(engine)
    if hub is None:
        hub = WatchHub(engine, secrets_dir=secrets_dir, ca_dir=ca_dir)
    watch_hub = hub
    app = FastAPI(
        title="policyd",
        version="1",
        description=(
            "IPsec policy store: policies, rules, filter lists and filter actions (the Windows "
            "IPsec policy model), with revisions, an audit log, ETag/If-Match concurrency and "
            "a declarative apply. Authenticate with a bearer token (roles reader, admin)."
        ),
    )
    app.state.watch_hub = watch_hub
    app.add_middleware(BodyLimit)
    bearer = HTTPBearer(auto_error=False, description="a token from policyd's tokens file")

    @app.exception_handler(PolicyError)
    async def _policy_error(_r: Request, e: PolicyError) -> JSONResponse:
        errors = [{"field": e.field, "message": e.message}] if e.field else []
        return _error(e.status, e.message, errors)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_r: Request, e: RequestValidationError) -> JSONResponse:
        errors = validation_errors(list(e.errors()))
        if errors and all(x["message"] == "the body is not valid JSON" for x in errors):
            return _error(400, "the body is not valid JSON", errors)
        return _error(422, "the request is invalid: " + errors[0]["field"], errors)

    @app.exception_handler(HTTPException)
    async def _http(_r: Request, e: HTTPException) -> JSONResponse:
        return _error(e.status_code, str(e.detail))

    @app.exception_handler(IntegrityError)
    async def _integrity(_r: Request, _e: IntegrityError) -> JSONResponse:
        return _error(409, "the change conflicts with another one; GET and retry")

    @app.exception_handler(SQLAlchemyError)
    async def _busy(_r: Request, e: SQLAlchemyError) -> JSONResponse:
        # unreachable server, lock or pool timeout: the change was not made
        log.warning("database error", extra=describe_exception(e))
        return _error(503, "the database is unavailable; retry later")

    def db() -> Iterator[Session]:
        with factory() as s:
            yield s

    def principal(
        creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> Principal:
        if creds is None:
            raise HTTPException(401, "authentication required: send Authorization: Bearer <token>")
        p = tokens.lookup(creds.credentials)
        if p is None:
            raise HTTPException(401, "unknown token")
        return p

    def admin(p: Annotated[Principal, Depends(principal)]) -> Principal:
        if not p.is_admin:
            raise HTTPException(403, f"{p.name} has role {p.role}; this needs role admin")
        return p

    Db = Annotated[Session, Depends(db)]
    Reader = Annotated[Principal, Depends(principal)]
    Admin = Annotated[Principal, Depends(admin)]

    def writer(s: Session, p: Principal, request: Request) -> Writer:
        return Writer(s, p.name, f"{request.method} {request.url.path}", watch_hub.notify)

    @app.get("/healthz", tags=["meta"])
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    # -- revision, document, apply -------------------------------------------------------

    @app.get("/v1/revision", response_model=RevisionOut, tags=["policy"], responses=ERRORS)
    def get_revision(s: Db, _p: Reader, response: Response) -> RevisionOut:
        rev = store.current_revision(s)
        response.headers["ETag"] = etag(rev)
        return RevisionOut(revision=rev)

    @app.get("/v1/enforced", response_model=EnforcedListOut, tags=["policy"], responses=ERRORS)
    def get_enforced(s: Db, _p: Reader) -> EnforcedListOut:
        """The policy revision each watching component (keymgr, workers) reported it
        enforces, by node and component."""
        rev = store.current_revision(s)
        return EnforcedListOut(
            revision=rev,
            enforced=[
                EnforcedOut(
                    node=e.node,
                    component=e.component,
                    revision=e.revision,
                    digest=e.digest,
                    reported_at=_utc(dt.datetime.fromtimestamp(e.reported_at, dt.UTC)),
                    current=e.revision == rev,
                )
                for e in watch_hub.enforced()
            ],
        )

    @app.get(
        "/v1/document",
        response_model=DocumentOut,
        tags=["policy"],
        responses={**ERRORS, 200: {"content": {"application/yaml": {}}}},
    )
    def get_document(
        s: Db,
        _p: Reader,
        format: Annotated[str, Query(pattern="^(json|yaml)$")] = "json",
    ) -> Any:
        with s.begin():
            rev, doc = store.export_document(s)
        headers = {"ETag": etag(rev)}
        if format == "yaml":
            text = yaml.safe_dump({**doc, "revision": rev}, sort_keys=False)
            return Response(text, media_type="application/yaml", headers=headers)
        return JSONResponse({**doc, "revision": rev}, headers=headers)

    @app.get(
        "/v1/compiled",
        response_model=CompiledOut,
        tags=["policy"],
        responses=ERRORS,
    )
    def get_compiled(
        s: Db,
        _p: Reader,
        node: Annotated[
            str, Query(pattern=NAME_PATTERN, description="the node or worker (assigned_to)")
        ],
        addresses: Annotated[
            list[str] | None,
            Query(description="the node's own addresses (what me means); repeat or use commas"),
        ] = None,
    ) -> Any:
        """The current revision compiled for one node: its ordered SPD, the keymgr
        connections of its negotiate rules, conflicts and unsupported items (no secrets)."""
        ctx = NodeContext(
            node, node_addresses(addresses or []), secrets_dir=secrets_dir, ca_dir=ca_dir
        )
        with s.begin():
            rev, doc = store.export_document(s)
        compiled = compile_policy(doc, rev, ctx)
        return JSONResponse(compiled.to_dict(), headers={"ETag": etag(rev)})

    @app.post(
        "/v1/apply",
        response_model=ApplyResult,
        tags=["policy"],
        responses={**WRITE_ERRORS},
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    t: {"schema": {"$ref": "#/components/schemas/PolicyDocument"}}
                    for t in ("application/json", "application/yaml")
                },
            }
        },
    )
    def apply(
        doc: PolicyDocument,
        s: Db,
        p: Admin,
        request: Request,
        if_match: IfMatch = None,
        prune: Annotated[bool, Query(description="delete objects not in the document")] = False,
        dry_run: Annotated[bool, Query(description="report the changes, change nothing")] = False,
    ) -> ApplyResult:
        """Make the stored policy equal to the document (JSON or YAML). Idempotent: the same
        document twice gives no new revision. If-Match (optional) is the document's ETag."""
        w = writer(s, p, request)
        if if_match is not None:
            store.check_if_match(if_match, w.base)
        store.apply_document(w, doc, prune=prune)
        changes = [Change(operation=c.operation, kind=c.kind, name=c.name) for c in w.changes]
        if dry_run:
            s.rollback()
            return ApplyResult(revision=w.base, changed=bool(changes), changes=changes)
        rev = w.commit()
        return ApplyResult(revision=rev, changed=bool(changes), changes=changes)

    # -- templates ----------------------------------------------------------------------

    @app.get(
        "/v1/templates", response_model=list[TemplateOut], tags=["templates"], responses=ERRORS
    )
    def list_templates(_p: Reader) -> list[TemplateOut]:
        return [
            TemplateOut(
                name=t.name,
                title=t.title,
                description=t.description,
                parameters=t.params.model_json_schema(),
            )
            for t in TEMPLATES.values()
        ]

    @app.post(
        "/v1/templates/{template}",
        response_model=ApplyResult,
        tags=["templates"],
        responses=WRITE_ERRORS,
    )
    def use_template(
        template: Annotated[str, Path(pattern=NAME_PATTERN)],
        s: Db,
        p: Admin,
        request: Request,
        params: Annotated[dict[str, Any], Body(max_length=64)] = {},  # noqa: B006
    ) -> ApplyResult:
        """Create the objects of a built-in template (see GET /v1/templates for parameters)."""
        t = TEMPLATES.get(template)
        if t is None:
            raise PolicyError(404, f"no template named {template}; see GET /v1/templates")
        try:
            doc = t.build(t.params.model_validate(params))
        except ValidationError as e:
            errors = validation_errors(list(e.errors()))
            raise PolicyError(422, errors[0]["message"], errors[0]["field"]) from None
        w = writer(s, p, request)
        store.apply_document(w, doc, create_only=True)
        changes = [Change(operation=c.operation, kind=c.kind, name=c.name) for c in w.changes]
        return ApplyResult(revision=w.commit(), changed=bool(changes), changes=changes)

    # -- audit ---------------------------------------------------------------------------

    @app.get("/v1/audit", response_model=Page[AuditOut], tags=["audit"], responses=ERRORS)
    def audit(
        s: Db,
        _p: Reader,
        limit: Limit = 100,
        after: Annotated[str | None, Query(pattern=r"^[0-9]{1,18}$")] = None,
        since_revision: Annotated[int, Query(ge=0, le=2**62)] = 0,
    ) -> Page[AuditOut]:
        """Audit entries, oldest first; ``since_revision`` keeps those after that revision."""
        q = (
            select(AuditEntry)
            .where(AuditEntry.revision > since_revision)
            .order_by(AuditEntry.id)
            .limit(limit + 1)
        )
        if after is not None:
            q = q.where(AuditEntry.id > int(after))
        rows = list(s.scalars(q))
        items = [
            AuditOut(
                id=a.id,
                revision=a.revision,
                at=_utc(a.at),
                actor=a.actor,
                operation=a.operation,
                kind=a.kind,
                name=a.name,
                via=a.via,
                detail=a.detail,
            )
            for a in rows[:limit]
        ]
        nxt = str(rows[limit - 1].id) if len(rows) > limit else None
        return Page[AuditOut](items=items, next=nxt)

    # -- filter lists ----------------------------------------------------------------------

    def fl_out(fl: FilterList) -> FilterListOut:
        return FilterListOut(**store.filter_list_doc(fl), revision=fl.modified_revision)

    @app.get(
        "/v1/filter-lists",
        response_model=Page[FilterListOut],
        tags=["filter lists"],
        responses=ERRORS,
    )
    def list_filter_lists(s: Db, _p: Reader, limit: Limit = 100, after: After = None) -> Any:
        rows = store.page(s, FilterList, after, limit)
        return _page([fl_out(r) for r in rows], limit)

    @app.post(
        "/v1/filter-lists",
        response_model=FilterListOut,
        status_code=201,
        tags=["filter lists"],
        responses=WRITE_ERRORS,
    )
    def create_filter_list(
        data: FilterListIn, s: Db, p: Admin, request: Request, response: Response
    ) -> FilterListOut:
        w = writer(s, p, request)
        out = fl_out(store.create_filter_list(w, data))
        w.commit()
        return _created(response, f"/v1/filter-lists/{out.name}", out)

    @app.get(
        "/v1/filter-lists/{name}",
        response_model=FilterListOut,
        tags=["filter lists"],
        responses=ITEM_ERRORS,
    )
    def get_filter_list(name: NamePath, s: Db, _p: Reader, response: Response) -> FilterListOut:
        return _tagged(response, fl_out(store.get_filter_list(s, name)))

    @app.put(
        "/v1/filter-lists/{name}",
        response_model=FilterListOut,
        tags=["filter lists"],
        responses=WRITE_ERRORS,
    )
    def put_filter_list(
        name: NamePath,
        data: FilterListIn,
        s: Db,
        p: Admin,
        request: Request,
        response: Response,
        if_match: IfMatch = None,
    ) -> FilterListOut:
        w = writer(s, p, request)
        out = fl_out(store.replace_filter_list(w, name, data, if_match))
        w.commit()
        return _tagged(response, out)

    @app.delete(
        "/v1/filter-lists/{name}", status_code=204, tags=["filter lists"], responses=WRITE_ERRORS
    )
    def delete_filter_list(
        name: NamePath, s: Db, p: Admin, request: Request, if_match: IfMatch = None
    ) -> Response:
        w = writer(s, p, request)
        store.delete_filter_list(w, name, if_match)
        w.commit()
        return Response(status_code=204)

    # -- filter actions --------------------------------------------------------------------

    def fa_out(fa: FilterAction) -> FilterActionOut:
        return FilterActionOut(**store.filter_action_doc(fa), revision=fa.modified_revision)

    @app.get(
        "/v1/filter-actions",
        response_model=Page[FilterActionOut],
        tags=["filter actions"],
        responses=ERRORS,
    )
    def list_filter_actions(s: Db, _p: Reader, limit: Limit = 100, after: After = None) -> Any:
        rows = store.page(s, FilterAction, after, limit)
        return _page([fa_out(r) for r in rows], limit)

    @app.post(
        "/v1/filter-actions",
        response_model=FilterActionOut,
        status_code=201,
        tags=["filter actions"],
        responses=WRITE_ERRORS,
    )
    def create_filter_action(
        data: FilterActionIn, s: Db, p: Admin, request: Request, response: Response
    ) -> FilterActionOut:
        w = writer(s, p, request)
        out = fa_out(store.create_filter_action(w, data))
        w.commit()
        return _created(response, f"/v1/filter-actions/{out.name}", out)

    @app.get(
        "/v1/filter-actions/{name}",
        response_model=FilterActionOut,
        tags=["filter actions"],
        responses=ITEM_ERRORS,
    )
    def get_filter_action(name: NamePath, s: Db, _p: Reader, response: Response) -> FilterActionOut:
        return _tagged(response, fa_out(store.get_filter_action(s, name)))

    @app.put(
        "/v1/filter-actions/{name}",
        response_model=FilterActionOut,
        tags=["filter actions"],
        responses=WRITE_ERRORS,
    )
    def put_filter_action(
        name: NamePath,
        data: FilterActionIn,
        s: Db,
        p: Admin,
        request: Request,
        response: Response,
        if_match: IfMatch = None,
    ) -> FilterActionOut:
        w = writer(s, p, request)
        out = fa_out(store.replace_filter_action(w, name, data, if_match))
        w.commit()
        return _tagged(response, out)

    @app.delete(
        "/v1/filter-actions/{name}",
        status_code=204,
        tags=["filter actions"],
        responses=WRITE_ERRORS,
    )
    def delete_filter_action(
        name: NamePath, s: Db, p: Admin, request: Request, if_match: IfMatch = None
    ) -> Response:
        w = writer(s, p, request)
        store.delete_filter_action(w, name, if_match)
        w.commit()
        return Response(status_code=204)

    # -- policies --------------------------------------------------------------------------

    def p_out(pol: Policy) -> PolicyOut:
        return PolicyOut(**store.policy_doc(pol), revision=pol.modified_revision)

    @app.get("/v1/policies", response_model=Page[PolicyOut], tags=["policies"], responses=ERRORS)
    def list_policies(s: Db, _p: Reader, limit: Limit = 100, after: After = None) -> Any:
        rows = store.page(s, Policy, after, limit)
        return _page([p_out(r) for r in rows], limit)

    @app.post(
        "/v1/policies",
        response_model=PolicyOut,
        status_code=201,
        tags=["policies"],
        responses=WRITE_ERRORS,
    )
    def create_policy(
        data: PolicyIn, s: Db, p: Admin, request: Request, response: Response
    ) -> PolicyOut:
        w = writer(s, p, request)
        out = p_out(store.create_policy(w, data))
        w.commit()
        return _created(response, f"/v1/policies/{out.name}", out)

    @app.get(
        "/v1/policies/{name}", response_model=PolicyOut, tags=["policies"], responses=ITEM_ERRORS
    )
    def get_policy(name: NamePath, s: Db, _p: Reader, response: Response) -> PolicyOut:
        return _tagged(response, p_out(store.get_policy(s, name)))

    @app.put(
        "/v1/policies/{name}", response_model=PolicyOut, tags=["policies"], responses=WRITE_ERRORS
    )
    def put_policy(
        name: NamePath,
        data: PolicyIn,
        s: Db,
        p: Admin,
        request: Request,
        response: Response,
        if_match: IfMatch = None,
    ) -> PolicyOut:
        w = writer(s, p, request)
        out = p_out(store.replace_policy(w, name, data, if_match))
        w.commit()
        return _tagged(response, out)

    @app.delete("/v1/policies/{name}", status_code=204, tags=["policies"], responses=WRITE_ERRORS)
    def delete_policy(
        name: NamePath, s: Db, p: Admin, request: Request, if_match: IfMatch = None
    ) -> Response:
        """Delete a policy and its rules."""
        w = writer(s, p, request)
        store.delete_policy(w, name, if_match)
        w.commit()
        return Response(status_code=204)

    # -- rules ----------------------------------------------------------------------------

    def r_out(r: Rule) -> RuleOut:
        return RuleOut(**store.rule_doc(r), policy=r.policy.name, revision=r.modified_revision)

    @app.get(
        "/v1/policies/{policy}/rules",
        response_model=Page[RuleOut],
        tags=["rules"],
        responses=ITEM_ERRORS,
    )
    def list_rules(
        policy: NamePath, s: Db, _p: Reader, limit: Limit = 100, after: After = None
    ) -> Any:
        pol = store.get_policy(s, policy)
        rows = store.page(s, Rule, after, limit, Rule.policy_id == pol.id)
        return _page([r_out(r) for r in rows], limit)

    @app.post(
        "/v1/policies/{policy}/rules",
        response_model=RuleOut,
        status_code=201,
        tags=["rules"],
        responses=WRITE_ERRORS,
    )
    def create_rule(
        policy: NamePath, data: RuleIn, s: Db, p: Admin, request: Request, response: Response
    ) -> RuleOut:
        w = writer(s, p, request)
        out = r_out(store.create_rule(w, store.get_policy(s, policy), data))
        w.commit()
        return _created(response, f"/v1/policies/{policy}/rules/{out.name}", out)

    @app.get(
        "/v1/policies/{policy}/rules/{name}",
        response_model=RuleOut,
        tags=["rules"],
        responses=ITEM_ERRORS,
    )
    def get_rule(
        policy: NamePath, name: NamePath, s: Db, _p: Reader, response: Response
    ) -> RuleOut:
        return _tagged(response, r_out(store.get_rule(s, policy, name)))

    @app.put(
        "/v1/policies/{policy}/rules/{name}",
        response_model=RuleOut,
        tags=["rules"],
        responses=WRITE_ERRORS,
    )
    def put_rule(
        policy: NamePath,
        name: NamePath,
        data: RuleIn,
        s: Db,
        p: Admin,
        request: Request,
        response: Response,
        if_match: IfMatch = None,
    ) -> RuleOut:
        w = writer(s, p, request)
        out = r_out(store.replace_rule(w, policy, name, data, if_match))
        w.commit()
        return _tagged(response, out)

    @app.delete(
        "/v1/policies/{policy}/rules/{name}",
        status_code=204,
        tags=["rules"],
        responses=WRITE_ERRORS,
    )
    def delete_rule(
        policy: NamePath,
        name: NamePath,
        s: Db,
        p: Admin,
        request: Request,
        if_match: IfMatch = None,
    ) -> Response:
        w = writer(s, p, request)
        store.delete_rule(w, policy, name, if_match)
        w.commit()
        return Response(status_code=204)

    return app


def _utc(at: dt.datetime) -> str:
    """ISO 8601 in UTC with a Z (SQLite hands the stored time back without its zone)."""
    if at.tzinfo is None:
        at = at.replace(tzinfo=dt.UTC)
    return at.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _page(items: list[Any], limit: int) -> dict[str, Any]:
    nxt = items[limit - 1].name if len(items) > limit else None
    return {"items": items[:limit], "next": nxt}


_Out = TypeVar("_Out", FilterListOut, FilterActionOut, PolicyOut, RuleOut)


def _tagged(response: Response, out: _Out) -> _Out:
    response.headers["ETag"] = etag(out.revision)
    return out


def _created(response: Response, location: str, out: _Out) -> _Out:
    response.headers["Location"] = location
    return _tagged(response, out)
