"""Redaction and blocking of tool output end to end, with the real SDKs.

Secrets in an OpenAI tool message, an Anthropic tool_result and an MCP tool
result (JSON and SSE replies) are replaced before anything is forwarded; a
``block`` rule replaces the whole output with the placeholder.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from bastion.adapters.pipeline import Guard
from bastion.events import Effect
from bastion.policy import Policy

from .conftest import LLM
from .harness import (
    AuditLog,
    all_secrets,
    aws_key_id,
    github_token,
    identity_from_headers,
    mcp_client,
    new_agent,
    secret_text,
    slack_token,
    text_of,
)
from .llm_clients import (
    anthropic_conversation,
    anthropic_via_middleware,
    anthropic_via_transport,
    async_openai_via_transport,
    forwarded_tool_output,
    openai_conversation,
    openai_via_middleware,
)
from .mcp_servers import MCPServers

POLICY = """
default call allow
default result trusted
default model allow

@id("no-secrets")
redact result * using ["secrets"]

@id("debug-blocked")
block result ["debug__dump", "debug_dump"] reason "debug output never reaches the model"
"""

BLOCKED_LLM = '[Bastion blocked the output of "debug__dump": debug output never reaches the model]'
BLOCKED_MCP = '[Bastion blocked the output of "debug_dump": debug output never reaches the model]'
USER = "Why does the deploy fail?"


@pytest.fixture(scope="module")
def policy() -> Policy:
    return Policy.from_source(POLICY)


@pytest.fixture
def agent() -> str:
    return new_agent()


@pytest.fixture
def guard(policy: Policy, audit: AuditLog) -> Guard:
    return Guard(policy, identity=identity_from_headers, on_decision=audit)


def assert_no_secret(sent: Any) -> None:
    text = sent if isinstance(sent, str) else json.dumps(sent)
    for secret in all_secrets():
        assert secret not in text


def redaction_counts(audit: AuditLog, agent: str, tool: str) -> dict[str, int]:
    events = [e for e in audit.results(agent) if e.target == tool]
    assert len(events) == 1
    counts: dict[str, int] = events[0].detail["redacted"]
    return counts


def texts(output: Any) -> str:
    return output if isinstance(output, str) else "".join(b["text"] for b in output)


# ---------------------------------------------------------------- OpenAI


def test_openai_tool_message_secrets_are_redacted_before_forwarding(
    llm: LLM, guard: Guard, agent: str, audit: AuditLog
) -> None:
    llm.front.use(guard)
    client = openai_via_middleware(llm.guarded_url, agent)
    client.chat.completions.create(
        model="gpt-test",
        messages=openai_conversation(USER, "files__read", {"path": "deploy.env"}, secret_text()),  # type: ignore[arg-type]
    )
    output = forwarded_tool_output(llm.upstream.last)
    assert_no_secret(llm.upstream.last)
    assert "region = eu-west-1" in output  # the rest of the output is intact
    assert "[REDACTED:aws_access_key_id]" in output
    assert "[REDACTED:github_token]" in output
    assert "[REDACTED:slack_token]" in output
    assert redaction_counts(audit, agent, "files__read") == {
        "aws_access_key_id": 1,
        "github_token": 1,
        "slack_token": 1,
    }


def test_openai_json_tool_output_stays_json_with_secrets_redacted(
    llm: LLM, guard: Guard, agent: str
) -> None:
    llm.front.use(guard)
    document = {"deploy": {"tokens": [github_token(), "public"], "key": aws_key_id()}}
    client = openai_via_middleware(llm.guarded_url, agent)
    client.chat.completions.create(
        model="gpt-test",
        messages=openai_conversation(  # type: ignore[arg-type]
            USER, "files__read", {"path": "deploy.json"}, json.dumps(document)
        ),
    )
    forwarded = json.loads(forwarded_tool_output(llm.upstream.last))
    assert forwarded == {
        "deploy": {
            "tokens": ["[REDACTED:github_token]", "public"],
            "key": "[REDACTED:aws_access_key_id]",
        }
    }


async def test_openai_async_transport_redacts_the_tool_message(
    llm: LLM, guard: Guard, agent: str
) -> None:
    client = async_openai_via_transport(llm.url, guard, agent)
    await client.chat.completions.create(
        model="gpt-test",
        messages=openai_conversation(USER, "files__read", {"path": "deploy.env"}, secret_text()),  # type: ignore[arg-type]
    )
    await client.close()
    assert_no_secret(llm.upstream.last)
    assert "[REDACTED:slack_token]" in forwarded_tool_output(llm.upstream.last)


def test_openai_block_rule_replaces_the_output_with_the_placeholder(
    llm: LLM, guard: Guard, agent: str, audit: AuditLog
) -> None:
    llm.front.use(guard)
    client = openai_via_middleware(llm.guarded_url, agent)
    client.chat.completions.create(
        model="gpt-test",
        messages=openai_conversation(USER, "debug__dump", {}, "internal state: all fine"),  # type: ignore[arg-type]
    )
    assert forwarded_tool_output(llm.upstream.last) == BLOCKED_LLM
    assert "internal state" not in json.dumps(llm.upstream.last)
    assert [e.decision.effect for e in audit.results(agent)] == [Effect.BLOCK]


# ---------------------------------------------------------------- Anthropic


@pytest.mark.parametrize("shape", ["string", "blocks"])
def test_anthropic_tool_result_secrets_are_redacted_before_forwarding(
    llm: LLM, guard: Guard, agent: str, audit: AuditLog, shape: str
) -> None:
    llm.front.use(guard)
    output: Any = secret_text() if shape == "string" else [{"type": "text", "text": secret_text()}]
    client = anthropic_via_middleware(llm.guarded_url, agent)
    client.messages.create(
        model="claude-test",
        max_tokens=100,
        messages=anthropic_conversation(USER, "files__read", {"path": "deploy.env"}, output),  # type: ignore[arg-type]
    )
    forwarded = texts(forwarded_tool_output(llm.upstream.last))
    assert_no_secret(llm.upstream.last)
    assert "region = eu-west-1" in forwarded and "[REDACTED:github_token]" in forwarded
    assert redaction_counts(audit, agent, "files__read")["aws_access_key_id"] == 1


def test_anthropic_sync_transport_redacts_and_blocks(llm: LLM, guard: Guard, agent: str) -> None:
    client = anthropic_via_transport(llm.url, guard, agent)
    client.messages.create(
        model="claude-test",
        max_tokens=100,
        messages=anthropic_conversation(USER, "files__read", {"path": "deploy.env"}, secret_text()),  # type: ignore[arg-type]
    )
    assert_no_secret(llm.upstream.last)
    client.messages.create(
        model="claude-test",
        max_tokens=100,
        messages=anthropic_conversation(USER, "debug__dump", {}, f"env: {slack_token()}"),  # type: ignore[arg-type]
    )
    assert texts(forwarded_tool_output(llm.upstream.last)) == BLOCKED_LLM
    assert_no_secret(llm.upstream.last)


# ---------------------------------------------------------------- MCP


@pytest.mark.parametrize("reply", ["json", "sse"])
async def test_mcp_text_result_secrets_are_redacted(
    mcp_servers: MCPServers, guard: Guard, agent: str, audit: AuditLog, reply: str
) -> None:
    mcp_servers.front(reply).use(guard)
    async with mcp_client(mcp_servers.url(reply), agent) as client:
        result = await client.call_tool("read_config", {"path": "deploy.env"})
    text = text_of(result)
    assert not result.is_error
    assert_no_secret(text)
    assert "region = eu-west-1" in text and "[REDACTED:aws_access_key_id]" in text
    assert redaction_counts(audit, agent, "read_config") == {
        "aws_access_key_id": 1,
        "github_token": 1,
        "slack_token": 1,
    }


@pytest.mark.parametrize("reply", ["json", "sse"])
async def test_mcp_structured_result_secrets_are_redacted(
    mcp_servers: MCPServers, guard: Guard, agent: str, reply: str
) -> None:
    mcp_servers.front(reply).use(guard)
    async with mcp_client(mcp_servers.url(reply), agent) as client:
        result = await client.call_tool("read_settings", {})
    assert not result.is_error
    assert_no_secret(text_of(result))
    assert result.structured_content == {
        "region": "eu-west-1",
        "deploy_token": "[REDACTED:github_token]",
        "notify": {"slack": "[REDACTED:slack_token]"},
    }


@pytest.mark.parametrize("reply", ["json", "sse"])
async def test_mcp_block_rule_replaces_the_result_with_the_placeholder(
    mcp_servers: MCPServers, guard: Guard, agent: str, audit: AuditLog, reply: str
) -> None:
    mcp_servers.front(reply).use(guard)
    before = mcp_servers.calls["debug_dump"]
    async with mcp_client(mcp_servers.url(reply), agent) as client:
        result = await client.call_tool("debug_dump", {})
    assert mcp_servers.calls["debug_dump"] == before + 1  # the output, not the call, is blocked
    assert result.is_error
    assert text_of(result) == BLOCKED_MCP
    assert [e.decision.effect for e in audit.results(agent)] == [Effect.BLOCK]
