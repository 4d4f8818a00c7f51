"""``connect udp --bind``: one local UDP socket, a stream per local peer.

Datagrams from a peer go into its flow's stream as records
(:mod:`supctl.protocol.datagrams`), each only if the stream's credit takes the whole
record now; otherwise it is dropped and counted, as a router drops when its queue is full
(UDP has no flow control, so waiting would only build an unbounded queue).  Replies are
decoded from the stream, their credit given back at once, and sent to the peer; if the
local socket's send buffer is full they are dropped and counted too.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable
from typing import Any, cast

from supctl.client.api import BindAddress, Reporter, Streams
from supctl.errors import StreamError
from supctl.link import Channel
from supctl.protocol import ErrorCode
from supctl.protocol.datagrams import MAX_DATAGRAM, DatagramDecoder, encode_datagram, record_size

from .flows import IDLE, MAX_FLOWS, Flow, FlowTable, Peer, Throttle, remote_counts

#: Seconds between two looks at the flows' idle times (the precision of ``--idle``).
TICK = 0.25
#: Seconds a flow waits for the site's end (its counters and EOF) after ours, then resets.
CLOSE_WAIT = 5.0
#: Bytes the local socket may hold back for peers before replies are dropped.
MAX_SEND_BUFFER = 1024 * 1024
#: Refusals of a flow's stream that another try at once would only repeat.
REFUSALS = frozenset({ErrorCode.LIMIT, ErrorCode.DENIED})
#: At most one line every this many seconds about datagrams dropped for want of a flow.
WARN_EVERY = 10.0


class _FlowReceiver:
    """A flow's stream, downstream: records to datagrams to the peer."""

    def __init__(self, relay: UdpRelay, flow: Flow, channel: Channel) -> None:
        self.relay = relay
        self.flow = flow
        self.channel = channel
        self.decoder = DatagramDecoder()

    def channel_data(self, data: bytes | memoryview) -> None:
        datagrams = self.decoder.feed(data)
        self.channel.consume(len(data))  # never held here: a reply is sent or dropped now
        relay, flow = self.relay, self.flow
        for datagram in datagrams:
            relay.send_down(flow, datagram)

    def channel_eof(self) -> None:
        self.relay.finish(self.flow, self.channel, None)

    def channel_writable(self) -> None:
        pass  # nothing waits for credit: a datagram without it was dropped

    def channel_failed(self, error: StreamError) -> None:
        self.relay.finish(self.flow, self.channel, error)


