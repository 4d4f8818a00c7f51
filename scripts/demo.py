#!/usr/bin/env python3
"""The port-forwarding guide, end to end, on a local stack.

A control tower and an edge enforcer for site ``stockholm-sergel``, whose inventory
declares service instance ``popcorn-controller-service-1`` of ``popcorn-controller``
with two containers the enforcer starts and keeps running in the instance's network
namespace: ``popcorn-web`` (a web server on 127.0.0.1:443) and ``kettle-popper-manager``
(``sleep infinity``, to exec into).  Behind it, on a veth pair, a "LAN" namespace runs
dnsmasq (192.0.2.53: ``destination.example`` is 192.0.2.11) and a web server on
192.0.2.11:443.  Then the guide's commands run one after another, shown as typed.

As root; without root (or with ``--no-netns``) it falls back to the ``host`` runtime:
no namespaces, no DNS server, servers on 127.0.0.1 ports.  Everything it starts or
creates is removed on exit, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

from rich.console import Console
from rich.rule import Rule
from rich.text import Text

SITE = "stockholm-sergel"
APP = "popcorn-controller"
INSTANCE = "popcorn-controller-service-1"
WEB, MANAGER = "popcorn-web", "kettle-popper-manager"
SVC_IP, DNS_IP, LAN_IP = "192.0.2.1", "192.0.2.53", "192.0.2.11"  # one /24 on a veth pair
NAME = "destination.example"
ETC_NETNS = Path("/etc/netns")  # `ip netns exec NS` bind-mounts /etc/netns/NS/* over /etc/*
DEADLINE = 20.0
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
DEFER = {"on": 0, "signum": 0}  # signals arriving while a process is being started

console = Console(highlight=False)


class DemoError(Exception):
    """A step failed; ``str()`` is the one-line reason."""


class Interrupted(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def program(name: str) -> str:
    """A console script of this environment (next to the interpreter), else from PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name, path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")
    if found is None:
        raise DemoError(f"{name} not found next to {sys.executable} or on PATH (run ./scripts/demo)")
    return found


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as supctl: TIME_WAIT is no obstacle
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def do_args(*verb: str) -> list[str]:
    return ["do", "-s", SITE, "applications", APP, "service-instances", INSTANCE, *verb]


def step(command: str, output: str = "", note: str = "") -> None:
    """A command as typed (soft-wrapped, so it copies as one line), its output, a remark."""
    console.print(Text("$ " + command, style="bold cyan"), soft_wrap=True)
    if output.strip():
        console.print(Text(output.rstrip()), soft_wrap=True)
    if note:
        console.print(Text.assemble(("-> ", "green"), note), soft_wrap=True)
    console.print()


def output_of(result: subprocess.CompletedProcess[bytes]) -> str:
    return (result.stdout + result.stderr).decode(errors="replace")


