"""Pinning the tower's TLS certificate by its SHA-256 fingerprint, as chisel's ``--fingerprint``.

With a pin, the CA chain and the hostname are not checked; instead the SHA-256
of the tower's leaf certificate (DER) must equal the pin.  The check runs right
after the TLS handshake and before the first HTTP byte, so a token never reaches
a tower that fails it.  Shared by ``supctl`` (its WebSocket and HTTPS ``GET``
paths) and ``edge-enforcer``.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import ssl
from typing import TYPE_CHECKING, Any

from .errors import UnavailableError, UsageError

if TYPE_CHECKING:
    from websockets.asyncio.client import ClientConnection

_SEPARATORS = re.compile(r"[:\s]")
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")


class FingerprintMismatch(UnavailableError):
    """The tower's certificate is not the pinned one (exit 5)."""


def parse_fingerprint(text: str, option: str = "--tower-fingerprint") -> bytes:
    """The 32-byte digest of a SHA-256 fingerprint: 64 hex digits, colons optional, any case."""
    compact = _SEPARATORS.sub("", text)
    if not _HEX64.fullmatch(compact):
        raise UsageError(
            f"{option} must be a SHA-256 fingerprint (64 hex digits, colons optional),"
            " as printed by 'control-tower fingerprint'"
        )
    return bytes.fromhex(compact)


def format_fingerprint(digest: bytes) -> str:
    """Lowercase hex pairs joined by colons, as ``control-tower fingerprint`` prints them."""
    return ":".join(f"{b:02x}" for b in digest)


def certificate_digest(der: bytes) -> bytes:
    return hashlib.sha256(der).digest()


def pinned_context() -> ssl.SSLContext:
    """TLS >= 1.2 without CA or hostname checks: :func:`check_peer` replaces them."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the pin is checked instead, before any byte is sent
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def check_peer(tls: ssl.SSLObject | ssl.SSLSocket | None, pin: bytes, tower: str) -> None:
    """Raise :class:`FingerprintMismatch` unless the peer's leaf certificate hashes to ``pin``."""
    der = tls.getpeercert(binary_form=True) if tls is not None else None
    if not der:
        raise FingerprintMismatch(
            f"the tower at {tower} presented no TLS certificate to check the pin against"
        )
    seen = certificate_digest(der)
    if not hmac.compare_digest(seen, pin):
        raise FingerprintMismatch(
            f"the tower's certificate fingerprint {format_fingerprint(seen)} does not match"
            f" the pinned fingerprint (tower at {tower})"
        )


def pinned_connection(pin: bytes, tower: str) -> type[ClientConnection]:
    """A websockets ``create_connection`` class that checks the pin before the HTTP upgrade.

    websockets calls ``handshake()`` (which sends the request with the token) once
    ``loop.create_connection`` has finished the TLS handshake; on a mismatch it
    aborts the connection and re-raises.
    """
    from .wsconn import DirectClientConnection

    class PinnedClientConnection(DirectClientConnection):
        async def handshake(self, *args: Any, **kwargs: Any) -> None:
            check_peer(self.transport.get_extra_info("ssl_object"), pin, tower)
            await super().handshake(*args, **kwargs)

    return PinnedClientConnection
