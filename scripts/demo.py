#!/usr/bin/env python3
"""supctl port forwarding, end to end, on a local stack.

Starts a control tower and an edge enforcer for site ``stockholm-sergel``, puts
the service instance ``popcorn-controller-service-1`` in its own network
namespace (with a web server on 127.0.0.1:443 that only the namespace can
reach) and a "LAN" namespace behind it (192.0.2.11), then runs the commands of
the port-forwarding guide.  As root; without root it falls back to host
networking.  Everything it starts or creates is removed on exit.
"""

from __future__ import annotations

import contextlib
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
import urllib.request
from pathlib import Path
from types import FrameType

from rich.console import Console
from rich.panel import Panel
from rich.rule import Rule
from rich.text import Text

SITE = "stockholm-sergel"
APP = "popcorn-controller"
INSTANCE = "popcorn-controller-service-1"
CONTAINER = "kettle-popper-manager"
SVC_IP, LAN_IP = "192.0.2.1", "192.0.2.11"  # on a /24 veth pair
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
    found = shutil.which(name)
    if found is None:
        raise DemoError(f"{name} not found next to {sys.executable} or on PATH (run ./scripts/demo)")
    return found


def port_free(port: int) -> bool:
    with socket.socket() as sock:
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


def show(command: str, output: str = "", note: str = "") -> None:
    console.print(Panel(Text(command, style="bold"), title="$", title_align="left", border_style="cyan"))
    if output.strip():
        console.print(Text(output.rstrip()))
    if note:
        console.print(f"[green]->[/] {note}")
    console.print()


