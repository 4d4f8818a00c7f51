"""The flows of ``connect udp --bind``, without any I/O (tested with a fake clock).

UDP has no connections: a *flow* is what the local socket saw from one peer (address,
port), and it is carried as one stream.  It ends when no datagram went either way for
``idle`` seconds.  The table is bounded (:data:`MAX_FLOWS` per forward): a datagram from
a new peer beyond the limit is dropped and counted, never queued, as a router drops.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

#: Flows of one forward at once, at most (each holds a stream and a decoder's buffer).
MAX_FLOWS = 256
#: Seconds without a datagram either way after which a flow ends (the OPEN's ``idle``).
IDLE = 60
#: Peer address and port, as the socket reports them.
Peer = tuple[str, int]


@dataclass(eq=False)
class Flow:
    """One local peer's datagrams: the counters its status line shows; also the flow's
    :class:`~supctl.client.api.Meter` (payload bytes, without the 2-byte record headers)."""

    peer: Peer
    number: int
    started: float
    last: float
    datagrams_up: int = 0
    datagrams_down: int = 0
    sent: int = 0  # payload bytes up
    received: int = 0  # payload bytes down
    dropped_up: int = 0
    dropped_down: int = 0
    stream_id: int | None = None
    open_latency: float | None = None
    remote: dict[str, int] = field(default_factory=dict)  # the site's counters, at the end
    #: Refused (a limit, a policy): kept until idle, its datagrams dropped, so that a peer
    #: that keeps sending costs one refused stream per idle period, not one per datagram.
    dead: bool = False

    def up(self, size: int) -> None:
        self.datagrams_up += 1
        self.sent += size

    def down(self, size: int) -> None:
        self.datagrams_down += 1
        self.received += size

    def counts(self) -> dict[str, int]:
        """What the closed line and event report: datagrams carried each way, and the drops
        of both ends (this one's, plus the site's own from its final CONTROL)."""
        return {
            "datagrams-up": self.datagrams_up,
            "datagrams-down": self.datagrams_down,
            "dropped-up": self.dropped_up + self.remote.get("dropped-up", 0),
            "dropped-down": self.dropped_down + self.remote.get("dropped-down", 0),
        }


def remote_counts(payload: dict[str, object]) -> dict[str, int]:
    """The site's counters from its CONTROL ``{"udp": {...}}`` (anything else ignored: a
    hostile or newer site must not break the status)."""
    udp = payload.get("udp")
    if not isinstance(udp, dict):
        return {}
    return {
        name: value
        for name, value in udp.items()
        if name in ("datagrams-up", "datagrams-down", "dropped-up", "dropped-down")
        and isinstance(value, int)
        and not isinstance(value, bool)
        and 0 <= value < 2**63
    }


class FlowTable:
    """The live flows of one forward by peer, with their idle deadlines."""

    def __init__(
        self, idle: float, clock: Callable[[], float] = time.monotonic, limit: int = MAX_FLOWS
    ) -> None:
        self.idle = idle
        self.clock = clock
        self.limit = limit
        self.flows: dict[Peer, Flow] = {}
        self.refused = 0  # datagrams dropped because the table was full
        self._numbers = 0

    def __len__(self) -> int:
        return len(self.flows)

    def get(self, peer: Peer) -> Flow | None:
        return self.flows.get(peer)

    def full(self) -> bool:
        return len(self.flows) >= self.limit

    def add(self, peer: Peer) -> Flow | None:
        """A new flow for ``peer``, or None (counted in :attr:`refused`) when the table is full."""
        if self.full():
            self.refused += 1
            return None
        now = self.clock()
        self._numbers += 1
        flow = self.flows[peer] = Flow(peer, self._numbers, now, now)
        return flow

    def touch(self, flow: Flow) -> None:
        """A datagram went through ``flow``, either way: its idle time starts over."""
        flow.last = self.clock()

    def remove(self, flow: Flow) -> None:
        if self.flows.get(flow.peer) is flow:
            del self.flows[flow.peer]

    def expired(self) -> list[Flow]:
        """The flows idle for ``idle`` seconds or more, removed from the table (a later
        datagram from the same peer starts a new flow)."""
        now = self.clock()
        done = [flow for flow in self.flows.values() if now - flow.last >= self.idle]
        for flow in done:
            del self.flows[flow.peer]
        return done

    def next_expiry(self) -> float | None:
        """When the next flow expires (clock time), None without flows."""
        return min((flow.last + self.idle for flow in self.flows.values()), default=None)


class Throttle:
    """At most one line per ``every`` seconds about a counter; the line says how many
    events happened since the last one (the datagrams a full table refused)."""

    def __init__(self, every: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.every = every
        self.clock = clock
        self._said_at: float | None = None
        self._said = 0

    def due(self, count: int) -> int | None:
        """The events since the last line if a line is due now, else None."""
        now = self.clock()
        if self._said_at is not None and now - self._said_at < self.every:
            return None
        self._said_at = now
        new, self._said = count - self._said, count
        return new
