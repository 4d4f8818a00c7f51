"""Plugins: the third-party ``supctl_echo`` end to end, and the registration rules in process.

End to end, ``supctl_echo`` is installed the way users install plugins (an
entry point in the ``supctl`` group): its verb runs in supctl, its handler in the
enforcer, and the bytes cross the real tower.  In process, plugin managers are
built with :func:`supctl.plugins.make_plugin_manager` plus extra plugins, and
the click tree with :func:`supctl.cli.make_cli`, as the programs do.
"""

from __future__ import annotations

import inspect
import re
import types
from collections.abc import Callable, Iterator
from typing import Any

import click
import pytest
from click.testing import CliRunner
from e2e_support import inventory
from stack import Stack, do_args, one_line_error

import supctl.enforcer.cli as enforcer_cli
from supctl import hookimpl, hookspecs
from supctl.cli import make_cli
from supctl.client.api import NODES, Invocation
from supctl.enforcer.api import Serves
from supctl.enforcer.cli import load_handlers
from supctl.errors import ExitCode, PluginError
from supctl.plugins import make_plugin_manager

APP = "popcorn"
INST = "popcorn-1"
SITE = "echo-site"


# --- end to end ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with Stack(tmp_path_factory.mktemp("plugins")) as stack:
        stack.start_tower()
        stack.add_site(SITE, inventory(APP, INST))
        yield stack


def test_third_party_echo_verb_and_handler_end_to_end(stack: Stack) -> None:
    result = stack.supctl(*do_args(SITE, APP, INST, "echo", "hello", "world"))
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"HELLO WORLD\n"  # upper-cased by the enforcer's handler
    assert result.stderr == b""
    assert stack.tower is not None
    # The site announced the plugin's handler, and the stream really crossed the tower.
    assert re.search(
        rf"site {SITE} connected \(1 applications, handlers echo,exec,tcp,udp\)", stack.tower.log.text()
    )
    stack.tower.log.wait_for(
        rf"stream closed .* instance={INST} verb=connect protocol=echo .*sent=11 received=11"
    )


def test_third_party_verb_errors_are_one_line(stack: Stack) -> None:
    result = stack.supctl(*do_args(SITE, "no-such-app", INST, "echo", "hi"))
    assert result.returncode == ExitCode.NOT_FOUND
    assert "application 'no-such-app' not found" in one_line_error(result.stderr)


def test_help_lists_plugin_verbs(stack: Stack) -> None:
    result = stack.supctl(*do_args(SITE, APP, INST, "--help"))
    assert result.returncode == 0, result.stderr
    commands = result.stdout.decode().split("Commands:", 1)[1]
    names = {line.split()[0] for line in commands.splitlines() if line.strip()}
    assert {"echo", "connect", "containers"} <= names
    result = stack.supctl(*do_args(SITE, APP, INST, "echo", "--help"))
    assert result.returncode == 0
    assert "WORDS" in result.stdout.decode()


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
    assert set(handlers) >= {Serves("connect", "tcp"), Serves("connect", "echo"), Serves("exec")}
    assert all(callable(getattr(h, "handle", None)) for h in handlers.values())


def _load_handlers_with(monkeypatch: pytest.MonkeyPatch, *extra: object) -> dict[Serves, Any]:
    # load_handlers builds its own plugin manager; give it one with extra plugins.
    monkeypatch.setattr(enforcer_cli, "make_plugin_manager", lambda: make_plugin_manager(extra_plugins=extra))
    return load_handlers()


def test_extra_handler_is_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    sctp = Serves("connect", "sctp")
    handlers = _load_handlers_with(monkeypatch, handler_plugin("sctp-plugin", sctp))
    assert isinstance(handlers[sctp], NullHandler)


@pytest.mark.parametrize(("protocol", "owner"), [("tcp", "tcp"), ("echo", "echo")])
def test_duplicate_handler_names_both_plugins(
    monkeypatch: pytest.MonkeyPatch, protocol: str, owner: str
) -> None:
    with pytest.raises(PluginError) as info:
        _load_handlers_with(monkeypatch, handler_plugin("tcp-ng", Serves("connect", protocol)))
    message = str(info.value)
    assert f"handler for connect protocol {protocol!r} is registered twice" in message
    assert f"by plugin {owner!r} and by plugin 'tcp-ng'" in message


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
