"""websockets connections that hand each received message straight to a callback.

websockets' asyncio connection queues every message in an ``Assembler`` and
wakes whoever awaits ``recv()``: a future, a task switch and a queue per
message.  A :class:`~supctl.link.Link` does not need any of that: its core
(:class:`~supctl.protocol.Connection`) takes bytes synchronously and bounds
memory with per-stream credit.  So these subclasses (passed as websockets'
``create_connection``) deliver each complete message to a *sink*, inside
``data_received``, in order.  Handshake, keepalive pings, the closing
handshake and the size limit stay websockets' (its sans-I/O ``protocol``
checks ``max_size`` across fragments too).

Messages that arrive after the handshake but before the link attaches its
sink are kept (bounded: reading pauses past :data:`PENDING_LIMIT`).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.server import ServerConnection
from websockets.frames import DATA_OPCODES, Frame, Opcode
from websockets.protocol import Event

__all__ = ["DirectClientConnection", "DirectServerConnection", "Message", "Sink", "keepalive_options"]

log = logging.getLogger(__name__)

#: A message as websockets' frames carry it (bytes in practice).
Message = bytes | bytearray | memoryview
#: ``sink(message, is_text)``, called once per complete message, in order.
Sink = Callable[[Message, bool], None]


def keepalive_options(keepalive: float | None) -> dict[str, Any]:
    """websockets' options for a keepalive of ``keepalive`` seconds (None or 0: off).

    A ping ``keepalive`` seconds after the last one; a pong late by ``keepalive / 2`` fails
    the link, whose closing handshake then gets ``keepalive / 2`` (a dead peer never
    answers it; a live one does within a round trip).  So a link that went silent is
    dropped within 2 x ``keepalive`` of its last sign of life (20 s by default), and a
    pong may lag 5 s behind queued data before a live link is taken for dead.
    """
    if not keepalive:
        return {"ping_interval": None, "ping_timeout": None}
    return {"ping_interval": keepalive, "ping_timeout": keepalive / 2, "close_timeout": keepalive / 2}


#: Bytes of early messages kept before the sink is attached; reading pauses beyond.
PENDING_LIMIT = 4 * 1024 * 1024


class _DirectMixin:
    """Shared by the client and server classes; see the module docstring."""

    # Provided by websockets' Connection.
    transport: Any
    protocol: Any

    _sink: Sink | None = None
    _pending: deque[tuple[Message, bool]] | None = None
    _pending_bytes = 0
    _paused_early = False
    _fragments: list[Message] | None = None
    _fragments_text = False

    def attach(self, sink: Sink) -> None:
        """Deliver every message from now on (and those already waiting) to ``sink``."""
        pending, self._pending = self._pending, None
        while pending:
            sink(*pending.popleft())
        self._sink = sink
        if self._paused_early:
            self._paused_early = False
            self.transport.resume_reading()

    def send_pending(self) -> None:
        """Write every frame the sans-I/O protocol has queued in one transport call.

        websockets' ``send_data`` writes frame by frame: a TLS record and a
        syscall each.  ``writelines`` lets the TLS layer encrypt them all and
        flush once.  Only for an open connection (the closing handshake's
        end-of-stream marker is websockets' to handle).
        """
        chunks = self.protocol.data_to_send()
        if len(chunks) == 1:
            self.transport.write(chunks[0])
        elif chunks:
            self.transport.writelines(chunks)

    def process_event(self, event: Event) -> None:
        if isinstance(event, Frame) and event.opcode in DATA_OPCODES:
            self._data_frame(event)
        else:
            super().process_event(event)  # type: ignore[misc]

    def _data_frame(self, frame: Frame) -> None:
        if frame.opcode is Opcode.CONT:
            if self._fragments is None:  # websockets' protocol already rejects this
                return
            self._fragments.append(frame.data)
            if frame.fin:
                data, self._fragments = b"".join(self._fragments), None
                self._deliver(data, self._fragments_text)
        elif not frame.fin:
            self._fragments = [frame.data]
            self._fragments_text = frame.opcode is Opcode.TEXT
        else:
            self._deliver(frame.data, frame.opcode is Opcode.TEXT)

    def _deliver(self, data: Message, is_text: bool) -> None:
        sink = self._sink
        if sink is not None:
            sink(data, is_text)
            return
        if self._pending is None:
            self._pending = deque()
        self._pending.append((data, is_text))
        self._pending_bytes += len(data)
        if self._pending_bytes > PENDING_LIMIT and not self._paused_early:
            self._paused_early = True
            self.transport.pause_reading()


class DirectClientConnection(_DirectMixin, ClientConnection):
    """websockets' client connection with :meth:`attach` (see the module docstring)."""


class DirectServerConnection(_DirectMixin, ServerConnection):
    """websockets' server connection with :meth:`attach` (see the module docstring)."""
