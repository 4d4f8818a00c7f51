"""The enforcer's Prometheus metrics, for ``--metrics-listen`` (a local listener only:
the enforcer never listens for the tower's traffic).

Everything is read from the agent and the container supervisor when scraped; they
own the counts (:class:`.agent.Agent`, :class:`.containers.ContainerSupervisor`).
Label values are bounded: handlers registered at start, outcomes from a fixed set,
and the inventory's own instance and container names.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..plainhttp import text_response

if TYPE_CHECKING:
    from websockets.http11 import Response

    from .agent import Agent

CONTAINER_STATES = ("running", "restarting", "failed", "stopped")


class EnforcerMetrics(Collector):
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def link_up(self) -> bool:
        link = self.agent.link
        return link is not None and not link.ended and link.conn.closed is None

    async def readyz(self) -> Response:
        """Ready: linked to the tower (the site can be reached through it)."""
        if self.link_up():
            return text_response(200, "ready")
        return text_response(503, "not ready: no link to the tower")

    def collect(self) -> Iterator[Metric]:
        agent = self.agent
        yield GaugeMetricFamily(
            "supctl_enforcer_link_up", "1 while the link to the tower is up", value=int(self.link_up())
        )
        yield CounterMetricFamily(
            "supctl_enforcer_links", "Links to the tower established (reconnects: this minus one)",
            value=agent.links_made,
        )  # fmt: skip
        open_ = GaugeMetricFamily(
            "supctl_enforcer_streams_open", "Streams open, by handler", labels=["handler"]
        )
        for handler, count in sorted(agent.streams_open.items()):
            open_.add_metric([handler], count)
        yield open_
        ended = CounterMetricFamily(
            "supctl_enforcer_streams_ended",
            "Streams ended, by handler and outcome",
            labels=["handler", "outcome"],
        )
        for (handler, outcome), count in sorted(agent.streams_ended.items()):
            ended.add_metric([handler, outcome], count)
        yield ended
        if agent.supervisor is None:
            return
        states = GaugeMetricFamily(
            "supctl_enforcer_container_state", "1 for each container's current state",
            labels=["application", "instance", "container", "state"],
        )  # fmt: skip
        restarts = CounterMetricFamily(
            "supctl_enforcer_container_restarts", "Restarts of each container",
            labels=["application", "instance", "container"],
        )  # fmt: skip
        for (app, instance, container), state in sorted(agent.supervisor.states().items()):
            for name in CONTAINER_STATES:
                states.add_metric([app, instance, container, name], int(state["state"] == name))
            restarts.add_metric([app, instance, container], state["restarts"])
        yield states
        yield restarts
