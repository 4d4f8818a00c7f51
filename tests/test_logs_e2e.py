"""``supctl ... containers C logs`` end to end: a real tower, two enforcers, supctl processes.

One stack for the module:

* site ``logs-site`` keeps container ``talker`` running (host runtime, no namespace
  needed): each run prints two lines to stdout and two to stderr, numbered by run,
  then waits for the test to let it exit with status 1, so the enforcer restarts it
  (after its backoff) exactly when the test says;
* site ``quiet-site`` declares the same container but its ``[policy] allow-verbs``
  does not name ``logs``;
* user ``bob`` has a policy that allows ``exec`` and nothing else.

The logs plugin reaches the enforcer and supctl through the ``supctl`` entry-point
group of the installed distribution, as any plugin does.
"""

from __future__ import annotations

import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_support import wait_until
from exec_support import end_execs, start_exec, toml_str, wait_exit
from stack import Stack, do_args, one_line_error, program

from supctl.errors import ExitCode

SITE, QUIET_SITE = "logs-site", "quiet-site"
APP, INSTANCE, CONTAINER = "popcorn", "popcorn-1", "talker"
PASSWORD = "correct horse battery staple"
#: One run of the container: its number (kept in ./runs), its lines, then it waits for
#: ./go.N and exits 1.  (The container polls for the file; the test never sleeps.)
TALKER = """
n=$(( $(cat runs 2>/dev/null || echo 0) + 1 ))
echo $n > runs
echo "out $n a"; echo "err $n a" >&2; echo "out $n b"; echo "err $n b" >&2
while [ ! -e go.$n ]; do sleep 0.05; done
exit 1
"""
RESTARTED = b"--- container talker restarted (exit status 1) ---\n"
READERS = """
[[policies.readers.rules]]
effect = "allow"
site = "*"
verb = "exec"
"""


def inventory(talker_dir: Path | None, extra: str = "") -> str:
    text = f'{extra}[applications.{APP}.service-instances.{INSTANCE}]\nruntime = "host"\n'
    text += f"[applications.{APP}.service-instances.{INSTANCE}.containers.{CONTAINER}]\n"
    if talker_dir is not None:
        text += f'command = ["/bin/sh", "-c", {toml_str(TALKER)}]\ncwd = {toml_str(str(talker_dir))}\n'
    return text


def logs(*args: str, site: str = SITE) -> list[str]:
    return do_args(site, APP, INSTANCE, "containers", CONTAINER, "logs", *args)


def expected(runs: int) -> tuple[bytes, bytes]:
    """(stdout, stderr) of ``logs`` after ``runs`` runs of the talker."""
    out = b"".join(b"out %d a\nout %d b\n" % (n, n) for n in range(1, runs + 1))
    err = RESTARTED.join(b"err %d a\nerr %d b\n" % (n, n) for n in range(1, runs + 1))
    return out, err


@pytest.fixture(autouse=True)
def _no_logs_outlives_its_test() -> Iterator[None]:
    yield
    end_execs()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with Stack(tmp_path_factory.mktemp("logs")) as stack:
        stack.start_tower()
        (stack.dir / "policies.toml").write_text(READERS)
        talker_dir = stack.root / "talker"
        talker_dir.mkdir()
        stack.add_site(SITE, inventory(talker_dir, "[verbs.logs]\nbuffer-bytes = 65536\n"))
        stack.add_site(QUIET_SITE, inventory(None, '[policy]\nallow-verbs = ["exec"]\n'))
        add_user = ["user", "add", "--config", str(stack.dir / "tower.toml"), "bob", "--policy", "readers"]
        subprocess.run(
            [program("control-tower"), *add_user],
            input=PASSWORD + "\n",
            text=True,
            check=True,
            capture_output=True,
            env=stack.env,
        )
        wait_until(lambda: stack.supctl(*logs()).stdout == expected(1)[0], 20, "the talker's first run")
        yield stack


def runs(stack: Stack) -> int:
    return int((stack.root / "talker" / "runs").read_text())


