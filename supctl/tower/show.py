"""``GET /v1/state/...``: what the tower answers ``supctl show``, as far as the asker may see.

Every judgement is :mod:`.authorise`'s; this only reads the URL and shapes the JSON.
A site the asker may not see is answered as if it did not exist (404), so a refusal
tells nothing.  Refusals become :class:`~.httpapi.Rejection` (:func:`rejection`), as
for every request before the upgrade.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from .authorise import (
    PolicySet,
    Principal,
    Refusal,
    Sites,
    authorise,
    visible_applications,
    visible_sites,
)
from .httpapi import Rejection
from .requests import INSTANCES_PATH, site_name, url_name
from .route import Access
from .siteinfo import SiteInfo

log = logging.getLogger("supctl.tower")


def rejection(refusal: Refusal) -> Rejection:
    """The HTTP answer to a refusal; its cause (the policy file's error) goes to the log,
    for the operator, never to the client."""
    if refusal.cause is not None:
        log.error("%s", refusal.cause)
    return Rejection(refusal.status, refusal.message, refusal.info)


def answer(
    path: str,
    query: dict[str, list[str]],
    principal: Principal,
    names: Iterable[str],
    policies: PolicySet | None,
    sites: Sites,
) -> dict[str, Any]:
    """The body for ``path``; ``names``: every site that exists (listed by ``/v1/state/sites``)."""
    if path == "/v1/state/sites":
        shown = visible_sites(principal, names, policies, sites)
        if isinstance(shown, Refusal):
            raise rejection(shown)
        return {"sites": [_summary(name, sites.info(name), sites.replica(name)) for name in shown]}
    if path == "/v1/state/applications":
        site = site_name(query)
        apps = visible_applications(principal, site, policies, sites)
        if isinstance(apps, Refusal):
            raise rejection(apps)
        info = sites.info(site)
        assert info is not None  # granted: connected
        return {
            "applications": [
                {"name": app, "service-instances": sorted(info.applications[app])} for app in apps
            ]
        }
    if match := INSTANCES_PATH.match(path):
        app = url_name(match[1], "application")
        site = site_name(query)
        verdict = authorise(principal, Access("show", site, app), policies, sites)
        if isinstance(verdict, Refusal):
            raise rejection(verdict)
        info = sites.info(site)
        assert info is not None  # granted: connected, and the application is there
        instances = info.applications[app]
        return {"service-instances": [instances[name].show() for name in sorted(instances)]}
    raise Rejection(404, f"no such endpoint: {path}")


def _summary(name: str, info: SiteInfo | None, replica: str | None) -> dict[str, Any]:
    return {
        "name": name,
        "connected": info is not None,
        "version": info.version if info else None,
        "applications": sorted(info.applications) if info else [],
        # The tower replica holding the site's link, the same answer from every replica.
        "replica": (replica or None) if info else None,
    }
