"""Per-decision cost of Bastion's call decisions against a hand-indexed floor and other engines.

    python benchmarks/engine.py [--quick] [--json] [--sizes 10,1000] [--engines bastion,baseline]
                                [--requests N] [--repeats N] [--sample N]

One seeded workload (benchmarks/workload.py) per policy size, written natively for
every engine; all engines run side by side in this process, interleaved, for
``--repeats`` rounds, and the medians are reported. Every decision is checked
against the oracle (a plain scan over the neutral rules); ``agree`` is the share
that matched. Bastion and the baseline time every request; the slow engines time
the first ``n`` requests only, as many as fit 15 s per repeat (at most 2,000; 1,000
at 1,000 rules; 200 at 10,000; or ``--sample``). The table and the JSON give ``n``.
``--quick``: 1,000 requests, one repeat, a 0.5 s budget, and the slow engines stop
at 1,000 rules.

Columns: p50/p99 of one decision (µs, ``perf_counter_ns`` around each call, after a
warm-up pass, harness overhead included and printed separately); compile = build
from policy text (s); mem = Python heap retained by the built, warmed engine
(tracemalloc, MB; native engines' own heaps are not seen by it); rss = growth of
the process's resident set across the first build (MB, noisy; does see native heaps).

Goals (issue 3): Bastion p50 within 2x of the baseline at every size and flat from
10 to 10,000 rules; compile of 10,000 rules under 1 s; at least 100x faster than
cedarpy and casbin at 1,000 rules; memory under 50 MB at 10,000 rules.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(HERE), str(ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import workload as W  # noqa: E402

SIZES = (10, 100, 1_000, 10_000)
ENGINES = ("bastion", "baseline", "reference", "cedarpy", "casbin", "regopy", "bastion_fresh_id")
FAST = frozenset({"bastion", "baseline", "bastion_fresh_id"})
# Requests timed per repeat by slow engines, by policy size (the fast ones time all).
SLOW_SAMPLE = {10: 2_000, 100: 2_000, 1_000: 1_000, 10_000: 200}
SLOW_WARMUP = 5
# Seconds of timed decisions per repeat a slow engine may use at one size.
BUDGET_S = 15.0
QUICK_BUDGET_S = 0.5

Decide = Callable[[Any], bool]


@dataclass
class Built:
    decide: Decide
    inputs: list[Any]  # one prepared input per request, built outside the timed region
    keep: Any = None  # what must stay alive (the engine itself)


# --- engines ------------------------------------------------------------------------------
# Each builder takes the workload and returns the engine's decide function and its
# per-request inputs. Only the build from policy text is timed as compile.


def _identities(w: W.Workload) -> list[Any]:
    from bastion.events import Identity

    return [
        Identity(
            subject=p.subject,
            groups=p.groups,
            roles=p.roles,
            tenant=p.tenant,
            attributes={"level": p.level},
        )
        for p in w.people
    ]


def _contexts(w: W.Workload) -> list[Any]:
    from bastion.events import Context

    return [
        Context(tainted=True, taint_sources=frozenset({"web__fetch"})) if r.tainted else Context()
        for r in w.requests
    ]


def build_bastion(w: W.Workload) -> Built:
    from bastion.events import Effect
    from bastion.policy import Policy

    policy = Policy.from_source(W.to_bastion(w.rules), name="bench.policy")
    return Built(_bastion_decide(policy, Effect.ALLOW), [], policy)


def _bastion_decide(policy: Any, allow: Any) -> Decide:
    decide_call = policy.decide_call
    return lambda x: decide_call(*x).effect is allow


def bastion_inputs(w: W.Workload, fresh_identity: bool) -> list[Any]:
    ids = _identities(w)
    ctxs = _contexts(w)
    if fresh_identity:
        # A new Identity object per request, as if nothing upstream cached it.
        return [(replace(ids[r.person]), r.tool, r.args, ctxs[i]) for i, r in enumerate(w.requests)]
    return [(ids[r.person], r.tool, r.args, ctxs[i]) for i, r in enumerate(w.requests)]


def build_baseline(w: W.Workload) -> Built:
    baseline = W.IndexedBaseline(w.rules, w.tools)
    decide = baseline.decide
    return Built(lambda x: decide(*x), [], baseline)


def baseline_inputs(w: W.Workload) -> list[Any]:
    keys = [W.IndexedBaseline.keys(p) for p in w.people]
    return [(r.tool, keys[r.person], w.people[r.person], r.args, r.tainted) for r in w.requests]


def _load_reference() -> Any:
    path = ROOT / "tests" / "policy" / "reference.py"
    if not path.exists():
        raise RuntimeError(f"{path} does not exist yet")
    spec = importlib.util.spec_from_file_location("bastion_reference_interpreter", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def build_reference(w: W.Workload) -> Built:
    from bastion.policy.parser import parse_source

    ref = _load_reference()
    interp = ref.Reference([parse_source(W.to_bastion(w.rules), "bench.policy")])
    decide_call = interp.decide_call
    return Built(lambda x: decide_call(*x).effect == "allow", [], interp)


def build_cedarpy(w: W.Workload) -> Built:
    import cedarpy

    policies = cedarpy.PolicySet.from_str(W.to_cedar(w.rules))
    entities = cedarpy.Entities.from_json_str(json.dumps(W.cedar_entities(w)))
    is_authorized = cedarpy.is_authorized
    return Built(lambda x: is_authorized(x, policies, entities).allowed, [], (policies, entities))


def cedarpy_inputs(w: W.Workload) -> list[Any]:
    return [W.cedar_request(w, r) for r in w.requests]


def build_casbin(w: W.Workload) -> Built:
    import logging

    import casbin
    from casbin.model import Model

    # casbin logs every denial at WARNING; that is not the engine's decision cost.
    logging.getLogger("casbin").setLevel(logging.CRITICAL + 1)
    model = Model()
    model.load_model_from_text(W.CASBIN_MODEL)
    enforcer = casbin.Enforcer(model)
    enforcer.add_policies(W.to_casbin(w.rules))
    enforce = enforcer.enforce
    return Built(lambda x: bool(enforce(*x)), [], enforcer)


def casbin_inputs(w: W.Workload) -> list[Any]:
    from types import SimpleNamespace

    subs = [
        SimpleNamespace(groups=p.groups, roles=p.roles, tenant=p.tenant, level=p.level)
        for p in w.people
    ]
    return [(subs[r.person], r.tool, dict(r.args), {"tainted": r.tainted}) for r in w.requests]


def build_regopy(w: W.Workload) -> Built:
    import regopy

    interp = regopy.Interpreter()
    interp.add_module("bench.rego", W.to_rego(w.rules))
    bundle = interp.build("x = data.bastion.allow")
    if not bundle.ok():
        raise RuntimeError("rego bundle failed to build")
    set_input = interp.set_input
    query_bundle = interp.query_bundle

    def decide(x: Any) -> bool:
        set_input(x)
        # Keep the Output alive while its node is read: the node points into it.
        output = query_bundle(bundle)
        allowed = output.binding("x").value is True
        del output
        return allowed

    return Built(decide, [], (interp, bundle))


def regopy_inputs(w: W.Workload) -> list[Any]:
    import regopy

    return [regopy.Input(W.rego_input(w, r)) for r in w.requests]


BUILDERS: dict[str, Callable[[W.Workload], Built]] = {
    "bastion": build_bastion,
    "bastion_fresh_id": build_bastion,
    "baseline": build_baseline,
    "reference": build_reference,
    "cedarpy": build_cedarpy,
    "casbin": build_casbin,
    "regopy": build_regopy,
}
INPUTS: dict[str, Callable[[W.Workload], list[Any]]] = {
    "bastion": lambda w: bastion_inputs(w, False),
    "bastion_fresh_id": lambda w: bastion_inputs(w, True),
    "baseline": baseline_inputs,
    "reference": lambda w: bastion_inputs(w, False),
    "cedarpy": cedarpy_inputs,
    "casbin": casbin_inputs,
    "regopy": regopy_inputs,
}


# --- measurement --------------------------------------------------------------------------


def oracle_decisions(w: W.Workload) -> list[bool]:
    """The right answer for every request: the oracle's scan, over the rules that name the tool."""
    by_tool: dict[str, list[W.Rule]] = {}
    for rule in w.rules:
        names = (
            [rule.pattern]
            if rule.target == "exact"
            else [t for t in w.tools if rule.matches_tool(t)]
        )
        for name in names:
            by_tool.setdefault(name, []).append(rule)
    return [W.oracle(replace(w, rules=tuple(by_tool.get(r.tool, ()))), r) for r in w.requests]


