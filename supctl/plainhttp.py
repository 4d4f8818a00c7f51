"""Listen addresses and the small plain-HTTP listener of probes and metrics.

Shared by the tower (``[metrics] listen``) and the enforcer (``--metrics-listen``):
``HOST:PORT`` is parsed one way for every listener, and both answer ``/healthz``,
``/readyz`` and ``/metrics`` with websockets' own HTTP/1.1 server (its request
parser, size limits and timeouts), answering every request before any upgrade.
"""

from __future__ import annotations

import contextlib
import http
import ipaddress
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from urllib.parse import urlsplit

from websockets.asyncio.server import ServerConnection
from websockets.asyncio.server import serve as ws_serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from .errors import UsageError
from .preauth import PreauthGate, gated_connection

#: The Prometheus text exposition format, version 0.0.4.
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: Connections one client address may hold open on a plain-HTTP listener.  A scraper or a
#: probe holds one for the milliseconds of a request; a peer holding more is only
#: holding descriptors (closed at once beyond this, before a byte is read).
PER_ADDRESS = 8
#: Connections in all: beyond it, the oldest is closed to make room (preauth.py says why
#: the oldest and not the newcomer).
TOTAL = 64
#: Seconds a connection may take to send its request.
OPEN_TIMEOUT = 10.0

Route = Callable[[], Awaitable[Response]]

_HOSTNAME_RE = re.compile(
    r"(?=.{1,253}\Z)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)


def valid_hostname(name: str) -> bool:
    """A DNS name of letters, digits and inner hyphens (no wildcards, no trailing dot)."""
    return _HOSTNAME_RE.fullmatch(name) is not None and re.fullmatch(r"[0-9.]+", name) is None


def parse_listen(text: str) -> tuple[str, int]:
    """Split ``HOST:PORT``, ``[IPV6]:PORT`` or ``:PORT`` into (host, port).

    The host of ``:PORT`` is ``""``, which asyncio and websockets take as "all
    interfaces".  Port 0 asks the kernel for a free port.
    """
    bad = UsageError(f"bad listen address {text!r}: use HOST:PORT, [IPV6]:PORT or :PORT")
    host, sep, port_text = text.rpartition(":")
    if not sep or not re.fullmatch(r"[0-9]{1,5}", port_text) or int(port_text) > 65535:
        raise bad
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise bad from None
    elif host:
        # An unbracketed IPv6 address is ambiguous ("::1:4646"); dotted digits must be IPv4.
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            if not valid_hostname(host):
                raise bad from None
    return host, int(port_text)


def shown_address(address: tuple[str, int] | tuple[str, int, int, int]) -> str:
    """``HOST:PORT`` of a bound socket, IPv6 in brackets."""
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def text_response(status: int, text: str) -> Response:
    body = (text + "\n").encode()
    headers = Headers(
        [
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
        ]
    )
    return Response(status, http.HTTPStatus(status).phrase, headers, body)


def metrics_response(body: bytes) -> Response:
    headers = Headers([("Content-Type", METRICS_TYPE), ("Content-Length", str(len(body)))])
    return Response(200, "OK", headers, body)


@contextlib.asynccontextmanager
async def serve_plain_http(
    host: str, port: int, routes: Mapping[str, Route], what: str, logger: logging.Logger | None = None
) -> AsyncIterator[str]:
    """Serve ``routes`` (path -> answer) over plain HTTP on ``host:port``; yields the
    bound ``HOST:PORT``.  Any other path is 404; nothing is ever upgraded.

    Every connection is counted by a :class:`~supctl.preauth.PreauthGate` for its whole
    life (each is answered and closed at the end of its handshake, or after
    :data:`OPEN_TIMEOUT`): whoever reaches this port cannot hold more than
    :data:`PER_ADDRESS` sockets from one address, nor :data:`TOTAL` in all, so it can
    never take the descriptors the tower's sessions or the enforcer's streams need.
    ``logger`` gets the gate's refusals, one line per 10 s."""
    gate = PreauthGate(
        PER_ADDRESS, TOTAL, what=f"{what} listener caps", logger=logger or logging.getLogger("supctl")
    )

    async def answer(_connection: ServerConnection, request: Request) -> Response:
        route = routes.get(urlsplit(request.path).path)
        if route is None:
            return text_response(404, "not found: " + ", ".join(sorted(routes)))
        return await route()

    async def never(_connection: ServerConnection) -> None:  # every request is answered above
        return None

    try:
        server = await ws_serve(
            never,
            host,
            port,
            process_request=answer,
            open_timeout=OPEN_TIMEOUT,
            server_header=None,
            create_connection=gated_connection(gate, None, OPEN_TIMEOUT),
        )
    except OSError as exc:
        raise UsageError(f"cannot listen for {what} on {host or '*'}:{port}: {exc.strerror or exc}") from None
    async with server:
        yield shown_address(next(iter(server.sockets)).getsockname())
