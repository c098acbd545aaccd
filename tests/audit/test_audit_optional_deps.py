"""The extras stay optional: nothing imported up front, a clear message or a no-op without them."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_importing_the_audit_package_loads_neither_prometheus_nor_opentelemetry() -> None:
    result = run(
        """
        import sys
        import bastion.audit
        print("prometheus_client" in sys.modules, "opentelemetry" in sys.modules)
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]


def test_without_opentelemetry_the_tracer_is_a_no_op() -> None:
    result = run(
        """
        import sys
        sys.modules["opentelemetry"] = None  # as if not installed
        from bastion.audit import bastion_tracer, NoopTracer
        from bastion.audit.tracing import BastionTracer
        tracer = bastion_tracer()
        with tracer.request(protocol="openai", operation="chat", model="m") as span:
            span.set("gen_ai.tool.name", "x")
        print(type(tracer).__name__)
        try:
            BastionTracer()
        except ImportError as exc:
            print(exc)
        """
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "NoopTracer"
    assert "pip install 'bastion-guard[otel]'" in lines[1]


def test_without_prometheus_client_metrics_name_the_extra() -> None:
    result = run(
        """
        import sys
        sys.modules["prometheus_client"] = None  # as if not installed
        from bastion.audit import BastionMetrics
        try:
            BastionMetrics()
        except ImportError as exc:
            print(exc)
        """
    )
    assert result.returncode == 0, result.stderr
    assert "pip install 'bastion-guard[prometheus]'" in result.stdout
