"""Events the sans-I/O :class:`~supctl.protocol.connection.Connection` returns from ``receive_data``.

Plain frozen records, no behaviour: the connection builds them, the links
(supctl, tower, enforcer) dispatch on their type.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .frames import CLOSE_CODE_BASE, ErrorCode
from .messages import OpenRequest


@dataclass(frozen=True, slots=True)
class StreamOpened:
    """The peer opened a stream; answer with accept_stream or reset_stream."""

    stream_id: int
    request: OpenRequest


@dataclass(frozen=True, slots=True)
class StreamAccepted:
    stream_id: int


@dataclass(frozen=True, slots=True)
class DataReceived:
    """``data`` may be a read-only view into the received message."""

    stream_id: int
    data: bytes | memoryview


@dataclass(frozen=True, slots=True)
class WindowUpdated:
    stream_id: int


@dataclass(frozen=True, slots=True)
class EndOfStream:
    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The stream is gone.  ``local`` is True when this side reset it because the
    peer broke the stream rules (the RESET frame is already queued)."""

    stream_id: int
    code: ErrorCode
    text: str
    local: bool = False


@dataclass(frozen=True, slots=True)
class HelloReceived:
    payload: dict[str, object]


@dataclass(frozen=True, slots=True)
class StatusReceived:
    """A site update after HELLO (e.g. container states changed)."""

    payload: dict[str, object]


@dataclass(frozen=True, slots=True)
class GoawayReceived:
    """The tower drains: streams open on this connection go on (up to its deadline), new
    ones belong on a new connection.  ``payload``: ``reason`` and ``deadline`` (seconds)."""

    payload: dict[str, object]


@dataclass(frozen=True, slots=True)
class ControlReceived:
    """A small JSON message on a stream, outside flow control (a signal, an exit status).

    ``size``: its bytes on the wire, for :meth:`Connection.control_consumed`
    (bookkeeping, not part of the message: not compared).
    """

    stream_id: int
    payload: dict[str, object]
    size: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The core gave up on the peer; close the WebSocket with ``close_code``."""

    code: ErrorCode
    reason: str

    @property
    def close_code(self) -> int:
        return CLOSE_CODE_BASE + int(self.code)


Event = (
    StreamOpened
    | StreamAccepted
    | DataReceived
    | WindowUpdated
    | EndOfStream
    | StreamReset
    | HelloReceived
    | StatusReceived
    | GoawayReceived
    | ControlReceived
    | ConnectionClosed
)