def candidates_per_request(w: W.Workload) -> float:
    """How many rules target the requested tool, on average: the work no index can avoid."""
    per_tool: dict[str, int] = {}
    for rule in w.rules:
        for t in [rule.pattern] if rule.target == "exact" else w.tools:
            if rule.matches_tool(t):
                per_tool[t] = per_tool.get(t, 0) + 1
    return statistics.mean(per_tool.get(r.tool, 0) for r in w.requests)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        sum(range(1000))


def timer_overhead_ns(n: int = 20_000) -> float:
    clock = time.perf_counter_ns
    noop: Decide = lambda x: True  # noqa: E731
    samples = []
    for _ in range(n):
        t0 = clock()
        noop(None)
        samples.append(clock() - t0)
    return statistics.median(samples)


def timed_pass(decide: Decide, inputs: Sequence[Any]) -> tuple[list[int], list[bool]]:
    clock = time.perf_counter_ns
    samples = [0] * len(inputs)
    results = [False] * len(inputs)
    for i, x in enumerate(inputs):
        t0 = clock()
        r = decide(x)
        samples[i] = clock() - t0
        results[i] = r
    return samples, results


def _sample_size(
    engine: str,
    size: int,
    decide: Decide,
    inputs: Sequence[Any],
    sample: int | None,
    budget_s: float,
) -> int:
    """All requests for the fast engines; for the slow ones as many as fit the time budget
    (estimated from a few decisions), at least 20 and at most ``sample`` or SLOW_SAMPLE."""
    if engine in FAST:
        return len(inputs)
    cap = min(len(inputs), sample if sample is not None else SLOW_SAMPLE.get(size, 200))
    t0 = time.perf_counter()
    for x in inputs[:SLOW_WARMUP]:
        decide(x)
    cost = (time.perf_counter() - t0) / SLOW_WARMUP
    return max(min(cap, 20), min(cap, int(budget_s / cost)))


