"""The arithmetic of rate limits, with a fake clock: token buckets (supctl.ratelimit),
rate-limited log lines (supctl.ratelog) and a session's refused streams
(supctl.tower.refusals).  The end-to-end floods are in test_floods.py."""

from __future__ import annotations

import logging

import pytest

from supctl.ratelimit import Buckets
from supctl.ratelog import RateLimitedLog
from supctl.tower.refusals import RECORDED_ONE_BY_ONE, SUMMARY_INTERVAL, Refusals


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_bucket_burst_then_rate() -> None:
    clock = FakeClock()
    buckets = Buckets(3, 0.5, clock)  # 3 at once, then one every 2 s
    assert [buckets.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("a") == pytest.approx(2.0)
    assert buckets.take("b") == 0.0  # keys are independent
    clock.advance(1.0)
    assert buckets.take("a") == pytest.approx(1.0)  # a refusal takes nothing
    clock.advance(1.0)
    assert buckets.take("a") == 0.0
    assert not buckets.allows("a")
    clock.advance(100.0)  # refilled, but never above the burst
    assert [buckets.take("a") for _ in range(4)][-1] > 0


def test_bucket_keys_are_bounded() -> None:
    clock = FakeClock()
    buckets = Buckets(1, 1.0, clock, max_keys=100)
    for i in range(1000):
        buckets.take(f"peer-{i}")
    assert len(buckets._levels) == 100
    assert buckets.take("peer-999") > 0  # the most recent are remembered


def test_bucket_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="burst"):
        Buckets(0, 1.0)
    with pytest.raises(ValueError, match="rate"):
        Buckets(1, 0)


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def lines() -> Lines:
    logger = logging.getLogger("test.ratelog")
    logger.handlers[:] = [handler := Lines()]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return handler


def test_rate_limited_log(lines: Lines) -> None:
    clock = FakeClock()
    peer_log = RateLimitedLog(
        logging.getLogger("test.ratelog"), burst=2, rate=1.0, total_burst=100, total_rate=100, clock=clock
    )
    for i in range(10_000):
        peer_log.warning("refused from 10.0.0.1", "refused %d", i)
    assert peer_log.info("refused from 10.0.0.2", "another peer is not silenced")
    assert lines.lines == ["refused 0", "refused 1", "another peer is not silenced"]
    clock.advance(1.0)
    peer_log.warning("refused from 10.0.0.1", "refused %d", 10_000)
    assert lines.lines[-1] == "refused 10000 (9998 similar messages suppressed)"
    for _ in range(5):
        peer_log.warning("refused from 10.0.0.1", "again")
    peer_log.flush()  # still over its rate: nothing yet
    assert len(lines.lines) == 4
    clock.advance(1.0)
    peer_log.flush()
    assert lines.lines[-1] == "5 similar messages suppressed (refused from 10.0.0.1)"
    peer_log.flush()
    assert len(lines.lines) == 5


def test_rate_limited_log_total_bound(lines: Lines) -> None:
    """Many keys (a peer with many addresses) are still bounded all together."""
    clock = FakeClock()
    peer_log = RateLimitedLog(
        logging.getLogger("test.ratelog"), burst=5, rate=1.0, total_burst=10, total_rate=1.0, clock=clock
    )
    for i in range(1000):
        peer_log.info(f"refused from 10.0.{i // 256}.{i % 256}", "refused")
    assert len(lines.lines) == 10


def test_rate_limited_log_skips_disabled_levels(lines: Lines) -> None:
    peer_log = RateLimitedLog(logging.getLogger("test.ratelog"), burst=1, rate=1.0, clock=FakeClock())
    assert not peer_log.log(logging.DEBUG, "k", "debug")
    assert peer_log.info("k", "info")  # the debug line did not use the key's token


def test_refusals_close_after_the_limit_within_the_window() -> None:
    clock = FakeClock()
    refusals = Refusals(20, 10.0, clock)
    verdicts = [refusals.refused("limit", "too many") for _ in range(20)]
    assert all(v.close is None for v in verdicts)
    assert [v.record for v in verdicts] == [True] * RECORDED_ONE_BY_ONE + [False] * (20 - RECORDED_ONE_BY_ONE)
    assert refusals.refused("limit", "too many").close == (
        "more than 20 refused streams within 10 s (refused-streams)"
    )


def test_refusals_spread_out_do_not_close() -> None:
    """A long-lived session refused now and then (slower than the window) lives on."""
    clock = FakeClock()
    refusals = Refusals(20, 10.0, clock)
    for _ in range(1000):
        assert refusals.refused("site-lost", "site s is not connected").close is None
        clock.advance(0.6)  # 20 refusals span 12 s > 10 s


def test_refusals_window_zero_never_closes() -> None:
    refusals = Refusals(1, 0.0, FakeClock())
    assert all(refusals.refused("limit", "x").close is None for _ in range(100))


def test_refusals_summary() -> None:
    clock = FakeClock()
    refusals = Refusals(1000, 10.0, clock)
    for _ in range(RECORDED_ONE_BY_ONE):
        refusals.refused("limit", "recorded on its own")
    assert refusals.take_summary() is None
    refusals.refused("limit", "first counted")
    refusals.refused("site-reset", "connection refused")
    assert not refusals.summary_due()
    clock.advance(SUMMARY_INTERVAL)
    assert refusals.summary_due()
    summary = refusals.take_summary()
    assert summary is not None
    assert summary["count"] == 2
    assert summary["reasons"] == {"limit": 1, "site-reset": 1}
    assert summary["result"] == "connection refused"
    assert summary["first"] <= summary["last"]
    assert refusals.take_summary() is None and not refusals.summary_due()
    refusals.refused("limit", "later")  # counting starts again, never individually again
    assert refusals.take_summary() == {
        "count": 1,
        "reasons": {"limit": 1},
        "first": refusals.first,
        "last": refusals.last,
        "result": "later",
    }
