"""Netcat mode: stdin to the stream, the stream to stdout."""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import sys

from supctl.client.api import OpenStream
from supctl.link import READ_SIZE, Channel


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class StdioNetcat:
    """Joins fd 0 and fd 1 to one stream.

    EOF on stdin half-closes the stream (the remote sees FIN and may still
    answer).  EOF from the remote ends the run: the remote is done talking, as
    with ``nc``.  A reset or a broken path raises StreamError.
    """

    def __init__(self, stdin: int = 0, stdout: int = 1) -> None:
        self.stdin = stdin
        self.stdout = stdout

    async def run(self, open_stream: OpenStream) -> None:
        channel = await open_stream()
        upstream = asyncio.ensure_future(self._upstream(channel))
        try:
            await self._downstream(channel)
        finally:
            upstream.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await upstream
        # The remote finished; finish our half too if stdin had not.
        channel.write_eof()

    async def _upstream(self, channel: Channel) -> None:
        loop = asyncio.get_running_loop()
        reader = await self._stdin_reader(loop)
        if reader is None:
            # Regular files and /dev/null never block: read them on a worker thread.
            while data := await loop.run_in_executor(None, os.read, self.stdin, READ_SIZE):
                await channel.write(data)
        else:
            stream, transport = reader
            try:
                while data := await stream.read(READ_SIZE):
                    await channel.write(data)
            finally:
                transport.close()
                with contextlib.suppress(OSError):
                    os.set_blocking(self.stdin, True)  # the shell shares this file description
        channel.write_eof()

    async def _stdin_reader(
        self, loop: asyncio.AbstractEventLoop
    ) -> tuple[asyncio.StreamReader, asyncio.BaseTransport] | None:
        mode = os.fstat(self.stdin).st_mode
        if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or os.isatty(self.stdin)):
            # Only pipes, sockets and terminals can be watched by the loop; uvloop
            # aborts the process (not an exception) on /dev/null or a regular file.
            return None
        stream = asyncio.StreamReader(limit=READ_SIZE)
        pipe = os.fdopen(os.dup(self.stdin), "rb", buffering=0)
        try:
            transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stream), pipe)
        except (ValueError, OSError):
            pipe.close()
            return None
        return stream, transport

    async def _downstream(self, channel: Channel) -> None:
        loop = asyncio.get_running_loop()
        while data := await channel.read():
            await loop.run_in_executor(None, _write_all, self.stdout, data)
        with contextlib.suppress(OSError):
            sys.stdout.flush()
