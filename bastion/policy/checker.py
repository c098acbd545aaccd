"""Static checks on parsed policy files (``bastion check``).

The checker reads the AST only; it never compiles or evaluates. Every finding is
a positioned :class:`Diagnostic` with a ``code``:

errors (the policy is wrong)
  ``undefined-set``, ``duplicate-set``, ``wrong-set-kind``, ``regex``,
  ``type-mismatch`` (a comparison that can never hold as written), and with a
  schema ``unknown-attribute``, ``unknown-argument``, ``no-matching-tool``;
  with ``redaction_names``, ``redaction-entry`` (a ``redact ... using`` entry
  that is neither a known detector or group name nor a valid pattern).
warnings (the policy works but says something it does not mean)
  ``shadowed-rule`` (a rule whose effect can never win), ``redundant-rule``,
  ``duplicate-id``, ``unused-set``, ``conflicting-default``,
  ``unavailable-attribute`` (``args`` in a model rule and the like, always
  missing), ``redaction-name`` (a ``using`` entry that reads as a mistyped
  detector name but, being a valid pattern, would be matched literally), and
  without a schema ``unknown-attribute`` for the fixed roots
  (``tool``, ``model``, ``request``, ``result``).

Types come from literals, from the built-in attributes (``identity.groups`` is a
list, ``context.tainted`` a boolean) and from the schema when one is given.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any, Protocol

from bastion.policy import ast
from bastion.policy.diagnostics import Diagnostic, Severity
from bastion.policy.formatter import format_expr
from bastion.policy.regex import RegexError
from bastion.policy.regex import parse as parse_regex

__all__ = ["SchemaLike", "check"]


class ToolDeclLike(Protocol):
    @property
    def args(self) -> Mapping[str, Any]: ...


class SchemaLike(Protocol):
    """What the checker reads of :class:`bastion.policy.schema.Schema`."""

    @property
    def identity(self) -> Mapping[str, str]: ...

    @property
    def context(self) -> Mapping[str, str]: ...

    @property
    def tools(self) -> Mapping[str, Any]: ...


ANY = "any"
IDENTITY_ATTRS = {
    "sub": "string",
    "subject": "string",
    "groups": "list[string]",
    "roles": "list[string]",
    "email": "string",
    "tenant": "string",
    "key_id": "string",
    "issuer": "string",
    "scopes": "list[string]",
    "auth_method": "string",
    "anonymous": "boolean",
}
CONTEXT_ATTRS = {
    "tainted": "boolean",
    "taint_sources": "list[string]",
    "session": "string",
    "turn": "number",
    "user_text": "string",
}
TOOL_HINTS = ("readOnlyHint", "destructiveHint", "idempotentHint", "openWorldHint")
FIXED_ROOTS: dict[str, dict[str, str]] = {
    "tool": {
        "name": "string",
        "server": "string",
        "description": "string",
        "title": "string",
        "effect": "string",
        "destinations": "list[string]",
        "annotations": "object",
        **dict.fromkeys(TOOL_HINTS, "boolean"),
    },
    "model": {"name": "string", "provider": "string", "protocol": "string", "max_tokens": "number"},
    "request": {
        "method": "string",
        "path": "string",
        "client": "string",
        "protocol": "string",
        "headers": "object",
        "id": "string",
    },
    "result": {"text": "string", "is_error": "boolean", "content": ANY},
}
# The roots each kind of event provides; any other root is always missing.
AVAILABLE_ROOTS: dict[str, frozenset[str]] = {
    "call": frozenset({"identity", "args", "tool", "context", "request", "destinations"}),
    "tool": frozenset({"identity", "tool", "context", "request"}),
    "result": frozenset(
        {"identity", "args", "tool", "context", "request", "result", "destinations"}
    ),
    "model": frozenset({"identity", "model", "context", "request"}),
    "context": frozenset({"identity", "context", "request"}),
}
# Precedence within a kind: a higher rank beats a lower one.
RANKS: dict[str, dict[str, int]] = {
    "call": {"allow": 0, "ask": 1, "forbid": 2},
    "tool": {"show": 0, "hide": 1},
    "model": {"allow": 0, "forbid": 1},
    "result": {"trusted": 0, "untrusted": 1, "quarantine": 2, "block": 3},
    "context": {"trusted": 0, "untrusted": 1},
}
IMPLICIT_DEFAULTS = {"call": "deny", "result": "untrusted", "model": "deny", "context": "trusted"}
# A rule with the lowest effect of its kind adds nothing under a default with that effect.
LOWEST = {"call": "allow", "result": "trusted", "model": "allow", "context": "trusted"}
SET_KIND_FOR = {"call": "tools", "tool": "tools", "result": "tools", "model": "models"}
ORDERED = frozenset({"string", "number"})
_JSON_TYPES = {
    "string": "string",
    "number": "number",
    "integer": "number",
    "boolean": "boolean",
    "object": "object",
    "null": "null",
}


@cache
def _glob(pattern: str) -> re.Pattern[str]:
    out = ["(?s:"]
    for c in pattern:
        out.append(".*" if c == "*" else "." if c == "?" else re.escape(c))
    out.append(r")\Z")
    return re.compile("".join(out))


def glob_match(pattern: str, name: str) -> bool:
    """The language's glob: ``*`` any run, ``?`` one character, whole name."""
    return _glob(pattern).match(name) is not None


