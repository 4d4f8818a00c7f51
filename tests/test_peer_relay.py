"""Relaying to a site another replica holds, sans-I/O on a fake clock: real links, relays
and protocol connections driven by their frames; the other replica is the far end of an
in-memory peer link, and the store's view of the claims is a fake presence.

* A stream opened while the peer link is being dialled waits for it, and what the
  client sent meanwhile (early data, EOF) reaches the other replica whole, in order
  (without the hold, the early bytes were dropped: a truncated echo, seen end to end).
* The other replica gets the request judged here, with the site and who it is for.
* A draining replica keeps a site link its enforcer was told to leave until another
  replica holds the site for MOVE_GRACE, or MOVE_WAIT passed; then closes it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from test_hub import APP, INST, SITE, Rig, closed, in_loop
from test_site_identity import QuietWs

from supctl.protocol import (
    Connection,
    DataReceived,
    EndOfStream,
    ErrorCode,
    OpenRequest,
    StreamOpened,
    StreamReset,
)
from supctl.tower.hub import DRAIN_REASON, MOVE_GRACE, MOVE_WAIT
from supctl.tower.links import ClientLink
from supctl.tower.peerlinks import PeerLink
from supctl.tower.route import Route
from supctl.tower.siteinfo import InstanceInfo, RemoteSite, SiteInfo
from supctl.tower.store import hash_token

REMOTE = "far-site"


class FakePresence:
    """The claims as the last heartbeat read them: REMOTE (and maybe SITE) held by tower-b."""

    replica = "tower"

    def __init__(self) -> None:
        info = SiteInfo(applications={APP: {INST: InstanceInfo(INST, APP)}}, handlers=["tcp"])
        self.remote = {REMOTE: RemoteSite("tower-b", "wss://192.0.2.2:4647", info)}
        self.suspected: list[str] = []

    def remote_site(self, site: str) -> RemoteSite | None:
        return self.remote.get(site)

    def suspect(self, site: str) -> None:
        self.suspected.append(site)

    def claim(self, site: str, peer: str, info: str, granted: Callable[[str | None], None]) -> None:
        granted(None)

    def release(self, site: str) -> None: ...
    def report(self, site: str, info: str) -> None: ...


class FakePeers:
    """A dial to tower-b under way until the test ends it (sets ``up``)."""

    def __init__(self) -> None:
        self.up: PeerLink | None = None
        self.callbacks: list[Callable[[], None]] = []

    def link(self, remote: RemoteSite) -> tuple[PeerLink | None, str]:
        return self.up, "" if self.up else "its peer link is being set up"

    def forget(self, link: PeerLink) -> None: ...

    def when_up(self, replica: str, callback: Callable[[], None]) -> bool:
        if self.up is not None:
            return False
        self.callbacks.append(callback)
        return True


def test_a_stream_waits_for_the_peer_link_and_loses_none_of_its_early_bytes(tmp_path: Path) -> None:
    def body() -> None:
        rig = Rig(tmp_path)
        presence, peers = FakePresence(), FakePeers()
        rig.hub.presence = presence  # type: ignore[assignment]
        rig.tower.peers = peers  # type: ignore[assignment]
        who = f"admin:{hash_token(rig.admin)[:8]}"
        session = ClientLink(QuietWs(), rig.tower, Route("connect", REMOTE, APP, INST, "tcp", 80, who=who))
        rig.hub.open_session(session)
        supctl = Connection(odd_ids=True, accept_streams=False)
        sid = supctl.open_stream(OpenRequest(verb="connect", args={"x": 1}))
        early = b"e" * supctl.send_credit(sid)  # all the early data the window allows, then EOF
        supctl.send_data(sid, early)
        supctl.send_eof(sid)
        for event in session.conn.receive_data(supctl.data_to_send()):
            session.handle_event(event)
        assert sid in session.waiting and not session.relays and len(peers.callbacks) == 1

        # The dial ends: the stream is judged again, relayed, and its held bytes follow.
        far = Connection(odd_ids=False, accept_streams=True)
        peers.up = PeerLink(QuietWs(), rig.tower, peers, "tower-b", "wss://192.0.2.2:4647")
        peers.callbacks.pop()()
        events = far.receive_data(peers.up.conn.data_to_send())
        opened = events[0]
        assert isinstance(opened, StreamOpened)
        route, request = Route.from_peer(opened.request)
        assert (route.site, route.who, request.args, request.port, request.protocol) == (
            REMOTE,
            who,
            {"x": 1},
            80,
            "tcp",
        )
        got = b"".join(bytes(e.data) for e in events if isinstance(e, DataReceived))
        assert got == early and isinstance(events[-1], EndOfStream)
        assert not session.waiting and sid in session.relays

    in_loop(body)


def test_a_stream_that_cannot_be_relayed_is_refused_and_the_claims_read_again(tmp_path: Path) -> None:
    def body() -> None:
        rig = Rig(tmp_path)
        presence = FakePresence()
        rig.hub.presence = presence  # type: ignore[assignment]
        session = ClientLink(
            QuietWs(),
            rig.tower,
            Route("connect", REMOTE, APP, INST, "tcp", 80, who=f"admin:{hash_token(rig.admin)[:8]}"),
        )
        rig.hub.open_session(session)
        supctl = Connection(odd_ids=True, accept_streams=False)
        supctl.open_stream(OpenRequest(verb="connect"))
        for event in session.conn.receive_data(supctl.data_to_send()):
            session.handle_event(event)
        resets = [e for e in supctl.receive_data(session.conn.data_to_send()) if isinstance(e, StreamReset)]
        assert [(e.code, e.text) for e in resets] == [
            (
                ErrorCode.LINK_LOST,
                f"site {REMOTE} is connected to replica tower-b, which this replica cannot reach:"
                " this replica has no [cluster] advertise, so it relays to no other",
            )
        ]
        assert presence.suspected == [REMOTE]

    in_loop(body)


def test_a_draining_replica_keeps_a_moving_sites_link_until_the_others_know(tmp_path: Path) -> None:
    def body() -> None:
        rig = Rig(tmp_path)
        presence = FakePresence()
        rig.hub.presence = presence  # type: ignore[assignment]
        rig.hub.move_sites = True
        rig.site.goaway_ok = True
        deadline = rig.hub.begin_drain(rig.clock.now, 30)
        enforcer = Connection(odd_ids=False, accept_streams=True, accept_goaway=True)
        assert [type(e).__name__ for e in enforcer.receive_data(rig.site.conn.data_to_send())] == [
            "GoawayReceived"
        ]
        assert not rig.hub.drain_step(rig.clock.now, deadline) and closed(rig.site) is None
        # Another replica holds the site now; the others learn it within a heartbeat.
        presence.remote[SITE] = presence.remote[REMOTE]
        assert not rig.hub.drain_step(rig.clock.now, deadline)
        rig.clock.now += MOVE_GRACE - 0.1
        assert not rig.hub.drain_step(rig.clock.now, deadline) and closed(rig.site) is None
        rig.clock.now += 0.1
        assert rig.hub.drain_step(rig.clock.now, deadline)
        assert closed(rig.site) == (ErrorCode.GOING_AWAY, DRAIN_REASON)

    in_loop(body)


def test_an_enforcer_that_does_not_move_is_let_go_after_move_wait(tmp_path: Path) -> None:
    def body() -> None:
        rig = Rig(tmp_path)
        rig.hub.presence = FakePresence()  # type: ignore[assignment]
        rig.hub.move_sites = True
        rig.site.goaway_ok = True
        deadline = rig.hub.begin_drain(rig.clock.now, 30)
        rig.clock.now += MOVE_WAIT - 0.1
        assert not rig.hub.drain_step(rig.clock.now, deadline) and closed(rig.site) is None
        rig.clock.now += 0.1
        assert rig.hub.drain_step(rig.clock.now, deadline)

    in_loop(body)
