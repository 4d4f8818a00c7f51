"""Caps on unauthenticated connections (issue 8, item 11): the gate alone on a fake clock,
then a real tower, held to the usual open-file limit (1024), under 1,100 idle sockets."""

from __future__ import annotations

import asyncio
import functools
import logging
import resource
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from e2e_support import closed_by_peer, wait_until
from stack import Stack
from tower_raw import client_tls, get, start_tower
from websockets.http11 import Response

from supctl.plainhttp import PER_ADDRESS, TOTAL, serve_plain_http, text_response
from supctl.preauth import FD_HEADROOM, PreauthGate, raise_fd_limit, total_cap

IDLE = 1100


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_per_address_cap_refuses_the_newcomer() -> None:
    gate = PreauthGate(per_address=2, total=10, clock=Clock())
    closed: list[int] = []
    tickets = [gate.admit("10.0.0.1", functools.partial(closed.append, i)) for i in range(3)]
    assert tickets[2] is None and closed == []  # refused: the caller closes it
    assert gate.admit("10.0.0.2", lambda: None) is not None  # another address is let in
    first = tickets[0]
    assert first is not None
    first.release()
    first.release()  # idempotent
    assert gate.admit("10.0.0.1", lambda: None) is not None
    assert gate.by_address == {"10.0.0.1": 2, "10.0.0.2": 1} and len(gate) == 3


def test_total_cap_evicts_the_oldest() -> None:
    gate = PreauthGate(per_address=10, total=3, clock=Clock())
    closed: list[str] = []
    for name in ("a", "b", "c"):
        assert gate.admit(f"10.0.0.{ord(name)}", functools.partial(closed.append, name)) is not None
    newcomer = gate.admit("10.0.1.1", lambda: closed.append("new"))
    assert newcomer is not None and closed == ["a"] and len(gate) == 3
    newcomer.release()
    assert len(gate) == 2 and gate.admit("10.0.1.1", lambda: None) is not None and closed == ["a"]


def test_refusals_are_logged_at_most_every_ten_seconds(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    gate = PreauthGate(per_address=1, total=10, clock=clock)
    gate.admit("10.0.0.1", lambda: None)
    with caplog.at_level(logging.WARNING, logger="supctl.tower"):
        for _ in range(1000):
            assert gate.admit("10.0.0.1", lambda: None) is None
        clock.now = 10.0
        assert gate.admit("10.0.0.1", lambda: None) is None
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert "refused 1 new connections" in lines[0] and "refused 1000 new connections" in lines[1]


def test_total_cap_leaves_descriptors_free() -> None:
    assert total_cap(1024, 1024) == 1024 - FD_HEADROOM
    assert total_cap(1024, 65536) == 1024
    assert total_cap(1024, 100) == 16


def test_raise_fd_limit_to_the_hard_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 600:
        pytest.skip("hard open-file limit too low to lower the soft one")
    resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard))
    try:
        raised = raise_fd_limit()
        assert raised > 512 and resource.getrlimit(resource.RLIMIT_NOFILE) == (raised, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# --- a real tower --------------------------------------------------------------------------


def usual_fd_limit() -> None:
    """In the tower's child process: the usual soft limit, and no higher hard limit to raise
    it to, so only the caps stand between idle sockets and the descriptor table."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))


@pytest.fixture
def own_fd_room() -> Iterator[None]:
    """The test opens more than 1,024 sockets itself."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < IDLE + 300:
        pytest.skip(f"hard open-file limit {hard} is too low for {IDLE} sockets")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def bystanders(stack: Stack, port: int, n: int = 10) -> list[int]:
    token = (stack.dir / "admin.token").read_text().strip()
    context = client_tls(stack)

    async def run() -> list[int]:
        return await asyncio.gather(
            *(get(port, "/v1/state/sites", f"Bearer {token}", context, local="127.0.0.2") for _ in range(n))
        )

    return asyncio.run(run())


def idle_sockets(port: int, n: int) -> list[socket.socket]:
    socks = []
    try:
        for _ in range(n):
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=10))
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def test_idle_sockets_do_not_starve_other_clients(tmp_path: Path, own_fd_room: None) -> None:
    """Hostile: 1,100 idle TCP connections from 127.0.0.1 to a tower at the usual limit of
    1,024 descriptors.  All but 64 are closed at once; 10 requests from 127.0.0.2 succeed."""
    with Stack(tmp_path) as stack:
        # A long handshake timeout: the 64 admitted idle sockets stay for the whole test.
        port = start_tower(stack, {"handshake-timeout": 120}, preexec_fn=usual_fd_limit)
        # Every way a connection ends gives its place back: answered, TLS garbage, gone.
        for _ in range(3):
            assert bystanders(stack, port, 30) == [200] * 30
        for sock in idle_sockets(port, 80):
            sock.sendall(b"GET / HTTP/1.1\r\n\r\n")  # not TLS
            sock.close()
        for sock in idle_sockets(port, 80):
            sock.close()
        wait_until(lambda: bystanders(stack, port, 1) == [200], what="a request after the churn")
        socks = idle_sockets(port, IDLE)
        try:
            wait_until(
                lambda: closed_by_peer(socks) >= IDLE - 64, what="the tower closing sockets over the cap"
            )
            assert bystanders(stack, port) == [200] * 10
            assert closed_by_peer(socks) == IDLE - 64  # the admitted 64 are still held
        finally:
            for sock in socks:
                sock.close()
        assert stack.tower is not None
        log = stack.tower.log.text()
        assert "Traceback" not in log
        assert 1 <= log.count("pre-authentication caps") <= 2, log


