"""``supctl ... containers C exec 'COMMAND'`` end to end: real tower, enforcer, TLS, processes.

Two module-wide stacks:

* ``host``: a site whose instance uses the ``host`` runtime (no root needed for the
  behaviour itself): exit codes, stdout/stderr, stdin and EOF, big outputs,
  streaming, a closed stdout, refusals, and flow control towards a slow reader;
* ``ns`` (root): a site whose instances live in network namespaces, with declared
  containers (a long-running echo server, a crash-looping one): Ctrl-C, restarts
  seen through ``supctl show``, containers reachable through ``connect``, and a
  namespace deleted under the enforcer's feet.

Tests that stop or kill the enforcer build their own stack.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from e2e_support import wait_until
from exec_support import (
    children_running,
    container_state,
    end_execs,
    exec_args,
    namespace_processes,
    process_group,
    start_exec,
    toml_str,
    wait_exit,
    wait_in_namespace,
)
from netlab import NetLab, namespace_pids
from servers import pattern
from stack import LogFile, Proc, Stack, do_args, one_line_error

from supctl.errors import ExitCode
from supctl.protocol import DEFAULT_WINDOW

SERVERS = str(Path(__file__).resolve().with_name("servers.py"))
APP = "popcorn"
MB = 1_000_000


@pytest.fixture(autouse=True)
def _no_exec_outlives_its_test() -> Iterator[None]:
    yield
    end_execs()


# --- the host-runtime site -------------------------------------------------------------

HOST_SITE = "exec-host"
HOST_INSTANCE = "popcorn-host-1"
SHELL = "shell"


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with Stack(tmp_path_factory.mktemp("exec-host")) as stack:
        stack.start_tower()
        stack.add_site(
            HOST_SITE,
            f'[applications.{APP}.service-instances.{HOST_INSTANCE}]\nruntime = "host"\n'
            f"[applications.{APP}.service-instances.{HOST_INSTANCE}.containers.{SHELL}]\n",
        )
        yield stack


def host_exec(command: str, container: str = SHELL) -> list[str]:
    return exec_args(HOST_SITE, APP, HOST_INSTANCE, container, command)


def run(stack: Stack, args: list[str], data: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return stack.supctl(*args, input=data, timeout=60)


@pytest.mark.parametrize(
    ("command", "code", "stderr"),
    [
        ("true", 0, b""),
        ("exit 3", 3, b""),
        ("no-such-command", 127, b"no-such-command: not found\n"),
        ("kill -TERM $$", 128 + signal.SIGTERM, b""),
        ("kill -KILL $$", 128 + signal.SIGKILL, b""),
    ],
)
def test_exit_codes(host: Stack, command: str, code: int, stderr: bytes) -> None:
    result = run(host, host_exec(command))
    assert (result.returncode, result.stdout) == (code, b"")
    if stderr:  # the shell's own complaint (its wording before the name varies by shell)
        assert result.stderr.endswith(stderr) and result.stderr.count(b"\n") == 1, result.stderr
    else:
        assert result.stderr == b""


def test_stdout_and_stderr_are_kept_apart(host: Stack) -> None:
    result = run(host, host_exec("echo out; echo err >&2; echo more out; echo more err >&2"))
    assert result.returncode == 0
    assert result.stdout == b"out\nmore out\n"
    assert result.stderr == b"err\nmore err\n"


def test_stdin_is_forwarded_with_eof(host: Stack) -> None:
    data = b"".join(pattern(11, 5 * MB))
    result = run(host, host_exec("sha256sum"), data)
    assert result.returncode == 0, result.stderr
    assert result.stdout == hashlib.sha256(data).hexdigest().encode() + b"  -\n"
    # cat ends only at EOF; what follows it runs only then.
    result = run(host, host_exec("cat; echo EOF seen >&2"), data[:300_000])
    assert (result.returncode, result.stdout, result.stderr) == (0, data[:300_000], b"EOF seen\n")


def test_stdin_from_a_regular_file_or_dev_null(host: Stack, tmp_path: Path) -> None:
    data = b"".join(pattern(12, 3 * MB))
    (tmp_path / "input").write_bytes(data)
    with (tmp_path / "input").open("rb") as stdin:  # not a pipe: read on a worker thread
        proc, out = start_exec(host, host_exec("sha256sum"), stdin=stdin)
        assert out.read_line(30) == hashlib.sha256(data).hexdigest().encode() + b"  -\n"
    assert wait_exit(proc) == 0
    result = run(host, host_exec("cat; echo $?"))  # Stack.supctl: stdin is /dev/null
    assert (result.returncode, result.stdout) == (0, b"0\n")


def test_input_after_the_command_closed_stdin_is_dropped(host: Stack) -> None:
    """The command reads 10 bytes and exits; 50 MB more keep coming from a pipe."""
    proc, out = start_exec(host, host_exec("head -c 10; echo; echo done"), stdin=subprocess.PIPE)
    stdin = proc.popen.stdin
    assert stdin is not None
    errors: list[BaseException] = []

    def feed() -> None:
        try:
            for chunk in pattern(13, 50 * MB):
                stdin.write(chunk)
            stdin.close()
        except BrokenPipeError:
            pass  # supctl stopped reading once the command had exited: fine
        except BaseException as exc:
            errors.append(exc)

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    expected = next(pattern(13, 10)) + b"\ndone\n"
    assert out.drain(20) == (hashlib.sha256(expected).hexdigest(), len(expected))
    assert wait_exit(proc) == 0, proc.log.text()
    feeder.join(20)
    assert not feeder.is_alive() and not errors, errors


def test_a_command_that_ignores_stdin_is_not_held_up_by_it(host: Stack) -> None:
    proc, out = start_exec(host, host_exec("echo hi"), stdin=subprocess.PIPE)
    assert proc.popen.stdin is not None  # kept open (and never written) until the end
    try:
        assert wait_exit(proc, 10) == 0, proc.log.text()
        assert out.drain(5) == (hashlib.sha256(b"hi\n").hexdigest(), 3)
        assert proc.log.text() == ""
    finally:
        proc.popen.stdin.close()


def test_100_mb_of_output_arrive_intact(host: Stack) -> None:
    size = 100 * MB
    line = b"abcdefghij\n"
    expected = hashlib.sha256((line * (size // len(line) + 1))[:size]).hexdigest()
    proc, out = start_exec(host, host_exec(f"yes abcdefghij | head -c {size}"))
    assert out.drain(60) == (expected, size)
    assert wait_exit(proc) == 0
    assert proc.log.text() == ""


def test_exit_status_comes_after_all_output(host: Stack) -> None:
    size = 10 * MB
    result = run(host, host_exec(f"yes | head -c {size}; yes e | head -c {size} >&2; exit 7"))
    assert result.returncode == 7
    assert result.stdout == b"y\n" * (size // 2) and result.stderr == b"e\n" * (size // 2)


def test_output_is_streamed_while_the_command_runs(host: Stack) -> None:
    # Deterministic: the command cannot go on before we answer its first line.
    proc, out = start_exec(
        host, host_exec('echo ready; read answer; echo "got $answer"'), stdin=subprocess.PIPE
    )
    stdin = proc.popen.stdin
    assert stdin is not None
    assert out.read_line(10) == b"ready\n"
    assert proc.popen.poll() is None
    stdin.write(b"go\n")
    stdin.close()
    assert out.read_line(10) == b"got go\n"
    assert wait_exit(proc) == 0
    # Timed: each line shows up as it is printed, not all at the end.
    proc, out = start_exec(host, host_exec("for i in 1 2 3; do echo $i; sleep 0.3; done"))
    arrivals = []
    for expected in (b"1\n", b"2\n", b"3\n"):
        assert out.read_line(10) == expected
        arrivals.append(time.monotonic())
        if expected == b"1\n":
            assert proc.popen.poll() is None, "the first line came only after the command ended"
    assert wait_exit(proc) == 0
    assert arrivals[2] - arrivals[0] >= 0.3, arrivals  # printed 0.6 s apart


def test_closed_stdout_ends_quietly_like_sigpipe(host: Stack) -> None:
    proc, out = start_exec(host, host_exec("yes"))
    assert out.read_line(10) == b"y\n"
    assert proc.popen.stdout is not None
    proc.popen.stdout.close()  # like `supctl ... exec yes | head -1`
    assert wait_exit(proc) == 128 + signal.SIGPIPE
    assert proc.log.text() == ""


def test_refusals_are_one_line(host: Stack) -> None:
    result = run(host, host_exec("true", container="no-such-container"))
    assert result.returncode == ExitCode.EXEC_FAILED
    assert "container 'no-such-container' not found" in one_line_error(result.stderr)
    result = run(host, do_args(HOST_SITE, APP, HOST_INSTANCE, "containers", SHELL, "exec", "ls", "-l"))
    assert result.returncode == ExitCode.EXEC_FAILED
    assert "exec 'ls -l'" in one_line_error(result.stderr)


def test_slow_reader_bounds_every_hop(host: Stack) -> None:
    """200 MB of output to a reader that reads 64 KiB per 0.1 s for 3 s, then drains:
    each hop keeps at most one window, and every byte arrives."""
    size = 200 * MB
    expected = hashlib.sha256(b"y\n" * (size // 2)).hexdigest()
    command = f"yes | head -c {size}"
    proc, out = start_exec(host, host_exec(command))
    digest = hashlib.sha256()
    slow = 0
    end = time.monotonic() + 3.0
    while time.monotonic() < end:
        chunk = out.read(64 * 1024, deadline=10)
        digest.update(chunk)
        slow += len(chunk)
        time.sleep(0.1)  # this is the slow reader being slow, not synchronisation
    assert slow < 5 * MB, slow  # it really read slowly
    # ...and the command is held back (blocked on its pipe), not buffered ahead somewhere.
    enforcer = _enforcer(host, HOST_SITE)
    assert children_running(enforcer.popen.pid, ["/bin/sh", "-c", command]), "the command already finished"
    rest_sha, rest = out.drain(60, digest)
    assert (rest_sha, slow + rest) == (expected, size)
    assert wait_exit(proc) == 0
    assert host.tower is not None
    tower = _log_line(
        host.tower.log,
        rf"stream closed .*site={HOST_SITE} .*verb=exec .*sent=0 received=({size // 100_000}\d{{5}}) "
        r"peak_queued_up=(\d+) peak_queued_down=(\d+) .*result=ok",
    )
    # Exactly the output plus a 5-byte header per record.
    assert int(tower[1]) > size and (int(tower[1]) - size) % 5 == 0, tower[0]
    # The tower's queue towards supctl filled up (the slow reader held it back), but
    # never beyond one window.
    assert DEFAULT_WINDOW // 2 <= int(tower[3]) <= DEFAULT_WINDOW, tower[0]
    enforcer_line = _log_line(
        enforcer.log,
        rf"stream closed application={APP} instance={HOST_INSTANCE} verb=exec protocol= target={SHELL} "
        rf"sent={tower[1]} received=0 "
        r"peak_buffered=(\d+) .*result=ok",
    )
    assert int(enforcer_line[1]) <= DEFAULT_WINDOW, enforcer_line[0]


def _log_line(log: LogFile, pattern: str) -> re.Match[str]:
    """The one line of ``log`` matching ``pattern`` (waiting for it with a deadline)."""
    found = wait_until(lambda: list(re.finditer(pattern, log.text())), what=pattern)
    assert len(found) == 1, [m[0] for m in found]
    return found[0]


def _enforcer(stack: Stack, site: str) -> Proc:
    return next(p for p in stack.procs if p.log.path.name.startswith(f"enforcer-{site}"))


# --- the namespace site ----------------------------------------------------------------

NS_SITE = "exec-ns"
SVC = "popcorn-svc-1"
CRASHY = "popcorn-crashy-1"
GONE = "popcorn-gone-1"
ECHO = "echo-server"
CRASH = "crash-loop"
ECHO_PORT = 8080


@dataclass
class NsWorld:
    lab: NetLab
    stack: Stack
    enforcer: Proc
    svc: str
    crash_ns: str
    gone_ns: str


def ns_inventory(svc: str, crash_ns: str | None = None, gone_ns: str | None = None) -> str:
    """svc: a shell container and a long-running echo server on 127.0.0.1:8080;
    crash_ns: a container that exits 1 after 0.2 s, for ever; gone_ns: just a shell."""
    echo = [sys.executable, "-u", SERVERS, "echo", "--listen", f"127.0.0.1:{ECHO_PORT}"]
    base = f"applications.{APP}.service-instances"
    text = (
        f"[{base}.{SVC}]\nnetns = {toml_str(svc)}\n"
        f"[{base}.{SVC}.containers.{SHELL}]\n"
        f"[{base}.{SVC}.containers.{ECHO}]\ncommand = [{', '.join(map(toml_str, echo))}]\n"
    )
    if crash_ns is not None:
        text += (
            f"[{base}.{CRASHY}]\nnetns = {toml_str(crash_ns)}\n"
            f'[{base}.{CRASHY}.containers.{CRASH}]\ncommand = ["/bin/sh", "-c", "sleep 0.2; exit 1"]\n'
        )
    if gone_ns is not None:
        text += f"[{base}.{GONE}]\nnetns = {toml_str(gone_ns)}\n[{base}.{GONE}.containers.{SHELL}]\n"
    return text


def wait_echo_ready(enforcer: Proc) -> None:
    """The echo container prints READY once listening; the enforcer passes it on, prefixed."""
    enforcer.log.wait_for(rf"{SVC}/{ECHO}\| READY 127\.0\.0\.1:{ECHO_PORT}", proc=enforcer.popen)


@pytest.fixture(scope="module")
def ns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NsWorld]:
    with NetLab() as lab:
        svc, crash_ns, gone_ns = lab.add_ns("svc"), lab.add_ns("crash"), lab.add_ns("gone")
        with Stack(tmp_path_factory.mktemp("exec-ns")) as stack:
            stack.start_tower()
            enforcer = stack.add_site(NS_SITE, ns_inventory(svc, crash_ns, gone_ns))
            wait_echo_ready(enforcer)
            yield NsWorld(lab, stack, enforcer, svc, crash_ns, gone_ns)


def ns_exec(command: str, instance: str = SVC, container: str = SHELL) -> list[str]:
    return exec_args(NS_SITE, APP, instance, container, command)


def container_groups(world: NsWorld) -> set[int]:
    """Process groups of the declared containers of SVC (each leads its own)."""
    pids = {container_state(world.stack, NS_SITE, APP, SVC, ECHO)["pid"]}
    return {pid for pid in pids if isinstance(pid, int)}


def strays(world: NsWorld) -> dict[int, list[str]]:
    """Processes in SVC's namespace that belong to no declared container."""
    groups = container_groups(world)
    return {
        pid: argv for pid, argv in namespace_processes(world.svc).items() if process_group(pid) not in groups
    }


