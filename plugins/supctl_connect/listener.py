"""``connect --bind``: accept local connections, one stream each."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable

from supctl.client.api import BindAddress, OpenStream, Reporter
from supctl.errors import StreamError
from supctl.link import Link, pipe

log = logging.getLogger(__name__)


def _peer(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
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

        async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            number = next(numbers)
            started = time.monotonic()
            reporter.opened(number, _peer(writer))
            sent = received = 0
            error: str | None = None
            try:
                channel = await open_stream()
                failure = await pipe(channel, reader, writer)
                sent, received = channel.bytes_out, channel.bytes_in
                error = str(failure) if failure else None
            except StreamError as exc:  # refused for this connection only; keep listening
                error = str(exc)
                writer.transport.abort()
            except Exception as exc:  # never let one connection take the listener down
                log.exception("connection %d failed", number)
                error = f"internal error: {exc}"
                writer.transport.abort()
            reporter.closed(number, sent, received, time.monotonic() - started, error)

        server = await asyncio.start_server(on_client, bind.host, bind.port, reuse_address=True)
        sockname = server.sockets[0].getsockname()
        ready(BindAddress(bind.host, int(sockname[1])))
        async with server:
            await server.serve_forever()
