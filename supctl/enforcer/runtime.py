"""How the enforcer starts processes for a service instance, and how it ends them.

A :class:`Runtime` turns a :class:`ProcessSpec` into a running process inside a
service instance (its network namespace, say).  Runtimes come from plugins
(``supctl_add_runtimes``); the inventory names one per instance.  The helpers
below are what every runtime and every user of processes needs:

* every process starts in a **new session**, so it leads its own process group
  and it and whatever it forks can be signalled together (:func:`kill_group`);
* where the enforcer has a cgroup tree, every process joins its spec's cgroup
  before the command runs (:func:`start_process`), so that even what leaves the
  group (``setsid``) is killed with it (:mod:`.cgroups`);
* :func:`wait_exited` notices the exit of the process itself.  ``Process.wait()``
  is no good for that: asyncio only returns from it once every pipe is closed,
  and a background child holding stdout would keep it waiting forever;
* :func:`reap` ends a process for good: SIGKILL to the group, wait, close pipes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import signal
from typing import cast

from ..errors import StreamError
from ..protocol import ErrorCode

# ProcessSpec and Runtime live in .api (what plugins implement, and what the enforcer's
# services name without importing this module) and are re-exported here, where plugins
# have always imported them from.
from .api import DEFAULT_PATH, ProcessSpec, RegisterRuntime, Runtime
from .cgroups import enter_argv

__all__ = [
    "DEFAULT_PATH",
    "ProcessSpec",
    "RegisterRuntime",
    "Runtime",
    "close_pipes",
    "exit_status",
    "find_tool",
    "kill_group",
    "reap",
    "start_process",
    "user_prefix",
    "wait_exited",
]


def find_tool(name: str) -> str:
    """Absolute path of a helper program (``ip``, ``setpriv``).  Resolved with the
    enforcer's PATH and the default one, never the container's, which may lack it."""
    found = shutil.which(name, path=f"{os.environ.get('PATH', '')}:{DEFAULT_PATH}")
    if found is None:
        raise StreamError(f"{name} is not installed on this host", code=ErrorCode.INTERNAL)
    return found


def user_prefix(user: str | None) -> list[str]:
    """``setpriv`` argv that runs the rest as ``user`` (util-linux), or [] for none.

    A name or a uid listed in the passwd database gets its primary group and its
    supplementary groups; a bare uid that is not listed gets gid = uid and no
    supplementary groups.
    """
    if user is None:
        return []
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except KeyError:
        if not user.isdigit():
            raise StreamError(
                f"user {user!r} does not exist on this host", code=ErrorCode.NOT_FOUND
            ) from None
        ids, groups = (int(user), int(user)), "--clear-groups"
    else:
        ids, groups = (entry.pw_uid, entry.pw_gid), "--init-groups"
    return [find_tool("setpriv"), f"--reuid={ids[0]}", f"--regid={ids[1]}", groups, "--"]


async def start_process(argv: list[str], spec: ProcessSpec) -> asyncio.subprocess.Process:
    """Start ``argv`` (the runtime's full command line) with ``spec``'s env, cwd and stdio,
    in ``spec.cgroup``."""
    if spec.cwd is not None and not os.path.isdir(spec.cwd):
        raise StreamError(f"working directory {spec.cwd} does not exist", code=ErrorCode.NOT_FOUND)
    if spec.cgroup is not None:
        # The wrapper execs the command: look it up now, so that a missing one is
        # still a refusal rather than the wrapper's exit status 127.
        command = argv[0]
        if "/" in command:  # a path, relative to the process's cwd: no PATH lookup
            command = os.path.join(spec.cwd or os.getcwd(), command)
        found = shutil.which(command, path=spec.env.get("PATH", os.defpath))
        if found is None:
            raise StreamError(f"command not found: {argv[0]}", code=ErrorCode.NOT_FOUND)
        argv = enter_argv(spec.cgroup.procs, [found, *argv[1:]])
    try:
        return await asyncio.create_subprocess_exec(
            *argv,
            stdin=spec.stdin,
            stdout=spec.stdout,
            stderr=spec.stderr,
            cwd=spec.cwd,
            env=spec.env,
            start_new_session=True,
        )
    except FileNotFoundError:
        raise StreamError(f"command not found: {argv[0]}", code=ErrorCode.NOT_FOUND) from None
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise StreamError(f"cannot start {argv[0]}: {reason}", code=ErrorCode.INTERNAL) from None


def kill_group(proc: asyncio.subprocess.Process, sig: int) -> None:
    """Signal the process group that ``proc`` leads; a group already gone is fine."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


async def wait_exited(proc: asyncio.subprocess.Process) -> int:
    """Wait until ``proc`` itself exits (pipes may still be open); its returncode."""
    pidfd = -1
    if proc.returncode is None:
        with contextlib.suppress(OSError):  # already reaped, or no pidfd (Linux < 5.3): poll below
            pidfd = os.pidfd_open(proc.pid)
        if pidfd >= 0:
            loop = asyncio.get_running_loop()
            readable: asyncio.Future[None] = loop.create_future()

            def on_readable() -> None:  # fires every iteration until removed
                if not readable.done():
                    readable.set_result(None)

            loop.add_reader(pidfd, on_readable)
            try:
                await readable  # a pidfd turns readable when its process exits
            finally:
                loop.remove_reader(pidfd)
                os.close(pidfd)
    # The child watcher reaps the zombie and hands asyncio the status a moment later.
    while proc.returncode is None:
        await asyncio.sleep(0.005 if pidfd >= 0 else 0.05)
    return proc.returncode


def close_pipes(proc: asyncio.subprocess.Process) -> None:
    """Close our ends of the process's pipes, so ``proc.wait()`` can return even if a
    process outside the group still holds the other ends."""
    # Process has no public close; its transport's close() is the documented way.
    transport = cast(asyncio.SubprocessTransport | None, getattr(proc, "_transport", None))
    if transport is not None:
        transport.close()


async def reap(proc: asyncio.subprocess.Process) -> None:
    """End ``proc`` and its group now and collect it; safe to call more than once."""
    kill_group(proc, signal.SIGKILL)
    await wait_exited(proc)
    close_pipes(proc)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(proc.wait(), 1.0)


def exit_status(returncode: int) -> tuple[int | None, int | None]:
    """(exit code, signal number) of a returncode (asyncio gives -N for signal N)."""
    return (returncode, None) if returncode >= 0 else (None, -returncode)
