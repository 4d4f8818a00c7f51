"""Site identity against a thief holding a site's token (issue 8, item 5).

On the old code a link opened with a site token stayed up after the token was
replaced, the real enforcer with the new token got 409, and the tower kept sending
the site's exec streams (commands and stdin) to the thief.  Here:

* in process, the rules themselves: the store's view of a rotated or removed
  token, the takeover at the upgrade and at the HELLO (raced handshakes), a stream
  opened after the rotation but before any sweep, and the sweep with a fake clock;
* end to end with the real programs: ``control-tower site rotate`` closes the
  thief's link within seconds (and the stream it carried), the thief's next
  attempt gets 401, the real enforcer with the new token connects without a 409
  and only it gets the exec streams; ``site remove`` closes the link too.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import re
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlencode

import pytest
from exec_support import exec_args, start_exec, wait_exit
from stack import Stack, one_line_error, program, write_secret
from towerkit import Kit, run
from websockets.datastructures import Headers
from websockets.http11 import Request as HttpRequest

from supctl.errors import ExitCode, UsageError
from supctl.protocol import SUBPROTOCOL, Connection, ErrorCode, OpenRequest, StreamOpened, StreamReset
from supctl.tower import database, server
from supctl.tower.hub import sweep_forever
from supctl.tower.limits import Limits
from supctl.tower.links import ClientLink, SiteLink
from supctl.tower.route import Route, SiteClaim
from supctl.tower.siteinfo import InstanceInfo, SiteInfo
from supctl.tower.store import hash_token

SITE, APP, INST, SHELL = "site1", "app", "inst", "shell"
THIEF_PEER = "192.0.2.66:4444"

T = TypeVar("T")


def in_loop(body: Callable[[], T]) -> T:
    """Run ``body`` inside a running event loop (links need one), synchronously."""

    async def main() -> T:
        return body()

    return asyncio.run(main())


class QuietWs:
    """A WebSocket that is never driven: these tests call the tower's methods directly."""

    async def send(self, message: bytes) -> None:
        pass

    async def recv(self) -> bytes:
        await asyncio.Event().wait()
        return b""

    async def close(self, code: int = 1000, reason: str = "") -> None:
        pass


class Peer:
    """The connection a request arrived on (weak-referenceable, as websockets' is)."""

    remote_address = ("127.0.0.1", 5555)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Kit]:
    """The tower's store; its changes are made as ``control-tower`` makes them (another
    connection) and reach the tower at its next poll (Kit.admin)."""
    kit = Kit(tmp_path, Limits())
    yield kit
    kit.close()


@pytest.fixture
def tower(store: Kit) -> server.Tower:
    return store.tower


def connected(tower: server.Tower, token: str, peer: str = THIEF_PEER) -> SiteLink:
    """A link of SITE that authenticated with ``token`` and sent its HELLO."""
    link = SiteLink(QuietWs(), tower, SiteClaim(SITE, hash_token(token)), peer)
    link.info = SiteInfo(
        applications={APP: {INST: InstanceInfo(INST, APP, containers={SHELL: {}})}}, handlers=["exec", "tcp"]
    )
    tower.hub.site_connected(link)
    return link


def closed(link: SiteLink) -> tuple[ErrorCode, str] | None:
    return None if link.conn.closed is None else (link.conn.closed.code, link.conn.closed.reason)


