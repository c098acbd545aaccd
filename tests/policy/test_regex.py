"""The one linear-time regex engine (``matches``, quarantine patterns, redaction).

Both execution paths (RE2 and the pure-Python lazy DFA) give Python's ``re``
answers on the subset, give each other's match spans, and never blow up.
"""

from __future__ import annotations

import random
import re
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.policy.regex import (
    MAX_REPEAT,
    Engine,
    RegexError,
    compile_regex,
    engine_name,
    parse,
)
from bastion.quarantine import SafeSchema, UnsafeSchemaError

ENGINES: list[Engine] = ["nfa", "re2"]


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> Engine:
    value: Engine = request.param
    return value


# ---- agreement with Python's re and between the engines -------------------------

# (our pattern, the same pattern for Python's re): RE2's `$` is end of text only, which is `\Z` in re.
ATOMS = st.sampled_from(
    [
        ("a", "a"),
        ("b", "b"),
        (".", "."),
        ("[ab]", "[ab]"),
        ("[^a]", "[^a]"),
        ("[a-c_]", "[a-c_]"),
        ("\\d", "\\d"),
        ("\\w", "\\w"),
        ("\\s", "\\s"),
        ("\\W", "\\W"),
        ("\\.", "\\."),
        ("[\\d\\s]", "[\\d\\s]"),
    ]
)
ASSERTIONS = st.sampled_from([("^", "^"), ("$", "\\Z"), ("\\b", "\\b"), ("\\B", "\\B")])
QUANTIFIERS = st.sampled_from(["*", "+", "?", "{2}", "{1,3}", "{0,2}", "{2,}", "*?", "+?", "??"])


def _combine(children: st.SearchStrategy[tuple[str, str]]) -> st.SearchStrategy[tuple[str, str]]:
    def concat(items: list[tuple[str, str]]) -> tuple[str, str]:
        return "".join(i[0] for i in items), "".join(i[1] for i in items)

    def alt(items: list[tuple[str, str]]) -> tuple[str, str]:
        return "(" + "|".join(i[0] for i in items) + ")", "(" + "|".join(i[1] for i in items) + ")"

    def quant(pair: tuple[tuple[str, str], str]) -> tuple[str, str]:
        (ours, py), q = pair
        return f"(?:{ours}){q}", f"(?:{py}){q}"

    return st.one_of(
        st.lists(children, min_size=2, max_size=4).map(concat),
        st.lists(children, min_size=2, max_size=3).map(alt),
        st.tuples(children, QUANTIFIERS).map(quant),
    )


PATTERNS = st.recursive(st.one_of(ATOMS, ATOMS, ASSERTIONS), _combine, max_leaves=8)
TEXTS = st.text(alphabet="ab_1 .\nAB", max_size=12)


@settings(max_examples=700, derandomize=True, deadline=None, database=None)
@given(PATTERNS, st.booleans(), st.lists(TEXTS, min_size=1, max_size=5))
def test_both_engines_agree_with_python_re_and_with_each_other(
    pattern: tuple[str, str], ignore_case: bool, texts: list[str]
) -> None:
    ours, py = pattern
    flags = re.ASCII
    if ignore_case:
        ours = "(?i)" + ours
        flags |= re.IGNORECASE
    expected = re.compile(py, flags)
    nfa, re2 = compile_regex(ours, "nfa"), compile_regex(ours, "re2")
    for t in texts:
        got = nfa.search(t)
        assert got is re2.search(t), (ours, t)
        assert nfa.fullmatch(t) is re2.fullmatch(t), (ours, t)
        # Leftmost-first spans, lazy quantifiers included, exactly as RE2 reports them.
        assert list(nfa.finditer(t)) == list(re2.finditer(t)), (ours, t)
        if t == "" and "\\B" in ours:
            continue  # Python's \B never matches the empty string; RE2's does
        assert got is (expected.search(t) is not None), (ours, t)
        assert nfa.fullmatch(t) is (expected.fullmatch(t) is not None), (ours, t)


TOKEN_PATTERNS = [
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
    r"(?P<year>\d{4})-(?P<month>\d\d)",
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
    "1999-12",
]


@pytest.mark.parametrize("pattern", TOKEN_PATTERNS)
def test_fullmatch_agrees_with_python_re(engine: Engine, pattern: str) -> None:
    compiled = compile_regex(pattern, engine)
    oracle = re.compile(pattern, re.ASCII)
    for sample in SAMPLES:
        assert compiled.fullmatch(sample) == (oracle.fullmatch(sample) is not None), sample


