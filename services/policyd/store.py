"""policyd's storage rules: revisions, audit, optimistic concurrency, cross-object checks, apply.

Every write runs in one transaction opened by :class:`Writer`, whose first statement updates
the revision row: that takes the write lock (a row lock in PostgreSQL, the database write
lock in SQLite), so writers are serialised, each sees the latest committed state, and the
revision goes up by exactly one per committed change — or not at all when nothing changed.
The audit rows and the new revision are committed with the change itself.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import select, update
from sqlalchemy.orm import Session, object_session, selectinload

from services.policyd.models import (
    AuditEntry,
    AuthMethod,
    Filter,
    FilterAction,
    FilterList,
    Policy,
    Revision,
    Rule,
    SecurityMethod,
)
from services.policyd.schemas import (
    FilterActionIn,
    FilterListIn,
    PolicyDoc,
    PolicyDocument,
    PolicyIn,
    RuleIn,
    port_range,
    port_value,
    unsecurable_reason,
)

Operation = Literal["create", "update", "delete"]


class PolicyError(Exception):
    """A refused request: HTTP status, a message that says what to do, and the field."""

    log_safe = True

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field


# -- documents of stored objects ----------------------------------------------------------------


def filter_list_doc(fl: FilterList) -> dict[str, Any]:
    return {
        "name": fl.name,
        "description": fl.description,
        "filters": [
            {
                "description": f.description,
                "source": f.source,
                "destination": f.destination,
                "protocol": f.protocol,
                "source_port": port_value(f.source_port_first, f.source_port_last),
                "destination_port": port_value(f.destination_port_first, f.destination_port_last),
                "mirrored": f.mirrored,
            }
            for f in fl.filters
        ],
    }


def filter_action_doc(fa: FilterAction) -> dict[str, Any]:
    return {
        "name": fa.name,
        "description": fa.description,
        "action": fa.action,
        "security_methods": [
            {
                "protocol": m.protocol,
                "esp": m.esp,
                "ah": m.ah,
                "lifetime_seconds": m.lifetime_seconds,
                "lifetime_kilobytes": m.lifetime_kilobytes,
            }
            for m in fa.security_methods
        ],
        "accept_unsecured": fa.accept_unsecured,
        "allow_fallback": fa.allow_fallback,
        "initiate": fa.initiate,
        "session_key_pfs": fa.session_key_pfs,
        "pfs_group": fa.pfs_group,
    }


def policy_doc(p: Policy) -> dict[str, Any]:
    return {
        "name": p.name,
        "description": p.description,
        "main_mode": {
            "proposals": list(p.mm_proposals),
            "lifetime_minutes": p.mm_lifetime_minutes,
            "lifetime_sessions": p.mm_lifetime_sessions,
            "pfs": p.mm_pfs,
        },
        "assigned_to": list(p.assigned_to),
    }


def rule_doc(r: Rule) -> dict[str, Any]:
    return {
        "name": r.name,
        "description": r.description,
        "filter_list": r.filter_list.name,
        "filter_action": r.filter_action.name,
        "auth_methods": [
            {"method": a.method, "ca": a.ca, "psk_ref": a.psk_ref} for a in r.auth_methods
        ],
        "tunnel_endpoint": r.tunnel_endpoint,
        "local_tunnel_endpoint": r.local_tunnel_endpoint,
        "connection_type": r.connection_type,
        "enabled": r.enabled,
    }


def _clear(obj: Any, children: list[Any]) -> None:
    """Drop the old child rows first, so new ones can reuse their (parent, position)."""
    if children:
        children.clear()
        session = object_session(obj)
        if session is not None:
            session.flush()


def _set_filter_list(fl: FilterList, data: FilterListIn) -> None:
    fl.name = data.name
    fl.description = data.description
    _clear(fl, fl.filters)
    for i, f in enumerate(data.filters):
        sp, dp = port_range(f.source_port), port_range(f.destination_port)
        proto = f.protocol if isinstance(f.protocol, int) else None
        fl.filters.append(
            Filter(
                position=i,
                description=f.description,
                source=f.source,
                destination=f.destination,
                protocol=proto,
                source_port_first=sp[0],
                source_port_last=sp[1],
                destination_port_first=dp[0],
                destination_port_last=dp[1],
                mirrored=f.mirrored,
            )
        )


def _set_filter_action(fa: FilterAction, data: FilterActionIn) -> None:
    fa.name = data.name
    fa.description = data.description
    fa.action = data.action
    fa.accept_unsecured = data.accept_unsecured
    fa.allow_fallback = data.allow_fallback
    fa.initiate = data.initiate
    fa.session_key_pfs = data.session_key_pfs
    fa.pfs_group = data.pfs_group
    _clear(fa, fa.security_methods)
    fa.security_methods.extend(
        SecurityMethod(
            position=i,
            protocol=m.protocol,
            esp=m.esp,
            ah=m.ah,
            lifetime_seconds=m.lifetime_seconds,
            lifetime_kilobytes=m.lifetime_kilobytes,
        )
        for i, m in enumerate(data.security_methods)
    )


def _set_policy(p: Policy, data: PolicyIn) -> None:
    p.name = data.name
    p.description = data.description
    p.mm_proposals = list(data.main_mode.proposals)
    p.mm_lifetime_minutes = data.main_mode.lifetime_minutes
    p.mm_lifetime_sessions = data.main_mode.lifetime_sessions
    p.mm_pfs = data.main_mode.pfs
    p.assigned_to = list(data.assigned_to)


def _policy_part(data: PolicyIn) -> PolicyIn:
    return PolicyIn.model_validate(data.model_dump(exclude={"rules"}))


# -- the writer ---------------------------------------------------------------------------------


@dataclass
class Recorded:
    operation: Operation
    kind: str
    name: str


class Writer:
    """One write transaction: takes the write lock, records changes, commits them with the new
    revision and their audit rows (or rolls back when nothing changed)."""

    def __init__(
        self,
        session: Session,
        actor: str,
        via: str,
        on_commit: Callable[[int], None] | None = None,
    ) -> None:
        self.session = session
        self.on_commit = on_commit  # told each committed revision (the watch stream)
        self.actor = actor
        self.via = via[:80]
        session.execute(update(Revision).where(Revision.id == 1).values(value=Revision.value))
        base = session.scalar(select(Revision.value).where(Revision.id == 1))
        if base is None:
            raise PolicyError(503, "the database is not initialised; run the migrations")
        self.base = base
        self.revision = base + 1  # the revision this transaction will commit, if it changes
        self.changes: list[Recorded] = []
        self._audit: list[AuditEntry] = []
        self.defer_checks = False  # apply: check the touched rules once, at the end
        self.pending: list[Rule] = []

    def record(
        self,
        operation: Operation,
        kind: str,
        name: str,
        before: dict[str, Any] | None,
        after: dict[str, Any] | None,
    ) -> None:
        self.changes.append(Recorded(operation, kind, name))
        self._audit.append(
            AuditEntry(
                revision=self.revision,
                at=dt.datetime.now(dt.UTC),
                actor=self.actor,
                operation=operation,
                kind=kind,
                name=name,
                via=self.via,
                detail={"before": before, "after": after},
            )
        )

    def check_if_match(self, if_match: str | None, current: int) -> None:
        """428 without If-Match, 412 when it names another version than ``current``."""
        check_if_match(if_match, current)

    def commit(self) -> int:
        """Commit; the revision now in force (unchanged when nothing was recorded)."""
        if not self.changes:
            self.session.rollback()
            return self.base
        self.session.flush()
        self.session.execute(update(Revision).where(Revision.id == 1).values(value=self.revision))
        self.session.add_all(self._audit)
        self.session.commit()
        if self.on_commit is not None:
            self.on_commit(self.revision)
        return self.revision


def etag(revision: int) -> str:
    return f'"r{revision}"'


def check_if_match(if_match: str | None, current: int) -> None:
    if if_match is None:
        raise PolicyError(
            428,
            "this write needs an If-Match header with the ETag from your last GET "
            "(optimistic concurrency)",
            "If-Match",
        )
    tags = [t.strip() for t in if_match.split(",")]
    if "*" in tags:
        return
    wanted = etag(current)
    if not any(t.removeprefix("W/") == wanted for t in tags):
        raise PolicyError(
            412,
            f"the object changed since you read it (its ETag is now {wanted}); "
            "GET it again and retry",
            "If-Match",
        )


def current_revision(session: Session) -> int:
    return session.scalar(select(Revision.value).where(Revision.id == 1)) or 0


# -- lookups ------------------------------------------------------------------------------------


def _rule_query() -> Any:
    return select(Rule).options(
        selectinload(Rule.auth_methods),
        selectinload(Rule.filter_list),
        selectinload(Rule.filter_action),
    )


def get_filter_list(session: Session, name: str) -> FilterList:
    fl = session.scalar(
        select(FilterList).where(FilterList.name == name).options(selectinload(FilterList.filters))
    )
    if fl is None:
        raise PolicyError(404, f"no filter list named {name}")
    return fl


def get_filter_action(session: Session, name: str) -> FilterAction:
    fa = session.scalar(
        select(FilterAction)
        .where(FilterAction.name == name)
        .options(selectinload(FilterAction.security_methods))
    )
    if fa is None:
        raise PolicyError(404, f"no filter action named {name}")
    return fa


def get_policy(session: Session, name: str) -> Policy:
    p = session.scalar(select(Policy).where(Policy.name == name))
    if p is None:
        raise PolicyError(404, f"no policy named {name}")
    return p


def get_rule(session: Session, policy: str, name: str) -> Rule:
    p = get_policy(session, policy)
    r: Rule | None = session.scalar(_rule_query().where(Rule.policy_id == p.id, Rule.name == name))
    if r is None:
        raise PolicyError(404, f"policy {policy} has no rule named {name}")
    return r


def page(session: Session, model: Any, after: str | None, limit: int, *where: Any) -> list[Any]:
    """Up to ``limit + 1`` objects ordered by name, after the ``after`` cursor."""
    q = select(model).where(*where).order_by(model.name).limit(limit + 1)
    if model is FilterList:
        q = q.options(selectinload(FilterList.filters))
    elif model is FilterAction:
        q = q.options(selectinload(FilterAction.security_methods))
    elif model is Rule:
        q = _rule_query().where(*where).order_by(Rule.name).limit(limit + 1)
    if after is not None:
        q = q.where(model.name > after)
    return list(session.scalars(q))


# -- cross-object checks ------------------------------------------------------------------------


def check_rule(rule: Rule, field: str = "") -> None:
    """Rules that need the rule, its filter list and its action together."""
    pre = f"{field}." if field else ""
    fa, fl = rule.filter_action, rule.filter_list
    where = f"rule {rule.policy.name}/{rule.name}"
    if fa.action == "negotiate":
        if not rule.auth_methods:
            raise PolicyError(
                422,
                f"{where} negotiates security and needs at least one authentication method "
                "(kerberos, certificate or psk) in auth_methods",
                f"{pre}auth_methods",
            )
        for i, f in enumerate(fl.filters):
            for side in ("destination", "source"):
                reason = unsecurable_reason(getattr(f, side))
                if reason:
                    raise PolicyError(
                        422,
                        f"{where}: filter list {fl.name} filters[{i}].{side} {reason} traffic, "
                        "which cannot be secured by IPsec; give it a permit or block action "
                        "in its own rule, or remove it from the filter list",
                        f"{pre}filter_list",
                    )
    elif rule.tunnel_endpoint is not None:
        raise PolicyError(
            422,
            f"{where}: only a negotiate action uses a tunnel ({fa.name} is {fa.action}); "
            "drop tunnel_endpoint or use a negotiate action",
            f"{pre}tunnel_endpoint",
        )


def _rules_using(
    session: Session, *, fl: FilterList | None = None, fa: FilterAction | None = None
) -> list[Rule]:
    q = _rule_query()
    if fl is not None:
        q = q.where(Rule.filter_list_id == fl.id)
    if fa is not None:
        q = q.where(Rule.filter_action_id == fa.id)
    return list(session.scalars(q))


def _check(w: Writer, rules: Iterable[Rule]) -> None:
    if w.defer_checks:  # flushed and checked once, in check_pending
        w.pending.extend(rules)
        return
    w.session.flush()
    for r in rules:
        check_rule(r)


def check_pending(w: Writer) -> None:
    """Check, on the final state, every rule a deferred-check transaction touched and that
    still exists."""
    w.session.flush()
    ids = {r.id for r in w.pending if r.id is not None}
    if not ids:
        return
    alive = set(w.session.scalars(select(Rule.id).where(Rule.id.in_(sorted(ids)))))
    done: set[int] = set()
    for r in w.pending:
        if r.id in alive and r.id not in done:
            done.add(r.id)
            check_rule(r)
    w.pending.clear()


# -- single-object writes -----------------------------------------------------------------------


def create_filter_list(w: Writer, data: FilterListIn) -> FilterList:
    s = w.session
    if s.scalar(select(FilterList.id).where(FilterList.name == data.name)) is not None:
        raise PolicyError(409, f"a filter list named {data.name} exists; PUT to change it", "name")
    fl = FilterList(modified_revision=w.revision)
    _set_filter_list(fl, data)
    s.add(fl)
    s.flush()
    w.record("create", "filter_list", fl.name, None, filter_list_doc(fl))
    return fl


def replace_filter_list(
    w: Writer, name: str, data: FilterListIn, if_match: str | None
) -> FilterList:
    fl = get_filter_list(w.session, name)
    _same_name(name, data.name)
    check_if_match(if_match, fl.modified_revision)
    return _update_filter_list(w, fl, data)


def _update_filter_list(w: Writer, fl: FilterList, data: FilterListIn) -> FilterList:
    before = filter_list_doc(fl)
    if before == data.model_dump(mode="json"):
        return fl
    _set_filter_list(fl, data)
    fl.modified_revision = w.revision
    w.session.flush()
    _check(w, _rules_using(w.session, fl=fl))
    w.record("update", "filter_list", fl.name, before, filter_list_doc(fl))
    return fl


def delete_filter_list(w: Writer, name: str, if_match: str | None) -> None:
    fl = get_filter_list(w.session, name)
    check_if_match(if_match, fl.modified_revision)
    _delete_shared(w, fl, "filter_list", filter_list_doc(fl), _rules_using(w.session, fl=fl))


def create_filter_action(w: Writer, data: FilterActionIn) -> FilterAction:
    s = w.session
    if s.scalar(select(FilterAction.id).where(FilterAction.name == data.name)) is not None:
        raise PolicyError(
            409, f"a filter action named {data.name} exists; PUT to change it", "name"
        )
    fa = FilterAction(modified_revision=w.revision)
    _set_filter_action(fa, data)
    s.add(fa)
    s.flush()
    w.record("create", "filter_action", fa.name, None, filter_action_doc(fa))
    return fa


def replace_filter_action(
    w: Writer, name: str, data: FilterActionIn, if_match: str | None
) -> FilterAction:
    fa = get_filter_action(w.session, name)
    _same_name(name, data.name)
    check_if_match(if_match, fa.modified_revision)
    return _update_filter_action(w, fa, data)


def _update_filter_action(w: Writer, fa: FilterAction, data: FilterActionIn) -> FilterAction:
    before = filter_action_doc(fa)
    if before == data.model_dump(mode="json"):
        return fa
    _set_filter_action(fa, data)
    fa.modified_revision = w.revision
    w.session.flush()
    _check(w, _rules_using(w.session, fa=fa))
    w.record("update", "filter_action", fa.name, before, filter_action_doc(fa))
    return fa


def delete_filter_action(w: Writer, name: str, if_match: str | None) -> None:
    fa = get_filter_action(w.session, name)
    check_if_match(if_match, fa.modified_revision)
    _delete_shared(w, fa, "filter_action", filter_action_doc(fa), _rules_using(w.session, fa=fa))


def _delete_shared(w: Writer, obj: Any, kind: str, doc: dict[str, Any], users: list[Rule]) -> None:
    if users:
        names = ", ".join(f"{r.policy.name}/{r.name}" for r in users[:10])
        raise PolicyError(
            409,
            f"{kind.replace('_', ' ')} {obj.name} is used by rule(s) {names}; "
            "change or delete those rules first",
        )
    w.session.delete(obj)
    w.session.flush()
    w.record("delete", kind, obj.name, doc, None)


def _same_name(path_name: str, body_name: str) -> None:
    if path_name != body_name:
        raise PolicyError(
            422,
            f"name {body_name} differs from the URL's {path_name}: renaming is not supported; "
            "create the new object and delete the old one",
            "name",
        )


def create_policy(w: Writer, data: PolicyIn) -> Policy:
    s = w.session
    if s.scalar(select(Policy.id).where(Policy.name == data.name)) is not None:
        raise PolicyError(409, f"a policy named {data.name} exists; PUT to change it", "name")
    p = Policy(modified_revision=w.revision)
    _set_policy(p, data)
    s.add(p)
    s.flush()
    w.record("create", "policy", p.name, None, policy_doc(p))
    return p


def replace_policy(w: Writer, name: str, data: PolicyIn, if_match: str | None) -> Policy:
    p = get_policy(w.session, name)
    _same_name(name, data.name)
    check_if_match(if_match, p.modified_revision)
    return _update_policy(w, p, data)


def _update_policy(w: Writer, p: Policy, data: PolicyIn) -> Policy:
    before = policy_doc(p)
    if before == data.model_dump(mode="json"):
        return p
    _set_policy(p, data)
    p.modified_revision = w.revision
    w.session.flush()
    w.record("update", "policy", p.name, before, policy_doc(p))
    return p


def delete_policy(w: Writer, name: str, if_match: str | None) -> None:
    p = get_policy(w.session, name)
    check_if_match(if_match, p.modified_revision)
    rules = list(w.session.scalars(_rule_query().where(Rule.policy_id == p.id)))
    for r in rules:
        w.record("delete", "rule", f"{p.name}/{r.name}", rule_doc(r), None)
    w.record("delete", "policy", p.name, policy_doc(p), None)
    w.session.delete(p)
    w.session.flush()


def _resolve(w: Writer, data: RuleIn) -> tuple[FilterList, FilterAction]:
    s = w.session
    fl = s.scalar(select(FilterList).where(FilterList.name == data.filter_list))
    if fl is None:
        raise PolicyError(
            422, f"no filter list named {data.filter_list}; create it first", "filter_list"
        )
    fa = s.scalar(select(FilterAction).where(FilterAction.name == data.filter_action))
    if fa is None:
        raise PolicyError(
            422, f"no filter action named {data.filter_action}; create it first", "filter_action"
        )
    return fl, fa


def _set_rule(w: Writer, r: Rule, data: RuleIn) -> None:
    fl, fa = _resolve(w, data)
    r.name = data.name
    r.description = data.description
    r.filter_list = fl
    r.filter_action = fa
    _clear(r, r.auth_methods)
    r.auth_methods.extend(
        AuthMethod(position=i, method=a.method, ca=a.ca, psk_ref=a.psk_ref)
        for i, a in enumerate(data.auth_methods)
    )
    r.tunnel_endpoint = data.tunnel_endpoint
    r.local_tunnel_endpoint = data.local_tunnel_endpoint
    r.connection_type = data.connection_type
    r.enabled = data.enabled
    r.modified_revision = w.revision


def create_rule(w: Writer, policy: Policy, data: RuleIn) -> Rule:
    s = w.session
    exists = s.scalar(select(Rule.id).where(Rule.policy_id == policy.id, Rule.name == data.name))
    if exists is not None:
        raise PolicyError(
            409, f"policy {policy.name} has a rule named {data.name}; PUT to change it", "name"
        )
    r = Rule()
    _set_rule(w, r, data)
    # by id: assigning r.policy would load every rule of the policy into Policy.rules
    r.policy_id = policy.id
    s.add(r)
    _check(w, [r])
    w.record("create", "rule", f"{policy.name}/{r.name}", None, rule_doc(r))
    return r


def replace_rule(w: Writer, policy: str, name: str, data: RuleIn, if_match: str | None) -> Rule:
    r = get_rule(w.session, policy, name)
    _same_name(name, data.name)
    check_if_match(if_match, r.modified_revision)
    return _update_rule(w, r, data)


def _update_rule(w: Writer, r: Rule, data: RuleIn) -> Rule:
    before = rule_doc(r)
    if before == data.model_dump(mode="json"):
        return r
    _set_rule(w, r, data)
    _check(w, [r])
    w.record("update", "rule", f"{r.policy.name}/{r.name}", before, rule_doc(r))
    return r


def delete_rule(w: Writer, policy: str, name: str, if_match: str | None) -> None:
    r = get_rule(w.session, policy, name)
    check_if_match(if_match, r.modified_revision)
    w.record("delete", "rule", f"{policy}/{r.name}", rule_doc(r), None)
    w.session.delete(r)
    w.session.flush()


# -- whole documents ----------------------------------------------------------------------------


def export_document(session: Session) -> tuple[int, dict[str, Any]]:
    """The revision and the whole policy as one document, read in one transaction (one query
    per table): what a compiler or a backup reads."""
    rev = current_revision(session)
    fls = session.scalars(
        select(FilterList).order_by(FilterList.name).options(selectinload(FilterList.filters))
    )
    fas = session.scalars(
        select(FilterAction)
        .order_by(FilterAction.name)
        .options(selectinload(FilterAction.security_methods))
    )
    policies = session.scalars(
        select(Policy)
        .order_by(Policy.name)
        .options(
            selectinload(Policy.rules).selectinload(Rule.auth_methods),
            selectinload(Policy.rules).selectinload(Rule.filter_list),
            selectinload(Policy.rules).selectinload(Rule.filter_action),
        )
    )
    doc = {
        "filter_lists": [filter_list_doc(f) for f in fls],
        "filter_actions": [filter_action_doc(f) for f in fas],
        "policies": [{**policy_doc(p), "rules": [rule_doc(r) for r in p.rules]} for p in policies],
    }
    return rev, doc


def apply_document(
    w: Writer, doc: PolicyDocument, *, prune: bool = False, create_only: bool = False
) -> None:
    """Make the stored policy match ``doc``: create what is missing, update what differs, leave
    equal objects untouched (so applying the same document twice changes nothing). A policy
    in the document is whole: its rules not in the document are deleted. With ``prune``,
    policies, filter lists and filter actions absent from the document are deleted too. With
    ``create_only`` (templates), an existing object that differs is a conflict (409)."""
    s = w.session
    w.defer_checks = True
    fls = {
        f.name: f for f in s.scalars(select(FilterList).options(selectinload(FilterList.filters)))
    }
    fas = {
        f.name: f
        for f in s.scalars(
            select(FilterAction).options(selectinload(FilterAction.security_methods))
        )
    }

    def conflict(kind: str, name: str) -> PolicyError:
        return PolicyError(
            409,
            f"{kind} {name} exists and differs from the template's; delete or rename it, "
            "or choose another name prefix",
            "name",
        )

    for i, fl_in in enumerate(doc.filter_lists):
        cur = fls.get(fl_in.name)
        if cur is None:
            fls[fl_in.name] = create_filter_list(w, fl_in)
        elif filter_list_doc(cur) != fl_in.model_dump(mode="json"):
            if create_only:
                raise conflict("filter list", fl_in.name)
            _with_field(f"filter_lists[{i}]", lambda c=cur, d=fl_in: _update_filter_list(w, c, d))
    for i, fa_in in enumerate(doc.filter_actions):
        cur_a = fas.get(fa_in.name)
        if cur_a is None:
            fas[fa_in.name] = create_filter_action(w, fa_in)
        elif filter_action_doc(cur_a) != fa_in.model_dump(mode="json"):
            if create_only:
                raise conflict("filter action", fa_in.name)
            _with_field(
                f"filter_actions[{i}]", lambda c=cur_a, d=fa_in: _update_filter_action(w, c, d)
            )
    for i, p_in in enumerate(doc.policies):
        _with_field(f"policies[{i}]", lambda d=p_in: _apply_policy(w, d, create_only))
    if prune:
        keep = {p.name for p in doc.policies}
        for p in list(s.scalars(select(Policy).order_by(Policy.name))):
            if p.name not in keep:
                delete_policy(w, p.name, "*")
        s.flush()
        for name in sorted(set(fls) - {f.name for f in doc.filter_lists}):
            _with_field("filter_lists", lambda n=name: delete_filter_list(w, n, "*"))
        for name in sorted(set(fas) - {f.name for f in doc.filter_actions}):
            _with_field("filter_actions", lambda n=name: delete_filter_action(w, n, "*"))
    w.defer_checks = False
    check_pending(w)


def _with_field(prefix: str, fn: Any) -> None:
    try:
        fn()
    except PolicyError as e:
        e.field = f"{prefix}.{e.field}" if e.field else prefix
        raise


def _apply_policy(w: Writer, data: PolicyDoc, create_only: bool) -> None:
    s = w.session
    part = _policy_part(data)
    p = s.scalar(select(Policy).where(Policy.name == data.name))
    if p is None:
        p = create_policy(w, part)
        existing: dict[str, Rule] = {}
    else:
        existing = {r.name: r for r in s.scalars(_rule_query().where(Rule.policy_id == p.id))}
        same = policy_doc(p) == part.model_dump(mode="json") and {
            n: rule_doc(r) for n, r in existing.items()
        } == {r.name: r.model_dump(mode="json") for r in data.rules}
        if same:
            return
        if create_only:
            raise PolicyError(
                409,
                f"policy {data.name} exists and differs from the template's; delete it or "
                "choose another name prefix",
                "name",
            )
        _update_policy(w, p, part)
    wanted = {r.name for r in data.rules}
    for name, r in existing.items():
        if name not in wanted:
            w.record("delete", "rule", f"{p.name}/{name}", rule_doc(r), None)
            s.delete(r)
    s.flush()
    for j, r_in in enumerate(data.rules):
        cur = existing.get(r_in.name)
        if cur is None:
            _with_field(f"rules[{j}]", lambda d=r_in: create_rule(w, p, d))
        else:
            _with_field(f"rules[{j}]", lambda c=cur, d=r_in: _update_rule(w, c, d))
