"""keymgr configuration: the model (:class:`Connection`) and one file format (JSON) for it.

The model is independent of the file format so policyd can feed connections later. A JSON
file looks like::

    {"connections": [
        {"name": "site-b", "local_addr": "192.0.2.1", "remote_addr": "192.0.2.2",
         "local_id": "192.0.2.1", "remote_id": "192.0.2.2", "psk_file": "/run/secrets/psk",
         "local_ts": "198.51.100.1/32", "remote_ts": "203.0.113.1/32",
         "start_action": "start"}
    ]}

``local_id`` / ``remote_id`` are IPv4 address identities (ID_IPV4_ADDR) and default to the
addresses. The PSK lives in its own file (a Kubernetes Secret mount); its content is read only
when a connection starts and never logged. A PSK file holding ``0x<hex>`` is decoded as hex
(strongSwan's notation), anything else is used as the raw octets with surrounding whitespace
removed.
"""

from __future__ import annotations

import ipaddress
import json
import pathlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

START_ACTIONS = ("start", "none")


class ConfigError(ValueError):
    """An invalid keymgr configuration (the message never contains a secret)."""


def _ipv4(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{what}: expected an IPv4 address string")
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise ConfigError(f"{what}: not an IPv4 address: {value!r}") from None


def _prefix(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{what}: expected an IPv4 prefix string")
    try:
        return str(ipaddress.IPv4Network(value, strict=True))
    except ValueError:
        raise ConfigError(f"{what}: not an IPv4 prefix: {value!r}") from None


@dataclass(frozen=True)
class Connection:
    """One IKEv2 connection with one Child SA (tunnel mode, one IPv4 prefix per side)."""

    name: str
    local_addr: str
    remote_addr: str
    psk_file: pathlib.Path
    local_ts: str
    remote_ts: str
    local_id: str | None = None
    remote_id: str | None = None
    start_action: str = "start"

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("connection name must not be empty")
        w = f"connection {self.name!r}"
        _ipv4(self.local_addr, f"{w} local_addr")
        _ipv4(self.remote_addr, f"{w} remote_addr")
        for attr in ("local_id", "remote_id"):
            v = getattr(self, attr)
            if v is not None:
                _ipv4(v, f"{w} {attr}")
        _prefix(self.local_ts, f"{w} local_ts")
        _prefix(self.remote_ts, f"{w} remote_ts")
        if self.start_action not in START_ACTIONS:
            raise ConfigError(f"{w} start_action must be one of {START_ACTIONS}")

    def ts_range(self, which: str) -> tuple[str, str]:
        """The local or remote traffic selector as an inclusive (first, last) address range."""
        net = ipaddress.IPv4Network(self.local_ts if which == "local" else self.remote_ts)
        return str(net.network_address), str(net.broadcast_address)

    def read_psk(self) -> bytes:
        """The pre-shared key from ``psk_file`` (never logged, never in repr)."""
        try:
            raw = self.psk_file.read_bytes().strip()
        except OSError as e:
            raise ConfigError(f"connection {self.name!r}: cannot read psk_file: {e}") from None
        if raw[:2].lower() == b"0x":
            try:
                raw = bytes.fromhex(raw[2:].decode("ascii"))
            except (UnicodeDecodeError, ValueError):
                raise ConfigError(f"connection {self.name!r}: psk_file is not valid hex") from None
        if not raw:
            raise ConfigError(f"connection {self.name!r}: psk_file is empty")
        return raw


@dataclass(frozen=True)
class KeymgrConfig:
    connections: tuple[Connection, ...]

    def __post_init__(self) -> None:
        names = [c.name for c in self.connections]
        if len(set(names)) != len(names):
            raise ConfigError("duplicate connection name")


_FIELDS = {
    "name",
    "local_addr",
    "remote_addr",
    "local_id",
    "remote_id",
    "psk_file",
    "local_ts",
    "remote_ts",
    "start_action",
}


def connection_from_dict(d: Mapping[str, Any], *, base: pathlib.Path | None = None) -> Connection:
    """Build a Connection from a JSON object; relative psk_file paths resolve against ``base``."""
    if not isinstance(d, Mapping):
        raise ConfigError("each connection must be a JSON object")
    unknown = set(d) - _FIELDS
    if unknown:
        raise ConfigError(f"unknown connection field(s): {sorted(unknown)}")
    missing = {"name", "local_addr", "remote_addr", "psk_file", "local_ts", "remote_ts"} - set(d)
    if missing:
        raise ConfigError(f"connection lacks field(s): {sorted(missing)}")
    psk = pathlib.Path(str(d["psk_file"]))
    if base is not None and not psk.is_absolute():
        psk = base / psk
    return Connection(
        name=str(d["name"]),
        local_addr=d["local_addr"],
        remote_addr=d["remote_addr"],
        psk_file=psk,
        local_ts=d["local_ts"],
        remote_ts=d["remote_ts"],
        local_id=d.get("local_id"),
        remote_id=d.get("remote_id"),
        start_action=d.get("start_action", "start"),
    )


def load_config(path: pathlib.Path) -> KeymgrConfig:
    """Parse the JSON configuration file."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read config {path}: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("connections"), list):
        raise ConfigError("config must be an object with a 'connections' list")
    return KeymgrConfig(
        tuple(connection_from_dict(c, base=path.parent) for c in doc["connections"])
    )
