"""The formatter: canonical text, comments kept, idempotent, never changes the AST."""

from __future__ import annotations

import dataclasses
import re
from importlib import resources
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bastion.policy import ast
from bastion.policy.formatter import format_file, format_source, quote
from bastion.policy.parser import RULE_EFFECTS, _parse_exact, _parse_fast, parse_source

PATH = "gen.policy"

KEYWORDS = frozenset(
    re.findall(
        r'"([A-Za-z_]+)"',
        resources.files("bastion.policy").joinpath("grammar.lark").read_text("utf-8"),
    )
)


def norm(x: Any) -> Any:
    """Structural form of an AST that, unlike ==, tells 1, 1.0 and True apart."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return (
            type(x).__name__,
            tuple((f.name, norm(getattr(x, f.name))) for f in dataclasses.fields(x) if f.compare),
        )
    if isinstance(x, tuple | list):
        return (type(x).__name__, tuple(norm(i) for i in x))
    if isinstance(x, dict):
        return ("dict", tuple((k, norm(v)) for k, v in x.items()))
    return (type(x).__name__, x)


def roundtrip(text: str) -> str:
    once = format_source(text, PATH)
    assert norm(parse_source(once, PATH)) == norm(parse_source(text, PATH))
    assert format_source(once, PATH) == once
    return once


# ---- examples ----------------------------------------------------------------


def test_spacing_quotes_and_semicolons_become_canonical() -> None:
    src = "default   call deny;\nallow call 'github__*'   when identity.groups has 'eng';\n"
    assert roundtrip(src) == (
        'default call deny\n\nallow call "github__*" when identity.groups has "eng"\n'
    )


def test_clauses_come_out_in_canonical_order() -> None:
    src = 'allow model "gpt-*" reason "r" unless model.max_tokens > 10 route "openai" when true'
    assert roundtrip(src) == (
        'allow model "gpt-*" route "openai" when true unless model.max_tokens > 10 reason "r"\n'
    )


def test_annotations_go_on_their_own_lines() -> None:
    src = '@id("a") @mode("shadow") forbid call "x"'
    assert roundtrip(src) == '@id("a")\n@mode("shadow")\nforbid call "x"\n'


def test_long_rule_wraps_one_clause_per_line() -> None:
    reason = "a reason long enough to push this rule past the line width of one hundred"
    src = f'forbid call "payments__*" when args.amount > 100 reason "{reason}"'
    assert roundtrip(src) == (
        f'forbid call "payments__*"\n    when args.amount > 100\n    reason "{reason}"\n'
    )


def test_long_condition_breaks_before_each_operator() -> None:
    cond = " and ".join(f'identity.attribute_{i} == "value number {i}"' for i in range(4))
    out = roundtrip(f'allow call "x" when {cond}')
    assert out.splitlines()[1:] == [
        '    when identity.attribute_0 == "value number 0"',
        '        and identity.attribute_1 == "value number 1"',
        '        and identity.attribute_2 == "value number 2"',
        '        and identity.attribute_3 == "value number 3"',
    ]


def test_short_chain_in_a_wrapped_rule_stays_on_its_clause_line() -> None:
    reason = "a reason long enough to push this rule past the line width of one hundred"
    out = roundtrip(
        f'ask call * when tool.readOnlyHint == false and context.tainted reason "{reason}"'
    )
    assert out.splitlines()[1] == "    when tool.readOnlyHint == false and context.tainted"


def test_long_set_puts_one_item_per_line_with_trailing_comma() -> None:
    items = ", ".join(f'"server_{i}__tool_with_a_long_name"' for i in range(4))
    out = roundtrip(f"tools many = [{items}]")
    assert out.splitlines()[0] == "tools many = ["
    assert out.splitlines()[1] == '    "server_0__tool_with_a_long_name",'
    assert out.splitlines()[-1] == "]"


def test_long_with_object_puts_one_key_per_line_and_keeps_short_values_flat() -> None:
    questions = (
        '[{"id": "is_bug", "type": "boolean", "text": "Does the issue report a bug?"}, '
        '{"id": "area", "type": "choice", "text": "Which area does the issue concern?", '
        '"options": ["documentation", "user interface", "build and install", "other"]}]'
    )
    out = roundtrip(f'quarantine result "gh__issue" with {{questions: {questions}}} when true')
    assert out == (
        'quarantine result "gh__issue"\n'
        "    with {\n"
        '        "questions": [\n'
        '            {"id": "is_bug", "type": "boolean", "text": "Does the issue report a bug?"},\n'
        "            {\n"
        '                "id": "area",\n'
        '                "type": "choice",\n'
        '                "text": "Which area does the issue concern?",\n'
        '                "options": ["documentation", "user interface", "build and install", "other"],\n'
        "            },\n"
        "        ],\n"
        "    }\n"
        "    when true\n"
    )


def test_long_using_list_puts_one_pattern_per_line() -> None:
    patterns = [f"(?i)pattern_number_{i}_[a-z0-9]{{8,}}" for i in range(4)]
    items = ", ".join(quote(p) for p in patterns)
    out = roundtrip(f'redact result "shell__*" using [{items}]')
    assert out.splitlines() == [
        'redact result "shell__*"',
        "    using [",
        *(f"        {quote(p)}," for p in patterns),
        "    ]",
    ]


def test_long_target_list_breaks_open_before_its_clauses() -> None:
    names = [f"github__delete_thing_number_{i}" for i in range(4)]
    items = ", ".join(quote(n) for n in names)
    out = roundtrip(f'forbid call [{items}] reason "r"')
    assert out.splitlines() == [
        "forbid call [",
        *(f"    {quote(n)}," for n in names),
        "]",
        '    reason "r"',
    ]


def test_long_limit_target_list_keeps_the_amount_after_it() -> None:
    names = ", ".join(f'"payments__create_thing_{i}"' for i in range(4))
    out = roundtrip(f"limit call [{names}] to 5 per 3600s")
    assert out.splitlines()[0] == "limit call ["
    assert out.splitlines()[-1] == "] to 5 calls per hour"


def test_long_list_in_a_condition_breaks_open() -> None:
    values = [f"value number {i} of the list" for i in range(4)]
    items = ", ".join(quote(v) for v in values)
    out = roundtrip(f'allow call "x" when args.a == 1 and args.kind in [{items}] and args.b')
    assert out.splitlines() == [
        'allow call "x"',
        "    when args.a == 1",
        "        and args.kind in [",
        *(f"            {quote(v)}," for v in values),
        "        ]",
        "        and args.b",
    ]


def test_comment_inside_a_wrapped_object_moves_above_the_rule() -> None:
    src = 'quarantine result "r"\n    with {\n        "a": 1,  # the a\n        "b": 2,\n    }\n'
    assert roundtrip(src) == '# the a\nquarantine result "r" with {"a": 1, "b": 2}\n'


def test_only_needed_parentheses_are_kept() -> None:
    src = "allow call * when ((a or b)) and (not (c)) and ((d == 1))"
    assert roundtrip(src) == "allow call * when (a or b) and not c and d == 1\n"


def test_nested_same_operator_keeps_its_parentheses() -> None:
    # An explicit ``(a and b)`` inside ``or`` is kept; a merged chain stays flat.
    src = "allow call * when (a and b) or c or (d or e)"
    assert roundtrip(src) == "allow call * when a and b or c or d or e\n"


def test_regex_backslashes_stay_single() -> None:
    out = roundtrip(r'allow call * when args.x matches "^\d+\.\w$"')
    assert r'"^\d+\.\w$"' in out


def test_comments_before_a_statement_stay_before_it() -> None:
    src = "# header\n\n# about deny\ndefault call deny\n"
    assert roundtrip(src) == src


def test_trailing_comment_stays_on_the_statement_line() -> None:
    src = 'allow call "x"    # why x\n'
    assert roundtrip(src) == 'allow call "x"  # why x\n'


def test_comment_inside_a_statement_moves_above_it() -> None:
    src = 'ask call "p__*"\n  # inner\n  when args.n > 1 # tail\n'
    assert roundtrip(src) == '# inner\nask call "p__*" when args.n > 1  # tail\n'


def test_comment_at_end_of_file_is_kept() -> None:
    src = "default call deny\n// the end\n"
    assert roundtrip(src) == src


def test_hash_inside_a_string_is_not_a_comment() -> None:
    src = 'allow call "a#b" reason "see #12"\n'
    assert roundtrip(src) == src


def test_blank_lines_collapse_to_one() -> None:
    src = 'allow call "a"\n\n\n\nallow call "b"\nallow call "c"\n'
    assert roundtrip(src) == 'allow call "a"\n\nallow call "b"\nallow call "c"\n'


def test_statement_kinds_are_separated_by_a_blank_line() -> None:
    src = 'policy "p"\ndefault call deny\nvalues v = [1]\nallow call * when 1 in v\n'
    assert roundtrip(src) == (
        'policy "p"\n\ndefault call deny\n\nvalues v = [1]\n\nallow call * when 1 in v\n'
    )


def test_limit_window_is_printed_canonically() -> None:
    out = roundtrip('limit call "a" to 5 per 3600s\nlimit model * to 9 per 90m by identity.tenant')
    assert out == (
        'limit call "a" to 5 calls per hour\nlimit model * to 9 tokens per 90m by identity.tenant\n'
    )


def test_context_rule_has_no_target() -> None:
    assert roundtrip("untrusted context when context.turn > 3") == (
        "untrusted context when context.turn > 3\n"
    )


def test_empty_file_formats_to_empty() -> None:
    assert format_source("", PATH) == ""
    assert format_source("# only a comment", PATH) == "# only a comment\n"


def test_odd_keys_are_bracketed() -> None:
    out = roundtrip('allow call * when args["odd key"][0].ok == request.headers["x-team"]')
    assert out == 'allow call * when args["odd key"][0].ok == request.headers["x-team"]\n'


@pytest.mark.parametrize(
    "value", ["plain", 'q"uote', "back\\slash", "tail\\", "\\n literal", "nl\nline", "\\u0041"]
)
def test_quote_reads_back_as_the_same_string(value: str) -> None:
    pf = parse_source(f"values v = [{quote(value)}]")
    stmt = pf.statements[0]
    assert isinstance(stmt, ast.SetDecl)
    assert stmt.items[0].value == value


# ---- properties --------------------------------------------------------------

names = st.from_regex(r"[a-z][a-z0-9_]{0,5}", fullmatch=True).filter(
    lambda n: n not in KEYWORDS and n not in ast.ROOTS
)
texts = st.text(max_size=10)
nonempty = st.text(min_size=1, max_size=10)
numbers = st.integers(-(10**12), 10**12) | st.floats(allow_nan=False, allow_infinity=False)
scalars = texts | numbers | st.booleans() | st.none()
path_parts = st.lists(
    st.sampled_from(sorted(KEYWORDS)) | names | st.integers(0, 99) | texts, max_size=3
)

leaves: st.SearchStrategy[ast.Expr] = st.one_of(
    st.builds(ast.Lit, scalars),
    st.builds(ast.Path, st.sampled_from(sorted(ast.ROOTS)), path_parts.map(tuple)),
    st.builds(ast.SetRef, names),
)
OPS = ["==", "!=", "<", "<=", ">", ">=", "in", "not in", "has", "startswith", "endswith"]
OPS += ["contains"]


def _compound(children: st.SearchStrategy[ast.Expr]) -> st.SearchStrategy[ast.Expr]:
    def without(kind: type) -> st.SearchStrategy[ast.Expr]:
        return children.filter(lambda e: not isinstance(e, kind))

    return st.one_of(
        st.builds(ast.ListExpr, st.lists(children, max_size=3).map(tuple)),
        st.builds(ast.Concat, st.lists(without(ast.Concat), min_size=2, max_size=3).map(tuple)),
        st.builds(ast.Compare, st.sampled_from(OPS), children, children),
        st.builds(
            ast.Compare,
            st.sampled_from(["matches", "like"]),
            children,
            st.builds(ast.Lit, texts),
        ),
        st.builds(ast.From, children, st.sampled_from(["untrusted", "user", "trusted"])),
        st.builds(ast.Not, children),
        st.builds(ast.And, st.lists(without(ast.And), min_size=2, max_size=3).map(tuple)),
        st.builds(ast.Or, st.lists(without(ast.Or), min_size=2, max_size=3).map(tuple)),
    )


exprs = st.recursive(leaves, _compound, max_leaves=8)

json_values = st.recursive(
    scalars,
    lambda c: st.lists(c, max_size=3) | st.dictionaries(texts, c, max_size=3),
    max_leaves=6,
)


@st.composite
def annotation_lists(draw: st.DrawFn) -> tuple[ast.Annotation, ...]:
    out = []
    if draw(st.booleans()):
        out.append(ast.Annotation("id", (draw(nonempty.filter(str.strip)),)))
    if draw(st.booleans()):
        out.append(ast.Annotation("mode", (draw(st.sampled_from(["shadow", "enforce"])),)))
    return tuple(draw(st.permutations(out)))


@st.composite
def targets(draw: st.DrawFn) -> ast.Target:
    choice = draw(st.integers(0, 3))
    if choice == 0:
        return ast.Target()
    if choice == 1:
        return ast.Target(patterns=(draw(texts),))
    if choice == 2:
        return ast.Target(
            patterns=tuple(draw(st.lists(texts, min_size=1, max_size=3))), is_list=True
        )
    return ast.Target(set_name=draw(names))


def condition(when: tuple[ast.Expr, ...], unless: tuple[ast.Expr, ...]) -> ast.Expr | None:
    parts: list[ast.Expr] = [*when, *(ast.Not(u) for u in unless)]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else ast.And(tuple(parts))


@st.composite
def rules(draw: st.DrawFn) -> ast.Rule:
    kind = draw(st.sampled_from(sorted(RULE_EFFECTS)))
    effect = draw(st.sampled_from(sorted(RULE_EFFECTS[kind])))
    when = tuple(draw(st.lists(exprs, max_size=2)))
    unless = tuple(draw(st.lists(exprs, max_size=2)))
    strs = st.lists(nonempty, max_size=3).map(tuple)
    return ast.Rule(
        effect=effect,
        kind=kind,
        target=ast.Target() if kind == "context" else draw(targets()),
        condition=condition(when, unless),
        when=when,
        unless=unless,
        reason=draw(st.none() | texts),
        route=draw(st.none() | texts) if kind == "model" else None,
        at=draw(strs) if kind == "result" else (),
        using=draw(strs) if effect == "redact" else (),
        options=tuple(draw(st.dictionaries(texts, json_values, max_size=3)).items())
        if effect == "quarantine"
        else (),
        annotations=draw(annotation_lists()),
    )


@st.composite
def limits(draw: st.DrawFn) -> ast.LimitRule:
    kind = draw(st.sampled_from(["call", "model"]))
    when = tuple(draw(st.lists(exprs, max_size=1)))
    unless = tuple(draw(st.lists(exprs, max_size=1)))
    by = draw(st.none() | st.builds(ast.Path, st.just("identity"), path_parts.map(tuple)))
    return ast.LimitRule(
        kind=kind,
        target=draw(targets()),
        amount=draw(st.integers(0, 10**9)),
        unit="calls" if kind == "call" else draw(st.sampled_from(["calls", "tokens"])),
        window_seconds=draw(st.integers(1, 10**7)),
        by=by,
        condition=condition(when, unless),
        when=when,
        unless=unless,
        reason=draw(st.none() | texts),
        annotations=draw(annotation_lists()),
    )


@st.composite
def set_decls(draw: st.DrawFn) -> ast.SetDecl:
    kind = draw(st.sampled_from(["tools", "models", "values"]))
    item = texts if kind != "values" else texts | numbers | st.booleans()
    items = tuple(ast.Lit(v) for v in draw(st.lists(item, max_size=4)))
    return ast.SetDecl(kind, draw(names), items)


DEFAULTS = {
    "call": ["allow", "deny", "ask"],
    "model": ["allow", "deny"],
    "result": ["trusted", "untrusted", "quarantine", "block"],
    "context": ["trusted", "untrusted"],
}
defaults = st.sampled_from(sorted(DEFAULTS)).flatmap(
    lambda k: st.builds(ast.Default, st.just(k), st.sampled_from(DEFAULTS[k]))
)
statements = st.one_of(rules(), limits(), set_decls(), defaults, st.builds(ast.Include, texts))


@st.composite
def policy_files(draw: st.DrawFn) -> ast.PolicyFile:
    name = draw(st.none() | texts)
    file_annotations: tuple[ast.Annotation, ...] = ()
    if name is not None and draw(st.booleans()):
        file_annotations = (
            ast.Annotation("mode", (draw(st.sampled_from(["shadow", "enforce"])),)),
        )
    return ast.PolicyFile(
        PATH, name, file_annotations, tuple(draw(st.lists(statements, max_size=5)))
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pf=policy_files(), width=st.integers(20, 120))
def test_formatting_a_generated_ast_reads_back_as_the_same_ast(
    pf: ast.PolicyFile, width: int
) -> None:
    text = format_file(pf, width=width)
    parsed = parse_source(text, PATH)
    assert norm(parsed) == norm(pf)
    assert format_file(parsed, text, width=width) == text


long_texts = st.text(max_size=40)
big_json = st.recursive(
    long_texts | numbers | st.booleans() | st.none(),
    lambda c: st.lists(c, max_size=5) | st.dictionaries(long_texts, c, max_size=5),
    max_leaves=15,
)
long_lists: st.SearchStrategy[ast.Expr] = st.builds(
    ast.ListExpr, st.lists(st.builds(ast.Lit, long_texts) | leaves, max_size=6).map(tuple)
)
# Chains whose items often end in a long list: what a condition's wrapping breaks open.
chain_items = st.one_of(
    long_lists,
    st.builds(ast.Compare, st.sampled_from(OPS), leaves, long_lists),
    st.builds(ast.Compare, st.sampled_from(OPS), leaves, st.builds(ast.Lit, long_texts)),
    exprs,
)
long_conditions = st.one_of(
    chain_items,
    st.builds(
        ast.And,
        st.lists(
            chain_items.filter(lambda e: not isinstance(e, ast.And)), min_size=2, max_size=4
        ).map(tuple),
    ),
    st.builds(
        ast.Or,
        st.lists(
            chain_items.filter(lambda e: not isinstance(e, ast.Or)), min_size=2, max_size=4
        ).map(tuple),
    ),
)


@st.composite
def data_rules(draw: st.DrawFn) -> ast.Rule:
    """Result rules with large with/using/at data, long target lists and conditions."""
    effect = draw(st.sampled_from(["quarantine", "redact"]))
    when = tuple(draw(st.lists(long_conditions, max_size=2)))
    patterns = st.lists(long_texts.filter(bool), max_size=6).map(tuple)
    target = draw(
        st.builds(lambda p: ast.Target(patterns=p, is_list=True), patterns.filter(bool)) | targets()
    )
    return ast.Rule(
        effect=effect,
        kind="result",
        target=target,
        condition=condition(when, ()),
        when=when,
        reason=draw(st.none() | long_texts),
        at=draw(patterns),
        using=draw(patterns) if effect == "redact" else (),
        options=tuple(draw(st.dictionaries(long_texts, big_json, max_size=5)).items())
        if effect == "quarantine"
        else (),
    )


data_files = st.builds(
    lambda stmts: ast.PolicyFile(PATH, None, (), tuple(stmts)),
    st.lists(data_rules() | limits(), min_size=1, max_size=3),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pf=data_files, width=st.integers(20, 120))
def test_wrapped_data_and_conditions_read_back_as_the_same_ast_on_both_parse_paths(
    pf: ast.PolicyFile, width: int
) -> None:
    text = format_file(pf, width=width)
    exact = _parse_exact(text, PATH)
    assert norm(exact) == norm(pf)
    fast = _parse_fast(text, PATH)
    assert fast is None or norm(fast) == norm(pf)
    assert format_file(exact, text, width=width) == text


@st.composite
def decorated(draw: st.DrawFn) -> tuple[str, list[str], int]:
    """Canonical text with comments, blank lines and indentation sprinkled in."""
    pf = draw(policy_files() | data_files)
    width = draw(st.sampled_from([40, 100]))
    out: list[str] = []
    comments: list[str] = []
    for n, line in enumerate(format_file(pf, width=width).splitlines()):
        if draw(st.booleans()):
            out.extend([""] * draw(st.integers(1, 2)))
        if draw(st.integers(0, 3)) == 0:
            text = f"# c{n} " + draw(st.text("ab #/'\"", max_size=4))
            comments.append(text.rstrip())
            out.append(text)
        indent = " " * draw(st.integers(0, 3))
        if draw(st.integers(0, 3)) == 0:
            text = f"// t{n}"
            comments.append(text)
            line += "  " + text
        out.append(indent + line)
    return "\n".join(out), comments, width


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=decorated())
def test_formatting_source_keeps_ast_and_comments_and_is_idempotent(
    case: tuple[str, list[str], int],
) -> None:
    text, comments, width = case
    once = format_source(text, PATH, width=width)
    assert norm(parse_source(once, PATH)) == norm(parse_source(text, PATH))
    assert format_source(once, PATH, width=width) == once
    kept = [c.text for c in parse_source(once, PATH).comments]
    assert kept == comments


def test_negated_comparison_keeps_its_parentheses() -> None:
    assert roundtrip("allow call * when not (args.a == 1) and not context.tainted") == (
        "allow call * when not (args.a == 1) and not context.tainted\n"
    )
