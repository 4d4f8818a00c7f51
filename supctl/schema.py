"""One declarative schema for supctl's configuration files and the one validator that reads it.

``tower.toml`` (:class:`supctl.tower.config.TowerConfig`), the enforcer's inventory
(:mod:`supctl.enforcer.inventory`) and the client's ``config.toml``
(:mod:`supctl.client.settings`) are each described by frozen dataclasses:

* a field is a key: its name with ``-`` for ``_``, or ``metadata={"key": "a.b"}``, dotted to
  reach into a table (``store.url``), so a flat dataclass can describe nested tables;
* its type says what TOML value it takes: ``bool``, ``int`` (never a bool: TOML ``true`` is
  not 1), ``float`` (finite: TOML has ``nan`` and ``inf``), ``str``, ``Path`` (relative to
  the file's directory), ``list[...]``, ``dict[str, ...]`` (a table of named entries), a
  nested dataclass (a table), ``X | None`` (absent: the field's default);
* ``Annotated[T, Rule(...)]`` says what more the value must be, in the words of the message,
  and converts it (``"90d"`` to seconds); ``Annotated[dict[str, T], Names(...)]`` checks the
  names of a table's entries.

Every problem is ONE line naming the file, the key's dotted path and what it must be:
``bad config file /etc/t/tower.toml: 'limits.sessions-per-user' must be an integer >= 1``.
Keys are quoted as TOML writes them and messages use ``repr``, so no key (a quoted TOML key
may hold a newline) can make a second line.  Values are never echoed: one may be a secret.

Why dataclasses and not msgspec or pydantic: no dependency (pydantic 2 is ~10 MB installed
and adds about 0.14 s to every command for importing it and building two small models;
msgspec ~0.7 MB and ~10 ms), today's dataclasses (``Limits``, ``LocalPolicy``) stay the
schema, mypy --strict reads them as they are, and the messages keep the project's wording
rather than a library's (``Expected `int`, got `bool` - at `$.limits.x` ``), which would
need translating anyway, as the checks of listen addresses, names and URLs would stay ours.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any

from .errors import UsageError

T = typing.TypeVar("T")

#: The largest count a config may set; beyond it a number means a typo, not a wish.
MAX_COUNT = 2**31 - 1
#: The longest duration a config may set (10000 days): longer ones overflow datetime arithmetic.
MAX_SECONDS = 10_000 * 86_400
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_DURATION = re.compile(r"([1-9][0-9]{0,11})([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class Invalid(ValueError):
    """Raised by a :class:`Rule`'s ``convert`` to say, in its own words, what is wrong
    (``must be at most 16384``); a plain ValueError gives the rule's ``must be EXPECTED``."""


# Plain classes, not dataclasses, below: each dataclass costs about 1 ms at import, and the
# CLIs import this module at every command.


def _same(value: Any) -> Any:
    return value


class OpaqueTable(dict[str, Any]):
    """A table taken as it is, for its owner to check later (a plugin's settings,
    ``[verbs.logs]`` of the inventory): the schema only says it must be a table."""


class Rule:
    """What a value must be beyond its TOML type.

    ``expected`` completes "must be ..." in messages; ``convert`` takes the value once it has
    its TOML type (``toml``, when that differs from the field's type) and returns the field's
    value, raising ValueError (or :class:`Invalid`) to refuse it.
    """

    __slots__ = ("convert", "expected", "toml")

    def __init__(self, expected: str, convert: Callable[[Any], Any] = _same, toml: Any = None) -> None:
        self.expected, self.convert, self.toml = expected, convert, toml


class Names:
    """What the names of a table's entries must be: ``refusal`` follows the name's path."""

    __slots__ = ("accept", "refusal")

    def __init__(self, accept: Callable[[str], bool], refusal: str) -> None:
        self.accept, self.refusal = accept, refusal


class Source:
    """The file being read, as messages name it (``config file PATH``), and its directory."""

    __slots__ = ("base", "name")

    def __init__(self, name: str, base: Path | None = None) -> None:
        self.name, self.base = name, base

    def refuse(self, path: tuple[str, ...], text: str) -> UsageError:
        return UsageError(f"bad {self.name}: {dotted(path)!r} {text}")


def dotted(path: tuple[str, ...]) -> str:
    """A key's path as TOML would write it: ``applications."a b".netns``."""
    return ".".join(k if _BARE_KEY.fullmatch(k) else json.dumps(k) for k in path)


