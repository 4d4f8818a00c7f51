"""The ``connect`` command line: a chain of forwards, each parsed by its protocol.

``connect tcp 443 --bind 8443 tcp 80 --bind 8080 --ip-address 192.0.2.11`` is a click
group in chain mode: every protocol (``tcp`` here, more from plugins through the
``supctl_add_connect_protocols`` hook) is a subcommand that parses its own port and
options up to the next protocol name and returns a :class:`Forward`.  The options of the
whole run (``-q``, ``-v``, ``-o``, ``--wait-tower``) may stand before the first forward or
after any of them (the seed's ``connect tcp 443 --bind 0 -o json``); written twice with
different values, they are an error, never one of them silently.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import click
from click.core import ParameterSource

from supctl.client.api import BindAddress, Forward, ForwardCommand, Invocation
from supctl.errors import UsageError
from supctl.plugins import collect, make_plugin_manager
from supctl.protocol import check_ip_address
from supctl.protocol.targets import NOT_NUMERIC

F = TypeVar("F", bound=Callable[..., Any])

#: The run-wide options, by parameter name, with their default.
RUN_DEFAULTS: dict[str, object] = {"quiet": False, "verbose": False, "output": "text", "wait_tower": None}
_SPELLING = {"quiet": "-q", "verbose": "-v", "output": "-o", "wait_tower": "--wait-tower"}


def run_options(command: F) -> F:
    """The run-wide options, for the ``connect`` group and for each protocol subcommand."""
    for decorator in reversed(
        [
            click.option(
                "-q", "--quiet", is_flag=True, help="Only failures: no line per connection, no live table."
            ),
            click.option(
                "-v",
                "--verbose",
                is_flag=True,
                help="Stream detail per connection: stream id, open latency, reason of the close.",
            ),
            click.option(
                "-o",
                "--output",
                type=click.Choice(["text", "json"]),
                multiple=True,  # given twice is judged, never the last one silently
                help="With --bind, json: one JSON object per event on stdout (listening, opened, closed...)"
                "  [default: text].",
            ),
            click.option(
                "--wait-tower",
                metavar="SECONDS",
                type=click.FloatRange(0, 3600),
                multiple=True,
                help="With --bind: how long a local connection waits while the session with the tower "
                "is re-opened, before it is reset  [default: 10].",
            ),
        ]
    ):
        command = decorator(command)
    return command


def given_options(ctx: click.Context) -> dict[str, object]:
    """The run-wide options the user wrote on this command (defaults left out); an option
    written twice with different values is an error."""
    given: list[dict[str, object]] = []
    for name in RUN_DEFAULTS:
        if ctx.get_parameter_source(name) is not ParameterSource.COMMANDLINE:
            continue
        value = ctx.params[name]
        given += [{name: v} for v in value] if isinstance(value, tuple) else [{name: value}]
    return merge_options(given, defaults=False)


def merge_options(sources: Iterable[Mapping[str, object]], *, defaults: bool = True) -> dict[str, object]:
    """One value per run-wide option (with the defaults of the others): a value given twice
    must be the same."""
    merged: dict[str, object] = {}
    for given in sources:
        for name, value in given.items():
            if name in merged and merged[name] != value:
                raise UsageError(
                    f"{_SPELLING[name]} given twice with different values ({merged[name]}, {value});"
                    " it applies to the whole command: give it once"
                )
            merged[name] = value
    return {**RUN_DEFAULTS, **merged} if defaults else merged


def parse_bind(value: str) -> tuple[BindAddress, ...]:
    """``PORT``, ``ADDR:PORT``, ``[IPv6]:PORT`` or ``localhost:PORT``: where to listen.

    The address defaults to 127.0.0.1; ``localhost`` is both 127.0.0.1 and ::1 (two
    sockets, one port), as ssh -L and kubectl port-forward bind it."""
    host, sep, port_text = value.rpartition(":")
    if not sep:
        host, port_text = "127.0.0.1", value
    host = host.strip("[]") or "127.0.0.1"
    try:
        port = int(port_text)
    except ValueError:
        raise UsageError(f"--bind wants [ADDR:]PORT, got {value!r}") from None
    if not 0 <= port <= 65535:
        raise UsageError(f"--bind port {port} is out of range 0-65535")
    if host == "localhost":
        return (BindAddress("127.0.0.1", port), BindAddress("::1", port))
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        raise UsageError(f"--bind address must be numeric (or localhost), got {host!r}") from None
    return (BindAddress(host, port),)


def _overlap(a: BindAddress, b: BindAddress) -> bool:
    """Whether two listening sockets would claim the same port on some address."""
    if a.port != b.port or a.port == 0:
        return False
    ip_a, ip_b = ipaddress.ip_address(a.host), ipaddress.ip_address(b.host)
    # A wildcard (0.0.0.0, ::) takes the port on every address of its family; asyncio
    # listens on IPv6 with IPV6_V6ONLY, so :: leaves IPv4 alone.
    if ip_a.is_unspecified or ip_b.is_unspecified:
        return ip_a.version == ip_b.version
    return ip_a == ip_b


def check_forwards(forwards: list[Forward], options: dict[str, object]) -> None:
    """The chain as a whole: netcat takes one forward, no local port twice."""
    if not forwards:
        raise UsageError("no forward given: connect tcp PORT [--ip-address IP] [--bind [ADDR:]PORT] ...")
    netcat = [f for f in forwards if not f.binds]
    if netcat and len(forwards) > 1:
        raise UsageError(
            f"forward {forwards.index(netcat[0]) + 1} ({netcat[0].label}) has no --bind: netcat mode"
            " (stdin/stdout) takes exactly one forward; give every forward a --bind"
        )
    if netcat and options["output"] == "json":
        raise UsageError("-o json needs --bind (in netcat mode stdout carries the data)")
    if netcat and options["wait_tower"] is not None:
        raise UsageError("--wait-tower needs --bind (netcat mode does not reconnect)")
    seen: list[tuple[BindAddress, Forward]] = []
    for forward in forwards:
        for address in forward.binds:
            for other_address, other in seen:
                if other is not forward and _overlap(address, other_address):
                    raise UsageError(
                        f"--bind {other.bind} ({other.label}) and --bind {forward.bind} ({forward.label})"
                        f" both listen on port {address.port}: give each forward its own local port"
                    )
            seen.append((address, forward))


def _once(option: str, values: tuple[str, ...]) -> str | None:
    """The one value of a per-forward option: a second one is an error, never silently the last."""
    if len(values) > 1:
        raise UsageError(
            f"{option} given {len(values)} times ({', '.join(values)}) for one forward; for several"
            " forwards repeat the protocol: connect tcp 443 --bind 8443 tcp 80 --bind 8080"
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


def make_tcp_command() -> click.Command:
    @click.command("tcp", cls=ForwardCommand, context_settings={"help_option_names": ["-h", "--help"]})
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
        help="Listen here (default address 127.0.0.1; localhost: 127.0.0.1 and ::1; 0 picks a free port)."
        " Without it: stdin/stdout.",
    )
    @run_options
    @click.pass_context
    def tcp(
        ctx: click.Context, /, port: int, ip_address: tuple[str, ...], bind: tuple[str, ...], **_: object
    ) -> Forward:
        """Forward TCP to PORT on 127.0.0.1 inside the service instance (or on --ip-address)."""
        inv = ctx.find_object(Invocation)
        assert inv is not None
        ip_given, bind_given = _once("--ip-address", ip_address), _once("--bind", bind)
        return Forward(
            "tcp",
            port,
            ip_address=check_target_ip(inv, ip_given) if ip_given is not None else None,
            bind=bind_given,
            binds=parse_bind(bind_given) if bind_given is not None else (),
            given=given_options(ctx),
        )

    return tcp


class ConnectGroup(click.Group):
    """``connect``: its subcommands are the protocols the plugins registered, looked up
    when the command line is parsed (the plugin manager is the invocation's)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._protocols: dict[str, click.Command] | None = None

    def protocols(self, ctx: click.Context) -> dict[str, click.Command]:
        if self._protocols is None:
            inv = ctx.find_object(Invocation)
            # Without supctl's root (the docs' reference walks the tree): every installed plugin.
            pm = inv.pm if inv is not None else make_plugin_manager()
            self._protocols = collect(pm, "supctl_add_connect_protocols", "connect protocol")
        return self._protocols

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(self.protocols(ctx))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return self.protocols(ctx).get(cmd_name)
