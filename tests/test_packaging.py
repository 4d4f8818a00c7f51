"""The packaging (issue 13): contrib/systemd's units and the Containerfile stay true to the programs.

* each unit passes ``systemd-analyze verify`` with no complaint at all (it exits 0 even for
  an unknown key or a bad value, so its output must be empty), pointed at the installed
  console scripts;
* each unit's ExecStart, and the image's ENTRYPOINT + CMD, parse with the program's own
  command line (click), and their timeouts fit the drain and stop graces of the code;
* the enforcer, run as root bounded to the unit's CapabilityBoundingSet with
  no_new_privs, does everything a site needs: connect inside a network namespace, a
  container and an exec as another user in a directory only that user may enter, and the
  SIGTERM of that container when it stops;
* the image's HEALTHCHECK command, run against a real tower's metrics listener, says
  healthy, and unhealthy once the tower is gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
from e2e_support import wait_until
from exec_support import exec_args
from netlab import NetLab
from stack import Proc, Stack, do_args, program, write_secret

from supctl.enforcer import cgroups, containers
from supctl.enforcer import cli as enforcer_cli
from supctl.tower import cli as tower_cli
from supctl.tower.limits import DEFAULT_DRAIN_TIMEOUT

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "contrib" / "systemd"
CONTAINERFILE = ROOT / "Containerfile"
CI = os.environ.get("CI") == "true"
CLIS: dict[str, Callable[[], click.Group]] = {
    "control-tower": tower_cli.make_cli,
    "edge-enforcer": enforcer_cli.make_cli,
}
#: What an operator puts in /etc/edge-enforcer/enforcer.env (the unit's header says so).
ENFORCER_ENV = {"SITE": "paris-1", "TOWER": "wss://tower.example:4646"}


# --- reading the files -----------------------------------------------------------------


def unit_values(unit: str, key: str, section: str = "Service") -> list[str]:
    """Every value of ``key`` in ``section`` of a unit file (no continuation lines there)."""
    values, current = [], ""
    for line in (UNITS / unit).read_text().splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
        elif current == section and not line.startswith(("#", ";")) and "=" in line:
            name, _, value = line.partition("=")
            if name.strip() == key:
                values.append(value.strip())
    return values


def unit_value(unit: str, key: str) -> str:
    [value] = unit_values(unit, key)
    return value


def exec_start(unit: str) -> list[str]:
    """ExecStart as systemd runs it: ``${VAR}`` from the EnvironmentFile the unit expects."""
    words = shlex.split(unit_value(unit, "ExecStart"))
    return [re.sub(r"\$\{(\w+)\}", lambda m: ENFORCER_ENV[m[1]], word) for word in words]


def containerfile(instruction: str) -> str:
    """The argument of the one ``INSTRUCTION`` of the Containerfile (continuations joined)."""
    text = re.sub(r"\\\n\s*", " ", CONTAINERFILE.read_text())
    [found] = re.finditer(rf"^{instruction} (.*)$", text, re.MULTILINE)
    return found[1]


def parse_command_line(argv: list[str]) -> click.Context:
    """``PROGRAM SUBCOMMAND OPTIONS...`` parsed by the program's own click command (not run):
    an option it does not have, or a value it refuses, raises click's usage error."""
    name = Path(argv[0]).name
    command = CLIS[name]().commands[argv[1]]
    return command.make_context(f"{name} {argv[1]}", argv[2:])


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        if CI:
            pytest.fail("systemd-analyze is not installed (apt-get install systemd)")
        pytest.skip("systemd-analyze is not installed")
    return found


