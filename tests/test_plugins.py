"""Plugins: the third-party ``supctl_echo`` end to end, and the registration rules in process.

End to end, ``supctl_echo`` (tests/plugin_dist) is installed the way users install
plugins (an entry point in the ``supctl`` group): its ``echo`` verb runs in supctl, its
handler in the enforcer, and the stream crosses the real tower on the generic verb
route, judged by users' policies, the sites' ``allow-verbs`` and audited.  One stack for
the module: a tower, a site serving echo, a site whose local policy refuses it, and a
site whose enforcer lacks the plugin.  In process, plugin managers are built with
:func:`supctl.plugins.make_plugin_manager` plus extra plugins, and the click tree with
:func:`supctl.cli.make_cli`, as the programs do.
"""

from __future__ import annotations

import datetime
import inspect
import re
import subprocess
import sys
import types
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click
import pytest
import supctl_echo
import towerkit
from click.testing import CliRunner
from e2e_support import inventory, wait_until
from stack import Stack, do_args, one_line_error, write_secret

import supctl.enforcer.cli as enforcer_cli
from supctl import hookimpl, hookspecs
from supctl.cli import make_cli
from supctl.client.api import NODES, Invocation
from supctl.client.settings import ClientSettings
from supctl.client.verbs import run_verb
from supctl.enforcer.api import Serves, parse_args
from supctl.enforcer.cli import load_handlers
from supctl.errors import ExitCode, PluginError, StreamError
from supctl.link import Channel
from supctl.plugins import make_plugin_manager
from supctl.protocol import ErrorCode, OpenRequest
from supctl.tower import database
from supctl.tower.database import SQLStore

APP = "popcorn"
INST = "popcorn-1"
SITE = "echo-site"  # serves echo
STRICT = "strict-site"  # has the plugin, but its [policy] allow-verbs does not name echo
BARE = "bare-site"  # its enforcer has not got the plugin
PASSWORD = "a long enough password"
T = TypeVar("T")

POLICIES = """
[[policies.echoers.rules]]
effect = "allow"
verb = "echo"

[[policies.connectors.rules]]
effect = "allow"
verb = "connect"
"""

# An enforcer host without supctl-echo: the same enforcer, minus the plugin's handler
# (the module's hook implementation is gone before the plugin manager collects it).
ENFORCER_WITHOUT_ECHO = (
    "import sys, supctl_echo; del supctl_echo.supctl_add_handlers; "
    "from supctl.enforcer.cli import main; sys.argv[0] = 'edge-enforcer'; main()"
)


# --- end to end ---------------------------------------------------------------------------


@dataclass
class World:
    stack: Stack
    envs: dict[str, dict[str, str]]  # supctl's environment as each user (an API token each)


def administer(stack: Stack, change: Callable[[SQLStore], Coroutine[Any, Any, T]]) -> T:
    """A change to the tower's store as ``control-tower`` makes it (its own connection; the
    running tower sees it at its next request), in process: each ``control-tower``
    command would cost this module's one stack most of a second to start."""

    async def command() -> T:
        store = await database.open(stack.dir / "tower.db")
        try:
            return await change(store)
        finally:
            await store.close()

    return towerkit.run(command())


def add_user(stack: Stack, name: str, policy: str) -> dict[str, str]:
    """A user with ``policy``, and supctl's environment with an API token of theirs."""

    async def add(store: SQLStore) -> str:
        await store.users.add(name, PASSWORD, [policy], now=towerkit.utc_now())
        issued = await store.tokens.add(name, "api", datetime.timedelta(hours=1), now=towerkit.utc_now())
        return issued.token

    token_file = write_secret(stack.root / f"{name}.token", administer(stack, add) + "\n")
    return dict(stack.env, SUPCTL_TOKEN_FILE=str(token_file))


def add_site(stack: Stack, site: str, text: str) -> Path:
    """Register ``site`` and write its token and inventory where :meth:`Stack.start_enforcer`
    looks; return the token file."""
    token = administer(stack, lambda store: store.sites.add(site, now=towerkit.utc_now()))
    (stack.root / f"{site}.toml").write_text(text)
    return write_secret(stack.root / f"{site}.token", token + "\n")


