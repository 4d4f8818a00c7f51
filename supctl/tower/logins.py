"""Password checks for ``/v1/login``: off the event loop, few at a time, and throttled.

* The hash (scrypt) costs tens of milliseconds of CPU.  It runs on a worker thread,
  so that it never stalls the relays of other users' streams, and at most
  :data:`CONCURRENT_HASHES` at once, so that a flood of logins cannot take every core.
* Every attempt is *reserved* before its password is hashed, and a reservation counts
  against the limits like a failure: N simultaneous guesses cost at most the limit in
  hashes, not N.  A success takes its reservation back.
* Three sliding-window counts (``[limits]``, all in ``login-window`` seconds):

  - per client address and user name (``login-failures``, 5): the guesser's own budget.
    A stranger guessing from elsewhere does not lock the user out of *their* address.
  - per user name over all addresses (``login-failures-per-user``, 20): slows a guesser
    spread over many addresses.  An address from which that user logged in within
    :data:`KNOWN_FOR` is exempt, so even a sustained distributed attack leaves the real
    user their usual address; only logins from new addresses wait.
  - per client address over all names (``login-failures-per-address``, 20): one address
    spraying a common password over many names.

  Past a limit the login is refused with 429 and a retry time, without hashing: guessing
  passwords online is slow, and cheap to refuse.  Addresses are counted canonically
  (:func:`supctl.preauth.client_key`: IPv4-mapped IPv6 as IPv4, IPv6 per /64, which one
  subscriber holds whole), and every malformed name as one name.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..preauth import client_key
from .users import USER_NAME_RE, check_password

if TYPE_CHECKING:
    from .directory import Directory

#: Password hashes computed at the same time; more logins wait their turn.
CONCURRENT_HASHES = 2
#: Counted keys, and known (address, user) pairs, remembered (the oldest are forgotten first).
MAX_TRACKED = 10_000
#: A successful login exempts its (address, user) from the per-user limit for this long.
KNOWN_FOR = 30 * 86400.0
#: The name every malformed user name is counted under (no real user has it).
MALFORMED = ""

Key = tuple[str, str, str]


@dataclass(frozen=True)
class LoginCheck:
    """The outcome of a login's password check, made before the request is answered."""

    ok: bool
    retry_after: float = 0.0  # > 0: refused unchecked, too many recent failures


@dataclass(frozen=True)
class Attempt:
    """A reserved login attempt: its keys, and the time it counts under."""

    address: str
    name: str
    keys: tuple[Key, ...]
    at: float


class LoginThrottle:
    """Recent (and pending) login attempts per key, in a sliding window.

    ``failures`` per (address, user), ``per_user`` per user, ``per_address`` per
    address; ``window`` 0 turns throttling off.  ``clock`` is monotonic seconds.
    """

    def __init__(
        self,
        failures: int,
        window: float,
        clock: Callable[[], float] = time.monotonic,
        *,
        per_user: int = 20,
        per_address: int = 20,
    ) -> None:
        self.failures = failures
        self.per_user = per_user
        self.per_address = per_address
        self.window = window  # 0: off
        self.clock = clock
        self._recent: OrderedDict[Key, deque[float]] = OrderedDict()
        self._known: OrderedDict[tuple[str, str], float] = OrderedDict()

    def reserve(self, address: str, name: str) -> Attempt | float:
        """Count a login attempt for ``name`` from ``address`` (both canonical) now,
        before it is checked; or the seconds to wait (> 0) if it may not be tried."""
        now = self.clock()
        pair, user, addr = ("pair", address, name), ("user", "", name), ("addr", address, "")
        if not self.window:
            return Attempt(address, name, (), now)
        limits = [(pair, self.failures), (addr, self.per_address)]
        if not self._is_known(address, name, now):
            limits.append((user, self.per_user))
        wait = 0.0
        for key, most in limits:
            times = self._times(key, now)
            if times is not None and len(times) >= most:
                wait = max(wait, times[0] + self.window - now)
        if wait:
            return wait
        for key in (pair, user, addr):
            self._recent.setdefault(key, deque()).append(now)
            self._recent.move_to_end(key)
        while len(self._recent) > MAX_TRACKED:
            self._recent.popitem(last=False)
        return Attempt(address, name, (pair, user, addr), now)

    def succeeded(self, attempt: Attempt) -> None:
        """The password was right: take the reservation back, clear the (address, user)
        count, and exempt the pair from the per-user limit.  The per-address and per-user
        counts keep their other entries: logging in to one's own account must not reset
        a spray from that address."""
        for key in attempt.keys:
            times = self._recent.get(key)
            if times is not None and attempt.at in times:
                times.remove(attempt.at)
        self._recent.pop(("pair", attempt.address, attempt.name), None)
        if self.window:
            known = (attempt.address, attempt.name)
            self._known[known] = attempt.at
            self._known.move_to_end(known)
            while len(self._known) > MAX_TRACKED:
                self._known.popitem(last=False)

    def _is_known(self, address: str, name: str, now: float) -> bool:
        since = self._known.get((address, name))
        if since is None:
            return False
        if now - since < KNOWN_FOR:
            return True
        del self._known[(address, name)]
        return False

    def _times(self, key: Key, now: float) -> deque[float] | None:
        """The attempts of ``key`` still in the window (older ones dropped)."""
        times = self._recent.get(key)
        if times is None:
            return None
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._recent[key]
            return None
        return times


class LoginChecker:
    """What the tower does with a login's credentials before answering it."""

    def __init__(self, users: Directory, throttle: LoginThrottle) -> None:
        self.users = users
        self.throttle = throttle
        self._hashing = asyncio.Semaphore(CONCURRENT_HASHES)

    async def check(self, address: str, name: str, password: str) -> LoginCheck:
        """Check ``password`` for ``name`` (any string) coming from ``address``."""
        known = USER_NAME_RE.fullmatch(name) is not None
        # Reserved synchronously, before the first await: a concurrent login sees it.
        attempt = self.throttle.reserve(client_key(address), name if known else MALFORMED)
        if not isinstance(attempt, Attempt):
            return LoginCheck(False, attempt)
        # An unknown or malformed name is checked against a dummy hash: the same work,
        # so timing does not tell which names exist.  A reservation whose check never
        # ends (the client went away) stays counted, like a failure.
        stored = self.users.password_hash(name if known else "", password)
        ok = False
        if stored is not None:
            async with self._hashing:
                ok = await asyncio.to_thread(check_password, password, stored)
        ok = ok and known and self.users.has_user(name)
        if ok:
            self.throttle.succeeded(attempt)
        return LoginCheck(ok)


def retry_text(seconds: float) -> str:
    return f"too many failed logins; try again in {math.ceil(seconds)} s"
