"""``supctl ... connect`` end to end: real tower, enforcer, TLS and network namespaces."""

from __future__ import annotations

import hashlib
import json
import shlex
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_support import wait_until
from netlab import NetLab, try_connect, wait_for_port
from servers import pattern, pattern_sha256, send_pattern_and_read
from stack import Stack, do_args, program

pytestmark = pytest.mark.root

APP, INSTANCE, SITE = "popcorn-controller", "popcorn-controller-service-1", "stockholm-sergel"
CONCURRENT = 20
SIZE = 20 * 1000 * 1000


@pytest.fixture
def lab(netlab: NetLab) -> dict[str, str]:
    """A service namespace, and a "lan" namespace behind it holding a remote host."""
    svc = netlab.add_ns("svc")
    lan = netlab.add_ns("lan")
    netlab.veth(svc, "192.0.2.1/24", lan, "192.0.2.11/24")
    return {"svc": svc, "lan": lan}


@pytest.fixture
def stack(tmp_path: Path, lab: dict[str, str]) -> Iterator[Stack]:
    with Stack(tmp_path) as stack:
        stack.start_tower()
        stack.add_site(
            SITE,
            f'[applications.{APP}.service-instances.{INSTANCE}]\nnetns = "{lab["svc"]}"\n',
        )
        yield stack


def connect_args(*rest: str) -> list[str]:
    return do_args(SITE, APP, INSTANCE, "connect", "tcp", *rest)


def exchange(port: int, seed: int, size: int, results: dict[int, tuple[str, int]]) -> None:
    results[seed] = send_pattern_and_read(port, seed, size)


def test_service_namespace_is_reached_only_through_connect(
    netlab: NetLab, lab: dict[str, str], stack: Stack, tmp_path: Path
) -> None:
    report = tmp_path / "server.jsonl"
    server = netlab.start_server(
        lab["svc"],
        "sink-source",
        "127.0.0.1:443",
        "--seed",
        "99",
        "--size",
        str(SIZE),
        "--report",
        str(report),
    )
    assert server.port == 443
    # Nothing listens on 443 in the host namespace: the service is not reachable directly.
    assert isinstance(try_connect("127.0.0.1", 443), ConnectionRefusedError)

    forward, port = stack.forward(*connect_args("443", "--bind", "0"))
    results: dict[int, tuple[str, int]] = {}
    threads = [
        threading.Thread(target=exchange, args=(port, seed, SIZE, results)) for seed in range(CONCURRENT)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)

    expected_down = pattern_sha256(99, SIZE)
    assert sorted(results) == list(range(CONCURRENT))
    for digest, received in results.values():
        assert (digest, received) == (expected_down, SIZE)
    # What the server received, per connection, is exactly what each client sent.  The
    # server writes each record after closing its socket: the client may be done first.
    wait_until(lambda: len(report.read_text().splitlines()) >= CONCURRENT, 30, "every server record")
    records = [json.loads(line) for line in report.read_text().splitlines()]
    assert sorted(r["sha256"] for r in records) == sorted(
        pattern_sha256(seed, SIZE) for seed in range(CONCURRENT)
    )
    assert all(r["error"] is None for r in records)
    assert forward.stop() == 0
    assert forward.log.count(r"connection \d+ closed") == CONCURRENT


def test_ip_address_reaches_a_remote_host_from_inside_the_instance(
    netlab: NetLab, lab: dict[str, str], stack: Stack
) -> None:
    netlab.start_server(lab["lan"], "echo", "192.0.2.11:443")
    # The host has no route into the lab's 192.0.2.0/24.
    assert try_connect("192.0.2.11", 443, timeout=0.5) is not None

    forward, port = stack.forward(*connect_args("443", "--ip-address", "192.0.2.11", "--bind", "0"))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"ping through the service instance\n")
        sock.shutdown(socket.SHUT_WR)
        assert sock.makefile("rb").read() == b"ping through the service instance\n"
    assert forward.stop() == 0


def test_netcat_mode_honours_half_close(netlab: NetLab, lab: dict[str, str], stack: Stack) -> None:
    netlab.start_server(lab["svc"], "answer-after-eof", "127.0.0.1:443")
    payload = b"".join(pattern(5, 3_000_000))
    result = stack.supctl(*connect_args("443"), input=payload)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == hashlib.sha256(payload).hexdigest().encode() + b"\n"
    assert result.stderr == b""


def test_target_closed_fails_that_connection_only(netlab: NetLab, lab: dict[str, str], stack: Stack) -> None:
    forward, port = stack.forward(*connect_args("443", "--bind", "0"))
    # Reset at once: nothing listens in the namespace.
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as sock,
        pytest.raises(ConnectionResetError),
    ):
        sock.recv(10)
    line = forward.log.wait_for(r"connection 1 failed: (.*)")
    assert "refused" in line[1] and "127.0.0.1:443" in line[1]

    netlab.start_server(lab["svc"], "echo", "127.0.0.1:443")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"now it works")
        sock.shutdown(socket.SHUT_WR)
        assert sock.makefile("rb").read() == b"now it works"
    assert forward.popen.poll() is None  # the listener kept running throughout
    assert forward.stop() == 0


def test_ssh_proxy_command_into_the_service_namespace(
    netlab: NetLab, lab: dict[str, str], stack: Stack, tmp_path: Path
) -> None:
    keys = tmp_path / "ssh"
    keys.mkdir(mode=0o700)
    for name in ("host", "client"):
        netlab.check_call(None, ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / name)])
    (keys / "authorized_keys").write_text((keys / "client.pub").read_text())
    config = keys / "sshd_config"
    config.write_text(
        f"ListenAddress 127.0.0.1\nPort 22\nHostKey {keys / 'host'}\nAuthorizedKeysFile {keys / 'authorized_keys'}\n"
        "PermitRootLogin yes\nStrictModes no\nUsePAM no\nPidFile none\nPasswordAuthentication no\n"
    )
    Path("/run/sshd").mkdir(exist_ok=True)
    netlab.run(lab["svc"], ["/usr/sbin/sshd", "-D", "-e", "-f", str(config)])
    wait_for_port("127.0.0.1", 22, netns=lab["svc"])

    proxy = shlex.join([program("supctl"), *connect_args("22")])
    result = netlab.check_call(
        None,
        [
            "env",
            *[f"{k}={v}" for k, v in stack.env.items() if k.startswith("SUPCTL_")],
            "ssh",
            "-i",
            str(keys / "client"),
            "-o",
            f"ProxyCommand={proxy}",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "LogLevel=ERROR",
            "root@popcorn-controller-service-1",
            "echo hello from $(cat /proc/sys/kernel/hostname) && ip -brief addr",
        ],
        timeout=60,
    )
    assert result.startswith("hello from")
    assert "192.0.2.1/24" in result  # the command ran inside the service instance's namespace
