"""Site token rotation: when a site's token was last replaced (``control-tower site rotate``).

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision: str | None = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("sites", sa.Column("rotated", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("sites") as batch:  # SQLite drops a column by copying the table
        batch.drop_column("rotated")
