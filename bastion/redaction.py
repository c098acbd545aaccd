"""Redaction of secrets (and optionally personal data) in tool output, and blocking.

``Redactor`` finds secrets with built-in detectors and custom patterns and
replaces each with ``[REDACTED:<detector>]``:

===================== =========================================================
detector              what it finds
===================== =========================================================
aws_access_key_id     ``AKIA``/``ASIA``/... access key ids
aws_secret_access_key the 40-character secret after an ``aws_secret_access_key``
                      or ``SecretAccessKey`` label
gcp_api_key           ``AIza...`` API keys
azure_storage_key     ``AccountKey=`` / ``SharedAccessKey=`` in connection strings
azure_sas_token       the ``sig=`` signature of SAS URLs and connection strings
github_token          ``ghp_ gho_ ghu_ ghs_ ghr_`` tokens and ``github_pat_`` PATs
slack_token           ``xoxa- xoxb- xoxp- xoxr- xoxe- xoxs-`` tokens
slack_webhook         ``https://hooks.slack.com/services/...`` URLs
anthropic_key         ``sk-ant-...`` keys
openai_key            ``sk-...`` / ``sk-proj-...`` keys (with a digit, so prose like
                      ``sk-learn-...`` is left alone)
stripe_key            ``sk_live_ sk_test_ rk_live_ rk_test_`` keys, ``whsec_`` secrets
private_key           PEM private key blocks, ``BEGIN`` to ``END`` (an unterminated
                      block is redacted to the end of its base64 body)
jwt                   ``eyJ...eyJ...`` JSON Web Tokens
bearer_token          the token after ``Bearer`` (the word itself stays)
email                 e-mail addresses (opt-in: group ``pii``)
phone                 phone numbers with 8 to 15 digits (opt-in: group ``pii``)
===================== =========================================================

Linear time. Tool output is attacker-controlled, so every pattern must run in
time linear in the text. With RE2 installed (``pip install
'bastion-guard[re2]'``) the built-in detectors and custom patterns run on RE2,
which is linear by construction. Without it, built-in detectors run on Python's
``re`` in variants written to be safe on a backtracking engine, and custom
patterns on the pure-Python engine of ``bastion.policy.regex``. The safe variants
follow one recipe: each begins with a look-behind that only lets a match start at
the *start* of a run of its token characters, and every repetition over a token
class is possessive (``++``, ``{m,n}+``), so an attempt consumes each run once and
never gives characters back. Each run is therefore examined by a bounded number
of attempts (at most three, for the three parts of a JWT), and each attempt does
work proportional to the runs it reads: linear in the text. Private key blocks
are found by a scanner (``str.find``) rather than a regex, so a text of many
``BEGIN`` lines without ``END`` stays linear too.

Where it works: ``redact(text)`` for plain text, ``redact_json(value)`` for JSON
tool outputs (every string in nested dicts and lists, **keys included**: a
secret used as a key is still a secret; two keys that become equal get a
``#2`` suffix), ``redact_mcp_content(blocks)`` and ``redact_mcp_result(result)``
for MCP content blocks (text, embedded resource text, structured content;
base64 image and audio data is left alone), and ``StreamRedactor`` for
streamed text. Each method takes an optional ``counts`` (a ``Counter``) that it
fills with hits per detector, for the audit ``detail``.

Streams. ``StreamRedactor(redactor).feed(chunk)`` returns what is safe to
send now; ``flush()`` returns the rest at the end of the stream. It holds back
only a tail that could still become (part of) a secret: the trailing run of
non-whitespace characters (every detector's match is whitespace-free except
those below), a match that touches the end of the buffer (it might grow), a
``-----BEGIN`` with no ``-----END`` yet, a ``Bearer`` or ``aws_secret_access_key
=`` label whose value may still be coming, and trailing digits of a possible
phone number. The hold is bounded by ``max_hold`` characters (16 KiB, longer than
any PEM key): a secret no longer than that is caught however the stream splits
it. Custom patterns are caught across chunks when their matches contain no
whitespace.

``block_placeholder(tool, reason)`` is the text that replaces an output a
``block`` rule drops (or that quarantine could not process).
"""

