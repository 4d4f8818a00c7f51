"""Cluster membership: the tower processes serving this store (each heartbeats its row)
and which of them holds each connected site's link, so that a site has one live link
across every replica of the store.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision: str | None = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "replicas",
        sa.Column("id", sa.String(63), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("started", sa.BigInteger(), nullable=False),
        sa.Column("heartbeat", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_replicas"),
    )
    op.create_table(
        "site_presence",
        sa.Column("site", sa.String(63), nullable=False),
        sa.Column("replica", sa.String(63), nullable=False),
        sa.Column("peer", sa.String(255), nullable=False),
        sa.Column("since", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("site", name="pk_site_presence"),
    )
    op.create_index("ix_site_presence_replica", "site_presence", ["replica"])


def downgrade() -> None:
    op.drop_index("ix_site_presence_replica", "site_presence")
    op.drop_table("site_presence")
    op.drop_table("replicas")
