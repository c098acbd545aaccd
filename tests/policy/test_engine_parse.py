"""The fast parse path: the same AST, spans and comments as lark's exact path, or it gives up.

``parse_source`` first tries a hand-written parser and falls back to lark (which
reports every diagnostic) whenever the fast path is unsure. The fast path must
never accept text that lark rejects, and whatever it accepts must come out
identical to lark's result, positions included (the formatter and every
diagnostic rely on them). ``==`` on the AST ignores spans, so these tests
compare every field.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bastion.policy import ast
from bastion.policy.diagnostics import PolicyError
from bastion.policy.formatter import format_file
from bastion.policy.parser import _parse_exact, _parse_fast, gc_paused, parse_source

from .test_differential import policies
from .test_formatter import policy_files

PATH = "gen.policy"
RULES = sorted((Path(__file__).resolve().parents[2] / "rules").glob("*.policy"))
SETTINGS = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def full(x: Any) -> Any:
    """Every field of an AST, spans included, with 1, 1.0 and True told apart."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return (
            type(x).__name__,
            tuple((f.name, full(getattr(x, f.name))) for f in dataclasses.fields(x)),
        )
    if isinstance(x, tuple | list):
        return (type(x).__name__, tuple(full(i) for i in x))
    if isinstance(x, dict):
        return ("dict", tuple((k, full(v)) for k, v in x.items()))
    return (type(x).__name__, x)


def exact_or_none(text: str) -> ast.PolicyFile | None:
    try:
        return _parse_exact(text, PATH)
    except PolicyError:
        return None


def agree(text: str) -> ast.PolicyFile | None:
    """Assert that the fast path gives lark's AST or gives up; returns the fast AST."""
    fast = _parse_fast(text, PATH)
    if fast is not None:
        exact = exact_or_none(text)
        assert exact is not None, f"fast path accepted text lark rejects:\n{text}"
        assert full(fast) == full(exact)
    return fast


@pytest.mark.parametrize("path", RULES, ids=lambda p: p.name)
def test_every_shipped_policy_takes_the_fast_path_with_identical_ast(path: Path) -> None:
    text = path.read_text("utf-8")
    fast = _parse_fast(text, str(path))
    assert fast is not None
    assert full(fast) == full(_parse_exact(text, str(path)))


def test_spans_of_keyword_first_nodes_match_lark() -> None:
    text = (
        '@mode("shadow") policy "p";\n'
        '@id("a")  @mode("shadow")\n'
        '  forbid call ["x", \'y\'] when (args.a.b[0] or args["k"]) and not tool.name'
        ' == "x" + ("y" + args.z) unless context.tainted reason "r";\n'
        "limit call * to 5 calls per 1m by identity.sub when args.n > -2.5e3 // c\n"
        "trusted context\n"
        'quarantine result "r" at ["$.a",] with {a: [1, true, null, {"b": \'c\'}],}\n'
        "allow model m when model.name in [1, 2,] # end"
    )
    fast = _parse_fast(text, PATH)
    assert fast is not None
    assert full(fast) == full(_parse_exact(text, PATH))
    rule = fast.statements[0]
    assert isinstance(rule, ast.Rule)
    assert fast.annotations[0].span == ast.Span(PATH, 1, 1, 1, 16)
    assert fast.header_span == ast.Span(PATH, 1, 1, 1, 28)  # annotations to the ";"
    assert rule.annotations[0].span == ast.Span(PATH, 2, 1, 2, 9)
    assert rule.span.line == 3 and rule.span.col == 3  # the effect, not the annotations
    assert rule.condition is not None and rule.condition.span.line == 2  # the whole rule


def test_a_file_with_errors_still_gets_every_diagnostic() -> None:
    text = 'allow call "a" when\nforbid call "b" when args.x ==\nask call x reason 5\n'
    with pytest.raises(PolicyError) as exc:
        parse_source(text, PATH)
    assert [(d.line, d.col) for d in exc.value.diagnostics] == [(1, 16), (2, 29), (3, 19)]


@pytest.mark.parametrize(
    "text",
    [
        "allow call x when a and_b",  # lark reads 'and' '_b'
        "allow call x when a order == 1",  # lark reads 'or' 'der'
        "allow call call",  # a reserved word as a set name
        "allow call x when in == 1",
        "limit call x to 1 per 1 m",
        "allow call x when args.a[1.5]",
        "allow call x; ;",
        'allow call "é" when args.é',
        "default call yes",  # a semantic error: lark reports it
    ],
)
def test_the_fast_path_gives_up_on_what_it_is_unsure_of(text: str) -> None:
    assert _parse_fast(text, PATH) is None
    agree(text)


