"""The audit log in the store: one row per record (docs/audit.md).

Each row keeps the record as the JSON line ``audit.jsonl`` had (compact,
``ensure_ascii``: one line of ASCII whatever a client sent), plus the fields
``control-tower audit`` filters on as indexed columns.  Ids grow with every
append and rows are read in id order, so ``after_id`` follows the log: on
PostgreSQL, appends are serialised (an advisory lock for the transaction) so
that no append can commit a lower id after a reader has seen a higher one.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import ColumnElement, delete, func, insert, select, true

from supctl.tower.audit import parse_time

from .engine import LOCK_AUDIT, Database, serialise
from .model import AuditRow
from .schema import audit

#: Most rows one query returns; page on with ``after_id``.
MAX_QUERY = 10_000


def encode(rec: Mapping[str, Any]) -> str:
    """A record's line, exactly as ``audit.jsonl`` had it (and ``--output jsonl`` prints it)."""
    return json.dumps(rec, ensure_ascii=True, separators=(",", ":"))


#: Longest value kept in a filter column (the line keeps the whole value).  Names are at
#: most 64 characters; a client's request is cut to 256 by the tower; PostgreSQL's B-tree
#: refuses index entries over about 2.7 kB, which must never fail an append.
MAX_COLUMN = 256


def column_text(value: object, limit: int = MAX_COLUMN) -> str | None:
    """A value for a filter column: bounded, without NUL (PostgreSQL's text refuses it) and
    valid UTF-8 (a lone surrogate from a decoded URL cannot be encoded)."""
    if value is None:
        return None
    text = str(value)[:limit].replace("\x00", "\ufffd")
    return text.encode("utf-8", "replace").decode("utf-8")


def row_values(rec: Mapping[str, Any], line: str) -> dict[str, Any]:
    """The columns of a record's row; ValueError for a record without a time or event."""
    event = rec.get("event")
    if not isinstance(event, str) or not event:
        raise ValueError("an audit record needs an 'event'")
    return {
        "time": parse_time(str(rec.get("time"))),  # ValueError when missing or not ISO 8601
        "event": column_text(event, 32),
        "user_name": column_text(rec.get("user")),
        "site": column_text(rec.get("site")),
        "record": line,
    }


class AuditRecords:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def append(self, records: Sequence[Mapping[str, Any]]) -> int:
        """Append a batch in one transaction (all or none); how many."""
        rows = [row_values(rec, encode(rec)) for rec in records]  # every check before writing
        await self.append_rows(rows)
        return len(rows)

    async def append_rows(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Append rows made by :func:`row_values`."""
        if not rows:
            return
        async with self.db.write() as conn:
            await serialise(conn, LOCK_AUDIT)
            await conn.execute(insert(audit), list(rows))

    async def query(
        self,
        *,
        user: str | None = None,
        site: str | None = None,
        event: str | None = None,
        since: datetime.datetime | None = None,
        after_id: int = 0,
        limit: int = 1000,
    ) -> list[AuditRow]:
        """Records matching every filter given, in order, after ``after_id``, at most ``limit``
        (capped at MAX_QUERY).  The filters of ``control-tower audit``."""
        conditions: list[ColumnElement[bool]] = [audit.c.id > after_id]
        if user is not None:
            conditions.append(audit.c.user_name == user)
        if site is not None:
            conditions.append(audit.c.site == site)
        if event is not None:
            conditions.append(audit.c.event == event)
        if since is not None:
            conditions.append(audit.c.time >= since)
        statement = (
            select(audit.c.id, audit.c.record)
            .where(true(), *conditions)
            .order_by(audit.c.id)
            .limit(max(1, min(limit, MAX_QUERY)))
        )
        async with self.db.read() as conn:
            return [AuditRow(row.id, row.record) for row in await conn.execute(statement)]

    async def last_id(self) -> int:
        """The newest record's id (0 when empty): where ``--follow`` without history starts."""
        async with self.db.read() as conn:
            return int(await conn.scalar(select(func.coalesce(func.max(audit.c.id), 0))) or 0)

    async def count(self) -> int:
        async with self.db.read() as conn:
            return int(await conn.scalar(select(func.count()).select_from(audit)) or 0)

    async def delete_before(self, cutoff: datetime.datetime, *, batch: int = 10_000) -> int:
        """Delete records older than ``cutoff`` (the retention); how many.  In transactions of
        at most ``batch`` rows, so that appends are never held up for long."""
        deleted = 0
        while True:
            done = await self.delete_batch(cutoff, batch=batch)
            deleted += done
            if done < batch:
                return deleted

    async def delete_batch(self, cutoff: datetime.datetime, *, batch: int = 10_000) -> int:
        """Delete at most ``batch`` of the oldest records older than ``cutoff``, in one
        transaction; how many (fewer than ``batch``: none are left)."""
        oldest = select(audit.c.id).where(audit.c.time < cutoff).order_by(audit.c.id).limit(batch)
        async with self.db.write() as conn:
            result = await conn.execute(delete(audit).where(audit.c.id.in_(oldest)))
        return int(result.rowcount)


def lines_to_rows(lines: Iterable[str]) -> tuple[list[dict[str, Any]], int]:
    """Rows for the records among ``lines`` of an ``audit.jsonl``, and how many lines were not
    records (cut by a full disk, edited by hand).  Each line is kept byte for byte."""
    rows: list[dict[str, Any]] = []
    skipped = 0
    for line in lines:
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError("not a JSON object")
            rows.append(row_values(rec, line))
        except ValueError:  # json.JSONDecodeError and a bad time or event alike
            skipped += 1
    return rows, skipped
