"""The site's end of a ``connect udp`` stream: one UDP flow, one connected socket.

Wire format and rules: docs/protocol.md, "udp streams".  In short:

* the socket is created inside the service instance's network namespace and
  ``connect()``-ed to the target (:meth:`NamespaceSockets.datagram`), so the
  kernel only lets the target's replies in;
* each record the client sends (:mod:`supctl.protocol.datagrams`) becomes one
  ``send()``; one the path refuses (too big, no buffer, ICMP refused...) is
  dropped and counted, never fatal: UDP promises nothing more;
* each datagram the socket receives becomes one record on the stream only if
  the stream's credit takes the whole record now; otherwise it is dropped and
  counted.  UDP has no flow control, so waiting for credit would only build a
  queue of stale datagrams: nothing here ever holds more than the credit;
* the client's EOF, or ``idle`` seconds without a datagram either way, ends the
  flow: a CONTROL ``{"udp": {...counts...}}``, then EOF.  A stream that ends
  inside a record is reset with PROTOCOL.
"""

from __future__ import annotations

import asyncio
import math
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from supctl.enforcer.api import HandlerContext, ServiceInstance
from supctl.errors import StreamError
from supctl.link import Channel
from supctl.protocol import ErrorCode, OpenRequest
from supctl.protocol.datagrams import MAX_DATAGRAM, DatagramDecoder, encode_datagram, record_size

__all__ = ["DEFAULT_IDLE", "MAX_IDLE", "MIN_IDLE", "Counts", "UdpFlow", "UdpHandler", "parse_idle"]

#: A flow's idle timeout (seconds) unless the OPEN's ``args.idle`` sets one in range.
DEFAULT_IDLE = 60.0
MIN_IDLE, MAX_IDLE = 1, 3600
#: Datagrams read per readiness callback: a flood at line rate cannot hold the loop.
READ_BATCH = 64
#: How long the site waits for the client's EOF once it ended the flow itself (idle).
CLOSE_GRACE = 10.0

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


def parse_idle(args: Mapping[str, object]) -> float:
    """The flow's idle timeout from the OPEN's args; StreamError (PROTOCOL) if it is not
    a number of seconds in range (a bool is not a number here, nor is a string)."""
    if "idle" not in args:
        return DEFAULT_IDLE
    value = args["idle"]
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not MIN_IDLE <= value <= MAX_IDLE
    ):
        shown = repr(value)[:32]
        raise StreamError(
            f"udp: args.idle must be a number of seconds from {MIN_IDLE} to {MAX_IDLE}, not {shown}",
            code=ErrorCode.PROTOCOL,
        )
    return float(value)


@dataclass
class Counts:
    """Datagrams of one flow; ``up`` is client -> target."""

    datagrams_up: int = 0  # sent to the target
    datagrams_down: int = 0  # written to the stream
    dropped_up: int = 0  # the path refused them (EMSGSIZE, ENOBUFS, a full socket buffer, ICMP...)
    dropped_down: int = 0  # no credit for the whole record
    refused: int = 0  # ICMP port unreachable reported (on a send, which dropped it, or a receive)

    def control(self) -> dict[str, object]:
        """The flow's final CONTROL payload (the tower's audit takes the four counts)."""
        return {
            "udp": {
                "datagrams-up": self.datagrams_up,
                "datagrams-down": self.datagrams_down,
                "dropped-up": self.dropped_up,
                "dropped-down": self.dropped_down,
                "refused": self.refused,
            }
        }


