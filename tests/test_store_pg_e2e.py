"""The tower on PostgreSQL, end to end: the subset of the e2e suite that shows users see
no difference (connect, exec, login, renew, logout, revoke, the audit log), and what only
a server store shows: its password refused, and an outage of the server.

Real processes as everywhere else (:mod:`stack`), with ``control-tower init
--store-url``: the tower directory holds no ``tower.db``; every token, user, policy set
and audit record is in a database of a real PostgreSQL server that the fixtures start
(``pg_cluster``: Debian's postgresql, on a Unix socket; in CI a missing server fails).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_support import echo_roundtrip, start_server, wait_until
from pg_cluster import PostgresCluster
from stack import Stack, do_args, one_line_error, program
from test_operations import curl
from test_users_policies import PASSWORD, login
from tower_raw import add_user

from supctl.errors import ExitCode

SITE, APP, INSTANCE, SHELL = "stockholm-sergel", "popcorn", "popcorn-1", "shell"
INVENTORY = (
    f'[applications.{APP}.service-instances.{INSTANCE}]\nruntime = "host"\n'
    f"[applications.{APP}.service-instances.{INSTANCE}.containers.{SHELL}]\n"
)
POLICIES = f"""
[[policies.ops.rules]]
effect = "allow"
site = "stockholm-*"
application = "{APP}"
verb = "connect"
protocol = "tcp"
addresses = ["127.0.0.1/32"]
"""


def tower_on(stack: Stack, cluster: PostgresCluster, database: str, *, login_expiry: str = "8h") -> None:
    """``init --store-url`` a tower on ``database`` (new), start it, apply the policies, add
    user alice and the site."""
    url = cluster.create_database(database)
    stack.start_tower(
        store=(url, cluster.write_password_file(stack.root / "store.password")), login_expiry=login_expiry
    )
    (stack.root / "ops.toml").write_text(POLICIES)
    stack.control_tower("policy", "apply", "--config", config_of(stack), str(stack.root / "ops.toml"))
    add_user(stack, "alice", PASSWORD, "ops")
    stack.add_site(SITE, INVENTORY)


@pytest.fixture(scope="module")
def stack(pg_cluster: PostgresCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    try:
        with Stack(tmp_path_factory.mktemp("pg-e2e")) as stack:
            tower_on(stack, pg_cluster, "e2e_tower")
            yield stack
    finally:
        pg_cluster.drop_database("e2e_tower")


def config_of(stack: Stack) -> str:
    return str(stack.dir / "tower.toml")


def test_the_store_is_postgresql_not_a_file(stack: Stack) -> None:
    assert not (stack.dir / "tower.db").exists()
    text = (stack.dir / "tower.toml").read_text()
    assert "[store]" in text and "password-file" in text
    assert stack.store_url is not None and stack.store_url in text
    listing = json.loads(stack.control_tower("site", "list", "--config", config_of(stack), "-o", "json"))
    assert [site["name"] for site in listing] == [SITE]


def test_connect_relays_every_byte(stack: Stack) -> None:
    env, _ = login(stack, "alice")
    _, port = start_server(stack, "echo")
    payload = os.urandom(2_000_000)
    result = stack.supctl(*do_args(SITE, APP, INSTANCE, "connect", "tcp", str(port)), input=payload, env=env)
    assert result.returncode == 0, result.stderr
    assert hashlib.sha256(result.stdout).hexdigest() == hashlib.sha256(payload).hexdigest()


def test_exec_gives_the_commands_output_and_exit_code(stack: Stack) -> None:
    args = do_args(SITE, APP, INSTANCE, "containers", SHELL, "exec", "echo on-postgresql; exit 7")
    result = stack.supctl(*args)
    assert (result.returncode, result.stdout) == (7, b"on-postgresql\n"), result.stderr


def test_policy_refusal_and_the_audit_log(stack: Stack) -> None:
    env, stored = login(stack, "alice")
    result = stack.supctl(
        *do_args(SITE, APP, INSTANCE, "connect", "tcp", "22", "--ip-address", "10.0.0.1"), env=env
    )
    line = one_line_error(result.stderr)
    assert result.returncode == ExitCode.DENIED and "policy refuses connect to 10.0.0.1:22" in line, line
    records = stack.wait_audit(
        lambda r: r["event"] == "session-refused" and r["accessor"] == stored["accessor"], "the refusal"
    )
    assert any(r["event"] == "login" and r["accessor"] == stored["accessor"] for r in records)
    # The filters run in SQL on PostgreSQL as on SQLite.
    text = stack.control_tower(
        "audit",
        "--config",
        config_of(stack),
        "--user",
        "alice",
        "--event",
        "session-refused",
        "--output",
        "jsonl",
    )
    filtered = [json.loads(line) for line in text.splitlines()]
    assert filtered and {(r["user"], r["event"]) for r in filtered} == {("alice", "session-refused")}
    assert stored["token"] not in "\n".join(stack.audit_lines())


def test_logout_and_revoke(stack: Stack) -> None:
    env, stored = login(stack, "alice")
    assert stack.supctl("show", "sites", env=env).returncode == 0
    result = stack.supctl("do", "logout", env=env)
    assert result.returncode == 0, result.stderr
    result = stack.supctl("show", "sites", env=dict(env, SUPCTL_TOKEN=stored["token"]))
    assert result.returncode == ExitCode.DENIED and one_line_error(result.stderr).endswith("token revoked")

    env, stored = login(stack, "alice")
    stack.control_tower("token", "revoke", "--config", config_of(stack), stored["accessor"])
    result = stack.supctl("show", "sites", env=env)
    assert result.returncode == ExitCode.DENIED and one_line_error(result.stderr).endswith("token revoked")
    tokens = json.loads(stack.control_tower("token", "list", "--config", config_of(stack), "-o", "json"))
    assert any(t["accessor"] == stored["accessor"] and t["revoked"] for t in tokens), tokens


def test_init_refuses_a_store_it_cannot_use(
    stack: Stack, pg_cluster: PostgresCluster, tmp_path: Path
) -> None:
    """Each refusal is one line, and leaves no half-made tower behind (a rerun works)."""
    url = pg_cluster.url("e2e_tower")
    password_file = pg_cluster.write_password_file(tmp_path / "pw")
    wrong = tmp_path / "wrong"
    wrong.write_text("hunter2\n")
    target = tmp_path / "tower"
    cases = [
        (["--store-url", url.replace("tower@", "tower:hunter2@")], ExitCode.USAGE, "--store-url holds a password"),
        (["--store-url", "mysql://tower@db/tower"], ExitCode.USAGE, "--store-url 'mysql://tower@db/tower': use a URL"),
        (["--store-url", url, "--store-password-file", str(tmp_path / "nope")], ExitCode.USAGE, "no such file"),
        (["--store-password-file", str(password_file)], ExitCode.USAGE, "goes with --store-url"),
        (["--store-url", url, "--store-password-file", str(wrong)], ExitCode.UNAVAILABLE, "password authentication failed"),
        (["--store-url", url.replace("e2e_tower", "nowhere"), "--store-password-file", str(password_file)],
         ExitCode.UNAVAILABLE, 'database "nowhere" does not exist'),
        # e2e_tower is the module's tower's: it holds tables already.
        (["--store-url", url, "--store-password-file", str(password_file)], ExitCode.USAGE, "already holds tables"),
    ]  # fmt: skip
    for extra, code, fragment in cases:
        result = subprocess.run(
            [program("control-tower"), "init", str(target), *extra],
            capture_output=True,
            timeout=60,
            check=False,
        )
        line = one_line_error(result.stderr)
        assert (result.returncode, fragment in line) == (code, True), line
        assert "hunter2" not in line and not target.exists(), line


def test_serve_refuses_a_wrong_store_password(stack: Stack, tmp_path: Path) -> None:
    config = tmp_path / "tower.toml"
    wrong = tmp_path / "wrong.password"
    wrong.write_text("not-the-password\n")
    wrong.chmod(0o600)
    text = (stack.dir / "tower.toml").read_text().replace(str(stack.root / "store.password"), str(wrong))
    for name in ("ca.pem", "server.pem", "server-key.pem"):
        text = text.replace(f'"{name}"', json.dumps(str(stack.dir / name)))
    config.write_text(text)
    result = subprocess.run(
        [program("control-tower"), "serve", "--config", str(config), "--listen", "127.0.0.1:0"],
        capture_output=True, text=True, env=stack.env, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == ExitCode.UNAVAILABLE, result.stderr
    line = one_line_error(result.stderr.encode())
    assert 'password authentication failed for user "tower"' in line and "not-the-password" not in line


def test_a_long_running_forward_renews_its_login(pg_cluster: PostgresCluster, tmp_path: Path) -> None:
    """Renewal writes to PostgreSQL: a 3 s login is renewed at 2 s (wall-clock time; the
    renewal's timing itself is tested on a fake clock in test_hub.py)."""
    try:
        with Stack(tmp_path) as stack:
            tower_on(stack, pg_cluster, "e2e_renew", login_expiry="3s")
            env, stored = login(stack, "alice")
            _, echo = start_server(stack, "echo")
            args = do_args(SITE, APP, INSTANCE, "connect", "tcp", str(echo), "--bind", "0")
            proc = stack.spawn("supctl", [program("supctl"), *args], env=env)
            port = int(proc.log.wait_for(r"Forwarding from \S+:(\d+) ->", proc=proc.popen)[1])
            stack.wait_audit(
                lambda r: r["event"] == "renew" and r["accessor"] == stored["accessor"], "the renewal"
            )
            renewed = json.loads((Path(env["XDG_CONFIG_HOME"]) / "supctl" / "token").read_text())
            assert renewed["token"] == stored["token"] and renewed["expires"] > stored["expires"]
            assert echo_roundtrip(port, b"renewed") == b"renewed"
    finally:
        pg_cluster.drop_database("e2e_renew")


# --- an outage of the server ------------------------------------------------------------------


@pytest.fixture
def own_cluster(pg_cluster: PostgresCluster) -> Iterator[PostgresCluster]:
    """A server of this test's own, which it stops and starts (pg_cluster: PostgreSQL is there)."""
    with PostgresCluster(pg_cluster.bindir) as cluster:
        yield cluster


def test_an_outage_refuses_new_sessions_and_spares_open_streams(
    own_cluster: PostgresCluster, tmp_path: Path
) -> None:
    with Stack(tmp_path) as stack:
        tower_on(stack, own_cluster, "outage")
        assert stack.tower is not None
        _, echo = start_server(stack, "echo")
        args = do_args(SITE, APP, INSTANCE, "connect", "tcp", str(echo), "--bind", "0")
        forward = stack.spawn("supctl", [program("supctl"), *args])
        port = int(forward.log.wait_for(r"Forwarding from \S+:(\d+) ->", proc=forward.popen)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as open_stream:
            open_stream.sendall(b"before")
            assert open_stream.recv(6) == b"before"

            own_cluster.halt()
            # Fail closed: nothing is judged against a copy that may be stale, nothing goes unrecorded.
            result = stack.supctl(*do_args(SITE, APP, INSTANCE, "connect", "tcp", str(echo)), input=b"x")
            line = one_line_error(result.stderr)
            assert result.returncode == ExitCode.UNAVAILABLE, line
            assert "the control tower cannot reach its store" in line, line
            result = stack.supctl("show", "sites")
            assert result.returncode == ExitCode.UNAVAILABLE, result.stderr
            # Probes (issue 13): alive, not ready, and why.
            assert curl(stack, "/healthz") == (200, "ok")
            assert curl(stack, "/readyz") == (503, "not ready: the control tower cannot reach its store")
            # ...while the stream opened before relays on, every byte.
            payload = os.urandom(1_000_000)
            open_stream.sendall(payload)
            received = bytearray()
            while len(received) < len(payload):
                chunk = open_stream.recv(65536)
                assert chunk, "the open stream was closed during the outage"
                received += chunk
            assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
            assert forward.popen.poll() is None and stack.tower.popen.poll() is None

            own_cluster.resume()

            def works() -> bool:
                again = stack.supctl(
                    *do_args(SITE, APP, INSTANCE, "connect", "tcp", str(echo)), input=b"again"
                )
                return again.returncode == 0 and again.stdout == b"again"

            wait_until(works, 30, "a new session once the server is back")
            wait_until(lambda: curl(stack, "/readyz") == (200, "ready"), 10, "ready again")
            open_stream.sendall(b"after")
            assert open_stream.recv(5) == b"after"
        # The stream's record, made after the outage, reaches the store.
        stack.wait_audit(
            lambda r: r["event"] == "stream-closed" and r["bytes-up"] == 6 + 1_000_000 + 5,
            "the open stream's record",
        )
        # Said once when it starts, once when it ends.
        log = stack.tower.log
        assert log.count("audit log: cannot write to the store: .* is unavailable") == 1, log.text()
        assert log.count("audit log: the store works again after") == 1, log.text()
