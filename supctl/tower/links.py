"""The tower's two kinds of link: a supctl session and a site's enforcer."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from ..errors import UsageError
from ..link import Link, WebSocketLike
from ..protocol import (
    Connection,
    ConnectionClosed,
    ErrorCode,
    Event,
    GoawayReceived,
    HelloReceived,
    StatusReceived,
    StreamOpened,
)
from ..protocol.messages import encode_hello
from . import audit
from .limits import Limits
from .refusals import Refusals
from .relay import End, Relay, Services
from .route import Route, SiteClaim, session_refusal
from .siteinfo import RemoteSite, SiteInfo

__all__ = ["ClientLink", "LinkServices", "PeerRoutes", "Route", "SiteClaim", "SiteLink"]

log = logging.getLogger("supctl.tower")


class PeerRoutes(Protocol):
    """The links to the other replicas (:class:`.peering.Peers`)."""

    def link(self, remote: RemoteSite) -> tuple[End | None, str]:
        """The live link to the replica holding ``remote``, or (None, why there is none
        now; a dial starts if none is under way)."""

    async def ready(self, remote: RemoteSite, timeout: float) -> None:
        """Wait at most ``timeout`` s for a link to ``remote``'s replica (a dial, if needed)."""

    def when_up(self, replica: str, callback: Callable[[], None]) -> bool:
        """Call ``callback`` when the dial to ``replica`` under way ends; False if none is."""


class LinkServices(Services, Protocol):
    """What a link asks of the tower (:class:`.server.Tower`): besides its relays' needs,
    the limits and the two judgements that are re-made while a link lives."""

    @property
    def limits(self) -> Limits: ...
    def target_refusals(self, route: Route) -> Sequence[str | None]:
        """Why each target of an accepted session's route may no longer be used (token,
        policies), in the order of its targets; None for each that still may."""

    def site_refusal(self, site: str, token_hash: str) -> str | None:
        """Why a site link's token is no longer the site's (rotated, removed), or None."""

    @property
    def peers(self) -> PeerRoutes | None:
        """The links to the other replicas; None: this one has no [cluster] advertise."""


