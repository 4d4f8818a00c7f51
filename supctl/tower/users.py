"""Users, their passwords and their tokens: ``users.json`` next to ``state.json`` (mode 0600).

* Passwords are stored as scrypt hashes (random 16-byte salt, n=2**14, r=8, p=1),
  never in plain text.
* Login and API tokens are ``secrets.token_urlsafe(32)`` behind a prefix
  (``sct_login_``, ``sct_api_``); only their SHA-256 is stored (see
  :mod:`supctl.tower.store` for why that suffices for 256 random bits), with an
  expiry and an *accessor* (the first 8 hex digits of the hash), which audit
  records and ``control-tower token revoke`` use instead of the token.
* A revoked token is kept (marked) until it expires, so using it says "token
  revoked" rather than "invalid API token"; a user's revoked login tokens only up
  to :data:`REVOKED_REMEMBERED` x ``tokens-per-user`` (:func:`_make_room`).
* A user has at most ``[limits] tokens-per-user`` live login tokens: a new login
  revokes the oldest beyond it (API tokens, made by the administrator, are not
  counted), so 1,500 logins leave 50 live tokens, not 1,507.

The file is re-read whenever it changes and every write replaces it atomically
under a directory lock, exactly like ``state.json`` (see :class:`UserStore` for
how the tower writes it off its event loop).
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
import threading
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
    #: The token's SHA-256: names it exactly where accessors (32 bits) may collide.
    token_hash: str = ""


class TokenRefused(Exception):
    """A user token that is expired or revoked (the message says which)."""

    def __init__(self, message: str, user: str, accessor: str) -> None:
        super().__init__(message)
        self.user = user
        self.accessor = accessor


Stamp = tuple[int, int, int, int]


def _empty() -> dict[str, Any]:
    return {"users": {}, "tokens": []}


def _expired(entry: dict[str, Any], now: datetime.datetime) -> bool:
    return bool(entry.get("expires")) and datetime.datetime.fromisoformat(entry["expires"]) <= now


class UnknownUser(UsageError):
    """A token was asked for a user who does not exist (any more)."""


class UserStore:
    """``users.json``.  The tower reads it on its event loop and writes it on a worker
    thread (server.py, ``Tower._account_write``): every write reads the file afresh into
    a private copy, changes it, replaces the file and then publishes the copy as the new
    snapshot.  A snapshot is never changed in place, so a reader on the loop always sees
    one consistent version, and the loop does not read the file again after the
    tower's own writes.  Writes are serialised: a lock within the process, ``flock``
    on the directory against ``control-tower`` commands."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        # (the file's identity when read, its content), replaced as a whole.
        self._snapshot: tuple[Stamp | None, dict[str, Any]] = (None, _empty())
        self._write_lock = threading.Lock()

    # -- reading ---------------------------------------------------------

    def _read(self) -> dict[str, Any]:
        """The file's content, parsed and checked (empty if there is no file)."""
        try:
            raw = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return _empty()
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise UsageError(f"bad users file {self.path}: {exc}") from None
        if (
            not isinstance(raw, dict)
            or not isinstance(raw.get("users", {}), dict)
            or not isinstance(raw.get("tokens", []), list)
        ):
            raise UsageError(f"bad users file {self.path}: 'users' must be an object and 'tokens' a list")
        return {"users": raw.get("users", {}), "tokens": raw.get("tokens", [])}

    def _current(self) -> dict[str, Any]:
        """The content in force: the snapshot, re-read only if the file changed under it
        (a ``control-tower user`` or ``token`` command)."""
        if self._write_lock.locked():
            # The tower's writer thread is replacing the file and will publish what it
            # wrote: meanwhile the snapshot stands, and the loop does not read the file.
            return self._snapshot[1]
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._snapshot = (None, _empty())
            return self._snapshot[1]
        stamp = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        known, data = self._snapshot
        if stamp != known:
            data = self._read()
            self._snapshot = (stamp, data)
        return data

    def users(self) -> dict[str, dict[str, Any]]:
        return dict(self._current()["users"])

    def tokens(self) -> list[dict[str, Any]]:
        return list(self._current()["tokens"])

    @staticmethod
    def _entry(data: dict[str, Any], token: str) -> dict[str, Any] | None:
        digest = hash_token(token)
        found = None
        for entry in data["tokens"]:
            if hmac.compare_digest(str(entry.get("hash", "")), digest) and found is None:
                found = entry
        return found

    def check_token(self, token: str) -> Identity | None:
        """The identity of a user token; None if it is not one; TokenRefused if expired or revoked."""
        if not token.startswith((LOGIN_PREFIX, API_PREFIX)):
            return None
        data = self._current()
        entry = self._entry(data, token)
        if entry is None:
            return None
        who = (str(entry.get("user")), str(entry.get("accessor")))
        if entry.get("revoked"):
            raise TokenRefused("token revoked", *who)
        if _expired(entry, _now()):
            raise TokenRefused("token expired", *who)
        user = data["users"].get(entry.get("user"))
        if user is None:
            raise TokenRefused("token revoked (its user was removed)", *who)
        return Identity(
            entry["user"], entry["accessor"], tuple(user.get("policies", [])), str(entry.get("kind"))
        )

    def refusal(self, accessor: str) -> str | None:
        """Why the token with this accessor may no longer be used (revoked, expired, its
        user removed, gone), or None while it is valid: for sessions it opened earlier."""
        data = self._current()
        entry = next((e for e in data["tokens"] if e.get("accessor") == accessor), None)
        if entry is None or entry.get("revoked"):
            return "token revoked"
        if _expired(entry, _now()):
            return "token expired"
        if entry.get("user") not in data["users"]:
            return "token revoked (its user was removed)"
        return None

    def password_hash(self, name: str, password: str) -> str | None:
        """The stored hash to check ``password`` against: a dummy one for an unknown
        user (the same work, so timing does not tell which names exist), None for a
        password too long to be worth hashing."""
        user = self._current()["users"].get(name)
        if len(password) > MAX_PASSWORD:
            return None
        return str(user["password"]) if user else _DUMMY_HASH

    def has_user(self, name: str) -> bool:
        return name in self._current()["users"]

    def policies(self, name: str) -> tuple[str, ...] | None:
        """The policies in force for user ``name`` now (None: no such user): every OPEN
        and every sweep judges with these, not with those of the upgrade."""
        user = self._current()["users"].get(name)
        return None if user is None else tuple(user.get("policies", []))

    def check_password(self, name: str, password: str) -> bool:
        stored = self.password_hash(name, password)
        ok = stored is not None and check_password(password, stored)
        return ok and self.has_user(name)

    # -- writing ---------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        """The file's content, fresh and private, to change; written back atomically
        (temporary file, fsync, rename) and published unless the body raises."""
        with self._write_lock:
            dir_fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                fcntl.flock(dir_fd, fcntl.LOCK_EX)
                data = self._read()
                yield data
                now = _now()
                # Expired tokens (revoked or not) are forgotten: they can no longer be used anyway.
                data["tokens"] = [t for t in data["tokens"] if not _expired(t, now)]
                atomic_write(self.path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode(), 0o600)
                st = os.stat(self.path)
                self._snapshot = ((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns), data)
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

    def add_token(
        self, user: str, kind: str, lifetime: datetime.timedelta, most: int | None = None
    ) -> tuple[str, str, str]:
        """A new token of ``user``: (token, accessor, expires ISO).

        ``most``: for a login token, the user's live login tokens after this one; the
        oldest beyond it are revoked (:func:`_make_room`).
        """
        token = (LOGIN_PREFIX if kind == "login" else API_PREFIX) + secrets.token_urlsafe(32)
        digest = hash_token(token)
        expires = iso(_now() + lifetime)
        with self._locked() as data:
            if user not in data["users"]:
                raise UnknownUser(f"unknown user {user!r}")
            if kind == "login" and most is not None:
                _make_room(data, user, most)
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
        """Push a login token's expiry to now + ``lifetime``; the new expiry (ISO).

        TokenRefused if the token was revoked or expired since it was checked (a renewal
        must not bring it back).
        """
        now = _now()
        expires = iso(now + lifetime)
        with self._locked() as data:
            entry = self._entry(data, token)
            if entry is None:
                raise TokenRefused("token revoked", "", "")
            who = (str(entry.get("user")), str(entry.get("accessor")))
            if entry.get("revoked"):
                raise TokenRefused("token revoked", *who)
            if _expired(entry, now):
                raise TokenRefused("token expired", *who)
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


#: A user's revoked login tokens are remembered (so that using one says "token revoked")
#: up to this many times ``tokens-per-user``; the earliest revoked are forgotten first.
REVOKED_REMEMBERED = 4


def _make_room(data: dict[str, Any], user: str, most: int) -> None:
    """Before ``user`` gets one more login token: revoke their oldest live login tokens
    so that at most ``most`` are live with the new one, and forget the earliest revoked
    ones beyond :data:`REVOKED_REMEMBERED` x ``most``, so that logging in again and
    again grows neither the live tokens nor the file."""
    now = _now()
    stamp = iso(now)
    logins = [t for t in data["tokens"] if t.get("user") == user and t.get("kind") == "login"]
    live = [t for t in logins if not t.get("revoked") and not _expired(t, now)]  # oldest first
    for entry in live[: max(0, len(live) - most + 1)]:
        entry["revoked"] = stamp
    revoked = sorted((t for t in logins if t.get("revoked")), key=lambda t: str(t["revoked"]))
    forget = {id(t) for t in revoked[: max(0, len(revoked) - REVOKED_REMEMBERED * most)]}
    if forget:
        data["tokens"] = [t for t in data["tokens"] if id(t) not in forget]
