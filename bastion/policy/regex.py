"""Linear-time regular expressions: the policy operator ``matches``, quarantine
schema patterns and custom redaction patterns.

The text a pattern runs on (arguments, tool output, user messages) is written by
whoever talks to the agent, so no pattern may take more than linear time in it.
A backtracking engine (Python's ``re``) takes exponential time on ``(a+)+b``.
Every pattern is therefore parsed here first, always, into one syntax tree, and
only this subset is accepted, the same on both execution paths:

- literal characters; escaped punctuation (``\\.``, ``\\(``...); ``\\n \\r \\t \\f \\v``;
- ``.`` (any character but a newline) and the ASCII classes ``\\d \\D \\w \\W \\s \\S``
  (``\\s`` is ``[\\t\\n\\f\\r ]`` as in RE2);
- bracket classes ``[a-z_]`` and ``[^...]``, with ranges and the class escapes;
- anchors ``^`` (start of text) and ``$`` (end of text only, as in RE2), ASCII
  word boundaries ``\\b`` and ``\\B``;
- groups ``(...)``, ``(?:...)`` and ``(?P<name>...)``, alternation ``|``;
- quantifiers ``* + ? {n} {n,} {n,m}``, optionally lazy (``*?``), with counts up
  to 1000 whose product over nested repetitions is at most 1000 (RE2's rule);
- the flag ``(?i)`` at the very start: a character then matches when it, or a
  one-character lower or upper case form of it (or of those), does.

Back-references, look-around, possessive quantifiers, other flags and named
classes are rejected with a ``RegexError`` carrying the offset of the problem.
Callers may refuse more by inspecting ``Parsed`` (quarantine schemas refuse word
boundaries and patterns that can match whitespace).

Execution uses RE2 (``pip install 'bastion-guard[re2]'``) when it is importable,
fed with source regenerated from the syntax tree so that both paths read the
same pattern. Otherwise, and for text RE2 cannot take (lone surrogates), a
Thompson NFA runs as a DFA built lazily, one state per set of live NFA states,
in a bounded cache (flushed when full): each character costs one dict lookup
once its transition is known, and at most one NFA step of O(pattern) when not,
so a search costs O(len(text) x len(pattern)) in the worst case and nothing can
backtrack. Unanchored searches skip ahead with a prefilter (Python ``re`` over
the finite set of literal prefixes every match starts with, itself linear).

``Regex.search`` tests for a match anywhere, ``fullmatch`` for the whole text,
and ``finditer`` yields the leftmost-first (Perl and RE2 order) match spans,
without overlaps; after an empty match the next search starts one character on.
"""

from __future__ import annotations

import functools
import re
from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain, product
from typing import Any, Literal

__all__ = [
    "MAX_PROGRAM",
    "MAX_REPEAT",
    "Alternation",
    "Assertion",
    "CharSet",
    "Chars",
    "Concat",
    "Engine",
    "Group",
    "Node",
    "Parsed",
    "Regex",
    "RegexError",
    "Repeat",
    "compile_regex",
    "engine_name",
    "parse",
]

MAX_REPEAT = 1000
MAX_PROGRAM = 20_000
MAX_NESTING = 100
_MAX_DFA_STATES = 10_000
_MAX_DFA_ENTRIES = 100_000

Engine = Literal["re2", "nfa"]


