"""Value provenance: the ``from untrusted | user | trusted`` operator.

A value "comes from" a source when it, or a typed token inside it, occurs in
that source's text. Typed tokens are what an attacker would plant and a user
would type: e-mail addresses, URLs, IBANs, numbers of 6+ digits (account and
card numbers, ids), file paths, and runs of eight words of free text.

Matching is on normalised text (Unicode NFKC, casefold, whitespace collapsed),
whole-token only (a hit must not continue into a letter or digit on either side)
and ignores short tokens (see ``MIN_LENGTH``): "123" or "ok" occur everywhere
and would make every value look planted. Each context's texts are indexed once
(``Context._cache``), so a policy with many ``from`` rules pays for the scan once.

Every step is linear in the text: tokens are found by splitting on whitespace
and classifying each piece with anchored patterns over that piece only.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "MIN_LENGTH",
    "SHINGLE_WORDS",
    "ProvenanceIndex",
    "from_source",
    "index_for",
    "normalize",
    "tokens_of",
]

SHINGLE_WORDS = 8
MIN_LENGTH = {"whole": 8, "email": 6, "url": 10, "iban": 15, "number": 6, "path": 6}
_CACHE_KEY = "bastion.provenance"

_STRIP = "\"'`()[]{}<>,;:!?.*"
_EMAIL = re.compile(r"[^@\s/]+@[^@\s/.]+(?:\.[^@\s/.]+)+")
_URL = re.compile(r"(?:https?://|www\.)\S+")
_IBAN_COMPACT = re.compile(r"[a-z]{2}[0-9]{2}[a-z0-9]{11,30}")
_IBAN_SPACED = re.compile(r"\b[a-z]{2}[0-9]{2}(?: [a-z0-9]{4}){2,7}(?: [a-z0-9]{1,3})?\b")
_DIGITS = re.compile(r"[0-9](?:[0-9]|[-.](?=[0-9]))*")
_PATH = re.compile(r"(?:~|\.{1,2})?/?[\w.\-]+(?:/[\w.\-]+)+/?")
_WORDS = re.compile(r"\w+")


def normalize(text: str) -> str:
    """NFKC, casefold, and every run of whitespace made one space."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def _typed(norm: str) -> Iterator[tuple[str, str]]:
    for m in _IBAN_SPACED.finditer(norm):
        compact = m.group(0).replace(" ", "")
        if _IBAN_COMPACT.fullmatch(compact):
            yield ("iban", compact)
    for raw in norm.split(" "):
        piece = raw.strip(_STRIP)
        if not piece:
            continue
        if piece.startswith("mailto:"):
            piece = piece[7:]
        if _URL.fullmatch(piece):
            url = piece.rstrip("/")
            if len(url) >= MIN_LENGTH["url"]:
                yield ("url", url)
            continue
        if _EMAIL.fullmatch(piece):
            if len(piece) >= MIN_LENGTH["email"]:
                yield ("email", piece)
            continue
        if _IBAN_COMPACT.fullmatch(piece):
            yield ("iban", piece)
        for m in _DIGITS.finditer(piece):
            digits = re.sub(r"[^0-9]", "", m.group(0))
            if len(digits) >= MIN_LENGTH["number"]:
                yield ("number", digits)
        if "/" in piece and _PATH.fullmatch(piece) and len(piece) >= MIN_LENGTH["path"]:
            yield ("path", piece.rstrip("/"))


def _shingles(norm: str) -> Iterator[str]:
    words = _WORDS.findall(norm)
    for i in range(len(words) - SHINGLE_WORDS + 1):
        yield " ".join(words[i : i + SHINGLE_WORDS])


def tokens_of(value: str) -> tuple[tuple[str, str], ...]:
    """The tokens a value is looked up by: itself, its typed tokens, its 8-word runs."""
    norm = normalize(value)
    out: list[tuple[str, str]] = []
    if len(norm) >= MIN_LENGTH["whole"]:
        out.append(("whole", norm))
    out.extend(_typed(norm))
    out.extend(("words", s) for s in _shingles(norm))
    return tuple(dict.fromkeys(out))


def _is_word_char(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


def _find_whole(haystack: str, needle: str) -> bool:
    start = haystack.find(needle)
    while start != -1:
        end = start + len(needle)
        before_ok = (
            start == 0 or not _is_word_char(haystack[start - 1]) or not _is_word_char(needle[0])
        )
        after_ok = (
            end == len(haystack)
            or not _is_word_char(haystack[end])
            or not _is_word_char(needle[-1])
        )
        if before_ok and after_ok:
            return True
        start = haystack.find(needle, start + 1)
    return False


@dataclass(frozen=True, slots=True)
class _Corpus:
    text: str
    typed: frozenset[tuple[str, str]]
    shingles: frozenset[str]

    @classmethod
    def build(cls, texts: Iterable[str]) -> _Corpus:
        norms = [normalize(t) for t in texts if isinstance(t, str) and t]
        typed: set[tuple[str, str]] = set()
        shingles: set[str] = set()
        for n in norms:
            typed.update(_typed(n))
            shingles.update(_shingles(n))
        return cls("\n".join(norms), frozenset(typed), frozenset(shingles))

    def has(self, token: tuple[str, str]) -> bool:
        kind, value = token
        if kind == "words":
            return value in self.shingles
        if kind != "whole" and token in self.typed:
            return True
        return bool(self.text) and _find_whole(self.text, value)


@dataclass(frozen=True, slots=True)
class ProvenanceIndex:
    """The normalised, tokenised texts of one context, by source."""

    untrusted: _Corpus
    user: _Corpus
    trusted: _Corpus

    def holds(self, source: str, value: Any) -> bool:
        """Whether ``value`` comes from ``source`` (untrusted, user or trusted)."""
        for s in _strings(value, 0):
            for token in tokens_of(s):
                if source == "untrusted":
                    if (
                        self.untrusted.has(token)
                        and not self.user.has(token)
                        and not self.trusted.has(token)
                    ):
                        return True
                elif source == "user":
                    if self.user.has(token):
                        return True
                elif self.trusted.has(token):
                    return True
        return False


_MAX_DEPTH = 64


def _strings(value: Any, depth: int) -> Iterator[str]:
    if depth > _MAX_DEPTH:
        raise ValueError("value nested too deeply for provenance")
    if isinstance(value, str):
        yield value
    elif isinstance(value, bool) or value is None:
        return
    elif isinstance(value, (int, float)):
        yield str(value)
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _strings(v, depth + 1)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v, depth + 1)


def index_for(context: Any) -> ProvenanceIndex:
    """The provenance index of a ``Context``, built on first use and cached in it."""
    cache: dict[str, Any] = context._cache
    idx = cache.get(_CACHE_KEY)
    if idx is None:
        idx = ProvenanceIndex(
            untrusted=_Corpus.build(context.untrusted_texts),
            user=_Corpus.build(context.user_texts),
            trusted=_Corpus.build(context.trusted_texts),
        )
        cache[_CACHE_KEY] = idx
    assert isinstance(idx, ProvenanceIndex)
    return idx


def from_source(context: Any, source: str, value: Any) -> bool:
    """``value from source`` in ``context``."""
    return index_for(context).holds(source, value)
