"""keymgr configuration: the model (:class:`Connection`) and one file format (JSON) for it.

The model is independent of the file format so policyd can feed connections later. A JSON
file looks like::

    {"connections": [
        {"name": "site-b", "local_addr": "192.0.2.1", "remote_addr": "192.0.2.2",
         "local_id": "192.0.2.1", "remote_id": "192.0.2.2", "psk_file": "/run/secrets/psk",
         "local_ts": "198.51.100.1/32", "remote_ts": "203.0.113.1/32",
         "start_action": "start"}
    ]}

``local_id`` / ``remote_id`` are identities in their text forms (an IPv4 or IPv6 address,
``@fqdn``, ``user@domain``, ``@#hex`` key ID or a distinguished name ``C=CH, O=Example,
CN=moon``; see :class:`services.core.ike.authn.Identity`) and default to the addresses;
``remote_id`` may be ``"%any"`` (whichever identity the peer proves with its certificate).

``auth`` is ``"psk"`` (default; ``psk_file`` required) or ``"pubkey"``: certificates, with
``cert_file`` (PEM or DER; our certificate first, then intermediates to send), ``key_file``
(its private key, PEM or DER, unencrypted), ``ca_files`` (a list of trusted CA certificate
files) and optionally ``crl_files`` (a list of CRL files). Relative paths resolve against the
config file's directory. ``fragment_size`` is the largest IP packet of an IKE fragment (RFC
7383; default 1280 as in strongSwan, 0 disables fragmentation).

``start_action`` is ``"start"`` (keymgr initiates) or ``"none"`` / ``"respond"``
(keymgr only answers the peer's IKE_SA_INIT arriving from ``remote_addr`` at ``local_addr``).
The PSK lives in its own file (a Kubernetes Secret mount); its content is read only
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

from services.core.ike.authn import Identity

START_ACTIONS = ("start", "none", "respond")
RESPONDER_ACTIONS = ("none", "respond")  # keymgr answers the peer's IKE_SA_INIT
MAX_NAME_LEN = 64
MAX_PATH_LEN = 4096
MAX_CONNECTIONS = 1024
MAX_CONFIG_BYTES = 1 << 20
MAX_PSK_BYTES = 4096
AUTH_METHODS = ("psk", "pubkey")
MAX_FILES = 32  # entries of ca_files / crl_files
DEFAULT_FRAGMENT_SIZE = 1280  # strongSwan's charon.fragment_size
MIN_FRAGMENT_SIZE = 576  # RFC 7383 §2.5.1: IPv4 hosts must accept 576-octet packets


class ConfigError(ValueError):
    """An invalid keymgr configuration (the message never contains a secret)."""


def _show(value: object) -> str:
    """A short, safe rendering of an offending value for an error message."""
    text = repr(value) if isinstance(value, str) else type(value).__name__
    return text if len(text) <= 48 else text[:45] + "..."


def _ipv4(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{what}: expected an IPv4 address string")
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise ConfigError(f"{what}: not an IPv4 address: {_show(value)}") from None


def _identity(value: object, what: str, *, allow_any: bool) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{what}: expected an identity string")
    if value.strip() == "%any":
        if allow_any:
            return value
        raise ConfigError(f"{what}: %any is only allowed for the remote identity")
    try:
        Identity.parse(value)
    except ValueError:
        raise ConfigError(f"{what}: not a valid identity: {_show(value)}") from None
    return value


def _prefix(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{what}: expected an IPv4 prefix string")
    try:
        return str(ipaddress.IPv4Network(value, strict=True))
    except ValueError:
        raise ConfigError(f"{what}: not an IPv4 prefix: {_show(value)}") from None


@dataclass(frozen=True)
class Connection:
    """One IKEv2 connection with one Child SA (tunnel mode, one IPv4 prefix per side)."""

    name: str
    local_addr: str
    remote_addr: str
    psk_file: pathlib.Path | None
    local_ts: str
    remote_ts: str
    local_id: str | None = None
    remote_id: str | None = None
    start_action: str = "start"
    auth: str = "psk"
    cert_file: pathlib.Path | None = None
    key_file: pathlib.Path | None = None
    ca_files: tuple[pathlib.Path, ...] = ()
    crl_files: tuple[pathlib.Path, ...] = ()
    fragment_size: int = DEFAULT_FRAGMENT_SIZE

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError("connection name must be a non-empty string")
        if len(self.name) > MAX_NAME_LEN or not self.name.isprintable():
            raise ConfigError(
                f"connection name must be at most {MAX_NAME_LEN} printable characters"
            )
        w = f"connection {self.name!r}"
        if self.auth not in AUTH_METHODS:
            raise ConfigError(f"{w} auth must be one of {AUTH_METHODS}")
        if self.auth == "psk" and not isinstance(self.psk_file, pathlib.Path):
            raise ConfigError(f"{w} psk_file must be a path (auth psk)")
        if self.auth == "pubkey":
            for attr in ("cert_file", "key_file"):
                if not isinstance(getattr(self, attr), pathlib.Path):
                    raise ConfigError(f"{w} {attr} must be a path (auth pubkey)")
            if not self.ca_files:
                raise ConfigError(f"{w} ca_files must name at least one CA (auth pubkey)")
        for attr in ("ca_files", "crl_files"):
            files = getattr(self, attr)
            if not isinstance(files, tuple) or not all(isinstance(f, pathlib.Path) for f in files):
                raise ConfigError(f"{w} {attr} must be a tuple of paths")
        fs = self.fragment_size
        if (
            not isinstance(fs, int)
            or isinstance(fs, bool)
            or not (fs == 0 or MIN_FRAGMENT_SIZE <= fs <= 65535)
        ):
            raise ConfigError(f"{w} fragment_size must be 0 or {MIN_FRAGMENT_SIZE}..65535")
        _ipv4(self.local_addr, f"{w} local_addr")
        _ipv4(self.remote_addr, f"{w} remote_addr")
        if self.local_id is not None:
            _identity(self.local_id, f"{w} local_id", allow_any=False)
        if self.remote_id is not None:
            _identity(self.remote_id, f"{w} remote_id", allow_any=True)
        _prefix(self.local_ts, f"{w} local_ts")
        _prefix(self.remote_ts, f"{w} remote_ts")
        if not isinstance(self.start_action, str) or self.start_action not in START_ACTIONS:
            raise ConfigError(f"{w} start_action must be one of {START_ACTIONS}")

    @property
    def responds(self) -> bool:
        """keymgr answers this peer's IKE_SA_INIT instead of initiating."""
        return self.start_action in RESPONDER_ACTIONS

    def ts_range(self, which: str) -> tuple[str, str]:
        """The local or remote traffic selector as an inclusive (first, last) address range."""
        net = ipaddress.IPv4Network(self.local_ts if which == "local" else self.remote_ts)
        return str(net.network_address), str(net.broadcast_address)

    def read_psk(self) -> bytes:
        """The pre-shared key from ``psk_file`` (never logged, never in repr)."""
        if self.psk_file is None:
            raise ConfigError(f"connection {self.name!r} has no psk_file")
        try:
            with self.psk_file.open("rb") as f:
                raw = f.read(MAX_PSK_BYTES + 1)
        except (OSError, ValueError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
            raise ConfigError(
                f"connection {self.name!r}: cannot read psk_file {_show(str(self.psk_file))}: "
                f"{reason}"
            ) from None
        if len(raw) > MAX_PSK_BYTES:
            raise ConfigError(f"connection {self.name!r}: psk_file exceeds {MAX_PSK_BYTES} bytes")
        raw = raw.strip()
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
    "auth",
    "cert_file",
    "key_file",
    "ca_files",
    "crl_files",
    "fragment_size",
}


