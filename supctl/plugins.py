"""The plugin manager factory and the registries behind ``register`` callbacks.

Built per invocation, never at import time, so tests (and long-running
programs) get a fresh manager and the CLI's click tree reflects exactly the
plugins installed now.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

import pluggy

from . import hookspecs
from .errors import PluginError

ENTRY_POINT_GROUP = "supctl"

T = TypeVar("T")


def make_plugin_manager(extra_plugins: Iterable[object] = ()) -> pluggy.PluginManager:
    """Load every plugin of the ``supctl`` entry-point group, built-ins included.

    ``extra_plugins`` are registered after them (tests use it for in-process plugins).
    """
    pm = pluggy.PluginManager("supctl")
    pm.add_hookspecs(hookspecs)
    try:
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    except Exception as exc:  # a broken third-party plugin must not look like our bug
        raise PluginError(f"cannot load a supctl plugin: {exc}") from exc
    for plugin in extra_plugins:
        pm.register(plugin)
    return pm


class Registry(Generic[T]):
    """Names to items, refusing duplicates (two plugins claiming one verb or protocol)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.items: dict[str, T] = {}
        self.owners: dict[str, str] = {}

    def add(self, name: str, item: T, owner: str) -> None:
        if name in self.items:
            raise PluginError(
                f"{self.kind} {name!r} is registered twice: by plugin {self.owners[name]!r} "
                f"and by plugin {owner!r}"
            )
        self.items[name] = item
        self.owners[name] = owner


def collect(pm: pluggy.PluginManager, hook_name: str, kind: str) -> dict[str, T]:
    """Run a ``register(name, item)`` hook and return the names it registered."""
    registry: Registry[T] = Registry(kind)

    def make_register(plugin: str) -> Callable[[str, T], None]:
        return lambda name, item: registry.add(name, item, plugin)

    call_registration(pm, hook_name, make_register)
    return registry.items


def call_registration(
    pm: pluggy.PluginManager, hook_name: str, make_register: Callable[[str], Callable[..., None]]
) -> None:
    """Call a registration hook plugin by plugin, each with its own ``register``
    bound to the plugin's name, so a duplicate can name both culprits."""
    hook = getattr(pm.hook, hook_name)
    for impl in hook.get_hookimpls():  # registration order (pluggy stores FIFO, calls LIFO)
        impl.function(register=make_register(impl.plugin_name))
