"""Dynamic tools and initial trust end to end: a contractor's conversation starts
untrusted, so sensitive tools are hidden from the very first tools list and
forbidden if called anyway; an employee's is unaffected."""

from __future__ import annotations

import pytest
from servers.llm import Call

from bastion.adapters.pipeline import Guard
from bastion.events import Effect, EventKind
from bastion.policy import Policy

from .conftest import LLM
from .harness import BOB, AuditLog, identity_from_headers, mcp_client, new_agent, text_of
from .llm_clients import (
    anthropic_tools,
    anthropic_via_middleware,
    forwarded_tool_names,
    openai_tools,
    openai_via_middleware,
)
from .mcp_servers import MCPServers

POLICY = """
default call allow
default result trusted
default model allow

tools sensitive = ["send_email", "files__read"]

@id("contractors-untrusted")
untrusted context when identity.groups has "contractors"

@id("sensitive-needs-trust")
forbid call sensitive when context.tainted reason "sensitive tools are off in untrusted contexts"
"""

TOOLS = ("calendar__list", "files__read", "send_email")
USER = [{"role": "user", "content": f"What is on my calendar? Then mail it to {BOB}."}]
MAIL = Call("call_1", "send_email", {"to": BOB, "body": "calendar"})


@pytest.fixture(scope="module")
def policy() -> Policy:
    return Policy.from_source(POLICY)


@pytest.fixture
def guard(policy: Policy, audit: AuditLog) -> Guard:
    return Guard(policy, identity=identity_from_headers, on_decision=audit)


def test_contractors_first_tools_list_lacks_the_sensitive_tools(
    llm: LLM, guard: Guard, audit: AuditLog
) -> None:
    llm.front.use(guard)
    agent = new_agent("contractor")
    client = openai_via_middleware(llm.guarded_url, agent, "contractors")
    client.chat.completions.create(model="gpt-test", messages=USER, tools=openai_tools(*TOOLS))  # type: ignore[arg-type]
    assert forwarded_tool_names(llm.upstream.last) == ["calendar__list"]
    context = [e for e in audit.of(agent) if e.decision.kind is EventKind.CONTEXT]
    assert [e.decision.effect for e in context] == [Effect.UNTRUSTED]
    hidden = sorted(e.target for e in audit.of(agent) if e.decision.effect is Effect.HIDE)
    assert hidden == ["files__read", "send_email"]


def test_contractors_call_to_a_hidden_tool_is_refused(
    llm: LLM, guard: Guard, audit: AuditLog
) -> None:
    llm.front.use(guard)
    llm.upstream.reply("", MAIL)
    agent = new_agent("contractor")
    client = openai_via_middleware(llm.guarded_url, agent, "contractors")
    completion = client.chat.completions.create(
        model="gpt-test",
        messages=USER,
        tools=openai_tools(*TOOLS),  # type: ignore[arg-type]
    )
    message = completion.choices[0].message
    assert not message.tool_calls
    assert "sensitive tools are off in untrusted contexts" in (message.content or "")
    assert audit.calls(agent) == [("send_email", Effect.FORBID)]


def test_employees_clean_conversation_keeps_every_tool(
    llm: LLM, guard: Guard, audit: AuditLog
) -> None:
    llm.front.use(guard)
    llm.upstream.reply("", MAIL)
    agent = new_agent("employee")
    client = openai_via_middleware(llm.guarded_url, agent, "staff")
    completion = client.chat.completions.create(
        model="gpt-test",
        messages=USER,
        tools=openai_tools(*TOOLS),  # type: ignore[arg-type]
    )
    assert forwarded_tool_names(llm.upstream.last) == list(TOOLS)
    assert [c.function.name for c in completion.choices[0].message.tool_calls or []] == [
        "send_email"
    ]  # type: ignore[union-attr]
    assert audit.calls(agent) == [("send_email", Effect.ALLOW)]


def test_anthropic_contractors_first_tools_list_lacks_the_sensitive_tools(
    llm: LLM, guard: Guard
) -> None:
    llm.front.use(guard)
    client = anthropic_via_middleware(llm.guarded_url, new_agent("contractor"), "contractors")
    client.messages.create(
        model="claude-test",
        max_tokens=100,
        messages=USER,
        tools=anthropic_tools(*TOOLS),  # type: ignore[arg-type]
    )
    assert forwarded_tool_names(llm.upstream.last) == ["calendar__list"]


@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
async def test_mcp_contractors_session_starts_untrusted(
    mcp_servers: MCPServers, guard: Guard, mode: str
) -> None:
    mcp_servers.front("json").use(guard)
    before = mcp_servers.calls["send_email"]
    async with mcp_client(
        mcp_servers.url("json"),
        new_agent("contractor"),
        mode=mode,
        headers={"x-groups": "contractors"},
    ) as client:
        names = [t.name for t in (await client.list_tools()).tools]
        assert "send_email" not in names and "fetch_page" in names
        refused = await client.call_tool("send_email", {"to": BOB, "body": "x"})
    assert refused.is_error
    assert "sensitive tools are off in untrusted contexts" in text_of(refused)
    assert mcp_servers.calls["send_email"] == before
