"""Sans-I/O multiplexed stream connection: framing, stream states, flow control.

Feed each received WebSocket message to :meth:`Connection.receive_data`; it
returns events.  Call the ``open_stream``/``send_data``/... methods to act; then
send :meth:`Connection.data_to_send` as one WebSocket binary message.  No I/O,
no clock, no asyncio: the same class serves supctl, the tower (on both of its
hops) and the enforcer, and is tested in memory.

Errors of the peer never raise out of ``receive_data``: a malformed frame closes
the connection (a :class:`ConnectionClosed` event with a reason code), a stream
that breaks the stream rules is reset alone.  Misuse by the local application
(sending beyond credit, on a closed stream) raises :class:`LocalProtocolError`,
because that is a bug in our own code.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping

from .events import (
    ConnectionClosed,
    ControlReceived,
    DataReceived,
    EndOfStream,
    Event,
    GoawayReceived,
    HelloReceived,
    StatusReceived,
    StreamAccepted,
    StreamOpened,
    StreamReset,
    WindowUpdated,
)
from .frames import (
    HEADER,
    MAX_CONTROL,
    MAX_DATA,
    MAX_WINDOW,
    WINDOW,
    ErrorCode,
    Frame,
    FrameError,
    FrameType,
    decode_reset,
    decode_u32,
    encode,
    encode_reset,
    encode_window,
    frame_views,
)
from .messages import OpenRequest, decode_hello, decode_object, encode_hello
from .streams import ControlBound, Stream, StreamState

__all__ = [  # the events are re-exported: the connection is where callers meet them
    "DEFAULT_WINDOW",
    "EARLY_DATA",
    "MAX_MESSAGE",
    "MAX_MESSAGE_ACCEPTED",
    "Connection",
    "ConnectionClosed",
    "ControlBound",
    "ControlReceived",
    "DataReceived",
    "EndOfStream",
    "Event",
    "GoawayReceived",
    "HelloReceived",
    "LocalProtocolError",
    "StatusReceived",
    "StreamAccepted",
    "StreamOpened",
    "StreamReset",
    "StreamState",
    "WindowUpdated",
]

#: Default per-stream receive window.  It bounds what any hop buffers per stream, and
#: how long a small message on another stream may wait behind bulk data: 256 KiB
#: keeps a ping under bulk load at a few ms per hop with no loss of loopback
#: throughput (bench/bench.py).
DEFAULT_WINDOW = 256 * 1024
#: What an opener may send before ACCEPT (the protocol guarantees every window is at
#: least this big), so the first request bytes travel with the OPEN instead of
#: waiting a round trip through every hop.
EARLY_DATA = 64 * 1024
#: Largest WebSocket message data_to_send builds; peers accept twice this.
MAX_MESSAGE = 1024 * 1024
#: What a peer must accept as one WebSocket message (websockets' max_size).
MAX_MESSAGE_ACCEPTED = 2 * MAX_MESSAGE


class LocalProtocolError(Exception):
    """Our own code misused the connection (a bug, not a peer problem)."""


class Connection:
    """One end of a multiplexed connection.

    ``odd_ids``: this end numbers the streams it opens 1, 3, 5...; the other end
    2, 4, 6...  ``accept_streams``: whether the peer may open streams at all (an
    enforcer's peer, the tower, may; supctl's peer may not).  ``control_bound``:
    opt in to a bound on unread CONTROL per stream (:class:`ControlBound`).
    """

    def __init__(
        self,
        *,
        odd_ids: bool,
        accept_streams: bool,
        accept_hello: bool = False,
        accept_goaway: bool = False,
        window: int = DEFAULT_WINDOW,
        max_streams: int = 1024,
        early_data: int = EARLY_DATA,
        control_bound: ControlBound | None = None,
    ) -> None:
        # early_data is part of the protocol version: both ends must use the same
        # value.  Only in-memory tests of tiny windows change it (to 0).
        if not 0 <= early_data <= window <= MAX_WINDOW or window == 0:
            raise ValueError("window out of range")
        self.early_data = early_data
        self._next_id = 1 if odd_ids else 2
        self._peer_parity = 0 if odd_ids else 1
        self._accept_streams = accept_streams
        self._accept_hello = accept_hello
        self._accept_goaway = accept_goaway
        self._hello_seen = False
        self.window = window
        self.max_streams = max_streams
        self.control_bound = control_bound
        self._streams: dict[int, Stream] = {}
        self._highest_peer_id = 0
        # Whole frames waiting to be sent, each as (header-or-frame, payload) so a
        # DATA payload is copied once, by data_to_send's join.
        self._out: deque[tuple[bytes, bytes | memoryview]] = deque()
        self._out_size = 0
        self.closed: ConnectionClosed | None = None

    # --- queries -------------------------------------------------------------

    def send_credit(self, stream_id: int) -> int:
        stream = self._streams.get(stream_id)
        if stream is None or stream.state is StreamState.PENDING or stream.local_eof:
            return 0
        return stream.send_credit

    def is_open(self, stream_id: int) -> bool:
        return stream_id in self._streams

    def is_pending(self, stream_id: int) -> bool:
        """True for a stream the peer opened that we have not accepted (nor reset) yet."""
        stream = self._streams.get(stream_id)
        return stream is not None and stream.state is StreamState.PENDING

    @property
    def stream_count(self) -> int:
        return len(self._streams)

    @property
    def pending_output(self) -> int:
        """Bytes queued by data_to_send but not yet taken."""
        return self._out_size

    # --- local actions -------------------------------------------------------

    def open_stream(self, request: OpenRequest) -> int:
        self._check_usable()
        stream_id = self._next_id
        if stream_id > 0xFFFFFFFF:
            raise LocalProtocolError("stream ids exhausted")
        self._next_id += 2
        self._streams[stream_id] = Stream(stream_id, StreamState.OPENING, self.early_data, self.window)
        self._emit(encode(FrameType.OPEN, stream_id, WINDOW.pack(self.window) + request.to_json()))
        return stream_id

    def accept_stream(self, stream_id: int) -> None:
        stream = self._get(stream_id)
        if stream.state is not StreamState.PENDING:
            raise LocalProtocolError(f"stream {stream_id} is not waiting to be accepted")
        stream.state = StreamState.OPEN
        self._emit(encode(FrameType.ACCEPT, stream_id, WINDOW.pack(self.window)))

    def send_data(self, stream_id: int, data: bytes | bytearray | memoryview) -> None:
        """Queue ``data``; it must fit in ``send_credit(stream_id)``."""
        stream = self._get(stream_id)
        size = len(data)
        if stream.state is StreamState.PENDING or stream.local_eof:
            raise LocalProtocolError(f"stream {stream_id} cannot send data now")
        if size > stream.send_credit:
            raise LocalProtocolError(f"{size} bytes exceed the credit of {stream.send_credit}")
        stream.send_credit -= size
        view = memoryview(data)
        if not view.readonly:
            view = memoryview(bytes(view))  # the caller may reuse a mutable buffer
        # Slices of an immutable buffer: data_to_send's join is the only copy.
        for start in range(0, size, MAX_DATA):
            chunk = view[start : start + MAX_DATA]
            self._out.append((HEADER.pack(FrameType.DATA, stream_id, len(chunk)), chunk))
            self._out_size += len(chunk) + HEADER.size

    def send_eof(self, stream_id: int) -> None:
        stream = self._get(stream_id)
        if stream.state is StreamState.PENDING or stream.local_eof:
            raise LocalProtocolError(f"stream {stream_id} cannot send EOF now")
        stream.local_eof = True
        self._emit(encode(FrameType.EOF, stream_id))
        if stream.remote_eof:
            del self._streams[stream_id]

    def reset_stream(self, stream_id: int, code: ErrorCode, text: str = "") -> None:
        """Abort a stream.  A no-op for a stream that is already gone (races are normal)."""
        if self.closed is not None or self._streams.pop(stream_id, None) is None:
            return
        self._emit(encode_reset(stream_id, code, text))

    def consumed(self, stream_id: int, size: int) -> None:
        """The application delivered ``size`` received bytes: give the peer credit.

        Credit goes back in batches of half a window, as SSH and HTTP/2 peers do,
        so a bulk transfer costs one WINDOW frame per half window, not per chunk.
        """
        stream = self._streams.get(stream_id)
        if stream is None or stream.remote_eof or self.closed is not None:
            return
        stream.unacked += size
        # ``> 0``: with a 1-byte window half a window is 0, and a zero WINDOW
        # increment is a connection error at the peer.
        if stream.unacked > 0 and stream.unacked >= self.window // 2:
            stream.recv_window += stream.unacked
            self._emit(encode_window(stream_id, stream.unacked))
            stream.unacked = 0

    def control_consumed(self, stream_id: int, size: int) -> None:
        """The application has read one CONTROL message of ``size`` bytes
        (:attr:`ControlReceived.size`): it no longer counts against the bound."""
        stream = self._streams.get(stream_id)
        if stream is not None:
            stream.control_frames = max(0, stream.control_frames - 1)
            stream.control_bytes = max(0, stream.control_bytes - size)

    def send_hello(self, payload: Mapping[str, object]) -> None:
        self._check_usable()
        self._emit(encode(FrameType.HELLO, 0, encode_hello(payload)))

    def send_status(self, payload: Mapping[str, object]) -> None:
        """A site update after HELLO; the peer keeps only the latest."""
        self._check_usable()
        self._emit(encode(FrameType.STATUS, 0, encode_hello(payload)))

    def send_goaway(self, payload: Mapping[str, object]) -> None:
        """Tell a peer that accepts it (``accept_goaway``) to open new streams elsewhere."""
        self._check_usable()
        self._emit(encode(FrameType.GOAWAY, 0, encode_hello(payload)))

    def send_control(self, stream_id: int, payload: Mapping[str, object]) -> None:
        """Send a small JSON object on an open stream, ahead of any flow-controlled DATA.

        Allowed after either side's EOF (a signal after stdin closed, an exit
        status before the output ends); not on a stream that is not open yet.
        """
        stream = self._get(stream_id)
        if stream.state is not StreamState.OPEN:
            raise LocalProtocolError(f"stream {stream_id} is not open")
        body = encode_hello(payload)
        if len(body) > MAX_CONTROL:
            raise LocalProtocolError(f"CONTROL payload of {len(body)} bytes exceeds {MAX_CONTROL}")
        self._emit(encode(FrameType.CONTROL, stream_id, body))

    def close(self, code: ErrorCode, reason: str) -> ConnectionClosed:
        if self.closed is None:
            # A WebSocket close reason is at most 123 bytes of UTF-8.
            self.closed = ConnectionClosed(code, reason.encode()[:120].decode("utf-8", "ignore"))
            self._streams.clear()
        return self.closed

    def data_to_send(self, limit: int = MAX_MESSAGE) -> bytes:
        """Take queued whole frames, at most ``limit`` bytes (at least one frame),
        to send as one WebSocket message.  Call again while it returns bytes."""
        out = self._out
        if not out:
            return b""
        pieces: list[bytes | memoryview] = []
        size = 0
        while out:
            head, payload = out[0]
            frame_size = len(head) + len(payload)
            if pieces and size + frame_size > limit:
                break
            out.popleft()
            pieces.append(head)
            if payload:
                pieces.append(payload)
            size += frame_size
        self._out_size -= size
        return b"".join(pieces)

    # --- receiving -----------------------------------------------------------

    def receive_data(self, message: bytes | bytearray | memoryview, *, owned: bool = False) -> list[Event]:
        """Process one WebSocket message from the peer.

        DATA events carry views into ``message``: unless the caller hands it over
        (``owned``: nobody changes it afterwards, as with a buffer websockets just
        built), a mutable message is copied first.
        """
        if self.closed is not None:
            return []
        if not isinstance(message, bytes):
            # DATA views below must not see later changes, and must be read-only so
            # that a relay's send_data does not copy them again.
            message = memoryview(message).toreadonly() if owned else bytes(message)
        try:
            frames = frame_views(message)
        except FrameError as exc:
            return [self.close(exc.code, str(exc))]
        events: list[Event] = []
        for ftype, sid, view in frames:
            try:
                if ftype is FrameType.DATA:
                    # Passed on as a view: a relay forwards it without copying, and
                    # the one copy happens at the next hop's join or in Channel.
                    self._handle(Frame(ftype, sid), events, view)
                else:
                    self._handle(Frame(ftype, sid, bytes(view)), events)
            except FrameError as exc:
                events.append(self.close(exc.code, str(exc)))
                break
        return events

    def _handle(self, frame: Frame, events: list[Event], data: bytes | memoryview = b"") -> None:
        """``data`` is the payload of a DATA frame (``frame.payload`` of the others)."""
        ftype, sid = frame.type, frame.stream_id
        if ftype is FrameType.HELLO:
            if sid != 0 or not self._accept_hello:
                raise FrameError("unexpected HELLO")
            self._accept_hello = False  # once per connection
            self._hello_seen = True
            events.append(HelloReceived(decode_hello(frame.payload)))
            return
        if ftype is FrameType.STATUS:
            if sid != 0 or not self._hello_seen:
                raise FrameError("unexpected STATUS")
            events.append(StatusReceived(decode_object(frame.payload, "STATUS")))
            return
        if ftype is FrameType.GOAWAY:
            if sid != 0 or not self._accept_goaway:
                raise FrameError("unexpected GOAWAY")
            events.append(GoawayReceived(decode_object(frame.payload, "GOAWAY")))
            return
        if sid == 0:
            raise FrameError(f"{ftype.name} on stream 0")
        if ftype is FrameType.OPEN:
            self._on_open(frame, events)
            return
        stream = self._streams.get(sid)
        if stream is None:
            if self._was_used(sid):
                return  # a frame that crossed our RESET or EOF in flight: drop it
            raise FrameError(f"{ftype.name} for unknown stream {sid}")
        if ftype is FrameType.RESET:
            code, text = decode_reset(frame.payload)
            del self._streams[sid]
            events.append(StreamReset(sid, code, text))
        elif ftype is FrameType.ACCEPT:
            if stream.state is not StreamState.OPENING:
                self._stream_error(stream, "ACCEPT for a stream that is not opening", events)
                return
            window = self._window_value(decode_u32(frame.payload, "ACCEPT"))
            # The real window replaces the EARLY_DATA we assumed; increments
            # received before ACCEPT stay counted.
            stream.send_credit += window - self.early_data
            if stream.send_credit > MAX_WINDOW:
                raise FrameError("window too large", ErrorCode.FLOW_CONTROL)
            stream.state = StreamState.OPEN
            events.append(StreamAccepted(sid))
        elif ftype is FrameType.DATA:
            if stream.state is StreamState.OPENING or stream.remote_eof:
                self._stream_error(stream, "DATA on a stream that is not open", events)
                return
            size = len(data)
            limit = stream.recv_window
            if stream.state is StreamState.PENDING:  # before ACCEPT only EARLY_DATA is allowed
                limit -= self.window - self.early_data
            if size > limit:
                raise FrameError(f"stream {sid} sent beyond its window", ErrorCode.FLOW_CONTROL)
            stream.recv_window -= size
            if size:
                events.append(DataReceived(sid, data))
        elif ftype is FrameType.WINDOW:
            increment = decode_u32(frame.payload, "WINDOW")
            if increment == 0 or stream.send_credit + increment > MAX_WINDOW:
                raise FrameError(f"bad window increment {increment}", ErrorCode.FLOW_CONTROL)
            stream.send_credit += increment
            if stream.state is not StreamState.PENDING and not stream.local_eof:
                events.append(WindowUpdated(sid))
        elif ftype is FrameType.CONTROL:
            size = len(frame.payload)
            if stream.state is not StreamState.OPEN or size > MAX_CONTROL:
                self._stream_error(stream, "unexpected or oversize CONTROL", events)
                return
            bound = self.control_bound
            if bound is not None and (
                stream.control_frames >= bound.frames or stream.control_bytes + size > bound.size
            ):
                # Checked before parsing: a flood costs a comparison per frame, and the
                # frames that follow the RESET are dropped as crossing it.
                text = f"more than {bound.frames} unread CONTROL messages or {bound.size} bytes"
                self._stream_error(stream, text, events, ErrorCode.LIMIT)
                return
            try:
                payload = decode_object(frame.payload, "CONTROL")
            except FrameError as exc:
                self._stream_error(stream, str(exc), events)
                return
            stream.control_frames += 1
            stream.control_bytes += size
            events.append(ControlReceived(sid, payload, size))
        elif ftype is FrameType.EOF:
            if frame.payload or stream.state is StreamState.OPENING or stream.remote_eof:
                self._stream_error(stream, "unexpected EOF", events)
                return
            stream.remote_eof = True
            if stream.local_eof:
                del self._streams[sid]
            events.append(EndOfStream(sid))

    def _on_open(self, frame: Frame, events: list[Event]) -> None:
        sid = frame.stream_id
        if not self._accept_streams:
            raise FrameError("this peer may not open streams", ErrorCode.DENIED)
        if sid % 2 != self._peer_parity or sid <= self._highest_peer_id:
            raise FrameError(f"OPEN with invalid stream id {sid}")
        self._highest_peer_id = sid
        if len(frame.payload) < WINDOW.size:
            raise FrameError("OPEN frame too short")
        credit = self._window_value(WINDOW.unpack_from(frame.payload)[0])
        stream = Stream(sid, StreamState.PENDING, credit, self.window)
        self._streams[sid] = stream
        try:
            request = OpenRequest.from_json(frame.payload[WINDOW.size :])
        except FrameError as exc:
            self._stream_error(stream, str(exc), events)
            return
        if len(self._streams) > self.max_streams:
            del self._streams[sid]
            self._emit(encode_reset(sid, ErrorCode.LIMIT, f"more than {self.max_streams} streams"))
            return
        events.append(StreamOpened(sid, request))

    # --- helpers -------------------------------------------------------------

    def _window_value(self, value: int) -> int:
        if not self.early_data <= value <= MAX_WINDOW:
            raise FrameError(f"window {value} out of range", ErrorCode.FLOW_CONTROL)
        return value

    def _stream_error(
        self, stream: Stream, text: str, events: list[Event], code: ErrorCode = ErrorCode.PROTOCOL
    ) -> None:
        del self._streams[stream.id]
        self._emit(encode_reset(stream.id, code, text))
        events.append(StreamReset(stream.id, code, text, local=True))

    def _was_used(self, sid: int) -> bool:
        if sid % 2 == self._peer_parity:
            return sid <= self._highest_peer_id
        return sid < self._next_id

    def _get(self, stream_id: int) -> Stream:
        self._check_usable()
        stream = self._streams.get(stream_id)
        if stream is None:
            raise LocalProtocolError(f"stream {stream_id} is not open")
        return stream

    def _check_usable(self) -> None:
        if self.closed is not None:
            raise LocalProtocolError("connection is closed")

    def _emit(self, data: bytes) -> None:
        self._out.append((data, b""))
        self._out_size += len(data)
