"""supctl's side of ``exec -t``: the local terminal in raw mode, joined to a terminal at the site.

The stream is an exec stream (:mod:`.verb`) whose OPEN carries ``args.tty``
(window size and TERM, :class:`~supctl.protocol.exec.TtyRequest`).  Once the
site accepted it, the local terminal goes raw: every key, Ctrl-C and Ctrl-Z
included, is a byte to the remote terminal, whose line discipline turns it into
a signal for the remote foreground job, as on any terminal.  So a local SIGINT is
not passed on as a signal CONTROL (in raw mode the keyboard sends none; one from
``kill`` ends supctl like SIGTERM and SIGHUP do: the stream is reset, which ends
the command).  The window size follows the local one: SIGWINCH sends
``{"resize": {"rows": R, "cols": C}}``.

The terminal's settings are restored on every way out: the command's exit, a
reset, a lost tower, an exception, a signal (all of them leave through one
``finally``).  Only SIGKILL can leave it raw (``stty sane`` or ``reset`` repair it).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import termios
import tty
from collections.abc import Iterator, Mapping

from supctl.errors import ExitCode, UsageError
from supctl.link import Channel
from supctl.protocol import ErrorCode
from supctl.protocol.exec import MAX_WINDOW, TtyRequest, WindowSize, valid_term

from .verb import ExecSession

#: What supctl sends when the terminal reports no size (a serial line, say).
DEFAULT_SIZE = WindowSize(24, 80)
#: Signals that end an exec -t at once, restoring the terminal on the way out.
ENDING = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def window_size(fd: int) -> WindowSize:
    """The size of the terminal on ``fd``, within what the site accepts."""
    try:
        cols, rows = os.get_terminal_size(fd)
    except OSError:
        return DEFAULT_SIZE
    if rows <= 0 or cols <= 0:
        return DEFAULT_SIZE
    return WindowSize(min(rows, MAX_WINDOW), min(cols, MAX_WINDOW))


def terminal_request(stdin: int = 0, environ: Mapping[str, str] = os.environ) -> TtyRequest:
    """What ``exec -t`` asks the site for; refused (one line, exit 255) when ``stdin``
    is not a terminal, as ssh refuses a pseudo-terminal then: nothing runs remotely."""
    if not os.isatty(stdin):
        raise UsageError(
            "exec -t needs a terminal, and stdin is not one: drop -t to run COMMAND without one",
            exit_code=ExitCode.EXEC_FAILED,
        )
    term = environ.get("TERM")
    # A TERM the site would refuse is left out (the site then picks one) rather than failing.
    return TtyRequest(window_size(stdin), term if valid_term(term) else None)


@contextlib.contextmanager
def raw_mode(fd: int) -> Iterator[None]:
    """The terminal on ``fd`` in raw mode inside the block, as it was after it."""
    saved = termios.tcgetattr(fd)
    try:
        # TCSADRAIN, not setraw's default TCSAFLUSH: keys typed ahead are kept for the remote.
        tty.setraw(fd, termios.TCSADRAIN)
        yield
    finally:
        with contextlib.suppress(termios.error, OSError):  # the terminal may be gone (hangup)
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)


class TerminalSession(ExecSession):
    """An accepted ``exec -t`` stream, run to its end with the local terminal raw."""

    handled_signals = ()  # ENDING is handled by run() itself, around the raw mode

    def __init__(self, channel: Channel, stdin: int = 0, stdout: int = 1, stderr: int = 2) -> None:
        super().__init__(channel, stdin, stdout, stderr)
        self.size = window_size(stdin)  # as sent in the OPEN (terminal_request, a moment ago)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        # Installed before the terminal goes raw and removed after it is restored, so
        # no signal can end supctl in between with the terminal left raw.
        for signum in ENDING:
            loop.add_signal_handler(signum, self.on_signal, signum)
        loop.add_signal_handler(signal.SIGWINCH, self.on_resize)
        try:
            with raw_mode(self.stdin):
                self.on_resize()  # resized between the OPEN and now
                return await super().run()
        finally:
            loop.remove_signal_handler(signal.SIGWINCH)
            for signum in ENDING:
                loop.remove_signal_handler(signum)

    def on_signal(self, signum: int) -> None:
        """Any ending signal: reset the stream (the site ends the command) and exit 128+N."""
        if not self._aborted.done():
            self.channel.reset(ErrorCode.CANCEL, f"supctl got {signal.Signals(signum).name}")
            self._aborted.set_result(128 + signum)

    def on_resize(self) -> None:
        size = window_size(self.stdin)
        if size != self.size:
            self.size = size
            self.channel.send_control({"resize": {"rows": size.rows, "cols": size.cols}})
