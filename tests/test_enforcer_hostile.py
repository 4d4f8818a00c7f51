"""The site's view of a compromised tower: a fake tower sends what a real one never would.

A real ``edge-enforcer`` process, its service instance in a real network namespace,
dials a FAKE TOWER: a real TLS WebSocket server in this process that speaks the
supctl protocol through supctl's own sans-I/O :class:`~supctl.protocol.Connection`
(wrapped in a :class:`~supctl.link.Link`) and sends hostile OPENs and floods.  Each
must be refused by the site itself, with a reason (docs/policies.md, "A compromised
tower"), and the enforcer must stay up and serve a normal stream afterwards.

The site's local policy: ``allow-exec = false``, ``allow-ports`` = the echo server's
port and the blackhole's, ``allow-ip-addresses = ["192.0.2.0/24"]``.  A second echo
server listens on a port the policy does not allow, so that a refusal is the
policy's and not a closed port's.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any, TypeVar

import pytest
from conftest import require_root
from e2e_support import wait_until
from netlab import NetLab
from stack import LogFile, Proc, Stack, program
from websockets.asyncio.server import Server, ServerConnection
from websockets.asyncio.server import serve as ws_serve
from websockets.http11 import Request, Response

from supctl.enforcer.agent import MAX_MOVING, STABLE_AFTER, Agent
from supctl.enforcer.api import HandlerContext, Serves
from supctl.enforcer.inventory import parse_inventory
from supctl.enforcer.netns import NamespaceSockets
from supctl.errors import StreamError
from supctl.link import Channel, Link, WebSocketLike
from supctl.protocol import (
    DEFAULT_WINDOW,
    MAX_MESSAGE_ACCEPTED,
    SUBPROTOCOL,
    Connection,
    ErrorCode,
    FrameType,
    OpenRequest,
)
from supctl.protocol.frames import MAX_DATA, encode
from supctl.tower.certs import write_certs
from supctl.wsconn import DirectServerConnection

pytestmark = pytest.mark.root

T = TypeVar("T")
TOKEN = "a-site-token-the-fake-tower-checks"
SITE, APP, INST, BOX = "hostile", "app", "inst", "box"
MAX_STREAMS = 64  # the enforcer's --max-streams: a cap a test can reach
BLACKHOLE = "192.0.2.99"  # SYNs leave the namespace and are never answered
BLACKHOLE_PORT = 9
LAN_MAC = "02:00:00:00:00:11"
LIMIT_TEXT = "more than 32 unread CONTROL messages or 16384 bytes"


# --- the fake tower ------------------------------------------------------------------------


class TowerSide(Link):
    """The tower's end of a site link, as the real tower builds it (supctl.tower.links)."""

    def __init__(self, ws: WebSocketLike) -> None:
        conn = Connection(odd_ids=True, accept_streams=False, accept_hello=True)
        super().__init__(ws, conn, name="fake tower")
        self.hello: dict[str, object] | None = None

    def on_hello(self, payload: dict[str, object]) -> None:
        self.hello = payload

    @property
    def live(self) -> bool:
        return self.hello is not None and self.conn.closed is None and not self.lost_reason


class FakeTower:
    """A TLS WebSocket server on its own event loop thread; tests run coroutines on it."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.certs = write_certs(directory)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fake-tower", daemon=True)
        self.links: list[TowerSide] = []
        self.server: Server | None = None
        self.url = ""

    def __enter__(self) -> FakeTower:
        self.thread.start()
        self.url = self.run(self._start())
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.run(self._stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 90.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self) -> str:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(str(self.certs.cert), str(self.certs.key))
        self.server = await ws_serve(
            self._serve,
            "127.0.0.1",
            0,
            ssl=context,
            process_request=self._check,
            create_connection=DirectServerConnection,
            subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
            compression=None,
            max_size=MAX_MESSAGE_ACCEPTED,
        )
        port = next(iter(self.server.sockets)).getsockname()[1]
        return f"wss://127.0.0.1:{port}"

    @staticmethod
    def _check(connection: ServerConnection, request: Request) -> Response | None:
        # A compromised tower still knows the site's token: the enforcer sent it.
        if request.headers.get("Authorization") != f"Bearer {TOKEN}" or not request.path.startswith(
            "/v1/enforcer?"
        ):
            return connection.respond(HTTPStatus.UNAUTHORIZED, "unauthorized\n")
        return None

    async def _serve(self, ws: ServerConnection) -> None:
        link = TowerSide(ws)
        self.links.append(link)
        await link.run()

    async def _stop(self) -> None:
        for link in self.links:
            link.close(ErrorCode.CANCEL, "test over")
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def site(self, name: str = SITE, deadline: float = 20.0) -> TowerSide:
        """The site's live link, once its HELLO arrived (it reconnects after a close)."""
        async with asyncio.timeout(deadline):
            while True:
                for link in reversed(self.links):
                    if link.live and link.hello is not None and link.hello.get("site") == name:
                        return link
                await asyncio.sleep(0.01)  # polling; the timeout above is the bound


