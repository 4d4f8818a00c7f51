"""What the ``control-tower`` admin commands do to the store (each one an asyncio.run).

The CLI (:mod:`.cli`) parses arguments and prints; these functions open the store
named by ``tower.toml``, make one change or read one listing, and close it.
"""

from __future__ import annotations

import asyncio
import datetime
import os
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from supctl.errors import UsageError

from . import database
from .config import TowerConfig
from .database import SQLStore
from .database.model import IssuedToken, PolicySet, SiteInfo, TokenInfo, UserInfo
from .policywatch import parse_policy_text
from .storeconfig import open_store, store_target

T = TypeVar("T")


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def with_store(config: TowerConfig, action: Callable[[SQLStore], Awaitable[T]]) -> T:
    """Open the store, run ``action`` on it, close it."""

    async def run() -> T:
        store = await open_store(config)
        try:
            return await action(store)
        finally:
            await store.close()

    return asyncio.run(run())


def check_store(config: TowerConfig) -> None:
    """Refuse now (one line) a store that serve could not use: missing, or a schema
    older (run control-tower migrate) or newer than this code."""
    with_store(config, _nothing)


async def _nothing(_store: SQLStore) -> None:
    return None


def create_store(target: str | os.PathLike[str], *, replace: bool, password_file: Path | None = None) -> str:
    """``control-tower init``: a new store at the newest schema (an SQLite file is mode
    0600) with one admin token, returned."""

    async def run() -> str:
        await database.create(target, replace=replace, password_file=password_file)
        store = await database.open(target, password_file=password_file)
        try:
            return await store.admins.add(now=now())
        finally:
            await store.close()

    return asyncio.run(run())


def add_site(config: TowerConfig, name: str) -> str:
    return with_store(config, lambda store: store.sites.add(name, now=now()))


def rotate_site(config: TowerConfig, name: str) -> str:
    return with_store(config, lambda store: store.sites.rotate(name, now=now()))


def remove_site(config: TowerConfig, name: str) -> None:
    with_store(config, lambda store: store.sites.remove(name))


def sites(config: TowerConfig) -> list[SiteInfo]:
    return with_store(config, lambda store: store.sites.entries())


def add_user(config: TowerConfig, name: str, password: str, policies: Sequence[str]) -> None:
    with_store(config, lambda store: store.users.add(name, password, policies, now=now()))


def remove_user(config: TowerConfig, name: str) -> int:
    return with_store(config, lambda store: store.users.remove(name, now=now()))


def users(config: TowerConfig) -> list[UserInfo]:
    return with_store(config, lambda store: store.users.entries())


def add_api_token(config: TowerConfig, user: str, lifetime: datetime.timedelta) -> IssuedToken:
    return with_store(config, lambda store: store.tokens.add(user, "api", lifetime, now=now()))


def tokens(config: TowerConfig) -> list[TokenInfo]:
    return with_store(config, lambda store: store.tokens.entries())


def revoke(config: TowerConfig, accessor: str) -> str | None:
    """Revoke the admin, login or API token with this accessor: None for an admin token,
    else the user whose token it was."""

    async def run(store: SQLStore) -> str | None:
        if await store.admins.revoke(accessor):
            return None
        return await store.tokens.revoke(accessor, now=now())

    return with_store(config, run)


def apply_policies(config: TowerConfig, path: Path, applied_by: str | None) -> int:
    """``control-tower policy apply FILE``: validate the file and store it as a new version."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read the policy file {path}: {exc}") from None
    parse_policy_text(text, str(path))  # the same checks and messages as a watched file
    return with_store(
        config, lambda store: store.policies.apply(text, now=now(), applied_by=applied_by, source=str(path))
    )


def policy_in_force(config: TowerConfig) -> PolicySet | None:
    return with_store(config, lambda store: store.policies.current())


def migrate(config: TowerConfig) -> list[str]:
    """``control-tower migrate``: create or upgrade the store's schema, then import the JSON
    files of a tower from before the store, if they exist and the store holds nothing
    yet.  What was done, a line each."""

    async def run() -> list[str]:
        target = store_target(config)
        password_file = config.store_password_file
        done: list[str] = []
        if config.store_url is None and not config.database.exists():
            await database.create(config.database)
            done.append(f"created the store {config.database} (schema revision {database.head()})")
        else:
            done.append(str(await database.upgrade(target, password_file=password_file)))
        old = [config.state, config.users, config.policies, config.audit]
        if not any(path.exists() for path in (config.state, config.users)):
            return done  # a tower made with the store: nothing of the old files to bring in
        store = await database.open(target, password_file=password_file)
        try:
            if await _holds_credentials(store):
                done.append(
                    f"{config.state.name} and {config.users.name} not imported: the store holds data already"
                )
                return done
            summary = await database.import_files(store, *old, now=now())
        finally:
            await store.close()
        done.append(str(summary))
        return done

    return asyncio.run(run())


async def _holds_credentials(store: SQLStore) -> bool:
    checks: list[Any] = [store.admins.entries(), store.sites.names(), store.users.entries()]
    return any([await check for check in checks]) or await store.policies.version() is not None
