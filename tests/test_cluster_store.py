"""Replicas and site presence in the store (supctl.tower.database.cluster), on SQLite and
on a real PostgreSQL, with the time given (no clock): joining, heartbeats and their
expiry, one live holder per site, and SQLite's one replica."""

from __future__ import annotations

import asyncio
import contextlib
import datetime

import pytest
from test_database import T0, Target, blank, pg_target, target  # noqa: F401 - fixtures (SQLite, then PostgreSQL)

from supctl.errors import UsageError
from supctl.tower import database
from supctl.tower.database.cluster import EXPIRY, Holder
from supctl.tower.presence import CLAIM_RETRY, Presence

SECOND = datetime.timedelta(seconds=1)


@pytest.fixture
def pg_store(request: pytest.FixtureRequest) -> Target:
    """A new store on PostgreSQL: several replicas."""
    found: Target = request.getfixturevalue("pg_target")
    found.create()
    return found


def alive(pid: int) -> bool:
    return pid != 666  # the test's dead process


def test_a_site_has_one_live_holder_until_its_replica_is_gone(pg_store: Target) -> None:
    async def body(store: database.SQLStore) -> None:
        cluster = store.cluster
        await cluster.join("tower-a", "host-a", 10, now=T0, alive=alive)
        await cluster.join("tower-b", "host-b", 20, now=T0, alive=alive)
        assert await cluster.claim("paris-1", "tower-a", "192.0.2.7:5000", now=T0) is None
        # A second link of the site at another replica (a thief with the site's token, or
        # the enforcer itself while its old link is not yet known dead) is refused.
        held = Holder("tower-a", "192.0.2.7:5000", "host-a")
        assert await cluster.claim("paris-1", "tower-b", "198.51.100.9:6000", now=T0 + SECOND) == held
        assert await cluster.holders(now=T0 + SECOND) == {"paris-1": held}
        # tower-a keeps beating: still its site.
        assert await cluster.heartbeat("tower-a", 10, now=T0 + 5 * SECOND)
        assert await cluster.claim("paris-1", "tower-b", "x", now=T0 + 4 * SECOND + EXPIRY) == held
        # tower-a stops beating (killed): once its heartbeat expired, the site is free.
        gone = T0 + 5 * SECOND + EXPIRY
        assert await cluster.heartbeat("tower-b", 20, now=gone)
        assert await cluster.holders(now=gone) == {}
        assert await cluster.claim("paris-1", "tower-b", "192.0.2.7:5001", now=gone) is None
        assert await cluster.holders(now=gone) == {"paris-1": Holder("tower-b", "192.0.2.7:5001", "host-b")}
        assert not await cluster.heartbeat("tower-a", 11, now=gone)  # not its row (pid 10)
        # Releasing is only the holder's.
        await cluster.release("paris-1", "tower-a")
        assert "paris-1" in await cluster.holders(now=gone)
        await cluster.release("paris-1", "tower-b")
        assert await cluster.holders(now=gone) == {}

    pg_store.run(body)


def test_where_a_replica_relays_what_a_site_reported_and_a_drain_letting_go(pg_store: Target) -> None:
    """Revision 0005: the others read where a replica takes relayed streams and what each
    site it holds reported (HELLO, then STATUS); a draining holder's sites are claimed at once."""

    async def body(store: database.SQLStore) -> None:
        cluster = store.cluster
        await cluster.join("tower-a", "host-a", 10, now=T0, alive=alive, advertise="wss://a.internal:4647")
        await cluster.join("tower-b", "host-b", 20, now=T0, alive=alive)
        await cluster.advertise("tower-b", 20, "wss://b.internal:4647")
        assert await cluster.claim("lyon", "tower-a", "192.0.2.7:5000", now=T0, info='{"v": 1}') is None
        await cluster.report("lyon", "tower-a", '{"v": 2}')
        await cluster.report("lyon", "tower-b", '{"v": 3}')  # not its site: nothing changes
        (held,) = (await cluster.holders(now=T0)).values()
        assert (held.replica, held.advertise, held.info) == ("tower-a", "wss://a.internal:4647", '{"v": 2}')
        # tower-a drains: its enforcer, told to move, claims the site at tower-b at once.
        await cluster.drain("tower-a", 10)
        assert await cluster.claim("lyon", "tower-b", "192.0.2.7:5001", now=T0 + SECOND, info="{}") is None
        (held,) = (await cluster.holders(now=T0 + SECOND)).values()
        assert (held.replica, held.advertise) == ("tower-b", "wss://b.internal:4647")
        await cluster.release("lyon", "tower-a")  # the old link closing: not its claim any more
        assert "lyon" in await cluster.holders(now=T0 + SECOND)

    pg_store.run(body)


