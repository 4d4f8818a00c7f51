"""The store (supctl.tower.database): one suite, run against SQLite and a real PostgreSQL.

The PostgreSQL server is started once per session by ``pg_cluster`` (conftest; Debian's
postgresql package), with a fresh database per test.  Without the package the
PostgreSQL half is skipped, except in CI, where it fails.  Times are injected
(``now=``): no test sleeps.
"""

from __future__ import annotations

import asyncio
import configparser
import datetime
import hashlib
import json
import os
import secrets
import select
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from oldformats import OldTower
from pg_cluster import PostgresCluster
from sqlalchemy import text

from supctl.errors import UsageError
from supctl.tower import database
from supctl.tower.audit import record
from supctl.tower.database import schema
from supctl.tower.database.auditlog import encode
from supctl.tower.database.engine import Database, make_engine
from supctl.tower.users import TokenRefused, check_password

T = TypeVar("T")
T0 = datetime.datetime(2030, 1, 1, 12, 0, tzinfo=datetime.UTC)
HOUR = datetime.timedelta(hours=1)
REPO = Path(__file__).resolve().parent.parent
POLICIES = """
[[policies.ops.rules]]
effect = "allow"
site = "paris-*"
verb = "connect"
"""


@dataclass
class Target:
    backend: str
    url: str
    password_file: Path | None = None
    cluster: PostgresCluster | None = None
    database_name: str = ""

    def run(self, body: Callable[[database.SQLStore], Awaitable[T]]) -> T:
        """Open the store, run ``body`` with it on a new event loop, close it."""

        async def main() -> T:
            store = await database.open(self.url, password_file=self.password_file)
            try:
                return await body(store)
            finally:
                await store.close()

        return asyncio.run(main())

    def create(self, **kwargs: Any) -> None:
        asyncio.run(database.create(self.url, password_file=self.password_file, **kwargs))

    def upgrade(self, **kwargs: Any) -> database.Upgrade:
        return asyncio.run(database.upgrade(self.url, password_file=self.password_file, **kwargs))

    def open_error(self) -> str:
        with pytest.raises(UsageError) as caught:
            self.run(lambda store: asyncio.sleep(0))
        return str(caught.value)

    def execute(self, statement: str) -> list[tuple[Any, ...]]:
        """Raw SQL outside the store (a schema of another revision), committed."""

        async def main() -> list[tuple[Any, ...]]:
            location = database.locate(self.url)
            password = self.cluster.password if self.cluster else None
            engine = make_engine(location, password)
            try:
                async with Database(engine, location).write() as conn:
                    result = await conn.execute(text(statement))
                    return [tuple(row) for row in result] if result.returns_rows else []
            finally:
                await engine.dispose()

        return asyncio.run(main())


@pytest.fixture(params=["sqlite", "postgresql"])
def blank(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Target]:
    """A target with no store yet: a path in tmp_path, or a new empty PostgreSQL database."""
    if request.param == "sqlite":
        yield Target("sqlite", str(tmp_path / "tower.db"))
        return
    cluster: PostgresCluster = request.getfixturevalue("pg_cluster")
    name = "t_" + uuid.uuid4().hex[:16]
    url = cluster.create_database(name)
    try:
        yield Target(
            "postgresql", url, cluster.write_password_file(tmp_path / "store-password"), cluster, name
        )
    finally:
        cluster.drop_database(name)


@pytest.fixture
def target(blank: Target) -> Target:
    """A new store at the newest schema revision."""
    blank.create()
    return blank


def sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


# --- admin tokens and sites -------------------------------------------------------------


def test_admin_tokens(target: Target) -> None:
    async def body(store: database.SQLStore) -> None:
        token = await store.admins.add(now=T0)
        other = await store.admins.add(now=T0 + HOUR)
        accessor = sha256(token)[:8]
        assert token.startswith("sct_admin_")
        assert await store.admins.check(token) == accessor
        assert await store.admins.check(token + "x") is None
        assert await store.admins.check("\udc80") is None  # a header decoded to a lone surrogate
        assert await store.admins.valid(accessor)
        assert [a.accessor for a in await store.admins.entries()] == [accessor, sha256(other)[:8]]
        assert await store.admins.revoke(accessor)
        assert await store.admins.check(token) is None
        assert not await store.admins.valid(accessor)
        assert not await store.admins.revoke(accessor)
        assert await store.admins.check(other) == sha256(other)[:8]

    target.run(body)


