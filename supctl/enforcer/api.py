"""Interfaces between the enforcer and its handler plugins."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, TypeVar

from ..errors import StreamError, UsageError
from ..protocol.frames import ErrorCode
from ..protocol.names import valid_name
from ..schema import Source, load

if TYPE_CHECKING:
    from ..link import Channel
    from ..protocol import OpenRequest
    from .cgroups import Cgroup, CgroupTree
    from .netns import NamespaceSockets


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
    #: Wall-clock seconds (``time.time``), for what a user asks in wall-clock terms
    #: (``logs --since``); a test gives a fake one.
    clock: Callable[[], float] = time.time


@dataclass(frozen=True, slots=True)
class ContainerOutput:
    """One line of a supervised container's stdout (``fd`` 1) or stderr (``fd`` 2),
    without its newline; a line longer than 64 KiB comes in pieces.  ``time``: the
    wall clock when the enforcer read it."""

    application: str
    service_instance: str
    container: str
    fd: int
    data: bytes
    time: float


@dataclass(frozen=True, slots=True)
class ContainerEvent:
    """A supervised container's life: ``started`` (``pid``), ``exited`` (``exit_code``:
    its status, or -N for signal N; it is restarted after a backoff), ``failed`` (it
    could not start; retried likewise) or ``stopped`` (by the enforcer).  ``restarts``:
    how many times it was restarted before this run."""

    application: str
    service_instance: str
    container: str
    event: str
    time: float
    pid: int | None = None
    exit_code: int | None = None
    restarts: int = 0


#: What a handler's ``observe`` gets (:class:`Handler`).
ContainerNews = ContainerOutput | ContainerEvent

T = TypeVar("T")


def parse_args(cls: type[T], request: OpenRequest) -> T:
    """``request.args`` loaded into the frozen dataclass ``cls`` with the project's one
    schema (:mod:`supctl.schema`: a field ``since_seconds`` is key ``since-seconds``,
    ``int | None`` may be absent, ``Annotated[int, Rule(...)]`` bounds it), or
    :class:`StreamError` (``PROTOCOL``) naming the key that is wrong, in one line.

    The tower checked only the shape of ``args`` (:mod:`supctl.protocol.args`): what
    they mean is judged here, by the verb's handler, before it acts on them.
    """
    try:
        return load(cls, request.args, Source(f"args of verb {request.verb!r}"))
    except UsageError as exc:
        raise StreamError(str(exc), code=ErrorCode.PROTOCOL) from None


@dataclass(frozen=True, slots=True)
class Serves:
    """What a handler serves: the (verb, protocol) of the streams dispatched to it.

    ``Serves("connect", "tcp")`` serves ``connect`` streams of protocol ``tcp``;
    ``Serves("exec")`` serves ``exec`` streams (a verb other than connect has no
    protocol).  The enforcer dispatches a stream only to the handler whose
    declaration its OPEN matches exactly, after the site's local policy judged
    that same (verb, protocol): any pair no handler declares is refused, whatever
    the tower sent (docs/policies.md, "A compromised tower").
    """

    verb: str
    protocol: str = ""

    def __post_init__(self) -> None:
        if not valid_name(self.verb):
            raise ValueError(f"a handler must serve a verb name, got {self.verb!r}")
        if self.verb == "connect" and not valid_name(self.protocol):
            raise ValueError(f"a connect handler must name its protocol, got {self.protocol!r}")
        if self.verb != "connect" and self.protocol:
            raise ValueError(f"only connect streams have a protocol, not {self.verb!r}")

    @property
    def name(self) -> str:
        """The name the site announces in HELLO (and the tower checks): the protocol
        of a connect handler, the verb of any other."""
        return self.protocol if self.verb == "connect" else self.verb

    def __str__(self) -> str:
        return f"connect protocol {self.protocol!r}" if self.verb == "connect" else f"verb {self.verb!r}"


class Handler(Protocol):
    """Serves the streams of one :class:`Serves` declaration (``tcp``, ``exec``...)."""

    async def handle(
        self, channel: Channel, request: OpenRequest, instance: ServiceInstance, context: HandlerContext
    ) -> None:
        """Serve one stream.

        ``request`` is the canonical request the site's local policy judged for this
        handler's :class:`Serves` (its verb and protocol are the declared ones; names
        checked, port 1-65535 for connect, target address canonical): serve exactly it.
        Call ``channel.accept()`` once the target is reached, then move bytes
        until both directions are done.  Raise :class:`supctl.errors.StreamError`
        (with an ErrorCode) to refuse or reset the stream: the enforcer turns it
        into a RESET whose text the user sees as one line.  A stream reset before
        ``accept()`` cancels the handler's task (it may be connecting or spawning);
        after ``accept()`` the reset shows as StreamError from the channel.

        A handler may also have a ``features`` attribute: names (strings) of what it
        can do beyond the basics, announced in HELLO's ``features`` (the exec
        handler's ``exec-tty``); a tower refuses a request that needs a feature the
        site does not announce.

        And two optional methods, called on the event loop (neither may block):

        * ``configure(settings: Mapping[str, Any]) -> None``: at enforcer start and at
          every reload (SIGHUP), with the inventory's ``[verbs.VERB]`` table (``{}``
          when there is none).  Raise :class:`supctl.errors.UsageError` (one line) to
          refuse it: the enforcer does not start, or keeps its running inventory.
        * ``observe(news: ContainerNews) -> None``: every line the containers the
          enforcer supervises write (:class:`ContainerOutput`, stdout and stderr
          apart) and every start and exit (:class:`ContainerEvent`), from enforcer
          start.  An exception is logged and the next news is delivered all the same.
        """
        ...


RegisterHandler = Callable[[Serves, Handler], None]
"""``register(Serves(verb, protocol), handler)``: the hook ``supctl_add_handlers`` gets one."""


#: PATH of every process the enforcer starts, unless its container sets one.  The
#: enforcer's own environment (its token file path, say) is never passed on.
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class ProcessSpec:
    """What to run.  ``env`` is the whole environment; stdio are
    ``asyncio.subprocess.PIPE``, ``DEVNULL`` or (stderr) ``STDOUT``.  ``cgroup``:
    the cgroup the process must be in before it runs anything (None: none)."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    user: str | None = None
    stdin: int = asyncio.subprocess.DEVNULL
    stdout: int = asyncio.subprocess.DEVNULL
    stderr: int = asyncio.subprocess.DEVNULL
    cgroup: Cgroup | None = None

    @classmethod
    def for_container(
        cls,
        container: Container,
        argv: list[str],
        *,
        stdin: int = asyncio.subprocess.DEVNULL,
        stdout: int = asyncio.subprocess.DEVNULL,
        stderr: int = asyncio.subprocess.DEVNULL,
    ) -> ProcessSpec:
        """A process of ``container``: its env (PATH defaulted), cwd ("/" by default) and user."""
        env = {"PATH": DEFAULT_PATH, **container.env}
        return cls(argv, env, container.cwd or "/", container.user, stdin, stdout, stderr)


class Runtime(Protocol):
    """Starts processes inside a service instance."""

    async def spawn(self, instance: ServiceInstance, spec: ProcessSpec) -> asyncio.subprocess.Process:
        """Start ``spec`` in ``instance``, as the leader of a new process group, in
        ``spec.cgroup`` if it has one.

        Raise :class:`StreamError` with a one-line message (``NOT_FOUND`` for a
        missing namespace, directory, user or command; ``INTERNAL`` otherwise)
        when it cannot start.  :func:`start_process` does the common part.
        """
        ...


RegisterRuntime = Callable[[str, Runtime], None]
