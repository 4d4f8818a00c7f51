"""Log lines a peer can cause, rate-limited: a flood costs a few lines, not one per request.

A hostile peer that makes the tower refuse 10,000 requests a second must not turn
each refusal into a log line (46 MB of log, and the time to write it, on the event
loop that relays everyone's streams).  :class:`RateLimitedLog` lets through at most
``burst`` lines at once and ``rate`` a second per key (the key names the kind of
message and whom it is about, so one noisy peer does not silence the others), and
at most ``total_burst`` / ``total_rate`` over all keys.  What it drops it counts;
the next line of that key says ``(N similar messages suppressed)``, and
:meth:`RateLimitedLog.flush` (called periodically) reports counts whose key went
quiet.  The audit log, not this, is the complete record.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable

from .ratelimit import MAX_KEYS, Buckets

#: Defaults: 20 lines at once then 2 a second per key; 100 then 10 a second in all.
BURST = 20
RATE = 2.0
TOTAL_BURST = 100
TOTAL_RATE = 10.0


class RateLimitedLog:
    def __init__(
        self,
        logger: logging.Logger,
        *,
        burst: float = BURST,
        rate: float = RATE,
        total_burst: float = TOTAL_BURST,
        total_rate: float = TOTAL_RATE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self._per_key = Buckets(burst, rate, clock)
        self._total = Buckets(total_burst, total_rate, clock)
        self._suppressed: OrderedDict[str, int] = OrderedDict()

    def log(
        self, level: int, key: str, msg: str, *args: object, extra: dict[str, object] | None = None
    ) -> bool:
        """Log ``msg % args`` unless ``key`` (or everything) is over its rate; True if logged.
        ``extra``: structured fields (:data:`supctl.output.STRUCTURED_FIELDS`)."""
        if not self.logger.isEnabledFor(level):
            return False
        if self._per_key.take(key) or self._total.take(""):
            self._suppressed[key] = self._suppressed.pop(key, 0) + 1
            while len(self._suppressed) > MAX_KEYS:
                self._suppressed.popitem(last=False)
            return False
        suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            msg, args = f"{msg} (%d similar messages suppressed)", (*args, suppressed)
        self.logger.log(level, msg, *args, extra=extra)
        return True

    def warning(self, key: str, msg: str, *args: object, extra: dict[str, object] | None = None) -> bool:
        return self.log(logging.WARNING, key, msg, *args, extra=extra)

    def info(self, key: str, msg: str, *args: object, extra: dict[str, object] | None = None) -> bool:
        return self.log(logging.INFO, key, msg, *args, extra=extra)

    def flush(self, level: int = logging.WARNING) -> None:
        """Report the suppressed counts of keys that may log again (their flood ended)."""
        for key in list(self._suppressed):
            if not self._total.allows(""):
                break
            if not self._per_key.allows(key):
                continue
            count = self._suppressed.pop(key)
            self._per_key.take(key)
            self._total.take("")
            self.logger.log(level, "%d similar messages suppressed (%s)", count, key)
