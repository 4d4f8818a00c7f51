"""The inventory: what runs at this site (TOML, declared by the site's owner).

Example::

    [applications.popcorn-controller.service-instances.popcorn-controller-service-1]
    netns = "popcorn-1"          # under /run/netns; omit for host networking
    runtime = "netns"            # how its processes start; default "netns" with a netns, else "host"

    [applications.popcorn-controller.service-instances.popcorn-controller-service-1.containers.kettle-popper-manager]
    command = ["/usr/bin/popper", "--serve"]   # optional: kept running by the enforcer
    env = { POPPER_MODE = "kettle" }          # optional; PATH defaults to the usual system one
    cwd = "/var/lib/popper"                   # optional; default "/"
    user = "popper"                           # optional: a login name or a numeric uid
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import StreamError, UsageError
from ..protocol import ErrorCode
from .api import Container, ServiceInstance

#: Keys of a container table; anything else is refused (a typo like ``cmd`` would
#: otherwise leave a container silently not running).
CONTAINER_KEYS = frozenset({"command", "env", "cwd", "user"})


@dataclass(frozen=True)
class Inventory:
    instances: dict[tuple[str, str], ServiceInstance]

    def find(self, application: str, instance: str) -> ServiceInstance:
        found = self.instances.get((application, instance))
        if found is None:
            known = {app for app, _ in self.instances}
            what = (
                f"service instance {instance!r} of application {application!r}"
                if application in known
                else f"application {application!r}"
            )
            raise StreamError(f"{what} not found at this site", code=ErrorCode.NOT_FOUND)
        return found

    def describe(
        self, states: Mapping[tuple[str, str, str], Mapping[str, Any]] | None = None
    ) -> dict[str, Any]:
        """The inventory as sent to the tower in HELLO and STATUS
        (shape: :mod:`supctl.tower.siteinfo`).

        ``states`` maps (application, instance, container) to the container's runtime
        state (:meth:`ContainerSupervisor.states`); containers without one get ``{}``.
        """
        states = states or {}
        apps: dict[str, Any] = {}
        for (app, name), inst in sorted(self.instances.items()):
            apps.setdefault(app, {"service-instances": {}})["service-instances"][name] = {
                "netns": inst.netns,
                "runtime": inst.runtime,
                "containers": {c: dict(states.get((app, name, c), {})) for c in sorted(inst.containers)},
            }
        return apps

    def check_runtimes(self, known: Iterable[str]) -> None:
        """Refuse an instance whose runtime no plugin registered (at enforcer start)."""
        names = sorted(known)
        for (_, name), inst in sorted(self.instances.items()):
            if inst.runtime not in names:
                raise UsageError(
                    f"inventory: service instance {name} uses unknown runtime {inst.runtime!r} "
                    f"(known: {', '.join(names) or 'none'})"
                )


def _table(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise UsageError(f"inventory: {where} must be a table")
    return value


def _container(name: str, raw: Any, where: str) -> Container:
    body = _table(raw, f"container {name} of {where}")
    unknown = set(body) - CONTAINER_KEYS
    if unknown:
        raise UsageError(f"inventory: container {name} of {where} has unknown key {sorted(unknown)[0]!r}")
    command = body.get("command")
    if command is not None and (
        not isinstance(command, list) or not command or not all(isinstance(a, str) for a in command)
    ):
        raise UsageError(f"inventory: command of container {name} must be a non-empty list of strings")
    env = _table(body.get("env", {}), f"env of container {name}")
    for key, value in env.items():
        if not isinstance(value, str) or not key or "=" in key:
            raise UsageError(f'inventory: env {key!r} of container {name} must be NAME = "string"')
    text: dict[str, str | None] = {}
    for key in ("cwd", "user"):
        value = body.get(key)
        if value is not None and (not isinstance(value, str) or not value):
            raise UsageError(f"inventory: {key} of container {name} must be a non-empty string")
        text[key] = value
    if text["cwd"] is not None and not text["cwd"].startswith("/"):
        raise UsageError(f"inventory: cwd of container {name} must be an absolute path")
    return Container(name, command, dict(env), text["cwd"], text["user"])


def parse_inventory(data: dict[str, Any], source: str = "inventory") -> Inventory:
    instances: dict[tuple[str, str], ServiceInstance] = {}
    unknown = set(data) - {"applications"}
    if unknown:
        raise UsageError(f"{source}: unknown top-level key {sorted(unknown)[0]!r}")
    for app, app_body in _table(data.get("applications", {}), "applications").items():
        sis = _table(app_body, f"applications.{app}").get("service-instances", {})
        for name, raw in _table(sis, f"applications.{app}.service-instances").items():
            body = _table(raw, f"service instance {name}")
            netns = body.get("netns")
            if netns is not None and (not isinstance(netns, str) or not netns or "/" in netns):
                raise UsageError(f"{source}: netns of {name} must be a namespace name")
            runtime = body.get("runtime", "")
            if not isinstance(runtime, str) or (runtime == "" and "runtime" in body):
                raise UsageError(f"{source}: runtime of {name} must be a runtime name")
            if runtime == "netns" and netns is None:
                raise UsageError(f"{source}: runtime 'netns' of {name} needs a netns")
            containers = _table(body.get("containers", {}), f"containers of {name}")
            instances[(app, name)] = ServiceInstance(
                app, name, netns, {c: _container(c, v, name) for c, v in containers.items()}, runtime
            )
    return Inventory(instances)


def load_inventory(path: Path) -> Inventory:
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise UsageError(f"cannot read inventory {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"inventory {path} is not valid TOML: {exc}") from None
    return parse_inventory(data, str(path))
