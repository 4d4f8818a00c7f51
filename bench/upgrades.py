"""Sequential authorised session upgrades against a real tower, and its RSS.

    python bench/upgrades.py [--upgrades 1000] [--users 1000] [--audit-rows 100000]

Starts a real tower (TLS, through the programs on PATH, as the tests' Stack does), one
site with a real enforcer, and ``--users`` users each with an API token and a policy
allowing ``connect`` at the site.  Then, from one client, ``--upgrades`` sequential
WebSocket upgrades to ``.../connect`` with one user's token, each closed at once:
the time of each (TLS handshake, authentication, authorisation, audit record,
upgrade) is what the issue's "1,000 sequential authorised session upgrades" means.
Last, the tower's VmRSS/VmHWM, with ``--audit-rows`` audit records written before the
start (as an old audit.jsonl, imported into the store on a tower that has one).

A benchmark, not a test: nothing is asserted; figures vary with the machine's load,
so compare two trees in alternation (``--rounds``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from stack import Stack, program  # noqa: E402
from websockets.asyncio.client import connect  # noqa: E402

SITE, APP, INSTANCE = "bench-site", "web", "web-1"
POLICY = f'[[policies.operators.rules]]\neffect = "allow"\nverb = "connect"\nsite = "{SITE}"\n'
SUBPROTOCOL = "supctl.v1"


def rss(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of ``pid`` in KiB."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line
    )
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of ``pid`` so far: less sensitive than wall time to what
    else the machine is doing."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def import_into_store(directory: Path) -> None:
    """A tower with a store: the users and audit records written above go into it through
    the store's API (``control-tower migrate`` only imports into a store holding no
    credentials, and init made the admin token)."""
    import datetime

    from supctl.tower import database
    from supctl.tower.database.auditlog import lines_to_rows

    async def run() -> None:
        store = await database.open(directory / "tower.db")
        try:
            now = datetime.datetime.now(datetime.UTC)
            table = json.loads((directory / "users.json").read_text())["users"]
            for name, entry in table.items():
                await store.users.add_hashed(name, entry["password"], entry["policies"], now=now)
            rows, _ = lines_to_rows((directory / "audit.jsonl").read_text().splitlines())
            for start in range(0, len(rows), 5000):
                await store.audit.append_rows(rows[start : start + 5000])
        finally:
            await store.close()

    asyncio.run(run())


def start_tower(stack: Stack, users: int, audit_rows: int) -> str:
    """``control-tower init``; ``users`` users written as an old-style users.json (one
    scrypt hash shared, so that making them takes no time) and the policy file; on a
    tower with a store, they are imported into it (as migrate does); then ``serve``.
    Returns an API token of the last user."""
    from supctl.tower.users import hash_password

    subprocess.run(
        [program("control-tower"), "init", str(stack.dir)], check=True, capture_output=True, env=stack.env
    )
    config = stack.dir / "tower.toml"
    hashed = hash_password("correct horse battery")
    table = {
        f"user{n:04d}": {"password": hashed, "policies": ["operators"], "created": "2026-01-01T00:00:00Z"}
        for n in range(users)
    }
    (stack.dir / "users.json").write_text(json.dumps({"users": table, "tokens": []}))
    (stack.dir / "users.json").chmod(0o600)
    (stack.dir / "policies.toml").write_text(POLICY)
    with (stack.dir / "audit.jsonl").open("w") as f:
        for n in range(audit_rows):
            rec = {
                "time": "2026-01-01T00:00:00Z",
                "event": "session-refused",
                "user": f"user{n % users:04d}",
                "site": SITE,
                "status": 401,
                "result": "401 invalid API token",
                "peer": "127.0.0.1:1",
            }
            f.write(json.dumps(rec) + "\n")
    if (stack.dir / "tower.db").exists():
        import_into_store(stack.dir)
    stack.tower = stack.spawn(
        "tower", [program("control-tower"), "serve", "--config", str(config), "--listen", "127.0.0.1:0"]
    )
    match = stack.tower.log.wait_for(r"listening on (wss://127\.0\.0\.1:(\d+))", proc=stack.tower.popen)
    stack.url = match[1]
    stack.env.update(
        SUPCTL_HOST=stack.url,
        SUPCTL_TOKEN_FILE=str(stack.dir / "admin.token"),
        SUPCTL_CA_FILE=str(stack.dir / "ca.pem"),
    )
    last = f"user{users - 1:04d}"
    return stack.control_tower("token", "add", "--config", str(config), "--user", last).strip()


async def upgrades(url: str, token: str, context: ssl.SSLContext, count: int) -> list[float]:
    path = f"/v1/state/applications/{APP}/service-instances/{INSTANCE}/connect"
    query = f"?site={SITE}&protocol=tcp&port=80"
    times = []
    for _ in range(count):
        start = time.perf_counter()
        async with connect(
            url + path + query,
            ssl=context,
            additional_headers={"Authorization": f"Bearer {token}"},
            subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
            compression=None,
        ):
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--upgrades", type=int, default=1000)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument(
        "--audit-rows", type=int, default=100_000, help="audit records written before the start"
    )
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, Stack(Path(tmp)) as stack:
        token = start_tower(stack, args.users, args.audit_rows)
        assert stack.tower is not None
        stack.add_site(SITE, f'[applications.{APP}.service-instances."{INSTANCE}"]\n')
        context = ssl.create_default_context(cafile=str(stack.dir / "ca.pem"))
        for r in range(args.rounds):
            cpu = cpu_seconds(stack.tower.popen.pid)
            times = asyncio.run(upgrades(stack.url, token, context, args.upgrades))
            cpu = cpu_seconds(stack.tower.popen.pid) - cpu
            total = sum(times)
            p99 = statistics.quantiles(times, n=100)[98]
            print(
                f"round {r + 1}: {args.upgrades} sequential upgrades in {total:.2f} s:"
                f" median {statistics.median(times) * 1000:.2f} ms, p99 {p99 * 1000:.2f} ms;"
                f" tower CPU {cpu:.2f} s"
            )
        now, peak = rss(stack.tower.popen.pid)
        print(f"tower RSS {now / 1024:.0f} MiB (peak {peak / 1024:.0f} MiB)")


if __name__ == "__main__":
    main()
