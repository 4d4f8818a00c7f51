"""supctl.wsconn: websockets connections that hand each message to a sink, and Link over them.

Real websockets connections on loopback (plain ws), on uvloop as the programs run.  The
receiver processed everything sent before a ping once the sender has the pong (frames are
handled in order): that, not sleeping, is how "sent before attach" is made certain.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from bridge_rig import DEADLINE, run_checked
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.connection import Connection as WsConnection
from websockets.asyncio.server import ServerConnection, serve

import supctl.aio
import supctl.wsconn
from supctl.link import Link
from supctl.protocol import (
    DEFAULT_WINDOW,
    Connection,
    ErrorCode,
    Event,
    OpenRequest,
    StreamOpened,
)
from supctl.protocol.frames import CLOSE_CODE_BASE
from supctl.wsconn import DirectClientConnection, DirectServerConnection, Message

Direct = DirectClientConnection | DirectServerConnection
Handler = Callable[[ServerConnection], Awaitable[None]]


run = run_checked  # on uvloop, failing on any exception the loop had to handle


@contextlib.asynccontextmanager
async def ws_pair(
    handler: Handler | None = None,
    server_class: type[ServerConnection] = DirectServerConnection,
    client_class: type[ClientConnection] = DirectClientConnection,
) -> AsyncIterator[tuple[ClientConnection, ServerConnection]]:
    """A connected (client, server) pair on loopback; ``handler`` runs the server side
    (by default it waits until the connection closes).  Both are closed on exit."""
    accepted: asyncio.Future[ServerConnection] = asyncio.get_running_loop().create_future()

    async def serve_one(ws: ServerConnection) -> None:
        accepted.set_result(ws)
        await (handler(ws) if handler is not None else ws.wait_closed())

    options: dict[str, Any] = {"compression": None}
    async with serve(serve_one, "127.0.0.1", 0, create_connection=server_class, **options) as server:
        url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        async with connect(url, create_connection=client_class, **options) as client:
            yield client, await asyncio.wait_for(accepted, DEADLINE)


class Inbox:
    """A sink that records ``(bytes, is_text)`` and wakes a waiter at a given count."""

    def __init__(self) -> None:
        self.messages: list[tuple[bytes, bool]] = []
        self._want = 0
        self._ready = asyncio.Event()

    def __call__(self, message: Message, is_text: bool) -> None:
        self.messages.append((bytes(message), is_text))
        if len(self.messages) >= self._want:
            self._ready.set()

    async def wait_for(self, count: int) -> list[tuple[bytes, bool]]:
        self._want = count
        if len(self.messages) < count:
            self._ready.clear()
            await asyncio.wait_for(self._ready.wait(), DEADLINE)
        return self.messages


def ends(client: ClientConnection, server: ServerConnection, direction: str) -> tuple[WsConnection, Direct]:
    """(sender, receiver) for a direction."""
    sender, receiver = (server, client) if direction == "to-client" else (client, server)
    assert isinstance(receiver, DirectClientConnection | DirectServerConnection)
    return sender, receiver


DIRECTIONS = pytest.mark.parametrize("direction", ["to-client", "to-server"])


@DIRECTIONS
def test_messages_before_attach_are_kept_in_order(direction: str) -> None:
    async def main() -> None:
        async with ws_pair() as (client, server):
            sender, receiver = ends(client, server, direction)
            for early in (b"one", "two", b"three", "quatre \u00e9"):
                await sender.send(early)
            await asyncio.wait_for(await sender.ping(), DEADLINE)  # the receiver has them all
            inbox = Inbox()
            receiver.attach(inbox)
            # Delivered synchronously by attach itself, in order; text as UTF-8 with is_text.
            expected = [(b"one", False), (b"two", True), (b"three", False), ("quatre é".encode(), True)]
            assert inbox.messages == expected
            await sender.send(b"five")
            await sender.send("six")
            assert await inbox.wait_for(6) == [*expected, (b"five", False), (b"six", True)]

    assert run(main) == []


@DIRECTIONS
def test_fragmented_messages_arrive_whole(direction: str) -> None:
    async def main() -> None:
        async with ws_pair() as (client, server):
            sender, receiver = ends(client, server, direction)
            inbox = Inbox()
            receiver.attach(inbox)
            pongs: list[Awaitable[float]] = []

            async def with_a_ping_inside() -> AsyncIterator[bytes]:
                yield b"x"
                pongs.append(await sender.ping())  # a control frame between two fragments
                yield b"y" * 100_000
                yield b"z"

            await sender.send([b"ab", b"", b"cd", b"ef"])
            await sender.send(["h\u00e9", "llo"])
            await sender.send(with_a_ping_inside())
            await sender.send(b"after")
            assert await inbox.wait_for(4) == [
                (b"abcdef", False),
                ("héllo".encode(), True),
                (b"x" + b"y" * 100_000 + b"z", False),
                (b"after", False),
            ]
            await asyncio.wait_for(pongs[0], DEADLINE)  # the ping stayed websockets' business

    assert run(main) == []


class WatchedServerConnection(DirectServerConnection):
    """Observes (does not change) the early pause: sets ``stopped_reading`` once reading stopped."""

    stopped_reading: asyncio.Event

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if not self.transport.is_reading():
            self.stopped_reading.set()


def test_pending_limit_pauses_reading_until_attach(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(supctl.wsconn, "PENDING_LIMIT", 1000)
    messages = [bytes([n]) * 400 for n in range(10)]

    async def main() -> None:
        WatchedServerConnection.stopped_reading = asyncio.Event()
        async with ws_pair(server_class=WatchedServerConnection) as (client, server):
            assert isinstance(server, WatchedServerConnection)
            for message in messages[:3]:  # 1200 bytes: past the limit at the third
                await client.send(message)
            await asyncio.wait_for(server.stopped_reading.wait(), DEADLINE)
            assert not server.transport.is_reading()
            assert server._pending_bytes == 1200
            for message in messages[3:]:  # these wait in the kernel, not in memory
                await client.send(message)
            assert server._pending_bytes == 1200 and not server.transport.is_reading()
            inbox = Inbox()
            server.attach(inbox)
            assert server.transport.is_reading()
            assert len(inbox.messages) >= 3  # the kept ones, at once
            assert await inbox.wait_for(10) == [(message, False) for message in messages]
            await asyncio.wait_for(await client.ping(), DEADLINE)  # and the connection lives on
            assert len(inbox.messages) == 10

    assert run(main) == []


# --- Link over the direct connections -------------------------------------------------------


class EchoLink(Link):
    """Accepts every stream and echoes it through the Channel API."""

    def __init__(self, ws: ServerConnection) -> None:
        super().__init__(ws, Connection(odd_ids=False, accept_streams=True), "site")
        self.tasks: set[asyncio.Task[None]] = set()

    def on_stream_opened(self, event: StreamOpened) -> None:
        channel = self.adopt_channel(event.stream_id)
        channel.accept()

        async def echo() -> None:
            while data := await channel.read():
                await channel.write(data)
            channel.write_eof()

        self.tasks.add(task := asyncio.create_task(echo()))
        task.add_done_callback(self.tasks.discard)


def serving(link_class: Callable[[ServerConnection], Link], links: asyncio.Future[Link]) -> Handler:
    async def handler(ws: ServerConnection) -> None:
        link = link_class(ws)
        links.set_result(link)
        await link.start()  # a Link's task must end without raising, whatever the peer did

    return handler


@pytest.mark.parametrize("client_class", [DirectClientConnection, ClientConnection])
def test_link_moves_a_stream_with_attach_or_recv_loop(client_class: type[ClientConnection]) -> None:
    """Link.run attaches when the websocket can; a plain websockets connection (no attach)
    goes through the recv loop: both interoperate with a direct server."""
    payload = os.urandom(3 * 1024 * 1024)

    async def main() -> None:
        links: asyncio.Future[Link] = asyncio.get_running_loop().create_future()
        async with ws_pair(serving(EchoLink, links), client_class=client_class) as (client, _):
            assert hasattr(client, "attach") == (client_class is DirectClientConnection)
            link = Link(client, Connection(odd_ids=True, accept_streams=False), "client")
            link.start()
            try:
                channel = await asyncio.wait_for(link.open_channel(OpenRequest(verb="echo")), DEADLINE)
                writer = asyncio.ensure_future(channel.write(payload))
                received = bytearray()
                while data := await channel.read():
                    received += data
                    if len(received) == len(payload):
                        await writer
                        channel.write_eof()
                assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
                assert channel.peak_buffered <= DEFAULT_WINDOW
            finally:
                await link.aclose()
            site = await links
            assert site.task is not None
            await asyncio.wait_for(asyncio.shield(site.task), DEADLINE)  # the site saw the close

    assert run(main) == []


class BrokenLink(Link):
    def __init__(self, ws: ServerConnection) -> None:
        super().__init__(ws, Connection(odd_ids=False, accept_streams=True), "site")

    def handle_event(self, event: Event) -> None:
        raise RuntimeError("boom")


@pytest.mark.parametrize("fault", ["text", "bug"])
def test_link_closes_on_a_text_message_or_a_bug(fault: str) -> None:
    async def main() -> None:
        links: asyncio.Future[Link] = asyncio.get_running_loop().create_future()
        link_class = BrokenLink if fault == "bug" else EchoLink
        async with ws_pair(serving(link_class, links)) as (client, _):
            link = await asyncio.wait_for(links, DEADLINE)
            if fault == "text":
                await client.send("hello")
                code, reason = ErrorCode.PROTOCOL, "text message on a binary protocol"
            else:
                opener = Connection(odd_ids=True, accept_streams=False)
                opener.open_stream(OpenRequest(verb="connect"))
                await client.send(opener.data_to_send())
                code, reason = ErrorCode.INTERNAL, "internal error"
            await asyncio.wait_for(client.wait_closed(), DEADLINE)
            assert (client.close_code, client.close_reason) == (CLOSE_CODE_BASE + code, reason)
            assert link.task is not None
            await asyncio.wait_for(asyncio.shield(link.task), DEADLINE)
            assert link.task.exception() is None
            assert link.lost_reason == reason

    records = run(main)
    if fault == "text":
        assert records == []
    else:  # logged by the link with its traceback, not by websockets nor by the event loop
        assert [(r.name, r.getMessage()) for r in records] == [
            ("supctl.link", "site: failed to handle a message")
        ]
        assert records[0].exc_info is not None and isinstance(records[0].exc_info[1], RuntimeError)
