"""``connect udp`` on the client, in memory: the flow table and the relay driven by a fake
clock (no sleeps), fake streams that record what the relay did, and the command line."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pytest
from supctl_udp.flows import Flow, FlowTable, Throttle, remote_counts
from supctl_udp.relay import CLOSE_WAIT, UdpRelay

from supctl.errors import StreamError
from supctl.protocol import ErrorCode
from supctl.protocol.datagrams import DatagramDecoder, encode_datagram


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_flow_table_expires_idle_flows_and_bounds_their_number() -> None:
    clock = Clock()
    table = FlowTable(idle=60, clock=clock, limit=2)
    a = table.add(("127.0.0.1", 1))
    b = table.add(("127.0.0.1", 2))
    assert a is not None and b is not None and (a.number, b.number) == (1, 2)
    assert table.add(("127.0.0.1", 3)) is None and table.refused == 1
    clock.now += 30
    table.touch(b)  # a datagram either way restarts b's idle time
    assert table.next_expiry() == a.last + 60
    clock.now += 29.9
    assert table.expired() == []
    clock.now += 0.1
    assert table.expired() == [a] and table.get(a.peer) is None
    c = table.add(("127.0.0.1", 1))  # the same peer again: a new flow
    assert c is not None and c.number == 3
    clock.now += 30
    assert table.expired() == [b]
    assert len(table) == 1


def test_throttle_says_one_line_per_period_with_the_count_since() -> None:
    clock = Clock()
    throttle = Throttle(10, clock)
    assert throttle.due(1) == 1
    assert throttle.due(500) is None
    clock.now += 10
    assert throttle.due(700) == 699


@pytest.mark.parametrize(
    "payload, expected",
    [
        (
            {"udp": {"datagrams-up": 3, "dropped-down": 7, "refused": 1}},
            {"datagrams-up": 3, "dropped-down": 7},
        ),
        ({"udp": {"dropped-up": True, "dropped-down": -1, "datagrams-down": "9"}}, {}),
        ({"udp": [1, 2]}, {}),
        ({}, {}),
    ],
)
def test_remote_counts_take_only_sane_numbers(payload: dict[str, Any], expected: dict[str, int]) -> None:
    assert remote_counts(payload) == expected


class FakeChannel:
    """What the relay uses of a :class:`~supctl.link.Channel`, recording it."""

    def __init__(self, stream_id: int, credit: int) -> None:
        self.id = stream_id
        self.credit = credit
        self.accepted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.sent = bytearray()
        self.eof_sent = False
        self.reset_code: int | None = None
        self.receiver: Any = None
        self.controls: list[dict[str, object]] = []
        self.consumed = 0

    def attach(self, receiver: Any) -> None:
        self.receiver = receiver

    def can_write(self, size: int) -> bool:
        return self.reset_code is None and not self.eof_sent and self.credit >= size

    def send_nowait(self, data: bytes) -> int:
        self.credit -= len(data)
        self.sent += data
        return len(data)

    def consume(self, size: int) -> None:
        self.consumed += size

    def write_eof(self) -> None:
        self.eof_sent = True

    def reset(self, code: int, text: str = "") -> None:
        self.reset_code = code

    async def read_control(self) -> dict[str, object]:
        if self.controls:
            return self.controls.pop(0)
        raise StreamError("no control")


class FakeStreams:
    def __init__(self, credit: int = 64 * 1024) -> None:
        self.credit = credit
        self.opened: list[FakeChannel] = []
        self.down = False

    def open_now(self) -> FakeChannel | None:
        if self.down:
            return None
        channel = FakeChannel(2 * len(self.opened) + 1, self.credit)
        self.opened.append(channel)
        return channel

    async def open(self) -> FakeChannel:
        raise AssertionError("a datagram never waits for the session")


class Events:
    def __init__(self) -> None:
        self.lines: list[tuple[Any, ...]] = []

    def opened(self, number: int, peer: str, meter: Any) -> None:
        self.lines.append(("opened", number, peer))

    def closed(
        self,
        number: int,
        sent: int,
        received: int,
        seconds: float,
        error: str | None,
        counts: Mapping[str, int] | None = None,
    ) -> None:
        self.lines.append(("closed", number, sent, received, seconds, error, dict(counts or {})))

    def warning(self, text: str) -> None:
        self.lines.append(("warning", text))


class FakeTransport:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, tuple[str, int]]] = []
        self.buffered = 0

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        self.sent.append((data, addr))


@dataclass
class Rig:
    relay: UdpRelay
    streams: FakeStreams
    events: Events
    transport: FakeTransport
    clock: Clock


def relay_rig(limit: int = 256, credit: int = 64 * 1024) -> Rig:
    clock, streams, events, transport = Clock(), FakeStreams(credit), Events(), FakeTransport()
    relay = UdpRelay(streams, events, idle=60, limit=limit, clock=clock)  # type: ignore[arg-type]
    relay.transport = transport  # type: ignore[assignment]
    return Rig(relay, streams, events, transport, clock)


async def settle(relay: UdpRelay) -> None:
    if relay.tasks:
        await asyncio.wait(relay.tasks)


def test_a_flow_per_peer_records_up_replies_down_and_idle_end() -> None:
    async def main() -> None:
        rig = relay_rig()
        rig.relay.datagram_received(b"query-a", ("127.0.0.1", 5001))
        rig.relay.datagram_received(b"", ("127.0.0.1", 5001))  # an empty datagram is a datagram
        rig.relay.datagram_received(b"query-b", ("127.0.0.1", 5002))
        assert rig.streams.opened[0].sent == b""  # until the end of the loop turn: one frame
        rig.relay.flush()
        a, b = rig.streams.opened
        assert DatagramDecoder().feed(bytes(a.sent)) == [b"query-a", b""]
        assert DatagramDecoder().feed(bytes(b.sent)) == [b"query-b"]
        # Replies, cut anywhere, go back whole to their own peer; their credit at once.
        record = encode_datagram(b"answer-a") + encode_datagram(b"x" * 3)
        a.receiver.channel_data(record[:5])
        a.receiver.channel_data(memoryview(record[5:]))
        assert rig.transport.sent == [(b"answer-a", ("127.0.0.1", 5001)), (b"xxx", ("127.0.0.1", 5001))]
        assert a.consumed == len(record)
        # b keeps talking; a goes quiet: after 60 s a ends (our EOF), b does not.
        rig.clock.now += 59
        rig.relay.datagram_received(b"more-b", ("127.0.0.1", 5002))
        rig.clock.now += 1
        rig.relay.tick()
        assert a.eof_sent and not b.eof_sent
        # The site answers with its counters and EOF: the flow is reported.
        a.controls.append({"udp": {"datagrams-up": 2, "dropped-up": 1, "dropped-down": 4}})
        a.receiver.channel_eof()
        await settle(rig.relay)
        assert rig.events.lines[:2] == [("opened", 1, "127.0.0.1:5001"), ("opened", 2, "127.0.0.1:5002")]
        counts = {"datagrams-up": 2, "datagrams-down": 2, "dropped-up": 1, "dropped-down": 4}
        assert rig.events.lines[2] == ("closed", 1, 7, 11, 60.0, None, counts)
        # The same peer again: a new flow, a new stream.
        rig.relay.datagram_received(b"again", ("127.0.0.1", 5001))
        assert len(rig.streams.opened) == 3 and rig.events.lines[-1] == ("opened", 3, "127.0.0.1:5001")

    asyncio.run(main())


def test_beyond_the_credit_datagrams_are_dropped_and_counted_never_queued() -> None:
    async def main() -> None:
        rig = relay_rig(credit=3 * 1402)
        for _ in range(10):
            rig.relay.datagram_received(b"f" * 1400, ("127.0.0.1", 6000))
        rig.relay.flush()
        (channel,) = rig.streams.opened
        assert len(channel.sent) == 3 * 1402  # three whole records, never a piece of a fourth
        flow = rig.relay.table.get(("127.0.0.1", 6000))
        assert flow is not None and (flow.datagrams_up, flow.dropped_up) == (3, 7)
        # A peer that does not read: replies beyond the socket's buffer are dropped.
        rig.transport.buffered = 10 * 1024 * 1024
        channel.receiver.channel_data(encode_datagram(b"r"))
        assert flow.dropped_down == 1 and rig.transport.sent == []

    asyncio.run(main())


def test_the_flow_limit_drops_new_peers_with_one_line_per_period() -> None:
    async def main() -> None:
        rig = relay_rig(limit=2)
        for port in range(7000, 7100):
            rig.relay.datagram_received(b"q", ("127.0.0.1", port))
        assert len(rig.streams.opened) == 2 and rig.relay.table.refused == 98
        warnings = [line for line in rig.events.lines if line[0] == "warning"]
        assert warnings == [("warning", "2 flows are open: 1 datagram(s) from new peers dropped (1 in all)")]
        rig.clock.now += 10
        rig.relay.datagram_received(b"q", ("127.0.0.1", 8000))
        assert rig.events.lines[-1] == (
            "warning",
            "2 flows are open: 98 datagram(s) from new peers dropped (99 in all)",
        )
        # The known peers still get through.
        rig.relay.datagram_received(b"q", ("127.0.0.1", 7000))
        rig.relay.flush()
        assert rig.streams.opened[0].sent == encode_datagram(b"q") * 2

    asyncio.run(main())


def test_no_session_drops_and_a_silent_site_is_reset_after_the_close_wait() -> None:
    async def main() -> None:
        rig = relay_rig()
        rig.streams.down = True
        rig.relay.datagram_received(b"q", ("127.0.0.1", 9000))
        assert rig.relay.no_session == 1 and len(rig.relay.table) == 0
        assert rig.events.lines == [
            ("warning", "no session with the tower: 1 datagram(s) dropped (1 in all)")
        ]
        rig.streams.down = False
        rig.relay.datagram_received(b"q", ("127.0.0.1", 9000))
        (channel,) = rig.streams.opened
        rig.clock.now += 60
        rig.relay.tick()
        assert channel.eof_sent and channel.reset_code is None
        rig.clock.now += CLOSE_WAIT
        rig.relay.tick()  # no answer from the site: reset, reported as closed
        assert channel.reset_code is not None
        await settle(rig.relay)
        assert rig.events.lines[-1][:2] == ("closed", 1) and rig.events.lines[-1][5] is None

    asyncio.run(main())


def test_a_failed_stream_is_reported_with_its_error() -> None:
    async def main() -> None:
        rig = relay_rig()
        rig.relay.datagram_received(b"q", ("127.0.0.1", 9001))
        rig.streams.opened[0].receiver.channel_failed(StreamError("refused by policy", code=3))
        await settle(rig.relay)
        assert rig.events.lines[-1][5] == "refused by policy"
        assert len(rig.relay.table) == 0

    asyncio.run(main())


def test_flow_counts_add_the_sites_drops() -> None:
    flow = Flow(("::1", 5), 1, 0.0, 0.0, datagrams_up=3, dropped_up=1, dropped_down=2)
    flow.remote = {"dropped-up": 10, "dropped-down": 20, "datagrams-up": 99}
    assert flow.counts() == {"datagrams-up": 3, "datagrams-down": 0, "dropped-up": 11, "dropped-down": 22}


def test_a_refused_flow_drops_its_peer_until_idle_then_tries_again() -> None:
    async def main() -> None:
        rig = relay_rig()
        peer = ("127.0.0.1", 9002)
        rig.relay.datagram_received(b"q", peer)
        refusal = StreamError("more than 100 concurrent streams", code=ErrorCode.LIMIT)
        rig.streams.opened[0].receiver.channel_failed(refusal)
        await settle(rig.relay)
        assert rig.events.lines[-1][5] == "more than 100 concurrent streams"
        for _ in range(50):  # a peer that keeps sending: no new stream, no new line
            rig.clock.now += 1
            rig.relay.datagram_received(b"q", peer)
        assert len(rig.streams.opened) == 1 and len(rig.events.lines) == 2
        flow = rig.relay.table.get(peer)
        assert flow is not None and flow.dropped_up == 50
        rig.clock.now += 10
        rig.relay.tick()  # idle since the refusal: gone, silently
        rig.relay.datagram_received(b"q", peer)
        assert len(rig.streams.opened) == 2 and rig.events.lines[-1] == ("opened", 2, "127.0.0.1:9002")

    asyncio.run(main())


def test_a_lost_session_does_not_hold_the_peer_back() -> None:
    async def main() -> None:
        rig = relay_rig()
        peer = ("127.0.0.1", 9003)
        rig.relay.datagram_received(b"q", peer)
        rig.streams.opened[0].receiver.channel_failed(StreamError("link lost", code=ErrorCode.LINK_LOST))
        rig.relay.datagram_received(b"q", peer)
        assert len(rig.streams.opened) == 2

    asyncio.run(main())
