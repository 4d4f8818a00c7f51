"""The ``connect`` verb: ``... service-instances INSTANCE connect tcp PORT [tcp PORT ...]``.

The command line is parsed in :mod:`.forwards`; this runs it: netcat mode (one forward,
stdin/stdout) or every ``--bind`` forward at once, with one login renewal and one status
(:mod:`.render`).
"""

from __future__ import annotations

import asyncio
import errno
import functools
import ipaddress
import itertools
import os
import signal
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import click
from rich.markup import escape

from supctl import aio
from supctl.client.api import BindAddress, Forward, Invocation, Listener, Netcat, Streams
from supctl.client.session import TowerSession
from supctl.errors import ExitCode, UsageError
from supctl.link import Channel
from supctl.protocol import OpenRequest

from .account import keep_renewed
from .forwards import ConnectGroup, check_forwards, given_options, merge_options, run_options
from .render import ForwardReporter, HumanStatus, JsonEvents, Sink

#: Seconds a local connection waits for a re-opened session by default (--wait-tower).
WAIT_TOWER = 10.0


def make_connect_command() -> click.Group:
    @click.group(
        "connect",
        cls=ConnectGroup,
        chain=True,
        invoke_without_command=True,  # no forward: our one-line error, not the help
        subcommand_metavar="PROTOCOL PORT [OPTIONS] [PROTOCOL PORT [OPTIONS]]...",
        context_settings={"help_option_names": ["-h", "--help"]},
    )
    @run_options
    def connect(**_: object) -> None:
        """Forward connections to the service instance, or through it to an address it can reach.

        Several forwards in one command share one session with the tower (one reconnection,
        one login renewal, one status): connect tcp 443 --bind 8443 tcp 80 --bind 8080
        --ip-address 192.0.2.11
        """

    @connect.result_callback()
    @click.pass_context
    def run(ctx: click.Context, /, forwards: list[Forward], **_: object) -> int:
        inv = ctx.find_object(Invocation)
        assert inv is not None
        options = merge_options([given_options(ctx), *(f.given for f in forwards)])
        check_forwards(forwards, options)
        site = inv.require_site()
        for forward in forwards:
            for address in forward.binds:
                if not ipaddress.ip_address(address.host).is_loopback:
                    inv.console.print(
                        f"[yellow]warning:[/] --bind {escape(str(address))} is not a loopback address:"
                        " anyone who can reach it uses this forward, with your credentials (as ssh -g"
                        " and kubectl --address)",
                        soft_wrap=True,
                    )
        assert inv.application is not None and inv.service_instance is not None
        path = (
            f"/v1/state/applications/{quote(inv.application, safe='')}"
            f"/service-instances/{quote(inv.service_instance, safe='')}/connect"
        )

        # One session for every forward: each target once, in order (docs/protocol.md).
        query: dict[str, list[str]] = {
            "site": [site],
            "protocol": [f.protocol for f in forwards],
            "port": [str(f.port) for f in forwards],
        }
        if any(f.ip_address for f in forwards):
            query["ip-address"] = [f.ip_address or "" for f in forwards]
        if not forwards[0].binds:
            return aio.run(_netcat(inv, forwards[0], path, query))
        wait = options["wait_tower"]
        sink: Sink
        if options["output"] == "json":
            sink = JsonEvents()
        else:
            sink = HumanStatus(
                inv.console,
                time.monotonic,
                quiet=bool(options["quiet"]),
                verbose=bool(options["verbose"]),
                several=len(forwards) > 1,
            )
        plan = [(f, f"{BindAddress(f.ip_address or '127.0.0.1', f.port)} in {inv.where}") for f in forwards]
        wait_tower = float(wait) if isinstance(wait, int | float) else WAIT_TOWER
        return aio.run(_serve(inv, path, plan, query, sink, wait_tower))

    return connect


async def _netcat(inv: Invocation, forward: Forward, path: str, query: dict[str, list[str]]) -> int:
    """Netcat mode: one stream, stdin/stdout; a lost session ends it (StreamError, exit 6)."""
    netcat: Netcat | None = forward.netcat or inv.pm.hook.supctl_netcat()
    if netcat is None:
        raise UsageError("no netcat backend plugin is installed")
    request = OpenRequest(verb="connect", args=dict(forward.open_args))  # the tower fills in the rest
    link = await inv.transport().open_session(path, query)
    try:
        # No wait for ACCEPT: the first bytes travel with the OPEN (EARLY_DATA).
        await netcat.run(lambda: link.open_channel_now(request))
    finally:
        await link.aclose()
    return ExitCode.OK


