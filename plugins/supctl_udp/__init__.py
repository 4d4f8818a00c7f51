"""Built-in plugin: ``connect udp``, datagrams through the tunnel (issue 12).

* enforcer: the ``udp`` handler forwards datagrams from inside the instance's namespace
  (:mod:`.handler`)
* client: the ``udp`` subcommand of ``connect`` (:mod:`.client`), a UDP socket with a flow
  per local peer (:mod:`.relay`, :mod:`.flows`) or stdin/stdout as datagrams (:mod:`.netcat`)
"""

from __future__ import annotations

from supctl import hookimpl
from supctl.client.api import RegisterProtocol
from supctl.enforcer.api import RegisterHandler, Serves

from .handler import UdpHandler


@hookimpl
def supctl_add_handlers(register: RegisterHandler) -> None:
    register(Serves("connect", "udp"), UdpHandler())


@hookimpl
def supctl_add_connect_protocols(register: RegisterProtocol) -> None:
    from .client import make_udp_command

    register("udp", make_udp_command())
