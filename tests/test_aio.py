"""The runner's allocator tuning (supctl.aio.tune_allocator)."""

from __future__ import annotations

import platform

import pytest

from supctl import aio


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt thresholds are glibc's")
def test_tunes_glibc_malloc() -> None:
    assert aio.tune_allocator() is True


def test_environment_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert aio.tune_allocator() is False


def test_run_still_runs_the_coroutine() -> None:
    async def answer() -> int:
        return 42

    assert aio.run(answer()) == 42
