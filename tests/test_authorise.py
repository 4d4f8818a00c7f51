"""The tower's authorisation as a table: :func:`supctl.tower.authorise.authorise` called
directly, with a principal, a parsed request, a policy set and a view of the sites; no
tower, no socket, no file.  The same function judges the upgrade, every OPEN and sweep
(``again``) and what ``show`` reveals; the statuses and texts are the ones clients see.
"""

from __future__ import annotations

import tomllib
from collections.abc import Sequence
from typing import Any

import pytest

from supctl.errors import UsageError
from supctl.tower.authorise import (
    Principal,
    Refusal,
    Sites,
    authorise,
    visible_applications,
    visible_sites,
)
from supctl.tower.httpapi import Rejection
from supctl.tower.policy import ALLOW_ALL, ALLOW_EVERYTHING, Rule, parse_policies
from supctl.tower.requests import connect_accesses, exec_access
from supctl.tower.route import Access, Route
from supctl.tower.siteinfo import InstanceInfo, SiteInfo

SITE, OTHER, HIDDEN, OFFLINE, TCP_ONLY = (
    "stockholm-sergel",
    "stockholm-odenplan",
    "oslo-hidden",
    "stockholm-offline",
    "stockholm-tcp",
)
APP, INST, SHELL = "popcorn", "popcorn-1", "shell"

POLICIES = """
[[policies.ops.rules]]
effect = "allow"
site = "stockholm-sergel"
application = "popcorn"
service-instance = "popcorn-1"
verb = "connect"
protocol = "tcp"
ports = ["443"]
addresses = ["127.0.0.1/32", "192.0.2.0/24"]

[[policies.ops.rules]]
effect = "allow"
site = "stockholm-*"
application = "popcorn"
service-instance = "popcorn-1"
container = "shell"
verb = "exec"

[[policies.ops.rules]]
effect = "allow"
site = "stockholm-sergel"
application = "popcorn"
verb = "show"

[[policies.ops.rules]]
effect = "allow"
site = "stockholm-offline"
verb = "show"
"""


class PolicySet:
    """A parsed policy set with :class:`~supctl.tower.policy.PolicyFile`'s ``rules``."""

    def __init__(self, text: str) -> None:
        self.known = parse_policies(tomllib.loads(text), "policies.toml")

    def rules(self, names: Sequence[str]) -> list[Rule]:
        if ALLOW_ALL in names:
            return [ALLOW_EVERYTHING]
        return [rule for name in names for rule in self.known.get(name, ())]


class BrokenPolicySet:
    def rules(self, names: Sequence[str]) -> list[Rule]:
        raise UsageError("bad policy file policies.toml: policy ops rule 1: effect must be 'allow' or 'deny'")


def _info(apps: dict[str, list[str]], handlers: list[str]) -> SiteInfo:
    return SiteInfo(
        applications={
            app: {name: InstanceInfo(name, app, containers={SHELL: {}}) for name in names}
            for app, names in apps.items()
        },
        handlers=handlers,
    )


CONNECTED = {
    SITE: _info({APP: [INST, "popcorn-2"], "kernel": ["kernel-1"]}, ["exec", "tcp"]),
    OTHER: _info({APP: [INST]}, ["exec", "tcp"]),
    HIDDEN: _info({"secret": ["secret-1"]}, ["exec", "tcp"]),
    TCP_ONLY: _info({APP: [INST]}, ["tcp"]),
}
SITES = Sites({*CONNECTED, OFFLINE}.__contains__, CONNECTED.get)
OPS = PolicySet(POLICIES)
ALICE = Principal("alice", "a1b2c3d4", ("ops",))
ADMIN = Principal.admin("cc3a4a20")
NOBODY = Principal("bob", "b0b0b0b0", ())


def connect(port: int = 443, ip: str = "", *, site: str = SITE, app: str = APP, inst: str = INST) -> Access:
    return Access("connect", site, app, inst, protocol="tcp", port=port, ip_address=ip)


def exec_(container: str = SHELL, *, site: str = SITE, app: str = APP, inst: str = INST) -> Access:
    return Access("exec", site, app, inst, container=container)


