"""Reading the site token file, which must be private to the enforcer's user.

Whoever can read a site's token can be that site: with it a thief's enforcer
would receive the site's streams (exec commands and their stdin) whenever the
real enforcer is down.  So the enforcer refuses to start with a token file that
anyone but its own user could read, rather than warn in a log nobody reads.

The file is opened first and judged by ``fstat`` of what was opened, so the
check and the read are about the same file whatever is renamed meanwhile.  A
symbolic link is followed (systemd credentials and Kubernetes secrets are
links), and it is the file it leads to that must be private.
"""

from __future__ import annotations

import os
import shlex
import stat
from pathlib import Path

from ..errors import UsageError

#: A site token is about 50 bytes; anything much larger is not a token file.
MAX_TOKEN_FILE = 4096


def check_private(path: Path, st: os.stat_result, uid: int) -> None:
    """Refuse (one line naming the fix) a token file that is not a regular file owned by
    ``uid`` and closed to group and others."""
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"token file {path} is not a regular file")
    if st.st_uid != uid:
        raise UsageError(
            f"token file {path} belongs to uid {st.st_uid}, not to the enforcer's user (uid {uid}):"
            f" chown {uid} {shlex.quote(str(path))}"
        )
    if st.st_mode & 0o077:
        raise UsageError(
            f"token file {path} can be read by others (mode {stat.S_IMODE(st.st_mode):04o}):"
            f" chmod 600 {shlex.quote(str(path))}"
        )


def read_site_token(path: Path, uid: int | None = None) -> str:
    """The token in ``path``, after checking that only the enforcer's user (``uid``,
    default: the effective uid) can read it.  UsageError (exit 2) otherwise."""
    uid = os.geteuid() if uid is None else uid
    try:
        # O_NONBLOCK: a FIFO must be refused by the check below, not hang the open.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        raise UsageError(f"cannot read token file {path}: {exc.strerror}") from None
    try:
        check_private(path, os.fstat(fd), uid)
        data = os.read(fd, MAX_TOKEN_FILE + 1)
    except OSError as exc:
        raise UsageError(f"cannot read token file {path}: {exc.strerror}") from None
    finally:
        os.close(fd)  # never inherited by what the enforcer starts (O_CLOEXEC), and closed now
    if len(data) > MAX_TOKEN_FILE:
        raise UsageError(f"token file {path} is larger than {MAX_TOKEN_FILE} bytes: not a token file")
    try:
        token = data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise UsageError(f"token file {path} holds non-ASCII bytes: not a token file") from None
    if not token:
        raise UsageError(f"token file {path} is empty")
    if any(not 33 <= ord(c) <= 126 for c in token):
        raise UsageError(f"token file {path} holds more than one token (spaces or control characters)")
    return token
