"""Front-door overhead: the ASGI middleware and the httpx transports versus no Bastion.

Request overhead is measured in-process so network noise does not dominate: the
ASGI app is called directly, the transports wrap an ``httpx.MockTransport``, and
each repeat times the bare and the guarded path side by side (alternating). The
request is a non-streaming chat completion with 20 tools and 50 messages (12 of
them tool outputs); ``middleware_large_request`` is the same conversation with
15 KB tool outputs full of quotes and newlines (187 KB), where parsing dominates.

Streaming throughput goes over real I/O, because a pass-through baseline that
does no I/O only measures how fast Python hands a buffer over: an upstream
process serves a 1 MB SSE stream of chat text deltas with uvicorn on 127.0.0.1,
and this process reads it with an httpx client (bytes only, no SSE parsing, so
the baseline is as fast as a client can be). Compared, in the same run:

* ``bare``: the plain stream, no Bastion anywhere;
* ``middleware``: the same stream through ``BastionMiddleware`` in the server;
* ``transport``: the bare stream read through ``AsyncBastionTransport``;
* ``sync_bare`` / ``sync_transport``: the same with a sync client and ``BastionTransport``.

Two upstream write patterns: 4 KB writes (``chunked``) and one event per write
(``per_event``, as LLM providers send them). ``throughput_ratio`` is the
middleware's ratio for 4 KB writes, the harder case for Bastion.

    python benchmarks/adapters.py [--json] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
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


def request_body_large() -> bytes:
    """The same conversation with 15 KB tool outputs (quotes, newlines, brackets): 187 KB."""
    data = json.loads(request_body())
    for message in data["messages"]:
        if message["role"] == "tool":
            message["content"] = 'lorem ipsum dolor sit amet, "quoted" {x: [1]}\n ' * 300
    return json.dumps(data).encode()


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


EVENT = (
    b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m",'
    b'"choices":[{"index":0,"delta":{"content":"hello world, some streamed text "},'
    b'"finish_reason":null}]}\n\n'
)
STREAM_BYTES = 1 << 20


def sse_body(total: int = STREAM_BYTES) -> bytes:
    return EVENT * (total // len(EVENT)) + b"data: [DONE]\n\n"


def sse_stream(total: int = STREAM_BYTES, write: int = 4096) -> list[bytes]:
    """The stream as the upstream writes it: ``write`` bytes a time, or 0 for one event a time."""
    body = sse_body(total)
    if write == 0:
        return [e + b"\n\n" for e in body.split(b"\n\n") if e]
    return [body[i : i + write] for i in range(0, len(body), write)]


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


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def overhead(base: list[float], guarded: list[float]) -> dict[str, float]:
    return {
        "overhead_p50_us": round((pct(guarded, 0.5) - pct(base, 0.5)) * 1e6, 1),
        "overhead_p99_us": round((pct(guarded, 0.99) - pct(base, 0.99)) * 1e6, 1),
        "baseline_p50_us": round(pct(base, 0.5) * 1e6, 1),
        "guarded_p50_us": round(pct(guarded, 0.5) * 1e6, 1),
    }


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0]}


def make_guard(policy: Policy) -> Guard:
    return Guard(policy, identity=Identity("bench-agent"), on_decision=lambda event: None)


async def side_by_side(
    bare: Callable[[], Awaitable[Any]], guarded: Callable[[], Awaitable[Any]], n: int
) -> dict[str, float]:
    """Time both paths in alternating batches, so drifting machine load hits both alike."""
    base: list[float] = []
    with_bastion: list[float] = []
    batch = max(10, n // 10)
    await timings(bare, 0)
    await timings(guarded, 0)
    for _ in range(n // batch):
        base += await timings(bare, batch)
        with_bastion += await timings(guarded, batch)
    return overhead(base, with_bastion)


async def bench_middleware(policy: Policy, body: bytes, n: int) -> dict[str, float]:
    bare = make_app(None)
    guarded = BastionMiddleware(bare, guard=make_guard(policy))
    return await side_by_side(lambda: call_asgi(bare, body), lambda: call_asgi(guarded, body), n)


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

    return await side_by_side(lambda: send(bare), lambda: send(guarded), n)


def bench_sync_transport(policy: Policy, body: bytes, n: int) -> dict[str, float]:
    bare = mock()
    guarded = BastionTransport(mock(), guard=make_guard(policy))

    def run(transport: Any, count: int) -> list[float]:
        out = []
        for _ in range(count):
            start = time.perf_counter()
            request = httpx.Request("POST", "http://upstream/v1/chat/completions", content=body)
            transport.handle_request(request).read()
            out.append(time.perf_counter() - start)
        return out

    batch = max(10, n // 10)
    run(bare, batch)
    run(guarded, batch)
    base: list[float] = []
    with_bastion: list[float] = []
    for _ in range(n // batch):
        base += run(bare, batch)
        with_bastion += run(guarded, batch)
    return overhead(base, with_bastion)


# ---------------------------------------------------------------- streaming over loopback

STREAM_REQUEST = json.dumps(
    {"model": "gpt-test", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
).encode()


def upstream_app() -> Any:
    """The upstream process's app: ``/bare/<write>/...`` plain, ``/guarded/<write>/...`` behind the middleware."""
    apps = {}
    for label, write in (("chunked", 4096), ("per_event", 0)):
        bare = make_app(sse_stream(write=write))
        apps[f"/bare/{label}"] = bare
        apps[f"/guarded/{label}"] = BastionMiddleware(
            bare, guard=make_guard(Policy.from_source(POLICY))
        )

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        prefix = "/".join(scope["path"].split("/")[:3])
        await apps[prefix](scope, receive, send)

    return app


