"""Sphinx configuration: the Markdown pages of docs/ (MyST) and a CLI reference generated from
the click commands (sphinx-click), as a site (html) and as man pages (man).

Build with ``tox -e docs`` (warnings are errors), or by hand:
``sphinx-build -W --keep-going -n -b html docs docs/_build/html``.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# Document the checkout's code, even where an older supctl is installed; the plugins' entry
# points still come from the installed package (clitrees checks they are there).
sys.path[:0] = [str(HERE / "_ext"), str(ROOT), str(ROOT / "plugins")]

import clitrees  # noqa: E402 - needs the paths above

import supctl  # noqa: E402

if clitrees.missing_verbs():
    # Without the installed package its plugins' entry points are missing, and the reference
    # would quietly lack most of supctl.
    raise RuntimeError(
        f"the supctl tree lacks the built-in verbs {', '.join(clitrees.missing_verbs())}: install "
        "the package (tox -e docs does, or pip install -e .) so that its plugins' entry points exist"
    )

project = "supctl"
author = "the supctl authors"
copyright = "the supctl authors, Apache License 2.0"
release = version = supctl.__version__

extensions = ["myst_parser", "sphinx_click", "supctl_reference"]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_ext"]
# Headings get anchors as GitHub makes them, so [text](other.md#some-heading) works in both.
myst_heading_anchors = 4
myst_enable_extensions = ["deflist"]
nitpicky = True
# "--token-file" must not become an en dash in option help and prose.
smartquotes = False

html_theme = "alabaster"  # Sphinx's own: no extra dependency
html_title = "supctl"
html_theme_options = {
    "description": "Reach services on edge sites as if they were local",
    "page_width": "1100px",
}

_DESCRIPTIONS = {
    "supctl": "reach services on edge sites: port forwarding and exec through a control tower",
    "control-tower": "the supctl control tower, where clients meet edge sites",
    "edge-enforcer": "the supctl agent on an edge host",
}
man_pages = [
    (f"reference/{prog}", prog, _DESCRIPTIONS[prog], [author], section)
    for prog, (_, _, section) in clitrees.PROGRAMS.items()
]
man_show_urls = False
