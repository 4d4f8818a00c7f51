"""``policies.toml`` beside ``tower.toml``: a single tower's convenience input.

The store holds the policy set in force (``control-tower policy apply``); a tower also
watches this file, as it always did: when the file changes (or differs, at start, from
the set in force) and is valid, the tower applies it to the store as a new version.
While it is invalid, the tower refuses what needs a policy, with today's messages
(fail closed), and the store keeps the last valid set.  A missing file changes nothing.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import tomllib
from pathlib import Path

from supctl.errors import UsageError

from .database import SQLStore
from .database.model import PolicySet
from .policy import Rule, parse_policies

log = logging.getLogger("supctl.tower")

#: Who the store records as having applied a version read from the watched file.
APPLIED_BY = "policies.toml"


def parse_policy_text(text: str, source: str) -> dict[str, tuple[Rule, ...]]:
    """Parse a policy set; UsageError (one line, naming ``source``) if it is invalid."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"bad policy file {source}: {exc}") from None
    return parse_policies(data, source)


def _read(path: Path) -> tuple[tuple[int, int, int, int] | None, str | None, UsageError | None]:
    try:
        st = os.stat(path)
        raw = path.read_bytes()
    except FileNotFoundError:
        return None, None, None
    except OSError as exc:
        return (0, 0, 0, 0), None, UsageError(f"bad policy file {path}: {exc}")
    stamp = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    try:
        return stamp, raw.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        return stamp, None, UsageError(f"bad policy file {path}: {exc}")


class PolicyWatch:
    """The watched file's state: ``error`` is set while it is invalid."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.error: UsageError | None = None
        self._stamp: tuple[int, int, int, int] | None = None
        self._checked = False

    def _stat(self) -> tuple[int, int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def unchanged(self) -> bool:
        """Whether the file is as last checked (one ``stat``), without awaiting."""
        return self._checked and self._stat() == self._stamp

    async def check(self, store: SQLStore, in_force: PolicySet | None) -> None:
        """One ``stat`` while the file is unchanged; on a change, apply it if valid (the
        caller then loads the new version), else remember why it is invalid."""
        stamp = self._stat()  # one syscall, as the file-based tower made per request
        if self._checked and stamp == self._stamp:
            return
        self._checked = True
        stamp, text, error = await asyncio.to_thread(_read, self.path)
        self._stamp = stamp
        if stamp is None:  # no file: the store's set stands
            self.error = None
            return
        if error is None and text is not None:
            try:
                await asyncio.to_thread(parse_policy_text, text, str(self.path))
            except UsageError as exc:
                error = exc
        if error is not None:
            if self.error is None or str(self.error) != str(error):
                log.error("%s", error)  # once per change, not per request
            self.error = error
            return
        self.error = None
        assert text is not None
        if in_force is not None and in_force.text == text:
            return
        try:
            version = await store.policies.apply(
                text, now=datetime.datetime.now(datetime.UTC), applied_by=APPLIED_BY, source=str(self.path)
            )
        except UsageError as exc:  # too large for the store
            log.error("%s", exc)
            self.error = exc
            return
        log.info("applied %s as policy set version %d", self.path, version)
