"""``BastionMiddleware``: pure ASGI middleware in front of any ASGI app.

Mount it in front of an LLM proxy, an MCP server or a gateway::

    app.add_middleware(BastionMiddleware, policy=policy, identity=resolver)
    # or Starlette(middleware=[Middleware(BastionMiddleware, policy=policy)])

Non-HTTP scopes (lifespan, websockets) and paths no route guards go straight to
the app (``unknown="deny"`` answers them 404 / closes websockets instead; the
lifespan always passes). For a guarded path the request body is read (bounded
by ``max_body_size``), checked and possibly rewritten by the shared
:class:`~bastion.adapters.pipeline.Guard`, then replayed to the app; the
app's response goes back through a small responder that wraps ``send``: JSON
bodies are buffered and rewritten, SSE streams pass event by event with only
tool-call fragments held. The routed provider (from a model rule's ``route``)
and the identity are left for the app in ``scope["state"]["bastion"]``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from bastion.adapters.pipeline import (
    Exchange,
    Guard,
    Headers,
    Reply,
    ResponseGuard,
    Route,
    operation_name,
)
from bastion.errors import ProtocolError
from bastion.events import RequestInfo

__all__ = ["BastionMiddleware"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class BastionMiddleware:
    """Guard an ASGI app. Options are those of :class:`~bastion.adapters.pipeline.Guard`;
    pass ``guard=`` to share one configured guard between several mounts."""

    def __init__(
        self,
        app: ASGIApp,
        policy: Any = None,
        identity: Any = None,
        routes: Any = None,
        *,
        guard: Guard | None = None,
        **options: Any,
    ) -> None:
        if guard is None:
            if policy is None:
                raise TypeError("BastionMiddleware needs policy= (or guard=)")
            guard = Guard(policy, identity=identity, routes=routes, **options)
        self.app = app
        self.guard = guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan" or self.guard.unknown == "pass":
                await self.app(scope, receive, send)
            elif scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            return
        route = self.guard.route(scope["method"], scope["path"])
        if route is None:
            if self.guard.unknown == "deny":
                await _send_reply(send, self.guard.deny_unrouted(scope["method"], scope["path"]))
                return
            await self.app(scope, receive, send)
            return
        responder = GuardResponder(self.app, self.guard, route)
        if not self.guard.tracing:
            await responder(scope, receive, send)
            return
        # The whole exchange, streamed response included, runs inside the span.
        with self.guard.tracer.request(
            protocol=route.protocol,
            operation=operation_name(route.protocol),
            request=RequestInfo(
                method=scope["method"], path=scope["path"], protocol=route.protocol
            ),
        ):
            await responder(scope, receive, send)


async def _send_reply(send: Send, reply: Reply) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": reply.status,
            "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in reply.headers],
        }
    )
    await send({"type": "http.response.body", "body": reply.body})


def _decode_headers(raw: Any) -> Headers:
    return [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in raw]


class _Disconnected(Exception):
    pass


class GuardResponder:
    """Per-request state for one guarded HTTP exchange (wraps ``receive`` and ``send``)."""

    def __init__(self, app: ASGIApp, guard: Guard, route: Route) -> None:
        self.app = app
        self.guard = guard
        self.route = route
        self.send: Send | None = None
        self.response: ResponseGuard | None = None
        self.finished = False
        self.exchange: Exchange | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.send = send
        headers = _decode_headers(scope.get("headers", []))
        client = scope.get("client")
        try:
            body = await self._read_body(receive, headers)
        except _Disconnected:
            return
        except ProtocolError as exc:
            await _send_reply(
                send, self.guard.reject(self.route, scope["method"], scope["path"], exc)
            )
            return
        outcome = await self.guard.request(
            self.route,
            scope["method"],
            scope["path"],
            headers,
            body,
            f"{client[0]}:{client[1]}" if client else None,
        )
        if isinstance(outcome, Reply):
            await _send_reply(send, outcome)
            return
        state = scope.setdefault("state", {})
        state["bastion"] = {
            "identity": outcome.exchange.identity,
            "provider": outcome.provider,
            "request_id": outcome.exchange.info.id,
        }
        scope = dict(scope)
        scope["headers"] = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in outcome.headers]
        self.exchange = outcome.exchange
        sent_body = False
        forwarded = outcome.body

        async def replay() -> Message:
            nonlocal sent_body
            if not sent_body:
                sent_body = True
                return {"type": "http.request", "body": forwarded, "more_body": False}
            return await receive()

        await self.app(scope, replay, self.send_wrapped)

    async def _read_body(self, receive: Receive, headers: Headers) -> bytes:
        limit = self.guard.max_body_size
        declared = next((v for k, v in headers if k == "content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ProtocolError(
                f"request body larger than {limit} bytes", status=413, code="body_too_large"
            )
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise ProtocolError(
                    f"request body larger than {limit} bytes", status=413, code="body_too_large"
                )
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def send_wrapped(self, message: Message) -> None:
        send = self.send
        assert send is not None
        if self.finished:
            return
        kind = message["type"]
        response = self.response
        if (
            response is not None
            and response.feeds_sync
            and kind == "http.response.body"
            and message.get("more_body", False)
        ):
            # Every chunk but the last of an LLM stream: the hot path, kept short (no
            # coroutine unless a call needs deciding); the last one goes the long way.
            chunk = message.get("body", b"")
            through = response.pass_through
            out = through(chunk) if through is not None else None
            if out is None:
                out = response.feed_sync(chunk)
                if out is None:
                    out = await response.settle()
            if response.done:
                self.finished = True
                await send({"type": "http.response.body", "body": out, "more_body": False})
            elif out is chunk:
                await send(message)  # whole events that went through as they came
            elif out:
                await send({"type": "http.response.body", "body": out, "more_body": True})
            return
        if kind == "http.response.start":
            headers = _decode_headers(message.get("headers", []))
            assert self.exchange is not None
            self.response = await self.exchange.response(message["status"], headers)
            if self.response.mode == "pass":
                await send(message)
            elif self.response.mode == "stream":
                await send(
                    {
                        "type": "http.response.start",
                        "status": self.response.status,
                        "headers": [
                            (k.encode("latin-1"), v.encode("latin-1"))
                            for k, v in self.response.headers
                        ],
                    }
                )
            return
        if kind != "http.response.body":
            await send(message)
            return
        response = self.response
        assert response is not None
        more = message.get("more_body", False)
        chunk = message.get("body", b"")
        if response.mode == "pass":
            await send(message)
        elif response.mode == "buffer":
            response.collect(chunk)
            if not more:
                self.finished = True
                await _send_reply(send, await response.complete())
        else:
            out = await response.feed(chunk)
            if not more or response.done:
                out += await response.close()
                self.finished = True
                await send({"type": "http.response.body", "body": out, "more_body": False})
            elif out:
                await send({"type": "http.response.body", "body": out, "more_body": True})
