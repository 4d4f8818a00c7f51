"""A TCP socket joined to a stream, as an asyncio Protocol: no task, no StreamReader.

Joining a socket to a stream with StreamReader/StreamWriter and two pump tasks
costs, per connection, task starts, several loop turns and a copy per chunk.  A
:class:`SocketBridge` (used for the listener's accepted connections and the
enforcer's target connections) instead moves bytes in the transport's callbacks
and the link's event dispatch:

* socket -> stream: ``data_received`` sends what the stream's credit allows; the
  rest waits and reading pauses until a window update (``channel_writable``).
* stream -> socket: ``channel_data`` writes to the transport and gives the credit
  back at once if the kernel took it all.  If anything stays in the transport's
  buffer (its high-water mark is 0, so it pauses us at once), the credit for
  what arrives is held until the buffer is empty again (``resume_writing``).
  So a stream never has more than one window queued here, whatever the peer
  or the local socket does; ``channel.peak_buffered`` records the most it held.
* half-closes pass through (``eof_received`` -> EOF on the stream, EOF from the
  stream -> ``write_eof``); when both are done the transport closes.  A reset on
  either side aborts both (an RST locally, a RESET on the stream).
* no silent truncation when this process dies: the socket is armed with
  ``SO_LINGER`` {on, 0} (:func:`arm_reset`) from the moment it is adopted (the
  enforcer's target sockets and supctl's listening socket are armed even earlier,
  with the same function), so the kernel ends it with RST, not FIN, if we die
  mid-stream.  It is disarmed only at the clean end (:meth:`SocketBridge._maybe_disarm`).
  The Linux rule behind this is in docs/architecture.md, "No silent truncation".

:attr:`SocketBridge.done` resolves with None, or with the StreamError that ended it.
"""

from __future__ import annotations

import asyncio
import asyncio.trsock
import contextlib
import logging
import socket
import struct
from collections import deque
from collections.abc import Callable
from typing import cast

from .errors import StreamError
from .link import Channel
from .protocol import ErrorCode

__all__ = ["SocketBridge", "arm_reset", "disarm_reset"]

#: SO_LINGER on, timeout 0: close() - ours, or the kernel's when the process dies -
#: sends RST and drops unsent data (in ESTABLISHED, CLOSE_WAIT, FIN_WAIT1/2).
_LINGER_RST = struct.pack("ii", 1, 0)
#: SO_LINGER off: close() is the normal, graceful one (FIN after every queued byte).
_LINGER_OFF = struct.pack("ii", 0, 0)


#: What the arming takes: a socket, or asyncio's wrapper of one (a server's sockets).
AnySocket = socket.socket | asyncio.trsock.TransportSocket


def arm_reset(sock: AnySocket | None) -> None:
    """Make the kernel reset ``sock`` if it is closed, or this process dies, before a clean end.

    Call it as soon as a socket that will carry a stream's bytes exists (before its
    connect completes, on a listening socket before ``listen()``: accepted sockets
    inherit it).  Harmless on a socket that is already closed.
    """
    if sock is not None:
        with contextlib.suppress(OSError, RuntimeError):  # uvloop: handle closed
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)


def disarm_reset(sock: AnySocket | None) -> None:
    """Back to a graceful close: only once the stream ended cleanly (see SocketBridge)."""
    if sock is not None:
        with contextlib.suppress(OSError, RuntimeError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_OFF)


log = logging.getLogger(__name__)

#: The transport's write-buffer high-water mark: 0, so that pause_writing means
#: "the kernel did not take everything" and credit is held from then on.
WRITE_HIGH_WATER = 0


