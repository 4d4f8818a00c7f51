"""Short targets end to end: defaults, contexts and ``SITE/APP/INSTANCE[/CONTAINER]`` through
a real tower and enforcer (TLS WebSockets, real processes), checked by the bytes that arrive.

One module-wide stack: a site whose instance uses the ``host`` runtime (no namespace), with
a container, and two servers on 127.0.0.1 (one answers the SHA-256 of what it read, one echoes).
"""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_support import start_server
from servers import pattern
from stack import Stack, one_line_error

from supctl.errors import ExitCode

SITE, APP, INSTANCE, CONTAINER = "ux-lab", "web", "web-1", "shell"
MB = 1_000_000


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with Stack(tmp_path_factory.mktemp("short-targets")) as stack:
        stack.start_tower()
        stack.add_site(
            SITE,
            f'[applications.{APP}.service-instances.{INSTANCE}]\nruntime = "host"\n'
            f"[applications.{APP}.service-instances.{INSTANCE}.containers.{CONTAINER}]\n",
        )
        yield stack


@pytest.fixture(scope="module")
def sha_port(stack: Stack) -> int:
    return start_server(stack, "answer-after-eof")[1]


@pytest.fixture(scope="module")
def echo_port(stack: Stack) -> int:
    return start_server(stack, "echo")[1]


def env_with(stack: Stack, **extra: str) -> dict[str, str]:
    return {**stack.env, **extra}


DEFAULTS = {"SUPCTL_SITE": SITE, "SUPCTL_APPLICATION": APP, "SUPCTL_SERVICE_INSTANCE": INSTANCE}


def test_connect_with_env_defaults_forwards_bytes(stack: Stack, sha_port: int) -> None:
    payload = b"".join(pattern(21, 2 * MB))
    result = stack.supctl(
        "do", "connect", "tcp", str(sha_port), input=payload, env=env_with(stack, **DEFAULTS)
    )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == hashlib.sha256(payload).hexdigest().encode() + b"\n"
    assert result.stderr == b""


def test_compact_target_forward_with_bind(stack: Stack, echo_port: int) -> None:
    forward, port = stack.forward(
        "do", f"{SITE}/{APP}/{INSTANCE}", "connect", "tcp", str(echo_port), "--bind", "0"
    )
    data = b"".join(pattern(22, 500_000))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        assert sock.makefile("rb").read() == data
    assert f"in {INSTANCE} at {SITE}" in forward.log.text()
    assert forward.stop() == 0


def test_compact_target_exec(stack: Stack) -> None:
    payload = b"".join(pattern(23, MB))
    target = f"{SITE}/{APP}/{INSTANCE}/{CONTAINER}"
    result = stack.supctl("do", target, "exec", "sha256sum", input=payload)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == hashlib.sha256(payload).hexdigest().encode() + b"  -\n"


def test_exec_with_all_defaults_and_a_three_part_target(stack: Stack) -> None:
    env = env_with(stack, **DEFAULTS, SUPCTL_CONTAINER=CONTAINER)
    result = stack.supctl("do", "exec", "echo $((6 * 7))", env=env)
    assert (result.returncode, result.stdout, result.stderr) == (0, b"42\n", b"")
    # The container from the environment, the rest from the compact target.
    env = env_with(stack, SUPCTL_CONTAINER=CONTAINER, SUPCTL_SITE="elsewhere")
    result = stack.supctl("do", f"{SITE}/{APP}/{INSTANCE}", "exec", "echo ok", env=env)
    assert (result.returncode, result.stdout) == (0, b"ok\n"), result.stderr


def test_a_context_holds_tower_credentials_and_target(stack: Stack, sha_port: int, tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        "# the user's own comment\n"
        'current-context = "other"\n\n'
        "[contexts.other]\n"
        'host = "wss://127.0.0.1:1"\n'
        f'token-file = "{stack.dir / "admin.token"}"\n\n'
        "[contexts.lab]\n"
        f'host = "{stack.url}"\n'
        f'token-file = "{stack.dir / "admin.token"}"\n'
        f'ca-file = "{stack.dir / "ca.pem"}"\n'
        f'site = "{SITE}"\napplication = "{APP}"\nservice-instance = "{INSTANCE}"\n'
    )
    env = {k: v for k, v in stack.env.items() if not k.startswith("SUPCTL_")}
    use = stack.supctl("--config", str(config), "config", "use-context", "lab", env=env)
    assert use.returncode == 0, use.stderr
    assert config.read_text().startswith('# the user\'s own comment\ncurrent-context = "lab"\n')
    payload = b"".join(pattern(24, MB))
    result = stack.supctl(
        "--config", str(config), "do", "connect", "tcp", str(sha_port), input=payload, env=env
    )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == hashlib.sha256(payload).hexdigest().encode() + b"\n"
    # --context picks another context for one command: its tower is not there (exit 5).
    target = f"{SITE}/{APP}/{INSTANCE}"
    other = stack.supctl(
        "--config", str(config), "--context", "other", "do", target, "connect", "tcp", "1", env=env
    )
    assert other.returncode == ExitCode.UNAVAILABLE, other.stderr


def test_unknown_names_in_a_compact_target_are_the_towers_404(stack: Stack) -> None:
    result = stack.supctl("do", f"{SITE}/{APP}/web-9", "connect", "tcp", "1")
    assert result.returncode == ExitCode.NOT_FOUND
    assert "web-9" in one_line_error(result.stderr)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["do", "connect", "tcp", "1"],
            "no site: give -s SITE or a target SITE/APP/INSTANCE, or set SUPCTL_SITE",
        ),
        (["do", "-s", SITE, "connect", "tcp", "1"], "no application: "),
        (
            ["do", f"{SITE}/{APP}/{INSTANCE}", "exec", "true"],
            "no container: give a target SITE/APP/INSTANCE/CONTAINER",
        ),
        (["do", "-s", SITE, f"{SITE}/{APP}/{INSTANCE}", "connect", "tcp", "1"], "give the site once"),
        (["do", f"{SITE}//{INSTANCE}", "connect", "tcp", "1"], "the application name is empty"),
    ],
)
def test_missing_or_conflicting_target_is_one_line(stack: Stack, args: list[str], message: str) -> None:
    result = stack.supctl(*args)
    assert result.returncode == ExitCode.USAGE
    assert message in one_line_error(result.stderr)
