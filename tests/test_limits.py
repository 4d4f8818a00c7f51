"""Site identity and the tower's limits, end to end (docs/tower.md, "Limits").

Each stack runs a tower whose ``tower.toml`` (written by ``control-tower init``)
is edited before ``serve`` to set small limits.  Every limit hit must give its
clear one-line reason (in supctl's output and the tower's log) while the other
sessions keep working.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import websockets
from e2e_support import echo_roundtrip, inventory, start_server, wait_until
from stack import Proc, Stack, do_args, one_line_error
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from supctl.errors import ExitCode
from supctl.protocol import SUBPROTOCOL, Connection, StreamReset
from supctl.protocol.frames import FrameType, encode

APP = "app"
INST = "inst"
SITE = "site1"
DEADLINE = 20.0


def start_tower(stack: Stack, limits: dict[str, float], keepalive: float | None = None) -> None:
    """Like ``Stack.start_tower``, with ``[limits]`` (and ``keepalive``) added to tower.toml."""
    stack.start_tower(limits, keepalive)


def tower_log(stack: Stack) -> str:
    assert stack.tower is not None
    return stack.tower.log.text()


def forward(stack: Stack, echo_port: int) -> tuple[Proc, int]:
    return stack.forward(*do_args(SITE, APP, INST, "connect", "tcp", str(echo_port), "--bind", "0"))


def open_echo(port: int) -> socket.socket:
    """A connection through a forward, proven open by one echoed round trip."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    sock.sendall(b"ping")
    assert sock.recv(4) == b"ping"
    return sock


