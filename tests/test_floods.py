"""Refusal floods (issue 8, item 9): a peer that makes the tower refuse again and again
costs a bounded number of audit records and log lines, loses its session, and does not
slow another user's stream.

One real stack: a tower with ``streams-per-session = 2`` (so refusals are easy to
cause), site ``site1`` (host network) reaching an echo server and a sink-source server,
and two users with the same narrow policy: ``mallory`` floods from raw WebSockets,
``alice`` moves data through ``supctl ... connect --bind`` meanwhile and checks its
sha256.  The bystander's transfer time is printed (measured, not asserted).
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import re
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import websockets
from e2e_support import inventory, start_server, wait_until
from servers import pattern_sha256
from stack import Stack, do_args, program
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from supctl.protocol import (
    DEFAULT_WINDOW,
    SUBPROTOCOL,
    Connection,
    ErrorCode,
    OpenRequest,
    StreamAccepted,
    StreamReset,
)
from supctl.protocol.frames import CLOSE_CODE_BASE, WINDOW, FrameType, encode

APP, INST, SITE = "app", "inst", "site1"
LIMIT = CLOSE_CODE_BASE + ErrorCode.LIMIT
DEADLINE = 30.0
FLOOD = 10_000  # refused OPENs sent by the flooder
TINY = 20_000  # 1-byte DATA frames sent by the flooder on its accepted streams
BYSTANDER_BYTES = 48 * 1024 * 1024

POLICIES = f"""
[[policies.narrow.rules]]
effect = "allow"
site = "{SITE}"
application = "{APP}"
verb = "connect"
protocol = "tcp"
ports = ["1-65535"]
addresses = ["127.0.0.1/32"]
"""


@dataclass
class Env:
    stack: Stack
    echo_port: int
    source_port: int
    closed_port: int
    tokens: dict[str, str]
    ssl: ssl.SSLContext = field(repr=False)

    def url(self, port: int) -> str:
        return (
            f"{self.stack.url}/v1/state/applications/{APP}/service-instances/{INST}/connect"
            f"?site={SITE}&protocol=tcp&port={port}"
        )

    def audit(self) -> list[dict[str, object]]:
        return self.stack.audit_records()

    def log_lines(self, about: str | None = None) -> int:
        """The tower's log lines so far (those matching ``about``, if given: a summary of an
        earlier test's flood may be flushed meanwhile, and is not this test's)."""
        assert self.stack.tower is not None
        lines = self.stack.tower.log.text().splitlines()
        return len(lines) if about is None else sum(1 for line in lines if re.search(about, line))


def _free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    with Stack(tmp_path_factory.mktemp("floods")) as stack:
        subprocess.run(
            [program("control-tower"), "init", str(stack.dir)], check=True, capture_output=True, env=stack.env
        )
        config = stack.dir / "tower.toml"
        config.write_text(config.read_text() + "\n[limits]\nstreams-per-session = 2\nrefused-streams = 20\n")
        (stack.dir / "policies.toml").write_text(POLICIES)
        tokens = {}
        for name in ("mallory", "alice"):
            for argv in (["user", "add", name, "--policy", "narrow"], ["token", "add", "--user", name]):
                done = subprocess.run(
                    [program("control-tower"), argv[0], argv[1], "--config", str(config), *argv[2:]],
                    input="a long enough password\n",
                    text=True,
                    check=True,
                    capture_output=True,
                    env=stack.env,
                )
            tokens[name] = done.stdout.strip()
        stack.tower = stack.spawn(
            "tower", [program("control-tower"), "serve", "--config", str(config), "--listen", "127.0.0.1:0"]
        )
        stack.url = stack.tower.log.wait_for(
            r"listening on (wss://127\.0\.0\.1:\d+)", proc=stack.tower.popen
        )[1]
        stack.env.update(SUPCTL_HOST=stack.url, SUPCTL_CA_FILE=str(stack.dir / "ca.pem"))
        stack.add_site(SITE, inventory(APP, INST))
        _, echo_port = start_server(stack, "echo")
        _, source_port = start_server(stack, "sink-source", "--size", str(BYSTANDER_BYTES), "--seed", "9")
        yield Env(
            stack,
            echo_port,
            source_port,
            _free_port(),
            tokens,
            ssl.create_default_context(cafile=str(stack.dir / "ca.pem")),
        )


# --- the bystander ------------------------------------------------------------------------------


class Bystander(threading.Thread):
    """alice downloads BYSTANDER_BYTES from the sink-source server through her own forward."""

    def __init__(self, env: Env, tmp: Path) -> None:
        super().__init__(name="bystander", daemon=True)
        (tmp / "alice.token").write_text(env.tokens["alice"] + "\n")
        self.env = dict(env.stack.env, SUPCTL_TOKEN_FILE=str(tmp / "alice.token"))
        self.stack = env.stack
        self.source_port = env.source_port
        self.received = 0
        self.sha256 = ""
        self.seconds = 0.0
        self.error: BaseException | None = None

    def forward(self) -> int:
        proc = self.stack.spawn(
            "supctl-alice",
            [
                program("supctl"),
                *do_args(SITE, APP, INST, "connect", "tcp", str(self.source_port), "--bind", "0"),
            ],
            env=self.env,
        )
        return int(proc.log.wait_for(r"Forwarding from \S+:(\d+) ->", proc=proc.popen)[1])

    def run(self) -> None:
        try:
            port = self.forward()
            digest = hashlib.sha256()
            start = time.monotonic()
            with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as sock:
                sock.shutdown(socket.SHUT_WR)  # nothing to upload
                while data := sock.recv(1 << 16):
                    digest.update(data)
                    self.received += len(data)
            self.seconds = time.monotonic() - start
            self.sha256 = digest.hexdigest()
        except BaseException as exc:
            self.error = exc


# --- the flooder --------------------------------------------------------------------------------


@dataclass
class Closed:
    code: int | None
    reason: str


def _open_frame(stream_id: int) -> bytes:
    return encode(
        FrameType.OPEN, stream_id, WINDOW.pack(DEFAULT_WINDOW) + OpenRequest(verb="connect").to_json()
    )


async def _session(env: Env, port: int) -> ClientConnection:
    return await connect(
        env.url(port),
        ssl=env.ssl,
        additional_headers={"Authorization": f"Bearer {env.tokens['mallory']}"},
        subprotocols=[websockets.Subprotocol(SUBPROTOCOL)],
        compression=None,
        max_size=None,
        open_timeout=DEADLINE,
    )


async def _until_closed(ws: ClientConnection) -> Closed:
    try:
        while True:
            await asyncio.wait_for(ws.recv(), DEADLINE)
    except ConnectionClosed as exc:
        return Closed(exc.rcvd.code if exc.rcvd else None, exc.rcvd.reason if exc.rcvd else "")


async def _send(ws: ClientConnection, messages: list[bytes]) -> None:
    try:
        for message in messages:
            await ws.send(message)
    except ConnectionClosed:
        pass  # the tower closed the session: the rest of the flood is not sent


def flood(env: Env, port: int, *, accept: int) -> Closed:
    """Open ``accept`` streams that the site accepts, then send FLOOD more OPENs (each
    refused) mixed with TINY 1-byte DATA frames on the accepted streams; wait for the close."""

    async def run() -> Closed:
        async with await _session(env, port) as ws:
            conn = Connection(odd_ids=True, accept_streams=False)
            ids = [conn.open_stream(OpenRequest(verb="connect")) for _ in range(accept)]
            while data := conn.data_to_send():
                await ws.send(data)
            seen = 0
            while seen < accept:
                message = await asyncio.wait_for(ws.recv(), DEADLINE)
                assert isinstance(message, bytes)
                for event in conn.receive_data(message):
                    assert isinstance(event, StreamAccepted), event
                    seen += 1
            sid = 2 * accept + 1
            messages, per_message = [], 500
            tiny = encode(FrameType.DATA, ids[0], b"x") if ids else b""
            for _ in range(FLOOD // per_message):
                opens = b"".join(_open_frame(sid + 2 * i) for i in range(per_message))
                sid += 2 * per_message
                messages.append(opens + tiny * (TINY * per_message // FLOOD))
            sender = asyncio.ensure_future(_send(ws, messages))
            closed = await _until_closed(ws)
            await sender
            return closed

    return asyncio.run(run())


def _records_of(env: Env, user: str, since: int) -> list[dict[str, object]]:
    return [r for r in env.audit()[since:] if r["user"] == user]


def test_refusal_flood_closes_the_session_and_spares_the_bystander(env: Env, tmp_path: Path) -> None:
    bystander = Bystander(env, tmp_path)
    bystander.start()
    wait_until(lambda: bystander.received > 0 or bystander.error, DEADLINE, "the bystander's data to flow")
    audit_before, log_before = len(env.audit()), env.log_lines()

    closed = flood(env, env.echo_port, accept=2)

    assert closed.code == LIMIT, closed
    assert closed.reason == "more than 20 refused streams within 10 s (refused-streams)", closed
    bystander.join(120)
    assert bystander.error is None, bystander.error
    assert bystander.received == BYSTANDER_BYTES
    assert bystander.sha256 == pattern_sha256(9, BYSTANDER_BYTES)
    print(f"\nbystander: {BYSTANDER_BYTES >> 20} MiB in {bystander.seconds:.2f} s during the flood")

    wait_until(
        lambda: any(r["event"] == "streams-refused" for r in _records_of(env, "mallory", audit_before)),
        DEADLINE,
        "the summary record",
    )
    records = _records_of(env, "mallory", audit_before)
    # One accepted session, 3 refusals on their own, the 2 streams it held, one summary.
    assert len(records) < 50, len(records)
    individually = [r for r in records if r["event"] == "stream-closed" and r["close-reason"] == "limit"]
    assert len(individually) == 3
    [summary] = [r for r in records if r["event"] == "streams-refused"]
    assert summary["count"] == 18 and summary["reasons"] == {"limit": 18}, summary
    assert summary["result"] == "more than 2 concurrent streams in this session (streams-per-session)"
    assert summary["first"] <= summary["last"]  # type: ignore[operator]
    assert env.log_lines() - log_before < 60
    assert "Traceback" not in env.stack.tower.log.text()  # type: ignore[union-attr]


def site_refusals(env: Env, port: int, most: int) -> tuple[Closed, int]:
    """Open streams to ``port`` one at a time, each waiting for its refusal, until the
    tower closes the session (or ``most`` were refused); the close and the refusals seen."""

    async def run() -> tuple[Closed, int]:
        async with await _session(env, port) as ws:
            conn = Connection(odd_ids=True, accept_streams=False)
            refusals = 0
            try:
                while refusals < most:
                    conn.open_stream(OpenRequest(verb="connect"))
                    while data := conn.data_to_send():
                        await ws.send(data)
                    message = await asyncio.wait_for(ws.recv(), DEADLINE)
                    assert isinstance(message, bytes)
                    for event in conn.receive_data(message):
                        assert isinstance(event, StreamReset), event
                        assert "connection refused" in event.text, event
                        refusals += 1
            except ConnectionClosed:
                pass
            return await _until_closed(ws), refusals

    return asyncio.run(run())


def test_site_refusals_count_too(env: Env) -> None:
    """OPENs the *site* refuses (nothing listens on the port) are refused OPENs too:
    one round trip each through the site's link, so they count like the tower's own."""
    audit_before, log_before = len(env.audit()), env.log_lines()
    closed, refusals = site_refusals(env, env.closed_port, most=100)
    assert closed.code == LIMIT, closed
    assert closed.reason == "more than 20 refused streams within 10 s (refused-streams)", closed
    assert refusals in (20, 21)  # the 21st's RESET may or may not precede the close
    wait_until(
        lambda: any(r["event"] == "streams-refused" for r in _records_of(env, "mallory", audit_before)),
        DEADLINE,
        "the summary record",
    )
    records = _records_of(env, "mallory", audit_before)
    individually = [r for r in records if r["event"] == "stream-closed" and r["close-reason"] == "site-reset"]
    assert len(individually) == 3
    [summary] = [r for r in records if r["event"] == "streams-refused"]
    assert summary["count"] == 18 and summary["reasons"] == {"site-reset": 18}, summary
    assert env.log_lines() - log_before < 60


def test_refused_requests_are_rate_limited_in_the_log(env: Env) -> None:
    """200 requests with a bad token: 200 audit records, a few log lines."""
    about = r"/v1/state/sites|requests refused from"
    audit_before, log_before = len(env.audit()), env.log_lines(about)
    host, _, port = env.stack.url.removeprefix("wss://").rpartition(":")
    for _ in range(200):
        conn = http.client.HTTPSConnection(host, int(port), context=env.ssl, timeout=DEADLINE)
        conn.request("GET", "/v1/state/sites", headers={"Authorization": "Bearer sct_api_nope"})
        assert conn.getresponse().status == 401
        conn.close()
    # The store has every record a few milliseconds after the tower made it.
    wait_until(
        lambda: sum(r["event"] == "session-refused" for r in env.audit()[audit_before:]) >= 200,
        DEADLINE,
        "the 200 records",
    )
    refused = [r for r in env.audit()[audit_before:] if r["event"] == "session-refused"]
    assert len(refused) == 200
    assert env.log_lines(about) - log_before <= 25
    assert env.stack.tower is not None
    env.stack.tower.log.wait_for(r"\d+ similar messages suppressed \(requests refused from 127\.0\.0\.1\)")
