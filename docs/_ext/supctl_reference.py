"""Sphinx glue for the reference: the ``supctl-envvars`` directive (one table of every option
that reads an environment variable), metavars as click shows them, and links to repository
files outside docs/.

The commands themselves are documented by sphinx-click's ``click`` directive from the trees
in :mod:`clitrees`; this adds only what sphinx-click has no place for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import clitrees
from docutils import nodes
from sphinx import addnodes
from sphinx.application import Sphinx
from sphinx.transforms import SphinxTransform
from sphinx.util.docutils import SphinxDirective


def _cell(text: str) -> nodes.entry:
    return nodes.entry("", nodes.paragraph("", "", nodes.literal(text, text)) if text else nodes.paragraph())


class EnvvarTable(SphinxDirective):
    """A table: variable, program and command, option, help; built from the click trees."""

    def run(self) -> list[nodes.Node]:
        headers = ("variable", "command", "option", "meaning")
        group = nodes.tgroup(cols=len(headers))
        group += [nodes.colspec(colwidth=width) for width in (3, 3, 2, 6)]
        head = nodes.row("", *(nodes.entry("", nodes.paragraph(text=h)) for h in headers))
        body = nodes.tbody()
        for env in clitrees.click_envvars():
            meaning = nodes.entry("", nodes.paragraph(text=env.help))
            body += nodes.row("", _cell(env.variable), _cell(env.command), _cell(env.option), meaning)
        group += [nodes.thead("", head), body]
        return [nodes.table("", group)]


class RepositoryLinks(SphinxTransform):
    """A link from a page to a file of the repository outside docs/ (``../supctl/hookspecs.py``)
    works when the Markdown is read on a forge, but the site has no such page: keep the link's
    text (it names the path) and drop the link, rather than a broken link or a download."""

    default_priority = 100  # after MyST made the references, long before they are resolved

    def apply(self, **kwargs: Any) -> None:
        srcdir = Path(self.env.srcdir).resolve()
        for node in list(self.document.findall(_is_local_link)):
            if self._outside_docs(node, srcdir):
                node.replace_self(node.children)

    def _outside_docs(self, node: nodes.Element, srcdir: Path) -> bool:
        target = str(node["reftarget"])
        if node.get("refdomain") == "doc":
            # A Markdown file outside docs/: MyST made a "docname" of its absolute path, sans .md
            paths = [Path(target + suffix) for suffix in self.config.source_suffix]
        else:
            paths = [Path(self.env.relfn2path(target.split("#", 1)[0], self.env.docname)[1])]
        return any(
            path.exists() and srcdir.parent in path.resolve().parents and srcdir not in path.resolve().parents
            for path in paths
        )


def _is_local_link(node: nodes.Node) -> bool:
    if isinstance(node, addnodes.download_reference):
        return True
    return isinstance(node, addnodes.pending_xref) and node.get("reftype") == "myst"


def _keep_metavars(app: Sphinx, ctx: click.Context, lines: list[str]) -> None:
    """sphinx-click strips a metavar's brackets (``[ADDR:]PORT`` shows as ``<ADDR:]PORT>``):
    put the metavar back as the command's help shows it."""
    for param in ctx.command.params:
        metavar = param.metavar if isinstance(param, click.Option) else None
        if metavar:
            mangled = f" <{metavar.lstrip('<[{($').rstrip('>]})$')}>"
            lines[:] = [
                line.replace(mangled, f" <{metavar}>") if ".. option::" in line else line for line in lines
            ]


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("supctl-envvars", EnvvarTable)
    app.add_transform(RepositoryLinks)
    app.connect("sphinx-click-process-options", _keep_metavars)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
