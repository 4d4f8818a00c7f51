"""How long a running ``connect --bind`` forward is unusable when its tower is killed.

    python bench/reconnect.py [--rounds 10]

A real tower, enforcer and forward (the programs on PATH, through the tests' Stack, as
``upgrades.py``).  Each round kills the tower with SIGKILL and starts it again on its port
at once (what a supervisor's ``Restart=always`` does), and measures from the kill to:

* the tower listening again (the restart itself);
* the site connected again (the tower's log);
* supctl's ``reconnected after N s`` (its own figure, from its loss to its new session);
* the first echo round trip through the same forward, by a client that connected right
  after the kill and waited (``--wait-tower 60``): when the forward is usable again.

Median and worst over the rounds.  A benchmark, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import re
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from e2e_support import echo_roundtrip, inventory, start_server  # noqa: E402
from stack import Stack, do_args, program  # noqa: E402

SITE, APP, INSTANCE = "bench-site", "web", "web-1"


def one_round(stack: Stack, forward_log: Path, port: int, round_no: int) -> dict[str, float]:
    assert stack.tower is not None
    usable: list[float] = []

    def client() -> None:
        if echo_roundtrip(port, b"ping", timeout=60) == b"ping":
            usable.append(time.monotonic())

    killed = time.monotonic()
    stack.tower.popen.send_signal(signal.SIGKILL)
    stack.tower.popen.wait(10)
    probe = threading.Thread(target=client, daemon=True)
    probe.start()  # connects at once: its connection waits for the new session
    tower = stack.restart_tower(sig=None)
    listening = time.monotonic()
    end = killed + 60
    while not tower.log.count(rf"site {SITE} connected") and time.monotonic() < end:  # a new log
        time.sleep(0.01)  # polling a log; the deadline bounds it
    site_back = time.monotonic()
    reconnected = 0.0
    while time.monotonic() < end:
        found = re.findall(r"reconnected after ([0-9.]+) s", forward_log.read_text())
        if len(found) >= round_no:
            reconnected = float(found[round_no - 1])
            break
        time.sleep(0.01)
    probe.join(60)
    return {
        "tower listening": listening - killed,
        "site connected": site_back - killed,
        "supctl reconnected (its figure)": reconnected,
        "forward usable": (usable[0] - killed) if usable else float("nan"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="reconnect-bench-") as tmp, Stack(Path(tmp)) as stack:
        stack.start_tower()
        stack.add_site(SITE, inventory(APP, INSTANCE))
        _, echo = start_server(stack, "echo")
        argv = [program("supctl"), *do_args(SITE, APP, INSTANCE, "connect", "tcp", str(echo), "--bind", "0")]
        forward = stack.spawn("supctl", [*argv, "-q", "--wait-tower", "60"])
        port = int(forward.log.wait_for(r"Forwarding from \S+:(\d+) ->", proc=forward.popen)[1])
        assert echo_roundtrip(port, b"hello") == b"hello"
        rounds = [one_round(stack, forward.log.path, port, n) for n in range(1, args.rounds + 1)]
    print(f"{'seconds from SIGKILL of the tower to':<34} {'median':>8} {'worst':>8}")
    for key in rounds[0]:
        values = [r[key] for r in rounds]
        print(f"{key:<34} {statistics.median(values):>8.2f} {max(values):>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