def test_sites_add_check_rotate_remove(target: Target) -> None:
    async def body(store: database.SQLStore) -> None:
        token = await store.sites.add("paris-1", now=T0)
        berlin = await store.sites.add("berlin", now=T0)
        assert token.startswith("sct_site_")
        assert await store.sites.check("paris-1", token)
        assert not await store.sites.check("paris-1", berlin)  # another site's token
        assert not await store.sites.check("paris-1", token[:-1])
        assert not await store.sites.check("nowhere", token)
        assert await store.sites.names() == ["berlin", "paris-1"]
        assert await store.sites.exists("paris-1") and not await store.sites.exists("nowhere")
        assert await store.sites.token_hash("paris-1") == sha256(token)
        with pytest.raises(UsageError, match="site 'paris-1' already exists"):
            await store.sites.add("paris-1", now=T0)
        for bad in ("Paris", "-x", "a" * 64, "", "a_b"):
            with pytest.raises(UsageError, match="invalid site name"):
                await store.sites.add(bad, now=T0)

        new = await store.sites.rotate("paris-1", now=T0 + HOUR)
        assert new != token
        assert not await store.sites.check("paris-1", token)  # the old token stops at once
        assert await store.sites.check("paris-1", new)
        assert await store.sites.token_hash("paris-1") == sha256(new)
        entries = {s.name: s for s in await store.sites.entries()}
        assert entries["paris-1"].rotated == T0 + HOUR and entries["paris-1"].created == T0
        assert entries["paris-1"].accessor == sha256(new)[:8]
        assert entries["berlin"].rotated is None
        with pytest.raises(UsageError, match="unknown site 'nowhere'"):
            await store.sites.rotate("nowhere", now=T0)

        await store.sites.remove("paris-1")
        assert not await store.sites.exists("paris-1")
        assert not await store.sites.check("paris-1", new)
        assert await store.sites.token_hash("paris-1") is None
        with pytest.raises(UsageError, match="unknown site 'paris-1'"):
            await store.sites.remove("paris-1")
        assert await store.sites.names() == ["berlin"]

    target.run(body)


# --- users and their tokens -------------------------------------------------------------


def test_users(target: Target) -> None:
    async def body(store: database.SQLStore) -> None:
        await store.users.add("alice", "correct horse", ["ops", "dev"], now=T0)
        await store.users.add("bob", "pw", [], now=T0)
        assert [(u.name, u.policies, u.created) for u in await store.users.entries()] == [
            ("alice", ("ops", "dev"), T0),
            ("bob", (), T0),
        ]
        assert await store.users.policies("alice") == ("ops", "dev")
        assert await store.users.policies("carol") is None
        stored = await store.users.password_hash("alice")
        assert stored is not None and stored.startswith("scrypt$")
        assert check_password("correct horse", stored) and not check_password("wrong", stored)
        assert await store.users.password_hash("carol") is None
        assert await store.users.exists("bob")
        with pytest.raises(UsageError, match="user 'alice' already exists"):
            await store.users.add("alice", "x", [], now=T0)
        for bad in ("admin", "Alice", "", "a" * 65, "1abc"):
            with pytest.raises(UsageError, match="invalid user name"):
                await store.users.add(bad, "x", [], now=T0)
        with pytest.raises(UsageError, match="must not be empty"):
            await store.users.add("carol", "", [], now=T0)
        with pytest.raises(UsageError, match="longer than 1024"):
            await store.users.add("carol", "x" * 1025, [], now=T0)
        assert await store.users.remove("bob", now=T0) == 0
        assert not await store.users.exists("bob")
        with pytest.raises(UsageError, match="unknown user 'bob'"):
            await store.users.remove("bob", now=T0)

    target.run(body)


