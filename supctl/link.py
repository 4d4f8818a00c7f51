"""The thin asyncio layer around the sans-I/O :class:`~supctl.protocol.Connection`.

A :class:`Link` is one WebSocket plus one Connection: a reader loop feeds
messages in, a writer task sends whatever the connection queued.  supctl and
the enforcer use :class:`Channel` objects (one per stream, an async byte pipe);
the tower subclasses Link to relay events between two links without channels.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Mapping
from typing import Protocol

from websockets.exceptions import ConnectionClosed as WsClosed
from websockets.protocol import State as WsState

from .errors import StreamError
from .protocol import (
    Connection,
    ConnectionClosed,
    ControlReceived,
    DataReceived,
    EndOfStream,
    ErrorCode,
    Event,
    GoawayReceived,
    HelloReceived,
    OpenRequest,
    StatusReceived,
    StreamAccepted,
    StreamOpened,
    StreamReset,
    WindowUpdated,
)
from .protocol.frames import CLOSE_CODE_BASE
from .wsconn import Message, Sink

log = logging.getLogger(__name__)

#: Bytes read from a local socket at once; a DATA frame carries at most 256 KiB.
READ_SIZE = 256 * 1024


class WebSocketLike(Protocol):
    """What Link needs of a websockets connection (client or server side)."""

    async def send(self, message: bytes) -> None: ...
    async def recv(self) -> str | bytes: ...
    async def close(self, code: int = 1000, reason: str = "") -> None: ...


class Link:
    """One WebSocket carrying one multiplexed :class:`Connection`."""

    def __init__(self, ws: WebSocketLike, conn: Connection, name: str) -> None:
        self.ws = ws
        self.conn = conn
        self.name = name
        self.channels: dict[int, Channel] = {}
        self.lost_reason = ""
        self.ended = False  # the WebSocket is closed or lost: nothing more goes through
        self.lost_code: int | None = None  # the close code the peer sent, if it sent one
        self.going_away: str | None = None  # the reason of the peer's GOAWAY, once it sent one
        self.goaway = asyncio.Event()
        self.emptied = asyncio.Event()  # set while no channel is open (see forget)
        self.emptied.set()
        self._wakeup = asyncio.Event()
        self._closing = False
        self._flush_scheduled = False
        self._loop = asyncio.get_running_loop()
        self.task: asyncio.Task[None] | None = None
        self._stopped: asyncio.Future[None] = self._loop.create_future()

    def start(self) -> asyncio.Task[None]:
        """Run the link in the background; ``self.task`` ends when the link is lost."""
        self.task = asyncio.create_task(self.run(), name=f"{self.name}-link")
        return self.task

    # --- driving -------------------------------------------------------------

    def flush(self) -> None:
        """Send what the connection queued, once per loop turn; cheap to call after
        every action (all actions of one turn go out as one WebSocket message)."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush_now)

    def _flush_now(self) -> None:
        self._flush_scheduled = False
        if not self._send_directly():
            self._wakeup.set()

    def _send_directly(self) -> bool:
        """Hand queued frames to websockets' sans-I/O protocol without a task switch.

        Only while the connection is open and the transport is not pushing back;
        otherwise the writer task sends them, awaiting websockets' drain.  Order is
        kept either way: both take frames from the same queue and hand them to the
        same protocol object synchronously.  Saves a task switch and an async
        context manager per message (bench: about +7% new connections/s).  Uses
        websockets' ``protocol``, ``paused`` and ``send_data`` (pinned < 18).
        """
        ws = self.ws
        protocol = getattr(ws, "protocol", None)
        if (
            protocol is None
            or protocol.state is not WsState.OPEN
            or getattr(ws, "paused", True)
            or self.conn.closed is not None
        ):
            return False
        sent = False
        while data := self.conn.data_to_send():
            protocol.send_binary(data)
            sent = True
        if sent:
            # supctl.wsconn's send_pending writes all frames at once; websockets' own
            # send_data writes them one by one.
            send = getattr(ws, "send_pending", None) or ws.send_data  # type: ignore[attr-defined]
            send()
        return True

    async def run(self) -> None:
        """Serve the link until the WebSocket closes; never raises for peer faults."""
        writer = asyncio.create_task(self._writer(), name=f"{self.name}-writer")
        try:
            attach = getattr(self.ws, "attach", None)
            if attach is not None:
                await self._run_attached(attach)
            else:
                await self._run_recv()
        except WsClosed as exc:
            self.lost_reason = _close_text(exc)
            self.lost_code = exc.rcvd.code if exc.rcvd is not None else None
        except (OSError, asyncio.IncompleteReadError) as exc:
            self.lost_reason = str(exc) or type(exc).__name__
        finally:
            if self.conn.closed is not None and not self.lost_reason:
                self.lost_reason = self.conn.closed.reason
            await self._finish(writer)

    async def _run_attached(self, attach: Callable[[Sink], None]) -> None:
        # Messages arrive synchronously in the protocol's data_received (supctl.wsconn):
        # no queue, no task switch per message.  This task only waits for the end.
        attach(self._on_message)
        closed = asyncio.ensure_future(self.ws.wait_closed())  # type: ignore[attr-defined]
        try:
            await asyncio.wait({closed, self._stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
        if self.conn.closed is None:
            raise self.ws.close_exc  # type: ignore[attr-defined]

    def _on_message(self, message: Message, is_text: bool) -> None:
        conn = self.conn
        if conn.closed is not None:
            return
        try:
            if is_text:
                self._close(conn.close(ErrorCode.PROTOCOL, "text message on a binary protocol"))
            else:
                # websockets builds a new buffer per message and forgets it: ours to keep.
                for event in conn.receive_data(message, owned=True):
                    self.handle_event(event)
        except Exception:  # a bug must not escape into websockets' data_received
            log.exception("%s: failed to handle a message", self.name)
            self._close(conn.close(ErrorCode.INTERNAL, "internal error"))
        if conn.closed is not None:
            if not self._stopped.done():
                self._stopped.set_result(None)
        else:
            self.flush()

    async def _run_recv(self) -> None:
        # For WebSocket objects without attach() (the in-memory ones of the unit tests).
        while self.conn.closed is None:
            message = await self.ws.recv()
            if isinstance(message, str):
                self._on_message(b"", True)
            else:
                self._on_message(message, False)

    async def _writer(self) -> None:
        conn, ws = self.conn, self.ws
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while data := conn.data_to_send():
                await ws.send(data)
            if conn.closed is not None:
                await ws.close(conn.closed.close_code, conn.closed.reason)
                return

    async def _finish(self, writer: asyncio.Task[None]) -> None:
        self.ended = True
        if self.conn.closed is not None:
            # Let the writer flush the frames queued before the close, then close.
            self.flush()
            with contextlib.suppress(asyncio.TimeoutError, WsClosed, OSError):
                await asyncio.wait_for(asyncio.shield(writer), 5)
        writer.cancel()
        # asyncio.wait, not `await writer` under suppress(CancelledError): that would also
        # swallow a cancellation of *this* task arriving meanwhile (the enforcer's SIGTERM).
        await asyncio.wait({writer})
        failure = None if writer.cancelled() else writer.exception()
        if failure is not None and not isinstance(failure, (WsClosed, OSError)):
            raise failure
        with contextlib.suppress(WsClosed, OSError):
            await self.ws.close()
        self.on_lost(self.lost_reason or "connection closed")

    def close(self, code: ErrorCode = ErrorCode.CANCEL, reason: str = "closing") -> None:
        """Close the link from this side (flushes what is queued first)."""
        self._close(self.conn.close(code, reason))

    async def aclose(
        self, code: ErrorCode = ErrorCode.CANCEL, reason: str = "closing", timeout: float = 5.0
    ) -> None:
        """Close and wait (bounded) until the link is down."""
        self.close(code, reason)
        if self.task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.task, timeout)

    def _close(self, closed: ConnectionClosed) -> None:
        self._closing = True
        self.flush()

    # --- events --------------------------------------------------------------

    def handle_event(self, event: Event) -> None:
        """Dispatch one event; subclasses override for relaying or accepting."""
        if isinstance(event, StreamOpened):
            self.on_stream_opened(event)
            return
        if isinstance(event, HelloReceived):
            self.on_hello(event.payload)
            return
        if isinstance(event, StatusReceived):
            self.on_status(event.payload)
            return
        if isinstance(event, GoawayReceived):
            self.on_goaway(event.payload)
            return
        if isinstance(event, ConnectionClosed):
            self._close(event)
            return
        channel = self.channels.get(event.stream_id)
        if channel is None:
            return
        if isinstance(event, DataReceived):
            channel._feed(event.data)
        elif isinstance(event, WindowUpdated):
            channel._on_writable()
        elif isinstance(event, ControlReceived):
            channel._feed_control(event.payload, event.size)
        elif isinstance(event, EndOfStream):
            channel._feed_eof()
        elif isinstance(event, StreamAccepted):
            channel._on_writable()  # the real window replaces EARLY_DATA
            if not channel.accepted.done():
                channel.accepted.set_result(None)
        elif isinstance(event, StreamReset):
            channel._fail(StreamError(event.text or event.code.name.lower(), code=event.code))

    def on_stream_opened(self, event: StreamOpened) -> None:
        # Only links that accept streams (the enforcer's) override this; the core
        # already refuses OPEN on links that must not receive them.
        self.conn.reset_stream(event.stream_id, ErrorCode.UNSUPPORTED, "this end does not accept streams")

    def on_hello(self, payload: dict[str, object]) -> None:
        """Called for the HELLO frame on links that accept one."""

    def on_status(self, payload: dict[str, object]) -> None:
        """Called for each STATUS frame (site updates after HELLO)."""

    def on_goaway(self, payload: dict[str, object]) -> None:
        """The peer drains (GOAWAY, on links that accept one): ``going_away`` is set and
        ``goaway`` fires; the streams open here go on, new ones belong elsewhere."""
        reason = payload.get("reason")
        self.going_away = reason if isinstance(reason, str) and reason else "the tower is going away"
        self.goaway.set()

    def forget(self, stream_id: int) -> None:
        """A channel is done; :attr:`emptied` fires when the last one is."""
        self.channels.pop(stream_id, None)
        if not self.channels:
            self.emptied.set()

    def on_lost(self, reason: str) -> None:
        error = StreamError(f"link lost: {reason}", code=ErrorCode.LINK_LOST)
        for channel in list(self.channels.values()):
            channel._fail(error)
        self.channels.clear()
        self.emptied.set()

    # --- channels ------------------------------------------------------------

    def open_channel_now(self, request: OpenRequest) -> Channel:
        """Open a stream without waiting for the far end: the first EARLY_DATA bytes
        may be written at once, and a refusal surfaces as StreamError from the
        channel (read, write, or a receiver's ``channel_failed``).  Raises StreamError
        if the link is down."""
        if self.conn.closed is not None or self._closing:
            raise StreamError(f"link lost: {self.lost_reason or 'closed'}", code=ErrorCode.LINK_LOST)
        channel = Channel(self, self.conn.open_stream(request))
        self.channels[channel.id] = channel
        self.emptied.clear()
        self.flush()
        return channel

    async def open_channel(self, request: OpenRequest, *, wait: bool = True) -> Channel:
        """Open a stream; with ``wait``, return once the far end accepted it (or raise
        StreamError); without, the same as :meth:`open_channel_now`."""
        channel = self.open_channel_now(request)
        if not wait:
            return channel
        try:
            await channel.wait_accepted()
        except BaseException:
            channel.reset(ErrorCode.CANCEL, "cancelled")
            raise
        return channel

    def adopt_channel(self, stream_id: int) -> Channel:
        """Wrap a stream the peer opened; call ``accept()`` on it to answer."""
        channel = Channel(self, stream_id)
        self.channels[stream_id] = channel
        self.emptied.clear()
        return channel


class ChannelReceiver(Protocol):
    """Takes a channel's events as they arrive, instead of ``read()`` (see :meth:`Channel.attach`).

    Called synchronously from the link's message dispatch: must not block or raise.
    """

    def channel_data(self, data: bytes | memoryview) -> None:
        """Bytes of the stream; give credit back with :meth:`Channel.consume` once done with them."""

    def channel_eof(self) -> None:
        """The far end half-closed: no more data."""

    def channel_writable(self) -> None:
        """Send credit arrived (:meth:`Channel.send_nowait` can take more)."""

    def channel_failed(self, error: StreamError) -> None:
        """The stream was reset or the link was lost; nothing more will come."""


class Channel:
    """One stream as an async byte pipe with flow control, or (with a
    :class:`ChannelReceiver` attached) as callbacks, for protocol-based bridges."""

    def __init__(self, link: Link, stream_id: int) -> None:
        self.link = link
        self.id = stream_id
        self.accepted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.bytes_in = 0
        self.bytes_out = 0
        self.buffered = 0  # received, not yet read: bounded by our window
        self.peak_buffered = 0
        self.error: StreamError | None = None
        self._buffer: deque[bytes] = deque()
        self._eof = False
        self._eof_sent = False
        self._eof_deferred = False  # write_eof() before accept()
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        # Unread CONTROL messages with their wire size, reported read to the connection
        # (its ControlBound, where the link opted in, caps this queue).
        self._controls: deque[tuple[dict[str, object], int]] = deque()
        self._control_ready = asyncio.Event()
        self._receiver: ChannelReceiver | None = None

    def attach(self, receiver: ChannelReceiver) -> None:
        """Hand every later event (and the data, EOF or error already here) to ``receiver``."""
        self._receiver = receiver
        while self._buffer:
            data = self._buffer.popleft()
            self.buffered -= len(data)
            receiver.channel_data(data)
        if self.error is not None:
            receiver.channel_failed(self.error)
        elif self._eof:
            receiver.channel_eof()

    # --- fed by the link -----------------------------------------------------

    def _feed(self, data: bytes | memoryview) -> None:
        if self._receiver is not None:
            # A view of the (immutable) message: a transport's write copies if it must.
            self.bytes_in += len(data)
            self._receiver.channel_data(data)
            return
        # The endpoint's one copy; read() hands out bytes, the API handlers expect.
        data = bytes(data)
        self._buffer.append(data)
        self.bytes_in += len(data)
        self.buffered += len(data)
        self.peak_buffered = max(self.peak_buffered, self.buffered)
        self._readable.set()

    def _feed_eof(self) -> None:
        self._eof = True
        self._readable.set()
        self._maybe_forget()
        if self._receiver is not None:
            self._receiver.channel_eof()

    def _on_writable(self) -> None:
        self._writable.set()
        if self._receiver is not None:
            self._receiver.channel_writable()

    def _feed_control(self, payload: dict[str, object], size: int) -> None:
        self._controls.append((payload, size))
        self._control_ready.set()

    def _fail(self, error: StreamError) -> None:
        if self.error is None:
            self.error = error
        self._control_ready.set()
        if not self.accepted.done():
            self.accepted.set_exception(error)
            self.accepted.exception()  # mark retrieved: nobody may be waiting
        self._readable.set()
        self._writable.set()
        self.link.forget(self.id)
        if self._receiver is not None:
            receiver, self._receiver = self._receiver, None
            receiver.channel_failed(self.error or error)

    # --- used by handlers and backends ---------------------------------------

    async def wait_accepted(self) -> None:
        await self.accepted

    def accept(self) -> None:
        if self.error is not None:  # reset (or link lost) while the handler was connecting
            raise self.error
        self.link.conn.accept_stream(self.id)
        self.accepted.set_result(None)
        self.link.flush()
        self._on_writable()  # a receiver may hold bytes that waited for the ACCEPT
        if self._eof_deferred:
            self._eof_deferred = False
            self.write_eof()

    async def read(self) -> bytes:
        """Next chunk of bytes; ``b""`` at EOF; raises StreamError when reset."""
        while not self._buffer:
            if self.error is not None:
                raise self.error
            if self._eof:
                return b""
            self._readable.clear()
            await self._readable.wait()
        data = self._buffer.popleft()
        self.buffered -= len(data)
        self.link.conn.consumed(self.id, len(data))
        self.link.flush()
        return data

    def consume(self, size: int) -> None:
        """Give ``size`` bytes of credit back (a receiver is done with them)."""
        if self.error is None and size:
            self.link.conn.consumed(self.id, size)
            self.link.flush()

    def can_write(self, size: int) -> bool:
        """True if :meth:`send_nowait` would take ``size`` bytes whole, now.

        For messages that must not be cut and must not wait (a datagram record):
        the caller drops what does not fit instead of queueing it, so nothing here
        ever holds more than the credit the far end granted.
        """
        # send_credit is 0 for a stream that is gone, not accepted yet, or half-closed by us.
        return self.error is None and self.link.conn.send_credit(self.id) >= size

    def send_nowait(self, data: bytes | memoryview) -> int:
        """Send as much of ``data`` as the credit allows; return how much that was.

        0 once the stream cannot carry data any more (a receiver learns why from
        ``channel_failed``)."""
        conn = self.link.conn
        if self.error is not None or self._eof_sent or not conn.is_open(self.id):
            return 0
        size = min(conn.send_credit(self.id), len(data))
        if size:
            conn.send_data(self.id, data[:size] if size < len(data) else data)
            self.bytes_out += size
            self.link.flush()
        return size

    async def write(self, data: bytes) -> None:
        """Send ``data``, waiting for credit as the far end consumes."""
        conn = self.link.conn
        view = memoryview(data)
        while view:
            if self.error is not None:
                raise self.error
            credit = conn.send_credit(self.id)
            if not credit:
                if not conn.is_open(self.id):
                    raise StreamError("stream closed", code=ErrorCode.CANCEL)
                self._writable.clear()
                await self._writable.wait()
                continue
            size = min(credit, len(view))
            conn.send_data(self.id, view[:size])
            view = view[size:]
            self.bytes_out += size
            self.link.flush()

    def send_control(self, payload: Mapping[str, object]) -> None:
        """Send a small JSON object ahead of queued data (a signal, an exit status)."""
        if self.error is None and self.link.conn.is_open(self.id):
            self.link.conn.send_control(self.id, payload)
            self.link.flush()

    async def read_control(self) -> dict[str, object]:
        """Next CONTROL message; raises StreamError once the stream is reset or lost."""
        while not self._controls:
            if self.error is not None:
                raise self.error
            self._control_ready.clear()
            await self._control_ready.wait()
        payload, size = self._controls.popleft()
        self.link.conn.control_consumed(self.id, size)
        return payload

    def write_eof(self) -> None:
        if self.error is None and not self._eof_sent and self.link.conn.is_open(self.id):
            if self.link.conn.is_pending(self.id):
                # An acceptor cannot half-close before its ACCEPT: the EOF goes with it.
                self._eof_deferred = True
                return
            self._eof_sent = True
            self.link.conn.send_eof(self.id)
            self.link.flush()
            self._maybe_forget()

    def reset(self, code: ErrorCode, text: str = "") -> None:
        if self.error is None:
            self.error = StreamError(text or code.name.lower(), code=code)
        self.link.conn.reset_stream(self.id, code, text)
        self.link.forget(self.id)
        self.link.flush()

    def _maybe_forget(self) -> None:
        if self._eof and self._eof_sent:
            self.link.forget(self.id)


#: What a close without a reason means, in words (RFC 6455 codes a peer sends bare).
CLOSE_TEXTS = {
    1000: "closed by the other end",
    1001: "the other end is going away (shutting down or restarting)",
    1006: "connection dropped",
    1008: "the other end refused a message (policy violation)",
    1009: "the other end refused a message that was too big",
    1011: "internal error at the other end",
    1012: "the other end is restarting",
    1013: "the other end is overloaded; try again later",
}


def _close_text(exc: WsClosed) -> str:
    frame = exc.rcvd or exc.sent
    if frame is None:
        return "connection dropped"
    if frame.reason:
        return frame.reason
    if frame.code in CLOSE_TEXTS:
        return CLOSE_TEXTS[frame.code]
    try:  # 4000 + ErrorCode: the protocol's own codes, by name
        return f"closed: {ErrorCode(frame.code - CLOSE_CODE_BASE).name.lower().replace('_', ' ')}"
    except ValueError:
        return f"closed by the other end (WebSocket close code {frame.code})"
