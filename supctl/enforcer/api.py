"""Interfaces between the enforcer and its handler plugins."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ..link import Channel
    from ..protocol import OpenRequest
    from .cgroups import CgroupTree
    from .netns import NamespaceSockets
    from .runtime import Runtime


@dataclass(frozen=True)
class Container:
    """A container of a service instance, from the inventory.

    Without ``command`` it is only a name to exec into (its processes are started by
    someone else, or there are none); with one, the enforcer keeps it running.
    """

    name: str
    command: list[str] | None = None
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None  # None: "/"
    user: str | None = None  # a login name or a numeric uid; None: the enforcer's user


@dataclass(frozen=True)
class ServiceInstance:
    """A service instance at this site, from the inventory."""

    application: str
    name: str
    netns: str | None  # a namespace under /run/netns; None for host networking
    containers: dict[str, Container] = field(default_factory=dict)
    #: Name of the registered runtime that starts its processes; "" picks the
    #: default: ``netns`` when the instance has a namespace, else ``host``.
    runtime: str = ""

    def __post_init__(self) -> None:
        if not self.runtime:
            object.__setattr__(self, "runtime", "netns" if self.netns else "host")

    @property
    def where(self) -> str:
        return f"service instance {self.name}" + (
            f" (netns {self.netns})" if self.netns else " (host network)"
        )


@dataclass
class HandlerContext:
    """What the enforcer lends every handler."""

    site: str
    sockets: NamespaceSockets
    connect_timeout: float = 10.0
    #: Runtimes by name (``supctl_add_runtimes``); ``runtimes[instance.runtime]`` starts processes.
    runtimes: dict[str, Runtime] = field(default_factory=dict)
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("supctl.enforcer"))
    #: The enforcer's cgroup tree: a child per process started (None: no containment).
    cgroups: CgroupTree | None = None


class Handler(Protocol):
    """Serves the streams of one protocol (``tcp``, ``echo``...)."""

    async def handle(
        self, channel: Channel, request: OpenRequest, instance: ServiceInstance, context: HandlerContext
    ) -> None:
        """Serve one stream.

        Call ``channel.accept()`` once the target is reached, then move bytes
        until both directions are done.  Raise :class:`supctl.errors.StreamError`
        (with an ErrorCode) to refuse or reset the stream: the enforcer turns it
        into a RESET whose text the user sees as one line.
        """
        ...


RegisterHandler = Callable[[str, Handler], None]
