"""Users, their passwords and their tokens: the rules and helpers (the data is in the store,
:mod:`supctl.tower.database`; the tower judges with :mod:`supctl.tower.directory`).

* Passwords are stored as scrypt hashes (random 16-byte salt, n=2**14, r=8, p=1),
  never in plain text.
* Login and API tokens are ``secrets.token_urlsafe(32)`` behind a prefix
  (``sct_login_``, ``sct_api_``); only their SHA-256 is stored (see
  :mod:`supctl.tower.store` for why that suffices for 256 random bits), with an
  expiry and an *accessor* (the first 8 hex digits of the hash), which audit
  records and ``control-tower token revoke`` use instead of the token.
* A user has at most ``[limits] tokens-per-user`` live login tokens: a new login
  revokes the oldest beyond it (API tokens, made by the administrator, are not counted).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from supctl.errors import UsageError

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
