"""AST -> decision tree: rule indexes and compiled conditions.

Compilation, not interpretation. For every event kind, rules are indexed by
exact target name (a dict) and by glob (a prefix trie over each glob's literal
prefix, each hit confirmed by a linear glob match); the candidate list for a
concrete name is computed once and memoized in a bounded cache.

Conditions are turned into Python source, generated from the AST only (names,
keys and string literals go through ``repr``; other constants are bound as
globals of the generated module), and compiled with ``compile``/``exec`` once
per policy. Identical conditions share one function. The conjuncts of a
condition that read only ``identity.*`` are split off and evaluated once per
identity; a repeat identity skips them. So deciding costs a few dict lookups
plus the candidates' remaining conditions, whatever the total rule count.

The same module holds the slow path used for ``explain=True`` and for the
visibility candidates whose argument conditions cannot be settled statically
(partial evaluation with the arguments unknown): an AST walker over the same
operator functions, so both paths share one definition of every operator.
``tests/policy/reference.py`` is an independent interpreter, and the
differential test checks the two agree.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

from bastion.events import (
    EMPTY_CONTEXT,
    Decision,
    Effect,
    EventKind,
    Identity,
    RequestInfo,
    RuleTrace,
    ToolSpec,
    split_tool_name,
)
from bastion.policy import ast
from bastion.policy.diagnostics import Diagnostic, PolicyError
from bastion.policy.provenance import from_source
from bastion.policy.regex import Regex, RegexError, compile_regex
from bastion.policy.schema import Schema

__all__ = [
    "MISSING",
    "UNKNOWN",
    "CRule",
    "CompiledPolicy",
    "LimitHit",
    "compile_policy",
    "expr_text",
    "glob_match",
]

log = logging.getLogger("bastion.policy")

# Decisions are cached and shared between callers, so nothing in them may be mutable.
_NO_OPTIONS: Mapping[str, Any] = MappingProxyType({})


class _Sentinel:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name

    def __bool__(self) -> bool:
        return False


MISSING: Final = _Sentinel("MISSING")
"""The value of an attribute that is not there. Every comparison with it is false."""
UNKNOWN: Final = _Sentinel("UNKNOWN")
"""Partial evaluation only: a value (or truth) that depends on the unknown arguments."""

EVALUATION_ERROR = "policy evaluation error"
CANDIDATE_CACHE_SIZE = 4096
IDENTITY_CACHE_SIZE = 4096
PER_LIST_IDENTITY_CACHE = 1024
DECISION_CACHE_SIZE = 256
SPEC_VIEW_CACHE_SIZE = 2048


# ---- globs -------------------------------------------------------------------


def glob_match(pattern: str, text: str) -> bool:
    """Whole-string glob: ``*`` any run, ``?`` one character. O(len(p) x len(t)) worst case."""
    p = t = 0
    star = -1
    mark = 0
    lp, lt = len(pattern), len(text)
    while t < lt:
        if p < lp:
            c = pattern[p]
            if c == "*":
                star = p
                mark = t
                p += 1
                continue
            if c == "?" or c == text[t]:
                p += 1
                t += 1
                continue
        if star != -1:
            p = star + 1
            mark += 1
            t = mark
            continue
        return False
    while p < lp and pattern[p] == "*":
        p += 1
    return p == lp


def _literal_prefix(pattern: str) -> str:
    for i, c in enumerate(pattern):
        if c in "*?":
            return pattern[:i]
    return pattern


@dataclass(frozen=True, slots=True)
class PatternSet:
    """A ``tools``/``models`` set: membership is a glob match against its patterns."""

    name: str
    patterns: tuple[str, ...]

    def match(self, name: str) -> bool:
        return any(glob_match(p, name) for p in self.patterns)


# ---- operators (shared by the compiled code and the walker) --------------------

_LISTS = (list, tuple)


def _isnum(v: Any) -> bool:
    t = type(v)
    if t is int or t is float:
        return True
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_list(v: Any) -> bool:
    return isinstance(v, (list, tuple))


def struct_eq(a: Any, b: Any) -> bool:
    """``==``: structural; booleans never equal numbers; MISSING equals nothing."""
    if a is MISSING or b is MISSING:
        return False
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if _isnum(a):
        return _isnum(b) and a == b
    if isinstance(a, str):
        return isinstance(b, str) and a == b
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, PatternSet):
        a = a.patterns
    if isinstance(b, PatternSet):
        b = b.patterns
    if _is_list(a):
        return _is_list(b) and len(a) == len(b) and all(map(struct_eq, a, b))
    if isinstance(a, Mapping):
        if not isinstance(b, Mapping) or len(a) != len(b):
            return False
        return all(k in b and struct_eq(v, b[k]) for k, v in a.items())
    if isinstance(a, (set, frozenset)):
        return isinstance(b, (set, frozenset)) and a == b
    return False


def op_eq(a: Any, b: Any) -> bool:
    ta = type(a)
    if ta is type(b) and (ta is str or ta is int):
        return bool(a == b)
    return struct_eq(a, b)


def op_ne(a: Any, b: Any) -> bool:
    if a is MISSING or b is MISSING:
        return False
    return not op_eq(a, b)


def _ordered(a: Any, b: Any) -> bool:
    if isinstance(a, str):
        return isinstance(b, str)
    return _isnum(a) and _isnum(b)


def op_lt(a: Any, b: Any) -> bool:
    return _ordered(a, b) and bool(a < b)


def op_le(a: Any, b: Any) -> bool:
    return _ordered(a, b) and bool(a <= b)


def op_gt(a: Any, b: Any) -> bool:
    return _ordered(a, b) and bool(a > b)


def op_ge(a: Any, b: Any) -> bool:
    return _ordered(a, b) and bool(a >= b)


def op_in(x: Any, coll: Any) -> bool:
    """``x in coll`` (and ``coll has x``)."""
    tc = type(coll)
    if tc is tuple or tc is list:
        if type(x) is str:
            return x in coll
        if x is MISSING:
            return False
        return any(struct_eq(x, i) for i in coll)
    if x is MISSING or coll is MISSING:
        return False
    if isinstance(coll, PatternSet):
        return isinstance(x, str) and coll.match(x)
    if isinstance(coll, str):
        return isinstance(x, str) and x in coll
    if isinstance(coll, Mapping):
        return isinstance(x, str) and x in coll
    if isinstance(coll, (list, tuple, set, frozenset)):
        return any(struct_eq(x, i) for i in coll)
    return False


def op_not_in(x: Any, coll: Any) -> bool:
    if x is MISSING or coll is MISSING:
        return False
    if isinstance(coll, PatternSet):
        return isinstance(x, str) and not coll.match(x)
    if isinstance(coll, (str, Mapping)):
        return isinstance(x, str) and x not in coll
    if isinstance(coll, (list, tuple, set, frozenset)):
        return not any(struct_eq(x, i) for i in coll)
    return False


def op_has(coll: Any, x: Any) -> bool:
    return op_in(x, coll)


def op_contains(a: Any, b: Any) -> bool:
    if isinstance(a, str):
        return isinstance(b, str) and b in a
    if b is MISSING:
        return False
    if isinstance(a, PatternSet):
        return isinstance(b, str) and a.match(b)
    if isinstance(a, (list, tuple, set, frozenset)):
        return any(struct_eq(b, i) for i in a)
    return False


def op_startswith(a: Any, b: Any) -> bool:
    return isinstance(a, str) and isinstance(b, str) and a.startswith(b)


def op_endswith(a: Any, b: Any) -> bool:
    return isinstance(a, str) and isinstance(b, str) and a.endswith(b)


def op_matches(a: Any, rx: Regex) -> bool:
    return isinstance(a, str) and rx.search(a)


def op_like(a: Any, pattern: str) -> bool:
    return isinstance(a, str) and glob_match(pattern, a)


def concat(items: Sequence[Any]) -> Any:
    """``a + b + ...``: strings concatenate, numbers add, anything else is MISSING."""
    acc = items[0]
    if acc is MISSING:
        return MISSING
    for it in items[1:]:
        if it is MISSING:
            return MISSING
        if (isinstance(acc, str) and isinstance(it, str)) or (_isnum(acc) and _isnum(it)):
            acc = acc + it
        else:
            return MISSING
    return acc


def make_list(items: Iterable[Any]) -> list[Any]:
    return [i for i in items if i is not MISSING]


def sub(value: Any, parts: tuple[str | int, ...]) -> Any:
    """Walk ``.name``, ``["key"]`` and ``[index]`` steps; anything absent is MISSING."""
    for p in parts:
        if value is MISSING:
            return MISSING
        if type(p) is int:
            if isinstance(value, (list, tuple)) and 0 <= p < len(value):
                value = value[p]
            else:
                return MISSING
        elif isinstance(value, Mapping):
            value = value.get(p, MISSING)
        else:
            return MISSING
    return value


_COMPARE_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "==": op_eq,
    "!=": op_ne,
    "<": op_lt,
    "<=": op_le,
    ">": op_gt,
    ">=": op_ge,
    "in": op_in,
    "not in": op_not_in,
    "has": op_has,
    "contains": op_contains,
    "startswith": op_startswith,
    "endswith": op_endswith,
}


# ---- environments ----------------------------------------------------------------

_IDENTITY_FIELDS = {
    "sub": "subject",
    "subject": "subject",
    "groups": "groups",
    "roles": "roles",
    "email": "email",
    "tenant": "tenant",
    "key_id": "key_id",
    "issuer": "issuer",
    "scopes": "scopes",
    "auth_method": "auth_method",
    "anonymous": "anonymous",
}
_CONTEXT_FIELDS = ("tainted", "taint_sources", "session", "turn", "user_text")
_REQUEST_FIELDS = ("method", "path", "client", "protocol", "id")

# Which roots each kind of rule can read; any other root is MISSING there.
_ROOTS_BY_KIND: dict[str, frozenset[str]] = {
    "call": frozenset({"identity", "args", "tool", "context", "request", "destinations"}),
    "tool": frozenset({"identity", "args", "tool", "context", "request", "destinations"}),
    "limit-call": frozenset({"identity", "args", "tool", "context", "request", "destinations"}),
    "result": frozenset(
        {"identity", "args", "tool", "context", "request", "destinations", "result"}
    ),
    "model": frozenset({"identity", "context", "request", "model"}),
    "limit-model": frozenset({"identity", "context", "request", "model"}),
    "context": frozenset({"identity", "request"}),
}


def identity_attr(identity: Identity, name: str) -> Any:
    f = _IDENTITY_FIELDS.get(name)
    if f is not None:
        return getattr(identity, f)
    return identity.attributes.get(name, MISSING)


def identity_obj(identity: Identity) -> dict[str, Any]:
    out = dict(identity.attributes)
    for k, f in _IDENTITY_FIELDS.items():
        out[k] = getattr(identity, f)
    return out


def context_attr(context: Any, name: str) -> Any:
    if name == "tainted":
        return context.tainted
    if name == "taint_sources":
        return sorted(context.taint_sources)
    if name == "session":
        return context.session
    if name == "turn":
        return context.turn
    if name == "user_text":
        return context.user_text
    return context.attributes.get(name, MISSING)


def context_obj(context: Any) -> dict[str, Any]:
    out = dict(context.attributes)
    for k in _CONTEXT_FIELDS:
        out[k] = context_attr(context, k)
    return out


def request_attr(request: RequestInfo | None, name: str) -> Any:
    if request is None:
        return MISSING
    if name == "headers":
        return {str(k).lower(): v for k, v in request.headers.items()}
    if name in _REQUEST_FIELDS:
        return getattr(request, name)
    return MISSING


def request_obj(request: RequestInfo | None) -> Any:
    if request is None:
        return MISSING
    out = {k: getattr(request, k) for k in _REQUEST_FIELDS}
    out["headers"] = request_attr(request, "headers")
    return out


def destinations(tool_view: Mapping[str, Any], args: Mapping[str, Any]) -> list[Any]:
    """The values of the arguments the schema marks as destinations (lists flattened)."""
    out: list[Any] = []
    for name in tool_view.get("destinations", ()):
        v = sub(args, tuple(str(name).split(".")))
        if v is MISSING:
            continue
        if isinstance(v, (list, tuple)):
            out.extend(x for x in v if x is not MISSING)
        else:
            out.append(v)
    return out


def tool_view(tool: str | ToolSpec, schema: Schema | None) -> dict[str, Any]:
    """What ``tool.*`` reads: name, server, description, schema effect and destinations, annotations."""
    if isinstance(tool, str):
        name, server, description, annotations = tool, split_tool_name(tool)[0], None, {}
    else:
        name = tool.name
        server = tool.server if tool.server is not None else split_tool_name(tool.name)[0]
        description = tool.description
        annotations = dict(tool.annotations)
    view: dict[str, Any] = {}
    decl = schema.tool(name) if schema is not None else None
    if decl is not None:
        annotations.update(decl.annotations)  # the administrator's declaration wins
        if description is None or description == "":
            description = decl.description
        if decl.effect is not None:
            view["effect"] = decl.effect
        view["destinations"] = list(decl.destinations)
    for k, v in annotations.items():
        view[k] = v
    view["annotations"] = annotations
    view["name"] = name
    view["server"] = server
    if description is not None:
        view["description"] = description
    return view


def model_view(model: Any) -> dict[str, Any]:
    if isinstance(model, str):
        return {"name": model}
    return {
        "name": model.name,
        "provider": model.provider,
        "protocol": model.protocol,
        "max_tokens": model.max_tokens,
    }


def result_text(content: Any) -> str:
    """The text of a tool's output: strings as is, MCP/Anthropic content blocks joined, else JSON."""
    if isinstance(content, str):
        return content
    if isinstance(content, Mapping):
        if isinstance(content.get("text"), str):
            return str(content["text"])
        if "content" in content:
            return result_text(content["content"])
    if isinstance(content, (list, tuple)):
        parts = [result_text(c) for c in content]
        return "\n".join(p for p in parts if p)
    if content is None:
        return ""
    return json.dumps(content, sort_keys=True, default=str)


