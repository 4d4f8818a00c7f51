"""What every exec stream does with its command, with a terminal or with pipes: the
client's signals, waiting for the exit, and the end (``exit`` CONTROL after all output).

:mod:`.handler` (pipes) and :mod:`.ptyhandler` (a terminal) differ only in how bytes
move; the command's life is the same, so it is written once, here.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Collection, Mapping
from typing import Any

from supctl.enforcer.cgroups import Cgroup
from supctl.enforcer.runtime import exit_status, kill_group
from supctl.link import Channel

#: Seconds between a client's INT/TERM and SIGKILL, if the command is still running.
GRACE = 5.0
SIGNALS = {
    "INT": signal.SIGINT,
    "TERM": signal.SIGTERM,
    "HUP": signal.SIGHUP,
    "KILL": signal.SIGKILL,
    "QUIT": signal.SIGQUIT,
}


class Command:
    """A running exec command: its process group, its cgroup and the SIGKILL timer."""

    def __init__(
        self,
        channel: Channel,
        proc: asyncio.subprocess.Process,
        log: logging.Logger,
        cgroup: Cgroup | None,
        *,
        signals: Mapping[str, int] = SIGNALS,
        grace: float = GRACE,
    ) -> None:
        self.channel = channel
        self.proc = proc
        self.log = log
        self.cgroup = cgroup
        self.signals = signals
        self.grace_seconds = grace
        self.grace: asyncio.TimerHandle | None = None

    def on_signal(self, message: Mapping[str, Any]) -> None:
        """A ``{"signal": NAME}`` CONTROL: to the command's group; the first INT or TERM
        arms SIGKILL after the grace.  Anything else is ignored (logged at debug)."""
        name = message.get("signal")
        signum = self.signals.get(name) if isinstance(name, str) else None
        if signum is None:
            self.log.debug("exec: ignoring CONTROL message %.200r", message)
            return
        kill_group(self.proc, signum)
        if signum in (signal.SIGINT, signal.SIGTERM) and self.grace is None:
            loop = asyncio.get_running_loop()
            self.grace = loop.call_later(self.grace_seconds, kill_group, self.proc, signal.SIGKILL)

    async def wait_exited(self, tasks: Collection[asyncio.Task[Any]], exited: asyncio.Task[int]) -> None:
        """Until ``exited`` is done; a task of ``tasks`` that fails first (the client reset
        the stream, the link was lost, a bad CONTROL) raises its StreamError here."""
        waiting: set[asyncio.Task[Any]] = set(tasks)
        while not exited.done():
            done, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()

    def end_group(self) -> None:
        """The command exited: what it left in its group (and, with a cgroup, anywhere:
        setsid) goes too, which also closes the pipes or the terminal it held."""
        kill_group(self.proc, signal.SIGKILL)
        if self.cgroup is not None:
            self.cgroup.kill()

    def send_exit(self, returncode: int) -> None:
        """The exit status, then EOF: after all output, which the caller drained."""
        code, signum = exit_status(returncode)
        self.channel.send_control({"exit": {"code": code, "signal": signum}})
        self.channel.write_eof()

    async def stop(self, tasks: Collection[asyncio.Task[Any]]) -> None:
        """However the stream ended: no timer, no task left behind."""
        if self.grace is not None:
            self.grace.cancel()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
