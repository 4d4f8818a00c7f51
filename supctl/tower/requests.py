"""Reading the tower's HTTP requests: endpoints, names and sites from the URL, the
client's address, what a session asks for (:func:`connect_access`, :func:`exec_access`:
strict, canonical, 400 on anything else) and what a request asked for (for its audit
record, read leniently: it may be invalid).  No state: :mod:`.authorise` judges, this
only reads."""

from __future__ import annotations

import logging
import re
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request

from ..protocol.names import parse_port, valid_name, valid_site_name
from ..protocol.targets import canonical_address
from . import audit
from .httpapi import Rejection, single
from .route import Access

log = logging.getLogger("supctl.tower")

CONNECT_PATH = re.compile(r"^/v1/state/applications/([^/]+)/service-instances/([^/]+)/connect$")
EXEC_PATH = re.compile(r"^/v1/state/applications/([^/]+)/service-instances/([^/]+)/containers/([^/]+)/exec$")
#: Any verb a plugin registers, at a service instance or at one of its containers
#: (docs/protocol.md, "Verbs"): the tower judges and relays it without knowing what it does.
VERB_PATH = re.compile(
    r"^/v1/state/applications/([^/]+)/service-instances/([^/]+)(?:/containers/([^/]+))?/verbs/([^/]+)$"
)
#: Verbs the generic route does not take: each has a URL of its own that says more
#: (connect's targets), or is not a stream at all (show).
OWN_ENDPOINTS = {
    "connect": "connect has its own endpoint (.../service-instances/INSTANCE/connect?protocol=&port=)",
    "show": "show is not a stream: GET /v1/state/... instead",
}
INSTANCES_PATH = re.compile(r"^/v1/state/applications/([^/]+)/service-instances$")
ENFORCER_PATH = "/v1/enforcer"
#: Plain GETs that manage a user's login token, and the audit event (and verb) of each.
ACCOUNT_PATHS = {"/v1/login": "login", "/v1/logout": "logout", "/v1/token/renew": "renew"}
#: Who the bearer token is (``supctl whoami``): answered like a show, audited as ``whoami``.
WHOAMI_PATH = "/v1/whoami"


def audit_event(path: str) -> str:
    """The audit record's event of an answered GET of ``path``."""
    return ACCOUNT_PATHS.get(path, "whoami" if path == WHOAMI_PATH else "show")


def requested(requester: str, connection: ServerConnection, request: Request) -> dict[str, Any]:
    """What a request asked for, read leniently from its URL (it may be invalid), and who
    asked (if its token checked out).  Values the client chose are cut short."""
    url = urlsplit(request.path)
    try:
        query = parse_qs(url.query, keep_blank_values=True)
    except ValueError:
        query = {}

    def first(name: str) -> str | None:
        return audit.cut(query.get(name, [None])[0])

    user, accessor = audit.split_who(requester)
    fields: dict[str, Any] = {
        "user": user,
        "accessor": accessor,
        "client": peer(connection),
        "site": first("site"),
        "path": audit.cut(url.path),
    }
    if "upgrade" not in request.headers.get("Connection", "").lower():
        fields["verb"] = audit_event(url.path)
    elif url.path == ENFORCER_PATH:
        fields["verb"] = "enforcer"
    elif match := CONNECT_PATH.match(url.path):
        ip, port = first("ip-address") or "127.0.0.1", first("port")
        fields.update(
            verb="connect",
            application=audit.cut(unquote(match[1])),
            service_instance=audit.cut(unquote(match[2])),
            protocol=first("protocol"),
            target=f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}",
        )
    elif match := EXEC_PATH.match(url.path):
        app, instance, container = (audit.cut(unquote(part)) for part in match.groups())
        fields.update(verb="exec", application=app, service_instance=instance, container=container)
    elif match := VERB_PATH.match(url.path):
        app, instance, container, verb = (audit.cut(unquote(part or "")) for part in match.groups())
        fields.update(verb=verb, application=app, service_instance=instance, container=container or None)
    return fields


def site_name(query: dict[str, list[str]]) -> str:
    site = single(query, "site")
    if not valid_site_name(site):
        raise Rejection(400, f"invalid site name {site!r} (lower-case letters, digits and '-')")
    return site


