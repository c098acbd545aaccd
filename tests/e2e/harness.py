"""Shared pieces of the end-to-end tests: identities, audit log, a switchable front door.

The end-to-end tests drive real SDK clients (openai, anthropic, mcp) through
Bastion's front doors (``BastionMiddleware`` served by uvicorn, and the
``AsyncBastionTransport`` / ``BastionTransport``) to real upstreams on
127.0.0.1, and look at what the upstream received and what the audit hook saw.
"""

from __future__ import annotations

import importlib.util
import sys
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx2
from mcp.client import Client
from mcp.client.streamable_http import streamable_http_client

from bastion.adapters.asgi import BastionMiddleware
from bastion.adapters.pipeline import Guard
from bastion.errors import AuthError
from bastion.events import AuditEvent, Effect, EventKind, Identity

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

AGENT_HEADER = "x-agent"
GROUPS_HEADER = "x-groups"
ATTACKER = "attacker@evil.example"
BOB = "bob@corp.example"


def load_naive_model() -> ModuleType:
    """tests/quarantine/naive_model.py, loaded under a name of its own (that directory is
    not a package, and its conftest puts it on sys.path under the bare name)."""
    name = "e2e_naive_model"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, TESTS / "quarantine" / "naive_model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def identity_from_headers(headers: Mapping[str, str]) -> Identity:
    """``x-agent`` names the subject, ``x-groups`` (comma-separated) its groups."""
    subject = headers.get(AGENT_HEADER)
    if not subject:
        raise AuthError("no x-agent header")
    groups = tuple(g for g in headers.get(GROUPS_HEADER, "").split(",") if g)
    return Identity(subject=subject, groups=groups)


def new_agent(prefix: str = "agent") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@dataclass
class AuditLog:
    """Every AuditEvent handed to ``on_decision``."""

    events: list[AuditEvent] = field(default_factory=list)

    def __call__(self, event: AuditEvent) -> None:
        self.events.append(event)

    def of(self, subject: str) -> list[AuditEvent]:
        return [e for e in self.events if e.identity.subject == subject]

    def calls(self, subject: str) -> list[tuple[str, Effect]]:
        return [
            (e.target, e.decision.effect)
            for e in self.of(subject)
            if e.decision.kind is EventKind.CALL and "error" not in e.detail
        ]

    def results(self, subject: str) -> list[AuditEvent]:
        return [e for e in self.of(subject) if e.decision.kind is EventKind.RESULT]

    def errors(self, subject: str | None = None) -> list[AuditEvent]:
        events = self.events if subject is None else self.of(subject)
        return [e for e in events if "error" in e.detail]


class Front:
    """An ASGI app whose guard can be swapped between tests, so one uvicorn server
    per upstream serves every test (each test installs the guard it needs)."""

    def __init__(self, upstream: Any) -> None:
        self.upstream = upstream
        self.app: Any = upstream

    def use(self, guard: Guard) -> Guard:
        self.app = BastionMiddleware(self.upstream, guard=guard)
        return guard

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


@asynccontextmanager
async def mcp_client(
    url: str,
    agent: str,
    *,
    mode: str = "legacy",
    headers: Mapping[str, str] | None = None,
    timeout: float = 10,
) -> AsyncIterator[Client]:
    """The real mcp client on ``{url}/mcp`` as ``agent``."""
    async with (
        httpx2.AsyncClient(
            headers={AGENT_HEADER: agent, **(headers or {})}, timeout=timeout
        ) as http,
        Client(streamable_http_client(f"{url}/mcp", http_client=http), mode=mode) as client,  # type: ignore[arg-type]
    ):
        yield client


def text_of(result: Any) -> str:
    return "\n".join(getattr(block, "text", "") for block in result.content)


# Secret samples are assembled at run time so that no secret-looking literal sits
# in the repository (scanners would flag it; a reader could mistake it for real).
def aws_key_id() -> str:
    return "AKIA" + "QX7V" + "2J5L" + "K3NP" + "RT4Z"


def github_token() -> str:
    return "gh" + "p_" + "a1B2c3D4" * 4 + "e5F6"


def slack_token() -> str:
    return "xo" + "xb-" + "1234567890" + "-" + "abcdefGHIJKL" + "mnop"


def secret_text() -> str:
    """A configuration file with three kinds of secrets in it."""
    return (
        "region = eu-west-1\n"
        f"aws_access_key_id = {aws_key_id()}\n"
        f"github = {github_token()}\n"
        f"slack = {slack_token()}\n"
    )


def structured_secret() -> dict[str, Any]:
    return {
        "region": "eu-west-1",
        "deploy_token": github_token(),
        "notify": {"slack": slack_token()},
    }


def all_secrets() -> tuple[str, ...]:
    return (aws_key_id(), github_token(), slack_token())
