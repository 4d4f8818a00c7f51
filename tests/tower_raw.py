"""A real tower with chosen ``[limits]``, and raw HTTPS requests to it from a chosen local
address (127.0.0.2 is another client than 127.0.0.1 to the tower: all of 127/8 is local)."""

from __future__ import annotations

import asyncio
import base64
import re
import ssl
import subprocess
from collections.abc import Mapping
from typing import Any

from stack import Stack, program


def start_tower(stack: Stack, limits: Mapping[str, float], **popen: Any) -> int:
    """``control-tower init`` and ``serve`` with ``limits`` added; return its port."""
    return stack.start_tower(limits, **popen)


def add_user(stack: Stack, name: str, password: str, *policies: str) -> None:
    """``control-tower user add NAME [--policy P]...``, the password on stdin."""
    options = [arg for policy in policies for arg in ("--policy", policy)]
    subprocess.run(
        [program("control-tower"), "user", "add", "--config", str(stack.dir / "tower.toml"), name, *options],
        input=password + "\n",
        text=True,
        check=True,
        capture_output=True,
        env=stack.env,
    )


def client_tls(stack: Stack) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(stack.dir / "ca.pem"))


def basic(name: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{name}:{password}".encode()).decode()


async def get(
    port: int,
    path: str,
    authorization: str,
    context: ssl.SSLContext,
    local: str = "127.0.0.1",
    timeout: float = 30.0,
) -> int:
    """``GET path`` over TLS from ``local``; the HTTP status (0: no answer)."""

    async def exchange() -> int:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=context, local_addr=(local, 0), server_hostname="127.0.0.1"
        )
        try:
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: {authorization}\r\n\r\n".encode()
            )
            line = await reader.readline()
        finally:
            writer.close()
        match = re.match(rb"HTTP/1\.1 (\d{3}) ", line)
        return int(match[1]) if match else 0

    try:
        return await asyncio.wait_for(exchange(), timeout)
    except (TimeoutError, OSError, ssl.SSLError, asyncio.IncompleteReadError):
        return 0
