"""OpenTelemetry spans of guarded requests, read back from the SDK's in-memory exporter."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from servers.llm import Call, ScriptedLLM
from servers.serving import running

from bastion import Identity, Policy
from bastion.adapters.asgi import BastionMiddleware
from bastion.adapters.transport import AsyncBastionTransport, BastionTransport
from bastion.audit.tracing import bastion_tracer

POLICY = """
default call allow
default model allow
default result trusted
@id("no-delete")
forbid call "delete_repo" reason "never"
"""
ASK: Any = [{"role": "user", "content": "clean up"}]


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def tracer(exporter: InMemorySpanExporter) -> Any:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return bastion_tracer(provider)


@pytest.fixture
def llm() -> ScriptedLLM:
    upstream = ScriptedLLM()
    upstream.reply("", Call("c1", "delete_repo", {"repo": "x"}), Call("c2", "list_repos", {}))
    return upstream


def options(tracer: Any) -> dict[str, Any]:
    return {
        "policy": Policy.from_source(POLICY),
        "identity": Identity("alice", groups=("eng",)),
        "tracer": tracer,
    }


def by_name(spans: tuple[ReadableSpan, ...], prefix: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name.startswith(prefix)]


def check_tree(spans: tuple[ReadableSpan, ...], request_kind: SpanKind) -> None:
    (request,) = [s for s in spans if s.name == "chat"]
    assert request.kind == request_kind
    assert request.attributes is not None
    assert request.attributes["gen_ai.operation.name"] == "chat"
    assert request.attributes["bastion.protocol"] == "openai"
    identity = by_name(spans, "bastion.identity")
    assert identity and identity[0].attributes is not None
    calls = {s.name: s for s in by_name(spans, "bastion.decide call")}
    assert set(calls) == {"bastion.decide call delete_repo", "bastion.decide call list_repos"}
    denied = calls["bastion.decide call delete_repo"].attributes
    assert denied is not None
    assert denied["gen_ai.tool.name"] == "delete_repo"
    assert denied["gen_ai.tool.call.id"] == "c1"
    assert denied["bastion.decision.effect"] == "forbid"
    assert "no-delete" in denied["bastion.decision.rule_ids"]
    allowed = calls["bastion.decide call list_repos"].attributes
    assert allowed is not None and allowed["bastion.decision.effect"] == "allow"
    assert request.context is not None
    for child in [*identity, *calls.values()]:
        assert child.context is not None and child.parent is not None
        assert child.context.trace_id == request.context.trace_id
        assert child.parent.span_id == request.context.span_id


def test_middleware_opens_a_server_span_with_identity_and_decision_children(
    llm: ScriptedLLM, tracer: Any, exporter: InMemorySpanExporter
) -> None:
    app = BastionMiddleware(llm.app, **options(tracer))
    with running(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0)
        answer = client.chat.completions.create(model="m", messages=ASK)
    assert [c.function.name for c in answer.choices[0].message.tool_calls or []] == ["list_repos"]
    check_tree(exporter.get_finished_spans(), SpanKind.SERVER)


async def test_async_transport_opens_a_client_span_with_the_same_children(
    llm: ScriptedLLM, tracer: Any, exporter: InMemorySpanExporter
) -> None:
    with running(llm.app) as url:
        transport = AsyncBastionTransport(httpx.AsyncHTTPTransport(), **options(tracer))
        async with httpx.AsyncClient(transport=transport) as http:
            client = openai.AsyncOpenAI(
                base_url=f"{url}/v1", api_key="k", max_retries=0, http_client=http
            )
            await client.chat.completions.create(model="m", messages=ASK)
    check_tree(exporter.get_finished_spans(), SpanKind.CLIENT)


def test_sync_transport_children_join_the_callers_trace_across_its_loop_thread(
    llm: ScriptedLLM, tracer: Any, exporter: InMemorySpanExporter
) -> None:
    with running(llm.app) as url:
        transport = BastionTransport(httpx.HTTPTransport(), **options(tracer))
        with httpx.Client(transport=transport) as http:
            client = openai.OpenAI(
                base_url=f"{url}/v1", api_key="k", max_retries=0, http_client=http
            )
            client.chat.completions.create(model="m", messages=ASK)
    check_tree(exporter.get_finished_spans(), SpanKind.CLIENT)


def test_without_a_tracer_no_span_is_recorded(
    llm: ScriptedLLM, exporter: InMemorySpanExporter
) -> None:
    app = BastionMiddleware(llm.app, **{**options(None), "tracer": None})
    with running(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0)
        client.chat.completions.create(model="m", messages=ASK)
    assert exporter.get_finished_spans() == ()


@pytest.fixture(autouse=True)
def _no_leftover_spans(exporter: InMemorySpanExporter) -> Iterator[None]:
    yield
    exporter.clear()
