"""``connect --bind``: accept local connections, one stream each."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable

from supctl.bridge import SocketBridge, arm_reset
from supctl.client.api import BindAddress, Reporter, Streams
from supctl.errors import StreamError
from supctl.link import Channel
from supctl.protocol import ErrorCode

#: Local connections waiting for the session to come back, at most; more are reset
#: at once (each waiting one holds a socket and a task).
MAX_WAITING = 128


class BridgeMeter:
    """The :class:`~supctl.client.api.Meter` of one connection: its channel's counters, read
    through (the channel owns them), and when the far end accepted the stream."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.channel: Channel | None = None
        self.open_latency: float | None = None

    def attach(self, channel: Channel) -> None:
        self.channel = channel
        opened_at = self.clock()

        def accepted(future: asyncio.Future[None]) -> None:
            if not future.cancelled() and future.exception() is None:
                self.open_latency = self.clock() - opened_at

        channel.accepted.add_done_callback(accepted)

    @property
    def sent(self) -> int:
        return self.channel.bytes_out if self.channel is not None else 0

    @property
    def received(self) -> int:
        return self.channel.bytes_in if self.channel is not None else 0

    @property
    def stream_id(self) -> int | None:
        return self.channel.id if self.channel is not None else None


def _peer(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return str(BindAddress(str(peer[0]), int(peer[1])))
    return str(peer)


class TcpListener:
    async def serve(
        self,
        streams: Streams,
        bind: BindAddress,
        ready: Callable[[BindAddress], None],
        reporter: Reporter,
    ) -> None:
        numbers = itertools.count(1)
        live: set[SocketBridge] = set()
        waiting: set[asyncio.Future[Channel]] = set()
        stopping = False

        def join(bridge: SocketBridge, meter: BridgeMeter, task: asyncio.Future[Channel]) -> None:
            waiting.discard(task)
            if task.cancelled():
                bridge.abort(ErrorCode.CANCEL, "supctl is stopping")
            elif (error := task.exception()) is not None:
                if isinstance(error, StreamError):
                    bridge.abort(ErrorCode.parse(error.code), str(error))
                else:
                    bridge.abort(ErrorCode.INTERNAL, f"internal error: {error}")
            else:
                channel = task.result()
                meter.attach(channel)
                bridge.start(channel)

        def new_connection() -> SocketBridge:
            # Each connection is a SocketBridge: bytes move in callbacks, no task per
            # connection.  A refused or failed stream ends its own connection only.
            number = next(numbers)
            started = time.monotonic()
            meter = BridgeMeter()

            def opened(transport: asyncio.Transport) -> Channel | None:
                reporter.opened(number, _peer(transport), meter)
                channel = streams.open_now()
                if channel is not None:
                    meter.attach(channel)
                else:  # the session is being re-opened: wait for it
                    if len(waiting) >= MAX_WAITING:
                        raise StreamError(
                            f"{MAX_WAITING} connections already wait for the tower", code=ErrorCode.LIMIT
                        )
                    task = asyncio.ensure_future(streams.open())
                    waiting.add(task)
                    task.add_done_callback(lambda task: join(bridge, meter, task))
                return channel

            def closed(bridge: SocketBridge, error: StreamError | None) -> None:
                live.discard(bridge)
                channel = bridge.channel
                sent, received = (channel.bytes_out, channel.bytes_in) if channel else (0, 0)
                # Ended because supctl stops (Ctrl-C): closed, not failed.
                failure = str(error) if error is not None and not stopping else None
                reporter.closed(number, sent, received, time.monotonic() - started, failure)

            bridge = SocketBridge(opened, closed)
            live.add(bridge)
            return bridge

        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            new_connection, bind.host, bind.port, reuse_address=True, start_serving=False
        )
        # Armed before listen() (start_serving): an accepted socket inherits SO_LINGER
        # from the listening one, so a connection is armed from the moment the kernel
        # creates it, before accept() - if supctl dies even then, the client gets RST.
        for sock in server.sockets:
            arm_reset(sock)
        await server.start_serving()
        sockname = server.sockets[0].getsockname()
        ready(BindAddress(bind.host, int(sockname[1])))
        try:
            async with server:
                await server.serve_forever()
        finally:
            # The server's close() leaves accepted connections open: end them here,
            # while the session can still carry their RESETs.
            stopping = True
            for task in list(waiting):
                task.cancel()
            for bridge in list(live):
                bridge.abort(ErrorCode.CANCEL, "supctl is stopping")