def test_token_expiry_renew_revoke(target: Target) -> None:
    async def body(store: database.SQLStore) -> None:
        await store.users.add_hashed("alice", "scrypt$x", ["ops"], now=T0)
        login = await store.tokens.add("alice", "login", 8 * HOUR, now=T0)
        api = await store.tokens.add("alice", "api", 90 * 24 * HOUR, now=T0)
        assert login.token.startswith("sct_login_") and api.token.startswith("sct_api_")
        assert login.accessor == sha256(login.token)[:8] and login.expires == T0 + 8 * HOUR

        identity = await store.tokens.check(login.token, now=T0)
        assert identity == database.Identity("alice", login.accessor, ("ops",), "login", sha256(login.token))
        assert (await store.tokens.check(api.token, now=T0 + 8 * HOUR)) is not None
        with pytest.raises(TokenRefused, match=r"^token expired$") as refused:
            await store.tokens.check(login.token, now=T0 + 8 * HOUR)  # expiry is exclusive
        assert (refused.value.user, refused.value.accessor) == ("alice", login.accessor)

        # Renewal moves the expiry; only for a live login token.
        assert await store.tokens.renew(login.token, 8 * HOUR, now=T0 + HOUR) == T0 + 9 * HOUR
        assert await store.tokens.check(login.token, now=T0 + 8 * HOUR) is not None
        assert await store.tokens.renew(login.token, 8 * HOUR, now=T0 + 9 * HOUR) is None  # expired
        assert await store.tokens.renew(api.token, 8 * HOUR, now=T0) is None
        assert await store.tokens.renew("sct_login_unknown", 8 * HOUR, now=T0) is None

        # Not a user token, or unknown: None (the caller says "invalid token").
        assert await store.tokens.check("sct_site_whatever", now=T0) is None
        assert await store.tokens.check("sct_login_", now=T0) is None
        assert await store.tokens.check("sct_login_" + "A" * 43, now=T0) is None

        assert await store.tokens.revoke_token(api.token, now=T0)
        assert not await store.tokens.revoke_token(api.token, now=T0)
        with pytest.raises(TokenRefused, match=r"^token revoked$"):
            await store.tokens.check(api.token, now=T0)
        assert await store.tokens.renew(api.token, HOUR, now=T0) is None

        second = await store.tokens.add("alice", "login", 8 * HOUR, now=T0)
        assert await store.tokens.revoke(second.accessor, now=T0 + HOUR) == "alice"
        with pytest.raises(TokenRefused, match=r"^token revoked$"):
            await store.tokens.check(second.token, now=T0 + HOUR)
        with pytest.raises(UsageError, match="no token with accessor 'ffffffff'"):
            await store.tokens.revoke("ffffffff", now=T0)

        states = [(t.accessor, t.kind, t.state(T0 + 10 * HOUR)) for t in await store.tokens.entries()]
        assert states == [
            (login.accessor, "login", "expired"),
            (api.accessor, "api", "revoked"),
            (second.accessor, "login", "revoked"),
        ]
        with pytest.raises(UsageError, match="unknown user 'bob'"):
            await store.tokens.add("bob", "api", HOUR, now=T0)

    target.run(body)


def test_token_refusals_for_running_sessions(target: Target) -> None:
    async def body(store: database.SQLStore) -> None:
        await store.users.add_hashed("alice", "scrypt$x", [], now=T0)
        valid = await store.tokens.add("alice", "login", 8 * HOUR, now=T0)
        revoked = await store.tokens.add("alice", "api", 8 * HOUR, now=T0)
        expired = await store.tokens.add("alice", "api", HOUR, now=T0)
        admin = await store.admins.add(now=T0)
        gone_admin = await store.admins.add(now=T0)
        await store.tokens.revoke_token(revoked.token, now=T0)
        await store.admins.revoke(sha256(gone_admin)[:8])
        hashes = [sha256(t) for t in (valid.token, revoked.token, expired.token, admin, gone_admin)]
        assert await store.tokens.refusals([*hashes, "0" * 64], now=T0 + 2 * HOUR) == {
            hashes[1]: "token revoked",
            hashes[2]: "token expired",
            hashes[4]: "token revoked",
            "0" * 64: "token revoked",
        }
        assert await store.tokens.refusal(hashes[0], now=T0 + 2 * HOUR) is None
        assert await store.tokens.refusal(hashes[0], now=T0 + 8 * HOUR) == "token expired"
        many = [sha256(str(i)) for i in range(1200)]  # more than one query's worth
        assert len(await store.tokens.refusals(many, now=T0)) == 1200

    target.run(body)


def test_removed_user_tokens_stay_revoked_when_the_name_is_reused(target: Target) -> None:
    """Hostile: remove alice, create a new alice: the old alice's tokens must not work."""

    async def body(store: database.SQLStore) -> None:
        await store.users.add_hashed("alice", "scrypt$old", ["ops"], now=T0)
        old = await store.tokens.add("alice", "api", 8 * HOUR, now=T0)
        assert await store.users.remove("alice", now=T0 + HOUR) == 1
        with pytest.raises(TokenRefused, match=r"^token revoked \(its user was removed\)$"):
            await store.tokens.check(old.token, now=T0 + HOUR)
        await store.users.add_hashed("alice", "scrypt$new", ["ops"], now=T0 + 2 * HOUR)
        with pytest.raises(TokenRefused, match=r"^token revoked$"):
            await store.tokens.check(old.token, now=T0 + 2 * HOUR)
        assert await store.tokens.refusal(sha256(old.token), now=T0 + 2 * HOUR) == "token revoked"
        assert await store.tokens.renew(old.token, HOUR, now=T0 + 2 * HOUR) is None

    target.run(body)


