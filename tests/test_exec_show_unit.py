"""The client side of ``exec`` and ``supctl show``.

In process: argument parsing, rendering (YAML, JSON, table) from sample data, the
exit-code mapping, and the exec session against a scripted site over an in-memory
link pair (real :class:`~supctl.link.Link` objects, no sockets).  End to end:
``supctl show`` against a real tower and a host-network enforcer, in every format.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping
from typing import Any

import pytest
import yaml
from e2e_support import wait_until
from rich.console import Console
from stack import Stack, one_line_error, program
from supctl_exec.verb import exec_path, exit_code, run_exec
from supctl_show.verb import Target, applications_target, make_table, render, select
from websockets.exceptions import ConnectionClosedError, ConnectionClosedOK
from websockets.frames import Close

from supctl.cli import run
from supctl.errors import ExitCode, NotFoundError, ProtocolError, StreamError, UsageError
from supctl.link import Channel, Link
from supctl.protocol import Connection, ErrorCode, OpenRequest, StreamOpened
from supctl.protocol.exec import encode_output

# --- argument parsing ----------------------------------------------------------------


def test_applications_arguments() -> None:
    assert applications_target("s", ()) == Target("applications", "/v1/state/applications", {"site": "s"})
    one_app = applications_target("s", ("popcorn",))
    assert (one_app.kind, one_app.name, one_app.path) == ("applications", "popcorn", "/v1/state/applications")
    instances = applications_target("s", ("pop corn", "service-instances"))
    assert instances.kind == "service-instances" and instances.name is None
    assert instances.path == "/v1/state/applications/pop%20corn/service-instances"
    assert instances.query == {"site": "s"}
    assert applications_target("s", ("popcorn", "service-instances", "p-1")).name == "p-1"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("popcorn", "bogus"), "expected 'service-instances' after 'popcorn', got 'bogus'"),
        (("a", "service-instances", "b", "c"), "too many arguments"),
        (("",), "must not be empty"),
    ],
)
def test_applications_arguments_refused(args: tuple[str, ...], expected: str) -> None:
    with pytest.raises(UsageError, match=expected) as info:
        applications_target("s", args)
    assert "\n" not in str(info.value)


def supctl_run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = run(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["show", "applications"], "no site given: use supctl show -s SITE applications"),
        (["show", "-o", "xml", "sites"], "'xml' is not one of 'yaml', 'json', 'table'"),
        (["show", "-s", "s", "applications", "a", "instances"], "expected 'service-instances'"),
        (
            ["do", "-s", "s", "applications", "a", "service-instances", "i", "containers", "c", "exec"],
            "Missing argument",
        ),
        (
            [
                "do",
                "-s",
                "s",
                "applications",
                "a",
                "service-instances",
                "i",
                "containers",
                "c",
                "exec",
                "ls",
                "-l",
            ],
            "exec takes one COMMAND argument, got 2: quote it, e.g. exec 'ls -l'",
        ),
        (
            ["do", "-s", "s", "applications", "a", "service-instances", "i", "containers", "c", "exec", " "],
            "empty",
        ),
        (
            ["do", "applications", "a", "service-instances", "i", "containers", "c", "exec", "true"],
            "no site given: use supctl do -s SITE ..., a SITE/APP/INSTANCE target, SUPCTL_SITE or a context",
        ),
    ],
)
def test_usage_errors_are_one_line(
    capsys: pytest.CaptureFixture[str], argv: list[str], expected: str
) -> None:
    code, out, err = supctl_run(capsys, "--host", "wss://127.0.0.1:1", *argv)
    # exec's own checks exit 255 (ssh's rule: never a code the command could return); click's 2.
    assert code == (ExitCode.EXEC_FAILED if "exec" in argv[:-1] else ExitCode.USAGE)
    assert out == ""
    assert expected in one_line_error(err.encode())


def test_exec_is_registered_at_the_container_node(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = supctl_run(
        capsys, "do", "applications", "a", "service-instances", "i", "containers", "c", "--help"
    )
    assert code == 0
    assert "exec" in out
    assert (
        exec_path("a b", "i/1", "c")
        == "/v1/state/applications/a%20b/service-instances/i%2F1/containers/c/exec"
    )


# --- exit codes -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code"),
    [
        ({"code": 0, "signal": None}, 0),
        ({"code": 3, "signal": None}, 3),
        ({"code": 255}, 255),
        ({"code": None, "signal": 9}, 137),
        ({"code": None, "signal": 2}, 130),
        ({"signal": 15}, 143),
    ],
)
def test_exit_code_mapping(status: dict[str, Any], code: int) -> None:
    assert exit_code(status) == code


@pytest.mark.parametrize(
    "status",
    [{"code": None, "signal": None}, {"code": "1"}, {"code": 256}, {"code": True}, {"signal": 0}, "0", None],
)
def test_malformed_exit_status(status: object) -> None:
    with pytest.raises(ProtocolError, match="malformed exit status"):
        exit_code(status)


# --- rendering --------------------------------------------------------------------------

SITES = [
    {"name": "gbg", "connected": False, "version": None, "applications": [], "replica": None},
    {
        "name": "sthlm",
        "connected": True,
        "version": "0.1.0",
        "applications": ["popcorn", "kettle"],
        "replica": "tower-b",
    },
]
INSTANCES = [
    {
        "name": "popcorn-1",
        "application": "popcorn",
        "runtime": "netns",
        "netns": "ns-1",
        "containers": [
            {"name": "popper", "state": "running", "pid": 4242, "restarts": 1},
            {"name": "[bold]kettle", "state": "exited", "pid": None, "restarts": 0, "exit-code": 1},
        ],
    },
    {"name": "popcorn-2", "application": "popcorn", "runtime": "host", "netns": None, "containers": []},
]


def table_text(kind: str, data: Any) -> list[list[str]]:
    console = Console(file=io.StringIO(), width=200, color_system=None)
    console.print(make_table(kind, data))
    text = console.file.getvalue()  # type: ignore[attr-defined]
    return [line.split() for line in text.splitlines() if line.strip() and not line.startswith("─")]


def test_render_yaml_keeps_the_towers_order() -> None:
    text = render("service-instances", INSTANCES, "yaml")
    assert yaml.safe_load(text) == INSTANCES
    assert text.startswith("- name: popcorn-1\n  application: popcorn\n")  # not sorted


def test_render_json() -> None:
    text = render("sites", SITES, "json")
    assert json.loads(text) == SITES
    assert text.endswith("}\n]\n") and '\n  {\n    "name": "gbg"' in text


def test_table_of_instances_has_a_row_per_container() -> None:
    rows = table_text("service-instances", INSTANCES)
    assert rows == [
        ["SERVICE", "INSTANCE", "CONTAINER", "STATE", "PID", "RESTARTS"],
        ["popcorn-1", "popper", "running", "4242", "1"],
        ["popcorn-1", "[bold]kettle", "exited", "-", "0"],  # names are never rich markup
        ["popcorn-2", "-", "-", "-", "-"],
    ]
    assert table_text("service-instances", INSTANCES[0])[1:] == rows[1:3]


def test_table_of_sites_and_applications() -> None:
    assert table_text("sites", SITES) == [
        ["SITE", "CONNECTED", "VERSION", "REPLICA", "APPLICATIONS"],
        ["gbg", "no", "-", "-", "-"],
        ["sthlm", "yes", "0.1.0", "tower-b", "popcorn,", "kettle"],
    ]
    apps = [{"name": "popcorn", "service-instances": ["p-1", "p-2"]}]
    assert table_text("applications", apps)[1] == ["popcorn", "p-1,", "p-2"]


def test_select_one_item_or_not_found() -> None:
    target = applications_target("sthlm", ("popcorn", "service-instances", "popcorn-2"))
    body = {"service-instances": INSTANCES}
    assert select(target, body) == INSTANCES[1]
    with pytest.raises(NotFoundError) as info:
        select(applications_target("sthlm", ("popcorn", "service-instances", "nope")), body)
    assert str(info.value) == "service instance 'nope' of application 'popcorn' not found at site 'sthlm'"
    with pytest.raises(NotFoundError, match="application 'x' not found at site 'sthlm'"):
        select(applications_target("sthlm", ("x",)), {"applications": []})
    with pytest.raises(ProtocolError, match="unexpected answer"):
        select(target, {"sites": []})


# --- the exec session over an in-memory link pair -----------------------------------------

Script = Callable[[Channel], Coroutine[Any, Any, None]]


class MemoryWebSocket:
    def __init__(self) -> None:
        self.inbox: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.peer: MemoryWebSocket | None = None
        self.closed = False
        self.drop = False  # close as a dead connection (no close frame)

    async def send(self, message: bytes) -> None:
        if self.closed:
            raise ConnectionClosedOK(Close(1000, "closed"), None)
        assert self.peer is not None
        await self.peer.inbox.put(message)

    async def recv(self) -> bytes:
        message = await self.inbox.get()
        if message is None:
            if self.drop:
                raise ConnectionClosedError(None, None)
            raise ConnectionClosedOK(Close(1000, "closed"), None)
        return message

    async def close(self, code: int = 1000, reason: str = "") -> None:
        if not self.closed:
            self.closed = True
            assert self.peer is not None
            self.peer.drop = self.drop
            self.inbox.put_nowait(None)
            self.peer.inbox.put_nowait(None)


class ScriptedSite(Link):
    """The tower and the enforcer in one: every stream is served by ``script``."""

    def __init__(self, ws: MemoryWebSocket, script: Script) -> None:
        super().__init__(ws, Connection(odd_ids=False, accept_streams=True), name="site")
        self.script = script
        self.requests: list[OpenRequest] = []
        self.tasks: set[asyncio.Task[None]] = set()

    def on_stream_opened(self, event: StreamOpened) -> None:
        self.requests.append(event.request)
        task = asyncio.create_task(self.script(self.adopt_channel(event.stream_id)))
        self.tasks.add(task)


class MemoryTransport:
    def __init__(self, script: Script) -> None:
        self.script = script
        self.site: ScriptedSite | None = None
        self.opened: tuple[str, dict[str, str]] | None = None

    async def open_session(self, path: str, query: Mapping[str, Any]) -> Link:
        self.opened = (path, dict(query))
        ours, theirs = MemoryWebSocket(), MemoryWebSocket()
        ours.peer, theirs.peer = theirs, ours
        self.site = ScriptedSite(theirs, self.script)
        self.site.start()
        link = Link(ours, Connection(odd_ids=True, accept_streams=False), name="tower")
        link.start()
        return link

    async def get(self, path: str, query: Mapping[str, str]) -> Any:
        raise NotImplementedError


class Run:
    """One exec against ``script`` with pipes for stdin, stdout and stderr."""

    def __init__(self, script: Script, stdin: bytes = b"", *, close_stdin: bool = True) -> None:
        self.transport = MemoryTransport(script)
        self.site_errors: list[BaseException] = []
        self.stdin_r, self.stdin_w = os.pipe()
        self.out_r, self.out_w = os.pipe()
        self.err_r, self.err_w = os.pipe()
        os.write(self.stdin_w, stdin)
        if close_stdin:
            os.close(self.stdin_w)
            self.stdin_w = -1

    def __call__(self, deadline: float = 10.0) -> int:
        async def main() -> int:
            try:
                return await run_exec(
                    self.transport,
                    "/exec",
                    {"site": "s"},
                    "cmd",
                    stdin=self.stdin_r,
                    stdout=self.out_w,
                    stderr=self.err_w,
                )
            finally:
                await self._finish_site()

        try:
            code = asyncio.run(asyncio.wait_for(main(), deadline))
        finally:
            for fd in (self.stdin_w, self.out_w, self.err_w, self.stdin_r):
                if fd >= 0:
                    os.close(fd)
        assert not self.site_errors, self.site_errors
        return code

    async def _finish_site(self) -> None:
        """Collect the scripts' outcomes: their failed asserts fail the test, and no task
        is left for the garbage collector to report (a traceback printed from a finaliser
        can run inside an ast conversion and trip CPython 3.11's AST depth check)."""
        site = self.transport.site
        if site is None:
            return
        for task in site.tasks:
            task.cancel()
        for result in await asyncio.gather(*site.tasks, return_exceptions=True):
            if isinstance(result, BaseException) and not isinstance(
                result, (StreamError, asyncio.CancelledError)
            ):
                self.site_errors.append(result)

    def output(self) -> tuple[bytes, bytes]:
        with os.fdopen(self.out_r, "rb") as out, os.fdopen(self.err_r, "rb") as err:
            return out.read(), err.read()


def read_some(fd: int) -> bytes:
    try:
        return os.read(fd, 100)
    except BlockingIOError:
        return b""


async def read_all(channel: Channel) -> bytes:
    data = b""
    while chunk := await channel.read():
        data += chunk
    return data


def test_exec_stdin_output_and_exit_status_before_the_last_output() -> None:
    async def script(channel: Channel) -> None:
        channel.accept()
        data = await read_all(channel)
        await channel.write(encode_output(1, data.upper()))
        channel.send_control({"exit": {"code": 3, "signal": None}})
        await channel.write(encode_output(2, b"late")[:3])  # a record cut across DATA frames
        await channel.write(encode_output(2, b"late")[3:])
        channel.write_eof()

    session = Run(script, b"hello\n")
    assert session() == 3
    assert session.output() == (b"HELLO\n", b"late")
    assert session.transport.opened == ("/exec", {"site": "s"})
    assert session.transport.site is not None
    request = session.transport.site.requests[0]
    assert (request.verb, request.args) == ("exec", {"command": "cmd"})


def test_exec_does_not_wait_for_stdin_the_command_never_reads() -> None:
    async def script(channel: Channel) -> None:
        channel.accept()
        await channel.write(encode_output(1, b"quick\n"))
        channel.send_control({"exit": {"code": 0, "signal": None}})
        channel.write_eof()

    session = Run(script, b"typed ahead", close_stdin=False)  # like a terminal nobody types into
    assert session(deadline=5) == 0
    assert session.output() == (b"quick\n", b"")


def test_exec_output_is_written_as_it_arrives() -> None:
    async def script(channel: Channel) -> None:
        channel.accept()
        await channel.write(encode_output(1, b"tick\n"))
        # The run is not over, yet the line must already be on supctl's stdout.
        ready = await asyncio.to_thread(wait_until, lambda: read_some(session.out_r), 5.0, "live output")
        await channel.write(encode_output(1, b"seen " + ready))
        channel.send_control({"exit": {"code": 0, "signal": None}})
        channel.write_eof()

    session = Run(script)
    os.set_blocking(session.out_r, False)
    assert session() == 0
    os.set_blocking(session.out_r, True)
    assert session.output() == (b"seen tick\n", b"")


def test_exec_signal_is_forwarded_and_its_status_becomes_128_plus_n() -> None:
    async def script(channel: Channel) -> None:
        channel.accept()
        await channel.read()  # the session is running: its signal handlers are installed
        os.kill(os.getpid(), signal.SIGINT)
        assert await channel.read_control() == {"signal": "INT"}
        channel.send_control({"exit": {"code": None, "signal": 2}})
        channel.write_eof()

    assert Run(script, b"x")() == 130


def test_exec_second_interrupt_resets_the_stream() -> None:
    seen: list[object] = []

    async def script(channel: Channel) -> None:
        channel.accept()
        await channel.read()
        os.kill(os.getpid(), signal.SIGINT)
        seen.append(await channel.read_control())  # the command ignores it...
        os.kill(os.getpid(), signal.SIGINT)  # ...so the user presses Ctrl-C again
        try:
            await channel.read_control()
        except StreamError as exc:
            seen.append(exc.code)

    assert Run(script, b"x")() == 130
    assert seen[0] == {"signal": "INT"}
    assert seen[1:] == [ErrorCode.CANCEL]


def test_exec_refused_stream_is_one_line() -> None:
    async def script(channel: Channel) -> None:
        channel.reset(ErrorCode.NOT_FOUND, "cannot run /bin/sh in container c: no such file")

    with pytest.raises(StreamError, match=r"^cannot run /bin/sh in container c: no such file$"):
        Run(script)()


def test_exec_eof_without_exit_status() -> None:
    async def script(channel: Channel) -> None:
        channel.accept()
        await channel.write(encode_output(1, b"partial\n"))
        channel.write_eof()

    session = Run(script)
    with pytest.raises(StreamError, match="the remote command ended without an exit status"):
        session()
    assert session.output()[0] == b"partial\n"


def test_exec_link_lost_mid_run() -> None:
    async def script(channel: Channel) -> None:
        channel.accept()
        ws = channel.link.ws
        assert isinstance(ws, MemoryWebSocket)
        ws.drop = True
        await ws.close()

    with pytest.raises(StreamError, match=r"^link lost: connection dropped$") as info:
        Run(script)()
    assert info.value.exit_code == ExitCode.STREAM


def test_exec_malformed_output_is_a_protocol_error() -> None:
    async def script(channel: Channel) -> None:
        channel.accept()
        await channel.write(b"\x07\x00\x00\x00\x01x")  # fd 7
        await asyncio.sleep(5)

    with pytest.raises(ProtocolError, match="malformed exec output"):
        Run(script)()


def test_exec_closed_stdout_exits_like_sigpipe() -> None:
    async def script(channel: Channel) -> None:
        channel.accept()
        while True:
            await channel.write(encode_output(1, b"y\n" * 1000))

    session = Run(script)
    os.close(session.out_r)  # like `supctl ... exec yes | head -1` once head is done
    assert session() == 128 + signal.SIGPIPE
    os.close(session.err_r)


# --- end to end: supctl show against a real tower -------------------------------------------

SITE = "sthlm"
IDLE_SITE = "gbg"
APP = "popcorn"
INVENTORY = f"""
[applications.{APP}.service-instances."popcorn-1".containers.kettle]
[applications.{APP}.service-instances."popcorn-1".containers.popper]
[applications.{APP}.service-instances."popcorn-2"]
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with Stack(tmp_path_factory.mktemp("show")) as stack:
        stack.start_tower()
        stack.add_site(SITE, INVENTORY)
        stack.register_site(IDLE_SITE)
        yield stack


def show(stack: Stack, *args: str) -> str:
    result = stack.supctl("show", *args)
    assert result.returncode == 0, result.stderr
    assert result.stderr == b""
    return result.stdout.decode()


def parsed(stack: Stack, output: str, *args: str) -> Any:
    text = show(stack, "-o", output, *args)
    return yaml.safe_load(text) if output == "yaml" else json.loads(text)


@pytest.mark.parametrize("output", ["yaml", "json"])
def test_show_sites(stack: Stack, output: str) -> None:
    sites = {site["name"]: site for site in parsed(stack, output, "sites")}
    assert sites[SITE]["connected"] is True and sites[SITE]["applications"] == [APP]
    assert sites[SITE]["replica"] == "tower"  # the default [cluster] id
    assert sites[IDLE_SITE] == {
        "name": IDLE_SITE, "connected": False, "version": None, "applications": [], "replica": None
    }  # fmt: skip


@pytest.mark.parametrize("output", ["yaml", "json"])
def test_show_applications_and_instances(stack: Stack, output: str) -> None:
    assert parsed(stack, output, "-s", SITE, "applications") == [
        {"name": APP, "service-instances": ["popcorn-1", "popcorn-2"]}
    ]
    assert parsed(stack, output, "-s", SITE, "applications", APP) == {
        "name": APP,
        "service-instances": ["popcorn-1", "popcorn-2"],
    }
    instances = parsed(stack, output, "-s", SITE, "applications", APP, "service-instances")
    assert [i["name"] for i in instances] == ["popcorn-1", "popcorn-2"]
    assert [c["name"] for c in instances[0]["containers"]] == ["kettle", "popper"]
    one = parsed(stack, output, "-s", SITE, "applications", APP, "service-instances", "popcorn-2")
    assert one["name"] == "popcorn-2" and one["containers"] == []


def test_show_default_output_is_yaml(stack: Stack) -> None:
    assert show(stack, "sites") == show(stack, "-o", "yaml", "sites")


def test_show_takes_its_options_after_the_subcommand_too(stack: Stack) -> None:
    """``show sites -o json`` (kubectl's order) failed with "No such option"."""
    assert show(stack, "sites", "-o", "json") == show(stack, "-o", "json", "sites")
    after = show(stack, "applications", APP, "service-instances", "-s", SITE, "--output", "json")
    assert after == show(stack, "-s", SITE, "-o", "json", "applications", APP, "service-instances")


def test_show_tables(stack: Stack) -> None:
    sites = show(stack, "-o", "table", "sites").splitlines()
    assert sites[0].split() == ["SITE", "CONNECTED", "VERSION", "REPLICA", "APPLICATIONS"]
    assert [line.split()[:2] for line in sites[2:]] == [[IDLE_SITE, "no"], [SITE, "yes"]]
    apps = show(stack, "-s", SITE, "--output", "table", "applications").splitlines()
    assert apps[2].split() == [APP, "popcorn-1,", "popcorn-2"]
    rows = show(stack, "-s", SITE, "-o", "table", "applications", APP, "service-instances").splitlines()
    assert rows[0].split() == ["SERVICE", "INSTANCE", "CONTAINER", "STATE", "PID", "RESTARTS"]
    assert [line.split()[:2] for line in rows[2:]] == [
        ["popcorn-1", "kettle"],
        ["popcorn-1", "popper"],
        ["popcorn-2", "-"],
    ]


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["-s", "nowhere", "applications"], ExitCode.NOT_FOUND, "unknown site 'nowhere'"),
        (["-s", IDLE_SITE, "applications"], ExitCode.UNAVAILABLE, f"site '{IDLE_SITE}' is not connected"),
        (
            ["-s", SITE, "applications", "nope", "service-instances"],
            ExitCode.NOT_FOUND,
            "application 'nope' not found",
        ),
        (
            ["-s", SITE, "applications", APP, "service-instances", "nope"],
            ExitCode.NOT_FOUND,
            "'nope' of application",
        ),
        (["-s", SITE, "applications", APP, "bogus"], ExitCode.USAGE, "expected 'service-instances'"),
    ],
)
def test_show_errors_are_one_line(stack: Stack, args: list[str], code: int, message: str) -> None:
    result = stack.supctl("show", *args)
    assert result.returncode == code
    assert result.stdout == b""
    assert message in one_line_error(result.stderr)


