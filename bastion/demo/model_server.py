"""A scripted, OpenAI-compatible model that behaves like a naive LLM.

It answers ``POST /v1/chat/completions`` (JSON, or SSE when ``stream`` is
true) and ``GET /v1/models``. Its behaviour is a deterministic function of the
conversation it is sent, like a model at temperature 0:

1. Asked about the issues of ``owner/repo``, it calls ``list_issues``.
2. It reads every tool result and follows the instructions it finds there,
   as a naive model does. It understands two kinds of sentence:
   "read the file `PATH` from the repository OWNER/REPO" (``get_file_contents``)
   and "create a new issue in OWNER/REPO titled "TITLE" whose body is the
   full content of that file" (``create_issue``), or "comment on issue #N in
   OWNER/REPO with the full content of that file" (``add_issue_comment``).
3. When a tool result says the call was refused, blocked or failed, or a tool
   it needs is not in the request's ``tools``, it gives up and answers with a
   summary that says what it could not do.
4. Otherwise it answers with a summary of the open issues.

It only ever calls tools offered in the request, matching them by name or by
an aggregating gateway's ``server__name``.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

__all__ = [
    "MODEL_NAME",
    "ModelLog",
    "ModelReply",
    "ModelRequestRecord",
    "PlannedCall",
    "build_model_app",
    "naive_reply",
]

MODEL_NAME = "naive-demo-model"

_REPO = r"`?(?P<owner>[\w.-]+)/(?P<repo>[\w.-]+?)`?"
_READ_FILE = re.compile(
    r"read (?:the )?file [`'\"]?(?P<path>[^\s`'\"]+)[`'\"]? (?:from|in) (?:the )?(?:repository |repo )?"
    + _REPO
    + r"(?=[\s,.;:]|$)",
    re.IGNORECASE,
)
_CREATE_ISSUE = re.compile(
    r"(?:create|open) a (?:new )?(?:public )?issue in (?:the )?(?:repository |repo )?"
    + _REPO
    + r" (?:titled|with the title) \"(?P<title>[^\"]+)\"",
    re.IGNORECASE,
)
_COMMENT = re.compile(
    r"comment on issue #(?P<number>\d+) (?:of|in) (?:the )?(?:repository |repo )?"
    + _REPO
    + r"(?=[\s,.;:]|$)",
    re.IGNORECASE,
)
_REPO_IN_QUESTION = re.compile(r"\b(?P<owner>[\w.-]+)/(?P<repo>[\w-]+(?:\.[\w-]+)*)\b")
_REFUSAL = re.compile(
    r"\b(blocked|refused|forbidden|denied|not allowed|not permitted|unauthori[sz]ed)\b",
    re.IGNORECASE,
)
_ERROR = re.compile(r"^\s*(error\b|\d{3} )", re.IGNORECASE)
_HTML_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)


@dataclass(frozen=True)
class PlannedCall:
    """A tool call the model intends to make, by the tool's base name."""

    tool: str
    arguments: dict[str, Any]
    purpose: str
    body_from: PlannedCall | None = None  # the read whose content becomes the body

    def key(self) -> tuple[str, str]:
        wanted = {k: v for k, v in self.arguments.items() if k != "body"}
        return self.tool, json.dumps(wanted, sort_keys=True)


@dataclass(frozen=True)
class ModelReply:
    """What the model answers: text, or one tool call."""

    content: str | None = None
    tool: str | None = None  # the offered tool's full name
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _Call:
    tool: str  # base name, gateway prefix removed
    arguments: dict[str, Any]
    result: str | None


def _base_name(name: str) -> str:
    return name.rsplit("__", 1)[-1]


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(part.get("text", ""))
            for part in content
            if isinstance(part, dict) and part.get("type") == "text"
        )
    return ""


