"""A session with the tower that outlives the loss of its WebSocket (``connect --bind``).

A long-running forward should not die with the tower process it happened to reach:
with several replicas behind a load balancer (or one tower restarted), a new
WebSocket gets the same service back within seconds.  :class:`TowerSession` keeps
that WebSocket (a :class:`~supctl.link.Link`) and opens a new one when it is *lost*:

* lost means the connection dropped without the tower deciding it (no close frame,
  1006), or the tower said it goes away (1001 on shutdown, 1012 restart, 1013 try
  later, 1011 a failure of its own, ``4000 + GOING_AWAY`` at the end of its drain);
* a draining tower's GOAWAY moves the session: new streams go to a new link at once,
  while the old one carries the streams it has until the tower closes it;
* anything else the tower closed on purpose (a revoked token, a policy that no
  longer allows the target, a session-duration limit, a protocol error) is final, as
  is a refusal of the new WebSocket that retrying cannot change (401/403, 404, 400):
  :meth:`TowerSession.keep` raises it and the forward exits as before;
* meanwhile :meth:`TowerSession.open_now` answers None, and :meth:`TowerSession.open`
  waits (bounded) for the session to come back.

Streams that were open on the lost WebSocket are not resumed: their channels fail
with ``LINK_LOST`` (the local socket gets an RST), because the far end's half of each
stream is gone with the tower process that carried it.

The delay between attempts is :class:`~supctl.backoff.Backoff` (full jitter, capped
at :data:`RETRY_CAP`); the clock and the sleep are arguments, so the tests drive this
with fake ones.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from ..backoff import Backoff
from ..errors import (
    DeniedError,
    NotFoundError,
    ProtocolError,
    StreamError,
    SupctlError,
    UnavailableError,
    UsageError,
)
from ..link import Channel, Link
from ..protocol import ErrorCode, OpenRequest
from ..protocol.frames import CLOSE_CODE_BASE

#: First and largest delay between attempts to re-open the session, in seconds (full
#: jitter: each delay is a uniform draw below its ceiling, so that the clients of a lost
#: replica do not all arrive at the same instant).
RETRY_START = 0.25
RETRY_CAP = 3.0
#: A session that lasted this long was a success: the next loss starts from RETRY_START
#: again.  Shorter ones keep doubling, so a tower that accepts and drops at once is not
#: hammered.
STABLE_AFTER = 10.0
#: While the tower stays unreachable, the last reason is repeated this often.
STILL_EVERY = 60.0
#: WebSocket close codes by which a tower says "not me, not now": try again (1001 going
#: away, 1011 its own failure, 1012 restart, 1013 try later, and GOING_AWAY after a drain).
GOING_AWAY_CODES = frozenset({1001, 1011, 1012, 1013, CLOSE_CODE_BASE + ErrorCode.GOING_AWAY})
#: Refusals of a new session that a retry cannot change.
FINAL_ERRORS = (DeniedError, NotFoundError, UsageError, ProtocolError)


class SessionReport(Protocol):
    """How a session tells the user about its WebSocket (one line each)."""

    def lost(self, reason: str) -> None:
        """The WebSocket was lost; attempts to re-open it begin."""

    def still_lost(self, seconds: float, reason: str) -> None:
        """Still no session after ``seconds``; ``reason`` is the last attempt's failure."""

    def back(self, seconds: float) -> None:
        """A new WebSocket is up, ``seconds`` after the loss."""

    def moving(self, reason: str) -> None:
        """The tower drains (GOAWAY): new streams go to a new session, open ones finish."""


def final_close(link: Link) -> SupctlError | None:
    """The error a closed ``link`` ends the forward with, or None if it was only lost."""
    code = link.lost_code
    if code is None or code in GOING_AWAY_CODES:
        return None
    reason = link.lost_reason or "closed"
    if code == CLOSE_CODE_BASE + ErrorCode.DENIED:  # e.g. its token was revoked
        return DeniedError(f"the tower closed the session: {reason}")
    return UnavailableError(f"lost the connection to the tower: {reason}")


