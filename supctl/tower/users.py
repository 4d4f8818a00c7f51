"""Users, their passwords and their tokens: ``users.json`` next to ``state.json`` (mode 0600).

* Passwords are stored as scrypt hashes (random 16-byte salt, n=2**14, r=8, p=1),
  never in plain text.
* Login and API tokens are ``secrets.token_urlsafe(32)`` behind a prefix
  (``sct_login_``, ``sct_api_``); only their SHA-256 is stored (see
  :mod:`supctl.tower.store` for why that suffices for 256 random bits), with an
  expiry and an *accessor* (the first 8 hex digits of the hash), which audit
  records and ``control-tower token revoke`` use instead of the token.
* A revoked token is kept (marked) until it expires, so using it says "token
  revoked" rather than "invalid API token".

The file is re-read whenever it changes and every write replaces it atomically
under a directory lock, exactly like ``state.json``.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from supctl.errors import UsageError

from .store import atomic_write, hash_token

USERS_NAME = "users.json"
USER_NAME_RE = re.compile(r"[a-z_][a-z0-9_.-]{0,63}")
SCRYPT = {"n": 2**14, "r": 8, "p": 1}
LOGIN_PREFIX = "sct_login_"
API_PREFIX = "sct_api_"
DEFAULT_LOGIN_EXPIRY = datetime.timedelta(hours=8)
DEFAULT_API_EXPIRY = datetime.timedelta(days=90)
#: Passwords longer than this are refused (scrypt's cost grows with the input).
MAX_PASSWORD = 1024

_DURATION = re.compile(r"(\d+)([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> datetime.timedelta:
    """``30s``, ``15m``, ``8h``, ``30d``."""
    match = _DURATION.fullmatch(text.strip())
    if not match or int(match[1]) == 0:
        raise UsageError(f"bad duration {text!r}: use e.g. 30s, 15m, 8h or 30d")
    return datetime.timedelta(seconds=int(match[1]) * _UNITS[match[2]])


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def iso(moment: datetime.datetime) -> str:
    return moment.isoformat(timespec="seconds")


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode("utf-8", "surrogatepass"), salt=salt, dklen=32, **SCRYPT)
    b64 = base64.b64encode
    return f"scrypt${SCRYPT['n']}${SCRYPT['r']}${SCRYPT['p']}${b64(salt).decode()}${b64(digest).decode()}"


def check_password(password: str, stored: str) -> bool:
    try:
        _, n, r, p, salt, digest = stored.split("$")
        expected = base64.b64decode(digest)
        got = hashlib.scrypt(
            password.encode("utf-8", "surrogatepass"),
            salt=base64.b64decode(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=len(expected),
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, expected)


# Spent on unknown users too, so timing does not tell which names exist.
_DUMMY_HASH = hash_password("not a password")


@dataclass(frozen=True)
class Identity:
    """Whom a token belongs to."""

    user: str
    accessor: str
    policies: tuple[str, ...]
    kind: str  # "admin", "login" or "api"


class TokenRefused(Exception):
    """A user token that is expired or revoked (the message says which)."""

    def __init__(self, message: str, user: str, accessor: str) -> None:
        super().__init__(message)
        self.user = user
        self.accessor = accessor


class UserStore:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._stamp: tuple[int, int, int, int] | None = None
        self._data: dict[str, Any] = {"users": {}, "tokens": []}

    # -- reading ---------------------------------------------------------

    def _reload(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._stamp, self._data = None, {"users": {}, "tokens": []}
            return
        stamp = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if stamp == self._stamp:
            return
        try:
            raw = json.loads(self.path.read_bytes())
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise UsageError(f"bad users file {self.path}: {exc}") from None
        if (
            not isinstance(raw, dict)
            or not isinstance(raw.get("users", {}), dict)
            or not isinstance(raw.get("tokens", []), list)
        ):
            raise UsageError(f"bad users file {self.path}: 'users' must be an object and 'tokens' a list")
        self._data = {"users": raw.get("users", {}), "tokens": raw.get("tokens", [])}
        self._stamp = stamp

    def users(self) -> dict[str, dict[str, Any]]:
        self._reload()
        return dict(self._data["users"])

    def tokens(self) -> list[dict[str, Any]]:
        self._reload()
        return list(self._data["tokens"])

    def _entry(self, token: str) -> dict[str, Any] | None:
        digest = hash_token(token)
        found = None
        for entry in self._data["tokens"]:
            if hmac.compare_digest(str(entry.get("hash", "")), digest) and found is None:
                found = entry
        return found

    def check_token(self, token: str) -> Identity | None:
        """The identity of a user token; None if it is not one; TokenRefused if expired or revoked."""
        if not token.startswith((LOGIN_PREFIX, API_PREFIX)):
            return None
        self._reload()
        entry = self._entry(token)
        if entry is None:
            return None
        who = (str(entry.get("user")), str(entry.get("accessor")))
        if entry.get("revoked"):
            raise TokenRefused("token revoked", *who)
        if entry.get("expires") and datetime.datetime.fromisoformat(entry["expires"]) <= _now():
            raise TokenRefused("token expired", *who)
        user = self._data["users"].get(entry.get("user"))
        if user is None:
            raise TokenRefused("token revoked (its user was removed)", *who)
        return Identity(
            entry["user"], entry["accessor"], tuple(user.get("policies", [])), str(entry.get("kind"))
        )

    def refusal(self, accessor: str) -> str | None:
        """Why the token with this accessor may no longer be used (revoked, expired, its
        user removed, gone), or None while it is valid: for sessions it opened earlier."""
        self._reload()
        entry = next((e for e in self._data["tokens"] if e.get("accessor") == accessor), None)
        if entry is None or entry.get("revoked"):
            return "token revoked"
        if entry.get("expires") and datetime.datetime.fromisoformat(entry["expires"]) <= _now():
            return "token expired"
        if entry.get("user") not in self._data["users"]:
            return "token revoked (its user was removed)"
        return None

    def password_hash(self, name: str, password: str) -> str | None:
        """The stored hash to check ``password`` against: a dummy one for an unknown
        user (the same work, so timing does not tell which names exist), None for a
        password too long to be worth hashing."""
        self._reload()
        user = self._data["users"].get(name)
        if len(password) > MAX_PASSWORD:
            return None
        return str(user["password"]) if user else _DUMMY_HASH

    def has_user(self, name: str) -> bool:
        self._reload()
        return name in self._data["users"]

    def policies(self, name: str) -> tuple[str, ...] | None:
        """The policies in force for user ``name`` now (None: no such user): every OPEN
        and every sweep judges with these, not with those of the upgrade."""
        self._reload()
        user = self._data["users"].get(name)
        return None if user is None else tuple(user.get("policies", []))

    def check_password(self, name: str, password: str) -> bool:
        stored = self.password_hash(name, password)
        ok = stored is not None and check_password(password, stored)
        return ok and self.has_user(name)

    # -- writing ---------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        dir_fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(dir_fd, fcntl.LOCK_EX)
            self._stamp = None
            self._reload()
            try:
                yield self._data
                now = _now()
                # Expired tokens (revoked or not) are forgotten: they can no longer be used anyway.
                self._data["tokens"] = [
                    t
                    for t in self._data["tokens"]
                    if not t.get("expires") or datetime.datetime.fromisoformat(t["expires"]) > now
                ]
                data = (json.dumps(self._data, indent=2, sort_keys=True) + "\n").encode()
                atomic_write(self.path, data, 0o600)
            finally:
                self._stamp = None
            self._reload()
        finally:
            os.close(dir_fd)

    def add_user(self, name: str, password: str, policies: list[str]) -> None:
        if not USER_NAME_RE.fullmatch(name) or name == "admin":
            raise UsageError(
                f"invalid user name {name!r}: 1-64 lowercase letters, digits, '_', '.', '-' (not 'admin')"
            )
        if not password:
            raise UsageError("the password must not be empty")
        if len(password) > MAX_PASSWORD:
            raise UsageError(f"the password is longer than {MAX_PASSWORD} characters")
        hashed = hash_password(password)
        with self._locked() as data:
            if name in data["users"]:
                raise UsageError(f"user {name!r} already exists")
            data["users"][name] = {"password": hashed, "policies": list(policies), "created": iso(_now())}

    def add_token(self, user: str, kind: str, lifetime: datetime.timedelta) -> tuple[str, str, str]:
        """A new token of ``user``: (token, accessor, expires ISO)."""
        token = (LOGIN_PREFIX if kind == "login" else API_PREFIX) + secrets.token_urlsafe(32)
        digest = hash_token(token)
        expires = iso(_now() + lifetime)
        with self._locked() as data:
            if user not in data["users"]:
                raise UsageError(f"unknown user {user!r}")
            data["tokens"].append(
                {
                    "hash": digest,
                    "accessor": digest[:8],
                    "user": user,
                    "kind": kind,
                    "created": iso(_now()),
                    "expires": expires,
                    "revoked": None,
                }
            )
        return token, digest[:8], expires

    def renew(self, token: str, lifetime: datetime.timedelta) -> str:
        """Push a login token's expiry to now + ``lifetime``; the new expiry (ISO)."""
        expires = iso(_now() + lifetime)
        digest = hash_token(token)
        with self._locked() as data:
            for entry in data["tokens"]:
                if hmac.compare_digest(str(entry.get("hash", "")), digest):
                    entry["expires"] = expires
        return expires

    def revoke(self, accessor: str) -> str:
        """Revoke the token with this accessor; the user it belonged to."""
        with self._locked() as data:
            found = [t for t in data["tokens"] if t.get("accessor") == accessor]
            if not found:
                raise UsageError(f"no token with accessor {accessor!r} (see control-tower token list)")
            if len(found) > 1:
                raise UsageError(f"accessor {accessor!r} names {len(found)} tokens; revoke by user instead")
            found[0]["revoked"] = iso(_now())
            return str(found[0]["user"])

    def revoke_token(self, token: str) -> None:
        digest = hash_token(token)
        with self._locked() as data:
            for entry in data["tokens"]:
                if hmac.compare_digest(str(entry.get("hash", "")), digest):
                    entry["revoked"] = iso(_now())
