"""Several forwards in one ``connect`` over one session, ``localhost`` on both loopbacks, and
what a forward shows (JSON events, plain lines, a live table on a terminal), end to end:
real tower, enforcer, TLS and network namespaces."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pty
import re
import select
import selectors
import signal
import socket
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import tower_raw
from e2e_support import connect_policy, echo_roundtrip, wait_until
from exec_support import Output
from netlab import NetLab
from servers import pattern_sha256, send_pattern_and_read
from stack import LogFile, Proc, Stack, do_args, one_line_error, program

from supctl.errors import ExitCode

pytestmark = pytest.mark.root

APP, INSTANCE, SITE = "popcorn-controller", "popcorn-controller-service-1", "stockholm-sergel"
SIZE = 5 * 1000 * 1000
TIMESTAMP = re.compile(r"^\d\d:\d\d:\d\d ")


@pytest.fixture
def lab(netlab: NetLab) -> dict[str, str]:
    """A service namespace, and a "lan" namespace behind it holding a remote host (the seed's story)."""
    svc = netlab.add_ns("svc")
    lan = netlab.add_ns("lan")
    netlab.veth(svc, "192.0.2.1/24", lan, "192.0.2.11/24")
    return {"svc": svc, "lan": lan}


@pytest.fixture
def stack(tmp_path: Path, lab: dict[str, str]) -> Iterator[Stack]:
    with Stack(tmp_path) as stack:
        stack.start_tower()
        stack.add_site(SITE, f'[applications.{APP}.service-instances.{INSTANCE}]\nnetns = "{lab["svc"]}"\n')
        yield stack


def connect(*rest: str) -> list[str]:
    return do_args(SITE, APP, INSTANCE, "connect", *rest)


def start_json(stack: Stack, *args: str) -> tuple[Proc, Output]:
    proc = stack.spawn("supctl", [program("supctl"), *args], stdout=subprocess.PIPE)
    return proc, Output(proc.popen.stdout)


def events(out: Output, count: int, deadline: float = 20.0) -> list[dict[str, object]]:
    return [json.loads(out.read_line(deadline)) for _ in range(count)]


def sessions_opened(stack: Stack) -> int:
    assert stack.tower is not None
    return stack.tower.log.count(r"session opened ")


def test_two_forwards_in_one_command_share_one_session(
    netlab: NetLab, lab: dict[str, str], stack: Stack
) -> None:
    """``connect tcp 443 --bind 0 tcp 443 --ip-address 192.0.2.11 --bind 0``: the service
    itself and a host on its LAN, both carrying bytes, over ONE WebSocket session."""
    netlab.start_server(lab["svc"], "sink-source", "127.0.0.1:443", "--seed", "99", "--size", str(SIZE))
    netlab.start_server(lab["lan"], "echo", "192.0.2.11:443")
    proc, out = start_json(
        stack, *connect("tcp", "443", "--bind", "0", "tcp", "443", "--ip-address", "192.0.2.11", "--bind", "0"),
        "-o", "json",
    )  # fmt: skip
    first, second = events(out, 2)
    assert (first["event"], first["forward"], first["address"]) == ("listening", 1, "127.0.0.1")
    assert (second["event"], second["forward"], second["address"]) == ("listening", 2, "127.0.0.1")
    assert str(second["target"]).startswith("192.0.2.11:443 in ")
    assert first["port"] != second["port"] and all(
        isinstance(e["port"], int) and e["port"] for e in (first, second)
    )

    assert send_pattern_and_read(int(str(first["port"])), 1, SIZE) == (pattern_sha256(99, SIZE), SIZE)
    assert send_pattern_and_read(int(str(second["port"])), 2, SIZE) == (pattern_sha256(2, SIZE), SIZE)
    later = events(out, 4)
    closed = {e["forward"]: e for e in later if e["event"] == "closed"}
    assert {e["forward"] for e in later if e["event"] == "opened"} == {1, 2}
    assert (closed[1]["sent"], closed[1]["received"], closed[1]["result"]) == (SIZE, SIZE, "ok")
    assert (closed[2]["sent"], closed[2]["received"], closed[2]["result"]) == (SIZE, SIZE, "ok")

    # One session at the tower: one "session opened" line, and its records share one session id.
    assert sessions_opened(stack) == 1
    records = stack.wait_audit(
        lambda r: sum(x["event"] == "stream-closed" for x in stack.audit_records()) >= 2, "both streams"
    )
    accepted = [r for r in records if r["event"] == "session-accepted"]
    streams = [r for r in records if r["event"] == "stream-closed"]
    assert len({r["session"] for r in accepted + streams}) == 1, accepted + streams
    assert sorted(r["target"] for r in accepted) == ["127.0.0.1:443", "192.0.2.11:443"]
    assert sorted(r["target"] for r in streams) == ["127.0.0.1:443", "192.0.2.11:443"]
    assert proc.stop(signal.SIGINT) == 0
    assert "Traceback" not in proc.log.text()


def ipv6_loopback() -> bool:
    shown = subprocess.run(["ip", "-6", "addr", "show", "lo"], capture_output=True, text=True).stdout
    return "::1/128" in shown


def test_localhost_listens_on_both_loopbacks(netlab: NetLab, lab: dict[str, str], stack: Stack) -> None:
    """``--bind localhost:0``: 127.0.0.1 and ::1, the second on the port the first got."""
    if not ipv6_loopback() and not os.environ.get("CI"):
        pytest.skip("this kernel has no IPv6 loopback (::1 on lo)")
    netlab.start_server(lab["svc"], "echo", "127.0.0.1:443")
    proc, out = start_json(stack, *connect("tcp", "443", "--bind", "localhost:0", "-o", "json"))
    v4, v6 = events(out, 2)
    assert (v4["address"], v6["address"]) == ("127.0.0.1", "::1")
    assert v4["port"] == v6["port"]
    port = int(str(v4["port"]))
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        with socket.socket(family) as sock:
            sock.settimeout(10)
            sock.connect((host, port))
            sock.sendall(f"hello over {host}".encode())
            sock.shutdown(socket.SHUT_WR)
            assert sock.makefile("rb").read() == f"hello over {host}".encode()
    numbers = [e["connection"] for e in events(out, 4) if e["event"] == "opened"]
    assert numbers == [1, 2]  # one numbering for the forward, whichever loopback
    assert proc.stop() == 0


def test_plain_lines_when_stderr_is_not_a_terminal(netlab: NetLab, lab: dict[str, str], stack: Stack) -> None:
    netlab.start_server(lab["svc"], "echo", "127.0.0.1:443")
    proc, port = stack.forward(*connect("tcp", "443", "--bind", "0", "-v"))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"x" * 1000)
        sock.shutdown(socket.SHUT_WR)
        assert sock.makefile("rb").read() == b"x" * 1000
    line = proc.log.wait_for(r"connection 1 closed: (.*)\n")[1]
    assert line.startswith("1000 B sent, 1000 B received in ")
    assert re.search(
        r"\(2\.0 kB at \S+ \S+/s, from 127\.0\.0\.1:\d+\) \[stream \d+, accepted in \d+ ms", line
    )
    assert proc.stop() == 0
    text = proc.log.text()
    assert "\x1b" not in text
    lines = text.splitlines()
    assert lines and all(TIMESTAMP.match(x) for x in lines), lines


