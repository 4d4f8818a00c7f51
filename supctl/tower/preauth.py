"""Caps on connections that have not finished their opening handshake yet.

A connection costs the tower a file descriptor from the moment it is accepted, but
says who it is only at the end of its WebSocket handshake.  Without a cap, a peer
opening idle sockets fills the descriptor table (the usual soft limit is 1024), and
everybody else's connections fail at ``accept``.  So each connection is counted from
the TCP accept until its handshake ends (upgraded, answered or refused), or it closes:

* at most ``preauth-per-address`` per client address: a new connection beyond it is
  closed at once, before any TLS work (the address is the one holding the others);
* at most ``preauth-total`` in all: a new connection beyond it takes the place of the
  *oldest* unauthenticated one, which is closed.  Refusing the newcomer instead would
  let a peer spread over many addresses lock everybody out by holding its sockets;
  evicting the oldest makes it open connections faster than a real client completes
  a handshake (tens of milliseconds) just to keep one out.

websockets accepts connections with ``loop.create_server`` and its own protocol
factory; :func:`listen` accepts them here instead, on a plain TCP transport (so the
peer address is known before any TLS work), layers the event loop's TLS protocol on
it, and hands the connection to websockets' factory when the TLS handshake is done.  Refusals are logged at most once per
:data:`LOG_EVERY` seconds, with their count.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import inspect
import ipaddress
import logging
import resource
import ssl
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Any, cast

from websockets.asyncio.server import Server

from ..wsconn import DirectServerConnection

log = logging.getLogger("supctl.tower")

#: Connections the kernel holds for the tower to accept (capped by net.core.somaxconn).
#: asyncio's default, 100, overflows in a burst of connections (idle ones included), and
#: a client whose SYN is dropped retries only after a second, bystanders too: 1,100
#: connections took 8.2 s to be accepted with 100, 0.05 s with 1024.  A pending
#: connection costs only kernel memory; the caps judge it once accepted.
BACKLOG = 1024
#: Seconds between two log lines about refused connections.
LOG_EVERY = 10.0
#: Seconds a TLS close_notify exchange may take (websockets' default close timeout,
#: which it used for this before the tower accepted connections itself).
TLS_SHUTDOWN_TIMEOUT = 10.0
#: Descriptors kept free of unauthenticated connections: sessions, site links, log,
#: audit and store files.  ``preauth-total`` is lowered to leave them.
FD_HEADROOM = 256


def client_key(host: str) -> str:
    """The address a client is counted under: IPv4-mapped IPv6 as IPv4, and IPv6 per
    /64 (one subscriber's network: its 2^64 addresses must not be 2^64 budgets)."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class Ticket:
    """One counted connection; :meth:`release` (idempotent) uncounts it."""

    __slots__ = ("address", "close", "gate", "live")

    def __init__(self, gate: PreauthGate, address: str, close: Callable[[], None]) -> None:
        self.gate = gate
        self.address = address
        self.close = close
        self.live = True

    def release(self) -> None:
        if self.live:
            self.live = False
            self.gate._uncount(self)


class PreauthGate:
    """Counts unauthenticated connections per address and in total (module docstring)."""

    def __init__(self, per_address: int, total: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_address = per_address
        self.total = total
        self.clock = clock
        self.by_address: Counter[str] = Counter()
        self._live: OrderedDict[Ticket, None] = OrderedDict()  # oldest first
        self._refused = 0
        self._evicted = 0
        self._last_log = -LOG_EVERY

    def __len__(self) -> int:
        return len(self._live)

    def admit(self, address: str, close: Callable[[], None]) -> Ticket | None:
        """Count a new connection from ``address``; None if it must be closed now.
        ``close`` aborts the connection (called if it is evicted later)."""
        if self.by_address[address] >= self.per_address:
            self._refused += 1
            self._report(address)
            return None
        if len(self._live) >= self.total:
            oldest = next(iter(self._live))
            oldest.release()
            oldest.close()
            self._evicted += 1
            self._report(address)
        ticket = Ticket(self, address, close)
        self._live[ticket] = None
        self.by_address[address] += 1
        return ticket

    def _uncount(self, ticket: Ticket) -> None:
        del self._live[ticket]
        self.by_address[ticket.address] -= 1
        if self.by_address[ticket.address] <= 0:
            del self.by_address[ticket.address]

    def _report(self, address: str) -> None:
        now = self.clock()
        if now - self._last_log < LOG_EVERY:
            return
        log.warning(
            "pre-authentication caps (%d per address, %d in all): refused %d new connections,"
            " closed %d oldest, in the last %g s; latest from %s",
            self.per_address, self.total, self._refused, self._evicted, LOG_EVERY, address,
        )  # fmt: skip
        self._last_log, self._refused, self._evicted = now, 0, 0


class GatedServerConnection(DirectServerConnection):
    """websockets' server connection that uncounts itself when its handshake ends."""

    preauth: Ticket | None = None

    async def handshake(self, *args: Any, **kwargs: Any) -> None:
        try:
            await super().handshake(*args, **kwargs)
        finally:
            self._release()

    def connection_lost(self, exc: Exception | None) -> None:
        self._release()
        super().connection_lost(exc)

    def _release(self) -> None:
        if self.preauth is not None:
            self.preauth.release()


class _Accepted(asyncio.Protocol):
    """A connection from its TCP accept until websockets' connection takes it over.

    TLS is layered on at once, in ``connection_made`` (the event loop's own TLS
    protocol, as ``loop.create_server(ssl=...)`` does, and before the loop starts
    reading: uvloop reads as soon as ``connection_made`` returns).  This object is the
    TLS layer's application protocol until the TLS handshake completes, then hands the
    TLS transport to websockets.  A TLS handshake that fails or times out ends in the
    waiter, which uncounts the connection (websockets never saw it).
    """

    def __init__(self, listener: _Listener) -> None:
        self.listener = listener
        self.ticket: Ticket | None = None
        self.raw: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.raw is not None:  # the TLS layer's: its handshake is done
            self._hand_over(cast(asyncio.Transport, transport))
            return
        raw = self.raw = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        listener = self.listener
        peer = raw.get_extra_info("peername")
        host = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
        self.ticket = listener.gate.admit(client_key(host), raw.abort)
        if self.ticket is None:
            raw.abort()
            return
        if listener.context is None:
            self._hand_over(raw)
            return
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        waiter.add_done_callback(self._tls_done)
        tls = _tls_protocol(loop)(
            loop, self, listener.context, waiter, server_side=True,
            ssl_handshake_timeout=listener.timeout, ssl_shutdown_timeout=TLS_SHUTDOWN_TIMEOUT,
        )  # fmt: skip
        raw.set_protocol(tls)
        tls.connection_made(raw)

    def _tls_done(self, waiter: asyncio.Future[None]) -> None:
        if waiter.cancelled() or waiter.exception() is not None:
            # The handshake failed, timed out, or the peer left.
            if self.raw is not None:
                self.raw.abort()
            if self.ticket is not None:
                self.ticket.release()

    def _hand_over(self, transport: asyncio.Transport) -> None:
        connection = self.listener.factory()
        if isinstance(connection, GatedServerConnection):
            connection.preauth = self.ticket
        transport.set_protocol(connection)
        connection.connection_made(transport)

    def data_received(self, data: bytes) -> None:  # pragma: no cover - handed over first
        # The TLS layer hands over (connection_made) before it delivers data; should an
        # event loop ever do otherwise, the connection is dropped, not misread.
        if self.raw is not None:
            self.raw.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.ticket is not None:
            self.ticket.release()


def _tls_protocol(loop: asyncio.AbstractEventLoop) -> Any:
    """The event loop's own TLS protocol class: uvloop's is compiled (the data path of
    every session goes through it), asyncio's is the pure-Python one."""
    if type(loop).__module__.startswith("uvloop"):
        from uvloop.loop import SSLProtocol  # type: ignore[attr-defined]

        return SSLProtocol
    return asyncio.sslproto.SSLProtocol


class _Listener:
    def __init__(
        self,
        gate: PreauthGate,
        factory: Callable[[], Any],
        context: ssl.SSLContext | None,
        timeout: float,
    ) -> None:
        self.gate = gate
        self.factory = factory
        self.context = context
        self.timeout = timeout


def listen(
    server: Server,
    gate: PreauthGate,
    host: str,
    port: int,
    context: ssl.SSLContext | None,
    handshake_timeout: float,
) -> None:
    """Make ``server`` (from websockets' ``serve``, not awaited yet, created without
    ``ssl``) accept through ``gate`` and run TLS with ``context`` itself.

    websockets builds its protocol factory inside ``serve``; it is taken from the
    closure of ``server.create_server`` (the one websockets would pass to
    ``loop.create_server``).  If a websockets release changes that, this fails at start.
    """
    factory = inspect.getclosurevars(server.create_server).nonlocals.get("protocol_factory")
    if not callable(factory):
        raise RuntimeError("this websockets release does not expose its protocol factory")
    listener = _Listener(gate, factory, context, handshake_timeout)

    async def create_server() -> asyncio.Server:
        loop = asyncio.get_running_loop()
        return await loop.create_server(lambda: _Accepted(listener), host, port, backlog=BACKLOG)

    server.create_server = create_server


def raise_fd_limit() -> int:
    """Raise the soft limit of open files to the hard limit; return the soft limit now.

    An unlimited hard limit is read as the kernel's ceiling (``fs.nr_open``).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:
            with open("/proc/sys/fs/nr_open") as file:
                target = int(file.read())
        except (OSError, ValueError):
            target = 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return soft
    return target


def total_cap(configured: int, fd_limit: int) -> int:
    """``preauth-total``, lowered to leave :data:`FD_HEADROOM` descriptors (at least 16)."""
    if fd_limit == resource.RLIM_INFINITY:
        return configured
    return max(16, min(configured, fd_limit - FD_HEADROOM))
