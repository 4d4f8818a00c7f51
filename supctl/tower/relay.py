"""Relaying streams between a supctl session and a site, hop by hop.

Each hop has its own flow control.  The tower forwards DATA only as far as the
next hop grants credit, and gives the previous hop credit back only for bytes it
forwarded, so per stream and direction it holds at most one window.  Everything
here runs synchronously inside event dispatch: no task per stream.

When a stream ends, :meth:`Relay.finish` writes its one audit record (bytes
each way, duration, result, close reason; for exec the command and the exit
status seen passing by): nothing is recorded per chunk.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from ..protocol import (
    Connection,
    ControlReceived,
    DataReceived,
    EndOfStream,
    ErrorCode,
    Event,
    StreamAccepted,
    StreamReset,
    WindowUpdated,
)
from ..ratelog import RateLimitedLog
from . import audit
from .hub import Hub
from .route import Route

log = logging.getLogger("supctl.tower")


# What a relay uses of the links it joins and of the tower: protocols, so that this
# module sits under .links (which builds relays) instead of importing it back.


class AuditSink(Protocol):
    """Where audit records go (:class:`.audit.AuditLog`): False = not written."""

    def append(self, rec: dict[str, Any]) -> bool: ...


class StreamMetrics(Protocol):
    """What a relay tells the tower's metrics (:class:`.metrics.TowerMetrics`)."""

    def stream_opened(self, seconds: float) -> None:
        """A stream was accepted by the site ``seconds`` after its OPEN."""

    def stream_queued(self, peak_up: int, peak_down: int) -> None:
        """A stream ended; the most bytes it had queued here, each way."""


class Services(Protocol):
    """The parts of the tower a link and its relays use."""

    @property
    def hub(self) -> Hub: ...
    @property
    def clock(self) -> Callable[[], float]: ...
    @property
    def peer_log(self) -> RateLimitedLog: ...
    @property
    def audit(self) -> AuditSink | None: ...
    @property
    def metrics(self) -> StreamMetrics | None: ...


class End(Protocol):
    """Either link of a relay."""

    @property
    def conn(self) -> Connection: ...
    @property
    def relays(self) -> dict[int, Relay]: ...
    def flush(self) -> None: ...


#: Where a relay's streams go: a site's link, or the peer link to the replica holding it.
SiteEnd = End


class ClientEnd(End, Protocol):
    @property
    def tower(self) -> Services: ...
    @property
    def accounted(self) -> bool:
        """True where the streams were authorised (a supctl session): their user's counts
        and audit records are kept here.  False on a peer link: the replica that relays
        for another keeps neither, the one that authorised the stream does."""

    def stream_refused(self, close: str, result: str) -> bool: ...


class Direction:
    """Bytes flowing one way through the tower for one stream."""

    __slots__ = (
        "dst",
        "dst_id",
        "eof_pending",
        "eof_sent",
        "peak",
        "queue",
        "queued",
        "src",
        "src_id",
        "total",
    )

    def __init__(self, src: End, src_id: int, dst: End, dst_id: int) -> None:
        self.src, self.src_id, self.dst, self.dst_id = src, src_id, dst, dst_id
        self.queue: deque[bytes | memoryview] = deque()
        self.queued = 0
        self.peak = 0
        self.total = 0
        self.eof_pending = False
        self.eof_sent = False

    def feed(self, data: bytes | memoryview) -> None:
        self.queue.append(data)
        self.queued += len(data)
        self.total += len(data)
        self.peak = max(self.peak, self.queued)
        self.pump()

    def feed_eof(self) -> None:
        self.eof_pending = True
        self.pump()

    def pump(self) -> None:
        dst, src = self.dst.conn, self.src.conn
        queue = self.queue
        moved = 0
        while queue:
            credit = dst.send_credit(self.dst_id)
            if not credit:
                break
            chunk = queue[0]
            if len(chunk) > credit:
                # Views, not slices: the bytes are copied once, by the next hop's join.
                view = memoryview(chunk)
                queue[0] = view[credit:]
                chunk = view[:credit]
            else:
                queue.popleft()
            dst.send_data(self.dst_id, chunk)
            moved += len(chunk)
        if moved:
            self.queued -= moved
            src.consumed(self.src_id, moved)
            self.src.flush()
        if not queue and self.eof_pending and not self.eof_sent and dst.is_open(self.dst_id):
            self.eof_sent = True
            dst.send_eof(self.dst_id)
        self.dst.flush()


