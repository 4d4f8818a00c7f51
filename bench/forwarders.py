"""The forwarders under test.  Each setup starts its processes in ``procs`` and returns
(its local port, {process role: pid}) once the forward accepts connections."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from procs import HOST, SETUP_TIMEOUT, BenchError, Procs, free_port, in_log, must, port_open, run, tool

# --- the forwarders: each returns (its local port, {process role: pid}) -------

Forward = tuple[int, dict[str, int]]


def setup_socat(procs: Procs, target: int) -> Forward:
    port = free_port()
    listen = f"TCP-LISTEN:{port},fork,reuseaddr,bind={HOST}"
    proc = procs.start("socat", [tool("socat"), listen, f"TCP:{HOST}:{target}"])
    procs.wait("socat", proc, port_open(port))
    return port, {"socat": proc.pid}


def _sshd(procs: Procs) -> tuple[int, list[str]]:
    """A throwaway sshd on 127.0.0.1 (own keys and config, default cipher): its pid and the
    ssh options that log into it as root."""
    d = procs.logdir
    for key in ("host_key", "client_key"):
        run([tool("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)])
    shutil.copy(d / "client_key.pub", d / "authorized_keys")
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
    sshd_port = free_port()
    (d / "sshd_config").write_text(
        f"ListenAddress {HOST}\nPort {sshd_port}\nHostKey {d / 'host_key'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nPermitRootLogin yes\nStrictModes no\nUsePAM no\n"
        "PidFile none\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nAllowTcpForwarding yes\n"
    )
    sshd = procs.start("sshd", [tool("sshd"), "-D", "-e", "-f", str(d / "sshd_config")])
    procs.wait("sshd", sshd, port_open(sshd_port))
    login = [
        "-F", "/dev/null", "-i", str(d / "client_key"), "-o", "StrictHostKeyChecking=no",
        "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
        "-p", str(sshd_port),
    ]  # fmt: skip
    return sshd.pid, login


def setup_ssh(procs: Procs, target: int) -> Forward:
    sshd, login = _sshd(procs)
    port = free_port()
    ssh = procs.start("ssh", [
        tool("ssh"), "-N", "-L", f"{port}:{HOST}:{target}", *login, "-o", "ExitOnForwardFailure=yes",
        f"root@{HOST}",
    ])  # fmt: skip
    procs.wait("ssh -L", ssh, port_open(port))
    return port, {"ssh": ssh.pid, "sshd": sshd}


def setup_ssh_jump(procs: Procs, target: int) -> Forward:
    """``ssh -L`` through a jump host (ProxyJump, spelled as its ProxyCommand so that the
    inner ssh gets the same options): the relay shape of supctl.  The jump session
    decrypts and re-encrypts the outer tunnel, as the tower does; the inner session ends
    at the destination sshd, which connects to the target, as the enforcer does.  Both
    are sessions of the same sshd."""
    sshd, login = _sshd(procs)
    port = free_port()
    jump = " ".join([tool("ssh"), *login, "-W", "%h:%p", f"root@{HOST}"])
    ssh = procs.start("ssh-jump", [
        tool("ssh"), "-N", "-L", f"{port}:{HOST}:{target}", *login, "-o", f"ProxyCommand={jump}",
        "-o", "ExitOnForwardFailure=yes", f"root@{HOST}",
    ])  # fmt: skip
    procs.wait("ssh -J", ssh, port_open(port))
    return port, {"ssh": ssh.pid, "sshd": sshd}


def setup_supctl(procs: Procs, target: int, protocol: str = "tcp") -> Forward:
    d, tower_cli = procs.logdir / "tower", tool("control-tower")
    run([tower_cli, "init", str(d)])
    config = str(d / "tower.toml")
    token_file = str(d / "site.token")  # written with mode 0600, as the enforcer requires
    run([tower_cli, "site", "add", "--config", config, "demo", "--output", token_file])
    tower = procs.start("tower", [tower_cli, "serve", "--config", config, "--listen", f"{HOST}:0"])
    tower_log = procs.logdir / "tower.log"
    url = must(procs.wait("the tower", tower, in_log(tower_log, r"listening on (wss://127\.0\.0\.1:\d+)")))[1]
    inventory = procs.logdir / "inventory.toml"
    inventory.write_text("[applications.bench.service-instances.bench-1]\n")
    enforcer = procs.start("enforcer", [
        tool("edge-enforcer"), "run", "--tower", url, "--site", "demo", "--token-file", token_file,
        "--ca-file", str(d / "ca.pem"), "--inventory", str(inventory),
    ])  # fmt: skip
    procs.wait("the enforcer to connect", tower, in_log(tower_log, r"site demo connected"))
    env = {**os.environ, "SUPCTL_HOST": url, "SUPCTL_TOKEN_FILE": str(d / "admin.token"),
           "SUPCTL_CA_FILE": str(d / "ca.pem"), "XDG_CONFIG_HOME": str(procs.logdir)}  # fmt: skip
    argv = [tool("supctl"), "do", "-s", "demo", "applications", "bench", "service-instances", "bench-1",
            "connect", protocol, str(target), "--bind", "0", "-q"]  # fmt: skip
    end = time.monotonic() + SETUP_TIMEOUT
    for attempt in range(100):  # HTTP 503 until the tower has the site: retry until the deadline
        supctl = procs.start(f"supctl-{attempt}", argv, env)
        log = procs.logdir / f"supctl-{attempt}.log"
        if found := procs.wait("supctl", supctl, in_log(log, r"Forwarding from 127\.0\.0\.1:(\d+)"), end):
            if protocol == "tcp":  # a UDP forward is ready once it said where it listens
                procs.wait("supctl", supctl, port_open(int(found[1])))
            return int(found[1]), {"supctl": supctl.pid, "tower": tower.pid, "enforcer": enforcer.pid}
        if time.monotonic() > end:
            break
        time.sleep(0.1)  # pace the retries (not a synchronisation)
    raise BenchError(f"supctl never started forwarding: {log.read_text().strip()[-300:]}")


SETUPS: dict[str, Callable[[Procs, int], Forward]] = {
    "direct": lambda procs, target: (target, {}), "socat": setup_socat, "ssh -L": setup_ssh,
    "ssh -J": setup_ssh_jump, "supctl": setup_supctl,
}  # fmt: skip
