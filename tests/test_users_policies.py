"""Users, login tokens and policies: the policy engine alone, then end to end (issue 4).

Every refusal is one line on stderr with exit code 3 (tower) or 6 (the site's
local policy); tokens and passwords never show up in stderr, logs or the audit log.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import json
import socket
import stat
import subprocess
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e_support import wait_until
from hypothesis import given, settings
from hypothesis import strategies as st
from stack import Stack, do_args, one_line_error, program
from towerkit import Kit

from supctl.enforcer.api import Serves
from supctl.enforcer.inventory import parse_inventory
from supctl.errors import ExitCode, StreamError, UsageError
from supctl.protocol import OpenRequest
from supctl.tower.policy import Request, Rule, decide, parse_policies
from supctl.tower.users import check_password, hash_password

APP, INSTANCE, SITE = "popcorn-controller", "popcorn-controller-service-1", "stockholm-sergel"
OTHER_SITE = "oslo-local"
PASSWORD = "correct horse battery staple"

POLICIES = """
[[policies.ops.rules]]
effect = "allow"
site = "stockholm-*"
application = "popcorn-*"
verb = "connect"
protocol = "tcp"
ports = ["443", "8000-8100"]
addresses = ["127.0.0.1/32", "192.0.2.0/24"]

[[policies.ops.rules]]
effect = "deny"
site = "stockholm-*"
application = "popcorn-*"
verb = "connect"
protocol = "tcp"
ports = ["8050"]
addresses = ["127.0.0.1/32"]

