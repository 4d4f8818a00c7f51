"""The tower's audit log (docs/audit.md) end to end: records match what happened.

One real stack for the module: a tower and site ``audit-site`` (host network, a
``shell`` container).  A connect session moves known byte counts each way, an exec
session runs ``printf abc; exit 3``, refused requests are tried; the store (tower.db)
then holds exactly those facts, never a token, and ``control-tower audit`` filters
it.  Last, the store is locked under the running tower: new sessions are refused,
running ones relay on.  The writer itself, on SQLite and PostgreSQL: test_auditsink.py.
"""

from __future__ import annotations

import datetime
import http.client
import json
import os
import socket
import sqlite3
import ssl
import stat
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from e2e_support import start_server, wait_until
from exec_support import exec_args
from stack import LogFile, Stack, do_args, one_line_error, program

from supctl.errors import ExitCode
from supctl.tower import audit
from supctl.tower.audit import FIELDS, parse_since
from supctl.tower.config import load_config
from supctl.tower.store import hash_token

SITE = "audit-site"
APP = "app"
INST = "inst"
SHELL = "shell"
UP = 300_017  # bytes the client sends through the connect stream
DOWN = 1_234_567  # bytes the server sends back
COMMAND = "printf abc; exit 3"
BAD_TOKEN = "sct_admin_this-is-not-a-valid-token-0123456789"

Record = dict[str, Any]


@dataclass
class Env:
    stack: Stack
    sink_port: int
    admin_token: str
    site_token: str
    accessor: str

    @property
    def config(self) -> str:
        return str(self.stack.dir / "tower.toml")

    @property
    def path(self) -> Path:
        return self.stack.dir / "tower.db"

    def records(self) -> list[Record]:
        return self.stack.audit_records()

    def wait_record(self, predicate: Callable[[Record], bool], what: str) -> Record:
        def found() -> Record | None:
            return next((r for r in self.records() if predicate(r)), None)

        rec = wait_until(found, 20.0, what)
        assert rec is not None
        return rec

    def audit_cli(self, *args: str) -> list[Record]:
        out = self.stack.control_tower("audit", "--config", self.config, *args)
        return [json.loads(line) for line in out.splitlines()]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    with Stack(tmp_path_factory.mktemp("audit")) as stack:
        stack.start_tower()
        stack.add_site(
            SITE,
            f'[applications.{APP}.service-instances.{INST}]\nruntime = "host"\n'
            f"[applications.{APP}.service-instances.{INST}.containers.{SHELL}]\n",
        )
        _, sink_port = start_server(stack, "sink-source", "--seed", "7", "--size", str(DOWN))
        admin_token = (stack.dir / "admin.token").read_text().strip()
        yield Env(
            stack=stack,
            sink_port=sink_port,
            admin_token=(stack.dir / "admin.token").read_text().strip(),
            site_token=(stack.root / f"{SITE}.token").read_text().strip(),
            accessor=hash_token(admin_token)[:8],
        )


def _connect_stream(port: int, payload: bytes) -> int:
    """One connection through a forward: send ``payload``, half-close, count what comes back."""
    received = 0
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        while data := sock.recv(1 << 16):
            received += len(data)
    return received


def test_connect_stream_bytes_match(env: Env) -> None:
    forward, port = env.stack.forward(
        *do_args(SITE, APP, INST, "connect", "tcp", str(env.sink_port), "--bind", "0")
    )
    assert _connect_stream(port, os.urandom(UP)) == DOWN
    target = f"127.0.0.1:{env.sink_port}"
    closed = env.wait_record(
        lambda r: r["event"] == "stream-closed" and r["target"] == target, "the connect stream's record"
    )
    assert closed["bytes-up"] == UP and closed["bytes-down"] == DOWN, closed
    assert (closed["result"], closed["close-reason"]) == ("ok", "eof"), closed
    assert (closed["verb"], closed["protocol"], closed["site"]) == ("connect", "tcp", SITE)
    assert (closed["application"], closed["service-instance"], closed["container"]) == (APP, INST, None)
    assert (closed["user"], closed["accessor"]) == ("admin", env.accessor)
    assert closed["client"].startswith("127.0.0.1:")
    assert 0 <= closed["duration"] < 60
    assert closed["command"] is None and closed["exit-code"] is None
    [accepted] = [r for r in env.records() if r["event"] == "session-accepted" and r["target"] == target]
    assert accepted["session"] == closed["session"] and accepted["client"] == closed["client"]
    assert (accepted["result"], accepted["status"], accepted["bytes-up"]) == ("ok", None, None)
    assert accepted["path"] == f"/v1/state/applications/{APP}/service-instances/{INST}/connect"
    # Every record has every field, in order; times are ISO 8601 UTC.
    for rec in env.records():
        assert tuple(rec) == FIELDS, rec
        assert datetime.datetime.fromisoformat(rec["time"]).utcoffset() == datetime.timedelta(0)
    forward.stop()


