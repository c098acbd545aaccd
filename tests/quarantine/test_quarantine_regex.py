"""The linear-time pattern subset: RE2 and the NFA agree with Python's re on it."""

from __future__ import annotations

import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.quarantine.regex import PatternError, compile_pattern, parse

PATTERNS = [
    r"[A-Z]{2,5}-[0-9]{1,6}",
    r"\d{4}-\d{2}-\d{2}",
    r"(ab|a)(bc|c)?",
    r"a*b+a?",
    r"(?:x|yz){2,3}",
    r"[^ab]+c",
    r"\w+\.\w{2,}",
    r"(?i)abc[d-f]",
    r"a.c",
    r"(a|b)*abb",
    r"",
    r"[-a]+",
    r"[a\-z]\S",
]
SAMPLES = [
    "",
    "AB-1",
    "ABCDEF-1",
    "2024-01-31",
    "abc",
    "ab",
    "abbc",
    "xyzx",
    "xyzyz",
    "cc",
    "dc",
    "foo.bar",
    "ABCe",
    "a\nc",
    "aXc",
    "aababb",
    "-a-",
    "zz",
    "a-",
    "-\t",
]


@pytest.fixture(params=["re2", "nfa"])
def engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_fullmatch_agrees_with_python_re(engine: str, pattern: str) -> None:
    compiled = compile_pattern(pattern, engine)  # type: ignore[arg-type]
    oracle = re.compile(pattern, re.ASCII)
    for sample in SAMPLES:
        assert compiled.fullmatch(sample) == (oracle.fullmatch(sample) is not None), sample


@settings(max_examples=200, deadline=None)
@given(pattern=st.sampled_from(PATTERNS), text=st.text(alphabet="abcxyz-.ABC019 \n", max_size=12))
def test_nfa_fullmatch_agrees_with_python_re_on_random_text(pattern: str, text: str) -> None:
    assert compile_pattern(pattern, "nfa").fullmatch(text) == (
        re.fullmatch(pattern, text, re.ASCII) is not None
    )


@pytest.mark.parametrize(
    ("pattern", "text", "spans"),
    [
        (r"[A-Z]{2,5}-\d+", "x AB-12, CDE-3 and Q-1", [(2, 7), (9, 14)]),
        (r"\d+", "a1b22c333", [(1, 2), (3, 5), (6, 9)]),
        (r"^ab", "abab", [(0, 2)]),
        (r"ab$", "abab", [(2, 4)]),
        (r"x*", "axx", [(0, 0), (1, 3), (3, 3)]),
    ],
)
def test_finditer_spans(engine: str, pattern: str, text: str, spans: list[tuple[int, int]]) -> None:
    assert list(compile_pattern(pattern, engine).finditer(text)) == spans  # type: ignore[arg-type]
    assert [m.span() for m in re.finditer(pattern, text)] == spans


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        (r"(a)\1", "unsupported escape"),
        (r"(?=a)", "look-around"),
        (r"(?<!a)b", "look-around"),
        (r"a++", "possessive"),
        (r"\bword\b", "unsupported escape"),
        (r"a(?i)b", "look-around and inline flags"),
        (r"a{1001}", "at most 1000"),
        (r"a{3,2}", "at most 1000 and ordered"),
        (r"(ab", r"missing '\)'"),
        (r"ab)", r"unexpected '\)'"),
        (r"a^b", "anchors"),
        (r"^a|b$", "must be grouped"),
        (r"*a", "nothing to repeat"),
        (r"[a", "unexpected end"),
        (r"[z-a]", "bad range"),
    ],
)
def test_unsupported_syntax_is_rejected(pattern: str, message: str) -> None:
    with pytest.raises(PatternError, match=message):
        parse(pattern)


def test_nfa_size_is_bounded() -> None:
    with pytest.raises(PatternError, match="NFA states"):
        compile_pattern(r"((a{1000}){1000}){30}", "nfa")


def test_whitespace_analysis_sees_through_classes() -> None:
    assert parse(r"[a-z ]+").can_match_any_of(" ")
    assert parse(r".").can_match_any_of("\t")
    assert parse(r"[^x]").can_match_any_of(" ")
    assert not parse(r"\S+").can_match_any_of(" \t\n")
    assert not parse(r"[A-Z]{2}-\d+").can_match_any_of(" \t\n")


def test_nested_quantifiers_stay_linear_on_the_nfa() -> None:
    compiled = compile_pattern(r"(a+)+b", "nfa")
    started = time.perf_counter()
    assert not compiled.fullmatch("a" * 20_000)
    assert list(compiled.finditer("a" * 5_000)) == []
    # Backtracking would need about 2**20000 steps; a generous bound is enough.
    assert time.perf_counter() - started < 5.0
