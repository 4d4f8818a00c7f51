"""Where the store is, how to connect to it, and its transactions.

A store is named by a *target*: a path (an SQLite file, the embedded default
``DIR/tower.db``), an ``sqlite:///PATH`` URL, or a ``postgresql://USER@HOST/DB``
URL.  A PostgreSQL password is never part of the URL (which lives in
``tower.toml``, on disk): it comes from a file, from ``SUPCTL_STORE_PASSWORD``,
or from the driver's own ``PGPASSWORD`` and ``~/.pgpass``.

The dialect differences are all here, and small:

* SQLite: WAL journal (readers never wait for the writer), ``synchronous=FULL``
  (a commit survives power loss, as the fsync'd JSON files did), a busy timeout
  (concurrent writers, other processes included, queue instead of failing), and
  ``BEGIN IMMEDIATE`` for write transactions: a deferred one that reads and then
  writes can fail at once with "database is locked" when another writer went
  first, without waiting for the busy timeout.
* PostgreSQL: :func:`serialise` takes a transaction-scoped advisory lock where
  rows must commit in the order of their ids (the audit log, read by id) or
  where two transactions must not interleave (migrations).  SQLite's write
  transactions are serial anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import sqlite3
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import URL, event, exc, make_url, text
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import AsyncAdaptedQueuePool, ConnectionPoolEntry

from supctl.errors import ExitCode, SupctlError, UsageError

#: The embedded store's file name in a tower directory.
DEFAULT_NAME = "tower.db"
#: Where a PostgreSQL password may come from when no password file is configured.
PASSWORD_ENV = "SUPCTL_STORE_PASSWORD"  # noqa: S105 - a variable name, not a password
#: How long an SQLite writer waits for another one before giving up (milliseconds).
BUSY_TIMEOUT_MS = 10_000
#: Advisory lock keys (PostgreSQL), one per kind of serialised write.
LOCK_AUDIT = 0x5C7A0D17
LOCK_MIGRATE = 0x5C7A0D18
#: Marks a connection whose next transaction writes (SQLite: BEGIN IMMEDIATE).
_WRITE_OPTION = "supctl_write"
#: Marks a connection that only reads, a statement at a time (SQLite: no BEGIN at all).
_READ_OPTION = "supctl_read"


#: The generation each credential write of the current task committed (see :func:`track`).
_COMMITTED: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar("committed", default=None)
_GENERATION = text("SELECT value FROM generation WHERE id = 1")
_BUMP = text("UPDATE generation SET value = value + 1 WHERE id = 1 RETURNING value")
#: PostgreSQL: the channel every credential write notifies at its commit (``listen``).
CHANNEL = "supctl_generation"
_NOTIFY = text(f"NOTIFY {CHANNEL}")


@contextlib.contextmanager
def track() -> Iterator[list[int]]:
    """Collect the generation committed by each credential write made in this block (by
    this task): how a tower tells its own writes from those of others."""
    seen: list[int] = []
    token = _COMMITTED.set(seen)
    try:
        yield seen
    finally:
        _COMMITTED.reset(token)


class StoreUnavailable(SupctlError):
    """The store cannot be reached or used right now (down, locked, disk full): fail closed."""

    exit_code = ExitCode.UNAVAILABLE


@dataclass(frozen=True)
class Location:
    """A resolved target: the driver URL (never with a password) and how to name it in messages."""

    url: URL
    description: str
    sqlite_path: Path | None = None

    @property
    def is_sqlite(self) -> bool:
        return self.sqlite_path is not None


def _sqlite_url(path: Path, mode: str) -> URL:
    # A URI filename, so that mode=rw refuses to create a missing file: opening a tower
    # whose database is gone must say so, not serve from a new empty database.
    uri = "file:" + urllib.parse.quote(str(path))
    return URL.create("sqlite+aiosqlite", database=uri, query={"mode": mode, "uri": "true"})


def locate(target: str | os.PathLike[str], *, create: bool = False) -> Location:
    """Resolve a path or URL; UsageError (one line) for anything else."""
    text_target = os.fspath(target)
    if "://" not in text_target:
        path = Path(text_target).expanduser().absolute()
        return Location(_sqlite_url(path, "rwc" if create else "rw"), str(path), path)
    try:
        url = make_url(text_target)
    except exc.ArgumentError:
        raise UsageError(f"bad store URL {_safe(text_target)!r}") from None
    backend = url.get_backend_name()
    if backend == "sqlite":
        if not url.database:
            raise UsageError("an sqlite store URL needs a path: sqlite:///DIR/tower.db")
        return locate(url.database, create=create)
    if backend not in ("postgresql", "postgres"):
        raise UsageError(f"unsupported store {backend!r}: use a path (SQLite) or postgresql://USER@HOST/DB")
    if url.password is not None:
        raise UsageError(
            f"the store URL must not contain a password: put it in a password file or {PASSWORD_ENV}"
        )
    # Named as written (tower.toml), which has no password; the driver's URL is another spelling.
    return Location(url.set(drivername="postgresql+asyncpg"), text_target)


def _safe(text_target: str) -> str:
    """A URL as it may appear in a message: without whatever sits between ``//`` and ``@``."""
    scheme, sep, rest = text_target.partition("://")
    if "@" in rest.split("/", 1)[0]:
        rest = "***@" + rest.split("@", 1)[1]
    return scheme + sep + rest


