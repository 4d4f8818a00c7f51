"""Authorisation that holds against a user with a narrow policy (issue 8, items 1-4).

Each test here reproduces a way a hostile user got past the tower's policies on the
old code: another spelling of a denied address, a policy narrowed while a session was
open, ``show`` refusals that told which sites exist, and input (digits, names) that
crashed the check or forged a log line.  The tower is driven in process through
websockets' own ``Request`` objects, as ``process_request`` receives them; the live
policy check is also proven end to end with the real programs.
"""

from __future__ import annotations

import datetime
import json
import logging
import re
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import quote, urlencode

import pytest
from sqlalchemy import update
from stack import Stack, do_args, one_line_error, program
from towerkit import Kit, run
from websockets.datastructures import Headers
from websockets.http11 import Request as HttpRequest

from supctl.errors import ExitCode
from supctl.output import OneLineFormatter, escape_controls
from supctl.protocol import SUBPROTOCOL
from supctl.protocol.names import parse_port, valid_name
from supctl.protocol.targets import canonical_address, is_self
from supctl.tower import server
from supctl.tower.database.schema import users
from supctl.tower.limits import Limits
from supctl.tower.links import Route
from supctl.tower.policy import Request, allowed, parse_policies
from supctl.tower.siteinfo import InstanceInfo, SiteInfo

SITE, APP, INSTANCE = "stockholm-sergel", "popcorn-controller", "popcorn-controller-service-1"
HIDDEN_SITE = "oslo-local"  # exists, connected, but alice may not see it
PASSWORD = "correct horse battery staple"

#: connect anywhere except the service's own port 22 and 10/8: the review's policy.
WIDE_BUT_NOT_22 = """
[[policies.ops.rules]]
effect = "allow"
site = "stockholm-*"
verb = "connect"
protocol = "tcp"

[[policies.ops.rules]]
effect = "deny"
site = "stockholm-*"
verb = "connect"
ports = ["22"]
addresses = ["127.0.0.1/32"]

[[policies.ops.rules]]
effect = "deny"
site = "stockholm-*"
verb = "connect"
addresses = ["10.0.0.0/8"]
"""


