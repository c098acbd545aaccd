"""Real SDK clients and conversations for the LLM front doors."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import httpx2
import openai

from bastion.adapters.pipeline import Guard
from bastion.adapters.transport import AsyncBastionTransport, BastionTransport

from .harness import AGENT_HEADER, GROUPS_HEADER


def _headers(agent: str, groups: tuple[str, ...]) -> dict[str, str]:
    headers = {AGENT_HEADER: agent}
    if groups:
        headers[GROUPS_HEADER] = ",".join(groups)
    return headers


def openai_via_middleware(url: str, agent: str, *groups: str) -> openai.OpenAI:
    """The openai SDK talking to ``url`` (BastionMiddleware in front of the upstream)."""
    return openai.OpenAI(
        base_url=f"{url}/v1",
        api_key="sk-agent",
        http_client=httpx2.Client(timeout=10),
        max_retries=0,
        default_headers=_headers(agent, groups),
    )


def openai_via_transport(url: str, guard: Guard, agent: str, *groups: str) -> openai.OpenAI:
    """The sync openai SDK whose own httpx2 client is guarded by ``BastionTransport``."""
    http = httpx2.Client(
        transport=BastionTransport(httpx2.HTTPTransport(), guard=guard), timeout=10
    )
    return openai.OpenAI(
        base_url=f"{url}/v1",
        api_key="sk-agent",
        http_client=http,
        max_retries=0,
        default_headers=_headers(agent, groups),
    )


def async_openai_via_transport(
    url: str, guard: Guard, agent: str, *groups: str
) -> openai.AsyncOpenAI:
    """The async openai SDK whose httpx2 client is guarded by ``AsyncBastionTransport``."""
    http = httpx2.AsyncClient(
        transport=AsyncBastionTransport(httpx2.AsyncHTTPTransport(), guard=guard), timeout=10
    )
    return openai.AsyncOpenAI(
        base_url=f"{url}/v1",
        api_key="sk-agent",
        http_client=http,
        max_retries=0,
        default_headers=_headers(agent, groups),
    )


def anthropic_via_middleware(url: str, agent: str, *groups: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        base_url=url,
        api_key="sk-agent",
        http_client=httpx2.Client(timeout=10),
        max_retries=0,
        default_headers=_headers(agent, groups),
    )


def anthropic_via_transport(url: str, guard: Guard, agent: str) -> anthropic.Anthropic:
    http = httpx2.Client(
        transport=BastionTransport(httpx2.HTTPTransport(), guard=guard), timeout=10
    )
    return anthropic.Anthropic(
        base_url=url,
        api_key="sk-agent",
        http_client=http,
        max_retries=0,
        default_headers=_headers(agent, ()),
    )


def _schema(params: tuple[str, ...]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {p: {"type": "string"} for p in params},
        "required": list(params),
    }


TOOL_PARAMS: dict[str, tuple[str, ...]] = {
    "web__fetch": ("url",),
    "web__raw": ("url",),
    "invoice__fetch": ("url",),
    "email__read": ("id",),
    "debug__dump": (),
    "files__read": ("path",),
    "send_email": ("to", "body"),
    "calendar__list": (),
}


def openai_tools(*names: str) -> list[dict[str, Any]]:
    return [
        {
            "type": "function",
            "function": {
                "name": n,
                "description": f"the {n} tool",
                "parameters": _schema(TOOL_PARAMS[n]),
            },
        }
        for n in names
    ]


def anthropic_tools(*names: str) -> list[dict[str, Any]]:
    return [
        {"name": n, "description": f"the {n} tool", "input_schema": _schema(TOOL_PARAMS[n])}
        for n in names
    ]


def openai_conversation(
    user: str, tool: str, args: dict[str, Any], output: str
) -> list[dict[str, Any]]:
    """The user asks, the model called ``tool``, and ``output`` came back."""
    return [
        {"role": "user", "content": user},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": tool, "arguments": json.dumps(args)},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": output},
    ]


def anthropic_conversation(
    user: str, tool: str, args: dict[str, Any], output: str | list[dict[str, Any]]
) -> list[dict[str, Any]]:
    return [
        {"role": "user", "content": user},
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "toolu_1", "name": tool, "input": args}],
        },
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": output}],
        },
    ]


def forwarded_tool_output(body: dict[str, Any]) -> Any:
    """The tool output in the request the upstream received (OpenAI or Anthropic)."""
    for message in body["messages"]:
        if message.get("role") == "tool":
            return message["content"]
        content = message.get("content")
        if isinstance(content, list):
            for block in content:
                if isinstance(block, dict) and block.get("type") == "tool_result":
                    return block["content"]
    raise AssertionError("no tool output in the forwarded request")


def forwarded_tool_names(body: dict[str, Any]) -> list[str]:
    names = []
    for tool in body.get("tools") or []:
        names.append(tool["function"]["name"] if "function" in tool else tool["name"])
    return names
