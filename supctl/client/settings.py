"""Where supctl finds the tower, its credentials and the default target.

Precedence, highest first, the same for every setting (docs/cli.md, "Settings"):
command-line option, environment variable (``SUPCTL_HOST``, ``SUPCTL_TOKEN``,
``SUPCTL_TOKEN_FILE``, ``SUPCTL_CA_FILE``, ``SUPCTL_TOWER_FINGERPRINT``,
``SUPCTL_KEEPALIVE``, ``SUPCTL_SITE``...), the context in use (``--context``,
``SUPCTL_CONTEXT`` or the file's ``current-context``: a ``[contexts.NAME]`` table),
the config file's top level (``~/.config/supctl/config.toml`` or ``--config``),
built-in default.  :func:`resolve` is the one place that applies it.
For the token, one order (docs/cli.md, "Credentials"): ``--token``, ``--token-file``,
``SUPCTL_TOKEN``, ``SUPCTL_TOKEN_FILE``, the context's ``token`` then ``token-file``, the
config file's ``token`` then ``token-file``, and last the login token ``supctl do login``
stored for this tower (:mod:`supctl.client.login`); ``supctl whoami`` says which one is used.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

from ..errors import UsageError
from ..protocol import KEEPALIVE
from ..protocol.names import valid_name
from ..schema import SECONDS_OR_OFF, Names, Rule, Source, load, parse_toml
from ..tlspin import format_fingerprint, parse_fingerprint
from .login import load_login, token_path
from .target import ENV_VARS, LEVELS, RULES, check, valid

DEFAULT_HOST = "wss://127.0.0.1:4646"


def default_config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "supctl" / "config.toml"


@dataclass(frozen=True)
class ClientSettings:
    host: str
    token: str | None
    ca_file: Path | None
    #: SHA-256 of the tower's certificate (DER): when set, it replaces the CA and hostname checks.
    tower_fingerprint: bytes | None = None
    #: "login" when the token is the stored login token (renewed by long-running verbs).
    token_source: str = ""
    #: WebSocket ping interval and pong timeout of sessions, in seconds; None: off.
    keepalive: float | None = KEEPALIVE
    #: Where the token came from, for people (``supctl whoami``, ``do login``'s warning).
    token_origin: str = field(default="", compare=False)
    #: Where each setting came from (``host``, ``token``, ``ca-file``...), for ``config view``.
    origins: Mapping[str, str] = field(default_factory=dict, compare=False)
    #: The default of each target level in force (``site``...): its value and origin.
    defaults: Mapping[str, tuple[str, str]] = field(default_factory=dict, compare=False)
    #: The context in use and the config file read.
    context: str | None = field(default=None, compare=False)
    config_path: Path | None = field(default=None, compare=False)

    def __repr__(self) -> str:  # never show the token, not even in a debugger
        token = "***" if self.token else None
        pin = format_fingerprint(self.tower_fingerprint) if self.tower_fingerprint else None
        return (
            f"ClientSettings(host={self.host!r}, token={token}, ca_file={self.ca_file!r},"
            f" tower_fingerprint={pin!r})"
        )


def _name_rule(level: str) -> Rule:
    def convert(value: str) -> str:
        if not valid(level, value):
            raise ValueError(value)
        return value

    return Rule(f"a name ({RULES.get(level, RULES['application'])})", convert)


SITE = _name_rule("site")
NAME = _name_rule("application")
CONTEXT_NAMES = Names(
    valid_name,
    "is not a valid context name (letters, digits, '.', '_' and '-', starting with one of the first two)",
)


@dataclass(frozen=True)
class Context:
    """A ``[contexts.NAME]`` table: a tower, how to trust it and log in, a default target."""

    host: str | None = None
    token: str | None = None
    token_file: str | None = None
    ca_file: str | None = None
    tower_fingerprint: str | None = None
    site: Annotated[str | None, SITE] = None
    application: Annotated[str | None, NAME] = None
    service_instance: Annotated[str | None, NAME] = None
    container: Annotated[str | None, NAME] = None


@dataclass(frozen=True)
class ConfigFile(Context):
    """The schema of ``config.toml`` (:mod:`supctl.schema`): each key, when present, a string
    (``keepalive``: seconds, 0 for off); the keys of a context may stand at the top level too."""

    keepalive: Annotated[float | None, SECONDS_OR_OFF] = None
    current_context: str | None = None
    contexts: Annotated[dict[str, Context], CONTEXT_NAMES] = field(default_factory=dict)


def keepalive_from(env: str | None, file: float | None) -> float | None:
    """``SUPCTL_KEEPALIVE``, else the config file's ``keepalive``, else :data:`KEEPALIVE`; 0: off."""
    value = file if file is not None else KEEPALIVE
    if env is not None:
        try:
            value = SECONDS_OR_OFF.convert(float(env))
        except ValueError:
            raise UsageError(f"SUPCTL_KEEPALIVE must be {SECONDS_OR_OFF.expected}, got {env!r}") from None
    return value or None


def config_path(config: str | None) -> Path:
    return Path(config).expanduser() if config else default_config_path()


def read_config(path: Path, *, explicit: bool) -> ConfigFile:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        if explicit:
            raise UsageError(f"config file {path} does not exist") from None
        return ConfigFile()
    except OSError as exc:
        raise UsageError(f"cannot read config file {path}: {exc.strerror}") from None
    source = Source(f"config file {path}")
    return load(ConfigFile, parse_toml(raw, source), source)


