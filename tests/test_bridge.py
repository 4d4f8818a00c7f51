"""SocketBridge end to end in one process (the rig: ``bridge_rig.py``): bytes both ways,
half-closes, resets as RSTs, a slow reader's back-pressure, refusals of one connection only."""

from __future__ import annotations

import asyncio
import contextlib
import os

import pytest
from bridge_rig import (
    DEADLINE,
    SMALL,
    MiB,
    Reader,
    Rig,
    Writer,
    digest,
    done,
    echo,
    is_error,
    read_end,
    resetting,
    round_trip,
    rst,
    run,
    send_all,
    sha,
    sink,
    tcp_socket,
)

from supctl.link import Channel
from supctl.protocol import (
    DEFAULT_WINDOW,
    ErrorCode,
    OpenRequest,
)

# --- tests ------------------------------------------------------------------------------------


def test_concurrent_connections_move_mebibytes_both_ways() -> None:
    sizes = [3 * MiB - i * 4099 for i in range(4)]  # different sizes: a mix-up cannot go unseen

    async def body(rig: Rig) -> None:
        target = await rig.target(echo)
        port = await rig.listen(target.port)

        async def one(size: int) -> None:
            payload = os.urandom(size)
            reader, writer, local = await rig.dial(port)
            sender = asyncio.ensure_future(send_all(writer, payload))
            received, end = await read_end(reader)
            await sender
            assert (len(received), sha(received), end) == (size, sha(payload), "eof")
            assert local.channel is not None and local.channel.bytes_out == local.channel.bytes_in == size
            assert await done(local) is None
            assert await done(await rig.site_bridge(local)) is None

        await asyncio.gather(*(one(size) for size in sizes))
        assert sorted([await target.outcome() for _ in sizes], key=str) == sorted(sizes, key=str)

    assert run(body) == []


def test_half_close_from_the_local_client() -> None:
    async def body(rig: Rig) -> None:
        target = await rig.target(digest)
        reader, writer, local = await rig.dial(await rig.listen(target.port))
        payload = os.urandom(MiB + 17)
        await send_all(writer, payload)  # ends with shutdown(SHUT_WR): the target sees EOF, answers
        assert await read_end(reader) == (sha(payload).encode(), "eof")
        assert await target.outcome() == "answered"
        assert await done(local) is None
        assert await done(await rig.site_bridge(local)) is None

    assert run(body) == []


@pytest.mark.parametrize(
    ("banner", "fin_first"),
    [
        (b"hello\n", False),
        (b"", False),
        (b"hello\n", True),  # data waits for the ACCEPT, and the FIN behind it
        (b"", True),  # uvloop reads the FIN before accept(): the EOF waits for the ACCEPT
    ],
    ids=["banner", "at-once", "banner-fin-first", "at-once-fin-first"],
)
def test_half_close_from_the_target(banner: bytes, fin_first: bool) -> None:
    """The target sends ``banner`` and shuts its write side down at once (``fin_first``: the
    FIN is there before the target bridge exists, hence before ``accept()``)."""

    async def banner_then_digest(reader: Reader, writer: Writer) -> str:
        writer.write(banner)
        writer.write_eof()
        return sha(await reader.read())

    async def body(rig: Rig) -> None:
        target = await rig.target(banner_then_digest)
        rig.site.fin_first = fin_first
        reader, writer, local = await rig.dial(await rig.listen(target.port))
        assert await read_end(reader) == (banner, "eof")
        assert not local.done.done()  # half-closed, not finished: the client may still send
        payload = os.urandom(MiB)
        await send_all(writer, payload)
        assert await target.outcome() == sha(payload)
        assert await done(local) is None
        assert await done(await rig.site_bridge(local)) is None

    assert run(body) == []


