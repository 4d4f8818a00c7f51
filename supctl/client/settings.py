"""Where supctl finds the tower and its credentials.

Precedence, highest first: command-line option, environment variable
(``SUPCTL_HOST``, ``SUPCTL_TOKEN``, ``SUPCTL_TOKEN_FILE``, ``SUPCTL_CA_FILE``,
``SUPCTL_TOWER_FINGERPRINT``, ``SUPCTL_KEEPALIVE``), config
file (``~/.config/supctl/config.toml`` or ``--config``), built-in default.
For the token, one order (docs/cli.md, "Credentials"): ``--token``, ``--token-file``,
``SUPCTL_TOKEN``, ``SUPCTL_TOKEN_FILE``, the config file's ``token`` then ``token-file``,
and last the login token ``supctl do login`` stored for this tower
(:mod:`supctl.client.login`); ``supctl whoami`` says which one is used.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

from ..errors import UsageError
from ..protocol import KEEPALIVE
from ..schema import SECONDS_OR_OFF, Source, load, parse_toml
from ..tlspin import format_fingerprint, parse_fingerprint
from .login import load_login, token_path

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

    def __repr__(self) -> str:  # never show the token, not even in a debugger
        token = "***" if self.token else None
        pin = format_fingerprint(self.tower_fingerprint) if self.tower_fingerprint else None
        return (
            f"ClientSettings(host={self.host!r}, token={token}, ca_file={self.ca_file!r},"
            f" tower_fingerprint={pin!r})"
        )


@dataclass(frozen=True)
class ConfigFile:
    """The schema of ``config.toml`` (:mod:`supctl.schema`): each key, when present, a string
    (``keepalive``: seconds, 0 for off)."""

    host: str | None = None
    token: str | None = None
    token_file: str | None = None
    ca_file: str | None = None
    tower_fingerprint: str | None = None
    keepalive: Annotated[float | None, SECONDS_OR_OFF] = None


def keepalive_from(env: str | None, file: float | None) -> float | None:
    """``SUPCTL_KEEPALIVE``, else the config file's ``keepalive``, else :data:`KEEPALIVE`; 0: off."""
    value = file if file is not None else KEEPALIVE
    if env is not None:
        try:
            value = SECONDS_OR_OFF.convert(float(env))
        except ValueError:
            raise UsageError(f"SUPCTL_KEEPALIVE must be {SECONDS_OR_OFF.expected}, got {env!r}") from None
    return value or None


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


def resolve(
    *,
    host: str | None,
    token: str | None,
    token_file: str | None,
    ca_file: str | None,
    config: str | None,
    tower_fingerprint: str | None = None,
    origins: tuple[str, str] = ("--token", "--token-file"),
) -> ClientSettings:
    """Merge options (already merged with env by click) with the config file.  ``origins``:
    how ``token`` and ``token_file`` were given (an option, or its environment variable)."""
    path = Path(config).expanduser() if config else default_config_path()
    file = read_config(path, explicit=config is not None)
    host = host or file.host or DEFAULT_HOST
    parts = urlsplit(host)
    if parts.scheme not in ("wss", "ws") or not parts.hostname:
        raise UsageError(f"--host must look like wss://HOST:PORT, got {host!r}")
    origin = (
        origins[0] if token is not None else f"{origins[1]} {token_file}" if token_file is not None else ""
    )
    if token is None and token_file is None:
        token = file.token
        token_file = file.token_file
        if token is not None:
            origin = f"token in {path}"
        elif token_file is not None:
            origin = f"token-file {token_file} in {path}"
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
    ca = ca_file or file.ca_file
    ca_path = Path(ca).expanduser() if ca else None
    if ca_path is not None and not ca_path.is_file():
        raise UsageError(f"CA file {ca_path} does not exist")
    fingerprint = tower_fingerprint or file.tower_fingerprint
    pin = parse_fingerprint(fingerprint) if fingerprint else None
    if pin is not None and parts.scheme != "wss":
        raise UsageError("--tower-fingerprint needs a wss:// tower URL (there is no certificate to pin)")
    return ClientSettings(
        host=host.rstrip("/"),
        token=token,
        ca_file=ca_path,
        tower_fingerprint=pin,
        token_source=source,
        keepalive=keepalive_from(os.environ.get("SUPCTL_KEEPALIVE"), file.keepalive),
        token_origin=origin,
    )
