"""``exec -it``: a terminal at the site, driven through a real local terminal (tmux).

The stack is real (tower, enforcer, a service instance in a network namespace),
and so is the terminal: supctl runs in a tmux pane of a private tmux server
(fixed 80x24), keys go in with ``send-keys`` and the screen comes out with
``capture-pane``.  The local shell in the pane saves ``stty -g`` before supctl
and after it, and prints supctl's exit status, so each test sees what a user
would: the remote prompt, ``tty``, ``stty size``, a full-screen ``less``, and a
terminal left exactly as it was.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from e2e_support import wait_until
from exec_support import end_execs, namespace_processes, toml_str
from netlab import NetLab
from stack import Proc, Stack, do_args, one_line_error, program

from supctl.errors import ExitCode

APP = "popcorn"
SITE = "tty-site"
OLD_SITE = "tty-old"
INSTANCE = "popcorn-tty-1"
SHELL = "shell"
REMOTE_PROMPT = "remote> "
#: The remote command of most tests: an interactive sh with a prompt we can wait for.
REMOTE_SH = f'PS1="{REMOTE_PROMPT}" exec /bin/sh'
TMUX = "/usr/bin/tmux"

pytestmark = pytest.mark.root


@dataclass
class World:
    lab: NetLab
    stack: Stack
    ns: str
    root: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("exec-tty")
    with NetLab() as lab:
        ns = lab.add_ns("tty")
        with Stack(root / "stack") as stack:
            stack.start_tower()
            base = f"applications.{APP}.service-instances.{INSTANCE}"
            stack.add_site(SITE, f"[{base}]\nnetns = {toml_str(ns)}\n[{base}.containers.{SHELL}]\n")
            yield World(lab, stack, ns, root)


@pytest.fixture(autouse=True)
def _no_exec_outlives_its_test() -> Iterator[None]:
    yield
    end_execs()


class Tmux:
    """A private tmux server (its own socket) with one 80x24 window running sh."""

    def __init__(self, directory: Path, env: dict[str, str]) -> None:
        self.dir = directory
        self.socket = str(directory / "sock")
        self.env = {**env, "TERM": "xterm-256color"}
        # tmux does not pass PS1 on from its environment: set it in the pane's command.
        shell = "PS1='local$ ' exec /bin/sh"
        self.run("-f", "/dev/null", "new-session", "-d", "-x", "80", "-y", "24", "-s", "t", shell)

    def run(self, *args: str) -> str:
        result = subprocess.run(
            [TMUX, "-S", self.socket, *args], capture_output=True, text=True, env=self.env, timeout=10
        )
        assert result.returncode == 0, f"tmux {args}: {result.stderr}"
        return result.stdout

    def type(self, text: str, enter: bool = True) -> None:
        self.run("send-keys", "-t", "t", "-l", text)
        if enter:
            self.run("send-keys", "-t", "t", "Enter")

    def key(self, name: str) -> None:
        self.run("send-keys", "-t", "t", name)

    def screen(self) -> str:
        return self.run("capture-pane", "-p", "-t", "t")

    def wait(self, pattern: str, deadline: float = 20.0) -> re.Match[str]:
        """The first match of ``pattern`` on the screen, waiting up to ``deadline`` s."""
        regex = re.compile(pattern, re.MULTILINE)
        seen = [""]

        def found() -> re.Match[str] | None:
            seen[0] = self.screen()
            return regex.search(seen[0])

        try:
            match = wait_until(found, deadline, f"{pattern!r} on the screen")
        except AssertionError:
            raise AssertionError(f"no {pattern!r} on the screen within {deadline} s:\n{seen[0]}") from None
        assert match is not None  # wait_until returns only a truthy value
        return match

    def clear(self) -> None:
        """Wipe the screen and its history, so later waits see only new text."""
        self.run("send-keys", "-t", "t", "-R")
        self.run("clear-history", "-t", "t")

    def kill(self) -> None:
        subprocess.run(
            [TMUX, "-S", self.socket, "kill-server"], capture_output=True, env=self.env, timeout=10
        )


@pytest.fixture
def tmux(world: World, tmp_path: Path) -> Iterator[Tmux]:
    # A short path: a unix socket path is limited to 108 bytes.
    directory = Path(os.path.realpath(tmp_path))
    term = Tmux(directory, world.stack.env)
    try:
        term.wait(r"^local\$")
        yield term
    finally:
        term.kill()


def exec_line(world: World, command: str, *options: str, site: str = SITE) -> str:
    """The local shell line: save the terminal's settings, run supctl, print its exit
    status, save the settings again."""
    argv = [program("supctl"), *do_args(site, APP, INSTANCE, "containers", SHELL, "exec", *options, command)]
    before, after = world.root / "stty-before", world.root / "stty-after"
    return f"stty -g > {before}; {shlex.join(argv)}; echo rc=$?; stty -g > {after}"


def assert_terminal_restored(world: World) -> None:
    before = (world.root / "stty-before").read_text()
    after = wait_until(lambda: (world.root / "stty-after").read_text(), 10, "stty -g after supctl")
    assert before.strip() and after == before


def start_shell(world: World, tmux: Tmux) -> None:
    for name in ("stty-before", "stty-after"):
        (world.root / name).write_text("")
    tmux.type(exec_line(world, REMOTE_SH, "-it"))
    tmux.wait(rf"^{re.escape(REMOTE_PROMPT.strip())}")  # capture-pane drops trailing blanks
    tmux.clear()


def remote_shells(world: World) -> list[int]:
    return [pid for pid, argv in namespace_processes(world.ns).items() if argv == ["/bin/sh"]]


def supctl_pids() -> list[int]:
    """supctl processes running the exec of these tests (started in the tmux pane)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(part.endswith(b"/supctl") for part in argv[:2]) and REMOTE_SH.encode() in argv:
                found.append(int(entry))
    return found


