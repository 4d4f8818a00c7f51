"""Process containment: every container run and every exec in a cgroup v2 the kernel kills whole.

A process group is not enough: ``setsid sleep 600 &`` leaves it, and after a
``kill -9`` of the enforcer nobody kills anything.  A cgroup cannot be left by
an unprivileged process, and ``cgroup.kill`` (Linux 5.14) SIGKILLs everything in
it and below it at once, forks in flight included.

Layout, in the unified hierarchy (found in /proc/mounts: on hybrid hosts it is
``/sys/fs/cgroup/unified``, not ``/sys/fs/cgroup``)::

    supctl-enforcer-SITE@PID.START/     one tree per enforcer process
        exec-7/                         one per exec stream
        container-3-INSTANCE.CONTAINER/ one per container run

``PID.START`` (pid and start time, in clock ticks, of the enforcer) names the
owner, so that a starting enforcer removes the trees of dead owners of its site
(:func:`sweep`) but never those of a live one (two enforcers of one site on one
host: the tower refuses the second link, but both run their containers).

Three things end the processes:

* the stream or run ends: :meth:`Cgroup.release` kills and removes its cgroup;
* the enforcer dies, however (``kill -9`` too): a *guardian* ``sh`` started with
  the tree waits for EOF on a pipe whose only writer is the enforcer, then writes
  ``cgroup.kill`` of the whole tree and removes it.  ``PR_SET_PDEATHSIG`` was not used: it reaches
  only the direct child, never what it forks (the ``setsid`` case), and is cleared
  by the set-uid/credential changes of ``setpriv``;
* the guardian died too (it ignores SIGINT/TERM/HUP, not SIGKILL): the next
  enforcer of the site sweeps the tree at start.

Without a usable cgroup v2 (no mount, not root, no ``cgroup.kill``)
:meth:`CgroupTree.open` logs one warning and returns None; processes are then
ended by process group only, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import itertools
import logging
import os
import re
import subprocess
import time
from collections.abc import Callable

from ..errors import StreamError
from ..protocol import ErrorCode

log = logging.getLogger("supctl.enforcer.cgroups")

PREFIX = "supctl-enforcer-"
#: Seconds to wait for a killed cgroup to empty before giving up on removing it.
REMOVE_DEADLINE = 5.0
#: Exit status of :func:`enter_argv`'s wrapper when the process cannot join its cgroup.
ENTER_FAILED = 125

# The process joins its cgroup itself, between fork and exec, so that nothing it
# runs can fork before it is inside: sh writes its own pid ($$) to cgroup.procs
# and execs the command in the same process (the pid the enforcer holds stays the
# command's).  Not subprocess's preexec_fn: Python code between fork and exec in
# a process with threads (the netns workers, asyncio's) can deadlock on a lock
# another thread held at fork time.  Not os.posix_spawn or clone3's
# CLONE_INTO_CGROUP: Python 3.11 offers no cgroup argument for either.  The path
# is passed as $0, never spliced into the script.  If joining fails the command
# never runs (fail closed).
_ENTER = (
    '{ echo $$ > "$0"; } 2>/dev/null'
    f' || {{ echo "supctl: cannot join cgroup ${{0%/cgroup.procs}}" >&2; exit {ENTER_FAILED}; }}; exec "$@"'
)
# The guardian ($0: the tree): ignore the polite signals (a service manager's
# SIGTERM to the enforcer's cgroup), wait for EOF from the enforcer, kill the
# tree, then remove it (its children are leaves) once the processes are gone,
# for up to 5 s.
_GUARD = (
    'trap "" INT TERM HUP; read -r _; echo 1 > "$0/cgroup.kill"; n=0; '
    'while [ -d "$0" ] && [ $n -lt 50 ]; do '
    'rmdir "$0"/*/ "$0" 2>/dev/null || sleep 0.1; n=$((n + 1)); done'
)
GUARDIAN_NAME = "supctl-cgroup-guardian"


def unified_mount(mounts: str) -> str | None:
    """The mount point of the cgroup v2 hierarchy in a /proc/mounts text, or None."""
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2] == "cgroup2":
            # /proc/mounts escapes space, tab, newline and backslash as octal.
            return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[1])
    return None


def site_label(site: str) -> str:
    """``site`` as a cgroup directory name part: [A-Za-z0-9._-] kept, the rest %XX,
    shortened (with a hash, still unique) when long."""
    safe = "".join(
        ch if re.fullmatch(r"[A-Za-z0-9._-]", ch) else "".join(f"%{b:02x}" for b in ch.encode())
        for ch in site
    )
    if len(safe) > 100:
        safe = f"{safe[:60]}-{hashlib.sha256(site.encode()).hexdigest()[:16]}"
    return safe


def start_time(pid: int) -> int | None:
    """A process's start time (clock ticks after boot), or None if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rpartition(b")")[2].split()
    except OSError:
        return None
    return int(fields[19])  # field 22 of stat(5); fields[0] is field 3