# --- the site --------------------------------------------------------------------------------


@dataclass
class Site:
    tower: FakeTower
    lab: NetLab
    ns: str
    enforcer: Proc
    echo_port: int
    forbidden_port: int
    marker: Path

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 90.0) -> T:
        return self.tower.run(coro, timeout)

    @property
    def log(self) -> LogFile:
        return self.enforcer.log

    def syn_sent(self) -> int:
        """Connections of the site's namespace still trying to reach the blackhole."""
        out = self.lab.check_call(self.ns, ["ss", "-Htn", "state", "syn-sent"])
        return sum(BLACKHOLE in line for line in out.splitlines())

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.enforcer.popen.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def assert_serves_normally(self) -> None:
        """The enforcer is up and a normal stream works end to end."""
        assert self.enforcer.popen.poll() is None, self.log.text()
        assert self.run(echo(self.tower, tcp(self.echo_port), b"still serving")) == b"still serving"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    require_root()
    root = tmp_path_factory.mktemp("hostile")
    with NetLab() as lab, FakeTower(root / "tower") as tower, Stack(root) as stack:
        ns, lan = lab.add_ns("svc"), lab.add_ns("lan")
        if_svc, if_lan = lab.veth(ns, "192.0.2.1/24", lan, "192.0.2.11/24")
        # SYNs to the blackhole reach lan (a permanent neighbour entry), which does not own
        # the address and drops them: a connect there hangs until --connect-timeout.
        lab.check_call(lan, ["ip", "link", "set", if_lan, "address", LAN_MAC])
        lab.check_call(
            ns, ["ip", "neigh", "replace", BLACKHOLE, "lladdr", LAN_MAC, "dev", if_svc, "nud", "permanent"]
        )
        echo_port = lab.start_server(ns, "echo").port
        forbidden_port = lab.start_server(ns, "echo").port
        (root / "inventory.toml").write_text(
            f"[applications.{APP}.service-instances.{INST}]\n"
            f'netns = "{ns}"\n'
            f"[applications.{APP}.service-instances.{INST}.containers.{BOX}]\n"
            "[policy]\n"
            "allow-exec = false\n"
            f'allow-ports = ["{echo_port}", "{BLACKHOLE_PORT}"]\n'
            'allow-ip-addresses = ["192.0.2.0/24"]\n'
        )
        token = root / "site.token"
        token.write_text(TOKEN + "\n")
        token.chmod(0o600)
        enforcer = stack.spawn(
            "enforcer",
            [
                program("edge-enforcer"),
                "run",
                "--tower",
                tower.url,
                "--site",
                SITE,
                "--token-file",
                str(token),
                "--ca-file",
                str(tower.certs.ca),
                "--inventory",
                str(root / "inventory.toml"),
                "--connect-timeout",
                "60",
                "--max-streams",
                str(MAX_STREAMS),
                "--verbose",
            ],
        )
        try:
            tower.run(tower.site())
        except TimeoutError:
            raise AssertionError(f"the enforcer never said HELLO:\n{enforcer.log.text()}") from None
        yield Site(tower, lab, ns, enforcer, echo_port, forbidden_port, root / "marker")
        assert enforcer.popen.poll() is None, "the enforcer died"


