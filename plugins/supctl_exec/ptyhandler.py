"""The site's side of ``exec -t``: the command on a pseudo-terminal.

The enforcer opens a PTY pair, sets its window size, and starts the command
(through the instance's runtime, as every exec: namespace, env, cwd, user,
cgroup) with the PTY's slave as stdin, stdout and stderr.  The process starts
in a new session (every runtime starts one), and a tiny helper makes the slave
its **controlling terminal** (``TIOCSCTTY``) before it execs ``/bin/sh -c
COMMAND``, so ``tty`` names a device, the shell has job control and Ctrl-C or
Ctrl-Z typed by the user reach the foreground job through the line discipline.
The helper is a separate program, not ``preexec_fn``: no Python code runs between
fork and exec in the enforcer (cgroups.py says why).

Three tasks serve the stream, as in :mod:`.handler`: input (stream -> master),
output (master -> stream, as stdout records only: a PTY merges stderr into it)
and CONTROL (signals, and ``resize``: a new window size, set with
``TIOCSWINSZ``, which makes the kernel send SIGWINCH to the foreground job).
Output waits for credit before the next read of the master, so a command
printing faster than the client reads blocks on the PTY: memory stays bounded
by one read and one window.  A PTY has no half-close: the client's EOF only
stops the input.  Wire format: docs/protocol.md, "exec streams".
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import struct
import sys
import termios
import time
from collections.abc import Mapping

from supctl.enforcer.cgroups import Cgroup
from supctl.enforcer.runtime import wait_exited
from supctl.errors import StreamError
from supctl.link import Channel
from supctl.protocol import ErrorCode
from supctl.protocol.exec import STDOUT, WindowSize, encode_output, parse_resize

from .command import Command

#: Runs as the session leader the runtime started: take fd 0 (the slave) as the
#: controlling terminal, then exec the command.  ``-I -S``: no environment, no
#: site-packages, nothing of the enforcer's; only the standard library.  Signals
#: go back to their defaults first: Python ignores SIGPIPE and SIGXFSZ (the
#: command would inherit that through exec), and an enforcer started in the
#: background of a shell ignores SIGINT and SIGQUIT, which Ctrl-C and Ctrl-\ must
#: deliver.
_CTTY = (
    "import fcntl,os,signal as s,sys,termios\n"
    "for n in ('SIGINT','SIGQUIT','SIGPIPE','SIGXFSZ','SIGTSTP','SIGTTIN','SIGTTOU'):"
    " s.signal(getattr(s,n),s.SIG_DFL)\n"
    "fcntl.ioctl(0,termios.TIOCSCTTY,0)\n"
    "os.execvp(sys.argv[1],sys.argv[1:])"
)


def ctty_argv(argv: list[str]) -> list[str]:
    """``argv`` run with the PTY on its stdin as its controlling terminal.  The real
    interpreter (not a virtualenv's link to it), which any user may run."""
    return [os.path.realpath(sys.executable), "-I", "-S", "-c", _CTTY, *argv]


def set_window(fd: int, size: WindowSize) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", size.rows, size.cols, 0, 0))


def open_pty(size: WindowSize) -> tuple[int, int]:
    """A new (master, slave) pair of the given size; the master non-blocking.  Both
    are close-on-exec here: the runtime hands the slave to the command as 0, 1, 2."""
    master, slave = os.openpty()
    try:
        set_window(master, size)
        os.set_blocking(master, False)
    except BaseException:
        os.close(master)
        os.close(slave)
        raise
    return master, slave


async def _ready(fd: int, writing: bool) -> None:
    """Until ``fd`` is readable (or writable)."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def fire() -> None:
        if not ready.done():
            ready.set_result(None)

    add, remove = (loop.add_writer, loop.remove_writer) if writing else (loop.add_reader, loop.remove_reader)
    add(fd, fire)
    try:
        await ready
    finally:
        remove(fd)


class PtySession(Command):
    """One accepted tty exec stream, from the command's start to its exit status."""

    def __init__(
        self,
        channel: Channel,
        proc: asyncio.subprocess.Process,
        master: int,
        log: logging.Logger,
        cgroup: Cgroup | None,
        *,
        signals: Mapping[str, int],
        grace: float,
        read_chunk: int,
        orphan_wait: float,
    ) -> None:
        super().__init__(channel, proc, log, cgroup, signals=signals, grace=grace)
        self.master = master
        self.read_chunk = read_chunk
        self.orphan_wait = orphan_wait
        self.reading_since: float | None = None  # waiting on the master since (monotonic)

    async def run(self) -> None:
        output = asyncio.create_task(self._output())
        stdin = asyncio.create_task(self._input())
        control = asyncio.create_task(self._control())
        exited = asyncio.create_task(wait_exited(self.proc))
        everything = [output, stdin, control, exited]
        try:
            await self.wait_exited(everything, exited)  # a bad resize fails here too
            # What the command left (its jobs, in groups of their own under job control)
            # goes too; they hold the slave, so then the master reads EIO.
            self.end_group()
            stdin.cancel()
            await self._drain(output)
            self.send_exit(exited.result())
        finally:
            await self.stop(everything)

    async def _drain(self, output: asyncio.Task[None]) -> None:
        """Wait until the PTY is empty and written to the stream, or silent for
        ``orphan_wait`` (a process that escaped the group holds the slave)."""
        exited_at = time.monotonic()
        while not output.done():
            await asyncio.wait({output}, timeout=self.orphan_wait / 4)
            since = self.reading_since
            if (
                not output.done()
                and since is not None
                and time.monotonic() - max(since, exited_at) >= self.orphan_wait
            ):
                output.cancel()
        if not output.cancelled():
            output.result()

    async def _output(self) -> None:
        while True:
            self.reading_since = time.monotonic()
            try:
                data = os.read(self.master, self.read_chunk)
            except BlockingIOError:
                await _ready(self.master, writing=False)
                continue
            except OSError as exc:
                if exc.errno == errno.EIO:  # every slave closed: the terminal hung up
                    return
                raise
            self.reading_since = None
            if not data:
                return
            await self.channel.write(encode_output(STDOUT, data))

    async def _input(self) -> None:
        while data := await self.channel.read():
            view = memoryview(data)
            while view:
                try:
                    view = view[os.write(self.master, view) :]
                except BlockingIOError:
                    # The line discipline's buffer is full (nobody reads the terminal):
                    # the client's credit stops until it drains.
                    await _ready(self.master, writing=True)
                except OSError:
                    return  # hung up: the command is ending, the output side sees it

    async def _control(self) -> None:
        while True:
            message = await self.channel.read_control()
            try:
                size = parse_resize(message)
            except ValueError as exc:
                raise StreamError(f"malformed resize: {exc}", code=ErrorCode.PROTOCOL) from None
            if size is not None:
                with contextlib.suppress(OSError):  # hung up meanwhile: nothing to resize
                    set_window(self.master, size)
                continue
            self.on_signal(message)