class Pty:
    """A pseudo-terminal for supctl's stderr, read with deadlines."""

    def __init__(self) -> None:
        self.master, self.slave = pty.openpty()
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
        self.seen = b""

    def wait_for(self, pattern: bytes, deadline: float = 20.0) -> re.Match[bytes]:
        end = time.monotonic() + deadline
        regex = re.compile(pattern)
        with selectors.DefaultSelector() as sel:
            sel.register(self.master, selectors.EVENT_READ)
            while not (match := regex.search(self.seen)):
                left = end - time.monotonic()
                assert left > 0, f"no {pattern!r} on the terminal: {self.seen[-2000:]!r}"
                if sel.select(left):
                    try:
                        self.seen += os.read(self.master, 65536)
                    except OSError:  # EIO: every writer closed the terminal
                        raise AssertionError(f"terminal closed before {pattern!r}: {self.seen!r}") from None
        return match

    def rest(self, deadline: float = 10.0) -> bytes:
        """Everything until every writer closed the terminal."""
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            ready, _, _ = select.select([self.master], [], [], max(0.0, end - time.monotonic()))
            if not ready:
                break
            try:
                chunk = os.read(self.master, 65536)
            except OSError:
                break
            if not chunk:
                break
            self.seen += chunk
        return self.seen

    def close(self) -> None:
        for fd in (self.master, self.slave):
            with contextlib.suppress(OSError):
                os.close(fd)


