"""Defaults and compact targets: which site, application, service instance and container a verb
gets, and from where (docs/cli.md, "Short targets").

Through the real click tree (:func:`supctl.cli.run`) with probe verbs at the service-instance
and container nodes that print the target the Invocation holds when the verb runs, and with
real config files and environment variables.  Errors are checked as the user sees them: one
line on stderr and the exit code.
"""

from __future__ import annotations

import json
import os
import types
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

import supctl.cli
from supctl import hookimpl
from supctl.client.api import Invocation, RegisterVerb
from supctl.client.settings import resolve
from supctl.client.target import parse_compact
from supctl.errors import ExitCode, UsageError
from supctl.plugins import make_plugin_manager


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No SUPCTL_* from the caller, no real config, and the probe verbs installed."""
    for key in list(os.environ):
        if key.startswith("SUPCTL_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(supctl.cli, "make_plugin_manager", lambda: make_plugin_manager(extra_plugins=[PROBE]))
    yield


def _probe(name: str) -> click.Command:
    @click.command(name)
    @click.pass_obj
    def probe(inv: Invocation) -> None:
        target = [inv.site, inv.application, inv.service_instance, inv.container]
        click.echo(json.dumps(target))

    return probe


def _add_verbs(register: RegisterVerb) -> None:
    register("service-instance", _probe("where"))
    register("container", _probe("cwhere"))
    register("container", _probe("where"))  # same name at both nodes: SITE/APP/INST/CONT picks this one


PROBE = types.ModuleType("target-probe")
PROBE.supctl_add_verbs = hookimpl(_add_verbs)  # type: ignore[attr-defined]


def config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "xdg" / "supctl" / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[str | None] | None, str]:
    code = supctl.cli.run(list(args))
    out, err = capsys.readouterr()
    return code, json.loads(out) if out else None, err


def target(capsys: pytest.CaptureFixture[str], *args: str) -> list[str | None] | None:
    code, out, err = run(capsys, *args)
    assert code == 0, err
    return out


def error(capsys: pytest.CaptureFixture[str], *args: str, code: int = ExitCode.USAGE) -> str:
    got, out, err = run(capsys, *args)
    assert (got, out) == (code, None), err
    assert err.count("\n") == 1 and err.startswith("supctl: error: ") and "Traceback" not in err, err
    return err.removeprefix("supctl: error: ").strip()


# --- the compact target --------------------------------------------------------------------


def test_compact_target_parts() -> None:
    assert parse_compact("ux-lab/web/web-1").parts == ("ux-lab", "web", "web-1")
    assert parse_compact("ux-lab/web/web-1/nginx").parts == ("ux-lab", "web", "web-1", "nginx")
    assert parse_compact("s1/App_2.x/i-3/C.4").parts == ("s1", "App_2.x", "i-3", "C.4")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a//b", "target 'a//b': the application name is empty"),
        ("/a/b/c", "target '/a/b/c': the site name is empty"),
        ("a/b/c/", "the container name is empty"),
        ("a/b", "target 'a/b' has 2 part(s); it must be SITE/APP/INSTANCE[/CONTAINER]"),
        ("a/b/c/d/e", "has 5 part(s)"),
        ("../x/y", "invalid site name '..'"),
        ("s/../y", "invalid application name '..'"),
        ("s/a/.hidden", "invalid service instance name '.hidden'"),
        ("UX-Lab/web/web-1", "invalid site name 'UX-Lab' (lower-case letters, digits and '-')"),
        ("s/a b/c", "invalid application name 'a b'"),
        ("s/a/c\nforged line", "invalid service instance name 'c\\nforged line'"),
        ("s/a/" + "x" * 300, "..."),
        ("s/a/c%2f", "invalid service instance name 'c%2f'"),
        ("s/\N{LATIN SMALL LETTER E WITH ACUTE}/c", "invalid application name"),
    ],
)
def test_malformed_compact_targets_are_refused(text: str, message: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_compact(text)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert len(str(info.value)) < 300


# --- precedence: path > compact > env > context > config top level ---------------------------


def test_long_form_is_unchanged(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["do", "-s", "s", "applications", "a", "service-instances", "i"]
    assert target(capsys, *args, "where") == ["s", "a", "i", None]
    assert target(capsys, *args, "containers", "c", "cwhere") == ["s", "a", "i", "c"]


def test_long_form_takes_the_default_site(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SUPCTL_SITE", "env-site")
    monkeypatch.setenv("SUPCTL_APPLICATION", "env-app")
    assert target(capsys, "do", "applications", "a", "service-instances", "i", "where") == [
        "env-site",
        "a",
        "i",
        None,
    ]


def test_compact_target_reaches_deeper_verbs(capsys: pytest.CaptureFixture[str]) -> None:
    assert target(capsys, "do", "s/a/i", "where") == ["s", "a", "i", None]
    assert target(capsys, "do", "s/a/i/c", "cwhere") == ["s", "a", "i", "c"]
    assert target(capsys, "do", "s/a/i/c", "where") == ["s", "a", "i", "c"]  # the container's verb


def test_env_defaults(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in [("SITE", "s"), ("APPLICATION", "a"), ("SERVICE_INSTANCE", "i"), ("CONTAINER", "c")]:
        monkeypatch.setenv(f"SUPCTL_{name}", value)
    assert target(capsys, "do", "where") == ["s", "a", "i", None]  # a service instance's verb: no container
    assert target(capsys, "do", "cwhere") == ["s", "a", "i", "c"]
    # Explicit beats compact beats env, level by level.
    assert target(capsys, "do", "-s", "other", "where") == ["other", "a", "i", None]
    assert target(capsys, "do", "x/y/z", "cwhere") == ["x", "y", "z", "c"]
    monkeypatch.setenv("SUPCTL_SITE", "")  # empty: unset
    assert "no site" in error(capsys, "do", "where")


LAYERED = """
site = "top-site"
application = "top-app"
service-instance = "top-inst"
container = "top-cont"
current-context = "lab"

