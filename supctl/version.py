"""``--version`` of the three programs: the distribution's version and the wire protocol
they speak (the WebSocket subprotocol), so an operator can tell which peers agree."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from .protocol import SUBPROTOCOL

F = TypeVar("F", bound=Callable[..., Any])


def version_option(prog: str) -> Callable[[F], F]:
    return click.version_option(
        package_name="supctl", prog_name=prog, message=f"%(prog)s %(version)s (protocol {SUBPROTOCOL})"
    )