class RegexError(ValueError):
    """A pattern outside the supported subset; ``offset`` is 0-based in the pattern."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(f"{message} (at offset {offset})")
        self.message = message
        self.offset = offset


# ---- syntax tree ---------------------------------------------------------------

_Ranges = tuple[tuple[int, int], ...]
_MAX_CODE = 0x10FFFF
_WORD: _Ranges = ((48, 57), (65, 90), (95, 95), (97, 122))
_DIGIT: _Ranges = ((48, 57),)
_SPACE: _Ranges = ((9, 10), (12, 13), (32, 32))
_CONTROL = {"n": "\n", "r": "\r", "t": "\t", "f": "\f", "v": "\v"}


def _normalize(ranges: list[tuple[int, int]]) -> _Ranges:
    merged: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
        else:
            merged.append((lo, hi))
    return tuple(merged)


def _complement(ranges: _Ranges) -> _Ranges:
    out: list[tuple[int, int]] = []
    low = 0
    for lo, hi in ranges:
        if lo > low:
            out.append((low, lo - 1))
        low = hi + 1
    if low <= _MAX_CODE:
        out.append((low, _MAX_CODE))
    return tuple(out)


def _case_forms(char: str) -> set[str]:
    """What ``char`` is compared as under ``(?i)``: its lower and upper case forms,
    and theirs (so the dotless i matches ``i`` through ``I``, as ``I`` does)."""
    once = {char.lower(), char.upper()}
    return once | {f for v in once for f in (v.lower(), v.upper())}


@dataclass(frozen=True, slots=True)
class CharSet:
    """The characters one position can consume: sorted code point ranges, maybe negated.

    Negation applies after case folding: ``(?i)[^a]`` matches neither ``a`` nor ``A``.
    """

    ranges: _Ranges
    negated: bool = False

    def contains(self, char: str, ignore_case: bool = False) -> bool:
        hit = self._raw(ord(char))
        if not hit and ignore_case:
            hit = any(len(v) == 1 and self._raw(ord(v)) for v in _case_forms(char))
        return hit != self.negated

    def _raw(self, code: int) -> bool:
        index = bisect_right(self.ranges, (code, _MAX_CODE)) - 1
        return index >= 0 and self.ranges[index][1] >= code


_ANY = CharSet(((0, _MAX_CODE),))
_NOT_NEWLINE = CharSet(_complement(((10, 10),)))


@dataclass(frozen=True, slots=True)
class Chars:
    """Consumes one character of ``chars``."""

    chars: CharSet


@dataclass(frozen=True, slots=True)
class Assertion:
    """Zero-width: ``bol`` (``^``), ``eol`` (``$``), ``word`` (``\\b``), ``nonword`` (``\\B``)."""

    kind: Literal["bol", "eol", "word", "nonword"]
    offset: int


@dataclass(frozen=True, slots=True)
class Concat:
    """A sequence; the empty sequence matches the empty string."""

    items: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Alternation:
    """Branches in priority order."""

    branches: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Repeat:
    """``item`` between ``min`` and ``max`` times (None: unbounded)."""

    item: Node
    min: int
    max: int | None
    lazy: bool = False


@dataclass(frozen=True, slots=True)
class Group:
    """A parenthesised sub-pattern (``name`` for ``(?P<name>...)``)."""

    item: Node
    name: str | None = None


Node = Chars | Assertion | Concat | Alternation | Repeat | Group


def _children(node: Node) -> tuple[Node, ...]:
    if isinstance(node, Concat):
        return node.items
    if isinstance(node, Alternation):
        return node.branches
    if isinstance(node, Repeat | Group):
        return (node.item,)
    return ()


@dataclass(frozen=True, slots=True)
class Parsed:
    """A pattern that passed the subset check: its syntax tree and flag."""

    pattern: str
    root: Node
    ignore_case: bool

    def nodes(self) -> Iterator[Node]:
        """Every node of the tree, parents before children."""
        stack = [self.root]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(reversed(_children(node)))

    def charsets(self) -> Iterator[CharSet]:
        """Every character set the pattern can consume a character with."""
        return (node.chars for node in self.nodes() if isinstance(node, Chars))

    def can_match_any_of(self, chars: str) -> bool:
        """True when some character of ``chars`` can appear in a match."""
        return any(s.contains(c, self.ignore_case) for s in self.charsets() for c in chars)


# ---- parser --------------------------------------------------------------------


class _Parser:
    def __init__(self, pattern: str) -> None:
        self.p = pattern
        self.i = 0
        self.depth = 0
        self.names: set[str] = set()

    def error(self, message: str, at: int | None = None) -> RegexError:
        return RegexError(message, self.i if at is None else at)

    def peek(self) -> str | None:
        return self.p[self.i] if self.i < len(self.p) else None

    def parse(self) -> Parsed:
        surrogate = re.search("[\ud800-\udfff]", self.p)
        if surrogate:
            raise self.error("surrogate code points are not supported", surrogate.start())
        ignore_case = self.p.startswith("(?i)")
        if ignore_case:
            self.i = 4
        root = self.alternation()
        if self.i < len(self.p):
            # Only a stray ')' can stop the top-level alternation early.
            raise self.error("unbalanced ')'")
        return Parsed(self.p, root, ignore_case)

    def alternation(self) -> Node:
        branches = [self.concatenation()]
        while self.peek() == "|":
            self.i += 1
            branches.append(self.concatenation())
        return branches[0] if len(branches) == 1 else Alternation(tuple(branches))

    def concatenation(self) -> Node:
        items: list[Node] = []
        while (c := self.peek()) is not None and c not in "|)":
            items.append(self.repetition())
        return items[0] if len(items) == 1 else Concat(tuple(items))

    def repetition(self) -> Node:
        node = self.atom()
        quantified = False
        while (c := self.peek()) is not None and c in "*+?{":
            at = self.i
            if quantified:
                if c == "+":
                    raise self.error("possessive quantifiers are not supported", at)
                raise self.error("a quantifier cannot follow another quantifier", at)
            if isinstance(node, Assertion):
                raise self.error("nothing to repeat", at)
            if c == "{":
                lo, hi = self.braces()
            else:
                self.i += 1
                lo, hi = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
            lazy = self.peek() == "?"
            self.i += lazy
            node = Repeat(node, lo, hi, lazy)
            quantified = True
        return node

    def braces(self) -> tuple[int, int | None]:
        at = self.i
        end = self.p.find("}", self.i)
        lo_s, comma, hi_s = (self.p[self.i + 1 : end] if end != -1 else "").partition(",")
        if end == -1 or not (lo_s.isascii() and lo_s.isdigit()) or (hi_s and not hi_s.isdigit()):
            raise self.error(
                "'{' must start a repetition {n}, {n,} or {n,m}; write \\{ for a brace", at
            )
        if not hi_s.isascii():
            raise self.error("bad repetition count", at)
        lo = int(lo_s)
        hi = lo if not comma else (int(hi_s) if hi_s else None)
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
            return self.group(at)
        if c in "*+?{":
            raise self.error("nothing to repeat", at)
        if c == "}":
            raise self.error("unbalanced '}'; write \\} for a brace", at)
        if c == "\\":
            return self.escape(at)
        self.i += 1
        if c == ".":
            return Chars(_NOT_NEWLINE)
        if c == "^":
            return Assertion("bol", at)
        if c == "$":
            return Assertion("eol", at)
        if c == "[":
            return Chars(self.bracket(at))
        return Chars(CharSet(((ord(c), ord(c)),)))

    def group(self, at: int) -> Node:
        self.i += 1
        name = None
        if self.p.startswith("?:", self.i):
            self.i += 2
        elif self.p.startswith("?P<", self.i):
            close = self.p.find(">", self.i)
            name = self.p[self.i + 3 : close] if close > 0 else ""
            if not name.isidentifier() or name in self.names:
                raise self.error("bad or duplicate group name", at)
            self.names.add(name)
            self.i = close + 1
        elif self.peek() == "?":
            raise self.error(
                "unsupported group syntax: look-around and inline flags are not supported "
                "(only (...), (?:...) and (?P<name>...))",
                at,
            )
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise self.error(f"groups nested deeper than {MAX_NESTING}", at)
        inner = self.alternation()
        self.depth -= 1
        if self.peek() != ")":
            raise self.error("missing ')'", at)
        self.i += 1
        return Group(inner, name)

    def escape(self, at: int) -> Node:
        e = self.escaped(at)
        if isinstance(e, CharSet):
            return Chars(e)
        if e in "bB":
            return Assertion("word" if e == "b" else "nonword", at)
        return Chars(CharSet(((ord(e), ord(e)),)))

    def escaped(self, at: int, *, in_class: bool = False) -> CharSet | str:
        """A class escape as its set, else the escaped character (``b``/``B`` outside classes)."""
        if self.i + 1 >= len(self.p):
            raise self.error("trailing backslash", at)
        e = self.p[self.i + 1]
        self.i += 2
        if e in "dDwWsS":
            ranges = {"d": _DIGIT, "w": _WORD, "s": _SPACE}[e.lower()]
            return CharSet(_complement(ranges) if e.isupper() else ranges)
        if e in _CONTROL:
            return _CONTROL[e]
        if (e in "bB" and not in_class) or (not e.isalnum() and (e.isascii() or e.isprintable())):
            return e
        raise self.error(f"unsupported escape \\{e}", at)

    def bracket(self, at: int) -> CharSet:
        negated = self.peek() == "^"
        self.i += negated
        ranges: list[tuple[int, int]] = []
        first = True
        while True:
            c = self.peek()
            if c is None:
                raise self.error("missing ']'", at)
            if c == "]" and not first:
                self.i += 1
                return CharSet(_normalize(ranges), negated)
            first = False
            item = self.class_atom()
            if isinstance(item, CharSet):
                ranges.extend(item.ranges)
                continue
            if self.peek() == "-" and self.p[self.i + 1 : self.i + 2] not in ("]", ""):
                dash = self.i
                self.i += 1
                hi = self.class_atom()
                if isinstance(hi, CharSet):
                    raise self.error("bad character range", dash)
                if ord(hi) < ord(item):
                    raise self.error("bad character range (end before start)", dash)
                ranges.append((ord(item), ord(hi)))
            else:
                ranges.append((ord(item), ord(item)))

    def class_atom(self) -> CharSet | str:
        c = self.p[self.i]
        if c == "\\":
            return self.escaped(self.i, in_class=True)
        if c == "[" and self.p[self.i + 1 : self.i + 2] in (":", "=", "."):
            raise self.error("POSIX classes like [:alpha:] are not supported")
        self.i += 1
        return c


def _program_size(node: Node) -> int:
    """How many NFA states ``node`` compiles to (see ``_Builder``)."""
    if isinstance(node, Chars | Assertion):
        return 1
    if isinstance(node, Concat):
        return sum(_program_size(n) for n in node.items)
    if isinstance(node, Alternation):
        return sum(_program_size(n) for n in node.branches) + len(node.branches) - 1
    if isinstance(node, Group):
        return _program_size(node.item)
    size = _program_size(node.item)
    extra = size + 2 if node.max is None else (node.max - node.min) * (size + 1)
    return node.min * size + extra


def _repeat_budget(node: Node, budget: int) -> int:
    """RE2's rule: nested counted repetitions may multiply to at most ``MAX_REPEAT``."""
    if isinstance(node, Repeat):
        count = node.min if node.max is None else node.max
        if count > 0:
            budget //= count
    return min([budget, *(_repeat_budget(n, budget) for n in _children(node))])


