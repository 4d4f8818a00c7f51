"""Built-in plugin: containers and ``exec``.

supctl side: the ``exec`` verb at the container node (:mod:`.verb`).
Enforcer side: the ``netns`` and ``host`` runtimes and the ``exec`` handler.
Imports stay inside the hook implementations, so loading the plugin (which every
``supctl`` invocation does) costs nothing until a hook is called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from supctl import hookimpl

if TYPE_CHECKING:
    from supctl.client.api import RegisterVerb
    from supctl.enforcer.api import RegisterHandler
    from supctl.enforcer.runtime import RegisterRuntime


@hookimpl
def supctl_add_verbs(register: RegisterVerb) -> None:
    from .verb import make_exec_command

    register("container", make_exec_command())


@hookimpl
def supctl_add_runtimes(register: RegisterRuntime) -> None:
    from .runtimes import HostRuntime, NetnsRuntime

    register("netns", NetnsRuntime())
    register("host", HostRuntime())


@hookimpl
def supctl_add_handlers(register: RegisterHandler) -> None:
    from supctl.enforcer.api import Serves

    from .handler import ExecHandler

    register(Serves("exec"), ExecHandler())
