"""Prometheus metrics: what each decision counts, and the /metrics endpoint on a real server."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette

from bastion.audit import AuditTrail, JsonlSink
from bastion.audit.metrics import BastionMetrics
from bastion.events import Effect, EventKind

from .conftest import SlowSink, event


def sample(metrics: BastionMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_decisions_are_counted_by_kind_and_effect() -> None:
    metrics = BastionMetrics()
    metrics.observe(event(Effect.ALLOW))
    metrics.observe(event(Effect.ALLOW))
    metrics.observe(event(Effect.HIDE))
    assert sample(metrics, "bastion_decisions_total", kind="call", effect="allow") == 2
    assert sample(metrics, "bastion_decisions_total", kind="visibility", effect="hide") == 1


def test_every_matching_rule_and_the_default_are_counted() -> None:
    metrics = BastionMetrics()
    metrics.observe(event(Effect.FORBID, rule_ids=("no-exfil", "no-shell")))
    metrics.observe(event(Effect.FORBID, rule_ids=()))
    for rule in ("no-exfil", "no-shell", "(default)"):
        assert (
            sample(metrics, "bastion_rule_hits_total", kind="call", effect="forbid", rule_id=rule)
            == 1
        )


def test_shadow_hits_are_counted_per_rule() -> None:
    metrics = BastionMetrics()
    metrics.observe(event(Effect.ALLOW, shadow_hits=("strict-mail",)))
    assert sample(metrics, "bastion_shadow_rule_hits_total", rule_id="strict-mail") == 1


def test_forbidden_and_held_tool_calls_are_counted_by_tool() -> None:
    metrics = BastionMetrics()
    metrics.observe(event(Effect.FORBID, target="mail__send"))
    metrics.observe(event(Effect.ASK, target="bank__pay"))
    metrics.observe(event(Effect.ALLOW, target="mail__send"))
    assert (
        sample(metrics, "bastion_blocked_tool_calls_total", tool="mail__send", effect="forbid") == 1
    )
    assert sample(metrics, "bastion_blocked_tool_calls_total", tool="bank__pay", effect="ask") == 1
    assert (
        sample(metrics, "bastion_blocked_tool_calls_total", tool="mail__send", effect="allow") == 0
    )


def test_decision_and_upstream_latencies_go_to_their_histograms() -> None:
    metrics = BastionMetrics()
    metrics.observe(
        event(
            Effect.ALLOW,
            target="gpt-4o",
            kind=EventKind.MODEL,
            detail={"latency_ms": 0.03, "upstream_latency_ms": 420.0, "provider": "openai"},
        )
    )
    assert sample(metrics, "bastion_decision_duration_seconds_count", kind="model") == 1
    assert (
        sample(metrics, "bastion_decision_duration_seconds_bucket", kind="model", le="5e-05") == 1
    )
    assert (
        sample(metrics, "bastion_decision_duration_seconds_bucket", kind="model", le="2.5e-05") == 0
    )
    labels = {"protocol": "mcp", "provider": "openai"}
    assert sample(metrics, "bastion_upstream_duration_seconds_sum", **labels) == 0.42
    assert sample(metrics, "bastion_upstream_duration_seconds_bucket", le="0.5", **labels) == 1


def test_quarantine_calls_and_failures_are_counted() -> None:
    metrics = BastionMetrics()
    metrics.observe(event(Effect.QUARANTINE, target="web__fetch"))
    metrics.observe(
        event(
            Effect.QUARANTINE, target="web__fetch", detail={"quarantine_error": "answer off schema"}
        )
    )
    assert sample(metrics, "bastion_quarantine_calls_total") == 2
    assert sample(metrics, "bastion_quarantine_failures_total") == 1


def test_active_sessions_gauge_reads_the_store_at_scrape_time() -> None:
    metrics = BastionMetrics()
    sessions = {"a", "b"}
    metrics.track_active_sessions(lambda: len(sessions))
    assert sample(metrics, "bastion_active_sessions") == 2
    sessions.add("c")
    assert sample(metrics, "bastion_active_sessions") == 3


def test_two_instances_do_not_share_counts() -> None:
    one, two = BastionMetrics(), BastionMetrics()
    one.observe(event(Effect.ALLOW))
    assert sample(one, "bastion_decisions_total", kind="call", effect="allow") == 1
    assert sample(two, "bastion_decisions_total", kind="call", effect="allow") == 0


def test_the_trail_feeds_metrics_and_exposes_its_queue_and_drops(tmp_path: Path) -> None:
    metrics = BastionMetrics()
    slow = SlowSink(JsonlSink(tmp_path / "audit.jsonl"), delay=10.0)
    trail = AuditTrail([slow], queue_size=5, on_overflow="drop", metrics=metrics)
    # One record in the writer's hands first, so exactly the queue's 5 wait behind it
    # (otherwise the writer may empty the queue between the last decision and the reads).
    trail.on_decision(event(Effect.ALLOW))
    assert slow.entered.wait(5)
    for _ in range(11):
        trail.on_decision(event(Effect.ALLOW))
    assert sample(metrics, "bastion_audit_queue_depth") == 5
    assert sample(metrics, "bastion_audit_dropped_records_total") == trail.dropped
    assert trail.dropped == 6
    slow.release.set()
    trail.close()
    written = 12 - trail.dropped
    assert sample(metrics, "bastion_decisions_total", kind="call", effect="allow") == written
    assert sample(metrics, "bastion_audit_queue_depth") == 0


def test_render_is_prometheus_text_with_its_content_type() -> None:
    metrics = BastionMetrics()
    metrics.observe(event(Effect.FORBID, rule_ids=("no-exfil",)))
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert "bastion_decisions" in families


@contextlib.contextmanager
def serve(app: Any) -> Iterator[str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(5)
        sock.close()


def test_metrics_endpoint_serves_the_registry_over_http() -> None:
    metrics = BastionMetrics()
    metrics.observe(event(Effect.FORBID, rule_ids=("no-exfil",), target="mail__send"))
    app = Starlette(routes=[metrics.route("/metrics")])
    with serve(app) as base:
        response = httpx.get(f"{base}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert (
        'bastion_blocked_tool_calls_total{effect="forbid",tool="mail__send"} 1.0' in response.text
    )