def judged(principal: Principal, access: Access, policies: Any = OPS, *, again: bool = False) -> Any:
    """("route",) for a grant (checked to carry the request), else (status, message)."""
    verdict = authorise(principal, access, policies, SITES, again=again)
    if isinstance(verdict, Route):
        assert verdict.access == access and verdict.who == principal.who
        return ("route",)
    assert isinstance(verdict, Refusal)
    return (verdict.status, verdict.message)


def refuses(what: str, user: str = "alice") -> tuple[int, str]:
    return (403, f"policy refuses {what} for user {user}")


def not_found(what: str) -> tuple[int, str]:
    return (404, what)


CASES: list[tuple[str, Principal, Access, Any]] = [
    # The admin token: allow-all, then only what exists and is connected counts.
    ("admin connect", ADMIN, connect(22, "10.0.0.1"), ("route",)),
    ("admin exec", ADMIN, exec_(), ("route",)),
    ("admin unknown site", ADMIN, connect(site="nowhere"), not_found("unknown site 'nowhere'")),
    ("admin offline site", ADMIN, connect(site=OFFLINE), (503, f"site {OFFLINE!r} is not connected to the control tower")),
    ("admin no such app", ADMIN, connect(app="nope"), not_found(f"application 'nope' not found at site {SITE!r}")),
    ("admin no such instance", ADMIN, connect(inst="nope-1"), not_found(f"service instance 'nope-1' of application {APP!r} not found at site {SITE!r}")),
    ("admin no such container", ADMIN, exec_("db"), not_found(f"container 'db' not found in service instance {INST!r} at site {SITE!r}")),
    ("admin no exec handler", ADMIN, exec_(site=TCP_ONLY), (501, f"verb 'exec' is not supported at site {TCP_ONLY!r}")),
    ("admin no udp handler", ADMIN, Access("connect", SITE, APP, INST, protocol="udp", port=53), (501, f"protocol 'udp' is not supported at site {SITE!r}")),
    # A narrow policy: exactly its site, application, instance, container, port and addresses.
    ("alice allowed connect", ALICE, connect(), ("route",)),
    ("alice allowed address", ALICE, connect(443, "192.0.2.11"), ("route",)),
    ("alice allowed exec", ALICE, exec_(), ("route",)),
    ("alice exec at a sibling site", ALICE, exec_(site=OTHER), ("route",)),
    ("alice wrong site", ALICE, connect(site=OTHER), refuses(f"connect to 127.0.0.1:443 in {INST} at {OTHER}")),
    ("alice wrong app", ALICE, connect(app="kernel", inst="kernel-1"), refuses(f"connect to 127.0.0.1:443 in kernel-1 at {SITE}")),
    ("alice wrong instance", ALICE, connect(inst="popcorn-2"), refuses(f"connect to 127.0.0.1:443 in popcorn-2 at {SITE}")),
    ("alice wrong container", ALICE, exec_("db"), refuses(f"exec in db at {SITE}")),
    ("alice wrong port", ALICE, connect(22), refuses(f"connect to 127.0.0.1:22 in {INST} at {SITE}")),
    ("alice wrong address", ALICE, connect(443, "10.9.0.1"), refuses(f"connect to 10.9.0.1:443 in {INST} at {SITE}")),
    ("alice loopback is the service", ALICE, connect(443, "127.0.0.2"), ("route",)),
    ("alice ipv6 loopback is the service", ALICE, connect(443, "::1"), ("route",)),
    # Refused before the site is looked at: a refused user learns nothing of what exists.
    ("alice unknown site", ALICE, connect(site="nowhere"), refuses(f"connect to 127.0.0.1:443 in {INST} at nowhere")),
    ("alice missing handler", ALICE, exec_(site=TCP_ONLY), (501, f"verb 'exec' is not supported at site {TCP_ONLY!r}")),
    ("no policies at all", NOBODY, exec_(), refuses(f"exec in {SHELL} at {SITE}", "bob")),
    # show: an unknown site and one the principal may not see get the same answer.
    ("show unknown site", ALICE, Access("show", "nowhere"), not_found("unknown site 'nowhere'")),
    ("show invisible site", ALICE, Access("show", HIDDEN), not_found(f"unknown site {HIDDEN!r}")),
    ("show invisible sibling", ALICE, Access("show", OTHER), not_found(f"unknown site {OTHER!r}")),
    ("show visible through an app", ALICE, Access("show", SITE), ("route",)),
    ("show visible, not connected", ALICE, Access("show", OFFLINE), (503, f"site {OFFLINE!r} is not connected to the control tower")),
    ("show allowed app", ALICE, Access("show", SITE, APP), ("route",)),
    ("show app without a rule", ALICE, Access("show", SITE, "kernel"), not_found(f"application 'kernel' not found at site {SITE!r}")),
    ("show app not there", ALICE, Access("show", SITE, "nope"), not_found(f"application 'nope' not found at site {SITE!r}")),
    ("admin show hidden", ADMIN, Access("show", HIDDEN, "secret"), ("route",)),
]  # fmt: skip


