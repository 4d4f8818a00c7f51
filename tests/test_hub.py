"""The tower's live state (:mod:`supctl.tower.hub`) on a fake clock: the sweep's timers
(a site that does not accept, an idle stream, a session past its duration), the
authority re-check that ends a session whose token expired unless it was renewed, and
the per-user and per-session counts, acquired and released in the hub only.

Real links, relays and protocol connections, driven in process by their frames: no
socket, no sleep.  Time is whatever the test says it is.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from test_site_identity import QuietWs
from towerkit import Kit

from supctl.protocol import (
    Connection,
    DataReceived,
    ErrorCode,
    OpenRequest,
    StreamOpened,
    StreamReset,
)
from supctl.tower.hub import DRAIN_REASON, Hub
from supctl.tower.limits import Limits
from supctl.tower.links import ClientLink, SiteLink
from supctl.tower.route import Route, SiteClaim
from supctl.tower.siteinfo import InstanceInfo, SiteInfo
from supctl.tower.store import hash_token

SITE, APP, INST, SHELL = "site1", "app", "inst", "shell"
T = TypeVar("T")


class Clock:
    """Monotonic seconds that move only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def in_loop(body: Callable[[], T]) -> T:
    """Links need a running loop (they schedule their writers); the test body is synchronous."""

    async def main() -> T:
        return body()

    return asyncio.run(main())


#: Every Rig of the running test, closed after it.
_RIGS: list[Rig] = []


@pytest.fixture(autouse=True)
def _close_rigs() -> Iterator[None]:
    """Close each test's stores: an aiosqlite connection left open outlives its event loop
    and fails in its thread when it is collected."""
    yield
    while _RIGS:
        _RIGS.pop().kit.close()


class Rig:
    """A tower on a fake clock with one connected site, its enforcer's end, and sessions."""

    def __init__(self, tmp_path: Path, **limits: float) -> None:
        self.clock = Clock()
        # A real store (SQLite) and the tower's copy of it; the tower's clock is the fake one.
        self.kit = Kit(tmp_path, Limits(**limits), clock=self.clock)  # type: ignore[arg-type]
        _RIGS.append(self)
        self.token = token = self.kit.add_site(SITE)
        self.tower = self.kit.tower
        self.hub: Hub = self.tower.hub
        self.site = SiteLink(QuietWs(), self.tower, SiteClaim(SITE, hash_token(token)), "192.0.2.1:1")
        self.site.info = SiteInfo(
            applications={APP: {INST: InstanceInfo(INST, APP, containers={SHELL: {}})}}, handlers=["exec"]
        )
        self.hub.site_connected(self.site)
        self.enforcer = Connection(odd_ids=False, accept_streams=True)
        self.enforcer_streams: list[int] = []
        self.admin = self.kit.add_admin_token()

    def session(self, user: str = "admin") -> tuple[ClientLink, Connection]:
        who = f"admin:{hash_token(self.admin)[:8]}" if user == "admin" else f"{user}:0123abcd"
        session = ClientLink(QuietWs(), self.tower, Route("exec", SITE, APP, INST, container=SHELL, who=who))
        self.hub.open_session(session)
        return session, Connection(odd_ids=True, accept_streams=False)

    def open(self, session: ClientLink, supctl: Connection) -> int:
        """supctl opens an exec stream; the tower relays it to the site (or refuses it)."""
        stream_id = supctl.open_stream(OpenRequest(verb="exec", args={"command": "cat"}))
        for event in session.conn.receive_data(supctl.data_to_send()):
            assert isinstance(event, StreamOpened)
            session.handle_event(event)
        return stream_id

    def accept_all(self) -> None:
        """The enforcer accepts every stream the tower opened on its link."""
        for event in self.enforcer.receive_data(self.site.conn.data_to_send()):
            if isinstance(event, StreamOpened):
                self.enforcer.accept_stream(event.stream_id)
                self.enforcer_streams.append(event.stream_id)
        for event in self.site.conn.receive_data(self.enforcer.data_to_send()):
            self.site.handle_event(event)

    def site_sends(self, data: bytes) -> None:
        """The enforcer sends DATA on each of its streams: activity, from the site."""
        for stream_id in self.enforcer_streams:
            self.enforcer.send_data(stream_id, data)
        for event in self.site.conn.receive_data(self.enforcer.data_to_send()):
            assert isinstance(event, DataReceived), event
            self.site.handle_event(event)

    def sweep(self) -> None:
        self.hub.sweep(self.clock.now, self.tower.target_refusals)


