"""The tower's token store: ``state.json`` with admin and site tokens, hashed.

Tokens are ``secrets.token_urlsafe(32)`` (256 random bits) behind a readable
prefix.  Only their SHA-256 is stored.  A slow password hash (scrypt, argon2)
exists to make guessing *low-entropy human passwords* expensive; against 2**256
equally likely tokens a brute force is hopeless whatever the hash costs, so a
plain SHA-256 loses nothing and keeps every request's check cheap.

The file is re-read whenever its identity (inode, size, mtime) changes, so a
``control-tower site add`` run beside a serving tower takes effect at once.
Every write replaces the file atomically, so a reader never sees half of one.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Literal, TypedDict

from supctl.errors import UsageError

TokenKind = Literal["admin", "site"]

TOKEN_PREFIXES: dict[TokenKind, str] = {"admin": "sct_admin_", "site": "sct_site_"}

# A DNS label: sites appear in URLs and host-like names, so keep them boring.
SITE_NAME_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


class AdminEntry(TypedDict):
    hash: str
    accessor: str
    created: str


# "token-hash" is not an identifier, hence the functional form.
SiteEntry = TypedDict("SiteEntry", {"token-hash": str, "accessor": str, "created": str})


class State(TypedDict):
    admins: list[AdminEntry]
    sites: dict[str, SiteEntry]


def new_token(kind: TokenKind) -> str:
    """A fresh random token such as ``sct_site_<43 url-safe chars>``."""
    return TOKEN_PREFIXES[kind] + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """SHA-256 hex of the token (see the module docstring for why that suffices)."""
    # surrogatepass: a header that decoded to lone surrogates must fail the check, not raise.
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def valid_site_name(name: str) -> bool:
    return SITE_NAME_RE.fullmatch(name) is not None


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` so readers see the old or the new file, never a mix.

    The temporary file is created with ``mode`` from the start, so secrets are
    never readable by others even for an instant.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)  # mkstemp gives 0600; widen only on request
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    # Make the rename itself durable, or a crash could bring back the old tokens.
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _bad(path: Path, why: str) -> UsageError:
    return UsageError(f"bad state file {path}: {why}")


def _parse_state(raw: object, path: Path) -> State:
    """Check the JSON shape so that a hand-edited file fails loudly, not at the first login."""
    if not isinstance(raw, dict):
        raise _bad(path, "not a JSON object")
    admins_raw, sites_raw = raw.get("admins", []), raw.get("sites", {})
    if not isinstance(admins_raw, list) or not isinstance(sites_raw, dict):
        raise _bad(path, "'admins' must be a list and 'sites' an object")
    admins: list[AdminEntry] = []
    for entry in admins_raw:
        if not isinstance(entry, dict) or not isinstance(entry.get("hash"), str):
            raise _bad(path, "every admin needs a 'hash' string")
        h = entry["hash"]
        admins.append(
            {
                "hash": h,
                "accessor": str(entry.get("accessor", h[:8])),
                "created": str(entry.get("created", "")),
            }
        )
    sites: dict[str, SiteEntry] = {}
    for name, entry in sites_raw.items():
        if not valid_site_name(name):
            raise _bad(path, f"invalid site name {name!r}")
        if not isinstance(entry, dict) or not isinstance(entry.get("token-hash"), str):
            raise _bad(path, f"site {name!r} needs a 'token-hash' string")
        h = entry["token-hash"]
        sites[name] = {
            "token-hash": h,
            "accessor": str(entry.get("accessor", h[:8])),
            "created": str(entry.get("created", "")),
        }
    return {"admins": admins, "sites": sites}


class TowerStore:
    """Admin and site tokens kept hashed in one JSON file.

    Every public method first re-reads the file if it changed on disk.  Methods
    raise :class:`UsageError` when the file is missing or malformed: a tower that
    cannot read its tokens must refuse everyone, not fall back to stale ones.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._stamp: tuple[int, int, int, int] | None = None
        self._state: State = {"admins": [], "sites": {}}
        self._reload()

    @classmethod
    def create(cls, path: str | os.PathLike[str]) -> TowerStore:
        """Write an empty state file (replacing any existing one) and open it."""
        atomic_write(Path(path), _dump({"admins": [], "sites": {}}))
        return cls(path)

    # -- reading ---------------------------------------------------------

    def _reload(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise UsageError(f"state file {self.path} not found (run control-tower init)") from None
        # The inode changes on every atomic replace, which catches rewrites that
        # keep the size and land within the filesystem's mtime granularity.
        stamp = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if stamp == self._stamp:
            return
        try:
            raw = json.loads(self.path.read_bytes())
        except (ValueError, UnicodeDecodeError) as e:
            raise _bad(self.path, f"not valid JSON ({e})") from None
        self._state = _parse_state(raw, self.path)
        self._stamp = stamp

    def check_admin(self, token: str) -> str | None:
        """The accessor of the admin token ``token``, or None if it is not one."""
        self._reload()
        digest = hash_token(token)
        found: str | None = None
        for admin in self._state["admins"]:
            # No early exit: the time taken does not depend on which entry matched.
            if hmac.compare_digest(admin["hash"], digest) and found is None:
                found = admin["accessor"]
        return found

    def admin_valid(self, accessor: str) -> bool:
        """Whether the admin token with this accessor still exists (not revoked)."""
        self._reload()
        return any(admin["accessor"] == accessor for admin in self._state["admins"])

    def check_site(self, name: str, token: str) -> bool:
        """Whether ``token`` is the token of site ``name``; False for unknown sites."""
        self._reload()
        entry = self._state["sites"].get(name)
        expected = entry["token-hash"] if entry else "0" * 64  # same work for unknown sites
        return hmac.compare_digest(expected, hash_token(token)) and entry is not None

    def site_token_hash(self, name: str) -> str | None:
        """The hash of site ``name``'s valid token, or None if there is no such site."""
        self._reload()
        entry = self._state["sites"].get(name)
        return entry["token-hash"] if entry else None

    def site_refusal(self, name: str, token_hash: str) -> str | None:
        """Why a link of site ``name`` that authenticated with the token hashed ``token_hash``
        may no longer serve the site, or None while that token is still the site's.

        Checked at every stream the tower opens on a site and by the sweep: one ``stat``
        of the state file while it is unchanged.
        """
        expected = self.site_token_hash(name)
        if expected is None:
            return "site removed"
        if not hmac.compare_digest(expected, token_hash):
            return "site token rotated"
        return None

    def site_exists(self, name: str) -> bool:
        self._reload()
        return name in self._state["sites"]

    def sites(self) -> list[str]:
        """Registered site names, sorted."""
        self._reload()
        return sorted(self._state["sites"])

    # -- writing ---------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[State]:
        """Read-modify-write under a lock, so two concurrent ``site add`` runs both land.

        The lock is on the directory: the state file itself is replaced on every
        write, so a lock on its inode would not exclude the next writer.
        """
        dir_fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(dir_fd, fcntl.LOCK_EX)
            self._reload()
            try:
                yield self._state
                atomic_write(self.path, _dump(self._state))
            finally:
                self._stamp = None  # memory may hold an unsaved change: re-read either way
            self._reload()
        finally:
            os.close(dir_fd)  # closing releases the flock

    def add_admin_token(self) -> str:
        """Register a new admin token and return it; only its hash is kept."""
        token = new_token("admin")
        digest = hash_token(token)
        with self._locked() as state:
            state["admins"].append({"hash": digest, "accessor": digest[:8], "created": _now()})
        return token

    def revoke_admin(self, accessor: str) -> bool:
        """Forget the admin token with this accessor; False if there is none."""
        with self._locked() as state:
            kept = [a for a in state["admins"] if a["accessor"] != accessor]
            found = len(kept) != len(state["admins"])
            state["admins"] = kept
        return found

    def add_site(self, name: str) -> str:
        """Register site ``name`` and return its token; only its hash is kept."""
        if not valid_site_name(name):
            raise UsageError(
                f"invalid site name {name!r}: use 1-63 lowercase letters, digits and '-',"
                " starting and ending with a letter or digit"
            )
        token = new_token("site")
        digest = hash_token(token)
        with self._locked() as state:
            if name in state["sites"]:
                raise UsageError(f"site {name!r} already exists")
            state["sites"][name] = {"token-hash": digest, "accessor": digest[:8], "created": _now()}
        return token

    def rotate_site(self, name: str) -> str:
        """Give site ``name`` a new token and return it; the old one stops working at once.

        A running tower closes the link opened with the old token within a sweep and
        accepts the new token in its place (docs/tower.md, "Site identity").
        """
        token = new_token("site")
        digest = hash_token(token)
        with self._locked() as state:
            entry = state["sites"].get(name)
            if entry is None:
                raise UsageError(f"unknown site {name!r}")
            entry["token-hash"], entry["accessor"] = digest, digest[:8]
        return token

    def remove_site(self, name: str) -> None:
        """Forget site ``name`` and its token; a running tower closes its link."""
        with self._locked() as state:
            if state["sites"].pop(name, None) is None:
                raise UsageError(f"unknown site {name!r}")


def _dump(state: State) -> bytes:
    return (json.dumps(state, indent=2, sort_keys=True) + "\n").encode()
