"""``connect --bind``'s status, in memory: the model (rates, ages, human units) with a fake
clock, the lines and the live table it renders, the chain of forwards on the command line,
and the tower's reading of a session's several targets."""

from __future__ import annotations

import datetime
import io
import itertools
import json
from dataclasses import dataclass
from typing import Any

import click
import pytest
from rich.console import Console
from supctl_connect.forwards import _overlap, check_forwards, given_options, merge_options, parse_bind
from supctl_connect.render import ForwardReporter, HumanStatus, JsonEvents
from supctl_connect.status import (
    RATE_WINDOW,
    StatusModel,
    closed_text,
    human_bytes,
    human_rate,
    human_seconds,
)

from supctl.cli import make_cli
from supctl.client.api import BindAddress, Forward, Invocation
from supctl.errors import UsageError
from supctl.tower.httpapi import Rejection
from supctl.tower.requests import MAX_TARGETS, connect_accesses


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class FakeMeter:
    sent: int = 0
    received: int = 0
    stream_id: int | None = 5
    open_latency: float | None = 0.012


WALL = datetime.datetime(2026, 12, 4, 9, 14, 3)


@pytest.mark.parametrize(
    ("count", "text"),
    [
        (0, "0 B"),
        (999, "999 B"),
        (1000, "1.0 kB"),
        (1499, "1.5 kB"),
        (999_949, "999.9 kB"),
        (999_960, "1.0 MB"),  # never "1000.0 kB"
        (209_700_000, "209.7 MB"),
        (3 * 10**12, "3.0 TB"),
        (5 * 10**18, "5000.0 PB"),
    ],
)
def test_human_bytes_are_si(count: int, text: str) -> None:
    assert human_bytes(count) == text


def test_human_seconds_and_rates() -> None:
    assert [human_seconds(s) for s in (0.04, 6.5, 59.94, 65, 3599, 7620)] == [
        "0.0 s", "6.5 s", "59.9 s", "1m05s", "59m59s", "2h07m",
    ]  # fmt: skip
    assert human_rate(32_300_000) == "32.3 MB/s"


def test_the_seed_example_line() -> None:
    """``209.7 MB in 6.5 s, 32.3 MB/s`` as the issue writes it, with the exact counts first."""
    assert closed_text(209_700_000, 0, 6.5, "127.0.0.1:53122") == (
        "209700000 B sent, 0 B received in 6.5 s (209.7 MB at 32.3 MB/s, from 127.0.0.1:53122)"
    )
    assert closed_text(10, 0, 0.0, "p").endswith("(10 B at 0 B/s, from p)")  # no division by zero


def test_rate_is_the_window_and_age_follows_the_clock() -> None:
    clock, meter = FakeClock(), FakeMeter()
    model = StatusModel(clock)
    connection = model.opened(1, "tcp/443", 1, "127.0.0.1:5000", meter)
    assert connection.rates() == (0.0, 0.0)  # one sample: no rate yet
    for _ in range(10):  # 1 MB/s up, 2 kB/s down, sampled every 0.5 s
        clock.now += 0.5
        meter.sent += 500_000
        meter.received += 1000
        model.tick()
    assert connection.rates() == pytest.approx((1_000_000, 2000))
    assert model.age(connection) == pytest.approx(5.0)
    # The window is RATE_WINDOW seconds: older samples are dropped, so a stall shows.
    assert connection.samples[-1][0] - connection.samples[0][0] <= RATE_WINDOW + 0.5
    for _ in range(int(RATE_WINDOW / 0.5) + 1):
        clock.now += 0.5
        model.tick()
    assert connection.rates() == (0.0, 0.0)
    totals = model.totals()
    assert (totals.connections, totals.sent, totals.received) == (1, 5_000_000, 10_000)


def test_totals_keep_finished_connections() -> None:
    clock = FakeClock()
    model = StatusModel(clock)
    model.opened(1, "tcp/443", 1, "a", FakeMeter(100, 200))
    model.opened(2, "tcp/443", 1, "b", FakeMeter(1, 2))  # the same label: told apart by position
    assert model.closed(1, 1, 100, 200) is not None
    assert model.closed(1, 9, 5, 5) is None  # never seen open: counted, not shown
    totals = model.totals()
    assert (totals.connections, totals.sent, totals.received) == (1, 106, 207)


