"""Password checks for ``/v1/login``: off the event loop, few at a time, and throttled.

* The hash (scrypt) costs tens of milliseconds of CPU.  It runs on a worker thread,
  so that it never stalls the relays of other users' streams, and at most
  :data:`CONCURRENT_HASHES` at once, so that a flood of logins cannot take every core.
* Failed logins are counted per client address and per user name over a sliding
  window (``[limits]`` ``login-failures`` in ``login-window`` seconds).  Past the
  limit, logins from that address or for that name are refused with 429 and a retry
  time, without hashing: guessing passwords online is slow, and cheap to refuse.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

from .users import USER_NAME_RE, UserStore, check_password

#: Password hashes computed at the same time; more logins wait their turn.
CONCURRENT_HASHES = 2
#: Addresses and names whose failures are remembered (the oldest are forgotten first).
MAX_TRACKED = 10_000


@dataclass(frozen=True)
class LoginCheck:
    """The outcome of a login's password check, made before the request is answered."""

    ok: bool
    retry_after: float = 0.0  # > 0: refused unchecked, too many recent failures


class LoginThrottle:
    """Recent failed logins per key (``addr:IP``, ``user:NAME``) in a sliding window."""

    def __init__(self, failures: int, window: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.failures = failures
        self.window = window  # 0: off
        self.clock = clock
        self._recent: OrderedDict[str, deque[float]] = OrderedDict()

    def retry_after(self, *keys: str) -> float:
        """Seconds until a login for ``keys`` may be tried again; 0 if it may now."""
        if not self.window:
            return 0.0
        now, wait = self.clock(), 0.0
        for key in keys:
            times = self._recent.get(key)
            if times is None:
                continue
            while times and times[0] <= now - self.window:
                times.popleft()
            if not times:
                del self._recent[key]
            elif len(times) >= self.failures:
                wait = max(wait, times[0] + self.window - now)
        return wait

    def failed(self, *keys: str) -> None:
        if not self.window:
            return
        now = self.clock()
        for key in keys:
            self._recent.setdefault(key, deque()).append(now)
            self._recent.move_to_end(key)
        while len(self._recent) > MAX_TRACKED:
            self._recent.popitem(last=False)

    def succeeded(self, *keys: str) -> None:
        for key in keys:
            self._recent.pop(key, None)


class LoginChecker:
    """What the tower does with a login's credentials before answering it."""

    def __init__(self, users: UserStore, throttle: LoginThrottle) -> None:
        self.users = users
        self.throttle = throttle
        self._hashing = asyncio.Semaphore(CONCURRENT_HASHES)

    @staticmethod
    def keys(address: str, name: str) -> tuple[str, str]:
        return f"addr:{address}", f"user:{name}"

    async def check(self, address: str, name: str, password: str) -> LoginCheck:
        """Check ``password`` for ``name`` (any string) coming from ``address``."""
        keys = self.keys(address, name)
        if wait := self.throttle.retry_after(*keys):
            return LoginCheck(False, wait)
        # An unknown or malformed name is checked against a dummy hash: the same work,
        # so timing does not tell which names exist.
        known = USER_NAME_RE.fullmatch(name) is not None
        stored = self.users.password_hash(name if known else "", password)
        ok = False
        if stored is not None:
            async with self._hashing:
                ok = await asyncio.to_thread(check_password, password, stored)
        ok = ok and known and self.users.has_user(name)
        if ok:
            self.throttle.succeeded(*keys)
        else:
            self.throttle.failed(*keys)
        return LoginCheck(ok)


def retry_text(seconds: float) -> str:
    return f"too many failed logins; try again in {math.ceil(seconds)} s"
