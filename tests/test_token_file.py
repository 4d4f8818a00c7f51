"""The site token file (issue 8, item 6): private to the enforcer's user, or refused.

On the old code ``control-tower site add > site.token`` left the token readable by
every local user (umask 022), and the enforcer read it without a word, so any
account on the site's host - a command exec'd as another ``user`` included - could
take the token and be the site.  Here:

* ``site add`` / ``site rotate --output FILE`` create the file with mode 0600
  from the start (whatever the umask), and a redirect to a readable file warns;
* the enforcer refuses a token file that group or others can read, that is not a
  regular file, or that another user owns: exit 2, one line naming the fix;
* an exec'd command running as another user cannot read the token, nor find it
  in its environment, its open files or the enforcer's ``/proc`` entries.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from exec_support import exec_args
from stack import Stack, one_line_error, program, write_secret

from supctl.enforcer.tokenfile import MAX_TOKEN_FILE, read_site_token
from supctl.errors import ExitCode, UsageError

TOKEN = "sct_site_" + "A" * 43
SITE, APP, INST, SHELL = "site1", "app", "inst", "shell"
NOBODY = 65534


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory every user may enter (as /etc/supctl is): only a file's own mode
    keeps others out of it, unlike pytest's tmp_path under a 0700 root."""
    path = Path(tempfile.mkdtemp(prefix="supctl-token-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def token_file(directory: Path, mode: int, text: str = TOKEN + "\n", name: str = "site.token") -> Path:
    path = write_secret(directory / name, text)
    path.chmod(mode)
    return path


# --- the check --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o700])
def test_a_private_token_file_is_read(tmp_path: Path, mode: int) -> None:
    assert read_site_token(token_file(tmp_path, mode)) == TOKEN


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o602, 0o666])
def test_a_token_file_others_can_reach_is_refused(tmp_path: Path, mode: int) -> None:
    path = token_file(tmp_path, mode)
    with pytest.raises(UsageError) as info:
        read_site_token(path)
    assert str(info.value) == f"token file {path} can be read by others (mode {mode:04o}): chmod 600 {path}"
    assert info.value.exit_code == ExitCode.USAGE


def test_a_symlink_is_judged_by_the_file_it_leads_to(tmp_path: Path) -> None:
    link = tmp_path / "link.token"
    link.symlink_to(token_file(tmp_path, 0o644, name="real.token"))
    with pytest.raises(UsageError, match=r"can be read by others \(mode 0644\): chmod 600"):
        read_site_token(link)
    (tmp_path / "real.token").chmod(0o600)
    assert read_site_token(link) == TOKEN  # systemd credentials and Kubernetes secrets are links


def test_a_token_file_of_another_user_is_refused(tmp_path: Path) -> None:
    path = token_file(tmp_path, 0o600)
    os.chown(path, NOBODY, NOBODY)  # another user could rewrite it, and reads it anyway
    uid = os.geteuid()
    with pytest.raises(UsageError) as info:
        read_site_token(path)
    assert str(info.value) == (
        f"token file {path} belongs to uid {NOBODY}, not to the enforcer's user (uid {uid}): chown {uid} {path}"
    )
    # And an enforcer running as another user than the owner (root here) is refused the same way.
    with pytest.raises(UsageError, match=rf"belongs to uid {uid}, not to the enforcer's user \(uid 1234\)"):
        read_site_token(token_file(tmp_path, 0o600, name="root.token"), uid=1234)


def test_what_is_not_a_regular_file_is_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)  # opened without blocking, then refused: no hang waiting for a writer
    directory = tmp_path / "dir"
    directory.mkdir(mode=0o700)
    for path in (fifo, directory, Path("/dev/null")):
        with pytest.raises(UsageError, match=rf"^token file {path} is not a regular file$"):
            read_site_token(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "is empty"),
        ("\n\n", "is empty"),
        ("a" * (MAX_TOKEN_FILE + 1), f"is larger than {MAX_TOKEN_FILE} bytes"),
        ("sct_site_a sct_site_b\n", "holds more than one token"),
        ("sct_site_\u00e9\n", "holds non-ASCII bytes"),
    ],
)
def test_a_file_that_is_no_token_is_refused(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        read_site_token(token_file(tmp_path, 0o600, text))


def test_a_missing_token_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"^cannot read token file .*/gone: No such file or directory$"):
        read_site_token(tmp_path / "gone")


# --- the enforcer ------------------------------------------------------------------------------


def run_enforcer(stack: Stack, token: Path, deadline: float = 30.0) -> tuple[int, str]:
    """``edge-enforcer run`` with ``token``; its exit status and its one line of stderr.

    On the old code the enforcer started with any token file and ran on: the deadline
    turns that into a failure instead of a hang."""
    inventory = stack.root / "inv.toml"
    inventory.write_text(f"[applications.{APP}.service-instances.{INST}]\n")
    argv = [program("edge-enforcer"), "run", "--tower", stack.url or "wss://127.0.0.1:9", "--site", SITE]
    argv += [
        "--token-file",
        str(token),
        "--inventory",
        str(inventory),
        "--ca-file",
        str(stack.dir / "ca.pem"),
    ]
    proc = stack.spawn("enforcer-refused", argv)
    try:
        code = proc.popen.wait(deadline)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the enforcer started with {token}: {proc.log.text()}") from None
    return code, one_line_error(proc.log.path.read_bytes())


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    with Stack(tmp_path) as stack:
        stack.start_tower()
        yield stack


