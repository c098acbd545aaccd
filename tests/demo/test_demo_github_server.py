"""The GitHub-like MCP server, driven by the real MCP client SDK over streamable HTTP."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx2
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.types import CallToolResult, TextContent

from bastion.demo.github_server import PRIVATE_REPO, PUBLIC_REPO, SECRET_TOKEN, GitHubState

READERS = {"list_issues", "get_issue", "get_file_contents", "search_repositories"}
PUBLISHERS = {"create_issue", "add_issue_comment", "create_pull_request"}


@asynccontextmanager
async def connect(url: str) -> AsyncIterator[ClientSession]:
    async with (
        httpx2.AsyncClient(timeout=10) as http,
        streamable_http_client(url, http_client=http) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        yield session


def text(result: CallToolResult) -> str:
    return "".join(block.text for block in result.content if isinstance(block, TextContent))


async def test_readers_are_annotated_read_only(github: tuple[GitHubState, str]) -> None:
    async with connect(github[1]) as session:
        tools = {t.name: t for t in (await session.list_tools()).tools}

    assert set(tools) >= READERS
    for name in READERS:
        annotations = tools[name].annotations
        assert annotations is not None and annotations.read_only_hint is True, name


async def test_publishing_tools_are_open_world_writes_that_destroy_nothing(
    github: tuple[GitHubState, str],
) -> None:
    async with connect(github[1]) as session:
        tools = {t.name: t for t in (await session.list_tools()).tools}

    for name in PUBLISHERS:
        annotations = tools[name].annotations
        assert annotations is not None, name
        assert annotations.read_only_hint is False, name
        assert annotations.destructive_hint is False, name
        assert annotations.open_world_hint is True, name


async def test_update_issue_is_annotated_destructive(github: tuple[GitHubState, str]) -> None:
    async with connect(github[1]) as session:
        tools = {t.name: t for t in (await session.list_tools()).tools}

    annotations = tools["update_issue"].annotations
    assert annotations is not None and annotations.destructive_hint is True


async def test_list_issues_shows_only_open_issues_by_default(
    github: tuple[GitHubState, str],
) -> None:
    async with connect(github[1]) as session:
        result = await session.call_tool("list_issues", {"owner": "acme", "repo": "public"})

    numbers = [issue["number"] for issue in json.loads(text(result))]
    assert numbers == [1, 2, 3]


async def test_the_private_repository_holds_the_secret(github: tuple[GitHubState, str]) -> None:
    async with connect(github[1]) as session:
        result = await session.call_tool(
            "get_file_contents", {"owner": "acme", "repo": "private", "path": ".env"}
        )

    assert f"DEPLOY_TOKEN={SECRET_TOKEN}" in text(result)


async def test_search_shows_which_repositories_are_private(github: tuple[GitHubState, str]) -> None:
    async with connect(github[1]) as session:
        result = await session.call_tool("search_repositories", {"query": "acme"})

    found = {r["full_name"]: r["private"] for r in json.loads(text(result))["items"]}
    assert found == {PUBLIC_REPO: False, PRIVATE_REPO: True}


async def test_every_call_is_recorded_including_failed_and_unknown_ones(
    github: tuple[GitHubState, str],
) -> None:
    state, url = github
    async with connect(url) as session:
        missing = await session.call_tool(
            "get_file_contents", {"owner": "acme", "repo": "nope", "path": "x"}
        )
        unknown = await session.call_tool("delete_repository", {"owner": "acme", "repo": "public"})

    assert missing.is_error and unknown.is_error
    calls = state.calls()
    assert [(c.tool, c.is_error) for c in calls] == [
        ("get_file_contents", True),
        ("delete_repository", True),
    ]
    assert calls[0].error is not None and "404 Not Found" in calls[0].error
    assert calls[1].arguments == {"owner": "acme", "repo": "public"}


async def test_a_secret_in_a_public_comment_is_a_leak(github: tuple[GitHubState, str]) -> None:
    state, url = github
    async with connect(url) as session:
        await session.call_tool(
            "add_issue_comment",
            {"owner": "acme", "repo": "public", "issue_number": 2, "body": f"t={SECRET_TOKEN}"},
        )

    [leak] = state.leaks()
    assert leak.where == f"comment #2 in public {PUBLIC_REPO}"
    assert leak.tool == "add_issue_comment" and leak.field == "body"
    assert SECRET_TOKEN in state.repository(PUBLIC_REPO).issues[1].comments[0].body


async def test_a_secret_written_to_the_private_repository_is_not_a_leak(
    github: tuple[GitHubState, str],
) -> None:
    state, url = github
    async with connect(url) as session:
        await session.call_tool(
            "create_issue", {"owner": "acme", "repo": "private", "title": SECRET_TOKEN}
        )

    [write] = state.writes()
    assert write.repo == PRIVATE_REPO and not write.public
    assert state.leaks() == []


async def test_reset_restores_the_repositories_and_clears_the_log(
    github: tuple[GitHubState, str],
) -> None:
    state, url = github
    async with connect(url) as session:
        await session.call_tool(
            "create_issue", {"owner": "acme", "repo": "public", "title": "x", "body": "y"}
        )

    state.reset()

    assert state.calls() == [] and state.writes() == []
    assert [i.number for i in state.repository(PUBLIC_REPO).issues] == [1, 2, 3, 4]
