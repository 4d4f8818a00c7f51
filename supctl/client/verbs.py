"""Open a verb's stream in one call: what a plugin's click command needs to reach its
handler at the site (docs/plugins.md, "Writing a verb").

:func:`run_verb` builds the tower URL from where the command was invoked (a service
instance or a container: :data:`supctl.client.api.NODES`), checks the arguments'
shape before anything is sent (:mod:`supctl.protocol.args`), opens the session and
one stream, and hands the accepted channel to the verb's ``body``.  Every failure is
a :class:`~supctl.errors.SupctlError` with one line and the documented exit code, so
the verb gets the CLI's conventions for free:

====================================  ===========================================
the tower refuses (401/403)           3, the tower's reason
no such site, instance, container     4, with "did you mean" where the user may see
site not connected, tower unreachable 5
the site lacks the verb (501)         8, ``verb 'x' is not supported at site 's'``
the site's local policy refuses       3, the site's reason
the site's handler refuses the args   7 (``bad args of verb 'x': ...``)
the site resets the stream otherwise  6 (4 when it names something missing)
====================================  ===========================================
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable, Mapping
from urllib.parse import quote

from ..errors import ExitCode, NotFoundError, StreamError, UnsupportedError, UsageError
from ..link import Channel, Link
from ..protocol import ErrorCode, OpenRequest
from ..protocol.args import encode_args
from .api import Invocation

#: The exit code of a stream reset by the site, by its reason code: refusals that say
#: the same as a tower's refusal exit as the tower's would.
RESET_EXIT = {
    ErrorCode.DENIED: ExitCode.DENIED,
    ErrorCode.NOT_FOUND: ExitCode.NOT_FOUND,
    ErrorCode.UNSUPPORTED: ExitCode.UNSUPPORTED,
    # The site's handler refused the args: this supctl and that site disagree on the verb.
    ErrorCode.PROTOCOL: ExitCode.PROTOCOL,
}

Body = Callable[[Channel], Awaitable[int | None]]


def verb_path(inv: Invocation, verb: str) -> str:
    """The tower's URL path of ``verb`` at the node ``inv`` was invoked at (its query
    names the site): ``/v1/state/applications/A/service-instances/I[/containers/C]/verbs/V``."""
    if not inv.application or not inv.service_instance:
        raise UsageError(f"{verb} needs a service instance: supctl do SITE/APP/INSTANCE {verb} ...")
    path = (
        f"/v1/state/applications/{quote(inv.application, safe='')}"
        f"/service-instances/{quote(inv.service_instance, safe='')}"
    )
    if inv.container:
        path += f"/containers/{quote(inv.container, safe='')}"
    return f"{path}/verbs/{quote(verb, safe='')}"


def run_verb(
    inv: Invocation,
    verb: str,
    args: Mapping[str, object],
    body: Body,
    *,
    interrupt_code: int | None = None,
) -> int:
    """Run ``verb`` at the node ``inv`` was invoked at: open its session and one stream
    with ``args``, wait for the site to accept it, and return what ``body(channel)``
    returns (None: 0).  With ``interrupt_code``, SIGINT and SIGTERM end ``body``
    (cancelled) and the stream, and that is the exit code (``logs -f``: 0)."""
    try:
        encode_args(args)  # the shape the tower and the site will check, said here first
    except ValueError as exc:
        raise UsageError(f"{verb}: {exc}") from None
    path, site = verb_path(inv, verb), inv.require_site()
    return asyncio.run(_run(inv, verb, path, site, dict(args), body, interrupt_code))


async def _run(
    inv: Invocation,
    verb: str,
    path: str,
    site: str,
    args: dict[str, object],
    body: Body,
    interrupt_code: int | None,
) -> int:
    try:
        link = await inv.transport().open_session(path, {"site": site})
    except NotFoundError as exc:
        if str(exc).startswith("no such endpoint"):  # a tower older than the verb route
            raise UnsupportedError(
                f"this control tower does not route plugin verbs such as {verb!r}: upgrade it"
            ) from None
        raise
    try:
        return await _serve(link, verb, args, body, interrupt_code)
    finally:
        await link.aclose()


async def _serve(
    link: Link, verb: str, args: dict[str, object], body: Body, interrupt_code: int | None
) -> int:
    try:
        channel = await link.open_channel(OpenRequest(verb=verb, args=args))
        task = asyncio.ensure_future(body(channel))
        if interrupt_code is None:
            return await task or 0
        return await _until_interrupted(task, channel, interrupt_code)
    except StreamError as exc:
        raise _reset_error(exc) from None


async def _until_interrupted(task: asyncio.Future[int | None], channel: Channel, code: int) -> int:
    loop = asyncio.get_running_loop()
    interrupted = False

    def interrupt() -> None:
        nonlocal interrupted
        interrupted = True
        task.cancel()

    signals = (signal.SIGINT, signal.SIGTERM)
    for signum in signals:
        loop.add_signal_handler(signum, interrupt)
    try:
        return await task or 0
    except asyncio.CancelledError:
        if not interrupted:
            raise
        channel.reset(ErrorCode.CANCEL, "interrupted")
        return code
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)


def _reset_error(exc: StreamError) -> StreamError:
    """The stream's error with the exit code its reason calls for (:data:`RESET_EXIT`)."""
    code = RESET_EXIT.get(exc.code)  # type: ignore[call-overload]  # an int: IntEnum keys hash alike
    if code is None:
        return exc
    error = StreamError(str(exc), code=exc.code)
    error.exit_code = code
    return error
