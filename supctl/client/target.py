"""Which site, application, service instance and container a verb acts on.

Four places may name each of them, highest first (docs/cli.md, "Short targets"):

1. the explicit path: ``-s SITE``, ``applications APP``, ``service-instances INSTANCE``,
   ``containers CONTAINER``;
2. a compact target ``SITE/APP/INSTANCE[/CONTAINER]`` right after ``do``;
3. the defaults (:attr:`supctl.client.settings.ClientSettings.defaults`): the environment
   (``SUPCTL_SITE``...), then the context in use, then the config file's top level.

Names cannot contain ``/`` (:mod:`supctl.protocol.names`), so a compact target needs no
escaping: every ``/`` separates two names.  Each name is checked with the very rules the
tower applies (a site is a DNS label, the others :data:`~supctl.protocol.names.NAME_RE`),
so what is refused here would be refused there, and nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import UsageError
from ..protocol.names import valid_name, valid_site_name

#: The levels of the object tree under a site, as config keys, from the top down.
LEVELS = ("site", "application", "service-instance", "container")
#: The environment variable that sets each level's default.
ENV_VARS = {
    "site": "SUPCTL_SITE",
    "application": "SUPCTL_APPLICATION",
    "service-instance": "SUPCTL_SERVICE_INSTANCE",
    "container": "SUPCTL_CONTAINER",
}
WORDS = {
    "site": "site",
    "application": "application",
    "service-instance": "service instance",
    "container": "container",
}
RULES = {
    "site": "lower-case letters, digits and '-'",
    "application": "letters, digits, '.', '_' and '-', starting with a letter or digit",
}
#: How each level is given on the command line, for the message when it is missing.
GIVE = {
    "site": "-s SITE or a target SITE/APP/INSTANCE",
    "application": "a target SITE/APP/INSTANCE or the path (applications APP ...)",
    "service-instance": "a target SITE/APP/INSTANCE or the path (... service-instances INSTANCE)",
    "container": "a target SITE/APP/INSTANCE/CONTAINER or the path (... containers CONTAINER)",
}
USAGE = "SITE/APP/INSTANCE[/CONTAINER]"


def valid(level: str, value: str) -> bool:
    return valid_site_name(value) if level == "site" else valid_name(value)


def refusal(level: str, value: str) -> str:
    """Why ``value`` is no name of ``level`` (long names cut: a message is one short line)."""
    shown = value if len(value) <= 70 else value[:67] + "..."
    return f"invalid {WORDS[level]} name {shown!r} ({RULES.get(level, RULES['application'])})"


def check(level: str, value: str, where: str) -> str:
    if not valid(level, value):
        raise UsageError(f"{where}: {refusal(level, value)}")
    return value


@dataclass(frozen=True)
class Compact:
    """A parsed ``SITE/APP/INSTANCE[/CONTAINER]``: ``parts`` are 3 or 4 checked names."""

    text: str
    parts: tuple[str, ...]


def looks_compact(arg: str) -> bool:
    """Whether a word after ``do`` is meant as a compact target (no verb has a ``/``)."""
    return "/" in arg


def parse_compact(text: str) -> Compact:
    """Split and check a compact target; one line naming what is wrong otherwise."""
    shown = text if len(text) <= 80 else text[:77] + "..."
    parts = text.split("/")
    if len(parts) not in (3, 4):
        raise UsageError(
            f"target {shown!r} has {len(parts)} part(s); it must be {USAGE}"
            " (site first, no leading or trailing '/')"
        )
    for level, part in zip(LEVELS, parts, strict=False):
        if not part:
            raise UsageError(f"target {shown!r}: the {WORDS[level]} name is empty; it must be {USAGE}")
        check(level, part, f"target {shown!r}")
    return Compact(text, tuple(parts))


def missing(level: str) -> UsageError:
    return UsageError(
        f"no {WORDS[level]}: give {GIVE[level]}, or set {ENV_VARS[level]} or {level} in a context"
        " (supctl config view shows the defaults in force)"
    )


def fill(
    current: Mapping[str, str | None],
    node: str,
    compact: Compact | None,
    defaults: Mapping[str, tuple[str, str]],
    verb: str,
) -> dict[str, str]:
    """The target of a verb hanging at ``node`` (``service-instance`` or ``container``).

    ``current``: what the explicit path set (None where not given); ``defaults``: value and
    origin of each level's default.  Raises one line for a conflict or a missing level.
    """
    wanted = LEVELS[: LEVELS.index(node) + 1]
    if compact is not None:
        if current.get("site"):
            raise UsageError(
                f"give the site once: -s {current['site']} or the target {compact.text}, not both"
            )
        if len(compact.parts) > len(wanted):
            raise UsageError(
                f"{verb} acts on a {WORDS[node]}: target {compact.text!r} names a container;"
                " give SITE/APP/INSTANCE"
            )
    out: dict[str, str] = {}
    for index, level in enumerate(wanted):
        given = current.get(level)
        if given:
            out[level] = given
        elif compact is not None and index < len(compact.parts):
            out[level] = compact.parts[index]
        elif level in defaults:
            out[level] = defaults[level][0]
        else:
            raise missing(level)
    return out