[[policies.ops.rules]]
effect = "allow"
verb = "show"
site = "stockholm-*"
"""


# --- the policy engine ---------------------------------------------------------------


def rules(text: str) -> list[Rule]:
    return [rule for body in parse_policies(tomllib.loads(text), "test").values() for rule in body]


def connect(site: str = SITE, app: str = APP, port: int = 443, address: str | None = None) -> Request:
    return Request("connect", site, app, INSTANCE, None, "tcp", port, address)


def effect(rule_list: list[Rule], request: Request) -> str:
    rule = decide(rule_list, request)
    return rule.effect if rule is not None else "no match"


def test_no_rule_denies() -> None:
    assert effect([], connect()) == "no match"


def test_example_policy() -> None:
    ops = rules(POLICIES)
    assert effect(ops, connect()) == "allow"
    assert effect(ops, connect(port=8000)) == "allow"
    assert effect(ops, connect(port=8100, address="192.0.2.7")) == "allow"
    assert effect(ops, connect(port=8050)) == "deny"  # same specificity: deny wins the tie
    assert effect(ops, connect(port=8050, address="192.0.2.7")) == "allow"  # the deny is for 127.0.0.1 only
    assert effect(ops, connect(port=22)) == "no match"
    assert effect(ops, connect(address="10.0.0.1")) == "no match"
    assert effect(ops, connect(site="oslo-local")) == "no match"
    assert effect(ops, connect(app="kettle")) == "no match"
    assert effect(ops, Request("exec", SITE, APP, INSTANCE, "shell")) == "no match"
    assert effect(ops, Request("show", SITE)) == "allow"
    assert effect(ops, Request("show", SITE, APP)) == "allow"


def test_more_specific_wins() -> None:
    text = """
    [[policies.p.rules]]
    effect = "deny"
    site = "*"
    verb = "connect"
    [[policies.p.rules]]
    effect = "allow"
    verb = "connect"
    ports = ["22"]
    """
    p = rules(text)
    assert effect(p, connect(port=22)) == "allow"  # two fields beat one ("*" does not count)
    assert effect(p, connect(port=23)) == "deny"


def test_absent_request_fields_match_only_wildcards() -> None:
    p = rules('[[policies.p.rules]]\neffect = "allow"\nverb = "show"\napplication = "popcorn-*"\n')
    assert effect(p, Request("show", SITE, APP)) == "allow"
    assert effect(p, Request("show", SITE)) == "no match"  # listing sites needs a site-wide rule


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('effect = "maybe"', "effect must be"),
        ('effect = "allow"\nports = ["70000"]', "bad port range"),
        ('effect = "allow"\nports = ["9-1"]', "bad port range"),
        ('effect = "allow"\naddresses = ["10.0.0.0/33"]', "addresses"),
        ('effect = "allow"\nsitename = "x"', "unknown key 'sitename'"),
    ],
)
def test_bad_rules_are_refused(body: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        rules(f"[[policies.p.rules]]\n{body}\n")


GLOBS = st.sampled_from(["*", "stockholm-*", SITE, "oslo-*", "popcorn-*", APP, "connect", "exec", "tcp"])
RULES = st.builds(
    lambda eff, site, app, verb, ports, nets: Rule(
        eff,
        tuple((f, g) for f, g in (("site", site), ("application", app), ("verb", verb)) if g != "*"),
        ports,
        nets,
    ),
    st.sampled_from(["allow", "deny"]),
    GLOBS,
    GLOBS,
    GLOBS,
    st.none() | st.lists(st.tuples(st.integers(1, 100), st.integers(100, 65535)), max_size=2).map(tuple),
    st.none()
    | st.lists(
        st.sampled_from(["127.0.0.1/32", "192.0.2.0/24", "10.0.0.0/8", "0.0.0.0/0"]).map(
            ipaddress.ip_network
        ),
        max_size=2,
    ).map(tuple),
)
REQUESTS = st.builds(
    connect,
    st.sampled_from([SITE, "oslo-local"]),
    st.sampled_from([APP, "kettle"]),
    st.integers(1, 65535),
    st.none() | st.sampled_from(["192.0.2.5", "10.1.2.3", "127.0.0.1"]),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(RULES, max_size=6), REQUESTS, st.randoms())
def test_decision_is_order_independent(rule_list: list[Rule], request: Request, rnd: object) -> None:
    shuffled = list(rule_list)
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    assert effect(rule_list, request) == effect(shuffled, request)


@settings(max_examples=300, deadline=None)
@given(st.lists(RULES, max_size=6), REQUESTS)
def test_decision_follows_the_definition(rule_list: list[Rule], request: Request) -> None:
    matching = [r for r in rule_list if r.matches(request)]
    got = effect(rule_list, request)
    if not matching:
        assert got == "no match"
        return
    top = max(r.specificity for r in matching)
    effects = {r.effect for r in matching if r.specificity == top}
    assert got == ("deny" if "deny" in effects else "allow")


# --- the user store -------------------------------------------------------------------


def test_password_hash(tmp_path: Path) -> None:
    hashed = hash_password(PASSWORD)
    assert PASSWORD not in hashed and hashed.startswith("scrypt$16384$8$1$")
    assert check_password(PASSWORD, hashed)
    assert not check_password(PASSWORD + "x", hashed)
    assert hash_password(PASSWORD) != hashed  # random salt
    kit = Kit(tmp_path)
    kit.add_user("alice", PASSWORD, ["ops"])
    token = kit.add_token("alice", "api")
    kit.close()
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("tower.db*"))
    assert PASSWORD.encode() not in stored and token.encode() not in stored
    assert hashlib.sha256(token.encode()).hexdigest().encode() in stored  # only its hash
    assert stat.S_IMODE((tmp_path / "tower.db").stat().st_mode) == 0o600
    identity = kit.directory.check_token(token)
    assert identity is not None and identity.user == "alice" and identity.policies == ("ops",)


def _in_process_tower(tmp_path: Path, **limits: Any) -> Any:
    from supctl.tower.limits import Limits

    kit = Kit(tmp_path, Limits(**limits))
    kit.add_user("alice", PASSWORD, ["ops"])
    return kit.tower


def _login(tower: Any, password: str, name: str = "alice") -> tuple[int, str]:
    """GET /v1/login through the tower's handshake hook, as websockets calls it."""
    import asyncio
    import base64
    from types import SimpleNamespace

    from websockets.datastructures import Headers
    from websockets.http11 import Request as HttpRequest

    basic = base64.b64encode(f"{name}:{password}".encode()).decode()
    request = HttpRequest("/v1/login", Headers([("Authorization", f"Basic {basic}")]))
    peer = SimpleNamespace(remote_address=("127.0.0.1", 5555))
    response = asyncio.run(tower.handshake_request(peer, request))
    assert response is not None
    return response.status_code, response.body.decode()


