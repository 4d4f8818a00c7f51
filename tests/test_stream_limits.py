"""A site's stream budget (``[limits] streams-per-site``), shared fairly, end to end.

Before it, a site link carried at most 1,024 concurrent streams whatever the
tower's settings (the enforcer's protocol default): 2 sessions x 600 could not be
open at once.  Now the budget is a tower setting (the enforcer accepts up to
MAX_SITE_STREAMS), a session holds at most ``budget // (sessions using the site
+ 1)`` of it, and every refusal names the limit that was hit.
"""

from __future__ import annotations

import contextlib
import resource
import selectors
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_support import inventory, wait_until
from stack import Proc, Stack, do_args
from test_limits import start_tower

from supctl.errors import UsageError
from supctl.protocol import MAX_SITE_STREAMS
from supctl.tower.limits import Limits

APP, INST, SITE = "app", "inst", "site1"
PER_SESSION = 600
DEADLINE = 60.0


class EchoServer:
    """An echo target for many connections in one thread (servers.py runs a thread per connection)."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="echo", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self.listener, selectors.EVENT_READ)
            while not self._stop.is_set():
                for key, _ in sel.select(0.1):
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    if sock is self.listener:
                        with contextlib.suppress(BlockingIOError):  # another thread took it
                            conn, _ = sock.accept()
                            conn.setblocking(True)  # echoes are tiny: a send never blocks here
                            sel.register(conn, selectors.EVENT_READ)
                        continue
                    try:
                        data = sock.recv(65536)
                    except OSError:
                        data = b""
                    if data:
                        sock.sendall(data)
                    else:
                        sel.unregister(sock)
                        sock.close()
            for key in list(sel.get_map().values()):
                key.fileobj.close()  # type: ignore[union-attr]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.fixture(autouse=True)
def enough_descriptors() -> Iterator[None]:
    """Every connection costs a descriptor here, in supctl and in the enforcer (which inherit this)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4 * 2 * PER_SESSION + 1000
    if soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            pytest.fail(f"the test needs {wanted} file descriptors, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


def start(tmp_path: Path, limits: dict[str, int]) -> Stack:
    stack = Stack(tmp_path)
    start_tower(stack, dict(limits))
    stack.add_site(SITE, inventory(APP, INST))
    return stack


def forward(stack: Stack, port: int) -> tuple[Proc, int]:
    return stack.forward(*do_args(SITE, APP, INST, "connect", "tcp", str(port), "--bind", "0"))


def open_echo(port: int) -> socket.socket:
    """A connection through a forward, proven open end to end by one echoed round trip."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    sock.sendall(b"ping")
    assert sock.recv(4) == b"ping"
    return sock


def refused(proc: Proc, port: int, number: int) -> str:
    """Open connection ``number`` of a forward, which the tower refuses; return supctl's reason.

    The refusal comes back at once (the OPEN leaves at accept): its RST may even beat the
    end of ``create_connection``'s non-blocking connect (SO_ERROR is then ECONNRESET)."""
    with (
        contextlib.suppress(ConnectionResetError, BrokenPipeError),
        socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as sock,
    ):
        sock.sendall(b"x")
        assert sock.recv(10) == b""
    return proc.log.wait_for(rf"connection {number} failed: (.*)\n")[1]


def test_two_sessions_of_600_streams_on_one_site(tmp_path: Path, echo: EchoServer) -> None:
    limits = {
        "streams-per-session": PER_SESSION,
        "streams-per-user": 2 * PER_SESSION,
        "streams-per-site": 1800,
    }
    held: list[socket.socket] = []
    with start(tmp_path, limits) as stack:
        try:
            forwards = [forward(stack, echo.port) for _ in range(2)]
            for _, port in forwards:
                held.extend(open_echo(port) for _ in range(PER_SESSION))
            # All 1,200 are open at once (before: the site link refused the 1,025th).
            for sock in held[:: PER_SESSION // 6]:
                sock.sendall(b"still")
                assert sock.recv(5) == b"still"
            for proc, port in forwards:
                reason = refused(proc, port, PER_SESSION + 1)
                assert (
                    reason
                    == f"more than {PER_SESSION} concurrent streams in this session (streams-per-session)"
                )
            assert "Traceback" not in stack.tower.log.text()  # type: ignore[union-attr]
        finally:
            for sock in held:
                sock.close()


def test_a_session_gets_its_fair_share_of_the_site_and_the_site_its_budget(
    tmp_path: Path, echo: EchoServer
) -> None:
    # 6 streams for the site, 100 per session: a session alone gets 6 // 2 = 3, the
    # second 6 // 3 = 2, the third 6 // 4 = 1; then the site is full.
    held: list[socket.socket] = []
    site_full = f"site {SITE} has 6 concurrent streams, its limit (streams-per-site)"
    with start(tmp_path, {"streams-per-site": 6, "streams-per-session": 100}) as stack:
        try:
            for share, using in [(3, 1), (2, 2)]:
                proc, port = forward(stack, echo.port)
                held.extend(open_echo(port) for _ in range(share))
                assert refused(proc, port, share + 1) == (
                    f"more than {share} concurrent streams in this session, its fair share of the 6 of"
                    f" site {SITE} with {using} sessions using it (streams-per-site)"
                )
            proc, port = forward(stack, echo.port)
            held.append(open_echo(port))
            assert refused(proc, port, 2) == site_full
            proc, port = forward(stack, echo.port)
            assert refused(proc, port, 1) == site_full
            # A stream that ends makes room again.
            held.pop().close()
            wait_until(lambda: _opens(port), DEADLINE, "a stream to open once the site has room")
        finally:
            for sock in held:
                sock.close()


def _opens(port: int) -> bool:
    try:
        open_echo(port).close()
    except (ConnectionResetError, AssertionError):
        return False
    return True


def test_streams_per_site_is_checked_when_the_tower_starts() -> None:
    assert Limits().streams_per_site == 4096
    assert Limits.parse({"streams-per-site": MAX_SITE_STREAMS}, "t.toml").streams_per_site == MAX_SITE_STREAMS
    with pytest.raises(UsageError, match=rf"'limits.streams-per-site' must be at most {MAX_SITE_STREAMS}"):
        Limits.parse({"streams-per-site": MAX_SITE_STREAMS + 1}, "t.toml")
    with pytest.raises(UsageError, match=r"'limits.streams-per-site' must be an integer >= 1"):
        Limits.parse({"streams-per-site": 0}, "t.toml")
