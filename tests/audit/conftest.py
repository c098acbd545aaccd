"""Builders for audit events, and the two shipped sinks as a parametrized fixture."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from bastion.audit import AuditSink, JsonlSink, SqliteSink, open_log
from bastion.errors import AuditError
from bastion.events import (
    AuditEvent,
    Decision,
    Effect,
    EventKind,
    Identity,
    RequestInfo,
    RuleTrace,
)

ALICE = Identity(
    subject="alice",
    groups=("eng", "oncall"),
    tenant="acme",
    key_id="vk_alice",
    auth_method="virtual_key",
)
BOB = Identity(subject="bob", groups=("sales",), auth_method="jwt")

KIND_OF = {
    Effect.ALLOW: EventKind.CALL,
    Effect.FORBID: EventKind.CALL,
    Effect.ASK: EventKind.CALL,
    Effect.SHOW: EventKind.VISIBILITY,
    Effect.HIDE: EventKind.VISIBILITY,
    Effect.TRUSTED: EventKind.RESULT,
    Effect.UNTRUSTED: EventKind.RESULT,
    Effect.QUARANTINE: EventKind.RESULT,
    Effect.REDACT: EventKind.RESULT,
    Effect.BLOCK: EventKind.RESULT,
}


def trace_for(rule_id: str, effect: Effect) -> tuple[RuleTrace, ...]:
    return (
        RuleTrace(
            rule_id=rule_id,
            effect=effect.value,
            matched=True,
            shadow=False,
            condition="args.to from untrusted",
            detail="args.to 'eve@evil.test' occurs in the output of web__fetch",
            location="mail.policy:7:1",
        ),
        RuleTrace(
            rule_id="allow-mail",
            effect="allow",
            matched=False,
            shadow=False,
            condition='identity.groups contains "eng"',
            detail="identity.groups is ['sales']",
            location="mail.policy:3:1",
        ),
    )


def event(
    effect: Effect = Effect.ALLOW,
    *,
    rule_ids: Sequence[str] = ("rule-1",),
    target: str = "mail__send",
    identity: Identity = ALICE,
    arguments: Mapping[str, Any] | None = None,
    detail: Mapping[str, Any] | None = None,
    traced: bool = False,
    kind: EventKind | None = None,
    shadow_hits: Sequence[str] = (),
    session: str | None = "sess-1",
    taint: frozenset[str] = frozenset(),
) -> AuditEvent:
    """One audit event as an adapter would hand it over."""
    decision = Decision(
        kind=kind or KIND_OF[effect],
        effect=effect,
        rule_ids=tuple(rule_ids),
        reasons=tuple(f"because of {r}" for r in rule_ids),
        shadow_hits=tuple(shadow_hits),
        defaulted=not rule_ids,
        trace=trace_for(rule_ids[0] if rule_ids else "default", effect) if traced else None,
    )
    return AuditEvent(
        decision=decision,
        identity=identity,
        target=target,
        protocol="mcp",
        request=RequestInfo(method="POST", path="/mcp", client="127.0.0.1"),
        session=session,
        arguments={"to": "bob@example.com"} if arguments is None else arguments,
        taint_sources=taint,
        detail=detail or {},
    )


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def all_records(path: Path) -> list[dict[str, Any]]:
    """Every stored record of a log (all segments / rows), in chain order."""
    return [r.data for r in open_log(path).raw() if r.data is not None]


@pytest.fixture(params=["jsonl", "sqlite"])
def log_path(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """A fresh log path for each shipped sink."""
    return tmp_path / ("audit.jsonl" if request.param == "jsonl" else "audit.db")


def sink_for(path: Path, **options: Any) -> AuditSink:
    return SqliteSink(path) if path.suffix == ".db" else JsonlSink(path, **options)


class SlowSink:
    """A sink that takes ``delay`` seconds per batch (a sink that cannot keep up)."""

    def __init__(self, inner: AuditSink, delay: float) -> None:
        self.inner = inner
        self.delay = delay
        self.release = threading.Event()
        self.entered = threading.Event()

    def write(self, records: Sequence[Mapping[str, Any]]) -> None:
        self.entered.set()
        self.release.wait(self.delay)
        self.inner.write(records)

    def close(self) -> None:
        self.inner.close()


class SwitchableSink:
    """A JSON Lines sink whose storage can be made unavailable and available again.

    While ``broken`` it refuses writes like a full disk would; the records it
    did store remain a valid chain.
    """

    def __init__(self, path: Path) -> None:
        self.inner = JsonlSink(path)
        self.broken = False
        self.attempts = 0

    def write(self, records: Sequence[Mapping[str, Any]]) -> None:
        self.attempts += 1
        if self.broken:
            raise AuditError("No space left on device")
        self.inner.write(records)

    def close(self) -> None:
        self.inner.close()


def wait_until(predicate: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return bool(predicate())
