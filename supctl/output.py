"""The one way our programs make a rich console.

Messages carry data we do not control (names, reasons, fingerprints): rich must
not read ``:cd:`` in a fingerprint as an emoji code, nor highlight numbers in
an error line.  Markup in such text is escaped by the caller.
"""

from __future__ import annotations

import logging

from rich.console import Console


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


def setup_logging(level: int) -> None:
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
    handler.setFormatter(OneLineFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])
    logging.getLogger("websockets").setLevel(logging.WARNING)
