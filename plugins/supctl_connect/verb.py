"""The ``connect`` verb: ``... service-instances INSTANCE connect tcp PORT``."""

from __future__ import annotations

import asyncio
import ipaddress
import signal
from urllib.parse import quote

import click
from rich.console import Console
from rich.markup import escape

from supctl import aio
from supctl.client.api import BindAddress, Invocation, Listener, Netcat
from supctl.errors import DeniedError, ExitCode, UnavailableError, UsageError
from supctl.link import Channel, Link
from supctl.protocol import ErrorCode, OpenRequest, check_ip_address
from supctl.protocol.frames import CLOSE_CODE_BASE
from supctl.protocol.targets import NOT_NUMERIC

from .account import keep_renewed


def parse_bind(value: str) -> BindAddress:
    """``PORT``, ``ADDR:PORT`` or ``[IPv6]:PORT``; the address defaults to 127.0.0.1."""
    host, sep, port_text = value.rpartition(":")
    if not sep:
        host, port_text = "127.0.0.1", value
    host = host.strip("[]") or "127.0.0.1"
    if host == "localhost":
        host = "127.0.0.1"
    try:
        port = int(port_text)
    except ValueError:
        raise UsageError(f"--bind wants [ADDR:]PORT, got {value!r}") from None
    if not 0 <= port <= 65535:
        raise UsageError(f"--bind port {port} is out of range 0-65535")
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        raise UsageError(f"--bind address must be numeric (or localhost), got {host!r}") from None
    return BindAddress(host, port)


def check_target_ip(inv: Invocation, value: str) -> str:
    try:
        return check_ip_address(value)
    except ValueError as exc:
        if str(exc) != NOT_NUMERIC:  # numeric, but not a target: say which rule
            raise UsageError(f"--ip-address {value}: {exc}") from None
        where = (
            f"supctl do -s {inv.site} applications {inv.application} service-instances "
            f"{inv.service_instance} containers CONTAINER exec 'nslookup {value}'"
        )
        raise UsageError(
            f"--ip-address must be a numeric IPv4 or IPv6 address, not {value!r}: connect never resolves "
            f"names; resolve it at the site first, e.g. {where}"
        ) from None


class ConsoleReporter:
    def __init__(self, console: Console, quiet: bool) -> None:
        self.console = console
        self.quiet = quiet

    def opened(self, number: int, peer: str) -> None:
        if not self.quiet:
            self.console.print(f"connection {number} from {escape(peer)} opened", soft_wrap=True)

    def closed(self, number: int, sent: int, received: int, seconds: float, error: str | None) -> None:
        if error is not None:
            self.console.print(f"[red]connection {number} failed:[/] {escape(error)}", soft_wrap=True)
        elif not self.quiet:
            self.console.print(
                f"connection {number} closed: {sent} B sent, {received} B received in {seconds:.1f} s",
                soft_wrap=True,
            )


def make_connect_command() -> click.Group:
    @click.group("connect", context_settings={"help_option_names": ["-h", "--help"]})
    def connect() -> None:
        """Forward connections to the service instance, or through it to an address it can reach."""

    @connect.command("tcp")
    @click.argument("port", type=click.IntRange(1, 65535))
    @click.option(
        "--ip-address",
        metavar="IP",
        help="Numeric IPv4/IPv6 address to reach from inside the service instance (default 127.0.0.1 there).",
    )
    @click.option(
        "--bind",
        metavar="[ADDR:]PORT",
        help="Listen here (default address 127.0.0.1; 0 picks a free port). Without it: stdin/stdout.",
    )
    @click.option("-q", "--quiet", is_flag=True, help="No line per connection (failures are still shown).")
    @click.pass_obj
    def tcp(inv: Invocation, port: int, ip_address: str | None, bind: str | None, quiet: bool) -> int:
        """Forward TCP to PORT on 127.0.0.1 inside the service instance (or on --ip-address)."""
        site = inv.require_site()
        target_ip = check_target_ip(inv, ip_address) if ip_address is not None else None
        bind_address = parse_bind(bind) if bind is not None else None
        assert inv.application is not None and inv.service_instance is not None
        path = (
            f"/v1/state/applications/{quote(inv.application, safe='')}"
            f"/service-instances/{quote(inv.service_instance, safe='')}/connect"
        )
        query = {"site": site, "protocol": "tcp", "port": str(port)}
        if target_ip:
            query["ip-address"] = target_ip
        target = f"{BindAddress(target_ip or '127.0.0.1', port)} in {inv.where}"
        return aio.run(_run(inv, path, query, target, bind_address, quiet))

    return connect


async def _run(
    inv: Invocation, path: str, query: dict[str, str], target: str, bind: BindAddress | None, quiet: bool
) -> int:
    link = await inv.transport().open_session(path, query)
    request = OpenRequest(verb="connect")  # the tower fills in what it authorised

    def open_stream() -> Channel:
        # No wait for ACCEPT: the first bytes travel with the OPEN (EARLY_DATA), and a
        # refusal arrives as StreamError from the channel, for this connection only.
        return link.open_channel_now(request)

    if bind is None:
        netcat: Netcat | None = inv.pm.hook.supctl_netcat()
        if netcat is None:
            raise UsageError("no netcat backend plugin is installed")
        try:
            await netcat.run(open_stream)
        finally:
            await link.aclose()
        return ExitCode.OK

    listener: Listener | None = inv.pm.hook.supctl_listener()
    if listener is None:
        raise UsageError("no listener backend plugin is installed")
    console = inv.console

    def ready(address: BindAddress) -> None:
        console.print(f"Forwarding from {address} -> {escape(target)}", soft_wrap=True)

    # A login token is renewed before it expires, for as long as the forward runs.
    from_login = inv.settings.token_source == "login"  # noqa: S105 - a source name, not a secret
    renewer = asyncio.ensure_future(keep_renewed(inv)) if from_login else None
    try:
        return await _serve_until_stopped(
            link, listener.serve(link, open_stream, bind, ready, ConsoleReporter(console, quiet))
        )
    finally:
        if renewer is not None:
            renewer.cancel()
            await asyncio.gather(renewer, return_exceptions=True)


async def _serve_until_stopped(link: Link, serving: object) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    assert asyncio.iscoroutine(serving)
    server = asyncio.ensure_future(serving)
    stopper = asyncio.ensure_future(stop.wait())
    assert link.task is not None
    try:
        done, _ = await asyncio.wait({server, stopper, link.task}, return_when=asyncio.FIRST_COMPLETED)
        if server in done:
            server.result()  # e.g. address already in use
        if link.task in done and stopper not in done:
            reason = f"the tower closed the session: {link.lost_reason}"
            if link.lost_code == CLOSE_CODE_BASE + ErrorCode.DENIED:  # e.g. its token was revoked
                raise DeniedError(reason)
            raise UnavailableError(f"lost the connection to the tower: {link.lost_reason or 'closed'}")
        return ExitCode.OK
    except OSError as exc:
        raise UsageError(f"cannot listen: {exc.strerror or exc}") from None
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        for task in (server, stopper):
            task.cancel()
        await asyncio.gather(server, stopper, return_exceptions=True)
        await link.aclose()
