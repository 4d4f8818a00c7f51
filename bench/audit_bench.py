"""The audit writer (supctl.tower.auditsink): what ``append`` costs the event loop, how many
records a second the writer sustains, and how late the loop runs while it writes.

    python bench/audit_bench.py [--records 50000] [--backend sqlite|postgresql|both]

SQLite is a file in a temporary directory (WAL, synchronous=FULL, as the tower runs it);
PostgreSQL runs in a throwaway cluster (tests/pg_cluster.py) with fsync on, on a Unix
socket.  A benchmark, not a test: nothing is asserted, figures vary with the machine's load.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from pg_cluster import PostgresCluster, find_bindir  # noqa: E402

from supctl.tower import audit, database  # noqa: E402
from supctl.tower.auditsink import BATCH, AuditSink  # noqa: E402


def stream_record(i: int) -> dict[str, Any]:
    """A realistic record: a finished connect stream, every route field set."""
    return audit.record(
        "stream-closed",
        session="242b030a",
        stream=i,
        user=f"user{i % 100}",
        accessor="1423b9e3",
        client="127.0.0.1:42090",
        site="paris-1",
        application="popcorn",
        service_instance="popcorn-1",
        verb="connect",
        protocol="tcp",
        target="127.0.0.1:443",
        result="ok",
        close_reason="eof",
        bytes_up=300017,
        bytes_down=1234567,
        duration=0.017,
    )


async def lag_probe(samples: list[float], stop: asyncio.Event) -> None:
    """How late a 1 ms timer fires: the loop's stalls while the writer works."""
    while not stop.is_set():
        start = time.perf_counter()
        await asyncio.sleep(0.001)
        samples.append(time.perf_counter() - start - 0.001)


async def bench(
    target: str, password_file: Path | None, count: int, batch: int, rate: float
) -> dict[str, Any]:
    store = await database.open(target, password_file=password_file)
    result: dict[str, Any] = {}
    try:
        # Memory of a full queue (nothing written: the writer is not started).
        idle = AuditSink(store.audit)
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for i in range(idle.capacity):
            idle.append(stream_record(i))
        result["queued_bytes_per_record"] = (tracemalloc.get_traced_memory()[0] - before) // idle.capacity
        tracemalloc.stop()
        idle.close()

        sink = AuditSink(store.audit, batch=batch)
        sink.start()
        costs: list[float] = []
        lags: list[float] = []
        stop = asyncio.Event()
        probe = asyncio.create_task(lag_probe(lags, stop))
        start = time.perf_counter()
        produced = 0
        while produced < count:
            # Keep the queue below the admission mark, as a tower that is not refusing would,
            # and yield after every 50 appends (a tower makes records between other work).
            chunk = 0
            while produced < count and sink.waiting < sink.admit - 1 and chunk < 50:
                chunk += 1
                rec = stream_record(produced)  # made as the tower makes it, then handed over
                t0 = time.perf_counter()
                taken = sink.append(rec)
                costs.append(time.perf_counter() - t0)
                assert taken
                produced += 1
            # rate 0: flat out; else paced, as a tower making that many records a second
            await asyncio.sleep(max(0.0, start + produced / rate - time.perf_counter()) if rate else 0)
        while sink.waiting:
            await asyncio.sleep(0.001)
        elapsed = time.perf_counter() - start
        stop.set()
        await probe
        lost = await sink.stop()
        costs.sort()
        lags.sort()
        result.update(
            records=count,
            lost=lost,
            records_per_second=round(count / elapsed),
            append_us_median=round(statistics.median(costs) * 1e6, 1),
            append_us_p99=round(costs[int(len(costs) * 0.99)] * 1e6, 1),
            loop_lag_ms_median=round(statistics.median(lags) * 1e3, 2),
            loop_lag_ms_p99=round(lags[int(len(lags) * 0.99)] * 1e3, 2),
            loop_lag_ms_max=round(lags[-1] * 1e3, 1),
        )
    finally:
        await store.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=50_000)
    parser.add_argument("--backend", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--batch", type=int, default=BATCH, help="most records per transaction")
    parser.add_argument("--rate", type=float, default=0, help="records a second (0: flat out)")
    args = parser.parse_args()
    if args.backend in ("sqlite", "both"):
        with tempfile.TemporaryDirectory(prefix="supctl-audit-bench-") as tmp:
            target = str(Path(tmp) / "tower.db")
            asyncio.run(database.create(target))
            print("sqlite    ", asyncio.run(bench(target, None, args.records, args.batch, args.rate)))
    if args.backend in ("postgresql", "both"):
        bindir = find_bindir()
        if bindir is None:
            print("postgresql: not installed")
            return
        with PostgresCluster(bindir, durable=True) as cluster, tempfile.TemporaryDirectory() as tmp:
            url = cluster.create_database("bench")
            password = cluster.write_password_file(Path(tmp) / "pw")
            asyncio.run(database.create(url, password_file=password))
            print("postgresql", asyncio.run(bench(url, password, args.records, args.batch, args.rate)))


if __name__ == "__main__":
    main()