class Demo:
    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="supctl-demo-"))
        self.procs: list[subprocess.Popen[bytes]] = []
        self.namespaces: list[str] = []
        self.netns = os.geteuid() == 0
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SUPCTL_")}
        self.env.update(XDG_CONFIG_HOME=str(self.root / "config"), COLUMNS="200")
        self.tower_log = self.root / "tower.log"

    # -- processes ------------------------------------------------------------

    def spawn(self, name: str, argv: list[str], ns: str | None = None) -> tuple[subprocess.Popen[bytes], Path]:
        """Start ``argv`` (in namespace ``ns``) in its own process group; stdout+stderr to a log."""
        log = self.root / f"{name}.log"
        full = ["ip", "netns", "exec", ns, *argv] if ns else argv
        # A signal waits until the process is recorded, so cleanup always knows about it.
        DEFER["on"] = 1
        try:
            with log.open("ab") as out:
                proc = subprocess.Popen(full, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                        env=self.env, start_new_session=True)
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
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def run(self, argv: list[str], stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(argv, input=stdin, capture_output=True, env=self.env, timeout=60, check=False)

    def supctl(self, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
        return self.run([program("supctl"), *args], stdin)

    def ip(self, *args: str) -> None:
        result = self.run(["ip", *args])
        if result.returncode != 0:
            raise DemoError(f"ip {' '.join(args)}: {result.stderr.decode().strip()}")

    def web_server(self, name: str, ns: str | None, host: str, port: int, page: str) -> None:
        docroot = self.root / name
        docroot.mkdir()
        (docroot / "index.html").write_text(page + "\n")
        argv = [sys.executable, "-u", "-m", "http.server", str(port), "--bind", host, "--directory", str(docroot)]
        proc, log = self.spawn(name, argv, ns)
        self.wait_log(log, r"Serving HTTP on", proc)

    # -- set-up ---------------------------------------------------------------

    def add_namespace(self, role: str) -> str:
        name = f"supctl-demo-{role}-{secrets.token_hex(2)}"
        self.namespaces.append(name)
        self.ip("netns", "add", name)
        self.ip("-n", name, "link", "set", "lo", "up")
        return name

    def setup(self) -> tuple[int, str, int]:
        """Build the stack; return (service port, LAN address, LAN port)."""
        tower_dir = self.root / "tower"
        config = str(tower_dir / "tower.toml")
        if self.run([program("control-tower"), "init", str(tower_dir)]).returncode != 0:
            raise DemoError("control-tower init failed")
        added = self.run([program("control-tower"), "site", "add", "--config", config, SITE])
        if added.returncode != 0:
            raise DemoError(f"control-tower site add failed: {added.stderr.decode().strip()}")
        (self.root / "site.token").write_bytes(added.stdout)
        tower, log = self.spawn("tower", [program("control-tower"), "serve", "--config", config,
                                          "--listen", "127.0.0.1:0"])
        url = self.wait_log(log, r"listening on (wss://127\.0\.0\.1:\d+)", tower)[1]
        self.env.update(SUPCTL_HOST=url, SUPCTL_TOKEN_FILE=str(tower_dir / "admin.token"),
                        SUPCTL_CA_FILE=str(tower_dir / "ca.pem"))
        console.print(f"control tower [bold]{url}[/] (in {tower_dir}), site {SITE} registered")

        svc_ns: str | None = None
        if self.netns:
            svc_ns, lan_ns = self.add_namespace("svc"), self.add_namespace("lan")
            tag = secrets.token_hex(3)
            svc_if, lan_if = f"sdemo{tag}a", f"sdemo{tag}b"
            self.ip("link", "add", svc_if, "netns", svc_ns, "type", "veth", "peer", "name", lan_if,
                    "netns", lan_ns)
            for ns, ifname, addr in ((svc_ns, svc_if, SVC_IP), (lan_ns, lan_if, LAN_IP)):
                self.ip("-n", ns, "addr", "add", f"{addr}/24", "dev", ifname)
                self.ip("-n", ns, "link", "set", ifname, "up")
            svc_port, lan_ip, lan_port = 443, LAN_IP, 443
            console.print(f"namespaces: service instance [bold]{svc_ns}[/] ({SVC_IP}/24) "
                          f"--veth-- LAN host [bold]{lan_ns}[/] ({LAN_IP}/24)")
        else:
            lan_ns, svc_port, lan_ip, lan_port = None, free_port(), "127.0.0.1", free_port()
        self.web_server("service", svc_ns, "127.0.0.1", svc_port, f"{INSTANCE} says hello")
        self.web_server("lan-host", lan_ns, lan_ip, lan_port, f"destination.example ({lan_ip}) says hello")
        console.print(f"web servers: {INSTANCE} on 127.0.0.1:{svc_port}"
                      f"{' inside ' + svc_ns if svc_ns else ''}, destination.example on {lan_ip}:{lan_port}")

        netns_line = f'netns = "{svc_ns}"\n' if svc_ns else "# host networking: no netns\n"
        inventory = self.root / "inventory.toml"
        inventory.write_text(
            f"[applications.{APP}.service-instances.{INSTANCE}]\n{netns_line}\n"
            f"[applications.{APP}.service-instances.{INSTANCE}.containers.{CONTAINER}]\n"
            f'command = ["python3", "-m", "http.server", "{svc_port}"]\n'
        )
        enforcer, _ = self.spawn("enforcer", [
            program("edge-enforcer"), "run", "--tower", url, "--site", SITE,
            "--token-file", str(self.root / "site.token"), "--ca-file", str(tower_dir / "ca.pem"),
            "--inventory", str(inventory), "--verbose"])
        self.wait_log(self.tower_log, rf"site {re.escape(SITE)} connected", enforcer)
        console.print(f"edge enforcer connected: [bold]{SITE}[/] (inventory {inventory})\n")
        return svc_port, lan_ip, lan_port

    # -- the guide's commands ---------------------------------------------------

    def fetch(self, url: str) -> str:
        curl = shutil.which("curl")
        if curl is None:
            with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - a local http URL
                body: bytes = response.read()
                return body.decode()
        result = self.run([curl, "-sS", "--max-time", "10", url])
        return (result.stdout + result.stderr).decode()

    def forward(self, verb: list[str], bind: str, expect: str) -> None:
        args = do_args(*verb, "--bind", bind)
        proc, log = self.spawn(f"supctl-{len(self.procs)}", [program("supctl"), *args])
        port = int(self.wait_log(log, r"Forwarding from \S+:(\d+) ->", proc)[1])
        show(shlex.join(["supctl", *args]), log.read_text(), "supctl keeps running; in another terminal:")
        url = f"http://127.0.0.1:{port}/"
        page = self.fetch(url)
        show(f"curl -s {url}", page)
        if expect not in page:
            raise DemoError(f"expected {expect!r} through the forward, got {page.strip()!r}")
        self.stop(proc)
        console.print(Text("\n".join(log.read_text().splitlines()[1:]), style="dim"))
        console.print("[dim](supctl stopped with Ctrl-C)[/]\n")

    def main(self) -> None:
        if self.netns:
            console.print("[bold]Running as root:[/] the service instance gets its own network namespace.")
        else:
            console.print("[bold yellow]Not root: falling back to host networking[/] (no network namespaces;"
                          " the service and the remote host listen on 127.0.0.1 ports; the inventory has"
                          " no netns).  Run as root to see the real isolation.")
        console.print(Rule("set-up"))
        svc_port, lan_ip, lan_port = self.setup()

        console.print(Rule("Connect to a port open locally in the service"))
        bind = "8443" if port_free(8443) else "0"
        if bind == "0":
            console.print("[yellow]port 8443 is busy here, so --bind 0 picks a free port[/]")
        self.forward(["connect", "tcp", str(svc_port)], bind, f"{INSTANCE} says hello")
        if self.netns:
            result = self.run(["curl", "-sS", "--max-time", "5", "http://127.0.0.1:443/"])
            show("curl -sS http://127.0.0.1:443/", result.stderr.decode() or result.stdout.decode(),
                 "the host itself cannot reach the service: its 127.0.0.1:443 exists only inside "
                 "the service instance's network namespace")

        console.print(Rule("Proxy connections to a remote host"))
        self.forward(["connect", "tcp", str(lan_port), "--ip-address", lan_ip], "0",
                     f"destination.example ({lan_ip}) says hello")
        seen = [line for line in (self.root / "lan-host.log").read_text().splitlines() if "GET /" in line]
        if self.netns and seen:
            console.print(f"the LAN host's log: [dim]{seen[-1]}[/]\n[green]->[/] the connection came from "
                          f"the service instance's address {SVC_IP}, not from this host\n")

        console.print(Rule("Netcat mode (no --bind): stdin/stdout"))
        args = do_args("connect", "tcp", str(svc_port))
        result = self.supctl(*args, stdin=b"GET / HTTP/1.0\r\n\r\n")
        show(f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | {shlex.join(['supctl', *args])}",
             result.stdout.decode() + result.stderr.decode())
        if result.returncode != 0 or f"{INSTANCE} says hello" not in result.stdout.decode():
            raise DemoError(f"netcat mode failed (exit {result.returncode})")

        console.print(Rule("Names are not resolved"))
        args = do_args("connect", "tcp", "443", "--ip-address", "destination.example", "--bind", bind)
        result = self.supctl(*args)
        show(shlex.join(["supctl", *args]), f"{result.stderr.decode()}(exit code {result.returncode})")
        if result.returncode != 2:
            raise DemoError(f"expected exit code 2 for a host name, got {result.returncode}")
        console.print("The exec verb (to run nslookup in a container at the site) comes in a later issue.\n")
        console.print(Rule("[bold green]demo complete[/]"))

    # -- teardown ---------------------------------------------------------------

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
        end = time.monotonic() + 5
        for proc in self.procs:
            try:
                proc.wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for ns in reversed(self.namespaces):
            pids = self.run(["ip", "netns", "pids", ns]).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            # Deleting a namespace deletes the veth end inside it, and with it its peer.
            self.run(["ip", "netns", "delete", ns])
        shutil.rmtree(self.root, ignore_errors=True)


def main() -> int:
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
        demo = Demo()
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
