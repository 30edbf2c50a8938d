"""keymgr configuration: the model (:class:`Connection`) and one file format (JSON) for it.

The model is independent of the file format so policyd can feed connections later. A JSON
file looks like::

    {"connections": [
        {"name": "site-b", "local_addr": "192.0.2.1", "remote_addr": "192.0.2.2",
         "local_id": "192.0.2.1", "remote_id": "192.0.2.2", "psk_file": "/run/secrets/psk",
         "local_ts": "198.51.100.1/32", "remote_ts": "203.0.113.1/32",
         "start_action": "start",
         "ike_proposals": ["aes256gcm16-prfsha256-x25519"], "esp_proposals": ["aes256gcm16"],
         "mode": "tunnel"}
    ]}

Addresses and traffic-selector prefixes are IPv4 or IPv6 (``local_addr`` and ``remote_addr``
of one family; ``local_ts`` and ``remote_ts`` of one family, which in transport mode must be
the addresses' family). ``local_id`` / ``remote_id`` are identities in text form
(:meth:`services.core.ike.authn.Identity.parse`: an IP address, ``@fqdn``, ``user@domain``, a
DN, ``@#hex`` key ID) and default to the addresses; ``remote_id`` may be ``"%any"`` (accept
whichever identity the peer proves, e.g. with its certificate). ``ike_proposals`` /
``esp_proposals`` are strongSwan-style proposal strings, one suite each, in order of
preference (:mod:`services.core.ike.suites`; defaults: ``aes256gcm16-prfsha256-x25519`` and
``aes256gcm16``); SHA-1, MODP-1024 and 3DES need ``"allow_legacy": true``. ``ah_proposals``
(integrity-only suites such as ``sha256``, ``sha512-esn``, ``sha256-x25519``) makes the Child
SA an AH one (RFC 4302) instead of ESP; a connection gives either ``esp_proposals`` or
``ah_proposals`` (no ESP+AH bundles). AH cannot cross NAT: such a Child SA fails when NAT is
detected. ``mode`` is ``"tunnel"`` (default) or ``"transport"``.
``start_action`` is ``"start"`` (keymgr initiates at once), ``"trap"`` (keymgr installs the
connection's PROTECT policy without SAs; the first matching packet makes the worker report an
ACQUIRE and keymgr initiates then) or ``"none"`` / ``"respond"`` (keymgr only answers the peer's
IKE_SA_INIT arriving from ``remote_addr`` at ``local_addr``). The PSK lives in
its own file (a Kubernetes Secret mount); its content is read only when a connection starts and
never logged. A PSK file holding ``0x<hex>`` is decoded as hex (strongSwan's notation), anything
else is used as the raw octets with surrounding whitespace removed.

``auth`` is ``"psk"`` (default; ``psk_file`` required) or ``"pubkey"``: certificates, with
``cert_file`` (PEM or DER; our certificate first, then intermediates to send), ``key_file``
(its private key, PEM or DER, unencrypted), ``ca_files`` (a list of trusted CA certificate
files) and optionally ``crl_files`` (a list of CRL files). Relative paths resolve against the
config file's directory. ``fragment_size`` is the largest IP packet of an IKE fragment (RFC
7383; default 1280 as in strongSwan, 0 disables fragmentation).

Lifetimes and liveness (all optional; seconds, 0 = off) follow strongSwan's swanctl.conf
names: ``rekey_time`` (CHILD SA rekey, default 3600), ``life_time`` (CHILD SA hard lifetime,
default 110 % of ``rekey_time``), ``rand_time`` (the rekey happens up to this much earlier at
random, default ``life_time - rekey_time``), ``rekey_bytes`` / ``rekey_packets`` (CHILD SA soft
limits enforced by the worker, default off), ``ike_rekey_time`` (IKE SA rekey, default 14400,
up to 10 % earlier at random), ``dpd_delay`` (liveness check after that much silence from the
peer, default off), ``dpd_action`` (``clear``, ``restart``, ``hold`` or ``trap``: what happens
when the peer is found dead, default ``clear``), ``retransmit_timeout`` / ``retransmit_tries``
(first retransmission after 1 s, doubled each time, 5 sends before the peer is dead).

``keepalive`` (seconds, default 20 as in strongSwan, 0 = off, at most 3600): when NAT detection
finds US behind a NAT, the outbound ESP-in-UDP SAs are installed with this NAT keepalive
interval (RFC 3948 §2.3, §4); the worker sends a keepalive after that much silence on the SA.
Child SAs: without ``children`` a connection has one Child SA named after it, made of
``local_ts`` / ``remote_ts`` / ``esp_proposals`` / ``mode`` / ``start_action`` and the CHILD SA
lifetimes. ``children`` is a list of objects ``{"name", "local_ts", "remote_ts",
"esp_proposals", "mode", "start_action", "rekey_time", "life_time", "rand_time",
"rekey_bytes", "rekey_packets"}`` (:class:`ChildConfig`); each field but ``name`` is optional
and inherits the connection's value (top-level ``local_ts`` / ``remote_ts`` then default to the
first child's). The first child is negotiated in IKE_AUTH, the others with CREATE_CHILD_SA
(RFC 7296 §1.3.1). Child names are unique within a connection.

``reqid`` (optional, 1..2^32-1) on a connection (its first Child SA) and on ``children`` items
fixes the reqid that ties a Child SA's SAs to the worker's PROTECT entry (RFC 4301 §4.4.1: the
SPD entry names its SA bundle); policyd's compiled connections carry theirs. Without one keymgr
numbers positionally (:func:`connection_reqids`); all reqids must be unique.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import math
import pathlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

from services.core.ike.authn import Identity
from services.core.ike.suites import (
    DEFAULT_ESP,
    DEFAULT_IKE,
    EspSuite,
    IkeSuite,
    SuiteError,
    parse_ah_list,
    parse_esp_list,
    parse_ike_list,
)
from services.core.policy import ConnectionSpec
from services.core.sa import Mode

START_ACTIONS = ("start", "trap", "none", "respond")
DPD_ACTIONS = ("clear", "restart", "hold", "trap")
MODES = ("tunnel", "transport")
ANY_ID = "%any"
MAX_ID_TEXT = 512
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
MAX_CHILDREN = 8  # configured Child SAs per connection (the core's MAX_CHILD_SAS live ones)


ESP_AND_AH = (
    "{w}: give either esp_proposals or ah_proposals, not both (a Child SA is ESP or AH; "
    "ESP+AH bundles are not supported)"
)


class ConfigError(ValueError):
    """An invalid keymgr configuration (the message never contains a secret)."""


def _show(value: object) -> str:
    """A short, safe rendering of an offending value for an error message."""
    text = repr(value) if isinstance(value, str) else type(value).__name__
    return text if len(text) <= 48 else text[:45] + "..."


def _ip(value: object, what: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if not isinstance(value, str):
        raise ConfigError(f"{what}: expected an IPv4 or IPv6 address string")
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        raise ConfigError(f"{what}: not an IP address: {_show(value)}") from None


def _prefix(value: object, what: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if not isinstance(value, str):
        raise ConfigError(f"{what}: expected an IPv4 or IPv6 prefix string")
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError:
        raise ConfigError(f"{what}: not an IP prefix: {_show(value)}") from None


def _identity(value: object, what: str, *, any_ok: bool) -> None:
    if not isinstance(value, str) or len(value) > MAX_ID_TEXT:
        raise ConfigError(f"{what}: expected an identity string")
    if value.strip() == ANY_ID:
        if any_ok:
            return
        raise ConfigError(f"{what}: {ANY_ID} is only allowed for the remote identity (remote_id)")
    try:
        Identity.parse(value)
    except (ValueError, UnicodeError):
        raise ConfigError(f"{what}: not a valid identity: {_show(value)}") from None


def _proposals(value: object, what: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise ConfigError(f"{what}: expected a list of proposal strings")
    if not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{what}: every proposal must be a string")
    return tuple(value)


DEFAULT_KEEPALIVE = 20.0  # RFC 3948 §4 suggests 20 s (strongSwan's default too)
MAX_KEEPALIVE = 3600.0  # what the worker accepts


def _seconds(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{what}: expected a number of seconds")
    if not math.isfinite(value) or not 0 <= value <= 1e9:
        raise ConfigError(f"{what}: must be from 0 to 1e9 seconds")
    return float(value)


@functools.lru_cache(maxsize=1024)
def _prefix_range(prefix: str) -> tuple[str, str]:
    """A prefix as an inclusive (first, last) address range (asked for per IKE SA)."""
    net = ipaddress.ip_network(prefix)
    return str(net.network_address), str(net.broadcast_address)


def _name(value: object, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{what} must be a non-empty string")
    if len(value) > MAX_NAME_LEN or not value.isprintable():
        raise ConfigError(f"{what} must be at most {MAX_NAME_LEN} printable characters")
    return value


@dataclass(frozen=True)
class ChildConfig:
    """One Child SA of a connection (one prefix per side). Fields left None inherit the
    connection's values (:attr:`Connection.child_configs` resolves them)."""

    name: str
    local_ts: str | None = None
    remote_ts: str | None = None
    esp_proposals: tuple[str, ...] | None = None
    mode: str | None = None
    start_action: str | None = None
    rekey_time: float | None = None
    life_time: float | None = None
    rand_time: float | None = None
    rekey_bytes: int | None = None
    rekey_packets: int | None = None
    reqid: int | None = None  # None: keymgr's positional numbering (connection_reqids)


