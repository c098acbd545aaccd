"""Two Bastion instances on one real Redis share MCP taint, approvals and limits;
with Redis unreachable, requests through the front doors fail closed.

The cluster: one MCP server; instances A and B, each ``BastionMiddleware`` with
its own ``RedisStore`` (same Redis, same prefix) in front of a proxy to that
server; a load balancer the test points at A or B between requests, so one real
``mcp`` client session crosses instances; and the approval API as a separate app
over the same Redis.
"""

from __future__ import annotations

import re
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
from mcp import MCPError
from mcp.server.mcpserver import MCPServer
from servers.llm import Call
from servers.serving import running
from session.conftest import RedisServer, free_port
from starlette.applications import Starlette
from starlette.requests import Request

from bastion.adapters.asgi import BastionMiddleware
from bastion.adapters.pipeline import Guard
from bastion.events import Effect, Identity
from bastion.policy import Policy
from bastion.session import ApprovalService, RedisStore, SessionServices, approval_routes

from .conftest import LLM
from .harness import AuditLog, identity_from_headers, mcp_client, new_agent, text_of
from .llm_clients import openai_via_middleware
from .mcp_servers import MCPServers, build_tool_server
from .proxy import Proxy

POLICY = """
default call allow
default result trusted
default model allow

@id("pages-untrusted")
untrusted result "fetch_page"

@id("no-mail-when-tainted")
forbid call "send_email" when context.tainted reason "no e-mail after reading untrusted content"

@id("payments-approved")
ask call "transfer" reason "payments need a human's approval"

@id("settings-limit")
limit call "read_settings" to 3 per 1h

@id("token-budget")
limit model * to 100000 tokens per day
"""

TAINT_REASON = "no e-mail after reading untrusted content"
IBAN = "DE89370400440532013000"
APPROVER = "boss"


@pytest.fixture(scope="module")
def policy() -> Policy:
    return Policy.from_source(POLICY)


@dataclass
class Cluster:
    calls: Counter[str]
    a_url: str
    b_url: str
    audit_a: AuditLog
    audit_b: AuditLog
    balancer: Proxy
    url: str  # the load balancer
    approvals_url: str

    def via(self, instance: str) -> None:
        """Send the next requests through instance ``a`` or ``b``."""
        self.balancer.target = self.a_url if instance == "a" else self.b_url

    def session_headers(self) -> dict[str, str]:
        """The MCP session id and protocol version of the client's latest request."""
        last = self.balancer.seen[-1]
        return {k: last[k] for k in ("mcp-session-id", "mcp-protocol-version") if k in last}


def instance(policy: Policy, redis_url: str, prefix: str, audit: AuditLog, upstream: str) -> Any:
    store = RedisStore(redis_url, prefix=prefix, timeout=1.0)
    guard = Guard(
        policy,
        identity=identity_from_headers,
        session=SessionServices.over(store),
        on_decision=audit,
    )
    return BastionMiddleware(Proxy(upstream), guard=guard)


def approvals_app(redis_url: str, prefix: str) -> Starlette:
    service = ApprovalService(RedisStore(redis_url, prefix=prefix, timeout=1.0))

    def approver(request: Request) -> Identity:
        return Identity(request.headers["x-approver"])

    return Starlette(
        routes=approval_routes(
            service,
            resolve_identity=approver,
            authorize=lambda who, approval: who.subject == APPROVER,
        )
    )


@pytest.fixture(scope="module")
def cluster(policy: Policy, redis: RedisServer) -> Iterator[Cluster]:
    calls: Counter[str] = Counter()
    server: MCPServer = build_tool_server("", {}, calls)
    prefix = f"e2e-{uuid.uuid4().hex}:"
    audit_a, audit_b = AuditLog(), AuditLog()
    with ExitStack() as stack:
        upstream = stack.enter_context(running(server.streamable_http_app(json_response=True)))
        a_url = stack.enter_context(running(instance(policy, redis.url, prefix, audit_a, upstream)))
        b_url = stack.enter_context(running(instance(policy, redis.url, prefix, audit_b, upstream)))
        balancer = Proxy(a_url)
        url = stack.enter_context(running(balancer))
        approvals_url = stack.enter_context(running(approvals_app(redis.url, prefix)))
        yield Cluster(calls, a_url, b_url, audit_a, audit_b, balancer, url, approvals_url)


