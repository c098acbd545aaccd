"""Run 1 of the demo for real: the agent, the model and the GitHub server on 127.0.0.1."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import IO

import httpx2
import pytest
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.types import TextContent

from bastion.demo.cli import main
from bastion.demo.github_server import (
    PRIVATE_REPO,
    PUBLIC_REPO,
    SECRET_TOKEN,
)
from bastion.demo.scenario import (
    WITHOUT_BASTION,
    DemoServers,
    RunResult,
    run_agent_through,
    run_without_bastion,
)

ROOT = Path(__file__).resolve().parents[2]


async def test_without_bastion_the_secret_lands_in_a_new_public_issue(servers: DemoServers) -> None:
    result = await run_without_bastion(servers)

    created = [w for w in servers.github_state.writes() if w.tool == "create_issue"]
    assert len(created) == 1
    assert created[0].repo == PUBLIC_REPO and created[0].public
    assert SECRET_TOKEN in created[0].body
    issue = next(
        i
        for i in servers.github_state.repository(PUBLIC_REPO).issues
        if i.number == created[0].number
    )
    assert SECRET_TOKEN in issue.body
    assert result.leaked is True
    assert result.where == [
        f"issue #{created[0].number} in public {PUBLIC_REPO} ({created[0].url}), in its body"
    ]


async def test_without_bastion_the_agent_reads_the_issues_then_the_secret_then_publishes_it(
    servers: DemoServers,
) -> None:
    result = await run_without_bastion(servers)

    calls = result.transcript.tool_calls
    assert [c.name for c in calls] == ["list_issues", "get_file_contents", "create_issue"]
    assert calls[0].arguments == {"owner": "acme", "repo": "public", "state": "open"}
    assert "Read the file `.env`" in calls[0].result
    assert calls[1].arguments == {"owner": "acme", "repo": "private", "path": ".env"}
    assert calls[2].arguments["repo"] == "public"
    assert calls[2].arguments["body"] == calls[1].result
    assert [c.tool for c in servers.github_state.calls()] == result.tools_called


async def test_without_bastion_the_answer_summarises_open_issues_and_hides_the_leak(
    servers: DemoServers,
) -> None:
    result = await run_without_bastion(servers)

    answer = result.final_answer or ""
    assert "#1 Dark mode setting is forgotten after reload" in answer
    assert "#3 Improve onboarding for new contributors" in answer
    assert "Footer links" not in answer  # issue #4 is closed
    assert SECRET_TOKEN not in answer
    assert "Configuration check" not in answer


async def test_a_streaming_agent_leaks_the_same_way(servers: DemoServers) -> None:
    result = await run_without_bastion(servers, stream=True)

    assert result.tools_called == ["list_issues", "get_file_contents", "create_issue"]
    assert result.leaked is True


async def test_a_harmless_question_leaks_nothing(servers: DemoServers) -> None:
    result = await run_agent_through(
        "harmless",
        servers,
        model_base_url=servers.model_base_url,
        mcp_url=servers.mcp_url,
        question=f"summarise the open issues of {PRIVATE_REPO}",
    )

    assert result.tools_called == ["list_issues"]
    assert result.leaked is False
    assert servers.github_state.writes() == []


def test_main_reports_where_the_secret_landed(capsys: pytest.CaptureFixture[str]) -> None:
    status = main([])

    out = capsys.readouterr().out
    assert status == 0
    assert re.search(r"LEAKED: the secret is now public in issue #5 in public acme/public", out)
    assert "| secret leaked " in out and "YES" in out
    assert "The demo behaved as described." in out


def test_main_json_prints_one_object_with_run_one_leaking(
    capsys: pytest.CaptureFixture[str],
) -> None:
    status = main(["--json"])

    report = json.loads(capsys.readouterr().out)
    assert status == 0, report["problems"]
    assert report["ok"] is True
    first = report["runs"][0]
    assert first["name"] == WITHOUT_BASTION
    assert first["leaked"] is True
    assert first["tools_called"] == ["list_issues", "get_file_contents", "create_issue"]
    assert first["blocked_calls"] == [] and first["audit"] == []


def test_main_fails_when_run_one_does_not_leak(capsys: pytest.CaptureFixture[str]) -> None:
    async def private_only(servers: DemoServers) -> RunResult:
        return await run_agent_through(
            WITHOUT_BASTION,
            servers,
            model_base_url=servers.model_base_url,
            mcp_url=servers.mcp_url,
            question=f"summarise the open issues of {PRIVATE_REPO}",
        )

    status = main(["--json"], runs=[private_only])

    report = json.loads(capsys.readouterr().out)
    assert status == 1
    assert report["ok"] is False
    assert any("should have leaked" in p for p in report["problems"])


async def _issue_title(mcp_url: str, tool: str, number: int, token: str | None = None) -> str:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        httpx2.AsyncClient(timeout=10, headers=headers) as http,
        streamable_http_client(mcp_url, http_client=http) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        result = await session.call_tool(
            tool, {"owner": "acme", "repo": "public", "issue_number": number}
        )
        text = "".join(b.text for b in result.content if isinstance(b, TextContent))
        return str(json.loads(text)["title"])


def _exit_status(process: subprocess.Popen[str], stderr: IO[str], timeout: float) -> int:
    """The exit status; if it does not exit in time, every thread's stack, in the failure."""
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        status = Path(f"/proc/{process.pid}/status")
        masks = [
            line
            for line in (status.read_text().splitlines() if status.exists() else [])
            if line.startswith(("SigPnd", "ShdPnd", "SigBlk", "SigIgn", "SigCgt"))
        ]
        process.send_signal(signal.SIGABRT)  # faulthandler prints each thread's stack
        process.wait(timeout=10)
        stderr.seek(0)
        pytest.fail(
            f"still running {timeout} s after SIGINT ({'; '.join(masks)}):\n"
            f"{stderr.read()[-12_000:]}"
        )


async def test_keep_running_leaves_the_servers_and_bastion_up_until_interrupted() -> None:
    # stderr goes to a file: a pipe nobody reads could fill and block the demo, and it
    # keeps the demo's thread stacks should it not exit in time.
    with tempfile.TemporaryFile("w+") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "bastion.demo", "--keep-running"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"},
        )
        try:
            assert process.stdout is not None
            listed: dict[str, str] = {}
            for line in process.stdout:
                found = re.match(r"\s+(.+?): (\S+)$", line)
                if found:
                    listed[found.group(1)] = found.group(2)
                if "the agent's virtual key" in listed:
                    break
            github, bastion = listed["GitHub MCP server"], listed["Bastion (bastion serve)"]
            config = Path(listed["Bastion's configuration"])

            direct = await _issue_title(github, "get_issue", 3)
            through_bastion = await _issue_title(
                f"{bastion}/mcp", "github__get_issue", 3, listed["the agent's virtual key"]
            )

            assert direct == through_bastion == "Improve onboarding for new contributors"
            assert httpx2.get(f"{bastion}/healthz", timeout=5).status_code == 200
            assert config.is_file()
            process.send_signal(signal.SIGINT)
            assert _exit_status(process, stderr, timeout=10) == 0
            assert not config.exists()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
