"""Fuzz receive_data: random bytes, random frames and mutated valid traffic.

Whatever arrives, receive_data must never raise, a ConnectionClosed must be the
last event it ever returns, and the internal state must stay consistent.  The
number of examples is bounded for ordinary runs; set SUPCTL_FUZZ_EXAMPLES to
raise it for a long run, e.g. ``SUPCTL_FUZZ_EXAMPLES=20000 pytest tests/test_protocol_fuzz.py``.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from supctl.protocol import (
    EARLY_DATA,
    MAX_MESSAGE,
    Connection,
    ConnectionClosed,
    ControlReceived,
    DataReceived,
    EndOfStream,
    ErrorCode,
    Event,
    FrameType,
    HelloReceived,
    OpenRequest,
    StatusReceived,
    StreamAccepted,
    StreamOpened,
    StreamReset,
    WindowUpdated,
)
from supctl.protocol.connection import StreamState
from supctl.protocol.frames import HEADER_SIZE, MAX_PAYLOAD, MAX_WINDOW, encode, encode_reset, split_frames

FUZZ_EXAMPLES = int(os.environ.get("SUPCTL_FUZZ_EXAMPLES", "300"))

FUZZ = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

EVENT_TYPES = (
    StreamOpened,
    StreamAccepted,
    DataReceived,
    WindowUpdated,
    EndOfStream,
    StreamReset,
    HelloReceived,
    StatusReceived,
    ControlReceived,
    ConnectionClosed,
)

REQ = OpenRequest(verb="tcp", application="app", service_instance="si", protocol="tcp", port=22)


@dataclass
class Target:
    """A connection under attack that reacts to events like a real application."""

    conn: Connection
    eof_sent: set[int] = field(default_factory=set)
    closed: ConnectionClosed | None = None

    def feed(self, message: bytes) -> None:
        conn = self.conn
        events = conn.receive_data(message)  # must never raise
        assert isinstance(events, list)
        if self.closed is not None:
            assert events == [], "events after ConnectionClosed"
        for i, event in enumerate(events):
            assert isinstance(event, EVENT_TYPES), event
            if isinstance(event, ConnectionClosed):
                assert i == len(events) - 1, "ConnectionClosed must be the last event"
                assert conn.closed is event
                assert isinstance(event.code, ErrorCode)
                assert 4001 <= event.close_code <= 4000 + max(ErrorCode)
                assert len(event.reason) <= 120
                self.closed = event
        if self.closed is None:
            self.react(events)
        check_state(conn)
        if self.closed is not None:
            assert conn.closed is self.closed and conn.stream_count == 0
        # Whatever the core queued in answer is well formed.
        while out := conn.data_to_send():
            assert split_frames(out)
            assert len(out) <= MAX_MESSAGE

    def react(self, events: list[Event]) -> None:
        """Act on events as an application would; a LocalProtocolError here is a bug."""
        conn = self.conn
        for event in events:
            if isinstance(event, StreamOpened):
                assert isinstance(event.request, OpenRequest)
                if conn.is_open(event.stream_id):  # a later frame may have reset it
                    if event.stream_id % 3 == 0:
                        conn.reset_stream(event.stream_id, ErrorCode.REFUSED, "no")
                    else:
                        conn.accept_stream(event.stream_id)
            elif isinstance(event, DataReceived):
                assert event.data
                conn.consumed(event.stream_id, len(event.data))
                credit = conn.send_credit(event.stream_id)
                if credit:
                    conn.send_data(event.stream_id, event.data[:credit])  # echo
            elif isinstance(event, EndOfStream):
                sid = event.stream_id
                if conn.is_open(sid) and sid not in self.eof_sent:
                    conn.send_eof(sid)
                    self.eof_sent.add(sid)
            elif isinstance(event, WindowUpdated | StreamAccepted):
                assert conn.send_credit(event.stream_id) >= 0
            elif isinstance(event, StreamReset):
                assert not conn.is_open(event.stream_id)
            elif isinstance(event, HelloReceived | StatusReceived):
                assert isinstance(event.payload, dict)
            elif isinstance(event, ControlReceived):
                assert isinstance(event.payload, dict)
                if conn.is_open(event.stream_id):  # answer like an exec handler would
                    conn.send_control(event.stream_id, {"ack": True})


def check_state(conn: Connection) -> None:
    assert conn.stream_count >= 0
    assert conn.stream_count == len(conn._streams)
    assert conn.pending_output >= 0
    assert conn.pending_output == sum(len(h) + len(p) for h, p in conn._out)
    for sid, stream in conn._streams.items():
        assert stream.id == sid
        assert 0 <= stream.send_credit <= MAX_WINDOW
        assert 0 <= stream.recv_window <= conn.window
        assert stream.unacked >= 0
        assert conn.send_credit(sid) >= 0
    if conn.closed is not None:
        assert conn.stream_count == 0


def _with_early_data(config: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    window = config["window"]
    choices = sorted({0, min(64, window), min(EARLY_DATA, window)})
    return st.sampled_from(choices).map(lambda early: {**config, "early_data": early})


configs = st.fixed_dictionaries(
    {
        "odd_ids": st.booleans(),
        "accept_streams": st.booleans(),
        "accept_hello": st.booleans(),
        "window": st.sampled_from([1, 2, 64, 1000, 65536, MAX_WINDOW]),
        "max_streams": st.sampled_from([1, 3, 1024]),
    }
).flatmap(_with_early_data)


def make_target(config: dict[str, Any], open_own: int = 0) -> Target:
    conn = Connection(**{"early_data": 0, **config})
    for _ in range(open_own):
        conn.open_stream(REQ)
    conn.data_to_send()
    return Target(conn)


def assert_closed_stays_closed(target: Target) -> None:
    if target.closed is not None:
        assert target.conn.receive_data(encode(FrameType.HELLO, 0, b"{}")) == []
        assert target.conn.receive_data(b"") == []


# --- 1. random bytes ----------------------------------------------------------------------


@FUZZ
@given(config=configs, open_own=st.integers(0, 3), messages=st.lists(st.binary(max_size=80), max_size=8))
def test_random_bytes(config: dict[str, Any], open_own: int, messages: list[bytes]) -> None:
    target = make_target(config, open_own)
    for message in messages:
        target.feed(message)
    assert_closed_stays_closed(target)


# --- 2. random frames with plausible parts ---------------------------------------------------

_u32 = st.one_of(
    st.sampled_from([0, 1, 2, 64, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]),
    st.integers(0, 2**32 - 1),
)
_json_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-1, 70000),
    st.text(max_size=12),
    st.lists(st.integers(), max_size=2),
)
_open_json = st.one_of(
    st.sampled_from([REQ.to_json(), b"{}", b'{"verb":"x","port":70000}', b"[]", b"\xff"]),
    st.dictionaries(
        st.sampled_from(
            ["verb", "application", "service_instance", "container", "protocol", "port", "ip_address", "args"]
        ),
        st.one_of(
            _json_values, st.sampled_from(["tcp", "10.0.0.1", "::1", "[::1]", "host.example"]), st.just({})
        ),
    ).map(lambda d: json.dumps(d).encode()),
)
_payloads = st.one_of(
    st.just(b""),
    _u32.map(lambda v: struct.pack("!I", v)),
    st.tuples(_u32, _open_json).map(lambda t: struct.pack("!I", t[0]) + t[1]),
    st.integers(0, 0xFFFF).map(lambda code: struct.pack("!H", code) + b"reason"),
    st.sampled_from([b'{"site":"s"}', b"{}", b"null", b"{", b'{"signal":"INT"}', b"{" + b" " * 5000 + b"}"]),
    st.binary(max_size=40),
)
_good_frames = st.builds(
    lambda t, sid, payload: encode(FrameType(t), sid, payload),
    st.sampled_from(sorted(FrameType)),
    st.one_of(
        st.integers(0, 8), st.integers(0, 8), st.integers(0, 8), st.sampled_from([2**31 - 1, 2**32 - 1])
    ),
    _payloads,
)
# A header that lies: unknown type, or a length that does not match the bytes.
_lying_frames = st.builds(
    lambda t, sid, length, payload: struct.pack("!BII", t, sid, length) + payload,
    st.integers(0, 255),
    st.integers(0, 12),
    st.one_of(st.integers(0, 64), st.integers(0, 64), st.sampled_from([MAX_PAYLOAD + 1, 2**32 - 1])),
    st.binary(max_size=16),
)
# Mostly well-formed frames, so that the state machine gets past the framing.
_frame_bytes = st.one_of(_good_frames, _good_frames, _good_frames, _lying_frames)
# A message of well-formed frames, now and then followed by a lying one.
_messages = st.lists(
    st.tuples(
        st.lists(_good_frames, min_size=1, max_size=5),
        st.one_of(st.just(b""), st.just(b""), st.just(b""), _lying_frames),
    ).map(lambda t: b"".join(t[0]) + t[1]),
    min_size=1,
    max_size=10,
)


def establish(target: Target, config: dict[str, Any], open_own: int) -> None:
    """Give random frames something to hit: accepted own streams and, when the
    peer may open streams, two peer streams (the target accepts ids not divisible by 3)."""
    window = struct.pack("!I", max(64, config["early_data"]))  # never below the early allowance
    own = range(1 if config["odd_ids"] else 2, 2 * open_own + 1, 2)
    for sid in own:
        target.feed(encode(FrameType.ACCEPT, sid, window))
    if config["accept_streams"]:
        first = 2 if config["odd_ids"] else 1
        for sid in (first, first + 2):
            target.feed(encode(FrameType.OPEN, sid, window + REQ.to_json()))
    assert target.closed is None


@FUZZ
@given(config=configs, open_own=st.integers(0, 3), messages=_messages)
def test_random_frames(config: dict[str, Any], open_own: int, messages: list[bytes]) -> None:
    target = make_target(config, open_own)
    establish(target, config, open_own)
    for message in messages:
        target.feed(message)
    assert_closed_stays_closed(target)


# --- 3. mutated valid traffic ------------------------------------------------------------------


@dataclass
class Traffic:
    a_msgs: list[bytes]  # what A (the opener) sent
    b_msgs: list[bytes]  # what B (the acceptor) sent
    a_config: dict[str, Any]  # how to build a fresh A or B that the messages fit
    b_config: dict[str, Any]

    @property
    def opened(self) -> int:
        return sum(1 for m in self.a_msgs for f in split_frames(m) if f.type is FrameType.OPEN)


def valid_traffic(data: st.DataObject) -> Traffic:
    """Run a well-behaved pair and record what each side sent.

    A (odd ids, like supctl) opens streams; B (even ids) accepts them.  Frames
    cross each other between exchanges; with early data A sends before ACCEPT.
    """
    wa = data.draw(st.sampled_from([64, 100, 4096]), label="window A")
    wb = data.draw(st.sampled_from([64, 100, 4096]), label="window B")
    early = data.draw(st.sampled_from([0, 16, 64]), label="early data")
    a_config: dict[str, Any] = {"odd_ids": True, "accept_streams": False, "window": wa, "early_data": early}
    b_config: dict[str, Any] = {
        "odd_ids": False,
        "accept_streams": True,
        "accept_hello": True,
        "window": wb,
        "early_data": early,
    }
    a = Connection(**a_config)
    b = Connection(**b_config)
    a_msgs: list[bytes] = []
    b_msgs: list[bytes] = []
    sids: list[int] = []
    hello = data.draw(st.booleans(), label="hello")
    if hello:
        a.send_hello({"site": "edge"})

    def exchange(limit: int) -> None:
        for _ in range(50):
            moved = False
            while msg := a.data_to_send(limit):
                a_msgs.append(msg)
                moved = True
                for ev in b.receive_data(msg):
                    assert not isinstance(ev, ConnectionClosed), ev
                    if isinstance(ev, StreamOpened) and b.is_open(ev.stream_id):
                        b.accept_stream(ev.stream_id)
                    elif isinstance(ev, DataReceived):
                        b.consumed(ev.stream_id, len(ev.data))
            while msg := b.data_to_send(limit):
                b_msgs.append(msg)
                moved = True
                for ev in a.receive_data(msg):
                    assert not isinstance(ev, ConnectionClosed), ev
                    if isinstance(ev, DataReceived):
                        a.consumed(ev.stream_id, len(ev.data))
            if not moved:
                return

    conns = {"A": a, "B": b}
    actions = ["open", "send", "send", "control", "eof", "reset", "exchange", "exchange"]
    if hello:
        actions.append("status")
    for _ in range(data.draw(st.integers(1, 16), label="steps")):
        action = data.draw(st.sampled_from(actions), label="action")
        live = [s for s in sids if a.is_open(s)]
        if action == "open" or (not live and action != "exchange"):
            sids.append(a.open_stream(REQ))
        elif action == "send":
            sid = data.draw(st.sampled_from(live), label="stream")
            for conn in (a, b):
                if credit := conn.send_credit(sid):
                    conn.send_data(sid, bytes([sid % 256]) * data.draw(st.integers(1, credit), label="size"))
        elif action in ("eof", "control"):
            sid = data.draw(st.sampled_from(live), label="stream")
            conn = conns[data.draw(st.sampled_from("AB"), label="side")]
            stream = conn._streams.get(sid)
            if stream is None:
                pass
            elif action == "control":
                if stream.state is StreamState.OPEN:
                    conn.send_control(sid, {"signal": "INT"})
            elif stream.state is not StreamState.PENDING and not stream.local_eof:
                conn.send_eof(sid)  # the opener may send EOF before ACCEPT
        elif action == "reset":
            sid = data.draw(st.sampled_from(live), label="stream")
            conns[data.draw(st.sampled_from("AB"), label="side")].reset_stream(sid, ErrorCode.CANCEL, "bye")
        elif action == "status":
            a.send_status({"applications": {}})
        else:  # deliver what is queued; until then frames cross each other
            exchange(data.draw(st.sampled_from([1, 50, MAX_MESSAGE]), label="limit"))
    exchange(MAX_MESSAGE)
    return Traffic(a_msgs, b_msgs, a_config, b_config)


def mutate(data: st.DataObject, messages: list[bytes]) -> list[bytes]:
    msgs = list(messages)
    for _ in range(data.draw(st.integers(0, 4), label="mutations")):
        if not msgs:
            msgs.append(b"")
        i = data.draw(st.integers(0, len(msgs) - 1), label="message")
        m = msgs[i]
        op = data.draw(
            st.sampled_from(
                ["flip", "set", "truncate", "extend", "dup", "drop", "swap", "merge", "split", "insert"]
            ),
            label="op",
        )
        if op == "flip" and m:
            pos = data.draw(st.integers(0, len(m) - 1))
            m = m[:pos] + bytes([m[pos] ^ (1 << data.draw(st.integers(0, 7)))]) + m[pos + 1 :]
        elif op == "set" and m:
            pos = data.draw(st.integers(0, len(m) - 1))
            m = m[:pos] + bytes([data.draw(st.integers(0, 255))]) + m[pos + 1 :]
        elif op == "truncate":
            m = m[: data.draw(st.integers(0, len(m)))]
        elif op == "extend":
            m = m + data.draw(st.binary(min_size=1, max_size=12))
        elif op == "dup":
            msgs.insert(i, m)
        elif op == "drop":
            del msgs[i]
            continue
        elif op == "swap" and len(msgs) > 1:
            j = data.draw(st.integers(0, len(msgs) - 1))
            msgs[i], msgs[j] = msgs[j], msgs[i]
            continue
        elif op == "merge" and i + 1 < len(msgs):
            msgs[i : i + 2] = [msgs[i] + msgs[i + 1]]
            continue
        elif op == "split" and len(m) > 1:
            cut = data.draw(st.integers(1, len(m) - 1))
            msgs[i : i + 1] = [m[:cut], m[cut:]]
            continue
        elif op == "insert":
            frame = data.draw(_frame_bytes, label="frame")
            at = data.draw(st.integers(0, len(msgs)))
            msgs.insert(at, frame)
            continue
        msgs[i] = m
    return msgs


@FUZZ
@given(data=st.data())
def test_mutated_traffic_to_the_accepting_side(data: st.DataObject) -> None:
    traffic = valid_traffic(data)
    target = make_target(traffic.b_config)
    for message in mutate(data, traffic.a_msgs):
        target.feed(message)
    assert_closed_stays_closed(target)


@FUZZ
@given(data=st.data())
def test_mutated_traffic_to_the_opening_side(data: st.DataObject) -> None:
    traffic = valid_traffic(data)
    target = make_target(traffic.a_config, open_own=traffic.opened)
    for message in mutate(data, traffic.b_msgs):
        target.feed(message)
    assert_closed_stays_closed(target)


def replay_reaction(conn: Connection, events: list[Event]) -> None:
    """React exactly as valid_traffic's well-behaved peers did: accept all, consume all."""
    for event in events:
        if isinstance(event, StreamOpened) and conn.is_open(event.stream_id):
            conn.accept_stream(event.stream_id)
        elif isinstance(event, DataReceived):
            conn.consumed(event.stream_id, len(event.data))


