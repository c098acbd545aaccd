"""The call fast path: generated per-tool deciders, inlined operator shortcuts, identity cache.

``explain=True`` takes the AST walker, an independent path over the same
operator functions, so it serves as the oracle for every fast-path decision.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from bastion import Context, Identity, Policy, ToolSpec
from bastion.events import Decision
from bastion.policy.compiler import PER_LIST_IDENTITY_CACHE


def fields(d: Decision) -> tuple[Any, ...]:
    return (d.effect, d.rule_ids, d.reasons, d.overridden, d.shadow_hits, d.defaulted)


def same_as_explain(p: Policy, identity: Identity, tool: Any, args: Any, ctx: Any) -> Decision:
    fast = p.decide_call(identity, tool, args, ctx)
    slow = p.decide_call(identity, tool, args, ctx, explain=True)
    assert fields(fast) == fields(slow), (identity, tool, args)
    return fast


ODD_VALUES: list[Any] = [3, 3.0, 2, 2.5, 4, True, False, "3", None, [3], ("eng",), ["eng"]]
ODD_VALUES += ["eng", "acme/x", "ext/y", {"k": 1}]


@pytest.mark.parametrize(
    "condition",
    [
        "args.v >= 3",
        "args.v < 2.5",
        "args.v == 3",
        'args.v has "eng"',
        'args.v startswith "acme/"',
        'args.v endswith "/x"',
        '"eng" in args.v',
        "identity.level > 2",
        'identity.groups has "eng"',
    ],
)
def test_inlined_comparisons_decide_like_the_operator_functions(condition: str) -> None:
    p = Policy.from_source(f'allow call "t" when {condition}\nforbid call "t" when args.deny')
    for v in ODD_VALUES:
        identity = Identity("u", groups=("eng",), attributes={"level": v})
        identity_list = Identity("w", attributes={"level": v})
        for who, args in itertools.product((identity, identity_list), ({"v": v}, {})):
            same_as_explain(p, who, "t", args, Context())


def test_every_matching_rule_is_reported_winners_losers_and_shadow() -> None:
    p = Policy.from_source(
        '@id("a1") allow call "t" when identity.groups has "eng" reason "eng may"\n'
        '@id("a2") allow call "t*"\n'
        '@id("f1") forbid call "t" when args.n > 5 reason "too many"\n'
        '@id("s1") @mode("shadow") forbid call "t" when context.tainted\n'
        '@id("q1") ask call "t" when identity.groups has "ops" and args.n > 1\n'
    )
    eng = Identity("e", groups=("eng", "ops"))
    d = same_as_explain(p, eng, "t", {"n": 9}, Context(tainted=True))
    assert d.rule_ids == ("f1",) and d.overridden == ("a1", "a2", "q1")
    assert d.shadow_hits == ("s1",) and d.reasons == ("too many",)
    d = same_as_explain(p, eng, "t", {"n": 2}, Context())
    assert d.rule_ids == ("q1",) and d.overridden == ("a1", "a2") and d.shadow_hits == ()
    d = same_as_explain(p, Identity("x"), "t", {"n": 0}, Context())
    assert d.rule_ids == ("a2",) and d.overridden == ()


def test_more_identities_than_the_cache_holds_are_all_decided_right() -> None:
    p = Policy.from_source('allow call "t" when identity.tenant == "even" and args.ok')
    people = [
        Identity(f"p{i}", tenant="even" if i % 2 == 0 else "odd")
        for i in range(PER_LIST_IDENTITY_CACHE + 300)
    ]
    for _ in range(2):
        for i, who in enumerate(people):
            d = p.decide_call(who, "t", {"ok": True})
            assert (d.effect.value == "allow") == (i % 2 == 0)


def test_a_tool_spec_reads_its_own_annotations_through_the_decider() -> None:
    p = Policy.from_source('allow call "gh__*" when tool.readOnlyHint')
    ro = ToolSpec.named("gh__get", annotations={"readOnlyHint": True})
    rw = ToolSpec.named("gh__get", annotations={"readOnlyHint": False})
    assert same_as_explain(p, Identity("u"), ro, {}, Context()).effect.value == "allow"
    assert same_as_explain(p, Identity("u"), rw, {}, Context()).effect.value == "forbid"
    assert same_as_explain(p, Identity("u"), "gh__get", {}, Context()).effect.value == "forbid"


def test_an_error_inside_a_condition_fails_closed() -> None:
    class Boom(dict[str, Any]):
        def get(self, *a: Any) -> Any:
            raise RuntimeError("boom")

    p = Policy.from_source('allow call "t" when args.x == 1')
    d = p.decide_call(Identity("u"), "t", Boom())
    assert d.effect.value == "forbid"