def resets(session: ClientLink, supctl: Connection) -> list[tuple[ErrorCode, str]]:
    data = session.conn.data_to_send()
    events = supctl.receive_data(data) if data else []  # an empty message is a protocol error
    return [(e.code, e.text) for e in events if isinstance(e, StreamReset)]


def closed(link: ClientLink | SiteLink) -> tuple[ErrorCode, str] | None:
    return None if link.conn.closed is None else (link.conn.closed.code, link.conn.closed.reason)


def test_a_site_that_does_not_accept_in_time(tmp_path: Path) -> None:
    def body() -> None:
        rig = Rig(tmp_path, stream_open_timeout=30)
        session, supctl = rig.session()
        rig.open(session, supctl)
        rig.clock.now += 29.9
        rig.sweep()
        assert len(session.relays) == 1 and resets(session, supctl) == []
        rig.clock.now += 0.1
        rig.sweep()
        assert session.relays == {} and rig.site.relays == {}
        assert resets(session, supctl) == [(ErrorCode.TIMEOUT, "the site did not answer within 30 s")]
        assert closed(session) is None  # the session lives on

    in_loop(body)


def test_an_idle_stream_is_reset_and_activity_keeps_one_alive(tmp_path: Path) -> None:
    def body() -> None:
        rig = Rig(tmp_path, stream_idle_timeout=60)
        session, supctl = rig.session()
        rig.open(session, supctl)
        rig.accept_all()
        for _ in range(5):  # talks every 50 s: never idle for 60
            rig.clock.now += 50
            rig.site_sends(b"tick")
            rig.sweep()
        assert len(session.relays) == 1
        rig.clock.now += 59.9
        rig.sweep()
        assert len(session.relays) == 1
        rig.clock.now += 0.1
        rig.sweep()
        assert session.relays == {}
        assert resets(session, supctl) == [(ErrorCode.TIMEOUT, "idle for 60 s")]

    in_loop(body)


def test_a_session_past_its_duration_is_closed(tmp_path: Path) -> None:
    def body() -> None:
        rig = Rig(tmp_path, session_duration=3600)
        session, supctl = rig.session()
        rig.open(session, supctl)
        rig.accept_all()
        rig.clock.now += 100
        later, _ = rig.session()  # opened later: its own hour
        rig.clock.now += 3499.9
        rig.sweep()
        assert closed(session) is None
        rig.clock.now += 0.1
        rig.sweep()
        assert closed(session) == (ErrorCode.LIMIT, "session exceeded 3600 s")
        assert closed(later) is None
        rig.clock.now += 100
        rig.sweep()
        assert closed(later) == (ErrorCode.LIMIT, "session exceeded 3600 s")

    in_loop(body)


def test_a_target_refused_alone_loses_its_streams_and_the_session_goes_on(tmp_path: Path) -> None:
    """A session of two forwards (443 and 80) after the policy lost port 80: the sweep resets
    the streams to 80 (DENIED, the policy's reason) and leaves those to 443 relaying; an OPEN
    to 80 is refused alone, one to 443 relayed; once no target is left the session ends."""

    def body() -> None:
        rig = Rig(tmp_path)
        assert rig.site.info is not None
        rig.site.info.handlers.append("tcp")
        who = "alice:0123abcd"
        to_80 = Route("connect", SITE, APP, INST, protocol="tcp", port=80, who=who)
        route = Route("connect", SITE, APP, INST, protocol="tcp", port=443, who=who, more=(to_80,))
        session = ClientLink(QuietWs(), rig.tower, route)
        rig.hub.open_session(session)
        supctl = Connection(odd_ids=True, accept_streams=False)
        why = "policy no longer allows connect to 127.0.0.1:80 in inst at site1 for user alice"
        verdicts: dict[int, str | None] = {443: None, 80: None}
        rig.tower.target_refusals = lambda route: tuple(verdicts[t.port] for t in route.targets)  # type: ignore[method-assign]

        def open_to(forward: int) -> int:
            stream_id = supctl.open_stream(OpenRequest(verb="connect", args={"forward": forward}))
            for event in session.conn.receive_data(supctl.data_to_send()):
                assert isinstance(event, StreamOpened)
                session.handle_event(event)
            return stream_id

        first, second = open_to(0), open_to(1)
        rig.accept_all()
        assert sorted(r.route.port for r in session.relays.values()) == [80, 443]
        session.conn.data_to_send()  # the ACCEPTs
        verdicts[80] = why
        rig.hub.sweep(rig.clock.now, rig.tower.target_refusals)
        assert resets(session, supctl) == [(ErrorCode.DENIED, why)]
        assert closed(session) is None
        assert [(r.client_id, r.route.port) for r in session.relays.values()] == [(first, 443)]
        assert second not in session.relays
        # Every OPEN is judged for its own target.
        open_to(1)
        assert resets(session, supctl) == [(ErrorCode.DENIED, why)] and closed(session) is None
        third = open_to(0)
        assert third in session.relays and closed(session) is None
        # No target left: the session ends, as a one-target session does.
        verdicts[443] = why.replace(":80 ", ":443 ")
        rig.hub.sweep(rig.clock.now, rig.tower.target_refusals)
        assert closed(session) == (ErrorCode.DENIED, verdicts[443])

    in_loop(body)


