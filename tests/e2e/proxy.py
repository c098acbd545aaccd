"""A minimal HTTP reverse proxy (ASGI) for the multi-instance tests.

It stands in for what sits between Bastion instances in production: a load
balancer choosing an instance per request (``target`` may change between
requests), and the upstream hop from each instance to the shared MCP server.
POST and DELETE are forwarded with their headers; GET (the optional
server-to-client SSE stream) is answered 405, which MCP clients accept.
"""

from __future__ import annotations

from typing import Any

import httpx

_HOP = {"host", "content-length", "transfer-encoding", "connection"}


class Proxy:
    def __init__(self, target: str = "") -> None:
        self.target = target
        self.seen: list[dict[str, str]] = []  # request headers, in order

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            message = await receive()
            while message["type"] != "lifespan.shutdown":
                await send({"type": message["type"] + ".complete"})
                message = await receive()
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return
        if scope["method"] == "GET":
            await send({"type": "http.response.start", "status": 405, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        self.seen.append(headers)
        query = scope.get("query_string", b"").decode()
        url = self.target + scope["path"] + (f"?{query}" if query else "")
        async with httpx.AsyncClient(timeout=10) as client:
            response = await client.request(
                scope["method"],
                url,
                content=body,
                headers={k: v for k, v in headers.items() if k not in _HOP},
            )
        out = [
            (k.encode("latin-1"), v.encode("latin-1"))
            for k, v in response.headers.multi_items()
            if k.lower() not in _HOP and k.lower() != "content-encoding"
        ]
        out.append((b"content-length", str(len(response.content)).encode()))
        await send({"type": "http.response.start", "status": response.status_code, "headers": out})
        await send({"type": "http.response.body", "body": response.content})
