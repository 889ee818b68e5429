"""A config schema written once, as dataclasses; parsing, checks, messages, docs and TOML output derive from it.

Every TOML key is a dataclass field declared with `key(default, help, **rules)`. Its annotation is the type
(``int``, ``float``, ``str``, ``bool``, ``X | None`` for an optional key, a spec dataclass for a nested table,
``tuple[Spec, ...]`` for an array of tables, ``tuple[int, ...]`` for a list of numbers); its default is the
value when the key is absent (no default: the key is required); its rules (a minimum, choices, a pattern, a
parser of its own for a value no plain type describes) sit in the field's metadata. Fields made with
`internal()` are not TOML keys.

A spec class may add rules across its keys: ``exclusive`` (groups of keys that exclude each other, `OneOf`)
and a ``finish_parse(values, raw, at)`` classmethod, called with every key checked and defaults filled in
(checks across keys, values derived from other keys).

`parse_table` checks a TOML table against a spec class, `markdown` renders its docs tables, `to_toml` writes a
parsed spec back out with every default filled in. Every mistake is a `ConfigError` naming the file, the key
and what is allowed: ``x.toml: [workload] batch_size: must be an integer >= 1, got 0``.
"""

from __future__ import annotations

import json
import re
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields, is_dataclass, replace
from functools import cache
from typing import Any, Union

from ..errors import ConfigError

# the metadata flag of a field that is not a TOML key (`internal`)
INTERNAL = "internal"


@dataclass(frozen=True)
class At:
    """Where a value sits, for messages: ``path: [workload] images[1]: size``."""

    path: str
    base_dir: str = ""  # where relative paths in the config start
    section: str = ""  # "[model]", "variants[0] (eager)"
    keys: tuple[str, ...] = ()

    def error(self, key: str, message: str) -> ConfigError:
        inner = ": ".join(self.keys + ((key,) if key else ()))
        place = " ".join(p for p in (self.section, inner) if p)
        return ConfigError(f"{self.path}: {place}: {message}" if place else f"{self.path}: {message}")

    @property
    def top(self) -> bool:
        return not self.section and not self.keys

    def table(self, key: str) -> At:
        """A nested table: a section of its own at the top level (``[model]``), a longer key path below."""
        return replace(self, section=f"[{key}]") if self.top else replace(self, keys=self.keys + (key,))

    def item(self, key: str, index: int, raw: Any = None) -> At:
        """Entry `index` of an array of tables, labelled with its name when it has one: ``variants[0] (eager)``."""
        name = raw.get("name") if isinstance(raw, dict) else None
        # a name unfit for one line (control characters, too long) is left out here; its own check reports it
        fit = isinstance(name, str) and name.isprintable() and len(name) <= 80
        place = f"{key}[{index}]" + (f" ({name})" if fit else "")
        return replace(self, section=place) if self.top else replace(self, keys=self.keys + (place,))


@dataclass(frozen=True)
class OneOf:
    """Keys of one table that exclude each other; `required`: exactly one of them must be given."""

    keys: tuple[str, ...]
    required: bool = False


def key(default: Any = MISSING, help: str = "", *, minimum: int | None = None, above: float | None = None,
        choices: Any = None, pattern: tuple[str, str] | None = None, nonempty: bool = False,
        parse: Callable[[Any, At, str], Any] | None = None, type_text: str | None = None,
        toml_default: Any = MISSING, default_text: str | None = None, store: Callable[[Any], Any] | None = None,
        show: Callable[[Any], Any] | None = None) -> Any:
    """A TOML key: a dataclass field whose metadata holds its help and rules.

    default       the value when the key is absent (MISSING: required; a dict or list is copied per instance)
    minimum       ints: the smallest allowed; arrays: the fewest entries
    above         numbers: an exclusive lower bound (0: positive)
    choices       strings: the allowed values, or a function returning them (read when checking)
    pattern       strings: (regex the whole value must match, what it allows in words)
    nonempty      strings: stripped of surrounding spaces, then must not be empty
    parse         a parser of its own, (value, at, key) -> stored value, for values no plain type describes;
                  type_text then says what it accepts
    toml_default  the absent key's value written as TOML, checked like a written one (instead of `default`)
    default_text  the default in words, for one that depends on other keys or on the machine
    store         maps a checked value to the stored one (e.g. "none" -> None); show maps the parsed object back
                  to its TOML value, for `to_toml`
    """
    meta = {"help": help, "minimum": minimum, "above": above, "choices": choices, "pattern": pattern,
            "nonempty": nonempty, "parse": parse, "type_text": type_text, "toml_default": toml_default,
            "default_text": default_text, "store": store, "show": show}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def internal(default: Any = MISSING) -> Any:
    """A field of the parsed object that is not a TOML key (derived from other keys, or set by the loader)."""
    return field(default=default, metadata={INTERNAL: True})


