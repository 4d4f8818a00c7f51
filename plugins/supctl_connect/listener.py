"""``connect --bind``: accept local connections, one stream each."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable

from supctl.bridge import SocketBridge, arm_reset
from supctl.client.api import BindAddress, OpenStream, Reporter
from supctl.errors import StreamError
from supctl.link import Channel, Link
from supctl.protocol import ErrorCode


def _peer(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return str(BindAddress(str(peer[0]), int(peer[1])))
    return str(peer)


class TcpListener:
    async def serve(
        self,
        link: Link,
        open_stream: OpenStream,
        bind: BindAddress,
        ready: Callable[[BindAddress], None],
        reporter: Reporter,
    ) -> None:
        numbers = itertools.count(1)
        live: set[SocketBridge] = set()
        stopping = False

        def new_connection() -> SocketBridge:
            # Each connection is a SocketBridge: bytes move in callbacks, no task per
            # connection.  A refused or failed stream ends its own connection only.
            number = next(numbers)
            started = time.monotonic()

            def opened(transport: asyncio.Transport) -> Channel:
                reporter.opened(number, _peer(transport))
                return open_stream()

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
            for bridge in list(live):
                bridge.abort(ErrorCode.CANCEL, "supctl is stopping")
