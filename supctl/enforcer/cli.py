"""``edge-enforcer``: the agent on an edge host."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
import sys
from collections.abc import Callable
from pathlib import Path

import click
from websockets.http11 import Response

from .. import aio
from ..errors import SupctlError, UsageError
from ..output import LOG_LEVELS, log_options, make_console, setup_logging
from ..plainhttp import metrics_response, parse_listen, serve_plain_http, text_response
from ..plugins import collect, make_plugin_manager
from ..protocol import KEEPALIVE, MAX_SITE_STREAMS
from ..tlspin import parse_fingerprint, pinned_context
from ..version import version_option
from .agent import Agent
from .api import Handler, HandlerContext, Serves
from .cgroups import CgroupTree
from .containers import ContainerSupervisor
from .dispatch import collect_handlers, configure_handlers, observers
from .inventory import Inventory, load_inventory
from .metrics import EnforcerMetrics
from .netns import NamespaceSockets
from .runtime import Runtime
from .tokenfile import read_site_token

log = logging.getLogger("supctl.enforcer")


def load_handlers() -> dict[Serves, Handler]:
    return collect_handlers(make_plugin_manager())


def load_runtimes() -> dict[str, Runtime]:
    return collect(make_plugin_manager(), "supctl_add_runtimes", "runtime")


def make_cli() -> click.Group:
    @click.group(context_settings={"help_option_names": ["-h", "--help"]})
    @version_option("edge-enforcer")
    def cli() -> None:
        """The supctl agent on an edge host: dials out to the control tower, never listens."""

    @cli.command()
    @click.option(
        "--tower",
        "towers",
        required=True,
        multiple=True,
        help="Tower URL, e.g. wss://tower.example:4646; repeat it for several (tried in turn).",
    )
    @click.option("--site", required=True, help="This site's name, as registered at the tower.")
    @click.option(
        "--token-file",
        required=True,
        type=click.Path(path_type=Path),
        help="This site's token: a file only the enforcer's user can read (mode 0600).",
    )
    @click.option(
        "--ca-file", type=click.Path(path_type=Path), help="CA to trust for the tower (default: system)."
    )
    @click.option(
        "--tower-fingerprint",
        metavar="SHA256",
        help="Trust only the tower certificate with this SHA-256 fingerprint (no CA or hostname check).",
    )
    @click.option(
        "--inventory", required=True, type=click.Path(path_type=Path), help="TOML inventory of the site."
    )
    @click.option("--connect-timeout", default=10.0, show_default=True, help="Seconds to reach a target.")
    @click.option(
        "--max-streams",
        type=click.IntRange(1, MAX_SITE_STREAMS),
        default=MAX_SITE_STREAMS,
        show_default=True,
        help="Most concurrent streams this site serves; more are refused with LIMIT.",
    )
    @click.option(
        "--keepalive",
        metavar="SECONDS",
        type=click.FloatRange(0, 3600),
        default=KEEPALIVE,
        show_default=True,
        help="WebSocket ping interval and pong timeout towards the tower (0: off); a silent "
        "partition is noticed within twice this.",
    )
    @click.option(
        "--metrics-listen",
        metavar="HOST:PORT",
        help="Serve /metrics, /healthz and /readyz over plain HTTP here (e.g. 127.0.0.1:9465); off without it.",
    )
    @click.option("-v", "--verbose", is_flag=True, help="Log every stream (--log-level debug).")
    @log_options("info")
    def run(
        towers: tuple[str, ...],
        site: str,
        token_file: Path,
        ca_file: Path | None,
        tower_fingerprint: str | None,
        inventory: Path,
        connect_timeout: float,
        max_streams: int,
        keepalive: float,
        metrics_listen: str | None,
        verbose: bool,
        log_level: str,
        log_format: str,
    ) -> None:
        """Keep the link to the tower and serve the streams it opens."""
        setup_logging(logging.DEBUG if verbose else LOG_LEVELS[log_level], log_format)
        metrics_at = parse_listen(metrics_listen) if metrics_listen is not None else None
        for url in towers:
            if not url.startswith(("wss://", "ws://")):
                raise UsageError(f"--tower must look like wss://HOST:PORT, got {url!r}")
        if len({url.partition(":")[0] for url in towers}) > 1:
            raise UsageError("the --tower URLs must all be wss:// or all ws:// (one TLS setting for all)")
        tower = towers[0]
        pin = parse_fingerprint(tower_fingerprint) if tower_fingerprint else None
        if pin is not None and not tower.startswith("wss://"):
            raise UsageError("--tower-fingerprint needs a wss:// tower URL (there is no certificate to pin)")
        # First, before anything starts or is killed: a token file others can read is refused.
        token = read_site_token(token_file)
        context = None
        if pin is not None:
            context = pinned_context()  # the pin replaces the CA and hostname checks
        elif tower.startswith("wss://"):
            try:
                context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
            except (OSError, ssl.SSLError) as exc:
                raise UsageError(f"cannot load CA file {ca_file}: {exc}") from None
            context.minimum_version = ssl.TLSVersion.TLSv1_2
        runtimes = load_runtimes()
        handlers = load_handlers()
        site_inventory = load_inventory(inventory)
        site_inventory.check_runtimes(runtimes)
        configure_handlers(handlers, site_inventory)
        # Kill what a previous enforcer of this site left running, and contain ours.
        cgroups = CgroupTree.open(site)
        # Container output goes to our stderr, next to our log, one prefixed line at a
        # time, and to the handlers that observe it (logs).
        supervisor = ContainerSupervisor(
            site_inventory,
            runtimes,
            output=sys.stderr.buffer,
            cgroups=cgroups,
            observers=observers(handlers),
        )
        sockets = NamespaceSockets()
        agent = Agent(
            towers=list(dict.fromkeys(towers)),
            site=site,
            token=token,
            ssl_context=context,
            tower_fingerprint=pin,
            inventory=site_inventory,
            max_streams=max_streams,
            keepalive=keepalive or None,
            read_token=lambda: read_site_token(token_file),
            handlers=handlers,
            context=HandlerContext(
                site=site,
                sockets=sockets,
                connect_timeout=connect_timeout,
                runtimes=runtimes,
                cgroups=cgroups,
            ),
            supervisor=supervisor,
        )

        def reload_inventory() -> Inventory:
            new = load_inventory(inventory)
            new.check_runtimes(runtimes)
            configure_handlers(handlers, new, previous=agent.dispatcher.inventory)
            return new

        try:
            aio.run(_run_until_signal(agent, supervisor, reload_inventory, metrics_at))
        finally:
            sockets.close()
            if cgroups is not None:
                cgroups.close()

    return cli


async def _run_until_signal(
    agent: Agent,
    supervisor: ContainerSupervisor,
    read_inventory: Callable[[], Inventory],
    metrics_at: tuple[str, int] | None = None,
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        if metrics_at is not None:
            await _serve_metrics(agent, *metrics_at, stack)
        await _serve(agent, supervisor, read_inventory)


async def _serve_metrics(agent: Agent, host: str, port: int, stack: contextlib.AsyncExitStack) -> None:
    metrics = EnforcerMetrics(agent)

    async def healthz() -> Response:
        return text_response(200, "ok")

    async def scrape() -> Response:
        return metrics_response(metrics.exposition())

    routes = {"/healthz": healthz, "/readyz": metrics.readyz, "/metrics": scrape}
    address = await stack.enter_async_context(serve_plain_http(host, port, routes, "metrics", log))
    log.info("metrics and probes on http://%s/metrics", address)


async def _serve(
    agent: Agent, supervisor: ContainerSupervisor, read_inventory: Callable[[], Inventory]
) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    reloads = Reloads(agent, read_inventory)
    loop.add_signal_handler(signal.SIGHUP, reloads.request)
    # Containers run for the enforcer's whole life, tower or no tower.
    supervisor.start()
    runner = asyncio.ensure_future(agent.run_forever())
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({runner, stopper}, return_when=asyncio.FIRST_COMPLETED)
        await agent.shutdown()
        for task in (runner, stopper):
            task.cancel()
        await asyncio.gather(runner, stopper, return_exceptions=True)
    finally:
        # After the link (its exec streams kill their processes): SIGTERM, grace, SIGKILL.
        await supervisor.stop()


class Reloads:
    """SIGHUP: read the inventory again and serve it; one reload at a time (a signal that
    arrives meanwhile asks for one more after it, never for a queue of them)."""

    def __init__(self, agent: Agent, read_inventory: Callable[[], Inventory]) -> None:
        self.agent = agent
        self.read_inventory = read_inventory
        self.task: asyncio.Task[None] | None = None
        self.again = False

    def request(self) -> None:
        if self.task is not None and not self.task.done():
            self.again = True
            return
        self.task = asyncio.create_task(self._reload(), name="inventory-reload")

    async def _reload(self) -> None:
        while True:
            self.again = False
            try:
                new = self.read_inventory()
            except SupctlError as exc:  # the running inventory stays in force
                log.error("inventory reload refused, the running one stays in force: %s", exc)
            else:
                log.info("inventory reloaded; %s", await self.agent.reload(new))
            if not self.again:
                return


def main() -> None:
    try:
        make_cli().main(prog_name="edge-enforcer", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        make_console().print(f"edge-enforcer: error: {exc.format_message()}", markup=False)
        sys.exit(exc.exit_code)
    except SupctlError as exc:
        make_console().print(f"edge-enforcer: error: {exc}", markup=False)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