def test_a_credential_write_is_notified_to_every_listener(pg_store: Target) -> None:
    """LISTEN/NOTIFY: a replica learns of a write made by any process (here: another
    connection) at its commit, without waiting for its poll."""

    async def body(store: database.SQLStore) -> None:
        notified = asyncio.Event()
        listening = asyncio.create_task(store.listen(notified.set))
        try:
            for number in range(100):  # until LISTEN is in place: it is, within a few writes
                await store.sites.add(f"site-{number}", now=T0)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(notified.wait(), 0.2)
                if notified.is_set():
                    break
            assert notified.is_set()
            notified.clear()
            await store.sites.remove("site-0")
            await asyncio.wait_for(notified.wait(), 10)
        finally:
            listening.cancel()
            await asyncio.gather(listening, return_exceptions=True)

    pg_store.run(body)


def test_concurrent_claims_have_one_winner(pg_store: Target) -> None:
    async def body(store: database.SQLStore) -> None:
        for replica, pid in (("tower-a", 1), ("tower-b", 2), ("tower-c", 3)):
            await store.cluster.join(replica, "h", pid, now=T0, alive=lambda _: True)
        results = await asyncio.gather(
            *(store.cluster.claim("lyon", r, "p", now=T0) for r in ("tower-a", "tower-b", "tower-c") * 5)
        )
        winners = {
            r
            for r, result in zip(("tower-a", "tower-b", "tower-c") * 5, results, strict=True)
            if result is None
        }
        assert len(winners) == 1, results

    pg_store.run(body)


def test_one_process_per_replica_id_and_sqlite_serves_one(target: Target) -> None:  # noqa: F811 - the fixture
    async def body(store: database.SQLStore) -> None:
        cluster = store.cluster
        await cluster.join("tower", "host-a", 10, now=T0, alive=alive)
        with pytest.raises(UsageError, match=r"replica 'tower' is already running \(pid 10 on host-a"):
            await cluster.join("tower", "host-b", 20, now=T0 + SECOND, alive=alive)
        if store.backend == "sqlite":
            with pytest.raises(UsageError, match="a second replica needs a PostgreSQL store"):
                await cluster.join("tower-2", "host-a", 30, now=T0 + SECOND, alive=alive)
        else:
            await cluster.join("tower-2", "host-a", 30, now=T0 + SECOND, alive=alive)
        # After the expiry, or at once for a dead process of the same host, the id is free.
        await cluster.join("tower", "host-b", 20, now=T0 + EXPIRY, alive=alive)
        await cluster.leave("tower", 20)
        await cluster.join("tower", "host-a", 666, now=T0 + EXPIRY, alive=alive)
        assert await cluster.claim("nice", "tower", "p", now=T0 + EXPIRY) is None
        await cluster.join("tower", "host-a", 40, now=T0 + EXPIRY + SECOND, alive=alive)  # 666 is dead
        # What the dead process held is forgotten with it.
        assert await cluster.holders(now=T0 + EXPIRY + SECOND) == {}

    target.run(body)


