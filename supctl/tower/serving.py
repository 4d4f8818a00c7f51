"""``control-tower serve``: the TLS WebSocket server around a :class:`~.server.Tower`."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import resource
import signal
import ssl

from websockets.asyncio.server import Server
from websockets.asyncio.server import serve as ws_serve
from websockets.http11 import Response

from .. import aio
from ..errors import UsageError
from ..output import setup_logging
from ..plainhttp import metrics_response, parse_listen, serve_plain_http
from ..preauth import BACKLOG, PreauthGate, gated_connection, raise_fd_limit, total_cap
from ..protocol import MAX_MESSAGE_ACCEPTED, SUBPROTOCOL
from ..wsconn import keepalive_options
from . import peering as peering_mod
from .auditsink import AuditSink
from .config import TowerConfig
from .directory import Directory
from .hub import drain
from .metrics import AuditedMetrics, TowerMetrics, live_state
from .policywatch import PolicyWatch
from .presence import Presence
from .probes import PROBE_PATHS
from .server import Tower
from .storeconfig import open_store
from .users import parse_duration

log = logging.getLogger("supctl.tower")


def server_ssl_context(config: TowerConfig) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(config.cert), str(config.key))
    return context


async def run_tower(
    config: TowerConfig, host: str, port: int, insecure: bool, started: asyncio.Event | None = None
) -> None:
    store = await open_store(config)
    presence = Presence(store.cluster, config.cluster_id)
    try:
        # Refused (one line, exit 2) if this replica id runs already, or SQLite is served.
        await presence.join()
        directory = await Directory.load(store, watch=PolicyWatch(config.policies))
    except BaseException:
        await store.close()
        raise
    audit_log = AuditSink(store.audit, keep=config.audit_keep)
    audit_log.start()
    # Counted from the audit records as they are appended (:mod:`.metrics`).
    metrics = TowerMetrics(lambda: live_state(tower.hub), site_labels=config.metrics_site_labels)
    audit_log.on_write = metrics.audit_write.observe
    tower = Tower(directory, AuditedMetrics(audit_log, metrics), config.limits)
    tower.metrics = metrics
    tower.login_expiry = parse_duration(config.login_expiry)
    tower.hub.presence = presence
    presence.on_taken_over = tower.hub.close_sites
    keepalive = config.keepalive or None
    handshake = config.limits.handshake_timeout
    context = None if insecure else server_ssl_context(config)
    fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    gate = PreauthGate(config.limits.preauth_per_address, total_cap(config.limits.preauth_total, fd_limit))
    log.info("unauthenticated connections: at most %d per address, %d in all", gate.per_address, gate.total)
    if gate.total < config.limits.preauth_total:
        log.warning(
            "limits.preauth-total lowered from %d to %d: raise the open-file limit (LimitNOFILE)",
            config.limits.preauth_total, gate.total,
        )  # fmt: skip
    server = ws_serve(
        tower.handler,
        host,
        port,
        process_request=tower.handshake_request,
        # Plain TCP: the connection class counts it at accept, then runs TLS (preauth.py),
        # with the same timeout for a stalled TLS handshake as for the WebSocket's.
        create_connection=gated_connection(gate, context, handshake),
        subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
        compression=None,
        max_size=MAX_MESSAGE_ACCEPTED,
        write_limit=2**18,
        open_timeout=handshake,
        # A peer whose keepalive fails is dropped: a dead site link frees its site.
        **keepalive_options(keepalive),
        server_header="control-tower",
        backlog=BACKLOG,  # passed on to loop.create_server
    )
    async with server, contextlib.AsyncExitStack() as stack:
        address = next(iter(server.sockets)).getsockname()
        shown = f"[{address[0]}]" if ":" in address[0] else address[0]
        log.info("control-tower listening on %s://%s:%d", "ws" if insecure else "wss", shown, address[1])
        await _start_peering(config, tower, presence, stack)
        await _start_metrics(config, tower, metrics, stack)
        if started is not None:
            started.set()
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        sweeper = asyncio.create_task(tower.sweep_forever(), name="limits-sweep")
        poller = asyncio.create_task(directory.poll_forever(), name="store-poll")
        listener = asyncio.create_task(directory.listen_forever(), name="store-listen")
        heart = asyncio.create_task(presence.beat_forever(), name="heartbeat")
        await stop.wait()
        await _drain(server, tower, config.drain_timeout, stop)
        for task in (sweeper, poller, listener, heart):
            task.cancel()
        log.info("control-tower stopping")
    await presence.leave()
    await audit_log.stop()  # writes what is queued; says how many records were lost, if any
    await store.close()


async def _start_peering(
    config: TowerConfig, tower: Tower, presence: Presence, stack: contextlib.AsyncExitStack
) -> None:
    """``[cluster] advertise`` or ``peer-listen``: listen for the other replicas, dial them
    when a session needs a site they hold, and say where in the store (:mod:`.peering`)."""
    peering = config.peering()
    if peering is None:
        return
    host, port, advertise = peering
    keepalive, timeout = config.keepalive or None, config.limits.handshake_timeout
    listener = peering_mod.listener_context(config.peer_cert, config.peer_key, config.ca)
    dialler = peering_mod.dialler_context(config.peer_cert, config.peer_key, config.ca)
    try:
        server = await stack.enter_async_context(
            peering_mod.serve_peers(tower, listener, host, port, keepalive=keepalive, timeout=timeout)
        )
    except OSError as exc:
        raise UsageError(f"cannot listen for peers on {host or '*'}:{port}: {exc.strerror or exc}") from None
    bound_host, bound_port = peering_mod.bound_address(server)
    if advertise is None:
        if not host or ipaddress.ip_address(bound_host).is_unspecified:
            raise UsageError("[cluster] peer-listen on every interface needs [cluster] advertise")
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        advertise = f"wss://{shown}:{bound_port}"
    peers = peering_mod.Peers(presence.replica, dialler, tower, keepalive=keepalive, timeout=timeout)
    tower.peers = peers
    tower.hub.move_sites = True
    stack.push_async_callback(peers.close)
    await presence.set_advertise(advertise)
    log.info("replica %s takes relayed streams on %s (advertised as %s)", presence.replica,
                f"{bound_host}:{bound_port}", advertise)  # fmt: skip


async def _start_metrics(
    config: TowerConfig, tower: Tower, metrics: TowerMetrics, stack: contextlib.AsyncExitStack
) -> None:
    """``[metrics] listen``: plain HTTP for Prometheus and probes, no token.  Metrics say
    which sites and how much traffic, so they are not on the public listener: bind this
    one to loopback or an internal network."""
    if config.metrics_listen is None:
        return
    host, port = parse_listen(config.metrics_listen)

    async def scrape() -> Response:
        return metrics_response(metrics.exposition())

    routes = {path: functools.partial(tower.probes.answer, path) for path in PROBE_PATHS}
    address = await stack.enter_async_context(
        serve_plain_http(host, port, {**routes, "/metrics": scrape}, "metrics", log)
    )
    log.info("metrics and probes on http://%s/metrics", address)


async def _drain(server: Server, tower: Tower, timeout: float, stop: asyncio.Event) -> None:
    """SIGTERM: stop accepting, let streams in flight finish (at most ``timeout`` s), close
    the rest with GOING_AWAY; a second SIGTERM or SIGINT cuts the wait short."""
    server.close(close_connections=False)  # the listening sockets close now
    stop.clear()
    drainer = asyncio.ensure_future(drain(tower.hub, timeout))
    again = asyncio.ensure_future(stop.wait())
    await asyncio.wait({drainer, again}, return_when=asyncio.FIRST_COMPLETED)
    again.cancel()
    if not drainer.done():
        log.warning("control-tower: second signal, not waiting for streams in flight")
        drainer.cancel()
    await asyncio.gather(drainer, again, return_exceptions=True)


def serve(
    config: TowerConfig, host: str, port: int, insecure: bool, level: int = logging.INFO, fmt: str = "text"
) -> None:
    setup_logging(level, fmt)
    # Every connection, authenticated or not, holds a descriptor: the usual soft limit
    # (1024) is far below what a tower serving many sessions needs (docs/tower.md,
    # "Deployment limits"); the hard limit is what the deployment allows.
    log.info("open-file limit (RLIMIT_NOFILE): %s", raise_fd_limit())
    aio.run(run_tower(config, host, port, insecure))
