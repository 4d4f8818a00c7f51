"""Nothing the enforcer starts outlives its session or the enforcer (issue 8, item 13).

* the cgroup module against the real unified hierarchy (root): the mount found in
  /proc/mounts, a child per process, ``setsid`` escapes killed, the sweep of trees
  left by dead enforcers, the fallback without cgroup2;
* end to end, with the real programs: ``setsid sleep &`` from exec dies with its
  session; after ``kill -9`` of the enforcer (with its guardian, or without), a
  restarted enforcer leaves in ``ip netns pids NS`` only what it started itself.

Every cgroup a test makes is removed by its fixture, pass or fail.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest
from e2e_support import wait_until
from exec_support import cmdline, end_execs, exec_args, parent, start_exec, toml_str, wait_in_namespace
from netlab import NetLab, namespace_pids
from stack import Proc, Stack

from supctl.enforcer import cgroups
from supctl.enforcer.cgroups import GUARDIAN_NAME, PREFIX, Cgroup, CgroupTree, site_label, unified_mount
from supctl.enforcer.runtime import ProcessSpec, start_process
from supctl.errors import StreamError
from supctl.protocol import ErrorCode

APP = "popcorn"
INSTANCE = "popcorn-svc-1"
SHELL = "shell"
KEEPER = "keeper"
T = TypeVar("T")
HYBRID_MOUNTS = """\
sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0
cgroup /sys/fs/cgroup/systemd cgroup rw,relatime,name=systemd 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
"""


# --- helpers ---------------------------------------------------------------------------


def unified_root() -> str:
    with open("/proc/mounts") as mounts:
        root = unified_mount(mounts.read())
    assert root is not None, "no cgroup2 in /proc/mounts: process containment cannot be tested"
    return root


def alive(pid: int) -> bool:
    """A live process (a zombie is dead for our purposes)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def cgroup_of(pid: int) -> str | None:
    """The process's cgroup v2 path (the ``0::`` line), or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return None
    return next((line[3:] for line in text.splitlines() if line.startswith("0::")), None)


def pids_running(argv: list[str]) -> list[int]:
    return [int(e) for e in os.listdir("/proc") if e.isdigit() and cmdline(int(e)) == argv and alive(int(e))]


def all_gone(pids: list[int], deadline: float = 10.0) -> None:
    wait_until(lambda: not [p for p in pids if alive(p)], deadline, f"pids {pids} to die")


def trees(site: str) -> list[str]:
    root = unified_root()
    return sorted(n for n in os.listdir(root) if n.startswith(f"{PREFIX}{site_label(site)}@"))


def remove_trees(site: str) -> None:
    """Kill and remove every tree of ``site``, whoever owns it (test teardown)."""
    for name in trees(site):
        cgroups.remove_now(os.path.join(unified_root(), name))


@pytest.fixture
def site() -> Iterator[str]:
    """A site name no other test uses; its cgroup trees are removed afterwards."""
    name = f"procs-{secrets.token_hex(3)}"
    try:
        yield name
    finally:
        if os.geteuid() == 0:
            remove_trees(name)


@pytest.fixture
def tree(site: str) -> Iterator[CgroupTree]:
    opened = CgroupTree.open(site)
    assert opened is not None, "CgroupTree.open found no usable cgroup v2 (see the warning)"
    try:
        yield opened
    finally:
        opened.close()


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 30))


# --- the cgroup module -----------------------------------------------------------------


def test_the_unified_hierarchy_is_found_in_proc_mounts() -> None:
    assert unified_mount(HYBRID_MOUNTS) == "/sys/fs/cgroup/unified"
    assert unified_mount("cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n") == "/sys/fs/cgroup"
    assert unified_mount("cgroup2 /run/my\\040cg cgroup2 rw 0 0\n") == "/run/my cg"
    assert unified_mount(HYBRID_MOUNTS.replace("cgroup2", "cgroup")) is None


def test_site_names_become_safe_directory_names() -> None:
    assert site_label("edge-1.example") == "edge-1.example"
    assert site_label("a/b@c\n") == "a%2fb%40c%0a"
    long = site_label("x" * 300)
    assert len(long) <= 100 and long != site_label("x" * 301)


def test_without_cgroup2_one_warning_and_no_tree(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, site: str
) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text(HYBRID_MOUNTS.replace("cgroup2", "cgroup"))
    with caplog.at_level(logging.WARNING, logger="supctl.enforcer.cgroups"):
        assert CgroupTree.open(site, mounts=str(mounts)) is None
    assert [r.getMessage() for r in caplog.records] == [
        "no process containment (no cgroup2 file system is mounted): "
        "exec'd commands and containers are ended by process group only"
    ]


@pytest.mark.root
def test_tree_child_process_kill_and_remove(tree: CgroupTree, tmp_path: Path) -> None:
    """A process started in a child cgroup is in it from its first instruction; a
    ``setsid`` escape from its group is killed with the cgroup; both directories go."""
    assert os.path.dirname(tree.path) == unified_root()
    assert os.path.basename(tree.path).endswith(f"@{os.getpid()}.{cgroups.start_time(os.getpid())}")
    child = tree.child("exec")
    escaped = tmp_path / "escaped"
    script = f"setsid sleep 612301 </dev/null >/dev/null 2>&1 & echo $! > {escaped}; cat /proc/self/cgroup"

    async def main() -> tuple[bytes, int]:
        spec = ProcessSpec(["sh", "-c", script], {"PATH": "/usr/bin:/bin"}, stdout=asyncio.subprocess.PIPE)
        proc = await start_process(
            ["sh", "-c", script], ProcessSpec(spec.argv, spec.env, stdout=spec.stdout, cgroup=child)
        )
        out, _ = await proc.communicate()
        return out, proc.pid

    out, _ = run(main())
    relative = child.path[len(unified_root()) :]
    assert f"0::{relative}\n".encode() in out  # the command itself ran inside
    sleeper = int(escaped.read_text())
    # setsid(2) runs in the background job: it may not have happened yet when sh exits.
    wait_until(lambda: os.getsid(sleeper) == sleeper, what="the escape's setsid")
    assert alive(sleeper) and cgroup_of(sleeper) == relative
    assert child.pids() == [sleeper]
    assert run(child.release()) is True
    assert not alive(sleeper) and not os.path.exists(child.path)
    tree.close()
    assert not os.path.exists(tree.path)
    assert not os.path.exists(os.path.dirname(child.path))


@pytest.mark.root
def test_a_process_that_cannot_join_its_cgroup_never_runs(tree: CgroupTree, tmp_path: Path) -> None:
    child = tree.child("exec")
    run(child.release())  # gone: the join must fail
    marker = tmp_path / "ran"

    async def main() -> tuple[int, bytes]:
        spec = ProcessSpec(["/bin/sh", "-c", f"touch {marker}"], stderr=asyncio.subprocess.PIPE, cgroup=child)
        proc = await start_process(spec.argv, spec)
        _, err = await proc.communicate()
        assert proc.returncode is not None
        return proc.returncode, err

    code, err = run(main())
    assert (code, err) == (cgroups.ENTER_FAILED, f"supctl: cannot join cgroup {child.path}\n".encode())
    assert not marker.exists()


@pytest.mark.root
def test_a_missing_command_is_still_a_refusal(tree: CgroupTree) -> None:
    spec = ProcessSpec(["no-such-command-here"], {"PATH": "/usr/bin:/bin"}, cgroup=tree.child("exec"))
    with pytest.raises(StreamError) as info:
        run(start_process(spec.argv, spec))
    assert (info.value.code, str(info.value)) == (
        ErrorCode.NOT_FOUND,
        "command not found: no-such-command-here",
    )


@pytest.mark.root
def test_sweep_removes_trees_of_dead_enforcers_only(site: str, tree: CgroupTree) -> None:
    """A tree whose owner is gone (pid and start time) is killed and removed, processes
    in nested cgroups included; the live owner's tree (``tree``: ours) stays."""
    root = unified_root()
    dead = os.path.join(root, f"{PREFIX}{site_label(site)}@4194999.12345")
    nested = Cgroup(os.path.join(dead, "container-1-x"))
    os.makedirs(nested.path)
    argv = ["sleep", "612302"]
    sleeper = subprocess.Popen(cgroups.enter_argv(nested.procs, argv), start_new_session=True)
    try:
        wait_until(lambda: nested.pids() == [sleeper.pid], 5, "the sleeper in its cgroup")
        assert cgroups.sweep(root, site) == [os.path.basename(dead)]
        assert sleeper.wait(5) == -signal.SIGKILL
        assert not os.path.exists(dead)
        # The live owner's tree (a second enforcer of the site on this host) is kept.
        assert trees(site) == [os.path.basename(tree.path)]
        assert cgroups.sweep(root, site) == []
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.root
def test_the_guardian_kills_the_tree_when_its_enforcer_is_killed(site: str) -> None:
    """A process that opened a tree and started ``setsid sleep`` in it is SIGKILLed:
    the sleep dies at once, without any restart."""
    code = (
        "import subprocess, sys\n"
        "from supctl.enforcer.cgroups import CgroupTree, enter_argv\n"
        f"tree = CgroupTree.open({site!r})\n"
        "child = tree.child('exec')\n"
        "subprocess.Popen(enter_argv(child.procs, ['setsid', 'sleep', '612303']), start_new_session=True)\n"
        "print(tree.path, flush=True)\n"
        "sys.stdin.read()\n"
    )
    owner = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert owner.stdout is not None
        path = owner.stdout.readline().decode().strip()
        sleepers = wait_until(lambda: pids_running(["sleep", "612303"]), 5, "the sleep")
        assert os.path.isdir(path)
        owner.kill()
        owner.wait()
        all_gone(sleepers, 5)
        wait_until(lambda: not os.path.exists(path), 10, "the guardian to remove the tree")
    finally:
        owner.kill()
        owner.wait()
        for stream in (owner.stdin, owner.stdout):
            if stream is not None:
                stream.close()