def jsonrpc(cluster: Cluster, method: str, params: dict[str, Any], **headers: str) -> Any:
    response = httpx.post(
        f"{cluster.b_url}/mcp",
        json={"jsonrpc": "2.0", "id": 41, "method": method, "params": params},
        headers={
            "accept": "application/json, text/event-stream",
            "content-type": "application/json",
            **headers,
        },
        timeout=10,
    )
    assert response.status_code == 200, response.text
    return response.json()


# ---------------------------------------------------------------- taint


async def test_session_taint_set_through_one_instance_holds_on_the_other(
    cluster: Cluster,
) -> None:
    agent = new_agent()
    sent_before = cluster.calls["send_email"]
    async with mcp_client(cluster.url, agent) as client:
        cluster.via("a")
        await client.call_tool("fetch_page", {"url": "https://evil.example/page"})
        cluster.via("b")
        names = [t.name for t in (await client.list_tools()).tools]
        refused = await client.call_tool("send_email", {"to": "bob@corp.example", "body": "x"})
    assert "send_email" not in names and "fetch_page" in names
    assert refused.is_error and TAINT_REASON in text_of(refused)
    assert cluster.calls["send_email"] == sent_before
    assert cluster.audit_b.calls(agent) == [("send_email", Effect.FORBID)]


async def test_session_taint_does_not_reach_another_identity_with_the_same_session_id(
    cluster: Cluster,
) -> None:
    agent, other = new_agent(), new_agent("other")
    async with mcp_client(cluster.url, agent) as client:
        cluster.via("a")
        await client.call_tool("fetch_page", {"url": "https://evil.example/page"})
        session = cluster.session_headers()
        assert "mcp-session-id" in session
        sent_before = cluster.calls["send_email"]
        listed = jsonrpc(cluster, "tools/list", {}, **session, **{"x-agent": other})
        called = jsonrpc(
            cluster,
            "tools/call",
            {"name": "send_email", "arguments": {"to": "bob@corp.example", "body": "x"}},
            **session,
            **{"x-agent": other},
        )
        # ...while the tainted identity itself is still refused on that session.
        cluster.via("b")
        refused = await client.call_tool("send_email", {"to": "bob@corp.example", "body": "x"})
    assert "send_email" in [t["name"] for t in listed["result"]["tools"]]
    assert not called["result"].get("isError")
    assert cluster.calls["send_email"] == sent_before + 1
    assert refused.is_error


# ---------------------------------------------------------------- approvals


async def test_approval_created_on_one_instance_is_consumed_once_on_the_other(
    cluster: Cluster,
) -> None:
    agent = new_agent()
    args = {"to": IBAN, "amount": 500}
    before = cluster.calls["transfer"]
    async with mcp_client(cluster.url, agent) as client, httpx.AsyncClient() as api:
        cluster.via("a")
        pending = await client.call_tool("transfer", args)
        assert pending.is_error and cluster.calls["transfer"] == before
        match = re.search(r"approval id ([A-Za-z0-9_-]+)\)", text_of(pending))
        assert match, text_of(pending)
        approval_id = match.group(1)
        # The agent cannot approve its own call; the approver can.
        denied = await api.post(
            f"{cluster.approvals_url}/approvals/{approval_id}/approve",
            headers={"x-approver": agent},
        )
        assert denied.status_code == 403
        approved = await api.post(
            f"{cluster.approvals_url}/approvals/{approval_id}/approve",
            headers={"x-approver": APPROVER},
        )
        assert approved.status_code == 200, approved.text
        cluster.via("b")
        changed = await client.call_tool("transfer", {"to": IBAN, "amount": 5000})
        assert changed.is_error and cluster.calls["transfer"] == before
        done = await client.call_tool("transfer", args)
        assert not done.is_error and cluster.calls["transfer"] == before + 1
        cluster.via("a")
        again = await client.call_tool("transfer", args)
    assert again.is_error and "approval id" in text_of(again)
    assert cluster.calls["transfer"] == before + 1
    consumed = [
        e.detail.get("approval") for e in cluster.audit_b.of(agent) if e.target == "transfer"
    ]
    assert consumed.count("consumed") == 1
    assert all(e.detail.get("approval") != "consumed" for e in cluster.audit_a.of(agent))