@settings(max_examples=200, deadline=None)
@given(
    pattern=st.sampled_from(TOKEN_PATTERNS),
    text=st.text(alphabet="abcxyz-.ABC019 \n", max_size=12),
)
def test_nfa_fullmatch_agrees_with_python_re_on_random_text(pattern: str, text: str) -> None:
    assert compile_regex(pattern, "nfa").fullmatch(text) == (
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
        (r"a|ab", "xab", [(1, 2)]),
        (r"a+?", "aaa", [(0, 1), (1, 2), (2, 3)]),
        (r"\b", "  a", [(2, 2), (3, 3)]),
        (r"é+", "aéé\U0001f600é", [(1, 3), (4, 5)]),
    ],
)
def test_finditer_spans(
    engine: Engine, pattern: str, text: str, spans: list[tuple[int, int]]
) -> None:
    assert list(compile_regex(pattern, engine).finditer(text)) == spans
    assert [m.span() for m in re.finditer(pattern, text)] == spans


def test_dollar_matches_only_at_the_end_of_text(engine: Engine) -> None:
    assert compile_regex("a$", engine).search("a") is True
    assert compile_regex("a$", engine).search("a\n") is False


def test_case_insensitive_flag_covers_classes(engine: Engine) -> None:
    assert compile_regex("(?i)^[a-c]+$", engine).search("AbC") is True
    assert compile_regex("(?i)\\bSEND\\b", engine).search("please send") is True
    assert compile_regex("(?i)\\bSEND\\b", engine).search("sender") is False
    assert compile_regex("(?i)[^a]", engine).search("A") is False


def test_non_ascii_text_is_matched_by_character(engine: Engine) -> None:
    assert compile_regex("^.é.$", engine).search("xéy") is True
    assert compile_regex("\\w", engine).search("é") is False


def test_case_folding_to_ascii_is_not_skipped_by_the_prefilter() -> None:
    # Under (?i) a few non-ASCII characters match ASCII letters (the Kelvin sign
    # matches k); the literal prefilter in front of the DFA must not skip them.
    def forms(c: str) -> set[str]:
        once = {c.lower(), c.upper()}
        return {f for v in once for f in (v, v.lower(), v.upper()) if len(f) == 1}

    folding = {
        chr(code): sorted(f for f in forms(chr(code)) if f.isascii())
        for code in range(0x80, 0x20000)  # no character above U+1FFFF has a case form
        if not 0xD800 <= code <= 0xDFFF
    }
    folding = {c: f for c, f in folding.items() if f}
    assert folding == {"\u0131": ["I", "i"], "\u017f": ["S", "s"], "\u212a": ["K", "k"]}
    for char, ascii_forms in folding.items():
        for form in ascii_forms:
            rx = compile_regex(f"(?i)x{form}y", "nfa")
            assert rx.search(f"- x{char}y") is True, (char, form)
            assert list(rx.finditer(f"- X{char}Y")) == [(2, 5)], (char, form)


def test_text_re2_cannot_encode_falls_back_to_the_python_engine() -> None:
    rx = compile_regex("b+", "re2")
    text = "a\ud800bb"
    assert rx.search(text) is True
    assert rx.fullmatch("\ud800") is False
    assert list(rx.finditer(text)) == [(2, 4)]


def test_dfa_state_cache_bound_keeps_answers_right() -> None:
    # This pattern's DFA has 65,537 states, more than the cache holds, so random
    # text makes the cache flush again and again.
    rnd = random.Random(7)
    text = "".join(rnd.choice("ab") for _ in range(24_000))
    pattern = r"(a|b)*a(?:a|b){15}c"
    nfa, re2 = compile_regex(pattern, "nfa"), compile_regex(pattern, "re2")
    assert nfa.search(text) is re2.search(text) is False
    hit = text[:12_000] + "a" + text[12_000:12_015] + "c" + text[12_015:]
    assert list(nfa.finditer(hit)) == list(re2.finditer(hit)) == [(0, 12_017)]


# ---- linear time ----------------------------------------------------------------


def test_catastrophic_pattern_finishes_quickly(engine: Engine) -> None:
    rx = compile_regex("(a+)+$", engine)
    start = time.perf_counter()
    assert rx.search("a" * 50_000 + "b") is False
    assert list(rx.finditer("a" * 50_000 + "b")) == []
    assert time.perf_counter() - start < 3.0


