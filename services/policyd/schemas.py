"""policyd's API documents (pydantic): what a client sends and gets back.

Input models reject unknown fields and bound every string, number and list, and they
canonicalise values (addresses, protocols, ports) so that what a client sends and what the
server returns compare equal — the declarative apply relies on that to be idempotent.
Algorithm names are checked by the core's proposal parser (:mod:`services.core.ike.suites`),
the one implementation of those rules.
"""

from __future__ import annotations

import ipaddress
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from services.core.iana import IpProto
from services.core.ike.suites import SuiteError, parse_esp, parse_ike

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
# printable text, no control characters (PostgreSQL refuses NUL in text)
TEXT_PATTERN = r"^[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f]*$"
REF_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_./:@-]{0,127}$"

Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
Description = Annotated[str, StringConstraints(max_length=1024, pattern=TEXT_PATTERN)]
MAX_FILTERS = 1000
MAX_RULES = 1000
MAX_OBJECTS = 10000
AH_INTEGRITY = ("sha256", "sha384", "sha512")
PORT_PROTOCOLS = {int(IpProto.TCP): "tcp", int(IpProto.UDP): "udp", 132: "sctp"}
PROTOCOL_NAMES = {
    "icmp": int(IpProto.ICMP),
    "tcp": int(IpProto.TCP),
    "udp": int(IpProto.UDP),
    "gre": 47,
    "esp": int(IpProto.ESP),
    "ah": int(IpProto.AH),
    "icmpv6": int(IpProto.ICMPV6),
    "sctp": 132,
}
IKE_PORTS = (500, 4500)
DEFAULT_IKE_PROPOSAL = "aes256gcm16-prfsha256-x25519"
DEFAULT_ESP_PROPOSAL = "aes256gcm16"

T = TypeVar("T")
IpAddr = ipaddress.IPv4Address | ipaddress.IPv6Address


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)


# -- addresses ----------------------------------------------------------------------------------


def parse_endpoint(text: str) -> tuple[IpAddr, IpAddr] | None:
    """(first, last) of a canonical filter address; None for ``any`` and ``me``."""
    if text in ("any", "me"):
        return None
    if "/" in text:
        net = ipaddress.ip_network(text)
        return net.network_address, net.broadcast_address
    if "-" in text:
        a, b = text.split("-", 1)
        return ipaddress.ip_address(a), ipaddress.ip_address(b)
    addr = ipaddress.ip_address(text)
    return addr, addr


def canonical_address(value: object) -> str:
    """``any``, ``me``, a host, a prefix (no host bits) or ``first-last``, in canonical text."""
    if not isinstance(value, str) or len(value) > 100:
        raise ValueError("expected text: any, me, an address, a prefix or first-last")
    text = value.strip().lower()
    if text in ("any", "me"):
        return text
    try:
        if "/" in text:
            try:
                net = ipaddress.ip_network(text)
            except ValueError:
                loose = ipaddress.ip_network(text, strict=False)
                raise ValueError(f"host bits are set; write {loose}") from None
            return str(net)
        if "-" in text:
            a_text, b_text = text.split("-", 1)
            a, b = ipaddress.ip_address(a_text.strip()), ipaddress.ip_address(b_text.strip())
            if a.version != b.version:
                raise ValueError("a range needs two addresses of the same IP version")
            if int(a) > int(b):
                raise ValueError(f"the range is reversed; write {b}-{a}")
            return str(a) if a == b else f"{a}-{b}"
        return str(ipaddress.ip_address(text))
    except ValueError as e:
        msg = str(e)
        if "host bits" in msg or "range" in msg:
            raise
        raise ValueError(
            "expected any, me, an address (192.0.2.1), a prefix (192.0.2.0/24) or a range "
            "(192.0.2.10-192.0.2.20)"
        ) from None


def _is_unsecurable(addr: IpAddr) -> bool:
    return addr.is_multicast or (
        isinstance(addr, ipaddress.IPv4Address) and addr == ipaddress.IPv4Address("255.255.255.255")
    )


