"""The ``connect udp`` subcommand: ``udp PORT [--ip-address IP] [--bind [ADDR:]PORT] [--idle SECONDS]``.

It parses like ``tcp`` (same options, same checks: :mod:`supctl_connect.forwards`) and
returns a :class:`~supctl.client.api.Forward` whose backends are this plugin's: a UDP
socket with a flow per peer (:mod:`.relay`) or, without ``--bind``, stdin/stdout as
datagrams (:mod:`.netcat`).
"""

from __future__ import annotations

import click
from supctl_connect.forwards import check_target_ip, given_options, parse_bind, run_options

from supctl.client.api import Forward, ForwardCommand, Invocation
from supctl.errors import UsageError

from .flows import IDLE
from .netcat import DatagramNetcat
from .relay import UdpListener


def _once(option: str, values: tuple[str, ...]) -> str | None:
    if len(values) > 1:
        raise UsageError(
            f"{option} given {len(values)} times ({', '.join(values)}) for one forward; for several"
            " forwards repeat the protocol: connect udp 53 --bind 5353 udp 123 --bind 1123"
        )
    return values[0] if values else None


def make_udp_command() -> click.Command:
    @click.command("udp", cls=ForwardCommand, context_settings={"help_option_names": ["-h", "--help"]})
    @click.argument("port", type=click.IntRange(1, 65535))
    @click.option(
        "--ip-address",
        metavar="IP",
        multiple=True,
        help="Numeric IPv4/IPv6 address to reach from inside the service instance (default 127.0.0.1 there).",
    )
    @click.option(
        "--bind",
        metavar="[ADDR:]PORT",
        multiple=True,
        help="Receive datagrams here, a flow per local peer (default address 127.0.0.1; 0 picks a free"
        " port). Without it: each read of stdin is one datagram, replies go to stdout.",
    )
    @click.option(
        "--idle",
        metavar="SECONDS",
        type=click.IntRange(1, 3600),
        multiple=True,
        help=f"A flow ends after this many seconds without a datagram either way  [default: {IDLE}].",
    )
    @run_options
    @click.pass_context
    def udp(
        ctx: click.Context,
        /,
        port: int,
        ip_address: tuple[str, ...],
        bind: tuple[str, ...],
        idle: tuple[int, ...],
        **_: object,
    ) -> Forward:
        """Forward UDP datagrams to PORT on 127.0.0.1 inside the service instance (or on --ip-address)."""
        inv = ctx.find_object(Invocation)
        assert inv is not None
        ip_given, bind_given = _once("--ip-address", ip_address), _once("--bind", bind)
        idle_given = _once("--idle", tuple(str(i) for i in idle))
        seconds = int(idle_given) if idle_given is not None else IDLE
        return Forward(
            "udp",
            port,
            ip_address=check_target_ip(inv, ip_given) if ip_given is not None else None,
            bind=bind_given,
            binds=parse_bind(bind_given) if bind_given is not None else (),
            listener=UdpListener(idle=seconds),
            netcat=DatagramNetcat(idle=seconds),
            # The site's default is the same 60 s: say it only when the user chose.
            open_args={"idle": seconds} if idle_given is not None else {},
            given=given_options(ctx),
        )

    return udp