@functools.lru_cache(maxsize=1024)
def parse(pattern: str) -> Parsed:
    """Validate ``pattern`` against the subset: its syntax tree, or ``RegexError``."""
    if not isinstance(pattern, str):
        raise RegexError("a pattern must be a string", 0)
    parsed = _Parser(pattern).parse()
    if _program_size(parsed.root) > MAX_PROGRAM:
        raise RegexError(f"pattern too large: more than {MAX_PROGRAM} NFA states", 0)
    if _repeat_budget(parsed.root, MAX_REPEAT) == 0:
        raise RegexError(f"nested repetition counts multiply to more than {MAX_REPEAT}", 0)
    return parsed


# ---- Thompson NFA ----------------------------------------------------------------

_CHAR, _SPLIT, _ASSERT, _MATCH = range(4)
_BOL, _EOL, _WORDB, _NONWORDB = range(4)
_ASSERT_CODES = {"bol": _BOL, "eol": _EOL, "word": _WORDB, "nonword": _NONWORDB}
# Context on one side of a position: the edge of the text, a word character, another.
_EDGE, _WORDC, _OTHER = range(3)
_MATCHED = -1  # marks, in a closure, where the match state is reached


class _Builder:
    """Builds NFA states as parallel lists: op, arg (charset index or assertion), out, alt."""

    def __init__(self, charsets: dict[CharSet, int]) -> None:
        self.charsets = charsets
        self.op: list[int] = []
        self.arg: list[int] = []
        self.out: list[int] = []
        self.alt: list[int] = []

    def add(self, op: int, arg: int = 0, out: int = -1, alt: int = -1) -> int:
        self.op.append(op)
        self.arg.append(arg)
        self.out.append(out)
        self.alt.append(alt)
        return len(self.op) - 1

    def char(self, chars: CharSet, out: int) -> int:
        return self.add(_CHAR, self.charsets.setdefault(chars, len(self.charsets)), out)

    def split(self, first: int, second: int, lazy: bool = False) -> int:
        return self.add(_SPLIT, 0, *((second, first) if lazy else (first, second)))

    def build(self, node: Node, nxt: int, reverse: bool) -> int:
        """Build ``node`` continuing to state ``nxt``; return its entry state.

        ``reverse`` builds the mirror image (for finding where a match starts).
        """
        if isinstance(node, Chars):
            return self.char(node.chars, nxt)
        if isinstance(node, Assertion):
            kind = _ASSERT_CODES[node.kind]
            if reverse and kind in (_BOL, _EOL):
                kind = _EOL if kind == _BOL else _BOL
            return self.add(_ASSERT, kind, nxt)
        if isinstance(node, Concat):
            for item in node.items if reverse else reversed(node.items):
                nxt = self.build(item, nxt, reverse)
            return nxt
        if isinstance(node, Alternation):
            entries = [self.build(b, nxt, reverse) for b in node.branches]
            entry = entries[-1]
            for other in reversed(entries[:-1]):
                entry = self.split(other, entry)
            return entry
        if isinstance(node, Group):
            return self.build(node.item, nxt, reverse)
        copies = node.min
        if node.max is None:
            # RE2's construction, so that priorities agree with it: x{n,} is n-1
            # copies then x+ looping into its own copy, and x* is (?:x+)? when x can
            # match the empty string.
            loop = self.split(-1, nxt, node.lazy)
            body = self.build(node.item, loop, reverse)
            if node.lazy:
                self.alt[loop] = body
            else:
                self.out[loop] = body
            if copies:
                copies -= 1
                entry = body
            elif _nullable(node.item):
                entry = self.split(body, nxt, node.lazy)
            else:
                entry = loop
        else:
            entry = nxt
            for _ in range(node.max - node.min):
                entry = self.split(self.build(node.item, entry, reverse), nxt, node.lazy)
        for _ in range(copies):
            entry = self.build(node.item, entry, reverse)
        return entry


