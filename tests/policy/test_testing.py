"""Policy test files: loading, each kind of event, failures with traces, file errors."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from bastion.policy.testing import (
    context_from,
    discover,
    format_report,
    identity_from,
    report_json,
    run_tests,
)

ROOT = Path(__file__).resolve().parents[2]

POLICY = """\
policy "t"
default call deny
tools outward = ["mail__send", "slack__post"]

@id("eng-reads")
allow call "github__get_*" when identity.groups has "eng"

@id("no-outward-after-taint")
forbid call outward when context.tainted reason "outward tools are blocked after taint"

@id("mail")
allow call "mail__send"

@id("web-untrusted")
untrusted result "web__*"

@id("redact-aws")
redact result * using ["aws"]

@id("cheap")
allow model "gpt-4o-mini" route "openai"

@id("contractors")
untrusted context when identity.groups has "contractors"
"""


def write(tmp_path: Path, cases: str, policy: str = POLICY, name: str = "t") -> Path:
    (tmp_path / f"{name}.policy").write_text(policy)
    f = tmp_path / f"{name}.test.yaml"
    f.write_text(f"policy: {name}.policy\n" + textwrap.dedent(cases))
    return f


def test_passing_cases_are_counted(tmp_path: Path) -> None:
    f = write(
        tmp_path,
        """
        cases:
          - name: eng reads
            identity: {sub: a, groups: [eng]}
            call: github__get_issue
            expect: allow
            rules: [eng-reads]
          - name: others do not
            identity: {sub: b}
            call: github__get_issue
            expect: forbid
            defaulted: true
        """,
    )
    report = run_tests([f])
    assert (report.passed, report.failed, report.ok) == (2, 0, True)
    assert format_report(report).splitlines()[-1] == "2 passed, 0 failed"


def test_failing_effect_is_reported_with_the_trace(tmp_path: Path) -> None:
    f = write(
        tmp_path,
        """
        cases:
          - name: mail after taint
            identity: {sub: a}
            call: mail__send
            args: {to: x@example.com}
            context: {tainted: true}
            expect: allow
        """,
    )
    report = run_tests([f])
    (result,) = report.results
    assert not result.passed
    assert result.problems == ("effect: expected allow, got forbid",)
    assert result.line == 4
    assert "[x] forbid" in result.trace
    assert "no-outward-after-taint" in result.trace
    assert "t.policy:9" in result.trace
    text = format_report(report)
    assert f"FAIL {f}:4: mail after taint" in text
    assert text.splitlines()[-1] == "0 passed, 1 failed"


def test_rule_ids_must_match_exactly(tmp_path: Path) -> None:
    f = write(
        tmp_path,
        """
        cases:
          - name: wrong rule
            identity: {sub: a}
            call: mail__send
            expect: allow
            rules: [eng-reads]
        """,
    )
    (result,) = run_tests([f]).results
    assert result.problems == ("rules: expected ['eng-reads'], got ['mail']",)


def test_reason_is_matched_as_a_substring(tmp_path: Path) -> None:
    f = write(
        tmp_path,
        """
        cases:
          - name: reason
            call: slack__post
            context: {taint_sources: [web__fetch]}
            expect: forbid
            reason: blocked after taint
        """,
    )
    assert run_tests([f]).ok


def test_identity_can_be_named_once_and_reused(tmp_path: Path) -> None:
    f = write(
        tmp_path,
        """
        identities:
          alice: {sub: alice, groups: [eng]}
        cases:
          - name: named
            identity: alice
            call: github__get_pr
            expect: allow
        """,
    )
    assert run_tests([f]).ok


def test_unknown_identity_name_fails_the_case(tmp_path: Path) -> None:
    f = write(
        tmp_path,
        """
        cases:
          - name: typo
            identity: alcie
            call: github__get_pr
            expect: allow
        """,
    )
    (result,) = run_tests([f]).results
    assert not result.passed
    assert "unknown identity 'alcie'" in result.problems[0]


def test_list_event_compares_visible_names_in_order(tmp_path: Path) -> None:
    f = write(
        tmp_path,
        """
        cases:
          - name: eng sees reads and mail
            identity: {sub: a, groups: [eng]}
            list: [mail__send, github__get_issue, admin__reset]
            expect: [mail__send, github__get_issue]
        """,
    )
    assert run_tests([f]).ok


def test_failing_list_shows_each_tools_decision(tmp_path: Path) -> None:
    f = write(
        tmp_path,
        """
        cases:
          - name: wrong
            identity: {sub: a}
            list: [mail__send, github__get_issue]
            expect: [github__get_issue]
        """,
    )
    (result,) = run_tests([f]).results
    assert result.problems == ("visible: expected ['github__get_issue'], got ['mail__send']",)
    assert "github__get_issue:" in result.trace
    assert "mail__send:" in result.trace


def test_result_event_checks_effect_and_redactions(tmp_path: Path) -> None:
    f = write(
        tmp_path,
        """
        cases:
          - name: web output
            result: web__fetch
            args: {url: "https://example.com"}
            output: "hello"
            expect: untrusted
            redact: [aws]
        """,
    )
    assert run_tests([f]).ok


def test_model_event_checks_the_route(tmp_path: Path) -> None:
    f = write(
        tmp_path,
        """
        cases:
          - name: cheap model
            model: gpt-4o-mini
            expect: allow
            route: anthropic
        """,
    )
    (result,) = run_tests([f]).results
    assert result.problems == ("route: expected 'anthropic', got 'openai'",)


def test_context_start_event(tmp_path: Path) -> None:
    f = write(
        tmp_path,
        """
        cases:
          - name: contractors start untrusted
            identity: {sub: c, groups: [contractors]}
            context_start: true
            expect: untrusted
            rules: [contractors]
        """,
    )
    assert run_tests([f]).ok


def test_tool_annotations_come_from_the_tools_section(tmp_path: Path) -> None:
    policy = "allow call * when tool.readOnlyHint == true\n"
    f = write(
        tmp_path,
        """
        tools:
          db__query: {annotations: {readOnlyHint: true}}
        cases:
          - {name: annotated, call: db__query, expect: allow}
          - {name: bare, call: db__drop, expect: forbid}
        """,
        policy=policy,
    )
    assert run_tests([f]).ok


def test_policy_path_is_relative_to_the_test_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sub = tmp_path / "sub"
    sub.mkdir()
    f = write(sub, "cases:\n  - {name: x, call: mail__send, expect: allow}\n")
    monkeypatch.chdir(tmp_path)
    assert run_tests([Path("sub") / f.name]).ok


def test_invalid_yaml_is_an_error_with_its_line(tmp_path: Path) -> None:
    f = tmp_path / "bad.test.yaml"
    f.write_text("policy: t.policy\ncases:\n  - name: [unclosed\n")
    report = run_tests([f])
    (err,) = report.errors
    assert err.file == str(f)
    assert err.line >= 3
    assert "invalid YAML" in err.message
    assert not report.ok


def test_case_with_two_events_is_an_error_at_its_line(tmp_path: Path) -> None:
    f = write(
        tmp_path,
        """
        cases:
          - {name: fine, call: mail__send, expect: allow}
          - name: two events
            call: mail__send
            model: gpt-4o
            expect: allow
        """,
    )
    report = run_tests([f])
    (err,) = report.errors
    assert err.line == 5
    assert "exactly one event" in err.message


def test_misspelled_key_is_an_error(tmp_path: Path) -> None:
    f = write(tmp_path, "cases:\n  - {name: x, call: a, expect: allow, rule: [a]}\n")
    (err,) = run_tests([f]).errors
    assert "rule" in err.message
    assert "Extra inputs" in err.message or "extra" in err.message.lower()


def test_broken_policy_is_reported_with_its_diagnostics(tmp_path: Path) -> None:
    f = write(tmp_path, "cases:\n  - {name: x, call: a, expect: allow}\n", policy="allow cal *\n")
    report = run_tests([f])
    assert report.results == []
    assert [(e.file, e.line) for e in report.errors] == [(str(tmp_path / "t.policy"), 1)]
    assert "allow cal" in format_report(report)  # the caret excerpt


def test_directory_is_searched_for_test_files(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "x.test.yaml").write_text("")
    (tmp_path / "a" / "y.test.yaml").write_text("")
    (tmp_path / "a" / "notes.yaml").write_text("")
    assert discover([tmp_path]) == [
        str(tmp_path / "a" / "b" / "x.test.yaml"),
        str(tmp_path / "a" / "y.test.yaml"),
    ]


def test_no_test_files_is_an_error(tmp_path: Path) -> None:
    report = run_tests([tmp_path])
    assert not report.ok
    assert "no test files" in report.errors[0].message


def test_untrusted_texts_make_a_tainted_context() -> None:
    ctx = context_from({"untrusted_texts": ["x"], "user_text": "hi", "team": "red"})
    assert ctx.tainted
    assert ctx.user_texts == ("hi",)
    assert ctx.attributes == {"team": "red"}


def test_identity_description_maps_claims_to_attributes() -> None:
    ident = identity_from({"sub": "a", "groups": ["eng"], "department": "ops"})
    assert (ident.subject, ident.groups, ident.get("department")) == ("a", ("eng",), "ops")


def test_report_as_json_lists_every_case(tmp_path: Path) -> None:
    f = write(tmp_path, "cases:\n  - {name: x, call: mail__send, expect: ask}\n")
    data = report_json(run_tests([f]))
    assert data["passed"] == 0 and data["failed"] == 1
    assert data["cases"][0]["problems"] == ["effect: expected ask, got allow"]


def test_baseline_rules_pass_their_tests() -> None:
    report = run_tests([ROOT / "rules"])
    assert report.errors == []
    assert report.failed == 0, format_report(report)
    assert report.passed >= 15


def test_case_without_identity_is_anonymous(tmp_path: Path) -> None:
    f = write(
        tmp_path,
        "cases:\n  - {name: anon, call: x, expect: forbid, rules: [no-anon]}\n",
        policy='default call allow\n@id("no-anon") forbid call * when identity.anonymous\n',
    )
    assert run_tests([f]).ok
