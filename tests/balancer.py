"""Three tower replicas on one PostgreSQL behind HAProxy in TCP mode, for tests.

HAProxy (Debian's) passes TLS through: the towers' certificate covers 127.0.0.1, the
balancer's address.  It health-checks every replica every 100 ms, so a replica that
stops listening (killed, or draining after SIGTERM) gets no new connection, and
``option redispatch`` retries a connection refused meanwhile on another one.  Every
process is a :class:`stack.Proc` of the stack, stopped when the stack closes.
"""

from __future__ import annotations

import json
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from stack import Proc, Stack, program

PEERING = '[cluster]\npeer-listen = "127.0.0.1:0"\n'


def free_port() -> int:
    """A port free on loopback now (HAProxy's configuration names it before it binds)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Replica:
    name: str
    config: Path
    port: int
    proc: Proc

    @property
    def url(self) -> str:
        return f"wss://127.0.0.1:{self.port}"


def start_replica(stack: Stack, name: str, port: int = 0, config: Path | None = None) -> tuple[Proc, int]:
    """``serve`` the stack's tower directory as replica ``name`` (a copy of tower.toml with
    its id, unless ``config`` is given) on ``port``; returns it and its port once its peer
    listener is up."""
    if config is None:
        config = stack.dir / f"{name}.toml"
        text = (stack.dir / "tower.toml").read_text()
        config.write_text(text.replace("[cluster]\n", f'[cluster]\nid = "{name}"\n'))
    proc = stack.spawn(
        name, [program("control-tower"), "serve", "--config", str(config), "--listen", f"127.0.0.1:{port}"]
    )
    port = int(proc.log.wait_for(r"listening on wss://127\.0\.0\.1:(\d+)", proc=proc.popen)[1])
    proc.log.wait_for(r"takes relayed streams on", proc=proc.popen)
    return proc, port


def haproxy_binary() -> str | None:
    return shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)


class Balanced:
    """``stack``'s tower (replica ``tower``, started with :data:`PEERING`) and two more."""

    def __init__(self, stack: Stack, binary: str, names: tuple[str, ...] = ("tower-b", "tower-c")) -> None:
        assert stack.tower is not None
        self.stack = stack
        first_port = int(stack.url.rsplit(":", 1)[1])
        stack.tower.log.wait_for(r"takes relayed streams on", proc=stack.tower.popen)
        self.replicas = {"tower": Replica("tower", stack.dir / "tower.toml", first_port, stack.tower)}
        for name in names:
            proc, port = start_replica(stack, name)
            self.replicas[name] = Replica(name, stack.dir / f"{name}.toml", port, proc)
        self.port = free_port()
        lines = [
            "global",
            "    maxconn 4000",
            "defaults",
            "    mode tcp",
            "    timeout connect 1s",
            "    timeout client 1h",
            "    timeout server 1h",
            "    retries 3",
            "    option redispatch",
            "frontend towers",
            f"    bind 127.0.0.1:{self.port}",
            "    default_backend replicas",
            "backend replicas",
            "    balance roundrobin",
            "    default-server inter 100ms fall 1 rise 1",
            *(f"    server {r.name} 127.0.0.1:{r.port} check" for r in self.replicas.values()),
            "",
        ]
        cfg = stack.root / "haproxy.cfg"
        cfg.write_text("\n".join(lines))
        self.haproxy = stack.spawn("haproxy", [binary, "-db", "-f", str(cfg)])
        end = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                assert self.haproxy.popen.poll() is None, self.haproxy.log.text()
                assert time.monotonic() < end, "haproxy did not listen"
                time.sleep(0.02)  # polling; the deadline above is the bound

    @property
    def url(self) -> str:
        return f"wss://127.0.0.1:{self.port}"

    def start(self, name: str, config: Path, port: int) -> Replica:
        proc = self.stack.spawn(
            name,
            [program("control-tower"), "serve", "--config", str(config), "--listen", f"127.0.0.1:{port}"],
        )
        port = int(proc.log.wait_for(r"listening on wss://127\.0\.0\.1:(\d+)", proc=proc.popen)[1])
        proc.log.wait_for(r"takes relayed streams on", proc=proc.popen)
        return Replica(name, config, port, proc)

    def restart(self, name: str) -> Replica:
        """Start ``name`` again on its port (it is stopped already)."""
        old = self.replicas[name]
        self.replicas[name] = self.start(name, old.config, old.port)
        return self.replicas[name]

    def holder(self, site: str, *, deadline: float = 20.0, other_than: str = "", ask: str = "") -> Replica:
        """The replica holding ``site``'s link, as ``show sites`` says through the balancer
        (any replica answers the same), or as replica ``ask`` says; waits until one other
        than ``other_than`` does."""
        end = time.monotonic() + deadline
        url = self.replicas[ask].url if ask else self.url
        while True:
            result = self.stack.supctl(
                "show", "-o", "json", "sites", env={**self.stack.env, "SUPCTL_HOST": url}
            )
            if result.returncode == 0:
                for entry in json.loads(result.stdout):
                    name = entry["name"] == site and entry.get("replica")
                    if name and name != other_than and name in self.replicas:
                        return self.replicas[name]
            assert time.monotonic() < end, f"no replica holds site {site}: {result.stderr!r}"
            time.sleep(0.05)  # polling the tower; the deadline above is the bound
