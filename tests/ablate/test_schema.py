"""The generic schema: parsing, messages, docs and TOML out derived from a spec's dataclass fields alone.

A toy spec exercises every type and rule, so these tests protect `qvl.ablate.schema` itself; the ablation
config's own messages are in test_config.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import pytest

from qvl.ablate.config import tomllib
from qvl.ablate.schema import At, ConfigError, OneOf, internal, key, markdown, parse_table, to_toml

COLOURS = ["red", "green"]


@dataclass(frozen=True)
class Point:
    """A point."""

    exclusive: ClassVar[tuple[OneOf, ...]] = (OneOf(("x", "polar"), required=True),)
    x: int | None = key(None, "abscissa")
    polar: tuple[float, float] | None = key(None, "radius and angle")
    label: str = key("", "free text")


@dataclass(frozen=True)
class Inner:
    """The [inner] table."""

    exclusive: ClassVar[tuple[OneOf, ...]] = (OneOf(("a", "b")),)
    a: int | None = key(None, "one thing")
    b: int | None = key(None, "or another")
    ratio: float = key(0.5, "a ratio", above=0)
    points: tuple[Point, ...] = key((), "points")


@dataclass(frozen=True)
class Toy:
    """The top level."""

    name: str = key(help="a name", nonempty=True)
    count: int = key(help="how many", minimum=2)
    inner: Inner = key(help="see [inner]")
    items: tuple[Inner, ...] = key(help="at least one", minimum=1)
    origin: str = key(help="where it came from", default_text="the caller's")
    colour: str = key("red", "a colour", choices=lambda: COLOURS)
    code: str = key("ab", "two letters", pattern=(r"[a-z]{2}", "two lowercase letters"))
    flag: bool = key(False, "a switch")
    sizes: tuple[int, ...] = key((), "any number of ints")
    mode: str | None = key(None, "'off' is stored as None", choices=["on", "off"], toml_default="off",
                           store=lambda v: None if v == "off" else v, show=lambda toy: toy.mode or "off")
    extra: dict[str, Any] = key({}, "anything")
    derived: int = internal(0)

    @classmethod
    def finish_parse(cls, values: dict[str, Any], raw: dict, at: At) -> None:
        if values["count"] > 100:
            raise at.error("count", "must be <= 100")
        values["derived"] = values["count"] * 2


GOOD = 'name = " toy "\ncount = 3\n[[items]]\na = 2\n'


def parse(text: str, **defaults) -> Toy:
    return parse_table(Toy, tomllib.loads(text), At("t.toml"), defaults={"origin": "test", **defaults})


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as e:
        parse(text)
    return str(e.value)


def test_defaults_and_derived_values():
    toy = parse(GOOD)
    assert toy.name == "toy" and toy.count == 3 and toy.colour == "red" and toy.flag is False
    assert toy.mode is None and toy.extra == {} and toy.inner == Inner() and toy.items == (Inner(a=2),)
    assert toy.origin == "test" and toy.derived == 6  # the caller's default; finish_parse's value


def test_values_are_converted_to_the_field_type():
    toy = parse('name = "t"\ncount = 3\nsizes = [1, 2, 3]\nmode = "on"\n[inner]\nratio = 2\n'
                'points = [{ x = 1 }, { polar = [1, 0.5] }]\n[[items]]\n')
    assert toy.sizes == (1, 2, 3) and toy.mode == "on"
    assert toy.inner.ratio == 2.0 and isinstance(toy.inner.ratio, float)
    assert toy.inner.points == (Point(x=1), Point(polar=(1.0, 0.5)))


@pytest.mark.parametrize("text, expected", [
    # a wrong type, for each kind of type
    ('name = 1\ncount = 3\n[[items]]', "t.toml: name: must be a string, got 1"),
    ('name = "t"\ncount = "3"\n[[items]]', "t.toml: count: must be an integer >= 2, got '3'"),
    ('name = "t"\ncount = 3\nflag = 1\n[[items]]', "t.toml: flag: must be true or false, got 1"),
    ('name = "t"\ncount = 3\nsizes = [1, "2"]\n[[items]]', "t.toml: sizes: must be a list of integers, got [1, '2']"),
    ('name = "t"\ncount = 3\nextra = 1\n[[items]]', "t.toml: extra: must be a table, got 1"),
    ('name = "t"\ncount = 3\ninner = 1\n[[items]]', "t.toml: [inner]: must be a table, got 1"),
    ('name = "t"\ncount = 3\nitems = 1',
     "t.toml: items: must be a non-empty array of tables ([[items]] blocks), got 1"),
    ('name = "t"\ncount = 3\nitems = [1]', "t.toml: items[0]: must be a table, got 1"),
    ('name = "t"\ncount = 3\n[inner]\npoints = [{ polar = [1] }]\n[[items]]',
     "t.toml: [inner] points[0]: polar: must be a list of 2 numbers, got [1]"),
    # a missing required key: its type in the message
    ('count = 3\n[[items]]', "t.toml: name: is required (non-empty string)"),
    ('name = "t"\n[[items]]', "t.toml: count: is required (integer >= 2)"),
    ('name = "t"\ncount = 3', "t.toml: items: is required (non-empty array of tables)"),
    # an unknown key: every allowed key with its type, at any depth
    ('name = "t"\ncount = 3\ncolor = "red"\n[[items]]',
     "t.toml: color: unknown key; allowed keys: name (non-empty string); count (integer >= 2); inner (table); items "
     "(non-empty array of tables); origin (string); colour (one of red, green); code (two lowercase letters); flag "
     "(true or false); sizes (list of integers); mode (one of on, off); extra (table)"),
    ('name = "t"\ncount = 3\n[[items]]\nc = 1', "t.toml: items[0] c: unknown key; allowed keys: a (integer); b ("),
    ('name = "t"\ncount = 3\n[inner]\npoints = [{ y = 1 }]\n[[items]]',
     "t.toml: [inner] points[0]: y: unknown key; allowed keys: x (integer); polar (list of 2 numbers)"),
    # a value below a minimum
    ('name = "t"\ncount = 1\n[[items]]', "t.toml: count: must be an integer >= 2, got 1"),
    ('name = "t"\ncount = 3\nitems = []', "t.toml: items: must be a non-empty array of tables"),
    ('name = "t"\ncount = 3\n[inner]\nratio = 0\n[[items]]', "t.toml: [inner] ratio: must be a positive number, got 0"),
    ('name = "  "\ncount = 3\n[[items]]', "t.toml: name: must not be empty"),
    # a bad choice or pattern
    ('name = "t"\ncount = 3\ncolour = "blue"\n[[items]]', "t.toml: colour: must be one of red, green; got 'blue'"),
    ('name = "t"\ncount = 3\nmode = 1\n[[items]]', "t.toml: mode: must be one of on, off; got 1"),
    ('name = "t"\ncount = 3\ncode = "abc"\n[[items]]', "t.toml: code: must be two lowercase letters; got 'abc'"),
    # keys that exclude each other
    ('name = "t"\ncount = 3\n[inner]\na = 1\nb = 2\n[[items]]', "t.toml: [inner] b: give either a or b, not both"),
    ('name = "t"\ncount = 3\n[inner]\npoints = [{ label = "p" }]\n[[items]]',
     "t.toml: [inner] points[0]: give exactly one of x (integer) or polar (list of 2 numbers)"),
    # a rule across keys
    ('name = "t"\ncount = 101\n[[items]]', "t.toml: count: must be <= 100"),
])
def test_errors_name_file_key_and_what_is_allowed(text, expected):
    assert expected in error_of(text)


def test_a_caller_default_is_checked_like_a_written_value():
    with pytest.raises(ConfigError, match="t.toml: colour: must be one of red, green; got 'blue'"):
        parse(GOOD, colour="blue")


def test_choices_are_read_when_checking():
    COLOURS.append("blue")
    try:
        assert parse('name = "t"\ncount = 3\ncolour = "blue"\n[[items]]').colour == "blue"
    finally:
        COLOURS.remove("blue")


def test_to_toml_writes_every_default_and_parses_back():
    toy = parse('name = "t"\ncount = 3\nsizes = [4]\nmode = "on"\nextra = { "a.b" = 1 }\n'
                '[inner]\npoints = [{ x = 1, label = "p" }, { polar = [1.0, 2.0] }]\n[[items]]\n[[items]]\nb = 7\n')
    text = to_toml(toy)
    assert 'colour = "red"' in text and 'extra = { "a.b" = 1 }' in text and "[inner]" in text
    assert text.count("[[items]]") == 2 and "derived" not in text and "# b" not in text
    assert parse(text) == toy and 'mode = "on"' in text
    assert 'mode = "off"' in to_toml(parse(GOOD))  # stored None, shown as written


def test_markdown_has_a_table_per_section_with_type_default_and_help():
    text = markdown(Toy)
    headings = [line for line in text.splitlines() if line.startswith("### ")]
    assert headings == ["### Top level", "### [inner]", "### [inner] points entries", "### [[items]]",
                        "### [[items]] points entries"]
    assert "| `count` | integer >= 2 | required | how many |" in text
    assert "| `colour` | one of red, green | `\"red\"` | a colour |" in text
    assert "| `mode` | one of on, off | `\"off\"` |" in text
    assert "| `origin` | string | the caller's | where it came from |" in text
    assert "| `inner` | table | every key's default | see [inner] |" in text
    assert "| `b` | integer | not set | or another |" in text
    assert "Give at most one of `a` or `b`." in text and "Give exactly one of `x` or `polar`." in text
    assert "derived" not in text
