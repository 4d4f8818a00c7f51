"""The tower's audit writer (supctl.tower.auditsink) on a real store, SQLite and PostgreSQL.

Outages are real: on SQLite another connection holds the write lock (the store's busy
timeout lowered to 100 ms, so that a write fails fast); on PostgreSQL the tower's role
loses its right to log in and its connections are cut.  Backoff, stalls and retention are
driven by a fake clock and a fake sleep (no test sleeps for the writer's timers); waiting
for the writer's task uses a deadline.
"""

from __future__ import annotations

import asyncio
import datetime
import itertools
import logging
import sqlite3
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pg_cluster import PostgresCluster
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncConnection
from towerkit import Kit
from websockets.datastructures import Headers
from websockets.http11 import Request

from supctl.tower import audit, auditsink, database
from supctl.tower.auditsink import AuditSink
from supctl.tower.database.auditlog import encode
from supctl.tower.database.engine import LOCK_AUDIT, make_engine
from supctl.tower.server import Tower

T0 = datetime.datetime(2030, 1, 1, 12, 0, tzinfo=datetime.UTC)
DAY = datetime.timedelta(days=1)
DEADLINE = 20.0


@dataclass
class Backend:
    """A new store, and ways to make it fail for real."""

    name: str
    url: str
    password_file: Path | None = None
    cluster: PostgresCluster | None = None
    busy_ms: int = 100
    _lock: sqlite3.Connection | None = None
    _held: list[AsyncConnection] = field(default_factory=list)

    async def open(self) -> database.SQLStore:
        store = await database.open(self.url, password_file=self.password_file)
        if self.name == "sqlite":
            busy = self.busy_ms

            def short_busy(dbapi_connection: Any, _record: object) -> None:
                cursor = dbapi_connection.cursor()
                cursor.execute(f"PRAGMA busy_timeout = {busy}")  # after the store's own 10 s
                cursor.close()

            event.listen(store.db.engine.sync_engine, "connect", short_busy)
            await store.db.engine.dispose()  # the pooled connection has the long timeout
        return store

    async def down(self) -> None:
        """Writes fail: the SQLite write lock is held; the PostgreSQL role cannot log in."""
        if self.cluster is None:
            self._lock = sqlite3.connect(self.url, isolation_level=None)
            self._lock.execute("BEGIN IMMEDIATE")
            return
        await asyncio.to_thread(self.cluster.sql, "ALTER ROLE tower NOLOGIN")
        await asyncio.to_thread(
            self.cluster.sql, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'tower'"
        )

    async def up(self) -> None:
        if self.cluster is None:
            if self._lock is not None:
                self._lock.execute("ROLLBACK")
                self._lock.close()
                self._lock = None
            return
        await asyncio.to_thread(self.cluster.sql, "ALTER ROLE tower LOGIN")

    async def stall(self) -> None:
        """Writes wait (without failing) until :meth:`unstall`."""
        if self.cluster is None:
            await self.down()  # the test opened the store with a long busy timeout
            return
        engine = make_engine(database.locate(self.url), self.cluster.password)
        conn = await engine.connect()
        await conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": LOCK_AUDIT})
        self._held.append(conn)

    async def unstall(self) -> None:
        if self.cluster is None:
            await self.up()
            return
        for conn in self._held:
            await conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": LOCK_AUDIT})
            await conn.close()
            await conn.engine.dispose()
        self._held.clear()

    async def poison(self) -> None:
        """A row the store refuses (a constraint, not an outage): site 'poison'."""
        if self.cluster is None:
            statement = (
                "CREATE TRIGGER poison BEFORE INSERT ON audit WHEN NEW.site = 'poison'"
                " BEGIN SELECT RAISE(ABORT, 'poisoned row'); END"
            )
        else:
            statement = "ALTER TABLE audit ADD CONSTRAINT poison CHECK (site IS DISTINCT FROM 'poison')"
        store = await database.open(self.url, password_file=self.password_file)
        try:
            async with store.db.write() as conn:
                await conn.execute(text(statement))
        finally:
            await store.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "sqlite":
        found = Backend("sqlite", str(tmp_path / "tower.db"))
    else:
        cluster: PostgresCluster = request.getfixturevalue("pg_cluster")
        name = "a_" + uuid.uuid4().hex[:16]
        url = cluster.create_database(name)
        found = Backend("postgresql", url, cluster.write_password_file(tmp_path / "pw"), cluster)
    asyncio.run(database.create(found.url, password_file=found.password_file))
    try:
        yield found
    finally:
        asyncio.run(found.up())
        if found.cluster is not None:
            found.cluster.drop_database(found.url.rsplit("/", 1)[1].split("?")[0])


