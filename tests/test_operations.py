"""Running it in production (issue 13): probes, versions, a busy port."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from e2e_support import closed_by_peer, inventory, start_server, wait_until
from exec_support import cmdline, show_instances
from prometheus_client.parser import text_string_to_metric_families
from stack import Stack, do_args, program, write_secret

from supctl.errors import ExitCode
from supctl.plainhttp import PER_ADDRESS
from supctl.protocol import SUBPROTOCOL
from supctl.tower import audit
from supctl.tower.database import StoreUnavailable
from supctl.tower.metrics import STATUSES, TowerMetrics
from supctl.tower.probes import Probes


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_probes(
    clock: FakeClock, fail: list[bool], draining: Callable[[], bool] = lambda: False
) -> tuple[Probes, list[int]]:
    calls = [0]

    async def check() -> None:
        calls[0] += 1
        await asyncio.sleep(0)  # a real check awaits the store: let concurrent probes pile up
        if fail[0]:
            raise StoreUnavailable("connection refused")

    return Probes(check, draining, clock), calls


def answers(probes: Probes, path: str, n: int = 1) -> list[tuple[int, bytes]]:
    async def many() -> list[tuple[int, bytes]]:
        responses = await asyncio.gather(*(probes.answer(path) for _ in range(n)))
        return [(r.status_code, bytes(r.body)) for r in responses]

    return asyncio.run(many())


def test_healthz_never_touches_the_store() -> None:
    probes, calls = make_probes(FakeClock(), [True])
    assert answers(probes, "/healthz", 5) == [(200, b"ok\n")] * 5
    assert calls == [0]


def test_a_probe_flood_costs_one_store_check_per_ttl() -> None:
    clock, fail = FakeClock(), [False]
    probes, calls = make_probes(clock, fail)
    assert answers(probes, "/readyz", 100) == [(200, b"ready\n")] * 100
    assert calls == [1]  # 100 concurrent probes shared one check
    clock.now += 0.5
    assert answers(probes, "/readyz") == [(200, b"ready\n")]
    assert calls == [1]  # within the TTL: the last outcome
    fail[0] = True
    clock.now += 0.6
    [(status, body)] = answers(probes, "/readyz")
    assert (status, body) == (503, b"not ready: the control tower cannot reach its store\n")
    assert calls == [2]
    fail[0] = False
    clock.now += 1.0
    assert answers(probes, "/readyz") == [(200, b"ready\n")]


def test_readyz_is_503_while_draining() -> None:
    probes, _ = make_probes(FakeClock(), [False], draining=lambda: True)
    assert answers(probes, "/readyz") == [(503, b"not ready: draining (shutting down)\n")]
    assert answers(probes, "/healthz") == [(200, b"ok\n")]


def test_a_store_layer_bug_still_gets_an_answer() -> None:
    async def broken() -> None:
        raise RuntimeError("boom")

    probes = Probes(broken, lambda: False, FakeClock())
    [(status, body)] = answers(probes, "/readyz")
    assert status == 503 and body == b"not ready: store check failed (RuntimeError)\n"


def curl(stack: Stack, path: str) -> tuple[int, str]:
    result = subprocess.run(
        ["curl", "-sS", "--max-time", "10", "--cacert", str(stack.dir / "ca.pem"),
         "-w", "\n%{http_code}", stack.url.replace("wss://", "https://") + path],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    body, _, code = result.stdout.rpartition("\n")
    return int(code), body.rstrip("\n")


def test_probes_over_tls_need_no_token_and_write_no_audit_record(tmp_path: Path) -> None:
    with Stack(tmp_path) as stack:
        stack.start_tower()
        for _ in range(20):
            assert curl(stack, "/healthz") == (200, "ok")
            assert curl(stack, "/readyz") == (200, "ready")
        # A request that is audited, after the probes: once its record is there, the
        # probes' would be too (records are written in order).
        assert stack.supctl("show", "sites").returncode == 0
        records = stack.wait_audit(lambda r: r["event"] == "show", "the show")
        assert not [r for r in records if "healthz" in str(r) or "readyz" in str(r)], records
        assert not [r for r in records if r["event"] == "session-refused"], records
        # Anything else without a token is still refused (and audited).
        assert curl(stack, "/v1/state/sites")[0] == 401


@pytest.mark.parametrize("prog", ["supctl", "control-tower", "edge-enforcer"])
def test_version_names_the_protocol(prog: str) -> None:
    result = subprocess.run([program(prog), "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(rf"{prog} \d+\.\d+\.\d+\S* \(protocol {re.escape(SUBPROTOCOL)}\)\n", result.stdout)


def test_serve_on_a_port_in_use_exits_2_with_one_line(tmp_path: Path) -> None:
    assert (
        subprocess.run(
            [program("control-tower"), "init", str(tmp_path / "t")], capture_output=True
        ).returncode
        == 0
    )
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [program("control-tower"), "serve", "--config", str(tmp_path / "t" / "tower.toml"),
             "--listen", f"127.0.0.1:{port}"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert result.returncode == ExitCode.USAGE, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.splitlines()[-1]
    assert last.startswith("control-tower: error: ") and "address already in use" in last, result.stderr


# --- metrics (scraped over the [metrics] listener) ------------------------------------------

SITE, APP, INST, SHELL = "metrics-site", "app", "inst", "shell"


def scrape(port: int, path: str = "/metrics") -> tuple[int, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return response.status, response.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape, parsed by prometheus-client's own parser."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def moved(before: dict[Any, float], after: dict[Any, float], name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_metrics_count_exactly_what_a_workload_did(tmp_path: Path) -> None:
    with Stack(tmp_path) as stack:
        stack.start_tower(config='[metrics]\nlisten = "127.0.0.1:0"\n')
        assert stack.tower is not None
        port = int(stack.tower.log.wait_for(r"metrics and probes on http://127\.0\.0\.1:(\d+)/metrics")[1])
        stack.add_site(
            SITE,
            f'{inventory(APP, INST)}runtime = "host"\n[applications.{APP}.service-instances.{INST}.containers.{SHELL}]\n',
        )
        _, echo = start_server(stack, "echo")
        assert scrape(port, "/healthz") == (200, "ok\n")
        assert scrape(port, "/readyz") == (200, "ready\n")
        status, text = scrape(port)
        assert status == 200
        before = samples(text)
        assert before[("supctl_sites_connected", ())] == 1

        # The workload: two connect streams (7 and 5 bytes each way), one exec, one
        # refused session (bad token), one failed login.
        for payload in (b"seven!!", b"five!"):
            result = stack.supctl(*do_args(SITE, APP, INST, "connect", "tcp", str(echo)), input=payload)
            assert result.returncode == 0 and result.stdout == payload, result.stderr
        result = stack.supctl(*do_args(SITE, APP, INST, "containers", SHELL, "exec", "exit 3"))
        assert result.returncode == 3, result.stderr
        bad = stack.supctl(
            "show", "sites", env={**stack.env, "SUPCTL_TOKEN": "sct_admin_not-a-token-0123456789abcdef"}
        )
        assert bad.returncode != 0
        login = subprocess.run(
            ["curl", "-sS", "--cacert", str(stack.dir / "ca.pem"), "-u", "nobody:wrong",
             stack.url.replace("wss://", "https://") + "/v1/login"],
            capture_output=True, timeout=30,
        )  # fmt: skip
        assert login.returncode == 0
        stack.wait_audit(lambda r: r["event"] == "stream-closed" and r["verb"] == "exec", "the exec")

        def settled() -> dict[Any, float] | None:
            after = samples(scrape(port)[1])
            ended = moved(
                before, after, "supctl_streams_ended_total", verb="connect", protocol="tcp", reason="eof"
            )
            return (
                after
                if ended == 2 and moved(before, after, "supctl_logins_total", result="failed") == 1
                else None
            )

        after = wait_until(settled, 20, "the workload's counts")
        assert after is not None
        assert moved(before, after, "supctl_sessions_accepted_total", verb="connect") == 2
        assert moved(before, after, "supctl_sessions_accepted_total", verb="exec") == 1
        assert moved(before, after, "supctl_streams_ended_total", verb="exec", protocol="", reason="eof") == 1
        assert moved(before, after, "supctl_relayed_bytes_total", direction="up") >= 12
        assert moved(before, after, "supctl_requests_refused_total", status="401", verb="show") == 1
        assert moved(before, after, "supctl_requests_refused_total", status="401", verb="login") == 1
        assert moved(before, after, "supctl_stream_open_seconds_count") == 3
        assert moved(before, after, "supctl_audit_write_seconds_count") >= 1
        for direction in ("up", "down"):  # one peak per stream and direction, where it was opened
            assert moved(before, after, "supctl_relay_queue_peak_bytes_count", direction=direction) == 3
        # No user name, token or stream id is a label.
        text = scrape(port)[1]
        assert "admin" not in text and "sct_" not in text


def test_hostile_values_never_become_label_values() -> None:
    """A client chooses the protocol, path and site it asks for: whatever it sends, the
    label sets stay the bounded known ones (one series per hostile request would let a
    flood of cheap requests exhaust the tower's memory and the scraper's)."""
    metrics = TowerMetrics()
    for i in range(500):
        metrics.observe(audit.record("session-refused", status=400 + i % 7, verb=f"v{i}", site=f"s{i}"))
        metrics.observe(
            audit.record("stream-closed", verb="connect", protocol=f"p{i}", close_reason=f"r{i}", bytes_up=1)
        )
    families = {f.name: f for f in text_string_to_metric_families(metrics.exposition().decode())}
    refused = {tuple(sorted(s.labels.items())) for s in families["supctl_requests_refused"].samples}
    assert len(refused) <= 2 * len(STATUSES)  # (status, "other") and their _created twins
    ended = {s.labels["protocol"] + s.labels["reason"] for s in families["supctl_streams_ended"].samples}
    assert ended == {"otherother"}
    assert "s1" not in metrics.exposition().decode()


# --- logs --------------------------------------------------------------------------------------


def test_json_logs_parse_and_a_newline_in_a_name_cannot_forge_a_line(tmp_path: Path) -> None:
    with Stack(tmp_path) as stack:
        stack.env["SUPCTL_LOG_FORMAT"] = "json"
        stack.start_tower()
        assert stack.tower is not None
        stack.add_site(SITE, f'{inventory(APP, INST)}runtime = "host"\n')
        _, echo = start_server(stack, "echo")
        result = stack.supctl(*do_args(SITE, APP, INST, "connect", "tcp", str(echo)), input=b"hi")
        assert result.returncode == 0 and result.stdout == b"hi", result.stderr
        # A name with a newline and a forged JSON line after it.
        forged = 'x\n{"level": "error", "event": "FORGED"}'
        hostile = stack.supctl(*do_args(SITE, forged, INST, "connect", "tcp", str(echo)), input=b"")
        assert hostile.returncode == ExitCode.USAGE, hostile.stderr
        token = (stack.dir / "admin.token").read_text().strip()
        raw = subprocess.run(
            ["curl", "-sS", "--cacert", str(stack.dir / "ca.pem"), "-H", f"Authorization: Bearer {token}",
             stack.url.replace("wss://", "https://")
             + "/v1/state/applications/x%0A%7B%22event%22%3A%22FORGED%22%7D/service-instances?site=" + SITE],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert "invalid application name" in raw.stdout, raw.stdout
        stack.tower.log.wait_for(r"session closed")
        stack.tower.log.wait_for(r"refused .*: 400")
        lines = stack.tower.log.text().splitlines()
        records = [json.loads(line) for line in lines]  # every line is one JSON object
        assert all({"time", "level", "logger", "event"} <= r.keys() for r in records), records
        assert not [r for r in records if r["event"] == "FORGED"]
        refused = next(r for r in records if r.get("status") == 400)
        assert refused["reason"].startswith("invalid application name") and refused["peer"], refused
        assert any(
            r["event"].startswith("control-tower listening on") and r["level"] == "info" for r in records
        )
        opened = next(r for r in records if r["event"].startswith("session opened"))
        assert opened["site"] == SITE and opened["user"] == "admin" and opened["session"], opened
        site = next(r for r in records if r["event"].startswith(f"site {SITE} connected"))
        assert site["site"] == SITE and site["peer"], site
        stream = next(r for r in records if r["event"].startswith("stream closed"))
        assert stream["site"] == SITE and stream["reason"] == "eof" and isinstance(stream["stream"], int), (
            stream
        )


def test_log_level_and_format_are_checked(tmp_path: Path) -> None:
    for prog, args in (("control-tower", ["serve", "--config", "x"]), ("edge-enforcer", ["run"])):
        result = subprocess.run(
            [program(prog), *args, "--log-format", "xml"], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == ExitCode.USAGE and "'xml' is not one of 'text', 'json'" in result.stderr


# --- the enforcer reloads its inventory on SIGHUP ------------------------------------------------


def reload_inventory(containers: dict[str, str], policy: str = "") -> str:
    text = f'{inventory(APP, INST)}runtime = "host"\n'
    for name, seconds in containers.items():
        text += f'[applications.{APP}.service-instances.{INST}.containers.{name}]\ncommand = ["sleep", "{seconds}"]\n'
    return text + policy


def running_pids(stack: Stack) -> dict[str, int]:
    [instance] = show_instances(stack, SITE, APP)
    return {
        c["name"]: c["pid"] for c in instance["containers"] if c.get("state") == "running" and c.get("pid")
    }


def test_sighup_reloads_the_inventory_and_keeps_unchanged_containers(tmp_path: Path) -> None:
    with Stack(tmp_path) as stack:
        stack.start_tower()
        site = stack.add_site(SITE, reload_inventory({"keep": "1001", "change": "1002", "remove": "1003"}))

        def three() -> dict[str, int] | None:
            pids = running_pids(stack)
            return pids if len(pids) == 3 else None

        before = wait_until(three, 20, "three containers")
        assert before is not None

        (stack.root / f"{SITE}.toml").write_text(
            reload_inventory({"keep": "1001", "change": "1012", "add": "1004"})
        )
        site.popen.send_signal(signal.SIGHUP)
        site.log.wait_for(r"inventory reloaded; containers: 1 kept, 1 restarted, 1 stopped, 1 started")

        def reloaded() -> dict[str, int] | None:
            pids = running_pids(stack)
            return pids if set(pids) == {"keep", "change", "add"} else None

        after = wait_until(reloaded, 20, "the tower's view of the new inventory")
        assert after is not None
        assert after["keep"] == before["keep"]  # the very same process
        assert after["change"] != before["change"]
        assert cmdline(after["change"])[1:] == ["1012"]
        wait_until(lambda: not cmdline(before["remove"]), 10, "the removed container's end")
        assert cmdline(before["keep"])[1:] == ["1001"]

        # An invalid inventory: one line, and everything goes on as it was.
        (stack.root / f"{SITE}.toml").write_text(reload_inventory({"keep": "1001"}) + "[applications.x\n")
        site.popen.send_signal(signal.SIGHUP)
        line = site.log.wait_for(r"inventory reload refused, the running one stays in force: (.*)")
        assert "Traceback" not in site.log.text(), site.log.text()
        assert line[1], line
        assert running_pids(stack) == after
        assert site.popen.poll() is None
        # New streams are judged against the reloaded inventory: "remove" is no more.
        result = stack.supctl(*do_args(SITE, APP, INST, "containers", "remove", "exec", "true"))
        assert result.returncode == ExitCode.EXEC_FAILED and b"remove" in result.stderr, result.stderr
        result = stack.supctl(*do_args(SITE, APP, INST, "containers", "add", "exec", "exit 5"))
        assert result.returncode == 5, result.stderr


def test_enforcer_metrics_and_probes_on_its_local_listener(tmp_path: Path) -> None:
    with Stack(tmp_path) as stack:
        stack.start_tower()
        token = subprocess.run(
            [program("control-tower"), "site", "add", "--config", str(stack.dir / "tower.toml"), SITE],
            check=True, capture_output=True, text=True, env=stack.env,
        ).stdout.strip()  # fmt: skip
        write_secret(stack.root / f"{SITE}.token", token + "\n")
        (stack.root / f"{SITE}.toml").write_text(reload_inventory({"sleeper": "1005"}))
        site = stack.start_enforcer(SITE, extra=["--metrics-listen", "127.0.0.1:0"])
        port = int(site.log.wait_for(r"metrics and probes on http://127\.0\.0\.1:(\d+)/metrics")[1])
        assert scrape(port, "/healthz") == (200, "ok\n")
        wait_until(lambda: scrape(port, "/readyz") == (200, "ready\n"), 10, "ready")
        wait_until(lambda: running_pids(stack), 20, "the container")
        _, echo = start_server(stack, "echo")
        for payload in (b"one", b"two"):
            result = stack.supctl(*do_args(SITE, APP, INST, "connect", "tcp", str(echo)), input=payload)
            assert result.returncode == 0 and result.stdout == payload, result.stderr

        def counted() -> dict[Any, float] | None:
            now = samples(scrape(port)[1])
            key = ("supctl_enforcer_streams_ended_total", (("handler", "tcp"), ("outcome", "ok")))
            return now if now.get(key) == 2 else None

        now = wait_until(counted, 10, "the two streams")
        assert now is not None
        assert now[("supctl_enforcer_link_up", ())] == 1
        assert now[("supctl_enforcer_links_total", ())] == 1
        labels = (("application", APP), ("container", "sleeper"), ("instance", INST))
        assert now[("supctl_enforcer_container_state", tuple(sorted((*labels, ("state", "running")))))] == 1
        assert now[("supctl_enforcer_container_restarts_total", labels)] == 0
        assert scrape_status(port, "/nothing") == 404
        # Idle sockets beyond the listener's cap from one address are closed at once
        # (tests/test_preauth.py has the whole story), with one line in the enforcer's log.
        idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(PER_ADDRESS + 1)]
        try:
            wait_until(lambda: closed_by_peer(idle) == 1, 10, "the socket over the cap closed")
            site.log.wait_for(r"metrics listener caps \(8 per address, 64 in all\): refused 1 ")
        finally:
            for sock in idle:
                sock.close()
        # The tower goes away: not ready (no link), still alive.
        assert stack.tower is not None
        stack.tower.popen.kill()
        wait_until(lambda: scrape_status(port, "/readyz") == 503, 30, "not ready without the tower")
        assert scrape(port, "/healthz") == (200, "ok\n")


def scrape_status(port: int, path: str) -> int:
    try:
        return scrape(port, path)[0]
    except urllib.error.HTTPError as exc:
        return exc.code


def test_supctl_log_options_are_checked_and_stay_off_stdout(tmp_path: Path) -> None:
    bad = subprocess.run([program("supctl"), "--log-level", "loud", "whoami"], capture_output=True, text=True)
    assert bad.returncode == ExitCode.USAGE and "'loud' is not one of" in bad.stderr, bad.stderr
    with Stack(tmp_path) as stack:
        stack.start_tower()
        result = stack.supctl("--log-level", "debug", "--log-format", "json", "show", "sites", "-o", "json")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == []  # stdout stays data
        for line in result.stderr.decode().splitlines():
            assert {"time", "level", "logger", "event"} <= json.loads(line).keys()


def test_a_reload_that_narrows_the_site_policy_ends_streams_it_no_longer_allows(tmp_path: Path) -> None:
    """Authority is judged while it is used: a stream opened under the old inventory's policy
    ends when a reload no longer allows it; one still allowed goes on."""
    with Stack(tmp_path) as stack:
        stack.start_tower()
        site = stack.add_site(SITE, reload_inventory({}))
        _, echo = start_server(stack, "echo")
        _, other = start_server(stack, "echo")
        args = [program("supctl"), *do_args(SITE, APP, INST, "connect", "tcp", str(echo), "--bind", "0")]
        kept = stack.spawn(
            "kept",
            [program("supctl"), *do_args(SITE, APP, INST, "connect", "tcp", str(other), "--bind", "0")],
        )
        narrowed = stack.spawn("narrowed", args)
        ports = [
            int(p.log.wait_for(r"Forwarding from \S+:(\d+) ->", proc=p.popen)[1]) for p in (kept, narrowed)
        ]
        conns = [socket.create_connection(("127.0.0.1", port), timeout=10) for port in ports]
        try:
            for conn in conns:  # both streams are open and accepted at the site
                conn.sendall(b"before")
                assert conn.recv(6) == b"before"
            policy = f'[policy]\nallow-ports = ["{other}"]\n'
            (stack.root / f"{SITE}.toml").write_text(reload_inventory({}, policy))
            site.popen.send_signal(signal.SIGHUP)
            site.log.wait_for(r"inventory reloaded; .*1 streams ended by the new inventory")
            # The narrowed stream was reset: its local connection ends (RST or EOF), no echo.
            conns[1].settimeout(10)
            with contextlib.suppress(ConnectionResetError):
                assert conns[1].recv(10) == b""
            narrowed.log.wait_for(r"the site's inventory changed")
            conns[0].sendall(b"after")
            assert conns[0].recv(5) == b"after"
        finally:
            for conn in conns:
                conn.close()