class SocketBridge(asyncio.Protocol):
    """One TCP connection (this protocol's transport) joined to one :class:`Channel`.

    ``open_channel`` is called in ``connection_made`` with the transport and returns
    the channel (a new stream, or one the peer opened), or None if the stream comes
    later (the caller then passes it to :meth:`start`, or ends the connection with
    :meth:`abort`); if it raises StreamError the connection is aborted and
    :attr:`done` carries the error.  ``on_done`` is
    called once, with the bridge and that result.
    """

    def __init__(
        self,
        open_channel: Callable[[asyncio.Transport], Channel | None],
        on_done: Callable[[SocketBridge, StreamError | None], None] | None = None,
    ) -> None:
        self._open_channel = open_channel
        self._on_done = on_done
        self.channel: Channel | None = None
        self.transport: asyncio.Transport | None = None
        self.done: asyncio.Future[StreamError | None] = asyncio.get_running_loop().create_future()
        self._pending: deque[memoryview] = deque()  # from the socket, waiting for credit
        self._reading_paused = False
        self._writing_paused = False
        self._held_credit = 0  # bytes written while the transport pushed back
        self._socket_eof = False  # the socket half-closed (EOF passed on once _pending is empty)
        self._stream_eof = False  # the stream half-closed (write_eof done)
        self._eof_sent = False
        self._armed = True  # SO_LINGER {on, 0} until _maybe_disarm

    # --- asyncio.Protocol ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; they implement it.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        # Armed before the first byte moves (idempotent: the listener and the tcp
        # handler armed their sockets earlier still).
        arm_reset(transport.get_extra_info("socket"))
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        try:
            channel = self._open_channel(transport)
        except StreamError as exc:
            self._abort(exc)
            return
        except Exception as exc:  # never let one connection's bug escape into the loop
            log.exception("cannot open a stream for a connection")
            self._abort(StreamError(f"internal error: {exc}", code=ErrorCode.INTERNAL))
            return
        if channel is None:
            # The stream comes later (start()), e.g. once supctl's session with the tower
            # is back.  Reading pauses at the first bytes (uvloop starts reading only after
            # connection_made, so a pause here would not hold): they, and an EOF, wait in
            # _pending for start().
            return
        self.start(channel)

    def start(self, channel: Channel) -> None:
        """Join the socket to ``channel`` (at once, or later if ``open_channel`` said None)."""
        if self.done.done():  # the socket went away while it waited
            channel.reset(ErrorCode.CANCEL, "the local connection is gone")
            return
        self.channel = channel
        channel.attach(self)
        self._send_pending()  # what arrived meanwhile; resumes reading once it is sent

    def data_received(self, data: bytes) -> None:
        channel = self.channel
        if self.done.done():
            return
        if channel is None or self._pending:  # waiting for start(), or for credit
            self._pending.append(memoryview(data))
        else:
            sent = channel.send_nowait(data)
            if sent == len(data):
                return
            self._pending.append(memoryview(data)[sent:])
        if not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self._socket_eof = True
        self._send_pending()
        self._maybe_disarm()
        return True  # keep the transport open: the other direction may go on (half-close)

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        # Before the transport's shutdown(SHUT_WR) or close, which follow at once
        # when the buffer emptied after write_eof() or close().
        self._maybe_disarm()
        held, self._held_credit = self._held_credit, 0
        if held and self.channel is not None:
            self.channel.consume(held)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.done.done():
            return
        if exc is None and self._eof_sent and self._stream_eof:
            self._finish(None)
            return
        text = "connection reset by peer" if isinstance(exc, ConnectionResetError) else str(exc or "")
        error = StreamError(text or "connection closed", code=ErrorCode.CONNECTION_RESET)
        if self.channel is not None:
            self.channel.reset(ErrorCode.CONNECTION_RESET, error.args[0])
        self._finish(error)

    # --- ChannelReceiver -----------------------------------------------------

    def channel_data(self, data: bytes | memoryview) -> None:
        transport = self.transport
        if transport is None or self.done.done() or self._stream_eof:
            return
        transport.write(data)  # calls pause_writing at once if it could not send it all
        channel = self.channel
        if channel is None:
            return
        if self._writing_paused:
            self._held_credit += len(data)
            queued = transport.get_write_buffer_size()
            channel.peak_buffered = max(channel.peak_buffered, queued)
        else:
            channel.consume(len(data))

    def channel_eof(self) -> None:
        if self._stream_eof or self.transport is None or self.done.done():
            return
        self._stream_eof = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._maybe_disarm()
        self._maybe_close()

    def channel_writable(self) -> None:
        self._send_pending()

    def channel_failed(self, error: StreamError) -> None:
        self._abort(error)

    def abort(self, code: ErrorCode, text: str) -> None:
        """End both sides now: RESET on the stream, RST on the socket."""
        if self.done.done():
            return
        if self.channel is not None:
            self.channel.reset(code, text)
        self._abort(StreamError(text, code=code))

    # --- internals -------------------------------------------------------------

    def _send_pending(self) -> None:
        channel = self.channel
        if channel is None or self.done.done():
            return
        pending = self._pending
        while pending:
            chunk = pending[0]
            sent = channel.send_nowait(chunk)
            if sent < len(chunk):
                pending[0] = chunk[sent:]
                return
            pending.popleft()
        if self._reading_paused and not self._socket_eof and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()
        if self._socket_eof and not self._eof_sent:
            self._eof_sent = True
            channel.write_eof()
            self._maybe_close()

    def _maybe_disarm(self) -> None:
        """Turn the RST-on-close off once the stream ended cleanly on this socket.

        The moment: the peer's FIN arrived (``eof_received``: it sends nothing more),
        the stream's EOF arrived (we write nothing more) and the transport's buffer is
        empty (every byte we will ever write is in the kernel's send queue, followed
        by our FIN: the transport's shutdown(SHUT_WR) runs right after this point).
        From here, a close - ours, or the kernel's if we die - is the graceful one:
        the kernel sends what is queued and the FIN, retransmitting them on its own
        (an orphaned socket) if need be.  So the far end sees every byte and FIN,
        which is the truth.  We do not wait for the ACK of our FIN: that matters only
        to a close with linger 0 still on (in FIN_WAIT1, or LAST_ACK with bytes
        unsent, it resets and discards them), which this disarming prevents.
        Before this moment, dying means RST: the far end cannot take a cut stream
        for a whole one.  With high water 0, ``_writing_paused`` is exactly "the
        transport's buffer is not empty" (resume_writing calls us when it empties).
        """
        if (
            self._armed
            and self._socket_eof
            and self._stream_eof
            and not self._writing_paused
            and self.transport is not None
            and not self.done.done()
        ):
            self._armed = False
            disarm_reset(self.transport.get_extra_info("socket"))

    def _maybe_close(self) -> None:
        if self._eof_sent and self._stream_eof and self.transport is not None:
            self.transport.close()  # flushes what is buffered, then connection_lost(None)

    def _abort(self, error: StreamError) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            # A reset travels on as a reset: abort() alone sends a clean FIN whenever
            # nothing is left unread, which a client would take for a complete answer.
            # (Armed already unless the stream had ended cleanly; then this re-arms.)
            self._armed = True
            arm_reset(transport.get_extra_info("socket"))
            transport.abort()
        self._finish(error)

    def _finish(self, error: StreamError | None) -> None:
        if self.done.done():
            return
        self.done.set_result(error)
        self._pending.clear()
        if self._on_done is not None:
            try:
                self._on_done(self, error)
            except Exception:
                log.exception("stream end callback failed")
