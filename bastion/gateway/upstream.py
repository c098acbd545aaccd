"""Talking to upstreams: the pooled httpx client, request bodies, and relaying replies.

Every failure an upstream can produce reaches the agent as a well-formed error of
the agent's own protocol:

* before any byte was sent: an OpenAI or Anthropic error JSON, or a JSON-RPC
  error, with 502 (unreachable, bad reply) or 504 (timeout);
* in the middle of an SSE stream: a final error event in the protocol's form
  (OpenAI ``data: {"error": ...}``, Responses ``event: error``, Anthropic
  ``event: error``, MCP a JSON-RPC error for every request not yet answered),
  then the stream ends cleanly.

Non-streaming replies are read completely before the first byte goes out, so a
connection dropped halfway through a JSON body still becomes a clean error.

Nothing is retried: a POST that reached an upstream may have run a tool.
Secrets Bastion injected upstream (provider keys, on-behalf-of tokens,
configured credential headers) are cut out of every relayed byte, even when an
upstream echoes them, across chunk boundaries.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
from starlette.types import Receive, Send

from bastion.adapters.mcp import JSONRPCMessage, MCPEventStream
from bastion.adapters.wire import anthropic_error, dumps_compact, jsonrpc_error, openai_error
from bastion.errors import ProtocolError, UpstreamError
from bastion.gateway.config import PoolConfig, TimeoutConfig

__all__ = [
    "HOP_BY_HOP",
    "Exchange",
    "Protocol",
    "SecretScrubber",
    "error_body",
    "forward_headers",
    "make_client",
    "read_body",
    "relay",
    "send_error",
    "timeout_of",
]

Protocol = Literal["openai", "responses", "anthropic", "mcp"]

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        # httpx decodes what it asked for, so bodies go on decoded and re-framed.
        "content-encoding",
        "accept-encoding",
    }
)
JSONRPC_INTERNAL = -32603
SCRUBBED = b"[removed by bastion]"


def make_client(pool: PoolConfig, timeouts: TimeoutConfig) -> httpx.AsyncClient:
    """The one pooled client every upstream request goes through (no redirects, no env proxies)."""
    return httpx.AsyncClient(
        limits=httpx.Limits(
            max_connections=pool.max_connections,
            max_keepalive_connections=pool.max_keepalive_connections,
            keepalive_expiry=pool.keepalive_expiry_seconds,
        ),
        timeout=timeout_of(timeouts),
        follow_redirects=False,
        trust_env=False,
    )


def timeout_of(timeouts: TimeoutConfig) -> httpx.Timeout:
    return httpx.Timeout(
        connect=timeouts.connect, read=timeouts.read, write=timeouts.write, pool=timeouts.pool
    )


def forward_headers(
    raw: Iterable[tuple[bytes, bytes]], *, drop: Iterable[str] = ()
) -> dict[str, str]:
    """The agent's headers worth forwarding (hop-by-hop and ``drop`` removed, names lower-cased)."""
    dropped = HOP_BY_HOP | {name.lower() for name in drop}
    out: dict[str, str] = {}
    for name, value in raw:
        key = name.decode("latin-1").lower()
        if key not in dropped:
            out[key] = value.decode("latin-1")
    return out


