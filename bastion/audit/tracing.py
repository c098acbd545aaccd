"""OpenTelemetry spans for guarded requests (extra ``[otel]``; only the API is needed).

The adapters open one span per guarded request and child spans for identity,
each policy decision and each quarantine exchange::

    tracer = bastion_tracer()            # a no-op tracer when opentelemetry is absent
    with tracer.request(protocol="openai", operation="chat", model="gpt-4o") as span:
        with tracer.identity() as s:
            s.set_identity(identity)
        with tracer.decision(EventKind.CALL, "github__create_issue", call_id="c1") as s:
            s.set_decision(decision)

Attribute names follow the OpenTelemetry GenAI semantic conventions
(``gen_ai.operation.name``, ``gen_ai.request.model``, ``gen_ai.provider.name``,
``gen_ai.tool.name``, ``gen_ai.tool.call.id``, ``gen_ai.conversation.id``) and,
for MCP, ``mcp.method.name`` / ``mcp.session.id``; Bastion's own facts are
``bastion.*`` (``bastion.decision.effect``, ``bastion.decision.rule_ids``...).
A denial is not an error: the span status is left unset; exceptions are recorded.
"""

from __future__ import annotations

import importlib.metadata
from types import TracebackType
from typing import Any, Literal, Protocol

from bastion.events import Decision, EventKind, Identity, RequestInfo

__all__ = ["BastionTracer", "NoopTracer", "SpanHandle", "bastion_tracer"]

INSTRUMENTATION_NAME = "bastion"

SpanKindName = Literal["internal", "server", "client"]


class SpanHandle(Protocol):
    """What the adapters may do with an open span."""

    def set(self, key: str, value: Any) -> None: ...

    def set_identity(self, identity: Identity) -> None: ...

    def set_decision(self, decision: Decision) -> None: ...

    def set_error(self, error: BaseException | str) -> None: ...

    def __enter__(self) -> SpanHandle: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class _NoopSpan:
    __slots__ = ()

    def set(self, key: str, value: Any) -> None:
        pass

    def set_identity(self, identity: Identity) -> None:
        pass

    def set_decision(self, decision: Decision) -> None:
        pass

    def set_error(self, error: BaseException | str) -> None:
        pass

    def __enter__(self) -> _NoopSpan:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None


_NOOP_SPAN = _NoopSpan()


class NoopTracer:
    """The tracer used when OpenTelemetry is not installed or tracing is off: every span is one shared no-op."""

    enabled = False

    def request(
        self,
        *,
        protocol: str,
        operation: str,
        model: str | None = None,
        provider: str | None = None,
        request: RequestInfo | None = None,
        session: str | None = None,
        mcp_method: str | None = None,
        kind: SpanKindName = "server",
    ) -> SpanHandle:
        return _NOOP_SPAN

    def identity(self) -> SpanHandle:
        return _NOOP_SPAN

    def decision(
        self, kind: EventKind | str, target: str, *, call_id: str | None = None
    ) -> SpanHandle:
        return _NOOP_SPAN

    def quarantine(
        self, *, tool: str, model: str | None = None, provider: str | None = None
    ) -> SpanHandle:
        return _NOOP_SPAN


def _decision_attributes(decision: Decision) -> dict[str, Any]:
    return {
        "bastion.decision.kind": decision.kind.value,
        "bastion.decision.effect": decision.effect.value,
        "bastion.decision.rule_ids": list(decision.rule_ids),
        "bastion.decision.shadow_hits": list(decision.shadow_hits),
        "bastion.decision.defaulted": decision.defaulted,
        "bastion.decision.allowed": decision.allowed,
        "bastion.decision.reason": decision.reason,
    }


class _OtelSpan:
    __slots__ = ("_scope", "_span")

    def __init__(self, scope: Any) -> None:
        self._scope = scope
        self._span: Any = None

    def __enter__(self) -> _OtelSpan:
        self._span = self._scope.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._scope.__exit__(exc_type, exc, tb)

    def set(self, key: str, value: Any) -> None:
        if value is not None:
            self._span.set_attribute(key, value)

    def set_identity(self, identity: Identity) -> None:
        span = self._span
        span.set_attribute("bastion.identity.subject", identity.subject)
        span.set_attribute("bastion.identity.auth_method", identity.auth_method)
        span.set_attribute("bastion.identity.anonymous", identity.anonymous)
        if identity.tenant:
            span.set_attribute("bastion.identity.tenant", identity.tenant)
        if identity.key_id:
            span.set_attribute("bastion.identity.key_id", identity.key_id)

    def set_decision(self, decision: Decision) -> None:
        self._span.set_attributes(_decision_attributes(decision))
        if decision.route:
            self._span.set_attribute("bastion.decision.route", decision.route)

    def set_error(self, error: BaseException | str) -> None:
        from opentelemetry.trace import Status, StatusCode

        if isinstance(error, BaseException):
            self._span.record_exception(error)
            self._span.set_attribute("error.type", type(error).__qualname__)
            message = str(error)
        else:
            self._span.set_attribute("error.type", "bastion_error")
            message = error
        self._span.set_status(Status(StatusCode.ERROR, message))