def human(*, terminal: bool, quiet: bool = False, verbose: bool = False) -> tuple[HumanStatus, io.StringIO]:
    out = io.StringIO()
    console = Console(file=out, force_terminal=terminal, width=200, highlight=False, emoji=False)
    return HumanStatus(
        console, FakeClock(), quiet=quiet, verbose=verbose, several=True, wall=lambda: WALL
    ), out


FWD = Forward("tcp", 443, binds=(BindAddress("127.0.0.1", 8443),))
LAN = Forward("tcp", 443, ip_address="192.0.2.11", binds=(BindAddress("127.0.0.1", 8444),))


def test_plain_lines_have_a_timestamp_and_no_control_codes() -> None:
    status, out = human(terminal=False)
    assert status.live is None
    reporter = ForwardReporter(status, 2, LAN, itertools.count(1))
    status.listening(2, LAN, BindAddress("127.0.0.1", 8444), "192.0.2.11:443 in x at y")
    reporter.opened(7, "127.0.0.1:53122", FakeMeter())
    reporter.closed(7, 209_700_000, 0, 6.5, None)
    reporter.opened(8, "127.0.0.1:53123", FakeMeter())
    reporter.closed(8, 0, 0, 0.1, "connection refused by 192.0.2.11:443")
    status.lost("going away")
    text = out.getvalue()
    assert "\x1b" not in text
    assert text.splitlines() == [
        "09:14:03 Forwarding from 127.0.0.1:8444 -> 192.0.2.11:443 in x at y",
        # numbered per forward, named by its target (several forwards)
        "09:14:03 tcp/192.0.2.11:443: connection 1 from 127.0.0.1:53122 opened",
        "09:14:03 tcp/192.0.2.11:443: connection 1 closed: 209700000 B sent, 0 B received in 6.5 s"
        " (209.7 MB at 32.3 MB/s, from 127.0.0.1:53122)",
        "09:14:03 tcp/192.0.2.11:443: connection 2 from 127.0.0.1:53123 opened",
        "09:14:03 tcp/192.0.2.11:443: connection 2 failed: connection refused by 192.0.2.11:443",
        "09:14:03 tower connection lost; reconnecting... (going away)",
    ]


def test_quiet_keeps_failures_and_verbose_adds_the_stream() -> None:
    status, out = human(terminal=False, quiet=True)
    status.opened(1, FWD, 1, "p", FakeMeter())
    status.closed(1, FWD, 1, 10, 10, 1.0, None)
    status.opened(1, FWD, 2, "p", FakeMeter())
    status.closed(1, FWD, 2, 0, 0, 1.0, "reset")
    assert out.getvalue().splitlines() == ["09:14:03 tcp/443: connection 2 failed: reset"]

    status, out = human(terminal=False, verbose=True)
    status.opened(1, FWD, 1, "p", FakeMeter())
    status.closed(1, FWD, 1, 10, 10, 1.0, None)
    status.opened(1, FWD, 2, "p", FakeMeter(stream_id=None, open_latency=None))
    status.closed(1, FWD, 2, 0, 0, 1.0, "no session with the tower for 10 s")
    lines = out.getvalue().splitlines()
    assert lines[1].endswith("[stream 5, accepted in 12 ms, reason: closed by both ends]"), lines
    assert lines[3].endswith("connection 2 failed: no session with the tower for 10 s [no stream]"), lines


