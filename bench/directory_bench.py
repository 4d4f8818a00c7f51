"""The tower's in-memory directory (supctl.tower.directory) on SQLite and PostgreSQL.

    python bench/directory_bench.py [--backend sqlite|postgresql]... [--checks N]

For each backend: the time of ``Directory.fresh()`` on an unchanged store (one
``SELECT generation``: what every request and the 0.25 s poll pay), of a full load with
1,000 users and 10,000 login tokens (what a write by another process costs the tower),
of a token check in memory, and the RSS of the loaded directory.  PostgreSQL runs in a
throwaway cluster (tests/pg_cluster.py, fsync on, Unix socket).  A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy import insert

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from supctl.tower import database  # noqa: E402
from supctl.tower.database.schema import user_tokens, users  # noqa: E402
from supctl.tower.directory import Directory  # noqa: E402
from supctl.tower.store import hash_token  # noqa: E402
from supctl.tower.users import hash_password  # noqa: E402

USERS, TOKENS = 1000, 10_000


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def ms(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "median_ms": round(statistics.median(ordered) * 1e3, 3),
        "p99_ms": round(ordered[int(len(ordered) * 0.99) - 1] * 1e3, 3),
    }


async def bench(target: str, password: Path | None, checks: int) -> dict[str, Any]:
    now = datetime.datetime.now(datetime.UTC)
    await database.create(target, password_file=password)
    store = await database.open(target, password_file=password)
    hashed = await asyncio.to_thread(hash_password, "benchmark")
    tokens = [f"sct_login_bench{i}" for i in range(TOKENS)]
    async with store.db.write(bump=True) as conn:  # in bulk: the benchmark is the load, not the adds
        await conn.execute(
            insert(users),
            [
                {"name": f"user{i}", "password": hashed, "policies": ["ops"], "created": now}
                for i in range(USERS)
            ],
        )
        rows = []
        for i, token in enumerate(tokens):
            digest = hash_token(token)
            rows.append({"hash": digest, "accessor": digest[:8], "user_name": f"user{i % USERS}", "kind": "login",
                         "created": now, "expires": now + datetime.timedelta(hours=8), "revoked": None})  # fmt: skip
        await conn.execute(insert(user_tokens), rows)
    before = rss_mib()
    loads = []
    for _ in range(20):
        start = time.perf_counter()
        directory = await Directory.load(store)
        loads.append(time.perf_counter() - start)
    loaded = rss_mib()
    fresh = []
    for _ in range(checks):
        start = time.perf_counter()
        await directory.fresh()
        fresh.append(time.perf_counter() - start)
    assert directory.reloads == 0
    in_memory = []
    for i in range(checks):
        start = time.perf_counter()
        assert directory.check_token(tokens[i % TOKENS]) is not None
        in_memory.append(time.perf_counter() - start)
    await store.close()
    return {
        "fresh_unchanged": ms(fresh),
        "full_load": ms(loads),
        "check_token_in_memory_us": round(statistics.median(in_memory) * 1e6, 2),
        "rss_mib_before_load": round(before, 1),
        "rss_mib_loaded": round(loaded, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", action="append", choices=("sqlite", "postgresql"))
    parser.add_argument("--checks", type=int, default=1000)
    args = parser.parse_args()
    for backend in args.backend or ["sqlite", "postgresql"]:
        with tempfile.TemporaryDirectory(prefix="supctl-directory-bench-") as tmp:
            if backend == "sqlite":
                result = asyncio.run(bench(str(Path(tmp) / "tower.db"), None, args.checks))
            else:
                from pg_cluster import PostgresCluster, find_bindir

                bindir = find_bindir()
                if bindir is None:
                    print("postgresql: not installed")
                    continue
                with PostgresCluster(bindir, durable=True) as cluster:
                    url = cluster.create_database("bench")
                    password = cluster.write_password_file(Path(tmp) / "password")
                    result = asyncio.run(bench(url, password, args.checks))
        print(f"{backend}: {json.dumps(result)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
