"""Which tower processes serve this store, and which of them holds each site's link.

Every ``control-tower serve`` joins as a *replica* (``[cluster] id``, default ``tower``)
and updates its row's heartbeat every :data:`HEARTBEAT` seconds; a replica whose
heartbeat is older than :data:`EXPIRY` is gone, and so are the site links it held.  A
site's link is *claimed* when its HELLO arrives: refused while another live replica
holds the site (one live link per site across the cluster, the rule a single tower
applies in memory: a stolen site token cannot push a live enforcer off, whichever
replica it reaches), taken over once that replica is gone.

On SQLite only one replica may run (a second is refused, with one line): SQLite serves
one host, and a tower's state in memory is not shared.  On PostgreSQL the claims are
serialised by an advisory lock, so two replicas claiming one site at once cannot both
win.  Times are arguments (``now``), as everywhere in the store.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import and_, delete, insert, select, update

from supctl.errors import UsageError

from .engine import Database, serialise
from .schema import replicas, site_presence

#: Seconds between two heartbeats of a replica.
HEARTBEAT = 1.0
#: A replica whose heartbeat is older than this is gone (so are its sites' links): four
#: missed heartbeats, so that a slow store write or a short pause does not evict a live
#: one, while a killed replica's sites move within about 5 s (bench/replica_takeover.py).
EXPIRY = datetime.timedelta(seconds=4)
#: pg_advisory_xact_lock key of membership changes and claims.
LOCK_CLUSTER = 0x5C7A0D19


@dataclass(frozen=True)
class Holder:
    """The live replica that holds a site's link."""

    replica: str
    peer: str  # the enforcer's address, as that replica saw it
    host: str  # the replica's host
    silent: float = field(default=0.0, compare=False)  # seconds since its last heartbeat, when asked
    advertise: str | None = None  # the replica's peer listener (wss://HOST:PORT), if it has one
    info: str | None = None  # the site's last HELLO or STATUS, as JSON


def _age(now: datetime.datetime, then: datetime.datetime) -> float:
    return (now - then).total_seconds()