def test_a_terminal_gets_the_live_table() -> None:
    status, out = human(terminal=True)
    assert status.live is not None
    meter = FakeMeter(1_500_000, 2000)
    status.opened(1, FWD, 1, "127.0.0.1:53122", meter)
    status.model.clock.now += 1.0  # type: ignore[attr-defined]
    status.model.tick()
    table = Console(file=io.StringIO(), width=200)
    table.print(status.table())
    text = table.file.getvalue()  # type: ignore[attr-defined]
    for word in (
        "FORWARD",
        "PEER",
        "AGE",
        "SENT",
        "RECEIVED",
        "tcp/443",
        "127.0.0.1:53122",
        "1.5 MB",
        "1 open",
    ):
        assert word in text, text
    assert "opened" not in out.getvalue()  # the table shows it, not a line
    status, _ = human(terminal=True, quiet=True)
    assert status.live is None  # -q: only errors


def test_json_events_name_their_forward() -> None:
    lines: list[str] = []
    events = JsonEvents(lines.append)
    events.listening(2, LAN, BindAddress("::1", 8444), "t")
    ForwardReporter(events, 2, LAN, itertools.count(1)).opened(4, "[::1]:5", FakeMeter())
    events.closed(2, LAN, 1, 3, 4, 0.5, None)
    decoded = [json.loads(line) for line in lines]
    assert {k: decoded[0][k] for k in ("event", "forward", "address", "port", "protocol", "remote_port")} == {
        "event": "listening", "forward": 2, "address": "::1", "port": 8444, "protocol": "tcp", "remote_port": 443,
    }  # fmt: skip
    assert (decoded[1]["forward"], decoded[1]["connection"]) == (2, 1)
    assert (decoded[2]["forward"], decoded[2]["sent"], decoded[2]["result"]) == (2, 3, "ok")


# --- the command line ---------------------------------------------------------------------


def test_localhost_is_both_loopbacks() -> None:
    assert parse_bind("localhost:8443") == (BindAddress("127.0.0.1", 8443), BindAddress("::1", 8443))
    assert parse_bind("8443") == (BindAddress("127.0.0.1", 8443),)
    assert parse_bind("[::1]:0") == (BindAddress("::1", 0),)


@pytest.mark.parametrize(
    ("a", "b", "clash"),
    [
        ("127.0.0.1:8443", "127.0.0.1:8443", True),
        ("0.0.0.0:8443", "127.0.0.1:8443", True),
        ("[::]:8443", "[::1]:8443", True),
        ("[::]:8443", "127.0.0.1:8443", False),  # asyncio listens with IPV6_V6ONLY
        ("127.0.0.1:8443", "127.0.0.2:8443", False),
        ("127.0.0.1:0", "127.0.0.1:0", False),  # each gets its own free port
        ("127.0.0.1:8443", "127.0.0.1:8080", False),
    ],
)
def test_which_binds_clash(a: str, b: str, clash: bool) -> None:
    assert _overlap(parse_bind(a)[0], parse_bind(b)[0]) is clash


def chain(*args: str) -> list[Forward]:
    """Parse ``connect ARGS`` as supctl does, without running it."""
    cli = make_cli()
    parsed: list[Forward] = []
    instance = cli.commands["do"].commands["applications"].commands["service-instances"]  # type: ignore[attr-defined]
    connect = instance.commands["connect"]

    def parsed_only(forwards: list[Forward], **_: object) -> None:  # the options judged as run() does
        parsed.extend(forwards)
        check_forwards(
            forwards,
            merge_options([given_options(click.get_current_context()), *(f.given for f in forwards)]),
        )

    connect._result_callback = parsed_only
    cli.main(
        ["do", "-s", "s", "applications", "a", "service-instances", "i", "connect", *args],
        standalone_mode=False,
    )
    return parsed


