"""The links between tower replicas: streams of a site held by another replica are relayed
to it over one multiplexed link per ordered pair of replicas (docs/tower.md, "Replicas").

Replica A, where a supctl session was accepted, dials replica B, which holds the
session's site.  On A the :class:`PeerLink` is the far end of A's relays, where a site
link would be; on B the :class:`PeerSession` is the near end of B's relays, where a
supctl session would be.  Both hops keep the per-stream credit of every other hop, so no
replica buffers more than a window per stream and direction.

Authority is judged once, at A, against the request that B forwards to the site as it
is (:meth:`.route.Route.peer_request`); B trusts the stream because the link is mutually
authenticated with the cluster's peer certificate (:mod:`.peering`), and checks only
that the site is still its own and the site's stream budget.  The audit record and the
user's counts are A's (``accounted``); the site still applies its local policy.
"""

from __future__ import annotations

import logging
from typing import Protocol

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
from . import audit
from .links import LinkServices, SiteLink
from .relay import Relay
from .route import Route

log = logging.getLogger("supctl.tower")

#: Concurrent streams on one peer link: every session of one replica to the sites of
#: another shares it, each bounded by its own limits first.
PEER_STREAMS = 16384


class PeerOwner(Protocol):
    """Who keeps the dialled links (:class:`.peering.Peers`)."""

    def forget(self, link: PeerLink) -> None: ...


class PeerLink(Link):
    """This replica's link to ``replica``: the far end of relays to the sites it holds."""

    def __init__(
        self, ws: WebSocketLike, tower: LinkServices, owner: PeerOwner, replica: str, address: str
    ) -> None:
        super().__init__(
            ws,
            Connection(odd_ids=True, accept_streams=False, max_streams=PEER_STREAMS),
            name=f"peer {replica}",
        )
        self.tower = tower
        self.owner = owner
        self.replica = replica
        self.address = address  # the replica's advertised wss:// URL, as dialled
        self.relays: dict[int, Relay] = {}

    def handle_event(self, event: Event) -> None:
        if isinstance(event, ConnectionClosed):
            log.warning("closing the peer link to replica %s: %s", self.replica, event.reason)
            super().handle_event(event)
        elif isinstance(event, StreamOpened | HelloReceived | StatusReceived | GoawayReceived):
            pass  # impossible: the core refuses them on this link
        else:
            relay = self.relays.get(event.stream_id)
            if relay is not None:
                relay.from_site(event)

    def on_lost(self, reason: str) -> None:
        self.owner.forget(self)
        log.warning("peer link to replica %s lost: %s", self.replica, reason)
        for relay in list(self.relays.values()):
            relay.abort(
                ErrorCode.LINK_LOST, f"lost the link to replica {self.replica}: {reason}", "site-lost"
            )


class PeerSession(Link):
    """``replica``'s link to this one: streams for the sites held here, authorised there."""

    accounted = False  # the replica that authorised the streams counts and audits them

    def __init__(self, ws: WebSocketLike, tower: LinkServices, replica: str, peer: str) -> None:
        super().__init__(
            ws,
            Connection(odd_ids=False, accept_streams=True, max_streams=PEER_STREAMS),
            name=f"peer {replica}",
        )
        self.tower = tower
        self.replica = replica  # as the peer named itself (it holds the cluster's certificate)
        self.peer = peer
        self.relays: dict[int, Relay] = {}

    def handle_event(self, event: Event) -> None:
        if isinstance(event, StreamOpened):
            self._open(event)
        elif isinstance(event, ConnectionClosed):
            log.warning("closing the peer link from replica %s: %s", self.replica, event.reason)
            super().handle_event(event)
        elif isinstance(event, HelloReceived | StatusReceived | GoawayReceived):
            pass  # impossible: the core refuses them on this link
        else:
            relay = self.relays.get(event.stream_id)
            if relay is not None:
                relay.from_client(event)

    def _open(self, event: StreamOpened) -> None:
        if self.conn.closed is not None:
            return
        try:
            route, request = Route.from_peer(event.request)
        except ValueError as exc:
            # A replica of another version, or a bug: this stream fails, not the link.
            self.tower.peer_log.warning(f"bad OPEN from replica {self.replica}", "bad OPEN from replica %s: %s",
                                        self.replica, exc)  # fmt: skip
            self.conn.reset_stream(event.stream_id, ErrorCode.PROTOCOL, str(exc))
            return
        hub = self.tower.hub
        # Draining or not: a site link here serves until it closes (its enforcer moved and
        # every replica knows it, hub.drain_step), so streams relayed meanwhile succeed.
        site = hub.site_link(route.site)
        if not isinstance(site, SiteLink) or site.conn.closed is not None:
            # It moved since the other replica looked (its view is at most a heartbeat old).
            text = f"site {route.site} is not connected to replica {self._me()}"
            self.conn.reset_stream(event.stream_id, ErrorCode.LINK_LOST, text)
            return
        if (full := hub.site_full(site)) is not None:
            self.conn.reset_stream(event.stream_id, ErrorCode.LIMIT, full)
            return
        if (unsupported := site.cannot_serve(route, request.args)) is not None:
            self.conn.reset_stream(event.stream_id, ErrorCode.UNSUPPORTED, unsupported)
            return
        site_id = site.conn.open_stream(request)
        Relay(self, event.stream_id, site, site_id, route, audit.exec_command(route, request.args))
        site.flush()

    def _me(self) -> str:
        presence = self.tower.hub.presence
        return presence.replica if presence is not None else "?"

    def stream_refused(self, close: str, result: str) -> bool:
        return False  # counted, and recorded, by the replica that authorised the stream

    def on_lost(self, reason: str) -> None:
        for relay in list(self.relays.values()):
            relay.abort(ErrorCode.CANCEL, f"replica {self.replica} went away: {reason}", "client-lost")
