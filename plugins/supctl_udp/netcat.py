"""``connect udp`` without ``--bind``: stdin to datagrams, datagrams to stdout.

* Each read of stdin returns at most 65,535 bytes and is one datagram: ``printf QUERY |``
  sends one (a pipe hands over what one write put in, up to 64 KiB); on a terminal each
  line is one.  A datagram waits for the stream's credit (stdin can wait; nothing drops).
* Each datagram that comes back is written to stdout as it arrives, raw: no separator,
  no framing (``| xxd`` or ``| head -c`` to look at it).
* After stdin's EOF, supctl waits for replies until ``--idle`` seconds (default 60) pass
  without a datagram either way, then ends the flow and exits 0; ``--idle 1`` for one
  query and its answer.  If the site ends the flow first (its own idle timeout), supctl
  exits 0 at once.  A lost session or a refused target: exit 6 / 3 as for tcp.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import Any

from supctl.client.api import OpenStream
from supctl.client.stdio import watchable, write_all
from supctl.errors import StreamError
from supctl.link import Channel
from supctl.protocol.datagrams import MAX_DATAGRAM, DatagramDecoder, encode_datagram

from .flows import IDLE
from .relay import CLOSE_WAIT


class DatagramNetcat:
    """The :class:`~supctl.client.api.Netcat` of ``connect udp``."""

    def __init__(
        self,
        idle: float = IDLE,
        stdin: int = 0,
        stdout: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.idle = idle
        self.stdin = stdin
        self.stdout = stdout
        self.clock = clock
        self.last = clock()  # the last datagram either way
        self.activity = asyncio.Event()

    def _touch(self) -> None:
        self.last = self.clock()
        self.activity.set()

    async def run(self, open_stream: OpenStream) -> None:
        channel = open_stream()
        self.last = self.clock()
        down = asyncio.ensure_future(self._downstream(channel))
        up = asyncio.ensure_future(self._upstream(channel))
        try:
            await asyncio.wait([down, up], return_when=asyncio.FIRST_COMPLETED)
            if not down.done():  # stdin's EOF: wait for replies until the flow is idle
                up.result()
                await self._until_idle(down)
            if not down.done():
                channel.write_eof()  # the site answers with its counters and its EOF
                await asyncio.wait([down], timeout=CLOSE_WAIT)
            if down.done():
                down.result()  # a reset or a lost session: StreamError
        finally:
            for task in (up, down):
                task.cancel()
            await asyncio.gather(up, down, return_exceptions=True)
            if channel.error is None:
                channel.write_eof()

    async def _until_idle(self, down: asyncio.Future[None]) -> None:
        while not down.done():
            left = self.last + self.idle - self.clock()
            if left <= 0:
                return
            self.activity.clear()
            waiter: asyncio.Future[Any] = asyncio.ensure_future(self.activity.wait())
            try:
                await asyncio.wait({waiter, down}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()

    async def _upstream(self, channel: Channel) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if watchable(self.stdin):
                ready: asyncio.Future[None] = loop.create_future()

                def readable(ready: asyncio.Future[None] = ready) -> None:
                    if not ready.done():
                        ready.set_result(None)

                loop.add_reader(self.stdin, readable)
                try:
                    await ready
                finally:
                    loop.remove_reader(self.stdin)
                data = os.read(self.stdin, MAX_DATAGRAM)  # readable: returns without blocking
            else:  # a regular file or /dev/null never blocks (and cannot be watched)
                data = os.read(self.stdin, MAX_DATAGRAM)
            if not data:
                return
            await channel.write(encode_datagram(data))
            self._touch()

    async def _downstream(self, channel: Channel) -> None:
        loop = asyncio.get_running_loop()
        decoder = DatagramDecoder()
        while data := await channel.read():
            for datagram in decoder.feed(data):
                self._touch()
                await loop.run_in_executor(None, write_all, self.stdout, datagram)
        if decoder.pending:
            raise StreamError("the site ended the flow inside a datagram")