[contexts.lab]
site = "lab-site"
application = "lab-app"

[contexts.prod]
site = "prod-site"
"""


def test_env_beats_context_beats_top_level(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config(tmp_path, LAYERED)
    assert target(capsys, "do", "cwhere") == ["lab-site", "lab-app", "top-inst", "top-cont"]
    assert target(capsys, "--context", "prod", "do", "cwhere") == [
        "prod-site",
        "top-app",
        "top-inst",
        "top-cont",
    ]
    monkeypatch.setenv("SUPCTL_CONTEXT", "prod")
    assert target(capsys, "do", "where") == ["prod-site", "top-app", "top-inst", None]
    assert target(capsys, "--context", "lab", "do", "where") == ["lab-site", "lab-app", "top-inst", None]
    monkeypatch.setenv("SUPCTL_SITE", "env-site")
    assert target(capsys, "do", "where") == ["env-site", "top-app", "top-inst", None]
    assert target(capsys, "do", "s/a/i", "where") == ["s", "a", "i", None]


def test_settings_precedence_option_env_context_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    token = tmp_path / "ctx.token"
    token.write_text("ctx-token\n")
    path = config(
        tmp_path,
        f'host = "wss://top:1"\ntoken = "top-token"\ncurrent-context = "lab"\n'
        f'[contexts.lab]\nhost = "wss://lab:2"\ntoken-file = "{token}"\n',
    )

    def settings(**given: str) -> tuple[str, str | None, dict[str, str]]:
        s = resolve(
            host=given.get("host"),
            token=given.get("token"),
            token_file=None,
            ca_file=None,
            config=None,
            context=(given.get("context"), "--context"),
            sources={"host": "SUPCTL_HOST"},
        )
        return s.host, s.token, dict(s.origins)

    host, tok, origins = settings()
    assert (host, tok) == ("wss://lab:2", "ctx-token")
    assert origins["host"] == f"context 'lab' in {path}"
    assert origins["token"] == f"token-file {token} in context 'lab' in {path}"
    assert origins["context"] == f"current-context in {path}"
    path.write_text(path.read_text().replace('current-context = "lab"\n', ""))
    host, tok, origins = settings()
    assert (host, tok, origins["host"], origins["token"]) == (
        "wss://top:1",
        "top-token",
        str(path),
        f"token in {path}",
    )
    host, tok, origins = settings(context="lab", host="wss://env:3", token="opt")
    assert (host, tok, origins["host"], origins["context"]) == (
        "wss://env:3",
        "opt",
        "SUPCTL_HOST",
        "--context",
    )


# --- what is missing or contradictory: one line ---------------------------------------------


def test_missing_levels_say_how_to_set_them(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert error(capsys, "do", "where").startswith(
        "no site: give -s SITE or a target SITE/APP/INSTANCE, or set SUPCTL_SITE or site in a context"
    )
    assert error(capsys, "do", "-s", "s", "where").startswith("no application: ")
    monkeypatch.setenv("SUPCTL_APPLICATION", "a")
    assert "or set SUPCTL_SERVICE_INSTANCE or service-instance in a context" in error(
        capsys, "do", "-s", "s", "where"
    )
    assert error(capsys, "do", "s/a/i", "cwhere").startswith(
        "no container: give a target SITE/APP/INSTANCE/CONTAINER or the path (... containers CONTAINER)"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["do", "-s", "s", "s/a/i", "where"], "give the site once: -s s or the target s/a/i, not both"),
        (["do", "-s", "x", "s/a/i", "where"], "give the site once"),
        (["do", "s/a/i/c", "applications", "a"], "applications takes no target"),
        (["do", "s/a/i"], "the target s/a/i needs a verb after it"),
        (["do", "s/a/i", "nosuchverb"], "No such command 'nosuchverb'"),
        (["do", "a//b", "where"], "the application name is empty"),
    ],
)
def test_conflicts_are_refused(capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    assert message in error(capsys, *args)


def test_a_service_instance_verb_refuses_a_container(capsys: pytest.CaptureFixture[str]) -> None:
    message = error(capsys, "do", "s/a/i/c", "connect", "tcp", "1")
    assert (
        message
        == "connect acts on a service instance: target 's/a/i/c' names a container; give SITE/APP/INSTANCE"
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SUPCTL_SITE": "../x"}, "SUPCTL_SITE: invalid site name '../x'"),
        (
            {"SUPCTL_SITE": "s", "SUPCTL_APPLICATION": "a/b"},
            "SUPCTL_APPLICATION: invalid application name 'a/b'",
        ),
        ({"SUPCTL_SITE": "s", "SUPCTL_CONTAINER": "c\x1b[2J"}, "SUPCTL_CONTAINER: invalid container name"),
    ],
)
def test_bad_env_defaults(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert message in error(capsys, "do", "cwhere")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[contexts.lab]\nsite = "UX"\n',
            "'contexts.lab.site' must be a name (lower-case letters, digits and '-')",
        ),
        ('site = "a/b"\n', "'site' must be a name"),
        ('[contexts]\nlab = "x"\n', "'contexts.lab' must be a table"),
        ('contexts = "lab"\n', "'contexts' must be a table"),
        ('[contexts.lab]\nhots = "x"\n', "unknown key 'contexts.lab.hots'"),
        ('[contexts."a b"]\n', "'contexts.\"a b\"' is not a valid context name"),
        ("current-context = 3\n", "'current-context' must be a string"),
        ('current-context = "nope"\n[contexts.lab]\n', "unknown context 'nope' (current-context in"),
        ('current-context = "nope"\n', "defines no [contexts.NAME]"),
    ],
)
def test_bad_config_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    config(tmp_path, text)
    assert message in error(capsys, "do", "where")


def test_unknown_context_lists_the_known_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config(tmp_path, "[contexts.lab]\n[contexts.prod]\n")
    assert (
        error(capsys, "--context", "labb", "do", "where")
        == "unknown context 'labb' (--context); known: lab, prod"
    )
    monkeypatch.setenv("SUPCTL_CONTEXT", "x")
    assert error(capsys, "do", "where") == "unknown context 'x' (SUPCTL_CONTEXT); known: lab, prod"
