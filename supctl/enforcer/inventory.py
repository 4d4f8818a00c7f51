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
    allow-verbs = ["exec", "logs"]            # the verbs besides connect served here (absent: all installed)

    [verbs.logs]                              # optional: settings of the handler of verb logs
    buffer-bytes = 1048576                    # (each handler checks its own table: configure())

The ``[policy]`` table is checked for every stream, after the tower's own check,
so a compromised or misconfigured tower still cannot make the site connect
anywhere its owner did not allow.  It judges what will run: the handler's
declaration (:class:`~supctl.enforcer.api.Serves`) and the canonical request
(:mod:`supctl.enforcer.dispatch`).  Every loopback target (127.0.0.0/8, ``::1``)
is the service instance itself, as a connect without ``--ip-address`` is, and is
never refused by ``allow-ip-addresses``; ``allow-ports`` applies to every connect.
``allow-verbs`` names the verbs other than ``connect`` that the site serves, exec and
plugins' verbs alike, by the verb their handler declared; ``allow-exec = false``
refuses exec even when listed there.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from ..errors import StreamError, UsageError
from ..protocol import ErrorCode, OpenRequest
from ..protocol.names import valid_name
from ..protocol.targets import canonical_network, is_self, matches
from ..schema import Invalid, Names, OpaqueTable, Rule, Source, load, parse_toml
from .api import Container, Serves, ServiceInstance

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_PORTS = re.compile(r"([0-9]{1,5})(?:-([0-9]{1,5}))?")


def _networks(values: list[str]) -> tuple[Network, ...]:
    try:
        # A mapped network means the IPv4 one: targets are unmapped too.
        return tuple(canonical_network(ipaddress.ip_network(v, strict=False)) for v in values)
    except ValueError as exc:
        raise Invalid(f"must be a list of CIDR strings: {exc}") from None


def _ports(values: list[object]) -> tuple[tuple[int, int], ...]:
    ranges = []
    for value in values:
        # 443, "443" or "8000-8100", in ASCII digits (int() would take "٤٤٣" and " 443").
        text = str(value) if isinstance(value, str | int) and not isinstance(value, bool) else ""
        match = _PORTS.fullmatch(text)
        lo, hi = (int(match[1]), int(match[2] or match[1])) if match else (0, 0)
        if not 1 <= lo <= hi <= 65535:
            shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:36] + "..."
            raise Invalid(f'has a bad port or range {shown}: use e.g. ["443", "8000-8100"]')
        ranges.append((lo, hi))
    return tuple(ranges)


def _text(value: str) -> str:
    """Non-empty, without NUL: a process's arguments, environment and paths cannot hold one."""
    if not value or "\0" in value:
        raise ValueError(value)
    return value


def _command(argv: list[str]) -> list[str]:
    if not argv:
        raise ValueError(argv)
    return [_text(arg) for arg in argv]


def _cwd(path: str) -> str:
    if not _text(path).startswith("/"):
        raise ValueError(path)
    return path


def _netns(name: str) -> str:
    # The checks of netns.namespace_path (without importing pyroute2 here): a name under
    # /run/netns, so no "/", and neither "." nor "..".
    if not _text(name) or "/" in name or name in (".", ".."):
        raise ValueError(name)
    return name


def _verbs(values: list[str]) -> frozenset[str]:
    for value in values:
        if not valid_name(value):
            raise Invalid(f"has {value[:40]!r}, which is not a verb name")
    return frozenset(values)


NETWORKS = Rule("a list of CIDR strings", _networks, toml=list[str])
VERBS = Rule("a list of verb names", _verbs, toml=list[str])
PORTS = Rule('a list of ports or ranges such as ["443", "8000-8100"]', _ports, toml=list)
#: Names of applications, service instances and containers: the protocol's (names.py).
NAMES = Names(
    valid_name, "is not a valid name: letters, digits, '.', '_' and '-', starting with a letter or digit"
)
#: Environment variables: a name without "=" or NUL, a value without NUL.
ENV = Names(lambda name: bool(name) and "=" not in name and "\0" not in name, 'is not NAME = "string"')
ENV_VALUE = Rule("a string", lambda value: _text(value) if value else value)


@dataclass(frozen=True)
class ContainerTable:
    """``[applications.A.service-instances.I.containers.C]`` (:class:`~supctl.enforcer.api.Container`).

    Unknown keys are refused: a typo like ``cmd`` would leave a container silently not running.
    """

    command: Annotated[list[str] | None, Rule("a non-empty list of strings", _command)] = None
    env: Annotated[dict[str, Annotated[str, ENV_VALUE]], ENV] = field(default_factory=dict)
    cwd: Annotated[str | None, Rule("an absolute path", _cwd)] = None
    user: Annotated[str | None, Rule("a non-empty string", _text)] = None


