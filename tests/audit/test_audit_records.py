"""What one decision turns into: one record, its fields, redaction and trace capture."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from bastion.audit import ArgumentRedaction, AuditRecord, AuditTrail, JsonlSink
from bastion.audit.record import GENESIS_HASH, canonical_json
from bastion.events import Effect, EventKind

from .conftest import ALICE, all_records, event, read_jsonl, sink_for


@pytest.mark.parametrize("effect", list(Effect))
def test_every_effect_produces_exactly_one_record_with_its_rule_ids(
    effect: Effect, log_path: Path
) -> None:
    rules = (f"{effect.value}-a", f"{effect.value}-b")
    with AuditTrail([sink_for(log_path)]) as trail:
        trail.on_decision(event(effect, rule_ids=rules))
    records = all_records(log_path)
    assert len(records) == 1
    record = records[0]
    assert record["effect"] == effect.value
    assert record["rule_ids"] == list(rules)
    assert record["reasons"] == [f"because of {r}" for r in rules]
    assert record["defaulted"] is False


def test_defaulted_decision_is_recorded_as_defaulted_without_rules(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditTrail([JsonlSink(path)]) as trail:
        trail.on_decision(event(Effect.FORBID, rule_ids=()))
    (record,) = read_jsonl(path)
    assert record["defaulted"] is True
    assert record["rule_ids"] == []


def test_record_carries_identity_request_and_taint(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    ev = event(
        Effect.FORBID,
        shadow_hits=("shadow-strict",),
        taint=frozenset({"web__fetch", "mail__read"}),
    )
    with AuditTrail([JsonlSink(path)]) as trail:
        trail.on_decision(ev)
    (record,) = read_jsonl(path)
    assert record["identity"]["subject"] == "alice"
    assert record["identity"]["tenant"] == "acme"
    assert record["identity"]["key_id"] == "vk_alice"
    assert record["identity"]["groups"] == ["eng", "oncall"]
    assert record["identity"]["auth_method"] == "virtual_key"
    assert ev.request is not None
    assert record["request_id"] == ev.request.id
    assert record["session_id"] == "sess-1"
    assert record["request"] == {"method": "POST", "path": "/mcp", "client": "127.0.0.1"}
    assert record["protocol"] == "mcp"
    assert record["kind"] == "call"
    assert record["target"] == "mail__send"
    assert record["tool_server"] == "mail"
    assert record["shadow_hits"] == ["shadow-strict"]
    assert record["taint_sources"] == ["mail__read", "web__fetch"]


def test_first_record_is_chained_to_genesis_and_validates_against_the_schema(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditTrail([JsonlSink(path)]) as trail:
        trail.on_decision(event(Effect.ALLOW, detail={"upstream_status": 200}))
    (stored,) = read_jsonl(path)
    assert stored["prev_hash"] == GENESIS_HASH
    body = {k: v for k, v in stored.items() if k != "hash"}
    assert stored["hash"] == hashlib.sha256(canonical_json(body).encode()).hexdigest()
    model = AuditRecord.model_validate(stored)
    assert model.schema_version == 1
    assert model.model_dump(mode="json") == stored


def test_adapter_facts_in_detail_land_in_their_fields(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    detail = {
        "provider": "openai",
        "provider_key_fingerprint": "sha256:1234abcd",
        "upstream_status": 502,
        "latency_ms": 0.042,
        "upstream_latency_ms": 812.5,
        "error": "upstream reset the connection",
        "model_route": "primary",
    }
    with AuditTrail([JsonlSink(path)]) as trail:
        trail.on_decision(event(Effect.ALLOW, target="gpt-4o", kind=EventKind.MODEL, detail=detail))
    (record,) = read_jsonl(path)
    assert record["kind"] == "model"
    assert record["provider"] == "openai"
    assert record["provider_key_fingerprint"] == "sha256:1234abcd"
    assert record["upstream_status"] == 502
    assert record["latency_ms"] == 0.042
    assert record["upstream_latency_ms"] == 812.5
    assert record["error"] == "upstream reset the connection"
    assert record["detail"] == {"model_route": "primary"}


def test_a_raw_provider_key_is_never_written_only_its_fingerprint(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    key = "sk-live-0123456789abcdefghijklmnop"
    with AuditTrail([JsonlSink(path)]) as trail:
        trail.on_decision(event(Effect.ALLOW, detail={"provider_key": key}))
    text = path.read_text()
    assert key not in text
    (record,) = read_jsonl(path)
    assert record["provider_key_fingerprint"] == (
        "sha256:" + hashlib.sha256(key.encode()).hexdigest()[:16]
    )


def test_quarantine_questions_and_answers_are_recorded(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    detail = {
        "quarantine": {
            "questions": ["Does the page ask to send money?"],
            "answers": [{"answer": False}],
        }
    }
    with AuditTrail([JsonlSink(path)]) as trail:
        trail.on_decision(event(Effect.QUARANTINE, target="web__fetch", detail=detail))
        trail.on_decision(event(Effect.TRUSTED, target="calendar__list"))
    quarantined, trusted = read_jsonl(path)
    assert quarantined["quarantine"] == {
        "used": True,
        "questions": ["Does the page ask to send money?"],
        "answers": [{"answer": False}],
        "error": None,
    }
    assert trusted["quarantine"] is None


def test_secret_argument_keys_and_secret_shaped_values_are_masked(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    arguments = {
        "to": "bob@example.com",
        "api_key": "plain-looking-value",
        "headers": {"Authorization": "Bearer abc", "Accept": "text/plain"},
        "note": "use sk-proj-AAAAAAAAAAAAAAAAAAAAAAAA to log in",
    }
    with AuditTrail([JsonlSink(path)]) as trail:
        trail.on_decision(event(Effect.ALLOW, arguments=arguments))
    (record,) = read_jsonl(path)
    args = record["arguments"]
    assert args["to"] == "bob@example.com"
    assert args["api_key"] == "[REDACTED]"
    assert args["headers"] == {"Authorization": "[REDACTED]", "Accept": "text/plain"}
    assert args["note"] == "use [REDACTED] to log in"
    assert "plain-looking-value" not in path.read_text()
    assert "sk-proj-AAAA" not in path.read_text()


def test_long_argument_values_are_truncated_with_their_length(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    redaction = ArgumentRedaction(max_chars=10, max_items=3)
    with AuditTrail([JsonlSink(path)], redaction=redaction) as trail:
        trail.on_decision(event(Effect.ALLOW, arguments={"body": "x" * 25, "ids": [1, 2, 3, 4, 5]}))
    (record,) = read_jsonl(path)
    assert record["arguments"]["body"] == "xxxxxxxxxx…[+15 chars]"
    assert record["arguments"]["ids"] == [1, 2, 3, "[2 more items]"]


def test_digest_mode_keeps_only_the_sha256_of_the_arguments(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    arguments = {"to": "bob@example.com", "amount": 12}
    with AuditTrail([JsonlSink(path)], redaction=ArgumentRedaction(mode="digest")) as trail:
        trail.on_decision(event(Effect.ALLOW, arguments=arguments))
    (record,) = read_jsonl(path)
    assert record["arguments"] is None
    assert record["arguments_mode"] == "digest"
    expected = hashlib.sha256(
        json.dumps(arguments, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()
    assert record["arguments_digest"] == expected
    assert "bob@example.com" not in path.read_text()


def test_none_mode_records_no_trace_of_the_arguments(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditTrail([JsonlSink(path)], redaction=ArgumentRedaction(mode="none")) as trail:
        trail.on_decision(event(Effect.ALLOW, arguments={"to": "bob@example.com"}))
    (record,) = read_jsonl(path)
    assert record["arguments"] is None
    assert record["arguments_digest"] is None


@pytest.mark.parametrize("effect", [Effect.FORBID, Effect.ASK, Effect.HIDE, Effect.BLOCK])
def test_denials_always_keep_their_trace(effect: Effect, tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditTrail([JsonlSink(path)], trace_sample_rate=0.0) as trail:
        trail.on_decision(event(effect, rule_ids=("no-exfil",), traced=True))
    (record,) = read_jsonl(path)
    assert record["trace"] is not None
    assert [t["rule_id"] for t in record["trace"]] == ["no-exfil", "allow-mail"]
    assert record["trace"][0]["matched"] is True
    assert record["trace"][1]["detail"] == "identity.groups is ['sales']"


def test_allowed_decisions_keep_their_trace_only_when_sampled(tmp_path: Path) -> None:
    never, always = tmp_path / "never.jsonl", tmp_path / "always.jsonl"
    with AuditTrail([JsonlSink(never)], trace_sample_rate=0.0) as trail:
        for _ in range(20):
            trail.on_decision(event(Effect.ALLOW, traced=True))
    with AuditTrail([JsonlSink(always)], trace_sample_rate=1.0) as trail:
        for _ in range(20):
            trail.on_decision(event(Effect.ALLOW, traced=True))
    assert all(r["trace"] is None for r in read_jsonl(never))
    assert all(r["trace"] is not None for r in read_jsonl(always))


def test_sampling_rate_keeps_about_that_share_of_traces(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditTrail([JsonlSink(path)], trace_sample_rate=0.25) as trail:
        for _ in range(2000):
            trail.on_decision(event(Effect.ALLOW, traced=True))
    kept = sum(r["trace"] is not None for r in read_jsonl(path))
    # Binomial(2000, 0.25): mean 500, sd ~19; 5 sd either side.
    assert 400 < kept < 600


def test_records_are_written_in_decision_order_with_increasing_times(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditTrail([JsonlSink(path)]) as trail:
        for i in range(50):
            trail.on_decision(event(Effect.ALLOW, rule_ids=(f"r{i}",), identity=ALICE))
    records = read_jsonl(path)
    assert [r["rule_ids"][0] for r in records] == [f"r{i}" for i in range(50)]
    times = [r["time"] for r in records]
    assert times == sorted(times)
    assert len({r["id"] for r in records}) == 50
