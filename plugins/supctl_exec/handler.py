"""The enforcer's ``exec`` handler: run a command in a container of a service instance.

The command runs as ``/bin/sh -c COMMAND`` through the instance's runtime (in its
network namespace, with the container's env, cwd and user), as the leader of its
own process group and, where the enforcer has a cgroup tree, in a cgroup of its
own that is killed and removed when the stream ends (:mod:`supctl.enforcer.cgroups`).  With
``args.tty`` it runs on a pseudo-terminal instead of pipes (:mod:`.ptyhandler`).  Wire
format: docs/protocol.md, "exec streams".

Four independent tasks serve a stream, so no direction can hold up another:
stdin (stream -> pipe), stdout and stderr (pipe -> stream, as output records)
and CONTROL (signals).  Output is written with ``await channel.write()``, which
waits for credit: a command printing faster than the client reads blocks on its
pipe, and the enforcer's memory stays bounded by the pipes and one window.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from dataclasses import replace
from typing import Any

from supctl.enforcer.api import Container, HandlerContext, ServiceInstance
from supctl.enforcer.cgroups import Cgroup
from supctl.enforcer.runtime import ProcessSpec, Runtime, kill_group, reap, wait_exited
from supctl.errors import StreamError
from supctl.link import Channel
from supctl.protocol import ErrorCode, OpenRequest
from supctl.protocol.exec import EXEC_TTY, STDERR, STDOUT, TtyRequest, encode_output, parse_tty

from .command import GRACE, SIGNALS, Command
from .ptyhandler import PtySession, ctty_argv, open_pty

#: Bytes read from a pipe at once (one output record at most this big).
READ_CHUNK = 256 * 1024
#: After the command exited and its group was killed, a pipe that stays open and
#: silent this long is held by a process that left the group (``setsid``): stop
#: waiting for its EOF.
ORPHAN_WAIT = 1.0
#: TERM of a tty exec when neither the client nor the container gives one (docker's).
DEFAULT_TERM = "xterm"

# Spawns abandoned by a cancelled stream, kept referenced until reaped.
_reaping: set[asyncio.Task[None]] = set()


class ExecHandler:
    #: Announced in HELLO (``features``): this handler serves ``args.tty`` (:mod:`.ptyhandler`).
    features = frozenset({EXEC_TTY})

    async def handle(
        self, channel: Channel, request: OpenRequest, instance: ServiceInstance, context: HandlerContext
    ) -> None:
        command = request.args.get("command")
        if not isinstance(command, str) or not command:
            raise StreamError("exec needs a command (args.command, a string)", code=ErrorCode.PROTOCOL)
        tty: TtyRequest | None = None
        if "tty" in request.args:
            try:
                tty = parse_tty(request.args["tty"])
            except ValueError as exc:
                raise StreamError(f"exec: bad args.tty: {exc}", code=ErrorCode.PROTOCOL) from None
        container = instance.containers.get(request.container)
        if container is None:
            raise StreamError(
                f"container {request.container} not found in service instance {instance.name}",
                code=ErrorCode.NOT_FOUND,
            )
        runtime = context.runtimes.get(instance.runtime)
        if runtime is None:  # the enforcer checks the inventory at start; a bug if seen
            raise StreamError(f"runtime {instance.runtime!r} is not available", code=ErrorCode.INTERNAL)
        # The stream's own cgroup: whatever the command starts, setsid or not, ends with it.
        cgroup = context.cgroups.child("exec") if context.cgroups is not None else None
        try:
            if tty is None:
                await _run_piped(channel, runtime, instance, container, command, cgroup, context)
            else:
                await _run_tty(channel, runtime, instance, container, command, tty, cgroup, context)
        finally:
            if cgroup is not None:
                # Also after a cancelled spawn: a process joining later finds no
                # cgroup (it never runs) or is killed by release's next round.
                await cgroup.release()


async def _run_piped(
    channel: Channel,
    runtime: Runtime,
    instance: ServiceInstance,
    container: Container,
    command: str,
    cgroup: Cgroup | None,
    context: HandlerContext,
) -> None:
    pipe = asyncio.subprocess.PIPE
    spec = ProcessSpec.for_container(
        container, ["/bin/sh", "-c", command], stdin=pipe, stdout=pipe, stderr=pipe
    )
    proc = await _spawn(runtime, instance, replace(spec, cgroup=cgroup))
    try:
        channel.accept()  # only now: a spawn failure is a refusal, not an accepted stream
        await _Session(channel, proc, context.log, cgroup, signals=SIGNALS, grace=GRACE).run()
    finally:
        # Reset, link lost, enforcer stopping, or done: nothing may stay behind.
        if cgroup is not None:
            cgroup.kill()
        await reap(proc)


async def _run_tty(
    channel: Channel,
    runtime: Runtime,
    instance: ServiceInstance,
    container: Container,
    command: str,
    tty: TtyRequest,
    cgroup: Cgroup | None,
    context: HandlerContext,
) -> None:
    master, slave = open_pty(tty.size)
    try:
        spec = ProcessSpec.for_container(
            container, ctty_argv(["/bin/sh", "-c", command]), stdin=slave, stdout=slave, stderr=slave
        )
        # The client's terminal type wins over the container's (as ssh and docker do).
        term = tty.term or container.env.get("TERM") or DEFAULT_TERM
        try:
            proc = await _spawn(
                runtime, instance, replace(spec, env={**spec.env, "TERM": term}, cgroup=cgroup)
            )
        finally:
            os.close(slave)  # the command holds it now: its last close is the master's EIO
        try:
            channel.accept()
            session = PtySession(
                channel, proc, master, context.log, cgroup,
                signals=SIGNALS, grace=GRACE, read_chunk=READ_CHUNK, orphan_wait=ORPHAN_WAIT,
            )  # fmt: skip
            await session.run()
        finally:
            if cgroup is not None:
                cgroup.kill()
            await reap(proc)
    finally:
        os.close(master)


async def _spawn(
    runtime: Runtime, instance: ServiceInstance, spec: ProcessSpec
) -> asyncio.subprocess.Process:
    task = asyncio.ensure_future(runtime.spawn(instance, spec))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        # The stream went away mid-spawn: the process may still appear; end it.
        task.add_done_callback(_reap_abandoned)
        raise


def _reap_abandoned(task: asyncio.Future[asyncio.subprocess.Process]) -> None:
    if task.cancelled() or task.exception() is not None:
        return
    proc = task.result()
    kill_group(proc, signal.SIGKILL)  # now, even if the loop is closing
    reaper = asyncio.ensure_future(reap(proc))
    _reaping.add(reaper)
    reaper.add_done_callback(_reaping.discard)


class _OutputPump:
    """One pipe (stdout or stderr) to the stream, as output records."""

    def __init__(self, session: _Session, fd: int, reader: asyncio.StreamReader) -> None:
        self.session = session
        self.fd = fd
        self.reader = reader
        self.reading_since: float | None = None  # waiting on the pipe since (monotonic)

    async def run(self) -> None:
        while True:
            self.reading_since = time.monotonic()
            data = await self.reader.read(READ_CHUNK)
            self.reading_since = None
            if not data:
                return
            record = encode_output(self.fd, data)
            # Two pumps share the stream: a record must not be cut by the other's.
            async with self.session.write_lock:
                await self.session.channel.write(record)


class _Session(Command):
    """An exec stream joined to the command's pipes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.write_lock = asyncio.Lock()

    async def run(self) -> None:
        proc = self.proc
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        pumps = [_OutputPump(self, STDOUT, proc.stdout), _OutputPump(self, STDERR, proc.stderr)]
        outputs = {asyncio.create_task(pump.run()): pump for pump in pumps}
        stdin = asyncio.create_task(self._stdin(proc.stdin))
        control = asyncio.create_task(self._control())
        exited = asyncio.create_task(wait_exited(proc))
        everything = [*outputs, stdin, control, exited]
        try:
            await self.wait_exited(everything, exited)
            self.end_group()
            stdin.cancel()
            await self._drain(outputs)
            self.send_exit(exited.result())
        finally:
            await self.stop(everything)

    async def _drain(self, outputs: dict[asyncio.Task[None], _OutputPump]) -> None:
        """Wait until the pipes are empty and written to the stream (the exit status
        must come after all output)."""
        exited_at = time.monotonic()
        pending = set(outputs)
        while pending:
            done, pending = await asyncio.wait(pending, timeout=ORPHAN_WAIT / 4)
            for task in done:
                if not task.cancelled():
                    task.result()
            now = time.monotonic()
            for task in pending:
                since = outputs[task].reading_since
                if since is not None and now - max(since, exited_at) >= ORPHAN_WAIT:
                    task.cancel()  # an escaped process holds the pipe; no more output is coming

    async def _stdin(self, stdin: asyncio.StreamWriter) -> None:
        broken = False
        while data := await self.channel.read():
            if broken or stdin.is_closing():
                # The command closed its stdin: drop the input but keep reading, so
                # the client's credit keeps flowing until it sees the exit status.
                broken = True
                continue
            try:
                stdin.write(data)
                await stdin.drain()
            except (BrokenPipeError, ConnectionResetError):
                broken = True
        with contextlib.suppress(OSError):
            stdin.close()  # the client's EOF is the command's EOF

    async def _control(self) -> None:
        while True:
            self.on_signal(await self.channel.read_control())