@dataclass(frozen=True)
class InstanceTable:
    """``[applications.A.service-instances.I]`` (:class:`~supctl.enforcer.api.ServiceInstance`)."""

    netns: Annotated[str | None, Rule("a namespace name", _netns)] = None
    #: "" picks the default: ``netns`` with a namespace, else ``host``.
    runtime: Annotated[str, Rule("a runtime name", _text)] = ""
    containers: Annotated[dict[str, ContainerTable], NAMES] = field(default_factory=dict)


@dataclass(frozen=True)
class ApplicationTable:
    service_instances: Annotated[dict[str, InstanceTable], NAMES] = field(default_factory=dict)


@dataclass(frozen=True)
class LocalPolicy:
    """The inventory's ``[policy]`` table, and its schema; None fields do not restrict."""

    networks: Annotated[tuple[Network, ...] | None, NETWORKS] = field(
        default=None, metadata={"key": "allow-ip-addresses"}
    )
    ports: Annotated[tuple[tuple[int, int], ...] | None, PORTS] = field(
        default=None, metadata={"key": "allow-ports"}
    )
    exec_allowed: bool = field(default=True, metadata={"key": "allow-exec"})
    #: The verbs besides connect this site serves; None: every verb a handler serves.
    verbs: Annotated[frozenset[str] | None, VERBS] = field(default=None, metadata={"key": "allow-verbs"})

    def check(self, serves: Serves, request: OpenRequest) -> None:
        """Raise StreamError (DENIED) if the site's local policy refuses to serve
        ``request`` (canonical: :func:`supctl.enforcer.dispatch.canonical_request`)
        with the handler that declared ``serves``.

        Judged by the declaration, never by the OPEN's own words: the exec handler is
        refused by ``allow-exec`` whatever verb the OPEN carried, and a plugin's verb
        by ``allow-verbs`` under the name its handler declared.
        """
        if serves.verb != "connect":
            if serves.verb == "exec" and not self.exec_allowed:
                raise StreamError("the site's local policy refuses exec", code=ErrorCode.DENIED)
            if self.verbs is not None and serves.verb not in self.verbs:
                raise StreamError(
                    f"the site's local policy refuses verb {serves.verb!r} (allow-verbs)",
                    code=ErrorCode.DENIED,
                )
            return
        refused = self.ports is not None and not any(lo <= request.port <= hi for lo, hi in self.ports)
        address = request.ip_address or None
        if self.networks is not None and not is_self(address):
            refused = refused or not matches(self.networks, address)
        if refused:
            raise StreamError(f"the site's local policy refuses {request.target}", code=ErrorCode.DENIED)


@dataclass(frozen=True)
class Inventory:
    instances: dict[tuple[str, str], ServiceInstance]
    policy: LocalPolicy = LocalPolicy()  # [policy]; the default allows everything
    #: ``[verbs.VERB]``: each verb's handler settings, as written (the handler checks them).
    verbs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

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


@dataclass(frozen=True)
class InventoryFile:
    """The schema of the inventory (:mod:`supctl.schema`)."""

    applications: Annotated[dict[str, ApplicationTable], NAMES] = field(default_factory=dict)
    policy: LocalPolicy = LocalPolicy()
    verbs: Annotated[dict[str, OpaqueTable], NAMES] = field(default_factory=dict)


def parse_inventory(data: object, source: str = "inventory") -> Inventory:
    """The inventory in ``data`` (parsed TOML) from ``source`` ("inventory PATH"); one-line
    UsageErrors."""
    where = Source(source)
    parsed = load(InventoryFile, data, where)
    instances: dict[tuple[str, str], ServiceInstance] = {}
    for app, app_table in parsed.applications.items():
        for name, body in app_table.service_instances.items():
            path = ("applications", app, "service-instances", name)
            if body.runtime == "netns" and body.netns is None:
                raise where.refuse((*path, "runtime"), "is 'netns', which needs a netns")
            containers = {
                c: Container(c, t.command, dict(t.env), t.cwd, t.user) for c, t in body.containers.items()
            }
            instances[(app, name)] = ServiceInstance(app, name, body.netns, containers, body.runtime)
    return Inventory(instances, parsed.policy, dict(parsed.verbs))


def load_inventory(path: Path) -> Inventory:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read inventory {path}: {exc.strerror}") from None
    source = f"inventory {path}"
    return parse_inventory(parse_toml(raw, Source(source)), source)
