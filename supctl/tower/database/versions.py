"""Schema revisions: create a store, check one's revision when opening it, upgrade it.

Alembic does the work, driven from here without ``env.py`` or ``alembic.ini``:
the revision files are loaded once, in a worker thread (they are files to read
and modules to import), then each upgrade runs on the store's own async
connection through ``run_sync``, inside one transaction (PostgreSQL and SQLite
both have transactional DDL): a failed upgrade leaves the previous revision.

Opening a store at :data:`HEAD` (every ``serve`` and admin command) reads the
revision with one SELECT and never imports Alembic: 10 MiB of the tower's RSS and
0.2-0.3 s of each command's start-up.  Alembic is imported to create or upgrade
a store, and to say whether a revision other than HEAD is older or newer.
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Connection, MetaData, inspect, text
from sqlalchemy.ext.asyncio import AsyncConnection

from supctl.errors import UsageError

from .engine import LOCK_MIGRATE, Database, Location, locate, make_engine, read_password, serialise

if TYPE_CHECKING:  # a third-party module, not one of ours: no cycle
    from alembic.script import ScriptDirectory

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
#: Alembic's bookkeeping table: one row, the revision the schema is at.
VERSION_TABLE = "alembic_version"
#: The newest revision in migrations/versions (a test checks it is Alembic's head).
HEAD = "0005"


@functools.cache
def scripts() -> ScriptDirectory:
    """The revision files, every one loaded (blocking: call it in a thread)."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    directory = ScriptDirectory.from_config(config)
    list(directory.walk_revisions())  # imports each revision now, not later on the event loop
    return directory


def head() -> str:
    """The newest revision this code knows."""
    return HEAD


@dataclass(frozen=True)
class Upgrade:
    """What :func:`upgrade` did: from ``before`` (None: an empty database) to ``after``."""

    before: str | None
    after: str

    def __str__(self) -> str:
        if self.before == self.after:
            return f"the store's schema is at revision {self.after}, the newest: nothing to do"
        return f"upgraded the store's schema from revision {self.before or '(empty)'} to {self.after}"


def _current(sync_conn: Connection) -> str | None:
    """The revision in Alembic's table (None: no table, or no row), read as Alembic would
    but without importing it.  Several rows (branches we never make) read as one unknown
    revision, which :func:`check_revision` refuses."""
    if not inspect(sync_conn).has_table(VERSION_TABLE):
        return None
    found = sorted(row[0] for row in sync_conn.execute(text("SELECT version_num FROM alembic_version")))
    return "+".join(found) or None


def _has_tables(sync_conn: Connection) -> bool:
    return bool(inspect(sync_conn).get_table_names())


def _known(revision: str) -> bool:
    """Whether ``revision`` is one of ours (loads the scripts: call it in a thread)."""
    from alembic.script.revision import ResolutionError
    from alembic.util import CommandError

    try:
        return scripts().get_revision(revision) is not None
    except (ResolutionError, CommandError):
        return False


def _upgrade_to(sync_conn: Connection, target: str) -> None:
    from alembic.config import Config
    from alembic.runtime.environment import EnvironmentContext
    from alembic.runtime.migration import MigrationContext

    directory = scripts()

    def steps(rev: str, _context: MigrationContext) -> object:
        return directory._upgrade_revs(target, rev)  # what `alembic upgrade` runs

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with EnvironmentContext(config, directory, fn=steps, destination_rev=target) as env:
        # SQLite: ALTERs Alembic cannot do in place become copy-and-rename (batch mode).
        env.configure(connection=sync_conn, render_as_batch=sync_conn.dialect.name == "sqlite")
        with env.begin_transaction():  # inside our transaction: no transaction of its own
            env.run_migrations()


async def _connect(
    target: str | os.PathLike[str],
    *,
    create: bool,
    password_file: Path | None,
    environ: Mapping[str, str] | None,
    migrating: bool = True,
) -> Database:
    location = locate(target, create=create)
    if migrating:
        await asyncio.to_thread(scripts)  # loaded before any work on the event loop needs them
    if location.sqlite_path is not None:
        await _check_sqlite_file(location, create)
        password = None
    else:
        password = await asyncio.to_thread(
            read_password, password_file, os.environ if environ is None else environ
        )
    return Database(make_engine(location, password), location)