from __future__ import annotations

import functools
import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from bastion.policy.regex import Regex, compile_regex, engine_name

__all__ = [
    "DETECTORS",
    "GROUPS",
    "Finding",
    "Redactor",
    "StreamRedactor",
    "block_placeholder",
]

RedactEngine = Literal["re2", "python"]


def _has_digit(text: str) -> bool:
    return any(c.isdigit() for c in text)


def _looks_random(text: str) -> bool:
    return _has_digit(text) or (len(text) >= 20 and not text.isalpha())


def _email_ok(text: str) -> bool:
    local, _, domain = text.rpartition("@")
    tld = domain.rsplit(".", 1)[-1]
    return 1 <= len(local) <= 64 and len(tld) >= 2 and tld.isalpha()


def _phone_ok(text: str) -> bool:
    return 8 <= sum(c.isdigit() for c in text) <= 15


@dataclass(frozen=True, slots=True)
class _Detector:
    name: str
    re2: str
    python: str
    group: str | None = None
    check: Callable[[str], bool] | None = None
    hold: str | None = None


_AWS_PREFIX = "(?:A3T[A-Z0-9]|AKIA|ASIA|ABIA|ACCA|AGPA|AIDA|AROA|ANPA|ANVA|APKA)"
_AWS_LABEL = r"(?i:aws_?secret_?(?:access_?)?key|secretaccesskey)"
_PHONE = (
    r"(?:\+[0-9]{1,3}[ .-]?)?(?:\([0-9]{2,4}\)[ .-]?|[0-9]{2,4}[ .-])[0-9]{3,4}[ .-]?[0-9]{3,4}"
)