def _result_parts(result: Any) -> tuple[Any, bool]:
    if hasattr(result, "call_id"):
        return getattr(result, "content", result), bool(result.is_error)
    if isinstance(result, Mapping):
        return result, result.get("isError", result.get("is_error", False)) is True
    return result, False


def result_view(result: Any) -> dict[str, Any]:
    content, is_error = _result_parts(result)
    return {"text": result_text(content), "is_error": is_error, "content": content}


_RESULT_KEYS = ("text", "is_error", "content")


class LazyResultView(Mapping[str, Any]):
    """``result_view(result)`` whose text is computed when first read (a long output's join)."""

    __slots__ = ("_content", "_is_error", "_text")

    def __init__(self, result: Any) -> None:
        self._content, self._is_error = _result_parts(result)
        self._text: str | None = None

    def get(self, key: str, default: Any = None) -> Any:
        if key == "text":
            text = self._text
            if text is None:
                text = self._text = result_text(self._content)
            return text
        if key == "is_error":
            return self._is_error
        if key == "content":
            return self._content
        return default

    def __getitem__(self, key: str) -> Any:
        if key in _RESULT_KEYS:
            return self.get(key)
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(_RESULT_KEYS)

    def __len__(self) -> int:
        return len(_RESULT_KEYS)


# ---- printing conditions ------------------------------------------------------------


def _lit_text(v: Any) -> str:
    if v is None:
        return "null"
    if v is True:
        return "true"
    if v is False:
        return "false"
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    return repr(v)


def expr_text(e: ast.Expr) -> str:
    """Policy syntax for an expression (used in explain traces)."""
    if isinstance(e, ast.Lit):
        return _lit_text(e.value)
    if isinstance(e, ast.ListExpr):
        return "[" + ", ".join(expr_text(i) for i in e.items) + "]"
    if isinstance(e, ast.Path):
        return e.dotted()
    if isinstance(e, ast.SetRef):
        return e.name
    if isinstance(e, ast.Concat):
        return " + ".join(_operand(i) for i in e.items)
    if isinstance(e, ast.Compare):
        return f"{_operand(e.left)} {e.op} {_operand(e.right)}"
    if isinstance(e, ast.From):
        return f"{_operand(e.value)} from {e.source}"
    if isinstance(e, ast.Not):
        inner = expr_text(e.operand)
        if isinstance(e.operand, (ast.And, ast.Or, ast.Compare, ast.From)):
            inner = f"({inner})"
        return f"not {inner}"
    if isinstance(e, ast.And):
        return " and ".join(
            f"({expr_text(i)})" if isinstance(i, ast.Or) else expr_text(i) for i in e.items
        )
    return " or ".join(expr_text(i) for i in e.items)


def _operand(e: ast.Expr) -> str:
    text = expr_text(e)
    if isinstance(e, (ast.And, ast.Or, ast.Not, ast.Compare, ast.From)):
        return f"({text})"
    return text


def condition_text(rule: ast.Rule | ast.LimitRule) -> str:
    parts = [f"when {expr_text(w)}" for w in rule.when]
    parts += [f"unless {expr_text(u)}" for u in rule.unless]
    return " ".join(parts)


def show_value(v: Any) -> str:
    if v is MISSING:
        return "missing"
    if v is UNKNOWN:
        return "unknown"
    if isinstance(v, PatternSet):
        v = list(v.patterns)
    try:
        text = json.dumps(v, default=str, ensure_ascii=False, sort_keys=True)
    except (TypeError, ValueError):
        text = repr(v)
    return text if len(text) <= 200 else text[:197] + "..."


# ---- compiled rules -------------------------------------------------------------------

CondFn = Callable[..., bool]
HoistFn = Callable[[Identity], bool]


