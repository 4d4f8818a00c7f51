"""The site's ``udp`` handler (plugins/supctl_udp), driven in process with real UDP sockets
in a real network namespace: a "tower" Link joined to a real :class:`Agent` by an
in-memory WebSocket pair (as tests/test_exec_unit.py does for exec).

Also the pieces without root: ``args.idle`` parsing, the idle logic on a fake clock,
:meth:`Channel.can_write`, the audit's reading of the final counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import time
import tomllib
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest
from netlab import NetLab, call_in_netns
from supctl_udp.handler import CLOSE_GRACE, DEFAULT_IDLE, UdpFlow, UdpHandler, parse_idle
from test_exec_unit import LOOPS, MemoryWebSocket, TowerLink, run, until

from supctl.enforcer import agent as agent_module
from supctl.enforcer.agent import Agent
from supctl.enforcer.api import HandlerContext, Serves
from supctl.enforcer.inventory import parse_inventory
from supctl.enforcer.netns import NamespaceSockets
from supctl.errors import StreamError
from supctl.link import Channel, Link
from supctl.protocol import DEFAULT_WINDOW, Connection, ErrorCode, OpenRequest
from supctl.protocol.datagrams import DatagramDecoder, encode_datagram, record_size
from supctl.tower import audit

DEADLINE = 20.0


@pytest.fixture(params=sorted(LOOPS))
def loop_kind(request: pytest.FixtureRequest) -> str:
    """asyncio, and uvloop (the enforcer's loop) when installed."""
    if LOOPS[request.param] is None and request.param != "asyncio":
        pytest.skip("uvloop is not installed")
    return str(request.param)


class FakeClock:
    """Time that moves only when the test says; ``sleep`` wakes when it has moved enough."""

    def __init__(self) -> None:
        self.now = 1000.0
        self._moved = asyncio.Event()

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        end = self.now + seconds
        while self.now < end:
            self._moved.clear()
            await self._moved.wait()

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self._moved.set()


# --- args.idle, no root ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [({}, DEFAULT_IDLE), ({"idle": 1}, 1.0), ({"idle": 3600}, 3600.0), ({"idle": 2.5}, 2.5)],
)
def test_idle_arg(args: dict[str, Any], expected: float) -> None:
    assert parse_idle(args) == expected


@pytest.mark.parametrize("bad", [0, 0.5, 3601, -1, True, False, "60", None, float("nan"), float("inf"), [60]])
def test_bad_idle_arg_is_a_protocol_error(bad: object) -> None:
    with pytest.raises(StreamError) as info:
        parse_idle({"idle": bad})
    assert info.value.code == ErrorCode.PROTOCOL
    assert "args.idle must be a number of seconds from 1 to 3600" in str(info.value)


# --- the audit keeps only sane counts ------------------------------------------------------------


def test_audit_udp_fields_keep_only_non_negative_integers() -> None:
    good = {"udp": {"datagrams-up": 3, "datagrams-down": 2, "dropped-up": 0, "dropped-down": 7, "refused": 1}}
    assert audit.udp_fields(good) == {
        "datagrams-up": 3,
        "datagrams-down": 2,
        "dropped-up": 0,
        "dropped-down": 7,
    }
    hostile = {
        "udp": {"datagrams-up": -1, "datagrams-down": True, "dropped-up": "9", "dropped-down": 1.5, "x": 1}
    }
    assert audit.udp_fields(hostile) == dict.fromkeys(audit.UDP_FIELDS)
    assert audit.udp_fields({"udp": 5}) is None and audit.udp_fields([]) is None
    rec = audit.record("stream-closed", **audit.udp_fields(good) or {})
    assert [f for f in audit.FIELDS if f in audit.UDP_FIELDS] == list(audit.UDP_FIELDS)
    assert rec["dropped-down"] == 7


# --- Channel.can_write, no root ---------------------------------------------------------------


class SiteEnd(Link):
    def __init__(self, ws: MemoryWebSocket) -> None:
        super().__init__(ws, Connection(odd_ids=False, accept_streams=True), "site")
        self.opened: asyncio.Queue[Channel] = asyncio.Queue()

    def on_stream_opened(self, event: Any) -> None:
        self.opened.put_nowait(self.adopt_channel(event.stream_id))


