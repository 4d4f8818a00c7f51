"""The tower survives garbage: hostile clients and hostile enforcers lose their own
connection, everybody else keeps working.

One real stack for the module: a tower, site ``site1`` (host network) whose
instance reaches an echo server on 127.0.0.1, and a legitimate ``supctl ...
connect tcp PORT --bind 0`` forward kept busy by a background thread that
verifies every echoed byte.  After every test an autouse fixture checks that
the forward kept moving data, that a brand-new stream through it still works,
that the tower process is alive and that it never logged a traceback.

Close codes are ``4000 + ErrorCode`` (see :mod:`supctl.protocol.frames`), or
1009 when a WebSocket message exceeds ``max_size``.
"""

from __future__ import annotations

import asyncio
import gc
import json
import random
import re
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import websockets
from e2e_support import EchoPump, echo_roundtrip, inventory, start_server, wait_until
from stack import Stack, do_args, one_line_error, program
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from supctl.errors import ExitCode
from supctl.protocol import (
    DEFAULT_WINDOW,
    MAX_MESSAGE_ACCEPTED,
    SUBPROTOCOL,
    Connection,
    DataReceived,
    EndOfStream,
    ErrorCode,
    Event,
    OpenRequest,
    StreamAccepted,
    StreamOpened,
    StreamReset,
)
from supctl.protocol.frames import CLOSE_CODE_BASE, HEADER, MAX_DATA, WINDOW, FrameType, encode, split_frames

APP = "app"
INST = "inst"
SITE = "site1"
ROGUE = "rogue"

PROTOCOL = CLOSE_CODE_BASE + ErrorCode.PROTOCOL
FRAME_SIZE = CLOSE_CODE_BASE + ErrorCode.FRAME_SIZE
FLOW_CONTROL = CLOSE_CODE_BASE + ErrorCode.FLOW_CONTROL
DENIED = CLOSE_CODE_BASE + ErrorCode.DENIED
MESSAGE_TOO_BIG = 1009
DEADLINE = 10.0


@dataclass
class Env:
    stack: Stack
    echo_port: int
    forward_port: int
    pump: EchoPump
    admin_token: str
    rogue_token: str
    ssl: ssl.SSLContext = field(repr=False)

    @property
    def connect_url(self) -> str:
        return (
            f"{self.stack.url}/v1/state/applications/{APP}/service-instances/{INST}/connect"
            f"?site={SITE}&protocol=tcp&port={self.echo_port}"
        )

    def enforcer_url(self, site: str = ROGUE) -> str:
        return f"{self.stack.url}/v1/enforcer?site={site}"

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.stack.url.removeprefix("wss://").rpartition(":")
        return host, int(port)

    def tower_log(self) -> str:
        assert self.stack.tower is not None
        return self.stack.tower.log.text()

    def enforcer_log(self) -> str:
        return "".join(p.log.text() for p in self.stack.procs if p.log.path.name.startswith("enforcer-"))

    def tower_count(self, pattern: str) -> int:
        assert self.stack.tower is not None
        return self.stack.tower.log.count(pattern)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    stack = Stack(tmp_path_factory.mktemp("hostile"))
    pump: EchoPump | None = None
    try:
        stack.start_tower()
        stack.add_site(SITE, inventory(APP, INST))
        _, echo_port = start_server(stack, "echo")
        _, forward_port = stack.forward(
            *do_args(SITE, APP, INST, "connect", "tcp", str(echo_port), "--bind", "0")
        )
        pump = EchoPump(forward_port)
        pump.start()
        pump.wait_progress()
        rogue_token = subprocess.run(
            [program("control-tower"), "site", "add", "--config", str(stack.dir / "tower.toml"), ROGUE],
            check=True,
            capture_output=True,
            text=True,
            env=stack.env,
        ).stdout.strip()
        yield Env(
            stack=stack,
            echo_port=echo_port,
            forward_port=forward_port,
            pump=pump,
            admin_token=(stack.dir / "admin.token").read_text().strip(),
            rogue_token=rogue_token,
            ssl=ssl.create_default_context(cafile=str(stack.dir / "ca.pem")),
        )
    finally:
        if pump is not None:
            pump.stop()
        stack.close()


