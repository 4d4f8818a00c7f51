"""``tower.toml``: where the tower listens and where its certificates, tokens and audit log live.

Relative paths are taken relative to the directory holding ``tower.toml``, so a
tower directory can be moved or mounted elsewhere as a whole.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from supctl.errors import UsageError
from supctl.tower.limits import DEFAULT_KEEPALIVE, Limits, parse_keepalive
from supctl.tower.store import atomic_write

CONFIG_NAME = "tower.toml"
DEFAULT_LISTEN = "127.0.0.1:4646"  # loopback by default: exposing the tower is a decision
DEFAULT_FILES = {
    "cert": "server.pem",
    "key": "server-key.pem",
    "ca": "ca.pem",
    "state": "state.json",
    "audit": "audit.jsonl",
    "users": "users.json",
    "policies": "policies.toml",
    "database": "tower.db",
}

_HOSTNAME_RE = re.compile(
    r"(?=.{1,253}\Z)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)


@dataclass(frozen=True)
class TowerConfig:
    """A loaded ``tower.toml``; every path is absolute."""

    cert: Path
    key: Path
    ca: Path
    state: Path  # before the store: admin and site tokens (control-tower migrate imports it)
    audit: Path  # the append-only audit log (docs/audit.md)
    users: Path  # before the store: users and their tokens (control-tower migrate imports it)
    policies: Path  # watched by a running tower and applied to the store (docs/policies.md)
    database: Path  # the store, SQLite, when store_url is None (docs/store.md)
    listen: str = DEFAULT_LISTEN
    insecure: bool = False  # serve plain ws:// (no TLS); the CLI's --insecure does the same
    keepalive: float = DEFAULT_KEEPALIVE  # WebSocket ping interval and timeout; 0 = off
    limits: Limits = field(default_factory=Limits)  # [limits] (docs/tower.md)
    login_expiry: str = "8h"  # lifetime of a login token (and of each renewal)
    store_url: str | None = None  # [store] url: postgresql://USER@HOST/DB (or sqlite:///PATH)
    store_password_file: Path | None = None  # [store] password-file; else $SUPCTL_STORE_PASSWORD


def valid_hostname(name: str) -> bool:
    """A DNS name of letters, digits and inner hyphens (no wildcards, no trailing dot)."""
    return _HOSTNAME_RE.fullmatch(name) is not None and re.fullmatch(r"[0-9.]+", name) is None


def parse_listen(text: str) -> tuple[str, int]:
    """Split ``HOST:PORT``, ``[IPV6]:PORT`` or ``:PORT`` into (host, port).

    The host of ``:PORT`` is ``""``, which asyncio and websockets take as "all
    interfaces".  Port 0 asks the kernel for a free port.
    """
    bad = UsageError(f"bad listen address {text!r}: use HOST:PORT, [IPV6]:PORT or :PORT")
    host, sep, port_text = text.rpartition(":")
    if not sep or not re.fullmatch(r"[0-9]{1,5}", port_text) or int(port_text) > 65535:
        raise bad
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise bad from None
    elif host:
        # An unbracketed IPv6 address is ambiguous ("::1:4646"); dotted digits must be IPv4.
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            if not valid_hostname(host):
                raise bad from None
    return host, int(port_text)


def load_config(path: str | os.PathLike[str]) -> TowerConfig:
    """Read and check ``tower.toml``; every problem is a one-line :class:`UsageError`."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise UsageError(f"config file {p} not found (run control-tower init)") from None
    except OSError as e:
        raise UsageError(f"cannot read config file {p}: {e.strerror}") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise UsageError(f"bad config file {p}: {e}") from None

    # Unknown keys are errors: a misspelt "insecure" must not be silently ignored.
    known = {*DEFAULT_FILES, "listen", "insecure", "keepalive", "limits", "login-expiry", "store"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UsageError(f"bad config file {p}: unknown key {unknown[0]!r}")
    base = p.absolute().parent
    files: dict[str, Path] = {}
    for name, default in DEFAULT_FILES.items():
        value = data.get(name, default)
        if not isinstance(value, str) or not value:
            raise UsageError(f"bad config file {p}: {name!r} must be a non-empty string")
        files[name] = base / Path(value).expanduser()  # an absolute value wins over base
    listen = data.get("listen", DEFAULT_LISTEN)
    if not isinstance(listen, str):
        raise UsageError(f"bad config file {p}: 'listen' must be a string")
    try:
        parse_listen(listen)
    except UsageError as e:
        raise UsageError(f"bad config file {p}: {e}") from None
    insecure = data.get("insecure", False)
    if not isinstance(insecure, bool):
        raise UsageError(f"bad config file {p}: 'insecure' must be true or false")
    keepalive = parse_keepalive(data.get("keepalive", DEFAULT_KEEPALIVE), str(p))
    limits = Limits.parse(data.get("limits", {}), str(p))
    login_expiry = data.get("login-expiry", "8h")
    if not isinstance(login_expiry, str) or not re.fullmatch(r"[1-9][0-9]*[smhd]", login_expiry):
        raise UsageError(f"bad config file {p}: 'login-expiry' must be like \"8h\" (s, m, h or d)")
    store_url, store_password_file = _parse_store(data.get("store", {}), p, base)
    return TowerConfig(
        store_url=store_url,
        store_password_file=store_password_file,
        listen=listen,
        insecure=insecure,
        keepalive=keepalive,
        limits=limits,
        login_expiry=login_expiry,
        **files,
    )


def _parse_store(raw: object, p: Path, base: Path) -> tuple[str | None, Path | None]:
    """``[store]``: ``url`` (never with a password) and ``password-file``."""
    if not isinstance(raw, dict):
        raise UsageError(f"bad config file {p}: 'store' must be a table")
    unknown = sorted(set(raw) - {"url", "password-file"})
    if unknown:
        raise UsageError(f"bad config file {p}: unknown key 'store.{unknown[0]}'")
    url = raw.get("url")
    if url is not None and (not isinstance(url, str) or not url):
        raise UsageError(f"bad config file {p}: 'store.url' must be a non-empty string")
    if url is not None:
        _scheme, sep, rest = url.partition("://")
        if sep and ":" in rest.split("/", 1)[0].rpartition("@")[0]:
            raise UsageError(
                f"bad config file {p}: 'store.url' must not contain a password:"
                " use store.password-file or the environment (SUPCTL_STORE_PASSWORD)"
            )
    password_file = raw.get("password-file")
    if password_file is not None and (not isinstance(password_file, str) or not password_file):
        raise UsageError(f"bad config file {p}: 'store.password-file' must be a non-empty string")
    return url, base / Path(password_file).expanduser() if password_file is not None else None


def toml_string(value: str) -> str:
    """``value`` as a TOML basic string.

    JSON string escapes are a subset of TOML's, except that TOML also requires
    DEL to be escaped; ``ensure_ascii=False`` avoids the surrogate-pair escapes
    TOML forbids.
    """
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")


def write_default_config(directory: str | os.PathLike[str], *, listen: str = DEFAULT_LISTEN) -> Path:
    """Write ``DIRECTORY/tower.toml`` naming the files ``control-tower init`` creates."""
    parse_listen(listen)
    lines = [
        "# control-tower configuration. Relative paths are relative to this file's directory.",
        "",
        "# HOST:PORT, [IPV6]:PORT, or :PORT for all interfaces. --listen overrides it.",
        f"listen = {toml_string(listen)}",
        "",
        "# TLS server certificate and key, and the CA clients use to verify them.",
        *(f"{name} = {toml_string(DEFAULT_FILES[name])}" for name in ("cert", "key", "ca")),
        "",
        "# The store (SQLite): admin, site, login and API tokens (hashed), users, policy sets.",
        '# [store] url = "postgresql://USER@HOST/DB" uses PostgreSQL instead (docs/store.md).',
        f"database = {toml_string(DEFAULT_FILES['database'])}",
        "",
        "# Append-only JSON-lines audit log (mode 0600), one record per session and stream (docs/audit.md).",
        f"audit = {toml_string(DEFAULT_FILES['audit'])}",
        "",
        "# Named policies, default deny (docs/policies.md); optional: a running tower applies",
        "# it to the store when it changes (or use control-tower policy apply).",
        f"policies = {toml_string(DEFAULT_FILES['policies'])}",
        "",
        "# Lifetime of a login token; a long-running supctl renews it before it ends.",
        'login-expiry = "8h"',
        "",
        "# true serves plain ws:// without TLS (e.g. behind a TLS-terminating proxy).",
        "insecure = false",
        "",
    ]
    path = Path(directory) / CONFIG_NAME
    atomic_write(path, "\n".join(lines).encode("utf-8"), 0o644)
    return path