# --- helpers (coroutines run on the fake tower's loop) ------------------------------------------


def tcp(port: int, ip: str = "", **fields: Any) -> OpenRequest:
    fields = {"verb": "connect", "protocol": "tcp", "application": APP, "service_instance": INST, **fields}
    return OpenRequest(port=port, ip_address=ip, **fields)


async def refusal(tower: FakeTower, request: OpenRequest) -> StreamError:
    """The site's RESET of a stream opened with ``request``."""
    link = await tower.site()
    channel = link.open_channel_now(request)
    async with asyncio.timeout(20):
        try:
            await channel.wait_accepted()
        except StreamError as exc:
            return exc
        # Accepted: let the handler finish what it does (an exec runs to its end),
        # so that the test's checks of its effects see them.
        channel.write_eof()
        with contextlib.suppress(StreamError):
            while await channel.read():
                pass
    raise AssertionError(f"the site accepted {request}")


async def echo(tower: FakeTower, request: OpenRequest, payload: bytes) -> bytes:
    link = await tower.site()
    async with asyncio.timeout(20):
        channel = await link.open_channel(request)
        await channel.write(payload)
        channel.write_eof()
        received = b""
        while data := await channel.read():
            received += data
    return received


def refused(site: Site, request: OpenRequest) -> tuple[ErrorCode, str]:
    error = site.run(refusal(site.tower, request))
    return ErrorCode(error.code), str(error)


# --- item 7: the local policy judges the handler that runs ---------------------------------------


def test_connect_with_protocol_exec_runs_nothing(site: Site) -> None:
    # Before: dispatched by protocol name to the exec handler, the port passing the policy:
    # the command ran as root at a site with allow-exec = false.
    request = tcp(site.echo_port, protocol="exec", container=BOX, args={"command": f"touch {site.marker}"})
    assert refused(site, request) == (ErrorCode.UNSUPPORTED, "protocol 'exec' is not supported at this site")
    site.assert_serves_normally()
    assert not site.marker.exists()


def test_verb_tcp_reaches_no_handler(site: Site) -> None:
    # Before: a verb other than connect was dispatched by its name, to the tcp handler,
    # and the local policy (which judged connects only) let any port through.
    for protocol, text in [
        ("tcp", "verb 'tcp' with protocol 'tcp' is not supported at this site"),
        ("", "verb 'tcp' is not supported at this site"),
    ]:
        request = tcp(site.forbidden_port, verb="tcp", protocol=protocol)
        assert refused(site, request) == (ErrorCode.UNSUPPORTED, text)
    site.assert_serves_normally()


def test_connect_to_a_port_outside_the_local_policy(site: Site) -> None:
    code, text = refused(site, tcp(site.forbidden_port))
    assert (code, text) == (
        ErrorCode.DENIED,
        f"the site's local policy refuses 127.0.0.1:{site.forbidden_port}",
    )
    site.assert_serves_normally()


def test_exec_refused_by_allow_exec(site: Site) -> None:
    command = {"command": f"touch {site.marker}"}
    request = OpenRequest("exec", APP, INST, container=BOX, args=command)
    assert refused(site, request) == (ErrorCode.DENIED, "the site's local policy refuses exec")
    # exec with a protocol is not what the exec handler declared.
    request = OpenRequest("exec", APP, INST, container=BOX, protocol="tcp", args=command)
    text = "verb 'exec' with protocol 'tcp' is not supported at this site"
    assert refused(site, request) == (ErrorCode.UNSUPPORTED, text)
    site.assert_serves_normally()
    assert not site.marker.exists()


@pytest.mark.parametrize(
    ("verb", "protocol", "text"),
    [
        ("connect", "sctp", "protocol 'sctp' is not supported at this site"),
        ("connect", "", "protocol '' is not supported at this site"),
        ("CONNECT", "tcp", "verb 'CONNECT' with protocol 'tcp' is not supported at this site"),
        ("shell", "", "verb 'shell' is not supported at this site"),
        ("show", "", "verb 'show' is not supported at this site"),
        ("exec\n", "", "verb 'exec\\n' is not supported at this site"),
    ],
)
def test_pairs_no_handler_declares_are_refused(site: Site, verb: str, protocol: str, text: str) -> None:
    request = tcp(site.echo_port, verb=verb, protocol=protocol)
    assert refused(site, request) == (ErrorCode.UNSUPPORTED, text)
    site.assert_serves_normally()


