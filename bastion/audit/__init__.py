"""Audit trail, metrics and tracing.

``AuditTrail(sinks=[JsonlSink("audit.jsonl")])`` records every decision handed to
its ``on_decision`` hook as a hash-chained :class:`AuditRecord`; ``bastion audit``
(:func:`bastion.audit.cli.main`) reads, queries and verifies the logs.
:class:`~bastion.audit.metrics.BastionMetrics` (extra ``[prometheus]``) and
:func:`~bastion.audit.tracing.bastion_tracer` (extra ``[otel]``) import their
libraries only when used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bastion.audit.reader import RecordFilter, VerifyResult, open_log, verify_log
from bastion.audit.record import (
    GENESIS_HASH,
    SCHEMA_VERSION,
    ArgumentRedaction,
    AuditRecord,
    build_record,
    record_hash,
    seal,
)
from bastion.audit.sinks import AuditSink, JsonlSink, SqliteSink, open_sink
from bastion.audit.tracing import BastionTracer, NoopTracer, bastion_tracer
from bastion.audit.trail import AuditStats, AuditTrail

if TYPE_CHECKING:
    from bastion.audit.metrics import BastionMetrics

__all__ = [
    "GENESIS_HASH",
    "SCHEMA_VERSION",
    "ArgumentRedaction",
    "AuditRecord",
    "AuditSink",
    "AuditStats",
    "AuditTrail",
    "BastionMetrics",
    "BastionTracer",
    "JsonlSink",
    "NoopTracer",
    "RecordFilter",
    "SqliteSink",
    "VerifyResult",
    "bastion_tracer",
    "build_record",
    "open_log",
    "open_sink",
    "record_hash",
    "seal",
    "verify_log",
]


def __getattr__(name: str) -> Any:
    # metrics.py imports nothing optional at module level, but keeping it out of
    # the package import keeps `import bastion.audit` minimal.
    if name == "BastionMetrics":
        from bastion.audit.metrics import BastionMetrics

        return BastionMetrics
    raise AttributeError(name)