_SPECS: tuple[_Detector, ...] = (
    _Detector(
        "aws_access_key_id",
        rf"\b{_AWS_PREFIX}[A-Z0-9]{{16}}\b",
        rf"(?<![A-Za-z0-9]){_AWS_PREFIX}[A-Z0-9]{{16}}(?![A-Za-z0-9])",
    ),
    _Detector(
        "aws_secret_access_key",
        _AWS_LABEL
        + r"[\"']?\s{0,8}[:=]\s{0,8}[\"']?(?P<secret>[A-Za-z0-9/+]{40})(?:[^A-Za-z0-9/+=]|$)",
        r"(?<![A-Za-z0-9_])"
        + _AWS_LABEL
        + r"[\"']?\s{0,8}+[:=]\s{0,8}+[\"']?(?P<secret>[A-Za-z0-9/+]{40})(?![A-Za-z0-9/+=])",
        group="secret",
        hold=_AWS_LABEL + r"[\"']?\s{0,8}[:=]?\s{0,8}[\"']?[A-Za-z0-9/+]{0,40}\Z",
    ),
    _Detector(
        "gcp_api_key",
        r"\bAIza[0-9A-Za-z_-]{35}",
        r"(?<![A-Za-z0-9_-])AIza[0-9A-Za-z_-]{35}+",
    ),
    _Detector(
        "azure_storage_key",
        r"(?i:AccountKey|SharedAccessKey)=(?P<secret>[A-Za-z0-9+/]{20,100}={0,2})",
        r"(?i:AccountKey|SharedAccessKey)=(?P<secret>[A-Za-z0-9+/]{20,100}+={0,2})",
        group="secret",
    ),
    _Detector(
        "azure_sas_token",
        r"\bsig=(?P<secret>[A-Za-z0-9%+/=]{20,200})",
        r"(?<![A-Za-z0-9_])sig=(?P<secret>[A-Za-z0-9%+/=]{20,200}+)",
        group="secret",
    ),
    _Detector(
        "github_token",
        r"\b(?:gh[pousr]_[A-Za-z0-9]{36}|github_pat_[A-Za-z0-9_]{70,100})\b",
        r"(?<![A-Za-z0-9_])(?:gh[pousr]_[A-Za-z0-9]{36}|github_pat_[A-Za-z0-9_]{70,100}+)(?![A-Za-z0-9_])",
    ),
    _Detector(
        "slack_token",
        r"\bxox[abpers]-[A-Za-z0-9-]{10,250}",
        r"(?<![A-Za-z0-9_])xox[abpers]-[A-Za-z0-9-]{10,250}+",
    ),
    _Detector(
        "slack_webhook",
        r"https://hooks\.slack\.com/(?:services|workflows|triggers)/[A-Za-z0-9_/-]{10,200}",
        r"https://hooks\.slack\.com/(?:services|workflows|triggers)/[A-Za-z0-9_/-]{10,200}+",
    ),
    _Detector(
        "anthropic_key",
        r"\bsk-ant-[A-Za-z0-9_-]{20,250}",
        r"(?<![A-Za-z0-9_-])sk-ant-[A-Za-z0-9_-]{20,250}+",
    ),
    _Detector(
        "openai_key",
        r"\bsk-[A-Za-z0-9_-]{20,250}",
        r"(?<![A-Za-z0-9_-])sk-[A-Za-z0-9_-]{20,250}+",
        check=_has_digit,
    ),
    _Detector(
        "stripe_key",
        r"\b(?:(?:sk|rk)_(?:live|test)_[A-Za-z0-9]{10,250}|whsec_[A-Za-z0-9]{20,100})",
        r"(?<![A-Za-z0-9_])(?:(?:sk|rk)_(?:live|test)_[A-Za-z0-9]{10,250}+|whsec_[A-Za-z0-9]{20,100}+)",
    ),
    _Detector(
        "jwt",
        r"\beyJ[A-Za-z0-9_-]{5,}\.eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*",
        r"(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]{5,}+\.eyJ[A-Za-z0-9_-]{5,}+\.[A-Za-z0-9_-]*+",
    ),
    _Detector(
        "bearer_token",
        r"(?i:\bbearer)\s{1,16}(?P<secret>[A-Za-z0-9._~+/=-]{8,})",
        r"(?i:(?<![A-Za-z0-9_])bearer)\s{1,16}+(?P<secret>[A-Za-z0-9._~+/=-]{8,}+)",
        group="secret",
        check=_looks_random,
        hold=r"(?i:\bbearer)\s{1,16}[A-Za-z0-9._~+/=-]*\Z",
    ),
    _Detector(
        "email",
        r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63})+",
        r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]++@[A-Za-z0-9-]{1,63}+(?:\.[A-Za-z0-9-]{1,63}+)++",
        check=_email_ok,
    ),
    _Detector(
        "phone",
        _PHONE + r"\b",
        r"(?<![A-Za-z0-9_+.-])" + _PHONE + r"(?![0-9])",
        check=_phone_ok,
        hold=r"[+(]?[0-9][0-9 ().-]{0,24}\Z",
    ),
)

_PEM_BEGIN = re.compile(r"-----BEGIN [A-Z0-9 ]{0,40}?PRIVATE KEY(?: BLOCK)?-----")
_PEM_END = re.compile(r"-----END [A-Z0-9 ]{0,40}?PRIVATE KEY(?: BLOCK)?-----")
_PEM_BODY = re.compile(r"[A-Za-z0-9+/=\s\\:.,_-]*+")

DETECTORS: tuple[str, ...] = (*(d.name for d in _SPECS), "private_key")
"""Every built-in detector's name."""

GROUPS: Mapping[str, tuple[str, ...]] = {
    "secrets": tuple(name for name in DETECTORS if name not in ("email", "phone")),
    "pii": ("email", "phone"),
}
"""Named sets of detectors usable wherever a detector name is."""

