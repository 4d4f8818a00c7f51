"""Authorisation: one pure function from who asks and what they ask to a grant or a refusal.

:func:`authorise` judges a supctl session at its upgrade, every stream it opens and
every sweep while it lives (``again=True``), and what ``show`` may reveal.  It reads
nothing but its arguments: the :class:`Principal` (who asks, after authentication),
the :class:`~.route.Access` (the request, parsed and canonical), the policy set in
force and a read-only :class:`Sites` view; no clock, no file, no tower object.  So the
same decision is made wherever it is needed, and a test can state it as a table.

The refusals keep the statuses and texts clients and tests rely on (docs/policies.md).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from ..errors import UsageError
from .policy import ALLOW_ALL, Rule, allowed
from .policy import Request as PolicyRequest
from .route import Access, Route
from .siteinfo import SiteInfo

#: The policy file could not be read: nothing is allowed (fail closed).
POLICY_INVALID = "the control tower's policy file is invalid"


class Principal(NamedTuple):
    """Who asks, once their token checked out: a user, the token's accessor and the names
    of the user's policies in force.  The admin token is user ``admin`` with ``allow-all``.

    When a session is judged again (``authorise(..., again=True)``) the glue reads the
    token and the user anew: ``refusal`` says why the token may no longer be used
    (revoked, expired), and ``policies`` is None when the user was removed.
    """

    user: str
    accessor: str
    policies: tuple[str, ...] | None
    refusal: str | None = None

    # A named tuple (cheap to build: one per upgrade, OPEN and sweep), so no "who" field:
    # it is derived from user and accessor.

    @classmethod
    def admin(cls, accessor: str) -> Principal:
        return cls("admin", accessor, (ALLOW_ALL,))

    @property
    def who(self) -> str:
        """``USER:ACCESSOR``, as routes, logs and audit records name a session's owner."""
        return f"{self.user}:{self.accessor}"


@dataclass(frozen=True)
class Refusal:
    """A request refused: the HTTP status and one-line message the client gets."""

    status: int
    message: str
    info: Any = None  # the error body's "error-info"
    cause: str | None = None  # for the tower's log only (the policy file's error), never sent


class PolicySet(Protocol):
    """The policies in force (today :class:`.policy.PolicyFile`).  ``rules`` raises
    UsageError when the set is invalid."""

    def rules(self, names: Sequence[str]) -> Sequence[Rule]: ...


@dataclass(frozen=True)
class Sites:
    """What :func:`authorise` may know of sites: whether one exists (it has a token), and
    what a connected one reported (None: not connected).  Built by the glue from the
    credential store and the hub's live links."""

    exists: Callable[[str], bool]
    info: Callable[[str], SiteInfo | None]
    # Which replica holds a connected site's link (shown by show sites; never judged).
    replica: Callable[[str], str | None] = lambda site: None
    # Every site that exists: the pool of "did you mean" for an unknown one (never judged).
    names: Callable[[], Iterable[str]] = lambda: ()


def authorise(
    principal: Principal,
    access: Access,
    policies: PolicySet | None,
    sites: Sites,
    *,
    again: bool = False,
) -> Route | Refusal:
    """The :class:`Route` ``principal`` may have for ``access``, or why not.

    ``again``: judging a session already accepted (at an OPEN, in the sweep): only its
    token and the policies in force count (whether its site is connected is the link's
    business), with the texts a running session is closed with.  Else the upgrade: the
    policies first (403 names what was refused), then the site, the instance and the
    handler, so a refused user learns nothing of what exists.  ``show`` answers an
    unknown site and one the principal may not see alike (404).
    """
    if principal.refusal is not None:
        return Refusal(401, principal.refusal)
    names = principal.policies
    if names is None:
        return Refusal(401, "token revoked (its user was removed)")
    try:
        if access.verb == "show":
            return _show(principal, names, access, policies, sites)
        ok = _allows(names, access.policy_request(), policies)
    except UsageError as exc:
        return Refusal(500, POLICY_INVALID if again else f"{POLICY_INVALID} (see its log)", cause=str(exc))
    if not ok:
        what = access.policy_request().describe(principal.user or "?")
        return Refusal(403, f"policy no longer allows {what}" if again else f"policy refuses {what}")
    route = Route.grant(access, principal.who)
    if again:
        return route
    seen = _Seen(names, policies, sites)
    found = _connected(access.site, sites, seen)
    if isinstance(found, Refusal):
        return found
    return _target(access, found, seen) or route


def visible_sites(
    principal: Principal, names: Iterable[str], policies: PolicySet | None, sites: Sites
) -> list[str] | Refusal:
    """Those of ``names`` (existing sites) that ``show`` may list, connected or not."""
    shown = []
    for name in names:
        verdict = authorise(principal, Access("show", name), policies, sites)
        if isinstance(verdict, Refusal) and verdict.status != 503:
            if verdict.status == 404:
                continue  # not for this principal's eyes
            return verdict
        shown.append(name)
    return shown


def visible_applications(
    principal: Principal, site: str, policies: PolicySet | None, sites: Sites
) -> list[str] | Refusal:
    """The applications of connected ``site`` that ``show`` may list (404/503 as for the site)."""
    verdict = authorise(principal, Access("show", site), policies, sites)
    if isinstance(verdict, Refusal):
        return verdict
    info = sites.info(site)
    assert info is not None and principal.policies is not None  # authorise granted it
    try:
        # One judgement per application, not authorise() per application: the site is
        # visible already, and that check alone walks every application.
        return [
            app
            for app in sorted(info.applications)
            if _allows(principal.policies, PolicyRequest("show", site, app), policies)
        ]
    except UsageError as exc:
        return Refusal(500, f"{POLICY_INVALID} (see its log)", cause=str(exc))