@pytest.mark.root
def test_crash_looping_container_restarts_as_show_reports(ns: NsWorld) -> None:
    seen: list[dict[str, Any]] = []

    def restarts() -> int:
        state = container_state(ns.stack, NS_SITE, APP, CRASHY, CRASH)
        seen.append(state)
        count = state["restarts"]
        assert isinstance(count, int), state
        return count

    first = wait_until(restarts, deadline=15, what="a first restart")
    later = wait_until(lambda: (n := restarts()) > first and n, deadline=15, what="restarts going up")
    assert later > first >= 1
    for entry in seen:
        assert entry["state"] in {"running", "restarting"}, entry
        if entry["state"] == "running":
            assert isinstance(entry["pid"], int) and entry["pid"] > 0, entry
        else:  # between runs: no pid, and the status it exited with
            assert entry["pid"] is None and entry["exit-code"] == 1, entry
    # The table shows the same container with its count.
    table = ns.stack.supctl("show", "-s", NS_SITE, "-o", "table", "applications", APP, "service-instances")
    assert table.returncode == 0
    row = next(line.split() for line in table.stdout.decode().splitlines() if CRASH in line)
    assert row[:2] == [CRASHY, CRASH] and row[2] in {"running", "restarting"}, row
    assert int(row[-1]) >= later, row


