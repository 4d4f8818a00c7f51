"""How ``connect --bind`` shows its forwards: a live table, plain lines, or JSON events.

* :class:`HumanStatus` on a terminal (stderr a TTY): a rich live table of the open
  connections with their rates and the totals, redrawn from :mod:`.status`'s model;
  finished connections and the session's news scroll above it, one timestamped line each.
  Not on a terminal: the same lines, plain (rich writes no control code to a file or pipe).
* :class:`JsonEvents` with ``-o json``: one JSON object per event on stdout.

Both take the events of every forward (:class:`ForwardReporter` adapts a listener's
:class:`~supctl.client.api.Reporter` calls to them, naming the forward).
"""

from __future__ import annotations

import asyncio
import datetime
import itertools
import json
from collections.abc import Callable, Mapping
from typing import Protocol

import click
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from supctl.client.api import BindAddress, Forward, Meter

from .status import (
    StatusModel,
    clock_time,
    closed_text,
    human_bytes,
    human_rate,
    human_seconds,
    stream_detail,
)

#: Redraws of the live table per second.
REFRESH = 2.0


class Sink(Protocol):
    """Where the events of every forward go (:class:`HumanStatus` or :class:`JsonEvents`)."""

    def listening(self, index: int, forward: Forward, address: BindAddress, target: str) -> None: ...
    def opened(self, index: int, forward: Forward, number: int, peer: str, meter: Meter) -> None: ...
    def closed(
        self,
        index: int,
        forward: Forward,
        number: int,
        sent: int,
        received: int,
        seconds: float,
        error: str | None,
        counts: Mapping[str, int] | None = None,
    ) -> None: ...
    def detail(self, text: str) -> None:
        """A line for ``-v`` only."""

    def warning(self, index: int, forward: Forward, text: str) -> None:
        """A line about a forward as a whole (rate-limited by its listener)."""

    # the session's news (supctl.client.session.SessionReport)
    def lost(self, reason: str) -> None: ...
    def still_lost(self, seconds: float, reason: str) -> None: ...
    def back(self, seconds: float) -> None: ...
    def moving(self, reason: str) -> None: ...


class ForwardReporter:
    """A listener's :class:`~supctl.client.api.Reporter` for one forward: its events go to
    the sink with the forward named, numbered per forward (a forward on ``localhost``
    has two listeners: one numbering)."""

    def __init__(self, sink: Sink, index: int, forward: Forward, numbers: itertools.count[int]) -> None:
        self.sink = sink
        self.index = index
        self.forward = forward
        self.numbers = numbers
        self._ours: dict[int, int] = {}  # the listener's number -> the forward's

    def opened(self, number: int, peer: str, meter: Meter) -> None:
        self._ours[number] = ours = next(self.numbers)
        self.sink.opened(self.index, self.forward, ours, peer, meter)

    def closed(
        self,
        number: int,
        sent: int,
        received: int,
        seconds: float,
        error: str | None,
        counts: Mapping[str, int] | None = None,
    ) -> None:
        ours = self._ours.pop(number, number)
        self.sink.closed(self.index, self.forward, ours, sent, received, seconds, error, counts)

    def warning(self, text: str) -> None:
        self.sink.warning(self.index, self.forward, text)