# --- through a real terminal ---------------------------------------------------------


def test_tty_size_resize_and_exit_code(world: World, tmux: Tmux) -> None:
    start_shell(world, tmux)
    tmux.type("tty")
    tmux.wait(r"^/dev/pts/\d+\s*$")
    tmux.type("stty size")
    tmux.wait(r"^24 80\s*$")
    tmux.run("resize-window", "-t", "t", "-x", "100", "-y", "30")
    tmux.clear()
    tmux.type("stty size")
    tmux.wait(r"^30 100\s*$")
    # The remote sees its terminal's type, the local TERM inside tmux.
    tmux.type('echo "term=$TERM"')
    tmux.wait(r"^term=(screen|tmux)[\w.+-]*\s*$")
    tmux.type("exit 3")
    tmux.wait(r"^rc=3\s*$")
    assert_terminal_restored(world)


def test_full_screen_program_draws_and_quits(world: World, tmux: Tmux) -> None:
    text = world.root / "lines.txt"
    text.write_text("".join(f"line-{n}-of-the-file\n" for n in range(1, 201)))
    start_shell(world, tmux)
    tmux.type(f"less {shlex.quote(str(text))}")
    screen = tmux.wait(r"^line-23-of-the-file\s*$").string
    assert "line-24-of-the-file" not in screen  # one screen's worth: less knows it has 24 rows
    tmux.key("G")  # to the end: less drew the last page
    tmux.wait(r"^line-200-of-the-file\s*$")
    tmux.key("q")
    tmux.clear()
    tmux.type("echo back-from-less")
    tmux.wait(r"^back-from-less\s*$")
    tmux.type("exit")
    tmux.wait(r"^rc=0\s*$")
    assert_terminal_restored(world)