def _nullable(node: Node) -> bool:
    """Whether ``node`` can match the empty string."""
    if isinstance(node, Chars):
        return False
    if isinstance(node, Concat):
        return all(_nullable(n) for n in node.items)
    if isinstance(node, Alternation):
        return any(_nullable(n) for n in node.branches)
    if isinstance(node, Repeat):
        return node.min == 0 or _nullable(node.item)
    return isinstance(node, Assertion) or _nullable(node.item)


def _anchored(node: Node) -> bool:
    """Whether every match must start at the start of the text."""
    if isinstance(node, Assertion):
        return node.kind == "bol"
    if isinstance(node, Concat):
        return bool(node.items) and _anchored(node.items[0])
    if isinstance(node, Alternation):
        return all(_anchored(b) for b in node.branches)
    if isinstance(node, Group) or (isinstance(node, Repeat) and node.min > 0):
        return _anchored(node.item)
    return False


def _is_word(char: str) -> bool:
    return char.isascii() and (char.isalnum() or char == "_")


def _side(text: str, index: int) -> int:
    """The context a scan sees at ``text[index]`` (an edge outside the text)."""
    if not 0 <= index < len(text):
        return _EDGE
    return _WORDC if _is_word(text[index]) else _OTHER


class _Classes:
    """Characters grouped by which character sets hold them (and word-ness), cached."""

    def __init__(self, charsets: dict[CharSet, int], ignore_case: bool) -> None:
        self.sets = list(charsets)
        self.ignore_case = ignore_case
        self.word_bit = 1 << len(self.sets)
        self.cache: dict[str, int] = {}

    def of(self, char: str) -> int:
        bits = self.cache.get(char)
        if bits is None:
            bits = self.word_bit if _is_word(char) else 0
            for index, chars in enumerate(self.sets):
                if chars.contains(char, self.ignore_case):
                    bits |= 1 << index
            if len(self.cache) > _MAX_DFA_ENTRIES:
                self.cache.clear()
            self.cache[char] = bits
        return bits