@pytest.mark.parametrize(
    "case", ["mode 0644", "mode 0640", "symlink to 0644", "owned by nobody", "directory"]
)
def test_the_enforcer_refuses_an_unsafe_token_file(stack: Stack, shared_dir: Path, case: str) -> None:
    token = stack.register_site(SITE)
    path = token_file(shared_dir, 0o600, token + "\n")
    expected = f"chmod 600 {path}"
    if case.startswith("mode"):
        path.chmod(int(case[-4:], 8))
    elif case == "symlink to 0644":
        path.chmod(0o644)
        link = shared_dir / "link.token"
        link.symlink_to(path)
        path, expected = link, f"chmod 600 {link}"
    elif case == "owned by nobody":
        os.chown(path, NOBODY, NOBODY)
        expected = f"belongs to uid {NOBODY}, not to the enforcer's user (uid 0): chown 0 {path}"
    else:
        path = shared_dir / "a-directory"
        path.mkdir(mode=0o700)
        expected = "is not a regular file"
    code, line = run_enforcer(stack, path)
    assert code == ExitCode.USAGE
    assert line.startswith(f"edge-enforcer: error: token file {path} ") and line.endswith(expected), line
    assert stack.tower is not None and "site1 connected" not in stack.tower.log.text()


# --- writing the token -------------------------------------------------------------------------


def control_tower(stack: Stack, shell: str) -> subprocess.CompletedProcess[str]:
    """Run a ``control-tower`` command line through sh (for umask and redirects)."""
    script = shell.replace("CT", f"{program('control-tower')} ").replace("CFG", str(stack.dir / "tower.toml"))
    return subprocess.run(["sh", "-c", script], capture_output=True, text=True, env=stack.env, check=False)


def test_site_add_and_rotate_write_the_token_file_private(stack: Stack, shared_dir: Path) -> None:
    out = shared_dir / "site.token"
    # umask 000: without care, the file would be created world-readable (and writable).
    added = control_tower(stack, f"umask 000; CT site add --config CFG {SITE} --output {out}")
    assert (added.returncode, added.stdout) == (0, ""), added.stderr
    assert f"site token written to {out} (mode 0600)" in added.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600 and out.stat().st_uid == os.geteuid()
    first = out.read_text()
    assert first.startswith("sct_site_") and first.endswith("\n") and first.count("\n") == 1
    # rotate --output replaces a file that others could read with a private one (a new inode).
    out.chmod(0o644)
    inode = out.stat().st_ino
    rotated = control_tower(stack, f"umask 000; CT site rotate --config CFG {SITE} --output {out}")
    assert (rotated.returncode, rotated.stdout) == (0, ""), rotated.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600 and out.stat().st_ino != inode
    assert out.read_text() != first
    assert read_site_token(out) == out.read_text().strip()
    assert not [p.name for p in shared_dir.iterdir() if p.name != "site.token"]  # no temporary left


def test_site_add_to_a_readable_redirect_warns(stack: Stack, shared_dir: Path) -> None:
    out = shared_dir / "site.token"
    added = control_tower(stack, f"umask 022; CT site add --config CFG {SITE} > {out}")
    assert added.returncode == 0, added.stderr
    assert "warning: stdout is a file that others can read (mode 0644)" in added.stderr
    assert "Use --output FILE, or umask 077 before redirecting" in one_line_error(added.stderr.encode())
    code, line = run_enforcer(stack, out)  # and the enforcer will not use it
    assert code == ExitCode.USAGE and line.endswith(f"chmod 600 {out}")
    # The safe ways of the README: umask 077 first, or --output.
    quiet = control_tower(stack, f"umask 077; CT site rotate --config CFG {SITE} > {out}.2")
    assert quiet.returncode == 0 and "warning" not in quiet.stderr
    assert stat.S_IMODE(Path(f"{out}.2").stat().st_mode) == 0o600


def test_site_add_output_to_a_missing_directory_registers_nothing(stack: Stack) -> None:
    added = control_tower(stack, f"CT site add --config CFG {SITE} --output /nonexistent/dir/site.token")
    assert added.returncode == ExitCode.USAGE
    assert "directory /nonexistent/dir does not exist" in one_line_error(added.stderr.encode())
    assert stack.control_tower("site", "list", "--config", str(stack.dir / "tower.toml")) == ""


# --- exec'd commands as another user -----------------------------------------------------------


def test_a_command_run_as_another_user_cannot_get_the_token(stack: Stack, shared_dir: Path) -> None:
    token = stack.register_site(SITE)
    path = token_file(shared_dir, 0o600, token + "\n")
    prefix = f"[applications.{APP}.service-instances.{INST}]"
    inventory = shared_dir / "inv.toml"
    inventory.write_text(
        f'{prefix}\nruntime = "host"\n[{prefix[1:-1]}.containers.{SHELL}]\nuser = "nobody"\n'
    )
    enforcer = stack.start_enforcer(SITE, token_file=path, inventory=inventory)
    pid = enforcer.popen.pid
    probe = (
        f"id -u; cat {path} 2>&1; cat /proc/{pid}/environ 2>&1; echo; env; "
        f'for fd in /proc/$$/fd/*; do echo "fd $(readlink $fd)"; done; '
        f"cat /proc/{pid}/cmdline | tr '\\0' ' '"
    )
    result = stack.supctl(*exec_args(SITE, APP, INST, SHELL, probe))
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr
    assert out.splitlines()[0] == str(NOBODY)
    assert f"cat: {path}: Permission denied" in out
    assert f"cat: /proc/{pid}/environ: Permission denied" in out
    assert token not in out  # not in the file, its environment, its fds, nor the enforcer's /proc
    fds = [line for line in out.splitlines() if line.startswith("fd ")]
    assert fds and not [fd for fd in fds if str(shared_dir) in fd], fds
    env = out.split(f"/proc/{pid}/environ: Permission denied", 1)[1]
    assert str(path) not in env.split("fd ")[0]  # the environment does not even name the file
    assert f"--token-file {path}" in out  # only the enforcer's command line does, as ps shows