def test_a_terminal_shows_the_live_table_and_gets_its_cursor_back(
    netlab: NetLab, lab: dict[str, str], stack: Stack
) -> None:
    netlab.start_server(lab["svc"], "echo", "127.0.0.1:443")
    terminal = Pty()
    try:
        env = {**stack.env, "TERM": "xterm-256color"}
        env.pop("COLUMNS", None)
        popen = subprocess.Popen(
            [program("supctl"), *connect("tcp", "443", "--bind", "0")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=terminal.slave, env=env,
            start_new_session=True,
        )  # fmt: skip
        stack.procs.append(Proc(popen, LogFile(stack.root / "pty.log")))  # the stack's cleanup ends it
        os.close(terminal.slave)
        terminal.slave = -1
        port = int(terminal.wait_for(rb"Forwarding from 127\.0\.0\.1:(\d+) ->")[1])
        terminal.wait_for(rb"PEER")  # the table's header
        terminal.wait_for(rb"\x1b\[\?25l")  # the cursor is hidden while the table is live
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            local = sock.getsockname()[1]
            sock.sendall(b"y" * 3000)
            got = b""
            while len(got) < 3000:
                got += sock.recv(65536)
            terminal.wait_for(rf"127\.0\.0\.1:{local}".encode())  # its row in the table
            terminal.wait_for(rb"3\.0 kB")
        terminal.wait_for(rb"connection 1 closed: 3000 B sent, 3000 B received")  # scrolled above
        popen.send_signal(signal.SIGINT)
        assert popen.wait(10) == 0
        seen = terminal.rest()
        assert seen.rfind(b"\x1b[?25h") > seen.rfind(b"\x1b[?25l")  # the cursor is back at exit
        assert b"Traceback" not in seen
    finally:
        terminal.close()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("tcp", "443", "--bind", "8443", "tcp", "80"), "forward 2 (tcp/80) has no --bind: netcat mode"),
        (
            ("tcp", "443", "--bind", "8443", "tcp", "80", "--bind", "127.0.0.1:8443"),
            "both listen on port 8443",
        ),
        ((), "no forward given: connect tcp PORT"),
        (
            ("tcp", "443", "--bind", "0", "tcp", "80", "--bind", "0", "-q", "-o", "json", "-o", "text"),
            "-o given",
        ),
    ],
    ids=["netcat-and-bind", "same-local-port", "no-forward", "two-outputs"],
)
def test_a_chain_that_cannot_be_honoured_is_one_line_and_exit_2(
    stack: Stack, args: tuple[str, ...], message: str
) -> None:
    result = stack.supctl(*connect(*args))
    assert result.returncode == 2, result.stderr
    assert message in one_line_error(result.stderr)
    assert sessions_opened(stack) == 0  # refused before any session


def test_a_session_without_that_forward_refuses_the_stream(
    netlab: NetLab, lab: dict[str, str], stack: Stack
) -> None:
    """A client that names a target its session was not granted gets its stream reset; the
    session (and its granted targets) carries on."""
    netlab.start_server(lab["svc"], "echo", "127.0.0.1:443")
    proc, _ = stack.forward(*connect("tcp", "443", "--bind", "0"))
    wait_until(lambda: sessions_opened(stack) == 1, 10, "the session")
    code = f"""
import asyncio, os
from supctl.client.settings import resolve
from supctl.protocol import OpenRequest
from supctl.errors import StreamError
from supctl_connect.transport import WebSocketTransport

async def main():
    env = os.environ
    transport = WebSocketTransport(resolve(
        host=env["SUPCTL_HOST"], token=None, token_file=env["SUPCTL_TOKEN_FILE"], ca_file=env["SUPCTL_CA_FILE"],
        config=None,
    ))
    query = {{"site": "{SITE}", "protocol": "tcp", "port": "443"}}
    link = await transport.open_session("/v1/state/applications/{APP}/service-instances/{INSTANCE}/connect", query)
    for forward in (1, -1, True, "0", 10**30):
        channel = link.open_channel_now(OpenRequest(verb="connect", args={{"forward": forward}}))
        try:
            await channel.wait_accepted()
            print("accepted", forward)
        except StreamError as exc:
            print("refused", repr(forward), exc)
    channel = link.open_channel_now(OpenRequest(verb="connect", args={{"forward": 0}}))
    await channel.wait_accepted()
    await channel.write(b"still here")
    channel.write_eof()
    print("echo", (await channel.read()).decode())
    await link.aclose()

asyncio.run(main())
"""
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True, text=True, env=stack.env, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["refused"] * 5 + ["echo"], lines
    assert all("in this session (it has 1)" in line for line in lines[:4]), lines
    # An integer no JSON reader holds exactly is refused by the shape every OPEN's args have.
    assert "OPEN field args.forward: integer out of range" in lines[4], lines
    assert lines[-1] == "echo still here"
    assert proc.stop() == 0


