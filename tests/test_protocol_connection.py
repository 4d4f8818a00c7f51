"""Unit tests of the sans-I/O Connection: stream states, flow control, races, errors.

A is the opening side (odd ids, refuses peer streams, like supctl); B is the
accepting side (even ids, accepts streams, like the tower facing supctl).
"""

from __future__ import annotations

import os
import random
import struct
from collections import deque
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from supctl.protocol import (
    DEFAULT_WINDOW,
    EARLY_DATA,
    MAX_MESSAGE,
    MAX_MESSAGE_ACCEPTED,
    Connection,
    ConnectionClosed,
    ControlBound,
    ControlReceived,
    DataReceived,
    EndOfStream,
    ErrorCode,
    Event,
    FrameType,
    GoawayReceived,
    HelloReceived,
    LocalProtocolError,
    OpenRequest,
    StatusReceived,
    StreamAccepted,
    StreamOpened,
    StreamReset,
    WindowUpdated,
)
from supctl.protocol.connection import StreamState
from supctl.protocol.frames import (
    HEADER_SIZE,
    MAX_CONTROL,
    MAX_DATA,
    MAX_PAYLOAD,
    MAX_WINDOW,
    Frame,
    encode,
    encode_reset,
    encode_window,
    split_frames,
)

REQ = OpenRequest(verb="tcp", application="app", service_instance="si", protocol="tcp", port=80)


def u32(value: int) -> bytes:
    return struct.pack("!I", value)


def open_frame(sid: int, window: int = 4096, body: bytes | None = None) -> bytes:
    return encode(FrameType.OPEN, sid, u32(window) + (REQ.to_json() if body is None else body))


def pair(window_a: int = 4096, window_b: int = 4096, **kw_b: object) -> tuple[Connection, Connection]:
    # Tiny windows make every flow-control edge reachable; they need early data off.
    a = Connection(odd_ids=True, accept_streams=False, window=window_a, early_data=0)
    b = Connection(odd_ids=False, accept_streams=True, window=window_b, early_data=0, **kw_b)  # type: ignore[arg-type]
    return a, b


def drain(conn: Connection) -> list[Frame]:
    """Everything ``conn`` queued, as frames."""
    frames: list[Frame] = []
    while msg := conn.data_to_send():
        frames.extend(split_frames(msg))
    return frames


def pump(src: Connection, dst: Connection) -> list[Event]:
    """Deliver every message queued by ``src`` to ``dst``."""
    events: list[Event] = []
    while msg := src.data_to_send():
        events.extend(dst.receive_data(msg))
    return events


def assert_closed(events: list[Event], code: ErrorCode, conn: Connection) -> ConnectionClosed:
    assert events, "expected a ConnectionClosed event"
    closed = events[-1]
    assert isinstance(closed, ConnectionClosed), events
    assert closed.code is code, closed
    assert conn.closed == closed
    assert conn.stream_count == 0
    assert closed.close_code == 4000 + int(code)
    # A closed connection ignores everything afterwards.
    assert conn.receive_data(encode(FrameType.DATA, 1, b"x")) == []
    assert conn.receive_data(b"") == []
    return closed


def established(window_a: int = 4096, window_b: int = 4096) -> tuple[Connection, Connection, int]:
    a, b = pair(window_a, window_b)
    sid = a.open_stream(REQ)
    (opened,) = pump(a, b)
    assert opened == StreamOpened(sid, REQ)
    b.accept_stream(sid)
    assert pump(b, a) == [StreamAccepted(sid)]
    return a, b, sid


# --- constants -------------------------------------------------------------------------


def test_message_size_constants() -> None:
    assert DEFAULT_WINDOW == 256 * 1024
    assert EARLY_DATA == 64 * 1024 <= DEFAULT_WINDOW
    assert MAX_MESSAGE == 1024 * 1024
    assert MAX_MESSAGE_ACCEPTED == 2 * MAX_MESSAGE


@pytest.mark.parametrize("window", [0, -1, MAX_WINDOW + 1])
def test_window_out_of_range_is_refused(window: int) -> None:
    with pytest.raises(ValueError):
        Connection(odd_ids=True, accept_streams=False, window=window)


# --- opening ---------------------------------------------------------------------------


def test_open_accept_happy_path() -> None:
    a, b = pair(window_a=1000, window_b=3000)
    sid = a.open_stream(REQ)
    assert sid == 1
    assert a.is_open(sid) and a.stream_count == 1
    assert a.send_credit(sid) == 0  # no credit before ACCEPT
    (frame,) = split_frames(a.data_to_send())
    assert frame.type is FrameType.OPEN and frame.stream_id == 1
    assert frame.payload[:4] == u32(1000)
    assert OpenRequest.from_json(frame.payload[4:]) == REQ

    events = b.receive_data(encode(FrameType.OPEN, 1, frame.payload))
    assert events == [StreamOpened(1, REQ)]
    assert b.is_open(1) and b.send_credit(1) == 0  # pending: cannot send yet
    b.accept_stream(1)
    assert b.send_credit(1) == 1000  # A's window from OPEN
    (frame,) = split_frames(b.data_to_send())
    assert frame == Frame(FrameType.ACCEPT, 1, u32(3000))
    assert a.receive_data(encode(FrameType.ACCEPT, 1, frame.payload)) == [StreamAccepted(1)]
    assert a.send_credit(1) == 3000  # B's window from ACCEPT


def test_stream_ids_are_odd_and_increasing_for_the_odd_side() -> None:
    a, _ = pair()
    assert [a.open_stream(REQ) for _ in range(4)] == [1, 3, 5, 7]


def test_stream_ids_are_even_for_the_even_side() -> None:
    c = Connection(odd_ids=False, accept_streams=False)
    assert [c.open_stream(REQ) for _ in range(3)] == [2, 4, 6]


def test_peer_may_skip_stream_ids() -> None:
    _, b = pair()
    assert b.receive_data(open_frame(5)) == [StreamOpened(5, REQ)]
    assert b.receive_data(open_frame(11)) == [StreamOpened(11, REQ)]
    # A frame for a skipped id counts as an old stream: dropped, not fatal.
    assert b.receive_data(encode(FrameType.DATA, 7, b"x")) == []
    assert b.closed is None


def test_refuse_a_stream_with_reset() -> None:
    a, b = pair()
    sid = a.open_stream(REQ)
    pump(a, b)
    b.reset_stream(sid, ErrorCode.REFUSED, "connection refused")
    assert not b.is_open(sid)
    assert pump(b, a) == [StreamReset(sid, ErrorCode.REFUSED, "connection refused")]
    assert not a.is_open(sid) and a.stream_count == 0


def test_open_from_peer_not_allowed_closes_with_denied() -> None:
    a, _ = pair()
    events = a.receive_data(open_frame(2))
    assert_closed(events, ErrorCode.DENIED, a)


@pytest.mark.parametrize("sid", [1, 3, 5])
def test_open_with_wrong_parity_closes(sid: int) -> None:
    _, b = pair()  # B numbers its own streams 2, 4..., so the peer must use odd ids
    c = Connection(odd_ids=True, accept_streams=True)  # expects even ids from its peer
    assert_closed(c.receive_data(open_frame(sid)), ErrorCode.PROTOCOL, c)
    assert b.receive_data(open_frame(sid)) == [StreamOpened(sid, REQ)]


def test_open_with_own_parity_closes() -> None:
    _, b = pair()
    assert_closed(b.receive_data(open_frame(2)), ErrorCode.PROTOCOL, b)


@pytest.mark.parametrize("second", [1, 3])
def test_open_with_non_increasing_id_closes(second: int) -> None:
    _, b = pair()
    assert b.receive_data(open_frame(3)) == [StreamOpened(3, REQ)]
    events = b.receive_data(open_frame(second))
    closed = assert_closed(events, ErrorCode.PROTOCOL, b)
    assert "invalid stream id" in closed.reason


def test_reopening_a_finished_stream_id_closes() -> None:
    a, b, sid = established()
    a.reset_stream(sid, ErrorCode.CANCEL)
    pump(a, b)
    assert not b.is_open(sid)
    assert_closed(b.receive_data(open_frame(sid)), ErrorCode.PROTOCOL, b)


def test_open_too_short_closes() -> None:
    _, b = pair()
    assert_closed(b.receive_data(encode(FrameType.OPEN, 1, b"\x00\x00")), ErrorCode.PROTOCOL, b)


def test_open_with_window_above_max_closes_with_flow_control() -> None:
    _, b = pair()
    events = b.receive_data(open_frame(1, window=MAX_WINDOW + 1))
    assert_closed(events, ErrorCode.FLOW_CONTROL, b)


def test_open_with_max_window_and_zero_window_are_fine() -> None:
    _, b = pair()
    assert b.receive_data(open_frame(1, window=MAX_WINDOW)) == [StreamOpened(1, REQ)]
    assert b.receive_data(open_frame(3, window=0)) == [StreamOpened(3, REQ)]
    b.accept_stream(1)
    b.accept_stream(3)
    assert b.send_credit(1) == MAX_WINDOW
    assert b.send_credit(3) == 0


