"""Built-in enforcer handler: ``udp`` forwards datagrams from inside the instance's namespace."""

from __future__ import annotations

from supctl import hookimpl
from supctl.enforcer.api import RegisterHandler, Serves

from .handler import UdpHandler


@hookimpl
def supctl_add_handlers(register: RegisterHandler) -> None:
    register(Serves("connect", "udp"), UdpHandler())
