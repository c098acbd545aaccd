"""Linear-time regular expressions for quarantine schemas and redaction patterns.

Every pattern Bastion runs on untrusted text must finish in time linear in the
text, whatever the text is: a backtracking engine (Python's ``re``) can take
exponential time on patterns such as ``(a+)+b``, and the attacker writes the text.

So a pattern is first parsed here, always, into a small syntax tree. The accepted
syntax is a subset shared by RE2 and classic regular expressions:

- literal characters, ``.`` (any character but newline), escaped punctuation,
  ``\\n \\r \\t \\f \\v``, the ASCII classes ``\\d \\D \\w \\W \\s \\S``;
- bracket classes ``[a-z0-9_]`` and ``[^...]`` (ranges, escapes, classes inside);
- groups ``(...)``, ``(?:...)``, ``(?P<name>...)``, alternation ``|``;
- quantifiers ``* + ? {n} {n,} {n,m}`` (a trailing ``?`` for laziness is
  accepted), with counts up to 1000;
- ``^`` and ``$`` only at the very start and end, ``(?i)`` only at the start.

Back-references, look-around, possessive quantifiers, ``\\b`` and inline flags
elsewhere are rejected: none of them is needed for the shapes Bastion checks,
and some cannot be run without backtracking.

Execution then uses RE2 (``pip install 'bastion-guard[re2]'``) when it can be
imported, and otherwise a Thompson NFA simulated over the parsed tree: the
engine keeps the *set* of NFA states reachable after each character, never a
stack of alternatives to retry, so each character costs at most one step per
state and a match costs O(len(text) x states). It cannot backtrack because it
has nothing to backtrack to. The NFA is bounded (``MAX_STATES``) so that the
constant stays small; it is much slower per character than RE2 but has the same
worst case shape. Both engines treat ``\\d \\w \\s`` as ASCII classes.

Public API: ``parse(pattern) -> ParsedPattern``, ``compile_pattern(pattern,
engine=None) -> LinearPattern`` (``engine`` is ``"re2"``, ``"nfa"`` or None for the
best available), ``LinearPattern.fullmatch(text) -> bool`` and
``LinearPattern.finditer(text) -> Iterator[tuple[int, int]]`` (non-overlapping
match spans, leftmost; the NFA picks the longest match at each start, RE2 its
own leftmost-first choice).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol

__all__ = [
    "MAX_REPEAT",
    "MAX_STATES",
    "LinearPattern",
    "ParsedPattern",
    "PatternError",
    "compile_pattern",
    "have_re2",
    "parse",
]

MAX_REPEAT = 1000
MAX_STATES = 20_000
MAX_PATTERN_LENGTH = 2000

Engine = Literal["re2", "nfa"]

_WORD = ((ord("0"), ord("9")), (ord("A"), ord("Z")), (ord("_"), ord("_")), (ord("a"), ord("z")))
_DIGIT = ((ord("0"), ord("9")),)
_SPACE = ((9, 10), (12, 13), (32, 32))  # \t \n \f \r and space, as RE2 defines \s
_META = set(".^$*+?()[]{}|\\")
_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "f": "\f", "v": "\v"}


class PatternError(ValueError):
    """The pattern is outside the accepted linear-time subset, or malformed."""


@dataclass(frozen=True, slots=True)
class CharSet:
    """A set of characters: sorted code point ranges, possibly negated."""

    ranges: tuple[tuple[int, int], ...]
    negated: bool = False
    dot: bool = False

    def contains(self, char: str, ignore_case: bool = False) -> bool:
        if self.dot:
            return char != "\n"
        hit = self._raw(ord(char))
        if not hit and ignore_case:
            hit = self._raw(ord(char.lower())) or self._raw(ord(char.upper()))
        return hit != self.negated

    def _raw(self, code: int) -> bool:
        return any(lo <= code <= hi for lo, hi in self.ranges)


@dataclass(frozen=True, slots=True)
class Node:
    """A syntax tree node: ``kind`` is char, concat, alt, repeat or empty."""

    kind: str
    chars: CharSet | None = None
    children: tuple[Node, ...] = ()
    min: int = 0
    max: int | None = None


@dataclass(frozen=True, slots=True)
class ParsedPattern:
    """A pattern that passed the subset check."""

    source: str
    root: Node
    ignore_case: bool
    anchored_start: bool
    anchored_end: bool

    def charsets(self) -> Iterator[CharSet]:
        """Every character set the pattern can consume a character with."""
        stack = [self.root]
        while stack:
            node = stack.pop()
            if node.chars is not None:
                yield node.chars
            stack.extend(node.children)

    def can_match_any_of(self, chars: str) -> bool:
        """True when some character of ``chars`` can appear in a match."""
        sets = list(self.charsets())
        return any(s.contains(c, self.ignore_case) for s in sets for c in chars)

    def max_length(self) -> int | None:
        """The longest possible match, or None when unbounded."""
        return _max_length(self.root)


def _max_length(node: Node) -> int | None:
    if node.kind == "char":
        return 1
    if node.kind == "empty":
        return 0
    lengths = [_max_length(child) for child in node.children]
    if any(length is None for length in lengths):
        return None
    values = [length for length in lengths if length is not None]
    if node.kind == "concat":
        return sum(values)
    if node.kind == "alt":
        return max(values, default=0)
    if node.max is None:
        return None if values[0] else 0
    return values[0] * node.max


class _Parser:
    def __init__(self, source: str) -> None:
        self.source = source
        self.pos = 0

    def fail(self, message: str) -> PatternError:
        return PatternError(f"pattern {self.source!r}: {message} at offset {self.pos}")

    def peek(self) -> str | None:
        return self.source[self.pos] if self.pos < len(self.source) else None

    def take(self) -> str:
        if self.pos >= len(self.source):
            raise self.fail("unexpected end")
        char = self.source[self.pos]
        self.pos += 1
        return char

    def parse(self) -> ParsedPattern:
        ignore_case = False
        if self.source.startswith("(?i)"):
            ignore_case = True
            self.pos = 4
        anchored_start = False
        if self.peek() == "^":
            anchored_start = True
            self.pos += 1
        end = len(self.source)
        anchored_end = False
        if end > self.pos and self.source.endswith("$") and not self.source.endswith("\\$"):
            anchored_end = True
            self.source = self.source[:-1]
        node = self.alternation()
        if (anchored_start or anchored_end) and node.kind == "alt":
            raise self.fail("an anchored alternation must be grouped: ^(?:a|b)$")
        if self.pos != len(self.source):
            raise self.fail("unexpected ')'" if self.peek() == ")" else "unsupported syntax")
        source = self.source + ("$" if anchored_end else "")
        return ParsedPattern(source, node, ignore_case, anchored_start, anchored_end)

    def alternation(self) -> Node:
        branches = [self.concatenation()]
        while self.peek() == "|":
            self.pos += 1
            branches.append(self.concatenation())
        return branches[0] if len(branches) == 1 else Node("alt", children=tuple(branches))

    def concatenation(self) -> Node:
        items: list[Node] = []
        while (char := self.peek()) is not None and char not in "|)":
            items.append(self.quantified(self.atom()))
        if not items:
            return Node("empty")
        return items[0] if len(items) == 1 else Node("concat", children=tuple(items))

    def atom(self) -> Node:
        char = self.take()
        if char == "(":
            if self.source.startswith("?:", self.pos):
                self.pos += 2
            elif self.source.startswith("?P<", self.pos):
                close = self.source.find(">", self.pos)
                name = self.source[self.pos + 3 : close] if close > 0 else ""
                if not name.isidentifier():
                    raise self.fail("bad group name")
                self.pos = close + 1
            elif self.peek() == "?":
                raise self.fail("look-around and inline flags are not supported")
            inner = self.alternation()
            if self.peek() != ")":
                raise self.fail("missing ')'")
            self.pos += 1
            return inner
        if char == "[":
            return Node("char", chars=self.bracket())
        if char == ".":
            return Node("char", chars=CharSet((), dot=True))
        if char == "\\":
            return Node("char", chars=self.escape(in_class=False))
        if char in "^$":
            raise self.fail("anchors are only allowed at the start and end")
        if char in "*+?{":
            raise self.fail("nothing to repeat")
        if char in "])}":
            raise self.fail(f"unbalanced {char!r}")
        return Node("char", chars=CharSet(((ord(char), ord(char)),)))

    def escape(self, *, in_class: bool) -> CharSet:
        char = self.take()
        classes = {"d": (_DIGIT, False), "D": (_DIGIT, True), "w": (_WORD, False)}
        classes.update({"W": (_WORD, True), "s": (_SPACE, False), "S": (_SPACE, True)})
        if char in classes:
            ranges, negated = classes[char]
            return CharSet(ranges, negated)
        if char in _ESCAPES:
            code = ord(_ESCAPES[char])
            return CharSet(((code, code),))
        if not char.isalnum() and char.isprintable():
            return CharSet(((ord(char), ord(char)),))
        raise self.fail(f"unsupported escape \\{char}")

    def bracket(self) -> CharSet:
        negated = self.peek() == "^"
        if negated:
            self.pos += 1
        ranges: list[tuple[int, int]] = []
        first = True
        while True:
            char = self.take()
            if char == "]" and not first:
                break
            first = False
            if char == "[":
                raise self.fail("nested '[' is not supported (escape it)")
            if char == "\\":
                inner = self.escape(in_class=True)
                if inner.negated:
                    raise self.fail("negated classes inside brackets are not supported")
                if len(inner.ranges) > 1 or inner.ranges[0][0] != inner.ranges[0][1]:
                    ranges.extend(inner.ranges)
                    continue
                low = inner.ranges[0][0]
            else:
                low = ord(char)
            if self.peek() == "-" and self.source[self.pos + 1 : self.pos + 2] not in ("]", ""):
                self.pos += 1
                end = self.take()
                if end == "\\":
                    inner = self.escape(in_class=True)
                    if inner.negated or inner.ranges[0][0] != inner.ranges[0][1]:
                        raise self.fail("bad range end")
                    high = inner.ranges[0][0]
                else:
                    high = ord(end)
                if high < low:
                    raise self.fail("bad range")
                ranges.append((low, high))
            else:
                ranges.append((low, low))
        return CharSet(tuple(sorted(ranges)), negated)

    def quantified(self, node: Node) -> Node:
        while (char := self.peek()) is not None and char in "*+?{":
            if char == "{":
                low, high = self.counts()
            else:
                self.pos += 1
                low, high = {"*": (0, None), "+": (1, None), "?": (0, 1)}[char]
            if self.peek() == "?":
                self.pos += 1
            elif self.peek() == "+":
                raise self.fail("possessive quantifiers are not supported")
            node = Node("repeat", children=(node,), min=low, max=high)
        return node

    def counts(self) -> tuple[int, int | None]:
        close = self.source.find("}", self.pos)
        if close < 0:
            raise self.fail("missing '}'")
        body = self.source[self.pos + 1 : close]
        low_text, comma, high_text = body.partition(",")
        if not low_text.isdigit() or (high_text and not high_text.isdigit()):
            raise self.fail("bad repetition count")
        low = int(low_text)
        high = (int(high_text) if high_text else None) if comma else low
        if low > MAX_REPEAT or (high is not None and (high > MAX_REPEAT or high < low)):
            raise self.fail(f"repetition counts must be at most {MAX_REPEAT} and ordered")
        self.pos = close + 1
        return low, high


@functools.lru_cache(maxsize=512)
def parse(pattern: str) -> ParsedPattern:
    """Parse ``pattern`` into the linear-time subset or raise ``PatternError``."""
    if not isinstance(pattern, str):
        raise PatternError("a pattern must be a string")
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise PatternError(f"pattern longer than {MAX_PATTERN_LENGTH} characters")
    return _Parser(pattern).parse()


# --- Thompson NFA --------------------------------------------------------------

# A state is (kind, charset, out1, out2): kind 0 = consume a char and go to out1,
# 1 = epsilon split to out1 and out2, 2 = accept.
_CONSUME, _SPLIT, _ACCEPT = 0, 1, 2


class _Builder:
    def __init__(self) -> None:
        self.kinds: list[int] = []
        self.sets: list[CharSet | None] = []
        self.out1: list[int] = []
        self.out2: list[int] = []

    def state(self, kind: int, chars: CharSet | None = None) -> int:
        if len(self.kinds) >= MAX_STATES:
            raise PatternError(f"pattern expands to more than {MAX_STATES} NFA states")
        self.kinds.append(kind)
        self.sets.append(chars)
        self.out1.append(-1)
        self.out2.append(-1)
        return len(self.kinds) - 1

    def build(self, node: Node, next_state: int) -> int:
        """Build ``node`` so that it continues to ``next_state``; return its entry."""
        if node.kind == "empty":
            return next_state
        if node.kind == "char":
            state = self.state(_CONSUME, node.chars)
            self.out1[state] = next_state
            return state
        if node.kind == "concat":
            for child in reversed(node.children):
                next_state = self.build(child, next_state)
            return next_state
        if node.kind == "alt":
            entries = [self.build(child, next_state) for child in node.children]
            entry = entries[-1]
            for other in reversed(entries[:-1]):
                split = self.state(_SPLIT)
                self.out1[split], self.out2[split] = other, entry
                entry = split
            return entry
        child = node.children[0]
        if node.max is None:
            loop = self.state(_SPLIT)
            body = self.build(child, loop)
            self.out1[loop], self.out2[loop] = body, next_state
            entry = loop
        else:
            entry = next_state
            for _ in range(node.max - node.min):
                split = self.state(_SPLIT)
                self.out1[split], self.out2[split] = self.build(child, entry), next_state
                entry = split
        for _ in range(node.min):
            entry = self.build(child, entry)
        return entry


class LinearPattern(Protocol):
    """A compiled linear-time pattern."""

    @property
    def source(self) -> str: ...

    def fullmatch(self, text: str) -> bool: ...

    def finditer(self, text: str) -> Iterator[tuple[int, int]]: ...


class NfaPattern:
    """The pure-Python Thompson NFA engine (used when RE2 is not installed)."""

    def __init__(self, parsed: ParsedPattern) -> None:
        self.parsed = parsed
        builder = _Builder()
        accept = builder.state(_ACCEPT)
        self.start = builder.build(parsed.root, accept)
        self.kinds = builder.kinds
        self.sets = builder.sets
        self.out1 = builder.out1
        self.out2 = builder.out2
        self.ignore_case = parsed.ignore_case

    @property
    def source(self) -> str:
        return self.parsed.source

    def _closure(self, seeds: list[int], seen: set[int], into: list[int]) -> bool:
        """Add the epsilon closure of ``seeds`` to ``into``; return True if it accepts."""
        accepts = False
        stack = list(reversed(seeds))
        while stack:
            state = stack.pop()
            if state < 0 or state in seen:
                continue
            seen.add(state)
            kind = self.kinds[state]
            if kind == _SPLIT:
                stack.append(self.out2[state])
                stack.append(self.out1[state])
            elif kind == _ACCEPT:
                accepts = True
            else:
                into.append(state)
        return accepts

    def fullmatch(self, text: str) -> bool:
        current: list[int] = []
        accepts = self._closure([self.start], set(), current)
        for char in text:
            seeds = [
                self.out1[state]
                for state in current
                if self.sets[state].contains(char, self.ignore_case)  # type: ignore[union-attr]
            ]
            if not seeds:
                return False
            current = []
            accepts = self._closure(seeds, set(), current)
        return accepts

    def finditer(self, text: str) -> Iterator[tuple[int, int]]:
        position = 0
        length = len(text)
        while position <= length:
            span = self._search_from(text, position)
            if span is None:
                return
            start, end = span
            yield span
            position = end if end > start else end + 1

    def _search_from(self, text: str, begin: int) -> tuple[int, int] | None:
        """Leftmost-longest match starting at or after ``begin``, in one pass."""
        parsed = self.parsed
        # threads: list of (state, start) in priority order; earliest start wins a state
        threads: list[tuple[int, int]] = []
        best: tuple[int, int] | None = None
        length = len(text)
        position = begin
        while True:
            can_start = best is None and (not parsed.anchored_start or position == 0)
            if can_start:
                threads = self._add(threads, [(self.start, position)])
            if not threads and (best is not None or (parsed.anchored_start and not can_start)):
                break
            for state, start in threads:
                if self.kinds[state] == _ACCEPT:
                    at_end_ok = not parsed.anchored_end or position == length
                    if at_end_ok and (
                        best is None or start < best[0] or (start == best[0] and position > best[1])
                    ):
                        best = (start, position)
            if best is not None:
                threads = [(s, st) for s, st in threads if st <= best[0]]
            if position >= length:
                break
            char = text[position]
            moved = [
                (self.out1[state], start)
                for state, start in threads
                if self.kinds[state] == _CONSUME
                and self.sets[state].contains(char, self.ignore_case)  # type: ignore[union-attr]
            ]
            position += 1
            threads = self._add([], moved)
            if not threads and best is None and parsed.anchored_start:
                break
        return best

    def _add(
        self, threads: list[tuple[int, int]], seeds: list[tuple[int, int]]
    ) -> list[tuple[int, int]]:
        seen = {state for state, _ in threads}
        result = list(threads)
        for seed, start in seeds:
            stack = [seed]
            while stack:
                state = stack.pop()
                if state < 0 or state in seen:
                    continue
                seen.add(state)
                if self.kinds[state] == _SPLIT:
                    stack.append(self.out2[state])
                    stack.append(self.out1[state])
                else:
                    result.append((state, start))
        return result


class Re2Pattern:
    """A pattern run by RE2, after it passed the subset check."""

    def __init__(self, parsed: ParsedPattern) -> None:
        import re2

        options = re2.Options()
        options.log_errors = False
        try:
            self._regex: Any = re2.compile(parsed.source, options)
        except re2.error as exc:
            raise PatternError(f"pattern {parsed.source!r}: {exc}") from exc
        self.parsed = parsed

    @property
    def source(self) -> str:
        return self.parsed.source

    def fullmatch(self, text: str) -> bool:
        return self._regex.fullmatch(text) is not None

    def finditer(self, text: str) -> Iterator[tuple[int, int]]:
        for match in self._regex.finditer(text):
            yield match.span()


@functools.cache
def have_re2() -> bool:
    """Whether the RE2 engine (extra ``[re2]``) can be imported."""
    try:
        import re2  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=512)
def compile_pattern(pattern: str, engine: Engine | None = None) -> LinearPattern:
    """Check ``pattern`` against the subset and compile it for ``engine``.

    ``engine=None`` picks RE2 when importable, else the NFA. Asking for ``"re2"``
    without it installed raises ImportError naming the extra.
    """
    parsed = parse(pattern)
    if engine is None:
        engine = "re2" if have_re2() else "nfa"
    if engine == "re2":
        if not have_re2():
            raise ImportError("RE2 is not installed: pip install 'bastion-guard[re2]'")
        return Re2Pattern(parsed)
    return NfaPattern(parsed)