class UdpFlow:
    """One stream joined to one connected UDP socket (a :class:`~supctl.link.ChannelReceiver`).

    :attr:`done` resolves once both halves are over: None, or the StreamError that
    ended the stream.  Time comes from ``clock`` (tests pass a fake one).
    """

    def __init__(self, channel: Channel, sock: socket.socket, idle: float, clock: Clock) -> None:
        self.channel = channel
        self.sock = sock
        self.idle = idle
        self.clock = clock
        self.counts = Counts()
        self.decoder = DatagramDecoder()
        self.last_activity = clock()
        self.done: asyncio.Future[StreamError | None] = asyncio.get_running_loop().create_future()
        self.ended = False  # our half: the final CONTROL and EOF are sent, the socket closed
        self._client_eof = False
        self._reading = False

    def start(self) -> None:
        """Start moving datagrams (after ``channel.accept()``)."""
        asyncio.get_running_loop().add_reader(self.sock.fileno(), self._on_readable)
        self._reading = True
        self.channel.attach(self)

    def close(self) -> None:
        """Stop reading and close the socket (idempotent)."""
        if self._reading:
            self._reading = False
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()

    def check_idle(self) -> float | None:
        """Seconds until the flow is idle; at that point end it and return None."""
        if self.ended:
            return None
        left = self.last_activity + self.idle - self.clock()
        if left <= 0:
            self.end()
            return None
        return left

    def end(self) -> None:
        """End our half: the counts, then EOF."""
        if self.ended:
            return
        self.ended = True
        self.close()
        self.channel.send_control(self.counts.control())
        self.channel.write_eof()
        if self._client_eof:
            self._resolve(None)

    async def run(self, sleep: Sleep) -> None:
        """Serve until both halves are done; raise the StreamError that ended it, if any."""
        while (left := self.check_idle()) is not None and not self.done.done():
            await self._until_done(sleep(left))
        if not self.done.done():
            await self._until_done(sleep(CLOSE_GRACE))
        if not self.done.done():
            raise StreamError("the client did not end the flow after the site did", code=ErrorCode.TIMEOUT)
        error = self.done.result()
        if error is not None:
            raise error

    async def _until_done(self, sleep: Awaitable[None]) -> None:
        timer = asyncio.ensure_future(sleep)
        waiting: set[asyncio.Future[Any]] = {timer, self.done}
        try:
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            timer.cancel()

    def _resolve(self, error: StreamError | None) -> None:
        if not self.done.done():
            self.done.set_result(error)

    # --- the socket -----------------------------------------------------------------

    def _on_readable(self) -> None:
        # The datagrams of one wake-up go as one write (one DATA frame where they fit),
        # each taken only if the credit covers it on top of those before it.
        batch = bytearray()
        for _ in range(READ_BATCH):
            try:
                payload = self.sock.recv(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionRefusedError:  # ICMP port unreachable for an earlier send
                self.counts.refused += 1
                continue
            except OSError:  # another ICMP error, reported once: nothing was received
                continue
            self.last_activity = self.clock()
            if self.channel.can_write(len(batch) + record_size(len(payload))):
                batch += encode_datagram(payload)
                self.counts.datagrams_down += 1
            else:
                self.counts.dropped_down += 1
        if batch:
            self.channel.send_nowait(bytes(batch))

    def _send(self, payload: bytes) -> None:
        try:
            self.sock.send(payload)
        except ConnectionRefusedError:
            self.counts.refused += 1
            self.counts.dropped_up += 1
        except OSError:  # EMSGSIZE, ENOBUFS, EAGAIN (the socket buffer is full), EHOSTUNREACH...
            self.counts.dropped_up += 1
        else:
            self.counts.datagrams_up += 1

    # --- the stream (ChannelReceiver) --------------------------------------------------

    def channel_data(self, data: bytes | memoryview) -> None:
        if not self.ended:
            datagrams = self.decoder.feed(data)
            if datagrams:
                self.last_activity = self.clock()
            for payload in datagrams:
                self._send(payload)
        # Credit back at once: a datagram is sent or dropped, never kept.
        self.channel.consume(len(data))

    def channel_eof(self) -> None:
        self._client_eof = True
        if not self.ended and self.decoder.pending:
            self._resolve(StreamError("the stream ended inside a datagram record", code=ErrorCode.PROTOCOL))
            return
        if self.ended:
            self._resolve(None)
        else:
            self.end()

    def channel_writable(self) -> None:
        """Nothing waits for credit: datagrams without it were dropped."""

    def channel_failed(self, error: StreamError) -> None:
        self._resolve(error)


class UdpHandler:
    """Serves ``connect`` streams of protocol ``udp``."""

    def __init__(self, clock: Clock = time.monotonic, sleep: Sleep = asyncio.sleep) -> None:
        self.clock = clock
        self.sleep = sleep

    async def handle(
        self, channel: Channel, request: OpenRequest, instance: ServiceInstance, context: HandlerContext
    ) -> None:
        idle = parse_idle(request.args)  # before anything is created or sent
        # Canonical and judged (supctl.enforcer.dispatch); never a name, as for tcp.
        host = request.ip_address or "127.0.0.1"
        sock = await context.sockets.datagram(instance.netns, host, request.port)
        flow = UdpFlow(channel, sock, idle, self.clock)
        try:
            channel.accept()
            flow.start()
            await flow.run(self.sleep)
        finally:
            flow.close()
