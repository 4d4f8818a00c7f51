"""The enforcer's outbound link to the tower, reconnecting with jittered backoff."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import random
import ssl
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from urllib.parse import urlencode

import websockets
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus, WebSocketException
from websockets.version import version as websockets_version

from .. import __version__
from ..backoff import Backoff
from ..errors import StreamError, SupctlError
from ..link import Channel, Link, WebSocketLike
from ..protocol import (
    KEEPALIVE,
    MAX_MESSAGE_ACCEPTED,
    MAX_SITE_STREAMS,
    SUBPROTOCOL,
    Connection,
    ControlBound,
    ErrorCode,
    Event,
    OpenRequest,
    StreamOpened,
    StreamReset,
)
from ..tlspin import FingerprintMismatch, pinned_connection
from ..wsconn import DirectClientConnection, keepalive_options
from .api import Handler, HandlerContext, Serves
from .containers import ContainerSupervisor
from .dispatch import Dispatcher
from .inventory import Inventory

log = logging.getLogger("supctl.enforcer")

BACKOFF_START = 0.5
BACKOFF_CAP = 30.0
#: The cap after a failure that looks brief and cost the tower nothing: nothing listens
#: (connection refused) or no route, HTTP 503, or a link that closed.  A tower restart
#: ends in seconds; waiting up to 30 s then kept a site away up to 26 s after a 2 s restart.
BRIEF_CAP = 5.0
#: A link that stayed up this long resets the backoff.
STABLE_AFTER = 10.0
#: Old links kept at once after GOAWAYs (each ends its streams): a tower that asks to
#: move again and again, and never closes them, costs at most this many.
MAX_MOVING = 2
#: At most one STATUS frame per this many seconds: a crash-looping container, or
#: every container stopping at once, becomes one update, not a burst.
STATUS_INTERVAL = 0.2


class EnforcerLink(Link):
    """The enforcer's end: it only answers streams the tower opens.

    What the tower can make it hold is bounded: at most ``agent.max_streams``
    (MAX_SITE_STREAMS at most) streams and as many handler tasks (a handler whose
    stream is gone counts until it ends), at most one window of DATA per stream (the core closes the
    link on more) and at most :class:`ControlBound` of unread CONTROL per stream
    (the core resets the stream with LIMIT on more).
    """

    def __init__(self, ws: WebSocketLike, agent: Agent) -> None:
        super().__init__(
            ws,
            Connection(
                odd_ids=False,
                accept_streams=True,
                max_streams=agent.max_streams,
                control_bound=ControlBound(),
                accept_goaway=True,  # a draining tower asks us to move (docs/protocol.md)
            ),
            name="tower",
        )
        self.agent = agent
        self.tasks: set[asyncio.Task[None]] = set()
        self.stream_tasks: dict[int, asyncio.Task[None]] = {}
        self.refused_over_limit = 0

    def on_stream_opened(self, event: StreamOpened) -> None:
        sid, limit = event.stream_id, self.conn.max_streams
        if len(self.stream_tasks) >= limit:
            # The core counts open streams; this counts handlers still running, so that
            # OPEN-then-RESET cannot pile up handlers that are still connecting.
            self.conn.reset_stream(sid, ErrorCode.LIMIT, f"more than {limit} streams")
            self.refused_over_limit += 1
            if self.refused_over_limit == 1:  # once per link: the tower can repeat this at will
                log.warning("the tower exceeds %d concurrent streams; refusing more with LIMIT", limit)
            return
        channel = self.adopt_channel(sid)
        task = asyncio.create_task(self.agent.serve_stream(channel, event.request))
        self.tasks.add(task)
        self.stream_tasks[sid] = task

        def done(task: asyncio.Task[None]) -> None:
            self.tasks.discard(task)
            if self.stream_tasks.get(sid) is task:
                del self.stream_tasks[sid]

        task.add_done_callback(done)

    def handle_event(self, event: Event) -> None:
        if not isinstance(event, StreamReset):
            super().handle_event(event)
            return
        # Reset before its handler accepted: the handler is still connecting or spawning
        # and watches nothing that would tell it, so it is cancelled, and stops counting
        # against the cap at once (a task cancelled before it ran ends at its first step;
        # an OPEN and its RESET often arrive in one message).  After ACCEPT the reset
        # reaches the handler through its channel (read, write, receiver), and a cancel
        # could cut its clean-up short: it counts until it ends.
        channel = self.channels.get(event.stream_id)
        pending = channel is not None and not channel.accepted.done()
        super().handle_event(event)
        task = self.stream_tasks.pop(event.stream_id, None) if pending else None
        if task is not None:
            task.cancel()


class Agent:
    def __init__(
        self,
        *,
        towers: Sequence[str],
        site: str,
        token: str,
        ssl_context: ssl.SSLContext | None,
        inventory: Inventory,
        handlers: Mapping[Serves, Handler],
        context: HandlerContext,
        supervisor: ContainerSupervisor | None = None,
        tower_fingerprint: bytes | None = None,
        max_streams: int = MAX_SITE_STREAMS,
        read_token: Callable[[], str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        jitter: Callable[[], float] = random.random,
        keepalive: float | None = KEEPALIVE,
    ) -> None:
        if not 1 <= max_streams <= MAX_SITE_STREAMS:
            raise ValueError(f"max_streams must be 1-{MAX_SITE_STREAMS}")
        if not towers:
            raise ValueError("at least one tower URL")
        self.max_streams = max_streams
        self.keepalive = keepalive  # ping interval and pong timeout; None: off
        # Each failed attempt moves on to the next tower (replicas, or one load-balanced name).
        self.towers = [tower.rstrip("/") for tower in towers]
        self.current = 0
        self.query = urlencode({"site": site})
        self.tower_fingerprint = tower_fingerprint
        self.clock = clock
        self.backoff = Backoff(BACKOFF_START, BACKOFF_CAP, STABLE_AFTER, jitter=jitter)
        self.site = site
        self.token = token
        # Re-reads the token file after a 401: `control-tower site rotate --output FILE`
        # into the file we read replaces the token without restarting the enforcer.
        self.read_token = read_token
        self.ssl_context = ssl_context
        self.inventory = inventory
        self.dispatcher = Dispatcher(handlers, inventory)
        self.context = context
        self.supervisor = supervisor
        self._status_changed = asyncio.Event()
        self.link: EnforcerLink | None = None
        # Read by the metrics (:mod:`.metrics`); counted here only.
        self.links_made = 0  # links to the tower established (the first one, then reconnects)
        self.streams_open: Counter[str] = Counter()  # by the handler serving them
        self.streams_ended: Counter[tuple[str, str]] = Counter()  # (handler, outcome)
        # The OPEN of every stream being served, as the tower sent it: judged again when
        # the inventory (and its local policy) is reloaded.
        self.serving: dict[Channel, OpenRequest] = {}
        # Links a draining tower asked us to leave, still ending their streams; oldest first.
        self.moving: deque[tuple[EnforcerLink, asyncio.Task[None]]] = deque()
        if supervisor is not None:
            supervisor.on_change = self._status_changed.set

    def hello(self) -> dict[str, object]:
        """The HELLO payload, and every STATUS payload (the tower keeps the latest)."""
        states = self.supervisor.states() if self.supervisor is not None else None
        return {
            "site": self.site,
            "version": __version__,
            "handlers": self.dispatcher.names,  # both below in one list, for older towers
            "verbs": self.dispatcher.verbs,
            "protocols": self.dispatcher.protocols,
            "features": self.dispatcher.features,
            "applications": self.inventory.describe(states),
        }

    async def reload(self, inventory: Inventory) -> str:
        """Serve ``inventory`` from now on (checked already): new streams are judged and
        dispatched against it (its local policy too), the containers follow it, and the
        tower gets it in a STATUS.  Streams in flight go on.  Returns what changed."""
        self.inventory = inventory
        self.dispatcher = Dispatcher(self.dispatcher.handlers, inventory)
        # Authority is judged while it is used: a stream the new inventory would refuse
        # (its policy narrowed, its instance or container gone) ends now, not when it ends.
        ended = 0
        for channel, opened in list(self.serving.items()):
            try:
                self.dispatcher.route(opened)
            except StreamError as exc:
                channel.reset(ErrorCode.DENIED, f"the site's inventory changed: {exc}")
                ended += 1
        summary = "containers unchanged"
        if self.supervisor is not None:
            kept, restarted, stopped, started = await self.supervisor.reload(inventory)
            summary = f"containers: {kept} kept, {restarted} restarted, {stopped} stopped, {started} started"
        self._status_changed.set()
        return f"{summary}; {ended} streams ended by the new inventory"

    async def _push_status(self, link: EnforcerLink) -> None:
        """Send a STATUS frame after container state changes, coalesced."""
        while True:
            await self._status_changed.wait()
            self._status_changed.clear()
            if link.conn.closed is not None:
                return
            link.conn.send_status(self.hello())
            link.flush()
            await asyncio.sleep(STATUS_INTERVAL)

    @property
    def tower(self) -> str:
        """The tower URL the next attempt dials."""
        return self.towers[self.current]

    async def run_forever(self) -> None:
        while True:
            started = self.clock()
            try:
                if await self.connect_once():
                    # GOAWAY: the old link serves its streams to their end meanwhile.
                    delay = self.after_goaway(self.clock() - started)
                    if delay:
                        log.warning("asked to move again after a short link; reconnecting in %.1f s", delay)
                        await asyncio.sleep(delay)
                    continue
                reason, brief = "link closed", True
            except Exception as exc:  # failure() raises again what is not a failure to reach the tower
                reason, brief = self.failure(exc)
            delay = self.next_delay(self.clock() - started, brief)
            log.warning("%s; reconnecting in %.1f s", reason, delay)
            await asyncio.sleep(delay)

    def after_goaway(self, ran_for: float) -> float:
        """The wait before linking again after a GOAWAY on a link that lasted ``ran_for`` s:
        none after a stable link (a drain), the backoff after a short one, so that a tower
        answering every link with GOAWAY is not dialled in a loop."""
        if ran_for >= STABLE_AFTER:
            if len(self.towers) > 1:
                self.current = (self.current + 1) % len(self.towers)
            return 0.0
        return self.next_delay(ran_for, True)

    def failure(self, exc: Exception) -> tuple[str, bool]:
        """Why an attempt (or the link) ended, in one line, and whether it looks brief (the
        tower restarting: connection refused, 503, or a link that closed).  Anything that is
        not a failure to reach the tower is raised again."""
        if isinstance(exc, InvalidStatus):
            status = exc.response.status_code
            if status == 401 and self.reload_token():
                self.backoff.reset()  # a new token: try it soon, not after the backoff reached so far
            return f"the tower refused us: HTTP {status} {_body(exc)}", status == 503
        if isinstance(exc, ssl.SSLCertVerificationError):
            return f"the tower's certificate is not trusted: {exc.verify_message}", False
        if isinstance(exc, FingerprintMismatch):
            return str(exc), False
        if isinstance(exc, (TimeoutError, OSError, WebSocketException)):
            text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            return f"cannot reach the tower: {text}", _no_connection(exc)
        raise exc

    def next_delay(self, ran_for: float, brief: bool) -> float:
        """The wait before the next attempt, which goes to the next tower URL.  Full jitter
        (as AWS recommends) so that a tower restart is not met by every site at once."""
        if len(self.towers) > 1:
            self.current = (self.current + 1) % len(self.towers)
        return self.backoff.after(ran_for, cap=BRIEF_CAP if brief else None)

    def reload_token(self) -> bool:
        """Read the token file again (the same checks as at start); True if it holds a
        new token, which the next attempt uses.  An unreadable or unsafe file keeps the
        token we have, with one line saying why."""
        if self.read_token is None:
            return False
        try:
            token = self.read_token()
        except SupctlError as exc:
            log.warning("cannot read the site token again: %s", exc)
            return False
        if token == self.token:
            return False
        self.token = token
        log.warning("the site token file holds a new token; connecting with it")
        return True

    async def connect_once(self) -> bool:
        """One link to the tower, until it is lost (False), or until the tower asks us to
        move (GOAWAY: True), leaving the old link to end by itself: make before break,
        so that the site is not away while it moves to another replica."""
        tower = self.tower
        # With a pin, the certificate is checked before the request (and the site token) is sent.
        pin = self.tower_fingerprint
        ws = await connect(
            f"{tower}/v1/enforcer?{self.query}",
            ssl=self.ssl_context,
            create_connection=pinned_connection(pin, tower) if pin else DirectClientConnection,
            additional_headers={"Authorization": f"Bearer {self.token}", "Supctl-Features": "goaway"},
            user_agent_header=f"edge-enforcer/{__version__} websockets/{websockets_version}",
            subprotocols=[websockets.Subprotocol(SUBPROTOCOL)],
            compression=None,
            max_size=MAX_MESSAGE_ACCEPTED,
            open_timeout=15,
            write_limit=2**18,
            # A silent partition (no RST, no FIN) is noticed within 2 x keepalive.
            **keepalive_options(self.keepalive),
        )
        link = EnforcerLink(ws, self)
        self.link = link
        self.links_made += 1
        self._status_changed.clear()  # HELLO carries the states as of now
        link.conn.send_hello(self.hello())
        link.flush()
        log.info("connected to the tower as site %s (%s)", self.site, tower, extra={"site": self.site})
        pusher = asyncio.create_task(self._push_status(link))
        link.tasks.add(pusher)
        runner = asyncio.create_task(self._run_link(link), name="tower-link")
        moved = asyncio.ensure_future(link.goaway.wait())
        try:
            await asyncio.wait({runner, moved}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            runner.cancel()
            await asyncio.wait({runner})
            raise
        finally:
            moved.cancel()
        if not runner.done():
            pusher.cancel()  # its STATUS goes to the new link from now on
            log.warning(
                "the tower asks us to move (%s); connecting again while %d streams end on this link",
                link.going_away, len(link.stream_tasks),
            )  # fmt: skip
            while len(self.moving) >= MAX_MOVING:  # a tower that never closes them: the oldest goes
                self.moving.popleft()[0].close(ErrorCode.LIMIT, "asked to move too often")
            entry = (link, runner)
            self.moving.append(entry)
            runner.add_done_callback(lambda _: self._moved(entry))
            return True
        await runner
        return False

    def _moved(self, entry: tuple[EnforcerLink, asyncio.Task[None]]) -> None:
        if entry in self.moving:
            self.moving.remove(entry)

    async def _run_link(self, link: EnforcerLink) -> None:
        try:
            await link.run()
        finally:
            for task in list(link.tasks):
                task.cancel()
            await asyncio.gather(*link.tasks, return_exceptions=True)
        if link.going_away is None:
            log.warning("link to the tower lost: %s", link.lost_reason or "closed")
        else:
            log.warning("the link the tower asked us to leave is closed: %s", link.lost_reason or "closed")

    async def shutdown(self) -> None:
        """Reset every stream with a reason the user sees, then close the link.

        Done before the link is torn down so the resets reach the tower: cancelled
        after the close, they would be lost and users would only see "link lost".
        """
        for old, runner in list(self.moving):  # links we were moving away from
            old.close(ErrorCode.LINK_LOST, "the edge enforcer is shutting down")
            await asyncio.wait({runner}, timeout=5)
        link, self.link = self.link, None
        if link is None or link.conn.closed is not None:
            return
        for task in list(link.tasks):
            task.cancel()
        await asyncio.gather(*link.tasks, return_exceptions=True)
        await link.aclose(ErrorCode.LINK_LOST, "the edge enforcer is shutting down")

    async def serve_stream(self, channel: Channel, request: OpenRequest) -> None:
        started = time.monotonic()
        result = "ok"
        outcome = "ok"
        served = "no handler"
        handler = "none"  # the metrics' label: refused before a handler was found, whatever was asked
        opened = request
        try:
            # The handler, the canonical request and the site's own policy on both,
            # whatever the tower allowed (docs/policies.md, "A compromised tower").
            dispatch = self.dispatcher.route(request)
            self.serving[channel] = opened
            served, request = str(dispatch.serves), dispatch.request
            handler = dispatch.serves.name  # as HELLO announces it: "tcp", "exec"
            self.streams_open[handler] += 1
            try:
                await dispatch.handler.handle(channel, request, dispatch.instance, self.context)
            finally:
                self.streams_open[handler] -= 1
        except StreamError as exc:
            outcome = "refused" if handler == "none" else "reset"
            result = str(exc)
            channel.reset(ErrorCode.parse(exc.code), str(exc))
        except asyncio.CancelledError:
            if channel.error is not None:
                # The stream was reset (EnforcerLink cancels a handler still connecting):
                # this stream is over, not the enforcer.
                result = f"reset: {channel.error}"
                outcome = "reset"
                return
            result = outcome = "cancelled"
            channel.reset(ErrorCode.LINK_LOST, "the enforcer is shutting down")
            raise
        except Exception:  # a handler bug costs one stream, never the enforcer
            log.exception("handler for %s failed", served)
            result = outcome = "internal error"
            channel.reset(ErrorCode.INTERNAL, "internal error in the edge enforcer")
        finally:
            self.serving.pop(channel, None)
            self.streams_ended[handler, outcome] += 1
            log.debug(
                "stream closed application=%s instance=%s verb=%s protocol=%s target=%s sent=%d received=%d "
                "peak_buffered=%d seconds=%.3f result=%s",
                request.application,
                request.service_instance,
                request.verb,
                request.protocol,
                # A connect stream's address; an exec stream's container (it has no address).
                request.target if request.verb == "connect" else request.container,
                channel.bytes_out,
                channel.bytes_in,
                channel.peak_buffered,
                time.monotonic() - started,
                result,
            )


def _no_connection(exc: BaseException) -> bool:
    """Whether no TCP connection was made (nothing listens, no route): a tower restarting
    or out of reach, which spent nothing on the attempt, so retrying soon costs it nothing.
    A reset, a TLS failure or a timeout may be a loaded tower: those keep the long cap."""
    if isinstance(exc, ssl.SSLError) or not isinstance(exc, OSError):
        return False
    if isinstance(exc, ConnectionRefusedError) or exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return True
    # asyncio's create_connection when every address of a name failed, each its own way.
    return type(exc) is OSError and exc.errno is None and str(exc).startswith("Multiple exceptions:")


def _body(exc: InvalidStatus) -> str:
    """The tower's one-line reason (its JSON error body), else the start of the body."""
    body = bytes(exc.response.body or b"")
    with contextlib.suppress(Exception):
        return " ".join(str(json.loads(body)["errors"][0]["error-message"]).split())[:200]
    with contextlib.suppress(Exception):
        return body.decode()[:200]
    return ""
