"""The docs site's CLI reference covers every program and environment variable.

The reference is generated at build time from the click trees (docs/_ext/clitrees.py, through
sphinx-click), and `tox -e docs` builds it with warnings as errors; these checks need no Sphinx:
each program has its page, whose directive documents the whole tree, and no ``SUPCTL_*``
variable the code reads or docs/cli.md names is left out of docs/reference/environment.md.
"""

from __future__ import annotations

import configparser
import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
VARIABLE = re.compile(r"\bSUPCTL_[A-Z][A-Z0-9_]*[A-Z0-9]\b")


def load_clitrees() -> ModuleType:
    if "clitrees" in sys.modules:
        return sys.modules["clitrees"]
    spec = importlib.util.spec_from_file_location("clitrees", DOCS / "_ext" / "clitrees.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["clitrees"] = module
    spec.loader.exec_module(module)
    return module


def console_scripts() -> set[str]:
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    lines = setup["options.entry_points"]["console_scripts"].strip().splitlines()
    return {line.split("=")[0].strip() for line in lines}


def test_every_program_has_a_reference_page_documenting_its_whole_tree() -> None:
    clitrees = load_clitrees()
    assert set(clitrees.PROGRAMS) == console_scripts()
    index = (DOCS / "index.md").read_text()
    for prog, (_, attribute, _) in clitrees.PROGRAMS.items():
        page = (DOCS / "reference" / f"{prog}.md").read_text()
        assert f".. click:: {attribute}\n   :prog: {prog}\n   :nested: full\n" in page, prog
        assert f"reference/{prog}\n" in index, prog


def test_the_supctl_tree_has_the_built_in_verbs() -> None:
    # What conf.py refuses to build without: the plugins' entry points are installed.
    assert load_clitrees().missing_verbs() == []


def test_every_supctl_variable_is_in_the_environment_reference() -> None:
    clitrees = load_clitrees()
    from_options = {env.variable for env in clitrees.click_envvars()}
    assert {"SUPCTL_HOST", "SUPCTL_TOKEN_FILE"} <= from_options
    page = (DOCS / "reference" / "environment.md").read_text()
    documented = set(VARIABLE.findall(page))
    sources = [*(ROOT / "supctl").rglob("*.py"), *(ROOT / "plugins").rglob("*.py"), DOCS / "cli.md"]
    used = {name: path for path in sources for name in VARIABLE.findall(path.read_text())}
    known = from_options | documented
    missing = {name: str(path.relative_to(ROOT)) for name, path in used.items() if name not in known}
    assert missing == {}, "add these to docs/reference/environment.md (Other variables)"
    # ...and the hand-written list names no variable the code has dropped.
    stale = documented - set(used) - from_options
    assert stale == set()