def test_nested_repetition_finishes_quickly(engine: Engine) -> None:
    rx = compile_regex("^(a|aa|a?){1,20}(a*)*c", engine)
    start = time.perf_counter()
    assert rx.search("a" * 20_000) is False
    assert time.perf_counter() - start < 3.0


def test_nested_quantifiers_stay_linear_on_the_nfa() -> None:
    compiled = compile_regex(r"(a+)+b", "nfa")
    started = time.perf_counter()
    assert not compiled.fullmatch("a" * 20_000)
    assert list(compiled.finditer("a" * 5_000)) == []
    # Backtracking would need about 2**20000 steps; a generous bound is enough.
    assert time.perf_counter() - started < 5.0


# ---- the subset -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "offset", "message"),
    [
        ("(a)\\1", 3, "unsupported escape"),
        ("(?=a)", 0, "look-around"),
        ("(?<!a)b", 0, "unsupported group"),
        ("a(?i)b", 1, "look-around and inline flags"),
        ("a**", 2, "quantifier cannot follow"),
        ("a++", 2, "possessive"),
        ("*a", 0, "nothing to repeat"),
        ("^*", 1, "nothing to repeat"),
        ("(ab", 0, "missing ')'"),
        ("ab)", 2, "unbalanced ')'"),
        ("[ab", 0, "missing ']'"),
        ("[a", 0, "missing ']'"),
        ("[z-a]", 2, "bad character range"),
        ("a{2,1}", 1, "m < n"),
        ("a{3,2}", 1, "m < n"),
        ("a{1001}", 1, "above 1000"),
        ("a{,3}", 1, "must start a repetition"),
        ("\\p{L}", 0, "unsupported escape"),
        ("[[:alpha:]]", 1, "POSIX"),
        ("abc\\", 3, "trailing backslash"),
        ("(?P<x>a)(?P<x>b)", 8, "duplicate group name"),
        ("a\ud800", 1, "surrogate"),
    ],
)
def test_patterns_outside_the_subset_are_rejected_with_their_offset(
    pattern: str, offset: int, message: str
) -> None:
    with pytest.raises(RegexError) as info:
        parse(pattern)
    assert info.value.offset == offset and message in info.value.message
    with pytest.raises(RegexError):
        compile_regex(pattern, "nfa")


def test_too_large_program_is_rejected() -> None:
    with pytest.raises(RegexError, match="too large"):
        compile_regex("((a{1000}){1000}){1000}", "nfa")
    with pytest.raises(RegexError, match="NFA states"):
        compile_regex(r"((a{1000}){1000}){30}", "nfa")


def test_nested_counts_follow_re2s_limit_on_both_engines(engine: Engine) -> None:
    assert compile_regex(f"(?:x{{2}}){{{MAX_REPEAT // 2}}}", engine).fullmatch("x" * MAX_REPEAT)
    with pytest.raises(RegexError, match="multiply"):
        compile_regex(f"(?:x{{2}}){{{MAX_REPEAT // 2 + 1}}}", engine)


def test_whitespace_analysis_sees_through_classes() -> None:
    assert parse(r"[a-z ]+").can_match_any_of(" ")
    assert parse(r".").can_match_any_of("\t")
    assert parse(r"[^x]").can_match_any_of(" ")
    assert not parse(r"\S+").can_match_any_of(" \t\n")
    assert not parse(r"[A-Z]{2}-\d+").can_match_any_of(" \t\n")


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        (r"\bword\b", "word boundaries"),
        (r"a\Bb", "word boundaries"),
        (r"a^b", "anchors"),
        (r"(^a)", "anchors"),
        (r"^a|b$", "must be grouped"),
    ],
)
def test_quarantine_token_patterns_refuse_more_than_the_subset(pattern: str, message: str) -> None:
    parse(pattern)  # in the common subset...
    schema: dict[str, Any] = {"type": "string", "pattern": pattern, "maxLength": 8}
    with pytest.raises(UnsafeSchemaError, match=message):
        SafeSchema(schema)  # ...but not a token pattern


def test_quarantine_token_patterns_may_be_anchored_at_both_ends() -> None:
    schema = SafeSchema({"type": "string", "pattern": "(?i)^(?:ab|cd)$", "maxLength": 8})
    assert schema.validate("AB") == "AB"


def test_default_engine_is_re2_when_installed() -> None:
    assert engine_name() == "re2"
    assert compile_regex("a").engine == "re2"
