"""The tower's limits (``[limits]`` in ``tower.toml``).

Counting limits (streams per session and per user, sessions per user) are checked
by the hub where a stream or a session starts; timers (a stream the site does not
accept in time, an idle stream, a session past its maximum duration) by the hub's
periodic sweep (:mod:`.hub`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from ..protocol import KEEPALIVE, MAX_SITE_STREAMS
from ..schema import COUNT, SECONDS, SECONDS_OR_OFF, Invalid, Rule, Source, load

#: Default WebSocket keepalive (ping interval and ping timeout), in seconds.
DEFAULT_KEEPALIVE = KEEPALIVE
#: Default seconds a draining tower (SIGTERM) lets streams in flight finish.
DEFAULT_DRAIN_TIMEOUT = 30.0


def _site_streams(value: int) -> int:
    COUNT.convert(value)
    if value > MAX_SITE_STREAMS:
        raise Invalid(f"must be at most {MAX_SITE_STREAMS} (what an enforcer accepts)")
    return value


STREAMS_PER_SITE = Rule(COUNT.expected, _site_streams)


@dataclass(frozen=True)
class Limits:
    """Every limit of a tower, and the schema of ``[limits]`` (:mod:`supctl.schema`): the
    TOML key is the field name with ``-`` for ``_``.

    Counts must be at least 1; durations are seconds, and 0 turns the optional
    timers (idle streams, session duration) off.
    """

    streams_per_session: Annotated[int, COUNT] = 100
    streams_per_user: Annotated[int, COUNT] = 1000
    sessions_per_user: Annotated[int, COUNT] = 100
    stream_open_timeout: Annotated[float, SECONDS] = 30.0  # the site must ACCEPT a stream within this
    # No DATA either way for this long closes a stream; a session is closed after
    # session-duration; 0 = off.
    stream_idle_timeout: Annotated[float, SECONDS_OR_OFF] = 3600.0
    session_duration: Annotated[float, SECONDS_OR_OFF] = 0.0
    handshake_timeout: Annotated[float, SECONDS] = 10.0  # TLS + WebSocket opening handshake
    # Login attempts (failed or still being checked) within login-window seconds, then
    # 429 until they age out (tower/logins.py; docs/tower.md, "Limits"): per client
    # address and user name; per user name from every address (addresses it logged in
    # from lately are exempt); per client address for every name.
    login_failures: Annotated[int, COUNT] = 5
    login_failures_per_user: Annotated[int, COUNT] = 20
    login_failures_per_address: Annotated[int, COUNT] = 20
    login_window: Annotated[float, SECONDS_OR_OFF] = 60.0  # 0 = off
    # Connections not through their opening handshake yet, per client address and in all
    # (supctl/preauth.py; docs/tower.md, "Deployment limits").  The total is lowered to
    # stay FD_HEADROOM below the open-file limit.
    preauth_per_address: Annotated[int, COUNT] = 64
    preauth_total: Annotated[int, COUNT] = 1024
    # Concurrent streams on one site's link, all sessions and users together (at most
    # MAX_SITE_STREAMS, the enforcer's own bound).  Measured with idle connections: about
    # 3 KiB per stream at the tower, 10 at the enforcer, 8 at supctl, so 4096 streams cost
    # a site's enforcer about 40 MiB (docs/tower.md, "Limits").  A session beyond its
    # fair share of them is refused (tower/hub.py, Hub.stream_refusal).
    streams_per_site: Annotated[int, STREAMS_PER_SITE] = 4096
    # A session whose OPENs keep being refused is closed: more than refused-streams
    # refusals within refused-window seconds (tower/refusals.py); 0 s = off.  200 in 10 s:
    # a flood is cut after a few kB of OPENs, while a browser behind a forward whose
    # service restarts (every connection refused, retried at once) is not.
    refused_streams: Annotated[int, COUNT] = 200
    refused_window: Annotated[float, SECONDS_OR_OFF] = 10.0
    # Live login tokens of one user; a new login beyond it revokes the user's oldest
    # login token (the store: database/accounts.py, UserTokens.add).  API tokens are not counted.
    tokens_per_user: Annotated[int, COUNT] = 50
    # Renewals of login tokens per user and minute (a burst of that many, then
    # refilled evenly); more are refused with 429 and a retry time.
    renewals_per_minute: Annotated[int, COUNT] = 10

    @classmethod
    def parse(cls, data: object, where: str) -> Limits:
        """Read the ``[limits]`` table of config file ``where``; problems are one-line UsageErrors."""
        return load(cls, data, Source(f"config file {where}"), ("limits",))


def seconds(value: float) -> str:
    """``30`` for 30.0, ``0.5`` for 0.5: how a limit reads in a message."""
    return f"{value:g}"
