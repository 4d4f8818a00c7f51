"""Users (scrypt password hashes, policies) and their login and API tokens.

A token is stored as its SHA-256 with an accessor (its first 8 hex digits), an
expiry and, once revoked, when.  A revoked or expired token is kept for
:data:`FORGET_AFTER` past its expiry, so that using it says why it stopped
working; removing a user revokes their tokens, so a user re-created under the
same name does not bring the old tokens back to life.
"""

from __future__ import annotations

import asyncio
import datetime
import secrets
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import and_, delete, exists, insert, select, update
from sqlalchemy.exc import IntegrityError

from supctl.errors import UsageError
from supctl.tower.store import hash_token
from supctl.tower.users import (
    API_PREFIX,
    LOGIN_PREFIX,
    MAX_PASSWORD,
    USER_NAME_RE,
    TokenRefused,
    hash_password,
)

from .engine import Database
from .model import TOKEN_EXPIRED, TOKEN_REVOKED, USER_REMOVED, Identity, IssuedToken, TokenInfo, UserInfo
from .schema import admin_tokens, user_tokens, users

KINDS = {"login": LOGIN_PREFIX, "api": API_PREFIX}
#: How long a token is remembered after its expiry (then "invalid token" instead of "expired").
FORGET_AFTER = datetime.timedelta(days=7)
#: A user's revoked login tokens are remembered (so that using one says "token revoked") up
#: to this many times the cap; the earliest revoked are forgotten first, so that logging
#: in again and again grows neither the table nor a tower's copy of it.
REVOKED_REMEMBERED = 4
#: Hashes per query when re-checking many sessions' tokens at once.
_CHUNK = 500


def check_user_name(name: str) -> None:
    if not USER_NAME_RE.fullmatch(name) or name == "admin":
        raise UsageError(
            f"invalid user name {name!r}: 1-64 lowercase letters, digits, '_', '.', '-' (not 'admin')"
        )


class Users:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def add(self, name: str, password: str, policies: Sequence[str], *, now: datetime.datetime) -> None:
        """Create a user; the password is hashed with scrypt in a worker thread (tens of ms of CPU)."""
        check_user_name(name)
        if not password:
            raise UsageError("the password must not be empty")
        if len(password) > MAX_PASSWORD:
            raise UsageError(f"the password is longer than {MAX_PASSWORD} characters")
        hashed = await asyncio.to_thread(hash_password, password)
        await self.add_hashed(name, hashed, policies, now=now)

    async def add_hashed(
        self, name: str, password_hash: str, policies: Sequence[str], *, now: datetime.datetime
    ) -> None:
        """Create a user from a stored hash (imports, benchmarks)."""
        check_user_name(name)
        try:
            async with self.db.write(bump=True) as conn:
                await conn.execute(
                    insert(users).values(
                        name=name, password=password_hash, policies=list(policies), created=now
                    )
                )
        except IntegrityError:
            raise UsageError(f"user {name!r} already exists") from None

    async def remove(self, name: str, *, now: datetime.datetime) -> int:
        """Remove a user and revoke their tokens (how many) in the same transaction."""
        async with self.db.write(bump=True) as conn:
            gone = await conn.execute(delete(users).where(users.c.name == name))
            if gone.rowcount == 0:
                raise UsageError(f"unknown user {name!r}")
            revoked = await conn.execute(
                update(user_tokens)
                .where(user_tokens.c.user_name == name, user_tokens.c.revoked.is_(None))
                .values(revoked=now)
            )
        return int(revoked.rowcount)

    async def entries(self) -> list[UserInfo]:
        async with self.db.read() as conn:
            rows = await conn.execute(
                select(users.c.name, users.c.policies, users.c.created).order_by(users.c.name)
            )
            return [UserInfo(row.name, tuple(row.policies), row.created) for row in rows]

    async def policies(self, name: str) -> tuple[str, ...] | None:
        """The user's policies now (None: no such user)."""
        async with self.db.read() as conn:
            found = await conn.scalar(select(users.c.policies).where(users.c.name == name))
        return None if found is None else tuple(found)

    async def password_hash(self, name: str) -> str | None:
        """The stored scrypt hash (None: no such user; the caller spends the same work on a
        dummy hash, so timing does not tell which names exist)."""
        async with self.db.read() as conn:
            found = await conn.scalar(select(users.c.password).where(users.c.name == name))
        return None if found is None else str(found)

    async def exists(self, name: str) -> bool:
        async with self.db.read() as conn:
            return bool(await conn.scalar(select(exists().where(users.c.name == name))))