def test_target_spellings_are_judged_canonical(site: Site) -> None:
    port = site.echo_port
    unspecified = (
        "OPEN field 'ip_address': the unspecified address is not a target "
        "(omit --ip-address to reach the service itself)"
    )
    for ip, code, text in [
        ("0.0.0.0", ErrorCode.PROTOCOL, unspecified),
        ("::", ErrorCode.PROTOCOL, unspecified),
        ("::ffff:0.0.0.0", ErrorCode.PROTOCOL, unspecified),
        (
            "224.0.0.1",
            ErrorCode.PROTOCOL,
            "OPEN field 'ip_address': a multicast or broadcast address is not a target",
        ),
        (
            "fe80::1%lo",
            ErrorCode.PROTOCOL,
            "OPEN field 'ip_address': a scoped IPv6 address (with %) is not accepted",
        ),
        # Unmapped before the policy sees it: 10.9.0.1 is not in 192.0.2.0/24.
        ("::ffff:10.9.0.1", ErrorCode.DENIED, f"the site's local policy refuses 10.9.0.1:{port}"),
        ("64:ff9b::a09:1", ErrorCode.DENIED, f"the site's local policy refuses 10.9.0.1:{port}"),
        # Every loopback address is the service itself: judged by the port like it.
        (
            "::ffff:127.0.0.1",
            ErrorCode.DENIED,
            f"the site's local policy refuses 127.0.0.1:{site.forbidden_port}",
        ),
    ]:
        request_port = site.forbidden_port if ip == "::ffff:127.0.0.1" else port
        assert refused(site, tcp(request_port, ip)) == (code, text), ip
    # The mapped spelling of the service itself is dialled as the address judged.
    assert site.run(echo(site.tower, tcp(port, "::ffff:127.0.0.1"), b"mapped")) == b"mapped"
    site.log.wait_for(
        rf"stream closed application={APP} instance={INST} verb=connect protocol=tcp target=127\.0\.0\.1:{port} .*result=ok"
    )
    site.assert_serves_normally()


@pytest.mark.parametrize(
    ("fields", "text"),
    [
        ({"application": "app\n"}, "the site refuses the stream: invalid application name"),
        ({"service_instance": "../inst"}, "the site refuses the stream: invalid service instance name"),
        ({"container": BOX}, "the site refuses the stream: connect streams have no container"),
    ],
)
def test_malformed_requests_are_refused(site: Site, fields: dict[str, str], text: str) -> None:
    assert refused(site, tcp(site.echo_port, **fields)) == (ErrorCode.PROTOCOL, text)
    site.assert_serves_normally()


# --- item 8: bounded everything per stream --------------------------------------------------------


async def control_flood(tower: FakeTower, port: int, frames: int) -> tuple[int, StreamError | None]:
    """CONTROL messages of 4 KiB on an open tcp stream, until the site resets it or
    ``frames`` were sent; then the site's reset, if it comes."""
    link = await tower.site()
    channel = await link.open_channel(tcp(port))
    padding = {"pad": "x" * 4000}
    sent = 0
    async with asyncio.timeout(120):
        while sent < frames and link.conn.is_open(channel.id):
            for _ in range(64):
                link.conn.send_control(channel.id, padding)
            sent += 64
            link.flush()
            while link.conn.pending_output > 1 << 20:  # the flood goes at the wire's pace
                await asyncio.sleep(0.001)
    try:
        async with asyncio.timeout(10):
            await channel.read()
    except StreamError as exc:
        return sent, exc
    except TimeoutError:
        channel.reset(ErrorCode.CANCEL, "test over")
    return sent, None