_CHILD_FIELDS = {f.name for f in fields(ChildConfig)}
_NOT_INHERITED = {"name", "reqid"}  # a child's reqid is its own, never the connection's


@dataclass(frozen=True)
class Connection:
    """One IKEv2 connection: its IKE SA and one or more Child SAs (one prefix per side each;
    see the module docstring). The top-level Child SA fields describe the only Child SA when
    ``children`` is empty, and are the defaults of ``children`` otherwise."""

    name: str
    local_addr: str
    remote_addr: str
    psk_file: pathlib.Path | None
    local_ts: str
    remote_ts: str
    local_id: str | None = None
    remote_id: str | None = None
    start_action: str = "start"
    ike_proposals: tuple[str, ...] = (DEFAULT_IKE.name,)
    esp_proposals: tuple[str, ...] = (DEFAULT_ESP.name,)
    ah_proposals: tuple[str, ...] = ()  # set: the Child SA is AH (esp_proposals left default)
    mode: str = "tunnel"
    allow_legacy: bool = False
    # lifetimes and liveness (seconds; 0 = off), see the module docstring
    rekey_time: float = 3600.0
    life_time: float | None = None
    rand_time: float | None = None
    rekey_bytes: int = 0
    rekey_packets: int = 0
    ike_rekey_time: float = 14400.0
    dpd_delay: float = 0.0
    dpd_action: str = "clear"
    retransmit_timeout: float = 1.0
    retransmit_tries: int = 5
    auth: str = "psk"
    cert_file: pathlib.Path | None = None
    key_file: pathlib.Path | None = None
    ca_files: tuple[pathlib.Path, ...] = ()
    crl_files: tuple[pathlib.Path, ...] = ()
    fragment_size: int = DEFAULT_FRAGMENT_SIZE
    keepalive: float = DEFAULT_KEEPALIVE  # NAT keepalives when we are behind a NAT; 0 = off
    children: tuple[ChildConfig, ...] = field(default=())
    reqid: int | None = None  # the first Child SA's reqid; None: positional (connection_reqids)

    def __post_init__(self) -> None:
        _name(self.name, "connection name")
        w = f"connection {self.name!r}"
        self._check(w)
        _reqid(self.reqid, f"{w} reqid")
        if not isinstance(self.children, tuple) or not all(
            isinstance(ch, ChildConfig) for ch in self.children
        ):
            raise ConfigError(f"{w} children must be a tuple of ChildConfig")
        if len(self.children) > MAX_CHILDREN:
            raise ConfigError(f"{w} children: at most {MAX_CHILDREN} Child SAs")
        seen: set[str] = set()
        for i, ch in enumerate(self.children):
            _name(ch.name, f"{w} children[{i}].name")
            if ch.name in seen:
                raise ConfigError(f"{w} children[{i}].name: duplicate child name {ch.name!r}")
            seen.add(ch.name)
            _reqid(ch.reqid, f"{w} children[{i}].reqid")
            if ch.esp_proposals is not None:
                _proposals(ch.esp_proposals, f"{w} children[{i}].esp_proposals")
            try:
                self._child_view(ch)  # validated like a connection of its own
            except ConfigError as e:
                why = str(e).removeprefix(w).lstrip(": ")
                raise ConfigError(f"{w} children[{i}] ({ch.name!r}): {why}") from None

    def _child_view(self, ch: ChildConfig) -> Connection:
        """This connection with child ``ch``'s fields (inherited ones as they are)."""
        over = {
            k: getattr(ch, k) for k in _CHILD_FIELDS - _NOT_INHERITED if getattr(ch, k) is not None
        }
        return replace(self, children=(), **over)

    @property
    def child_configs(self) -> tuple[ChildConfig, ...]:
        """Every Child SA with its fields resolved (the first is negotiated in IKE_AUTH)."""
        chosen = self.children or (ChildConfig(self.name),)
        out: list[ChildConfig] = []
        for ch in chosen:
            v = self._child_view(ch)
            out.append(
                ChildConfig(
                    ch.name,
                    v.local_ts,
                    v.remote_ts,
                    v.esp_proposals,
                    v.mode,
                    v.start_action,
                    v.rekey_time,
                    v.child_life_time,
                    v.child_rand_time,
                    v.rekey_bytes,
                    v.rekey_packets,
                    ch.reqid,
                )
            )
        return tuple(out)

    def child(self, name: str) -> Connection:
        """This connection as seen by its Child SA ``name``: the child's selectors, ESP
        proposals, mode, start_action and lifetimes in place of the top-level ones (no
        ``children``). LookupError if it has no such child."""
        for ch in self.children or (ChildConfig(self.name),):
            if ch.name == name:
                return self._child_view(ch)
        raise LookupError(f"connection {self.name!r} has no child {name!r}")

    @property
    def child_names(self) -> tuple[str, ...]:
        return tuple(ch.name for ch in self.children) or (self.name,)

    def _check(self, w: str) -> None:
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
        la = _ip(self.local_addr, f"{w} local_addr")
        ra = _ip(self.remote_addr, f"{w} remote_addr")
        if la.version != ra.version:
            raise ConfigError(f"{w}: local_addr and remote_addr are of different IP versions")
        for attr in ("local_id", "remote_id"):
            v = getattr(self, attr)
            if v is not None:
                _identity(v, f"{w} {attr}", any_ok=attr == "remote_id")
        lt = _prefix(self.local_ts, f"{w} local_ts")
        rt = _prefix(self.remote_ts, f"{w} remote_ts")
        if lt.version != rt.version:
            raise ConfigError(f"{w}: local_ts and remote_ts are of different IP versions")
        if not isinstance(self.start_action, str) or self.start_action not in START_ACTIONS:
            raise ConfigError(f"{w} start_action must be one of {START_ACTIONS}")
        if not isinstance(self.mode, str) or self.mode not in MODES:
            raise ConfigError(f"{w} mode must be one of {MODES}")
        if self.mode == "transport" and lt.version != la.version:
            raise ConfigError(
                f"{w}: transport mode needs traffic selectors of the addresses' family"
            )
        if not isinstance(self.allow_legacy, bool):
            raise ConfigError(f"{w} allow_legacy must be true or false")
        for attr in ("ike_proposals", "esp_proposals", "ah_proposals"):
            _proposals(getattr(self, attr), f"{w} {attr}")
        if self.ah_proposals and tuple(self.esp_proposals) != (DEFAULT_ESP.name,):
            raise ConfigError(ESP_AND_AH.format(w=w))
        try:
            self.ike_suites  # noqa: B018 - parse now so a bad string fails at load time
            self.esp_suites  # noqa: B018
            self.ah_suites  # noqa: B018
        except SuiteError as e:
            raise ConfigError(f"{w}: {e}") from None
        self._check_lifetimes(w)

    @property
    def ike_suites(self) -> tuple[IkeSuite, ...]:
        """The parsed ``ike_proposals`` (SuiteError if one is invalid)."""
        return parse_ike_list(list(self.ike_proposals), allow_legacy=self.allow_legacy)

    @property
    def esp_suites(self) -> tuple[EspSuite, ...]:
        """The parsed ``esp_proposals`` (SuiteError if one is invalid)."""
        return parse_esp_list(list(self.esp_proposals), allow_legacy=self.allow_legacy)

    @property
    def ah_suites(self) -> tuple[EspSuite, ...]:
        """The parsed ``ah_proposals`` (empty when not set; SuiteError if one is invalid)."""
        if not self.ah_proposals:
            return ()
        return parse_ah_list(list(self.ah_proposals), allow_legacy=self.allow_legacy)

    @property
    def child_suites(self) -> tuple[EspSuite, ...]:
        """What the Child SA offers and accepts: the AH suites when ``ah_proposals`` is set,
        else the ESP suites."""
        return self.ah_suites or self.esp_suites

    @property
    def ah(self) -> bool:
        """The connection's Child SAs are AH."""
        return bool(self.ah_proposals)

    @property
    def child_proposals(self) -> tuple[str, ...]:
        """The configured proposal strings of the Child SA (``ah_proposals`` or
        ``esp_proposals``)."""
        return self.ah_proposals or self.esp_proposals

    @property
    def sa_mode(self) -> Mode:
        return Mode.TRANSPORT if self.mode == "transport" else Mode.TUNNEL

    def _check_lifetimes(self, w: str) -> None:
        for attr in ("rekey_time", "ike_rekey_time", "dpd_delay", "retransmit_timeout"):
            _seconds(getattr(self, attr), f"{w} {attr}")
        for attr in ("life_time", "rand_time"):
            if getattr(self, attr) is not None:
                _seconds(getattr(self, attr), f"{w} {attr}")
        for attr in ("rekey_bytes", "rekey_packets"):
            v = getattr(self, attr)
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 1 << 64:
                raise ConfigError(f"{w} {attr} must be an integer from 0 to 2^64-1")
        t = self.retransmit_tries
        if not isinstance(t, int) or isinstance(t, bool) or not 1 <= t <= 20:
            raise ConfigError(f"{w} retransmit_tries must be an integer from 1 to 20")
        if self.retransmit_timeout <= 0:
            raise ConfigError(f"{w} retransmit_timeout must be positive")
        if self.rekey_time and self.child_life_time <= self.rekey_time:
            raise ConfigError(f"{w} life_time must exceed rekey_time")
        if self.child_rand_time > self.rekey_time:
            raise ConfigError(f"{w} rand_time must not exceed rekey_time")
        _seconds(self.keepalive, f"{w} keepalive")
        if self.keepalive > MAX_KEEPALIVE:
            raise ConfigError(f"{w} keepalive must be at most {MAX_KEEPALIVE:g} seconds")
        if not isinstance(self.dpd_action, str) or self.dpd_action not in DPD_ACTIONS:
            raise ConfigError(f"{w} dpd_action must be one of {DPD_ACTIONS}")

    @property
    def child_life_time(self) -> float:
        """The CHILD SA hard lifetime in seconds (0: none)."""
        if self.life_time is not None:
            return self.life_time
        return self.rekey_time * 1.1

    @property
    def child_rand_time(self) -> float:
        """Up to how many seconds before ``rekey_time`` a CHILD SA rekey may start."""
        if self.rand_time is not None:
            return self.rand_time
        return max(0.0, self.child_life_time - self.rekey_time) if self.rekey_time else 0.0

    @property
    def responds(self) -> bool:
        """keymgr answers this peer's IKE_SA_INIT instead of initiating."""
        return self.start_action in RESPONDER_ACTIONS

    def ts_range(self, which: str) -> tuple[str, str]:
        """The local or remote traffic selector as an inclusive (first, last) address range."""
        return _prefix_range(self.local_ts if which == "local" else self.remote_ts)

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
        connection_reqids(self.connections)  # ConfigError for clashing reqids

    @property
    def reqids(self) -> dict[str, tuple[int, ...]]:
        """The reqid of every connection's Child SAs (see :func:`connection_reqids`)."""
        return connection_reqids(self.connections)