# --- canonical targets ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("10.9.0.1", "10.9.0.1"),
        ("::ffff:10.9.0.1", "10.9.0.1"),
        ("[::ffff:127.0.0.1]", "127.0.0.1"),
        ("::FFFF:7f00:1", "127.0.0.1"),
        ("64:ff9b::10.9.0.1", "10.9.0.1"),  # NAT64's well-known prefix reaches the IPv4 host
        ("2001:DB8::0001", "2001:db8::1"),
        ("::1", "::1"),
        ("127.0.0.2", "127.0.0.2"),
    ],
)
def test_canonical_address(text: str, canonical: str) -> None:
    assert canonical_address(text) == canonical


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("::ffff:0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("255.255.255.255", "broadcast"),
        ("::127.0.0.1", "IPv4-compatible"),
        ("fe80::1%eth0", "scoped"),
        ("destination.example", "not a numeric IP address"),
        ("١٢٧.0.0.1", "not a numeric IP address"),  # Arabic-Indic digits
        ("127.0.0.01", "not a numeric IP address"),  # leading zeros read as octal by some stacks
        ("1" * 5000, "not a numeric IP address"),
        ("", "not a numeric IP address"),
    ],
)
def test_non_targets_are_refused(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        canonical_address(text)


def test_every_loopback_address_is_the_service_itself() -> None:
    policy = parse_policies(
        {"policies": {"p": {"rules": [{"effect": "deny", "addresses": ["127.0.0.1/32"], "ports": ["22"]}]}}},
        "t",
    )["p"]
    allow = parse_policies({"policies": {"p": {"rules": [{"effect": "allow", "verb": "connect"}]}}}, "t")["p"]
    for address in (None, "127.0.0.1", "127.0.0.2", "127.255.255.254", "::1"):
        assert is_self(address)
        request = Request("connect", SITE, APP, INSTANCE, "", "tcp", 22, address)
        assert not allowed((*allow, *policy), request), address
        assert allowed((*allow, *policy), Request("connect", SITE, APP, INSTANCE, "", "tcp", 23, address))


def test_mapped_networks_in_a_policy_mean_ipv4() -> None:
    rules = parse_policies(
        {"policies": {"p": {"rules": [{"effect": "allow", "addresses": ["::ffff:192.0.2.0/120"]}]}}}, "t"
    )["p"]
    assert allowed(rules, Request("connect", SITE, APP, INSTANCE, "", "tcp", 1, "192.0.2.9"))


# --- strict input -----------------------------------------------------------------------


@pytest.mark.parametrize("text", ["²²", "٤٤٣", "1" * 5000, "+443", " 443", "443 ", "0", "65536", "", "0x1bb"])
def test_ports_are_ascii_digits_in_range(text: str) -> None:
    assert parse_port(text) is None


@pytest.mark.parametrize("name", ["a\nb", "a%0Ab", "x\x1b[31m", "", "-x", "a/b", "a b", "é", "a" * 254, ".."])
def test_names_are_boring(name: str) -> None:
    assert not valid_name(name)


def test_log_lines_cannot_be_forged() -> None:
    record = logging.LogRecord(
        "supctl.tower", logging.INFO, "", 0, "session opened %s", ("x\n2026-01-01 INFO forged\x1b[2J",), None
    )
    line = OneLineFormatter("%(levelname)s %(message)s").format(record)
    assert "\n" not in line and "\x1b" not in line and "\\x0a2026-01-01 INFO forged\\x1b[2J" in line
    assert escape_controls("a\u2028b\x85c") == "a\\u2028b\\x85c"


# --- the tower, in process --------------------------------------------------------------


class Peer:
    """The connection a request arrived on (weak-referenceable, as websockets' is)."""

    remote_address = ("127.0.0.1", 5555)


class Client:
    """Requests to an in-process tower, exactly as websockets hands them to process_request."""

    def __init__(self, tower: server.Tower, token: str) -> None:
        self.tower, self.token = tower, token
        self.peer = Peer()

    def request(self, path: str, query: dict[str, str], *, upgrade: bool = True) -> tuple[int, str]:
        headers = Headers([("Authorization", f"Bearer {self.token}")])
        if upgrade:
            headers["Connection"] = "Upgrade"
            headers["Sec-WebSocket-Protocol"] = SUBPROTOCOL
        # As websockets calls it: the directory is brought up to date first (policies.toml).
        request = HttpRequest(f"{path}?{urlencode(query)}", headers)
        response = run(self.tower.handshake_request(self.peer, request))  # type: ignore[arg-type]
        if response is None:
            return 101, ""
        body = json.loads(response.body)
        return response.status_code, body["errors"][0]["error-message"] if "errors" in body else json.dumps(
            body
        )

    def connect(self, port: str = "443", ip: str | None = None, **names: str) -> tuple[int, str]:
        app, instance = names.get("app", APP), names.get("instance", INSTANCE)
        path = f"/v1/state/applications/{quote(app, safe='')}/service-instances/{quote(instance, safe='')}/connect"
        query = {"site": names.get("site", SITE), "protocol": "tcp", "port": port}
        if ip is not None:
            query["ip-address"] = ip
        return self.request(path, query)

    def show(self, path: str, site: str | None = None) -> tuple[int, str]:
        return self.request(path, {"site": site} if site else {}, upgrade=False)


def _connected(tower: server.Tower, site: str, apps: dict[str, list[str]]) -> None:
    info = SiteInfo(
        applications={
            app: {name: InstanceInfo(name, app, containers={"shell": {}}) for name in names}
            for app, names in apps.items()
        },
        handlers=["exec", "tcp"],
    )
    # A live link whose token is valid (what Hub.site_link asks of it).
    link = SimpleNamespace(
        info=info, conn=SimpleNamespace(closed=None), peer="?", evict_if_invalid=lambda: False
    )
    tower.hub.sites[site] = link


@pytest.fixture
def kit(tmp_path: Path) -> Iterator[Kit]:
    kit = Kit(tmp_path, Limits())
    for name in (SITE, HIDDEN_SITE, "stockholm-offline"):
        kit.add_site(name)
    kit.add_user("alice", PASSWORD, ["ops"])
    (tmp_path / "policies.toml").write_text(WIDE_BUT_NOT_22)
    kit.fresh()  # the tower applies the watched file to the store
    _connected(kit.tower, SITE, {APP: [INSTANCE]})
    _connected(kit.tower, HIDDEN_SITE, {"secret-app": ["secret-1"]})
    yield kit
    kit.close()


@pytest.fixture
def tower(kit: Kit) -> server.Tower:
    return kit.tower


@pytest.fixture
def alice(kit: Kit) -> Client:
    return Client(kit.tower, kit.add_token("alice", "login", datetime.timedelta(hours=1)))


@pytest.mark.parametrize(
    ("ip", "port", "status", "fragment"),
    [
        (None, "22", 403, "policy refuses connect to 127.0.0.1:22"),
        ("127.0.0.1", "22", 403, "policy refuses connect to 127.0.0.1:22"),
        ("127.0.0.2", "22", 403, "policy refuses connect to 127.0.0.2:22"),
        ("::1", "22", 403, "policy refuses connect to [::1]:22"),
        ("::ffff:127.0.0.1", "22", 403, "policy refuses connect to 127.0.0.1:22"),
        ("[::ffff:127.0.0.1]", "22", 403, "policy refuses connect to 127.0.0.1:22"),
        ("0.0.0.0", "22", 400, "the unspecified address is not a target"),
        ("::", "22", 400, "the unspecified address is not a target"),
        ("::ffff:10.9.0.1", "443", 403, "policy refuses connect to 10.9.0.1:443"),
        ("64:ff9b::10.9.0.1", "443", 403, "policy refuses connect to 10.9.0.1:443"),
        ("224.0.0.1", "443", 400, "multicast or broadcast"),
        # Allowed: the route carries the canonical address, judged and dialled.
        ("::ffff:192.0.2.11", "443", 101, ""),
        (None, "443", 101, ""),
    ],
)
def test_spellings_of_a_denied_target_are_denied(
    alice: Client, ip: str | None, port: str, status: int, fragment: str
) -> None:
    got, message = alice.connect(port=port, ip=ip)
    assert (got, fragment in message) == (status, True), message


def test_the_route_carries_the_canonical_target_and_the_spelling(alice: Client, tower: server.Tower) -> None:
    assert alice.connect(ip="::ffff:192.0.2.11")[0] == 101
    (route,) = tower._routes.values()
    assert isinstance(route, Route)
    assert (route.ip_address, route.requested_address) == ("192.0.2.11", "::ffff:192.0.2.11")
    assert route.request({}).ip_address == "192.0.2.11"  # what the enforcer is asked to dial
    from supctl.tower.audit import route_fields

    fields = route_fields(route)
    assert (fields["target"], fields["requested-target"]) == ("192.0.2.11:443", "[::ffff:192.0.2.11]:443")


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"port": "²²"}, "port must be 1-65535 in ASCII digits"),
        ({"port": "٤٤٣"}, "port must be 1-65535 in ASCII digits"),
        ({"port": "1" * 5000}, "port must be 1-65535 in ASCII digits"),
        ({"app": "popcorn\nINFO forged"}, "invalid application name"),
        ({"instance": "x\x1b[2J"}, "invalid service instance name"),
        ({"site": "Stockholm\n"}, "invalid site name"),
        ({"ip": "١٢٧.0.0.1"}, "not a numeric IP address"),
    ],
)
def test_strict_input_gets_400_not_500(alice: Client, kwargs: dict[str, str], fragment: str) -> None:
    status, message = alice.connect(**kwargs)
    assert status == 400 and fragment in message, (status, message)
    assert "\n" not in message


