"""An in-process rig for SocketBridge tests, on uvloop as the programs run: local client ->
listener bridge -> client Link -> WebSocket (loopback, DirectClient/ServerConnection) ->
site Link -> target bridge -> target server.

The wiring mirrors ``connect --bind`` (a SocketBridge per accepted connection that calls
``open_channel_now``) and the enforcer's ``tcp`` handler (adopt the stream, connect,
``create_connection(sock=...)`` with a SocketBridge, then ``accept()``).  Nothing sleeps to
synchronise: every wait is on a future, an event or a read, under a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import socket
import struct
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

import supctl.aio
from supctl.bridge import SocketBridge
from supctl.errors import StreamError
from supctl.link import Channel, Link
from supctl.protocol import (
    MAX_MESSAGE_ACCEPTED,
    Connection,
    ErrorCode,
    OpenRequest,
    StreamOpened,
)
from supctl.wsconn import DirectClientConnection, DirectServerConnection

DEADLINE = 20.0
MiB = 1024 * 1024
SMALL = 64 * 1024  # SO_SNDBUF/SO_RCVBUF of the slow-reader test (Linux doubles it)
Reader = asyncio.StreamReader
Writer = asyncio.StreamWriter
TargetHandler = Callable[[Reader, Writer], Awaitable[object]]


def tcp_socket(option: int = 0, size: int | None = None, listen: bool = False) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    if size:  # a listening socket's SO_SNDBUF is inherited by the sockets it accepts
        sock.setsockopt(socket.SOL_SOCKET, option, size)
    if listen:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
    return sock


async def readable(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()
    loop.add_reader(sock.fileno(), lambda: None if ready.done() else ready.set_result(None))
    try:
        await asyncio.wait_for(ready, DEADLINE)
    finally:
        loop.remove_reader(sock.fileno())


class SiteLink(Link):
    """The enforcer's end, reduced to its ``tcp`` handler: connect to 127.0.0.1:PORT, bridge."""

    def __init__(self, ws: ServerConnection, rcvbuf: int | None) -> None:
        super().__init__(ws, Connection(odd_ids=False, accept_streams=True), "site")
        self.rcvbuf = rcvbuf
        self.fin_first = False  # wait until the target's FIN is there before bridging
        self.bridges: defaultdict[int, asyncio.Future[SocketBridge]] = defaultdict(self._loop.create_future)
        self.tasks: set[asyncio.Task[None]] = set()

    def on_stream_opened(self, event: StreamOpened) -> None:
        task = asyncio.create_task(self._serve(self.adopt_channel(event.stream_id), event.request.port))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _serve(self, channel: Channel, port: int) -> None:
        loop = asyncio.get_running_loop()
        sock = tcp_socket(socket.SO_RCVBUF, self.rcvbuf)
        try:
            await loop.sock_connect(sock, ("127.0.0.1", port))
            if self.fin_first:
                await readable(sock)
            transport, bridge = await loop.create_connection(
                lambda: SocketBridge(lambda _: channel), sock=sock
            )
        except OSError:
            sock.close()
            channel.reset(ErrorCode.REFUSED, f"connection refused by 127.0.0.1:{port}")
            return
        except BaseException:  # cancelled at teardown
            sock.close()
            raise
        self.bridges[channel.id].set_result(bridge)
        try:
            channel.accept()
        except StreamError:
            transport.abort()


class Target:
    """A TCP server on 127.0.0.1 running ``handler`` per connection; outcomes go to a queue."""

    def __init__(self, handler: TargetHandler) -> None:
        self.handler = handler
        self.outcomes: asyncio.Queue[object] = asyncio.Queue()
        self.live: dict[asyncio.Task[Any], Writer] = {}
        self.port = 0

    async def serve(self, reader: Reader, writer: Writer) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.live[task] = writer
        try:
            self.outcomes.put_nowait(await self.handler(reader, writer))
        except Exception as exc:  # reported to the test, which awaits an outcome
            self.outcomes.put_nowait(exc)
        finally:
            writer.close()
            del self.live[task]

    async def outcome(self) -> object:
        return await asyncio.wait_for(self.outcomes.get(), DEADLINE)

    async def close(self) -> None:
        # Not task.cancel(): Python 3.11's start_server callback reports the CancelledError
        # to the loop.  Aborting the connections ends the handlers.
        for writer in self.live.values():
            writer.transport.abort()
        if self.live:
            await asyncio.wait(self.live, timeout=DEADLINE)


