"""What every codec shares on the wire: strict JSON, error bodies, body decoding, verdicts.

* :func:`loads_strict` parses untrusted JSON the one way Bastion accepts it:
  UTF-8 only, no duplicate keys at any depth (two parsers disagreeing on which
  copy wins is a bypass), no lone surrogates, no NaN/Infinity, bounded nesting.
  With ``jiter`` installed (extra ``fast``; the openai and anthropic SDKs
  depend on it) it parses with jiter, else with the standard library; both
  accept and refuse the same texts.
  Failures raise :class:`~bastion.errors.ProtocolError` with ``code`` one of
  ``invalid_json``, ``duplicate_key``, ``invalid_utf8``, ``invalid_unicode``,
  ``non_finite_number``, ``too_deep``.
* Error bodies, one builder per protocol: :func:`openai_error`,
  :func:`anthropic_error`, :func:`jsonrpc_error`, and
  :func:`protocol_error_body` which maps a ``ProtocolError`` to the body and
  status a client of that protocol expects.
* :class:`BodyDecoder` / :func:`decompress`: ``Content-Encoding`` decoding
  with an output cap (a decompression bomb raises ``ProtocolError`` 413);
  :func:`can_decode` tells the caller beforehand whether an encoding is
  understood, so it can refuse or pass the body through uninspected.
* The small vocabulary the LLM codecs share with their caller:
  :class:`CallView` (a tool call found in a response), :class:`ResultView`
  (a tool output found in a request, with its location), :class:`Verdict`
  (the caller's decision on a call) and :func:`refusal_text`.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import zlib
from collections import deque
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from bastion.adapters.sse import SSEEvent, SSEParser
from bastion.errors import ProtocolError
from bastion.events import ToolCall, ToolResult, ToolSpec

__all__ = [
    "DEFAULT_MAX_DEPTH",
    "JSONRPC_HEADER_MISMATCH",
    "JSONRPC_INTERNAL_ERROR",
    "JSONRPC_INVALID_PARAMS",
    "JSONRPC_INVALID_REQUEST",
    "JSONRPC_METHOD_NOT_FOUND",
    "JSONRPC_PARSE_ERROR",
    "BodyDecoder",
    "CallView",
    "LLMRequest",
    "LLMResponse",
    "LazyArguments",
    "Location",
    "ResultView",
    "StreamRewriter",
    "StreamStep",
    "ToolSpecCache",
    "Verdict",
    "anthropic_error",
    "can_decode",
    "decompress",
    "dumps_compact",
    "jsonrpc_code_for",
    "jsonrpc_error",
    "loads_strict",
    "openai_error",
    "parse_arguments",
    "protocol_error_body",
    "refusal_text",
]

# Nesting bounds recursion in Bastion's own walkers; 256 is deeper than any request
# a client sends (JSON schemas run 10-20 deep) and sits between the limits of
# serde_json (128) and jiter (~200) on one side and Python's json (~1000) on the other.
DEFAULT_MAX_DEPTH = 256

JSONRPC_PARSE_ERROR = -32700
JSONRPC_INVALID_REQUEST = -32600
JSONRPC_METHOD_NOT_FOUND = -32601
JSONRPC_INVALID_PARAMS = -32602
JSONRPC_INTERNAL_ERROR = -32603
# MCP 2026-07-28: HTTP headers disagree with the body.
JSONRPC_HEADER_MISMATCH = -32020

_PARSE_LEVEL_CODES = frozenset(
    {
        "invalid_json",
        "duplicate_key",
        "invalid_utf8",
        "invalid_unicode",
        "non_finite_number",
        "too_deep",
    }
)

# ---------------------------------------------------------------- strict JSON

_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_ESCAPE = re.compile(rb"\\.", re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'"[]{}:')
_PARENS = bytes.maketrans(b"[{]}", b"(())")
_DEPTH_STEP = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}
_CONTAINERS = frozenset({dict, list})


def _find_jiter() -> Callable[..., Any] | None:
    try:
        from jiter import from_json
    except ImportError:
        return None
    return from_json


# jiter's ``from_json`` when it is installed (the ``fast`` extra), else None.
# Tests and benchmarks set it to None to run the stdlib path: that path is the
# reference, and every text jiter refuses is parsed there again, so the fault
# reported is always the stdlib's.
_JITER: Callable[..., Any] | None = _find_jiter()
# jiter refuses nesting deeper than this itself ("recursion limit exceeded":
# arrays past 201 levels, objects past 200). Under a max_depth at least this deep
# nothing jiter accepts can be too deep, so its value needs no walk; what it
# refuses for depth alone goes to the stdlib path, whose answer then stands.
_JITER_NESTING = 201
_JITER_TOO_DEEP = "recursion limit exceeded"


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ProtocolError(f"duplicate key {key!r} in JSON object", code="duplicate_key")
            seen.add(key)
    return obj


def _reject_constant(name: str) -> Any:
    raise ProtocolError(f"{name} is not valid JSON", code="non_finite_number")


_PAIRWISE_MAX = 2048
# The byte scan costs some 60 ns per backslash escape (0.7 ms for 190 KB of
# quoted text); parsing pair by pair and walking the value costs some 0.3 us
# per object instead. Long texts with at least one backslash in this many
# bytes go the walked way. Both ways give the same answer, so the density is
# only estimated, from every 16th byte (a full count costs 50 us on 190 KB).
_WALK_MIN_SIZE = 16384
_WALK_ESCAPE_SPACING = 64
_ESCAPE_SAMPLING = 16
_PAIRS_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)


def _structure(raw: bytes) -> bytes:
    """The brackets and colons of a JSON text that lie outside its strings, in order.

    Escapes go first (in JSON a backslash always starts a two-byte escape, or
    ``\\uXXXX`` whose hex digits do not matter here), so every quote left
    opens or closes a string; then everything but quotes, brackets and colons
    goes, strings with nothing left inside go as pairs, and whatever is still
    between quote pairs goes last. All of it runs at C speed.
    """
    if b"\\" in raw:
        raw = _ESCAPE.sub(b"", raw)
    shape = raw.translate(None, _NOT_STRUCTURE).replace(b'""', b"")
    if b'"' in shape:
        shape = b"".join(shape.split(b'"')[::2])
    return shape


def _check_depth(raw: bytes, max_depth: int, structure: bytes) -> None:
    # Peel innermost bracket pairs once per allowed level; anything left (too deep,
    # or unbalanced) goes to the exact computation.
    shape = structure.translate(_PARENS, b":")
    for _ in range(max_depth):
        if not shape:
            return
        shape = shape.replace(b"()", b"")
    if not shape:
        return
    skeleton = _STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    if max(itertools.accumulate(_DEPTH_STEP[b] for b in skeleton), default=0) > max_depth:
        raise ProtocolError(f"JSON nested deeper than {max_depth}", code="too_deep")


def _nested_deeper(value: Any, max_depth: int) -> bool:
    """True when a parsed value holds lists and objects more than ``max_depth`` levels deep."""
    # Level by level, keeping only containers: one comprehension per level, and
    # never more than max_depth + 1 levels however deep the value goes.
    level = [value] if type(value) in _CONTAINERS else []
    for _ in range(max_depth):
        if not level:
            return False
        level = [
            sub
            for item in level
            for sub in (item.values() if type(item) is dict else item)
            if type(sub) in _CONTAINERS
        ]
    return bool(level)


def _check_strings(value: Any) -> None:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            item.encode("utf-8")
        elif isinstance(item, dict):
            for key, sub in item.items():
                key.encode("utf-8")
                stack.append(sub)
        elif isinstance(item, list):
            stack.extend(item)


def _parse_counting(text: str, members: int) -> Any:
    """Parse with the C scanner building dicts itself; a duplicate key shows as a missing member.

    ``members`` is the number of name separators (colons outside strings) in
    the text: one per object member. Only when the parsed objects hold fewer
    is the text parsed again, pair by pair, to name the duplicate.
    """
    kept = 0

    def count(obj: dict[str, Any]) -> dict[str, Any]:
        nonlocal kept
        kept += len(obj)
        return obj

    value = json.loads(text, object_hook=count, parse_constant=_reject_constant)
    if kept != members:
        _PAIRS_DECODER.decode(text)
        raise ProtocolError("duplicate key in JSON object", code="duplicate_key")
    return value


def _parse_scanned(raw: bytes, text: str, max_depth: int) -> Any:
    structure = _structure(raw)
    _check_depth(raw, max_depth, structure)
    return _parse_counting(text, structure.count(b":"))


def _parse_walked(raw: bytes, text: str, max_depth: int) -> Any:
    """Parse pair by pair, then measure the nesting of the value, with no scan of the bytes.

    A text that fails to parse goes the scanned way after all, so a text with
    several faults reports the same one whichever way it first went.
    """
    try:
        value = _PAIRS_DECODER.decode(text)
    except (ProtocolError, ValueError, RecursionError):
        return _parse_scanned(raw, text, max_depth)
    if _nested_deeper(value, max_depth):
        raise ProtocolError(f"JSON nested deeper than {max_depth}", code="too_deep")
    return value


def _loads_stdlib(raw: bytes, text: str | None, max_depth: int) -> Any:
    """``loads_strict`` with the standard library alone: the reference for the jiter way."""
    if text is None:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolError("body is not valid UTF-8", code="invalid_utf8") from exc
    if text.startswith("\ufeff"):
        raise ProtocolError("JSON text must not start with a byte order mark", code="invalid_json")
    try:
        # A short text cannot nest deeper than half its length, and fewer openers
        # than the limit cannot nest deeper either; so few objects are cheapest
        # checked pair by pair. Longer texts are scanned at C speed, unless
        # escapes are so dense that walking the parsed value is cheaper.
        size = len(raw)
        if size <= 2 * max_depth or (
            size <= _PAIRWISE_MAX and raw.count(b"[") + raw.count(b"{") <= max_depth
        ):
            value = _PAIRS_DECODER.decode(text)
        elif size >= _WALK_MIN_SIZE and (
            raw[::_ESCAPE_SAMPLING].count(b"\\") * _ESCAPE_SAMPLING >= size // _WALK_ESCAPE_SPACING
        ):
            value = _parse_walked(raw, text, max_depth)
        else:
            value = _parse_scanned(raw, text, max_depth)
    except ProtocolError:
        raise
    except RecursionError as exc:
        raise ProtocolError("JSON nested too deeply", code="too_deep") from exc
    except ValueError as exc:
        raise ProtocolError(f"malformed JSON: {exc}", code="invalid_json") from exc
    if b"\\" in raw and _SURROGATE_ESCAPE.search(raw):
        try:
            _check_strings(value)
        except UnicodeEncodeError as exc:
            raise ProtocolError(
                "JSON string contains a lone surrogate", code="invalid_unicode"
            ) from exc
    return value


def loads_strict(data: bytes | str, *, max_depth: int = DEFAULT_MAX_DEPTH) -> Any:
    """Parse untrusted JSON, rejecting anything two parsers could read differently."""
    if isinstance(data, str):
        try:
            raw = data.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ProtocolError(
                "JSON text contains a lone surrogate", code="invalid_unicode"
            ) from exc
        text: str | None = data
    else:
        raw = bytes(data)
        text = None
    from_json = _JITER
    if from_json is None:
        return _loads_stdlib(raw, text, max_depth)
    try:
        # jiter itself refuses duplicate keys, invalid UTF-8, lone surrogates,
        # NaN/Infinity and a byte order mark; nesting is checked below.
        value = from_json(raw, catch_duplicate_keys=True, allow_inf_nan=False, cache_mode="keys")
    except ValueError as exc:
        stdlib_value = _loads_stdlib(raw, text, max_depth)
        if str(exc).startswith(_JITER_TOO_DEEP):
            # Deeper than jiter goes but within max_depth: the stdlib's reading stands.
            return stdlib_value
        # Fail closed: what jiter refuses stays refused, even when the stdlib
        # reads it (a float whose integer part has over 4300 digits).
        raise ProtocolError(f"malformed JSON: {exc}", code="invalid_json") from exc
    if max_depth < _JITER_NESTING and len(raw) > 2 * max_depth and _nested_deeper(value, max_depth):
        raise ProtocolError(f"JSON nested deeper than {max_depth}", code="too_deep")
    return value


def dumps_compact(value: Any) -> bytes:
    """Serialise to compact UTF-8 JSON (no NaN, no ASCII escaping)."""
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode(
            "utf-8"
        )
    except (ValueError, UnicodeEncodeError) as exc:
        raise ProtocolError(
            f"value cannot be serialised as JSON: {exc}", code="invalid_json"
        ) from exc


def parse_arguments(raw: str) -> tuple[dict[str, Any], str | None]:
    """Parse tool-call arguments text: (arguments, None) or ({}, why they are unusable).

    Empty text counts as ``{}`` (models send it for tools without parameters).
    """
    if raw.strip() == "":
        return {}, None
    try:
        value = loads_strict(raw)
    except ProtocolError as exc:
        return {}, f"arguments are not valid JSON ({exc.code}: {exc.message})"
    if not isinstance(value, dict):
        return {}, "arguments are not a JSON object"
    return value, None


class LazyArguments(Mapping[str, Any]):
    """Arguments of an earlier tool call in a conversation, parsed on first use.

    A request's history holds every call the agent made so far; their arguments
    matter only if a result rule (or the audit) reads them, so the text is
    parsed by :func:`parse_arguments` when first looked at: ``{}`` when it is
    unusable, exactly as an eager parse would give.
    """

    __slots__ = ("_raw", "_value")

    def __init__(self, raw: str) -> None:
        self._raw = raw
        self._value: dict[str, Any] | None = None

    def _parsed(self) -> dict[str, Any]:
        value = self._value
        if value is None:
            value = self._value = parse_arguments(self._raw)[0]
        return value

    def __getitem__(self, key: str) -> Any:
        return self._parsed()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._parsed())

    def __len__(self) -> int:
        return len(self._parsed())

    def __repr__(self) -> str:
        return f"LazyArguments({self._parsed()!r})"


class ToolSpecCache:
    """The specs of recently seen tools lists: an agent resends the same list every turn.

    ``specs(tools)`` gives ``[build(t) for t in tools]`` without the Nones,
    reusing the result for a list equal to one seen lately. Keys are private
    copies, so a caller mutating its body later cannot alter them. Equal lists
    have the same names and descriptions (strings compare exactly); numbers in
    schemas compare by value (``1 == 1.0 == true``), and no decision reads a
    schema's number types.
    """

    def __init__(self, build: Callable[[Any], ToolSpec | None], *, size: int = 32) -> None:
        self._build = build
        self._size = size
        # Replaced, never mutated, so readers on other threads iterate safely.
        self._recent: list[tuple[list[Any], tuple[ToolSpec, ...]]] = []

    def specs(self, tools: list[Any]) -> list[ToolSpec]:
        for seen, specs in self._recent:
            if seen == tools:
                return list(specs)
        built = [spec for spec in map(self._build, tools) if spec is not None]
        try:
            key = json.loads(json.dumps(tools))
        except (TypeError, ValueError):
            return built
        self._recent = [(key, tuple(built)), *self._recent[: self._size - 1]]
        return built


# ---------------------------------------------------------------- shared codec vocabulary

Location = tuple[str | int, ...]
"""A path into a parsed body: keys and list indexes, outermost first."""


@dataclass(frozen=True, slots=True)
class CallView:
    """A tool call found in a model response.

    ``call`` carries the parsed arguments (``{}`` when they are unusable);
    ``error`` says why when the arguments are not a JSON object, and then the
    caller must deny the call. ``raw_arguments`` is the text the model sent.
    ``position`` orders calls within a response (choice index and call index
    for OpenAI chat, output index for Responses, content block index for
    Anthropic).
    """

    call: ToolCall
    raw_arguments: str
    error: str | None = None
    position: tuple[int, ...] = ()

    @property
    def valid(self) -> bool:
        return self.error is None


class ResultView:
    """A tool's output found in a request's conversation.

    ``name`` and ``arguments`` come from the call that produced it; ``traced``
    is False when no earlier call with that id exists (the name is then empty:
    treat such output as untrusted). ``location`` points at the content to hand
    to ``replace_tool_result``. ``result`` is the output as a
    :class:`~bastion.events.ToolResult`, built when first asked for: a
    conversation carries many outputs, and most need no decision of their own.
    """

    __slots__ = (
        "_result",
        "arguments",
        "call_id",
        "content",
        "is_error",
        "location",
        "name",
        "traced",
    )

    def __init__(
        self,
        call_id: str | None,
        name: str,
        content: Any,
        arguments: Mapping[str, Any],
        location: Location,
        traced: bool = True,
        is_error: bool = False,
    ) -> None:
        self.call_id = call_id
        self.name = name
        self.content = content
        self.arguments = arguments
        self.location = location
        self.traced = traced
        self.is_error = is_error
        self._result: ToolResult | None = None

    @classmethod
    def traced_to(
        cls,
        produced: Mapping[str, tuple[str, Mapping[str, Any]]],
        call_id: Any,
        content: Any,
        location: Location,
        *,
        is_error: bool = False,
    ) -> ResultView:
        """The output answering ``call_id``, traced to its call in ``produced`` (id: name, arguments)."""
        own_id = call_id if isinstance(call_id, str) else None
        source = produced.get(own_id) if own_id is not None else None
        name, arguments = source or ("", {})
        return cls(own_id, name, content, arguments, location, source is not None, is_error)

    @property
    def result(self) -> ToolResult:
        result = self._result
        if result is None:
            result = self._result = ToolResult(
                self.call_id, self.name, self.content, self.arguments, self.is_error
            )
        return result

    def __repr__(self) -> str:
        return (
            f"ResultView(call_id={self.call_id!r}, name={self.name!r}, location={self.location!r},"
            f" traced={self.traced!r})"
        )


@dataclass
class LLMRequest:
    """A parsed LLM request (chat, Responses, messages); mutate it, then :meth:`to_bytes`.

    ``tools`` are the offered tools, ``tool_results`` the tool outputs in the
    conversation, ``user_texts`` the user's and system's own messages. Each
    protocol's subclass adds ``keep_tools``.
    """

    body: dict[str, Any]
    tools: list[ToolSpec] = field(default_factory=list)
    tool_results: list[ResultView] = field(default_factory=list)
    user_texts: tuple[str, ...] = ()

    @property
    def model(self) -> str | None:
        model = self.body.get("model")
        return model if isinstance(model, str) else None

    @property
    def stream(self) -> bool:
        return self.body.get("stream") is True

    def _keep_listed(
        self,
        key: str,
        keep: Collection[str],
        drop_with: tuple[str, ...] = (),
        name_of: Callable[[Any], str | None] | None = None,
    ) -> None:
        # Shared by the keep_tools of every protocol: a list left empty goes with
        # the members that would name something in it (tool_choice...).
        listed = self.body.get(key)
        if not isinstance(listed, list):
            return
        if name_of is None:
            kept = [e for e in listed if isinstance(e, dict) and e.get("name") in keep]
        else:
            kept = [e for e in listed if name_of(e) in keep]
        if kept:
            self.body[key] = kept
        else:
            for gone in (key, *drop_with):
                self.body.pop(gone, None)

    def replace_tool_result(self, location: Location, content: str | list[Any]) -> None:
        """Replace one tool output (a ``ResultView.location``) with new content."""
        if not location:
            raise ValueError("empty location")
        target: Any = self.body
        for key in location[:-1]:
            target = target[key]
        target[location[-1]] = content

    def to_bytes(self) -> bytes:
        return dumps_compact(self.body)


@dataclass
class LLMResponse:
    """A parsed (non-streaming) LLM response with its tool calls; :meth:`refuse`, then :meth:`to_bytes`.

    Each protocol's subclass says how a refused call leaves its body
    (``_refuse_in_body``).
    """

    body: dict[str, Any]
    calls: list[CallView] = field(default_factory=list)

    def refuse(self, refusals: Mapping[str, str]) -> None:
        """Take out the calls whose ids are keys of ``refusals``, each replaced by its refusal text."""
        self._refuse_in_body(refusals)
        self.calls = [v for v in self.calls if v.call.id not in refusals]

    def _refuse_in_body(self, refusals: Mapping[str, str]) -> None:
        raise NotImplementedError

    def to_bytes(self) -> bytes:
        return dumps_compact(self.body)


@dataclass(frozen=True, slots=True)
class Verdict:
    """The caller's decision on one tool call: let it through, or replace it by ``text``."""

    allow: bool
    text: str = ""

    @classmethod
    def allowed(cls) -> Verdict:
        return cls(True)

    @classmethod
    def refused(cls, text: str) -> Verdict:
        return cls(False, text)


