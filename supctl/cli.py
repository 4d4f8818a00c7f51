"""The ``supctl`` command: a click tree built per invocation from the plugins.

The tree mirrors the platform's object model::

    supctl do -s SITE applications APP service-instances INSTANCE containers CONTAINER VERB ...

Verbs hang at a node of that tree; plugins add them through ``supctl_add_verbs``.
The verbs of a service instance and of a container are reachable right under ``do``
too, their target given as ``SITE/APP/INSTANCE[/CONTAINER]`` or by the defaults
(:mod:`supctl.client.target`)::

    supctl do ux-lab/web/web-1 connect tcp 443 --bind 8443
    supctl do connect tcp 443 --bind 8443        # SUPCTL_SITE... or a context set
"""

from __future__ import annotations

import copy
import functools
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import click
import pluggy
from click.core import ParameterSource
from click.shell_completion import CompletionItem
from rich.markup import escape

from .client.api import NODES, Invocation
from .client.completion import COMPLETE_VAR, TowerNames, compact_items, make_completion_command, quietly
from .client.configcmd import CONFIG_KEY, CONTEXT_KEY, make_config_command
from .client.settings import ClientSettings, resolve
from .client.target import Compact, fill, looks_compact, parse_compact
from .errors import ExitCode, PluginError, SupctlError, UsageError
from .output import LOG_LEVELS, log_options, make_console, setup_logging
from .plugins import Registry, call_registration, make_plugin_manager
from .version import version_option

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def collect_verbs(pm: pluggy.PluginManager) -> dict[str, Registry[click.Command]]:
    verbs: dict[str, Registry[click.Command]] = {node: Registry(f"verb at node {node!r}") for node in NODES}

    def make_register(plugin: str):  # type: ignore[no-untyped-def]
        def register(node: str, command: click.Command) -> None:
            if node not in verbs:
                raise PluginError(f"plugin {plugin!r} adds verb {command.name!r} at unknown node {node!r}")
            verbs[node].add(command.name or "", command, plugin)

        return register

    call_registration(pm, "supctl_add_verbs", make_register)
    return verbs


#: ctx.meta key of the compact target given after ``do``.
COMPACT_KEY = "supctl.compact"
#: The verbs that take a target, deepest node first where a name is at both.
TARGET_NODES = ("service-instance", "container")


def _attach(group: click.Group, registry: Registry[click.Command]) -> click.Group:
    for name, command in sorted(registry.items.items()):
        if name in group.commands:
            raise PluginError(
                f"verb {name!r} of plugin {registry.owners[name]!r} clashes with a built-in command"
            )
        group.add_command(command, name)
    return group


def with_target(node: str, command: click.Command) -> click.Command:
    """``command`` (a verb at ``node``) that first completes the Invocation's target from the
    compact target and the defaults, so the verb finds it there as after the long form."""
    callback = command.callback
    if callback is None:
        return command

    @functools.wraps(callback)
    def run(*args: Any, **kwargs: Any) -> Any:
        ctx = click.get_current_context()
        inv = ctx.find_object(Invocation)
        assert inv is not None
        current = {
            "site": inv.site,
            "application": inv.application,
            "service-instance": inv.service_instance,
            "container": inv.container,
        }
        compact: Compact | None = ctx.meta.get(COMPACT_KEY)
        if compact is None and current["service-instance"]:
            # The long form: only the site may be left out; without a default the verb says
            # so itself, as before (exec's own 255).
            if not inv.site and "site" in (defaults := inv.settings.defaults):
                inv.site = defaults["site"][0]
        else:
            target = fill(current, node, compact, inv.settings.defaults, command.name or "")
            inv.site, inv.application = target["site"], target["application"]
            inv.service_instance = target["service-instance"]
            inv.container = target.get("container")
        return callback(*args, **kwargs)

    clone = copy.copy(command)
    clone.callback = run
    return clone


