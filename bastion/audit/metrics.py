"""Prometheus metrics (extra ``[prometheus]``; ``prometheus_client`` is imported on first use).

Every :class:`BastionMetrics` has its own ``CollectorRegistry``, so several
instances (several apps in one process, tests) never collide; expose it with
:meth:`BastionMetrics.render`, the Starlette :meth:`BastionMetrics.endpoint`, or
pass ``metrics.registry`` to an exporter of your own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from bastion.events import AuditEvent, Effect, EventKind

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

__all__ = ["BastionMetrics"]

DEFAULT_RULE_LABEL = "(default)"

_DECISION_BUCKETS = (
    0.00001,
    0.000025,
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.05,
)
_UPSTREAM_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def _prometheus() -> Any:
    try:
        import prometheus_client
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "Bastion metrics need prometheus_client: pip install 'bastion-guard[prometheus]'"
        ) from exc
    return prometheus_client


def _seconds(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value) / 1000.0
    except (TypeError, ValueError):
        return None


class BastionMetrics:
    """Bastion's Prometheus metrics on a registry of their own.

    :meth:`observe` takes one :class:`~bastion.events.AuditEvent` (an
    ``AuditTrail`` given ``metrics=`` calls it from its writer thread; without a
    trail it can be the ``on_decision`` hook itself). It reads the decision's
    kind, effect and rule ids, and from ``event.detail`` ``latency_ms`` (decision
    time), ``upstream_latency_ms``, ``provider`` and the quarantine facts.
    """

    def __init__(self, *, namespace: str = "bastion", registry: Any = None) -> None:
        prom = _prometheus()
        self._prom = prom
        self.registry = registry if registry is not None else prom.CollectorRegistry()
        reg = self.registry
        ns = namespace
        self.decisions = prom.Counter(
            "decisions", "Policy decisions by event kind and effect.", ["kind", "effect"],
            namespace=ns, registry=reg,
        )  # fmt: skip
        self.rule_hits = prom.Counter(
            "rule_hits", "Matching rules by rule id (defaulted decisions count as '(default)').",
            ["kind", "effect", "rule_id"], namespace=ns, registry=reg,
        )  # fmt: skip
        self.shadow_hits = prom.Counter(
            "shadow_rule_hits", "Shadow-mode rules that matched.", ["rule_id"],
            namespace=ns, registry=reg,
        )  # fmt: skip
        self.decision_latency = prom.Histogram(
            "decision_duration_seconds", "Time the policy took to decide.", ["kind"],
            buckets=_DECISION_BUCKETS, namespace=ns, registry=reg,
        )  # fmt: skip
        self.upstream_latency = prom.Histogram(
            "upstream_duration_seconds", "Time the upstream LLM or MCP server took.",
            ["protocol", "provider"], buckets=_UPSTREAM_BUCKETS, namespace=ns, registry=reg,
        )  # fmt: skip
        self.blocked_tool_calls = prom.Counter(
            "blocked_tool_calls", "Tool calls forbidden or held for approval, by tool.",
            ["tool", "effect"], namespace=ns, registry=reg,
        )  # fmt: skip
        self.quarantine_calls = prom.Counter(
            "quarantine_calls", "Tool results sent to the quarantine LLM.",
            namespace=ns, registry=reg,
        )  # fmt: skip
        self.quarantine_failures = prom.Counter(
            "quarantine_failures", "Quarantine exchanges that failed (the output was blocked).",
            namespace=ns, registry=reg,
        )  # fmt: skip
        self.active_sessions = prom.Gauge(
            "active_sessions", "Sessions currently held by the session store.",
            namespace=ns, registry=reg,
        )  # fmt: skip
        self.audit_queue_depth = prom.Gauge(
            "audit_queue_depth", "Decisions waiting to be written by the audit trail.",
            namespace=ns, registry=reg,
        )  # fmt: skip
        self.audit_drops = prom.Counter(
            "audit_dropped_records", "Audit records dropped (on_overflow='drop').",
            namespace=ns, registry=reg,
        )  # fmt: skip
        self.audit_up = prom.Gauge(
            "audit_healthy", "1 while every audit sink accepts writes.", namespace=ns, registry=reg,
        )  # fmt: skip
        self.audit_up.set(1)

    def observe(self, event: AuditEvent) -> None:
        """Count one decision (and its latency, block, quarantine facts)."""
        decision = event.decision
        kind = decision.kind.value
        effect = decision.effect.value
        self.decisions.labels(kind, effect).inc()
        if decision.rule_ids:
            for rule_id in decision.rule_ids:
                self.rule_hits.labels(kind, effect, rule_id).inc()
        elif decision.defaulted:
            self.rule_hits.labels(kind, effect, DEFAULT_RULE_LABEL).inc()
        for rule_id in decision.shadow_hits:
            self.shadow_hits.labels(rule_id).inc()
        detail = event.detail
        latency = _seconds(detail.get("latency_ms", detail.get("decision_latency_ms")))
        if latency is not None:
            self.decision_latency.labels(kind).observe(latency)
        upstream = _seconds(detail.get("upstream_latency_ms"))
        if upstream is not None:
            provider = str(detail.get("provider") or "")
            self.upstream_latency.labels(event.protocol, provider).observe(upstream)
        if decision.kind == EventKind.CALL and decision.effect in (Effect.FORBID, Effect.ASK):
            self.blocked_tool_calls.labels(event.target, effect).inc()
        if decision.effect == Effect.QUARANTINE:
            quarantine = detail.get("quarantine")
            failed = detail.get("quarantine_error") is not None or (
                isinstance(quarantine, Mapping) and quarantine.get("error") is not None
            )
            self.observe_quarantine(failed=failed)

    def observe_quarantine(self, *, failed: bool = False) -> None:
        """Count one quarantine exchange (and its failure)."""
        self.quarantine_calls.inc()
        if failed:
            self.quarantine_failures.inc()

    def set_active_sessions(self, count: int) -> None:
        self.active_sessions.set(count)

    def track_active_sessions(self, count: Callable[[], float]) -> None:
        """Read the active session count from ``count`` at every scrape."""
        self.active_sessions.set_function(count)

    def track_audit_queue(self, depth: Callable[[], float]) -> None:
        """Read the audit queue depth from ``depth`` at every scrape."""
        self.audit_queue_depth.set_function(depth)

    def audit_dropped(self, count: int = 1) -> None:
        self.audit_drops.inc(count)

    def audit_healthy(self, healthy: bool) -> None:
        self.audit_up.set(1 if healthy else 0)

    def render(self) -> tuple[bytes, str]:
        """The registry in the Prometheus text format, and its content type."""
        return self._prom.generate_latest(self.registry), str(self._prom.CONTENT_TYPE_LATEST)

    async def endpoint(self, request: Request) -> Response:
        """A Starlette endpoint serving :meth:`render`."""
        from starlette.responses import Response

        body, content_type = self.render()
        return Response(body, media_type=content_type)

    def route(self, path: str = "/metrics") -> Route:
        """A Starlette ``Route`` for :meth:`endpoint` (GET)."""
        from starlette.routing import Route

        return Route(path, self.endpoint, methods=["GET"])
