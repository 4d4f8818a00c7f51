"""This replica in the store's cluster: its membership, its heartbeat, and the claims of
the site links it holds (the store's side: :mod:`.database.cluster`).

The hub stays synchronous: when a site's HELLO has passed its local checks it asks
:meth:`Presence.claim`, which records the claim in the store on a task and then calls
back with None (the link is this replica's) or the reason it is refused (another live
replica holds the site).  Releases and heartbeats are tasks too; a store that cannot be
reached refuses new claims (fail closed) and is logged once until it is back.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import socket
from collections.abc import Awaitable, Callable

from .database import StoreUnavailable
from .database.cluster import EXPIRY, HEARTBEAT, Cluster, Holder

log = logging.getLogger("supctl.tower")


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host exists (a replica row of a killed tower)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def refusal(site: str, holder: Holder) -> str:
    return f"site {site} is already connected to replica {holder.replica} (from {holder.peer})"


class Presence:
    """``replica`` (``[cluster] id``) of this process; see :mod:`.database.cluster`."""

    def __init__(
        self,
        cluster: Cluster,
        replica: str,
        *,
        now: Callable[[], datetime.datetime] = utc_now,
        host: str | None = None,
        pid: int | None = None,
        on_taken_over: Callable[[str], None] = lambda reason: None,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        self.cluster = cluster
        self.replica = replica
        self.now = now
        self.host = host or socket.gethostname()
        self.pid = os.getpid() if pid is None else pid
        self.tasks: set[asyncio.Task[None]] = set()
        self.holders: dict[str, Holder] = {}  # every live claim, as of the last heartbeat
        # Called when this replica finds its row gone or taken over: its site links' claims
        # are void (another replica may hold those sites now), so the tower closes them.
        self.on_taken_over = on_taken_over
        self.sleep = sleep

    async def join(self) -> None:
        """Register; UsageError (one line) if another live process is this replica, or
        if the store is SQLite and another replica runs."""
        await self.cluster.join(self.replica, self.host, self.pid, now=self.now(), alive=pid_alive)
        log.info("joined the store's cluster as replica %s", self.replica)

    async def leave(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        try:
            await self.cluster.leave(self.replica, self.pid)
        except StoreUnavailable as exc:  # the heartbeat stops: the claims expire by themselves
            log.warning("cannot leave the cluster: %s", exc)

    async def beat_forever(self, sleep: Callable[[float], Awaitable[object]] = asyncio.sleep) -> None:
        """A heartbeat every HEARTBEAT seconds, and the holders of every site read back."""
        down = False
        while True:
            await sleep(HEARTBEAT)
            try:
                if not await self.cluster.heartbeat(self.replica, self.pid, now=self.now()):
                    # Silent for longer than the expiry (a pause, a store outage) and taken
                    # over, or deleted: our claims are void, so our site links go (their
                    # enforcers come back and claim again), and we join again.
                    reason = f"replica {self.replica} lost its registration in the store"
                    log.error("%s; closing its site links and joining again", reason)
                    self.on_taken_over(reason)
                    await self.join()
                self.holders = await self.cluster.holders(now=self.now())
            except StoreUnavailable as exc:
                if not down:
                    log.error("cannot write the heartbeat: %s", exc)
                down = True
                continue
            except Exception:  # a bug here must not stop the heartbeat for good
                log.exception("internal error in the heartbeat")
                continue
            if down:
                log.warning("the heartbeat works again")
            down = False

    def claim(self, site: str, peer: str, granted: Callable[[str | None], None]) -> None:
        """Record that this replica holds ``site``'s link, then ``granted(None)``, or
        ``granted(reason)`` if it may not (another live replica holds it, or the store
        cannot be reached: fail closed)."""
        self._spawn(self._claim(site, peer, granted))

    async def _claim(self, site: str, peer: str, granted: Callable[[str | None], None]) -> None:
        try:
            holder = await self.cluster.claim(site, self.replica, peer, now=self.now())
            # Held by another replica: that one may have just died (the enforcer is here
            # because its link there broke).  Ask again after each heartbeat until the
            # holder's claim would have expired, instead of refusing an enforcer that would
            # then back off for seconds more.  A holder that keeps beating (a live link, and
            # this one a thief's or a duplicate) is refused after EXPIRY.
            waited = 0.0
            while holder is not None and waited < EXPIRY.total_seconds():
                pause = min(HEARTBEAT, EXPIRY.total_seconds() - holder.silent + 0.05)
                await self.sleep(max(pause, 0.05))
                waited += max(pause, 0.05)
                holder = await self.cluster.claim(site, self.replica, peer, now=self.now())
        except StoreUnavailable:
            granted("the control tower cannot reach its store")
            return
        except Exception:
            log.exception("internal error claiming site %s", site)
            granted("internal error in the control tower")
            return
        granted(None if holder is None else refusal(site, holder))

    def release(self, site: str) -> None:
        self._spawn(self._release(site))

    async def _release(self, site: str) -> None:
        try:
            await self.cluster.release(site, self.replica)
        except StoreUnavailable as exc:  # the claim then lasts until this replica's expiry
            log.warning("cannot release site %s: %s", site, exc)

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
