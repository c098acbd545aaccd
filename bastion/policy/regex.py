"""Linear-time regular expressions for the policy operator ``matches``.

The text a policy matches against (arguments, tool output, user messages) is
written by whoever talks to the agent, so a pattern must never be able to take
more than linear time in it. Every pattern is parsed here first, always, and
only this subset is accepted (the same subset on both execution paths, so a
policy behaves the same with or without RE2):

- literal characters and escaped punctuation (``\\.``, ``\\(``...), ``\\n \\r \\t \\f \\v``;
- ``.`` (any character but a newline), the ASCII classes ``\\d \\D \\w \\W \\s \\S``
  (``\\s`` is ``[\\t\\n\\f\\r ]`` as in RE2);
- bracket classes ``[a-z_]``, ``[^...]`` with ranges and the class escapes;
- anchors ``^`` (start of text) and ``$`` (end of text only, as RE2), ASCII word
  boundaries ``\\b`` and ``\\B``;
- groups ``(...)`` and ``(?:...)``, alternation ``|``;
- quantifiers ``* + ? {n} {n,} {n,m}`` with counts up to 1000, optionally lazy
  (``*?``), which does not change whether a search succeeds;
- the flag ``(?i)`` at the very start of the pattern.

Back-references, look-around, other flags and named classes are rejected with a
``RegexError`` carrying the offset of the problem. Execution uses RE2
(``pip install 'bastion-guard[re2]'``) when it is importable and otherwise a
Pike VM: a Thompson NFA simulated with the set of live states per character,
which cannot backtrack, so a search costs O(len(text) x program size).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["MAX_PROGRAM", "MAX_REPEAT", "Regex", "RegexError", "compile_regex", "engine_name"]

MAX_REPEAT = 1000
MAX_PROGRAM = 20_000

try:  # optional extra [re2]
    import re2 as _re2
except ImportError:  # pragma: no cover - the dev environment installs it
    _re2 = None


class RegexError(ValueError):
    """A pattern outside the supported subset; ``offset`` is 0-based in the pattern."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(f"{message} (at offset {offset})")
        self.message = message
        self.offset = offset


# ---- syntax ------------------------------------------------------------------

_WORD = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
_DIGIT = frozenset("0123456789")
_SPACE = frozenset("\t\n\f\r ")
_CONTROL = {"n": "\n", "r": "\r", "t": "\t", "f": "\f", "v": "\v"}
_CLASS_ESCAPES = {
    "d": (_DIGIT, False),
    "D": (_DIGIT, True),
    "w": (_WORD, False),
    "W": (_WORD, True),
    "s": (_SPACE, False),
    "S": (_SPACE, True),
}

# Nodes are tuples: ("char", c) ("any",) ("class", negated, items) ("cat", nodes)
# ("alt", nodes) ("rep", node, min, max|None) ("assert", kind) ("empty",)
# class items: ("c", c) ("range", lo, hi) ("set", frozenset, negated)
Node = tuple[Any, ...]