def _pct(sorted_ns: list[int], q: float) -> float:
    return sorted_ns[min(len(sorted_ns) - 1, int(len(sorted_ns) * q))] / 1000


def measure_memory(
    engine: str, w: W.Workload, inputs: Sequence[Any], warm: int
) -> tuple[float, float]:
    """Python heap retained by the built engine after a warm pass, and the build's peak (MB)."""
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    built = BUILDERS[engine](w)
    for x in inputs[:warm]:
        built.decide(x)
    gc.collect()
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del built
    return (current - base) / 2**20, (peak - base) / 2**20


def run(
    sizes: Sequence[int],
    engines: Sequence[str],
    n_requests: int,
    repeats: int,
    sample: int | None,
    log: Callable[[str], None],
    budget_s: float = 15.0,
    quick: bool = False,
) -> dict[str, dict[str, dict[str, Any]]]:
    out: dict[str, dict[str, dict[str, Any]]] = {e: {} for e in engines}
    for size in sizes:
        w = W.generate(size, n_requests)
        truth = oracle_decisions(w)
        log(
            f"rules={size}: {W.describe(w)['kinds']}, {sum(truth)}/{len(truth)} requests allowed,"
            f" {candidates_per_request(w):.1f} rules name the requested tool on average"
        )
        inputs: dict[str, list[Any]] = {}
        for e in engines:
            if quick and e not in FAST and size > 1_000:
                continue
            try:
                inputs[e] = INPUTS[e](w)
            except Exception as exc:  # an engine that is missing is reported, not fatal
                log(f"  {e}: skipped ({type(exc).__name__}: {exc})")
        live = [e for e in engines if e in inputs]
        count: dict[str, int] = {}
        compile_s: dict[str, list[float]] = {e: [] for e in live}
        p50: dict[str, list[float]] = {e: [] for e in live}
        p99: dict[str, list[float]] = {e: [] for e in live}
        agree: dict[str, float] = {}
        rss: dict[str, float] = {}
        for rep in range(repeats):
            for e in list(live):
                gc.collect()
                rss_before = _rss_mb()
                t0 = time.perf_counter()
                try:
                    built = BUILDERS[e](w)
                except Exception as exc:
                    log(f"  {e}: build failed ({type(exc).__name__}: {exc})")
                    live.remove(e)
                    continue
                compile_s[e].append(time.perf_counter() - t0)
                if rep == 0:
                    rss[e] = _rss_mb() - rss_before
                if e not in count:
                    count[e] = _sample_size(e, size, built.decide, inputs[e], sample, budget_s)
                xs = inputs[e][: count[e]]
                for x in xs if e in FAST else xs[:SLOW_WARMUP]:
                    built.decide(x)
                gc.collect()
                samples, results = timed_pass(built.decide, xs)
                samples.sort()
                p50[e].append(_pct(samples, 0.5))
                p99[e].append(_pct(samples, 0.99))
                if rep == 0:
                    agree[e] = sum(a == b for a, b in zip(results, truth, strict=False)) / len(xs)
                log(
                    f"  {e:>16} rep {rep + 1}: p50 {p50[e][-1]:9.2f} µs  p99 {p99[e][-1]:10.2f} µs"
                    f"  compile {compile_s[e][-1]:7.3f} s  agree {agree[e]:.4f}  n={len(xs)}"
                )
                del built
        for e in live:
            mem, peak = measure_memory(
                e, w, inputs[e][: count[e]], count[e] if e in FAST else SLOW_WARMUP
            )
            out[e][str(size)] = {
                "p50_us": round(statistics.median(p50[e]), 3),
                "p99_us": round(statistics.median(p99[e]), 3),
                "compile_s": round(statistics.median(compile_s[e]), 4),
                "agree": round(agree[e], 6),
                "mem_mb": round(mem, 2),
                "mem_peak_mb": round(peak, 2),
                "rss_mb": round(rss[e], 1),
                "n": count[e],
                "repeats": len(p50[e]),
            }
        del inputs
    return out


