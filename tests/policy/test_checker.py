"""Static checks: each finding has its code, its severity and its position."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings

from bastion.policy.ast import PolicyFile
from bastion.policy.checker import check
from bastion.policy.diagnostics import Diagnostic
from bastion.policy.formatter import format_file
from bastion.policy.parser import parse_source
from bastion.policy.schema import Schema
from bastion.redaction import DETECTORS, GROUPS, Redactor

from .test_formatter import policy_files

SCHEMA = Schema.from_mapping(
    {
        "identity": {"department": "string", "clearance": "number"},
        "context": {"pin_changed": "boolean"},
        "tools": {
            "payments__send": {
                "effect": "send",
                "destinations": ["iban"],
                "args": {
                    "type": "object",
                    "properties": {
                        "iban": {"type": "string"},
                        "amount": {"type": "number"},
                        "meta": {"type": "object", "properties": {"note": {"type": "string"}}},
                        "tags": {"type": "array", "items": {"type": "string"}},
                    },
                },
            },
            "payments__list": {
                "args": {"type": "object", "properties": {"limit": {"type": "integer"}}}
            },
            "web__fetch": {"args": {"type": "object", "properties": {"url": {"type": "string"}}}},
            "notes__read": {},
        },
    }
)


def findings(*sources: str, schema: Schema | None = None) -> list[Diagnostic]:
    files = [parse_source(src, f"f{n}.policy") for n, src in enumerate(sources)]
    return check(files, schema)


def codes(*sources: str, schema: Schema | None = None) -> list[tuple[str, str, int]]:
    return [(d.code, d.severity, d.line) for d in findings(*sources, schema=schema)]


def test_clean_policy_has_no_findings() -> None:
    src = """
    tools outward = ["payments__send"]
    forbid call outward when context.tainted
    allow call "payments__*" when identity.groups has "finance" and args.amount < 100
    ask call "payments__send" when args.amount >= 100
    """
    assert codes(src, schema=SCHEMA) == []


# ---- sets --------------------------------------------------------------------


def test_undefined_set_as_target_is_an_error() -> None:
    assert codes("allow call nosuch") == [("undefined-set", "error", 1)]


def test_undefined_set_in_a_condition_is_an_error() -> None:
    assert codes('allow call "a" when identity.sub in nosuch') == [("undefined-set", "error", 1)]


def test_undefined_set_named_like_an_attribute_suggests_the_path() -> None:
    (d,) = findings('forbid call "a" when tainted')
    assert d.code == "undefined-set"
    assert "context.tainted" in d.message


def test_values_set_as_call_target_is_wrong_kind() -> None:
    assert codes('values v = ["a"]\nallow call v') == [("wrong-set-kind", "error", 2)]


def test_tools_set_as_model_target_is_wrong_kind() -> None:
    assert codes('tools t = ["a"]\nallow model t') == [("wrong-set-kind", "error", 2)]


def test_unused_set_is_a_warning_at_its_declaration() -> None:
    assert codes('\nvalues v = ["a"]') == [("unused-set", "warning", 2)]


def test_set_used_in_another_file_is_not_unused() -> None:
    assert codes('values admins = ["a"]', 'allow call "x" when identity.sub in admins') == []


def test_set_declared_twice_is_an_error() -> None:
    result = codes("values v = [1]\nvalues v = [2]\nallow call * when 1 in v")
    assert ("duplicate-set", "error", 2) in result


# ---- ids and defaults --------------------------------------------------------


def test_duplicate_id_is_a_warning_at_the_second_use() -> None:
    (d,) = findings('@id("x") forbid call "a"\n@id("x") forbid call "b"')
    assert (d.code, d.severity, d.line, d.col) == ("duplicate-id", "warning", 2, 1)
    assert "f0.policy:1:1" in d.message


def test_duplicate_id_across_files_is_found() -> None:
    assert codes('@id("x") forbid call "a"', '@id("x") forbid call "b"') == [
        ("duplicate-id", "warning", 1)
    ]


def test_conflicting_defaults_are_a_warning() -> None:
    assert codes("default call deny", "default call allow") == [
        ("conflicting-default", "warning", 1)
    ]


# ---- regular expressions and literal types -----------------------------------


def test_invalid_regex_is_an_error_at_the_pattern() -> None:
    (d,) = findings('allow call "a" when args.q matches "(unclosed"')
    assert (d.code, d.severity, d.col) == ("regex", "error", 36)


def test_backreference_is_rejected_as_regex_error() -> None:
    assert codes(r'allow call "a" when args.q matches "(a)\1"') == [("regex", "error", 1)]


def test_comparing_literals_of_different_types_is_a_mismatch() -> None:
    assert codes('allow call "a" when 1 == "1"') == [("type-mismatch", "error", 1)]


def test_ordering_a_boolean_is_a_mismatch() -> None:
    assert codes('allow call "a" when context.tainted > 1') == [("type-mismatch", "error", 1)]


def test_list_attribute_equal_to_string_suggests_has() -> None:
    (d,) = findings('allow call "a" when identity.groups == "eng"')
    assert d.code == "type-mismatch"
    assert 'identity.groups has "eng"' in d.message


def test_has_on_a_string_attribute_is_a_mismatch() -> None:
    assert codes('allow call "a" when identity.email has "x"') == [("type-mismatch", "error", 1)]


def test_in_a_number_is_a_mismatch() -> None:
    assert codes('allow call "a" when "x" in 3') == [("type-mismatch", "error", 1)]


def test_startswith_on_a_number_is_a_mismatch() -> None:
    assert codes('allow call "a" when context.turn startswith "1"') == [
        ("type-mismatch", "error", 1)
    ]


def test_non_boolean_condition_is_a_mismatch() -> None:
    assert codes('allow call "a" when identity.groups') == [("type-mismatch", "error", 1)]


def test_concatenating_string_and_number_is_a_mismatch() -> None:
    assert codes('allow call "a" when identity.sub + 1 == "x1"') == [("type-mismatch", "error", 1)]


def test_unknown_argument_types_are_not_guessed_without_schema() -> None:
    assert codes('allow call "a" when args.amount > "x" and args.to has 1') == []


# ---- attributes --------------------------------------------------------------


def test_unknown_identity_attribute_with_schema_is_an_error() -> None:
    assert codes('allow call "payments__list" when identity.departmnet == "x"', schema=SCHEMA) == [
        ("unknown-attribute", "error", 1)
    ]


def test_declared_identity_attribute_is_typed_by_the_schema() -> None:
    src = 'allow call "payments__list" when identity.clearance > "3"'
    assert codes(src, schema=SCHEMA) == [("type-mismatch", "error", 1)]


def test_unknown_identity_attribute_without_schema_is_fine() -> None:
    assert codes('allow call "a" when identity.department == "x"') == []


def test_unknown_context_attribute_with_schema_is_an_error() -> None:
    src = 'forbid call "payments__list" when context.pin_changed or context.pinchanged'
    assert codes(src, schema=SCHEMA) == [("unknown-attribute", "error", 1)]


def test_unknown_tool_attribute_is_a_warning_without_schema() -> None:
    assert codes('allow call "a" when tool.readonlyhint') == [("unknown-attribute", "warning", 1)]


def test_tool_annotation_is_known_in_both_spellings() -> None:
    src = 'allow call "a" when tool.readOnlyHint and tool.annotations.readOnlyHint'
    assert codes(src) == []


def test_args_in_a_model_rule_are_always_missing() -> None:
    assert codes('allow model "gpt-*" when args.x == 1') == [
        ("unavailable-attribute", "warning", 1)
    ]


def test_result_outside_result_rules_is_always_missing() -> None:
    assert codes('forbid call "a" when result.text contains "x"') == [
        ("unavailable-attribute", "warning", 1)
    ]


# ---- arguments with a schema ---------------------------------------------------


def test_unknown_argument_of_a_known_tool_is_an_error() -> None:
    (d,) = findings('ask call "payments__send" when args.amout > 100', schema=SCHEMA)
    assert (d.code, d.severity) == ("unknown-argument", "error")
    assert "payments__send" in d.message


def test_argument_type_mismatch_with_schema() -> None:
    assert codes('ask call "payments__send" when args.amount > "100"', schema=SCHEMA) == [
        ("type-mismatch", "error", 1)
    ]


def test_integer_argument_counts_as_number() -> None:
    assert codes('ask call "payments__list" when args.limit > 100', schema=SCHEMA) == []


def test_nested_argument_paths_follow_the_schema() -> None:
    src = 'ask call "payments__send" when args.meta.note == 1 or args.tags[0] == "x"'
    assert codes(src, schema=SCHEMA) == [("type-mismatch", "error", 1)]


def test_argument_of_any_matched_tool_is_known() -> None:
    # url exists on web__fetch only; a rule for every payments and web tool may read it.
    src = 'forbid call ["payments__*", "web__*"] when args.url like "*evil*"'
    assert codes(src, schema=SCHEMA) == []


def test_arguments_are_not_checked_when_a_matched_tool_has_no_schema() -> None:
    assert codes('forbid call "notes__*" when args.anything == 1', schema=SCHEMA) == []


# ---- targets against the schema --------------------------------------------------


def test_pattern_matching_no_tool_is_an_error() -> None:
    (d,) = findings('allow call "paymnts__*"', schema=SCHEMA)
    assert (d.code, d.severity, d.col) == ("no-matching-tool", "error", 12)


def test_set_item_matching_no_tool_is_an_error() -> None:
    src = 'tools t = ["payments__send", "slack__post"]\nforbid call t'
    assert codes(src, schema=SCHEMA) == [("no-matching-tool", "error", 1)]


def test_patterns_are_not_checked_without_schema() -> None:
    assert codes('allow call "paymnts__*"') == []


# ---- precedence findings ---------------------------------------------------------


def test_allow_under_unconditional_forbid_is_shadowed() -> None:
    (d,) = findings(
        'forbid call "github__*"\nallow call "github__get_issue" when identity.sub == "a"'
    )
    assert (d.code, d.severity, d.line) == ("shadowed-rule", "warning", 2)
    assert "f0.policy:1:1" in d.message


def test_forbid_later_in_the_file_shadows_too() -> None:
    assert codes('allow call "a__b"\nforbid call "a__*"') == [("shadowed-rule", "warning", 1)]


def test_conditional_forbid_does_not_shadow() -> None:
    assert codes('forbid call "a" when context.tainted\nallow call "a"') == []


def test_forbid_with_the_same_condition_shadows() -> None:
    src = 'forbid call "a" when context.tainted\nask call "a" when context.tainted'
    assert codes(src) == [("shadowed-rule", "warning", 2)]


def test_narrower_forbid_does_not_shadow_broader_allow() -> None:
    assert codes('forbid call "a__b"\nallow call "a__*"') == []


def test_unconditional_ask_shadows_allow() -> None:
    assert codes('ask call *\nallow call "x"') == [("shadowed-rule", "warning", 2)]


def test_shadow_mode_forbid_does_not_shadow() -> None:
    assert codes('@mode("shadow") forbid call *\nask call "x"') == []


def test_forbid_through_a_set_shadows() -> None:
    src = 'tools t = ["a__*", "b"]\nforbid call t\nallow call ["a__x", "b"]'
    assert codes(src) == [("shadowed-rule", "warning", 3)]


def test_hide_shadows_allow_of_the_same_tool() -> None:
    assert codes('hide tool "admin__*"\nallow call "admin__reset"') == [
        ("shadowed-rule", "warning", 2)
    ]


def test_block_shadows_untrusted_result() -> None:
    assert codes('block result "debug__*"\nuntrusted result "debug__dump"') == [
        ("shadowed-rule", "warning", 2)
    ]


def test_forbid_model_shadows_allow_model() -> None:
    assert codes('forbid model "gpt-*"\nallow model "gpt-5"') == [("shadowed-rule", "warning", 2)]


def test_allow_under_default_allow_is_redundant() -> None:
    assert codes('default call allow\nallow call "a"') == [("redundant-rule", "warning", 2)]


def test_allow_under_default_deny_is_not_redundant() -> None:
    assert codes('default call deny\nallow call "a"') == []


def test_allow_model_with_route_under_default_allow_is_not_redundant() -> None:
    assert codes('default model allow\nallow model "gpt-*" route "openai"') == []


def test_hide_redundant_with_unconditional_forbid() -> None:
    assert codes('forbid call "admin__*"\nhide tool "admin__reset"') == [
        ("redundant-rule", "warning", 2)
    ]


def test_hide_not_redundant_with_forbid_on_arguments() -> None:
    assert codes('forbid call "a" when args.x == 1\nhide tool "a"') == []


def test_repeated_rule_is_redundant() -> None:
    src = 'forbid call "a" when context.tainted\nforbid call "a" when context.tainted'
    assert codes(src) == [("redundant-rule", "warning", 2)]


# ---- redact ... using -------------------------------------------------------------

REDACTION_NAMES = frozenset((*DETECTORS, *GROUPS))


def using(*entries: str, names: frozenset[str] | None = REDACTION_NAMES) -> list[Diagnostic]:
    items = ", ".join(json.dumps(e) for e in entries)
    src = f'default result untrusted\nredact result "files__*" using [{items}]'
    return check([parse_source(src, "f0.policy")], redaction_names=names)


def test_known_names_and_valid_patterns_in_using_are_accepted() -> None:
    assert using("email", "pii", "secrets", r"(?i)api_?key[=:]\S{8,}", "[0-9]{4}") == []


def test_using_entry_neither_a_name_nor_a_valid_pattern_is_a_positioned_error() -> None:
    (d,) = using("email", "(unclosed")
    assert (d.code, d.severity, d.file, d.line, d.col) == (
        "redaction-entry",
        "error",
        "f0.policy",
        2,
        1,
    )
    assert "'using' entry 2 ('(unclosed')" in d.message
    assert "did you mean" not in d.message


def test_pattern_outside_the_linear_subset_is_an_error() -> None:
    (d,) = using(r"(a)\1")
    assert (d.code, d.severity) == ("redaction-entry", "error")


def test_mistyped_detector_name_is_a_warning_with_a_suggestion() -> None:
    (d,) = using("emial")
    assert (d.code, d.severity) == ("redaction-name", "warning")
    assert "did you mean 'email'?" in d.message


def test_group_name_in_the_wrong_case_suggests_the_group() -> None:
    (d,) = using("PII")
    assert "did you mean 'pii'?" in d.message


def test_invalid_pattern_that_is_a_name_with_a_stray_bracket_gets_a_suggestion() -> None:
    (d,) = using("github_token)")
    assert (d.code, d.severity) == ("redaction-entry", "error")
    assert "did you mean 'github_token'?" in d.message


def test_word_far_from_every_name_is_a_plain_pattern() -> None:
    assert using("internal-project-codename") == []


def test_using_entries_are_not_checked_without_redaction_names() -> None:
    assert using("(unclosed", "emial", names=None) == []


@pytest.mark.parametrize(
    "entries",
    [("email",), ("pii", "[0-9]+"), ("(unclosed",), ("secrets", "a{2,1}"), (r"\p{Zz}",), ("x*",)],
)
def test_checker_errors_exactly_when_the_redactor_rejects_the_entries(
    entries: tuple[str, ...],
) -> None:
    errors = [d for d in using(*entries) if d.severity == "error"]
    try:
        Redactor.for_patterns(entries)
    except ValueError:
        assert errors
    else:
        assert not errors


def test_findings_are_sorted_by_position() -> None:
    src = 'values unused = [1]\nallow call nosuch\nallow call "a" when 1 == "1"'
    assert [d.line for d in findings(src)] == [1, 2, 3]


@pytest.mark.parametrize("severity", ["error", "warning"])
def test_every_finding_has_a_position_in_its_file(severity: str) -> None:
    src = '@id("x") allow call nosuch\n@id("x") forbid call "a" when 1 == "b"\nvalues v = [1]'
    chosen = [d for d in findings(src) if d.severity == severity]
    assert chosen
    for d in chosen:
        assert d.file == "f0.policy"
        assert d.line >= 1 and d.col >= 1


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pf=policy_files())
def test_checker_never_raises_and_always_points_into_the_file(pf: PolicyFile) -> None:
    text = format_file(pf)
    parsed = parse_source(text, "gen.policy")
    lines = max(1, text.count("\n"))
    for schema in (None, SCHEMA):
        for d in check([parsed], schema, redaction_names=REDACTION_NAMES):
            assert d.file == "gen.policy"
            assert 1 <= d.line <= lines and d.col >= 1
            assert d.severity in ("error", "warning")