class _State:
    """A DFA state: the NFA states still alive, in priority order, and the context behind.

    ``row`` maps a character to the next state's row for the plain transitions, so
    the scanning loop is one dict lookup per character; ``row[None]`` is the state.
    A transition that reports a match, dies, or leaves an idle state stays out of
    ``row`` and is taken through ``_Dfa.step``.
    """

    __slots__ = ("behind", "by_class", "closures", "idle", "pcs", "row")

    def __init__(self, pcs: tuple[int, ...], behind: int, idle: bool) -> None:
        self.pcs = pcs
        self.behind = behind
        self.idle = idle
        self.row: dict[str | None, Any] = {None: self}
        self.by_class: dict[int, tuple[_State | None, bool]] = {}
        self.closures: dict[int, tuple[tuple[int, ...], bool]] = {}


class _Dfa:
    """A lazily built DFA over one NFA program.

    ``first`` keeps leftmost-first priorities: once a thread matches, the threads
    after it are dropped (RE2's approach). ``prefilter`` and ``idle_pc`` let an
    unanchored search skip text where no match can start.
    """

    def __init__(
        self,
        nfa: _Builder,
        start: int,
        classes: _Classes,
        first: bool,
        prefilter: re.Pattern[str] | None = None,
        idle_pc: int = -1,
    ) -> None:
        self.op, self.arg, self.out, self.alt = nfa.op, nfa.arg, nfa.out, nfa.alt
        kinds = {a for o, a in zip(nfa.op, nfa.arg, strict=True) if o == _ASSERT}
        self.has_bol = _BOL in kinds
        self.has_eol = _EOL in kinds
        self.has_word = bool(kinds & {_WORDB, _NONWORDB})
        self.start_pc = start
        self.classes = classes
        self.first = first
        self.prefilter = prefilter
        self.idle_pc = idle_pc if prefilter is not None else -1
        self.states: dict[tuple[tuple[int, ...], int], _State] = {}
        self.reaches: dict[tuple[int, int], dict[int, tuple[int, ...]]] = {}
        self.entries = 0

    def state(self, pcs: tuple[int, ...], behind: int) -> _State:
        if behind == _EDGE and not self.has_bol:
            behind = _OTHER
        if behind == _WORDC and not self.has_word:
            behind = _OTHER
        found = self.states.get((pcs, behind))
        if found is None:
            if len(self.states) >= _MAX_DFA_STATES or self.entries >= _MAX_DFA_ENTRIES:
                self.flush()
            found = _State(pcs, behind, pcs == (self.idle_pc,))
            self.states[(pcs, behind)] = found
        return found

    def flush(self) -> None:
        """Forget every state. A scan still holding old ones keeps them alive (and
        correct) until it ends; nothing else refers to them, so they are freed then."""
        self.states = {}
        self.entries = 0

    def start(self, behind: int) -> _State:
        return self.state((self.start_pc,), behind)

    def closure(self, state: _State, ahead: int) -> tuple[tuple[int, ...], bool]:
        """The consuming NFA states reachable from ``state`` here, and whether it matches here."""
        if ahead == _EDGE and not self.has_eol:
            ahead = _OTHER
        if ahead == _WORDC and not self.has_word:
            ahead = _OTHER
        cached = state.closures.get(ahead)
        if cached is None:
            # Each state's own closure, in priority order; a state reached first
            # belongs to the higher priority thread (what a shared visited set does).
            table = self.reaches.setdefault((state.behind, ahead), {})
            for pc in state.pcs:
                if pc not in table:
                    table[pc] = self.reach(pc, state.behind, ahead)
            reach = dict.fromkeys(chain.from_iterable(map(table.__getitem__, state.pcs)))
            order = tuple(reach)
            if _MATCHED in reach:
                at = order.index(_MATCHED)
                consumers = order[:at] + (() if self.first else order[at + 1 :])
                cached = (consumers, True)
            else:
                cached = (order, False)
            state.closures[ahead] = cached
        return cached

    def reach(self, start: int, behind: int, ahead: int) -> tuple[int, ...]:
        """The consuming states reachable from ``start`` without input, in priority
        order, with ``_MATCHED`` where the match state is reached."""
        op, arg, out, alt = self.op, self.arg, self.out, self.alt
        result: list[int] = []
        seen: set[int] = set()
        stack = [start]
        while stack:
            pc = stack.pop()
            if pc in seen:
                continue
            seen.add(pc)
            code = op[pc]
            if code == _CHAR:
                result.append(pc)
            elif code == _SPLIT:
                stack.append(alt[pc])
                stack.append(out[pc])
            elif code == _ASSERT:
                kind = arg[pc]
                if kind == _BOL:
                    holds = behind == _EDGE
                elif kind == _EOL:
                    holds = ahead == _EDGE
                else:
                    holds = ((behind == _WORDC) != (ahead == _WORDC)) == (kind == _WORDB)
                if holds:
                    stack.append(out[pc])
            else:
                result.append(_MATCHED)
        return tuple(result)

    def matches_here(self, state: _State, ahead: int) -> bool:
        return self.closure(state, ahead)[1]

    def step(self, state: _State, char: str) -> tuple[_State | None, bool]:
        """The state after ``char`` (None: no thread left) and whether a match ends before it."""
        bits = self.classes.of(char)
        known = state.by_class.get(bits)
        if known is None:
            side = _WORDC if bits & self.classes.word_bit else _OTHER
            consumers, matched = self.closure(state, side)
            arg, out = self.arg, self.out
            live = tuple(dict.fromkeys(out[pc] for pc in consumers if bits >> arg[pc] & 1))
            known = (self.state(live, side) if live else None, matched)
            state.by_class[bits] = known
        target, matched = known
        if target is not None and not matched and not state.idle:
            state.row[char] = target.row
            self.entries += 1
        return known

    def forward(self, text: str, pos: int, *, first_end: bool) -> int:
        """Where the leftmost-first match at or after ``pos`` ends (-1: none).

        With ``first_end``, where the first match found ends (enough for a yes/no).
        """
        n = len(text)
        last = -1
        it: Any = iter(text)
        it.__setstate__(pos)
        row = self.start(_side(text, pos - 1)).row
        while True:
            try:
                for char in it:
                    row = row[char]
            except KeyError:
                pass
            else:
                return n if self.matches_here(row[None], _EDGE) else last
            state: _State = row[None]
            index: int = n - it.__length_hint__() - 1
            if state.idle:
                assert self.prefilter is not None
                found = self.prefilter.search(text, index)
                if found is None:
                    return last
                index = found.start()
                state = self.start(_side(text, index - 1))
                char = text[index]
                it.__setstate__(index + 1)
            target, matched = self.step(state, char)
            if matched:
                if first_end:
                    return index
                last = index
            if target is None:
                return last
            row = target.row

    def backward(self, text: str, end: int, pos: int) -> int:
        """The smallest start >= ``pos`` of a match ending at ``end`` (-1: none)."""
        best = -1
        it: Any = reversed(text[pos:end])
        row = self.start(_side(text, end)).row
        while True:
            try:
                for char in it:
                    row = row[char]
            except KeyError:
                pass
            else:
                return pos if self.matches_here(row[None], _side(text, pos - 1)) else best
            target, matched = self.step(row[None], char)
            if matched:
                best = pos + it.__length_hint__() + 1
            if target is None:
                return best
            row = target.row


