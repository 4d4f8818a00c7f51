"""The ``connect`` verb: ``... service-instances INSTANCE connect tcp PORT``."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import signal
from collections.abc import Callable, Coroutine
from urllib.parse import quote

import click
from rich.console import Console
from rich.markup import escape

from supctl import aio
from supctl.client.api import BindAddress, Invocation, Listener, Netcat
from supctl.client.session import TowerSession
from supctl.errors import ExitCode, UsageError
from supctl.protocol import OpenRequest, check_ip_address
from supctl.protocol.targets import NOT_NUMERIC

from .account import keep_renewed

#: Seconds a local connection waits for a re-opened session by default (--wait-tower).
WAIT_TOWER = 10.0


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


def _once(option: str, values: tuple[str, ...]) -> str | None:
    """The one value of an option that may be given once: a second one is an error, never
    silently the last (several forwards in one command are not supported yet)."""
    if len(values) > 1:
        raise UsageError(
            f"{option} given {len(values)} times ({', '.join(values)}): one forward per command;"
            " run supctl once per forward"
        )
    return values[0] if values else None


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


class ConsoleSessionReport:
    """The session's lines: lost, still lost (once a minute), back."""

    def __init__(self, console: Console) -> None:
        self.console = console

    def lost(self, reason: str) -> None:
        self.console.print(
            f"[yellow]tower connection lost; reconnecting...[/] ({escape(reason)})", soft_wrap=True
        )

    def still_lost(self, seconds: float, reason: str) -> None:
        self.console.print(
            f"[yellow]still reconnecting after {seconds:.0f} s:[/] {escape(reason)}", soft_wrap=True
        )

    def back(self, seconds: float) -> None:
        self.console.print(f"reconnected after {seconds:.1f} s", soft_wrap=True)

    def moving(self, reason: str) -> None:
        self.console.print(
            f"[yellow]the tower is draining ({escape(reason)}); moving to a new session...[/]", soft_wrap=True
        )


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


class JsonEvents:
    """``-o json``: one JSON object per line on stdout for each event of a ``--bind`` forward
    (the session's and the connections'), for scripts; the human lines stay off."""

    def __init__(self, out: Callable[[str], object] = click.echo) -> None:
        self.out = out

    def emit(self, event: str, **fields: object) -> None:
        self.out(json.dumps({"event": event, "time": _now(), **fields}, separators=(",", ":")))

    # the listener's (ConsoleReporter's) events
    def opened(self, number: int, peer: str) -> None:
        self.emit("opened", connection=number, peer=peer)

    def closed(self, number: int, sent: int, received: int, seconds: float, error: str | None) -> None:
        fields = {"connection": number, "sent": sent, "received": received, "seconds": round(seconds, 3)}
        self.emit("closed", **fields, result="ok" if error is None else error)

    # the session's (ConsoleSessionReport's) events
    def lost(self, reason: str) -> None:
        self.emit("tower-lost", reason=reason)

    def still_lost(self, seconds: float, reason: str) -> None:
        self.emit("still-reconnecting", seconds=round(seconds, 1), reason=reason)

    def back(self, seconds: float) -> None:
        self.emit("reconnected", seconds=round(seconds, 3))

    def moving(self, reason: str) -> None:
        self.emit("moving", reason=reason)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def make_connect_command() -> click.Group:
    @click.group("connect", context_settings={"help_option_names": ["-h", "--help"]})
    def connect() -> None:
        """Forward connections to the service instance, or through it to an address it can reach."""

    @connect.command("tcp")
    @click.argument("port", type=click.IntRange(1, 65535))
    @click.option(
        "--ip-address",
        metavar="IP",
        multiple=True,  # given twice is an error, never the last one silently
        help="Numeric IPv4/IPv6 address to reach from inside the service instance (default 127.0.0.1 there).",
    )
    @click.option(
        "--bind",
        metavar="[ADDR:]PORT",
        multiple=True,
        help="Listen here (default address 127.0.0.1; 0 picks a free port). Without it: stdin/stdout.",
    )
    @click.option("-q", "--quiet", is_flag=True, help="No line per connection (failures are still shown).")
    @click.option(
        "-o",
        "--output",
        type=click.Choice(["text", "json"]),
        default="text",
        show_default=True,
        help="With --bind, json: one JSON object per event on stdout (listening, opened, closed...).",
    )
    @click.option(
        "--wait-tower",
        metavar="SECONDS",
        type=click.FloatRange(0, 3600),
        help="With --bind: how long a local connection waits while the session with the tower "
        "is re-opened, before it is reset  [default: 10].",
    )
    @click.pass_obj
    def tcp(
        inv: Invocation,
        port: int,
        ip_address: tuple[str, ...],
        bind: tuple[str, ...],
        quiet: bool,
        output: str,
        wait_tower: float | None,
    ) -> int:
        """Forward TCP to PORT on 127.0.0.1 inside the service instance (or on --ip-address)."""
        site = inv.require_site()
        ip_given, bind_given = _once("--ip-address", ip_address), _once("--bind", bind)
        target_ip = check_target_ip(inv, ip_given) if ip_given is not None else None
        bind_address = parse_bind(bind_given) if bind_given is not None else None
        if bind_address is not None and not ipaddress.ip_address(bind_address.host).is_loopback:
            inv.console.print(
                f"[yellow]warning:[/] --bind {escape(str(bind_address))} is not a loopback address: anyone"
                " who can reach it uses this forward, with your credentials (as ssh -g and kubectl --address)",
                soft_wrap=True,
            )
        if wait_tower is not None and bind_address is None:
            raise UsageError("--wait-tower needs --bind (netcat mode does not reconnect)")
        if output == "json" and bind_address is None:
            raise UsageError("-o json needs --bind (in netcat mode stdout carries the data)")
        assert inv.application is not None and inv.service_instance is not None
        path = (
            f"/v1/state/applications/{quote(inv.application, safe='')}"
            f"/service-instances/{quote(inv.service_instance, safe='')}/connect"
        )
        query = {"site": site, "protocol": "tcp", "port": str(port)}
        if target_ip:
            query["ip-address"] = target_ip
        target = f"{BindAddress(target_ip or '127.0.0.1', port)} in {inv.where}"
        return aio.run(
            _run(
                inv,
                path,
                query,
                target,
                bind_address,
                quiet,
                WAIT_TOWER if wait_tower is None else wait_tower,
                JsonEvents() if output == "json" else None,
            )
        )

    return connect


