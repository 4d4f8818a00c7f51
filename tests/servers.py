"""Small TCP servers for tests, run as real processes (often inside a namespace).

Usage::

    python tests/servers.py echo --listen 127.0.0.1:443
    python tests/servers.py sink-source --listen 0.0.0.0:0 --seed 7 --size 20000000
    python tests/servers.py answer-after-eof --listen [::1]:0
    python tests/servers.py slow --listen 127.0.0.1:0 --rate 65536

Once listening, the server prints exactly one line ``READY host:port`` (IPv6 as
``[host]:port``) to stdout and nothing else ever after.  With ``--report FILE``
it appends one JSON line per finished connection to FILE (``received`` bytes,
``sha256`` of the input, ``sent`` bytes, ``error``), so a test can check what
the far end really got without a second channel through the tunnel.

Modes (one thread per direction per connection, blocking sockets):

* ``echo``: send back everything; after reading EOF finish echoing, then
  ``shutdown(SHUT_WR)``.
* ``sink-source``: read everything until EOF (hashing it) and, at the same time,
  send ``--size`` bytes of :func:`pattern` ``(--seed)``, then ``shutdown(SHUT_WR)``.
* ``answer-after-eof``: read until EOF, then reply ``<sha256 hex of input>\\n``
  and close.
* ``slow``: like ``answer-after-eof`` but reads at most ``--rate`` bytes/second,
  so senders meet back-pressure (``--rcvbuf`` shrinks the kernel buffer that
  absorbs a sender before it does).

The module is importable: :func:`pattern`, :func:`pattern_bytes` and
:func:`pattern_sha256` give tests the data a sink-source server sends.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import socket
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

MODES = ("echo", "sink-source", "answer-after-eof", "slow")
BLOCK = 256 * 1024
RECV_SIZE = 256 * 1024


def pattern(seed: int, size: int, block: int = BLOCK) -> Iterator[bytes]:
    """Deterministic pseudo-random bytes: ``size`` bytes in total, in chunks.

    The stream is the concatenation of SHAKE-128 outputs keyed by (seed, block
    number), so it never repeats at a short period and it is the same whatever
    chunk sizes a consumer reads it in.  Fast (hundreds of MB/s).
    """
    if size < 0:
        raise ValueError("size must be >= 0")
    prefix = b"supctl-pattern:" + seed.to_bytes(8, "big", signed=True)
    index = 0
    remaining = size
    while remaining > 0:
        n = min(block, remaining)
        yield hashlib.shake_128(prefix + index.to_bytes(8, "big")).digest(n)
        remaining -= n
        index += 1


def send_pattern_and_read(port: int, seed: int, size: int, timeout: float = 60.0) -> tuple[str, int]:
    """Send ``size`` pattern bytes to 127.0.0.1:``port`` and half-close, while reading
    everything the far end sends until its EOF: (sha256 of it, its length)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        digest = hashlib.sha256()
        received = 0

        def reader() -> None:
            nonlocal received
            while data := sock.recv(1 << 18):
                digest.update(data)
                received += len(data)

        thread = threading.Thread(target=reader, daemon=True)
        thread.start()
        for chunk in pattern(seed, size):
            sock.sendall(chunk)
        sock.shutdown(socket.SHUT_WR)
        thread.join(2 * timeout)
        if thread.is_alive():
            raise TimeoutError("the far end's bytes did not all arrive")
    return digest.hexdigest(), received


def pattern_bytes(seed: int, size: int) -> bytes:
    """The whole of :func:`pattern` as one bytes object."""
    return b"".join(pattern(seed, size))


def pattern_sha256(seed: int, size: int) -> str:
    """Hex SHA-256 of :func:`pattern` ``(seed, size)``."""
    digest = hashlib.sha256()
    for chunk in pattern(seed, size):
        digest.update(chunk)
    return digest.hexdigest()


