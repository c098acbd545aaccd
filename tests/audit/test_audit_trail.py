"""The writer behind the hook: concurrency, back-pressure and failing sinks."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from pathlib import Path

import pytest

from bastion.audit import AuditTrail, JsonlSink, open_log, verify_log
from bastion.errors import AuditError
from bastion.events import Effect

from .conftest import SlowSink, SwitchableSink, all_records, event, sink_for, wait_until


def full_disk_sink(tmp_path: Path) -> JsonlSink:
    """A JSON Lines sink whose file is /dev/full: every write fails with ENOSPC."""
    link = tmp_path / "audit.jsonl"
    os.symlink("/dev/full", link)
    return JsonlSink(link)


async def test_a_thousand_decisions_from_tasks_and_threads_are_all_recorded(
    log_path: Path,
) -> None:
    trail = AuditTrail([sink_for(log_path)], batch_size=64)

    async def task(n: int) -> None:
        for i in range(10):
            trail.on_decision(event(Effect.ALLOW, rule_ids=(f"task-{n}-{i}",)))
            await asyncio.sleep(0)

    def thread(n: int) -> None:
        for i in range(50):
            trail.on_decision(event(Effect.FORBID, rule_ids=(f"thread-{n}-{i}",)))

    threads = [threading.Thread(target=thread, args=(n,)) for n in range(10)]
    for t in threads:
        t.start()
    await asyncio.gather(*(task(n) for n in range(50)))
    for t in threads:
        await asyncio.to_thread(t.join)
    await trail.aclose()

    records = all_records(log_path)
    expected = {f"task-{n}-{i}" for n in range(50) for i in range(10)} | {
        f"thread-{n}-{i}" for n in range(10) for i in range(50)
    }
    assert len(records) == 1000
    assert {r["rule_ids"][0] for r in records} == expected
    result = verify_log(open_log(log_path))
    assert result.ok, result
    assert result.records == 1000


def test_the_hook_does_not_wait_for_a_slow_sink(tmp_path: Path) -> None:
    slow = SlowSink(JsonlSink(tmp_path / "audit.jsonl"), delay=5.0)
    trail = AuditTrail([slow])
    start = time.perf_counter()
    for _ in range(100):
        trail.on_decision(event(Effect.ALLOW))
    elapsed = time.perf_counter() - start
    assert elapsed < 0.5
    slow.release.set()
    trail.close()
    assert len(all_records(tmp_path / "audit.jsonl")) == 100


def test_fail_closed_refuses_decisions_once_the_disk_is_full(tmp_path: Path) -> None:
    trail = AuditTrail([full_disk_sink(tmp_path)], on_overflow="fail_closed")
    trail.on_decision(event(Effect.ALLOW))
    assert wait_until(lambda: not trail.healthy)
    with pytest.raises(AuditError, match="sink is failing"):
        trail.on_decision(event(Effect.ALLOW))
    trail.close(timeout=0.2)


def test_fail_closed_logs_records_it_could_not_write_at_close(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The sink fails only once both decisions are in: were the first write to fail
    # before the second decision, fail-closed would (rightly) refuse the second.
    held = SlowSink(full_disk_sink(tmp_path), delay=10.0)
    trail = AuditTrail([held], on_overflow="fail_closed")
    trail.on_decision(event(Effect.ALLOW))
    trail.on_decision(event(Effect.ALLOW))
    held.release.set()
    with caplog.at_level(logging.ERROR, logger="bastion.audit"):
        trail.close(timeout=0.2)
    assert "closed with 2 record(s) not written" in caplog.text
    assert trail.dropped == 2


def test_drop_mode_keeps_accepting_and_counts_every_dropped_record(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="bastion.audit"):
        trail = AuditTrail([full_disk_sink(tmp_path)], on_overflow="drop")
        for _ in range(25):
            trail.on_decision(event(Effect.ALLOW))
        assert trail.flush(timeout=5)
        assert trail.dropped == 25
        assert not trail.healthy
        trail.close()
    assert "audit dropped" in caplog.text
    assert "No space left on device" in caplog.text


def test_fail_closed_raises_when_the_queue_is_full(tmp_path: Path) -> None:
    slow = SlowSink(JsonlSink(tmp_path / "audit.jsonl"), delay=10.0)
    trail = AuditTrail([slow], queue_size=20, on_overflow="fail_closed")
    trail.on_decision(event(Effect.ALLOW))
    assert slow.entered.wait(5)
    accepted = 1
    with pytest.raises(AuditError, match="queue is full"):
        for _ in range(1000):
            trail.on_decision(event(Effect.ALLOW))
            accepted += 1
    assert not trail.healthy
    assert accepted == 21
    slow.release.set()
    trail.close()
    assert len(all_records(tmp_path / "audit.jsonl")) == accepted


def test_drop_mode_counts_decisions_that_found_the_queue_full(tmp_path: Path) -> None:
    slow = SlowSink(JsonlSink(tmp_path / "audit.jsonl"), delay=10.0)
    trail = AuditTrail([slow], queue_size=20, on_overflow="drop")
    # One record in the writer's hands first, so exactly the queue's 20 wait behind it.
    trail.on_decision(event(Effect.ALLOW))
    assert slow.entered.wait(5)
    for _ in range(99):
        trail.on_decision(event(Effect.ALLOW))
    slow.release.set()
    trail.close()
    written = len(all_records(tmp_path / "audit.jsonl"))
    assert written == 21
    assert trail.dropped == 79


def test_fail_closed_recovers_when_the_sink_does_and_loses_nothing(tmp_path: Path) -> None:
    sink = SwitchableSink(tmp_path / "audit.jsonl")
    trail = AuditTrail([sink], retry_interval=0.05)
    trail.on_decision(event(Effect.ALLOW, rule_ids=("before",)))
    assert trail.flush()
    sink.broken = True
    trail.on_decision(event(Effect.ALLOW, rule_ids=("during",)))
    assert wait_until(lambda: not trail.healthy)
    with pytest.raises(AuditError):
        trail.on_decision(event(Effect.ALLOW, rule_ids=("refused",)))
    sink.broken = False
    assert wait_until(lambda: trail.healthy)
    trail.on_decision(event(Effect.ALLOW, rule_ids=("after",)))
    trail.close()
    records = all_records(tmp_path / "audit.jsonl")
    assert [r["rule_ids"][0] for r in records] == ["before", "during", "after"]
    assert verify_log(open_log(tmp_path / "audit.jsonl")).ok


def test_a_failing_sink_does_not_stop_the_others(tmp_path: Path) -> None:
    good = tmp_path / "good.db"
    trail = AuditTrail([full_disk_sink(tmp_path), sink_for(good)], on_overflow="drop")
    for _ in range(10):
        trail.on_decision(event(Effect.ALLOW))
    trail.close()
    assert len(all_records(good)) == 10
    assert trail.dropped == 10


def test_decisions_after_close_are_refused_when_fail_closed(tmp_path: Path) -> None:
    trail = AuditTrail([JsonlSink(tmp_path / "audit.jsonl")])
    trail.close()
    with pytest.raises(AuditError, match="closed"):
        trail.on_decision(event(Effect.ALLOW))


def test_decisions_after_close_are_counted_as_dropped_in_drop_mode(tmp_path: Path) -> None:
    trail = AuditTrail([JsonlSink(tmp_path / "audit.jsonl")], on_overflow="drop")
    trail.close()
    trail.on_decision(event(Effect.ALLOW))
    assert trail.dropped == 1


def test_an_unusable_overflow_mode_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="on_overflow"):
        AuditTrail([JsonlSink(tmp_path / "a.jsonl")], on_overflow="ignore")  # type: ignore[arg-type]
