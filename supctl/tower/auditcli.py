"""``control-tower audit``: print or follow the audit log, read from the store.

Records come out in the order they were written (by row id), as the JSON lines
the tower stored (``--output jsonl``, the default: one object per line with the
keys of docs/audit.md, for ``jq`` or a log shipper) or as a table for people.
``--follow`` polls for rows past the last one printed until interrupted.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from supctl.errors import UsageError
from supctl.output import make_console

from . import audit
from .config import CONFIG_NAME, TowerConfig, load_config

#: Seconds between two polls of ``--follow``.
POLL = 0.25
#: Rows fetched per query (the store caps it at auditlog.MAX_QUERY).
PAGE = 1000
OUTPUTS = ("jsonl", "table")


def store_target(config: TowerConfig) -> str | Path:
    """Where the tower's store is: ``[store] url``, else the SQLite file ``database``."""
    return config.store_url or config.database


async def _read(
    config: TowerConfig,
    criteria: dict[str, Any],
    follow: bool,
    emit: Callable[[str, dict[str, Any]], None],
    poll: float,
) -> None:
    from supctl.tower import database  # SQLAlchemy: only for the commands that use the store

    store = await database.open(store_target(config), password_file=config.store_password_file)
    try:
        after = 0
        while True:
            rows = await store.audit.query(**criteria, after_id=after, limit=PAGE)
            for row in rows:
                emit(row.line, row.record)
            if rows:
                after = rows[-1].id
                if len(rows) == PAGE:
                    continue  # more are there already
            if not follow:
                return
            sys.stdout.flush()
            await asyncio.sleep(poll)  # no deadline: following ends with Ctrl-C
    finally:
        await store.close()


def show_audit(
    config: TowerConfig,
    *,
    follow: bool = False,
    output: str = "jsonl",
    user: str | None = None,
    site: str | None = None,
    event: str | None = None,
    since: str | None = None,
    poll: float = POLL,
) -> None:
    """Print the records that match, as JSON lines (exactly as stored) or a table."""
    from rich.table import Table

    criteria = {
        "user": user,
        "site": site,
        "event": event,
        "since": audit.parse_since(since) if since is not None else None,
    }
    out = make_console(stderr=False, soft_wrap=False)
    if not out.is_terminal:
        out.width = max(out.width, 200)  # a file or a pipe: room for every column

    def new_table(header: bool) -> Table:
        t = Table(show_header=header, box=None, pad_edge=False)
        for name, width, narrowest in audit.TABLE_COLUMNS:
            t.add_column(
                name,
                justify="right" if name in audit.NUMERIC_COLUMNS else "left",
                width=width if follow else None,  # following: one-row tables whose columns line up
                min_width=narrowest,
                overflow="fold",
            )
        return t

    whole = new_table(header=True)

    def emit(line: str, rec: dict[str, Any]) -> None:
        if output == "jsonl":
            sys.stdout.write(line + "\n")
        elif follow:
            row = new_table(header=False)
            row.add_row(*audit.table_row(rec))
            out.print(row)
        else:
            whole.add_row(*audit.table_row(rec))

    try:
        if output == "table" and follow:
            out.print(new_table(header=True))
        asyncio.run(_read(config, criteria, follow, emit, poll))
        if output == "table" and not follow:
            out.print(whole)
        sys.stdout.flush()
    except KeyboardInterrupt:  # the way to stop --follow
        pass
    except BrokenPipeError:  # `control-tower audit | head`: the reader has all it wanted
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush stays quiet


def add_audit_command(group: click.Group) -> None:
    """Add ``audit`` to the ``control-tower`` command group."""

    @group.command("audit")
    @click.option(
        "--config",
        "config_path",
        required=True,
        metavar="FILE",
        type=click.Path(dir_okay=False, path_type=Path),
        help=f"The tower's {CONFIG_NAME}.",
    )
    @click.option("--follow", "-f", is_flag=True, help="Keep printing records as the tower writes them.")
    @click.option("--user", metavar="USER", help="Only records of this user.")
    @click.option("--site", metavar="SITE", help="Only records of this site.")
    @click.option("--event", type=click.Choice(audit.EVENTS), help="Only records of this event.")
    @click.option(
        "--since",
        metavar="ISO|-10m",
        help="Only records from this time on (ISO 8601, or -30s, -10m, -2h, -1d).",
    )
    @click.option(
        "--output",
        "-o",
        type=click.Choice(OUTPUTS),
        help="jsonl (the default): one JSON object per line, as stored; table: for people.",
    )
    @click.option("--table", is_flag=True, help="The same as --output table.")
    def audit_cmd(
        config_path: Path,
        follow: bool,
        user: str | None,
        site: str | None,
        event: str | None,
        since: str | None,
        output: str | None,
        table: bool,
    ) -> None:
        """Print the audit log (JSON lines as stored; fields: docs/audit.md)."""
        if table and output == "jsonl":
            raise UsageError("--table and --output jsonl contradict each other")
        show_audit(
            load_config(config_path),
            follow=follow,
            output="table" if table else output or "jsonl",
            user=user,
            site=site,
            event=event,
            since=since,
        )
