"""The sync transport reads streams without a loop hop per chunk, and still audits on its loop."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import httpx
from codec_streams import serving, sse
from conftest import AuditLog

from bastion.adapters.pipeline import Guard
from bastion.adapters.transport import BastionTransport
from bastion.events import AuditEvent, Identity

TEXT = {"choices": [{"index": 0, "delta": {"content": "hello"}, "finish_reason": None}]}
USER = {"model": "gpt-test", "stream": True, "messages": [{"role": "user", "content": "hi"}]}


def call_chunk(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    fragment = {
        "index": 0,
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }
    return {"choices": [{"index": 0, "delta": {"tool_calls": [fragment]}, "finish_reason": None}]}


def read_stream(url: str, guard: Guard) -> str:
    transport = BastionTransport(httpx.HTTPTransport(), guard=guard)
    with (
        httpx.Client(transport=transport) as http,
        http.stream("POST", f"{url}/v1/chat/completions", json=USER) as response,
    ):
        return b"".join(response.iter_raw()).decode()


def recording_threads(audit: AuditLog) -> tuple[Callable[[AuditEvent], None], list[str]]:
    threads: list[str] = []

    def hook(event: AuditEvent) -> None:
        threads.append(threading.current_thread().name)
        audit(event)

    return hook, threads


def test_a_forbidden_call_in_a_sync_stream_is_decided_on_the_guard_loop(
    serve: Any, make_guard: Any, agent: str, audit: AuditLog
) -> None:
    stream = sse(TEXT) * 50 + sse(call_chunk("c1", "delete_repo", '{"repo": "x"}'))
    stream += sse({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
    stream += b"data: [DONE]\n\n"
    hook, threads = recording_threads(audit)
    with serve(serving("/v1/chat/completions", stream)) as url:
        text = read_stream(url, make_guard(identity=Identity(agent), on_decision=hook))
    assert text.count('"hello"') == 50
    assert "delete_repo" in text and "blocked by policy" in text and '"tool_calls"' not in text
    assert threads and set(threads) == {"bastion-guard-loop"}


def test_a_broken_sync_stream_ends_with_an_error_audited_on_the_guard_loop(
    serve: Any, make_guard: Any, agent: str, audit: AuditLog
) -> None:
    stream = sse(TEXT) * 50 + b'data: {"choices": "\xff"}\n\n' + sse(TEXT)
    hook, threads = recording_threads(audit)
    with serve(serving("/v1/chat/completions", stream)) as url:
        text = read_stream(url, make_guard(identity=Identity(agent), on_decision=hook))
    assert text.count('"hello"') == 50
    error = json.loads(text.rsplit("data: ", 1)[1])
    assert error["error"]["code"] == "invalid_utf8"
    assert audit.errors() == ["invalid_utf8"]
    assert threads and set(threads) == {"bastion-guard-loop"}


def test_an_uninspectable_upstream_reply_is_refused_and_audited_on_the_guard_loop(
    serve: Any, make_guard: Any, agent: str, audit: AuditLog
) -> None:
    hook, threads = recording_threads(audit)
    upstream = serving("/v1/chat/completions", b"plain words", media_type="text/plain")
    transport = BastionTransport(
        httpx.HTTPTransport(), guard=make_guard(identity=Identity(agent), on_decision=hook)
    )
    with serve(upstream) as url, httpx.Client(transport=transport) as http:
        reply = http.post(f"{url}/v1/chat/completions", json={**USER, "stream": False})
    assert reply.status_code == 502
    assert reply.json()["error"]["code"] == "invalid_content_type"
    assert audit.errors() == ["invalid_content_type"]
    assert threads and set(threads) == {"bastion-guard-loop"}


def test_a_rewritten_request_reaches_the_upstream_rewritten(
    serve: Any, make_guard: Any, agent: str
) -> None:
    # A tool output the policy redacts: the forwarded body must be Bastion's, not the agent's.
    body = {
        "model": "gpt-test",
        "messages": [
            {"role": "user", "content": "debug"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "d1",
                        "type": "function",
                        "function": {"name": "debug_dump", "arguments": "{}"},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "d1", "content": "internal state"},
        ],
    }
    app = serving("/v1/chat/completions", b'{"choices": []}', media_type="application/json")
    transport = BastionTransport(httpx.HTTPTransport(), guard=make_guard(identity=Identity(agent)))
    with serve(app) as url, httpx.Client(transport=transport) as http:
        http.post(f"{url}/v1/chat/completions", json=body)
        http.post(f"{url}/v1/chat/completions", json=USER)
    rewritten, untouched = app.state.received
    assert "internal state" not in json.dumps(rewritten)
    assert untouched == USER
