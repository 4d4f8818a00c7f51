"""The tower's data as the JSON files held it: admin and site tokens, users, login and
API tokens, policy sets and the audit log.

Revision ID: 0001
Revises: (none)
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision: str | None = None
branch_labels = None
depends_on = None

# Fixed here, not imported: a migration must do the same thing for ever.
_ROW_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "admin_tokens",
        sa.Column("hash", sa.String(64), nullable=False),
        sa.Column("accessor", sa.String(8), nullable=False),
        sa.Column("created", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("hash", name="pk_admin_tokens"),
    )
    op.create_index("ix_admin_tokens_accessor", "admin_tokens", ["accessor"])
    op.create_table(
        "sites",
        sa.Column("name", sa.String(63), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("accessor", sa.String(8), nullable=False),
        sa.Column("created", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_sites"),
        sa.UniqueConstraint("token_hash", name="uq_sites_token_hash"),
    )
    op.create_table(
        "users",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("password", sa.String(255), nullable=False),
        sa.Column("policies", sa.JSON(), nullable=False),
        sa.Column("created", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_users"),
    )
    op.create_table(
        "user_tokens",
        sa.Column("id", _ROW_ID, autoincrement=True, nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.Column("accessor", sa.String(8), nullable=False),
        sa.Column("user_name", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("created", sa.BigInteger(), nullable=False),
        sa.Column("expires", sa.BigInteger(), nullable=False),
        sa.Column("revoked", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_user_tokens"),
        sa.UniqueConstraint("hash", name="uq_user_tokens_hash"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_user_tokens_accessor", "user_tokens", ["accessor"])
    op.create_index("ix_user_tokens_user_name", "user_tokens", ["user_name"])
    op.create_index("ix_user_tokens_expires", "user_tokens", ["expires"])
    op.create_table(
        "policy_sets",
        sa.Column("version", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("applied", sa.BigInteger(), nullable=False),
        sa.Column("applied_by", sa.String(80), nullable=True),
        sa.PrimaryKeyConstraint("version", name="pk_policy_sets"),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "audit",
        sa.Column("id", _ROW_ID, autoincrement=True, nullable=False),
        sa.Column("time", sa.BigInteger(), nullable=False),
        sa.Column("event", sa.String(32), nullable=False),
        sa.Column("user_name", sa.Text(), nullable=True),
        sa.Column("site", sa.Text(), nullable=True),
        sa.Column("record", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_audit"),
        sqlite_autoincrement=True,
    )
    for column in ("time", "event", "user_name", "site"):
        op.create_index(f"ix_audit_{column}", "audit", [column])


def downgrade() -> None:
    for table in ("audit", "policy_sets", "user_tokens", "users", "sites", "admin_tokens"):
        op.drop_table(table)