class FakeCluster:
    """What Presence uses of the store's cluster, answering the heartbeat as told."""

    def __init__(self, beats: list[bool]) -> None:
        self.beats = beats
        self.calls: list[str] = []

    async def join(self, replica: str, host: str, pid: int, **_: object) -> None:
        self.calls.append(f"join {replica}")

    async def heartbeat(self, replica: str, pid: int, **_: object) -> bool:
        self.calls.append("beat")
        return self.beats.pop(0)

    async def holders(self, **_: object) -> dict[str, Holder]:
        return {"paris-1": Holder("tower", "192.0.2.7:5000", "h")}


def test_a_replica_taken_over_closes_its_site_links_and_joins_again() -> None:
    """A pause longer than the expiry voids this replica's claims: its links must go (their
    enforcers come back and claim again) before it counts as a member again.  Fake sleeps."""
    cluster = FakeCluster([True, False, True])
    closed: list[str] = []
    presence = Presence(cluster, "tower", on_taken_over=closed.append, host="h", pid=1)  # type: ignore[arg-type]
    sleeps = 0

    async def sleep(_: float) -> None:
        nonlocal sleeps
        sleeps += 1
        if sleeps > 3:
            raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(presence.beat_forever(sleep))
    assert cluster.calls == ["beat", "beat", "join tower", "beat"]
    assert closed == ["replica tower lost its registration in the store"]
    assert presence.holders == {"paris-1": Holder("tower", "192.0.2.7:5000", "h")}


class SlowHolder(FakeCluster):
    """A holder that missed heartbeats: the first claim sees it 2.5 s silent, the next none."""

    def __init__(self) -> None:
        super().__init__([])
        self.claims: list[Holder | None] = [Holder("tower-a", "192.0.2.7:5000", "h", silent=2.5), None]

    async def claim(self, site: str, replica: str, peer: str, **_: object) -> Holder | None:
        self.calls.append(f"claim {site}")
        return self.claims.pop(0)


def claim_with_fake_sleeps(cluster: FakeCluster, peer: str) -> tuple[list[str | None], list[float]]:
    """Replica tower-b claims paris-1 for ``peer``: what ``granted`` got, and the sleeps."""
    slept: list[float] = []
    answers: list[str | None] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    async def body() -> None:
        presence = Presence(cluster, "tower-b", host="h", pid=2, sleep=sleep)  # type: ignore[arg-type]
        presence.claim("paris-1", peer, "{}", answers.append)
        await asyncio.gather(*presence.tasks)

    asyncio.run(body())
    return answers, slept


def test_a_claim_on_a_silent_holder_waits_for_its_expiry_instead_of_refusing() -> None:
    """The holder was killed: its heartbeat is late.  The new link is held (asking again
    after each heartbeat) until the holder's claim expires, then granted, so the enforcer
    does not back off for seconds more (bench/replica_takeover.py)."""
    cluster = SlowHolder()
    answers, slept = claim_with_fake_sleeps(cluster, "192.0.2.7:5001")
    assert answers == [None] and cluster.calls == ["claim paris-1", "claim paris-1"]
    assert slept == [pytest.approx(min(CLAIM_RETRY, EXPIRY.total_seconds() - 2.5 + 0.05))]


class LiveHolder(FakeCluster):
    """A holder that keeps beating (its link is alive)."""

    async def claim(self, site: str, replica: str, peer: str, **_: object) -> Holder | None:
        self.calls.append("claim")
        return Holder("tower-a", "192.0.2.7:5000", "h", silent=0.2)


def test_a_claim_on_a_live_holder_is_refused_after_the_expiry() -> None:
    """A second link while the first is alive (a thief with the site's token): held for
    at most EXPIRY, then refused with the holder named."""
    cluster = LiveHolder([])
    answers, slept = claim_with_fake_sleeps(cluster, "198.51.100.9:6000")
    assert answers == ["site paris-1 is already connected to replica tower-a (from 192.0.2.7:5000)"]
    assert sum(slept) == pytest.approx(EXPIRY.total_seconds()) and len(cluster.calls) == len(slept) + 1
