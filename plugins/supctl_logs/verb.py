"""The ``logs`` verb: ``... containers CONTAINER logs [-f] [--tail N] [--since DURATION]
[--timestamps]``.

One session, one stream (:func:`supctl.client.verbs.run_verb`).  The site sends the
container's held lines as records (:mod:`supctl_logs.wire`); each line of the
container's stdout goes to supctl's stdout and each of its stderr to supctl's stderr,
byte for byte with a newline, so ``logs > out 2> err`` splits them as the container
did.  The site's own notes (a restart, lines a slow reader missed) are one line each
on stderr, ``--- ... ---``.  Without ``-f`` supctl exits 0 at the site's EOF; with
``-f`` it follows until Ctrl-C or SIGTERM, and exits 0.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import unicodedata
from datetime import UTC, datetime

import click

from supctl.client.api import Invocation
from supctl.client.stdio import write_all
from supctl.client.verbs import run_verb
from supctl.errors import ProtocolError, UsageError
from supctl.link import Channel
from supctl.protocol import ErrorCode, FrameError
from supctl.schema import Invalid, parse_duration

from .handler import MAX_TAIL
from .wire import MARK, STDERR, Record, RecordDecoder


def since_seconds(text: str) -> float:
    """``--since``: ``10s``, ``5m``, ``2h``, ``1d`` in seconds; one-line UsageError otherwise."""
    try:
        return parse_duration(text)
    except Invalid as exc:
        raise UsageError(f"logs: --since {exc}") from None
    except ValueError:
        raise UsageError(f"logs: --since must be a duration like 10s, 5m, 2h or 1d, not {text!r}") from None


def rfc3339(when: float) -> bytes:
    """``2026-12-04T09:54:17.123456Z``: the time in UTC, to the microsecond."""
    return datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ").encode()


def printable(data: bytes) -> str:
    """A site's note as one line that cannot drive the terminal (no control characters)."""
    text = data.decode("utf-8", "replace")
    return "".join("?" if unicodedata.category(ch)[0] == "C" else ch for ch in text)


def render(record: Record, timestamps: bool) -> tuple[int, bytes]:
    """(1 or 2, the bytes to write there) for one record."""
    prefix = rfc3339(record.time) + b" " if timestamps else b""
    if record.kind == MARK:
        return STDERR, prefix + b"--- " + printable(record.data).encode() + b" ---\n"
    return record.fd, prefix + record.data + b"\n"


class Printer:
    """Writes the records of one logs stream to stdout and stderr, in order."""

    def __init__(self, timestamps: bool, stdout: int = 1, stderr: int = 2) -> None:
        self.timestamps = timestamps
        self.outputs = {1: stdout, 2: stderr}

    async def run(self, channel: Channel) -> int:
        decoder = RecordDecoder()
        while data := await channel.read():
            try:
                records = decoder.feed(data)
            except FrameError as exc:
                channel.reset(ErrorCode.PROTOCOL, "malformed logs records")
                raise ProtocolError(f"the site sent malformed logs records: {exc}") from None
            try:
                await self.write(records)
            except BrokenPipeError:
                # Like any program in a pipeline whose reader went away (`| head`): quietly.
                channel.reset(ErrorCode.CANCEL, "the output of supctl was closed")
                return 128 + signal.SIGPIPE
        if decoder.pending:
            raise ProtocolError(f"the site's logs ended inside a record ({decoder.pending} bytes left)")
        channel.write_eof()  # our half too: the stream ends cleanly ("ok" in the audit), not reset
        return 0

    async def write(self, records: list[Record]) -> None:
        """Consecutive records for one fd go in one write; order across the two is kept."""
        loop = asyncio.get_running_loop()
        runs: list[tuple[int, list[bytes]]] = []
        for record in records:
            fd, data = render(record, self.timestamps)
            if runs and runs[-1][0] == fd:
                runs[-1][1].append(data)
            else:
                runs.append((fd, [data]))
        for fd, parts in runs:
            await loop.run_in_executor(None, write_all, self.outputs[fd], b"".join(parts))


def logs_args(follow: bool, tail: int, since: str | None) -> dict[str, object]:
    """The OPEN's args for these options (absent ones are not sent)."""
    args: dict[str, object] = {}
    if tail >= 0:
        args["tail"] = tail
    if since is not None:
        args["since"] = since_seconds(since)
    if follow:
        args["follow"] = True
    return args


def make_logs_command() -> click.Command:
    @click.command("logs", context_settings={"help_option_names": ["-h", "--help"]})
    @click.option(
        "-f", "--follow", is_flag=True, help="Keep printing new lines, across restarts, until Ctrl-C."
    )
    @click.option(
        "--tail", type=click.IntRange(-1, MAX_TAIL), default=-1, metavar="N",
        help="Only the last N lines held (-1, the default: all of them).",
    )  # fmt: skip
    @click.option("--since", metavar="DURATION", help="Only lines from the last DURATION: 10s, 5m, 2h, 1d.")
    @click.option("--timestamps", is_flag=True, help="Prefix each line with its time (RFC 3339, UTC).")
    @click.pass_obj
    def logs(inv: Invocation, follow: bool, tail: int, since: str | None, timestamps: bool) -> int:
        """Print the container's output held at the site: its stdout on stdout, its
        stderr on stderr.

        The site keeps the most recent lines of each container it runs (the
        inventory's [verbs.logs] buffer-bytes, 1 MiB by default), restarts marked
        with a line on stderr.
        """
        args = logs_args(follow, tail, since)
        printer = Printer(timestamps, sys.stdout.fileno(), sys.stderr.fileno())
        return run_verb(inv, "logs", args, printer.run, interrupt_code=0 if follow else None)

    return logs
