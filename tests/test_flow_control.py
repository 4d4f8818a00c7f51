"""A slow reader throttles the sender end to end, through both hops of the tower.

Target: ``servers.py slow`` (reads at most ``RATE`` bytes/s, small SO_RCVBUF) on
127.0.0.1, reached through a host-network site and a ``connect --bind 0``
forward.  A sender thread tries to push ``GOAL`` (200 MB) for ``PUSH_SECONDS``.

Choice of numbers: unthrottled, this path moves 200 MB in about 1-2 s on a
2-core machine, so ``GOAL`` is out of reach only if back-pressure works.  At the
1 MB/s of the brief, draining the few MB that legitimately sit in buffers after
the push would alone take longer than the whole budget, so the reader runs at
4 MB/s: the push still lasts 5 s and the assertion keeps its meaning, since the
sender must stay within (what the target read) + (bounded buffers), i.e. about
35 MB, not 200 MB.

The bounded buffers are the two protocol windows (supctl->tower and
tower->enforcer, ``DEFAULT_WINDOW`` each), a little userspace slack (one read
chunk in supctl, one chunk plus the transport buffer in the enforcer), and the
kernel buffers of the two plain TCP hops that the protocol does not govern
(sender->supctl and enforcer->target).  Linux autotunes those; on this kind of
host they hold ~6 MB in total (the enforcer's send buffer alone may grow to
``net.ipv4.tcp_wmem``'s max, 4 MiB by default), so ``KERNEL_ALLOWANCE`` is
12 MiB.  The per-hop bound itself is then checked exactly from the tower's and
the enforcer's own accounting: ``peak_queued_up`` and ``peak_buffered`` <= one
window.
"""

from __future__ import annotations

import hashlib
import random
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from e2e_support import inventory, start_server
from stack import Stack, do_args

from supctl.link import READ_SIZE
from supctl.protocol import DEFAULT_WINDOW

APP = "flow"
INST = "flow-1"
SITE = "slowpoke"

RATE = 4_000_000  # bytes/s the target reads
RCVBUF = 64 * 1024  # the target's SO_RCVBUF
GOAL = 200_000_000
PUSH_SECONDS = 5.0
SNDBUF = 64 * 1024  # the sender's own SO_SNDBUF (the kernel doubles it)
KERNEL_ALLOWANCE = 12 * 1024 * 1024
USERSPACE_SLACK = 4 * READ_SIZE
MiB = 1024 * 1024


@pytest.fixture
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with Stack(tmp_path_factory.mktemp("flow")) as stack:
        stack.start_tower()
        stack.add_site(SITE, inventory(APP, INST))
        yield stack


@dataclass
class Push:
    sent: int = 0
    seconds: float = 0.0
    sha256: str = ""
    answer: bytes = b""
    drain_seconds: float = 0.0
    error: BaseException | None = None


def push(port: int, result: Push) -> None:
    """Send as much as possible for PUSH_SECONDS, then half-close and read the answer."""
    block = random.Random(5).randbytes(MiB)
    digest = hashlib.sha256()
    try:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        with sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)
            start = time.monotonic()  # before connect: the target cannot have read anything earlier
            sock.connect(("127.0.0.1", port))
            sock.settimeout(0.2)  # so the deadline below is checked while throttled
            offset = 0
            while result.sent < GOAL and time.monotonic() - start < PUSH_SECONDS:
                try:
                    n = sock.send(block[offset : offset + 256 * 1024])
                except TimeoutError:
                    continue  # nothing accepted: back-pressure
                digest.update(block[offset : offset + n])
                result.sent += n
                offset = (offset + n) % len(block)
            result.seconds = time.monotonic() - start
            result.sha256 = digest.hexdigest()
            sock.shutdown(socket.SHUT_WR)
            drain_start = time.monotonic()
            sock.settimeout(30)
            while data := sock.recv(4096):
                result.answer += data
            result.drain_seconds = time.monotonic() - drain_start
    except BaseException as exc:
        result.error = exc


def test_slow_reader_throttles_the_sender_end_to_end(stack: Stack) -> None:
    _, target_port = start_server(stack, "slow", "--rate", str(RATE), "--rcvbuf", str(RCVBUF))
    _, port = stack.forward(*do_args(SITE, APP, INST, "connect", "tcp", str(target_port), "--bind", "0"))

    result = Push()
    sender = threading.Thread(target=push, args=(port, result), name="sender", daemon=True)
    sender.start()
    sender.join(PUSH_SECONDS + 40)
    assert not sender.is_alive(), "the sender is stuck"
    if result.error is not None:
        raise result.error

    # The bytes arrived intact: the target hashed exactly what we sent.
    assert result.answer.strip().decode() == result.sha256

    # The slow reader can have read at most RATE * elapsed (+ one read of RATE/10).
    target_read_bound = RATE * result.seconds + RATE // 10
    buffers = 2 * DEFAULT_WINDOW + USERSPACE_SLACK + KERNEL_ALLOWANCE
    detail = f"sent {result.sent / MiB:.1f} MiB in {result.seconds:.1f} s"
    assert result.sent < GOAL, f"no back-pressure at all: {detail}"
    assert result.sent <= target_read_bound + buffers, (
        f"{detail}: more than the target read ({target_read_bound / MiB:.1f} MiB) + buffers ({buffers / MiB:.1f} MiB)"
    )
    # ...and data did flow at about the reader's pace (the test measures something).
    assert result.sent >= RATE * result.seconds * 0.5, detail

    # Each hop held at most one window for this stream, by its own accounting.
    assert stack.tower is not None
    tower = stack.tower.log.wait_for(
        rf"stream closed .* target=127\.0\.0\.1:{target_port} sent=(\d+) received=(\d+) "
        r"peak_queued_up=(\d+) peak_queued_down=(\d+) .*result=ok"
    )
    assert int(tower[1]) == result.sent
    assert int(tower[2]) == len(result.answer)
    assert 0 < int(tower[3]) <= DEFAULT_WINDOW, tower[0]
    enforcer_proc = next(p for p in stack.procs if p.log.path.name.startswith(f"enforcer-{SITE}"))
    enforcer = enforcer_proc.log.wait_for(
        rf"stream closed .* target=127\.0\.0\.1:{target_port} sent=(\d+) received=(\d+) peak_buffered=(\d+) "
        r".*result=ok"
    )
    assert int(enforcer[2]) == result.sent
    assert 0 < int(enforcer[3]) <= DEFAULT_WINDOW, enforcer[0]
    assert not re.search("Traceback", stack.tower.log.text() + enforcer_proc.log.text())
