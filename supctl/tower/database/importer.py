"""Bring a tower's JSON files into a new store, so that every existing token keeps working.

Token and password hashes are copied as they are (the store hashes tokens the
same way).  Everything is read and checked first, then written in one
transaction: a failed import leaves the store empty, ready for another try, and
a store that already holds data is refused (importing twice would duplicate the
audit log).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from sqlalchemy import func, insert, select

from supctl.errors import UsageError
from supctl.protocol.names import valid_site_name

from .accounts import FORGET_AFTER, KINDS, check_user_name
from .auditlog import lines_to_rows
from .engine import LOCK_AUDIT, LOCK_MIGRATE, serialise
from .policysets import validate
from .schema import admin_tokens, audit, policy_sets, sites, user_tokens, users
from .sqlstore import SQLStore

_HASH = re.compile(r"[0-9a-f]{64}")
#: Audit lines read and inserted at a time (bounded memory for a log of any size).
_AUDIT_CHUNK = 5000


@dataclass
class ImportSummary:
    admin_tokens: int = 0
    sites: int = 0
    users: int = 0
    tokens: int = 0
    tokens_forgotten: int = 0  # expired longer than the store remembers tokens
    policy_version: int | None = None
    audit_records: int = 0
    audit_skipped: int = 0  # lines that are not records (cut by a full disk, edited)
    missing: list[str] = field(default_factory=list)  # files that did not exist

    def __str__(self) -> str:
        parts = [
            _count(self.admin_tokens, "admin token"),
            _count(self.sites, "site"),
            _count(self.users, "user"),
            _count(self.tokens, "login/API token"),
            f"policy set version {self.policy_version}" if self.policy_version else "no policy set",
            _count(self.audit_records, "audit record"),
        ]
        notes = []
        if self.tokens_forgotten:
            notes.append(f"{_count(self.tokens_forgotten, 'long expired token')} left out")
        if self.audit_skipped:
            notes.append(f"{_count(self.audit_skipped, 'audit line')} that are not records skipped")
        if self.missing:
            notes.append("not found: " + ", ".join(self.missing))
        return "imported " + ", ".join(parts) + "".join(f"; {note}" for note in notes)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _bad(path: Path, why: str) -> UsageError:
    return UsageError(f"cannot import {path}: {why}")


def _time(value: Any, default: datetime.datetime) -> datetime.datetime:
    """An ISO time from a JSON file (naive means UTC), or ``default`` when absent or unreadable."""
    try:
        moment = datetime.datetime.fromisoformat(str(value))
    except ValueError:
        return default
    return moment if moment.tzinfo else moment.replace(tzinfo=datetime.UTC)


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise _bad(path, str(e)) from None


def _hash(value: Any, path: Path, what: str) -> str:
    if not isinstance(value, str) or not _HASH.fullmatch(value):
        raise _bad(path, f"{what} has no valid SHA-256 hash")
    return value


def read_state(path: Path, now: datetime.datetime) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows of admin_tokens and sites from ``state.json``."""
    raw = _load_json(path)
    if not isinstance(raw, dict) or not isinstance(raw.get("admins", []), list):
        raise _bad(path, "not a state file ('admins' must be a list)")
    if not isinstance(raw.get("sites", {}), dict):
        raise _bad(path, "not a state file ('sites' must be an object)")
    admins: dict[str, dict[str, Any]] = {}
    for entry in raw.get("admins", []):
        digest = _hash(entry.get("hash") if isinstance(entry, dict) else None, path, "an admin token")
        admins.setdefault(
            digest, {"hash": digest, "accessor": digest[:8], "created": _time(entry.get("created"), now)}
        )
    site_rows = []
    for name, entry in raw.get("sites", {}).items():
        if not valid_site_name(name) or not isinstance(entry, dict):
            raise _bad(path, f"invalid site {name!r}")
        digest = _hash(entry.get("token-hash"), path, f"site {name!r}")
        created = _time(entry.get("created"), now)
        site_rows.append({"name": name, "token_hash": digest, "accessor": digest[:8], "created": created})
    return list(admins.values()), site_rows


