"""Policy text -> AST, with every mistake reported as a positioned Diagnostic.

Parsing is LALR(1) with lark. When a file has syntax errors, the text is cut at
statement boundaries and each piece is parsed on its own, so one run reports
one error per broken statement instead of stopping at the first.
"""

from __future__ import annotations

import gc
import itertools
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from functools import cache
from importlib import resources
from typing import Any

from lark import Lark, Token, Tree
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from bastion.policy import ast
from bastion.policy.diagnostics import Diagnostic, PolicyError

__all__ = ["parse_file", "parse_source"]

# Which effects each rule kind accepts, and which defaults each kind accepts.
RULE_EFFECTS: dict[str, frozenset[str]] = {
    "call": frozenset({"allow", "forbid", "ask"}),
    "tool": frozenset({"hide", "show"}),
    "model": frozenset({"allow", "forbid"}),
    "result": frozenset({"trusted", "untrusted", "quarantine", "redact", "block"}),
    "context": frozenset({"trusted", "untrusted"}),
}
DEFAULT_EFFECTS: dict[str, frozenset[str]] = {
    "call": frozenset({"allow", "deny", "forbid", "ask"}),
    "model": frozenset({"allow", "deny", "forbid"}),
    "result": frozenset({"trusted", "untrusted", "quarantine", "block"}),
    "context": frozenset({"trusted", "untrusted"}),
}
KNOWN_ANNOTATIONS = {"id": 1, "mode": 1}
MODES = frozenset({"shadow", "enforce"})
CLAUSES_BY_KIND: dict[str, frozenset[str]] = {
    "call": frozenset({"when", "unless", "reason"}),
    "tool": frozenset({"when", "unless", "reason"}),
    "model": frozenset({"when", "unless", "reason", "route"}),
    "result": frozenset({"when", "unless", "reason", "at", "using", "with"}),
    "context": frozenset({"when", "unless", "reason"}),
    "limit": frozenset({"when", "unless", "reason", "by"}),
}
WINDOW_WORDS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
WINDOW_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}

_STATEMENT_START = re.compile(
    r"^\s*(@|policy\b|include\b|default\b|tools\b|models\b|values\b|limit\b|allow\b|forbid\b"
    r"|ask\b|hide\b|show\b|trusted\b|untrusted\b|quarantine\b|redact\b|block\b)"
)

_TOKEN_NAMES = {
    "NAME": "a name",
    "STRING": "a string",
    "NUMBER": "a number",
    "INT": "an integer",
    "EFFECT": "an effect (allow, forbid, ask, hide, show, trusted, untrusted, quarantine, redact, block)",
    "RULE_KIND": "a rule kind (call, tool, result, model, context)",
    "DEFAULT_KIND": "call, result, model or context",
    "SET_KIND": "tools, models or values",
    "COMP_OP": "an operator",
    "SOURCE": "untrusted, user or trusted",
    "WINDOW": "a window such as 1m, 1h, minute",
    "LIMIT_KIND": "call or model",
    "LIMIT_UNIT": "calls or tokens",
    "$END": "end of file",
}


class _Cut(Exception):
    """Internal: a semantic error found while building the AST."""

    def __init__(self, diag: Diagnostic) -> None:
        self.diag = diag


_gc_lock = threading.Lock()
_gc_depth = 0
_gc_was_enabled = False


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while a policy loads (re-entrant, thread-safe).

    A load allocates hundreds of thousands of long-lived objects (tokens, AST,
    compiled rules); each full collection the allocations trigger scans all of
    them again, which more than doubles the time of a large load. Nothing a load
    builds is cyclic garbage, and the collector resumes (if it was running) when
    the last concurrent load ends.
    """
    global _gc_depth, _gc_was_enabled
    with _gc_lock:
        if _gc_depth == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_depth += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_depth -= 1
            if _gc_depth == 0 and _gc_was_enabled:
                gc.enable()


@cache
def _parser() -> Lark:
    grammar = resources.files("bastion.policy").joinpath("grammar.lark").read_text("utf-8")
    return Lark(grammar, parser="lalr", propagate_positions=True, maybe_placeholders=False)


def parse_file(path: str) -> ast.PolicyFile:
    """Read and parse one ``.policy`` file."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(
            [Diagnostic(path, 1, 1, f"cannot read policy file: {exc}", code="io")]
        ) from None
    return parse_source(text, path)


def parse_source(text: str, path: str = "<string>") -> ast.PolicyFile:
    """Parse policy text. Raises PolicyError with every diagnostic it can find."""
    if "\x00" in text:
        line = text[: text.index("\x00")].count("\n") + 1
        raise PolicyError([Diagnostic(path, line, 1, "NUL byte in policy text", code="syntax")])
    text = text.removeprefix("\ufeff")
    with gc_paused():
        fast = _parse_fast(text, path)
        if fast is not None:
            return fast
        return _parse_exact(text, path)


def _parse_exact(text: str, path: str) -> ast.PolicyFile:
    """The lark path: authoritative for every diagnostic and every span."""
    try:
        tree = _parser().parse(text)
    except UnexpectedInput as exc:
        raise PolicyError(_recover(text, path, exc)) from None
    builder = _Builder(path)
    try:
        pf = builder.file(tree)
    except _Cut as cut:
        builder.diags.append(cut.diag)
        pf = None
    if builder.diags or pf is None:
        raise PolicyError(builder.diags)
    return ast.PolicyFile(
        path=pf.path,
        name=pf.name,
        annotations=pf.annotations,
        statements=pf.statements,
        comments=_comments(text),
        header_span=pf.header_span,
    )


# ---- syntax errors -----------------------------------------------------------


def _describe_expected(expected: set[str] | frozenset[str]) -> str:
    parser = _parser()
    names: list[str] = []
    for term in sorted(expected):
        if term in _TOKEN_NAMES:
            names.append(_TOKEN_NAMES[term])
            continue
        try:
            pattern = parser.get_terminal(term).pattern
        except KeyError:
            names.append(term)
            continue
        names.append(f"'{pattern.value}'" if pattern.type == "str" else term.lower())
    names = sorted(set(names))
    if len(names) > 8:
        return ", ".join(names[:8]) + ", ..."
    return ", ".join(names)


