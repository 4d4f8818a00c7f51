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
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from types import FrameType

from demo_lab import (
    APP,
    DEFER,
    DNS_IP,
    INSTANCE,
    LAN_IP,
    MANAGER,
    NAME,
    SIGNALS,
    SITE,
    SVC_IP,
    WEB,
    DemoError,
    Interrupted,
    Lab,
    console,
    do_args,
    output_of,
    port_free,
    program,
    step,
)
from rich.rule import Rule
from rich.text import Text


class Demo(Lab):
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

    def two_forwards(self, port: int, lan_ip: str, lan_port: int) -> None:
        """Both forwards of the guide in one command, over one session."""
        args = do_args(
            "connect",
            "tcp",
            str(port),
            "--bind",
            "0",
            "tcp",
            str(lan_port),
            "--ip-address",
            lan_ip,
            "--bind",
            "0",
        )
        proc, log = self.spawn(f"supctl-{len(self.procs)}", [program("supctl"), *args])
        ports = [
            int(p) for p in self.wait_log(log, r"(?s)from \S+:(\d+) ->.*from \S+:(\d+) ->", proc).groups()
        ]
        step(shlex.join(["supctl", *args]), log.read_text(), "one command, one session; in another terminal:")
        for local, expect in zip(
            ports, (f"{INSTANCE} says hello", f"{NAME} ({lan_ip}) says hello"), strict=True
        ):
            url = f"http://127.0.0.1:{local}/"
            page = output_of(self.run(["curl", "-sS", "--max-time", "10", url]))
            step(f"curl -sS {url}", page)
            if expect not in page:
                raise DemoError(f"expected {expect!r} through the forward, got {page.strip()!r}")
        self.stop(proc)
        console.print("[dim](supctl stopped with Ctrl-C)[/]\n")

    def short_forms(self, port: int) -> None:
        """The same netcat forward with a compact target, then with defaults in the environment."""
        request = b"GET / HTTP/1.0\r\n\r\n"
        args = ["do", f"{SITE}/{APP}/{INSTANCE}", "connect", "tcp", str(port)]
        result = self.supctl(*args, stdin=request)
        step(f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | {shlex.join(['supctl', *args])}", output_of(result))
        defaults = {"SUPCTL_SITE": SITE, "SUPCTL_APPLICATION": APP, "SUPCTL_SERVICE_INSTANCE": INSTANCE}
        args = ["do", "connect", "tcp", str(port)]
        again = subprocess.run(
            [program("supctl"), *args],
            input=request,
            capture_output=True,
            env={**self.env, **defaults},
            timeout=60,
            check=False,
        )
        exports = " ".join(f"{k}={v}" for k, v in defaults.items())
        step(
            f"export {exports}\nprintf 'GET / HTTP/1.0\\r\\n\\r\\n' | {shlex.join(['supctl', *args])}",
            output_of(again),
            "or named contexts in the config file: supctl config use-context NAME, supctl config view",
        )
        for done in (result, again):
            if done.returncode != 0 or f"{INSTANCE} says hello" not in done.stdout.decode():
                raise DemoError(f"a short form failed (exit {done.returncode})")

    def interactive(self) -> None:
        """exec -it in a real terminal: a tmux pane of our own, typed into by the demo."""
        tmux = shutil.which("tmux")
        if tmux is None:
            console.print("[yellow]tmux is not installed: skipping the interactive step[/]\n")
            return
        sock = str(self.root / "tmux.sock")
        env = {**self.env, "TERM": "xterm-256color"}

        def run(*args: str) -> str:
            result = subprocess.run(
                [tmux, "-S", sock, *args], capture_output=True, text=True, env=env, timeout=10, check=False
            )
            if result.returncode != 0:
                raise DemoError(f"tmux {args[0]}: {result.stderr.strip()}")
            return result.stdout

        def wait(pattern: str) -> str:
            end = time.monotonic() + 20
            while not re.search(pattern, screen := run("capture-pane", "-p", "-t", "d"), re.M):
                if time.monotonic() > end:
                    raise DemoError(f"timed out waiting for {pattern!r} on the terminal:\n{screen}")
                time.sleep(0.05)  # polling the screen; the deadline above is the bound
            return screen

        args = do_args("containers", MANAGER, "exec", "-it", 'PS1="remote> " sh')
        typed = shlex.join(["supctl", *args])
        run(
            "-f", "/dev/null", "new-session", "-d", "-x", "80", "-y", "24", "-s", "d", "PS1='$ ' exec /bin/sh"
        )
        try:
            run("send-keys", "-t", "d", "-l", f"{shlex.join([program('supctl'), *args])}; echo rc=$?")
            run("send-keys", "-t", "d", "Enter")
            wait(r"^remote>")  # capture-pane drops trailing blanks

            def type_line(keys: str, pattern: str) -> str:
                run("send-keys", "-t", "d", "-l", keys)
                run("send-keys", "-t", "d", "Enter")
                return wait(pattern)

            type_line("tty; stty size", r"^24 80")
            run("resize-window", "-t", "d", "-x", "100", "-y", "30")
            type_line("stty size", r"^30 100")
            screen = type_line("exit 3", r"^rc=3")
        finally:
            subprocess.run(
                [tmux, "-S", sock, "kill-server"], capture_output=True, env=env, timeout=10, check=False
            )
        lines = [line for line in screen.splitlines() if line.strip()]
        first = next((i for i, line in enumerate(lines) if line.startswith("remote>")), 0)
        shown = "\n".join(lines[first:])  # from the remote prompt on (the typed line wraps)
        step(
            typed,
            shown,
            "a terminal in the container: tty and stty size at the site, the window resized to 100x30 "
            "follows, Ctrl-C/Ctrl-Z would go to the remote, and exit 3 ends supctl with 3",
        )

    def container_logs(self) -> None:
        """``logs``, a verb from a plugin: the web container's own stderr (its access log),
        kept at the site; stdout and stderr stay apart."""
        args = do_args("containers", WEB, "logs", "--tail", "2")
        result = self.supctl(*args)
        step(
            shlex.join(["supctl", *args]),
            output_of(result) + f"(exit code {result.returncode})",
            f"the last two lines {WEB} wrote, kept by the site's enforcer: its start line (its "
            "stdout, on supctl's stdout) and the access log of that request (its stderr, on "
            "supctl's stderr); logs -f follows them, across restarts",
        )
        if result.returncode != 0 or '"GET / ' not in result.stderr.decode(errors="replace"):
            raise DemoError(f"logs of {WEB} failed or missed the request (exit {result.returncode})")

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
        self.container_logs()
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

        console.print(Rule("Both forwards in one command"))
        self.two_forwards(port, lan_ip, lan_port)

        console.print(Rule("An interactive shell in a container: exec -it"))
        self.interactive()

        console.print(Rule("Netcat mode (no --bind): stdin/stdout"))
        args = do_args("connect", "tcp", str(port))
        result = self.supctl(*args, stdin=b"GET / HTTP/1.0\r\n\r\n")
        step(f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | {shlex.join(['supctl', *args])}", output_of(result))
        if result.returncode != 0 or f"{INSTANCE} says hello" not in result.stdout.decode():
            raise DemoError(f"netcat mode failed (exit {result.returncode})")

        console.print(Rule("Shorter: a compact target, or defaults"))
        self.short_forms(port)

        console.print(Rule("connect never resolves names"))
        args = do_args("connect", "tcp", "443", "--ip-address", NAME, "--bind", bind)
        result = self.supctl(*args)
        step(shlex.join(["supctl", *args]), f"{result.stderr.decode()}(exit code {result.returncode})")
        if result.returncode != 2:
            raise DemoError(f"expected exit code 2 for a host name, got {result.returncode}")
        console.print(Rule("[bold green]demo complete[/]"))


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
