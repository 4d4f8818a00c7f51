"""The tower's live state: one link per site, the supctl sessions, and what they hold.

Everything that counts what a user or a session holds lives here and is changed
here only: a session is acquired (:meth:`Hub.open_session`) and released
(:meth:`Hub.close_session`), a stream likewise (:meth:`Hub.open_stream`,
:meth:`Hub.close_stream`), and the limits on them are judged against these counts
(:meth:`Hub.session_refusal`, :meth:`Hub.stream_refusal`).

Timers (a stream the site does not accept in time, an idle stream, a session past its
maximum duration) are enforced by one periodic sweep (:meth:`Hub.sweep`), not a timer
per stream: the data path only stamps ``last_activity``.  The sweep takes the time as
an argument and the authority check as a callable, so a test drives it with a fake
clock.  The hub knows links, sessions and relays only through the small protocols
below: it sits under :mod:`.links` and :mod:`.relay`, which import it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Protocol

from ..protocol import Connection, ErrorCode
from .limits import Limits, seconds
from .route import Route, session_refusal
from .siteinfo import RemoteSite, SiteInfo

log = logging.getLogger("supctl.tower")

#: Seconds between two sweeps: a timer fires at most this late.
SWEEP_INTERVAL = 0.5

#: Seconds a draining replica keeps a moved site's old link once another replica holds the
#: site: the others read the claims every heartbeat (1 s), and relay here until then.
MOVE_GRACE = 1.5
#: Seconds a draining replica waits for an enforcer told to move to link elsewhere.
MOVE_WAIT = 5.0

#: What sessions and site links are told when the tower drains (SIGTERM).
DRAIN_REASON = "the control tower is shutting down"

#: Why each target of an accepted session (:attr:`.Route.targets`, in order) may no longer
#: be used (its token, the policies in force), None for each that still may.
Authority = Callable[[Route], Sequence[str | None]]


class Stream(Protocol):
    """A relayed stream (:class:`.relay.Relay`), as the sweep sees it."""

    @property
    def route(self) -> Route: ...  # the session's target it relays to
    @property
    def accepted(self) -> bool: ...
    @property
    def started(self) -> float: ...
    @property
    def last_activity(self) -> float: ...
    def abort(self, code: ErrorCode, text: str, close: str) -> None: ...


class Session(Protocol):
    """A supctl session (:class:`.links.ClientLink`)."""

    @property
    def conn(self) -> Connection: ...
    @property
    def route(self) -> Route: ...
    @property
    def user(self) -> str: ...
    @property
    def started(self) -> float: ...
    @property
    def relays(self) -> Mapping[int, Stream]: ...
    def close(self, code: ErrorCode = ..., reason: str = ...) -> None: ...
    @property
    def goaway_ok(self) -> bool: ...
    def go_away(self, reason: str, deadline: float) -> None: ...


class Site(Protocol):
    """A site's enforcer link (:class:`.links.SiteLink`)."""

    @property
    def site(self) -> str: ...
    @property
    def peer(self) -> str: ...
    @property
    def info(self) -> SiteInfo | None: ...
    @property
    def hello(self) -> str:
        """What ``info`` was parsed from, as JSON: for the other replicas."""

    @property
    def relays(self) -> Mapping[int, Stream]: ...
    def evict_if_invalid(self) -> bool: ...
    def close(self, code: ErrorCode = ..., reason: str = ...) -> None: ...
    @property
    def moving_since(self) -> float | None:
        """When the enforcer was told to move (GOAWAY), if it was and understands it."""

    def go_away(self, reason: str, now: float) -> None: ...


class SitePresence(Protocol):
    """Where a replica records the site links it holds (:class:`.presence.Presence`)."""

    @property
    def replica(self) -> str: ...

    def claim(self, site: str, peer: str, info: str, granted: Callable[[str | None], None]) -> None:
        """Record the claim (``info``: the site's HELLO as JSON), then ``granted(None)``,
        or ``granted(reason)`` if refused."""

    def report(self, site: str, info: str) -> None:
        """Record what the site held here reports now (its STATUS, as JSON)."""

    def release(self, site: str) -> None: ...

    def suspect(self, site: str) -> None:
        """The holder of ``site`` could not be reached: read the claims again soon."""

    async def drain(self) -> None:
        """Record that this replica drains: its sites may be claimed by another at once."""

    def remote_site(self, site: str) -> RemoteSite | None:
        """The site as another replica holds it, or None."""

    async def lookup(self, site: str, *, again: bool = False) -> RemoteSite | None:
        """:meth:`remote_site`, after reading the store again if the site is held nowhere
        (or with ``again``)."""


