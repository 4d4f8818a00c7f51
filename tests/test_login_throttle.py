"""The login throttle (issue 8, item 10): attempts are reserved before their password is
hashed, counted per (address, user), per user and per address, on a fake clock; then a
real tower under 60 simultaneous wrong passwords."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from stack import Stack
from tower_raw import add_user, basic, client_tls, get, start_tower
from towerkit import Kit

from supctl.preauth import client_key
from supctl.tower import logins
from supctl.tower.logins import MAX_TRACKED, Attempt, LoginChecker, LoginThrottle
from supctl.tower.users import check_password

PASSWORD = "correct horse battery staple"


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def throttle(clock: Clock, failures: int = 5, per_user: int = 20, per_address: int = 20) -> LoginThrottle:
    return LoginThrottle(failures, 60.0, clock, per_user=per_user, per_address=per_address)


def reserved(t: LoginThrottle, address: str, name: str, n: int) -> list[Attempt | float]:
    return [t.reserve(address, name) for _ in range(n)]


def test_pending_attempts_count_before_they_finish() -> None:
    """60 attempts in flight at once: 5 get to be checked, 55 wait, none finished yet."""
    clock = Clock()
    t = throttle(clock)
    outcomes = reserved(t, "10.0.0.1", "alice", 60)
    assert sum(isinstance(o, Attempt) for o in outcomes) == 5
    assert all(o == 60.0 for o in outcomes[5:])
    clock.now += 59.5
    assert t.reserve("10.0.0.1", "alice") == pytest.approx(0.5)
    clock.now += 0.5  # the window passed: reservations age out like failures
    assert isinstance(t.reserve("10.0.0.1", "alice"), Attempt)


def test_success_releases_its_reservation_and_clears_the_pair() -> None:
    clock = Clock()
    t = throttle(clock, failures=3, per_address=4)
    assert all(isinstance(o, Attempt) for o in reserved(t, "10.0.0.1", "alice", 2))  # two failures
    ok = t.reserve("10.0.0.1", "alice")
    assert isinstance(ok, Attempt)
    t.succeeded(ok)
    # The pair starts again from zero; the address keeps its two failures (3 more of 4 would
    # be too many, so a spray cannot be reset by logging in to one's own account).
    assert sum(isinstance(o, Attempt) for o in reserved(t, "10.0.0.1", "alice", 5)) == 2


def test_a_stranger_does_not_lock_the_user_out_of_another_address() -> None:
    clock = Clock()
    t = throttle(clock)
    assert sum(isinstance(o, Attempt) for o in reserved(t, "203.0.113.9", "alice", 60)) == 5
    assert isinstance(t.reserve("10.0.0.1", "alice"), Attempt)  # the real user, elsewhere
    assert isinstance(t.reserve("203.0.113.9", "bob"), Attempt)  # another name, same address


def test_per_user_backoff_spares_addresses_the_user_logged_in_from() -> None:
    clock = Clock()
    t = throttle(clock)
    home = t.reserve("10.0.0.1", "alice")
    assert isinstance(home, Attempt)
    t.succeeded(home)
    # A guesser spread over many addresses, 2 guesses each: 20 per minute for the name.
    spread = [t.reserve(f"198.51.100.{i}", "alice") for i in range(30) for _ in range(2)]
    assert sum(isinstance(o, Attempt) for o in spread) == 20
    assert isinstance(t.reserve("192.0.2.7", "alice"), float)  # a new address waits
    assert isinstance(t.reserve("10.0.0.1", "alice"), Attempt)  # the usual one does not
    assert isinstance(t.reserve("192.0.2.7", "bob"), Attempt)  # nor do other users
    clock.now += logins.KNOWN_FOR  # a long time later, the address is no longer known
    assert all(isinstance(t.reserve(f"198.51.101.{i}", "alice"), Attempt) for i in range(20))
    assert isinstance(t.reserve("10.0.0.1", "alice"), float)


def test_per_address_limit_stops_a_spray_over_names() -> None:
    t = throttle(Clock())
    spray = [t.reserve("203.0.113.9", f"user{i}") for i in range(40)]
    assert sum(isinstance(o, Attempt) for o in spray) == 20
    assert isinstance(t.reserve("10.0.0.1", "user39"), Attempt)


def test_memory_is_bounded() -> None:
    clock = Clock()
    t = throttle(clock)
    for i in range(MAX_TRACKED):
        attempt = t.reserve(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}", f"u{i}")
        assert isinstance(attempt, Attempt)
        t.succeeded(attempt)
    assert len(t._recent) <= MAX_TRACKED and len(t._known) <= MAX_TRACKED


def test_window_zero_turns_it_off() -> None:
    t = LoginThrottle(1, 0.0, Clock())
    assert all(isinstance(o, Attempt) for o in reserved(t, "10.0.0.1", "alice", 10))


def test_addresses_are_counted_canonically() -> None:
    assert client_key("::ffff:192.0.2.1") == "192.0.2.1"
    assert client_key("2001:db8:1:2::1") == client_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:3::1") != client_key("2001:db8:1:2::1")
    assert client_key("fe80::1%eth0") == "fe80::/64"
    assert client_key("?") == "?"


def test_concurrent_checks_hash_at_most_the_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The checker itself: 60 logins awaited together hash 5 passwords, not 60."""
    hashes: list[str] = []

    def counting(password: str, stored: str) -> bool:
        hashes.append(password)
        return check_password(password, stored)

    monkeypatch.setattr(logins, "check_password", counting)
    kit = Kit(tmp_path)
    kit.add_user("alice", PASSWORD, [])
    checker = LoginChecker(kit.directory, LoginThrottle(5, 60.0))

    async def flood() -> list[logins.LoginCheck]:
        return await asyncio.gather(*(checker.check("127.0.0.1", "alice", f"guess{i}") for i in range(60)))

    results = asyncio.run(flood())
    assert len(hashes) == 5
    assert sum(r.retry_after > 0 for r in results) == 55 and not any(r.ok for r in results)
    # Malformed names share one count: they cannot each buy a fresh budget.
    again = asyncio.run(checker.check("127.0.0.2", "Bad Name\n", "x"))
    assert not again.ok and again.retry_after == 0
    assert [asyncio.run(checker.check("127.0.0.2", f"Bad{i}", "x")).retry_after > 0 for i in range(5)] == [
        False, False, False, False, True,
    ]  # fmt: skip