def test_every_target_of_a_session_is_judged_by_the_policy(
    netlab: NetLab, lab: dict[str, str], stack: Stack
) -> None:
    """A user allowed only the service itself (127.0.0.1) cannot slip a LAN host in as the
    second forward: the session is refused at the upgrade, naming that target; a session of
    allowed targets works.  Narrowing the policy under it is judged per target (the sweep
    and every OPEN judge every target, not only the first): the target it no longer allows
    loses its connections, in flight and new, while the other forward goes on; with no
    target left the session ends."""
    (stack.dir / "policies.toml").write_text(connect_policy(SITE))
    tower_raw.add_user(stack, "alice", "s3cret-pass", "ops")
    env = {k: v for k, v in stack.env.items() if k != "SUPCTL_TOKEN_FILE"}
    env["XDG_CONFIG_HOME"] = str(stack.root / "config-alice")
    login = stack.supctl("do", "login", "alice", input=b"s3cret-pass\n", env=env)
    assert login.returncode == 0, login.stderr

    sneaky = connect("tcp", "443", "--bind", "0", "tcp", "443", "--ip-address", "192.0.2.11", "--bind", "0")
    result = stack.supctl(*sneaky, env=env, timeout=30)
    assert result.returncode == ExitCode.DENIED
    assert "policy refuses connect to 192.0.2.11:443" in one_line_error(result.stderr)
    assert sessions_opened(stack) == 0

    netlab.start_server(lab["svc"], "echo", "127.0.0.1:443")
    netlab.start_server(lab["svc"], "echo", "127.0.0.1:80")
    allowed = connect("tcp", "443", "--bind", "0", "tcp", "80", "--bind", "0")
    proc = stack.spawn("supctl-alice", [program("supctl"), *allowed], env=env)
    proc.log.wait_for(r"Forwarding from .*\n(?:.*\n)*.*Forwarding from", proc=proc.popen)
    ports = [int(port) for port in re.findall(r"Forwarding from \S+:(\d+) ->", proc.log.text())]
    assert len(ports) == 2
    for port in ports:
        assert echo_roundtrip(port, b"allowed") == b"allowed"
    to_443, to_80 = (socket.create_connection(("127.0.0.1", port), timeout=10) for port in ports)
    with to_443, to_80:
        for sock in (to_443, to_80):  # both relaying before the change
            sock.sendall(b"before")
            assert sock.recv(100) == b"before"
        # Port 80 is taken away: its connection in flight is reset (DENIED, the policy's
        # reason), the one to 443 relays on, and the forward of 443 takes new connections.
        replace_policies(stack, connect_policy(SITE) + 'ports = ["443"]\n')
        assert ended(to_80)
        to_443.sendall(b"after")
        assert to_443.recv(100) == b"after"
    why = "policy no longer allows connect to 127.0.0.1:80"
    proc.log.wait_for(rf"tcp/80: connection 2 failed: {why}", proc=proc.popen)
    assert echo_roundtrip(ports[0], b"new") == b"new"
    assert refused_at_once(ports[1])  # a new connection to 80: refused alone, the session stays
    proc.log.wait_for(rf"tcp/80: connection 3 failed: {why}", proc=proc.popen)
    assert proc.popen.poll() is None

    def denied_to_80() -> list[dict[str, object]]:
        found = [
            r
            for r in stack.audit_records()
            if r["event"] == "stream-closed" and r["close-reason"] == "denied" and why in r["result"]
        ]
        return found if len(found) >= 2 else []

    # Two records, each naming the target it was for: the stream in flight the sweep
    # reset, and the new one refused at its OPEN.
    records = wait_until(denied_to_80, 20, "both records")
    assert [r["target"] for r in records] == ["127.0.0.1:80", "127.0.0.1:80"]
    # No target left: the session ends, as a one-target one would.
    replace_policies(stack, connect_policy(SITE) + 'ports = ["22"]\n')
    assert proc.popen.wait(timeout=30) == ExitCode.DENIED
    assert "policy no longer allows connect to 127.0.0.1:443" in proc.log.text()


def replace_policies(stack: Stack, text: str) -> None:
    """A new policies.toml, renamed into place: the tower, which watches the file, never
    reads it half written (an empty file is a valid set that allows nothing, and would
    end the whole session: docs/policies.md says to change the file this way)."""
    new = stack.dir / "policies.toml.new"
    new.write_text(text)
    new.replace(stack.dir / "policies.toml")


def refused_at_once(port: int) -> bool:
    """Whether a new connection to ``port`` is ended without an echo (the reset may come
    before ``connect`` even returns)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            return ended(sock)
    except ConnectionResetError:
        return True


def ended(sock: socket.socket) -> bool:
    """Whether the peer ends ``sock`` (EOF or reset) within its timeout, without echoing."""
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True