def serve_upstream(port: int) -> None:
    import uvicorn

    uvicorn.run(upstream_app(), host="127.0.0.1", port=port, log_level="warning", lifespan="off")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def upstream_process() -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve-upstream", str(port)],
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("upstream server did not start") from None
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


async def read_async(client: httpx.AsyncClient, url: str) -> tuple[float, int]:
    start = time.perf_counter()
    size = 0
    async with client.stream("POST", url, content=STREAM_REQUEST) as response:
        response.raise_for_status()
        async for chunk in response.aiter_raw():
            size += len(chunk)
    return time.perf_counter() - start, size


def read_sync(client: httpx.Client, url: str) -> tuple[float, int]:
    start = time.perf_counter()
    size = 0
    with client.stream("POST", url, content=STREAM_REQUEST) as response:
        response.raise_for_status()
        for chunk in response.iter_raw():
            size += len(chunk)
    return time.perf_counter() - start, size


async def bench_stream(policy: Policy, base_url: str, reads: int, repeats: int) -> dict[str, Any]:
    """MB/s of each path and its ratio to ``bare`` (same round), medians over the rounds."""
    plain = httpx.AsyncClient(timeout=60)
    guarded = httpx.AsyncClient(
        transport=AsyncBastionTransport(httpx.AsyncHTTPTransport(), guard=make_guard(policy)),
        timeout=60,
    )
    sync_plain = httpx.Client(timeout=60)
    sync_guarded = httpx.Client(
        transport=BastionTransport(httpx.HTTPTransport(), guard=make_guard(policy)), timeout=60
    )
    result: dict[str, Any] = {}
    try:
        for label in ("chunked", "per_event"):
            bare_url = f"{base_url}/bare/{label}/v1/chat/completions"
            guarded_url = f"{base_url}/guarded/{label}/v1/chat/completions"
            paths: dict[str, Callable[[], Awaitable[tuple[float, int]]]] = {
                "bare": functools.partial(read_async, plain, bare_url),
                "middleware": functools.partial(read_async, plain, guarded_url),
                "transport": functools.partial(read_async, guarded, bare_url),
                "sync_bare": functools.partial(asyncio.to_thread, read_sync, sync_plain, bare_url),
                "sync_transport": functools.partial(
                    asyncio.to_thread, read_sync, sync_guarded, bare_url
                ),
            }
            for fn in paths.values():
                await fn()  # warm-up, and a check that every path streams the whole body
            expected = len(sse_body())
            rates: dict[str, list[float]] = {name: [] for name in paths}
            for _ in range(repeats):
                # Each round reads every path once, in turn, ``reads`` times: a path and
                # its baseline are always measured moments apart, so drifting load from
                # other processes hits both alike; each round gives each path's median.
                times: dict[str, list[float]] = {name: [] for name in paths}
                for _ in range(reads):
                    for name, fn in paths.items():
                        elapsed, size = await fn()
                        if size < expected:
                            raise RuntimeError(f"{name}: stream cut short ({size} bytes)")
                        times[name].append(elapsed)
                for name in paths:
                    rates[name].append(expected / statistics.median(times[name]) / 1e6)
            rows: dict[str, Any] = {}
            for name, values in rates.items():
                base_name = "sync_bare" if name.startswith("sync") else "bare"
                ratios = [v / b for v, b in zip(values, rates[base_name], strict=True)]
                rows[name] = {
                    "mb_per_s": round(statistics.median(values), 1),
                    "ratio": round(statistics.median(ratios), 3),
                }
            result[label] = rows
    finally:
        await plain.aclose()
        await guarded.aclose()
        sync_plain.close()
        sync_guarded.close()
    return result


