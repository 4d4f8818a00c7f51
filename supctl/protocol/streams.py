"""Per-stream state of the sans-I/O connection: where a stream is in its life,
what each side may still send, and the bound on unread CONTROL.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .frames import MAX_CONTROL


class StreamState(enum.Enum):
    OPENING = "opening"  # we sent OPEN, no ACCEPT yet (we may send EARLY_DATA already)
    PENDING = "pending"  # the peer sent OPEN, we have not accepted yet (early data may arrive)
    OPEN = "open"


@dataclass(frozen=True, slots=True)
class ControlBound:
    """How many received CONTROL messages of one stream may wait unread, and how many
    bytes they may weigh together (their JSON as received).

    CONTROL travels outside flow control, so without a bound a peer could fill a
    stream whose reader never reads CONTROL (a tcp stream) until memory runs out.
    An endpoint that opts in reports each message it has read with
    :meth:`Connection.control_consumed`; one more message than the bound resets
    the stream with ``LIMIT``.  The defaults leave room for every legitimate use
    (a few signals, one exit status) and cost at most 16 KiB per stream.
    """

    frames: int = 32
    size: int = 16 * 1024

    def __post_init__(self) -> None:
        if self.frames < 1 or self.size < MAX_CONTROL:
            raise ValueError("a CONTROL bound must allow at least one message of the largest size")


class Stream:
    """One stream as the connection tracks it (no buffers: those are the application's)."""

    __slots__ = (
        "control_bytes",
        "control_frames",
        "id",
        "local_eof",
        "recv_window",
        "remote_eof",
        "send_credit",
        "state",
        "unacked",
    )

    def __init__(self, stream_id: int, state: StreamState, send_credit: int, recv_window: int) -> None:
        self.id = stream_id
        self.state = state
        self.local_eof = False
        self.remote_eof = False
        self.send_credit = send_credit  # bytes we may still send
        self.recv_window = recv_window  # bytes the peer may still send us
        self.unacked = 0  # bytes consumed locally but not yet credited back
        self.control_frames = 0  # CONTROL received and not reported read (with a ControlBound)
        self.control_bytes = 0
