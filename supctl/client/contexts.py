"""Named contexts in ``config.toml``, as kubeconfig has them, and the one edit supctl makes
to that file: ``current-context`` (``supctl config use-context NAME``).

The file is the user's: comments, order and formatting stay as they are.  So supctl does
not re-serialise the document (tomllib only reads; tomlkit, which round-trips, would be a
new dependency for one line): it replaces the top-level ``current-context = ...`` line, or
adds one before the first table, then parses the result and checks it means exactly the
old document with the new current context.  Anything else (the key written in a way this
does not recognise, inside a multi-line string...) is refused with one line, never written.
The new file replaces the old one atomically (:func:`supctl.tower.store.atomic_write`: a
temporary file in the same directory, fsync, rename) with the old file's mode, at the path a symlink points to, so a dotfiles
link stays a link.
"""

from __future__ import annotations

import json
import re
import stat
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..schema import Source, parse_toml
from ..tower.store import atomic_write  # the one atomic write (a small module: no tower code)
from .settings import ConfigFile, read_config

_TABLE = re.compile(r"\s*\[")
_CURRENT = re.compile(r"""\s*(current-context|"current-context"|'current-context')\s*=""")


def known(file: ConfigFile, path: Path) -> str:
    return ", ".join(sorted(file.contexts)) or f"none: {path} defines no [contexts.NAME]"


def rewrite_current(text: str, name: str) -> str:
    """``text`` (a TOML document) with ``current-context = "name"``, all else kept."""
    lines = text.splitlines(keepends=True)
    line = f"current-context = {json.dumps(name)}\n"
    end = next((i for i, old in enumerate(lines) if _TABLE.match(old)), len(lines))
    for i in range(end):
        if _CURRENT.match(lines[i]):
            lines[i] = line
            break
    else:
        if end == len(lines) and lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n"
        while end and (not lines[end - 1].strip() or lines[end - 1].lstrip().startswith("#")):
            end -= 1  # after the top-level keys: blank lines and comments go with the table below
        lines.insert(end, line)
    return "".join(lines)


def use_context(path: Path, name: str) -> None:
    """Make ``name`` the current context of the config file at ``path``."""
    file = read_config(path, explicit=False)
    if name not in file.contexts:
        shown = name if len(name) <= 70 else name[:67] + "..."
        raise UsageError(f"unknown context {shown!r}; known: {known(file, path)}")
    target = path.resolve()  # a symlinked config stays a symlink: write where it points
    raw = target.read_bytes()
    source = Source(f"config file {path}")
    before: dict[str, Any] = parse_toml(raw, source)
    text = rewrite_current(raw.decode("utf-8"), name)
    after = parse_toml(text.encode("utf-8"), source)
    if after != {**before, "current-context": name}:
        raise UsageError(
            f"cannot edit {path} safely (its current-context is written in a way supctl does not"
            f" rewrite); set current-context = {json.dumps(name)} by hand"
        )
    atomic_write(target, text.encode("utf-8"), stat.S_IMODE(target.stat().st_mode))
