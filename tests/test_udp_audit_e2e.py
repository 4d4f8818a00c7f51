"""A udp flow through a real tower and a real enforcer (host network): the datagrams come
back, the site's final counts reach the client through the tower, and the tower's
``stream-closed`` audit record keeps them.  The client is a raw session (the transport of
``supctl connect``) so this tests the tower and the site alone."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from stack import Stack
from supctl_connect.transport import WebSocketTransport

from supctl.client.settings import ClientSettings
from supctl.protocol import DEFAULT_WINDOW, OpenRequest
from supctl.protocol.datagrams import DatagramDecoder, encode_datagram

SITE, APP, INST = "udp-site", "popcorn", "popcorn-1"
DEADLINE = 20.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with Stack(tmp_path_factory.mktemp("udp")) as stack:
        stack.start_tower()
        stack.add_site(SITE, f'[applications.{APP}.service-instances.{INST}]\nruntime = "host"\n')
        yield stack


def test_udp_flow_counts_reach_the_client_and_the_audit(stack: Stack) -> None:
    echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    echo.bind(("127.0.0.1", 0))
    echo.setblocking(False)
    port = echo.getsockname()[1]

    async def main() -> dict[str, object]:
        loop = asyncio.get_running_loop()

        def readable() -> None:
            while True:
                try:
                    data, peer = echo.recvfrom(65535)
                except BlockingIOError:
                    return
                echo.sendto(data, peer)

        loop.add_reader(echo.fileno(), readable)
        settings = ClientSettings(
            host=stack.url,
            token=(stack.dir / "admin.token").read_text().strip(),
            ca_file=Path(stack.dir / "ca.pem"),
        )
        path = f"/v1/state/applications/{APP}/service-instances/{INST}/connect"
        link = await WebSocketTransport(settings).open_session(
            path, {"site": SITE, "protocol": "udp", "port": str(port)}
        )
        try:
            channel = await asyncio.wait_for(
                link.open_channel(OpenRequest(verb="connect", args={"idle": 30})), DEADLINE
            )
            sent = [b"a", b"", b"b" * 1400, b"c" * 8000]
            await channel.write(b"".join(encode_datagram(d) for d in sent))
            await channel.write(encode_datagram(b"z" * 65535))  # too big for UDP: dropped at the site
            decoder, got = DatagramDecoder(), list[bytes]()
            while len(got) < len(sent):
                got += decoder.feed(await asyncio.wait_for(channel.read(), DEADLINE))
            assert got == sent
            channel.write_eof()
            control = await asyncio.wait_for(channel.read_control(), DEADLINE)
            assert await asyncio.wait_for(channel.read(), DEADLINE) == b""
            return control
        finally:
            loop.remove_reader(echo.fileno())
            echo.close()
            await link.aclose()

    control = asyncio.run(main())
    counts = {"datagrams-up": 4, "datagrams-down": 4, "dropped-up": 1, "dropped-down": 0}
    assert control == {"udp": {**counts, "refused": 0}}
    records = stack.wait_audit(
        lambda r: r["event"] == "stream-closed" and r["protocol"] == "udp", "the udp stream's record"
    )
    (rec,) = [r for r in records if r["event"] == "stream-closed" and r["protocol"] == "udp"]
    assert {k: rec[k] for k in counts} == counts
    assert (rec["close-reason"], rec["result"], rec["target"]) == ("eof", "ok", f"127.0.0.1:{port}")
    assert rec["bytes-up"] == sum(2 + len(d) for d in (b"a", b"", b"b" * 1400, b"c" * 8000, b"z" * 65535))
    assert rec["bytes-down"] < DEFAULT_WINDOW
