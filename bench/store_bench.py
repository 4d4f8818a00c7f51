"""The tower's store (supctl.tower.database) on SQLite and PostgreSQL, beside the JSON files.

    python bench/store_bench.py [--backend sqlite|postgresql]... [--checks N] [--audit N]

For each backend, in a process of its own (so that RSS is the backend's alone):

* token checks: N sequential checks of one valid login token among 1,000 users' tokens
  (what every session upgrade costs), median and p99 in microseconds;
* audit appends: N records in batches of 50 (one transaction each, as the tower's batcher
  would) and, for contrast, N/10 records one transaction each;
* RSS (VmRSS, VmHWM) after loading 1,000 users with a token each and 100,000 audit rows,
  then querying the newest 1,000 rows of one user.

PostgreSQL runs in a throwaway cluster (tests/pg_cluster.py) with fsync on, as deployed,
on a Unix socket; its server processes are not in the RSS.  (The JSON files it was
compared with are gone: their figures are in docs/store.md.)  A benchmark, not a test:
nothing is asserted, figures vary with the machine's load.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from supctl.tower.audit import record  # noqa: E402
from supctl.tower.users import hash_password  # noqa: E402

USERS = 1000
AUDIT_ROWS = 100_000
BATCH = 50


def rss_kib() -> dict[str, int]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def micros(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "median_us": round(statistics.median(ordered) * 1e6, 1),
        "p99_us": round(ordered[int(len(ordered) * 0.99) - 1] * 1e6, 1),
        "total_s": round(sum(ordered), 3),
    }


def audit_records(n: int, start: int = 0) -> list[dict[str, Any]]:
    now = datetime.datetime.now(datetime.UTC)
    out = []
    for i in range(start, start + n):
        rec = record("stream-closed", user=f"user{i % USERS}", site=f"site-{i % 20}", result="ok")
        rec["time"] = (now + datetime.timedelta(milliseconds=i)).isoformat(timespec="milliseconds")
        rec.update({"bytes-up": i, "bytes-down": 2 * i, "close-reason": "eof", "verb": "connect"})
        out.append(rec)
    return out


async def bench_store(target: str, password_file: Path | None, checks: int, appends: int) -> dict[str, Any]:
    from supctl.tower import database

    result: dict[str, Any] = {"rss_start_kib": rss_kib()}
    now = datetime.datetime.now(datetime.UTC)
    await database.create(target, password_file=password_file)
    store = await database.open(target, password_file=password_file)
    try:
        hashed = await asyncio.to_thread(hash_password, "benchmark")  # one scrypt, shared by all
        tokens = []
        for i in range(USERS):
            await store.users.add_hashed(f"user{i}", hashed, ["ops"], now=now)
            issued = await store.tokens.add(f"user{i}", "login", datetime.timedelta(hours=8), now=now)
            tokens.append(issued.token)
        token = tokens[USERS // 2]
        samples = []
        for _ in range(checks):
            start = time.perf_counter()
            identity = await store.tokens.check(token, now=now)
            samples.append(time.perf_counter() - start)
            assert identity is not None
        result["token_check"] = micros(samples)

        records = audit_records(appends)
        start = time.perf_counter()
        for i in range(0, appends, BATCH):
            await store.audit.append(records[i : i + BATCH])
        elapsed = time.perf_counter() - start
        result["audit_batched"] = {"records": appends, "total_s": round(elapsed, 3),
                                   "per_record_us": round(elapsed / appends * 1e6, 1)}  # fmt: skip
        singles = audit_records(appends // 10)
        start = time.perf_counter()
        for rec in singles:
            await store.audit.append([rec])
        elapsed = time.perf_counter() - start
        result["audit_single"] = {
            "records": len(singles),
            "per_record_ms": round(elapsed / len(singles) * 1e3, 2),
        }

        have = await store.audit.count()
        for i in range(have, AUDIT_ROWS, 1000):
            await store.audit.append(audit_records(min(1000, AUDIT_ROWS - i), i))
        start = time.perf_counter()
        rows = await store.audit.query(user="user7", limit=1000)
        result["audit_query_one_user_ms"] = round((time.perf_counter() - start) * 1e3, 1)
        result["audit_rows"] = await store.audit.count()
        assert rows
        result["rss_loaded_kib"] = rss_kib()
    finally:
        await store.close()
    return result


def run_one(backend: str, checks: int, appends: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="supctl-store-bench-") as tmp:
        directory = Path(tmp)
        if backend == "sqlite":
            return asyncio.run(bench_store(str(directory / "tower.db"), None, checks, appends))
        from pg_cluster import PostgresCluster, find_bindir

        bindir = find_bindir()
        if bindir is None:
            return {"error": "PostgreSQL is not installed"}
        with PostgresCluster(bindir, durable=True) as cluster:
            url = cluster.create_database("bench")
            password = cluster.write_password_file(directory / "password")
            return asyncio.run(bench_store(url, password, checks, appends))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--backend", action="append", choices=("sqlite", "postgresql"))
    parser.add_argument("--checks", type=int, default=1000)
    parser.add_argument("--audit", type=int, default=1000, help="records appended in batches of 50")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # one backend in this process, result as JSON on stdout
        print(json.dumps(run_one(args.child, args.checks, args.audit)))
        return 0
    results: dict[str, dict[str, Any]] = {}
    for backend in args.backend or ["sqlite", "postgresql"]:
        command = [sys.executable, __file__, "--child", backend, "--checks", str(args.checks),
                   "--audit", str(args.audit)]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, timeout=1800, check=False)
        if done.returncode != 0:
            results[backend] = {"error": done.stderr.strip().splitlines()[-1:]}
        else:
            results[backend] = json.loads(done.stdout)
        print(f"{backend}: {json.dumps(results[backend])}", flush=True)
    show: Callable[[str], None] = print
    show("")
    show(f"{'backend':<11} {'check med/p99 us':>18} {'audit batched us/rec':>21} {'audit 1/tx ms':>14} "
         f"{'RSS start MiB':>14} {'RSS loaded MiB':>15}")  # fmt: skip
    for backend, r in results.items():
        if "error" in r:
            show(f"{backend:<11} error: {r['error']}")
            continue
        check = r["token_check"]
        batched = r.get("audit_batched", {}).get("per_record_us", "-")
        single = r["audit_single"]["per_record_ms"]
        start, loaded = r["rss_start_kib"]["VmRSS"] / 1024, r["rss_loaded_kib"]["VmRSS"] / 1024
        show(f"{backend:<11} {check['median_us']:>8} / {check['p99_us']:<8} {batched:>21} {single:>14} "
             f"{start:>14.1f} {loaded:>15.1f}")  # fmt: skip
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
