"""``connect --bind`` rides through a lost tower; what was in flight ends visibly.

Real tower, enforcer and supctl processes (host networking: no root).  The tower is
killed with SIGKILL, so nothing is closed politely, and started again on its port:

* the forward keeps its listener and its port, says ``tower connection lost;
  reconnecting...`` and ``reconnected after N s``, and serves new connections;
* a local connection made while the tower is down waits for the session (up to
  ``--wait-tower``), then flows; past the bound it is reset, with a line;
* a stream that was open when the tower died is reset (RST locally), never ended with
  a FIN after part of its bytes; in netcat mode supctl exits 6;
* a credential the tower refuses on the new session (revoked meanwhile) ends the
  forward with exit 3, as before.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_support import connect_policy, echo_roundtrip, inventory, start_server
from stack import Proc, Stack, do_args, one_line_error, program
from test_users_policies import login
from tower_raw import add_user

from supctl.errors import ExitCode

SITE, APP, INSTANCE = "reconnect-site", "web", "web-1"
POLICIES = connect_policy(SITE)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    with Stack(tmp_path) as stack:
        stack.start_tower()
        stack.add_site(SITE, inventory(APP, INSTANCE))
        yield stack


def forward(stack: Stack, target: int, *extra: str, env: dict[str, str] | None = None) -> tuple[Proc, int]:
    args = [
        program("supctl"),
        *do_args(SITE, APP, INSTANCE, "connect", "tcp", str(target), "--bind", "0", *extra),
    ]
    proc = stack.spawn("supctl", args, **({"env": env} if env else {}))
    match = proc.log.wait_for(r"Forwarding from \S+:(\d+) ->", proc=proc.popen)
    return proc, int(match[1])


def end_of(sock: socket.socket) -> str:
    """Read until the connection ends: ``FIN``, ``RST``, or ``timeout``."""
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        return "RST"
    except TimeoutError:
        return "timeout"
    return "FIN"


class Roundtrip(threading.Thread):
    """One echo round trip in the background (a connection that will have to wait)."""

    def __init__(self, port: int, payload: bytes) -> None:
        super().__init__(daemon=True)
        self.port, self.payload = port, payload
        self.received: bytes | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.received = echo_roundtrip(self.port, self.payload, timeout=60)
        except BaseException as exc:
            self.error = exc


def test_a_forward_keeps_its_port_and_serves_again_after_the_tower_restarts(stack: Stack) -> None:
    _, echo = start_server(stack, "echo")
    proc, port = forward(stack, echo, "--wait-tower", "60")
    payload = os.urandom(300_000)
    assert echo_roundtrip(port, payload) == payload

    in_flight = socket.create_connection(("127.0.0.1", port), timeout=30)
    in_flight.sendall(b"before")
    assert in_flight.recv(6) == b"before"
    assert stack.tower is not None
    stack.tower.stop(signal.SIGKILL)
    # The stream the tower carried is gone: an RST, not a FIN that would pass for its end.
    with in_flight:
        assert end_of(in_flight) == "RST"
    proc.log.wait_for(r"tower connection lost; reconnecting\.\.\.", proc=proc.popen)
    assert proc.log.count(r"connection 2 failed: link lost") == 1, proc.log.text()

    # A connection made while there is no tower waits for the session instead of failing.
    waiting = Roundtrip(port, os.urandom(200_000))
    waiting.start()
    proc.log.wait_for(r"connection 3 from \S+ opened", proc=proc.popen)
    stack.restart_tower(sig=None)
    seconds = float(proc.log.wait_for(r"reconnected after ([0-9.]+) s", deadline=60, proc=proc.popen)[1])
    waiting.join(60)
    assert waiting.error is None, waiting.error
    assert waiting.received is not None
    assert hashlib.sha256(waiting.received).digest() == hashlib.sha256(waiting.payload).digest()
    assert seconds < 60

    # Same process, same port: new connections flow.
    again = os.urandom(1_000_000)
    assert hashlib.sha256(echo_roundtrip(port, again)).digest() == hashlib.sha256(again).digest()
    assert proc.popen.poll() is None
    assert "Traceback" not in proc.log.text()


def test_a_connection_waits_no_longer_than_wait_tower(stack: Stack) -> None:
    _, echo = start_server(stack, "echo")
    proc, port = forward(stack, echo, "--wait-tower", "0.5")
    assert stack.tower is not None
    stack.tower.stop(signal.SIGKILL)
    proc.log.wait_for(r"tower connection lost; reconnecting\.\.\.", proc=proc.popen)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"lost?")
        assert end_of(sock) == "RST"
    proc.log.wait_for(
        r"connection 1 failed: no session with the tower for 0\.5 s \(still reconnecting\)", proc=proc.popen
    )
    stack.restart_tower(sig=None)
    proc.log.wait_for(r"reconnected after [0-9.]+ s", deadline=60, proc=proc.popen)
    assert echo_roundtrip(port, b"back") == b"back"


def test_a_token_revoked_while_the_tower_was_down_ends_the_forward(stack: Stack) -> None:
    (stack.root / "ops.toml").write_text(POLICIES)
    config = str(stack.dir / "tower.toml")
    stack.control_tower("policy", "apply", "--config", config, str(stack.root / "ops.toml"))
    add_user(stack, "alice", "correct horse battery", "ops")
    env, stored = login(stack, "alice", "correct horse battery")
    _, echo = start_server(stack, "echo")
    proc, port = forward(stack, echo, env=env)
    assert echo_roundtrip(port, b"ok") == b"ok"
    assert stack.tower is not None
    stack.tower.stop(signal.SIGKILL)
    proc.log.wait_for(r"tower connection lost; reconnecting\.\.\.", proc=proc.popen)
    stack.control_tower("token", "revoke", "--config", config, stored["accessor"])
    stack.restart_tower(sig=None)
    assert proc.popen.wait(timeout=60) == ExitCode.DENIED
    line = proc.log.wait_for(r"supctl: error: (.*)")[1]
    assert "revoked" in line, proc.log.text()
    assert "reconnected" not in proc.log.text()


def test_netcat_mode_exits_6_when_the_tower_dies_mid_stream(stack: Stack) -> None:
    _, echo = start_server(stack, "echo")
    args = [program("supctl"), *do_args(SITE, APP, INSTANCE, "connect", "tcp", str(echo))]
    with subprocess.Popen(
        args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=stack.env
    ) as nc:
        assert nc.stdin is not None and nc.stdout is not None
        nc.stdin.write(b"ping\n")
        nc.stdin.flush()
        assert nc.stdout.read(5) == b"ping\n"
        assert stack.tower is not None
        stack.tower.stop(signal.SIGKILL)
        assert nc.wait(timeout=30) == ExitCode.STREAM
        assert nc.stderr is not None
        line = one_line_error(nc.stderr.read())
        assert "link lost" in line, line
