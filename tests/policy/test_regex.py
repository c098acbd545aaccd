"""The linear-time regex used by ``matches``: same answers as Python's ``re`` on the subset, no blow-up."""

from __future__ import annotations

import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.policy.regex import RegexError, compile_regex, engine_name

ENGINES = ["nfa", "re2"]

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
QUANTIFIERS = st.sampled_from(["*", "+", "?", "{2}", "{1,3}", "{0,2}", "{2,}", "*?", "+?"])


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
def test_both_engines_agree_with_python_re(
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
        if t == "" and "\\B" in ours:
            continue  # Python's \B never matches the empty string; RE2's does
        assert got is (expected.search(t) is not None), (ours, t)


@pytest.mark.parametrize("engine", ENGINES)
def test_catastrophic_pattern_finishes_quickly(engine: str) -> None:
    rx = compile_regex("(a+)+$", engine)
    start = time.perf_counter()
    assert rx.search("a" * 50_000 + "b") is False
    assert time.perf_counter() - start < 3.0


@pytest.mark.parametrize("engine", ENGINES)
def test_nested_repetition_finishes_quickly(engine: str) -> None:
    rx = compile_regex("^(a|aa|a?){1,20}(a*)*c", engine)
    start = time.perf_counter()
    assert rx.search("a" * 20_000) is False
    assert time.perf_counter() - start < 3.0


@pytest.mark.parametrize(
    ("pattern", "offset", "message"),
    [
        ("(a)\\1", 3, "unsupported escape"),
        ("(?=a)", 0, "unsupported group"),
        ("(?<!a)b", 0, "unsupported group"),
        ("a(?i)b", 1, "unsupported group"),
        ("a**", 2, "quantifier cannot follow"),
        ("*a", 0, "nothing to repeat"),
        ("^*", 1, "nothing to repeat"),
        ("(ab", 0, "missing ')'"),
        ("ab)", 2, "unbalanced ')'"),
        ("[ab", 0, "missing ']'"),
        ("[z-a]", 2, "bad character range"),
        ("a{2,1}", 1, "m < n"),
        ("a{1001}", 1, "above 1000"),
        ("a{,3}", 1, "must start a repetition"),
        ("\\p{L}", 0, "unsupported escape"),
        ("[[:alpha:]]", 1, "POSIX"),
        ("abc\\", 3, "trailing backslash"),
    ],
)
def test_patterns_outside_the_subset_are_rejected_with_their_offset(
    pattern: str, offset: int, message: str
) -> None:
    with pytest.raises(RegexError) as info:
        compile_regex(pattern, "nfa")
    assert info.value.offset == offset and message in info.value.message


def test_too_large_program_is_rejected() -> None:
    with pytest.raises(RegexError, match="too large"):
        compile_regex("((a{1000}){1000}){1000}", "nfa")


def test_dollar_matches_only_at_the_end_of_text() -> None:
    for engine in ENGINES:
        assert compile_regex("a$", engine).search("a") is True
        assert compile_regex("a$", engine).search("a\n") is False


def test_case_insensitive_flag_covers_classes() -> None:
    for engine in ENGINES:
        assert compile_regex("(?i)^[a-c]+$", engine).search("AbC") is True
        assert compile_regex("(?i)\\bSEND\\b", engine).search("please send") is True
        assert compile_regex("(?i)\\bSEND\\b", engine).search("sender") is False


def test_non_ascii_text_is_matched_by_character() -> None:
    for engine in ENGINES:
        assert compile_regex("^.é.$", engine).search("xéy") is True
        assert compile_regex("\\w", engine).search("é") is False


def test_default_engine_is_re2_when_installed() -> None:
    assert engine_name() == "re2"
    assert compile_regex("a").engine == "re2"
