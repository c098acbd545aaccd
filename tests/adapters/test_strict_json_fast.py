"""``loads_strict`` agrees with a plain reference for JSON texts with duplicates, escapes and depth.

The reference parses pair by pair (rejecting any repeated key) and measures
nesting on the parsed pairs; ``loads_strict`` counts members and brackets on
the raw bytes at C speed. Texts are written by hand here, so keys can repeat,
be spelled with ``\\u`` escapes, and hold quotes, backslashes, colons and
brackets that must not count as structure.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.adapters.wire import loads_strict
from bastion.errors import ProtocolError

CHARS = ["a", "b", ":", '"', "\\", "[", "]", "{", "}", ",", "é", "\n", "\u2028", " "]
SPACE = st.sampled_from(["", " ", "\n", "\t ", "\r\n"])


class Pairs(list[tuple[str, Any]]):
    """A JSON object as written: its members in order, repeats allowed."""


def _depth(value: Any) -> int:
    if isinstance(value, Pairs):
        return 1 + max((_depth(v) for _, v in value), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


@st.composite
def encoded_strings(draw: Callable[[Any], Any]) -> tuple[str, str]:
    """(the string, a JSON spelling of it with some characters escaped as \\uXXXX)."""
    text = "".join(draw(st.lists(st.sampled_from(CHARS), max_size=5)))
    out = []
    for ch in text:
        if draw(st.integers(0, 3)) == 0:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(json.dumps(ch, ensure_ascii=draw(st.booleans()))[1:-1])
    return text, '"' + "".join(out) + '"'


def values(depth: int) -> st.SearchStrategy[tuple[Any, str]]:
    leaves = st.one_of(
        st.sampled_from([(None, "null"), (True, "true"), (False, "false"), (1.5, "1.5")]),
        st.integers(-5, 5).map(lambda n: (n, str(n))),
        encoded_strings(),
    )
    if depth == 0:
        return leaves

    @st.composite
    def containers(draw: Callable[[Any], Any]) -> tuple[Any, str]:
        inner = values(depth - 1)
        if draw(st.booleans()):
            items = draw(st.lists(inner, max_size=3))
            sep = draw(SPACE)
            return [v for v, _ in items], "[" + sep + ("," + sep).join(t for _, t in items) + "]"
        members = draw(st.lists(st.tuples(encoded_strings(), inner), max_size=3))
        pairs = Pairs((key, value) for (key, _), (value, _) in members)
        parts = [f"{kt}{draw(SPACE)}:{draw(SPACE)}{vt}" for (_, kt), (_, vt) in members]
        return pairs, "{" + ",".join(parts) + draw(SPACE) + "}"

    return st.one_of(leaves, containers())


def expected(value: Any, max_depth: int) -> Any:
    if _depth(value) > max_depth:
        return "too_deep"

    def plain(v: Any) -> Any:
        if isinstance(v, Pairs):
            keys = [k for k, _ in v]
            if len(set(keys)) != len(keys):
                raise KeyError
            return {k: plain(x) for k, x in v}
        if isinstance(v, list):
            return [plain(x) for x in v]
        return v

    try:
        return plain(value)
    except KeyError:
        return "duplicate_key"


def outcome(text: bytes, max_depth: int) -> Any:
    try:
        return loads_strict(text, max_depth=max_depth)
    except ProtocolError as exc:
        return exc.code


@settings(max_examples=400, deadline=None)
@given(values(5), st.integers(0, 6))
def test_strict_parse_agrees_with_the_pairwise_reference(doc: tuple[Any, str], limit: int) -> None:
    value, text = doc
    assert outcome(text.encode(), limit) == expected(value, limit)


def test_duplicates_deep_in_a_large_body_are_named() -> None:
    body = {"messages": [{"role": "user", "content": f"m{i}"} for i in range(80)]}
    text = json.dumps(body)
    text = text.replace('"content": "m40"', '"content": "m40", "c\\u006fntent": "x"')
    try:
        loads_strict(text)
    except ProtocolError as exc:
        assert (exc.code, "content" in exc.message) == ("duplicate_key", True)
    else:
        raise AssertionError("duplicate key accepted")


def test_colons_and_brackets_inside_strings_do_not_count_as_members() -> None:
    body = {"messages": [{"k:": '{"a": 1, "a": 2}', "v": '[[[:]]]\\":'} for _ in range(40)]}
    assert loads_strict(json.dumps(body)) == body