_DEFAULT = GROUPS["secrets"]
_TAIL_WINDOW = 512


@dataclass(frozen=True, slots=True)
class Finding:
    """One redacted span: ``text[start:end]`` was the secret."""

    detector: str
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class _Compiled:
    name: str
    search: Callable[[str], Iterable[tuple[int, int]]]
    hold: re.Pattern[str] | None


def _regex_finder(
    pattern: Any, group: str | None, check: Callable[[str], bool] | None
) -> Callable[[str], Iterable[tuple[int, int]]]:
    index = pattern.groupindex[group] if group else 0

    def find(text: str) -> Iterable[tuple[int, int]]:
        for match in pattern.finditer(text):
            start, end = match.span(index)
            if start < 0 or end <= start:
                continue
            if check is None or check(text[start:end]):
                yield start, end

    return find


def _linear_finder(pattern: Regex) -> Callable[[str], Iterable[tuple[int, int]]]:
    def find(text: str) -> Iterable[tuple[int, int]]:
        for start, end in pattern.finditer(text):
            if end > start:
                yield start, end

    return find


def _find_private_keys(text: str) -> Iterable[tuple[int, int]]:
    position = 0
    end_search_exhausted = False
    while True:
        begin = _PEM_BEGIN.search(text, position)
        if begin is None:
            return
        end = None if end_search_exhausted else _PEM_END.search(text, begin.end())
        if end is None:
            # Without an END later in the text, none of the following BEGINs has one
            # either: remember that, so many BEGINs cost one scan, not one each.
            end_search_exhausted = True
            body = _PEM_BODY.match(text, begin.end())
            stop = body.end() if body else begin.end()
        else:
            stop = end.end()
        yield begin.start(), stop
        position = stop


def _choose_engine(engine: RedactEngine | None) -> RedactEngine:
    if engine is None:
        return "re2" if engine_name() == "re2" else "python"
    if engine == "re2" and engine_name() != "re2":
        raise ImportError("RE2 is not installed: pip install 'bastion-guard[re2]'")
    return engine