def test_over_the_total_the_oldest_make_room(tmp_path: Path) -> None:
    """Hostile: idle connections filling the total cap (from addresses under their own cap)
    are closed oldest first to make room, so other clients still get in."""
    with Stack(tmp_path) as stack:
        port = start_tower(
            stack, {"handshake-timeout": 120, "preauth-per-address": 500, "preauth-total": 100}
        )
        socks = idle_sockets(port, 150)
        try:
            wait_until(lambda: closed_by_peer(socks) >= 50, what="the oldest sockets closed")
            assert closed_by_peer(socks[:50]) == 50 and closed_by_peer(socks[50:]) == 0
            assert bystanders(stack, port) == [200] * 10
            # The next oldest made room (their FIN may still be on its way under load).
            wait_until(lambda: closed_by_peer(socks[50:60]) == 10, what="the next oldest closed")
        finally:
            for sock in socks:
                sock.close()


# --- the plain-HTTP listeners of probes and metrics (tower and enforcer) -------------------


def answered(port: int, local: str, path: str = "/healthz") -> bytes:
    """The status line of ``GET path`` from source address ``local``."""
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(local, 0)) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        return sock.makefile("rb").readline().rstrip()


def answer_or_none(port: int) -> bytes | None:
    try:
        return answered(port, "127.0.0.1")
    except OSError:  # closed at once: still over the cap
        return None


def test_idle_sockets_on_a_metrics_listener_are_capped(caplog: pytest.LogCaptureFixture) -> None:
    """Hostile: whoever reaches a metrics port opens idle sockets.  Beyond 8 from one address
    they are closed at once, beyond 64 in all the oldest go, and a scraper from elsewhere is
    still answered: the listener can never take the descriptors sessions and streams need."""

    async def healthz() -> Response:
        return text_response(200, "ok")

    async def main() -> None:
        logger = logging.getLogger("supctl.enforcer")
        async with serve_plain_http("127.0.0.1", 0, {"/healthz": healthz}, "metrics", logger) as shown:
            port = int(shown.rpartition(":")[2])
            loop = asyncio.get_running_loop()
            socks = await loop.run_in_executor(None, idle_sockets, port, PER_ADDRESS + 12)
            try:
                await until(lambda: closed_by_peer(socks) >= 12)
                assert closed_by_peer(socks[:PER_ADDRESS]) == 0  # held: idle, under the cap
                assert await loop.run_in_executor(None, answered, port, "127.0.0.2") == b"HTTP/1.1 200 OK"
                # From many addresses, under each one's cap: the oldest make room.
                crowd = [
                    socket.create_connection(
                        ("127.0.0.1", port), timeout=10, source_address=(f"127.0.1.{i}", 0)
                    )
                    for i in range(1, TOTAL + 1)
                ]
                socks += crowd
                await until(lambda: closed_by_peer(socks[:PER_ADDRESS]) == PER_ADDRESS)
                assert await loop.run_in_executor(None, answered, port, "127.0.0.3") == b"HTTP/1.1 200 OK"
            finally:
                for sock in socks:
                    sock.close()
            # Every place is given back: the first address is answered again (once the
            # listener has seen its sockets close).
            end = loop.time() + 10
            while await loop.run_in_executor(None, answer_or_none, port) != b"HTTP/1.1 200 OK":
                assert loop.time() < end, "the first address is still refused"

    with caplog.at_level(logging.WARNING, logger="supctl.enforcer"):
        asyncio.run(asyncio.wait_for(main(), 60))
    lines = [r.getMessage() for r in caplog.records if "metrics listener caps" in r.getMessage()]
    # One line per 10 s: two if the machine is slow enough to stretch the test past that.
    assert 1 <= len(lines) <= 2 and "(8 per address, 64 in all): refused" in lines[0], lines


async def until(predicate: Callable[[], object], deadline: float = 10.0) -> None:
    end = asyncio.get_running_loop().time() + deadline
    while not predicate():
        assert asyncio.get_running_loop().time() < end, "timed out"
        await asyncio.sleep(0.02)  # polling interval; the deadline is the bound
