"""``tower.toml``: where the tower listens, where its certificates and store are, its limits.

Relative paths are taken relative to the directory holding ``tower.toml``, so a
tower directory can be moved or mounted elsewhere as a whole.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated
from urllib.parse import parse_qsl, urlsplit

from supctl.errors import UsageError
from supctl.plainhttp import parse_listen
from supctl.protocol.names import valid_site_name
from supctl.schema import DURATION, DURATION_TEXT, SECONDS_OR_OFF, Invalid, Rule, Source, load, parse_toml
from supctl.tower.limits import DEFAULT_DRAIN_TIMEOUT, DEFAULT_KEEPALIVE, Limits
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
    "peer-cert": "peer.pem",
    "peer-key": "peer-key.pem",
}
#: The stores ``[store] url`` may name (docs/store.md); ``+driver`` may follow the name.
STORE_SCHEMES = ("sqlite", "postgresql", "postgres")
#: Where the store's password comes from when ``[store] password-file`` is not set.
PASSWORD_ENV = "SUPCTL_STORE_PASSWORD"  # noqa: S105 - a variable name (supctl.tower.database.PASSWORD_ENV)


def _listen(text: str) -> str:
    try:
        parse_listen(text)
    except UsageError:
        raise ValueError(text) from None  # the schema's message names the key
    return text


def _store_url(text: str) -> str:
    """A store URL as :func:`supctl.tower.database.locate` takes it, without a password: the
    URL lives on disk, in a file mode 0644.  Checked here, without SQLAlchemy (start-up time)."""
    parts = urlsplit(text)
    backend = parts.scheme.partition("+")[0]
    if backend not in STORE_SCHEMES or (backend == "sqlite" and not parts.path.strip("/")):
        raise ValueError(text)
    query = {key.lower() for key, _ in parse_qsl(parts.query, keep_blank_values=True)}
    if parts.password is not None or "password" in query:
        raise Invalid(f"holds a password: put the password in [store] password-file or {PASSWORD_ENV}")
    return text


def _replica_id(text: str) -> str:
    if not valid_site_name(text):  # the same DNS-label rule as site names
        raise ValueError(text)
    return text


def _advertise(text: str) -> str:
    parts = urlsplit(text)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme != "wss" or not parts.hostname or not port or parts.path not in ("", "/") or parts.query:
        raise ValueError(text)
    return text.rstrip("/")


LISTEN = Rule("HOST:PORT, [IPV6]:PORT or :PORT", _listen)
ADVERTISE = Rule('a URL like "wss://tower-2.internal:4647"', _advertise)
REPLICA_ID = Rule("1-63 lowercase letters, digits and '-' (a DNS label)", _replica_id)
STORE_URL = Rule('a URL like "postgresql://USER@HOST/DB" or "sqlite:///PATH"', _store_url)


def check_store_url(text: str, option: str) -> str:
    """``text`` if ``[store] url`` would take it, else UsageError (one line) naming ``option``.
    A URL with a password is not echoed: it would put the secret in a terminal's scrollback."""
    try:
        return _store_url(text)
    except Invalid as error:
        raise UsageError(f"{option} {error}") from None
    except ValueError:
        raise UsageError(f"{option} {text!r}: use {STORE_URL.expected}") from None


