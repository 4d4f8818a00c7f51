"""Records of a ``logs`` stream (sans-I/O), site to client.

The site sends a container's held lines, then (with ``follow``) each new one, as
records (network byte order)::

    +---------+-------+------------+------------+============+
    | kind 8  | fd 8  | time f64   | length 32  | payload... |
    +---------+-------+------------+------------+============+

* kind 1, ``OUTPUT``: one line of the container's stdout (fd 1) or stderr (fd 2),
  without its newline (a line longer than :data:`MAX_PAYLOAD` comes in pieces);
* kind 2, ``MARK``: fd 0, a one-line UTF-8 note of the site about the log itself
  (the container restarted, lines were dropped because the follower fell behind);
  the client prints it on stderr, so stdout stays the container's own bytes.

``time`` is the wall-clock time (seconds since the epoch, UTC) when the enforcer
read the line; always sent, so ``--timestamps`` is the client's choice alone.
Records are cut across DATA frames however flow control cuts them:
:class:`RecordDecoder` takes any chunking.  Nothing the site sends is trusted:
an unknown kind, a wrong fd, a time that is not a date, or a length over the bound
is a :class:`FrameError`, reported as soon as the header is in.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

from supctl.protocol import ErrorCode, FrameError
from supctl.protocol.records import RecordReader

HEADER = struct.Struct("!BBdI")
OUTPUT = 1
MARK = 2
STDOUT = 1
STDERR = 2
#: Longest payload: a line piece is at most 64 KiB (the enforcer cuts longer lines, and so
#: does the book), so a record never makes a client buffer more than this plus a header.
MAX_PAYLOAD = 64 * 1024
#: Latest time accepted (the year 10000): anything later is no date a clock gives, and
#: would not print as RFC 3339.
MAX_TIME = 253_402_300_800.0
_FDS = {OUTPUT: (STDOUT, STDERR), MARK: (0,)}


@dataclass(frozen=True, slots=True)
class Record:
    kind: int
    fd: int
    time: float
    data: bytes


def encode(kind: int, fd: int, time: float, data: bytes) -> bytes:
    """One record; ValueError for what :class:`RecordDecoder` would refuse."""
    _check(kind, fd, time, len(data), ValueError)
    return HEADER.pack(kind, fd, time, len(data)) + data


def _check(kind: int, fd: int, time: float, length: int, error: type[Exception]) -> None:
    fds = _FDS.get(kind)
    if fds is None:
        raise error(f"logs record of unknown kind {kind}")
    if fd not in fds:
        raise error(f"logs record of kind {kind} for fd {fd}")
    if not (math.isfinite(time) and 0 <= time < MAX_TIME):
        raise error("logs record with a time that is not a date")
    if length > MAX_PAYLOAD:
        if error is FrameError:
            raise FrameError(f"logs record of {length} bytes exceeds {MAX_PAYLOAD}", ErrorCode.FRAME_SIZE)
        raise error(f"logs record of {length} bytes exceeds {MAX_PAYLOAD}")


class RecordDecoder(RecordReader[Record]):
    """Feed stream bytes in any chunking; get whole records out (FrameError on a bad
    header, as soon as it is in)."""

    header = HEADER

    def check(self, fields: tuple[Any, ...]) -> None:
        kind, fd, time, length = fields
        _check(kind, fd, time, length, FrameError)

    def record(self, fields: tuple[Any, ...], payload: bytes) -> Record:
        kind, fd, time, _ = fields
        return Record(kind, fd, time, payload)