def test_can_write_says_whether_a_whole_record_fits_now() -> None:
    async def main() -> None:
        a, b = MemoryWebSocket.pair()
        client, site = Link(a, Connection(odd_ids=True, accept_streams=False), "client"), SiteEnd(b)
        client.start()
        site.start()
        opened = client.open_channel_now(OpenRequest(verb="connect", protocol="udp", port=53))
        channel = await asyncio.wait_for(site.opened.get(), DEADLINE)
        assert not channel.can_write(1)  # not accepted yet
        channel.accept()
        assert channel.can_write(DEFAULT_WINDOW) and not channel.can_write(DEFAULT_WINDOW + 1)
        assert channel.send_nowait(b"x" * (DEFAULT_WINDOW - 1)) == DEFAULT_WINDOW - 1
        assert channel.can_write(1) and not channel.can_write(2)
        assert await opened.read() == b"x" * (DEFAULT_WINDOW - 1)  # credit comes back
        await until(lambda: channel.can_write(DEFAULT_WINDOW))
        channel.write_eof()
        assert not channel.can_write(1)
        client.close()
        site.close()
        await asyncio.gather(client.task or asyncio.sleep(0), site.task or asyncio.sleep(0))

    asyncio.run(main())


# --- the idle logic on a fake clock, no root --------------------------------------------------


class RecordingChannel:
    """What UdpFlow.end() does to its channel."""

    def __init__(self) -> None:
        self.sent: list[object] = []

    def send_control(self, payload: dict[str, object]) -> None:
        self.sent.append(payload)

    def write_eof(self) -> None:
        self.sent.append("EOF")


def test_idle_ends_the_flow_on_the_clock() -> None:
    async def main() -> None:
        clock = FakeClock()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        channel = RecordingChannel()
        flow = UdpFlow(channel, sock, 5.0, clock)  # type: ignore[arg-type]
        assert flow.check_idle() == 5.0
        clock.advance(4)
        assert flow.check_idle() == 1.0 and channel.sent == []
        flow.last_activity = clock()  # a datagram passed
        clock.advance(4.5)
        assert flow.check_idle() == 0.5
        clock.advance(0.5)
        assert flow.check_idle() is None
        counts = {"datagrams-up": 0, "datagrams-down": 0, "dropped-up": 0, "dropped-down": 0, "refused": 0}
        assert channel.sent == [{"udp": counts}, "EOF"]
        assert sock.fileno() == -1  # closed with the flow
        assert flow.check_idle() is None and len(channel.sent) == 2  # once

    asyncio.run(main())


# --- in process, with a real namespace ----------------------------------------------------------


def inventory(netns: str, policy: str = "") -> Any:
    return parse_inventory(
        tomllib.loads(f'[applications.app.service-instances.si]\nnetns = "{netns}"\n{policy}')
    )


@contextlib.asynccontextmanager
async def site(
    monkeypatch: pytest.MonkeyPatch, netns: str, handler: UdpHandler, policy: str = ""
) -> AsyncIterator[TowerLink]:
    tower_ws, site_ws = MemoryWebSocket.pair()

    async def connect(*args: object, **kw: object) -> MemoryWebSocket:
        return site_ws

    monkeypatch.setattr(agent_module, "connect", connect)
    sockets = NamespaceSockets()
    agent = Agent(
        towers=["ws://tower.invalid"],
        site="s1",
        token="t",
        ssl_context=None,
        inventory=inventory(netns, policy),
        handlers={Serves("connect", "udp"): handler},
        context=HandlerContext(site="s1", sockets=sockets),
    )
    tower = TowerLink(tower_ws)
    tower.start()
    enforcer = asyncio.create_task(agent.connect_once())
    try:
        await until(lambda: tower.hellos)
        assert "udp" in tower.hellos[0]["handlers"]  # type: ignore[operator]
        yield tower
    finally:
        enforcer.cancel()
        await asyncio.gather(enforcer, return_exceptions=True)
        tower.close()
        await asyncio.gather(tower.task or asyncio.sleep(0), return_exceptions=True)
        sockets.close()


