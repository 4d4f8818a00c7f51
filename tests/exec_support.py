"""Helpers for the exec end-to-end tests (tests/test_exec_e2e.py, tests/test_seed_story.py).

* :class:`Output` reads a child's pipe with deadlines (a line, or everything,
  hashed as it arrives), never blocking the test for ever;
* :func:`start_exec` runs ``supctl ... exec`` as a Stack-owned process;
* :func:`show_instances` and :func:`container_state` read ``supctl show`` as JSON;
* :func:`namespace_processes` lists what runs inside a namespace (pid, argv);
* :func:`start_dnsmasq` / :func:`wait_for_dns` run a real DNS server in a namespace
  and wait until it answers.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import selectors
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from netlab import NetLab, namespace_pids
from stack import LogFile, Proc, Stack, do_args, program

DNSMASQ = "/usr/sbin/dnsmasq"
NSLOOKUP = "nslookup"


def toml_str(text: str) -> str:
    """A TOML basic string (JSON's escaping is valid TOML for these texts)."""
    return json.dumps(text)


def exec_args(site: str, app: str, instance: str, container: str, command: str) -> list[str]:
    return do_args(site, app, instance, "containers", container, "exec", command)


class Output:
    """One readable pipe of a child, read with deadlines."""

    def __init__(self, stream: IO[bytes] | None) -> None:
        assert stream is not None
        self.fd = stream.fileno()
        self.buffer = b""
        self.eof = False

    def _fill(self, deadline_at: float, size: int = 1 << 20) -> bool:
        """Read once (waiting until ``deadline_at``); False on timeout."""
        left = deadline_at - time.monotonic()
        if left <= 0:
            return False
        with selectors.DefaultSelector() as sel:
            sel.register(self.fd, selectors.EVENT_READ)
            if not sel.select(left):
                return False
        chunk = os.read(self.fd, size)
        if not chunk:
            self.eof = True
        self.buffer += chunk
        return True

    def read_line(self, deadline: float = 10.0) -> bytes:
        """The next line (with its newline); AssertionError after ``deadline`` s or at EOF."""
        end = time.monotonic() + deadline
        while b"\n" not in self.buffer:
            assert not self.eof, f"EOF before a full line: {self.buffer!r}"
            assert self._fill(end), f"no line within {deadline} s (have {self.buffer[-200:]!r})"
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line + b"\n"

    def read(self, size: int, deadline: float = 10.0) -> bytes:
        """Up to ``size`` bytes, at least one unless at EOF."""
        end = time.monotonic() + deadline
        while not self.buffer and not self.eof:
            assert self._fill(end, size), f"nothing to read within {deadline} s"
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def drain(self, deadline: float = 60.0, digest: hashlib._Hash | None = None) -> tuple[str, int]:
        """Read until EOF, hashing: (sha256 hex, length) of everything not read yet
        (the hex is of ``digest`` fed on with it, when given)."""
        end = time.monotonic() + deadline
        digest = digest or hashlib.sha256()
        digest.update(self.buffer)
        total = len(self.buffer)
        self.buffer = b""
        while not self.eof:
            assert self._fill(end), f"no EOF within {deadline} s ({total} bytes read)"
            digest.update(self.buffer)
            total += len(self.buffer)
            self.buffer = b""
        return digest.hexdigest(), total


#: supctl processes started by :func:`start_exec` and not yet ended by :func:`end_execs`.
_STARTED: list[Proc] = []


def start_exec(stack: Stack, args: Sequence[str], stdin: Any = subprocess.DEVNULL) -> tuple[Proc, Output]:
    """Start ``supctl ARGS`` with stdout piped (its stderr goes to its log file)."""
    proc = stack.spawn("supctl-exec", [program("supctl"), *args], stdin=stdin, stdout=subprocess.PIPE)
    _STARTED.append(proc)
    return proc, Output(proc.popen.stdout)


def end_execs() -> None:
    """SIGKILL every supctl of :func:`start_exec` still running (a test that failed
    half-way): its session drops, so the site kills the remote command, and the next
    test starts clean instead of meeting a leftover ``sleep 1000``."""
    while _STARTED:
        proc = _STARTED.pop()
        if proc.popen.poll() is None:
            proc.popen.kill()
            proc.popen.wait()
        for stream in (proc.popen.stdin, proc.popen.stdout):
            if stream is not None:
                stream.close()


def wait_exit(proc: Proc, deadline: float = 15.0, *logs: LogFile) -> int:
    """supctl's exit status; AssertionError (with its stderr and ``logs``) after ``deadline`` s."""
    try:
        return proc.popen.wait(deadline)
    except subprocess.TimeoutExpired:
        more = "".join(f"\n--- {log.path.name}:\n{log.text()[-3000:]}" for log in logs)
        raise AssertionError(f"supctl still running after {deadline} s: {proc.log.text()}{more}") from None


def wait_in_namespace(proc: Proc, ns: str, argv: list[str], deadline: float = 20.0) -> int:
    """Wait until a process ``argv`` runs in ``ns`` (started by supctl ``proc``); its pid."""
    end = time.monotonic() + deadline
    while True:
        for pid, found in namespace_processes(ns).items():
            if found == argv:
                return pid
        assert proc.popen.poll() is None, f"supctl exited ({proc.popen.returncode}): {proc.log.text()}"
        assert time.monotonic() < end, f"no {argv} in {ns} within {deadline} s: {proc.log.text()}"
        time.sleep(0.02)  # polling interval; the deadline above is the bound


def show_instances(stack: Stack, site: str, app: str) -> list[dict[str, Any]]:
    result = stack.supctl("show", "-s", site, "-o", "json", "applications", app, "service-instances")
    assert result.returncode == 0, result.stderr.decode()
    instances: list[dict[str, Any]] = json.loads(result.stdout)
    return instances


def container_state(stack: Stack, site: str, app: str, instance: str, container: str) -> dict[str, Any]:
    """The container as ``supctl show ... -o json`` reports it."""
    for item in show_instances(stack, site, app):
        if item.get("name") == instance:
            for entry in item.get("containers") or []:
                if entry.get("name") == container:
                    return dict(entry)
    raise AssertionError(f"container {container} of {instance} not shown")


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[1])