# ---- prefilter -----------------------------------------------------------------

_Seq = tuple[frozenset[str], ...]
_MAX_SEQS = 32
_MAX_SEQ_LEN = 8
# The only non-ASCII characters with an ASCII case form (see ``_case_forms``).
_FOLDS_TO_ASCII = {"i": "\u0131", "s": "\u017f", "k": "\u212a"}


def _small_set(chars: CharSet, ignore_case: bool) -> frozenset[str] | None:
    """Every character ``chars`` matches, when that is a handful (else None)."""
    if chars.negated or sum(hi - lo + 1 for lo, hi in chars.ranges) > 16:
        return None
    members = {chr(c) for lo, hi in chars.ranges for c in range(lo, hi + 1)}
    if ignore_case:
        if not all(c.isascii() for c in members):
            return None
        members |= {c.swapcase() for c in members}
        members |= {_FOLDS_TO_ASCII[c] for c in members if c in _FOLDS_TO_ASCII}
    return frozenset(members)


def _prefixes(node: Node, ignore_case: bool) -> tuple[set[_Seq], bool] | None:
    """Sequences one of which starts every match of ``node`` (None: unknown).

    The flag says the sequences are whole matches (so what follows may extend them).
    """
    if isinstance(node, Chars):
        members = _small_set(node.chars, ignore_case)
        return None if members is None else ({(members,)}, True)
    if isinstance(node, Assertion):
        return {()}, True
    if isinstance(node, Group):
        return _prefixes(node.item, ignore_case)
    if isinstance(node, Alternation):
        union: set[_Seq] = set()
        exact = True
        for branch in node.branches:
            sub = _prefixes(branch, ignore_case)
            if sub is None:
                return None
            union |= sub[0]
            exact = exact and sub[1]
        return (union, exact) if len(union) <= _MAX_SEQS else None
    if isinstance(node, Repeat):
        if node.min == 0:
            return {()}, node.max == 0
        sub = _prefixes(node.item, ignore_case)
        return None if sub is None else (sub[0], sub[1] and node.min == node.max == 1)
    seqs: set[_Seq] = {()}
    for item in node.items:
        sub = _prefixes(item, ignore_case)
        if sub is None:
            return seqs, False
        longer = {(a + b)[:_MAX_SEQ_LEN] for a, b in product(seqs, sub[0])}
        if len(longer) > _MAX_SEQS:
            return seqs, False
        seqs = longer
        if not sub[1] or any(len(s) == _MAX_SEQ_LEN for s in seqs):
            return seqs, False
    return seqs, True


