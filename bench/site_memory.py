"""A tower's memory per idle connected site, from lightweight fake enforcers.

    python bench/site_memory.py [--sites 100 1000 5000]

A real tower (TLS, SQLite store, the programs on PATH, through the tests' Stack), and in
this process as many fake enforcers as the largest step: each is one TLS WebSocket to
``/v1/enforcer`` with its own site token that sends a HELLO (one application, one
instance, the ``tcp`` handler) and then only answers the tower's keepalive pings, as an
idle site does.  At each step (cumulative) the tower's VmRSS is read once its log counts
that many sites connected; the figure is (RSS - RSS with no site) / sites, and the
projection for 10,000 sites is RSS with no site + 10,000 x the largest step's KiB/site.
A benchmark, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import ssl
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import websockets  # noqa: E402
from stack import Stack  # noqa: E402
from websockets.asyncio.client import connect  # noqa: E402

from supctl.protocol import SUBPROTOCOL  # noqa: E402
from supctl.protocol.frames import FrameType, encode  # noqa: E402
from supctl.protocol.messages import encode_hello  # noqa: E402
from supctl.tower.admincmds import with_store  # noqa: E402
from supctl.tower.config import load_config  # noqa: E402
from supctl.tower.directory import utc_now  # noqa: E402

#: Handshakes under way at once: below the tower's unauthenticated connections per address.
CONCURRENT = 32


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def add_sites(stack: Stack, count: int) -> list[tuple[str, str]]:
    config = load_config(stack.dir / "tower.toml")

    async def add(store: Any) -> list[tuple[str, str]]:
        now = utc_now()
        return [(name, await store.sites.add(name, now=now)) for name in (f"idle-{i}" for i in range(count))]

    return with_store(config, add)


async def enforcers(url: str, ca: Path, sites: list[tuple[str, str]], held: list[Any]) -> None:
    context = ssl.create_default_context(cafile=str(ca))
    gate = asyncio.Semaphore(CONCURRENT)

    async def one(site: str, token: str) -> None:
        async with gate:
            ws = await connect(
                f"{url}/v1/enforcer?site={site}",
                ssl=context,
                additional_headers={"Authorization": f"Bearer {token}"},
                subprotocols=[websockets.Subprotocol(SUBPROTOCOL)],
                compression=None,
                ping_interval=None,  # the tower pings; websockets answers
            )
            hello = {"site": site, "version": "bench", "handlers": ["tcp"],
                     "applications": {"web": {"service-instances": {"web-1": {"containers": []}}}}}  # fmt: skip
            await ws.send(encode(FrameType.HELLO, 0, encode_hello(hello)))
            held.append(ws)

    await asyncio.gather(*(one(site, token) for site, token in sites))


async def run(stack: Stack, steps: list[int], sites: list[tuple[str, str]]) -> list[tuple[int, int]]:
    assert stack.tower is not None
    pid, log = stack.tower.popen.pid, stack.tower.log
    held: list[Any] = []
    figures = [(0, rss_kib(pid))]
    done = 0
    for step in steps:
        await enforcers(stack.url, stack.dir / "ca.pem", sites[done:step], held)
        done = step
        end = time.monotonic() + 120
        while log.count(r"site idle-\d+ connected") < step and time.monotonic() < end:
            await asyncio.sleep(0.2)  # polling a log; the deadline bounds it
        await asyncio.sleep(2)  # let allocations settle before reading (not a synchronisation)
        figures.append((step, rss_kib(pid)))
        print(f"{step:>6} sites connected: tower RSS {figures[-1][1] / 1024:.1f} MiB", flush=True)
    for ws in held:
        await ws.close()
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[100, 1000, 5000])
    args = parser.parse_args()
    steps = sorted(args.sites)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, steps[-1] * 2 + 1000)), hard))
    with tempfile.TemporaryDirectory(prefix="site-memory-") as tmp, Stack(Path(tmp)) as stack:
        stack.start_tower()
        started = time.monotonic()
        sites = add_sites(stack, steps[-1])
        print(f"{len(sites)} sites registered in {time.monotonic() - started:.1f} s", flush=True)
        figures = asyncio.run(run(stack, steps, sites))
    base = figures[0][1]
    print(f"\n{'sites':>6} {'tower RSS MiB':>14} {'KiB/site':>9}")
    for count, rss in figures:
        per = f"{(rss - base) / count:.1f}" if count else "-"
        print(f"{count:>6} {rss / 1024:>14.1f} {per:>9}")
    last, last_rss = figures[-1]
    per_site = (last_rss - base) / last
    print(f"projected for 10,000 idle sites: {(base + 10_000 * per_site) / 1024:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