def refusal_text(tool: str, reason: str, *, approval_id: str | None = None) -> str:
    """The assistant text that stands in for a refused tool call."""
    if approval_id is not None:
        return (
            f"[bastion] The call to tool '{tool}' needs approval before it can run: {reason} "
            f"(approval id {approval_id})."
        )
    return f"[bastion] The call to tool '{tool}' was blocked by policy: {reason}."


# ---------------------------------------------------------------- error bodies

_OPENAI_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
}
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def openai_error(
    message: str, *, type: str = "invalid_request_error", code: str | None = None
) -> dict[str, Any]:
    """An OpenAI API error body: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type, "param": None, "code": code}}


def anthropic_error(message: str, *, type: str = "invalid_request_error") -> dict[str, Any]:
    """An Anthropic API error body: ``{"type": "error", "error": {"type", "message"}}``."""
    return {"type": "error", "error": {"type": type, "message": message}}


def jsonrpc_error(
    request_id: str | int | None, code: int, message: str, data: Any = None
) -> dict[str, Any]:
    """A JSON-RPC 2.0 error response (``id`` is null when the request's id is unknown)."""
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return {"jsonrpc": "2.0", "id": request_id, "error": error}


def jsonrpc_code_for(exc: ProtocolError) -> int:
    """The JSON-RPC error code for a protocol error (parse-level, header mismatch, or invalid request)."""
    if exc.code in _PARSE_LEVEL_CODES:
        return JSONRPC_PARSE_ERROR
    if exc.code == "header_mismatch":
        return JSONRPC_HEADER_MISMATCH
    return JSONRPC_INVALID_REQUEST


def protocol_error_body(
    protocol: Literal["openai", "anthropic", "jsonrpc"],
    exc: ProtocolError,
    *,
    request_id: str | int | None = None,
) -> tuple[int, bytes]:
    """(HTTP status, JSON body) answering ``exc`` in the client's protocol.

    JSON-RPC errors go out with status 200 when they answer a request whose id
    is known, else with the error's own status, as MCP servers do.
    """
    if protocol == "openai":
        body = openai_error(
            exc.message, type=_OPENAI_TYPES.get(exc.status, "invalid_request_error"), code=exc.code
        )
        return exc.status, dumps_compact(body)
    if protocol == "anthropic":
        kind = _ANTHROPIC_TYPES.get(
            exc.status, "api_error" if exc.status >= 500 else "invalid_request_error"
        )
        return exc.status, dumps_compact(anthropic_error(exc.message, type=kind))
    status = 200 if request_id is not None else exc.status
    body = jsonrpc_error(request_id, jsonrpc_code_for(exc), exc.message, {"reason": exc.code})
    return status, dumps_compact(body)


# ---------------------------------------------------------------- content encodings

_ENCODINGS = {"gzip", "x-gzip", "deflate", "br", "zstd", "identity"}


def _available(name: str) -> bool:
    if name == "br":
        try:
            import brotli  # noqa: F401
        except ImportError:
            return False
    if name == "zstd":
        try:
            import zstandard  # noqa: F401
        except ImportError:
            return False
    return name in _ENCODINGS


def _encodings(header: str | None) -> list[str]:
    if not header:
        return []
    return [part.strip().lower() for part in header.split(",") if part.strip()]


def can_decode(content_encoding: str | None) -> bool:
    """True when every coding in a ``Content-Encoding`` value can be decoded here."""
    return all(_available(name) for name in _encodings(content_encoding))


class _Stage:
    def feed(self, data: bytes, limit: int) -> bytes:
        raise NotImplementedError

    def finish(self) -> None:
        raise NotImplementedError


class _ZlibStage(_Stage):
    def __init__(self, wbits: int, fallback_raw: bool = False) -> None:
        self._wbits = wbits
        self._obj = zlib.decompressobj(wbits)
        self._fallback_raw = fallback_raw
        self._first = True

    def feed(self, data: bytes, limit: int) -> bytes:
        out = bytearray()
        pending = data
        while pending:
            try:
                chunk = self._obj.decompress(pending, limit - len(out) + 1)
            except zlib.error:
                if self._first and self._fallback_raw:
                    # Some servers send raw deflate under "deflate"; accept it as browsers do.
                    self._fallback_raw = False
                    self._obj = zlib.decompressobj(-zlib.MAX_WBITS)
                    continue
                raise
            self._first = False
            out += chunk
            if len(out) > limit:
                return bytes(out)
            pending = self._obj.unconsumed_tail
            if self._obj.eof and self._obj.unused_data:
                pending = self._obj.unused_data
                if self._wbits & 16:
                    # gzip allows several members back to back.
                    self._obj = zlib.decompressobj(self._wbits)
                elif pending.strip(b"\x00"):
                    raise zlib.error("trailing data after the compressed stream")
                else:
                    break
        return bytes(out)

    def finish(self) -> None:
        if not self._obj.eof:
            raise zlib.error("compressed stream is truncated")


class _BrotliStage(_Stage):
    def __init__(self) -> None:
        import brotli

        self._obj = brotli.Decompressor()

    def feed(self, data: bytes, limit: int) -> bytes:
        out = bytearray(self._obj.process(data, output_buffer_limit=limit + 1))
        while len(out) <= limit and not self._obj.can_accept_more_data():
            more = self._obj.process(b"", output_buffer_limit=limit + 1 - len(out))
            if not more:
                break
            out += more
        return bytes(out)

    def finish(self) -> None:
        if not self._obj.is_finished():
            raise ValueError("brotli stream is truncated")


class _CappedSink:
    """A write target for zstandard that stops decompression past the cap."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.limit = 0

    def write(self, data: bytes) -> int:
        self.buffer += data
        if len(self.buffer) > self.limit:
            raise _OverLimit
        return len(data)


class _OverLimit(Exception):
    pass


class _ZstdStage(_Stage):
    def __init__(self) -> None:
        import zstandard

        self._sink = _CappedSink()
        self._writer = zstandard.ZstdDecompressor().stream_writer(
            self._sink,  # type: ignore[arg-type]  # any object with write() will do
            write_size=65536,
        )
        self._seen = False

    def feed(self, data: bytes, limit: int) -> bytes:
        self._sink.limit = limit
        self._sink.buffer = bytearray()
        if data:
            self._seen = True
        with contextlib.suppress(_OverLimit):
            self._writer.write(data)
        return bytes(self._sink.buffer)

    def finish(self) -> None:
        if not self._seen:
            raise ValueError("zstd stream is empty")


def _stage(name: str) -> _Stage | None:
    if name in ("gzip", "x-gzip"):
        return _ZlibStage(16 + zlib.MAX_WBITS)
    if name == "deflate":
        return _ZlibStage(zlib.MAX_WBITS, fallback_raw=True)
    if name == "br" and _available("br"):
        return _BrotliStage()
    if name == "zstd" and _available("zstd"):
        return _ZstdStage()
    if name == "identity":
        return None
    raise ProtocolError(
        f"unsupported content encoding {name!r}", status=415, code="unsupported_encoding"
    )


class BodyDecoder:
    """Incremental ``Content-Encoding`` decoder with a cap on the decoded size.

    Codings are undone in reverse order of the header. ``feed`` returns the
    decoded bytes available so far; ``close`` checks that the stream was
    complete. Raises ``ProtocolError`` with ``unsupported_encoding`` (415) at
    construction for a coding this process cannot decode, ``body_too_large``
    (413) once the output exceeds ``max_size``, ``invalid_encoding`` (400) for
    corrupt or truncated data.
    """

    def __init__(self, content_encoding: str | None, *, max_size: int) -> None:
        self._stages = [
            s for s in (_stage(name) for name in reversed(_encodings(content_encoding))) if s
        ]
        self._max = max_size
        self._total = 0

    def feed(self, data: bytes) -> bytes:
        try:
            for stage in self._stages:
                data = stage.feed(data, self._max - self._total)
        except ProtocolError:
            raise
        except Exception as exc:
            raise ProtocolError(f"body does not decode: {exc}", code="invalid_encoding") from exc
        self._total += len(data)
        if self._total > self._max:
            raise ProtocolError(
                f"decoded body larger than {self._max} bytes", status=413, code="body_too_large"
            )
        return data

    def close(self) -> None:
        try:
            for stage in self._stages:
                stage.finish()
        except Exception as exc:
            raise ProtocolError(f"body does not decode: {exc}", code="invalid_encoding") from exc


def decompress(data: bytes, content_encoding: str | None, *, max_size: int) -> bytes:
    """Decode a whole body; see :class:`BodyDecoder` for the errors."""
    decoder = BodyDecoder(content_encoding, max_size=max_size)
    out = decoder.feed(data)
    decoder.close()
    return out


# ---------------------------------------------------------------- stream rewriting


@dataclass(frozen=True, slots=True)
class StreamStep:
    """What a stream rewriter hands back: bytes to send now, and calls awaiting a verdict."""

    output: bytes
    needs_verdict: tuple[CallView, ...] = ()


class _Slot:
    """One queued piece of output: ready bytes, a held call, or a late-rendered event."""

    __slots__ = ("call", "render", "size", "verdict")

    def __init__(
        self, render: Callable[[], bytes], size: int, call: CallView | None = None
    ) -> None:
        self.render = render
        self.size = size
        self.call = call
        self.verdict: Verdict | None = None

    @property
    def ready(self) -> bool:
        return self.call is None or self.verdict is not None


class StreamRewriter:
    """Hold-and-verdict machinery shared by the LLM stream rewriters.

    Feed it upstream bytes; it passes events straight through until a tool
    call starts, holds that call's events until its arguments are complete,
    then surfaces the call in :attr:`StreamStep.needs_verdict` and keeps
    everything after it queued, in order, until :meth:`decide` is called.
    The rewriter never calls out, so verdicts may come from async code::

        step = rewriter.feed(chunk)
        send(step.output)
        for view in step.needs_verdict:
            send(rewriter.decide(view.call.id, await verdict_for(view)).output)
        ...
        send(rewriter.close())

    Memory is bounded by ``max_pending`` bytes of held and queued events
    (``ProtocolError(code="pending_too_large")`` past it) and by
    ``max_event_size`` for one SSE event. Any malformed event raises
    ``ProtocolError``; the caller then ends the stream (fail closed).
    """

    def __init__(
        self, *, max_pending: int = 4 * 1024 * 1024, max_event_size: int = 4 * 1024 * 1024
    ) -> None:
        self._parser = SSEParser(max_event_size=max_event_size)
        self._queue: deque[_Slot] = deque()
        self._awaiting: dict[str, _Slot] = {}
        self._seen_ids: set[str] = set()
        self._new: list[CallView] = []
        self._max_pending = max_pending
        self._pending = 0
        self._closed = False
        self._out: list[bytes] = []
        self._max_event = max_event_size
        # Upstream bytes not yet given to the parser nor sent: an unfinished event
        # (LF line ends only, at most max_event_size) and possibly a CR ending the chunk.
        self._tail = b""
        # The parser is between events (so whole events may skip it).
        self._synced = False
        # The stream has CRs that end lines alone; the parser then reads all of it.
        self._lone_cr = False

    # -- public surface

    def feed_through(self, chunk: bytes) -> bytes | None:
        """:meth:`feed` in short for the common chunk, or None (then nothing was consumed).

        The common chunk completes whole events that cannot concern a tool call
        while nothing is held: their bytes are returned, to send as they came.
        Never raises: a chunk with a fault goes the long way, which reports it.
        """
        if self._closed or not self._synced or self._queue:
            return None
        data = self._tail + chunk if self._tail else chunk
        if b"\r" in data:
            return None
        cut = data.rfind(b"\n\n") + 2
        if cut < 2 or cut > self._max_event or len(data) - cut > self._max_event:
            return None
        head = data[:cut] if cut < len(data) else data
        if not self._passes(head):
            return None
        if not head.isascii():
            try:
                head.decode("utf-8")
            except UnicodeDecodeError:
                return None
        self._tail = data[cut:]
        return head

    def feed(self, chunk: bytes) -> StreamStep:
        """Parse ``chunk``; return what may be sent now and the calls now complete."""
        through = self.feed_through(chunk)
        if through is not None:
            return StreamStep(through)
        if self._closed:
            raise ProtocolError("stream already closed", code="stream_closed")
        data = self._tail + chunk if self._tail else chunk
        self._tail = b""
        if self._lone_cr:
            self._parse(data)
            return self._step()
        if b"\r" in data:
            # A CR ending the chunk may be the first half of a CRLF: keep it back.
            lf = data[:-1] if data.endswith(b"\r") else data
            if lf.count(b"\r") != lf.count(b"\r\n"):
                # Lone CR line ends: no byte-level shortcut, the parser reads the rest.
                self._lone_cr = True
                self._parse(data)
                return self._step()
            if lf is not data:
                self._tail = b"\r"
            data = lf.replace(b"\r\n", b"\n")
        # LF line ends only from here, so an event ends exactly at each LF LF.
        if not self._synced:
            # Finish the event the parser is inside (or the stream's start) the slow way.
            first = data.find(b"\n\n") + 2
            if first < 2:
                self._parse(data)
                return self._step()
            self._parse(data[:first])
            data = data[first:]
            if not self._synced:
                self._parse(data)
                return self._step()
        cut = data.rfind(b"\n\n") + 2
        if cut > 1:
            head = data[:cut] if cut < len(data) else data
            if not self._queue and cut <= self._max_event and self._passes(head):
                if not head.isascii():
                    _check_utf8(head)
                self._out.append(head)
            else:
                self._parse(head)
            data = data[cut:]
        if len(data) > self._max_event:
            self._parse(data)  # the parser raises sse_event_too_large
        elif data:
            self._tail = data + self._tail
        return self._step()

    def decide(self, call_id: str, verdict: Verdict) -> StreamStep:
        """Record the verdict for a surfaced call; return the output it releases."""
        slot = self._awaiting.pop(call_id, None)
        if slot is None:
            raise KeyError(f"no tool call {call_id!r} is awaiting a verdict")
        slot.verdict = verdict
        return self._step()

    def close(self) -> bytes:
        """Upstream ended. Returns the last bytes; raises if the stream was cut or left undecided."""
        if self._tail:
            tail, self._tail = self._tail, b""
            self._parse(tail)
        self._parser.close()
        self._on_end()
        self._closed = True
        step = self._step()
        if step.needs_verdict or self._awaiting or self._queue:
            raise ProtocolError(
                "stream ended with tool calls undecided", status=502, code="undecided_calls"
            )
        return step.output

    @property
    def pending_bytes(self) -> int:
        """Bytes currently held back from the client."""
        return self._pending

    # -- for subclasses

    def _on_event(self, event: SSEEvent) -> None:
        raise NotImplementedError

    def _passes(self, events: bytes) -> bool:
        """Whether whole events (raw bytes, LF line ends) may go out as they came.

        Called only while nothing is held. True means none of them can concern a
        tool call, so parsing them would emit the same events; a subclass that
        answers True must update any state those events would have changed.
        """
        return False

    def _on_end(self) -> None:
        """Check the stream ended where it may end; raise ProtocolError otherwise."""

    @property
    def _holding(self) -> bool:
        return bool(self._queue)

    def _emit(self, data: bytes) -> None:
        if self._queue:
            self._enqueue(_Slot(lambda: data, len(data)))
        else:
            self._out.append(data)

    def _emit_later(self, render: Callable[[], bytes], size: int) -> None:
        self._enqueue(_Slot(render, size))

    def _hold(self, render: Callable[[Verdict], bytes], size: int) -> _Slot:
        slot = _Slot(lambda: b"", size)
        slot.render = lambda: render(slot.verdict or Verdict.refused(""))
        slot.call = _PLACEHOLDER
        self._enqueue(slot)
        return slot

    def _grow(self, slot: _Slot, size: int) -> None:
        slot.size += size
        self._account(size)

    def _complete(self, slot: _Slot, view: CallView) -> None:
        call_id = view.call.id
        if not call_id:
            raise ProtocolError("tool call without an id", status=502, code="invalid_tool_call")
        if call_id in self._seen_ids:
            raise ProtocolError(
                f"tool call id {call_id!r} repeated", status=502, code="invalid_tool_call"
            )
        self._seen_ids.add(call_id)
        slot.call = view
        self._awaiting[call_id] = slot
        self._new.append(view)

    # -- internals

    def _parse(self, data: bytes) -> None:
        parser = self._parser
        try:
            for event in parser.feed(data):
                if event.data is not None:
                    self._on_event(event)
        finally:
            self._synced = parser.at_boundary

    def _enqueue(self, slot: _Slot) -> None:
        self._queue.append(slot)
        self._account(slot.size)

    def _account(self, size: int) -> None:
        self._pending += size
        if self._pending > self._max_pending:
            raise ProtocolError(
                f"more than {self._max_pending} bytes held while tool calls are pending",
                status=502,
                code="pending_too_large",
            )

    def _step(self) -> StreamStep:
        out = self._out
        queue = self._queue
        while queue and queue[0].ready:
            slot = queue.popleft()
            self._pending -= slot.size
            out.append(slot.render())
        if not out and not self._new:
            return _NOTHING
        self._out = []
        if not self._new:
            return StreamStep(out[0] if len(out) == 1 else b"".join(out))
        new, self._new = tuple(self._new), []
        return StreamStep(b"".join(out), new)


_NOTHING = StreamStep(b"")


def _check_utf8(data: bytes) -> None:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError("event stream is not valid UTF-8", code="invalid_utf8") from exc


_PLACEHOLDER = CallView(ToolCall(id="", name="", arguments={}), raw_arguments="")