class TowerSession:
    """The current :class:`Link` for one request, re-opened by :meth:`keep` when lost.

    ``connect`` opens a new link (the transport's ``open_session`` with the verb's path
    and query); it raises :class:`~supctl.errors.SupctlError` on a refusal.
    """

    def __init__(
        self,
        connect: Callable[[], Awaitable[Link]],
        request: OpenRequest,
        report: SessionReport,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        wait: float = 10.0,
        jitter: Callable[[], float] | None = random.random,
    ) -> None:
        self._connect = connect
        self.wait = wait
        self.request = request
        self.report = report
        self.clock = clock
        self.sleep = sleep
        self.backoff = Backoff(RETRY_START, RETRY_CAP, STABLE_AFTER, jitter=jitter)
        self.link: Link | None = None
        self._since = 0.0  # when the current link came up
        self.final: SupctlError | None = None  # set once the session cannot come back
        self.reconnects = 0
        self.draining: set[Link] = set()  # links that got GOAWAY, finishing their streams
        self._changed = asyncio.Event()  # set whenever link or final changes

    async def start(self) -> Link:
        """Open the first link; its refusal is the invocation's error (exit as today)."""
        self._set(await self._connect())
        assert self.link is not None
        return self.link

    def _set(self, link: Link | None) -> None:
        if link is not None:
            self._since = self.clock()
        self.link = link
        self._changed.set()
        self._changed = asyncio.Event()

    async def keep(self) -> None:
        """Run for as long as the forward does: re-open each lost link.

        Returns never; raises the :class:`~supctl.errors.SupctlError` that ends the
        forward (a deliberate close, or a refusal a retry cannot change)."""
        try:
            while True:
                link = self.link
                assert link is not None and link.task is not None, "start() first"
                goaway = asyncio.ensure_future(link.goaway.wait())
                try:
                    await asyncio.wait({link.task, goaway}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    goaway.cancel()
                if not link.task.done():
                    # GOAWAY: the old link carries its open streams until the tower closes
                    # it (GOING_AWAY once they end, or its drain deadline); new ones wait
                    # for the new session, as after a loss.
                    self._drain(link)
                    self.report.moving(link.going_away or "the tower is going away")
                    self._set(None)
                    self._set(await self._reopen(None))
                    continue
                final = final_close(link)
                if final is not None:
                    raise final
                self._set(None)
                self._set(await self._reopen(link.lost_reason or "connection closed"))
        except SupctlError as exc:
            self.final = exc
            self._set(None)
            raise

    def _drain(self, link: Link) -> None:
        """Keep ``link`` (it got GOAWAY) in :attr:`draining` until it ends, and close it
        once its last stream ended.  The client closes, not the tower: only this end
        knows that no OPEN of its own is still on the way (the race HTTP/2's GOAWAY
        solves with a last stream id)."""
        assert link.task is not None
        self.draining.add(link)
        closer = asyncio.ensure_future(self._close_when_empty(link))

        def ended(_: object) -> None:
            self.draining.discard(link)
            closer.cancel()

        link.task.add_done_callback(ended)

    @staticmethod
    async def _close_when_empty(link: Link) -> None:
        while link.channels:
            await link.emptied.wait()
        await link.aclose(ErrorCode.CANCEL, "moved to a new session")

    async def _reopen(self, reason: str | None) -> Link:
        """A new link after the loss of the last (``reason``; None: it was asked to move)."""
        lost_at = self.clock()
        if reason is not None:
            self.report.lost(reason)
        said_at = lost_at
        lasted = lost_at - self._since  # a stable session starts the delays over
        while True:
            await self.sleep(self.backoff.after(lasted))
            lasted = 0.0
            try:
                link = await self._connect()
            except FINAL_ERRORS:
                raise
            except SupctlError as exc:
                now = self.clock()
                if now - said_at >= STILL_EVERY:
                    said_at = now
                    self.report.still_lost(now - lost_at, str(exc))
                continue
            self.reconnects += 1
            self.report.back(self.clock() - lost_at)
            return link

    def open_now(self, request: OpenRequest | None = None) -> Channel | None:
        """A new stream on the current link, or None while the session is being re-opened.

        ``request``: the OPEN's, if not the session's (a connect stream to another of the
        session's targets).  The first bytes may be written at once (EARLY_DATA); a refusal
        surfaces as StreamError from the channel.  Raises StreamError once the session is over."""
        if self.final is not None:
            raise StreamError(str(self.final), code=ErrorCode.LINK_LOST)
        link = self.link
        if link is None or link.task is None or link.task.done():
            return None
        try:
            return link.open_channel_now(request or self.request)
        except StreamError:  # closing: keep() learns why in a moment
            return None

    async def open(self, request: OpenRequest | None = None) -> Channel:
        """A new stream once the session is up, waiting at most ``wait`` seconds."""
        timeout = self.wait
        deadline = self.clock() + timeout
        while True:
            channel = self.open_now(request)
            if channel is not None:
                return channel
            left = deadline - self.clock()
            if left <= 0:
                raise StreamError(
                    f"no session with the tower for {timeout:g} s (still reconnecting)",
                    code=ErrorCode.LINK_LOST,
                )
            changed = self._changed
            try:
                await asyncio.wait_for(changed.wait(), left)
            except TimeoutError:
                continue
