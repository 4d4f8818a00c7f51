"""The store: one object, the same on SQLite and PostgreSQL, grouping its parts by domain."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

from .accounts import Users, UserTokens
from .auditlog import AuditRecords
from .cluster import Cluster
from .credentials import AdminTokens, Sites
from .engine import Database
from .policysets import PolicySets
from .versions import open_database


class SQLStore:
    """The tower's persistent state.  Every method is a coroutine and one transaction;
    methods whose answer depends on the time take it as ``now`` (an aware datetime)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.admins = AdminTokens(db)
        self.sites = Sites(db)
        self.users = Users(db)
        self.tokens = UserTokens(db)
        self.policies = PolicySets(db)
        self.audit = AuditRecords(db)
        self.cluster = Cluster(db)

    @property
    def description(self) -> str:
        """The SQLite path, or the PostgreSQL URL without password: for messages."""
        return self.db.location.description

    @property
    def backend(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self.db.dialect

    def peek_generation(self) -> int | None:
        """The generation without awaiting, where the backend allows it (SQLite); else None."""
        return self.db.peek_generation()

    async def listen(self, on_change: Callable[[], None]) -> None:
        """PostgreSQL: ``on_change()`` at every committed credential write, until the
        connection is lost (:meth:`.engine.Database.listen`)."""
        await self.db.listen(on_change)

    async def generation(self) -> int:
        """A counter every write to the credentials and policies changes (one cheap SELECT)."""
        return await self.db.generation()

    async def close(self) -> None:
        await self.db.dispose()


async def open(  # the module API reads database.open(target)
    target: str | os.PathLike[str],
    *,
    password_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> SQLStore:
    """Open an existing store whose schema is at this code's revision.

    ``target``: a path (SQLite), ``sqlite:///PATH`` or ``postgresql://USER@HOST/DB``.
    Refuses (:class:`~supctl.errors.UsageError`, one line) a missing SQLite file, a
    database without schema, and a schema older (``control-tower migrate``) or newer
    than this code; :class:`~.engine.StoreUnavailable` when it cannot be reached.
    """
    return SQLStore(await open_database(target, password_file=password_file, environ=environ))