def test_refused_stream_is_recorded(env: Env) -> None:
    """A stream the site refuses (nothing listens on the port) ends with the site's reason."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]  # bound, never listening: connections are refused
        forward, port = env.stack.forward(
            *do_args(SITE, APP, INST, "connect", "tcp", str(closed_port), "--bind", "0")
        )
        with pytest.raises(ConnectionResetError):  # the refusal reaches the client as a reset
            _connect_stream(port, b"hello")
        rec = env.wait_record(
            lambda r: r["event"] == "stream-closed" and r["target"] == f"127.0.0.1:{closed_port}",
            "the refused stream's record",
        )
    assert rec["close-reason"] == "site-reset", rec
    assert "connection refused by 127.0.0.1:" in rec["result"], rec
    assert rec["bytes-down"] == 0 and rec["bytes-up"] <= 5
    forward.stop()


def test_exec_records_command_and_exit_status(env: Env) -> None:
    result = env.stack.supctl(*exec_args(SITE, APP, INST, SHELL, COMMAND))
    assert (result.returncode, result.stdout) == (3, b"abc"), result.stderr
    rec = env.wait_record(
        lambda r: r["event"] == "stream-closed" and r["command"] == COMMAND, "the exec stream's record"
    )
    assert rec["verb"] == "exec"
    assert (rec["exit-code"], rec["exit-signal"]) == (3, None)
    assert (rec["container"], rec["target"], rec["protocol"]) == (SHELL, None, None)
    # Stream bytes: no stdin; "abc" as one output record (a 5-byte header, then the bytes).
    assert (rec["bytes-up"], rec["bytes-down"]) == (0, 5 + 3), rec
    assert rec["result"] == "ok", rec
    [accepted] = [
        r for r in env.records() if r["event"] == "session-accepted" and r["session"] == rec["session"]
    ]
    assert (accepted["verb"], accepted["container"]) == ("exec", SHELL)
    assert accepted["command"] is None  # known only once the stream opens


def test_refusals_are_recorded_with_status(env: Env, tmp_path: Path) -> None:
    bad = tmp_path / "bad.token"
    bad.write_text(BAD_TOKEN + "\n")
    args = do_args(SITE, APP, INST, "connect", "tcp", "9", "--bind", "0")
    result = env.stack.supctl(*args, env=dict(env.stack.env, SUPCTL_TOKEN_FILE=str(bad)))
    assert result.returncode == ExitCode.DENIED, result.stderr
    assert "invalid API token" in one_line_error(result.stderr)
    rec = env.wait_record(
        lambda r: r["event"] == "session-refused" and r["status"] == 401, "the bad token's refusal"
    )
    assert rec["result"] == "401 invalid API token"
    assert (rec["user"], rec["accessor"]) == (None, None)
    requested = (rec["site"], rec["verb"], rec["application"], rec["target"])
    assert requested == (SITE, "connect", APP, "127.0.0.1:9")

    result = env.stack.supctl(*do_args("no-such-site", APP, INST, "connect", "tcp", "9", "--bind", "0"))
    assert result.returncode == ExitCode.NOT_FOUND, result.stderr
    rec = env.wait_record(
        lambda r: r["event"] == "session-refused" and r["site"] == "no-such-site",
        "the unknown site's refusal",
    )
    assert (rec["status"], rec["result"]) == (404, "404 unknown site 'no-such-site'")
    assert (rec["user"], rec["accessor"]) == ("admin", env.accessor)


def test_show_is_recorded(env: Env) -> None:
    result = env.stack.supctl("show", "sites")
    assert result.returncode == 0, result.stderr
    rec = env.wait_record(lambda r: r["event"] == "show", "the show record")
    assert (rec["path"], rec["status"], rec["verb"], rec["user"]) == ("/v1/state/sites", 200, "show", "admin")


def test_no_token_anywhere(env: Env, tmp_path: Path) -> None:
    """Whatever else the module did before, plus a good and a bad token here: the log
    holds no token, not even part of one, and only its owner may read it."""
    bad = tmp_path / "bad.token"
    bad.write_text(BAD_TOKEN + "\n")
    assert env.stack.supctl("show", "sites", env=dict(env.stack.env, SUPCTL_TOKEN_FILE=str(bad))).returncode
    assert env.stack.supctl(*exec_args(SITE, APP, INST, SHELL, "true")).returncode == 0
    env.wait_record(lambda r: r["verb"] == "exec" and r["command"] == "true", "the exec stream's record")
    # Every byte of the store, its write-ahead log included.
    files = [env.path, env.path.with_name("tower.db-wal")]
    text = b"".join(p.read_bytes() for p in files if p.exists()).decode("latin-1")
    assert '"status":401' in text
    for secret in (env.admin_token, env.site_token, BAD_TOKEN):
        assert secret not in text
        # The last 12 characters are random (the secret may itself contain "_").
        assert secret[-12:] not in text
    assert stat.S_IMODE(env.path.stat().st_mode) == 0o600


def test_cli_filters(env: Env) -> None:
    other_site = "filtered-out-site"
    result = env.stack.supctl(*do_args(other_site, APP, INST, "connect", "tcp", "9", "--bind", "0"))
    assert result.returncode == ExitCode.NOT_FOUND, result.stderr
    assert env.stack.supctl(*exec_args(SITE, APP, INST, SHELL, COMMAND)).returncode == 3
    env.wait_record(lambda r: r["event"] == "stream-closed" and r["command"] == COMMAND, "the exec record")

    everything = env.audit_cli()
    assert everything == env.records()[: len(everything)]
    mine = env.audit_cli("--site", SITE)
    assert mine and all(r["site"] == SITE for r in mine)
    assert {r["event"] for r in mine} >= {"session-accepted", "stream-closed"}
    assert len(mine) == sum(1 for r in everything if r["site"] == SITE)
    [other] = env.audit_cli("--site", other_site)
    assert (other["event"], other["status"]) == ("session-refused", 404)
    assert all(r["user"] == "admin" for r in env.audit_cli("--user", "admin"))
    closed = env.audit_cli("--event", "stream-closed", "--site", SITE)
    assert closed and all(r["event"] == "stream-closed" for r in closed)
    assert env.audit_cli("--since", "-10m", "--site", SITE) == mine
    future = (datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)).isoformat()
    assert env.audit_cli("--since", future) == []
    assert env.audit_cli("--output", "jsonl", "--site", SITE) == mine  # --output jsonl: the default
    shipped = env.stack.control_tower("audit", "--config", env.config, "-o", "jsonl", "--site", SITE)
    assert shipped.splitlines() == [
        line for line in env.stack.audit_lines() if json.loads(line)["site"] == SITE
    ]
    table = env.stack.control_tower("audit", "--config", env.config, "--table", "--site", SITE)
    assert "closed" in table and COMMAND in table and other_site not in table
    assert table.count("\n") >= len(mine)
    assert env.stack.control_tower("audit", "--config", env.config, "-o", "table", "--site", SITE) == table


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--since", "yesterday"], "bad --since 'yesterday'"),
        (["--table", "--output", "jsonl"], "--table and --output jsonl contradict each other"),
        (["--config", "/nonexistent/tower.toml"], "config file /nonexistent/tower.toml not found"),
    ],
)
def test_cli_bad_input_is_one_line(env: Env, args: list[str], message: str) -> None:
    bad = subprocess.run(
        [program("control-tower"), "audit", "--config", env.config, *args],
        capture_output=True,
        text=True,
        env=env.stack.env,
    )
    assert bad.returncode == ExitCode.USAGE
    assert message in one_line_error(bad.stderr.encode())


def test_cli_without_a_store_is_one_line(tmp_path: Path) -> None:
    config = tmp_path / "tower.toml"
    config.write_text("")
    bad = subprocess.run(
        [program("control-tower"), "audit", "--config", str(config)], capture_output=True, text=True
    )
    assert bad.returncode == ExitCode.USAGE
    assert f"store {tmp_path / 'tower.db'} not found" in one_line_error(bad.stderr.encode())


def test_hostile_values_are_cut(env: Env) -> None:
    """Hostile: a request with kilobytes of garbage (a NUL, bytes that are not UTF-8) in its
    site and path: refused as usual, recorded with the values cut as the file had them, and
    the store's filter columns bounded and without NUL."""
    garbage = "%00%ff" + "x" * 3000
    host, _, port = env.stack.url.removeprefix("wss://").rpartition(":")
    context = ssl.create_default_context(cafile=str(env.stack.dir / "ca.pem"))
    conn = http.client.HTTPSConnection(host, int(port), context=context, timeout=20)
    conn.request(
        "GET", f"/v1/state/{'y' * 3000}?site={garbage}", headers={"Authorization": f"Bearer {BAD_TOKEN}"}
    )
    assert conn.getresponse().status == 401
    conn.close()
    site = ("\x00\ufffd" + "x" * 3000)[: audit.MAX_REQUESTED] + "..."
    env.wait_record(lambda r: r["site"] == site, "the garbage request's record")
    line = env.stack.audit_lines()[-1]
    assert line.isascii() and "\n" not in line and len(line) < 2000
    rec = json.loads(line)
    assert rec["path"] == ("/v1/state/" + "y" * 3000)[: audit.MAX_REQUESTED] + "..."
    db = sqlite3.connect(f"file:{env.path}?mode=ro", uri=True)
    try:
        [(column,)] = db.execute("SELECT site FROM audit ORDER BY id DESC LIMIT 1")
    finally:
        db.close()
    assert len(column) == 256 and "\x00" not in column