def _count_hashes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the thread of every password hash the tower computes."""
    from supctl.tower import logins

    threads: list[str] = []

    def recording(password: str, stored: str) -> bool:
        threads.append(threading.current_thread().name)
        return check_password(password, stored)

    monkeypatch.setattr(logins, "check_password", recording)
    return threads


def test_login_hashes_the_password_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """scrypt costs tens of ms of CPU: on the loop it would stall every relayed stream.
    The tower's handshake hook runs it on a worker thread, then answers on the loop."""
    threads = _count_hashes(monkeypatch)
    tower = _in_process_tower(tmp_path)
    assert _login(tower, PASSWORD)[0] == 200
    assert _login(tower, PASSWORD + "x")[0] == 401
    assert len(threads) == 2 and threading.main_thread().name not in threads


def test_failed_logins_are_throttled_without_hashing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    threads = _count_hashes(monkeypatch)
    tower = _in_process_tower(tmp_path, login_failures=2, login_failures_per_address=2, login_window=60.0)
    assert [_login(tower, "wrong")[0] for _ in range(2)] == [401, 401]
    status, body = _login(tower, PASSWORD)  # even the right password, for now
    assert status == 429 and "too many failed logins; try again in 60 s" in body, body
    assert len(threads) == 2  # refused without hashing
    assert _login(tower, "wrong", name="nobody")[0] == 429  # the same address, another name


# --- the enforcer's local policy --------------------------------------------------------


def local(policy: str) -> object:
    inv = parse_inventory(
        tomllib.loads(f"[applications.{APP}.service-instances.{INSTANCE}]\n[policy]\n{policy}\n")
    )
    return inv.policy


def test_local_policy() -> None:
    pol = local(
        'allow-ip-addresses = ["192.0.2.0/24"]\nallow-ports = ["443", "8000-8100"]\nallow-exec = false'
    )
    tcp, exec_ = Serves("connect", "tcp"), Serves("exec")
    ok = OpenRequest("connect", APP, INSTANCE, protocol="tcp", port=443, ip_address="192.0.2.9")
    pol.check(tcp, ok)  # type: ignore[attr-defined]
    pol.check(tcp, OpenRequest("connect", APP, INSTANCE, protocol="tcp", port=8080))  # type: ignore[attr-defined]
    for serves, bad, text in [
        (
            tcp,
            OpenRequest("connect", APP, INSTANCE, protocol="tcp", port=22, ip_address="192.0.2.9"),
            "192.0.2.9:22",
        ),
        (
            tcp,
            OpenRequest("connect", APP, INSTANCE, protocol="tcp", port=443, ip_address="10.0.0.1"),
            "10.0.0.1:443",
        ),
        (exec_, OpenRequest("exec", APP, INSTANCE, container="c"), "exec"),
    ]:
        with pytest.raises(StreamError, match=f"the site's local policy refuses {text}"):
            pol.check(serves, bad)  # type: ignore[attr-defined]
    # No [policy] table: everything allowed (backwards compatible).
    inv = parse_inventory({"applications": {}})
    inv.policy.check(exec_, OpenRequest("exec", APP, INSTANCE, container="c"))
    with pytest.raises(UsageError, match="allow-ports"):
        local('allow-ports = ["x"]')


def test_local_policy_judges_canonical_targets_and_the_declaration() -> None:
    pol = local('allow-ip-addresses = ["::ffff:192.0.2.0/120"]\nallow-ports = ["443"]\nallow-exec = false')
    tcp, echo = Serves("connect", "tcp"), Serves("connect", "echo")

    def connect(ip: str, port: int = 443) -> OpenRequest:
        return OpenRequest("connect", APP, INSTANCE, protocol="tcp", port=port, ip_address=ip)

    # Every loopback address is the service itself: not restricted by the addresses.
    for ip in ("", "127.0.0.1", "127.0.0.2", "::1"):
        pol.check(tcp, connect(ip))  # type: ignore[attr-defined]
    pol.check(echo, connect("192.0.2.7"))  # type: ignore[attr-defined]  # the mapped network is the IPv4 one
    for serves, request, text in [
        (tcp, connect("::1", 22), r"\[::1\]:22"),  # the ports apply to the service itself
        (echo, connect("10.0.0.1"), "10.0.0.1:443"),  # and to every connect protocol
        (Serves("exec"), connect(""), "exec"),  # judged by the handler, not by the OPEN's verb
    ]:
        with pytest.raises(StreamError, match=f"the site's local policy refuses {text}"):
            pol.check(serves, request)  # type: ignore[attr-defined]
    pol.check(Serves("shell"), OpenRequest("shell", APP, INSTANCE))  # type: ignore[attr-defined]