async def _run(
    inv: Invocation,
    path: str,
    query: dict[str, str],
    target: str,
    bind: BindAddress | None,
    quiet: bool,
    wait_tower: float,
    events: JsonEvents | None = None,
) -> int:
    transport = inv.transport()
    request = OpenRequest(verb="connect")  # the tower fills in what it authorised
    console = inv.console
    report = events if events is not None else ConsoleSessionReport(console)
    session = TowerSession(lambda: transport.open_session(path, query), request, report, wait=wait_tower)
    link = await session.start()

    if bind is None:
        # Netcat mode has one stream: a lost session ends it (StreamError, exit 6).
        netcat: Netcat | None = inv.pm.hook.supctl_netcat()
        if netcat is None:
            raise UsageError("no netcat backend plugin is installed")
        try:
            # No wait for ACCEPT: the first bytes travel with the OPEN (EARLY_DATA).
            await netcat.run(lambda: link.open_channel_now(request))
        finally:
            await link.aclose()
        return ExitCode.OK

    listener: Listener | None = inv.pm.hook.supctl_listener()
    if listener is None:
        raise UsageError("no listener backend plugin is installed")

    def ready(address: BindAddress) -> None:
        if events is not None:  # the real port of --bind 0, for scripts
            events.emit("listening", address=address.host, port=address.port, target=target)
        else:
            console.print(f"Forwarding from {address} -> {escape(target)}", soft_wrap=True)

    # A login token is renewed before it expires, for as long as the forward runs.
    from_login = inv.settings.token_source == "login"  # noqa: S105 - a source name, not a secret
    renewer = asyncio.ensure_future(keep_renewed(inv)) if from_login else None
    try:
        return await _serve_until_stopped(
            session, listener.serve(session, bind, ready, events or ConsoleReporter(console, quiet))
        )
    finally:
        if renewer is not None:
            renewer.cancel()
            await asyncio.gather(renewer, return_exceptions=True)


async def _serve_until_stopped(session: TowerSession, serving: Coroutine[object, object, None]) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    server = asyncio.ensure_future(serving)
    stopper = asyncio.ensure_future(stop.wait())
    keeper = asyncio.ensure_future(session.keep())
    try:
        done, _ = await asyncio.wait({server, stopper, keeper}, return_when=asyncio.FIRST_COMPLETED)
        if server in done:
            server.result()  # e.g. address already in use
        if keeper in done and stopper not in done:
            keeper.result()  # the error that ends the forward (a revoked token...)
        return ExitCode.OK
    except OSError as exc:
        raise UsageError(f"cannot listen: {exc.strerror or exc}") from None
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        for task in (server, stopper, keeper):
            task.cancel()
        await asyncio.gather(server, stopper, keeper, return_exceptions=True)
        for link in [session.link, *session.draining]:
            if link is not None:
                await link.aclose()
