"""The shape every OPEN's ``args`` must have, whatever its verb (docs/protocol.md, "args").

``args`` is the one part of an OPEN a client chooses, and the tower relays it to the
site without knowing what a verb means (a plugin's verb has arguments the tower never
heard of).  So its *shape* is bounded here, the same at every hop, before anything
reads it; its *meaning* is the verb's handler's business at the site
(:func:`supctl.enforcer.api.parse_args` loads it into the handler's dataclass).

The shape: a JSON object whose keys are short ASCII words, whose values are null,
booleans, integers that a double holds exactly, finite numbers, strings, and lists
and objects of those, at most :data:`MAX_DEPTH` levels of them counting ``args``
itself (``args.tty`` is level 2), with at most
:data:`MAX_ITEMS` entries in any one list or object; a client's ``args`` encode to
at most :data:`MAX_ARGS` bytes, and a whole OPEN (the tower's relay wraps ``args``
once more) to at most :data:`MAX_OPEN`.  Checking costs one walk of what
``json.loads`` built, which :data:`MAX_OPEN` bounds before the parse.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

#: Bytes of a client's ``args``, as compact JSON.
MAX_ARGS = 64 * 1024
#: Bytes of a whole OPEN request's JSON (``args`` plus the identity fields and the
#: tower's relay envelope, under 2 KiB together).
MAX_OPEN = MAX_ARGS + 4096
#: Levels of lists and objects, counting ``args`` itself (``args.tty`` is level 2); the
#: relay between replicas wraps ``args`` once, so an OPEN on the wire may have one more.
MAX_DEPTH = 3
#: Entries of one list or object.
MAX_ITEMS = 1024
#: Integers beyond this are refused: JSON readers in other languages turn them into
#: doubles, and a value judged in one form must not be used in another.
MAX_INT = 2**53
KEY_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def check_args(args: object, *, depth: int = MAX_DEPTH) -> dict[str, Any]:
    """``args`` if it has the shape above (``depth``: levels allowed, ``args`` included), else
    ValueError saying where it does not, in one line."""
    if not isinstance(args, dict):
        raise ValueError("args must be a JSON object")
    _check(args, "args", depth)
    return args


def encode_args(args: Mapping[str, object]) -> bytes:
    """``args`` as the client sends it, checked: ValueError if its shape is wrong or it
    is longer than :data:`MAX_ARGS` bytes (a client's own mistake, said before sending)."""
    checked = check_args(dict(args))
    try:
        raw = json.dumps(checked, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as exc:  # not JSON at all (a set, bytes...)
        raise ValueError(f"args are not JSON: {exc}") from None
    if len(raw) > MAX_ARGS:
        raise ValueError(f"args take {len(raw)} bytes as JSON, more than {MAX_ARGS}")
    return raw


def _check(value: object, where: str, depth: int) -> None:
    if value is None or isinstance(value, bool | str):
        return
    if isinstance(value, int):
        if not -MAX_INT <= value <= MAX_INT:
            raise ValueError(f"{where}: integer out of range (at most 2**53 in size)")
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where}: numbers must be finite")
        return
    if not isinstance(value, list | dict):
        raise ValueError(f"{where}: {type(value).__name__} is not a JSON value")
    if depth <= 0:
        raise ValueError(f"{where}: nested more than {MAX_DEPTH} deep")
    if len(value) > MAX_ITEMS:
        raise ValueError(f"{where}: more than {MAX_ITEMS} entries")
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check(item, f"{where}[{i}]", depth - 1)
        return
    for key, item in value.items():
        if not isinstance(key, str) or KEY_RE.fullmatch(key) is None:
            # repr, cut: the peer's text reaches a RESET and a log line.
            raise ValueError(f"{where}: key {str(key)[:40]!r} is not 1-64 of A-Z a-z 0-9 _ . -")
        _check(item, f"{where}.{key}", depth - 1)
