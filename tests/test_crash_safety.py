"""``kill -9`` of the tower during a burst of writes, on SQLite and on PostgreSQL.

Eight clients log in again and again and make an audited request with each new token
(``show``), while ``control-tower user add`` adds users from another process.  Once
enough logins were answered the tower is killed (SIGKILL: no handler, no flush).  Then:

* the store opens (SQLite: ``PRAGMA integrity_check`` says ok) and a new tower serves it;
* every token the killed tower answered still works, every user a finished
  ``user add`` created is there;
* audit records the tower had queued but not yet written are lost (its writer commits
  at most every 0.2 s, docs/audit.md): the test counts them and bounds them.

PostgreSQL runs with fsync on here (a server of this module's own), as in production.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sqlite3
import ssl
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from e2e_support import wait_until
from pg_cluster import PostgresCluster
from stack import Stack, program
from tower_raw import basic, client_tls

from supctl.tower import admincmds
from supctl.tower.config import load_config

PASSWORD = "correct horse battery staple"
CLIENTS = 8
#: Logins answered before the kill: enough that the kill lands among writes in flight.
ANSWERED_BEFORE_KILL = 40
VIEWER = '[[policies.viewer.rules]]\neffect = "allow"\nverb = "show"\n'


@dataclass
class Burst:
    """What the killed tower answered (the only things it promised)."""

    tokens: dict[str, str] = field(default_factory=dict)  # accessor -> token
    shown: int = 0
    users: list[str] = field(default_factory=list)  # made by control-tower user add (exit 0)
    killed: threading.Event = field(default_factory=threading.Event)


async def call(
    port: int, path: str, authorization: str, context: ssl.SSLContext, local: str
) -> tuple[int, bytes]:
    """``GET path``; (status, body), (0, b"") when the tower is gone."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                "127.0.0.1", port, ssl=context, local_addr=(local, 0), server_hostname="127.0.0.1"
            ),
            10,
        )
    except (OSError, ssl.SSLError, TimeoutError):
        return 0, b""
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {authorization}\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        status = re.match(rb"HTTP/1\.1 (\d{3}) ", head)
        length = re.search(rb"(?i)\r\ncontent-length: (\d+)\r\n", head)
        body = await asyncio.wait_for(reader.readexactly(int(length[1])), 30) if length else b""
        return (int(status[1]) if status else 0), body
    except (OSError, ssl.SSLError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        return 0, b""
    finally:
        writer.close()


async def client(port: int, context: ssl.SSLContext, index: int, burst: Burst) -> None:
    """Log in as user ``c{index}``, use the token, again, until the tower is gone."""
    local = f"127.0.0.{index + 2}"  # an address of its own: the login throttle counts per address
    while True:
        status, body = await call(port, "/v1/login", basic(f"c{index}", PASSWORD), context, local)
        if status != 200:
            assert status == 0 and burst.killed.is_set(), (status, body)
            return
        answer = json.loads(body)
        burst.tokens[answer["accessor"]] = answer["token"]
        status, body = await call(port, "/v1/state/sites", f"Bearer {answer['token']}", context, local)
        if status != 200:
            assert status == 0 and burst.killed.is_set(), (status, body)
            return
        burst.shown += 1


def add_users(stack: Stack, burst: Burst) -> None:
    """``control-tower user add`` from another process, one user after another, until the kill."""
    config = str(stack.dir / "tower.toml")
    n = 0
    while not burst.killed.is_set():
        name = f"cli{n}"
        n += 1
        result = subprocess.run(
            [program("control-tower"), "user", "add", "--config", config, name],
            input=PASSWORD + "\n", text=True, capture_output=True, env=stack.env, timeout=60, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        burst.users.append(name)


def kill_during_a_burst(stack: Stack, port: int) -> Burst:
    assert stack.tower is not None
    burst = Burst()
    adder = threading.Thread(target=add_users, args=(stack, burst), daemon=True)
    adder.start()
    context = client_tls(stack)

    async def main() -> None:
        clients = [asyncio.create_task(client(port, context, i, burst)) for i in range(CLIENTS)]
        while len(burst.tokens) < ANSWERED_BEFORE_KILL:
            assert not any(c.done() for c in clients), [c.exception() for c in clients if c.done()]
            await asyncio.sleep(0.01)  # polling a counter; the clients' own timeouts bound the test
        burst.killed.set()
        assert stack.tower is not None
        os.kill(stack.tower.popen.pid, signal.SIGKILL)
        await asyncio.gather(*clients)

    asyncio.run(main())
    adder.join(60)
    assert stack.tower.popen.wait(10) == -signal.SIGKILL
    return burst


def setup_tower(stack: Stack, store: tuple[str, Path] | None) -> int:
    port = stack.start_tower({"tokens-per-user": 10_000}, store=store)
    config = str(stack.dir / "tower.toml")
    (stack.root / "viewer.toml").write_text(VIEWER)
    stack.control_tower("policy", "apply", "--config", config, str(stack.root / "viewer.toml"))
    # In this process, through the admin command's own function: the test is about the
    # tower's writes, and eight `control-tower user add` processes cost 4 s of start-up.
    tower_config = load_config(config)
    for i in range(CLIENTS):
        admincmds.add_user(tower_config, f"c{i}", PASSWORD, ["viewer"])
    return port


def check_after_restart(stack: Stack, burst: Burst) -> tuple[int, int]:
    """Restart the tower on the store the killed one left; (login records lost, logins answered)."""
    port = stack.start_tower(init=False)
    context = client_tls(stack)

    async def statuses() -> list[int]:
        calls = [
            call(port, "/v1/state/sites", f"Bearer {token}", context, "127.0.0.1")
            for token in burst.tokens.values()
        ]
        return [status for status, _ in await asyncio.gather(*calls)]

    assert asyncio.run(statuses()) == [200] * len(burst.tokens)
    config = str(stack.dir / "tower.toml")
    users = {
        u["name"] for u in json.loads(stack.control_tower("user", "list", "--config", config, "-o", "json"))
    }
    assert set(burst.users) <= users, set(burst.users) - users
    tokens = json.loads(stack.control_tower("token", "list", "--config", config, "-o", "json"))
    live = {t["accessor"] for t in tokens if not t["revoked"]}
    assert set(burst.tokens) <= live
    logins = {r["accessor"] for r in stack.audit_records() if r["event"] == "login"}
    lost = len(set(burst.tokens) - logins)
    print(f"answered {len(burst.tokens)} logins and {burst.shown} shows; {len(burst.users)} users added;")
    print(f"login records lost with the killed tower: {lost}")
    return lost, len(burst.tokens)


def test_kill_9_on_sqlite_loses_no_committed_token(tmp_path: Path) -> None:
    with Stack(tmp_path) as stack:
        port = setup_tower(stack, None)
        burst = kill_during_a_burst(stack, port)
        db = sqlite3.connect(
            stack.dir / "tower.db"
        )  # read-write: it recovers the WAL as the next tower would
        try:
            assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        finally:
            db.close()
        lost, answered = check_after_restart(stack, burst)
        assert lost < answered  # records of at most the last 0.2 s: most were written


@pytest.fixture(scope="module")
def durable_cluster(pg_cluster: PostgresCluster) -> Iterator[PostgresCluster]:
    with PostgresCluster(pg_cluster.bindir, durable=True) as cluster:
        yield cluster


def test_kill_9_on_postgresql_loses_no_committed_token(
    durable_cluster: PostgresCluster, tmp_path: Path
) -> None:
    url = durable_cluster.create_database("crash")
    with Stack(tmp_path) as stack:
        port = setup_tower(stack, (url, durable_cluster.write_password_file(tmp_path / "pw")))
        burst = kill_during_a_burst(stack, port)
        # The killed tower's connections are gone from the server's view before the next start.
        wait_until(
            lambda: (
                durable_cluster.sql("SELECT count(*) FROM pg_stat_activity WHERE usename = 'tower'") == "0"
            ),
            20,
            "the server to see the killed tower's connections close",
        )
        lost, answered = check_after_restart(stack, burst)
        assert lost < answered
