"""`bastion audit tail | query | explain` on JSON Lines and SQLite logs."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bastion.audit import AuditTrail, JsonlSink
from bastion.audit.cli import main, parse_time
from bastion.events import Effect, EventKind

from .conftest import ALICE, BOB, all_records, event, sink_for

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def populated(log_path: Path) -> Path:
    """A log with decisions by alice and bob on several tools."""
    with AuditTrail([sink_for(log_path)]) as trail:
        trail.on_decision(event(Effect.ALLOW, target="github__list_issues", identity=ALICE))
        trail.on_decision(
            event(
                Effect.FORBID,
                rule_ids=("no-exfil",),
                target="mail__send",
                identity=BOB,
                traced=True,
            )
        )
        trail.on_decision(
            event(Effect.ASK, rule_ids=("pay-approval",), target="bank__pay", identity=BOB)
        )
        trail.on_decision(event(Effect.ALLOW, target="github__create_issue", identity=ALICE))
        trail.on_decision(
            event(
                Effect.ALLOW,
                rule_ids=("models",),
                target="gpt-4o",
                kind=EventKind.MODEL,
                identity=BOB,
            )
        )
    return log_path


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().out


def query_json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> list[dict[str, object]]:
    code, out = run(["query", *argv, "--format", "json"], capsys)
    assert code == 0
    return [json.loads(line) for line in out.splitlines()]


def test_query_by_subject(populated: Path, capsys: pytest.CaptureFixture[str]) -> None:
    found = query_json([str(populated), "--subject", "bob"], capsys)
    assert [r["target"] for r in found] == ["mail__send", "bank__pay", "gpt-4o"]


def test_query_by_tool_glob(populated: Path, capsys: pytest.CaptureFixture[str]) -> None:
    found = query_json([str(populated), "--tool", "github__*"], capsys)
    assert [r["target"] for r in found] == ["github__list_issues", "github__create_issue"]


def test_query_by_effect_and_rule(populated: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert [r["target"] for r in query_json([str(populated), "--effect", "forbid"], capsys)] == [
        "mail__send"
    ]
    assert [
        r["target"] for r in query_json([str(populated), "--rule", "pay-approval"], capsys)
    ] == ["bank__pay"]


def test_query_by_time_range(populated: Path, capsys: pytest.CaptureFixture[str]) -> None:
    records = all_records(populated)
    since, until = records[1]["time"], records[3]["time"]
    found = query_json([str(populated), "--since", since, "--until", until], capsys)
    assert [r["id"] for r in found] == [records[1]["id"], records[2]["id"]]
    assert query_json([str(populated), "--since", "1h"], capsys) != []
    assert query_json([str(populated), "--until", "2000-01-01"], capsys) == []


def test_query_table_lists_one_row_per_record(
    populated: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = run(["query", str(populated), "--subject", "alice"], capsys)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["TIME", "ID", "SUBJECT", "KIND", "TARGET", "EFFECT", "RULES"]
    assert len(lines) == 3
    assert lines[1].split()[2:6] == ["alice", "call", "github__list_issues", "allow"]


def test_tail_prints_the_last_records(populated: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(["tail", str(populated), "-n", "2", "--format", "json"], capsys)
    assert code == 0
    assert [json.loads(line)["target"] for line in out.splitlines()] == [
        "github__create_issue",
        "gpt-4o",
    ]


def test_explain_prints_the_recorded_trace(
    populated: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (denied,) = [r for r in all_records(populated) if r["effect"] == "forbid"]
    code, out = run(["explain", str(populated), str(denied["id"])], capsys)
    assert code == 0
    assert "decision call mail__send -> FORBID" in out
    assert "rules    no-exfil" in out
    assert "- no-exfil forbid: matched  (mail.policy:7:1)" in out
    assert "when   args.to from untrusted" in out
    assert "- allow-mail allow: no match  (mail.policy:3:1)" in out


def test_explain_says_when_no_trace_was_recorded(
    populated: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    allowed = all_records(populated)[0]
    code, out = run(["explain", str(populated), str(allowed["id"])], capsys)
    assert code == 0
    assert "trace    not recorded" in out


def test_explain_of_an_unknown_record_exits_1(
    populated: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["explain", str(populated), "nope"]) == 1
    assert "no record nope" in capsys.readouterr().err


def test_a_missing_log_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", str(tmp_path / "absent.jsonl")]) == 2
    assert "no audit log" in capsys.readouterr().err


def test_query_reads_across_rotated_segments(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditTrail([JsonlSink(path, max_bytes=2_500)], batch_size=1) as trail:
        for i in range(12):
            trail.on_decision(event(Effect.ALLOW, rule_ids=(f"r{i}",)))
            trail.flush()
    assert len(list(tmp_path.glob("audit.*.jsonl"))) > 1
    found = query_json([str(path), "--rule", "r0"], capsys)
    assert len(found) == 1


def test_relative_times_count_back_from_now() -> None:
    now = 1_800_000_000.0
    assert parse_time("2h", now=now) == "2027-01-15T06:00:00.000000Z"
    assert parse_time("2027-01-15T08:00:00Z") == "2027-01-15T08:00:00.000000Z"
    assert parse_time("2027-01-15") == "2027-01-15T00:00:00.000000Z"


@pytest.mark.parametrize("name", ["audit.jsonl", "audit.db"])
def test_tail_follow_prints_records_as_they_are_written(name: str, tmp_path: Path) -> None:
    path = tmp_path / name
    trail = AuditTrail([sink_for(path, max_bytes=3_000)])
    trail.on_decision(event(Effect.ALLOW, rule_ids=("old",)))
    trail.flush()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bastion.audit.cli",
            "tail",
            "-f",
            "-n",
            "1",
            "--format",
            "json",
            str(path),
        ],
        stdout=subprocess.PIPE,
        cwd=ROOT,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    try:
        assert json.loads(lines.get(timeout=10))["rule_ids"] == ["old"]
        time.sleep(0.5)
        for i in range(8):  # enough to rotate the JSON Lines file more than once
            trail.on_decision(event(Effect.FORBID, rule_ids=(f"new-{i}",)))
            trail.flush()
        seen = [json.loads(lines.get(timeout=10))["rule_ids"][0] for _ in range(8)]
        assert seen == [f"new-{i}" for i in range(8)]
    finally:
        proc.terminate()
        proc.wait(timeout=5)
        trail.close()