class DoGroup(click.Group):
    """``do``: its own commands, and the verbs of service instances and containers, whose
    target is a compact ``SITE/APP/INSTANCE[/CONTAINER]`` before the verb, or the defaults."""

    def __init__(self, *args: Any, pm: pluggy.PluginManager, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pm = pm
        self.deep: dict[str, dict[str, click.Command]] = {node: {} for node in TARGET_NODES}

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        own = super().get_command(ctx, cmd_name)
        if own is not None:
            return own
        compact: Compact | None = ctx.meta.get(COMPACT_KEY)
        order = reversed(TARGET_NODES) if compact is not None and len(compact.parts) == 4 else TARGET_NODES
        return next((self.deep[node][cmd_name] for node in order if cmd_name in self.deep[node]), None)

    def list_commands(self, ctx: click.Context) -> list[str]:
        deep = {name for verbs in self.deep.values() for name in verbs}
        return sorted(set(super().list_commands(ctx)) | deep)

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        if not looks_compact(args[0]):
            return super().resolve_command(ctx, args)
        try:
            compact = parse_compact(args[0])
        except UsageError:
            if ctx.resilient_parsing:  # completing: a half-typed target completes nothing
                return None, None, []
            raise
        ctx.meta[COMPACT_KEY] = compact
        if len(args) == 1:
            if ctx.resilient_parsing:
                return None, None, []
            raise UsageError(
                f"the target {compact.text} needs a verb after it, e.g. connect tcp PORT or exec 'ls'"
            )
        name, command, rest = super().resolve_command(ctx, args[1:])
        if name in self.commands:
            raise UsageError(
                f"{name} takes no target: give supctl do {name} ... without {compact.text}"
                " (a target goes before a verb of a service instance or container)"
            )
        return name, command, rest

    def shell_complete(self, ctx: click.Context, incomplete: str) -> list[CompletionItem]:
        if looks_compact(incomplete):
            return compact_items(names_for(ctx, self.pm), incomplete)
        found = super().shell_complete(ctx, incomplete)
        if ctx.meta.get(COMPACT_KEY) is None and not incomplete.startswith("-"):
            found += compact_items(names_for(ctx, self.pm), incomplete)
        return found


def settings_loader(ctx: click.Context) -> Callable[[], ClientSettings]:
    """How to resolve the settings the root command's options give (also while completing,
    when no callback has run)."""
    root = ctx.find_root()
    params = root.params
    source = root.get_parameter_source

    def given(name: str, option: str, env: str) -> str:
        return option if source(name) is ParameterSource.COMMANDLINE else env

    token = params.get("token")
    if (
        source("token_file") is ParameterSource.COMMANDLINE
        and source("token") is not ParameterSource.COMMANDLINE
    ):
        token = None  # --token-file outranks SUPCTL_TOKEN: options beat the environment
    return lambda: resolve(
        host=params.get("host"),
        token=token,
        token_file=params.get("token_file"),
        ca_file=params.get("ca_file"),
        config=params.get("config"),
        tower_fingerprint=params.get("tower_fingerprint"),
        origins=(
            given("token", "--token", "SUPCTL_TOKEN"),
            given("token_file", "--token-file", "SUPCTL_TOKEN_FILE"),
        ),
        context=(params.get("context"), given("context", "--context", "SUPCTL_CONTEXT")),
        sources={
            "host": given("host", "--host", "SUPCTL_HOST"),
            "ca-file": given("ca_file", "--ca-file", "SUPCTL_CA_FILE"),
            "tower-fingerprint": given(
                "tower_fingerprint", "--tower-fingerprint", "SUPCTL_TOWER_FINGERPRINT"
            ),
        },
    )


def names_for(ctx: click.Context, pm: pluggy.PluginManager) -> TowerNames:
    """The tower's names, with the settings of the command line being completed."""
    load = settings_loader(ctx)

    def transport() -> Any:
        return Invocation(pm=pm, settings_loader=load).transport()

    return TowerNames(transport)


def _complete(
    level: str, pm: pluggy.PluginManager
) -> Callable[[click.Context, click.Parameter, str], list[CompletionItem]]:
    """Completes the name of ``level`` from the tower, above it the path typed so far (or the
    defaults: the site of ``applications APP`` may come from SUPCTL_SITE)."""
    above = {"site": (), "application": ("site",), "service-instance": ("site", "application")}
    above["container"] = (*above["service-instance"], "service_instance")

    def complete(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
        def fetch() -> list[str]:
            parts = []
            defaults = None
            for name in above[level]:
                value = next((c.params.get(name) for c in _chain(ctx) if c.params.get(name)), None)
                if value is None:
                    defaults = defaults or settings_loader(ctx)().defaults
                    value = defaults[name.replace("_", "-")][0]
                parts.append(value)
            return names_for(ctx, pm).below(parts)

        return [CompletionItem(name) for name in quietly(fetch) if name.startswith(incomplete)]

    return complete


def _chain(ctx: click.Context) -> list[click.Context]:
    found = []
    current: click.Context | None = ctx
    while current is not None:
        found.append(current)
        current = current.parent
    return found


def make_cli(pm: pluggy.PluginManager | None = None) -> click.Group:
    """Build the whole click tree for one invocation."""
    pm = pm if pm is not None else make_plugin_manager()
    verbs = collect_verbs(pm)

    @click.group(context_settings=CONTEXT_SETTINGS)
    @click.option("--host", envvar="SUPCTL_HOST", help="Control tower URL, e.g. wss://tower.example:4646.")
    @click.option(
        "--token",
        envvar="SUPCTL_TOKEN",
        help="API token (prefer --token-file or SUPCTL_TOKEN: argv is public).",
    )
    @click.option("--token-file", envvar="SUPCTL_TOKEN_FILE", help="File holding the API token.")
    @click.option("--ca-file", envvar="SUPCTL_CA_FILE", help="CA certificate(s) to trust for the tower.")
    @click.option(
        "--tower-fingerprint",
        envvar="SUPCTL_TOWER_FINGERPRINT",
        metavar="SHA256",
        help="Trust only the tower certificate with this SHA-256 fingerprint (no CA or hostname check).",
    )
    @click.option("--config", "config", help="Config file (default ~/.config/supctl/config.toml).")
    @click.option(
        "--context",
        envvar="SUPCTL_CONTEXT",
        metavar="NAME",
        help="Use this context of the config file instead of its current-context.",
    )
    @log_options("warning")
    @version_option("supctl")
    @click.pass_context
    def root(
        ctx: click.Context,
        host: str | None,
        token: str | None,
        token_file: str | None,
        ca_file: str | None,
        tower_fingerprint: str | None,
        config: str | None,
        context: str | None,
        log_level: str,
        log_format: str,
    ) -> None:
        """Reach services running on edge sites as if they were local."""
        source = ctx.get_parameter_source
        if {source("log_level"), source("log_format")} != {ParameterSource.DEFAULT}:
            # Asked for: supctl's own log lines (links, reconnects) formatted as the servers'.
            # Not by default, so that a user's stderr stays the one-line messages.
            setup_logging(LOG_LEVELS[log_level], log_format)
        if token and source("token") is ParameterSource.COMMANDLINE:
            # Once per invocation (the root callback runs once); never the token itself.
            make_console().print(
                "[yellow]warning: --token is visible to other users in ps;"
                " prefer --token-file or SUPCTL_TOKEN[/]",
                soft_wrap=True,
                markup=True,
            )
        ctx.meta[CONFIG_KEY] = config
        ctx.meta[CONTEXT_KEY] = (
            context,
            "--context" if source("context") is ParameterSource.COMMANDLINE else "SUPCTL_CONTEXT",
        )
        ctx.obj = Invocation(pm=pm, settings_loader=settings_loader(ctx))

    @root.group(
        "do",
        cls=DoGroup,
        pm=pm,
        context_settings=CONTEXT_SETTINGS,
        subcommand_metavar="[SITE/APP/INSTANCE[/CONTAINER]] COMMAND [ARGS]...",
    )
    @click.option("-s", "--site", help="The edge site to act on.", shell_complete=_complete("site", pm))
    @click.pass_obj
    def do(inv: Invocation, site: str | None) -> None:
        """Act on objects at a site.

        The verbs of a service instance (connect) and of a container (exec) may follow do
        directly: their target is SITE/APP/INSTANCE[/CONTAINER] before the verb, or the
        defaults (SUPCTL_SITE, ..., a context: see supctl config view).
        """
        inv.site = site

    @do.group("applications", context_settings=CONTEXT_SETTINGS)
    @click.argument("application", shell_complete=_complete("application", pm))
    @click.pass_obj
    def applications(inv: Invocation, application: str) -> None:
        """An application deployed at the site."""
        inv.application = application

    @applications.group("service-instances", context_settings=CONTEXT_SETTINGS)
    @click.argument("service_instance", metavar="INSTANCE", shell_complete=_complete("service-instance", pm))
    @click.pass_obj
    def service_instances(inv: Invocation, service_instance: str) -> None:
        """A service instance of the application (its containers share one network namespace)."""
        inv.service_instance = service_instance

    @service_instances.group("containers", context_settings=CONTEXT_SETTINGS)
    @click.argument("container", shell_complete=_complete("container", pm))
    @click.pass_obj
    def containers(inv: Invocation, container: str) -> None:
        """A container of the service instance."""
        inv.container = container

    root.add_command(make_config_command())
    root.add_command(make_completion_command())
    _attach(root, verbs["root"])
    _attach(do, verbs["do"])
    _attach(applications, verbs["application"])
    for node, group in (("service-instance", service_instances), ("container", containers)):
        registry = verbs[node]
        registry.items = {name: with_target(node, command) for name, command in registry.items.items()}
        _attach(group, registry)
        assert isinstance(do, DoGroup)
        do.deep[node] = dict(registry.items)
    return root


def fail(message: str, code: int) -> int:
    make_console().print(f"[bold red]supctl: error:[/] {escape(message)}", markup=True)
    return code


def run(argv: Sequence[str] | None = None) -> int:
    """Run supctl and return its exit code; every failure becomes one line."""
    try:
        cli = make_cli()
        result = cli.main(
            args=list(argv) if argv is not None else None, prog_name="supctl", standalone_mode=False
        )
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.exceptions.Abort:
        return fail("aborted", 130)
    except click.ClickException as exc:
        message = exc.format_message().replace("\n", " ")
        context = getattr(exc, "ctx", None)
        if context is not None:
            message += f" (see '{context.command_path} --help')"
        return fail(message, ExitCode.USAGE if exc.exit_code == 2 else exc.exit_code)
    except SupctlError as exc:
        return fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        return 130
    return int(result) if isinstance(result, int) else 0


def main() -> None:
    if os.environ.get(COMPLETE_VAR):
        # A TAB: completion abandons a tower request that takes too long (completion.quietly),
        # and the worker thread it left must not hold the exit up until its own timeout.
        # Nothing needs cleaning up here: no file is written, no session opened.
        try:
            code = run()
        except SystemExit as exc:  # click's completion ends with sys.exit
            code = exc.code if isinstance(exc.code, int) else 0
        sys.stdout.flush()
        os._exit(code)
    sys.exit(run())
