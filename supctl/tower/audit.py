"""The tower's audit log: one JSON line per session decision and per finished stream.

Writing (:class:`AuditLog`) happens on the tower's event loop, so it is kept
cheap: nothing per chunk of data, one ``write()`` of one line per record, on a
descriptor opened with ``O_APPEND`` (so records are never interleaved or
overwritten), unbuffered (the line is in the kernel when ``write`` returns).
Reading (:func:`read_records`, :func:`follow_lines`, :func:`matches`) serves
``control-tower audit``.  Every field is documented in docs/audit.md.

A token never reaches this module: records name a token by its *accessor*
(the first 8 hex digits of its SHA-256, see :mod:`supctl.tower.store`).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from supctl.errors import UsageError

if TYPE_CHECKING:
    from .route import Route

log = logging.getLogger("supctl.tower")

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

#: At most one error line per this many seconds when the log cannot be written.
ERROR_INTERVAL = 10.0


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


class AuditLog:
    """The append-only JSON-lines file the tower writes.

    The file is created with mode 0600 (an existing file keeps its mode) and is
    never rotated or truncated by the tower.  If it is renamed or removed (an
    external rotation), the next record goes to a new file at the configured
    path; ``copytruncate`` rotation works too, thanks to ``O_APPEND``.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.fd = -1
        self.identity: tuple[int, int] = (0, 0)
        self.failures = 0
        self._last_error = 0.0
        self._open()

    def _open(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        st = os.fstat(fd)
        if self.fd >= 0:
            os.close(self.fd)
        self.fd = fd
        self.identity = (st.st_dev, st.st_ino)

    def write(self, rec: dict[str, Any]) -> None:
        """Append one record as one line; OSError when it cannot be written."""
        # ensure_ascii: whatever a client put in a URL, the line is valid UTF-8 and one line.
        data = (json.dumps(rec, ensure_ascii=True, separators=(",", ":")) + "\n").encode("ascii")
        try:
            st = os.stat(self.path)
            moved = (st.st_dev, st.st_ino) != self.identity
        except FileNotFoundError:
            moved = True
        if moved:
            self._open()
        written = os.write(self.fd, data)
        while written < len(data):  # a regular file writes short only when nearly full
            written += os.write(self.fd, data[written:])

    def append(self, rec: dict[str, Any]) -> bool:
        """:meth:`write`, logging (at most every ERROR_INTERVAL s) instead of raising."""
        try:
            self.write(rec)
        except OSError as exc:
            self.failures += 1
            moment = time.monotonic()
            if moment - self._last_error >= ERROR_INTERVAL:
                self._last_error = moment
                log.error(
                    "cannot write the audit log %s: %s (%d records lost so far)",
                    self.path,
                    exc.strerror or exc,
                    self.failures,
                )
            return False
        return True

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# --- reading: control-tower audit ----------------------------------------------------

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


def matches(
    rec: dict[str, Any],
    *,
    user: str | None = None,
    site: str | None = None,
    event: str | None = None,
    since: datetime.datetime | None = None,
) -> bool:
    if user is not None and rec.get("user") != user:
        return False
    if site is not None and rec.get("site") != site:
        return False
    if event is not None and rec.get("event") != event:
        return False
    if since is not None:
        try:
            if parse_time(str(rec.get("time"))) < since:
                return False
        except ValueError:
            return False
    return True


def parse_line(line: str) -> dict[str, Any] | None:
    """A record, or None for a line that is not a JSON object (e.g. cut by a full disk)."""
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) else None


def read_lines(path: Path) -> Iterator[str]:
    """The complete lines of the log (a last line without newline is still being written)."""
    with path.open("r", encoding="utf-8", errors="replace", newline="\n") as f:
        for line in f:
            if line.endswith("\n"):
                yield line.rstrip("\n")


def follow_lines(path: Path, poll: float = 0.25) -> Iterator[str]:
    """Every complete line of the log, then new ones as they are appended, for ever.

    Follows the path, not the descriptor: after a rename or removal (rotation)
    it reads the new file from its start; after truncation, from the start.
    """
    f = None
    pending = ""
    identity: tuple[int, int] | None = None
    try:
        while True:
            if f is None:
                try:
                    f = path.open("r", encoding="utf-8", errors="replace", newline="\n")
                except FileNotFoundError:
                    time.sleep(poll)  # not created yet: the tower creates it when it serves
                    continue
                st = os.fstat(f.fileno())
                identity = (st.st_dev, st.st_ino)
                pending = ""
            chunk = f.read()
            if chunk:
                pending += chunk
                *lines, pending = pending.split("\n")
                yield from lines
                continue
            try:
                st = os.stat(path)
                replaced = (st.st_dev, st.st_ino) != identity
                truncated = st.st_size < f.tell()
            except FileNotFoundError:
                replaced, truncated = True, False
            if replaced:  # first: a new, shorter file is not a truncated old one
                f.close()
                f = None
            elif truncated:
                f.seek(0)
                pending = ""
            else:
                time.sleep(poll)
    finally:
        if f is not None:
            f.close()


def filtered(lines: Iterable[str], **criteria: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    """(line, record) pairs of the lines that are records matching ``criteria``."""
    for line in lines:
        rec = parse_line(line)
        if rec is not None and matches(rec, **criteria):
            yield line, rec


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