@pytest.mark.parametrize(
    ("principal", "access", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_upgrade(principal: Principal, access: Access, expected: Any) -> None:
    assert judged(principal, access) == expected


AGAIN: list[tuple[str, Principal, Access, Any, Any]] = [
    ("still allowed", ALICE, connect(), OPS, None),
    ("site gone: the link's business", ALICE, exec_(site=OFFLINE), OPS, None),
    ("admin, policy file broken", ADMIN, connect(22), BrokenPolicySet(), None),
    ("token revoked", Principal("alice", "a1b2c3d4", ("ops",), "token revoked"), connect(), OPS, (401, "token revoked")),
    ("token expired", Principal("alice", "a1b2c3d4", ("ops",), "token expired"), connect(), OPS, (401, "token expired")),
    ("admin token revoked", Principal("admin", "cc3a4a20", (ALLOW_ALL,), "token revoked"), connect(), OPS, (401, "token revoked")),
    ("user removed", Principal("alice", "a1b2c3d4", None), connect(), OPS, (401, "token revoked (its user was removed)")),
    ("policies taken away", Principal("alice", "a1b2c3d4", ()), connect(), OPS, (403, f"policy no longer allows connect to 127.0.0.1:443 in {INST} at {SITE} for user alice")),
    ("policy narrowed", ALICE, connect(), PolicySet(POLICIES.replace('ports = ["443"]', 'ports = ["8443"]')), (403, f"policy no longer allows connect to 127.0.0.1:443 in {INST} at {SITE} for user alice")),
    ("policy file broken", ALICE, connect(), BrokenPolicySet(), (500, "the control tower's policy file is invalid")),
]  # fmt: skip


@pytest.mark.parametrize(
    ("principal", "access", "policies", "expected"), [c[1:] for c in AGAIN], ids=[c[0] for c in AGAIN]
)
def test_again_at_every_open_and_sweep(
    principal: Principal, access: Access, policies: Any, expected: Any
) -> None:
    assert judged(principal, access, policies, again=True) == (expected or ("route",))


def test_a_broken_policy_file_refuses_the_upgrade_with_its_cause_for_the_log() -> None:
    verdict = authorise(ALICE, connect(), BrokenPolicySet(), SITES)
    assert verdict == Refusal(
        500,
        "the control tower's policy file is invalid (see its log)",
        cause="bad policy file policies.toml: policy ops rule 1: effect must be 'allow' or 'deny'",
    )
    assert authorise(ALICE, Access("show", SITE), BrokenPolicySet(), SITES) == verdict
    assert visible_sites(ALICE, [SITE], BrokenPolicySet(), SITES) == verdict
    # Nothing at all to judge with: default deny.
    assert judged(ALICE, connect(), None) == refuses(f"connect to 127.0.0.1:443 in {INST} at {SITE}")


def test_a_missing_handler_names_what_the_site_supports() -> None:
    verdict = authorise(ADMIN, exec_(site=TCP_ONLY), OPS, SITES)
    assert isinstance(verdict, Refusal) and verdict.info == {"supported": ["tcp"]}


@pytest.mark.parametrize(
    ("ip", "expected", "judged_as"),
    [
        ("::ffff:192.0.2.11", ("route",), "192.0.2.11"),
        ("[::ffff:192.0.2.11]", ("route",), "192.0.2.11"),
        ("::ffff:10.9.0.1", refuses(f"connect to 10.9.0.1:443 in {INST} at {SITE}"), "10.9.0.1"),
        ("64:ff9b::10.9.0.1", refuses(f"connect to 10.9.0.1:443 in {INST} at {SITE}"), "10.9.0.1"),
        ("::ffff:127.0.0.1", ("route",), "127.0.0.1"),
    ],
)
def test_a_non_canonical_address_is_judged_as_the_one_dialled(
    ip: str, expected: tuple[Any, ...], judged_as: str
) -> None:
    """The request is parsed to canonical form before it is judged, and the route keeps the
    spelling for the audit only."""
    [access] = connect_accesses(
        APP, INST, {"site": [SITE], "protocol": ["tcp"], "port": ["443"], "ip-address": [ip]}
    )
    assert (access.ip_address, access.requested_address) == (judged_as, ip)
    assert judged(ALICE, access) == expected
    verdict = authorise(ALICE, access, OPS, SITES)
    if isinstance(verdict, Route):
        assert verdict.request({}).ip_address == judged_as


@pytest.mark.parametrize(
    ("query", "fragment"),
    [
        ({"site": ["Stockholm"], "protocol": ["tcp"], "port": ["443"]}, "invalid site name"),
        ({"site": [SITE], "protocol": ["t cp"], "port": ["443"]}, "invalid protocol"),
        ({"site": [SITE], "protocol": ["tcp"], "port": ["²²"]}, "port must be 1-65535 in ASCII digits"),
        ({"site": [SITE], "protocol": ["tcp"], "port": ["443"], "ip-address": ["0.0.0.0"]}, "unspecified"),
    ],
)
def test_requests_that_cannot_be_judged_are_400(query: dict[str, list[str]], fragment: str) -> None:
    with pytest.raises(Rejection) as caught:
        connect_accesses(APP, INST, query)
    assert caught.value.status == 400 and fragment in str(caught.value)


def test_exec_access_reads_its_site() -> None:
    assert exec_access(APP, INST, SHELL, {"site": [SITE]}) == exec_()


def test_show_lists_what_may_be_seen() -> None:
    names = [SITE, OTHER, HIDDEN, OFFLINE, TCP_ONLY]
    assert visible_sites(ALICE, names, OPS, SITES) == [SITE, OFFLINE]  # offline: listed, not connected
    assert visible_sites(ADMIN, names, OPS, SITES) == names
    assert visible_sites(NOBODY, names, OPS, SITES) == []
    assert visible_applications(ALICE, SITE, OPS, SITES) == [APP]
    assert visible_applications(ADMIN, SITE, OPS, SITES) == ["kernel", APP]
    assert visible_applications(ALICE, HIDDEN, OPS, SITES) == Refusal(404, f"unknown site {HIDDEN!r}")
    assert visible_applications(ALICE, OFFLINE, OPS, SITES) == Refusal(
        503, f"site {OFFLINE!r} is not connected to the control tower"
    )


NAMED = Sites({*CONNECTED, OFFLINE}.__contains__, CONNECTED.get, names=lambda: [*CONNECTED, OFFLINE])


def test_a_typo_gets_a_suggestion_only_among_names_the_asker_may_see() -> None:
    """``unknown site 'stockholm-sergell'; did you mean 'stockholm-sergel'?`` - but a name
    the asker may not see (no show rule) is never suggested: the hint reveals nothing."""

    def message(principal: Principal, access: Access) -> str:
        verdict = authorise(principal, access, OPS, NAMED)
        assert isinstance(verdict, Refusal) and verdict.status == 404, verdict
        return verdict.message

    assert message(ADMIN, connect(site="stockholm-sergell")) == (
        "unknown site 'stockholm-sergell'; did you mean 'stockholm-sergel'?"
    )
    # alice's exec rule covers stockholm-*; she may see stockholm-sergel (a show rule).
    assert message(ALICE, exec_(site="stockholm-sergell")).endswith("; did you mean 'stockholm-sergel'?")
    assert message(ADMIN, connect(app="popcorm")) == (
        f"application 'popcorm' not found at site {SITE!r}; did you mean 'popcorn'?"
    )
    assert "; did you mean 'popcorn-" in message(ADMIN, connect(inst="popcorn-3"))
    assert message(ADMIN, exec_("shel")).endswith("; did you mean 'shell'?")
    # The hidden site exists: the admin gets the hint, alice (no show rule for it) does not.
    assert (
        message(ADMIN, Access("show", "oslo-hiden"))
        == "unknown site 'oslo-hiden'; did you mean 'oslo-hidden'?"
    )
    assert message(ALICE, Access("show", "oslo-hiden")) == "unknown site 'oslo-hiden'"
    # Nothing close: no hint.
    assert message(ADMIN, connect(site="paris")) == "unknown site 'paris'"
