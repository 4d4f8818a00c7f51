"""Interfaces between the supctl core and its verb and backend plugins."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import click
from rich.console import Console

from ..errors import UsageError
from ..output import make_console

if TYPE_CHECKING:
    import pluggy

    from ..link import Channel, Link
    from .settings import ClientSettings

#: Where verbs can hang in the object tree, from the top down.
NODES = ("root", "do", "application", "service-instance", "container")

RegisterVerb = Callable[[str, click.Command], None]
#: Opens one stream on the session and returns it once the far end accepted it.
#: Opens a stream at once (no wait for the far end: the first bytes may go with the
#: OPEN); a refusal surfaces as StreamError from the channel.  Raises StreamError
#: if the session is down.
OpenStream = Callable[[], "Channel"]


@dataclass
class Invocation:
    """What one supctl invocation knows: the plugins, the settings and the place
    in the object tree the user navigated to (``do -s SITE applications APP ...``)."""

    pm: pluggy.PluginManager
    settings_loader: Callable[[], ClientSettings]
    console: Console = field(default_factory=make_console)
    site: str | None = None
    application: str | None = None
    service_instance: str | None = None
    container: str | None = None
    _settings: ClientSettings | None = None

    @property
    def settings(self) -> ClientSettings:
        if self._settings is None:
            self._settings = self.settings_loader()
        return self._settings

    def require_site(self) -> str:
        if not self.site:
            raise UsageError(
                "no site given: use supctl do -s SITE ..., a SITE/APP/INSTANCE target,"
                " SUPCTL_SITE or a context (supctl config view shows what is in force)"
            )
        return self.site

    def transport(self) -> Transport:
        transport: Transport | None = self.pm.hook.supctl_transport(settings=self.settings)
        if transport is None:
            raise UsageError("no transport plugin is installed (is supctl_connect missing?)")
        return transport

    @property
    def where(self) -> str:
        """Human name of the node, e.g. ``popcorn-controller-service-1 at stockholm-sergel``."""
        name = self.container or self.service_instance or self.application or ""
        return f"{name} at {self.site}" if name else str(self.site)


class Transport(Protocol):
    """Opens a session (one multiplexed WebSocket) to the tower."""

    async def open_session(self, path: str, query: Mapping[str, str | Sequence[str]]) -> Link:
        """Connect to ``path?query`` and return a running :class:`~supctl.link.Link`
        (a sequence: the parameter repeated, as a connect session's targets).

        Raises a :class:`~supctl.errors.SupctlError` with a one-line message when
        the tower refuses (HTTP status) or cannot be reached.
        """
        ...

    async def get(self, path: str, query: Mapping[str, str]) -> Any:
        """``GET path?query`` without a WebSocket (the tower's ``/v1/state/...`` views
        used by ``supctl show``) and return the decoded JSON body.

        Same credentials, TLS checks and errors as :meth:`open_session`: a refusal
        (HTTP 400/401/404/503...) or an unreachable tower raises a
        :class:`~supctl.errors.SupctlError` with a one-line message.
        """
        ...


class Meter(Protocol):
    """A live view of one local connection's stream: its channel's counters, read through
    (the channel owns them), for the live status of ``connect --bind``."""

    @property
    def sent(self) -> int:
        """Bytes sent to the remote so far."""

    @property
    def received(self) -> int:
        """Bytes received from the remote so far."""

    @property
    def stream_id(self) -> int | None:
        """The stream's id on the session (None while it waits for the session)."""

    @property
    def open_latency(self) -> float | None:
        """Seconds from the stream's OPEN to the far end's ACCEPT (None until then)."""


class Reporter(Protocol):
    """How backends tell the user about connections (one short line each, or a live table)."""

    def opened(self, number: int, peer: str, meter: Meter) -> None: ...
    def closed(
        self,
        number: int,
        sent: int,
        received: int,
        seconds: float,
        error: str | None,
        counts: Mapping[str, int] | None = None,
    ) -> None:
        """``counts``: a protocol's own counters of the connection, by name (``connect udp``:
        ``datagrams-up``, ``datagrams-down``, ``dropped-up``, ``dropped-down``)."""

    def warning(self, text: str) -> None:
        """A line about the forward as a whole (e.g. datagrams dropped over a limit); the
        caller rate-limits it."""


@dataclass(frozen=True)
class BindAddress:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Forward:
    """One forward of a ``connect`` command, as its protocol subcommand parsed it
    (``tcp 443 --bind 8443``); a protocol plugin's command returns one
    (hook ``supctl_add_connect_protocols``).

    All forwards of one command run together; without ``binds`` (netcat mode) there must
    be exactly one.  ``given`` holds the run-wide options (``quiet``, ``verbose``,
    ``output``, ``wait_tower``) the user wrote after this subcommand."""

    protocol: str
    port: int
    ip_address: str | None = None  # numeric, checked; None: 127.0.0.1 inside the instance
    bind: str | None = None  # --bind as the user wrote it
    binds: tuple[BindAddress, ...] = ()  # where to listen (localhost: 127.0.0.1 and ::1)
    listener: Listener | None = None  # None: the supctl_listener hook's backend
    netcat: Netcat | None = None  # None: the supctl_netcat hook's backend
    #: More arguments for the OPEN of each of its streams (``connect udp``: ``idle``).
    open_args: Mapping[str, object] = field(default_factory=dict)
    given: Mapping[str, object] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """``tcp/443``, or ``tcp/192.0.2.11:443`` with an address: how lines name it."""
        if self.ip_address is None:
            return f"{self.protocol}/{self.port}"
        return f"{self.protocol}/{BindAddress(self.ip_address, self.port)}"


class ForwardCommand(click.Command):
    """A protocol subcommand of ``connect`` (``cls=ForwardCommand``): it reads its
    arguments and options in any order, as ``tcp 443 --bind 8443`` writes them, up to the
    next protocol name, where the next forward begins.

    (click's chain mode stops a subcommand at its first argument; so a lookahead splits
    the chain first, skipping the values of options.)"""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        arguments = sum(p.nargs for p in self.params if isinstance(p, click.Argument) and p.nargs > 0)
        valued = {
            name
            for p in self.params
            if isinstance(p, click.Option) and not p.is_flag and not p.count
            for name in p.opts
        }
        positional, skip, end = 0, False, len(args)
        for i, arg in enumerate(args):
            if skip:
                skip = False
            elif arg == "--":
                break
            elif arg in valued:
                skip = True  # the option's value, whatever it looks like
            elif not arg.startswith("-") or arg == "-":
                if positional >= arguments:
                    end = i  # the next forward's protocol (or a stray word: click names it)
                    break
                positional += 1
        ctx.allow_interspersed_args = True
        extra = super().parse_args(ctx, args[:end])
        ctx.args = [*extra, *args[end:]]
        return ctx.args


#: ``register(name, command)``: a protocol subcommand of ``connect`` (a
#: :class:`ForwardCommand`) whose callback returns a :class:`Forward`.
RegisterProtocol = Callable[[str, click.Command], None]


class Streams(Protocol):
    """Where a listener gets its streams: the verb's session with the tower, which may
    be lost and re-opened while the listener runs (:mod:`supctl.client.session`)."""

    def open_now(self) -> Channel | None:
        """A new stream at once (the first bytes may go with the OPEN; a refusal
        surfaces as StreamError from the channel), or None while the session is being
        re-opened.  Raises StreamError once the session is over."""
        ...

    async def open(self) -> Channel:
        """A new stream once the session is back; StreamError if that takes longer than
        the user allows (``--wait-tower``) or the session is over."""
        ...


class Listener(Protocol):
    """Serves ``connect --bind``: every accepted local connection becomes a stream."""

    async def serve(
        self,
        streams: Streams,
        bind: BindAddress,
        ready: Callable[[BindAddress], None],
        reporter: Reporter,
    ) -> None:
        """Listen on ``bind`` until cancelled; call ``ready`` with the real address.

        Each accepted connection gets ``streams.open_now()``, or, while the session is
        being re-opened, waits for ``streams.open()``; a refusal or a wait that runs
        out fails that connection only (an RST and a line from ``reporter``).
        """
        ...


class Netcat(Protocol):
    """Joins stdin/stdout to one stream (``connect`` without ``--bind``)."""

    async def run(self, open_stream: OpenStream) -> None:
        """Pump until both directions are done; raise StreamError if the stream broke."""
        ...