def _syntax_diag(path: str, exc: UnexpectedInput, line_offset: int = 0) -> Diagnostic:
    line = (exc.line if exc.line and exc.line > 0 else 1) + line_offset
    col = exc.column if exc.column and exc.column > 0 else 1
    if isinstance(exc, UnexpectedCharacters):
        ch = exc.char
        msg = f"unexpected character {ch!r}"
        if ch in "\"'":
            msg = "unterminated string"
    elif isinstance(exc, UnexpectedEOF):
        msg = "unexpected end of file"
        if exc.expected:
            msg += f", expected {_describe_expected(set(exc.expected))}"
    elif isinstance(exc, UnexpectedToken):
        tok = exc.token
        shown = "end of file" if tok.type == "$END" else repr(str(tok))
        msg = f"unexpected {shown}"
        if exc.expected:
            msg += f", expected {_describe_expected(set(exc.expected))}"
        if tok.type != "$END":
            line = (tok.line or line - line_offset) + line_offset
            col = tok.column or col
        else:
            # Point at the end of the text rather than at a phantom position.
            pass
    else:  # pragma: no cover - lark has no other UnexpectedInput kinds
        msg = str(exc)
    return Diagnostic(path, line, col, msg, code="syntax")


def _recover(text: str, path: str, first: UnexpectedInput) -> list[Diagnostic]:
    """Parse statement by statement to report every broken statement."""
    lines = text.split("\n")
    starts: list[int] = []
    prev_annotation = False
    for i, raw in enumerate(lines):
        if _STATEMENT_START.match(raw):
            is_annotation = raw.lstrip().startswith("@")
            # A rule keeps the annotation lines just above it.
            if not (prev_annotation and not is_annotation):
                starts.append(i)
            prev_annotation = is_annotation
        elif raw.strip() and not raw.lstrip().startswith(("#", "//")):
            prev_annotation = False
    diags: list[Diagnostic] = []
    if not starts or starts[0] != 0:
        starts.insert(0, 0)
    bounds = [*starts, len(lines)]
    for a, b in itertools.pairwise(bounds):
        chunk = "\n".join(lines[a:b])
        if not chunk.strip():
            continue
        # Leading newlines keep every position in the piece true to the file.
        padded = "\n" * a + chunk
        try:
            tree = _parser().parse(padded)
        except UnexpectedInput as exc:
            d = _syntax_diag(path, exc)
            if b < len(lines) and d.message.startswith("unexpected end of file"):
                d = replace(
                    d,
                    message="incomplete statement"
                    + d.message.removeprefix("unexpected end of file"),
                )
            diags.append(d)
            continue
        builder = _Builder(path)
        try:
            builder.file(tree)
        except _Cut as cut:
            builder.diags.append(cut.diag)
        diags.extend(builder.diags)
    if not diags:
        diags.append(_syntax_diag(path, first))
    return diags


def _comments(text: str) -> tuple[ast.Comment, ...]:
    out: list[ast.Comment] = []
    if "#" not in text and "//" not in text:
        return ()
    for n, line in enumerate(text.split("\n"), start=1):
        if "#" not in line and "//" not in line:
            continue
        quote: str | None = None
        i = 0
        while i < len(line):
            c = line[i]
            if quote:
                if c == "\\":
                    i += 2
                    continue
                if c == quote:
                    quote = None
            elif c in "\"'":
                quote = c
            elif c == "#" or line.startswith("//", i):
                out.append(ast.Comment(line[i:].rstrip(), n, i + 1))
                break
            i += 1
    return tuple(out)


# ---- tree -> AST -------------------------------------------------------------

_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'", "0": "\0"}


def unquote(raw: str) -> str:
    """Decode a string literal. Unknown escapes keep their backslash (so ``"\\d"`` is a regex ``\\d``)."""
    body = raw[1:-1]
    if "\\" not in body:
        return body
    out: list[str] = []
    i = 0
    while i < len(body):
        c = body[i]
        if c != "\\" or i + 1 >= len(body):
            out.append(c)
            i += 1
            continue
        nxt = body[i + 1]
        if nxt in _ESCAPES:
            out.append(_ESCAPES[nxt])
            i += 2
        elif nxt == "u" and re.fullmatch(r"[0-9a-fA-F]{4}", body[i + 2 : i + 6]):
            out.append(chr(int(body[i + 2 : i + 6], 16)))
            i += 6
        else:
            out.append("\\" + nxt)
            i += 2
    return "".join(out)


def _number(raw: str) -> int | float:
    if re.fullmatch(r"-?[0-9]+", raw):
        return int(raw)
    return float(raw)