@dataclass(slots=True, eq=False)
class CRule:
    """One compiled rule: its metadata and its condition split into hoisted and residual parts."""

    index: int
    rule: ast.Rule | ast.LimitRule
    rule_id: str
    kind: str
    effect: str
    shadow: bool
    reason: str | None
    location: str
    condition: ast.Expr | None
    hoisted: HoistFn | None = None
    residual: CondFn | None = None
    uses_unknown: bool = False  # reads args/destinations: partial evaluation needed
    by: Callable[..., Any] | None = None
    residual_src: str | None = None  # the residual's expression, inlined by call deciders
    hoisted_src: str | None = None  # the hoisted part's expression (reads only I)
    roots: frozenset[str] = frozenset()  # the roots the condition reads (that its kind can see)
    # Visibility of rules that read the arguments: when every conjunct that does
    # is unknown unless some value is missing (see _unknown_unless), the rule is
    # unknown exactly when ``known_src`` holds (the other conjuncts and those
    # values' presence; None: always), false otherwise, and is not walked.
    known_src: str | None = None
    unknown_static: bool = False

    def holds(self, identity: Identity, a: Any, t: Any, c: Any, r: Any, x: Any) -> bool:
        if self.hoisted is not None and not self.hoisted(identity):
            return False
        return self.residual is None or self.residual(identity, a, t, c, r, x)


class _Gen:
    """Python source for conditions; every name and literal is emitted through repr."""

    def __init__(self, sets: Mapping[str, ast.SetDecl], diags: list[Diagnostic]) -> None:
        self.sets = sets
        self.diags = diags
        self.namespace: dict[str, Any] = {
            "MISSING": MISSING,
            "_eq": op_eq,
            "_ne": op_ne,
            "_lt": op_lt,
            "_le": op_le,
            "_gt": op_gt,
            "_ge": op_ge,
            "_in": op_in,
            "_not_in": op_not_in,
            "_has": op_has,
            "_contains": op_contains,
            "_startswith": op_startswith,
            "_endswith": op_endswith,
            "_matches": op_matches,
            "_like": op_like,
            "_concat": concat,
            "_list": make_list,
            "_sub": sub,
            "_iattr": identity_attr,
            "_iobj": identity_obj,
            "_cattr": context_attr,
            "_cobj": context_obj,
            "_rattr": request_attr,
            "_robj": request_obj,
            "_dest": destinations,
            "_from": from_source,
        }
        self.consts: dict[tuple[str, str], str] = {}
        self.lines: list[str] = []
        self.funcs: dict[str, str] = {}  # source body -> function name
        self.roots: dict[frozenset[str], frozenset[str]] = {}  # one object per distinct set

    def interned(self, roots: frozenset[str]) -> frozenset[str]:
        return self.roots.setdefault(roots, roots)

    def const(self, value: Any, key: tuple[str, str]) -> str:
        name = self.consts.get(key)
        if name is None:
            name = f"_k{len(self.consts)}"
            self.consts[key] = name
            self.namespace[name] = value
        return name

    def error(self, span: ast.Span, message: str) -> None:
        self.diags.append(
            Diagnostic(
                span.file,
                span.line,
                span.col,
                message,
                code="compile",
                end_line=span.end_line,
                end_col=span.end_col,
            )
        )

    def function(self, params: str, body: str) -> str:
        key = f"{params}|{body}"
        name = self.funcs.get(key)
        if name is None:
            name = f"_f{len(self.funcs)}"
            self.funcs[key] = name
            self.lines.append(f"def {name}({params}):\n    return {body}\n")
        return name

    def build(self) -> dict[str, Any]:
        code = compile("\n".join(self.lines), "<bastion-policy>", "exec")
        exec(code, self.namespace)
        return self.namespace

    # -- values
    def value(self, e: ast.Expr, kind: str) -> str:
        if isinstance(e, ast.Lit):
            v = e.value
            if v is None or isinstance(v, (bool, str)):
                return repr(v)
            if isinstance(v, int):
                return repr(v)
            if isinstance(v, float) and math.isfinite(v):
                return repr(v)
            return self.const(v, ("float", repr(v)))
        if isinstance(e, ast.ListExpr):
            if all(isinstance(i, ast.Lit) for i in e.items):
                items = tuple(i.value for i in e.items if isinstance(i, ast.Lit))
                return self.const(items, ("tuple", repr([(type(i).__name__, i) for i in items])))
            return "_list((" + "".join(self.value(i, kind) + ", " for i in e.items) + "))"
        if isinstance(e, ast.SetRef):
            return self.setref(e)
        if isinstance(e, ast.Concat):
            return "_concat((" + "".join(self.value(i, kind) + ", " for i in e.items) + "))"
        if isinstance(e, ast.Path):
            return self.path(e, kind)
        # a condition used as a value: its truth
        return f"({self.cond(e, kind)})"

    def setref(self, e: ast.SetRef) -> str:
        decl = self.sets.get(e.name)
        if decl is None:
            self.error(e.span, f"undefined set {e.name!r}")
            return "MISSING"
        if decl.set_kind == "values":
            return self.const(tuple(i.value for i in decl.items), ("values", e.name))
        return self.const(
            PatternSet(e.name, tuple(str(i.value) for i in decl.items)), ("patterns", e.name)
        )

    def path(self, e: ast.Path, kind: str) -> str:
        root = e.root
        if root not in _ROOTS_BY_KIND[kind]:
            return "MISSING"
        parts = e.parts
        if root == "identity":
            if not parts:
                base, rest = "_iobj(I)", parts
            elif isinstance(parts[0], str):
                f = _IDENTITY_FIELDS.get(parts[0])
                base = f"I.{f}" if f else f"I.attributes.get({parts[0]!r}, MISSING)"
                rest = parts[1:]
            else:
                return "MISSING"
        elif root == "args":
            base, rest = "A", parts
            if parts and isinstance(parts[0], str):
                base, rest = f"A.get({parts[0]!r}, MISSING)", parts[1:]
            elif parts:
                return "MISSING"
        elif root == "tool":
            base, rest = "T", parts
            if parts and isinstance(parts[0], str):
                base, rest = f"T.get({parts[0]!r}, MISSING)", parts[1:]
            elif parts:
                return "MISSING"
        elif root == "context":
            if not parts:
                base, rest = "_cobj(C)", parts
            elif isinstance(parts[0], str):
                p0 = parts[0]
                if p0 in ("tainted", "session", "turn", "user_text"):
                    base = f"C.{p0}"
                else:
                    base = f"_cattr(C, {p0!r})"
                rest = parts[1:]
            else:
                return "MISSING"
        elif root == "request":
            if not parts:
                base, rest = "_robj(R)", parts
            elif isinstance(parts[0], str):
                base, rest = f"_rattr(R, {parts[0]!r})", parts[1:]
            else:
                return "MISSING"
        elif root in ("model", "result"):
            base, rest = "X", parts
            if parts and isinstance(parts[0], str):
                base, rest = f"X.get({parts[0]!r}, MISSING)", parts[1:]
            elif parts:
                return "MISSING"
        else:  # destinations
            base, rest = "_dest(T, A)", parts
        if rest:
            return f"_sub({base}, {tuple(rest)!r})"
        return base

    # -- conditions
    def cond(self, e: ast.Expr, kind: str) -> str:
        if isinstance(e, ast.And):
            return "(" + " and ".join(self.cond(i, kind) for i in e.items) + ")"
        if isinstance(e, ast.Or):
            return "(" + " or ".join(self.cond(i, kind) for i in e.items) + ")"
        if isinstance(e, ast.Not):
            return f"(not {self.cond(e.operand, kind)})"
        if isinstance(e, ast.Compare):
            return self.compare(e, kind)
        if isinstance(e, ast.From):
            if "args" not in _ROOTS_BY_KIND[kind] and "context" not in _ROOTS_BY_KIND[kind]:
                return "False"
            if "context" not in _ROOTS_BY_KIND[kind]:
                return "False"
            return f"_from(C, {e.source!r}, {self.value(e.value, kind)})"
        return f"({self.value(e, kind)} is True)"

    def compare(self, e: ast.Compare, kind: str) -> str:
        left = self.value(e.left, kind)
        op = e.op
        if op == "matches":
            assert isinstance(e.right, ast.Lit) and isinstance(e.right.value, str)
            try:
                rx = compile_regex(e.right.value)
            except RegexError as exc:
                span = e.right.span
                self.diags.append(
                    Diagnostic(
                        span.file,
                        span.line,
                        span.col + 1 + exc.offset,
                        f"invalid regular expression: {exc.message}",
                        code="regex",
                    )
                )
                return "False"
            return f"_matches({left}, {self.const(rx, ('regex', repr(e.right.value)))})"
        if op == "like":
            assert isinstance(e.right, ast.Lit) and isinstance(e.right.value, str)
            return f"_like({left}, {e.right.value!r})"
        right = self.value(e.right, kind)
        if op == "==" and isinstance(e.right, ast.Lit) and isinstance(e.right.value, str):
            return f"({left} == {right})"
        fast = self.fast_compare(op, e, left, right)
        if fast is not None:
            return fast
        fn = {
            "==": "_eq",
            "!=": "_ne",
            "<": "_lt",
            "<=": "_le",
            ">": "_gt",
            ">=": "_ge",
            "in": "_in",
            "not in": "_not_in",
            "has": "_has",
            "contains": "_contains",
            "startswith": "_startswith",
            "endswith": "_endswith",
        }[op]
        return f"{fn}({left}, {right})"

    def fast_compare(self, op: str, e: ast.Compare, left: str, right: str) -> str | None:
        """The common case of an operator against a literal, inline, else the operator function.

        Each form tests the exact type its shortcut is valid for and falls back to
        the operator function otherwise, so the result is always the function's.
        """
        lit = e.right.value if isinstance(e.right, ast.Lit) else None
        rtype = type(lit)
        # One temporary name serves every form: the other operand is always a
        # literal, and a nested comparison inside the assigned operand is done
        # before the assignment, so no form reads a value another one wrote.
        v = "_v"
        if op in ("<", "<=", ">", ">=") and rtype in (int, float):
            fn = {"<": "_lt", "<=": "_le", ">": "_gt", ">=": "_ge"}[op]
            return (
                f"(({v} {op} {right}) if type({v} := {left}) is int or type({v}) is float"
                f" else {fn}({v}, {right}))"
            )
        if op == "==" and rtype is int:
            return f"(({v} == {right}) if type({v} := {left}) is int else _eq({v}, {right}))"
        if op == "has" and rtype is str:
            return f"(({right} in {v}) if type({v} := {left}) is tuple else _has({v}, {right}))"
        if op in ("startswith", "endswith") and rtype is str:
            return f"({v}.{op}({right}) if type({v} := {left}) is str else _{op}({v}, {right}))"
        if op == "in" and isinstance(e.left, ast.Lit) and type(e.left.value) is str:
            return f"(({left} in {v}) if type({v} := {right}) is tuple else _in({left}, {v}))"
        return None


