"""What the store's operations return: plain frozen values, never rows or connections."""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass
from typing import Any

#: Why a user token may not be used (the same words the JSON store used).
TOKEN_REVOKED = "token revoked"  # noqa: S105 - messages, not secrets
TOKEN_EXPIRED = "token expired"  # noqa: S105
USER_REMOVED = "token revoked (its user was removed)"


def iso(moment: datetime.datetime) -> str:
    """A time as the JSON files and the CLI show it (seconds, UTC offset)."""
    return moment.isoformat(timespec="seconds")


@dataclass(frozen=True)
class Identity:
    """Whom a valid login or API token belongs to (attributes as :class:`supctl.tower.users.Identity`)."""

    user: str
    accessor: str
    policies: tuple[str, ...]
    kind: str  # "login" or "api"
    #: The token's SHA-256: how sessions it opened are re-checked (accessors may collide).
    token_hash: str


@dataclass(frozen=True)
class AdminInfo:
    accessor: str
    created: datetime.datetime


@dataclass(frozen=True)
class SiteInfo:
    name: str
    accessor: str  # of the site's current token
    created: datetime.datetime
    rotated: datetime.datetime | None


@dataclass(frozen=True)
class UserInfo:
    name: str
    policies: tuple[str, ...]
    created: datetime.datetime


@dataclass(frozen=True)
class TokenInfo:
    """A login or API token as ``control-tower token list`` shows it (never the token)."""

    accessor: str
    user: str
    kind: str
    created: datetime.datetime
    expires: datetime.datetime
    revoked: datetime.datetime | None

    def state(self, now: datetime.datetime) -> str:
        if self.revoked is not None:
            return "revoked"
        return "expired" if self.expires <= now else "valid"


@dataclass(frozen=True)
class IssuedToken:
    """A new login or API token: the only time the token itself is known."""

    token: str
    accessor: str
    expires: datetime.datetime
    #: Accessors of the user's oldest login tokens revoked to stay within the cap.
    revoked: tuple[str, ...] = ()
    #: Hashes of the user's revoked login tokens forgotten (beyond REVOKED_REMEMBERED x cap).
    forgotten: tuple[str, ...] = ()


@dataclass(frozen=True)
class PolicySet:
    version: int
    text: str
    applied: datetime.datetime
    applied_by: str | None


@dataclass(frozen=True)
class AuditRow:
    """A stored audit record: its id (for ``after_id``) and its JSON line, byte for byte."""

    id: int
    line: str

    @property
    def record(self) -> dict[str, Any]:
        value = json.loads(self.line)
        assert isinstance(value, dict)
        return value
