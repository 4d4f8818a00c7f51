"""Output records of ``exec`` streams (sans-I/O).

The enforcer sends a command's stdout and stderr on one stream, so each chunk is
framed as a record (network byte order)::

    +-------+------------+============+
    | fd 8  | length 32  | payload... |
    +-------+------------+============+

``fd`` is 1 (stdout) or 2 (stderr).  Records may be split across DATA frames
however the flow control cuts them; :class:`OutputDecoder` reassembles them.
See docs/protocol.md, "exec streams".
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import Any

from .frames import ErrorCode, FrameError
from .records import RecordReader

RECORD_HEADER = struct.Struct("!BI")
STDOUT = 1
STDERR = 2
#: Largest record payload.  The enforcer sends at most 256 KiB per record; the
#: bound keeps a broken or hostile peer from making a client buffer without limit.
MAX_RECORD = 1024 * 1024


def encode_output(fd: int, data: bytes) -> bytes:
    """One record carrying ``data`` for ``fd`` (1 or 2)."""
    if fd not in (STDOUT, STDERR):
        raise ValueError(f"fd must be 1 or 2, got {fd}")
    if len(data) > MAX_RECORD:
        raise ValueError(f"record of {len(data)} bytes exceeds {MAX_RECORD}")
    return RECORD_HEADER.pack(fd, len(data)) + data


class OutputDecoder(RecordReader[tuple[int, bytes]]):
    """Feed stream bytes in any chunking; get whole ``(fd, payload)`` records out.  A bad
    fd or length is reported as soon as its 5 header bytes are in, before its payload."""

    header = RECORD_HEADER

    def check(self, fields: tuple[Any, ...]) -> None:
        fd, length = fields
        if fd not in (STDOUT, STDERR):
            raise FrameError(f"exec output record for fd {fd}; only 1 and 2 exist")
        if length > MAX_RECORD:
            raise FrameError(
                f"exec output record of {length} bytes exceeds {MAX_RECORD}", ErrorCode.FRAME_SIZE
            )

    def record(self, fields: tuple[Any, ...], payload: bytes) -> tuple[int, bytes]:
        return fields[0], payload


# --- terminals (exec -t) -------------------------------------------------------------
#
# An exec OPEN with ``args.tty`` asks for a pseudo-terminal; a ``{"resize": ...}``
# CONTROL changes its window size.  Both come from a client (through a tower that may
# be compromised), so the enforcer takes nothing in them on trust: sizes are bounded
# integers, TERM is a short terminfo-style name.  See docs/protocol.md, "exec streams".

#: What an enforcer whose exec handler can allocate a terminal announces in HELLO's
#: ``features``; a tower refuses a tty exec to a site that does not announce it.
EXEC_TTY = "exec-tty"
#: Largest number of rows or columns accepted (real terminals stay far below).
MAX_WINDOW = 10_000
#: Longest TERM accepted; terminfo names are short (``xterm-256color``).
MAX_TERM = 64
_TERM = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


@dataclass(frozen=True, slots=True)
class WindowSize:
    rows: int
    cols: int


@dataclass(frozen=True, slots=True)
class TtyRequest:
    """A checked ``args.tty``: the initial window size, and TERM (None: not sent)."""

    size: WindowSize
    term: str | None = None

    def to_args(self) -> dict[str, object]:
        out: dict[str, object] = {"rows": self.size.rows, "cols": self.size.cols}
        if self.term is not None:
            out["term"] = self.term
        return out


def valid_term(term: object) -> bool:
    """A TERM value the site will set: 1-64 characters of letters, digits and ``._+-``."""
    return isinstance(term, str) and len(term) <= MAX_TERM and _TERM.fullmatch(term) is not None


def _dimension(value: object, name: str) -> int:
    # bool is an int in Python and True would pass as 1: refused like any other non-number.
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WINDOW:
        raise ValueError(f"{name} must be an integer 1-{MAX_WINDOW}, got {str(value)[:20]!r}")
    return value


def parse_window(value: object) -> WindowSize:
    """``{"rows": R, "cols": C}`` checked; ValueError (one line) otherwise."""
    if not isinstance(value, dict):
        raise ValueError("a window size must be an object with rows and cols")
    return WindowSize(_dimension(value.get("rows"), "rows"), _dimension(value.get("cols"), "cols"))


def parse_tty(value: object) -> TtyRequest:
    """``args.tty`` of an exec OPEN: ``{"rows": R, "cols": C, "term": T?}``; ValueError otherwise.

    Unknown keys are ignored (room for later fields such as terminal modes)."""
    size = parse_window(value)
    assert isinstance(value, dict)
    term = value.get("term")
    if term is not None and not valid_term(term):
        raise ValueError(f"term must be 1-{MAX_TERM} characters of letters, digits and '._+-'")
    return TtyRequest(size, term)


def parse_resize(message: dict[str, object]) -> WindowSize | None:
    """The new size of a ``{"resize": {"rows": R, "cols": C}}`` CONTROL; None for a CONTROL
    that is no resize; ValueError for a malformed one."""
    if "resize" not in message:
        return None
    return parse_window(message["resize"])