class _Parser:
    def __init__(self, pattern: str) -> None:
        self.p = pattern
        self.i = 0
        self.ignore_case = False

    def error(self, message: str, at: int | None = None) -> RegexError:
        return RegexError(message, self.i if at is None else at)

    def peek(self) -> str | None:
        return self.p[self.i] if self.i < len(self.p) else None

    def parse(self) -> Node:
        if self.p.startswith("(?i)"):
            self.ignore_case = True
            self.i = 4
        node = self.alternation()
        if self.i < len(self.p):
            # Only a stray ')' can stop the top-level alternation early.
            raise self.error("unbalanced ')'")
        return node

    def alternation(self) -> Node:
        branches = [self.concatenation()]
        while self.peek() == "|":
            self.i += 1
            branches.append(self.concatenation())
        return branches[0] if len(branches) == 1 else ("alt", tuple(branches))

    def concatenation(self) -> Node:
        items: list[Node] = []
        while True:
            c = self.peek()
            if c is None or c in "|)":
                break
            items.append(self.repetition())
        if not items:
            return ("empty",)
        return items[0] if len(items) == 1 else ("cat", tuple(items))

    def repetition(self) -> Node:
        atom = self.atom()
        quantified = False
        while True:
            c = self.peek()
            if c is None or c not in "*+?{":
                return atom
            at = self.i
            if quantified:
                raise self.error("a quantifier cannot follow another quantifier", at)
            if atom[0] in ("assert", "empty"):
                raise self.error("nothing to repeat", at)
            if c == "{":
                lo, hi = self.braces()
            else:
                self.i += 1
                lo, hi = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
            if self.peek() == "?":
                self.i += 1  # laziness does not change whether a search matches
            atom = ("rep", atom, lo, hi)
            quantified = True

    def braces(self) -> tuple[int, int | None]:
        at = self.i
        end = self.p.find("}", self.i)
        body = self.p[self.i + 1 : end] if end != -1 else ""
        lo_s, comma, hi_s = body.partition(",")
        if end == -1 or not lo_s.isdigit() or (hi_s and not hi_s.isdigit()) or not lo_s.isascii():
            raise self.error(
                "'{' must start a repetition {n}, {n,} or {n,m}; write \\{ for a brace", at
            )
        if not hi_s.isascii():
            raise self.error("bad repetition count", at)
        lo = int(lo_s)
        hi: int | None = lo if not comma else (int(hi_s) if hi_s else None)
        if lo > MAX_REPEAT or (hi is not None and hi > MAX_REPEAT):
            raise self.error(f"repetition count above {MAX_REPEAT}", at)
        if hi is not None and hi < lo:
            raise self.error("repetition {n,m} with m < n", at)
        self.i = end + 1
        return lo, hi

    def atom(self) -> Node:
        c = self.p[self.i]
        at = self.i
        if c == "(":
            self.i += 1
            if self.p.startswith("?:", self.i):
                self.i += 2
            elif self.peek() == "?":
                raise self.error("unsupported group syntax (only (...) and (?:...))", at)
            inner = self.alternation()
            if self.peek() != ")":
                raise self.error("missing ')'", at)
            self.i += 1
            # A group may be quantified even when it only asserts: (?:^)* is valid.
            return ("cat", (inner,))
        if c in "*+?{":
            raise self.error("nothing to repeat", at)
        if c == "}":
            raise self.error("unbalanced '}'; write \\} for a brace", at)
        self.i += 1
        if c == ".":
            return ("any",)
        if c == "^":
            return ("assert", "bol")
        if c == "$":
            return ("assert", "eol")
        if c == "[":
            return self.bracket(at)
        if c == "\\":
            return self.escape(at, in_class=False)
        return ("char", c)

    def escape(self, at: int, *, in_class: bool) -> Node:
        if self.i >= len(self.p):
            raise self.error("trailing backslash", at)
        e = self.p[self.i]
        self.i += 1
        if e in _CLASS_ESCAPES:
            chars, negated = _CLASS_ESCAPES[e]
            if in_class:
                return ("set", chars, negated)
            return ("class", False, (("set", chars, negated),))
        if e in _CONTROL:
            return ("char", _CONTROL[e]) if not in_class else ("c", _CONTROL[e])
        if e in "bB" and not in_class:
            return ("assert", "word" if e == "b" else "nonword")
        if e.isascii() and not e.isalnum():
            return ("char", e) if not in_class else ("c", e)
        raise self.error(f"unsupported escape \\{e}", at)

    def bracket(self, at: int) -> Node:
        negated = False
        if self.peek() == "^":
            negated = True
            self.i += 1
        items: list[Node] = []
        first = True
        while True:
            if self.i >= len(self.p):
                raise self.error("missing ']'", at)
            c = self.p[self.i]
            if c == "]" and not first:
                self.i += 1
                break
            first = False
            item = self.class_atom()
            if (
                item[0] == "c"
                and self.peek() == "-"
                and self.i + 1 < len(self.p)
                and self.p[self.i + 1] != "]"
            ):
                dash = self.i
                self.i += 1
                hi = self.class_atom()
                if hi[0] != "c":
                    raise self.error("bad character range", dash)
                if ord(hi[1]) < ord(item[1]):
                    raise self.error("bad character range (end before start)", dash)
                items.append(("range", item[1], hi[1]))
                continue
            items.append(item)
        return ("class", negated, tuple(items))

    def class_atom(self) -> Node:
        c = self.p[self.i]
        at = self.i
        self.i += 1
        if c == "\\":
            return self.escape(at, in_class=True)
        if c == "[" and self.peek() in (":", "=", "."):
            raise self.error("POSIX classes like [:alpha:] are not supported", at)
        return ("c", c)


