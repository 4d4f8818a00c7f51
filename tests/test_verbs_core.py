"""The core of plugin verbs, in process: what the tower, the site and the client do for a
verb they know nothing about (issue 15; docs/protocol.md, "any other verb").

* the shape of every OPEN's ``args`` (:mod:`supctl.protocol.args`), with hypothesis;
* the tower: the generic route's request (:func:`~supctl.tower.requests.verb_access`)
  judged by the one :func:`~supctl.tower.authorise.authorise`, as a table;
* the site: :class:`~supctl.enforcer.dispatch.Dispatcher` (container, ``allow-verbs``),
  ``configure`` and ``observe``, :func:`~supctl.enforcer.api.parse_args`, and the
  supervisor reading stdout and stderr apart;
* the client: :func:`~supctl.client.verbs.run_verb` with a stand-in transport.

The verbs end to end (real tower, enforcer, containers) are in test_logs_e2e.py and
test_plugins.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
import tomllib
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Annotated, Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from supctl_exec.runtimes import HostRuntime
from test_authorise import PolicySet

from supctl.client.api import Invocation
from supctl.client.verbs import run_verb, verb_path
from supctl.enforcer.api import ContainerEvent, ContainerNews, ContainerOutput, Serves, parse_args
from supctl.enforcer.containers import ContainerSupervisor
from supctl.enforcer.dispatch import Dispatcher, configure_handlers, observers
from supctl.enforcer.inventory import Inventory, parse_inventory
from supctl.errors import ExitCode, NotFoundError, StreamError, SupctlError, UsageError
from supctl.plugins import make_plugin_manager
from supctl.protocol import ErrorCode, FrameError, OpenRequest
from supctl.protocol.args import MAX_ARGS, MAX_DEPTH, MAX_ITEMS, MAX_OPEN, check_args, encode_args
from supctl.schema import Rule, between
from supctl.tower.authorise import Principal, Refusal, Sites, authorise
from supctl.tower.httpapi import Rejection
from supctl.tower.requests import connect_target, exec_access, verb_access
from supctl.tower.route import Access, Route
from supctl.tower.siteinfo import MAX_NAMES, InstanceInfo, SiteInfo

# --- args: one bounded shape, every verb -----------------------------------------------------

KEYS = st.from_regex(r"[A-Za-z0-9_.-]{1,64}", fullmatch=True)
SCALARS = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.floats(allow_nan=False,
          allow_infinity=False) | st.text(max_size=50)  # fmt: skip


def values(levels: int) -> st.SearchStrategy[Any]:
    """JSON values with at most ``levels`` levels of lists and objects."""
    if levels == 0:
        return SCALARS
    inner = values(levels - 1)
    return SCALARS | st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4)


@given(st.dictionaries(KEYS, values(MAX_DEPTH - 1), max_size=6))
def test_args_of_the_shape_cross_every_hop_unchanged(args: dict[str, Any]) -> None:
    assert check_args(args) is args
    raw = OpenRequest("logs", "a", "i", "c", args=args).to_json()
    assert OpenRequest.from_json(raw).args == args
    # The relay between replicas wraps them once more: still within the wire's bound.
    route = Route("logs", "s", "a", "i", container="c", who="alice:1", session="abcd")
    wrapped = OpenRequest.from_json(route.peer_request(args).to_json())
    assert Route.from_peer(wrapped)[1].args == args


def nested(levels: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(levels - 1):
        value = {"x": value}
    return value


@pytest.mark.parametrize(
    ("raw_args", "text"),
    [
        ('{"a b": 1}', "OPEN field args: key 'a b' is not 1-64 of A-Z a-z 0-9 _ . -"),
        (json.dumps({"k" * 65: 1}), "is not 1-64 of"),
        ('{"n": NaN}', "OPEN field args.n: numbers must be finite"),
        ('{"n": 1e999}', "OPEN field args.n: numbers must be finite"),
        (json.dumps({"n": 2**53 + 1}), "OPEN field args.n: integer out of range"),
        (json.dumps({"l": list(range(MAX_ITEMS + 1))}), f"OPEN field args.l: more than {MAX_ITEMS} entries"),
        (json.dumps(nested(MAX_DEPTH + 2)), "nested more than"),
        ('[1, 2]', "OPEN field args must be a JSON object"),
        ('"text"', "OPEN field args must be a JSON object"),
    ],
)  # fmt: skip
def test_args_out_of_shape_are_a_stream_error(raw_args: str, text: str) -> None:
    raw = b'{"verb": "logs", "args": ' + raw_args.encode() + b"}"
    with pytest.raises(FrameError, match=None) as info:
        OpenRequest.from_json(raw)
    assert text in str(info.value) and "\n" not in str(info.value)


def test_an_open_too_long_is_refused_before_it_is_parsed() -> None:
    # Not JSON at all past the bound: only the length was looked at.
    raw = b"{" * (MAX_OPEN + 1)
    with pytest.raises(FrameError, match=rf"OPEN request of {MAX_OPEN + 1} bytes is longer than {MAX_OPEN}"):
        OpenRequest.from_json(raw)


def test_the_client_checks_args_before_sending() -> None:
    assert encode_args({"tail": 10, "follow": True}) == b'{"tail":10,"follow":true}'
    with pytest.raises(ValueError, match=f"more than {MAX_ARGS}"):
        encode_args({"text": "x" * MAX_ARGS})
    with pytest.raises(ValueError, match=r"args.when: bytes is not a JSON value"):
        encode_args({"when": b"\x00"})
    with pytest.raises(ValueError, match="nested more than"):
        encode_args(nested(MAX_DEPTH + 1))


# --- the tower: the generic route, judged as every other ------------------------------------

SITE, APP, INST, BOX = "stockholm-sergel", "popcorn", "popcorn-1", "nginx"
POLICIES = """
[[policies.readers.rules]]
effect = "allow"
site = "stockholm-*"
application = "popcorn"
container = "ng*"
verb = "logs"