def _strings_in(text: str) -> Iterator[str]:
    """The text, or every string inside it when it is JSON."""
    try:
        value = json.loads(text)
    except ValueError:
        yield text
        return
    stack = [value]
    while stack:
        item = stack.pop(0)
        if isinstance(item, str):
            yield item
        elif isinstance(item, list):
            stack[:0] = item
        elif isinstance(item, dict):
            stack[:0] = list(item.values())


def _instructions_in(text: str) -> list[PlannedCall]:
    """The instructions a naive model obeys in a tool result, in text order."""
    found: list[tuple[int, PlannedCall]] = []
    offset = 0
    last_read: PlannedCall | None = None
    for chunk in _strings_in(text):
        events: list[tuple[int, str, re.Match[str]]] = []
        for kind, pattern in (
            ("read", _READ_FILE),
            ("issue", _CREATE_ISSUE),
            ("comment", _COMMENT),
        ):
            events.extend((m.start(), kind, m) for m in pattern.finditer(chunk))
        for start, kind, m in sorted(events, key=lambda e: e[0]):
            owner, repo = m["owner"], m["repo"].rstrip(".")
            if kind == "read":
                last_read = PlannedCall(
                    "get_file_contents",
                    {"owner": owner, "repo": repo, "path": m["path"]},
                    f"read {m['path']} from {owner}/{repo}",
                )
                found.append((offset + start, last_read))
            elif kind == "issue":
                args = {"owner": owner, "repo": repo, "title": m["title"]}
                found.append(
                    (
                        offset + start,
                        PlannedCall(
                            "create_issue", args, f"open an issue in {owner}/{repo}", last_read
                        ),
                    )
                )
            else:
                args = {"owner": owner, "repo": repo, "issue_number": int(m["number"])}
                purpose = f"comment on issue #{m['number']} in {owner}/{repo}"
                found.append(
                    (offset + start, PlannedCall("add_issue_comment", args, purpose, last_read))
                )
        offset += len(chunk) + 1
    return [call for _, call in sorted(found, key=lambda f: f[0])]


def _calls_made(messages: list[dict[str, Any]]) -> list[_Call]:
    results = {
        m.get("tool_call_id"): _text_of(m.get("content"))
        for m in messages
        if m.get("role") == "tool"
    }
    calls: list[_Call] = []
    for message in messages:
        if message.get("role") != "assistant":
            continue
        for tool_call in message.get("tool_calls") or []:
            function = tool_call.get("function") or {}
            try:
                arguments = json.loads(function.get("arguments") or "{}")
            except ValueError:
                arguments = {}
            calls.append(
                _Call(
                    _base_name(str(function.get("name", ""))),
                    arguments if isinstance(arguments, dict) else {},
                    results.get(tool_call.get("id")),
                )
            )
    return calls


def _matches(planned: PlannedCall, call: _Call) -> bool:
    return planned.tool == call.tool and all(
        call.arguments.get(k) == v for k, v in planned.arguments.items()
    )


def _summary(owner: str, repo: str, listing: str | None) -> str:
    if listing is None:
        return f"I could not read the issues of {owner}/{repo}."
    try:
        issues = json.loads(listing)
    except ValueError:
        issues = None
    if not isinstance(issues, list):
        return f"I could not make sense of the issue list of {owner}/{repo}."
    if not issues:
        return f"{owner}/{repo} has no open issues."
    lines = [f"{owner}/{repo} has {len(issues)} open issues:"]
    for issue in issues:
        if not isinstance(issue, dict):
            continue
        # Rendered Markdown hides HTML comments, and so does this summary.
        visible = _HTML_COMMENT.sub("", str(issue.get("body") or "")).strip()
        first = visible.split("\n", 1)[0].split(". ", 1)[0].rstrip(".")
        labels = ", ".join(
            str(label.get("name")) for label in issue.get("labels") or [] if isinstance(label, dict)
        )
        tag = f" [{labels}]" if labels else ""
        lines.append(f"- #{issue.get('number')} {issue.get('title')}{tag}: {first}.")
    return "\n".join(lines)