def test_login_token_cap_revokes_the_oldest(target: Target) -> None:
    async def body(store: database.SQLStore) -> None:
        await store.users.add_hashed("alice", "scrypt$x", [], now=T0)
        await store.users.add_hashed("bob", "scrypt$x", [], now=T0)
        api = await store.tokens.add("alice", "api", 100 * HOUR, now=T0)  # API tokens do not count
        short = await store.tokens.add("alice", "login", HOUR, now=T0)  # expired: does not count
        bobs = await store.tokens.add("bob", "login", 100 * HOUR, now=T0)  # another user's
        issued = [
            await store.tokens.add("alice", "login", 8 * HOUR, now=T0 + i * HOUR, cap=3) for i in range(1, 6)
        ]
        assert [t.revoked for t in issued] == [(), (), (), (issued[0].accessor,), (issued[1].accessor,)]
        now = T0 + 6 * HOUR
        for gone in issued[:2]:
            with pytest.raises(TokenRefused, match=r"^token revoked$"):
                await store.tokens.check(gone.token, now=now)
        for kept in [*issued[2:], api, bobs]:
            assert await store.tokens.check(kept.token, now=now) is not None
        with pytest.raises(TokenRefused, match=r"^token expired$"):
            await store.tokens.check(short.token, now=now)

    target.run(body)


def test_concurrent_writers(target: Target) -> None:
    async def body(store: database.SQLStore) -> None:
        await store.users.add_hashed("alice", "scrypt$x", [], now=T0)
        await store.users.add_hashed("bob", "scrypt$x", [], now=T0)
        issued = await asyncio.gather(*(store.tokens.add("alice", "api", HOUR, now=T0) for _ in range(50)))
        listed = {t.accessor for t in await store.tokens.entries()}
        assert listed == {t.accessor for t in issued} and len(listed) == 50
        for one in issued:
            assert await store.tokens.check(one.token, now=T0) is not None
        # Concurrent logins under a cap: the user's row lock makes each count the others.
        logins = await asyncio.gather(
            *(store.tokens.add("bob", "login", HOUR, now=T0, cap=5) for _ in range(30))
        )
        live = [t for t in await store.tokens.entries() if t.user == "bob" and t.state(T0) == "valid"]
        assert len(live) == 5
        assert sum(len(t.revoked) for t in logins) == 25
        sites = await asyncio.gather(*(store.sites.add(f"site-{i}", now=T0) for i in range(20)))
        for i, token in enumerate(sites):
            assert await store.sites.check(f"site-{i}", token)

    target.run(body)


# --- policy sets --------------------------------------------------------------------------


def test_policy_sets_are_validated_and_versioned(target: Target) -> None:
    async def body(store: database.SQLStore) -> None:
        assert await store.policies.version() is None
        assert await store.policies.current() is None
        assert await store.policies.apply(POLICIES, now=T0, applied_by="admin:cc3a4a20") == 1
        with pytest.raises(UsageError, match=r"^policies.toml: policy ops rule 1: unknown key 'colour'$"):
            await store.policies.apply(POLICIES + 'colour = "red"\n', now=T0, source="policies.toml")
        with pytest.raises(UsageError, match="policy set: "):
            await store.policies.apply("[[policies", now=T0)
        with pytest.raises(UsageError, match="larger than"):
            await store.policies.apply("#" * (1 << 20 | 1), now=T0)
        assert await store.policies.version() == 1  # nothing stored by the refusals
        second = POLICIES.replace("paris-*", "berlin")
        assert await store.policies.apply(second, now=T0 + HOUR) == 2
        current = await store.policies.current()
        assert current == database.PolicySet(2, second, T0 + HOUR, None)
        assert await store.policies.get(1) == database.PolicySet(1, POLICIES, T0, "admin:cc3a4a20")
        assert await store.policies.get(3) is None
        assert await store.policies.history() == [(1, T0, "admin:cc3a4a20"), (2, T0 + HOUR, None)]
        assert await store.policies.apply(second, now=T0, applied_by="u" * 200) == 3  # cut, not refused
        assert (await store.policies.history())[-1][2] == "u" * 80

    target.run(body)


# --- audit ----------------------------------------------------------------------------------