@pytest.mark.parametrize("body", [b"", b"{not json", b"[1]", b'{"verb":""}', b'{"verb":"x","port":-5}'])
def test_malformed_open_json_resets_only_that_stream(body: bytes) -> None:
    a, b, sid = established()
    bad = a.open_stream(REQ)
    (frame,) = drain(a)
    # The OPEN arrives with a broken request (same id, same window).
    events = b.receive_data(encode(FrameType.OPEN, bad, frame.payload[:4] + body))
    assert len(events) == 1
    reset = events[0]
    assert isinstance(reset, StreamReset)
    assert (reset.stream_id, reset.code, reset.local) == (bad, ErrorCode.PROTOCOL, True)
    assert b.closed is None and not b.is_open(bad)
    # The RESET goes back to the opener, which forgets the stream.
    (frame,) = drain(b)
    assert frame.type is FrameType.RESET and frame.stream_id == bad
    assert frame.payload[:2] == b"\x00\x07"
    (event,) = pump_frames(a, [frame])
    assert isinstance(event, StreamReset) and event.code is ErrorCode.PROTOCOL and not event.local
    assert not a.is_open(bad) and a.closed is None
    # The id is used up: later frames for it are dropped.
    assert b.receive_data(encode(FrameType.DATA, bad, b"late")) == []
    # Other streams keep working, and new streams open fine.
    a.send_data(sid, b"still here")
    assert pump(a, b) == [DataReceived(sid, b"still here")]
    sid2 = a.open_stream(REQ)
    assert sid2 > bad
    assert pump(a, b) == [StreamOpened(sid2, REQ)]
    assert b.closed is None


def test_max_streams_limit_resets_with_limit() -> None:
    a, b = pair(max_streams=2)
    s1, s2, s3 = (a.open_stream(REQ) for _ in range(3))
    events = pump(a, b)
    assert events == [StreamOpened(s1, REQ), StreamOpened(s2, REQ)]
    assert not b.is_open(s3) and b.stream_count == 2
    assert pump(b, a) == [StreamReset(s3, ErrorCode.LIMIT, "more than 2 streams")]
    assert a.stream_count == 2
    # Once a stream is gone there is room again.
    b.reset_stream(s1, ErrorCode.CANCEL)
    pump(b, a)
    s4 = a.open_stream(REQ)
    assert pump(a, b) == [StreamOpened(s4, REQ)]


# --- ACCEPT -----------------------------------------------------------------------------


def test_accept_of_a_stream_that_is_not_pending_is_local_error() -> None:
    a, b, sid = established()
    with pytest.raises(LocalProtocolError):
        b.accept_stream(sid)
    with pytest.raises(LocalProtocolError):
        a.accept_stream(sid)  # we opened it
    with pytest.raises(LocalProtocolError):
        b.accept_stream(99)


def test_second_accept_resets_the_stream() -> None:
    a, _, sid = established()
    events = a.receive_data(encode(FrameType.ACCEPT, sid, u32(10)))
    assert len(events) == 1 and isinstance(events[0], StreamReset)
    assert events[0].code is ErrorCode.PROTOCOL and events[0].local
    assert not a.is_open(sid) and a.closed is None
    (frame,) = drain(a)
    assert frame.type is FrameType.RESET and frame.stream_id == sid


def test_accept_for_a_stream_the_peer_opened_resets_it() -> None:
    _, b = pair()
    b.receive_data(open_frame(1))
    events = b.receive_data(encode(FrameType.ACCEPT, 1, u32(10)))
    assert [type(e) for e in events] == [StreamReset]
    assert b.closed is None and not b.is_open(1)


@pytest.mark.parametrize("payload", [b"", b"\x00\x00\x10", b"\x00\x00\x10\x00\x00"])
def test_accept_with_bad_payload_closes(payload: bytes) -> None:
    a, _ = pair()
    sid = a.open_stream(REQ)
    assert_closed(a.receive_data(encode(FrameType.ACCEPT, sid, payload)), ErrorCode.PROTOCOL, a)


def test_accept_with_window_above_max_closes() -> None:
    a, _ = pair()
    sid = a.open_stream(REQ)
    events = a.receive_data(encode(FrameType.ACCEPT, sid, u32(MAX_WINDOW + 1)))
    assert_closed(events, ErrorCode.FLOW_CONTROL, a)


# --- DATA and flow control ---------------------------------------------------------------


def test_data_both_ways() -> None:
    a, b, sid = established()
    a.send_data(sid, b"ping")
    assert pump(a, b) == [DataReceived(sid, b"ping")]
    b.send_data(sid, bytearray(b"pong"))
    assert pump(b, a) == [DataReceived(sid, b"pong")]
    a.send_data(sid, memoryview(b"xyz"))
    assert pump(a, b) == [DataReceived(sid, b"xyz")]


def test_empty_data_sends_nothing_and_an_empty_frame_gives_no_event() -> None:
    a, b, sid = established()
    a.send_data(sid, b"")
    assert a.pending_output == 0
    assert b.receive_data(encode(FrameType.DATA, sid, b"")) == []
    assert b.is_open(sid) and b.closed is None


def test_send_credit_counts_down_and_window_restores_it() -> None:
    a, b, sid = established(window_a=4096, window_b=100)
    assert a.send_credit(sid) == 100
    a.send_data(sid, b"x" * 60)
    assert a.send_credit(sid) == 40
    pump(a, b)
    b.consumed(sid, 49)  # below half a window: nothing sent yet
    assert b.pending_output == 0
    b.consumed(sid, 1)  # 50 == half: one WINDOW of 50
    (frame,) = drain(b)
    assert frame == Frame(FrameType.WINDOW, sid, u32(50))
    assert a.receive_data(encode_window(sid, 50)) == [WindowUpdated(sid)]
    assert a.send_credit(sid) == 90


def test_sending_beyond_credit_is_local_error() -> None:
    a, _, sid = established(window_b=10)
    with pytest.raises(LocalProtocolError, match="exceed the credit"):
        a.send_data(sid, b"x" * 11)
    assert a.send_credit(sid) == 10 and a.pending_output == 0
    a.send_data(sid, b"x" * 10)
    with pytest.raises(LocalProtocolError):
        a.send_data(sid, b"y")


def test_sending_before_accept_is_local_error() -> None:
    a, b = pair()  # early_data=0: nothing may be sent before ACCEPT
    sid = a.open_stream(REQ)
    with pytest.raises(LocalProtocolError):
        a.send_data(sid, b"x")
    pump(a, b)
    with pytest.raises(LocalProtocolError):
        b.send_data(sid, b"x")  # pending: accept first
    with pytest.raises(LocalProtocolError):
        b.send_eof(sid)


def test_sending_on_unknown_stream_is_local_error() -> None:
    a, _ = pair()
    actions: tuple[Callable[[], None], ...] = (
        lambda: a.send_data(1, b"x"),
        lambda: a.send_eof(1),
        lambda: a.accept_stream(1),
    )
    for action in actions:
        with pytest.raises(LocalProtocolError):
            action()
    a.reset_stream(1, ErrorCode.CANCEL)  # a no-op, never an error
    a.consumed(1, 10)  # likewise
    assert a.pending_output == 0


def test_data_beyond_window_closes_with_flow_control() -> None:
    a, b, sid = established(window_b=64)
    a.send_data(sid, b"x" * 64)
    assert pump(a, b) == [DataReceived(sid, b"x" * 64)]
    events = b.receive_data(encode(FrameType.DATA, sid, b"y"))
    assert_closed(events, ErrorCode.FLOW_CONTROL, b)


def test_data_beyond_window_in_one_frame_closes() -> None:
    _, b, sid = established(window_b=64)
    events = b.receive_data(encode(FrameType.DATA, sid, b"z" * 65))
    assert_closed(events, ErrorCode.FLOW_CONTROL, b)


def test_data_exactly_filling_the_window_with_credit_in_between() -> None:
    a, b, sid = established(window_b=64)
    a.send_data(sid, b"x" * 64)
    pump(a, b)
    b.consumed(sid, 64)
    pump(b, a)
    assert a.send_credit(sid) == 64
    a.send_data(sid, b"y" * 64)
    assert pump(a, b) == [DataReceived(sid, b"y" * 64)]
    assert b.closed is None


def test_large_send_is_split_into_max_data_frames() -> None:
    size = 2 * MAX_DATA + 10
    a, _, sid = established(window_b=4 * MAX_DATA)
    a.send_data(sid, b"q" * size)
    frames = drain(a)
    assert [len(f.payload) for f in frames] == [MAX_DATA, MAX_DATA, 10]
    assert all(f.type is FrameType.DATA for f in frames)


def test_window_batching_is_half_a_window() -> None:
    a, b, sid = established(window_b=1000)
    a.send_data(sid, b"x" * 1000)
    pump(a, b)
    for _ in range(4):
        b.consumed(sid, 100)
    assert b.pending_output == 0
    b.consumed(sid, 100)
    assert drain(b) == [Frame(FrameType.WINDOW, sid, u32(500))]
    b.consumed(sid, 499)
    assert b.pending_output == 0
    b.consumed(sid, 1)
    assert drain(b) == [Frame(FrameType.WINDOW, sid, u32(500))]


def test_consumed_with_window_of_one_byte() -> None:
    a, b, sid = established(window_b=1)
    a.send_data(sid, b"x")
    pump(a, b)
    b.consumed(sid, 0)  # nothing consumed: no WINDOW, in particular no zero WINDOW
    assert b.pending_output == 0
    b.consumed(sid, 1)
    assert pump(b, a) == [WindowUpdated(sid)]
    assert a.closed is None and a.send_credit(sid) == 1


