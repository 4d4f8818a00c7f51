"""``supctl config``: the contexts of ``config.toml`` and what is in force, from where.

::

    supctl config use-context NAME      # sets current-context in the config file
    supctl config get-contexts [-o json]
    supctl config current-context
    supctl config view [-o json]        # every setting, its value and its origin

No command prints a token: ``***`` stands for it, and its origin names the file it came from.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import click
from rich.text import Text

from ..errors import SupctlError
from ..output import make_console
from ..tlspin import format_fingerprint
from .api import Invocation
from .contexts import use_context
from .settings import Context, config_path, read_config
from .target import LEVELS

#: ctx.meta keys the root command fills: the --config value and the (--context, origin) choice.
CONFIG_KEY = "supctl.config"
CONTEXT_KEY = "supctl.context"

_SETTINGS = {"help_option_names": ["-h", "--help"]}
_OUTPUT = click.option(
    "-o", "--output", type=click.Choice(("text", "json")), default="text", show_default=True
)


def _target(entry: Context) -> str:
    parts = [entry.site, entry.application, entry.service_instance, entry.container]
    while parts and parts[-1] is None:
        parts.pop()
    return "/".join(p or "-" for p in parts) or "-"


def _credential(entry: Context) -> str:
    if entry.token is not None:
        return "token ***"
    return f"token-file {entry.token_file}" if entry.token_file is not None else "-"


def _print(rows: Sequence[tuple[str, ...]], headers: tuple[str, ...]) -> None:
    """Aligned columns, as kubectl prints them: plain text, never cut or wrapped."""
    table = [headers, *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(headers))]
    for row in table:
        click.echo("   ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def view_rows(inv: Invocation) -> list[tuple[str, str, str]]:
    """(setting, value, origin) of everything in force; the token is ``***``."""
    s = inv.settings
    o = s.origins
    config = click.get_current_context().meta.get(CONFIG_KEY)
    rows = [
        ("config", str(s.config_path), "--config" if config else "default"),
        ("context", s.context or "-", o.get("context", "none")),
        ("host", s.host, o.get("host", "default")),
        ("token", "***" if s.token else "-", o.get("token", "none")),
        ("ca-file", str(s.ca_file or "-"), o.get("ca-file", "default")),
        (
            "tower-fingerprint",
            format_fingerprint(s.tower_fingerprint) if s.tower_fingerprint else "-",
            o.get("tower-fingerprint", "default"),
        ),
        ("keepalive", "off" if s.keepalive is None else f"{s.keepalive:g}", o.get("keepalive", "default")),
    ]
    for level in LEVELS:
        value, origin = s.defaults.get(level, ("-", "none"))
        rows.append((level, value, origin))
    return rows


def make_config_command() -> click.Group:
    @click.group("config", context_settings=_SETTINGS)
    def config() -> None:
        """Contexts (a tower, its credentials and a default target) and the settings in force."""

    @config.command("use-context")
    @click.argument("name")
    @click.pass_context
    def use(ctx: click.Context, name: str) -> None:
        """Make NAME the current context (current-context in the config file)."""
        path = config_path(ctx.meta.get(CONFIG_KEY))
        use_context(path, name)
        make_console().print(Text(f"current context is now {name!r} ({path})"))

    @config.command("current-context")
    @click.pass_context
    def current(ctx: click.Context) -> None:
        """Print the name of the context in use (--context, SUPCTL_CONTEXT or current-context)."""
        name, _ = _chosen(ctx)
        if not name:
            raise SupctlError("no context in use: choose one with supctl config use-context NAME")
        click.echo(name)

    @config.command("get-contexts")
    @_OUTPUT
    @click.pass_context
    def get_contexts(ctx: click.Context, output: str) -> None:
        """List the contexts of the config file; the one in use is marked in the CURRENT column."""
        path = config_path(ctx.meta.get(CONFIG_KEY))
        file = read_config(path, explicit=ctx.meta.get(CONFIG_KEY) is not None)
        chosen, _ = _chosen(ctx)
        names = sorted(file.contexts)
        if output == "json":
            items: list[dict[str, Any]] = [
                {
                    "name": name,
                    "current": name == chosen,
                    "host": file.contexts[name].host,
                    "target": {
                        level: getattr(file.contexts[name], level.replace("-", "_")) for level in LEVELS
                    },
                    "credential": _credential(file.contexts[name]),
                }
                for name in names
            ]
            click.echo(json.dumps(items, indent=2))
            return
        rows = [
            (
                "*" if name == chosen else "",
                name,
                file.contexts[name].host or "-",
                _target(file.contexts[name]),
                _credential(file.contexts[name]),
            )
            for name in names
        ]
        _print(rows, ("CURRENT", "NAME", "HOST", "TARGET", "CREDENTIAL"))

    @config.command("view")
    @_OUTPUT
    @click.pass_obj
    def view(inv: Invocation, output: str) -> None:
        """Every setting in force, its value and where it came from (never a token)."""
        rows = view_rows(inv)
        if output == "json":
            data = {key: {"value": value, "from": origin} for key, value, origin in rows}
            click.echo(json.dumps(data, indent=2))
        else:
            _print(rows, ("SETTING", "VALUE", "FROM"))

    return config


def _chosen(ctx: click.Context) -> tuple[str | None, str]:
    """The context in use, by name (unchecked), and where the choice came from."""
    name, origin = ctx.meta.get(CONTEXT_KEY) or (None, "")
    if name:
        return name, origin
    path = config_path(ctx.meta.get(CONFIG_KEY))
    file = read_config(path, explicit=ctx.meta.get(CONFIG_KEY) is not None)
    return file.current_context, f"current-context in {path}"
