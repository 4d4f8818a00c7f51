"""The seed's story (port-forwarding.txt), end to end with real namespaces, DNS and TLS.

A service instance ``popcorn-controller-service-1`` of ``popcorn-controller`` at site
``stockholm-sergel`` lives in its own network namespace.  Behind it, on a "lan"
namespace joined by a veth, are a DNS server (dnsmasq, 192.0.2.53) that knows
``destination.example`` -> 192.0.2.11, and a TCP server at 192.0.2.11:443.  The
service's resolv.conf (``/etc/netns/NS/resolv.conf``) names 192.0.2.53; the host
knows nothing of it.  As the seed says: the name is resolved *at the site* with
``exec 'nslookup destination.example'``, and the numeric address is then reached
with ``connect tcp 443 --ip-address 192.0.2.11``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from e2e_support import wait_until
from exec_support import exec_args, nslookup, start_dnsmasq, toml_str, wait_for_dns
from netlab import NetLab, ServerProc, try_connect
from servers import pattern_sha256, send_pattern_and_read
from stack import Stack, do_args, one_line_error

from supctl.errors import ExitCode

pytestmark = pytest.mark.root

SITE = "stockholm-sergel"
APP = "popcorn-controller"
INSTANCE = "popcorn-controller-service-1"
CONTAINER = "kettle-popper-manager"
NAME = "destination.example"
DNS_IP = "192.0.2.53"
DEST_IP = "192.0.2.11"
SERVICE_IP = "192.0.2.1"
SERVER_SEED = 443
DOWN_SIZE = 3_000_000  # what the server at 192.0.2.11:443 sends per connection
UP_SIZE = 2_000_000  # what we send to it


@dataclass
class World:
    lab: NetLab
    svc: str
    lan: str
    stack: Stack
    server: ServerProc
    report: Path
    dns_log: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("seed")
    with NetLab() as lab:
        svc = lab.add_ns("svc")
        lan = lab.add_ns("lan")
        _, lan_if = lab.veth(svc, f"{SERVICE_IP}/24", lan, f"{DNS_IP}/24")
        lab.add_address(lan, lan_if, f"{DEST_IP}/24")
        lab.write_netns_etc(svc, f"nameserver {DNS_IP}\n")
        dns_log = root / "dnsmasq.log"
        dnsmasq = start_dnsmasq(lab, lan, DNS_IP, NAME, DEST_IP, dns_log)
        wait_for_dns(lab, lan, DNS_IP, NAME, DEST_IP, dnsmasq)
        report = root / "server.jsonl"
        server = lab.start_server(
            lan,
            "sink-source",
            f"{DEST_IP}:443",
            "--seed",
            str(SERVER_SEED),
            "--size",
            str(DOWN_SIZE),
            "--report",
            str(report),
        )
        with Stack(root) as stack:
            stack.start_tower()
            base = f"applications.{APP}.service-instances.{INSTANCE}"
            stack.add_site(
                SITE,
                f"[{base}]\nnetns = {toml_str(svc)}\n"
                f"[{base}.containers.{CONTAINER}]\n"
                # A long-running main process, as a real container would have.
                f'command = ["/bin/sh", "-c", "exec sleep infinity"]\n',
            )
            yield World(lab, svc, lan, stack, server, report, dns_log)


def site_exec(world: World, command: str) -> tuple[int, str, str]:
    result = world.stack.supctl(*exec_args(SITE, APP, INSTANCE, CONTAINER, command), timeout=30)
    return result.returncode, result.stdout.decode(), result.stderr.decode()


def test_the_host_itself_cannot_resolve_or_reach_the_destination(world: World) -> None:
    # The host's own resolver does not know the name...
    host = nslookup(world.lab, None, NAME)
    assert host.returncode != 0, host
    assert DEST_IP not in host.stdout
    # ...and the site's DNS server and the destination are out of the host's reach.
    direct = nslookup(world.lab, None, NAME, DNS_IP)
    assert direct.returncode != 0 and DEST_IP not in direct.stdout, direct
    assert try_connect(DEST_IP, 443, timeout=0.5) is not None


def test_the_container_sees_the_services_resolv_conf(world: World) -> None:
    code, out, err = site_exec(world, "cat /etc/resolv.conf")
    assert (code, out, err) == (0, f"nameserver {DNS_IP}\n", "")


def test_nslookup_runs_at_the_site_and_asks_the_sites_dns_server(world: World) -> None:
    code, out, err = site_exec(world, f"nslookup {NAME}")
    assert code == 0, (out, err)
    assert re.search(rf"^Server:\s+{re.escape(DNS_IP)}$", out, re.M), out
    assert re.search(rf"^Name:\s+{re.escape(NAME)}\nAddress: {re.escape(DEST_IP)}$", out, re.M), out
    # The query really left the service instance: the DNS server saw the service's address.
    wait_until(
        lambda: f"query[A] {NAME} from {SERVICE_IP}" in world.dns_log.read_text(),
        what="the query in the dnsmasq log",
    )


def test_connect_refuses_a_name_and_points_at_exec_nslookup(world: World) -> None:
    result = world.stack.supctl(*do_args(SITE, APP, INSTANCE, "connect", "tcp", "443", "--ip-address", NAME))
    assert result.returncode == ExitCode.USAGE
    line = one_line_error(result.stderr)
    assert "exec 'nslookup" in line and NAME in line, line


def resolve_at_the_site(world: World) -> str:
    """What a user does: run the seed's nslookup and read the address off its output."""
    code, out, _ = site_exec(world, f"nslookup {NAME}")
    assert code == 0, out
    addresses = re.findall(rf"^Name:\s+{re.escape(NAME)}\nAddress: (\S+)$", out, re.M)
    assert addresses == [DEST_IP], out
    return str(addresses[0])


def server_records(world: World) -> list[dict[str, object]]:
    try:
        return [json.loads(line) for line in world.report.read_text().splitlines()]
    except FileNotFoundError:
        return []


def test_connect_reaches_the_resolved_address_through_the_service(world: World) -> None:
    address = resolve_at_the_site(world)
    forward, port = world.stack.forward(
        *do_args(SITE, APP, INSTANCE, "connect", "tcp", "443", "--ip-address", address, "--bind", "0")
    )
    assert re.search(
        rf"Forwarding from 127\.0\.0\.1:{port} -> {re.escape(DEST_IP)}:443 in {INSTANCE} at {SITE}",
        forward.log.text(),
    ), forward.log.text()
    before = len(server_records(world))
    down = send_pattern_and_read(port, 7, UP_SIZE, timeout=30)
    assert down == (pattern_sha256(SERVER_SEED, DOWN_SIZE), DOWN_SIZE)
    # The server got exactly our bytes, from the service's own address.
    records = wait_until(lambda: server_records(world)[before:], what="the server's report")
    assert len(records) == 1, records
    record = records[0]
    assert record["sha256"] == pattern_sha256(7, UP_SIZE) and record["received"] == UP_SIZE, record
    assert record["error"] is None, record
    assert str(record["peer"]).startswith(f"{SERVICE_IP}:"), record
    assert forward.stop() == 0
    assert re.search(r"connection 1 closed", forward.log.text()), forward.log.text()
