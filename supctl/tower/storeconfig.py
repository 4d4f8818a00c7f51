"""Which store a ``tower.toml`` names, and opening it: the one place that turns the
configuration into a :class:`~supctl.tower.database.SQLStore`."""

from __future__ import annotations

import os

from . import database
from .config import TowerConfig


def store_target(config: TowerConfig) -> str | os.PathLike[str]:
    """``[store] url`` if set, else the SQLite file ``database`` (``DIR/tower.db``)."""
    return config.store_url if config.store_url is not None else config.database


async def open_store(config: TowerConfig) -> database.SQLStore:
    """Open the store (UsageError, one line: missing, or a schema other than this code's)."""
    return await database.open(store_target(config), password_file=config.store_password_file)
