"""Benchmark one workload over five paths to a local target: direct, socat, ssh -L, ssh -J, supctl.

    python bench/bench.py [--quick] [--json OUT] [--rounds N] [--only PATH ...]

Everything runs on 127.0.0.1.  Every process started here is in its own process
group and is killed (with its descendants) when its path is done, on error and
on Ctrl-C.  See bench/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

from forwarders import SETUPS
from procs import HOST, SETUP_TIMEOUT, BenchError, Procs, in_log, must, proc_stat, process_tree

MIB = 1024 * 1024
CHUNK = 256 * 1024
BLOCK = os.urandom(CHUNK)  # incompressible payload
IO_TIMEOUT = 60.0  # bound on every client socket operation
PING_SECONDS = 20.0  # bound on any ping series
U64 = struct.Struct("!Q")
T = TypeVar("T")

# The target, one thread per connection.  The first byte picks the mode:
#   b"s" + u64 N: sink: read N bytes (or until EOF), answer with the count as u64
#   b"o" + u64 N: source: send N bytes, then close
#   b"e":         echo everything, this first byte included (so it is also a 1-byte ping)
TARGET_SERVER = r"""
import os, socket, struct, threading
BLOCK, U64 = memoryview(os.urandom(256 * 1024)), struct.Struct("!Q")

def serve(c):
    with c:
        try:
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            mode = c.recv(1)
            if mode in (b"s", b"o"):
                (size,) = U64.unpack(c.recv(8, socket.MSG_WAITALL))
            if mode == b"s":
                buf, got = bytearray(1 << 20), 0
                while got < size and (n := c.recv_into(buf, min(len(buf), size - got))):
                    got += n
                c.sendall(U64.pack(got))
            elif mode == b"o":
                for start in range(0, size, len(BLOCK)):
                    c.sendall(BLOCK[: min(len(BLOCK), size - start)])
                c.shutdown(socket.SHUT_WR)
            elif mode == b"e":
                while mode:
                    c.sendall(mode)
                    mode = c.recv(65536)
        except (OSError, struct.error):
            pass

srv = socket.create_server(("127.0.0.1", 0), backlog=1024)
print("READY", srv.getsockname()[1], flush=True)
while True:
    threading.Thread(target=serve, args=(srv.accept()[0],), daemon=True).start()
