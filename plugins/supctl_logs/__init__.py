"""Built-in plugin: ``logs``, a container's output kept at the site.

supctl side: the ``logs`` verb at the container node (:mod:`.verb`).
Enforcer side: the ``logs`` handler (:mod:`.handler`), which keeps each supervised
container's recent lines in a bounded ring (:mod:`.book`) and sends them as records
(:mod:`.wire`).  Built with the public hooks only: nothing of it is in the core or the
tower.  Imports stay inside the hook implementations, so loading the plugin costs
nothing until a hook is called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from supctl import hookimpl

if TYPE_CHECKING:
    from supctl.client.api import RegisterVerb
    from supctl.enforcer.api import RegisterHandler


@hookimpl
def supctl_add_verbs(register: RegisterVerb) -> None:
    from .verb import make_logs_command

    register("container", make_logs_command())


@hookimpl
def supctl_add_handlers(register: RegisterHandler) -> None:
    from supctl.enforcer.api import Serves

    from .handler import LogsHandler

    register(Serves("logs"), LogsHandler())
