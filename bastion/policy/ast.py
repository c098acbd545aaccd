"""Immutable AST of the policy language, every node with its source span.

The parser builds these; the checker, the formatter, the compiler and the
reference interpreter read them. Nothing here evaluates anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

__all__ = [
    "ROOTS",
    "And",
    "Annotation",
    "Compare",
    "Concat",
    "Default",
    "Expr",
    "From",
    "Include",
    "LimitRule",
    "ListExpr",
    "Lit",
    "Not",
    "Or",
    "Path",
    "PolicyFile",
    "Rule",
    "SetDecl",
    "SetRef",
    "Span",
    "Statement",
    "Target",
]

# Roots a path may start with; any other bare name is a set reference.
ROOTS = frozenset(
    {"identity", "args", "tool", "context", "request", "model", "result", "destinations"}
)

CompareOp = Literal[
    "==",
    "!=",
    "<",
    "<=",
    ">",
    ">=",
    "in",
    "not in",
    "has",
    "startswith",
    "endswith",
    "contains",
    "matches",
    "like",
]
Source = Literal["untrusted", "user", "trusted"]


@dataclass(frozen=True, slots=True)
class Span:
    """Where a node came from: 1-based line and column."""

    file: str
    line: int
    col: int
    end_line: int = 0
    end_col: int = 0

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


NO_SPAN = Span("<builtin>", 0, 0)


# ---- expressions -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Lit:
    """A literal: string, number, boolean or null."""

    value: str | int | float | bool | None
    span: Span = field(default=NO_SPAN, compare=False)


@dataclass(frozen=True, slots=True)
class ListExpr:
    items: tuple[Expr, ...]
    span: Span = field(default=NO_SPAN, compare=False)


@dataclass(frozen=True, slots=True)
class Path:
    """``root.a.b[0]["c"]``: root is one of ROOTS; parts are names or list indexes."""

    root: str
    parts: tuple[str | int, ...]
    span: Span = field(default=NO_SPAN, compare=False)

    def dotted(self) -> str:
        out = self.root
        for p in self.parts:
            if isinstance(p, int):
                out += f"[{p}]"
            elif p.isidentifier():
                out += f".{p}"
            else:
                out += f'["{p}"]'
        return out


@dataclass(frozen=True, slots=True)
class SetRef:
    """A reference to a named set declared with ``tools``/``models``/``values``."""

    name: str
    span: Span = field(default=NO_SPAN, compare=False)


@dataclass(frozen=True, slots=True)
class Concat:
    """``a + b + c``: string concatenation (numbers add)."""

    items: tuple[Expr, ...]
    span: Span = field(default=NO_SPAN, compare=False)


@dataclass(frozen=True, slots=True)
class Compare:
    op: CompareOp
    left: Expr
    right: Expr
    span: Span = field(default=NO_SPAN, compare=False)


@dataclass(frozen=True, slots=True)
class From:
    """``value from untrusted|user|trusted``: argument provenance."""

    value: Expr
    source: Source
    span: Span = field(default=NO_SPAN, compare=False)


@dataclass(frozen=True, slots=True)
class Not:
    operand: Expr
    span: Span = field(default=NO_SPAN, compare=False)


@dataclass(frozen=True, slots=True)
class And:
    items: tuple[Expr, ...]
    span: Span = field(default=NO_SPAN, compare=False)


@dataclass(frozen=True, slots=True)
class Or:
    items: tuple[Expr, ...]
    span: Span = field(default=NO_SPAN, compare=False)


Expr: TypeAlias = Lit | ListExpr | Path | SetRef | Concat | Compare | From | Not | And | Or


# ---- declarations ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Annotation:
    """``@name(arg, ...)`` before a rule or before the file's ``policy`` header."""

    name: str
    args: tuple[str | int | float | bool | None, ...]
    span: Span = field(default=NO_SPAN, compare=False)


def annotation_text(annotations: tuple[Annotation, ...], name: str) -> str | None:
    """The string argument of the ``@name(...)`` annotation, if present."""
    for a in annotations:
        if a.name == name and a.args and isinstance(a.args[0], str):
            return a.args[0]
    return None