# --- reading the schema -------------------------------------------------------------------------------------------


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def toml_fields(cls: type) -> dict[str, tuple[Any, Any]]:
    """{key: (dataclass field, type)} of a spec class's TOML keys, in declaration order."""
    hints = _hints(cls)
    return {f.name: (f, hints[f.name]) for f in fields(cls) if not f.metadata.get(INTERNAL)}


def _unoptional(tp: Any) -> Any:
    """``X | None`` -> X: TOML has no null, so an optional key is one whose default is None."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _table_items(tp: Any) -> type | None:
    """The spec class of an array of tables (``tuple[Spec, ...]``), else None."""
    tp = _unoptional(tp)
    if typing.get_origin(tp) is tuple:
        item = typing.get_args(tp)[0]
        return item if is_dataclass(item) else None
    return None


def _choices(meta: Any) -> list[str]:
    c = meta.get("choices")
    return list(c() if callable(c) else c)


def _required(f: Any, tp: Any) -> bool:
    no_default = f.default is MISSING and f.default_factory is MISSING
    return no_default and f.metadata.get("toml_default", MISSING) is MISSING and not is_dataclass(_unoptional(tp))


_PLURALS = {int: "integers", float: "numbers", str: "strings", bool: "true/false values"}


def type_text(tp: Any, meta: Any) -> str:
    """What a key accepts, in words: ``integer >= 1``, ``one of float32, float16, bfloat16``, ..."""
    if meta.get("type_text"):
        return meta["type_text"]
    tp = _unoptional(tp)
    if meta.get("choices") is not None:
        return "one of " + ", ".join(_choices(meta))
    if meta.get("pattern"):
        return meta["pattern"][1]
    if tp is bool:
        return "true or false"
    if tp is int:
        return "integer" + (f" >= {meta['minimum']}" if meta.get("minimum") is not None else "")
    if tp is float:
        above = meta.get("above")
        return "number" if above is None else "positive number" if above == 0 else f"number > {above}"
    if tp is str:
        return "non-empty string" if meta.get("nonempty") else "string"
    if _table_items(tp):
        return ("non-empty " if meta.get("minimum") else "") + "array of tables"
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        count = "" if args[-1] is Ellipsis else f"{len(args)} "
        return f"list of {count}{_PLURALS.get(args[0], args[0].__name__)}"
    if is_dataclass(tp) or typing.get_origin(tp) is dict:
        return "table"
    raise TypeError(f"no TOML form for the type {tp!r}; give the key a parse= function and a type_text=")


# --- checking values ----------------------------------------------------------------------------------------------


def show_value(value: Any, limit: int = 80) -> str:
    """A value as the TOML writer would recognise it, for messages; cut at `limit` characters (a message is
    one line, whatever the value)."""
    if isinstance(value, dict):
        return "a table"
    text = repr(value) if isinstance(value, str) else str(value).replace("True", "true").replace("False", "false")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_value(tp: Any, meta: Any, value: Any, at: At, key: str) -> Any:
    """A TOML value checked against a key's type and rules; returns the value to store."""
    if meta.get("parse"):
        return meta["parse"](value, at, key)
    tp = _unoptional(tp)
    if is_dataclass(tp):
        return parse_table(tp, value, at.table(key))
    if typing.get_origin(tp) is tuple:
        return _check_array(tp, meta, value, at, key)
    if typing.get_origin(tp) is dict:
        if not isinstance(value, dict):
            raise at.error(key, f"must be a table, got {show_value(value)}")
        return value
    value = _check_scalar(tp, meta, value, at, key)
    return meta["store"](value) if meta.get("store") else value