# --- the parts --------------------------------------------------------------------------------


def _allows(names: tuple[str, ...], request: PolicyRequest, policies: PolicySet | None) -> bool:
    """Whether the policies ``names`` allow ``request`` in the policy set in force (UsageError
    if that set is invalid).  ``allow-all`` needs no policy set: the admin token works
    even while the policy file is broken."""
    if ALLOW_ALL in names:
        return True
    return allowed(policies.rules(names) if policies is not None else [], request)


def _show(
    principal: Principal,
    names: tuple[str, ...],
    access: Access,
    policies: PolicySet | None,
    sites: Sites,
) -> Route | Refusal:
    """``show`` of a site, or of one application at it.  A site is visible with a show rule
    for it or for an application it reports; anything not visible is "unknown" (404),
    the same answer as for what does not exist, so a refusal tells nothing."""
    site, app = access.site, access.application
    seen = _Seen(names, policies, sites)
    if not sites.exists(site) or not _visible(names, site, policies, sites):
        return Refusal(404, f"unknown site {site!r}{seen.suggest_site(site)}")
    info = _connected(site, sites, seen)
    if isinstance(info, Refusal):
        return info
    if app and (
        app not in info.applications or not _allows(names, PolicyRequest("show", site, app), policies)
    ):
        return Refusal(
            404, f"application {app!r} not found at site {site!r}{seen.suggest_app(site, app, info)}"
        )
    return Route.grant(access, principal.who)


def _visible(names: tuple[str, ...], site: str, policies: PolicySet | None, sites: Sites) -> bool:
    if _allows(names, PolicyRequest("show", site), policies):
        return True
    info = sites.info(site)
    apps = info.applications if info is not None else {}
    return any(_allows(names, PolicyRequest("show", site, app), policies) for app in apps)


#: Names compared for a suggestion at most (difflib's cost grows with them; a refusal a
#: peer can cause stays cheap).
SUGGEST_POOL = 10_000


def _closest(name: str, pool: Iterable[str], may_see: Callable[[str], bool]) -> str:
    """``; did you mean 'X'?`` for the closest of ``pool`` the asker may see, or ''."""
    candidates = [candidate for _, candidate in zip(range(SUGGEST_POOL), pool, strict=False)]
    for close in difflib.get_close_matches(name, candidates, n=3, cutoff=0.75):
        if close != name and may_see(close):
            return f"; did you mean {close!r}?"
    return ""


class _Seen:
    """Suggestions for a 404, only among names the asker may see (``show`` rules): a typo
    gets a hint, and a refusal reveals nothing a ``show`` would not."""

    def __init__(self, names: tuple[str, ...], policies: PolicySet | None, sites: Sites) -> None:
        self.names, self.policies, self.sites = names, policies, sites

    def _may(self, site: str, app: str = "") -> bool:
        try:
            if not app:
                return _visible(self.names, site, self.policies, self.sites)
            return _allows(self.names, PolicyRequest("show", site, app), self.policies)
        except UsageError:
            return False

    def suggest_site(self, site: str) -> str:
        return _closest(site, self.sites.names(), self._may)

    def suggest_app(self, site: str, app: str, info: SiteInfo) -> str:
        return _closest(app, info.applications, lambda name: self._may(site, name))

    def suggest_in(self, site: str, app: str, name: str, pool: Iterable[str]) -> str:
        """Among the instances or containers of ``app``, if the asker may see ``app``."""
        return _closest(name, pool, lambda _: self._may(site, app))


def _connected(site: str, sites: Sites, seen: _Seen) -> SiteInfo | Refusal:
    if not sites.exists(site):
        return Refusal(404, f"unknown site {site!r}{seen.suggest_site(site)}")
    info = sites.info(site)
    if info is None:
        return Refusal(503, f"site {site!r} is not connected to the control tower")
    return info


def _target(access: Access, info: SiteInfo, seen: _Seen) -> Refusal | None:
    """Why the site cannot serve ``access`` as it reports itself (no such instance,
    container or handler), or None."""
    site, app, instance = access.site, access.application, access.service_instance
    if app not in info.applications:
        return Refusal(
            404, f"application {app!r} not found at site {site!r}{seen.suggest_app(site, app, info)}"
        )
    found = info.instance(app, instance)
    if found is None:
        hint = seen.suggest_in(site, app, instance, info.applications[app])
        return Refusal(
            404, f"service instance {instance!r} of application {app!r} not found at site {site!r}{hint}"
        )
    # Every verb at a container (exec always is) needs that container.
    if (access.container or access.verb == "exec") and access.container not in found.containers:
        hint = seen.suggest_in(site, app, access.container, found.containers)
        return Refusal(
            404,
            f"container {access.container!r} not found in service instance {instance!r} at site {site!r}{hint}",
        )
    if access.verb == "connect":
        return _handler(site, info.served("connect"), access.protocol, "protocol")
    return _handler(site, info.served(access.verb), access.verb, "verb")


def _handler(site: str, served: list[str], name: str, what: str) -> Refusal | None:
    """501 when the site's enforcer announced no handler for ``name`` (it has not got the
    plugin): the request may be right, this site just cannot serve it."""
    if name in served:
        return None
    return Refusal(501, f"{what} {name!r} is not supported at site {site!r}", {"supported": served})
