"""The inventory: what runs at this site (TOML, declared by the site's owner).

Example::

    [applications.popcorn-controller.service-instances.popcorn-controller-service-1]
    netns = "popcorn-1"          # under /run/netns; omit for host networking

    [applications.popcorn-controller.service-instances.popcorn-controller-service-1.containers.kettle-popper-manager]
    command = ["/usr/bin/popper"]
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import StreamError, UsageError
from ..protocol import ErrorCode
from .api import ServiceInstance


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

    def describe(self) -> dict[str, Any]:
        """The inventory as sent to the tower in HELLO."""
        apps: dict[str, Any] = {}
        for (app, name), inst in sorted(self.instances.items()):
            apps.setdefault(app, {"service-instances": {}})["service-instances"][name] = {
                "containers": sorted(inst.containers)
            }
        return apps


def _table(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise UsageError(f"inventory: {where} must be a table")
    return value


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
            containers = _table(body.get("containers", {}), f"containers of {name}")
            instances[(app, name)] = ServiceInstance(
                app, name, netns, {c: _table(v, f"container {c}") for c, v in containers.items()}
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
