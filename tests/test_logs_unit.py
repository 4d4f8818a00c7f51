"""Unit tests of the ``logs`` plugin (plugins/supctl_logs), in memory, no root, no tower.

* the record framing (:mod:`supctl_logs.wire`): round trip in any chunking, garbage;
* the books (:mod:`supctl_logs.book`): the byte bound, tail and since, readers' cursors,
  restart marks, the shelf's bound;
* the site handler on a fake channel and a fake clock: selection, follow, a slow
  reader, the client's EOF and reset, bad args, ``[verbs.logs]``;
* the client's rendering: stdout and stderr apart, marks, ``--timestamps``, ``--since``.
"""

from __future__ import annotations

import asyncio
import math
import os
import struct
import tracemalloc
from collections.abc import Coroutine
from typing import Any, cast

import click
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from supctl_logs import wire
from supctl_logs.book import (
    FORGET_AFTER,
    MARK_FD,
    MIN_CAPACITY,
    OVERHEAD,
    Book,
    Shelf,
)
from supctl_logs.handler import LogsHandler
from supctl_logs.verb import Printer, logs_args, make_logs_command, printable, rfc3339, since_seconds

from supctl.enforcer.api import ContainerEvent, ContainerOutput, HandlerContext, ServiceInstance
from supctl.errors import ProtocolError, StreamError, UsageError
from supctl.protocol import ErrorCode, FrameError, OpenRequest

FAST = settings(max_examples=150, deadline=None, database=None)
KEY = ("popcorn", "popcorn-1", "web")
DEADLINE = 10.0