class _Builder:
    def __init__(self, path: str) -> None:
        self.path = path
        self.diags: list[Diagnostic] = []

    # -- positions
    def span(self, node: Tree[Any] | Token) -> ast.Span:
        if isinstance(node, Token):
            line = node.line or 1
            col = node.column or 1
            end_line = node.end_line or line
            end_col = node.end_column or col
            return ast.Span(self.path, line, col, end_line, end_col)
        meta = node.meta
        if getattr(meta, "empty", True):
            return ast.Span(self.path, 1, 1)
        return ast.Span(self.path, meta.line, meta.column, meta.end_line, meta.end_column)

    def error(self, where: ast.Span, message: str, code: str = "semantic") -> None:
        self.diags.append(
            Diagnostic(
                self.path,
                where.line,
                where.col,
                message,
                code=code,
                end_line=where.end_line,
                end_col=where.end_col,
            )
        )

    # -- file
    def file(self, tree: Tree[Any]) -> ast.PolicyFile:
        name: str | None = None
        annotations: tuple[ast.Annotation, ...] = ()
        header_span: ast.Span | None = None
        statements: list[ast.Statement] = []
        for child in tree.children:
            if isinstance(child, Tree) and child.data == "header":
                anns_tree, name_tok = child.children
                annotations = self.annotations(anns_tree)
                name = unquote(str(name_tok))
                header_span = self.span(child)
                for a in annotations:
                    if a.name == "id":
                        self.error(a.span, "@id names a rule, not a policy file")
                continue
            stmt = self.statement(child)
            if stmt is not None:
                statements.append(stmt)
        return ast.PolicyFile(
            self.path, name, annotations, tuple(statements), header_span=header_span
        )

    def statement(self, node: Tree[Any] | Token) -> ast.Statement | None:
        if not isinstance(node, Tree):
            return None
        try:
            handler = getattr(self, "st_" + str(node.data))
        except AttributeError:  # pragma: no cover - the grammar has no other statements
            self.error(self.span(node), f"unsupported statement {node.data}")
            return None
        try:
            result: ast.Statement = handler(node)
        except _Cut as cut:
            self.diags.append(cut.diag)
            return None
        return result

    def st_include(self, node: Tree[Any]) -> ast.Include:
        (tok,) = node.children
        return ast.Include(unquote(str(tok)), self.span(node))

    def st_default(self, node: Tree[Any]) -> ast.Default:
        kind_tok, effect_tok = node.children
        kind, effect = str(kind_tok), str(effect_tok)
        allowed = DEFAULT_EFFECTS[kind]
        if effect not in allowed:
            self.error(
                self.span(effect_tok),
                f"'default {kind}' takes one of {', '.join(sorted(allowed))}, not {effect!r}",
            )
        if effect == "forbid":
            effect = "deny"
        return ast.Default(kind, effect, self.span(node))

    def st_set_decl(self, node: Tree[Any]) -> ast.SetDecl:
        kind_tok, name_tok, list_tree = node.children
        items: list[ast.Lit] = []
        for item in list_tree.children:
            expr = self.expr(item)
            if not isinstance(expr, ast.Lit) or expr.value is None:
                self.error(expr.span, "set items must be literals")
                continue
            if kind_tok in ("tools", "models") and not isinstance(expr.value, str):
                self.error(expr.span, f"{kind_tok} sets hold name patterns (strings)")
                continue
            items.append(expr)
        return ast.SetDecl(str(kind_tok), str(name_tok), tuple(items), self.span(node))

    def annotations(self, node: Tree[Any]) -> tuple[ast.Annotation, ...]:
        out: list[ast.Annotation] = []
        for ann in node.children:
            name_tok, *arg_nodes = ann.children
            args: list[str | int | float | bool | None] = []
            for a in arg_nodes:
                if a is None:
                    continue
                lit = self.expr(a)
                assert isinstance(lit, ast.Lit)
                args.append(lit.value)
            span = self.span(ann)
            name = str(name_tok)
            if name not in KNOWN_ANNOTATIONS:
                self.error(span, f"unknown annotation @{name} (known: @id, @mode)")
            elif len(args) != KNOWN_ANNOTATIONS[name] or not isinstance(args[0], str):
                self.error(span, f"@{name} takes one string argument")
            elif name == "mode" and args[0] not in MODES:
                self.error(span, f'@mode takes "shadow" or "enforce", not {args[0]!r}')
            elif name == "id" and not str(args[0]).strip():
                self.error(span, "@id must not be empty")
            out.append(ast.Annotation(name, tuple(args), span))
        seen: set[str] = set()
        for a in out:
            if a.name in seen:
                self.error(a.span, f"@{a.name} given twice")
            seen.add(a.name)
        return tuple(out)

    def target(self, node: Tree[Any], fallback: ast.Span) -> ast.Target:
        span = self.span(node) if not getattr(node.meta, "empty", True) else fallback
        if node.data == "target_pattern":
            return ast.Target(patterns=(unquote(str(node.children[0])),), span=span)
        if node.data == "target_set":
            return ast.Target(set_name=str(node.children[0]), span=span)
        if node.data == "target_list":
            pats: list[str] = []
            for item in node.children[0].children:
                expr = self.expr(item)
                if isinstance(expr, ast.Lit) and isinstance(expr.value, str):
                    pats.append(expr.value)
                else:
                    self.error(
                        self.span(item) if isinstance(item, (Tree, Token)) else span,
                        "a target list holds name patterns (strings)",
                    )
            if not pats:
                self.error(span, "a target list must not be empty")
            return ast.Target(patterns=tuple(pats), is_list=True, span=span)
        return ast.Target(span=span)

    def clauses(self, kind: str, nodes: list[Tree[Any]]) -> dict[str, Any]:
        allowed = CLAUSES_BY_KIND[kind]
        out: dict[str, Any] = {"when": [], "unless": []}
        for c in nodes:
            name = str(c.data).removesuffix("_clause")
            span = self.span(c)
            if name not in allowed:
                what = "limit" if kind == "limit" else f"{kind} rule"
                self.error(span, f"'{name}' does not apply to a {what}")
                continue
            (arg,) = c.children
            if name in ("when", "unless"):
                out[name].append(self.expr(arg))
                continue
            if name in out:
                self.error(span, f"'{name}' given twice")
                continue
            if name in ("reason", "route"):
                out[name] = unquote(str(arg))
            elif name in ("at", "using"):
                vals: list[str] = []
                for item in arg.children:
                    e = self.expr(item)
                    if isinstance(e, ast.Lit) and isinstance(e.value, str) and e.value:
                        vals.append(e.value)
                    else:
                        self.error(span, f"'{name}' takes a list of non-empty strings")
                out[name] = tuple(vals)
            elif name == "with":
                obj = self.value(arg)
                assert isinstance(obj, dict)
                out[name] = tuple(obj.items())
            elif name == "by":
                out[name] = self.expr(arg)
        return out

    @staticmethod
    def condition(when: list[ast.Expr], unless: list[ast.Expr], span: ast.Span) -> ast.Expr | None:
        parts: list[ast.Expr] = list(when) + [ast.Not(u, u.span) for u in unless]
        if not parts:
            return None
        if len(parts) == 1:
            return parts[0]
        return ast.And(tuple(parts), span)

    def st_rule(self, node: Tree[Any]) -> ast.Rule:
        anns_tree, effect_tok, kind_tok, target_tree, *clause_nodes = node.children
        span = self.span(node)
        effect, kind = str(effect_tok), str(kind_tok)
        annotations = self.annotations(anns_tree)
        if effect not in RULE_EFFECTS[kind]:
            good = ", ".join(sorted(RULE_EFFECTS[kind]))
            self.error(
                self.span(effect_tok), f"'{effect}' is not an effect of {kind} rules (use {good})"
            )
        target = self.target(target_tree, self.span(kind_tok))
        if kind == "context" and not target.any:
            self.error(target.span, "a context rule has no target; write its condition with 'when'")
        c = self.clauses(kind, clause_nodes)
        if "with" in c and effect != "quarantine":
            self.error(span, "'with' options apply to quarantine rules only")
        if "using" in c and effect != "redact":
            self.error(span, "'using' applies to redact rules only")
        return ast.Rule(
            effect=effect,
            kind=kind,
            target=target,
            condition=self.condition(c["when"], c["unless"], span),
            when=tuple(c["when"]),
            unless=tuple(c["unless"]),
            reason=c.get("reason"),
            route=c.get("route"),
            at=c.get("at", ()),
            using=c.get("using", ()),
            options=c.get("with", ()),
            annotations=annotations,
            span=ast.Span(
                self.path,
                self.span(effect_tok).line,
                self.span(effect_tok).col,
                span.end_line,
                span.end_col,
            ),
        )

    def st_limit_rule(self, node: Tree[Any]) -> ast.LimitRule:
        children = list(node.children)
        anns_tree = children.pop(0)
        kind_tok = children.pop(0)
        target_tree = children.pop(0)
        amount_tok = children.pop(0)
        unit = "tokens" if str(kind_tok) == "model" else "calls"
        if isinstance(children[0], Token) and children[0].type == "LIMIT_UNIT":
            unit_tok = children.pop(0)
            unit = str(unit_tok)
            if str(kind_tok) == "call" and unit == "tokens":
                self.error(self.span(unit_tok), "call limits count calls, not tokens")
        window_tok = children.pop(0)
        span = self.span(node)
        amount = _number(str(amount_tok))
        if not isinstance(amount, int) or amount < 0:
            self.error(self.span(amount_tok), "a limit is a whole number of calls or tokens")
            amount = 0
        window = str(window_tok)
        if window in WINDOW_WORDS:
            seconds = WINDOW_WORDS[window]
        else:
            seconds = int(window[:-1]) * WINDOW_UNITS[window[-1]]
        if seconds <= 0:
            self.error(self.span(window_tok), "a limit window must be longer than zero")
        c = self.clauses("limit", children)
        by = c.get("by")
        if by is not None and not isinstance(by, ast.Path):
            self.error(span, "'by' takes an attribute path such as identity.sub")
            by = None
        return ast.LimitRule(
            kind=str(kind_tok),
            target=self.target(target_tree, self.span(kind_tok)),
            amount=int(amount),
            unit=unit,
            window_seconds=seconds,
            by=by,
            condition=self.condition(c["when"], c["unless"], span),
            when=tuple(c["when"]),
            unless=tuple(c["unless"]),
            reason=c.get("reason"),
            annotations=self.annotations(anns_tree),
            span=span,
        )

    # -- values in `with {...}` (plain JSON-like data)
    def value(self, node: Tree[Any] | Token) -> Any:
        if isinstance(node, Token):
            if node.type == "STRING":
                return unquote(str(node))
            if node.type == "NUMBER":
                return _number(str(node))
            return str(node)
        d = node.data
        if d == "string":
            return unquote(str(node.children[0]))
        if d == "number":
            return _number(str(node.children[0]))
        if d in ("true", "false"):
            return d == "true"
        if d == "null":
            return None
        if d == "array_value":
            return [self.value(c) for c in node.children if c is not None]
        if d == "object_lit":
            out: dict[str, Any] = {}
            for pair in node.children:
                if pair is None:
                    continue
                key_tok, val = pair.children
                assert isinstance(key_tok, Token)
                key = unquote(str(key_tok)) if key_tok.type == "STRING" else str(key_tok)
                if key in out:
                    raise _Cut(
                        Diagnostic(
                            self.path,
                            key_tok.line or 1,
                            key_tok.column or 1,
                            f"duplicate key {key!r}",
                        )
                    )
                out[key] = self.value(val)
            return out
        raise _Cut(Diagnostic(self.path, *self._pos(node), f"unexpected {d} in a 'with' object"))

    def _pos(self, node: Tree[Any]) -> tuple[int, int]:
        s = self.span(node)
        return s.line, s.col

    # -- expressions
    def _flatten(self, node: Tree[Any], data: str) -> tuple[ast.Expr, ...]:
        # The grammar is left-recursive; a chain a or b or c becomes one Or.
        out: list[ast.Expr] = []
        stack: list[Tree[Any] | Token] = [node]
        while stack:
            n = stack.pop()
            if isinstance(n, Tree) and n.data == data:
                stack.extend(reversed(n.children))
            else:
                out.append(self.expr(n))
        return tuple(out)

    def expr(self, node: Tree[Any] | Token) -> ast.Expr:
        if isinstance(node, Token):
            span = self.span(node)
            if node.type == "STRING":
                return ast.Lit(unquote(str(node)), span)
            if node.type == "NUMBER":
                return ast.Lit(_number(str(node)), span)
            raise _Cut(Diagnostic(self.path, span.line, span.col, f"unexpected {str(node)!r}"))
        span = self.span(node)
        d = node.data
        ch = node.children
        if d == "string":
            return ast.Lit(unquote(str(ch[0])), span)
        if d == "number":
            return ast.Lit(_number(str(ch[0])), span)
        if d == "true":
            return ast.Lit(True, span)
        if d == "false":
            return ast.Lit(False, span)
        if d == "null":
            return ast.Lit(None, span)
        if d == "list_lit":
            return ast.ListExpr(tuple(self.expr(c) for c in ch if c is not None), span)
        if d == "path":
            root = str(ch[0])
            parts: list[str | int] = []
            for p in ch[1:]:
                assert isinstance(p, Token)
                if p.type == "INT":
                    parts.append(int(str(p)))
                elif p.type == "STRING":
                    parts.append(unquote(str(p)))
                else:
                    parts.append(str(p))
            if root not in ast.ROOTS:
                if parts:
                    roots = ", ".join(sorted(ast.ROOTS))
                    raise _Cut(
                        Diagnostic(
                            self.path,
                            span.line,
                            span.col,
                            f"unknown root {root!r}: a path starts with one of {roots}",
                        )
                    )
                return ast.SetRef(root, span)
            return ast.Path(root, tuple(parts), span)
        if d == "concat":
            return ast.Concat(self._flatten(node, "concat"), span)
        if d == "compare":
            left, op_tok, right = ch
            op = str(op_tok)
            r = self.expr(right)
            if op in ("matches", "like") and not (
                isinstance(r, ast.Lit) and isinstance(r.value, str)
            ):
                raise _Cut(
                    Diagnostic(
                        self.path, r.span.line, r.span.col, f"'{op}' takes a string literal pattern"
                    )
                )
            return ast.Compare(op, self.expr(left), r, span)  # type: ignore[arg-type]
        if d == "not_in":
            left, right = ch
            return ast.Compare("not in", self.expr(left), self.expr(right), span)
        if d == "from_":
            value, src = ch
            return ast.From(self.expr(value), str(src), span)  # type: ignore[arg-type]
        if d == "not_":
            return ast.Not(self.expr(ch[0]), span)
        if d == "and_":
            return ast.And(self._flatten(node, "and_"), span)
        if d == "or_":
            return ast.Or(self._flatten(node, "or_"), span)
        raise _Cut(Diagnostic(self.path, span.line, span.col, f"unsupported expression {d}"))