def verify(unit_text: str, name: str, tmp_path: Path) -> str:
    """Everything ``systemd-analyze verify`` says about a unit with this text; '' if nothing."""
    path = tmp_path / name
    path.write_text(unit_text)
    result = subprocess.run(
        [systemd_analyze(), "verify", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0"},
    )
    said = (result.stdout + result.stderr).strip()
    return said or ("" if result.returncode == 0 else f"exit status {result.returncode}")


def installed(unit: str) -> str:
    """The unit's text, its ExecStart pointed at the installed console script (verify
    insists that the command exists)."""
    name = Path(exec_start(unit)[0]).name
    return (UNITS / unit).read_text().replace(f"/usr/local/bin/{name}", program(name))


# --- the units -------------------------------------------------------------------------

UNIT_FILES = ["control-tower.service", "edge-enforcer.service"]


@pytest.mark.parametrize("unit", UNIT_FILES)
def test_the_unit_passes_systemd_analyze_verify_without_a_word(unit: str, tmp_path: Path) -> None:
    assert verify(installed(unit), unit, tmp_path) == ""


def test_verify_would_catch_a_misspelt_setting(tmp_path: Path) -> None:
    # Why the test above wants silence: verify exits 0 and only warns about these.
    text = installed("control-tower.service").replace("ProtectSystem=strict", "ProtectSystem=stricter")
    text = text.replace("NoNewPrivileges=yes", "NoNewPrivilege=yes")
    said = verify(text, "control-tower.service", tmp_path)
    assert "stricter" in said and "NoNewPrivilege" in said, said


@pytest.mark.parametrize("unit", UNIT_FILES)
def test_the_units_command_line_is_one_the_program_accepts(unit: str) -> None:
    argv = exec_start(unit)
    assert argv[0] == f"/usr/local/bin/{Path(argv[0]).name}"
    ctx = parse_command_line(argv)
    assert ctx.params["log_level"] == "info"


def test_the_tower_unit_serves_its_state_directory_and_outlasts_the_drain() -> None:
    unit = "control-tower.service"
    ctx = parse_command_line(exec_start(unit))
    state = Path("/var/lib") / unit_value(unit, "StateDirectory")
    assert ctx.params["config_path"] == state / "tower.toml"
    assert unit_value(unit, "User") == "supctl-tower"
    # systemd must not SIGKILL a tower that drains for the default drain-timeout.
    assert float(unit_value(unit, "TimeoutStopSec")) > DEFAULT_DRAIN_TIMEOUT + 10
    assert int(unit_value(unit, "LimitNOFILE")) >= 65536
    assert unit_value(unit, "KillMode") == "mixed"
    assert unit_value(unit, "CapabilityBoundingSet") == ""
    assert unit_values(unit, "ExecReload") == []  # SIGHUP would end the tower


def test_the_enforcer_unit_reloads_with_sighup_and_outlasts_the_container_stop() -> None:
    unit = "edge-enforcer.service"
    ctx = parse_command_line(exec_start(unit))
    assert ctx.params["towers"] == (ENFORCER_ENV["TOWER"],) and ctx.params["site"] == ENFORCER_ENV["SITE"]
    assert ctx.params["metrics_listen"].startswith("127.0.0.1:")
    assert unit_value(unit, "ExecReload") == "/bin/kill -HUP $MAINPID"
    # The enforcer stops its containers (grace, then SIGKILL) and removes their cgroups,
    # then its guardian removes the tree: all before systemd's SIGKILL.
    stop = containers.STOP_GRACE + 2 * cgroups.REMOVE_DEADLINE
    assert float(unit_value(unit, "TimeoutStopSec")) > stop
    assert unit_value(unit, "KillMode") == "mixed"
    assert unit_value(unit, "NoNewPrivileges") == "yes"


# --- the Containerfile -----------------------------------------------------------------


def test_the_images_command_line_is_one_the_program_accepts() -> None:
    argv = json.loads(containerfile("ENTRYPOINT")) + json.loads(containerfile("CMD"))
    ctx = parse_command_line(argv)
    volume = Path(json.loads(containerfile("VOLUME"))[0])
    assert ctx.params["config_path"] == volume / "tower.toml"
    assert ctx.params["listen"] == ":4646"  # every interface of the container
    assert containerfile("EXPOSE").split() == ["4646", "9464"]
    assert containerfile("USER") != "root"
    # The same tower directory as the systemd unit's, so the docs describe one layout.
    assert ctx.params["config_path"] == parse_command_line(exec_start(UNIT_FILES[0])).params["config_path"]


def healthcheck(metrics_at: str) -> subprocess.CompletedProcess[str]:
    """The image's HEALTHCHECK command, asking ``metrics_at`` instead of 127.0.0.1:9464."""
    command = json.loads(containerfile("HEALTHCHECK").split(" CMD ", 1)[1])
    assert command[:2] == ["python", "-c"] and "127.0.0.1:9464/healthz" in command[2]
    code = command[2].replace("127.0.0.1:9464", metrics_at)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)