def owner_alive(name: str) -> bool:
    """Whether the enforcer named in a tree name ``...@PID.START`` still runs."""
    owner = name.rpartition("@")[2]
    pid, _, start = owner.partition(".")
    if not (pid.isascii() and pid.isdigit() and start.isascii() and start.isdigit()):
        return False
    return start_time(int(pid)) == int(start)


def enter_argv(procs: str, argv: list[str]) -> list[str]:
    """``argv`` run so that it first joins the cgroup whose ``cgroup.procs`` is ``procs``."""
    return ["/bin/sh", "-c", _ENTER, procs, *argv]


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def kill(path: str) -> None:
    """SIGKILL everything in the cgroup at ``path`` and below; a cgroup already gone is fine."""
    with contextlib.suppress(FileNotFoundError):
        _write(os.path.join(path, "cgroup.kill"), "1")


def _rmdir_tree(path: str) -> bool:
    """Remove ``path`` and its sub-cgroups, deepest first; False while any is busy."""
    done = True
    try:
        entries = list(os.scandir(path))
    except FileNotFoundError:
        return True
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            done = _rmdir_tree(entry.path) and done
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise
        return False
    return done


def remove_now(
    path: str, deadline: float = REMOVE_DEADLINE, clock: Callable[[], float] = time.monotonic
) -> bool:
    """Kill and remove the cgroup ``path`` with everything below it, waiting (blocking) up to
    ``deadline`` s for the killed processes to go; False if some cgroup stayed busy."""
    end = clock() + deadline
    pause = 0.002
    while True:
        try:
            kill(path)  # again on each round: a process may have joined since
            if _rmdir_tree(path):
                return True
        except OSError as exc:  # not ours to remove (another user's tree, say)
            log.warning("cannot remove cgroup %s: %s", path, exc.strerror or exc)
            return False
        if clock() >= end:
            log.warning("cgroup %s still has processes after %.0f s; left for the next start", path, deadline)
            return False
        time.sleep(pause)  # the kernel delivers SIGKILL asynchronously
        pause = min(pause * 2, 0.05)


def sweep(root: str, site: str) -> list[str]:
    """Kill and remove the trees of ``site`` under ``root`` whose enforcer is dead; their names."""
    prefix = f"{PREFIX}{site_label(site)}@"
    removed = []
    try:
        names = sorted(os.listdir(root))
    except OSError:
        return []
    for name in names:
        if name.startswith(prefix) and not owner_alive(name):
            log.warning("removing cgroup %s left by an earlier enforcer, and its processes", name)
            remove_now(os.path.join(root, name))
            removed.append(name)
    return removed


class Cgroup:
    """One leaf cgroup (an exec stream or a container run)."""

    def __init__(self, path: str) -> None:
        self.path = path

    @property
    def procs(self) -> str:
        return os.path.join(self.path, "cgroup.procs")

    def pids(self) -> list[int]:
        try:
            with open(self.procs) as procs:
                return [int(line) for line in procs.read().split()]
        except FileNotFoundError:
            return []

    def kill(self) -> None:
        """SIGKILL every process in it, now (delivery is asynchronous)."""
        kill(self.path)

    async def release(self, deadline: float = REMOVE_DEADLINE) -> bool:
        """Kill everything in it and remove it, waiting (without blocking the loop) up to
        ``deadline`` s for the processes to go.  False if it stayed busy (the tree's
        close or the next start removes it).  Safe to call more than once."""
        end = time.monotonic() + deadline
        pause = 0.002
        while True:
            try:
                kill(self.path)  # again on each round: a late spawn may have joined
                os.rmdir(self.path)
                return True
            except FileNotFoundError:
                return True
            except OSError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() >= end:
                    log.warning("cannot remove cgroup %s: %s", self.path, exc.strerror or exc)
                    return False
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.05)


