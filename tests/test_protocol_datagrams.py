"""The datagram records of ``connect udp`` streams: boundaries survive any chunking."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from supctl.protocol.datagrams import MAX_DATAGRAM, DatagramDecoder, encode_datagram, record_size


@given(
    datagrams=st.lists(st.binary(max_size=2000), max_size=20),
    cuts=st.lists(st.integers(min_value=0, max_value=50_000), max_size=30),
)
def test_any_chunking_gives_back_the_same_datagrams(datagrams: list[bytes], cuts: list[int]) -> None:
    wire = b"".join(encode_datagram(d) for d in datagrams)
    assert len(wire) == sum(record_size(len(d)) for d in datagrams)
    decoder, out, start = DatagramDecoder(), [], 0
    for cut in sorted(c % (len(wire) + 1) for c in cuts):
        out += decoder.feed(wire[start:cut])
        start = cut
    out += decoder.feed(wire[start:])
    assert out == datagrams and decoder.pending == 0


def test_empty_and_largest_datagrams() -> None:
    big = bytes(range(256)) * 255 + b"x" * 255
    assert len(big) == MAX_DATAGRAM
    assert DatagramDecoder().feed(encode_datagram(b"") + encode_datagram(big)) == [b"", big]
    with pytest.raises(ValueError, match="exceeds 65535"):
        encode_datagram(big + b"!")


def test_a_stream_ending_inside_a_record_is_seen() -> None:
    decoder = DatagramDecoder()
    assert decoder.feed(encode_datagram(b"hello")[:4]) == []
    assert decoder.pending == 4
