"""Schema revisions, one file each, applied in ``down_revision`` order (Alembic skips this file)."""
