"""Datagrams/s and MB/s of ``connect udp`` next to socat relaying the same load directly.

    python bench/udp.py [--quick] [--seconds S] [--window W] [--json OUT]

Paths, all on 127.0.0.1, to a UDP echo target (a Python loop in its own process):

* direct: client -> target
* socat:  client -> ``socat UDP-LISTEN:P,fork,reuseaddr,bind=127.0.0.1 UDP:127.0.0.1:T`` -> target
* supctl: client -> ``supctl ... connect udp T --bind 0 -q`` -> tower -> enforcer -> target

Workload, for 64-byte and 1,400-byte datagrams: one local peer keeps ``W`` datagrams in
flight (default 64) and sends a new one for each echo it gets, for ``S`` seconds (5, or 2
with ``--quick``); a datagram not echoed within 0.2 s counts as lost and is replaced.
Figures: echoed datagrams per second (each crossed the path twice), payload MB/s one way
(10^6 bytes) and the datagrams lost (UDP drops them, supctl counts them).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from forwarders import setup_supctl
from procs import HOST, SETUP_TIMEOUT, BenchError, Procs, free_port, tool

ECHO_SERVER = r"""
import socket, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
sock.bind(("127.0.0.1", int(sys.argv[1])))
recvfrom, sendto = sock.recvfrom, sock.sendto
while True:
    data, peer = recvfrom(65535)
    sendto(data, peer)
"""
SIZES = (64, 1400)
LOSS_WAIT = 0.2


def echo_ready(port: int) -> None:
    """Wait until a datagram sent to ``port`` comes back (the path is up)."""
    end = time.monotonic() + SETUP_TIMEOUT
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((HOST, port))
        sock.settimeout(0.2)
        while time.monotonic() < end:
            sock.send(b"ready?")
            try:
                if sock.recv(100) == b"ready?":
                    return
            except OSError:  # timed out, or ICMP refused while the relay starts
                continue
    raise BenchError(f"nothing echoes on port {port}")


def measure(port: int, size: int, seconds: float, window: int) -> dict[str, float]:
    payload = os.urandom(size)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.connect((HOST, port))
        sock.settimeout(LOSS_WAIT)
        echoed = lost = 0
        start = time.monotonic()
        end = start + seconds
        for _ in range(window):
            sock.send(payload)
        while time.monotonic() < end:
            try:
                sock.recv(65535)
            except TimeoutError:  # the whole window is gone: count it, send a new one
                lost += window
                for _ in range(window):
                    sock.send(payload)
                continue
            echoed += 1
            sock.send(payload)
        elapsed = time.monotonic() - start
    return {
        "size": size,
        "datagrams_per_s": round(echoed / elapsed),
        "mb_per_s": round(echoed * size / elapsed / 1e6, 2),
        "lost": lost,
    }


def socat(procs: Procs, target: int) -> int:
    port = free_port()
    listen = f"UDP-LISTEN:{port},fork,reuseaddr,bind={HOST}"
    procs.start("socat", [tool("socat"), listen, f"UDP:{HOST}:{target}"])
    return port


def supctl(procs: Procs, target: int) -> int:
    return setup_supctl(procs, target, "udp")[0]


PATHS: dict[str, Callable[[Procs, int], int]] = {
    "direct": lambda procs, target: target,
    "socat": socat,
    "supctl": supctl,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seconds", type=float)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    seconds = args.seconds or (2.0 if args.quick else 5.0)
    results: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="supctl-udp-bench-") as tmp:
        for name, setup in PATHS.items():
            logdir = Path(tmp) / name.replace(" ", "-")
            logdir.mkdir()
            procs = Procs(logdir)
            try:
                target = free_port()
                procs.start("target", [sys.executable, "-c", ECHO_SERVER, str(target)])
                echo_ready(target)
                port = setup(procs, target)
                echo_ready(port)
                results[name] = [measure(port, size, seconds, args.window) for size in SIZES]
            finally:
                procs.stop()
    print(f"\nconnect udp: echoed datagrams, {args.window} in flight, {seconds:g} s each")
    print(f"{'path':8} {'size':>6} {'datagrams/s':>12} {'MB/s':>8} {'lost':>8} {'vs socat':>9}")
    for name, rows in results.items():
        for row, reference in zip(rows, results["socat"], strict=True):
            ratio = (
                row["datagrams_per_s"] / reference["datagrams_per_s"] if reference["datagrams_per_s"] else 0
            )
            print(
                f"{name:8} {row['size']:>6} {row['datagrams_per_s']:>12} {row['mb_per_s']:>8}"
                f" {row['lost']:>8} {ratio:>8.2f}x"
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