def test_stdout_and_stderr_are_kept_apart(stack: Stack) -> None:
    out, err = expected(runs(stack))
    result = stack.supctl(*logs())
    assert (result.returncode, result.stdout, result.stderr) == (0, out, err)
    records = stack.wait_audit(
        lambda r: r["event"] == "stream-closed" and r["verb"] == "logs", "the logs stream's record"
    )
    closed = [r for r in records if r["event"] == "stream-closed" and r["verb"] == "logs"]
    # Both halves ended (not a reset), and the tower counted the bytes it relayed.
    assert {(r["container"], r["result"]) for r in closed} == {(CONTAINER, "ok")}, closed
    assert max(r["bytes-down"] for r in closed) > len(out + err), closed
    assert stack.supctl(*logs("--since", "1d")).stdout == out
    stamped = stack.supctl(*logs("--timestamps"))
    stamp = rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z "
    assert re.fullmatch(rb"(%s%s)+" % (stamp, rb"out \d+ [ab]\n"), stamped.stdout), stamped.stdout
    assert re.sub(stamp, b"", stamped.stdout) == out and re.sub(stamp, b"", stamped.stderr) == err


def test_tail_counts_the_last_lines_of_both_streams(stack: Stack) -> None:
    out, err = expected(runs(stack))
    result = stack.supctl(*logs("--tail", "3"))
    assert result.returncode == 0, result.stderr
    # Each stream's lines are the end of its own; three in all (how the enforcer's two pipe
    # readers interleave the streams is theirs to say).
    assert out.endswith(result.stdout) and err.endswith(result.stderr)
    assert result.stdout.count(b"\n") + result.stderr.count(b"\n") == 3
    nothing = stack.supctl(*logs("--tail", "0"))
    assert (nothing.returncode, nothing.stdout, nothing.stderr) == (0, b"", b"")


def test_follow_goes_on_across_a_restart_until_ctrl_c(stack: Stack) -> None:
    n = runs(stack)
    proc, stdout = start_exec(stack, logs("-f"))
    held, _ = expected(n)
    got = b"".join(stdout.read_line(20) for _ in range(held.count(b"\n")))
    assert got == held  # everything held, then it follows
    (stack.root / "talker" / f"go.{n}").touch()  # run n exits 1; the enforcer restarts it
    assert stdout.read_line(20) == b"out %d a\n" % (n + 1)
    assert stdout.read_line(20) == b"out %d b\n" % (n + 1)
    # The restart is one line on stderr, before the next run's own stderr.
    proc.log.wait_for(f"err {n + 1} b\n", 20, proc.popen)
    assert proc.log.path.read_bytes().endswith(
        b"err %d b\n" % n + RESTARTED + b"err %d a\nerr %d b\n" % (n + 1, n + 1)
    )
    assert proc.popen.poll() is None  # still following
    proc.popen.send_signal(signal.SIGINT)
    assert wait_exit(proc, 15) == 0
    assert b"Traceback" not in proc.log.path.read_bytes()


def test_a_bad_since_is_one_line(stack: Stack) -> None:
    result = stack.supctl(*logs("--since", "5 minutes"))
    assert result.returncode == ExitCode.USAGE
    assert "--since must be a duration like 10s, 5m, 2h or 1d" in one_line_error(result.stderr)


def test_a_user_policy_without_logs_is_refused_at_the_tower(stack: Stack) -> None:
    env = dict(stack.env)
    del env["SUPCTL_TOKEN_FILE"]
    env["XDG_CONFIG_HOME"] = str(stack.root / "config-bob")
    login = stack.supctl("do", "login", "bob", input=(PASSWORD + "\n").encode(), env=env)
    assert login.returncode == 0, login.stderr
    result = stack.supctl(*logs(), env=env)
    assert result.returncode == ExitCode.DENIED
    line = one_line_error(result.stderr)
    assert line == f"supctl: error: policy refuses logs in {CONTAINER} at {SITE} for user bob", line
    assert result.stdout == b""


def test_a_site_that_does_not_allow_logs_refuses_the_stream(stack: Stack) -> None:
    result = stack.supctl(*logs(site=QUIET_SITE))
    assert result.returncode == ExitCode.DENIED
    line = one_line_error(result.stderr)
    assert line == "supctl: error: the site's local policy refuses verb 'logs' (allow-verbs)", line
    assert result.stdout == b""
