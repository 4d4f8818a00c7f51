"""Datagrams on a stream (``connect udp``), sans-I/O.

A UDP flow is one stream; each datagram travels as one record inside DATA, so its
boundaries survive however flow control cuts the bytes (network byte order)::

    +-----------+============+
    | length 16 | payload... |
    +-----------+============+

``length`` is 0 to 65535 (an empty datagram is a datagram).  Records may be split
across DATA frames or share one; :class:`DatagramDecoder` reassembles them.  Nothing is
ever split into two datagrams or merged into one.  See docs/protocol.md, "udp streams".
"""

from __future__ import annotations

import struct
from typing import Any

from .records import RecordReader

HEADER = struct.Struct("!H")
#: The largest datagram a record carries (what a 16-bit length can say; UDP over IPv4
#: carries at most 65,507 bytes of payload).
MAX_DATAGRAM = 65535


def encode_datagram(payload: bytes) -> bytes:
    """One record carrying ``payload`` (ValueError if it is larger than :data:`MAX_DATAGRAM`)."""
    if len(payload) > MAX_DATAGRAM:
        raise ValueError(f"datagram of {len(payload)} bytes exceeds {MAX_DATAGRAM}")
    return HEADER.pack(len(payload)) + payload


def record_size(payload_size: int) -> int:
    """The bytes one datagram of ``payload_size`` takes on the stream (for credit checks)."""
    return HEADER.size + payload_size


class DatagramDecoder(RecordReader[bytes]):
    """Feed stream bytes in any chunking; get whole datagrams out.

    Every 16-bit length is valid, so no input is malformed: the only fault a peer can
    commit is to end the stream inside a record (:attr:`pending` is then non-zero).
    The buffer holds at most one incomplete record (64 KiB) beyond what was fed.
    """

    header = HEADER

    def record(self, fields: tuple[Any, ...], payload: bytes) -> bytes:
        return payload
