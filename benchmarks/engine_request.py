"""The policy engine's share of one guarded LLM request, without the adapters around it.

    python benchmarks/engine_request.py [--json] [--quick] [--requests N] [--repeats N]

Mirrors the request of ``benchmarks/adapters.py`` (a chat completion with 20 tools
and 50 messages, 12 of them tool outputs) and its policy: per request, the engine
calls the pipeline makes, in its order: 1 model decision, 1 context decision, 12
result classifications (each in a new ``Context``, as the pipeline adds every
output's text to it) and 20 visibility decisions. As in the adapters, the identity
and the 20 ``ToolSpec`` objects are the same on every request (a caching identity
layer and the codecs' spec cache hand them out), while the ``RequestInfo``, the
``Context`` objects and the tool results are new per request; those are built
before the clock starts, so only engine time is measured.

Prints p50/p99 of one whole request's engine time (µs) and of its parts; median of
``--repeats`` repeats of ``--requests`` timed requests each (after a warm-up).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bastion.events import (  # noqa: E402
    Context,
    Effect,
    Identity,
    ModelRequest,
    RequestInfo,
    ToolResult,
    ToolSpec,
)
from bastion.policy import Policy  # noqa: E402

# The same policy as benchmarks/adapters.py.
POLICY = """
default call allow
default result trusted
default model allow
tools outward = ["send_*", "post_*", "transfer"]
forbid call outward when context.tainted reason "no outward actions after untrusted content"
forbid call "delete_*" reason "never delete"
hide tool "admin_*" unless identity.groups has "admin"
ask call "transfer" when args.amount > 100
untrusted result "web_*"
redact result "read_secrets" using ["secrets"]
allow model "gpt-*"
"""

TOOLS = 20
RESULTS = 12
PARTS = ("model", "context", "results", "visibility")


def tool_specs() -> list[ToolSpec]:
    return [
        ToolSpec(
            f"tool_{i}",
            f"tool number {i}",
            {"type": "object", "properties": {"q": {"type": "string"}}},
        )
        for i in range(TOOLS)
    ]


class Request:
    """One request's fresh objects, built before timing."""

    __slots__ = ("contexts", "info", "model", "results")

    def __init__(self, n: int) -> None:
        self.info = RequestInfo(method="POST", path="/v1/chat/completions", protocol="openai")
        user_texts = ("You are helpful.", *(f"Please look up item {i} for me." for i in range(13)))
        c = Context(session=None, user_texts=user_texts)
        self.model = ModelRequest("gpt-test", protocol="openai", max_tokens=None)
        self.results: list[ToolResult] = []
        self.contexts: list[Context] = [c]
        for i in range(RESULTS):
            text = f"result {i}: " + "data " * 20
            self.results.append(ToolResult(f"call_{i}", f"tool_{i % TOOLS}", text, {"q": "x"}))
            c = Context(
                c.tainted,
                c.taint_sources,
                c.session,
                c.turn,
                c.user_texts,
                (*c.trusted_texts, text),
                c.untrusted_texts,
                c.attributes,
            )
            self.contexts.append(c)


def run_request(
    policy: Policy,
    identity: Identity,
    specs: list[ToolSpec],
    by_name: dict[str, ToolSpec],
    req: Request,
    parts: dict[str, list[float]] | None,
) -> int:
    clock = time.perf_counter_ns
    t0 = clock()
    d = policy.decide_model(identity, req.model, req.contexts[0], request=req.info)
    assert d.effect is Effect.ALLOW
    t1 = clock()
    policy.decide_context(identity, request=req.info)
    t2 = clock()
    for i, result in enumerate(req.results):
        policy.classify_result(
            identity,
            by_name[result.name],
            result.arguments,
            result,
            req.contexts[i],
            request=req.info,
        )
    t3 = clock()
    context = req.contexts[-1]
    shown = 0
    for spec in specs:
        if (
            policy.decide_visibility(identity, spec, context, request=req.info).effect
            is Effect.SHOW
        ):
            shown += 1
    t4 = clock()
    if parts is not None:
        parts["model"].append((t1 - t0) / 1000)
        parts["context"].append((t2 - t1) / 1000)
        parts["results"].append((t3 - t2) / 1000)
        parts["visibility"].append((t4 - t3) / 1000)
        parts["total"].append((t4 - t0) / 1000)
    return shown


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def bench(requests: int, repeats: int) -> dict[str, Any]:
    policy = Policy.from_source(POLICY)
    identity = Identity("bench-agent")
    specs = tool_specs()
    by_name = {s.name: s for s in specs}
    runs: list[dict[str, dict[str, float]]] = []
    for _ in range(repeats):
        batch = [Request(n) for n in range(requests)]
        for req in batch[: max(1, requests // 10)]:
            assert run_request(policy, identity, specs, by_name, req, None) == TOOLS
        batch = [Request(n) for n in range(requests)]
        parts: dict[str, list[float]] = {k: [] for k in (*PARTS, "total")}
        for req in batch:
            run_request(policy, identity, specs, by_name, req, parts)
        runs.append(
            {k: {"p50": percentile(v, 0.5), "p99": percentile(v, 0.99)} for k, v in parts.items()}
        )
    out: dict[str, Any] = {
        "request": {"tools": TOOLS, "results": RESULTS, "model": 1, "context": 1},
        "requests": requests,
        "repeats": repeats,
    }
    for k in (*PARTS, "total"):
        out[k] = {q: round(statistics.median(r[k][q] for r in runs), 2) for q in ("p50", "p99")}
    out["p50_us"] = out["total"]["p50"]
    out["p99_us"] = out["total"]["p99"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--quick", action="store_true", help="500 requests, 3 repeats")
    ap.add_argument("--requests", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    args = ap.parse_args(argv)
    requests = args.requests or (500 if args.quick else 3000)
    repeats = args.repeats or (3 if args.quick else 7)
    res = bench(requests, repeats)
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"engine time per request ({requests} requests x {repeats} repeats, median):")
    for k in (*PARTS, "total"):
        print(f"  {k:<11} p50 {res[k]['p50']:8.2f} µs   p99 {res[k]['p99']:8.2f} µs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