def run(main: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(asyncio.wait_for(main, DEADLINE))


# --- wire -----------------------------------------------------------------------------------------

records = st.lists(
    st.one_of(
        st.tuples(st.just(wire.OUTPUT), st.sampled_from([1, 2]), st.binary(max_size=300)),
        st.tuples(st.just(wire.MARK), st.just(0), st.binary(max_size=50)),
    ).map(lambda r: wire.Record(r[0], r[1], 1_700_000_000.25, r[2])),
    max_size=20,
)


@FAST
@given(records, st.lists(st.integers(min_value=0, max_value=10_000), max_size=10))
def test_records_round_trip_in_any_chunking(items: list[wire.Record], cuts: list[int]) -> None:
    stream = b"".join(wire.encode(r.kind, r.fd, r.time, r.data) for r in items)
    decoder = wire.RecordDecoder()
    out: list[wire.Record] = []
    start = 0
    for cut in [*sorted(c % (len(stream) + 1) for c in cuts), len(stream)]:
        out += decoder.feed(stream[start:cut])
        start = max(start, cut)
    assert out == items and decoder.pending == 0


@FAST
@given(st.binary(max_size=200))
def test_garbage_is_a_frame_error_or_held_records(garbage: bytes) -> None:
    decoder = wire.RecordDecoder()
    try:
        out = decoder.feed(garbage)
    except FrameError:
        return
    for record in out:  # whatever passed is what the checks allow
        assert wire.encode(record.kind, record.fd, record.time, record.data)


@pytest.mark.parametrize(
    ("kind", "fd", "time", "length", "what"),
    [
        (3, 1, 1.0, 0, "unknown kind 3"),
        (wire.OUTPUT, 0, 1.0, 0, "kind 1 for fd 0"),
        (wire.OUTPUT, 3, 1.0, 0, "kind 1 for fd 3"),
        (wire.MARK, 2, 1.0, 0, "kind 2 for fd 2"),
        (wire.OUTPUT, 1, math.nan, 0, "not a date"),
        (wire.OUTPUT, 1, -1.0, 0, "not a date"),
        (wire.OUTPUT, 1, 1e300, 0, "not a date"),
        (wire.OUTPUT, 1, 1.0, wire.MAX_PAYLOAD + 1, "exceeds"),
    ],
)
def test_bad_header_is_refused_before_its_payload(
    kind: int, fd: int, time: float, length: int, what: str
) -> None:
    with pytest.raises(FrameError, match=what):
        wire.RecordDecoder().feed(wire.HEADER.pack(kind, fd, time, length))
    with pytest.raises(ValueError, match=what):
        wire.encode(kind, fd, time, b"x" * length)


# --- books ----------------------------------------------------------------------------------------

lines = st.lists(
    st.tuples(st.sampled_from([0, 1, 2]), st.integers(min_value=0, max_value=3000), st.floats(0, 100)),
    max_size=80,
)


def fill(book: Book, items: list[tuple[int, int, float]]) -> list[tuple[float, int, bytes]]:
    """Add the items (fd, size, time); return every entry added, in order (as pieces)."""
    added = []
    for n, (fd, size, time) in enumerate(items):
        data = bytes([n % 256]) * size
        book.add(fd, data, time)
        piece = min(wire.MAX_PAYLOAD, book.capacity - OVERHEAD)
        added += [(time, fd, data[i : i + piece]) for i in range(0, max(size, 1), piece)]
    return added


def held(book: Book) -> list[tuple[float, int, bytes]]:
    _, entries, _ = book.read(0, 1 << 40)
    return [(e.time, e.fd, e.data) for e in entries]


@FAST
@given(lines, st.integers(min_value=MIN_CAPACITY, max_value=20_000))
def test_the_byte_bound_holds_and_the_newest_that_fit_are_kept_in_order(
    items: list[tuple[int, int, float]], capacity: int
) -> None:
    book = Book("web", capacity)
    added = fill(book, items)
    kept = held(book)
    assert book.used == sum(OVERHEAD + len(d) for _, _, d in kept) <= capacity
    # Exactly the longest suffix of everything added that fits: oldest forgotten first.
    assert kept == added[len(added) - len(kept) :]
    if len(kept) < len(added):
        assert book.used + OVERHEAD + len(added[-len(kept) - 1][2]) > capacity
    assert (book.first, book.end) == (len(added) - len(kept), len(added))


@FAST
@given(
    lines,
    st.one_of(st.none(), st.integers(min_value=0, max_value=90)),
    st.one_of(st.none(), st.floats(0, 110)),
)
def test_tail_and_since_select_exactly_the_expected_suffix(
    items: list[tuple[int, int, float]], tail: int | None, cutoff: float | None
) -> None:
    book = Book("web", 40_000)
    fill(book, items)
    kept = held(book)
    begin = 0
    if tail is not None:  # from the tail-th last line of output, marks after it included
        outputs = [i for i, (_, fd, _) in enumerate(kept) if fd != MARK_FD]
        begin = len(kept) if tail == 0 else (outputs[-tail] if tail <= len(outputs) else 0)
    if cutoff is not None:  # the longest suffix no older than the cutoff
        newest = len(kept)
        while newest > begin and kept[newest - 1][0] >= cutoff:
            newest -= 1
        begin = newest
    cursor = book.start(tail, cutoff)
    _, entries, end = book.read(cursor, 1 << 40)
    assert [(e.time, e.fd, e.data) for e in entries] == kept[begin:]
    assert [e.seq for e in entries] == list(range(book.first + begin, book.end)) and end == book.end


def test_a_reader_that_fell_behind_learns_how_much_it_missed_once() -> None:
    book = Book("web", MIN_CAPACITY)
    for n in range(10):
        book.add(1, b"%d" % n, float(n))
    cursor = book.start(None, None)
    dropped, entries, cursor = book.read(cursor, 1)
    assert (dropped, [e.data for e in entries]) == (0, [b"0"])  # at least one, budget or not
    per_line = OVERHEAD + 4
    for n in range(100, 100 + MIN_CAPACITY // per_line):
        book.add(1, b"%d" % n, float(n))
    dropped, entries, cursor = book.read(cursor, 1 << 20)
    assert dropped == book.first - 1 > 0
    assert entries[0].seq == book.first and cursor == book.end
    assert book.read(cursor, 1 << 20) == (0, [], cursor)


def test_empty_lines_are_bounded_and_long_lines_come_in_pieces() -> None:
    book = Book("web", MIN_CAPACITY)
    for _ in range(10_000):
        book.add(1, b"", 1.0)
    assert len(book) == MIN_CAPACITY // OVERHEAD and book.used <= MIN_CAPACITY
    big = Book("web", 1 << 20)
    big.add(2, b"x" * (2 * wire.MAX_PAYLOAD + 5), 1.0)
    assert [len(e.data) for e in big.read(0, 1 << 30)[1]] == [wire.MAX_PAYLOAD, wire.MAX_PAYLOAD, 5]
    small = Book("web", MIN_CAPACITY)  # a piece never exceeds the book: only its end is kept
    small.add(1, bytes(range(256)) * 100, 1.0)
    assert small.used <= MIN_CAPACITY and held(small)[-1][2].endswith(bytes(range(256)))


def test_the_charge_per_line_covers_what_python_spends() -> None:
    book = Book("web", 8 << 20)
    payloads = [os.urandom(n % 120) for n in range(20_000)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for data in payloads:
            book.add(1, bytearray(data).decode("latin-1").encode("latin-1"), 1.5 + len(data))
        spent = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(book) == len(payloads)
    assert spent <= book.used, (spent, book.used)


def test_a_restart_leaves_one_mark_naming_how_the_run_ended() -> None:
    book = Book("web")
    book.event("started", 1.0)
    book.add(1, b"hello", 2.0)
    book.event("exited", 3.0, 1)
    book.event("started", 4.0)
    book.event("exited", 5.0, -9)
    book.event("started", 6.0)
    book.event("failed", 7.0)
    book.event("started", 8.0)
    book.event("stopped", 9.0, -15)  # a reload changed it
    book.event("started", 10.0)
    assert held(book) == [
        (2.0, 1, b"hello"),
        (4.0, 0, b"container web restarted (exit status 1)"),
        (6.0, 0, b"container web restarted (killed by SIGKILL)"),
        (8.0, 0, b"container web restarted (its start failed)"),
        (10.0, 0, b"container web restarted (stopped by the enforcer)"),
    ]
    assert book.start(1, None) == book.start(None, None)  # marks do not count as lines


def test_resize_trims_to_the_new_bound() -> None:
    book = Book("web", 1 << 20)
    for n in range(1000):
        book.add(1, b"line %d" % n, float(n))
    book.resize(MIN_CAPACITY)
    assert book.used <= MIN_CAPACITY and held(book)[-1][2] == b"line 999"
    with pytest.raises(ValueError):
        book.resize(MIN_CAPACITY - 1)


def test_the_shelf_is_bounded_and_forgets_stopped_containers_first() -> None:
    forgotten: list[tuple[str, str, str]] = []
    shelf = Shelf(MIN_CAPACITY, max_books=3, on_forget=forgotten.append)
    keys = [("a", "i", f"c{n}") for n in range(4)]
    for n, key in enumerate(keys[:3]):
        shelf.output(key, 1, b"x", float(n))
    shelf.event(keys[2], "stopped", 5.0, 0)
    shelf.output(keys[3], 1, b"y", 6.0)  # over the bound: the stopped one goes, not the oldest
    assert forgotten == [keys[2]] and set(shelf.books) == {keys[0], keys[1], keys[3]}
    shelf.output(("a", "i", "c9"), 1, b"z", 7.0)  # none stopped: the one silent longest
    assert forgotten == [keys[2], keys[0]]
    shelf.event(keys[1], "stopped", 10.0, 0)
    shelf.configure(MIN_CAPACITY * 2, 10.0 + FORGET_AFTER)  # not long enough ago yet
    assert keys[1] in shelf.books and shelf.books[keys[1]].capacity == MIN_CAPACITY * 2
    book = shelf.books[keys[1]]
    shelf.configure(MIN_CAPACITY, 11.0 + FORGET_AFTER)
    assert keys[1] not in shelf.books and book.forgotten and forgotten[-1] == keys[1]


# --- the site handler -----------------------------------------------------------------------------


class FakeChannel:
    """What the handler uses of a Channel; writes wait while ``gate`` is closed (no credit)."""

    def __init__(self) -> None:
        self.sent = bytearray()
        self.accepted = False
        self.eof_sent = False
        self.gate = asyncio.Event()
        self.gate.set()
        self.writes = 0
        self.waiting = False  # a write waits at the gate
        self._incoming: asyncio.Queue[bytes | StreamError] = asyncio.Queue()

    def accept(self) -> None:
        self.accepted = True

    async def write(self, data: bytes) -> None:
        self.waiting = True
        await self.gate.wait()
        self.waiting = False
        assert not self.eof_sent
        self.sent += data
        self.writes += 1

    def write_eof(self) -> None:
        self.eof_sent = True

    async def read(self) -> bytes:
        item = await self._incoming.get()
        if isinstance(item, StreamError):
            raise item
        return item

    def client_eof(self) -> None:
        self._incoming.put_nowait(b"")

    def client_reset(self) -> None:
        self._incoming.put_nowait(StreamError("reset by the client", code=ErrorCode.CANCEL))

    def records(self) -> list[tuple[int, float, bytes]]:
        return [(r.fd, r.time, r.data) for r in wire.RecordDecoder().feed(bytes(self.sent))]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


INSTANCE = ServiceInstance("popcorn", "popcorn-1", None)


def context(clock: Clock) -> HandlerContext:
    return HandlerContext(site="s", sockets=cast(Any, None), clock=clock)


def logs_request(**args: object) -> OpenRequest:
    return OpenRequest(verb="logs", application=KEY[0], service_instance=KEY[1], container=KEY[2], args=args)


def line(handler: LogsHandler, fd: int, data: bytes, time: float) -> None:
    handler.observe(ContainerOutput(*KEY, fd=fd, data=data, time=time))


def event(handler: LogsHandler, name: str, time: float, exit_code: int | None = None) -> None:
    handler.observe(ContainerEvent(*KEY, event=name, time=time, exit_code=exit_code))


async def until(predicate: Any) -> None:
    end = asyncio.get_running_loop().time() + DEADLINE
    while not predicate():
        assert asyncio.get_running_loop().time() < end, "timed out"
        await asyncio.sleep(0.005)  # polling a condition with a deadline


def serve(handler: LogsHandler, channel: FakeChannel, clock: Clock, **args: object) -> asyncio.Task[None]:
    return asyncio.create_task(
        handler.handle(cast(Any, channel), logs_request(**args), INSTANCE, context(clock))
    )


def test_selection_without_follow_ends_after_what_was_held() -> None:
    async def main() -> None:
        handler, clock = LogsHandler(), Clock()
        handler.configure({})
        event(handler, "started", 900.0)
        for n in range(5):
            line(handler, 1 + n % 2, b"line %d" % n, 900.0 + 20 * n)
        channel = FakeChannel()
        task = serve(handler, channel, clock, tail=3, since=50)  # since: from 950 on
        await until(lambda: channel.eof_sent)
        assert channel.accepted and not task.done()  # the stream ends at the client's EOF
        assert channel.records() == [(2, 960.0, b"line 3"), (1, 980.0, b"line 4")]
        channel.client_eof()
        await task
        everything = FakeChannel()
        await_task = serve(handler, everything, clock)
        await until(lambda: everything.eof_sent)
        assert [d for _, _, d in everything.records()] == [b"line %d" % n for n in range(5)]
        everything.client_eof()
        await await_task

    run(main())


def test_follow_sees_the_restart_and_the_next_run_until_the_client_eof() -> None:
    async def main() -> None:
        handler, clock = LogsHandler(), Clock()
        channel = FakeChannel()
        task = serve(handler, channel, clock, tail=0, follow=True)  # no book yet
        await until(lambda: channel.accepted)
        event(handler, "started", 1.0)
        line(handler, 1, b"first run", 2.0)
        await until(lambda: len(channel.records()) == 1)
        event(handler, "exited", 3.0, 1)
        event(handler, "started", 4.0)
        line(handler, 2, b"second run", 5.0)
        await until(lambda: len(channel.records()) == 3)
        assert channel.records() == [
            (1, 2.0, b"first run"),
            (0, 4.0, b"container web restarted (exit status 1)"),
            (2, 5.0, b"second run"),
        ]
        assert not channel.eof_sent
        channel.client_eof()
        await task
        assert channel.eof_sent

    run(main())


def test_a_slow_follower_gets_one_drop_mark_and_the_site_holds_nothing_for_it() -> None:
    async def main() -> None:
        handler, clock = LogsHandler(), Clock()
        handler.configure({"buffer-bytes": MIN_CAPACITY})
        channel = FakeChannel()
        channel.gate.clear()  # no credit
        task = serve(handler, channel, clock, follow=True)
        await until(lambda: channel.accepted)
        line(handler, 1, b"stuck", 1.0)
        await until(lambda: channel.waiting)  # "stuck" is on its way, without credit
        for n in range(200):
            line(handler, 1, b"line %03d" % n, 2.0)
        assert handler.shelf.used() <= MIN_CAPACITY
        channel.gate.set()
        await until(lambda: channel.records() and channel.records()[-1][2] == b"line 199")
        got = channel.records()
        assert got[0] == (1, 1.0, b"stuck")
        marks = [d for fd, _, d in got if fd == 0]
        kept = len(handler.shelf.get(KEY) or ())
        assert marks == [b"%d lines were dropped: this reader fell behind the site's buffer" % (200 - kept)]
        assert [d for fd, _, d in got[2:]] == [b"line %03d" % n for n in range(200 - kept, 200)]
        channel.client_reset()
        with pytest.raises(StreamError):
            await task

    run(main())


def test_a_forgotten_container_ends_its_followers() -> None:
    async def main() -> None:
        handler = LogsHandler()
        line(handler, 1, b"bye", 1.0)
        event(handler, "stopped", 2.0, 0)
        channel = FakeChannel()
        task = serve(handler, channel, Clock(), follow=True)
        await until(lambda: len(channel.records()) == 1)
        handler.configure({})  # at a reload long after the stop (the event time is 2.0)
        await until(lambda: channel.eof_sent)
        assert channel.records()[1:] == [(0, 1000.0, b"the site no longer keeps the output of container web")]
        channel.client_eof()
        await task

    run(main())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"tail": -1}, "'tail' must be an integer from 0 to 1000000"),
        ({"since": 0}, "'since' must be a number of seconds > 0"),
        ({"follow": "yes"}, "'follow' must be true or false"),
        ({"lines": 3}, "unknown key 'lines'"),
    ],
)
def test_bad_args_refuse_the_stream_in_one_line(args: dict[str, object], message: str) -> None:
    async def main() -> None:
        channel = FakeChannel()
        with pytest.raises(StreamError) as info:
            await serve(LogsHandler(), channel, Clock(), **args)
        assert info.value.code == ErrorCode.PROTOCOL and message in str(info.value)
        assert not channel.accepted

    run(main())


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"buffer-bytes": 4095}, "'buffer-bytes' must be an integer from 4096 to 67108864 (bytes)"),
        ({"buffer-bytes": 1 << 30}, "'buffer-bytes' must be at most 67108864"),
        ({"buffer-bytes": "1M"}, "'buffer-bytes' must be an integer from 4096"),
        ({"buffer": 1}, "unknown key 'buffer' (known: buffer-bytes)"),
    ],
)
def test_bad_settings_are_one_usage_line(settings: dict[str, object], message: str) -> None:
    handler = LogsHandler()
    with pytest.raises(UsageError) as info:
        handler.configure(settings)
    assert str(info.value).startswith("bad inventory [verbs.logs]: ") and message in str(info.value)
    handler.configure({"buffer-bytes": 65536})
    assert handler.shelf.capacity == 65536


