"""``exec -t`` without a tower: the checks of ``args.tty`` and ``resize`` (property
tests), the site's terminal session driven in process (an in-memory WebSocket
joined to a real :class:`Agent`, as tests/test_exec_unit.py does, host runtime:
no root), hostile terminal requests, the tower's ``exec-tty`` gate, and the CLI's
option parsing.  Through a real terminal: tests/test_exec_tty.py."""

from __future__ import annotations

import asyncio
import os
import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from stack import one_line_error
from supctl_exec.terminal import terminal_request, window_size
from test_exec_show_unit import supctl_run
from test_exec_unit import alive, run, site, until

from supctl.errors import ExitCode, StreamError, UsageError
from supctl.link import Channel, Link
from supctl.protocol import ErrorCode, OpenRequest
from supctl.protocol.exec import (
    EXEC_TTY,
    MAX_TERM,
    MAX_WINDOW,
    STDOUT,
    OutputDecoder,
    TtyRequest,
    WindowSize,
    parse_resize,
    parse_tty,
    valid_term,
)
from supctl.tower.siteinfo import SiteInfo

# --- the checks, property-based ---------------------------------------------------------

dimensions = st.integers(min_value=1, max_value=MAX_WINDOW)
not_dimensions = st.one_of(
    st.integers(max_value=0),
    st.integers(min_value=MAX_WINDOW + 1),
    st.booleans(),  # True is an int to Python: refused all the same
    st.floats(),
    st.text(max_size=5),
    st.none(),
    st.lists(st.integers(), max_size=2),
)
terms = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}", fullmatch=True)


@given(dimensions, dimensions, st.one_of(st.none(), terms))
def test_good_tty_args_round_trip(rows: int, cols: int, term: str | None) -> None:
    request = TtyRequest(WindowSize(rows, cols), term)
    assert parse_tty(request.to_args()) == request
    assert parse_resize({"resize": {"rows": rows, "cols": cols}}) == WindowSize(rows, cols)


@given(not_dimensions, dimensions, st.booleans())
def test_bad_dimensions_are_refused(bad: object, good: int, bad_rows: bool) -> None:
    size = {"rows": bad, "cols": good} if bad_rows else {"rows": good, "cols": bad}
    with pytest.raises(ValueError, match=r"(rows|cols) must be an integer 1-10000"):
        parse_tty(size)
    with pytest.raises(ValueError):
        parse_resize({"resize": size})


@given(st.text(max_size=100))
def test_term_is_a_short_terminfo_name(term: str) -> None:
    ok = re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", term) is not None and len(term) <= MAX_TERM
    assert valid_term(term) is ok
    args = {"rows": 24, "cols": 80, "term": term}
    if ok:
        assert parse_tty(args).term == term
    else:
        with pytest.raises(ValueError, match="term must be"):
            parse_tty(args)


@given(st.one_of(st.none(), st.integers(), st.text(max_size=5), st.lists(st.integers(), max_size=2)))
def test_tty_and_resize_must_be_objects(value: object) -> None:
    with pytest.raises(ValueError, match="must be an object"):
        parse_tty(value)
    with pytest.raises(ValueError, match="must be an object"):
        parse_resize({"resize": value})


def test_a_control_that_is_no_resize_is_none() -> None:
    assert parse_resize({"signal": "INT"}) is None
    assert parse_resize({}) is None


# --- the site's terminal session, in process ----------------------------------------------

TTY_SITE = """
[applications.app.service-instances.si.containers.c1]
env = { TERM = "vt100" }
"""


def tty_request(command: str, **tty: Any) -> OpenRequest:
    args: dict[str, Any] = {"command": command, "tty": {"rows": 24, "cols": 80, **tty}}
    return OpenRequest(verb="exec", application="app", service_instance="si", container="c1", args=args)


async def read_until(channel: Channel, decoder: OutputDecoder, out: bytearray, pattern: bytes) -> None:
    while not re.search(pattern, bytes(out)):
        data = await asyncio.wait_for(channel.read(), 10)
        assert data, f"EOF before {pattern!r}: {bytes(out)!r}"
        for fd, chunk in decoder.feed(data):
            assert fd == STDOUT  # a terminal merges stderr: only stdout records
            out += chunk


async def finish(channel: Channel, decoder: OutputDecoder, out: bytearray) -> dict[str, Any]:
    while data := await asyncio.wait_for(channel.read(), 10):
        for fd, chunk in decoder.feed(data):
            assert fd == STDOUT
            out += chunk
    control = await channel.read_control()
    return control["exit"]  # type: ignore[return-value]