def parse_hostport(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6HOST]:PORT`` -> (host, port)."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def format_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Reporter:
    def __init__(self, path: str | None) -> None:
        self._path = path
        self._lock = threading.Lock()

    def __call__(self, record: dict[str, Any]) -> None:
        if self._path is None:
            return
        line = json.dumps(record, sort_keys=True) + "\n"
        with self._lock, open(self._path, "a", encoding="utf-8") as fh:
            fh.write(line)


class _Conn:
    """One accepted connection; records what went in and out."""

    def __init__(self, sock: socket.socket, peer: str, args: argparse.Namespace, report: _Reporter) -> None:
        self.sock = sock
        self.peer = peer
        self.args = args
        self.report = report
        self.digest = hashlib.sha256()
        self.received = 0
        self.sent = 0
        self.error: str | None = None

    def fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = f"{type(exc).__name__}: {exc}"

    def recv(self) -> bytes:
        data = self.sock.recv(RECV_SIZE)
        self.digest.update(data)
        self.received += len(data)
        return data

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)
        self.sent += len(data)

    def run(self) -> None:
        try:
            handler = getattr(self, "mode_" + self.args.mode.replace("-", "_"))
            handler()
        except OSError as exc:
            self.fail(exc)
        finally:
            self.sock.close()
            self.report(
                {
                    "mode": self.args.mode,
                    "peer": self.peer,
                    "received": self.received,
                    "sha256": self.digest.hexdigest(),
                    "sent": self.sent,
                    "error": self.error,
                }
            )

    def mode_echo(self) -> None:
        while data := self.recv():
            self.send(data)
        self.sock.shutdown(socket.SHUT_WR)

    def mode_sink_source(self) -> None:
        def source() -> None:
            try:
                for chunk in pattern(self.args.seed, self.args.size):
                    self.send(chunk)
                self.sock.shutdown(socket.SHUT_WR)
            except OSError as exc:
                self.fail(exc)

        writer = threading.Thread(target=source, name=f"source-{self.peer}", daemon=True)
        writer.start()
        try:
            while self.recv():
                pass
        finally:
            writer.join()

    def mode_answer_after_eof(self) -> None:
        while self.recv():
            pass
        self.send(self.digest.hexdigest().encode() + b"\n")

    def mode_slow(self) -> None:
        rate = max(1, self.args.rate)
        start = time.monotonic()
        while True:
            data = self.sock.recv(min(RECV_SIZE, max(1, rate // 10)))
            self.digest.update(data)
            self.received += len(data)
            if not data:
                break
            ahead = self.received / rate - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)
        self.send(self.digest.hexdigest().encode() + b"\n")


def serve(args: argparse.Namespace) -> None:
    host, port = parse_hostport(args.listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if args.rcvbuf:
            # Set before listen() so accepted sockets start with the small window.
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, args.rcvbuf)
        listener.bind((host, port))
        listener.listen(256)
    except BaseException:
        listener.close()
        raise
    actual_port = listener.getsockname()[1]
    report = _Reporter(args.report)
    sys.stdout.write(f"READY {format_hostport(host, actual_port)}\n")
    sys.stdout.flush()
    with listener:
        while True:
            sock, addr = listener.accept()
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Conn(sock, format_hostport(addr[0], addr[1]), args, report)
            threading.Thread(target=conn.run, name=f"conn-{conn.peer}", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", choices=MODES)
    parser.add_argument("--listen", required=True, help="HOST:PORT or [V6HOST]:PORT; port 0 picks one")
    parser.add_argument("--seed", type=int, default=0, help="sink-source: pattern seed")
    parser.add_argument("--size", type=int, default=0, help="sink-source: bytes to send per connection")
    parser.add_argument("--rate", type=int, default=64 * 1024, help="slow: bytes per second to read")
    parser.add_argument("--rcvbuf", type=int, default=0, help="SO_RCVBUF for accepted sockets (0: default)")
    parser.add_argument("--report", help="append one JSON line per finished connection to this file")
    args = parser.parse_args(argv)
    try:
        serve(args)
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
