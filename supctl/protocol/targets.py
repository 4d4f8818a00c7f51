"""Connect targets in one canonical form, so that what is judged is what is dialled.

A policy that denies ``127.0.0.1`` port 22, or ``10.0.0.0/8``, must not be sidestepped
by another spelling of the same place:

* ``::ffff:127.0.0.1`` and ``::ffff:10.9.0.1`` (IPv4-mapped IPv6) reach the IPv4 host:
  they are unmapped, and so is the well-known NAT64 prefix ``64:ff9b::/96``, which a
  site with a NAT64 gateway would translate to the same IPv4 host;
* ``0.0.0.0`` and ``::`` connect to the local host on Linux: refused, with the way to
  say what is meant (no ``--ip-address`` for the service itself);
* multicast, the limited broadcast and the deprecated IPv4-compatible form
  (``::127.0.0.1``) name no single peer: refused;
* a scope (``fe80::1%eth0``) would let the caller pick the site's interface: refused.

Every loopback address (127.0.0.0/8, ::1) is the service instance itself; the policy
matches them as one place (:func:`is_self`), while the enforcer dials the canonical
address as given, so the address in the audit record is the one judged and dialled.

The tower canonicalises once, before its policy check and before routing; the client
uses the same function for an early, local error; the enforcer canonicalises again
before its own check, trusting no spelling the tower sends.
"""

from __future__ import annotations

import ipaddress

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: The service instance itself: the target of connect without ``--ip-address``.
SELF_ADDRESS = "127.0.0.1"
NOT_NUMERIC = "not a numeric IP address"
#: Longer input is not an address; refusing it early keeps error messages short.
MAX_ADDRESS_TEXT = 64

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")
_LOOPBACK4 = ipaddress.IPv4Network("127.0.0.0/8")
_LOOPBACK6 = ipaddress.IPv6Address("::1")
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def _unmap(address: IPAddress) -> IPAddress:
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address in _NAT64:
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address


def canonical_address(text: str) -> str:
    """The canonical text of a numeric IPv4/IPv6 target, or ValueError saying why not.

    Names are refused on purpose: connect never resolves names (see the seed text).
    """
    if not isinstance(text, str) or not text or len(text) > MAX_ADDRESS_TEXT or not text.isascii():
        raise ValueError(NOT_NUMERIC)
    core = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    if "%" in core:
        raise ValueError("a scoped IPv6 address (with %) is not accepted")
    try:
        parsed = ipaddress.ip_address(core)
    except ValueError:
        raise ValueError(NOT_NUMERIC) from None
    address = _unmap(parsed)
    if address.is_unspecified:
        raise ValueError(
            "the unspecified address is not a target (omit --ip-address to reach the service itself)"
        )
    if address.is_multicast or address == ipaddress.IPv4Address("255.255.255.255"):
        raise ValueError("a multicast or broadcast address is not a target")
    if isinstance(address, ipaddress.IPv6Address) and address in _IPV4_COMPATIBLE and address != _LOOPBACK6:
        raise ValueError("IPv4-compatible IPv6 addresses are deprecated; use the IPv4 address")
    return str(address)


def is_self(address: str | None) -> bool:
    """Whether a canonical target (None: no ``--ip-address``) is the service instance itself."""
    return address is None or address == "" or ipaddress.ip_address(address).is_loopback


def canonical_network(network: Network) -> Network:
    """An IPv4-mapped network in a policy means the IPv4 one (targets are unmapped too)."""
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96 and network.subnet_of(_MAPPED):
        return ipaddress.IPv4Network((int(network.network_address) & 0xFFFFFFFF, network.prefixlen - 96))
    return network


def covers_self(network: Network) -> bool:
    """Whether a policy network names the service itself: it overlaps 127/8 or holds ::1."""
    if isinstance(network, ipaddress.IPv4Network):
        return network.overlaps(_LOOPBACK4)
    return _LOOPBACK6 in network


def matches(networks: tuple[Network, ...], address: str | None) -> bool:
    """Whether a canonical target lies in one of ``networks`` (every loopback as one place)."""
    if is_self(address):
        return any(covers_self(net) for net in networks)
    target = ipaddress.ip_address(address or SELF_ADDRESS)
    return any(target in net for net in networks)