@pytest.mark.root
def test_exec_and_containers_run_inside_the_namespace(ns: NsWorld) -> None:
    inode = os.stat(f"/run/netns/{ns.svc}").st_ino
    result = run(ns.stack, ns_exec("stat -L -c %i /proc/self/ns/net; kill -TERM $$"))
    assert (result.returncode, result.stdout, result.stderr) == (143, f"{inode}\n".encode(), b"")
    # The declared echo server is a process of the namespace...
    echo = container_state(ns.stack, NS_SITE, APP, SVC, ECHO)
    assert echo["state"] == "running" and echo["restarts"] == 0, echo
    assert echo["pid"] in namespace_pids(ns.svc)
    # ...and it is what connect reaches at 127.0.0.1:8080 in the service instance.
    data = b"".join(pattern(3, 1 * MB))
    result = run(ns.stack, do_args(NS_SITE, APP, SVC, "connect", "tcp", str(ECHO_PORT)), data)
    assert result.returncode == 0, result.stderr
    assert hashlib.sha256(result.stdout).digest() == hashlib.sha256(data).digest()


@pytest.mark.root
def test_ctrl_c_ends_the_command_and_leaves_nothing_behind(ns: NsWorld) -> None:
    proc, _ = start_exec(ns.stack, ns_exec("sleep 1000"))
    wait_in_namespace(proc, ns.svc, ["sleep", "1000"])
    proc.popen.send_signal(signal.SIGINT)
    assert wait_exit(proc, 10, ns.enforcer.log) == 130, proc.log.text()  # sleep died of SIGINT: 128 + 2
    assert proc.log.text() == ""
    # Nothing is left in the namespace but the declared containers.
    wait_until(lambda: not strays(ns), deadline=5, what="no stray process in the namespace")
    assert all(argv != ["sleep", "1000"] for argv in namespace_processes(ns.svc).values())