# ---- program -----------------------------------------------------------------

# Instructions: ("char", pred) ("split", x, y) ("jmp", x) ("assert", kind) ("match",)
Pred = Callable[[str], bool]


def _char_pred(c: str, ignore_case: bool) -> Pred:
    if not ignore_case:
        return c.__eq__
    variants = frozenset({c, c.lower(), c.upper(), c.swapcase()} - {""})
    variants = frozenset(v for v in variants if len(v) == 1)
    return variants.__contains__


def _class_pred(negated: bool, items: tuple[Node, ...], ignore_case: bool) -> Pred:
    def raw(ch: str) -> bool:
        for item in items:
            kind = item[0]
            if kind == "c":
                if ch == item[1]:
                    return True
            elif kind == "range":
                if item[1] <= ch <= item[2]:
                    return True
            elif (ch in item[1]) != item[2]:
                return True
        return False

    if ignore_case:

        def folded(ch: str) -> bool:
            if raw(ch):
                return True
            return any(len(v) == 1 and v != ch and raw(v) for v in (ch.lower(), ch.upper()))

        test = folded
    else:
        test = raw
    if negated:
        return lambda ch: not test(ch)
    return test


def _not_newline(ch: str) -> bool:
    return ch != "\n"


class _Compiler:
    def __init__(self, ignore_case: bool) -> None:
        self.prog: list[tuple[Any, ...]] = []
        self.ignore_case = ignore_case

    def emit(self, ins: tuple[Any, ...]) -> int:
        self.prog.append(ins)
        if len(self.prog) > MAX_PROGRAM:
            raise RegexError("pattern too large", 0)
        return len(self.prog) - 1

    def gen(self, node: Node) -> None:
        kind = node[0]
        if kind == "char":
            self.emit(("char", _char_pred(node[1], self.ignore_case)))
        elif kind == "any":
            self.emit(("char", _not_newline))
        elif kind == "class":
            self.emit(("char", _class_pred(node[1], node[2], self.ignore_case)))
        elif kind == "assert":
            self.emit(("assert", node[1]))
        elif kind == "empty":
            pass
        elif kind == "cat":
            for n in node[1]:
                self.gen(n)
        elif kind == "alt":
            jumps: list[int] = []
            branches = node[1]
            for n in branches[:-1]:
                split = self.emit(("split", 0, 0))
                self.gen(n)
                jumps.append(self.emit(("jmp", 0)))
                self.prog[split] = ("split", split + 1, len(self.prog))
            self.gen(branches[-1])
            for j in jumps:
                self.prog[j] = ("jmp", len(self.prog))
        elif kind == "rep":
            _, sub, lo, hi = node
            for _ in range(lo):
                self.gen(sub)
            if hi is None:
                split = self.emit(("split", 0, 0))
                self.gen(sub)
                self.emit(("jmp", split))
                self.prog[split] = ("split", split + 1, len(self.prog))
            else:
                splits: list[int] = []
                for _ in range(hi - lo):
                    splits.append(self.emit(("split", 0, 0)))
                    self.gen(sub)
                for s in splits:
                    self.prog[s] = ("split", s + 1, len(self.prog))
        else:  # pragma: no cover - the parser builds no other nodes
            raise AssertionError(kind)