def enforcer_request(tower: server.Tower, token: str) -> tuple[int, str, Any]:
    """An enforcer's upgrade request, as websockets hands it to process_request."""
    headers = Headers(
        [
            ("Authorization", f"Bearer {token}"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Protocol", SUBPROTOCOL),
        ]
    )
    peer = Peer()
    response = tower.process_request(peer, HttpRequest(f"/v1/enforcer?{urlencode({'site': SITE})}", headers))  # type: ignore[arg-type]
    if response is None:
        return 101, "", tower._routes.get(peer)  # type: ignore[call-overload]
    return response.status_code, json.loads(response.body)["errors"][0]["error-message"], None


# --- the store ------------------------------------------------------------------------------


def test_rotate_and_remove_reach_a_running_towers_store(store: Kit) -> None:
    old = store.add_site(SITE)
    running = store.directory  # the serving tower's copy of the store
    assert running.site_refusal(SITE, hash_token(old)) is None
    new = store.rotate_site(SITE)  # what `control-tower site rotate` does, in another process
    assert new != old and new.startswith("sct_site_")
    assert (running.check_site(SITE, old), running.check_site(SITE, new)) == (False, True)
    assert running.site_refusal(SITE, hash_token(old)) == "site token rotated"
    assert running.site_refusal(SITE, hash_token(new)) is None
    assert running.site_token_hash(SITE) == hash_token(new)
    store.remove_site(SITE)
    assert running.site_refusal(SITE, hash_token(new)) == "site removed"
    assert running.check_site(SITE, new) is False and running.sites() == []
    for change in (store.rotate_site, store.remove_site):
        with pytest.raises(UsageError, match=r"^unknown site 'site1'$"):
            change(SITE)


# --- takeover ------------------------------------------------------------------------------


def test_a_new_token_takes_over_at_the_upgrade(tower: server.Tower, store: Kit) -> None:
    stolen = store.add_site(SITE)

    def body() -> None:
        thief = connected(tower, stolen)
        assert tower.hub.sites[SITE] is thief
        # While the thief's token is the site's, a second link is refused: the first one wins.
        assert enforcer_request(tower, stolen)[:2] == (
            409,
            f"site {SITE} is already connected from {THIEF_PEER}",
        )
        new = store.rotate_site(SITE)
        assert enforcer_request(tower, stolen)[:2] == (401, f"invalid token for site {SITE!r}")
        # The new token takes over: no 409, and the thief's link is closed at once.
        status, _, claim = enforcer_request(tower, new)
        assert (status, claim) == (101, SiteClaim(SITE, hash_token(new)))
        assert closed(thief) == (ErrorCode.DENIED, "site token rotated")
        real = connected(tower, new, "198.51.100.7:5555")
        assert tower.hub.sites[SITE] is real and closed(real) is None

    in_loop(body)


def test_raced_handshakes_follow_the_same_rule(tower: server.Tower, store: Kit) -> None:
    """Two handshakes past process_request before either sent its HELLO: site_connected
    decides, by the same rule."""
    stolen = store.add_site(SITE)

    def body() -> None:
        thief = connected(tower, stolen)
        new = store.rotate_site(SITE)
        # Two enforcers with the new token raced: the first HELLO takes over from the thief...
        real = connected(tower, new, "198.51.100.7:5555")
        assert closed(thief) == (ErrorCode.DENIED, "site token rotated")
        assert tower.hub.sites[SITE] is real
        # ...the second, with the same valid token, is refused: the first valid link wins.
        twin = connected(tower, new, "198.51.100.8:6666")
        assert closed(twin) == (ErrorCode.DENIED, f"site {SITE} is already connected from 198.51.100.7:5555")
        # A link whose token was rotated between its upgrade and its HELLO never serves.
        late = connected(tower, stolen, "203.0.113.9:7777")
        assert closed(late) == (ErrorCode.DENIED, "site token rotated")
        assert tower.hub.sites[SITE] is real and closed(real) is None
        # A site removed meanwhile: its link is refused at the HELLO too.
        store.remove_site(SITE)
        orphan = SiteLink(QuietWs(), tower, SiteClaim(SITE, hash_token(new)), "203.0.113.10:1")
        orphan.info = SiteInfo()
        tower.hub.site_connected(orphan)
        assert closed(orphan) == (ErrorCode.DENIED, "site removed")

    in_loop(body)


# --- streams: never to a thief, not even before the sweep -------------------------------------


def _session(tower: server.Tower, store: Kit) -> tuple[ClientLink, Connection]:
    """A supctl session (admin token) for exec on SITE, and supctl's end of its connection."""
    admin = store.add_admin_token()
    route = Route("exec", SITE, APP, INST, container=SHELL, who=f"admin:{hash_token(admin)[:8]}")
    return ClientLink(QuietWs(), tower, route), Connection(odd_ids=True, accept_streams=False)


def _open(session: ClientLink, supctl: Connection, command: str) -> int:
    """supctl opens an exec stream on ``session``; the tower handles it."""
    stream_id = supctl.open_stream(OpenRequest(verb="exec", args={"command": command}))
    for event in session.conn.receive_data(supctl.data_to_send()):
        assert isinstance(event, StreamOpened)
        session.handle_event(event)
    return stream_id


def _resets(session: ClientLink, supctl: Connection) -> list[tuple[int, ErrorCode, str]]:
    events = supctl.receive_data(session.conn.data_to_send())
    return [(e.stream_id, e.code, e.text) for e in events if isinstance(e, StreamReset)]


def test_no_stream_goes_to_a_rotated_link_even_before_the_sweep(tower: server.Tower, store: Kit) -> None:
    stolen = store.add_site(SITE)

    def body() -> None:
        thief = connected(tower, stolen)
        session, supctl = _session(tower, store)
        _open(session, supctl, "id")
        assert len(thief.relays) == 1  # while the token is the site's, the thief serves it
        store.rotate_site(SITE)
        # No sweep has run: the next OPEN itself finds the thief's token invalid.
        stream = _open(session, supctl, "cat /etc/shadow")
        assert closed(thief) == (ErrorCode.DENIED, "site token rotated")
        assert len(thief.relays) == 0 and len(session.relays) == 0  # the first stream was cut too
        assert _resets(session, supctl) == [
            (1, ErrorCode.DENIED, f"site {SITE}: site token rotated"),
            (stream, ErrorCode.LINK_LOST, f"site {SITE} is not connected"),
        ]

    in_loop(body)


class SweepStopped(Exception):
    pass


def test_the_sweep_closes_a_rotated_link_and_its_streams(tower: server.Tower, store: Kit) -> None:
    stolen = store.add_site(SITE)
    other_token = store.add_site("site2")

    async def body() -> list[float]:
        thief = connected(tower, stolen)
        other = SiteLink(QuietWs(), tower, SiteClaim("site2", hash_token(other_token)), "198.51.100.2:2")
        other.info = SiteInfo()
        tower.hub.site_connected(other)
        session, supctl = _session(tower, store)
        _open(session, supctl, "cat")
        tower.hub.sweep_sites()  # nothing changed: nothing closed
        assert closed(thief) is None and len(thief.relays) == 1
        store.rotate_site(SITE)
        sleeps: list[float] = []

        async def fake_sleep(seconds: float) -> None:
            sleeps.append(seconds)
            if len(sleeps) > 1:  # one sweep done
                raise SweepStopped

        with pytest.raises(SweepStopped):
            await sweep_forever(tower.hub, tower.target_refusals, interval=0.5, sleep=fake_sleep)
        assert closed(thief) == (ErrorCode.DENIED, "site token rotated")
        assert closed(other) is None  # another site's link is not touched
        assert _resets(session, supctl) == [(1, ErrorCode.DENIED, f"site {SITE}: site token rotated")]
        assert session.conn.closed is None  # the session lives on: a new link may serve it
        store.remove_site("site2")
        tower.hub.sweep_sites()
        assert closed(other) == (ErrorCode.DENIED, "site removed")
        return sleeps

    assert asyncio.run(body()) == [0.5, 0.5]


# --- end to end -------------------------------------------------------------------------------


def site_token_works(stack: Stack, site: str, token: str) -> bool:
    async def check() -> bool:
        store = await database.open(stack.dir / "tower.db")
        try:
            return await store.sites.check(site, token)
        finally:
            await store.close()

    return run(check())


def _inventory(who: str, user: str | None = None) -> str:
    prefix = f"[applications.{APP}.service-instances.{INST}]"
    extra = f'user = "{user}"\n' if user else ""
    return (
        f'{prefix}\nruntime = "host"\n[{prefix[1:-1]}.containers.{SHELL}]\nenv = {{ WHO = "{who}" }}\n{extra}'
    )


def _who(stack: Stack) -> str:
    result = stack.supctl(*exec_args(SITE, APP, INST, SHELL, "echo $WHO"))
    assert result.returncode == 0, result.stderr
    return result.stdout.decode().strip()


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    with Stack(tmp_path) as stack:
        stack.start_tower()
        yield stack


def test_rotation_evicts_the_thief_and_the_real_enforcer_takes_over(stack: Stack, tmp_path: Path) -> None:
    assert stack.tower is not None
    config = str(stack.dir / "tower.toml")
    stolen = stack.register_site(SITE)
    (tmp_path / "thief.toml").write_text(_inventory("thief"))
    (tmp_path / "real.toml").write_text(_inventory("real"))
    thief = stack.start_enforcer(
        SITE,
        token_file=write_secret(tmp_path / "thief.token", stolen + "\n"),
        inventory=tmp_path / "thief.toml",
    )
    assert _who(stack) == "thief"  # with the site's token, the thief is the site
    # A stream the thief carries when the token is rotated, stdin still open.
    held, held_out = start_exec(stack, exec_args(SITE, APP, INST, SHELL, "cat"), stdin=subprocess.PIPE)
    assert held.popen.stdin is not None
    held.popen.stdin.write(b"before\n")
    held.popen.stdin.flush()
    assert held_out.read_line() == b"before\n"

    new_token = tmp_path / "real.token"
    stack.control_tower("site", "rotate", "--config", config, SITE, "--output", str(new_token))
    assert stat.S_IMODE(new_token.stat().st_mode) == 0o600
    assert new_token.read_text().strip() != stolen
    # The thief's link is closed within seconds, with the reason, and so is its stream.
    stack.tower.log.wait_for(rf"closing link of site {SITE} from 127\.0\.0\.1:\d+: site token rotated", 5.0)
    assert wait_exit(held, 10.0) == ExitCode.EXEC_FAILED  # exec: 255 when supctl fails
    assert one_line_error(held.log.path.read_bytes()) == f"supctl: error: site {SITE}: site token rotated"
    # The old token opens nothing any more: the thief's next attempt gets 401.
    thief.log.wait_for(rf"the tower refused us: HTTP 401 invalid token for site '{SITE}'", 20.0, thief.popen)
    thief_streams = thief.log.count(r"stream closed ")

    # The real enforcer with the new token connects at once: no 409.
    real = stack.start_enforcer(SITE, token_file=new_token, inventory=tmp_path / "real.toml")
    assert "HTTP 409" not in real.log.text()  # (a bare "409" may be part of a cgroup name)
    assert _who(stack) == "real"
    payload = random.Random(5).randbytes(300_000)
    result = stack.supctl(*exec_args(SITE, APP, INST, SHELL, "cat"), input=payload)
    assert (result.returncode, hashlib.sha256(result.stdout).hexdigest()) == (
        0,
        hashlib.sha256(payload).hexdigest(),
    ), result.stderr
    # Nothing went to the thief after the rotation, and it keeps being refused.
    thief.log.wait_for(r"(?s)HTTP 401.*HTTP 401", 30.0, thief.popen)
    assert thief.log.count(r"stream closed ") == thief_streams
    records = stack.wait_audit(lambda r: r["event"] == "site-evicted", "the eviction record")
    cut = [r for r in records if r["event"] == "stream-closed" and r["close-reason"] == "denied"]
    assert [(r["command"], r["result"]) for r in cut] == [("cat", f"site {SITE}: site token rotated")]
    evicted = [r for r in records if r["event"] == "site-evicted"]
    assert [(r["site"], r["verb"], r["result"]) for r in evicted] == [
        (SITE, "enforcer", "site token rotated")
    ]
    assert re.fullmatch(r"127\.0\.0\.1:\d+", evicted[0]["client"]), evicted

    # Removing the site closes the real link too, and the site is gone.
    stack.control_tower("site", "remove", "--config", config, SITE)
    stack.tower.log.wait_for(rf"closing link of site {SITE} from 127\.0\.0\.1:\d+: site removed", 5.0)
    real.log.wait_for(rf"the tower refused us: HTTP 401 invalid token for site '{SITE}'", 20.0, real.popen)
    gone = stack.supctl(*exec_args(SITE, APP, INST, SHELL, "true"))
    assert gone.returncode == ExitCode.EXEC_FAILED, gone.stderr  # exec: 255 when supctl fails
    assert f"unknown site '{SITE}'" in one_line_error(gone.stderr)
    assert re.search("Traceback", stack.tower.log.text() + thief.log.text() + real.log.text()) is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["rotate", "nosuch"], "unknown site 'nosuch'"),
        (["remove", "nosuch"], "unknown site 'nosuch'"),
        (["rotate", SITE, "--output", "/nonexistent/dir/t"], "--output /nonexistent/dir/t: directory"),
    ],
)
def test_rotate_and_remove_errors_are_one_line(stack: Stack, args: list[str], message: str) -> None:
    token = stack.register_site(SITE)
    config = str(stack.dir / "tower.toml")
    before = stack.control_tower("site", "list", "--config", config)
    done = subprocess.run(
        [program("control-tower"), "site", args[0], "--config", str(stack.dir / "tower.toml"), *args[1:]],
        capture_output=True,
        env=stack.env,
    )
    assert done.returncode == ExitCode.USAGE
    assert message in one_line_error(done.stderr)
    assert done.stdout == b""
    assert stack.control_tower("site", "list", "--config", config) == before  # nothing changed
    assert site_token_works(stack, SITE, token)  # no token lost


