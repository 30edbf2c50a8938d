"""Policy compilation: RFC 4301 §4.4.1 (ordered SPD: BYPASS / DISCARD / PROTECT), §4.4.1.1
(selectors), §5.1 (IKE traffic bypasses the SPD); RFC 7296 §2.9 (Child SA traffic selectors);
the Windows IPsec policy model (filter lists, mirrored filters, request / require security).

:func:`compile_policy` turns policyd's exported document (``store.export_document``, the
structure ``POST /v1/apply`` takes, as plain dicts and lists) and a node's context into a
:class:`CompiledPolicy`: the node's ordered SPD (the dataplane's :class:`SpdEntry`), the
connections keymgr runs for its negotiate rules (:class:`ConnectionSpec`, one-to-one with
``services.keymgr.config.Connection``), the conflicts between overlapping filters and what the
enforcing services cannot do yet. Everything is plain frozen data: two compilations of the same
input are equal, and :meth:`CompiledPolicy.to_dict` is JSON-ready and deterministic.

Ordering (docs/policyd.md, "Compilation"): the built-in IKE exemptions first, then one unit per
filter, mirror and IP version, sorted by the key :func:`specificity_key`:

1. the address space: (source addresses) x (destination addresses), fewest first; ``any`` is
   the whole space of the IP version, ``me`` and an address count 1, a prefix 2^(bits-length),
   a range last-first+1 (for prefixes this is the order of the summed prefix lengths);
2. a protocol set before protocol any;
3. the port space: (source ports) x (destination ports), fewest first;
4. the rule's order (policies and their rules as listed in the document), then the filter's
   position in its filter list, then the filter before its mirror.

A range that is not a prefix becomes the few prefixes that cover it exactly (a Selector holds
prefixes); its pieces stay together at the range's place, and they are disjoint, so the first
matching entry is always the first matching filter by the key above.
"""

from __future__ import annotations

import hashlib
import ipaddress
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from services.core.ike.suites import SuiteError, parse_ah, parse_esp, parse_ike
from services.core.selectors import Prefix, Selector
from services.core.spd import Action, SpdEntry

IKE_PORTS = (500, 4500)
UDP = 17
MAX_CHILDREN = 8  # Child SAs per keymgr connection (services.keymgr.config.MAX_CHILDREN)
MAX_CONNECTION_NAME = 64
REKEY_FRACTION = 0.9  # rekey at 90 % of a Windows (hard) lifetime, as strongSwan's margin
ACTIONS = {"permit": Action.BYPASS, "block": Action.DISCARD, "negotiate": Action.PROTECT}
EXEMPTION_RULE = "ike-exemption"
DEFAULT_SECRETS_DIR = "/run/secrets/ipsec"
DEFAULT_CA_DIR = "/etc/ipsec/ca"
DEFAULT_CERT_FILE = "/etc/ipsec/cert.pem"
DEFAULT_KEY_FILE = "/etc/ipsec/key.pem"
_BITS = {4: 32, 6: 128}
_ANY_PORTS = (0, 0xFFFF)


class CompileError(ValueError):
    """The document is not a policy document (missing or mistyped fields)."""


@dataclass(frozen=True, slots=True)
class NodeContext:
    """Where the policy is enforced: the node's name (matched against a policy's
    ``assigned_to``), its own addresses (what ``me`` means) and where its credentials live.
    A PSK reference ``r`` becomes ``<secrets_dir>/r``; a certificate rule's CA ``n`` becomes
    ``ca_files[n]``, else ``<ca_dir>/<n>.pem`` when ``n`` is a plain file name."""

    name: str
    addresses: tuple[str, ...] = ()
    secrets_dir: str = DEFAULT_SECRETS_DIR
    ca_files: tuple[tuple[str, str], ...] = ()  # (CA name, certificate file)
    ca_dir: str | None = DEFAULT_CA_DIR
    cert_file: str = DEFAULT_CERT_FILE
    key_file: str = DEFAULT_KEY_FILE


@dataclass(frozen=True, slots=True)
class EntryOrigin:
    """Where an SPD entry comes from. ``filter_index`` is -1 for a built-in exemption;
    ``mirrored``: the filter with source and destination (and ports) swapped."""

    policy: str
    rule: str
    filter_index: int
    mirrored: bool = False
    connection: str = ""  # negotiate: the keymgr connection and child that protect it
    child: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "rule": self.rule,
            "filter_index": self.filter_index,
            "mirrored": self.mirrored,
            "connection": self.connection,
            "child": self.child,
        }


@dataclass(frozen=True, slots=True)
class FilterRef:
    policy: str
    rule: str
    filter_index: int
    mirrored: bool
    action: str  # permit, block or negotiate

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "rule": self.rule,
            "filter_index": self.filter_index,
            "mirrored": self.mirrored,
            "action": self.action,
        }