class Cluster:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def join(
        self,
        replica: str,
        host: str,
        pid: int,
        *,
        now: datetime.datetime,
        alive: Callable[[int], bool],
        advertise: str | None = None,
    ) -> None:
        """Register this process as ``replica`` (forgetting what a dead one of that id held).

        Refused (:class:`UsageError`, one line) while a live process runs as the same
        replica, or, on SQLite, as any replica.  A row is live while its heartbeat is
        fresh, unless it names a process of this host that ``alive`` says is gone (a
        tower killed and restarted at once need not wait for the expiry)."""
        async with self.db.write() as conn:
            await serialise(conn, LOCK_CLUSTER)
            for row in (await conn.execute(select(replicas))).all():
                if now - row.heartbeat >= EXPIRY or (row.host == host and not alive(row.pid)):
                    continue
                seen = f"pid {row.pid} on {row.host}, heartbeat {_age(now, row.heartbeat):.1f} s ago"
                if row.id == replica:
                    raise UsageError(
                        f"replica {replica!r} is already running ({seen}): give each replica its own [cluster] id"
                    )
                if self.db.dialect == "sqlite":
                    raise UsageError(
                        f"the store {self.db.location.description} is served by control tower {row.id!r}"
                        f" already ({seen}); a second replica needs a PostgreSQL store"
                    )
            await conn.execute(delete(site_presence).where(site_presence.c.replica == replica))
            await conn.execute(delete(replicas).where(replicas.c.id == replica))
            await conn.execute(
                insert(replicas).values(
                    id=replica, host=host, pid=pid, started=now, heartbeat=now, advertise=advertise
                )
            )

    async def _update_mine(self, replica: str, pid: int, **values: object) -> bool:
        """Change ``replica``'s row if it is still this process's (``pid``); False if not."""
        async with self.db.write() as conn:
            result = await conn.execute(
                update(replicas).where(and_(replicas.c.id == replica, replicas.c.pid == pid)).values(**values)
            )
        return result.rowcount > 0

    async def heartbeat(self, replica: str, pid: int, *, now: datetime.datetime) -> bool:
        """Mark ``replica`` alive at ``now``; False if its row is no longer this process's
        (it stopped beating for longer than the expiry and another took the id over)."""
        return await self._update_mine(replica, pid, heartbeat=now)

    async def advertise(self, replica: str, pid: int, url: str | None) -> None:
        """Where ``replica`` (this process, ``pid``) takes relayed streams, once it listens."""
        await self._update_mine(replica, pid, advertise=url)

    async def drain(self, replica: str, pid: int) -> None:
        """``replica`` (this process, ``pid``) drains: the sites it holds may be claimed now."""
        await self._update_mine(replica, pid, draining=True)

    async def leave(self, replica: str, pid: int) -> None:
        """Forget ``replica`` and the site links it held (a clean stop)."""
        async with self.db.write() as conn:
            await serialise(conn, LOCK_CLUSTER)
            mine = await conn.scalar(
                select(replicas.c.id).where(and_(replicas.c.id == replica, replicas.c.pid == pid))
            )
            if mine is None:
                return  # taken over meanwhile: not ours to delete
            await conn.execute(delete(site_presence).where(site_presence.c.replica == replica))
            await conn.execute(delete(replicas).where(replicas.c.id == replica))

    async def claim(
        self, site: str, replica: str, peer: str, *, now: datetime.datetime, info: str | None = None
    ) -> Holder | None:
        """Record that ``replica`` holds ``site``'s link (and what the site reported,
        ``info``), unless another live replica does: then nothing changes and that one
        is returned."""
        async with self.db.write() as conn:
            await serialise(conn, LOCK_CLUSTER)
            row = (
                await conn.execute(
                    select(
                        site_presence.c.replica,
                        site_presence.c.peer,
                        replicas.c.host,
                        replicas.c.heartbeat,
                        replicas.c.draining,
                    )
                    .join(replicas, replicas.c.id == site_presence.c.replica)
                    .where(site_presence.c.site == site)
                )
            ).first()
            # A draining holder lets go at once: its enforcer is here because it was told
            # to move, and the old link only finishes its streams.
            if (
                row is not None
                and row.replica != replica
                and now - row.heartbeat < EXPIRY
                and not row.draining
            ):
                return Holder(row.replica, row.peer, row.host, _age(now, row.heartbeat))
            await conn.execute(delete(site_presence).where(site_presence.c.site == site))
            await conn.execute(
                insert(site_presence).values(site=site, replica=replica, peer=peer, since=now, info=info)
            )
        return None

    async def report(self, site: str, replica: str, info: str) -> None:
        """What ``site`` reports now (its STATUS), while ``replica`` holds it."""
        async with self.db.write() as conn:
            await conn.execute(
                update(site_presence)
                .where(and_(site_presence.c.site == site, site_presence.c.replica == replica))
                .values(info=info)
            )

    async def release(self, site: str, replica: str) -> None:
        """``replica`` no longer holds ``site``'s link (if it still did)."""
        async with self.db.write() as conn:
            await conn.execute(
                delete(site_presence).where(
                    and_(site_presence.c.site == site, site_presence.c.replica == replica)
                )
            )

    async def holders(self, *, now: datetime.datetime) -> dict[str, Holder]:
        """Every site held by a live replica, by site name (one statement: one snapshot)."""
        async with self.db.read() as conn:
            rows = await conn.execute(
                select(
                    site_presence.c.site,
                    site_presence.c.replica,
                    site_presence.c.peer,
                    site_presence.c.info,
                    replicas.c.host,
                    replicas.c.advertise,
                )
                .join(replicas, replicas.c.id == site_presence.c.replica)
                .where(replicas.c.heartbeat > now - EXPIRY)
            )
            return {
                row.site: Holder(row.replica, row.peer, row.host, advertise=row.advertise, info=row.info)
                for row in rows
            }
