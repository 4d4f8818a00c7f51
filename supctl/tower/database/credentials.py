"""Admin tokens and sites (what ``state.json`` held), each token stored as its SHA-256 only.

Looking a token up by its hash in an index is safe against timing attacks: the
attacker chooses the token, not its hash, so what an index walk may reveal (how
much of the hash matched stored ones) brings them no closer to a stored token.
A site's token is fetched by the site's name and compared in constant time, as
before.
"""

from __future__ import annotations

import datetime
import hmac

from sqlalchemy import delete, exists, insert, select, update
from sqlalchemy.exc import IntegrityError

from supctl.errors import UsageError
from supctl.protocol.names import valid_site_name
from supctl.tower.store import hash_token, new_token

from .engine import Database
from .model import AdminInfo, SiteInfo
from .schema import admin_tokens, sites

_NO_HASH = "0" * 64  # compared against for unknown sites: the same work either way


class AdminTokens:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def add(self, *, now: datetime.datetime) -> str:
        """A new admin token (returned once; only its hash is kept)."""
        token = new_token("admin")
        digest = hash_token(token)
        async with self.db.write(bump=True) as conn:
            await conn.execute(insert(admin_tokens).values(hash=digest, accessor=digest[:8], created=now))
        return token

    async def check(self, token: str) -> str | None:
        """The accessor of admin token ``token``, or None if it is not one."""
        async with self.db.read() as conn:
            found = await conn.scalar(
                select(admin_tokens.c.accessor).where(admin_tokens.c.hash == hash_token(token))
            )
        return None if found is None else str(found)

    async def valid(self, accessor: str) -> bool:
        """Whether an admin token with this accessor still exists (not revoked)."""
        async with self.db.read() as conn:
            return bool(await conn.scalar(select(exists().where(admin_tokens.c.accessor == accessor))))

    async def revoke(self, accessor: str) -> bool:
        """Forget the admin token(s) with this accessor; False if there is none."""
        async with self.db.write(bump=True) as conn:
            result = await conn.execute(delete(admin_tokens).where(admin_tokens.c.accessor == accessor))
        return result.rowcount > 0

    async def entries(self) -> list[AdminInfo]:
        async with self.db.read() as conn:
            rows = await conn.execute(
                select(admin_tokens.c.accessor, admin_tokens.c.created).order_by(
                    admin_tokens.c.created, admin_tokens.c.accessor
                )
            )
            return [AdminInfo(row.accessor, row.created) for row in rows]


def check_site_name(name: str) -> None:
    if not valid_site_name(name):
        raise UsageError(
            f"invalid site name {name!r}: use 1-63 lowercase letters, digits and '-',"
            " starting and ending with a letter or digit"
        )


class Sites:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def add(self, name: str, *, now: datetime.datetime) -> str:
        """Register site ``name``; its token (only the hash is kept)."""
        check_site_name(name)
        token = new_token("site")
        digest = hash_token(token)
        try:
            async with self.db.write(bump=True) as conn:
                await conn.execute(
                    insert(sites).values(name=name, token_hash=digest, accessor=digest[:8], created=now)
                )
        except IntegrityError:  # the name is the primary key: a concurrent add lost the race
            raise UsageError(f"site {name!r} already exists") from None
        return token

    async def rotate(self, name: str, *, now: datetime.datetime) -> str:
        """Give site ``name`` a new token and return it; the old one stops working at once
        (a live link that authenticated with it is evicted: see :meth:`token_hash`)."""
        token = new_token("site")
        digest = hash_token(token)
        async with self.db.write(bump=True) as conn:
            result = await conn.execute(
                update(sites)
                .where(sites.c.name == name)
                .values(token_hash=digest, accessor=digest[:8], rotated=now)
            )
            if result.rowcount == 0:
                raise UsageError(f"unknown site {name!r}")
        return token

    async def remove(self, name: str) -> None:
        async with self.db.write(bump=True) as conn:
            result = await conn.execute(delete(sites).where(sites.c.name == name))
            if result.rowcount == 0:
                raise UsageError(f"unknown site {name!r}")

    async def check(self, name: str, token: str) -> bool:
        """Whether ``token`` is the token of site ``name``; False for unknown sites."""
        stored = await self.token_hash(name)
        return hmac.compare_digest(stored or _NO_HASH, hash_token(token)) and stored is not None

    async def token_hash(self, name: str) -> str | None:
        """The hash of the site's valid token (None: no such site).  A link keeps the hash
        it authenticated with and is evicted once this differs (rotated or removed)."""
        async with self.db.read() as conn:
            found = await conn.scalar(select(sites.c.token_hash).where(sites.c.name == name))
        return None if found is None else str(found)

    async def exists(self, name: str) -> bool:
        return await self.token_hash(name) is not None

    async def names(self) -> list[str]:
        """Registered site names, sorted."""
        async with self.db.read() as conn:
            return [str(name) for name in await conn.scalars(select(sites.c.name).order_by(sites.c.name))]

    async def entries(self) -> list[SiteInfo]:
        async with self.db.read() as conn:
            rows = await conn.execute(
                select(sites.c.name, sites.c.accessor, sites.c.created, sites.c.rotated).order_by(
                    sites.c.name
                )
            )
            return [SiteInfo(row.name, row.accessor, row.created, row.rotated) for row in rows]