def read_password(password_file: Path | None, environ: Mapping[str, str]) -> str | None:
    """The PostgreSQL password: the file's first line, else $SUPCTL_STORE_PASSWORD, else None
    (asyncpg then uses PGPASSWORD or ~/.pgpass).  Blocking: call it in a thread."""
    if password_file is not None:
        try:
            first = password_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read the store password file {password_file}: {e}") from None
        if not first or not first[0]:
            raise UsageError(f"the store password file {password_file} is empty")
        return first[0]
    return environ.get(PASSWORD_ENV) or None


def make_engine(location: Location, password: str | None = None) -> AsyncEngine:
    """An engine for the location (no connection is made until it is used)."""
    url = location.url if password is None else location.url.set(password=password)
    if not location.is_sqlite:
        return create_async_engine(url)
    # A pool of kept connections (older SQLAlchemy gave aiosqlite files none): each new one
    # costs a thread and the pragmas, and the last one closing removes the WAL file.
    engine = create_async_engine(url, poolclass=AsyncAdaptedQueuePool)
    event.listen(engine.sync_engine, "connect", _sqlite_connect)
    event.listen(engine.sync_engine, "begin", _sqlite_begin)
    return engine


def _sqlite_connect(dbapi_connection: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
    # The driver must not open transactions by itself: _sqlite_begin does, with the right mode.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")  # first: WAL may wait too
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = FULL")
    finally:
        cursor.close()


def _sqlite_begin(conn: Any) -> None:
    options = conn.get_execution_options()
    if options.get(_READ_OPTION, False):
        return  # autocommit: each statement is a transaction by itself
    conn.exec_driver_sql("BEGIN IMMEDIATE" if options.get(_WRITE_OPTION, False) else "BEGIN")


def reason(error: BaseException) -> str:
    """The driver's one-line reason for an error, without the SQL or its parameters."""
    inner = getattr(error, "orig", None) or error
    message = str(inner).strip() or type(inner).__name__
    return " ".join(message.split())


#: Errors that mean the store is not usable now: the server is down or refuses us (a
#: password rejected is a plain DBAPIError), the disk is full, a lock is held too long...
#: as opposed to a bug or a constraint (IntegrityError, DataError), which propagate as they are.
def _driver_errors() -> tuple[type[BaseException], ...]:
    # Some SQLAlchemy releases let asyncpg's errors while connecting (a password refused, a
    # database that does not exist) through unwrapped.
    try:
        import asyncpg
    except ImportError:  # pragma: no cover - a dependency, but SQLite alone does not need it
        return ()
    return (asyncpg.PostgresError, asyncpg.InterfaceError)


UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    exc.DBAPIError,
    exc.TimeoutError,
    OSError,
    *_driver_errors(),
)
_NOT_UNAVAILABLE = (exc.IntegrityError, exc.DataError)


