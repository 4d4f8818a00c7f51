"""``supctl do login NAME`` and ``supctl do logout``, and renewing a login token.

Login is ``GET /v1/login`` with HTTP Basic credentials (over TLS, with the same
certificate checks as every other request); the tower answers with a random
token, its expiry and its accessor, which are stored with mode 0600
(:mod:`supctl.client.login`).  The token and the password are never printed.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
import sys
import urllib.request
from collections.abc import Awaitable, Callable
from typing import Any

import click
from rich.markup import escape

from supctl import __version__, aio
from supctl.client.api import Invocation
from supctl.client.login import delete_login, load_login, save_login, token_path
from supctl.client.settings import ClientSettings
from supctl.errors import DeniedError, ProtocolError, SupctlError, UsageError
from supctl.output import escape_controls

from .transport import _fetch, https_opener, require_token


def read_password(name: str) -> str:
    """Prompted without echo on a terminal, else the first line of stdin."""
    if sys.stdin.isatty():
        return str(click.prompt(f"Password for {name}", hide_input=True, err=True))
    line = sys.stdin.readline()
    return line[:-1] if line.endswith("\n") else line


async def get_json(settings: ClientSettings, path: str, authorization: str) -> Any:
    secure = settings.host.startswith("wss://")
    url = f"{'https' if secure else 'http'}://{settings.host.split('://', 1)[1]}{path}"
    request = urllib.request.Request(  # noqa: S310 - the scheme is https or http, built above
        url,
        headers={
            "Authorization": authorization,
            "Accept": "application/json",
            "User-Agent": f"supctl/{__version__}",
        },
    )
    body = await asyncio.to_thread(_fetch, request, https_opener(settings), settings.host)
    try:
        answer = json.loads(body)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise ProtocolError(f"the tower at {settings.host} answered {path} with invalid JSON")
    return answer


def make_login_command() -> click.Command:
    @click.command("login")
    @click.argument("name")
    @click.pass_obj
    def login(inv: Invocation, name: str) -> None:
        """Log in as user NAME (password from stdin, or prompted) and store the token (mode 0600)."""
        settings = inv.settings
        password = read_password(name)
        if not password:
            raise UsageError("no password given (on stdin or at the prompt)")
        if not settings.host.startswith("wss://"):
            inv.console.print("[yellow]warning:[/] plain ws://: the password crosses the network in clear")
        basic = base64.b64encode(f"{name}:{password}".encode()).decode()
        answer = aio.run(get_json(settings, "/v1/login", f"Basic {basic}"))
        token, expires = answer.get("token"), answer.get("expires")
        if not isinstance(token, str) or not isinstance(expires, str):
            raise ProtocolError(f"the tower at {settings.host} answered the login without a token")
        path = save_login(
            {
                "host": settings.host,
                "user": name,
                "token": token,
                "accessor": answer.get("accessor"),
                "expires": expires,
            }
        )
        inv.console.print(
            f"logged in to {escape(settings.host)} as {escape(name)} until {escape(expires)}"
            f" (token {escape(str(answer.get('accessor')))} saved in {escape(str(path))})",
            soft_wrap=True,
        )
        if settings.token is not None and settings.token_source != "login":  # noqa: S105 - a source name
            # The precedence is one order (docs/cli.md): say it when the login is not what runs.
            inv.console.print(
                f"[yellow]warning:[/] {escape(settings.token_origin)} takes precedence over this login,"
                " so supctl keeps using it; remove it to use the login (supctl whoami shows which is used)",
                soft_wrap=True,
            )

    return login


def make_whoami_command() -> click.Command:
    @click.command("whoami")
    @click.pass_obj
    def whoami(inv: Invocation) -> None:
        """Who the tower takes you for: user, token accessor, kind, policies, expiry, and where
        the token came from (one line per field, on stdout)."""
        settings = inv.settings
        token = require_token(settings)
        answer = aio.run(get_json(settings, "/v1/whoami", f"Bearer {token}"))
        rows = [
            ("user", answer.get("user")),
            ("accessor", answer.get("accessor")),
            ("kind", answer.get("kind")),
            ("policies", ", ".join(map(str, answer.get("policies") or [])) or "-"),
            ("expires", answer.get("expires") or "never"),
            ("tower", settings.host),
            ("credential", settings.token_origin or "-"),
        ]
        for field, value in rows:
            click.echo(f"{field + ':':<12}{escape_controls(str(value))}")

    return whoami


def make_logout_command() -> click.Command:
    @click.command("logout")
    @click.pass_obj
    def logout(inv: Invocation) -> None:
        """Revoke the stored login token at the tower and delete it."""
        host = inv.settings.host
        stored = load_login(host)
        if stored is None:
            raise UsageError(f"not logged in to {host} ({token_path()} holds no token for it)")
        try:
            aio.run(get_json(inv.settings, "/v1/logout", f"Bearer {stored['token']}"))
            done = "revoked"
        except DeniedError as exc:  # already expired or revoked: nothing left to revoke
            done = f"already unusable ({exc})"
        delete_login()
        inv.console.print(f"logged out of {escape(host)}: token {escape(str(stored.get('accessor')))} {done}")

    return logout


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


async def keep_renewed(
    inv: Invocation,
    *,
    now: Callable[[], datetime.datetime] = _utcnow,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> None:
    """Renew the stored login token at 2/3 of its remaining lifetime, for as long as we run.

    ``now`` and ``sleep`` are the clock (a test passes fake ones)."""
    settings = inv.settings
    while True:
        stored = load_login(settings.host)
        if stored is None or stored.get("token") != settings.token:
            return  # logged out, or another login replaced it
        try:
            expires = datetime.datetime.fromisoformat(str(stored.get("expires")))
        except ValueError:
            return
        remaining = (expires - now()).total_seconds()
        await sleep(max(1.0, remaining * 2 / 3))
        try:
            answer = await inv.transport().get("/v1/token/renew", {})
        except DeniedError as exc:  # revoked or expired: renewing again cannot help
            inv.console.print(f"[yellow]warning:[/] cannot renew the login token: {escape(str(exc))}")
            return
        except SupctlError as exc:
            # Busy (429), unreachable, refused for now: try again.  The next wait is 2/3
            # of what remains then, so retries come closer together as expiry nears.
            inv.console.print(
                f"[yellow]warning:[/] cannot renew the login token now, will retry: {escape(str(exc))}"
            )
            continue
        if isinstance(answer, dict) and isinstance(answer.get("expires"), str):
            stored["expires"] = answer["expires"]
            save_login(stored)
