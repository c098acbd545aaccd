"""audit_all=True: one audit record per decision, non-events included."""

from __future__ import annotations

from typing import Any

import openai
from servers.llm import ScriptedLLM
from servers.serving import running

from bastion import AuditEvent, Effect, EventKind, Identity, Policy
from bastion.adapters.asgi import BastionMiddleware

POLICY = """
default call allow
default model allow
default result trusted
hide tool "admin_*"
"""
TOOLS: Any = [
    {"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
    for n in ("get_weather", "admin_reset")
]
MESSAGES: Any = [
    {"role": "user", "content": "weather?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
        ],
    },
    {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
]


def events_for(audit_all: bool) -> list[AuditEvent]:
    events: list[AuditEvent] = []
    llm = ScriptedLLM()
    llm.reply("it is sunny")
    app = BastionMiddleware(
        llm.app,
        policy=Policy.from_source(POLICY),
        identity=Identity("alice"),
        on_decision=events.append,
        audit_all=audit_all,
    )
    with running(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0)
        client.chat.completions.create(model="m", messages=MESSAGES, tools=TOOLS)
    return events


def kinds(events: list[AuditEvent]) -> set[tuple[EventKind, str, Effect]]:
    return {(e.decision.kind, e.target, e.decision.effect) for e in events}


def test_by_default_shown_tools_and_trusted_output_are_not_recorded() -> None:
    seen = kinds(events_for(audit_all=False))
    assert (EventKind.VISIBILITY, "admin_reset", Effect.HIDE) in seen
    assert (EventKind.VISIBILITY, "get_weather", Effect.SHOW) not in seen
    assert (EventKind.RESULT, "get_weather", Effect.TRUSTED) not in seen


def test_audit_all_records_every_decision_once() -> None:
    events = events_for(audit_all=True)
    seen = kinds(events)
    assert (EventKind.VISIBILITY, "admin_reset", Effect.HIDE) in seen
    assert (EventKind.VISIBILITY, "get_weather", Effect.SHOW) in seen
    assert (EventKind.RESULT, "get_weather", Effect.TRUSTED) in seen
    targets = [(e.decision.kind, e.target) for e in events]
    assert len(targets) == len(set(targets))  # exactly one record per decision
