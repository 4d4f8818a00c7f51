"""Caps on connections that have not finished their opening handshake yet.

Used by the tower's listeners (public and peering) and by every plain-HTTP listener of
probes and metrics, the enforcer's too (:mod:`supctl.plainhttp`, where a connection
never gets past its handshake: it is counted for its whole life).

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

A TLS listener tells its protocol the client's address only once the TLS handshake
is over, so the tower listens on plain TCP and each admitted connection does its TLS
afterwards (:class:`GatedServerConnection`), through public APIs only (websockets'
``create_connection``, the event loop's ``connect_accepted_socket``).  Refusals are
logged at most once per :data:`LOG_EVERY` seconds, with their count.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import resource
import socket
import ssl
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Any, ClassVar, cast

from .wsconn import DirectServerConnection

log = logging.getLogger("supctl.tower")  # the tower's, as before the enforcer shared it

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

    def __init__(
        self,
        per_address: int,
        total: int,
        clock: Callable[[], float] = time.monotonic,
        *,
        what: str = "pre-authentication caps",
        logger: logging.Logger = log,
    ) -> None:
        self.per_address = per_address
        self.total = total
        self.clock = clock
        self.what = what  # names the listener in the log line
        self.log = logger
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
        self.log.warning(
            "%s (%d per address, %d in all): refused %d new connections,"
            " closed %d oldest, in the last %g s; latest from %s",
            self.what, self.per_address, self.total, self._refused, self._evicted, LOG_EVERY, address,
        )  # fmt: skip
        self._last_log, self._refused, self._evicted = now, 0, 0


class _Detached(asyncio.Protocol):
    """Takes the last call of a plain transport whose socket moved on to TLS."""


class GatedServerConnection(DirectServerConnection):
    """websockets' server connection, counted by :attr:`gate` from its TCP accept until its
    opening handshake ends (upgraded, answered or refused) or it closes.

    The server listens on plain TCP (``ssl=None``), so :meth:`connection_made` first gets
    the plain transport and the client's address, before any TLS work: over a cap, that
    costs one accept and one close.  An admitted connection does its TLS (:attr:`tls`;
    None for ``--insecure``) on a duplicate of the socket handed to the event loop's
    public ``connect_accepted_socket``: the loop's own TLS and handshake timeout, as with
    a TLS listener.  Not a byte is read from the plain transport (it is dropped inside
    this call, before the loop reads), and closing it closes only its descriptor.  The
    loop then calls :meth:`connection_made` again, with the TLS transport, for websockets.
    :func:`gated_connection` makes the subclass of one server.
    """

    gate: ClassVar[PreauthGate]
    tls: ClassVar[ssl.SSLContext | None]
    tls_timeout: ClassVar[float]
    tls_tasks: ClassVar[set[asyncio.Task[None]]]

    preauth: Ticket | None = None
    _accepted = False  # the gate has seen it
    _opened = False  # websockets has its transport
    _tls_socket: socket.socket | None = None  # while its TLS handshake runs

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._accepted:  # the TLS transport, from connect_accepted_socket
            self._open(transport)
            return
        self._accepted = True
        plain = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        peer = plain.get_extra_info("peername")
        host = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
        self.preauth = self.gate.admit(client_key(host), self._evict)
        if self.preauth is None:
            plain.abort()
            return
        if self.tls is None:
            self._open(plain)
            return
        try:
            accepted = plain.get_extra_info("socket")
            if accepted is None:
                raise OSError("no socket")
            sock = socket.socket(fileno=os.dup(accepted.fileno()))
        except OSError as exc:  # out of descriptors, most likely
            log.warning("dropped a connection from %s: %s", host, exc)
            plain.abort()
            self._release()
            return
        plain.set_protocol(_Detached())
        plain.abort()
        self._tls_socket = sock
        task = asyncio.get_running_loop().create_task(self._start_tls(sock))
        self.tls_tasks.add(task)
        task.add_done_callback(self.tls_tasks.discard)

    async def _start_tls(self, sock: socket.socket) -> None:
        try:
            await asyncio.get_running_loop().connect_accepted_socket(
                lambda: self, sock, ssl=self.tls, ssl_handshake_timeout=self.tls_timeout
            )
        except (Exception, asyncio.CancelledError):
            # Failed, stalled past the timeout, the peer gone, evicted or shutting down:
            # the loop closed the socket (it owns it from the call on).
            self._release()

    def _evict(self) -> None:
        """Close this connection to make room (the gate's ``close``)."""
        if self._opened and self.transport is not None:
            self.transport.abort()
        elif self._tls_socket is not None:
            # Mid-TLS: the handshake fails at once and the loop closes the socket (the
            # ticket is live only until then, so this never touches a reused descriptor).
            with contextlib.suppress(OSError):
                self._tls_socket.shutdown(socket.SHUT_RDWR)

    def _open(self, transport: asyncio.BaseTransport) -> None:
        self._opened = True
        self._tls_socket = None
        super().connection_made(transport)

    async def handshake(self, *args: Any, **kwargs: Any) -> None:
        try:
            await super().handshake(*args, **kwargs)
        finally:
            self._release()

    def connection_lost(self, exc: Exception | None) -> None:
        self._release()
        if self._opened:
            super().connection_lost(exc)

    def _release(self) -> None:
        if self.preauth is not None:
            self.preauth.release()


def gated_connection(
    gate: PreauthGate, tls: ssl.SSLContext | None, tls_timeout: float
) -> type[GatedServerConnection]:
    """The connection class of one server: websockets' ``create_connection``."""
    attributes: dict[str, object] = {"gate": gate, "tls": tls, "tls_timeout": tls_timeout, "tls_tasks": set()}
    return cast(type[GatedServerConnection], type("TowerConnection", (GatedServerConnection,), attributes))


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