@dataclass(frozen=True, slots=True)
class Conflict:
    """Two overlapping filters that treat traffic differently. ``winner`` comes first in the
    SPD, so the traffic in ``overlap`` gets its action. ``kind``: ``equal`` (same traffic; the
    rule order decides), ``exception`` (the winner lies inside the loser: a narrower rule
    carves out part of a wider one), ``shadowed`` (the loser lies inside the winner: it never
    matches there) or ``partial``."""

    winner: FilterRef
    loser: FilterRef
    overlap: Selector
    kind: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "winner": self.winner.to_dict(),
            "loser": self.loser.to_dict(),
            "overlap": selector_to_dict(self.overlap),
            "kind": self.kind,
        }


@dataclass(frozen=True, slots=True)
class Unsupported:
    """Something in the policy the enforcing services cannot do (yet): reported, never
    silently dropped. ``item`` is the document field; ``reason`` says why and what the
    compiler did instead."""

    policy: str
    rule: str
    item: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"policy": self.policy, "rule": self.rule, "item": self.item, "reason": self.reason}


@dataclass(frozen=True, slots=True)
class ChildSpec:
    """One Child SA: ``services.keymgr.config.ChildConfig`` with the connection's defaults."""

    name: str
    local_ts: str
    remote_ts: str


@dataclass(frozen=True, slots=True)
class ConnectionSpec:
    """A keymgr connection, field for field ``services.keymgr.config.Connection`` (keymgr's
    JSON configuration object: :meth:`config`). ``reqids`` are the reqids of its Child SAs (in
    ``children`` order; :func:`stable_reqids`), which the PROTECT entries carry and
    :meth:`config` hands to keymgr explicitly. ``psk_file`` is a path, never a secret."""

    name: str
    policy: str
    rule: str
    local_addr: str
    remote_addr: str
    mode: str
    start_action: str
    ike_proposals: tuple[str, ...]
    esp_proposals: tuple[str, ...]
    ah_proposals: tuple[str, ...]
    auth: str
    psk_file: str | None
    cert_file: str | None
    key_file: str | None
    ca_files: tuple[str, ...]
    remote_id: str | None
    rekey_time: float
    life_time: float
    rekey_bytes: int
    ike_rekey_time: float
    children: tuple[ChildSpec, ...]
    reqids: tuple[int, ...] = ()

    def config(self) -> dict[str, Any]:
        """The connection as keymgr's JSON configuration object
        (``services.keymgr.config.connection_from_dict``)."""
        first = self.children[0]
        d: dict[str, Any] = {
            "name": self.name,
            "local_addr": self.local_addr,
            "remote_addr": self.remote_addr,
            "local_ts": first.local_ts,
            "remote_ts": first.remote_ts,
            "mode": self.mode,
            "start_action": self.start_action,
            "ike_proposals": list(self.ike_proposals),
            "auth": self.auth,
            "rekey_time": self.rekey_time,
            "life_time": self.life_time,
            "rekey_bytes": self.rekey_bytes,
            "ike_rekey_time": self.ike_rekey_time,
        }
        if self.reqids:
            d["reqid"] = self.reqids[0]
        if self.ah_proposals:
            d["ah_proposals"] = list(self.ah_proposals)
        else:
            d["esp_proposals"] = list(self.esp_proposals)
        if self.auth == "psk":
            d["psk_file"] = self.psk_file
        else:
            d["cert_file"] = self.cert_file
            d["key_file"] = self.key_file
            d["ca_files"] = list(self.ca_files)
        if self.remote_id is not None:
            d["remote_id"] = self.remote_id
        if len(self.children) > 1:
            d["children"] = [
                {"name": c.name, "local_ts": c.local_ts, "remote_ts": c.remote_ts}
                for c in self.children
            ]
            if self.reqids:
                for item, reqid in zip(d["children"], self.reqids, strict=True):
                    item["reqid"] = reqid
        return d

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "rule": self.rule,
            "reqids": list(self.reqids),
            "child_names": [c.name for c in self.children],
            "config": self.config(),
        }


@dataclass(frozen=True, slots=True)
class CompiledPolicy:
    """The compiled policy of one node. ``origins[i]`` says where ``entries[i]`` comes from."""

    revision: int
    node: str
    entries: tuple[SpdEntry, ...]
    origins: tuple[EntryOrigin, ...]
    connections: tuple[ConnectionSpec, ...]
    conflicts: tuple[Conflict, ...]
    unsupported: tuple[Unsupported, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "revision": self.revision,
            "node": self.node,
            "entries": [
                {**entry_to_dict(e), "origin": o.to_dict()}
                for e, o in zip(self.entries, self.origins, strict=True)
            ],
            "connections": [c.to_dict() for c in self.connections],
            "conflicts": [c.to_dict() for c in self.conflicts],
            "unsupported": [u.to_dict() for u in self.unsupported],
        }


def selector_to_dict(s: Selector) -> dict[str, Any]:
    return {
        "source": str(s.src),
        "destination": str(s.dst),
        "protocol": s.proto,
        "source_ports": [s.sport_lo, s.sport_hi],
        "destination_ports": [s.dport_lo, s.dport_hi],
    }