@pytest.mark.parametrize("failure", ["refused", "reset"])
def test_failing_target_ends_only_its_connection(failure: str) -> None:
    async def body(rig: Rig) -> None:
        r_ok, w_ok, ok = await rig.dial(await rig.listen((await rig.target(echo)).port))
        await round_trip(r_ok, w_ok, b"before")
        if failure == "refused":
            closed = tcp_socket(listen=True)
            port = closed.getsockname()[1]
            closed.close()  # nothing listens there any more
            code, text = ErrorCode.REFUSED, f"connection refused by 127.0.0.1:{port}"
        else:
            bad = await rig.target(resetting(after=256 * 1024))  # mid-stream: after 256 KiB
            port, code, text = bad.port, ErrorCode.CONNECTION_RESET, "connection reset by peer"
        reader, writer, local = await rig.dial(await rig.listen(port))
        sender = asyncio.ensure_future(send_all(writer, os.urandom(4 * MiB)))
        if failure == "reset":
            assert await bad.outcome() == "reset sent"
            assert is_error(await done(await rig.site_bridge(local)), code, text)  # the target's RST
        assert is_error(await done(local), code, text)  # the RESET on the stream
        assert await read_end(reader) == (b"", "reset")  # no answer, and a reset, not an EOF
        with contextlib.suppress(ConnectionError):
            await asyncio.wait_for(sender, DEADLINE)
        await round_trip(r_ok, w_ok, b"after" * 1000)
        w_ok.write_eof()
        assert await read_end(r_ok) == (b"", "eof")
        assert await done(ok) is None

    assert run(body) == []


def test_slow_local_reader_throttles_the_target() -> None:
    goal, stall = 32 * MiB, 0.3
    data = os.urandom(goal)
    sent_at_stall: list[int] = []

    async def source(reader: Reader, writer: Writer) -> int:
        """Send ``goal`` bytes; note how much was sent when a drain first makes no progress
        for ``stall`` s (the measure of "throttled", not a synchronisation)."""
        for offset in range(0, goal, 64 * 1024):
            writer.write(data[offset : offset + 64 * 1024])
            drain = asyncio.ensure_future(writer.drain())
            if not sent_at_stall and not (await asyncio.wait({drain}, timeout=stall))[0]:
                sent_at_stall.append(offset + 64 * 1024)
                stalled.set()
            await drain
        return goal

    async def body(rig: Rig) -> None:
        target = await rig.target(source, sndbuf=SMALL)
        reader, writer, local = await rig.dial(await rig.listen(target.port), rcvbuf=SMALL)
        remote = await rig.site_bridge(local)
        finished, stuck = asyncio.ensure_future(target.outcome()), asyncio.ensure_future(stalled.wait())
        await asyncio.wait({stuck, finished}, timeout=DEADLINE, return_when=asyncio.FIRST_COMPLETED)
        stuck.cancel()
        assert sent_at_stall and not finished.done(), "the target was not throttled"
        # Between the target and the idle reader: four small kernel buffers (~1 MiB on
        # loopback), one window (in flight or held by the listener bridge), one read held
        # by the target bridge, the target's and the reader's userspace buffers.
        assert sent_at_stall[0] <= 4 * MiB
        assert local.channel is not None and remote.channel is not None
        assert 0 < local.channel.peak_buffered <= DEFAULT_WINDOW  # the credit-holding path ran
        assert local.channel.buffered == remote.channel.buffered == 0  # receivers, no buffer
        assert sum(map(len, remote._pending)) <= 256 * 1024  # one read of the target's socket
        assert rig.site.conn.pending_output <= DEFAULT_WINDOW + 4096
        assert rig.site.ws.transport.get_write_buffer_size() <= DEFAULT_WINDOW + 4096  # type: ignore[attr-defined]
        writer.write_eof()
        received, end = await read_end(reader)
        assert (len(received), sha(received), end) == (goal, sha(data), "eof")
        assert await finished == goal
        assert await done(local) is None
        assert await done(remote) is None
        assert local.channel.peak_buffered <= DEFAULT_WINDOW

    stalled = asyncio.Event()
    assert run(body, small_buffers=True) == []


def test_abort_resets_the_stream_and_ends_only_that_connection() -> None:
    async def body(rig: Rig) -> None:
        r_ok, w_ok, ok = await rig.dial(await rig.listen((await rig.target(echo)).port))
        target = await rig.target(sink)
        reader, _, local = await rig.dial(await rig.listen(target.port))
        remote = await rig.site_bridge(local)  # accepted: the abort is a RESET, not a cancelled OPEN
        await round_trip(r_ok, w_ok, b"before")
        local.abort(ErrorCode.CANCEL, "aborted by the test")
        local.abort(ErrorCode.INTERNAL, "a second abort is a no-op")
        assert is_error(await done(local), ErrorCode.CANCEL, "aborted by the test")
        assert is_error(await done(remote), ErrorCode.CANCEL, "aborted by the test")
        assert local.channel is not None and local.channel.id not in rig.client.channels
        assert await read_end(reader) == (b"", "reset")
        assert await target.outcome() in {(b"", "eof"), (b"", "reset")}
        await round_trip(r_ok, w_ok, b"after")
        w_ok.write_eof()
        assert await read_end(r_ok) == (b"", "eof")
        assert await done(ok) is None

    assert run(body) == []


