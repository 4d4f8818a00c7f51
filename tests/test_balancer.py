"""Three tower replicas on one PostgreSQL behind HAProxy (TCP mode, TLS passed through).

Real towers, enforcers, supctl processes, PostgreSQL and HAProxy from Debian, on
loopback (no root).  Two sites; supctl and the enforcers dial the balancer, except
where a test needs a stream to cross two given replicas:

* a client through the balancer reaches both sites whichever replica it lands on
  (sha256 of the bytes);
* ``kill -9`` of the replica holding a site during a 200 MB transfer through another
  replica: the transfer ends with an RST (never a FIN after part of it), the site is
  back on another replica, and the running ``--bind`` forward serves a new connection;
* ``kill -9`` of the replica holding the client's session: the forward reconnects by
  itself, through the balancer, and keeps its port;
* a rolling restart (SIGTERM, start again, one replica at a time) under a steady stream
  of short connections: each one completes or is refused with a reset; none hangs,
  none ends cleanly with bytes missing.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from balancer import PEERING, Balanced, haproxy_binary
from e2e_support import echo_roundtrip, inventory, start_server
from pg_cluster import PostgresCluster
from servers import pattern_sha256
from stack import Proc, Stack, do_args, program, write_secret

from supctl.tower.database.cluster import EXPIRY

SITES = ("north", "south")
APP, INSTANCE = "web", "web-1"
MB = 1024 * 1024


@pytest.fixture
def balanced(pg_cluster: PostgresCluster, tmp_path: Path) -> Iterator[Balanced]:
    binary = haproxy_binary()
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("haproxy is not installed (.ci/run installs it)")
        pytest.skip("haproxy is not installed")
    name = f"balanced_{time.monotonic_ns() % 10**9}"
    url = pg_cluster.create_database(name)
    try:
        with Stack(tmp_path) as stack:
            password = pg_cluster.write_password_file(tmp_path / "store.password")
            stack.start_tower(store=(url, password), config=PEERING, prelude="drain-timeout = 5\n")
            cluster = Balanced(stack, binary)
            for site in SITES:
                write_secret(stack.root / f"{site}.token", stack.register_site(site) + "\n")
                (stack.root / f"{site}.toml").write_text(inventory(APP, INSTANCE))
            stack.env["SUPCTL_HOST"] = cluster.url
            yield cluster
    finally:
        pg_cluster.drop_database(name)


def enforcer(cluster: Balanced, site: str, *towers: str) -> Proc:
    proc = cluster.stack.start_enforcer(site, towers=list(towers) or [cluster.url], wait=False)
    cluster.holder(site)
    return proc


def forward(
    stack: Stack, site: str, target: int, *extra: str, env: dict[str, str] | None = None
) -> tuple[Proc, int]:
    args = [
        program("supctl"),
        *do_args(site, APP, INSTANCE, "connect", "tcp", str(target), "--bind", "0", *extra),
    ]
    proc = stack.spawn("supctl", args, env=env or stack.env)
    return proc, int(proc.log.wait_for(r"Forwarding from \S+:(\d+) ->", proc=proc.popen)[1])


def download(port: int, stop_at: int | None = None) -> tuple[str, int, str]:
    """Read a sink-source server's bytes through a forward: (sha256, bytes, how it ended:
    FIN or RST).  ``stop_at``: stop reading there and return ("", bytes, "paused") with
    the socket left open in :data:`PAUSED`."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    digest, received = hashlib.sha256(), 0
    try:
        while stop_at is None or received < stop_at:
            data = sock.recv(1 << 18)
            if not data:
                return digest.hexdigest(), received, "FIN"
            digest.update(data)
            received += len(data)
    except ConnectionResetError:
        return digest.hexdigest(), received, "RST"
    PAUSED.append(sock)
    return "", received, "paused"


PAUSED: list[socket.socket] = []


def finish(sock: socket.socket) -> tuple[int, str]:
    """Read ``sock`` to its end: (bytes read, FIN or RST)."""
    received = 0
    with sock:
        try:
            while data := sock.recv(1 << 18):
                received += len(data)
        except ConnectionResetError:
            return received, "RST"
    return received, "FIN"


def test_a_client_through_the_balancer_reaches_both_sites_from_any_replica(balanced: Balanced) -> None:
    stack = balanced.stack
    for site in SITES:
        enforcer(balanced, site)
    _, echo = start_server(stack, "echo")
    for round_ in range(3):  # round robin: the sessions land on every replica in turn
        for site in SITES:
            payload = os.urandom(200_000 + round_)
            args = do_args(site, APP, INSTANCE, "connect", "tcp", str(echo))
            result = stack.supctl(*args, input=payload)
            assert result.returncode == 0, result.stderr
            assert hashlib.sha256(result.stdout).digest() == hashlib.sha256(payload).digest()
    opened = Counter(
        r.name for r in balanced.replicas.values() for _ in range(r.proc.log.count("session opened"))
    )
    assert len(opened) == 3, opened  # every replica served sessions, relayed or not