async def read_body(receive: Receive, limit: int) -> bytes:
    """The whole request body; ``ProtocolError`` 413 past ``limit`` bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ProtocolError("the client disconnected", code="client_disconnected")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise ProtocolError(
                f"request body over {limit} bytes", status=413, code="body_too_large"
            )
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


class SecretScrubber:
    """Removes known secrets from a byte stream, including ones split across chunks.

    Only a chunk's tail that could start a secret is held back (rarely more than
    a few bytes), so streaming latency is unaffected.
    """

    def __init__(self, secrets: Iterable[str]) -> None:
        self._secrets = sorted({s.encode() for s in secrets if len(s) >= 8}, key=len, reverse=True)
        self._pending = b""

    def __bool__(self) -> bool:
        return bool(self._secrets)

    def feed(self, chunk: bytes) -> bytes:
        if not self._secrets:
            return chunk
        data = self._pending + chunk
        for secret in self._secrets:
            if secret in data:
                data = data.replace(secret, SCRUBBED)
        hold = 0
        for secret in self._secrets:
            for k in range(min(len(secret) - 1, len(data)), hold, -1):
                if data.endswith(secret[:k]):
                    hold = k
                    break
        self._pending = data[len(data) - hold :] if hold else b""
        return data[: len(data) - hold] if hold else data

    def clean(self, value: bytes) -> bytes:
        """``value`` (a whole header value) with every secret removed."""
        for secret in self._secrets:
            if secret in value:
                value = value.replace(secret, SCRUBBED)
        return value

    def flush(self) -> bytes:
        rest, self._pending = self._pending, b""
        return rest


def error_body(
    protocol: Protocol,
    status: int,
    message: str,
    code: str,
    request_ids: Iterable[str | int] = (),
) -> tuple[int, bytes]:
    """(HTTP status, body) for an error answered before any reply byte went out."""
    if protocol in ("openai", "responses"):
        kind = "server_error" if status >= 500 else "invalid_request_error"
        if status in (401, 403):
            kind = "authentication_error" if status == 401 else "permission_error"
        if status == 404:
            kind = "not_found_error"
        return status, dumps_compact(openai_error(message, type=kind, code=code))
    if protocol == "anthropic":
        kinds = {401: "authentication_error", 403: "permission_error", 404: "not_found_error"}
        kinds |= {413: "request_too_large", 503: "overloaded_error"}
        kind = kinds.get(status, "api_error" if status >= 500 else "invalid_request_error")
        return status, dumps_compact(anthropic_error(message, type=kind))
    ids = list(request_ids)
    errors = [jsonrpc_error(i, JSONRPC_INTERNAL, message, {"reason": code}) for i in ids]
    if len(errors) == 1:
        # MCP clients read a JSON-RPC answer to a request they sent as a normal reply.
        return 200, dumps_compact(errors[0])
    if not errors:
        return status, dumps_compact(
            jsonrpc_error(None, JSONRPC_INTERNAL, message, {"reason": code})
        )
    return 200, dumps_compact(errors)


async def send_error(
    send: Send,
    protocol: Protocol,
    status: int,
    message: str,
    code: str,
    *,
    request_ids: Iterable[str | int] = (),
    headers: Mapping[str, str] | None = None,
) -> None:
    status, body = error_body(protocol, status, message, code, request_ids)
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def _stream_error_event(
    protocol: Protocol, message: str, code: str, pending: list[str | int]
) -> bytes:
    if protocol == "openai":
        data = openai_error(message, type="server_error", code=code)
        return b"data: " + dumps_compact(data) + b"\n\n"
    if protocol == "responses":
        data = {
            "type": "error",
            "code": code,
            "message": message,
            "param": None,
            "sequence_number": 0,
        }
        return b"event: error\ndata: " + dumps_compact(data) + b"\n\n"
    if protocol == "anthropic":
        data = anthropic_error(message, type="api_error")
        return b"event: error\ndata: " + dumps_compact(data) + b"\n\n"
    return b"".join(
        b"event: message\ndata: "
        + dumps_compact(jsonrpc_error(i, JSONRPC_INTERNAL, message, {"reason": code}))
        + b"\n\n"
        for i in pending
    )


def classify(exc: BaseException, what: str) -> UpstreamError:
    """The ``UpstreamError`` an httpx failure stands for (504 timeouts, else 502)."""
    if isinstance(exc, UpstreamError):
        return exc
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamError(f"{what} timed out", status=504, code="upstream_timeout")
    if isinstance(exc, httpx.ConnectError):
        return UpstreamError(f"{what} is unreachable", status=502, code="upstream_unreachable")
    if isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError):
        return UpstreamError(f"{what} dropped the connection", status=502, code="upstream_dropped")
    if isinstance(exc, httpx.HTTPError):
        return UpstreamError(
            f"{what} failed ({type(exc).__name__})", status=502, code="upstream_error"
        )
    return UpstreamError(f"{what} failed", status=502, code="upstream_error")


@dataclass
class Exchange:
    """What happened with one upstream request, for the audit and the log."""

    status: int | None = None
    error: UpstreamError | None = None
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None

    @property
    def latency_ms(self) -> float:
        end = self.finished if self.finished is not None else time.monotonic()
        return round((end - self.started) * 1000.0, 3)


def _pending_ids(request_ids: list[str | int], answered: set[str | int]) -> list[str | int]:
    return [i for i in request_ids if i not in answered]


async def relay(
    client: httpx.AsyncClient,
    request: httpx.Request,
    send: Send,
    *,
    protocol: Protocol,
    what: str,
    scrubber: SecretScrubber,
    max_body_bytes: int,
    request_ids: list[str | int] | None = None,
    keep_headers: Callable[[str], bool] | None = None,
    receive: Receive | None = None,
) -> Exchange:
    """Send ``request`` and relay the reply to the ASGI ``send``; never raises for upstream trouble.

    ``request_ids`` (MCP) are the JSON-RPC ids of the POST, answered with errors
    when the upstream fails. ``keep_headers(name)`` chooses reply headers to pass
    back (default: all but hop-by-hop). With ``receive`` (the request body
    already read), an SSE relay stops, and closes the upstream stream, as soon
    as the agent disconnects.
    """
    ids = request_ids or []
    exchange = Exchange()
    try:
        response = await client.send(request, stream=True)
    except Exception as exc:
        exchange.error = classify(exc, what)
        exchange.finished = time.monotonic()
        await send_error(
            send,
            protocol,
            exchange.error.status,
            exchange.error.message,
            exchange.error.code,
            request_ids=ids,
        )
        return exchange
    exchange.status = response.status_code
    try:
        headers = [
            (name.encode("latin-1"), scrubber.clean(value.encode("latin-1")))
            for name, value in response.headers.multi_items()
            if name.lower() not in HOP_BY_HOP
            and (keep_headers is None or keep_headers(name.lower()))
        ]
        media = response.headers.get("content-type", "").split(";")[0].strip().lower()
        if media == "text/event-stream":
            pump = _relay_stream(response, send, headers, protocol, what, scrubber, ids, exchange)
            if receive is None:
                await pump
            elif await _until_disconnect(pump, receive):
                exchange.error = UpstreamError(
                    "the agent disconnected", status=499, code="client_disconnected"
                )
        else:
            await _relay_whole(
                response, send, headers, protocol, what, scrubber, ids, exchange, max_body_bytes
            )
    finally:
        await response.aclose()
        exchange.finished = time.monotonic()
    return exchange


async def _relay_whole(
    response: httpx.Response,
    send: Send,
    headers: list[tuple[bytes, bytes]],
    protocol: Protocol,
    what: str,
    scrubber: SecretScrubber,
    ids: list[str | int],
    exchange: Exchange,
    limit: int,
) -> None:
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > limit:
                raise UpstreamError(
                    f"{what} sent a reply over {limit} bytes", code="upstream_reply_too_large"
                )
            chunks.append(chunk)
    except Exception as exc:
        exchange.error = classify(exc, what)
        await send_error(
            send,
            protocol,
            exchange.error.status,
            exchange.error.message,
            exchange.error.code,
            request_ids=ids,
        )
        return
    body = scrubber.feed(b"".join(chunks)) + scrubber.flush()
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _relay_stream(
    response: httpx.Response,
    send: Send,
    headers: list[tuple[bytes, bytes]],
    protocol: Protocol,
    what: str,
    scrubber: SecretScrubber,
    ids: list[str | int],
    exchange: Exchange,
) -> None:
    await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
    tracker = MCPEventStream() if protocol == "mcp" and ids else None
    answered: set[str | int] = set()
    try:
        async for chunk in response.aiter_bytes():
            if tracker is not None:
                for _, messages in tracker.feed(chunk):
                    answered.update(_answered(messages))
            out = scrubber.feed(chunk)
            if out:
                await send({"type": "http.response.body", "body": out, "more_body": True})
    except Exception as exc:
        exchange.error = classify(exc, what)
        tail = scrubber.flush()
        # A half-sent event is terminated first, so the error event parses on its own.
        event = _stream_error_event(
            protocol, exchange.error.message, exchange.error.code, _pending_ids(ids, answered)
        )
        await send(
            {"type": "http.response.body", "body": tail + b"\n\n" + event, "more_body": False}
        )
        return
    await send({"type": "http.response.body", "body": scrubber.flush(), "more_body": False})


async def _until_disconnect(work: Coroutine[Any, Any, None], receive: Receive) -> bool:
    """Run ``work`` until done or the client disconnects (then cancel it); True if it did."""

    async def disconnected() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (task, watcher):
            if not pending.done():
                pending.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pending
    if task.done() and not task.cancelled() and task.exception() is not None:
        raise task.exception()  # type: ignore[misc]
    return task.cancelled()


def _answered(messages: list[JSONRPCMessage] | None) -> Iterable[str | int]:
    for message in messages or ():
        if message.kind in ("response", "error") and message.id is not None:
            yield message.id


def request_ids_of(body: bytes) -> list[str | int]:
    """The JSON-RPC request ids in an MCP POST body (best effort; [] when unparsable)."""
    try:
        decoded: Any = json.loads(body)
    except ValueError:
        return []
    items = decoded if isinstance(decoded, list) else [decoded]
    return [
        item["id"]
        for item in items
        if isinstance(item, dict)
        and "method" in item
        and isinstance(item.get("id"), str | int)
        and not isinstance(item.get("id"), bool)
    ]
