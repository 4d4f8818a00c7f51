"""A small lab of real network namespaces for tests (needs root).

::

    with NetLab() as lab:
        svc = lab.add_ns("svc")
        lan = lab.add_ns("lan")
        lab.veth(svc, "192.0.2.1/24", lan, "192.0.2.11/24")
        server = lab.start_server(lan, "echo", "192.0.2.11:443")
        ...

Everything a lab creates is named ``sct-...`` (namespaces) or ``sctv...``
(interfaces) and is removed on exit, also when the body raises: process groups
are sent SIGTERM, then SIGKILL after a deadline; any process still inside a
lab namespace is killed; veths, namespaces and ``/etc/netns/NAME`` go away.

Labs that are still alive at interpreter exit are cleaned by an ``atexit`` hook.
If the interpreter itself was killed, :func:`sweep_stale` (run by conftest at
session start) removes what was left - but only what belongs to dead owners:
each namespace has an owner file under :data:`OWNER_DIR` naming the creating
process, so two test sessions on one machine never sweep each other.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import os
import secrets
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pyroute2 import netns as pr_netns

T = TypeVar("T")

NS_PREFIX = "sct-"
IF_PREFIX = "sctv"
NETNS_DIR = Path("/run/netns")
ETC_NETNS_DIR = Path("/etc/netns")
OWNER_DIR = Path("/run/supctl-netlab")
SERVERS = Path(__file__).resolve().with_name("servers.py")

#: How long cleanup waits after SIGTERM before SIGKILL.
TERM_GRACE = 3.0

#: Labs not cleaned up yet; the atexit hook cleans whatever is left here.
_LIVE: set[NetLab] = set()


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def list_namespaces() -> list[str]:
    """Names of all named network namespaces (``ip netns list``)."""
    try:
        return sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []


def namespace_pids(ns: str) -> list[int]:
    """Pids of the processes inside namespace ``ns`` (``ip netns pids``)."""
    result = _ip("netns", "pids", ns, check=False)
    return [int(tok) for tok in result.stdout.split() if tok.isdigit()]


def host_links() -> list[str]:
    """Interface names in the host namespace."""
    return sorted(os.listdir("/sys/class/net"))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            state = fh.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _pid_start_time(pid: int) -> str | None:
    """Start time of a process (clock ticks since boot) - tells pid reuse apart."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return None


def _kill_pids(pids: Iterable[int], deadline: float = 5.0) -> None:
    """SIGKILL the given pids and wait (bounded) until they are gone."""
    pids = set(pids) - {os.getpid()}
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    end = time.monotonic() + deadline
    while pids and time.monotonic() < end:
        for pid in list(pids):
            # A zombie counts as gone; reaping our own children is left to their
            # Popen objects, so their return codes stay right.
            if not _pid_alive(pid):
                pids.discard(pid)
        if pids:
            time.sleep(0.01)