def entry_to_dict(e: SpdEntry) -> dict[str, Any]:
    return {
        "policy_id": e.policy_id,
        "priority": e.priority,
        "action": e.action.name.lower(),
        **selector_to_dict(e.selector),
        "reqid": e.reqid,
        "protocols": list(e.protocols),
        "accept_clear": e.accept_clear,
        "clear_fallback": e.clear_fallback,
    }


# -- addresses ----------------------------------------------------------------------------------

IpAddr = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class _Side:
    """One side of a filter in one IP version: the prefixes it covers and its size."""

    prefixes: tuple[Prefix, ...]
    size: int
    text: str


def _host(addr: IpAddr) -> Prefix:
    return Prefix(addr.version, int(addr), _BITS[addr.version])


def _side(text: str, version: int, me: Sequence[IpAddr]) -> _Side | None:
    """The filter address ``text`` in IP version ``version``; None if it has none there."""
    if text == "any":
        return _Side((Prefix(version, 0, 0),), 1 << _BITS[version], text)
    if text == "me":
        hosts = tuple(_host(a) for a in me if a.version == version)
        return _Side(hosts, 1, text) if hosts else None
    try:
        if "/" in text:
            net = ipaddress.ip_network(text, strict=True)
            if net.version != version:
                return None
            return _Side(
                (Prefix(version, int(net.network_address), net.prefixlen),), net.num_addresses, text
            )
        if "-" in text:
            a_text, b_text = text.split("-", 1)
            a, b = ipaddress.ip_address(a_text), ipaddress.ip_address(b_text)
            if a.version != b.version or int(a) > int(b):
                raise CompileError(f"filter address {text!r}: not a range")
            if a.version != version:
                return None
            nets = ipaddress.summarize_address_range(a, b)
            pieces = tuple(
                Prefix(version, int(n.network_address), n.prefixlen)
                for n in nets  # the exact cover of the range, in address order
            )
            return _Side(pieces, int(b) - int(a) + 1, text)
        addr = ipaddress.ip_address(text)
    except ValueError as e:
        if isinstance(e, CompileError):
            raise
        raise CompileError(
            f"filter address {text[:64]!r}: not any, me, an address, a prefix or a range"
        ) from None
    return _Side((_host(addr),), 1, text) if addr.version == version else None


def _ports(value: object, what: str) -> tuple[int, int]:
    if value is None:
        return _ANY_PORTS
    if isinstance(value, bool):
        raise CompileError(f"{what}: not a port")
    if isinstance(value, int):
        lo = hi = value
    elif isinstance(value, str) and "-" in value:
        a, b = value.split("-", 1)
        if not (a.isdigit() and b.isdigit()):
            raise CompileError(f"{what}: not a port range")
        lo, hi = int(a), int(b)
    elif isinstance(value, str) and value.isdigit():
        lo = hi = int(value)
    else:
        raise CompileError(f"{what}: not a port")
    if not 0 <= lo <= hi <= 0xFFFF:
        raise CompileError(f"{what}: not a port range")
    return lo, hi


def prefixes_overlap(a: Prefix, b: Prefix) -> bool:
    if a.version != b.version:
        return False
    n = min(a.length, b.length)
    shift = _BITS[a.version] - n
    return (a.value >> shift) == (b.value >> shift)


def prefix_within(inner: Prefix, outer: Prefix) -> bool:
    return prefixes_overlap(inner, outer) and inner.length >= outer.length


def selector_overlap(a: Selector, b: Selector) -> Selector | None:
    """The traffic both selectors match, or None."""
    if not (prefixes_overlap(a.src, b.src) and prefixes_overlap(a.dst, b.dst)):
        return None
    if a.proto and b.proto and a.proto != b.proto:
        return None
    slo, shi = max(a.sport_lo, b.sport_lo), min(a.sport_hi, b.sport_hi)
    dlo, dhi = max(a.dport_lo, b.dport_lo), min(a.dport_hi, b.dport_hi)
    if slo > shi or dlo > dhi:
        return None
    src = a.src if a.src.length >= b.src.length else b.src
    dst = a.dst if a.dst.length >= b.dst.length else b.dst
    return Selector(src, dst, a.proto or b.proto, slo, shi, dlo, dhi)


def selector_within(inner: Selector, outer: Selector) -> bool:
    return (
        prefix_within(inner.src, outer.src)
        and prefix_within(inner.dst, outer.dst)
        and (outer.proto == 0 or inner.proto == outer.proto)
        and outer.sport_lo <= inner.sport_lo <= inner.sport_hi <= outer.sport_hi
        and outer.dport_lo <= inner.dport_lo <= inner.dport_hi <= outer.dport_hi
    )


# -- the document -------------------------------------------------------------------------------


def _get(obj: object, key: str, kind: type | tuple[type, ...], what: str) -> Any:
    if not isinstance(obj, Mapping) or key not in obj:
        raise CompileError(f"{what}: missing field {key}")
    value = obj[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, (int,))):
        raise CompileError(f"{what}.{key}: wrong type {type(value).__name__}")
    return value


def _opt(obj: Mapping[str, Any], key: str, default: Any) -> Any:
    value = obj.get(key, default)
    return default if value is None else value


