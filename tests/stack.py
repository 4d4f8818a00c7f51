"""A real supctl stack for end-to-end tests: tower, enforcer(s) and supctl processes.

Every process runs the installed console scripts (next to the running Python),
talks real TLS WebSockets on 127.0.0.1, and is killed on exit, pass or fail.
Readiness is awaited by reading the processes' own log lines with a deadline.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent


def program(name: str) -> str:
    """The console script ``name`` of the environment running the tests."""
    local = BIN / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    assert found, f"{name} is not installed"
    return found


def write_secret(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` with mode 0600 from the start, as a token file must be
    (the enforcer refuses one that others can read); replaces an existing file."""
    tmp = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


def in_netns(netns: str | None) -> list[str]:
    """The argv prefix that runs a program in network namespace ``netns`` (none: here)."""
    return ["ip", "netns", "exec", netns] if netns else []


class LogFile:
    """A process's stderr captured in a file, searched with a deadline."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def text(self) -> str:
        try:
            return self.path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for(
        self, pattern: str, deadline: float = 20.0, proc: subprocess.Popen[Any] | None = None
    ) -> re.Match[str]:
        regex = re.compile(pattern)
        end = time.monotonic() + deadline
        while True:
            match = regex.search(self.text())
            if match:
                return match
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"process exited ({proc.returncode}) before {pattern!r}:\n{self.text()}")
            if time.monotonic() > end:
                raise AssertionError(f"timed out waiting for {pattern!r} in {self.path}:\n{self.text()}")
            time.sleep(0.02)  # polling a log file; the deadline above is the bound

    def count(self, pattern: str) -> int:
        return len(re.findall(pattern, self.text()))


@dataclass
class Proc:
    popen: subprocess.Popen[bytes]
    log: LogFile

    def stop(self, sig: int = signal.SIGTERM, grace: float = 5.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode


class Stack:
    """A tower with one registered site per :meth:`add_site` call."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.dir = root / "tower"
        self.procs: list[Proc] = []
        self.tower: Proc | None = None
        self.url = ""
        self.store_url: str | None = None  # a PostgreSQL store (start_tower(store=...)), else tower.db
        self.tower_netns: str | None = None  # where the tower runs (start_tower(netns=...))
        self.env = dict(os.environ)
        for key in list(self.env):
            if key.startswith("SUPCTL_"):
                del self.env[key]
        self.env["HOME"] = str(root)  # no stray ~/.config/supctl/config.toml
        self.env["XDG_CONFIG_HOME"] = str(root / "config")
        self.env["COLUMNS"] = "200"

    # --- processes -------------------------------------------------------------

    def spawn(self, name: str, argv: Sequence[str], stdin: Any = subprocess.DEVNULL, **kw: Any) -> Proc:
        log = LogFile(self.root / f"{name}-{len(self.procs)}.log")
        with log.path.open("wb") as err:
            popen = subprocess.Popen(
                list(argv),
                stdin=stdin,
                stdout=kw.pop("stdout", subprocess.DEVNULL),
                stderr=err,
                env=kw.pop("env", self.env),
                start_new_session=True,
                **kw,
            )
        proc = Proc(popen, log)
        self.procs.append(proc)
        return proc

    def start_tower(
        self,
        limits: Mapping[str, float] | None = None,
        keepalive: float | None = None,
        *,
        init: bool = True,
        store: tuple[str, Path] | None = None,
        login_expiry: str | None = None,
        netns: str | None = None,
        host: str = "127.0.0.1",
        config: str = "",
        prelude: str = "",
        **popen: Any,
    ) -> int:
        """``control-tower init`` (unless ``init`` is false: a tower directory made already)
        and ``serve``, with ``[limits]`` and ``keepalive`` added to tower.toml if given;
        return its port.  ``store``: (URL, password file) of a PostgreSQL database for
        the store, instead of ``tower.db``; ``login_expiry``: tower.toml's, instead of 8h; ``netns``:
        the network namespace to run it in, listening on ``host`` (which its certificate
        then covers); ``config``: TOML appended to tower.toml, ``prelude``: prepended (top-level keys).  ``popen``: extra arguments of the tower's ``subprocess.Popen``
        (e.g. ``preexec_fn``)."""
        if init:
            extra = [] if store is None else ["--store-url", store[0], "--store-password-file", str(store[1])]
            extra += ["--san", host] if host != "127.0.0.1" else []
            subprocess.run(
                [program("control-tower"), "init", str(self.dir), *extra],
                check=True,
                capture_output=True,
                env=self.env,
            )
            self.store_url = None if store is None else store[0]
        path = self.dir / "tower.toml"
        if login_expiry is not None:
            path.write_text(
                path.read_text().replace('login-expiry = "8h"', f"login-expiry = {json.dumps(login_expiry)}")
            )
        if limits or keepalive is not None:
            top = f"keepalive = {keepalive}\n" if keepalive is not None else ""
            table = "\n[limits]\n" + "".join(f"{key} = {value}\n" for key, value in (limits or {}).items())
            path.write_text(top + path.read_text() + table)
        if config or prelude:
            path.write_text(prelude + path.read_text() + "\n" + config)
        self.tower_netns = netns
        self.tower = self.spawn(
            "tower",
            [
                *in_netns(netns),
                program("control-tower"),
                "serve",
                "--config",
                str(path),
                "--listen",
                f"{host}:0",
            ],
            **popen,
        )
        match = self.tower.log.wait_for(
            rf"listening on (wss://{re.escape(host)}:(\d+))", proc=self.tower.popen
        )
        self.url = match[1]
        self.env.update(
            SUPCTL_HOST=self.url,
            SUPCTL_TOKEN_FILE=str(self.dir / "admin.token"),
            SUPCTL_CA_FILE=str(self.dir / "ca.pem"),
        )
        return int(match[2])

    def restart_tower(self, sig: int | None = signal.SIGKILL) -> Proc:
        """Start the tower again on its port, from its directory; with ``sig``, stop the
        running one with it first (``None``: it is stopped already).  Returns once it listens."""
        assert self.tower is not None
        if sig is not None:
            self.tower.stop(sig)
        listen = self.url.split("://", 1)[1]
        self.tower = self.spawn(
            "tower",
            [
                *in_netns(self.tower_netns),
                program("control-tower"),
                "serve",
                "--config",
                str(self.dir / "tower.toml"),
                "--listen",
                listen,
            ],
        )
        self.tower.log.wait_for(r"listening on wss://", proc=self.tower.popen)
        return self.tower

    def audit_lines(self) -> list[str]:
        """The audit records the tower has written so far, as the JSON lines it stored, read
        from its store (tower.db, read-only) as ``control-tower audit --output jsonl`` prints
        them.  Records reach the store a few milliseconds after the tower makes them: to
        look for one, use :meth:`wait_audit`."""
        if self.store_url is not None:
            jsonl = self.control_tower("audit", "--config", str(self.dir / "tower.toml"), "--output", "jsonl")
            return jsonl.splitlines()
        db = sqlite3.connect(f"file:{self.dir / 'tower.db'}?mode=ro", uri=True, timeout=20)
        try:
            return [line for (line,) in db.execute("SELECT record FROM audit ORDER BY id")]
        finally:
            db.close()

    def audit_records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.audit_lines()]

    def wait_audit(
        self, predicate: Callable[[dict[str, Any]], bool], what: str, deadline: float = 20.0
    ) -> list[dict[str, Any]]:
        """Every record so far, once one matches ``predicate`` (AssertionError after ``deadline``)."""
        end = time.monotonic() + deadline
        while True:
            records = self.audit_records()
            if any(predicate(r) for r in records):
                return records
            assert time.monotonic() < end, f"timed out waiting for {what} in the audit log"
            time.sleep(0.02)  # polling the store; the deadline above is the bound

    def add_site(self, site: str, inventory: str, *, wait: bool = True) -> Proc:
        token = subprocess.run(
            [program("control-tower"), "site", "add", "--config", str(self.dir / "tower.toml"), site],
            check=True,
            capture_output=True,
            text=True,
            env=self.env,
        ).stdout.strip()
        write_secret(self.root / f"{site}.token", token + "\n")
        (self.root / f"{site}.toml").write_text(inventory)
        return self.start_enforcer(site, wait=wait)

    def start_enforcer(
        self,
        site: str,
        *,
        wait: bool = True,
        token_file: Path | None = None,
        inventory: Path | None = None,
        towers: Sequence[str] | None = None,
        netns: str | None = None,
        extra: Sequence[str] = (),
    ) -> Proc:
        """Start an enforcer of ``site`` with ``token_file`` and ``inventory`` (by default
        ``ROOT/SITE.token`` and ``ROOT/SITE.toml``, written by :meth:`add_site`), dialling
        ``towers`` (by default this stack's tower)."""
        assert self.tower is not None
        before = self.tower.log.count(rf"site {re.escape(site)} connected")
        proc = self.spawn(
            f"enforcer-{site}",
            [
                *in_netns(netns),
                program("edge-enforcer"),
                "run",
                *(arg for url in (towers or [self.url]) for arg in ("--tower", url)),
                "--site",
                site,
                "--token-file",
                str(token_file or self.root / f"{site}.token"),
                "--ca-file",
                str(self.dir / "ca.pem"),
                "--inventory",
                str(inventory or self.root / f"{site}.toml"),
                "--verbose",
                *extra,
            ],
        )
        if wait:
            end = time.monotonic() + 20
            while self.tower.log.count(rf"site {re.escape(site)} connected") <= before:
                assert proc.popen.poll() is None, proc.log.text()
                assert time.monotonic() < end, self.tower.log.text()
                time.sleep(0.02)
        return proc

    def control_tower(self, *args: str) -> str:
        """Run an admin command of ``control-tower``; return its stdout."""
        return subprocess.run(
            [program("control-tower"), *args], check=True, capture_output=True, text=True, env=self.env
        ).stdout

    def supctl(
        self, *args: str, input: bytes | None = None, timeout: float = 60.0, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        """Run supctl to completion."""
        return subprocess.run(
            [program("supctl"), *args],
            input=input,
            capture_output=True,
            timeout=timeout,
            env=env or self.env,
            stdin=None if input is not None else subprocess.DEVNULL,
        )

    def forward(self, *args: str) -> tuple[Proc, int]:
        """Start ``supctl ... --bind 0`` and return it with the local port it listens on."""
        proc = self.spawn("supctl", [program("supctl"), *args])
        match = proc.log.wait_for(r"Forwarding from \S+:(\d+) ->", proc=proc.popen)
        return proc, int(match[1])

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def register_site(self, site: str) -> str:
        """Register ``site`` at the tower without starting its enforcer; return its token."""
        return self.control_tower("site", "add", "--config", str(self.dir / "tower.toml"), site).strip()

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.popen.poll() is None:
                try:
                    os.killpg(proc.popen.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
        end = time.monotonic() + 5
        for proc in self.procs:
            try:
                proc.popen.wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.popen.pid, signal.SIGKILL)
                proc.popen.wait()


def do_args(site: str, app: str, instance: str, *rest: str) -> list[str]:
    return ["do", "-s", site, "applications", app, "service-instances", instance, *rest]


def one_line_error(stderr: bytes) -> str:
    """Assert stderr is exactly one line, without a traceback, and return it."""
    text = stderr.decode()
    assert "Traceback" not in text, text
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]
