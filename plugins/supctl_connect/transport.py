"""The default transport: one TLS WebSocket to the tower per invocation."""

from __future__ import annotations

import asyncio
import functools
import http.client
import json
import os
import ssl
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlencode

import websockets
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus, InvalidURI, WebSocketException
from websockets.version import version as websockets_version

from supctl import __version__
from supctl.client.settings import ClientSettings
from supctl.errors import (
    DeniedError,
    ProtocolError,
    SupctlError,
    UnavailableError,
    UsageError,
    from_http_status,
)
from supctl.link import Link
from supctl.protocol import MAX_MESSAGE_ACCEPTED, SUBPROTOCOL, Connection
from supctl.tlspin import check_peer, pinned_connection, pinned_context
from supctl.wsconn import DirectClientConnection, keepalive_options

OPEN_TIMEOUT = 15.0


def client_ssl_context(ca_file: str | None) -> ssl.SSLContext:
    """Verify the tower: given CA (or the system store), hostname checked, TLS >= 1.2."""
    try:
        context = ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"cannot load CA file {ca_file}: {exc}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def tower_ssl_context(settings: ClientSettings) -> ssl.SSLContext | None:
    """None for ws://; with a pinned fingerprint no CA/hostname check (the pin replaces them)."""
    if not settings.host.startswith("wss://"):
        return None
    if settings.tower_fingerprint is not None:
        return pinned_context()
    return client_ssl_context(str(settings.ca_file) if settings.ca_file else None)


class PinnedHTTPSConnection(http.client.HTTPSConnection):
    """Checks the tower's certificate fingerprint right after the TLS handshake.

    http.client buffers the request and sends it only once ``connect()`` returned,
    so a mismatch raises before the token leaves this process.
    """

    def __init__(self, *args: Any, pin: bytes, tower: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pin = pin
        self.tower = tower

    def connect(self) -> None:
        super().connect()
        try:
            check_peer(self.sock if isinstance(self.sock, ssl.SSLSocket) else None, self.pin, self.tower)
        except BaseException:
            self.close()
            raise


class PinnedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, context: ssl.SSLContext, pin: bytes, tower: str) -> None:
        super().__init__(context=context)
        self.pinned_context = context
        self.pin = pin
        self.tower = tower

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        connection = functools.partial(PinnedHTTPSConnection, pin=self.pin, tower=self.tower)
        return self.do_open(connection, req, context=self.pinned_context)


def https_opener(settings: ClientSettings) -> urllib.request.OpenerDirector:
    """An opener with the same TLS checks (CA or pin) as the WebSocket sessions."""
    context = tower_ssl_context(settings)
    if context is not None and settings.tower_fingerprint is not None:
        return urllib.request.build_opener(
            PinnedHTTPSHandler(context, settings.tower_fingerprint, settings.host)
        )
    return urllib.request.build_opener(urllib.request.HTTPSHandler(context=context))


def os_reason(exc: BaseException) -> str:
    """A short reason for a failed connect; asyncio hides errno in a generic text."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    errno_ = getattr(exc, "errno", None)
    if errno_:
        return os.strerror(errno_).lower()
    return str(exc) or type(exc).__name__


def rejection_message(exc: InvalidStatus) -> SupctlError:
    """Turn the tower's HTTP rejection (JSON errors body) into one line."""
    response = exc.response
    return http_error(response.status_code, response.reason_phrase, bytes(response.body or b""))


def http_error(status: int, reason: str, body: bytes) -> SupctlError:
    """One line from an HTTP error status and the platform's JSON errors body."""
    text = ""
    try:
        first = json.loads(body)["errors"][0]
        text = str(first.get("error-message", ""))
        info = first.get("error-info")
        if info:
            text += f" ({describe_info(info)})"
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        text = f"the tower answered HTTP {status} {reason}"
    return from_http_status(status, text)


def describe_info(info: object) -> str:
    """An error body's ``error-info`` in words: ``supported: exec, logs, tcp`` for
    ``{"supported": [...]}``; JSON for anything else (its text is the tower's, shown as is)."""
    if isinstance(info, str):
        return info
    if isinstance(info, dict) and all(isinstance(v, list) for v in info.values()):
        return "; ".join(f"{key}: {', '.join(map(str, value))}" for key, value in sorted(info.items()))
    return json.dumps(info, sort_keys=True)


def require_token(settings: ClientSettings) -> str:
    if not settings.token:
        raise DeniedError(
            "no API token: log in with 'supctl do login NAME', or give --token-file, SUPCTL_TOKEN"
            " or token-file in the config file"
        )
    return settings.token