def audit_record(moment: datetime.datetime, event: str, user: str | None, site: str | None) -> dict[str, Any]:
    rec = record(event, user=user, site=site, result="ok")
    rec["time"] = moment.isoformat(timespec="milliseconds")
    return rec


def test_audit_append_query_retention(target: Target) -> None:
    records = [
        audit_record(T0, "login", "alice", None),
        audit_record(T0 + HOUR, "session-accepted", "alice", "paris-1"),
        audit_record(T0 + 2 * HOUR, "session-refused", None, "nowhere"),
        audit_record(T0 + 3 * HOUR, "stream-closed", "bob", "paris-1"),
    ]

    async def body(store: database.SQLStore) -> None:
        assert await store.audit.last_id() == 0
        assert await store.audit.append(records) == 4
        assert await store.audit.append([]) == 0
        everything = await store.audit.query()
        assert [row.line for row in everything] == [encode(rec) for rec in records]
        assert [row.record for row in everything] == records
        assert everything[0].line == json.dumps(records[0], ensure_ascii=True, separators=(",", ":"))

        def events(rows: list[database.AuditRow]) -> list[str]:
            return [row.record["event"] for row in rows]

        assert events(await store.audit.query(user="alice")) == ["login", "session-accepted"]
        assert events(await store.audit.query(site="paris-1")) == ["session-accepted", "stream-closed"]
        assert events(await store.audit.query(event="session-refused")) == ["session-refused"]
        assert events(await store.audit.query(since=T0 + 2 * HOUR)) == ["session-refused", "stream-closed"]
        assert events(await store.audit.query(user="alice", site="paris-1")) == ["session-accepted"]
        assert events(await store.audit.query(after_id=everything[1].id)) == [
            "session-refused",
            "stream-closed",
        ]
        assert events(await store.audit.query(limit=1)) == ["login"]
        assert await store.audit.last_id() == everything[-1].id

        bad = audit_record(T0, "login", "x", None)
        bad["time"] = "yesterday"
        with pytest.raises(ValueError):
            await store.audit.append([audit_record(T0, "login", "carol", None), bad])
        assert await store.audit.query(user="carol") == []  # a batch is all or nothing

        assert await store.audit.delete_before(T0 + 2 * HOUR, batch=1) == 2
        assert events(await store.audit.query()) == ["session-refused", "stream-closed"]
        assert await store.audit.count() == 2

    target.run(body)


def test_audit_hostile_values(target: Target) -> None:
    """Hostile: what a client puts in a URL lands in the audit's filter columns.  A NUL (which
    PostgreSQL's text refuses), a lone surrogate (not encodable) or a value longer than an
    index entry may be must not make the append fail, losing the whole batch."""
    injected = "x' OR '1'='1"
    long_site = secrets.token_hex(2500)  # random: PostgreSQL cannot compress it into an index entry
    records = [
        audit_record(T0, "session-refused", None, "a\x00b"),
        audit_record(T0, "session-refused", None, "bad\udc80site"),
        audit_record(T0, "session-refused", None, long_site),
        audit_record(T0, "session-refused", injected, None),
        audit_record(T0, "login", "alice", None),
    ]

    async def body(store: database.SQLStore) -> None:
        assert await store.audit.append(records) == 5
        rows = await store.audit.query()
        assert [row.record for row in rows] == records  # the lines keep every value whole
        assert all(row.line.isascii() for row in rows)
        assert [r.record["site"] for r in await store.audit.query(site="a\ufffdb")] == ["a\x00b"]
        assert [r.record["site"] for r in await store.audit.query(site=long_site[:256])] == [long_site]
        assert [r.record["user"] for r in await store.audit.query(user=injected)] == [injected]
        assert await store.audit.query(user="x' OR 1=1 --") == []

    target.run(body)


# --- schema revisions ------------------------------------------------------------------------


def test_create_refuses_an_existing_store_unless_replaced(target: Target) -> None:
    target.run(lambda store: store.sites.add("paris-1", now=T0))
    with pytest.raises(UsageError, match="already"):
        target.create()
    target.create(replace=True)
    assert target.run(lambda store: store.sites.names()) == []


def test_open_refuses_a_newer_schema(target: Target) -> None:
    target.execute("UPDATE alembic_version SET version_num = '9999'")
    message = target.open_error()
    assert "schema revision 9999, newer than this control-tower knows" in message
    assert f"({database.head()})" in message and "control-tower migrate" in message
    assert "\n" not in message
    with pytest.raises(UsageError, match="9999, newer"):
        target.upgrade()  # refused, nothing changed
    assert target.execute("SELECT version_num FROM alembic_version") == [("9999",)]


