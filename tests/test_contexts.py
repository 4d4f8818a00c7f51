"""``supctl config``: use-context edits config.toml safely, get-contexts, current-context and
view (every setting, its value and its origin, never a token), through the installed program."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest
from stack import one_line_error, program

from supctl.client.contexts import rewrite_current
from supctl.errors import ExitCode

TOKEN = "sct_admin_do-not-print-me"

CONFIG = f"""\
# supctl, by hand: keep this comment
host = "wss://top.example:4646"   # the usual tower
token = "{TOKEN}"

# the lab, for demos
[contexts.lab]
host = "wss://lab.example:4646"
token-file = "TOKENFILE"
site = "ux-lab"
application = "web"
service-instance = "web-1"

[contexts.prod]
host = "wss://prod.example:4646"
site = "stockholm"
"""


def supctl(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("SUPCTL_")}
    base.update(HOME=str(tmp_path / "home"), XDG_CONFIG_HOME=str(tmp_path / "xdg"), **(env or {}))
    return subprocess.run(
        [program("supctl"), *args], capture_output=True, text=True, env=base, timeout=30, check=False
    )


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "xdg" / "supctl" / "config.toml"
    path.parent.mkdir(parents=True)
    (tmp_path / "lab.token").write_text("lab-secret-token\n")
    path.write_text(CONFIG.replace("TOKENFILE", str(tmp_path / "lab.token")))
    path.chmod(0o600)
    return path


def test_use_context_keeps_everything_else(tmp_path: Path, config: Path) -> None:
    before = config.read_text()
    result = supctl(tmp_path, "config", "use-context", "lab")
    assert result.returncode == 0, result.stderr
    after = config.read_text()
    # One line added after the top-level keys; every comment and blank line kept.
    assert after == before.replace(f'token = "{TOKEN}"\n', f'token = "{TOKEN}"\ncurrent-context = "lab"\n')
    assert stat.S_IMODE(config.stat().st_mode) == 0o600  # it may hold a token
    assert supctl(tmp_path, "config", "current-context").stdout == "lab\n"
    # Again: the same line is replaced, not added twice.
    assert supctl(tmp_path, "config", "use-context", "prod").returncode == 0
    assert config.read_text() == after.replace('current-context = "lab"', 'current-context = "prod"')
    assert not [p for p in config.parent.iterdir() if p.name != "config.toml"]  # no temporary file left


def test_use_context_refuses_unknown_names_and_keeps_the_file(tmp_path: Path, config: Path) -> None:
    before = config.read_bytes()
    result = supctl(tmp_path, "config", "use-context", "labb")
    assert result.returncode == ExitCode.USAGE
    assert one_line_error(result.stderr.encode()) == "supctl: error: unknown context 'labb'; known: lab, prod"
    assert config.read_bytes() == before


def test_use_context_writes_through_a_symlink(tmp_path: Path, config: Path) -> None:
    real = tmp_path / "dotfiles" / "supctl.toml"
    real.parent.mkdir()
    config.rename(real)
    config.symlink_to(real)
    assert supctl(tmp_path, "config", "use-context", "lab").returncode == 0
    assert config.is_symlink() and 'current-context = "lab"' in real.read_text()


def test_an_edit_that_would_change_more_is_refused(tmp_path: Path) -> None:
    # current-context at the start of a line inside a multi-line string: editing that line
    # would change the string, so the check after the edit refuses it.
    path = tmp_path / "c.toml"
    text = 'host = """\ncurrent-context = "x"\n"""\n[contexts.lab]\n'
    path.write_text(text)
    result = supctl(tmp_path, "--config", str(path), "config", "use-context", "lab")
    assert result.returncode == ExitCode.USAGE
    assert "cannot edit" in one_line_error(result.stderr.encode())
    assert path.read_text() == text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", 'current-context = "a"\n'),
        ('host = "h"', 'host = "h"\ncurrent-context = "a"\n'),
        ("# c\n\n[contexts.a]\n", 'current-context = "a"\n# c\n\n[contexts.a]\n'),
        ('"current-context" = "b" # old\n[t]\n', 'current-context = "a"\n[t]\n'),
    ],
)
def test_rewrite_current(text: str, expected: str) -> None:
    assert rewrite_current(text, "a") == expected


def test_get_contexts(tmp_path: Path, config: Path) -> None:
    result = supctl(tmp_path, "config", "get-contexts")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["CURRENT", "NAME", "HOST", "TARGET", "CREDENTIAL"]
    assert lines[1].split() == [
        "lab",
        "wss://lab.example:4646",
        "ux-lab/web/web-1",
        "token-file",
        str(tmp_path / "lab.token"),
    ]
    supctl(tmp_path, "config", "use-context", "lab")
    assert supctl(tmp_path, "config", "get-contexts").stdout.splitlines()[1].startswith("*")
    data = json.loads(
        supctl(tmp_path, "config", "get-contexts", "-o", "json", env={"SUPCTL_CONTEXT": "prod"}).stdout
    )
    assert [(c["name"], c["current"]) for c in data] == [("lab", False), ("prod", True)]
    assert data[1]["target"] == {
        "site": "stockholm",
        "application": None,
        "service-instance": None,
        "container": None,
    }


def test_current_context_without_one(tmp_path: Path, config: Path) -> None:
    result = supctl(tmp_path, "config", "current-context")
    assert result.returncode == ExitCode.FAILURE and result.stdout == ""
    assert "no context in use" in one_line_error(result.stderr.encode())


def test_view_says_where_each_value_came_from(tmp_path: Path, config: Path) -> None:
    supctl(tmp_path, "config", "use-context", "lab")
    env = {"SUPCTL_SERVICE_INSTANCE": "web-2", "SUPCTL_TOKEN": TOKEN}
    result = supctl(tmp_path, "--host", "wss://opt.example:1", "config", "view", "-o", "json", env=env)
    assert result.returncode == 0, result.stderr
    view = {key: (item["value"], item["from"]) for key, item in json.loads(result.stdout).items()}
    assert view == {
        "config": (str(config), "default"),
        "context": ("lab", f"current-context in {config}"),
        "host": ("wss://opt.example:1", "--host"),
        "token": ("***", "SUPCTL_TOKEN"),
        "ca-file": ("-", "default"),
        "tower-fingerprint": ("-", "default"),
        "keepalive": ("10", "default"),
        "site": ("ux-lab", f"context 'lab' in {config}"),
        "application": ("web", f"context 'lab' in {config}"),
        "service-instance": ("web-2", "SUPCTL_SERVICE_INSTANCE"),
        "container": ("-", "none"),
    }
    text = supctl(tmp_path, "config", "view").stdout
    assert f"token-file {tmp_path / 'lab.token'} in context 'lab' in {config}" in text
    for output in (result.stdout, text, supctl(tmp_path, "--context", "prod", "config", "view").stdout):
        assert TOKEN not in output and "lab-secret-token" not in output
    prod = supctl(tmp_path, "--context", "prod", "config", "view").stdout
    assert f"token in {config}" in prod  # prod has none: the top-level token
