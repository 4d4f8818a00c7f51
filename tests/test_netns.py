"""NamespaceSockets against real network namespaces, and the NetLab's own hygiene."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import netlab as nl
import pytest
from netlab import NetLab, try_connect, wait_until
from servers import pattern, pattern_sha256

from supctl.bridge import disarm_reset
from supctl.enforcer.netns import NamespaceSockets, namespace_exists
from supctl.errors import StreamError
from supctl.protocol.frames import ErrorCode

pytestmark = pytest.mark.root

T = TypeVar("T")


def run_with_sockets(body: Callable[[NamespaceSockets], Awaitable[T]]) -> T:
    """Run ``body(sockets)`` on a fresh event loop and close the sockets afterwards."""

    async def main() -> T:
        sockets = NamespaceSockets()
        try:
            return await body(sockets)
        finally:
            sockets.close()

    return asyncio.run(main())


async def echo_roundtrip(sock: socket.socket, payload: bytes) -> bytes:
    """Send payload, half-close, read everything the peer sends until EOF."""
    loop = asyncio.get_running_loop()
    received = bytearray()

    async def reader() -> None:
        while data := await loop.sock_recv(sock, 256 * 1024):
            received.extend(data)

    async def writer() -> None:
        await loop.sock_sendall(sock, payload)
        sock.shutdown(socket.SHUT_WR)

    with sock:
        await asyncio.gather(reader(), writer())
        disarm_reset(sock)  # armed by connect (SO_LINGER 0): a clean end closes with FIN
    return bytes(received)


async def expect_error(
    sockets: NamespaceSockets, netns: str | None, host: str, port: int, timeout: float = 5.0
) -> StreamError:
    with pytest.raises(StreamError) as info:
        sock = await sockets.connect(netns, host, port, timeout)
        sock.close()
    return info.value


def netns_of_current_thread() -> str:
    return os.readlink("/proc/thread-self/ns/net")


# -- reaching the service's own loopback --------------------------------------------


def test_loopback_inside_namespace_is_the_service(netlab: NetLab) -> None:
    svc = netlab.add_ns("svc")
    netlab.start_server(svc, "echo", "127.0.0.1:443")
    assert namespace_exists(svc)

    # Nothing listens on the host's 127.0.0.1:443.
    assert isinstance(try_connect("127.0.0.1", 443), ConnectionRefusedError)

    loop_ns_before = netns_of_current_thread()

    async def body(sockets: NamespaceSockets) -> None:
        sock = await sockets.connect(svc, "127.0.0.1", 443, 5.0)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert not sock.getblocking()
        assert await echo_roundtrip(sock, b"hello from the host") == b"hello from the host"
        # A second connection reuses the one worker thread of this namespace.
        sock = await sockets.connect(svc, "127.0.0.1", 443, 5.0)
        assert await echo_roundtrip(sock, b"again") == b"again"
        assert sockets.namespaces() == [svc]
        workers = [t for t in threading.enumerate() if t.name.startswith(f"netns-{svc}")]
        assert len(workers) == 1
        # The event loop thread never moved.
        assert netns_of_current_thread() == loop_ns_before

    run_with_sockets(body)
    assert netns_of_current_thread() == loop_ns_before


def test_host_network_when_netns_is_none(netlab: NetLab) -> None:
    server = netlab.start_server(None, "echo", "127.0.0.1:0")

    async def body(sockets: NamespaceSockets) -> None:
        sock = await sockets.connect(None, "127.0.0.1", server.port, 5.0)
        assert await echo_roundtrip(sock, b"host") == b"host"
        assert sockets.namespaces() == []

    run_with_sockets(body)


# -- reaching other hosts through the namespace's routes --------------------------


def test_remote_host_through_the_service_namespace(netlab: NetLab) -> None:
    svc = netlab.add_ns("svc")
    lan = netlab.add_ns("lan")
    netlab.veth(svc, "192.0.2.1/24", lan, "192.0.2.11/24")
    netlab.start_server(lan, "echo", "192.0.2.11:443")

    assert try_connect("192.0.2.11", 443, netns=svc) is None
    assert try_connect("192.0.2.11", 443, timeout=0.5) is not None  # not from the host

    async def body(sockets: NamespaceSockets) -> None:
        sock = await sockets.connect(svc, "192.0.2.11", 443, 5.0)
        assert sock.getpeername() == ("192.0.2.11", 443)
        assert await echo_roundtrip(sock, b"x" * 100_000) == b"x" * 100_000
        err = await expect_error(sockets, None, "192.0.2.11", 443, timeout=0.5)
        assert err.code in (ErrorCode.UNREACHABLE, ErrorCode.TIMEOUT)

    run_with_sockets(body)


def test_ipv6_in_the_namespace_and_scoped_targets_refused(netlab: NetLab) -> None:
    svc = netlab.add_ns("svc")
    lan = netlab.add_ns("lan")
    netlab.veth(svc, "2001:db8::1/64", lan, "2001:db8::11/64")
    # A second link for link-local addresses (explicit, no DAD wait).
    if_a, if_b = netlab.veth(svc, None, lan, None)
    netlab.add_address(svc, if_a, "fe80::1/64")
    netlab.add_address(lan, if_b, "fe80::11/64")
    assert if_a not in nl.host_links()
    netlab.start_server(lan, "echo", "[::]:443")
    netlab.start_server(svc, "echo", "127.0.0.1:444")

    async def body(sockets: NamespaceSockets) -> None:
        sock = await sockets.connect(svc, "2001:db8::11", 443, 5.0)
        assert sock.family == socket.AF_INET6
        assert await echo_roundtrip(sock, b"v6") == b"v6"
        # A scope would pick an interface of the site, which no policy judges: the
        # target rules (supctl.protocol.targets) refuse it here as everywhere else,
        # even for an interface that exists in the namespace.
        for target in (f"fe80::11%{if_a}", "fe80::11%nosuchif0", "fe80::11%1"):
            err = await expect_error(sockets, svc, target, 443)
            assert err.code == ErrorCode.PROTOCOL
            assert str(err) == f"target {target!r}: a scoped IPv6 address (with %) is not accepted"
        # Mapped spellings are dialled as the canonical address, not as IPv6.
        sock = await sockets.connect(svc, "::ffff:127.0.0.1", 444, 5.0)
        assert sock.family == socket.AF_INET
        assert await echo_roundtrip(sock, b"v4") == b"v4"

    run_with_sockets(body)


def test_bulk_both_directions_through_namespace(netlab: NetLab, tmp_path: Path) -> None:
    """Several concurrent connections moving MBs both ways, checked at both ends."""
    svc = netlab.add_ns("svc")
    report = tmp_path / "report.jsonl"
    size, conns = 4_000_000, 6
    netlab.start_server(
        svc, "sink-source", "127.0.0.1:443", "--seed", "7", "--size", str(size), "--report", str(report)
    )

    async def one(sockets: NamespaceSockets, i: int) -> None:
        loop = asyncio.get_running_loop()
        sock = await sockets.connect(svc, "127.0.0.1", 443, 5.0)
        digest = hashlib.sha256()
        got = 0

        async def reader() -> None:
            nonlocal got
            while data := await loop.sock_recv(sock, 256 * 1024):
                digest.update(data)
                got += len(data)

        async def writer() -> None:
            for chunk in pattern(100 + i, size):
                await loop.sock_sendall(sock, chunk)
            sock.shutdown(socket.SHUT_WR)

        with sock:
            await asyncio.gather(reader(), writer())
            # connect armed it (SO_LINGER 0): closed armed, it would reset the server
            # while our last bytes are still unacknowledged.  Both FINs done: disarm.
            disarm_reset(sock)
        assert got == size
        assert digest.hexdigest() == pattern_sha256(7, size)

    async def body(sockets: NamespaceSockets) -> None:
        await asyncio.gather(*(one(sockets, i) for i in range(conns)))

    run_with_sockets(body)

    def all_reported() -> list[dict[str, Any]]:
        if not report.exists():
            return []
        lines = [json.loads(line) for line in report.read_text().splitlines()]
        return lines if len(lines) == conns else []

    records = wait_until(all_reported, deadline=10.0, what="server reports")
    assert all(r["error"] is None and r["received"] == size and r["sent"] == size for r in records)
    assert sorted(r["sha256"] for r in records) == sorted(pattern_sha256(100 + i, size) for i in range(conns))


# -- error mapping -----------------------------------------------------------------


def test_refused(netlab: NetLab) -> None:
    svc = netlab.add_ns("svc")

    async def body(sockets: NamespaceSockets) -> None:
        err = await expect_error(sockets, svc, "127.0.0.1", 443)
        assert err.code == ErrorCode.REFUSED
        assert str(err) == f"connection refused by 127.0.0.1:443 in network namespace {svc}"
        err = await expect_error(sockets, svc, "::1", 443)
        assert err.code == ErrorCode.REFUSED
        assert str(err) == f"connection refused by [::1]:443 in network namespace {svc}"

    run_with_sockets(body)


def test_unreachable_and_timeout(netlab: NetLab) -> None:
    svc = netlab.add_ns("svc")
    lan = netlab.add_ns("lan")
    if_svc, _ = netlab.veth(svc, "192.0.2.1/24", lan, "192.0.2.11/24")
    netlab.check_call(None, ["ip", "-n", svc, "route", "add", "unreachable", "203.0.113.0/24"])
    # A neighbour that exists on paper but drops everything: SYNs go unanswered.
    netlab.check_call(
        None,
        [
            "ip",
            "-n",
            svc,
            "neigh",
            "add",
            "192.0.2.99",
            "lladdr",
            "02:00:00:00:00:99",
            "dev",
            if_svc,
            "nud",
            "permanent",
        ],
    )

    async def body(sockets: NamespaceSockets) -> None:
        err = await expect_error(sockets, svc, "198.51.100.1", 443)  # no route at all
        assert err.code == ErrorCode.UNREACHABLE
        assert "198.51.100.1:443" in str(err) and svc in str(err)
        err = await expect_error(sockets, svc, "203.0.113.5", 443)  # unreachable route
        assert err.code == ErrorCode.UNREACHABLE
        err = await expect_error(sockets, svc, "192.0.2.99", 443, timeout=0.3)
        assert err.code == ErrorCode.TIMEOUT
        assert str(err) == f"connection to 192.0.2.99:443 in network namespace {svc} timed out"
        assert "\n" not in str(err)

    run_with_sockets(body)


def test_missing_and_invalid_namespace() -> None:
    async def body(sockets: NamespaceSockets) -> None:
        err = await expect_error(sockets, "sct-nope-000000", "127.0.0.1", 443)
        assert err.code == ErrorCode.NOT_FOUND
        assert str(err) == "network namespace sct-nope-000000 does not exist"
        for bad in ("../etc", "", "a/b"):
            err = await expect_error(sockets, bad, "127.0.0.1", 443)
            assert err.code == ErrorCode.NOT_FOUND
        err = await expect_error(sockets, None, "localhost", 443)
        assert err.code == ErrorCode.PROTOCOL
        assert sockets.namespaces() == []

    assert not namespace_exists("sct-nope-000000")
    assert not namespace_exists("..")
    run_with_sockets(body)


def test_namespace_deleted_and_recreated_under_same_name(netlab: NetLab) -> None:
    svc = netlab.add_ns("svc")
    netlab.start_server(svc, "echo", "127.0.0.1:443")

    async def body(sockets: NamespaceSockets) -> None:
        sock = await sockets.connect(svc, "127.0.0.1", 443, 5.0)
        assert await echo_roundtrip(sock, b"1") == b"1"
        # The server keeps the old namespace alive; only the name goes.
        subprocess.run(["ip", "netns", "delete", svc], check=True)
        err = await expect_error(sockets, svc, "127.0.0.1", 443)
        assert err.code == ErrorCode.NOT_FOUND
        assert sockets.namespaces() == []
        # A new, empty namespace of the same name: nothing listens there.
        subprocess.run(["ip", "netns", "add", svc], check=True)
        subprocess.run(["ip", "-n", svc, "link", "set", "lo", "up"], check=True)
        err = await expect_error(sockets, svc, "127.0.0.1", 443)
        assert err.code == ErrorCode.REFUSED
        # Holding a worker and then recreating is detected too.
        subprocess.run(["ip", "netns", "delete", svc], check=True)
        subprocess.run(["ip", "netns", "add", svc], check=True)
        subprocess.run(["ip", "-n", svc, "link", "set", "lo", "up"], check=True)
        netlab.start_server(svc, "echo", "127.0.0.1:443")
        sock = await sockets.connect(svc, "127.0.0.1", 443, 5.0)
        assert await echo_roundtrip(sock, b"2") == b"2"

    run_with_sockets(body)


def test_close_stops_workers_and_refuses_new_connects(netlab: NetLab) -> None:
    svc = netlab.add_ns("svc")
    netlab.start_server(svc, "echo", "127.0.0.1:443")

    async def body() -> None:
        sockets = NamespaceSockets()
        (await sockets.connect(svc, "127.0.0.1", 443, 5.0)).close()
        sockets.close()
        assert not [t for t in threading.enumerate() if t.name.startswith(f"netns-{svc}")]
        err = await expect_error(sockets, svc, "127.0.0.1", 443)
        assert err.code == ErrorCode.INTERNAL
        sockets.close()  # idempotent

    asyncio.run(body())


# -- the lab cleans up after itself ------------------------------------------------


@dataclass
class LabState:
    namespaces: list[str]
    links: list[str]
    pids: list[int]
    groups: list[int]
    procs: list[subprocess.Popen[Any]]


def _build_lab(lab: NetLab) -> LabState:
    svc = lab.add_ns("svc")
    lan = lab.add_ns("lan")
    if_a, if_b = lab.veth(svc, "192.0.2.1/24", lan, "192.0.2.11/24")
    server = lab.start_server(lan, "echo", "192.0.2.11:443")
    lab.write_netns_etc(svc, "nameserver 192.0.2.53\n")
    assert "192.0.2.53" in lab.check_call(svc, ["cat", "/etc/resolv.conf"])
    # A process that escapes its process group: only `ip netns pids` finds it.
    lab.check_call(svc, ["setsid", "-f", "sh", "-c", "exec sleep 1000 </dev/null >/dev/null 2>&1"])
    escaped = wait_until(lambda: nl.namespace_pids(svc), what="escaped sleep")
    # A process in the host, with a child in the same group.
    host_proc = lab.run(None, ["sh", "-c", "sleep 1000 & wait"])
    return LabState(
        namespaces=[svc, lan],
        links=[if_a, if_b],
        pids=[server.proc.pid, host_proc.pid, *escaped],
        groups=[server.proc.pid, host_proc.pid],
        procs=[server.proc, host_proc],
    )


def _assert_all_gone(state: LabState) -> None:
    names = set(nl.list_namespaces())
    for ns in state.namespaces:
        assert ns not in names
        assert not Path("/etc/netns", ns).exists()
        assert not (nl.OWNER_DIR / ns).exists()
    links = set(nl.host_links())
    assert not links & set(state.links)
    for proc in state.procs:
        assert proc.returncode is not None
    for pid in state.pids:
        assert not nl._pid_alive(pid), pid
    for pgid in state.groups:
        assert pgid not in nl._live_pgids()


def test_netlab_cleans_up_everything() -> None:
    nl_lab = NetLab()
    with nl_lab as lab:
        state = _build_lab(lab)
        assert set(state.namespaces) <= set(nl.list_namespaces())
    _assert_all_gone(state)
    assert nl_lab not in nl._LIVE
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    for ns in state.namespaces:
        assert ns not in out


def test_netlab_cleans_up_when_the_body_raises() -> None:
    states: list[LabState] = []
    with pytest.raises(RuntimeError, match="boom"), NetLab() as lab:
        states.append(_build_lab(lab))
        raise RuntimeError("boom")
    _assert_all_gone(states[0])


def test_netlab_atexit_cleans_up_a_crashed_session(tmp_path: Path) -> None:
    """A python process that leaves a lab open still cleans it at exit."""
    script = tmp_path / "crash.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "import netlab\n"
        "lab = netlab.NetLab()\n"
        "ns = lab.add_ns('crash')\n"
        "lab.start_server(ns, 'echo', '127.0.0.1:0')\n"
        "print(ns, flush=True)\n"
        "raise SystemExit(3)\n"
    )
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 3, result.stderr
    ns = result.stdout.strip()
    assert ns.startswith("sct-crash-")
    assert ns not in nl.list_namespaces()


def test_sweep_stale_removes_only_dead_owners_leftovers() -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = "sct-stale-" + os.urandom(3).hex()
    mine = "sct-mine-" + os.urandom(3).hex()
    nl.OWNER_DIR.mkdir(parents=True, exist_ok=True)
    try:
        (nl.OWNER_DIR / stale).write_text(f"{dead.pid} 1\n")
        subprocess.run(["ip", "netns", "add", stale], check=True)
        nl._write_owner(mine)
        subprocess.run(["ip", "netns", "add", mine], check=True)
        escaped = subprocess.Popen(["ip", "netns", "exec", stale, "sleep", "1000"], start_new_session=True)
        wait_until(lambda: nl.namespace_pids(stale), what="sleep in stale namespace")

        removed = nl.sweep_stale()

        assert stale in removed
        assert stale not in nl.list_namespaces()
        assert mine in nl.list_namespaces()
        assert escaped.wait(timeout=5) != 0
    finally:
        for ns in (stale, mine):
            nl._remove_namespace(ns)
    assert mine not in nl.list_namespaces()