def start_enforcer_without_echo(stack: Stack, site: str) -> None:
    tower = stack.tower
    assert tower is not None
    token_file = add_site(stack, site, inventory(APP, INST))
    before = tower.log.count(rf"site {site} connected")
    proc = stack.spawn(
        f"enforcer-{site}",
        [sys.executable, "-c", ENFORCER_WITHOUT_ECHO, "run", "--tower", stack.url, "--site", site,
         "--token-file", str(token_file), "--ca-file", str(stack.dir / "ca.pem"),
         "--inventory", str(stack.root / f"{site}.toml")],
    )  # fmt: skip

    def connected() -> bool:
        assert proc.popen.poll() is None, proc.log.text()
        return tower.log.count(rf"site {site} connected") > before

    wait_until(connected, 20, f"site {site}")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with Stack(tmp_path_factory.mktemp("plugins")) as stack:
        stack.start_tower()
        (stack.dir / "policies.toml").write_text(POLICIES)
        envs = {"alice": add_user(stack, "alice", "echoers"), "bob": add_user(stack, "bob", "connectors")}
        add_site(stack, SITE, inventory(APP, INST))
        stack.start_enforcer(SITE)
        add_site(stack, STRICT, inventory(APP, INST) + '[policy]\nallow-verbs = ["exec"]\n')
        stack.start_enforcer(STRICT)
        start_enforcer_without_echo(stack, BARE)
        yield World(stack, envs)


def echo(world: World, user: str, site: str, *words: str) -> subprocess.CompletedProcess[bytes]:
    return world.stack.supctl(*do_args(site, APP, INST, "echo", *words), env=world.envs[user])


def test_a_policy_naming_the_verb_allows_it(world: World) -> None:
    # The short target form works for a plugin's verb as for connect (docs/plugins.md's example).
    args = ["do", f"{SITE}/{APP}/{INST}", "echo", "--times", "2", "hello", "world"]
    result = world.stack.supctl(*args, env=world.envs["alice"])
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"HELLO WORLD\nHELLO WORLD\n"  # upper-cased by the site's handler
    assert result.stderr == b""
    # The site announced the plugin's handler by its verb.
    tower = world.stack.tower
    assert tower is not None
    handlers = re.search(rf"site {SITE} connected \(1 applications, handlers ([\w,-]+)\)", tower.log.text())
    assert handlers and "echo" in handlers[1].split(","), tower.log.text()


def test_the_verb_is_audited_with_its_user_and_bytes(world: World) -> None:
    result = echo(world, "alice", SITE, "audited")
    assert result.returncode == 0, result.stderr
    sent = len(b"audited\n")

    def closed(record: dict[str, Any]) -> bool:
        return (record["event"], record["verb"], record["bytes-up"]) == ("stream-closed", "echo", sent)

    records = world.stack.wait_audit(closed, "the echo stream's record")
    record = next(r for r in records if closed(r))
    assert (record["user"], record["site"], record["application"]) == ("alice", SITE, APP), record
    assert (record["service-instance"], record["container"], record["protocol"]) == (INST, None, None), record
    assert (record["bytes-down"], record["result"]) == (sent, "ok"), record
    session = [r for r in records if r["event"] == "session-accepted" and r["session"] == record["session"]]
    assert [(r["verb"], r["user"], r["service-instance"]) for r in session] == [("echo", "alice", INST)]


def test_a_policy_not_naming_the_verb_refuses_it(world: World) -> None:
    result = echo(world, "bob", SITE, "hi")
    assert result.returncode == ExitCode.DENIED
    line = one_line_error(result.stderr)
    assert "policy refuses echo" in line, line
    assert result.stdout == b""
    world.stack.wait_audit(
        lambda r: r["event"] == "session-refused" and r["user"] == "bob" and r["verb"] == "echo",
        "bob's refused echo",
    )


def test_a_site_whose_policy_does_not_allow_the_verb_refuses_it(world: World) -> None:
    result = echo(world, "alice", STRICT, "hi")
    assert result.returncode == ExitCode.DENIED
    line = one_line_error(result.stderr)
    assert line.endswith("the site's local policy refuses verb 'echo' (allow-verbs)"), line
    assert result.stdout == b""
    # The tower let it through (alice's policy allows it) and audited the site's refusal.
    records = world.stack.wait_audit(
        lambda r: (r["event"], r["site"], r["verb"]) == ("stream-closed", STRICT, "echo"),
        "the refused stream",
    )
    record = next(r for r in records if (r["event"], r["site"]) == ("stream-closed", STRICT))
    assert "allow-verbs" in str(record["result"]) and record["user"] == "alice", record