def test_a_chain_of_forwards_each_with_its_options() -> None:
    first, second = chain(
        "tcp", "443", "--bind", "8443", "tcp", "80", "--ip-address", "192.0.2.11", "--bind", "8080"
    )
    assert (first.port, first.ip_address, first.bind) == (443, None, "8443")
    assert (second.port, second.ip_address, second.bind) == (80, "192.0.2.11", "8080")
    # Options before the port, run-wide options anywhere: the seed's form parses as before.
    [only] = chain("tcp", "--bind", "0", "443", "-o", "json", "-o", "json")  # the same twice: honoured
    assert (only.port, only.bind, only.given) == (443, "0", {"output": "json"})


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("tcp", "443", "--bind", "8443", "tcp", "80"), "forward 2 (tcp/80) has no --bind: netcat mode"),
        (("tcp", "443", "tcp", "80", "--bind", "1"), "forward 1 (tcp/443) has no --bind"),
        (
            ("tcp", "443", "--bind", "8443", "tcp", "80", "--bind", "localhost:8443"),
            "both listen on port 8443",
        ),
        (("tcp", "443", "--bind", "1", "--bind", "2"), "--bind given 2 times (1, 2) for one forward"),
        (
            ("tcp", "443", "--bind", "1", "-o", "json", "tcp", "80", "--bind", "2", "-o", "text"),
            "-o given twice",
        ),
        (("tcp", "443", "-o", "json"), "-o json needs --bind"),
        (
            ("tcp", "443", "--bind", "1", "-o", "json", "-o", "text"),
            "-o given twice",
        ),  # never the last silently
        (("-o", "json", "tcp", "443", "--bind", "1", "-o", "text"), "-o given twice"),
        (("tcp", "443", "--bind", "1", "--wait-tower", "3", "--wait-tower", "4"), "--wait-tower given twice"),
        ((), "no forward given"),
    ],
)
def test_a_chain_that_cannot_be_honoured_is_an_error(args: tuple[str, ...], message: str) -> None:
    with pytest.raises(UsageError) as caught:  # a forward, or the chain as a whole
        chain(*args)
    assert message in str(caught.value)


def test_an_option_value_that_looks_like_a_protocol_stays_a_value() -> None:
    with pytest.raises(UsageError, match="must be a numeric IPv4"):
        chain("tcp", "443", "--ip-address", "tcp", "--bind", "1")


def test_the_connect_group_lists_its_protocols_without_an_invocation() -> None:
    instance = make_cli().commands["do"].commands["applications"].commands["service-instances"]  # type: ignore[attr-defined]
    connect = instance.commands["connect"]
    with click.Context(connect) as ctx:
        # Every installed plugin's protocols (the docs' reference walks the tree this way).
        assert connect.list_commands(ctx) == ["tcp", "udp"]
    assert isinstance(ctx.find_object(Invocation), type(None))


# --- the tower's reading of a session's targets -------------------------------------------


def query(**values: Any) -> dict[str, list[str]]:
    return {"site": ["s"], **{key.replace("_", "-"): value for key, value in values.items()}}


def test_a_session_carries_each_target_in_order() -> None:
    first, second = connect_accesses(
        "a", "i", query(protocol=["tcp", "tcp"], port=["443", "443"], ip_address=["", "192.0.2.11"])
    )
    assert (first.port, first.ip_address, second.port, second.ip_address) == (443, "", 443, "192.0.2.11")
    [one] = connect_accesses("a", "i", query(protocol=["tcp"], port=["22"]))  # the seed's session
    assert (one.protocol, one.port, one.ip_address) == ("tcp", 22, "")


@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        ({"protocol": ["tcp"], "port": ["443", "80"]}, "once per target"),
        ({"protocol": ["tcp", "tcp"], "port": ["443", "80"], "ip_address": ["192.0.2.1"]}, "once per target"),
        ({"protocol": ["tcp", "tcp"], "port": ["443", "x"]}, "port must be 1-65535"),
        ({"protocol": ["tcp", "tcp"], "port": ["443", "80"], "ip_address": ["", "0.0.0.0"]}, "unspecified"),
        (
            {"protocol": ["tcp"] * (MAX_TARGETS + 1), "port": ["1"] * (MAX_TARGETS + 1)},
            f"at most {MAX_TARGETS}",
        ),
        ({"protocol": ["tcp"]}, "missing query parameter 'port'"),
    ],
)
def test_targets_that_cannot_be_judged_are_400(values: dict[str, list[str]], fragment: str) -> None:
    with pytest.raises(Rejection) as caught:
        connect_accesses("a", "i", query(**values))
    assert caught.value.status == 400 and fragment in str(caught.value)