@FUZZ
@given(data=st.data())
def test_unmutated_traffic_replays_without_closing(data: st.DataObject) -> None:
    """The replay itself is sound: without mutations no side closes the connection."""
    traffic = valid_traffic(data)
    b = make_target(traffic.b_config)
    b.react = lambda events: replay_reaction(b.conn, events)  # type: ignore[method-assign]
    for message in traffic.a_msgs:
        b.feed(message)
    assert b.closed is None
    a = make_target(traffic.a_config, open_own=traffic.opened)
    a.react = lambda events: replay_reaction(a.conn, events)  # type: ignore[method-assign]
    for message in traffic.b_msgs:
        a.feed(message)
    assert a.closed is None


# --- targeted corner cases the generators reach only by luck --------------------------------------


def test_every_single_byte_message() -> None:
    for value in range(256):
        target = make_target({"odd_ids": False, "accept_streams": True, "accept_hello": True})
        target.feed(bytes([value]))
        assert target.closed is not None


def test_every_frame_type_on_every_kind_of_stream_id() -> None:
    for accept_streams in (False, True):
        for t in range(len(FrameType) + 2):
            for sid in (0, 1, 2, 3, 4, 2**32 - 1):
                for payload in (b"", b"\x00\x00\x00\x40", b"\x00\x00\x00\x40" + REQ.to_json(), b"\x00\x01"):
                    conn = Connection(odd_ids=True, accept_streams=accept_streams, accept_hello=True)
                    conn.open_stream(REQ)
                    target = Target(conn)
                    target.feed(struct.pack("!BII", t, sid, len(payload)) + payload)
                    assert_closed_stays_closed(target)


def test_header_only_of_each_length() -> None:
    for cut in range(1, HEADER_SIZE + 4):
        target = make_target({"odd_ids": False, "accept_streams": True})
        target.feed(encode(FrameType.OPEN, 1, b"\x00\x00\x00\x10" + REQ.to_json())[:cut])
        assert target.closed is not None


def test_reset_storm_on_a_closed_connection() -> None:
    target = make_target({"odd_ids": False, "accept_streams": True})
    target.feed(b"")
    assert target.closed is not None
    for sid in range(1, 50, 2):
        target.feed(encode_reset(sid, ErrorCode.CANCEL, "x"))
    assert target.conn.stream_count == 0