def unsecurable_reason(text: str) -> str | None:
    """Why traffic to this filter address cannot be protected by IPsec, or None."""
    span = parse_endpoint(text)
    if span is None:
        return None
    first, last = span
    if _is_unsecurable(first) and _is_unsecurable(last):
        # multicast ranges are contiguous: 224.0.0.0/4 and ff00::/8
        kind = "broadcast" if str(first) == "255.255.255.255" else "multicast"
        return f"{text} is {kind}"
    return None


def address_version(text: str) -> int | None:
    span = parse_endpoint(text)
    return None if span is None else span[0].version


# -- filters ------------------------------------------------------------------------------------


def _canonical_protocol(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError("expected a protocol name (tcp, udp, icmp, ...), a number or any")
    if isinstance(value, str):
        key = value.strip().lower()
        if key == "any":
            return None
        if key in PROTOCOL_NAMES:
            return PROTOCOL_NAMES[key]
        if key.isdigit() and len(key) <= 3:
            value = int(key)
        else:
            raise ValueError(
                f"unknown protocol name; use one of {', '.join(PROTOCOL_NAMES)}, 0-255 or any"
            )
    if isinstance(value, int) and 0 <= value <= 255:
        return value
    raise ValueError("a protocol number is 0 to 255 (or a name, or any)")


def _canonical_ports(value: object) -> int | str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError("expected a port, first-last or any")
    if isinstance(value, int):
        if 0 <= value <= 65535:
            return value
        raise ValueError("a port is 0 to 65535")
    if isinstance(value, str) and len(value) <= 16:
        text = value.strip().lower()
        if text == "any":
            return None
        parts = text.split("-")
        if 1 <= len(parts) <= 2 and all(p.strip().isdigit() for p in parts):
            nums = [int(p) for p in parts]
            if all(0 <= n <= 65535 for n in nums):
                if len(nums) == 1 or nums[0] == nums[1]:
                    return nums[0]
                if nums[0] > nums[1]:
                    raise ValueError(f"the port range is reversed; write {nums[1]}-{nums[0]}")
                if nums == [0, 65535]:
                    return None
                return f"{nums[0]}-{nums[1]}"
    raise ValueError("expected a port 0-65535, a range first-last or any")


def port_range(value: int | str | None) -> tuple[int | None, int | None]:
    """The (first, last) columns of a canonical port value."""
    if value is None:
        return None, None
    if isinstance(value, int):
        return value, value
    a, b = value.split("-")
    return int(a), int(b)


def port_value(first: int | None, last: int | None) -> int | str | None:
    if first is None or last is None:
        return None
    return first if first == last else f"{first}-{last}"


class FilterIn(Strict):
    description: Description = ""
    source: str = Field("any", description="any, me, an address, a prefix or first-last")
    destination: str = Field("any", description="any, me, an address, a prefix or first-last")
    protocol: int | str | None = Field(None, description="a name (tcp, udp, ...), 0-255 or any")
    source_port: int | str | None = Field(None, description="a port, first-last or null (any)")
    destination_port: int | str | None = Field(None, description="see source_port")
    mirrored: bool = Field(True, description="also match the reply traffic (source <-> dest)")

    @field_validator("source", "destination", mode="before")
    @classmethod
    def _address(cls, value: object) -> str:
        return canonical_address(value)

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol(cls, value: object) -> int | None:
        return _canonical_protocol(value)

    @field_validator("source_port", "destination_port", mode="before")
    @classmethod
    def _ports(cls, value: object) -> int | str | None:
        return _canonical_ports(value)

    @model_validator(mode="after")
    def _check(self) -> FilterIn:
        has_ports = self.source_port is not None or self.destination_port is not None
        if has_ports and self.protocol not in PORT_PROTOCOLS:
            raise ValueError("ports need protocol tcp, udp or sctp; set protocol or drop the ports")
        sv, dv = address_version(self.source), address_version(self.destination)
        if sv is not None and dv is not None and sv != dv:
            raise ValueError("source and destination are of different IP versions")
        if self.source == "me" and self.destination == "me":
            raise ValueError("source and destination cannot both be me")
        return self


class FilterListIn(Strict):
    name: Name
    description: Description = ""
    filters: list[FilterIn] = Field(default_factory=list, max_length=MAX_FILTERS)


class FilterListOut(FilterListIn):
    revision: int = Field(description="the policy revision of this object's last change")


# -- filter actions -----------------------------------------------------------------------------


def _check_esp(text: str) -> str:
    try:
        suite = parse_esp(text)
    except SuiteError as e:
        raise ValueError(f"{e} (e.g. aes256gcm16, aes128gcm16, aes256-sha256)") from None
    if suite.dh:
        raise ValueError(
            "name no DH group here; set session_key_pfs and pfs_group on the filter action"
        )
    return text


def _check_pfs_group(text: str) -> str:
    ok = isinstance(text, str) and text.isascii() and text.isalnum() and len(text) <= 32
    if ok:
        try:
            suite = parse_ike(f"{DEFAULT_IKE_PROPOSAL.rsplit('-', 1)[0]}-{text}")
            ok = bool(suite.dh)
        except SuiteError:
            ok = False
    if not ok:
        raise ValueError("unknown DH group; use e.g. x25519, ecp256, ecp384, modp3072")
    return text


class SecurityMethodIn(Strict):
    protocol: Literal["esp", "ah", "esp+ah"] = "esp"
    esp: str | None = Field(
        None, max_length=64, description="ESP proposal (strongSwan style), e.g. aes256gcm16"
    )
    ah: str | None = Field(None, description="AH integrity: sha256, sha384 or sha512")
    lifetime_seconds: int = Field(3600, ge=60, le=604800)
    lifetime_kilobytes: int = Field(0, ge=0, le=1 << 40, description="0: no volume limit")

    @model_validator(mode="after")
    def _check(self) -> SecurityMethodIn:
        if "esp" in self.protocol:
            self.esp = _check_esp(self.esp if self.esp is not None else DEFAULT_ESP_PROPOSAL)
        elif self.esp is not None:
            raise ValueError(f"esp is set but protocol is {self.protocol}; use esp+ah or drop it")
        if "ah" in self.protocol:
            ah = self.ah if self.ah is not None else "sha256"
            if ah not in AH_INTEGRITY:
                raise ValueError(f"ah must be one of {', '.join(AH_INTEGRITY)}")
            self.ah = ah
        elif self.ah is not None:
            raise ValueError(f"ah is set but protocol is {self.protocol}; use esp+ah or drop it")
        return self


class FilterActionIn(Strict):
    name: Name
    description: Description = ""
    action: Literal["permit", "block", "negotiate"]
    security_methods: list[SecurityMethodIn] = Field(default_factory=list, max_length=16)
    accept_unsecured: bool = Field(
        False, description="accept unsecured communication, but always respond using IPsec"
    )
    allow_fallback: bool = Field(
        False, description="allow fallback to unsecured communication (non-IPsec-aware peers)"
    )
    initiate: bool = Field(True, description="false: only respond to peers that negotiate")
    session_key_pfs: bool = False
    pfs_group: str = Field("x25519", max_length=32)

    @field_validator("pfs_group")
    @classmethod
    def _pfs(cls, value: str) -> str:
        return _check_pfs_group(value)

    @model_validator(mode="after")
    def _check(self) -> FilterActionIn:
        if self.action == "negotiate":
            if not self.security_methods:
                raise ValueError(
                    "a negotiate action needs at least one security method in security_methods"
                )
            return self
        extra = [
            f for f in ("accept_unsecured", "allow_fallback", "session_key_pfs") if getattr(self, f)
        ]
        if self.security_methods or extra or not self.initiate:
            raise ValueError(
                f"a {self.action} action takes no security methods or negotiation options; "
                "use action negotiate or drop them"
            )
        return self


class FilterActionOut(FilterActionIn):
    revision: int


# -- policies and rules -------------------------------------------------------------------------


class AuthMethodIn(Strict):
    method: Literal["kerberos", "certificate", "psk"]
    ca: str | None = Field(
        None, max_length=1024, pattern=TEXT_PATTERN, description="certificate: the CA's name"
    )
    psk_ref: str | None = Field(
        None,
        pattern=REF_PATTERN,
        description="psk: the name of the secret holding the key (never the key itself)",
    )

    @model_validator(mode="after")
    def _check(self) -> AuthMethodIn:
        if self.method == "certificate" and not self.ca:
            raise ValueError("certificate authentication needs ca (the issuing CA's name)")
        if self.method == "psk" and not self.psk_ref:
            raise ValueError("psk authentication needs psk_ref, the name of the secret")
        if self.method != "certificate" and self.ca is not None:
            raise ValueError(f"ca applies to certificate authentication, not {self.method}")
        if self.method != "psk" and self.psk_ref is not None:
            raise ValueError(f"psk_ref applies to psk authentication, not {self.method}")
        return self


def _endpoint(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > 45:
        raise ValueError("expected an IP address")
    try:
        return str(ipaddress.ip_address(value.strip()))
    except ValueError:
        raise ValueError("expected an IP address (the tunnel endpoint)") from None


class RuleIn(Strict):
    name: Name
    description: Description = ""
    filter_list: Name
    filter_action: Name
    auth_methods: list[AuthMethodIn] = Field(default_factory=list, max_length=8)
    tunnel_endpoint: str | None = Field(None, description="remote tunnel end; null: transport")
    local_tunnel_endpoint: str | None = Field(None, description="local tunnel end (optional)")
    connection_type: Literal["all", "lan", "remote_access"] = "all"
    enabled: bool = True

    @field_validator("tunnel_endpoint", "local_tunnel_endpoint", mode="before")
    @classmethod
    def _endpoints(cls, value: object) -> str | None:
        return _endpoint(value)

    @model_validator(mode="after")
    def _check(self) -> RuleIn:
        if self.local_tunnel_endpoint and not self.tunnel_endpoint:
            raise ValueError("local_tunnel_endpoint needs tunnel_endpoint (the remote end)")
        if self.tunnel_endpoint and self.local_tunnel_endpoint:
            a = ipaddress.ip_address(self.tunnel_endpoint)
            b = ipaddress.ip_address(self.local_tunnel_endpoint)
            if a.version != b.version:
                raise ValueError("the tunnel endpoints are of different IP versions")
        return self


class RuleOut(RuleIn):
    policy: Name
    revision: int


class MainModeIn(Strict):
    proposals: list[Annotated[str, StringConstraints(max_length=256)]] = Field(
        default_factory=lambda: [DEFAULT_IKE_PROPOSAL],
        min_length=1,
        max_length=32,
        description="IKE proposals in order of preference, e.g. aes256gcm16-prfsha256-x25519",
    )
    lifetime_minutes: int = Field(480, ge=5, le=525600, description="master-key lifetime")
    lifetime_sessions: int = Field(
        0, ge=0, le=2147483647, description="quick-mode sessions per master key; 0: no limit"
    )
    pfs: bool = Field(False, description="master-key PFS: a new main mode for every quick mode")

    @field_validator("proposals")
    @classmethod
    def _proposals(cls, value: list[str]) -> list[str]:
        for i, text in enumerate(value):
            try:
                parse_ike(text)
            except SuiteError as e:
                raise ValueError(
                    f"proposals[{i}]: {e} (e.g. {DEFAULT_IKE_PROPOSAL}, aes256-sha256-modp3072)"
                ) from None
        if len(set(value)) != len(value):
            raise ValueError("a proposal is listed twice; drop the duplicate")
        return value


class PolicyIn(Strict):
    name: Name
    description: Description = ""
    main_mode: MainModeIn = Field(default_factory=MainModeIn)
    assigned_to: list[Name] = Field(
        default_factory=list, max_length=1024, description="nodes/workers that enforce it"
    )

    @field_validator("assigned_to")
    @classmethod
    def _assigned(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("a node is listed twice; drop the duplicate")
        return value


class PolicyOut(PolicyIn):
    revision: int


class PolicyDoc(PolicyIn):
    """A policy with its rules, as in a declarative document."""

    rules: list[RuleIn] = Field(default_factory=list, max_length=MAX_RULES)

    @field_validator("rules")
    @classmethod
    def _unique(cls, value: list[RuleIn]) -> list[RuleIn]:
        _no_duplicates([r.name for r in value], "rule")
        return value


def _no_duplicates(names: list[str], what: str) -> None:
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise ValueError(f"two {what}s are named {n}; names must be unique")
        seen.add(n)


class PolicyDocument(Strict):
    """The whole policy: what ``GET /v1/document`` returns and ``POST /v1/apply`` takes."""

    filter_lists: list[FilterListIn] = Field(default_factory=list, max_length=MAX_OBJECTS)
    filter_actions: list[FilterActionIn] = Field(default_factory=list, max_length=MAX_OBJECTS)
    policies: list[PolicyDoc] = Field(default_factory=list, max_length=MAX_OBJECTS)

    @model_validator(mode="after")
    def _unique(self) -> PolicyDocument:
        _no_duplicates([f.name for f in self.filter_lists], "filter list")
        _no_duplicates([f.name for f in self.filter_actions], "filter action")
        _no_duplicates([p.name for p in self.policies], "policy")
        return self


class DocumentOut(PolicyDocument):
    revision: int


class CompiledOut(BaseModel):
    """The compiled policy of one node (``services.core.policy.CompiledPolicy.to_dict``)."""

    revision: int = Field(description="the policy revision compiled")
    node: str
    entries: list[dict[str, Any]] = Field(
        description="the node's SPD in order (first match wins), each with its origin"
    )
    connections: list[dict[str, Any]] = Field(
        description="keymgr connections of the negotiate rules (secrets as file paths only)"
    )
    conflicts: list[dict[str, Any]] = Field(
        description="overlapping filters with different actions: both, the overlap, the winner"
    )
    unsupported: list[dict[str, Any]] = Field(
        description="what the enforcing services cannot do (yet), and what was done instead"
    )


class Change(BaseModel):
    operation: Literal["create", "update", "delete"]
    kind: str
    name: str


class ApplyResult(BaseModel):
    revision: int = Field(description="the revision now in force")
    changed: bool
    changes: list[Change]


class RevisionOut(BaseModel):
    revision: int


class EnforcedOut(BaseModel):
    node: str
    component: str
    revision: int = Field(description="the policy revision the component reported it enforces")
    digest: str
    reported_at: str = Field(description="when it reported (UTC, ISO 8601)")
    current: bool = Field(description="whether that is policyd's current revision")


class EnforcedListOut(BaseModel):
    revision: int = Field(description="policyd's current revision")
    enforced: list[EnforcedOut]


class AuditOut(BaseModel):
    id: int
    revision: int
    at: str
    actor: str
    operation: str
    kind: str
    name: str
    via: str
    detail: dict[str, Any]


class Page(BaseModel, Generic[T]):
    items: list[T]
    next: str | None = Field(None, description="pass as ?after= for the next page; null: last")


class ErrorItem(BaseModel):
    field: str
    message: str


class ErrorOut(BaseModel):
    detail: str
    errors: list[ErrorItem] = Field(default_factory=list)


class TemplateOut(BaseModel):
    name: str
    title: str
    description: str
    parameters: dict[str, Any]