def test_show_bad_token_and_untrusted_tower(stack: Stack) -> None:
    env = {**stack.env, "SUPCTL_TOKEN": "not-a-token"}
    result = stack.supctl("show", "sites", env=env)
    assert result.returncode == ExitCode.DENIED
    assert "invalid API token" in one_line_error(result.stderr)
    env = {k: v for k, v in stack.env.items() if k != "SUPCTL_CA_FILE"}
    result = stack.supctl("show", "sites", env=env)
    assert result.returncode == ExitCode.UNAVAILABLE
    assert "is not trusted" in one_line_error(result.stderr)


# --- end to end: exec, the client's view -------------------------------------------------


def exec_args(command: str, container: str = "kettle") -> list[str]:
    return [
        "do",
        "-s",
        SITE,
        "applications",
        APP,
        "service-instances",
        "popcorn-1",
        "containers",
        container,
        "exec",
        command,
    ]


def test_exec_end_to_end_exit_code_and_streams(stack: Stack) -> None:
    result = stack.supctl(*exec_args("tr a-z A-Z; echo oops >&2; exit 5"), input=b"hello\n")
    assert (result.returncode, result.stdout, result.stderr) == (5, b"HELLO\n", b"oops\n")
    result = stack.supctl(*exec_args("true", container="nope"))
    assert result.returncode == ExitCode.EXEC_FAILED  # not 4: `exec 'exit 4'` exits 4
    assert "container 'nope' not found" in one_line_error(result.stderr)


def test_exec_end_to_end_live_output_and_ctrl_c(stack: Stack) -> None:
    command = "echo ready; while :; do sleep 0.1; done"
    proc = subprocess.Popen(
        [program("supctl"), *exec_args(command)],
        stdin=subprocess.PIPE,  # left open: the command never reads it
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=stack.env,
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        started = time.monotonic()
        assert proc.stdout.readline() == b"ready\n"  # while the command still runs
        assert time.monotonic() - started < 10
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 130
        assert proc.stderr.read() == b""
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
