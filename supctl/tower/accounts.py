"""The tower's account requests: ``/v1/login``, ``/v1/logout`` and ``/v1/token/renew``.

Plain HTTP before any upgrade, each judged at once (a :class:`~.httpapi.Rejection` if
refused) and then, if granted, written to the store off the event loop (the loop keeps
relaying meanwhile): :class:`Accounts` answers one with an :class:`AccountDone`, which
the server turns into the response and its audit record.

Who asks is the server's to find out (its token check also serves every other
request): it hands :class:`Accounts` a callable that authenticates a request into a
:class:`Caller`.  Nothing here reads or sets the server's state, so two requests whose
store writes overlap never see each other's requester.
"""

from __future__ import annotations

import datetime
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from websockets.http11 import Request

from ..errors import UsageError
from ..ratelimit import Buckets
from ..ratelog import RateLimitedLog
from .database import StoreUnavailable
from .directory import Directory
from .httpapi import Rejection, basic_credentials, bearer_token
from .limits import Limits
from .logins import LoginCheck, LoginChecker, LoginThrottle, retry_text
from .store import hash_token
from .users import USER_NAME_RE, Identity, iso

log = logging.getLogger("supctl.tower")

#: The change an account request makes in the store, which answers the response's body.
Change = Callable[[], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class AccountDone:
    """The outcome of a login, logout or renewal whose change to the store was made
    before the request is answered (:meth:`Accounts.write`)."""

    requester: str  # "USER:ACCESSOR", for the audit record
    body: dict[str, Any] | None = None
    rejection: Rejection | None = None


@dataclass(frozen=True)
class Caller:
    """Who sends a logout or renewal, as the server's token check found.

    ``who``: "USER:ACCESSOR" for the audit record, also for a token refused as revoked
    or expired ("" when nobody could be named); ``identity``: the user's token, None for
    the admin token; ``refusal``: why the token was refused, None if it was accepted.
    """

    who: str
    identity: Identity | None = None
    refusal: Rejection | None = None


@dataclass
class _Asked:
    """Who one account request comes from, as far as it was judged: read for its
    audit record also when judging it failed half way."""

    requester: str = ""


class Accounts:
    """Logins (password checks throttled), logouts and login-token renewals (rate-limited
    per user), for the tower that owns it."""

    def __init__(
        self,
        limits: Limits,
        authenticate: Callable[[Request], Caller],
        peer_log: RateLimitedLog,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = limits
        self._authenticate = authenticate
        self._peer_log = peer_log
        self._login_checker: LoginChecker | None = None
        renewals = limits.renewals_per_minute
        self._renewals = Buckets(renewals, renewals / 60.0, clock)  # per user

    def logins(self, users: Directory) -> LoginChecker:
        """The password check of logins against ``users``, with its throttle (one per
        directory: a new one starts with a clean throttle)."""
        if self._login_checker is None or self._login_checker.users is not users:
            limits = self.limits
            throttle = LoginThrottle(
                limits.login_failures,
                limits.login_window,
                per_user=limits.login_failures_per_user,
                per_address=limits.login_failures_per_address,
            )
            self._login_checker = LoginChecker(users, throttle)
        return self._login_checker

    async def write(
        self,
        path: str,
        request: Request,
        login: LoginCheck | None,
        users: Directory | None,
        expiry: datetime.timedelta,
    ) -> AccountDone:
        """Judge an account request now (:meth:`_judge`), then make its change in the
        store (asynchronously: the loop keeps relaying meanwhile) and in the directory.

        ``login``: the outcome of a login's password check (:meth:`logins`), None to
        check it here; ``users``: the tower's users, None if it has none; ``expiry``:
        the lifetime of a login token and of each renewal."""
        asked = _Asked()
        try:
            change = self._judge(asked, path, request, login, users, expiry)
        except Rejection as exc:
            return AccountDone(asked.requester, rejection=exc)
        except Exception:  # a bug here must cost one request, not the tower
            log.exception("internal error judging %s", path)
            return AccountDone(
                asked.requester, rejection=Rejection(500, "internal error in the control tower")
            )
        requester = asked.requester
        try:
            body = await change()
        except Rejection as exc:
            return AccountDone(requester, rejection=exc)
        except StoreUnavailable as exc:
            self._peer_log.warning("store unavailable", "%s", exc)
            return AccountDone(
                requester, rejection=Rejection(503, "the control tower cannot reach its store")
            )
        except Exception:
            log.exception("internal error writing to the store for %s", path)
            return AccountDone(requester, rejection=Rejection(500, "internal error in the control tower"))
        if path == "/v1/login":
            requester = f"{body['user']}:{body['accessor']}"
        return AccountDone(requester, body=body)

    def _judge(
        self,
        asked: _Asked,
        path: str,
        request: Request,
        login: LoginCheck | None,
        users: Directory | None,
        expiry: datetime.timedelta,
    ) -> Change:
        """``/v1/login`` (HTTP Basic), ``/v1/logout`` and ``/v1/token/renew`` (bearer):
        judged now (a Rejection if refused, ``asked`` naming who asked as far as known);
        returns the change to make in the store (awaited by :meth:`write`)."""
        if users is None:
            raise Rejection(404, "this control tower has no users")
        if path == "/v1/login":
            name, password = basic_credentials(request)
            known = USER_NAME_RE.fullmatch(name) is not None
            asked.requester = f"{name}:" if known else ""
            if login is None:
                login = LoginCheck(users.check_password(name if known else "", password))
            if login.retry_after:
                raise Rejection(429, retry_text(login.retry_after))
            if not login.ok or not known:
                raise Rejection(401, "wrong user name or password")
            most = self.limits.tokens_per_user

            async def log_in() -> dict[str, Any]:
                try:
                    issued = await users.log_in(name, expiry, most)
                except UsageError:  # removed since the password check
                    raise Rejection(401, "wrong user name or password") from None
                expires = iso(issued.expires)
                return {"token": issued.token, "expires": expires, "accessor": issued.accessor, "user": name}

            return log_in
        caller = self._authenticate(request)
        asked.requester = caller.who
        if caller.refusal is not None:
            raise caller.refusal
        identity = caller.identity
        if identity is None:
            raise Rejection(400, "the admin token cannot be logged out or renewed")
        token, accessor = bearer_token(request), identity.accessor
        if path == "/v1/logout":

            async def log_out() -> dict[str, Any]:
                await users.log_out(token)
                return {"revoked": accessor}

            return log_out
        if identity.kind != "login":
            raise Rejection(400, "only login tokens are renewed; an API token keeps its expiry")
        # Each renewal is a write to the store: a user gets renewals-per-minute, then 429.
        if wait := self._renewals.take(identity.user):
            raise Rejection(
                429, f"too many token renewals for user {identity.user}; try again in {math.ceil(wait)} s"
            )

        async def renew() -> dict[str, Any]:
            expires = await users.renew(token, expiry)
            if expires is None:  # revoked or expired since it was checked: not brought back
                raise Rejection(401, users.refusal_by_hash(hash_token(token)) or "token revoked")
            return {"expires": iso(expires), "accessor": accessor}

        return renew