def _failure(result: str) -> str | None:
    if _REFUSAL.search(result):
        return "was refused"
    if _ERROR.match(result):
        return "failed"
    return None


def naive_reply(
    messages: list[dict[str, Any]], offered: list[str], *, tools_allowed: bool = True
) -> ModelReply:
    """The naive model's next message for a conversation and the offered tool names."""
    by_base = {_base_name(name): name for name in offered}
    user_text = next(
        (_text_of(m.get("content")) for m in reversed(messages) if m.get("role") == "user"),
        "",
    )
    target = _REPO_IN_QUESTION.search(user_text)
    if target is None:
        return ModelReply("Which repository should I look at? Please name it as owner/name.")
    owner, repo = target["owner"], target["repo"]
    calls = _calls_made(messages)
    listing_call = PlannedCall(
        "list_issues",
        {"owner": owner, "repo": repo, "state": "open"},
        f"list the open issues of {owner}/{repo}",
    )
    plan = [listing_call]
    done: dict[tuple[str, str], str | None] = {}
    listing: str | None = None
    index = 0
    while index < len(plan):
        planned = plan[index]
        index += 1
        made = next((c for c in calls if _matches(planned, c)), None)
        if made is None:
            full_name = by_base.get(planned.tool)
            if full_name is None or not tools_allowed:
                return ModelReply(
                    _summary(owner, repo, listing)
                    + f"\n\nI could not {planned.purpose}: the {planned.tool} tool is not available to me."
                )
            arguments = dict(planned.arguments)
            if planned.body_from is not None:
                source = done.get(planned.body_from.key())
                if source is None:
                    return ModelReply(_summary(owner, repo, listing))
                arguments["body"] = source
            return ModelReply(tool=full_name, arguments=arguments)
        if made.result is None:
            return ModelReply(
                _summary(owner, repo, listing)
                + f"\n\nI could not {planned.purpose}: the tool gave no result."
            )
        failure = _failure(made.result)
        if failure is not None:
            excerpt = " ".join(made.result.split())[:300]
            return ModelReply(
                _summary(owner, repo, listing)
                + f"\n\nI could not {planned.purpose}: the call to {planned.tool} {failure} ({excerpt})."
            )
        done[planned.key()] = made.result
        if planned is listing_call:
            listing = made.result
        known = {p.key() for p in plan}
        plan.extend(p for p in _instructions_in(made.result) if p.key() not in known)
    return ModelReply(_summary(owner, repo, listing))


# --- the wire: OpenAI chat completions ----------------------------------------------------------


class _Wire(BaseModel):
    model_config = ConfigDict(extra="allow")


class _FunctionDef(_Wire):
    name: str


class _ToolDef(_Wire):
    type: str
    function: _FunctionDef | None = None


class _ChatRequest(_Wire):
    model: str
    messages: list[dict[str, Any]]
    tools: list[_ToolDef] | None = None
    tool_choice: Any = None
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None


@dataclass(frozen=True)
class ModelRequestRecord:
    """One chat completion request as the model server saw it."""

    seq: int
    offered_tools: list[str]
    message_roles: list[str]
    stream: bool
    reply_tool: str | None
    reply_text: str | None
    authorization: str | None


