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
    "database": "tower.db",  # the SQLite store (the audit log) when [store] has no url
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
    state: Path
    audit: Path  # the append-only audit log (docs/audit.md)
    users: Path  # users, password hashes and hashed login/API tokens
    policies: Path  # named policies (docs/policies.md); a missing file defines none
    database: Path  # the SQLite store, when store_url is None (docs/store.md)
    listen: str = DEFAULT_LISTEN
    insecure: bool = False  # serve plain ws:// (no TLS); the CLI's --insecure does the same
    keepalive: float = DEFAULT_KEEPALIVE  # WebSocket ping interval and timeout; 0 = off
    limits: Limits = field(default_factory=Limits)  # [limits] (docs/tower.md)
    login_expiry: str = "8h"  # lifetime of a login token (and of each renewal)
    # Minimal stand-ins (issue 9: the config branch owns their parsing).
    store_url: str | None = None  # [store] url: postgresql://USER@HOST/DB; None = database
    store_password_file: Path | None = None  # [store] password-file
    audit_keep: float | None = None  # [audit] keep = "90d", in seconds; None = for ever


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
    audit_table = data.pop("audit") if isinstance(data.get("audit"), dict) else None
    audit_keep = _parse_audit(audit_table, p) if audit_table is not None else None
    store_url, store_password_file = _parse_store(data.get("store", {}), p, base)
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
    return TowerConfig(
        listen=listen,
        insecure=insecure,
        keepalive=keepalive,
        limits=limits,
        login_expiry=login_expiry,
        store_url=store_url,
        store_password_file=store_password_file,
        audit_keep=audit_keep,
        **files,
    )


_DURATION = re.compile(r"([1-9][0-9]*)([smhd])")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _parse_audit(table: dict[str, object], p: Path) -> float | None:
    """``[audit] keep = "90d"``: the retention in seconds (stand-in; the config branch owns it)."""
    unknown = sorted(set(table) - {"keep"})
    if unknown:
        raise UsageError(f"bad config file {p}: unknown key 'audit.{unknown[0]}'")
    keep = table.get("keep")
    if keep is None:
        return None
    match = _DURATION.fullmatch(keep) if isinstance(keep, str) else None
    if match is None:
        raise UsageError(f"bad config file {p}: 'audit.keep' must be like \"90d\" (s, m, h or d)")
    return float(int(match[1]) * _SECONDS[match[2]])


def _parse_store(table: object, p: Path, base: Path) -> tuple[str | None, Path | None]:
    """``[store] url`` and ``password-file`` (stand-in; the config branch owns them)."""
    if not isinstance(table, dict) or set(table) - {"url", "password-file"}:
        raise UsageError(f"bad config file {p}: [store] takes url and password-file")
    url, password_file = table.get("url"), table.get("password-file")
    if not isinstance(url, str | None) or not isinstance(password_file, str | None):
        raise UsageError(f"bad config file {p}: [store] url and password-file must be strings")
    return url, base / password_file if password_file else None


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
        "# Hashed admin and site tokens; re-read by a running tower whenever it changes.",
        f"state = {toml_string(DEFAULT_FILES['state'])}",
        "",
        "# The store (SQLite, mode 0600): the audit log, one record per session and stream (docs/audit.md).",
        f"database = {toml_string(DEFAULT_FILES['database'])}",
        "",
        "# Users with hashed passwords and hashed login/API tokens (control-tower user/token).",
        f"users = {toml_string(DEFAULT_FILES['users'])}",
        "",
        "# Named policies, default deny (docs/policies.md); the file is optional.",
        f"policies = {toml_string(DEFAULT_FILES['policies'])}",
        "",
        "# Lifetime of a login token; a long-running supctl renews it before it ends.",
        'login-expiry = "8h"',
        "",
        "# true serves plain ws:// without TLS (e.g. behind a TLS-terminating proxy).",
        "insecure = false",
        "",
        "# How long the audit log keeps a record (s, m, h or d); without keep, for ever.",
        "# [audit]",
        '# keep = "90d"',
        "",
    ]
    path = Path(directory) / CONFIG_NAME
    atomic_write(path, "\n".join(lines).encode("utf-8"), 0o644)
    return path