def test_ctrl_c_reaches_the_remote_job_not_supctl(world: World, tmux: Tmux) -> None:
    start_shell(world, tmux)
    tmux.type("sleep 100")
    wait_until(
        lambda: any(a == ["sleep", "100"] for a in namespace_processes(world.ns).values()), 20, "sleep"
    )
    tmux.key("C-c")
    wait_until(lambda: not any(a == ["sleep", "100"] for a in namespace_processes(world.ns).values()), 20)
    tmux.type("echo still-here")
    tmux.wait(r"^still-here\s*$")
    assert "rc=" not in tmux.screen()  # supctl is still running
    # Ctrl-Z stops the foreground job (job control: the terminal is the controlling one).
    tmux.type("sleep 101")
    wait_until(lambda: any(a == ["sleep", "101"] for a in namespace_processes(world.ns).values()), 20)
    tmux.key("C-z")
    tmux.wait(r"Stopped")
    tmux.type("kill -9 %1")
    tmux.type("jobs")  # dash reports (and forgets) the killed job, so exit does not refuse
    tmux.wait(r"Killed")
    tmux.type("exit 5")
    tmux.wait(r"^rc=5\s*$")
    assert_terminal_restored(world)


def test_remote_shell_killed_restores_the_terminal(world: World, tmux: Tmux) -> None:
    start_shell(world, tmux)
    shells = wait_until(lambda: remote_shells(world), 20, "the remote sh")
    for pid in shells:
        os.kill(pid, signal.SIGKILL)
    tmux.wait(rf"^rc={128 + signal.SIGKILL}\s*$")
    assert_terminal_restored(world)


def test_sigterm_resets_the_stream_and_restores_the_terminal(world: World, tmux: Tmux) -> None:
    start_shell(world, tmux)
    pids = wait_until(supctl_pids, 10, "the supctl process")
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    tmux.wait(rf"^rc={128 + signal.SIGTERM}\s*$")
    assert_terminal_restored(world)
    # The reset ended the remote shell.
    wait_until(lambda: not remote_shells(world), 20, "the remote sh gone")


def test_lost_tower_restores_the_terminal(tmp_path: Path) -> None:
    """A stack of its own: the tower is killed under a running exec -it."""
    with NetLab() as lab:
        ns = lab.add_ns("ttylost")
        with Stack(tmp_path / "stack") as stack:
            stack.start_tower()
            base = f"applications.{APP}.service-instances.{INSTANCE}"
            stack.add_site(SITE, f"[{base}]\nnetns = {toml_str(ns)}\n[{base}.containers.{SHELL}]\n")
            world = World(lab, stack, ns, tmp_path)
            term = Tmux(Path(os.path.realpath(tmp_path)), stack.env)
            try:
                term.wait(r"^local\$")
                start_shell(world, term)
                assert stack.tower is not None
                stack.tower.stop(signal.SIGKILL)
                term.wait(rf"^rc={ExitCode.EXEC_FAILED}\s*$")
                assert "Traceback" not in term.screen()
                assert_terminal_restored(world)
            finally:
                term.kill()


# --- refusals, without a terminal or without a site that has one -----------------------


def test_tty_without_a_terminal_is_refused_in_one_line(world: World) -> None:
    result = world.stack.supctl(*do_args(SITE, APP, INSTANCE, "containers", SHELL, "exec", "-t", "sh"))
    assert result.returncode == ExitCode.EXEC_FAILED
    line = one_line_error(result.stderr)
    assert "exec -t needs a terminal, and stdin is not one" in line
    assert not remote_shells(world)


def run_on_pty(stack: Stack, args: list[str], timeout: float = 30.0) -> subprocess.CompletedProcess[bytes]:
    """supctl ARGS with a pseudo-terminal as stdin (the test's own, not tmux's)."""
    master, slave = os.openpty()
    try:
        return subprocess.run(
            [program("supctl"), *args],
            stdin=slave,
            capture_output=True,
            env=stack.env,
            timeout=timeout,
            start_new_session=True,
        )
    finally:
        os.close(slave)
        os.close(master)


