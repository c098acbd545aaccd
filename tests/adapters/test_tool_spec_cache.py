"""Tools lists seen lately are not rebuilt, and the reuse never shows stale specs."""

from __future__ import annotations

import copy
import json
from typing import Any

from bastion.adapters.anthropic import AnthropicCodec
from bastion.adapters.openai import OpenAIChatCodec, OpenAIResponsesCodec


def body(tools: list[dict[str, Any]]) -> bytes:
    return json.dumps(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": tools}
    ).encode()


def tool(name: str, description: str = "") -> dict[str, Any]:
    return {
        "type": "function",
        "function": {"name": name, "description": description, "parameters": {"type": "object"}},
    }


def specs(tools: list[dict[str, Any]]) -> list[tuple[str, str, str | None]]:
    req = OpenAIChatCodec.parse_request(body(tools))
    return [(s.name, s.description, s.server) for s in req.tools]


def test_the_same_tools_list_gives_the_same_specs_each_time() -> None:
    tools = [tool("github__create_issue", "open an issue"), tool("read", "read a file")]
    first = OpenAIChatCodec.parse_request(body(tools)).tools
    second = OpenAIChatCodec.parse_request(body(copy.deepcopy(tools))).tools
    assert first == second
    assert [(s.name, s.server) for s in second] == [
        ("github__create_issue", "github"),
        ("read", None),
    ]


def test_a_changed_description_or_name_is_seen_at_once() -> None:
    assert specs([tool("a", "one")]) == [("a", "one", None)]
    assert specs([tool("a", "two")]) == [("a", "two", None)]
    assert specs([tool("b", "two")]) == [("b", "two", None)]


def test_mutating_a_parsed_body_does_not_change_what_a_later_request_gets() -> None:
    tools = [tool("x", "original")]
    req = OpenAIChatCodec.parse_request(body(tools))
    req.body["tools"][0]["function"]["description"] = "mutated"
    req.body["tools"][0]["function"]["name"] = "y"
    assert specs(tools) == [("x", "original", None)]
    assert specs([tool("y", "mutated")]) == [("y", "mutated", None)]


def test_a_legacy_functions_entry_does_not_leak_into_a_later_request() -> None:
    tools = [tool("x")]
    data = json.loads(body(tools))
    data["functions"] = [{"name": "legacy"}]
    assert [s.name for s in OpenAIChatCodec.parse_request(data).tools] == ["x", "legacy"]
    assert specs(tools) == [("x", "", None)]


def test_anthropic_and_responses_tools_lists_are_reused_and_never_stale() -> None:
    def anthropic(description: str) -> list[str]:
        tools = [{"name": "send", "description": description, "input_schema": {}}]
        body = {"model": "m", "max_tokens": 5, "messages": [], "tools": tools}
        return [
            t.description for t in AnthropicCodec.parse_request(json.dumps(body).encode()).tools
        ]

    def responses(description: str) -> list[str]:
        tools = [{"type": "function", "name": "send", "description": description}]
        body = {"model": "m", "input": "hi", "tools": tools}
        parsed = OpenAIResponsesCodec.parse_request(json.dumps(body).encode())
        return [t.description for t in parsed.tools]

    for parse in (anthropic, responses):
        assert parse("one") == ["one"]
        assert parse("one") == ["one"]
        assert parse("two") == ["two"]
