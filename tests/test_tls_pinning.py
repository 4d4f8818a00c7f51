"""Pinning the tower's certificate (``--tower-fingerprint``) and the ``--token`` warning.

With a pin, supctl and the enforcer trust the tower by the SHA-256 of its
certificate alone (no CA file, no hostname check), and a tower whose
certificate does not match never sees a byte of HTTP, so never the token.
"""

from __future__ import annotations

import json
import re
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e_support import inventory, start_server, wait_until
from stack import Proc, Stack, do_args, one_line_error, program, write_secret

from supctl.client.settings import resolve
from supctl.errors import ExitCode, UsageError
from supctl.tlspin import FingerprintMismatch, check_peer, format_fingerprint, parse_fingerprint

APP, INSTANCE = "app", "inst"
SITE = "ca-site"  # its enforcer trusts the tower through the CA file (Stack's default)
PINNED_SITE = "pinned-site"
WRONG_SITE = "wrong-pin-site"
WRONG_PIN = "00" * 32
WARNING = "warning: --token is visible to other users in ps; prefer --token-file or SUPCTL_TOKEN"


# --- the pure helpers --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "ab:" * 31 + "ab",
        ("AB:" * 31 + "AB"),
        "ab" * 32,
        "Ab" * 32,
        " " + "ab:" * 31 + "ab\n",
    ],
    ids=["colons", "upper", "bare", "mixed-case", "padded"],
)
def test_fingerprint_forms(text: str) -> None:
    assert parse_fingerprint(text) == bytes([0xAB]) * 32


@pytest.mark.parametrize("text", ["ab" * 31, "ab" * 33, "zz" * 32, "sha256:" + "ab" * 32, "ab-" * 32])
def test_bad_fingerprints(text: str) -> None:
    with pytest.raises(UsageError, match="must be a SHA-256 fingerprint"):
        parse_fingerprint(text)


def test_format_matches_control_tower() -> None:
    assert format_fingerprint(bytes(range(32))).startswith("00:01:02:03")
    assert parse_fingerprint(format_fingerprint(bytes(range(32)))) == bytes(range(32))


def test_check_peer_without_certificate() -> None:
    with pytest.raises(FingerprintMismatch, match="presented no TLS certificate"):
        check_peer(None, bytes(32), "wss://x:1")


