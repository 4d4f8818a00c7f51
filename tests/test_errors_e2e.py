"""Every user-facing failure of ``connect`` is one line on stderr and a distinct exit code."""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_support import echo_roundtrip, start_server
from exec_support import Output
from stack import Stack, do_args, one_line_error, program

from supctl.errors import ExitCode

APP, INSTANCE, SITE = "popcorn-controller", "popcorn-controller-service-1", "stockholm-sergel"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with Stack(tmp_path_factory.mktemp("errors")) as stack:
        stack.start_tower()
        stack.add_site(SITE, f"[applications.{APP}.service-instances.{INSTANCE}]\n")
        # Registered but never connected: its enforcer is not started.
        stack.register_site("offline-site")
        yield stack


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_error(stack: Stack, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = stack.supctl(*args, env=env, timeout=30)
    assert result.stdout == b""
    return result.returncode, one_line_error(result.stderr)


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (
            do_args("nowhere", APP, INSTANCE, "connect", "tcp", "443"),
            ExitCode.NOT_FOUND,
            "unknown site 'nowhere'",
        ),
        (
            do_args(SITE + "x", APP, INSTANCE, "connect", "tcp", "443"),
            ExitCode.NOT_FOUND,
            f"unknown site '{SITE}x'; did you mean '{SITE}'?",
        ),
        (
            do_args("offline-site", APP, INSTANCE, "connect", "tcp", "443"),
            ExitCode.UNAVAILABLE,
            "site 'offline-site' is not connected",
        ),
        (
            do_args(SITE, "no-app", INSTANCE, "connect", "tcp", "443"),
            ExitCode.NOT_FOUND,
            "application 'no-app' not found at site 'stockholm-sergel'",
        ),
        (
            do_args(SITE, APP, "no-instance", "connect", "tcp", "443"),
            ExitCode.NOT_FOUND,
            "service instance 'no-instance' of application 'popcorn-controller' not found",
        ),
        (
            do_args(SITE, APP, INSTANCE, "connect", "tcp", "443", "--ip-address", "destination.example"),
            ExitCode.USAGE,
            "connect never resolves names",
        ),
        (
            do_args(SITE, APP, INSTANCE, "connect", "tcp", "443", "--ip-address", "192.0.2.300"),
            ExitCode.USAGE,
            "must be a numeric IPv4 or IPv6 address",
        ),
        (
            do_args(SITE, APP, INSTANCE, "connect", "tcp", "65536"),
            ExitCode.USAGE,
            "65536 is not in the range",
        ),
        (do_args(SITE, APP, INSTANCE, "connect", "tcp", "0"), ExitCode.USAGE, "0 is not in the range"),
        (
            do_args(SITE, APP, INSTANCE, "connect", "tcp", "443", "--wait-tower", "5"),
            ExitCode.USAGE,
            "--wait-tower needs --bind (netcat mode does not reconnect)",
        ),
        (
            do_args(SITE, APP, INSTANCE, "connect", "tcp", "443", "--bind", "0", "--wait-tower", "-1"),
            ExitCode.USAGE,
            "-1.0 is not in the range 0<=x<=3600",
        ),
        (
            do_args(SITE, APP, INSTANCE, "connect", "tcp", "https"),
            ExitCode.USAGE,
            "'https' is not a valid integer",
        ),
        (
            do_args(SITE, APP, INSTANCE, "connect", "tcp", "443", "--bind", "99999"),
            ExitCode.USAGE,
            "out of range",
        ),
        (
            do_args(SITE, APP, INSTANCE, "connect", "tcp", "443", "--bind", "example.com:80"),
            ExitCode.USAGE,
            "--bind address must be numeric",
        ),
        (do_args(SITE, APP, INSTANCE, "connect", "sctp", "53"), ExitCode.USAGE, "No such command 'sctp'"),
        (
            do_args(SITE, APP, INSTANCE, "connect", "tcp", "443", "--bind", "8443", "--bind", "8080"),
            ExitCode.USAGE,
            "--bind given 2 times (8443, 8080) for one forward; for several forwards repeat the protocol",
        ),
        (
            do_args(
                SITE,
                APP,
                INSTANCE,
                "connect",
                "tcp",
                "443",
                "--ip-address",
                "192.0.2.1",
                "--ip-address",
                "::1",
            ),
            ExitCode.USAGE,
            "--ip-address given 2 times (192.0.2.1, ::1)",
        ),
    ],
    ids=[
        "unknown-site",
        "site-typo",
        "site-offline",
        "unknown-app",
        "unknown-instance",
        "name-as-ip",
        "bad-ip",
        "port-too-big",
        "port-zero",
        "wait-tower-without-bind",
        "wait-tower-negative",
        "port-not-number",
        "bind-port",
        "bind-name",
        "unknown-protocol",
        "bind-twice",
        "ip-address-twice",
    ],
)
def test_refusals(stack: Stack, args: list[str], code: int, message: str) -> None:
    returncode, line = run_error(stack, *args)
    assert returncode == code
    assert line.startswith("supctl: error:")
    assert message in line