class HumanStatus:
    """Lines on stderr (timestamped), and on a terminal a live table under them."""

    def __init__(
        self,
        console: Console,
        clock: Callable[[], float],
        *,
        quiet: bool,
        verbose: bool,
        several: bool,
        wall: Callable[[], datetime.datetime] = datetime.datetime.now,
    ) -> None:
        self.console = console
        self.model = StatusModel(clock)
        self.quiet = quiet
        self.verbose = verbose
        self.several = several  # name the forward in each line
        self.wall = wall
        # The table only on an interactive terminal, and not with -q (only errors then).
        self.live: Live | None = None
        if console.is_terminal and not console.is_dumb_terminal and not quiet:
            self.live = Live(
                self.table(), console=console, auto_refresh=False, transient=True, redirect_stdout=False,
                redirect_stderr=False,
            )  # fmt: skip

    def line(self, text: str) -> None:
        self.console.print(f"[dim]{clock_time(self.wall)}[/] {text}", soft_wrap=True)

    def _who(self, forward: Forward, number: int) -> str:
        prefix = f"{escape(forward.label)}: " if self.several else ""
        return f"{prefix}connection {number}"

    def listening(self, index: int, forward: Forward, address: BindAddress, target: str) -> None:
        self.line(f"Forwarding from {address} -> {escape(target)}")

    def opened(self, index: int, forward: Forward, number: int, peer: str, meter: Meter) -> None:
        self.model.opened(index, forward.label, number, peer, meter)
        if self.live is None and not self.quiet:  # on a terminal the table shows it
            self.line(f"{self._who(forward, number)} from {escape(peer)} opened")

    def closed(
        self,
        index: int,
        forward: Forward,
        number: int,
        sent: int,
        received: int,
        seconds: float,
        error: str | None,
        counts: Mapping[str, int] | None = None,
    ) -> None:
        connection = self.model.closed(index, number, sent, received)
        meter = connection.meter if connection is not None else None
        who = self._who(forward, number)
        if error is not None:
            detail = f" [{stream_detail(meter)}]" if self.verbose else ""
            self.line(f"[red]{who} failed:[/] {escape(error + detail)}")
        elif not self.quiet:
            peer = connection.peer if connection is not None else "?"
            text = closed_text(sent, received, seconds, peer, counts)
            if self.verbose:  # a clean close: both ends sent FIN
                text += f" [{stream_detail(meter)}, reason: closed by both ends]"
            self.line(f"{who} closed: {escape(text)}")

    def detail(self, text: str) -> None:
        if self.verbose:
            self.line(escape(text))

    def warning(self, index: int, forward: Forward, text: str) -> None:
        self.line(f"[yellow]{escape(forward.label)}:[/] {escape(text)}")

    def lost(self, reason: str) -> None:
        self.line(f"[yellow]tower connection lost; reconnecting...[/] ({escape(reason)})")

    def still_lost(self, seconds: float, reason: str) -> None:
        self.line(f"[yellow]still reconnecting after {seconds:.0f} s:[/] {escape(reason)}")

    def back(self, seconds: float) -> None:
        self.line(f"reconnected after {seconds:.1f} s")

    def moving(self, reason: str) -> None:
        self.line(f"[yellow]the tower is draining ({escape(reason)}); moving to a new session...[/]")

    # --- the live table ------------------------------------------------------------

    def table(self) -> Table:
        model = self.model
        table = Table(box=None, show_footer=True, header_style="bold", pad_edge=False)
        totals = model.totals()
        footer = (
            "",
            "",
            f"{totals.connections} open",
            "",
            human_bytes(totals.sent),
            human_bytes(totals.received),
        )
        columns = ("FORWARD", "CONN", "PEER", "AGE", "SENT", "RECEIVED", "OUT/s", "IN/s")
        rates = (human_rate(totals.rate_sent), human_rate(totals.rate_received))
        for name, foot in zip(columns, (*footer, *rates), strict=True):
            justify = "left" if name in ("FORWARD", "PEER") else "right"
            table.add_column(name, footer=foot, justify=justify)  # type: ignore[arg-type]
        for connection in model.open.values():
            up, down = connection.rates()
            table.add_row(
                escape(connection.forward),
                str(connection.number),
                escape(connection.peer),
                human_seconds(model.age(connection)),
                human_bytes(connection.meter.sent),
                human_bytes(connection.meter.received),
                human_rate(up),
                human_rate(down),
            )
        return table

    async def run(self) -> None:
        """Redraw the table until cancelled (nothing to do without one)."""
        if self.live is None:
            return
        with self.live:
            while True:
                self.model.tick()
                self.live.update(self.table(), refresh=True)
                await asyncio.sleep(1 / REFRESH)  # the redraw's pace, not a synchronisation


class JsonEvents:
    """``-o json``: one JSON object per line on stdout for each event of the forwards
    (the session's and the connections'), for scripts; the human lines stay off.  Each
    connection event names its forward by ``forward``, its position in the command (1...)."""

    def __init__(self, out: Callable[[str], object] = click.echo) -> None:
        self.out = out

    def emit(self, event: str, **fields: object) -> None:
        self.out(json.dumps({"event": event, "time": _now(), **fields}, separators=(",", ":")))

    def listening(self, index: int, forward: Forward, address: BindAddress, target: str) -> None:
        self.emit(
            "listening", forward=index, address=address.host, port=address.port, target=target,
            protocol=forward.protocol, remote_port=forward.port,
        )  # fmt: skip

    def opened(self, index: int, forward: Forward, number: int, peer: str, meter: Meter) -> None:
        self.emit("opened", forward=index, connection=number, peer=peer)

    def closed(
        self,
        index: int,
        forward: Forward,
        number: int,
        sent: int,
        received: int,
        seconds: float,
        error: str | None,
        counts: Mapping[str, int] | None = None,
    ) -> None:
        fields = {"connection": number, "sent": sent, "received": received, "seconds": round(seconds, 3)}
        self.emit(
            "closed", forward=index, **fields, **(counts or {}), result="ok" if error is None else error
        )

    def detail(self, text: str) -> None:
        pass

    def warning(self, index: int, forward: Forward, text: str) -> None:
        self.emit("warning", forward=index, text=text)

    def lost(self, reason: str) -> None:
        self.emit("tower-lost", reason=reason)

    def still_lost(self, seconds: float, reason: str) -> None:
        self.emit("still-reconnecting", seconds=round(seconds, 1), reason=reason)

    def back(self, seconds: float) -> None:
        self.emit("reconnected", seconds=round(seconds, 3))

    def moving(self, reason: str) -> None:
        self.emit("moving", reason=reason)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