MAX_REQID = (1 << 32) - 1


def _reqid(value: object, what: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_REQID:
        raise ConfigError(f"{what} must be an integer in 1..{MAX_REQID} (or left out)")


def connection_reqids(connections: Sequence[Connection]) -> dict[str, tuple[int, ...]]:
    """The reqid of each connection's Child SAs, in ``child_names`` order: the explicit one
    (``children[i].reqid``; for the first child also the connection's ``reqid``), else keymgr's
    positional numbering: a connection's first child gets its position + 1, the connection's
    further children follow all connections, in order. Every reqid must be unique: a clash
    between explicit reqids, or between an explicit one and the positional number another
    child gets, raises ConfigError naming both (give the other child an explicit reqid, or
    pick another value)."""
    owner: dict[int, str] = {}
    out: dict[str, tuple[int, ...]] = {}

    def take(reqid: int, who: str) -> int:
        if reqid in owner:
            raise ConfigError(
                f"{who}: reqid {reqid} is also the reqid of {owner[reqid]}; reqids must be "
                "unique (a child without an explicit reqid gets a positional one: its "
                "connection's position + 1, further children after all connections)"
            )
        owner[reqid] = who
        return reqid

    explicit: dict[tuple[str, int], int] = {}
    for c in connections:
        kids = c.children or (ChildConfig(c.name),)
        first = kids[0].reqid
        if c.reqid is not None and first is not None and first != c.reqid:
            raise ConfigError(
                f"connection {c.name!r}: reqid {c.reqid} and children[0].reqid {first} differ "
                "(the first child's reqid is the connection's; give one of them)"
            )
        for j, ch in enumerate(kids):
            value = ch.reqid if ch.reqid is not None else (c.reqid if j == 0 else None)
            if value is not None:
                where = "reqid" if j == 0 and ch.reqid is None else f"children[{j}].reqid"
                explicit[(c.name, j)] = take(value, f"connection {c.name!r} {where}")
    extra = len(connections)
    ids: dict[str, list[int]] = {}
    for i, c in enumerate(connections):
        lst = ids.setdefault(c.name, [])
        for j, child in enumerate(c.child_names):
            if (c.name, j) in explicit:
                lst.append(explicit[(c.name, j)])
                continue
            if j == 0:
                pos = i + 1
            else:
                extra += 1
                pos = extra
            lst.append(take(pos, f"connection {c.name!r} child {child!r} (positional)"))
    for name, lst in ids.items():
        out[name] = tuple(lst)
    return out


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
    "ike_proposals",
    "esp_proposals",
    "ah_proposals",
    "mode",
    "allow_legacy",
    "auth",
    "cert_file",
    "key_file",
    "ca_files",
    "crl_files",
    "fragment_size",
    "reqid",
}
_LIFETIME_FIELDS = {
    "rekey_time",
    "life_time",
    "rand_time",
    "rekey_bytes",
    "rekey_packets",
    "ike_rekey_time",
    "dpd_delay",
    "dpd_action",
    "retransmit_timeout",
    "retransmit_tries",
    "keepalive",
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
    unknown = set(d) - _FIELDS - _LIFETIME_FIELDS - {"children"}
    if unknown:
        shown = ", ".join(_show(k) for k in sorted(unknown)[:5])
        raise ConfigError(f"unknown connection field(s): {shown}")
    auth = d.get("auth", "psk")
    if auth not in AUTH_METHODS:
        raise ConfigError(f"connection auth must be one of {AUTH_METHODS}")
    children = _children(d.get("children"), d.get("name")) if "children" in d else ()
    d = dict(d)
    if children:  # the top-level selectors default to the first child's
        for k in ("local_ts", "remote_ts"):
            if k not in d and getattr(children[0], k) is not None:
                d[k] = getattr(children[0], k)
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
    extra: dict[str, Any] = {}
    if "esp_proposals" in d and "ah_proposals" in d:
        raise ConfigError(ESP_AND_AH.format(w=f"connection {_show(d.get('name'))}"))
    for name in ("ike_proposals", "esp_proposals", "ah_proposals"):
        if name in d:
            extra[name] = _proposals(d[name], f"connection {name}")
    if "ah_proposals" in d and not extra["ah_proposals"]:
        raise ConfigError("connection ah_proposals must not be empty (leave it out for ESP)")
    if "mode" in d:
        extra["mode"] = d["mode"]
    if "allow_legacy" in d:
        extra["allow_legacy"] = d["allow_legacy"]
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
        **{k: d[k] for k in _LIFETIME_FIELDS if k in d},
        **extra,
        auth=auth,
        cert_file=cert,
        key_file=key,
        ca_files=cas,
        crl_files=crls,
        fragment_size=d.get("fragment_size", DEFAULT_FRAGMENT_SIZE),
        children=children,
        reqid=d.get("reqid"),
    )