# --- a real tower ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tower(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, int]]:
    with Stack(tmp_path_factory.mktemp("logins")) as stack:
        port = start_tower(stack, {"login-failures": 5, "login-window": 60})
        add_user(stack, "alice", PASSWORD)
        yield stack, port


def test_sixty_simultaneous_wrong_logins_hash_five(tower: tuple[Stack, int]) -> None:
    """Hostile: 60 wrong passwords at once from 127.0.0.1 (all but 5 answered 429, so at
    most 5 were hashed), and the real user still logs in from 127.0.0.2."""
    stack, port = tower
    context = client_tls(stack)

    async def attack() -> list[int]:
        wrong = [get(port, "/v1/login", basic("alice", f"guess{i}"), context) for i in range(60)]
        return await asyncio.gather(*wrong)

    statuses = asyncio.run(attack())
    assert statuses.count(401) == 5 and statuses.count(429) == 55, sorted(statuses)
    real = asyncio.run(get(port, "/v1/login", basic("alice", PASSWORD), context, local="127.0.0.2"))
    assert real == 200
    still = asyncio.run(get(port, "/v1/login", basic("alice", PASSWORD), context))
    assert still == 429  # the attacker's address stays throttled for this user, right password or not
    assert stack.tower is not None
    text = stack.tower.log.text()
    assert "Traceback" not in text
    # Refusals are logged rate-limited (supctl.ratelog): never more lines than hashes.
    assert len(re.findall(r"401 wrong user name or password", text)) <= 5, text