def test_cli_follow(env: Env) -> None:
    out = env.stack.root / "follow.out"
    with out.open("wb") as sink:
        proc = env.stack.spawn(
            "audit-follow",
            [program("control-tower"), "audit", "--config", env.config, "--follow", "--event", "show"],
            stdout=sink,
        )
    log = LogFile(out)
    before = len([r for r in env.records() if r["event"] == "show"])
    wait_until(lambda: log.text().count("\n") == before, 10.0, "the existing show records")
    assert env.stack.supctl("show", "sites").returncode == 0
    wait_until(lambda: log.text().count("\n") == before + 1, 10.0, "the new show record")
    assert json.loads(log.text().splitlines()[-1])["event"] == "show"
    assert proc.stop() in (0, -15)


def test_store_locked_refuses_new_sessions_while_streams_relay(env: Env) -> None:
    """Hostile: the store stops taking writes under a running tower (here another process
    holds SQLite's write lock).  New sessions are refused with 503 once a write has hung
    for 2 s (fail closed), the reason is logged once however many are refused, a session
    accepted before relays on, and no record is lost: all are written once the lock goes.
    Last in the module: it leaves the tower refusing for a while."""
    forward, port = env.stack.forward(
        *do_args(SITE, APP, INST, "connect", "tcp", str(env.sink_port), "--bind", "0")
    )
    assert env.stack.tower is not None
    tower_log = env.stack.tower.log
    lock = sqlite3.connect(env.path, isolation_level=None)
    try:
        lock.execute("BEGIN IMMEDIATE")  # the tower's next write waits (busy timeout: 10 s)

        def refused() -> bool:
            result = env.stack.supctl("show", "sites")
            return result.returncode != 0 and "cannot write its audit log" in one_line_error(result.stderr)

        wait_until(refused, 30.0, "a session refused (503)")
        # The running session opens a stream and relays every byte.
        assert _connect_stream(port, b"up" * 1000) == DOWN
        # The write gives up after the busy timeout: the store is down, said once.
        tower_log.wait_for(r"audit log: cannot write to the store: .*database is locked", 30.0)
        assert all(refused() for _ in range(5))
        assert tower_log.count(r"audit log: cannot write to the store") == 1
        assert tower_log.count(r"refusing new sessions") == 1
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    wait_until(lambda: env.stack.supctl("show", "sites").returncode == 0, 30.0, "sessions accepted again")
    tower_log.wait_for(r"audit log: the store works again", 10.0)
    env.wait_record(
        lambda r: r["event"] == "stream-closed" and r["bytes-up"] == 2000 and r["bytes-down"] == DOWN,
        "the record of the stream relayed while the store was locked",
    )
    forward.stop()