async def _check_sqlite_file(location: Location, create: bool) -> None:
    path = location.sqlite_path
    assert path is not None
    if create:
        await asyncio.to_thread(_create_private_file, path)
    elif not await asyncio.to_thread(path.exists):
        raise UsageError(f"store {path} not found (run control-tower init, or control-tower migrate)")


def _create_private_file(path: Path) -> None:
    # 0600 from the start: it holds password and token hashes.  SQLite gives its -wal and
    # -shm files the database file's mode.
    if not path.parent.is_dir():
        raise UsageError(f"cannot create the store {path}: {path.parent} is not a directory")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    os.close(fd)


def check_revision(current: str | None, location: Location) -> None:
    """Refuse a schema other than the newest this code knows, in one line naming both
    (other than HEAD: the scripts must be loaded already)."""
    newest = HEAD
    where = location.description
    if current is None:
        raise UsageError(f"store {where} has no schema (run control-tower init, or control-tower migrate)")
    if current == newest:
        return
    if _known(current):
        raise UsageError(
            f"store {where} has schema revision {current}, older than this control-tower's {newest}:"
            " run control-tower migrate"
        )
    raise UsageError(
        f"store {where} has schema revision {current}, newer than this control-tower knows ({newest}):"
        " run the control-tower that wrote it (control-tower migrate cannot downgrade)"
    )


async def open_database(
    target: str | os.PathLike[str],
    *,
    password_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> Database:
    """Connect and check the schema revision (see :func:`check_revision`)."""
    db = await _connect(target, create=False, password_file=password_file, environ=environ, migrating=False)
    try:
        async with db.read() as conn:
            current = await conn.run_sync(_current)
        if current != HEAD and current is not None:
            await asyncio.to_thread(scripts)  # to tell an older revision from a newer one
        check_revision(current, db.location)
    except BaseException:
        await db.dispose()
        raise
    return db


async def create(
    target: str | os.PathLike[str],
    *,
    replace: bool = False,
    password_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    revision: str = "head",
) -> None:
    """A new, empty store at the newest revision (``control-tower init``).

    Refuses a target that already holds a store unless ``replace``, which removes an
    SQLite file (and its journal) or drops every table of a PostgreSQL database first.
    ``revision`` (an older one) is for tests of :func:`upgrade`.
    """
    location = locate(target, create=True)
    if location.sqlite_path is not None:
        await asyncio.to_thread(_clear_sqlite, location.sqlite_path, replace)
    db = await _connect(target, create=True, password_file=password_file, environ=environ)
    try:
        async with db.write() as conn:
            await serialise(conn, LOCK_MIGRATE)
            if await conn.run_sync(_has_tables):
                if not replace:
                    raise UsageError(
                        f"store {location.description} already holds tables (init --force replaces them)"
                    )
                await conn.run_sync(_drop_all)
            await conn.run_sync(_upgrade_to, revision)
    finally:
        await db.dispose()


def _clear_sqlite(path: Path, replace: bool) -> None:
    if path.exists() and not replace:
        raise UsageError(f"store {path} already exists (init --force replaces it)")
    for leftover in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        leftover.unlink(missing_ok=True)


def _drop_all(sync_conn: Connection) -> None:
    found = MetaData()
    found.reflect(sync_conn)
    found.drop_all(sync_conn)


async def upgrade(
    target: str | os.PathLike[str],
    *,
    password_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    revision: str = "head",
) -> Upgrade:
    """Bring the store's schema to the newest revision (``control-tower migrate``).

    An empty database gets the whole schema; a revision this code does not know
    (written by a newer control-tower) is refused, nothing changed.
    """
    db = await _connect(target, create=False, password_file=password_file, environ=environ)
    try:
        async with db.write() as conn:
            await serialise(conn, LOCK_MIGRATE)  # a second migrate waits, then finds nothing to do
            before = await conn.run_sync(_current)
            if before is not None and not _known(before):
                check_revision(before, db.location)  # raises: newer than this code
            await conn.run_sync(_upgrade_to, revision)
            after = await conn.run_sync(_current)
    finally:
        await db.dispose()
    assert after is not None
    return Upgrade(before, after)


async def revision_of(conn: AsyncConnection) -> str | None:
    """The revision a connection's database is at (None: no schema)."""
    return await conn.run_sync(_current)