def test_head_is_alembics_head() -> None:
    from supctl.tower.database import versions

    assert versions.scripts().get_current_head() == database.head() == versions.HEAD


def test_opening_a_store_at_head_does_not_import_alembic(tmp_path: Path) -> None:
    """serve and every admin command open the store: the revision check is one SELECT, not
    Alembic (10 MiB of the tower's RSS, 0.2-0.3 s of each command's start-up)."""
    asyncio.run(database.create(tmp_path / "tower.db"))
    script = textwrap.dedent(f"""
        import asyncio, sys
        from supctl.tower import database

        async def main():
            store = await database.open({str(tmp_path / "tower.db")!r})
            await store.sites.names()
            await store.close()

        asyncio.run(main())
        print(sorted(name for name in sys.modules if name.split(".")[0] in ("alembic", "mako")))
    """)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


def test_migrate_from_an_older_revision(blank: Target) -> None:
    blank.create(revision="0001")
    # A site as revision 0001 stored it (no 'rotated' column yet).
    token = "sct_site_old"
    blank.execute(
        "INSERT INTO sites (name, token_hash, accessor, created) "
        f"VALUES ('paris-1', '{sha256(token)}', '{sha256(token)[:8]}', {schema.to_moment(T0)})"
    )
    message = blank.open_error()
    assert message == (
        f"store {database.locate(blank.url).description} has schema revision 0001,"
        f" older than this control-tower's {database.head()}: run control-tower migrate"
    )
    done = blank.upgrade()
    assert (done.before, done.after) == ("0001", database.head())
    assert str(done) == f"upgraded the store's schema from revision 0001 to {database.head()}"

    async def body(store: database.SQLStore) -> None:
        assert await store.sites.check("paris-1", token)
        assert [(s.name, s.created, s.rotated) for s in await store.sites.entries()] == [
            ("paris-1", T0, None)
        ]

    blank.run(body)
    assert "nothing to do" in str(blank.upgrade())


def test_migrate_an_empty_database(blank: Target) -> None:
    if blank.backend == "sqlite":
        Path(blank.url).touch()
    assert "has no schema" in blank.open_error()
    assert blank.upgrade().before is None
    assert blank.run(lambda store: store.sites.names()) == []


def test_schema_module_matches_the_migrations(target: Target) -> None:
    async def main() -> list[Any]:
        store = await database.open(target.url, password_file=target.password_file)
        try:
            async with store.db.read() as conn:
                return await conn.run_sync(
                    lambda sync: compare_metadata(MigrationContext.configure(sync), schema.metadata)
                )
        finally:
            await store.close()

    assert asyncio.run(main()) == []


def test_open_refuses_a_missing_sqlite_file(tmp_path: Path) -> None:
    missing = tmp_path / "tower.db"
    with pytest.raises(UsageError, match=f"^store {missing} not found"):
        asyncio.run(database.open(missing))
    assert not missing.exists()  # opening never creates


def test_sqlite_files_are_private(tmp_path: Path) -> None:
    path = tmp_path / "tower.db"
    asyncio.run(database.create(path))

    async def body() -> None:
        store = await database.open(path)
        await store.sites.add("paris-1", now=T0)
        assert oct(path.stat().st_mode & 0o777) == "0o600"
        assert oct(Path(f"{path}-wal").stat().st_mode & 0o777) == "0o600"
        await store.close()

    asyncio.run(body())
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_urls_never_carry_a_password() -> None:
    with pytest.raises(UsageError) as caught:
        database.locate("postgresql://tower:s3cret@db.example/tower")
    assert "must not contain a password" in str(caught.value) and "s3cret" not in str(caught.value)
    with pytest.raises(UsageError, match="unsupported store 'mysql'"):
        database.locate("mysql://tower@db.example/tower")
    location = database.locate("postgresql://tower@db.example:5433/tower")
    assert location.description == "postgresql://tower@db.example:5433/tower"
    assert location.url.drivername == "postgresql+asyncpg"
    assert database.locate("sqlite:////srv/tower/tower.db").sqlite_path == Path("/srv/tower/tower.db")


def test_unreachable_postgresql_is_unavailable(tmp_path: Path) -> None:
    url = f"postgresql://tower@/tower?host={tmp_path}"  # no server behind this socket directory
    with pytest.raises(database.StoreUnavailable) as caught:
        asyncio.run(database.open(url, environ={}))
    assert str(caught.value).startswith(f"the store {url} is unavailable: ")
    assert "\n" not in str(caught.value)