#: Targets one connect session may carry (``connect tcp 443 --bind 8443 tcp 80 ...``).
MAX_TARGETS = 16


def connect_accesses(app: str, instance: str, query: dict[str, list[str]]) -> list[Access]:
    """A connect session's targets: ``protocol``, ``port`` and optional ``ip-address``, each
    repeated once per target in the same order (``ip-address`` empty for the service itself,
    or absent for all), each checked (400).  One target is the seed's session; a stream picks
    another by its position (``forward`` in the OPEN's args, :mod:`.links`)."""
    site = site_name(query)
    ports = query.get("port", [])
    count = len(ports)
    if count == 0:
        raise Rejection(400, "missing query parameter 'port'")
    if count > MAX_TARGETS:
        raise Rejection(400, f"at most {MAX_TARGETS} targets in one session, got {count}")
    protocols, addresses = query.get("protocol", []), query.get("ip-address", [""] * count)
    if len(protocols) != count or len(addresses) != count:
        raise Rejection(400, "'protocol', 'port' and 'ip-address' (if given) must be given once per target")
    return [
        connect_target(site, app, instance, *target)
        for target in zip(protocols, ports, addresses, strict=True)
    ]


def connect_target(site: str, app: str, instance: str, protocol: str, port_text: str, ip_text: str) -> Access:
    """One target of a connect session, checked (400) and canonical."""
    if not valid_name(protocol):
        raise Rejection(400, f"invalid protocol {audit.cut(protocol, 40)!r}")
    port = parse_port(port_text)
    if port is None:
        raise Rejection(400, f"port must be 1-65535 in ASCII digits, got {audit.cut(port_text, 40)!r}")
    ip = ""
    if ip_text:
        # Canonical before it is judged: the address the policy sees is the one dialled.
        try:
            ip = canonical_address(ip_text)
        except ValueError as exc:
            raise Rejection(400, f"ip-address {audit.cut(ip_text, 70)!r}: {exc}") from None
    return Access(
        "connect", site, app, instance, protocol=protocol, port=port, ip_address=ip,
        requested_address=ip_text if ip_text != ip else "",
    )  # fmt: skip


def exec_access(app: str, instance: str, container: str, query: dict[str, list[str]]) -> Access:
    """An exec session's request (its site checked: 400)."""
    return Access("exec", site_name(query), app, instance, container=container)


def verb_access(app: str, instance: str, container: str, verb: str, query: dict[str, list[str]]) -> Access:
    """A session of any other verb (a plugin's), at ``instance`` or, with ``container``,
    at one of its containers (its site checked: 400).  ``exec`` is the same request
    as at its own endpoint, so it is judged the same; it needs a container."""
    if verb in OWN_ENDPOINTS:
        raise Rejection(400, f"verb {verb!r}: {OWN_ENDPOINTS[verb]}")
    if verb == "exec" and not container:
        raise Rejection(400, "exec runs in a container: .../containers/CONTAINER/verbs/exec")
    return Access(verb, site_name(query), app, instance, container=container)


def upgrading(request: Request) -> bool:
    """Whether ``request`` asks for the WebSocket upgrade (else it is a plain GET)."""
    return "upgrade" in request.headers.get("Connection", "").lower()


def url_name(quoted: str, what: str) -> str:
    """A name from a URL path, unquoted and checked (:mod:`supctl.protocol.names`): 400 if
    it is not one, before anything is looked up or logged."""
    name = unquote(quoted)
    if not valid_name(name):
        raise Rejection(400, f"invalid {what} name {audit.cut(name, 70)!r}")
    return name


def peer_host(connection: ServerConnection) -> str:
    try:
        return str(connection.remote_address[0])
    except (TypeError, IndexError, OSError):
        return "?"


def has_feature(connection: ServerConnection, feature: str) -> bool:
    """Whether the peer's ``Supctl-Features`` header names ``feature`` (docs/protocol.md)."""
    features = connection.request.headers.get("Supctl-Features", "") if connection.request else ""
    return feature in features.replace(" ", "").split(",")


def peer(connection: ServerConnection) -> str:
    try:
        host, port = connection.remote_address[:2]
    except (TypeError, ValueError, OSError):
        return "?"
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
