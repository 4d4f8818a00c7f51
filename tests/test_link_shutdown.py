"""Regression: a Link must not swallow the cancellation of its own task.

The enforcer stops on SIGTERM by cancelling its link task.  When the tower's
close frame arrived at the same moment (Stack.close() signals both at once),
``Link._finish`` was awaiting its cancelled writer under
``suppress(CancelledError)``, which also ate the enforcer's own cancellation:
``run()`` returned normally, the agent reconnected forever and only SIGKILL
stopped it.  The race is made deterministic here with an in-memory WebSocket
whose ``recv`` reports the peer's close and schedules the cancellation for the
next loop iteration, i.e. while ``_finish`` waits for the writer.
"""

from __future__ import annotations

import asyncio

import pytest
from websockets.exceptions import ConnectionClosedError, ConnectionClosedOK
from websockets.frames import Close

from supctl.link import Link, _close_text
from supctl.protocol import Connection


class ClosingWebSocket:
    def __init__(self) -> None:
        self.task: asyncio.Task[None] | None = None
        self.closed = False

    async def send(self, message: bytes) -> None:
        await asyncio.Event().wait()  # a peer that never drains

    async def recv(self) -> bytes:
        await asyncio.sleep(0)
        assert self.task is not None
        asyncio.get_running_loop().call_soon(self.task.cancel)  # SIGTERM, one iteration later
        raise ConnectionClosedOK(Close(1001, "going away"), None)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        self.closed = True


def test_link_cancelled_while_finishing_stays_cancelled() -> None:
    async def main() -> Link:
        ws = ClosingWebSocket()
        link = Link(ws, Connection(odd_ids=True, accept_streams=False), name="test")
        ws.task = link.start()
        with pytest.raises(asyncio.CancelledError):
            await ws.task
        assert ws.task.cancelled()
        return link

    link = asyncio.run(main())
    assert link.lost_reason == "going away"


@pytest.mark.parametrize(
    ("code", "reason", "text"),
    [
        (1001, "", "the other end is going away (shutting down or restarting)"),
        (1011, "", "internal error at the other end"),
        (4000 + 15, "", "closed: going away"),
        (4999, "", "closed by the other end (WebSocket close code 4999)"),
        (1001, "the control tower is shutting down", "the control tower is shutting down"),
    ],
)
def test_a_close_without_a_reason_is_a_sentence_not_a_code(code: int, reason: str, text: str) -> None:
    """A lost tower says what happened ("closed with code 1001" told users nothing)."""
    assert _close_text(ConnectionClosedError(Close(code, reason), None)) == text