@pytest.fixture(autouse=True)
def _legitimate_traffic_survives(env: Env) -> Iterator[None]:
    env.pump.check()
    yield
    env.pump.wait_progress(rounds=3)
    payload = random.Random(7).randbytes(100_000)
    assert echo_roundtrip(env.forward_port, payload) == payload, "a new stream on the forward failed"
    assert env.stack.tower is not None
    assert env.stack.tower.popen.poll() is None, "the tower died"
    assert "Traceback" not in env.tower_log()
    assert "Traceback" not in env.enforcer_log()


# --- a scripted WebSocket peer ------------------------------------------------------------


@dataclass
class Outcome:
    code: int | None  # close code sent by the tower; None when it sent no close frame
    reason: str
    messages: list[bytes | str]  # what arrived before the close


async def _open(env: Env, url: str, token: str) -> ClientConnection:
    return await connect(
        url,
        ssl=env.ssl,
        additional_headers={"Authorization": f"Bearer {token}"},
        subprotocols=[websockets.Subprotocol(SUBPROTOCOL)],
        compression=None,
        max_size=None,
        open_timeout=DEADLINE,
    )


async def _until_closed(ws: ClientConnection, messages: list[bytes | str] | None = None) -> Outcome:
    received = messages if messages is not None else []
    try:
        while True:
            received.append(await asyncio.wait_for(ws.recv(), DEADLINE))
    except ConnectionClosed as exc:
        frame = exc.rcvd
        return Outcome(frame.code if frame else None, frame.reason if frame else "", received)


async def _send_all(ws: ClientConnection, messages: list[bytes | str]) -> Outcome | None:
    try:
        for message in messages:
            await ws.send(message)
    except ConnectionClosed:
        return await _until_closed(ws)
    return None


def hostile(env: Env, url: str, token: str, messages: list[bytes | str]) -> Outcome:
    """Connect, send ``messages`` and wait (with a deadline) for the tower to close."""

    async def run() -> Outcome:
        async with await _open(env, url, token) as ws:
            return await _send_all(ws, messages) or await _until_closed(ws)

    return asyncio.run(run())


class Peer:
    """A WebSocket driven by the real sans-I/O core, for the legitimate half of a script."""

    def __init__(self, ws: ClientConnection, conn: Connection) -> None:
        self.ws = ws
        self.conn = conn
        self.pending: list[Event] = []  # events of a message not yet asked for

    async def flush(self) -> None:
        while data := self.conn.data_to_send():
            await self.ws.send(data)

    async def event(self, *kinds: type[Event]) -> Event:
        """Feed messages to the core until an event of one of ``kinds`` comes out."""

        async def wait() -> Event:
            while True:
                while self.pending:
                    event = self.pending.pop(0)
                    if isinstance(event, kinds):
                        return event
                message = await self.ws.recv()
                assert isinstance(message, bytes), message
                self.pending += self.conn.receive_data(message)
                await self.flush()

        return await asyncio.wait_for(wait(), DEADLINE)


def frames_of(messages: list[bytes | str]) -> list[tuple[FrameType, int, bytes]]:
    out = []
    for message in messages:
        assert isinstance(message, bytes)
        out += [(f.type, f.stream_id, f.payload) for f in split_frames(message)]
    return out


def open_frame(stream_id: int, body: bytes | None = None, window: int = DEFAULT_WINDOW) -> bytes:
    payload = OpenRequest(verb="connect").to_json() if body is None else body
    return encode(FrameType.OPEN, stream_id, WINDOW.pack(window) + payload)


# --- (a) and (b): garbage below the WebSocket layer ---------------------------------------