def test_the_images_healthcheck_asks_healthz_of_the_metrics_listener(tmp_path: Path) -> None:
    with Stack(tmp_path) as stack:
        stack.start_tower(config='[metrics]\nlisten = "127.0.0.1:0"\n')
        assert stack.tower is not None
        match = stack.tower.log.wait_for(
            r"metrics and probes on http://(\S+)/metrics", proc=stack.tower.popen
        )
        healthy = healthcheck(match[1])
        assert healthy.returncode == 0, healthy.stderr
        assert stack.tower.stop() == 0
        unhealthy = healthcheck(match[1])
        assert unhealthy.returncode == 1 and "Connection refused" in unhealthy.stderr


# --- the enforcer's capabilities -------------------------------------------------------

APP = "popcorn"
INSTANCE = "popcorn-svc-1"


def bounded(unit: str, drop: str | None = None) -> list[str]:
    """An argv prefix running a command as root with only the unit's capabilities (its
    CapabilityBoundingSet, but ``drop``; root's permitted and effective sets follow it
    at exec) and with no_new_privs, as systemd would."""
    caps = unit_value(unit, "CapabilityBoundingSet").split()
    assert caps and all(c.startswith("CAP_") for c in caps), caps
    assert unit_value(unit, "NoNewPrivileges") == "yes"
    keep = ",".join(f"+{c.removeprefix('CAP_').lower()}" for c in caps if c != drop)
    return ["setpriv", f"--bounding-set=-all,{keep}", "--inh-caps=-all", "--no-new-privs", "--"]


@pytest.fixture
def lab() -> Iterator[NetLab]:
    if os.geteuid() != 0:
        if CI:
            pytest.fail("this test needs root (network namespaces, other users)")
        pytest.skip("needs root")
    with NetLab() as lab:
        yield lab


@dataclass
class Site:
    stack: Stack
    enforcer: Proc
    name: str
    netns: str
    cwd: Path


@contextlib.contextmanager
def bounded_site(lab: NetLab, tmp_path: Path, drop: str | None = None) -> Iterator[Site]:
    """A tower and an enforcer started with the unit's ExecStart options and capabilities
    (but ``drop``), serving one instance in a namespace with a container of user nobody
    whose cwd only nobody may enter (root enters it with CAP_DAC_OVERRIDE)."""
    netns = lab.add_ns("pkg")
    private = tmp_path / "home-nobody"
    private.mkdir(mode=0o700)
    os.chown(private, 65534, 65534)
    tmp_path.chmod(0o755)
    site = f"pkg-{secrets.token_hex(3)}"
    # The trap answers SIGTERM from the enforcer (CAP_KILL: the process is nobody's).
    command = "trap 'echo stopped by SIGTERM; exit 0' TERM; echo uid $(id -u) in $PWD; sleep 600 & wait"
    (tmp_path / "inventory.toml").write_text(f"""
[applications.{APP}.service-instances.{INSTANCE}]
netns = "{netns}"
[applications.{APP}.service-instances.{INSTANCE}.containers.web]
command = ["/bin/sh", "-c", {json.dumps(command)}]
user = "nobody"
cwd = "{private}"
""")
    with Stack(tmp_path / "stack") as stack:
        stack.root.mkdir()
        stack.start_tower()
        write_secret(tmp_path / "site.token", stack.register_site(site) + "\n")
        # The unit's ExecStart, its values pointed at this stack.
        values = {
            "--tower": stack.url,
            "--site": site,
            "--token-file": str(tmp_path / "site.token"),
            "--ca-file": str(stack.dir / "ca.pem"),
            "--inventory": str(tmp_path / "inventory.toml"),
            "--metrics-listen": "127.0.0.1:0",
        }
        unit = exec_start("edge-enforcer.service")
        argv = [program("edge-enforcer"), *(values.get(unit[i - 1], arg) for i, arg in enumerate(unit) if i)]
        enforcer = stack.spawn("enforcer", [*bounded("edge-enforcer.service", drop), *argv])
        assert stack.tower is not None
        stack.tower.log.wait_for(rf"site {site} connected", proc=enforcer.popen)
        yield Site(stack, enforcer, site, netns, private)


