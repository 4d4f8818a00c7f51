"""Local stdin/stdout for the stream verbs (netcat mode, exec)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import stat

from ..link import READ_SIZE, Channel


def write_all(fd: int, data: bytes) -> None:
    """Write everything (blocking; run it on a worker thread), also when ``fd``
    shares a non-blocking file description with a terminal stdin the loop watches."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            select.select([], [fd], [])


def watchable(fd: int) -> bool:
    """Only pipes, sockets and terminals can be watched by the event loop; uvloop
    aborts the process (not an exception) on /dev/null or a regular file."""
    mode = os.fstat(fd).st_mode
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or os.isatty(fd)


async def copy_stdin(fd: int, channel: Channel) -> None:
    """Copy ``fd`` to the channel until EOF (not sending EOF itself)."""
    loop = asyncio.get_running_loop()
    if not watchable(fd):
        # Regular files and /dev/null never block: read them on a worker thread.
        while data := await loop.run_in_executor(None, os.read, fd, READ_SIZE):
            await channel.write(data)
        return
    stream = asyncio.StreamReader(limit=READ_SIZE)
    pipe = os.fdopen(os.dup(fd), "rb", buffering=0)
    try:
        transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stream), pipe)
    except BaseException:
        # Cancelled inside connect_read_pipe, uvloop may already have closed the fd.
        with contextlib.suppress(OSError):
            pipe.close()
        raise
    try:
        while data := await stream.read(READ_SIZE):
            await channel.write(data)
    finally:
        transport.close()
        with contextlib.suppress(OSError):
            os.set_blocking(fd, True)  # the shell shares this file description
