"""Policies: who may do what, where (default deny).  Evaluation is documented in docs/policies.md.

A policy is a named list of rules (``policies.toml`` next to ``tower.toml``)::

    [[policies.popcorn-operators.rules]]
    effect = "allow"
    site = "stockholm-*"
    application = "popcorn-*"
    verb = "connect"
    protocol = "tcp"
    ports = ["443", "8000-8100"]
    addresses = ["127.0.0.1/32", "192.0.2.0/24"]

A rule matches a request when every field it sets matches.  Of the matching rules
of all the user's policies, the most specific wins: the one setting the most
non-wildcard fields; on a tie, ``deny`` beats ``allow``.  No matching rule: deny.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import os
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from supctl.errors import UsageError
from supctl.protocol.targets import SELF_ADDRESS, Network, canonical_network
from supctl.protocol.targets import matches as address_matches

#: Glob fields, in the order they are reported.
GLOB_FIELDS = ("site", "application", "service-instance", "container", "verb", "protocol")
RULE_KEYS = frozenset({*GLOB_FIELDS, "ports", "addresses", "effect"})
#: The built-in policy of the admin token made by ``control-tower init``.
ALLOW_ALL = "allow-all"


@dataclass(frozen=True)
class Request:
    """What a client asks for.  A field the request does not have is ``None``."""

    verb: str
    site: str
    application: str | None = None
    service_instance: str | None = None
    container: str | None = None
    protocol: str | None = None
    port: int | None = None
    # connect: the *canonical* target address (supctl.protocol.targets); None without --ip-address
    address: str | None = None

    def get(self, field: str) -> str | None:
        value: str | None = getattr(self, field.replace("-", "_"))
        return value

    def describe(self, user: str) -> str:
        """``connect to 192.0.2.11:443 in popcorn-controller-service-1 at stockholm-sergel for user alice``."""
        where = self.container or self.service_instance or self.application
        place = f"{where} at {self.site}" if where else f"site {self.site}"
        if self.verb == "connect":
            host = self.address or SELF_ADDRESS
            host = f"[{host}]" if ":" in host else host
            what = f"connect to {host}:{self.port} in {place}"
        else:
            what = f"{self.verb} in {place}"
        return f"{what} for user {user}"


@dataclass(frozen=True)
class Rule:
    effect: str  # "allow" or "deny"
    globs: tuple[tuple[str, str], ...] = ()  # (field, pattern) for the glob fields the rule sets
    ports: tuple[tuple[int, int], ...] | None = None
    addresses: tuple[Network, ...] | None = None
    source: str = ""  # "policy NAME rule N", for messages

    @property
    def specificity(self) -> int:
        """How many fields the rule constrains ("*" and absent fields do not count)."""
        return len(self.globs) + (self.ports is not None) + (self.addresses is not None)

    def matches(self, request: Request) -> bool:
        for field, pattern in self.globs:
            value = request.get(field)
            if value is None or not fnmatch.fnmatchcase(value, pattern):
                return False
        port = request.port
        if self.ports is not None and (port is None or not any(lo <= port <= hi for lo, hi in self.ports)):
            return False
        # Every loopback address is the service itself (targets.matches).
        return self.addresses is None or (
            request.verb == "connect" and address_matches(self.addresses, request.address)
        )


ALLOW_EVERYTHING = Rule("allow", source=f"policy {ALLOW_ALL}")


def parse_port_range(text: str, where: str) -> tuple[int, int]:
    """``"443"`` -> (443, 443); ``"8000-8100"`` -> (8000, 8100)."""
    lo_text, sep, hi_text = str(text).strip().partition("-")
    try:
        lo = int(lo_text)
        hi = int(hi_text) if sep else lo
    except ValueError:
        raise UsageError(f"{where}: bad port {text!r} (use 443 or 8000-8100)") from None
    if not 1 <= lo <= hi <= 65535:
        raise UsageError(f"{where}: bad port range {text!r} (1-65535, low before high)")
    return lo, hi


def parse_networks(values: Any, where: str) -> tuple[Network, ...]:
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise UsageError(f"{where}: must be a list of CIDR strings")
    try:
        return tuple(canonical_network(ipaddress.ip_network(v, strict=False)) for v in values)
    except ValueError as exc:
        raise UsageError(f"{where}: {exc}") from None


def parse_ports(values: Any, where: str) -> tuple[tuple[int, int], ...]:
    if not isinstance(values, list) or not all(isinstance(v, str | int) for v in values):
        raise UsageError(f'{where}: must be a list of ports or ranges such as "8000-8100"')
    return tuple(parse_port_range(str(v), where) for v in values)


def parse_rule(raw: Any, where: str) -> Rule:
    if not isinstance(raw, dict):
        raise UsageError(f"{where}: must be a table")
    unknown = sorted(set(raw) - RULE_KEYS)
    if unknown:
        raise UsageError(f"{where}: unknown key {unknown[0]!r}")
    effect = raw.get("effect")
    if effect not in ("allow", "deny"):
        raise UsageError(f'{where}: effect must be "allow" or "deny"')
    globs = []
    for field in GLOB_FIELDS:
        if field not in raw:
            continue
        pattern = raw[field]
        if not isinstance(pattern, str) or not pattern:
            raise UsageError(f"{where}: {field} must be a non-empty string (a glob)")
        if pattern != "*":
            globs.append((field, pattern))
    ports = parse_ports(raw["ports"], f"{where}: ports") if "ports" in raw else None
    addresses = parse_networks(raw["addresses"], f"{where}: addresses") if "addresses" in raw else None
    return Rule(effect, tuple(globs), ports, addresses, where)


def parse_policies(data: Any, source: str) -> dict[str, tuple[Rule, ...]]:
    if not isinstance(data, dict):
        raise UsageError(f"{source}: not a table")
    unknown = sorted(set(data) - {"policies"})
    if unknown:
        raise UsageError(f"{source}: unknown top-level key {unknown[0]!r}")
    policies = data.get("policies", {})
    if not isinstance(policies, dict):
        raise UsageError(f"{source}: 'policies' must be a table of policies")
    result: dict[str, tuple[Rule, ...]] = {}
    for name, body in policies.items():
        if name == ALLOW_ALL:
            raise UsageError(f"{source}: policy name {ALLOW_ALL!r} is built in")
        if not isinstance(body, dict) or set(body) - {"rules"}:
            raise UsageError(f"{source}: policy {name!r} must be a table with only 'rules'")
        rules = body.get("rules", [])
        if not isinstance(rules, list):
            raise UsageError(f"{source}: rules of policy {name!r} must be a list")
        result[name] = tuple(
            parse_rule(raw, f"{source}: policy {name} rule {i + 1}") for i, raw in enumerate(rules)
        )
    return result


def decide(rules: Iterable[Rule], request: Request) -> Rule | None:
    """The deciding rule: the most specific matching one, deny first on ties; None if none matches."""
    best: Rule | None = None
    for rule in rules:
        if not rule.matches(request):
            continue
        if (
            best is None
            or rule.specificity > best.specificity
            or (rule.specificity == best.specificity and rule.effect == "deny" and best.effect == "allow")
        ):
            best = rule
    return best


def allowed(rules: Iterable[Rule], request: Request) -> bool:
    rule = decide(rules, request)
    return rule is not None and rule.effect == "allow"


class PolicyFile:
    """``policies.toml``, re-read whenever it changes; a missing file defines no policies."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._stamp: tuple[int, int, int, int] | None = None
        self._policies: dict[str, tuple[Rule, ...]] = {}
        self._error: UsageError | None = None

    def policies(self) -> dict[str, tuple[Rule, ...]]:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._stamp, self._policies, self._error = None, {}, None
            return self._policies
        stamp = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if stamp != self._stamp:
            # An invalid file is parsed once per change, not once per request: every OPEN
            # asks, and a flood of them must not re-read a broken file each time.
            self._stamp, self._error = stamp, None
            try:
                data = tomllib.loads(self.path.read_bytes().decode("utf-8"))
                self._policies = parse_policies(data, str(self.path))
            except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
                self._error = UsageError(f"bad policy file {self.path}: {exc}")
            except UsageError as exc:
                self._error = exc
        if self._error is not None:
            raise UsageError(str(self._error))
        return self._policies

    def rules(self, names: Sequence[str]) -> list[Rule]:
        """The rules of the named policies; an unknown name contributes nothing (default deny)."""
        if ALLOW_ALL in names:
            return [ALLOW_EVERYTHING]
        known = self.policies()
        return [rule for name in names for rule in known.get(name, ())]