def _closed_by_peer(sock: socket.socket) -> bytes:
    """Read until the tower closes (EOF or reset); fail if it keeps the socket open."""
    sock.settimeout(DEADLINE)
    received = b""
    try:
        while data := sock.recv(65536):
            received += data
    except ConnectionResetError:
        pass
    except TimeoutError:
        pytest.fail(f"the tower kept a garbage connection open for {DEADLINE} s")
    return received


@pytest.mark.parametrize("size", [5, 9, 517, 65536])
def test_raw_random_bytes_without_tls(env: Env, size: int) -> None:
    # At least a TLS record header, and not of the handshake type (0x16): OpenSSL
    # must refuse it at once.  (Shorter input just waits for more: see below.)
    data = b"\x17" + random.Random(size).randbytes(size - 1)
    with socket.create_connection(env.host_port, timeout=DEADLINE) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            return  # already thrown out
        _closed_by_peer(sock)


def test_connections_dropped_at_once_and_stalled_handshakes(env: Env) -> None:
    socks = [socket.create_connection(env.host_port, timeout=DEADLINE) for _ in range(50)]
    for sock in socks:
        sock.close()
    # Stalled TLS handshakes (a ClientHello prefix, then silence) are held by the
    # tower only until its handshake timeout; meanwhile everybody else is served.
    stalled = [socket.create_connection(env.host_port, timeout=DEADLINE) for _ in range(20)]
    try:
        for sock in stalled:
            sock.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
        env.pump.wait_progress(rounds=3)
        payload = random.Random(3).randbytes(10_000)
        assert echo_roundtrip(env.forward_port, payload) == payload
    finally:
        for sock in stalled:
            sock.close()


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"\x00\xff garbage \r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # not an upgrade at all
        b"GET /v1/enforcer HTTP/1.1\r\n" + b"X: " + b"y" * 100_000 + b"\r\n\r\n",  # huge header
        b"POST /v1/enforcer HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
    ],
    ids=["binary", "no-upgrade", "huge-header", "post"],
)
def test_tls_with_garbage_http(env: Env, request_bytes: bytes) -> None:
    host, port = env.host_port
    with (
        socket.create_connection((host, port), timeout=DEADLINE) as raw,
        env.ssl.wrap_socket(raw, server_hostname=host) as tls,
    ):
        try:
            tls.sendall(request_bytes)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            return
        answer = _closed_by_peer(tls)
    # Whatever websockets says (400, 426...), it says it in HTTP and hangs up.
    assert answer == b"" or answer.startswith(b"HTTP/1.1 4"), answer[:200]


# --- refusals before the upgrade -------------------------------------------------------------


def _refusal(env: Env, url: str, headers: dict[str, str]) -> tuple[int, dict[str, object]]:
    async def run() -> tuple[int, dict[str, object]]:
        with pytest.raises(InvalidStatus) as info:
            await connect(
                url,
                ssl=env.ssl,
                additional_headers=headers,
                subprotocols=[websockets.Subprotocol(SUBPROTOCOL)],
                open_timeout=DEADLINE,
            )
        response = info.value.response
        assert response.headers["Content-Type"] == "application/json"
        return response.status_code, json.loads(bytes(response.body or b""))

    return asyncio.run(run())