# --- end to end ------------------------------------------------------------------------


def inventory(ns: str) -> str:
    """A shell to exec into, and a container that leaves a setsid'd child behind."""
    base = f"applications.{APP}.service-instances.{INSTANCE}"
    keeper = ["/bin/sh", "-c", "setsid sleep 623401 </dev/null >/dev/null 2>&1 & exec sleep 623402"]
    return (
        f"[{base}]\nnetns = {toml_str(ns)}\n"
        f"[{base}.containers.{SHELL}]\n"
        f"[{base}.containers.{KEEPER}]\ncommand = [{', '.join(map(toml_str, keeper))}]\n"
    )


@pytest.fixture
def world(netlab: NetLab, tmp_path: Path, site: str) -> Iterator[tuple[str, Stack, Proc]]:
    ns = netlab.add_ns("procs")
    with Stack(tmp_path) as stack:
        stack.start_tower()
        enforcer = stack.add_site(site, inventory(ns))
        try:
            yield ns, stack, enforcer
        finally:
            end_execs()


def owned_by(pid: int, site: str, enforcer: Proc) -> bool:
    """Whether ``pid`` runs in a cgroup of ``enforcer``'s tree."""
    me = enforcer.popen.pid
    path = cgroup_of(pid) or ""
    return path.startswith(f"/{PREFIX}{site_label(site)}@{me}.{cgroups.start_time(me)}/")


