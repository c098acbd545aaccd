"""`bastion audit verify` against each kind of tampering, in both storage formats."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from bastion.audit import AuditTrail, open_log, verify_log
from bastion.audit.cli import main
from bastion.audit.record import canonical_json, record_hash
from bastion.audit.sinks import head_path
from bastion.events import Effect

from .conftest import all_records, event, sink_for


@pytest.fixture
def written(log_path: Path) -> list[dict[str, Any]]:
    """Ten records in the log at ``log_path``."""
    with AuditTrail([sink_for(log_path)]) as trail:
        for i in range(10):
            effect = Effect.FORBID if i % 3 == 0 else Effect.ALLOW
            trail.on_decision(event(effect, rule_ids=(f"r{i}",)))
    return all_records(log_path)


def rewrite(path: Path, records: list[dict[str, Any]]) -> None:
    """Store ``records`` (as given, no resealing) as the whole log."""
    if path.suffix == ".db":
        conn = sqlite3.connect(path)
        rows = conn.execute("SELECT seq FROM audit_records ORDER BY seq").fetchall()
        conn.execute("DELETE FROM audit_records")
        for seq, record in zip(
            [r[0] for r in rows] + list(range(10_000, 10_100)), records, strict=False
        ):
            conn.execute(
                "INSERT INTO audit_records (seq, id, time, subject, tenant, kind, target, effect,"
                " rule_ids, session_id, request_id, prev_hash, hash, record)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    seq,
                    record["id"],
                    record["time"],
                    record["identity"]["subject"],
                    record["identity"]["tenant"],
                    record["kind"],
                    record["target"],
                    record["effect"],
                    json.dumps(record["rule_ids"]),
                    record["session_id"],
                    record["request_id"],
                    record["prev_hash"],
                    record["hash"],
                    canonical_json(record),
                ),
            )
        conn.commit()
        conn.close()
    else:
        path.write_text("".join(canonical_json(r) + "\n" for r in records))


def check(path: Path) -> tuple[bool, str | None, str]:
    result = verify_log(open_log(path))
    return result.ok, result.bad_record, result.reason or ""


def test_untouched_log_verifies(log_path: Path, written: list[dict[str, Any]]) -> None:
    result = verify_log(open_log(log_path))
    assert result.ok
    assert result.records == 10
    assert result.head == written[-1]["hash"]


def test_edited_record_is_reported_by_id(log_path: Path, written: list[dict[str, Any]]) -> None:
    written[4]["effect"] = "allow" if written[4]["effect"] == "forbid" else "forbid"
    rewrite(log_path, written)
    ok, bad, reason = check(log_path)
    assert not ok
    assert bad == written[4]["id"]
    assert reason.startswith("edited")


def test_edited_and_rehashed_record_breaks_the_link_of_the_next(
    log_path: Path, written: list[dict[str, Any]]
) -> None:
    written[4]["target"] = "shell__exec"
    written[4]["hash"] = record_hash(written[4])
    rewrite(log_path, written)
    ok, bad, reason = check(log_path)
    assert not ok
    assert bad == written[5]["id"]
    assert written[4]["id"] in reason


def test_deleted_record_is_reported_at_its_successor(
    log_path: Path, written: list[dict[str, Any]]
) -> None:
    del written[3]
    rewrite(log_path, written)
    ok, bad, reason = check(log_path)
    assert not ok
    assert bad == written[3]["id"]
    assert "deleted" in reason


def test_deleted_first_record_is_reported(log_path: Path, written: list[dict[str, Any]]) -> None:
    rewrite(log_path, written[1:])
    ok, bad, reason = check(log_path)
    assert not ok
    assert bad == written[1]["id"]
    assert "deleted" in reason


def test_inserted_forged_record_is_reported_by_its_id(
    log_path: Path, written: list[dict[str, Any]]
) -> None:
    forged = dict(written[5], id="forged-record", effect="allow")
    forged["prev_hash"] = written[4]["hash"]
    forged["hash"] = record_hash(forged)
    rewrite(log_path, [*written[:5], forged, *written[5:]])
    ok, bad, reason = check(log_path)
    assert not ok
    assert bad == "forged-record"
    assert reason.startswith("inserted")


def test_inserted_record_with_a_wrong_link_is_reported_by_its_id(
    log_path: Path, written: list[dict[str, Any]]
) -> None:
    forged = dict(written[5], id="forged-record")
    forged["prev_hash"] = "ab" * 32
    forged["hash"] = record_hash(forged)
    rewrite(log_path, [*written[:5], forged, *written[5:]])
    ok, bad, reason = check(log_path)
    assert not ok
    assert bad == "forged-record"
    assert reason.startswith("inserted")


def test_reordered_records_are_reported(log_path: Path, written: list[dict[str, Any]]) -> None:
    written[6], written[7] = written[7], written[6]
    rewrite(log_path, written)
    ok, bad, reason = check(log_path)
    assert not ok
    assert bad == written[6]["id"]
    assert "reordered" in reason


def test_truncated_last_record_is_reported_from_the_head(
    log_path: Path, written: list[dict[str, Any]]
) -> None:
    rewrite(log_path, written[:-1])
    if log_path.suffix == ".db":
        # With the head row intact, SQLite truncation is a count/head mismatch.
        pass
    ok, bad, reason = check(log_path)
    assert not ok
    assert bad == written[-1]["id"]
    assert reason.startswith("truncated")


def test_truncation_with_the_head_removed_too_is_only_a_note(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditTrail([sink_for(path)]) as trail:
        for _ in range(4):
            trail.on_decision(event(Effect.ALLOW))
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]))
    head_path(path).unlink()
    result = verify_log(open_log(path))
    assert result.ok
    assert any("cannot be detected" in note for note in result.notes)


def test_sqlite_column_edited_without_the_record_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    with AuditTrail([sink_for(path)]) as trail:
        for _ in range(4):
            trail.on_decision(event(Effect.FORBID))
    conn = sqlite3.connect(path)
    conn.execute("UPDATE audit_records SET effect = 'allow' WHERE seq = 2")
    conn.commit()
    conn.close()
    result = verify_log(open_log(path))
    assert not result.ok
    assert result.bad_record == all_records(path)[1]["id"]
    assert "indexed columns" in (result.reason or "")


def test_unparseable_line_is_reported_with_its_location(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditTrail([sink_for(path)]) as trail:
        for _ in range(3):
            trail.on_decision(event(Effect.ALLOW))
    lines = path.read_text().splitlines(keepends=True)
    lines[1] = lines[1][:40] + "\n"
    path.write_text("".join(lines))
    result = verify_log(open_log(path))
    assert not result.ok
    assert result.bad_record == "audit.jsonl:2"
    assert (result.reason or "").startswith("unreadable")


def test_cli_verify_exits_0_on_an_intact_log(
    log_path: Path, written: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["verify", str(log_path)]) == 0
    assert capsys.readouterr().out.startswith("OK: 10 records")


def test_cli_verify_exits_1_naming_the_first_bad_record(
    log_path: Path, written: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    written[2]["target"] = "shell__exec"
    rewrite(log_path, written)
    assert main(["verify", str(log_path)]) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"FAIL: record {written[2]['id']}")
    assert "edited" in out