@pytest.mark.parametrize(
    ("which", "headers", "fragment"),
    [
        ("connect", {"Authorization": "Bearer sct_admin_not-a-real-token"}, "invalid API token"),
        ("connect", {}, "missing API token"),
        ("connect", {"Authorization": "Basic dXNlcjpwYXNz"}, "missing API token"),
        ("enforcer", {"Authorization": "Bearer sct_site_wrong"}, "invalid token for site"),
        ("enforcer-admin", {}, "invalid token for site"),
        ("enforcer-other-site", {}, "invalid token for site 'site1'"),
    ],
)
def test_bad_token_gets_401_before_upgrade(
    env: Env, which: str, headers: dict[str, str], fragment: str
) -> None:
    if which == "connect":
        url = env.connect_url
    elif which == "enforcer-admin":  # the admin token is not a site token
        url, headers = env.enforcer_url(), {"Authorization": f"Bearer {env.admin_token}"}
    elif which == "enforcer-other-site":  # a site token only opens its own site
        url, headers = env.enforcer_url(SITE), {"Authorization": f"Bearer {env.rogue_token}"}
    else:
        url = env.enforcer_url()
    status, body = _refusal(env, url, headers)
    assert status == 401
    errors = body["errors"]
    assert isinstance(errors, list)
    assert fragment in errors[0]["error-message"]
    assert env.admin_token not in json.dumps(body) and env.rogue_token not in json.dumps(body)


@pytest.mark.parametrize("path", ["/", "/v1/nope", "/v1/state/applications/app/connect", "/v1/enforcer/x"])
def test_unknown_path_gets_404_json(env: Env, path: str) -> None:
    status, body = _refusal(env, f"{env.stack.url}{path}", {"Authorization": f"Bearer {env.admin_token}"})
    assert status == 404
    errors = body["errors"]
    assert isinstance(errors, list) and len(errors) == 1
    assert isinstance(errors[0]["error-message"], str)
    assert path in errors[0]["error-message"]


# --- (c) an authenticated, hostile supctl session ---------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_session_random_binary_messages(env: Env, seed: int) -> None:
    rng = random.Random(seed)
    messages: list[bytes | str] = [rng.randbytes(rng.randint(1, 4096)) for _ in range(3)]
    outcome = hostile(env, env.connect_url, env.admin_token, messages)
    assert outcome.code in (PROTOCOL, FRAME_SIZE), outcome


def _data(stream_id: int, size: int) -> bytes:
    return encode(FrameType.DATA, stream_id, b"x" * size)


SESSION_ATTACKS: dict[str, tuple[list[bytes | str], int, str]] = {
    "text-message": (["hello, tower"], PROTOCOL, "text message"),
    "empty-message": ([b""], PROTOCOL, "empty message"),
    "unknown-type": ([HEADER.pack(99, 1, 0)], PROTOCOL, "unknown frame type 99"),
    "truncated-header": ([b"\x03\x00\x00\x00"], PROTOCOL, "truncated frame header"),
    "truncated-payload": (
        [HEADER.pack(FrameType.DATA, 1, 100) + b"x" * 10],
        PROTOCOL,
        "truncated frame payload",
    ),
    "valid-then-truncated": ([open_frame(1) + b"\x01"], PROTOCOL, "truncated frame header"),
    "oversize-frame-header": ([HEADER.pack(FrameType.DATA, 1, MAX_DATA + 1)], FRAME_SIZE, "exceeds"),
    "oversize-frame-whole": ([_data(1, MAX_DATA + 1)], FRAME_SIZE, "exceeds"),
    "message-over-max-size": ([b"\x00" * (MAX_MESSAGE_ACCEPTED + 1)], MESSAGE_TOO_BIG, ""),
    "data-never-opened-odd": ([_data(1, 10)], PROTOCOL, "unknown stream 1"),
    "data-never-opened-even": ([_data(2, 10)], PROTOCOL, "unknown stream 2"),
    "window-never-opened": ([encode(FrameType.WINDOW, 7, WINDOW.pack(100))], PROTOCOL, "unknown stream 7"),
    "reset-never-opened": ([encode(FrameType.RESET, 9, b"\x00\x01")], PROTOCOL, "unknown stream 9"),
    "open-even-id": ([open_frame(2)], PROTOCOL, "invalid stream id 2"),
    "open-stream-zero": ([open_frame(0)], PROTOCOL, "OPEN on stream 0"),
    "open-id-reused": ([open_frame(5) + open_frame(3)], PROTOCOL, "invalid stream id 3"),
    "open-too-short": ([encode(FrameType.OPEN, 1, b"\x00\x01")], PROTOCOL, "too short"),
    "open-window-too-large": ([open_frame(1, window=2**32 - 1)], FLOW_CONTROL, "out of range"),
    "open-window-too-small": ([open_frame(1, window=1024)], FLOW_CONTROL, "out of range"),
    "hello-from-client": ([encode(FrameType.HELLO, 0, b"{}")], PROTOCOL, "unexpected HELLO"),
    "data-on-stream-zero": ([_data(0, 1)], PROTOCOL, "on stream 0"),
}