@dataclass(frozen=True)
class TowerConfig:
    """A loaded ``tower.toml``, and its schema (:mod:`supctl.schema`); every path is
    absolute once loaded."""

    cert: Path = field(default=Path(DEFAULT_FILES["cert"]))
    key: Path = field(default=Path(DEFAULT_FILES["key"]))
    ca: Path = field(default=Path(DEFAULT_FILES["ca"]))
    # The files of towers before the store (tokens, users, audit log): `control-tower
    # migrate` imports them.
    state: Path = field(default=Path(DEFAULT_FILES["state"]))
    audit: Path = field(
        default=Path(DEFAULT_FILES["audit"]), metadata={"key": "audit.file", "legacy": "audit"}
    )
    users: Path = field(default=Path(DEFAULT_FILES["users"]))
    # Named policies (docs/policies.md), optional: a running tower watches the file and
    # applies it to the store when it changes.
    policies: Path = field(default=Path(DEFAULT_FILES["policies"]))
    # The store (docs/store.md): the SQLite file, unless [store] url names another store.
    database: Path = field(default=Path(DEFAULT_FILES["database"]))
    store_url: Annotated[str | None, STORE_URL] = field(default=None, metadata={"key": "store.url"})
    # The PostgreSQL password's file; without it, $SUPCTL_STORE_PASSWORD.
    store_password_file: Path | None = field(default=None, metadata={"key": "store.password-file"})
    audit_keep: Annotated[float | None, DURATION] = field(  # seconds; None: for ever
        default=None, metadata={"key": "audit.keep"}
    )
    listen: Annotated[str, LISTEN] = DEFAULT_LISTEN
    insecure: bool = False  # serve plain ws:// (no TLS); the CLI's --insecure does the same
    keepalive: Annotated[float, SECONDS_OR_OFF] = DEFAULT_KEEPALIVE  # WebSocket ping interval and timeout
    # SIGTERM: how long streams in flight may go on before they are cut (0: at once).
    drain_timeout: Annotated[float, SECONDS_OR_OFF] = DEFAULT_DRAIN_TIMEOUT
    limits: Limits = field(default_factory=Limits)  # [limits] (docs/tower.md)
    login_expiry: Annotated[str, DURATION_TEXT] = "8h"  # lifetime of a login token (and of each renewal)
    # This process's name among the replicas serving the store (docs/tower.md, "Replicas").
    cluster_id: Annotated[str, REPLICA_ID] = field(default="tower", metadata={"key": "cluster.id"})
    # Where the other replicas relay the streams of the sites this one holds (wss://HOST:PORT);
    # without it, peer-listen's address.  Either one turns peering on.
    cluster_advertise: Annotated[str | None, ADVERTISE] = field(
        default=None, metadata={"key": "cluster.advertise"}
    )
    # The peer listener (mutual TLS, replicas only); without it, all interfaces on advertise's port.
    cluster_peer_listen: Annotated[str | None, LISTEN] = field(
        default=None, metadata={"key": "cluster.peer-listen"}
    )
    # The replicas' certificate and key, from the tower's CA (control-tower peer-cert).
    peer_cert: Path = field(default=Path(DEFAULT_FILES["peer-cert"]), metadata={"key": "cluster.cert"})
    peer_key: Path = field(default=Path(DEFAULT_FILES["peer-key"]), metadata={"key": "cluster.key"})
    # Plain HTTP for scrapers and probes (/metrics, /healthz, /readyz); off without it.
    metrics_listen: Annotated[str | None, LISTEN] = field(default=None, metadata={"key": "metrics.listen"})
    # Per-site byte counters (a label per site: bounded by the sites registered).
    metrics_site_labels: bool = field(default=False, metadata={"key": "metrics.site-labels"})

    def peering(self) -> tuple[str, int, str | None] | None:
        """(host, port) of the peer listener and the advertised URL (None: the listener's
        own address, known once it is bound), or None if peering is off."""
        if self.cluster_peer_listen is not None:
            host, port = parse_listen(self.cluster_peer_listen)
            return host, port, self.cluster_advertise
        if self.cluster_advertise is not None:
            advertised = urlsplit(self.cluster_advertise).port
            assert advertised is not None  # checked by ADVERTISE
            return "", advertised, self.cluster_advertise
        return None


def load_config(path: str | os.PathLike[str]) -> TowerConfig:
    """Read and check ``tower.toml``; every problem is a one-line :class:`UsageError`."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"config file {p} not found (run control-tower init)") from None
    except OSError as e:
        raise UsageError(f"cannot read config file {p}: {e.strerror}") from None
    source = Source(f"config file {p}", p.absolute().parent)

    # Unknown keys are errors: a misspelt "insecure" must not be silently ignored.
    return load(TowerConfig, parse_toml(raw, source), source)


def toml_string(value: str) -> str:
    """``value`` as a TOML basic string.

    JSON string escapes are a subset of TOML's, except that TOML also requires
    DEL to be escaped; ``ensure_ascii=False`` avoids the surrogate-pair escapes
    TOML forbids.
    """
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")


def write_default_config(
    directory: str | os.PathLike[str],
    *,
    listen: str = DEFAULT_LISTEN,
    store_url: str | None = None,
    store_password_file: Path | None = None,
) -> Path:
    """Write ``DIRECTORY/tower.toml`` naming the files ``control-tower init`` creates; with
    ``store_url``, a ``[store]`` table naming that store (and its password's file) instead
    of the SQLite ``database``."""
    parse_listen(listen)
    if store_url is None:
        store = [f"database = {toml_string(DEFAULT_FILES['database'])}"]
    else:
        store = ["# database: unused, [store] url below names the store."]
    lines = [
        "# control-tower configuration. Relative paths are relative to this file's directory.",
        "",
        "# HOST:PORT, [IPV6]:PORT, or :PORT for all interfaces. --listen overrides it.",
        f"listen = {toml_string(listen)}",
        "",
        "# TLS server certificate and key, and the CA clients use to verify them.",
        *(f"{name} = {toml_string(DEFAULT_FILES[name])}" for name in ("cert", "key", "ca")),
        "",
        "# The store (SQLite, mode 0600): admin, site, login and API tokens (hashed), users,",
        "# policy sets and the audit log.",
        '# [store] url = "postgresql://USER@HOST/DB" uses PostgreSQL instead (docs/store.md).',
        *store,
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
        "# How long the audit log keeps a record (s, m, h or d); without keep, for ever.",
        "# [audit]",
        '# keep = "90d"',
        "",
    ]
    if store_url is not None:
        lines += ["[store]", f"url = {toml_string(store_url)}"]  # checked by init (check_store_url)
        if store_password_file is not None:
            lines.append(f"password-file = {toml_string(str(store_password_file))}")
        else:
            lines.append(f"# the password: ${PASSWORD_ENV} (or password-file = PATH)")
        lines.append("")
    path = Path(directory) / CONFIG_NAME
    atomic_write(path, "\n".join(lines).encode("utf-8"), 0o644)
    return path
