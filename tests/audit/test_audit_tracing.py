"""OpenTelemetry spans with GenAI attribute names, checked with the SDK's in-memory exporter."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from bastion.audit.tracing import BastionTracer, NoopTracer, bastion_tracer
from bastion.events import Decision, Effect, EventKind, RequestInfo

from .conftest import ALICE


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def tracer(exporter: InMemorySpanExporter) -> BastionTracer:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return BastionTracer(provider)


def test_a_guarded_request_has_identity_decision_and_quarantine_children(
    tracer: BastionTracer, exporter: InMemorySpanExporter
) -> None:
    request = RequestInfo(method="POST", path="/v1/chat/completions")
    forbid = Decision(kind=EventKind.CALL, effect=Effect.FORBID, rule_ids=("no-exfil",))
    with tracer.request(
        protocol="openai", operation="chat", model="gpt-4o", provider="openai", request=request
    ):
        with tracer.identity() as span:
            span.set_identity(ALICE)
        with tracer.quarantine(tool="web__fetch", model="gpt-4o-mini", provider="openai"):
            pass
        with tracer.decision(EventKind.CALL, "mail__send", call_id="call_1") as span:
            span.set_decision(forbid)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    root = spans["chat gpt-4o"]
    assert root.kind == SpanKind.SERVER
    assert root.attributes is not None
    assert root.attributes["gen_ai.operation.name"] == "chat"
    assert root.attributes["gen_ai.request.model"] == "gpt-4o"
    assert root.attributes["gen_ai.provider.name"] == "openai"
    assert root.attributes["bastion.request.id"] == request.id
    children = [spans["bastion.identity"], spans["bastion.quarantine web__fetch"],
                spans["bastion.decide call mail__send"]]  # fmt: skip
    assert all(c.parent is not None and c.parent.span_id == root.context.span_id for c in children)
    assert all(c.context.trace_id == root.context.trace_id for c in children)


def test_decision_span_carries_tool_and_bastion_attributes(
    tracer: BastionTracer, exporter: InMemorySpanExporter
) -> None:
    decision = Decision(
        kind=EventKind.CALL,
        effect=Effect.FORBID,
        rule_ids=("no-exfil", "no-pii"),
        reasons=("recipient came from a web page",),
    )
    with tracer.decision(EventKind.CALL, "mail__send", call_id="call_1") as span:
        span.set_decision(decision)
    (finished,) = exporter.get_finished_spans()
    attributes = dict(finished.attributes or {})
    assert attributes["gen_ai.operation.name"] == "execute_tool"
    assert attributes["gen_ai.tool.name"] == "mail__send"
    assert attributes["gen_ai.tool.call.id"] == "call_1"
    assert attributes["bastion.decision.effect"] == "forbid"
    assert attributes["bastion.decision.rule_ids"] == ("no-exfil", "no-pii")
    assert attributes["bastion.decision.reason"] == "recipient came from a web page"
    assert finished.status.status_code == StatusCode.UNSET


def test_model_decision_names_the_requested_model(
    tracer: BastionTracer, exporter: InMemorySpanExporter
) -> None:
    with tracer.decision(EventKind.MODEL, "claude-sonnet-4") as span:
        span.set_decision(Decision(kind=EventKind.MODEL, effect=Effect.ALLOW, route="anthropic"))
    (finished,) = exporter.get_finished_spans()
    attributes = dict(finished.attributes or {})
    assert attributes["gen_ai.request.model"] == "claude-sonnet-4"
    assert "gen_ai.tool.name" not in attributes
    assert attributes["bastion.decision.route"] == "anthropic"


def test_mcp_request_span_uses_mcp_attributes(
    tracer: BastionTracer, exporter: InMemorySpanExporter
) -> None:
    with tracer.request(
        protocol="mcp", operation="tools/call", session="s-1", mcp_method="tools/call"
    ):
        pass
    (finished,) = exporter.get_finished_spans()
    attributes = dict(finished.attributes or {})
    assert attributes["mcp.method.name"] == "tools/call"
    assert attributes["mcp.session.id"] == "s-1"
    assert "gen_ai.conversation.id" not in attributes


def test_an_exception_inside_a_span_is_recorded_as_an_error(
    tracer: BastionTracer, exporter: InMemorySpanExporter
) -> None:
    with pytest.raises(RuntimeError), tracer.quarantine(tool="web__fetch"):
        raise RuntimeError("quarantine model timed out")
    (finished,) = exporter.get_finished_spans()
    assert finished.status.status_code == StatusCode.ERROR
    assert finished.events[0].name == "exception"


def test_set_error_marks_the_span_failed(
    tracer: BastionTracer, exporter: InMemorySpanExporter
) -> None:
    with tracer.identity() as span:
        span.set_error("jwks endpoint unreachable")
    (finished,) = exporter.get_finished_spans()
    assert finished.status.status_code == StatusCode.ERROR
    assert finished.status.description == "jwks endpoint unreachable"


def test_disabled_tracing_records_nothing_and_returns_one_shared_span() -> None:
    tracer = bastion_tracer(enabled=False)
    assert isinstance(tracer, NoopTracer)
    first = tracer.request(protocol="openai", operation="chat")
    with first as span:
        span.set_decision(Decision(kind=EventKind.CALL, effect=Effect.ALLOW))
        span.set_identity(ALICE)
    assert tracer.decision(EventKind.CALL, "x") is first
