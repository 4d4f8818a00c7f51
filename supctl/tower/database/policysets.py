"""Policy sets: the whole ``policies.toml`` text, validated, stored as a new version.

The version in force is the highest one.  Every earlier version is kept (what
was in force when, and who applied it), so a change can be traced and undone by
applying an older text again.
"""

from __future__ import annotations

import asyncio
import datetime
import tomllib

from sqlalchemy import func, insert, select

from supctl.errors import UsageError
from supctl.tower.policy import Rule, parse_policies

from .engine import Database
from .model import PolicySet
from .schema import policy_sets

#: A policy set larger than this is refused (it is parsed on every change by every tower).
MAX_POLICY_TEXT = 1 << 20


def validate(text: str, source: str) -> dict[str, tuple[Rule, ...]]:
    """Parse a policy set as ``policies.toml`` is parsed; UsageError naming ``source``."""
    if len(text) > MAX_POLICY_TEXT:
        raise UsageError(f"{source}: larger than {MAX_POLICY_TEXT} characters")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{source}: {e}") from None
    return parse_policies(data, source)


def _bounded(who: str | None) -> str | None:
    """Who applied a set, cut to its column (80): a long name must not fail the apply."""
    return None if who is None else who[:80]


def _row(row: object) -> PolicySet:
    return PolicySet(row.version, row.text, row.applied, row.applied_by)  # type: ignore[attr-defined]


_COLUMNS = (policy_sets.c.version, policy_sets.c.text, policy_sets.c.applied, policy_sets.c.applied_by)


class PolicySets:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def apply(
        self,
        text: str,
        *,
        now: datetime.datetime,
        applied_by: str | None = None,
        source: str = "policy set",
    ) -> int:
        """Validate ``text`` (off the event loop: a large file takes a while to parse) and
        store it as the new version in force; that version.  Nothing is stored if invalid."""
        await asyncio.to_thread(validate, text, source)
        async with self.db.write(bump=True) as conn:
            result = await conn.execute(
                insert(policy_sets).values(text=text, applied=now, applied_by=_bounded(applied_by))
            )
            version = result.inserted_primary_key
        assert version is not None
        return int(version[0])

    async def version(self) -> int | None:
        """The version in force (None: none applied yet): cheap, for polling."""
        async with self.db.read() as conn:
            found = await conn.scalar(select(func.max(policy_sets.c.version)))
        return None if found is None else int(found)

    async def current(self) -> PolicySet | None:
        """The policy set in force."""
        async with self.db.read() as conn:
            result = await conn.execute(select(*_COLUMNS).order_by(policy_sets.c.version.desc()).limit(1))
            row = result.first()
        return None if row is None else _row(row)

    async def get(self, version: int) -> PolicySet | None:
        async with self.db.read() as conn:
            row = (await conn.execute(select(*_COLUMNS).where(policy_sets.c.version == version))).first()
        return None if row is None else _row(row)

    async def history(self) -> list[tuple[int, datetime.datetime, str | None]]:
        """(version, applied, applied_by) of every version, oldest first."""
        async with self.db.read() as conn:
            rows = await conn.execute(
                select(policy_sets.c.version, policy_sets.c.applied, policy_sets.c.applied_by).order_by(
                    policy_sets.c.version
                )
            )
            return [(row.version, row.applied, row.applied_by) for row in rows]