def test_control_flood_on_a_tcp_stream_is_reset_with_limit(site: Site) -> None:
    site.assert_serves_normally()
    before = site.rss_kib()
    sent, error = site.run(control_flood(site.tower, site.echo_port, frames=20_000), timeout=180)
    after = site.rss_kib()
    print(f"CONTROL flood: {sent} messages sent, enforcer RSS {before} KiB -> {after} KiB")
    assert error is not None, f"the site never reset the stream after {sent} CONTROL messages"
    assert (error.code, str(error)) == (ErrorCode.LIMIT, LIMIT_TEXT)
    site.log.wait_for(
        rf"stream closed .* target=127\.0\.0\.1:{site.echo_port} .*result={re.escape(LIMIT_TEXT)}"
    )
    site.assert_serves_normally()


async def open_then_reset(tower: FakeTower, count: int) -> None:
    link = await tower.site()
    for _ in range(count):
        sid = link.conn.open_stream(tcp(BLACKHOLE_PORT, BLACKHOLE))
        link.conn.reset_stream(sid, ErrorCode.CANCEL, "never mind")
    link.flush()


async def pending_flood(tower: FakeTower, held: int, extra: int) -> tuple[list[Channel], list[StreamError]]:
    """``held`` streams to the blackhole (their handlers hang connecting), then ``extra`` more."""
    link = await tower.site()
    channels = [link.open_channel_now(tcp(BLACKHOLE_PORT, BLACKHOLE)) for _ in range(held + extra)]
    refusals: list[StreamError] = []
    async with asyncio.timeout(20):
        for channel in channels[held:]:
            try:
                await channel.wait_accepted()
            except StreamError as exc:
                refusals.append(exc)
    return channels[:held], refusals


async def reset_all(channels: list[Channel]) -> None:
    for channel in channels:
        channel.reset(ErrorCode.CANCEL, "the tower gives up")


def test_open_flood_is_bounded_and_reset_streams_free_their_handlers(site: Site) -> None:
    # OPEN and RESET together, a thousand times: no handler may stay behind connecting.
    site.run(open_then_reset(site.tower, 1000))
    site.assert_serves_normally()  # served after every frame of the flood was read
    assert site.syn_sent() == 0
    # Streams that stay: the site serves MAX_STREAMS and refuses the rest with LIMIT.
    held, refusals = site.run(pending_flood(site.tower, MAX_STREAMS, 100))
    assert {(e.code, str(e)) for e in refusals} == {(ErrorCode.LIMIT, f"more than {MAX_STREAMS} streams")}
    assert len(refusals) == 100
    wait_until(lambda: site.syn_sent() == MAX_STREAMS, what="the held handlers connecting")
    # The tower resets them: their handlers are cancelled (not left connecting for 60 s),
    # so the site has room again at once.
    site.run(reset_all(held))
    wait_until(lambda: site.syn_sent() == 0, deadline=5.0, what="the reset streams' connects to end")
    site.assert_serves_normally()
    site.log.wait_for(r"stream closed .* target=192\.0\.2\.99:9 .*result=reset: the tower gives up")


async def overflow_window(tower: FakeTower, port: int) -> TowerSide:
    link = await tower.site()
    channel = await link.open_channel(tcp(port))
    # One byte more than the window, in one message: no WINDOW can come in between.
    frames = encode(FrameType.DATA, channel.id, b"x" * MAX_DATA) + encode(
        FrameType.DATA, channel.id, b"x" * (DEFAULT_WINDOW - MAX_DATA + 1)
    )
    await link.ws.send(frames)
    async with asyncio.timeout(20):
        while not link.lost_reason:
            await asyncio.sleep(0.01)
    return link


def test_data_beyond_the_window_closes_the_link(site: Site) -> None:
    link = site.run(overflow_window(site.tower, site.echo_port))
    assert link.lost_code == 4000 + ErrorCode.FLOW_CONTROL
    assert re.fullmatch(r"stream \d+ sent beyond its window", link.lost_reason), link.lost_reason
    site.assert_serves_normally()  # the enforcer dialled again


# --- the handler-task cap, in process: handlers that ignore a reset after ACCEPT ------------------


class Stubborn:
    """Accepts, then waits forever without looking at its channel."""

    async def handle(self, channel: Channel, request: OpenRequest, instance: object, context: object) -> None:
        channel.accept()
        await asyncio.Event().wait()


