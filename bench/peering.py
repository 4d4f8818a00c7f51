"""A stream relayed across two replicas next to one through a single replica, same run.

    python bench/peering.py [--size-mb 200] [--pings 2000] [--revokes 5]

Two replicas (tower, tower-b) of one tower directory on a throwaway PostgreSQL
(tests/pg_cluster.py), each with a peer listener on loopback, the site's enforcer
linked to tower-b.  Two ``connect --bind`` forwards to the same servers: one through
tower-b (same replica: supctl -> tower-b -> enforcer) and one through tower (cross
replica: supctl -> tower -> peer link -> tower-b -> enforcer).  For each: download and
upload of ``--size-mb`` MB (MB/s), and ``--pings`` one-byte echo round trips on one
connection (median and p99, microseconds).  Then ``--revokes`` times: a user's session on
tower, relayed to tower-b, and seconds from the start of ``control-tower token revoke``
(a process of its own, in another process than the towers) to supctl's exit, next to the
command's own run time: the session ends by NOTIFY, before the command has exited.  The programs on PATH
(``PATH=.tox/tests/bin:$PATH``).  A benchmark, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from balancer import PEERING  # noqa: E402
from e2e_support import connect_policy, inventory, start_server  # noqa: E402
from pg_cluster import PostgresCluster, find_bindir  # noqa: E402
from servers import send_pattern_and_read  # noqa: E402
from stack import Proc, Stack, do_args, program, write_secret  # noqa: E402
from test_users_policies import login  # noqa: E402
from tower_raw import add_user  # noqa: E402

SITE, APP, INSTANCE = "bench-site", "web", "web-1"
POLICIES = connect_policy(SITE)


def forward(stack: Stack, url: str, target: int, env: dict[str, str] | None = None) -> tuple[Proc, int]:
    args = [program("supctl"), *do_args(SITE, APP, INSTANCE, "connect", "tcp", str(target), "--bind", "0")]
    proc = stack.spawn("supctl", args, env={**(env or stack.env), "SUPCTL_HOST": url})
    return proc, int(proc.log.wait_for(r"Forwarding from \S+:(\d+) ->", proc=proc.popen)[1])


def download(port: int) -> tuple[int, float]:
    started = time.perf_counter()
    received = 0
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        sock.shutdown(socket.SHUT_WR)
        while data := sock.recv(1 << 18):
            received += len(data)
    return received, time.perf_counter() - started


def pings(port: int, count: int) -> list[float]:
    times = []
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(b"x")
        sock.recv(1)  # the stream is open end to end
        for _ in range(count):
            started = time.perf_counter()
            sock.sendall(b"x")
            sock.recv(1)
            times.append((time.perf_counter() - started) * 1e6)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--pings", type=int, default=2000)
    parser.add_argument("--revokes", type=int, default=5)
    args = parser.parse_args()
    bindir = find_bindir()
    if bindir is None:
        print("PostgreSQL is not installed (apt-get install postgresql)", file=sys.stderr)
        return 1
    size = args.size_mb * 1024 * 1024
    with tempfile.TemporaryDirectory(prefix="peering-") as tmp, PostgresCluster(bindir) as pg:
        root = Path(tmp)
        url = pg.create_database("peering")
        with Stack(root) as stack:
            stack.start_tower(store=(url, pg.write_password_file(root / "store.password")), config=PEERING)
            assert stack.tower is not None
            stack.tower.log.wait_for(r"takes relayed streams on", proc=stack.tower.popen)
            config = stack.dir / "tower-b.toml"
            config.write_text(
                (stack.dir / "tower.toml").read_text().replace("[cluster]\n", '[cluster]\nid = "tower-b"\n')
            )
            tower_b = stack.spawn(
                "tower-b",
                [program("control-tower"), "serve", "--config", str(config), "--listen", "127.0.0.1:0"],
            )
            url_b = tower_b.log.wait_for(r"listening on (wss://127\.0\.0\.1:\d+)", proc=tower_b.popen)[1]
            tower_b.log.wait_for(r"takes relayed streams on", proc=tower_b.popen)
            write_secret(root / f"{SITE}.token", stack.register_site(SITE) + "\n")
            (root / f"{SITE}.toml").write_text(inventory(APP, INSTANCE))
            stack.start_enforcer(SITE, towers=[url_b], wait=False)
            tower_b.log.wait_for(rf"site {SITE} connected", proc=tower_b.popen)
            _, source = start_server(stack, "sink-source", "--seed", "1", "--size", str(size))
            _, sink = start_server(stack, "answer-after-eof")
            _, echo = start_server(stack, "echo")
            print(
                f"{'path':<14}{'download MB/s':>15}{'upload MB/s':>13}{'RTT median us':>15}{'RTT p99 us':>12}"
            )
            for name, via in (("same replica", url_b), ("cross replica", stack.url)):
                _, down_port = forward(stack, via, source)
                _, up_port = forward(stack, via, sink)
                _, echo_port = forward(stack, via, echo)
                got, seconds = download(down_port)
                assert got == size, got
                down = size / seconds / 1e6
                started = time.perf_counter()
                send_pattern_and_read(up_port, 2, size, timeout=300)
                up = size / (time.perf_counter() - started) / 1e6
                rtt = sorted(pings(echo_port, args.pings))
                p99 = rtt[int(len(rtt) * 0.99) - 1]
                print(
                    f"{name:<14}{down:>15.0f}{up:>13.0f}{statistics.median(rtt):>15.0f}{p99:>12.0f}",
                    flush=True,
                )

            (root / "ops.toml").write_text(POLICIES)
            tower_toml = str(stack.dir / "tower.toml")
            stack.control_tower("policy", "apply", "--config", tower_toml, str(root / "ops.toml"))
            add_user(stack, "ana", "correct horse battery", "ops")
            delays, commands = [], []
            for _ in range(args.revokes):
                env, stored = login(stack, "ana", "correct horse battery")
                proc, port = forward(stack, stack.url, echo, env=env)
                with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:  # a relayed stream
                    sock.sendall(b"x")
                    sock.recv(1)
                    started = time.monotonic()
                    stack.control_tower("token", "revoke", "--config", tower_toml, stored["accessor"])
                    commands.append(time.monotonic() - started)
                    proc.popen.wait(30)
                    delays.append(time.monotonic() - started)
            print(
                f"revoke (the command's start) -> relayed session closed: median {statistics.median(delays):.2f} s,"
                f" worst {max(delays):.2f} s; the command itself: median {statistics.median(commands):.2f} s"
                f" ({len(delays)} rounds)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