@pytest.mark.root
def test_sigterm_is_passed_on_and_background_jobs_do_not_outlive_the_command(ns: NsWorld) -> None:
    proc, out = start_exec(ns.stack, ns_exec("echo ready; sleep 1000"))
    assert out.read_line(10) == b"ready\n"
    proc.popen.send_signal(signal.SIGTERM)
    assert wait_exit(proc, 10) == 128 + signal.SIGTERM
    # A background job holding stdout open neither delays the exit nor survives it.
    result = run(ns.stack, ns_exec("sleep 1000 & echo started"))
    assert (result.returncode, result.stdout, result.stderr) == (0, b"started\n", b"")
    wait_until(lambda: not strays(ns), deadline=5, what="no stray process in the namespace")


@pytest.mark.root
def test_closed_stdout_resets_the_stream_and_the_site_kills_the_command(ns: NsWorld) -> None:
    proc, out = start_exec(ns.stack, ns_exec("yes"))
    assert out.read_line(10) == b"y\n"
    assert proc.popen.stdout is not None
    proc.popen.stdout.close()
    assert wait_exit(proc) == 128 + signal.SIGPIPE
    assert proc.log.text() == ""
    wait_until(lambda: not strays(ns), deadline=5, what="yes killed in the namespace")


@pytest.mark.root
def test_second_ctrl_c_gives_up_and_the_site_kills_the_group(ns: NsWorld) -> None:
    command = "trap 'echo got INT' INT; echo ready; while :; do sleep 0.1; done"
    proc, out = start_exec(ns.stack, ns_exec(command))
    assert out.read_line(10) == b"ready\n"
    proc.popen.send_signal(signal.SIGINT)
    assert out.read_line(10) == b"got INT\n"  # the command survived the first one
    assert proc.popen.poll() is None
    proc.popen.send_signal(signal.SIGINT)
    assert wait_exit(proc, 10) == 130
    wait_until(lambda: not strays(ns), deadline=5, what="the command's group killed")


