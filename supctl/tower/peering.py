"""Replicas reaching each other: the peer listener, its mutual TLS, and the dialled links.

Every replica with ``[cluster] advertise`` (or ``peer-listen``) listens for the other
replicas on a port of its own, where a TLS client certificate from the tower's CA with
the peer name (:data:`.certs.PEER_COMMON_NAME`) and the clientAuth usage is required:
the certificate ``control-tower init`` (or ``control-tower peer-cert``) writes to
``peer.pem``.  A supctl or an enforcer has no such certificate, and the client-facing
``server.pem`` has only the serverAuth usage, so neither can use this port; and a
replica dials only a listener that shows the peer certificate.  Names are not checked
(``advertise`` may be any address): holding the cluster's peer key *is* being a
replica, as holding the store's password is.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import websockets
from websockets.asyncio.client import connect
from websockets.asyncio.server import Server, ServerConnection
from websockets.asyncio.server import serve as ws_serve
from websockets.exceptions import InvalidHandshake, InvalidURI
from websockets.http11 import Request, Response

from .. import __version__
from ..errors import UsageError
from ..preauth import PreauthGate, gated_connection
from ..protocol import MAX_MESSAGE_ACCEPTED, SUBPROTOCOL
from ..ratelog import RateLimitedLog
from ..wsconn import DirectClientConnection, keepalive_options
from .certs import PEER_COMMON_NAME
from .httpapi import error_response
from .links import LinkServices
from .peerlinks import PeerLink, PeerSession
from .requests import peer
from .siteinfo import RemoteSite

log = logging.getLogger("supctl.tower")

#: The peer listener's only path.
PEER_PATH = "/v1/peer"
#: Which replica dials (for the listener's logs; the certificate is the authentication).
REPLICA_HEADER = "Supctl-Replica"
#: Seconds after a failed dial before the next one to the same replica: a flood of
#: sessions for its sites costs one dial per RETRY, not one each.
RETRY = 1.0
#: Unauthenticated connections at once on the peer listener, per address and in all.
PREAUTH_PER_ADDRESS = 16
PREAUTH_TOTAL = 256


def peer_name(tls: Any) -> str | None:
    """The common name of the certificate the other end showed (verified by the TLS
    handshake against the tower's CA), or None."""
    cert = tls.getpeercert() if tls is not None else None
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


def _context(purpose: ssl.Purpose, cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(purpose, cafile=str(ca))
    context.minimum_version = ssl.TLSVersion.TLSv1_3  # replicas run the same code: no need for less
    try:
        context.load_cert_chain(str(cert), str(key))
    except FileNotFoundError:
        raise UsageError(f"peer certificate {cert} not found (run control-tower peer-cert)") from None
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"cannot load the peer certificate {cert}: {exc}") from None
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def listener_context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    """The peer listener's TLS: a client certificate from the CA is required, and OpenSSL
    checks its clientAuth usage (server.pem, serverAuth only, is refused)."""
    return _context(ssl.Purpose.CLIENT_AUTH, cert, key, ca)


def dialler_context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    """A replica dialling another: its peer certificate, and the CA; no hostname check
    (see the module's docstring), the peer name is checked after the handshake."""
    context = _context(ssl.Purpose.SERVER_AUTH, cert, key, ca)
    context.check_hostname = False  # verify_mode stays CERT_REQUIRED (_context)
    return context


class Peers:
    """This replica's links to the others, dialled when a session first needs one.

    ``link`` is synchronous (a relay is set up inside event dispatch): it answers the
    live link or starts a dial and says why there is none yet; the tower awaits
    :meth:`ready` before it accepts a session whose site another replica holds, so a
    session's streams find the link up.
    """

    def __init__(
        self,
        replica: str,
        context: ssl.SSLContext,
        tower: LinkServices,
        *,
        keepalive: float | None,
        timeout: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.replica = replica
        self.context = context
        self.tower = tower
        self.keepalive = keepalive
        self.timeout = timeout
        self.clock = clock
        self.links: dict[str, PeerLink] = {}
        self.dials: dict[str, asyncio.Task[None]] = {}
        self.failures: dict[str, tuple[float, str]] = {}  # replica: (when, why) of its last failed dial
        self.log = RateLimitedLog(log, clock=clock)

    def link(self, remote: RemoteSite) -> tuple[PeerLink | None, str]:
        if remote.advertise is None:
            return None, f"replica {remote.replica} has no [cluster] advertise"
        link = self.links.get(remote.replica)
        if link is not None and link.conn.closed is None and link.address == remote.advertise:
            return link, ""
        self._dial(remote.replica, remote.advertise)
        failure = self.failures.get(remote.replica)
        return None, failure[1] if failure is not None else "its peer link is being set up"

    async def ready(self, remote: RemoteSite, timeout: float) -> None:
        if self.link(remote)[0] is not None:
            return
        dial = self.dials.get(remote.replica)
        if dial is not None:
            await asyncio.wait({dial}, timeout=timeout)

    def when_up(self, replica: str, callback: Callable[[], None]) -> bool:
        """Call ``callback`` once the dial to ``replica`` under way ends (up or failed);
        False, and no call, if none is under way."""
        dial = self.dials.get(replica)
        if dial is None:
            return False
        dial.add_done_callback(lambda _: callback())
        return True

    def forget(self, link: PeerLink) -> None:
        if self.links.get(link.replica) is link:
            del self.links[link.replica]

    def _dial(self, replica: str, address: str) -> None:
        if replica in self.dials:
            return
        failure = self.failures.get(replica)
        if failure is not None and self.clock() - failure[0] < RETRY:
            return
        self.dials[replica] = asyncio.create_task(self._connect(replica, address), name=f"dial-{replica}")

    async def _connect(self, replica: str, address: str) -> None:
        try:
            ws = await connect(
                address + PEER_PATH,
                ssl=self.context,
                create_connection=DirectClientConnection,
                additional_headers={REPLICA_HEADER: self.replica},
                user_agent_header=f"control-tower/{__version__} websockets/{websockets.version.version}",
                subprotocols=[websockets.Subprotocol(SUBPROTOCOL)],
                compression=None,
                max_size=MAX_MESSAGE_ACCEPTED,
                open_timeout=self.timeout,
                write_limit=2**18,
                **keepalive_options(self.keepalive),
            )
            name = peer_name(ws.transport.get_extra_info("ssl_object"))
            if name != PEER_COMMON_NAME:
                await ws.close()
                raise ConnectionError(f"{address} is not a peer listener (its certificate is {name!r})")
        except (OSError, TimeoutError, InvalidHandshake, InvalidURI, ssl.SSLError, ConnectionError) as exc:
            why = f"cannot reach {address}: {exc or type(exc).__name__}"
            self.failures[replica] = (self.clock(), why)
            self.log.warning(f"dial {replica}", "peer link to replica %s: %s", replica, why)
            return
        finally:
            self.dials.pop(replica, None)
        self.failures.pop(replica, None)
        old = self.links.get(replica)
        if old is not None:  # it moved (a new advertise): the old link's streams finish there
            old.close()
        link = PeerLink(ws, self.tower, self, replica, address)
        self.links[replica] = link
        link.start()
        log.info("peer link to replica %s (%s) up", replica, address)

    async def close(self) -> None:
        for task in list(self.dials.values()):
            task.cancel()
        for link in list(self.links.values()):
            await link.aclose()


async def handshake(connection: ServerConnection, request: Request) -> Response | None:
    """The peer listener's ``process_request``: one path, the subprotocol, and a client
    certificate with the peer name (the CA and its usage are checked by TLS already)."""
    if request.path != PEER_PATH:
        return error_response(404, f"no such endpoint: {request.path}")
    offered = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")]
    if SUBPROTOCOL not in offered:
        return error_response(400, f"the client must offer the WebSocket subprotocol {SUBPROTOCOL}")
    name = peer_name(connection.transport.get_extra_info("ssl_object"))
    if name != PEER_COMMON_NAME:
        return error_response(403, "a peer certificate is required")
    return None


def serve_peers(
    tower: LinkServices,
    context: ssl.SSLContext,
    host: str,
    port: int,
    *,
    keepalive: float | None,
    timeout: float,
) -> Any:
    """The peer listener (an ``async with`` server, as websockets' ``serve``)."""

    async def handler(connection: ServerConnection) -> None:
        headers = connection.request.headers if connection.request is not None else {}
        replica = str(headers.get(REPLICA_HEADER, "?"))[:63]
        session = PeerSession(connection, tower, replica, peer(connection))
        log.info("peer link from replica %s (%s) up", replica, session.peer)
        await session.run()
        log.info("peer link from replica %s closed: %s", replica, session.lost_reason or "closed")

    gate = PreauthGate(PREAUTH_PER_ADDRESS, PREAUTH_TOTAL)
    return ws_serve(
        handler,
        host,
        port,
        process_request=handshake,
        create_connection=gated_connection(gate, context, timeout),
        subprotocols=[websockets.Subprotocol(SUBPROTOCOL)],
        compression=None,
        max_size=MAX_MESSAGE_ACCEPTED,
        write_limit=2**18,
        open_timeout=timeout,
        **keepalive_options(keepalive),
        server_header="control-tower",
    )


def bound_address(server: Server) -> tuple[str, int]:
    address = next(iter(server.sockets)).getsockname()
    return str(address[0]), int(address[1])