def test_no_window_after_remote_eof() -> None:
    a, b, sid = established(window_b=100)
    a.send_data(sid, b"x" * 100)
    a.send_eof(sid)
    assert pump(a, b) == [DataReceived(sid, b"x" * 100), EndOfStream(sid)]
    b.consumed(sid, 100)
    assert b.pending_output == 0


def test_window_of_zero_closes() -> None:
    a, _, sid = established()
    assert_closed(a.receive_data(encode_window(sid, 0)), ErrorCode.FLOW_CONTROL, a)


def test_window_overflow_closes() -> None:
    a, _, sid = established(window_b=100)
    assert a.receive_data(encode_window(sid, MAX_WINDOW - 100)) == [WindowUpdated(sid)]
    assert a.send_credit(sid) == MAX_WINDOW
    assert_closed(a.receive_data(encode_window(sid, 1)), ErrorCode.FLOW_CONTROL, a)


@pytest.mark.parametrize("payload", [b"", b"\x00\x00\x01", b"\x00\x00\x00\x01\x00"])
def test_window_with_bad_payload_closes(payload: bytes) -> None:
    a, _, sid = established()
    assert_closed(a.receive_data(encode(FrameType.WINDOW, sid, payload)), ErrorCode.PROTOCOL, a)


def test_window_after_local_eof_gives_no_event_but_counts() -> None:
    a, _, sid = established(window_b=100)
    a.send_data(sid, b"x" * 100)
    a.send_eof(sid)
    assert a.send_credit(sid) == 0
    assert a.receive_data(encode_window(sid, 50)) == []
    assert a.is_open(sid) and a.closed is None


def test_window_on_pending_stream_adds_credit() -> None:
    _, b = pair()
    b.receive_data(open_frame(1, window=10))
    assert b.receive_data(encode_window(1, 5)) == []  # not open yet: no event
    b.accept_stream(1)
    assert b.send_credit(1) == 15


# --- EOF (half-close) --------------------------------------------------------------------


def test_half_close_then_full_close_forgets_the_stream() -> None:
    a, b, sid = established()
    a.send_data(sid, b"request")
    a.send_eof(sid)
    assert a.is_open(sid) and a.send_credit(sid) == 0
    with pytest.raises(LocalProtocolError):
        a.send_data(sid, b"more")
    with pytest.raises(LocalProtocolError):
        a.send_eof(sid)
    assert pump(a, b) == [DataReceived(sid, b"request"), EndOfStream(sid)]
    assert b.is_open(sid)
    # B can still answer after A's EOF.
    b.send_data(sid, b"response")
    b.send_eof(sid)
    assert not b.is_open(sid)  # both EOFs: B forgets at once
    assert pump(b, a) == [DataReceived(sid, b"response"), EndOfStream(sid)]
    assert not a.is_open(sid)
    assert a.stream_count == b.stream_count == 0


def test_simultaneous_eof() -> None:
    a, b, sid = established()
    a.send_eof(sid)
    b.send_eof(sid)
    assert pump(a, b) == [EndOfStream(sid)]
    assert pump(b, a) == [EndOfStream(sid)]
    assert a.stream_count == b.stream_count == 0


def test_data_after_eof_resets_the_stream() -> None:
    a, b, sid = established()
    a.send_eof(sid)
    pump(a, b)
    events = b.receive_data(encode(FrameType.DATA, sid, b"x"))
    assert len(events) == 1 and isinstance(events[0], StreamReset) and events[0].local
    assert b.closed is None and not b.is_open(sid)
    (frame,) = drain(b)
    assert frame.type is FrameType.RESET
    assert pump_frames(a, [frame]) == [
        StreamReset(sid, ErrorCode.PROTOCOL, "DATA on a stream that is not open")
    ]


def test_second_eof_resets_the_stream() -> None:
    a, b, sid = established()
    a.send_eof(sid)
    pump(a, b)
    events = b.receive_data(encode(FrameType.EOF, sid))
    assert [type(e) for e in events] == [StreamReset]
    assert b.closed is None and not b.is_open(sid)


def test_eof_with_payload_resets_the_stream() -> None:
    _, b, sid = established()
    events = b.receive_data(encode(FrameType.EOF, sid, b"junk"))
    assert [type(e) for e in events] == [StreamReset]
    assert b.closed is None


def test_eof_on_pending_stream_is_early_half_close() -> None:
    _, b = pair()
    b.receive_data(open_frame(1))
    assert b.receive_data(encode(FrameType.EOF, 1)) == [EndOfStream(1)]
    assert b.is_open(1)  # still waiting for our ACCEPT; we may answer after it
    b.accept_stream(1)
    b.send_data(1, b"late answer")
    b.send_eof(1)
    assert not b.is_open(1)


def test_data_on_opening_stream_resets_it_and_early_data_is_bounded() -> None:
    a, b = pair()
    sid = a.open_stream(REQ)
    assert [type(e) for e in a.receive_data(encode(FrameType.DATA, sid, b"x"))] == [StreamReset]
    assert a.closed is None
    # With early_data=0, any DATA before ACCEPT exceeds what the opener may send.
    b.receive_data(open_frame(1))
    assert [type(e) for e in b.receive_data(encode(FrameType.DATA, 1, b"x"))] == [ConnectionClosed]
    assert b.closed is not None and b.closed.code is ErrorCode.FLOW_CONTROL


def test_early_data_travels_before_accept() -> None:
    a = Connection(odd_ids=True, accept_streams=False)
    b = Connection(odd_ids=False, accept_streams=True)
    sid = a.open_stream(REQ)
    assert a.send_credit(sid) == EARLY_DATA
    a.send_data(sid, b"x" * EARLY_DATA)
    a.send_eof(sid)
    events = b.receive_data(a.data_to_send())
    assert [type(e) for e in events] == [StreamOpened, DataReceived, EndOfStream]
    b.accept_stream(sid)
    b.send_data(sid, b"answer")
    b.send_eof(sid)
    events = a.receive_data(b.data_to_send())
    assert [type(e) for e in events] == [StreamAccepted, DataReceived, EndOfStream]
    assert not a.is_open(sid) and not b.is_open(sid)