@dataclass(frozen=True, slots=True)
class _Rule:
    order: int
    policy: Mapping[str, Any]
    rule: Mapping[str, Any]
    filters: Sequence[Mapping[str, Any]]
    action: Mapping[str, Any]

    @property
    def pname(self) -> str:
        return str(self.policy["name"])

    @property
    def rname(self) -> str:
        return str(self.rule["name"])


@dataclass(frozen=True, slots=True)
class _Unit:
    """One filter (or its mirror) in one IP version: the entries it becomes, sorted together."""

    key: tuple[int, ...]
    rule: _Rule
    index: int
    mirrored: bool
    treatment: tuple[str, ...]
    src: _Side
    dst: _Side
    selectors: tuple[Selector, ...]
    local_is_src: bool  # negotiate: the source side is this node's (keymgr's local_ts)

    @property
    def ref(self) -> FilterRef:
        return FilterRef(
            self.rule.pname, self.rule.rname, self.index, self.mirrored, self.treatment[0]
        )


def specificity_key(
    src_size: int,
    dst_size: int,
    proto: int,
    sports: tuple[int, int],
    dports: tuple[int, int],
    order: int,
    index: int,
    mirrored: bool,
) -> tuple[int, ...]:
    """The sort key of a filter unit (smaller first); see the module docstring."""
    ports = (sports[1] - sports[0] + 1) * (dports[1] - dports[0] + 1)
    return (src_size * dst_size, 0 if proto else 1, ports, order, index, int(mirrored))


def _rules(doc: Mapping[str, Any], node: str) -> tuple[list[_Rule], list[Unsupported]]:
    lists = {
        _get(fl, "name", str, "filter_lists[]"): fl
        for fl in _get(doc, "filter_lists", list, "document")
    }
    actions = {
        _get(fa, "name", str, "filter_actions[]"): fa
        for fa in _get(doc, "filter_actions", list, "document")
    }
    out: list[_Rule] = []
    skipped: list[Unsupported] = []
    for pi, p in enumerate(_get(doc, "policies", list, "document")):
        pname = _get(p, "name", str, f"policies[{pi}]")
        if node not in _get(p, "assigned_to", list, f"policies[{pi}]"):
            continue
        for ri, r in enumerate(_get(p, "rules", list, f"policies[{pi}]")):
            w = f"policies[{pi}].rules[{ri}]"
            rname = _get(r, "name", str, w)
            if not _opt(r, "enabled", True):
                continue
            fl = lists.get(_get(r, "filter_list", str, w))
            fa = actions.get(_get(r, "filter_action", str, w))
            if fl is None or fa is None:
                what = "filter_list" if fl is None else "filter_action"
                skipped.append(
                    Unsupported(pname, rname, what, "names no such object; rule skipped")
                )
                continue
            filters = _get(fl, "filters", list, f"filter list {fl['name']}")
            if _get(fa, "action", str, f"filter action {fa['name']}") not in ACTIONS:
                raise CompileError(f"filter action {fa['name']}: unknown action")
            out.append(_Rule(len(out), p, r, filters, fa))
    return out, skipped


def _units(rules: Sequence[_Rule], me: Sequence[IpAddr], notes: list[Unsupported]) -> list[_Unit]:
    units: list[_Unit] = []
    for r in rules:
        act = str(r.action["action"])
        treatment = (act, r.pname, r.rname) if act == "negotiate" else (act,)
        tunnel = r.rule.get("tunnel_endpoint") is not None
        for i, f in enumerate(r.filters):
            w = f"filter list {r.rule['filter_list']} filters[{i}]"
            src_t = str(_get(f, "source", str, w))
            dst_t = str(_get(f, "destination", str, w))
            proto = _opt(f, "protocol", 0)
            if isinstance(proto, bool) or not isinstance(proto, int) or not 0 <= proto <= 255:
                raise CompileError(f"{w}.protocol: not 0-255")
            if "protocol" in f and f["protocol"] == 0:
                notes.append(
                    Unsupported(
                        r.pname,
                        r.rname,
                        f"{w}.protocol",
                        "protocol 0 (HOPOPT) cannot be told from any in a selector; "
                        "compiled as any protocol",
                    )
                )
            sports = _ports(f.get("source_port"), f"{w}.source_port")
            dports = _ports(f.get("destination_port"), f"{w}.destination_port")
            local_src = tunnel or src_t == "me" or _covers_me(src_t, me)
            if (
                act == "negotiate"
                and not tunnel
                and not local_src
                and not (dst_t == "me" or _covers_me(dst_t, me))
            ):
                notes.append(
                    Unsupported(
                        r.pname,
                        r.rname,
                        w,
                        "transport mode, but neither side is this node: no connection "
                        "(traffic matching it is PROTECT without SAs)",
                    )
                )
            directions = [(False, src_t, dst_t, sports, dports, local_src)]
            mirror = (True, dst_t, src_t, dports, sports, not local_src)
            if _opt(f, "mirrored", True) and (dst_t, src_t, dports, sports) != (
                src_t,
                dst_t,
                sports,
                dports,
            ):
                directions.append(mirror)
            resolved_any = False
            for mirrored, s_t, d_t, sp, dp, loc in directions:
                for v in (4, 6):
                    s, d = _side(s_t, v, me), _side(d_t, v, me)
                    if s is None or d is None:
                        continue
                    resolved_any = True
                    sels = tuple(
                        Selector(a, b, proto, sp[0], sp[1], dp[0], dp[1])
                        for a, b in itertools.product(s.prefixes, d.prefixes)
                    )
                    key = specificity_key(s.size, d.size, proto, sp, dp, r.order, i, mirrored)
                    units.append(_Unit(key, r, i, mirrored, treatment, s, d, sels, loc))
            if not resolved_any:
                why = (
                    "me has no address of the filter's IP version on this node"
                    if "me" in (src_t, dst_t)
                    else "its protocol and addresses are of different IP versions"
                )
                notes.append(Unsupported(r.pname, r.rname, w, f"matches nothing: {why}"))
    units.sort(key=lambda u: u.key)
    return units


