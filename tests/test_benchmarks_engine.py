"""The engine benchmark cannot rot: its workload is sound and every engine still agrees on it."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


engine = _load("bench_engine", BENCH / "engine.py")
W = engine.W


@pytest.fixture(scope="module")
def small() -> Any:
    return W.generate(60, 400, seed=3)


def test_workload_is_the_same_for_the_same_seed_and_size() -> None:
    assert W.generate(50, 100) == W.generate(50, 100)
    assert W.generate(50, 100).rules != W.generate(50, 100, seed=8).rules


@pytest.mark.parametrize("size", [10, 100, 1_000])
def test_workload_has_the_requested_number_of_rules_with_unique_ids(size: int) -> None:
    rules = W.generate(size, 10).rules
    assert len(rules) == size
    assert len({r.id for r in rules}) == size


def test_workload_mixes_every_target_condition_and_effect() -> None:
    w = W.generate(400, 2_000)
    assert {r.target for r in w.rules} == {"exact", "server", "prefix"}
    assert {r.effect for r in w.rules} == {"allow", "forbid"}
    kinds = {c.kind for r in w.rules for c in r.conds}
    assert kinds == {
        "group",
        "tenant",
        "role",
        "level_ge",
        "amount_gt",
        "amount_lt",
        "repo_prefix",
        "tainted",
        "not_tainted",
    }


def test_requests_are_neither_all_allowed_nor_all_denied_and_forbids_override(
    small: Any,
) -> None:
    w = small
    truth = [W.oracle(w, r) for r in w.requests]
    assert 0.15 < sum(truth) / len(truth) < 0.85
    overridden = 0
    for r in w.requests:
        person = w.people[r.person]
        matching = [
            rule
            for rule in w.rules
            if rule.matches_tool(r.tool)
            and all(W.holds(c, person, r.args, r.tainted) for c in rule.conds)
        ]
        effects = {rule.effect for rule in matching}
        if effects == {"allow", "forbid"}:
            overridden += 1
            assert not W.oracle(w, r)
    assert overridden > 0


def test_indexed_oracle_equals_the_full_scan(small: Any) -> None:
    w = small
    assert engine.oracle_decisions(w) == [W.oracle(w, r) for r in w.requests]


ENGINES = ["bastion", "bastion_fresh_id", "baseline", "reference", "cedarpy", "casbin", "regopy"]


@pytest.mark.parametrize("name", ENGINES)
def test_engine_decides_every_request_like_the_oracle(name: str, small: Any) -> None:
    w = small
    if name == "reference" and not (ROOT / "tests" / "policy" / "reference.py").exists():
        pytest.skip("the reference interpreter has not landed yet")
    built = engine.BUILDERS[name](w)
    inputs = engine.INPUTS[name](w)
    decided = [built.decide(x) for x in inputs]
    truth = [W.oracle(w, r) for r in w.requests]
    wrong = [i for i, (a, b) in enumerate(zip(decided, truth, strict=True)) if a != b]
    assert wrong == [], f"{name} disagrees on requests {wrong[:10]}"


def test_json_output_is_one_object_of_engines_sizes_and_metrics() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "engine.py"),
            "--json",
            "--sizes",
            "10,30",
            "--requests",
            "200",
            "--repeats",
            "1",
            "--engines",
            "bastion,baseline,cedarpy",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    data = json.loads(proc.stdout)
    assert set(data) == {"bastion", "baseline", "cedarpy"}
    for per in data.values():
        assert set(per) == {"10", "30"}
        for row in per.values():
            assert {"p50_us", "p99_us", "compile_s", "agree", "mem_mb"} <= set(row)
            assert row["agree"] == 1.0
            assert 0 < row["p50_us"] <= row["p99_us"]
