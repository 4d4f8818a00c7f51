"""The tower's WebSocket server: authorise before upgrading, then relay.

Every refusal happens in ``process_request``, before the WebSocket upgrade, as an
HTTP status with the platform's JSON error body, so a client sees a one-line
reason and no half-open session.  Every decision there (a session accepted or
refused, a ``show`` answered) is one audit record; a session whose record cannot
be written is refused (503), so nothing is let through unrecorded.
"""

from __future__ import annotations

import asyncio
import http
import json
import logging
import re
import secrets
import signal
import ssl
import weakref
from dataclasses import replace
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from websockets.asyncio.server import ServerConnection
from websockets.asyncio.server import serve as ws_serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from .. import aio
from ..protocol import MAX_MESSAGE_ACCEPTED, SUBPROTOCOL, ErrorCode, check_ip_address
from . import audit
from .audit import AuditLog
from .config import TowerConfig
from .links import ClientLink, Route, SiteLink
from .siteinfo import InstanceInfo, SiteInfo
from .store import TowerStore

log = logging.getLogger("supctl.tower")

CONNECT_PATH = re.compile(r"^/v1/state/applications/([^/]+)/service-instances/([^/]+)/connect$")
EXEC_PATH = re.compile(r"^/v1/state/applications/([^/]+)/service-instances/([^/]+)/containers/([^/]+)/exec$")
INSTANCES_PATH = re.compile(r"^/v1/state/applications/([^/]+)/service-instances$")
ENFORCER_PATH = "/v1/enforcer"
#: How long a client may take to finish the TLS + WebSocket handshake.
OPEN_TIMEOUT = 10.0


