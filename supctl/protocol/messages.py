"""Typed payloads of OPEN and HELLO frames (JSON, validated on the way in)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from .args import MAX_DEPTH, MAX_OPEN, check_args
from .frames import FrameError
from .targets import canonical_address

MAX_NAME = 253


def _text(obj: dict[str, Any], key: str, *, limit: int = MAX_NAME) -> str:
    value = obj.get(key, "")
    if not isinstance(value, str) or len(value) > limit:
        raise FrameError(f"OPEN field {key!r} must be a string of at most {limit} characters")
    return value


#: The canonical form of a numeric connect target, or ValueError (:mod:`.targets`).
check_ip_address = canonical_address


@dataclass(frozen=True, slots=True)
class OpenRequest:
    """What a stream is for.  The tower fills the identity fields from the URL it
    authorised; a client only ever chooses ``args``."""

    verb: str
    application: str = ""
    service_instance: str = ""
    container: str = ""
    protocol: str = ""
    port: int = 0
    ip_address: str = ""
    args: dict[str, Any] = field(default_factory=dict)

    @property
    def target(self) -> str:
        host = self.ip_address or "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"{host}:{self.port}"

    def to_json(self) -> bytes:
        # Not dataclasses.asdict: it deep-copies field by field, once per stream on
        # every hop (a tenth of the tower's function calls per connection).
        obj = {name: getattr(self, name) for name in _FIELDS}
        return _ENCODER.encode(obj).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> OpenRequest:
        if len(raw) > MAX_OPEN:  # before parsing: a refusal a peer can cause stays cheap
            raise FrameError(f"OPEN request of {len(raw)} bytes is longer than {MAX_OPEN}")
        try:
            obj = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise FrameError("OPEN request is not JSON") from None
        if not isinstance(obj, dict):
            raise FrameError("OPEN request must be a JSON object")
        port = obj.get("port", 0)
        if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
            raise FrameError("OPEN field 'port' must be an integer 0-65535")
        try:  # the shape every verb's args have (.args); the relay adds one level
            args = check_args(obj.get("args", {}), depth=MAX_DEPTH + 1)
        except ValueError as exc:
            raise FrameError(f"OPEN field {exc}") from None
        ip = _text(obj, "ip_address", limit=64)
        if ip:
            try:
                ip = check_ip_address(ip)
            except ValueError as exc:  # the reason: "the unspecified address is not a target"...
                raise FrameError(f"OPEN field 'ip_address': {exc}") from None
        verb = _text(obj, "verb")
        if not verb:
            raise FrameError("OPEN request names no verb")
        return cls(
            verb=verb,
            application=_text(obj, "application"),
            service_instance=_text(obj, "service_instance"),
            container=_text(obj, "container"),
            protocol=_text(obj, "protocol"),
            port=port,
            ip_address=ip,
            args=args,
        )


_FIELDS = tuple(f.name for f in fields(OpenRequest))
_ENCODER = json.JSONEncoder(separators=(",", ":"))


def decode_object(raw: bytes, what: str = "HELLO") -> dict[str, Any]:
    try:
        obj = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise FrameError(f"{what} is not JSON") from None
    if not isinstance(obj, dict):
        raise FrameError(f"{what} must be a JSON object")
    return obj


def decode_hello(raw: bytes) -> dict[str, Any]:
    return decode_object(raw, "HELLO")


def encode_hello(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()