# --- the client -----------------------------------------------------------------------------------


class ReplayChannel:
    """Feeds recorded stream bytes to the client, in chunks."""

    def __init__(self, data: bytes, chunk: int = 7) -> None:
        self.chunks = [data[i : i + chunk] for i in range(0, len(data), chunk)]
        self.reset_with: tuple[ErrorCode, str] | None = None
        self.eof_sent = False

    async def read(self) -> bytes:
        return self.chunks.pop(0) if self.chunks else b""

    def reset(self, code: ErrorCode, text: str = "") -> None:
        self.reset_with = (code, text)

    def write_eof(self) -> None:
        self.eof_sent = True


def print_records(data: bytes, timestamps: bool = False) -> tuple[int, bytes, bytes]:
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        code = run(Printer(timestamps, out_w, err_w).run(cast(Any, ReplayChannel(data))))
    finally:
        os.close(out_w)
        os.close(err_w)
    with os.fdopen(out_r, "rb") as out, os.fdopen(err_r, "rb") as err:
        return code, out.read(), err.read()


STREAM = b"".join(
    [
        wire.encode(wire.OUTPUT, 1, 1_733_306_057.5, b"out \x00 bytes"),
        wire.encode(wire.OUTPUT, 2, 1_733_306_058.0, b"err line"),
        wire.encode(wire.MARK, 0, 1_733_306_059.25, b"container web restarted (exit status 1)\x1b[2J"),
        wire.encode(wire.OUTPUT, 1, 1_733_306_060.0, b""),
    ]
)


