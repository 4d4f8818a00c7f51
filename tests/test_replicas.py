"""Several ``control-tower serve`` on one store: membership and one live link per site.

Real towers, enforcers and a real PostgreSQL (Debian's, started by the ``pg_cluster``
fixture).  Two replicas (``[cluster] id`` tower and tower-b) share one PostgreSQL
database and one CA.  A site's link is claimed in the store at its HELLO, so:

* a second enforcer with the site's token (a thief) dialling the other replica is
  refused while the real one is connected, as on a single tower;
* once the replica holding the site is killed (SIGKILL: no goodbye), its claim expires
  with its heartbeat and the site connects to the other replica.

On SQLite a second replica is refused with one line (exit 2), and so is a second process
with the same replica id on any store.
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_support import inventory
from pg_cluster import PostgresCluster
from stack import Proc, Stack, program, write_secret

from supctl.errors import ExitCode
from supctl.tower.database.cluster import EXPIRY

SITE, APP, INSTANCE = "replica-site", "web", "web-1"


def second_replica(stack: Stack, replica: str) -> tuple[Proc, str]:
    """Start another ``serve`` of the stack's tower directory as ``replica``; its URL."""
    config = stack.dir / f"{replica}.toml"
    config.write_text((stack.dir / "tower.toml").read_text() + f'\n[cluster]\nid = "{replica}"\n')
    proc = stack.spawn(
        replica, [program("control-tower"), "serve", "--config", str(config), "--listen", "127.0.0.1:0"]
    )
    return proc, proc.log.wait_for(r"listening on (wss://127\.0\.0\.1:\d+)", proc=proc.popen)[1]


@pytest.fixture
def pg_stack(pg_cluster: PostgresCluster, tmp_path: Path) -> Iterator[Stack]:
    name = f"replicas_{time.monotonic_ns() % 10**9}"
    url = pg_cluster.create_database(name)
    try:
        with Stack(tmp_path) as stack:
            stack.start_tower(store=(url, pg_cluster.write_password_file(tmp_path / "store.password")))
            yield stack
    finally:
        pg_cluster.drop_database(name)


def test_one_live_link_per_site_across_replicas_and_takeover_after_a_kill(pg_stack: Stack) -> None:
    stack = pg_stack
    assert stack.tower is not None
    tower_a = stack.tower
    tower_b, url_b = second_replica(stack, "tower-b")
    write_secret(stack.root / f"{SITE}.token", stack.register_site(SITE) + "\n")
    (stack.root / f"{SITE}.toml").write_text(inventory(APP, INSTANCE))
    # The real enforcer knows both replicas; it reaches the first one first.
    enforcer = stack.start_enforcer(SITE, towers=[stack.url, url_b])

    # A thief with the site's token tries the other replica: refused at its HELLO.
    thief = stack.start_enforcer(SITE, towers=[url_b], wait=False)
    refusal = rf"site {SITE} is already connected to replica tower \(from 127\.0\.0\.1:\d+\)"
    thief.log.wait_for(refusal, proc=thief.popen)
    tower_b.log.wait_for(rf"refused a link of site {SITE} from 127\.0\.0\.1:\d+: {refusal}")
    assert tower_b.log.count(rf"site {SITE} connected") == 0
    thief.stop()

    # The replica holding the site dies without a word: the site moves once its claim expired.
    tower_a.popen.send_signal(signal.SIGKILL)
    tower_a.popen.wait(10)
    tower_b.log.wait_for(rf"site {SITE} connected", deadline=EXPIRY.total_seconds() + 30, proc=tower_b.popen)
    assert enforcer.popen.poll() is None


def test_sqlite_serves_one_replica_and_an_id_runs_once(tmp_path: Path) -> None:
    with Stack(tmp_path) as stack:
        stack.start_tower()
        config = stack.dir / "tower-2.toml"
        config.write_text((stack.dir / "tower.toml").read_text() + '\n[cluster]\nid = "tower-2"\n')
        for path, expected in (
            (stack.dir / "tower.toml", r"replica 'tower' is already running \(pid \d+ on .*, heartbeat .* ago\): "
             r"give each replica its own \[cluster\] id"),
            (config, r"the store .*tower\.db is served by control tower 'tower' already \(pid \d+ on .*\); "
             r"a second replica needs a PostgreSQL store"),
        ):  # fmt: skip
            result = subprocess.run(
                [program("control-tower"), "serve", "--config", str(path), "--listen", "127.0.0.1:0"],
                capture_output=True,
                timeout=60,
                env=stack.env,
            )
            assert result.returncode == ExitCode.USAGE, result.stderr
            # One error line (the start-up log line before it is issue 13's to quieten).
            text = result.stderr.decode()
            errors = [line for line in text.splitlines() if line.startswith("control-tower: error: ")]
            assert len(errors) == 1 and "Traceback" not in text, text
            assert re.search(expected, errors[0]), errors[0]
