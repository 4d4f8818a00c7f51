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
import json
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable

from .database import StoreUnavailable
from .database.cluster import EXPIRY, HEARTBEAT, Cluster, Holder
from .siteinfo import RemoteSite, SiteInfo

log = logging.getLogger("supctl.tower")

#: Seconds between two claims of a site held by another live replica (see _claim).
CLAIM_RETRY = 0.25
#: Seconds a read of the claims stays fresh for requests naming a site held nowhere.
REFRESH = 0.25


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
        monotonic: Callable[[], float] = time.monotonic,
        advertise: str | None = None,
    ) -> None:
        self.cluster = cluster
        self.replica = replica
        self.advertise = advertise  # this replica's peer listener, once it listens
        self.now = now
        self.host = host or socket.gethostname()
        self.pid = os.getpid() if pid is None else pid
        self.tasks: set[asyncio.Task[None]] = set()
        self.holders: dict[str, Holder] = {}  # every live claim, as of the last heartbeat
        # Called when this replica finds its row gone or taken over: its site links' claims
        # are void (another replica may hold those sites now), so the tower closes them.
        self.on_taken_over = on_taken_over
        self.sleep = sleep
        self.monotonic = monotonic
        self._refreshed = -REFRESH
        self._refreshing: asyncio.Future[None] | None = None
        self._parsed: dict[str, tuple[str, SiteInfo | None]] = {}  # site: (its info, parsed)

    async def join(self) -> None:
        """Register; UsageError (one line) if another live process is this replica, or
        if the store is SQLite and another replica runs."""
        await self.cluster.join(
            self.replica, self.host, self.pid, now=self.now(), alive=pid_alive, advertise=self.advertise
        )
        log.info("joined the store's cluster as replica %s", self.replica)

    async def set_advertise(self, url: str) -> None:
        """This replica's peer listener is up at ``url``: the others may relay to it."""
        self.advertise = url
        await self.cluster.advertise(self.replica, self.pid, url)

    async def drain(self) -> None:
        """SIGTERM: say in the store that our sites may move to another replica at once."""
        try:
            await self.cluster.drain(self.replica, self.pid)
        except StoreUnavailable as exc:  # they move once our claims expire, after we left
            log.warning("cannot record the drain: %s", exc)

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
                await self.refresh()
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

    async def refresh(self) -> None:
        """Read every live claim back (after each heartbeat; and when a request names a
        site held nowhere, at most every :data:`REFRESH` seconds: see :meth:`lookup`)."""
        self.holders = await self.cluster.holders(now=self.now())
        self._refreshed = self.monotonic()

    def remote(self, site: str) -> Holder | None:
        """The other replica that holds ``site``, as of the last read, or None."""
        holder = self.holders.get(site)
        return holder if holder is not None and holder.replica != self.replica else None

    def remote_site(self, site: str) -> RemoteSite | None:
        """:meth:`remote`, with what the site reported there (parsed once per report)."""
        holder = self.remote(site)
        if holder is None or holder.info is None:
            return None
        cached = self._parsed.get(site)
        if cached is None or cached[0] != holder.info:
            try:
                payload = json.loads(holder.info)
                cached = (holder.info, SiteInfo.parse(payload) if isinstance(payload, dict) else None)
            except (ValueError, AttributeError):  # written by a replica of another version?
                cached = (holder.info, None)
            self._parsed[site] = cached
            if len(self._parsed) > 2 * len(self.holders) + 64:  # sites gone stay no longer
                self._parsed = {name: self._parsed[name] for name in self.holders if name in self._parsed}
        info = cached[1]
        return None if info is None else RemoteSite(holder.replica, holder.advertise, info)

    async def lookup(self, site: str, *, again: bool = False) -> RemoteSite | None:
        """:meth:`remote_site`, read again from the store if ``site`` is held nowhere as of
        the last read (a site that just connected to another replica), or with ``again``
        (its holder cannot be reached: it may have died and the site moved), unless the
        last read is younger than :data:`REFRESH`: requests, however many, cost one store
        read per REFRESH, shared."""
        if again or site not in self.holders:
            refreshing = self._refresh_soon()
            if refreshing is not None:
                await asyncio.shield(refreshing)
        return self.remote_site(site)

    def suspect(self, site: str) -> None:
        """``site``'s holder could not be reached: read the claims again soon (at most every
        :data:`REFRESH` s), so that the next stream finds where the site went."""
        self._refresh_soon()

    def _refresh_soon(self) -> asyncio.Future[None] | None:
        """The read of the claims under way, or a new one unless the last is younger than
        :data:`REFRESH` (then None): one store read per REFRESH, shared by every caller."""
        if self._refreshing is None and self.monotonic() - self._refreshed >= REFRESH:
            self._refreshing = asyncio.ensure_future(self._refresh_once())
        return self._refreshing

    async def _refresh_once(self) -> None:
        try:
            await self.refresh()
        except StoreUnavailable:
            self._refreshed = self.monotonic()  # the heartbeat says so, once; not every request
        except Exception:
            log.exception("internal error reading the site claims")
        finally:
            self._refreshing = None

    def claim(self, site: str, peer: str, info: str, granted: Callable[[str | None], None]) -> None:
        """Record that this replica holds ``site``'s link (and ``info``, the site's HELLO as
        JSON, for the other replicas), then ``granted(None)``, or ``granted(reason)`` if it
        may not (another live replica holds it, or the store cannot be reached: fail closed)."""
        self._spawn(self._claim(site, peer, info, granted))

    def report(self, site: str, info: str) -> None:
        """The site held here sent a STATUS: the other replicas see it within a heartbeat."""
        self._spawn(self._report(site, info))

    async def _report(self, site: str, info: str) -> None:
        try:
            await self.cluster.report(site, self.replica, info)
        except StoreUnavailable as exc:
            log.warning("cannot record the status of site %s: %s", site, exc)

    async def _claim(self, site: str, peer: str, info: str, granted: Callable[[str | None], None]) -> None:
        try:
            holder = await self.cluster.claim(site, self.replica, peer, now=self.now(), info=info)
            # Held by another replica: that one may have just died (the enforcer is here
            # because its link there broke).  Ask again after each heartbeat until the
            # holder's claim would have expired, instead of refusing an enforcer that would
            # then back off for seconds more.  A holder that keeps beating (a live link, and
            # this one a thief's or a duplicate) is refused after EXPIRY.
            waited = 0.0
            # Asked every CLAIM_RETRY seconds: a holder that drains releases the site when
            # its link closes, and the enforcer, already here, should not wait a heartbeat.
            while holder is not None and waited < EXPIRY.total_seconds():
                pause = min(CLAIM_RETRY, EXPIRY.total_seconds() - holder.silent + 0.05)
                await self.sleep(max(pause, 0.05))
                waited += max(pause, 0.05)
                holder = await self.cluster.claim(site, self.replica, peer, now=self.now(), info=info)
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
