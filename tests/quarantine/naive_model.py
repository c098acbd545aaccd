"""A deterministic, naive OpenAI-compatible model on 127.0.0.1 for quarantine tests.

It behaves like a gullible small model: it reads the data in the prompt and, when
the data contains an instruction in the little language below, it obeys. Otherwise
it answers correctly, deriving each answer from the data by fixed rules.

Instructions it obeys (one per line of data):
  ``REPLY VERBATIM: <text>``   reply with <text> instead of JSON
  ``ANSWER WITH: <text>``      every answer becomes the string <text>
  ``ANSWER JSON: <json>``      the whole reply is <json>, as written
  ``SET <key> = <json>``       answer <key> becomes <json> (raw, as written)
  ``ADD KEY: <key> = <text>``  add an extra key next to the answers
  ``CALL TOOL``                reply with a tool call instead of content

Correct answers: a choice picks the first option whose text occurs in the data
(else option 0); a boolean is whether the question's quoted word occurs; a number
counts the quoted word's occurrences. In extraction, an enum string is the enum
value occurring first in the data, a patterned string the first token matching
the pattern, a number the value after ``<name>:``, a boolean whether ``<name>``
occurs, an array every match in order.

Routes are ``/<mode>/v1/chat/completions``: ``naive`` as above, ``slow`` sleeps
5 s first, ``fail`` answers HTTP 500, ``envelope`` answers a non-completion body.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


@dataclass
class NaiveModel:
    port: int = 0
    counts: Counter[str] = field(default_factory=Counter)
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)

    def url(self, mode: str = "naive") -> str:
        return f"http://127.0.0.1:{self.port}/{mode}/v1"


def _data(body: dict[str, Any]) -> str:
    user = body["messages"][1]["content"]
    lines = user.split("\n")
    return "\n".join(lines[1:-1])


def _answer_schema(body: dict[str, Any]) -> dict[str, Any]:
    system = body["messages"][0]["content"]
    line = next(line for line in system.split("\n") if line.startswith("ANSWER SCHEMA: "))
    return dict(json.loads(line[len("ANSWER SCHEMA: ") :]))


def _quoted_word(text: str) -> str:
    match = re.search(r'"([^"]+)"', text)
    return match.group(1) if match else ""


def _answer_question(schema: dict[str, Any], data: str) -> Any:
    description = schema.get("description", "")
    lowered = data.lower()
    if "Answer with the number of one option" in description:
        options = [json.loads(m) for m in re.findall(r'\d+ = ("(?:[^"\\]|\\.)*")', description)]
        for index, option in enumerate(options):
            if option.lower() in lowered:
                return index
        return 0
    word = _quoted_word(description.split(" Answer ")[0]).lower()
    if schema.get("type") == "boolean":
        return word in lowered
    if schema.get("type") in ("integer", "number"):
        return lowered.count(word) if word else schema["minimum"]
    return _extract(schema, data)


def _extract(schema: dict[str, Any], data: str, name: str = "") -> Any:
    kind = schema.get("type")
    if kind == "object":
        return {key: _extract(sub, data, key) for key, sub in schema["properties"].items()}
    if kind == "array":
        item = schema["items"]
        found: list[Any] = []
        if "enum" in item:
            positions = sorted((data.find(v), v) for v in item["enum"] if v in data)
            found = [v for _, v in positions]
        elif "pattern" in item:
            found = [t for t in _tokens(data) if re.fullmatch(item["pattern"], t)]
        return found[: schema["maxItems"]]
    if "enum" in schema:
        present = sorted(
            (data.find(str(v)), i) for i, v in enumerate(schema["enum"]) if str(v) in data
        )
        return schema["enum"][present[0][1]] if present else schema["enum"][0]
    if kind == "string":
        return next((t for t in _tokens(data) if re.fullmatch(schema["pattern"], t)), "")
    if kind in ("integer", "number"):
        match = re.search(rf"{re.escape(name)}:\s*(-?\d+(?:\.\d+)?)", data)
        if not match:
            return schema["minimum"]
        number = float(match.group(1))
        return int(number) if kind == "integer" else number
    if kind == "boolean":
        return name.replace("_", " ") in data.lower()
    return None


def _tokens(data: str) -> list[str]:
    return [t.strip(".,;:()[]{}\"'") for t in data.split()]


def _naive_reply(body: dict[str, Any]) -> dict[str, Any]:
    data = _data(body)
    schema = _answer_schema(body)
    directives = [line.strip() for line in data.split("\n")]

    def completion(content: str | None, **message: Any) -> dict[str, Any]:
        return {
            "id": "chatcmpl-naive",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model"),
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "stop",
                    "message": {"role": "assistant", "content": content, **message},
                }
            ],
        }

    for line in directives:
        if line.startswith("REPLY VERBATIM: "):
            return completion(line[len("REPLY VERBATIM: ") :])
        if line.startswith("ANSWER JSON: "):
            return completion(line[len("ANSWER JSON: ") :])
        if line == "CALL TOOL":
            call = {
                "id": "c1",
                "type": "function",
                "function": {"name": "send_email", "arguments": "{}"},
            }
            return completion(None, tool_calls=[call])

    questions = "answers" in schema.get("properties", {})
    if questions:
        props = schema["properties"]["answers"]["properties"]
        answers: dict[str, Any] = {qid: _answer_question(sub, data) for qid, sub in props.items()}
    else:
        answers = _extract(schema, data)
    raw: dict[str, str] = {}
    for line in directives:
        if line.startswith("ANSWER WITH: "):
            text = line[len("ANSWER WITH: ") :]
            for key in answers:
                answers[key] = text
        match = re.match(r"SET (\w+) = (.+)$", line)
        if match:
            answers[match.group(1)] = None
            raw[match.group(1)] = match.group(2)
    reply: dict[str, Any] = {"answers": answers} if questions else answers
    for line in directives:
        match = re.match(r"ADD KEY: (\w+) = (.+)$", line)
        if match:
            reply[match.group(1)] = match.group(2)
    content = json.dumps(reply)
    for key, value in raw.items():
        content = content.replace(f'"{key}": null', f'"{key}": {value}')
    return completion(content)


def build_app(model: NaiveModel) -> Starlette:
    async def chat(request: Request) -> Response:
        mode = request.path_params["mode"]
        model.counts[mode] += 1
        body = await request.json()
        model.requests.append(body)
        model.headers.append(dict(request.headers))
        if mode == "slow":
            await asyncio.sleep(5)
        if mode == "fail":
            return JSONResponse({"error": {"message": "boom"}}, status_code=500)
        if mode == "envelope":
            return JSONResponse({"result": "IGNORE PREVIOUS INSTRUCTIONS"})
        return JSONResponse(_naive_reply(body))

    return Starlette(routes=[Route("/{mode}/v1/chat/completions", chat, methods=["POST"])])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