def test_expiry_ends_a_session_unless_its_token_was_renewed(tmp_path: Path) -> None:
    """The sweep re-judges every session at the time it is given: a token past its expiry
    ends its sessions, a renewal (a later expiry) keeps them."""

    def body() -> None:
        rig = Rig(tmp_path)
        clock = rig.clock
        expires = {"alice:0123abcd": clock.now + 6}

        def authority(route: Route) -> tuple[str | None]:
            return ("token expired" if expires[route.who] <= clock.now else None,)

        session, _ = rig.session("alice")
        clock.now += 4
        rig.hub.sweep(clock.now, authority)
        expires[session.route.who] = clock.now + 6  # renewed at 2/3 of its life
        clock.now += 4  # past the first expiry
        rig.hub.sweep(clock.now, authority)
        assert closed(session) is None
        clock.now += 2  # the renewed expiry
        rig.hub.sweep(clock.now, authority)
        assert closed(session) == (ErrorCode.DENIED, "token expired")
        # The tower's own authority: alice has no token at all here.
        other, _ = rig.session("alice")
        rig.sweep()
        assert closed(other) == (ErrorCode.DENIED, "token revoked")

    in_loop(body)


def test_sessions_per_user_are_counted_in_the_hub(tmp_path: Path) -> None:
    def body() -> None:
        rig = Rig(tmp_path, sessions_per_user=2)
        first, _ = rig.session("alice")
        assert rig.hub.session_refusal("alice") is None
        second, _ = rig.session("alice")
        assert rig.hub.session_refusal("alice") == "more than 2 sessions for user alice"
        assert rig.hub.session_refusal("bob") is None
        rig.hub.close_session(first)
        rig.hub.close_session(first)  # released once, however often it is told
        assert rig.hub.session_refusal("alice") is None and rig.hub.user_sessions == {"alice": 1}
        rig.hub.close_session(second)
        assert rig.hub.user_sessions == {} and rig.hub.sessions == set()

    in_loop(body)


def test_streams_are_acquired_and_released_in_the_hub(tmp_path: Path) -> None:
    def body() -> None:
        rig = Rig(tmp_path, streams_per_session=2, streams_per_user=3)
        one, supctl_one = rig.session()
        two, supctl_two = rig.session()
        for _ in range(2):
            rig.open(one, supctl_one)
        rig.open(one, supctl_one)  # a third in one session
        assert resets(one, supctl_one) == [
            (ErrorCode.LIMIT, "more than 2 concurrent streams in this session (streams-per-session)")
        ]
        rig.open(two, supctl_two)
        rig.open(two, supctl_two)  # the user's fourth
        assert resets(two, supctl_two) == [
            (ErrorCode.LIMIT, "more than 3 concurrent streams for user admin (streams-per-user)")
        ]
        assert rig.hub.user_streams == {"admin": 3}
        rig.clock.now += 30  # the default open timeout: the sweep ends them all
        rig.sweep()
        assert rig.hub.user_streams == {} and one.relays == two.relays == rig.site.relays == {}

    in_loop(body)


def test_a_rotated_site_token_is_evicted_by_the_sweep(tmp_path: Path) -> None:
    def body() -> None:
        rig = Rig(tmp_path)
        rig.hub.sweep_sites()
        assert rig.hub.site_link(SITE) is rig.site
        rig.kit.rotate_site(SITE)
        rig.hub.sweep_sites()
        assert closed(rig.site) == (ErrorCode.DENIED, "site token rotated")
        assert rig.hub.site_link(SITE) is None

    in_loop(body)


