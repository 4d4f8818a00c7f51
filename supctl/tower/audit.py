"""The tower's audit records: one per session decision and per finished stream.

This module makes records (plain dicts with every field of :data:`FIELDS`) and
formats them for ``control-tower audit``; it does no I/O.  The tower hands them
to an :class:`AuditLog` (:mod:`.auditsink`, which writes them to the store off
the event loop); :mod:`.auditcli` reads them back.  Every field is documented in
docs/audit.md.

A token never reaches this module: records name a token by its *accessor*
(the first 8 hex digits of its SHA-256, see :mod:`supctl.tower.store`).
"""

from __future__ import annotations

import datetime
import re
from typing import TYPE_CHECKING, Any, Protocol

from supctl.errors import UsageError

if TYPE_CHECKING:
    from .route import Route

EVENTS = (
    "session-accepted",
    "session-refused",
    "stream-closed",
    "streams-refused",
    "show",
    "login",
    "logout",
    "renew",
    "site-evicted",
    "whoami",
)

#: Every record has every field, in this order; ``null`` when it does not apply.
FIELDS = (
    "time",
    "event",
    "session",
    "stream",
    "user",
    "accessor",
    "client",
    "site",
    "application",
    "service-instance",
    "container",
    "verb",
    "protocol",
    "target",
    "requested-target",
    "path",
    "status",
    "result",
    "close-reason",
    "bytes-up",
    "bytes-down",
    "duration",
    "command",
    "exit-code",
    "exit-signal",
    # connect udp: the site's final counts of the flow (plugins/supctl_udp).
    "datagrams-up",
    "datagrams-down",
    "dropped-up",
    "dropped-down",
    # streams-refused: a session's refused streams counted since its previous record.
    "count",
    "reasons",
    "first",
    "last",
)

#: Values taken from a request before it was validated are cut to this many characters.
MAX_REQUESTED = 256

#: Close reasons of ``stream-closed`` records.
CLOSE_REASONS = (
    "eof",
    "client-reset",
    "site-reset",
    "client-lost",
    "site-lost",
    "limit",
    "timeout",
    "denied",
)