@settings(SETTINGS, max_examples=300)
@given(text=policies())
def test_random_policies_parse_identically(text: str) -> None:
    assert agree(text) is not None


@settings(SETTINGS, max_examples=300)
@given(pf=policy_files(), width=st.integers(20, 120))
def test_formatted_random_asts_parse_identically(pf: ast.PolicyFile, width: int) -> None:
    agree(format_file(pf, width=width))


VOCABULARY = [
    *[
        "allow",
        "forbid",
        "ask",
        "hide",
        "show",
        "trusted",
        "untrusted",
        "quarantine",
        "redact",
        "block",
    ],
    *[
        "call",
        "tool",
        "result",
        "model",
        "context",
        "policy",
        "include",
        "default",
        "tools",
        "models",
        "values",
    ],
    *[
        "limit",
        "to",
        "per",
        "calls",
        "tokens",
        "when",
        "unless",
        "reason",
        "route",
        "at",
        "using",
        "with",
        "by",
    ],
    *[
        "or",
        "and",
        "not",
        "from",
        "in",
        "has",
        "startswith",
        "endswith",
        "contains",
        "matches",
        "like",
    ],
    *[
        "true",
        "false",
        "null",
        "user",
        "minute",
        "s",
        "m",
        "1m",
        "0s",
        "identity",
        "args",
        "x",
        "_y",
        "args.a.b",
    ],
    *[
        "==",
        "!=",
        "<",
        "<=",
        ">",
        ">=",
        "=",
        "@",
        "(",
        ")",
        ".",
        ",",
        "[",
        "]",
        "{",
        "}",
        ":",
        ";",
        "*",
        "+",
        '"s"',
        "'t'",
        '"a\\"b"',
        "0",
        "-1",
        "2.5",
        "1e3",
        "5x",
    ],
    '@id("r")',
    '@mode("shadow")',
]
SEPARATORS = st.sampled_from([" ", "", "\n", "  ", " # c\n", " // c\n", "\t", "\r\n"])


@settings(SETTINGS, max_examples=1500)
@given(st.lists(st.tuples(st.sampled_from(VOCABULARY), SEPARATORS), max_size=14))
def test_token_soup_never_parses_differently(parts: list[tuple[str, str]]) -> None:
    agree("".join(tok + sep for tok, sep in parts))


@settings(SETTINGS, max_examples=400)
@given(
    text=policies(),
    at=st.integers(0, 10**6),
    edit=st.sampled_from([*VOCABULARY, "", '"', "(", "\n"]),
    cut=st.integers(0, 3),
)
def test_edited_policies_never_parse_differently(text: str, at: int, edit: str, cut: int) -> None:
    i = at % (len(text) + 1)
    agree(text[:i] + edit + text[i + cut :])


def test_the_differential_generator_mostly_takes_the_fast_path() -> None:
    # Guards against a fast path that silently gives up on everything.
    texts = [
        'values admins = ["root", 3, true]\nallow call "gh__*" when identity.groups has "eng"',
        "forbid call x when (args.n > 3 or args.s == 'a') and not context.tainted",
        f"quarantine result * with {json.dumps({'q': ['a'], 'n': 1})} reason 'r'",
    ]
    for text in texts:
        assert _parse_fast(text, PATH) is not None


def test_loading_pauses_the_collector_and_restores_it() -> None:
    assert gc.isenabled()
    seen: list[bool] = []
    with gc_paused():
        seen.append(gc.isenabled())
        with gc_paused():
            seen.append(gc.isenabled())
        seen.append(gc.isenabled())
    assert seen == [False, False, False]
    assert gc.isenabled()
    # Concurrent loads: the collector resumes only when the last one ends.
    inside = threading.Event()
    release = threading.Event()

    def load() -> None:
        with gc_paused():
            inside.set()
            release.wait(5)

    th = threading.Thread(target=load)
    th.start()
    inside.wait(5)
    with gc_paused():
        pass
    assert not gc.isenabled()
    release.set()
    th.join()
    assert gc.isenabled()
    gc.disable()
    try:
        parse_source('allow call "x"', PATH)
        assert not gc.isenabled()  # a caller's choice is kept
    finally:
        gc.enable()
