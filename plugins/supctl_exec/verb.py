"""The ``exec`` verb: ``... containers CONTAINER exec 'COMMAND'``.

One session, one stream.  Local stdin goes up the stream (EOF as EOF); the site
sends the command's stdout and stderr as records of :mod:`supctl.protocol.exec`
and, as a CONTROL, its exit status ``{"exit": {"code": N|None, "signal": N|None}}``,
possibly before the last output.  supctl writes the output as it arrives, reads
until the stream's EOF and exits with the command's code (128+N when a signal
killed it, as shells do).  SIGINT/SIGTERM are passed on as ``{"signal": "INT"|"TERM"}``;
a second one resets the stream and exits at once.
"""

from __future__ import annotations

import asyncio
import shlex
import signal
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import click

from supctl.client.api import Invocation, Transport
from supctl.client.stdio import copy_stdin, write_all
from supctl.errors import ExitCode, ProtocolError, StreamError, SupctlError, UsageError
from supctl.link import Channel
from supctl.protocol import ErrorCode, FrameError, OpenRequest
from supctl.protocol.exec import OutputDecoder, TtyRequest

#: After the stream's EOF, how long the exit CONTROL (sent before it) may take to be seen.
EXIT_GRACE = 1.0
SIGNAL_NAMES = {signal.SIGINT: "INT", signal.SIGTERM: "TERM"}


def exit_code(status: object) -> int:
    """The process exit code for the ``exit`` CONTROL's value: ``code``, or 128+``signal``."""
    if isinstance(status, Mapping):
        code, signum = status.get("code"), status.get("signal")
        if isinstance(code, int) and not isinstance(code, bool) and 0 <= code <= 255:
            return code
        if isinstance(signum, int) and not isinstance(signum, bool) and 0 < signum < 128:
            return 128 + signum
    raise ProtocolError(f"the site sent a malformed exit status: {status!r}")


class ExecSession:
    """Runs one accepted exec stream to its end and returns the exit code."""

    #: Signals handled while it runs (:meth:`on_signal`).
    handled_signals: tuple[int, ...] = tuple(SIGNAL_NAMES)

    def __init__(self, channel: Channel, stdin: int = 0, stdout: int = 1, stderr: int = 2) -> None:
        self.channel = channel
        self.stdin = stdin
        self.outputs = {1: stdout, 2: stderr}
        self.exit_status: object = None
        self.exited = False
        self.signals = 0
        self._stdin_task: asyncio.Task[None] | None = None
        self._aborted: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._stdin_task = asyncio.create_task(self._pump_stdin())
        watcher = asyncio.create_task(self._watch_controls())
        output = asyncio.create_task(self._pump_output())
        for signum in self.handled_signals:
            loop.add_signal_handler(signum, self.on_signal, signum)
        try:
            ends: set[asyncio.Future[Any]] = {output, self._aborted}
            await asyncio.wait(ends, return_when=asyncio.FIRST_COMPLETED)
            if self._aborted.done():
                return self._aborted.result()
            broken_pipe = output.result()  # StreamError/ProtocolError: reset, link lost, bad framing
            if broken_pipe is not None:
                return broken_pipe
            if not self.exited:  # sent before the EOF, so it is (at most) one loop turn away
                await asyncio.wait({watcher}, timeout=EXIT_GRACE)
            if not self.exited:
                raise StreamError("the remote command ended without an exit status", code=ErrorCode.PROTOCOL)
            return exit_code(self.exit_status)
        finally:
            for signum in self.handled_signals:
                loop.remove_signal_handler(signum)
            tasks = [self._stdin_task, watcher, output]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.channel.write_eof()  # finish our half if stdin had not

    def on_signal(self, signum: int) -> None:
        """First SIGINT/SIGTERM: ask the site to signal the command; second: give up."""
        self.signals += 1
        if self.signals == 1:
            self.channel.send_control({"signal": SIGNAL_NAMES[signal.Signals(signum)]})
        elif not self._aborted.done():
            self.channel.reset(ErrorCode.CANCEL, "interrupted")
            self._aborted.set_result(128 + signum)

    async def _pump_stdin(self) -> None:
        try:
            await copy_stdin(self.stdin, self.channel)
        except StreamError:
            return  # the stream broke: the output side reports it
        except OSError:
            pass  # stdin unusable (closed, EIO after a hangup): the command gets EOF
        self.channel.write_eof()

    async def _watch_controls(self) -> None:
        while True:
            try:
                payload = await self.channel.read_control()
            except StreamError:
                return  # reset or lost: the output side reports it
            if "exit" in payload:
                self.exit_status = payload["exit"]
                self.exited = True
                # The command is gone: stop waiting for stdin it will never read.
                if self._stdin_task is not None and not self._stdin_task.done():
                    self._stdin_task.cancel()
                    self.channel.write_eof()
                return

    async def _pump_output(self) -> int | None:
        """Write output records until EOF; 128+SIGPIPE when our stdout/stderr is closed."""
        loop = asyncio.get_running_loop()
        decoder = OutputDecoder()
        while data := await self.channel.read():
            try:
                records = decoder.feed(data)
            except FrameError as exc:
                self.channel.reset(ErrorCode.PROTOCOL, "malformed exec output")
                raise ProtocolError(f"the site sent malformed exec output: {exc}") from None
            for fd, chunk in records:  # the decoder checked fd: 1 or 2
                try:
                    await loop.run_in_executor(None, write_all, self.outputs[fd], chunk)
                except BrokenPipeError:
                    # Like a command in a pipeline whose reader went away (`| head`): quietly.
                    self.channel.reset(ErrorCode.CANCEL, "the output of supctl was closed")
                    return 128 + signal.SIGPIPE
        if decoder.pending:
            raise ProtocolError(
                f"the site's exec output ended inside a record ({decoder.pending} bytes left)"
            )
        return None