@pytest.mark.root
def test_exec_into_a_deleted_namespace_is_one_line(ns: NsWorld) -> None:
    result = run(ns.stack, ns_exec("true", instance=GONE))
    assert result.returncode == 0, result.stderr  # it exists for now
    subprocess.run(["ip", "netns", "delete", ns.gone_ns], check=True)
    result = run(ns.stack, ns_exec("true", instance=GONE))
    assert result.returncode != 0
    line = one_line_error(result.stderr)
    assert f"network namespace {ns.gone_ns} does not exist" in line, line
    assert result.returncode == ExitCode.EXEC_FAILED, line


# --- stopping the enforcer -------------------------------------------------------------


@pytest.fixture
def solo(netlab: NetLab, tmp_path: Path) -> Iterator[tuple[NetLab, str, Stack, Proc]]:
    """A fresh stack whose enforcer the test may stop; SVC runs the echo container."""
    svc = netlab.add_ns("solo")
    with Stack(tmp_path) as stack:
        stack.start_tower()
        enforcer = stack.add_site(NS_SITE, ns_inventory(svc))
        wait_echo_ready(enforcer)
        yield netlab, svc, stack, enforcer


def start_sleep(stack: Stack, svc: str) -> Proc:
    proc, _ = start_exec(stack, ns_exec("sleep 1000"))
    wait_in_namespace(proc, svc, ["sleep", "1000"])
    return proc