def _prefilter(parsed: Parsed) -> re.Pattern[str] | None:
    """A Python ``re`` of fixed-length alternatives (so linear) that finds every match start."""
    found = _prefixes(parsed.root, parsed.ignore_case)
    if found is None or () in found[0]:
        return None

    def element(members: frozenset[str]) -> str:
        if len(members) == 1:
            return re.escape(next(iter(members)))
        return "[" + "".join(re.escape(c) for c in sorted(members)) + "]"

    return re.compile("|".join(sorted("".join(map(element, seq)) for seq in found[0])))


# ---- RE2 -----------------------------------------------------------------------


def _re2_class(chars: CharSet) -> str:
    if not chars.negated and len(chars.ranges) == 1 and chars.ranges[0][0] == chars.ranges[0][1]:
        return f"\\x{{{chars.ranges[0][0]:x}}}"
    ranges = chars.ranges
    negated = chars.negated
    if not ranges:  # an empty class: RE2 needs at least one range, so complement it
        ranges, negated = ((0, _MAX_CODE),), not negated
    body = "".join(
        f"\\x{{{lo:x}}}" if lo == hi else f"\\x{{{lo:x}}}-\\x{{{hi:x}}}" for lo, hi in ranges
    )
    return f"[{'^' if negated else ''}{body}]"


def _re2_source(node: Node) -> str:
    """RE2 syntax for ``node``, written from the tree so RE2 reads what we parsed."""
    if isinstance(node, Chars):
        return _re2_class(node.chars)
    if isinstance(node, Assertion):
        return {"bol": "\\A", "eol": "\\z", "word": "\\b", "nonword": "\\B"}[node.kind]
    if isinstance(node, Concat):
        return "".join(_re2_source(n) for n in node.items) or "(?:)"
    if isinstance(node, Alternation):
        return "(?:" + "|".join(_re2_source(n) for n in node.branches) + ")"
    if isinstance(node, Group):
        return "(?:" + _re2_source(node.item) + ")"
    counts = f"{node.min}," + ("" if node.max is None else str(node.max))
    return f"(?:{_re2_source(node.item)}){{{counts}}}" + ("?" if node.lazy else "")


@functools.cache
def _re2_module() -> Any:
    try:
        import re2
    except ImportError:
        return None
    return re2


