"""``loads_strict`` reads every text the same way with jiter as with the standard library alone.

The stdlib path is the reference. Each text must give the same value
(compared strictly: types, float bits, key order) or the same error code on
every way there is: jiter, and the stdlib's two ways for longer texts (a scan
of the bytes, or a walk of the parsed value), each forced here. Texts are
written by hand (random whitespace, escapes, number spellings, repeated
keys), then garbled (truncated, bytes inserted or dropped, nesting pushed
past the limit).

One divergence is deliberate: jiter refuses a number whose integer part has
more than 4300 digits, which the stdlib reads as a float, and the jiter path
then refuses it too (fail closed). The generators stay below that; a test of
its own pins it.

At the bottom, the strict JSON tests of ``test_wire`` and
``test_strict_json_fast`` are imported to run again here on the stdlib path
(in their own modules they run on jiter when it is installed).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.adapters import wire
from bastion.adapters.wire import loads_strict
from bastion.errors import ProtocolError

JITER = wire._find_jiter()
needs_jiter = pytest.mark.skipif(JITER is None, reason="jiter is not installed")

WAYS: dict[str, dict[str, Any]] = {
    "stdlib": {"_JITER": None},
    "scanned": {"_JITER": None, "_WALK_MIN_SIZE": 1 << 62},
    "walked": {"_JITER": None, "_WALK_MIN_SIZE": 0, "_WALK_ESCAPE_SPACING": 1 << 62},
}
if JITER is not None:
    WAYS["jiter"] = {"_JITER": JITER}


@contextlib.contextmanager
def patched(**names: Any) -> Iterator[None]:
    saved = {name: getattr(wire, name) for name in names}
    for name, value in names.items():
        setattr(wire, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(wire, name, value)


@pytest.fixture(autouse=True, scope="module")
def stdlib_path() -> Iterator[None]:
    # The differential tests choose their way per call; this default is for
    # the imported tests at the bottom.
    with patched(_JITER=None):
        yield


def exact(value: Any) -> Any:
    """A form of a parsed value that compares equal only for identical values."""
    kind = type(value)
    if kind is dict:
        return ("dict", [(key, exact(sub)) for key, sub in value.items()])
    if kind is list:
        return ("list", [exact(sub) for sub in value])
    if kind is float:
        return ("float", value.hex())
    return (kind.__name__, value)


def outcome(data: bytes | str, max_depth: int, way: str) -> Any:
    with patched(**WAYS[way]):
        try:
            return ("value", exact(loads_strict(data, max_depth=max_depth)))
        except ProtocolError as exc:
            return ("error", exc.code)


def judged_alike(data: bytes, max_depth: int) -> Any:
    """Every way's outcome for the text as bytes (and as str when it is UTF-8); the one outcome."""
    inputs: list[bytes | str] = [data]
    with contextlib.suppress(UnicodeDecodeError):
        inputs.append(data.decode("utf-8"))
    outcomes = {
        (type(item).__name__, way): outcome(item, max_depth, way) for item in inputs for way in WAYS
    }
    reference = outcomes[("bytes", "scanned")]
    assert outcomes == dict.fromkeys(outcomes, reference), data
    return reference


# ---------------------------------------------------------------- writing JSON by hand

Draw = Callable[[st.SearchStrategy[Any]], Any]
SPACE = st.sampled_from(["", "", "", " ", "\n", "\t", "\r\n ", "  "])
SHORT = {'"': '\\"', "\\": "\\\\", "/": "\\/", "\b": "\\b", "\f": "\\f", "\n": "\\n"}
SHORT |= {"\r": "\\r", "\t": "\\t"}


def u_escape(draw: Draw, char: str) -> str:
    code = ord(char)
    units = [code]
    if code > 0xFFFF:
        code -= 0x10000
        units = [0xD800 + (code >> 10), 0xDC00 + (code & 0x3FF)]
    return "".join(f"\\u{unit:04{draw(st.sampled_from('xX'))}}" for unit in units)


