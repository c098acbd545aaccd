"""A fault in the middle of a stream ends it with an audited error at every front door.

The chunks before it go through the pass-through; the one with the fault must
not escape the guard as an exception (it takes the long way, which reports it).
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from codec_streams import serving, sse
from conftest import AuditLog

from bastion.adapters.asgi import BastionMiddleware
from bastion.adapters.transport import AsyncBastionTransport, BastionTransport
from bastion.events import Identity

TEXT = {"choices": [{"index": 0, "delta": {"content": "hello"}, "finish_reason": None}]}
AFTER = {"choices": [{"index": 0, "delta": {"content": "world"}, "finish_reason": None}]}
USER = {"model": "gpt-test", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
# Whole events, then one whose bytes are not UTF-8, then more text that must not follow.
STREAM = sse(TEXT) * 40 + b'data: {"choices": "\xff\xfe"}\n\n' + sse(AFTER) * 5


def error_of(text: str) -> dict[str, Any]:
    last = text.rstrip().rsplit("data: ", 1)[1]
    error: dict[str, Any] = json.loads(last)["error"]
    return error


@pytest.mark.parametrize("door", ["middleware", "async_transport", "sync_transport"])
async def test_invalid_utf8_mid_stream_ends_it_with_an_audited_error(
    serve: Any, make_guard: Any, agent: str, audit: AuditLog, door: str
) -> None:
    upstream = serving("/v1/chat/completions", STREAM)
    guard = make_guard(identity=Identity(agent))
    if door == "middleware":
        with serve(BastionMiddleware(upstream, guard=guard)) as url:
            async with httpx.AsyncClient() as http:
                reply = await http.post(f"{url}/v1/chat/completions", json=USER)
    elif door == "async_transport":
        transport = AsyncBastionTransport(httpx.AsyncHTTPTransport(), guard=guard)
        with serve(upstream) as url:
            async with httpx.AsyncClient(transport=transport) as http:
                reply = await http.post(f"{url}/v1/chat/completions", json=USER)
    else:
        transport = BastionTransport(httpx.HTTPTransport(), guard=guard)
        with serve(upstream) as url, httpx.Client(transport=transport) as http:
            reply = http.post(f"{url}/v1/chat/completions", json=USER)
    text = reply.content.decode("utf-8")
    # How many "hello" events precede the error depends on how reads coalesce the
    # upstream's writes (the run holding the fault is refused whole); none may follow.
    assert '"world"' not in text and "\ufffd" not in text
    assert text.count('"hello"') <= 40
    assert error_of(text)["code"] == "invalid_utf8"
    assert audit.errors() == ["invalid_utf8"]