# --- units ---------------------------------------------------------------------------


def test_since_forms() -> None:
    now = datetime.datetime(2026, 1, 31, 12, 0, tzinfo=datetime.UTC)
    assert parse_since("-10m", now) == now - datetime.timedelta(minutes=10)
    assert parse_since("-2h", now) == now - datetime.timedelta(hours=2)
    assert parse_since("2026-01-31T11:00:00Z") == now - datetime.timedelta(hours=1)
    assert parse_since("2026-01-31T13:00:00+02:00") == now - datetime.timedelta(hours=1)
    assert parse_since("2026-01-31T11:00") == now - datetime.timedelta(hours=1)  # naive is UTC


def test_record_has_only_known_fields() -> None:
    assert tuple(audit.record("show", verb="show")) == FIELDS
    with pytest.raises(KeyError):
        audit.record("show", bytes_sideways=1)


@pytest.mark.parametrize(
    ("table", "keep", "error"),
    [
        ('[audit]\nkeep = "90d"\n', 90 * 86400.0, None),
        ('[audit]\nkeep = "12h"\n', 12 * 3600.0, None),
        ("", None, None),
        ('[audit]\nkeep = "90 days"\n', None, "'audit.keep' must be a duration like \"90d\""),
        ("[audit]\nkeep = 90\n", None, "'audit.keep' must be a duration like \"90d\""),
        ('[audit]\nkeepp = "90d"\n', None, "unknown key 'audit.keepp'"),
    ],
)
def test_retention_setting(tmp_path: Path, table: str, keep: float | None, error: str | None) -> None:
    path = tmp_path / "tower.toml"
    path.write_text(table)
    if error is None:
        config = load_config(path)
        assert (config.audit_keep, config.database) == (keep, tmp_path / "tower.db")
        return
    from supctl.errors import UsageError

    with pytest.raises(UsageError, match=f"^bad config file {path}: {error}"):
        load_config(path)
