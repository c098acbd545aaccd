"""OpenAI codecs: chat completions (``/v1/chat/completions``) and Responses (``/v1/responses``).

Pure translation between OpenAI wire JSON and Bastion's neutral events; no
policy and no I/O. The pipeline uses each codec the same way:

Request (agent -> model)::

    req = OpenAIChatCodec.parse_request(body)        # or OpenAIResponsesCodec
    req.model, req.stream, req.tools (ToolSpec), req.user_texts
    for view in req.tool_results:                    # ResultView: name, content, location
        ...  req.replace_tool_result(view.location, "[redacted]")
    req.keep_tools({"get_weather"})                  # visibility
    body = req.to_bytes()

Response (model -> agent), JSON::

    resp = OpenAIChatCodec.parse_response(body)
    for view in resp.calls:                          # CallView; view.error set => deny
        ...
    resp.refuse({call_id: refusal_text(name, reason)})
    body = resp.to_bytes()

Response, SSE: ``OpenAIChatCodec.stream_rewriter()`` returns a
:class:`~bastion.adapters.wire.StreamRewriter` (feed / decide / close).
Allowed calls are re-emitted as one chunk each, re-indexed so the client's
accumulator sees consecutive indexes; a refused call becomes a content delta
carrying the refusal text, and ``finish_reason`` ``tool_calls`` turns into
``stop`` for a choice whose calls were all refused. In Responses a refused
``function_call`` item is replaced, at the same ``output_index``, by an
assistant ``message`` item with the refusal (and the final ``response.*``
payload is rewritten to match), with ``sequence_number`` kept consecutive.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from typing import Any

from bastion.adapters.sse import SSEEvent, encode_event
from bastion.adapters.wire import (
    CallView,
    LazyArguments,
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
from bastion.events import ToolCall, ToolSpec, split_tool_name

__all__ = [
    "ChatRequest",
    "ChatResponse",
    "ChatStreamRewriter",
    "OpenAIChatCodec",
    "OpenAIResponsesCodec",
    "ResponsesRequest",
    "ResponsesResponse",
    "ResponsesStreamRewriter",
]


def _object(body: bytes | Mapping[str, Any], what: str) -> dict[str, Any]:
    value = loads_strict(body) if isinstance(body, bytes | bytearray | str) else dict(body)
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} must be a JSON object", code="invalid_request")
    return value


def _upstream(message: str) -> ProtocolError:
    return ProtocolError(message, status=502, code="invalid_upstream_response")


def _text_of(
    content: Any, part_types: Collection[str] = ("text", "input_text", "output_text")
) -> list[str]:
    """The text in a message ``content``: a string, or a list of typed parts."""
    if isinstance(content, str):
        return [content]
    texts: list[str] = []
    if isinstance(content, list):
        for part in content:
            if (
                isinstance(part, dict)
                and part.get("type") in part_types
                and isinstance(part.get("text"), str)
            ):
                texts.append(part["text"])
    return texts


def _join(before: str | None, text: str) -> str:
    return f"{before}\n\n{text}" if before else text


# ====================================================================== chat completions


class ChatRequest(LLMRequest):
    """A parsed chat completions request; mutate it, then :meth:`to_bytes`."""

    def keep_tools(self, names: Collection[str]) -> None:
        """Keep only the named tools (and legacy ``functions``); drop ``tool_choice`` that names a removed one."""
        keep = set(names)
        self._keep_listed("tools", keep, ("tool_choice", "parallel_tool_calls"), _chat_tool_name)
        self._keep_listed("functions", keep, ("function_call",))
        choice = self.body.get("tool_choice")
        if isinstance(choice, dict):
            named = (
                choice.get("function", {}).get("name")
                if isinstance(choice.get("function"), dict)
                else None
            )
            named = named or choice.get("name")
            if named is not None and named not in keep:
                self.body["tool_choice"] = "none"
        self.tools = [t for t in self.tools if t.name in keep]


def _chat_tool_name(tool: Any) -> str | None:
    if not isinstance(tool, dict):
        return None
    if tool.get("type") == "function" and isinstance(tool.get("function"), dict):
        name = tool["function"].get("name")
        return name if isinstance(name, str) else None
    if tool.get("type") == "custom" and isinstance(tool.get("custom"), dict):
        name = tool["custom"].get("name")
        return name if isinstance(name, str) else None
    return None


def _chat_tool_spec(tool: Any) -> ToolSpec | None:
    name = _chat_tool_name(tool)
    if name is None:
        return None
    inner = tool.get("function") or tool.get("custom") or {}
    description = inner.get("description")
    parameters = inner.get("parameters")
    return ToolSpec(
        name,
        description if isinstance(description, str) else "",
        parameters if isinstance(parameters, dict) else {},
        server=split_tool_name(name)[0],
    )


_CHAT_SPECS = ToolSpecCache(_chat_tool_spec)
# One scan for what every call marker shares ("tool_calls", "function_call",
# "custom_tool_call"); sre finds this literal a little faster than bytes.find.
_CALL_MARK = re.compile(rb"_call").search
_USER_ROLES = ("system", "developer", "user")


class ChatResponse(LLMResponse):
    """A parsed (non-streaming) chat completion with its tool calls.

    A refused call leaves ``tool_calls`` and its text joins the message content;
    ``finish_reason`` becomes ``stop`` when no call is left.
    """

    def _refuse_in_body(self, refusals: Mapping[str, str]) -> None:
        for choice in self.body.get("choices") or []:
            message = choice.get("message") if isinstance(choice, dict) else None
            if not isinstance(message, dict):
                continue
            calls = message.get("tool_calls")
            if not isinstance(calls, list):
                continue
            remaining = []
            for call in calls:
                call_id = call.get("id") if isinstance(call, dict) else None
                if isinstance(call_id, str) and call_id in refusals:
                    message["content"] = _join(message.get("content"), refusals[call_id])
                else:
                    remaining.append(call)
            if len(remaining) == len(calls):
                continue
            if remaining:
                message["tool_calls"] = remaining
            else:
                message.pop("tool_calls", None)
                if choice.get("finish_reason") == "tool_calls":
                    choice["finish_reason"] = "stop"


def _call_view(call_id: str, name: str, raw: Any, position: tuple[int, ...]) -> CallView:
    if not isinstance(raw, str):
        return CallView(ToolCall(call_id, name, {}), "", "arguments are not a string", position)
    arguments, error = parse_arguments(raw)
    return CallView(ToolCall(call_id, name, arguments), raw, error, position)


def _total_tokens(usage: Any, parts: tuple[str, str]) -> dict[str, int] | None:
    if not isinstance(usage, dict):
        return None
    total = _count(usage.get("total_tokens"))
    if total is not None:
        return {"total": total}
    counts = [c for c in (_count(usage.get(p)) for p in parts) if c is not None]
    return {"total": sum(counts)} if counts else None


def _count(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


class OpenAIChatCodec:
    """Codec for ``POST /v1/chat/completions``."""

    protocol = "openai"
    path = "/v1/chat/completions"

    @staticmethod
    def usage_of(payload: Mapping[str, Any]) -> dict[str, int] | None:
        """Tokens a completion or a stream chunk reports (``usage``), as ``{"total": n}``."""
        return _total_tokens(payload.get("usage"), ("prompt_tokens", "completion_tokens"))

    @staticmethod
    def parse_request(body: bytes | Mapping[str, Any]) -> ChatRequest:
        """Parse a request body (raises ``ProtocolError`` on malformed JSON or shape)."""
        data = _object(body, "chat completions request")
        messages = data.get("messages")
        if not isinstance(messages, list):
            raise ProtocolError("'messages' must be a list", code="invalid_request")
        listed = data.get("tools")
        tools = (
            _CHAT_SPECS.specs(listed)
            if isinstance(listed, list)
            else [spec for spec in map(_chat_tool_spec, listed or []) if spec]
        )
        for function in data.get("functions") or []:
            if isinstance(function, dict) and isinstance(function.get("name"), str):
                tools.append(
                    ToolSpec.named(
                        function["name"], description=str(function.get("description") or "")
                    )
                )
        produced: dict[str, tuple[str, Mapping[str, Any]]] = {}
        last_function: tuple[str, Mapping[str, Any]] | None = None
        results: list[ResultView] = []
        user_texts: list[str] = []
        # Ordered by how often each role comes in an agent's conversation.
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise ProtocolError(f"messages[{i}] must be an object", code="invalid_request")
            role = message.get("role")
            if role == "assistant":
                for call in message.get("tool_calls") or ():
                    if isinstance(call, dict) and isinstance(fn := call.get("function"), dict):
                        raw = fn.get("arguments")
                        call_id = call.get("id")
                        produced[call_id if isinstance(call_id, str) else str(call_id)] = (
                            str(fn.get("name") or ""),
                            LazyArguments(raw if isinstance(raw, str) else ""),
                        )
                if "function_call" in message and isinstance(
                    legacy := message["function_call"], dict
                ):
                    raw = legacy.get("arguments")
                    last_function = (
                        str(legacy.get("name") or ""),
                        LazyArguments(raw if isinstance(raw, str) else ""),
                    )
            elif role in _USER_ROLES:
                content = message.get("content")
                if isinstance(content, str):
                    user_texts.append(content)
                else:
                    user_texts.extend(_text_of(content))
            elif role == "tool":
                results.append(
                    ResultView.traced_to(
                        produced,
                        message.get("tool_call_id"),
                        message.get("content"),
                        ("messages", i, "content"),
                    )
                )
            elif role == "function":
                name = str(message.get("name") or "")
                traced = last_function is not None and last_function[0] == name
                args = last_function[1] if last_function and traced else {}
                results.append(
                    ResultView(
                        None, name, message.get("content"), args, ("messages", i, "content"), traced
                    )
                )
        return ChatRequest(data, tools, results, tuple(user_texts))

    @staticmethod
    def parse_response(body: bytes | Mapping[str, Any]) -> ChatResponse:
        """Parse a ``chat.completion`` body; every tool call becomes a :class:`CallView`."""
        data = _object(body, "chat completion")
        views: list[CallView] = []
        choices = data.get("choices")
        if not isinstance(choices, list):
            raise _upstream("chat completion without 'choices'")
        for c, choice in enumerate(choices):
            message = choice.get("message") if isinstance(choice, dict) else None
            if not isinstance(message, dict):
                continue
            for k, call in enumerate(message.get("tool_calls") or []):
                if not isinstance(call, dict):
                    raise _upstream("tool call is not an object")
                fn = call.get("function") or call.get("custom") or {}
                raw = fn.get("arguments", fn.get("input", ""))
                views.append(
                    _call_view(str(call.get("id") or ""), str(fn.get("name") or ""), raw, (c, k))
                )
        return ChatResponse(data, views)

    @staticmethod
    def stream_rewriter(
        *, max_pending: int = 4 * 1024 * 1024, max_event_size: int = 4 * 1024 * 1024
    ) -> ChatStreamRewriter:
        return ChatStreamRewriter(max_pending=max_pending, max_event_size=max_event_size)


class _ChatCall:
    __slots__ = ("args", "choice", "envelope", "extra", "id", "index", "name", "slot", "type")

    def __init__(self, choice: int, index: int, envelope: dict[str, Any], slot: _Slot) -> None:
        self.choice = choice
        self.index = index
        self.envelope = envelope
        self.slot = slot
        self.id = ""
        self.name = ""
        self.type = "function"
        self.args: list[str] = []
        self.extra: dict[str, Any] = {}


class _ChoiceState:
    __slots__ = ("allowed", "had_content", "open", "seen_calls")

    def __init__(self) -> None:
        self.open: _ChatCall | None = None
        self.allowed = 0
        self.seen_calls = 0
        self.had_content = False


_ENVELOPE_KEYS = ("id", "object", "created", "model", "system_fingerprint", "service_tier")


class ChatStreamRewriter(StreamRewriter):
    """Rewrites a ``chat.completion.chunk`` stream; see the module docstring."""

    def __init__(
        self, *, max_pending: int = 4 * 1024 * 1024, max_event_size: int = 4 * 1024 * 1024
    ) -> None:
        super().__init__(max_pending=max_pending, max_event_size=max_event_size)
        self._choices: dict[int, _ChoiceState] = {}
        self._text_seen = False

    def _choice(self, index: int) -> _ChoiceState:
        state = self._choices.get(index)
        if state is None:
            state = self._choices[index] = _ChoiceState()
        return state

    def _open_calls(self) -> bool:
        return any(state.open is not None for state in self._choices.values())

    def _passes(self, events: bytes) -> bool:
        # The same test as the per-event fast path below, on a run of whole events.
        # One scan for "_call" (in both markers) and a memchr for the backslash of
        # any escape keep the common case to two quick searches.
        if _CALL_MARK(events) and (b"tool_calls" in events or b"function_call" in events):
            return False
        if b"\\" in events and b"\\u" in events:
            return False
        if not self._text_seen and b'"content"' in events:
            self._text_seen = True
        return True

    def _on_event(self, event: SSEEvent) -> None:
        data = event.data or ""
        if data.strip() == "[DONE]":
            self._close_all()
            self._emit(encode_event(event))
            return
        raw = data.encode("utf-8")
        # Fast path: a text chunk while no call is open passes as it came. A key
        # spelled with \u escapes would dodge the substring test, so any escape
        # sends the chunk through the full parse.
        if (
            not self._open_calls()
            and b"tool_calls" not in raw
            and b"function_call" not in raw
            and b"\\u" not in raw
        ):
            if b'"content"' in raw:
                self._text_seen = True
            self._emit(encode_event(event))
            return
        chunk = loads_strict(raw)
        if not isinstance(chunk, dict):
            raise _upstream("stream chunk is not a JSON object")
        choices = chunk.get("choices")
        if "error" in chunk or choices is None:
            self._emit(encode_event(event))
            return
        if not isinstance(choices, list) or not all(
            isinstance(ch, dict) and isinstance(ch.get("index", 0), int) for ch in choices
        ):
            raise _upstream("stream chunk with malformed 'choices'")
        envelope = {k: chunk[k] for k in _ENVELOPE_KEYS if k in chunk}
        before: list[dict[str, Any]] = []
        after: list[dict[str, Any]] = []
        work: list[tuple[_ChoiceState, int, list[Any]]] = []
        for choice in choices:
            c = int(choice.get("index", 0))
            state = self._choice(c)
            delta = choice.get("delta")
            delta = dict(delta) if isinstance(delta, dict) else {}
            if delta.get("function_call") is not None:
                raise _upstream("legacy function_call streaming is not supported")
            fragments = delta.pop("tool_calls", None)
            if fragments is not None and not isinstance(fragments, list):
                raise _upstream("'tool_calls' in a delta must be a list")
            if delta.get("content"):
                state.had_content = True
            rest = {k: v for k, v in choice.items() if k not in ("delta", "index")}
            if any(v is not None for v in delta.values()):
                before.append({"index": c, "delta": delta, "logprobs": None, "finish_reason": None})
            if any(v is not None for v in rest.values()):
                after.append({"index": c, "delta": {}, **rest})
            work.append((state, c, fragments or []))
        if not any(fragments for _, _, fragments in work):
            for state, c, _ in work:
                if state.open is not None and any(
                    a["index"] == c and a.get("finish_reason") for a in after
                ):
                    self._finish_call(state)
            if any(a.get("finish_reason") == "tool_calls" for a in after):
                self._emit_later(lambda: self._render_finish(chunk, event), len(raw))
            else:
                self._emit(encode_event(event))
            return
        extra = {k: v for k, v in chunk.items() if k != "choices"}
        if before:
            self._emit(_encode_like(event, {**extra, "choices": before}))
        for state, c, fragments in work:
            for fragment in fragments:
                self._fragment(state, c, fragment, envelope)
        for a in after:
            if a.get("finish_reason") is not None:
                state = self._choice(a["index"])
                if state.open is not None:
                    self._finish_call(state)
        trailing = {k: v for k, v in extra.items() if k not in _ENVELOPE_KEYS and v is not None}
        if after or (trailing and not before):
            final = {**extra, "choices": after}
            self._emit_later(lambda: self._render_finish(final, event), len(raw))

    def _fragment(
        self, state: _ChoiceState, c: int, fragment: Any, envelope: dict[str, Any]
    ) -> None:
        if not isinstance(fragment, dict) or not isinstance(fragment.get("index"), int):
            raise _upstream("tool call fragment without an index")
        index = fragment["index"]
        call = state.open
        if call is None or call.index != index:
            if call is not None:
                self._finish_call(state)
            if index < state.seen_calls:
                raise _upstream("tool call fragment for a call that already ended")
            state.seen_calls = index + 1
            new_call: _ChatCall | None = None

            def render(verdict: Verdict) -> bytes:
                assert new_call is not None
                return self._render_call(new_call, verdict)

            slot = self._hold(render, 0)
            call = new_call = _ChatCall(c, index, envelope, slot)
            state.open = call
        size = 0
        if isinstance(fragment.get("id"), str) and not call.id:
            call.id = fragment["id"]
        if isinstance(fragment.get("type"), str):
            call.type = fragment["type"]
        fn = fragment.get("function")
        if isinstance(fn, dict):
            if isinstance(fn.get("name"), str):
                call.name += fn["name"]
            if isinstance(fn.get("arguments"), str):
                call.args.append(fn["arguments"])
                size += len(fn["arguments"])
        elif fn is not None:
            raise _upstream("tool call fragment with a malformed 'function'")
        for key, value in fragment.items():
            if key not in ("index", "id", "type", "function"):
                call.extra[key] = value
        self._grow(call.slot, size + 64)

    def _finish_call(self, state: _ChoiceState) -> None:
        call = state.open
        assert call is not None
        state.open = None
        self._complete(
            call.slot, _call_view(call.id, call.name, "".join(call.args), (call.choice, call.index))
        )

    def _close_all(self) -> None:
        for state in self._choices.values():
            if state.open is not None:
                self._finish_call(state)

    def _render_call(self, call: _ChatCall, verdict: Verdict) -> bytes:
        state = self._choice(call.choice)
        if verdict.allow:
            fragment = {
                "index": state.allowed,
                "id": call.id,
                "type": call.type,
                "function": {"name": call.name, "arguments": "".join(call.args)},
                **call.extra,
            }
            state.allowed += 1
            delta: dict[str, Any] = {"tool_calls": [fragment]}
        else:
            separator = "\n\n" if state.had_content or self._text_seen else ""
            delta = {"content": separator + verdict.text}
            state.had_content = True
        chunk = {
            **call.envelope,
            "choices": [
                {"index": call.choice, "delta": delta, "logprobs": None, "finish_reason": None}
            ],
        }
        return encode_event(SSEEvent(data=dumps_compact(chunk).decode("utf-8")))

    def _render_finish(self, chunk: dict[str, Any], event: SSEEvent) -> bytes:
        for choice in chunk["choices"]:
            if (
                choice.get("finish_reason") == "tool_calls"
                and self._choice(choice["index"]).allowed == 0
            ):
                choice["finish_reason"] = "stop"
        return _encode_like(event, chunk)

    def _on_end(self) -> None:
        if self._open_calls():
            raise ProtocolError(
                "stream ended inside a tool call", status=502, code="truncated_stream"
            )


def _encode_like(event: SSEEvent, payload: dict[str, Any]) -> bytes:
    return encode_event(
        SSEEvent(data=dumps_compact(payload).decode("utf-8"), event=event.event, id=event.id)
    )


# ====================================================================== Responses


class ResponsesRequest(LLMRequest):
    """A parsed Responses API request; mutate it, then :meth:`to_bytes`."""

    def keep_tools(self, names: Collection[str]) -> None:
        """Keep only the named tools (built-in tools are named by their ``type``)."""
        keep = set(names)
        self._keep_listed(
            "tools", keep, ("tool_choice", "parallel_tool_calls"), _responses_tool_name
        )
        choice = self.body.get("tool_choice")
        if isinstance(choice, dict):
            named = choice.get("name") or (
                choice.get("type") if choice.get("type") != "function" else None
            )
            if choice.get("type") == "allowed_tools":
                allowed = [t for t in choice.get("tools") or [] if _responses_tool_name(t) in keep]
                choice["tools"] = allowed
            elif named is not None and named not in keep:
                self.body["tool_choice"] = "none"
        self.tools = [t for t in self.tools if t.name in keep]


def _responses_tool_name(tool: Any) -> str | None:
    if not isinstance(tool, dict):
        return None
    kind = tool.get("type")
    if kind in ("function", "custom"):
        name = tool.get("name")
        return name if isinstance(name, str) else None
    if kind == "mcp" and isinstance(tool.get("server_label"), str):
        return f"mcp:{tool['server_label']}"
    return kind if isinstance(kind, str) else None


_CALL_ITEMS = {
    "function_call": "function_call_output",
    "custom_tool_call": "custom_tool_call_output",
}


class ResponsesResponse(LLMResponse):
    """A parsed (non-streaming) Responses API ``response`` with its function calls.

    A refused ``function_call`` item (by ``call_id``) becomes a refusal message item.
    """

    def _refuse_in_body(self, refusals: Mapping[str, str]) -> None:
        output = self.body.get("output")
        if isinstance(output, list):
            self.body["output"] = _replace_refused(output, refusals)


def _refusal_message(call_id: str, text: str, *, status: str = "completed") -> dict[str, Any]:
    return {
        "id": f"msg_bastion_{call_id}",
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
        if status == "completed"
        else [],
    }


def _replace_refused(output: list[Any], refusals: Mapping[str, str]) -> list[Any]:
    result = []
    for item in output:
        if (
            isinstance(item, dict)
            and item.get("type") in _CALL_ITEMS
            and item.get("call_id") in refusals
        ):
            result.append(_refusal_message(item["call_id"], refusals[item["call_id"]]))
        else:
            result.append(item)
    return result


def _responses_call_view(item: dict[str, Any], position: tuple[int, ...]) -> CallView:
    raw = item.get("arguments") if item.get("type") == "function_call" else item.get("input")
    if item.get("type") == "custom_tool_call" and isinstance(raw, str):
        # Custom tools take free text, not JSON: surface it as {"input": text}.
        return CallView(
            ToolCall(str(item.get("call_id") or ""), str(item.get("name") or ""), {"input": raw}),
            raw,
            None,
            position,
        )
    return _call_view(str(item.get("call_id") or ""), str(item.get("name") or ""), raw, position)


def _responses_tool_spec(tool: Any) -> ToolSpec | None:
    name = _responses_tool_name(tool)
    if name is None:
        return None
    description = tool.get("description")
    parameters = tool.get("parameters")
    return ToolSpec.named(
        name,
        description=description if isinstance(description, str) else "",
        input_schema=parameters if isinstance(parameters, dict) else {},
    )


_RESPONSES_SPECS = ToolSpecCache(_responses_tool_spec)


class OpenAIResponsesCodec:
    """Codec for ``POST /v1/responses``."""

    protocol = "openai-responses"
    path = "/v1/responses"

    @staticmethod
    def usage_of(payload: Mapping[str, Any]) -> dict[str, int] | None:
        """Tokens a response or a stream event (``response.completed``...) reports, as ``{"total": n}``."""
        response = payload.get("response")
        usage = response.get("usage") if isinstance(response, dict) else payload.get("usage")
        return _total_tokens(usage, ("input_tokens", "output_tokens"))

    @staticmethod
    def parse_request(body: bytes | Mapping[str, Any]) -> ResponsesRequest:
        data = _object(body, "responses request")
        listed = data.get("tools")
        tools = (
            _RESPONSES_SPECS.specs(listed)
            if isinstance(listed, list)
            else [spec for spec in map(_responses_tool_spec, listed or []) if spec]
        )
        user_texts: list[str] = []
        if isinstance(data.get("instructions"), str):
            user_texts.append(data["instructions"])
        results: list[ResultView] = []
        items = data.get("input")
        if isinstance(items, str):
            user_texts.append(items)
        elif isinstance(items, list):
            produced: dict[str, tuple[str, dict[str, Any]]] = {}
            for i, item in enumerate(items):
                if not isinstance(item, dict):
                    raise ProtocolError(f"input[{i}] must be an object", code="invalid_request")
                kind = item.get("type", "message")
                if kind == "message" and item.get("role") in ("user", "system", "developer"):
                    user_texts.extend(_text_of(item.get("content")))
                elif kind in _CALL_ITEMS:
                    view = _responses_call_view(item, (i,))
                    produced[view.call.id] = (view.call.name, dict(view.call.arguments))
                elif kind in _CALL_ITEMS.values():
                    results.append(
                        ResultView.traced_to(
                            produced,
                            item.get("call_id"),
                            item.get("output"),
                            ("input", i, "output"),
                        )
                    )
        elif items is not None:
            raise ProtocolError("'input' must be a string or a list", code="invalid_request")
        return ResponsesRequest(data, tools, results, tuple(user_texts))

    @staticmethod
    def parse_response(body: bytes | Mapping[str, Any]) -> ResponsesResponse:
        data = _object(body, "response")
        output = data.get("output")
        if not isinstance(output, list):
            raise _upstream("response without 'output'")
        views = [
            _responses_call_view(item, (i,))
            for i, item in enumerate(output)
            if isinstance(item, dict) and item.get("type") in _CALL_ITEMS
        ]
        return ResponsesResponse(data, views)

    @staticmethod
    def stream_rewriter(
        *, max_pending: int = 4 * 1024 * 1024, max_event_size: int = 4 * 1024 * 1024
    ) -> ResponsesStreamRewriter:
        return ResponsesStreamRewriter(max_pending=max_pending, max_event_size=max_event_size)


class _ResponsesCall:
    __slots__ = ("events", "item", "output_index", "slot")

    def __init__(self, output_index: int, item: dict[str, Any], slot: _Slot) -> None:
        self.output_index = output_index
        self.item = item
        self.slot = slot
        self.events: list[tuple[SSEEvent, dict[str, Any]]] = []


_FINAL_EVENTS = ("response.completed", "response.incomplete", "response.failed")
_FINAL_EVENT_BYTES = tuple(name.encode() for name in _FINAL_EVENTS)


class ResponsesStreamRewriter(StreamRewriter):
    """Rewrites a Responses API event stream; see the module docstring."""

    def __init__(
        self, *, max_pending: int = 4 * 1024 * 1024, max_event_size: int = 4 * 1024 * 1024
    ) -> None:
        super().__init__(max_pending=max_pending, max_event_size=max_event_size)
        self._open: dict[int, _ResponsesCall] = {}
        self._refusals: dict[str, str] = {}
        # Once a call is held, every later event is renumbered in emission order:
        # refusals change the event count and held events change their order.
        self._next_seq: int | None = None

    def _passes(self, events: bytes) -> bool:
        return self._plain(events)

    def _plain(self, raw: bytes) -> bool:
        """Nothing in ``raw`` can concern a function call or need renumbering."""
        return (
            self._next_seq is None
            and not (_CALL_MARK(raw) and (b"function_call" in raw or b"custom_tool_call" in raw))
            and not (b"\\" in raw and b"\\u" in raw)
            and not (b"response." in raw and any(name in raw for name in _FINAL_EVENT_BYTES))
        )

    def _on_event(self, event: SSEEvent) -> None:
        raw = (event.data or "").encode("utf-8")
        if self._plain(raw):
            self._emit(encode_event(event))
            return
        payload = loads_strict(raw)
        if not isinstance(payload, dict) or not isinstance(payload.get("type"), str):
            raise _upstream("stream event is not a typed JSON object")
        kind = payload["type"]
        index = payload.get("output_index")
        if kind == "response.output_item.added":
            item = payload.get("item")
            if isinstance(item, dict) and item.get("type") in _CALL_ITEMS:
                if not isinstance(index, int) or index in self._open:
                    raise _upstream("function call item with a bad output_index")
                held: _ResponsesCall | None = None

                def render(verdict: Verdict) -> bytes:
                    assert held is not None
                    return self._render_call(held, verdict)

                held = _ResponsesCall(index, item, self._hold(render, 0))
                if self._next_seq is None:
                    seq = payload.get("sequence_number")
                    self._next_seq = seq if isinstance(seq, int) else 0
                self._open[index] = held
        if isinstance(index, int) and index in self._open:
            held_call = self._open[index]
            held_call.events.append((event, payload))
            self._grow(held_call.slot, len(raw))
            if kind == "response.output_item.done":
                item = payload.get("item")
                if not isinstance(item, dict) or item.get("type") not in _CALL_ITEMS:
                    raise _upstream("output_item.done does not carry the function call")
                del self._open[index]
                held_call.item = item
                self._complete(held_call.slot, _responses_call_view(item, (index,)))
            return
        if kind in _FINAL_EVENTS:
            if self._open:
                raise _upstream(f"{kind} while function calls are unfinished")
            self._emit_later(lambda: self._render_final(event, payload), len(raw))
            return
        self._emit_later(lambda: self._render_plain(event, payload), len(raw))

    def _renumber(self, payload: dict[str, Any]) -> dict[str, Any]:
        if self._next_seq is not None:
            payload["sequence_number"] = self._next_seq
            self._next_seq += 1
        return payload

    def _render_plain(self, event: SSEEvent, payload: dict[str, Any]) -> bytes:
        if self._next_seq is None:
            return encode_event(event)
        return _encode_like(event, self._renumber(payload))

    def _render_final(self, event: SSEEvent, payload: dict[str, Any]) -> bytes:
        response = payload.get("response")
        if (
            isinstance(response, dict)
            and isinstance(response.get("output"), list)
            and self._refusals
        ):
            response["output"] = _replace_refused(response["output"], self._refusals)
        return _encode_like(event, self._renumber(payload))

    def _render_call(self, held: _ResponsesCall, verdict: Verdict) -> bytes:
        if verdict.allow:
            return b"".join(self._render_plain(event, payload) for event, payload in held.events)
        call_id = str(held.item.get("call_id") or "")
        self._refusals[call_id] = verdict.text
        message = _refusal_message(call_id, verdict.text)
        item_id = message["id"]
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        where = {"item_id": item_id, "output_index": held.output_index, "content_index": 0}
        events: list[dict[str, Any]] = [
            {
                "type": "response.output_item.added",
                "output_index": held.output_index,
                "item": _refusal_message(call_id, "", status="in_progress"),
            },
            {"type": "response.content_part.added", **where, "part": part},
            {"type": "response.output_text.delta", **where, "delta": verdict.text, "logprobs": []},
            {"type": "response.output_text.done", **where, "text": verdict.text, "logprobs": []},
            {"type": "response.content_part.done", **where, "part": {**part, "text": verdict.text}},
            {
                "type": "response.output_item.done",
                "output_index": held.output_index,
                "item": message,
            },
        ]
        return b"".join(
            encode_event(
                SSEEvent(data=dumps_compact(self._renumber(p)).decode("utf-8"), event=p["type"])
            )
            for p in events
        )

    def _on_end(self) -> None:
        if self._open:
            raise ProtocolError(
                "stream ended inside a function call", status=502, code="truncated_stream"
            )