def test_a_policy_narrowed_while_a_session_is_open(
    alice: Client, kit: Kit, tower: server.Tower, tmp_path: Path
) -> None:
    """The same judgement at the upgrade, at every OPEN and in the sweep: the policy in force
    (as of the directory's last freshness check: every request, and every 0.25 s)."""
    assert alice.connect(port="443")[0] == 101
    (route,) = tower._routes.values()
    assert isinstance(route, Route)
    assert tower.target_refusals(route)[0] is None
    version = kit.directory.policy_version
    (tmp_path / "policies.toml").write_text(WIDE_BUT_NOT_22.replace('protocol = "tcp"', 'protocol = "udp"'))
    kit.fresh()
    assert kit.directory.policy_version == (version or 0) + 1  # applied to the store as a new version
    refusal = tower.target_refusals(route)[0]
    assert (
        refusal == f"policy no longer allows connect to 127.0.0.1:443 in {INSTANCE} at {SITE} for user alice"
    )
    # A broken policy file allows nothing (fail closed), is parsed once, not per OPEN, and
    # never reaches the store.
    (tmp_path / "policies.toml").write_text("[[policies.ops.rules]]\neffect = 'maybe'\n")
    kit.fresh()
    assert tower.target_refusals(route)[0] == "the control tower's policy file is invalid"
    assert tower.target_refusals(route)[0] == "the control tower's policy file is invalid"
    assert run(kit.store.policies.version()) == (version or 0) + 1
    # Taking the user's policies away works the same way (another process writes the store).
    (tmp_path / "policies.toml").write_text(WIDE_BUT_NOT_22)
    kit.fresh()
    assert tower.target_refusals(route)[0] is None
    other = kit.other_store()

    async def take_policies_away() -> None:
        async with other.db.write(bump=True) as conn:
            await conn.execute(update(users).where(users.c.name == "alice").values(policies=[]))

    run(take_policies_away())
    run(other.close())
    kit.fresh()
    assert (tower.target_refusals(route)[0] or "").startswith("policy no longer allows")


