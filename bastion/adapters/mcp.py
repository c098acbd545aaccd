"""MCP streamable HTTP codec: JSON-RPC messages, revisions, routing headers, tools.

Pure translation, no policy and no I/O. The gateway uses it as follows::

    post = MCPCodec.parse_post(body, headers)        # raises JSONRPCProtocolError
    post.revision, post.stateless, post.session_id, post.messages
    for msg in post.messages:
        call = MCPCodec.tool_call(msg)               # ToolCall for tools/call, else None
        if call and forbidden:
            answer = MCPCodec.refusal_result(msg.id, text)   # or refusal_error(...)
    ...
    replies = MCPCodec.parse_reply(body, content_type)      # application/json or text/event-stream
    specs = MCPCodec.list_tools(result)                     # tools/list result -> ToolSpecs
    result = MCPCodec.filter_tools(result, keep_names)      # nextCursor kept
    tool_result = MCPCodec.call_result(result, call)        # tools/call result -> ToolResult
    result = MCPCodec.rewrite_call_result(result, "[redacted]")

For SSE replies that must stay streaming, :class:`MCPEventStream` yields each
event with its parsed message; re-encode a changed one with
:func:`MCPEventStream.encode`.

Revisions: the ``MCP-Protocol-Version`` header names the revision; without
it an ``initialize`` request's ``protocolVersion`` is used, else 2025-03-26
(the spec's fallback). The 2026-07-28 revision is stateless: one message per
POST (batches refused), no ``Mcp-Session-Id``, no client responses, and the
``Mcp-Method`` header (and ``Mcp-Name`` for ``tools/call``, ``prompts/get``,
``resources/read``) must be present and equal to the body. In every revision a
routing header that is present must agree with the body, and a routing header
given twice is refused: a proxy that reads one copy and a server that reads
another is a bypass. Batches are accepted only in 2025-03-26.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

from bastion.adapters.sse import SSEEvent, SSEParser, encode_event
from bastion.adapters.wire import (
    JSONRPC_HEADER_MISMATCH,
    JSONRPC_INVALID_REQUEST,
    JSONRPC_PARSE_ERROR,
    dumps_compact,
    jsonrpc_code_for,
    jsonrpc_error,
    loads_strict,
)
from bastion.errors import ProtocolError
from bastion.events import ToolCall, ToolResult, ToolSpec

__all__ = [
    "BATCH_REVISIONS",
    "HANDSHAKE_REVISIONS",
    "KNOWN_REVISIONS",
    "POLICY_DENIED",
    "STATELESS_REVISION",
    "JSONRPCMessage",
    "JSONRPCProtocolError",
    "MCPCodec",
    "MCPEventStream",
    "MCPPost",
]

HANDSHAKE_REVISIONS = ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25")
STATELESS_REVISION = "2026-07-28"
KNOWN_REVISIONS = (*HANDSHAKE_REVISIONS, STATELESS_REVISION)
BATCH_REVISIONS = frozenset({"2025-03-26"})
DEFAULT_REVISION = "2025-03-26"

POLICY_DENIED = -32001
"""JSON-RPC error code (implementation-defined range) for a call refused by policy."""

PROTOCOL_VERSION_META_KEY = "io.modelcontextprotocol/protocolVersion"
NAME_BEARING_METHODS = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}

_VERSION_HEADER = "mcp-protocol-version"
_METHOD_HEADER = "mcp-method"
_NAME_HEADER = "mcp-name"
_SESSION_HEADER = "mcp-session-id"
_ROUTING_HEADERS = frozenset({_VERSION_HEADER, _METHOD_HEADER, _NAME_HEADER, _SESSION_HEADER})
_B64_SENTINEL = re.compile(r"^=\?base64\?(?P<payload>.*)\?=$")


class JSONRPCProtocolError(ProtocolError):
    """A ``ProtocolError`` that knows its JSON-RPC code and the request id to answer.

    ``body()`` is the JSON-RPC error response to send (HTTP ``status``).
    """

    def __init__(
        self,
        message: str,
        *,
        code: str,
        jsonrpc_code: int,
        request_id: str | int | None = None,
        status: int = 400,
    ) -> None:
        super().__init__(message, status=status, code=code)
        self.jsonrpc_code = jsonrpc_code
        self.request_id = request_id

    def body(self) -> dict[str, Any]:
        return jsonrpc_error(
            self.request_id, self.jsonrpc_code, self.message, {"reason": self.code}
        )


def _invalid(
    message: str, request_id: str | int | None = None, *, code: str = "invalid_request"
) -> JSONRPCProtocolError:
    return JSONRPCProtocolError(
        message, code=code, jsonrpc_code=JSONRPC_INVALID_REQUEST, request_id=request_id
    )


def _mismatch(message: str, request_id: str | int | None = None) -> JSONRPCProtocolError:
    return JSONRPCProtocolError(
        message, code="header_mismatch", jsonrpc_code=JSONRPC_HEADER_MISMATCH, request_id=request_id
    )


@dataclass(frozen=True, slots=True)
class JSONRPCMessage:
    """One validated JSON-RPC 2.0 message; ``raw`` is the object as received."""

    kind: Literal["request", "notification", "response", "error"]
    raw: dict[str, Any]

    @property
    def id(self) -> str | int | None:
        value = self.raw.get("id")
        return value if isinstance(value, str | int) and not isinstance(value, bool) else None

    @property
    def method(self) -> str | None:
        value = self.raw.get("method")
        return value if isinstance(value, str) else None

    @property
    def params(self) -> dict[str, Any]:
        value = self.raw.get("params")
        return value if isinstance(value, dict) else {}

    @property
    def result(self) -> dict[str, Any] | None:
        value = self.raw.get("result")
        return value if isinstance(value, dict) else None

    @property
    def error(self) -> dict[str, Any] | None:
        value = self.raw.get("error")
        return value if isinstance(value, dict) else None

    def with_result(self, result: dict[str, Any]) -> JSONRPCMessage:
        """A copy of this response carrying ``result`` instead."""
        return JSONRPCMessage(
            "response", {"jsonrpc": "2.0", "id": self.raw.get("id"), "result": result}
        )


@dataclass(frozen=True, slots=True)
class MCPPost:
    """A validated POST body with what the headers said about it."""

    messages: tuple[JSONRPCMessage, ...]
    batch: bool
    revision: str
    session_id: str | None

    @property
    def stateless(self) -> bool:
        return self.revision == STATELESS_REVISION

    @property
    def requests(self) -> tuple[JSONRPCMessage, ...]:
        return tuple(m for m in self.messages if m.kind == "request")


def _valid_id(value: Any) -> bool:
    return isinstance(value, str | int) and not isinstance(value, bool)


def validate_message(value: Any) -> JSONRPCMessage:
    """Check one decoded value is a JSON-RPC 2.0 message (raises ``JSONRPCProtocolError`` -32600)."""
    if not isinstance(value, dict):
        raise _invalid("a JSON-RPC message must be an object")
    request_id = value.get("id") if _valid_id(value.get("id")) else None
    if value.get("jsonrpc") != "2.0":
        raise _invalid("'jsonrpc' must be \"2.0\"", request_id)
    if "method" in value:
        if not isinstance(value["method"], str) or not value["method"]:
            raise _invalid("'method' must be a non-empty string", request_id)
        if "params" in value and not isinstance(value["params"], dict):
            raise _invalid("'params' must be an object", request_id)
        if "result" in value or "error" in value:
            raise _invalid("a request cannot carry 'result' or 'error'", request_id)
        if "id" not in value:
            return JSONRPCMessage("notification", value)
        if not _valid_id(value["id"]):
            raise _invalid("'id' must be a string or an integer")
        return JSONRPCMessage("request", value)
    has_result, has_error = "result" in value, "error" in value
    if has_result == has_error:
        raise _invalid("a response carries exactly one of 'result' and 'error'", request_id)
    if has_result:
        if not _valid_id(value.get("id")) or not isinstance(value["result"], dict):
            raise _invalid("a result response needs an id and an object 'result'", request_id)
        return JSONRPCMessage("response", value)
    error = value["error"]
    if not (
        isinstance(error, dict)
        and isinstance(error.get("code"), int)
        and not isinstance(error.get("code"), bool)
        and isinstance(error.get("message"), str)
    ):
        raise _invalid("'error' needs an integer code and a string message", request_id)
    if value.get("id") is not None and not _valid_id(value.get("id")):
        raise _invalid("'id' must be a string, an integer or null")
    return JSONRPCMessage("error", value)


def _parse_json(body: bytes) -> Any:
    try:
        return loads_strict(body)
    except ProtocolError as exc:
        raise JSONRPCProtocolError(
            exc.message, code=exc.code, jsonrpc_code=JSONRPC_PARSE_ERROR
        ) from exc


def _header_pairs(headers: Mapping[str, str] | Iterable[tuple[str, str]]) -> dict[str, str]:
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    folded: dict[str, str] = {}
    for name, value in pairs:
        key = name.lower()
        if key in _ROUTING_HEADERS and key in folded:
            raise _mismatch(f"{key} header appears more than once")
        folded[key] = value
    return folded


def decode_header_value(value: str) -> str | None:
    """Undo the ``=?base64?...?=`` header encoding MCP uses for non-ASCII names (None if corrupt)."""
    match = _B64_SENTINEL.fullmatch(value)
    if match is None:
        return value
    payload = match.group("payload")
    try:
        decoded = base64.b64decode(payload, validate=True)
        if base64.b64encode(decoded).decode("ascii") != payload:
            return None
        return decoded.decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None


class MCPCodec:
    """Codec for MCP streamable HTTP (all revisions)."""

    protocol = "mcp"

    @staticmethod
    def parse_post(body: bytes, headers: Mapping[str, str] | Iterable[tuple[str, str]]) -> MCPPost:
        """Parse and validate a POST body against its headers.

        Raises :class:`JSONRPCProtocolError`: ``-32700`` for malformed JSON,
        ``-32600`` for a bad message or a batch the revision forbids,
        ``-32020`` (code ``header_mismatch``) when routing headers disagree with the body.
        """
        folded = _header_pairs(headers)
        decoded = _parse_json(body)
        batch = isinstance(decoded, list)
        items = decoded if batch else [decoded]
        if batch and not items:
            raise _invalid("an empty batch is not a valid request")
        messages = tuple(validate_message(item) for item in items)
        first = messages[0]
        revision = folded.get(_VERSION_HEADER)
        if revision is None:
            if first.method == "initialize" and isinstance(
                first.params.get("protocolVersion"), str
            ):
                revision = first.params["protocolVersion"]
                if revision not in KNOWN_REVISIONS:
                    # Version negotiation: the server answers with one it supports.
                    revision = HANDSHAKE_REVISIONS[-1]
            else:
                revision = DEFAULT_REVISION
        elif revision not in KNOWN_REVISIONS:
            raise JSONRPCProtocolError(
                f"unsupported MCP protocol version {revision!r}",
                code="unsupported_protocol_version",
                jsonrpc_code=JSONRPC_INVALID_REQUEST,
                request_id=first.id,
            )
        for message in messages:
            meta = message.params.get("_meta")
            if (
                isinstance(meta, dict)
                and PROTOCOL_VERSION_META_KEY in meta
                and meta[PROTOCOL_VERSION_META_KEY] != revision
            ):
                raise _mismatch(
                    "protocol version in _meta disagrees with the MCP-Protocol-Version header",
                    message.id,
                )
        session_id = folded.get(_SESSION_HEADER)
        if revision == STATELESS_REVISION:
            if batch:
                raise _invalid(
                    "batches are not allowed in the stateless revision", code="batch_not_allowed"
                )
            if session_id is not None:
                raise _invalid("Mcp-Session-Id is not used in the stateless revision", first.id)
            if first.kind in ("response", "error"):
                raise _invalid("the stateless revision has no client responses", first.id)
        elif batch and revision not in BATCH_REVISIONS:
            raise _invalid(
                f"batches are not allowed in revision {revision}", code="batch_not_allowed"
            )
        MCPCodec._check_routing(folded, messages, stateless=revision == STATELESS_REVISION)
        return MCPPost(messages, batch, revision, session_id)

    @staticmethod
    def _check_routing(
        folded: dict[str, str], messages: tuple[JSONRPCMessage, ...], *, stateless: bool
    ) -> None:
        method_header = folded.get(_METHOD_HEADER)
        name_header = folded.get(_NAME_HEADER)
        if len(messages) > 1:
            if method_header is not None or name_header is not None:
                raise _mismatch("Mcp-Method / Mcp-Name cannot describe a batch")
            return
        message = messages[0]
        if message.kind not in ("request", "notification"):
            if method_header is not None or name_header is not None:
                raise _mismatch("Mcp-Method / Mcp-Name sent with a response", message.id)
            return
        if method_header is None:
            if stateless and message.kind == "request":
                raise _mismatch("Mcp-Method header is required", message.id)
        elif method_header != message.method:
            raise _mismatch("Mcp-Method header does not match the body's method", message.id)
        name_key = NAME_BEARING_METHODS.get(message.method or "")
        body_name = message.params.get(name_key) if name_key else None
        if name_header is None:
            if stateless and body_name is not None:
                raise _mismatch("Mcp-Name header is required", message.id)
            return
        if body_name is None or decode_header_value(name_header) != body_name:
            raise _mismatch("Mcp-Name header does not match the body", message.id)

    # ------------------------------------------------------------ tools/call and tools/list requests

    @staticmethod
    def tool_call(message: JSONRPCMessage) -> ToolCall | None:
        """The call a ``tools/call`` request asks for (None for other messages).

        The call id is the JSON-RPC id as a string. Raises ``JSONRPCProtocolError``
        (-32602 is left to the server; here -32600) for a name that is not a
        string or arguments that are not an object.
        """
        if message.kind != "request" or message.method != "tools/call":
            return None
        name = message.params.get("name")
        arguments = message.params.get("arguments", {})
        if not isinstance(name, str) or not name:
            raise _invalid("tools/call needs a string 'name'", message.id)
        if arguments is None:
            arguments = {}
        if not isinstance(arguments, dict):
            raise _invalid("tools/call 'arguments' must be an object", message.id)
        return ToolCall(str(message.id), name, arguments)

    @staticmethod
    def list_cursor(message: JSONRPCMessage) -> str | None:
        """The pagination cursor of a ``tools/list`` request, if any."""
        cursor = message.params.get("cursor")
        return cursor if isinstance(cursor, str) else None

    # ------------------------------------------------------------ replies

    @staticmethod
    def parse_reply(body: bytes, content_type: str | None) -> list[JSONRPCMessage]:
        """Every JSON-RPC message in a reply body (``application/json`` or ``text/event-stream``)."""
        media = (content_type or "").split(";")[0].strip().lower()
        if media == "text/event-stream":
            parser = SSEParser()
            messages = []
            for event in [*parser.feed(body), *parser.close()]:
                message = _event_message(event)
                if message is not None:
                    messages.extend(message)
            return messages
        if media != "application/json":
            raise ProtocolError(
                f"unexpected MCP reply content type {media!r}",
                status=502,
                code="invalid_content_type",
            )
        decoded = _parse_json(body)
        items = decoded if isinstance(decoded, list) else [decoded]
        return [validate_message(item) for item in items]

    @staticmethod
    def encode_reply(messages: list[JSONRPCMessage] | JSONRPCMessage) -> bytes:
        """A JSON reply body for one message or a batch."""
        if isinstance(messages, JSONRPCMessage):
            return dumps_compact(messages.raw)
        return dumps_compact([m.raw for m in messages])

    @staticmethod
    def list_tools(result: Mapping[str, Any]) -> list[ToolSpec]:
        """ToolSpecs of a ``tools/list`` result, with their annotations."""
        tools = result.get("tools")
        if not isinstance(tools, list):
            raise ProtocolError(
                "tools/list result without a 'tools' list",
                status=502,
                code="invalid_upstream_response",
            )
        specs = []
        for tool in tools:
            if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
                raise ProtocolError(
                    "tools/list entry without a name", status=502, code="invalid_upstream_response"
                )
            annotations = tool.get("annotations")
            schema = tool.get("inputSchema")
            description = tool.get("description")
            specs.append(
                ToolSpec.named(
                    tool["name"],
                    description=description if isinstance(description, str) else "",
                    input_schema=schema if isinstance(schema, dict) else {},
                    annotations=annotations if isinstance(annotations, dict) else {},
                )
            )
        return specs

    @staticmethod
    def filter_tools(result: Mapping[str, Any], keep: Collection[str]) -> dict[str, Any]:
        """A copy of a ``tools/list`` result with only the named tools (``nextCursor`` and ``_meta`` kept)."""
        names = set(keep)
        out = dict(result)
        out["tools"] = [
            t for t in result.get("tools") or [] if isinstance(t, dict) and t.get("name") in names
        ]
        return out

    @staticmethod
    def call_result(result: Mapping[str, Any], call: ToolCall) -> ToolResult:
        """The neutral form of a ``tools/call`` result (content blocks, ``structuredContent``, ``isError``).

        ``content`` is ``{"content": [...], "structuredContent": {...}}``
        (the second key only when present), so result rules see both.
        """
        blocks = result.get("content")
        if not isinstance(blocks, list):
            raise ProtocolError(
                "tools/call result without 'content'", status=502, code="invalid_upstream_response"
            )
        content: dict[str, Any] = {"content": blocks}
        if "structuredContent" in result:
            content["structuredContent"] = result["structuredContent"]
        return ToolResult(
            call.id, call.name, content, call.arguments, is_error=result.get("isError") is True
        )

    @staticmethod
    def result_texts(result: Mapping[str, Any]) -> list[str]:
        """The text of a ``tools/call`` result's text blocks (and embedded text resources)."""
        texts = []
        for block in result.get("content") or []:
            if not isinstance(block, dict):
                continue
            if block.get("type") == "text" and isinstance(block.get("text"), str):
                texts.append(block["text"])
            resource = block.get("resource")
            if (
                block.get("type") == "resource"
                and isinstance(resource, dict)
                and isinstance(resource.get("text"), str)
            ):
                texts.append(resource["text"])
        return texts

    @staticmethod
    def rewrite_call_result(
        result: Mapping[str, Any],
        content: str | list[dict[str, Any]],
        *,
        structured: dict[str, Any] | None = None,
        is_error: bool | None = None,
    ) -> dict[str, Any]:
        """A copy of a ``tools/call`` result with new content.

        ``structuredContent`` is replaced by ``structured``, or dropped when not
        given (a stale structured copy would leak what the content rewrite removed).
        """
        out = {k: v for k, v in result.items() if k != "structuredContent"}
        out["content"] = (
            [{"type": "text", "text": content}] if isinstance(content, str) else content
        )
        if structured is not None:
            out["structuredContent"] = structured
        if is_error is not None:
            out["isError"] = is_error
        return out

    @staticmethod
    def refusal_result(
        request_id: str | int | None, text: str, *, revision: str | None = None
    ) -> dict[str, Any]:
        """A ``tools/call`` answer refusing the call: a result with ``isError: true`` and the reason.

        ``revision`` is the request's MCP revision: the stateless 2026-07-28
        revision requires ``resultType`` on every result (earlier ones have no
        such field).
        """
        result: dict[str, Any] = {"content": [{"type": "text", "text": text}], "isError": True}
        if revision == STATELESS_REVISION:
            result["resultType"] = "complete"
        return {"jsonrpc": "2.0", "id": request_id, "result": result}

    @staticmethod
    def refusal_error(
        request_id: str | int | None, text: str, *, data: Any = None
    ) -> dict[str, Any]:
        """A JSON-RPC error refusing a request (code :data:`POLICY_DENIED`)."""
        return jsonrpc_error(request_id, POLICY_DENIED, text, data)

    @staticmethod
    def error_for(exc: ProtocolError, request_id: str | int | None = None) -> dict[str, Any]:
        """The JSON-RPC error response for any ``ProtocolError``."""
        if isinstance(exc, JSONRPCProtocolError):
            return exc.body() if request_id is None else {**exc.body(), "id": request_id}
        return jsonrpc_error(request_id, jsonrpc_code_for(exc), exc.message, {"reason": exc.code})


