"""Helpers for the end-to-end tests built on :mod:`stack` (which stays untouched).

* :func:`start_server` runs a :mod:`servers` mode as a process owned by the Stack
  (so ``Stack.close()`` kills it) and waits for its ``READY`` line with a deadline.
* :class:`EchoPump` keeps a legitimate forward busy from a background thread,
  verifying every byte, so a test can prove traffic kept flowing during an attack.
* :func:`wait_until` polls a condition with a deadline (never a fixed sleep).
"""

from __future__ import annotations

import os
import random
import re
import select
import selectors
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from stack import Proc, Stack

SERVERS = str(Path(__file__).resolve().parent / "servers.py")

T = TypeVar("T")


def inventory(app: str, instance: str) -> str:
    """A one-instance inventory with host networking (no namespace, no root)."""
    return f'[applications.{app}.service-instances."{instance}"]\n'


def connect_policy(site: str, name: str = "ops") -> str:
    """A policy file allowing ``connect tcp`` to the service itself (127.0.0.1) at ``site``."""
    return f"""
[[policies.{name}.rules]]
effect = "allow"
site = "{site}"
verb = "connect"
protocol = "tcp"
addresses = ["127.0.0.1/32"]
"""


def wait_until(predicate: Callable[[], T], deadline: float = 10.0, what: str = "") -> T:
    """Poll ``predicate`` until it returns something truthy; AssertionError after ``deadline``."""
    end = time.monotonic() + deadline
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= end:
            raise AssertionError(f"timed out after {deadline} s waiting for {what or predicate}")
        time.sleep(0.02)  # polling interval; the deadline is the bound


def start_server(stack: Stack, mode: str, *extra: str, deadline: float = 10.0) -> tuple[Proc, int]:
    """Start ``servers.py MODE --listen 127.0.0.1:0 EXTRA...``; return it and its port."""
    proc = stack.spawn(
        f"server-{mode}",
        [sys.executable, SERVERS, mode, "--listen", "127.0.0.1:0", *extra],
        stdout=subprocess.PIPE,
    )
    stdout = proc.popen.stdout
    assert stdout is not None
    line = b""
    end = time.monotonic() + deadline
    with selectors.DefaultSelector() as sel:
        sel.register(stdout, selectors.EVENT_READ)
        while not line.endswith(b"\n"):
            left = end - time.monotonic()
            assert left > 0, f"{mode} server not ready in {deadline} s: {proc.log.text()}"
            if sel.select(left):
                chunk = os.read(stdout.fileno(), 256)
                assert chunk, f"{mode} server exited: {proc.log.text()}"
                line += chunk
    match = re.fullmatch(rb"READY 127\.0\.0\.1:(\d+)\n", line)
    assert match, line
    return proc, int(match[1])


def echo_roundtrip(port: int, payload: bytes, timeout: float = 10.0) -> bytes:
    """One fresh connection to 127.0.0.1:port: send, half-close, read until EOF."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        received = bytearray()
        while data := sock.recv(65536):
            received += data
    return bytes(received)


class EchoPump(threading.Thread):
    """Round trips of random payloads over one long-lived connection to an echo forward.

    ``rounds`` counts verified round trips; ``error`` holds the first failure
    (the thread stops at it).  :meth:`wait_progress` is what tests assert on.
    """

    def __init__(self, port: int, seed: int = 1) -> None:
        super().__init__(name=f"echo-pump-{port}", daemon=True)
        self.port = port
        self.rng = random.Random(seed)
        self.rounds = 0
        self.bytes = 0
        self.error: BaseException | None = None
        self._stop_event = threading.Event()
        self._lock = threading.Lock()

    def run(self) -> None:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
                while not self._stop_event.is_set():
                    payload = self.rng.randbytes(self.rng.randint(1, 32 * 1024))
                    sock.sendall(payload)
                    view = memoryview(bytearray(len(payload)))
                    got = 0
                    while got < len(payload):
                        n = sock.recv_into(view[got:])
                        if not n:
                            raise ConnectionError(f"EOF after {got} of {len(payload)} echoed bytes")
                        got += n
                    if view.tobytes() != payload:
                        raise AssertionError("the echo forward corrupted bytes")
                    with self._lock:
                        self.rounds += 1
                        self.bytes += len(payload)
        except BaseException as exc:
            self.error = exc

    def check(self) -> None:
        if self.error is not None:
            raise AssertionError(f"the legitimate forward broke: {self.error!r}") from self.error
        assert self.is_alive(), "the echo pump stopped"

    def wait_progress(self, rounds: int = 3, deadline: float = 10.0) -> None:
        """Wait until at least ``rounds`` more verified round trips happen."""
        target = self.rounds + rounds

        def moved() -> bool:
            self.check()
            return self.rounds >= target

        wait_until(moved, deadline, f"{rounds} more echo round trips on port {self.port}")

    def stop(self) -> None:
        self._stop_event.set()
        self.join(15)


def closed_by_peer(socks: list[socket.socket]) -> int:
    """How many of ``socks`` the server closed (readable: EOF or reset; idle ones get nothing)."""
    poller = select.poll()
    for sock in socks:
        poller.register(sock, select.POLLIN | select.POLLHUP | select.POLLERR)
    return len(poller.poll(0))
