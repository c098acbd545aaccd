"""Arguments of earlier calls in a conversation are parsed when read, with the same outcome."""

from __future__ import annotations

import json
from typing import Any

from bastion.adapters.openai import OpenAIChatCodec
from bastion.adapters.pipeline import Forward, Guard
from bastion.events import Identity
from bastion.policy import Policy

POLICY = """
default call allow
default result trusted
default model allow
untrusted result "fetch" when args.url startswith "http://evil"
hide tool "send_mail" when context.tainted
"""


def chat(arguments: str) -> dict[str, Any]:
    call = {"id": "c1", "type": "function", "function": {"name": "fetch", "arguments": arguments}}
    tools = [
        {"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
        for n in ("fetch", "send_mail")
    ]
    return {
        "model": "gpt-test",
        "messages": [
            {"role": "user", "content": "read it"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c1", "content": "page text"},
        ],
        "tools": tools,
    }


async def offered_tools(arguments: str) -> list[str]:
    guard = Guard(Policy.from_source(POLICY), identity=Identity("agent"))
    route = guard.route("POST", "/v1/chat/completions")
    assert route is not None
    body = json.dumps(chat(arguments)).encode()
    outcome = await guard.request(route, "POST", "/v1/chat/completions", [], body)
    assert isinstance(outcome, Forward)
    return [t["function"]["name"] for t in json.loads(outcome.body).get("tools", [])]


async def test_a_result_rule_reads_the_arguments_of_the_call_that_produced_the_output() -> None:
    assert await offered_tools('{"url": "http://evil.example/x"}') == ["fetch"]
    assert await offered_tools('{"url": "https://docs.example/x"}') == ["fetch", "send_mail"]


def test_unusable_history_arguments_read_as_no_arguments() -> None:
    for text in ('{"url": "a", "url": "b"}', "not json", "[1]", ""):
        (view,) = OpenAIChatCodec.parse_request(json.dumps(chat(text)).encode()).tool_results
        assert dict(view.result.arguments) == {}
        assert len(view.result.arguments) == 0


def test_history_arguments_compare_equal_to_their_parsed_value() -> None:
    (view,) = OpenAIChatCodec.parse_request(
        json.dumps(chat('{"url": "u", "n": [1, 2]}')).encode()
    ).tool_results
    assert view.result.arguments == {"url": "u", "n": [1, 2]}
    assert view.result.arguments["n"] == [1, 2] and "url" in view.result.arguments