@dataclass(frozen=True, slots=True)
class Target:
    """What a rule applies to: glob patterns, a named set, or everything.

    Exactly one of ``patterns`` and ``set_name`` is set, unless the target is
    ``any`` (``*`` or omitted), in which case both are empty.
    """

    patterns: tuple[str, ...] = ()
    set_name: str | None = None
    is_list: bool = False
    span: Span = field(default=NO_SPAN, compare=False)

    @property
    def any(self) -> bool:
        return not self.patterns and self.set_name is None


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule. ``kind`` is the event it decides; ``effect`` what it says.

    kinds and their effects:
      call: allow, forbid, ask | tool: hide, show | model: allow, forbid
      result: trusted, untrusted, quarantine, redact, block | context: trusted, untrusted
    ``condition`` is the conjunction of ``when`` clauses and negated ``unless``
    clauses (None: unconditional). ``at`` holds JSON paths of a field-level result
    rule; ``using`` redaction pattern names or regexes; ``options`` the ``with``
    object (quarantine settings and such).
    """

    effect: str
    kind: str
    target: Target
    condition: Expr | None = None
    when: tuple[Expr, ...] = ()
    unless: tuple[Expr, ...] = ()
    reason: str | None = None
    route: str | None = None
    at: tuple[str, ...] = ()
    using: tuple[str, ...] = ()
    options: tuple[tuple[str, Any], ...] = ()
    annotations: tuple[Annotation, ...] = ()
    span: Span = field(default=NO_SPAN, compare=False)

    @property
    def explicit_id(self) -> str | None:
        return annotation_text(self.annotations, "id")

    @property
    def rule_id(self) -> str:
        """The ``@id`` if given, else ``file:line``."""
        return self.explicit_id or f"{self.span.file}:{self.span.line}"

    @property
    def mode(self) -> str | None:
        return annotation_text(self.annotations, "mode")


@dataclass(frozen=True, slots=True)
class LimitRule:
    """``limit call|model TARGET to N [calls|tokens] per WINDOW [by PATH] [when ...]``."""

    kind: str
    target: Target
    amount: int
    unit: str
    window_seconds: int
    by: Path | None = None
    condition: Expr | None = None
    when: tuple[Expr, ...] = ()
    unless: tuple[Expr, ...] = ()
    reason: str | None = None
    annotations: tuple[Annotation, ...] = ()
    span: Span = field(default=NO_SPAN, compare=False)

    @property
    def explicit_id(self) -> str | None:
        return annotation_text(self.annotations, "id")

    @property
    def rule_id(self) -> str:
        return self.explicit_id or f"{self.span.file}:{self.span.line}"


@dataclass(frozen=True, slots=True)
class SetDecl:
    """``tools|models|values NAME = [...]``."""

    set_kind: str
    name: str
    items: tuple[Lit, ...]
    span: Span = field(default=NO_SPAN, compare=False)


@dataclass(frozen=True, slots=True)
class Default:
    """``default call|result|model|context EFFECT``."""

    kind: str
    effect: str
    span: Span = field(default=NO_SPAN, compare=False)


@dataclass(frozen=True, slots=True)
class Include:
    path: str
    span: Span = field(default=NO_SPAN, compare=False)


Statement: TypeAlias = Include | Default | SetDecl | Rule | LimitRule


@dataclass(frozen=True, slots=True)
class Comment:
    """A source comment, kept only so the formatter can put it back."""

    text: str
    line: int
    col: int


@dataclass(frozen=True, slots=True)
class PolicyFile:
    """One parsed ``.policy`` file."""

    path: str
    name: str | None = None
    annotations: tuple[Annotation, ...] = ()
    statements: tuple[Statement, ...] = ()
    comments: tuple[Comment, ...] = field(default=(), compare=False)
    header_span: Span | None = field(default=None, compare=False)

    @property
    def mode(self) -> str | None:
        return annotation_text(self.annotations, "mode")