# --- end to end -------------------------------------------------------------------------


class Echo:
    """A TCP echo server on a free port in 8000-8100 (the range the test policy allows)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        for port in range(8000, 8101):
            if port == 8050:
                continue
            try:
                self.sock.bind(("127.0.0.1", port))
                break
            except OSError:
                continue
        else:
            pytest.skip("no free port in 8000-8100")
        self.port = self.sock.getsockname()[1]
        self.sock.listen()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                while data := conn.recv(65536):
                    conn.sendall(data)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with Stack(tmp_path_factory.mktemp("users")) as stack:
        stack.start_tower()
        (stack.dir / "policies.toml").write_text(POLICIES)
        stack.add_site(SITE, f"[applications.{APP}.service-instances.{INSTANCE}]\n")
        stack.add_site(
            OTHER_SITE,
            f'[applications.{APP}.service-instances.{INSTANCE}]\n[policy]\nallow-ports = ["8000-8100"]\n',
        )
        config = str(stack.dir / "tower.toml")
        for name, policy in (("alice", ["--policy", "ops"]), ("bob", [])):
            subprocess.run(
                [program("control-tower"), "user", "add", "--config", config, name, *policy],
                input=PASSWORD + "\n",
                text=True,
                check=True,
                capture_output=True,
                env=stack.env,
            )
        yield stack


def user_env(stack: Stack, name: str) -> dict[str, str]:
    """supctl's environment for ``name``: no admin token; its own config directory."""
    env = dict(stack.env)
    del env["SUPCTL_TOKEN_FILE"]
    env["XDG_CONFIG_HOME"] = str(stack.root / f"config-{name}")
    return env


def login(stack: Stack, name: str, password: str = PASSWORD) -> tuple[dict[str, str], dict[str, str]]:
    env = user_env(stack, name)
    result = stack.supctl("do", "login", name, input=(password + "\n").encode(), env=env)
    assert result.returncode == 0, result.stderr
    stored = json.loads((Path(env["XDG_CONFIG_HOME"]) / "supctl" / "token").read_text())
    secrets_ = {"token": stored["token"], "password": password}
    for value in secrets_.values():
        assert value not in result.stderr.decode()
    return env, stored


def refused(stack: Stack, env: dict[str, str], *args: str) -> tuple[int, str]:
    result = stack.supctl(*args, env=env, timeout=30)
    return result.returncode, one_line_error(result.stderr)


def test_login_wrong_password(stack: Stack) -> None:
    env = user_env(stack, "mallory")
    result = stack.supctl("do", "login", "alice", input=b"wrong\n", env=env)
    assert result.returncode == ExitCode.DENIED
    assert "wrong user name or password" in one_line_error(result.stderr)
    assert not (Path(env["XDG_CONFIG_HOME"]) / "supctl" / "token").exists()
    result = stack.supctl("do", "login", "nobody", input=b"wrong\n", env=env)
    assert "wrong user name or password" in one_line_error(result.stderr)


def test_login_stores_token_0600_and_show_filters(stack: Stack) -> None:
    env, stored = login(stack, "alice")
    path = Path(env["XDG_CONFIG_HOME"]) / "supctl" / "token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stored["host"] == stack.url and stored["user"] == "alice" and len(stored["accessor"]) == 8
    result = stack.supctl("show", "-o", "json", "sites", env=env)
    assert result.returncode == 0, result.stderr
    names = [site["name"] for site in json.loads(result.stdout)]
    assert names == [SITE]  # oslo-local is not in alice's policy
    # The admin token keeps seeing everything.
    result = stack.supctl("show", "-o", "json", "sites")
    assert sorted(site["name"] for site in json.loads(result.stdout)) == sorted([SITE, OTHER_SITE])


