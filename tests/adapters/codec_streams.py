"""Helpers shared by the codec tests: drive a stream rewriter, serve bytes as SSE, build replies."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from bastion.adapters.wire import CallView, StreamRewriter, Verdict


def chat_completion(*calls: tuple[str, str, str], model: str = "m") -> dict[str, Any]:
    """A non-streaming chat completion whose message makes ``calls`` (id, name, raw arguments)."""
    return {
        "id": "c",
        "object": "chat.completion",
        "created": 1,
        "model": model,
        "choices": [
            {
                "index": 0,
                "finish_reason": "tool_calls",
                "message": {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": call_id,
                            "type": "function",
                            "function": {"name": name, "arguments": arguments},
                        }
                        for call_id, name, arguments in calls
                    ],
                },
            }
        ],
    }


def sse(payload: dict[str, Any] | str, event: str | None = None) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {data}\n\n".encode()


def rewrite(
    rewriter: StreamRewriter,
    stream: bytes,
    verdict: Callable[[CallView], Verdict],
    *,
    chunk_size: int = 17,
    seen: list[CallView] | None = None,
) -> bytes:
    out = b""
    for i in range(0, len(stream), chunk_size):
        step = rewriter.feed(stream[i : i + chunk_size])
        out += step.output
        for view in step.needs_verdict:
            if seen is not None:
                seen.append(view)
            out += rewriter.decide(view.call.id, verdict(view)).output
    return out + rewriter.close()


def serving(path: str, body: bytes, *, media_type: str = "text/event-stream") -> Starlette:
    """An app answering POST ``path`` with ``body`` (recording the requests it got)."""
    received: list[dict[str, Any]] = []

    async def endpoint(request: Request) -> Response:
        received.append(json.loads(await request.body()))
        if media_type == "text/event-stream":

            async def chunks() -> Any:
                for i in range(0, len(body), 50):
                    yield body[i : i + 50]

            return StreamingResponse(chunks(), media_type=media_type)
        return Response(body, media_type=media_type)

    app = Starlette(routes=[Route(path, endpoint, methods=["POST"])])
    app.state.received = received
    return app
