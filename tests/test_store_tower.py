"""The tower on its store: freshness of the in-memory directory, schema revisions at
serve and migrate, importing an older tower's JSON files, and policy sets as data.

Real SQLite stores in temporary directories and real ``control-tower`` processes.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import socket
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from oldformats import OldTower
from stack import Stack, do_args, program, write_secret
from towerkit import Kit, run, utc_now

from supctl.tower import database
from supctl.tower.store import hash_token
from supctl.tower.users import TokenRefused

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "correct horse battery staple"
SITE, APP, INST = "stockholm-sergel", "popcorn-controller", "popcorn-controller-service-1"
POLICY = f"""
[[policies.ops.rules]]
effect = "allow"
site = "stockholm-*"
application = "{APP}"
verb = "connect"
protocol = "tcp"
addresses = ["127.0.0.1/32"]
"""
# Stands in for supctl.tower.serving: serve's checks run, the server does not.
FAKE_SERVER = """
import sys, types
m = types.ModuleType("supctl.tower.serving")
m.serve = lambda config, host, port, insecure, *logging: print("serving")
sys.modules["supctl.tower.serving"] = m
"""


def control_tower(*args: str | Path, prelude: str = "", stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    return subprocess.run(
        [sys.executable, "-c", prelude + "\nfrom supctl.tower.cli import main; main()", *map(str, args)],
        cwd=ROOT,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def one_line(proc: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert proc.returncode != 0 and proc.stdout == "" and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("control-tower: error: ") and proc.stderr.count("\n") == 1, proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr, proc.stderr


# --- the directory's freshness -----------------------------------------------------------


def test_a_revocation_by_another_writer_counts_from_the_next_check(tmp_path: Path) -> None:
    kit = Kit(tmp_path)
    kit.add_user("alice", PASSWORD, ["ops"])
    token = kit.add_token("alice", "api")
    assert kit.directory.check_token(token) is not None
    accessor = hash_token(token)[:8]
    assert kit.admin(lambda store: store.tokens.revoke(accessor, now=utc_now())) == "alice"
    with pytest.raises(TokenRefused, match=r"^token revoked$"):
        kit.directory.check_token(token)
    assert kit.directory.refusal(accessor) == "token revoked"
    kit.close()


def test_an_unchanged_store_is_not_loaded_again(tmp_path: Path) -> None:
    kit = Kit(tmp_path)
    kit.add_user("alice", PASSWORD, ["ops"])
    reloads = kit.directory.reloads
    for _ in range(5):
        kit.fresh()
    assert kit.directory.reloads == reloads
    kit.close()


def test_concurrent_checks_share_one_query(tmp_path: Path) -> None:
    """A flood of requests costs one SELECT per round, not one each; a caller that arrives
    while a check runs waits for the next one (the running one may predate its write)."""
    kit = Kit(tmp_path)
    queries = [0]
    real = kit.store.generation

    async def counting() -> int:
        queries[0] += 1
        return await real()

    kit.store.generation = counting  # type: ignore[method-assign]
    kit.store.peek_generation = lambda: None  # type: ignore[method-assign]  # the async path, as on PostgreSQL

    async def flood() -> None:
        await asyncio.gather(*(kit.directory.fresh() for _ in range(100)))
        first = asyncio.ensure_future(kit.directory.fresh())
        await asyncio.sleep(0)  # the check has started
        await asyncio.gather(first, *(kit.directory.fresh() for _ in range(10)))

    run(flood())
    assert queries[0] == 3  # the flood's round; then the first caller's, and one for the late ten
    kit.close()


def test_a_store_that_cannot_be_read_refuses_requests(tmp_path: Path) -> None:
    """Fail closed: nothing is judged against a copy that may be stale."""
    from websockets.datastructures import Headers
    from websockets.http11 import Request

    kit = Kit(tmp_path)
    token = kit.add_admin_token()
    request = Request("/v1/state/sites", Headers([("Authorization", f"Bearer {token}")]))
    peer = type("Peer", (), {"remote_address": ("127.0.0.1", 5555)})()
    response = run(kit.tower.handshake_request(peer, request))
    assert response is not None and response.status_code == 200
    kit.close()
    (tmp_path / "tower.db").write_bytes(b"\0" * 8192)
    for path in tmp_path.glob("tower.db-*"):
        path.unlink()
    response = run(kit.tower.handshake_request(peer, request))
    assert response is not None and response.status_code == 503
    assert b"the control tower cannot reach its store" in response.body


# --- schema revisions at serve and migrate -------------------------------------------------


def test_serve_refuses_a_newer_schema(tmp_path: Path) -> None:
    assert control_tower("init", tmp_path / "t").returncode == 0
    config = tmp_path / "t" / "tower.toml"
    with sqlite3.connect(tmp_path / "t" / "tower.db") as db:
        db.execute("UPDATE alembic_version SET version_num = '0999'")
    one_line(control_tower("serve", "--config", config, prelude=FAKE_SERVER), "revision 0999, newer than")
    one_line(control_tower("migrate", "--config", config), "newer than", "cannot downgrade")
    with sqlite3.connect(tmp_path / "t" / "tower.db") as db:  # migrate changed nothing
        assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [("0999",)]


def test_serve_refuses_an_older_schema_until_migrated(tmp_path: Path) -> None:
    assert control_tower("init", tmp_path / "t").returncode == 0
    config, db = tmp_path / "t" / "tower.toml", tmp_path / "t" / "tower.db"
    asyncio.run(database.create(db, replace=True, revision="0002"))
    one_line(
        control_tower("serve", "--config", config, prelude=FAKE_SERVER), "older than", "control-tower migrate"
    )
    done = control_tower("migrate", "--config", config)
    assert done.returncode == 0, done.stderr
    assert f"from revision 0002 to {database.head()}" in done.stderr
    assert control_tower("serve", "--config", config, prelude=FAKE_SERVER).stdout == "serving\n"


# --- policy sets as data -------------------------------------------------------------------


def test_policy_apply_and_show(tmp_path: Path) -> None:
    assert control_tower("init", tmp_path / "t").returncode == 0
    config = tmp_path / "t" / "tower.toml"
    shown = control_tower("policy", "show", "--config", config)
    assert shown.returncode == 0 and shown.stdout == "" and "no policy set" in shown.stderr
    (tmp_path / "p.toml").write_text(POLICY)
    done = control_tower("policy", "apply", "--config", config, tmp_path / "p.toml")
    assert (done.returncode, done.stdout) == (0, "1\n"), done.stderr
    shown = control_tower("policy", "show", "--config", config)
    assert shown.stdout == POLICY and "policy set version 1" in shown.stderr
    # A bad file: one line naming it, and no new version.
    (tmp_path / "bad.toml").write_text("[[policies.ops.rules]]\neffect = 'maybe'\n")
    one_line(
        control_tower("policy", "apply", "--config", config, tmp_path / "bad.toml"), "bad.toml", "effect"
    )
    (tmp_path / "bad.toml").write_text("[[policies.ops.rules]\n")
    one_line(control_tower("policy", "apply", "--config", config, tmp_path / "bad.toml"), "bad policy file")
    one_line(control_tower("policy", "apply", "--config", config, tmp_path / "none.toml"), "none.toml")
    assert "policy set version 1," in control_tower("policy", "show", "--config", config).stderr


# --- an older tower, migrated --------------------------------------------------------------


def test_migrate_imports_an_older_towers_files_and_their_tokens_keep_working(tmp_path: Path) -> None:
    with Stack(tmp_path) as stack:
        config = stack.dir / "tower.toml"
        subprocess.run(
            [program("control-tower"), "init", str(stack.dir)], check=True, capture_output=True, env=stack.env
        )
        # The directory as the code before the store made it: state.json, users.json, policies.toml.
        for path in stack.dir.glob("tower.db*"):
            path.unlink()
        state = users = OldTower(stack.dir)
        write_secret(stack.dir / "admin.token", state.add_admin_token() + "\n")
        write_secret(stack.root / f"{SITE}.token", state.add_site(SITE) + "\n")
        users.add_user("alice", PASSWORD, ["ops"])
        api_token = users.add_token("alice", "api", datetime.timedelta(days=1))[0]
        (stack.dir / "policies.toml").write_text(POLICY)
        refused = subprocess.run(
            [program("control-tower"), "serve", "--config", str(config)],
            capture_output=True,
            text=True,
            env=stack.env,
        )
        assert refused.returncode != 0 and "control-tower migrate" in refused.stderr
        done = subprocess.run(
            [program("control-tower"), "migrate", "--config", str(config)],
            capture_output=True,
            text=True,
            env=stack.env,
        )
        assert done.returncode == 0, done.stderr
        assert (
            "imported 1 admin token, 1 site, 1 user, 1 login/API token, policy set version 1" in done.stderr
        )
        again = subprocess.run(
            [program("control-tower"), "migrate", "--config", str(config)],
            capture_output=True,
            text=True,
            env=stack.env,
        )
        assert again.returncode == 0 and "not imported: the store holds data already" in again.stderr

        stack.start_tower(init=False)
        (stack.root / f"{SITE}.toml").write_text(f"[applications.{APP}.service-instances.{INST}]\n")
        stack.start_enforcer(SITE)  # the site token from state.json
        with socket.create_server(("127.0.0.1", 0)) as listener:
            port = listener.getsockname()[1]

            def echo() -> None:
                conn, _ = listener.accept()
                with conn:
                    conn.sendall(conn.recv(5))

            threading.Thread(target=echo, daemon=True).start()
            env = dict(stack.env, SUPCTL_TOKEN=api_token)  # the API token from users.json
            del env["SUPCTL_TOKEN_FILE"]
            result = stack.supctl(
                *do_args(SITE, APP, INST, "connect", "tcp", str(port)), input=b"hello", env=env
            )
        assert result.returncode == 0 and result.stdout == b"hello", result.stderr
        # The imported policy set is the one in force: it allows connect, nothing else.
        denied = stack.supctl("show", "sites", env=env)
        assert denied.returncode == 0 and SITE not in denied.stdout.decode(), denied.stderr


def test_lists_are_tables_for_people_and_json_for_scripts(tmp_path: Path) -> None:
    assert control_tower("init", tmp_path / "t").returncode == 0
    config = tmp_path / "t" / "tower.toml"
    assert (
        control_tower(
            "user", "add", "--config", config, "alice", "--policy", "ops", stdin=PASSWORD + "\n"
        ).returncode
        == 0
    )
    token = control_tower("token", "add", "--config", config, "--user", "alice").stdout.strip()
    users = json.loads(control_tower("user", "list", "--config", config, "-o", "json").stdout)
    assert [sorted(row) for row in users] == [["created", "name", "policies"]]
    assert (users[0]["name"], users[0]["policies"]) == ("alice", ["ops"])
    table = control_tower("user", "list", "--config", config).stdout.splitlines()
    assert [line.split()[:2] for line in table] == [["NAME", "POLICIES"], ["alice", "ops"]]
    tokens = json.loads(control_tower("token", "list", "--config", config, "-o", "json").stdout)
    assert [sorted(row) for row in tokens] == [
        ["accessor", "created", "expires", "kind", "revoked", "state", "user"]
    ]
    assert tokens[0]["accessor"] == hash_token(token)[:8]
    assert (tokens[0]["user"], tokens[0]["kind"], tokens[0]["revoked"], tokens[0]["state"]) == (
        "alice",
        "api",
        None,
        "valid",
    )
    listing = control_tower("token", "list", "--config", config).stdout
    assert listing.split()[:5] == ["ACCESSOR", "USER", "KIND", "EXPIRES", "STATE"] and token not in listing
    bad = control_tower("token", "list", "--config", config, "-o", "yaml")
    assert bad.returncode == 2 and "'yaml' is not one of 'table', 'json'" in bad.stderr  # click's usage error
