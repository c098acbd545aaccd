"""The engine's decisions: precedence, operators, missing attributes, shadow mode, explain, fail-closed."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from bastion import (
    Context,
    Effect,
    EventKind,
    Identity,
    ModelRequest,
    Policy,
    PolicyError,
    RequestInfo,
    ToolResult,
    ToolSpec,
)

ALICE = Identity(
    "alice", groups=("eng",), roles=("dev",), email="alice@acme.example", tenant="acme"
)
BOB = Identity(
    "bob", groups=("ops",), tenant="other", attributes={"level": 3, "team": {"name": "red"}}
)


def policy(text: str, **kw: Any) -> Policy:
    return Policy.from_source(text, "t.policy", **kw)


def call(p: Policy, args: dict[str, Any] | None = None, who: Identity = ALICE, **kw: Any) -> Effect:
    return p.decide_call(who, kw.pop("tool", "github__get"), args or {}, **kw).effect


# ---- precedence ------------------------------------------------------------------


def test_call_forbid_beats_ask_beats_allow() -> None:
    p = policy(
        """
        @id("a") allow call "github__*"
        @id("k") ask call "github__get"
        @id("f") forbid call "github__get" when args.x == 1
        """
    )
    d = p.decide_call(ALICE, "github__get", {"x": 1})
    assert (d.effect, d.rule_ids, d.overridden) == (Effect.FORBID, ("f",), ("a", "k"))
    d = p.decide_call(ALICE, "github__get", {"x": 2})
    assert (d.effect, d.rule_ids, d.overridden) == (Effect.ASK, ("k",), ("a",))
    d = p.decide_call(ALICE, "github__list", {})
    assert (d.effect, d.rule_ids, d.overridden) == (Effect.ALLOW, ("a",), ())


def test_call_default_is_deny_when_not_declared() -> None:
    d = policy('allow call "x"').decide_call(ALICE, "y", {})
    assert d.effect is Effect.FORBID and d.defaulted and d.rule_ids == ()


@pytest.mark.parametrize(("default", "effect"), [("allow", Effect.ALLOW), ("ask", Effect.ASK)])
def test_call_declared_default_applies_when_nothing_matches(default: str, effect: Effect) -> None:
    d = policy(f"default call {default}").decide_call(ALICE, "y", {})
    assert d.effect is effect and d.defaulted


def test_hidden_tool_is_forbidden_to_call() -> None:
    p = policy(
        'default call allow\n@id("h") hide tool "admin__*" unless identity.groups has "admin"'
    )
    d = p.decide_call(ALICE, "admin__drop", {})
    assert d.effect is Effect.FORBID and d.rule_ids == ("h",)
    assert call(p, tool="github__get") is Effect.ALLOW


def test_reasons_are_those_of_the_winning_rules() -> None:
    p = policy('forbid call * reason "no"\nallow call * reason "yes"')
    d = p.decide_call(ALICE, "t", {})
    assert d.reasons == ("no",) and d.reason == "no"


def test_result_precedence_block_quarantine_untrusted_trusted() -> None:
    p = policy(
        """
        @id("t") trusted result "r__*"
        @id("u") untrusted result "r__*" when args.u
        @id("q") quarantine result "r__*" when args.q with {"schema": {"type": "boolean"}}
        @id("b") block result "r__*" when args.b
        """
    )
    d = p.classify_result(ALICE, "r__x", {"u": True, "q": True, "b": True}, "out")
    assert (d.effect, d.rule_ids, d.overridden) == (Effect.BLOCK, ("b",), ("t", "u", "q"))
    d = p.classify_result(ALICE, "r__x", {"u": True, "q": True}, "out")
    assert d.effect is Effect.QUARANTINE and d.options == {"schema": {"type": "boolean"}}
    assert p.classify_result(ALICE, "r__x", {"u": True}, "out").effect is Effect.UNTRUSTED
    assert p.classify_result(ALICE, "r__x", {}, "out").effect is Effect.TRUSTED


def test_result_default_is_untrusted() -> None:
    d = policy("").classify_result(ALICE, "web__fetch", {}, "page")
    assert d.effect is Effect.UNTRUSTED and d.defaulted and d.kind is EventKind.RESULT


def test_result_redactions_accumulate_and_field_rules_give_paths() -> None:
    p = policy(
        """
        trusted result "email__read"
        untrusted result "email__read" at ["body", "subject"]
        block result "email__read" at ["body"]
        redact result * using ["aws"]
        redact result "email__*"
        """
    )
    d = p.classify_result(ALICE, "email__read", {}, {"body": "x"})
    assert d.effect is Effect.TRUSTED
    assert d.redact_patterns == ("aws", "secrets")
    assert d.paths == (("body", Effect.BLOCK), ("subject", Effect.UNTRUSTED))


def test_result_conditions_read_result_text_and_error() -> None:
    p = policy(
        'block result * when result.text contains "BEGIN PRIVATE KEY"\n'
        "trusted result * when result.is_error"
    )
    assert p.classify_result(ALICE, "t", {}, "-----BEGIN PRIVATE KEY-----").effect is Effect.BLOCK
    blocks = {"content": [{"type": "text", "text": "BEGIN PRIVATE KEY"}], "isError": False}
    assert p.classify_result(ALICE, "t", {}, blocks).effect is Effect.BLOCK
    err = ToolResult(call_id="1", name="t", content="boom", is_error=True)
    assert p.classify_result(ALICE, "t", {}, err).effect is Effect.TRUSTED


def test_model_forbid_wins_and_first_route_in_source_order_routes() -> None:
    p = policy(
        """
        models cheap = ["gpt-4o-mini"]
        @id("a") allow model "gpt-*" route "openai"
        @id("b") allow model "gpt-5*" route "azure"
        @id("f") forbid model "gpt-5-pro" unless identity.groups has "admin"
        allow model cheap
        """
    )
    d = p.decide_model(ALICE, "gpt-5-mini")
    assert (d.effect, d.route, d.rule_ids) == (Effect.ALLOW, "openai", ("a", "b"))
    assert p.decide_model(ALICE, "gpt-5-pro").effect is Effect.FORBID
    assert p.decide_model(ALICE, "claude").effect is Effect.FORBID
    d = p.decide_model(ALICE, ModelRequest("gpt-4o-mini", provider="openai"))
    assert d.effect is Effect.ALLOW


def test_model_conditions_read_the_model_request() -> None:
    p = policy("allow model * when model.max_tokens <= 1000 and model.provider == 'openai'")
    assert p.decide_model(ALICE, ModelRequest("m", provider="openai", max_tokens=500)).allowed
    assert not p.decide_model(ALICE, ModelRequest("m", provider="openai", max_tokens=5000)).allowed
    assert not p.decide_model(ALICE, "m").allowed


def test_context_untrusted_beats_trusted_and_default_is_trusted() -> None:
    p = policy(
        'untrusted context when identity.groups has "contractors"\n'
        'trusted context when identity.tenant == "acme"'
    )
    contractor = Identity("c", groups=("contractors",), tenant="acme")
    assert p.decide_context(contractor).effect is Effect.UNTRUSTED
    assert p.decide_context(ALICE).effect is Effect.TRUSTED
    d = p.decide_context(BOB)
    assert d.effect is Effect.TRUSTED and d.defaulted


# ---- visibility ------------------------------------------------------------------


def test_visibility_hide_beats_show() -> None:
    p = policy('default call allow\nhide tool "a__*"\nshow tool "a__x"')
    assert p.decide_visibility(ALICE, "a__x").effect is Effect.HIDE


def test_show_lists_a_tool_the_call_rules_would_forbid() -> None:
    p = policy('show tool "a__x"')
    assert p.decide_visibility(ALICE, "a__x").effect is Effect.SHOW
    assert call(p, tool="a__x") is Effect.FORBID


def test_visibility_follows_call_rules_with_args_unknown() -> None:
    p = policy(
        """
        allow call "gh__*" when identity.groups has "eng"
        ask call "pay__send" when args.amount > 100
        forbid call "gh__delete" when context.tainted
        forbid call "gh__push" when args.force == true
        """
    )
    names = ["gh__get", "pay__send", "gh__delete", "gh__push", "other"]
    assert p.visible_tools(ALICE, names) == ["gh__get", "pay__send", "gh__delete", "gh__push"]
    tainted = Context(tainted=True)
    assert p.visible_tools(ALICE, names, tainted) == ["gh__get", "pay__send", "gh__push"]
    assert p.visible_tools(BOB, names) == ["pay__send"]


def test_visible_tools_keeps_input_objects_and_order() -> None:
    p = policy("default call allow\nhide tool 'b'")
    specs = [ToolSpec.named("c"), ToolSpec.named("b"), ToolSpec.named("a")]
    out = p.visible_tools(ALICE, specs)
    assert out == [specs[0], specs[2]] and out[0] is specs[0]


def test_hide_that_depends_on_args_hides_when_listing() -> None:
    p = policy("default call allow\nhide tool 'x' when args.secret")
    assert p.decide_visibility(ALICE, "x").effect is Effect.HIDE
    assert call(p, {"secret": False}, tool="x") is Effect.ALLOW


def test_visibility_default_follows_default_call() -> None:
    assert policy("default call allow").decide_visibility(ALICE, "x").effect is Effect.SHOW
    d = policy("").decide_visibility(ALICE, "x")
    assert d.effect is Effect.HIDE and d.defaulted


def test_tool_annotations_from_spec_are_readable() -> None:
    p = policy(
        "allow call * when tool.readOnlyHint\nforbid call * when tool.annotations.destructiveHint"
    )
    ro = ToolSpec.named("fs__read", annotations={"readOnlyHint": True})
    rm = ToolSpec.named("fs__rm", annotations={"readOnlyHint": True, "destructiveHint": True})
    assert p.decide_call(ALICE, ro, {}).effect is Effect.ALLOW
    assert p.decide_call(ALICE, rm, {}).effect is Effect.FORBID
    assert p.visible_tools(ALICE, [ro, rm]) == [ro]


def test_tool_name_and_server_are_readable() -> None:
    p = policy('allow call * when tool.server == "github" and tool.name endswith "_get"')
    assert call(p, tool="github__issue_get") is Effect.ALLOW
    assert call(p, tool="gitlab__issue_get") is Effect.FORBID


# ---- operators -----------------------------------------------------------------

OPERATOR_CASES = [
    ("args.n == 3", {"n": 3}, True),
    ("args.n == 3", {"n": 3.0}, True),
    ("args.n == 1", {"n": True}, False),
    ("args.b == true", {"b": 1}, False),
    ("args.l == [1, 'a']", {"l": [1, "a"]}, True),
    ("args.o == args.p", {"o": {"a": [1]}, "p": {"a": [1]}}, True),
    ("args.n != 3", {"n": 4}, True),
    ("args.n != 3", {}, False),
    ("args.n < 3", {"n": 2}, True),
    ("args.n < 3", {"n": "2"}, False),
    ("args.s < 'b'", {"s": "a"}, True),
    ("args.n <= 3", {"n": 3}, True),
    ("args.n > 3", {"n": 3.5}, True),
    ("args.n > 3", {"n": True}, False),
    ("args.n >= 3", {"n": 3}, True),
    ("args.s in ['a', 'b']", {"s": "b"}, True),
    ("args.s in 'abc'", {"s": "bc"}, True),
    ("args.s in 'abc'", {"s": 1}, False),
    ("args.s not in ['a']", {"s": "b"}, True),
    ("args.s not in ['a']", {}, False),
    ("args.s not in 5", {"s": "a"}, False),
    ("args.l has 2", {"l": [1, 2]}, True),
    ("args.o has 'k'", {"o": {"k": None}}, True),
    ("args.o has 'z'", {"o": {"k": None}}, False),
    ("args.s contains 'ell'", {"s": "hello"}, True),
    ("args.l contains 'x'", {"l": ["x"]}, True),
    ("args.s startswith 'he'", {"s": "hello"}, True),
    ("args.s endswith 'lo'", {"s": "hello"}, True),
    ("args.s endswith 'lo'", {"s": ["lo"]}, False),
    ("args.s matches '^h.l+o$'", {"s": "hello"}, True),
    ("args.s matches 'l{3}'", {"s": "hello"}, False),
    ("args.s matches '(?i)HELLO'", {"s": "hello"}, True),
    ("args.s like 'h*o'", {"s": "hello"}, True),
    ("args.s like 'h?llo'", {"s": "hello"}, True),
    ("args.s like 'h*x'", {"s": "hello"}, False),
    ("args.a + args.b == 'xy'", {"a": "x", "b": "y"}, True),
    ("args.a + args.b == 5", {"a": 2, "b": 3}, True),
    ("args.a + args.b == 'x1'", {"a": "x", "b": 1}, False),
    ("args.items[1].id == 7", {"items": [{"id": 1}, {"id": 7}]}, True),
    ("args.items[5].id == 7", {"items": [{"id": 1}]}, False),
    ('args["odd key"] == 1', {"odd key": 1}, True),
    ("args.flag", {"flag": True}, True),
    ("args.flag", {"flag": "yes"}, False),
    ("not args.flag", {}, True),
    ("args.a == 1 and args.b == 2", {"a": 1, "b": 2}, True),
    ("args.a == 1 or args.b == 2", {"b": 2}, True),
    ("not (args.a == 1 or args.b == 2)", {"a": 3}, True),
    ("args.x == null", {"x": None}, True),
    ("args.x == null", {}, False),
    ("identity.groups has 'eng'", {}, True),
    ("identity.email endswith '@acme.example'", {}, True),
    ("identity.sub == 'alice'", {}, True),
    ("identity.nope == 'x'", {}, False),
    ("not identity.nope == 'x'", {}, True),
    ("args.s in admins", {"s": "root"}, True),
    ("args.t in outward", {"t": "slack__post_message"}, True),
    ("args.t in outward", {"t": "slack__read"}, False),
    ("args.t not in outward", {"t": "slack__read"}, True),
    ("args.to in [identity.email, 'x']", {"to": "alice@acme.example"}, True),
    ("args.to in [identity.nope, 'x']", {"to": "x"}, True),
]


@pytest.mark.parametrize(("cond", "args", "holds"), OPERATOR_CASES)
def test_operator_semantics(cond: str, args: dict[str, Any], holds: bool) -> None:
    p = policy(
        'values admins = ["root", "admin"]\ntools outward = ["slack__post_*"]\n'
        f"allow call * when {cond}"
    )
    assert (call(p, args) is Effect.ALLOW) is holds
    # the explain path evaluates over the AST; it must agree with the compiled code
    explained = p.decide_call(ALICE, "github__get", args, explain=True)
    assert (explained.effect is Effect.ALLOW) is holds


def test_missing_attribute_comparisons_are_false_and_never_raise() -> None:
    p = policy(
        "forbid call * when args.a.b.c > 1\n"
        "forbid call * when identity.team.name == 'red'\n"
        "forbid call * when request.headers['x-team'] == 'red'\n"
        "default call allow"
    )
    assert call(p, {"a": 5}) is Effect.ALLOW
    assert call(p, {"a": [1]}) is Effect.ALLOW
    assert call(p, who=BOB) is Effect.FORBID
    req = RequestInfo(headers={"X-Team": "red"})
    assert p.decide_call(ALICE, "t", {}, request=req).effect is Effect.FORBID
    assert call(p) is Effect.ALLOW


def test_context_and_request_attributes() -> None:
    p = policy(
        "allow call * when context.turn >= 2 and context.taint_sources has 'web__fetch'"
        " and context.pin == 'ok' and request.method == 'POST' and request.path startswith '/mcp'"
    )
    ctx = Context(turn=3, attributes={"pin": "ok"}).with_taint("web__fetch")
    req = RequestInfo(method="POST", path="/mcp/x")
    assert p.decide_call(ALICE, "t", {}, ctx, request=req).effect is Effect.ALLOW
    assert p.decide_call(ALICE, "t", {}, ctx).effect is Effect.FORBID


def test_user_intent_from_user_text() -> None:
    p = policy(r'allow call "pay__*" when context.user_text matches "(?i)\\b(send|pay)\\b"')
    asked = Context(user_texts=("Please PAY the invoice",))
    assert p.decide_call(ALICE, "pay__x", {}, asked).effect is Effect.ALLOW
    assert (
        p.decide_call(ALICE, "pay__x", {}, Context(user_texts=("paypal?",))).effect is Effect.FORBID
    )


# ---- identity hoisting -------------------------------------------------------------


def test_repeat_identity_uses_its_own_groups() -> None:
    p = policy('allow call * when identity.groups has "eng" and args.n > 1')
    for _ in range(3):
        assert call(p, {"n": 2}, who=ALICE) is Effect.ALLOW
        assert call(p, {"n": 2}, who=BOB) is Effect.FORBID
        assert call(p, {"n": 0}, who=ALICE) is Effect.FORBID


def test_equal_but_distinct_identities_decide_alike() -> None:
    p = policy('allow call * when identity.groups has "eng"')
    for _ in range(50):
        who = Identity("x", groups=("eng",))
        assert call(p, who=who) is Effect.ALLOW
        assert call(p, who=Identity("x", groups=("ops",))) is Effect.FORBID


# ---- shadow mode ------------------------------------------------------------------


def test_shadow_rule_is_reported_but_does_not_decide() -> None:
    p = policy('default call allow\n@id("new") @mode("shadow") forbid call "x"')
    d = p.decide_call(ALICE, "x", {})
    assert d.effect is Effect.ALLOW and d.shadow_hits == ("new",) and d.defaulted


def test_shadow_file_mode_with_enforced_rule() -> None:
    p = policy(
        '@mode("shadow")\npolicy "trial"\ndefault call allow\n'
        '@id("s") forbid call "x"\n@id("e") @mode("enforce") ask call "x"'
    )
    d = p.decide_call(ALICE, "x", {})
    assert (d.effect, d.rule_ids, d.shadow_hits) == (Effect.ASK, ("e",), ("s",))


def test_shadow_model_rule_does_not_route() -> None:
    p = policy('@mode("shadow") allow model * route "x"\nallow model "m"')
    d = p.decide_model(ALICE, "m")
    assert d.route is None and d.shadow_hits == ("t.policy:1",)


# ---- explain ----------------------------------------------------------------------


def test_explain_traces_every_candidate_with_the_failing_part() -> None:
    p = policy(
        '@id("eng") allow call "gh__*" when identity.groups has "eng" and args.n > 1\n'
        '@id("f") forbid call * unless identity.tenant == "other"\n'
        'allow call "other__*"'
    )
    d = p.decide_call(BOB, "gh__x", {"n": 5}, explain=True)
    assert d.trace is not None
    assert [t.rule_id for t in d.trace] == ["eng", "f"]
    eng, f = d.trace
    assert not eng.matched
    assert eng.detail == 'identity.groups has "eng" was false (identity.groups = ["ops"])'
    assert eng.condition == 'when identity.groups has "eng" and args.n > 1'
    assert eng.location == "t.policy:1:12"
    assert not f.matched and f.detail.startswith('not (identity.tenant == "other") was false')
    assert d.effect is Effect.FORBID and d.defaulted


def test_explain_reports_missing_values() -> None:
    p = policy("allow call * when args.to.domain == 'x'")
    d = p.decide_call(ALICE, "t", {}, explain=True)
    assert d.trace is not None
    assert d.trace[0].detail == 'args.to.domain == "x" was false (args.to.domain is missing)'


def test_explain_visibility_shows_unknown() -> None:
    p = policy("ask call 'x' when args.n > 1")
    d = p.decide_visibility(ALICE, "x", explain=True)
    assert d.effect is Effect.SHOW
    assert d.trace is not None and "unknown" in d.trace[0].detail


def test_decisions_without_explain_have_no_trace() -> None:
    assert policy("allow call *").decide_call(ALICE, "t", {}).trace is None


# ---- fail closed -------------------------------------------------------------------


class Exploding(dict[str, Any]):
    def get(self, key: str, default: Any = None) -> Any:
        raise RuntimeError("boom")


def test_evaluation_error_forbids_the_call_and_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    p = policy("default call allow\nforbid call * when args.x == 1")
    with caplog.at_level(logging.ERROR, logger="bastion.policy"):
        d = p.decide_call(ALICE, "t", Exploding())
    assert d.effect is Effect.FORBID and d.reasons == ("policy evaluation error",)
    assert "policy evaluation failed" in caplog.text


def test_non_mapping_args_fail_closed() -> None:
    p = policy("allow call * when args.x == 1 or true")
    assert p.decide_call(ALICE, "t", ["x"]).effect is Effect.FORBID  # type: ignore[arg-type]


def test_evaluation_error_blocks_the_result() -> None:
    p = policy("trusted result * when args.x == 1")
    assert p.classify_result(ALICE, "t", Exploding(), "out").effect is Effect.BLOCK


def test_evaluation_error_hides_the_tool() -> None:
    class BadSpec:
        name = property(lambda self: (_ for _ in ()).throw(RuntimeError("x")))

    p = policy("default call allow")
    assert p.decide_visibility(ALICE, BadSpec()).effect is Effect.HIDE  # type: ignore[arg-type]


def test_evaluation_error_forbids_the_model() -> None:
    p = policy("allow model * when identity.level > 1")
    bad = Identity("x", attributes=None)  # type: ignore[arg-type]
    assert p.decide_model(bad, "m").effect is Effect.FORBID


def test_deeply_nested_args_do_not_crash() -> None:
    nested: Any = 1
    for _ in range(5000):
        nested = [nested]
    p = policy("default call allow\nforbid call * when args.x == args.y")
    assert p.decide_call(ALICE, "t", {"x": nested, "y": nested}).effect is Effect.FORBID


# ---- limits ------------------------------------------------------------------------


def test_limits_apply_per_rule_and_by_value() -> None:
    p = policy(
        '@id("gh") limit call "github__*" to 100 per 1h by identity.tenant\n'
        '@id("big") limit call * to 5 per minute when args.size > 10 reason "big"\n'
        '@id("tok") limit model * to 2000 tokens per day\n'
        '@mode("shadow") limit call * to 1 per 1s'
    )
    hits = p.limits("call", ALICE, "github__get", {"size": 20})
    assert [(h.rule_id, h.amount, h.unit, h.window_seconds, h.key) for h in hits] == [
        ("gh", 100, "calls", 3600, "gh|acme"),
        ("big", 5, "calls", 60, "big|alice"),
    ]
    assert hits[1].reason == "big"
    assert [h.key for h in p.limits("model", BOB, "gpt")] == ["tok|bob"]
    assert p.limits("call", ALICE, "slack__post", {}) == ()


# ---- load errors --------------------------------------------------------------------


def test_load_errors_are_all_reported_with_positions() -> None:
    with pytest.raises(PolicyError) as info:
        policy(
            "tools a = ['x']\ntools a = ['y']\ndefault call allow\ndefault call deny\n"
            "allow call nosuch\nallow call * when args.x in nothere\n"
            "allow call * when args.x matches '(a'\nallow call admins2\n"
        )
    msgs = [(d.line, d.message) for d in info.value.diagnostics]
    assert any(line == 2 and "already declared" in m for line, m in msgs)
    assert any(line == 4 and "conflicts" in m for line, m in msgs)
    assert any(line == 5 and "undefined set 'nosuch'" in m for line, m in msgs)
    assert any(line == 6 and "undefined set 'nothere'" in m for line, m in msgs)
    assert any(line == 7 and "regular expression" in m for line, m in msgs)


def test_regex_outside_the_subset_is_a_load_error() -> None:
    with pytest.raises(PolicyError) as info:
        policy(r"allow call * when args.x matches '(a)\\1'")
    (d,) = info.value.diagnostics
    assert d.line == 1 and "unsupported escape" in d.message


def test_values_set_as_target_is_an_error() -> None:
    with pytest.raises(PolicyError, match="values set"):
        policy("values v = ['x']\nallow call v")


def test_identical_defaults_in_two_places_are_fine() -> None:
    assert policy("default call allow\ndefault call allow").decide_call(ALICE, "x", {}).allowed


def test_rule_count_and_sources() -> None:
    p = policy("allow call *\nlimit call * to 1 per 1s")
    assert p.rule_count == 2 and p.files == ("t.policy",) and "allow" in p.sources["t.policy"]
    assert len(p.ast) == 1 and p.schema is None
