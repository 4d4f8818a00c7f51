"""What a request asks of the tower (:class:`Access`), and what the tower grants (:class:`Route`,
:class:`SiteClaim`): plain data, at the bottom of the tower's modules so that every part
(authorise, hub, links, relay, audit) can name them without importing another part.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

from ..protocol import OpenRequest
from ..protocol.names import valid_site_name
from .policy import Request as PolicyRequest


class Access(NamedTuple):
    """A request, parsed and canonical: what :func:`.authorise.authorise` judges.

    ``verb`` is ``connect``, ``exec``, ``show`` or any verb a plugin adds (at a service
    instance, or at a container with ``container``); a field the verb does not use is empty.
    (A named tuple, not a frozen dataclass: one is built per upgrade, OPEN and sweep, and
    a tuple is built in about half the time.)
    """

    verb: str
    site: str
    application: str = ""
    service_instance: str = ""
    container: str = ""
    protocol: str = ""
    port: int = 0
    # connect: the *canonical* target address ("" = the service itself), judged and dialled.
    ip_address: str = ""
    # connect: the address as the client spelled it, when that differs; for the audit only.
    requested_address: str = ""

    def policy_request(self) -> PolicyRequest:
        """What the policies judge, built from these fields only, so the request judged at
        the upgrade, at every OPEN and by the sweep is the one :meth:`Route.request` dispatches."""
        if self.verb == "connect":
            return PolicyRequest(
                "connect",
                self.site,
                self.application,
                self.service_instance,
                "",
                self.protocol,
                self.port,
                self.ip_address or None,
            )
        if self.verb == "show":
            return PolicyRequest("show", self.site, self.application or None)
        # A verb at a service instance has no container: a rule naming one never matches it.
        container = self.container or None
        return PolicyRequest(self.verb, self.site, self.application, self.service_instance, container)


@dataclass(frozen=True)
class Route:
    """What the tower authorised for a supctl session, from its URL."""

    verb: str
    site: str
    application: str
    service_instance: str
    protocol: str = ""
    port: int = 0
    ip_address: str = ""
    container: str = ""
    who: str = ""
    # connect: the address as the client spelled it, when that differs from the canonical
    # ip_address (judged and dialled); for the audit record only.
    requested_address: str = ""
    # Set by the tower once the session is accepted, for its audit records.
    peer: str = ""  # the client's address
    session: str = ""  # a random id shared by the session's records
    # connect: the session's other targets (a stream picks one by its position), each
    # authorised as this one; () for the seed's one-target session.
    more: tuple[Route, ...] = ()

    @classmethod
    def grant(cls, access: Access, who: str) -> Route:
        return cls(
            access.verb,
            access.site,
            access.application,
            access.service_instance,
            access.protocol,
            access.port,
            access.ip_address,
            access.container,
            who=who,
            requested_address=access.requested_address,
        )

    @property
    def access(self) -> Access:
        """What this route was granted for: judged again at every OPEN and sweep."""
        return Access(
            self.verb,
            self.site,
            self.application,
            self.service_instance,
            self.container,
            self.protocol,
            self.port,
            self.ip_address,
            self.requested_address,
        )

    def request(self, args: dict[str, Any]) -> OpenRequest:
        # Identity fields come from the authorised URL, never from the client's frame.
        return OpenRequest(
            verb=self.verb,
            application=self.application,
            service_instance=self.service_instance,
            container=self.container,
            protocol=self.protocol,
            port=self.port,
            ip_address=self.ip_address,
            args=args,
        )

    def policy_request(self) -> PolicyRequest:
        return self.access.policy_request()

    def peer_request(self, args: dict[str, Any]) -> OpenRequest:
        """The OPEN of a stream relayed to the replica holding this route's site: the
        request the site gets (:meth:`request`, judged here), and in ``args`` what that
        replica needs besides: the site, and who it is for (its logs)."""
        inner = self.request(args)
        return replace(
            inner, args={"site": self.site, "who": self.who, "session": self.session, "args": inner.args}
        )

    @classmethod
    def from_peer(cls, request: OpenRequest) -> tuple[Route, OpenRequest]:
        """The route and the site's request carried by a peer's OPEN (:meth:`peer_request`);
        ValueError if it is not one."""
        wrapped = request.args
        site, args = wrapped.get("site"), wrapped.get("args")
        who, session = wrapped.get("who", ""), wrapped.get("session", "")
        if not isinstance(site, str) or not valid_site_name(site) or not isinstance(args, dict):
            raise ValueError("a relayed OPEN needs 'site' (a site name) and 'args' (an object)")
        if not (isinstance(who, str) and isinstance(session, str) and len(who) <= 255 and len(session) <= 64):
            raise ValueError("a relayed OPEN's 'who' and 'session' must be short strings")
        inner = replace(request, args=args)
        route = cls(
            inner.verb,
            site,
            inner.application,
            inner.service_instance,
            inner.protocol,
            inner.port,
            inner.ip_address,
            inner.container,
            who=who,
            session=session,
        )
        return route, inner

    @property
    def targets(self) -> tuple[Route, ...]:
        """Every target of the session: this route, then :attr:`more`."""
        return (self, *self.more)

    def accepted(self, peer: str, session: str) -> Route:
        """This route (and its other targets) as accepted from ``peer`` in ``session``."""
        more = tuple(replace(r, peer=peer, session=session) for r in self.more)
        return replace(self, peer=peer, session=session, more=more)

    @property
    def summary(self) -> str:
        target = f"{self.ip_address or '127.0.0.1'}:{self.port}" if self.protocol else self.container
        return (
            f"who={self.who} site={self.site} application={self.application} "
            f"instance={self.service_instance} verb={self.verb} protocol={self.protocol} target={target}"
        )

    @property
    def user(self) -> str:
        """Whom per-user limits count against: the user part of ``who`` ("USER:ACCESSOR")."""
        return self.who.partition(":")[0] or self.who


def session_refusal(refusals: Sequence[str | None]) -> str | None:
    """Why a session ends, given why each of its targets may no longer be used (None for
    each that still may): once no target is left, the first target's reason.  A target
    refused alone loses only its own streams (the sweep, and each OPEN, judge it)."""
    return refusals[0] if all(refusals) else None


@dataclass(frozen=True)
class SiteClaim:
    """An enforcer that authenticated as ``site``, and the hash of the token it showed.

    The link keeps the hash so that the tower can tell, while the link lives, whether
    that token is still the site's: a rotated or removed site token ends the link.
    """

    site: str
    token_hash: str