def unreachable(reason: object, host: str) -> SupctlError:
    """The one-line error for a tower that could not be reached over HTTPS."""
    if isinstance(reason, ssl.SSLCertVerificationError):
        return UnavailableError(
            f"the tower's TLS certificate at {host} is not trusted: {reason.verify_message}"
            " (give its CA with --ca-file, or pin it with --tower-fingerprint)"
        )
    if isinstance(reason, ssl.SSLError):
        return UnavailableError(f"TLS handshake with {host} failed: {reason.reason or reason}")
    if isinstance(reason, BaseException):
        return UnavailableError(f"cannot reach the tower at {host}: {os_reason(reason)}")
    return UnavailableError(f"cannot reach the tower at {host}: {reason}")


def _fetch(request: urllib.request.Request, opener: urllib.request.OpenerDirector, host: str) -> bytes:
    """Blocking HTTP(S) GET (run on a worker thread); errors as one-line SupctlErrors."""
    try:
        with opener.open(request, timeout=OPEN_TIMEOUT) as response:
            body: bytes = response.read()
            return body
    except urllib.error.HTTPError as exc:
        with exc:
            raise http_error(exc.code, str(exc.reason), exc.read()) from None
    except urllib.error.URLError as exc:
        raise unreachable(exc.reason, host) from None
    except (OSError, http.client.HTTPException) as exc:  # TimeoutError and SSLError are OSErrors
        raise unreachable(exc, host) from None


class WebSocketTransport:
    def __init__(self, settings: ClientSettings) -> None:
        self.settings = settings

    async def open_session(self, path: str, query: Mapping[str, str | Sequence[str]]) -> Link:
        settings = self.settings
        require_token(settings)
        uri = f"{settings.host}{path}?{urlencode(dict(query), doseq=True)}"
        pin = settings.tower_fingerprint
        try:
            ws = await connect(
                uri,
                ssl=tower_ssl_context(settings),
                # With a pin, the certificate is checked before the request (and its token) is sent.
                create_connection=pinned_connection(pin, settings.host)
                if pin is not None
                else DirectClientConnection,
                # GOAWAY: a draining tower may tell this session to move (docs/protocol.md).
                additional_headers={"Authorization": f"Bearer {settings.token}", "Supctl-Features": "goaway"},
                user_agent_header=f"supctl/{__version__} websockets/{websockets_version}",
                subprotocols=[websockets.Subprotocol(SUBPROTOCOL)],
                compression=None,  # payloads are usually encrypted or compressed already
                max_size=MAX_MESSAGE_ACCEPTED,
                open_timeout=OPEN_TIMEOUT,
                write_limit=2**18,
                # A silent partition ends the session within 2 x keepalive (then --bind reconnects).
                **keepalive_options(settings.keepalive),
            )
        except InvalidStatus as exc:
            raise rejection_message(exc) from None
        except ssl.SSLCertVerificationError as exc:
            raise UnavailableError(
                f"the tower's TLS certificate at {settings.host} is not trusted: {exc.verify_message}"
                " (give its CA with --ca-file, or pin it with --tower-fingerprint)"
            ) from None
        except ssl.SSLError as exc:
            raise UnavailableError(
                f"TLS handshake with {settings.host} failed: {exc.reason or exc}"
            ) from None
        except InvalidURI as exc:
            raise UsageError(f"bad tower URL: {exc}") from None
        except (OSError, TimeoutError) as exc:
            raise UnavailableError(f"cannot reach the tower at {settings.host}: {os_reason(exc)}") from None
        except WebSocketException as exc:
            raise UnavailableError(f"WebSocket handshake with {settings.host} failed: {exc}") from None
        if ws.subprotocol != SUBPROTOCOL:
            await ws.close()
            raise UnavailableError(f"the tower at {settings.host} does not speak {SUBPROTOCOL}")
        link = Link(ws, Connection(odd_ids=True, accept_streams=False, accept_goaway=True), name="tower")
        link.start()
        return link

    async def get(self, path: str, query: Mapping[str, str]) -> Any:
        """``GET path?query`` over plain HTTPS (no WebSocket upgrade): the tower's JSON answer.

        Same TLS verification, token and error mapping as :meth:`open_session`.
        """
        settings = self.settings
        token = require_token(settings)
        secure = settings.host.startswith("wss://")
        url = f"{'https' if secure else 'http'}://{settings.host.split('://', 1)[1]}{path}"
        if query:
            url += f"?{urlencode(dict(query))}"
        opener = https_opener(settings)
        request = urllib.request.Request(  # noqa: S310 - the scheme is https or http, checked above
            url,
            headers={
                "Authorization": f"Bearer {token}",
                "Accept": "application/json",
                "User-Agent": f"supctl/{__version__}",
            },
        )
        body = await asyncio.to_thread(_fetch, request, opener, settings.host)
        try:
            return json.loads(body)
        except ValueError:
            raise ProtocolError(f"the tower at {settings.host} answered {path} with invalid JSON") from None