def _path(value: object, what: str, base: pathlib.Path | None) -> pathlib.Path:
    if not isinstance(value, str) or not value or len(value) > MAX_PATH_LEN:
        raise ConfigError(f"connection {what} must be a non-empty path string")
    if "\x00" in value:
        raise ConfigError(f"connection {what} must not contain NUL")
    p = pathlib.Path(value)
    if base is not None and not p.is_absolute():
        p = base / p
    return p


def _paths(value: object, what: str, base: pathlib.Path | None) -> tuple[pathlib.Path, ...]:
    if not isinstance(value, list) or len(value) > MAX_FILES:
        raise ConfigError(f"connection {what} must be a list of at most {MAX_FILES} paths")
    return tuple(_path(v, what, base) for v in value)


def connection_from_dict(d: Mapping[str, Any], *, base: pathlib.Path | None = None) -> Connection:
    """Build a Connection from a JSON object; relative psk_file paths resolve against ``base``."""
    if not isinstance(d, Mapping):
        raise ConfigError("each connection must be a JSON object")
    unknown = set(d) - _FIELDS
    if unknown:
        shown = ", ".join(_show(k) for k in sorted(unknown)[:5])
        raise ConfigError(f"unknown connection field(s): {shown}")
    auth = d.get("auth", "psk")
    if auth not in AUTH_METHODS:
        raise ConfigError(f"connection auth must be one of {AUTH_METHODS}")
    required = {"name", "local_addr", "remote_addr", "local_ts", "remote_ts"}
    required |= {"psk_file"} if auth == "psk" else {"cert_file", "key_file", "ca_files"}
    missing = required - set(d)
    if missing:
        raise ConfigError(f"connection lacks field(s): {sorted(missing)}")
    psk = _path(d["psk_file"], "psk_file", base) if "psk_file" in d else None
    cert = _path(d["cert_file"], "cert_file", base) if "cert_file" in d else None
    key = _path(d["key_file"], "key_file", base) if "key_file" in d else None
    cas = _paths(d["ca_files"], "ca_files", base) if "ca_files" in d else ()
    crls = _paths(d["crl_files"], "crl_files", base) if "crl_files" in d else ()
    for k in ("local_id", "remote_id"):
        if k in d and d[k] is None:
            raise ConfigError(f"connection {k} must be an identity string when present")
    return Connection(
        name=d["name"],
        local_addr=d["local_addr"],
        remote_addr=d["remote_addr"],
        psk_file=psk,
        local_ts=d["local_ts"],
        remote_ts=d["remote_ts"],
        local_id=d.get("local_id"),
        remote_id=d.get("remote_id"),
        start_action=d.get("start_action", "start"),
        auth=auth,
        cert_file=cert,
        key_file=key,
        ca_files=cas,
        crl_files=crls,
        fragment_size=d.get("fragment_size", DEFAULT_FRAGMENT_SIZE),
    )