class UdpRelay(asyncio.DatagramProtocol):
    """The flows of one local UDP socket; :meth:`run` ends idle flows until cancelled."""

    def __init__(
        self,
        streams: Streams,
        reporter: Reporter,
        *,
        idle: float = IDLE,
        limit: int = MAX_FLOWS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.streams = streams
        self.reporter = reporter
        self.clock = clock
        self.table = FlowTable(idle, clock, limit)
        self.channels: dict[Flow, Channel] = {}  # every flow with a stream, ending ones too
        self.ending: dict[Flow, float] = {}  # flows whose EOF we sent: when to give up waiting
        self.stopping = False
        self.no_session = 0  # datagrams dropped while the session was being re-opened
        self.refused_lines = Throttle(WARN_EVERY, clock)
        self.no_session_lines = Throttle(WARN_EVERY, clock)
        self.transport: asyncio.DatagramTransport | None = None
        self.sock: socket.socket | None = None  # the transport's, for empty datagrams
        self.tasks: set[asyncio.Task[None]] = set()
        self.pending: dict[Flow, bytearray] = {}  # records of this loop turn, by flow
        self._flush_scheduled = False

    # --- the local socket ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's UDPTransport is not a subclass of asyncio's, only alike.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP errors of earlier sendto()s (port unreachable): the peer went away

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        peer: Peer = (str(addr[0]), int(addr[1]))
        flow = self.table.get(peer)
        if flow is None:
            flow = self._new_flow(peer)
            if flow is None:
                return
        if flow.dead:  # refused: not touched, so the peer may try again once it is idle
            flow.dropped_up += 1
            return
        channel = self.channels[flow]
        self.table.touch(flow)
        if len(data) > MAX_DATAGRAM:  # not over UDP, but the record could not say it
            flow.dropped_up += 1
            return
        # The records of one loop turn go as one DATA frame per flow (see flush); the
        # credit is checked against what is already waiting, so nothing waits beyond it.
        pending = self.pending.get(flow)
        if not channel.can_write((len(pending) if pending is not None else 0) + record_size(len(data))):
            flow.dropped_up += 1
            return
        if pending is None:
            self.pending[flow] = bytearray(encode_datagram(data))
            if not self._flush_scheduled:
                self._flush_scheduled = True
                asyncio.get_running_loop().call_soon(self.flush)
        else:
            pending += encode_datagram(data)
        flow.up(len(data))

    def flush(self) -> None:
        """Send the records that came in this loop turn: a DATA frame per flow, not per
        datagram (bench/udp.py: about 20% more datagrams/s through the chain)."""
        self._flush_scheduled = False
        pending, self.pending = self.pending, {}
        for flow, records in pending.items():
            channel = self.channels.get(flow)
            if channel is not None:
                channel.send_nowait(memoryview(records))  # within the credit checked as they came

    def _new_flow(self, peer: Peer) -> Flow | None:
        if self.stopping or self.table.full():
            self.table.add(peer)  # counts the refusal
            self._warn_refused()
            return None
        try:
            channel = self.streams.open_now()
        except StreamError:
            channel = None
        if channel is None:  # the session is being re-opened: a datagram does not wait
            self.no_session += 1
            if new := self.no_session_lines.due(self.no_session):
                self.reporter.warning(
                    f"no session with the tower: {new} datagram(s) dropped ({self.no_session} in all)"
                )
            return None
        flow = self.table.add(peer)
        assert flow is not None
        flow.stream_id = channel.id
        self.channels[flow] = channel
        opened_at = self.clock()

        def accepted(future: asyncio.Future[None]) -> None:
            if not future.cancelled() and future.exception() is None:
                flow.open_latency = self.clock() - opened_at

        channel.accepted.add_done_callback(accepted)
        self.reporter.opened(flow.number, str(BindAddress(*peer)), flow)
        channel.attach(_FlowReceiver(self, flow, channel))
        return flow

    def _warn_refused(self) -> None:
        new = self.refused_lines.due(self.table.refused)
        if new:
            self.reporter.warning(
                f"{self.table.limit} flows are open: {new} datagram(s) from new peers dropped"
                f" ({self.table.refused} in all)"
            )

    def send_down(self, flow: Flow, datagram: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            flow.dropped_down += 1
            return
        # Not in typeshed's DatagramTransport, but asyncio's and uvloop's have it.
        if transport.get_write_buffer_size() > MAX_SEND_BUFFER:  # type: ignore[attr-defined]
            flow.dropped_down += 1  # the peer does not read: drop, as the kernel would
            return
        if datagram:
            transport.sendto(datagram, flow.peer)
        else:  # asyncio's and uvloop's sendto() skip an empty datagram: the socket sends it
            try:
                self.sock.sendto(datagram, flow.peer)  # type: ignore[union-attr]
            except OSError:
                flow.dropped_down += 1
                return
        flow.down(len(datagram))
        self.table.touch(flow)

    # --- the ends of flows ---------------------------------------------------------

    def tick(self) -> None:
        """End the flows idle for too long (our EOF; the site answers with its counters and
        its EOF), and reset those whose site did not answer within :data:`CLOSE_WAIT`."""
        now = self.clock()
        for flow in self.table.expired():
            channel = self.channels.get(flow)
            if channel is not None:
                self.ending[flow] = now + CLOSE_WAIT
                channel.write_eof()
        for flow, deadline in list(self.ending.items()):
            if now >= deadline and flow in self.channels:
                channel = self.channels[flow]
                channel.reset(ErrorCode.CANCEL, "the flow ended")
                self.finish(flow, channel, None)

    def finish(self, flow: Flow, channel: Channel, error: StreamError | None) -> None:
        """The flow's stream is over (the site's EOF, a reset or a lost session): report it,
        with the site's counters once its CONTROL is read."""
        self.flush()  # what came before the end goes before our EOF
        if self.channels.pop(flow, None) is None:
            return
        if error is not None and error.code in REFUSALS and not self.stopping:
            flow.dead = True  # stays in the table until idle (FlowTable.expired drops it)
        else:
            self.table.remove(flow)
        self.ending.pop(flow, None)
        if error is None:
            channel.write_eof()  # the site ended first (its idle timeout): end ours too
        task = asyncio.ensure_future(self._report(flow, channel, error))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _report(self, flow: Flow, channel: Channel, error: StreamError | None) -> None:
        # The site's CONTROL comes before its EOF: it is already here if it was sent.
        with contextlib.suppress(StreamError, TimeoutError):
            flow.remote = remote_counts(await asyncio.wait_for(channel.read_control(), 0.1))
        failure = str(error) if error is not None and not self.stopping else None
        seconds = self.clock() - flow.started
        self.reporter.closed(flow.number, flow.sent, flow.received, seconds, failure, flow.counts())

    async def run(self) -> None:
        while True:
            self.tick()
            await asyncio.sleep(TICK)  # the pace of the idle check, not a synchronisation

    def stop(self) -> None:
        """supctl stops: reset every flow's stream (closed, not failed)."""
        self.stopping = True
        for flow, channel in list(self.channels.items()):
            channel.reset(ErrorCode.CANCEL, "supctl is stopping")
            self.finish(flow, channel, None)


class UdpListener:
    """The :class:`~supctl.client.api.Listener` of a ``connect udp`` forward."""

    def __init__(self, idle: float = IDLE, limit: int = MAX_FLOWS) -> None:
        self.idle = idle
        self.limit = limit

    async def serve(
        self,
        streams: Streams,
        bind: BindAddress,
        ready: Callable[[BindAddress], None],
        reporter: Reporter,
    ) -> None:
        loop = asyncio.get_running_loop()
        relay = UdpRelay(streams, reporter, idle=self.idle, limit=self.limit)
        family = socket.AF_INET6 if ":" in bind.host else socket.AF_INET
        sock = relay.sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.bind((bind.host, bind.port))
            sock.setblocking(False)
            transport, _ = await loop.create_datagram_endpoint(lambda: relay, sock=sock)
        except BaseException:
            sock.close()
            raise
        try:
            sockname = sock.getsockname()
            ready(BindAddress(bind.host, int(sockname[1])))
            await relay.run()
        finally:
            relay.stop()
            if relay.tasks:
                await asyncio.wait(relay.tasks, timeout=1.0)
            transport.close()
