"""Policy.result_effects: what a tool's output may become, before it exists."""

from __future__ import annotations

from bastion import Effect, Policy, ToolSpec

POLICY = """
default result trusted
quarantine result "web__fetch" when identity.groups has "contractors"
@mode("shadow")
block result "web__fetch"
untrusted result "github__*"
redact result *
"""


def test_conditional_rules_count_whatever_their_condition() -> None:
    effects = Policy.from_source(POLICY).result_effects("web__fetch")
    assert Effect.QUARANTINE in effects


def test_shadow_rules_do_not_count() -> None:
    assert Effect.BLOCK not in Policy.from_source(POLICY).result_effects("web__fetch")


def test_the_default_counts_and_globs_match() -> None:
    policy = Policy.from_source(POLICY)
    assert policy.result_effects(ToolSpec.named("github__get_issue")) == {
        Effect.UNTRUSTED,
        Effect.REDACT,
        Effect.TRUSTED,
    }
    assert policy.result_effects("slack__read") == {Effect.REDACT, Effect.TRUSTED}


def test_a_quarantine_default_reaches_every_tool() -> None:
    policy = Policy.from_source("default result quarantine\n")
    assert Effect.QUARANTINE in policy.result_effects("anything")


def test_without_a_declared_default_the_builtin_untrusted_counts() -> None:
    assert Policy.from_source("allow call *\n").result_effects("x") == {Effect.UNTRUSTED}


def test_reads_provenance_only_when_some_rule_uses_from() -> None:
    assert not Policy.from_source(POLICY).reads_provenance
    uses = Policy.from_source('forbid call "mail__send" when not (args.to from user)\n')
    assert uses.reads_provenance


FIXED = """
default result trusted
@mode("shadow")
block result "audit__*"
untrusted result "web__*" when identity.groups has "contractors"
"""


def test_fixed_result_is_none_when_any_rule_names_the_tool_even_a_shadow_one() -> None:
    policy = Policy.from_source(FIXED)
    assert policy.fixed_result("web__fetch") is None
    assert policy.fixed_result("audit__log") is None
    assert Policy.from_source(POLICY).fixed_result("slack__read") is None  # `redact result *`


def test_fixed_result_is_what_classifying_any_output_of_the_tool_gives() -> None:
    from bastion.events import Context, Identity, ToolResult

    for source in (
        FIXED,
        "default result untrusted\n",
        "allow call *\n",
        FIXED.replace("default result trusted", "default result block"),
    ):
        policy = Policy.from_source(source)
        fixed = policy.fixed_result("github__get_issue")
        assert fixed is not None
        for identity, context, content in (
            (Identity("a"), Context(), "plain"),
            (Identity("b", groups=("contractors",)), Context().with_taint("web"), {"x": [1]}),
        ):
            result = ToolResult("c1", "github__get_issue", content, {"q": "v"})
            decided = policy.classify_result(
                identity, "github__get_issue", {"q": "v"}, result, context
            )
            assert decided == fixed
