"""The aggregated MCP endpoint: several upstream servers behind one, tools named ``server__tool``.

Towards the agent it is an MCP server speaking streamable HTTP, in the
handshake revisions (``initialize``, then ``Mcp-Session-Id``) and in the
stateless 2026-07-28 revision (no session; each POST stands alone). It answers
``initialize``, ``server/discover``, ``ping``, ``tools/list`` (merged from every
upstream, paginated with its own cursor) and ``tools/call`` (routed by the
``server__`` prefix); notifications are acknowledged with 202, a GET stream is
not offered (405), DELETE ends a session. Answers are always
``application/json``.

Towards each upstream it is an MCP client over raw JSON-RPC on the gateway's
pooled httpx client (chosen over the SDK client, whose task groups are built
for one long-lived connection, not for a request-scoped proxy): a handshake
(``2025-06-18``, every server speaks it) per agent session and upstream,
replies read as JSON or SSE. Upstream sessions belong to one agent session,
itself bound to one identity: another caller presenting the session id gets
404. In the stateless revision the upstream sessions are kept per identity.

Which tools an identity sees and may call is not decided here: the guard
middleware in front filters ``tools/list`` and decides ``tools/call`` on the
merged names. A ``tools/call`` is sent upstream exactly once; a ``tools/list``
whose upstream session expired (404) is retried once on a fresh session.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import itertools
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
from cachetools import TTLCache
from starlette.types import Receive, Scope, Send

from bastion.adapters.mcp import (
    HANDSHAKE_REVISIONS,
    STATELESS_REVISION,
    JSONRPCMessage,
    JSONRPCProtocolError,
    MCPCodec,
    MCPPost,
)
from bastion.adapters.wire import (
    JSONRPC_INVALID_PARAMS,
    JSONRPC_METHOD_NOT_FOUND,
    dumps_compact,
    jsonrpc_error,
)
from bastion.errors import AuthError, ProtocolError, UpstreamError
from bastion.events import SERVER_SEPARATOR, Identity, split_tool_name
from bastion.gateway.config import AggregateConfig
from bastion.gateway.upstream import JSONRPC_INTERNAL, classify, read_body

__all__ = ["AggregateMCP", "RemoteError", "UpstreamMCPClient", "UpstreamSession"]

log = logging.getLogger("bastion.gateway")

UPSTREAM_REVISION = "2025-06-18"
_ENVELOPE_PREFIX = "io.modelcontextprotocol/"
_MAX_PAGES = 100


class RemoteError(Exception):
    """An upstream answered a request with a JSON-RPC error (passed on to the agent)."""

    def __init__(self, error: Mapping[str, Any]) -> None:
        super().__init__(str(error.get("message", "error")))
        self.error = dict(error)


@dataclass
class UpstreamSession:
    """One handshake with one upstream server."""

    session_id: str | None
    revision: str


class UpstreamMCPClient:
    """JSON-RPC over streamable HTTP to one upstream MCP server."""

    def __init__(
        self,
        name: str,
        url: str,
        client: httpx.AsyncClient,
        *,
        timeout: httpx.Timeout | None = None,
        max_reply_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        self.name = name
        self.url = url
        self._client = client
        self._timeout = timeout
        self._ids = itertools.count(1)
        self._max = max_reply_bytes

    def _headers(self, extra: Mapping[str, str], session: UpstreamSession | None) -> dict[str, str]:
        headers = {
            **extra,
            "accept": "application/json, text/event-stream",
            "content-type": "application/json",
        }
        if session is not None:
            headers["mcp-protocol-version"] = session.revision
            if session.session_id:
                headers["mcp-session-id"] = session.session_id
        return headers

    async def _post(
        self, payload: dict[str, Any], headers: Mapping[str, str], session: UpstreamSession | None
    ) -> _Reply:
        what = f"MCP server {self.name!r}"
        request = self._client.build_request(
            "POST",
            self.url,
            content=dumps_compact(payload),
            headers=self._headers(headers, session),
            timeout=self._timeout if self._timeout is not None else httpx.USE_CLIENT_DEFAULT,
        )
        try:
            response = await self._client.send(request, stream=True)
            try:
                body = b""
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > self._max:
                        raise UpstreamError(f"{what} sent a reply that is too large")
            finally:
                await response.aclose()
        except UpstreamError:
            raise
        except Exception as exc:
            raise classify(exc, what) from None
        return _Reply(response.status_code, response.headers, body)

    async def initialize(self, headers: Mapping[str, str]) -> UpstreamSession:
        request_id = next(self._ids)
        message = {
            "jsonrpc": "2.0",
            "id": request_id,
            "method": "initialize",
            "params": {
                "protocolVersion": UPSTREAM_REVISION,
                "capabilities": {},
                "clientInfo": {"name": "bastion-gateway", "version": "0.1.0"},
            },
        }
        response = await self._post(message, headers, None)
        result = self._result(response, request_id)
        version = result.get("protocolVersion")
        session = UpstreamSession(
            response.headers.get("mcp-session-id"),
            version
            if isinstance(version, str) and version in HANDSHAKE_REVISIONS
            else UPSTREAM_REVISION,
        )
        note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        ack = await self._post(note, headers, session)
        if ack.status_code >= 400:
            raise UpstreamError(
                f"MCP server {self.name!r} refused the initialized notification ({ack.status_code})"
            )
        return session

    async def request(
        self,
        session: UpstreamSession,
        method: str,
        params: Mapping[str, Any],
        headers: Mapping[str, str],
    ) -> dict[str, Any]:
        """The result of one request; ``RemoteError`` for a JSON-RPC error, ``UpstreamError`` otherwise."""
        request_id = next(self._ids)
        message = {
            "jsonrpc": "2.0",
            "id": request_id,
            "method": method,
            "params": dict(params),
        }
        response = await self._post(message, headers, session)
        return self._result(response, request_id)

    async def close(self, session: UpstreamSession, headers: Mapping[str, str]) -> None:
        if not session.session_id:
            return
        try:
            await self._client.delete(
                self.url, headers=self._headers(headers, session), timeout=5.0
            )
        except httpx.HTTPError:
            log.debug("closing the session with MCP server %s failed", self.name)

    def _result(self, response: _Reply, request_id: int) -> dict[str, Any]:
        what = f"MCP server {self.name!r}"
        if response.status_code == 404:
            raise SessionExpired(f"{what} no longer knows the session")
        if response.status_code in (401, 403):
            raise UpstreamError(
                f"{what} refused the gateway's credentials ({response.status_code})",
                code="upstream_unauthorized",
            )
        try:
            messages = MCPCodec.parse_reply(response.body, response.headers.get("content-type"))
        except ProtocolError:
            raise UpstreamError(
                f"{what} sent an invalid reply (HTTP {response.status_code})",
                code="invalid_upstream_response",
            ) from None
        for reply in messages:
            if reply.id == request_id:
                if reply.error is not None:
                    raise RemoteError(reply.error)
                if reply.result is not None:
                    return reply.result
        raise UpstreamError(f"{what} did not answer the request", code="invalid_upstream_response")


@dataclass(frozen=True, slots=True)
class _Reply:
    status_code: int
    headers: httpx.Headers
    body: bytes


class SessionExpired(UpstreamError):
    """The upstream answered 404 to a session id: it forgot the session."""


@dataclass
class _AgentSession:
    owner: str
    revision: str
    upstream: dict[str, UpstreamSession] = field(default_factory=dict)
    locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    created: float = field(default_factory=time.time)


def _owner(identity: Identity) -> str:
    return json.dumps([identity.tenant, identity.issuer, identity.subject, identity.key_id])


def _encode_cursor(offset: int) -> str:
    return base64.urlsafe_b64encode(json.dumps({"o": offset}).encode()).decode()


def _decode_cursor(cursor: str) -> int:
    try:
        value = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        offset = value["o"]
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise ValueError("invalid cursor") from None
    if not isinstance(offset, int) or offset < 0:
        raise ValueError("invalid cursor")
    return offset


def _strip_envelope(params: Mapping[str, Any]) -> dict[str, Any]:
    # The agent's revision envelope (2026-07-28 _meta keys) does not belong to the
    # upstream handshake session; the rest of _meta (progress tokens...) goes on.
    out = dict(params)
    meta = out.get("_meta")
    if isinstance(meta, dict):
        kept = {k: v for k, v in meta.items() if not k.startswith(_ENVELOPE_PREFIX)}
        if kept:
            out["_meta"] = kept
        else:
            out.pop("_meta")
    return out


Authenticate = Callable[[Scope], Awaitable[Any]]
UpstreamHeaders = Callable[[str, Any], Awaitable[dict[str, str]]]


class AggregateMCP:
    """The ``/mcp`` ASGI endpoint (see the module docstring).

    ``authenticate(scope)`` returns the request's
    :class:`~bastion.identity.Authentication` (raising ``AuthError``);
    ``upstream_headers(server, auth)`` the headers for that upstream (configured
    ones plus an on-behalf-of token).
    """

    def __init__(
        self,
        clients: Mapping[str, UpstreamMCPClient],
        *,
        config: AggregateConfig,
        authenticate: Authenticate,
        upstream_headers: UpstreamHeaders,
        max_body_bytes: int,
        on_error: Callable[[Any, str, UpstreamError | RemoteError | AuthError], None] | None = None,
    ) -> None:
        self.clients = dict(clients)
        self.config = config
        self._authenticate = authenticate
        self._upstream_headers = upstream_headers
        self._max_body = max_body_bytes
        self._on_error = on_error
        self._sessions: TTLCache[str, _AgentSession] = TTLCache(
            maxsize=100_000, ttl=config.session_ttl_seconds
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope["method"]
        try:
            auth = await self._authenticate(scope)
        except AuthError as exc:
            await _json(
                send,
                exc.status,
                jsonrpc_error(None, -32001, exc.message, {"reason": exc.code}),
                exc.headers,
            )
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if method == "POST":
            await self._post(scope, receive, send, auth, headers)
        elif method == "DELETE":
            await self._delete(send, auth, headers)
        elif method == "GET":
            await _json(
                send,
                405,
                {"error": "this endpoint offers no server-initiated stream"},
                {"allow": "POST, DELETE"},
            )
        else:
            await _json(send, 405, {"error": "method not allowed"}, {"allow": "POST, DELETE"})

    # -- sessions

    def _session_for(self, post: MCPPost, auth: Any) -> _AgentSession | str:
        owner = _owner(auth.identity)
        if post.stateless:
            key = "stateless:" + owner
            session = self._sessions.get(key)
            if session is None:
                session = self._sessions[key] = _AgentSession(owner, STATELESS_REVISION)
            return session
        if post.session_id is None:
            return "a session id is required: send initialize first"
        session = self._sessions.get(post.session_id)
        # Another identity presenting a session id sees the same answer as an unknown one.
        if session is None or session.owner != owner:
            return "unknown session"
        return session

    async def _delete(self, send: Send, auth: Any, headers: Mapping[str, str]) -> None:
        session_id = headers.get("mcp-session-id")
        session = self._sessions.get(session_id) if session_id else None
        if session is None or session.owner != _owner(auth.identity):
            await _json(send, 404, {"error": "unknown session"})
            return
        del self._sessions[session_id]  # type: ignore[arg-type]
        for server, upstream in session.upstream.items():
            extra = await self._safe_headers(server, auth)
            if extra is not None:
                await self.clients[server].close(upstream, extra)
        await _json(send, 200, {})

    async def _safe_headers(self, server: str, auth: Any) -> dict[str, str] | None:
        try:
            return await self._upstream_headers(server, auth)
        except (AuthError, UpstreamError):
            return None

    async def _upstream(self, session: _AgentSession, server: str, auth: Any) -> UpstreamSession:
        lock = session.locks.setdefault(server, asyncio.Lock())
        async with lock:
            upstream = session.upstream.get(server)
            if upstream is None:
                extra = await self._upstream_headers(server, auth)
                upstream = await self.clients[server].initialize(extra)
                session.upstream[server] = upstream
            return upstream

    async def _request(
        self,
        session: _AgentSession,
        server: str,
        auth: Any,
        method: str,
        params: Mapping[str, Any],
        *,
        retry_expired: bool,
    ) -> dict[str, Any]:
        for attempt in (1, 2):
            upstream = await self._upstream(session, server, auth)
            extra = await self._upstream_headers(server, auth)
            try:
                return await self.clients[server].request(upstream, method, params, extra)
            except SessionExpired:
                session.upstream.pop(server, None)
                if not retry_expired or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    # -- requests

    async def _post(
        self, scope: Scope, receive: Receive, send: Send, auth: Any, headers: dict[str, str]
    ) -> None:
        try:
            body = await read_body(receive, self._max_body)
            post = MCPCodec.parse_post(body, headers)
        except JSONRPCProtocolError as exc:
            await _json(send, exc.status if exc.request_id is None else 200, exc.body())
            return
        except ProtocolError as exc:
            await _json(send, exc.status, MCPCodec.error_for(exc))
            return
        initialize = next((m for m in post.messages if m.method == "initialize"), None)
        if initialize is not None and not post.stateless:
            await self._initialize(send, post, initialize, auth)
            return
        session = self._session_for(post, auth)
        if isinstance(session, str):
            status = 400 if post.session_id is None else 404
            await _json(
                send, status, jsonrpc_error(None, -32600 if status == 400 else -32001, session)
            )
            return
        replies = []
        for message in post.messages:
            if message.kind != "request":
                continue
            replies.append(await self._answer(message, session, auth, post))
        if not replies:
            await send({"type": "http.response.start", "status": 202, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        extra = {} if post.stateless else {"mcp-session-id": post.session_id or ""}
        await _json(send, 200, replies if post.batch else replies[0], extra)

    async def _initialize(
        self, send: Send, post: MCPPost, message: JSONRPCMessage, auth: Any
    ) -> None:
        requested = message.params.get("protocolVersion")
        revision = requested if requested in HANDSHAKE_REVISIONS else HANDSHAKE_REVISIONS[-1]
        session_id = secrets.token_hex(16)
        self._sessions[session_id] = _AgentSession(_owner(auth.identity), revision)
        result = {
            "protocolVersion": revision,
            "capabilities": {"tools": {"listChanged": False}},
            "serverInfo": {"name": self.config.server_name, "version": "0.1.0"},
            "instructions": "Tools of several MCP servers, named server__tool.",
        }
        reply = {"jsonrpc": "2.0", "id": message.raw.get("id"), "result": result}
        await _json(send, 200, reply, {"mcp-session-id": session_id})

    async def _answer(
        self, message: JSONRPCMessage, session: _AgentSession, auth: Any, post: MCPPost
    ) -> dict[str, Any]:
        request_id = message.raw.get("id")
        method = message.method
        try:
            if method == "ping":
                result: dict[str, Any] = {}
            elif method == "server/discover":
                result = {
                    "supportedVersions": [STATELESS_REVISION],
                    "capabilities": {"tools": {"listChanged": False}},
                    "serverInfo": {"name": self.config.server_name, "version": "0.1.0"},
                }
            elif method == "tools/list":
                result = await self._list_tools(message, session, auth)
            elif method == "tools/call":
                result = await self._call_tool(message, session, auth)
            else:
                return jsonrpc_error(
                    request_id,
                    JSONRPC_METHOD_NOT_FOUND,
                    f"method {method!r} is not offered by the aggregated endpoint",
                )
        except _InvalidParams as exc:
            return jsonrpc_error(request_id, JSONRPC_INVALID_PARAMS, str(exc))
        except RemoteError as exc:
            return {"jsonrpc": "2.0", "id": request_id, "error": exc.error}
        except (UpstreamError, AuthError) as exc:
            code = getattr(exc, "code", "upstream_error")
            return jsonrpc_error(request_id, JSONRPC_INTERNAL, exc.message, {"reason": code})
        if post.stateless:
            result = {"resultType": "complete", **result}
            if method in ("tools/list", "server/discover"):
                # Lists are per identity: never cached for others, never served stale.
                result.update({"ttlMs": 0, "cacheScope": "private"})
        return {"jsonrpc": "2.0", "id": request_id, "result": result}

    async def _list_tools(
        self, message: JSONRPCMessage, session: _AgentSession, auth: Any
    ) -> dict[str, Any]:
        cursor = MCPCodec.list_cursor(message)
        try:
            offset = _decode_cursor(cursor) if cursor is not None else 0
        except ValueError:
            raise _InvalidParams("invalid cursor") from None
        servers = list(self.clients)
        results = await asyncio.gather(
            *(self._server_tools(session, server, auth) for server in servers),
            return_exceptions=True,
        )
        merged: list[dict[str, Any]] = []
        failures = []
        for server, tools in zip(servers, results, strict=True):
            if isinstance(tools, BaseException):
                if not isinstance(tools, UpstreamError | RemoteError | AuthError):
                    raise tools
                failures.append(tools)
                log.warning("tools/list: MCP server %s left out: %s", server, tools)
                if self._on_error is not None:
                    self._on_error(auth, f"{server}{SERVER_SEPARATOR}*", tools)
                continue
            for tool in tools:
                merged.append({**tool, "name": f"{server}{SERVER_SEPARATOR}{tool['name']}"})
        if failures and len(failures) == len(servers):
            first = failures[0]
            if isinstance(first, RemoteError):
                raise first
            raise first
        page = merged[offset : offset + self.config.page_size]
        result: dict[str, Any] = {"tools": page}
        if offset + self.config.page_size < len(merged):
            result["nextCursor"] = _encode_cursor(offset + self.config.page_size)
        return result

    async def _server_tools(
        self, session: _AgentSession, server: str, auth: Any
    ) -> list[dict[str, Any]]:
        tools: list[dict[str, Any]] = []
        cursor: str | None = None
        for _ in range(_MAX_PAGES):
            params = {"cursor": cursor} if cursor else {}
            result = await self._request(
                session, server, auth, "tools/list", params, retry_expired=True
            )
            page = result.get("tools")
            if not isinstance(page, list):
                raise UpstreamError(f"MCP server {server!r} sent a tools/list result without tools")
            tools += [t for t in page if isinstance(t, dict) and isinstance(t.get("name"), str)]
            next_cursor = result.get("nextCursor")
            if not isinstance(next_cursor, str) or not next_cursor:
                return tools
            cursor = next_cursor
        raise UpstreamError(f"MCP server {server!r} sent more than {_MAX_PAGES} tools/list pages")

    async def _call_tool(
        self, message: JSONRPCMessage, session: _AgentSession, auth: Any
    ) -> dict[str, Any]:
        name = message.params.get("name")
        if not isinstance(name, str):
            raise _InvalidParams("tools/call needs a string 'name'")
        server, tool = split_tool_name(name)
        if server is None or server not in self.clients:
            raise _InvalidParams(f"unknown tool {name!r}: names are server{SERVER_SEPARATOR}tool")
        params = _strip_envelope(message.params)
        params["name"] = tool
        try:
            return await self._request(
                session, server, auth, "tools/call", params, retry_expired=False
            )
        except (UpstreamError, RemoteError, AuthError) as exc:
            if self._on_error is not None:
                self._on_error(auth, name, exc)
            raise


class _InvalidParams(Exception):
    pass


async def _json(
    send: Send, status: int, body: Any, headers: Mapping[str, str] | None = None
) -> None:
    data = dumps_compact(body)
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})