class ClientLink(Link):
    """A supctl session: every stream it opens is relayed to its route's site."""

    def __init__(self, ws: WebSocketLike, tower: LinkServices, route: Route, *, goaway: bool = False) -> None:
        super().__init__(ws, Connection(odd_ids=False, accept_streams=True), name=f"session {route.who}")
        self.goaway_ok = goaway  # the client said it understands GOAWAY (Supctl-Features)
        self.accounted = True  # its streams' counts and audit records are kept here (relay.py)
        self.tower = tower
        self.route = route
        self.user = route.user
        self.started = tower.hub.clock()  # for the session-duration limit, in the sweep's time
        self.relays: dict[int, Relay] = {}
        # OPENs waiting for a peer link being dialled, with what the client sent on them
        # meanwhile (at most the early-data window: the core enforces it).
        self.waiting: dict[int, list[Event]] = {}
        limits = tower.limits
        self.refusals = Refusals(limits.refused_streams, limits.refused_window, tower.clock)

    def handle_event(self, event: Event) -> None:
        if isinstance(event, StreamOpened):
            self._open(event)
        elif isinstance(event, ConnectionClosed):
            log.warning("closing session %s: %s", self.route.summary, event.reason)
            super().handle_event(event)
        elif isinstance(event, HelloReceived | StatusReceived | GoawayReceived):
            pass  # impossible: the core refuses HELLO, STATUS and GOAWAY on a session link
        else:
            relay = self.relays.get(event.stream_id)
            if relay is not None:
                relay.from_client(event)
            elif (held := self.waiting.get(event.stream_id)) is not None:
                held.append(event)

    def _open(self, event: StreamOpened) -> None:
        if self.conn.closed is not None:
            return  # the rest of a message whose earlier frames got the session closed
        # Authority is judged again for every stream, against the token and the policies
        # in force now: narrowing a policy or revoking a token reaches open sessions.  No
        # target left: the session ends; the stream's own target refused: that stream.
        refusals = self.tower.target_refusals(self.route)
        if refusal := session_refusal(refusals):
            self._refuse(event, ErrorCode.DENIED, refusal, "denied")
            self.close(ErrorCode.DENIED, refusal)
            return
        chosen = self._target(event.request.args)
        if isinstance(chosen, str):
            self._refuse(event, ErrorCode.NOT_FOUND, chosen, "denied")
            return
        index, args = chosen
        route = self.route.targets[index]
        if (denied := refusals[index]) is not None:
            self._refuse(event, ErrorCode.DENIED, denied, "denied", route)
            return
        hub = self.tower.hub
        site = hub.site_link(route.site)
        # Not a SiteLink: None (no valid link).  Closed: lost, its on_lost not run yet.
        if not isinstance(site, SiteLink) or site.conn.closed is not None:
            self._open_remote(event, route, args)
            return
        if (text := hub.stream_refusal(self, site)) is not None:
            self._refuse(event, ErrorCode.LIMIT, text, "limit", route)
            return
        if (text := site.cannot_serve(route, args)) is not None:
            self._refuse(event, ErrorCode.UNSUPPORTED, text, "unsupported", route)
            return
        site_id = site.conn.open_stream(route.request(args))
        Relay(self, event.stream_id, site, site_id, route, audit.exec_command(route, args))
        site.flush()

    def _target(self, args: dict[str, Any]) -> tuple[int, dict[str, Any]] | str:
        """The position of the session's target a stream asked for (``forward``: among the
        targets the session was granted, 0 unless given) and the args the site gets, without
        ``forward``; or why there is no such target.  The client picks only among targets
        authorised at the upgrade (and judged again above): never one of its own making."""
        if "forward" not in args:
            return 0, args
        index = args["forward"]
        count = len(self.route.targets)
        if type(index) is not int or not 0 <= index < count:
            return f"no forward {str(index)[:20]!r} in this session (it has {count})"
        return index, {key: value for key, value in args.items() if key != "forward"}

    def _open_remote(self, event: StreamOpened, route: Route, args: dict[str, Any]) -> None:
        """Relay the stream to the replica that holds the site, if another one does: the
        request it carries is the one judged here; that replica checks only that the site
        is still its own, and the site's budget (docs/tower.md, "Replicas")."""
        hub, presence = self.tower.hub, self.tower.hub.presence
        remote = presence.remote_site(route.site) if presence is not None else None
        if presence is None or remote is None:
            self._refuse(
                event, ErrorCode.LINK_LOST, f"site {route.site} is not connected", "site-lost", route
            )
            return
        peers = self.tower.peers
        if peers is None:
            link, why = None, "this replica has no [cluster] advertise, so it relays to no other"
        else:
            link, why = peers.link(remote)
            sid = event.stream_id
            if (
                link is None
                and sid not in self.waiting
                and len(self.waiting) < self.tower.limits.streams_per_session
                and peers.when_up(remote.replica, lambda: self._dialled(event))
            ):
                self.waiting[sid] = []  # judged again, and routed, once the dial ended
                return
        if link is None:
            presence.suspect(route.site)  # dead, or the site moved: the next stream knows
            text = f"site {route.site} is connected to replica {remote.replica}, which this replica cannot reach: {why}"
            self._refuse(event, ErrorCode.LINK_LOST, text, "site-lost", route)
            return
        if (limit := hub.stream_refusal(self, None)) is not None:
            self._refuse(event, ErrorCode.LIMIT, limit, "limit", route)
            return
        peer_id = link.conn.open_stream(route.peer_request(args))
        Relay(self, event.stream_id, link, peer_id, route, audit.exec_command(route, args))
        link.flush()

    def _dialled(self, event: StreamOpened) -> None:
        held = self.waiting.pop(event.stream_id, [])
        if self.conn.closed is None and self.conn.is_pending(event.stream_id):  # not reset meanwhile
            self._open(event)
            relay = self.relays.get(event.stream_id)
            if relay is not None:  # the early data and EOF that came meanwhile, in order
                for early in held:
                    relay.from_client(early)
            self.flush()

    def _refuse(
        self, event: StreamOpened, code: ErrorCode, text: str, close: str, route: Route | None = None
    ) -> None:
        """Reset a stream the tower does not relay, and count it.  ``route``: the target it
        asked for, once known (the audit record names it), else the session's first."""
        target = route or self.route
        self.conn.reset_stream(event.stream_id, code, text)
        if code is ErrorCode.LIMIT:
            self.tower.peer_log.warning(
                f"streams refused for user {self.user}", "stream refused %s: %s", target.summary, text
            )
        if self.stream_refused(close, text) and self.tower.audit is not None:
            self.tower.audit.append(
                audit.stream_record(
                    target,
                    event.stream_id,
                    bytes_up=0,
                    bytes_down=0,
                    duration=0.0,
                    result=text,
                    close_reason=close,
                    command=audit.exec_command(target, event.request.args),
                )
            )

    def stream_refused(self, close: str, result: str) -> bool:
        """Count a refused OPEN of this session: by the tower (:meth:`_refuse`) or by the
        site before it accepted the stream (:meth:`Relay.finish`).  True if the caller
        writes the refusal's own ``stream-closed`` record; else it is counted into a
        ``streams-refused`` one (:mod:`.refusals`).  Closes the session when refusals
        keep coming."""
        verdict = self.refusals.refused(close, result)
        if not verdict.record and self.refusals.summary_due():
            self._write_refusals()
        if verdict.close is not None and self.conn.closed is None:
            self.tower.peer_log.warning(
                f"sessions closed for refusals of user {self.user}",
                "closing session %s: %s",
                self.route.summary,
                verdict.close,
            )
            self.close(ErrorCode.LIMIT, verdict.close)
        return verdict.record

    def _write_refusals(self) -> None:
        fields = self.refusals.take_summary()
        if fields is not None and self.tower.audit is not None:
            self.tower.audit.append(audit.refusals_record(self.route, **fields))

    def go_away(self, reason: str, deadline: float) -> None:
        """Drain: a client that understands GOAWAY opens its next streams on a new session
        (another replica, or this tower once restarted); the open ones go on here."""
        if self.goaway_ok and self.conn.closed is None:
            self.conn.send_goaway({"reason": reason, "deadline": deadline})
            self.flush()

    def on_lost(self, reason: str) -> None:
        for relay in list(self.relays.values()):
            relay.abort(ErrorCode.CANCEL, f"client went away: {reason}", "client-lost")
        self._write_refusals()