def _event_message(event: SSEEvent) -> list[JSONRPCMessage] | None:
    if event.data is None or event.data == "" or event.type != "message":
        return None
    decoded = _parse_json(event.data.encode("utf-8"))
    items = decoded if isinstance(decoded, list) else [decoded]
    return [validate_message(item) for item in items]


class MCPEventStream:
    """Incremental reader of an MCP ``text/event-stream`` reply.

    ``feed`` returns ``(event, messages)`` pairs: ``messages`` is None for
    events that carry no JSON-RPC message (priming events, comments with
    ``emit_comments``), which the caller forwards as they are.
    """

    def __init__(self, *, max_event_size: int = 4 * 1024 * 1024) -> None:
        self._parser = SSEParser(max_event_size=max_event_size, emit_comments=True)

    def feed(self, chunk: bytes) -> list[tuple[SSEEvent, list[JSONRPCMessage] | None]]:
        return [
            (event, None if event.is_comment else _event_message(event))
            for event in self._parser.feed(chunk)
        ]

    def close(self) -> None:
        self._parser.close()

    @staticmethod
    def encode(
        event: SSEEvent, messages: list[JSONRPCMessage] | JSONRPCMessage | None = None
    ) -> bytes:
        """Re-encode ``event``, with ``messages`` as its new data when given (id and type kept)."""
        if messages is None:
            return encode_event(event)
        data = MCPCodec.encode_reply(messages).decode("utf-8")
        return encode_event(replace(event, data=data))
