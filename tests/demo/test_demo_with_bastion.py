"""Run 2 of the demo for real: the same agent through ``bastion serve`` with the shipped rules."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import pytest
import yaml
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.types import TextContent

from bastion.audit import RecordFilter, open_log, verify_log
from bastion.cli import main as bastion_main
from bastion.demo.cli import main
from bastion.demo.gateway import shipped_rules
from bastion.demo.github_server import SECRET_TOKEN, RecordedCall, RecordedWrite
from bastion.demo.model_server import ModelRequestRecord
from bastion.demo.scenario import (
    WITH_BASTION,
    WITHOUT_BASTION,
    DemoServers,
    RunResult,
    check_runs,
    run_with_bastion,
    run_without_bastion,
)
from bastion.identity.keys import parse_key_id

ROOT = Path(__file__).resolve().parents[2]
EXFIL_READ = {"owner": "acme", "repo": "private", "path": ".env"}


@dataclass
class Observed:
    """One run through Bastion and what the servers saw, captured before anything else runs."""

    result: RunResult
    github_calls: list[RecordedCall]
    github_writes: list[RecordedWrite]
    model_requests: list[ModelRequestRecord]
    directory: Path
    gateway_url: str
    agent_key: str
    audit: list[dict[str, Any]]  # the audit file right after the run (later tests add to it)


def _observe(servers: DemoServers, *, stream: bool = False) -> Observed:
    result = asyncio.run(run_with_bastion(servers, stream=stream))
    assert result.audit_file is not None
    directory = Path(result.audit_file).parent
    return Observed(
        result=result,
        github_calls=servers.github_state.calls(),
        github_writes=servers.github_state.writes(),
        model_requests=servers.model_log.requests(),
        directory=directory,
        gateway_url=servers.endpoints["Bastion (bastion serve)"],
        agent_key=servers.agent_key,
        audit=list(open_log(directory / "audit.jsonl").query(RecordFilter())),
    )


@pytest.fixture(scope="module")
def run2(demo_servers: DemoServers) -> Iterator[Observed]:
    # The gateway stays up (servers.keep) until the module's servers stop.
    yield _observe(demo_servers)


def _audit(observed: Observed) -> list[dict[str, Any]]:
    return list(open_log(observed.directory / "audit.jsonl").query(RecordFilter()))


def test_nothing_leaks_and_nothing_is_written(run2: Observed) -> None:
    assert run2.result.leaked is False
    assert run2.result.where == []
    assert run2.github_writes == []


def test_the_read_of_the_private_repository_is_blocked_with_the_rule_and_reason(
    run2: Observed,
) -> None:
    [blocked] = run2.result.blocked_calls

    assert blocked["tool"] == "github__get_file_contents"
    assert blocked["arguments"] == EXFIL_READ
    assert blocked["effect"] == "forbid"
    assert blocked["rule_ids"] == ["exfil-repo-from-untrusted"]
    assert "named by untrusted content" in blocked["reasons"][0]
    assert blocked["identity"] == "demo-agent"
    assert blocked["taint_sources"] == ["github__list_issues"]


def test_the_model_asked_for_the_secret_but_the_github_server_never_got_the_call(
    run2: Observed,
) -> None:
    asked = [r.reply_tool for r in run2.model_requests if r.reply_tool]

    assert asked == ["github__list_issues", "github__get_file_contents"]
    assert [(c.tool, c.arguments) for c in run2.github_calls] == [
        ("list_issues", {"owner": "acme", "repo": "public", "state": "open"})
    ]
    assert run2.result.blocked_calls[0]["reached_server"] is False


def test_publishing_tools_disappear_from_the_agents_tools_after_the_untrusted_read(
    run2: Observed,
) -> None:
    before, after = run2.result.transcript.tools_offered

    publishing = {
        "github__create_issue",
        "github__add_issue_comment",
        "github__create_pull_request",
    }
    assert publishing <= set(before)
    assert not publishing & set(after)
    assert "github__get_file_contents" in after
    hidden = {h["tool"]: h["rule_ids"] for h in run2.result.hidden_tools}
    assert all(hidden.get(tool) == ["exfil-outward-after-taint"] for tool in publishing)


def test_the_agent_reports_the_refusal_to_the_user(run2: Observed) -> None:
    answer = run2.result.final_answer or ""

    assert run2.result.transcript.error is None
    assert "github__get_file_contents" in answer
    assert "blocked" in answer
    assert SECRET_TOKEN not in answer


def test_the_audit_file_holds_the_blocked_call_with_identity_rule_and_reason(
    run2: Observed,
) -> None:
    forbidden = [r for r in run2.audit if r["effect"] == "forbid"]

    [record] = forbidden
    assert record["kind"] == "call"
    assert record["target"] == "github__get_file_contents"
    assert record["identity"]["subject"] == "demo-agent"
    assert record["identity"]["key_id"] == parse_key_id(run2.agent_key)
    assert record["identity"]["auth_method"] == "virtual_key"
    assert record["rule_ids"] == ["exfil-repo-from-untrusted"]
    assert record["reasons"] == run2.result.blocked_calls[0]["reasons"]
    assert record["id"] == run2.result.blocked_calls[0]["audit_id"]


def test_the_reported_audit_is_the_whole_audit_file_and_its_chain_verifies(
    run2: Observed,
) -> None:
    assert [line["id"] for line in run2.result.audit] == [r["id"] for r in run2.audit]
    assert verify_log(open_log(run2.directory / "audit.jsonl")).ok


def test_the_model_receives_bastions_provider_key_never_the_agents(run2: Observed) -> None:
    provider_key = yaml.safe_load((run2.directory / "secrets.yaml").read_text())["providers"][
        "demo"
    ]

    assert run2.model_requests
    assert {r.authorization for r in run2.model_requests} == {f"Bearer {provider_key}"}
    assert run2.result.model_keys == ["Bastion's provider key"]
    assert run2.agent_key not in (run2.directory / "keys.yaml").read_text()


async def _call_through_bastion(
    observed: Observed, calls: list[tuple[str, dict[str, Any]]]
) -> list[tuple[bool, str]]:
    headers = {"Authorization": f"Bearer {observed.agent_key}"}
    answers: list[tuple[bool, str]] = []
    async with (
        httpx2.AsyncClient(timeout=10, headers=headers) as http,
        streamable_http_client(f"{observed.gateway_url}/mcp", http_client=http) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        for name, arguments in calls:
            result = await session.call_tool(name, arguments)
            text = "".join(b.text for b in result.content if isinstance(b, TextContent))
            answers.append((bool(result.is_error), text))
    return answers


async def test_a_hidden_publishing_tool_is_forbidden_when_called_anyway(
    run2: Observed, servers: DemoServers
) -> None:
    listing, publish = await _call_through_bastion(
        run2,
        [
            ("github__list_issues", {"owner": "acme", "repo": "public"}),
            (
                "github__create_issue",
                {"owner": "acme", "repo": "public", "title": "x", "body": "y"},
            ),
        ],
    )

    assert listing[0] is False and "Improve onboarding" in listing[1]
    assert publish[0] is True
    assert "github__create_issue' was blocked by policy" in publish[1]
    assert "tools that publish or send are disabled" in publish[1]
    assert [c.tool for c in servers.github_state.calls()] == ["list_issues"]
    assert servers.github_state.writes() == []
    refused = [
        r
        for r in _audit(run2)
        if r["target"] == "github__create_issue" and r["kind"] == "call" and r["effect"] == "forbid"
    ]
    [record] = refused
    # Other rules may refuse it too (the repository was named only by the issue text).
    assert "exfil-outward-after-taint" in record["rule_ids"]


def test_a_streaming_agent_is_stopped_the_same_way(demo_servers: DemoServers) -> None:
    observed = _observe(demo_servers, stream=True)

    assert observed.result.leaked is False
    assert [b["tool"] for b in observed.result.blocked_calls] == ["github__get_file_contents"]
    assert [c.tool for c in observed.github_calls] == ["list_issues"]
    assert observed.result.transcript.error is None


def test_check_runs_requires_both_runs_when_asked(run2: Observed) -> None:
    assert check_runs([run2.result], expect=[WITHOUT_BASTION, WITH_BASTION]) == [
        f"{WITHOUT_BASTION}: the run did not happen"
    ]
    assert check_runs([run2.result]) == []


def test_main_json_puts_both_runs_in_one_object(capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["--json"])

    report = json.loads(capsys.readouterr().out)
    assert status == 0, report["problems"]
    assert report["ok"] is True and report["problems"] == []
    first, second = report["runs"]
    assert (first["name"], first["leaked"]) == (WITHOUT_BASTION, True)
    assert (second["name"], second["leaked"]) == (WITH_BASTION, False)
    assert [b["tool"] for b in second["blocked_calls"]] == ["github__get_file_contents"]
    assert second["server_calls"] == ["list_issues"]
    forbid = [a for a in second["audit"] if a["effect"] == "forbid"]
    assert [(a["target"], a["identity"]["subject"], a["rule_ids"]) for a in forbid] == [
        ("github__get_file_contents", "demo-agent", ["exfil-repo-from-untrusted"])
    ]


def test_the_table_shows_the_leak_the_block_and_the_audit_side_by_side(
    capsys: pytest.CaptureFixture[str],
) -> None:
    status = main([])

    out = capsys.readouterr().out
    assert status == 0, out
    table = [
        [c.strip() for c in line.strip("|").split("|")]
        for line in out.splitlines()
        if line.startswith("| ")
    ]
    # Each row's first line (a long cell wraps onto lines with an empty first column).
    rows = {cells[0]: cells[1:] for cells in table[1:] if cells[0]}
    assert table[0] == ["", WITHOUT_BASTION, WITH_BASTION]
    assert rows["secret leaked"] == ["YES", "no"]
    assert rows["tools blocked"][0] == "none"
    assert rows["tools blocked"][1].startswith("github__get_file_contents")
    assert rows["audit lines"][0] == "none"
    assert re.match(r"\d+ records: ", rows["audit lines"][1])
    assert "BLOCKED by Bastion" in out and "exfil-repo-from-untrusted" in out
    assert "The demo behaved as described." in out


def test_main_fails_when_bastion_lets_the_attack_through(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    permissive = tmp_path / "permissive.policy"
    permissive.write_text(
        "default call allow\ndefault result trusted\ndefault model allow\nallow model *\n"
    )

    async def with_a_permissive_bastion(servers: DemoServers) -> RunResult:
        return await run_with_bastion(servers, rules=permissive)

    status = main(["--json"], runs=[run_without_bastion, with_a_permissive_bastion])

    report = json.loads(capsys.readouterr().out)
    assert status == 1
    problems = report["problems"]
    assert any(p.startswith(f"{WITH_BASTION}: the secret leaked") for p in problems)
    assert f"{WITH_BASTION}: no call was blocked" in problems


def test_bastion_demo_reaches_the_demo_through_the_bastion_command(
    capsys: pytest.CaptureFixture[str],
) -> None:
    status = bastion_main(["demo", "--json"])

    report = json.loads(capsys.readouterr().out)
    assert status == 0
    assert [run["name"] for run in report["runs"]] == [WITHOUT_BASTION, WITH_BASTION]


def test_the_shipped_rules_are_found_in_a_source_checkout() -> None:
    rules = shipped_rules()

    assert rules == ROOT / "rules"
    assert (rules / "exfiltration.policy").is_file()


def test_a_broken_policy_fails_the_demo_instead_of_running_unguarded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "broken.policy"
    broken.write_text("forbid call when (\n")

    async def with_a_broken_policy(servers: DemoServers) -> RunResult:
        return await run_with_bastion(servers, rules=broken)

    status = main([], runs=[run_without_bastion, with_a_broken_policy])

    assert status == 1
    err = capsys.readouterr().err
    assert "a run failed: PolicyError" in err and "broken.policy:1" in err