def _is_word(text: str, i: int) -> bool:
    return 0 <= i < len(text) and text[i] in _WORD


def _pike_search(prog: list[tuple[Any, ...]], anchored: bool, text: str) -> bool:
    n = len(text)
    seen = [-1] * len(prog)
    clist: list[int] = []

    def add(out: list[int], start: int, pos: int, mark: int) -> bool:
        stack = [start]
        while stack:
            pc = stack.pop()
            if seen[pc] == mark:
                continue
            seen[pc] = mark
            ins = prog[pc]
            op = ins[0]
            if op == "match":
                return True
            if op == "jmp":
                stack.append(ins[1])
            elif op == "split":
                stack.append(ins[2])
                stack.append(ins[1])
            elif op == "assert":
                kind = ins[1]
                if kind == "bol":
                    ok = pos == 0
                elif kind == "eol":
                    ok = pos == n
                else:
                    boundary = _is_word(text, pos - 1) != _is_word(text, pos)
                    ok = boundary if kind == "word" else not boundary
                if ok:
                    stack.append(pc + 1)
            else:
                out.append(pc)
        return False

    if add(clist, 0, 0, 0):
        return True
    for pos in range(n):
        ch = text[pos]
        nlist: list[int] = []
        mark = pos + 1
        for pc in clist:
            if prog[pc][1](ch) and add(nlist, pc + 1, pos + 1, mark):
                return True
        if not anchored and add(nlist, 0, pos + 1, mark):
            return True
        clist = nlist
        if not clist and anchored:
            return False
    return False


@dataclass(frozen=True, slots=True)
class Regex:
    """A compiled, validated pattern. ``search`` is an unanchored test."""

    pattern: str
    engine: str
    _search: Callable[[str], bool]

    def search(self, text: str) -> bool:
        return self._search(text)


def parse(pattern: str) -> tuple[Node, bool]:
    """Validate ``pattern``: its syntax tree and whether ``(?i)`` was given."""
    if not isinstance(pattern, str):
        raise RegexError("a pattern must be a string", 0)
    p = _Parser(pattern)
    return p.parse(), p.ignore_case


def _starts_anchored(node: Node) -> bool:
    if node == ("assert", "bol"):
        return True
    if node[0] == "cat":
        return _starts_anchored(node[1][0])
    return False


@functools.lru_cache(maxsize=1024)
def compile_regex(pattern: str, engine: str | None = None) -> Regex:
    """Validate and compile; ``engine`` is "re2", "nfa" or None (RE2 when installed)."""
    tree, ignore_case = parse(pattern)
    comp = _Compiler(ignore_case)
    comp.gen(tree)
    comp.emit(("match",))
    use = engine or ("re2" if _re2 is not None else "nfa")
    if use == "re2":
        if _re2 is None:
            raise ImportError("RE2 is not installed: pip install 'bastion-guard[re2]'")
        try:
            compiled = _re2.compile(pattern)
        except Exception as exc:
            raise RegexError(f"RE2 rejected the pattern: {exc}", 0) from None

        def search_re2(text: str) -> bool:
            return compiled.search(text) is not None

        return Regex(pattern, "re2", search_re2)
    prog = comp.prog
    anchored = _starts_anchored(tree)

    def search_nfa(text: str) -> bool:
        return _pike_search(prog, anchored, text)

    return Regex(pattern, "nfa", search_nfa)


def engine_name() -> str:
    """Which engine ``compile_regex`` uses by default here: "re2" or "nfa"."""
    return "re2" if _re2 is not None else "nfa"