def _check_scalar(tp: Any, meta: Any, value: Any, at: At, key: str) -> Any:
    if tp is bool:
        if not isinstance(value, bool):
            raise at.error(key, f"must be true or false, got {show_value(value)}")
        return value
    if tp is int:
        minimum = meta.get("minimum")
        if not is_int(value) or (minimum is not None and value < minimum):
            raise at.error(key, f"must be an {type_text(tp, meta)}, got {show_value(value)}")
        return value
    if tp is float:
        above = meta.get("above")
        if not is_number(value) or (above is not None and not value > above):
            raise at.error(key, f"must be a {type_text(tp, meta)}, got {show_value(value)}")
        return float(value)
    if tp is str:
        if meta.get("choices") is not None or meta.get("pattern"):
            allowed = _choices(meta) if meta.get("choices") is not None else None
            if (not isinstance(value, str) or (allowed is not None and value not in allowed)
                    or (allowed is None and not re.fullmatch(meta["pattern"][0], value))):
                raise at.error(key, f"must be {type_text(tp, meta)}; got {show_value(value)}")
            return value
        if not isinstance(value, str):
            raise at.error(key, f"must be a string, got {show_value(value)}")
        if meta.get("nonempty"):
            value = value.strip()
            if not value:
                raise at.error(key, "must not be empty")
        return value
    raise TypeError(f"no TOML form for the type {tp!r}")


def _check_array(tp: Any, meta: Any, value: Any, at: At, key: str) -> tuple:
    spec = _table_items(tp)
    if spec is not None:  # an array of tables: each entry checked against its spec class
        if not isinstance(value, list) or len(value) < (meta.get("minimum") or 0):
            blocks = f" ([[{key}]] blocks)" if at.top else ""
            raise at.error(key, f"must be a{'' if meta.get('minimum') else 'n'} {type_text(tp, meta)}{blocks}, "
                                f"got {show_value(value)}")
        return tuple(parse_table(spec, item, at.item(key, i, item)) for i, item in enumerate(value))
    args = typing.get_args(tp)
    item_type = args[0]
    fixed = args[-1] is not Ellipsis
    if isinstance(value, list) and (not fixed or len(value) == len(args)):
        try:
            return tuple(_check_scalar(item_type, {}, x, at, key) for x in value)
        except ConfigError:
            pass  # the message below names the whole list
    raise at.error(key, f"must be a {type_text(tp, meta)}, got {show_value(value)}")


def parse_table(cls: type, raw: Any, at: At, defaults: dict[str, Any] | None = None) -> Any:
    """Check a TOML table against spec class `cls` and build it. `defaults`: values for absent keys known only
    at run time (e.g. the file's name), checked like written ones."""
    if not isinstance(raw, dict):
        raise at.error("", f"must be a table, got {show_value(raw)}")
    keys = toml_fields(cls)
    defaults = defaults or {}
    for name in raw:
        if name not in keys:
            listing = "; ".join(f"{k} ({type_text(tp, f.metadata)})" for k, (f, tp) in keys.items())
            raise at.error(name, f"unknown key; allowed keys: {listing}")
    for group in getattr(cls, "exclusive", ()):
        given = [k for k in group.keys if k in raw]
        if group.required and len(given) != 1:
            choices = " or ".join(f"{k} ({type_text(keys[k][1], keys[k][0].metadata)})" for k in group.keys)
            raise at.error("", f"give exactly one of {choices}")
        if len(given) > 1:
            raise at.error(given[-1], f"give either {' or '.join(group.keys)}, not both")
    for name, (f, tp) in keys.items():
        if name not in raw and name not in defaults and _required(f, tp):
            raise at.error(name, f"is required ({type_text(tp, f.metadata)})")

    values = {}
    for name, (f, tp) in keys.items():
        toml_default = f.metadata.get("toml_default", MISSING)
        if name in raw:
            values[name] = check_value(tp, f.metadata, raw[name], at, name)
        elif name in defaults:
            values[name] = check_value(tp, f.metadata, defaults[name], at, name)
        elif toml_default is not MISSING:
            values[name] = check_value(tp, f.metadata, toml_default, at, name)
        elif f.default is not MISSING:
            values[name] = f.default
        elif f.default_factory is not MISSING:
            values[name] = f.default_factory()
        elif is_dataclass(_unoptional(tp)):  # an absent table: every key at its default
            values[name] = parse_table(_unoptional(tp), {}, at.table(name))
    if hasattr(cls, "finish_parse"):
        cls.finish_parse(values, raw, at)
    return cls(**values)


