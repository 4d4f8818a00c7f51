"""The tower's WebSocket server: authorise before upgrading, then relay.

Every refusal happens in ``process_request``, before the WebSocket upgrade, as an
HTTP status with the platform's JSON error body, so a client sees a one-line
reason and no half-open session.  Every decision there (a session accepted or
refused, a ``show`` answered) is one audit record; a session whose record cannot
be written is refused (503), so nothing is let through unrecorded.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
import weakref
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request, Response

from ..errors import UsageError
from ..protocol import SUBPROTOCOL, ErrorCode
from ..protocol.frames import CLOSE_CODE_BASE
from ..protocol.names import parse_port, valid_name
from ..protocol.targets import canonical_address
from ..ratelimit import Buckets
from ..ratelog import RateLimitedLog
from . import audit
from .audit import AuditLog
from .database import StoreUnavailable
from .directory import Directory
from .httpapi import Rejection, basic_credentials, bearer_token, error_response, json_response, single
from .limits import Limits
from .links import ClientLink, Route, SiteClaim, SiteLink
from .logins import LoginCheck, LoginChecker, LoginThrottle, retry_text
from .policy import ALLOW_ALL
from .policy import Request as PolicyRequest
from .policy import allowed as policy_allows
from .requests import (
    ACCOUNT_PATHS,
    CONNECT_PATH,
    ENFORCER_PATH,
    EXEC_PATH,
    INSTANCES_PATH,
    find_instance,
    peer,
    peer_host,
    requested,
    require_handler,
    site_name,
    upgrading,
    url_name,
)
from .siteinfo import SiteInfo
from .store import hash_token
from .users import (
    DEFAULT_LOGIN_EXPIRY,
    USER_NAME_RE,
    Identity,
    TokenRefused,
    iso,
)

log = logging.getLogger("supctl.tower")


@dataclass(frozen=True)
class AccountDone:
    """The outcome of a login, logout or renewal whose change to the store was made
    before the request is answered (:meth:`Tower.handshake_request`)."""

    requester: str  # "USER:ACCESSOR", for the audit record
    body: dict[str, Any] | None = None
    rejection: Rejection | None = None


class Tower:
    def __init__(
        self,
        store: Directory,
        audit_log: AuditLog | None = None,
        limits: Limits | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # The store's credentials and policies in memory (directory.py): admin and site
        # tokens here, users and policies below are the same object.
        self.store = store
        self.audit = audit_log
        self.clock = clock  # monotonic seconds, for every rate and window (fake in tests)
        # Log lines a peer can cause (refused requests and streams), rate-limited.
        self.peer_log = RateLimitedLog(log, clock=clock)
        # Users and policies (docs/policies.md); without users only admin tokens exist.
        self.users: Directory | None = store
        self._login_checker: LoginChecker | None = None
        self.policy: Directory | None = store
        self.login_expiry = DEFAULT_LOGIN_EXPIRY
        # The policies and identity of the request being authorised (set with _requester).
        self._policies: tuple[str, ...] = ()
        self._identity: Identity | None = None
        self.limits = limits or Limits()
        renewals = self.limits.renewals_per_minute
        self._renewals = Buckets(renewals, renewals / 60.0, clock)  # per user
        # Live supctl sessions, and per user their number and their concurrent streams.
        self.sessions: set[ClientLink] = set()
        self.user_sessions: Counter[str] = Counter()
        self.user_streams: Counter[str] = Counter()
        # Who the request being authorised comes from ("admin:ACCESSOR"), once its token
        # checked out: process_request is synchronous, so it never mixes two requests.
        self._requester = ""
        self.sites: dict[str, SiteLink] = {}
        # Weak: a handshake that fails after process_request (no Upgrade header, client gone)
        # never reaches handler(), which pops the entry; it must not stay forever.
        self._routes: weakref.WeakKeyDictionary[ServerConnection, Route | SiteClaim] = (
            weakref.WeakKeyDictionary()
        )

    # --- before the upgrade ---------------------------------------------------

    async def handshake_request(self, connection: ServerConnection, request: Request) -> Response | None:
        """websockets' ``process_request``: :meth:`process_request`, after what must not
        run on the event loop: bringing the directory up to date with the store (a
        revocation made by ``control-tower`` in another process counts from the next
        request on), a login's password check (:mod:`.logins`: on a worker thread,
        throttled) and the change to the store of a login, logout or renewal
        (:meth:`_account_write`).

        Only those await; everything else stays synchronous on the loop, and what a
        request's judgement needs (who asked) is carried across the await, so two
        requests never interleave.
        """
        path = urlsplit(request.path).path
        try:
            await self.store.fresh()
        except StoreUnavailable as exc:
            return self._store_unavailable(connection, request, exc)
        if self.users is None or path not in ACCOUNT_PATHS or upgrading(request):
            return self.process_request(connection, request)
        login = None
        if path == "/v1/login":
            try:
                name, password = basic_credentials(request)
            except Rejection:
                pass  # _account refuses it, with the reason
            else:
                login = await self._logins(self.users).check(peer_host(connection), name, password)
        done = await self._account_write(path, request, login)
        return self.process_request(connection, request, login, done)

    def _store_unavailable(
        self, connection: ServerConnection, request: Request, exc: StoreUnavailable
    ) -> Response:
        """Fail closed: nothing is judged against a copy that may be stale."""
        message = "the control tower cannot reach its store"
        self.peer_log.warning("store unavailable", "%s", exc)
        self._requester = ""
        self._audit_refused(connection, request, 503, message)
        return error_response(503, message)

    async def _account_write(self, path: str, request: Request, login: LoginCheck | None) -> AccountDone:
        """Judge an account request now (:meth:`_account`), then make its change in the
        store (asynchronously: the loop keeps relaying meanwhile) and in the directory."""
        self._requester = ""
        try:
            change = self._account(path, request, login)
        except Rejection as exc:
            return AccountDone(self._requester, rejection=exc)
        except Exception:  # a bug here must cost one request, not the tower
            log.exception("internal error judging %s", path)
            return AccountDone(
                self._requester, rejection=Rejection(500, "internal error in the control tower")
            )
        requester = self._requester
        try:
            body = await change()
        except Rejection as exc:
            return AccountDone(requester, rejection=exc)
        except StoreUnavailable as exc:
            self.peer_log.warning("store unavailable", "%s", exc)
            return AccountDone(
                requester, rejection=Rejection(503, "the control tower cannot reach its store")
            )
        except Exception:
            log.exception("internal error writing to the store for %s", path)
            return AccountDone(requester, rejection=Rejection(500, "internal error in the control tower"))
        if path == "/v1/login":
            requester = f"{body['user']}:{body['accessor']}"
        return AccountDone(requester, body=body)

    def _logins(self, users: Directory) -> LoginChecker:
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

    def process_request(
        self,
        connection: ServerConnection,
        request: Request,
        login: LoginCheck | None = None,
        account: AccountDone | None = None,
    ) -> Response | None:
        """Authorise ``request`` (or answer it, for a plain GET); None lets the upgrade go on.

        ``login``: the outcome of a login's password check if it was done already
        (:meth:`handshake_request`); None checks it here (unthrottled: in-process use).
        ``account``: the outcome of a login, logout or renewal made already; None makes
        it here, on the calling thread (in-process use).
        """
        self._requester = ""
        try:
            outcome = self._authorise(request, login, account)
        except Rejection as exc:
            self._log_refused(connection, request, exc.status, str(exc))
            self._audit_refused(connection, request, exc.status, str(exc))
            return error_response(exc.status, str(exc), exc.info)
        except Exception:  # a bug here must cost one request, not the tower
            log.exception("internal error authorising %s", request.path)
            self._audit_refused(connection, request, 500, "internal error in the control tower")
            return error_response(500, "internal error in the control tower")
        if isinstance(outcome, Response):
            # A plain GET of state, answered without upgrading.
            if not self._audit(
                audit.record(
                    ACCOUNT_PATHS.get(urlsplit(request.path).path, "show"),
                    **requested(self._requester, connection, request),
                    status=200,
                    result="ok",
                )
            ):
                return error_response(503, "the control tower cannot write its audit log")
            return outcome
        if isinstance(outcome, Route):
            outcome = replace(outcome, peer=peer(connection), session=secrets.token_hex(4))
            most = self.limits.sessions_per_user
            if self.user_sessions[outcome.user] >= most:
                message = f"more than {most} sessions for user {outcome.user}"
                self._log_refused(connection, request, 429, message)
                self._audit_refused(connection, request, 429, message)
                return error_response(429, message)
            rec = audit.record("session-accepted", path=audit.cut(urlsplit(request.path).path), result="ok")
            rec.update(audit.route_fields(outcome))
            if not self._audit(rec):
                return error_response(503, "the control tower cannot write its audit log")
        self._routes[connection] = outcome
        return None

    def _log_refused(self, connection: ServerConnection, request: Request, status: int, message: str) -> None:
        """One line per refused request, rate-limited per client address: a peer that
        sends thousands (bad tokens, wrong passwords, refused sessions) costs a few lines;
        the audit log has every one."""
        path = urlsplit(request.path).path
        key = f"requests refused from {peer_host(connection)}"
        self.peer_log.info(key, "refused %s %s: %d %s", peer(connection), path, status, message)

    # --- audit records of requests ----------------------------------------------

    def _audit(self, rec: dict[str, Any]) -> bool:
        return self.audit is None or self.audit.append(rec)

    def _audit_refused(
        self, connection: ServerConnection, request: Request, status: int, message: str
    ) -> None:
        try:
            fields = requested(self._requester, connection, request)
            result = f"{status} {message}"
            self._audit(audit.record("session-refused", **fields, status=status, result=result))
        except Exception:  # recording a refusal must never turn it into something else
            log.exception("internal error recording a refusal of %s", urlsplit(request.path).path)

    def _authorise(
        self, request: Request, login: LoginCheck | None = None, account: AccountDone | None = None
    ) -> Route | SiteClaim | Response:
        url = urlsplit(request.path)
        try:
            query = parse_qs(url.query, keep_blank_values=True, strict_parsing=bool(url.query))
        except ValueError:
            raise Rejection(400, "malformed query string") from None
        if not upgrading(request):
            if url.path in ACCOUNT_PATHS:
                if account is None:  # in-process use only: the tower always passes one
                    raise Rejection(500, "account requests go through handshake_request")
                self._requester = account.requester
                if account.rejection is not None:
                    raise account.rejection
                assert account.body is not None
                return json_response(account.body)
            return json_response(self._show(url.path, query, self._admin(request)))
        offered = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")]
        if SUBPROTOCOL not in offered:
            raise Rejection(400, f"the client must offer the WebSocket subprotocol {SUBPROTOCOL}")
        if url.path == ENFORCER_PATH:
            site = single(query, "site")
            token = bearer_token(request)
            if not self.store.check_site(site, token):
                raise Rejection(401, f"invalid token for site {site!r}")
            # One link per site: a second enforcer is refused while the first one's link
            # is alive and its token still valid (then both hold the same, current token);
            # keepalive drops a dead link, and then the site may connect again.  A link whose
            # token was rotated or removed is closed here, and the new token takes over.
            if (existing := self.site_link(site)) is not None:
                raise Rejection(409, f"site {site} is already connected from {existing.peer}")
            return SiteClaim(site, hash_token(token))
        if match := CONNECT_PATH.match(url.path):
            who = self._admin(request)
            app, instance = url_name(match[1], "application"), url_name(match[2], "service instance")
            return self._connect_route(app, instance, query, who)
        if match := EXEC_PATH.match(url.path):
            who = self._admin(request)
            app, instance = url_name(match[1], "application"), url_name(match[2], "service instance")
            return self._exec_route(app, instance, url_name(match[3], "container"), query, who)
        raise Rejection(404, f"no such endpoint: {url.path}")

    def _admin(self, request: Request) -> str:
        """Who sends ``request`` ("USER:ACCESSOR"): the admin token (user "admin", allow-all
        policy) or a user's login or API token (that user's policies)."""
        token = bearer_token(request)
        self._identity = None
        self._policies = ()
        accessor = self.store.check_admin(token)
        if accessor is not None:
            self._policies = (ALLOW_ALL,)
            self._requester = f"admin:{accessor}"
            return self._requester
        identity = None
        if self.users is not None:
            try:
                identity = self.users.check_token(token)
            except TokenRefused as exc:
                self._requester = f"{exc.user}:{exc.accessor}"
                raise Rejection(401, str(exc)) from None
        if identity is None:
            raise Rejection(401, "invalid API token")
        self._identity = identity
        self._policies = identity.policies
        self._requester = f"{identity.user}:{identity.accessor}"
        return self._requester

    def token_refusal(self, who: str) -> str | None:
        """Why the token behind ``who`` ("USER:ACCESSOR" of an accepted session) may no
        longer be used, or None while it is valid."""
        user, _, accessor = who.partition(":")
        if user == "admin":
            return None if self.store.admin_valid(accessor) else "token revoked"
        if self.users is None:
            return "token revoked"
        return self.users.refusal(accessor)

    def route_refusal(self, route: Route) -> str | None:
        """Why an accepted session's ``route`` may no longer be used, or None while it may.

        Judged at every OPEN and by the limits sweep: the token (revoked, expired, its user
        removed) and the policies in force *now*, the same judgement as at the upgrade
        (:meth:`judge` of :meth:`Route.policy_request`).
        """
        if refusal := self.token_refusal(route.who):
            return refusal
        user = route.user
        if user == "admin":
            return None  # the admin token's policy is allow-all, and it was just found valid
        policies = self.users.policies(user) if self.users is not None else None
        if policies is None:
            return "token revoked (its user was removed)"
        request = route.policy_request()
        try:
            if self.judge(policies, request):
                return None
        except UsageError:
            return "the control tower's policy file is invalid"
        return f"policy no longer allows {request.describe(user)}"

    def judge(self, policies: tuple[str, ...], request: PolicyRequest) -> bool:
        """Whether ``policies`` allow ``request`` under the policy set in force: the one
        decision behind every upgrade, OPEN, sweep and ``show``.  UsageError if the policy
        file is invalid (the caller refuses: no valid policy, nothing allowed)."""
        if ALLOW_ALL in policies:
            return True
        rules = self.policy.rules(policies) if self.policy is not None else []
        return policy_allows(rules, request)

    def _allowed(self, request: PolicyRequest) -> bool:
        try:
            return self.judge(self._policies, request)
        except UsageError as exc:
            log.error("%s", exc)
            raise Rejection(500, "the control tower's policy file is invalid (see its log)") from None

    def _check(self, request: PolicyRequest) -> None:
        """Refuse (403, one line naming what) unless the requester's policies allow ``request``."""
        if not self._allowed(request):
            user = audit.split_who(self._requester)[0] or "?"
            raise Rejection(403, f"policy refuses {request.describe(user)}")

    def _account(
        self, path: str, request: Request, login: LoginCheck | None = None
    ) -> Callable[[], Awaitable[dict[str, Any]]]:
        """``/v1/login`` (HTTP Basic), ``/v1/logout`` and ``/v1/token/renew`` (bearer):
        judged now (a Rejection if refused); returns the change to make in the store,
        which answers the response's body (awaited by :meth:`handshake_request`)."""
        users = self.users
        if users is None:
            raise Rejection(404, "this control tower has no users")
        expiry = self.login_expiry
        if path == "/v1/login":
            name, password = basic_credentials(request)
            known = USER_NAME_RE.fullmatch(name) is not None
            self._requester = f"{name}:" if known else ""
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
        self._admin(request)
        identity = self._identity
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

    def _visible(self, site: str) -> bool:
        """Whether the requester may learn that ``site`` exists (and whether it is connected):
        a ``show`` rule for the site or for an application at it."""
        if self._allowed(PolicyRequest("show", site)):
            return True
        link = self.site_link(site)
        info = link.info if link is not None else None
        apps = info.applications if info is not None else {}
        return any(self._allowed(PolicyRequest("show", site, app)) for app in apps)

    def _site(self, query: dict[str, list[str]], *, show: bool = False) -> tuple[str, SiteInfo]:
        """The site a request names, connected.  ``show``: the requester may only learn of a
        site it may see; any other site is answered as if it did not exist (404)."""
        site = site_name(query)
        if not self.store.site_exists(site) or (show and not self._visible(site)):
            raise Rejection(404, f"unknown site {site!r}")
        link = self.site_link(site)
        if link is None or link.info is None:
            raise Rejection(503, f"site {site!r} is not connected to the control tower")
        return site, link.info

    def _connect_route(self, app: str, instance: str, query: dict[str, list[str]], who: str) -> Route:
        site = site_name(query)
        protocol = single(query, "protocol")
        if not valid_name(protocol):
            raise Rejection(400, f"invalid protocol {audit.cut(protocol, 40)!r}")
        port_text = single(query, "port")
        port = parse_port(port_text)
        if port is None:
            raise Rejection(400, f"port must be 1-65535 in ASCII digits, got {audit.cut(port_text, 40)!r}")
        ip_text = single(query, "ip-address", required=False)
        ip = ""
        if ip_text:
            # Canonical before it is judged: the address the policy sees is the one dialled.
            try:
                ip = canonical_address(ip_text)
            except ValueError as exc:
                raise Rejection(400, f"ip-address {audit.cut(ip_text, 70)!r}: {exc}") from None
        route = Route(
            "connect", site, app, instance, protocol, port, ip, who=who,
            requested_address=ip_text if ip_text != ip else "",
        )  # fmt: skip
        self._check(route.policy_request())
        site, info = self._site(query)
        find_instance(site, info, app, instance)
        require_handler(site, info, protocol, "protocol")
        return route

    def _exec_route(
        self, app: str, instance: str, container: str, query: dict[str, list[str]], who: str
    ) -> Route:
        route = Route("exec", site_name(query), app, instance, container=container, who=who)
        self._check(route.policy_request())
        site, info = self._site(query)
        found = find_instance(site, info, app, instance)
        if container not in found.containers:
            raise Rejection(
                404, f"container {container!r} not found in service instance {instance!r} at site {site!r}"
            )
        require_handler(site, info, "exec", "verb")
        return route

    def _show(self, path: str, query: dict[str, list[str]], who: str) -> dict[str, Any]:
        """``GET /v1/state/...``: what the tower knows of sites, for ``supctl show``."""
        if path == "/v1/state/sites":
            names = [name for name in self.store.sites() if self._visible(name)]
            return {"sites": [self._site_summary(name) for name in names]}
        if path == "/v1/state/applications":
            site, info = self._site(query, show=True)
            return {
                "applications": [
                    {"name": app, "service-instances": sorted(instances)}
                    for app, instances in sorted(info.applications.items())
                    if self._allowed(PolicyRequest("show", site, app))
                ]
            }
        if match := INSTANCES_PATH.match(path):
            app = url_name(match[1], "application")
            site, info = self._site(query, show=True)
            # Not allowed to see it, or not there: the same answer, so a refusal tells nothing.
            if app not in info.applications or not self._allowed(PolicyRequest("show", site, app)):
                raise Rejection(404, f"application {app!r} not found at site {site!r}")
            instances = info.applications[app]
            return {"service-instances": [instances[name].show() for name in sorted(instances)]}
        raise Rejection(404, f"no such endpoint: {path}")

    def _site_summary(self, name: str) -> dict[str, Any]:
        link = self.site_link(name)
        info = link.info if link is not None else None
        return {
            "name": name,
            "connected": info is not None,
            "version": info.version if info else None,
            "applications": sorted(info.applications) if info else [],
        }

    # --- after the upgrade ----------------------------------------------------

    async def handler(self, connection: ServerConnection) -> None:
        route = self._routes.pop(connection, None)
        if route is None:
            await connection.close(1011, "no route")
            return
        if isinstance(route, SiteClaim):
            site = SiteLink(connection, self, route, peer(connection))
            await site.run()
            return
        user, most = route.user, self.limits.sessions_per_user
        if self.user_sessions[user] >= most:  # several handshakes raced past process_request
            reason = f"more than {most} sessions for user {user}"
            log.warning("closing session %s: %s", route.summary, reason)
            await connection.close(CLOSE_CODE_BASE + ErrorCode.LIMIT, reason)
            return
        log.info("session opened %s from %s", route.summary, peer(connection))
        session = ClientLink(connection, self, route)
        self.sessions.add(session)
        self.user_sessions[user] += 1
        try:
            await session.run()
        finally:
            self.sessions.discard(session)
            self.user_sessions[user] -= 1
            if self.user_sessions[user] <= 0:
                del self.user_sessions[user]
        log.info("session closed %s: %s", route.summary, session.lost_reason or "closed")

    def site_link(self, site: str) -> SiteLink | None:
        """The link serving ``site``: only one that is live and whose token is still the
        site's.  A link whose token was rotated or removed is closed on the spot, so no
        stream goes to it even before the sweep (:func:`.limits.sweep_sites`) gets there."""
        link = self.sites.get(site)
        if link is None or link.evict_if_invalid():
            return None
        return link

    def site_connected(self, link: SiteLink) -> None:
        # The same rule as process_request's, for two handshakes that raced past it (or a
        # token rotated between the upgrade and the HELLO): a link holding a valid token
        # takes over from one that no longer does; the first link wins while both are valid.
        if link.evict_if_invalid():
            return
        old = self.site_link(link.site)
        if old is not None and old is not link:
            reason = f"site {link.site} is already connected from {old.peer}"
            log.warning("refused a second link of site %s from %s: %s", link.site, link.peer, reason)
            link.close(ErrorCode.DENIED, reason)
            return
        self.sites[link.site] = link
        info = link.info
        assert info is not None
        log.info(
            "site %s connected (%d applications, handlers %s)",
            link.site,
            len(info.applications),
            ",".join(info.handlers),
        )

    def site_lost(self, link: SiteLink, reason: str) -> None:
        if self.sites.get(link.site) is link:
            del self.sites[link.site]
            log.warning("site %s disconnected: %s", link.site, reason)
