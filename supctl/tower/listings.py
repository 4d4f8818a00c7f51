"""``site list``, ``user list`` and ``token list``: a table with headers for people, or
``-o json`` (a JSON array of objects, one per row) for scripts.  Never a token."""

from __future__ import annotations

import datetime
import json
import sys
from collections.abc import Sequence

from rich.table import Table

from supctl.output import escape_controls, make_console

from .database.model import SiteInfo, TokenInfo, UserInfo
from .users import iso

FORMATS = ("table", "json")
Row = dict[str, object]


def _time(moment: datetime.datetime | None) -> str | None:
    return None if moment is None else iso(moment)


def sites(entries: Sequence[SiteInfo]) -> list[Row]:
    return [
        {"name": e.name, "accessor": e.accessor, "created": _time(e.created), "rotated": _time(e.rotated)}
        for e in entries
    ]


def users(entries: Sequence[UserInfo]) -> list[Row]:
    return [{"name": e.name, "policies": list(e.policies), "created": _time(e.created)} for e in entries]


def tokens(entries: Sequence[TokenInfo], now: datetime.datetime) -> list[Row]:
    return [
        {
            "accessor": e.accessor,
            "user": e.user,
            "kind": e.kind,
            "created": _time(e.created),
            "expires": _time(e.expires),
            "revoked": _time(e.revoked),
            "state": e.state(now),
        }
        for e in entries
    ]


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return ",".join(map(str, value)) or "-"
    return escape_controls(str(value))  # names were checked, but a table must stay a table


def show(rows: list[Row], columns: Sequence[str], fmt: str) -> None:
    """Print ``rows`` on stdout: JSON, or a table of ``columns`` (nothing when there are no rows)."""
    if fmt == "json":
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    if not rows:
        return
    out = make_console(stderr=False, soft_wrap=False)
    if not out.is_terminal:
        out.width = max(out.width, 200)  # a file or a pipe: room for every column
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in columns:
        table.add_column(column.upper(), overflow="fold")
    for row in rows:
        table.add_row(*(_cell(row[column]) for column in columns))
    out.print(table)