async def bench_stream_inprocess(policy: Policy, n: int) -> dict[str, float]:
    """Bastion's own processing rate: the in-process app behind the middleware, no I/O."""
    stream = sse_stream()
    size = sum(map(len, stream))
    guarded = BastionMiddleware(make_app(stream), guard=make_guard(policy))
    times = await timings(lambda: call_asgi(guarded, STREAM_REQUEST), n)
    return {"guarded_mb_per_s": round(size / statistics.median(times) / 1e6, 1)}


async def main_async(quick: bool) -> dict[str, Any]:
    policy = Policy.from_source(POLICY)
    body = request_body()
    n, repeats = (300, 3) if quick else (2000, 5)
    middleware = median_of([await bench_middleware(policy, body, n) for _ in range(repeats)])
    large = request_body_large()
    middleware_large = median_of(
        [await bench_middleware(policy, large, max(100, n // 4)) for _ in range(repeats)]
    )
    transport = median_of([await bench_async_transport(policy, body, n) for _ in range(repeats)])
    sync_transport = median_of(
        [await asyncio.to_thread(bench_sync_transport, policy, body, n) for _ in range(repeats)]
    )
    with upstream_process() as base_url:
        loopback = await bench_stream(policy, base_url, 5 if quick else 9, repeats)
    inprocess = median_of(
        [await bench_stream_inprocess(policy, 3 if quick else 10) for _ in range(repeats)]
    )
    from importlib.metadata import version

    import uvicorn

    return {
        "middleware": middleware,
        "middleware_large_request": {**middleware_large, "bytes": len(large)},
        "transport": transport,
        "sync_transport": sync_transport,
        "streaming": {
            "throughput_ratio": loopback["chunked"]["middleware"]["ratio"],
            "transport_throughput_ratio": loopback["chunked"]["transport"]["ratio"],
            "loopback": loopback,
            "inprocess_no_io": inprocess,
            "server": f"uvicorn {uvicorn.__version__} (h11 {version('h11')}), httpx {httpx.__version__}",
        },
        "request": {"tools": 20, "messages": 50, "bytes": len(body)},
        "stream_bytes": len(sse_body()),
        "repeats": repeats,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    parser.add_argument("--serve-upstream", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_upstream:
        serve_upstream(args.serve_upstream)
        return 0
    result = asyncio.run(main_async(args.quick))
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
