"""The login token ``supctl do login`` stores: ``$XDG_CONFIG_HOME/supctl/token`` (mode 0600).

The file is JSON: ``{"host", "user", "token", "accessor", "expires"}``.  The token
is used only for the tower it came from (``host``), so pointing supctl at another
tower never sends it there; and only when no other token is given (option > env >
config file ``token``/``token-file`` > this file).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from ..errors import UsageError


def token_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "supctl" / "token"


def load_login(host: str) -> dict[str, Any] | None:
    """The stored login of tower ``host``, or None (no file, another tower, unreadable)."""
    path = token_path()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read the stored login token {path}: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("token"), str):
        raise UsageError(f"the stored login token {path} is malformed; delete it and log in again")
    if str(data.get("host", "")).rstrip("/") != host.rstrip("/"):
        return None
    return data


def save_login(data: dict[str, Any]) -> Path:
    """Write the login file with mode 0600 from the start (never readable by others)."""
    path = token_path()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o600)
            json.dump(data, f)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def delete_login() -> bool:
    try:
        token_path().unlink()
    except FileNotFoundError:
        return False
    return True