class Hanging:
    """Never reaches its target (as a connect to a blackhole)."""

    async def handle(self, channel: Channel, request: OpenRequest, instance: object, context: object) -> None:
        await asyncio.Event().wait()


async def in_process_site(tower: FakeTower, max_streams: int) -> None:
    context = ssl.create_default_context(cafile=str(tower.certs.ca))
    sockets = NamespaceSockets()
    agent = Agent(
        towers=[tower.url],
        site="in-process",
        token=TOKEN,
        ssl_context=context,
        inventory=parse_inventory({"applications": {APP: {"service-instances": {INST: {}}}}}),
        handlers={Serves("connect", "stubborn"): Stubborn(), Serves("connect", "hanging"): Hanging()},
        context=HandlerContext(site="in-process", sockets=sockets),
        max_streams=max_streams,
    )
    running = asyncio.create_task(agent.connect_once())
    try:
        link = await tower.site("in-process")
        # Reset before ACCEPT: cancelled at once, never counted against the cap.
        for _ in range(3 * max_streams):
            channel = link.open_channel_now(tcp(1, protocol="hanging"))
            channel.reset(ErrorCode.CANCEL, "gone")
        # Reset after ACCEPT, by a handler that does not notice: still counted until it ends.
        stubborn = [await link.open_channel(tcp(1, protocol="stubborn")) for _ in range(max_streams)]
        for channel in stubborn:
            channel.reset(ErrorCode.CANCEL, "gone")
        with pytest.raises(StreamError) as info:
            await link.open_channel(tcp(1, protocol="stubborn"))
        assert (info.value.code, str(info.value)) == (ErrorCode.LIMIT, f"more than {max_streams} streams")
        assert agent.link is not None and len(agent.link.stream_tasks) == max_streams
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        sockets.close()


def test_handlers_still_running_count_against_the_cap(site: Site) -> None:
    site.run(in_process_site(site.tower, max_streams=4))
    site.assert_serves_normally()


def test_the_fake_tower_is_a_real_one_to_the_enforcer(site: Site) -> None:
    """Sanity: the site announces its handlers by name, as a real tower expects."""
    link = site.run(site.tower.site())
    assert link.hello is not None and link.hello["site"] == SITE
    assert {"exec", "tcp"} <= set(link.hello["handlers"])  # type: ignore[call-overload]


def test_a_tower_that_keeps_asking_to_move_costs_bounded_links_and_a_backoff(tmp_path: Path) -> None:
    """A compromised tower answers every link with GOAWAY and never closes the old ones:
    the enforcer keeps at most MAX_MOVING of them (it closes the oldest, LIMIT), and after
    a short link it links again only after its backoff, not in a loop."""

    async def body(tower: FakeTower) -> None:
        agent = Agent(
            towers=[tower.url],
            site="mover",
            token=TOKEN,
            ssl_context=ssl.create_default_context(cafile=str(tower.certs.ca)),
            inventory=parse_inventory({"applications": {APP: {"service-instances": {INST: {}}}}}),
            handlers={},
            context=HandlerContext(site="mover", sockets=NamespaceSockets()),
        )
        seen: list[TowerSide] = []
        try:
            for _ in range(MAX_MOVING + 2):
                running = asyncio.create_task(agent.connect_once())
                async with asyncio.timeout(20):
                    while not (links := [x for x in tower.links if x.live and x not in seen]):
                        await asyncio.sleep(0.01)  # polling; the timeout above is the bound
                seen.append(links[0])
                links[0].conn.send_goaway({"reason": "move, again"})
                links[0].flush()
                assert await running is True
            async with asyncio.timeout(20):
                while sum(x.live for x in seen) > MAX_MOVING:  # the oldest are closed by the enforcer
                    await asyncio.sleep(0.01)  # polling; the timeout above is the bound
            assert len(agent.moving) == MAX_MOVING
            assert [x.live for x in seen] == [False, False, True, True]
            assert agent.after_goaway(0.5) > 0 and agent.after_goaway(STABLE_AFTER) == 0
        finally:
            await agent.shutdown()

    with FakeTower(tmp_path / "tower") as tower:
        tower.run(body(tower))