class FakeTime:
    """A monotonic clock that moves only when the writer sleeps (or a test says so)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)  # let the test's coroutine and the drivers run


async def until(predicate: Callable[[], object], what: str, deadline: float = DEADLINE) -> None:
    """Wait for the writer task (on this loop) to reach a state, with a deadline."""
    end = time.monotonic() + deadline
    while not predicate():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def run(backend: Backend, body: Callable[[database.SQLStore], Awaitable[None]]) -> None:
    async def main() -> None:
        store = await backend.open()
        try:
            await body(store)
        finally:
            await store.close()

    asyncio.run(main())


def show() -> dict[str, Any]:
    return audit.record("show", verb="show", user="admin", status=200, result="ok")


def closed(stream: int) -> dict[str, Any]:
    return audit.record("stream-closed", stream=stream, user="admin", site="paris-1", close_reason="eof")


def events(rows: Sequence[database.AuditRow]) -> list[tuple[str, Any]]:
    return [(r.record["event"], r.record["stream"]) for r in rows]


def messages(caplog: pytest.LogCaptureFixture, fragment: str) -> int:
    return sum(fragment in r.getMessage() for r in caplog.records)


class Counting:
    """The store's audit table, counting the transactions of appends."""

    def __init__(self, rows: auditsink.AuditRows) -> None:
        self.inner = rows
        self.batches: list[int] = []

    async def append_rows(self, rows: Sequence[Mapping[str, Any]]) -> None:
        await self.inner.append_rows(rows)
        self.batches.append(len(rows))

    async def delete_batch(self, cutoff: datetime.datetime, *, batch: int = 10_000) -> int:
        return await self.inner.delete_batch(cutoff, batch=batch)


def tower_with(sink: AuditSink, tmp_path: Path) -> tuple[Callable[[str], int], str]:
    """A Tower writing to ``sink``; a function answering a ``show`` GET with a bearer token."""
    (tmp_path / "kit").mkdir()  # the tower's own store, beside the audit's under test
    kit = Kit(tmp_path / "kit")
    token = kit.add_admin_token()
    tower = Tower(kit.directory, sink)
    peer: Any = SimpleNamespace(remote_address=("127.0.0.1", 5555))

    def get(authorization: str) -> int:
        request = Request("/v1/state/sites", Headers([("Authorization", authorization)]))
        response = tower.process_request(peer, request)
        assert response is not None
        return response.status_code

    return get, f"Bearer {token}"


# --- writing ---------------------------------------------------------------------------------


def test_every_record_written_in_order_in_batches(backend: Backend) -> None:
    async def body(store: database.SQLStore) -> None:
        counting = Counting(store.audit)
        sink = AuditSink(counting, batch=100)
        records = [closed(i) for i in range(1050)]
        assert all(sink.append(rec) for rec in records)  # before the writer ever runs
        sink.start()
        assert await sink.stop() == 0
        rows = await store.audit.query(limit=5000)
        assert [r.record["stream"] for r in rows] == list(range(1050))
        assert [r.line for r in rows[:3]] == [encode(rec) for rec in records[:3]]  # the line as made
        assert counting.batches == [100] * 10 + [50]  # many records per transaction

    run(backend, body)


