"""Token buckets per key: how often a peer may cause something (a log line, a write).

Each key (a user, an address, a kind of message) has a bucket of ``burst`` tokens,
refilled continuously at ``rate`` tokens a second; an action takes one token or is
refused with the seconds until one is back.  The clock is an argument, so the
arithmetic is tested with a fake one.  Keys are bounded: past ``max_keys`` the
least recently used bucket is forgotten (it comes back full, which is no worse
than a new key).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

#: Buckets remembered at most (a peer choosing keys cannot grow this without bound).
MAX_KEYS = 10_000


class Buckets:
    def __init__(
        self,
        burst: float,
        rate: float,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = MAX_KEYS,
    ) -> None:
        if burst < 1 or rate <= 0:
            raise ValueError("a bucket needs burst >= 1 and rate > 0")
        self.burst = float(burst)
        self.rate = float(rate)
        self.clock = clock
        self.max_keys = max_keys
        self._levels: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, when)

    def take(self, key: str) -> float:
        """Take a token from ``key``'s bucket: 0.0 if there was one, else the seconds
        until there is one (nothing is taken then)."""
        now = self.clock()
        level, since = self._levels.get(key, (self.burst, now))
        level = min(self.burst, level + max(0.0, now - since) * self.rate)
        if level >= 1.0:
            self._levels[key] = (level - 1.0, now)
            wait = 0.0
        else:
            self._levels[key] = (level, now)
            wait = (1.0 - level) / self.rate
        self._levels.move_to_end(key)
        while len(self._levels) > self.max_keys:
            self._levels.popitem(last=False)
        return wait

    def allows(self, key: str) -> bool:
        """Whether ``key``'s bucket has a token now, without taking it."""
        now = self.clock()
        level, since = self._levels.get(key, (self.burst, now))
        return level + max(0.0, now - since) * self.rate >= 1.0
