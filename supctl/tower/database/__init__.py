"""The tower's persistent state in SQL: SQLite (embedded, the default) or PostgreSQL.

``supctl.tower.store`` and ``supctl.tower.users`` keep the same data in JSON
files; this package replaces them (docs/store.md).  Its API::

    await create(target)                 # control-tower init: a new store at the newest schema
    store = await open(target)           # refuses a schema older or newer than the code
    await upgrade(target)                # control-tower migrate
    await import_files(store, ...)       # state.json, users.json, policies.toml, audit.jsonl

    await store.sites.add("paris-1", now=now) ...   # see sqlstore.SQLStore
"""

from .engine import PASSWORD_ENV, StoreUnavailable, locate
from .importer import ImportSummary, import_files
from .model import (
    AdminInfo,
    AuditRow,
    Identity,
    IssuedToken,
    PolicySet,
    SiteInfo,
    TokenInfo,
    UserInfo,
)
from .sqlstore import SQLStore, open
from .versions import Upgrade, create, head, upgrade

__all__ = [
    "PASSWORD_ENV",
    "AdminInfo",
    "AuditRow",
    "Identity",
    "ImportSummary",
    "IssuedToken",
    "PolicySet",
    "SQLStore",
    "SiteInfo",
    "StoreUnavailable",
    "TokenInfo",
    "Upgrade",
    "UserInfo",
    "create",
    "head",
    "import_files",
    "locate",
    "open",
    "upgrade",
]