class Relay:
    """One stream of a supctl session joined to one stream of a site link."""

    __slots__ = (
        "accepted",
        "client",
        "client_id",
        "clock",
        "command",
        "down",
        "exit",
        "last_activity",
        "route",
        "site",
        "site_id",
        "started",
        "summary",
        "udp",
        "up",
        "user",
    )

    def __init__(
        self,
        client: ClientEnd,
        client_id: int,
        site: SiteEnd,
        site_id: int,
        route: Route,
        command: str | None = None,
    ) -> None:
        self.client, self.client_id, self.site, self.site_id = client, client_id, site, site_id
        self.route = route
        self.up = Direction(client, client_id, site, site_id)
        self.down = Direction(site, site_id, client, client_id)
        self.clock = client.tower.hub.clock  # the sweep compares its stamps with this clock
        self.started = self.last_activity = self.clock()
        # Read by the tower's limits sweep: not accepted in time, or idle for too long.
        self.accepted = False
        self.user = route.user
        self.summary = route.summary
        self.command = command  # exec: the command from the client's OPEN args, for the audit
        self.exit: tuple[object, object] | None = None  # exec: (code, signal) seen passing by
        self.udp: dict[str, int | None] | None = None  # connect udp: the site's final counts
        client.relays[client_id] = self
        site.relays[site_id] = self
        if client.accounted:
            client.tower.hub.open_stream(self.user)

    # --- events from the supctl side ----------------------------------------

    def from_client(self, event: Event) -> None:
        if isinstance(event, DataReceived):
            self.last_activity = self.clock()
            self.up.feed(event.data)
        elif isinstance(event, WindowUpdated):
            self.down.pump()
        elif isinstance(event, EndOfStream):
            self.up.feed_eof()
        elif isinstance(event, ControlReceived):
            # Outside flow control by design: a signal must overtake queued stdin.
            if self.site.conn.is_open(self.site_id):
                self.site.conn.send_control(self.site_id, event.payload)
                self.site.flush()
        elif isinstance(event, StreamReset):
            code = ErrorCode.CANCEL if event.local else event.code
            self.site.conn.reset_stream(self.site_id, code, event.text)
            self.site.flush()
            self.finish(event.text or event.code.name.lower(), "client-reset")
            return
        self._maybe_done()

    # --- events from the site side ------------------------------------------

    def from_site(self, event: Event) -> None:
        if isinstance(event, StreamAccepted):
            self.accepted = True
            self.last_activity = self.clock()
            metrics = self.client.tower.metrics
            if metrics is not None and self.client.accounted:  # once, where it was opened
                metrics.stream_opened(self.last_activity - self.started)
            # The client's connection may be closing (its relays are aborted when
            # it is lost): accepting then would raise and take the site link down.
            if self.client.conn.is_open(self.client_id):
                self.client.conn.accept_stream(self.client_id)
                self.client.flush()
        elif isinstance(event, DataReceived):
            self.last_activity = self.clock()
            self.down.feed(event.data)
        elif isinstance(event, WindowUpdated):
            self.up.pump()
        elif isinstance(event, EndOfStream):
            self.down.feed_eof()
        elif isinstance(event, ControlReceived):
            if "exit" in event.payload:  # exec's exit status, on its way to the client
                self.exit = audit.exit_fields(event.payload)
            elif (
                "udp" in event.payload and self.route.protocol == "udp"
            ):  # a udp flow's final counts, on their way to the client
                self.udp = audit.udp_fields(event.payload)
            if self.client.conn.is_open(self.client_id):
                self.client.conn.send_control(self.client_id, event.payload)
                self.client.flush()
        elif isinstance(event, StreamReset):
            code = ErrorCode.INTERNAL if event.local else event.code
            self.client.conn.reset_stream(self.client_id, code, event.text)
            self.client.flush()
            self.finish(event.text or event.code.name.lower(), "site-reset")
            return
        self._maybe_done()

    def abort(self, code: ErrorCode, text: str, close: str) -> None:
        """One side of the relay went away (``close``: client-lost, site-lost), or a limit
        ended the stream (``close``: timeout): reset both sides."""
        for link, stream_id in ((self.client, self.client_id), (self.site, self.site_id)):
            link.conn.reset_stream(stream_id, code, text)
            link.flush()
        self.finish(text, close)

    def _maybe_done(self) -> None:
        if self.up.eof_sent and self.down.eof_sent:
            self.finish("ok", "eof")

    def finish(self, result: str, close: str) -> None:
        """The stream ended: forget it, log it and write its audit record.

        ``close`` is one of :data:`audit.CLOSE_REASONS`; ``result`` is ``ok`` or
        the reset's text.
        """
        if self.client.relays.pop(self.client_id, None) is None:
            return
        self.site.relays.pop(self.site_id, None)
        accounted = self.client.accounted
        if accounted:
            self.client.tower.hub.close_stream(self.user)
        seconds = self.clock() - self.started
        shown = {
            "client-reset": "reset by client: ",
            "site-reset": "reset by site: ",
            "timeout": "reset by the tower: ",
        }.get(close, "")
        tower = self.client.tower
        if tower.metrics is not None and accounted:  # once, where the stream was opened
            tower.metrics.stream_queued(self.up.peak, self.down.peak)
        line = (
            "stream closed %s sent=%d received=%d peak_queued_up=%d peak_queued_down=%d "
            "seconds=%.3f result=%s%s"
        )
        values = (self.summary, self.up.total, self.down.total, self.up.peak, self.down.peak, seconds)
        fields: dict[str, object] = {
            "site": self.route.site, "user": self.user, "session": self.route.session,
            "stream": self.client_id, "reason": close,
        }  # fmt: skip
        recorded = True
        if close == "site-reset" and not self.accepted:
            # The site refused the OPEN: a refused stream like the tower's own refusals,
            # counted by its session (which may close it), its record and log line
            # rate-limited (tower/refusals.py).
            recorded = self.client.stream_refused(close, result)
            key = f"streams refused by site {self.route.site} for user {self.user}"
            tower.peer_log.info(key, line, *values, shown, result, extra=fields)
        else:
            log.info(line, *values, shown, result, extra=fields)
        trail = tower.audit
        if trail is not None and recorded and accounted:
            exit_code, exit_signal = self.exit or (None, None)
            trail.append(
                audit.stream_record(
                    self.route,
                    self.client_id,
                    # Bytes that reached the next hop: all of them, unless a reset dropped a queue.
                    bytes_up=self.up.total - self.up.queued,
                    bytes_down=self.down.total - self.down.queued,
                    duration=round(seconds, 3),
                    result=result,
                    close_reason=close,
                    command=self.command,
                    exit_code=exit_code,
                    exit_signal=exit_signal,
                    **(self.udp or {}),
                )
            )