def refused_connection(port: int) -> None:
    """A connection the forward accepts locally and then aborts (its stream was refused).

    The RST may come before connect() even returns (loopback, a busy machine): the
    same outcome."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as sock:
            sock.sendall(b"x")
            assert sock.recv(10) == b""
    except (ConnectionResetError, BrokenPipeError):
        pass


def stop(proc: Proc) -> None:
    proc.stop()


def session_count(stack: Stack) -> int:
    text = tower_log(stack)
    return text.count("session opened ") - text.count("session closed ")


# --- counting limits ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def counts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, int]]:
    with Stack(tmp_path_factory.mktemp("limits-counts")) as stack:
        start_tower(stack, {"streams-per-session": 2, "streams-per-user": 3, "sessions-per-user": 2})
        stack.add_site(SITE, inventory(APP, INST))
        _, echo_port = start_server(stack, "echo")
        yield stack, echo_port


@pytest.fixture
def quiet_tower(counts: tuple[Stack, int]) -> Iterator[tuple[Stack, int]]:
    """No session of an earlier test is still counted when a test starts or ends."""
    stack = counts[0]
    wait_until(lambda: session_count(stack) == 0, DEADLINE, "earlier sessions to close")
    yield counts
    assert "Traceback" not in tower_log(stack)


def test_streams_per_session(quiet_tower: tuple[Stack, int]) -> None:
    stack, echo_port = quiet_tower
    proc, port = forward(stack, echo_port)
    first, second = open_echo(port), open_echo(port)
    try:
        refused_connection(port)
        proc.log.wait_for(
            r"connection 3 failed: more than 2 concurrent streams in this session \(streams-per-session\)\n"
        )
        assert "stream refused" in tower_log(stack)
        # The streams already open keep working, and a freed slot can be used again.
        first.sendall(b"still")
        assert first.recv(5) == b"still"
        second.close()
        wait_until(lambda: "connection 2 closed" in proc.log.text(), DEADLINE, "stream 2 to end")
        third = open_echo(port)
        third.close()
    finally:
        first.close()
        second.close()
        stop(proc)
    assert proc.log.count("failed:") == 1, proc.log.text()


def test_streams_per_user(quiet_tower: tuple[Stack, int]) -> None:
    stack, echo_port = quiet_tower
    proc_a, port_a = forward(stack, echo_port)
    proc_b, port_b = forward(stack, echo_port)
    held = [open_echo(port_a), open_echo(port_a), open_echo(port_b)]
    try:
        refused_connection(port_b)
        proc_b.log.wait_for(
            r"connection 2 failed: more than 3 concurrent streams for user admin \(streams-per-user\)\n"
        )
        for sock in held:  # everybody else keeps working
            sock.sendall(b"ok")
            assert sock.recv(2) == b"ok"
        held.pop().close()
        wait_until(lambda: "connection 1 closed" in proc_b.log.text(), DEADLINE, "a stream to end")
        open_echo(port_b).close()
    finally:
        for sock in held:
            sock.close()
        stop(proc_a)
        stop(proc_b)


def test_sessions_per_user(quiet_tower: tuple[Stack, int]) -> None:
    stack, echo_port = quiet_tower
    procs = [forward(stack, echo_port) for _ in range(2)]
    try:
        wait_until(lambda: session_count(stack) == 2, DEADLINE, "two sessions")
        result = stack.supctl(*do_args(SITE, APP, INST, "connect", "tcp", str(echo_port)), input=b"hi")
        assert result.returncode == ExitCode.UNAVAILABLE, result
        assert one_line_error(result.stderr) == "supctl: error: more than 2 sessions for user admin"
        assert "429 more than 2 sessions for user admin" in tower_log(stack)
        for _, port in procs:  # the sessions already open keep working
            assert echo_roundtrip(port, b"abc" * 1000) == b"abc" * 1000
        stop(procs.pop()[0])
        wait_until(lambda: session_count(stack) == 1, DEADLINE, "a session to close")
        result = stack.supctl(*do_args(SITE, APP, INST, "connect", "tcp", str(echo_port)), input=b"hi")
        assert result.returncode == 0, result
        assert result.stdout == b"hi"
    finally:
        for proc, _ in procs:
            stop(proc)


# --- timers ---------------------------------------------------------------------------------

MUTE = "mute"
MUTE_HELLO = {
    "site": MUTE,
    "version": "0",
    "handlers": ["tcp"],
    "applications": {APP: {"service-instances": {INST: {"containers": []}}}},
}


@pytest.fixture(scope="module")
def timers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, int, str]]:
    with Stack(tmp_path_factory.mktemp("limits-timers")) as stack:
        start_tower(stack, {"stream-open-timeout": 1, "stream-idle-timeout": 1.5})
        stack.add_site(SITE, inventory(APP, INST))
        _, echo_port = start_server(stack, "echo")
        mute_token = stack.control_tower(
            "site", "add", "--config", str(stack.dir / "tower.toml"), MUTE
        ).strip()
        yield stack, echo_port, mute_token


async def _mute_site(stack: Stack, token: str) -> ClientConnection:
    """An enforcer that says HELLO and then never accepts a stream."""
    before = tower_log(stack).count(f"site {MUTE} connected")
    ws = await connect(
        f"{stack.url}/v1/enforcer?site={MUTE}",
        ssl=ssl.create_default_context(cafile=str(stack.dir / "ca.pem")),
        additional_headers={"Authorization": f"Bearer {token}"},
        subprotocols=[websockets.Subprotocol(SUBPROTOCOL)],
        compression=None,
    )
    await ws.send(encode(FrameType.HELLO, 0, json.dumps(MUTE_HELLO).encode()))
    await asyncio.to_thread(
        wait_until, lambda: tower_log(stack).count(f"site {MUTE} connected") > before, DEADLINE, "HELLO"
    )
    return ws


def test_site_that_does_not_answer(timers: tuple[Stack, int, str]) -> None:
    stack, echo_port, token = timers

    async def run() -> tuple[subprocess.CompletedProcess[bytes], list[StreamReset]]:
        ws = await _mute_site(stack, token)
        conn = Connection(odd_ids=False, accept_streams=True)
        resets: list[StreamReset] = []
        async with ws:
            args = ["do", "-s", MUTE, "applications", APP, "service-instances", INST, "connect", "tcp", "80"]
            client = asyncio.ensure_future(asyncio.to_thread(stack.supctl, *args, input=b"hello"))
            try:
                while not resets:
                    message = await asyncio.wait_for(ws.recv(), DEADLINE)
                    assert isinstance(message, bytes)
                    for event in conn.receive_data(message):
                        assert not isinstance(event, StreamReset) or resets == [], event
                        if isinstance(event, StreamReset):
                            resets.append(event)
            except ConnectionClosed:
                pass
            return await client, resets

    result, resets = asyncio.run(run())
    assert result.returncode == ExitCode.STREAM, result
    assert one_line_error(result.stderr) == "supctl: error: the site did not answer within 1 s"
    assert [r.text for r in resets] == ["the site did not answer within 1 s"]  # the site is told too
    assert "result=reset by the tower: the site did not answer within 1 s" in tower_log(stack)
    wait_until(lambda: f"site {MUTE} disconnected" in tower_log(stack), DEADLINE, "the mute site to go")
    # The real site was never disturbed.
    result = stack.supctl(*do_args(SITE, APP, INST, "connect", "tcp", str(echo_port)), input=b"fine")
    assert (result.returncode, result.stdout) == (0, b"fine"), result


def test_idle_stream(timers: tuple[Stack, int, str]) -> None:
    stack, echo_port, _ = timers
    proc, port = stack.forward(*do_args(SITE, APP, INST, "connect", "tcp", str(echo_port), "--bind", "0"))
    try:
        idle = open_echo(port)
        busy = open_echo(port)
        started = time.monotonic()
        # The busy connection talks every 0.3 s and survives; the idle one is reset.
        while "idle for 1.5 s" not in proc.log.text():
            assert time.monotonic() - started < DEADLINE, proc.log.text()
            busy.sendall(b"tick")
            assert busy.recv(4) == b"tick"
            time.sleep(0.3)
        assert time.monotonic() - started >= 1.5
        proc.log.wait_for(r"connection 1 failed: idle for 1\.5 s\n")
        with pytest.raises((ConnectionResetError, AssertionError)):
            idle.sendall(b"late")
            assert idle.recv(4) == b"late"
        busy.sendall(b"tock")
        assert busy.recv(4) == b"tock"
        assert "connection 2 failed" not in proc.log.text()
        idle.close()
        busy.close()
        assert "result=reset by the tower: idle for 1.5 s" in tower_log(stack)
    finally:
        stop(proc)


# --- session duration, handshake time -------------------------------------------------------


@pytest.fixture(scope="module")
def short(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, int]]:
    with Stack(tmp_path_factory.mktemp("limits-short")) as stack:
        start_tower(stack, {"session-duration": 3, "handshake-timeout": 2})
        stack.add_site(SITE, inventory(APP, INST))
        _, echo_port = start_server(stack, "echo")
        yield stack, echo_port


def test_session_duration(short: tuple[Stack, int]) -> None:
    stack, echo_port = short
    proc, port = forward(stack, echo_port)
    started = time.monotonic()
    sock = open_echo(port)
    code = proc.popen.wait(DEADLINE)
    assert time.monotonic() - started >= 2.0
    sock.close()
    assert code == ExitCode.UNAVAILABLE
    lines = [line for line in proc.log.text().splitlines() if "error" in line]
    assert lines == ["supctl: error: lost the connection to the tower: session exceeded 3 s"], proc.log.text()
    assert "session exceeded 3 s" in tower_log(stack)
    # A new session works (until its own time is up).
    result = stack.supctl(*do_args(SITE, APP, INST, "connect", "tcp", str(echo_port)), input=b"again")
    assert (result.returncode, result.stdout) == (0, b"again"), result


def test_half_open_handshakes_are_dropped(short: tuple[Stack, int]) -> None:
    stack, echo_port = short
    host, _, port_text = stack.url.removeprefix("wss://").rpartition(":")
    address = (host, int(port_text))
    context = ssl.create_default_context(cafile=str(stack.dir / "ca.pem"))
    stalled: list[socket.socket] = []
    try:
        # 25 stall inside the TLS handshake (a ClientHello prefix), 25 finish TLS and then
        # send half an HTTP request.
        for _ in range(25):
            sock = socket.create_connection(address, timeout=DEADLINE)
            sock.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
            stalled.append(sock)
        for _ in range(25):
            tls = context.wrap_socket(
                socket.create_connection(address, timeout=DEADLINE), server_hostname=host
            )
            tls.sendall(b"GET /v1/enforcer HTTP/1.1\r\nHost: x\r\n")
            stalled.append(tls)
        started = time.monotonic()
        # Meanwhile a legitimate client is served at once.
        result = stack.supctl(*do_args(SITE, APP, INST, "connect", "tcp", str(echo_port)), input=b"legit")
        assert (result.returncode, result.stdout) == (0, b"legit"), result
        # Every half-open connection is dropped by the tower after its handshake timeout.
        for sock in stalled:
            try:
                while sock.recv(4096):
                    pass
            except (ConnectionResetError, ssl.SSLError, OSError):
                pass
        elapsed = time.monotonic() - started
        assert elapsed < 2 + 8, elapsed  # not asyncio's 60 s default for TLS handshakes
    finally:
        for sock in stalled:
            sock.close()
    assert stack.tower is not None and stack.tower.popen.poll() is None
    assert "Traceback" not in tower_log(stack)


# --- site identity --------------------------------------------------------------------------


def test_second_enforcer_is_refused_until_the_first_dies(tmp_path: Path) -> None:
    with Stack(tmp_path) as stack:
        start_tower(stack, {}, keepalive=2)
        first = stack.add_site(SITE, inventory(APP, INST))
        _, echo_port = start_server(stack, "echo")
        second = stack.start_enforcer(SITE, wait=False)
        message = rf"site {SITE} is already connected from 127\.0\.0\.1:\d+"
        second.log.wait_for(rf"the tower refused us: HTTP 409 {message}; reconnecting in", proc=second.popen)
        assert stack.tower is not None
        stack.tower.log.wait_for(rf"refused 127\.0\.0\.1:\d+ /v1/enforcer: 409 {message}")
        # The first enforcer keeps serving the site.
        payload = random.Random(4).randbytes(50_000)
        result = stack.supctl(*do_args(SITE, APP, INST, "connect", "tcp", str(echo_port)), input=payload)
        assert (result.returncode, result.stdout) == (0, payload), result.stderr
        assert f"site {SITE} disconnected" not in tower_log(stack)
        stack.wait_audit(lambda r: r.get("status") == 409 and r.get("site") == SITE, "the 409 record")
        # The first one dies without a word: the tower sees its TCP connection close,
        # and the second one takes over at its next attempt.
        before = tower_log(stack).count(f"site {SITE} connected")
        os.killpg(first.popen.pid, signal.SIGKILL)
        first.popen.wait()
        stack.tower.log.wait_for(rf"site {SITE} disconnected")
        wait_until(
            lambda: tower_log(stack).count(f"site {SITE} connected") > before, 40.0, "the second enforcer"
        )
        second.log.wait_for("connected to the tower as site")
        assert second.popen.poll() is None
        result = stack.supctl(*do_args(SITE, APP, INST, "connect", "tcp", str(echo_port)), input=b"again")
        assert (result.returncode, result.stdout) == (0, b"again"), result.stderr
        assert re.search(r"Traceback", tower_log(stack) + second.log.text()) is None


# --- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ("keepalive = -1\n", "'keepalive' must be a number of seconds >= 0"),
        ("keepalive = true\n", "'keepalive' must be a number"),
        ("[limits]\nstreams-per-session = 0\n", "'limits.streams-per-session' must be an integer >= 1"),
        ("[limits]\nsessions-per-user = 1.5\n", "'limits.sessions-per-user' must be an integer >= 1"),
        (
            "[limits]\nstream-open-timeout = 0\n",
            "'limits.stream-open-timeout' must be a number of seconds > 0",
        ),
        ("[limits]\nsession-duration = -2\n", "'limits.session-duration' must be a number of seconds >= 0"),
        ("[limits]\nstreams = 3\n", "unknown key 'limits.streams'"),
        ("limits = 3\n", "'limits' must be a table"),
    ],
)
def test_bad_limits_are_one_line_errors(tmp_path: Path, extra: str, fragment: str) -> None:
    from supctl.errors import UsageError
    from supctl.tower.config import load_config

    path = tmp_path / "tower.toml"
    path.write_text(extra)
    with pytest.raises(UsageError, match=re.escape(fragment)) as info:
        load_config(path)
    assert "\n" not in str(info.value)


def test_limits_defaults_and_values(tmp_path: Path) -> None:
    from supctl.tower.config import load_config
    from supctl.tower.limits import Limits

    path = tmp_path / "tower.toml"
    path.write_text("")
    config = load_config(path)
    assert (config.keepalive, config.limits) == (10.0, Limits())
    path.write_text("keepalive = 0\n[limits]\nstreams-per-user = 7\nstream-idle-timeout = 0.5\n")
    config = load_config(path)
    assert config.keepalive == 0
    assert (config.limits.streams_per_user, config.limits.stream_idle_timeout) == (7, 0.5)
    assert config.limits.streams_per_session == Limits().streams_per_session
