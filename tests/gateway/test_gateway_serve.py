"""``bastion serve`` as a real process, driven by the openai, anthropic and mcp SDKs."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import httpx2
import openai
import pytest
from mcp.client.client import Client
from mcp.client.streamable_http import streamable_http_client
from servers.llm import Call

from bastion.identity import fingerprint

from .harness import (
    ALICE,
    ANTHROPIC_KEY,
    BOB,
    PROVIDER_KEY,
    Gateway,
    Upstreams,
    wait_for,
)

TOOLS: Any = [
    {"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
    for n in ("get_weather", "send_email")
]
ASK: Any = [{"role": "user", "content": "weather in Oslo?"}]


@pytest.fixture(scope="module")
def gateway(start_gateway: Any) -> Gateway:
    gw: Gateway = start_gateway()
    return gw


@pytest.fixture
def client(gateway: Gateway) -> Iterator[openai.OpenAI]:
    with httpx2.Client() as http:
        yield openai.OpenAI(
            base_url=gateway.url + "/v1", api_key=ALICE, http_client=http, max_retries=0
        )


def mcp_client(url: str, mode: str = "legacy") -> Client:
    http = httpx2.AsyncClient(headers={"authorization": f"Bearer {ALICE}"})
    return Client(streamable_http_client(url, http_client=http), mode=mode)


# ---------------------------------------------------------------- startup and health


def test_startup_banner_names_endpoints_policy_and_upstreams(gateway: Gateway) -> None:
    banner = "\n".join(gateway.banner)
    assert "policy: 6 rules from 1 files" in banner
    assert "endpoint /mcp (aggregated: github__*, docs__*, down__*)" in banner
    assert "endpoint POST /v1/chat/completions" in banner
    assert "mcp upstream docs:" in banner and "provider anthropic: anthropic at" in banner


def test_healthz_reports_the_loaded_policy(gateway: Gateway) -> None:
    body = httpx.get(gateway.url + "/healthz").json()
    assert body["status"] == "ok"
    assert body["policy"] == {"rules": 6, "files": 1, "last_reload_error": None}


def test_metrics_count_decisions(
    gateway: Gateway, client: openai.OpenAI, upstreams: Upstreams
) -> None:
    upstreams.llm.reply("sunny")
    client.chat.completions.create(model="gpt-4o", messages=ASK)
    text = httpx.get(gateway.url + "/metrics").text
    assert 'bastion_decisions_total{effect="allow",kind="model"}' in text


# ---------------------------------------------------------------- LLM proxy


def test_allowed_tool_call_reaches_the_agent_with_the_provider_key_injected(
    client: openai.OpenAI, upstreams: Upstreams
) -> None:
    upstreams.llm.reply("", Call("c1", "get_weather", {"city": "Oslo"}))
    reply = client.chat.completions.create(model="gpt-4o", messages=ASK, tools=TOOLS)
    (call,) = reply.choices[0].message.tool_calls or []
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    sent = upstreams.recorder.headers[-1]
    assert sent["authorization"] == f"Bearer {PROVIDER_KEY}"
    assert ALICE not in str(sent)


def test_forbidden_tool_call_is_replaced_by_a_refusal(
    client: openai.OpenAI, upstreams: Upstreams
) -> None:
    upstreams.llm.reply("", Call("c1", "send_email", {"to": "x@evil.example", "body": "hi"}))
    reply = client.chat.completions.create(model="gpt-4o", messages=ASK, tools=TOOLS)
    message = reply.choices[0].message
    assert not message.tool_calls
    assert "mail goes out only by hand" in (message.content or "")


def test_streamed_chat_passes_text_through(client: openai.OpenAI, upstreams: Upstreams) -> None:
    upstreams.llm.reply("It is sunny in Oslo today.")
    stream = client.chat.completions.create(model="gpt-4o", messages=ASK, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == "It is sunny in Oslo today."


def test_responses_api_goes_to_the_openai_provider(
    client: openai.OpenAI, upstreams: Upstreams
) -> None:
    upstreams.llm.reply("cloudy")
    response = client.responses.create(model="gpt-4o-mini", input="weather?")
    assert response.output_text == "cloudy"
    assert upstreams.llm.last["model"] == "gpt-4o-mini"


def test_anthropic_messages_get_the_anthropic_key(gateway: Gateway, upstreams: Upstreams) -> None:
    upstreams.llm.reply("rainy")
    with httpx2.Client() as http:
        claude = anthropic.Anthropic(
            base_url=gateway.url, api_key=ALICE, http_client=http, max_retries=0
        )
        message = claude.messages.create(
            model="claude-sonnet-4", max_tokens=50, messages=[{"role": "user", "content": "hi"}]
        )
    assert message.content[0].text == "rainy"  # type: ignore[union-attr]
    sent = upstreams.recorder.headers[-1]
    assert sent["x-api-key"] == ANTHROPIC_KEY
    assert "authorization" not in sent and ALICE not in str(sent)


def test_models_lists_what_policy_and_key_allow(gateway: Gateway) -> None:
    with httpx2.Client() as http:
        as_alice = openai.OpenAI(base_url=gateway.url + "/v1", api_key=ALICE, http_client=http)
        as_bob = openai.OpenAI(base_url=gateway.url + "/v1", api_key=BOB, http_client=http)
        alice = sorted(m.id for m in as_alice.models.list())
        bob = sorted(m.id for m in as_bob.models.list())
    assert alice == ["claude-sonnet-4", "gpt-4o", "gpt-4o-mini"]  # gpt-secret: admins only
    assert bob == ["gpt-4o"]  # the key grants one model


def test_a_model_the_key_does_not_grant_is_refused(gateway: Gateway) -> None:
    with httpx2.Client() as http:
        as_bob = openai.OpenAI(
            base_url=gateway.url + "/v1", api_key=BOB, http_client=http, max_retries=0
        )
        with pytest.raises(openai.PermissionDeniedError) as info:
            as_bob.chat.completions.create(model="gpt-4o-mini", messages=ASK)
    assert "may not use model 'gpt-4o-mini'" in str(info.value)


def test_missing_credential_is_refused(gateway: Gateway) -> None:
    response = httpx.post(
        gateway.url + "/v1/chat/completions", json={"model": "gpt-4o", "messages": ASK}
    )
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"


def test_provider_key_is_never_echoed_back_or_audited(
    gateway: Gateway, client: openai.OpenAI
) -> None:
    raw = client.chat.completions.with_raw_response.create(model="echo-1", messages=ASK)
    body = raw.http_response.content
    headers = str(raw.http_response.headers)
    assert b"you sent Bearer " in body  # the upstream did try to quote it
    assert PROVIDER_KEY.encode() not in body and PROVIDER_KEY not in headers
    assert wait_for(lambda: any(r["provider"] == "echo" for r in gateway.audit_lines()))
    records = [r for r in gateway.audit_lines() if r["provider"] == "echo"]
    assert records[-1]["provider_key_fingerprint"] == fingerprint(PROVIDER_KEY)
    assert PROVIDER_KEY not in (gateway.directory / "audit.jsonl").read_text()
    assert PROVIDER_KEY not in gateway.stderr()


# ---------------------------------------------------------------- upstream failures


def test_unreachable_provider_becomes_an_openai_error(client: openai.OpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="down-1", messages=ASK)
    assert info.value.status_code == 502
    assert info.value.body["code"] == "upstream_unreachable"  # type: ignore[index]


def test_slow_provider_times_out_with_504(client: openai.OpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="slow-1", messages=ASK)
    assert info.value.status_code == 504
    assert info.value.body["code"] == "upstream_timeout"  # type: ignore[index]


def test_dropped_stream_ends_with_an_error_event(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model="drop-1", messages=ASK, stream=True)
    received = []
    with pytest.raises(openai.APIError) as info:
        for chunk in stream:
            received.append(chunk.choices[0].delta.content if chunk.choices else None)
    assert received == ["Hel"]
    assert "dropped the connection" in str(info.value)


def test_upstream_failures_are_audited(gateway: Gateway, client: openai.OpenAI) -> None:
    with pytest.raises(openai.APIStatusError):
        client.chat.completions.create(model="down-1", messages=ASK)
    assert wait_for(
        lambda: any(r["error"] == "upstream_unreachable" for r in gateway.audit_lines())
    )


def test_decisions_are_logged_one_readable_line_each(
    gateway: Gateway, client: openai.OpenAI, upstreams: Upstreams
) -> None:
    upstreams.llm.reply("", Call("c9", "send_email", {"to": "a@b.c", "body": "x"}))
    client.chat.completions.create(model="gpt-4o", messages=ASK, tools=TOOLS)
    line = "FORBID call send_email by alice (rule no-send: mail goes out only by hand)"
    assert wait_for(lambda: line in gateway.stderr())


# ---------------------------------------------------------------- MCP


async def test_aggregated_mcp_merges_two_servers_and_filters_by_policy(gateway: Gateway) -> None:
    async with mcp_client(gateway.url + "/mcp") as mcp:
        names = sorted(t.name for t in (await mcp.list_tools()).tools)
    assert names == [
        "docs__list_issues",
        "github__get_file_contents",
        "github__get_issue",
        "github__list_issues",
    ]


async def test_aggregated_mcp_routes_each_call_to_its_server(
    gateway: Gateway, upstreams: Upstreams
) -> None:
    before_github, before_docs = len(upstreams.github.calls()), len(upstreams.docs.calls())
    async with mcp_client(gateway.url + "/mcp") as mcp:
        result = await mcp.call_tool("docs__list_issues", {"owner": "acme", "repo": "public"})
    assert not result.is_error and "Dark mode" in result.content[0].text  # type: ignore[union-attr]
    assert [c.tool for c in upstreams.docs.calls()[before_docs:]] == ["list_issues"]
    assert len(upstreams.github.calls()) == before_github


async def test_aggregated_mcp_refuses_a_forbidden_call_before_the_server(
    gateway: Gateway, upstreams: Upstreams
) -> None:
    before = len(upstreams.github.calls())
    async with mcp_client(gateway.url + "/mcp") as mcp:
        result = await mcp.call_tool(
            "github__create_issue", {"owner": "acme", "repo": "public", "title": "t", "body": "b"}
        )
    assert result.is_error
    assert "agents may not open issues" in result.content[0].text  # type: ignore[union-attr]
    assert len(upstreams.github.calls()) == before


async def test_aggregated_mcp_speaks_the_stateless_revision(gateway: Gateway) -> None:
    async with mcp_client(gateway.url + "/mcp", mode="2026-07-28") as mcp:
        names = {t.name for t in (await mcp.list_tools()).tools}
        result = await mcp.call_tool("github__list_issues", {"owner": "acme", "repo": "public"})
    assert "github__list_issues" in names and "github__create_issue" not in names
    assert not result.is_error


def test_aggregated_mcp_paginates_tools_list(gateway: Gateway) -> None:
    headers = {
        "authorization": f"Bearer {ALICE}",
        "accept": "application/json, text/event-stream",
        "mcp-protocol-version": "2026-07-28",
        "mcp-method": "tools/list",
    }
    meta = {"io.modelcontextprotocol/protocolVersion": "2026-07-28"}
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {"_meta": meta}}
    first = httpx.post(gateway.url + "/mcp", json=body, headers=headers).json()["result"]
    assert "nextCursor" not in first  # 16 tools fit one page of 100
    body["params"]["cursor"] = "not-a-cursor"
    bad = httpx.post(gateway.url + "/mcp", json=body, headers=headers).json()
    assert bad["error"]["code"] == -32602


async def test_per_server_proxy_keeps_the_session_over_sse(
    gateway: Gateway, upstreams: Upstreams
) -> None:
    before = len(upstreams.github.calls())
    async with mcp_client(gateway.url + "/mcp/github") as mcp:
        names = {t.name for t in (await mcp.list_tools()).tools}
        result = await mcp.call_tool("list_issues", {"owner": "acme", "repo": "public"})
    assert "list_issues" in names and "create_issue" not in names
    assert not result.is_error
    assert [c.tool for c in upstreams.github.calls()[before:]] == ["list_issues"]


def test_unknown_mcp_server_is_a_jsonrpc_error(gateway: Gateway) -> None:
    response = httpx.post(
        gateway.url + "/mcp/nope",
        json={"jsonrpc": "2.0", "id": 1, "method": "ping"},
        headers={"authorization": f"Bearer {ALICE}"},
    )
    assert response.status_code in (200, 404)
    assert response.json()["error"]["message"] == "no MCP server named 'nope'"


async def test_an_unreachable_mcp_server_is_left_out_of_the_list_and_its_calls_fail_cleanly(
    gateway: Gateway,
) -> None:
    async with mcp_client(gateway.url + "/mcp") as mcp:
        names = {t.name for t in (await mcp.list_tools()).tools}
        with pytest.raises(Exception, match="unreachable"):
            await mcp.call_tool("down__list_issues", {})
    assert "github__list_issues" in names and not any(n.startswith("down__") for n in names)


def test_per_server_proxy_answers_a_down_upstream_with_a_jsonrpc_error(gateway: Gateway) -> None:
    body = {"jsonrpc": "2.0", "id": 7, "method": "tools/list", "params": {}}
    response = httpx.post(
        gateway.url + "/mcp/down",
        json=body,
        headers={
            "authorization": f"Bearer {ALICE}",
            "accept": "application/json, text/event-stream",
        },
    )
    reply = response.json()
    assert reply["id"] == 7 and reply["error"]["code"] == -32603
    assert reply["error"]["data"]["reason"] == "upstream_unreachable"