class ForwardStreams:
    """The :class:`~supctl.client.api.Streams` of one forward: streams of the one session,
    each OPEN naming the forward's target by its position (the tower granted them all)."""

    def __init__(self, session: TowerSession, position: int, args: Mapping[str, object]) -> None:
        self.session = session
        # The first target is the session's own: its OPEN is the seed's, understood by any tower.
        forward = {"forward": position} if position else {}
        self.request = OpenRequest(verb="connect", args={**forward, **args})

    def open_now(self) -> Channel | None:
        return self.session.open_now(self.request)

    async def open(self) -> Channel:
        return await self.session.open(self.request)


async def _serve(
    inv: Invocation,
    path: str,
    plan: list[tuple[Forward, str]],
    query: dict[str, list[str]],
    sink: Sink,
    wait: float,
) -> int:
    """Every forward over one session with the tower: one WebSocket, one reconnect, one renewal."""
    transport = inv.transport()
    request = OpenRequest(verb="connect")  # the tower fills in what it authorised
    session = TowerSession(functools.partial(transport.open_session, path, query), request, sink, wait=wait)
    servers: list[asyncio.Future[None]] = []
    try:
        try:
            await session.start()
        except UsageError as exc:
            if len(plan) > 1 and "given more than once" in str(exc):  # a tower from before several forwards
                raise UsageError(
                    f"{exc}: this tower takes one forward per session; run supctl once per forward"
                ) from None
            raise
        for index, (forward, target) in enumerate(plan, 1):
            listener: Listener | None = forward.listener or inv.pm.hook.supctl_listener()
            if listener is None:
                raise UsageError("no listener backend plugin is installed")
            streams = ForwardStreams(session, index - 1, forward.open_args)
            servers += await _listen(listener, streams, index, forward, target, sink)
    except BaseException:
        await _stop(servers, session)
        raise
    # A login token is renewed before it expires, for as long as the forwards run.
    from_login = inv.settings.token_source == "login"  # noqa: S105 - a source name, not a secret
    renewer = asyncio.ensure_future(keep_renewed(inv)) if from_login else None
    status = asyncio.ensure_future(sink.run()) if isinstance(sink, HumanStatus) else None
    try:
        return await _serve_until_stopped(session, servers)
    finally:
        for task in (renewer, status):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)


async def _listen(
    listener: Listener, streams: Streams, index: int, forward: Forward, target: str, sink: Sink
) -> list[asyncio.Future[None]]:
    """Listen on each address of ``forward`` (two for ``localhost``: the second takes the
    port the first got); return the serving tasks once each listens."""
    loop = asyncio.get_running_loop()
    numbers = itertools.count(1)
    reporter = ForwardReporter(sink, index, forward, numbers)
    tasks: list[asyncio.Future[None]] = []
    port: int | None = None
    for wanted in forward.binds:
        address = BindAddress(wanted.host, port) if wanted.port == 0 and port is not None else wanted
        ready: asyncio.Future[BindAddress] = loop.create_future()

        def on_ready(real: BindAddress, ready: asyncio.Future[BindAddress] = ready) -> None:
            sink.listening(index, forward, real, target)
            if not ready.done():
                ready.set_result(real)

        task = asyncio.ensure_future(listener.serve(streams, address, on_ready, reporter))
        await asyncio.wait([task, ready], return_when=asyncio.FIRST_COMPLETED)  # type: ignore[type-var]
        if ready.done():
            tasks.append(task)
            port = port or ready.result().port
            continue
        error = task.exception()
        if tasks and isinstance(error, OSError) and error.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
            # localhost without IPv6 (no ::1 on lo): 127.0.0.1 serves alone.
            sink.detail(f"--bind {forward.bind}: no {address} here ({os.strerror(error.errno).lower()}); "
                        f"listening on {forward.binds[0].host} only")  # fmt: skip
            continue
        if isinstance(error, OSError):
            raise UsageError(f"cannot listen on {address}: {error.strerror or error}")
        task.result()
    return tasks


async def _stop(servers: list[asyncio.Future[None]], session: TowerSession) -> None:
    for task in servers:
        task.cancel()
    await asyncio.gather(*servers, return_exceptions=True)
    for link in [session.link, *session.draining]:
        if link is not None:
            await link.aclose()


async def _serve_until_stopped(session: TowerSession, servers: list[asyncio.Future[Any]]) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    stopper: asyncio.Future[object] = asyncio.ensure_future(stop.wait())
    keeper: asyncio.Future[object] = asyncio.ensure_future(session.keep())
    try:
        tasks: list[asyncio.Future[object]] = [*servers, stopper, keeper]
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        if stopper not in done:
            for task in done:
                task.result()  # a listener's failure, or what ends the session (a revoked token...)
        return ExitCode.OK
    except OSError as exc:
        raise UsageError(f"cannot listen: {exc.strerror or exc}") from None
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        for task in (stopper, keeper):
            task.cancel()
        await asyncio.gather(stopper, keeper, return_exceptions=True)
        await _stop(servers, session)
