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

    [policy]                                  # optional: the site's own policy (absent: allow all)
    allow-ip-addresses = ["192.0.2.0/24"]     # where connect --ip-address may reach (absent: anywhere)
    allow-ports = ["443", "8000-8100"]        # which target ports connect may reach (absent: any)
    allow-exec = false                        # whether exec may run here (absent: true)

The ``[policy]`` table is checked for every stream, after the tower's own check,
so a compromised or misconfigured tower still cannot make the site connect
anywhere its owner did not allow.  It judges what will run: the handler's
declaration (:class:`~supctl.enforcer.api.Serves`) and the canonical request
(:mod:`supctl.enforcer.dispatch`).  Every loopback target (127.0.0.0/8, ``::1``)
is the service instance itself, as a connect without ``--ip-address`` is, and is
never refused by ``allow-ip-addresses``; ``allow-ports`` applies to every connect.
"""

from __future__ import annotations

import ipaddress
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import StreamError, UsageError
from ..protocol import ErrorCode, OpenRequest
from ..protocol.targets import canonical_network, is_self, matches
from .api import Container, Serves, ServiceInstance

#: Keys of a container table; anything else is refused (a typo like ``cmd`` would
#: otherwise leave a container silently not running).
CONTAINER_KEYS = frozenset({"command", "env", "cwd", "user"})
POLICY_KEYS = frozenset({"allow-ip-addresses", "allow-ports", "allow-exec"})


@dataclass(frozen=True)
class LocalPolicy:
    """The inventory's ``[policy]`` table; None fields do not restrict."""

    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] | None = None
    ports: tuple[tuple[int, int], ...] | None = None
    exec_allowed: bool = True

    def check(self, serves: Serves, request: OpenRequest) -> None:
        """Raise StreamError (DENIED) if the site's local policy refuses to serve
        ``request`` (canonical: :func:`supctl.enforcer.dispatch.canonical_request`)
        with the handler that declared ``serves``.

        Judged by the declaration, never by the OPEN's own words: the exec handler is
        refused by ``allow-exec`` whatever verb the OPEN carried.  A third-party verb
        is not restricted by these keys (they speak of connect and exec only).
        """
        if serves.verb == "exec":
            if not self.exec_allowed:
                raise StreamError("the site's local policy refuses exec", code=ErrorCode.DENIED)
            return
        if serves.verb != "connect":
            return
        refused = self.ports is not None and not any(lo <= request.port <= hi for lo, hi in self.ports)
        address = request.ip_address or None
        if self.networks is not None and not is_self(address):
            refused = refused or not matches(self.networks, address)
        if refused:
            raise StreamError(f"the site's local policy refuses {request.target}", code=ErrorCode.DENIED)


def _policy(raw: Any, source: str) -> LocalPolicy:
    body = _table(raw, "policy")
    unknown = set(body) - POLICY_KEYS
    if unknown:
        raise UsageError(f"{source}: policy has unknown key {sorted(unknown)[0]!r}")
    networks = ports = None
    if "allow-ip-addresses" in body:
        values = body["allow-ip-addresses"]
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise UsageError(f"{source}: policy allow-ip-addresses must be a list of CIDR strings")
        try:
            # A mapped network means the IPv4 one: targets are unmapped too.
            networks = tuple(canonical_network(ipaddress.ip_network(v, strict=False)) for v in values)
        except ValueError as exc:
            raise UsageError(f"{source}: policy allow-ip-addresses: {exc}") from None
    if "allow-ports" in body:
        values = body["allow-ports"]
        if not isinstance(values, list):
            raise UsageError(f'{source}: policy allow-ports must be a list such as ["443", "8000-8100"]')
        ranges = []
        for value in values:
            lo_text, sep, hi_text = str(value).partition("-")
            try:
                lo, hi = int(lo_text), int(hi_text if sep else lo_text)
            except ValueError:
                raise UsageError(f"{source}: policy allow-ports: bad port {value!r}") from None
            if not 1 <= lo <= hi <= 65535:
                raise UsageError(f"{source}: policy allow-ports: bad range {value!r}")
            ranges.append((lo, hi))
        ports = tuple(ranges)
    exec_allowed = body.get("allow-exec", True)
    if not isinstance(exec_allowed, bool):
        raise UsageError(f"{source}: policy allow-exec must be true or false")
    return LocalPolicy(networks, ports, exec_allowed)


@dataclass(frozen=True)
class Inventory:
    instances: dict[tuple[str, str], ServiceInstance]
    policy: LocalPolicy = LocalPolicy()  # [policy]; the default allows everything

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
    unknown = set(data) - {"applications", "policy"}
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
    return Inventory(instances, _policy(data.get("policy", {}), source))


def load_inventory(path: Path) -> Inventory:
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise UsageError(f"cannot read inventory {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"inventory {path} is not valid TOML: {exc}") from None
    return parse_inventory(data, str(path))
