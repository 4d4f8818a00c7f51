"""A throwaway PostgreSQL server for the store's tests and benchmark (Debian's postgresql).

``initdb`` and ``pg_ctl`` in a temporary directory, as the ``postgres`` user when
run as root (initdb refuses root), listening only on a Unix socket in that
directory.  Two roles: ``postgres`` (trust, for creating databases) and
``tower``, which must give its password (scram-sha-256), so the store's password
handling is exercised for real.  :meth:`PostgresCluster.stop` stops the server and
removes the directory, whatever state :meth:`start` reached.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

ROLE = "tower"
#: Bound on every wait for the server (pg_ctl -w waits for readiness itself).
TIMEOUT = 60


def find_bindir() -> Path | None:
    """Where initdb and pg_ctl are: Debian keeps them off PATH, under /usr/lib/postgresql/N/bin."""
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True
    )
    initdb = shutil.which("initdb")
    if initdb is not None:
        candidates.append(str(Path(initdb).resolve().parent))
    for bindir in candidates:
        if all(os.access(Path(bindir) / tool, os.X_OK) for tool in ("initdb", "pg_ctl", "psql")):
            return Path(bindir)
    return None


class PostgresCluster:
    def __init__(self, bindir: Path, *, durable: bool = False) -> None:
        self.bindir = bindir
        # durable=False: no fsync (fast tests; the server itself is never killed in them).
        self.durable = durable
        self.password = secrets.token_urlsafe(16)
        self.root = Path(tempfile.mkdtemp(prefix="supctl-pg-"))
        self.data = self.root / "data"
        self.socket_dir = self.root / "sock"
        self.log = self.root / "server.log"
        self._as_postgres: list[str] = []
        self._options: list[str] = []
        self._started = False

    # -- running tools as the server's owner -----------------------------------------

    def _run(self, tool: str, *args: str) -> subprocess.CompletedProcess[str]:
        command = [*self._as_postgres, str(self.bindir / tool), *args]
        result = subprocess.run(
            command,
            cwd=self.root,
            env={"PATH": "/usr/bin:/bin", "LC_ALL": "C", "PGTZ": "UTC"},
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        if result.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{tool} {' '.join(args[:2])} failed: {result.stderr.strip()} {log}".strip())
        return result

    def sql(self, statement: str, database: str = "postgres") -> str:
        """Run one statement as the superuser; its output (unaligned, tuples only)."""
        return self._run(
            "psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", str(self.socket_dir),
            "-U", "postgres", "-d", database, "-c", statement,
        ).stdout.strip()  # fmt: skip

    # -- life cycle ----------------------------------------------------------------------

    def start(self) -> None:
        os.chmod(self.root, 0o711)  # the server's user must reach its directories
        self.socket_dir.mkdir()
        self.data.mkdir(mode=0o700)
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            for path in (self.root, self.data, self.socket_dir):
                os.chown(path, owner.pw_uid, owner.pw_gid)
            runuser = shutil.which("runuser") or "/usr/sbin/runuser"  # util-linux, in /sbin on Debian
            self._as_postgres = [runuser, "-u", "postgres", "--"]
        self._run(
            "initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
            "--locale=C", "--no-sync", "--no-instructions",
        )  # fmt: skip
        (self.data / "pg_hba.conf").write_text(
            "local all postgres trust\nlocal all all scram-sha-256\n", encoding="ascii"
        )
        options = [
            "-c listen_addresses=''",
            f"-c unix_socket_directories='{self.socket_dir}'",
            "-c max_connections=200",
        ]
        if not self.durable:
            options += ["-c fsync=off", "-c full_page_writes=off", "-c synchronous_commit=off"]
        self._options = options
        self._started = True  # from here on, stop() must stop a server
        self.resume()
        self.sql(f"CREATE ROLE {ROLE} LOGIN PASSWORD '{self.password}'")

    def halt(self) -> None:
        """Stop the server (fast: open connections are closed), keeping its data: the
        store's outage, for real.  :meth:`resume` starts it again."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", str(TIMEOUT), "stop")

    def resume(self) -> None:
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", str(TIMEOUT),
            "-o", " ".join(self._options), "start",
        )  # fmt: skip

    def stop(self) -> None:
        try:
            if self._started:
                try:
                    self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
                except (RuntimeError, subprocess.TimeoutExpired):
                    self._kill_postmaster()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def _kill_postmaster(self) -> None:
        try:
            pid = int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)  # its children exit when the postmaster is gone

    def __enter__(self) -> PostgresCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- databases -----------------------------------------------------------------------

    def create_database(self, name: str) -> str:
        """A new empty database owned by the tower role; its store URL."""
        self.sql(f"CREATE DATABASE {name} OWNER {ROLE}")
        return self.url(name)

    def drop_database(self, name: str) -> None:
        self.sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def url(self, database: str) -> str:
        """The store URL (no password: that comes from a file or the environment)."""
        return f"postgresql://{ROLE}@/{database}?host={self.socket_dir}"

    def write_password_file(self, path: Path) -> Path:
        path.write_text(self.password + "\n", encoding="ascii")
        path.chmod(0o600)
        return path