def has_from(e: ast.Expr) -> bool:
    """Whether an expression uses provenance (``... from untrusted|user|trusted``)."""
    stack: list[ast.Expr] = [e]
    while stack:
        n = stack.pop()
        if isinstance(n, ast.From):
            return True
        if isinstance(n, (ast.ListExpr, ast.Concat, ast.And, ast.Or)):
            stack.extend(n.items)
        elif isinstance(n, ast.Compare):
            stack.append(n.left)
            stack.append(n.right)
        elif isinstance(n, ast.Not):
            stack.append(n.operand)
    return False


def roots_of(e: ast.Expr) -> set[str]:
    """The roots an expression reads; ``From`` also reads the context's texts."""
    out: set[str] = set()
    stack: list[ast.Expr] = [e]
    while stack:
        n = stack.pop()
        if isinstance(n, ast.Path):
            out.add(n.root)
        elif isinstance(n, (ast.ListExpr, ast.Concat, ast.And, ast.Or)):
            stack.extend(n.items)
        elif isinstance(n, ast.Compare):
            stack.append(n.left)
            stack.append(n.right)
        elif isinstance(n, ast.From):
            out.add("context")
            stack.append(n.value)
        elif isinstance(n, ast.Not):
            stack.append(n.operand)
    return out


# ---- the walker: explain and partial evaluation ------------------------------------------


@dataclass(slots=True)
class Env:
    """Everything one decision reads. ``args`` is UNKNOWN in partial evaluation."""

    kind: str
    identity: Identity
    args: Any
    tool: Any
    context: Any
    request: RequestInfo | None
    extra: Any
    sets: Mapping[str, Any]


class Walker:
    """Evaluates conditions over the AST, three-valued when arguments are unknown, with reasons."""

    def __init__(self, sets: Mapping[str, Any]) -> None:
        self.sets = sets

    def value(self, e: ast.Expr, env: Env) -> Any:
        if isinstance(e, ast.Lit):
            return e.value
        if isinstance(e, ast.ListExpr):
            items = [self.value(i, env) for i in e.items]
            if any(i is UNKNOWN for i in items):
                return UNKNOWN
            return make_list(items)
        if isinstance(e, ast.SetRef):
            return self.sets.get(e.name, MISSING)
        if isinstance(e, ast.Concat):
            items = [self.value(i, env) for i in e.items]
            if any(i is MISSING for i in items):
                return MISSING
            if any(i is UNKNOWN for i in items):
                return UNKNOWN
            return concat(items)
        if isinstance(e, ast.Path):
            return self.path(e, env)
        t = self.truth(e, env)
        return UNKNOWN if t is UNKNOWN else t

    def path(self, e: ast.Path, env: Env) -> Any:
        root = e.root
        if root not in _ROOTS_BY_KIND[env.kind]:
            return MISSING
        parts = e.parts
        if root == "identity":
            if not parts:
                return identity_obj(env.identity)
            if not isinstance(parts[0], str):
                return MISSING
            return sub(identity_attr(env.identity, parts[0]), parts[1:])
        if root == "args":
            if env.args is UNKNOWN:
                return UNKNOWN
            return sub(env.args, parts)
        if root == "destinations":
            if env.args is UNKNOWN:
                return UNKNOWN
            return sub(destinations(env.tool, env.args), parts)
        if root == "tool":
            return sub(env.tool, parts)
        if root == "context":
            if not parts:
                return context_obj(env.context)
            if not isinstance(parts[0], str):
                return MISSING
            return sub(context_attr(env.context, parts[0]), parts[1:])
        if root == "request":
            if not parts:
                return request_obj(env.request)
            if not isinstance(parts[0], str):
                return MISSING
            return sub(request_attr(env.request, parts[0]), parts[1:])
        return sub(env.extra, parts)

    def compare(self, e: ast.Compare, env: Env) -> Any:
        left = self.value(e.left, env)
        if e.op in ("matches", "like"):
            assert isinstance(e.right, ast.Lit) and isinstance(e.right.value, str)
            right: Any = e.right.value
        else:
            right = self.value(e.right, env)
        if left is MISSING or right is MISSING:
            return False
        if left is UNKNOWN or right is UNKNOWN:
            return UNKNOWN
        if e.op == "matches":
            return op_matches(left, compile_regex(right))
        if e.op == "like":
            return op_like(left, right)
        return _COMPARE_OPS[e.op](left, right)

    def truth(self, e: ast.Expr, env: Env) -> Any:
        """True, False or UNKNOWN."""
        if isinstance(e, ast.And):
            seen_unknown = False
            for i in e.items:
                t = self.truth(i, env)
                if t is False:
                    return False
                if t is UNKNOWN:
                    seen_unknown = True
            return UNKNOWN if seen_unknown else True
        if isinstance(e, ast.Or):
            seen_unknown = False
            for i in e.items:
                t = self.truth(i, env)
                if t is True:
                    return True
                if t is UNKNOWN:
                    seen_unknown = True
            return UNKNOWN if seen_unknown else False
        if isinstance(e, ast.Not):
            t = self.truth(e.operand, env)
            return UNKNOWN if t is UNKNOWN else not t
        if isinstance(e, ast.Compare):
            return self.compare(e, env)
        if isinstance(e, ast.From):
            if "context" not in _ROOTS_BY_KIND[env.kind]:
                return False
            v = self.value(e.value, env)
            if v is MISSING:
                return False
            if v is UNKNOWN:
                return UNKNOWN
            return from_source(env.context, e.source, v)
        v = self.value(e, env)
        if v is UNKNOWN:
            return UNKNOWN
        return v is True

    # -- explanations
    def explain(self, e: ast.Expr, env: Env) -> tuple[Any, str]:
        """The truth of ``e`` and, when it did not hold, which part failed and why."""
        t = self.truth(e, env)
        if t is True:
            return t, "held"
        return t, self._why(e, env, t)

    def _why(self, e: ast.Expr, env: Env, t: Any) -> str:
        word = "unknown" if t is UNKNOWN else ("true" if t else "false")
        if isinstance(e, ast.And):
            for i in e.items:
                ti = self.truth(i, env)
                if ti is not True:
                    return self._why(i, env, ti)
        if isinstance(e, ast.Or):
            return "; ".join(self._why(i, env, self.truth(i, env)) for i in e.items)
        if isinstance(e, ast.Not):
            inner = self.truth(e.operand, env)
            if inner is True:
                return f"{expr_text(e)} was {word} ({expr_text(e.operand)} held{self._values(e.operand, env)})"
            return f"{expr_text(e)} was {word}"
        return f"{expr_text(e)} was {word}{self._values(e, env)}"

    def _values(self, e: ast.Expr, env: Env) -> str:
        paths: list[ast.Path] = []
        stack: list[ast.Expr] = [e]
        while stack:
            n = stack.pop()
            if isinstance(n, ast.Path):
                paths.append(n)
            elif isinstance(n, (ast.ListExpr, ast.Concat, ast.And, ast.Or)):
                stack.extend(reversed(n.items))
            elif isinstance(n, ast.Compare):
                stack.append(n.right)
                stack.append(n.left)
            elif isinstance(n, ast.From):
                stack.append(n.value)
            elif isinstance(n, ast.Not):
                stack.append(n.operand)
        if not paths:
            return ""
        shown = []
        for p in dict.fromkeys(paths):
            v = self.path(p, env)
            shown.append(
                f"{p.dotted()} is missing" if v is MISSING else f"{p.dotted()} = {show_value(v)}"
            )
        return " (" + ", ".join(shown) + ")"


# ---- target index ------------------------------------------------------------------


class _Trie:
    __slots__ = ("children", "items")

    def __init__(self) -> None:
        self.children: dict[str, _Trie] = {}
        self.items: list[tuple[str, int, bool]] = []  # (glob, rule index, prefix-only)