class Echo:
    """A UDP server on 127.0.0.1 inside a namespace, served from this loop: it records
    every datagram and (``echo``) sends it back."""

    def __init__(self, netns: str, echo: bool = True, address: str = "127.0.0.1") -> None:
        def make() -> socket.socket:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((address, 0))
            return sock

        self.sock = call_in_netns(netns, make)
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self.echo = echo
        self.received: list[bytes] = []
        self.peer: tuple[str, int] | None = None
        asyncio.get_running_loop().add_reader(self.sock.fileno(), self._readable)

    def _readable(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(65535)
            except BlockingIOError:
                return
            self.received.append(data)
            self.peer = peer
            if self.echo:
                self.sock.sendto(data, peer)

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()


def udp_request(port: int, ip: str = "", **args: object) -> OpenRequest:
    return OpenRequest(
        verb="connect",
        protocol="udp",
        application="app",
        service_instance="si",
        port=port,
        ip_address=ip,
        args=args,
    )


async def read_datagrams(channel: Channel, count: int) -> list[bytes]:
    decoder, got = DatagramDecoder(), list[bytes]()
    while len(got) < count:
        data = await asyncio.wait_for(channel.read(), DEADLINE)
        assert data, f"EOF after {len(got)} of {count} datagrams"
        got += decoder.feed(data)
    assert decoder.pending == 0
    return got


async def finish(channel: Channel) -> dict[str, Any]:
    """End the client's half; return the site's final counts (its EOF follows them)."""
    channel.write_eof()
    control = await asyncio.wait_for(channel.read_control(), DEADLINE)
    assert await asyncio.wait_for(channel.read(), DEADLINE) == b""
    return cast(dict[str, Any], control["udp"])


SIZES = [1, 0, 1400, 8000, 65000]


@pytest.mark.root
@pytest.mark.parametrize("where", ["loopback", "veth"])
def test_datagrams_of_every_size_come_back_identical(
    monkeypatch: pytest.MonkeyPatch, netlab: NetLab, loop_kind: str, where: str
) -> None:
    ns = netlab.add_ns("udp")
    address = "127.0.0.1"
    if where == "veth":  # another host on the instance's LAN: 65,000 bytes go as IP fragments
        lan = netlab.add_ns("lan")
        netlab.veth(ns, "192.0.2.1/24", lan, "192.0.2.53/24")
        ns_echo, address = lan, "192.0.2.53"
    else:
        ns_echo = ns

    async def main() -> None:
        echo = Echo(ns_echo, address=address)
        async with site(monkeypatch, ns, UdpHandler()) as tower:
            ip = "" if where == "loopback" else address
            channel = await tower.open_channel(udp_request(echo.port, ip))
            sent = [bytes([i + 1]) * size for i, size in enumerate(SIZES)]
            # Records cut across writes at odd places: boundaries come from the lengths only.
            stream = b"".join(encode_datagram(d) for d in sent)
            for cut in range(0, len(stream), 7777):
                await channel.write(stream[cut : cut + 7777])
            got = await read_datagrams(channel, len(sent))
            assert got == sent and echo.received == sent
            await channel.write(encode_datagram(b"y" * 65535))  # more than UDP carries: dropped, counted
            counts = await finish(channel)
            assert counts == {
                "datagrams-up": 5,
                "datagrams-down": 5,
                "dropped-up": 1,
                "dropped-down": 0,
                "refused": 0,
            }
        echo.close()

    run(main(), loop_kind)


@pytest.mark.root
def test_no_credit_drops_and_nothing_queues(monkeypatch: pytest.MonkeyPatch, netlab: NetLab) -> None:
    ns = netlab.add_ns("udp")
    flows: list[UdpFlow] = []
    real_start = UdpFlow.start

    def start(self: UdpFlow) -> None:
        flows.append(self)
        real_start(self)

    monkeypatch.setattr(UdpFlow, "start", start)
    size, burst, bursts = 1000, 50, 12  # 600 kB from the target, a 256 KiB window

    async def main() -> None:
        target = Echo(ns, echo=False)
        async with site(monkeypatch, ns, UdpHandler()) as tower:
            channel = await tower.open_channel(udp_request(target.port))
            await channel.write(encode_datagram(b"hello"))  # the target learns where the flow is
            await until(lambda: target.peer is not None)
            assert target.peer is not None
            (flow,) = flows
            for n in range(1, bursts + 1):
                for _ in range(burst):
                    target.sock.sendto(b"d" * size, target.peer)
                # Paced by what the site has handled, so the kernel drops nothing itself.
                await until(functools.partial(handled, flow, n * burst))
                # The client never reads, so never gives credit: at most one window is out.
                assert channel.buffered <= DEFAULT_WINDOW and channel.bytes_in <= DEFAULT_WINDOW
            fits = DEFAULT_WINDOW // record_size(size)
            assert (flow.counts.datagrams_down, flow.counts.dropped_down) == (fits, burst * bursts - fits)
            counts = await asyncio.wait_for(finish_unread(channel), DEADLINE)
            assert counts["datagrams-down"] == fits and counts["dropped-down"] == burst * bursts - fits
            assert counts["datagrams-up"] == 1
            assert await read_datagrams(channel, fits) == [b"d" * size] * fits
        target.close()

    asyncio.run(main())


def handled(flow: UdpFlow, count: int) -> bool:
    return flow.counts.datagrams_down + flow.counts.dropped_down == count


async def finish_unread(channel: Channel) -> dict[str, Any]:
    channel.write_eof()
    control = await channel.read_control()  # CONTROL is outside flow control: it overtakes
    return cast(dict[str, Any], control["udp"])


@pytest.mark.root
def test_idle_flow_ends_with_counts_then_eof(monkeypatch: pytest.MonkeyPatch, netlab: NetLab) -> None:
    ns = netlab.add_ns("udp")

    async def main() -> None:
        clock = FakeClock()
        echo = Echo(ns)
        async with site(monkeypatch, ns, UdpHandler(clock, clock.sleep)) as tower:
            channel = await tower.open_channel(udp_request(echo.port, idle=5))
            await channel.write(encode_datagram(b"ping"))
            assert await read_datagrams(channel, 1) == [b"ping"]
            clock.advance(6)
            control = await asyncio.wait_for(channel.read_control(), DEADLINE)
            assert control == {
                "udp": {
                    "datagrams-up": 1,
                    "datagrams-down": 1,
                    "dropped-up": 0,
                    "dropped-down": 0,
                    "refused": 0,
                }
            }
            assert await asyncio.wait_for(channel.read(), DEADLINE) == b""
            channel.write_eof()  # the client ends its half: the stream is over
            await until(lambda: not tower.channels)
        echo.close()

    asyncio.run(main())


@pytest.mark.root
def test_a_client_that_never_ends_after_idle_is_reset(
    monkeypatch: pytest.MonkeyPatch, netlab: NetLab
) -> None:
    ns = netlab.add_ns("udp")

    async def main() -> None:
        clock = FakeClock()
        echo = Echo(ns)
        async with site(monkeypatch, ns, UdpHandler(clock, clock.sleep)) as tower:
            channel = await tower.open_channel(udp_request(echo.port, idle=1))
            clock.advance(1)
            await asyncio.wait_for(channel.read_control(), DEADLINE)
            assert await asyncio.wait_for(channel.read(), DEADLINE) == b""
            clock.advance(CLOSE_GRACE)
            with pytest.raises(StreamError) as info:
                await asyncio.wait_for(channel.read_control(), DEADLINE)
            assert info.value.code == ErrorCode.TIMEOUT
        echo.close()

    asyncio.run(main())


@pytest.mark.root
def test_hostile_stream_ending_inside_a_record_is_reset_protocol(
    monkeypatch: pytest.MonkeyPatch, netlab: NetLab
) -> None:
    ns = netlab.add_ns("udp")

    async def main() -> None:
        echo = Echo(ns)
        async with site(monkeypatch, ns, UdpHandler()) as tower:
            channel = await tower.open_channel(udp_request(echo.port))
            await channel.write(encode_datagram(b"whole") + b"\x00\x10abc")  # 16 announced, 3 sent
            channel.write_eof()
            with pytest.raises(StreamError) as info:
                while await asyncio.wait_for(channel.read(), DEADLINE):
                    pass
            assert info.value.code == ErrorCode.PROTOCOL
            assert "ended inside a datagram record" in str(info.value)
            assert echo.received == [b"whole"]
        echo.close()

    asyncio.run(main())


@pytest.mark.root
@pytest.mark.parametrize("bad", [0, 3601, True, "60", -5])
def test_hostile_idle_is_refused_before_anything_is_sent(
    monkeypatch: pytest.MonkeyPatch, netlab: NetLab, bad: object
) -> None:
    ns = netlab.add_ns("udp")

    async def main() -> None:
        echo = Echo(ns)
        async with site(monkeypatch, ns, UdpHandler()) as tower:
            channel = tower.open_channel_now(udp_request(echo.port, idle=bad))
            channel.send_nowait(encode_datagram(b"early"))  # EARLY_DATA, before any ACCEPT
            with pytest.raises(StreamError) as info:
                await asyncio.wait_for(channel.wait_accepted(), DEADLINE)
            assert info.value.code == ErrorCode.PROTOCOL and "args.idle" in str(info.value)
            # A datagram that would have gone out would be here by now: one more flow proves it.
            ok = await tower.open_channel(udp_request(echo.port))
            await ok.write(encode_datagram(b"after"))
            assert await read_datagrams(ok, 1) == [b"after"]
            assert echo.received == [b"after"]
        echo.close()

    asyncio.run(main())


@pytest.mark.root
def test_site_local_policy_covers_udp_like_tcp(monkeypatch: pytest.MonkeyPatch, netlab: NetLab) -> None:
    ns = netlab.add_ns("udp")
    policy = '[policy]\nallow-ports = ["53"]\nallow-ip-addresses = ["192.0.2.0/24"]\n'

    async def main() -> None:
        echo = Echo(ns)
        async with site(monkeypatch, ns, UdpHandler(), policy) as tower:
            for port, ip in ((echo.port, ""), (53, "198.51.100.1"), (53, "::ffff:198.51.100.1")):
                with pytest.raises(StreamError) as info:
                    await tower.open_channel(udp_request(port, ip))
                assert info.value.code == ErrorCode.DENIED
                assert "the site's local policy refuses" in str(info.value)
            assert echo.received == []
        echo.close()

    asyncio.run(main())


@pytest.mark.root
def test_datagram_socket_errors(netlab: NetLab) -> None:
    ns = netlab.add_ns("udp")

    async def main() -> None:
        sockets = NamespaceSockets()
        try:
            for host, port, code in (
                ("127.1", 53, ErrorCode.PROTOCOL),  # not canonical: never judged in this form
                ("fe80::1%lo", 53, ErrorCode.PROTOCOL),
                ("example.com", 53, ErrorCode.PROTOCOL),  # never a name
                ("127.0.0.1", 0, ErrorCode.PROTOCOL),
                ("192.0.2.1", 53, ErrorCode.UNREACHABLE),  # only lo in the namespace: no route
            ):
                with pytest.raises(StreamError) as info:
                    (await sockets.datagram(ns, host, port)).close()
                assert info.value.code == code, (host, info.value)
            with pytest.raises(StreamError) as info:
                await sockets.datagram("sct-no-such-ns", "127.0.0.1", 53)
            assert info.value.code == ErrorCode.NOT_FOUND
            sock = await sockets.datagram(ns, "127.0.0.1", 9)
            with sock:
                assert sock.type == socket.SOCK_DGRAM and sock.getpeername() == ("127.0.0.1", 9)
        finally:
            sockets.close()

    asyncio.run(main())


def test_time_is_only_the_clock() -> None:
    # The handler's defaults are the real clock; tests above swap both.
    handler = UdpHandler()
    assert handler.clock is time.monotonic and handler.sleep is asyncio.sleep
