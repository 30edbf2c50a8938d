"""Dataplane worker settings: pydantic-settings with the DATAPLANE_ environment prefix; command
line flags (services.dataplane.__main__) override the environment.

policyd (docs/policyd.md, "Consumers"): ``policyd`` (unix:/path or HOST:PORT; empty = the
worker does not follow policyd and only keymgr writes its SPD), ``node`` (default: the worker
id), ``policy_state`` (default: /var/lib/ipsec-dataplane/<worker-id>/policy.json),
``policyd_server_name`` (the name policyd's certificate carries, default ``policyd``) and
``policyd_cert_name`` (the client certificate NAME.pem / NAME.key from ``tls_dir``; default: the
worker's own ``tls_cert_name``) and ``policyd_retry_max`` (longest back-off between connection
attempts, seconds; default 30). ``inbound_filter`` (``on`` / ``off``; default ``on`` with
``policyd``, else ``off``) enforces the SPD on inbound clear packets with nftables
(services.dataplane.nftfilter).

List settings accept a comma-separated string in the environment, e.g.
``DATAPLANE_ROUTE=10.1.0.0/16,fd00:1::/64``; integers accept ``0x`` hex (``DATAPLANE_FWMARK=0x1``).
"""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

RESERVED_TABLES = {0, 253, 254, 255}  # unspec, default, main, local


def _split(value: Any) -> Any:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


def _int0(value: Any) -> Any:
    if isinstance(value, str):
        return int(value.strip(), 0)
    return value


def parse_host_port(text: str) -> tuple[str, int]:
    """'127.0.0.1:9109', '[::1]:9109' or ':9109' (all addresses) -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    host = host.strip("[]")
    if host:
        ipaddress.ip_address(host)
    return host, int(port)


class Settings(BaseSettings):
    """Everything a worker needs to start."""

    model_config = SettingsConfigDict(env_prefix="DATAPLANE_", extra="ignore")

    worker_id: str = Field(default_factory=socket.gethostname, min_length=1, max_length=128)
    grpc_listen: str = "unix:/run/ipsec-dataplane/worker.sock"
    tls_dir: Path = Path("/etc/ipsec/tls")
    tls_cert_name: str = "server"
    tun: str = Field("ipsec0", min_length=1, max_length=15)
    tun_address: Annotated[list[str], NoDecode] = []
    tun_mtu: int = Field(1400, ge=576, le=65535)
    route: Annotated[list[str], NoDecode] = []
    local_address: Annotated[list[str], NoDecode] = []
    fwmark: int = Field(0x1, ge=1, le=0xFFFFFFFF)
    table: int = Field(100, ge=1, le=0xFFFFFFFF)
    rule_priority: int = Field(1000, ge=1, le=32765)
    metrics_listen: str = "127.0.0.1:9109"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    policyd: str = ""
    node: str = Field("", max_length=253)
    policy_state: Path | None = None
    policyd_server_name: str = Field("policyd", min_length=1, max_length=253)
    policyd_cert_name: str = Field("", max_length=128)
    inbound_filter: Literal["on", "off"] | None = None
    policyd_retry_max: float = Field(30.0, ge=0.5, le=600.0)

    @field_validator("tun_address", "route", "local_address", mode="before")
    @classmethod
    def _lists(cls, v: Any) -> Any:
        return _split(v)

    @field_validator("fwmark", "table", "tun_mtu", "rule_priority", mode="before")
    @classmethod
    def _ints(cls, v: Any) -> Any:
        return _int0(v)

    @field_validator("log_level", mode="before")
    @classmethod
    def _level(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v

    @field_validator("inbound_filter", mode="before")
    @classmethod
    def _onoff(cls, v: Any) -> Any:
        if isinstance(v, bool):
            return "on" if v else "off"
        if isinstance(v, str):
            t = v.strip().lower()
            if t == "":
                return None
            return {"1": "on", "true": "on", "yes": "on", "0": "off", "false": "off"}.get(t, t)
        return v

    @field_validator("policyd")
    @classmethod
    def _policyd(cls, v: str) -> str:
        v = v.strip()
        if not v:
            return ""
        if v.startswith("unix:"):
            if len(v) <= 5:
                raise ValueError("policyd unix: needs a path, e.g. unix:/run/policyd/grpc.sock")
            return v
        try:
            host, _, port = v.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError
        except ValueError:
            raise ValueError(
                f"policyd address must be unix:/path or HOST:PORT, got {v!r}"
            ) from None
        return v

    @field_validator("tun_address")
    @classmethod
    def _ifaces(cls, v: list[str]) -> list[str]:
        return [str(ipaddress.ip_interface(a)) for a in v]

    @field_validator("route")
    @classmethod
    def _routes(cls, v: list[str]) -> list[str]:
        return [str(ipaddress.ip_network(a, strict=False)) for a in v]

    @field_validator("local_address")
    @classmethod
    def _addrs(cls, v: list[str]) -> list[str]:
        out = []
        for a in v:
            ip = ipaddress.ip_address(a)
            if ip.is_unspecified or ip.is_multicast:
                raise ValueError(f"local address {a} must be a unicast address")
            out.append(str(ip))
        return list(dict.fromkeys(out))

    @field_validator("table")
    @classmethod
    def _table(cls, v: int) -> int:
        if v in RESERVED_TABLES:
            raise ValueError("table must not be 0, 253 (default), 254 (main) or 255 (local)")
        return v

    @field_validator("grpc_listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        if v.startswith("unix:"):
            if len(v) <= 5:
                raise ValueError("unix: needs a path")
            return v
        parse_host_port(v)
        return v

    @field_validator("metrics_listen")
    @classmethod
    def _metrics(cls, v: str) -> str:
        if v:
            parse_host_port(v)
        return v

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.tun_mtu < 1280 and any(":" in a for a in self.tun_address + self.route):
            raise ValueError("IPv6 needs --tun-mtu >= 1280")
        if self.inbound_filter == "on" and not self.route:
            raise ValueError("--inbound-filter on needs at least one --route prefix to guard")
        return self

    @property
    def policy_node(self) -> str:
        """The node name the worker follows in policyd (default: the worker id)."""
        return self.node or self.worker_id

    @property
    def policy_state_file(self) -> Path:
        """Where the last enforced policy is cached (default under /var/lib/ipsec-dataplane)."""
        if self.policy_state is not None:
            return self.policy_state
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.worker_id)
        return Path("/var/lib/ipsec-dataplane") / safe.lstrip(".") / "policy.json"

    @property
    def policyd_client_cert(self) -> str:
        """The client certificate name presented to policyd."""
        return self.policyd_cert_name or self.tls_cert_name

    @property
    def inbound_filter_enabled(self) -> bool:
        """``inbound_filter`` resolved: explicit on/off, else on exactly when following policyd."""
        if self.inbound_filter is None:
            return bool(self.policyd)
        return self.inbound_filter == "on"