@pytest.fixture
def pg_target(pg_cluster: PostgresCluster, tmp_path: Path) -> Iterator[Target]:
    name = "t_" + uuid.uuid4().hex[:16]
    url = pg_cluster.create_database(name)
    try:
        yield Target("postgresql", url, pg_cluster.write_password_file(tmp_path / "pw"), pg_cluster, name)
    finally:
        pg_cluster.drop_database(name)


def test_postgresql_password_from_file_or_environment(pg_target: Target, tmp_path: Path) -> None:
    assert pg_target.cluster is not None
    pg_target.create()
    environ = {database.PASSWORD_ENV: pg_target.cluster.password}

    async def from_environment() -> None:
        store = await database.open(pg_target.url, environ=environ)
        await store.close()

    asyncio.run(from_environment())
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-password\n")
    with pytest.raises(database.StoreUnavailable, match="password authentication failed") as caught:
        asyncio.run(database.open(pg_target.url, password_file=wrong))
    assert "not-the-password" not in str(caught.value)
    with pytest.raises(UsageError, match="cannot read the store password file"):
        asyncio.run(database.open(pg_target.url, password_file=tmp_path / "absent"))


# --- importing the JSON files -----------------------------------------------------------------


def make_json_tower(directory: Path) -> dict[str, Any]:
    """A tower's files written by the JSON code itself; the tokens it handed out."""
    state = users = OldTower(directory)
    made: dict[str, Any] = {"admin": state.add_admin_token(), "site": state.add_site("paris-1")}
    users.add_user("alice", "alice's password", ["ops"])
    users.add_user("bob", "bob's password", [])
    made["login"] = users.add_token("alice", "login", datetime.timedelta(hours=8))
    made["api"] = users.add_token("bob", "api", datetime.timedelta(days=90))
    made["revoked"] = users.add_token("alice", "api", datetime.timedelta(days=1))
    users.revoke(made["revoked"][1])
    (directory / "policies.toml").write_text(POLICIES)
    # As towers before the store wrote it: one encoded record per line.
    old_records = (record("login", user="alice", accessor=made["login"][1]), record("show", user="admin"))
    (directory / "audit.jsonl").write_text("".join(encode(rec) + "\n" for rec in old_records))
    with open(directory / "audit.jsonl", "a") as f:
        f.write('{"time": "cut by a full di\n{"event": "no time"}\n')
    made["audit"] = (directory / "audit.jsonl").read_text().splitlines()[:2]
    return made


def json_files(directory: Path) -> tuple[Path, Path, Path, Path]:
    names = ("state.json", "users.json", "policies.toml", "audit.jsonl")
    return tuple(directory / name for name in names)  # type: ignore[return-value]


def test_import_json_files_keeps_every_token_working(target: Target, tmp_path: Path) -> None:
    made = make_json_tower(tmp_path)
    now = datetime.datetime.now(datetime.UTC)

    async def body(store: database.SQLStore) -> None:
        summary = await database.import_files(store, *json_files(tmp_path), now=now)
        assert str(summary) == (
            "imported 1 admin token, 1 site, 2 users, 3 login/API tokens, policy set version 1,"
            " 2 audit records; 2 audit lines that are not records skipped"
        )
        assert await store.admins.check(made["admin"]) == sha256(made["admin"])[:8]
        assert await store.sites.check("paris-1", made["site"])
        login = await store.tokens.check(made["login"][0], now=now)
        assert login is not None and (login.user, login.policies, login.kind) == ("alice", ("ops",), "login")
        assert login.accessor == made["login"][1]
        api = await store.tokens.check(made["api"][0], now=now)
        assert api is not None and api.user == "bob"
        with pytest.raises(TokenRefused, match=r"^token revoked$"):
            await store.tokens.check(made["revoked"][0], now=now)
        stored = await store.users.password_hash("alice")
        assert stored is not None and check_password("alice's password", stored)
        current = await store.policies.current()
        assert current is not None and current.text == POLICIES and current.applied_by == "import"
        assert [row.line for row in await store.audit.query()] == made["audit"]  # byte for byte
        assert [row.record["event"] for row in await store.audit.query(user="alice")] == ["login"]
        with pytest.raises(UsageError, match="already holds data"):
            await database.import_files(store, *json_files(tmp_path), now=now)

    target.run(body)


