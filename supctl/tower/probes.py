"""``GET /healthz`` and ``GET /readyz``: what a load balancer or an orchestrator asks.

No token, no audit record and no log line: a probe every second from every balancer
must cost nothing in the audit log, and it says nothing about who uses the tower.

- ``/healthz``: the process answers (its event loop turns). Always 200 while it runs.
- ``/readyz``: it should be sent new sessions: 200 unless it is draining (SIGTERM)
  or cannot read its store, then 503 with the reason.

The store check is the same one every request makes (``Directory.fresh``). A probe
flood must not become a store flood: concurrent probes share one check in flight, and
a result is reused for :data:`READY_TTL` seconds (the clock is an argument).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from websockets.http11 import Response

from ..plainhttp import text_response
from .database import StoreUnavailable

HEALTHZ = "/healthz"
READYZ = "/readyz"
PROBE_PATHS = frozenset({HEALTHZ, READYZ})
#: Seconds a store check's outcome answers probes before the store is asked again.
READY_TTL = 1.0


class Probes:
    """Answers the probe paths; ``check_store`` raises :class:`StoreUnavailable` when
    the store cannot be read, ``draining`` says whether the tower stops taking sessions."""

    def __init__(
        self,
        check_store: Callable[[], Awaitable[None]],
        draining: Callable[[], bool],
        clock: Callable[[], float] = time.monotonic,
        ttl: float = READY_TTL,
    ) -> None:
        self.check_store = check_store
        self.draining = draining
        self.clock = clock
        self.ttl = ttl
        self._checked_at: float | None = None
        self._store_problem: str | None = None
        self._pending: asyncio.Future[None] | None = None

    async def answer(self, path: str) -> Response:
        if path == HEALTHZ:
            return text_response(200, "ok")
        if self.draining():
            return text_response(503, "not ready: draining (shutting down)")
        problem = await self.store_problem()
        if problem is not None:
            return text_response(503, f"not ready: {problem}")
        return text_response(200, "ready")

    async def store_problem(self) -> str | None:
        """None if the store was readable within the last ``ttl`` seconds, else why not."""
        now = self.clock()
        if self._checked_at is not None and now - self._checked_at < self.ttl:
            return self._store_problem
        if self._pending is None:
            self._pending = asyncio.ensure_future(self._check())
        pending = self._pending
        await asyncio.shield(pending)
        return self._store_problem

    async def _check(self) -> None:
        try:
            await self.check_store()
        except StoreUnavailable:
            self._store_problem = "the control tower cannot reach its store"
        except Exception as exc:  # a probe must answer, whatever the store layer raised
            self._store_problem = f"store check failed ({type(exc).__name__})"
        else:
            self._store_problem = None
        finally:
            self._checked_at = self.clock()
            self._pending = None