def _remove_namespace(ns: str) -> None:
    """Kill whatever is inside ``ns`` and delete it; quiet if already gone."""
    if ns in list_namespaces():
        _kill_pids(namespace_pids(ns))
        _ip("netns", "delete", ns, check=False)
    shutil.rmtree(ETC_NETNS_DIR / ns, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        (OWNER_DIR / ns).unlink()


def sweep_stale() -> list[str]:
    """Remove ``sct-*`` namespaces (and ``sctv*`` host links) left by dead test runs.

    Returns the names of the namespaces removed.  Namespaces whose owner process
    is still alive (another test session) are left alone.
    """
    removed: list[str] = []
    for ns in list_namespaces():
        if ns.startswith(NS_PREFIX) and not _owner_alive(ns):
            _remove_namespace(ns)
            removed.append(ns)
    # /etc/netns dirs and owner files without a namespace.
    for base in (ETC_NETNS_DIR, OWNER_DIR):
        if base.is_dir():
            for entry in base.iterdir():
                if (
                    entry.name.startswith(NS_PREFIX)
                    and entry.name not in list_namespaces()
                    and not _owner_alive(entry.name)
                ):
                    if entry.is_dir():
                        shutil.rmtree(entry, ignore_errors=True)
                    else:
                        entry.unlink(missing_ok=True)
    for link in host_links():
        if link.startswith(IF_PREFIX):
            _ip("link", "delete", link, check=False)
    return removed


def _owner_alive(ns: str) -> bool:
    try:
        pid_text, _, start = (OWNER_DIR / ns).read_text(encoding="ascii").strip().partition(" ")
        pid = int(pid_text)
    except (OSError, ValueError):
        return False
    return _pid_alive(pid) and _pid_start_time(pid) == start


def _write_owner(ns: str) -> None:
    OWNER_DIR.mkdir(parents=True, exist_ok=True)
    pid = os.getpid()
    (OWNER_DIR / ns).write_text(f"{pid} {_pid_start_time(pid)}\n", encoding="ascii")


@dataclass
class ServerProc:
    """A tests/servers.py process started by :meth:`NetLab.start_server`."""

    proc: subprocess.Popen[bytes]
    ns: str | None
    host: str
    port: int

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port


class NetLab:
    """Network namespaces, veths, routes and processes that vanish on exit."""

    def __init__(self) -> None:
        self.namespaces: list[str] = []
        self.veths: list[tuple[str, str]] = []  # (namespace, interface) of one end
        self.procs: list[subprocess.Popen[Any]] = []
        self.etc_dirs: list[Path] = []
        self._lock = threading.Lock()
        self._closed = False
        _LIVE.add(self)

    def __enter__(self) -> NetLab:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cleanup()

    # -- building ---------------------------------------------------------

    def add_ns(self, prefix: str = "ns") -> str:
        """Create a namespace ``sct-<prefix>-<random6>`` with ``lo`` up; return its name."""
        self._check_open()
        for _ in range(10):
            name = f"{NS_PREFIX}{prefix}-{secrets.token_hex(3)}"
            if not (NETNS_DIR / name).exists():
                break
        else:
            raise RuntimeError("cannot find a free namespace name")
        # Owner file first: a sweep in another session must never see it ownerless.
        _write_owner(name)
        self.namespaces.append(name)
        _ip("netns", "add", name)
        _ip("-n", name, "link", "set", "lo", "up")
        return name

    def veth(self, ns_a: str, addr_a_cidr: str | None, ns_b: str, addr_b_cidr: str | None) -> tuple[str, str]:
        """Join two namespaces with a veth pair, set addresses (if given), bring both up.

        Returns the interface names (end in ``ns_a``, end in ``ns_b``).  The pair
        is created directly inside the namespaces; it never appears on the host.
        """
        self._check_open()
        tag = secrets.token_hex(3)
        if_a, if_b = f"{IF_PREFIX}{tag}a", f"{IF_PREFIX}{tag}b"  # 11 chars <= 15
        _ip("link", "add", if_a, "netns", ns_a, "type", "veth", "peer", "name", if_b, "netns", ns_b)
        self.veths.append((ns_a, if_a))
        for ns, ifname, cidr in ((ns_a, if_a, addr_a_cidr), (ns_b, if_b, addr_b_cidr)):
            if cidr is not None:
                self.add_address(ns, ifname, cidr)
            _ip("-n", ns, "link", "set", ifname, "up")
        return if_a, if_b

    def add_address(self, ns: str, ifname: str, cidr: str) -> None:
        """Add an address; IPv6 addresses skip duplicate address detection (usable at once)."""
        extra = ["nodad"] if ipaddress.ip_interface(cidr).version == 6 else []
        _ip("-n", ns, "addr", "add", cidr, "dev", ifname, *extra)

    def add_route(self, ns: str, cidr: str, via: str) -> None:
        """``ip route add CIDR via VIA`` in ``ns`` (``cidr`` may be ``default``)."""
        self._check_open()
        family = "-6" if ":" in via else "-4"
        _ip("-n", ns, family, "route", "add", cidr, "via", via)

    def sysctl(self, ns: str, key: str, value: str) -> None:
        """Set a sysctl inside ``ns``, e.g. ``net.ipv4.ip_forward=1`` on a router."""
        self.check_call(ns, ["sysctl", "-q", "-w", f"{key}={value}"])

    def write_netns_etc(self, ns: str, resolv_conf_text: str) -> Path:
        """Write ``/etc/netns/NS/resolv.conf`` (what ``ip netns exec`` shows as /etc/resolv.conf)."""
        self._check_open()
        directory = ETC_NETNS_DIR / ns
        directory.mkdir(parents=True, exist_ok=True)
        if directory not in self.etc_dirs:
            self.etc_dirs.append(directory)
        path = directory / "resolv.conf"
        path.write_text(resolv_conf_text, encoding="utf-8")
        return path

    # -- processes --------------------------------------------------------

    def run(self, ns: str | None, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside ``ns`` (``None``: on the host) in a new session.

        The process (and its process group) is killed on cleanup.
        """
        self._check_open()
        full = ["ip", "netns", "exec", ns, *argv] if ns is not None else list(argv)
        popen_kwargs.setdefault("start_new_session", True)
        if not popen_kwargs["start_new_session"]:
            raise ValueError("NetLab.run needs start_new_session=True to kill the process group")
        proc: subprocess.Popen[Any] = subprocess.Popen(full, **popen_kwargs)
        with self._lock:
            self.procs.append(proc)
        return proc

    def check_call(self, ns: str | None, argv: Sequence[str], timeout: float = 30.0) -> str:
        """Run ``argv`` in ``ns`` to completion; return stdout, raise on failure."""
        full = ["ip", "netns", "exec", ns, *argv] if ns is not None else list(argv)
        result = subprocess.run(full, capture_output=True, text=True, timeout=timeout, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(full)} failed ({result.returncode}): {result.stderr.strip()}")
        return result.stdout

    def start_server(
        self,
        ns: str | None,
        mode: str,
        listen: str = "127.0.0.1:0",
        *args: str,
        deadline: float = 10.0,
    ) -> ServerProc:
        """Start ``tests/servers.py MODE --listen LISTEN ARGS...`` and wait for its READY line."""
        proc = self.run(
            ns,
            [sys.executable, "-u", str(SERVERS), mode, "--listen", listen, *args],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        assert proc.stdout is not None
        line = _read_line(proc, deadline)
        if not line.startswith("READY "):
            raise RuntimeError(
                f"server {mode} at {listen} in {ns} did not start (rc={proc.poll()}): {line!r}"
            )
        host, _, port = line.split()[1].rpartition(":")
        return ServerProc(proc, ns, host.strip("[]"), int(port))

    # -- teardown ---------------------------------------------------------

    def cleanup(self) -> None:
        """Remove everything; safe to call twice, never raises for already-gone things."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            procs = list(self.procs)
        try:
            _stop_process_groups(procs)
            for ns, ifname in reversed(self.veths):
                if ns in list_namespaces():
                    _ip("-n", ns, "link", "delete", ifname, check=False)
            for ns in reversed(self.namespaces):
                _remove_namespace(ns)
            for directory in self.etc_dirs:
                shutil.rmtree(directory, ignore_errors=True)
            for proc in procs:
                for stream in (proc.stdin, proc.stdout, proc.stderr):
                    if stream is not None:
                        with contextlib.suppress(OSError):
                            stream.close()
        finally:
            _LIVE.discard(self)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this NetLab has been cleaned up")


def _read_line(proc: subprocess.Popen[bytes], deadline: float) -> str:
    """One line from proc.stdout, waiting at most ``deadline`` seconds."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = b""
    end = time.monotonic() + deadline
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while b"\n" not in buf:
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no line from {proc.args!r} within {deadline}s")
            if not sel.select(left):
                continue
            # Read byte by byte: nothing after the line may be consumed unseen.
            chunk = os.read(fd, 1)
            if not chunk:
                break
            buf += chunk
    return buf.decode(errors="replace").strip()


def _live_pgids() -> set[int]:
    """Process groups that have at least one live (non-zombie) member."""
    pgids: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii") as fh:
                fields = fh.read().rpartition(")")[2].split()
        except OSError:
            continue
        # fields[0] is the state, fields[2] the process group.
        if len(fields) > 2 and fields[0] != "Z":
            pgids.add(int(fields[2]))
    return pgids


def _stop_process_groups(procs: list[subprocess.Popen[Any]], grace: float = TERM_GRACE) -> None:
    """SIGTERM each process group, SIGKILL what is left after ``grace``, reap."""
    groups = {p.pid for p in procs}  # start_new_session: group id == leader pid
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGTERM)

    def remaining() -> set[int]:
        for proc in procs:
            proc.poll()  # reap leaders so they stop counting
        return groups & _live_pgids()

    end = time.monotonic() + grace
    while remaining() and time.monotonic() < end:
        time.sleep(0.01)
    # A group id cannot be reused while the group has live members, so this
    # SIGKILL reaches only what we started.
    for pgid in remaining():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5.0)
    end = time.monotonic() + 5.0
    while remaining() and time.monotonic() < end:
        time.sleep(0.01)


# -- probes -------------------------------------------------------------------


def call_in_netns(ns: str | None, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``fn(*args, **kwargs)`` in a fresh thread inside ``ns`` and return its result.

    The calling thread never changes namespace; the helper thread dies afterwards.
    """
    if ns is None:
        return fn(*args, **kwargs)
    outcome: dict[str, Any] = {}

    def body() -> None:
        try:
            pr_netns.setns(str(NETNS_DIR / ns), flags=0)
            outcome["value"] = fn(*args, **kwargs)
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=body, name=f"in-{ns}", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]  # type: ignore[no-any-return]


def try_connect(host: str, port: int, netns: str | None = None, timeout: float = 1.0) -> OSError | None:
    """Attempt one TCP connect; None on success, else the error (e.g. ConnectionRefusedError)."""

    def attempt() -> OSError | None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            try:
                sock.connect((host, port))
            except OSError as exc:
                return exc
        return None

    return call_in_netns(netns, attempt)


def wait_for_port(host: str, port: int, netns: str | None = None, deadline: float = 10.0) -> None:
    """Poll until a TCP connect to host:port (from ``netns``) succeeds, or raise TimeoutError."""

    def poll() -> None:
        end = time.monotonic() + deadline
        last: OSError | None = None
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"{host}:{port} not accepting in {netns or 'host'} after {deadline}s: {last}"
                )
            last = try_connect(host, port, None, timeout=min(1.0, left))
            if last is None:
                return
            time.sleep(0.02)

    call_in_netns(netns, poll)


def wait_until(
    predicate: Callable[[], T], deadline: float = 10.0, interval: float = 0.02, what: str = ""
) -> T:
    """Poll ``predicate`` until it returns something truthy (returned); TimeoutError after ``deadline``."""
    end = time.monotonic() + deadline
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= end:
            raise TimeoutError(
                f"condition {what or getattr(predicate, '__name__', predicate)} not met in {deadline}s"
            )
        time.sleep(interval)


# -- crash safety --------------------------------------------------------------


@atexit.register
def _cleanup_live_labs() -> None:
    for lab in list(_LIVE):
        with contextlib.suppress(Exception):
            lab.cleanup()


def is_root() -> bool:
    return os.geteuid() == 0


__all__ = [
    "NetLab",
    "ServerProc",
    "call_in_netns",
    "host_links",
    "is_root",
    "list_namespaces",
    "namespace_pids",
    "sweep_stale",
    "try_connect",
    "wait_for_port",
    "wait_until",
]