class TargetIndex:
    """Rules of one kind by target: exact names in a dict, globs in a prefix trie, the rest."""

    def __init__(self) -> None:
        self.exact: dict[str, list[int]] = {}
        self.trie = _Trie()
        self.anywhere: list[int] = []

    def add(self, index: int, target_patterns: tuple[str, ...] | None) -> None:
        if target_patterns is None:
            self.anywhere.append(index)
            return
        for p in dict.fromkeys(target_patterns):
            if "*" not in p and "?" not in p:
                self.exact.setdefault(p, []).append(index)
                continue
            prefix = _literal_prefix(p)
            node = self.trie
            for ch in prefix:
                nxt = node.children.get(ch)
                if nxt is None:
                    nxt = node.children[ch] = _Trie()
                node = nxt
            prefix_only = p == prefix + "*"
            node.items.append((p, index, prefix_only))

    def lookup(self, name: str) -> list[int]:
        found: set[int] = set(self.exact.get(name, ()))
        found.update(self.anywhere)
        node: _Trie | None = self.trie
        i = 0
        while node is not None:
            for glob, index, prefix_only in node.items:
                if index not in found and (prefix_only or glob_match(glob, name)):
                    found.add(index)
            if i >= len(name):
                break
            node = node.children.get(name[i])
            i += 1
        return sorted(found)


# ---- decisions ---------------------------------------------------------------------

_CALL_RANK = {"forbid": 3, "hide": 3, "ask": 2, "allow": 1}
_CALL_EFFECT = {3: Effect.FORBID, 2: Effect.ASK, 1: Effect.ALLOW}
_RESULT_RANK = {"block": 4, "quarantine": 3, "untrusted": 2, "trusted": 1}
_RESULT_EFFECT = {4: Effect.BLOCK, 3: Effect.QUARANTINE, 2: Effect.UNTRUSTED, 1: Effect.TRUSTED}
_MODEL_RANK = {"forbid": 2, "allow": 1}
_CONTEXT_RANK = {"untrusted": 2, "trusted": 1}
_DEFAULT_EFFECTS = {
    "call": {"deny": Effect.FORBID, "allow": Effect.ALLOW, "ask": Effect.ASK},
    "model": {"deny": Effect.FORBID, "allow": Effect.ALLOW},
    "result": {
        "trusted": Effect.TRUSTED,
        "untrusted": Effect.UNTRUSTED,
        "quarantine": Effect.QUARANTINE,
        "block": Effect.BLOCK,
    },
    "context": {"trusted": Effect.TRUSTED, "untrusted": Effect.UNTRUSTED},
}
_BUILTIN_DEFAULTS = {"call": "deny", "model": "deny", "result": "untrusted", "context": "trusted"}


def _ids(rules: Iterable[CRule]) -> tuple[str, ...]:
    return tuple(r.rule_id for r in rules)


def _reasons(rules: Iterable[CRule]) -> tuple[str, ...]:
    return tuple(r.reason for r in rules if r.reason)


def _ranked(
    kind: EventKind,
    matched: Sequence[CRule],
    rank: Mapping[str, int],
    effects: Mapping[int, Effect],
    default: Effect,
) -> Decision:
    enforced = [r for r in matched if not r.shadow]
    shadow = _ids(r for r in matched if r.shadow)
    if not enforced:
        return Decision(kind, default, shadow_hits=shadow, defaulted=True, options=_NO_OPTIONS)
    top = max(rank[r.effect] for r in enforced)
    winners = [r for r in enforced if rank[r.effect] == top]
    losers = [r for r in enforced if rank[r.effect] != top]
    return Decision(
        kind,
        effects[top],
        rule_ids=_ids(winners),
        reasons=_reasons(winners),
        shadow_hits=shadow,
        overridden=_ids(losers),
        options=_NO_OPTIONS,
    )


@dataclass(frozen=True, slots=True)
class LimitHit:
    """A rate limit that applies to an event: count ``amount`` ``unit`` per window under ``key``."""

    rule_id: str
    amount: int
    unit: str
    window_seconds: int
    key: str
    reason: str | None = None


def _limit_key_value(v: Any) -> str:
    if v is MISSING:
        return "<missing>"
    if isinstance(v, str):
        return v
    return show_value(v)


# ---- candidate lists -------------------------------------------------------------


class CandidateList:
    """The rules that may apply to one concrete name, in source order, and their decisions."""

    __slots__ = ("decide", "decisions", "needs_tool", "rules", "tool_view")

    def __init__(
        self,
        rules: tuple[CRule, ...],
        decide: Callable[[Sequence[CRule]], Decision],
        tool_view: dict[str, Any] | None,
    ) -> None:
        self.rules = rules
        self.decide = decide
        self.tool_view = tool_view
        self.needs_tool = any(r.roots & {"tool", "destinations"} for r in rules)
        self.decisions: dict[tuple[int, ...], Decision] = {}

    def decision(self, key: tuple[int, ...], by_index: Callable[[int], CRule]) -> Decision:
        d = self.decisions.get(key)
        if d is None:
            d = self.decide([by_index(i) for i in key])
            if len(self.decisions) >= DECISION_CACHE_SIZE:
                self.decisions.clear()
            self.decisions[key] = d
        return d


def _memo_put(memo: dict[str, Any], name: str, cl: Any) -> None:
    # A plain dict evicting its oldest entry: cachetools' LRUCache costs about
    # 0.3 us per lookup, a fifth of a whole decision.
    if len(memo) >= CANDIDATE_CACHE_SIZE:
        try:
            del memo[next(iter(memo))]
        except (RuntimeError, StopIteration, KeyError):  # another thread got there first
            memo.clear()
    memo[name] = cl


# ---- deciders ----------------------------------------------------------------------
#
# The hot path. For each tool (or model) name and kind of decision (call,
# visibility, result, model; the starting context has one), one function
# generated from the candidate list: each candidate is a bit; the bits of the candidates active for this
# identity (hoisted identity conditions) come from a per-identity cache; the
# residual conditions are inlined (no call per rule); the bitmask of the rules
# that hold picks the decision from a table. Every candidate is still
# evaluated, because a Decision names every matching rule (winners, overridden
# and shadow hits), and the bits are in source order, so the table builds
# exactly the Decision the explain path builds. Visibility is three-valued: a
# second bitmask holds the candidates that are unknown (see CRule.known_src).

CallDecider = Callable[..., Decision]
"""``decider(identity, args, context, request[, tool_view]) -> Decision``."""

# What each kind of decider takes, and the decider's parameter list. S is the
# tool (a name or a ToolSpec) and Q the result or model as given; the tool view
# T and the result or model view X are made from them only when a candidate
# reads them. The roots a kind cannot read are fixed defaults.
_DECIDER_PARAMS = {
    "call": "I, A, C, R, T=_T, X=None",  # decide_call passes T for a ToolSpec
    "result": "I, S, A, Q, C, R",
    "model": "I, Q, C, R, A=_NA, T=None",
    "context": "I, R, A=_NA, C=_EC, T=None, X=None",
    "visibility": "I, S, C, R, A=_NA, X=None",
}
_NO_ARGS: Mapping[str, Any] = MappingProxyType({})


