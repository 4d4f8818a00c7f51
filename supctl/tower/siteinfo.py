"""What a site's enforcer reports in HELLO and STATUS: applications, instances, containers.

Payload shape (JSON)::

    {"site": "...", "version": "...", "handlers": ["exec", "tcp"],
     "verbs": ["exec"], "protocols": ["tcp"], "features": ["exec-tty"],
     "applications": {APP: {"service-instances": {INSTANCE: {
         "netns": "ns-name" | null, "runtime": "netns",
         "containers": {NAME: {"state": "running", "pid": 123, "restarts": 0}}}}}}}

``containers`` may also be a plain list of names (no runtime state).  ``features`` (what
handlers can do beyond the basics) is missing in HELLOs of older enforcers: none.
``verbs`` and ``protocols`` say which of ``handlers`` (one list of both, as older
enforcers send it) are verbs and which are connect's protocols; without them a name is
taken for either.  Each list keeps at most :data:`MAX_NAMES` names of at most 64
characters: a HELLO is a peer's input, and the tower keeps it for the link's life.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..protocol.exec import EXEC_TTY

#: At most this many features, each at most 64 characters, are kept of a HELLO.
MAX_FEATURES = 64
#: At most this many handler, verb and protocol names (each list) are kept of a HELLO.
MAX_NAMES = 256
#: Container fields the tower keeps and shows; anything else an enforcer sends is dropped.
CONTAINER_FIELDS = ("state", "pid", "restarts", "exit-code", "started")


@dataclass
class InstanceInfo:
    name: str
    application: str
    netns: str | None = None
    runtime: str = ""
    containers: dict[str, dict[str, Any]] = field(default_factory=dict)

    def show(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "application": self.application,
            "runtime": self.runtime,
            "netns": self.netns,
            "containers": [{"name": name, **state} for name, state in sorted(self.containers.items())],
        }


@dataclass
class SiteInfo:
    applications: dict[str, dict[str, InstanceInfo]] = field(default_factory=dict)
    handlers: list[str] = field(default_factory=list)
    version: str = ""
    features: frozenset[str] = frozenset()
    verbs: list[str] | None = None  # None: an older enforcer's HELLO, see ``handlers``
    protocols: list[str] | None = None

    def instance(self, application: str, name: str) -> InstanceInfo | None:
        return self.applications.get(application, {}).get(name)

    def served(self, verb: str) -> list[str]:
        """What the site says it serves in the place of ``verb``'s name: the protocols of
        connect for ``connect``, else the verbs (``handlers`` when it did not say)."""
        exact = self.protocols if verb == "connect" else self.verbs
        return self.handlers if exact is None else exact

    @classmethod
    def parse(cls, payload: dict[str, Any]) -> SiteInfo:
        apps = payload.get("applications", {})
        handlers = payload.get("handlers", [])
        if not isinstance(apps, dict) or not isinstance(handlers, list):
            raise ValueError("needs 'applications' (object) and 'handlers' (list)")
        parsed: dict[str, dict[str, InstanceInfo]] = {}
        for app, body in apps.items():
            instances = body.get("service-instances", {}) if isinstance(body, dict) else None
            if not isinstance(instances, dict):
                raise ValueError(f"application {app!r} has no 'service-instances' object")
            parsed[app] = {name: _instance(app, name, inst) for name, inst in instances.items()}
        features = payload.get("features", [])
        if not isinstance(features, list):
            raise ValueError("'features' must be a list")
        kept = frozenset(f for f in features[:MAX_FEATURES] if isinstance(f, str) and len(f) <= 64)
        return cls(
            parsed,
            _names(handlers),
            str(payload.get("version", "")),
            kept,
            _optional_names(payload, "verbs"),
            _optional_names(payload, "protocols"),
        )

    def exec_refusal(self, site: str, args: dict[str, Any]) -> str | None:
        """Why the site cannot serve an exec stream with these OPEN ``args``, or None.

        ``args.tty`` asks for a terminal: an enforcer that does not announce
        ``exec-tty`` would ignore it and run the command on pipes, so the tower
        refuses the stream before the site sees it (docs/protocol.md, "exec streams").
        """
        if "tty" in args and EXEC_TTY not in self.features:
            version = f" (version {self.version[:40]})" if self.version else ""
            return (
                f"the enforcer of site {site}{version} cannot run exec -t (it has no terminal "
                f"support): upgrade it, or run the command without -t"
            )
        return None


def _names(values: list[Any]) -> list[str]:
    """The names of a HELLO list: strings of at most 64 characters, the first :data:`MAX_NAMES`."""
    return [v for v in values[:MAX_NAMES] if isinstance(v, str) and len(v) <= 64]


def _optional_names(payload: dict[str, Any], key: str) -> list[str] | None:
    values = payload.get(key)
    if values is None:
        return None
    if not isinstance(values, list):
        raise ValueError(f"{key!r} must be a list")
    return _names(values)


def _instance(app: str, name: str, body: Any) -> InstanceInfo:
    if not isinstance(body, dict):
        raise ValueError(f"service instance {name!r} must be an object")
    raw = body.get("containers", {})
    containers: dict[str, dict[str, Any]] = {}
    if isinstance(raw, list) and all(isinstance(c, str) for c in raw):
        containers = {c: {} for c in raw}
    elif isinstance(raw, dict):
        for cname, state in raw.items():
            if not isinstance(state, dict):
                raise ValueError(f"container {cname!r} of {name!r} must be an object")
            containers[str(cname)] = {k: state[k] for k in CONTAINER_FIELDS if k in state}
    else:
        raise ValueError(f"service instance {name!r} has a bad 'containers' value")
    netns = body.get("netns")
    return InstanceInfo(
        name, app, netns if isinstance(netns, str) else None, str(body.get("runtime", "")), containers
    )


@dataclass(frozen=True)
class RemoteSite:
    """A site whose link another replica holds (``[cluster]``, docs/tower.md): what it
    reported there, read from the store, and where that replica takes relayed streams."""

    replica: str
    advertise: str | None  # the holder's peer listener; None: it has none, nothing is relayed
    info: SiteInfo
