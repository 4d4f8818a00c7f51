"""Token churn (issue 8, item 12): logins cannot pile up live tokens, renewals are
rate-limited, and users.json is written off the event loop, one write at a time.

Requests go through the tower's real handshake hook (``Tower.handshake_request``, as
websockets calls it) on a real ``UserStore`` in a temporary directory; the renewal
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
from websockets.datastructures import Headers
from websockets.http11 import Request as HttpRequest

from supctl.tower import users as users_module
from supctl.tower.limits import Limits
from supctl.tower.server import Tower
from supctl.tower.store import TowerStore, atomic_write, hash_token
from supctl.tower.users import REVOKED_REMEMBERED, TokenRefused, UserStore

PASSWORD = "correct horse battery staple"
PEER = SimpleNamespace(remote_address=("127.0.0.1", 5555))


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_tower(tmp_path: Path, clock: Callable[[], float] | None = None, **limits: Any) -> Tower:
    extra = {"clock": clock} if clock is not None else {}
    # Logins here come many at once from one address: the login throttle, which counts
    # attempts in flight (tower/logins.py), is not what these tests are about.
    limits = {"login_failures": 1000, "login_failures_per_address": 1000, **limits}
    tower = Tower(TowerStore.create(tmp_path / "state.json"), None, Limits(**limits), **extra)
    tower.users = UserStore(tmp_path / "users.json")
    tower.users.add_user("alice", PASSWORD, ["ops"])
    return tower


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


def live_logins(store: UserStore, user: str = "alice") -> list[dict[str, Any]]:
    return [t for t in store.tokens() if t["user"] == user and t["kind"] == "login" and not t["revoked"]]


def test_200_logins_keep_at_most_tokens_per_user(tmp_path: Path) -> None:
    tower = make_tower(tmp_path)
    assert tower.users is not None and tower.limits.tokens_per_user == 50

    async def scenario() -> tuple[str, list[str]]:
        oldest = await login(tower)
        # The rest at once: the writer thread serialises them, none is lost.
        return oldest, list(await asyncio.gather(*(login(tower) for _ in range(199))))

    oldest, others = run(scenario())
    live = live_logins(tower.users)
    assert len(live) == 50
    assert len({t["accessor"] for t in tower.users.tokens()}) == 200  # every login was written
    status, body = run(call(tower, "/v1/state/sites", f"Bearer {oldest}"))
    assert (status, message(body)) == (401, "token revoked"), body
    accessors = {t["accessor"] for t in live}
    kept = [token for token in others if hash_token(token)[:8] in accessors]
    assert len(kept) == 50
    for token in kept:
        status, body = run(call(tower, "/v1/state/sites", f"Bearer {token}"))
        assert status == 200, body


def test_the_cap_revokes_the_oldest_and_forgets_old_revocations(tmp_path: Path) -> None:
    store = UserStore(tmp_path / "users.json")
    store.add_user("alice", PASSWORD, [])
    api = [store.add_token("alice", "api", datetime.timedelta(days=1))[0] for _ in range(3)]
    tokens = [store.add_token("alice", "login", datetime.timedelta(hours=1), 2)[0] for _ in range(300)]
    assert [t["accessor"] for t in live_logins(store)] == [hash_token(token)[:8] for token in tokens[-2:]]
    # API tokens (made by the tower's admin, for automation) are not counted.
    assert all(store.check_token(token) is not None for token in api)
    with pytest.raises(TokenRefused, match="token revoked"):
        store.check_token(tokens[-3])
    logins = [t for t in store.tokens() if t["kind"] == "login"]
    assert len(logins) == 2 + REVOKED_REMEMBERED * 2  # the file does not grow with every login
    assert store.check_token(tokens[0]) is None  # forgotten: "invalid API token"


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
    # And a renewal racing a revocation never brings the token back.
    store = UserStore(tmp_path / "users.json")
    token = store.add_token("alice", "login", datetime.timedelta(hours=1))[0]
    store.revoke_token(token)
    with pytest.raises(TokenRefused, match="token revoked"):
        store.renew(token, datetime.timedelta(hours=8))


def test_users_json_is_written_off_the_loop_one_write_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each write is a rewrite of users.json and two fsyncs: on the event loop they
    stalled every relayed stream.  They run on the writer thread, never two at once."""
    writers: list[str] = []
    running, most = [0], [0]
    lock = threading.Lock()
    real_write = atomic_write

    def recording(*args: Any, **kwargs: Any) -> None:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        writers.append(threading.current_thread().name)
        try:
            real_write(*args, **kwargs)
        finally:
            with lock:
                running[0] -= 1

    tower = make_tower(tmp_path, renewals_per_minute=100)
    monkeypatch.setattr(users_module, "atomic_write", recording)

    async def scenario() -> None:
        tokens = await asyncio.gather(*(login(tower) for _ in range(20)))
        for token in tokens:
            assert (await call(tower, "/v1/token/renew", f"Bearer {token}"))[0] == 200
        results = await asyncio.gather(*(call(tower, "/v1/logout", f"Bearer {t}") for t in tokens))
        assert all(status == 200 for status, _ in results)

    run(scenario())
    assert len(writers) == 60
    assert threading.main_thread().name not in writers, set(writers)
    assert most[0] == 1