class Redactor:
    """Finds and replaces secrets in text, JSON values, MCP content and streams.

    ``detectors`` are built-in detector names or group names (``secrets``,
    ``pii``); the default is every secret detector (no personal data).
    ``patterns`` adds custom patterns (the linear-time subset of
    ``bastion.policy.regex``, as for ``matches``), as a mapping name -> pattern
    or a sequence (each then named ``custom``). ``engine`` forces ``"re2"`` or
    ``"python"``; by default RE2 is used when installed. Unknown detector names
    and bad patterns (``RegexError``) raise ValueError at construction.
    """

    def __init__(
        self,
        detectors: Iterable[str] | None = None,
        *,
        patterns: Mapping[str, str] | Sequence[str] = (),
        engine: RedactEngine | None = None,
        placeholder: str = "[REDACTED:{name}]",
    ) -> None:
        self.engine = _choose_engine(engine)
        self.placeholder = placeholder
        names = _expand(_DEFAULT if detectors is None else detectors)
        named = (
            list(patterns.items())
            if isinstance(patterns, Mapping)
            else [("custom", p) for p in patterns]
        )
        self.detectors = names
        self._compiled = [self._compile(name) for name in names]
        for label, source in named:
            compiled = compile_regex(source, "re2" if self.engine == "re2" else "nfa")
            self._compiled.append(_Compiled(label, _linear_finder(compiled), None))

    @classmethod
    def for_patterns(cls, patterns: Sequence[str]) -> Redactor:
        """The redactor for a result decision's ``redact_patterns`` (memoized).

        Each entry is a detector or group name, or else a custom pattern; an
        empty list means every secret detector.
        """
        return _for_patterns(tuple(patterns))

    def _compile(self, name: str) -> _Compiled:
        if name == "private_key":
            return _Compiled(name, _find_private_keys, None)
        spec = next(d for d in _SPECS if d.name == name)
        if self.engine == "re2":
            import re2

            options = re2.Options()
            options.log_errors = False
            pattern: Any = re2.compile(spec.re2, options)
        else:
            pattern = re.compile(spec.python)
        hold = re.compile(spec.hold) if spec.hold else None
        return _Compiled(name, _regex_finder(pattern, spec.group, spec.check), hold)

    def find(self, text: str) -> list[Finding]:
        """Every secret in ``text``, as non-overlapping spans in order (overlaps merged)."""
        hits: list[tuple[int, int, int]] = []
        for rank, compiled in enumerate(self._compiled):
            hits.extend((start, end, rank) for start, end in compiled.search(text))
        hits.sort(key=lambda h: (h[0], -h[1], h[2]))
        merged: list[Finding] = []
        for start, end, rank in hits:
            if merged and start < merged[-1].end:
                last = merged[-1]
                if end > last.end:
                    merged[-1] = Finding(last.detector, last.start, end)
                continue
            merged.append(Finding(self._compiled[rank].name, start, end))
        return merged

    def _apply(self, text: str, findings: Sequence[Finding], counts: Counter[str] | None) -> str:
        if not findings:
            return text
        parts: list[str] = []
        position = 0
        for finding in findings:
            parts.append(text[position : finding.start])
            parts.append(self.placeholder.format(name=finding.detector))
            position = finding.end
            if counts is not None:
                counts[finding.detector] += 1
        parts.append(text[position:])
        return "".join(parts)

    def redact(self, text: str, *, counts: Counter[str] | None = None) -> str:
        """``text`` with every secret replaced by ``[REDACTED:<detector>]``."""
        return self._apply(text, self.find(text), counts)

    def redact_json(self, value: Any, *, counts: Counter[str] | None = None) -> Any:
        """A copy of a JSON value with every string (values and keys) redacted."""
        if isinstance(value, str):
            return self.redact(value, counts=counts)
        if isinstance(value, list | tuple):
            return [self.redact_json(item, counts=counts) for item in value]
        if isinstance(value, Mapping):
            result: dict[Any, Any] = {}
            for key, item in value.items():
                new_key = self.redact(key, counts=counts) if isinstance(key, str) else key
                if new_key in result:
                    suffix = 2
                    while f"{new_key} #{suffix}" in result:
                        suffix += 1
                    new_key = f"{new_key} #{suffix}"
                result[new_key] = self.redact_json(item, counts=counts)
            return result
        return value

    def redact_mcp_content(
        self, blocks: Sequence[Any], *, counts: Counter[str] | None = None
    ) -> list[Any]:
        """MCP content blocks with text, resource text and metadata redacted.

        Base64 ``data`` of image and audio blocks and ``blob`` of resources are
        binary and left as they are.
        """
        result: list[Any] = []
        for block in blocks:
            if not isinstance(block, Mapping):
                result.append(self.redact_json(block, counts=counts))
                continue
            kind = block.get("type")
            if kind in ("image", "audio"):
                copy = {
                    k: (v if k == "data" else self.redact_json(v, counts=counts))
                    for k, v in block.items()
                }
            elif kind == "resource" and isinstance(block.get("resource"), Mapping):
                resource = block["resource"]
                inner = {
                    k: (v if k == "blob" else self.redact_json(v, counts=counts))
                    for k, v in resource.items()
                }
                copy = {
                    k: (inner if k == "resource" else self.redact_json(v, counts=counts))
                    for k, v in block.items()
                }
            else:
                copy = self.redact_json(block, counts=counts)
            result.append(copy)
        return result

    def redact_mcp_result(
        self, result: Mapping[str, Any], *, counts: Counter[str] | None = None
    ) -> dict[str, Any]:
        """An MCP ``tools/call`` result with ``content`` and ``structuredContent`` redacted."""
        copy = dict(result)
        if isinstance(copy.get("content"), list):
            copy["content"] = self.redact_mcp_content(copy["content"], counts=counts)
        if "structuredContent" in copy:
            copy["structuredContent"] = self.redact_json(copy["structuredContent"], counts=counts)
        return copy

    def stream(self, *, max_hold: int = 16384) -> StreamRedactor:
        """A ``StreamRedactor`` using this redactor."""
        return StreamRedactor(self, max_hold=max_hold)