# --- report -------------------------------------------------------------------------------


def table(results: dict[str, dict[str, dict[str, Any]]], overhead_ns: float) -> str:
    sizes = sorted({int(s) for per in results.values() for s in per})
    lines = [
        f"timer + call harness overhead: {overhead_ns / 1000:.3f} µs per decision (included below)",
        "",
    ]
    head = (
        f"{'engine':>16} {'p50 µs':>10} {'p99 µs':>11} {'compile s':>10} {'mem MB':>8}"
        f" {'peak MB':>8} {'rss MB':>7} {'agree':>8} {'n':>6} {'x baseline':>11} {'x bastion':>10}"
    )
    for size in sizes:
        lines.append(f"== {size} rules ==")
        lines.append(head)
        base = results.get("baseline", {}).get(str(size))
        bast = results.get("bastion", {}).get(str(size))
        for engine, per in results.items():
            r = per.get(str(size))
            if r is None:
                continue
            vs_base = f"{r['p50_us'] / base['p50_us']:.2f}x" if base else "-"
            vs_bast = f"{r['p50_us'] / bast['p50_us']:.2f}x" if bast else "-"
            lines.append(
                f"{engine:>16} {r['p50_us']:>10.2f} {r['p99_us']:>11.2f} {r['compile_s']:>10.3f}"
                f" {r['mem_mb']:>8.2f} {r['mem_peak_mb']:>8.2f} {r['rss_mb']:>7.1f}"
                f" {r['agree'] * 100:>7.2f}% {r['n']:>6} {vs_base:>11} {vs_bast:>10}"
            )
        lines.append("")
    lines += goals(results)
    return "\n".join(lines)


