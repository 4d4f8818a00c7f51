"""Unit tests of containers and exec on the enforcer side (no tower, no root).

* the exec output record codec (:mod:`supctl.protocol.exec`);
* the inventory's runtime and container keys;
* :class:`ContainerSupervisor` with the ``host`` runtime;
* the ``exec`` handler, driven in process: an in-memory WebSocket pair joins a
  "tower" Link to a real :class:`Agent` (``connect_once``), on asyncio and uvloop.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import os
import pwd
import signal
import time
import tomllib
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from supctl_exec import handler as exec_handler
from supctl_exec.handler import ExecHandler
from supctl_exec.runtimes import HostRuntime, NetnsRuntime
from websockets.exceptions import ConnectionClosedOK

from supctl import aio
from supctl.enforcer import agent as agent_module
from supctl.enforcer.agent import Agent
from supctl.enforcer.api import HandlerContext, Serves
from supctl.enforcer.containers import ContainerSupervisor
from supctl.enforcer.inventory import Inventory, parse_inventory
from supctl.enforcer.netns import NamespaceSockets
from supctl.enforcer.runtime import ProcessSpec, Runtime
from supctl.errors import StreamError, UsageError
from supctl.link import Channel, Link
from supctl.protocol import DEFAULT_WINDOW, Connection, ErrorCode, FrameError, OpenRequest
from supctl.protocol.exec import MAX_RECORD, OutputDecoder, encode_output
from supctl.tower.siteinfo import SiteInfo

RUNTIMES: dict[str, Runtime] = {"host": HostRuntime(), "netns": NetnsRuntime()}
LOOPS = {"asyncio": None, "uvloop": aio.loop_factory()}


def run(main: Coroutine[Any, Any, Any], loop: str = "asyncio") -> Any:
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        return runner.run(asyncio.wait_for(main, 60))


def dies(pid: int, deadline: float = 5.0) -> bool:
    """True once ``pid`` is dead (SIGKILL is delivered asynchronously)."""
    end = time.monotonic() + deadline
    while alive(pid):
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is dead for our purposes.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0] != "Z"


async def until(predicate: Callable[[], object], deadline: float = 10.0) -> None:
    end = time.monotonic() + deadline
    while not predicate():
        assert time.monotonic() < end, f"timed out waiting for {predicate}"
        await asyncio.sleep(0.01)


# --- output records ----------------------------------------------------------------------------


def test_records_round_trip() -> None:
    stream = encode_output(1, b"out") + encode_output(2, b"") + encode_output(2, b"err" * 1000)
    decoder = OutputDecoder()
    assert decoder.feed(stream) == [(1, b"out"), (2, b""), (2, b"err" * 1000)]
    assert decoder.pending == 0


def test_partial_record_is_pending() -> None:
    decoder = OutputDecoder()
    record = encode_output(1, b"hello")
    assert decoder.feed(record[:7]) == []
    assert decoder.pending == 7
    assert decoder.feed(record[7:]) == [(1, b"hello")]
    assert decoder.pending == 0


@pytest.mark.parametrize("fd", [0, 3, 255])
def test_bad_fd_is_a_frame_error_before_the_payload(fd: int) -> None:
    with pytest.raises(FrameError, match=f"fd {fd}"):
        OutputDecoder().feed(bytes([fd]) + (10).to_bytes(4, "big"))  # payload not even sent


def test_oversize_record_is_a_frame_error() -> None:
    with pytest.raises(FrameError) as info:
        OutputDecoder().feed(b"\x01" + (MAX_RECORD + 1).to_bytes(4, "big"))
    assert info.value.code == ErrorCode.FRAME_SIZE
    assert OutputDecoder().feed(encode_output(2, b"x" * MAX_RECORD)) == [(2, b"x" * MAX_RECORD)]


def test_encoder_refuses_what_the_decoder_would() -> None:
    with pytest.raises(ValueError):
        encode_output(3, b"")
    with pytest.raises(ValueError):
        encode_output(1, b"x" * (MAX_RECORD + 1))


@given(
    records=st.lists(st.tuples(st.sampled_from([1, 2]), st.binary(max_size=300)), max_size=20),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=30),
)
def test_any_chunking_decodes_to_the_same_records(records: list[tuple[int, bytes]], cuts: list[int]) -> None:
    stream = b"".join(encode_output(fd, data) for fd, data in records)
    bounds = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})
    decoder = OutputDecoder()
    decoded: list[tuple[int, bytes]] = []
    for start, end in itertools.pairwise(bounds):
        decoded += decoder.feed(stream[start:end])
    assert decoded == records
    assert decoder.pending == 0


# --- inventory ---------------------------------------------------------------------------------


def inventory(text: str) -> Inventory:
    return parse_inventory(tomllib.loads(text))


def test_runtime_defaults_and_container_keys() -> None:
    inv = inventory(
        """
        [applications.a.service-instances.ns]
        netns = "n1"
        [applications.a.service-instances.ns.containers.web]
        command = ["/bin/web", "--port", "80"]
        env = { MODE = "x" }
        cwd = "/srv"
        user = "nobody"
        [applications.a.service-instances.plain.containers.shell]
        [applications.a.service-instances.forced]
        netns = "n2"
        runtime = "host"
        """
    )
    ns, plain, forced = (inv.find("a", name) for name in ("ns", "plain", "forced"))
    assert (ns.runtime, plain.runtime, forced.runtime) == ("netns", "host", "host")
    web = ns.containers["web"]
    assert (web.command, web.env, web.cwd, web.user) == (
        ["/bin/web", "--port", "80"],
        {"MODE": "x"},
        "/srv",
        "nobody",
    )
    shell = plain.containers["shell"]
    assert (shell.command, shell.env, shell.cwd, shell.user) == (None, {}, None, None)
    inv.check_runtimes(RUNTIMES)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('runtime = "netns"', "'I.runtime' is 'netns', which needs a netns"),
        ("runtime = 3", "'I.runtime' must be a runtime name"),
        ('runtime = ""', "'I.runtime' must be a runtime name"),
        ("containers.c.command = 'ls'", "'I.containers.c.command' must be a non-empty list of strings"),
        ("containers.c.command = []", "'I.containers.c.command' must be a non-empty list of strings"),
        ("containers.c.command = ['ls', 1]", "'I.containers.c.command' must be a non-empty list of strings"),
        ("containers.c.env = 'A=1'", "'I.containers.c.env' must be a table"),
        ("containers.c.env = { A = 1 }", "'I.containers.c.env.A' must be a string"),
        ("containers.c.cwd = 'srv'", "'I.containers.c.cwd' must be an absolute path"),
        ("containers.c.cwd = 1", "'I.containers.c.cwd' must be an absolute path"),
        ("containers.c.user = 0", "'I.containers.c.user' must be a non-empty string"),
        ("containers.c.cmd = ['ls']", "unknown key 'I.containers.c.cmd' (known: command, env, cwd, user)"),
        ("containers.c = 1", "'I.containers.c' must be a table"),
    ],
)
def test_bad_instance_or_container_is_one_line(body: str, message: str) -> None:
    with pytest.raises(UsageError) as info:
        inventory(f"[applications.a.service-instances.i]\n{body}\n")
    assert str(info.value) == "bad inventory: " + message.replace(
        "'I.", "'applications.a.service-instances.i."
    )


def test_unknown_runtime_lists_the_known_ones() -> None:
    inv = inventory('[applications.a.service-instances.i]\nruntime = "docker"\n')
    with pytest.raises(UsageError) as info:
        inv.check_runtimes(RUNTIMES)
    assert (
        str(info.value) == "inventory: service instance i uses unknown runtime 'docker' (known: host, netns)"
    )


def test_describe_is_what_the_tower_parses() -> None:
    inv = inventory(
        '[applications.a.service-instances.i]\nnetns = "n1"\n'
        '[applications.a.service-instances.i.containers.c]\ncommand = ["x"]\n'
        "[applications.a.service-instances.i.containers.d]\n"
    )
    state = {
        "state": "running",
        "pid": 42,
        "restarts": 1,
        "exit-code": None,
        "started": "2024-01-01T00:00:00+00:00",
    }
    described = inv.describe({("a", "i", "c"): state})
    info = SiteInfo.parse({"applications": described, "handlers": ["exec"]}).instance("a", "i")
    assert info is not None
    assert (info.netns, info.runtime) == ("n1", "netns")
    assert info.containers == {"c": state, "d": {}}


# --- containers --------------------------------------------------------------------------------


def supervisor_for(toml: str, **kw: Any) -> ContainerSupervisor:
    return ContainerSupervisor(inventory(toml), RUNTIMES, **kw)


def container(command: str, extra: str = "") -> str:
    return (
        "[applications.a.service-instances.i.containers.c]\n"
        f"command = ['/bin/sh', '-c', {command!r}]\n{extra}"
    )


def test_container_runs_restarts_and_stops(tmp_path: Any) -> None:
    marker = tmp_path / "runs"
    changes: list[dict[str, Any]] = []
    output = io.BytesIO()
    # Each run appends a line, starts a background child (same group) and exits 3.
    sup = supervisor_for(
        container(f"echo run >> {marker}; echo hello; sleep 60 & echo $! >> {marker}.kids; exit 3"),
        output=output,
        backoff_start=0.05,
    )
    sup.on_change = lambda: changes.append(dict(sup.states()[("a", "i", "c")]))

    async def main() -> None:
        sup.start()
        await until(lambda: sup.states()[("a", "i", "c")]["restarts"] >= 2)
        await sup.stop()

    run(main())
    states = [c["state"] for c in changes]
    assert states[0] == "running" and "restarting" in states and states[-1] == "stopped"
    final = sup.states()[("a", "i", "c")]
    assert final["restarts"] >= 2 and final["pid"] is None and final["exit-code"] in (3, -signal.SIGTERM)
    running = next(c for c in changes if c["state"] == "running")
    assert running["pid"] > 0 and running["started"].endswith("+00:00")
    assert next(c for c in changes if c["state"] == "restarting")["exit-code"] == 3
    assert b"i/c| hello\n" in output.getvalue()
    kids = [int(pid) for pid in (tmp_path / "runs.kids").read_text().split()]
    assert kids and all(dies(pid) for pid in kids)  # the group died with each run


def test_stop_terms_then_kills_and_leaves_nothing(tmp_path: Any) -> None:
    pids = tmp_path / "pids"
    sup = supervisor_for(
        container(
            "echo $$ > " + str(pids) + ".main; trap '' TERM; sleep 60 & echo $! > " + str(pids) + "; wait"
        )
        + "[applications.a.service-instances.i.containers.polite]\ncommand = ['sleep', '60']\n",
        stop_grace=0.3,
    )

    async def main() -> float:
        sup.start()
        await until(lambda: pids.exists() and pids.read_text().strip())
        await until(lambda: sup.states()[("a", "i", "polite")]["state"] == "running")
        started = time.monotonic()
        await sup.stop()
        return time.monotonic() - started

    took = run(main())
    assert 0.3 <= took < 3
    states = sup.states()
    assert {s["state"] for s in states.values()} == {"stopped"}
    assert states[("a", "i", "c")]["exit-code"] == -signal.SIGKILL  # ignored TERM, killed after the grace
    assert states[("a", "i", "polite")]["exit-code"] == -signal.SIGTERM
    for path in (pids, tmp_path / "pids.main"):
        assert dies(int(path.read_text()))


def test_container_that_cannot_start_is_failed_and_retried() -> None:
    sup = supervisor_for(container("true", "cwd = '/nonexistent/dir'\n"), backoff_start=0.02)

    async def main() -> dict[str, Any]:
        sup.start()
        await until(lambda: sup.states()[("a", "i", "c")]["restarts"] >= 2)
        state = dict(sup.states()[("a", "i", "c")])
        await sup.stop()
        return state

    state = run(main())
    assert state["state"] == "failed" and state["pid"] is None


def test_container_without_command_is_not_started() -> None:
    sup = supervisor_for("[applications.a.service-instances.i.containers.c]\n")
    run(_start_stop(sup))
    assert sup.states() == {}


async def _start_stop(sup: ContainerSupervisor) -> None:
    sup.start()
    await sup.stop()


# --- exec, in process --------------------------------------------------------------------------


class MemoryWebSocket:
    """One end of an in-memory WebSocket pair."""

    def __init__(self) -> None:
        self.inbox: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.peer: MemoryWebSocket | None = None

    @classmethod
    def pair(cls) -> tuple[MemoryWebSocket, MemoryWebSocket]:
        a, b = cls(), cls()
        a.peer, b.peer = b, a
        return a, b

    async def send(self, message: bytes) -> None:
        assert self.peer is not None
        self.peer.inbox.put_nowait(message)

    async def recv(self) -> bytes:
        message = await self.inbox.get()
        if message is None:
            self.inbox.put_nowait(None)
            raise ConnectionClosedOK(None, None)
        return message

    async def close(self, code: int = 1000, reason: str = "") -> None:
        assert self.peer is not None
        self.inbox.put_nowait(None)
        self.peer.inbox.put_nowait(None)


class TowerLink(Link):
    def __init__(self, ws: MemoryWebSocket) -> None:
        super().__init__(ws, Connection(odd_ids=True, accept_streams=False, accept_hello=True), "tower")
        self.hellos: list[dict[str, object]] = []

    def on_hello(self, payload: dict[str, object]) -> None:
        self.hellos.append(payload)

    def on_status(self, payload: dict[str, object]) -> None:
        self.hellos.append(payload)


SITE = """
[applications.app.service-instances.si.containers.c1]
env = { GREETING = "hi" }
[applications.app.service-instances.si.containers.c2]
cwd = "/nonexistent/dir"
[applications.app.service-instances.si.containers.c3]
user = "no-such-user-here"
"""


@contextlib.asynccontextmanager
async def site(
    monkeypatch: pytest.MonkeyPatch, toml: str = SITE, supervisor: ContainerSupervisor | None = None
) -> AsyncIterator[tuple[TowerLink, Agent]]:
    tower_ws, site_ws = MemoryWebSocket.pair()

    async def connect(*args: object, **kw: object) -> MemoryWebSocket:
        return site_ws

    monkeypatch.setattr(agent_module, "connect", connect)
    sockets = NamespaceSockets()
    agent = Agent(
        towers=["ws://tower.invalid"],
        site="s1",
        token="t",
        ssl_context=None,
        inventory=supervisor.inventory if supervisor else inventory(toml),
        handlers={Serves("exec"): ExecHandler()},
        context=HandlerContext(site="s1", sockets=sockets, runtimes=RUNTIMES),
        supervisor=supervisor,
    )
    tower = TowerLink(tower_ws)
    tower.start()
    enforcer = asyncio.create_task(agent.connect_once())
    try:
        await until(lambda: tower.hellos)
        yield tower, agent
    finally:
        enforcer.cancel()
        await asyncio.gather(enforcer, return_exceptions=True)
        tower.close()
        await asyncio.gather(tower.task or asyncio.sleep(0), return_exceptions=True)
        sockets.close()


def request(command: str, container: str = "c1", verb: str = "exec") -> OpenRequest:
    return OpenRequest(
        verb=verb, application="app", service_instance="si", container=container, args={"command": command}
    )


async def collect(channel: Channel) -> tuple[bytes, bytes, dict[str, Any]]:
    decoder = OutputDecoder()
    out = {1: bytearray(), 2: bytearray()}
    while data := await channel.read():
        for fd, payload in decoder.feed(data):
            out[fd] += payload
    assert decoder.pending == 0
    control = await channel.read_control()  # sent before the EOF, so it is here
    return bytes(out[1]), bytes(out[2]), control["exit"]  # type: ignore[return-value]


async def execute(tower: Link, command: str, stdin: bytes = b"") -> tuple[bytes, bytes, dict[str, Any]]:
    channel = await tower.open_channel(request(command))
    await channel.write(stdin)
    channel.write_eof()
    return await collect(channel)


@pytest.fixture(params=sorted(LOOPS))
def loop(request: pytest.FixtureRequest) -> str:
    if LOOPS[request.param] is None and request.param != "asyncio":
        pytest.skip("uvloop is not installed")
    return str(request.param)


def test_exec_output_stdin_env_and_exit_code(monkeypatch: pytest.MonkeyPatch, loop: str) -> None:
    async def main() -> None:
        async with site(monkeypatch) as (tower, _agent):
            assert "exec" in tower.hellos[0]["handlers"]  # type: ignore[operator]
            out, err, status = await execute(tower, 'echo "$GREETING $PATH $(pwd)"; echo oops >&2; exit 7')
            assert out == b"hi /usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin /\n"
            assert (err, status) == (b"oops\n", {"code": 7, "signal": None})
            data = os.urandom(3 * DEFAULT_WINDOW)
            out, err, status = await execute(tower, "cat", data)
            assert (out == data, err, status) == (True, b"", {"code": 0, "signal": None})

    run(main(), loop)


def test_exec_command_that_ignores_stdin_is_not_held_up(monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        async with site(monkeypatch) as (tower, _):
            channel = await tower.open_channel(request("exec 0<&-; echo done"))
            # More than a window of stdin that nobody reads, and no EOF.
            writer = asyncio.create_task(channel.write(b"x" * (2 * DEFAULT_WINDOW)))
            out, _, status = await collect(channel)
            assert (out, status) == (b"done\n", {"code": 0, "signal": None})
            writer.cancel()

    run(main())


@pytest.mark.parametrize(
    ("name", "signum"), [("TERM", signal.SIGTERM), ("HUP", signal.SIGHUP), ("KILL", signal.SIGKILL)]
)
def test_exec_signal_reaches_the_command(monkeypatch: pytest.MonkeyPatch, name: str, signum: int) -> None:
    async def main() -> None:
        async with site(monkeypatch) as (tower, _):
            channel = await tower.open_channel(request("echo ready; exec sleep 60"))
            assert await channel.read()  # "ready": the command runs
            channel.send_control({"signal": name, "ignored": True})
            channel.send_control({"signal": "NOPE"})  # unknown: ignored, not fatal
            _, _, status = await collect(channel)
            assert status == {"code": None, "signal": signum}

    run(main())


def test_exec_int_ignored_is_killed_after_the_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(exec_handler, "GRACE", 0.3)

    async def main() -> None:
        async with site(monkeypatch) as (tower, _):
            channel = await tower.open_channel(request("trap '' INT; echo ready; sleep 60"))
            assert await channel.read()
            started = time.monotonic()
            channel.send_control({"signal": "INT"})
            _, _, status = await collect(channel)
            assert status == {"code": None, "signal": signal.SIGKILL}
            assert 0.25 <= time.monotonic() - started < 5

    run(main())


def test_exec_exit_kills_the_group_even_if_a_child_holds_stdout(
    monkeypatch: pytest.MonkeyPatch, loop: str
) -> None:
    async def main() -> int:
        async with site(monkeypatch) as (tower, _):
            started = time.monotonic()
            out, _, status = await execute(tower, "sleep 60 & echo $!")
            assert status == {"code": 0, "signal": None}
            assert time.monotonic() - started < 5
            return int(out)

    child = run(main(), loop)
    assert dies(child)


def test_exec_escaped_process_does_not_hold_the_exit(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.setattr(exec_handler, "ORPHAN_WAIT", 0.2)
    pidfile = tmp_path / "pid"
    # The pid is written only after setsid(): exiting earlier would kill it with the group.
    command = f"setsid sh -c 'echo $$ > {pidfile}; exec sleep 60' & until [ -s {pidfile} ]; do sleep 0.01; done; cat {pidfile}"

    async def main() -> int:
        async with site(monkeypatch) as (tower, _):
            out, _, status = await execute(tower, command)
            assert status == {"code": 0, "signal": None}
            return int(out)

    escaped = run(main())
    try:
        assert alive(escaped)  # it left the group: out of our reach, by design
    finally:
        os.kill(escaped, signal.SIGKILL)


def test_exec_reset_by_client_kills_the_command(monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> int:
        async with site(monkeypatch) as (tower, _):
            channel = await tower.open_channel(request("echo $$; exec sleep 60"))
            pid = int(OutputDecoder().feed(await channel.read())[0][1])
            assert alive(pid)
            channel.reset(ErrorCode.CANCEL, "bye")
            await until(lambda: not alive(pid))
            return pid

    run(main())


def test_exec_link_lost_kills_the_command(monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> int:
        async with site(monkeypatch) as (tower, _):
            channel = await tower.open_channel(request("echo $$; exec sleep 60"))
            pid = int(OutputDecoder().feed(await channel.read())[0][1])
            tower.close()
        return pid

    assert dies(run(main()))


def test_exec_output_waits_for_credit(monkeypatch: pytest.MonkeyPatch) -> None:
    size = 16 * DEFAULT_WINDOW

    async def main() -> None:
        async with site(monkeypatch) as (tower, _):
            channel = await tower.open_channel(request(f"head -c {size} /dev/zero"))
            await asyncio.sleep(0.5)  # nobody reads: the command must be blocked on its pipe
            assert channel.buffered <= DEFAULT_WINDOW
            assert not channel._controls  # no exit yet
            out, _, status = await collect(channel)
            assert (len(out), status) == (size, {"code": 0, "signal": None})

    run(main())


@pytest.mark.parametrize(
    ("req", "code", "message"),
    [
        (
            request("true", container="nope"),
            ErrorCode.NOT_FOUND,
            "container nope not found in service instance si",
        ),
        (
            request("true", container="c2"),
            ErrorCode.NOT_FOUND,
            "working directory /nonexistent/dir does not exist",
        ),
        (
            request("true", container="c3"),
            ErrorCode.NOT_FOUND,
            "user 'no-such-user-here' does not exist on this host",
        ),
        (
            request("true", verb="frobnicate"),
            ErrorCode.UNSUPPORTED,
            "verb 'frobnicate' is not supported at this site",
        ),
        (
            OpenRequest(verb="exec", application="app", service_instance="si", container="c1"),
            ErrorCode.PROTOCOL,
            "exec needs a command",
        ),
    ],
)
def test_exec_refusals_are_one_line(
    monkeypatch: pytest.MonkeyPatch, req: OpenRequest, code: int, message: str
) -> None:
    async def main() -> None:
        async with site(monkeypatch) as (tower, _):
            with pytest.raises(StreamError) as info:
                await tower.open_channel(req)
            assert info.value.code == code
            assert message in str(info.value)

    run(main())


def test_container_states_reach_the_tower_in_hello_and_status(monkeypatch: pytest.MonkeyPatch) -> None:
    sup = supervisor_for(container("sleep 60"), backoff_start=0.05)

    async def main() -> None:
        async with site(monkeypatch, supervisor=sup) as (tower, _):
            sup.start()

            def state() -> Any:
                info = SiteInfo.parse(tower.hellos[-1]).instance("a", "i")
                return info and info.containers["c"].get("state")

            await until(lambda: state() == "running")
            pid = sup.states()[("a", "i", "c")]["pid"]
            os.kill(pid, signal.SIGKILL)
            await until(lambda: sup.states()[("a", "i", "c")]["restarts"] == 1)
            await until(
                lambda: (
                    state() == "running"
                    and SiteInfo.parse(tower.hellos[-1]).instance("a", "i").containers["c"]["restarts"] == 1  # type: ignore[union-attr]
                )
            )
            await sup.stop()
            await until(lambda: state() == "stopped")

    run(main())


# --- the netns runtime (root) ------------------------------------------------------------------


def test_netns_runtime_runs_in_the_namespace_with_its_resolv_conf_and_user(netlab: Any) -> None:
    ns = netlab.add_ns("exec")
    netlab.add_address(ns, "lo", "192.0.2.99/32")
    netlab.write_netns_etc(ns, "nameserver 192.0.2.53\n")
    inv = inventory(
        f'[applications.a.service-instances.i]\nnetns = "{ns}"\n'
        "[applications.a.service-instances.i.containers.c]\nuser = 'nobody'\n"
    )
    instance = inv.find("a", "i")
    spec = ProcessSpec.for_container(
        instance.containers["c"],
        ["/bin/sh", "-c", "ip -o addr show lo; cat /etc/resolv.conf; id -u; echo $$"],
        stdout=asyncio.subprocess.PIPE,
    )

    async def main() -> tuple[bytes, int]:
        proc = await RUNTIMES["netns"].spawn(instance, spec)
        out, _ = await proc.communicate()
        return out, proc.pid

    out, pid = run(main())
    lines = out.decode().splitlines()
    assert any("192.0.2.99/32" in line for line in lines)  # only this namespace has it
    assert "nameserver 192.0.2.53" in lines
    assert lines[-2] == str(pwd.getpwnam("nobody").pw_uid)
    assert lines[-1] == str(pid)  # ip and setpriv exec'd: the pid is the command's


@pytest.mark.root
def test_netns_runtime_refuses_a_vanished_namespace() -> None:
    instance = inventory('[applications.a.service-instances.i]\nnetns = "sct-never-there"\n').find("a", "i")
    with pytest.raises(StreamError) as info:
        run(RUNTIMES["netns"].spawn(instance, ProcessSpec(["true"])))
    assert (info.value.code, str(info.value)) == (
        ErrorCode.NOT_FOUND,
        "network namespace sct-never-there does not exist",
    )