def read_token_file(path: Path) -> str:
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise UsageError(f"cannot read token file {path}: {exc.strerror}") from None
    if not token:
        raise UsageError(f"token file {path} is empty")
    return token


def check_token(token: str) -> str:
    """A token must fit in an HTTP header; the message never shows it."""
    if any(not 33 <= ord(c) <= 126 for c in token):
        raise UsageError("the API token contains spaces or characters that cannot be sent in an HTTP header")
    return token


def pick_context(
    file: ConfigFile, path: Path, chosen: tuple[str | None, str] | None
) -> tuple[str | None, Context | None, str]:
    """The context in use: ``chosen`` (``--context`` or ``SUPCTL_CONTEXT``: name, origin),
    else the file's ``current-context``; its name, table and where the choice came from."""
    name, origin = chosen if chosen and chosen[0] else (file.current_context, f"current-context in {path}")
    if not name:
        return None, None, "none"
    entry = file.contexts.get(name)
    if entry is None:
        known = ", ".join(sorted(file.contexts)) or f"none: {path} defines no [contexts.NAME]"
        shown = name if len(name) <= 70 else name[:67] + "..."
        raise UsageError(f"unknown context {shown!r} ({origin}); known: {known}")
    return name, entry, origin


def resolve(
    *,
    host: str | None,
    token: str | None,
    token_file: str | None,
    ca_file: str | None,
    config: str | None,
    tower_fingerprint: str | None = None,
    origins: tuple[str, str] = ("--token", "--token-file"),
    context: tuple[str | None, str] | None = None,
    sources: Mapping[str, str] | None = None,
) -> ClientSettings:
    """Merge options (already merged with env by click) with the context and the config file.
    ``origins``: how ``token`` and ``token_file`` were given (an option, or its environment
    variable); ``sources``: the same for ``host``, ``ca-file`` and ``tower-fingerprint``;
    ``context``: the ``--context``/``SUPCTL_CONTEXT`` name and which of the two."""
    path = config_path(config)
    file = read_config(path, explicit=config is not None)
    name, entry, context_origin = pick_context(file, path, context)
    layers: list[tuple[Context, str]] = [(entry, f"context {name!r} in {path}")] if entry else []
    layers.append((file, str(path)))
    given = dict(sources or {})

    def pick(attr: str, value: str | None) -> tuple[str | None, str]:
        key = attr.replace("_", "-")
        if value is not None:
            return value, given.get(key, f"--{key}")
        for layer, where in layers:
            if (found := getattr(layer, attr)) is not None:
                return str(found), where
        return None, "default"

    picked_host, host_origin = pick("host", host)
    host = picked_host or DEFAULT_HOST
    parts = urlsplit(host)
    if parts.scheme not in ("wss", "ws") or not parts.hostname:
        raise UsageError(f"--host must look like wss://HOST:PORT, got {host!r}")
    origin = (
        origins[0] if token is not None else f"{origins[1]} {token_file}" if token_file is not None else ""
    )
    for layer, where in layers if token is None and token_file is None else ():
        if layer.token is not None:
            token, origin = layer.token, f"token in {where}"
            break
        if layer.token_file is not None:
            token_file, origin = layer.token_file, f"token-file {layer.token_file} in {where}"
            break
    if token is None and token_file is not None:
        token = read_token_file(Path(token_file).expanduser())
    source = ""
    if token is None:
        stored = load_login(host.rstrip("/"))
        if stored is not None:
            token, source = str(stored["token"]), "login"
            origin = f"login of {stored.get('user', '?')} ({token_path()})"
    if token is not None:
        check_token(token)
    ca, ca_origin = pick("ca_file", ca_file)
    ca_path = Path(ca).expanduser() if ca else None
    if ca_path is not None and not ca_path.is_file():
        raise UsageError(f"CA file {ca_path} does not exist")
    fingerprint, pin_origin = pick("tower_fingerprint", tower_fingerprint)
    pin = parse_fingerprint(fingerprint) if fingerprint else None
    if pin is not None and parts.scheme != "wss":
        raise UsageError("--tower-fingerprint needs a wss:// tower URL (there is no certificate to pin)")
    env_keepalive = os.environ.get("SUPCTL_KEEPALIVE")
    return ClientSettings(
        host=host.rstrip("/"),
        token=token,
        ca_file=ca_path,
        tower_fingerprint=pin,
        token_source=source,
        keepalive=keepalive_from(env_keepalive, file.keepalive),
        token_origin=origin,
        origins={
            "context": context_origin,
            "host": host_origin,
            "token": origin or "none",
            "ca-file": ca_origin,
            "tower-fingerprint": pin_origin,
            "keepalive": "SUPCTL_KEEPALIVE"
            if env_keepalive is not None
            else str(path)
            if file.keepalive is not None
            else "default",
        },
        defaults=target_defaults(layers),
        context=name,
        config_path=path,
    )


def target_defaults(layers: list[tuple[Context, str]]) -> dict[str, tuple[str, str]]:
    """Each target level's default and its origin: ``SUPCTL_SITE``... (empty: unset), else
    the first layer (the context, the config file's top level) that sets it."""
    found: dict[str, tuple[str, str]] = {}
    for level in LEVELS:
        env = ENV_VARS[level]
        if value := os.environ.get(env):
            found[level] = (check(level, value, env), env)
            continue
        for layer, where in layers:
            if (value := getattr(layer, level.replace("-", "_"))) is not None:
                found[level] = (value, where)
                break
    return found