class Rig:
    """The whole path; everything is registered on ``stack``, which ``run`` always closes."""

    def __init__(self, stack: contextlib.AsyncExitStack, small_buffers: bool) -> None:
        self.stack = stack
        self.small = SMALL if small_buffers else None
        loop = asyncio.get_running_loop()
        self.local: defaultdict[int, asyncio.Future[SocketBridge]] = defaultdict(
            loop.create_future
        )  # by port
        self.live: set[SocketBridge] = set()
        self._site: asyncio.Future[SiteLink] = loop.create_future()

    async def start(self) -> None:
        options: dict[str, Any] = {"compression": None, "max_size": MAX_MESSAGE_ACCEPTED}
        server = await serve(
            self._ws_handler, "127.0.0.1", 0, create_connection=DirectServerConnection, **options
        )
        self.stack.push_async_callback(lambda: asyncio.wait_for(server.wait_closed(), DEADLINE))
        self.stack.callback(server.close)
        url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        ws = await connect(url, create_connection=DirectClientConnection, **options)
        self.client = Link(ws, Connection(odd_ids=True, accept_streams=False), "client")
        self.client.start()
        self.stack.push_async_callback(self.client.aclose)
        self.site = await asyncio.wait_for(self._site, DEADLINE)
        self.stack.callback(self._abort_live)

    def _abort_live(self) -> None:
        for bridge in list(self.live):
            bridge.abort(ErrorCode.CANCEL, "teardown")

    async def _ws_handler(self, ws: ServerConnection) -> None:
        link = SiteLink(ws, self.small)
        self._site.set_result(link)
        try:
            await link.run()
        finally:
            for task in list(link.tasks):
                task.cancel()
            await asyncio.gather(*link.tasks, return_exceptions=True)

    async def target(self, handler: TargetHandler, sndbuf: int | None = None) -> Target:
        target = Target(handler)
        server = await asyncio.start_server(
            target.serve, sock=tcp_socket(socket.SO_SNDBUF, sndbuf, listen=True)
        )
        self.stack.push_async_callback(target.close)
        self.stack.callback(server.close)
        target.port = int(server.sockets[0].getsockname()[1])
        return target

    async def listen(
        self, port: int, open_channel: Callable[[asyncio.Transport], Channel | None] | None = None
    ) -> int:
        """A ``connect --bind`` listener: each connection becomes a stream to 127.0.0.1:``port``."""

        def default(_: asyncio.Transport) -> Channel:
            return self.client.open_channel_now(OpenRequest(verb="connect", protocol="tcp", port=port))

        def new_connection() -> SocketBridge:
            def opened(transport: asyncio.Transport) -> Channel | None:
                self.local[transport.get_extra_info("peername")[1]].set_result(bridge)
                return (open_channel or default)(transport)

            bridge = SocketBridge(opened, lambda ended, _: self.live.discard(ended))
            self.live.add(bridge)
            return bridge

        server = await asyncio.get_running_loop().create_server(
            new_connection, sock=tcp_socket(socket.SO_SNDBUF, self.small, listen=True)
        )
        self.stack.callback(server.close)
        return int(server.sockets[0].getsockname()[1])

    async def dial(self, port: int, rcvbuf: int | None = None) -> tuple[Reader, Writer, SocketBridge]:
        """Connect a local client; return its streams and the listener bridge serving it."""
        sock = tcp_socket(socket.SO_RCVBUF, rcvbuf)
        try:
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
            reader, writer = await asyncio.open_connection(sock=sock)
        except BaseException:
            sock.close()
            raise
        self.stack.callback(writer.transport.abort)  # the transport owns the socket now
        return reader, writer, await asyncio.wait_for(self.local[sock.getsockname()[1]], DEADLINE)

    async def site_bridge(self, local: SocketBridge) -> SocketBridge:
        assert local.channel is not None
        return await asyncio.wait_for(self.site.bridges[local.channel.id], DEADLINE)


class Collector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def run_checked(main: Callable[[], Awaitable[None]]) -> list[logging.LogRecord]:
    """Run ``main()`` on uvloop under a deadline; fail on any exception the event loop had to
    handle (e.g. one escaping from a protocol callback).  Returns the ERROR records logged."""
    collector, unhandled = Collector(), []

    async def wrapper() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _, context: unhandled.append(context))
        async with asyncio.timeout(DEADLINE):
            await main()

    logging.getLogger().addHandler(collector)
    try:
        supctl.aio.run(wrapper())
    finally:
        logging.getLogger().removeHandler(collector)
    assert not unhandled, f"the event loop handled exceptions: {unhandled}"
    return collector.records


def run(body: Callable[[Rig], Awaitable[None]], *, small_buffers: bool = False) -> list[logging.LogRecord]:
    """Run ``body`` with a fresh Rig, torn down whatever happens (see :func:`run_checked`)."""

    async def main() -> None:
        async with contextlib.AsyncExitStack() as stack:
            rig = Rig(stack, small_buffers)
            await rig.start()
            await body(rig)

    return run_checked(main)


# --- targets and client helpers ---------------------------------------------------------------


async def echo(reader: Reader, writer: Writer) -> int:
    total = 0
    while data := await reader.read(256 * 1024):
        total += len(data)
        writer.write(data)
        await writer.drain()
    writer.write_eof()
    return total


async def digest(reader: Reader, writer: Writer) -> str:
    """Read to EOF, answer with the sha256 of what came, close."""
    writer.write(sha(await reader.read()).encode())
    await writer.drain()
    return "answered"


async def sink(reader: Reader, writer: Writer) -> tuple[bytes, str]:
    return await read_end(reader)  # never writes


def resetting(after: int) -> TargetHandler:
    """Read ``after`` bytes, then reset the connection (SO_LINGER 0)."""

    async def handler(reader: Reader, writer: Writer) -> str:
        await reader.readexactly(after)
        rst(writer)
        return "reset sent"

    return handler


def rst(writer: Writer) -> None:
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def send_all(writer: Writer, data: bytes) -> None:
    """Send ``data``, then shutdown(SHUT_WR)."""
    for offset in range(0, len(data), 64 * 1024):
        writer.write(data[offset : offset + 64 * 1024])
        await writer.drain()
    writer.write_eof()


async def read_end(reader: Reader) -> tuple[bytes, str]:
    """Read to the end: what came, and how it ended ("eof" or "reset")."""
    received = bytearray()
    try:
        while data := await reader.read(256 * 1024):
            received += data
    except ConnectionResetError:
        return bytes(received), "reset"
    return bytes(received), "eof"


async def round_trip(reader: Reader, writer: Writer, payload: bytes) -> None:
    writer.write(payload)
    assert await asyncio.wait_for(reader.readexactly(len(payload)), DEADLINE) == payload


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def done(bridge: SocketBridge) -> StreamError | None:
    return await asyncio.wait_for(asyncio.shield(bridge.done), DEADLINE)


def is_error(result: StreamError | None, code: ErrorCode, text: str) -> bool:
    return isinstance(result, StreamError) and (result.code, str(result)) == (code, text)
