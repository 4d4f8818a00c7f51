"""Frame layout of the supctl wire protocol (sans-I/O: bytes in, frames out).

Every WebSocket binary message carries one or more whole frames; a frame never
spans two messages, because WebSocket already delimits messages and a frame
split across them could only mean a broken peer.  Layout (network byte order)::

    +--------+-----------------+-----------------+=============+
    | type 8 | stream id 32    | length 32       | payload ... |
    +--------+-----------------+-----------------+=============+

See docs/protocol.md for the frame table and the rules.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

HEADER = struct.Struct("!BII")
HEADER_SIZE = HEADER.size
WINDOW = struct.Struct("!I")
RESET = struct.Struct("!H")

#: Largest DATA payload a sender may put in one frame.  Big enough that the
#: per-frame cost in Python is noise next to the copy, small enough that a
#: ping on another stream is not stuck behind a huge frame.
MAX_DATA = 256 * 1024
#: Largest payload of any frame; OPEN/HELLO/RESET texts are far smaller.
MAX_PAYLOAD = MAX_DATA
#: Largest window any peer may grant (HTTP/2 uses the same 2**31-1 bound).
MAX_WINDOW = 2**31 - 1
#: Longest text in a RESET frame; longer texts are cut, never refused.
MAX_REASON = 1024
#: Largest CONTROL payload.  CONTROL bypasses flow control, so it must stay small.
MAX_CONTROL = 4096


class FrameType(enum.IntEnum):
    HELLO = 0  # stream 0: enforcer -> tower, JSON description of the site
    OPEN = 1  # open a stream; payload: JSON OpenRequest + initial window
    ACCEPT = 2  # the stream is open; payload: acceptor's initial window (u32)
    DATA = 3  # stream bytes
    WINDOW = 4  # payload: u32 credit increment for the sender
    EOF = 5  # sender will send no more DATA (half-close)
    RESET = 6  # abort the stream; payload: u16 ErrorCode + UTF-8 text
    CONTROL = 7  # stream-scoped JSON object outside flow control (signals, exit status)
    STATUS = 8  # stream 0: enforcer -> tower, JSON update of the site after HELLO
    GOAWAY = 9  # stream 0: tower -> supctl, JSON: "open new streams on a new session"


_FRAME_TYPES: dict[int, FrameType] = {int(t): t for t in FrameType}


class ErrorCode(enum.IntEnum):
    """Why a stream was reset or a connection closed.

    A connection close uses WebSocket close code ``4000 + code``.
    """

    CANCEL = 1  # the user or the application closed the stream early
    REFUSED = 2  # the target refused the connection
    UNREACHABLE = 3  # no route to the target
    TIMEOUT = 4  # the target did not answer in time
    NOT_FOUND = 5  # unknown application, service instance or container
    DENIED = 6  # not allowed
    PROTOCOL = 7  # the peer broke the protocol
    INTERNAL = 8  # a bug or an unexpected failure on the resetting side
    LINK_LOST = 9  # the next hop (e.g. the site's link to the tower) went away
    CONNECTION_RESET = 10  # the target reset its TCP connection
    UNSUPPORTED = 11  # no handler for this protocol or verb
    FLOW_CONTROL = 12  # the peer sent more than its window allowed
    FRAME_SIZE = 13  # a frame longer than allowed
    LIMIT = 14  # a configured limit (e.g. concurrent streams) was reached
    GOING_AWAY = 15  # the peer shuts down: connect again (to it once it is back, or another)

    @classmethod
    def parse(cls, value: int) -> ErrorCode:
        try:
            return cls(value)
        except ValueError:
            # Unknown codes from newer peers are kept meaningful, not fatal.
            return cls.INTERNAL


CLOSE_CODE_BASE = 4000


@dataclass(frozen=True, slots=True)
class Frame:
    type: FrameType
    stream_id: int
    payload: bytes = b""


def encode(type_: FrameType, stream_id: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(type_, stream_id, len(payload)) + payload


def encode_window(stream_id: int, increment: int) -> bytes:
    return HEADER.pack(FrameType.WINDOW, stream_id, 4) + WINDOW.pack(increment)


def encode_reset(stream_id: int, code: ErrorCode, text: str) -> bytes:
    body = RESET.pack(code) + text.encode("utf-8", "replace")[:MAX_REASON]
    return encode(FrameType.RESET, stream_id, body)


def decode_reset(payload: bytes) -> tuple[ErrorCode, str]:
    if len(payload) < RESET.size:
        raise FrameError("RESET frame too short")
    (code,) = RESET.unpack_from(payload)
    text = payload[RESET.size :].decode("utf-8", "replace")
    return ErrorCode.parse(code), text


def decode_u32(payload: bytes, what: str) -> int:
    if len(payload) != WINDOW.size:
        raise FrameError(f"{what} frame must carry 4 bytes, got {len(payload)}")
    (value,) = WINDOW.unpack(payload)
    return int(value)


class FrameError(Exception):
    """Malformed bytes; the connection core turns it into a close, never lets it out."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.PROTOCOL) -> None:
        super().__init__(message)
        self.code = code


def split_frames(message: bytes | bytearray | memoryview) -> list[Frame]:
    """Split one WebSocket message into frames; raise FrameError if malformed."""
    return [Frame(ftype, sid, bytes(payload)) for ftype, sid, payload in frame_views(message)]


def frame_views(message: bytes | bytearray | memoryview) -> list[tuple[FrameType, int, memoryview]]:
    """Like split_frames, with payloads as views into ``message`` (nothing copied).

    The whole message is checked before anything is returned, so a malformed
    message is refused as a whole.
    """
    view = memoryview(message)
    frames: list[tuple[FrameType, int, memoryview]] = []
    offset = 0
    end = len(view)
    if end == 0:
        raise FrameError("empty message")
    while offset < end:
        if end - offset < HEADER_SIZE:
            raise FrameError("truncated frame header")
        type_, stream_id, length = HEADER.unpack_from(view, offset)
        offset += HEADER_SIZE
        if length > MAX_PAYLOAD:
            raise FrameError(f"frame of {length} bytes exceeds {MAX_PAYLOAD}", ErrorCode.FRAME_SIZE)
        if end - offset < length:
            raise FrameError("truncated frame payload")
        ftype = _FRAME_TYPES.get(type_)  # not FrameType(type_): an enum call per frame is slow
        if ftype is None:
            raise FrameError(f"unknown frame type {type_}")
        frames.append((ftype, stream_id, view[offset : offset + length]))
        offset += length
    return frames
