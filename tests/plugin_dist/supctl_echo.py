"""A third-party supctl plugin: proves verbs and handlers plug in from outside.

Client side: ``supctl do -s SITE applications APP service-instances INSTANCE echo TEXT...``
sends the text through the tower to the site and prints what comes back.
Enforcer side: the ``echo`` protocol handler sends every byte back, upper-cased
so the test can tell the enforcer really handled it.
"""

from __future__ import annotations

import asyncio
import sys
from urllib.parse import quote

import click

from supctl import hookimpl
from supctl.client.api import Invocation, RegisterVerb
from supctl.enforcer.api import HandlerContext, RegisterHandler, Serves, ServiceInstance
from supctl.link import Channel
from supctl.protocol import OpenRequest


class EchoHandler:
    async def handle(
        self, channel: Channel, request: OpenRequest, instance: ServiceInstance, context: HandlerContext
    ) -> None:
        channel.accept()
        while data := await channel.read():
            await channel.write(data.upper())
        channel.write_eof()


@click.command("echo")
@click.argument("words", nargs=-1, required=True)
@click.pass_obj
def echo(inv: Invocation, words: tuple[str, ...]) -> None:
    """Send WORDS to the site's echo handler and print the answer."""

    async def run() -> bytes:
        assert inv.application and inv.service_instance
        path = (
            f"/v1/state/applications/{quote(inv.application)}/service-instances/"
            f"{quote(inv.service_instance)}/connect"
        )
        link = await inv.transport().open_session(
            path, {"site": inv.require_site(), "protocol": "echo", "port": "7"}
        )
        try:
            channel = await link.open_channel(OpenRequest(verb="connect"))
            await channel.write(" ".join(words).encode())
            channel.write_eof()
            answer = b""
            while data := await channel.read():
                answer += data
            return answer
        finally:
            link.close()
            if link.task is not None:
                await link.task

    sys.stdout.write(asyncio.run(run()).decode() + "\n")


@hookimpl
def supctl_add_verbs(register: RegisterVerb) -> None:
    register("service-instance", echo)


@hookimpl
def supctl_add_handlers(register: RegisterHandler) -> None:
    # What it serves, exactly: connect streams of protocol echo (nothing else reaches it).
    register(Serves("connect", "echo"), EchoHandler())
