"""The tower's audit log, written to the store without holding up the event loop.

The tower calls :meth:`AuditSink.append` on its event loop, where every
microsecond is taken from relaying: it turns the record into its row (one JSON
encoding) and puts it in a bounded queue, and says at once whether it was taken.
A background task writes what is queued in batches, one transaction each (the
drivers are asynchronous: asyncpg on the loop's sockets, aiosqlite in a thread
of its own), so a commit (an fsync on SQLite) is paid per batch, not per record.

Failing closed (docs/audit.md, "Writing"): a record that opens something (a
session, a ``show``, a login) is refused, and the tower answers 503, when the
store is known to be down (the last write failed), when a write has been
stuck for :data:`STALL` seconds, or when the queue is half full.  Records of
sessions already accepted (``stream-closed`` ...) may use the other half and are
kept while the store is down: a failed batch is retried, with backoff, until a
write succeeds; only a full queue or a stop while the store is down loses
records, and then the tower says how many.  Errors are logged once, then at
most every :data:`ERROR_INTERVAL` seconds.  Time comes from the injected
``clock``, ``wall`` and ``sleep``, so tests drive the backoff and the retention
with fake ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from .database.auditlog import encode, row_values
from .database.engine import StoreUnavailable
from .database.engine import reason as driver_reason

if TYPE_CHECKING:
    pass

log = logging.getLogger("supctl.tower")

#: Records the tower refuses a request on when they cannot be taken (answered 503).
ADMISSION_EVENTS = frozenset({"session-accepted", "show", "login", "logout", "renew"})
#: Records a peer can cause without being let in (a bad token costs one): kept below the
#: same mark as admissions, so that a flood of them cannot eat the reserve.
REFUSAL_EVENTS = frozenset({"session-refused"})

#: Most records waiting (queued or being written).  A queued row is its JSON line (about
#: 700 bytes) and four short column values: about 1 KiB (measured), so 10,000 cost about 10 MiB at
#: worst.  The writer drains 10,000 in about a second on SQLite, 1-2 on PostgreSQL (bench/audit_bench.py); a
#: longer backlog means the store cannot keep up, and refusing new sessions is the answer.
CAPACITY = 10_000
#: Admissions (and refusals) are taken only while fewer than this many records wait: the
#: other half is kept for the records of sessions already accepted (a site's 4,096 streams,
#: streams-per-site, all ending while the store is down still fit).
ADMIT = CAPACITY // 2
#: Most records in one transaction (bounds a statement to about 1 MB of parameters).
BATCH = 1000
#: At most one transaction every this many seconds; records arriving meanwhile join the
#: next batch.  A record after a quiet spell is written at once; under a steady load each
#: commit (SQLAlchemy, a driver thread, an fsync) serves up to 0.2 s of records.  At 5 ms
#: the commits cost the tower 60% more CPU per session upgrade than the file-based tower
#: did (bench/upgrades.py); at 0.2 s it is back within a few percent.  The price: a
#: kill -9 can lose up to the last 0.2 s of records (docs/audit.md).
INTERVAL = 0.2
#: A write taking longer than this (SQLite waiting for a lock, PostgreSQL not answering)
#: makes admissions refused until it ends.
STALL = 2.0
#: Retries of a failed batch wait BACKOFF, doubled each time up to BACKOFF_MAX seconds.
BACKOFF = 0.1
BACKOFF_MAX = 5.0
#: While the store stays down, at most one error line per this many seconds.
ERROR_INTERVAL = 60.0
#: ``stop`` waits this long for the queue to be written before giving up on it.
STOP_GRACE = 5.0
#: Retention: a prune every PRUNE_INTERVAL seconds, deleting PRUNE_BATCH rows per transaction
#: and pausing PRUNE_PAUSE seconds between two (appends get the write lock in between).
PRUNE_INTERVAL = 3600.0
PRUNE_BATCH = 5000
PRUNE_PAUSE = 0.05


class AuditRows(Protocol):
    """The store's audit table (:class:`supctl.tower.database.auditlog.AuditRecords`)."""

    async def append_rows(self, rows: Sequence[Mapping[str, Any]]) -> None: ...

    async def delete_batch(self, cutoff: datetime.datetime, *, batch: int = ...) -> int: ...


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class AuditSink:
    """A bounded queue of audit rows and the task that writes them (see the module's doc)."""

    def __init__(
        self,
        rows: AuditRows,
        *,
        keep: float | None = None,
        capacity: int = CAPACITY,
        admit: int | None = None,
        batch: int = BATCH,
        prune_batch: int = PRUNE_BATCH,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime.datetime] = utc_now,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.rows = rows
        self.keep = keep  # retention in seconds; None keeps every record
        self.capacity = capacity
        self.admit = capacity // 2 if admit is None else admit
        self.batch = batch
        self.prune_batch = prune_batch
        self.clock = clock
        self.wall = wall
        self.sleep = sleep
        self._queue: deque[dict[str, Any]] = deque()
        self._pending: list[dict[str, Any]] = []  # the batch being written (kept on failure)
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()  # nothing waiting
        self._idle.set()
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self._reported = False  # the count of lost records was logged at the stop
        self._busy_since: float | None = None  # a write in progress since then
        self._last_start = -INTERVAL
        #: Why the store is down (the last write failed), or None.
        self.down: str | None = None
        self._down_since = 0.0
        self._failures = 0
        self._logged: dict[str, float] = {}  # message kind -> when last logged
        self.written = 0
        self.lost = 0  # records taken or offered that will never be written
        self.refused = 0  # admissions refused (their request answered 503)
        #: Called with the seconds each successful batch write took (the tower's metrics).
        self.on_write: Callable[[float], None] | None = None

    # --- on the event loop: never waits ----------------------------------------------

    @property
    def waiting(self) -> int:
        return len(self._queue) + len(self._pending)

    def append(self, rec: dict[str, Any]) -> bool:
        """Queue ``rec``; False if it was not taken (for an admission: refuse the request)."""
        event = rec.get("event")
        admission = event in ADMISSION_EVENTS
        reason = self._refusal(admission or event in REFUSAL_EVENTS, admission)
        if reason is not None:
            if admission:
                self.refused += 1
                self._log_error("refuse", "audit log: %s: refusing new sessions", reason)
            else:
                self.lost += 1
                self._log_error("lose", "audit log: %s: %d records lost so far", reason, self.lost)
            return False
        try:
            row = row_values(rec, encode(rec))
        except (TypeError, ValueError) as exc:  # a bug in whoever made the record
            self.lost += 1
            self._log_error("bad", "audit log: a %r record cannot be encoded (%s): lost", event, exc)
            return False
        self._queue.append(row)
        self._idle.clear()
        self._wake.set()
        return True

    def _refusal(self, limited: bool, admission: bool) -> str | None:
        if self._closed:
            return "the tower is stopping"
        if admission and self.down is not None:
            return f"the store is down ({self.down})"
        if admission and self._busy_since is not None and self.clock() - self._busy_since > STALL:
            return f"a write to the store has not finished for {STALL:g} s"
        if self.waiting >= (self.admit if limited else self.capacity):
            return f"the queue is full ({self.waiting} records waiting)"
        return None

    def _log_error(self, kind: str, message: str, *args: object) -> None:
        """Log once, then at most every ERROR_INTERVAL seconds per kind of message."""
        moment = self.clock()
        last = self._logged.get(kind)
        if last is None or moment - last >= ERROR_INTERVAL:
            self._logged[kind] = moment
            log.error(message, *args)

    # --- the writer ------------------------------------------------------------------

    def start(self) -> None:
        """Start writing (and pruning, with a retention), on the running loop."""
        self._tasks.append(asyncio.create_task(self._write_forever(), name="audit-writer"))
        if self.keep is not None:
            self._tasks.append(asyncio.create_task(self._prune_forever(), name="audit-retention"))

    def _take(self) -> None:
        while self._queue and len(self._pending) < self.batch:
            self._pending.append(self._queue.popleft())

    async def _write_forever(self) -> None:
        while True:
            while not self._queue and not self._pending:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
            wait = self._last_start + INTERVAL - self.clock()
            if wait > 0:
                await self.sleep(wait)  # records arriving meanwhile join this batch
            self._take()
            self._last_start = self._busy_since = self.clock()
            try:
                await self._write(self._pending)
            except StoreUnavailable as exc:
                self._busy_since = None
                await self._failed(str(exc))
                self._last_start = self.clock() - INTERVAL  # the backoff spaced the retry already
                continue
            self._busy_since = None
            self.written += len(self._pending)
            self._pending = []
            if self.down is not None:
                log.warning(
                    "audit log: the store works again after %.1f s and %d failed writes;"
                    " new sessions are accepted again (%d records waiting)",
                    self.clock() - self._down_since, self._failures, self.waiting,
                )  # fmt: skip
                self.down = None
                self._logged.pop("down", None)
            self._failures = 0

    async def _write(self, rows: list[dict[str, Any]]) -> None:
        try:
            started = self.clock()
            await self.rows.append_rows(rows)
            if self.on_write is not None:
                self.on_write(self.clock() - started)
        except StoreUnavailable:
            raise
        except Exception as exc:  # not an outage: a row the store refuses must not block the rest
            log.error(
                "audit log: a batch of %d records was refused (%s); writing them one by one",
                len(rows),
                driver_reason(exc),
            )
            kept = []
            for row in rows:
                try:
                    await self.rows.append_rows([row])
                except StoreUnavailable:
                    kept.append(row)  # retried with the rest
                except Exception as exc:
                    self.lost += 1
                    log.error(
                        "audit log: a %r record was refused by the store (%s): lost",
                        row["event"],
                        driver_reason(exc),
                    )
            rows[:] = kept
            if kept:
                raise StoreUnavailable("the store failed while writing records one by one") from None

    async def _failed(self, reason: str) -> None:
        self._failures += 1
        if self.down is None:
            self.down, self._down_since = reason, self.clock()
            self._logged["down"] = self.clock()
            log.error(
                "audit log: cannot write to the store: %s; new sessions are refused until it works again"
                " (%d records waiting, kept and retried)",
                reason, self.waiting,
            )  # fmt: skip
        else:
            self.down = reason
            self._log_error(
                "down",
                "audit log: still cannot write to the store after %.0f s and %d attempts: %s (%d records waiting)",
                self.clock() - self._down_since, self._failures, reason, self.waiting,
            )  # fmt: skip
        await self.sleep(min(BACKOFF_MAX, BACKOFF * 2 ** min(self._failures - 1, 16)))

    # --- retention -------------------------------------------------------------------

    async def prune(self, now: datetime.datetime) -> int:
        """Delete the records older than ``now`` minus the retention; how many."""
        if self.keep is None:
            return 0
        cutoff = now - datetime.timedelta(seconds=self.keep)
        deleted = 0
        while True:
            done = await self.rows.delete_batch(cutoff, batch=self.prune_batch)
            deleted += done
            if done < self.prune_batch:
                return deleted
            await self.sleep(PRUNE_PAUSE)

    async def _prune_forever(self) -> None:
        while True:
            try:
                deleted = await self.prune(self.wall())
            except StoreUnavailable as exc:
                log.warning("audit log: cannot apply the retention now: %s", exc)
            else:
                if deleted:
                    log.info("audit log: deleted %d records older than the retention", deleted)
            await self.sleep(PRUNE_INTERVAL)

    # --- stopping --------------------------------------------------------------------

    async def stop(self, grace: float = STOP_GRACE) -> int:
        """Write what is queued (waiting at most ``grace`` seconds), stop; how many records
        were lost in all (logged)."""
        if self._tasks and not self._tasks[0].done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), grace)
        self._closed = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        self.close()
        return self.lost

    def close(self) -> None:
        """Take no more records; log (once) what will never be written."""
        self._closed = True
        unwritten = self.waiting
        if unwritten:
            self.lost += unwritten
            self._queue.clear()
            self._pending = []
            why = f" (the store is down: {self.down})" if self.down else ""
            log.error("audit log: the tower stops with %d records not written to the store%s", unwritten, why)
        if self.lost and not self._reported:
            self._reported = True
            log.error("audit log: %d records lost in all since the tower started", self.lost)
