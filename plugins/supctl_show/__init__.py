"""Built-in plugin: ``supctl show``, what the tower knows of sites, applications and
service instances (read-only, plain HTTPS GETs of ``/v1/state/...``)."""

from __future__ import annotations

from supctl import hookimpl
from supctl.client.api import RegisterVerb


@hookimpl
def supctl_add_verbs(register: RegisterVerb) -> None:
    from .verb import make_show_command

    register("root", make_show_command())
