"""An in-process :class:`~supctl.tower.server.Tower` on a real SQLite store in a temporary
directory, for tests that call the tower's hooks directly (no subprocess, no TLS).

The tower judges with a :class:`~supctl.tower.directory.Directory` loaded from the
store; the helpers here change the store as ``control-tower`` would (another
writer), then bring the directory up to date as the tower does before a request.
"""

from __future__ import annotations

import asyncio
import datetime
import threading
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

from supctl.tower import database
from supctl.tower.database import SQLStore
from supctl.tower.directory import Directory
from supctl.tower.limits import Limits
from supctl.tower.policywatch import PolicyWatch
from supctl.tower.server import Tower

T = TypeVar("T")


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion on an event loop of its own, in a thread of its own: it
    works from a test's plain code and from inside a running loop alike (which waits:
    nothing else runs meanwhile, as when the tower awaits the store)."""
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(coro))
        except BaseException as exc:  # handed to the caller
            error.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


#: Every Kit not closed yet; conftest closes them after each test: an aiosqlite connection
#: left open outlives its event loop, and its thread fails when it is collected (pytest's
#: PytestUnhandledThreadExceptionWarning, in whichever test runs then).
OPEN_KITS: list[Kit] = []


class Kit:
    """A store, its directory (watching ``DIR/policies.toml``) and a tower on them."""

    def __init__(
        self,
        directory: Path,
        limits: Limits | None = None,
        *,
        wall_clock: Callable[[], datetime.datetime] = utc_now,
        **tower: Any,
    ) -> None:
        self.path = directory / "tower.db"
        self.policies = directory / "policies.toml"
        run(database.create(self.path))
        self.store: SQLStore = run(database.open(self.path))
        OPEN_KITS.append(self)
        self.directory: Directory = run(
            Directory.load(self.store, watch=PolicyWatch(self.policies), clock=wall_clock)
        )
        self.tower = Tower(self.directory, None, limits or Limits(), **tower)

    def other_store(self) -> SQLStore:
        """Another connection to the same store: a ``control-tower`` command's."""
        return run(database.open(self.path))

    def fresh(self) -> None:
        """What the tower does before each request, and its poll every 0.25 s."""
        run(self.directory.fresh())

    def admin(self, change: Callable[[SQLStore], Coroutine[Any, Any, T]]) -> T:
        """A change made by ``control-tower`` in another process (its own connection to
        the store), then seen by the tower's next poll."""

        async def command() -> T:
            other = await database.open(self.path)
            try:
                return await change(other)
            finally:
                await other.close()

        done = run(command())
        self.fresh()
        return done

    def rotate_site(self, name: str) -> str:
        return self.admin(lambda store: store.sites.rotate(name, now=utc_now()))

    def remove_site(self, name: str) -> None:
        self.admin(lambda store: store.sites.remove(name))

    def add_admin_token(self) -> str:
        return self.admin(lambda store: store.admins.add(now=utc_now()))

    def add_site(self, name: str) -> str:
        token = run(self.store.sites.add(name, now=utc_now()))
        self.fresh()
        return token

    def add_user(self, name: str, password: str, policies: Sequence[str]) -> None:
        run(self.store.users.add(name, password, policies, now=utc_now()))
        self.fresh()

    def add_token(self, user: str, kind: str = "login", lifetime: datetime.timedelta | None = None) -> str:
        issued = run(
            self.store.tokens.add(user, kind, lifetime or datetime.timedelta(hours=1), now=utc_now())
        )
        self.fresh()
        return issued.token

    def close(self) -> None:
        if self in OPEN_KITS:  # once
            OPEN_KITS.remove(self)
            run(self.store.close())


def open_directory(path: Path) -> Directory:
    """A serving tower's copy of the store at ``path``, for its synchronous lookups: the
    store is closed again at once (an aiosqlite connection left open outlives its event
    loop and fails in its thread when collected)."""

    async def load() -> Directory:
        store = await database.open(path)
        try:
            return await Directory.load(store)
        finally:
            await store.close()

    return run(load())