# An enforcer that announces no terminal support, as one from before it existed.
OLD_ENFORCER = (
    "import sys, supctl_exec.handler as h; h.ExecHandler.features = frozenset(); "
    "from supctl.enforcer.cli import main; sys.argv[0] = 'edge-enforcer'; main()"
)


def test_old_enforcer_refuses_tty_in_one_line(world: World, tmp_path: Path) -> None:
    stack = world.stack
    tower = stack.tower
    assert tower is not None
    token = stack.register_site(OLD_SITE)
    token_file = tmp_path / "old.token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    inventory = tmp_path / "old.toml"
    base = f"applications.{APP}.service-instances.{INSTANCE}"
    inventory.write_text(f'[{base}]\nruntime = "host"\n[{base}.containers.{SHELL}]\n')
    before = tower.log.count(rf"site {OLD_SITE} connected")
    enforcer: Proc = stack.spawn(
        "enforcer-old",
        [sys.executable, "-c", OLD_ENFORCER, "run", "--tower", stack.url, "--site", OLD_SITE,
         "--token-file", str(token_file), "--ca-file", str(stack.dir / "ca.pem"),
         "--inventory", str(inventory)],
    )  # fmt: skip
    try:
        wait_until(lambda: tower.log.count(rf"site {OLD_SITE} connected") > before, 20, "the old site")
        marker = tmp_path / "ran"
        args = do_args(OLD_SITE, APP, INSTANCE, "containers", SHELL, "exec", "-it", f"touch {marker}")
        result = run_on_pty(stack, args)
        assert result.returncode == ExitCode.EXEC_FAILED, result
        line = one_line_error(result.stderr)
        assert f"the enforcer of site {OLD_SITE}" in line and "cannot run exec -t" in line, line
        assert not marker.exists()  # nothing ran without a terminal
        # Without -t the same site runs it.
        result = stack.supctl(
            *do_args(OLD_SITE, APP, INSTANCE, "containers", SHELL, "exec", f"touch {marker}")
        )
        assert result.returncode == 0, result.stderr
        assert marker.exists()
    finally:
        enforcer.stop()


def test_tty_exec_is_audited_as_exec(world: World) -> None:
    """An exec -t is the verb exec for the tower: same authorisation, same audit record."""
    result = run_on_pty(
        world.stack, do_args(SITE, APP, INSTANCE, "containers", SHELL, "exec", "-it", "tty; exit 7")
    )
    assert result.returncode == 7, result.stderr
    assert re.match(rb"^/dev/pts/\d+\r\n$", result.stdout), result.stdout
    records = world.stack.wait_audit(
        lambda r: r.get("event") == "stream-closed" and r.get("command") == "tty; exit 7", "the tty exec"
    )
    record = next(r for r in records if r.get("command") == "tty; exit 7")
    assert record["verb"] == "exec" and record["exit-code"] == 7, record


def test_help_shows_the_options(world: World) -> None:
    result = world.stack.supctl(*do_args(SITE, APP, INSTANCE, "containers", SHELL, "exec", "--help"))
    assert result.returncode == 0
    assert b"-t, --tty" in result.stdout and b"-i, --interactive" in result.stdout


def test_options_after_command_belong_to_it(world: World) -> None:
    """``exec 'ls' -t`` is two command words (refused, with the quoted form), never -t."""
    result = world.stack.supctl(*do_args(SITE, APP, INSTANCE, "containers", SHELL, "exec", "echo", "-t"))
    assert result.returncode == ExitCode.EXEC_FAILED
    assert "quote it, e.g. exec 'echo -t'" in one_line_error(result.stderr)
    result = world.stack.supctl(*do_args(SITE, APP, INSTANCE, "containers", SHELL, "exec", "-i", "echo -t"))
    assert result.returncode == 0 and result.stdout == b"-t\n", result