def _decider(cp: CompiledPolicy, cl: CandidateList, kind: str) -> CallDecider:
    """One generated function deciding ``kind`` for one candidate list (see above)."""
    rules = cl.rules
    bits = {r.index: 1 << n for n, r in enumerate(rules)}
    always = 0  # active whatever the identity
    no_residual = 0  # hold whenever active
    hoisted: list[tuple[int, CRule]] = []
    for r in rules:
        bit = bits[r.index]
        if r.hoisted is None:
            always |= bit
        else:
            hoisted.append((bit, r))
        if r.residual is None:
            no_residual |= bit
    reads: frozenset[str] = frozenset().union(*(r.roots for r in rules))
    table: dict[int, Decision] = {}

    if kind == "visibility":
        width = len(rules)

        def make(key: int) -> Decision:
            m, u = key & ((1 << width) - 1), key >> width
            truths = [
                True if m & bits[r.index] else UNKNOWN if u & bits[r.index] else False
                for r in rules
            ]
            d = cp.decide_visibility_from(list(zip(rules, truths, strict=True)))
            if len(table) >= DECISION_CACHE_SIZE:
                table.clear()
            table[key] = d
            return d

    else:
        by_index = cp.by_index

        def make(key: int) -> Decision:
            d = cl.decision(tuple(r.index for r in rules if key & bits[r.index]), by_index)
            if len(table) >= DECISION_CACHE_SIZE:
                table.clear()
            table[key] = d
            return d

    def walk(rule: CRule, identity: Identity, t: Any, c: Any, req: Any) -> Any:
        assert rule.condition is not None
        env = Env(rule.kind, identity, UNKNOWN, t, c, req, None, cp.sets)
        return cp.walker.truth(rule.condition, env)

    env: dict[str, Any] = {
        "_tget": table.get,
        "_mk": make,
        "_T": cl.tool_view,
        "_NA": _NO_ARGS,
        "_EC": EMPTY_CONTEXT,
        "_view": cp.tool_view_for,
        "_rview": LazyResultView,
        "_mview": model_view,
        "_walk": walk,
    }
    params = _DECIDER_PARAMS[kind]
    # The body reads env names as parameter defaults (fast locals): the
    # function's globals are the policy's namespace.
    bound = ["_tget", "_mk"]
    prelude: list[str] = []
    if kind in ("result", "visibility"):
        if reads & {"tool", "destinations"}:
            prelude.append("    T = _T if type(S) is str else _view(S)")
            bound += ["_T", "_view"]
        else:
            params += ", T=_T"
    if kind in ("result", "model"):
        if reads & {"result", "model"}:
            prelude.append("    X = _rview(Q)" if kind == "result" else "    X = _mview(Q)")
            bound.append("_rview" if kind == "result" else "_mview")
        else:
            params += ", X=None"
    head: list[str] = []
    lines = [*prelude]
    if hoisted:
        active: dict[int, tuple[Identity, int]] = {}

        def remember(identity: Identity, a: int) -> None:
            if len(active) >= PER_LIST_IDENTITY_CACHE:
                try:  # evict the oldest entry only: no cliff when identities outnumber the cache
                    del active[next(iter(active))]
                except (RuntimeError, StopIteration, KeyError):  # another thread got there first
                    active.clear()
            active[id(identity)] = (identity, a)

        # The miss path is a function of its own, so the hit path's bytecode stays short.
        head += ["def _act(I, _put=_put):", f"    a = {always}"]
        for bit, r in hoisted:
            head.append(f"    if {r.hoisted_src}:")
            head.append(f"        a |= {bit}")
        head += ["    _put(I, a)", "    return a"]
        env["_get"] = active.get
        env["_put"] = remember
        bound += ["_get", "_act"]
        lines.append("    e = _get(id(I))")
        lines.append("    a = e[1] if e is not None and e[0] is I else _act(I)")

    def active_bits(mask: int) -> str:
        return f"a & {mask}" if hoisted else str(always & mask)

    def guard(r: CRule, test: str | None) -> str:
        bit = bits[r.index]
        parts = ([f"a & {bit}"] if r.hoisted is not None else []) + ([f"({test})"] if test else [])
        return " and ".join(parts) or "True"

    if kind == "visibility":
        two_valued = 0
        unknown_when_active = 0
        for r in rules:
            if not r.uses_unknown:
                if r.residual is None:
                    two_valued |= bits[r.index]
            elif r.unknown_static and r.known_src is None:
                unknown_when_active |= bits[r.index]
        lines.append(f"    m = {active_bits(two_valued)}")
        lines.append(f"    u = {active_bits(unknown_when_active)}")
        for r in rules:
            bit = bits[r.index]
            if not r.uses_unknown:
                if r.residual_src is not None:
                    lines += [f"    if {guard(r, r.residual_src)}:", f"        m |= {bit}"]
            elif r.unknown_static:
                if r.known_src is not None:
                    lines += [f"    if {guard(r, r.known_src)}:", f"        u |= {bit}"]
            else:
                env[f"_r{r.index}"] = r
                bound += ["_walk", f"_r{r.index}"]
                lines += [
                    f"    if {guard(r, None)}:",
                    f"        t = _walk(_r{r.index}, I, T, C, R)",
                    "        if t is True:",
                    f"            m |= {bit}",
                    "        elif t is not False:",
                    f"            u |= {bit}",
                ]
        lines.append(f"    k = m | (u << {len(rules)})")
    else:
        lines.append(f"    k = {active_bits(no_residual)}")
        for r in rules:
            if r.residual_src is not None:
                lines += [f"    if {guard(r, r.residual_src)}:", f"        k |= {bits[r.index]}"]
    lines.append("    d = _tget(k)")
    lines.append("    return _mk(k) if d is None else d")
    defaults = "".join(f", {n}={n}" for n in dict.fromkeys(bound))
    lines.insert(0, f"def _decide({params}{defaults}):")
    code = compile("\n".join(head + lines) + "\n", f"<bastion-{kind}-decider>", "exec")
    exec(code, cp.namespace, env)
    fn: CallDecider = env["_decide"]
    return fn


# ---- the compiled policy -----------------------------------------------------------


