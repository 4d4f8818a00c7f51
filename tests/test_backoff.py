"""Backoff (supctl.backoff) and the enforcer's reconnection policy on top of it.

The rule and the policy are tested without a clock or a loop (the times and the jitter
are given); the end-to-end tests restart a real tower under a real enforcer, and give
an enforcer a dead tower URL before the live one.
"""

from __future__ import annotations

import errno
import re
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_support import inventory, wait_until
from hypothesis import given
from hypothesis import strategies as st
from stack import Stack, write_secret
from websockets.datastructures import Headers
from websockets.exceptions import InvalidStatus
from websockets.http11 import Response

from supctl.backoff import Backoff
from supctl.enforcer import agent as agent_module
from supctl.enforcer.agent import Agent
from supctl.enforcer.api import HandlerContext
from supctl.enforcer.inventory import parse_inventory
from supctl.enforcer.netns import NamespaceSockets
from supctl.tlspin import FingerprintMismatch

# --- the rule ----------------------------------------------------------------------------------


def test_doubles_up_to_the_cap() -> None:
    b = Backoff(0.5, 30.0, 10.0)
    assert [b.after(0.1) for _ in range(9)] == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]


def test_a_stable_run_starts_over() -> None:
    b = Backoff(0.5, 30.0, 10.0)
    assert [b.after(1.0) for _ in range(4)] == [0.5, 1, 2, 4]
    assert b.after(10.0) == 0.5  # ran for stable_after: a success, then a failure
    assert b.after(9.9) == 1


def test_reset_and_a_lower_cap_for_one_delay() -> None:
    b = Backoff(0.5, 30.0, 10.0)
    assert [b.after(0.0, cap=5.0) for _ in range(6)] == [0.5, 1, 2, 4, 5, 5]
    assert b.after(0.0) == 30  # the lower cap held the delay, not the count
    b.reset()
    assert b.after(0.0) == 0.5
    assert Backoff(0.5, 3.0, 10.0).after(0.0, cap=100.0) == 0.5  # never above the cap itself


@given(
    runs=st.lists(st.floats(0, 100), min_size=1, max_size=60),
    draw=st.floats(0, 1, exclude_max=True),
    brief=st.booleans(),
)
def test_every_delay_is_within_its_cap_and_jittered(runs: list[float], draw: float, brief: bool) -> None:
    b = Backoff(0.5, 30.0, 10.0, jitter=lambda: draw)
    for ran_for in runs:
        delay = b.after(ran_for, cap=5.0 if brief else None)
        assert 0 <= delay <= (5.0 if brief else 30.0)
        assert b.attempt <= 16


# --- the enforcer's policy ------------------------------------------------------------------


def make_agent(*towers: str) -> Agent:
    return Agent(
        towers=list(towers),
        site="s1",
        token="t",
        ssl_context=None,
        inventory=parse_inventory({"applications": {}}),
        handlers={},
        context=HandlerContext(site="s1", sockets=NamespaceSockets()),
        jitter=lambda: 1.0,  # the ceiling itself
    )


def status(code: int) -> InvalidStatus:
    return InvalidStatus(Response(code, "x", Headers(), b""))


def test_a_restarting_tower_is_retried_within_five_seconds() -> None:
    """Nothing listening (refused), no route, or 503: the tower spent nothing, or says it
    will be back: at most 5 s.  The rest may be a loaded or hostile tower: up to 30 s."""
    agent = make_agent("wss://tower.test:4646")
    refused = ConnectionRefusedError(errno.ECONNREFUSED, "Connect call failed")
    delays = [agent.next_delay(0.01, agent.failure(refused)[1]) for _ in range(8)]
    assert delays == [0.5, 1, 2, 4, 5, 5, 5, 5]
    brief = [
        OSError(errno.EHOSTUNREACH, "No route to host"),
        OSError("Multiple exceptions: [Errno 111] Connect call failed ('::1', 4646, 0, 0), [Errno 111] ..."),
        status(503),
    ]
    slow = [
        status(429),
        status(409),
        ConnectionResetError(errno.ECONNRESET, "reset"),
        TimeoutError(),
        ssl.SSLError("handshake failure"),
        FingerprintMismatch("pin"),
    ]
    assert [agent.failure(exc)[1] for exc in brief] == [True] * len(brief)
    assert [agent.failure(exc)[1] for exc in slow] == [False] * len(slow)
    assert agent.next_delay(0.01, False) == 30


def test_a_401_with_a_new_token_file_is_retried_at_once() -> None:
    agent = make_agent("wss://tower.test:4646")
    tokens = iter(["t", "t2"])
    agent.read_token = lambda: next(tokens)
    for _ in range(6):
        agent.next_delay(0.01, False)  # 0.5 ... 16
    reason, brief = agent.failure(status(401))  # the file still holds the same token
    assert reason.startswith("the tower refused us: HTTP 401") and not brief
    assert agent.next_delay(0.01, brief) == 30
    agent.failure(status(401))  # now it holds a new one
    assert agent.next_delay(0.01, False) == 0.5


def test_each_attempt_goes_to_the_next_tower() -> None:
    agent = make_agent("wss://a.test:4646/", "wss://b.test:4646", "wss://c.test:4646")
    seen = [agent.tower]
    for _ in range(4):
        agent.next_delay(0.01, True)
        seen.append(agent.tower)
    assert seen == [
        "wss://a.test:4646",
        "wss://b.test:4646",
        "wss://c.test:4646",
        "wss://a.test:4646",
        "wss://b.test:4646",
    ]


def test_a_bug_is_not_taken_for_a_failure_to_reach_the_tower() -> None:
    with pytest.raises(KeyError):
        make_agent("wss://tower.test:4646").failure(KeyError("bug"))


def test_the_agent_needs_a_tower() -> None:
    with pytest.raises(ValueError, match="tower"):
        make_agent()


# --- end to end ----------------------------------------------------------------------------------

SITE, APP, INSTANCE = "backoff-site", "web", "web-1"


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    with Stack(tmp_path) as stack:
        yield stack


def test_a_site_comes_back_after_its_tower_restarts(stack: Stack) -> None:
    stack.start_tower()
    enforcer = stack.add_site(SITE, inventory(APP, INSTANCE))
    assert stack.tower is not None
    stack.tower.stop()
    # Refused while the tower is down: each wait is capped at 5 s.
    refused = (
        r"cannot reach the tower: (?:Connection refused|Connect call failed).*; reconnecting in ([0-9.]+) s"
    )
    wait_until(lambda: enforcer.log.count(refused) >= 3, 30, "three refused attempts")
    waits = [float(w) for w in re.findall(refused, enforcer.log.text())]
    assert max(waits) <= agent_module.BRIEF_CAP, waits
    tower = stack.restart_tower(sig=None)
    tower.log.wait_for(rf"site {SITE} connected", deadline=30, proc=tower.popen)
    assert enforcer.popen.poll() is None


def test_an_enforcer_tries_each_tower_in_turn(stack: Stack) -> None:
    stack.start_tower()
    token = stack.register_site(SITE)
    write_secret(stack.root / f"{SITE}.token", token + "\n")
    (stack.root / f"{SITE}.toml").write_text(inventory(APP, INSTANCE))
    dead = "wss://127.0.0.1:1"  # nothing listens on port 1
    enforcer = stack.start_enforcer(SITE, towers=[dead, stack.url])
    enforcer.log.wait_for(rf"connected to the tower as site {SITE} \({stack.url}\)", proc=enforcer.popen)
    assert "cannot reach the tower" in enforcer.log.text()  # the dead one was tried first
