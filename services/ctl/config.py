"""ipsecctl's connection settings: flags, then ``IPSECCTL_*`` environment variables, then a
TOML file (``--config``, ``IPSECCTL_CONFIG``, ``~/.config/ipsecctl.toml`` or
``/etc/ipsec/ipsecctl.toml``), then defaults (docs/ipsecctl.md, "Settings").

The bearer token comes from ``IPSECCTL_TOKEN`` or a file (``--token-file``,
``IPSECCTL_TOKEN_FILE``, ``token_file`` in the TOML file); it is never taken from the command
line (other users can read a process's arguments) and never printed.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from services.ctl.errors import UsageError

DEFAULT_POLICYD_URL = "http://127.0.0.1:8080"
DEFAULT_KEYMGR_API = "unix:/run/keymgr/api.sock"
DEFAULT_TLS_DIR = "/etc/ipsec/tls"
CONFIG_FILES = ("~/.config/ipsecctl.toml", "/etc/ipsec/ipsecctl.toml")
MAX_TOKEN = 4096
MAX_CONFIG = 64 * 1024

# TOML key -> (environment variable, default)
KEYS: dict[str, tuple[str, str | None]] = {
    "policyd_url": ("IPSECCTL_POLICYD_URL", DEFAULT_POLICYD_URL),
    "token_file": ("IPSECCTL_TOKEN_FILE", None),
    "ca_file": ("IPSECCTL_CA_FILE", None),
    "keymgr_api": ("IPSECCTL_KEYMGR_API", None),
    "tls_dir": ("IPSECCTL_TLS_DIR", DEFAULT_TLS_DIR),
    "server_name": ("IPSECCTL_SERVER_NAME", "keymgr"),
    "client_name": ("IPSECCTL_CLIENT_NAME", "admin"),
    "timeout": ("IPSECCTL_TIMEOUT", "15"),
}


@dataclass(frozen=True)
class Settings:
    policyd_url: str
    token: str | None
    ca_file: str | None
    keymgr_api: str
    keymgr_configured: bool  # set somewhere, not the default
    tls_dir: Path
    server_name: str
    client_name: str
    timeout: float

    def __repr__(self) -> str:  # the token stays out of any repr
        return f"Settings(policyd_url={self.policyd_url!r}, keymgr_api={self.keymgr_api!r})"


def _config_file(explicit: str | None) -> dict[str, object]:
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise UsageError(f"config file {path} does not exist; fix --config/IPSECCTL_CONFIG")
    else:
        found = [Path(p).expanduser() for p in CONFIG_FILES if Path(p).expanduser().is_file()]
        if not found:
            return {}
        path = found[0]
    try:
        data = path.read_bytes()
        if len(data) > MAX_CONFIG:
            raise UsageError(f"config file {path} is over {MAX_CONFIG} bytes")
        doc = tomllib.loads(data.decode("utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise UsageError(f"config file {path}: {e}") from None
    unknown = sorted(set(doc) - set(KEYS))
    if unknown:
        hint = " (put the token in a file and name it with token_file)" if "token" in doc else ""
        raise UsageError(
            f"config file {path}: unknown key(s) {', '.join(unknown)}{hint}; "
            f"known: {', '.join(KEYS)}"
        )
    for k, v in doc.items():
        if not isinstance(v, str | int | float) or isinstance(v, bool):
            raise UsageError(f"config file {path}: {k} must be a string")
    return dict(doc)


def read_token(path: str) -> str:
    """The first line of a token file (the file's content is never quoted in errors)."""
    p = Path(path).expanduser()
    try:
        with p.open("rb") as f:
            raw = f.read(MAX_TOKEN + 1)
    except OSError as e:
        raise UsageError(
            f"token file {p}: {e.strerror}; fix --token-file/IPSECCTL_TOKEN_FILE"
        ) from None
    if len(raw) > MAX_TOKEN:
        raise UsageError(f"token file {p} is over {MAX_TOKEN} bytes; it should hold one token")
    return check_token(raw.decode("utf-8", "replace").strip(), f"token file {p}")


def check_token(token: str, where: str) -> str:
    if not token:
        raise UsageError(f"{where} is empty")
    if not all(0x21 <= ord(c) <= 0x7E for c in token):
        raise UsageError(
            f"{where}: the token must be printable ASCII without spaces (not shown here)"
        )
    return token


def resolve(flags: Mapping[str, str | None], env: Mapping[str, str] | None = None) -> Settings:
    """Settings from ``flags`` (None = not given), the environment and the config file."""
    env = os.environ if env is None else env
    conf = _config_file(flags.get("config") or env.get("IPSECCTL_CONFIG"))

    def get(key: str) -> str | None:
        var, default = KEYS[key]
        for v in (flags.get(key), env.get(var), conf.get(key)):
            if v is not None and v != "":
                return str(v)
        return default

    token: str | None = None
    token_file = flags.get("token_file")
    if token_file:
        token = read_token(token_file)
    elif env.get("IPSECCTL_TOKEN"):
        token = check_token(env["IPSECCTL_TOKEN"], "IPSECCTL_TOKEN")
    elif get("token_file"):
        token = read_token(str(get("token_file")))
    try:
        timeout = float(get("timeout") or 15)
    except ValueError:
        raise UsageError(
            "timeout must be a number of seconds (--timeout/IPSECCTL_TIMEOUT)"
        ) from None
    if not 0 < timeout <= 3600:
        raise UsageError("timeout must be between 0 and 3600 seconds")
    keymgr = get("keymgr_api")
    return Settings(
        policyd_url=str(get("policyd_url")),
        token=token,
        ca_file=get("ca_file"),
        keymgr_api=keymgr or DEFAULT_KEYMGR_API,
        keymgr_configured=keymgr is not None,
        tls_dir=Path(str(get("tls_dir"))).expanduser(),
        server_name=str(get("server_name")),
        client_name=str(get("client_name")),
        timeout=timeout,
    )