class SiteLink(Link):
    """An enforcer's link: the tower opens streams on it, the enforcer may not."""

    def __init__(
        self,
        ws: WebSocketLike,
        tower: LinkServices,
        claim: SiteClaim,
        peer: str = "?",
        *,
        goaway: bool = False,
    ) -> None:
        super().__init__(
            ws, Connection(odd_ids=True, accept_streams=False, accept_hello=True), name=f"site {claim.site}"
        )
        self.goaway_ok = goaway  # the enforcer said it understands GOAWAY (Supctl-Features)
        self.moving_since: float | None = None  # when it was told to move (hub clock), if it was
        self.tower = tower
        self.site = claim.site
        self.token_hash = claim.token_hash
        self.peer = peer  # the enforcer's address, for logs and refusals of a second link
        self.info: SiteInfo | None = None
        self.hello = ""  # the HELLO or last STATUS that ``info`` was parsed from, as JSON
        self.relays: dict[int, Relay] = {}

    def refusal(self) -> str | None:
        """Why this link may no longer serve its site (its token was rotated, the site
        removed), or None while its token is the site's."""
        return self.tower.site_refusal(self.site, self.token_hash)

    def evict_if_invalid(self) -> bool:
        """Close this link if its token is no longer the site's; True if it is closed.

        A thief holding a site's old token must not get one more stream, nor one more
        byte of the streams it carries: they are reset (the supctl side learns why) and
        the link is closed with ``DENIED`` and the reason.
        """
        if self.conn.closed is not None:
            return True
        try:
            refusal = self.refusal()
        except UsageError as exc:  # the state file is gone or broken: trust no site token
            refusal = str(exc)
        if refusal is None:
            return False
        log.warning("closing link of site %s from %s: %s", self.site, self.peer, refusal)
        if self.tower.audit is not None:  # once per link: it is closed from here on
            rec = audit.record(
                "site-evicted", verb="enforcer", site=self.site, client=self.peer, result=refusal
            )
            self.tower.audit.append(rec)
        self.close(ErrorCode.DENIED, refusal)
        for relay in list(self.relays.values()):
            relay.abort(ErrorCode.DENIED, f"site {self.site}: {refusal}", "denied")
        return True

    def handle_event(self, event: Event) -> None:
        if isinstance(event, HelloReceived | StatusReceived):
            self._hello(event.payload)
        elif isinstance(event, ConnectionClosed):
            log.warning("closing link of site %s: %s", self.site, event.reason)
            super().handle_event(event)
        elif isinstance(event, StreamOpened | GoawayReceived):
            pass  # impossible: the core refuses OPEN and GOAWAY from an enforcer
        else:
            relay = self.relays.get(event.stream_id)
            if relay is not None:
                relay.from_site(event)

    def _hello(self, payload: dict[str, Any]) -> None:
        first = self.info is None
        try:
            self.info = SiteInfo.parse(payload)
        except (ValueError, AttributeError) as exc:
            self.close(ErrorCode.PROTOCOL, f"bad {'HELLO' if first else 'STATUS'}: {exc}")
            return
        self.hello = encode_hello(payload).decode()
        if first:
            self.tower.hub.site_connected(self)
        else:
            self.tower.hub.site_status(self)

    def cannot_serve(self, route: Route, args: dict[str, Any]) -> str | None:
        """Why this site's enforcer, as its HELLO describes it, cannot serve a stream of
        ``route`` with OPEN ``args`` (``exec -t`` without ``exec-tty``), or None."""
        if route.verb != "exec" or self.info is None:
            return None
        return self.info.exec_refusal(route.site, args)

    def go_away(self, reason: str, now: float) -> None:
        """Drain: an enforcer that understands GOAWAY links to another replica, which takes
        the site over; this link carries its streams to their end (hub.drain_step)."""
        if self.goaway_ok and self.conn.closed is None:
            self.moving_since = now
            self.conn.send_goaway({"reason": reason})
            self.flush()

    def on_lost(self, reason: str) -> None:
        self.tower.hub.site_lost(self, reason)
        for relay in list(self.relays.values()):
            relay.abort(ErrorCode.LINK_LOST, f"lost the link to site {self.site}: {reason}", "site-lost")