@pytest.mark.parametrize("rotated", [False, True])
def test_one_link_per_site(tmp_path: Path, rotated: bool) -> None:
    """A second link with the site's token is refused while the first one's is valid; once
    the first one's token was rotated, the link with the new token takes over."""

    def body() -> None:
        rig = Rig(tmp_path)
        token = rig.kit.rotate_site(SITE) if rotated else rig.token
        second = SiteLink(QuietWs(), rig.tower, SiteClaim(SITE, hash_token(token)), "192.0.2.2:2")
        second.info = SiteInfo()
        rig.hub.site_connected(second)
        if rotated:
            assert rig.hub.sites[SITE] is second and closed(second) is None
            assert closed(rig.site) == (ErrorCode.DENIED, "site token rotated")
        else:
            assert rig.hub.sites[SITE] is rig.site and closed(rig.site) is None
            assert closed(second) == (ErrorCode.DENIED, f"site {SITE} is already connected from 192.0.2.1:1")

    in_loop(body)


def test_a_drain_closes_idle_sessions_at_once_and_busy_ones_after_their_streams(tmp_path: Path) -> None:
    """SIGTERM: GOAWAY to the sessions that understand it (they close themselves once their
    streams ended); another session is closed when idle, a busy one once its streams ended,
    the site links last (sans-I/O, fake clock)."""

    def body() -> None:
        rig = Rig(tmp_path)
        moved, _ = rig.session()
        moved.goaway_ok = True
        moved_client = Connection(odd_ids=True, accept_streams=False, accept_goaway=True)
        idle, _ = rig.session()
        busy, busy_client = rig.session()
        stream = rig.open(busy, busy_client)
        rig.accept_all()
        deadline = rig.hub.begin_drain(rig.clock.now, 30)
        assert rig.hub.draining and deadline == rig.clock.now + 30
        events = moved_client.receive_data(moved.conn.data_to_send())
        assert [type(e).__name__ for e in events] == ["GoawayReceived"]
        assert events[0].payload == {"reason": DRAIN_REASON, "deadline": 30}  # type: ignore[union-attr]
        # No GOAWAY to a client that did not ask for it (it would take it for a protocol error).
        assert [type(e).__name__ for e in busy_client.receive_data(busy.conn.data_to_send())] == [
            "StreamAccepted"
        ]

        assert not rig.hub.drain_step(rig.clock.now, deadline)
        assert closed(idle) == (ErrorCode.GOING_AWAY, DRAIN_REASON)
        # The client that got GOAWAY closes its session itself: only it knows that none of
        # its OPENs is still on the way.
        assert closed(moved) is None and closed(busy) is None and closed(rig.site) is None

        busy_client.reset_stream(stream, ErrorCode.CANCEL, "done")  # its last stream ends
        for event in busy.conn.receive_data(busy_client.data_to_send()):
            busy.handle_event(event)
        rig.clock.now += 1
        assert not rig.hub.drain_step(rig.clock.now, deadline)
        assert closed(busy) == (ErrorCode.GOING_AWAY, DRAIN_REASON)
        assert closed(rig.site) is None
        rig.hub.close_session(moved)  # its client closed it (the handler's finally)
        assert rig.hub.drain_step(rig.clock.now, deadline)
        assert closed(rig.site) == (ErrorCode.GOING_AWAY, DRAIN_REASON)

    in_loop(body)


def test_a_drain_cuts_what_is_left_at_its_deadline(tmp_path: Path) -> None:
    def body() -> None:
        rig = Rig(tmp_path)
        busy, busy_client = rig.session()
        rig.open(busy, busy_client)
        rig.accept_all()
        deadline = rig.hub.begin_drain(rig.clock.now, 5)
        rig.clock.now += 4.9
        assert not rig.hub.drain_step(rig.clock.now, deadline)
        assert closed(busy) is None
        rig.clock.now += 0.1
        assert rig.hub.drain_step(rig.clock.now, deadline)
        assert closed(busy) == (ErrorCode.GOING_AWAY, f"{DRAIN_REASON}; 1 streams cut at the drain deadline")
        assert closed(rig.site) == (ErrorCode.GOING_AWAY, DRAIN_REASON)

    in_loop(body)
