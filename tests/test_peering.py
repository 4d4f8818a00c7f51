"""A session accepted by one replica for a site held by another is relayed between them.

Real towers (two replicas of one PostgreSQL store, each with a peer listener on
loopback), a real enforcer and real supctl processes; host networking, no root.  The
site's enforcer dials replica B only; supctl dials replica A only, so every stream
crosses the peer link A -> B:

* bytes arrive intact both ways (sha256), and ``show sites`` answers the same from both
  replicas, naming B as the holder;
* the stream is authorised and audited once, at A (one ``stream-closed`` record);
* a token revoked while its session is relayed ends that session (exit 3) and resets
  the stream in flight: authority is re-checked at A while the stream crosses B;
* killing B resets the stream in flight (an RST, never a clean FIN after part of it).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from balancer import PEERING, start_replica
from e2e_support import connect_policy, echo_roundtrip, inventory, start_server
from pg_cluster import PostgresCluster
from servers import pattern_sha256, send_pattern_and_read
from stack import Proc, Stack, do_args, program, write_secret
from test_reconnect import end_of
from test_users_policies import login
from tower_raw import add_user

from supctl.errors import ExitCode

SITE, APP, INSTANCE = "peer-site", "web", "web-1"
POLICIES = connect_policy(SITE)


@pytest.fixture
def peered(pg_cluster: PostgresCluster, tmp_path: Path) -> Iterator[tuple[Stack, Proc]]:
    """Replica ``tower`` (the stack's, supctl's) and ``tower-b`` (the site's)."""
    name = f"peering_{time.monotonic_ns() % 10**9}"
    url = pg_cluster.create_database(name)
    try:
        with Stack(tmp_path) as stack:
            password = pg_cluster.write_password_file(tmp_path / "store.password")
            stack.start_tower(store=(url, password), config=PEERING)
            assert stack.tower is not None
            stack.tower.log.wait_for(r"takes relayed streams on", proc=stack.tower.popen)
            tower_b, port_b = start_replica(stack, "tower-b")
            url_b = f"wss://127.0.0.1:{port_b}"
            write_secret(stack.root / f"{SITE}.token", stack.register_site(SITE) + "\n")
            (stack.root / f"{SITE}.toml").write_text(inventory(APP, INSTANCE))
            stack.start_enforcer(SITE, towers=[url_b], wait=False)
            tower_b.log.wait_for(rf"site {SITE} connected", proc=tower_b.popen)
            yield stack, tower_b
    finally:
        pg_cluster.drop_database(name)


def forward(stack: Stack, target: int, env: dict[str, str] | None = None) -> tuple[Proc, int]:
    args = [program("supctl"), *do_args(SITE, APP, INSTANCE, "connect", "tcp", str(target), "--bind", "0")]
    proc = stack.spawn("supctl", args, **({"env": env} if env else {}))
    return proc, int(proc.log.wait_for(r"Forwarding from \S+:(\d+) ->", proc=proc.popen)[1])


def test_a_session_on_one_replica_reaches_a_site_held_by_another(peered: tuple[Stack, Proc]) -> None:
    stack, tower_b = peered
    assert stack.tower is not None
    _, echo = start_server(stack, "echo")
    proc, port = forward(stack, echo)
    size = 8 * 1024 * 1024
    assert send_pattern_and_read(port, 7, size) == (pattern_sha256(7, size), size)
    payload = os.urandom(100_000)
    assert hashlib.sha256(echo_roundtrip(port, payload)).digest() == hashlib.sha256(payload).digest()
    stack.tower.log.wait_for(r"peer link to replica tower-b \(wss://127\.0\.0\.1:\d+\) up")
    tower_b.log.wait_for(r"peer link from replica tower \(127\.0\.0\.1:\d+\) up")

    # Both replicas answer show sites alike, naming the holder.
    url_b = tower_b.log.wait_for(r"listening on (wss://127\.0\.0\.1:\d+)")[1]
    for url in (stack.url, url_b):
        shown = stack.supctl("show", "-o", "json", "sites", env={**stack.env, "SUPCTL_HOST": url})
        assert shown.returncode == 0, shown.stderr
        (site,) = [s for s in json.loads(shown.stdout) if s["name"] == SITE]
        assert site["connected"] is True and site["replica"] == "tower-b" and site["applications"] == [APP]
    table = stack.supctl("show", "-o", "table", "sites").stdout.decode()
    assert table.split("\n")[0].split() == ["SITE", "CONNECTED", "VERSION", "REPLICA", "APPLICATIONS"]

    # Authorised and audited once, at A: one record per stream in the shared store.
    records = stack.wait_audit(
        lambda r: r["event"] == "stream-closed" and r["bytes-up"] == len(payload),
        "the second stream's record",
    )
    closed = [r for r in records if r["event"] == "stream-closed"]
    assert sorted(r["bytes-up"] for r in closed) == [len(payload), size], closed
    proc.stop()


def test_a_revoked_token_ends_a_relayed_session_and_its_stream(peered: tuple[Stack, Proc]) -> None:
    stack, _ = peered
    (stack.root / "ops.toml").write_text(POLICIES)
    config = str(stack.dir / "tower.toml")
    stack.control_tower("policy", "apply", "--config", config, str(stack.root / "ops.toml"))
    add_user(stack, "ana", "correct horse battery", "ops")
    env, stored = login(stack, "ana", "correct horse battery")
    _, echo = start_server(stack, "echo")
    proc, port = forward(stack, echo, env=env)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as in_flight:
        in_flight.sendall(b"relayed")
        assert in_flight.recv(7) == b"relayed"
        stack.control_tower("token", "revoke", "--config", config, stored["accessor"])
        assert end_of(in_flight) == "RST"
    assert proc.popen.wait(timeout=30) == ExitCode.DENIED
    assert "revoked" in proc.log.wait_for(r"supctl: error: (.*)")[1]


def test_a_stream_across_a_replica_that_dies_ends_with_a_reset(peered: tuple[Stack, Proc]) -> None:
    stack, tower_b = peered
    _, echo = start_server(stack, "echo")
    proc, port = forward(stack, echo)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as in_flight:
        in_flight.sendall(b"before")
        assert in_flight.recv(6) == b"before"
        tower_b.popen.send_signal(signal.SIGKILL)
        assert end_of(in_flight) == "RST"
    line = proc.log.wait_for(r"connection 1 failed: (.*)", proc=proc.popen)[1]
    assert "lost the link to replica tower-b" in line, proc.log.text()
    assert proc.popen.poll() is None  # the forward itself goes on