def parse_toml(raw: bytes, source: Source) -> dict[str, Any]:
    """The TOML document in ``raw``; one line if it is not (TOML is UTF-8 by definition)."""
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise UsageError(f"{source.name} is not valid TOML: {e}") from None
    except RecursionError:  # tomllib recurses into nested arrays and inline tables
        raise UsageError(f"{source.name} is not valid TOML: nested too deeply") from None


def load(cls: type[T], data: object, source: Source, path: tuple[str, ...] = ()) -> T:
    """``data`` (a parsed TOML table) checked against the dataclass ``cls``."""
    table = _table_of(typing.cast(type, cls))
    values: dict[str, Any] = {}
    _walk(table, data, source, path, values)
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name not in values and isinstance(f.default, Path) and source.base is not None:
            values[f.name] = source.base / f.default  # a default file, next to the config
    return cls(**values)


def keys(cls: type) -> list[str]:
    """Every key of ``cls``'s schema, dotted; an entry of a table of named entries is ``NAME``."""
    found: list[str] = []

    def visit_type(tp: Any, prefix: str) -> None:
        inner = _inner(tp)
        if typing.get_origin(inner) is dict:
            visit_type(typing.get_args(inner)[1], prefix + ".NAME")
        elif dataclasses.is_dataclass(inner):
            visit_table(_table_of(inner), prefix + ".")  # type: ignore[arg-type]

    def visit_table(table: _Table, prefix: str) -> None:
        for key, node in table.keys.items():
            found.append(prefix + key)
            if isinstance(node, _Table):
                visit_table(node, f"{prefix}{key}.")
            else:
                visit_type(node.type, prefix + key)

    visit_table(_table_of(cls), "")
    return found


# --- rules shared by the files --------------------------------------------------------------------


def between(low: float, high: float, unit: str = "") -> Callable[[Any], Any]:
    """A :class:`Rule`'s ``convert`` for a number from ``low`` to ``high``: below it the
    rule's "must be ...", above it "must be at most HIGH"."""

    def convert(value: Any) -> Any:
        if value < low:
            raise ValueError
        if value > high:
            raise Invalid(f"must be at most {int(high)}{unit}")
        return value

    return convert


def _positive(value: float) -> float:
    if value <= 0:
        raise ValueError
    return between(0, MAX_SECONDS, " seconds")(value)  # type: ignore[no-any-return]


def parse_duration(text: str) -> float:
    """``"30s"``, ``"15m"``, ``"8h"``, ``"90d"`` in seconds; ValueError for anything else
    (zero, a sign, a fraction, non-ASCII digits) and Invalid past :data:`MAX_SECONDS`."""
    match = _DURATION.fullmatch(text)
    if match is None:
        raise ValueError(text)
    seconds = int(match[1]) * _UNITS[match[2]]
    if seconds > MAX_SECONDS:
        raise Invalid(f"must be at most {MAX_SECONDS // 86400}d")
    return float(seconds)


def _duration_text(text: str) -> str:
    parse_duration(text)
    return text


#: A count: 1 or more.
COUNT = Rule("an integer >= 1", between(1, MAX_COUNT))
#: Seconds that must pass: more than 0.
SECONDS = Rule("a number of seconds > 0", _positive)
#: Seconds, 0 turning the thing off.
SECONDS_OR_OFF = Rule("a number of seconds >= 0 (0: off)", between(0, MAX_SECONDS, " seconds"))
#: ``"90d"`` as seconds (a float).
DURATION = Rule('a duration like "90d" (s, m, h or d)', parse_duration, toml=str)
#: ``"8h"`` kept as written.
DURATION_TEXT = Rule('like "8h" (s, m, h or d)', _duration_text)


# --- the validator --------------------------------------------------------------------------------


class _Leaf:
    __slots__ = ("name", "type")

    def __init__(self, name: str, tp: Any) -> None:
        self.name = name  # the dataclass field
        self.type = tp


class _Table:
    __slots__ = ("keys", "legacy")

    def __init__(self) -> None:
        self.keys: dict[str, _Leaf | _Table] = {}
        #: A field this table may also be given as, as one value (legacy ``audit = "FILE"``).
        self.legacy: _Leaf | None = None