@dataclass(slots=True)
class CompiledPolicy:
    """Indexes and compiled rules of a loaded policy. Immutable after compilation except caches."""

    rules: tuple[CRule, ...]
    defaults: dict[str, str]
    schema: Schema | None
    sets: dict[str, Any]
    indexes: dict[str, TargetIndex]
    context_rules: tuple[CRule, ...]
    warnings: tuple[Diagnostic, ...] = ()
    memo: dict[str, dict[str, CandidateList]] = field(default_factory=dict)
    identity_cache: dict[int, tuple[Identity, dict[int, bool]]] = field(default_factory=dict)
    walker: Walker = field(init=False)
    reads_provenance: bool = field(init=False)
    tool_views: dict[str, dict[str, Any]] = field(default_factory=dict)
    spec_views: dict[int, tuple[ToolSpec, dict[str, Any], dict[str, Any]]] = field(
        default_factory=dict
    )
    namespace: dict[str, Any] = field(default_factory=dict)
    # Tool name -> its call decider (see call_decider); the fast path of decide_call.
    call_deciders: dict[str, CallDecider] = field(default_factory=dict)
    # The same for the decisions every LLM request makes.
    visibility_deciders: dict[str, CallDecider] = field(default_factory=dict)
    result_deciders: dict[str, CallDecider] = field(default_factory=dict)
    model_deciders: dict[str, CallDecider] = field(default_factory=dict)
    context_fn: CallDecider | None = None
    # Tool name -> the classification of its every output when no rule names it, else None.
    fixed_results: dict[str, Decision | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.walker = Walker(self.sets)
        for kind in ("call", "tool", "result", "model", "limit-call", "limit-model", "visibility"):
            self.memo[kind] = {}
        # Only `from` reads the context's tool-output texts; without it adapters
        # need not collect them.
        self.reads_provenance = any(
            r.condition is not None and has_from(r.condition) for r in self.rules
        )

    # -- effects
    def default_effect(self, kind: str) -> Effect:
        return _DEFAULT_EFFECTS[kind][self.defaults.get(kind, _BUILTIN_DEFAULTS[kind])]

    def by_index(self, i: int) -> CRule:
        return self.rules[i]

    # -- hoisting
    def hoisted(self, rule: CRule, identity: Identity) -> bool:
        entry = self.identity_cache.get(id(identity))
        if entry is None or entry[0] is not identity:
            if len(self.identity_cache) >= IDENTITY_CACHE_SIZE:
                self.identity_cache.clear()
            entry = (identity, {})
            self.identity_cache[id(identity)] = entry
        results = entry[1]
        r = results.get(rule.index)
        if r is None:
            assert rule.hoisted is not None
            r = bool(rule.hoisted(identity))
            results[rule.index] = r
        return r

    # -- candidate lists
    def candidates(self, kind: str, name: str) -> CandidateList:
        memo = self.memo[kind]
        cl = memo.get(name)
        if cl is None:
            cl = self._build_list(kind, name)
            _memo_put(memo, name, cl)
        return cl

    def _memo_decider(self, kind: str, memo: dict[str, CallDecider], name: str) -> CallDecider:
        fn = memo.get(name)
        if fn is None:
            fn = _decider(self, self.candidates(kind, name), kind)
            _memo_put(memo, name, fn)
        return fn

    def call_decider(self, name: str) -> CallDecider:
        """The memoized call decider for one tool name (built on first use)."""
        return self._memo_decider("call", self.call_deciders, name)

    def visibility_decider(self, name: str) -> CallDecider:
        """``decider(identity, tool, context, request)`` for one tool name (memoized)."""
        return self._memo_decider("visibility", self.visibility_deciders, name)

    def result_decider(self, name: str) -> CallDecider:
        """``decider(identity, tool, args, result, context, request)`` for one tool name."""
        return self._memo_decider("result", self.result_deciders, name)

    def fixed_result(self, name: str) -> Decision | None:
        """The decision every result of ``name`` gets when no rule names the tool (memoized)."""
        memo = self.fixed_results
        if name in memo:
            return memo[name]
        fixed = None if self.candidates("result", name).rules else self.decide_result_from(())
        _memo_put(memo, name, fixed)
        return fixed

    def model_decider(self, name: str) -> CallDecider:
        """``decider(identity, model, context, request)`` for one model name (memoized)."""
        return self._memo_decider("model", self.model_deciders, name)

    def context_decider(self) -> CallDecider:
        """``decider(identity, request)``: the trust a new context starts with."""
        fn = self.context_fn
        if fn is None:
            cl = CandidateList(self.context_rules, self.decide_context_from, None)
            fn = self.context_fn = _decider(self, cl, "context")
        return fn

    def _build_list(self, kind: str, name: str) -> CandidateList:
        if kind == "call":
            idx = sorted(
                set(self.indexes["call"].lookup(name))
                | {i for i in self.indexes["tool"].lookup(name) if self.rules[i].effect == "hide"}
            )
            decide: Callable[[Sequence[CRule]], Decision] = self.decide_call_from
        elif kind == "visibility":
            idx = sorted(
                set(self.indexes["call"].lookup(name)) | set(self.indexes["tool"].lookup(name))
            )
            decide = self.decide_call_from  # unused: visibility has its own path
        else:
            idx = self.indexes[kind].lookup(name)
            decide = {
                "result": self.decide_result_from,
                "model": self.decide_model_from,
                "tool": self.decide_call_from,
                "limit-call": self.decide_call_from,
                "limit-model": self.decide_call_from,
            }[kind]
        rules = tuple(self.rules[i] for i in idx)
        view = (
            self.tool_view_for(name)
            if kind in ("call", "visibility", "result", "tool", "limit-call")
            else None
        )
        return CandidateList(rules, decide, view)

    def tool_view_for(self, tool: str | ToolSpec) -> dict[str, Any]:
        if isinstance(tool, str):
            v = self.tool_views.get(tool)
            if v is None:
                v = tool_view(tool, self.schema)
                if len(self.tool_views) >= CANDIDATE_CACHE_SIZE:
                    self.tool_views.clear()
                self.tool_views[tool] = v
            return v
        # Adapters hand out the same ToolSpec objects request after request, so
        # views are kept per object. The entry holds the spec (its id cannot be
        # reused while cached) and a copy of its annotations: the one part of a
        # frozen spec that a caller could still change in place.
        e = self.spec_views.get(id(tool))
        if e is not None and e[0] is tool and e[1] == tool.annotations:
            return e[2]
        v = tool_view(tool, self.schema)
        spec_views = self.spec_views
        if len(spec_views) >= SPEC_VIEW_CACHE_SIZE:
            try:  # evict the oldest entry only
                del spec_views[next(iter(spec_views))]
            except (RuntimeError, StopIteration, KeyError):  # another thread got there first
                spec_views.clear()
        spec_views[id(tool)] = (tool, dict(tool.annotations), v)
        return v

    # -- decision builders (shared by the fast path and explain)
    def decide_call_from(self, matched: Sequence[CRule]) -> Decision:
        return _ranked(
            EventKind.CALL, matched, _CALL_RANK, _CALL_EFFECT, self.default_effect("call")
        )

    def decide_model_from(self, matched: Sequence[CRule]) -> Decision:
        d = _ranked(
            EventKind.MODEL,
            matched,
            _MODEL_RANK,
            {2: Effect.FORBID, 1: Effect.ALLOW},
            self.default_effect("model"),
        )
        if d.effect is Effect.ALLOW and not d.defaulted:
            for r in matched:
                if (
                    not r.shadow
                    and r.effect == "allow"
                    and isinstance(r.rule, ast.Rule)
                    and r.rule.route
                ):
                    return _replace_route(d, r.rule.route)
        return d

    def decide_context_from(self, matched: Sequence[CRule]) -> Decision:
        return _ranked(
            EventKind.CONTEXT,
            matched,
            _CONTEXT_RANK,
            {2: Effect.UNTRUSTED, 1: Effect.TRUSTED},
            self.default_effect("context"),
        )

    def decide_result_from(self, matched: Sequence[CRule]) -> Decision:
        enforced = [r for r in matched if not r.shadow]
        shadow = _ids(r for r in matched if r.shadow)
        whole = [r for r in enforced if r.effect != "redact" and not _at(r)]
        redacts = [r for r in enforced if r.effect == "redact"]
        fields = [r for r in enforced if r.effect != "redact" and _at(r)]
        produced: set[int] = {r.index for r in redacts}
        lost: set[int] = set()
        if whole:
            top = max(_RESULT_RANK[r.effect] for r in whole)
            effect = _RESULT_EFFECT[top]
            for r in whole:
                (produced if _RESULT_RANK[r.effect] == top else lost).add(r.index)
            defaulted = False
        else:
            effect = self.default_effect("result")
            defaulted = True
        # field-level: per path, the strongest class wins
        best: dict[str, int] = {}
        for r in fields:
            for p in _at(r):
                best[p] = max(best.get(p, 0), _RESULT_RANK[r.effect])
        for r in fields:
            if any(_RESULT_RANK[r.effect] == best[p] for p in _at(r)):
                produced.add(r.index)
            else:
                lost.add(r.index)
        paths: list[tuple[str, Effect]] = [(p, _RESULT_EFFECT[k]) for p, k in best.items()]
        redact_paths: dict[str, None] = {}
        patterns: dict[str, None] = {}
        for r in redacts:
            for p in _at(r):
                redact_paths[p] = None
            using = r.rule.using if isinstance(r.rule, ast.Rule) else ()
            for u in using or ("secrets",):
                patterns[u] = None
        paths.extend((p, Effect.REDACT) for p in redact_paths)
        options: dict[str, Any] = {}
        for r in enforced:
            if r.index in produced and r.effect == "quarantine" and isinstance(r.rule, ast.Rule):
                for k, v in r.rule.options:
                    options.setdefault(k, v)
        winners = [r for r in enforced if r.index in produced]
        return Decision(
            EventKind.RESULT,
            effect,
            rule_ids=_ids(winners),
            reasons=_reasons(winners),
            shadow_hits=shadow,
            overridden=_ids(r for r in enforced if r.index in lost),
            defaulted=defaulted,
            redact_patterns=tuple(patterns),
            paths=tuple(paths),
            options=MappingProxyType(options) if options else _NO_OPTIONS,
        )

    def decide_visibility_from(self, results: Sequence[tuple[CRule, Any]]) -> Decision:
        """``results`` pairs each tool/call candidate with its (three-valued) truth."""
        kind = EventKind.VISIBILITY
        shadow = _ids(r for r, t in results if r.shadow and t is True)
        live = [(r, t) for r, t in results if not r.shadow]
        hides = [r for r, t in live if r.kind == "tool" and r.effect == "hide" and t is not False]
        shows = [r for r, t in live if r.kind == "tool" and r.effect == "show" and t is True]
        if hides:
            return Decision(
                kind, Effect.HIDE, _ids(hides), _reasons(hides), shadow, overridden=_ids(shows)
            )
        if shows:
            return Decision(kind, Effect.SHOW, _ids(shows), _reasons(shows), shadow)
        calls = [(r, t) for r, t in live if r.kind == "call"]
        forbids = [r for r, t in calls if r.effect == "forbid" and t is True]
        if forbids:
            allowed = [r for r, t in calls if r.effect != "forbid" and t is True]
            return Decision(
                kind,
                Effect.HIDE,
                _ids(forbids),
                _reasons(forbids),
                shadow,
                overridden=_ids(allowed),
            )
        possible = [r for r, t in calls if r.effect != "forbid" and t is not False]
        if possible:
            return Decision(kind, Effect.SHOW, _ids(possible), _reasons(possible), shadow)
        default = self.default_effect("call")
        effect = Effect.HIDE if default is Effect.FORBID else Effect.SHOW
        return Decision(kind, effect, shadow_hits=shadow, defaulted=True)

    # -- tracing
    def trace(self, rule: CRule, truth: Any, detail: str) -> RuleTrace:
        return RuleTrace(
            rule_id=rule.rule_id,
            effect=rule.effect,
            matched=truth is True,
            shadow=rule.shadow,
            condition=condition_text(rule.rule),
            detail=detail,
            location=rule.location,
        )

    def explain_matched(
        self,
        rules: Sequence[CRule],
        env_for: Callable[[CRule], Env],
        decide_from: Callable[[Sequence[CRule]], Decision],
    ) -> Decision:
        """``decide_from`` the rules that hold, with the trace of every rule's evaluation."""
        results, traces = self.explain_rules(rules, env_for)
        return decision_with_trace(decide_from([r for r, v in results if v is True]), traces)

    def explain_rules(
        self, rules: Sequence[CRule], env_for: Callable[[CRule], Env]
    ) -> tuple[list[tuple[CRule, Any]], list[RuleTrace]]:
        results: list[tuple[CRule, Any]] = []
        traces: list[RuleTrace] = []
        for r in rules:
            if r.condition is None:
                t, detail = True, "no condition"
            else:
                t, detail = self.walker.explain(r.condition, env_for(r))
            results.append((r, t))
            traces.append(self.trace(r, t, detail))
        return results, traces


def _at(r: CRule) -> tuple[str, ...]:
    return r.rule.at if isinstance(r.rule, ast.Rule) else ()


def _replace_route(d: Decision, route: str) -> Decision:
    return Decision(
        d.kind,
        d.effect,
        rule_ids=d.rule_ids,
        reasons=d.reasons,
        shadow_hits=d.shadow_hits,
        overridden=d.overridden,
        defaulted=d.defaulted,
        route=route,
    )


def fail_closed(kind: EventKind) -> Decision:
    effect = {
        EventKind.CALL: Effect.FORBID,
        EventKind.VISIBILITY: Effect.HIDE,
        EventKind.RESULT: Effect.BLOCK,
        EventKind.MODEL: Effect.FORBID,
        EventKind.CONTEXT: Effect.UNTRUSTED,
    }[kind]
    return Decision(kind, effect, reasons=(EVALUATION_ERROR,))


# ---- compilation -------------------------------------------------------------------


def _file_mode(pf: ast.PolicyFile) -> str:
    return pf.mode or "enforce"


def compile_policy(files: Sequence[ast.PolicyFile], schema: Schema | None = None) -> CompiledPolicy:
    """Compile parsed files (in load order) into a CompiledPolicy; errors raise PolicyError."""
    diags: list[Diagnostic] = []
    warnings: list[Diagnostic] = []
    sets: dict[str, ast.SetDecl] = {}
    defaults: dict[str, ast.Default] = {}
    for pf in files:
        for st in pf.statements:
            if isinstance(st, ast.SetDecl):
                prev = sets.get(st.name)
                if prev is not None:
                    diags.append(
                        Diagnostic(
                            st.span.file,
                            st.span.line,
                            st.span.col,
                            f"set {st.name!r} is already declared at {prev.span}",
                            code="duplicate-set",
                        )
                    )
                else:
                    sets[st.name] = st
            elif isinstance(st, ast.Default):
                prev_d = defaults.get(st.kind)
                if prev_d is not None and prev_d.effect != st.effect:
                    diags.append(
                        Diagnostic(
                            st.span.file,
                            st.span.line,
                            st.span.col,
                            f"'default {st.kind} {st.effect}' conflicts with "
                            f"'default {st.kind} {prev_d.effect}' at {prev_d.span}",
                            code="conflicting-default",
                        )
                    )
                elif prev_d is None:
                    defaults[st.kind] = st

    gen = _Gen(sets, diags)
    rules: list[CRule] = []
    pending: list[tuple[CRule, str | None, str | None, str | None]] = []

    def target_patterns(t: ast.Target) -> tuple[str, ...] | None:
        if t.any:
            return None
        if t.set_name is not None:
            decl = sets.get(t.set_name)
            if decl is None:
                gen.error(t.span, f"undefined set {t.set_name!r}")
                return ()
            if decl.set_kind == "values":
                gen.error(
                    t.span, f"{t.set_name!r} is a values set; a target takes a tools or models set"
                )
                return ()
            return tuple(str(i.value) for i in decl.items)
        return t.patterns

    indexes = {
        k: TargetIndex() for k in ("call", "tool", "result", "model", "limit-call", "limit-model")
    }
    context_rules: list[CRule] = []
    for pf in files:
        file_mode = _file_mode(pf)
        for st in pf.statements:
            if not isinstance(st, (ast.Rule, ast.LimitRule)):
                continue
            if isinstance(st, ast.Rule):
                kind, effect = st.kind, st.effect
            else:
                kind, effect = f"limit-{st.kind}", "limit"
            mode = _rule_mode(st) or file_mode
            cr = CRule(
                index=len(rules),
                rule=st,
                rule_id=st.rule_id,
                kind=kind,
                effect=effect,
                shadow=mode == "shadow",
                reason=st.reason,
                location=str(st.span),
                condition=st.condition,
            )
            rules.append(cr)
            hoist_src, resid_src, by_src = _compile_condition(gen, cr, st)
            pending.append((cr, hoist_src, resid_src, by_src))
            if kind == "context":
                context_rules.append(cr)
            else:
                indexes[kind].add(cr.index, target_patterns(st.target))
    if diags:
        raise PolicyError(diags)
    namespace = gen.build()
    for cr, h, rsrc, b in pending:
        cr.hoisted = namespace[h] if h else None
        cr.residual = namespace[rsrc] if rsrc else None
        cr.by = namespace[b] if b else None
    set_values: dict[str, Any] = {}
    for name, decl in sets.items():
        if decl.set_kind == "values":
            set_values[name] = tuple(i.value for i in decl.items)
        else:
            set_values[name] = PatternSet(name, tuple(str(i.value) for i in decl.items))
    return CompiledPolicy(
        rules=tuple(rules),
        defaults={k: d.effect for k, d in defaults.items()},
        schema=schema,
        sets=set_values,
        indexes=indexes,
        context_rules=tuple(context_rules),
        warnings=tuple(warnings),
        namespace=namespace,
    )


def _rule_mode(st: ast.Rule | ast.LimitRule) -> str | None:
    for a in st.annotations:
        if a.name == "mode" and a.args and isinstance(a.args[0], str):
            return a.args[0]
    return None


_PARAMS = "I, A, T, C, R, X"


def _compile_condition(
    gen: _Gen, cr: CRule, st: ast.Rule | ast.LimitRule
) -> tuple[str | None, str | None, str | None]:
    by_name: str | None = None
    if isinstance(st, ast.LimitRule):
        by = st.by or ast.Path("identity", ("sub",))
        by_name = gen.function(_PARAMS, gen.value(by, cr.kind))
    cond = st.condition
    if cond is None:
        return None, None, by_name
    items = cond.items if isinstance(cond, ast.And) else (cond,)
    available = _ROOTS_BY_KIND[cr.kind]
    all_roots: set[str] = set()
    hoist: list[ast.Expr] = []
    rest: list[ast.Expr] = []
    unknown: list[bool] = []  # per item of rest: reads the arguments
    for item in items:
        roots = roots_of(item) & available
        all_roots |= roots
        if roots <= {"identity"}:
            hoist.append(item)
        else:
            rest.append(item)
            unknown.append(bool(roots & {"args", "destinations"}))
    cr.uses_unknown = any(unknown)
    cr.roots = gen.interned(frozenset(all_roots))
    h = None
    if hoist:
        cr.hoisted_src = " and ".join(gen.cond(e, cr.kind) for e in hoist)
        h = gen.function("I", cr.hoisted_src)
    r = None
    if rest:
        rest_src = [gen.cond(e, cr.kind) for e in rest]
        cr.residual_src = " and ".join(rest_src)
        r = gen.function(_PARAMS, cr.residual_src)
        if cr.uses_unknown and cr.kind in ("call", "tool"):
            known = [src for src, u in zip(rest_src, unknown, strict=True) if not u]
            requirements: list[ast.Expr] | None = []
            for e, u in zip(rest, unknown, strict=True):
                if u and requirements is not None:
                    needed = _unknown_unless(e)
                    requirements = None if needed is None else requirements + needed
            if requirements is not None:
                seen = len(gen.diags)  # these values were generated above: errors are reported
                known += [f"({gen.value(v, cr.kind)}) is not MISSING" for v in requirements]
                del gen.diags[seen:]
                cr.known_src = " and ".join(known) if known else None
                cr.unknown_static = True
    return h, r, by_name


def _unknown_unless(e: ast.Expr) -> list[ast.Expr] | None:
    """With the arguments unknown, is ``e`` unknown except when some value is missing?

    For the conjuncts of call and tool rules that read ``args`` or
    ``destinations``. Returns the values (none of which read the arguments) such
    that ``e`` is false when one of them is missing and unknown otherwise, or
    None when ``e`` is not of that form (it is then walked). Mirrors
    ``Walker.truth``: a comparison is false when an operand is missing, else
    unknown when an operand is unknown; so an argument compared with something
    that cannot be missing (a literal, a list, a set) is always unknown.
    """
    if isinstance(e, ast.Path):
        return [] if e.root in ("args", "destinations") else None
    if isinstance(e, ast.Not):  # not(false) is true: only an always-unknown operand stays so
        return [] if _unknown_unless(e.operand) == [] else None
    if isinstance(e, ast.Or):
        return [] if all(_unknown_unless(i) == [] for i in e.items) else None
    if isinstance(e, ast.And):
        out: list[ast.Expr] = []
        for i in e.items:
            needed = _unknown_unless(i)
            if needed is None:
                return None
            out += needed
        return out
    if isinstance(e, ast.From):
        return [] if _unknown_value(e.value) else None
    if isinstance(e, ast.Compare):
        if e.op in ("matches", "like"):
            return [] if _unknown_value(e.left) else None
        for u, other in ((e.left, e.right), (e.right, e.left)):
            if _unknown_value(u):
                if _never_missing(other):
                    return []
                if not roots_of(other) & {"args", "destinations"}:
                    return [other]
        return None
    return None


def _unknown_value(e: ast.Expr) -> bool:
    """Whether the walker gives UNKNOWN for the value ``e`` when the arguments are unknown."""
    if isinstance(e, ast.Path):
        return e.root in ("args", "destinations")
    if isinstance(e, ast.ListExpr):
        return any(_unknown_value(i) for i in e.items)
    if isinstance(e, ast.Concat):  # missing wins over unknown in a concatenation
        return all(_never_missing(i) for i in e.items) and any(_unknown_value(i) for i in e.items)
    return False


def _never_missing(e: ast.Expr) -> bool:
    # A set reference always resolves: an undefined one fails compilation.
    return isinstance(e, (ast.Lit, ast.ListExpr, ast.SetRef)) or _unknown_value(e)


def decision_with_trace(d: Decision, trace: Sequence[RuleTrace]) -> Decision:
    return Decision(
        d.kind,
        d.effect,
        rule_ids=d.rule_ids,
        reasons=d.reasons,
        shadow_hits=d.shadow_hits,
        overridden=d.overridden,
        defaulted=d.defaulted,
        route=d.route,
        redact_patterns=d.redact_patterns,
        paths=d.paths,
        options=d.options,
        trace=tuple(trace),
    )
