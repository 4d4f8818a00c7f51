"""``supctl show``: sites, applications and service instances as YAML, JSON or a table.

::

    supctl show sites
    supctl show -s SITE applications [APP [service-instances [NAME]]]

The data are the tower's ``GET /v1/state/...`` views (what the sites' enforcers
reported), fetched with :meth:`supctl.client.api.Transport.get`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import click
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from supctl.client.api import Invocation
from supctl.errors import NotFoundError, ProtocolError, UsageError
from supctl.output import make_console

FORMATS = ("yaml", "json", "table")
APPLICATIONS_USAGE = "applications [APP [service-instances [NAME]]]"


@dataclass(frozen=True)
class Target:
    """What to show: ``kind`` is ``sites``, ``applications`` or ``service-instances``;
    ``name`` picks one item of the list (an application or a service instance);
    ``what`` (and ``owner``) name it in the message when it is not found."""

    kind: str
    path: str
    query: dict[str, str]
    name: str | None = None
    what: str = ""
    owner: str = ""


@dataclass
class ShowContext:
    inv: Invocation
    output: str


def applications_target(site: str, args: Sequence[str]) -> Target:
    """Parse ``[APP [service-instances [NAME]]]`` (the words after ``applications``)."""
    if any(not arg for arg in args):
        raise UsageError(f"show {APPLICATIONS_USAGE}: names must not be empty")
    if len(args) > 3:
        raise UsageError(f"show {APPLICATIONS_USAGE}: too many arguments ({' '.join(args)})")
    if len(args) >= 2 and args[1] != "service-instances":
        raise UsageError(
            f"show {APPLICATIONS_USAGE}: expected 'service-instances' after {args[0]!r}, got {args[1]!r}"
        )
    query = {"site": site}
    if not args:
        return Target("applications", "/v1/state/applications", query)
    app = args[0]
    if len(args) == 1:
        return Target("applications", "/v1/state/applications", query, app, "application")
    path = f"/v1/state/applications/{quote(app, safe='')}/service-instances"
    name = args[2] if len(args) == 3 else None
    return Target("service-instances", path, query, name, "service instance", f" of application {app!r}")


def select(target: Target, body: Any) -> Any:
    """The list under ``target.kind`` in the tower's answer, or its item named ``target.name``."""
    items = body.get(target.kind) if isinstance(body, dict) else None
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise ProtocolError(f"unexpected answer from the tower for {target.path}: no {target.kind} list")
    if target.name is None:
        return items
    for item in items:
        if item.get("name") == target.name:
            return item
    site = target.query.get("site", "")
    raise NotFoundError(f"{target.what} {target.name!r}{target.owner} not found at site {site!r}")


# --- rendering -----------------------------------------------------------------


def _cell(value: Any) -> Text:
    """Plain text for a table cell (never rich markup: names are data)."""
    if value is None or value == "":
        return Text("-")
    if isinstance(value, bool):
        return Text("yes" if value else "no")
    if isinstance(value, list):
        return Text(", ".join(str(v) for v in value) or "-")
    return Text(str(value))


def make_table(kind: str, data: Any) -> Table:
    """A table of ``data`` (a list of items, or one item); service instances get one row
    per container."""
    rows: list[dict[str, Any]] = data if isinstance(data, list) else [data]
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    if kind == "sites":
        for header in ("SITE", "CONNECTED", "VERSION", "REPLICA", "APPLICATIONS"):
            table.add_column(header)
        keys = ("name", "connected", "version", "replica", "applications")
        for site in rows:
            table.add_row(*map(_cell, (site.get(k) for k in keys)))
    elif kind == "applications":
        table.add_column("APPLICATION")
        table.add_column("SERVICE INSTANCES")
        for app in rows:
            table.add_row(_cell(app.get("name")), _cell(app.get("service-instances")))
    else:
        for header in ("SERVICE INSTANCE", "CONTAINER", "STATE", "PID", "RESTARTS"):
            table.add_column(header)
        for instance in rows:
            containers = instance.get("containers") or [{}]
            for container in containers:
                table.add_row(
                    _cell(instance.get("name")),
                    *map(_cell, (container.get(k) for k in ("name", "state", "pid", "restarts"))),
                )
    return table


def render(kind: str, data: Any, output: str) -> str:
    """``data`` as YAML or JSON text (tables go through :func:`print_table`)."""
    if output == "json":
        return json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    if output == "yaml":
        import yaml  # only when used: every supctl invocation builds the command tree

        text: str = yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)
        return text
    raise ValueError(f"unknown output format {output!r}")


def print_table(kind: str, data: Any, console: Console | None = None) -> None:
    (console or make_console(stderr=False, soft_wrap=False)).print(make_table(kind, data))


# --- the command ------------------------------------------------------------


def _show(ctx: ShowContext, target: Target) -> None:
    body = asyncio.run(ctx.inv.transport().get(target.path, target.query))
    data = select(target, body)
    if ctx.output == "table":
        print_table(target.kind, data)
    else:
        click.echo(render(target.kind, data, ctx.output), nl=False)


def make_show_command() -> click.Group:
    @click.group("show", context_settings={"help_option_names": ["-h", "--help"]})
    @click.option("-s", "--site", help="The edge site (for applications and service instances).")
    @click.option(
        "-o",
        "--output",
        type=click.Choice(FORMATS),
        default="yaml",
        show_default=True,
        help="Output format.",
    )
    @click.pass_context
    def show(ctx: click.Context, site: str | None, output: str) -> None:
        """Show what the control tower knows of sites, applications and service instances."""
        inv = ctx.find_object(Invocation)
        assert inv is not None
        inv.site = site
        ctx.obj = ShowContext(inv, output)

    # -s and -o are accepted after the subcommand as well (show sites -o json), as kubectl does.
    after = [
        click.option("-s", "--site", "site_after", help="The edge site (as before the subcommand)."),
        click.option("-o", "--output", "output_after", type=click.Choice(FORMATS), help="Output format."),
    ]

    def _late(ctx: ShowContext, site: str | None, output: str | None) -> ShowContext:
        if site is not None:
            ctx.inv.site = site
        return ShowContext(ctx.inv, output) if output is not None else ctx

    @show.command("sites")
    @after[0]
    @after[1]
    @click.pass_obj
    def sites(ctx: ShowContext, site_after: str | None, output_after: str | None) -> None:
        """The registered sites: connected or not, version, the replica holding each, applications."""
        _show(_late(ctx, site_after, output_after), Target("sites", "/v1/state/sites", {}))

    @show.command("applications")
    @click.argument("args", nargs=-1, metavar="[APP [service-instances [NAME]]]")
    @after[0]
    @after[1]
    @click.pass_obj
    def applications(
        ctx: ShowContext, args: tuple[str, ...], site_after: str | None, output_after: str | None
    ) -> None:
        """The applications at the site, one application, or its service instances
        (with their containers' state, pid and restarts)."""
        ctx = _late(ctx, site_after, output_after)
        if not ctx.inv.site:
            raise UsageError(f"no site given: use supctl show -s SITE {APPLICATIONS_USAGE}")
        _show(ctx, applications_target(ctx.inv.site, args))

    return show
