"""The benchmark's processes: started in their own process groups, waited for with
deadlines, and killed with all their descendants."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import TypeVar

HOST = "127.0.0.1"
SETUP_TIMEOUT = 30.0  # bound on every readiness wait
T = TypeVar("T")


class BenchError(Exception):
    pass


# --- processes ---------------------------------------------------------------


def proc_stat(pid: int) -> list[str]:
    """/proc/PID/stat after the command name: [0] state, [1] ppid, [11:15] u/s/cu/cs time."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rfind(")") + 2 :].split()


def process_tree(pid: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        with suppress(OSError, IndexError):
            kids.setdefault(int(proc_stat(int(entry))[1]), []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo.extend(kids.get(tree[-1], []))
    return tree


def alive(pid: int) -> bool:
    try:
        return proc_stat(pid)[0] != "Z"
    except (OSError, IndexError):
        return False


class Procs:
    """The processes of one path, each in its own process group and logging to a file."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.procs: dict[subprocess.Popen[bytes], Path] = {}

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = self.logdir / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env,
                                    start_new_session=True)  # fmt: skip
        self.procs[proc] = log
        return proc

    def wait(self, what: str, proc: subprocess.Popen[bytes], check: Callable[[], T | None],
             end: float = 0) -> T | None:  # fmt: skip
        """Poll ``check`` until it answers.  If ``proc`` exits first: None when an
        ``end`` was given (the caller retries), else BenchError."""
        deadline = end or time.monotonic() + SETUP_TIMEOUT
        while (result := check()) is None:
            exited = proc.poll() is not None
            if exited and end:
                return None
            if exited or time.monotonic() > deadline:
                log = " | ".join(self.procs[proc].read_text(errors="replace").strip().splitlines()[-5:])
                raise BenchError(f"{what}: {'exited' if exited else 'timed out'}: {log}")
            time.sleep(0.02)
        return result

    def stop(self) -> None:
        """SIGTERM, up to 5 s grace, then SIGKILL what is left: each group and every
        descendant (sshd's per-connection children call setsid() and leave the group)."""
        pids: set[int] = set()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids |= {pid for proc in self.procs for pid in process_tree(proc.pid)}
            for proc in self.procs:
                if proc.poll() is None:
                    with suppress(ProcessLookupError):
                        os.killpg(proc.pid, sig)
            for pid in filter(alive, pids):
                with suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + 5
            for proc in self.procs:
                with suppress(subprocess.TimeoutExpired):
                    proc.wait(max(0.1, deadline - time.monotonic()))
            while any(map(alive, pids)) and time.monotonic() < deadline:
                time.sleep(0.02)
        self.procs.clear()


def in_log(path: Path, pattern: str) -> Callable[[], re.Match[str] | None]:
    return lambda: re.search(pattern, path.read_text(errors="replace"))


def port_open(port: int) -> Callable[[], bool | None]:
    def check() -> bool | None:
        with suppress(OSError), socket.create_connection((HOST, port), timeout=1):
            return True
        return None

    return check


def must(value: T | None) -> T:
    assert value is not None
    return value


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def run(argv: list[str]) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise BenchError(f"{' '.join(argv[:3])} failed: {done.stderr.strip()[-300:]}")
    return done.stdout


def tool(name: str) -> str:
    if found := shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin"):
        return found
    raise BenchError(f"{name} is not installed")