def test_stdout_and_stderr_are_kept_apart_byte_for_byte() -> None:
    code, out, err = print_records(STREAM)
    assert code == 0
    assert out == b"out \x00 bytes\n\n"
    assert err == b"err line\n--- container web restarted (exit status 1)?[2J ---\n"


def test_printer_ends_its_half_at_the_sites_eof() -> None:
    channel = ReplayChannel(wire.encode(wire.OUTPUT, 1, 1.0, b"x"))
    out_r, out_w = os.pipe()
    try:
        assert run(Printer(False, out_w, out_w).run(cast(Any, channel))) == 0
    finally:
        os.close(out_w)
        os.close(out_r)
    assert channel.eof_sent and channel.reset_with is None


def test_timestamps_prefix_every_line_in_rfc3339_utc() -> None:
    _, out, err = print_records(STREAM, timestamps=True)
    assert out == b"2024-12-04T09:54:17.500000Z out \x00 bytes\n2024-12-04T09:54:20.000000Z \n"
    assert err.splitlines()[1].startswith(b"2024-12-04T09:54:19.250000Z --- container web")
    assert rfc3339(0.0) == b"1970-01-01T00:00:00.000000Z"


def test_malformed_or_truncated_records_are_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="malformed logs records: logs record of unknown kind 9"):
        print_records(struct.pack("!BBdI", 9, 1, 1.0, 0))
    with pytest.raises(ProtocolError, match=r"ended inside a record \(3 bytes left\)"):
        print_records(STREAM + wire.encode(wire.OUTPUT, 1, 1.0, b"abc")[:3])


