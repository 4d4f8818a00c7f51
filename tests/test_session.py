"""supctl's session with the tower (supctl.client.session): what is lost and re-opened,
what is final, and how local connections wait meanwhile.

In memory: the links are stand-ins whose end the test decides (a close code or none),
the clock is fake and the sleeps advance it, so no test waits for real time except the
bounded wait of :meth:`TowerSession.open`, given a few milliseconds.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, cast

import pytest

from supctl.client.api import BindAddress
from supctl.client.session import RETRY_CAP, STILL_EVERY, TowerSession, final_close
from supctl.errors import DeniedError, NotFoundError, StreamError, SupctlError, UnavailableError
from supctl.link import Link
from supctl.protocol import ErrorCode, OpenRequest
from supctl.protocol.frames import CLOSE_CODE_BASE


@dataclass
class FakeConn:
    closed: object = None


@dataclass(eq=False)  # hashable by identity, as a Link
class FakeLink:
    """What TowerSession uses of a Link: its task, how it ended, and opening a stream."""

    task: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    lost_code: int | None = None
    lost_reason: str = ""
    conn: FakeConn = field(default_factory=FakeConn)
    opened: list[OpenRequest] = field(default_factory=list)
    goaway: asyncio.Event = field(default_factory=asyncio.Event)
    going_away: str | None = None
    channels: dict[int, object] = field(default_factory=dict)
    emptied: asyncio.Event = field(default_factory=asyncio.Event)
    closed_by_us: str | None = None

    async def aclose(self, code: ErrorCode, reason: str) -> None:
        self.closed_by_us = reason
        self.end(CLOSE_CODE_BASE + code, reason)

    def end(self, code: int | None, reason: str = "") -> None:
        self.lost_code, self.lost_reason = code, reason
        self.task.set_result(None)

    def open_channel_now(self, request: OpenRequest) -> Any:
        self.opened.append(request)
        return ("channel", id(self), len(self.opened))


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)

    def lost(self, reason: str) -> None:
        self.lines.append(f"lost: {reason}")

    def still_lost(self, seconds: float, reason: str) -> None:
        self.lines.append(f"still {seconds:.0f}: {reason}")

    def back(self, seconds: float) -> None:
        self.lines.append(f"back {seconds:.2f}")

    def moving(self, reason: str) -> None:
        self.lines.append(f"moving: {reason}")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        self.slept.append(delay)
        self.now += delay
        await asyncio.sleep(0)


class Tower:
    """Answers each new session with the next outcome: a link, or an error to raise."""

    def __init__(self, *outcomes: FakeLink | SupctlError, clock: Clock, cost: float = 0.1) -> None:
        self.outcomes = list(outcomes)
        self.clock = clock
        self.cost = cost  # fake seconds each attempt takes
        self.attempts = 0

    async def connect(self) -> Link:
        self.attempts += 1
        self.clock.now += self.cost
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, SupctlError):
            raise outcome
        return cast(Link, outcome)


def session(
    tower: Tower, report: Report, clock: Clock, *, wait: float = 10.0, jitter: float = 1.0
) -> TowerSession:
    jittered: Callable[[], float] = lambda: jitter  # noqa: E731 - a constant draw
    return TowerSession(
        tower.connect,
        OpenRequest(verb="connect"),
        report,
        clock=clock,
        sleep=clock.sleep,
        wait=wait,
        jitter=jittered,
    )


def in_loop(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test in its own event loop (the suite has no asyncio plugin)."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))

    return run


def same(a: object, b: object) -> bool:
    """``a is b`` for a stand-in and the type it stands in for (mypy sees no overlap)."""
    return a is b


def same_value(a: object, b: object) -> bool:
    return a == b


async def settle(done: Callable[[], bool] = lambda: False, turns: int = 1000) -> None:
    """Let the loop run (no real time passes: the sleeps are fake) until ``done()``."""
    for _ in range(turns):
        if done():
            return
        await asyncio.sleep(0)


@in_loop
async def test_a_dropped_link_is_reopened_and_streams_wait_for_it() -> None:
    clock, report = Clock(), Report()
    first, second = FakeLink(), FakeLink()
    refused = UnavailableError("cannot reach the tower at wss://t: connection refused")
    tower = Tower(first, refused, refused, second, clock=clock)
    s = session(tower, report, clock)
    assert same(await s.start(), first)
    assert s.open_now() is not None and first.opened
    keeper = asyncio.ensure_future(s.keep())
    first.end(None, "connection dropped")  # no close frame: lost, not decided
    await settle()
    assert report.lines[0] == "lost: connection dropped"
    assert same(s.link, second) and not keeper.done()
    assert report.lines[1:] == [f"back {sum(clock.slept) + 3 * tower.cost:.2f}"]
    assert s.reconnects == 1 and tower.attempts == 4
    # Delays double from RETRY_START (jitter 1.0: the ceiling itself), capped.
    assert clock.slept == [0.25, 0.5, 1.0]
    assert s.open_now() is not None and second.opened
    keeper.cancel()


@in_loop
async def test_the_delays_are_capped_and_the_user_hears_once_a_minute() -> None:
    clock, report = Clock(), Report()
    first, last = FakeLink(), FakeLink()
    refused = UnavailableError("the tower answered HTTP 503: site is not connected")
    tower = Tower(first, *[refused] * 60, last, clock=clock)
    s = session(tower, report, clock)
    await s.start()
    keeper = asyncio.ensure_future(s.keep())
    first.end(1001, "going away")  # the tower shuts down: try again
    await settle(lambda: same(s.link, last))
    assert same(s.link, last)
    assert max(clock.slept) == RETRY_CAP
    still = [line for line in report.lines if line.startswith("still")]
    # 60 failures of up to 3.1 s: about three minutes, said twice (at >= 60 s intervals).
    seconds = [float(line.split()[1].rstrip(":")) for line in still]
    assert len(seconds) == 2 and seconds[0] >= STILL_EVERY and seconds[1] - seconds[0] >= STILL_EVERY, (
        report.lines
    )
    assert all(line.endswith("site is not connected") for line in still)
    keeper.cancel()


@pytest.mark.parametrize(
    ("code", "reason", "error", "text"),
    [
        (
            CLOSE_CODE_BASE + ErrorCode.DENIED,
            "token revoked",
            DeniedError,
            "the tower closed the session: token revoked",
        ),
        (
            CLOSE_CODE_BASE + ErrorCode.LIMIT,
            "session exceeded 3 s",
            UnavailableError,
            "lost the connection to the tower: session exceeded 3 s",
        ),
        (
            CLOSE_CODE_BASE + ErrorCode.PROTOCOL,
            "bad frame",
            UnavailableError,
            "lost the connection to the tower: bad frame",
        ),
        (1000, "", UnavailableError, "lost the connection to the tower: closed"),
    ],
)
@in_loop
async def test_a_deliberate_close_is_final(
    code: int, reason: str, error: type[SupctlError], text: str
) -> None:
    """Reconnecting after a revocation or a session limit would undo them."""
    clock, report = Clock(), Report()
    first = FakeLink()
    tower = Tower(first, FakeLink(), clock=clock)
    s = session(tower, report, clock)
    await s.start()
    keeper = asyncio.ensure_future(s.keep())
    first.end(code, reason)
    with pytest.raises(error) as raised:
        await keeper
    assert str(raised.value) == text
    assert tower.attempts == 1 and report.lines == []
    with pytest.raises(StreamError):
        s.open_now()


@pytest.mark.parametrize(
    "refusal",
    [DeniedError("token expired"), NotFoundError("unknown site 'x'")],
)
@in_loop
async def test_a_refusal_a_retry_cannot_change_ends_the_forward(refusal: SupctlError) -> None:
    clock, report = Clock(), Report()
    first = FakeLink()
    tower = Tower(first, UnavailableError("connection refused"), refusal, clock=clock)
    s = session(tower, report, clock)
    await s.start()
    keeper = asyncio.ensure_future(s.keep())
    waiter = asyncio.ensure_future(s.open())
    first.end(None)
    with pytest.raises(type(refusal)):
        await keeper
    assert tower.attempts == 3
    # A local connection that was waiting is released with the reason at once.
    with pytest.raises(StreamError, match=str(refusal)):
        await waiter


@in_loop
async def test_a_waiting_connection_gets_the_new_link() -> None:
    clock, report = Clock(), Report()
    first, second = FakeLink(), FakeLink()
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def connect() -> Link:
        if not gate.done() and tower.attempts:
            await gate
        return await tower.connect()

    tower = Tower(first, second, clock=clock)
    s = TowerSession(connect, OpenRequest(verb="connect"), report, clock=clock, sleep=clock.sleep, wait=10)
    await s.start()
    keeper = asyncio.ensure_future(s.keep())
    first.end(None)
    await settle()
    assert s.open_now() is None  # down: the listener defers the connection
    waiter = asyncio.ensure_future(s.open())
    await settle()
    assert not waiter.done()
    gate.set_result(None)
    assert same_value(await waiter, ("channel", id(second), 1))
    keeper.cancel()


@in_loop
async def test_a_connection_waits_no_longer_than_the_bound() -> None:
    report = Report()
    first = FakeLink()
    never: asyncio.Future[Link] = asyncio.get_running_loop().create_future()
    calls = 0

    async def connect() -> Link:
        nonlocal calls
        calls += 1
        return cast(Link, first) if calls == 1 else await never

    s = TowerSession(connect, OpenRequest(verb="connect"), report, wait=0.05)
    await s.start()
    keeper = asyncio.ensure_future(s.keep())
    first.end(None)
    with pytest.raises(StreamError, match=r"no session with the tower for 0\.05 s \(still reconnecting\)"):
        await s.open()
    keeper.cancel()


def test_final_close_reads_the_close_code() -> None:
    def ended(code: int | None) -> Link:
        return cast(Link, type("L", (), {"lost_code": code, "lost_reason": "r"})())

    for lost in (None, 1001, 1011, 1012, 1013):
        assert final_close(ended(lost)) is None
    for kept in (1000, 1008, CLOSE_CODE_BASE + ErrorCode.LIMIT, CLOSE_CODE_BASE + ErrorCode.DENIED):
        assert isinstance(final_close(ended(kept)), SupctlError)


@in_loop
async def test_a_tower_that_drops_each_new_session_at_once_is_not_hammered() -> None:
    """A stable session starts the delays over; one lost at once keeps them doubling."""
    clock, report = Clock(), Report()
    links = [FakeLink() for _ in range(4)]
    tower = Tower(*links, clock=clock, cost=0.0)
    s = session(tower, report, clock)
    await s.start()
    keeper = asyncio.ensure_future(s.keep())
    clock.now += 60  # a long, stable session
    for link in links[:3]:
        link.end(1012, "service restart")
        await settle(lambda link=link: not same(s.link, link) and s.link is not None)  # type: ignore[misc]
    assert clock.slept == [0.25, 0.5, 1.0]
    keeper.cancel()


@in_loop
async def test_goaway_moves_new_streams_to_a_new_session_and_the_old_one_finishes() -> None:
    clock, report = Clock(), Report()
    first, second = FakeLink(), FakeLink()
    tower = Tower(first, second, clock=clock)
    s = session(tower, report, clock)
    await s.start()
    keeper = asyncio.ensure_future(s.keep())
    first.going_away = "the control tower is shutting down"
    first.channels[1] = "a stream in flight"
    first.goaway.set()
    await settle(lambda: same(s.link, second))
    assert report.lines[0] == "moving: the control tower is shutting down"
    assert report.lines[1].startswith("back ")
    assert not any(line.startswith("lost") for line in report.lines)
    # New streams go to the new session; the old one is kept for the streams it has...
    assert same_value(s.open_now(), ("channel", id(second), 1))
    assert [same(link, first) for link in s.draining] == [True]
    # ...and closed by us once the last of them ended.
    first.emptied.set()
    first.channels.clear()
    await settle(lambda: not s.draining)
    assert first.closed_by_us == "moved to a new session"
    assert not s.draining and not keeper.done()  # its end is not the session's
    keeper.cancel()


class NoSession:
    """Streams while the session is being re-opened, for ever."""

    def __init__(self) -> None:
        self.waiting = 0

    def open_now(self) -> None:
        return None

    async def open(self) -> Any:
        self.waiting += 1
        await asyncio.get_running_loop().create_future()  # never comes


@dataclass
class Lines:
    closed: dict[int, str | None] = field(default_factory=dict)

    def opened(self, number: int, peer: str, meter: object = None) -> None:
        pass

    def closed_(self, number: int, error: str | None) -> None:
        self.closed[number] = error


def test_at_most_max_waiting_local_connections_wait_for_the_session(monkeypatch: pytest.MonkeyPatch) -> None:
    """A local flood while the tower is away holds at most MAX_WAITING sockets and tasks;
    the rest are reset at once, each with a line."""
    from supctl_connect import listener as listener_module

    monkeypatch.setattr(listener_module, "MAX_WAITING", 3)

    async def body() -> None:
        streams, lines = NoSession(), Lines()
        reporter = type(
            "R", (), {"opened": lines.opened, "closed": lambda _s, n, *a: lines.closed_(n, a[-1])}
        )()
        ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        serving = asyncio.ensure_future(
            listener_module.TcpListener().serve(
                streams, BindAddress("127.0.0.1", 0), lambda a: ready.set_result(a.port), reporter
            )
        )
        port = await ready
        clients = [await asyncio.open_connection("127.0.0.1", port) for _ in range(5)]
        await settle(lambda: streams.waiting == 3 and len(lines.closed) == 2)
        assert lines.closed == {
            4: "3 connections already wait for the tower",
            5: "3 connections already wait for the tower",
        }
        for reader, _ in clients[3:]:
            with pytest.raises(ConnectionResetError):
                await reader.read()
        serving.cancel()  # supctl stops: the waiting ones are reset too, without a failure line
        await asyncio.gather(serving, return_exceptions=True)
        for reader, writer in clients[:3]:
            with pytest.raises(ConnectionResetError):
                await reader.read()
            writer.close()
        assert sorted(lines.closed) == [1, 2, 3, 4, 5] and lines.closed[1] is None

    asyncio.run(body())
