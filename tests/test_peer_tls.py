"""The peer listener lets replicas in and no one else (mutual TLS from the tower's CA).

In-process, real TLS on loopback, certificates made by ``control-tower init``'s code:

* the replicas' certificate (``peer.pem``) is let in;
* no client certificate, the client-facing ``server.pem`` (serverAuth only), or a peer
  certificate of another tower's CA are refused in the TLS handshake;
* a replica dials only a listener that shows the peer certificate: the client-facing
  port is refused with a line naming it;
* garbage bytes and a wrong path cost their own connection only;
* a relayed OPEN that is not one (a replica of another version, a bug) resets that
  stream, not the link.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import websockets
from websockets.asyncio.client import connect

from supctl.protocol import SUBPROTOCOL, OpenRequest
from supctl.tower.certs import cert_paths, write_certs
from supctl.tower.limits import Limits
from supctl.tower.peering import PEER_PATH, Peers, dialler_context, listener_context, serve_peers
from supctl.tower.route import Route
from supctl.tower.server import Tower
from supctl.tower.siteinfo import RemoteSite, SiteInfo


class NoStore:
    """The tower's store is never reached by these tests."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"store.{name} used")


def run(body: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(body(), 60))


def client_context(cert: Path | None, key: Path | None, ca: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    context.check_hostname = False
    if cert is not None and key is not None:
        context.load_cert_chain(str(cert), str(key))
    return context


async def dial(port: int, context: ssl.SSLContext, path: str = PEER_PATH) -> str:
    """ "open", or why the connection failed."""
    try:
        async with connect(
            f"wss://127.0.0.1:{port}{path}",
            ssl=context,
            subprotocols=[websockets.Subprotocol(SUBPROTOCOL)],
            open_timeout=10,
        ):
            return "open"
    except (OSError, ssl.SSLError, websockets.exceptions.InvalidHandshake) as exc:
        return f"{type(exc).__name__}: {exc}"


@pytest.fixture
def towers(tmp_path: Path) -> tuple[Path, Path]:
    """Two tower directories, each with its own CA."""
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    for directory in (ours, theirs):
        directory.mkdir()
        write_certs(directory)
    return ours, theirs


def test_only_a_replica_certificate_from_the_towers_ca_is_let_in(towers: tuple[Path, Path]) -> None:
    ours, theirs = (cert_paths(d) for d in towers)

    async def body() -> None:
        tower = Tower(NoStore(), None, Limits())  # type: ignore[arg-type]
        context = listener_context(ours.peer_cert, ours.peer_key, ours.ca)
        async with serve_peers(tower, context, "127.0.0.1", 0, keepalive=None, timeout=5) as server:
            port = next(iter(server.sockets)).getsockname()[1]
            assert await dial(port, client_context(ours.peer_cert, ours.peer_key, ours.ca)) == "open"
            refused = {
                "no certificate": await dial(port, client_context(None, None, ours.ca)),
                "server.pem": await dial(port, client_context(ours.cert, ours.key, ours.ca)),
                "another CA": await dial(port, client_context(theirs.peer_cert, theirs.peer_key, ours.ca)),
            }
            for who, outcome in refused.items():
                # Refused by TLS itself (no HTTP answer at all), not by the name check after it.
                assert outcome != "open" and "InvalidStatus" not in outcome, (who, outcome)
            wrong_path = await dial(port, client_context(ours.peer_cert, ours.peer_key, ours.ca), "/v1/state")
            assert "HTTP 404" in wrong_path, wrong_path
            # Garbage instead of a TLS handshake: that connection ends, the listener goes on.
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"\x16\x03\x01garbage" * 100)
            await writer.drain()
            assert await asyncio.wait_for(reader.read(), 10) == b""
            writer.close()
            assert await dial(port, client_context(ours.peer_cert, ours.peer_key, ours.ca)) == "open"

    run(body)


def test_a_replica_dials_only_a_peer_listener(towers: tuple[Path, Path]) -> None:
    """A misconfigured advertise pointing at a client-facing port (server.pem) is refused."""
    ours = cert_paths(towers[0])

    async def body() -> None:
        async def handler(connection: Any) -> None:
            await connection.wait_closed()

        server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_tls.load_cert_chain(str(ours.cert), str(ours.key))
        server_tls.verify_mode = ssl.CERT_OPTIONAL
        server_tls.load_verify_locations(str(ours.ca))
        async with websockets.serve(handler, "127.0.0.1", 0, ssl=server_tls) as server:
            port = next(iter(server.sockets)).getsockname()[1]
            tower = Tower(NoStore(), None, Limits())  # type: ignore[arg-type]
            peers = Peers(
                "tower",
                dialler_context(ours.peer_cert, ours.peer_key, ours.ca),
                tower,
                keepalive=None,
                timeout=5,
            )
            remote = RemoteSite("tower-b", f"wss://127.0.0.1:{port}", SiteInfo())
            await peers.ready(remote, 10)
            link, why = peers.link(remote)
            assert link is None
            assert why == (
                f"cannot reach wss://127.0.0.1:{port}: wss://127.0.0.1:{port} is not a peer listener"
                " (its certificate is 'supctl control tower')"
            )
            await peers.close()

    run(body)


def test_a_relayed_open_that_is_not_one_is_refused() -> None:
    request = Route("connect", "lyon", "web", "web-1", "tcp", 80, who="ana:1234abcd").peer_request({"k": 1})
    route, inner = Route.from_peer(request)
    assert (route.site, route.who, inner.args, inner.port) == ("lyon", "ana:1234abcd", {"k": 1}, 80)
    for args in (
        {},
        {"site": "Lyon!", "args": {}},
        {"site": "lyon", "args": []},
        {"site": "lyon", "args": {}, "who": "x" * 300},
        {"site": "lyon", "args": {}, "session": 7},
    ):
        with pytest.raises(ValueError):
            Route.from_peer(OpenRequest("connect", "web", "web-1", protocol="tcp", port=80, args=args))


def test_the_peer_port_is_not_a_client_port(towers: tuple[Path, Path]) -> None:
    """A plain TCP client (no TLS at all) gets nothing but a closed connection."""
    ours = cert_paths(towers[0])

    async def body() -> None:
        tower = Tower(NoStore(), None, Limits())  # type: ignore[arg-type]
        context = listener_context(ours.peer_cert, ours.peer_key, ours.ca)
        async with serve_peers(tower, context, "127.0.0.1", 0, keepalive=None, timeout=5) as server:
            port = next(iter(server.sockets)).getsockname()[1]
            loop = asyncio.get_running_loop()
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.setblocking(False)
                await loop.sock_sendall(sock, b"GET /v1/state/sites HTTP/1.1\r\nHost: x\r\n\r\n")
                answer = await asyncio.wait_for(loop.sock_recv(sock, 4096), 10)
                assert b"HTTP" not in answer

    run(body)