def _covers(outer: str, inner: str) -> bool:
    """True when every name ``inner`` matches, ``outer`` matches too (conservative)."""
    if outer == inner or outer == "*":
        return True
    if not any(c in inner for c in "*?"):
        return glob_match(outer, inner)
    body = outer[:-1]
    return outer.endswith("*") and not any(c in body for c in "*?") and inner.startswith(body)


def _base(t: str) -> str:
    return "list" if t.startswith(("list", "set:")) else t


def _lit_type(v: object) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int | float):
        return "number"
    return "string"


def _describe(t: str) -> str:
    if t.startswith("set:"):
        return f"a {t[4:]} set"
    if t.startswith("list"):
        return "a list"
    return {"object": "an object", "null": "null"}.get(t, f"a {t}")


def _json_type(s: Any) -> str:
    if not isinstance(s, Mapping):
        return ANY
    t = s.get("type")
    if t == "array":
        items = _json_type(s.get("items"))
        return f"list[{items}]" if items in ORDERED else "list"
    return _JSON_TYPES.get(t, ANY) if isinstance(t, str) else ANY


def _mentions(e: ast.Expr | None, root: str) -> bool:
    if e is None:
        return False
    if isinstance(e, ast.Path):
        return e.root == root
    children: Iterable[ast.Expr]
    if isinstance(e, ast.ListExpr | ast.Concat | ast.And | ast.Or):
        children = e.items
    elif isinstance(e, ast.Compare):
        children = (e.left, e.right)
    elif isinstance(e, ast.From):
        children = (e.value,)
    elif isinstance(e, ast.Not):
        children = (e.operand,)
    else:
        children = ()
    return any(_mentions(c, root) for c in children)


@dataclass
class _RuleInfo:
    stmt: ast.Rule
    shadow: bool
    patterns: tuple[str, ...] | None  # None: every name


# What a detector or group name looks like; a pattern of this shape matches itself.
_NAME_LIKE = re.compile(r"[A-Za-z][A-Za-z0-9_-]*\Z")


def _did_you_mean(entry: str, names: Collection[str]) -> str | None:
    by_lower = {n.lower(): n for n in names}
    if entry.lower() in by_lower:
        return by_lower[entry.lower()]
    close = difflib.get_close_matches(entry.lower(), list(by_lower), n=1, cutoff=0.75)
    return by_lower[close[0]] if close else None