def test_kill_of_a_sites_replica_mid_transfer_resets_it_and_the_forward_goes_on(balanced: Balanced) -> None:
    stack = balanced.stack
    # The site dials replica tower-c first (then the balancer); supctl, replica tower.
    enforcer(balanced, "north", balanced.replicas["tower-c"].url, balanced.url)
    assert balanced.holder("north").name == "tower-c"
    size = 200 * MB
    _, source = start_server(stack, "sink-source", "--seed", "3", "--size", str(size))
    proc, port = forward(
        stack, "north", source, env={**stack.env, "SUPCTL_HOST": balanced.replicas["tower"].url}
    )
    _, got, state = download(port, stop_at=20 * MB)
    assert state == "paused"
    killed = time.monotonic()
    balanced.replicas["tower-c"].proc.popen.send_signal(signal.SIGKILL)
    received, end = finish(PAUSED.pop())
    assert end == "RST" and got + received < size, (end, got + received)
    line = proc.log.wait_for(r"connection 1 failed: (.*)", proc=proc.popen)[1]
    assert "lost the link to replica tower-c" in line, proc.log.text()

    # The site moves to another replica; the same forward, not restarted, serves again.
    # (asking replica tower, the session's: its view of the claims is a heartbeat old at most)
    new = balanced.holder("north", deadline=EXPIRY.total_seconds() + 15, other_than="tower-c", ask="tower")
    moved = time.monotonic() - killed
    small = 8 * MB
    _, again = start_server(stack, "sink-source", "--seed", "4", "--size", str(small))
    proc2, port2 = forward(
        stack, "north", again, env={**stack.env, "SUPCTL_HOST": balanced.replicas["tower"].url}
    )
    assert download(port2) == (pattern_sha256(4, small), small, "FIN")
    assert download(port) == (pattern_sha256(3, size), size, "FIN")  # the first forward, same port
    assert proc.popen.poll() is None and new.name in ("tower", "tower-b"), moved
    proc2.stop()


def test_kill_of_the_sessions_replica_the_forward_reconnects_and_keeps_its_port(balanced: Balanced) -> None:
    stack = balanced.stack
    enforcer(balanced, "south")
    _, echo = start_server(stack, "echo")
    before = {name: r.proc.log.count("session opened") for name, r in balanced.replicas.items()}
    proc, port = forward(stack, "south", echo, "--wait-tower", "30")
    payload = os.urandom(300_000)
    assert echo_roundtrip(port, payload) == payload
    (session,) = [
        r for name, r in balanced.replicas.items() if r.proc.log.count("session opened") > before[name]
    ]
    held_too = balanced.holder("south").name == session.name
    session.proc.popen.send_signal(signal.SIGKILL)
    proc.log.wait_for(r"tower connection lost; reconnecting\.\.\.", proc=proc.popen)
    proc.log.wait_for(r"reconnected after [0-9.]+ s", deadline=60, proc=proc.popen)
    if held_too:  # the site was there as well: it is back once the dead replica's claim expired
        balanced.holder("south", deadline=EXPIRY.total_seconds() + 15, other_than=session.name)
    # Until the session's replica sees where the site went, a connection is reset (with a line).
    again = os.urandom(1_000_000)
    end = time.monotonic() + 10
    while True:
        try:
            received = echo_roundtrip(port, again, timeout=60)
            break
        except ConnectionResetError:
            assert time.monotonic() < end, proc.log.text()
            time.sleep(0.05)  # polling interval; the deadline above is the bound
    assert hashlib.sha256(received).digest() == hashlib.sha256(again).digest()
    assert proc.popen.poll() is None


class ShortConnections(threading.Thread):
    """Echo round trips of 16 KiB, one fresh connection each, until stopped: counts how
    each ended (ok, reset, or wrong: a clean end with other bytes; hang: no end in 30 s)."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.outcomes: Counter[str] = Counter()
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            payload = os.urandom(16 * 1024)
            try:
                got = echo_roundtrip(self.port, payload, timeout=30)
                self.outcomes["ok" if got == payload else "wrong"] += 1
            except (ConnectionResetError, BrokenPipeError, ConnectionRefusedError):
                self.outcomes["reset"] += 1
            except TimeoutError:
                self.outcomes["hang"] += 1


def test_a_rolling_restart_under_short_connections_hangs_none(balanced: Balanced) -> None:
    stack = balanced.stack
    enforcers = [enforcer(balanced, site) for site in SITES]
    _, echo = start_server(stack, "echo")
    proc, port = forward(stack, "north", echo, "--wait-tower", "30")
    load = ShortConnections(port)
    load.start()
    try:
        for name in list(balanced.replicas):
            done = sum(load.outcomes.values())
            while sum(load.outcomes.values()) < done + 20:  # under load: a few round trips first
                assert load.is_alive()
                time.sleep(0.01)  # polling a counter; the thread's own timeouts bound it
            balanced.replicas[name].proc.stop(signal.SIGTERM, grace=30)
            balanced.restart(name)
        balanced.holder("north")
    finally:
        load.stopping.set()
        load.join(60)
    outcomes = load.outcomes
    assert outcomes["hang"] == 0 and outcomes["wrong"] == 0 and outcomes["ok"] > 60, (
        outcomes,
        proc.log.text()[-3000:],
    )
    payload = os.urandom(100_000)
    assert echo_roundtrip(port, payload, timeout=60) == payload
    assert proc.popen.poll() is None
    # The sites moved before their old links closed (make before break), not after.
    assert all(e.log.count(r"the tower asks us to move") for e in enforcers)
