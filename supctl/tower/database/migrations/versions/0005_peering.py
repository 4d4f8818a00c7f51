"""Peering: each replica's advertised peer address (other replicas relay to it the
streams of the sites it holds) and whether it drains (its sites may move at once), and
what a held site reported in its HELLO and last STATUS, so that every replica authorises
and shows a site held by another one.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision: str | None = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("replicas") as batch:
        batch.add_column(sa.Column("advertise", sa.String(255), nullable=True))
        batch.add_column(sa.Column("draining", sa.Boolean(), nullable=False, server_default=sa.false()))
    with op.batch_alter_table("site_presence") as batch:
        batch.add_column(sa.Column("info", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("site_presence") as batch:
        batch.drop_column("info")
    with op.batch_alter_table("replicas") as batch:
        batch.drop_column("draining")
        batch.drop_column("advertise")