# --- what show reveals ------------------------------------------------------------------


def test_show_does_not_reveal_sites_without_a_show_rule(alice: Client) -> None:
    """alice may connect at stockholm-*, but has no show rule: every site she asks about
    is answered as unknown, existing or not, connected or not."""
    answers = {
        site: alice.show("/v1/state/applications", site)
        for site in (SITE, HIDDEN_SITE, "stockholm-offline", "no-such-site")
    }
    for site, (status, message) in answers.items():
        assert (status, message) == (404, f"unknown site {site!r}"), site
    assert alice.show("/v1/state/sites") == (200, json.dumps({"sites": []}))


def test_show_rules_for_one_application(alice: Client, tower: server.Tower, tmp_path: Path) -> None:
    policy = WIDE_BUT_NOT_22 + (
        f'\n[[policies.ops.rules]]\neffect = "allow"\nverb = "show"\nsite = "stockholm-*"\napplication = "{APP}"\n'
    )
    (tmp_path / "policies.toml").write_text(policy)
    _connected(tower, SITE, {APP: [INSTANCE], "kettle": ["kettle-1"]})
    status, body = alice.show("/v1/state/applications", SITE)
    assert status == 200 and [a["name"] for a in json.loads(body)["applications"]] == [APP]
    # Not allowed and not there read the same.
    for app in ("kettle", "no-such-app"):
        status, message = alice.show(f"/v1/state/applications/{app}/service-instances", SITE)
        assert (status, message) == (404, f"application {app!r} not found at site {SITE!r}")
    assert alice.show("/v1/state/applications", HIDDEN_SITE) == (404, f"unknown site {HIDDEN_SITE!r}")
    # She may see stockholm-sergel: so she is told when a site she may see is offline.
    (tmp_path / "policies.toml").write_text(policy.replace(f'application = "{APP}"\n', ""))
    assert alice.show("/v1/state/applications", "stockholm-offline")[0] == 503
    sites = json.loads(alice.show("/v1/state/sites")[1])["sites"]
    assert sorted(s["name"] for s in sites) == ["stockholm-offline", SITE]