def keeper_pids(ns: str, besides: Sequence[int] = ()) -> list[int]:
    """The keeper container's two processes in ``ns`` (once both run), other than ``besides``."""
    found = [
        pid
        for pid in namespace_pids(ns)
        if pid not in besides and cmdline(pid) in (["sleep", "623401"], ["sleep", "623402"])
    ]
    return found if len(found) == 2 else []


@pytest.mark.root
@pytest.mark.parametrize("how", ["exits", "client killed"])
def test_setsid_from_exec_dies_with_the_session(world: tuple[str, Stack, Proc], site: str, how: str) -> None:
    ns, stack, enforcer = world
    sleep = ["sleep", "612345"]
    escape = "setsid sleep 612345 </dev/null >/dev/null 2>&1 &"
    if how == "exits":
        result = stack.supctl(*exec_args(site, APP, INSTANCE, SHELL, f"{escape} echo started"))
        assert (result.returncode, result.stdout) == (0, b"started\n"), result.stderr
    else:
        client, _ = start_exec(stack, exec_args(site, APP, INSTANCE, SHELL, f"{escape} exec sleep 612346"))
        wait_in_namespace(client, ns, ["sleep", "612346"])
        wait_in_namespace(client, ns, sleep)
        client.popen.kill()  # the session is lost
        client.popen.wait()
    wait_until(lambda: not pids_running(sleep) and not pids_running(["sleep", "612346"]), 10, "sleeps gone")
    # What is left in the namespace is the keeper container, in the enforcer's tree.
    remaining = namespace_pids(ns)
    assert remaining and all(owned_by(pid, site, enforcer) for pid in remaining), remaining