class StreamRedactor:
    """Redacts text that arrives in chunks, holding back as little as possible.

    ``feed(chunk)`` returns the text that is safe to pass on now; ``flush()``
    returns the rest when the stream ends. Secrets split across chunks are caught
    (see the module docstring for what is held back and why).
    """

    def __init__(self, redactor: Redactor, *, max_hold: int = 16384) -> None:
        self.redactor = redactor
        self.max_hold = max_hold
        self.counts: Counter[str] = Counter()
        self._buffer = ""

    @property
    def pending(self) -> int:
        """How many characters are currently held back."""
        return len(self._buffer)

    def feed(self, chunk: str) -> str:
        self._buffer += chunk
        return self._emit(final=False)

    def flush(self) -> str:
        return self._emit(final=True)

    def _hold_start(self, text: str) -> int:
        length = len(text)
        floor = max(0, length - self.max_hold)
        cut = floor
        for index in range(length - 1, floor - 1, -1):
            if text[index].isspace():
                cut = index + 1
                break
        window_start = max(0, length - _TAIL_WINDOW)
        window = text[window_start:]
        for compiled in self.redactor._compiled:
            if compiled.hold is not None:
                match = compiled.hold.search(window)
                if match is not None:
                    cut = min(cut, window_start + match.start())
            elif compiled.name == "private_key":
                begin = text.rfind("-----BEGIN", max(0, length - self.max_hold))
                if begin >= 0 and text.find("-----END", begin) < 0:
                    cut = min(cut, begin)
        return cut

    def _emit(self, *, final: bool) -> str:
        text = self._buffer
        length = len(text)
        findings = self.redactor.find(text)
        if final:
            cut = length
        else:
            floor = max(0, length - self.max_hold)
            cut = max(self._hold_start(text), floor)
            for finding in reversed(findings):
                if finding.start < cut and (finding.end > cut or finding.end == length):
                    # A match that crosses the cut or touches the end may still grow.
                    cut = finding.start if finding.start >= floor else finding.end
        emitted = [f for f in findings if f.end <= cut]
        out = self.redactor._apply(text[:cut], emitted, self.counts)
        self._buffer = text[cut:]
        return out


@functools.lru_cache(maxsize=256)
def _for_patterns(patterns: tuple[str, ...]) -> Redactor:
    names: list[str] = []
    custom: list[str] = []
    for entry in patterns:
        (names if entry in GROUPS or entry in DETECTORS else custom).append(entry)
    if not names and not custom:
        names = list(_DEFAULT)
    return Redactor(names, patterns=custom)


def _expand(names: Iterable[str]) -> tuple[str, ...]:
    result: list[str] = []
    for name in names:
        members = GROUPS.get(name, (name,))
        for member in members:
            if member not in DETECTORS:
                raise ValueError(
                    f"unknown redaction detector {member!r}; known: {', '.join(DETECTORS)}"
                )
            if member not in result:
                result.append(member)
    return tuple(result)


def block_placeholder(tool: str | None, reason: str | None = None) -> str:
    """The text that replaces a blocked tool output.

    ``reason`` should come from the policy (a rule's reason), never from the
    output itself; it is flattened to one line of at most 200 characters.
    """
    name = json.dumps(tool) if tool else "a tool"
    why = " ".join((reason or "blocked by policy").split())[:200]
    return f"[Bastion blocked the output of {name}: {why}]"
