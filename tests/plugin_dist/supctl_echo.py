"""supctl-echo: a third-party plugin that adds one verb, ``echo``, to supctl and to the enforcer.

    supctl do SITE/APP/INSTANCE echo [--times N] WORDS...

supctl sends WORDS (and a newline) to the site; the site's ``echo`` handler sends them back
upper-cased, N times.  Nothing about ``echo`` lives in supctl, the tower or the enforcer:
the tower routes the verb by name, judges it with the users' policies (``verb = "echo"``)
and audits it without knowing what it does.  This file is the example docs/plugins.md
("Writing a verb") walks through; copy it to start a verb of your own.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Annotated

import click

from supctl import hookimpl
from supctl.client.api import Invocation, RegisterVerb
from supctl.client.verbs import run_verb
from supctl.enforcer.api import HandlerContext, RegisterHandler, Serves, ServiceInstance, parse_args
from supctl.errors import StreamError
from supctl.link import Channel
from supctl.protocol import ErrorCode, OpenRequest
from supctl.schema import Rule, between

VERB = "echo"
MAX_TIMES = 10
#: The handler keeps the message in memory to repeat it: a client may not send more.
MAX_MESSAGE = 64 * 1024


# --- supctl side: the click command -----------------------------------------------------------


@click.command(VERB)
@click.option("--times", type=click.IntRange(1, MAX_TIMES), default=1, help="How many times to echo.")
@click.argument("words", nargs=-1, required=True)
@click.pass_obj
def echo(inv: Invocation, times: int, words: tuple[str, ...]) -> int:
    """Send WORDS to the site and print them back upper-cased, TIMES times."""
    message = (" ".join(words) + "\n").encode()
    if len(message) > MAX_MESSAGE:
        raise click.UsageError(f"the words take {len(message)} bytes, more than {MAX_MESSAGE}")

    async def body(channel: Channel) -> None:
        # Called once the site accepted the stream: send, half-close, print what comes back.
        await channel.write(message)
        channel.write_eof()
        while data := await channel.read():  # b"" at the end; a reset raises StreamError
            sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()

    # One call: the URL of the node the user named, the session, the stream with these args,
    # and every refusal as one line with its documented exit code (docs/plugins.md).
    return run_verb(inv, VERB, {"times": times}, body)


@hookimpl
def supctl_add_verbs(register: RegisterVerb) -> None:
    register("service-instance", echo)  # supctl do SITE/APP/INSTANCE echo ...


# --- enforcer side: the handler ---------------------------------------------------------------


@dataclass(frozen=True)
class EchoArgs:
    """The OPEN's ``args`` of an echo stream.  The tower relays args without knowing what
    they mean, and the client may be anyone's: the handler checks them itself."""

    # Rule: what the value must be, in the words of the message, and its check.
    times: Annotated[int, Rule(f"an integer 1-{MAX_TIMES}", between(1, MAX_TIMES))] = 1


class EchoHandler:
    async def handle(
        self, channel: Channel, request: OpenRequest, instance: ServiceInstance, context: HandlerContext
    ) -> None:
        # Before accept(): bad args refuse the stream with one line (PROTOCOL).
        args = parse_args(EchoArgs, request)
        channel.accept()
        message = b""
        while data := await channel.read():
            message += data
            if len(message) > MAX_MESSAGE:  # every buffer a peer can fill has a bound
                raise StreamError(f"echo takes at most {MAX_MESSAGE} bytes", code=ErrorCode.LIMIT)
        for _ in range(args.times):
            await channel.write(message.upper())  # waits for the client's credit (flow control)
        channel.write_eof()


@hookimpl
def supctl_add_handlers(register: RegisterHandler) -> None:
    # The enforcer hands this handler exactly the streams of verb "echo", once the
    # instance was found in its inventory and its [policy] allow-verbs allowed it.
    register(Serves(VERB), EchoHandler())