def _covers_me(text: str, me: Sequence[IpAddr]) -> bool:
    if text in ("any", "me"):
        return False
    for a in me:
        side = _side(text, a.version, ())
        if side is not None and any(p.contains(a.packed) for p in side.prefixes):
            return True
    return False


# -- conflicts ----------------------------------------------------------------------------------


def _conflicts(units: Sequence[_Unit]) -> list[Conflict]:
    out: list[Conflict] = []
    # one report per pair of filters (the first overlap found, in SPD order)
    seen: set[tuple[tuple[str, str, int], tuple[str, str, int]]] = set()
    for i, a in enumerate(units):
        for b in units[i + 1 :]:
            if a.treatment == b.treatment or a.src.prefixes[0].version != b.src.prefixes[0].version:
                continue
            pair = (
                (a.rule.pname, a.rule.rname, a.index),
                (b.rule.pname, b.rule.rname, b.index),
            )
            if pair in seen:
                continue
            overlap = None
            for sa in a.selectors:
                for sb in b.selectors:
                    overlap = selector_overlap(sa, sb)
                    if overlap is not None:
                        break
                if overlap is not None:
                    break
            if overlap is None:
                continue
            seen.add(pair)
            a_in_b = all(any(selector_within(x, y) for y in b.selectors) for x in a.selectors)
            b_in_a = all(any(selector_within(y, x) for x in a.selectors) for y in b.selectors)
            kind = (
                "equal"
                if a_in_b and b_in_a
                else "exception"
                if a_in_b
                else "shadowed"
                if b_in_a
                else "partial"
            )
            out.append(Conflict(a.ref, b.ref, overlap, kind))
    return out


# -- connections --------------------------------------------------------------------------------


def _short_name(name: str) -> str:
    if len(name) <= MAX_CONNECTION_NAME:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[: MAX_CONNECTION_NAME - 9]}~{digest}"


def _proposals(
    r: _Rule, notes: list[Unsupported]
) -> tuple[str, tuple[str, ...], tuple[str, ...], int, int] | None:
    """(child protocol, ESP proposals, AH proposals, lifetime seconds, lifetime kilobytes)."""
    fa = r.action
    methods = _get(fa, "security_methods", list, f"filter action {fa['name']}")
    if not methods:
        notes.append(Unsupported(r.pname, r.rname, "security_methods", "none; no connection"))
        return None
    first = methods[0]
    proto = _get(first, "protocol", str, "security_methods[0]")
    if proto == "esp+ah":
        notes.append(
            Unsupported(
                r.pname,
                r.rname,
                f"filter action {fa['name']} security_methods[0]",
                "ESP+AH bundles are not supported by keymgr; no connection",
            )
        )
        return None
    pfs = f"-{fa.get('pfs_group') or 'x25519'}" if fa.get("session_key_pfs") else ""
    out: list[str] = []
    life = (int(_opt(first, "lifetime_seconds", 3600)), int(_opt(first, "lifetime_kilobytes", 0)))
    for i, m in enumerate(methods):
        w = f"filter action {fa['name']} security_methods[{i}]"
        if m.get("protocol") != proto:
            notes.append(
                Unsupported(
                    r.pname,
                    r.rname,
                    w,
                    f"a keymgr Child SA is ESP or AH: only the {proto} methods (as the first) "
                    "are offered",
                )
            )
            continue
        text = (
            str(m.get("esp") or "aes256gcm16") if proto == "esp" else str(m.get("ah") or "sha256")
        )
        text += pfs
        try:
            (parse_esp if proto == "esp" else parse_ah)(text)
        except SuiteError as e:
            notes.append(Unsupported(r.pname, r.rname, w, f"keymgr cannot negotiate it: {e}"))
            continue
        this = (int(_opt(m, "lifetime_seconds", 3600)), int(_opt(m, "lifetime_kilobytes", 0)))
        if this != life:
            notes.append(
                Unsupported(
                    r.pname,
                    r.rname,
                    w,
                    "keymgr has one lifetime per Child SA: the first method's lifetime is used",
                )
            )
        if text not in out:
            out.append(text)
    if not out:
        return None
    t = tuple(out)
    return proto, (t if proto == "esp" else ()), (t if proto == "ah" else ()), life[0], life[1]