@pytest.mark.parametrize("name", list(SESSION_ATTACKS))
def test_session_garbage_closes_that_session(env: Env, name: str) -> None:
    messages, code, fragment = SESSION_ATTACKS[name]
    before = env.tower_count("closing session")
    outcome = hostile(env, env.connect_url, env.admin_token, messages)
    assert outcome.code == code, outcome
    assert fragment in outcome.reason
    if code != MESSAGE_TOO_BIG and name != "text-message":
        # Frame errors are logged once, as one line, with the session that sent them.
        wait_until(
            lambda: env.tower_count("closing session") > before, DEADLINE, "the close in the tower log"
        )


def test_open_with_non_json_payload_resets_only_that_stream(env: Env) -> None:
    """A malformed OPEN *request* (well-framed, bad JSON) breaks a stream rule, not
    the framing: the core resets that stream alone with PROTOCOL (see the
    protocol's unit tests), and the same session then serves a good stream."""

    async def run() -> None:
        async with await _open(env, env.connect_url, env.admin_token) as ws:
            peer = Peer(ws, Connection(odd_ids=True, accept_streams=False))
            for sid, body in ((1, b"{not json"), (3, b"\xff\xfe"), (5, b"[1, 2]"), (7, b'{"verb": 5}')):
                await ws.send(open_frame(sid, body))
                message = await asyncio.wait_for(ws.recv(), DEADLINE)
                assert isinstance(message, bytes)
                [(ftype, got_sid, payload)] = frames_of([message])
                assert (ftype, got_sid) == (FrameType.RESET, sid)
                assert int.from_bytes(payload[:2], "big") == ErrorCode.PROTOCOL
            # Streams 1-7 are spent: burn them in the local core too (never sent).
            for _ in range(4):
                spent = peer.conn.open_stream(OpenRequest(verb="connect"))
                peer.conn.reset_stream(spent, ErrorCode.CANCEL)
                peer.conn.data_to_send()
            sid = peer.conn.open_stream(OpenRequest(verb="connect"))
            assert sid == 9
            await peer.flush()
            assert isinstance(await peer.event(StreamAccepted, StreamReset), StreamAccepted)
            peer.conn.send_data(sid, b"still here")
            peer.conn.send_eof(sid)
            await peer.flush()
            echoed = b""
            while True:
                event = await peer.event(DataReceived, EndOfStream, StreamReset)
                assert not isinstance(event, StreamReset), event
                if isinstance(event, EndOfStream):
                    break
                assert isinstance(event, DataReceived)
                echoed += event.data
                peer.conn.consumed(sid, len(event.data))
            assert echoed == b"still here"

    asyncio.run(run())


def _accepted_session_script(env: Env, attack: list[bytes]) -> Outcome:
    """Open a real stream to the echo server, wait for ACCEPT, then send ``attack``."""

    async def run() -> Outcome:
        async with await _open(env, env.connect_url, env.admin_token) as ws:
            peer = Peer(ws, Connection(odd_ids=True, accept_streams=False))
            sid = peer.conn.open_stream(OpenRequest(verb="connect"))
            assert sid == 1
            await peer.flush()
            assert isinstance(await peer.event(StreamAccepted, StreamReset), StreamAccepted)
            return await _send_all(ws, list(attack)) or await _until_closed(ws)

    return asyncio.run(run())


