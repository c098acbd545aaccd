"""The decisions every LLM request makes: visibility, results, model, context.

These paths keep caches (tool views per ToolSpec object, generated per-name
deciders, per-identity activations). Every test here checks that a cached
answer is the answer the explain path (the AST walker) gives for the same
inputs, or that a change in the inputs is seen.
"""

from __future__ import annotations

from typing import Any

from bastion import Identity, Policy, ToolSpec
from bastion.events import Decision, Effect


def fields(d: Decision) -> tuple[Any, ...]:
    return (
        d.effect,
        d.rule_ids,
        d.reasons,
        d.overridden,
        d.shadow_hits,
        d.defaulted,
        d.route,
        d.redact_patterns,
        d.paths,
        dict(d.options),
    )


def test_a_tool_spec_whose_annotations_change_in_place_is_seen_anew() -> None:
    p = Policy.from_source("default call allow\nhide tool * when tool.destructiveHint == true")
    annotations: dict[str, Any] = {"destructiveHint": False}
    spec = ToolSpec("t", annotations=annotations)
    who = Identity("u")
    assert p.decide_visibility(who, spec).effect is Effect.SHOW
    annotations["destructiveHint"] = True
    assert p.decide_visibility(who, spec).effect is Effect.HIDE
    assert p.decide_call(who, spec, {}).effect is Effect.FORBID


def test_equal_specs_in_different_objects_are_decided_alike() -> None:
    p = Policy.from_source("default call allow\nhide tool * when tool.readOnlyHint == false")
    who = Identity("u")
    for _ in range(3):
        assert (
            p.decide_visibility(who, ToolSpec("t", annotations={"readOnlyHint": False})).effect
            is Effect.HIDE
        )
        assert (
            p.decide_visibility(who, ToolSpec("t", annotations={"readOnlyHint": True})).effect
            is Effect.SHOW
        )