[[policies.readers.rules]]
effect = "allow"
site = "stockholm-sergel"
verb = "stats"
"""


INFO = SiteInfo(
    applications={APP: {INST: InstanceInfo(INST, APP, containers={BOX: {}, "redis": {}})}},
    handlers=["exec", "logs", "stats", "tcp"],
)
SITES = Sites({SITE}.__contains__, {SITE: INFO}.get)
READER = Principal("rita", "r1t4r1t4", ("readers",))
ADMIN = Principal.admin("cc3a4a20")


def judged(principal: Principal, access: Access) -> tuple[int, str] | Route:
    verdict = authorise(principal, access, PolicySet(POLICIES), SITES)
    return (verdict.status, verdict.message) if isinstance(verdict, Refusal) else verdict


def logs(container: str = BOX, verb: str = "logs", site: str = SITE) -> Access:
    return verb_access(APP, INST, container, verb, {"site": [site]})


@pytest.mark.parametrize(
    ("name", "principal", "access", "expected"),
    [
        ("a rule naming the verb and the container", READER, logs(), None),
        ("the container glob does not match", READER, logs("redis"),
         (403, f"policy refuses logs in redis at {SITE} for user rita")),
        ("no rule names the verb", READER, logs(verb="exec"),
         (403, f"policy refuses exec in {BOX} at {SITE} for user rita")),
        ("at the instance: a rule naming a container never matches", READER, logs(""),
         (403, f"policy refuses logs in {INST} at {SITE} for user rita")),
        ("a rule without a container allows it at the instance", READER, logs("", "stats"), None),
        ("the container must exist", ADMIN, logs("ngnix"),
         (404, f"container 'ngnix' not found in service instance '{INST}' at site '{SITE}'; did you mean 'nginx'?")),
        ("the site must have the verb's handler", ADMIN, logs(verb="frobnicate"),
         (501, f"verb 'frobnicate' is not supported at site '{SITE}'")),
        ("a connect protocol's name is not a verb", ADMIN, logs(verb="udp"),
         (501, f"verb 'udp' is not supported at site '{SITE}'")),
    ],
)  # fmt: skip
def test_a_plugin_verb_is_judged_as_exec_is(
    name: str, principal: Principal, access: Access, expected: tuple[int, str] | None
) -> None:
    verdict = judged(principal, access)
    if expected is None:
        assert isinstance(verdict, Route), name
        # What was judged is what the site is asked for.
        request = verdict.request({"tail": 1})
        assert (request.verb, request.application, request.service_instance, request.container) == (
            access.verb, APP, INST, access.container,
        )  # fmt: skip
    else:
        assert verdict == expected, name


def test_the_generic_route_refuses_what_has_its_own_endpoint() -> None:
    for verb, text in [("connect", "connect has its own endpoint"), ("show", "show is not a stream")]:
        with pytest.raises(Rejection) as info:
            logs(verb=verb)
        assert info.value.status == 400 and text in str(info.value)
    with pytest.raises(Rejection, match="exec runs in a container"):
        logs("", "exec")
    # exec at a container is the very request of exec's own endpoint: judged the same.
    assert logs(verb="exec") == exec_access(APP, INST, BOX, {"site": [SITE]})


def hello(**fields: Any) -> dict[str, Any]:
    """A HELLO of a site with an nginx container, serving exec, logs and connect tcp."""
    apps = {APP: {"service-instances": {INST: {"containers": [BOX]}}}}
    return {"site": SITE, "handlers": ["exec", "logs", "tcp"], "applications": apps, **fields}


def refusal_at(info: SiteInfo, access: Access) -> tuple[int, str, Any] | None:
    verdict = authorise(ADMIN, access, PolicySet(POLICIES), Sites({SITE}.__contains__, {SITE: info}.get))
    return (verdict.status, verdict.message, verdict.info) if isinstance(verdict, Refusal) else None


def test_the_tower_tells_a_verb_from_a_protocol_by_the_site_s_hello() -> None:
    """A site says which names are verbs and which are connect's protocols: a protocol
    named like one of its verbs (or the reverse) is 501 at the tower, listing what the
    site serves in that place, instead of a stream the site must refuse."""
    info = SiteInfo.parse(hello(verbs=["exec", "logs"], protocols=["tcp"]))
    assert refusal_at(info, logs()) is None
    assert refusal_at(info, connect_target(SITE, APP, INST, "tcp", "80", "")) is None
    assert refusal_at(info, connect_target(SITE, APP, INST, "logs", "80", "")) == (
        501, f"protocol 'logs' is not supported at site '{SITE}'", {"supported": ["tcp"]},
    )  # fmt: skip
    assert refusal_at(info, logs(verb="tcp")) == (
        501, f"verb 'tcp' is not supported at site '{SITE}'", {"supported": ["exec", "logs"]},
    )  # fmt: skip
    # An older enforcer sends one list: any of its names passes here, and the site
    # itself refuses what it does not serve (UNSUPPORTED).
    old = SiteInfo.parse(hello())
    assert (old.verbs, old.protocols) == (None, None)
    assert refusal_at(old, connect_target(SITE, APP, INST, "logs", "80", "")) is None


def test_a_hello_s_lists_of_names_are_bounded() -> None:
    """Hostile: a site (or a thief with its token) sends huge or odd lists of names; the
    tower keeps a bounded list of short strings, and refuses a list that is no list."""
    names = [*(f"h{n}" for n in range(10_000)), 7, {"a": 1}, "x" * 65]
    info = SiteInfo.parse(hello(handlers=["x" * 65, 3, *names], verbs=names, protocols=names))
    for kept in (info.handlers, info.verbs, info.protocols):
        assert kept is not None and 0 < len(kept) <= MAX_NAMES and all(len(n) <= 64 for n in kept)
    for key in ("verbs", "protocols"):
        with pytest.raises(ValueError, match=f"'{key}' must be a list"):
            SiteInfo.parse(hello(**{key: "tcp"}))


def test_the_site_announces_its_verbs_and_protocols_apart() -> None:
    handlers: dict[Serves, Any] = {
        Serves("logs"): Probe(),
        Serves("exec"): Probe(),
        Serves("connect", "tcp"): Probe(),
    }
    dispatcher = Dispatcher(handlers, inventory())
    assert (dispatcher.names, dispatcher.verbs, dispatcher.protocols) == (
        ["exec", "logs", "tcp"], ["exec", "logs"], ["tcp"],
    )  # fmt: skip


# --- the site: dispatch, settings, news ---------------------------------------------------------


class Probe:
    """A plugin's handler: records its settings and what it observed."""

    def __init__(self, refuse: str | None = None) -> None:
        self.settings: Mapping[str, Any] | None = None
        self.news: list[ContainerNews] = []
        self.refuse = refuse

    async def handle(self, *args: Any) -> None:
        raise AssertionError("not run in these tests")

    def configure(self, settings: Mapping[str, Any]) -> None:
        if self.refuse:
            raise UsageError(self.refuse)
        self.settings = settings

    def observe(self, news: ContainerNews) -> None:
        self.news.append(news)