class Database:
    """An engine with the two kinds of transaction every operation of the store uses."""

    def __init__(self, engine: AsyncEngine, location: Location) -> None:
        self.engine = engine
        self.location = location
        self._peek: sqlite3.Connection | None = None  # see peek_generation

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def unavailable(self, error: BaseException) -> StoreUnavailable:
        return StoreUnavailable(f"the store {self.location.description} is unavailable: {reason(error)}")

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        """A connection for reading, each statement its own transaction (autocommit).

        No BEGIN and COMMIT around a read: on SQLite that saves four of the nine hops to the
        driver's thread, on PostgreSQL two of three round trips, and a token check is one
        SELECT.  Statements of one block may therefore see different commits: a read that
        needs one snapshot of several tables is a single statement (a join).
        """
        try:
            async with self.engine.connect() as conn:
                if self.dialect == "postgresql":  # the driver's own autocommit: nothing sent
                    await conn.execution_options(isolation_level="AUTOCOMMIT")
                else:  # SQLite's driver is in autocommit already; _sqlite_begin sends nothing
                    await conn.execution_options(**{_READ_OPTION: True})
                yield conn
        except _NOT_UNAVAILABLE:
            raise
        except UNAVAILABLE_ERRORS as e:
            raise self.unavailable(e) from e

    @contextlib.asynccontextmanager
    async def write(self, *, bump: bool = False) -> AsyncIterator[AsyncConnection]:
        """A write transaction: committed when the block ends, rolled back if it raises.

        ``bump``: the transaction changes credentials or policies: the generation counter
        is incremented first thing (on PostgreSQL that also takes its row lock, so every
        credential writer locks in the same order and none deadlocks), and the value is
        given to :func:`track` once committed.
        """
        committed: int | None = None
        try:
            async with self.engine.connect() as conn:
                await conn.execution_options(**{_WRITE_OPTION: True})
                async with conn.begin():
                    if bump:
                        committed = int((await conn.execute(_BUMP)).scalar_one())
                        if self.dialect == "postgresql":  # delivered at the commit, or never
                            await conn.execute(_NOTIFY)
                    yield conn
        except _NOT_UNAVAILABLE:
            raise
        except UNAVAILABLE_ERRORS as e:
            raise self.unavailable(e) from e
        seen = _COMMITTED.get()
        if committed is not None and seen is not None:
            seen.append(committed)

    async def listen(self, on_change: Callable[[], None]) -> None:
        """PostgreSQL: call ``on_change`` at every committed credential write (of any
        process), from now until the connection is lost (then this returns; the caller
        listens again) or the task is cancelled.  SQLite has no such thing: returns at once."""
        if self.dialect != "postgresql":
            return
        lost = asyncio.Event()
        try:
            async with self.engine.connect() as conn:
                raw = (await conn.get_raw_connection()).driver_connection
                if raw is None:
                    return
                try:
                    raw.add_termination_listener(lambda _: lost.set())
                    await raw.add_listener(CHANNEL, lambda *_: on_change())
                    await lost.wait()
                finally:
                    # Not back to the pool with LISTEN on it (the pool sends no UNLISTEN).
                    with contextlib.suppress(*UNAVAILABLE_ERRORS):
                        await conn.invalidate()
        except _NOT_UNAVAILABLE:
            raise
        except UNAVAILABLE_ERRORS as e:
            raise self.unavailable(e) from e

    async def generation(self) -> int:
        """The generation counter: changed by every committed credential write."""
        async with self.read() as conn:
            return int((await conn.execute(_GENERATION)).scalar_one())

    def peek_generation(self) -> int | None:
        """SQLite: the generation counter read synchronously, or None (PostgreSQL, or any
        trouble: the caller then awaits :meth:`generation`).

        Every request is judged after a freshness check, and through SQLAlchemy's asyncio
        layer and aiosqlite's thread that check cost 0.6-0.9 ms, a third of a whole session
        upgrade; on a plain read-only sqlite3 connection it is 5 us (measured), the order of
        the ``stat`` the file-based tower made per request.  In WAL mode a reader never
        waits for a writer (it reads the last commit from the WAL index), and the timeout is
        0, so a rare busy state (WAL recovery) falls back to the async path instead of
        blocking the loop.  One connection, used by the event loop's thread (tests drive a
        store from several loops in turn, never at once)."""
        path = self.location.sqlite_path
        if path is None:
            return None
        try:
            if self._peek is None:
                uri = "file:" + urllib.parse.quote(str(path)) + "?mode=ro"
                self._peek = sqlite3.connect(
                    uri, uri=True, timeout=0, isolation_level=None, check_same_thread=False
                )
            row = self._peek.execute("SELECT value FROM generation WHERE id = 1").fetchone()
        except (sqlite3.Error, sqlite3.ProgrammingError):
            self._close_peek()
            return None
        return int(row[0]) if row is not None else None

    def _close_peek(self) -> None:
        if self._peek is not None:
            with contextlib.suppress(sqlite3.Error):
                self._peek.close()
            self._peek = None

    async def dispose(self) -> None:
        self._close_peek()
        await self.engine.dispose()


async def serialise(conn: AsyncConnection, key: int) -> None:
    """PostgreSQL: wait for other transactions holding ``key`` until this one ends.  SQLite:
    nothing to do (a write transaction holds the database's one write lock)."""
    if conn.dialect.name == "postgresql":
        await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
