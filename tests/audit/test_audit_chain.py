"""The hash chain across batches, rotations, restarts and shutdowns."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from bastion.audit import AuditTrail, JsonlSink, SqliteSink, open_log, verify_log
from bastion.audit.record import GENESIS_HASH
from bastion.audit.sinks import jsonl_segments
from bastion.errors import AuditError
from bastion.events import Effect

from .conftest import all_records, event, sink_for

ROOT = Path(__file__).resolve().parents[2]


def test_each_record_links_to_the_previous_ones_hash(log_path: Path) -> None:
    with AuditTrail([sink_for(log_path)], batch_size=7) as trail:
        for i in range(30):
            trail.on_decision(event(Effect.ALLOW, rule_ids=(f"r{i}",)))
    records = all_records(log_path)
    assert records[0]["prev_hash"] == GENESIS_HASH
    for before, after in itertools.pairwise(records):
        assert after["prev_hash"] == before["hash"]
    assert verify_log(open_log(log_path)).ok


def test_chain_continues_after_graceful_shutdown_and_reopen(log_path: Path) -> None:
    with AuditTrail([sink_for(log_path)]) as trail:
        for i in range(40):
            trail.on_decision(event(Effect.ALLOW, rule_ids=(f"first-{i}",)))
    first = all_records(log_path)
    with AuditTrail([sink_for(log_path)]) as trail:
        for i in range(25):
            trail.on_decision(event(Effect.FORBID, rule_ids=(f"second-{i}",)))
    records = all_records(log_path)
    assert len(records) == 65
    assert records[:40] == first
    assert records[40]["prev_hash"] == first[-1]["hash"]
    result = verify_log(open_log(log_path))
    assert result.ok, result
    assert result.records == 65


async def test_async_close_flushes_everything(log_path: Path) -> None:
    trail = AuditTrail([sink_for(log_path)])
    for i in range(300):
        trail.on_decision(event(Effect.ALLOW, rule_ids=(f"r{i}",)))
    await trail.aclose()
    assert len(all_records(log_path)) == 300


def test_rotated_segments_verify_as_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    sink = JsonlSink(path, max_bytes=4_000)
    with AuditTrail([sink], batch_size=3) as trail:
        for i in range(60):
            trail.on_decision(event(Effect.ALLOW, rule_ids=(f"r{i}",)))
            trail.flush()
    segments = jsonl_segments(path)
    assert len(segments) > 3
    assert segments[-1] == path
    assert all(p.stat().st_size <= 4_000 for p in segments[:-1])
    records = all_records(path)
    assert [r["rule_ids"][0] for r in records] == [f"r{i}" for i in range(60)]
    assert verify_log(open_log(path)).ok


def test_rotation_continues_numbering_after_restart(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    for _ in range(2):
        with AuditTrail([JsonlSink(path, max_bytes=3_000)], batch_size=2) as trail:
            for i in range(20):
                trail.on_decision(event(Effect.ALLOW, rule_ids=(f"r{i}",)))
                trail.flush()
    assert len(all_records(path)) == 40
    assert verify_log(open_log(path)).ok


def test_pruned_segments_leave_a_verifiable_anchor(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditTrail([JsonlSink(path, max_bytes=3_000, max_files=3)], batch_size=2) as trail:
        for i in range(60):
            trail.on_decision(event(Effect.ALLOW, rule_ids=(f"r{i}",)))
            trail.flush()
    assert len(jsonl_segments(path)) == 3
    records = all_records(path)
    assert records[-1]["rule_ids"] == ["r59"]
    assert records[0]["prev_hash"] != GENESIS_HASH
    result = verify_log(open_log(path))
    assert result.ok, result
    assert any("pruned" in note for note in result.notes)


def test_deleting_the_oldest_segment_without_pruning_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditTrail([JsonlSink(path, max_bytes=3_000)], batch_size=2) as trail:
        for i in range(30):
            trail.on_decision(event(Effect.ALLOW, rule_ids=(f"r{i}",)))
            trail.flush()
    jsonl_segments(path)[0].unlink()
    result = verify_log(open_log(path))
    assert not result.ok
    assert "deleted" in (result.reason or "")


def test_a_partial_last_line_from_a_crash_is_cut_before_appending(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditTrail([JsonlSink(path)]) as trail:
        for _ in range(5):
            trail.on_decision(event(Effect.ALLOW))
    with path.open("ab") as f:
        f.write(b'{"id": "half-written", "effe')
    with AuditTrail([JsonlSink(path)]) as trail:
        trail.on_decision(event(Effect.FORBID))
    records = all_records(path)
    assert len(records) == 6
    assert verify_log(open_log(path)).ok


def test_opening_a_log_whose_head_record_was_removed_fails_closed(log_path: Path) -> None:
    with AuditTrail([sink_for(log_path)]) as trail:
        for _ in range(5):
            trail.on_decision(event(Effect.ALLOW))
    if log_path.suffix == ".db":
        import sqlite3

        conn = sqlite3.connect(log_path)
        conn.execute("DELETE FROM audit_records WHERE seq = (SELECT MAX(seq) FROM audit_records)")
        conn.commit()
        conn.close()
    else:
        lines = log_path.read_text().splitlines(keepends=True)
        log_path.write_text("".join(lines[:-1]))
    with pytest.raises(AuditError, match="missing its head record"):
        sink_for(log_path)


def test_two_sqlite_writers_in_one_database_form_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    one, two = AuditTrail([SqliteSink(path)]), AuditTrail([SqliteSink(path)])
    for i in range(100):
        (one if i % 2 else two).on_decision(event(Effect.ALLOW, rule_ids=(f"r{i}",)))
    one.close()
    two.close()
    result = verify_log(open_log(path))
    assert result.ok, result
    assert result.records == 100


WRITER = textwrap.dedent(
    """
    import signal, sys, time
    from bastion.audit import AuditTrail, open_sink
    from bastion.events import Decision, Effect, EventKind, Identity, AuditEvent

    path, count = sys.argv[1], int(sys.argv[2])
    # Deliberately slow sink: SIGTERM arrives while records are still queued.
    class Slow:
        def __init__(self, inner):
            self.inner = inner
        def write(self, records):
            time.sleep(0.02)
            self.inner.write(records)
        def close(self):
            self.inner.close()

    trail = AuditTrail([Slow(open_sink(path))], batch_size=50)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    ident = Identity(subject="svc")
    for i in range(count):
        d = Decision(kind=EventKind.CALL, effect=Effect.ALLOW, rule_ids=(f"r{i}",))
        trail.on_decision(AuditEvent(decision=d, identity=ident, target="t", protocol="mcp"))
    print("queued", flush=True)
    while True:
        time.sleep(1)
    """
)


@pytest.mark.parametrize("name", ["audit.jsonl", "audit.db"])
def test_sigterm_with_a_graceful_handler_flushes_every_queued_record(
    name: str, tmp_path: Path
) -> None:
    path = tmp_path / name
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), "2000"],
        stdout=subprocess.PIPE,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == b"queued"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    records = all_records(path)
    assert [r["rule_ids"][0] for r in records] == [f"r{i}" for i in range(2000)]
    assert verify_log(open_log(path)).ok


def test_sigkill_loses_at_most_the_unwritten_tail_and_the_chain_still_continues(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), "2000"], stdout=subprocess.PIPE, cwd=ROOT
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == b"queued"
    time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    survived = all_records(path)
    assert [r["rule_ids"][0] for r in survived] == [f"r{i}" for i in range(len(survived))]
    with AuditTrail([JsonlSink(path)]) as trail:
        trail.on_decision(event(Effect.ALLOW, rule_ids=("after-restart",)))
    result = verify_log(open_log(path))
    assert result.ok, result
    assert json.loads(path.read_text().splitlines()[-1])["rule_ids"] == ["after-restart"]