def spell_string(draw: Draw, text: str) -> str:
    out = []
    for char in text:
        how = draw(st.integers(0, 5))
        if how >= 2 and char not in '"\\' and ord(char) >= 0x20:
            out.append(char)
        elif how == 1 and char in SHORT:
            out.append(SHORT[char])
        else:
            out.append(u_escape(draw, char))
    return '"' + "".join(out) + '"'


def spell_number(draw: Draw, number: int | float) -> str:
    if isinstance(number, int):
        return "-0" if number == 0 and draw(st.booleans()) else str(number)
    spelling = draw(st.sampled_from(["{!r}", "{:.17e}", "{:.17E}", "{:.3e}", "{:.17g}"]))
    return spelling.format(number)


@st.composite
def spelled(draw: Draw, value: Any) -> str:
    """A JSON text for ``value``; objects sometimes get a repeated key."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, int | float):
        return spell_number(draw, value)
    if isinstance(value, str):
        return spell_string(draw, value)
    sep = draw(SPACE)
    if isinstance(value, list):
        items = [draw(spelled(item)) for item in value]
        return "[" + sep + f"{sep},{sep}".join(items) + sep + "]"
    members = [(key, draw(spelled(sub))) for key, sub in value.items()]
    if members and draw(st.integers(0, 7)) == 0:
        key = draw(st.sampled_from(sorted(value)))
        members.insert(draw(st.integers(0, len(members))), (key, draw(spelled(value[key]))))
    parts = [f"{spell_string(draw, key)}{draw(SPACE)}:{draw(SPACE)}{text}" for key, text in members]
    return "{" + sep + f"{sep},{sep}".join(parts) + sep + "}"


NUMBERS = st.one_of(
    st.integers(-(10**30), 10**30),
    st.sampled_from([2**63, -(2**63) - 1, 10**300, -(10**4299)]),
    st.floats(allow_nan=False, allow_infinity=False),
)
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, st.text(max_size=8))
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner, max_size=4)
    ),
    max_leaves=24,
)
LIMITS = st.sampled_from([0, 1, 2, 3, 4, 5, 6, 8, 64])


@st.composite
def documents(draw: Draw) -> bytes:
    text: str = draw(SPACE) + draw(VALUES.flatmap(spelled)) + draw(SPACE)
    return text.encode("utf-8")


# ---------------------------------------------------------------- well-formed texts


@settings(max_examples=400, deadline=None)
@given(documents(), LIMITS)
def test_written_values_read_the_same_on_every_path(doc: bytes, limit: int) -> None:
    judged_alike(doc, limit)


@settings(max_examples=300, deadline=None)
@given(
    st.from_regex(r"-?(0|[1-9][0-9]{0,40})(\.[0-9]{1,40})?([eE][+-]?[0-9]{1,4})?", fullmatch=True)
)
def test_number_spellings_read_the_same_on_every_path(number: str) -> None:
    assert judged_alike(f'[{number}, {{"n": {number}}}]'.encode(), 64)[0] == "value"


# ---------------------------------------------------------------- garbled texts

PIECES = [
    b'"', b"\\", b"{", b"}", b"[", b"]", b",", b":", b" ", b"\x00", b"\x1f", b"\x7f",
    b"\xff", b"\xc3", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xef\xbb\xbf",
    b"NaN", b"Infinity", b"-Infinity", b"nan", b"1e999", b"-", b"01", b"1.", b"tru", b"null",
    b"\\ud800", b"\\udfff", b"\\ud83d", b"\\ud83d\\u0041", b"\\ud83d\\ude00", b"\\u12", b"\\x",
    b'"\\ud800"', b'"\\udc00":1,', b'"a":1,"a":2', b'{"a":1,"a":2}', b'"\\u0061":0,"a":0,',
    b"[" * 9, b"]" * 9, b"[" * 70, b"]" * 70, b'{"k":' * 9, b"}" * 9,
]  # fmt: skip
GARBLES = st.tuples(
    st.sampled_from(["insert", "replace", "delete", "truncate", "prefix"]),
    st.floats(0, 1),
    st.sampled_from(PIECES),
)


def garble(data: bytes, how: str, where: float, piece: bytes) -> bytes:
    at = int(where * len(data))
    if how == "insert":
        return data[:at] + piece + data[at:]
    if how == "replace":
        return data[:at] + piece + data[at + len(piece) :]
    if how == "delete":
        return data[:at] + data[at + len(piece) :]
    if how == "truncate":
        return data[:at]
    return piece + data


@settings(max_examples=600, deadline=None)
@given(documents(), st.lists(GARBLES, min_size=1, max_size=3), LIMITS)
def test_garbled_texts_are_judged_alike_on_every_path(
    doc: bytes, garbles: list[tuple[str, float, bytes]], limit: int
) -> None:
    for how, where, piece in garbles:
        doc = garble(doc, how, where, piece)
    judged_alike(doc, limit)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.characters(),
            st.characters(categories=["Cs"]),
            st.sampled_from(["\\ud800", "\\udfff", "\\ud83d\\ude00", "\\uD83D\\uDE00", "\\ud83d"]),
            st.sampled_from(["\\ud83d\\u0041", "\\udc00\\ud800", "\\u0000", '\\"', "\\\\", "\\/"]),
            st.sampled_from(["\\\\ud800", "\\x", "\\u12", "\\U0041", "\t", '"']),
        ),
        max_size=8,
    ),
    st.booleans(),
)
def test_strings_with_surrogates_and_stray_escapes_are_judged_alike(
    pieces: list[str], as_key: bool
) -> None:
    body = '"' + "".join(pieces) + '"'
    text = "{" + body + ": 1}" if as_key else "[" + body + "]"
    judged_alike(text.encode("utf-8", "surrogatepass"), 64)
    outcomes = {way: outcome(text, 64, way) for way in WAYS}
    assert list(outcomes.values()) == [outcomes["scanned"]] * len(outcomes)


# ---------------------------------------------------------------- nesting around the limit

OPENERS = {"[": "]", '{"k":': "}", "[0,": "]", '{"a":1, "k":': "}", '{"a":[], "k":': "}"}


@st.composite
def nestings(draw: Draw) -> tuple[bytes, int]:
    limit = draw(st.sampled_from([0, 1, 2, 3, 4, 63, 64, 65, 127, 128, 200, 201, 202, 256]))
    depth = max(0, limit + draw(st.integers(-2, 2)))
    if limit in (128, 256) and draw(st.booleans()):
        depth = draw(st.integers(196, 206))  # around jiter's own recursion limit
    shape = draw(st.sampled_from(["arrays", "objects", "mixed"]))
    choices = {"arrays": ["[", "[0,"], "objects": ['{"k":', '{"a":1, "k":'], "mixed": list(OPENERS)}
    openers = draw(st.lists(st.sampled_from(choices[shape]), min_size=depth, max_size=depth))
    core = draw(
        st.sampled_from(["1", "[]", "{}", '""', '{"a":1,"a":2}', "NaN", '"\\ud800"', "", "]"])
    )
    text = "".join(openers) + core + "".join(OPENERS[opener] for opener in reversed(openers))
    how = draw(st.sampled_from(["whole", "whole", "truncated", "trailing"]))
    if how == "truncated":
        text = text[: draw(st.integers(0, len(text)))]
    elif how == "trailing":
        text += draw(st.sampled_from(["]", "}", ",1", " x", "[", '"']))
    return text.encode(), limit


@settings(max_examples=400, deadline=None)
@given(nestings())
def test_nesting_around_the_limit_is_judged_alike_on_every_path(case: tuple[bytes, int]) -> None:
    text, limit = case
    judged_alike(text, limit)


def test_the_walk_counts_levels_of_lists_and_objects() -> None:
    value = {"a": [1, {"b": [[], {}]}], "c": "[[[["}
    # object, list, object, list, then the empty list and object: five levels
    assert [wire._nested_deeper(value, limit) for limit in range(7)] == [True] * 5 + [False] * 2


# ---------------------------------------------------------------- long texts: dense escapes go the walked way


def long_body(content: str) -> dict[str, Any]:
    tool = {"type": "function", "function": {"name": "t", "parameters": {"type": "object"}}}
    messages = [{"role": "user", "content": "hi"}]
    messages += [{"role": "tool", "tool_call_id": f"c{i}", "content": content} for i in range(12)]
    return {"model": "m", "tools": [tool] * 20, "messages": messages}


ESCAPED = 'lorem ipsum dolor sit amet, "quoted" {x: [1]}\n ' * 60


DEEP = "[" * 70 + "]" * 70
LONG_CASES: dict[str, tuple[list[tuple[str, str]], bool, str]] = {
    "valid": ([], False, "value"),
    "a duplicate": ([('"c7",', '"c7", "role": "x",')], False, "duplicate_key"),
    "too deep": ([('"c7"', DEEP)], False, "too_deep"),
    "a duplicate, then too deep": ([('"c2",', '"c2", "role": 1,'), ('"c7"', DEEP)], False, "too_deep"),
    "too deep, then a duplicate": ([('"c7"', DEEP), ('"c9",', '"c9", "role": 1,')], False, "too_deep"),
    "a duplicate, then cut short": ([('"c5",', '"c5", "role": 1,')], True, "invalid_json"),
    "NaN": ([('"c7"', "NaN")], False, "non_finite_number"),
    "a lone surrogate": ([('"c7"', '"\\udc00"')], False, "invalid_unicode"),
    "a surrogate pair": ([('"c7"', '"\\ud83d\\ude00"')], False, "value"),
}  # fmt: skip


@pytest.mark.parametrize("case", LONG_CASES)
def test_long_escaped_bodies_are_judged_alike_on_every_path(case: str) -> None:
    replacements, cut_short, expected = LONG_CASES[case]
    text = json.dumps(long_body(ESCAPED))
    for old, new in replacements:
        assert old in text
        text = text.replace(old, new, 1)
    data = text.encode()[: -1 if cut_short else None]
    result = judged_alike(data, 64)
    assert (result[1] if result[0] == "error" else "value") == expected


def test_long_bodies_with_few_escapes_are_read_the_same() -> None:
    data = json.dumps(long_body("lorem ipsum dolor sit amet " * 100)).encode()
    assert judged_alike(data, 64) == ("value", exact(json.loads(data)))


def refuse_to_run(*args: Any) -> Any:
    raise AssertionError("this way was not to be taken")


def test_long_escaped_bodies_skip_the_byte_scan(monkeypatch: pytest.MonkeyPatch) -> None:
    data = json.dumps(long_body(ESCAPED)).encode()
    monkeypatch.setattr(wire, "_parse_scanned", refuse_to_run)
    assert loads_strict(data) == json.loads(data)


def test_long_bodies_with_few_escapes_are_scanned(monkeypatch: pytest.MonkeyPatch) -> None:
    data = json.dumps(long_body("lorem ipsum dolor sit amet " * 100)).encode()
    monkeypatch.setattr(wire, "_parse_walked", refuse_to_run)
    assert loads_strict(data) == json.loads(data)


# ---------------------------------------------------------------- jiter refusals and limits


@needs_jiter
def test_a_text_jiter_refuses_stays_refused_when_the_stdlib_reads_it() -> None:
    data = b"[" + b"1" * 4301 + b".5]"
    assert outcome(data, 64, "scanned") == ("value", exact([float("inf")]))
    assert outcome(data, 64, "jiter") == ("error", "invalid_json")


def test_any_jiter_refusal_refuses_the_text() -> None:
    def refuse(raw: bytes, **options: Any) -> Any:
        raise ValueError("refused")

    with patched(_JITER=refuse):
        with pytest.raises(ProtocolError) as valid:
            loads_strict(b'{"a": 1}')
        with pytest.raises(ProtocolError) as duplicate:
            loads_strict(b'{"a": 1, "a": 2}')
    assert (valid.value.code, duplicate.value.code) == ("invalid_json", "duplicate_key")


@needs_jiter
def test_limits_beyond_jiters_own_nesting_limit_go_the_stdlib_way() -> None:
    data = b"[" * 250 + b"]" * 250
    assert JITER is not None
    with pytest.raises(ValueError, match="recursion limit"):
        JITER(data)
    assert outcome(data, 300, "jiter") == outcome(data, 300, "scanned")
    assert outcome(data, 300, "jiter")[0] == "value"


@needs_jiter
def test_the_jiter_path_checks_nesting_itself() -> None:
    data = b'{"k":' * 65 + b"1" + b"}" * 65
    assert JITER is not None and JITER(data) is not None
    assert outcome(data, 64, "jiter") == ("error", "too_deep")
    assert outcome(data, 65, "jiter")[0] == "value"


# ---------------------------------------------------------------- the existing tests, on the stdlib path

from test_strict_json_fast import (  # noqa: E402, F401
    test_colons_and_brackets_inside_strings_do_not_count_as_members,
    test_duplicates_deep_in_a_large_body_are_named,
    test_strict_parse_agrees_with_the_pairwise_reference,
)
from test_wire import (  # noqa: E402, F401
    test_brackets_inside_strings_do_not_count_as_nesting,
    test_duplicate_key_deep_inside_arrays_is_rejected,
    test_duplicate_key_spelled_with_an_escape_is_rejected,
    test_duplicate_top_level_key_is_rejected,
    test_escaped_backslash_before_u_is_not_a_surrogate,
    test_escaped_surrogate_pair_is_accepted,
    test_extremely_deep_nesting_does_not_crash_the_parser,
    test_invalid_utf8_is_rejected,
    test_lone_high_surrogate_escape_is_rejected,
    test_lone_low_surrogate_in_a_key_is_rejected,
    test_malformed_json_is_invalid_json,
    test_nesting_at_the_limit_is_accepted,
    test_nesting_beyond_the_limit_is_rejected,
    test_non_finite_numbers_are_rejected,
    test_overlong_utf8_encoding_is_rejected,
    test_parse_arguments_rejects_duplicate_keys,
    test_parse_arguments_reports_json_that_is_not_an_object,
    test_parse_arguments_reports_text_that_is_not_json,
    test_parse_arguments_treats_empty_text_as_no_arguments,
    test_utf16_body_is_not_sniffed_into_json,
    test_valid_json_parses_like_the_standard_library,
)


@needs_jiter
def test_jiters_own_nesting_limit_is_the_one_the_jiter_path_relies_on() -> None:
    # Under a max_depth at least this deep the jiter path skips its walk: a jiter
    # that went deeper would let too-deep texts through, so pin the limit.
    deepest = wire._JITER_NESTING
    assert JITER is not None
    assert JITER(b"[" * deepest + b"]" * deepest) is not None
    for text in (
        b"[" * (deepest + 1) + b"]" * (deepest + 1),
        b'{"k":' * deepest + b"1" + b"}" * deepest,
        b'[{"k":' * (deepest // 2 + 1) + b"1" + b"}]" * (deepest // 2 + 1),
    ):
        with pytest.raises(ValueError, match=wire._JITER_TOO_DEEP):
            JITER(text)


@needs_jiter
def test_under_the_default_limit_the_jiter_path_does_not_walk(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(wire, "_JITER", JITER)
    monkeypatch.setattr(wire, "_nested_deeper", refuse_to_run)
    data = json.dumps(long_body(ESCAPED)).encode()
    assert loads_strict(data) == json.loads(data)
    deep = b"[" * 230 + b"]" * 230  # deeper than jiter goes: the stdlib reads it
    assert loads_strict(deep) == json.loads(deep)
    with pytest.raises(ProtocolError) as refused:
        loads_strict(b"[" * 257 + b"]" * 257)
    assert refused.value.code == "too_deep"