class _Checker:
    def __init__(
        self,
        files: Sequence[ast.PolicyFile],
        schema: SchemaLike | None,
        redaction_names: Collection[str] | None = None,
    ) -> None:
        self.files = files
        self.schema = schema
        self.redaction_names = redaction_names
        self.diags: list[Diagnostic] = []
        self.sets: dict[str, ast.SetDecl] = {}
        self.used: set[str] = set()
        self.tool_names: tuple[str, ...] = tuple(schema.tools) if schema is not None else ()

    # -- reporting
    def report(self, span: ast.Span, code: str, message: str, severity: Severity = "error") -> None:
        self.diags.append(
            Diagnostic(
                span.file,
                span.line,
                span.col,
                message,
                severity=severity,
                code=code,
                end_line=span.end_line,
                end_col=span.end_col,
            )
        )

    def warn(self, span: ast.Span, code: str, message: str) -> None:
        self.report(span, code, message, "warning")

    # -- driver
    def run(self) -> list[Diagnostic]:
        self.declarations()
        infos: list[_RuleInfo] = []
        for pf in self.files:
            for stmt in pf.statements:
                if isinstance(stmt, ast.Rule):
                    infos.append(self.rule(stmt, pf))
                elif isinstance(stmt, ast.LimitRule):
                    self.limit(stmt)
        self.precedence(infos)
        for name, decl in self.sets.items():
            if name not in self.used:
                self.warn(decl.span, "unused-set", f"set {name!r} is declared but never used")
        return sorted(self.diags, key=lambda d: (d.file, d.line, d.col, d.code))

    def declarations(self) -> None:
        ids: dict[str, ast.Span] = {}
        defaults: dict[str, ast.Default] = {}
        for pf in self.files:
            for stmt in pf.statements:
                if isinstance(stmt, ast.SetDecl):
                    first = self.sets.get(stmt.name)
                    if first is not None:
                        self.report(
                            stmt.span,
                            "duplicate-set",
                            f"set {stmt.name!r} is already declared at {first.span}",
                        )
                    else:
                        self.sets[stmt.name] = stmt
                    self.set_patterns(stmt)
                elif isinstance(stmt, ast.Default):
                    prev = defaults.get(stmt.kind)
                    if prev is not None and prev.effect != stmt.effect:
                        self.warn(
                            stmt.span,
                            "conflicting-default",
                            f"'default {stmt.kind} {stmt.effect}' conflicts with "
                            f"'default {prev.kind} {prev.effect}' at {prev.span}",
                        )
                    defaults[stmt.kind] = stmt
                elif isinstance(stmt, ast.Rule | ast.LimitRule) and stmt.explicit_id is not None:
                    rid = stmt.explicit_id
                    ann = next(a for a in stmt.annotations if a.name == "id")
                    if rid in ids:
                        self.warn(
                            ann.span,
                            "duplicate-id",
                            f"rule id {rid!r} is already used at {ids[rid]}; "
                            "decisions and audit records cannot tell the rules apart",
                        )
                    else:
                        ids[rid] = ann.span
        self.defaults = {k: d.effect for k, d in defaults.items()}

    def set_patterns(self, decl: ast.SetDecl) -> None:
        if decl.set_kind != "tools" or not self.tool_names:
            return
        for item in decl.items:
            if isinstance(item.value, str):
                self.tool_pattern(item.value, item.span)

    def tool_pattern(self, pattern: str, span: ast.Span) -> None:
        if not any(glob_match(pattern, n) for n in self.tool_names):
            self.report(
                span,
                "no-matching-tool",
                f"pattern {pattern!r} matches no tool of the schema",
            )

    # -- targets
    def target(
        self, t: ast.Target, kind: str, rule_kind: str
    ) -> tuple[tuple[str, ...] | None, list[str] | None]:
        """The target's patterns (None: everything) and the schema tools it can match."""
        want = SET_KIND_FOR.get(kind)
        patterns: tuple[str, ...] | None
        if t.set_name is not None:
            self.used.add(t.set_name)
            decl = self.sets.get(t.set_name)
            if decl is None:
                self.report(t.span, "undefined-set", f"undefined set {t.set_name!r}")
                return None, None
            if want is not None and decl.set_kind != want:
                self.report(
                    t.span,
                    "wrong-set-kind",
                    f"{t.set_name!r} is a {decl.set_kind} set; a {rule_kind} rule "
                    f"targets a {want} set",
                )
                return None, None
            patterns = tuple(str(i.value) for i in decl.items)
        elif t.any:
            patterns = None
        else:
            patterns = t.patterns
            if want == "tools" and self.tool_names:
                for p in patterns:
                    self.tool_pattern(p, t.span)
        if want != "tools" or not self.tool_names:
            return patterns, None
        names = [
            n
            for n in self.tool_names
            if patterns is None or any(glob_match(p, n) for p in patterns)
        ]
        return patterns, names

    # -- rules
    def rule(self, stmt: ast.Rule, pf: ast.PolicyFile) -> _RuleInfo:
        patterns, tools = self.target(stmt.target, stmt.kind, f"{stmt.kind}")
        env = _Env(stmt.kind, tools)
        for e in (*stmt.when, *stmt.unless):
            self.condition(e, env)
        if self.redaction_names is not None:
            for n, entry in enumerate(stmt.using, 1):
                self.redaction_entry(stmt.span, n, entry, self.redaction_names)
        mode = stmt.mode or pf.mode
        return _RuleInfo(stmt, mode == "shadow", patterns)

    def redaction_entry(self, span: ast.Span, n: int, entry: str, names: Collection[str]) -> None:
        # The AST keeps no position per entry: the rule's, and the entry's number.
        if entry in names:
            return
        # A stray quote or bracket is what makes a name an invalid pattern.
        bare = entry.strip(" \t\"'()[]{},;.")
        suggestion = _did_you_mean(bare, names) if _NAME_LIKE.match(bare) else None
        hint = f"; did you mean {suggestion!r}?" if suggestion is not None else ""
        where = f"'using' entry {n} ({entry!r})"
        try:
            parse_regex(entry)
        except RegexError as exc:
            self.report(
                span,
                "redaction-entry",
                f"{where} is neither a redaction detector or group nor a valid "
                f"pattern: {exc}{hint}",
            )
            return
        if suggestion is not None:
            self.warn(
                span,
                "redaction-name",
                f"{where} is not a redaction detector or group, so it is a pattern "
                f"matching that text literally{hint}",
            )

    def limit(self, stmt: ast.LimitRule) -> None:
        _, tools = self.target(stmt.target, stmt.kind, f"{stmt.kind} limit")
        env = _Env(stmt.kind, tools)
        if stmt.by is not None:
            self.expr(stmt.by, env)
        for e in (*stmt.when, *stmt.unless):
            self.condition(e, env)

    # -- expressions
    def condition(self, e: ast.Expr, env: _Env) -> None:
        t = self.expr(e, env)
        if t not in (ANY, "boolean"):
            what = e.dotted() if isinstance(e, ast.Path) else "this expression"
            self.report(
                e.span,
                "type-mismatch",
                f"a condition must be true or false, but {what} is {_describe(t)}",
            )

    def expr(self, e: ast.Expr, env: _Env) -> str:
        if isinstance(e, ast.Lit):
            return _lit_type(e.value)
        if isinstance(e, ast.ListExpr):
            types = {self.expr(i, env) for i in e.items}
            return f"list[{types.pop()}]" if len(types) == 1 and types <= ORDERED else "list"
        if isinstance(e, ast.Path):
            return self.path(e, env)
        if isinstance(e, ast.SetRef):
            return self.set_ref(e)
        if isinstance(e, ast.Concat):
            types = {self.expr(i, env) for i in e.items} - {ANY}
            if len(types) > 1 or not types <= ORDERED:
                kinds = " and ".join(sorted(_describe(t) for t in types))
                self.report(
                    e.span,
                    "type-mismatch",
                    f"'+' joins strings or adds numbers, not {kinds}",
                )
                return ANY
            return types.pop() if types else ANY
        if isinstance(e, ast.Compare):
            self.compare(e, self.expr(e.left, env), self.expr(e.right, env))
            return "boolean"
        if isinstance(e, ast.From):
            self.expr(e.value, env)
            return "boolean"
        if isinstance(e, ast.Not):
            self.condition(e.operand, env)
            return "boolean"
        for item in e.items:
            self.condition(item, env)
        return "boolean"

    def set_ref(self, e: ast.SetRef) -> str:
        self.used.add(e.name)
        decl = self.sets.get(e.name)
        if decl is None:
            hint = ""
            for root, attrs in (("context", CONTEXT_ATTRS), ("identity", IDENTITY_ATTRS)):
                if e.name in attrs:
                    hint = f" (did you mean {root}.{e.name}?)"
            self.report(e.span, "undefined-set", f"undefined set {e.name!r}{hint}")
            return ANY
        return f"set:{decl.set_kind}"

    def compare(self, e: ast.Compare, lt: str, rt: str) -> None:
        op = e.op

        def mismatch(msg: str) -> None:
            self.report(e.span, "type-mismatch", msg)

        if op == "matches" and isinstance(e.right, ast.Lit) and isinstance(e.right.value, str):
            try:
                parse_regex(e.right.value)
            except RegexError as exc:
                self.report(e.right.span, "regex", f"invalid regular expression: {exc}")
        known = lt != ANY and rt != ANY
        if op in ("<", "<=", ">", ">="):
            if known and (lt not in ORDERED or rt not in ORDERED or lt != rt):
                mismatch(
                    f"'{op}' compares two numbers or two strings, not "
                    f"{_describe(lt)} and {_describe(rt)}: it is always false"
                )
        elif op in ("==", "!="):
            if known and "null" not in (lt, rt) and _base(lt) != _base(rt):
                result = "false" if op == "==" else "true"
                hint = ""
                if _base(lt) == "list" and rt in ORDERED:
                    hint = f"; to test membership write '{format_expr(e.left)} has {format_expr(e.right)}'"
                mismatch(
                    f"{_describe(lt)} is never equal to {_describe(rt)}: "
                    f"this is always {result}{hint}"
                )
        elif op == "has":
            if lt != ANY and _base(lt) not in ("list", "object"):
                mismatch(f"'has' needs a list, set or object on its left, not {_describe(lt)}")
            elif lt.startswith("list[") and rt in ORDERED | {"boolean"} and lt != f"list[{rt}]":
                mismatch(f"{_describe(rt)} is never an element of a list of {lt[5:-1]}s")
        elif op in ("in", "not in"):
            if rt != ANY and _base(rt) not in ("list", "object", "string"):
                mismatch(
                    f"'{op}' needs a list, set, object or string on its right, not {_describe(rt)}"
                )
            elif rt == "string" and lt != ANY and lt != "string":
                mismatch(f"'{op}' a string tests for a substring; {_describe(lt)} is never one")
            elif rt.startswith("list[") and lt in ORDERED | {"boolean"} and rt != f"list[{lt}]":
                mismatch(f"{_describe(lt)} is never an element of a list of {rt[5:-1]}s")
            elif rt in ("set:tools", "set:models") and lt not in (ANY, "string"):
                mismatch(f"a {rt[4:]} set holds name patterns; {_describe(lt)} never matches one")
        elif op in ("startswith", "endswith", "matches", "like"):
            for side, t in (("left", lt), ("right", rt)):
                if t not in (ANY, "string"):
                    mismatch(f"'{op}' works on strings; its {side} side is {_describe(t)}")
        elif op == "contains" and lt != ANY and _base(lt) not in ("list", "string"):
            mismatch(f"'contains' needs a string or list on its left, not {_describe(lt)}")

    def path(self, p: ast.Path, env: _Env) -> str:
        if p.root not in AVAILABLE_ROOTS[env.kind]:
            self.warn(
                p.span,
                "unavailable-attribute",
                f"{p.dotted()} is always missing in a {env.kind} rule "
                f"(available: {', '.join(sorted(AVAILABLE_ROOTS[env.kind]))})",
            )
            return ANY
        if p.root == "destinations":
            return self.deeper("list", p.parts, p)
        if not p.parts:
            return "object"
        first, rest = p.parts[0], p.parts[1:]
        if p.root == "args":
            return self.argument(p, env)
        if isinstance(first, int):
            self.report(p.span, "type-mismatch", f"{p.root} is an object, not a list")
            return ANY
        if p.root in ("identity", "context"):
            builtin = IDENTITY_ATTRS if p.root == "identity" else CONTEXT_ATTRS
            declared: Mapping[str, str] = {}
            if self.schema is not None:
                declared = self.schema.identity if p.root == "identity" else self.schema.context
            t = builtin.get(first) or declared.get(first)
            if t is None:
                if self.schema is not None:
                    self.report(
                        p.span,
                        "unknown-attribute",
                        f"{p.root}.{first} is not a built-in attribute and the schema "
                        "does not declare it",
                    )
                return ANY
            return self.deeper(t, rest, p)
        attrs = FIXED_ROOTS[p.root]
        t = attrs.get(first)
        if t is None:
            self.report(
                p.span,
                "unknown-attribute",
                f"{p.root} has no attribute {first!r} (known: {', '.join(sorted(attrs))})",
                "error" if self.schema is not None else "warning",
            )
            return ANY
        if p.root == "tool" and first == "annotations":
            if rest and rest[0] in TOOL_HINTS:
                return self.deeper("boolean", rest[1:], p)
            return ANY
        if p.root == "request" and first == "headers":
            return self.deeper("string", rest[1:], p) if rest else "object"
        return self.deeper(t, rest, p)

    def deeper(self, t: str, rest: tuple[str | int, ...], p: ast.Path) -> str:
        for part in rest:
            if t == ANY or t == "object":
                return ANY
            if _base(t) == "list" and isinstance(part, int):
                t = t[5:-1] if t.startswith("list[") else ANY
                continue
            self.report(
                p.span,
                "type-mismatch",
                f"{p.dotted()}: {_describe(t)} has no "
                + (f"element [{part}]" if isinstance(part, int) else f"attribute {part!r}"),
            )
            return ANY
        return t

    def argument(self, p: ast.Path, env: _Env) -> str:
        if self.schema is None or not env.tools:
            return ANY
        decls = [self.schema.tools[n] for n in env.tools]
        schemas = [getattr(d, "args", None) for d in decls]
        if not all(
            isinstance(s, Mapping) and isinstance(s.get("properties"), Mapping) for s in schemas
        ):
            return ANY  # some tool it applies to has no argument schema: nothing to check
        level: list[Mapping[str, Any]] = [s for s in schemas if isinstance(s, Mapping)]
        for depth, part in enumerate(p.parts):
            nxt: list[Mapping[str, Any]] = []
            for s in level:
                if isinstance(part, int):
                    if s.get("type") == "array" and isinstance(s.get("items"), Mapping):
                        nxt.append(s["items"])
                    elif s.get("type") not in (None, "array"):
                        continue
                    else:
                        return ANY
                else:
                    props = s.get("properties")
                    if isinstance(props, Mapping) and isinstance(props.get(part), Mapping):
                        nxt.append(props[part])
                    elif s.get("type") not in (None, "object") or isinstance(props, Mapping):
                        continue
                    else:
                        return ANY
            if not nxt:
                where = ".".join(str(x) for x in p.parts[:depth]) or "the arguments"
                tools = ", ".join(env.tools[:3]) + (", ..." if len(env.tools) > 3 else "")
                self.report(
                    p.span,
                    "unknown-argument",
                    f"{p.dotted()}: no tool this rule applies to ({tools}) has "
                    f"{'element' if isinstance(part, int) else 'argument'} "
                    f"{part!r} in {where}",
                )
                return ANY
            level = nxt
        types = {_json_type(s) for s in level}
        return types.pop() if len(types) == 1 else ANY

    # -- precedence findings
    def precedence(self, infos: list[_RuleInfo]) -> None:
        live = [i for i in infos if not i.shadow and i.stmt.effect != "redact"]
        for info in infos:
            stmt = info.stmt
            if info.shadow or stmt.effect == "redact":
                continue
            if self.by_default(stmt):
                continue
            winner = self.winner(info, live)
            if winner is not None:
                w = winner.stmt
                self.warn(
                    stmt.span,
                    "shadowed-rule",
                    f"this {stmt.effect} rule can never decide: the "
                    f"{_name(w)} at {w.span} applies whenever it does and takes precedence",
                )
                continue
            redundant = self.redundant_hide(info, live)
            if redundant is not None:
                f = redundant.stmt
                self.warn(
                    stmt.span,
                    "redundant-rule",
                    f"this hide rule adds nothing: the {_name(f)} at {f.span} "
                    "already hides every tool it covers",
                )
                continue
            dup = next(
                (
                    o
                    for o in live
                    if o.stmt is not stmt
                    and o.stmt.span.line
                    and _key(o.stmt) == _key(stmt)
                    and (o.stmt.span.file, o.stmt.span.line) < (stmt.span.file, stmt.span.line)
                ),
                None,
            )
            if dup is not None:
                self.warn(
                    stmt.span,
                    "redundant-rule",
                    f"this rule repeats {_name(dup.stmt)} at {dup.stmt.span}",
                )

    def by_default(self, stmt: ast.Rule) -> bool:
        default = self.defaults.get(stmt.kind, IMPLICIT_DEFAULTS.get(stmt.kind))
        if LOWEST.get(stmt.kind) != stmt.effect or default != stmt.effect:
            return False
        if stmt.route is not None or stmt.at:
            return False  # it routes, or classifies fields the default does not
        explicit = stmt.kind in self.defaults
        self.warn(
            stmt.span,
            "redundant-rule",
            f"this {stmt.effect} rule changes nothing: the "
            f"{'' if explicit else 'implicit '}default for {stmt.kind} is already "
            f"{default}",
        )
        return True

    def winner(self, info: _RuleInfo, live: list[_RuleInfo]) -> _RuleInfo | None:
        stmt = info.stmt
        ranks = RANKS[stmt.kind]
        mine = ranks[stmt.effect]
        for other in live:
            o = other.stmt
            if o is stmt or not _implies(stmt.condition, o.condition):
                continue
            if not _target_covers(other.patterns, info.patterns):
                continue
            if o.kind == stmt.kind and ranks.get(o.effect, -1) > mine and not (o.at or stmt.at):
                return other
            # A tool hidden whatever the arguments cannot be called either.
            if (
                stmt.kind == "call"
                and stmt.effect != "forbid"
                and (o.kind, o.effect)
                == (
                    "tool",
                    "hide",
                )
            ):
                return other
        return None

    def redundant_hide(self, info: _RuleInfo, live: list[_RuleInfo]) -> _RuleInfo | None:
        stmt = info.stmt
        if stmt.kind != "tool" or stmt.effect != "hide":
            return None
        for other in live:
            o = other.stmt
            if (
                o.kind == "call"
                and o.effect == "forbid"
                and _implies(stmt.condition, o.condition)
                and not _mentions(o.condition, "args")
                and _target_covers(other.patterns, info.patterns)
            ):
                return other
        return None