def test_session_ignoring_flow_control_is_closed(env: Env) -> None:
    # One message holding more DATA than the tower's 1 MiB window: it cannot
    # have granted credit half-way through a message, so this is a violation.
    frames = [_data(1, MAX_DATA)] * (DEFAULT_WINDOW // MAX_DATA + 1)
    outcome = _accepted_session_script(env, [b"".join(frames)])
    assert outcome.code == FLOW_CONTROL, outcome
    assert "beyond its window" in outcome.reason


@pytest.mark.parametrize(
    ("increment", "fragment"), [(0, "bad window increment 0"), (2**31, "bad window increment")]
)
def test_session_bad_window_increment_is_closed(env: Env, increment: int, fragment: str) -> None:
    outcome = _accepted_session_script(env, [encode(FrameType.WINDOW, 1, WINDOW.pack(increment))])
    assert outcome.code == FLOW_CONTROL, outcome
    assert fragment in outcome.reason


def test_session_that_vanishes_mid_stream(env: Env) -> None:
    """A client that drops TCP without a close frame costs only its own stream."""
    before = env.tower_count(r"stream closed .* result=client went away")

    async def run() -> None:
        ws = await _open(env, env.connect_url, env.admin_token)
        peer = Peer(ws, Connection(odd_ids=True, accept_streams=False))
        sid = peer.conn.open_stream(OpenRequest(verb="connect"))
        await peer.flush()
        assert isinstance(await peer.event(StreamAccepted, StreamReset), StreamAccepted)
        peer.conn.send_data(sid, b"x" * 1000)
        await peer.flush()
        ws.transport.abort()

    asyncio.run(run())
    wait_until(
        lambda: env.tower_count(r"stream closed .* result=client went away") > before,
        DEADLINE,
        "the relay of the vanished client to be closed",
    )


# --- (d) a hostile enforcer ----------------------------------------------------------------------

ROGUE_HELLO = {
    "site": ROGUE,
    "version": "0",
    "handlers": ["tcp"],
    "applications": {APP: {"service-instances": {INST: {"containers": []}}}},
}


def _hello(payload: object) -> bytes:
    return encode(FrameType.HELLO, 0, json.dumps(payload).encode())


ENFORCER_ATTACKS: dict[str, tuple[list[bytes | str], int | None, str]] = {
    "random-bytes": ([random.Random(99).randbytes(3000)], None, ""),  # None: PROTOCOL or FRAME_SIZE
    "text-message": (["HELLO?"], PROTOCOL, "text message"),
    "open-from-enforcer": ([open_frame(2)], DENIED, "may not open streams"),
    "open-after-hello": ([_hello(ROGUE_HELLO), open_frame(1)], DENIED, "may not open streams"),
    "hello-not-json": ([encode(FrameType.HELLO, 0, b"{nope")], PROTOCOL, "HELLO is not JSON"),
    "hello-not-object": ([_hello([1, 2, 3])], PROTOCOL, "must be a JSON object"),
    "hello-bad-applications": ([_hello({"applications": [], "handlers": []})], PROTOCOL, "bad HELLO"),
    "hello-bad-instances": ([_hello({"applications": {"a": 5}, "handlers": []})], PROTOCOL, "bad HELLO"),
    "hello-bad-containers": (
        [_hello({"applications": {"a": {"service-instances": {"i": {"containers": [1]}}}}})],
        PROTOCOL,
        "bad HELLO",
    ),
    "hello-on-stream-7": ([encode(FrameType.HELLO, 7, b"{}")], PROTOCOL, "unexpected HELLO"),
    "hello-twice": ([_hello(ROGUE_HELLO), _hello(ROGUE_HELLO)], PROTOCOL, "unexpected HELLO"),
    "data-never-opened": ([_hello(ROGUE_HELLO), _data(1, 5)], PROTOCOL, "unknown stream 1"),
    "oversize-message": ([b"\x00" * (MAX_MESSAGE_ACCEPTED + 1)], MESSAGE_TOO_BIG, ""),
}


@pytest.mark.parametrize("name", list(ENFORCER_ATTACKS))
def test_hostile_enforcer_is_closed(env: Env, name: str) -> None:
    messages, code, fragment = ENFORCER_ATTACKS[name]
    outcome = hostile(env, env.enforcer_url(), env.rogue_token, messages)
    if code is None:
        assert outcome.code in (PROTOCOL, FRAME_SIZE), outcome
    else:
        assert outcome.code == code, outcome
    assert fragment in outcome.reason
    # The rogue never stays registered after its link is closed.
    wait_until(lambda: ROGUE not in _connected_sites(env), DEADLINE, "the rogue to be unregistered")


def _connected_sites(env: Env) -> set[str]:
    """Sites the tower currently lists as connected, from its log."""
    sites: dict[str, bool] = {}
    for line in env.tower_log().splitlines():
        for verb, state in ((" connected (", True), (" disconnected: ", False)):
            if verb in line and "site " in line:
                sites[line.split("site ", 1)[1].split(" ", 1)[0]] = state
    return {site for site, up in sites.items() if up}


async def _supctl(env: Env, site: str, stdin: bytes) -> tuple[int, bytes, bytes]:
    proc = await asyncio.create_subprocess_exec(
        program("supctl"),
        *do_args(site, APP, INST, "connect", "tcp", "80"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env.stack.env,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out, err


async def _rogue_online(env: Env) -> tuple[ClientConnection, Peer]:
    before = env.tower_count(rf"site {ROGUE} connected")
    ws = await _open(env, env.enforcer_url(), env.rogue_token)
    await ws.send(_hello(ROGUE_HELLO))
    await asyncio.to_thread(
        wait_until, lambda: env.tower_count(rf"site {ROGUE} connected") > before, DEADLINE, "rogue HELLO"
    )
    return ws, Peer(ws, Connection(odd_ids=False, accept_streams=True))


@pytest.mark.parametrize(
    "misbehaviour", ["data-before-accept", "beyond-window", "garbage-after-accept", "window-flood"]
)
def test_hostile_enforcer_mid_stream(env: Env, misbehaviour: str) -> None:
    """A registered enforcer that breaks the rules on a live stream: the user gets a
    one-line stream error, the rogue loses its link (or the stream), site1 is untouched."""

    async def run() -> tuple[int, bytes, Outcome | None]:
        ws, peer = await _rogue_online(env)
        async with ws:
            client = asyncio.ensure_future(_supctl(env, ROGUE, b"hello"))
            opened = await peer.event(StreamOpened)
            assert isinstance(opened, StreamOpened)
            sid = opened.stream_id
            # The tower filled the identity fields from the URL it authorised.
            assert (opened.request.application, opened.request.service_instance) == (APP, INST)
            assert (opened.request.protocol, opened.request.port) == ("tcp", 80)
            outcome: Outcome | None = None
            if misbehaviour == "data-before-accept":
                await ws.send(_data(sid, 5))  # a stream error: reset, the link stays
            else:
                peer.conn.accept_stream(sid)
                await peer.flush()
                attacks = {
                    "beyond-window": b"".join([_data(sid, MAX_DATA)] * (DEFAULT_WINDOW // MAX_DATA + 1)),
                    # 30000 valid-looking credits in one message: past 2**31-1 in total.
                    "window-flood": encode(FrameType.WINDOW, sid, WINDOW.pack(100_000)) * 30_000,
                    "garbage-after-accept": b"\x09garbage",
                }
                attack = attacks[misbehaviour]
                await ws.send(attack)
                outcome = await _until_closed(ws)
            code, _, err = await client
            return code, err, outcome

    code, err, outcome = asyncio.run(run())
    assert code == ExitCode.STREAM, (code, err)
    line = one_line_error(err)
    assert line.startswith("supctl: error: ")
    if misbehaviour == "data-before-accept":
        assert "not open" in line
    else:
        assert outcome is not None
        expected = PROTOCOL if misbehaviour == "garbage-after-accept" else FLOW_CONTROL
        assert outcome.code == expected, outcome
        assert f"lost the link to site {ROGUE}" in line
        wait_until(lambda: ROGUE not in _connected_sites(env), DEADLINE, "the rogue to be disconnected")
        # A session for a site whose link is gone is refused before the upgrade.
        code, _, err = asyncio.run(_supctl(env, ROGUE, b""))
        assert code == ExitCode.UNAVAILABLE, err
        assert "not connected" in one_line_error(err)
    assert SITE in _connected_sites(env)


def test_session_to_a_site_whose_link_is_closing(env: Env) -> None:
    """Between a rogue's protocol error and the end of its closing handshake (which
    a rogue can stall by not reading) its link is closed but still registered: a
    session opened then gets a one-line error, not a crashed handler."""

    async def run() -> tuple[int, bytes, bytes]:
        ws, _ = await _rogue_online(env)
        async with ws:
            before = env.tower_count(rf"closing link of site {ROGUE}")
            ws.transport.pause_reading()  # never see (nor answer) the tower's close frame
            await ws.send(b"\x09garbage")
            await asyncio.to_thread(
                wait_until,
                lambda: env.tower_count(rf"closing link of site {ROGUE}") > before,
                DEADLINE,
                "the tower to close the rogue",
            )
            result = await _supctl(env, ROGUE, b"hello")
            ws.transport.resume_reading()
            return result

    code, _, err = asyncio.run(run())
    assert code in (ExitCode.STREAM, ExitCode.UNAVAILABLE), err
    # Refused at the upgrade (the closing link is no site link any more), or at the OPEN.
    assert re.search(rf"site '?{ROGUE}'? is not connected", one_line_error(err)), err
    wait_until(lambda: ROGUE not in _connected_sites(env), DEADLINE, "the rogue to be unregistered")


def test_handshakes_failing_after_authorisation_leave_no_state(env: Env) -> None:
    """A valid token on a request that never becomes a WebSocket (no Upgrade header,
    or a client gone mid-handshake) must not leave its route behind in the tower.

    In process (the state cannot be seen from outside): a Tower on the module's
    real state file, served by websockets on 127.0.0.1 without TLS."""
    from towerkit import open_directory
    from websockets.asyncio.server import serve

    from supctl.tower.server import Tower

    request = (
        f"GET /v1/enforcer?site={ROGUE} HTTP/1.1\r\nHost: tower\r\nConnection: Upgrade\r\n"
        f"Authorization: Bearer {env.rogue_token}\r\n"
        f"Sec-WebSocket-Protocol: {SUBPROTOCOL}\r\n\r\n"
    ).encode()

    directory = open_directory(env.stack.dir / "tower.db")

    async def run() -> int:
        tower = Tower(directory)
        async with serve(
            tower.handler,
            "127.0.0.1",
            0,
            process_request=tower.process_request,
            subprotocols=[websockets.Subprotocol(SUBPROTOCOL)],
        ) as server:
            port = next(iter(server.sockets)).getsockname()[1]
            for _ in range(30):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(request)
                answer = await asyncio.wait_for(reader.read(), DEADLINE)
                assert answer.startswith(b"HTTP/1.1 426 "), answer[:100]  # authorised, then refused
                writer.close()
                await writer.wait_closed()
            # websockets drops its connection objects as their tasks end: poll, with a deadline.
            end = time.monotonic() + DEADLINE
            while tower._routes and time.monotonic() < end:
                gc.collect()
                await asyncio.sleep(0.02)
            return len(tower._routes)

    assert asyncio.run(run()) == 0
