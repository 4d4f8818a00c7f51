"""What the site's ``logs`` plugin costs: lines/s it takes in, memory it holds, how fast
a full ring is read out, measured in process on the plugin's own classes.

    python bench/logs.py [--lines N] [--json OUT]

* observe: ``N`` lines of 80 bytes (half stdout, half stderr) fed to
  ``LogsHandler.observe``, as the enforcer's supervisor does for each line a container
  writes; lines/s;
* memory: Python's own allocations (tracemalloc) of one ring of ``buffer-bytes`` 1 MiB
  and 64 MiB, filled with those lines, next to the setting: the ring must stay within it;
* read-out: a full 64 MiB ring encoded into the stream's records (``--tail`` of
  everything), MB/s of records.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

sys.path[:0] = [str(Path(__file__).resolve().parent.parent / p) for p in ("", "plugins")]

from supctl_logs.book import Book  # noqa: E402
from supctl_logs.handler import BATCH_BYTES, LogsHandler, _encode  # noqa: E402

from supctl.enforcer.api import ContainerOutput  # noqa: E402

LINE = b"x" * 79
KEY = ("popcorn", "popcorn-1", "web")
MiB = 1024 * 1024


def observe_rate(lines: int) -> float:
    handler = LogsHandler()
    handler.configure({"buffer-bytes": 64 * MiB})
    news = [ContainerOutput(*KEY, 1 + i % 2, LINE, 1.0) for i in range(1000)]
    began = time.perf_counter()
    for _ in range(lines // 1000):
        for item in news:
            handler.observe(item)
    return lines / (time.perf_counter() - began)


def held(capacity: int) -> tuple[int, int]:
    """(bytes Python holds for one full ring of ``capacity``, lines in it)."""
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    book = Book("web", capacity)
    for i in range(capacity // 60):  # more than fit: the ring keeps the newest
        book.add(1 + i % 2, b"%079d" % i, float(i))  # each line its own object, as read
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return used, len(book)


def read_out() -> float:
    book = Book("web", 64 * MiB)
    for i in range(64 * MiB // 200):
        book.add(1 + i % 2, b"%079d" % i, float(i))
    cursor, sent = book.start(None, None), 0
    began = time.perf_counter()
    while cursor < book.end:
        dropped, entries, cursor = book.read(cursor, BATCH_BYTES)
        sent += len(_encode(dropped, entries, 2.0))
    return sent / (time.perf_counter() - began) / 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results: dict[str, Any] = {"observe lines/s": round(observe_rate(args.lines))}
    for capacity in (MiB, 64 * MiB):
        used, lines = held(capacity)
        name = f"ring of {capacity // MiB} MiB"
        results[f"{name}: Python bytes held"] = used
        results[f"{name}: lines of 80 B held"] = lines
        results[f"{name}: within its setting"] = used <= capacity
    results["read-out of a full 64 MiB ring, MB/s of records"] = round(read_out(), 1)
    width = max(map(len, results))
    for name, value in results.items():
        print(f"{name:<{width}}  {value}")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    within = all(v for k, v in results.items() if k.endswith("within its setting"))
    print(("PASS" if within else "FAIL") + "  logs rings stay within buffer-bytes")
    return 0 if within else 1


if __name__ == "__main__":
    sys.exit(main())
