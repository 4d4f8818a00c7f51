"""No silent truncation: a stream cut by a dying process ends with RST, a whole one with FIN.

Real tower, enforcer and ``supctl connect --bind`` processes; the target lives in
a service network namespace.  The far end of each cut records how its connection
ended: ``FIN`` (``recv`` returned ``b""``: what a server takes for "the client is
done") or ``RST`` (``recv`` raised ECONNRESET).  Before the fix (SO_LINGER armed in
supctl/bridge.py) every cut below ended with FIN after part of the bytes.

Kill points are reached by waiting for the bytes the far end received, never by
time.  SIZE is the issue's 200 MB; each case restarts only the process it killed.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from netlab import NetLab, call_in_netns
from stack import Proc, Stack, do_args, one_line_error
from stack import program as stack_program

from supctl.errors import ExitCode

pytestmark = pytest.mark.root

APP, INSTANCE, SITE = "sink-app", "sink-instance-1", "truncation-site"
SIZE = 200 * 1000 * 1000
BLOCK = 1000 * 1000
#: Fractions of SIZE the far end must have received when the process is killed.
KILL_POINTS = (0.2, 0.5, 0.8)
DEADLINE = 60.0


def data_block() -> bytes:
    """SIZE is BLOCK repeated: random, so nothing on the path can compress it."""
    return os.urandom(BLOCK)


def expected_sha256(block: bytes) -> str:
    digest = hashlib.sha256()
    for _ in range(SIZE // BLOCK):
        digest.update(block)
    return digest.hexdigest()


@dataclass
class Reader:
    """Reads one socket to its end, recording the bytes and how it ended."""

    sock: socket.socket
    received: int = 0
    end: str = ""  # "FIN", "RST", or another error's name
    digest: hashlib._Hash = field(default_factory=hashlib.sha256)
    done: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        buffer = bytearray(1 << 20)
        view = memoryview(buffer)
        try:
            while True:
                try:
                    size = self.sock.recv_into(buffer)
                except ConnectionResetError:
                    self.end = "RST"
                    return
                except OSError as exc:
                    self.end = type(exc).__name__
                    return
                if not size:
                    self.end = "FIN"
                    return
                self.digest.update(view[:size])
                self.received += size
        finally:
            self.sock.close()
            self.done.set()

    def start(self) -> Reader:
        threading.Thread(target=self.run, name="reader", daemon=True).start()
        return self

    def wait_received(self, size: int) -> None:
        end = time.monotonic() + DEADLINE
        while self.received < size:
            assert not self.done.is_set(), f"ended ({self.end}) after {self.received} of {size} bytes"
            assert time.monotonic() < end, f"only {self.received} of {size} bytes in {DEADLINE} s"
            time.sleep(0.005)  # polling a counter; the deadline is the bound

    def wait_end(self) -> str:
        assert self.done.wait(DEADLINE), f"no end after {self.received} bytes"
        return self.end


def send_all(sock: socket.socket, block: bytes, then_shutdown: bool = True) -> None:
    """Send SIZE bytes (a thread's body); a cut connection just stops it."""
    with contextlib.suppress(OSError):
        for _ in range(SIZE // BLOCK):
            sock.sendall(block)
        if then_shutdown:
            sock.shutdown(socket.SHUT_WR)


class Target:
    """A listening socket in the service namespace (created there by a helper thread)."""

    def __init__(self, netns: str, port: int = 443) -> None:
        self.listener: socket.socket = call_in_netns(netns, socket.create_server, ("127.0.0.1", port))
        self.listener.settimeout(DEADLINE)

    def accept(self) -> socket.socket:
        sock, _ = self.listener.accept()
        sock.settimeout(None)
        return sock


@pytest.fixture
def world(netlab: NetLab, tmp_path: Path) -> Iterator[tuple[Stack, Target, str]]:
    svc = netlab.add_ns("svc")
    target = Target(svc)
    with target.listener, Stack(tmp_path) as stack:
        stack.start_tower()
        stack.add_site(SITE, f'[applications.{APP}.service-instances.{INSTANCE}]\nnetns = "{svc}"\n')
        yield stack, target, svc


def live_enforcer(stack: Stack) -> Proc:
    (proc,) = (p for p in stack.procs if "edge-enforcer" in str(p.popen.args) and p.popen.poll() is None)
    return proc


def forward(stack: Stack) -> tuple[Proc, int]:
    return stack.forward(*do_args(SITE, APP, INSTANCE, "connect", "tcp", "443", "--bind", "0"))


def kill9(proc: Proc) -> None:
    proc.popen.send_signal(signal.SIGKILL)
    proc.popen.wait(10)


def test_clean_upload_and_download_end_with_fin_and_every_byte(world: tuple[Stack, Target, str]) -> None:
    stack, target, _ = world
    block = data_block()
    want = expected_sha256(block)
    _, port = forward(stack)

    # Upload: the client sends SIZE bytes and half-closes; the target sees all of them, then FIN.
    client = socket.create_connection(("127.0.0.1", port))
    sender = threading.Thread(target=send_all, args=(client, block), daemon=True)
    sender.start()
    sink = Reader(target.accept()).start()
    assert sink.wait_end() == "FIN"
    assert (sink.received, sink.digest.hexdigest()) == (SIZE, want)
    sender.join(DEADLINE)
    client.close()

    # Download after a request (the client half-closes first, as an HTTP/1.0 client may):
    # the target sends SIZE bytes and closes; the client sees all of them, then FIN.
    # supctl closes its socket while bytes are still queued in the kernel: with linger
    # 0 still armed that close would reset and discard them (disarming prevents it).
    client = socket.create_connection(("127.0.0.1", port))
    client.sendall(b"GET /\r\n")
    client.shutdown(socket.SHUT_WR)
    source = target.accept()
    assert source.recv(100) == b"GET /\r\n"
    assert source.recv(100) == b""
    reader = Reader(client).start()
    send_all(source, block)
    source.close()
    assert reader.wait_end() == "FIN"
    assert (reader.received, reader.digest.hexdigest()) == (SIZE, want)


def test_enforcer_killed_mid_upload_resets_the_target(world: tuple[Stack, Target, str]) -> None:
    stack, target, _ = world
    block = data_block()
    _, port = forward(stack)
    for point in KILL_POINTS:
        client = socket.create_connection(("127.0.0.1", port))
        threading.Thread(target=send_all, args=(client, block), daemon=True).start()
        sink = Reader(target.accept()).start()
        sink.wait_received(int(SIZE * point))
        kill9(live_enforcer(stack))
        # Before the fix: "FIN" after part of the upload, which a server takes for the whole.
        assert sink.wait_end() == "RST", f"killed at {point:.0%}: {sink.end} after {sink.received} bytes"
        assert sink.received < SIZE
        client.close()
        stack.start_enforcer(SITE)  # the forward's session survives; new streams reach the site again


def test_supctl_killed_mid_download_resets_the_client(world: tuple[Stack, Target, str]) -> None:
    stack, target, _ = world
    block = data_block()
    for point in KILL_POINTS:
        supctl, port = forward(stack)
        client = socket.create_connection(("127.0.0.1", port))  # a raw client: no length framing
        reader = Reader(client).start()
        source = target.accept()
        threading.Thread(target=send_all, args=(source, block), daemon=True).start()
        reader.wait_received(int(SIZE * point))
        kill9(supctl)
        assert reader.wait_end() == "RST", (
            f"killed at {point:.0%}: {reader.end} after {reader.received} bytes"
        )
        assert reader.received < SIZE
        source.close()


def test_supctl_killed_before_the_first_byte_resets_an_accepted_client(
    world: tuple[Stack, Target, str],
) -> None:
    """Armed before the first byte moves, not only once data flows."""
    stack, target, _ = world
    supctl, port = forward(stack)
    client = socket.create_connection(("127.0.0.1", port))
    source = target.accept()  # the stream is open end to end; nothing was sent yet
    kill9(supctl)
    reader = Reader(client).start()
    assert reader.wait_end() == "RST"
    assert reader.received == 0
    source.close()


def tcp_entry(local_port: int, remote_port: int) -> tuple[str, int] | None:
    """(state, inode) of the IPv4 socket 127.0.0.1:local_port -> :remote_port (/proc/net/tcp)."""
    with open("/proc/net/tcp", encoding="ascii") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            local, remote = fields[1], fields[2]
            if int(local.split(":")[1], 16) == local_port and int(remote.split(":")[1], 16) == remote_port:
                return fields[3], int(fields[9])
    return None


#: /proc/net/tcp's hex code of TCP_LAST_ACK.
LAST_ACK = "09"


def test_clean_close_keeps_the_bytes_still_queued_in_the_kernel(world: tuple[Stack, Target, str]) -> None:
    """supctl closes a finished stream's socket while its last bytes wait in the kernel
    (the client reads slowly): they still arrive, then FIN.  With SO_LINGER 0 left on
    at that close, Linux resets from LAST_ACK and drops them: disarming comes first."""
    stack, target, _ = world
    _, port = forward(stack)
    answer = os.urandom(16 * 1024)
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: bytes stay queued
    client.connect(("127.0.0.1", port))
    client.sendall(b"GET /\r\n")
    client.shutdown(socket.SHUT_WR)
    source = target.accept()
    with source:
        assert source.recv(100) == b"GET /\r\n"
        assert source.recv(100) == b""
        source.sendall(answer)
    client_port = client.getsockname()[1]

    def supctl_closed() -> bool:
        entry = tcp_entry(port, client_port)
        # Gone (reset), or orphaned (inode 0: no file descriptor left) with bytes queued.
        return entry is None or entry == (LAST_ACK, 0)

    end = time.monotonic() + DEADLINE
    while not supctl_closed():
        assert time.monotonic() < end, tcp_entry(port, client_port)
        time.sleep(0.005)  # polling the kernel's table; the deadline is the bound
    reader = Reader(client).start()
    assert reader.wait_end() == "FIN"
    assert (reader.received, reader.digest.hexdigest()) == (len(answer), hashlib.sha256(answer).hexdigest())


# --- exec: stdin is a pipe, which has no reset ---------------------------------------

EXEC_SITE, SHELL = "exec-site", "shell"


@pytest.fixture
def exec_stack(tmp_path: Path) -> Iterator[Stack]:
    with Stack(tmp_path) as stack:
        stack.start_tower()
        stack.add_site(
            EXEC_SITE,
            f'[applications.{APP}.service-instances.{INSTANCE}]\nruntime = "host"\n'
            f"[applications.{APP}.service-instances.{INSTANCE}.containers.{SHELL}]\n",
        )
        yield stack


def start_upload_exec(stack: Stack, out: Path, marker: Path) -> Proc:
    """``exec 'cat > OUT; echo complete > MARKER'`` fed 1 MB on stdin, not closed; returns once it arrived."""
    command = f"cat > {out}; echo complete > {marker}"
    args = do_args(EXEC_SITE, APP, INSTANCE, "containers", SHELL, "exec", command)
    proc = stack.spawn("supctl-exec", [stack_program("supctl"), *args], stdin=subprocess.PIPE)
    assert proc.popen.stdin is not None
    proc.popen.stdin.write(os.urandom(1 << 20))
    proc.popen.stdin.flush()
    end = time.monotonic() + DEADLINE
    while not (out.exists() and out.stat().st_size >= 1 << 20):
        assert time.monotonic() < end and proc.popen.poll() is None, proc.log.text()
        time.sleep(0.01)  # polling a file's size; the deadline is the bound
    return proc


def test_exec_when_the_enforcer_dies_says_the_site_was_lost(exec_stack: Stack, tmp_path: Path) -> None:
    """What the user sees is the lost site (exit 6), never the command's status.  The
    command itself: where the enforcer contains it in a cgroup, the guardian kills it (a
    race with the EOF its stdin, a pipe with no reset, sees at the same moment, so it may
    have run on first: documented); without cgroups it reads EOF and goes on."""
    out, marker = tmp_path / "out", tmp_path / "marker"
    enforcer = live_enforcer(exec_stack)
    proc = start_upload_exec(exec_stack, out, marker)
    kill9(enforcer)
    assert proc.popen.wait(DEADLINE) == ExitCode.EXEC_FAILED  # exec: 255 when supctl fails
    assert one_line_error(proc.log.path.read_bytes()).startswith(
        f"supctl: error: lost the link to site {EXEC_SITE}"
    )
    end = time.monotonic() + DEADLINE
    if "processes are contained in cgroup" in enforcer.log.text():
        while (
            subprocess.run(["pgrep", "-f", f"cat > {out}"], capture_output=True, check=False).returncode == 0
        ):
            assert time.monotonic() < end, "the guardian did not kill the command"
            time.sleep(0.01)  # polling the process table; the deadline is the bound
        return
    while not marker.exists():  # no cgroup: EOF, so the command went on
        assert time.monotonic() < end
        time.sleep(0.01)  # polling a file; the deadline is the bound


def test_exec_when_supctl_dies_the_command_is_killed_before_its_stdin_closes(
    exec_stack: Stack, tmp_path: Path
) -> None:
    """While the enforcer lives, a lost session never hands the command a false EOF:
    the enforcer kills the command's process group first, then closes its pipes."""
    out, marker = tmp_path / "out", tmp_path / "marker"
    proc = start_upload_exec(exec_stack, out, marker)
    kill9(proc)
    end = time.monotonic() + DEADLINE
    while subprocess.run(["pgrep", "-f", f"cat > {out}"], capture_output=True, check=False).returncode == 0:
        assert time.monotonic() < end, "the command is still running"
        time.sleep(0.01)  # polling the process table; the deadline is the bound
    assert not marker.exists()
