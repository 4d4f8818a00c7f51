"""Shell completion: ``supctl completion bash|zsh|fish`` and the names it completes.

The scripts are click's (``_SUPCTL_COMPLETE=bash_source supctl`` prints the same);
they call supctl back with ``_SUPCTL_COMPLETE=bash_complete`` at every TAB.  Verbs and
options come from the click tree; the names of sites, applications, service instances
and containers from the tower's ``GET /v1/state/...`` views (those ``supctl show`` reads),
with the settings the command line gives so far (``--host``, ``--context``...).

A TAB must never hang the shell nor print on it: one GET per TAB, in a daemon thread
given :data:`TIMEOUT` seconds in all (a DNS lookup cannot be cancelled, so it is
abandoned, not awaited), stderr silenced meanwhile, and any failure (no token, tower
down, TLS) completes nothing.  A name the tower sends that is not a valid name is
dropped: completions go onto the user's command line as they are, so a hostile tower
must not put ``; rm -rf ~`` there.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import click
from click.shell_completion import CompletionItem, get_completion_class

from .api import Transport
from .target import LEVELS, valid

#: Seconds one TAB may wait for the tower, in all.
TIMEOUT = 2.0
SHELLS = ("bash", "zsh", "fish")
COMPLETE_VAR = "_SUPCTL_COMPLETE"


def quietly(fetch: Callable[[], list[str]], timeout: float = TIMEOUT) -> list[str]:
    """``fetch()``, or [] if it fails or takes longer than ``timeout``; nothing on stderr."""
    result: list[list[str]] = []

    def run() -> None:
        with contextlib.suppress(BaseException):
            result.append(fetch())

    with contextlib.redirect_stderr(io.StringIO()):
        thread = threading.Thread(target=run, name="supctl-complete", daemon=True)
        thread.start()
        thread.join(timeout)
    return result[0] if result else []


def names(items: Any, key: str, level: str) -> list[str]:
    """The valid names in ``items[key]`` (a tower's answer): anything else is dropped."""
    listed = items.get(key) if isinstance(items, dict) else None
    found = [item.get("name") for item in listed or () if isinstance(item, dict)]
    return sorted({name for name in found if isinstance(name, str) and valid(level, name)})


class TowerNames:
    """The names the tower shows, one GET each (``transport`` opened on first use)."""

    def __init__(self, transport: Callable[[], Transport]) -> None:
        self.transport = transport

    def _get(self, path: str, query: dict[str, str]) -> Any:
        return asyncio.run(self.transport().get(path, query))

    def sites(self) -> list[str]:
        return names(self._get("/v1/state/sites", {}), "sites", "site")

    def applications(self, site: str) -> list[str]:
        return names(self._get("/v1/state/applications", {"site": site}), "applications", "application")

    def _instances(self, site: str, app: str) -> Any:
        path = f"/v1/state/applications/{quote(app, safe='')}/service-instances"
        return self._get(path, {"site": site})

    def instances(self, site: str, app: str) -> list[str]:
        return names(self._instances(site, app), "service-instances", "service-instance")

    def containers(self, site: str, app: str, instance: str) -> list[str]:
        body = self._instances(site, app)
        for item in body.get("service-instances") or () if isinstance(body, dict) else ():
            if isinstance(item, dict) and item.get("name") == instance:
                return names(item, "containers", "container")
        return []

    def below(self, parts: list[str]) -> list[str]:
        """The names one level below ``parts`` (site, application, instance: 0 to 3 names)."""
        if not parts:
            return self.sites()
        if len(parts) == 1:
            return self.applications(parts[0])
        if len(parts) == 2:
            return self.instances(parts[0], parts[1])
        return self.containers(parts[0], parts[1], parts[2])


def compact_items(tower: TowerNames, incomplete: str) -> list[CompletionItem]:
    """Completions of a compact target: ``SITE/``, then ``SITE/APP/``, ``SITE/APP/INSTANCE``
    (a verb of the instance may follow; type ``/`` for its containers)."""
    *done, last = incomplete.split("/")
    if len(done) > 3 or any(not valid(level, part) for level, part in zip(LEVELS, done, strict=False)):
        return []
    prefix = "".join(f"{part}/" for part in done)
    slash = "/" if len(done) < 2 else ""
    found = quietly(lambda: tower.below(done))
    return [CompletionItem(f"{prefix}{name}{slash}") for name in found if name.startswith(last)]


def make_completion_command() -> click.Command:
    @click.command("completion", context_settings={"help_option_names": ["-h", "--help"]})
    @click.argument("shell", type=click.Choice(SHELLS))
    @click.pass_context
    def completion(ctx: click.Context, shell: str) -> None:
        """Print the completion script of SHELL (bash, zsh or fish); see docs/cli.md.

        bash: eval "$(supctl completion bash)" in ~/.bashrc
        """
        cls = get_completion_class(shell)
        assert cls is not None  # SHELLS are click's own
        root = ctx.find_root()
        click.echo(cls(root.command, {}, root.info_name or "supctl", COMPLETE_VAR).source())

    return completion