def test_import_missing_files_and_bad_ones(target: Target, tmp_path: Path) -> None:
    now = datetime.datetime.now(datetime.UTC)
    OldTower(tmp_path).add_site("paris-1")
    (tmp_path / "users.json").unlink()
    (tmp_path / "policies.toml").write_text("[[policies.x.rules]]\neffect = 'maybe'\n")

    async def body(store: database.SQLStore) -> None:
        with pytest.raises(UsageError, match=r"policies.toml: policy x rule 1: effect must be"):
            await database.import_files(store, *json_files(tmp_path), now=now)
        assert await store.sites.names() == []  # checked before anything was written
        (tmp_path / "policies.toml").unlink()
        state = json.loads((tmp_path / "state.json").read_text())
        state["admins"] = [{"hash": "not-a-hash"}]
        (tmp_path / "state.json").write_text(json.dumps(state))
        with pytest.raises(UsageError, match=r"state.json: an admin token has no valid SHA-256 hash"):
            await database.import_files(store, *json_files(tmp_path), now=now)
        state["admins"] = []
        (tmp_path / "state.json").write_text(json.dumps(state))
        summary = await database.import_files(store, *json_files(tmp_path), now=now)
        assert str(summary) == (
            "imported 0 admin tokens, 1 site, 0 users, 0 login/API tokens, no policy set, 0 audit records;"
            " not found: users.json, policies.toml, audit.jsonl"
        )

    target.run(body)


# --- crash safety -------------------------------------------------------------------------------

BURST = textwrap.dedent(
    """
    import asyncio, datetime, sys
    from pathlib import Path
    from supctl.tower import database

    async def main():
        password = Path(sys.argv[2]) if sys.argv[2] else None
        store = await database.open(sys.argv[1], password_file=password)
        now = datetime.datetime.now(datetime.UTC)
        while True:
            issued = await store.tokens.add("alice", "api", datetime.timedelta(days=1), now=now)
            sys.stdout.write(issued.token + "\\n")  # only once the commit returned
            sys.stdout.flush()

    asyncio.run(main())
    """
)


def read_lines_until(proc: subprocess.Popen[bytes], count: int, deadline: float) -> list[str]:
    assert proc.stdout is not None
    data = b""
    while (lines := data.count(b"\n")) < count:
        left = deadline - time.monotonic()
        assert left > 0, f"the burst reported {lines} commits in time, wanted {count}"
        ready, _, _ = select.select([proc.stdout], [], [], left)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 65536)
            assert chunk, f"the burst exited early: {proc.wait()}"
            data += chunk
    return data.decode().splitlines()


def test_kill_9_during_a_burst_loses_no_committed_token(target: Target) -> None:
    target.run(lambda store: store.users.add_hashed("alice", "scrypt$x", [], now=T0))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    password = str(target.password_file or "")
    proc = subprocess.Popen(
        [sys.executable, "-c", BURST, target.url, password], stdout=subprocess.PIPE, env=env
    )
    try:
        reported = read_lines_until(proc, 200, time.monotonic() + 60)
    finally:
        proc.send_signal(signal.SIGKILL)
        rest, _ = proc.communicate(timeout=30)
    reported += [line for line in rest.decode().splitlines() if line]  # flushed before the kill
    complete = [line for line in reported if len(line) == len("sct_api_") + 43]  # a cut last line

    async def body(store: database.SQLStore) -> None:
        now = datetime.datetime.now(datetime.UTC)
        for token in complete:
            assert await store.tokens.check(token, now=now) is not None, token
        assert len(await store.tokens.entries()) >= len(complete)
        await store.tokens.add("alice", "api", HOUR, now=now)  # and it takes writes

    target.run(body)
    assert len(complete) >= 200
    if target.backend == "sqlite":
        with sqlite3.connect(target.url) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)


# --- packaging ------------------------------------------------------------------------------------


def test_every_package_is_listed_in_setup_cfg() -> None:
    """The migrations ship in wheels only if their packages are listed (setup.cfg is explicit)."""
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    listed = set(config["options"]["packages"].split())
    found = {
        ".".join(path.parent.relative_to(REPO).parts)
        for path in (REPO / "supctl").rglob("__init__.py")
        if "__pycache__" not in path.parts
    }
    assert found <= listed, sorted(found - listed)
    versions = REPO / "supctl/tower/database/migrations/versions"
    assert sorted(p.name for p in versions.glob("0*.py")) == [
        "0001_initial.py",
        "0002_site_rotation.py",
        "0003_generation.py",
        "0004_cluster.py",
        "0005_peering.py",
    ]
