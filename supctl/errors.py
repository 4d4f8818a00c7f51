"""The one exception root of supctl, and the exit codes the CLIs map errors to.

Two branches, because the user must act differently on each:

* :class:`UsageError` - local misuse: a bad option, a name that is not an IP
  address, a missing token file.  The user fixes the command line.
* :class:`RemoteError` - something the tower, the enforcer or the network said
  or did: a refusal, an unknown site, a reset stream, a broken path.

Every error carries an ``exit_code`` and a one-line ``str()`` that the CLI prints
as it is; tracebacks are for bugs only.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Process exit codes of ``supctl``, ``control-tower`` and ``edge-enforcer``."""

    OK = 0
    FAILURE = 1  # anything not classified below
    USAGE = 2  # local misuse; click uses 2 for its own usage errors too
    DENIED = 3  # 401/403: missing, bad or insufficient credentials
    NOT_FOUND = 4  # 404: unknown site, application, service instance, container
    UNAVAILABLE = 5  # tower unreachable, TLS failure, site not connected (503), a tower limit (429)
    STREAM = 6  # the remote end refused or reset the stream, or the path broke
    PROTOCOL = 7  # the peer broke the wire protocol
    UNSUPPORTED = 8  # 501: the site (or the tower) has no handler for that verb or protocol
    # exec: supctl itself failed (any of the above), as ssh does; the remote command's own
    # exit code passes through otherwise, so the two never collide.
    EXEC_FAILED = 255


class SupctlError(Exception):
    """Root of every error supctl raises on purpose."""

    exit_code: ExitCode = ExitCode.FAILURE

    def __init__(self, message: str, *, exit_code: ExitCode | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""

    def __str__(self) -> str:
        # One line, always: callers print this verbatim.
        return " ".join(self.message.split())


class UsageError(SupctlError):
    """Local misuse: the command line, a config file or a plugin is wrong."""

    exit_code = ExitCode.USAGE


class PluginError(UsageError):
    """A plugin is broken or clashes with another (e.g. duplicate verb names)."""


class RemoteError(SupctlError):
    """The tower, the enforcer or the network refused or failed."""


class DeniedError(RemoteError):
    exit_code = ExitCode.DENIED


class NotFoundError(RemoteError):
    exit_code = ExitCode.NOT_FOUND


class UnavailableError(RemoteError):
    exit_code = ExitCode.UNAVAILABLE


class StreamError(RemoteError):
    """A stream was refused or reset by the far end or broken on the way."""

    exit_code = ExitCode.STREAM

    def __init__(self, message: str, *, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


class UnsupportedError(RemoteError):
    """The site's enforcer (or the tower) cannot serve that verb, protocol or option:
    the plugin is not installed there, or it is too old."""

    exit_code = ExitCode.UNSUPPORTED


class ProtocolError(RemoteError):
    """The peer sent bytes that break the wire protocol."""

    exit_code = ExitCode.PROTOCOL


_HTTP_ERRORS: dict[int, type[RemoteError]] = {
    401: DeniedError,
    403: DeniedError,
    404: NotFoundError,
    429: UnavailableError,  # a limit of the tower (e.g. sessions per user): try again later
    501: UnsupportedError,
    503: UnavailableError,
}


def from_http_status(status: int, message: str) -> SupctlError:
    """Map a tower's HTTP rejection to the matching error class."""
    if status == 400:
        return UsageError(message)
    return _HTTP_ERRORS.get(status, RemoteError)(message)
