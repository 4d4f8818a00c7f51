"""What ``connect --bind`` knows about its connections, without any I/O (tested in memory).

The byte counters have one owner, the stream's :class:`~supctl.link.Channel`; a
:class:`Meter` reads them through.  This model only samples them, on each tick of the
clock it is given, to derive the current rate of each connection (bytes over the last
:data:`RATE_WINDOW` seconds), and formats what the renderers (:mod:`.render`) show:
human units (SI, as ``209.7 MB``), ages and the line of a finished connection.
"""

from __future__ import annotations

import datetime
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from supctl.client.api import Meter

#: The current rate is measured over this many seconds of samples.
RATE_WINDOW = 2.0
#: Samples kept per connection, at most (the ticks may come faster than expected).
MAX_SAMPLES = 64

_UNITS = ("B", "kB", "MB", "GB", "TB", "PB")


def human_bytes(count: float) -> str:
    """``812 B``, ``1.5 kB``, ``209.7 MB``: SI units (1 MB = 10^6 B), as network rates are."""
    if count < 1000:
        return f"{count:.0f} B"
    for unit in _UNITS[1:]:
        count /= 1000
        if count < 999.95 or unit == _UNITS[-1]:
            return f"{count:.1f} {unit}"
    raise AssertionError("unreachable")


def human_rate(per_second: float) -> str:
    return f"{human_bytes(per_second)}/s"


def human_seconds(seconds: float) -> str:
    """``0.4 s``, ``6.5 s``, ``3m05s``, ``2h07m``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


@dataclass
class Connection:
    """One open local connection of a forward."""

    forward: str
    number: int
    peer: str
    meter: Meter
    started: float
    samples: deque[tuple[float, int, int]] = field(default_factory=lambda: deque(maxlen=MAX_SAMPLES))

    def sample(self, now: float) -> None:
        self.samples.append((now, self.meter.sent, self.meter.received))
        while len(self.samples) > 2 and now - self.samples[1][0] >= RATE_WINDOW:
            self.samples.popleft()  # keep one sample at or before the window's start

    def rates(self) -> tuple[float, float]:
        """Bytes per second (sent, received) over the sampled window; 0 before two samples."""
        if len(self.samples) < 2:
            return 0.0, 0.0
        (t0, s0, r0), (t1, s1, r1) = self.samples[0], self.samples[-1]
        span = t1 - t0
        if span <= 0:
            return 0.0, 0.0
        return (s1 - s0) / span, (r1 - r0) / span


@dataclass(frozen=True)
class Totals:
    connections: int
    sent: int
    received: int
    rate_sent: float
    rate_received: float


class StatusModel:
    """The open connections of every forward, with rates from a sampled clock.

    ``clock`` is monotonic seconds (a test passes a fake one); :meth:`tick` samples every
    open connection and is called by the renderer before each redraw."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.open: dict[tuple[int, int], Connection] = {}  # by (forward's position, number)
        self.finished = 0
        self.finished_sent = 0
        self.finished_received = 0

    def opened(self, index: int, forward: str, number: int, peer: str, meter: Meter) -> Connection:
        """Connection ``number`` of forward ``index`` (its position; ``forward`` its label)."""
        now = self.clock()
        connection = Connection(forward, number, peer, meter, now)
        connection.sample(now)
        self.open[(index, number)] = connection
        return connection

    def closed(self, index: int, number: int, sent: int, received: int) -> Connection | None:
        self.finished += 1
        self.finished_sent += sent
        self.finished_received += received
        return self.open.pop((index, number), None)

    def tick(self) -> None:
        now = self.clock()
        for connection in self.open.values():
            connection.sample(now)

    def age(self, connection: Connection) -> float:
        return self.clock() - connection.started

    def totals(self) -> Totals:
        """Open connections, bytes of all connections so far (finished ones included) and
        the current rates of the open ones."""
        sent, received = self.finished_sent, self.finished_received
        rate_sent = rate_received = 0.0
        for connection in self.open.values():
            sent += connection.meter.sent
            received += connection.meter.received
            up, down = connection.rates()
            rate_sent += up
            rate_received += down
        return Totals(len(self.open), sent, received, rate_sent, rate_received)


def clock_time(now: Callable[[], datetime.datetime] | None = None) -> str:
    """``09:14:03``: local wall time, the stamp of every human line."""
    return (now or datetime.datetime.now)().strftime("%H:%M:%S")


def closed_text(
    sent: int, received: int, seconds: float, peer: str, counts: Mapping[str, int] | None = None
) -> str:
    """The summary of a finished connection: ``1000000 B sent, 2000 B received in 6.5 s
    (1.0 MB at 154.1 kB/s, from 127.0.0.1:53122)``; exact counts first (scripts grep
    them), then human units.  A protocol's ``counts`` follow (``datagrams-up 3, ...``)."""
    total = sent + received
    rate = total / seconds if seconds > 0 else 0.0
    extra = "".join(f", {name} {value}" for name, value in (counts or {}).items())
    return (
        f"{sent} B sent, {received} B received in {seconds:.1f} s"
        f" ({human_bytes(total)} at {human_rate(rate)}, from {peer}{extra})"
    )


def stream_detail(meter: Meter | None) -> str:
    """``-v``: ``stream 5, accepted in 12 ms`` (what the session did for a connection)."""
    if meter is None or meter.stream_id is None:
        return "no stream"
    latency = meter.open_latency
    accepted = f"accepted in {latency * 1000:.0f} ms" if latency is not None else "not accepted"
    return f"stream {meter.stream_id}, {accepted}"