def _auth(
    r: _Rule, ctx: NodeContext, notes: list[Unsupported]
) -> tuple[str, str | None, tuple[str, ...]] | None:
    """(keymgr auth, psk_file, ca_files) from the first authentication method keymgr supports."""
    chosen: tuple[str, str | None, tuple[str, ...]] | None = None
    for i, m in enumerate(_opt(r.rule, "auth_methods", [])):
        w = f"auth_methods[{i}]"
        method = m.get("method") if isinstance(m, Mapping) else None
        if chosen is not None:
            notes.append(
                Unsupported(
                    r.pname,
                    r.rname,
                    w,
                    "keymgr authenticates with one method: the first usable one is used",
                )
            )
            continue
        if method == "psk":
            ref = str(m.get("psk_ref") or "")
            parts = PurePosixPath(ref).parts
            if not ref or ref.startswith("/") or any(p in (".", "..") for p in parts):
                notes.append(Unsupported(r.pname, r.rname, w, "psk_ref is not a secret name"))
                continue
            chosen = ("psk", str(PurePosixPath(ctx.secrets_dir, *parts)), ())
        elif method == "certificate":
            ca = str(m.get("ca") or "")
            files = dict(ctx.ca_files)
            path = files.get(ca)
            safe = bool(ca) and ca.isprintable() and "/" not in ca and ca not in (".", "..")
            if path is None and ctx.ca_dir is not None and safe and len(ca) <= 200:
                path = str(PurePosixPath(ctx.ca_dir, f"{ca}.pem"))
            if path is None:
                notes.append(
                    Unsupported(r.pname, r.rname, w, "no certificate file is known for this CA")
                )
                continue
            chosen = ("pubkey", None, (path,))
        else:
            notes.append(
                Unsupported(
                    r.pname,
                    r.rname,
                    w,
                    f"keymgr cannot authenticate with {method}; method skipped",
                )
            )
    if chosen is None:
        notes.append(
            Unsupported(
                r.pname,
                r.rname,
                "auth_methods",
                "no authentication method keymgr supports; no connection",
            )
        )
    return chosen


