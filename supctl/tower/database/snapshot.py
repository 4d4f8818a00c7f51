"""Everything a tower judges requests with, read at once: admin and site tokens, users,
their login and API tokens, and the policy set in force (``supctl.tower.directory``).

Reads run in autocommit, a statement each, so the tables may come from different
commits.  The generation is read *first*: a write that commits while the snapshot is
read makes the stored generation newer than the one the snapshot carries, and the
next freshness check loads again.  A snapshot is never labelled newer than its data.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from sqlalchemy import select

from .model import PolicySet
from .schema import admin_tokens, sites, user_tokens, users
from .sqlstore import SQLStore


@dataclass(frozen=True)
class TokenRow:
    """A login or API token as the directory keeps it (by hash)."""

    user: str
    accessor: str
    kind: str
    expires: datetime.datetime
    revoked: datetime.datetime | None


@dataclass(frozen=True)
class Snapshot:
    generation: int
    admins: dict[str, str]  # token hash -> accessor
    sites: dict[str, str]  # name -> token hash
    users: dict[str, tuple[str, tuple[str, ...]]]  # name -> (scrypt hash, policies)
    tokens: dict[str, TokenRow]  # token hash -> token
    policy: PolicySet | None  # the set in force (None: none applied yet)


async def load(store: SQLStore) -> Snapshot:
    generation = await store.generation()
    async with store.db.read() as conn:
        admins = {
            row.hash: row.accessor
            for row in await conn.execute(select(admin_tokens.c.hash, admin_tokens.c.accessor))
        }
        site_rows = await conn.execute(select(sites.c.name, sites.c.token_hash))
        site_map = {row.name: row.token_hash for row in site_rows}
        user_rows = await conn.execute(select(users.c.name, users.c.password, users.c.policies))
        user_map = {row.name: (row.password, tuple(row.policies)) for row in user_rows}
        c = user_tokens.c
        token_rows = await conn.execute(select(c.hash, c.user_name, c.accessor, c.kind, c.expires, c.revoked))
        tokens = {
            row.hash: TokenRow(row.user_name, row.accessor, row.kind, row.expires, row.revoked)
            for row in token_rows
        }
    return Snapshot(generation, admins, site_map, user_map, tokens, await store.policies.current())
