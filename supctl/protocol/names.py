"""The one syntax of the names of sites' objects: applications, service instances, containers.

Names travel in URLs, OPEN frames, log lines and audit records, so they are kept
boring: ASCII letters, digits, ``.``, ``_`` and ``-``, starting with a letter or a
digit.  No control character (a ``%0A`` in a URL would forge a log line), no ``/``
(a path separator), nothing a terminal or a shell would read as more than a name.
The tower refuses any other name with 400 before looking anything up, and the
enforcer refuses an inventory that declares one.
"""

from __future__ import annotations

import re

MAX_NAME = 253
#: Sites are DNS labels: they appear in URLs and host-like names (lower case, no dots).
SITE_NAME_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
NAME_RE = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_NAME - 1}}}")
#: Ports are ASCII digits only: ``str.isdigit`` accepts "²" and Arabic-Indic digits,
#: and ``int()`` of thousands of digits raises.
PORT_RE = re.compile(r"[0-9]{1,5}")


def valid_name(value: object) -> bool:
    return isinstance(value, str) and NAME_RE.fullmatch(value) is not None


def valid_site_name(value: object) -> bool:
    return isinstance(value, str) and SITE_NAME_RE.fullmatch(value) is not None


def parse_port(text: str) -> int | None:
    """A port 1-65535 written in ASCII digits, else None."""
    if not isinstance(text, str) or PORT_RE.fullmatch(text) is None:
        return None
    port = int(text)
    return port if 1 <= port <= 65535 else None
