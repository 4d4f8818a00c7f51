"""What a hostile user's floods cost another user (issue 8, items 9 and 12): a one-off
measurement, not a test.

    python bench/floods.py renew [--code DIR] [--limits 'renewals-per-minute = 1000000']
    python bench/floods.py flood [--code DIR]

``--code DIR``: run the tower (and enforcer, supctl) from the source tree DIR (put on
PYTHONPATH), e.g. /work/main for "before" and this tree for "after".  Run with the
Python of an environment where supctl is installed (the tox ``tests`` env).

* ``renew``: a bystander's ``GET /v1/state/sites`` (a fresh TLS connection each, as
  supctl makes them), its latency alone and while 4 processes spam
  ``/v1/token/renew`` with a login token as fast as the tower answers.
* ``flood``: a bystander downloads 48 MiB through its own forward, alone and while
  another user sends 10,000 OPENs the tower refuses and 20,000 1-byte DATA frames.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import multiprocessing
import os
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))

from e2e_support import inventory, start_server  # noqa: E402
from stack import Stack, do_args, program  # noqa: E402

APP, INST, SITE = "app", "inst", "site1"
PASSWORD = "a long enough password"
POLICIES = f"""
[[policies.narrow.rules]]
effect = "allow"
site = "{SITE}"
application = "{APP}"
verb = "connect"
protocol = "tcp"
ports = ["1-65535"]
addresses = ["127.0.0.1/32"]
"""


def start(root: Path, code: str | None, limits: str) -> tuple[Stack, dict[str, str]]:
    stack = Stack(root)
    if code:
        stack.env["PYTHONPATH"] = f"{code}:{code}/plugins"
    subprocess.run(
        [program("control-tower"), "init", str(stack.dir)], check=True, capture_output=True, env=stack.env
    )
    config = stack.dir / "tower.toml"
    config.write_text(config.read_text() + f"\n[limits]\n{limits}\n")
    (stack.dir / "policies.toml").write_text(POLICIES)
    tokens = {}
    for name in ("mallory", "alice"):
        for argv in (["user", "add", name, "--policy", "narrow"], ["token", "add", "--user", name]):
            done = subprocess.run(
                [program("control-tower"), argv[0], argv[1], "--config", str(config), *argv[2:]],
                input=PASSWORD + "\n",
                text=True,
                check=True,
                capture_output=True,
                env=stack.env,
            )
        tokens[name] = done.stdout.strip()
    stack.tower = stack.spawn(
        "tower", [program("control-tower"), "serve", "--config", str(config), "--listen", "127.0.0.1:0"]
    )
    stack.url = stack.tower.log.wait_for(r"listening on (wss://127\.0\.0\.1:\d+)", proc=stack.tower.popen)[1]
    stack.env.update(SUPCTL_HOST=stack.url, SUPCTL_CA_FILE=str(stack.dir / "ca.pem"))
    tokens["admin"] = (stack.dir / "admin.token").read_text().strip()
    return stack, tokens


class Client:
    def __init__(self, stack: Stack) -> None:
        host, _, port = stack.url.removeprefix("wss://").rpartition(":")
        self.host, self.port = host, int(port)
        self.context = ssl.create_default_context(cafile=str(stack.dir / "ca.pem"))

    def get(self, path: str, authorization: str) -> tuple[int, bytes]:
        conn = http.client.HTTPSConnection(self.host, self.port, context=self.context, timeout=30)
        try:
            conn.request("GET", path, headers={"Authorization": authorization})
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()


def latencies(client: Client, token: str, count: int = 300) -> list[float]:
    out = []
    for _ in range(count):
        start = time.perf_counter()
        status, _ = client.get("/v1/state/sites", f"Bearer {token}")
        out.append((time.perf_counter() - start) * 1000)
        assert status == 200, status
    return out


def show(label: str, values: list[float]) -> None:
    values = sorted(values)
    p95 = values[int(len(values) * 0.95) - 1]
    print(
        f"{label:28} median {statistics.median(values):7.2f} ms  p95 {p95:7.2f} ms  max {values[-1]:7.2f} ms"
    )


SPAMMERS = 4  # processes, so that the bystander's own client is not slowed by their GIL


def spam(client: Client, login: str, stop: Any, answers: Any) -> None:
    counts: dict[int, int] = {}
    while not stop.is_set():
        got, _ = client.get("/v1/token/renew", f"Bearer {login}")
        counts[got] = counts.get(got, 0) + 1
    answers.put(counts)


def renew(code: str | None, limits: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        stack, tokens = start(Path(tmp) / "s", code, limits)
        try:
            client = Client(stack)
            basic = base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
            status, body = client.get("/v1/login", f"Basic {basic}")
            assert status == 200, body
            login = json.loads(body)["token"]
            show("bystander alone", latencies(client, tokens["admin"]))
            stop = multiprocessing.Event()
            answers: Any = multiprocessing.Queue()
            spammers = [
                multiprocessing.Process(target=spam, args=(client, login, stop, answers), daemon=True)
                for _ in range(SPAMMERS)
            ]
            for process in spammers:
                process.start()
            time.sleep(0.5)  # the spam is under way: this measures, it does not synchronise
            start_time = time.monotonic()
            during = latencies(client, tokens["admin"])
            elapsed = time.monotonic() - start_time
            stop.set()
            counts: dict[int, int] = {}
            for _ in spammers:
                for status, count in answers.get(timeout=60).items():
                    counts[status] = counts.get(status, 0) + count
            for process in spammers:
                process.join(30)
            show("bystander during renew spam", during)
            print(f"renewals answered: {counts} (about {sum(counts.values()) / (elapsed + 0.5):.0f}/s)")
        finally:
            stack.close()


def flood(code: str | None) -> None:
    sys.path.insert(0, str(TESTS))
    import test_floods as tf

    with tempfile.TemporaryDirectory() as tmp:
        stack, tokens = start(Path(tmp) / "s", code, "streams-per-session = 2")
        try:
            stack.add_site(SITE, inventory(APP, INST))
            _, echo_port = start_server(stack, "echo")
            _, source_port = start_server(
                stack, "sink-source", "--size", str(tf.BYSTANDER_BYTES), "--seed", "9"
            )
            (Path(tmp) / "alice.token").write_text(tokens["alice"] + "\n")
            env = dict(stack.env, SUPCTL_TOKEN_FILE=str(Path(tmp) / "alice.token"))
            proc = stack.spawn(
                "supctl-alice",
                [
                    program("supctl"),
                    *do_args(SITE, APP, INST, "connect", "tcp", str(source_port), "--bind", "0"),
                ],
                env=env,
            )
            port = int(proc.log.wait_for(r"Forwarding from \S+:(\d+) ->", proc=proc.popen)[1])
            fenv = tf.Env(
                stack,
                echo_port,
                source_port,
                0,
                tokens,
                ssl.create_default_context(cafile=str(stack.dir / "ca.pem")),
            )

            def download() -> float:
                start_time = time.monotonic()
                with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
                    sock.shutdown(socket.SHUT_WR)
                    while sock.recv(1 << 16):
                        pass
                return time.monotonic() - start_time

            alone = [download() for _ in range(3)]
            print(f"bystander 48 MiB alone:          {min(alone):.2f} s (best of 3)")
            for _ in range(3):
                outcome: list[object] = []

                def attack(outcome: list[object] = outcome) -> None:
                    try:
                        outcome.append(tf.flood(fenv, echo_port, accept=2))
                    except (TimeoutError, AssertionError) as exc:  # before: never closed
                        outcome.append(f"not closed ({type(exc).__name__})")

                audit_before = len((stack.dir / "audit.jsonl").read_text().splitlines())
                log_before = len(stack.tower.log.text().splitlines())  # type: ignore[union-attr]
                attacker = threading.Thread(target=attack)
                attacker.start()
                time.sleep(0.2)  # the flood is under way: this measures, it does not synchronise
                during = download()
                attacker.join(120)
                audit = len((stack.dir / "audit.jsonl").read_text().splitlines()) - audit_before
                lines = len(stack.tower.log.text().splitlines()) - log_before  # type: ignore[union-attr]
                print(
                    f"bystander 48 MiB during flood:   {during:.2f} s;"
                    f" +{audit} audit records, +{lines} log lines; flooder: {outcome[0]}"
                )
        finally:
            stack.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", choices=("renew", "flood"))
    parser.add_argument("--code", help="source tree to run the tower from (PYTHONPATH)")
    parser.add_argument("--limits", default="", help="lines added to [limits] (renew)")
    args = parser.parse_args()
    os.environ.pop("SUPCTL_HOST", None)
    if args.scenario == "renew":
        renew(args.code, args.limits)
    else:
        flood(args.code)


if __name__ == "__main__":
    main()
