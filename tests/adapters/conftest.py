"""Fixtures for the adapter tests: real servers on 127.0.0.1, shared per session.

``serve`` serves any ASGI app for one test. The front-door tests share one
scripted LLM upstream and MCP servers (plain and behind ``BastionMiddleware``)
for the whole session; each test uses its own identity (``agent`` fixture) so
session state such as MCP taint and approvals never leaks between tests.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from servers.llm import ScriptedLLM
from servers.mcp_server import build_mcp_server
from servers.serving import running

from bastion.adapters.asgi import BastionMiddleware
from bastion.adapters.pipeline import Guard
from bastion.errors import AuthError
from bastion.events import AuditEvent, Identity
from bastion.policy import Policy

POLICY = """
default call allow
default result trusted
default model allow

tools sensitive = ["send_email", "transfer"]

@id("no-delete")
forbid call "delete_repo" reason "agents never delete repositories"
@id("no-send-after-taint")
forbid call sensitive when context.tainted reason "outward actions are blocked after untrusted content"
@id("admins-only")
hide tool "admin_reset" unless identity.groups has "admin"
@id("big-transfers")
ask call "transfer" when args.amount > 100 reason "large transfers need approval"
@id("no-legacy")
forbid model "legacy-*" reason "legacy models are retired"
@id("inbox-untrusted")
untrusted result "read_inbox" at ["body", "subject"]
@id("web-untrusted")
untrusted result "web_fetch"
@id("secrets")
redact result * using ["secrets"]
@id("debug-blocked")
block result "debug_dump" reason "debug output never reaches the model"
"""

AGENT_HEADER = "x-agent"


def identity_from_headers(headers: Mapping[str, str]) -> Identity:
    """Test identity source: the ``x-agent`` header names the subject (``root`` is an admin)."""
    subject = headers.get(AGENT_HEADER)
    if not subject:
        raise AuthError("no x-agent header")
    return Identity(subject=subject, groups=("admin",) if subject.startswith("root") else ())


@dataclass
class AuditLog:
    """Every AuditEvent the guards handed to ``on_decision``."""

    events: list[AuditEvent] = field(default_factory=list)

    def __call__(self, event: AuditEvent) -> None:
        self.events.append(event)

    def for_subject(self, subject: str) -> list[AuditEvent]:
        return [e for e in self.events if e.identity.subject == subject]

    def errors(self) -> list[str]:
        return [str(e.detail["error"]) for e in self.events if "error" in e.detail]


@pytest.fixture
def serve() -> Callable[[Any], Any]:
    return running


@pytest.fixture(scope="session")
def policy() -> Policy:
    return Policy.from_source(POLICY)


@pytest.fixture(scope="session")
def audit_log() -> AuditLog:
    return AuditLog()


@pytest.fixture
def audit(audit_log: AuditLog) -> AuditLog:
    audit_log.events.clear()
    return audit_log


@pytest.fixture(scope="session")
def make_guard(policy: Policy, audit_log: AuditLog) -> Callable[..., Guard]:
    def make(**options: Any) -> Guard:
        options.setdefault("identity", identity_from_headers)
        options.setdefault("on_decision", audit_log)
        return Guard(policy, **options)

    return make


@pytest.fixture
def agent() -> str:
    """A fresh subject for this test (session state is per identity)."""
    return f"agent-{uuid.uuid4().hex[:10]}"


@dataclass
class Upstreams:
    llm: ScriptedLLM
    llm_url: str  # the upstream itself, for the transports
    guarded_llm_url: str  # the same upstream behind BastionMiddleware
    guard: Guard  # the middleware's guard
    mcp_url: str  # a plain MCP server (JSON replies), for the transports
    mcp_calls: Any
    guarded_mcp_url: str  # another MCP server (SSE replies) behind BastionMiddleware
    guarded_mcp_calls: Any


@pytest.fixture(scope="session")
def upstreams(make_guard: Callable[..., Guard]) -> Iterator[Upstreams]:
    llm = ScriptedLLM()
    guard = make_guard()
    plain_mcp, plain_calls = build_mcp_server()
    guarded_mcp, guarded_calls = build_mcp_server()
    with (
        running(llm.app) as llm_url,
        running(BastionMiddleware(llm.app, guard=guard)) as guarded_llm_url,
        running(plain_mcp.streamable_http_app(json_response=True)) as mcp_url,
        running(
            BastionMiddleware(guarded_mcp.streamable_http_app(), guard=guard)
        ) as guarded_mcp_url,
    ):
        yield Upstreams(
            llm,
            llm_url,
            guarded_llm_url,
            guard,
            mcp_url,
            plain_calls,
            guarded_mcp_url,
            guarded_calls,
        )
