"""SIGTERM drains the tower: what is in flight finishes, what is new waits for the next tower.

Real tower, enforcer and ``connect --bind`` processes (no root).  On SIGTERM the tower
closes its listening socket, sends GOAWAY to each supctl session that understands it,
closes a session once its streams ended (``GOING_AWAY``), the site links last, and exits
0; past ``drain-timeout`` it cuts what is left (an RST the user sees).  supctl opens its
new streams on a new session meanwhile: with one tower that means waiting for the
restarted one (``--wait-tower``).  The rolling-restart test keeps short connections going
through three restarts: each one completes or is reset; none hangs, none is cut short.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import socket
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_support import echo_roundtrip, inventory, start_server, wait_until
from stack import Proc, Stack, do_args, program

SITE, APP, INSTANCE = "drain-site", "web", "web-1"


def start(stack: Stack, drain_timeout: float) -> None:
    stack.start_tower()
    config = stack.dir / "tower.toml"
    config.write_text(f"drain-timeout = {drain_timeout}\n" + config.read_text())
    stack.restart_tower()  # with the setting
    stack.add_site(SITE, inventory(APP, INSTANCE))


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    with Stack(tmp_path) as stack:
        yield stack


def forward(stack: Stack, target: int, *extra: str) -> tuple[Proc, int]:
    argv = [
        program("supctl"),
        *do_args(SITE, APP, INSTANCE, "connect", "tcp", str(target), "--bind", "0", *extra),
    ]
    proc = stack.spawn("supctl", argv)
    return proc, int(proc.log.wait_for(r"Forwarding from \S+:(\d+) ->", proc=proc.popen)[1])


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, f"EOF after {len(data)} of {size} bytes"
        data += chunk
    return bytes(data)


def test_a_stream_in_flight_finishes_and_new_connections_wait_for_the_next_tower(stack: Stack) -> None:
    start(stack, drain_timeout=30)
    _, echo = start_server(stack, "echo")
    proc, port = forward(stack, echo, "--wait-tower", "60")
    assert stack.tower is not None
    tower = stack.tower
    first, second = os.urandom(500_000), os.urandom(500_000)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as in_flight:
        in_flight.sendall(first)
        assert recv_exactly(in_flight, len(first)) == first
        tower.popen.send_signal(signal.SIGTERM)
        tower.log.wait_for(r"control-tower draining: 1 sessions, 1 sites, 1 streams; at most 30 s")
        proc.log.wait_for(
            r"the tower is draining \(the control tower is shutting down\); moving", proc=proc.popen
        )
        # A connection made now waits for the next session (this tower no longer listens).
        waiting = threading.Thread(target=lambda: results.append(echo_roundtrip(port, second, timeout=60)))
        results: list[bytes] = []
        waiting.start()
        proc.log.wait_for(r"connection 2 from \S+ opened", proc=proc.popen)
        # The stream in flight goes on: bytes both ways, then a clean end.
        in_flight.sendall(second)
        assert recv_exactly(in_flight, len(second)) == second
        in_flight.shutdown(socket.SHUT_WR)
        assert in_flight.recv(1) == b""
    assert tower.popen.wait(timeout=30) == 0
    assert "streams cut" not in tower.log.text()
    stack.restart_tower(sig=None)
    waiting.join(60)
    assert results == [second]
    proc.log.wait_for(r"reconnected after [0-9.]+ s", proc=proc.popen)
    assert proc.log.count(r"connection 1 closed: 1000000 B sent, 1000000 B received") == 1, proc.log.text()
    assert "tower connection lost" not in proc.log.text()


def test_what_is_left_at_the_drain_deadline_is_reset(stack: Stack) -> None:
    start(stack, drain_timeout=1)
    _, echo = start_server(stack, "echo")
    proc, port = forward(stack, echo)
    assert stack.tower is not None
    tower = stack.tower
    with socket.create_connection(("127.0.0.1", port), timeout=30) as idle_stream:
        idle_stream.sendall(b"hello")
        assert recv_exactly(idle_stream, 5) == b"hello"
        tower.popen.send_signal(signal.SIGTERM)
        assert tower.popen.wait(timeout=30) == 0
        with pytest.raises(ConnectionResetError):
            idle_stream.recv(1)
    assert "1 streams cut at the drain deadline" in tower.log.text()
    proc.log.wait_for(r"connection 1 failed: link lost: the control tower is shutting down; 1 streams cut")


class ShortConnections(threading.Thread):
    """Sequential fresh connections through the forward, each an echo of a random payload,
    classified: ``ok`` (every byte back, then FIN), ``reset`` (a refusal the client sees),
    ``cut`` (FIN after part of the bytes: must never happen), ``hung`` (no end in 60 s)."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.outcomes: Counter[str] = Counter()
        self.stopping = threading.Event()
        self.rng = random.Random(7)

    def one(self) -> str:
        payload = self.rng.randbytes(self.rng.randint(1, 64 * 1024))
        try:
            received = echo_roundtrip(self.port, payload, timeout=60)
        except ConnectionResetError:
            return "reset"
        except TimeoutError:
            return "hung"
        return "ok" if hashlib.sha256(received).digest() == hashlib.sha256(payload).digest() else "cut"

    def wait_for_more(self, count: int) -> None:
        target = self.outcomes["ok"] + count
        wait_until(lambda: self.outcomes["ok"] >= target, 60, f"{count} more echoed connections")

    def run(self) -> None:
        while not self.stopping.is_set():
            self.outcomes[self.one()] += 1


def test_a_rolling_restart_under_short_connections(stack: Stack) -> None:
    start(stack, drain_timeout=30)
    _, echo = start_server(stack, "echo")
    proc, port = forward(stack, echo, "-q", "--wait-tower", "60")
    load = ShortConnections(port)
    load.start()
    try:
        for restart in range(3):
            load.wait_for_more(20)
            assert stack.tower is not None
            stack.tower.popen.send_signal(signal.SIGTERM)
            assert stack.tower.popen.wait(timeout=40) == 0
            stack.restart_tower(sig=None)
            proc.log.wait_for(
                rf"(?s)(reconnected after [0-9.]+ s.*){{{restart + 1}}}", deadline=60, proc=proc.popen
            )
        load.wait_for_more(20)
    finally:
        load.stopping.set()
        load.join(90)
    assert load.outcomes["cut"] == 0 and load.outcomes["hung"] == 0, load.outcomes
    print(f"outcomes over three rolling restarts: {dict(load.outcomes)}")
    assert proc.popen.poll() is None