def test_early_data_beyond_the_allowance_closes() -> None:
    b = Connection(odd_ids=False, accept_streams=True)
    b.receive_data(open_frame(1, window=DEFAULT_WINDOW))
    events = b.receive_data(
        encode(FrameType.DATA, 1, b"x" * (EARLY_DATA // 2)) * 2 + encode(FrameType.DATA, 1, b"y")
    )
    assert isinstance(events[-1], ConnectionClosed) and events[-1].code is ErrorCode.FLOW_CONTROL


def test_window_below_early_data_is_refused() -> None:
    b = Connection(odd_ids=False, accept_streams=True)
    (closed,) = b.receive_data(open_frame(1, window=EARLY_DATA - 1))
    assert isinstance(closed, ConnectionClosed) and closed.code is ErrorCode.FLOW_CONTROL


@pytest.mark.parametrize(
    ("window", "early_data"),
    [(EARLY_DATA - 1, EARLY_DATA), (0, 0), (100, -1), (100, 101), (MAX_WINDOW + 1, 0)],
)
def test_constructor_refuses_windows_below_the_early_allowance(window: int, early_data: int) -> None:
    with pytest.raises(ValueError):
        Connection(odd_ids=True, accept_streams=False, window=window, early_data=early_data)


def test_accept_below_early_data_closes() -> None:
    a = Connection(odd_ids=True, accept_streams=False)
    sid = a.open_stream(REQ)
    events = a.receive_data(encode(FrameType.ACCEPT, sid, u32(EARLY_DATA - 1)))
    assert_closed(events, ErrorCode.FLOW_CONTROL, a)


def test_early_data_credit_is_topped_up_by_accept() -> None:
    a = Connection(odd_ids=True, accept_streams=False, window=EARLY_DATA)
    b = Connection(odd_ids=False, accept_streams=True, window=4 * EARLY_DATA)
    sid = a.open_stream(REQ)
    a.send_data(sid, b"e" * 1000)
    assert a.send_credit(sid) == EARLY_DATA - 1000
    assert pump(a, b) == [StreamOpened(sid, REQ), DataReceived(sid, b"e" * 1000)]
    b.accept_stream(sid)
    assert pump(b, a) == [StreamAccepted(sid)]
    # B's real window replaces the early allowance; what was sent stays spent.
    assert a.send_credit(sid) == 4 * EARLY_DATA - 1000
    assert b._streams[sid].recv_window == 4 * EARLY_DATA - 1000


def test_window_for_early_data_before_accept() -> None:
    """The acceptor may hand back credit for early data it consumed before accepting."""
    a = Connection(odd_ids=True, accept_streams=False)
    b = Connection(odd_ids=False, accept_streams=True, window=EARLY_DATA)
    sid = a.open_stream(REQ)
    a.send_data(sid, b"x" * EARLY_DATA)
    assert a.send_credit(sid) == 0
    pump(a, b)
    b.consumed(sid, EARLY_DATA)  # still PENDING
    assert pump(b, a) == [WindowUpdated(sid)]  # an OPENING stream gets the event too
    assert a.send_credit(sid) == EARLY_DATA
    a.send_data(sid, b"y" * EARLY_DATA)  # B allows it: its window grew by the credit it gave
    assert pump(a, b) == [DataReceived(sid, b"y" * EARLY_DATA)]
    assert b.closed is None
    b.accept_stream(sid)
    pump(b, a)
    assert a.send_credit(sid) == 0  # ACCEPT of a window equal to EARLY_DATA adds nothing


def test_early_data_then_refusal() -> None:
    a = Connection(odd_ids=True, accept_streams=False)
    b = Connection(odd_ids=False, accept_streams=True)
    sid = a.open_stream(REQ)
    a.send_data(sid, b"GET / HTTP/1.0\r\n\r\n")
    a.send_eof(sid)
    events = pump(a, b)
    assert [type(e) for e in events] == [StreamOpened, DataReceived, EndOfStream]
    b.reset_stream(sid, ErrorCode.REFUSED, "connection refused")
    assert pump(b, a) == [StreamReset(sid, ErrorCode.REFUSED, "connection refused")]
    assert a.stream_count == b.stream_count == 0


def test_early_data_crossing_a_refusal_is_dropped() -> None:
    a = Connection(odd_ids=True, accept_streams=False)
    b = Connection(odd_ids=False, accept_streams=True)
    sid = a.open_stream(REQ)
    pump(a, b)
    b.reset_stream(sid, ErrorCode.REFUSED)
    a.send_data(sid, b"x" * 100)  # A has not seen the refusal yet
    a.send_eof(sid)
    assert pump(a, b) == []
    assert b.closed is None
    assert pump(b, a) == [StreamReset(sid, ErrorCode.REFUSED, "")]


def test_no_control_before_accept_even_with_early_data() -> None:
    a = Connection(odd_ids=True, accept_streams=False)
    sid = a.open_stream(REQ)
    assert a.send_credit(sid) == EARLY_DATA
    with pytest.raises(LocalProtocolError):
        a.send_control(sid, {"signal": "INT"})


# --- RESET ------------------------------------------------------------------------------


def test_reset_by_peer() -> None:
    a, b, sid = established()
    a.reset_stream(sid, ErrorCode.CANCEL, "user pressed ^C")
    assert not a.is_open(sid)
    assert pump(a, b) == [StreamReset(sid, ErrorCode.CANCEL, "user pressed ^C")]
    assert not b.is_open(sid)
    with pytest.raises(LocalProtocolError):
        b.send_data(sid, b"x")
    b.reset_stream(sid, ErrorCode.CANCEL)  # late local reset: no-op, nothing sent
    assert b.pending_output == 0


def test_reset_of_an_opening_stream() -> None:
    a, b = pair()
    sid = a.open_stream(REQ)
    a.reset_stream(sid, ErrorCode.CANCEL)
    # OPEN and RESET travel in order: B sees the stream come and go.
    assert pump(a, b) == [StreamOpened(sid, REQ), StreamReset(sid, ErrorCode.CANCEL, "")]
    assert b.stream_count == 0


def test_reset_with_unknown_code_is_internal() -> None:
    a, _, sid = established()
    events = a.receive_data(encode(FrameType.RESET, sid, b"\x01\x00oops"))
    assert events == [StreamReset(sid, ErrorCode.INTERNAL, "oops")]


@pytest.mark.parametrize("payload", [b"", b"\x00"])
def test_reset_too_short_closes(payload: bytes) -> None:
    a, _, sid = established()
    assert_closed(a.receive_data(encode(FrameType.RESET, sid, payload)), ErrorCode.PROTOCOL, a)


def test_reset_text_with_invalid_utf8_is_replaced() -> None:
    a, _, sid = established()
    (event,) = a.receive_data(encode(FrameType.RESET, sid, b"\x00\x01\xff"))
    assert event == StreamReset(sid, ErrorCode.CANCEL, "\ufffd")


# --- races that must be tolerated ----------------------------------------------------------


def pump_frames(dst: Connection, frames: list[Frame]) -> list[Event]:
    events: list[Event] = []
    for f in frames:
        events.extend(dst.receive_data(encode(f.type, f.stream_id, f.payload)))
    return events


def test_data_crossing_a_reset_is_dropped() -> None:
    a, b, sid = established()
    a.send_data(sid, b"in flight")
    in_flight = drain(a)
    b.reset_stream(sid, ErrorCode.CANCEL)
    assert pump_frames(b, in_flight) == []
    assert b.closed is None
    assert pump(b, a) == [StreamReset(sid, ErrorCode.CANCEL, "")]


def test_window_crossing_a_reset_is_dropped() -> None:
    a, b, sid = established(window_b=100)
    a.send_data(sid, b"x" * 100)
    pump(a, b)
    b.consumed(sid, 100)
    in_flight = drain(b)
    assert [f.type for f in in_flight] == [FrameType.WINDOW]
    a.reset_stream(sid, ErrorCode.CANCEL)
    assert pump_frames(a, in_flight) == []
    assert a.closed is None


def test_eof_and_accept_crossing_a_reset_are_dropped() -> None:
    a, b = pair()
    sid = a.open_stream(REQ)
    pump(a, b)
    b.accept_stream(sid)
    b.send_eof(sid)
    in_flight = drain(b)
    a.reset_stream(sid, ErrorCode.CANCEL)
    assert pump_frames(a, in_flight) == []  # ACCEPT and EOF both dropped
    assert a.closed is None
    assert pump(a, b) == [StreamReset(sid, ErrorCode.CANCEL, "")]


def test_reset_crossing_a_reset_is_dropped() -> None:
    a, b, sid = established()
    a.reset_stream(sid, ErrorCode.CANCEL)
    b.reset_stream(sid, ErrorCode.INTERNAL)
    assert pump(a, b) == []
    assert pump(b, a) == []
    assert a.closed is None and b.closed is None


def test_window_crossing_the_final_eof_is_dropped() -> None:
    a, b, sid = established(window_a=100)
    b.send_data(sid, b"x" * 100)
    b.send_eof(sid)
    a.send_eof(sid)
    # B receives A's EOF: it has sent its own, so it forgets the stream.
    assert pump(a, b) == [EndOfStream(sid)]
    assert not b.is_open(sid)
    # A reads B's data and credits it back before seeing B's EOF...
    events = a.receive_data(b.data_to_send(limit=HEADER_SIZE + 100))
    assert events == [DataReceived(sid, b"x" * 100)]
    a.consumed(sid, 100)
    window = drain(a)
    assert [f.type for f in window] == [FrameType.WINDOW]
    assert pump(b, a) == [EndOfStream(sid)]
    assert not a.is_open(sid)
    # ...and that WINDOW reaches B after B forgot the stream: dropped.
    assert pump_frames(b, window) == []
    assert b.closed is None


def test_refusal_crossing_a_cancel_is_dropped() -> None:
    a, b = pair()
    sid = a.open_stream(REQ)
    pump(a, b)
    b.reset_stream(sid, ErrorCode.NOT_FOUND, "no such container")
    a.reset_stream(sid, ErrorCode.CANCEL)  # A gave up at the same time
    assert pump(b, a) == []
    assert pump(a, b) == []


# --- frames for streams that never existed --------------------------------------------------


@pytest.mark.parametrize(
    "frame",
    [
        encode(FrameType.DATA, 1, b"x"),
        encode(FrameType.EOF, 1),
        encode_window(1, 10),
        encode(FrameType.ACCEPT, 1, u32(10)),
        encode_reset(1, ErrorCode.CANCEL, ""),
    ],
)
def test_frames_for_never_opened_peer_ids_close(frame: bytes) -> None:
    _, b = pair()
    closed = assert_closed(b.receive_data(frame), ErrorCode.PROTOCOL, b)
    assert "unknown stream 1" in closed.reason


@pytest.mark.parametrize("sid", [3, 5, 0xFFFFFFFF])
def test_frames_for_never_opened_own_ids_close(sid: int) -> None:
    a, _ = pair()
    a.open_stream(REQ)  # 1 is used, higher odd ids are not
    assert a.receive_data(encode(FrameType.EOF, 1)) != []  # known stream: a stream error at most
    events = a.receive_data(encode(FrameType.EOF, sid))
    assert_closed(events, ErrorCode.PROTOCOL, a)


@pytest.mark.parametrize("ftype", [FrameType.DATA, FrameType.EOF, FrameType.ACCEPT, FrameType.RESET])
def test_stream_frames_on_stream_zero_close(ftype: FrameType) -> None:
    a, _ = pair()
    closed = assert_closed(a.receive_data(encode(ftype, 0, b"")), ErrorCode.PROTOCOL, a)
    assert "stream 0" in closed.reason


def test_open_on_stream_zero_closes() -> None:
    _, b = pair()
    assert_closed(b.receive_data(open_frame(0)), ErrorCode.PROTOCOL, b)


# --- HELLO ----------------------------------------------------------------------------------


def hello(payload: bytes = b'{"site":"edge-1"}', sid: int = 0) -> bytes:
    return encode(FrameType.HELLO, sid, payload)


def test_hello_is_accepted_once() -> None:
    tower = Connection(odd_ids=True, accept_streams=False, accept_hello=True)
    assert tower.receive_data(hello()) == [HelloReceived({"site": "edge-1"})]
    assert_closed(tower.receive_data(hello()), ErrorCode.PROTOCOL, tower)


def test_hello_not_expected_closes() -> None:
    a, b = pair()
    assert_closed(a.receive_data(hello()), ErrorCode.PROTOCOL, a)
    assert_closed(b.receive_data(hello()), ErrorCode.PROTOCOL, b)


def test_hello_on_a_nonzero_stream_closes() -> None:
    tower = Connection(odd_ids=True, accept_streams=False, accept_hello=True)
    assert_closed(tower.receive_data(hello(sid=1)), ErrorCode.PROTOCOL, tower)


@pytest.mark.parametrize("payload", [b"", b"[]", b"nope", b"\xff"])
def test_hello_that_is_not_a_json_object_closes(payload: bytes) -> None:
    tower = Connection(odd_ids=True, accept_streams=False, accept_hello=True)
    assert_closed(tower.receive_data(hello(payload)), ErrorCode.PROTOCOL, tower)


def test_send_hello_and_then_open_streams() -> None:
    enforcer = Connection(odd_ids=False, accept_streams=True)
    tower = Connection(odd_ids=True, accept_streams=False, accept_hello=True)
    enforcer.send_hello({"site": "edge-1", "version": 1})
    assert pump(enforcer, tower) == [HelloReceived({"site": "edge-1", "version": 1})]
    sid = tower.open_stream(REQ)
    assert pump(tower, enforcer) == [StreamOpened(sid, REQ)]


def test_hello_and_open_in_one_message() -> None:
    tower = Connection(odd_ids=False, accept_streams=True, accept_hello=True)
    events = tower.receive_data(hello() + open_frame(1, window=DEFAULT_WINDOW))
    assert events == [HelloReceived({"site": "edge-1"}), StreamOpened(1, REQ)]


# --- CONTROL: small JSON objects on a stream, outside flow control ------------------------------


def test_control_both_ways_without_credit() -> None:
    a, b, sid = established(window_a=64, window_b=64)
    a.send_data(sid, b"x" * 64)  # all credit used
    a.send_control(sid, {"signal": "INT"})
    assert a.send_credit(sid) == 0
    assert pump(a, b) == [DataReceived(sid, b"x" * 64), ControlReceived(sid, {"signal": "INT"})]
    b.send_control(sid, {"exit-status": 3})
    assert pump(b, a) == [ControlReceived(sid, {"exit-status": 3})]
    assert a.closed is None and b.closed is None


def test_control_keeps_its_place_among_data_and_eof() -> None:
    a, b, sid = established()
    a.send_data(sid, b"1")
    a.send_control(sid, {"n": 1})
    a.send_data(sid, b"2")
    a.send_eof(sid)
    a.send_control(sid, {"n": 2})  # after our own EOF: allowed
    assert pump(a, b) == [
        DataReceived(sid, b"1"),
        ControlReceived(sid, {"n": 1}),
        DataReceived(sid, b"2"),
        EndOfStream(sid),
        ControlReceived(sid, {"n": 2}),
    ]
    b.send_control(sid, {"exit-status": 0})  # after the peer's EOF: allowed
    b.send_eof(sid)
    assert pump(b, a) == [ControlReceived(sid, {"exit-status": 0}), EndOfStream(sid)]
    assert a.stream_count == b.stream_count == 0
    with pytest.raises(LocalProtocolError):
        a.send_control(sid, {})  # gone after both EOFs


def test_send_control_before_the_stream_is_open_is_local_error() -> None:
    a, b = pair()
    sid = a.open_stream(REQ)
    with pytest.raises(LocalProtocolError):
        a.send_control(sid, {})  # OPENING
    pump(a, b)
    with pytest.raises(LocalProtocolError):
        b.send_control(sid, {})  # PENDING
    with pytest.raises(LocalProtocolError):
        b.send_control(99, {})


def test_send_control_oversize_is_local_error() -> None:
    a, _, sid = established()
    big = {"x": "y" * MAX_CONTROL}
    with pytest.raises(LocalProtocolError, match="exceeds"):
        a.send_control(sid, big)
    assert a.pending_output == 0
    a.send_control(sid, {"x": "y" * (MAX_CONTROL - 8)})  # exactly MAX_CONTROL bytes of JSON
    (frame,) = drain(a)
    assert len(frame.payload) == MAX_CONTROL


@pytest.mark.parametrize(
    "payload",
    [b"", b"{", b"[1]", b"null", b"\xff", b"{" + b" " * MAX_CONTROL + b"}"],
    ids=["empty", "truncated", "list", "null", "not-utf8", "oversize"],
)
def test_bad_control_resets_the_stream_only(payload: bytes) -> None:
    a, b, sid = established()
    other = a.open_stream(REQ)
    pump(a, b)
    b.accept_stream(other)
    pump(b, a)
    events = b.receive_data(encode(FrameType.CONTROL, sid, payload))
    assert len(events) == 1 and isinstance(events[0], StreamReset)
    assert events[0].code is ErrorCode.PROTOCOL and events[0].local
    assert b.closed is None and not b.is_open(sid) and b.is_open(other)
    a.send_data(other, b"fine")
    assert pump(a, b) == [DataReceived(other, b"fine")]


def test_control_on_pending_or_opening_stream_resets_it() -> None:
    a, b = pair()
    b.receive_data(open_frame(1))
    assert [type(e) for e in b.receive_data(encode(FrameType.CONTROL, 1, b"{}"))] == [StreamReset]
    sid = a.open_stream(REQ)
    assert [type(e) for e in a.receive_data(encode(FrameType.CONTROL, sid, b"{}"))] == [StreamReset]
    assert a.closed is None and b.closed is None


def test_control_crossing_a_reset_is_dropped() -> None:
    a, b, sid = established()
    a.send_control(sid, {"signal": "TERM"})
    in_flight = drain(a)
    b.reset_stream(sid, ErrorCode.CANCEL)
    assert pump_frames(b, in_flight) == []
    assert b.closed is None


def test_control_for_never_opened_stream_or_stream_zero_closes() -> None:
    _, b = pair()
    assert_closed(b.receive_data(encode(FrameType.CONTROL, 1, b"{}")), ErrorCode.PROTOCOL, b)
    _, b = pair()
    assert_closed(b.receive_data(encode(FrameType.CONTROL, 0, b"{}")), ErrorCode.PROTOCOL, b)


def test_send_control_after_close_is_local_error() -> None:
    a, _, sid = established()
    a.close(ErrorCode.INTERNAL, "test")
    with pytest.raises(LocalProtocolError):
        a.send_control(sid, {})


# --- the bound on unread CONTROL (ControlBound, opt-in) ----------------------------------------


def bounded(bound: ControlBound) -> tuple[Connection, Connection, int]:
    """A established stream whose receiving side B bounds unread CONTROL."""
    a, b = pair(control_bound=bound)
    sid = a.open_stream(REQ)
    pump(a, b)
    b.accept_stream(sid)
    pump(b, a)
    return a, b, sid


def control_frame(sid: int, size: int) -> bytes:
    """A CONTROL frame of exactly ``size`` bytes of JSON."""
    body = b'{"x":"' + b"y" * (size - 8) + b'"}'
    assert len(body) == size
    return encode(FrameType.CONTROL, sid, body)


def test_control_beyond_the_frame_bound_resets_the_stream_with_limit() -> None:
    a, b, sid = bounded(ControlBound(frames=3, size=MAX_CONTROL))
    for n in range(3):
        a.send_control(sid, {"n": n})
    assert [type(e) for e in pump(a, b)] == [ControlReceived] * 3
    a.send_control(sid, {"n": 3})
    a.send_data(sid, b"late")
    text = f"more than 3 unread CONTROL messages or {MAX_CONTROL} bytes"
    # The fourth resets the stream; what follows crosses the RESET and is dropped.
    assert pump(a, b) == [StreamReset(sid, ErrorCode.LIMIT, text, local=True)]
    assert b.closed is None and not b.is_open(sid)
    assert pump(b, a) == [StreamReset(sid, ErrorCode.LIMIT, text)]
    # A flood after the RESET costs nothing: dropped without parsing.
    assert b.receive_data(b"".join(control_frame(sid, 64) for _ in range(1000))) == []


def test_control_beyond_the_byte_bound_resets_the_stream() -> None:
    _, b, sid = bounded(ControlBound(frames=100, size=MAX_CONTROL))
    events = b.receive_data(control_frame(sid, MAX_CONTROL - 10) + control_frame(sid, 11))
    assert isinstance(events[0], ControlReceived) and events[0].size == MAX_CONTROL - 10
    assert events[1:] == [StreamReset(sid, ErrorCode.LIMIT, events[1].text, local=True)]  # type: ignore[union-attr]


def test_control_consumed_makes_room_again() -> None:
    a, b, sid = bounded(ControlBound(frames=2, size=MAX_CONTROL))
    for n in range(50):
        a.send_control(sid, {"signal": "INT", "n": n})
        (event,) = pump(a, b)
        assert isinstance(event, ControlReceived) and event.size == len(b'{"signal":"INT","n":%d}' % n)
        b.control_consumed(sid, event.size)
    assert b.is_open(sid)
    b.control_consumed(sid, 10**6)  # more than ever received: counters stay at zero
    b.control_consumed(999, 1)  # unknown stream: no-op
    for n in range(2):
        a.send_control(sid, {"n": n})
    assert len(pump(a, b)) == 2 and b.is_open(sid)


def test_without_a_bound_control_is_not_limited() -> None:
    a, b, sid = established()  # the default: no bound (supctl's and the tower's links)
    for n in range(500):
        a.send_control(sid, {"n": n})
    assert len(pump(a, b)) == 500 and b.is_open(sid)


@pytest.mark.parametrize(("frames", "size"), [(0, MAX_CONTROL), (1, MAX_CONTROL - 1)])
def test_a_bound_must_allow_one_largest_message(frames: int, size: int) -> None:
    with pytest.raises(ValueError, match="at least one message"):
        ControlBound(frames, size)


@settings(max_examples=200, deadline=None, database=None)
@given(
    frames=st.integers(1, 8),
    extra=st.integers(0, 3 * MAX_CONTROL),
    ops=st.lists(st.one_of(st.integers(8, MAX_CONTROL), st.none()), max_size=60),
)
def test_control_bound_matches_a_model(frames: int, extra: int, ops: list[int | None]) -> None:
    """Any interleaving of received CONTROL (an int: its size) and reads (None): the
    stream is reset with LIMIT exactly when the unread ones would exceed the bound."""
    bound = ControlBound(frames, MAX_CONTROL + extra)
    _, b, sid = bounded(bound)
    unread: deque[int] = deque()
    for op in ops:
        if op is None:
            if unread:
                b.control_consumed(sid, unread.popleft())
            continue
        events = b.receive_data(control_frame(sid, op))
        if len(unread) + 1 > bound.frames or sum(unread) + op > bound.size:
            assert [(type(e), getattr(e, "code", None)) for e in events] == [(StreamReset, ErrorCode.LIMIT)]
            assert not b.is_open(sid) and b.closed is None
            return
        assert [(type(e), getattr(e, "size", None)) for e in events] == [(ControlReceived, op)]
        unread.append(op)
    assert b.is_open(sid)


# --- STATUS: site updates after HELLO ----------------------------------------------------------


def site_pair() -> tuple[Connection, Connection]:
    tower = Connection(odd_ids=True, accept_streams=False, accept_hello=True)
    enforcer = Connection(odd_ids=False, accept_streams=True)
    return tower, enforcer


def test_status_after_hello() -> None:
    tower, enforcer = site_pair()
    enforcer.send_hello({"site": "s"})
    enforcer.send_status({"applications": {"a": {}}})
    enforcer.send_status({"applications": {}})
    assert pump(enforcer, tower) == [
        HelloReceived({"site": "s"}),
        StatusReceived({"applications": {"a": {}}}),
        StatusReceived({"applications": {}}),
    ]
    assert tower.closed is None


def test_status_before_hello_closes() -> None:
    tower, enforcer = site_pair()
    enforcer.send_status({})
    events = pump(enforcer, tower)
    closed = assert_closed(events, ErrorCode.PROTOCOL, tower)
    assert "unexpected STATUS" in closed.reason


def test_status_on_a_connection_without_hello_closes() -> None:
    a, b = pair()
    assert_closed(b.receive_data(encode(FrameType.STATUS, 0, b"{}")), ErrorCode.PROTOCOL, b)
    assert_closed(a.receive_data(encode(FrameType.STATUS, 0, b"{}")), ErrorCode.PROTOCOL, a)


@pytest.mark.parametrize("sid", [1, 2])
def test_status_on_a_stream_closes(sid: int) -> None:
    tower, _ = site_pair()
    tower.receive_data(hello())
    assert_closed(tower.receive_data(encode(FrameType.STATUS, sid, b"{}")), ErrorCode.PROTOCOL, tower)


@pytest.mark.parametrize("payload", [b"", b"[]", b"{", b"\xff"])
def test_status_that_is_not_a_json_object_closes(payload: bytes) -> None:
    tower, _ = site_pair()
    tower.receive_data(hello())
    closed = assert_closed(
        tower.receive_data(encode(FrameType.STATUS, 0, payload)), ErrorCode.PROTOCOL, tower
    )
    assert "STATUS" in closed.reason


def test_send_status_after_close_is_local_error() -> None:
    _, enforcer = site_pair()
    enforcer.close(ErrorCode.LINK_LOST, "gone")
    with pytest.raises(LocalProtocolError):
        enforcer.send_status({})


# --- malformed messages -----------------------------------------------------------------------


def test_empty_message_closes() -> None:
    a, _ = pair()
    assert_closed(a.receive_data(b""), ErrorCode.PROTOCOL, a)


def test_truncated_header_closes() -> None:
    a, _, sid = established()
    assert_closed(a.receive_data(encode(FrameType.DATA, sid, b"x")[:5]), ErrorCode.PROTOCOL, a)


def test_truncated_payload_closes() -> None:
    a, _, sid = established()
    assert_closed(a.receive_data(encode(FrameType.DATA, sid, b"xyz")[:-1]), ErrorCode.PROTOCOL, a)


def test_unknown_frame_type_closes() -> None:
    a, _, _ = established()
    closed = assert_closed(a.receive_data(struct.pack("!BII", 42, 1, 0)), ErrorCode.PROTOCOL, a)
    assert "unknown frame type 42" in closed.reason


def test_oversize_frame_closes_with_frame_size() -> None:
    a, _, sid = established(window_a=MAX_WINDOW)
    raw = struct.pack("!BII", FrameType.DATA, sid, MAX_PAYLOAD + 1) + b"x" * (MAX_PAYLOAD + 1)
    closed = assert_closed(a.receive_data(raw), ErrorCode.FRAME_SIZE, a)
    assert closed.close_code == 4013


def test_a_malformed_tail_discards_the_whole_message() -> None:
    _, b, sid = established()
    events = b.receive_data(encode(FrameType.DATA, sid, b"ok") + b"\x03\x00")
    assert_closed(events, ErrorCode.PROTOCOL, b)
    assert all(not isinstance(e, DataReceived) for e in events)


def test_connection_error_stops_processing_the_rest_of_the_message() -> None:
    _, b, sid = established(window_b=10)
    msg = (
        encode(FrameType.DATA, sid, b"a" * 5)
        + encode(FrameType.DATA, sid, b"b" * 6)
        + encode(FrameType.DATA, sid, b"c")
    )
    events = b.receive_data(msg)
    assert events[0] == DataReceived(sid, b"a" * 5)
    assert len(events) == 2
    assert_closed(events, ErrorCode.FLOW_CONTROL, b)


def test_close_reason_is_cut() -> None:
    a, _ = pair()
    closed = a.close(ErrorCode.INTERNAL, "r" * 500)
    assert closed.reason == "r" * 120
    assert a.close(ErrorCode.PROTOCOL, "second") is closed  # the first close wins


# --- local misuse after close ------------------------------------------------------------------


def test_local_actions_after_close() -> None:
    a, _, sid = established()
    a.receive_data(b"")
    assert a.closed is not None
    with pytest.raises(LocalProtocolError):
        a.open_stream(REQ)
    with pytest.raises(LocalProtocolError):
        a.send_data(sid, b"x")
    with pytest.raises(LocalProtocolError):
        a.send_eof(sid)
    with pytest.raises(LocalProtocolError):
        a.send_hello({})
    a.reset_stream(sid, ErrorCode.CANCEL)  # no-op
    a.consumed(sid, 10)  # no-op
    assert a.send_credit(sid) == 0 and not a.is_open(sid)


def test_stream_ids_exhausted() -> None:
    a, _ = pair()
    a._next_id = 0xFFFFFFFF
    assert a.open_stream(REQ) == 0xFFFFFFFF
    with pytest.raises(LocalProtocolError, match="exhausted"):
        a.open_stream(REQ)


# --- data_to_send batching ---------------------------------------------------------------------


def test_data_to_send_batches_whole_frames_up_to_limit() -> None:
    a, b, sid = established(window_b=4096)
    for i in range(10):
        a.send_data(sid, bytes([i]) * 100)  # frames of 109 bytes
    assert a.pending_output == 1090
    first = a.data_to_send(limit=300)
    assert len(first) == 218  # two whole frames fit, a third would not
    assert a.pending_output == 1090 - 218
    tiny = a.data_to_send(limit=1)  # always at least one frame
    assert len(tiny) == 109
    rest = a.data_to_send()
    assert len(rest) == 1090 - 218 - 109
    assert a.data_to_send() == b"" and a.pending_output == 0
    events = [e for m in (first, tiny, rest) for e in b.receive_data(m)]
    assert b"".join(e.data for e in events if isinstance(e, DataReceived)) == b"".join(
        bytes([i]) * 100 for i in range(10)
    )


def test_data_to_send_default_limit_is_max_message() -> None:
    a, _, sid = established(window_b=8 * MAX_DATA)
    a.send_data(sid, b"z" * (8 * MAX_DATA))
    sizes = []
    while msg := a.data_to_send():
        sizes.append(len(msg))
    assert all(size <= MAX_MESSAGE for size in sizes)
    assert sum(sizes) == 8 * (MAX_DATA + HEADER_SIZE)


def test_data_to_send_on_an_idle_connection() -> None:
    a, _ = pair()
    assert a.data_to_send() == b""
    assert a.pending_output == 0


# --- stateful: two connections linked by in-order queues delivered at random times ---------

SIDES = ("A", "B")
OTHER = {"A": "B", "B": "A"}
FLUSH_LIMITS = st.sampled_from([1, HEADER_SIZE, 40, 200, 1000, 5000, MAX_MESSAGE])


def wire_frames(conn: Connection, wire: deque[bytes]) -> list[Frame]:
    """Frames queued in ``conn`` and in flight on ``wire`` (nothing is taken)."""
    raw = b"".join(head + payload for head, payload in conn._out)
    frames = [f for msg in wire for f in split_frames(msg)]
    return frames + (split_frames(raw) if raw else [])


class LinkedConnections(RuleBasedStateMachine):
    """A (odd ids, like supctl) opens streams to B (even ids, accepts them).

    Both behave well; messages travel in order but are delivered at random
    times, so every frame may cross any other frame in flight.  Nothing may be
    lost, duplicated or reordered; no connection may close.
    """

    def __init__(self) -> None:
        super().__init__()
        self.busy = False

    @initialize(
        window_a=st.integers(64, 4096),
        window_b=st.integers(64, 4096),
        seed=st.integers(0, 2**32 - 1),
        streams=st.integers(1, 3),
        early=st.sampled_from([0, 0, 16, 64]),
    )
    def setup(self, window_a: int, window_b: int, seed: int, streams: int, early: int) -> None:
        # Small windows need a small early-data allowance; it must be the same on both ends.
        self.early = early
        self.conn = {
            "A": Connection(odd_ids=True, accept_streams=False, window=window_a, early_data=early),
            "B": Connection(odd_ids=False, accept_streams=True, window=window_b, early_data=early),
        }
        self.wire: dict[str, deque[bytes]] = {"A": deque(), "B": deque()}  # sent by side, in flight
        self.rng = random.Random(seed)
        self.sids: list[int] = []
        self.sent: dict[tuple[str, int], bytearray] = {}
        self.received: dict[tuple[str, int], bytearray] = {}
        self.unconsumed: dict[tuple[str, int], int] = {}
        self.eof_sent: set[tuple[str, int]] = set()
        self.eof_received: set[tuple[str, int]] = set()
        self.reset_by: dict[str, set[int]] = {"A": set(), "B": set()}
        self.reset_seen: dict[str, set[int]] = {"A": set(), "B": set()}
        self.ctl_sent: dict[tuple[str, int], list[dict[str, object]]] = {}
        self.ctl_received: dict[tuple[str, int], list[dict[str, object]]] = {}
        self.ctl_before_eof: dict[tuple[str, int], int] = {}  # CONTROLs sent before that side's EOF
        self.pending_b: set[int] = set()  # StreamOpened at B, not yet answered
        # May send DATA/EOF: A from OPEN on (early data), B once it accepted.
        self.sendable: dict[str, set[int]] = {"A": set(), "B": set()}
        self.accepted: dict[str, set[int]] = {"A": set(), "B": set()}  # state OPEN: CONTROL allowed
        for _ in range(streams):
            self.open_stream()

    # --- helpers ---------------------------------------------------------------------

    def _handle(self, side: str, events: list[Event]) -> None:
        peer = OTHER[side]
        conn = self.conn[side]
        for event in events:
            if isinstance(event, StreamOpened):
                assert side == "B"
                assert event.stream_id in self.sids and event.stream_id not in self.pending_b
                assert event.request == REQ
                self.pending_b.add(event.stream_id)
            elif isinstance(event, StreamAccepted):
                assert side == "A"
                self.accepted["A"].add(event.stream_id)
            elif isinstance(event, DataReceived):
                key = (side, event.stream_id)
                got = self.received[key]
                got += event.data
                sent = self.sent[(peer, event.stream_id)]
                assert got == sent[: len(got)], "bytes lost, duplicated or reordered"
                assert event.data
                self.unconsumed[key] += len(event.data)
            elif isinstance(event, ControlReceived):
                got_ctl = self.ctl_received[(side, event.stream_id)]
                got_ctl.append(event.payload)
                assert got_ctl == self.ctl_sent[(peer, event.stream_id)][: len(got_ctl)], (
                    "CONTROL out of order"
                )
            elif isinstance(event, WindowUpdated):
                # A RESET later in the same message may already have removed the stream.
                assert conn.send_credit(event.stream_id) > 0 or not conn.is_open(event.stream_id)
            elif isinstance(event, EndOfStream):
                key = (side, event.stream_id)
                assert (peer, event.stream_id) in self.eof_sent
                assert key not in self.eof_received
                assert self.received[key] == self.sent[(peer, event.stream_id)], "EOF before all data"
                before = self.ctl_before_eof[(peer, event.stream_id)]
                assert len(self.ctl_received[key]) >= before, "EOF before all CONTROLs sent ahead of it"
                self.eof_received.add(key)
            elif isinstance(event, StreamReset):
                assert not event.local, event
                assert event.stream_id in self.reset_by[peer], event
                assert event.code is ErrorCode.CANCEL or event.code is ErrorCode.REFUSED
                self.reset_seen[side].add(event.stream_id)
                self.pending_b.discard(event.stream_id)
                self.sendable[side].discard(event.stream_id)
                self.accepted[side].discard(event.stream_id)
            else:
                raise AssertionError(f"unexpected event {event!r}")

    def _deliver(self, sender: str) -> None:
        msg = self.wire[sender].popleft()
        receiver = OTHER[sender]
        self._handle(receiver, self.conn[receiver].receive_data(msg))

    def _consume_all(self) -> None:
        for (side, sid), count in self.unconsumed.items():
            if count:
                self.conn[side].consumed(sid, count)
                self.unconsumed[(side, sid)] = 0

    def _settle(self) -> None:
        """Deliver everything both ways, consuming all data, until nothing moves."""
        for _ in range(10_000):
            moved = False
            for side in SIDES:
                while msg := self.conn[side].data_to_send():
                    self.wire[side].append(msg)
                while self.wire[side]:
                    moved = True
                    self._deliver(side)
            self._consume_all()
            if not moved and not any(self.conn[s].pending_output for s in SIDES):
                return
        raise AssertionError("the connections never went quiet")

    def _check_settled(self) -> None:
        a, b = self.conn["A"], self.conn["B"]
        for sid in self.sids:
            # Nothing in flight: both ends agree on which streams exist...
            assert a.is_open(sid) == b.is_open(sid), sid
            if ("A", sid) in self.eof_sent and ("B", sid) in self.eof_sent:
                assert not a.is_open(sid) and not b.is_open(sid)  # ...and forget finished ones
            if sid in self.reset_by["A"] | self.reset_by["B"]:
                assert not a.is_open(sid) and not b.is_open(sid)
            if a.is_open(sid):
                sa, sb = a._streams[sid], b._streams[sid]
                assert sa.send_credit + self._grant_due(sa) == sb.recv_window
                assert sb.send_credit == sa.recv_window

    def _grant_due(self, stream: Any) -> int:
        """Credit A still gets from B's ACCEPT: until then it only has the early allowance."""
        return 0 if stream.state is StreamState.OPEN else self.conn["B"].window - self.early

    # --- actions of the applications ----------------------------------------------------

    def open_stream(self) -> None:
        if sum(map(self.conn["A"].is_open, self.sids)) >= 4 or len(self.sids) >= 12:
            return
        sid = self.conn["A"].open_stream(REQ)
        assert sid not in self.sids and sid % 2 == 1
        assert not self.sids or sid > self.sids[-1]
        self.sids.append(sid)
        self.sendable["A"].add(sid)  # early data and EOF may go before ACCEPT
        for side in SIDES:
            self.sent[(side, sid)] = bytearray()
            self.received[(side, sid)] = bytearray()
            self.unconsumed[(side, sid)] = 0
            self.ctl_sent[(side, sid)] = []
            self.ctl_received[(side, sid)] = []

    def answer(self, data: st.DataObject) -> None:
        if not self.pending_b:
            return
        sid = data.draw(st.sampled_from(sorted(self.pending_b)), label="stream")
        self.pending_b.discard(sid)
        if data.draw(st.integers(0, 4), label="refuse") == 0:
            self.conn["B"].reset_stream(sid, ErrorCode.REFUSED, "refused")
            self.reset_by["B"].add(sid)
        else:
            self.conn["B"].accept_stream(sid)
            self.sendable["B"].add(sid)
            self.accepted["B"].add(sid)

    def _can_send(self) -> list[tuple[str, int]]:
        return [(s, sid) for s in SIDES for sid in sorted(self.sendable[s]) if self.conn[s].send_credit(sid)]

    def send(self, data: st.DataObject) -> None:
        if not self._can_send():
            return
        side, sid = data.draw(st.sampled_from(self._can_send()), label="stream")
        conn = self.conn[side]
        credit = conn.send_credit(sid)
        size = data.draw(st.one_of(st.just(credit), st.integers(1, credit)), label="size")
        chunk = self.rng.randbytes(size)
        conn.send_data(sid, chunk)
        assert conn.send_credit(sid) == credit - size
        self.sent[(side, sid)] += chunk

    def _can_consume(self) -> list[tuple[str, int]]:
        return sorted(key for key, count in self.unconsumed.items() if count)

    def consume(self, data: st.DataObject) -> None:
        if not self._can_consume():
            return
        key = data.draw(st.sampled_from(self._can_consume()), label="stream")
        size = data.draw(st.one_of(st.just(self.unconsumed[key]), st.integers(1, self.unconsumed[key])))
        self.conn[key[0]].consumed(key[1], size)
        self.unconsumed[key] -= size

    def _can_eof(self) -> list[tuple[str, int]]:
        return [(s, sid) for s in SIDES for sid in sorted(self.sendable[s]) if (s, sid) not in self.eof_sent]

    def send_eof(self, data: st.DataObject) -> None:
        if not self._can_eof():
            return
        side, sid = data.draw(st.sampled_from(self._can_eof()), label="stream")
        self.conn[side].send_eof(sid)
        self.eof_sent.add((side, sid))
        self.ctl_before_eof[(side, sid)] = len(self.ctl_sent[(side, sid)])

    def _can_control(self) -> list[tuple[str, int]]:
        return [(s, sid) for s in SIDES for sid in sorted(self.accepted[s]) if self.conn[s].is_open(sid)]

    def control(self, data: st.DataObject) -> None:
        """A CONTROL needs no credit and may follow either EOF."""
        if not self._can_control():
            return
        side, sid = data.draw(st.sampled_from(self._can_control()), label="stream")
        payload: dict[str, object] = {"n": len(self.ctl_sent[(side, sid)]), "from": side}
        self.conn[side].send_control(sid, payload)
        self.ctl_sent[(side, sid)].append(payload)

    def _can_reset(self) -> list[tuple[str, int]]:
        return [(s, sid) for s in SIDES for sid in self.sids if self.conn[s].is_open(sid)]

    def reset(self, data: st.DataObject) -> None:
        if not self._can_reset():
            return
        side, sid = data.draw(st.sampled_from(self._can_reset()), label="stream")
        self.conn[side].reset_stream(sid, ErrorCode.CANCEL, "bye")
        assert not self.conn[side].is_open(sid)
        self.reset_by[side].add(sid)
        self.sendable[side].discard(sid)
        self.accepted[side].discard(sid)
        self.pending_b.discard(sid)

    # --- the network: in-order queues, delivered at random times ----------------------------

    def _flush(self, side: str, limit: int, count: int) -> None:
        """Take up to ``count`` messages of at most ``limit`` bytes (or one frame)."""
        conn = self.conn[side]
        for _ in range(count):
            before = conn.pending_output
            msg = conn.data_to_send(limit)
            if not msg:
                break
            assert len(msg) <= max(limit, MAX_DATA + HEADER_SIZE)
            assert conn.pending_output == before - len(msg)
            self.wire[side].append(msg)

    def _deliver_some(self, side: str, count: int) -> None:
        for _ in range(min(count, len(self.wire[side]))):
            self._deliver(side)

    def network(self, data: st.DataObject, op: str) -> None:
        if op == "deliver":
            sides = [s for s in SIDES if self.wire[s]]
        else:
            sides = [s for s in SIDES if self.conn[s].pending_output]
        if not sides:
            return
        side = data.draw(st.sampled_from(sides), label="side")
        count = data.draw(st.integers(1, 4), label="count")
        if op in ("flush", "transmit"):
            self._flush(side, data.draw(FLUSH_LIMITS, label="limit"), count)
        if op in ("deliver", "transmit"):
            self._deliver_some(side, count)

    # --- the one rule ----------------------------------------------------------------------
    #
    # Hypothesis runs "swarm" tests: each example disables a random subset of the
    # rules, and a run without opens or deliveries tests nothing.  So there is one
    # rule choosing among weighted operations; streams must live long enough to
    # carry data both ways, hence EOF and reset are rarer than the rest.

    OPS = (
        *("open_stream", "answer", "answer", "send", "send", "send", "consume", "consume", "control"),
        *("send_eof", "reset", "flush", "flush", "flush", "deliver", "deliver", "deliver"),
        *("transmit", "transmit", "settle"),
    )

    @rule(data=st.data(), op=st.sampled_from(OPS))
    def step(self, data: st.DataObject, op: str) -> None:
        self.busy = True  # cleared by the invariant once the step went well
        if op == "open_stream":
            self.open_stream()
        elif op in ("flush", "deliver", "transmit"):
            self.network(data, op)
        elif op == "settle":
            self._settle()
            self._check_settled()
        else:
            getattr(self, op)(data)

    # --- invariants ------------------------------------------------------------------

    @invariant()
    def consistent(self) -> None:
        if not hasattr(self, "conn"):
            return
        self.busy = True
        for side in SIDES:
            conn = self.conn[side]
            assert conn.closed is None
            assert conn.stream_count == len(conn._streams) >= 0
            assert conn.pending_output == sum(len(h) + len(p) for h, p in conn._out)
            for sid, stream in conn._streams.items():
                assert stream.send_credit >= 0
                assert stream.recv_window >= 0
                assert 0 <= stream.recv_window <= conn.window
                assert stream.unacked >= 0
                assert conn.send_credit(sid) >= 0
        # Exact credit accounting for every stream both ends know:
        # sender's credit + its DATA in flight == receiver's window - its WINDOWs in flight.
        a, b = self.conn["A"], self.conn["B"]
        flight = {s: wire_frames(self.conn[s], self.wire[s]) for s in SIDES}
        for sid in set(a._streams) & set(b._streams):
            for snd, rcv in (("A", "B"), ("B", "A")):
                s_stream = self.conn[snd]._streams[sid]
                grant_due = self._grant_due(s_stream) if snd == "A" else 0
                data_in_flight = sum(
                    len(f.payload) for f in flight[snd] if f.type is FrameType.DATA and f.stream_id == sid
                )
                credit_in_flight = sum(
                    struct.unpack("!I", f.payload)[0]
                    for f in flight[rcv]
                    if f.type is FrameType.WINDOW and f.stream_id == sid
                )
                r_stream = self.conn[rcv]._streams[sid]
                assert (
                    s_stream.send_credit + grant_due + data_in_flight
                    == r_stream.recv_window - credit_in_flight
                )
        self.busy = False

    def teardown(self) -> None:
        if not hasattr(self, "conn") or self.busy:
            return  # a step failed: do not mask its error
        self.busy = True
        # Finish every stream gracefully and check that both ends forget all of them.
        self._settle()
        self._check_settled()
        for sid in sorted(self.pending_b):
            self.conn["B"].accept_stream(sid)
            self.sendable["B"].add(sid)
            self.accepted["B"].add(sid)
        self.pending_b.clear()
        self._settle()
        for side, sid in self._can_eof():
            if self.conn[side].is_open(sid):
                self.conn[side].send_eof(sid)
                self.eof_sent.add((side, sid))
                self.ctl_before_eof[(side, sid)] = len(self.ctl_sent[(side, sid)])
        self._settle()
        self._check_settled()
        assert self.conn["A"].stream_count == 0
        assert self.conn["B"].stream_count == 0
        for sid in self.sids:
            if sid not in self.reset_by["A"] | self.reset_by["B"]:
                assert self.received[("B", sid)] == self.sent[("A", sid)]
                assert self.received[("A", sid)] == self.sent[("B", sid)]
                assert ("A", sid) in self.eof_received and ("B", sid) in self.eof_received
            for side in SIDES:
                got, sent = self.ctl_received[(side, sid)], self.ctl_sent[(OTHER[side], sid)]
                assert got == sent[: len(got)]
        self.busy = False


# A third of the fuzz budget: 100 examples normally, more for long runs
# (SUPCTL_FUZZ_EXAMPLES, see test_protocol_fuzz.py).
LinkedConnections.TestCase.settings = settings(
    max_examples=max(1, int(os.environ.get("SUPCTL_FUZZ_EXAMPLES", "300")) // 3),
    stateful_step_count=100,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestLinkedConnections = LinkedConnections.TestCase


# --- GOAWAY ---------------------------------------------------------------------------------


def test_goaway_reaches_a_client_that_accepts_it_and_streams_go_on() -> None:
    client = Connection(odd_ids=True, accept_streams=False, accept_goaway=True)
    tower = Connection(odd_ids=False, accept_streams=True)
    sid = client.open_stream(OpenRequest(verb="connect"))
    pump(client, tower)
    tower.accept_stream(sid)
    tower.send_goaway({"reason": "the control tower is shutting down", "deadline": 30})
    tower.send_data(sid, b"still here")
    events = pump(tower, client)
    assert GoawayReceived({"reason": "the control tower is shutting down", "deadline": 30}) in events
    assert DataReceived(sid, b"still here") in events
    assert client.closed is None


def test_goaway_not_expected_closes() -> None:
    """An older peer, or one that did not offer Supctl-Features: goaway, never gets one; if it
    does, that is a protocol error, as for any frame it does not expect."""
    a, b = pair()
    for conn in (a, b):
        closed = assert_closed(
            conn.receive_data(encode(FrameType.GOAWAY, 0, b"{}")), ErrorCode.PROTOCOL, conn
        )
        assert "unexpected GOAWAY" in closed.reason


@pytest.mark.parametrize(("sid", "payload"), [(1, b"{}"), (0, b"[]"), (0, b""), (0, b"\xff")])
def test_goaway_on_a_stream_or_not_a_json_object_closes(sid: int, payload: bytes) -> None:
    client = Connection(odd_ids=True, accept_streams=False, accept_goaway=True)
    assert_closed(client.receive_data(encode(FrameType.GOAWAY, sid, payload)), ErrorCode.PROTOCOL, client)