def test_bad_token(stack: Stack, tmp_path: Path) -> None:
    token = tmp_path / "bad.token"
    token.write_text("sct_admin_not-a-real-token\n")
    env = dict(stack.env, SUPCTL_TOKEN_FILE=str(token))
    returncode, line = run_error(stack, *do_args(SITE, APP, INSTANCE, "connect", "tcp", "443"), env=env)
    assert returncode == ExitCode.DENIED
    assert "invalid API token" in line
    assert "not-a-real-token" not in line  # a token is never echoed back


def test_missing_token(stack: Stack) -> None:
    env = {k: v for k, v in stack.env.items() if k != "SUPCTL_TOKEN_FILE"}
    returncode, line = run_error(stack, *do_args(SITE, APP, INSTANCE, "connect", "tcp", "443"), env=env)
    assert returncode == ExitCode.DENIED
    assert "no API token" in line


def test_tower_unreachable(stack: Stack) -> None:
    env = dict(stack.env, SUPCTL_HOST=f"wss://127.0.0.1:{free_port()}")
    returncode, line = run_error(stack, *do_args(SITE, APP, INSTANCE, "connect", "tcp", "443"), env=env)
    assert returncode == ExitCode.UNAVAILABLE
    assert "cannot reach the tower" in line and "refused" in line


def test_untrusted_certificate(stack: Stack, tmp_path: Path) -> None:
    # Trust another tower's CA: the real tower's certificate must then be refused.
    other_dir = tmp_path / "other"
    stack.control_tower("init", str(other_dir))
    env = dict(stack.env, SUPCTL_CA_FILE=str(other_dir / "ca.pem"))
    returncode, line = run_error(stack, *do_args(SITE, APP, INSTANCE, "connect", "tcp", "443"), env=env)
    assert returncode == ExitCode.UNAVAILABLE
    assert "certificate" in line and "not trusted" in line


def test_listen_address_in_use(stack: Stack) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        returncode, line = run_error(
            stack, *do_args(SITE, APP, INSTANCE, "connect", "tcp", "443", "--bind", str(port))
        )
    assert returncode == ExitCode.USAGE
    assert "cannot listen" in line


def test_netcat_target_refused(stack: Stack) -> None:
    returncode, line = run_error(stack, *do_args(SITE, APP, INSTANCE, "connect", "tcp", str(free_port())))
    assert returncode == ExitCode.STREAM
    assert "connection refused by 127.0.0.1:" in line


def test_bind_ipv6_and_sigint(stack: Stack) -> None:
    import signal

    forward, port = stack.forward(*do_args(SITE, APP, INSTANCE, "connect", "tcp", "443", "--bind", "[::1]:0"))
    assert forward.log.wait_for(r"Forwarding from (\S+) ->")[1] == f"[::1]:{port}"
    assert forward.stop(signal.SIGINT) == 0
    assert "Traceback" not in forward.log.text()


def test_a_forward_on_every_interface_says_so_and_works(stack: Stack) -> None:
    """``--bind 0.0.0.0:PORT`` exposes the service to the network: one warning line (as
    ssh -g and kubectl --address make it explicit), then the forward serves as usual."""
    _, echo = start_server(stack, "echo")
    proc, port = stack.forward(
        *do_args(SITE, APP, INSTANCE, "connect", "tcp", str(echo), "--bind", "0.0.0.0:0")
    )
    text = " ".join(proc.log.text().split())
    assert (
        "warning: --bind 0.0.0.0:0 is not a loopback address: anyone who can reach it uses this forward"
        in text
    )
    assert echo_roundtrip(port, b"exposed") == b"exposed"
    proc.stop()
    quiet, _ = stack.forward(
        *do_args(SITE, APP, INSTANCE, "connect", "tcp", str(echo), "--bind", "127.0.0.1:0")
    )
    assert "warning" not in quiet.log.text()
    quiet.stop()


def test_json_events_give_scripts_the_port_and_each_connection(stack: Stack) -> None:
    """``connect --bind 0 -o json``: one JSON object per line on stdout, the first with the
    real port; then each connection opened and closed, with its bytes."""
    _, echo = start_server(stack, "echo")
    args = do_args(SITE, APP, INSTANCE, "connect", "tcp", str(echo), "--bind", "0", "-o", "json")
    proc = stack.spawn("supctl", [program("supctl"), *args], stdout=subprocess.PIPE)
    out = Output(proc.popen.stdout)
    listening = json.loads(out.read_line(20))
    assert listening["event"] == "listening" and listening["address"] == "127.0.0.1", listening
    assert echo_roundtrip(listening["port"], b"x" * 1000) == b"x" * 1000
    opened, closed = json.loads(out.read_line()), json.loads(out.read_line())
    assert (opened["event"], opened["connection"]) == ("opened", 1)
    assert {k: closed[k] for k in ("event", "connection", "sent", "received", "result")} == {
        "event": "closed", "connection": 1, "sent": 1000, "received": 1000, "result": "ok"
    }  # fmt: skip
    assert "Forwarding from" not in proc.log.text()  # the human lines stay off
    proc.stop()
    code, line = run_error(stack, *do_args(SITE, APP, INSTANCE, "connect", "tcp", "443", "-o", "json"))
    assert code == ExitCode.USAGE and "-o json needs --bind (in netcat mode stdout carries the data)" in line
