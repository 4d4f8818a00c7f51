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
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("websockets").setLevel(logging.WARNING)