class CgroupTree:
    """This enforcer's tree: a child per exec stream and container run, and its guardian."""

    def __init__(self, path: str, guardian: subprocess.Popen[bytes], guard_pipe: int) -> None:
        self.path = path
        self._guardian = guardian
        self._guard_pipe = guard_pipe  # the write end; its closing (or our death) wakes the guardian
        self._serial = itertools.count(1)

    @classmethod
    def open(cls, site: str, *, mounts: str = "/proc/mounts") -> CgroupTree | None:
        """Sweep what dead enforcers of ``site`` left, and make this one's tree.

        None (after one warning line) where no cgroup v2 can be used.
        """
        try:
            with open(mounts) as file:
                root = unified_mount(file.read())
        except OSError:
            root = None
        if root is None:
            _unavailable("no cgroup2 file system is mounted")
            return None
        sweep(root, site)
        me = os.getpid()
        path = os.path.join(root, f"{PREFIX}{site_label(site)}@{me}.{start_time(me)}")
        try:
            os.mkdir(path)
        except OSError as exc:
            _unavailable(f"cannot create {path}: {exc.strerror or exc}")
            return None
        reason = _probe(path)
        if reason is not None:
            remove_now(path)
            _unavailable(reason)
            return None
        read_end, write_end = os.pipe()  # both close-on-exec: no other child inherits the write end
        try:
            guardian = subprocess.Popen(
                [GUARDIAN_NAME, "-c", _GUARD, path],
                stdin=read_end,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,  # a signal to our process group does not reach it
                executable="/bin/sh",
            )
        except OSError as exc:
            os.close(write_end)
            remove_now(path)
            _unavailable(f"cannot start the cgroup guardian: {exc.strerror or exc}")
            return None
        finally:
            os.close(read_end)
        log.info("processes are contained in cgroup %s", path)
        return cls(path, guardian, write_end)

    def child(self, kind: str, label: str = "") -> Cgroup:
        """A new empty leaf cgroup ``KIND-N[-LABEL]``; StreamError if it cannot be made."""
        name = f"{kind}-{next(self._serial)}" + (f"-{site_label(label)[:80]}" if label else "")
        path = os.path.join(self.path, name)
        try:
            os.mkdir(path)
        except OSError as exc:
            raise StreamError(
                f"cannot create cgroup {path}: {exc.strerror or exc}", code=ErrorCode.INTERNAL
            ) from None
        return Cgroup(path)

    def close(self) -> None:
        """Stop the guardian, then kill and remove the whole tree (blocking; at exit)."""
        if self._guard_pipe >= 0:
            os.close(self._guard_pipe)
            self._guard_pipe = -1
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._guardian.wait(5.0)
        remove_now(self.path)


def _probe(path: str) -> str | None:
    """Check that a process can join a cgroup here the way every spawn will; None if it can."""
    probe = os.path.join(path, "probe")
    try:
        os.mkdir(probe)
        if not os.path.exists(os.path.join(probe, "cgroup.kill")):
            return "the kernel has no cgroup.kill (Linux 5.14 or later is needed)"
        result = subprocess.run(
            enter_argv(os.path.join(probe, "cgroup.procs"), ["/bin/true"]),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"cannot use cgroup {probe}: {exc}"
    finally:
        remove_now(probe, 1.0)
    if result.returncode != 0:
        return f"cannot move a process into cgroup {probe}"
    return None


def _unavailable(reason: str) -> None:
    log.warning(
        "no process containment (%s): exec'd commands and containers are ended by process group only",
        reason,
    )