INVENTORY = """
[applications.popcorn.service-instances.popcorn-1.containers.nginx]
[policy]
allow-verbs = ["logs"]
"""


def inventory(text: str = INVENTORY) -> Inventory:
    return parse_inventory(tomllib.loads(text))


def dispatched(request: OpenRequest, text: str = INVENTORY) -> Any:
    """The declaration that serves ``request``, or (code, text) of the site's refusal."""
    handlers: dict[Serves, Any] = {Serves("logs"): Probe(), Serves("stats"): Probe(), Serves("exec"): Probe()}
    try:
        return Dispatcher(handlers, inventory(text)).route(request).serves
    except StreamError as exc:
        return ErrorCode(exc.code), str(exc)


def test_the_site_dispatches_a_verb_by_its_name_under_its_own_policy() -> None:
    assert dispatched(OpenRequest("logs", APP, INST, BOX)) == Serves("logs")
    assert dispatched(OpenRequest("stats", APP, INST)) == (
        ErrorCode.DENIED, "the site's local policy refuses verb 'stats' (allow-verbs)",
    )  # fmt: skip
    # allow-verbs covers exec too; and without allow-verbs every installed verb is served.
    assert dispatched(OpenRequest("exec", APP, INST, BOX, args={"command": "id"}))[0] == ErrorCode.DENIED
    assert dispatched(OpenRequest("stats", APP, INST), INVENTORY.split("[policy]")[0]) == Serves("stats")
    text = INVENTORY.split("[policy]")[0] + "[policy]\nallow-verbs = ['exec']\nallow-exec = false\n"
    assert dispatched(OpenRequest("exec", APP, INST, BOX), text) == (
        ErrorCode.DENIED, "the site's local policy refuses exec",
    )  # fmt: skip


