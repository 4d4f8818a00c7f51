"""The site's ``logs`` handler: keeps every supervised container's output in a
:class:`~supctl_logs.book.Shelf` and serves ``logs`` streams from it.

The enforcer calls :meth:`LogsHandler.observe` with each line and life event of the
containers it supervises (from its start), and :meth:`LogsHandler.configure` with the
inventory's ``[verbs.logs]`` table at start and at each reload.

A stream gets the selection its args ask for (``tail``, ``since``), as records of
:mod:`supctl_logs.wire`, then, with ``follow``, every new entry as it comes, until the
client ends its half of the stream (its EOF) or resets it.  Without ``follow`` the site
ends its half after what the book held when the stream began, so a chatty container
cannot make ``logs`` run for ever.  Records go out with ``await channel.write()``, which
waits for credit: a slow client holds only its cursor in the book, and learns from one
mark how many lines it missed if the ring moved past it meanwhile.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any

from supctl.enforcer.api import (
    ContainerEvent,
    ContainerOutput,
    HandlerContext,
    ServiceInstance,
    parse_args,
)
from supctl.link import Channel
from supctl.protocol import OpenRequest
from supctl.schema import SECONDS, Rule, Source, between, load

from . import wire
from .book import DEFAULT_CAPACITY, MARK_FD, MAX_CAPACITY, MIN_CAPACITY, Entry, Key, Shelf

#: Payload bytes sent per write: big enough to fill a window in a few writes, small
#: enough that a reader that falls behind is noticed between them.
BATCH_BYTES = 64 * 1024
#: Most lines ``tail`` may ask for.
MAX_TAIL = 1_000_000


@dataclass(frozen=True, slots=True)
class LogsSettings:
    """The inventory's ``[verbs.logs]`` table."""

    #: Bytes held per container (payloads + a fixed overhead per line: supctl_logs.book).
    buffer_bytes: Annotated[
        int,
        Rule(
            f"an integer from {MIN_CAPACITY} to {MAX_CAPACITY} (bytes)", between(MIN_CAPACITY, MAX_CAPACITY)
        ),
    ] = DEFAULT_CAPACITY


@dataclass(frozen=True, slots=True)
class LogsArgs:
    """The OPEN's ``args`` of a logs stream (times are always sent: ``--timestamps`` is
    the client's business)."""

    tail: Annotated[int | None, Rule(f"an integer from 0 to {MAX_TAIL}", between(0, MAX_TAIL))] = None
    since: Annotated[float | None, SECONDS] = None  # seconds back from the site's clock
    follow: bool = False


class LogsHandler:
    """Serves ``Serves("logs")`` streams; one per enforcer (it holds the books)."""

    def __init__(self) -> None:
        self.shelf = Shelf(DEFAULT_CAPACITY, on_forget=self._wake)
        # Followers waiting for a container's next entry; set (and dropped) by the next one.
        # At most one per container the enforcer reported or a stream named (the dispatcher
        # let only the inventory's containers through).
        self._wakers: dict[Key, asyncio.Event] = {}

    # --- fed by the enforcer -----------------------------------------------------------------

    def configure(self, settings: Mapping[str, Any]) -> None:
        config = load(LogsSettings, settings, Source("inventory [verbs.logs]"))
        self.shelf.configure(config.buffer_bytes, time.time())

    def observe(self, item: ContainerOutput | ContainerEvent) -> None:
        key = (item.application, item.service_instance, item.container)
        if isinstance(item, ContainerOutput):
            if item.fd in (wire.STDOUT, wire.STDERR):
                self.shelf.output(key, item.fd, item.data, item.time)
        else:
            self.shelf.event(key, item.event, item.time, item.exit_code)
        self._wake(key)

    def _wake(self, key: Key) -> None:
        waker = self._wakers.pop(key, None)
        if waker is not None:
            waker.set()

    def _waker(self, key: Key) -> asyncio.Event:
        waker = self._wakers.get(key)
        if waker is None:
            waker = self._wakers[key] = asyncio.Event()
        return waker

    # --- one stream ----------------------------------------------------------------------------

    async def handle(
        self, channel: Channel, request: OpenRequest, instance: ServiceInstance, context: HandlerContext
    ) -> None:
        args = parse_args(LogsArgs, request)
        key = (request.application, request.service_instance, request.container)
        cutoff = None if args.since is None else context.clock() - args.since
        channel.accept()
        client = asyncio.create_task(_until_eof(channel))
        sender = asyncio.create_task(self._send(channel, key, args, cutoff, context))
        try:
            await asyncio.wait({client, sender}, return_when=asyncio.FIRST_COMPLETED)
            if sender.done():
                sender.result()  # a StreamError: the stream broke under a write
                channel.write_eof()
                await client  # the client's EOF closes the stream (or its reset, raised)
            else:
                client.result()
                channel.write_eof()
        finally:
            for task in (client, sender):
                task.cancel()
            await asyncio.gather(client, sender, return_exceptions=True)

    async def _send(
        self, channel: Channel, key: Key, args: LogsArgs, cutoff: float | None, context: HandlerContext
    ) -> None:
        book = self.shelf.get(key)
        # A book made later (the container's first line is still to come) is read from 0.
        cursor = 0 if book is None else book.start(args.tail, cutoff)
        stop_at = None if args.follow else (0 if book is None else book.end)
        while True:
            if book is None:
                book = self.shelf.get(key)
            if book is not None:
                if book.forgotten:  # removed from the inventory a while ago (or over the bound)
                    note = f"the site no longer keeps the output of container {book.name}"
                    await channel.write(wire.encode(wire.MARK, 0, _date(context.clock()), note.encode()))
                    return
                if stop_at is not None and cursor >= stop_at:
                    return
                dropped, entries, cursor = book.read(cursor, BATCH_BYTES)
                if stop_at is not None:
                    entries = [entry for entry in entries if entry.seq < stop_at]
                if dropped or entries:
                    await channel.write(_encode(dropped, entries, context.clock()))
                    continue
            if stop_at is not None:
                return
            await self._waker(key).wait()


def _encode(dropped: int, entries: list[Entry], now: float) -> bytes:
    parts = []
    if dropped:
        note = f"{dropped} lines were dropped: this reader fell behind the site's buffer"
        parts.append(wire.encode(wire.MARK, 0, _date(now), note.encode()))
    for entry in entries:
        kind = wire.MARK if entry.fd == MARK_FD else wire.OUTPUT
        parts.append(wire.encode(kind, entry.fd, _date(entry.time), entry.data))
    return b"".join(parts)


def _date(when: float) -> float:
    """A time the wire takes (a clock set before 1970 must not cost the stream)."""
    return min(max(when, 0.0), wire.MAX_TIME - 1)


async def _until_eof(channel: Channel) -> None:
    """Read (and drop: a logs client sends nothing) until the client's EOF; StreamError
    when it resets the stream."""
    while await channel.read():
        pass
