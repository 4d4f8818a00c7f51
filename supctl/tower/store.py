"""Tokens of the tower: admin and site tokens, how they are made and hashed, site names,
and atomic file writes.  They are stored in the store (:mod:`supctl.tower.database`).

Tokens are ``secrets.token_urlsafe(32)`` (256 random bits) behind a readable
prefix.  Only their SHA-256 is stored.  A slow password hash (scrypt, argon2)
exists to make guessing *low-entropy human passwords* expensive; against 2**256
equally likely tokens a brute force is hopeless whatever the hash costs, so a
plain SHA-256 loses nothing and keeps every request's check cheap.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import tempfile
from pathlib import Path
from typing import Literal

TokenKind = Literal["admin", "site"]

TOKEN_PREFIXES: dict[TokenKind, str] = {"admin": "sct_admin_", "site": "sct_site_"}


def new_token(kind: TokenKind) -> str:
    """A fresh random token such as ``sct_site_<43 url-safe chars>``."""
    return TOKEN_PREFIXES[kind] + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """SHA-256 hex of the token (see the module docstring for why that suffices)."""
    # surrogatepass: a header that decoded to lone surrogates must fail the check, not raise.
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


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
