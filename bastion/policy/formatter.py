"""Canonical formatting of policy files (``bastion fmt``).

The formatter prints the AST, not the text: spacing, quotes, lists and clause
order come out the same whatever the author wrote, so formatting can never change
what a policy means (``parse(format(x)) == parse(x)``) and formatting twice is
formatting once. The source is consulted only for what the AST does not keep:
comments (put back before the statement they precede, or after the statement
they trail) and the author's blank lines (kept, collapsed to one).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bastion.policy import ast

__all__ = ["LINE_WIDTH", "format_expr", "format_file", "format_source", "quote"]

LINE_WIDTH = 100
INDENT = "    "

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# A backslash followed by one of these would read as an escape sequence.
_ESCAPE_LETTERS = frozenset('ntr0u\\"' + "'")
_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r", "\0": "\\0", '"': '\\"'}
_WINDOW_WORDS = {1: "second", 60: "minute", 3600: "hour", 86400: "day"}


def quote(value: str) -> str:
    """A double-quoted policy string literal that reads back as ``value``.

    A backslash stays single where the language keeps unknown escapes as they
    are (so the regex ``\\d+`` is written ``"\\d+"``, not ``"\\\\d+"``).
    """
    out: list[str] = ['"']
    for i, c in enumerate(value):
        if c == "\\":
            nxt = value[i + 1] if i + 1 < len(value) else ""
            plain = nxt != "" and nxt not in _ESCAPE_LETTERS and _char(nxt) == nxt
            out.append("\\" if plain else "\\\\")
        else:
            out.append(_char(c))
    out.append('"')
    return "".join(out)


def _char(c: str) -> str:
    if c in _ESCAPES:
        return _ESCAPES[c]
    if not c.isprintable() and c != " " and ord(c) <= 0xFFFF:
        return f"\\u{ord(c):04x}"
    return c


def _number(value: int | float) -> str:
    if isinstance(value, float):
        if math.isinf(value):
            return "-1e999" if value < 0 else "1e999"
        return repr(value)
    return str(value)


def _literal(value: Any) -> str:
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        return quote(value)
    if isinstance(value, int | float):
        return _number(value)
    if isinstance(value, dict):
        return _object(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_literal(v) for v in value) + "]"
    raise TypeError(f"cannot format {type(value).__name__} as a policy literal")


def _object(obj: dict[str, Any] | Sequence[tuple[str, Any]]) -> str:
    items = obj.items() if isinstance(obj, dict) else obj
    inner = ", ".join(f"{quote(k)}: {_literal(v)}" for k, v in items)
    return "{" + inner + "}"


def _value_lines(value: Any, lead: str, tail: str, indent: str, width: int) -> list[str]:
    """``lead + value + tail``, with an object or list too long for its line broken open.

    Broken, each key or item goes on its own line one indent deeper than ``indent``
    (the indentation of the line it opens on), with a trailing comma, and the
    closing bracket comes back to ``indent``; nested values break the same way,
    and only where they do not fit.
    """
    flat = lead + _literal(value) + tail
    if len(flat) <= width:
        return [flat]
    inner = indent + INDENT
    if isinstance(value, dict) and value:
        body = [
            line
            for k, v in value.items()
            for line in _value_lines(v, f"{inner}{quote(k)}: ", ",", inner, width)
        ]
        return [lead + "{", *body, indent + "}" + tail]
    if isinstance(value, list | tuple) and value:
        body = [line for v in value for line in _value_lines(v, inner, ",", inner, width)]
        return [lead + "[", *body, indent + "]" + tail]
    return [flat]


@dataclass(frozen=True)
class _Value:
    """A clause argument that is plain data (``at``, ``using``, ``with``)."""

    value: Any


def _path(p: ast.Path) -> str:
    out = p.root
    for part in p.parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _NAME.match(part):
            out += f".{part}"
        else:
            out += f"[{quote(part)}]"
    return out


# ---- expressions -------------------------------------------------------------

# Binding strength, loosest first, as in the grammar.
_OR, _AND, _NOT, _CMP, _SUM, _ATOM = range(6)


def _level(e: ast.Expr) -> int:
    if isinstance(e, ast.Or):
        return _OR
    if isinstance(e, ast.And):
        return _AND
    if isinstance(e, ast.Not):
        return _NOT
    if isinstance(e, ast.Compare | ast.From):
        return _CMP
    if isinstance(e, ast.Concat):
        return _SUM
    return _ATOM


def _sub(e: ast.Expr, at_least: int) -> str:
    text = format_expr(e)
    return f"({text})" if _level(e) < at_least else text


def format_expr(e: ast.Expr) -> str:
    """One expression on one line, with only the parentheses it needs."""
    if isinstance(e, ast.Lit):
        return _literal(e.value)
    if isinstance(e, ast.ListExpr):
        return "[" + ", ".join(format_expr(i) for i in e.items) + "]"
    if isinstance(e, ast.Path):
        return _path(e)
    if isinstance(e, ast.SetRef):
        return e.name
    if isinstance(e, ast.Concat):
        return " + ".join(_sub(i, _ATOM) for i in e.items)
    if isinstance(e, ast.Compare):
        return f"{_sub(e.left, _SUM)} {e.op} {_sub(e.right, _SUM)}"
    if isinstance(e, ast.From):
        return f"{_sub(e.value, _SUM)} from {e.source}"
    if isinstance(e, ast.Not):
        # "not a == b" reads as "(not a) == b" to people; the parentheses say what it is.
        return f"not {_sub(e.operand, _SUM)}"
    if isinstance(e, ast.And):
        # An And directly inside an And would merge when read back: keep parentheses.
        return " and ".join(_sub(i, _NOT) for i in e.items)
    return " or ".join(_sub(i, _AND) for i in e.items)


def _operand_lines(e: ast.Expr, lead: str, tail: str, indent: str, width: int) -> list[str]:
    """``lead + e + tail``, a list literal that ends ``e`` broken open when too long.

    A list is broken as in :func:`_value_lines`; so is the list on the right of a
    comparison (``args.x in [...]``). Anything else stays on one line.
    """
    flat = lead + format_expr(e) + tail
    if len(flat) <= width:
        return [flat]
    if isinstance(e, ast.ListExpr) and e.items:
        inner = indent + INDENT
        body = [line for i in e.items for line in _operand_lines(i, inner, ",", inner, width)]
        return [lead + "[", *body, indent + "]" + tail]
    if isinstance(e, ast.Compare) and isinstance(e.right, ast.ListExpr):
        left = f"{lead}{_sub(e.left, _SUM)} {e.op} "
        return _operand_lines(e.right, left, tail, indent, width)
    return [flat]


def _expr_lines(e: ast.Expr, lead: str, width: int) -> list[str]:
    """A long condition after ``lead``: an ``and``/``or`` chain broken before each
    operator, and long list literals in it broken open."""
    indent = lead[: len(lead) - len(lead.lstrip())]
    flat = lead + format_expr(e)
    if len(flat) <= width:
        return [flat]
    if isinstance(e, ast.And | ast.Or):
        word, floor = ("and", _NOT) if isinstance(e, ast.And) else ("or", _AND)
        deeper = indent + INDENT
        out: list[str] = []
        for n, item in enumerate(e.items):
            item_lead, item_indent = (lead, indent) if n == 0 else (f"{deeper}{word} ", deeper)
            if _level(item) < floor:
                out.append(item_lead + _sub(item, floor))
            else:
                out.extend(_operand_lines(item, item_lead, "", item_indent, width))
        return out
    return _operand_lines(e, lead, "", indent, width)


# ---- statements --------------------------------------------------------------


def _annotation(a: ast.Annotation) -> str:
    return f"@{a.name}(" + ", ".join(_literal(v) for v in a.args) + ")"


def _target(t: ast.Target, kind: str) -> str | None:
    if t.set_name is not None:
        return t.set_name
    if t.is_list:
        return "[" + ", ".join(quote(p) for p in t.patterns) + "]"
    if t.patterns:
        return quote(t.patterns[0])
    return None if kind == "context" else "*"


def _window(seconds: int) -> str:
    if seconds in _WINDOW_WORDS:
        return _WINDOW_WORDS[seconds]
    for size, unit in ((86400, "d"), (3600, "h"), (60, "m")):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _clauses(stmt: ast.Rule | ast.LimitRule) -> list[tuple[str, ast.Expr | _Value | str]]:
    """(keyword, argument) pairs in canonical order; an Expr or _Value argument may wrap."""
    out: list[tuple[str, ast.Expr | _Value | str]] = []
    if isinstance(stmt, ast.Rule):
        if stmt.route is not None:
            out.append(("route", quote(stmt.route)))
        if stmt.at:
            out.append(("at", _Value(list(stmt.at))))
        if stmt.using:
            out.append(("using", _Value(list(stmt.using))))
        if stmt.options:
            out.append(("with", _Value(_options(stmt.options))))
    elif stmt.by is not None:
        out.append(("by", _path(stmt.by)))
    out.extend(("when", w) for w in stmt.when)
    out.extend(("unless", u) for u in stmt.unless)
    if stmt.reason is not None:
        out.append(("reason", quote(stmt.reason)))
    return out


def _options(options: Sequence[tuple[str, Any]]) -> dict[str, Any] | _Pairs:
    as_dict = dict(options)
    # The parser rejects a repeated key; an AST built by hand keeps every pair.
    return as_dict if len(as_dict) == len(options) else _Pairs(tuple(options))


@dataclass(frozen=True)
class _Pairs:
    pairs: tuple[tuple[str, Any], ...]


def _clause_text(arg: ast.Expr | _Value | str) -> str:
    if isinstance(arg, str):
        return arg
    if isinstance(arg, _Value):
        v = arg.value
        return _object(v.pairs) if isinstance(v, _Pairs) else _literal(v)
    return format_expr(arg)


def _head(stmt: ast.Rule | ast.LimitRule) -> str:
    if isinstance(stmt, ast.Rule):
        target = _target(stmt.target, stmt.kind)
        return " ".join(p for p in (stmt.effect, stmt.kind, target) if p is not None)
    target = _target(stmt.target, stmt.kind) or "*"
    return (
        f"limit {stmt.kind} {target} to {stmt.amount} {stmt.unit} "
        f"per {_window(stmt.window_seconds)}"
    )


def _head_lines(stmt: ast.Rule | ast.LimitRule, width: int) -> list[str]:
    """The head, its target list broken open when the head is too long."""
    head = _head(stmt)
    if len(head) <= width or not stmt.target.is_list or stmt.target.set_name is not None:
        return [head]
    patterns = list(stmt.target.patterns)
    if isinstance(stmt, ast.Rule):
        return _value_lines(patterns, f"{stmt.effect} {stmt.kind} ", "", "", width)
    tail = head[len(f"limit {stmt.kind} {_target(stmt.target, stmt.kind)}") :]
    return _value_lines(patterns, f"limit {stmt.kind} ", tail, "", width)


def _rule_lines(stmt: ast.Rule | ast.LimitRule, width: int) -> list[str]:
    clauses = _clauses(stmt)
    one_line = " ".join([_head(stmt), *(f"{k} {_clause_text(a)}" for k, a in clauses)])
    lines = [_annotation(a) for a in stmt.annotations]
    if len(one_line) <= width:
        return [*lines, one_line]
    lines.extend(_head_lines(stmt, width))
    for keyword, arg in clauses:
        lead = f"{INDENT}{keyword} "
        if isinstance(arg, str):
            lines.append(lead + arg)
        elif isinstance(arg, _Value):
            if isinstance(arg.value, _Pairs):
                lines.append(lead + _clause_text(arg))
            else:
                lines.extend(_value_lines(arg.value, lead, "", INDENT, width))
        else:
            lines.extend(_expr_lines(arg, lead, width))
    return lines


def _set_lines(s: ast.SetDecl, width: int) -> list[str]:
    return _value_lines([i.value for i in s.items], f"{s.set_kind} {s.name} = ", "", "", width)


def statement_lines(stmt: ast.Statement, width: int = LINE_WIDTH) -> list[str]:
    """The canonical text of one statement, as lines (annotations first)."""
    if isinstance(stmt, ast.Include):
        return [f"include {quote(stmt.path)}"]
    if isinstance(stmt, ast.Default):
        return [f"default {stmt.kind} {stmt.effect}"]
    if isinstance(stmt, ast.SetDecl):
        return _set_lines(stmt, width)
    return _rule_lines(stmt, width)


# ---- layout: statements, comments and blank lines ----------------------------


@dataclass
class _Item:
    """A header or statement with the comments that go with it."""

    first: int  # first and last source line (0 when the node has no position)
    last: int
    lines: list[str]
    group: str
    leading: list[ast.Comment] = field(default_factory=list)
    trailing: list[ast.Comment] = field(default_factory=list)


def _extent(stmt: ast.Statement) -> tuple[int, int]:
    first = stmt.span.line
    if isinstance(stmt, ast.Rule | ast.LimitRule):
        lines = [a.span.line for a in stmt.annotations if a.span.line > 0]
        first = min([first, *lines]) if first > 0 else min(lines, default=0)
    last = max(stmt.span.end_line, stmt.span.line)
    return first, last


def _group(stmt: ast.Statement) -> str:
    if isinstance(stmt, ast.Rule):
        return "rule"
    if isinstance(stmt, ast.LimitRule):
        return "limit"
    if isinstance(stmt, ast.SetDecl):
        return "set"
    return type(stmt).__name__.lower()


def _needs_semicolon(stmt: ast.Statement, following: ast.Statement) -> bool:
    # Where the grammar reads the next statement as part of this one, a ";" ends
    # it: after an expression or a list the lexer takes the "in" of "include" for
    # the operator, and a context rule with no clause takes the next word for
    # its target.
    if isinstance(following, ast.Include) and _group(stmt) in ("rule", "limit", "set"):
        return True
    return (
        isinstance(stmt, ast.Rule)
        and stmt.kind == "context"
        and not _clauses(stmt)
        and not isinstance(following, ast.Include | ast.Default | ast.LimitRule)
    )


def format_file(pf: ast.PolicyFile, source: str = "", *, width: int = LINE_WIDTH) -> str:
    """The canonical text of a parsed file; ``source`` supplies comments and blank lines."""
    src_lines = source.split("\n")

    def blank_between(a: int, b: int) -> bool:
        # Any whitespace-only source line strictly between lines a and b.
        if a <= 0 or b <= 0:
            return False
        return any(not src_lines[n - 1].strip() for n in range(a + 1, b) if n <= len(src_lines))

    items: list[_Item] = []
    if pf.name is not None:
        hs = pf.header_span
        first = hs.line if hs is not None else 0
        lines = [_annotation(a) for a in pf.annotations] + [f"policy {quote(pf.name)}"]
        items.append(_Item(first, hs.end_line if hs is not None else 0, lines, "header"))
    for n, stmt in enumerate(pf.statements):
        first, last = _extent(stmt)
        lines = statement_lines(stmt, width)
        following = pf.statements[n + 1] if n + 1 < len(pf.statements) else None
        if following is not None and _needs_semicolon(stmt, following):
            lines[-1] += ";"
        items.append(_Item(first, last, lines, _group(stmt)))

    orphans: list[ast.Comment] = []
    for c in pf.comments:
        owner = next((it for it in reversed(items) if it.first <= c.line <= it.last), None)
        code_before = c.line <= len(src_lines) and src_lines[c.line - 1][: c.col - 1].strip()
        if owner is not None and code_before and c.line == owner.last:
            owner.trailing.append(c)
        elif owner is not None:
            # Inside a statement that is reprinted whole: keep the comment just above it.
            owner.leading.append(c)
        else:
            nxt = next((it for it in items if it.first > c.line), None)
            if nxt is not None:
                nxt.leading.append(c)
            else:
                orphans.append(c)

    out: list[str] = []
    prev_line = 0  # last source line emitted so far
    prev_group: str | None = None

    def separate(line: int, group: str | None) -> None:
        if not out:
            return
        if blank_between(prev_line, line) or (
            group is not None and prev_group is not None and group != prev_group
        ):
            out.append("")

    for it in items:
        leading = sorted(it.leading, key=lambda c: c.line)
        for n, c in enumerate(leading):
            separate(c.line, it.group if n == 0 else None)
            out.append(c.text)
            prev_line = c.line
        if leading:
            if blank_between(prev_line, it.first) and it.first > prev_line:
                out.append("")
        else:
            separate(it.first, it.group)
        body = list(it.lines)
        if it.trailing:
            body[-1] += "  " + "  ".join(c.text for c in it.trailing)
        out.extend(body)
        prev_line = max(prev_line, it.last)
        prev_group = it.group
    for c in orphans:
        separate(c.line, None)
        out.append(c.text)
        prev_line = c.line
    return "\n".join(out) + "\n" if out else ""


def format_source(text: str, path: str = "<string>", *, width: int = LINE_WIDTH) -> str:
    """Parse and format policy text. Raises PolicyError when it does not parse."""
    from bastion.policy.parser import parse_source

    return format_file(parse_source(text, path), text, width=width)
