"""The click trees of the three programs, for the CLI reference (and tests/test_docs.py).

sphinx-click documents a click object found at module level, but supctl's tree does not exist
until ``supctl.cli.make_cli()`` builds it from the installed plugins (entry points of the
``supctl`` group), and control-tower's and edge-enforcer's are built by their own
``make_cli()``: so they are built here, once per docs build, from the code being documented.
No Sphinx import, so the tests can use it without the docs dependencies.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import click

from supctl.cli import make_cli as make_supctl
from supctl.enforcer.cli import make_cli as make_enforcer
from supctl.tower.cli import make_cli as make_tower

#: Verbs the built-in plugins add; without them the plugins' entry points are missing (the
#: package is not installed) and the reference would quietly lack most of supctl.
BUILT_IN_VERBS = ("connect", "exec", "logs", "show")

supctl = make_supctl()
control_tower = make_tower()
edge_enforcer = make_enforcer()

#: Program name -> (its click tree, the attribute sphinx-click imports, man page section).
PROGRAMS: dict[str, tuple[click.Command, str, int]] = {
    "supctl": (supctl, "clitrees:supctl", 1),
    "control-tower": (control_tower, "clitrees:control_tower", 8),
    "edge-enforcer": (edge_enforcer, "clitrees:edge_enforcer", 8),
}


def walk(path: str, command: click.Command) -> Iterator[tuple[str, click.Command]]:
    """Every command of the tree with its full path (``supctl do applications``), root first."""
    yield path, command
    if isinstance(command, click.Group):
        for name, sub in sorted(command.commands.items()):
            yield from walk(f"{path} {name}", sub)


def missing_verbs() -> list[str]:
    """The built-in verbs the supctl tree lacks (empty when the plugins are installed)."""
    names = {path.rsplit(" ", 1)[-1] for path, _ in walk("supctl", supctl)}
    return [verb for verb in BUILT_IN_VERBS if verb not in names]


@dataclass(frozen=True)
class EnvOption:
    variable: str
    command: str  # full path, e.g. "supctl"
    option: str  # e.g. "--host"
    help: str


def click_envvars() -> list[EnvOption]:
    """Every option of the three programs that reads an environment variable (``envvar=``)."""
    found = []
    for prog, (tree, _, _) in PROGRAMS.items():
        for path, command in walk(prog, tree):
            for param in command.params:
                names = [param.envvar] if isinstance(param.envvar, str) else list(param.envvar or ())
                option = (
                    max(param.opts, key=len) if isinstance(param, click.Option) else param.human_readable_name
                )
                help_text = getattr(param, "help", None) or ""
                found += [EnvOption(name, path, option, help_text) for name in names]
    return sorted(found, key=lambda e: (e.variable, e.command))
