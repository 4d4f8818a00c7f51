"""The one way our programs make a rich console.

Messages carry data we do not control (names, reasons, fingerprints): rich must
not read ``:cd:`` in a fingerprint as an emoji code, nor highlight numbers in
an error line.  Markup in such text is escaped by the caller.
"""

from __future__ import annotations

import datetime
import json
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import click
from rich.console import Console

F = TypeVar("F", bound=Callable[..., Any])

#: ``--log-level`` choices, lowest first.
LOG_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
LOG_FORMATS = ("text", "json")
#: Fields a log call may pass in ``extra=``; the JSON format writes them as keys
#: (the text format has them in its message already).
STRUCTURED_FIELDS = ("site", "user", "accessor", "session", "stream", "reason", "peer", "status", "replica")


def make_console(*, stderr: bool = True, soft_wrap: bool = True) -> Console:
    """``soft_wrap``: a message stays one line at any terminal width, so scripts can grep it."""
    return Console(stderr=stderr, highlight=False, emoji=False, soft_wrap=soft_wrap)


#: Characters that could end or forge a log line, or drive a terminal: C0 and C1 controls,
#: DEL and the Unicode line and paragraph separators.  Each becomes a visible escape.
_UNSAFE = [*range(0x20), 0x7F, *range(0x80, 0xA0), 0x2028, 0x2029]
_ESCAPES = {c: f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}" for c in _UNSAFE}


def escape_controls(text: str) -> str:
    """``text`` with every control character escaped: one record stays one line."""
    return text.translate(_ESCAPES)


class OneLineFormatter(logging.Formatter):
    """Escapes control characters in a record's message and arguments: request-supplied
    text (names, reasons, header values) can never forge a log line, whatever the caller
    logged.  A traceback keeps its own lines (it is ours, not a peer's)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return escape_controls(super().formatMessage(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (UTC, ISO 8601), ``level``, ``logger``,
    ``event`` (the message) and the structured fields of :data:`STRUCTURED_FIELDS`
    the call gave.  JSON's own escaping keeps a request-supplied newline inside its
    string: a peer cannot forge a line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        for name in STRUCTURED_FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["traceback"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def log_options(default_level: str) -> Callable[[F], F]:
    """``--log-level`` and ``--log-format``, the same on every program."""

    def decorate(f: F) -> F:
        f = click.option(
            "--log-format",
            type=click.Choice(LOG_FORMATS),
            default="text",
            show_default=True,
            envvar="SUPCTL_LOG_FORMAT",
            help="text lines, or one JSON object per line (time, level, logger, event, fields).",
        )(f)
        return click.option(
            "--log-level",
            type=click.Choice(list(LOG_LEVELS)),
            default=default_level,
            show_default=True,
            envvar="SUPCTL_LOG_LEVEL",
            help="The least severe log lines written (on stderr).",
        )(f)

    return decorate


def setup_logging(level: int, fmt: str = "text") -> None:
    """Log lines for the long-running programs (tower, enforcer), on stderr.

    The tower writes a line per stream, so a record must be cheap: no caller
    lookup (``_srcfile``), thread or process fields, which the format never
    shows (the optimisation list in the logging HOWTO).
    """
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(OneLineFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    logging.getLogger("websockets").setLevel(logging.WARNING)