# ---- the fast path -----------------------------------------------------------
#
# Loading a large policy with lark costs seconds (its parse tree, then a walk
# over it). Valid files, which is nearly every load, go through this
# hand-written recursive descent instead: one regex pass for the tokens, the
# AST built directly, every span computed exactly as lark's propagated
# positions give it (a node runs from its first to its last token, keywords
# included; parentheses belong to the parent's span, not the node's). Anything
# it is not sure of (a syntax or semantic error, a reserved word used as a
# name, an odd token) makes it give up, and the file is parsed again by lark,
# which reports the diagnostics. tests/policy/test_engine_parse.py checks that
# both paths give the same AST and spans.


class _Bail(Exception):
    """Internal: the fast path gives the file to lark."""


# Possessive: a comment must not give back its last characters as a token.
_FAST_TOKEN = re.compile(
    r"(?:[ \t\f\r\n]++|#[^\n]*+|//[^\n]*+)*+"
    r"(?:"
    r"(\"(?:[^\"\\\n]|\\.)*\"|'(?:[^'\\\n]|\\.)*')"  # 1 string
    r"|(-?[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?)"  # 2 number
    r"|([A-Za-z_][A-Za-z0-9_]*)"  # 3 word
    r"|(==|!=|<=|>=|<|>)"  # 4 comparison
    r"|([@().,\[\]{}:;=*+])"  # 5 punctuation
    r"|(\Z)"  # 6 end of text
    r")"
)
_KINDS = ("", "s", "n", "w", "cmp", "", "eof")