def test_a_token_rotated_into_the_enforcers_file_is_taken_without_a_restart(
    stack: Stack, tmp_path: Path
) -> None:
    """`site rotate --output FILE` into the file the enforcer reads: its link is evicted,
    its next attempt gets 401, it reads the file again and comes back with the new token."""
    assert stack.tower is not None
    config = str(stack.dir / "tower.toml")
    token_file = write_secret(tmp_path / "site.token", stack.register_site(SITE) + "\n")
    (tmp_path / "site.toml").write_text(_inventory("real"))
    enforcer = stack.start_enforcer(SITE, token_file=token_file, inventory=tmp_path / "site.toml")
    assert _who(stack) == "real"
    connected = stack.tower.log.count(rf"site {SITE} connected")

    stack.control_tower("site", "rotate", "--config", config, SITE, "--output", str(token_file))
    enforcer.log.wait_for(r"the site token file holds a new token; connecting with it", 30.0, enforcer.popen)
    stack.tower.log.wait_for(rf"(?s)(site {SITE} connected.*){{{connected + 1}}}", 30.0)
    assert _who(stack) == "real"
    assert enforcer.popen.poll() is None

    # A file made unsafe meanwhile is not read: one line, and the token in use is kept.
    token_file.chmod(0o644)
    stack.control_tower("site", "rotate", "--config", config, SITE)  # to stdout: the file is stale
    enforcer.log.wait_for(r"cannot read the site token again: token file .* can be read by others", 30.0)
    assert "Traceback" not in enforcer.log.text()
