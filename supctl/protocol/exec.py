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

import struct

from .frames import ErrorCode, FrameError

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


class OutputDecoder:
    """Feed stream bytes in any chunking; get whole ``(fd, payload)`` records out."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    @property
    def pending(self) -> int:
        """Bytes of an incomplete record held back (0 at a record boundary)."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """Return the records completed by ``data``; FrameError on a bad fd or length.

        A bad header is reported as soon as its 5 bytes are in, before its payload.
        """
        buffer = self._buffer
        buffer += data
        records: list[tuple[int, bytes]] = []
        offset = 0
        end = len(buffer)
        while end - offset >= RECORD_HEADER.size:
            fd, length = RECORD_HEADER.unpack_from(buffer, offset)
            if fd not in (STDOUT, STDERR):
                raise FrameError(f"exec output record for fd {fd}; only 1 and 2 exist")
            if length > MAX_RECORD:
                raise FrameError(
                    f"exec output record of {length} bytes exceeds {MAX_RECORD}", ErrorCode.FRAME_SIZE
                )
            start = offset + RECORD_HEADER.size
            if end - start < length:
                break
            records.append((fd, bytes(buffer[start : start + length])))
            offset = start + length
        del buffer[:offset]
        return records