def test_a_closed_stdout_ends_quietly_with_sigpipe_status() -> None:
    out_r, out_w = os.pipe()
    os.close(out_r)
    channel = ReplayChannel(STREAM)
    try:
        code = run(Printer(False, out_w, out_w).run(cast(Any, channel)))
    finally:
        os.close(out_w)
    assert code == 141 and channel.reset_with == (ErrorCode.CANCEL, "the output of supctl was closed")


@pytest.mark.parametrize(("text", "seconds"), [("10s", 10.0), ("5m", 300.0), ("2h", 7200.0), ("1d", 86400.0)])
def test_since_durations(text: str, seconds: float) -> None:
    assert since_seconds(text) == seconds


@pytest.mark.parametrize("text", ["", "10", "0s", "-5m", "1.5h", "2w", "5 m", "\uff11s"])
def test_bad_since_is_one_usage_line(text: str) -> None:
    with pytest.raises(UsageError) as info:
        since_seconds(text)
    assert str(info.value) == f"logs: --since must be a duration like 10s, 5m, 2h or 1d, not {text!r}"
    with pytest.raises(UsageError, match="logs: --since must be at most 10000d"):
        since_seconds("10001d")


def test_options_become_the_open_args() -> None:
    assert logs_args(False, -1, None) == {}
    assert logs_args(True, 0, "5m") == {"tail": 0, "since": 300.0, "follow": True}
    result = CliRunner().invoke(make_logs_command(), ["--tail", "-2"], standalone_mode=False)
    assert isinstance(result.exception, click.BadParameter)
    assert printable(b"a\nb\xff\x07") == "a?b\ufffd?"
