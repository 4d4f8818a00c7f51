"""The tower's Prometheus metrics (``GET /metrics`` on the ``[metrics]`` listener).

Counted from the audit records, not beside them: every decision the tower makes is
already one record (:mod:`.audit`), so the counters are the audit log summed, never a
second bookkeeping that could drift from it.  :class:`AuditedMetrics` sits in front of
the audit sink and sees each record as it is appended.  What is live (sites connected,
sessions, open streams) is read from the :class:`~.hub.Hub` when scraped.

Label values are bounded sets, whatever a client sends: a verb, protocol or status
outside the known ones is counted as ``other``.  No user names, tokens or stream ids
are labels; site names only with ``[metrics] site-labels = true``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client import Counter as PromCounter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from . import audit

if TYPE_CHECKING:
    from .audit import AuditLog
    from .hub import Hub

VERBS = frozenset({"connect", "exec", "show", "whoami", "login", "logout", "renew", "enforcer"})
PROTOCOLS = frozenset({"tcp", "udp"})
STATUSES = frozenset({400, 401, 403, 404, 409, 413, 426, 429, 500, 503})
OTHER = "other"


def bounded(value: Any, known: frozenset[Any]) -> str:
    return str(value) if value in known else OTHER


class TowerMetrics:
    """One registry per tower (not prometheus_client's global one: tests run several
    towers in one process, and a scrape shows only this tower)."""

    def __init__(self, live: Callable[[], LiveState] | None = None, *, site_labels: bool = False) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.site_labels = site_labels
        r = self.registry
        self.sessions_accepted = PromCounter(
            "supctl_sessions_accepted", "Client sessions accepted", ["verb"], registry=r
        )
        self.refused = PromCounter(
            "supctl_requests_refused", "Requests refused before the upgrade", ["status", "verb"], registry=r
        )
        self.logins = PromCounter("supctl_logins", "Logins by result", ["result"], registry=r)
        self.renewals = PromCounter("supctl_token_renewals", "Login token renewals", registry=r)
        self.streams_ended = PromCounter(
            "supctl_streams_ended", "Streams ended, by verb, protocol and reason",
            ["verb", "protocol", "reason"], registry=r,
        )  # fmt: skip
        self.streams_refused = PromCounter(
            "supctl_streams_refused", "Streams refused inside accepted sessions", registry=r
        )
        self.bytes = PromCounter(
            "supctl_relayed_bytes",
            "Bytes relayed, by direction (up: client to site)",
            ["direction"],
            registry=r,
        )
        self.site_bytes = (
            PromCounter(
                "supctl_site_relayed_bytes", "Bytes relayed per site", ["site", "direction"], registry=r
            )
            if site_labels
            else None
        )
        self.open_latency = Histogram(
            "supctl_stream_open_seconds", "From a stream's OPEN to the site's ACCEPT", registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )  # fmt: skip
        # At most a window per stream and direction by design (docs/architecture.md): a peak
        # near it says a peer reads slowly; above it would be a flow-control bug.
        self.queue_peak = Histogram(
            "supctl_relay_queue_peak_bytes", "The most bytes a stream had queued in the tower, per direction",
            ["direction"], registry=r,
            buckets=(0, 1024, 16384, 65536, 262144, 1048576, 4194304, 16777216),
        )  # fmt: skip
        self.audit_write = Histogram(
            "supctl_audit_write_seconds", "Time to write one batch of audit records to the store", registry=r,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5),
        )  # fmt: skip
        if live is not None:
            r.register(_LiveCollector(live))

    def stream_opened(self, seconds: float) -> None:
        self.open_latency.observe(seconds)

    def stream_queued(self, peak_up: int, peak_down: int) -> None:
        self.queue_peak.labels("up").observe(peak_up)
        self.queue_peak.labels("down").observe(peak_down)

    def observe(self, rec: dict[str, Any]) -> None:
        """Count one audit record (the single source of these counters)."""
        event = rec.get("event")
        if event == "session-accepted":
            self.sessions_accepted.labels(bounded(rec.get("verb"), VERBS)).inc()
        elif event == "session-refused":
            status, verb = rec.get("status"), rec.get("verb")
            self.refused.labels(bounded(status, STATUSES), bounded(verb, VERBS)).inc()
            if verb == "login":
                self.logins.labels("throttled" if status == 429 else "failed").inc()
        elif event == "login":
            self.logins.labels("ok").inc()
        elif event == "renew":
            self.renewals.inc()
        elif event == "stream-closed":
            self._stream_closed(rec)
        elif event == "streams-refused":
            count = rec.get("count")
            if isinstance(count, int) and count > 0:
                self.streams_refused.inc(count)

    def _stream_closed(self, rec: dict[str, Any]) -> None:
        reason = bounded(rec.get("close-reason"), frozenset(audit.CLOSE_REASONS))
        verb, protocol = bounded(rec.get("verb"), VERBS), bounded(rec.get("protocol"), PROTOCOLS)
        if rec.get("verb") == "exec":
            protocol = ""
        self.streams_ended.labels(verb, protocol, reason).inc()
        for direction in ("up", "down"):
            count = rec.get(f"bytes-{direction}")
            if isinstance(count, int) and count > 0:
                self.bytes.labels(direction).inc(count)
                if self.site_bytes is not None and isinstance(rec.get("site"), str):
                    self.site_bytes.labels(rec["site"], direction).inc(count)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class LiveState:
    """What is live at a scrape: sites connected, client sessions, open streams."""

    def __init__(self, sites: int, sessions: int, streams: Iterable[tuple[str, str]]) -> None:
        self.sites = sites
        self.sessions = sessions
        self.streams = Counter(
            (bounded(v, VERBS), "" if v == "exec" else bounded(p, PROTOCOLS)) for v, p in streams
        )


def live_state(hub: Hub) -> LiveState:
    """The hub's live counts; each stream of a session has its session's verb and protocol."""
    streams = [(s.route.verb, s.route.protocol) for s in hub.sessions for _ in s.relays]
    return LiveState(len(hub.sites), len(hub.sessions), streams)


class _LiveCollector(Collector):
    def __init__(self, live: Callable[[], LiveState]) -> None:
        self.live = live

    def collect(self) -> Iterator[Metric]:
        state = self.live()
        yield GaugeMetricFamily(
            "supctl_sites_connected", "Sites whose enforcer is linked here", value=state.sites
        )
        yield GaugeMetricFamily("supctl_client_sessions", "Client sessions open here", value=state.sessions)
        streams = GaugeMetricFamily(
            "supctl_streams_open", "Streams open, by verb and protocol", labels=["verb", "protocol"]
        )
        for (verb, protocol), count in sorted(state.streams.items()):
            streams.add_metric([verb, protocol], count)
        yield streams


class AuditedMetrics:
    """An :class:`~.audit.AuditLog` that counts each record, then hands it on."""

    def __init__(self, inner: AuditLog, metrics: TowerMetrics) -> None:
        self.inner = inner
        self.metrics = metrics

    def append(self, rec: dict[str, Any]) -> bool:
        taken = self.inner.append(rec)
        if taken:  # a session refused for want of its record never happened
            self.metrics.observe(rec)
        return taken

    def close(self) -> None:
        self.inner.close()
