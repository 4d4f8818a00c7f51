"""The tower's WebSocket server: glue between websockets and the tower's parts.

Before the upgrade (websockets' ``process_request``) a request is read
(:mod:`.requests`), its token authenticated into a :class:`~.authorise.Principal`
and judged by :func:`~.authorise.authorise` against the policy set in force and a
view of the sites (a login, logout or renewal is answered by :mod:`.accounts`, which
the tower hands its token check); after it, the links run with the live state in the
:class:`~.hub.Hub`.  Every refusal happens before the upgrade, as an HTTP status
with the platform's JSON error body, so a client sees a one-line reason and no
half-open session.  Every decision there (a session accepted or refused, a ``show``
answered) is one audit record; a session whose record cannot be written is refused
(503), so nothing is let through unrecorded.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import weakref
from collections.abc import Callable
from dataclasses import replace
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request, Response

from ..protocol import SUBPROTOCOL, ErrorCode
from ..protocol.frames import CLOSE_CODE_BASE
from ..protocol.names import valid_site_name
from ..ratelog import RateLimitedLog
from . import audit, show
from .accounts import AccountDone, Accounts, Caller
from .audit import AuditLog
from .authorise import Principal, Refusal, Sites, authorise
from .database import StoreUnavailable
from .directory import Directory
from .httpapi import Rejection, basic_credentials, bearer_token, error_response, json_response, single
from .hub import Hub, sweep_forever
from .limits import Limits
from .links import ClientLink, PeerRoutes, SiteLink
from .logins import LoginCheck
from .metrics import TowerMetrics
from .probes import PROBE_PATHS, Probes
from .requests import (
    ACCOUNT_PATHS,
    CONNECT_PATH,
    ENFORCER_PATH,
    EXEC_PATH,
    VERB_PATH,
    WHOAMI_PATH,
    audit_event,
    connect_accesses,
    exec_access,
    has_feature,
    peer,
    peer_host,
    requested,
    upgrading,
    url_name,
    verb_access,
)
from .route import Access, Route, SiteClaim
from .siteinfo import SiteInfo
from .store import hash_token
from .users import DEFAULT_LOGIN_EXPIRY, Identity, TokenRefused, iso

log = logging.getLogger("supctl.tower")

#: Seconds a session for a site held by another replica waits for the peer link to it.
PEER_WAIT = 5.0


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
        self.policy: Directory | None = store
        self.login_expiry = DEFAULT_LOGIN_EXPIRY
        # The identity behind the request being authorised (set with _requester), for whoami.
        self._identity: Identity | None = None
        self.limits = limits or Limits()
        # Login, logout and renewal (:mod:`.accounts`); who asks is told by _caller.
        self.accounts = Accounts(self.limits, self._caller, self.peer_log, clock)
        # Site links, supctl sessions and what they hold (:mod:`.hub`).
        self.hub = Hub(self.limits, clock)
        # The links to the other replicas (:mod:`.peering`); None: no [cluster] advertise.
        self.peers: PeerRoutes | None = None
        # /healthz and /readyz (:mod:`.probes`): no token, no audit record.
        # The store is looked up at each probe, not now (tests give a tower a stand-in store).
        self.probes = Probes(lambda: self.store.fresh(), lambda: self.hub.draining, clock)  # noqa: PLW0108
        # Prometheus metrics (:mod:`.metrics`), when serving sets them up.
        self.metrics: TowerMetrics | None = None
        # Who the request being authorised comes from ("admin:ACCESSOR"), once its token
        # checked out: process_request is synchronous, so it never mixes two requests.
        self._requester = ""
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
        (:meth:`.accounts.Accounts.write`).

        Only those await; everything else stays synchronous on the loop, and what a
        request's judgement needs (who asked) is carried across the await, so two
        requests never interleave.
        """
        path = urlsplit(request.path).path
        if path in PROBE_PATHS and not upgrading(request):
            return await self.probes.answer(path)
        if self.hub.draining and upgrading(request):
            message = "the control tower is shutting down; connect again"
            self._requester = ""
            self._audit_refused(connection, request, 503, message)
            return error_response(503, message)
        try:
            await self.store.fresh()
            await self._await_peer(path, request)
        except StoreUnavailable as exc:
            return self._store_unavailable(connection, request, exc)
        if self.users is None or path not in ACCOUNT_PATHS or upgrading(request):
            return self.process_request(connection, request)
        login = None
        if path == "/v1/login":
            try:
                name, password = basic_credentials(request)
            except Rejection:
                pass  # Accounts.write refuses it, with the reason
            else:
                login = await self.accounts.logins(self.users).check(peer_host(connection), name, password)
        done = await self.accounts.write(path, request, login, self.users, self.login_expiry)
        return self.process_request(connection, request, login, done)

    async def _await_peer(self, path: str, request: Request) -> None:
        """A session for a site another replica holds: let the peer link to that replica
        come up (a dial, bounded by :data:`PEER_WAIT`) before the session is judged and
        accepted, so its first stream does not find the link missing.  Before the token
        is checked: a link per replica is kept anyway, and dials are rate-limited."""
        presence, peers = self.hub.presence, self.peers
        if peers is None or presence is None or path == ENFORCER_PATH or not upgrading(request):
            return
        site = parse_qs(urlsplit(request.path).query).get("site", [""])[0]
        if not valid_site_name(site) or self.hub.site_link(site) is not None:
            return
        for again in (False, True):  # again: dead, or the site moved; read the claims again
            remote = await presence.lookup(site, again=again)
            if remote is None:
                return
            await peers.ready(remote, PEER_WAIT)
            if peers.link(remote)[0] is not None:
                return

    def _store_unavailable(
        self, connection: ServerConnection, request: Request, exc: StoreUnavailable
    ) -> Response:
        """Fail closed: nothing is judged against a copy that may be stale."""
        message = "the control tower cannot reach its store"
        self.peer_log.warning("store unavailable", "%s", exc)
        self._requester = ""
        self._audit_refused(connection, request, 503, message)
        return error_response(503, message)

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
                    audit_event(urlsplit(request.path).path),
                    **requested(self._requester, connection, request),
                    status=200,
                    result="ok",
                )
            ):
                return error_response(503, "the control tower cannot write its audit log")
            return outcome
        if isinstance(outcome, Route):
            outcome = outcome.accepted(peer(connection), secrets.token_hex(4))
            if (message := self.hub.session_refusal(outcome.user)) is not None:
                self._log_refused(connection, request, 429, message)
                self._audit_refused(connection, request, 429, message)
                return error_response(429, message)
            for target in outcome.targets:  # one record per target granted, one session id
                rec = audit.record(
                    "session-accepted", path=audit.cut(urlsplit(request.path).path), result="ok"
                )
                rec.update(audit.route_fields(target))
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
        fields = {"peer": peer(connection), "status": status, "reason": message}
        self.peer_log.info(key, "refused %s %s: %d %s", peer(connection), path, status, message, extra=fields)

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
            principal = self._authenticate(request)
            if url.path == WHOAMI_PATH:
                return json_response(self._whoami(principal))
            body = show.answer(url.path, query, principal, self.store.sites(), self.policy, self._sites())
            return json_response(body)
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
            if (existing := self.hub.site_link(site)) is not None:
                raise Rejection(409, f"site {site} is already connected from {existing.peer}")
            return SiteClaim(site, hash_token(token))
        if match := CONNECT_PATH.match(url.path):
            principal = self._authenticate(request)
            app, instance = url_name(match[1], "application"), url_name(match[2], "service instance")
            first, *more = (self._grant(principal, a) for a in connect_accesses(app, instance, query))
            return replace(first, more=tuple(more))
        if match := EXEC_PATH.match(url.path):
            principal = self._authenticate(request)
            app, instance = url_name(match[1], "application"), url_name(match[2], "service instance")
            return self._grant(principal, exec_access(app, instance, url_name(match[3], "container"), query))
        if match := VERB_PATH.match(url.path):
            principal = self._authenticate(request)
            app, instance = url_name(match[1], "application"), url_name(match[2], "service instance")
            container = url_name(match[3], "container") if match[3] is not None else ""
            access = verb_access(app, instance, container, url_name(match[4], "verb"), query)
            return self._grant(principal, access)
        raise Rejection(404, f"no such endpoint: {url.path}")

    def _whoami(self, principal: Principal) -> dict[str, Any]:
        """Who the request's token is (``supctl whoami``): never the token itself."""
        identity = self._identity
        expires = self.store.expires(identity.token_hash) if identity is not None else None
        return {
            "user": principal.user,
            "accessor": principal.accessor,
            "kind": identity.kind if identity is not None else "admin",
            "policies": list(principal.policies or ()),
            "expires": iso(expires) if expires is not None else None,
        }

    def _caller(self, request: Request) -> Caller:
        """Who sends a logout or renewal (:mod:`.accounts`): :meth:`_authenticate`'s
        requester and identity, handed over rather than read from the tower."""
        self._requester = ""
        try:
            self._authenticate(request)
        except Rejection as exc:
            return Caller(self._requester, refusal=exc)
        return Caller(self._requester, self._identity)

    def _authenticate(self, request: Request) -> Principal:
        """Who sends ``request``: the admin token (user "admin", allow-all policy) or a
        user's login or API token (that user's policies); 401 for any other.  Sets
        ``_requester`` for the request's audit record (and ``_identity``, for whoami and
        :meth:`_caller`), also for a token refused as revoked or expired."""
        token = bearer_token(request)
        self._identity = None
        accessor = self.store.check_admin(token)
        if accessor is not None:
            principal = Principal.admin(accessor)
        else:
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
            principal = Principal(identity.user, identity.accessor, identity.policies)
        self._requester = principal.who
        return principal

    def _sites(self) -> Sites:
        """The sites as :func:`.authorise.authorise` sees them, for one request: each site's
        link is looked up (and evicted if its token is stale) once, so the request is
        judged against one view."""
        seen: dict[str, SiteInfo | None] = {}
        live = self.hub.site_info

        def info(site: str) -> SiteInfo | None:
            if site not in seen:
                seen[site] = live(site)
            return seen[site]

        return Sites(self.store.site_exists, info, self.hub.site_replica, self.store.sites)

    def _grant(self, principal: Principal, access: Access) -> Route:
        verdict = authorise(principal, access, self.policy, self._sites())
        if isinstance(verdict, Refusal):
            raise show.rejection(verdict)
        return verdict

    def token_refusal(self, who: str) -> str | None:
        """Why the token behind ``who`` ("USER:ACCESSOR" of an accepted session) may no
        longer be used, or None while it is valid."""
        user, _, accessor = who.partition(":")
        if user == "admin":
            return None if self.store.admin_valid(accessor) else "token revoked"
        if self.users is None:
            return "token revoked"
        return self.users.refusal(accessor)

    def target_refusals(self, route: Route) -> tuple[str | None, ...]:
        """Why each target of an accepted session's ``route`` (:attr:`.Route.targets`, in
        order) may no longer be used, None for each that still may.

        Judged at every OPEN and by the sweep: the token (revoked, expired, its user
        removed) and the policies in force *now*, read anew into the principal, then
        the same judgement as at the upgrade (:func:`.authorise.authorise`, ``again``),
        of every target: a session ends when none is left, a target refused alone
        loses its streams (:meth:`.hub.Hub.sweep`, :meth:`.links.ClientLink._open`).
        """
        user, accessor = route.user, route.who.partition(":")[2]
        refusal = self.token_refusal(route.who)
        if refusal is not None:
            principal = Principal(user, accessor, (), refusal)
        elif user == "admin":
            principal = Principal.admin(accessor)
        else:
            policies = self.users.policies(user) if self.users is not None else None
            principal = Principal(user, accessor, policies)
        # again=True never looks at the sites (the link's business): no per-request view.
        sites = Sites(self.store.site_exists, self.hub.site_info)
        verdicts = (authorise(principal, t.access, self.policy, sites, again=True) for t in route.targets)
        return tuple(v.message if isinstance(v, Refusal) else None for v in verdicts)

    def site_refusal(self, site: str, token_hash: str) -> str | None:
        """Why a site link's token is no longer the site's (rotated, removed), or None."""
        return self.store.site_refusal(site, token_hash)

    async def sweep_forever(self) -> None:
        """The periodic sweep of the hub (timers, authority, site tokens), for ever, and at
        once after the directory reloaded (a revocation, a narrowed policy)."""
        wake = asyncio.Event()
        self.store.on_reload = wake.set
        await sweep_forever(self.hub, self.target_refusals, after=self.peer_log.flush, wake=wake)

    # --- after the upgrade ----------------------------------------------------

    async def handler(self, connection: ServerConnection) -> None:
        route = self._routes.pop(connection, None)
        if route is None:
            await connection.close(1011, "no route")
            return
        if isinstance(route, SiteClaim):
            site = SiteLink(
                connection, self, route, peer(connection), goaway=has_feature(connection, "goaway")
            )
            await site.run()
            return
        reason = self.hub.session_refusal(route.user)
        if reason is not None:  # several handshakes raced past process_request
            log.warning("closing session %s: %s", route.summary, reason)
            await connection.close(CLOSE_CODE_BASE + ErrorCode.LIMIT, reason)
            return
        fields = {"site": route.site, "user": route.user, "session": route.session, "peer": route.peer}
        log.info("session opened %s from %s", route.summary, peer(connection), extra=fields)
        session = ClientLink(connection, self, route, goaway=has_feature(connection, "goaway"))
        self.hub.open_session(session)
        try:
            await session.run()
        finally:
            self.hub.close_session(session)
        reason = session.lost_reason or "closed"
        log.info("session closed %s: %s", route.summary, reason, extra={**fields, "reason": reason})