# --- docs and TOML out --------------------------------------------------------------------------------------------


def toml_value(value: Any) -> str:
    """A Python value as TOML (inline tables for dicts and specs)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a TOML basic string: the same escapes
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if is_dataclass(value):
        value = {k: v for k, v, _ in _shown_items(value) if v is not None}
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + " }" if value else "{}"
    raise TypeError(f"no TOML form for {value!r}")


def _toml_key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k, ensure_ascii=False)


def _shown_items(obj: Any) -> list[tuple[str, Any, Any]]:
    """(key, TOML-ready value, field) of a parsed spec; a None value is an absent key (its default applies)."""
    out = []
    for name, (f, _) in toml_fields(type(obj)).items():
        value = f.metadata["show"](obj) if f.metadata.get("show") else getattr(obj, name)
        out.append((name, value, f))
    return out


def _toml_lines(items: list[tuple[str, Any, Any]]) -> list[str]:
    """``key = value`` per item; an absent key (None) whose default is described is written as a comment."""
    lines = []
    for name, value, f in items:
        if value is not None:
            lines.append(f"{_toml_key(name)} = {toml_value(value)}")
        elif f.metadata.get("default_text"):
            lines.append(f"# {name}: {f.metadata['default_text']}")
    return lines


def to_toml(obj: Any) -> str:
    """A parsed spec written back as TOML with every default filled in; parsing it gives the same object.
    Its tables become ``[name]`` sections and its non-empty arrays of tables ``[[name]]`` blocks."""
    items = _shown_items(obj)
    tables = [(name, value) for name, value, _ in items if is_dataclass(value)]
    arrays = [(name, value) for name, value, _ in items
              if value and _table_items(toml_fields(type(obj))[name][1]) is not None]
    nested = {name for name, _ in tables + arrays}
    lines = _toml_lines([item for item in items if item[0] not in nested])
    for name, value in tables:
        lines += ["", f"[{name}]", *_toml_lines(_shown_items(value))]
    for name, entries in arrays:
        for entry in entries:
            lines += ["", f"[[{name}]]", *_toml_lines(_shown_items(entry))]
    return "\n".join(lines) + "\n"


def _default_text(f: Any, tp: Any) -> str:
    meta = f.metadata
    if meta.get("default_text"):
        return meta["default_text"]
    if meta.get("toml_default", MISSING) is not MISSING:
        return f"`{toml_value(meta['toml_default'])}`"
    if f.default is not MISSING:
        return "not set" if f.default is None else f"`{toml_value(f.default)}`"
    if f.default_factory is not MISSING:
        return f"`{toml_value(f.default_factory())}`"
    return "every key's default" if is_dataclass(_unoptional(tp)) else "required"


def _sections(cls: type, heading: str, top: bool = False) -> list[tuple[str, type]]:
    """(heading, spec class) of a table and every table nested in it, in the order a config file has them."""
    out = [(heading, cls)]
    for name, (_, tp) in toml_fields(cls).items():
        nested, items = _unoptional(tp), _table_items(tp)
        if is_dataclass(nested):
            out += _sections(nested, f"[{name}]")
        elif items is not None:
            out += _sections(items, f"[[{name}]]" if top else f"{heading} {name} entries")
    return out


def markdown(cls: type) -> str:
    """One table per section (key, type, default, help), each under its heading and its class docstring."""
    blocks = []
    for heading, spec in _sections(cls, "Top level", top=True):
        rows = ["| key | type | default | help |", "| --- | --- | --- | --- |"]
        for name, (f, tp) in toml_fields(spec).items():
            cells = [f"`{name}`", type_text(tp, f.metadata), _default_text(f, tp), f.metadata.get("help", "")]
            rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        doc = " ".join((spec.__doc__ or "").split())
        rules = [f"Give {'exactly' if g.required else 'at most'} one of " + " or ".join(f"`{k}`" for k in g.keys) + "."
                 for g in getattr(spec, "exclusive", ())]
        blocks.append("\n\n".join([f"### {heading}", doc, "\n".join(rows), *rules]))
    return "\n\n".join(blocks) + "\n"


__all__ = ["At", "ConfigError", "OneOf", "check_value", "internal", "is_int", "is_number", "key", "markdown",
           "parse_table", "show_value", "to_toml", "toml_fields", "toml_value", "type_text"]
