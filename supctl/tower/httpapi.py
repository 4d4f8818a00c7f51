"""HTTP pieces of the tower's API: JSON answers, the platform's error body, credentials.

Used before the WebSocket upgrade (websockets' ``process_request``), where every
refusal must be an HTTP status with ``{"errors": [{"error-message": ...}]}``.
"""

from __future__ import annotations

import base64
import http
import json
from typing import Any

from websockets.datastructures import Headers
from websockets.http11 import Request, Response


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


def basic_credentials(request: Request) -> tuple[str, str]:
    """(name, password) from ``Authorization: Basic base64(name:password)``."""
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "basic":
        raise Rejection(401, "login needs HTTP Basic credentials (user name and password)")
    try:
        name, sep, password = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
    except (ValueError, UnicodeDecodeError):
        raise Rejection(400, "malformed HTTP Basic credentials") from None
    if not sep or not name:
        raise Rejection(400, "malformed HTTP Basic credentials")
    return name, password


def single(query: dict[str, list[str]], name: str, *, required: bool = True) -> str:
    values = query.get(name, [])
    if len(values) > 1:
        raise Rejection(400, f"query parameter {name!r} given more than once")
    if not values:
        if required:
            raise Rejection(400, f"missing query parameter {name!r}")
        return ""
    return values[0]