async def run_exec(
    transport: Transport,
    path: str,
    query: Mapping[str, str],
    command: str,
    *,
    stdin: int = 0,
    stdout: int = 1,
    stderr: int = 2,
    tty: TtyRequest | None = None,
) -> int:
    """Run ``command`` at the site behind ``path`` and return its exit code; with
    ``tty``, on a terminal at the site, the local one (``stdin``) in raw mode."""
    link = await transport.open_session(path, query)
    try:
        # The tower fills in application, instance and container from the URL it authorised.
        args: dict[str, object] = {"command": command}
        if tty is not None:
            args["tty"] = tty.to_args()
        channel = await link.open_channel(OpenRequest(verb="exec", args=args))
        if tty is not None:
            from .terminal import TerminalSession

            return await TerminalSession(channel, stdin, stdout).run()
        return await ExecSession(channel, stdin, stdout, stderr).run()
    finally:
        await link.aclose()


def exec_path(application: str, instance: str, container: str) -> str:
    return (
        f"/v1/state/applications/{quote(application, safe='')}"
        f"/service-instances/{quote(instance, safe='')}"
        f"/containers/{quote(container, safe='')}/exec"
    )


def make_exec_command() -> click.Command:
    @click.command(
        "exec",
        # Options only before COMMAND: from COMMAND on, every word is the command's
        # (exec -it 'ls -l' and exec 'ls -t' both mean what they say), as docker and kubectl.
        context_settings={"help_option_names": ["-h", "--help"], "allow_interspersed_args": False},
    )
    @click.option(
        "-i", "--interactive", is_flag=True,
        help="Keep stdin attached (always the case: accepted for docker and kubectl habits).",
    )  # fmt: skip
    @click.option(
        "-t", "--tty", is_flag=True,
        help="Run COMMAND on a terminal at the site; the local terminal goes raw (stdin must be one).",
    )  # fmt: skip
    @click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
    @click.pass_obj
    def exec_(inv: Invocation, interactive: bool, tty: bool, command: tuple[str, ...]) -> int:
        """Run COMMAND in the container with /bin/sh -c, joined to stdin, stdout and stderr.

        Exits with the command's exit code (128+N when signal N killed it), or 255
        when supctl fails (the one-line message says why), as ssh does.  Quote
        COMMAND as one argument: exec 'ls -l /tmp'.  Options go before it:
        exec -it sh gives an interactive shell on a terminal.
        """
        try:
            return _exec(inv, command, tty=tty, interactive=interactive)
        except SupctlError as exc:
            exc.exit_code = ExitCode.EXEC_FAILED  # never mistaken for the command's own code
            raise

    return exec_


def _exec(inv: Invocation, command: tuple[str, ...], *, tty: bool = False, interactive: bool = False) -> int:
    if len(command) != 1:
        flags = ("i" if interactive else "") + ("t" if tty else "")
        options = f"-{flags} " if flags else ""
        raise UsageError(
            f"exec takes one COMMAND argument, got {len(command)}: quote it, "
            f"e.g. exec {options}{_quote(shlex.join(command))}"
        )
    if not command[0].strip():
        raise UsageError("exec: COMMAND is empty")
    # Before anything is opened: with -t and no local terminal nothing runs remotely.
    request = None
    if tty:
        from .terminal import terminal_request

        request = terminal_request()
    site = inv.require_site()
    assert inv.application and inv.service_instance and inv.container
    path = exec_path(inv.application, inv.service_instance, inv.container)
    return asyncio.run(run_exec(inv.transport(), path, {"site": site}, command[0], tty=request))


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"
