"""Built-in enforcer handler: ``tcp`` opens the target from inside the instance's namespace."""

from __future__ import annotations

import asyncio

from supctl import hookimpl
from supctl.bridge import SocketBridge
from supctl.enforcer.api import HandlerContext, RegisterHandler, Serves, ServiceInstance
from supctl.link import Channel
from supctl.protocol import OpenRequest


class TcpHandler:
    async def handle(
        self, channel: Channel, request: OpenRequest, instance: ServiceInstance, context: HandlerContext
    ) -> None:
        # The request is canonical (supctl.enforcer.dispatch): the address the site's
        # policy judged.  127.0.0.1 inside the namespace is the service itself; any
        # other address follows the namespace's own routes.  Never a name: no DNS here.
        host = request.ip_address or "127.0.0.1"
        sock = await context.sockets.connect(instance.netns, host, request.port, context.connect_timeout)
        try:
            transport, bridge = await asyncio.get_running_loop().create_connection(
                lambda: SocketBridge(lambda _: channel), sock=sock
            )
        except BaseException:
            sock.close()
            raise
        try:
            channel.accept()
        except BaseException:  # the stream went away while we connected
            transport.abort()
            raise
        error = await bridge.done
        if error is not None:
            raise error  # already reset on the wire; raised so the enforcer logs why


@hookimpl
def supctl_add_handlers(register: RegisterHandler) -> None:
    register(Serves("connect", "tcp"), TcpHandler())