@dataclass(frozen=True, slots=True)
class _Env:
    kind: str
    tools: list[str] | None  # schema tools the rule can apply to; None: unknown


def _name(stmt: ast.Rule) -> str:
    return f"{stmt.effect} rule {stmt.explicit_id!r}" if stmt.explicit_id else f"{stmt.effect} rule"


def _key(stmt: ast.Rule) -> tuple[Any, ...]:
    return (
        stmt.kind,
        stmt.effect,
        stmt.target,
        stmt.condition,
        stmt.route,
        stmt.at,
        stmt.using,
        stmt.options,
    )


def _implies(cond: ast.Expr | None, other: ast.Expr | None) -> bool:
    """Whenever ``cond`` holds, ``other`` holds (judged by structure only)."""
    if other is None or cond == other:
        return True
    if isinstance(cond, ast.And):
        return other in cond.items or (
            isinstance(other, ast.And) and all(i in cond.items for i in other.items)
        )
    return False


def _target_covers(outer: tuple[str, ...] | None, inner: tuple[str, ...] | None) -> bool:
    if outer is None:
        return True
    if inner is None:
        return False
    return all(any(_covers(o, i) for o in outer) for i in inner)


def check(
    files: Sequence[ast.PolicyFile],
    schema: SchemaLike | None = None,
    *,
    redaction_names: Collection[str] | None = None,
) -> list[Diagnostic]:
    """Statically check a policy's files; every finding, sorted by position.

    Sets and rule ids are global across ``files`` (the files of one policy,
    includes resolved). ``schema`` is a :class:`bastion.policy.schema.Schema`.
    ``redaction_names`` are the detector and group names a ``redact ... using``
    entry may give (``bastion.redaction.DETECTORS`` and ``GROUPS``); any other
    entry must be a pattern of the linear-time subset. Without them, ``using``
    entries are not checked (this package does not know the redactor's names).
    """
    return _Checker(files, schema, redaction_names).run()