# --- end to end: a policy narrowed under a running forward --------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with Stack(tmp_path_factory.mktemp("authorisation")) as stack:
        stack.start_tower()
        (stack.dir / "policies.toml").write_text(WIDE_BUT_NOT_22)
        stack.add_site(SITE, f"[applications.{APP}.service-instances.{INSTANCE}]\n")
        subprocess.run(
            [
                program("control-tower"),
                "user",
                "add",
                "--config",
                str(stack.dir / "tower.toml"),
                "alice",
                "--policy",
                "ops",
            ],
            input=PASSWORD + "\n",
            text=True,
            check=True,
            capture_output=True,
            env=stack.env,
        )
        yield stack


def _alice_env(stack: Stack) -> dict[str, str]:
    env = dict(stack.env)
    del env["SUPCTL_TOKEN_FILE"]
    env["XDG_CONFIG_HOME"] = str(stack.root / "config-alice")
    result = stack.supctl("do", "login", "alice", input=(PASSWORD + "\n").encode(), env=env)
    assert result.returncode == 0, result.stderr
    return env


def test_narrowing_a_policy_ends_a_running_forward(stack: Stack) -> None:
    env = _alice_env(stack)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        args = do_args(SITE, APP, INSTANCE, "connect", "tcp", str(port), "--bind", "0")
        proc = stack.spawn("supctl-narrowed", [program("supctl"), *args], env=env)
        local = int(proc.log.wait_for(r"Forwarding from \S+:(\d+) ->", proc=proc.popen)[1])
        with socket.create_connection(("127.0.0.1", local), timeout=10) as sock:
            conn, _ = listener.accept()
            with conn:
                sock.sendall(b"before")
                assert conn.recv(6) == b"before"
        (stack.dir / "policies.toml").write_text(
            WIDE_BUT_NOT_22.replace('protocol = "tcp"', 'protocol = "udp"')
        )
        assert proc.popen.wait(timeout=30) == ExitCode.DENIED
    line = proc.log.wait_for(r"supctl: error: (.*)")[1]
    assert line.startswith("the tower closed the session: policy no longer allows connect to 127.0.0.1:"), (
        line
    )
    # A new session is refused at the upgrade by the same judgement.
    result = stack.supctl(*do_args(SITE, APP, INSTANCE, "connect", "tcp", "443"), env=env, timeout=30)
    assert result.returncode == ExitCode.DENIED
    assert "policy refuses connect to 127.0.0.1:443" in one_line_error(result.stderr)
    (stack.dir / "policies.toml").write_text(WIDE_BUT_NOT_22)


def test_a_forged_log_line_stays_one_line(stack: Stack) -> None:
    """A name with a newline is refused (400) and never reaches the tower's log raw."""
    env = _alice_env(stack)
    forged = "x\n2026-12-02 00:00:00,000 WARNING supctl.tower: FORGED"
    result = stack.supctl(*do_args(SITE, APP, forged, "connect", "tcp", "443"), env=env, timeout=30)
    assert result.returncode != 0
    assert stack.tower is not None
    lines = stack.tower.log.text().splitlines()
    assert any("FORGED" in line for line in lines)  # it was logged...
    assert not any(
        line.startswith("2026-12-02 00:00:00,000") for line in lines
    )  # ...not as a line of its own
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ", line) for line in lines), lines
