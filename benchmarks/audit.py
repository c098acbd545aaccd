"""Cost of auditing a decision: the hook on the request path, and the writer behind it.

    python benchmarks/audit.py [--quick] [--json] [--decisions N]

For each shipped sink (JSON Lines, SQLite), two measurements:

* hook: p50/p99 (µs) of one ``AuditTrail.on_decision`` call, ``perf_counter_ns``
  around each call while the writer thread runs (GIL contention included), the
  harness's own timer overhead printed separately;
* writer: records per second from the first decision queued until every record is
  stored (record building, redaction, hashing, I/O).

Goal (issue 7): hook under 10 µs p50.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bastion.audit import AuditSink, AuditTrail, JsonlSink, SqliteSink  # noqa: E402
from bastion.events import (  # noqa: E402
    AuditEvent,
    Decision,
    Effect,
    EventKind,
    Identity,
    RequestInfo,
)

GOAL_P50_US = 10.0


def make_events(n: int) -> list[AuditEvent]:
    identity = Identity(subject="alice", groups=("eng",), tenant="acme", key_id="vk_1")
    events = []
    for i in range(n):
        effect = Effect.FORBID if i % 10 == 0 else Effect.ALLOW
        decision = Decision(
            kind=EventKind.CALL, effect=effect, rule_ids=(f"rule-{i % 7}",), reasons=("r",)
        )
        events.append(
            AuditEvent(
                decision=decision,
                identity=identity,
                target="github__create_issue",
                protocol="mcp",
                request=RequestInfo(path="/mcp"),
                session="s-1",
                arguments={"repo": "acme/app", "title": f"issue {i}", "token": "ghp_x"},
                detail={"latency_ms": 0.02},
            )
        )
    return events


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def timer_overhead_us(n: int = 20_000) -> float:
    clock = time.perf_counter_ns
    samples = []
    for _ in range(n):
        t0 = clock()
        samples.append(clock() - t0)
    return statistics.median(samples) / 1000


def bench_sink(name: str, factory: Callable[[Path], AuditSink], n: int) -> dict[str, Any]:
    events = make_events(n)
    with tempfile.TemporaryDirectory() as tmp:
        trail = AuditTrail([factory(Path(tmp))], queue_size=n * 2)
        hook = trail.on_decision
        clock = time.perf_counter_ns
        samples = []
        start = time.perf_counter()
        for ev in events:
            t0 = clock()
            hook(ev)
            samples.append(clock() - t0)
        trail.flush(timeout=120)
        elapsed = time.perf_counter() - start
        trail.close()
    us = [s / 1000 for s in samples]
    return {
        "sink": name,
        "decisions": n,
        "hook_p50_us": round(percentile(us, 0.50), 3),
        "hook_p99_us": round(percentile(us, 0.99), 3),
        "writer_records_per_s": round(n / elapsed),
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer decisions (CI)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--decisions", type=int, help="decisions per sink")
    args = parser.parse_args(argv)
    n = args.decisions or (5_000 if args.quick else 50_000)
    sinks: list[tuple[str, Callable[[Path], AuditSink]]] = [
        ("jsonl", lambda d: JsonlSink(d / "audit.jsonl")),
        ("sqlite", lambda d: SqliteSink(d / "audit.db")),
    ]
    results = [bench_sink(name, factory, n) for name, factory in sinks]
    overhead = timer_overhead_us()
    ok = all(r["hook_p50_us"] < GOAL_P50_US for r in results)
    if args.json:
        print(
            json.dumps(
                {
                    "goal_hook_p50_us": GOAL_P50_US,
                    "timer_overhead_us": round(overhead, 3),
                    "results": results,
                    "goal_met": ok,
                },
                indent=2,
            )
        )
    else:
        print(f"{'sink':8} {'n':>7} {'hook p50 µs':>12} {'hook p99 µs':>12} {'writer rec/s':>13}")
        for r in results:
            print(
                f"{r['sink']:8} {r['decisions']:>7} {r['hook_p50_us']:>12.2f} "
                f"{r['hook_p99_us']:>12.2f} {r['writer_records_per_s']:>13,}"
            )
        print(f"timer overhead {overhead:.3f} µs; goal: hook p50 < {GOAL_P50_US} µs: ", end="")
        print("met" if ok else "NOT met")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
