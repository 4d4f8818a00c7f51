"""The tower's limits (``[limits]`` in ``tower.toml``) and the sweep that enforces its timers.

Counting limits (streams per session and per user, sessions per user) are checked
where a stream or a session starts.  Timers (a stream the site does not accept in
time, an idle stream, a session past its maximum duration) are checked by one
periodic sweep per tower over its sessions and their relays, not by a timer per
stream: the data path only stamps ``Relay.last_activity`` with a monotonic read.
The same sweep re-checks every site link's token (:func:`sweep_sites`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from ..errors import UsageError
from ..protocol import MAX_SITE_STREAMS, ErrorCode

if TYPE_CHECKING:
    from .server import Tower

log = logging.getLogger("supctl.tower")

#: Seconds between two sweeps: a timer fires at most this late.
SWEEP_INTERVAL = 0.5
#: Default WebSocket keepalive (ping interval and ping timeout), in seconds.
DEFAULT_KEEPALIVE = 10.0


@dataclass(frozen=True)
class Limits:
    """Every limit of a tower; the TOML key is the field name with ``-`` for ``_``.

    Counts must be at least 1; durations are seconds, and 0 turns the optional
    timers (idle streams, session duration) off.
    """

    streams_per_session: int = 100
    streams_per_user: int = 1000
    sessions_per_user: int = 100
    stream_open_timeout: float = 30.0  # the site must ACCEPT a stream within this
    stream_idle_timeout: float = 3600.0  # no DATA either way for this long; 0 = off
    session_duration: float = 0.0  # a session is closed after this long; 0 = off
    handshake_timeout: float = 10.0  # TLS + WebSocket opening handshake
    # Login attempts (failed or still being checked) within login-window seconds, then
    # 429 until they age out (tower/logins.py; docs/tower.md, "Limits"): per client
    # address and user name; per user name from every address (addresses it logged in
    # from lately are exempt); per client address for every name.
    login_failures: int = 5
    login_failures_per_user: int = 20
    login_failures_per_address: int = 20
    login_window: float = 60.0  # 0 = off
    # Connections not through their opening handshake yet, per client address and in all
    # (tower/preauth.py; docs/tower.md, "Deployment limits").  The total is lowered to
    # stay FD_HEADROOM below the open-file limit.
    preauth_per_address: int = 64
    preauth_total: int = 1024
    # Concurrent streams on one site's link, all sessions and users together (at most
    # MAX_SITE_STREAMS, the enforcer's own bound).  Measured with idle connections: about
    # 3 KiB per stream at the tower, 10 at the enforcer, 8 at supctl, so 4096 streams cost
    # a site's enforcer about 40 MiB (docs/tower.md, "Limits").  A session beyond its
    # fair share of them is refused (tower/links.py, ClientLink._stream_limit).
    streams_per_site: int = 4096
    # A session whose OPENs keep being refused is closed: more than refused-streams
    # refusals within refused-window seconds (tower/refusals.py); 0 s = off.  200 in 10 s:
    # a flood is cut after a few kB of OPENs, while a browser behind a forward whose
    # service restarts (every connection refused, retried at once) is not.
    refused_streams: int = 200
    refused_window: float = 10.0
    # Live login tokens of one user; a new login beyond it revokes the user's oldest
    # login token (the store: database/accounts.py, UserTokens.add).  API tokens are not counted.
    tokens_per_user: int = 50
    # Renewals of login tokens per user and minute (a burst of that many, then
    # refilled evenly); more are refused with 429 and a retry time.
    renewals_per_minute: int = 10

    @classmethod
    def parse(cls, data: object, where: str) -> Limits:
        """Read the ``[limits]`` table; every problem is a one-line :class:`UsageError`."""
        if not isinstance(data, Mapping):
            raise UsageError(f"bad config file {where}: 'limits' must be a table")
        known = {f.name.replace("_", "-"): f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in data.items():
            field = known.get(key)
            if field is None:
                raise UsageError(f"bad config file {where}: unknown key 'limits.{key}'")
            name = field.name
            if field.type == "int":
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise UsageError(f"bad config file {where}: 'limits.{key}' must be an integer >= 1")
                values[name] = value
            else:
                ok = isinstance(value, int | float) and not isinstance(value, bool) and value >= 0
                positive = name in ("stream_open_timeout", "handshake_timeout")
                if not ok or (positive and value == 0):
                    bound = "> 0" if positive else ">= 0 (0: off)"
                    raise UsageError(
                        f"bad config file {where}: 'limits.{key}' must be a number of seconds {bound}"
                    )
                values[name] = float(value)
        if values.get("streams_per_site", 0) > MAX_SITE_STREAMS:
            raise UsageError(
                f"bad config file {where}: 'limits.streams-per-site' must be at most {MAX_SITE_STREAMS}"
                " (what an enforcer accepts)"
            )
        return cls(**values)


def parse_keepalive(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise UsageError(f"bad config file {where}: 'keepalive' must be a number of seconds >= 0 (0: off)")
    return float(value)


def seconds(value: float) -> str:
    """``30`` for 30.0, ``0.5`` for 0.5: how a limit reads in a message."""
    return f"{value:g}"


def sweep(tower: Tower, now: float) -> None:
    """One pass over every session and relay of ``tower``, enforcing the timers."""
    limits = tower.limits
    open_timeout = limits.stream_open_timeout
    idle = limits.stream_idle_timeout
    duration = limits.session_duration
    for session in list(tower.sessions):
        if session.conn.closed is not None:
            continue
        # Authority is checked at the upgrade, at every OPEN and again here: revoking a
        # token (or its expiry, unless a long-running supctl renewed it), removing its user
        # or narrowing a policy ends the sessions it no longer allows.
        if refusal := tower.route_refusal(session.route):
            log.warning("closing session %s: %s", session.route.summary, refusal)
            session.close(ErrorCode.DENIED, refusal)
            continue
        if duration and now - session.started >= duration:
            reason = f"session exceeded {seconds(duration)} s"
            log.warning("closing session %s: %s", session.route.summary, reason)
            session.close(ErrorCode.LIMIT, reason)
            continue
        for relay in list(session.relays.values()):
            if not relay.accepted:
                if now - relay.started >= open_timeout:
                    relay.abort(
                        ErrorCode.TIMEOUT,
                        f"the site did not answer within {seconds(open_timeout)} s",
                        "timeout",
                    )
            elif idle and now - relay.last_activity >= idle:
                relay.abort(ErrorCode.TIMEOUT, f"idle for {seconds(idle)} s", "timeout")


def sweep_sites(tower: Tower) -> None:
    """Close every site link whose token is no longer the site's (rotated, or the site
    removed): a thief holding an old site token loses the link within a sweep."""
    for link in list(tower.sites.values()):
        link.evict_if_invalid()


async def sweep_forever(
    tower: Tower,
    interval: float = SWEEP_INTERVAL,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
) -> None:
    """Sweep ``tower`` every ``interval`` seconds, for ever (``clock`` and ``sleep``: for tests)."""
    while True:
        await sleep(interval)
        try:
            sweep(tower, clock())
            tower.peer_log.flush()  # "N similar messages suppressed" once a flood has ended
        except Exception:  # a bug here must not stop the timers for good
            log.exception("internal error in the limits sweep")
        try:
            sweep_sites(tower)
        except Exception:  # nor the site checks, nor one stop the other
            log.exception("internal error in the sweep of site links")
