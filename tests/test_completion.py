"""Shell completion: the scripts, and the names a TAB gets from a real tower.

supctl runs as the shells run it (``_SUPCTL_COMPLETE=bash_complete COMP_WORDS=...
COMP_CWORD=...``), against a real tower and enforcer; with the tower down, or a "tower" that
accepts and never answers, a TAB completes nothing, prints nothing on stderr, exits 0 and
returns within the timeout.
"""

from __future__ import annotations

import shlex
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest
from stack import Stack, program

from supctl.client.completion import names

SITE, APP, OTHER_APP = "ux-lab", "web", "db"
INSTANCES = ("web-1", "web-2")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with Stack(tmp_path_factory.mktemp("completion")) as stack:
        stack.start_tower()
        inventory = "".join(
            f'[applications.{APP}.service-instances.{name}]\nruntime = "host"\n'
            f"[applications.{APP}.service-instances.{name}.containers.nginx]\n"
            f"[applications.{APP}.service-instances.{name}.containers.php]\n"
            for name in INSTANCES
        )
        inventory += f'[applications.{OTHER_APP}.service-instances.db-1]\nruntime = "host"\n'
        stack.add_site(SITE, inventory)
        stack.add_site("ux-other", f'[applications.{APP}.service-instances.x-1]\nruntime = "host"\n')
        yield stack


#: A TAB that waited for the transport's own timeout (15 s) would take longer than this: the
#: deadline of a hang, not a measure of speed (that is the benchmarks' business).
HANG = 10.0


def complete(
    env: dict[str, str], line: str, deadline: float = 30
) -> tuple[subprocess.CompletedProcess[str], float]:
    """What bash gets for TAB at the end of ``line`` (a trailing space: a new word)."""
    words = shlex.split(line) + ([""] if line.endswith(" ") else [])
    full = {
        **env,
        "_SUPCTL_COMPLETE": "bash_complete",
        "COMP_WORDS": " ".join(words),
        "COMP_CWORD": str(len(words) - 1),
    }
    start = time.monotonic()
    result = subprocess.run(
        [program("supctl")], capture_output=True, text=True, env=full, timeout=deadline, check=False
    )
    return result, time.monotonic() - start


def values(env: dict[str, str], line: str) -> list[str]:
    result, _ = complete(env, line)
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    return [entry.split(",", 1)[1] for entry in result.stdout.splitlines() if entry]


def test_verbs_and_options(stack: Stack) -> None:
    assert {"do", "show", "config", "completion", "whoami"} <= set(values(stack.env, "supctl "))
    assert values(stack.env, "supctl config ") == ["current-context", "get-contexts", "use-context", "view"]
    assert "--context" in values(stack.env, "supctl --")
    assert {"connect", "exec", "applications", "login"} <= set(values(stack.env, "supctl do "))


def test_names_come_from_the_tower(stack: Stack) -> None:
    env = stack.env
    assert values(env, "supctl do -s ") == ["ux-lab", "ux-other"]
    assert values(env, "supctl do -s ux-l") == ["ux-lab"]
    assert values(env, f"supctl do -s {SITE} applications ") == [OTHER_APP, APP]
    assert values(env, f"supctl do -s {SITE} applications {APP} service-instances ") == list(INSTANCES)
    line = f"supctl do -s {SITE} applications {APP} service-instances web-2 containers "
    assert values(env, line) == ["nginx", "php"]
    # The site of the long form may come from the defaults.
    assert values({**env, "SUPCTL_SITE": SITE}, "supctl do applications w") == [APP]


def test_compact_target_completes_level_by_level(stack: Stack) -> None:
    env = stack.env
    assert {"ux-lab/", "ux-other/", "connect", "exec"} <= set(values(env, "supctl do "))
    assert values(env, "supctl do ux-lab/") == ["ux-lab/db/", "ux-lab/web/"]
    assert values(env, "supctl do ux-lab/w") == ["ux-lab/web/"]
    assert values(env, "supctl do ux-lab/web/") == ["ux-lab/web/web-1", "ux-lab/web/web-2"]
    assert values(env, "supctl do ux-lab/web/web-1/") == ["ux-lab/web/web-1/nginx", "ux-lab/web/web-1/php"]
    assert values(env, "supctl do ux-lab/web/web-1/n") == ["ux-lab/web/web-1/nginx"]
    assert {"connect", "exec"} <= set(values(env, "supctl do ux-lab/web/web-1 "))
    assert values(env, "supctl do ../") == []  # not a name: nothing asked of the tower


def test_nothing_without_a_token(stack: Stack) -> None:
    env = {k: v for k, v in stack.env.items() if k != "SUPCTL_TOKEN_FILE"}
    assert values(env, "supctl do -s ") == []


def test_nothing_and_quickly_when_the_tower_is_down() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again below: nothing listens there
    env = {"SUPCTL_HOST": f"wss://127.0.0.1:{port}", "SUPCTL_TOKEN": "x", "PATH": "/usr/bin:/bin"}
    result, _ = complete(env, "supctl do -s ", deadline=HANG)
    assert (result.returncode, result.stdout.strip(), result.stderr) == (0, "", "")


def test_a_tower_that_never_answers_costs_at_most_the_timeout() -> None:
    with socket.socket() as silent:  # accepts (the kernel does) and never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        env = {"SUPCTL_HOST": f"wss://127.0.0.1:{silent.getsockname()[1]}", "SUPCTL_TOKEN": "x"}
        for line in ("supctl do -s ", "supctl do ux-lab/", "supctl do "):
            # The request is abandoned after TIMEOUT, and the process exits without
            # waiting for it (supctl.cli.main): never the transport's 15 s.
            result, _ = complete(env, line, deadline=HANG)
            assert (result.returncode, result.stderr) == (0, ""), line
            assert [v for v in result.stdout.splitlines() if "/" in v] == []


def test_names_a_hostile_tower_sends_are_dropped() -> None:
    body = {
        "sites": [
            {"name": "ok-site"},
            {"name": "x; rm -rf ~"},
            {"name": "a\nplain,injected"},
            {"name": "$(reboot)"},
            {"name": 7},
            "not-a-dict",
            {"name": "ok-site"},
        ]
    }
    assert names(body, "sites", "site") == ["ok-site"]
    assert names({"sites": "nope"}, "sites", "site") == []
    assert names(["x"], "sites", "site") == []


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_scripts(shell: str) -> None:
    result = subprocess.run(
        [program("supctl"), "completion", shell], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    assert f"_SUPCTL_COMPLETE={shell}_complete" in result.stdout
    sourced = subprocess.run(
        [program("supctl")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={"_SUPCTL_COMPLETE": f"{shell}_source", "PATH": "/usr/bin:/bin"},
    )
    assert sourced.stdout.strip() == result.stdout.strip()


def test_completion_of_an_unknown_shell_is_a_usage_error() -> None:
    result = subprocess.run(
        [program("supctl"), "completion", "tcsh"], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 2 and "'tcsh' is not one of 'bash', 'zsh', 'fish'" in result.stderr