def children_running(ppid: int, argv: list[str]) -> list[int]:
    """Pids of the live children of ``ppid`` whose command line is ``argv``."""
    return [
        int(entry)
        for entry in os.listdir("/proc")
        if entry.isdigit() and parent(int(entry)) == ppid and cmdline(int(entry)) == argv
    ]


def process_group(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def namespace_processes(ns: str) -> dict[int, list[str]]:
    """pid -> argv of every live process inside network namespace ``ns``."""
    found: dict[int, list[str]] = {}
    for pid in namespace_pids(ns):
        argv = cmdline(pid)
        if argv:  # zombies and kernel threads have none
            found[pid] = argv
    return found


def log_match(log: LogFile, pattern: str, deadline: float = 10.0) -> re.Match[str]:
    return log.wait_for(pattern, deadline)


def start_dnsmasq(
    lab: NetLab, ns: str, listen: str, name: str, address: str, log: Path
) -> subprocess.Popen[Any]:
    """dnsmasq in ``ns``, on ``listen`` only, answering ``name`` -> ``address`` (A) and
    nothing else: no upstream, no /etc/hosts, no config file, no pid file, no daemon.

    ``--local=/NAME/`` makes it authoritative for the name: without it the AAAA
    query that nslookup also sends would be "forwarded" to no upstream and answered
    REFUSED, and nslookup would exit 1.
    """
    with log.open("ab") as err:
        return lab.run(
            ns,
            [
                DNSMASQ,
                "--no-daemon",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                f"--listen-address={listen}",
                "--port=53",
                f"--address=/{name}/{address}",
                f"--local=/{name}/",
                "--log-queries",
                "--log-facility=-",
            ],
            stdin=subprocess.DEVNULL,
            stdout=err,
            stderr=err,
        )


def nslookup(
    lab: NetLab, ns: str | None, name: str, server: str | None = None
) -> subprocess.CompletedProcess[str]:
    """``nslookup -timeout=1 -retry=0 NAME [SERVER]`` in ``ns`` (None: the host)."""
    argv = [NSLOOKUP, "-timeout=1", "-retry=0", name, *([server] if server else [])]
    full = ["ip", "netns", "exec", ns, *argv] if ns is not None else argv
    return subprocess.run(full, capture_output=True, text=True, timeout=10, check=False)


def wait_for_dns(
    lab: NetLab,
    ns: str,
    server: str,
    name: str,
    address: str,
    dnsmasq: subprocess.Popen[Any],
    deadline: float = 10.0,
) -> None:
    """Poll until ``server`` (asked from ``ns``) answers ``name`` with ``address``."""
    end = time.monotonic() + deadline
    while True:
        assert dnsmasq.poll() is None, f"dnsmasq exited with {dnsmasq.returncode}"
        result = nslookup(lab, ns, name, server)
        if result.returncode == 0 and f"Address: {address}" in result.stdout:
            return
        assert time.monotonic() < end, f"DNS at {server} not answering within {deadline} s: {result}"
        time.sleep(0.05)  # polling interval; the deadline above is the bound
