"""Bad traffic through BastionMiddleware: each gets a well-formed protocol error, is audited, fails closed."""

from __future__ import annotations

import gzip
import json
from typing import Any

import httpx
import openai
import pytest
from codec_streams import chat_completion
from conftest import AuditLog, Upstreams
from servers.llm import Call, Script

from bastion.adapters.asgi import BastionMiddleware

CHAT = "/v1/chat/completions"


def http_only(handler: Any) -> Any:
    """A raw ASGI app running ``handler`` for HTTP and acknowledging the lifespan."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        await handler(scope, receive, send)

    return app


def post(up: Upstreams, path: str, content: bytes, agent: str, **headers: str) -> httpx.Response:
    return httpx.post(
        f"{up.guarded_llm_url}{path}",
        content=content,
        headers={"content-type": "application/json", "x-agent": agent, **headers},
        timeout=10,
    )


def chat_body(**extra: Any) -> bytes:
    return json.dumps(
        {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}], **extra}
    ).encode()


@pytest.mark.parametrize(
    ("content", "code"),
    [
        (b'{"model": "gpt-test", "messages": [', "invalid_json"),
        (b'{"model": "a", "model": "b", "messages": []}', "duplicate_key"),
        (b'{"model": "gpt-test", "messages": [], "x": "\xff"}', "invalid_utf8"),
    ],
)
def test_malformed_request_bodies_get_an_openai_error_and_are_not_forwarded(
    upstreams: Upstreams, agent: str, audit: AuditLog, content: bytes, code: str
) -> None:
    before = len(upstreams.llm.requests)
    response = post(upstreams, CHAT, content, agent)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == code
    assert len(upstreams.llm.requests) == before
    assert audit.errors() == [code]


def test_anthropic_route_answers_in_the_anthropic_error_shape(
    upstreams: Upstreams, agent: str
) -> None:
    response = post(upstreams, "/v1/messages", b"{nope", agent)
    assert response.status_code == 400
    assert response.json()["type"] == "error"
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_mcp_route_answers_malformed_json_with_a_jsonrpc_parse_error(
    upstreams: Upstreams, agent: str
) -> None:
    response = httpx.post(
        f"{upstreams.guarded_mcp_url}/mcp",
        content=b'{"jsonrpc": "2.0", "id": 1, "method": "tools/list", "id": 2}',
        headers={"content-type": "application/json", "x-agent": agent},
    )
    assert response.json()["error"]["code"] == -32700


def test_oversized_body_is_refused_with_413(make_guard: Any, serve: Any, agent: str) -> None:
    upstream_hits: list[bytes] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        upstream_hits.append(b"")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    guarded = BastionMiddleware(http_only(app), guard=make_guard(max_body_size=1000))
    with serve(guarded) as url:
        response = httpx.post(
            f"{url}{CHAT}",
            content=chat_body(padding="x" * 2000),
            headers={"x-agent": agent, "content-type": "application/json"},
        )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "body_too_large"
    assert upstream_hits == []


def test_gzip_request_body_is_decoded_and_inspected(upstreams: Upstreams, agent: str) -> None:
    upstreams.llm.reply("ok")
    body = chat_body(model="legacy-1")
    response = post(upstreams, CHAT, gzip.compress(body), agent, **{"content-encoding": "gzip"})
    assert response.status_code == 403


def test_unknown_request_encoding_is_refused(upstreams: Upstreams, agent: str) -> None:
    response = post(upstreams, CHAT, b"xxxx", agent, **{"content-encoding": "snappy"})
    assert response.status_code == 415


def test_invalid_tool_call_arguments_from_upstream_are_refused(
    upstreams: Upstreams, agent: str, audit: AuditLog
) -> None:
    bad = chat_completion(("call_x", "get_weather", '{"city": '))
    upstreams.llm.script = Script(raw=json.dumps(bad).encode(), raw_type="application/json")
    response = post(upstreams, CHAT, chat_body(), agent)
    message = response.json()["choices"][0]["message"]
    assert "tool_calls" not in message
    assert "get_weather" in message["content"] and "not valid JSON" in message["content"]
    assert "invalid_arguments" in audit.errors()


def test_truncated_upstream_stream_ends_with_an_error_event(
    upstreams: Upstreams, agent: str, audit: AuditLog
) -> None:
    head = (
        b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":'
        b'[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_1","type":"function",'
        b'"function":{"name":"get_weather","arguments":"{\\"ci"}}]},"finish_reason":null}]}\n\n'
    )
    upstreams.llm.script = Script(raw=head)
    client = openai.OpenAI(
        base_url=f"{upstreams.guarded_llm_url}/v1",
        api_key="k",
        default_headers={"x-agent": agent},
        max_retries=0,
    )
    stream = client.chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    with pytest.raises(openai.APIError):
        for chunk in stream:
            assert not (chunk.choices and chunk.choices[0].delta.tool_calls)
    assert "truncated_stream" in audit.errors()


def test_upstream_compressed_reply_is_decoded_before_inspection(
    make_guard: Any, serve: Any, agent: str
) -> None:
    reply = chat_completion(("call_d", "delete_repo", "{}"))
    packed = gzip.compress(json.dumps(reply).encode())

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        headers = [(b"content-type", b"application/json"), (b"content-encoding", b"gzip")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": packed})

    with serve(BastionMiddleware(http_only(app), guard=make_guard())) as url:
        response = httpx.post(f"{url}{CHAT}", content=chat_body(), headers={"x-agent": agent})
    message = response.json()["choices"][0]["message"]
    assert "tool_calls" not in message and "delete_repo" in message["content"]


def test_unexpected_error_in_the_pipeline_denies(make_guard: Any, serve: Any, agent: str) -> None:
    forwarded: list[int] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        forwarded.append(1)

    class BrokenPolicy:
        def __getattr__(self, name: str) -> Any:
            raise RuntimeError("boom")

    guard = make_guard()
    guard.policy = BrokenPolicy()
    with serve(BastionMiddleware(http_only(app), guard=guard)) as url:
        response = httpx.post(f"{url}{CHAT}", content=chat_body(), headers={"x-agent": agent})
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "internal_error"
    assert forwarded == []


async def test_unguarded_paths_and_lifespan_pass_through(make_guard: Any, serve: Any) -> None:
    seen: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["type"])
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"plain"})

    with serve(BastionMiddleware(app, guard=make_guard())) as url:
        assert httpx.get(f"{url}/health").text == "plain"
        assert httpx.get(f"{url}/v1/chat/completions").text == "plain"
    assert seen == ["lifespan", "http", "http"]


def test_unknown_paths_can_be_denied(make_guard: Any, serve: Any, audit: AuditLog) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("must not be reached")

    with serve(BastionMiddleware(http_only(app), guard=make_guard(unknown="deny"))) as url:
        assert httpx.get(f"{url}/health").status_code == 404
    assert audit.errors() == ["unrouted"]


def test_http_error_refusal_mode(make_guard: Any, serve: Any, agent: str) -> None:
    from servers.llm import ScriptedLLM

    llm = ScriptedLLM()
    llm.reply("", Call("call_d", "delete_repo", {}))
    with serve(BastionMiddleware(llm.app, guard=make_guard(refusal="error"))) as url:
        client = openai.OpenAI(
            base_url=f"{url}/v1", api_key="k", default_headers={"x-agent": agent}, max_retries=0
        )
        with pytest.raises(openai.PermissionDeniedError) as info:
            client.chat.completions.create(
                model="gpt-test", messages=[{"role": "user", "content": "x"}]
            )
    assert "delete_repo" in str(info.value)