class Hub:
    def __init__(self, limits: Limits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.clock = clock  # monotonic seconds: sessions' and streams' stamps (fake in tests)
        self.sites: dict[str, Site] = {}
        self.sessions: set[Session] = set()
        # Per user: live sessions, and concurrent streams over all of them.
        self.user_sessions: Counter[str] = Counter()
        self.user_streams: Counter[str] = Counter()
        self.draining = False  # SIGTERM: no new session; see begin_drain
        # The store's record of which replica holds which site (None: a tower alone, as
        # in the unit tests): a site's link counts only once claimed there.
        self.presence: SitePresence | None = None
        # Peering is on: a drain moves the sites to other replicas before it closes their
        # links (GOAWAY to their enforcers), so that they are not away meanwhile.
        self.move_sites = False
        self._moved: dict[str, float] = {}  # site: when a drain first saw another replica hold it

    # --- site links: one per site -------------------------------------------------------

    def site_link(self, site: str) -> Site | None:
        """The link serving ``site``: only one that is live and whose token is still the
        site's.  A link whose token was rotated or removed is closed on the spot, so no
        stream goes to it even before the sweep (:meth:`sweep_sites`) gets there."""
        link = self.sites.get(site)
        if link is None or link.evict_if_invalid():
            return None
        return link

    def site_info(self, site: str) -> SiteInfo | None:
        """What ``site`` reported, if a valid link serves it here or another replica holds
        it (for :class:`.authorise.Sites`)."""
        link = self.site_link(site)
        if link is not None:
            return link.info
        remote = self.presence.remote_site(site) if self.presence is not None else None
        return remote.info if remote is not None else None

    def site_replica(self, site: str) -> str | None:
        """Which replica holds ``site``'s link (this one's id, if here), or None."""
        if self.site_link(site) is not None:
            return self.presence.replica if self.presence is not None else ""
        remote = self.presence.remote_site(site) if self.presence is not None else None
        return remote.replica if remote is not None else None

    def site_status(self, link: Site) -> None:
        """``link``'s site sent a STATUS: the other replicas learn it from the store."""
        if self.presence is not None and self.sites.get(link.site) is link:
            self.presence.report(link.site, link.hello)

    def site_connected(self, link: Site) -> None:
        # The same rule as the upgrade's, for two handshakes that raced past it (or a
        # token rotated between the upgrade and the HELLO): a link holding a valid token
        # takes over from one that no longer does; the first link wins while both are valid.
        if link.evict_if_invalid() or not self._first_here(link):
            return
        presence = self.presence
        if presence is None:
            self._register(link)
            return

        def granted(refusal: str | None) -> None:
            # The same rule across replicas: a stolen site token reaching another replica
            # cannot push a live enforcer off either.
            if refusal is not None:
                log.warning("refused a link of site %s from %s: %s", link.site, link.peer, refusal)
                link.close(ErrorCode.DENIED, refusal)
            elif link.evict_if_invalid():  # lost (or its token rotated) while the claim was written
                if self.site_link(link.site) is None:
                    presence.release(link.site)
            elif self._first_here(link):
                self._register(link)

        presence.claim(link.site, link.peer, link.hello, granted)

    def _first_here(self, link: Site) -> bool:
        """True unless another valid link of ``link``'s site is live on this tower (then
        ``link`` is closed)."""
        old = self.site_link(link.site)
        if old is not None and old is not link:
            reason = f"site {link.site} is already connected from {old.peer}"
            log.warning("refused a second link of site %s from %s: %s", link.site, link.peer, reason)
            link.close(ErrorCode.DENIED, reason)
            return False
        return True

    def _register(self, link: Site) -> None:
        self.sites[link.site] = link
        info = link.info
        assert info is not None
        log.info(
            "site %s connected (%d applications, handlers %s)",
            link.site,
            len(info.applications),
            ",".join(info.handlers),
            extra={"site": link.site, "peer": link.peer},
        )

    def close_sites(self, reason: str) -> None:
        """Close every site link (their enforcers reconnect): this replica's claims on them
        in the store are void."""
        for link in list(self.sites.values()):
            link.close(ErrorCode.GOING_AWAY, reason)

    def site_lost(self, link: Site, reason: str) -> None:
        if self.sites.get(link.site) is link:
            del self.sites[link.site]
            # A normal event (an enforcer restarts, moves to another replica): not a warning.
            log.info(
                "site %s disconnected: %s", link.site, reason, extra={"site": link.site, "reason": reason}
            )
            if self.presence is not None:
                self.presence.release(link.site)

    # --- sessions -------------------------------------------------------------------------

    def session_refusal(self, user: str) -> str | None:
        """Why ``user`` may not open one more session now (sessions-per-user), or None."""
        most = self.limits.sessions_per_user
        if self.user_sessions[user] >= most:
            return f"more than {most} sessions for user {user}"
        return None

    def open_session(self, session: Session) -> None:
        self.sessions.add(session)
        self.user_sessions[session.user] += 1

    def close_session(self, session: Session) -> None:
        if session not in self.sessions:
            return
        self.sessions.discard(session)
        _release(self.user_sessions, session.user)

    # --- streams --------------------------------------------------------------------------

    def stream_refusal(self, session: Session, site: Site | None) -> str | None:
        """Why ``session`` may not open one more stream to ``site`` now (naming the limit), or None.

        ``site`` None: the site's link is another replica's, which judges the site's
        budget (:meth:`site_full`) when the relayed stream reaches it.

        A session's streams all go to its route's site.  Besides the fixed per-session
        and per-user counts, the site's ``streams-per-site`` is shared: a session may
        hold at most ``streams_per_site // (n + 1)`` of them, n being the sessions that
        hold streams on the site, this one included.  The ``+ 1`` keeps a share free for
        a session that comes next, so no session - nor a few - can take a site's whole
        budget, while one alone may still use half of it.  Checked only when a stream
        opens (nothing already open is cut): a session that took more while the site was
        quiet opens no more until it is back under its share.  (The shares count this
        replica's sessions; across replicas only the budget itself binds.)
        """
        limits = self.limits
        held = len(session.relays)
        if held >= limits.streams_per_session:
            return f"more than {limits.streams_per_session} concurrent streams in this session (streams-per-session)"
        if self.user_streams[session.user] >= limits.streams_per_user:
            return f"more than {limits.streams_per_user} concurrent streams for user {session.user} (streams-per-user)"
        if site is None:
            return None
        if (full := self.site_full(site)) is not None:
            return full
        budget = limits.streams_per_site
        # Counting the sessions on the site is O(sessions): only when the share can bind.
        if held >= budget // (len(self.sessions) + 2):
            using = 1 + sum(
                1
                for other in self.sessions
                if other is not session and other.relays and other.route.site == site.site
            )
            share = budget // (using + 1)
            if held >= share:
                return (
                    f"more than {share} concurrent streams in this session, its fair share of the"
                    f" {budget} of site {site.site} with {using} sessions using it (streams-per-site)"
                )
        return None

    def site_full(self, site: Site) -> str | None:
        """Why ``site``'s link takes no more streams (``streams-per-site``), or None."""
        budget = self.limits.streams_per_site
        if len(site.relays) >= budget:
            return f"site {site.site} has {budget} concurrent streams, its limit (streams-per-site)"
        return None

    def open_stream(self, user: str) -> None:
        self.user_streams[user] += 1

    def close_stream(self, user: str) -> None:
        _release(self.user_streams, user)

    # --- the sweep ------------------------------------------------------------------------

    def sweep(self, now: float, authority: Authority) -> None:
        """One pass over every session and stream at time ``now``, enforcing the timers."""
        limits = self.limits
        open_timeout = limits.stream_open_timeout
        idle = limits.stream_idle_timeout
        duration = limits.session_duration
        for session in list(self.sessions):
            if session.conn.closed is not None:
                continue
            # Authority is checked at the upgrade, at every OPEN and again here: revoking a
            # token (or its expiry, unless a long-running supctl renewed it), removing its user
            # or narrowing a policy ends the sessions it no longer allows.  A session of
            # several targets that keeps some loses only the streams of the others: its
            # other forwards go on, and every OPEN is judged for its own target.
            refusals = authority(session.route)
            if refusal := session_refusal(refusals):
                log.warning("closing session %s: %s", session.route.summary, refusal)
                session.close(ErrorCode.DENIED, refusal)
                continue
            if any(refusals):
                denied = {t: r for t, r in zip(session.route.targets, refusals, strict=True) if r}
                for relay in list(session.relays.values()):
                    if (why := denied.get(relay.route)) is not None:
                        relay.abort(ErrorCode.DENIED, why, "denied")
            if duration and now - session.started >= duration:
                reason = f"session exceeded {seconds(duration)} s"
                log.warning("closing session %s: %s", session.route.summary, reason)
                session.close(ErrorCode.LIMIT, reason)
                continue
            for relay in list(session.relays.values()):
                if not relay.accepted:
                    if now - relay.started >= open_timeout:
                        relay.abort(
                            ErrorCode.TIMEOUT,
                            f"the site did not answer within {seconds(open_timeout)} s",
                            "timeout",
                        )
                elif idle and now - relay.last_activity >= idle:
                    relay.abort(ErrorCode.TIMEOUT, f"idle for {seconds(idle)} s", "timeout")

    # --- draining (SIGTERM) ------------------------------------------------------------------

    def begin_drain(self, now: float, timeout: float) -> float:
        """Start draining at ``now``: tell every session (those that understand GOAWAY) to
        open new streams elsewhere.  Returns the deadline for :meth:`drain_step`."""
        self.draining = True
        for session in list(self.sessions):
            if session.conn.closed is None:
                session.go_away(DRAIN_REASON, timeout)
        if self.move_sites:
            for link in list(self.sites.values()):
                link.go_away(DRAIN_REASON, now)
        return now + timeout

    def drain_step(self, now: float, deadline: float) -> bool:
        """One pass of a drain at ``now``; True once nothing is left open.

        A session that got GOAWAY closes itself once its streams ended (only the client
        knows that none of its OPENs is still on the way).  Another is closed
        (``GOING_AWAY``) as soon as it holds no stream.  At ``deadline`` every session is
        closed, whatever it holds (its streams are reset: an end the user sees, never a
        silent cut).  A site link closes once it carries no stream and either its
        enforcer, told to move, is linked to another replica (for :data:`MOVE_GRACE`
        seconds: the others have seen it by then), or no session is left here (every
        stream of a session here crosses one) and its enforcer did not move within
        :data:`MOVE_WAIT` or cannot; such enforcers reconnect within about 5 s."""
        final = now >= deadline
        open_sessions = 0
        for session in list(self.sessions):
            if session.conn.closed is not None:
                continue
            if (session.relays or session.goaway_ok) and not final:
                open_sessions += 1
                continue
            reason = DRAIN_REASON
            if session.relays:
                reason += f"; {len(session.relays)} streams cut at the drain deadline"
                log.warning("closing session %s: %s", session.route.summary, reason)
            session.close(ErrorCode.GOING_AWAY, reason)
        sites_open = False
        for link in list(self.sites.values()):
            if not final and (link.relays or not self._may_leave(link, now, open_sessions)):
                sites_open = True
                continue
            link.close(ErrorCode.GOING_AWAY, DRAIN_REASON)
        return not open_sessions and not sites_open

    def _may_leave(self, link: Site, now: float, open_sessions: int) -> bool:
        """Whether a draining site link without streams may close now (:meth:`drain_step`)."""
        asked = link.moving_since
        if asked is not None:
            if self.presence is not None and self.presence.remote_site(link.site) is not None:
                seen = self._moved.setdefault(link.site, now)
                return now - seen >= MOVE_GRACE
            if now - asked < MOVE_WAIT:
                return False  # its enforcer is linking to another replica
        return not open_sessions

    def sweep_sites(self) -> None:
        """Close every site link whose token is no longer the site's (rotated, or the site
        removed): a thief holding an old site token loses the link within a sweep."""
        for link in list(self.sites.values()):
            link.evict_if_invalid()


def _release(counts: Counter[str], user: str) -> None:
    counts[user] -= 1
    if counts[user] <= 0:
        del counts[user]  # a user with nothing left holds no entry


async def sweep_forever(
    hub: Hub,
    authority: Authority,
    *,
    after: Callable[[], object] = lambda: None,
    interval: float = SWEEP_INTERVAL,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    wake: asyncio.Event | None = None,
) -> None:
    """Sweep ``hub`` every ``interval`` seconds at its clock's time, for ever, and at once
    when ``wake`` is set (the credentials or policies changed); ``after`` each sweep (the
    tower flushes its rate-limited log).  ``sleep``: for tests."""
    while True:
        if wake is None:
            await sleep(interval)
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), interval)
            wake.clear()
        try:
            hub.sweep(hub.clock(), authority)
            after()  # "N similar messages suppressed" once a flood has ended
        except Exception:  # a bug here must not stop the timers for good
            log.exception("internal error in the limits sweep")
        try:
            hub.sweep_sites()
        except Exception:  # nor the site checks, nor one stop the other
            log.exception("internal error in the sweep of site links")


#: Seconds between two passes of a drain: a session is closed at most this late after its
#: last stream ended.
DRAIN_INTERVAL = 0.1


async def drain(
    hub: Hub,
    timeout: float,
    *,
    interval: float = DRAIN_INTERVAL,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
) -> None:
    """Drain ``hub`` (the tower got SIGTERM; it no longer accepts sessions): GOAWAY to
    every session, then :meth:`Hub.drain_step` every ``interval`` until nothing is left
    open, at most ``timeout`` seconds at its clock's time (then what is left is cut)."""
    streams = sum(len(session.relays) for session in hub.sessions)
    log.warning(
        "control-tower draining: %d sessions, %d sites, %d streams; at most %s s",
        len(hub.sessions), len(hub.sites), streams, seconds(timeout),
    )  # fmt: skip
    if hub.move_sites and hub.presence is not None:
        await hub.presence.drain()  # first: the replica an enforcer moves to claims its site at once
    deadline = hub.begin_drain(hub.clock(), timeout)
    while not hub.drain_step(hub.clock(), deadline):
        await sleep(interval)