@pytest.mark.parametrize("cause", ["abort", "target-reset", "client-reset"])
def test_a_reset_reaches_the_other_socket_as_rst(cause: str) -> None:
    """Nothing is left unread in the aborting bridge's socket: only SO_LINGER 0 gives an RST."""

    async def body(rig: Rig) -> None:
        target = await rig.target(resetting(after=5) if cause == "target-reset" else sink)
        reader, writer, local = await rig.dial(await rig.listen(target.port))
        await rig.site_bridge(local)
        if cause == "client-reset":
            rst(writer)
            assert await target.outcome() == (b"", "reset")
            return
        if cause == "abort":
            local.abort(ErrorCode.CANCEL, "aborted by the test")
        else:
            writer.write(b"hello")
        assert await read_end(reader) == (b"", "reset")

    run(body)


@pytest.mark.parametrize("failure", ["link-lost", "bug"])
def test_open_channel_failing_aborts_the_connection(failure: str) -> None:
    def broken(_: asyncio.Transport) -> Channel:
        raise RuntimeError("boom")

    async def body(rig: Rig) -> None:
        port = (await rig.target(echo)).port
        if failure == "link-lost":
            await rig.client.aclose()  # open_channel_now raises StreamError(LINK_LOST)
        reader, _, local = await rig.dial(await rig.listen(port, broken if failure == "bug" else None))
        if failure == "link-lost":
            assert is_error(await done(local), ErrorCode.LINK_LOST, "link lost: closing")
        else:
            assert is_error(await done(local), ErrorCode.INTERNAL, "internal error: boom")
        assert local.channel is None
        assert (await read_end(reader))[0] == b""

    records = run(body)
    if failure == "link-lost":
        assert records == []
    else:  # logged once by the bridge, with its traceback; never an unhandled loop exception
        assert [(r.name, r.getMessage()) for r in records] == [
            ("supctl.bridge", "cannot open a stream for a connection")
        ]
        assert records[0].exc_info is not None and isinstance(records[0].exc_info[1], RuntimeError)


def test_a_stream_that_comes_later_gets_the_bytes_and_the_eof_sent_meanwhile() -> None:
    """``connect --bind`` while its session with the tower is re-opened: the listener
    answers None, the client sends its request and FIN, and the stream starts later
    (SocketBridge.start).  Nothing is lost, and the client's half-close still holds."""
    payload = os.urandom(3 * MiB)

    async def body(rig: Rig) -> None:
        port = (await rig.target(digest)).port
        reader, writer, local = await rig.dial(await rig.listen(port, lambda _: None))

        async def request() -> None:
            await send_all(writer, payload)  # more than the bridge reads at once: it must pause
            writer.write_eof()

        sender = asyncio.ensure_future(request())
        while not local._pending:  # the first bytes were read, and wait for a stream
            await asyncio.sleep(0.001)  # polling; run()'s deadline bounds it
        assert local.channel is None and not local.done.done()
        local.start(rig.client.open_channel_now(OpenRequest(verb="connect", protocol="tcp", port=port)))
        data, end = await read_end(reader)
        await sender
        assert (data.decode(), end) == (sha(payload), "eof")
        assert await done(local) is None

    assert run(body) == []


def test_a_stream_that_comes_after_its_connection_ended_is_reset() -> None:
    async def body(rig: Rig) -> None:
        port = (await rig.target(echo)).port
        _, writer, local = await rig.dial(await rig.listen(port, lambda _: None))
        local.abort(ErrorCode.LINK_LOST, "no session with the tower for 1 s")
        assert is_error(await done(local), ErrorCode.LINK_LOST, "no session with the tower for 1 s")
        channel = rig.client.open_channel_now(OpenRequest(verb="connect", protocol="tcp", port=port))
        local.start(channel)
        assert channel.error is not None and channel.error.code == ErrorCode.CANCEL
        writer.close()

    assert run(body) == []