def test_whoami_names_the_credential_in_use_and_login_warns_when_another_wins(stack: Stack) -> None:
    """One precedence order (docs/cli.md): a login does not beat a token-file in config.toml;
    do login says so, and whoami shows which token is used and where it came from."""
    env, stored = login(stack, "alice")
    result = stack.supctl("whoami", env=env)
    assert result.returncode == 0, result.stderr
    fields = dict(line.split(":", 1) for line in result.stdout.decode().splitlines())
    fields = {key: value.strip() for key, value in fields.items()}
    assert (fields["user"], fields["accessor"], fields["kind"]) == ("alice", stored["accessor"], "login")
    assert fields["expires"] == stored["expires"] and fields["credential"].startswith("login of alice (")
    assert stored["token"] not in result.stdout.decode() + result.stderr.decode()

    # The admin token in config.toml outranks the login: whoami says admin, login warns.
    config = Path(env["XDG_CONFIG_HOME"]) / "supctl" / "config.toml"
    config.write_text(f'token-file = "{stack.dir / "admin.token"}"\n')
    result = stack.supctl("do", "login", "alice", input=(PASSWORD + "\n").encode(), env=env)
    assert result.returncode == 0, result.stderr
    warning = f"warning: token-file {stack.dir / 'admin.token'} in {config} takes precedence over this login"
    assert warning in " ".join(result.stderr.decode().split()), result.stderr
    result = stack.supctl("whoami", env=env)
    assert "user:       admin" in result.stdout.decode() and "in " + str(config) in result.stdout.decode()
    config.unlink()

    # No credential at all: how to get one.
    (Path(env["XDG_CONFIG_HOME"]) / "supctl" / "token").unlink()
    code, line = refused(stack, env, "whoami")
    assert code == ExitCode.DENIED and "log in with 'supctl do login NAME'" in line, line


def test_allowed_connect_works(stack: Stack) -> None:
    env, _ = login(stack, "alice")
    echo = Echo()
    result = stack.supctl(
        *do_args(SITE, APP, INSTANCE, "connect", "tcp", str(echo.port)), input=b"ping", env=env
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"ping"
    # 127.0.0.1 given explicitly is the instance itself, allowed by "127.0.0.1/32".
    args = do_args(SITE, APP, INSTANCE, "connect", "tcp", str(echo.port), "--ip-address", "127.0.0.1")
    result = stack.supctl(*args, input=b"pong", env=env)
    assert result.returncode == 0 and result.stdout == b"pong", result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            do_args(OTHER_SITE, APP, INSTANCE, "connect", "tcp", "443"),
            f"policy refuses connect to 127.0.0.1:443 in {INSTANCE} at {OTHER_SITE} for user alice",
        ),
        (
            do_args(SITE, "kettle", INSTANCE, "connect", "tcp", "443"),
            f"policy refuses connect to 127.0.0.1:443 in {INSTANCE} at {SITE} for user alice",
        ),
        (
            do_args(SITE, APP, INSTANCE, "containers", "shell", "exec", "true"),
            f"policy refuses exec in shell at {SITE} for user alice",
        ),
        (
            do_args(SITE, APP, INSTANCE, "connect", "tcp", "22"),
            f"policy refuses connect to 127.0.0.1:22 in {INSTANCE} at {SITE} for user alice",
        ),
        (
            do_args(SITE, APP, INSTANCE, "connect", "tcp", "8050"),
            f"policy refuses connect to 127.0.0.1:8050 in {INSTANCE} at {SITE} for user alice",
        ),
        (
            do_args(SITE, APP, INSTANCE, "connect", "tcp", "443", "--ip-address", "10.0.0.1"),
            f"policy refuses connect to 10.0.0.1:443 in {INSTANCE} at {SITE} for user alice",
        ),
    ],
    ids=["site", "application", "verb", "port", "deny-rule", "address"],
)
def test_policy_refusals(stack: Stack, args: list[str], message: str) -> None:
    env, _ = login(stack, "alice")
    result = stack.supctl(*args, env=env, timeout=30)
    line = one_line_error(result.stderr)
    # exec: 255 for any failure of supctl's (docs/cli.md); the others: DENIED.
    assert result.returncode == (ExitCode.EXEC_FAILED if "exec" in args else ExitCode.DENIED), line
    assert line.endswith(message), line
    # The refusal is in the audit log, with the user and the accessor, never the token.
    stack.wait_audit(
        lambda r: r["event"] == "session-refused" and r["user"] == "alice" and message in (r["result"] or ""),
        "the refusal's record",
    )


def test_user_without_policies_is_refused_everything(stack: Stack) -> None:
    env, _ = login(stack, "bob")
    code, line = refused(stack, env, *do_args(SITE, APP, INSTANCE, "connect", "tcp", "443"))
    assert code == ExitCode.DENIED and "policy refuses connect" in line and "user bob" in line
    result = stack.supctl("show", "-o", "json", "sites", env=env)
    assert result.returncode == 0 and json.loads(result.stdout) == []