def test_a_compromised_tower_cannot_name_what_the_site_does_not_have() -> None:
    # A container the inventory does not declare: refused before any handler runs.
    assert dispatched(OpenRequest("logs", APP, INST, "sshd")) == (
        ErrorCode.NOT_FOUND, f"container sshd not found in service instance {INST}",
    )  # fmt: skip
    assert dispatched(OpenRequest("logs", APP, "popcorn-9", BOX))[0] == ErrorCode.NOT_FOUND
    assert dispatched(OpenRequest("shell", APP, INST, BOX)) == (
        ErrorCode.UNSUPPORTED, "verb 'shell' is not supported at this site",
    )  # fmt: skip
    # A verb's stream has no port or address, whatever the tower says.
    assert dispatched(OpenRequest("logs", APP, INST, BOX, port=22))[0] == ErrorCode.PROTOCOL
    with pytest.raises(UsageError, match=r"'policy\.allow-verbs' has 'a b', which is not a verb name"):
        inventory("[policy]\nallow-verbs = ['a b']\n")


def test_each_handler_gets_its_own_settings_table() -> None:
    logs_, stats = Probe(), Probe()
    handlers: dict[Serves, Any] = {Serves("logs"): logs_, Serves("stats"): stats}
    configure_handlers(handlers, inventory("[verbs.logs]\nbuffer-bytes = 4096\n"))
    assert (logs_.settings, stats.settings) == ({"buffer-bytes": 4096}, {})
    # A table no installed handler reads is a typo, not a silent no-op.
    with pytest.raises(UsageError) as info:
        configure_handlers(handlers, inventory("[verbs.lgos]\nbuffer-bytes = 1\n"))
    assert str(info.value) == (
        "inventory: [verbs.lgos] has settings, but no installed handler of verb 'lgos' takes any "
        "(installed verbs: logs, stats)"
    )
    # A reload one handler refuses leaves the others on their previous settings too.
    refusing = Probe()
    handlers[Serves("stats")] = refusing
    old = inventory("[verbs.logs]\nbuffer-bytes = 4096\n")
    refusing.refuse = "bad inventory: 'verbs.stats.x' must be 1"
    with pytest.raises(UsageError, match="must be 1"):
        configure_handlers(
            handlers, inventory("[verbs.logs]\nbuffer-bytes = 8192\n[verbs.stats]\nx = 2\n"), old
        )
    assert logs_.settings == {"buffer-bytes": 4096}
    with pytest.raises(UsageError, match=r"'verbs.logs' must be a table"):
        inventory("verbs.logs = 3\n")