def _connections(
    rules: Sequence[_Rule],
    units: Sequence[_Unit],
    ctx: NodeContext,
    me: Sequence[IpAddr],
    notes: list[Unsupported],
) -> tuple[list[ConnectionSpec], dict[tuple[int, Prefix, Prefix], tuple[str, str, int]]]:
    """keymgr connections of the negotiate rules, and the (connection, child, reqid) of each
    (rule order, local prefix, remote prefix)."""
    specs: list[ConnectionSpec] = []
    pairs_of: dict[int, list[tuple[Prefix, Prefix]]] = {}
    for u in units:  # children in the order their traffic is matched
        if u.treatment[0] != "negotiate":
            continue
        lst = pairs_of.setdefault(u.rule.order, [])
        for s in u.selectors:
            pair = (s.src, s.dst) if u.local_is_src else (s.dst, s.src)
            if pair not in lst:
                lst.append(pair)
    child_of: dict[tuple[int, Prefix, Prefix], tuple[int, str]] = {}
    for r in rules:
        if r.order not in pairs_of:
            continue
        base = f"{r.pname}.{r.rname}"
        ct = _opt(r.rule, "connection_type", "all")
        if ct != "all":
            notes.append(
                Unsupported(
                    r.pname,
                    r.rname,
                    "connection_type",
                    f"{ct}: interface types are not told apart; the rule applies to all",
                )
            )
        mm = _get(r.policy, "main_mode", Mapping, f"policy {r.pname}")
        ike = tuple(str(p) for p in _opt(mm, "proposals", []))
        bad_ike = []
        for p in ike:
            try:
                parse_ike(p)
            except SuiteError as e:
                bad_ike.append(p)
                notes.append(Unsupported(r.pname, r.rname, "main_mode.proposals", f"{p}: {e}"))
        ike = tuple(p for p in ike if p not in bad_ike)
        if _opt(mm, "lifetime_sessions", 0):
            notes.append(
                Unsupported(
                    r.pname,
                    r.rname,
                    "main_mode.lifetime_sessions",
                    "keymgr does not limit Child SAs per IKE SA; ignored",
                )
            )
        if _opt(mm, "pfs", False):
            notes.append(
                Unsupported(
                    r.pname,
                    r.rname,
                    "main_mode.pfs",
                    "keymgr does not run a new IKE SA per Child SA; ignored",
                )
            )
        props = _proposals(r, notes)
        auth = _auth(r, ctx, notes)
        if props is None or auth is None or not ike:
            continue
        _proto, esp, ah, life_s, life_kb = props
        tunnel = r.rule.get("tunnel_endpoint")
        # (local_addr, remote_addr) -> children (local prefix, remote prefix)
        groups: dict[tuple[str, str], list[tuple[Prefix, Prefix]]] = {}
        if tunnel is not None:
            remote = ipaddress.ip_address(str(tunnel))
            local_t = r.rule.get("local_tunnel_endpoint")
            local = (
                str(ipaddress.ip_address(str(local_t)))
                if local_t is not None
                else next((str(a) for a in me if a.version == remote.version), None)
            )
            if local is None:
                notes.append(
                    Unsupported(
                        r.pname,
                        r.rname,
                        "local_tunnel_endpoint",
                        "not set and the node has no address of the tunnel's IP version; "
                        "no connection",
                    )
                )
                continue
            groups[(local, str(remote))] = list(pairs_of[r.order])
        else:
            wide: set[str] = set()
            narrow: set[str] = set()
            for lp, rp in pairs_of[r.order]:
                mine = lp.length == _BITS[lp.version] and any(_host(a) == lp for a in me)
                if not mine:
                    if any(lp.contains(a.packed) for a in me):
                        narrow.add(str(lp))
                    continue  # else not this node's traffic in transport mode
                if rp.length != _BITS[rp.version]:
                    wide.add(str(rp))
                    continue
                la = str(
                    ipaddress.ip_address(lp.value)
                    if lp.version == 4
                    else ipaddress.IPv6Address(lp.value)
                )
                ra = str(
                    ipaddress.ip_address(rp.value)
                    if rp.version == 4
                    else ipaddress.IPv6Address(rp.value)
                )
                groups.setdefault((la, ra), []).append((lp, rp))
            for text in sorted(narrow):
                notes.append(
                    Unsupported(
                        r.pname,
                        r.rname,
                        "filter_list",
                        f"transport mode from {text}: a transport SA is host to host; only "
                        "filters whose local side is this node's address (or me) get one",
                    )
                )
            for text in sorted(wide):
                notes.append(
                    Unsupported(
                        r.pname,
                        r.rname,
                        "filter_list",
                        f"transport mode to {text}: keymgr needs one peer address per "
                        "connection (no opportunistic IPsec); that traffic is PROTECT without SAs",
                    )
                )
        n = 0
        for (la, ra), children in groups.items():
            for k in range(0, len(children), MAX_CHILDREN):
                chunk = children[k : k + MAX_CHILDREN]
                n += 1
                name = _short_name(base if n == 1 else f"{base}#{n}")
                kids = tuple(
                    ChildSpec(name if j == 0 else _short_name(f"{name}.{j}"), str(lp), str(rp))
                    for j, (lp, rp) in enumerate(chunk)
                )
                for kid, (lp, rp) in zip(kids, chunk, strict=True):
                    child_of[(r.order, lp, rp)] = (len(specs), kid.name)
                initiate = bool(_opt(r.action, "initiate", True))
                specs.append(
                    ConnectionSpec(
                        name=name,
                        policy=r.pname,
                        rule=r.rname,
                        local_addr=la,
                        remote_addr=ra,
                        mode="tunnel" if tunnel is not None else "transport",
                        start_action="trap" if initiate else "none",
                        ike_proposals=ike,
                        esp_proposals=esp,
                        ah_proposals=ah,
                        auth=auth[0],
                        psk_file=auth[1],
                        cert_file=ctx.cert_file if auth[0] == "pubkey" else None,
                        key_file=ctx.key_file if auth[0] == "pubkey" else None,
                        ca_files=auth[2],
                        remote_id="%any" if auth[0] == "pubkey" else None,
                        rekey_time=float(round(life_s * REKEY_FRACTION)),
                        life_time=float(life_s),
                        rekey_bytes=life_kb * 1024 * 9 // 10,
                        ike_rekey_time=float(int(_opt(mm, "lifetime_minutes", 480)) * 60),
                        children=kids,
                    )
                )
    ids = stable_reqids([(spec.name, [c.name for c in spec.children]) for spec in specs])
    final = [ConnectionSpec(**{**_fields(spec), "reqids": ids[spec.name]}) for spec in specs]
    where: dict[tuple[int, Prefix, Prefix], tuple[str, str, int]] = {}
    for key, (ci, child) in child_of.items():
        spec = final[ci]
        j = [c.name for c in spec.children].index(child)
        where[key] = (spec.name, child, spec.reqids[j])
    return final, where


REQID_BASE = 1 << 20  # compiled reqids: [REQID_BASE, REQID_LIMIT); keymgr's positional ones
REQID_LIMIT = 1 << 30  # (one per configured Child SA, at most 1024 * 8) stay below REQID_BASE


def stable_reqids(conns: Sequence[tuple[str, Sequence[str]]]) -> dict[str, tuple[int, ...]]:
    """The reqid of every (connection, child): a function of the two names alone, so adding or
    removing a rule leaves the other connections' reqids (and with them their SAs and the
    worker's PROTECT entries) alone. reqid = REQID_BASE + sha256("<connection>\\n<child>") mod
    (REQID_LIMIT - REQID_BASE); on a collision (about n^2 / 2^31 for n Child SAs) the later
    pair in (connection name, child name) order takes the next free value (wrapping within
    the range), so only colliding pairs depend on each other. Names are printable: the
    newline cannot make two pairs hash the same text."""
    span = REQID_LIMIT - REQID_BASE
    taken: set[int] = set()
    got: dict[tuple[str, str], int] = {}
    for conn, child in sorted((c, k) for c, kids in conns for k in kids):
        h = int.from_bytes(hashlib.sha256(f"{conn}\n{child}".encode()).digest()[:8], "big")
        value = h % span
        while REQID_BASE + value in taken:
            value = (value + 1) % span
        taken.add(REQID_BASE + value)
        got[(conn, child)] = REQID_BASE + value
    return {c: tuple(got[(c, k)] for k in kids) for c, kids in conns}


