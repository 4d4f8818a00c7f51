"""Seconds from ``kill -9`` of the replica holding a site to the site usable on another.

    python bench/replica_takeover.py [--rounds 10]

Two replicas (``[cluster] id`` tower and tower-b, then a fresh one each round) of one
tower directory on a throwaway PostgreSQL (tests/pg_cluster.py, fsync on), one site
whose enforcer is given both URLs (``--tower`` twice), the programs on PATH.  Each round
SIGKILLs the replica holding the site and times, from the kill, until the other one logs
``site NAME connected``: the claim's expiry (4 s, ``database/cluster.py``) plus the
enforcer's reconnection delay.  The killed replica is started again (under a new id) before the
next round.  Median and worst.  A benchmark, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from e2e_support import inventory  # noqa: E402
from pg_cluster import PostgresCluster, find_bindir  # noqa: E402
from stack import Proc, Stack, program, write_secret  # noqa: E402

SITE = "takeover-site"


def replica(stack: Stack, name: str, port: int) -> Proc:
    config = stack.dir / f"{name}.toml"
    config.write_text((stack.dir / "tower.toml").read_text() + f'\n[cluster]\nid = "{name}"\n')
    proc = stack.spawn(
        name, [program("control-tower"), "serve", "--config", str(config), "--listen", f"127.0.0.1:{port}"]
    )
    proc.log.wait_for(r"listening on wss://", proc=proc.popen)
    return proc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    bindir = find_bindir()
    if bindir is None:
        print("PostgreSQL is not installed (apt-get install postgresql)", file=sys.stderr)
        return 1
    times: list[float] = []
    with tempfile.TemporaryDirectory(prefix="takeover-") as tmp, PostgresCluster(bindir, durable=True) as pg:
        root = Path(tmp)
        url = pg.create_database("takeover")
        with Stack(root) as stack:
            port_a = stack.start_tower(store=(url, pg.write_password_file(root / "store.password")))
            assert stack.tower is not None
            ports = [port_a, 0]
            procs = [stack.tower, replica(stack, "tower-b", 0)]
            ports[1] = int(procs[1].log.wait_for(r"listening on wss://127\.0\.0\.1:(\d+)")[1])
            # Both on fixed ports from now on, so that the enforcer's two URLs stay right.
            procs[1].stop()
            procs[1] = replica(stack, "tower-b", ports[1])
            write_secret(root / f"{SITE}.token", stack.register_site(SITE) + "\n")
            (root / f"{SITE}.toml").write_text(inventory("web", "web-1"))
            stack.start_enforcer(SITE, towers=[f"wss://127.0.0.1:{p}" for p in ports])
            holder = 0
            for number in range(args.rounds):
                other = 1 - holder
                before = procs[other].log.count(rf"site {SITE} connected")
                killed = time.monotonic()
                procs[holder].popen.send_signal(signal.SIGKILL)
                procs[holder].popen.wait(10)
                procs[other].log.wait_for(
                    rf"(?s)(site {SITE} connected.*){{{before + 1}}}", deadline=120, proc=procs[other].popen
                )
                times.append(time.monotonic() - killed)
                print(f"round {number + 1}: {times[-1]:.2f} s", flush=True)
                procs[holder] = replica(stack, f"tower-r{number}", ports[holder])
                holder = other
    print(f"kill -9 of the holding replica -> site connected to the other: median {statistics.median(times):.2f} s,"
          f" worst {max(times):.2f} s ({len(times)} rounds)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