def goals(results: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    b, base = results.get("bastion", {}), results.get("baseline", {})
    if not b:
        return []
    out = ["Goals:"]
    if base:
        ratios = {s: b[s]["p50_us"] / base[s]["p50_us"] for s in b if s in base}
        worst = max(ratios.values())
        out.append(
            f"  p50 within 2x of baseline at every size: {'met' if worst <= 2 else 'MISSED'}"
            f" ({', '.join(f'{s}: {r:.2f}x' for s, r in ratios.items())})"
        )
    p50s = {s: r["p50_us"] for s, r in b.items()}
    lo, hi = min(p50s, key=int), max(p50s, key=int)
    if lo != hi:
        out.append(
            f"  flat from {lo} to {hi} rules: p50 {p50s[lo]:.2f} -> {p50s[hi]:.2f} µs"
            f" ({p50s[hi] / p50s[lo]:.2f}x)"
        )
    if "10000" in b:
        c = b["10000"]["compile_s"]
        out.append(f"  compile 10,000 rules under 1 s: {'met' if c < 1 else 'MISSED'} ({c:.2f} s)")
        m, peak = b["10000"]["mem_mb"], b["10000"]["mem_peak_mb"]
        out.append(
            f"  memory under 50 MB at 10,000 rules: {'met' if m < 50 else 'MISSED'}"
            f" ({m:.1f} MB retained; build peak {peak:.1f} MB {'under' if peak < 50 else 'OVER'} 50)"
        )
    if "1000" in b:
        for other in ("cedarpy", "casbin"):
            r = results.get(other, {}).get("1000")
            if r:
                x = r["p50_us"] / b["1000"]["p50_us"]
                out.append(
                    f"  >=100x faster than {other} at 1,000 rules: {'met' if x >= 100 else 'MISSED'} ({x:.0f}x)"
                )
    disagree = [
        f"{e}@{s}: {r['agree'] * 100:.2f}%"
        for e, per in results.items()
        for s, r in per.items()
        if r["agree"] < 1
    ]
    out.append(
        "  all engines agree on every decision: "
        + ("yes" if not disagree else "NO: " + ", ".join(disagree))
    )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--json", action="store_true", help="print one JSON object instead of the table"
    )
    ap.add_argument("--quick", action="store_true", help="a reduced run, under a minute")
    ap.add_argument("--sizes", help="comma-separated rule counts (default 10,100,1000,10000)")
    ap.add_argument("--engines", help=f"comma-separated, from {','.join(ENGINES)}")
    ap.add_argument("--requests", type=int, help="requests per size (default 10000; quick 1000)")
    ap.add_argument(
        "--repeats", type=int, help="rounds per size; the median is reported (default 3; quick 1)"
    )
    ap.add_argument("--sample", type=int, help="requests timed by the slow engines at every size")
    a = ap.parse_args(argv)
    sizes = [int(s) for s in a.sizes.split(",")] if a.sizes else list(SIZES)
    if a.engines:
        engines = a.engines.split(",")
    else:
        engines = [e for e in ENGINES if not (a.quick and e == "bastion_fresh_id")]
    unknown = [e for e in engines if e not in BUILDERS]
    if unknown:
        ap.error(f"unknown engines: {', '.join(unknown)}")
    n_requests = a.requests or (1_000 if a.quick else 10_000)
    repeats = a.repeats or (1 if a.quick else 3)
    sample = a.sample

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    _spin(0.5)  # let the CPU leave its idle clock before the first engine is timed
    overhead = timer_overhead_ns()
    budget = QUICK_BUDGET_S if a.quick else BUDGET_S
    results = run(sizes, engines, n_requests, repeats, sample, log, budget, a.quick)
    if a.json:
        print(json.dumps(results))
    else:
        print(table(results, overhead))
    return 0


if __name__ == "__main__":
    sys.exit(main())
