"""Anthropic messages codec (``POST /v1/messages``).

Pure translation between Anthropic wire JSON and Bastion's neutral events; no
policy and no I/O. Same shape as the OpenAI codecs::

    req = AnthropicCodec.parse_request(body)
    req.model, req.stream, req.tools, req.user_texts, req.tool_results
    req.replace_tool_result(view.location, "[redacted]")   # a tool_result block's content
    req.keep_tools({"get_weather"})
    body = req.to_bytes()

    resp = AnthropicCodec.parse_response(body)             # tool_use blocks -> CallView
    resp.refuse({tool_use_id: text})                       # block replaced by a text block
    body = resp.to_bytes()

    rewriter = AnthropicCodec.stream_rewriter()            # StreamRewriter: feed / decide / close

A refused ``tool_use`` block is replaced, at the same content index, by a text
block carrying the refusal, so every later block keeps its index; when no
``tool_use`` block remains, ``stop_reason`` ``tool_use`` becomes ``end_turn``.
In a stream the ``content_block_start``/``input_json_delta``/``content_block_stop``
events of a call are held until its verdict; ``message_delta`` is rendered
after every call before it is decided.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from bastion.adapters.sse import SSEEvent, encode_event
from bastion.adapters.wire import (
    CallView,
    LLMRequest,
    LLMResponse,
    ResultView,
    StreamRewriter,
    ToolSpecCache,
    Verdict,
    _Slot,
    dumps_compact,
    loads_strict,
    parse_arguments,
)
from bastion.errors import ProtocolError
from bastion.events import ToolCall, ToolSpec

__all__ = ["AnthropicCodec", "AnthropicStreamRewriter", "MessagesRequest", "MessagesResponse"]


def _upstream(message: str) -> ProtocolError:
    return ProtocolError(message, status=502, code="invalid_upstream_response")


def _texts(content: Any) -> list[str]:
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        return [
            block["text"]
            for block in content
            if isinstance(block, dict)
            and block.get("type") == "text"
            and isinstance(block.get("text"), str)
        ]
    return []


class MessagesRequest(LLMRequest):
    """A parsed messages request; mutate it, then :meth:`to_bytes`."""

    @property
    def max_tokens(self) -> int | None:
        value = self.body.get("max_tokens")
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    def keep_tools(self, names: Collection[str]) -> None:
        """Keep only the named tools; a ``tool_choice`` naming a removed tool becomes ``none``."""
        keep = set(names)
        self._keep_listed("tools", keep, ("tool_choice",))
        choice = self.body.get("tool_choice")
        if isinstance(choice, dict):
            if choice.get("type") == "tool" and choice.get("name") not in keep:
                self.body["tool_choice"] = {"type": "none"}
            elif choice.get("type") == "any" and "tools" not in self.body:
                self.body.pop("tool_choice", None)
        self.tools = [t for t in self.tools if t.name in keep]


class MessagesResponse(LLMResponse):
    """A parsed (non-streaming) ``message`` with its ``tool_use`` blocks.

    A refused ``tool_use`` block (by id) becomes a text block carrying its
    refusal; ``stop_reason`` becomes ``end_turn`` when no call is left.
    """

    def _refuse_in_body(self, refusals: Mapping[str, str]) -> None:
        content = self.body.get("content")
        if not isinstance(content, list):
            return
        remaining_calls = 0
        for i, block in enumerate(content):
            if isinstance(block, dict) and block.get("type") == "tool_use":
                call_id = block.get("id")
                if isinstance(call_id, str) and call_id in refusals:
                    content[i] = {"type": "text", "text": refusals[call_id]}
                else:
                    remaining_calls += 1
        if remaining_calls == 0 and self.body.get("stop_reason") == "tool_use":
            self.body["stop_reason"] = "end_turn"


def _tool_spec(tool: Any) -> ToolSpec | None:
    if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
        return None
    schema = tool.get("input_schema")
    description = tool.get("description")
    return ToolSpec.named(
        tool["name"],
        description=description if isinstance(description, str) else "",
        input_schema=schema if isinstance(schema, dict) else {},
    )


_SPECS = ToolSpecCache(_tool_spec)


_USAGE_KINDS = (
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
)


class AnthropicCodec:
    """Codec for ``POST /v1/messages``."""

    protocol = "anthropic"
    path = "/v1/messages"

    @staticmethod
    def usage_of(payload: Mapping[str, Any]) -> dict[str, int] | None:
        """Tokens a message or a stream event reports, per kind (input, output, cache).

        ``message_start`` carries the message's usage, ``message_delta`` the
        running totals: merge events by the largest count per kind.
        """
        message = payload.get("message")
        usage = message.get("usage") if isinstance(message, dict) else payload.get("usage")
        if not isinstance(usage, dict):
            return None
        found = {
            kind: value
            for kind in _USAGE_KINDS
            if isinstance(value := usage.get(kind), int)
            and not isinstance(value, bool)
            and value >= 0
        }
        return found or None

    @staticmethod
    def parse_request(body: bytes | Mapping[str, Any]) -> MessagesRequest:
        """Parse a request body (raises ``ProtocolError`` on malformed JSON or shape)."""
        data = loads_strict(body) if isinstance(body, bytes | bytearray | str) else dict(body)
        if not isinstance(data, dict):
            raise ProtocolError("messages request must be a JSON object", code="invalid_request")
        messages = data.get("messages")
        if not isinstance(messages, list):
            raise ProtocolError("'messages' must be a list", code="invalid_request")
        listed = data.get("tools")
        tools = (
            _SPECS.specs(listed)
            if isinstance(listed, list)
            else [spec for spec in map(_tool_spec, listed or []) if spec]
        )
        user_texts = _texts(data.get("system"))
        produced: dict[str, tuple[str, dict[str, Any]]] = {}
        results: list[ResultView] = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
                raise ProtocolError(
                    f"messages[{i}] must be a user or assistant message", code="invalid_request"
                )
            content = message.get("content")
            if message["role"] == "assistant":
                for block in content if isinstance(content, list) else []:
                    if isinstance(block, dict) and block.get("type") == "tool_use":
                        arguments = block.get("input")
                        produced[str(block.get("id"))] = (
                            str(block.get("name") or ""),
                            arguments if isinstance(arguments, dict) else {},
                        )
                continue
            user_texts.extend(_texts(content))
            for j, block in enumerate(content if isinstance(content, list) else []):
                if not isinstance(block, dict) or block.get("type") != "tool_result":
                    continue
                results.append(
                    ResultView.traced_to(
                        produced,
                        block.get("tool_use_id"),
                        block.get("content"),
                        ("messages", i, "content", j, "content"),
                        is_error=block.get("is_error") is True,
                    )
                )
        return MessagesRequest(data, tools, results, tuple(user_texts))

    @staticmethod
    def parse_response(body: bytes | Mapping[str, Any]) -> MessagesResponse:
        """Parse a ``message`` body; every ``tool_use`` block becomes a :class:`CallView`."""
        data = loads_strict(body) if isinstance(body, bytes | bytearray | str) else dict(body)
        if not isinstance(data, dict) or not isinstance(data.get("content"), list):
            raise _upstream("message without a 'content' list")
        views = []
        for i, block in enumerate(data["content"]):
            if isinstance(block, dict) and block.get("type") == "tool_use":
                views.append(_block_view(block, None, i))
        return MessagesResponse(data, views)

    @staticmethod
    def stream_rewriter(
        *, max_pending: int = 4 * 1024 * 1024, max_event_size: int = 4 * 1024 * 1024
    ) -> AnthropicStreamRewriter:
        return AnthropicStreamRewriter(max_pending=max_pending, max_event_size=max_event_size)


def _block_view(block: dict[str, Any], partial_json: str | None, index: int) -> CallView:
    call_id = str(block.get("id") or "")
    name = str(block.get("name") or "")
    if partial_json:
        arguments, error = parse_arguments(partial_json)
        return CallView(ToolCall(call_id, name, arguments), partial_json, error, (index,))
    value = block.get("input")
    if not isinstance(value, dict):
        return CallView(
            ToolCall(call_id, name, {}),
            dumps_compact(value).decode(),
            "input is not an object",
            (index,),
        )
    return CallView(ToolCall(call_id, name, value), dumps_compact(value).decode(), None, (index,))


class _HeldBlock:
    __slots__ = ("block", "events", "index", "partial", "slot")

    def __init__(self, index: int, block: dict[str, Any], slot: _Slot) -> None:
        self.index = index
        self.block = block
        self.slot = slot
        self.partial: list[str] = []
        self.events: list[bytes] = []


class AnthropicStreamRewriter(StreamRewriter):
    """Rewrites a messages event stream; see the module docstring."""

    def __init__(
        self, *, max_pending: int = 4 * 1024 * 1024, max_event_size: int = 4 * 1024 * 1024
    ) -> None:
        super().__init__(max_pending=max_pending, max_event_size=max_event_size)
        self._open: dict[int, _HeldBlock] = {}
        self._allowed = 0

    def _passes(self, events: bytes) -> bool:
        # The same test as the per-event fast path below, on a run of whole events.
        return b"tool_use" not in events and not (b"\\" in events and b"\\u" in events)

    def _on_event(self, event: SSEEvent) -> None:
        raw = (event.data or "").encode("utf-8")
        if not self._open and b"tool_use" not in raw and b"\\u" not in raw:
            self._emit(encode_event(event))
            return
        payload = loads_strict(raw)
        if not isinstance(payload, dict) or not isinstance(payload.get("type"), str):
            raise _upstream("stream event is not a typed JSON object")
        kind = payload["type"]
        index = payload.get("index")
        if kind == "content_block_start":
            block = payload.get("content_block")
            if not isinstance(index, int) or not isinstance(block, dict):
                raise _upstream("content_block_start without index or block")
            if block.get("type") == "tool_use":
                if index in self._open:
                    raise _upstream("content block index reused")
                held: _HeldBlock | None = None

                def render(verdict: Verdict) -> bytes:
                    assert held is not None
                    return self._render_block(held, verdict)

                held = _HeldBlock(index, block, self._hold(render, 0))
                self._open[index] = held
        if isinstance(index, int) and index in self._open:
            held_block = self._open[index]
            held_block.events.append(encode_event(event))
            self._grow(held_block.slot, len(raw))
            if kind == "content_block_delta":
                delta = payload.get("delta")
                if not isinstance(delta, dict):
                    raise _upstream("content_block_delta without a delta")
                if delta.get("type") == "input_json_delta":
                    if not isinstance(delta.get("partial_json"), str):
                        raise _upstream("input_json_delta without partial_json")
                    held_block.partial.append(delta["partial_json"])
            elif kind == "content_block_stop":
                del self._open[index]
                view = _block_view(held_block.block, "".join(held_block.partial), index)
                self._complete(held_block.slot, view)
            return
        if kind == "message_delta":
            if self._open:
                raise _upstream("message_delta while tool_use blocks are open")
            self._emit_later(lambda: self._render_message_delta(event, payload), len(raw))
            return
        self._emit(encode_event(event))

    def _render_block(self, held: _HeldBlock, verdict: Verdict) -> bytes:
        if verdict.allow:
            self._allowed += 1
            return b"".join(held.events)
        events: list[dict[str, Any]] = [
            {
                "type": "content_block_start",
                "index": held.index,
                "content_block": {"type": "text", "text": ""},
            },
            {
                "type": "content_block_delta",
                "index": held.index,
                "delta": {"type": "text_delta", "text": verdict.text},
            },
            {"type": "content_block_stop", "index": held.index},
        ]
        return b"".join(
            encode_event(SSEEvent(data=dumps_compact(e).decode("utf-8"), event=e["type"]))
            for e in events
        )

    def _render_message_delta(self, event: SSEEvent, payload: dict[str, Any]) -> bytes:
        delta = payload.get("delta")
        if (
            isinstance(delta, dict)
            and delta.get("stop_reason") == "tool_use"
            and self._allowed == 0
        ):
            delta["stop_reason"] = "end_turn"
            return encode_event(
                SSEEvent(
                    data=dumps_compact(payload).decode("utf-8"), event=event.event, id=event.id
                )
            )
        return encode_event(event)

    def _on_end(self) -> None:
        if self._open:
            raise ProtocolError(
                "stream ended inside a tool_use block", status=502, code="truncated_stream"
            )