def test_a_site_without_the_plugin_says_so_in_one_line(world: World) -> None:
    result = echo(world, "alice", BARE, "hi")
    assert result.returncode == ExitCode.UNSUPPORTED
    line = one_line_error(result.stderr)
    assert f"verb 'echo' is not supported at site '{BARE}'" in line, line
    # ...and what the site does serve (other plugins may add to it).
    supported = re.search(r"\(supported: ([^)]*)\)$", line)
    assert supported and "exec" in supported[1].split(", ") and "echo" not in supported[1].split(", "), line


def test_third_party_verb_errors_are_one_line(world: World) -> None:
    result = echo(world, "alice", SITE, "--times", "0", "hi")  # refused by the click option
    assert result.returncode == ExitCode.USAGE
    assert "'--times'" in one_line_error(result.stderr)
    result = world.stack.supctl(*do_args(SITE, "no-such-app", INST, "echo", "hi"))
    assert result.returncode == ExitCode.NOT_FOUND
    assert "application 'no-such-app' not found" in one_line_error(result.stderr)


def test_the_site_judges_the_args_it_is_sent(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client other than the click command may send any args of the bounded shape: the
    handler's parse_args refuses what EchoArgs does not take, and the user sees one line."""
    stack = world.stack
    settings = ClientSettings(
        host=stack.url,
        token=Path(world.envs["alice"]["SUPCTL_TOKEN_FILE"]).read_text().strip(),
        ca_file=stack.dir / "ca.pem",
    )
    inv = Invocation(pm=make_plugin_manager(), settings_loader=lambda: settings, site=SITE,
                     application=APP, service_instance=INST)  # fmt: skip

    async def body(channel: Channel) -> None:
        raise AssertionError("the site accepted the stream")

    cases: list[tuple[dict[str, object], str]] = [
        ({"times": 0}, "bad args of verb 'echo': 'times' must be an integer 1-10"),
        ({"times": "3"}, "bad args of verb 'echo': 'times' must be an integer 1-10"),
        ({"colour": "red"}, "bad args of verb 'echo': unknown key 'colour' (known: times)"),
    ]
    for args, text in cases:
        with pytest.raises(StreamError) as info:
            run_verb(inv, "echo", args, body)
        assert (str(info.value), info.value.exit_code) == (text, ExitCode.PROTOCOL)


def test_echo_args_in_process() -> None:
    assert parse_args(supctl_echo.EchoArgs, OpenRequest("echo", args={})).times == 1
    assert parse_args(supctl_echo.EchoArgs, OpenRequest("echo", args={"times": 10})).times == 10
    with pytest.raises(StreamError) as info:
        parse_args(supctl_echo.EchoArgs, OpenRequest("echo", args={"times": 11}))
    assert info.value.code == ErrorCode.PROTOCOL


def test_help_lists_plugin_verbs(world: World) -> None:
    stack = world.stack
    result = stack.supctl(*do_args(SITE, APP, INST, "--help"))
    assert result.returncode == 0, result.stderr
    commands = result.stdout.decode().split("Commands:", 1)[1]
    names = {line.split()[0] for line in commands.splitlines() if line.strip()}
    assert {"echo", "connect", "containers"} <= names
    result = stack.supctl(*do_args(SITE, APP, INST, "echo", "--help"))
    assert result.returncode == 0
    assert "WORDS" in result.stdout.decode() and "--times" in result.stdout.decode()


# --- in process: verbs ------------------------------------------------------------------------


def plugin(name: str, **hooks: Callable[..., Any]) -> types.ModuleType:
    """An in-process plugin named ``name`` implementing ``hooks``."""
    module = types.ModuleType(name)
    for hook_name, function in hooks.items():
        setattr(module, hook_name, hookimpl(function))
    return module


def verbs_plugin(name: str, *verbs: tuple[str, str]) -> types.ModuleType:
    """A plugin adding a trivial verb ``(node, verb)`` for each pair."""

    def supctl_add_verbs(register: Callable[[str, click.Command], None]) -> None:
        for node, verb in verbs:
            register(node, click.Command(verb, callback=lambda: click.echo(f"{name} ran")))

    return plugin(name, supctl_add_verbs=supctl_add_verbs)


def build(*plugins: object) -> click.Group:
    return make_cli(make_plugin_manager(extra_plugins=plugins))


def test_extra_plugin_verbs_are_attached_at_every_node() -> None:
    nodes = [(node, f"verb-at-{node}") for node in NODES]
    cli = build(verbs_plugin("extra", *nodes))
    runner = CliRunner()
    paths = {
        "root": [],
        "do": ["do", "-s", "s"],
        "application": ["do", "-s", "s", "applications", "a"],
        "service-instance": ["do", "-s", "s", "applications", "a", "service-instances", "i"],
        "container": ["do", "-s", "s", "applications", "a", "service-instances", "i", "containers", "c"],
    }
    for node, verb in nodes:
        result = runner.invoke(cli, [*paths[node], verb], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert result.stdout == "extra ran\n"


@pytest.mark.parametrize(
    ("node", "verb", "owner"),
    [("service-instance", "connect", "connect"), ("service-instance", "echo", "echo")],
    ids=["built-in-plugin", "third-party-plugin"],
)
def test_duplicate_verb_names_both_plugins(node: str, verb: str, owner: str) -> None:
    with pytest.raises(PluginError) as info:
        build(verbs_plugin("copycat", (node, verb)))
    message = str(info.value)
    assert f"{verb!r}" in message
    # The first registration (the installed plugin) is named first.
    assert f"is registered twice: by plugin {owner!r} and by plugin 'copycat'" in message
    assert "\n" not in message
    assert info.value.exit_code == ExitCode.USAGE


def test_duplicate_verb_between_two_extra_plugins() -> None:
    with pytest.raises(
        PluginError, match=r"'shell' is registered twice: by plugin 'first' and by plugin 'second'"
    ):
        build(verbs_plugin("first", ("container", "shell")), verbs_plugin("second", ("container", "shell")))


def test_same_verb_name_at_two_nodes_is_fine() -> None:
    cli = build(verbs_plugin("a", ("do", "status")), verbs_plugin("b", ("application", "status")))
    assert "status" in cli.commands["do"].commands  # type: ignore[attr-defined]


def test_verb_at_unknown_node() -> None:
    with pytest.raises(PluginError) as info:
        build(verbs_plugin("lost", ("galaxy", "warp")))
    message = str(info.value)
    assert "'lost'" in message and "'warp'" in message and "unknown node 'galaxy'" in message


@pytest.mark.parametrize(("node", "verb"), [("do", "applications"), ("service-instance", "containers")])
def test_verb_clashing_with_a_built_in_command(node: str, verb: str) -> None:
    with pytest.raises(
        PluginError, match=rf"verb '{verb}' of plugin 'squatter' clashes with a built-in command"
    ):
        build(verbs_plugin("squatter", (node, verb)))


def test_plugin_verb_reads_the_invocation() -> None:
    @click.command("where")
    @click.pass_obj
    def where(inv: Invocation) -> None:
        click.echo(f"{inv.site}/{inv.application}/{inv.service_instance}/{inv.container}")

    def supctl_add_verbs(register: Callable[[str, click.Command], None]) -> None:
        register("container", where)

    cli = build(plugin("where", supctl_add_verbs=supctl_add_verbs))
    args = ["do", "-s", "paris", "applications", "a", "service-instances", "i", "containers", "c", "where"]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.stdout == "paris/a/i/c\n"


# --- in process: enforcer handlers ------------------------------------------------------------


class NullHandler:
    async def handle(self, channel: object, request: object, instance: object, context: object) -> None:
        raise AssertionError("never called")


def handler_plugin(name: str, *declarations: object) -> types.ModuleType:
    def supctl_add_handlers(register: Callable[[object, object], None]) -> None:
        for serves in declarations:
            register(serves, NullHandler())

    return plugin(name, supctl_add_handlers=supctl_add_handlers)


def test_load_handlers_finds_built_in_and_third_party() -> None:
    handlers = load_handlers()
    # Each declares exactly what it serves; the exec handler serves no connect protocol.
    assert set(handlers) >= {Serves("connect", "tcp"), Serves("echo"), Serves("exec")}
    assert all(callable(getattr(h, "handle", None)) for h in handlers.values())


def _load_handlers_with(monkeypatch: pytest.MonkeyPatch, *extra: object) -> dict[Serves, Any]:
    # load_handlers builds its own plugin manager; give it one with extra plugins.
    monkeypatch.setattr(enforcer_cli, "make_plugin_manager", lambda: make_plugin_manager(extra_plugins=extra))
    return load_handlers()


def test_extra_handler_is_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    sctp = Serves("connect", "sctp")
    handlers = _load_handlers_with(monkeypatch, handler_plugin("sctp-plugin", sctp))
    assert isinstance(handlers[sctp], NullHandler)


@pytest.mark.parametrize(("serves", "owner"), [(Serves("connect", "tcp"), "tcp"), (Serves("echo"), "echo")])
def test_duplicate_handler_names_both_plugins(
    monkeypatch: pytest.MonkeyPatch, serves: Serves, owner: str
) -> None:
    with pytest.raises(PluginError) as info:
        _load_handlers_with(monkeypatch, handler_plugin("copycat", serves))
    message = str(info.value)
    assert f"handler for {serves} is registered twice" in message
    assert f"by plugin {owner!r} and by plugin 'copycat'" in message


def test_a_handler_must_declare_what_it_serves(monkeypatch: pytest.MonkeyPatch) -> None:
    # The old register("udp", handler): which verb it serves would be a guess.
    with pytest.raises(PluginError) as info:
        _load_handlers_with(monkeypatch, handler_plugin("vague", "udp"))
    assert str(info.value) == (
        "plugin 'vague' registered a handler for 'udp' without declaring what it serves: "
        "call register(Serves(verb, protocol), handler)"
    )


def test_two_declarations_announced_under_one_name_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # A connect protocol named "exec" would be announced as the exec verb's handler.
    with pytest.raises(PluginError) as info:
        _load_handlers_with(monkeypatch, handler_plugin("sly", Serves("connect", "exec")))
    assert str(info.value) == (
        "handlers for verb 'exec' (plugin 'exec') and connect protocol 'exec' (plugin 'sly') "
        "would both be announced as 'exec'"
    )


@pytest.mark.parametrize(
    ("verb", "protocol", "error"),
    [
        ("connect", "", "a connect handler must name its protocol"),
        ("exec", "tcp", "only connect streams have a protocol"),
        ("ex\nec", "", "a handler must serve a verb name"),
        ("connect", "tcp/2", "a connect handler must name its protocol"),
    ],
)
def test_serves_declarations_are_checked(verb: str, protocol: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        Serves(verb, protocol)


# --- hookspecs --------------------------------------------------------------------------------


def _hookspecs() -> dict[str, Callable[..., Any]]:
    return {
        name: function
        for name, function in vars(hookspecs).items()
        if callable(function) and hasattr(function, "supctl_spec")
    }


def test_every_hook_is_registered_and_known() -> None:
    specs = _hookspecs()
    assert set(specs) == {
        "supctl_add_verbs",
        "supctl_add_connect_protocols",
        "supctl_add_handlers",
        "supctl_add_runtimes",
        "supctl_transport",
        "supctl_listener",
        "supctl_netcat",
    }
    pm = make_plugin_manager()
    assert {name for name in specs if getattr(pm.hook, name, None) is not None} == set(specs)


@pytest.mark.parametrize("name", sorted(_hookspecs()))
def test_hookspec_is_documented(name: str) -> None:
    doc = inspect.getdoc(_hookspecs()[name])
    assert doc, f"{name} has no docstring"
    # When it is called...
    assert re.search(r"^Called (once|when|for|per|each)\b.*\.", doc, re.MULTILINE), doc
    # ...what it returns...
    assert re.search(r"^:return: \S", doc, re.MULTILINE), doc
    # ...and every parameter.
    for param in inspect.signature(_hookspecs()[name]).parameters:
        assert f":param {param}:" in doc, f"{name}: parameter {param} undocumented"