def test_the_enforcer_does_its_work_with_only_the_units_capabilities(lab: NetLab, tmp_path: Path) -> None:
    with bounded_site(lab, tmp_path) as site:
        echo = lab.start_server(site.netns, "echo")
        stack, enforcer = site.stack, site.enforcer
        enforcer.log.wait_for(rf"web\| uid 65534 in {re.escape(str(site.cwd))}", proc=enforcer.popen)
        assert "no process containment" not in enforcer.log.text()  # its cgroups work too

        # connect: a socket made inside the namespace (setns: CAP_SYS_ADMIN).
        args = do_args(
            site.name, APP, INSTANCE, "connect", "tcp", str(echo.port), "--ip-address", "127.0.0.1"
        )
        result = stack.supctl(*args, input=b"through the namespace\n")
        assert (result.returncode, result.stdout) == (0, b"through the namespace\n"), result.stderr

        # exec as the container's user, in its directory (ip netns exec, setpriv).
        result = stack.supctl(*exec_args(site.name, APP, INSTANCE, "web", "id -u; pwd"))
        assert (result.returncode, result.stdout.decode()) == (0, f"65534\n{site.cwd}\n"), result.stderr

        # Stopping: SIGTERM reaches nobody's container, which ends in time.
        assert enforcer.stop(signal.SIGTERM, grace=20) == 0, enforcer.log.text()
        assert "web| stopped by SIGTERM" in enforcer.log.text(), enforcer.log.text()
        wait_until(lambda: netns_pids(site.netns) == [echo.proc.pid], what="the container to end")


# What the enforcer says without each capability (docs/operations.md has the same list).
# CAP_KILL is not here: without it the container ignores the stop, and the enforcer waits.
WITHOUT = {
    "CAP_SYS_ADMIN": r'web\| setting the network namespace "sct-pkg-\w+" failed: Operation not permitted',
    "CAP_SETUID": r"web\| setpriv: setresuid failed: Operation not permitted",
    "CAP_SETGID": r"web\| setpriv: setresgid failed: Operation not permitted",
    "CAP_DAC_OVERRIDE": r"no process containment \(cannot create \S+: Permission denied\)",
}


@pytest.mark.parametrize("cap", sorted(WITHOUT))
def test_each_capability_of_the_unit_is_needed(lab: NetLab, tmp_path: Path, cap: str) -> None:
    assert cap in unit_value("edge-enforcer.service", "CapabilityBoundingSet").split()
    with bounded_site(lab, tmp_path, drop=cap) as site:
        site.enforcer.log.wait_for(WITHOUT[cap], proc=site.enforcer.popen)
        assert "uid 65534" not in site.enforcer.log.text()


def netns_pids(ns: str) -> list[int]:
    listed = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, check=True).stdout
    return [int(pid) for pid in listed.split()]
