"""A silent partition: every packet between the tower and the site dropped, no RST, no FIN.

The tower runs in one namespace, the enforcer and a ``connect --bind`` forward in another,
joined by a veth pair.  ``tc qdisc ... blackhole`` on both ends drops everything, as a
cut cable or a dead NAT does; only the WebSocket keepalive can tell.  Keepalive is 2 s on
all three programs (the tower's ``keepalive``, ``edge-enforcer run --keepalive``,
``SUPCTL_KEEPALIVE``), so each must notice within 2 x 2 s; the deadlines add a few
seconds of slack for a loaded machine, they are bounds, not measurements.  Once the
blackhole is removed, the site and the forward come back by themselves.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from e2e_support import echo_roundtrip, inventory
from netlab import NetLab, call_in_netns
from stack import Stack, do_args, in_netns, program, write_secret

pytestmark = pytest.mark.root

SITE, APP, INSTANCE = "partition-site", "web", "web-1"
KEEPALIVE = 2.0
#: Noticed within 2 x KEEPALIVE; the rest is slack for a busy CI machine.
NOTICE_DEADLINE = 2 * KEEPALIVE + 6


def test_a_silent_partition_is_noticed_on_both_ends_and_heals(netlab: NetLab, tmp_path: Path) -> None:
    core, edge = netlab.add_ns("core"), netlab.add_ns("edge")
    if_core, if_edge = netlab.veth(core, "192.0.2.1/24", edge, "192.0.2.2/24")
    echo = netlab.start_server(edge, "echo")
    with Stack(tmp_path) as stack:
        stack.start_tower(keepalive=KEEPALIVE, netns=core, host="192.0.2.1")
        assert stack.tower is not None
        write_secret(stack.root / f"{SITE}.token", stack.register_site(SITE) + "\n")
        (stack.root / f"{SITE}.toml").write_text(inventory(APP, INSTANCE))
        enforcer = stack.start_enforcer(SITE, netns=edge, extra=["--keepalive", str(KEEPALIVE)])
        forward = stack.spawn(
            "supctl",
            [
                *in_netns(edge),
                program("supctl"),
                *do_args(SITE, APP, INSTANCE, "connect", "tcp", str(echo.port), "--bind", "0"),
            ],
            env={**stack.env, "SUPCTL_KEEPALIVE": str(KEEPALIVE)},
        )
        port = int(forward.log.wait_for(r"Forwarding from \S+:(\d+) ->", proc=forward.popen)[1])
        payload = os.urandom(100_000)
        assert call_in_netns(edge, echo_roundtrip, port, payload) == payload

        for ns, ifname in ((core, if_core), (edge, if_edge)):
            netlab.check_call(ns, ["tc", "qdisc", "replace", "dev", ifname, "root", "blackhole"])
        stack.tower.log.wait_for(rf"site {SITE} disconnected", deadline=NOTICE_DEADLINE)
        enforcer.log.wait_for(r"link to the tower lost", deadline=NOTICE_DEADLINE, proc=enforcer.popen)
        forward.log.wait_for(
            r"tower connection lost; reconnecting", deadline=NOTICE_DEADLINE, proc=forward.popen
        )

        for ns, ifname in ((core, if_core), (edge, if_edge)):
            netlab.check_call(ns, ["tc", "qdisc", "del", "dev", ifname, "root"])
        # Attempts made during the partition wait for their SYNs; the kernel retries them.
        forward.log.wait_for(r"reconnected after [0-9.]+ s", deadline=60, proc=forward.popen)
        assert stack.tower.log.count(rf"site {SITE} connected") == 2
        again = os.urandom(100_000)
        assert call_in_netns(edge, echo_roundtrip, port, again) == again
