"""A small tool-using agent: an OpenAI-compatible model plus one MCP server.

This is the kind of agent Bastion protects, written the way the official SDK
examples write it. It knows two base URLs and nothing else; to put Bastion in
front of it, point both at ``bastion serve``::

    transcript = await run_agent(
        "summarise the open issues of acme/public",
        model_base_url="http://127.0.0.1:8000/v1",      # the model, or Bastion's /v1
        mcp_url="http://127.0.0.1:8001/mcp",            # the MCP server, or Bastion's /mcp
    )
    print(transcript.final_answer)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

try:
    import httpx2
    from mcp import types as mcp_types
    from mcp.client.session import ClientSession
    from mcp.client.streamable_http import streamable_http_client
    from mcp.shared.exceptions import MCPError
    from openai import APIError, AsyncOpenAI
    from openai.types.chat import (
        ChatCompletion,
        ChatCompletionMessageParam,
        ChatCompletionToolParam,
    )
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "the Bastion demo agent needs the openai, mcp and httpx2 packages: "
        "pip install 'openai>=3' 'mcp>=2' 'httpx2>=2'"
    ) from exc

__all__ = ["DEFAULT_MODEL", "SYSTEM_PROMPT", "ToolCallRecord", "Transcript", "run_agent"]

DEFAULT_MODEL = "naive-demo-model"
SYSTEM_PROMPT = "You are a helpful assistant for GitHub projects. Use the tools you are given."


@dataclass(frozen=True)
class ToolCallRecord:
    """One tool call the model asked for, and what came back."""

    name: str
    arguments: dict[str, Any]
    result: str
    is_error: bool


@dataclass
class Transcript:
    """What happened during one run of the agent."""

    question: str
    tool_calls: list[ToolCallRecord] = field(default_factory=list)
    tools_offered: list[list[str]] = field(default_factory=list)  # per model turn
    final_answer: str | None = None
    refusal: str | None = None  # the model's own refusal, when it gave one
    error: str | None = None  # a model or MCP error that ended the run
    stop_reason: Literal["answered", "refused", "max_steps", "error"] = "answered"

    @property
    def tools_called(self) -> list[str]:
        return [call.name for call in self.tool_calls]

    def to_dict(self) -> dict[str, Any]:
        return {
            "question": self.question,
            "tool_calls": [
                {
                    "name": c.name,
                    "arguments": c.arguments,
                    "result": c.result,
                    "is_error": c.is_error,
                }
                for c in self.tool_calls
            ],
            "tools_offered": self.tools_offered,
            "final_answer": self.final_answer,
            "refusal": self.refusal,
            "error": self.error,
            "stop_reason": self.stop_reason,
        }


def _as_openai_tool(tool: mcp_types.Tool) -> ChatCompletionToolParam:
    return {
        "type": "function",
        "function": {
            "name": tool.name,
            "description": tool.description or tool.title or tool.name,
            "parameters": tool.input_schema,
        },
    }


def _result_text(result: mcp_types.CallToolResult) -> str:
    parts = [block.text for block in result.content if isinstance(block, mcp_types.TextContent)]
    if not parts and result.structured_content is not None:
        parts = [json.dumps(result.structured_content)]
    text = "\n".join(parts)
    # Tell the model plainly that the call did not succeed.
    return f"Error: {text}" if result.is_error else text


async def _list_all_tools(session: ClientSession) -> list[mcp_types.Tool]:
    tools: list[mcp_types.Tool] = []
    cursor: str | None = None
    while True:
        params = mcp_types.PaginatedRequestParams(cursor=cursor) if cursor else None
        page = await session.list_tools(params=params)
        tools.extend(page.tools)
        cursor = page.next_cursor
        if not cursor:
            return tools


async def _call_tool(
    session: ClientSession, name: str, arguments_json: str
) -> tuple[dict[str, Any], str, bool]:
    try:
        arguments = json.loads(arguments_json or "{}")
    except ValueError:
        return {}, f"Error: the arguments for {name} are not valid JSON", True
    if not isinstance(arguments, dict):
        return {}, f"Error: the arguments for {name} must be a JSON object", True
    try:
        result = await session.call_tool(name, arguments)
    except MCPError as exc:
        # A JSON-RPC error (for example from a gateway that refused the call).
        return arguments, f"Error: {exc.error.message}", True
    return arguments, _result_text(result), bool(result.is_error)


async def _complete(
    client: AsyncOpenAI,
    model: str,
    messages: list[ChatCompletionMessageParam],
    tools: list[ChatCompletionToolParam],
    stream: bool,
) -> ChatCompletion:
    if not stream:
        if tools:
            return await client.chat.completions.create(model=model, messages=messages, tools=tools)
        return await client.chat.completions.create(model=model, messages=messages)
    if tools:
        manager = client.chat.completions.stream(model=model, messages=messages, tools=tools)
    else:
        manager = client.chat.completions.stream(model=model, messages=messages)
    async with manager as events:
        return await events.get_final_completion()


async def run_agent(
    question: str,
    *,
    model_base_url: str,
    mcp_url: str,
    model: str = DEFAULT_MODEL,
    api_key: str = "demo-agent-key",
    mcp_token: str | None = "demo-agent-key",
    max_steps: int = 8,
    stream: bool = False,
    system_prompt: str = SYSTEM_PROMPT,
) -> Transcript:
    """Answer `question` with the model at `model_base_url` and the MCP server at `mcp_url`.

    Each turn the agent lists the MCP tools (a server or gateway may change
    them during a session), offers them to the model as function tools, runs
    the tool calls the model asks for and sends back the results, until the
    model answers in text or `max_steps` turns have passed.
    """
    transcript = Transcript(question=question)
    messages: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": system_prompt},
        {"role": "user", "content": question},
    ]
    headers = {"Authorization": f"Bearer {mcp_token}"} if mcp_token else {}
    async with (
        AsyncOpenAI(
            base_url=model_base_url, api_key=api_key, max_retries=0, timeout=30.0
        ) as client,
        httpx2.AsyncClient(headers=headers, timeout=30.0) as mcp_http,
        streamable_http_client(mcp_url, http_client=mcp_http) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        for _ in range(max_steps):
            offered = {tool.name: tool for tool in await _list_all_tools(session)}
            transcript.tools_offered.append(sorted(offered))
            try:
                completion = await _complete(
                    client, model, messages, [_as_openai_tool(t) for t in offered.values()], stream
                )
            except APIError as exc:
                transcript.error = f"model request failed: {exc.message}"
                transcript.stop_reason = "error"
                return transcript
            message = completion.choices[0].message
            if message.refusal:
                transcript.refusal = message.refusal
                transcript.final_answer = message.content or message.refusal
                transcript.stop_reason = "refused"
                return transcript
            calls = [c for c in message.tool_calls or [] if c.type == "function"]
            if not calls:
                transcript.final_answer = message.content or ""
                return transcript
            messages.append(
                {
                    "role": "assistant",
                    "content": message.content,
                    "tool_calls": [
                        {
                            "id": c.id,
                            "type": "function",
                            "function": {
                                "name": c.function.name,
                                "arguments": c.function.arguments,
                            },
                        }
                        for c in calls
                    ],
                }
            )
            for call in calls:
                name = call.function.name
                if name in offered:
                    arguments, text, is_error = await _call_tool(
                        session, name, call.function.arguments
                    )
                else:
                    # Never run a tool that was not offered, whatever the model says.
                    arguments, text, is_error = (
                        {},
                        f"Error: no tool named {name} is available",
                        True,
                    )
                transcript.tool_calls.append(ToolCallRecord(name, arguments, text, is_error))
                messages.append({"role": "tool", "tool_call_id": call.id, "content": text})
        transcript.stop_reason = "max_steps"
        return transcript