def _refusal(row: Any, now: datetime.datetime) -> str | None:
    """Why a token row (joined with its user, ``owner`` None when removed) may not be used."""
    if row.revoked is not None:
        return TOKEN_REVOKED if row.owner is not None else USER_REMOVED
    if row.expires <= now:
        return TOKEN_EXPIRED
    return USER_REMOVED if row.owner is None else None


_WITH_OWNER = user_tokens.outerjoin(users, users.c.name == user_tokens.c.user_name)


class UserTokens:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def add(
        self,
        user: str,
        kind: str,
        lifetime: datetime.timedelta,
        *,
        now: datetime.datetime,
        cap: int | None = None,
    ) -> IssuedToken:
        """A new token of ``user``.  With ``cap``, a login token also revokes the user's
        oldest live login tokens beyond ``cap``, in the same transaction."""
        if kind not in KINDS:
            raise ValueError(f"unknown token kind {kind!r}")
        if lifetime <= datetime.timedelta(0) or (cap is not None and cap < 1):
            raise ValueError("a token needs a positive lifetime and cap")
        token = KINDS[kind] + secrets.token_urlsafe(32)  # 256 random bits
        digest = hash_token(token)
        expires = now + lifetime
        async with self.db.write(bump=True) as conn:
            # PostgreSQL: lock the user's row, so that concurrent adds count each other's tokens
            # for the cap and a concurrent removal waits (SQLite: the write lock already does).
            owner = await conn.scalar(select(users.c.name).where(users.c.name == user).with_for_update())
            if owner is None:
                raise UsageError(f"unknown user {user!r}")
            await conn.execute(delete(user_tokens).where(user_tokens.c.expires < now - FORGET_AFTER))
            await conn.execute(
                insert(user_tokens).values(
                    hash=digest,
                    accessor=digest[:8],
                    user_name=user,
                    kind=kind,
                    created=now,
                    expires=expires,
                )
            )
            revoked: tuple[str, ...] = ()
            forgotten: tuple[str, ...] = ()
            if kind == "login" and cap is not None:
                beyond = await conn.execute(
                    select(user_tokens.c.id, user_tokens.c.accessor)
                    .where(
                        user_tokens.c.user_name == user,
                        user_tokens.c.kind == "login",
                        user_tokens.c.revoked.is_(None),
                        user_tokens.c.expires > now,
                    )
                    .order_by(user_tokens.c.created.desc(), user_tokens.c.id.desc())
                    .offset(cap)
                )
                oldest = beyond.all()
                if oldest:
                    await conn.execute(
                        update(user_tokens)
                        .where(user_tokens.c.id.in_([row.id for row in oldest]))
                        .values(revoked=now)
                    )
                    revoked = tuple(row.accessor for row in oldest)
                forgotten = await self._forget_revoked(conn, user, REVOKED_REMEMBERED * cap)
        return IssuedToken(token, digest[:8], expires, revoked, forgotten)

    @staticmethod
    async def _forget_revoked(conn: Any, user: str, keep: int) -> tuple[str, ...]:
        """Forget ``user``'s revoked login tokens beyond the ``keep`` last revoked; their hashes."""
        beyond = await conn.execute(
            select(user_tokens.c.id, user_tokens.c.hash)
            .where(
                user_tokens.c.user_name == user,
                user_tokens.c.kind == "login",
                user_tokens.c.revoked.is_not(None),
            )
            .order_by(user_tokens.c.revoked.desc(), user_tokens.c.id.desc())
            .offset(keep)
        )
        rows = beyond.all()
        if rows:
            await conn.execute(delete(user_tokens).where(user_tokens.c.id.in_([row.id for row in rows])))
        return tuple(row.hash for row in rows)

    async def check(self, token: str, *, now: datetime.datetime) -> Identity | None:
        """The identity of a valid token; None if it is no user token; :class:`TokenRefused`
        (message ``token expired``, ``token revoked`` ...) if it is one that may not be used."""
        if not token.startswith(tuple(KINDS.values())):
            return None
        digest = hash_token(token)
        async with self.db.read() as conn:
            result = await conn.execute(
                select(
                    user_tokens.c.user_name,
                    user_tokens.c.accessor,
                    user_tokens.c.kind,
                    user_tokens.c.expires,
                    user_tokens.c.revoked,
                    users.c.name.label("owner"),
                    users.c.policies,
                )
                .select_from(_WITH_OWNER)
                .where(user_tokens.c.hash == digest)
            )
            row = result.first()
        if row is None:
            return None
        why = _refusal(row, now)
        if why is not None:
            raise TokenRefused(why, row.user_name, row.accessor)
        return Identity(row.user_name, row.accessor, tuple(row.policies), row.kind, digest)

    async def refusals(self, token_hashes: Iterable[str], *, now: datetime.datetime) -> dict[str, str]:
        """For the periodic re-check of running sessions: why each token (by hash; admin
        tokens too) may no longer be used.  Valid tokens are left out; a token found
        nowhere is ``token revoked``."""
        wanted = list(dict.fromkeys(token_hashes))
        refused: dict[str, str] = {}
        async with self.db.read() as conn:
            for start in range(0, len(wanted), _CHUNK):
                chunk = wanted[start : start + _CHUNK]
                rows = await conn.execute(
                    select(
                        user_tokens.c.hash,
                        user_tokens.c.expires,
                        user_tokens.c.revoked,
                        users.c.name.label("owner"),
                    )
                    .select_from(_WITH_OWNER)
                    .where(user_tokens.c.hash.in_(chunk))
                )
                found = {row.hash: _refusal(row, now) for row in rows}
                admins = set(
                    await conn.scalars(select(admin_tokens.c.hash).where(admin_tokens.c.hash.in_(chunk)))
                )
                for digest in chunk:
                    why = found.get(digest, None if digest in admins else TOKEN_REVOKED)
                    if why is not None:
                        refused[digest] = why
        return refused

    async def refusal(self, token_hash: str, *, now: datetime.datetime) -> str | None:
        """:meth:`refusals` for one token."""
        return (await self.refusals([token_hash], now=now)).get(token_hash)

    async def renew(
        self, token: str, lifetime: datetime.timedelta, *, now: datetime.datetime
    ) -> datetime.datetime | None:
        """Push a valid login token's expiry to ``now + lifetime``; the new expiry, or None
        when the token is not a live login token (API tokens are not renewed)."""
        expires = now + lifetime
        async with self.db.write(bump=True) as conn:
            result = await conn.execute(
                update(user_tokens)
                .where(
                    user_tokens.c.hash == hash_token(token),
                    user_tokens.c.kind == "login",
                    user_tokens.c.revoked.is_(None),
                    user_tokens.c.expires > now,
                    exists().where(users.c.name == user_tokens.c.user_name),
                )
                .values(expires=expires)
            )
        return expires if result.rowcount else None

    async def revoke(self, accessor: str, *, now: datetime.datetime) -> str:
        """Revoke the token with this accessor; the user it belonged to."""
        async with self.db.write(bump=True) as conn:
            found = (
                await conn.execute(
                    select(user_tokens.c.id, user_tokens.c.user_name).where(
                        user_tokens.c.accessor == accessor
                    )
                )
            ).all()
            if not found:
                raise UsageError(f"no token with accessor {accessor!r} (see control-tower token list)")
            if len(found) > 1:
                raise UsageError(f"accessor {accessor!r} names {len(found)} tokens; revoke by user instead")
            await conn.execute(
                update(user_tokens)
                .where(and_(user_tokens.c.id == found[0].id, user_tokens.c.revoked.is_(None)))
                .values(revoked=now)
            )
        return str(found[0].user_name)

    async def revoke_token(self, token: str, *, now: datetime.datetime) -> bool:
        """Revoke a token given itself (``supctl do logout``); False if it is none."""
        async with self.db.write(bump=True) as conn:
            result = await conn.execute(
                update(user_tokens)
                .where(user_tokens.c.hash == hash_token(token), user_tokens.c.revoked.is_(None))
                .values(revoked=now)
            )
        return bool(result.rowcount)

    async def entries(self) -> list[TokenInfo]:
        """Every remembered token, oldest first."""
        columns = user_tokens.c
        async with self.db.read() as conn:
            rows = await conn.execute(
                select(
                    columns.accessor,
                    columns.user_name,
                    columns.kind,
                    columns.created,
                    columns.expires,
                    columns.revoked,
                ).order_by(columns.created, columns.id)
            )
            return [TokenInfo(r.accessor, r.user_name, r.kind, r.created, r.expires, r.revoked) for r in rows]