def test_site_local_policy_refuses_what_the_tower_allowed(stack: Stack) -> None:
    # The admin token is allowed everything by the tower; oslo-local only allows 8000-8100.
    result = stack.supctl(*do_args(OTHER_SITE, APP, INSTANCE, "connect", "tcp", "443"), input=b"x")
    line = one_line_error(result.stderr)
    assert result.returncode == ExitCode.STREAM, line
    assert "the site's local policy refuses 127.0.0.1:443" in line
    stack.wait_audit(
        lambda r: (
            r["event"] == "stream-closed"
            and r["site"] == OTHER_SITE
            and r["close-reason"] == "site-reset"
            and "local policy refuses 127.0.0.1:443" in (r["result"] or "")
        ),
        "the stream's record",
    )
    echo = Echo()
    result = stack.supctl(*do_args(OTHER_SITE, APP, INSTANCE, "connect", "tcp", str(echo.port)), input=b"hi")
    assert result.returncode == 0 and result.stdout == b"hi", result.stderr


def test_logout_revokes(stack: Stack) -> None:
    env, stored = login(stack, "alice")
    result = stack.supctl("do", "logout", env=env)
    assert result.returncode == 0, result.stderr
    assert stored["token"] not in result.stderr.decode()
    assert not (Path(env["XDG_CONFIG_HOME"]) / "supctl" / "token").exists()
    env2 = dict(env, SUPCTL_TOKEN=stored["token"])
    code, line = refused(stack, env2, "show", "sites")
    assert code == ExitCode.DENIED and line.endswith("token revoked"), line


def test_control_tower_revokes_by_accessor(stack: Stack) -> None:
    env, stored = login(stack, "alice")
    listing = stack.control_tower("token", "list", "--config", str(stack.dir / "tower.toml"))
    assert stored["accessor"] in listing and stored["token"] not in listing
    stack.control_tower("token", "revoke", "--config", str(stack.dir / "tower.toml"), stored["accessor"])
    code, line = refused(stack, env, "show", "sites")
    assert code == ExitCode.DENIED and line.endswith("token revoked"), line


def test_revoking_a_token_ends_the_sessions_it_opened(stack: Stack) -> None:
    """A token is checked at the upgrade and again while its sessions run: revoking it
    ends a running forward (exit 3, one line), and the tower logs why."""
    env, stored = login(stack, "alice")
    echo = Echo()
    args = do_args(SITE, APP, INSTANCE, "connect", "tcp", str(echo.port), "--bind", "0")
    proc = stack.spawn("supctl-revoked", [program("supctl"), *args], env=env)
    port = int(proc.log.wait_for(r"Forwarding from \S+:(\d+) ->", proc=proc.popen)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"before")
        assert sock.recv(6) == b"before"
    stack.control_tower("token", "revoke", "--config", str(stack.dir / "tower.toml"), stored["accessor"])
    assert proc.popen.wait(timeout=30) == ExitCode.DENIED
    line = proc.log.wait_for(r"supctl: error: (.*)")[1]
    assert line == "the tower closed the session: token revoked", line
    assert stack.tower is not None
    stack.tower.log.wait_for(rf"closing session who=alice:{stored['accessor']} .*: token revoked")


def test_api_token_and_expiry(stack: Stack) -> None:
    config = str(stack.dir / "tower.toml")
    token = stack.control_tower("token", "add", "--config", config, "--user", "alice").strip()
    env = dict(user_env(stack, "api"), SUPCTL_TOKEN=token)
    result = stack.supctl("show", "-o", "json", "sites", env=env)
    assert result.returncode == 0, result.stderr
    short = stack.control_tower(
        "token", "add", "--config", config, "--user", "alice", "--expires", "1s"
    ).strip()
    # Expiry is wall-clock time: poll (bounded) until the tower says so.
    deadline = time.monotonic() + 10
    while True:
        result = stack.supctl("show", "sites", env=dict(env, SUPCTL_TOKEN=short))
        if result.returncode != 0 or time.monotonic() > deadline:
            break
    code, line = result.returncode, one_line_error(result.stderr)
    assert code == ExitCode.DENIED and line.endswith("token expired"), line


