"""Differential test: the compiled engine decides exactly like the reference interpreter.

Hypothesis writes random policies (every rule kind, literal/glob/set targets,
conditions over identity/args/tool/context/request/model/result with every
operator, shadow annotations per rule and per file, defaults) and random
requests, and every decision kind is compared field by field, with and without
``explain`` (which takes the engine's AST-walking path). Policies are reused for
several requests, with repeated identity objects, so the per-identity caches and
the memoized candidate lists are exercised too.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bastion import Context, Decision, Identity, ModelRequest, Policy, RequestInfo, ToolSpec
from bastion.policy.schema import Schema

from .reference import RefDecision, Reference

SETTINGS = settings(
    max_examples=750,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

TOOLS = [
    "gh__get",
    "gh__push",
    "gh__delete",
    "pay__send",
    "web__fetch",
    "mail__read",
    "x",
    "gh_get",
]
PATTERNS = ["gh__*", "*__get", "pay__*", "g?__get", "*e*", "mail__read", "x", "gh__push", "*"]
MODELS = ["gpt-4", "gpt-5", "claude-3", "local"]
MODEL_PATTERNS = ["gpt-*", "claude*", "local", "gpt-5"]
STRINGS = ["eng", "ops", "a", "gh__get", "x@y.com", "", "alice", "Eng", "secret-project-x"]

SCHEMA = Schema.from_mapping(
    {
        "tools": {
            "pay__send": {"effect": "send", "destinations": ["to", "cc"]},
            "gh__push": {"effect": "write", "annotations": {"destructiveHint": True}},
        }
    }
)

PATHS = [
    "identity.sub",
    "identity.subject",
    "identity.groups",
    "identity.tenant",
    "identity.email",
    "identity.level",
    "identity.team.name",
    "identity",
    "args.n",
    "args.s",
    "args.l",
    "args.l[0]",
    "args.l[1]",
    "args.o",
    "args.o.k",
    'args["o"]["k"]',
    "args.to",
    "args",
    "tool.name",
    "tool.server",
    "tool.readOnlyHint",
    "tool.annotations.destructiveHint",
    "tool.effect",
    "tool.destinations",
    "context.tainted",
    "context.turn",
    "context.taint_sources",
    "context.user_text",
    "context.pin",
    "request.method",
    'request.headers["x-team"]',
    "request.client",
    "model.name",
    "model.max_tokens",
    "model.provider",
    "result.text",
    "result.is_error",
    "destinations",
    "destinations[0]",
]
OPS = [
    "==",
    "!=",
    "<",
    "<=",
    ">",
    ">=",
    "in",
    "not in",
    "has",
    "contains",
    "startswith",
    "endswith",
]
REGEXES = [
    "^a",
    "e.g",
    "(?i)ENG",
    "\\\\d+",
    "o$",
    "[a-c]x?",
    "^$",
    "(gh|pay)__\\\\w+",
    "\\\\bx\\\\b",
]
LIKES = ["g*", "*__get", "?ng", "*", "a*b?"]


def lit(draw: Any) -> str:
    kind = draw(st.sampled_from(["str", "num", "bool", "null", "list"]))
    if kind == "str":
        return json.dumps(draw(st.sampled_from(STRINGS)))
    if kind == "num":
        return str(draw(st.sampled_from([0, 1, 3, -2, 100, 2.5, 3.0, 5000])))
    if kind == "bool":
        return draw(st.sampled_from(["true", "false"]))
    if kind == "null":
        return "null"
    items = draw(
        st.lists(st.sampled_from(['"eng"', '"ops"', "1", "true", '"a"', "args.s"]), max_size=3)
    )
    return "[" + ", ".join(items) + "]"


def value(draw: Any) -> str:
    kind = draw(st.sampled_from(["path", "path", "path", "lit", "set", "concat"]))
    if kind == "path":
        return draw(st.sampled_from(PATHS))
    if kind == "lit":
        return lit(draw)
    if kind == "set":
        return draw(st.sampled_from(["admins", "outward", "cheap"]))
    a = draw(st.sampled_from(["args.s", "args.n", "identity.sub", '"gh__"', "1"]))
    b = draw(st.sampled_from(["args.s", "args.n", '"get"', "2", "tool.name"]))
    return f"{a} + {b}"


def condition(draw: Any, depth: int = 0) -> str:
    kind = draw(
        st.sampled_from(
            ["cmp", "cmp", "cmp", "bare", "matches", "like", "from"]
            + (["and", "or", "not"] if depth < 2 else [])
        )
    )
    if kind == "cmp":
        right = lit(draw) if draw(st.booleans()) else value(draw)
        return f"{value(draw)} {draw(st.sampled_from(OPS))} {right}"
    if kind == "bare":
        return draw(st.sampled_from([*PATHS, "true", "false"]))
    if kind == "matches":
        return f'{value(draw)} matches "{draw(st.sampled_from(REGEXES))}"'
    if kind == "like":
        return f'{value(draw)} like "{draw(st.sampled_from(LIKES))}"'
    if kind == "from":
        src = draw(st.sampled_from(["untrusted", "user", "trusted"]))
        return f"{draw(st.sampled_from(['args.to', 'args.s', 'destinations', 'args', 'identity.email']))} from {src}"
    if kind == "not":
        return f"not ({condition(draw, depth + 1)})"
    joiner = " and " if kind == "and" else " or "
    parts = draw(st.lists(st.just(0), min_size=2, max_size=3))
    return "(" + joiner.join(condition(draw, depth + 1) for _ in parts) + ")"


RULE_KINDS = {
    "call": ["allow", "forbid", "ask"],
    "tool": ["hide", "show"],
    "result": ["trusted", "untrusted", "quarantine", "redact", "block"],
    "model": ["allow", "forbid"],
    "context": ["trusted", "untrusted"],
}


def target(draw: Any, kind: str) -> str:
    shape = draw(st.sampled_from(["pat", "pat", "list", "set", "any", "none"]))
    pats = MODEL_PATTERNS if kind in ("model",) else PATTERNS
    if shape == "pat":
        return json.dumps(draw(st.sampled_from(pats + (MODELS if kind == "model" else TOOLS))))
    if shape == "list":
        return json.dumps(draw(st.lists(st.sampled_from(pats), min_size=1, max_size=3)))
    if shape == "set":
        return "cheap" if kind == "model" else "outward"
    return "*" if shape == "any" else ""


@st.composite
def policies(draw: Any) -> str:
    lines: list[str] = []
    if draw(st.booleans()) and draw(st.booleans()):
        lines += ['@mode("shadow")', 'policy "trial"']
    lines += [
        'values admins = ["root", "eng", 3, true]',
        'tools outward = ["gh__push", "pay__*", "x"]',
        'models cheap = ["gpt-4", "local*"]',
    ]
    for kind, options in (
        ("call", ["deny", "allow", "ask"]),
        ("result", ["trusted", "untrusted", "quarantine", "block"]),
        ("model", ["allow", "deny"]),
        ("context", ["trusted", "untrusted"]),
    ):
        if draw(st.booleans()):
            lines.append(f"default {kind} {draw(st.sampled_from(options))}")
    n = draw(st.integers(min_value=1, max_value=12))
    for i in range(n):
        if draw(st.integers(0, 9)) == 0:
            lk = draw(st.sampled_from(["call", "model"]))
            by = draw(
                st.sampled_from(["", " by identity.tenant", " by args.s", " by identity.groups"])
            )
            when = f" when {condition(draw)}" if draw(st.booleans()) else ""
            lines.append(f"limit {lk} {target(draw, lk)} to {i + 1} per 1m{by}{when}")
            continue
        kind = draw(st.sampled_from(["call", "call", "call", "tool", "result", "model", "context"]))
        effect = draw(st.sampled_from(RULE_KINDS[kind]))
        parts: list[str] = []
        ann = draw(
            st.sampled_from(["", "", f'@id("r{i}") ', '@mode("shadow") ', '@mode("enforce") '])
        )
        parts.append(f"{ann}{effect} {kind}")
        if kind != "context":
            parts.append(target(draw, kind))
        for _ in range(draw(st.integers(0, 2))):
            parts.append(f"{draw(st.sampled_from(['when', 'unless']))} {condition(draw)}")
        if draw(st.booleans()):
            parts.append(f'reason "because {i}"')
        if kind == "model" and draw(st.booleans()):
            parts.append(f'route "{draw(st.sampled_from(["p1", "p2"]))}"')
        if kind == "result":
            if draw(st.booleans()):
                parts.append(
                    "at "
                    + json.dumps(
                        draw(
                            st.lists(
                                st.sampled_from(["body", "subject", "id"]), min_size=1, max_size=2
                            )
                        )
                    )
                )
            if effect == "redact" and draw(st.booleans()):
                parts.append(
                    "using "
                    + json.dumps(
                        draw(st.lists(st.sampled_from(["aws", "email", "x\\\\d+"]), max_size=2))
                    )
                )
            if effect == "quarantine" and draw(st.booleans()):
                parts.append('with {"questions": ["q' + str(i) + '"], "model": "m"}')
        lines.append(" ".join(parts))
    return "\n".join(lines)


JSON_SCALARS = st.sampled_from([*STRINGS, 0, 1, 3, -2, 100, 2.5, 3.0, True, False, None])
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from(["k", "a", "z"]), inner, max_size=2),
    ),
    max_leaves=4,
)
NUMBERS = st.sampled_from([0, 1, 3, 3.0, -2, 2.5, 100, "3", True])
ARGS = st.fixed_dictionaries(
    {},
    optional={
        "n": NUMBERS,
        "s": st.sampled_from(STRINGS),
        "l": st.lists(st.sampled_from(["eng", "a", 1, 3, True]), max_size=3),
        "o": st.one_of(st.fixed_dictionaries({"k": JSON_SCALARS}), JSON_VALUES),
        "to": st.sampled_from(["x@y.com", "alice@acme.example", "DE89370400440532013000", "eng"]),
        "cc": st.lists(st.sampled_from(["x@y.com", "b@c.org"]), max_size=2),
    },
)

IDENTITIES = [
    Identity("alice", groups=("eng",), tenant="acme", email="alice@acme.example"),
    Identity(
        "bob",
        groups=("ops", "eng"),
        roles=("admin",),
        attributes={"level": 3, "team": {"name": "red"}},
    ),
    Identity("root", anonymous=True, attributes={"level": "3"}),
    Identity("eng", groups=("Eng",), tenant="gh__get", attributes={"tenant": "x", "level": 100}),
    Identity("x", groups=(), attributes={"team": {"name": "eng"}, "level": 2.5}),
]
IDENTITY = st.one_of(
    st.sampled_from(IDENTITIES),
    st.builds(
        Identity,
        st.sampled_from(["alice", "eng", "x"]),
        groups=st.lists(st.sampled_from(["eng", "ops", "Eng"]), max_size=2).map(tuple),
        tenant=st.sampled_from([None, "acme", "gh__get"]),
        attributes=st.dictionaries(st.sampled_from(["level", "team"]), JSON_VALUES, max_size=2),
    ),
)
_TEXTS = ["send to x@y.com now", "eng", "pay DE89 3704 0044 0532 0130 00", "alice secret-project-x"]
CONTEXTS = [
    Context(),
    Context(tainted=True, taint_sources=frozenset({"web__fetch"}), turn=3),
    Context(user_texts=(_TEXTS[0],), untrusted_texts=(_TEXTS[2],), turn=1),
    Context(
        user_texts=(_TEXTS[3],), trusted_texts=(_TEXTS[0],), untrusted_texts=(_TEXTS[0], _TEXTS[1])
    ),
    Context(untrusted_texts=(_TEXTS[0], _TEXTS[3]), attributes={"pin": "eng"}),
    Context(
        tainted=True,
        taint_sources=frozenset({"mail__read", "web__fetch"}),
        attributes={"tainted": False, "pin": 3},
    ),
]
REQUESTS = [
    None,
    None,
    RequestInfo(method="POST", headers={"X-Team": "eng"}, client="1.2.3.4"),
    RequestInfo(method="GET", headers={"other": "a"}),
]
TOOL_CHOICES = [
    *TOOLS,
    ToolSpec.named("gh__get", annotations={"readOnlyHint": True}),
    ToolSpec.named(
        "gh__push", description="d", annotations={"destructiveHint": False, "name": True}
    ),
    ToolSpec.named("pay__send", annotations={"readOnlyHint": False}),
]
MODEL_CHOICES = [
    *MODELS,
    ModelRequest("gpt-5", provider="openai", max_tokens=5000),
    ModelRequest("local", max_tokens=5),
]


@st.composite
def requests(draw: Any) -> dict[str, Any]:
    return {
        "identity": draw(IDENTITY),
        "tool": draw(st.sampled_from(TOOL_CHOICES)),
        "args": draw(ARGS),
        "context": draw(st.sampled_from(CONTEXTS)),
        "request": draw(st.sampled_from(REQUESTS)),
        "model": draw(st.sampled_from(MODEL_CHOICES)),
        "result": draw(st.sampled_from(["plain", "eng output", "secret-project-x", ""])),
    }


def same(d: Decision, r: RefDecision) -> None:
    got = (
        d.effect.value,
        d.rule_ids,
        d.overridden,
        d.shadow_hits,
        d.defaulted,
        d.route,
        d.redact_patterns,
        tuple((p, e.value) for p, e in d.paths),
        dict(d.options),
    )
    want = (
        r.effect,
        r.rule_ids,
        r.overridden,
        r.shadow_hits,
        r.defaulted,
        r.route,
        r.redact_patterns,
        r.paths,
        r.options,
    )
    assert got == want


def check(text: str, reqs: list[dict[str, Any]], with_schema: bool) -> None:
    schema = SCHEMA if with_schema else None
    policy = Policy.from_source(text, "p.policy", schema=schema)
    ref = Reference(policy.ast, schema)  # the same parse; the parser has its own tests
    for q in reqs:
        i, tool, args, ctx, req = q["identity"], q["tool"], q["args"], q["context"], q["request"]
        for explain in (False, True):
            same(
                policy.decide_call(i, tool, args, ctx, request=req, explain=explain),
                ref.decide_call(i, tool, args, ctx, req),
            )
            same(
                policy.decide_visibility(i, tool, ctx, request=req, explain=explain),
                ref.decide_visibility(i, tool, ctx, req),
            )
            same(
                policy.classify_result(
                    i, tool, args, q["result"], ctx, request=req, explain=explain
                ),
                ref.classify_result(i, tool, args, q["result"], ctx, req),
            )
            same(
                policy.decide_model(i, q["model"], ctx, request=req, explain=explain),
                ref.decide_model(i, q["model"], ctx, req),
            )
            same(policy.decide_context(i, request=req, explain=explain), ref.decide_context(i, req))
        name = tool if isinstance(tool, str) else tool.name
        got = [
            (h.rule_id, h.amount, h.unit, h.window_seconds, h.key)
            for h in policy.limits("call", i, name, args, ctx, request=req)
        ]
        want = [
            (h.rule_id, h.amount, h.unit, h.window_seconds, h.key)
            for h in ref.limits("call", i, name, args, ctx, req)
        ]
        assert got == want
        mname = q["model"] if isinstance(q["model"], str) else q["model"].name
        got = [(h.rule_id, h.key) for h in policy.limits("model", i, mname, {}, ctx, request=req)]
        want = [(h.rule_id, h.key) for h in ref.limits("model", i, mname, {}, ctx, req)]
        assert got == want
    visible = policy.visible_tools(reqs[0]["identity"], TOOLS, reqs[0]["context"])
    expected = [
        t
        for t in TOOLS
        if ref.decide_visibility(reqs[0]["identity"], t, reqs[0]["context"]).effect == "show"
    ]
    assert visible == expected


@SETTINGS
@given(policies(), st.lists(requests(), min_size=1, max_size=6))
def test_compiled_engine_agrees_with_reference(text: str, reqs: list[dict[str, Any]]) -> None:
    check(text, reqs, with_schema=False)


@SETTINGS
@given(policies(), st.lists(requests(), min_size=1, max_size=6))
def test_compiled_engine_agrees_with_reference_under_a_schema(
    text: str, reqs: list[dict[str, Any]]
) -> None:
    check(text, reqs, with_schema=True)


@settings(SETTINGS, max_examples=1500)
@given(policies(), st.lists(requests(), min_size=1, max_size=3))
def test_compiled_engine_agrees_with_reference_on_short_runs(
    text: str, reqs: list[dict[str, Any]]
) -> None:
    check(text, reqs, with_schema=False)