@pytest.mark.root
def test_enforcer_sigterm_ends_exec_and_containers(solo: tuple[NetLab, str, Stack, Proc]) -> None:
    _, svc, stack, enforcer = solo
    echo = container_state(stack, NS_SITE, APP, SVC, ECHO)
    assert echo["pid"] in namespace_pids(svc)
    client = start_sleep(stack, svc)
    enforcer.popen.send_signal(signal.SIGTERM)
    assert enforcer.popen.wait(15) == 0, enforcer.log.text()
    assert stack.tower is not None
    assert wait_exit(client, 10, stack.tower.log, enforcer.log) == ExitCode.EXEC_FAILED
    line = one_line_error(client.log.path.read_bytes())
    # The enforcer resets its streams with a reason before it closes its link.
    assert line == "supctl: error: the enforcer is shutting down", line
    assert re.search(rf"container {SVC}/{ECHO} stopped", enforcer.log.text()), enforcer.log.text()
    # Nothing at all is left in the namespace: no exec, no container.
    assert namespace_processes(svc) == {}
    # With the site gone, exec is refused at the tower.
    result = run(stack, ns_exec("true"))
    assert result.returncode == ExitCode.EXEC_FAILED
    assert f"site '{NS_SITE}' is not connected" in one_line_error(result.stderr)


@pytest.mark.root
def test_site_dropping_mid_run_is_one_line(solo: tuple[NetLab, str, Stack, Proc]) -> None:
    _, svc, stack, enforcer = solo
    client = start_sleep(stack, svc)
    enforcer.popen.kill()  # the site vanishes without a word (the lab kills what it leaves)
    enforcer.popen.wait(10)
    assert stack.tower is not None
    assert wait_exit(client, 15, stack.tower.log, enforcer.log) == ExitCode.EXEC_FAILED
    line = one_line_error(client.log.path.read_bytes())
    assert line.startswith(f"supctl: error: lost the link to site {NS_SITE}"), line
