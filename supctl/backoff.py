"""Exponential backoff that starts over after a stable run: one rule for the enforcer's
link to the tower and for the restarts of its containers.

Sans-I/O: the caller measures how long its try ran (with its own clock) and sleeps what
:meth:`Backoff.after` tells it, so the rule is tested without a clock or a loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

#: 2**16 times any start is past any cap: counting further only risks an overflow.
MAX_ATTEMPT = 16


@dataclass
class Backoff:
    """``start`` doubling up to ``cap``; a try that ran ``stable_after`` seconds or more
    counts as a success, so the next failure waits ``start`` again.

    ``jitter``: a uniform draw from [0, 1) scaling each delay ("full jitter", so that the
    sites of a restarted tower do not all come back at the same instant), or None for
    the delay itself.
    """

    start: float
    cap: float
    stable_after: float
    jitter: Callable[[], float] | None = None
    attempt: int = 0

    def reset(self) -> None:
        """The next failure waits ``start`` (e.g. a new credential to try at once)."""
        self.attempt = 0

    def after(self, ran_for: float, *, cap: float | None = None) -> float:
        """The delay before the next try, after one that ran ``ran_for`` seconds and failed;
        ``cap`` lowers the cap for this delay only (a failure known to be brief)."""
        if ran_for >= self.stable_after:
            self.attempt = 0
        ceiling = min(self.cap if cap is None else min(cap, self.cap), self.start * (1 << self.attempt))
        self.attempt = min(self.attempt + 1, MAX_ATTEMPT)
        return ceiling * self.jitter() if self.jitter is not None else ceiling