@functools.cache
def _table_of(cls: type) -> _Table:
    hints = typing.get_type_hints(cls, include_extras=True)
    root = _Table()
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        *tables, last = f.metadata.get("key", f.name.replace("_", "-")).split(".")
        table = root
        for name in tables:
            node = table.keys.setdefault(name, _Table())
            assert isinstance(node, _Table), f"{cls.__name__}: {name} is a key and a table"
            table = node
        table.keys[last] = leaf = _Leaf(f.name, hints[f.name])
        if legacy := f.metadata.get("legacy"):
            node = root.keys[legacy]
            assert isinstance(node, _Table), f"{cls.__name__}: {legacy} is not a table"
            node.legacy = leaf
    return root


def _walk(table: _Table, data: object, source: Source, path: tuple[str, ...], out: dict[str, Any]) -> None:
    if not isinstance(data, Mapping):
        raise source.refuse(path, "must be a table")
    for key, value in data.items():
        here = (*path, key)
        node = table.keys.get(key)
        if node is None:
            known = ", ".join(table.keys)
            raise UsageError(f"bad {source.name}: unknown key {dotted(here)!r} (known: {known})")
        if isinstance(node, _Leaf):
            out[node.name] = _value(node.type, value, source, here)
        elif node.legacy is not None and not isinstance(value, Mapping):
            try:
                out[node.legacy.name] = _value(node.legacy.type, value, source, here)
            except UsageError:
                raise source.refuse(
                    here, f"must be a table or {_describe(_inner(node.legacy.type))}"
                ) from None
        else:
            _walk(node, value, source, here, out)


def _inner(tp: Any) -> Any:
    """``tp`` without ``Annotated`` and ``| None``."""
    if typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        rest = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = rest[0]
    return tp


def _value(tp: Any, value: object, source: Source, path: tuple[str, ...]) -> Any:
    extras: tuple[Any, ...] = ()
    if typing.get_origin(tp) is Annotated:
        extras = typing.get_args(tp)[1:]
    rule = next((e for e in extras if isinstance(e, Rule)), None)
    names = next((e for e in extras if isinstance(e, Names)), None)
    tp = _inner(tp)
    toml = rule.toml if rule is not None and rule.toml is not None else tp
    expected = rule.expected if rule is not None else _describe(toml)
    typed = _typed(toml, value, source, path, expected, names)
    if rule is None:
        return typed
    try:
        return rule.convert(typed)
    except Invalid as e:
        raise source.refuse(path, str(e)) from None
    except (ValueError, OverflowError):
        raise source.refuse(path, f"must be {expected}") from None


def _describe(tp: Any) -> str:
    if dataclasses.is_dataclass(tp) or typing.get_origin(tp) is dict or tp is OpaqueTable:
        return "a table"
    if typing.get_origin(tp) is list:
        return f"a list of {_describe(typing.get_args(tp)[0])[2:]}s"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        tp,
        "a non-empty string",  # Path
    )


def _typed(
    tp: Any, value: object, source: Source, path: tuple[str, ...], expected: str, names: Names | None
) -> Any:
    bad = source.refuse(path, f"must be {expected}")
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return load(tp, value, source, path)  # type: ignore[arg-type]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise bad
        entry = typing.get_args(tp)[1]
        out = {}
        for name, item in value.items():
            if names is not None and not names.accept(name):
                raise source.refuse((*path, name), names.refusal)
            out[name] = _value(entry, item, source, (*path, name))
        return out
    if tp is OpaqueTable:
        if not isinstance(value, Mapping):
            raise bad
        return OpaqueTable(value)
    if origin is list or tp is list:
        if not isinstance(value, list):
            raise bad
        if tp is list:
            return value
        item_type = typing.get_args(tp)[0]
        return [_typed(item_type, item, source, path, expected, None) for item in value]
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad
        try:
            number = float(value)
        except OverflowError:  # an int of 400 digits
            raise bad from None
        if not math.isfinite(number):
            raise bad
        return number
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    if tp is Path:
        # NUL would fail at open() with a traceback; an empty path would mean the directory.
        if not isinstance(value, str) or not value or "\0" in value:
            raise bad
        path_value = Path(value).expanduser()
        return source.base / path_value if source.base is not None else path_value
    raise TypeError(f"no schema type {tp!r}")  # a bug in a schema, found by its tests