_EFFECT_WORDS = frozenset(
    {"allow", "forbid", "ask", "hide", "show", "trusted", "untrusted", "quarantine", "redact"}
    | {"block"}
)
_SET_KINDS = frozenset({"tools", "models", "values"})
_STATEMENT_WORDS = _EFFECT_WORDS | _SET_KINDS | {"include", "default", "limit"}
_CLAUSE_WORDS = frozenset({"when", "unless", "reason", "route", "at", "using", "with", "by"})
_COMPARE_WORDS = frozenset({"in", "has", "startswith", "endswith", "contains", "matches", "like"})
_SOURCES = frozenset({"untrusted", "user", "trusted"})
_RULE_KINDS = frozenset({"call", "tool", "result", "model", "context"})
_DEFAULT_KINDS = frozenset({"call", "result", "model", "context"})
_LIMIT_KINDS = frozenset({"call", "model"})
# Every word the grammar treats as a keyword somewhere. Where lark would read
# one of these as a name (it depends on the parser state), the fast path
# does not guess: it gives up.
_RESERVED = (
    _STATEMENT_WORDS
    | _CLAUSE_WORDS
    | _COMPARE_WORDS
    | _SOURCES
    | _RULE_KINDS
    | {"policy", "to", "per", "calls", "tokens", "or", "and", "not", "from"}
    | {"true", "false", "null"}
    | set(WINDOW_WORDS)
)
_ROOT_RESERVED = _RESERVED - ast.ROOTS
_LITERAL_WORDS = {"true": True, "false": False, "null": None}

# A parsed expression with the extent of its container (its parentheses, if any).
_Ex = tuple[ast.Expr, int, int, int, int]
# Tokens: (kind, text, line, col, end_col); kind is "s", "n", "w", "cmp", the
# punctuation itself, or "eof".
_Tok = tuple[str, str, int, int, int]


def _tokens(text: str) -> list[_Tok]:
    starts = [0]
    find = text.find
    p = find("\n")
    while p >= 0:
        starts.append(p + 1)
        p = find("\n", p + 1)
    out: list[_Tok] = []
    append = out.append
    pos = 0
    line = 1
    nlines = len(starts)
    next_start = starts[1] if nlines > 1 else len(text) + 1
    kinds = _KINDS
    for m in _FAST_TOKEN.finditer(text):
        if m.start() != pos:
            raise _Bail
        g = m.lastindex or 0
        s = m.start(g)
        while s >= next_start:
            line += 1
            next_start = starts[line] if line < nlines else len(text) + 1
        tok = m.group(g)
        col = s - starts[line - 1] + 1
        kind = kinds[g] or tok
        append((kind, tok, line, col, col + len(tok)))
        pos = m.end()
    if not out or out[-1][0] != "eof":
        raise _Bail
    return out