def engine_name() -> Engine:
    """Which engine ``compile_regex`` uses by default here: "re2" or "nfa"."""
    return "re2" if _re2_module() is not None else "nfa"


# ---- compiled patterns ---------------------------------------------------------


class _Automata:
    """The pure-Python engine for one pattern: lazily built DFAs for each question."""

    def __init__(self, parsed: Parsed) -> None:
        self.parsed = parsed
        self.charsets: dict[CharSet, int] = {}
        program = _Builder(self.charsets)
        entry = program.build(parsed.root, program.add(_MATCH), reverse=False)
        self.anchored = _anchored(parsed.root)
        prefilter = None
        idle = -1
        if not self.anchored:
            # A lazy any-character loop before the pattern: its thread has the lowest
            # priority, so leftmost-first drops it once something matched.
            idle = program.split(entry, -1)
            program.alt[idle] = program.char(_ANY, idle)
            entry = idle
            prefilter = _prefilter(parsed)
        self.classes = _Classes(self.charsets, parsed.ignore_case)
        self.search = _Dfa(program, entry, self.classes, True, prefilter, idle)

    @functools.cached_property
    def whole(self) -> _Dfa:
        """Anchored at both ends, for ``fullmatch``."""
        program = _Builder(self.charsets)
        end = program.add(_ASSERT, _EOL, program.add(_MATCH))
        return _Dfa(program, program.build(self.parsed.root, end, False), self.classes, True)

    @functools.cached_property
    def mirror(self) -> _Dfa:
        """The pattern reversed, run backwards from a match's end to find its start."""
        program = _Builder(self.charsets)
        entry = program.build(self.parsed.root, program.add(_MATCH), reverse=True)
        return _Dfa(program, entry, self.classes, False)

    def finditer(self, text: str) -> Iterator[tuple[int, int]]:
        pos = 0
        while pos <= len(text) and not (self.anchored and pos > 0):
            end = self.search.forward(text, pos, first_end=False)
            if end < 0:
                return
            start = self.mirror.backward(text, end, pos)
            assert 0 <= start <= end
            yield start, end
            pos = end if end > start else end + 1


class Regex:
    """A compiled, validated pattern."""

    __slots__ = ("_automata", "_re2", "engine", "parsed", "pattern")

    def __init__(self, parsed: Parsed, engine: Engine) -> None:
        self.pattern = parsed.pattern
        self.parsed = parsed
        self.engine = engine
        self._re2: Any = None
        self._automata: _Automata | None = None
        if engine == "re2":
            re2 = _re2_module()
            if re2 is None:
                raise ImportError("RE2 is not installed: pip install 'bastion-guard[re2]'")
            options = re2.Options()
            options.log_errors = False
            source = ("(?i)" if parsed.ignore_case else "") + _re2_source(parsed.root)
            try:
                self._re2 = re2.compile(source, options)
            except re2.error as exc:
                raise RegexError(f"RE2 rejected the pattern: {exc}", 0) from None
        else:
            self._automata = _Automata(parsed)

    def __repr__(self) -> str:
        return f"Regex({self.pattern!r}, engine={self.engine!r})"

    def _fallback(self) -> _Automata:
        # Also used on the RE2 path for text RE2 cannot encode (lone surrogates).
        if self._automata is None:
            self._automata = _Automata(self.parsed)
        return self._automata

    def search(self, text: str) -> bool:
        """Whether the pattern matches somewhere in ``text``."""
        if self._re2 is not None:
            try:
                return self._re2.search(text) is not None
            except UnicodeEncodeError:
                pass
        return self._fallback().search.forward(text, 0, first_end=True) >= 0

    def fullmatch(self, text: str) -> bool:
        """Whether the pattern matches the whole of ``text``."""
        if self._re2 is not None:
            try:
                return self._re2.fullmatch(text) is not None
            except UnicodeEncodeError:
                pass
        return self._fallback().whole.forward(text, 0, first_end=True) >= 0

    def finditer(self, text: str) -> Iterator[tuple[int, int]]:
        """The ``(start, end)`` spans of the leftmost-first matches, in order, without overlaps."""
        if self._re2 is not None:
            try:
                spans = [m.span() for m in self._re2.finditer(text)]
            except UnicodeEncodeError:
                pass
            else:
                # RE2's Python wrapper reports an empty match found ahead of its
                # position twice; each span is yielded once.
                return iter(dict.fromkeys(spans))
        return self._fallback().finditer(text)


@functools.lru_cache(maxsize=1024)
def compile_regex(pattern: str, engine: Engine | None = None) -> Regex:
    """Validate and compile ``pattern``; ``engine`` is "re2", "nfa" or None (RE2 when installed).

    Asking for "re2" without it installed raises ImportError naming the extra.
    """
    return Regex(parse(pattern), engine or engine_name())