# ---------------------------------------------------------------- limits


async def test_call_limit_is_counted_across_both_instances(cluster: Cluster) -> None:
    agent = new_agent()
    before = cluster.calls["read_settings"]
    results = []
    async with mcp_client(cluster.url, agent) as client:
        for target in ("a", "b", "a", "b", "a"):
            cluster.via(target)
            results.append((await client.call_tool("read_settings", {})).is_error)
    assert results == [False, False, False, True, True]
    assert cluster.calls["read_settings"] == before + 3
    refused = [e for e in cluster.audit_b.of(agent) if e.decision.effect is Effect.FORBID]
    assert [e.decision.rule_ids for e in refused] == [("settings-limit",)]
    assert refused[0].detail["limit"]


# ---------------------------------------------------------------- Redis unreachable


def dead_store_guard(policy: Policy, audit: AuditLog, url: str) -> Guard:
    return Guard(
        policy,
        identity=identity_from_headers,
        session=SessionServices.over(RedisStore(url, prefix="e2e-dead:", timeout=0.5)),
        on_decision=audit,
    )


def closed_port_url() -> str:
    return f"redis://127.0.0.1:{free_port()}/0"


def assert_store_failure_audited(audit: AuditLog, agent: str) -> None:
    errors = audit.errors(agent)
    assert errors, "the store failure was not audited"
    assert all(e.decision.effect is Effect.FORBID for e in errors)
    assert errors[0].detail["error"] == "store_unavailable"


async def test_mcp_call_fails_closed_when_redis_is_unreachable(
    mcp_servers: MCPServers, policy: Policy, audit: AuditLog
) -> None:
    agent = new_agent()
    mcp_servers.front("json").use(dead_store_guard(policy, audit, closed_port_url()))
    before = mcp_servers.calls["send_email"]
    async with mcp_client(mcp_servers.url("json"), agent, timeout=5) as client:
        with pytest.raises(MCPError) as raised:
            await client.call_tool("send_email", {"to": "bob@corp.example", "body": "x"})
    assert "store" in str(raised.value).lower()
    assert mcp_servers.calls["send_email"] == before
    assert_store_failure_audited(audit, agent)


def test_llm_request_fails_closed_with_503_when_redis_is_unreachable(
    llm: LLM, policy: Policy, audit: AuditLog
) -> None:
    agent = new_agent()
    llm.front.use(dead_store_guard(policy, audit, closed_port_url()))
    llm.upstream.reply("", Call("call_1", "transfer", {"to": IBAN, "amount": 5}))
    client = openai_via_middleware(llm.guarded_url, agent)
    with pytest.raises(openai.APIStatusError) as raised:
        client.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "pay the invoice"}]
        )
    assert raised.value.status_code == 503
    assert llm.upstream.requests == []  # nothing was forwarded unchecked
    assert_store_failure_audited(audit, agent)


async def test_mcp_fails_closed_when_redis_dies_mid_session(
    mcp_servers: MCPServers, policy: Policy, audit: AuditLog, own_redis: RedisServer
) -> None:
    agent = new_agent()
    mcp_servers.front("json").use(dead_store_guard(policy, audit, own_redis.url))
    before = mcp_servers.calls["send_email"]
    async with mcp_client(mcp_servers.url("json"), agent, timeout=5) as client:
        await client.call_tool("fetch_page", {"url": "https://evil.example/page"})
        own_redis.stop()
        with pytest.raises(MCPError) as raised:
            await client.call_tool("send_email", {"to": "bob@corp.example", "body": "x"})
    assert "store" in str(raised.value).lower()
    assert mcp_servers.calls["send_email"] == before
    assert_store_failure_audited(audit, agent)