class BastionTracer:
    """Bastion's spans on an OpenTelemetry ``TracerProvider`` (the global one by default)."""

    enabled = True

    def __init__(self, tracer_provider: Any = None) -> None:
        try:
            from opentelemetry import trace
        except ImportError as exc:
            raise ImportError(
                "Bastion tracing needs opentelemetry-api: pip install 'bastion-guard[otel]'"
            ) from exc
        try:
            version: str | None = importlib.metadata.version("bastion-guard")
        except importlib.metadata.PackageNotFoundError:
            version = None
        self._kinds = {
            "internal": trace.SpanKind.INTERNAL,
            "server": trace.SpanKind.SERVER,
            "client": trace.SpanKind.CLIENT,
        }
        provider = tracer_provider if tracer_provider is not None else trace.get_tracer_provider()
        self._tracer = provider.get_tracer(INSTRUMENTATION_NAME, version)

    def _span(self, name: str, kind: SpanKindName, attributes: dict[str, Any]) -> SpanHandle:
        clean = {k: v for k, v in attributes.items() if v is not None}
        return _OtelSpan(
            self._tracer.start_as_current_span(name, kind=self._kinds[kind], attributes=clean)
        )

    def request(
        self,
        *,
        protocol: str,
        operation: str,
        model: str | None = None,
        provider: str | None = None,
        request: RequestInfo | None = None,
        session: str | None = None,
        mcp_method: str | None = None,
        kind: SpanKindName = "server",
    ) -> SpanHandle:
        """The span of one guarded request (``operation``: ``chat``, ``execute_tool``, an MCP method...)."""
        name = f"{operation} {model}" if model else operation
        return self._span(
            name,
            kind,
            {
                "gen_ai.operation.name": operation,
                "gen_ai.request.model": model,
                "gen_ai.provider.name": provider,
                "gen_ai.conversation.id": session if mcp_method is None else None,
                "mcp.method.name": mcp_method,
                "mcp.session.id": session if mcp_method is not None else None,
                "bastion.protocol": protocol,
                "bastion.request.id": request.id if request is not None else None,
                "http.request.method": request.method if request is not None else None,
                "url.path": request.path if request is not None else None,
            },
        )

    def identity(self) -> SpanHandle:
        """A child span around establishing the caller's identity."""
        return self._span("bastion.identity", "internal", {})

    def decision(
        self, kind: EventKind | str, target: str, *, call_id: str | None = None
    ) -> SpanHandle:
        """A child span around one policy decision on ``target`` (a tool or model name)."""
        kind_value = kind.value if isinstance(kind, EventKind) else str(kind)
        attributes: dict[str, Any] = {"bastion.decision.kind": kind_value}
        if kind_value == EventKind.MODEL.value:
            attributes["gen_ai.request.model"] = target
        else:
            attributes["gen_ai.tool.name"] = target
            attributes["gen_ai.tool.call.id"] = call_id
            if kind_value == EventKind.CALL.value:
                attributes["gen_ai.operation.name"] = "execute_tool"
        return self._span(f"bastion.decide {kind_value} {target}", "internal", attributes)

    def quarantine(
        self, *, tool: str, model: str | None = None, provider: str | None = None
    ) -> SpanHandle:
        """A child span around one dual-LLM quarantine exchange about ``tool``'s output."""
        return self._span(
            f"bastion.quarantine {tool}",
            "client",
            {
                "gen_ai.operation.name": "chat",
                "gen_ai.request.model": model,
                "gen_ai.provider.name": provider,
                "gen_ai.tool.name": tool,
            },
        )


def bastion_tracer(
    tracer_provider: Any = None, *, enabled: bool = True
) -> BastionTracer | NoopTracer:
    """A :class:`BastionTracer`, or a :class:`NoopTracer` when disabled or OpenTelemetry is absent."""
    if not enabled:
        return NoopTracer()
    try:
        return BastionTracer(tracer_provider)
    except ImportError:
        return NoopTracer()
