"""Built-in policy templates: the three Windows default policies and the connection security
rule kinds, each a function from a few parameters to a :class:`PolicyDocument`.

``POST /v1/templates/{name}`` applies the document in create-only mode: objects are named
``<prefix>-...``; applying the same template with the same parameters again changes nothing,
and an existing object of the same name that differs is a conflict (409), never overwritten.

Every template that negotiates also permits IKE itself (UDP 500 and 4500 to and from this
node), so the keying traffic is never caught by the policy it sets up.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import Field, StringConstraints, field_validator

from services.policyd.schemas import (
    IKE_PORTS,
    AuthMethodIn,
    FilterActionIn,
    FilterIn,
    FilterListIn,
    Name,
    PolicyDoc,
    PolicyDocument,
    RuleIn,
    SecurityMethodIn,
    Strict,
    canonical_address,
)

Prefix = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,39}$")]
Requirement = Literal["request", "require"]


def _kerberos() -> list[AuthMethodIn]:
    return [AuthMethodIn(method="kerberos")]


class TemplateParams(Strict):
    prefix: Prefix = Field(description="names of the objects made start with <prefix>-")
    auth: list[AuthMethodIn] = Field(
        default_factory=_kerberos, min_length=1, max_length=8, description="in order"
    )
    assigned_to: list[Name] = Field(default_factory=list, max_length=1024)


def _addresses(value: list[str]) -> list[str]:
    out = [canonical_address(v) for v in value]
    if len(set(out)) != len(out):
        raise ValueError("an address is listed twice; drop the duplicate")
    return out


class DefaultPolicyParams(TemplateParams):
    prefix: Prefix = "default"


class IsolationParams(TemplateParams):
    prefix: Prefix = "isolation"
    requirement: Requirement = "request"
    exempt: list[str] = Field(
        default_factory=list, max_length=256, description="addresses that need no IPsec"
    )

    @field_validator("exempt")
    @classmethod
    def _exempt(cls, value: list[str]) -> list[str]:
        return _addresses(value)


class ServerToServerParams(TemplateParams):
    prefix: Prefix = "server-to-server"
    requirement: Requirement = "require"
    endpoints1: list[str] = Field(min_length=1, max_length=64, description="addresses/prefixes")
    endpoints2: list[str] = Field(min_length=1, max_length=64, description="addresses/prefixes")

    @field_validator("endpoints1", "endpoints2")
    @classmethod
    def _endpoints(cls, value: list[str]) -> list[str]:
        return _addresses(value)


class TunnelParams(TemplateParams):
    prefix: Prefix = "tunnel"
    requirement: Requirement = "require"
    local_subnet: str
    remote_subnet: str
    local_gateway: str
    remote_gateway: str

    @field_validator("local_subnet", "remote_subnet")
    @classmethod
    def _subnet(cls, value: str) -> str:
        return canonical_address(value)

    @field_validator("local_gateway", "remote_gateway")
    @classmethod
    def _gateway(cls, value: str) -> str:
        text = canonical_address(value)
        if text in ("any", "me") or "/" in text or "-" in text:
            raise ValueError("a gateway is one IP address")
        return text


class ExemptionParams(Strict):
    prefix: Prefix = "exemption"
    addresses: list[str] = Field(min_length=1, max_length=256)
    assigned_to: list[Name] = Field(default_factory=list, max_length=1024)

    @field_validator("addresses")
    @classmethod
    def _addrs(cls, value: list[str]) -> list[str]:
        return _addresses(value)


# -- building blocks ----------------------------------------------------------------------------

STRONG_METHODS = [
    SecurityMethodIn(protocol="esp", esp="aes256gcm16"),
    SecurityMethodIn(protocol="esp", esp="aes128gcm16"),
    SecurityMethodIn(protocol="esp", esp="aes256-sha256"),
]


def _ike_exemption(p: str) -> tuple[FilterListIn, FilterActionIn, RuleIn]:
    filters = []
    for port in IKE_PORTS:
        for side in ("source_port", "destination_port"):
            filters.append(
                FilterIn.model_validate(
                    {
                        "description": f"IKE, UDP {port}",
                        "source": "me",
                        "destination": "any",
                        "protocol": "udp",
                        side: port,
                    }
                )
            )
    fl = FilterListIn(name=f"{p}-ike", description="IKE (UDP 500 and 4500)", filters=filters)
    fa = FilterActionIn(name=f"{p}-permit", description="Permit", action="permit")
    rule = RuleIn(name="ike-exemption", filter_list=fl.name, filter_action=fa.name)
    return fl, fa, rule


def _negotiate(p: str, requirement: Requirement | Literal["respond"]) -> FilterActionIn:
    if requirement == "require":
        return FilterActionIn(
            name=f"{p}-require-security",
            description="Require Security",
            action="negotiate",
            security_methods=STRONG_METHODS,
        )
    if requirement == "request":
        return FilterActionIn(
            name=f"{p}-request-security",
            description="Request Security (Optional)",
            action="negotiate",
            security_methods=STRONG_METHODS,
            accept_unsecured=True,
            allow_fallback=True,
        )
    return FilterActionIn(
        name=f"{p}-respond-only",
        description="Respond only: secure when the peer asks for it",
        action="negotiate",
        security_methods=STRONG_METHODS,
        accept_unsecured=True,
        allow_fallback=True,
        initiate=False,
    )


def _all_ip(p: str) -> FilterListIn:
    return FilterListIn(
        name=f"{p}-all-ip",
        description="All IP Traffic",
        filters=[FilterIn(source="me", destination="any")],
    )


def _all_icmp(p: str) -> FilterListIn:
    return FilterListIn(
        name=f"{p}-all-icmp",
        description="All ICMP Traffic",
        filters=[
            FilterIn(source="me", destination="any", protocol="icmp"),
            FilterIn(source="me", destination="any", protocol="icmpv6"),
        ],
    )


def _doc(
    lists: list[FilterListIn],
    actions: list[FilterActionIn],
    name: str,
    description: str,
    rules: list[RuleIn],
    assigned_to: list[str],
) -> PolicyDocument:
    uniq_actions = list({a.name: a for a in actions}.values())
    return PolicyDocument(
        filter_lists=lists,
        filter_actions=uniq_actions,
        policies=[
            PolicyDoc(name=name, description=description, rules=rules, assigned_to=assigned_to)
        ],
    )


def _default_policy(kind: Literal["respond", "request", "require"], title: str) -> Any:
    def build(params: DefaultPolicyParams) -> PolicyDocument:
        p = params.prefix
        ike_fl, permit, ike_rule = _ike_exemption(p)
        all_ip, all_icmp = _all_ip(p), _all_icmp(p)
        neg = _negotiate(p, kind)
        rules = [
            ike_rule,
            RuleIn(
                name="all-ip",
                filter_list=all_ip.name,
                filter_action=neg.name,
                auth_methods=params.auth,
            ),
        ]
        lists = [ike_fl, all_ip]
        if kind != "respond":  # the Server policies let ICMP through unsecured
            rules.append(
                RuleIn(name="all-icmp", filter_list=all_icmp.name, filter_action=permit.name)
            )
            lists.append(all_icmp)
        return _doc(lists, [permit, neg], p, title, rules, params.assigned_to)

    return build


def _isolation(params: IsolationParams) -> PolicyDocument:
    p = params.prefix
    ike_fl, permit, ike_rule = _ike_exemption(p)
    all_ip = _all_ip(p)
    neg = _negotiate(p, params.requirement)
    lists, rules = [ike_fl, all_ip], [ike_rule]
    if params.exempt:
        ex = FilterListIn(
            name=f"{p}-exempt",
            description="Authentication exemption",
            filters=[FilterIn(source="me", destination=a) for a in params.exempt],
        )
        lists.append(ex)
        rules.append(RuleIn(name="exempt", filter_list=ex.name, filter_action=permit.name))
    rules.append(
        RuleIn(
            name="isolation",
            filter_list=all_ip.name,
            filter_action=neg.name,
            auth_methods=params.auth,
        )
    )
    return _doc(lists, [permit, neg], p, "Domain isolation", rules, params.assigned_to)


def _server_to_server(params: ServerToServerParams) -> PolicyDocument:
    p = params.prefix
    ike_fl, permit, ike_rule = _ike_exemption(p)
    pairs = FilterListIn(
        name=f"{p}-endpoints",
        description="Endpoint 1 <-> endpoint 2",
        filters=[
            FilterIn(source=a, destination=b) for a in params.endpoints1 for b in params.endpoints2
        ],
    )
    neg = _negotiate(p, params.requirement)
    rule = RuleIn(
        name="server-to-server",
        filter_list=pairs.name,
        filter_action=neg.name,
        auth_methods=params.auth,
    )
    return _doc(
        [ike_fl, pairs], [permit, neg], p, "Server to server", [ike_rule, rule], params.assigned_to
    )


def _tunnel(params: TunnelParams) -> PolicyDocument:
    p = params.prefix
    ike_fl, permit, ike_rule = _ike_exemption(p)
    subnets = FilterListIn(
        name=f"{p}-subnets",
        description="Local subnet <-> remote subnet",
        filters=[FilterIn(source=params.local_subnet, destination=params.remote_subnet)],
    )
    neg = _negotiate(p, params.requirement)
    rule = RuleIn(
        name="tunnel",
        filter_list=subnets.name,
        filter_action=neg.name,
        auth_methods=params.auth,
        tunnel_endpoint=params.remote_gateway,
        local_tunnel_endpoint=params.local_gateway,
    )
    return _doc(
        [ike_fl, subnets],
        [permit, neg],
        p,
        "Gateway-to-gateway tunnel",
        [ike_rule, rule],
        params.assigned_to,
    )


def _exemption(params: ExemptionParams) -> PolicyDocument:
    p = params.prefix
    ex = FilterListIn(
        name=f"{p}-exempt",
        description="Authentication exemption",
        filters=[FilterIn(source="me", destination=a) for a in params.addresses],
    )
    permit = FilterActionIn(name=f"{p}-permit", description="Permit", action="permit")
    rule = RuleIn(name="exempt", filter_list=ex.name, filter_action=permit.name)
    return _doc([ex], [permit], p, "Authentication exemption", [rule], params.assigned_to)


@dataclass(frozen=True)
class Template:
    name: str
    title: str
    description: str
    params: type[Strict]
    build: Callable[[Any], PolicyDocument]


TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in (
        Template(
            "client-respond-only",
            "Client (Respond Only)",
            "Secures traffic only when a peer asks for it; never initiates.",
            DefaultPolicyParams,
            _default_policy("respond", "Client (Respond Only)"),
        ),
        Template(
            "server-request-security",
            "Server (Request Security)",
            "Asks for security on all IP traffic, accepts unsecured peers; ICMP and IKE permitted.",
            DefaultPolicyParams,
            _default_policy("request", "Server (Request Security)"),
        ),
        Template(
            "secure-server-require-security",
            "Secure Server (Require Security)",
            "Requires security on all IP traffic; ICMP and IKE permitted.",
            DefaultPolicyParams,
            _default_policy("require", "Secure Server (Require Security)"),
        ),
        Template(
            "isolation",
            "Isolation",
            "Authenticates all traffic of this node (request or require), with exemptions.",
            IsolationParams,
            _isolation,
        ),
        Template(
            "server-to-server",
            "Server-to-server",
            "Secures traffic between two sets of endpoints (transport mode).",
            ServerToServerParams,
            _server_to_server,
        ),
        Template(
            "tunnel",
            "Tunnel (gateway-to-gateway)",
            "Secures traffic between two subnets through two gateways (tunnel mode).",
            TunnelParams,
            _tunnel,
        ),
        Template(
            "authentication-exemption",
            "Authentication exemption",
            "Permits traffic to the listed addresses without IPsec.",
            ExemptionParams,
            _exemption,
        ),
    )
}