class ModelLog:
    """The model server's record of the requests it answered, safe across threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: list[ModelRequestRecord] = []

    def requests(self) -> list[ModelRequestRecord]:
        with self._lock:
            return list(self._requests)

    def clear(self) -> None:
        with self._lock:
            self._requests.clear()

    def add(self, **fields: Any) -> None:
        with self._lock:
            self._requests.append(ModelRequestRecord(seq=len(self._requests) + 1, **fields))


def _error(status: int, message: str, kind: str, code: str | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": None, "code": code}},
        status_code=status,
    )


def _usage(messages: list[dict[str, Any]], reply_text: str) -> dict[str, int]:
    # A rough token count (four characters a token) keeps usage plausible and deterministic.
    prompt = sum(len(json.dumps(m)) for m in messages) // 4
    completion = max(1, len(reply_text) // 4)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _pieces(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


class _Completion:
    def __init__(self, request: _ChatRequest, reply: ModelReply) -> None:
        digest = hashlib.sha256(json.dumps(request.messages, sort_keys=True).encode()).hexdigest()
        self.id = f"chatcmpl-{digest[:24]}"
        self.model = request.model
        self.created = int(time.time())
        self.reply = reply
        self.arguments = json.dumps(reply.arguments)
        self.call_id = f"call_{digest[24:48]}"
        self.finish: Literal["stop", "tool_calls"] = "tool_calls" if reply.tool else "stop"
        self.usage = _usage(request.messages, reply.content or self.arguments)

    def message(self) -> dict[str, Any]:
        message: dict[str, Any] = {
            "role": "assistant",
            "content": self.reply.content,
            "refusal": None,
        }
        if self.reply.tool:
            message["tool_calls"] = [
                {
                    "id": self.call_id,
                    "type": "function",
                    "function": {"name": self.reply.tool, "arguments": self.arguments},
                }
            ]
        return message

    def body(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": self.message(),
                    "logprobs": None,
                    "finish_reason": self.finish,
                }
            ],
            "usage": self.usage,
        }

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }

    def chunks(self, include_usage: bool) -> Iterator[dict[str, Any]]:
        if self.reply.tool:
            yield self._chunk(
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": self.call_id,
                            "type": "function",
                            "function": {"name": self.reply.tool, "arguments": ""},
                        }
                    ],
                }
            )
            # Arguments arrive as JSON fragments, as from a real model.
            for piece in _pieces(self.arguments, 16):
                yield self._chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
        else:
            yield self._chunk({"role": "assistant", "content": "", "refusal": None})
            for piece in _pieces(self.reply.content or "", 24):
                yield self._chunk({"content": piece})
        yield self._chunk({}, self.finish)
        if include_usage:
            usage_chunk = self._chunk({})
            usage_chunk["choices"] = []
            usage_chunk["usage"] = self.usage
            yield usage_chunk


def build_model_app(*, api_key: str | None = None, log: ModelLog | None = None) -> Starlette:
    """The naive model as an OpenAI-compatible Starlette app (routes under ``/v1``).

    With `api_key`, requests must carry ``Authorization: Bearer <api_key>``;
    `log` records every request answered.
    """
    record = log if log is not None else ModelLog()

    def authorized(request: Request) -> bool:
        return api_key is None or request.headers.get("authorization") == f"Bearer {api_key}"

    async def models(request: Request) -> Response:
        if not authorized(request):
            return _error(
                401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key"
            )
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {"id": MODEL_NAME, "object": "model", "created": 0, "owned_by": "bastion-demo"}
                ],
            }
        )

    async def chat_completions(request: Request) -> Response:
        if not authorized(request):
            return _error(
                401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key"
            )
        try:
            chat = _ChatRequest.model_validate_json(await request.body())
        except ValidationError as exc:
            return _error(
                400, f"Invalid request: {exc.errors()[0]['msg']}", "invalid_request_error"
            )
        offered = [t.function.name for t in chat.tools or () if t.type == "function" and t.function]
        reply = naive_reply(chat.messages, offered, tools_allowed=chat.tool_choice != "none")
        record.add(
            offered_tools=offered,
            message_roles=[str(m.get("role")) for m in chat.messages],
            stream=bool(chat.stream),
            reply_tool=reply.tool,
            reply_text=reply.content,
            authorization=request.headers.get("authorization"),
        )
        completion = _Completion(chat, reply)
        if not chat.stream:
            return JSONResponse(completion.body())
        include_usage = bool((chat.stream_options or {}).get("include_usage"))

        async def events() -> AsyncIterator[bytes]:
            for chunk in completion.chunks(include_usage):
                yield f"data: {json.dumps(chunk)}\n\n".encode()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
        ]
    )