def _children(value: object, conn: object) -> tuple[ChildConfig, ...]:
    """The ``children`` list of a connection object (see the module docstring)."""
    w = f"connection {_show(conn)} children"
    if not isinstance(value, list) or not value or len(value) > MAX_CHILDREN:
        raise ConfigError(f"{w} must be a list of 1..{MAX_CHILDREN} child objects")
    out: list[ChildConfig] = []
    for i, item in enumerate(value):
        if not isinstance(item, Mapping):
            raise ConfigError(f"{w}[{i}] must be a JSON object")
        unknown = set(item) - _CHILD_FIELDS
        if unknown:
            shown = ", ".join(_show(k) for k in sorted(unknown)[:5])
            raise ConfigError(f"{w}[{i}]: unknown field(s): {shown}")
        if "name" not in item:
            raise ConfigError(f"{w}[{i}] lacks field 'name'")
        kw: dict[str, Any] = {k: item[k] for k in _CHILD_FIELDS if k in item}
        if "esp_proposals" in kw:
            kw["esp_proposals"] = _proposals(kw["esp_proposals"], f"{w}[{i}].esp_proposals")
        for k in ("local_ts", "remote_ts", "mode", "start_action"):
            if k in kw and not isinstance(kw[k], str):
                raise ConfigError(f"{w}[{i}].{k} must be a string")
        out.append(ChildConfig(**kw))
    return tuple(out)


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


def connection_from_spec(spec: ConnectionSpec) -> Connection:
    """The keymgr connection of a compiled negotiate rule
    (:class:`services.core.policy.ConnectionSpec`), validated like a configured one."""
    return connection_from_dict(spec.config())


def config_from_specs(specs: Sequence[ConnectionSpec]) -> KeymgrConfig:
    """keymgr's configuration for compiled connections: each Child SA with the explicit reqid
    the compiler gave it (the one its PROTECT entries carry)."""
    return KeymgrConfig(tuple(connection_from_spec(s) for s in specs))
