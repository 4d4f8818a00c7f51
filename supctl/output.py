"""The one way our programs make a rich console.

Messages carry data we do not control (names, reasons, fingerprints): rich must
not read ``:cd:`` in a fingerprint as an emoji code, nor highlight numbers in
an error line.  Markup in such text is escaped by the caller.
"""

from __future__ import annotations

from rich.console import Console


def make_console(*, stderr: bool = True, soft_wrap: bool = True) -> Console:
    """``soft_wrap``: a message stays one line at any terminal width, so scripts can grep it."""
    return Console(stderr=stderr, highlight=False, emoji=False, soft_wrap=soft_wrap)
