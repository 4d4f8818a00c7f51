"""A tower directory as the code before the store wrote it: ``state.json`` (admin and site
tokens) and ``users.json`` (users, login and API tokens), in exactly that code's layout.

``control-tower migrate`` imports these files (supctl.tower.database.importer); the
tests make them here, since the code that wrote them is gone.
"""

from __future__ import annotations

import datetime
import json
import secrets
from pathlib import Path
from typing import Any

from supctl.tower.store import hash_token, new_token
from supctl.tower.users import API_PREFIX, LOGIN_PREFIX, hash_password, iso


def _now() -> str:
    return iso(datetime.datetime.now(datetime.UTC))


class OldTower:
    """Writes ``DIR/state.json`` and ``DIR/users.json`` (mode 0600), as the JSON stores did."""

    def __init__(self, directory: Path) -> None:
        self.state_path, self.users_path = directory / "state.json", directory / "users.json"
        self.state: dict[str, Any] = {"admins": [], "sites": {}}
        self.users: dict[str, Any] = {"users": {}, "tokens": []}
        self._save()

    def _save(self) -> None:
        for path, data in ((self.state_path, self.state), (self.users_path, self.users)):
            path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
            path.chmod(0o600)

    def add_admin_token(self) -> str:
        token = new_token("admin")
        digest = hash_token(token)
        self.state["admins"].append({"hash": digest, "accessor": digest[:8], "created": _now()})
        self._save()
        return token

    def add_site(self, name: str) -> str:
        token = new_token("site")
        digest = hash_token(token)
        self.state["sites"][name] = {"token-hash": digest, "accessor": digest[:8], "created": _now()}
        self._save()
        return token

    def add_user(self, name: str, password: str, policies: list[str]) -> None:
        self.users["users"][name] = {
            "password": hash_password(password),
            "policies": policies,
            "created": _now(),
        }
        self._save()

    def add_token(self, user: str, kind: str, lifetime: datetime.timedelta) -> tuple[str, str, str]:
        """(token, accessor, expires ISO), as UserStore.add_token returned."""
        token = (LOGIN_PREFIX if kind == "login" else API_PREFIX) + secrets.token_urlsafe(32)
        digest = hash_token(token)
        expires = iso(datetime.datetime.now(datetime.UTC) + lifetime)
        self.users["tokens"].append(
            {
                "hash": digest,
                "accessor": digest[:8],
                "user": user,
                "kind": kind,
                "created": _now(),
                "expires": expires,
                "revoked": None,
            }
        )
        self._save()
        return token, digest[:8], expires

    def revoke(self, accessor: str) -> None:
        for entry in self.users["tokens"]:
            if entry["accessor"] == accessor:
                entry["revoked"] = _now()
        self._save()
