"""Front-door overhead: the ASGI middleware and the httpx transports versus no Bastion.

Measured in-process so network noise does not dominate: the ASGI app is called
directly, the transports wrap an ``httpx.MockTransport``. The request is a
non-streaming chat completion with 20 tools and 50 messages (a quarter of them
tool outputs); the streaming case is a 1 MB SSE stream of text deltas.

    python benchmarks/adapters.py [--json] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from bastion.adapters.asgi import BastionMiddleware
from bastion.adapters.pipeline import Guard
from bastion.adapters.transport import AsyncBastionTransport, BastionTransport
from bastion.events import Identity
from bastion.policy import Policy

POLICY = """
default call allow
default result trusted
default model allow
tools outward = ["send_*", "post_*", "transfer"]
forbid call outward when context.tainted reason "no outward actions after untrusted content"
forbid call "delete_*" reason "never delete"
hide tool "admin_*" unless identity.groups has "admin"
ask call "transfer" when args.amount > 100
untrusted result "web_*"
redact result "read_secrets" using ["secrets"]
allow model "gpt-*"
"""


def request_body() -> bytes:
    tools = [
        {
            "type": "function",
            "function": {
                "name": f"tool_{i}",
                "description": f"tool number {i}",
                "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
            },
        }
        for i in range(20)
    ]
    messages: list[dict[str, Any]] = [{"role": "system", "content": "You are helpful."}]
    i = 0
    while len(messages) < 50:
        messages.append({"role": "user", "content": f"Please look up item {i} for me."})
        call_id = f"call_{i}"
        messages.append(
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {"name": f"tool_{i % 20}", "arguments": '{"q": "x"}'},
                    }
                ],
            }
        )
        messages.append(
            {"role": "tool", "tool_call_id": call_id, "content": f"result {i}: " + "data " * 20}
        )
        messages.append({"role": "assistant", "content": f"Item {i} is fine."})
        i += 1
    return json.dumps({"model": "gpt-test", "messages": messages[:50], "tools": tools}).encode()


RESPONSE = json.dumps(
    {
        "id": "c",
        "object": "chat.completion",
        "created": 1,
        "model": "gpt-test",
        "choices": [
            {
                "index": 0,
                "finish_reason": "tool_calls",
                "message": {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_x",
                            "type": "function",
                            "function": {"name": "tool_3", "arguments": '{"q": "weather"}'},
                        }
                    ],
                },
            }
        ],
    }
).encode()


def sse_stream(total: int = 1 << 20) -> list[bytes]:
    event = (
        b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m",'
        b'"choices":[{"index":0,"delta":{"content":"hello world, some streamed text "},'
        b'"finish_reason":null}]}\n\n'
    )
    body = event * (total // len(event)) + b"data: [DONE]\n\n"
    return [body[i : i + 4096] for i in range(0, len(body), 4096)]


def make_app(stream: list[bytes] | None) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        media = b"text/event-stream" if stream else b"application/json"
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", media)]}
        )
        if stream is None:
            await send({"type": "http.response.body", "body": RESPONSE})
            return
        for part in stream:
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    return app


async def call_asgi(app: Any, body: bytes) -> int:
    sent = False
    size = 0

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal size
        size += len(message.get("body", b""))

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/completions",
        "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1),
    }
    await app(scope, receive, send)
    return size


async def timings(fn: Callable[[], Awaitable[Any]], n: int) -> list[float]:
    for _ in range(max(10, n // 10)):
        await fn()
    out = []
    for _ in range(n):
        start = time.perf_counter()
        await fn()
        out.append(time.perf_counter() - start)
    return out


def overhead(base: list[float], guarded: list[float]) -> dict[str, float]:
    def pct(values: list[float], q: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {
        "overhead_p50_us": round((pct(guarded, 0.5) - pct(base, 0.5)) * 1e6, 1),
        "overhead_p99_us": round((pct(guarded, 0.99) - pct(base, 0.99)) * 1e6, 1),
        "baseline_p50_us": round(pct(base, 0.5) * 1e6, 1),
        "guarded_p50_us": round(pct(guarded, 0.5) * 1e6, 1),
    }


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: round(statistics.median(r[k] for r in runs), 1) for k in runs[0]}


def make_guard(policy: Policy) -> Guard:
    return Guard(policy, identity=Identity("bench-agent"), on_decision=lambda event: None)


async def bench_middleware(policy: Policy, body: bytes, n: int) -> dict[str, float]:
    bare = make_app(None)
    guarded = BastionMiddleware(bare, guard=make_guard(policy))
    base = await timings(lambda: call_asgi(bare, body), n)
    with_bastion = await timings(lambda: call_asgi(guarded, body), n)
    return overhead(base, with_bastion)


def mock() -> httpx.MockTransport:
    return httpx.MockTransport(
        lambda request: httpx.Response(
            200, headers={"content-type": "application/json"}, content=RESPONSE
        )
    )


async def bench_async_transport(policy: Policy, body: bytes, n: int) -> dict[str, float]:
    bare = mock()
    guarded = AsyncBastionTransport(mock(), guard=make_guard(policy))

    async def send(transport: Any) -> None:
        request = httpx.Request("POST", "http://upstream/v1/chat/completions", content=body)
        response = await transport.handle_async_request(request)
        await response.aread()

    base = await timings(lambda: send(bare), n)
    with_bastion = await timings(lambda: send(guarded), n)
    return overhead(base, with_bastion)


def bench_sync_transport(policy: Policy, body: bytes, n: int) -> dict[str, float]:
    bare = mock()
    guarded = BastionTransport(mock(), guard=make_guard(policy))

    def run(transport: Any) -> list[float]:
        out = []
        for i in range(n + n // 10):
            start = time.perf_counter()
            request = httpx.Request("POST", "http://upstream/v1/chat/completions", content=body)
            transport.handle_request(request).read()
            if i >= n // 10:
                out.append(time.perf_counter() - start)
        return out

    return overhead(run(bare), run(guarded))


async def bench_stream(policy: Policy, n: int) -> dict[str, float]:
    stream = sse_stream()
    size = sum(map(len, stream))
    bare = make_app(stream)
    guarded = BastionMiddleware(bare, guard=make_guard(policy))
    body = json.dumps(
        {"model": "gpt-test", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    ).encode()
    base = await timings(lambda: call_asgi(bare, body), n)
    with_bastion = await timings(lambda: call_asgi(guarded, body), n)
    base_rate = size / statistics.median(base)
    guarded_rate = size / statistics.median(with_bastion)
    return {
        "throughput_ratio": round(guarded_rate / base_rate, 3),
        "baseline_mb_per_s": round(base_rate / 1e6, 1),
        "guarded_mb_per_s": round(guarded_rate / 1e6, 1),
    }


async def main_async(quick: bool) -> dict[str, Any]:
    policy = Policy.from_source(POLICY)
    body = request_body()
    n, repeats = (300, 3) if quick else (2000, 5)
    middleware = median_of([await bench_middleware(policy, body, n) for _ in range(repeats)])
    transport = median_of([await bench_async_transport(policy, body, n) for _ in range(repeats)])
    sync_transport = median_of(
        [await asyncio.to_thread(bench_sync_transport, policy, body, n) for _ in range(repeats)]
    )
    streams = [await bench_stream(policy, 5 if quick else 20) for _ in range(repeats)]
    streaming = {k: statistics.median(s[k] for s in streams) for k in streams[0]}
    return {
        "middleware": middleware,
        "transport": transport,
        "sync_transport": sync_transport,
        "streaming": streaming,
        "request": {"tools": 20, "messages": 50, "bytes": len(body)},
        "stream_bytes": sum(map(len, sse_stream())),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    args = parser.parse_args(argv)
    result = asyncio.run(main_async(args.quick))
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
