"""Length-prefixed records inside a stream's bytes (sans-I/O): the one reassembly loop.

A stream's DATA is cut wherever flow control cuts it, so a verb that sends records
(exec's output, ``connect udp``'s datagrams, a plugin's own, such as ``logs``) frames
each one with a fixed header whose *last* field is the payload's length.
:class:`RecordReader` takes the bytes in any chunking and hands out whole records:

* each header is judged (:meth:`RecordReader.check`) as soon as its bytes are in,
  before its payload is waited for, so a hostile length or field ends the stream at
  once (a :class:`~supctl.protocol.FrameError`) instead of being buffered;
* the buffer holds at most one incomplete record beyond what was fed;
* a memoryview is read, not copied first: the buffer's append is the one copy before
  a payload is cut out.
"""

from __future__ import annotations

import struct
from typing import Any, ClassVar, Generic, TypeVar

R = TypeVar("R")


class RecordReader(Generic[R]):
    """Feed stream bytes in any chunking; get whole records out.  A subclass sets
    :attr:`header` and says what a record is (:meth:`record`) and which headers are
    faults (:meth:`check`)."""

    #: The fixed header of every record; its last field is the payload's length.
    header: ClassVar[struct.Struct]

    def __init__(self) -> None:
        self._buffer = bytearray()

    @property
    def pending(self) -> int:
        """Bytes of an incomplete record held back (0 at a record boundary)."""
        return len(self._buffer)

    def check(self, fields: tuple[Any, ...]) -> None:
        """Raise FrameError if a header with these ``fields`` is a fault (default: none)."""

    def record(self, fields: tuple[Any, ...], payload: bytes) -> R:
        raise NotImplementedError

    def feed(self, data: bytes | memoryview) -> list[R]:
        """The records completed by ``data``, in order; FrameError on a bad header."""
        header, buffer = self.header, self._buffer
        buffer += data
        records: list[R] = []
        offset, end, size = 0, len(buffer), header.size
        while end - offset >= size:
            fields = header.unpack_from(buffer, offset)
            self.check(fields)
            start = offset + size
            stop = start + fields[-1]
            if stop > end:
                break
            records.append(self.record(fields, bytes(buffer[start:stop])))
            offset = stop
        del buffer[:offset]
        return records