def test_command_runs_on_a_controlling_terminal_of_the_given_size(monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        async with site(monkeypatch, TTY_SITE) as (tower, _):
            assert EXEC_TTY in tower.hellos[0]["features"]  # type: ignore[operator]
            # `tty` names the device; `stty size` reads it; /dev/tty opens only on a
            # controlling terminal; stderr arrives merged into stdout.
            command = "tty; stty size; echo ctty > /dev/tty; echo err >&2; echo $TERM; exit 3"
            channel = await tower.open_channel(tty_request(command, rows=30, cols=100, term="xterm-256color"))
            out = bytearray()
            status = await finish(channel, OutputDecoder(), out)
            lines = bytes(out).split(b"\r\n")
            assert re.fullmatch(rb"/dev/pts/\d+", lines[0]), out
            assert lines[1:5] == [b"30 100", b"ctty", b"err", b"xterm-256color"], out
            assert status == {"code": 3, "signal": None}
            # Without a term from the client, the container's.
            channel = await tower.open_channel(tty_request("echo $TERM"))
            out = bytearray()
            await finish(channel, OutputDecoder(), out)
            assert bytes(out) == b"vt100\r\n"

    run(main())


def test_resize_reaches_the_terminal_and_input_is_typed(monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        async with site(monkeypatch) as (tower, _):
            channel = await tower.open_channel(tty_request("stty size; read line; stty size; echo got=$line"))
            out, decoder = bytearray(), OutputDecoder()
            await read_until(channel, decoder, out, rb"24 80\r\n")
            channel.send_control({"resize": {"rows": 50, "cols": 132}})
            await channel.write(b"hello\r")  # Enter, as a raw terminal sends it
            status = await finish(channel, decoder, out)
            assert b"50 132\r\ngot=hello\r\n" in bytes(out), out
            assert status == {"code": 0, "signal": None}

    run(main())


def test_ctrl_c_byte_interrupts_the_foreground_job(monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        async with site(monkeypatch) as (tower, _):
            channel = await tower.open_channel(tty_request("echo ready; sleep 60; echo after $?"))
            out, decoder = bytearray(), OutputDecoder()
            await read_until(channel, decoder, out, rb"ready\r\n")

            # The line discipline turns ^C into SIGINT for the foreground job.  A ^C that
            # lands between `echo` and the fork of `sleep` is taken by `sh -c` itself and
            # acted on only after the next command ends (dash: seen in 1 of 2 runs on a
            # loaded machine); a user at a terminal types ^C again, and so does this test.
            async def type_ctrl_c() -> None:
                while True:
                    await channel.write(b"\x03")
                    await asyncio.sleep(0.5)  # the pace of a user's second ^C, not a wait

            typing = asyncio.create_task(type_ctrl_c())
            try:
                status = await finish(channel, decoder, out)
            finally:
                typing.cancel()
                await asyncio.gather(typing, return_exceptions=True)
            assert b"after 130" in bytes(out) or status == {"code": None, "signal": 2}, (out, status)

    run(main())


@pytest.mark.parametrize(
    ("tty", "text"),
    [
        ({"rows": True, "cols": 80}, "rows must be an integer"),
        ({"rows": 0, "cols": 80}, "rows must be an integer"),
        ({"rows": 24, "cols": MAX_WINDOW + 1}, "cols must be an integer"),
        ({"rows": 24, "cols": "80"}, "cols must be an integer"),
        ({"rows": 24.0, "cols": 80}, "rows must be an integer"),
        ({"rows": 24, "cols": 80, "term": "xterm\x1b]0;owned\x07"}, "term must be"),
        ({"rows": 24, "cols": 80, "term": "x" * (MAX_TERM + 1)}, "term must be"),
        ({"rows": 24, "cols": 80, "term": 7}, "term must be"),
        ("yes", "must be an object"),
    ],
)
def test_hostile_tty_args_are_refused_before_anything_runs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any, tty: object, text: str
) -> None:
    marker = tmp_path / "ran"

    async def main() -> None:
        async with site(monkeypatch) as (tower, _):
            request = tty_request(f"touch {marker}")
            request.args["tty"] = tty
            with pytest.raises(StreamError) as info:
                await tower.open_channel(request)
            assert info.value.code == ErrorCode.PROTOCOL
            assert "exec: bad args.tty" in str(info.value) and text in str(info.value)
            assert "\n" not in str(info.value)

    run(main())
    assert not marker.exists()


@pytest.mark.parametrize(
    "control",
    [
        {"resize": {"rows": True, "cols": 80}},
        {"resize": {"rows": 24, "cols": 2**40}},
        {"resize": {"rows": -1, "cols": 80}},
        {"resize": "big"},
        {"resize": None},
    ],
)
def test_malformed_resize_resets_the_stream_and_kills_the_command(
    monkeypatch: pytest.MonkeyPatch, control: dict[str, object]
) -> None:
    async def main() -> None:
        async with site(monkeypatch) as (tower, _):
            channel = await tower.open_channel(tty_request("echo $$; exec sleep 60"))
            out, decoder = bytearray(), OutputDecoder()
            await read_until(channel, decoder, out, rb"\d+\r\n")
            pid = int(bytes(out).split()[0])
            channel.send_control(control)
            with pytest.raises(StreamError) as info:
                while await asyncio.wait_for(channel.read(), 10):
                    pass
            assert info.value.code == ErrorCode.PROTOCOL and "malformed resize" in str(info.value)
            await until(lambda: not alive(pid))
            # The enforcer is unharmed: the next terminal works.
            await healthy(tower)

    run(main())


async def healthy(tower: Link) -> None:
    channel = await tower.open_channel(tty_request("echo fine"))
    out = bytearray()
    assert await finish(channel, OutputDecoder(), out) == {"code": 0, "signal": None}
    assert bytes(out) == b"fine\r\n"


def test_resize_flood_is_absorbed(monkeypatch: pytest.MonkeyPatch) -> None:
    """CONTROL is outside flow control; the session reads each resize at once (one
    ioctl), and the enforcer's ControlBound (32 unread) resets a stream whose peer
    sends faster than that: bounded memory either way, and the site serves on."""

    async def main() -> None:
        async with site(monkeypatch) as (tower, _):
            channel = await tower.open_channel(tty_request("read line; stty size"))
            for n in range(2000):
                channel.send_control({"resize": {"rows": 1 + n % 100, "cols": 1 + n % 200}})
                if n % 100 == 99:
                    await asyncio.sleep(0)  # let the link write and the site read
            channel.send_control({"resize": {"rows": 40, "cols": 90}})
            out = bytearray()
            try:
                await channel.write(b"\r")
                status = await finish(channel, OutputDecoder(), out)
            except StreamError as exc:  # the site cut it off: more than 32 unread, never a crash
                assert exc.code == ErrorCode.LIMIT and "unread CONTROL" in str(exc), exc
            else:
                assert bytes(out).endswith(b"40 90\r\n") and status["code"] == 0, out
            await healthy(tower)

    run(main())


def test_tty_output_waits_for_credit(monkeypatch: pytest.MonkeyPatch) -> None:
    size = 4 * 1024 * 1024

    async def main() -> None:
        async with site(monkeypatch) as (tower, _):
            channel = await tower.open_channel(tty_request(f"head -c {size} /dev/zero"))
            await asyncio.sleep(0.5)  # nobody reads: the command must be blocked on the terminal
            assert channel.buffered <= 256 * 1024
            out = bytearray()
            assert (await finish(channel, OutputDecoder(), out))["code"] == 0
            assert len(out) == size

    run(main())


# --- the tower's gate ------------------------------------------------------------------------


def hello(**extra: Any) -> dict[str, Any]:
    return {"site": "s", "version": "0.9", "handlers": ["exec"], "applications": {}, **extra}


def test_tower_refuses_tty_to_a_site_without_exec_tty() -> None:
    old = SiteInfo.parse(hello())
    new = SiteInfo.parse(hello(features=[EXEC_TTY]))
    tty = {"command": "sh", "tty": {"rows": 24, "cols": 80}}
    assert new.exec_refusal("s", tty) is None
    assert old.exec_refusal("s", {"command": "sh"}) is None
    text = old.exec_refusal("s", tty)
    assert text is not None and "the enforcer of site s (version 0.9) cannot run exec -t" in text


@pytest.mark.parametrize("features", ["exec-tty", {"a": 1}, 7])
def test_tower_refuses_a_hello_with_bad_features(features: object) -> None:
    with pytest.raises(ValueError, match="'features' must be a list"):
        SiteInfo.parse(hello(features=features))


def test_tower_keeps_bounded_features() -> None:
    info = SiteInfo.parse(hello(features=[EXEC_TTY, 3, "x" * 65, *(f"f{n}" for n in range(100))]))
    assert EXEC_TTY in info.features and len(info.features) <= 64
    assert all(isinstance(f, str) and len(f) <= 64 for f in info.features)


# --- the CLI -------------------------------------------------------------------------------

PATH = ["do", "-s", "s", "applications", "a", "service-instances", "i", "containers", "c", "exec"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # The hint is exact: pasted into a shell, it runs the words as they were given.
        (["-it", "sh", "-c", "echo a b"], r"quote it, e.g. exec -it 'sh -c '\''echo a b'\'''"),
        (["-t", "ls", "-l"], "quote it, e.g. exec -t 'ls -l'"),
        (["ls", "-it"], "quote it, e.g. exec 'ls -it'"),
    ],
)
def test_exec_options_come_before_command(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    code, out, err = supctl_run(capsys, "--host", "wss://127.0.0.1:1", *PATH, *args)
    assert (code, out) == (ExitCode.EXEC_FAILED, "")
    assert message in one_line_error(err.encode())


def test_exec_tty_without_a_terminal_is_refused_before_anything() -> None:
    read, write = os.pipe()
    try:
        with pytest.raises(UsageError) as info:
            terminal_request(read)
        assert info.value.exit_code == ExitCode.EXEC_FAILED
        assert str(info.value).startswith("exec -t needs a terminal, and stdin is not one")
    finally:
        os.close(read)
        os.close(write)


def test_terminal_request_takes_size_and_term_from_the_terminal() -> None:
    master, slave = os.openpty()
    try:
        import fcntl
        import struct
        import termios

        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 99, 0, 0))
        assert terminal_request(slave, {"TERM": "screen-256color"}) == TtyRequest(
            WindowSize(33, 99), "screen-256color"
        )
        assert terminal_request(slave, {"TERM": "bad term"}).term is None  # left to the site
        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 0, 0, 0, 0))
        assert window_size(slave) == WindowSize(24, 80)  # a terminal without a size
    finally:
        os.close(master)
        os.close(slave)