def test_a_failing_observer_is_logged_once_and_the_others_go_on(caplog: pytest.LogCaptureFixture) -> None:
    class Broken(Probe):
        def observe(self, news: ContainerNews) -> None:
            raise RuntimeError("plugin bug")

    good = Probe()
    handlers: dict[Serves, Any] = {Serves("broken"): Broken(), Serves("logs"): good, Serves("x"): object()}
    calls = observers(handlers)
    news = ContainerOutput(APP, INST, BOX, 1, b"line", 1.0)
    with caplog.at_level(logging.ERROR, "supctl.enforcer"):
        for observe in calls:
            observe(news)
            observe(news)
    assert good.news == [news, news]
    assert [r.getMessage() for r in caplog.records] == [
        "the handler of verb 'broken' failed to observe container output"
    ]


@dataclass(frozen=True)
class StatsArgs:
    top: Annotated[int, Rule("an integer 1-100", between(1, 100))] = 10
    sort: str = "cpu"
    follow: bool = False


def test_parse_args_gives_the_handler_typed_args_or_one_line() -> None:
    assert parse_args(StatsArgs, OpenRequest("stats", args={"top": 3})) == StatsArgs(3, "cpu", False)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"top": 0}, "bad args of verb 'stats': 'top' must be an integer 1-100"),
        ({"top": True}, "bad args of verb 'stats': 'top' must be an integer 1-100"),
        ({"follow": "yes"}, "bad args of verb 'stats': 'follow' must be true or false"),
        ({"rm": "-rf"}, "bad args of verb 'stats': unknown key 'rm' (known: top, sort, follow)"),
    ]
    for args, text in cases:
        with pytest.raises(StreamError) as info:
            parse_args(StatsArgs, OpenRequest("stats", args=args))
        assert (str(info.value), info.value.code) == (text, ErrorCode.PROTOCOL)


