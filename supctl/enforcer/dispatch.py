"""Which handler serves a stream: decided by the site, from what it checked itself.

The tower says what a stream is for in its OPEN; a compromised tower can say
anything there.  So the enforcer believes none of it before checking it, in one
place, in this order:

1. The OPEN's (verb, protocol) must be exactly what a handler declared
   (:class:`~supctl.enforcer.api.Serves`).  No other rule maps a request to a
   handler (no "connect streams go by protocol, others by verb"), so a
   ``connect`` stream of protocol ``exec`` finds no handler instead of the exec
   handler; any pair nobody declared is refused with ``UNSUPPORTED``.
2. The request is put in canonical form with the project's one set of rules:
   names (:func:`supctl.protocol.names.valid_name`), the port
   (:func:`~supctl.protocol.names.parse_port`), the target address
   (:func:`supctl.protocol.targets.canonical_address`).  Fields that the verb
   does not have must be empty.
3. The site's local policy judges that declaration and that canonical request.
4. The request's service instance, and its container if it names one, must be
   in the inventory (``NOT_FOUND``).
5. The handler of that declaration gets that canonical request: what was judged
   is what runs.

The OPEN's ``args`` reached here in the shape every verb's args have
(:mod:`supctl.protocol.args`, checked as the frame was read); what they mean is
the handler's to judge (:func:`supctl.enforcer.api.parse_args`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pluggy

from ..errors import PluginError, StreamError, UsageError
from ..plugins import call_registration
from ..protocol import ErrorCode, OpenRequest
from ..protocol.names import parse_port, valid_name
from ..protocol.targets import canonical_address
from .api import ContainerNews, Handler, Serves, ServiceInstance
from .inventory import Inventory

log = logging.getLogger("supctl.enforcer")


@dataclass(frozen=True, slots=True)
class Dispatch:
    """A stream the site agreed to serve: the handler, and exactly what it serves."""

    serves: Serves
    handler: Handler
    request: OpenRequest  # canonical: the request the local policy judged
    instance: ServiceInstance


class Dispatcher:
    def __init__(self, handlers: Mapping[Serves, Handler], inventory: Inventory) -> None:
        self.handlers = dict(handlers)
        self.inventory = inventory
        # Looked up by the OPEN's exact pair (a Serves validates, the lookup must not).
        self._by_pair = {(serves.verb, serves.protocol): serves for serves in self.handlers}

    @property
    def names(self) -> list[str]:
        """What the site announces in HELLO: each handler's protocol (connect) or verb."""
        return sorted(serves.name for serves in self.handlers)

    @property
    def verbs(self) -> list[str]:
        """HELLO's ``verbs``: the verbs other than connect served here (exec, plugins')."""
        return sorted(serves.verb for serves in self.handlers if serves.verb != "connect")

    @property
    def protocols(self) -> list[str]:
        """HELLO's ``protocols``: the protocols of connect served here (tcp, udp, ...)."""
        return sorted(serves.protocol for serves in self.handlers if serves.verb == "connect")

    @property
    def features(self) -> list[str]:
        """What the site announces in HELLO's ``features``: every handler's optional
        ``features`` attribute (strings), so a tower refuses what the site cannot do
        (``exec-tty``) instead of the site silently doing less."""
        found = {str(name) for handler in self.handlers.values() for name in getattr(handler, "features", ())}
        return sorted(found)

    def route(self, request: OpenRequest) -> Dispatch:
        """The handler for ``request`` and the canonical request it is given, or
        :class:`StreamError` saying why the site refuses the stream."""
        serves = self._by_pair.get((request.verb, request.protocol))
        if serves is None:
            raise StreamError(
                f"{_describe(request)} is not supported at this site", code=ErrorCode.UNSUPPORTED
            )
        canonical = canonical_request(serves, request)
        self.inventory.policy.check(serves, canonical)
        instance = self.inventory.find(canonical.application, canonical.service_instance)
        if canonical.container and canonical.container not in instance.containers:
            raise StreamError(
                f"container {canonical.container} not found in service instance {instance.name}",
                code=ErrorCode.NOT_FOUND,
            )
        return Dispatch(serves, self.handlers[serves], canonical, instance)


def observers(handlers: Mapping[Serves, Handler]) -> list[Callable[[ContainerNews], None]]:
    """The handlers' ``observe`` methods, each guarded: a plugin's bug is logged (once
    per handler) and never reaches the container supervisor."""
    return [_guarded(serves, observe) for serves, handler in handlers.items()
            if callable(observe := getattr(handler, "observe", None))]  # fmt: skip


