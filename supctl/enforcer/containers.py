"""Keep the inventory's containers running, for the enforcer's whole life.

Each container with a ``command`` gets one supervising task: spawn it through its
instance's runtime, wait for it to exit, restart it after a backoff (0.5 s
doubling to 30 s; back to 0.5 s once a run lasted 10 s).  The tower link does
not matter here: containers run whether or not the tower is reachable.

States (as the tower shows them):

* ``running``: the process is up (``pid``, ``started``);
* ``restarting``: it exited (``exit-code``: its status, or -N for signal N) and
  waits for its backoff;
* ``failed``: the last start failed (a missing namespace, user, directory or
  command); retried with the same backoff, since a namespace may come later;
* ``stopped``: the enforcer stopped it on shutdown.

A reload (SIGHUP: :meth:`ContainerSupervisor.reload`) compares each container's
definition (its own, and its instance's runtime and namespace) with the new
inventory's: an unchanged one keeps running (same PID), a changed one is stopped
and started again, a removed one stopped, a new one started.

Output: stdout and stderr of every container are read apart, line by line; each
line goes to the enforcer's stderr, prefixed ``INSTANCE/CONTAINER| `` (unless
``output`` is None), and to every observer (handlers' ``observe``:
:class:`~supctl.enforcer.api.ContainerOutput`, with the container's starts and
exits as :class:`~supctl.enforcer.api.ContainerEvent`), so a plugin (``logs``) can
keep what it wants of them without the supervisor knowing why.  When the main process exits, its process group gets
SIGKILL, and so does its cgroup (one per run, when the enforcer has a cgroup
tree: :mod:`.cgroups`), so nothing it started outlives it, ``setsid`` or not.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import IO, Any

from ..backoff import Backoff
from ..errors import StreamError
from .api import Container, ContainerEvent, ContainerNews, ContainerOutput, ServiceInstance
from .cgroups import Cgroup, CgroupTree
from .inventory import Inventory
from .runtime import ProcessSpec, Runtime, kill_group, reap, wait_exited

log = logging.getLogger("supctl.enforcer.containers")

BACKOFF_START = 0.5
BACKOFF_CAP = 30.0
#: A run that lasted this long resets the backoff.
STABLE_AFTER = 10.0
#: Seconds between SIGTERM and SIGKILL on shutdown.
STOP_GRACE = 5.0
#: Longest output line passed on whole; longer ones are cut into pieces.
LINE_LIMIT = 64 * 1024

Key = tuple[str, str, str]  # application, service instance, container


@dataclass
class ContainerState:
    state: str = "stopped"
    pid: int | None = None
    restarts: int = 0
    exit_code: int | None = None
    started: str | None = None  # ISO 8601, UTC

    def as_dict(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "pid": self.pid,
            "restarts": self.restarts,
            "exit-code": self.exit_code,
            "started": self.started,
        }


class ContainerSupervisor:
    def __init__(
        self,
        inventory: Inventory,
        runtimes: dict[str, Runtime],
        *,
        output: IO[bytes] | None = None,
        on_change: Callable[[], None] | None = None,
        backoff_start: float = BACKOFF_START,
        backoff_cap: float = BACKOFF_CAP,
        stable_after: float = STABLE_AFTER,
        stop_grace: float = STOP_GRACE,
        cgroups: CgroupTree | None = None,
        observers: list[Callable[[ContainerNews], None]] | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.inventory = inventory
        #: Who hears every line and every start and exit (each one guarded by its giver).
        self.observers = observers or []
        self.wall_clock = wall_clock
        #: Where each run gets its cgroup (None: process groups only).
        self.cgroups = cgroups
        self.runtimes = runtimes
        self.output = output
        #: Called after every state change (the agent pushes a STATUS frame).
        self.on_change = on_change
        self.backoff_start = backoff_start
        self.backoff_cap = backoff_cap
        self.stable_after = stable_after
        self.stop_grace = stop_grace
        self._states: dict[Key, ContainerState] = {}
        self._runs: dict[Key, _Supervised] = {}
        self._stopping = False

    def start(self) -> None:
        """Start supervising every container that has a command (needs a running loop)."""
        for key, (instance, container) in sorted(_definitions(self.inventory).items()):
            self._start(key, instance, container)

    def _start(self, key: Key, instance: ServiceInstance, container: Container) -> None:
        self._states[key] = ContainerState()
        run = _Supervised(instance, container, asyncio.Event())
        run.task = asyncio.create_task(self._supervise(key, run), name=f"container-{container.name}")
        self._runs[key] = run

    async def reload(self, inventory: Inventory) -> tuple[int, int, int, int]:
        """Make the running containers the new inventory's; (kept, restarted, stopped,
        started).  The inventory was checked already (runtimes included)."""
        if self._stopping:
            return 0, 0, 0, 0
        self.inventory = inventory
        wanted = _definitions(inventory)
        gone = [key for key, run in self._runs.items() if not run.same(*wanted.get(key, (None, None)))]
        kept = len(self._runs) - len(gone)
        await self._end(gone)
        for key in gone:
            del self._states[key]
        restarted = sum(1 for key in gone if key in wanted)
        new = [key for key in sorted(wanted) if key not in self._runs]
        for key in new:
            self._start(key, *wanted[key])
        if self.on_change is not None:
            self.on_change()
        return kept, restarted, len(gone) - restarted, len(new) - restarted

    def states(self) -> dict[Key, dict[str, Any]]:
        return {key: state.as_dict() for key, state in self._states.items()}

    async def stop(self) -> None:
        """SIGTERM every container's group, SIGKILL after the grace, wait for all."""
        self._stopping = True
        await self._end(list(self._runs), keep_state=True)

    async def _end(self, keys: list[Key], *, keep_state: bool = False) -> None:
        runs = [self._runs[key] for key in keys]
        for run in runs:
            run.stop.set()
        await asyncio.gather(*(run.task for run in runs if run.task is not None), return_exceptions=True)
        if not keep_state:
            for key in keys:
                del self._runs[key]

    def _changed(self, target: ContainerState, /, **fields: Any) -> None:
        for name, value in fields.items():
            setattr(target, name, value)
        if self.on_change is not None:
            self.on_change()

    def _tell(self, key: Key, event: str, state: ContainerState) -> None:
        if self.observers:
            news = ContainerEvent(*key, event, self.wall_clock(), state.pid, state.exit_code, state.restarts)
            for observe in self.observers:
                observe(news)

    async def _supervise(self, key: Key, run: _Supervised) -> None:
        instance, container, stopping = run.instance, run.container, run.stop
        state = self._states[key]
        label = f"{instance.name}/{container.name}"
        runtime = self.runtimes[instance.runtime]  # checked when the enforcer started
        read = self.output is not None or bool(self.observers)
        pipe = asyncio.subprocess.PIPE if read else asyncio.subprocess.DEVNULL
        spec = ProcessSpec.for_container(container, list(container.command or ()), stdout=pipe, stderr=pipe)
        backoff = Backoff(self.backoff_start, self.backoff_cap, self.stable_after)
        first = True
        while not stopping.is_set():
            if not first:
                state.restarts += 1
            first = False
            began = time.monotonic()
            cgroup: Cgroup | None = None
            try:
                if self.cgroups is not None:
                    cgroup = self.cgroups.child("container", f"{instance.name}.{container.name}")
                proc = await runtime.spawn(instance, replace(spec, cgroup=cgroup))
            except StreamError as exc:
                log.warning("container %s cannot start: %s", label, exc)
                self._changed(state, state="failed", pid=None)
                self._tell(key, "failed", state)
                if cgroup is not None:
                    await cgroup.release()
            else:
                started = datetime.now(UTC).isoformat(timespec="seconds")
                self._changed(state, state="running", pid=proc.pid, started=started)
                self._tell(key, "started", state)
                returncode = await self._run(proc, key, cgroup, stopping)
                if stopping.is_set():
                    log.info("container %s stopped with status %d", label, returncode)
                    self._changed(state, state="stopped", pid=None, exit_code=returncode)
                    self._tell(key, "stopped", state)
                    return
                log.warning("container %s exited with status %d", label, returncode)
                self._changed(state, state="restarting", pid=None, exit_code=returncode)
                self._tell(key, "exited", state)
            delay = backoff.after(time.monotonic() - began)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), delay)
        self._changed(state, state="stopped", pid=None)

    async def _read_lines(self, reader: asyncio.StreamReader, key: Key, fd: int) -> None:
        """Pass one of a container's outputs on, a line at a time: to our stderr with its
        prefix, and to the observers."""
        prefix = f"{key[1]}/{key[2]}| ".encode()
        pending = b""
        while True:
            chunk = await reader.read(LINE_LIMIT)
            if chunk:
                lines, pending = _split_lines(pending, chunk)
            else:
                lines, pending = ([pending] if pending else []), b""
            if lines:
                if self.output is not None:
                    self.output.write(b"".join(prefix + line + b"\n" for line in lines))
                    self.output.flush()
                if self.observers:
                    now = self.wall_clock()
                    for line in lines:
                        news = ContainerOutput(*key, fd, line, now)
                        for observe in self.observers:
                            observe(news)
            if not chunk:
                return

    async def _run(
        self, proc: asyncio.subprocess.Process, key: Key, cgroup: Cgroup | None, stop: asyncio.Event
    ) -> int:
        """Wait for the process (or for shutdown); always leaves it, its group and its
        cgroup reaped."""
        pumps = [
            self._read_lines(reader, key, fd)
            for fd, reader in ((1, proc.stdout), (2, proc.stderr))
            if reader is not None
        ]
        pump = asyncio.ensure_future(asyncio.gather(*pumps)) if pumps else None
        exited = asyncio.create_task(wait_exited(proc))
        stopping = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not exited.done():
                kill_group(proc, signal.SIGTERM)
                done, _ = await asyncio.wait({exited}, timeout=self.stop_grace)
                if not done:
                    kill_group(proc, signal.SIGKILL)
            return await exited
        finally:
            stopping.cancel()
            exited.cancel()
            kill_group(proc, signal.SIGKILL)  # the group too: no child outlives its container
            if cgroup is not None:
                cgroup.kill()  # and what left the group
            if pump is not None:
                # Let it pass on what is left in the pipe; a process that left the
                # group (setsid) could hold the pipe open for ever, hence the bound.
                await asyncio.wait({pump}, timeout=1.0)
            await reap(proc)
            if cgroup is not None:
                await cgroup.release()
            if pump is not None:
                await asyncio.gather(pump, return_exceptions=True)  # ends: reap closed its pipe