def test_store_down_refuses_new_sessions_keeps_the_rest_and_logs_once(
    backend: Backend, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Hostile: the store goes down.  New sessions get 503 (fail closed), the reason is logged
    once however many retries and refusals follow, records of running sessions are kept and
    written once the store is back, with a backoff driven by the (fake) clock."""
    caplog.set_level(logging.WARNING, "supctl.tower")
    fake = FakeTime()

    async def body(store: database.SQLStore) -> None:
        sink = AuditSink(store.audit, clock=fake.clock, sleep=fake.sleep)
        get, admin = tower_with(sink, tmp_path)
        sink.start()
        assert get(admin) == 200
        await until(lambda: sink.written == 1, "the first record")
        await backend.down()
        assert sink.append(closed(1))  # a running session's stream: taken, its write fails
        await until(lambda: sink.down is not None, "the store to be marked down")
        for _ in range(20):
            assert get(admin) == 503  # refused: the session could not be recorded
        assert get("Bearer sct_admin_nope") == 401  # a refusal keeps its own status
        assert sink.append(closed(2))  # kept for later
        await until(lambda: len([s for s in fake.sleeps if s >= 0.1]) >= 20, "20 retries")
        backoff = [s for s in fake.sleeps if s >= auditsink.BACKOFF]
        backoff = backoff[backoff.index(auditsink.BACKOFF) :]  # before: the batching interval
        assert backoff[:9] == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0]
        assert messages(caplog, "audit log: cannot write to the store") == 1
        down_for = fake.now - 1000.0
        assert messages(caplog, "still cannot write") <= down_for // auditsink.ERROR_INTERVAL
        assert messages(caplog, "refusing new sessions") == 1  # 20 refusals, one line
        await backend.up()
        await until(lambda: sink.down is None, "the store to be back")
        assert get(admin) == 200
        assert await sink.stop() == 0
        assert messages(caplog, "the store works again") == 1
        got = events(await store.audit.query())
        assert got == [
            ("show", None),
            ("stream-closed", 1),
            ("session-refused", None),
            ("stream-closed", 2),
            ("show", None),
        ]

    run(backend, body)


def test_full_queue_refuses_new_sessions_and_keeps_room_for_running_ones(
    backend: Backend, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Hostile: the queue is full (the writer cannot keep up).  Admissions stop at half;
    a flood of refusals cannot take the other half, which running sessions' records use;
    what still does not fit is counted and logged (once)."""
    caplog.set_level(logging.WARNING, "supctl.tower")

    async def body(store: database.SQLStore) -> None:
        sink = AuditSink(store.audit, capacity=10, admit=5)
        get, admin = tower_with(sink, tmp_path)
        assert [get(admin) for _ in range(6)] == [200] * 5 + [503]  # nothing written yet
        assert get("Bearer sct_admin_nope") == 401  # answered; its record is lost (counted)
        assert [sink.append(closed(i)) for i in range(6)] == [True] * 5 + [False]
        assert (sink.waiting, sink.lost, sink.refused) == (10, 2, 1)
        assert messages(caplog, "refusing new sessions") == 1
        assert messages(caplog, "records lost so far") == 1
        sink.start()
        await until(lambda: sink.waiting == 0, "the queue to drain")
        assert get(admin) == 200
        assert await sink.stop() == 2
        assert len(await store.audit.query()) == 11

    run(backend, body)


def test_a_stalled_write_refuses_new_sessions(backend: Backend, tmp_path: Path) -> None:
    """Hostile: the store neither answers nor fails (a lock held, a server gone quiet):
    after STALL seconds of one write, admissions are refused; relaying never waited."""
    fake = FakeTime()
    backend.busy_ms = 30_000  # SQLite: the write waits for the lock instead of failing

    async def body(store: database.SQLStore) -> None:
        sink = AuditSink(store.audit, clock=fake.clock, sleep=fake.sleep)
        get, admin = tower_with(sink, tmp_path)
        sink.start()
        await backend.stall()
        assert get(admin) == 200  # taken; its write now waits
        await until(lambda: sink._busy_since is not None, "the write to start")
        assert get(admin) == 200  # a slow write is not a stalled one yet
        fake.now += auditsink.STALL + 0.1
        assert get(admin) == 503
        assert sink.append(closed(1))  # running sessions' records are still taken
        await backend.unstall()
        await until(lambda: sink.waiting == 0, "the queue to drain")
        assert get(admin) == 200
        assert await sink.stop() == 0
        assert [e for e, _ in events(await store.audit.query())] == ["show"] * 2 + ["stream-closed", "show"]

    run(backend, body)


def test_stopping_while_down_says_how_many_records_are_lost(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "supctl.tower")
    fake = FakeTime()

    async def body(store: database.SQLStore) -> None:
        sink = AuditSink(store.audit, clock=fake.clock, sleep=fake.sleep)
        sink.start()
        await backend.down()
        assert all(sink.append(closed(i)) for i in range(3))
        await until(lambda: sink.down is not None, "the store to be marked down")
        assert await sink.stop(grace=0.2) == 3
        assert messages(caplog, "the tower stops with 3 records not written to the store") == 1
        assert not sink.append(closed(4))  # stopped

    run(backend, body)


def test_a_record_the_store_refuses_does_not_block_the_others(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    """Hostile: a row the store refuses (not an outage) is dropped and logged; the batch's
    other records are written and the store is not marked down."""
    caplog.set_level(logging.WARNING, "supctl.tower")
    asyncio.run(backend.poison())

    async def body(store: database.SQLStore) -> None:
        sink = AuditSink(store.audit)
        poisoned = audit.record("session-refused", site="poison", status=404)
        assert sink.append(closed(1)) and sink.append(poisoned) and sink.append(closed(2))
        sink.start()
        assert await sink.stop() == 1
        assert sink.down is None
        assert events(await store.audit.query()) == [("stream-closed", 1), ("stream-closed", 2)]
        assert messages(caplog, "record was refused by the store") == 1

    run(backend, body)


# --- retention -------------------------------------------------------------------------------


def test_retention_deletes_old_records_in_batches(backend: Backend) -> None:
    fake = FakeTime()

    async def body(store: database.SQLStore) -> None:
        def at(moment: datetime.datetime, stream: int) -> dict[str, Any]:
            rec = closed(stream)
            rec["time"] = moment.isoformat(timespec="milliseconds")
            return rec

        old = [at(T0 - 91 * DAY, i) for i in range(5)]
        await store.audit.append([*old, at(T0 - 89 * DAY, 5), at(T0, 6)])
        sink = AuditSink(store.audit, keep=90 * 86400, prune_batch=2, sleep=fake.sleep)
        assert await sink.prune(T0) == 5
        assert fake.sleeps == [auditsink.PRUNE_PAUSE] * 2  # 3 transactions, appends between
        assert [r.record["stream"] for r in await store.audit.query()] == [5, 6]
        assert await sink.prune(T0 + 2 * DAY) == 1  # now 91 days old
        assert await AuditSink(store.audit).prune(T0 + 1000 * DAY) == 0  # no retention: kept

    run(backend, body)


def test_the_retention_runs_periodically(backend: Backend) -> None:
    fake = FakeTime()
    days = itertools.count(step=2)  # each prune 2 days after the previous one

    async def body(store: database.SQLStore) -> None:
        rec = closed(1)
        rec["time"] = (T0 - 89 * DAY).isoformat()
        await store.audit.append([rec])
        sink = AuditSink(store.audit, keep=90 * 86400, wall=lambda: T0 + next(days) * DAY, sleep=fake.sleep)
        sink.start()
        await until(lambda: fake.sleeps.count(auditsink.PRUNE_INTERVAL) >= 2, "two prunes")
        assert await store.audit.count() == 0  # the second prune (2 days later) took it
        await sink.stop()

    run(backend, body)