def guardian_of(enforcer: Proc) -> int:
    found = [
        int(e)
        for e in os.listdir("/proc")
        if e.isdigit() and parent(int(e)) == enforcer.popen.pid and cmdline(int(e))[:1] == [GUARDIAN_NAME]
    ]
    assert len(found) == 1, found
    return found[0]


@pytest.mark.root
@pytest.mark.parametrize("guardian", ["killed too", "alive"])
def test_kill_9_of_the_enforcer_leaves_nothing_after_restart(
    world: tuple[str, Stack, Proc], site: str, guardian: str
) -> None:
    """kill -9 during an exec of ``setsid sleep &`` and while a container runs.  With the
    guardian alive the processes die at once; with it killed too they survive until the
    restarted enforcer sweeps them.  Either way, after the restart ``ip netns pids NS``
    holds only the new enforcer's container."""
    ns, stack, enforcer = world
    old_keeper = wait_until(lambda: keeper_pids(ns), 20, "the keeper container")
    client, _ = start_exec(
        stack,
        exec_args(site, APP, INSTANCE, SHELL, "setsid sleep 612347 </dev/null >/dev/null 2>&1 & sleep 1000"),
    )
    wait_in_namespace(client, ns, ["sleep", "1000"])
    wait_in_namespace(client, ns, ["sleep", "612347"])
    old = namespace_pids(ns)
    # keeper (2), the exec (sh, sleep 1000) and its escape: all in the enforcer's tree
    assert len(old) >= 4 and all(owned_by(pid, site, enforcer) for pid in old), old
    if guardian == "killed too":
        os.kill(guardian_of(enforcer), signal.SIGKILL)
    enforcer.popen.kill()
    enforcer.popen.wait()
    if guardian == "alive":
        all_gone(old, 5)  # no restart needed
        wait_until(lambda: not trees(site), 10, "the guardian to remove the tree")
    else:
        # Nothing else kills them: it is the restarted enforcer's sweep that must.
        assert all(alive(pid) for pid in old), "killed before the restart"
    restarted = stack.start_enforcer(site)
    new_keeper = wait_until(lambda: keeper_pids(ns, old), 20, "the restarted keeper container")
    all_gone(old, 5)
    assert set(old_keeper) <= set(old)
    wait_until(lambda: sorted(namespace_pids(ns)) == sorted(new_keeper), 10, "only the new keeper in the ns")
    assert all(owned_by(pid, site, restarted) for pid in new_keeper)
    me = restarted.popen.pid
    assert trees(site) == [f"{PREFIX}{site_label(site)}@{me}.{cgroups.start_time(me)}"]


def test_a_tree_that_cannot_be_removed_is_a_warning_not_a_crash(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """remove_now on a directory where cgroup.kill cannot be written (here: a plain
    directory, so the write fails like a permission error would) logs and goes on."""
    (tmp_path / "cgroup.kill").mkdir()  # opening it for writing fails with EISDIR
    with caplog.at_level(logging.WARNING, logger="supctl.enforcer.cgroups"):
        assert cgroups.remove_now(str(tmp_path)) is False
    assert [r.getMessage() for r in caplog.records] == [f"cannot remove cgroup {tmp_path}: Is a directory"]
