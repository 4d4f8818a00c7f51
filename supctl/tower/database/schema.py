"""The tables of the store at the newest schema revision, for the queries (SQLAlchemy Core).

This module describes the schema the code reads and writes; the migrations in
``migrations/versions/`` build it step by step and never import this module (a
migration must keep doing what it did when it was written, whatever this file
becomes).  ``tests/test_database.py`` checks that the two agree.

Times are :class:`Moment` columns: microseconds since the Unix epoch, UTC, in a
64-bit integer.  The same type on SQLite and PostgreSQL, exact (no float), and
compared in SQL as plain integers: expiry and ``--since`` need no dialect's date
functions.
"""

from __future__ import annotations

import datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Dialect,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    false,
)

EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
_MICROSECOND = datetime.timedelta(microseconds=1)


class Moment(TypeDecorator[datetime.datetime]):
    """An aware datetime stored as integer microseconds since the epoch (UTC)."""

    impl = BigInteger
    cache_ok = True

    def process_bind_param(self, value: datetime.datetime | None, dialect: Dialect) -> int | None:
        if value is None:
            return None
        if value.tzinfo is None:
            # A naive time is a bug in the caller: local or UTC? Never guess.
            raise ValueError(f"naive datetime {value!r} given to the store")
        return (value - EPOCH) // _MICROSECOND

    def process_result_value(self, value: int | None, dialect: Dialect) -> datetime.datetime | None:
        return None if value is None else EPOCH + value * _MICROSECOND


def to_moment(value: datetime.datetime) -> int:
    """What a :class:`Moment` column holds for ``value`` (for raw SQL in migrations and tests)."""
    return (value - EPOCH) // _MICROSECOND


#: A row id: BIGINT on PostgreSQL, INTEGER on SQLite (only that is an alias of the rowid,
#: which makes it the autoincrementing key).
RowId = BigInteger().with_variant(Integer(), "sqlite")

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_name)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "pk": "pk_%(table_name)s",
    }
)

#: Admin tokens (``sct_admin_...``): users ``admin`` with the built-in policy allow-all.
#: Revoking one deletes its row, as ``state.json`` did.
admin_tokens = Table(
    "admin_tokens",
    metadata,
    Column("hash", String(64), primary_key=True),  # SHA-256 hex of the token
    Column("accessor", String(8), nullable=False, index=True),  # hash[:8], names it in logs
    Column("created", Moment(), nullable=False),
)

#: Sites and the hash of each one's token (one valid token per site).
sites = Table(
    "sites",
    metadata,
    Column("name", String(63), primary_key=True),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("accessor", String(8), nullable=False),
    Column("created", Moment(), nullable=False),
    Column("rotated", Moment(), nullable=True),  # when the token was last replaced (revision 0002)
)

users = Table(
    "users",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("password", String(255), nullable=False),  # scrypt$n$r$p$salt$digest (users.hash_password)
    Column("policies", JSON(), nullable=False),  # list of policy names, in the order given
    Column("created", Moment(), nullable=False),
)

#: Login (``sct_login_...``) and API (``sct_api_...``) tokens.  No foreign key to users: a
#: token outlives its user's removal (revoked) so that using it says why it stopped working.
user_tokens = Table(
    "user_tokens",
    metadata,
    Column("id", RowId, primary_key=True, autoincrement=True),  # ties of ``created`` (cap)
    Column("hash", String(64), nullable=False, unique=True),
    Column("accessor", String(8), nullable=False, index=True),
    Column("user_name", String(64), nullable=False, index=True),
    Column("kind", String(8), nullable=False),  # "login" or "api"
    Column("created", Moment(), nullable=False),
    Column("expires", Moment(), nullable=False, index=True),
    Column("revoked", Moment(), nullable=True),  # kept until long after expiry: "token revoked"
    sqlite_autoincrement=True,
)

#: Every policy set applied, kept: the one in force is the highest version.
policy_sets = Table(
    "policy_sets",
    metadata,
    Column("version", Integer(), primary_key=True, autoincrement=True),
    Column("text", Text(), nullable=False),  # the TOML as applied (validated first)
    Column("applied", Moment(), nullable=False),
    Column("applied_by", String(80), nullable=True),
    sqlite_autoincrement=True,
)

#: One row per audit record (docs/audit.md): the record as its JSON line, and the fields
#: ``control-tower audit`` filters on as indexed columns.  Text, not VARCHAR(n): a value
#: a client chose (a requested site) must never make an append fail.
audit = Table(
    "audit",
    metadata,
    Column("id", RowId, primary_key=True, autoincrement=True),  # ``after_id`` follows it
    Column("time", Moment(), nullable=False, index=True),
    Column("event", String(32), nullable=False, index=True),
    Column("user_name", Text(), nullable=True, index=True),
    Column("site", Text(), nullable=True, index=True),
    Column("record", Text(), nullable=False),  # compact JSON, ensure_ascii, as audit.jsonl had
    sqlite_autoincrement=True,
)

#: One row (id 1): bumped by every write to the tables above but the audit, in the same
#: transaction (``engine.Database.write(bump=True)``).  A tower polls it to know whether
#: its in-memory copy of the credentials and policies is current (revision 0003).
generation = Table(
    "generation",
    metadata,
    Column("id", Integer(), primary_key=True, autoincrement=False),
    Column("value", BigInteger(), nullable=False),
)

#: The tower processes serving this store (revision 0004): each one updates its
#: ``heartbeat`` every few seconds; a row whose heartbeat is older than the expiry is a
#: replica that is gone (``supctl.tower.database.cluster``).
replicas = Table(
    "replicas",
    metadata,
    Column("id", String(63), primary_key=True),  # [cluster] id, or "tower"
    Column("host", String(255), nullable=False),
    Column("pid", Integer(), nullable=False),
    Column("started", Moment(), nullable=False),
    Column("heartbeat", Moment(), nullable=False),
    # wss://HOST:PORT of its peer listener (revision 0005); None: it relays for no one.
    Column("advertise", String(255), nullable=True),
    # SIGTERM (revision 0005): another replica may claim its sites at once.
    Column("draining", Boolean(), nullable=False, server_default=false()),
)

#: Which replica holds each connected site's link (revision 0004).  A row counts only
#: while its replica's heartbeat is fresh: one heartbeat per replica, not per site.
site_presence = Table(
    "site_presence",
    metadata,
    Column("site", String(63), primary_key=True),
    Column("replica", String(63), nullable=False, index=True),
    Column("peer", String(255), nullable=False),  # the enforcer's address
    Column("since", Moment(), nullable=False),
    # The site's HELLO, updated by each STATUS, as JSON (revision 0005): what the other
    # replicas authorise a session for that site against, and show.
    Column("info", Text(), nullable=True),
)
