"""The tower's two kinds of link: a supctl session and a site's enforcer."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import UsageError
from ..link import Link, WebSocketLike
from ..protocol import (
    Connection,
    ConnectionClosed,
    ErrorCode,
    Event,
    HelloReceived,
    OpenRequest,
    StatusReceived,
    StreamOpened,
)
from . import audit
from .policy import Request as PolicyRequest
from .refusals import Refusals
from .relay import Relay
from .siteinfo import SiteInfo

if TYPE_CHECKING:
    from .server import Tower

log = logging.getLogger("supctl.tower")


@dataclass(frozen=True)
class Route:
    """What the tower authorised for a supctl session, from its URL."""

    verb: str
    site: str
    application: str
    service_instance: str
    protocol: str = ""
    port: int = 0
    ip_address: str = ""
    container: str = ""
    who: str = ""
    # connect: the address as the client spelled it, when that differs from the canonical
    # ip_address (judged and dialled); for the audit record only.
    requested_address: str = ""
    # Set by the tower once the session is accepted, for its audit records.
    peer: str = ""  # the client's address
    session: str = ""  # a random id shared by the session's records

    def request(self, args: dict[str, Any]) -> OpenRequest:
        # Identity fields come from the authorised URL, never from the client's frame.
        return OpenRequest(
            verb=self.verb,
            application=self.application,
            service_instance=self.service_instance,
            container=self.container,
            protocol=self.protocol,
            port=self.port,
            ip_address=self.ip_address,
            args=args,
        )

    def policy_request(self) -> PolicyRequest:
        """What the policies judge: built from the route itself, so the request judged at
        the upgrade, at every OPEN and by the sweep is the one :meth:`request` dispatches."""
        if self.verb == "connect":
            return PolicyRequest(
                "connect",
                self.site,
                self.application,
                self.service_instance,
                "",
                self.protocol,
                self.port,
                self.ip_address or None,
            )
        return PolicyRequest(self.verb, self.site, self.application, self.service_instance, self.container)

    @property
    def summary(self) -> str:
        target = f"{self.ip_address or '127.0.0.1'}:{self.port}" if self.protocol else self.container
        return (
            f"who={self.who} site={self.site} application={self.application} "
            f"instance={self.service_instance} verb={self.verb} protocol={self.protocol} target={target}"
        )

    @property
    def user(self) -> str:
        """Whom per-user limits count against: the user part of ``who``."""
        return audit.split_who(self.who)[0] or self.who


class ClientLink(Link):
    """A supctl session: every stream it opens is relayed to its route's site."""

    def __init__(self, ws: WebSocketLike, tower: Tower, route: Route) -> None:
        super().__init__(ws, Connection(odd_ids=False, accept_streams=True), name=f"session {route.who}")
        self.tower = tower
        self.route = route
        self.user = route.user
        self.started = time.monotonic()  # for the session-duration limit
        self.relays: dict[int, Relay] = {}
        limits = tower.limits
        self.refusals = Refusals(limits.refused_streams, limits.refused_window, tower.clock)

    def handle_event(self, event: Event) -> None:
        if isinstance(event, StreamOpened):
            self._open(event)
        elif isinstance(event, ConnectionClosed):
            log.warning("closing session %s: %s", self.route.summary, event.reason)
            super().handle_event(event)
        elif isinstance(event, HelloReceived | StatusReceived):
            pass  # impossible: the core refuses HELLO and STATUS on a session link
        else:
            relay = self.relays.get(event.stream_id)
            if relay is not None:
                relay.from_client(event)

    def _open(self, event: StreamOpened) -> None:
        if self.conn.closed is not None:
            return  # the rest of a message whose earlier frames got the session closed
        # Authority is judged again for every stream, against the token and the policies
        # in force now: narrowing a policy or revoking a token reaches open sessions.
        refusal = self.tower.route_refusal(self.route)
        if refusal is not None:
            self._refuse(event, ErrorCode.DENIED, refusal, "denied")
            self.close(ErrorCode.DENIED, refusal)
            return
        site = self.tower.site_link(self.route.site)
        args = event.request.args
        if site is None or site.conn.closed is not None:  # closed: lost, on_lost not run yet
            self._refuse(event, ErrorCode.LINK_LOST, f"site {self.route.site} is not connected", "site-lost")
            return
        if (text := self._stream_limit(site)) is not None:
            self._refuse(event, ErrorCode.LIMIT, text, "limit")
            return
        site_id = site.conn.open_stream(self.route.request(args))
        Relay(self, event.stream_id, site, site_id, self.route.summary, audit.exec_command(self.route, args))
        site.flush()

    def _stream_limit(self, site: SiteLink) -> str | None:
        """Why this session may not open one more stream now (naming the limit), or None.

        A session's streams all go to its route's site.  Besides the fixed per-session
        and per-user counts, the site's ``streams-per-site`` is shared: a session may
        hold at most ``streams_per_site // (n + 1)`` of them, n being the sessions that
        hold streams on the site, this one included.  The ``+ 1`` keeps a share free for
        a session that comes next, so no session - nor a few - can take a site's whole
        budget, while one alone may still use half of it.  Checked only when a stream
        opens (nothing already open is cut): a session that took more while the site was
        quiet opens no more until it is back under its share.
        """
        limits, tower = self.tower.limits, self.tower
        held = len(self.relays)
        if held >= limits.streams_per_session:
            return f"more than {limits.streams_per_session} concurrent streams in this session (streams-per-session)"
        if tower.user_streams[self.user] >= limits.streams_per_user:
            return f"more than {limits.streams_per_user} concurrent streams for user {self.user} (streams-per-user)"
        budget = limits.streams_per_site
        if len(site.relays) >= budget:
            return f"site {site.site} has {budget} concurrent streams, its limit (streams-per-site)"
        # Counting the sessions on the site is O(sessions): only when the share can bind.
        if held >= budget // (len(tower.sessions) + 2):
            using = 1 + sum(
                1
                for other in tower.sessions
                if other is not self and other.relays and other.route.site == site.site
            )
            share = budget // (using + 1)
            if held >= share:
                return (
                    f"more than {share} concurrent streams in this session, its fair share of the"
                    f" {budget} of site {site.site} with {using} sessions using it (streams-per-site)"
                )
        return None

    def _refuse(self, event: StreamOpened, code: ErrorCode, text: str, close: str) -> None:
        """Reset a stream the tower does not relay, and count it."""
        self.conn.reset_stream(event.stream_id, code, text)
        if code is ErrorCode.LIMIT:
            self.tower.peer_log.warning(
                f"streams refused for user {self.user}", "stream refused %s: %s", self.route.summary, text
            )
        if self.stream_refused(close, text) and self.tower.audit is not None:
            self.tower.audit.append(
                audit.stream_record(
                    self.route,
                    event.stream_id,
                    bytes_up=0,
                    bytes_down=0,
                    duration=0.0,
                    result=text,
                    close_reason=close,
                    command=audit.exec_command(self.route, event.request.args),
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

    def on_lost(self, reason: str) -> None:
        for relay in list(self.relays.values()):
            relay.abort(ErrorCode.CANCEL, f"client went away: {reason}", "client-lost")
        self._write_refusals()


@dataclass(frozen=True)
class SiteClaim:
    """An enforcer that authenticated as ``site``, and the hash of the token it showed.

    The link keeps the hash so that the tower can tell, while the link lives, whether
    that token is still the site's: a rotated or removed site token ends the link.
    """

    site: str
    token_hash: str


class SiteLink(Link):
    """An enforcer's link: the tower opens streams on it, the enforcer may not."""

    def __init__(self, ws: WebSocketLike, tower: Tower, claim: SiteClaim, peer: str = "?") -> None:
        super().__init__(
            ws, Connection(odd_ids=True, accept_streams=False, accept_hello=True), name=f"site {claim.site}"
        )
        self.tower = tower
        self.site = claim.site
        self.token_hash = claim.token_hash
        self.peer = peer  # the enforcer's address, for logs and refusals of a second link
        self.info: SiteInfo | None = None
        self.relays: dict[int, Relay] = {}

    def refusal(self) -> str | None:
        """Why this link may no longer serve its site (its token was rotated, the site
        removed), or None while its token is the site's."""
        return self.tower.store.site_refusal(self.site, self.token_hash)

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
        elif isinstance(event, StreamOpened):
            pass  # impossible: the core refuses OPEN from an enforcer and closes the link
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
        if first:
            self.tower.site_connected(self)

    def on_lost(self, reason: str) -> None:
        self.tower.site_lost(self, reason)
        for relay in list(self.relays.values()):
            relay.abort(ErrorCode.LINK_LOST, f"lost the link to site {self.site}: {reason}", "site-lost")