def _fields(s: ConnectionSpec) -> dict[str, Any]:
    return {name: getattr(s, name) for name in ConnectionSpec.__dataclass_fields__}


# -- entries ------------------------------------------------------------------------------------


def _exemptions(
    me: Sequence[IpAddr], specs: Sequence[ConnectionSpec]
) -> list[tuple[Selector, EntryOrigin]]:
    """UDP 500 and 4500 to and from this node (its addresses and the local ends of its
    connections), either port direction (RFC 4301 §5.1: IKE is never caught by the policy it
    sets up). A node without addresses exempts UDP 500 and 4500 of every address."""
    out: list[tuple[Selector, EntryOrigin]] = []
    hosts = list(me)
    for spec in specs:
        addr = ipaddress.ip_address(spec.local_addr)
        if addr not in hosts:
            hosts.append(addr)
    ours = [_host(a) for a in hosts] or [Prefix(4, 0, 0), Prefix(6, 0, 0)]
    origin = EntryOrigin("", EXEMPTION_RULE, -1)
    for host in ours:
        anyp = Prefix(host.version, 0, 0)
        for port in IKE_PORTS:
            for src, dst in ((host, anyp), (anyp, host)):
                out.append((Selector(src, dst, UDP, port, port, 0, 0xFFFF), origin))
                out.append((Selector(src, dst, UDP, 0, 0xFFFF, port, port), origin))
    return out


def compile_policy(doc: Mapping[str, Any], revision: int, ctx: NodeContext) -> CompiledPolicy:
    """Compile the policy document for node ``ctx`` (see the module docstring). Raises
    :class:`CompileError` only for a document that is not a policy document; everything the
    services cannot enforce is reported in ``unsupported``."""
    try:
        me = tuple(ipaddress.ip_address(a) for a in ctx.addresses)
    except ValueError:
        raise CompileError("node addresses: expected IP addresses") from None
    try:
        rules, notes = _rules(doc, ctx.name)
        units = _units(rules, me, notes)
        specs, where = _connections(rules, units, ctx, me, notes)
    except CompileError:
        raise
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise CompileError(f"not a policy document ({type(e).__name__})") from None
    rows: list[tuple[Action, Selector, EntryOrigin, int, tuple[int, ...], bool, bool]] = []
    if any(u.treatment[0] == "negotiate" for u in units):
        for sel, origin in _exemptions(me, specs):
            rows.append((Action.BYPASS, sel, origin, 0, (50,), False, False))
    for u in units:
        act = ACTIONS[u.treatment[0]]
        fa = u.rule.action
        protect = act is Action.PROTECT
        first = (fa.get("security_methods") or [{}])[0]
        bundle = {"esp": (50,), "ah": (51,), "esp+ah": (50, 51)}.get(
            str(first.get("protocol", "esp")), (50,)
        )
        for sel in u.selectors:
            conn, child, reqid = "", "", 0
            if protect:
                pair = (sel.src, sel.dst) if u.local_is_src else (sel.dst, sel.src)
                conn, child, reqid = where.get((u.rule.order, *pair), ("", "", 0))
            origin = EntryOrigin(u.rule.pname, u.rule.rname, u.index, u.mirrored, conn, child)
            rows.append(
                (
                    act,
                    sel,
                    origin,
                    reqid,
                    bundle if protect else (50,),
                    # inbound clear is accepted with "accept unsecured" and with "allow
                    # fallback": a peer without IPsec talks clear in both directions
                    protect and bool(fa.get("accept_unsecured") or fa.get("allow_fallback")),
                    protect and bool(fa.get("allow_fallback")),
                )
            )
    entries = tuple(
        SpdEntry(i + 1, i + 1, act, sel, reqid, protos, accept, fallback)
        for i, (act, sel, _o, reqid, protos, accept, fallback) in enumerate(rows)
    )
    return CompiledPolicy(
        revision=revision,
        node=ctx.name,
        entries=entries,
        origins=tuple(r[2] for r in rows),
        connections=tuple(specs),
        conflicts=tuple(_conflicts(units)),
        unsupported=tuple(dict.fromkeys(notes)),
    )


__all__ = [
    "ChildSpec",
    "CompileError",
    "CompiledPolicy",
    "Conflict",
    "ConnectionSpec",
    "EntryOrigin",
    "FilterRef",
    "NodeContext",
    "Unsupported",
    "compile_policy",
    "entry_to_dict",
    "selector_overlap",
    "specificity_key",
    "stable_reqids",
]