def run(main: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(asyncio.wait_for(main, 30))


async def until(check: Callable[[], bool], deadline: float = 10.0) -> None:
    end = time.monotonic() + deadline
    while not check():
        assert time.monotonic() < end, "timed out"
        await asyncio.sleep(0.01)


def test_the_supervisor_reads_stdout_and_stderr_apart_for_its_observers() -> None:
    probe = Probe()
    text = (
        "[applications.a.service-instances.i.containers.c]\n"
        "command = ['/bin/sh', '-c', 'echo out; echo err >&2; printf tail; exit 3']\n"
    )
    sup = ContainerSupervisor(
        inventory(text),
        {"host": HostRuntime()},
        observers=observers({Serves("logs"): probe}),
        wall_clock=lambda: 1234.5,
        backoff_start=0.01,
    )

    async def main() -> None:
        sup.start()
        await until(
            lambda: sum(isinstance(n, ContainerEvent) and n.event == "exited" for n in probe.news) >= 2
        )
        await sup.stop()

    run(main())
    first_run = probe.news[
        : probe.news.index(next(n for n in probe.news if getattr(n, "event", "") == "exited")) + 1
    ]
    lines = {(n.fd, n.data) for n in first_run if isinstance(n, ContainerOutput)}
    assert lines == {(1, b"out"), (2, b"err"), (1, b"tail")}  # a last line without newline too
    events = [(n.event, n.exit_code, n.restarts) for n in probe.news if isinstance(n, ContainerEvent)]
    assert events[:4] == [("started", None, 0), ("exited", 3, 0), ("started", 3, 1), ("exited", 3, 1)]
    assert events[-1][0] == "stopped" or events[-1][0] == "exited"
    assert all(n.time == 1234.5 and (n.application, n.service_instance, n.container) == ("a", "i", "c")
               for n in probe.news)  # fmt: skip


# --- the client: one call ------------------------------------------------------------------------


class FakeChannel:
    def __init__(self) -> None:
        self.resets: list[tuple[int, str]] = []

    def reset(self, code: int, text: str) -> None:
        self.resets.append((code, text))


class FakeLink:
    def __init__(self, refusal: StreamError | None = None) -> None:
        self.refusal, self.channel, self.closed = refusal, FakeChannel(), False
        self.opened: list[OpenRequest] = []

    async def open_channel(self, request: OpenRequest) -> FakeChannel:
        self.opened.append(request)
        if self.refusal is not None:
            raise self.refusal
        return self.channel

    async def aclose(self) -> None:
        self.closed = True


class FakeTransport:
    def __init__(self, link: FakeLink | None = None, error: SupctlError | None = None) -> None:
        self.link, self.error = link or FakeLink(), error
        self.sessions: list[tuple[str, Mapping[str, Any]]] = []

    async def open_session(self, path: str, query: Mapping[str, Any]) -> FakeLink:
        self.sessions.append((path, query))
        if self.error is not None:
            raise self.error
        return self.link


def invocation(transport: FakeTransport, container: str | None = "web/1") -> Invocation:
    settings: Any = None
    inv = Invocation(
        make_plugin_manager(), lambda: settings, site="s1", application="a p", service_instance="i",
        container=container,
    )  # fmt: skip
    stand_in: Any = transport
    inv.transport = lambda: stand_in  # type: ignore[method-assign]
    return inv


async def answer(channel: Any) -> int:
    return 7


def test_run_verb_opens_the_node_it_was_invoked_at() -> None:
    transport = FakeTransport()
    assert run_verb(invocation(transport), "logs", {"tail": 5}, answer) == 7
    assert transport.sessions == [
        ("/v1/state/applications/a%20p/service-instances/i/containers/web%2F1/verbs/logs", {"site": "s1"})
    ]
    assert transport.link.opened == [OpenRequest("logs", args={"tail": 5})] and transport.link.closed
    assert (
        verb_path(invocation(transport, None), "stats")
        == "/v1/state/applications/a%20p/service-instances/i/verbs/stats"
    )


@pytest.mark.parametrize(
    ("refusal", "exit_code"),
    [
        (StreamError("the site's local policy refuses verb 'logs' (allow-verbs)", code=ErrorCode.DENIED), ExitCode.DENIED),
        (StreamError("verb 'logs' is not supported at this site", code=ErrorCode.UNSUPPORTED), ExitCode.UNSUPPORTED),
        (StreamError("container c not found in service instance i", code=ErrorCode.NOT_FOUND), ExitCode.NOT_FOUND),
        (StreamError("bad args of verb 'logs': 'tail' must be an integer", code=ErrorCode.PROTOCOL), ExitCode.PROTOCOL),
        (StreamError("connection refused", code=ErrorCode.REFUSED), ExitCode.STREAM),
    ],
)  # fmt: skip
def test_a_site_refusal_exits_as_the_tower_s_would(refusal: StreamError, exit_code: ExitCode) -> None:
    with pytest.raises(StreamError) as info:
        run_verb(invocation(FakeTransport(FakeLink(refusal))), "logs", {}, answer)
    assert (str(info.value), info.value.exit_code) == (str(refusal), exit_code)


def test_bad_args_and_an_old_tower_are_one_line_each() -> None:
    transport = FakeTransport()
    with pytest.raises(UsageError, match=r"^logs: args take \d+ bytes as JSON, more than 65536$"):
        run_verb(invocation(transport), "logs", {"x": "y" * MAX_ARGS}, answer)
    assert transport.sessions == []  # nothing was sent
    old = FakeTransport(error=NotFoundError("no such endpoint: /v1/state/applications/a/.../verbs/logs"))
    with pytest.raises(SupctlError) as info:
        run_verb(invocation(old), "logs", {}, answer)
    assert info.value.exit_code == ExitCode.UNSUPPORTED
    assert str(info.value) == "this control tower does not route plugin verbs such as 'logs': upgrade it"


def test_interrupt_code_ends_the_body_and_the_stream() -> None:
    transport = FakeTransport()

    async def follow(channel: Any) -> int:
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the body waits
        await asyncio.Event().wait()
        return 1

    assert run_verb(invocation(transport), "logs", {}, follow, interrupt_code=0) == 0
    assert transport.link.channel.resets == [(ErrorCode.CANCEL, "interrupted")] and transport.link.closed
