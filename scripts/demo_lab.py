"""The demo's lab: processes, namespaces, the LAN, the tower and the enforcer, and
their teardown (``scripts/demo.py`` tells the guide's story on top of it)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
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


class Lab:
    """Everything the demo starts or creates; :meth:`cleanup` removes it again."""

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
        # --output: the token file is created with mode 0600, as the enforcer requires.
        token_file = str(self.root / "site.token")
        added = self.run(
            [program("control-tower"), "site", "add", "--config", config, SITE, "--output", token_file]
        )
        if added.returncode != 0:
            raise DemoError(f"control-tower site add failed: {added.stderr.decode().strip()}")
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
