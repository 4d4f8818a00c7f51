"""The ``supctl`` command: a click tree built per invocation from the plugins.

The tree mirrors the platform's object model::

    supctl do -s SITE applications APP service-instances INSTANCE containers CONTAINER VERB ...

Verbs hang at a node of that tree; plugins add them through ``supctl_add_verbs``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import click
import pluggy
from click.core import ParameterSource
from rich.markup import escape

from .client.api import NODES, Invocation
from .client.settings import resolve
from .errors import ExitCode, PluginError, SupctlError
from .output import make_console
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


def _attach(group: click.Group, registry: Registry[click.Command]) -> click.Group:
    for name, command in sorted(registry.items.items()):
        if name in group.commands:
            raise PluginError(
                f"verb {name!r} of plugin {registry.owners[name]!r} clashes with a built-in command"
            )
        group.add_command(command, name)
    return group


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
    ) -> None:
        """Reach services running on edge sites as if they were local."""
        source = ctx.get_parameter_source
        if token and source("token") is ParameterSource.COMMANDLINE:
            # Once per invocation (the root callback runs once); never the token itself.
            make_console().print(
                "[yellow]warning: --token is visible to other users in ps;"
                " prefer --token-file or SUPCTL_TOKEN[/]",
                soft_wrap=True,
                markup=True,
            )
        if (
            source("token_file") is ParameterSource.COMMANDLINE
            and source("token") is not ParameterSource.COMMANDLINE
        ):
            token = None  # --token-file outranks SUPCTL_TOKEN: options beat the environment
        origins = (
            "--token" if source("token") is ParameterSource.COMMANDLINE else "SUPCTL_TOKEN",
            "--token-file" if source("token_file") is ParameterSource.COMMANDLINE else "SUPCTL_TOKEN_FILE",
        )
        ctx.obj = Invocation(
            pm=pm,
            settings_loader=lambda: resolve(
                host=host,
                token=token,
                token_file=token_file,
                ca_file=ca_file,
                config=config,
                tower_fingerprint=tower_fingerprint,
                origins=origins,
            ),
        )

    @root.group("do", context_settings=CONTEXT_SETTINGS)
    @click.option("-s", "--site", help="The edge site to act on.")
    @click.pass_obj
    def do(inv: Invocation, site: str | None) -> None:
        """Act on objects at a site."""
        inv.site = site

    @do.group("applications", context_settings=CONTEXT_SETTINGS)
    @click.argument("application")
    @click.pass_obj
    def applications(inv: Invocation, application: str) -> None:
        """An application deployed at the site."""
        inv.application = application

    @applications.group("service-instances", context_settings=CONTEXT_SETTINGS)
    @click.argument("service_instance", metavar="INSTANCE")
    @click.pass_obj
    def service_instances(inv: Invocation, service_instance: str) -> None:
        """A service instance of the application (its containers share one network namespace)."""
        inv.service_instance = service_instance

    @service_instances.group("containers", context_settings=CONTEXT_SETTINGS)
    @click.argument("container")
    @click.pass_obj
    def containers(inv: Invocation, container: str) -> None:
        """A container of the service instance."""
        inv.container = container

    _attach(root, verbs["root"])
    _attach(do, verbs["do"])
    _attach(applications, verbs["application"])
    _attach(service_instances, verbs["service-instance"])
    _attach(containers, verbs["container"])
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
    sys.exit(run())
