"""Token churn (issue 8, item 12): logins cannot pile up live tokens, renewals are
rate-limited, and the store is written off the event loop.

Requests go through the tower's real handshake hook (``Tower.handshake_request``, as
websockets calls it) on a real SQLite store in a temporary directory; the renewal
limit runs on a fake clock.  The latency figures are measured by bench/floods.py.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import event
from towerkit import Kit, utc_now
from websockets.datastructures import Headers
from websockets.http11 import Request as HttpRequest

from supctl.tower.database.accounts import REVOKED_REMEMBERED
from supctl.tower.database.model import TokenInfo
from supctl.tower.limits import Limits
from supctl.tower.server import Tower
from supctl.tower.store import hash_token
from supctl.tower.users import TokenRefused

PASSWORD = "correct horse battery staple"
PEER = SimpleNamespace(remote_address=("127.0.0.1", 5555))


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_kit(tmp_path: Path, clock: Callable[[], float] | None = None, **limits: Any) -> Kit:
    extra = {"clock": clock} if clock is not None else {}
    # Logins here come many at once from one address: the login throttle, which counts
    # attempts in flight (tower/logins.py), is not what these tests are about.
    limits = {"login_failures": 1000, "login_failures_per_address": 1000, **limits}
    kit = Kit(tmp_path, Limits(**limits), **extra)  # type: ignore[arg-type]
    kit.add_user("alice", PASSWORD, ["ops"])
    return kit


def make_tower(tmp_path: Path, clock: Callable[[], float] | None = None, **limits: Any) -> Tower:
    return make_kit(tmp_path, clock, **limits).tower


async def call(tower: Tower, path: str, authorization: str) -> tuple[int, dict[str, Any]]:
    request = HttpRequest(path, Headers([("Authorization", authorization)]))
    response = await tower.handshake_request(PEER, request)  # type: ignore[arg-type]
    assert response is not None
    return response.status_code, json.loads(response.body)


def message(body: dict[str, Any]) -> str:
    return str(body["errors"][0]["error-message"])


async def login(tower: Tower) -> str:
    basic = base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
    status, body = await call(tower, "/v1/login", f"Basic {basic}")
    assert status == 200, body
    return str(body["token"])


def run(coro: Awaitable[Any]) -> Any:
    async def main() -> Any:
        return await coro

    return asyncio.run(main())


def stored(kit: Kit) -> list[TokenInfo]:
    return list(run(kit.store.tokens.entries()))


def live_logins(kit: Kit, user: str = "alice") -> list[TokenInfo]:
    now = utc_now()
    return [t for t in stored(kit) if t.user == user and t.kind == "login" and t.state(now) == "valid"]


def test_200_logins_keep_at_most_tokens_per_user(tmp_path: Path) -> None:
    kit = make_kit(tmp_path)
    tower = kit.tower
    assert tower.limits.tokens_per_user == 50

    async def scenario() -> tuple[str, list[str]]:
        oldest = await login(tower)
        # The rest at once: the store serialises the writes, none is lost.
        return oldest, list(await asyncio.gather(*(login(tower) for _ in range(199))))

    oldest, others = run(scenario())
    live = live_logins(kit)
    assert len(live) == 50
    # Every login was written; revoked ones are remembered up to REVOKED_REMEMBERED x the cap.
    assert len(stored(kit)) == 200  # within 50 live + REVOKED_REMEMBERED x 50 revoked
    status, body = run(call(tower, "/v1/state/sites", f"Bearer {oldest}"))
    assert (status, message(body)) == (401, "token revoked"), body
    accessors = {t.accessor for t in live}
    kept = [token for token in others if hash_token(token)[:8] in accessors]
    assert len(kept) == 50
    for token in kept:
        status, body = run(call(tower, "/v1/state/sites", f"Bearer {token}"))
        assert status == 200, body


def test_the_cap_revokes_the_oldest_and_forgets_old_revocations(tmp_path: Path) -> None:
    kit = Kit(tmp_path)
    kit.add_user("alice", PASSWORD, [])
    hour = datetime.timedelta(hours=1)
    api = [kit.add_token("alice", "api", datetime.timedelta(days=1)) for _ in range(3)]

    async def logins() -> list[str]:  # as the tower makes them: the directory follows its own writes
        return [(await kit.directory.log_in("alice", hour, 2)).token for _ in range(300)]

    reloads = kit.directory.reloads
    tokens = run(logins())
    assert [t.accessor for t in live_logins(kit)] == [hash_token(token)[:8] for token in tokens[-2:]]
    # API tokens (made by the tower's admin, for automation) are not counted.
    assert all(kit.directory.check_token(token) is not None for token in api)
    with pytest.raises(TokenRefused, match="token revoked"):
        kit.directory.check_token(tokens[-3])
    logins_kept = [t for t in stored(kit) if t.kind == "login"]
    assert len(logins_kept) == 2 + REVOKED_REMEMBERED * 2  # the store does not grow with every login
    assert kit.directory.check_token(tokens[0]) is None  # forgotten: "invalid API token"
    # ... and neither does the tower's copy, which followed its own writes without reloading.
    assert len(kit.directory._tokens) == 3 + 2 + REVOKED_REMEMBERED * 2
    assert kit.directory.reloads == reloads


def test_renewal_spam_gets_429(tmp_path: Path) -> None:
    clock = FakeClock()
    tower = make_tower(tmp_path, clock, renewals_per_minute=10)

    async def scenario() -> tuple[str, list[tuple[int, dict[str, Any]]]]:
        token = await login(tower)
        return token, [await call(tower, "/v1/token/renew", f"Bearer {token}") for _ in range(12)]

    token, answers = run(scenario())
    assert [status for status, _ in answers] == [200] * 10 + [429] * 2
    assert message(answers[-1][1]) == "too many token renewals for user alice; try again in 6 s"
    clock.now += 5.9
    assert run(call(tower, "/v1/token/renew", f"Bearer {token}"))[0] == 429
    clock.now += 0.1
    assert run(call(tower, "/v1/token/renew", f"Bearer {token}"))[0] == 200


def test_renewal_after_logout_is_refused(tmp_path: Path) -> None:
    tower = make_tower(tmp_path)

    async def scenario() -> list[int]:
        token = await login(tower)
        bearer = f"Bearer {token}"
        return [(await call(tower, path, bearer))[0] for path in ("/v1/logout", "/v1/token/renew")]

    assert run(scenario()) == [200, 401]
    # And a renewal racing a revocation (by another process) never brings the token back.
    (tmp_path / "b").mkdir()
    kit = make_kit(tmp_path / "b")
    token = kit.add_token("alice", "login")
    other = kit.other_store()
    assert run(other.tokens.revoke_token(token, now=utc_now()))
    run(other.close())
    assert run(kit.directory.renew(token, datetime.timedelta(hours=8))) is None
    kit.fresh()
    with pytest.raises(TokenRefused, match="token revoked"):
        kit.directory.check_token(token)


def test_the_store_is_written_off_the_loop(tmp_path: Path) -> None:
    """A commit is a write and fsyncs: on the event loop it would stall every relayed
    stream.  Every statement of a login, renewal or logout runs on the driver's thread."""
    kit = make_kit(tmp_path, renewals_per_minute=100)
    tower = kit.tower
    threads: list[str] = []
    run(kit.store.db.engine.dispose())  # new connections, each traced

    @event.listens_for(kit.store.db.engine.sync_engine, "connect")
    def trace(dbapi_connection: Any, _record: Any) -> None:
        raw = dbapi_connection.driver_connection._conn  # aiosqlite's sqlite3 connection
        raw.set_trace_callback(lambda _sql: threads.append(threading.current_thread().name))

    async def scenario() -> None:
        tokens = await asyncio.gather(*(login(tower) for _ in range(20)))
        for token in tokens:
            assert (await call(tower, "/v1/token/renew", f"Bearer {token}"))[0] == 200
        results = await asyncio.gather(*(call(tower, "/v1/logout", f"Bearer {t}") for t in tokens))
        assert all(status == 200 for status, _ in results)

    run(scenario())
    assert len(threads) > 60  # every write, and the freshness checks
    assert threading.main_thread().name not in threads, set(threads)