@dataclass
class _Supervised:
    """One supervised container: what it was started from, and how to stop it."""

    instance: ServiceInstance
    container: Container
    stop: asyncio.Event
    task: asyncio.Task[None] | None = None

    def same(self, instance: ServiceInstance | None, container: Container | None) -> bool:
        """Whether the new definition would run the very same process: the container's own
        fields and its instance's runtime and namespace (not its other containers)."""
        return (
            instance is not None
            and container == self.container
            and (instance.runtime, instance.netns) == (self.instance.runtime, self.instance.netns)
        )


def _definitions(inventory: Inventory) -> dict[Key, tuple[ServiceInstance, Container]]:
    """Every container the enforcer keeps running (those with a command)."""
    return {
        (app, name, cname): (instance, container)
        for (app, name), instance in inventory.instances.items()
        for cname, container in instance.containers.items()
        if container.command is not None
    }


def _split_lines(pending: bytes, chunk: bytes) -> tuple[list[bytes], bytes]:
    """The whole lines of ``pending + chunk`` (a piece of LINE_LIMIT counts as one) and
    what is left of a line not ended yet."""
    lines = (pending + chunk).split(b"\n")
    rest = lines.pop()
    if len(rest) >= LINE_LIMIT:
        lines.append(rest)
        rest = b""
    return lines, rest
