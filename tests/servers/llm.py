"""A scripted OpenAI- and Anthropic-compatible upstream (Starlette).

``ScriptedLLM().app`` serves ``/v1/chat/completions``, ``/v1/responses`` and
``/v1/messages``. Each answer is the current :class:`Script`: some text and
chosen tool calls, rendered in the protocol asked for, as JSON or as an SSE
stream (``"stream": true`` in the request), with tool-call arguments split
into small fragments as real providers send them. Every request body
received is kept in ``requests`` (the last one in ``last``), so tests can see
what Bastion forwarded.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


@dataclass
class Call:
    id: str
    name: str
    arguments: dict[str, Any]


@dataclass
class Script:
    text: str = ""
    calls: list[Call] = field(default_factory=list)
    # Raw bytes to answer with instead (for malformed upstream replies).
    raw: bytes | None = None
    raw_type: str = "text/event-stream"
    chunk: int = 7


def _sse(payload: dict[str, Any] | str, event: str | None = None) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {data}\n\n".encode()


def _fragments(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


class ScriptedLLM:
    """The upstream; set ``script`` before each request."""

    def __init__(self) -> None:
        self.script = Script()
        self.requests: list[dict[str, Any]] = []
        self.app = Starlette(
            routes=[
                Route("/v1/chat/completions", self._chat, methods=["POST"]),
                Route("/v1/responses", self._responses, methods=["POST"]),
                Route("/v1/messages", self._messages, methods=["POST"]),
            ]
        )

    @property
    def last(self) -> dict[str, Any]:
        return self.requests[-1]

    def reply(self, text: str = "", *calls: Call) -> None:
        self.script = Script(text, list(calls))

    async def _body(self, request: Request) -> dict[str, Any]:
        body: dict[str, Any] = json.loads(await request.body())
        self.requests.append(body)
        return body

    def _raw(self) -> Response | None:
        script = self.script
        if script.raw is None:
            return None
        return Response(script.raw, media_type=script.raw_type)

    def _stream(self, parts: list[bytes]) -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            for part in parts:
                yield part

        return StreamingResponse(chunks(), media_type="text/event-stream")

    # ---------------------------------------------------------------- chat completions

    async def _chat(self, request: Request) -> Response:
        body = await self._body(request)
        if (raw := self._raw()) is not None:
            return raw
        script, model = self.script, body.get("model", "m")
        finish = "tool_calls" if script.calls else "stop"
        if not body.get("stream"):
            message: dict[str, Any] = {"role": "assistant", "content": script.text or None}
            if script.calls:
                message["tool_calls"] = [
                    {
                        "id": c.id,
                        "type": "function",
                        "function": {"name": c.name, "arguments": json.dumps(c.arguments)},
                    }
                    for c in script.calls
                ]
            return JSONResponse(
                {
                    "id": "chatcmpl-1",
                    "object": "chat.completion",
                    "created": 1,
                    "model": model,
                    "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                    "usage": {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10},
                }
            )
        base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": model}

        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
            return _sse({**base, "choices": [choice]})

        parts = [chunk({"role": "assistant", "content": ""})]
        parts += [chunk({"content": piece}) for piece in _fragments(script.text, 5) if piece]
        for index, call in enumerate(script.calls):
            parts.append(
                chunk(
                    {
                        "tool_calls": [
                            {
                                "index": index,
                                "id": call.id,
                                "type": "function",
                                "function": {"name": call.name, "arguments": ""},
                            }
                        ]
                    }
                )
            )
            for piece in _fragments(json.dumps(call.arguments), script.chunk):
                parts.append(
                    chunk({"tool_calls": [{"index": index, "function": {"arguments": piece}}]})
                )
        parts.append(chunk({}, finish))
        parts.append(_sse("[DONE]"))
        return self._stream(parts)

    # ---------------------------------------------------------------- Responses

    def _response_object(self, model: str, output: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": "resp_1",
            "object": "response",
            "created_at": 1,
            "status": "completed",
            "model": model,
            "output": output,
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "usage": {
                "input_tokens": 5,
                "output_tokens": 5,
                "total_tokens": 10,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens_details": {"reasoning_tokens": 0},
            },
        }

    async def _responses(self, request: Request) -> Response:
        body = await self._body(request)
        if (raw := self._raw()) is not None:
            return raw
        script, model = self.script, body.get("model", "m")
        output: list[dict[str, Any]] = []
        if script.text:
            output.append(
                {
                    "type": "message",
                    "id": "msg_1",
                    "status": "completed",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": script.text, "annotations": []}],
                }
            )
        for call in script.calls:
            output.append(
                {
                    "type": "function_call",
                    "id": f"fc_{call.id}",
                    "call_id": call.id,
                    "name": call.name,
                    "arguments": json.dumps(call.arguments),
                    "status": "completed",
                }
            )
        final = self._response_object(model, output)
        if not body.get("stream"):
            return JSONResponse(final)
        seq = 0
        parts: list[bytes] = []

        def event(payload: dict[str, Any]) -> None:
            nonlocal seq
            payload["sequence_number"] = seq
            seq += 1
            parts.append(_sse(payload, payload["type"]))

        event(
            {
                "type": "response.created",
                "response": {**final, "status": "in_progress", "output": []},
            }
        )
        for index, item in enumerate(output):
            if item["type"] == "message":
                text = item["content"][0]["text"]
                where = {"item_id": item["id"], "output_index": index, "content_index": 0}
                event(
                    {
                        "type": "response.output_item.added",
                        "output_index": index,
                        "item": {**item, "status": "in_progress", "content": []},
                    }
                )
                event(
                    {
                        "type": "response.content_part.added",
                        **where,
                        "part": {"type": "output_text", "text": "", "annotations": []},
                    }
                )
                for piece in _fragments(text, 5):
                    event({"type": "response.output_text.delta", **where, "delta": piece})
                event({"type": "response.output_text.done", **where, "text": text})
                event(
                    {
                        "type": "response.content_part.done",
                        **where,
                        "part": item["content"][0],
                    }
                )
            else:
                event(
                    {
                        "type": "response.output_item.added",
                        "output_index": index,
                        "item": {**item, "arguments": "", "status": "in_progress"},
                    }
                )
                for piece in _fragments(item["arguments"], script.chunk):
                    event(
                        {
                            "type": "response.function_call_arguments.delta",
                            "item_id": item["id"],
                            "output_index": index,
                            "delta": piece,
                        }
                    )
                event(
                    {
                        "type": "response.function_call_arguments.done",
                        "item_id": item["id"],
                        "output_index": index,
                        "arguments": item["arguments"],
                    }
                )
            event({"type": "response.output_item.done", "output_index": index, "item": item})
        event({"type": "response.completed", "response": final})
        return self._stream(parts)

    # ---------------------------------------------------------------- Anthropic messages

    async def _messages(self, request: Request) -> Response:
        body = await self._body(request)
        if (raw := self._raw()) is not None:
            return raw
        script, model = self.script, body.get("model", "m")
        content: list[dict[str, Any]] = []
        if script.text:
            content.append({"type": "text", "text": script.text})
        content += [
            {"type": "tool_use", "id": c.id, "name": c.name, "input": c.arguments}
            for c in script.calls
        ]
        stop = "tool_use" if script.calls else "end_turn"
        message = {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": content,
            "stop_reason": stop,
            "stop_sequence": None,
            "usage": {"input_tokens": 5, "output_tokens": 5},
        }
        if not body.get("stream"):
            return JSONResponse(message)
        parts = [
            _sse(
                {
                    "type": "message_start",
                    "message": {**message, "content": [], "stop_reason": None},
                },
                "message_start",
            )
        ]
        for index, block in enumerate(content):
            if block["type"] == "text":
                parts.append(
                    _sse(
                        {
                            "type": "content_block_start",
                            "index": index,
                            "content_block": {"type": "text", "text": ""},
                        },
                        "content_block_start",
                    )
                )
                for piece in _fragments(block["text"], 5):
                    parts.append(
                        _sse(
                            {
                                "type": "content_block_delta",
                                "index": index,
                                "delta": {"type": "text_delta", "text": piece},
                            },
                            "content_block_delta",
                        )
                    )
            else:
                parts.append(
                    _sse(
                        {
                            "type": "content_block_start",
                            "index": index,
                            "content_block": {**block, "input": {}},
                        },
                        "content_block_start",
                    )
                )
                for piece in _fragments(json.dumps(block["input"]), script.chunk):
                    parts.append(
                        _sse(
                            {
                                "type": "content_block_delta",
                                "index": index,
                                "delta": {"type": "input_json_delta", "partial_json": piece},
                            },
                            "content_block_delta",
                        )
                    )
            parts.append(_sse({"type": "content_block_stop", "index": index}, "content_block_stop"))
        parts.append(
            _sse(
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": stop, "stop_sequence": None},
                    "usage": {"output_tokens": 5},
                },
                "message_delta",
            )
        )
        parts.append(_sse({"type": "message_stop"}, "message_stop"))
        return self._stream(parts)
