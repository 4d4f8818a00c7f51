"""Netcat mode: stdin to the stream, the stream to stdout."""

from __future__ import annotations

import asyncio
import contextlib
import sys

from supctl.client.api import OpenStream
from supctl.client.stdio import copy_stdin, write_all
from supctl.link import Channel


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
        channel = open_stream()
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
        await copy_stdin(self.stdin, channel)
        channel.write_eof()

    async def _downstream(self, channel: Channel) -> None:
        loop = asyncio.get_running_loop()
        while data := await channel.read():
            await loop.run_in_executor(None, write_all, self.stdout, data)
        with contextlib.suppress(OSError):
            sys.stdout.flush()