def _parse_fast(text: str, path: str) -> ast.PolicyFile | None:
    """The AST of a valid file, or None when lark must decide."""
    try:
        toks = _tokens(text)
        return _Fast(path, toks).file(text)
    except Exception:  # any surprise goes to the exact parser
        return None


class _Fast:
    __slots__ = ("i", "path", "toks")

    def __init__(self, path: str, toks: list[_Tok]) -> None:
        self.path = path
        self.toks = toks
        self.i = 0

    def expect(self, kind: str) -> _Tok:
        t = self.toks[self.i]
        if t[0] != kind:
            raise _Bail
        self.i += 1
        return t

    def word(self, words: frozenset[str] | None = None) -> _Tok:
        t = self.toks[self.i]
        if t[0] != "w" or (words is not None and t[1] not in words):
            raise _Bail
        self.i += 1
        return t

    def span(self, a: _Tok, b: _Tok) -> ast.Span:
        return ast.Span(self.path, a[2], a[3], b[2], b[4])

    # -- file and statements
    def file(self, text: str) -> ast.PolicyFile:
        toks = self.toks
        path = self.path
        name: str | None = None
        file_anns: tuple[ast.Annotation, ...] = ()
        header_span: ast.Span | None = None
        statements: list[ast.Statement] = []
        first = True
        while True:
            t = toks[self.i]
            k = t[0]
            if k == "eof":
                break
            anns: tuple[ast.Annotation, ...] = ()
            start = t
            if k == "@":
                anns = self.annotations()
                t = toks[self.i]
                if t[0] != "w":
                    raise _Bail
            elif k != "w":
                raise _Bail
            w = t[1]
            if w == "policy":
                if not first:
                    raise _Bail
                self.i += 1
                s = self.expect("s")
                name = unquote(s[1])
                end = s
                if toks[self.i][0] == ";":
                    end = toks[self.i]
                    self.i += 1
                if any(a.name == "id" for a in anns):
                    raise _Bail
                file_anns = anns
                header_span = ast.Span(path, start[2], start[3], end[2], end[4])
                first = False
                continue
            first = False
            if w in _EFFECT_WORDS:
                statements.append(self.rule(anns, start))
            elif w == "limit":
                statements.append(self.limit_rule(anns, start))
            elif anns:
                raise _Bail
            elif w == "include":
                self.i += 1
                s = self.expect("s")
                statements.append(ast.Include(unquote(s[1]), self.span(t, s)))
            elif w == "default":
                self.i += 1
                kt = self.word(_DEFAULT_KINDS)
                et = self.word()
                kind, effect = kt[1], et[1]
                if effect not in DEFAULT_EFFECTS[kind]:
                    raise _Bail
                if effect == "forbid":
                    effect = "deny"
                statements.append(ast.Default(kind, effect, self.span(t, et)))
            elif w in _SET_KINDS:
                self.i += 1
                nt = self.word()
                self.expect("=")
                items, close = self.list_items()
                lits: list[ast.Lit] = []
                for e in items:
                    if not isinstance(e, ast.Lit) or e.value is None:
                        raise _Bail
                    if w != "values" and not isinstance(e.value, str):
                        raise _Bail
                    lits.append(e)
                statements.append(ast.SetDecl(w, nt[1], tuple(lits), self.span(t, close)))
            else:
                raise _Bail
            if toks[self.i][0] == ";":
                self.i += 1
        return ast.PolicyFile(
            path,
            name,
            file_anns,
            tuple(statements),
            comments=_comments(text),
            header_span=header_span,
        )

    def annotations(self) -> tuple[ast.Annotation, ...]:
        toks = self.toks
        out: list[ast.Annotation] = []
        while toks[self.i][0] == "@":
            at = toks[self.i]
            self.i += 1
            name = self.word()[1]
            self.expect("(")
            args: list[str | int | float | bool | None] = []
            if toks[self.i][0] != ")":
                while True:
                    args.append(self.literal())
                    if toks[self.i][0] != ",":
                        break
                    self.i += 1
            close = self.expect(")")
            if name not in KNOWN_ANNOTATIONS:
                raise _Bail
            if len(args) != KNOWN_ANNOTATIONS[name] or not isinstance(args[0], str):
                raise _Bail
            if name == "mode" and args[0] not in MODES:
                raise _Bail
            if name == "id" and not args[0].strip():
                raise _Bail
            if any(a.name == name for a in out):
                raise _Bail
            out.append(ast.Annotation(name, tuple(args), self.span(at, close)))
        return tuple(out)

    def literal(self) -> str | int | float | bool | None:
        t = self.toks[self.i]
        self.i += 1
        k = t[0]
        if k == "s":
            return unquote(t[1])
        if k == "n":
            return _number(t[1])
        if k == "w" and t[1] in _LITERAL_WORDS:
            return _LITERAL_WORDS[t[1]]
        raise _Bail

    def target(self, kind_tok: _Tok, limit: bool) -> tuple[ast.Target, _Tok | None]:
        t = self.toks[self.i]
        k = t[0]
        if k == "s":
            self.i += 1
            return ast.Target(patterns=(unquote(t[1]),), span=self.span(t, t)), t
        if k == "[":
            items, close = self.list_items()
            pats: list[str] = []
            for e in items:
                if not isinstance(e, ast.Lit) or not isinstance(e.value, str):
                    raise _Bail
                pats.append(e.value)
            if not pats:
                raise _Bail
            return ast.Target(patterns=tuple(pats), is_list=True, span=self.span(t, close)), close
        if k == "*":
            self.i += 1
            return ast.Target(span=self.span(t, t)), t
        if k == "w":
            w = t[1]
            if limit:
                if w != "to":
                    if w in _RESERVED:
                        raise _Bail
                    self.i += 1
                    return ast.Target(set_name=w, span=self.span(t, t)), t
            elif w not in _STATEMENT_WORDS and w not in _CLAUSE_WORDS:
                if w in _RESERVED:
                    raise _Bail
                self.i += 1
                return ast.Target(set_name=w, span=self.span(t, t)), t
        return ast.Target(span=self.span(kind_tok, kind_tok)), None

    def clauses(self, kind: str, out: dict[str, Any]) -> tuple[int, int] | None:
        """Parse clauses into ``out``; returns the end (line, col) of the last one."""
        toks = self.toks
        allowed = CLAUSES_BY_KIND[kind]
        end: tuple[int, int] | None = None
        while True:
            t = toks[self.i]
            if t[0] != "w" or t[1] not in _CLAUSE_WORDS:
                return end
            name = t[1]
            if name not in allowed:
                raise _Bail
            self.i += 1
            if name in ("when", "unless"):
                e = self.expr()
                out[name].append(e[0])
                end = (e[3], e[4])
                continue
            if name in out:
                raise _Bail
            if name in ("reason", "route"):
                s = self.expect("s")
                out[name] = unquote(s[1])
                end = (s[2], s[4])
            elif name in ("at", "using"):
                items, close = self.list_items()
                vals: list[str] = []
                for e2 in items:
                    if not (isinstance(e2, ast.Lit) and isinstance(e2.value, str) and e2.value):
                        raise _Bail
                    vals.append(e2.value)
                out[name] = tuple(vals)
                end = (close[2], close[4])
            elif name == "with":
                obj, close = self.object()
                out[name] = tuple(obj.items())
                end = (close[2], close[4])
            else:  # by
                if toks[self.i][0] != "w":
                    raise _Bail
                p = self.atom()
                if not isinstance(p[0], ast.Path):
                    raise _Bail
                out[name] = p[0]
                end = (p[3], p[4])

    def rule(self, anns: tuple[ast.Annotation, ...], start: _Tok) -> ast.Rule:
        et = self.word(_EFFECT_WORDS)
        kt = self.word(_RULE_KINDS)
        effect, kind = et[1], kt[1]
        if effect not in RULE_EFFECTS[kind]:
            raise _Bail
        target, tend = self.target(kt, limit=False)
        if kind == "context" and not target.any:
            raise _Bail
        c: dict[str, Any] = {"when": [], "unless": []}
        cend = self.clauses(kind, c)
        if cend is not None:
            end_line, end_col = cend
        elif tend is not None:
            end_line, end_col = tend[2], tend[4]
        else:
            end_line, end_col = kt[2], kt[4]
        if "with" in c and effect != "quarantine":
            raise _Bail
        if "using" in c and effect != "redact":
            raise _Bail
        path = self.path
        full = ast.Span(path, start[2], start[3], end_line, end_col)
        return ast.Rule(
            effect=effect,
            kind=kind,
            target=target,
            condition=_Builder.condition(c["when"], c["unless"], full),
            when=tuple(c["when"]),
            unless=tuple(c["unless"]),
            reason=c.get("reason"),
            route=c.get("route"),
            at=c.get("at", ()),
            using=c.get("using", ()),
            options=c.get("with", ()),
            annotations=anns,
            span=ast.Span(path, et[2], et[3], end_line, end_col),
        )

    def limit_rule(self, anns: tuple[ast.Annotation, ...], start: _Tok) -> ast.LimitRule:
        toks = self.toks
        self.word()  # limit
        kt = self.word(_LIMIT_KINDS)
        kind = kt[1]
        target, _ = self.target(kt, limit=True)
        self.word(frozenset({"to"}))
        amount_tok = self.expect("n")
        unit = "tokens" if kind == "model" else "calls"
        t = toks[self.i]
        if t[0] == "w" and t[1] in ("calls", "tokens"):
            unit = t[1]
            if kind == "call" and unit == "tokens":
                raise _Bail
            self.i += 1
        self.word(frozenset({"per"}))
        t = toks[self.i]
        if t[0] == "w" and t[1] in WINDOW_WORDS:
            seconds = WINDOW_WORDS[t[1]]
            wend = t
            self.i += 1
        elif t[0] == "n":
            u = toks[self.i + 1]
            if not (
                t[1].isdigit()
                and t[1].isascii()
                and u[0] == "w"
                and u[1] in WINDOW_UNITS
                and u[2] == t[2]
                and u[3] == t[4]
            ):
                raise _Bail
            seconds = int(t[1]) * WINDOW_UNITS[u[1]]
            wend = u
            self.i += 2
        else:
            raise _Bail
        if seconds <= 0:
            raise _Bail
        amount = _number(amount_tok[1])
        if not isinstance(amount, int) or amount < 0:
            raise _Bail
        c: dict[str, Any] = {"when": [], "unless": []}
        cend = self.clauses("limit", c)
        end_line, end_col = cend if cend is not None else (wend[2], wend[4])
        span = ast.Span(self.path, start[2], start[3], end_line, end_col)
        return ast.LimitRule(
            kind=kind,
            target=target,
            amount=amount,
            unit=unit,
            window_seconds=seconds,
            by=c.get("by"),
            condition=_Builder.condition(c["when"], c["unless"], span),
            when=tuple(c["when"]),
            unless=tuple(c["unless"]),
            reason=c.get("reason"),
            annotations=anns,
            span=span,
        )

    # -- data
    def list_items(self) -> tuple[list[ast.Expr], _Tok]:
        toks = self.toks
        self.expect("[")
        items: list[ast.Expr] = []
        if toks[self.i][0] != "]":
            while True:
                items.append(self.expr()[0])
                if toks[self.i][0] != ",":
                    break
                self.i += 1
                if toks[self.i][0] == "]":
                    break
        return items, self.expect("]")

    def object(self) -> tuple[dict[str, Any], _Tok]:
        toks = self.toks
        self.expect("{")
        out: dict[str, Any] = {}
        if toks[self.i][0] != "}":
            while True:
                kt = toks[self.i]
                if kt[0] == "s":
                    key = unquote(kt[1])
                elif kt[0] == "w":
                    key = kt[1]
                else:
                    raise _Bail
                self.i += 1
                self.expect(":")
                if key in out:
                    raise _Bail
                out[key] = self.value()
                if toks[self.i][0] != ",":
                    break
                self.i += 1
                if toks[self.i][0] == "}":
                    break
        return out, self.expect("}")

    def value(self) -> Any:
        toks = self.toks
        t = toks[self.i]
        k = t[0]
        if k == "{":
            return self.object()[0]
        if k == "[":
            self.i += 1
            out: list[Any] = []
            if toks[self.i][0] != "]":
                while True:
                    out.append(self.value())
                    if toks[self.i][0] != ",":
                        break
                    self.i += 1
                    if toks[self.i][0] == "]":
                        break
            self.expect("]")
            return out
        return self.literal()

    # -- expressions: each returns (node, container line, col, end line, end col)
    def expr(self) -> _Ex:
        return self._chain("or", self.and_, ast.Or)

    def and_(self) -> _Ex:
        return self._chain("and", self.not_, ast.And)

    def _chain(
        self, word: str, operand: Callable[[], _Ex], node: type[ast.Or] | type[ast.And]
    ) -> _Ex:
        """Operands joined by ``word`` (``or``/``and``), flattened into one ``node``."""
        first = operand()
        toks = self.toks
        t = toks[self.i]
        if t[0] != "w" or t[1] != word:
            return first
        parts = [first]
        while t[0] == "w" and t[1] == word:
            self.i += 1
            parts.append(operand())
            t = toks[self.i]
        items: list[ast.Expr] = []
        for p in parts:
            if type(p[0]) is node:
                items.extend(p[0].items)
            else:
                items.append(p[0])
        last = parts[-1]
        span = ast.Span(self.path, first[1], first[2], last[3], last[4])
        return node(tuple(items), span), first[1], first[2], last[3], last[4]

    def not_(self) -> _Ex:
        t = self.toks[self.i]
        if t[0] == "w" and t[1] == "not":
            self.i += 1
            inner = self.not_()
            span = ast.Span(self.path, t[2], t[3], inner[3], inner[4])
            return ast.Not(inner[0], span), t[2], t[3], inner[3], inner[4]
        return self.comparison()

    def comparison(self) -> _Ex:
        left = self.sum()
        toks = self.toks
        t = toks[self.i]
        k = t[0]
        if k == "cmp" or (k == "w" and t[1] in _COMPARE_WORDS):
            op = t[1]
            self.i += 1
            right = self.sum()
            r = right[0]
            if op in ("matches", "like") and not (
                isinstance(r, ast.Lit) and isinstance(r.value, str)
            ):
                raise _Bail
            span = ast.Span(self.path, left[1], left[2], right[3], right[4])
            node: ast.Expr = ast.Compare(op, left[0], r, span)  # type: ignore[arg-type]
            return node, left[1], left[2], right[3], right[4]
        if k != "w":
            return left
        if t[1] == "not":
            self.i += 1
            self.word(frozenset({"in"}))
            right = self.sum()
            span = ast.Span(self.path, left[1], left[2], right[3], right[4])
            node = ast.Compare("not in", left[0], right[0], span)
            return node, left[1], left[2], right[3], right[4]
        if t[1] == "from":
            self.i += 1
            s = self.word(_SOURCES)
            span = ast.Span(self.path, left[1], left[2], s[2], s[4])
            node = ast.From(left[0], s[1], span)  # type: ignore[arg-type]
            return node, left[1], left[2], s[2], s[4]
        return left

    def sum(self) -> _Ex:
        first = self.atom()
        toks = self.toks
        if toks[self.i][0] != "+":
            return first
        parts = [first]
        while toks[self.i][0] == "+":
            self.i += 1
            parts.append(self.atom())
        items: list[ast.Expr] = []
        for p in parts:
            if type(p[0]) is ast.Concat:
                items.extend(p[0].items)
            else:
                items.append(p[0])
        last = parts[-1]
        span = ast.Span(self.path, first[1], first[2], last[3], last[4])
        return ast.Concat(tuple(items), span), first[1], first[2], last[3], last[4]

    def atom(self) -> _Ex:
        toks = self.toks
        t = toks[self.i]
        k = t[0]
        line, col = t[2], t[3]
        if k == "w":
            w = t[1]
            if w in _LITERAL_WORDS:
                self.i += 1
                return ast.Lit(_LITERAL_WORDS[w], self.span(t, t)), line, col, line, t[4]
            if w in _ROOT_RESERVED:
                raise _Bail
            return self.path_expr()
        if k == "s":
            self.i += 1
            return ast.Lit(unquote(t[1]), self.span(t, t)), line, col, line, t[4]
        if k == "n":
            self.i += 1
            return ast.Lit(_number(t[1]), self.span(t, t)), line, col, line, t[4]
        if k == "[":
            items, close = self.list_items()
            span = self.span(t, close)
            return ast.ListExpr(tuple(items), span), line, col, close[2], close[4]
        if k == "(":
            self.i += 1
            inner = self.expr()
            close = self.expect(")")
            return inner[0], line, col, close[2], close[4]
        raise _Bail

    def path_expr(self) -> _Ex:
        toks = self.toks
        root = toks[self.i]
        self.i += 1
        end = root
        parts: list[str | int] = []
        while True:
            t = toks[self.i]
            k = t[0]
            if k == ".":
                self.i += 1
                end = self.word()
                parts.append(end[1])
            elif k == "[":
                self.i += 1
                x = toks[self.i]
                if x[0] == "s":
                    parts.append(unquote(x[1]))
                elif x[0] == "n" and x[1].isdigit() and x[1].isascii():
                    parts.append(int(x[1]))
                else:
                    raise _Bail
                self.i += 1
                end = self.expect("]")
            else:
                break
        span = self.span(root, end)
        name = root[1]
        if name not in ast.ROOTS:
            if parts:
                raise _Bail
            return ast.SetRef(name, span), root[2], root[3], end[2], end[4]
        return ast.Path(name, tuple(parts), span), root[2], root[3], end[2], end[4]
