"""Every hook of supctl, in one place (as pytest's hookspec.py).

Plugins implement these with ``@supctl.hookimpl`` and arrive through the
``supctl`` entry-point group, built-in ones (``plugins/``) included.  A plugin
manager is built per invocation by :func:`supctl.plugins.make_plugin_manager`.

Registration hooks take a ``register`` callback instead of returning values, so
the core sees every name as it is registered and refuses duplicates with a
:class:`supctl.errors.PluginError` naming both plugins.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from .client.api import Listener, Netcat, RegisterProtocol, RegisterVerb, Transport
    from .client.settings import ClientSettings
    from .enforcer.api import RegisterHandler
    from .enforcer.runtime import RegisterRuntime

hookspec = pluggy.HookspecMarker("supctl")
hookimpl = pluggy.HookimplMarker("supctl")


@hookspec
def supctl_add_verbs(register: RegisterVerb) -> None:
    """Add verbs (click commands) to the supctl object tree.

    Called once per ``supctl`` invocation, while the click group is built.

    :param register: ``register(node, command)`` adds a :class:`click.Command`
        at ``node``, one of :data:`supctl.client.api.NODES` (``"root"``, ``"do"``,
        ``"application"``, ``"service-instance"``, ``"container"``).  A verb reads
        where it was invoked from ``click.get_current_context().find_object(Invocation)``;
        one served by a site's handler (at ``service-instance`` or ``container``) opens
        its stream with :func:`supctl.client.verbs.run_verb` (docs/plugins.md, "Writing a verb").
    :return: nothing; every implementation is called.
    """


@hookspec
def supctl_add_connect_protocols(register: RegisterProtocol) -> None:
    """Add protocols to ``connect`` (built in: ``tcp``), so that one command can hold
    several forwards of any protocol: ``connect tcp 443 --bind 8443 udp 53 --bind 5353``.

    Called once per ``connect`` invocation, when its chain of forwards is parsed.

    ``connect`` is a click group in chain mode: each protocol is one of its subcommands,
    a :class:`supctl.client.api.ForwardCommand` (``cls=ForwardCommand``), which parses its
    own arguments and options up to the next protocol name.

    :param register: ``register(name, command)`` adds the :class:`click.Command`
        ``command`` as ``connect NAME``; its callback returns a
        :class:`supctl.client.api.Forward` (with its own ``listener`` backend unless the
        ``supctl_listener`` one serves it).  A name registered twice is a
        :class:`supctl.errors.PluginError` naming both plugins.
    :return: nothing; every implementation is called.
    """


@hookspec
def supctl_add_handlers(register: RegisterHandler) -> None:
    """Add enforcer handlers, each declaring exactly which streams it serves.

    Called once when ``edge-enforcer run`` starts.

    The declaration is a :class:`supctl.enforcer.api.Serves`: ``Serves("connect", "tcp")``
    serves connect streams of protocol ``tcp``, ``Serves("exec")`` exec streams, and
    ``Serves("logs")`` the streams of a plugin's own verb, which the tower routes by name
    (``.../verbs/logs``) and supctl's command opens with :func:`supctl.client.verbs.run_verb`.
    A handler may also take the inventory's ``[verbs.VERB]`` settings (``configure``) and
    observe the containers' output and lives (``observe``): :class:`supctl.enforcer.api.Handler`.  The
    enforcer dispatches a stream only to the handler whose declaration its (verb,
    protocol) matches exactly, after the site's local policy judged that declaration
    and the canonical request (:mod:`supctl.enforcer.dispatch`); the handler gets that
    canonical request.

    :param register: ``register(Serves(verb, protocol), handler)`` where ``handler``
        follows :class:`supctl.enforcer.api.Handler`; anything else than a ``Serves``,
        a declaration registered twice, or two declarations announced under one name
        (connect protocol ``exec`` and verb ``exec``) is a
        :class:`supctl.errors.PluginError`.
    :return: nothing; every implementation is called.
    """


@hookspec
def supctl_add_runtimes(register: RegisterRuntime) -> None:
    """Add runtimes: the ways the enforcer starts processes in a service instance
    (built in: ``netns``, ``host``).

    Called once when ``edge-enforcer run`` starts, before the inventory is checked.
    Each instance's ``runtime`` must name a registered runtime.

    :param register: ``register(name, runtime)`` where ``runtime`` follows
        :class:`supctl.enforcer.runtime.Runtime`.
    :return: nothing; every implementation is called.
    """


@hookspec(firstresult=True)
def supctl_transport(settings: ClientSettings) -> Transport | None:
    """Return how supctl reaches the tower (the connect plugin's TLS WebSocket
    transport by default).

    Called once per verb invocation that needs the tower.

    :param settings: the resolved host, credentials and CA of this invocation.
    :return: a :class:`supctl.client.api.Transport`; the first non-None result wins.
    """


@hookspec(firstresult=True)
def supctl_listener() -> Listener | None:
    """Return the backend that serves ``connect --bind``: it listens locally and
    turns each accepted connection into a stream.

    Called once per ``connect`` invocation with ``--bind``.  Its ``serve`` gets the
    :class:`supctl.client.api.Streams` of a session that may be lost and re-opened
    while it runs: ``open_now()`` answers None meanwhile, and ``open()`` waits for it.

    :return: a :class:`supctl.client.api.Listener`; the first non-None result wins.
    """


@hookspec(firstresult=True)
def supctl_netcat() -> Netcat | None:
    """Return the backend that joins stdin/stdout to one stream (``connect``
    without ``--bind``).

    Called once per ``connect`` invocation without ``--bind``.

    :return: a :class:`supctl.client.api.Netcat`; the first non-None result wins.
    """