class Rejection(Exception):
    def __init__(self, status: int, message: str, info: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.info = info


def json_response(body: dict[str, Any]) -> Response:
    data = json.dumps(body).encode()
    headers = Headers([("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
    return Response(200, "OK", headers, data)


def error_response(status: int, message: str, info: Any = None) -> Response:
    body = json.dumps({"errors": [{"error-message": message, "error-info": info}]}).encode()
    reason = http.HTTPStatus(status).phrase
    headers = Headers([("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return Response(status, reason, headers, body)


def bearer_token(request: Request) -> str:
    value = request.headers.get("Authorization", "")
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Rejection(401, "missing API token")
    return token.strip()


def single(query: dict[str, list[str]], name: str, *, required: bool = True) -> str:
    values = query.get(name, [])
    if len(values) > 1:
        raise Rejection(400, f"query parameter {name!r} given more than once")
    if not values:
        if required:
            raise Rejection(400, f"missing query parameter {name!r}")
        return ""
    return values[0]


class Tower:
    def __init__(self, store: TowerStore, audit_log: AuditLog | None = None) -> None:
        self.store = store
        self.audit = audit_log
        # Who the request being authorised comes from ("admin:ACCESSOR"), once its token
        # checked out: process_request is synchronous, so it never mixes two requests.
        self._requester = ""
        self.sites: dict[str, SiteLink] = {}
        # Weak: a handshake that fails after process_request (no Upgrade header, client gone)
        # never reaches handler(), which pops the entry; it must not stay forever.
        self._routes: weakref.WeakKeyDictionary[ServerConnection, Route | str] = weakref.WeakKeyDictionary()

    # --- before the upgrade ---------------------------------------------------

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        self._requester = ""
        try:
            outcome = self._authorise(request)
        except Rejection as exc:
            log.info("refused %s %s: %d %s", _peer(connection), urlsplit(request.path).path, exc.status, exc)
            self._audit_refused(connection, request, exc.status, str(exc))
            return error_response(exc.status, str(exc), exc.info)
        except Exception:  # a bug here must cost one request, not the tower
            log.exception("internal error authorising %s", request.path)
            self._audit_refused(connection, request, 500, "internal error in the control tower")
            return error_response(500, "internal error in the control tower")
        if isinstance(outcome, Response):
            # A plain GET of state, answered without upgrading.
            if not self._audit(
                audit.record("show", **self._requested(connection, request), status=200, result="ok")
            ):
                return error_response(503, "the control tower cannot write its audit log")
            return outcome
        if isinstance(outcome, Route):
            outcome = replace(outcome, peer=_peer(connection), session=secrets.token_hex(4))
            rec = audit.record("session-accepted", path=audit.cut(urlsplit(request.path).path), result="ok")
            rec.update(audit.route_fields(outcome))
            if not self._audit(rec):
                return error_response(503, "the control tower cannot write its audit log")
        self._routes[connection] = outcome
        return None

    # --- audit records of requests ----------------------------------------------

    def _audit(self, rec: dict[str, Any]) -> bool:
        return self.audit is None or self.audit.append(rec)

    def _audit_refused(
        self, connection: ServerConnection, request: Request, status: int, message: str
    ) -> None:
        try:
            fields = self._requested(connection, request)
            result = f"{status} {message}"
            self._audit(audit.record("session-refused", **fields, status=status, result=result))
        except Exception:  # recording a refusal must never turn it into something else
            log.exception("internal error recording a refusal of %s", urlsplit(request.path).path)

    def _requested(self, connection: ServerConnection, request: Request) -> dict[str, Any]:
        """What a request asked for, read leniently from its URL (it may be invalid), and who
        asked (if its token checked out).  Values the client chose are cut short."""
        url = urlsplit(request.path)
        try:
            query = parse_qs(url.query, keep_blank_values=True)
        except ValueError:
            query = {}

        def first(name: str) -> str | None:
            return audit.cut(query.get(name, [None])[0])

        user, accessor = audit.split_who(self._requester)
        fields: dict[str, Any] = {
            "user": user,
            "accessor": accessor,
            "client": _peer(connection),
            "site": first("site"),
            "path": audit.cut(url.path),
        }
        if "upgrade" not in request.headers.get("Connection", "").lower():
            fields["verb"] = "show"
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
        return fields

    def _authorise(self, request: Request) -> Route | str | Response:
        url = urlsplit(request.path)
        try:
            query = parse_qs(url.query, keep_blank_values=True, strict_parsing=bool(url.query))
        except ValueError:
            raise Rejection(400, "malformed query string") from None
        if "upgrade" not in request.headers.get("Connection", "").lower():
            return json_response(self._show(url.path, query, self._admin(request)))
        offered = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")]
        if SUBPROTOCOL not in offered:
            raise Rejection(400, f"the client must offer the WebSocket subprotocol {SUBPROTOCOL}")
        if url.path == ENFORCER_PATH:
            site = single(query, "site")
            if not self.store.check_site(site, bearer_token(request)):
                raise Rejection(401, f"invalid token for site {site!r}")
            return site
        if match := CONNECT_PATH.match(url.path):
            who = self._admin(request)
            return self._connect_route(unquote(match[1]), unquote(match[2]), query, who)
        if match := EXEC_PATH.match(url.path):
            who = self._admin(request)
            app, instance, container = (unquote(part) for part in match.groups())
            return self._exec_route(app, instance, container, query, who)
        raise Rejection(404, f"no such endpoint: {url.path}")

    def _admin(self, request: Request) -> str:
        accessor = self.store.check_admin(bearer_token(request))
        if accessor is None:
            raise Rejection(401, "invalid API token")
        self._requester = f"admin:{accessor}"
        return self._requester

    def _site(self, query: dict[str, list[str]]) -> tuple[str, SiteInfo]:
        site = single(query, "site")
        if not self.store.site_exists(site):
            raise Rejection(404, f"unknown site {site!r}")
        link = self.sites.get(site)
        if link is None or link.info is None:
            raise Rejection(503, f"site {site!r} is not connected to the control tower")
        return site, link.info

    @staticmethod
    def _instance(site: str, info: SiteInfo, app: str, instance: str) -> InstanceInfo:
        if app not in info.applications:
            raise Rejection(404, f"application {app!r} not found at site {site!r}")
        found = info.instance(app, instance)
        if found is None:
            raise Rejection(
                404, f"service instance {instance!r} of application {app!r} not found at site {site!r}"
            )
        return found

    @staticmethod
    def _handler(site: str, info: SiteInfo, name: str, what: str) -> None:
        if name not in info.handlers:
            raise Rejection(
                400, f"{what} {name!r} is not supported at site {site!r}", {"supported": info.handlers}
            )

    def _connect_route(self, app: str, instance: str, query: dict[str, list[str]], who: str) -> Route:
        protocol = single(query, "protocol")
        port_text = single(query, "port")
        ip_text = single(query, "ip-address", required=False)
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise Rejection(400, f"port must be 1-65535, got {port_text!r}")
        ip = ""
        if ip_text:
            try:
                ip = check_ip_address(ip_text)
            except ValueError:
                raise Rejection(400, f"ip-address must be a numeric IP address, got {ip_text!r}") from None
        site, info = self._site(query)
        self._instance(site, info, app, instance)
        self._handler(site, info, protocol, "protocol")
        return Route("connect", site, app, instance, protocol, int(port_text), ip, who=who)

    def _exec_route(
        self, app: str, instance: str, container: str, query: dict[str, list[str]], who: str
    ) -> Route:
        site, info = self._site(query)
        found = self._instance(site, info, app, instance)
        if container not in found.containers:
            raise Rejection(
                404, f"container {container!r} not found in service instance {instance!r} at site {site!r}"
            )
        self._handler(site, info, "exec", "verb")
        return Route("exec", site, app, instance, container=container, who=who)

    def _show(self, path: str, query: dict[str, list[str]], who: str) -> dict[str, Any]:
        """``GET /v1/state/...``: what the tower knows of sites, for ``supctl show``."""
        if path == "/v1/state/sites":
            return {"sites": [self._site_summary(name) for name in self.store.sites()]}
        if path == "/v1/state/applications":
            _, info = self._site(query)
            return {
                "applications": [
                    {"name": app, "service-instances": sorted(instances)}
                    for app, instances in sorted(info.applications.items())
                ]
            }
        if match := INSTANCES_PATH.match(path):
            site, info = self._site(query)
            app = unquote(match[1])
            if app not in info.applications:
                raise Rejection(404, f"application {app!r} not found at site {site!r}")
            instances = info.applications[app]
            return {"service-instances": [instances[name].show() for name in sorted(instances)]}
        raise Rejection(404, f"no such endpoint: {path}")

    def _site_summary(self, name: str) -> dict[str, Any]:
        link = self.sites.get(name)
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
        if isinstance(route, str):
            site = SiteLink(connection, self, route)
            await site.run()
            return
        log.info("session opened %s from %s", route.summary, _peer(connection))
        session = ClientLink(connection, self, route)
        await session.run()
        log.info("session closed %s: %s", route.summary, session.lost_reason or "closed")

    def site_connected(self, link: SiteLink) -> None:
        old = self.sites.get(link.site)
        self.sites[link.site] = link
        if old is not None and old is not link:
            # The newest link wins: the old one is usually a dead TCP connection
            # whose keepalive has not failed yet.
            log.warning("site %s reconnected; closing its previous link", link.site)
            old.close(ErrorCode.LINK_LOST, "replaced by a newer link of the same site")
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


def _peer(connection: ServerConnection) -> str:
    try:
        host, port = connection.remote_address[:2]
    except (TypeError, ValueError, OSError):
        return "?"
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def server_ssl_context(config: TowerConfig) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(config.cert), str(config.key))
    return context


async def run_tower(
    config: TowerConfig, host: str, port: int, insecure: bool, started: asyncio.Event | None = None
) -> None:
    audit_log = AuditLog(config.audit)
    tower = Tower(TowerStore(config.state), audit_log)
    context = None if insecure else server_ssl_context(config)
    async with ws_serve(
        tower.handler,
        host,
        port,
        ssl=context,
        process_request=tower.process_request,
        subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
        compression=None,
        max_size=MAX_MESSAGE_ACCEPTED,
        write_limit=2**18,
        open_timeout=OPEN_TIMEOUT,
        server_header="control-tower",
    ) as server:
        address = next(iter(server.sockets)).getsockname()
        shown = f"[{address[0]}]" if ":" in address[0] else address[0]
        log.warning("control-tower listening on %s://%s:%d", "ws" if insecure else "wss", shown, address[1])
        if started is not None:
            started.set()
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        log.warning("control-tower stopping")
    audit_log.close()


def serve(config: TowerConfig, host: str, port: int, insecure: bool) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("websockets").setLevel(logging.WARNING)
    aio.run(run_tower(config, host, port, insecure))