def test_settings_pin_from_config_and_option(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    config = tmp_path / "supctl" / "config.toml"
    config.parent.mkdir()
    config.write_text(f'host = "wss://tower:1"\ntower-fingerprint = "{"AB:" * 31}AB"\n')
    args: dict[str, Any] = {"host": None, "token": None, "token_file": None, "ca_file": None, "config": None}
    assert resolve(**args).tower_fingerprint == bytes([0xAB]) * 32
    assert resolve(**args, tower_fingerprint="cd" * 32).tower_fingerprint == bytes([0xCD]) * 32
    assert "ab:ab" in repr(resolve(**args))
    with pytest.raises(UsageError, match="needs a wss:// tower URL"):
        resolve(**dict(args, host="ws://tower:1"))


def test_a_token_that_cannot_be_a_header_is_refused_without_showing_it() -> None:
    args: dict[str, Any] = {"host": None, "token_file": None, "ca_file": None, "config": None}
    with pytest.raises(UsageError) as info:
        resolve(**args, token="sct_admin_se cret")
    assert "se cret" not in str(info.value)


# --- end to end ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with Stack(tmp_path_factory.mktemp("pinning")) as stack:
        stack.start_tower()
        stack.add_site(SITE, inventory(APP, INSTANCE))
        yield stack


@pytest.fixture(scope="module")
def pin(stack: Stack) -> str:
    return stack.control_tower("fingerprint", "--config", str(stack.dir / "tower.toml")).strip()


def pinned_env(stack: Stack, fingerprint: str) -> dict[str, str]:
    """No CA file at all: only the pin can make the tower trusted."""
    env = {k: v for k, v in stack.env.items() if k != "SUPCTL_CA_FILE"}
    env["SUPCTL_TOWER_FINGERPRINT"] = fingerprint
    return env


def no_ca_env(stack: Stack) -> dict[str, str]:
    return {k: v for k, v in stack.env.items() if k != "SUPCTL_CA_FILE"}


def netcat(stack: Stack, site: str, port: int, payload: bytes, *opts: str, env: dict[str, str]) -> bytes:
    result = stack.supctl(
        *opts, *do_args(site, APP, INSTANCE, "connect", "tcp", str(port)), input=payload, env=env, timeout=30
    )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stderr == b""
    return result.stdout


def test_without_ca_or_pin_the_tower_is_not_trusted(stack: Stack) -> None:
    result = stack.supctl("show", "sites", env=no_ca_env(stack), timeout=30)
    assert result.returncode == ExitCode.UNAVAILABLE
    assert "not trusted" in one_line_error(result.stderr)


def test_correct_pin_connects_without_a_ca_file(stack: Stack, pin: str) -> None:
    _, port = start_server(stack, "echo")
    # The pin from the environment, as control-tower prints it...
    assert netcat(stack, SITE, port, b"pinned hello\n", env=pinned_env(stack, pin)) == b"pinned hello\n"
    # ...and from the option, upper case without colons.
    bare = pin.replace(":", "").upper()
    out = netcat(stack, SITE, port, b"again\n", "--tower-fingerprint", bare, env=no_ca_env(stack))
    assert out == b"again\n"


def test_correct_pin_shows_sites(stack: Stack, pin: str) -> None:
    result = stack.supctl("show", "-o", "json", "sites", env=pinned_env(stack, pin), timeout=30)
    assert result.returncode == 0, result.stderr.decode()
    assert SITE in {site["name"] for site in json.loads(result.stdout)}


def test_config_file_pin(stack: Stack, pin: str, tmp_path: Path) -> None:
    config = tmp_path / "pinned.toml"
    config.write_text(f'tower-fingerprint = "{pin}"\n')
    result = stack.supctl("--config", str(config), "show", "sites", env=no_ca_env(stack), timeout=30)
    assert result.returncode == 0, result.stderr.decode()


@pytest.mark.parametrize("verb", ["connect", "show"])
def test_wrong_pin_is_refused_before_the_request(stack: Stack, pin: str, verb: str) -> None:
    assert stack.tower is not None
    sessions = stack.tower.log.count("session opened")
    args = do_args(SITE, APP, INSTANCE, "connect", "tcp", "9") if verb == "connect" else ["show", "sites"]
    # The right CA is given too: a pin replaces the CA check, it does not add to it.
    env = dict(pinned_env(stack, WRONG_PIN), SUPCTL_CA_FILE=str(stack.dir / "ca.pem"))
    result = stack.supctl(*args, env=env, timeout=30)
    assert result.returncode == ExitCode.UNAVAILABLE
    assert result.stdout == b""
    line = one_line_error(result.stderr)
    assert line == (
        f"supctl: error: the tower's certificate fingerprint {pin} does not match the pinned fingerprint"
        f" (tower at {stack.url})"
    )
    assert stack.tower.log.count("session opened") == sessions


class Impostor:
    """A TLS server with another tower's certificate that records every byte it is sent."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(str(cert), str(key))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.accepted = 0
        self.received = b""
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while True:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            try:
                with self.context.wrap_socket(raw, server_side=True) as tls:
                    tls.settimeout(10)
                    while data := tls.recv(65536):
                        self.received += data
            except OSError:  # the client gave up (asyncio may not even finish the handshake)
                continue

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() (close alone does not)
        self.listener.close()
        self.thread.join(10)
        assert not self.thread.is_alive()


@pytest.mark.parametrize("verb", ["connect", "show"])
def test_the_token_never_reaches_an_impostor(stack: Stack, pin: str, tmp_path: Path, verb: str) -> None:
    other = tmp_path / "impostor"
    stack.control_tower("init", str(other))
    impostor = Impostor(other / "server.pem", other / "server-key.pem")
    try:
        env = dict(pinned_env(stack, pin), SUPCTL_HOST=f"wss://127.0.0.1:{impostor.port}")
        args = do_args(SITE, APP, INSTANCE, "connect", "tcp", "9") if verb == "connect" else ["show", "sites"]
        result = stack.supctl(*args, env=env, timeout=30)
        assert result.returncode == ExitCode.UNAVAILABLE
        assert "does not match the pinned fingerprint" in one_line_error(result.stderr)
        wait_until(lambda: impostor.accepted >= 1, what="the connection")
    finally:
        impostor.close()
    assert impostor.received == b""  # not one byte of HTTP, so no Authorization header


def start_pinned_enforcer(stack: Stack, site: str, fingerprint: str) -> Proc:
    """``edge-enforcer run --tower-fingerprint`` without ``--ca-file``."""
    token = stack.register_site(site).strip()
    write_secret(stack.root / f"{site}.token", token + "\n")
    (stack.root / f"{site}.toml").write_text(inventory(APP, INSTANCE))
    return stack.spawn(
        f"enforcer-{site}",
        [
            program("edge-enforcer"),
            "run",
            "--tower",
            stack.url,
            "--site",
            site,
            "--token-file",
            str(stack.root / f"{site}.token"),
            "--tower-fingerprint",
            fingerprint,
            "--inventory",
            str(stack.root / f"{site}.toml"),
        ],
    )


def test_enforcer_with_the_right_pin_connects(stack: Stack, pin: str) -> None:
    assert stack.tower is not None
    enforcer = start_pinned_enforcer(stack, PINNED_SITE, pin.replace(":", "").upper())
    stack.tower.log.wait_for(rf"site {PINNED_SITE} connected", proc=enforcer.popen)
    _, port = start_server(stack, "echo")
    assert netcat(stack, PINNED_SITE, port, b"via a pinned site\n", env=pinned_env(stack, pin)) == (
        b"via a pinned site\n"
    )


def test_enforcer_with_a_wrong_pin_keeps_retrying(stack: Stack, pin: str) -> None:
    assert stack.tower is not None
    enforcer = start_pinned_enforcer(stack, WRONG_SITE, WRONG_PIN)
    mismatch = (
        rf"the tower's certificate fingerprint {pin} does not match the pinned fingerprint"
        rf" \(tower at {re.escape(stack.url)}\); reconnecting in"
    )
    wait_until(lambda: enforcer.log.count(mismatch) >= 2, deadline=20, what="two refused attempts")
    assert enforcer.popen.poll() is None, enforcer.log.text()
    assert "Traceback" not in enforcer.log.text()
    assert f"site {WRONG_SITE} connected" not in stack.tower.log.text()
    assert f"{WRONG_SITE}" not in stack.tower.log.text()  # not even refused: no request reached it
    enforcer.stop()


def test_enforcer_bad_pin_is_a_usage_error(stack: Stack, tmp_path: Path) -> None:
    import subprocess

    (tmp_path / "t").write_text("x\n")
    (tmp_path / "i.toml").write_text(inventory(APP, INSTANCE))
    result = subprocess.run(
        [
            program("edge-enforcer"),
            "run",
            "--tower",
            stack.url,
            "--site",
            "s",
            "--token-file",
            str(tmp_path / "t"),
            "--inventory",
            str(tmp_path / "i.toml"),
            "--tower-fingerprint",
            "not-hex",
        ],
        capture_output=True,
        timeout=30,
        env=stack.env,
    )
    assert result.returncode == ExitCode.USAGE
    assert "must be a SHA-256 fingerprint" in one_line_error(result.stderr)


# --- the --token warning --------------------------------------------------------------------------


def admin_token(stack: Stack) -> str:
    return (stack.dir / "admin.token").read_text().strip()


def test_token_on_the_command_line_warns_once(stack: Stack) -> None:
    token = admin_token(stack)
    env = {k: v for k, v in stack.env.items() if k != "SUPCTL_TOKEN_FILE"}
    result = stack.supctl("--token", token, "show", "sites", env=env, timeout=30)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stderr.decode().splitlines() == [WARNING]
    assert token.encode() not in result.stderr + result.stdout


def test_token_warning_on_an_error_path_never_shows_the_token(stack: Stack) -> None:
    token = "sct_admin_never-shown-0123456789"
    result = stack.supctl("--token", token, *do_args(SITE, APP, INSTANCE, "connect", "tcp", "9"), timeout=30)
    assert result.returncode == ExitCode.DENIED
    lines = result.stderr.decode().splitlines()
    assert lines[0] == WARNING and len(lines) == 2 and "invalid API token" in lines[1]
    assert b"never-shown" not in result.stderr + result.stdout
    # A token that cannot go into a header: refused locally, still never echoed.
    result = stack.supctl("--token", "sct_admin_never shown", "show", "sites", timeout=30)
    assert result.returncode == ExitCode.USAGE
    assert b"never" not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr.decode()


@pytest.mark.parametrize("how", ["env", "token-file"])
def test_no_warning_when_the_token_is_not_on_the_command_line(stack: Stack, how: str) -> None:
    env = dict(stack.env)
    args: list[str] = []
    if how == "env":
        env.pop("SUPCTL_TOKEN_FILE")
        env["SUPCTL_TOKEN"] = admin_token(stack)
    else:
        args = ["--token-file", str(stack.dir / "admin.token")]
    result = stack.supctl(*args, "show", "sites", env=env, timeout=30)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stderr == b""