def test_admin_token_can_be_revoked(tmp_path: Path) -> None:
    own = Stack(tmp_path)
    try:
        own.start_tower()
        admin_token = (own.dir / "admin.token").read_text().strip()
        accessor = hashlib.sha256(admin_token.encode()).hexdigest()[:8]
        assert own.supctl("show", "sites").returncode == 0
        own.control_tower("token", "revoke", "--config", str(own.dir / "tower.toml"), accessor)
        result = own.supctl("show", "sites")
        assert result.returncode == ExitCode.DENIED
        assert "invalid API token" in one_line_error(result.stderr)
    finally:
        own.close()


def test_admin_token_still_does_everything(stack: Stack) -> None:
    echo = Echo()
    result = stack.supctl(*do_args(SITE, APP, INSTANCE, "connect", "tcp", str(echo.port)), input=b"admin")
    assert result.returncode == 0 and result.stdout == b"admin", result.stderr
    result = stack.supctl("show", "-o", "json", "-s", SITE, "applications")
    assert result.returncode == 0, result.stderr


def test_secrets_never_logged(stack: Stack) -> None:
    env, stored = login(stack, "alice")
    stack.supctl("show", "sites", env=env)
    admin_token = (stack.dir / "admin.token").read_text().strip()
    stack.wait_audit(lambda r: r["event"] == "login" and r["accessor"] == stored["accessor"], "the login")
    texts = ["\n".join(stack.audit_lines())]
    texts += [p.read_bytes().decode("latin-1") for p in stack.dir.glob("tower.db*")]  # the store, raw
    texts += [p.read_text(errors="replace") for p in stack.root.glob("*.log")]
    for text in texts:
        for secret in (stored["token"], PASSWORD, admin_token):
            assert secret not in text
    records = [json.loads(x) for x in texts[0].splitlines()]
    logins = [r for r in records if r["event"] == "login" and r["accessor"] == stored["accessor"]]
    assert logins and logins[0]["user"] == "alice"


def test_long_running_connect_renews_its_login_token(tmp_path: Path) -> None:
    with Stack(tmp_path) as stack:
        stack.start_tower()
        assert stack.tower is not None
        stack.tower.stop()
        config = stack.dir / "tower.toml"
        config.write_text(config.read_text().replace('login-expiry = "8h"', 'login-expiry = "6s"'))
        (stack.dir / "policies.toml").write_text(POLICIES)
        stack.tower = stack.spawn(
            "tower", [program("control-tower"), "serve", "--config", str(config), "--listen", "127.0.0.1:0"]
        )
        match = stack.tower.log.wait_for(r"listening on (wss://127\.0\.0\.1:\d+)", proc=stack.tower.popen)
        stack.url = match[1]
        stack.env["SUPCTL_HOST"] = stack.url
        stack.add_site(SITE, f"[applications.{APP}.service-instances.{INSTANCE}]\n")
        subprocess.run(
            [program("control-tower"), "user", "add", "--config", str(config), "alice", "--policy", "ops"],
            input=PASSWORD + "\n",
            text=True,
            check=True,
            capture_output=True,
            env=stack.env,
        )
        env, stored = login(stack, "alice")
        echo = Echo()
        proc = stack.spawn(
            "supctl",
            [
                program("supctl"),
                *do_args(SITE, APP, INSTANCE, "connect", "tcp", str(echo.port), "--bind", "0"),
            ],
            env=env,
        )
        port = int(proc.log.wait_for(r"Forwarding from \S+:(\d+) ->", proc=proc.popen)[1])
        # Conditions with deadlines, not a sleep: the renewal lands (at 2/3 of the 6 s
        # lifetime), then the first expiry passes (wall-clock time: the tower's judgement
        # of expiry itself is tested on a fake clock in test_hub.py).
        stack.wait_audit(
            lambda r: r["event"] == "renew" and r["accessor"] == stored["accessor"], "the renewal", 10
        )
        first_expiry = datetime.datetime.fromisoformat(stored["expires"])
        wait_until(lambda: datetime.datetime.now(datetime.UTC) > first_expiry, 10, "the first expiry")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"still")  # the session outlived the first expiry: the sweep let it be
            assert sock.recv(5) == b"still"
        result = stack.supctl("show", "-o", "json", "sites", env=env)
        assert result.returncode == 0, result.stderr
        renewed = json.loads((Path(env["XDG_CONFIG_HOME"]) / "supctl" / "token").read_text())
        assert renewed["token"] == stored["token"] and renewed["expires"] > stored["expires"]
        assert stored["token"] not in proc.log.text()