def configure_handlers(
    handlers: Mapping[Serves, Handler], inventory: Inventory, previous: Inventory | None = None
) -> None:
    """Give each handler that has ``configure`` its ``[verbs.VERB]`` table of ``inventory``
    (``{}`` without one); UsageError for a table no installed handler reads (a typo would
    leave a setting silently unused) or one a handler refuses.

    ``previous``: the inventory in force (a reload).  When one handler refuses its new
    table, those configured before it get their previous table back, so a refused reload
    leaves every handler as it was, not half of them on the new settings.
    """
    verbs = {serves.verb: handler for serves, handler in handlers.items() if serves.verb != "connect"}
    for name in sorted(inventory.verbs):
        handler = verbs.get(name)
        if handler is None or not callable(getattr(handler, "configure", None)):
            raise UsageError(
                f"inventory: [verbs.{name}] has settings, but no installed handler of verb "
                f"{name!r} takes any (installed verbs: {', '.join(sorted(verbs)) or 'none'})"
            )
    done: list[str] = []
    try:
        for name in sorted(verbs):
            if _configure(verbs[name], name, inventory):
                done.append(name)
    except UsageError:
        if previous is not None:
            for name in done:
                _configure(verbs[name], name, previous)
        raise


def _configure(handler: Handler, name: str, inventory: Inventory) -> bool:
    """``handler.configure`` with its table of ``inventory``; False if it has none."""
    configure = getattr(handler, "configure", None)
    if not callable(configure):
        return False
    settings: Mapping[str, Any] = inventory.verbs.get(name, {})
    try:
        configure(settings)
    except UsageError:
        raise
    except (ValueError, TypeError) as exc:  # a plugin that did not say it in a UsageError
        raise UsageError(f"inventory: [verbs.{name}]: {exc}") from None
    return True


def _guarded(serves: Serves, observe: Callable[[ContainerNews], None]) -> Callable[[ContainerNews], None]:
    failed = False

    def call(news: ContainerNews) -> None:
        nonlocal failed
        try:
            observe(news)
        except Exception:
            if not failed:  # once: it would fail again on every line
                failed = True
                log.exception("the handler of %s failed to observe container output", serves)

    return call


def _describe(request: OpenRequest) -> str:
    # repr: the peer's text reaches a RESET and a log line, escaped and quoted.
    if request.verb == "connect":
        return f"protocol {request.protocol[:64]!r}"
    if not request.protocol:
        return f"verb {request.verb[:64]!r}"
    return f"verb {request.verb[:64]!r} with protocol {request.protocol[:64]!r}"


def canonical_request(serves: Serves, request: OpenRequest) -> OpenRequest:
    """``request`` with every field checked and its target in canonical form.

    Raises StreamError (``PROTOCOL``): a tower never sends such an OPEN, so one
    that does is broken or hostile.
    """

    def refuse(text: str) -> StreamError:
        return StreamError(f"the site refuses the stream: {text}", code=ErrorCode.PROTOCOL)

    for field in ("application", "service_instance"):
        if not valid_name(getattr(request, field)):
            raise refuse(f"invalid {field.replace('_', ' ')} name")
    if request.container and not valid_name(request.container):
        raise refuse("invalid container name")
    if serves.verb != "connect":
        if request.port or request.ip_address:
            raise refuse(f"{serves.verb} streams have no port or address")
        return request
    if request.container:
        raise refuse("connect streams have no container")
    port = parse_port(str(request.port))
    if port is None:
        raise refuse(f"port {request.port} is not 1-65535")
    address = ""
    if request.ip_address:
        try:
            address = canonical_address(request.ip_address)
        except ValueError as exc:
            raise refuse(f"target address: {exc}") from None
    return dataclasses.replace(request, port=port, ip_address=address)


def collect_handlers(pm: pluggy.PluginManager) -> dict[Serves, Handler]:
    """Run ``supctl_add_handlers``: every handler with the declaration it registered.

    Refused with :class:`PluginError` naming the plugins: a registration without a
    :class:`Serves`, two handlers for one declaration, and two declarations that the
    site would announce under one name (connect protocol ``exec`` and verb ``exec``).
    """
    handlers: dict[Serves, Handler] = {}
    owners: dict[str, tuple[Serves, str]] = {}  # by announced name

    def make_register(plugin: str) -> Callable[[Serves, Handler], None]:
        def register(serves: Serves, handler: Handler) -> None:
            if not isinstance(serves, Serves):
                raise PluginError(
                    f"plugin {plugin!r} registered a handler for {serves!r} without declaring what it "
                    "serves: call register(Serves(verb, protocol), handler)"
                )
            if not callable(getattr(handler, "handle", None)):
                raise PluginError(f"plugin {plugin!r} registered a handler for {serves} without handle()")
            previous = owners.get(serves.name)
            if previous is not None:
                first, owner = previous
                if first == serves:
                    raise PluginError(
                        f"handler for {serves} is registered twice: by plugin {owner!r} and by plugin {plugin!r}"
                    )
                raise PluginError(
                    f"handlers for {first} (plugin {owner!r}) and {serves} (plugin {plugin!r}) "
                    f"would both be announced as {serves.name!r}"
                )
            handlers[serves] = handler
            owners[serves.name] = (serves, plugin)

        return register

    call_registration(pm, "supctl_add_handlers", make_register)
    return handlers