def load_config(path: pathlib.Path, *, check_psk: bool = True) -> KeymgrConfig:
    """Parse the JSON configuration file.

    With ``check_psk`` every connection's psk_file (or its certificate, key, CA and CRL files)
    must be readable and valid now (the content is discarded: it is read again when the
    connection starts, so a rotated secret or certificate is used).
    Any problem raises :class:`ConfigError`, whose message never contains the PSK.
    """
    try:
        with path.open("rb") as f:
            blob = f.read(MAX_CONFIG_BYTES + 1)
    except (OSError, ValueError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
        raise ConfigError(f"cannot read config {path}: {reason}") from None
    if len(blob) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config {path} is larger than {MAX_CONFIG_BYTES} bytes")
    return config_from_json(blob, base=path.parent, check_psk=check_psk)


def config_from_json(
    blob: bytes | str, *, base: pathlib.Path | None = None, check_psk: bool = True
) -> KeymgrConfig:
    """Parse a JSON document (see the module docstring) into a :class:`KeymgrConfig`."""
    try:
        doc = json.loads(blob)
    except json.JSONDecodeError as e:
        raise ConfigError(f"config is not valid JSON: {e.msg} at line {e.lineno}") from None
    except (ValueError, RecursionError) as e:  # bad UTF-8, huge integers, deep nesting
        raise ConfigError(f"config is not valid JSON ({type(e).__name__})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("connections"), list):
        raise ConfigError("config must be an object with a 'connections' list")
    if len(doc["connections"]) > MAX_CONNECTIONS:
        raise ConfigError(f"more than {MAX_CONNECTIONS} connections")
    cfg = KeymgrConfig(tuple(connection_from_dict(c, base=base) for c in doc["connections"]))
    if check_psk:
        from services.keymgr.credentials import authentication  # here: credentials imports us

        for c in cfg.connections:
            authentication(c)  # the PSK, or certificates, keys and CRLs, read and discarded
    return cfg