"""


@dataclass(frozen=True)
class Params:
    single: int  # bytes per single-stream transfer
    streams: int
    per_stream: int  # bytes per parallel stream
    pings: int
    conns: int  # at most this many new connections...
    conn_seconds: float  # ...for at most this long
    loaded_pings: int


FULL = Params(1024 * MIB, 8, 128 * MIB, 2000, 5000, 5.0, 1000)
QUICK = Params(128 * MIB, 8, 16 * MIB, 500, 1000, 2.0, 300)


class Sampler:
    """Per role, every second: the sum of VmHWM over the role's process tree (the peak
    is kept); and the CPU seconds spent between enter and exit (utime+stime of the
    live tree plus cutime+cstime, which covers the children they reaped).

    VmHWM is the kernel's own high-water mark, so a sample a second loses nothing but
    a short-lived child's peak.  Sampling more often costs the measured run: each
    sample walks /proc, and it runs in this process, next to the workload's client
    (GIL included), more so for a path with more processes (at 50 ms it took a
    sizeable share of a core on a 2-core machine)."""

    INTERVAL = 1.0

    def __init__(self, roles: dict[str, int]) -> None:
        self.roles = roles
        self.peak_kib: dict[str, int] = dict.fromkeys(roles, 0)
        self.cpu: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self.cpu = self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.cpu = {role: cpu - self.cpu[role] for role, cpu in self.sample().items()}

    def _run(self) -> None:
        while not self._stop.wait(self.INTERVAL):
            self.sample()

    def sample(self) -> dict[str, float]:
        cpu: dict[str, float] = {}
        for role, pid in self.roles.items():
            kib, ticks = 0, 0
            for p in process_tree(pid):
                with suppress(OSError, IndexError, ValueError):
                    if hwm := re.search(r"VmHWM:\s+(\d+)", Path(f"/proc/{p}/status").read_text()):
                        kib += int(hwm[1])  # zombies have none
                    ticks += sum(int(v) for v in proc_stat(p)[11:15])
            self.peak_kib[role] = max(self.peak_kib[role], kib)
            cpu[role] = ticks / os.sysconf("SC_CLK_TCK")
        return cpu


# --- workloads (client side) -------------------------------------------------


def connect(port: int, nodelay: bool = False) -> socket.socket:
    sock = socket.create_connection((HOST, port), timeout=IO_TIMEOUT)
    if nodelay:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        if not (part := sock.recv(size - len(data))):
            raise BenchError(f"connection closed after {len(data)} of {size} bytes")
        data += part
    return data


def transfer(port: int, size: int, upward: bool) -> float:
    """Seconds to move ``size`` bytes to (upward) or from the target, until all have arrived."""
    started = time.perf_counter()
    with connect(port) as sock:
        sock.sendall((b"s" if upward else b"o") + U64.pack(size))
        if upward:
            for start in range(0, size, CHUNK):
                sock.sendall(BLOCK[: min(CHUNK, size - start)])
            (got,) = U64.unpack(recv_exact(sock, 8))  # the target's count
        else:
            buf, got = memoryview(bytearray(MIB)), 0
            while n := sock.recv_into(buf):
                got += n
    if got != size:
        raise BenchError(f"{got} of {size} bytes arrived")
    return time.perf_counter() - started


def parallel_upload(port: int, streams: int, size: int) -> float:
    started = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        list(pool.map(lambda _: transfer(port, size, True), range(streams)))
    return time.perf_counter() - started


def ping_series(port: int, count: int) -> list[float]:
    """Round-trip times (microseconds) of 1-byte pings on one connection."""
    rtts: list[float] = []
    deadline = time.monotonic() + PING_SECONDS
    with connect(port, nodelay=True) as sock:
        while len(rtts) < count and time.monotonic() < deadline:
            started = time.perf_counter_ns()
            sock.sendall(b"e")
            recv_exact(sock, 1)
            rtts.append((time.perf_counter_ns() - started) / 1000)
    return rtts


def connection_rate(port: int, count: int, seconds: float) -> float:
    """Sequential connect, 1-byte request, 1-byte reply, close: connections per second."""
    started = time.perf_counter()
    done = 0
    while done < count and time.perf_counter() < started + seconds:
        with connect(port, nodelay=True) as sock:
            sock.sendall(b"e")
            recv_exact(sock, 1)
        done += 1
    return done / (time.perf_counter() - started)


def loaded_pings(port: int, count: int, upward: bool) -> list[float]:
    """Pings on one connection while another connection of the forward moves bulk data."""
    moved = [0]
    bulk = connect(port)

    def pump() -> None:
        buf = memoryview(bytearray(MIB))
        with suppress(OSError):  # ends when the main thread shuts the socket down
            bulk.sendall((b"s" if upward else b"o") + U64.pack(1 << 60))
            while n := bulk.send(BLOCK) if upward else bulk.recv_into(buf):
                moved[0] += n

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + SETUP_TIMEOUT
        while moved[0] < 32 * MIB:  # well past any slow start
            if not thread.is_alive() or time.monotonic() > deadline:
                raise BenchError("the bulk transfer did not get going")
            time.sleep(0.01)
        rtts = ping_series(port, count)
        if not thread.is_alive():
            raise BenchError("the bulk transfer stopped during the pings")
        return rtts
    finally:
        with suppress(OSError):
            bulk.shutdown(socket.SHUT_RDWR)
        thread.join(IO_TIMEOUT)
        bulk.close()


def p99(values: list[float]) -> float:
    return sorted(values)[max(0, math.ceil(0.99 * len(values)) - 1)]


def measure(port: int, params: Params, say: Callable[[str], None]) -> dict[str, float]:
    r: dict[str, float] = {}
    transfer(port, MIB, True)  # warm-up
    r["up_mbs"] = params.single / transfer(port, params.single, True) / 1e6
    r["down_mbs"] = params.single / transfer(port, params.single, False) / 1e6
    seconds = parallel_upload(port, params.streams, params.per_stream)
    r["par_mbs"] = params.streams * params.per_stream / seconds / 1e6
    say(f"throughput up {r['up_mbs']:.0f}, down {r['down_mbs']:.0f}, parallel {r['par_mbs']:.0f} MB/s")
    rtts = ping_series(port, params.pings + 20)[20:]  # the first 20 warm up
    r["rtt_p50"], r["rtt_p99"] = statistics.median(rtts), p99(rtts)
    r["conns"] = connection_rate(port, params.conns, params.conn_seconds)
    say(f"ping median {r['rtt_p50']:.0f} us, {r['conns']:.0f} connections/s")
    for way in ("up", "down"):
        rtts = loaded_pings(port, params.loaded_pings, way == "up")
        r[f"load_{way}_p50"], r[f"load_{way}_p99"] = statistics.median(rtts), p99(rtts)
        r[f"load_{way}_n"] = len(rtts)
    return r


# --- report ------------------------------------------------------------------

ROWS = {
    "up_mbs": "1 stream upload MB/s", "down_mbs": "1 stream download MB/s", "par_mbs": "8 streams upload MB/s",
    "rtt_p50": "ping RTT median us", "rtt_p99": "ping RTT p99 us", "conns": "new connections/s",
    "load_up_p50": "ping under upload, median us", "load_up_p99": "ping under upload, p99 us",
    "load_down_p50": "ping under download, median us", "load_down_p99": "ping under download, p99 us",
    "rss_mib": "peak RSS, all forwarder procs MiB", "cpu_s": "CPU s, all forwarder procs",
}  # fmt: skip
TARGETS = [  # label, figure, limit, relative to ssh -L?
    ("supctl 1 stream upload >= 0.6x ssh -L", "up_mbs", 0.6, True),
    ("supctl 1 stream download >= 0.6x ssh -L", "down_mbs", 0.6, True),
    ("supctl connections/s >= 0.5x ssh -L", "conns", 0.5, True),
    ("supctl ping p99 under upload <= 20 ms", "load_up_p99", 20000.0, False),
    ("supctl ping p99 under download <= 20 ms", "load_down_p99", 20000.0, False),
]


def report(results: dict[str, dict[str, object]]) -> list[dict[str, object]]:
    ssh, sup = results.get("ssh -L", {}), results.get("supctl", {})
    print(f"{'(ratio = path / ssh -L)':36}" + "".join(f"{name:>17}" for name in results))
    for key, label in ROWS.items():
        cells = []
        for name, figures in results.items():
            value, ref = figures.get(key), ssh.get(key)
            text = "-" if not isinstance(value, float) else f"{value:.1f}" if value < 100 else f"{value:.0f}"
            if isinstance(value, float) and isinstance(ref, float) and ref and name != "ssh -L":
                text += f" ({value / ref:.2f}x)"
            cells.append(f"{text:>17}")
        print(f"{label:36}" + "".join(cells))
    for name, figures in results.items():
        for what, unit, scale in (("rss_kib", "MiB", 1024), ("cpu", "s", 1)):
            if isinstance(parts := figures.get(what), dict):
                print(
                    f"  {name} {what}: " + ", ".join(f"{k} {v / scale:.1f} {unit}" for k, v in parts.items())
                )
        if "error" in figures:
            print(f"  {name} FAILED: {figures['error']}")
    checks: list[dict[str, object]] = []
    for label, key, limit, relative in TARGETS:
        value, ref = sup.get(key), ssh.get(key)
        if relative:
            value = value / ref if isinstance(value, float) and isinstance(ref, float) and ref else None
        passed = None if not isinstance(value, float) else value >= limit if relative else value <= limit
        checks.append({"target": label, "value": value, "pass": passed})
        shown = "n/a" if not isinstance(value, float) else f"{value:.2f}x" if relative else f"{value:.0f} us"
        print(f"{({True: 'PASS', False: 'FAIL', None: 'N/A '})[passed]}  {label}: {shown}")
    relay = results.get("ssh -J", {})
    context: list[str] = []
    for key in ("up_mbs", "down_mbs", "par_mbs", "rtt_p50", "conns"):
        value, ref = sup.get(key), relay.get(key)
        if isinstance(value, float) and isinstance(ref, float) and ref:
            context.append(f"{ROWS[key]} {value / ref:.2f}x")
    if context:  # not a target: ssh through a jump host has supctl's relay shape
        print("supctl / ssh -J: " + ", ".join(context))
    return checks


# --- main --------------------------------------------------------------------


@contextmanager
def target_server(tmp: Path) -> Iterator[int]:
    (tmp / "target.py").write_text(TARGET_SERVER)
    procs = Procs(tmp)
    try:
        proc = procs.start("target", [sys.executable, str(tmp / "target.py")])
        yield int(must(procs.wait("the target", proc, in_log(tmp / "target.log", r"READY (\d+)")))[1])
    finally:
        procs.stop()


def bench_path(name: str, tmp: Path, target: int, params: Params) -> dict[str, object]:
    procs = Procs(tmp / name.replace(" ", ""))
    procs.logdir.mkdir(parents=True)
    try:
        port, roles = SETUPS[name](procs, target)
        with Sampler(roles) as sampler:
            result: dict[str, object] = {
                **measure(port, params, lambda s: print(f"  {name}: {s}", flush=True))
            }
        if roles:
            result |= {"rss_kib": sampler.peak_kib, "rss_mib": sum(sampler.peak_kib.values()) / 1024,
                       "cpu": sampler.cpu, "cpu_s": sum(sampler.cpu.values())}  # fmt: skip
        return result
    finally:
        procs.stop()


def combine(rounds: list[dict[str, object]]) -> dict[str, object]:
    """The median of each figure over the rounds that worked; per-role details of the last one."""
    good = [r for r in rounds if "error" not in r] or rounds
    result = {**good[-1], "rounds": len(good)}
    for key, value in good[-1].items():
        if isinstance(value, float):
            result[key] = statistics.median([v for r in good if isinstance(v := r.get(key), float)])
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description="direct vs socat vs ssh -L vs supctl on 127.0.0.1")
    parser.add_argument("--quick", action="store_true", help="smaller transfers and fewer round trips")
    parser.add_argument("--json", metavar="OUT", help="also write the figures as JSON")
    parser.add_argument("--rounds", type=int, default=1, help="repeat, report the median of each figure")
    parser.add_argument("--only", nargs="+", choices=list(SETUPS), metavar="PATH", help=f"of {list(SETUPS)}")
    args = parser.parse_args()
    params = QUICK if args.quick else FULL
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the finally blocks run
    runs: dict[str, list[dict[str, object]]] = {name: [] for name in args.only or SETUPS}
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="supctl-bench-")))
        target = stack.enter_context(target_server(tmp))
        for round_ in range(args.rounds):  # paths interleaved, so that a busy spell hits all of them
            for name in runs:
                print(f"{name} (round {round_ + 1} of {args.rounds}) ...", flush=True)
                try:
                    runs[name].append(bench_path(name, tmp / f"{round_}", target, params))
                except (BenchError, OSError, subprocess.SubprocessError) as exc:
                    print(f"  {name} failed: {exc}", flush=True)
                    runs[name].append({"error": str(exc)})
    results = {name: combine(rounds) for name, rounds in runs.items()}
    print(f"\n{params.single // MIB} MiB single stream, {params.streams} x {params.per_stream // MIB} MiB parallel, "
          f"{params.pings} pings, {params.loaded_pings} pings under load; MB = 10^6 bytes")  # fmt: skip
    checks = report(results)
    if args.json:
        doc = {"params": asdict(params), "paths": results, "targets": checks}
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 1 if any("error" in r for rounds in runs.values() for r in rounds) else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
