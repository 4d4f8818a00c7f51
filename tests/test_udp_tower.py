"""The tower judges ``connect udp`` exactly as ``connect tcp``: ports, CIDRs, canonical
addresses; a policy that allows only tcp refuses udp (403).  Table tests of
:func:`supctl.tower.authorise.authorise`, as tests/test_authorise.py does for tcp."""

from __future__ import annotations

from typing import Any

import pytest
from test_authorise import ADMIN, ALICE, APP, INST, OPS, POLICIES, SITE, PolicySet, _info, refuses

from supctl.tower.authorise import Principal, Refusal, Sites, authorise
from supctl.tower.requests import connect_accesses
from supctl.tower.route import Access, Route

UDP_SITE, TCP_SITE = "stockholm-udp", "stockholm-sergel"
CONNECTED = {
    UDP_SITE: _info({APP: [INST]}, ["exec", "tcp", "udp"]),
    TCP_SITE: _info({APP: [INST]}, ["exec", "tcp"]),
}
SITES = Sites(CONNECTED.__contains__, CONNECTED.get)

UDP_POLICIES = """
[[policies.dns.rules]]
effect = "allow"
site = "stockholm-udp"
application = "popcorn"
verb = "connect"
protocol = "udp"
ports = ["53", "5000-5010"]
addresses = ["127.0.0.1/32", "192.0.2.0/24"]

[[policies.tcp-only.rules]]
effect = "allow"
site = "stockholm-*"
verb = "connect"
protocol = "tcp"

[[policies.any-protocol.rules]]
effect = "allow"
site = "stockholm-udp"
verb = "connect"
ports = ["53"]
"""
POLICY_SET = PolicySet(UDP_POLICIES)
DNS = Principal("dana", "d1d2d3d4", ("dns",))
TCP_ONLY = Principal("tess", "t1t2t3t4", ("tcp-only",))
ANY = Principal("ann", "a0a0a0a0", ("any-protocol",))


def udp(port: int = 53, ip: str = "", *, site: str = UDP_SITE, protocol: str = "udp") -> Access:
    return Access("connect", site, APP, INST, protocol=protocol, port=port, ip_address=ip)


def verdict(principal: Principal, access: Access) -> Any:
    result = authorise(principal, access, POLICY_SET, SITES)
    if isinstance(result, Route):
        return ("route",)
    assert isinstance(result, Refusal)
    return (result.status, result.message)


CASES: list[tuple[str, Principal, Access, Any]] = [
    ("udp allowed", DNS, udp(), ("route",)),
    ("udp port range", DNS, udp(5005, "192.0.2.53"), ("route",)),
    ("udp loopback is the service", DNS, udp(53, "127.0.0.2"), ("route",)),
    ("udp wrong port", DNS, udp(54), refuses(f"connect to 127.0.0.1:54 in {INST} at {UDP_SITE}", "dana")),
    ("udp wrong address", DNS, udp(53, "10.9.0.1"), refuses(f"connect to 10.9.0.1:53 in {INST} at {UDP_SITE}", "dana")),
    ("a udp policy does not allow tcp", DNS, udp(protocol="tcp"), refuses(f"connect to 127.0.0.1:53 in {INST} at {UDP_SITE}", "dana")),
    # Hostile: a policy naming only tcp must not open udp to the same ports and addresses.
    ("tcp-only refuses udp", TCP_ONLY, udp(), refuses(f"connect to 127.0.0.1:53 in {INST} at {UDP_SITE}", "tess")),
    ("tcp-only allows tcp", TCP_ONLY, udp(protocol="tcp"), ("route",)),
    ("no protocol field: any protocol", ANY, udp(), ("route",)),
    ("no protocol field, wrong port", ANY, udp(54), refuses(f"connect to 127.0.0.1:54 in {INST} at {UDP_SITE}", "ann")),
    ("site without a udp handler", ADMIN, udp(site=TCP_SITE), (501, f"protocol 'udp' is not supported at site {TCP_SITE!r}")),
]  # fmt: skip


@pytest.mark.parametrize(
    ("principal", "access", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_udp_is_judged_like_tcp(principal: Principal, access: Access, expected: Any) -> None:
    assert verdict(principal, access) == expected


def test_the_ops_policy_of_the_tcp_tests_refuses_udp() -> None:
    """tests/test_authorise.py's ``ops`` policy allows tcp 443 only: udp 443 is refused."""
    assert "udp" not in POLICIES
    result = authorise(ALICE, udp(443, site=SITE), OPS, SITES)
    assert isinstance(result, Refusal) and result.status == 403


@pytest.mark.parametrize(
    ("ip", "judged_as", "expected"),
    [
        ("::ffff:192.0.2.53", "192.0.2.53", ("route",)),
        ("::ffff:10.9.0.1", "10.9.0.1", refuses(f"connect to 10.9.0.1:53 in {INST} at {UDP_SITE}", "dana")),
    ],
)
def test_udp_addresses_are_judged_canonical(ip: str, judged_as: str, expected: Any) -> None:
    [access] = connect_accesses(
        APP, INST, {"site": [UDP_SITE], "protocol": ["udp"], "port": ["53"], "ip-address": [ip]}
    )
    assert (access.protocol, access.ip_address, access.requested_address) == ("udp", judged_as, ip)
    assert verdict(DNS, access) == expected