class Demo:
    def __init__(self, netns: bool) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="supctl-demo-"))
        self.procs: list[subprocess.Popen[bytes]] = []
        self.namespaces: list[str] = []
        self.etc_dirs: list[Path] = []
        self.made_etc_netns = False
        self.commands: dict[str, list[str]] = {}  # container -> command, as in the inventory
        self.containers: list[tuple[int, list[str]]] = []  # (pid, command) as the site reported
        self.netns = netns
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SUPCTL_")}
        self.env.update(XDG_CONFIG_HOME=str(self.root / "config"), COLUMNS="200")
        self.tower_log, self.enforcer_log = self.root / "tower.log", self.root / "enforcer.log"

    # -- processes ------------------------------------------------------------

    def spawn(
        self, name: str, argv: list[str], ns: str | None = None
    ) -> tuple[subprocess.Popen[bytes], Path]:
        """Start ``argv`` (in namespace ``ns``) in its own process group; stdout+stderr to a log."""
        log = self.root / f"{name}.log"
        full = ["ip", "netns", "exec", ns, *argv] if ns else argv
        # A signal waits until the process is recorded, so cleanup always knows about it.
        DEFER["on"] = 1
        try:
            with log.open("ab") as out:
                proc = subprocess.Popen(
                    full,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=self.env,
                    start_new_session=True,
                )
            self.procs.append(proc)
        finally:
            DEFER["on"] = 0
        if DEFER["signum"]:
            raise Interrupted(DEFER["signum"])
        return proc, log

    def wait_log(self, log: Path, pattern: str, proc: subprocess.Popen[bytes]) -> re.Match[str]:
        end = time.monotonic() + DEADLINE
        while True:
            text = log.read_text(errors="replace") if log.exists() else ""
            match = re.search(pattern, text)
            if match:
                return match
            if proc.poll() is not None:
                last = text.strip().splitlines()[-1:] or ["(no output)"]
                raise DemoError(f"{log.stem} exited ({proc.returncode}) early: {last[0]}")
            if time.monotonic() > end:
                raise DemoError(f"timed out waiting for {pattern!r} in {log.name}")
            time.sleep(0.05)

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        """Ctrl-C, as a user would; one that does not stop is killed by cleanup()."""
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)

    def run(self, argv: list[str], stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(argv, input=stdin, capture_output=True, env=self.env, timeout=60, check=False)

    def supctl(self, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
        return self.run([program("supctl"), *args], stdin)

    def ip(self, *args: str) -> None:
        result = self.run(["ip", *args])
        if result.returncode != 0:
            raise DemoError(f"ip {' '.join(args)}: {result.stderr.decode().strip()}")

    def docroot(self, name: str, page: str) -> Path:
        path = self.root / name
        path.mkdir()
        (path / "index.html").write_text(page + "\n")
        return path

    def log_lines(self, name: str, pattern: str) -> list[str]:
        return [
            line
            for line in (self.root / f"{name}.log").read_text(errors="replace").splitlines()
            if re.search(pattern, line)
        ]

    # -- set-up ---------------------------------------------------------------

    def start_tower(self) -> str:
        tower_dir = self.root / "tower"
        config = str(tower_dir / "tower.toml")
        if self.run([program("control-tower"), "init", str(tower_dir)]).returncode != 0:
            raise DemoError("control-tower init failed")
        added = self.run([program("control-tower"), "site", "add", "--config", config, SITE])
        if added.returncode != 0:
            raise DemoError(f"control-tower site add failed: {added.stderr.decode().strip()}")
        (self.root / "site.token").write_bytes(added.stdout)
        tower, log = self.spawn(
            "tower", [program("control-tower"), "serve", "--config", config, "--listen", "127.0.0.1:0"]
        )
        url = self.wait_log(log, r"listening on (wss://127\.0\.0\.1:\d+)", tower)[1]
        self.env.update(
            SUPCTL_HOST=url,
            SUPCTL_TOKEN_FILE=str(tower_dir / "admin.token"),
            SUPCTL_CA_FILE=str(tower_dir / "ca.pem"),
        )
        console.print(f"control tower [bold]{url}[/] (in {tower_dir}), site {SITE} registered")
        return url

    def add_namespace(self, role: str) -> str:
        name = f"supctl-demo-{role}-{secrets.token_hex(2)}"
        self.namespaces.append(name)
        self.ip("netns", "add", name)
        self.ip("-n", name, "link", "set", "lo", "up")
        return name

    def start_lan(self) -> str:
        """The service's namespace, and the LAN behind it: dnsmasq and a web server.  Returns
        the service's namespace."""
        svc_ns, lan_ns = self.add_namespace("svc"), self.add_namespace("lan")
        tag = secrets.token_hex(3)
        svc_if, lan_if = f"sdemo{tag}a", f"sdemo{tag}b"
        self.ip(
            "link", "add", svc_if, "netns", svc_ns, "type", "veth", "peer", "name", lan_if, "netns", lan_ns
        )
        for ns, ifname, addrs in ((svc_ns, svc_if, [SVC_IP]), (lan_ns, lan_if, [DNS_IP, LAN_IP])):
            for addr in addrs:
                self.ip("-n", ns, "addr", "add", f"{addr}/24", "dev", ifname)
            self.ip("-n", ns, "link", "set", ifname, "up")
        console.print(
            f"namespaces: service instance [bold]{svc_ns}[/] ({SVC_IP}/24) --veth-- "
            f"LAN [bold]{lan_ns}[/] ({DNS_IP}/24 and {LAN_IP}/24)"
        )
        # --local: the name is answered from here alone (its AAAA gets NODATA, not REFUSED for
        # want of an upstream server), so nslookup succeeds.
        dnsmasq, log = self.spawn(
            "dnsmasq",
            [
                program("dnsmasq"),
                "--no-daemon",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                f"--listen-address={DNS_IP}",
                f"--local=/{NAME}/",
                f"--address=/{NAME}/{LAN_IP}",
                "--conf-file=/dev/null",
                "--pid-file",
                "--log-queries",
                "--log-facility=-",
            ],
            lan_ns,
        )
        self.wait_log(log, r"started, version", dnsmasq)
        self.web_server("lan-host", lan_ns, LAN_IP, 443)
        self.made_etc_netns = not ETC_NETNS.exists()
        ETC_NETNS.mkdir(exist_ok=True)
        etc = ETC_NETNS / svc_ns
        self.etc_dirs.append(etc)
        etc.mkdir()
        (etc / "resolv.conf").write_text(f"nameserver {DNS_IP}\n")
        console.print(
            f"LAN: dnsmasq on {DNS_IP} ({NAME} -> {LAN_IP}), web server on {LAN_IP}:443; "
            f"{etc}/resolv.conf: nameserver {DNS_IP}"
        )
        return svc_ns

    def web_server(self, name: str, ns: str | None, host: str, port: int) -> int:
        root = self.docroot(name, f"{NAME} ({host}) says hello")
        argv = [
            sys.executable,
            "-u",
            "-m",
            "http.server",
            str(port),
            "--bind",
            host,
            "--directory",
            str(root),
        ]
        proc, log = self.spawn(name, argv, ns)
        self.wait_log(log, r"Serving HTTP on", proc)
        return port

    def inventory(self, svc_ns: str | None, web_port: int) -> str:
        base = f"applications.{APP}.service-instances.{INSTANCE}"
        web = [
            sys.executable,
            "-m",
            "http.server",
            str(web_port),
            "--bind",
            "127.0.0.1",
            "--directory",
            str(self.docroot("www", f"{INSTANCE} says hello")),
        ]
        where = (
            f'netns = "{svc_ns}"    # runtime "netns", the default with a netns'
            if svc_ns
            else 'runtime = "host"    # not root: no network namespace'
        )
        as_user = '\nuser = "nobody"\ncwd = "/"' if svc_ns else ""
        self.commands = {WEB: web, MANAGER: ["sleep", "infinity"]}
        return (
            f"[{base}]\n{where}\n\n"
            f"[{base}.containers.{WEB}]\ncommand = {json.dumps(web)}\n"
            f'env = {{ PYTHONUNBUFFERED = "1" }}\n\n'
            f"[{base}.containers.{MANAGER}]\ncommand = {json.dumps(self.commands[MANAGER])}{as_user}\n"
        )

    def containers_running(self) -> dict[str, Any]:
        """The instance as ``supctl show`` has it once every container runs (else {})."""
        result = self.supctl(
            "show", "-s", SITE, "-o", "json", "applications", APP, "service-instances", INSTANCE
        )
        if result.returncode != 0:
            return {}
        data: dict[str, Any] = json.loads(result.stdout)
        states = {c["name"]: c.get("state") for c in data.get("containers", [])}
        return data if states and set(states.values()) == {"running"} else {}

    def setup(self) -> tuple[int, str, int]:
        """Build the stack; return (popcorn-web's port, the LAN web server's address and port)."""
        url = self.start_tower()
        if self.netns:
            svc_ns: str | None = self.start_lan()
            web_port, lan_ip, lan_port = 443, LAN_IP, 443
        else:
            svc_ns, web_port, lan_ip = None, free_port(), "127.0.0.1"
            lan_port = self.web_server("lan-host", None, lan_ip, free_port())
        inventory = self.root / "inventory.toml"
        inventory.write_text(self.inventory(svc_ns, web_port))
        console.print(f"\nthe site's inventory, {inventory}:")
        console.print(Text(inventory.read_text(), style="dim"), soft_wrap=True)
        enforcer, _ = self.spawn(
            "enforcer",
            [
                program("edge-enforcer"),
                "run",
                "--tower",
                url,
                "--site",
                SITE,
                "--token-file",
                str(self.root / "site.token"),
                "--ca-file",
                str(self.root / "tower" / "ca.pem"),
                "--inventory",
                str(inventory),
                "--verbose",
            ],
        )
        self.wait_log(self.tower_log, rf"site {re.escape(SITE)} connected", enforcer)
        end = time.monotonic() + DEADLINE
        while not (instance := self.containers_running()):
            if enforcer.poll() is not None or time.monotonic() > end:
                raise DemoError(f"the containers did not start; see {self.enforcer_log}")
            time.sleep(0.1)
        self.containers = [(c["pid"], self.commands[c["name"]]) for c in instance["containers"]]
        self.wait_log(self.enforcer_log, rf"{WEB}\| Serving HTTP on", enforcer)
        console.print(
            f"edge enforcer connected: [bold]{SITE}[/]; it started containers {WEB} and {MANAGER}\n"
        )
        return web_port, lan_ip, lan_port

    # -- the guide's commands ---------------------------------------------------

    def forward(self, verb: list[str], bind: str, expect: str) -> None:
        args = do_args(*verb, "--bind", bind)
        proc, log = self.spawn(f"supctl-{len(self.procs)}", [program("supctl"), *args])
        port = int(self.wait_log(log, r"Forwarding from \S+:(\d+) ->", proc)[1])
        step(shlex.join(["supctl", *args]), log.read_text(), "supctl keeps running; in another terminal:")
        url = f"http://127.0.0.1:{port}/"
        page = output_of(self.run(["curl", "-sS", "--max-time", "10", url]))
        step(f"curl -sS {url}", page)
        if expect not in page:
            raise DemoError(f"expected {expect!r} through the forward, got {page.strip()!r}")
        self.stop(proc)
        console.print(Text("\n".join(log.read_text().splitlines()[1:]), style="dim"))
        console.print("[dim](supctl stopped with Ctrl-C)[/]\n")

    def main(self) -> None:
        if self.netns:
            console.print(
                "[bold]Running as root:[/] the service instance gets its own network namespace, "
                "with a LAN (DNS server and web server) behind it."
            )
        else:
            why = "--no-netns" if os.geteuid() == 0 else "Not root"
            console.print(
                f"[bold yellow]{why}: falling back to the host runtime[/] (no network namespaces "
                "and no DNS server; the servers listen on 127.0.0.1 ports; exec runs 'uname -a' "
                "instead of nslookup).  Run as root to see the real isolation."
            )
        console.print(Rule("set-up"))
        port, lan_ip, lan_port = self.setup()

        console.print(Rule("What runs at the site"))
        args = ["show", "-s", SITE, "applications", APP, "service-instances"]
        result = self.supctl(*args)
        step(
            shlex.join(["supctl", *args]),
            output_of(result),
            "both containers run: the enforcer started them from the inventory and keeps them running",
        )
        if result.returncode != 0:
            raise DemoError(f"supctl show failed (exit {result.returncode})")

        console.print(Rule("Connect to a port open locally in the service"))
        if (bind := "8443" if port_free(8443) else "0") == "0":
            console.print("[yellow]port 8443 is busy here, so --bind 0 picks a free port[/]")
        self.forward(["connect", "tcp", str(port)], bind, f"{INSTANCE} says hello")
        served = self.log_lines("enforcer", rf"{WEB}\| .*\"GET / ")
        if served:
            console.print(
                f"the enforcer's output: [dim]{served[-1]}[/]\n[green]->[/] served by container "
                f"{WEB}, at 127.0.0.1 of the service instance\n",
                soft_wrap=True,
            )
        if self.netns:
            result = self.run(["curl", "-sS", "--max-time", "5", "http://127.0.0.1:443/"])
            if result.returncode != 0:
                step(
                    "curl -sS http://127.0.0.1:443/",
                    output_of(result),
                    "the host itself cannot reach it: that 127.0.0.1:443 exists only inside the service "
                    "instance's network namespace",
                )

        console.print(
            Rule(
                "Proxy connections to a remote host: first resolve its name at the site"
                if self.netns
                else "exec in a container; proxy connections to a remote host"
            )
        )
        command = f"nslookup {NAME}" if self.netns else "uname -a"
        args = do_args("containers", MANAGER, "exec", command)
        result = self.supctl(*args)
        step(shlex.join(["supctl", *args]), output_of(result) + f"(exit code {result.returncode})")
        if result.returncode != 0 or (self.netns and LAN_IP not in result.stdout.decode()):
            raise DemoError(f"exec {command!r} failed (exit {result.returncode})")
        if self.netns:
            asked = self.log_lines("dnsmasq", rf"query\[A\] {re.escape(NAME)}")
            console.print(
                f"the LAN's dnsmasq log: [dim]{asked[-1] if asked else '(nothing)'}[/]\n[green]->"
                f"[/] nslookup ran in {MANAGER}, in the service instance's namespace, and asked the "
                f"site's DNS server ({DNS_IP}, from /etc/netns/NS/resolv.conf)\n",
                soft_wrap=True,
            )

        self.forward(
            ["connect", "tcp", str(lan_port), "--ip-address", lan_ip], "0", f"{NAME} ({lan_ip}) says hello"
        )
        seen = self.log_lines("lan-host", r"\"GET / ")
        if self.netns and seen:
            console.print(
                f"the LAN web server's log: [dim]{seen[-1]}[/]\n[green]->[/] the connection came "
                f"from the service instance's address {SVC_IP}, not from this host\n",
                soft_wrap=True,
            )

        console.print(Rule("Netcat mode (no --bind): stdin/stdout"))
        args = do_args("connect", "tcp", str(port))
        result = self.supctl(*args, stdin=b"GET / HTTP/1.0\r\n\r\n")
        step(f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | {shlex.join(['supctl', *args])}", output_of(result))
        if result.returncode != 0 or f"{INSTANCE} says hello" not in result.stdout.decode():
            raise DemoError(f"netcat mode failed (exit {result.returncode})")

        console.print(Rule("connect never resolves names"))
        args = do_args("connect", "tcp", "443", "--ip-address", NAME, "--bind", bind)
        result = self.supctl(*args)
        step(shlex.join(["supctl", *args]), f"{result.stderr.decode()}(exit code {result.returncode})")
        if result.returncode != 2:
            raise DemoError(f"expected exit code 2 for a host name, got {result.returncode}")
        console.print(Rule("[bold green]demo complete[/]"))

    # -- teardown ---------------------------------------------------------------

    def cleanup(self) -> None:
        for proc in self.procs:  # the enforcer stops its containers on SIGTERM (5 s grace)
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        end = time.monotonic() + 10
        for proc in self.procs:
            try:
                proc.wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for pid, command in self.containers:  # only if the enforcer could not stop them
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1] == [
                    a.encode() for a in command
                ]:
                    os.killpg(pid, signal.SIGKILL)
        for ns in reversed(self.namespaces):
            for left in self.run(["ip", "netns", "pids", ns]).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(left), signal.SIGKILL)
            # Deleting a namespace deletes the veth end inside it, and with it its peer.
            self.run(["ip", "netns", "delete", ns])
        for etc in self.etc_dirs:
            shutil.rmtree(etc, ignore_errors=True)
        if self.made_etc_netns:
            with contextlib.suppress(OSError):
                ETC_NETNS.rmdir()  # only if empty: another user may have put a namespace there since
        shutil.rmtree(self.root, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--no-netns",
        action="store_true",
        help="use the host runtime (the fallback without root) even as root",
    )
    options = parser.parse_args()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if DEFER["on"]:
            DEFER["signum"] = signum
            return
        raise Interrupted(signum)

    for signum in SIGNALS:
        signal.signal(signum, on_signal)
    demo: Demo | None = None
    code = 0
    try:
        demo = Demo(os.geteuid() == 0 and not options.no_netns)
        demo.main()
    except Interrupted as exc:
        console.print(f"[yellow]demo interrupted ({exc}); cleaning up[/]")
        code = 128 + exc.signum
    except (DemoError, OSError, subprocess.SubprocessError) as exc:
        console.print(f"[bold red]demo failed:[/] {exc}", soft_wrap=True)
        code = 1
    finally:
        for signum in SIGNALS:
            signal.signal(signum, signal.SIG_IGN)  # cleanup must not be cut short
        if demo is not None:
            demo.cleanup()
    return code


if __name__ == "__main__":
    sys.exit(main())