def read_users(
    path: Path, now: datetime.datetime, summary: ImportSummary
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows of users and user_tokens from ``users.json``."""
    raw = _load_json(path)
    if not isinstance(raw, dict) or not isinstance(raw.get("users", {}), dict):
        raise _bad(path, "not a users file ('users' must be an object)")
    if not isinstance(raw.get("tokens", []), list):
        raise _bad(path, "not a users file ('tokens' must be a list)")
    user_rows = []
    for name, entry in raw.get("users", {}).items():
        try:
            check_user_name(name)
        except UsageError as e:
            raise _bad(path, str(e)) from None
        password = entry.get("password") if isinstance(entry, dict) else None
        policies = entry.get("policies", []) if isinstance(entry, dict) else None
        if not isinstance(password, str) or not password.startswith("scrypt$"):
            raise _bad(path, f"user {name!r} has no scrypt password hash")
        if not isinstance(policies, list) or not all(isinstance(p, str) for p in policies):
            raise _bad(path, f"the policies of user {name!r} must be a list of names")
        created = _time(entry.get("created"), now)
        user_rows.append({"name": name, "password": password, "policies": policies, "created": created})
    known = {row["name"] for row in user_rows}
    token_rows: dict[str, dict[str, Any]] = {}
    for entry in raw.get("tokens", []):
        if not isinstance(entry, dict) or entry.get("kind") not in KINDS:
            raise _bad(path, "every token needs a kind, login or api")
        digest = _hash(entry.get("hash"), path, "a token")
        expires = _time(entry.get("expires"), now)
        if expires <= now - FORGET_AFTER:
            summary.tokens_forgotten += 1
            continue
        user = str(entry.get("user"))
        revoked = _time(entry["revoked"], now) if entry.get("revoked") else None
        if user not in known and revoked is None:
            revoked = now  # its user was removed: it says so when used, and a new user of that name
        token_rows.setdefault(  # does not inherit it
            digest,
            {
                "hash": digest,
                "accessor": digest[:8],
                "user_name": user,
                "kind": entry["kind"],
                "created": _time(entry.get("created"), now),
                "expires": expires,
                "revoked": revoked,
            },
        )
    return user_rows, list(token_rows.values())


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise _bad(path, str(e)) from None


def _chunks(f: TextIO) -> Iterator[list[str]]:
    chunk: list[str] = []
    for line in f:
        if line.endswith("\n"):  # a last line without newline was being written: not a record
            chunk.append(line.rstrip("\n"))
        if len(chunk) == _AUDIT_CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _existing(path: Path | None, summary: ImportSummary) -> Path | None:
    if path is None:
        return None
    if not path.exists():
        summary.missing.append(path.name)
        return None
    return path


async def import_files(
    store: SQLStore,
    state_json: Path | None,
    users_json: Path | None,
    policies_toml: Path | None,
    audit_jsonl: Path | None,
    *,
    now: datetime.datetime,
) -> ImportSummary:
    """Import the files that exist (None or a missing path: nothing of that kind)."""
    summary = ImportSummary()
    state = await asyncio.to_thread(_existing, state_json, summary)
    users_path = await asyncio.to_thread(_existing, users_json, summary)
    policies_path = await asyncio.to_thread(_existing, policies_toml, summary)
    audit_path = await asyncio.to_thread(_existing, audit_jsonl, summary)
    # Every file but the audit log is read and checked before anything is written.
    admin_rows, site_rows = await asyncio.to_thread(read_state, state, now) if state else ([], [])
    user_rows, token_rows = (
        await asyncio.to_thread(read_users, users_path, now, summary) if users_path else ([], [])
    )
    policy_text = None
    if policies_path is not None:
        policy_text = await asyncio.to_thread(_read_text, policies_path)
        await asyncio.to_thread(validate, policy_text, str(policies_path))
    async with store.db.write(bump=True) as conn:
        await serialise(conn, LOCK_MIGRATE)
        await serialise(conn, LOCK_AUDIT)
        for table in (admin_tokens, sites, users, user_tokens, policy_sets, audit):
            if await conn.scalar(select(func.count()).select_from(table)):
                raise UsageError(
                    f"the store {store.description} already holds data ({table.name}): nothing imported"
                )
        for table, rows in (
            (admin_tokens, admin_rows),
            (sites, site_rows),
            (users, user_rows),
            (user_tokens, token_rows),
        ):
            if rows:
                await conn.execute(insert(table), rows)
        if policy_text is not None:
            result = await conn.execute(
                insert(policy_sets).values(text=policy_text, applied=now, applied_by="import")
            )
            assert result.inserted_primary_key is not None
            summary.policy_version = int(result.inserted_primary_key[0])
        if audit_path is not None:
            f = await asyncio.to_thread(
                audit_path.open, "r", encoding="utf-8", errors="replace", newline="\n"
            )
            try:
                chunks = _chunks(f)
                while chunk := await asyncio.to_thread(next, chunks, None):
                    rows, skipped = lines_to_rows(chunk)
                    summary.audit_records += len(rows)
                    summary.audit_skipped += skipped
                    if rows:
                        await conn.execute(insert(audit), rows)
            finally:
                await asyncio.to_thread(f.close)
    summary.admin_tokens, summary.sites = len(admin_rows), len(site_rows)
    summary.users, summary.tokens = len(user_rows), len(token_rows)
    return summary