def now_iso() -> str:
    """The current time, ISO 8601 in UTC with milliseconds."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")


def cut(value: str | None, limit: int = MAX_REQUESTED) -> str | None:
    """A value a client chose, bounded so a record stays small."""
    if value is None or len(value) <= limit:
        return value
    return value[:limit] + "..."


def split_who(who: str) -> tuple[str | None, str | None]:
    """``"admin:cc3a4a20"`` (a Route's ``who``) -> ``("admin", "cc3a4a20")``."""
    if not who:
        return None, None
    user, _, accessor = who.partition(":")
    return user, accessor or None


def target(protocol: str, ip_address: str, port: int) -> str | None:
    """``ip:port`` (``[ip]:port`` for IPv6) of a connect route; 127.0.0.1 when no address."""
    if not protocol:
        return None
    ip = ip_address or "127.0.0.1"
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def record(event: str, **fields: Any) -> dict[str, Any]:
    """A record with every field of :data:`FIELDS`; keyword ``bytes_up`` is field ``bytes-up``."""
    rec: dict[str, Any] = dict.fromkeys(FIELDS)
    rec["time"] = now_iso()
    rec["event"] = event
    for name, value in fields.items():
        key = name.replace("_", "-")
        if key not in rec:
            raise KeyError(f"not an audit field: {key}")
        rec[key] = value
    return rec


def route_fields(route: Route) -> dict[str, Any]:
    """The fields an authorised session's route fixes, for its session and stream records."""
    user, accessor = split_who(route.who)
    return {
        "session": route.session or None,
        "user": user,
        "accessor": accessor,
        "client": route.peer or None,
        "site": route.site,
        "application": route.application,
        "service-instance": route.service_instance,
        "container": route.container or None,
        "verb": route.verb,
        "protocol": route.protocol or None,
        "target": target(route.protocol, route.ip_address, route.port),
        # The target as the client spelled it, when that was not the canonical form.
        "requested-target": (
            target(route.protocol, route.requested_address, route.port) if route.requested_address else None
        ),
    }


def stream_record(route: Route, stream_id: int, **fields: Any) -> dict[str, Any]:
    """A ``stream-closed`` record for stream ``stream_id`` of ``route``'s session."""
    rec = record("stream-closed", **fields)
    rec.update(route_fields(route))
    rec["stream"] = stream_id
    return rec


def refusals_record(route: Route, **fields: Any) -> dict[str, Any]:
    """A ``streams-refused`` record of ``route``'s session (tower/refusals.py)."""
    rec = record("streams-refused", **fields)
    rec.update(route_fields(route))
    return rec


def exec_command(route: Route, args: dict[str, Any]) -> str | None:
    """The command of an exec stream (its OPEN args), as the site will run it."""
    command = args.get("command") if route.verb == "exec" else None
    return command if isinstance(command, str) else None


def exit_fields(payload: object) -> tuple[Any, Any] | None:
    """``(code, signal)`` from an exec ``{"exit": {"code": N, "signal": N}}`` CONTROL, or None.

    The payload comes from a site: only integers (or null) are kept.
    """
    if not isinstance(payload, dict):
        return None
    value = payload.get("exit")
    if not isinstance(value, dict):
        return None
    code, signum = value.get("code"), value.get("signal")
    keep = (int, type(None))
    return (
        code if isinstance(code, keep) and not isinstance(code, bool) else None,
        signum if isinstance(signum, keep) and not isinstance(signum, bool) else None,
    )


#: The counts of a udp flow's final ``{"udp": {...}}`` CONTROL that the audit keeps.
UDP_FIELDS = ("datagrams-up", "datagrams-down", "dropped-up", "dropped-down")


def udp_fields(payload: object) -> dict[str, int | None] | None:
    """The counts from a udp ``{"udp": {"datagrams-up": N, ...}}`` CONTROL, or None.

    The payload comes from a site: only non-negative integers are kept (a bool, a
    float, a string or a negative number is null), and only these four fields.
    """
    if not isinstance(payload, dict):
        return None
    value = payload.get("udp")
    if not isinstance(value, dict):
        return None
    kept: dict[str, int | None] = {}
    for name in UDP_FIELDS:
        count = value.get(name)
        ok = isinstance(count, int) and not isinstance(count, bool) and count >= 0
        kept[name] = count if ok else None
    return kept


class AuditLog(Protocol):
    """What the tower writes its records to (:class:`supctl.tower.auditsink.AuditSink`).

    ``append`` never blocks and never raises: False means the record was not taken
    (the store is down or the queue full), and a session must then be refused.
    """

    def append(self, rec: dict[str, Any]) -> bool: ...

    def close(self) -> None: ...


# --- control-tower audit ------------------------------------------------------------

_RELATIVE = re.compile(r"-(\d+)([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_time(text: str) -> datetime.datetime:
    """An ISO 8601 time (naive means UTC; a trailing ``Z`` is accepted)."""
    value = datetime.datetime.fromisoformat(text.strip().removesuffix("Z").removesuffix("z"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=datetime.UTC)
    return value


def parse_since(text: str, now: datetime.datetime | None = None) -> datetime.datetime:
    """``--since``: an ISO 8601 time, or ``-N`` followed by ``s``, ``m``, ``h`` or ``d`` (ago)."""
    if match := _RELATIVE.fullmatch(text.strip()):
        moment = now or datetime.datetime.now(datetime.UTC)
        return moment - datetime.timedelta(seconds=int(match[1]) * _UNITS[match[2]])
    try:
        return parse_time(text)
    except ValueError:
        raise UsageError(
            f"bad --since {text!r}: use an ISO 8601 time (2026-01-31T12:00:00Z) or -10m, -2h, -1d"
        ) from None


#: ``control-tower audit --table``: (header, width when following, narrowest width).
#: The client address, session and accessor are left to the JSON lines.
TABLE_COLUMNS = (
    ("time (UTC)", 19, 19),
    ("event", 8, 8),
    ("user", 8, 4),
    ("site", 12, 4),
    ("where", 20, 10),
    ("verb", 7, 4),
    ("target", 21, 8),
    ("result", 24, 16),
    ("up", 9, 2),
    ("down", 9, 2),
    ("secs", 6, 2),
    ("exit", 4, 2),
)
NUMERIC_COLUMNS = frozenset({"up", "down", "secs", "exit"})
_SHORT_EVENTS = {
    "session-accepted": "accepted",
    "session-refused": "refused",
    "stream-closed": "closed",
    "streams-refused": "refusals",
    "site-evicted": "evicted",
}


def table_row(rec: dict[str, Any]) -> list[str]:
    """The cells of one record in ``control-tower audit --table``."""
    when = str(rec.get("time") or "")[:19].replace("T", " ")
    event = str(rec.get("event") or "")
    where = "/".join(str(rec[k]) for k in ("application", "service-instance", "container") if rec.get(k))
    result = rec.get("result")
    if rec.get("command"):
        result = f"{result} ({rec['command']})"
    if event == "streams-refused":
        result = f"{rec.get('count')} refused, the last: {result}"
    exit_status = rec.get("exit-code")
    if exit_status is None and rec.get("exit-signal") is not None:
        exit_status = f"SIG{rec['exit-signal']}"
    cells = [
        when,
        _SHORT_EVENTS.get(event, event),
        rec.get("user"),
        rec.get("site"),
        where or rec.get("path"),
        rec.get("verb"),
        rec.get("target"),
        result,
        rec.get("bytes-up"),
        rec.get("bytes-down"),
        rec.get("duration"),
        exit_status,
    ]
    return ["" if value is None else str(value) for value in cells]
