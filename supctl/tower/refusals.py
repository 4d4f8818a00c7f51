"""A session's refused streams: counted in one place, recorded sparingly, ended when they keep coming.

An OPEN costs a peer about 20 bytes, and refusing it (a stream limit reached, the
site gone, the site refusing it before accepting) must cost the tower about as
little.  Without a bound, 4 MB of OPENs became 168,000 audit records and as many
log lines.  So, per session:

* the first :data:`RECORDED_ONE_BY_ONE` refusals get their own ``stream-closed``
  record (the reason is all there); later ones are counted into one
  ``streams-refused`` record (how many, per close reason, first and last time,
  the last reason) written when the session ends, or at the next refusal once
  :data:`SUMMARY_INTERVAL` seconds have passed since the first one it counts;
* more than ``[limits] refused-streams`` refusals within ``refused-window``
  seconds close the session (``LIMIT``).  A sliding window, not a count per
  session, so a long-lived forward that is refused now and then (a service
  restarting, a burst over ``streams-per-session``) lives on, while a peer that
  ignores refusals is closed within a few of them.  Refusals *in a row* would not
  do: one accepted stream between every 20 refused ones would reset the count.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import audit

#: Refusals of a session recorded one by one, before they are only counted.
RECORDED_ONE_BY_ONE = 3
#: A summary is written at the next refusal once its first refusal is this old (seconds).
SUMMARY_INTERVAL = 60.0


@dataclass(frozen=True)
class Verdict:
    """What to do about one refusal."""

    record: bool  # write its own stream-closed record
    close: str | None  # close the session with LIMIT and this reason


class Refusals:
    def __init__(self, limit: int, window: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.window = window  # 0: never close
        self.clock = clock
        self._recent: deque[float] = deque(maxlen=limit + 1)  # the last limit + 1 refusals
        self.total = 0
        # Counted, not yet in a record.
        self.pending = 0
        self.reasons: Counter[str] = Counter()  # close reason -> count
        self.first = ""
        self.last = ""
        self.last_result = ""
        self._pending_since = 0.0

    def refused(self, close_reason: str, result: str) -> Verdict:
        now = self.clock()
        self.total += 1
        self._recent.append(now)
        close = None
        if self.window and len(self._recent) > self.limit and now - self._recent[0] <= self.window:
            close = f"more than {self.limit} refused streams within {self.window:g} s (refused-streams)"
        if self.total <= RECORDED_ONE_BY_ONE:
            return Verdict(True, close)
        stamp = audit.now_iso()
        if not self.pending:
            self.first = stamp
            self._pending_since = now
        self.pending += 1
        self.reasons[close_reason] += 1
        self.last = stamp
        self.last_result = result
        return Verdict(False, close)

    def summary_due(self) -> bool:
        return bool(self.pending) and self.clock() - self._pending_since >= SUMMARY_INTERVAL

    def take_summary(self) -> dict[str, Any] | None:
        """The fields of a ``streams-refused`` record for what was counted since the last
        one (then forgotten), or None if nothing was."""
        if not self.pending:
            return None
        fields = {
            "count": self.pending,
            "reasons": dict(sorted(self.reasons.items())),
            "first": self.first,
            "last": self.last,
            "result": self.last_result,
        }
        self.pending = 0
        self.reasons = Counter()
        return fields
