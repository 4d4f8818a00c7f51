"""supctl's renewal of a login token (plugins/supctl_connect/account.py) on a fake clock:
a busy tower (429) or a lost connection is retried, a revoked token ends the renewals."""

from __future__ import annotations

import asyncio
import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from supctl_connect.account import keep_renewed

from supctl.client.login import load_login, save_login
from supctl.errors import DeniedError, SupctlError, UnavailableError

HOST = "wss://tower.test:4646"
START = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)


class Clock:
    def __init__(self) -> None:
        self.at = START
        self.waits: list[float] = []

    def now(self) -> datetime.datetime:
        return self.at

    async def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.at += datetime.timedelta(seconds=seconds)


class Tower:
    """Answers renewals from a script: an exception to raise, or a new expiry."""

    def __init__(self, clock: Clock, script: list[SupctlError | float]) -> None:
        self.clock, self.script, self.calls = clock, script, 0

    async def get(self, path: str, query: dict[str, Any]) -> dict[str, Any]:
        assert path == "/v1/token/renew"
        self.calls += 1
        step = self.script.pop(0)
        if isinstance(step, SupctlError):
            raise step
        return {"expires": (self.clock.at + datetime.timedelta(seconds=step)).isoformat()}


def _run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, script: list[SupctlError | float]) -> Tower:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    save_login(
        {"host": HOST, "token": "sct_login_x", "expires": (START + datetime.timedelta(hours=3)).isoformat()}
    )
    clock = Clock()
    tower = Tower(clock, script)
    inv = SimpleNamespace(
        settings=SimpleNamespace(host=HOST, token="sct_login_x"),
        transport=lambda: tower,
        console=SimpleNamespace(print=lambda *a, **k: None),
    )
    asyncio.run(keep_renewed(inv, now=clock.now, sleep=clock.sleep))  # type: ignore[arg-type]
    return tower


def test_a_busy_tower_is_retried_until_the_renewal_lands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    busy = UnavailableError("too many token renewals for user alice; try again in 6 s")
    revoked = DeniedError("token revoked")  # ends the loop
    tower = _run(tmp_path, monkeypatch, [busy, SupctlError("lost the connection"), 8 * 3600.0, revoked])
    assert tower.calls == 4  # two failures, retried, renewed; then the revocation
    stored = load_login(HOST)
    assert stored is not None
    renewed = datetime.datetime.fromisoformat(stored["expires"])
    assert renewed - START > datetime.timedelta(hours=8)  # the renewal was saved


def test_a_revoked_token_ends_the_renewals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tower = _run(tmp_path, monkeypatch, [DeniedError("token revoked"), 8 * 3600.0])
    assert tower.calls == 1
    assert load_login(HOST) is not None  # the file is left for `supctl do logout`
