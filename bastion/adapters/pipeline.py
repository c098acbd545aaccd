"""The guard pipeline: one codec + engine pipeline behind every front door.

:class:`Guard` holds the configuration (policy, identity source, routes,
session services, quarantine, audit hook, limits). The ASGI middleware and
the httpx/httpx2 transports are thin: they hand it a request and forward what
it returns, so a rule behaves the same wherever Bastion is mounted::

    guard = Guard(policy, identity=Identity("agent"))
    route = guard.route(method, path)               # None: not guarded, pass through
    outcome = await guard.request(route, method, path, headers, body, client)
    if isinstance(outcome, Reply):                  # Bastion answers (refusal, error)
        ...send outcome.status, outcome.headers, outcome.body
    else:                                           # Forward: send outcome.body upstream
        upstream = ...
        response = await outcome.exchange.response(status, headers)
        response.mode == "pass"                     # forward the upstream body untouched
        response.mode == "buffer"                   # response.collect(chunk)...; await response.complete() -> Reply
        response.mode == "stream"                   # await response.feed(chunk) -> bytes; await response.close()

Nothing here raises to the front door: a protocol error, an authentication
failure, a policy refusal or an unexpected exception becomes a well-formed
error of the protocol in question (OpenAI or Anthropic error JSON, a JSON-RPC
error, or an error event that ends a stream), audited through ``on_decision``
as a denial whose ``detail`` names the error. In stream mode ``response.done``
turns true once the stream was ended that way; forward nothing after it.

Requests (LLM routes): authenticate once, model rules (``Forward.provider``
is the routed provider), classify every tool output in the conversation
(redact, block, quarantine in place; taint and trusted/untrusted texts for
provenance; field-level paths), filter ``tools`` by visibility, forward.
Responses: every tool call decided once complete (limits, approvals for
``ask``); refused calls replaced by a refusal text, or the whole response by
an HTTP error with ``refusal="error"``.

MCP routes: ``tools/call`` decided before it reaches the server (refusal as an
``isError`` result, or a JSON-RPC error with ``mcp_refusal="error"``),
``tools/list`` results filtered (and pinned: drift shows in the audit and as
``context.pin_changed`` / ``context.pins_drifted``, for the listing and for
later calls of the tools it carried), ``tools/call`` results
classified and tainting the MCP session (``bastion.session.SessionKey``:
``Mcp-Session-Id`` in handshake revisions, the ``conversation_header`` or the
identity in 2026-07-28). Calls are decided with the session's taint. On a
route naming its server (``Route("mcp", server="github")``) the policy sees
the same names as on an aggregated endpoint, ``github__list_issues`` with
``tool.server == "github"`` (for decisions, taint sources, approvals, limits
and the audit), while the agent keeps the server's own names on the wire.

One guard, both sides: a guard that serves LLM and MCP routes (the gateway's
does) carries facts from one to the other.

- *Tool annotations.* Tools lists that pass through it fill a bounded
  :class:`ToolCatalog` (qualified name -> advertised spec, TTL and size
  bound). An LLM request's ``tools`` are plain function definitions, so each
  is enriched by name from the catalog: ``tool.readOnlyHint`` and the other
  MCP annotations then hold on the model side too, for the offered tools, the
  calls in the response and the tool outputs in the conversation. Annotations
  are the MCP server's hints about its own tools and are trusted exactly as
  much as that server; a schema declaration overrides them.
- *The user's own words.* The user and system texts of LLM requests are kept
  (bounded, newest kept, 24 h) in the session store under the conversation key
  (the ``conversation_header``, else the identity; always within the identity),
  and MCP ``tools/call`` requests of the same identity and conversation are
  decided with them as ``context.user_texts``: a value the user typed is not
  ``from untrusted`` merely because a tool also returned it. The store is
  written by read-modify-write; concurrent writers may drop each other's
  newest texts, which only makes ``from untrusted`` hold more often.
- *Token budgets.* ``limit model ... tokens`` rules are checked before the
  request and charged after the response with the tokens its ``usage``
  reports (chat ``usage`` and the stream's usage chunk when the client asked
  for one with ``stream_options.include_usage``; Responses ``usage`` and
  ``response.completed``; Anthropic ``usage`` of ``message_start`` and
  ``message_delta``). A response that reports no usage is not charged.

MCP GET streams carry server requests and notifications, which pass, and may
carry responses (a stream resumed with ``Last-Event-ID`` replays them). A
response there cannot be tied to the checked POST that asked for it, so it is
replaced by a JSON-RPC error for its id (audited); the client may ask again.

Audit: every decision that changes traffic or trust reaches ``on_decision``:
each tool call (allowed or not), the model decision, each hidden tool, each
tool output that was rewritten (redacted, blocked, quarantined), classified
untrusted or untraced, the context's initial distrust, and every error. Tools
shown as offered and tool output trusted as it stands change nothing and are
not audited one by one (an agent resends its whole conversation and tools list
every turn; auditing them would repeat the same non-events each request), unless
``audit_all=True`` asks for one record per decision.
Denials (forbid, ask, hide, block) are decided again with ``explain=True``
before they are audited, so their records carry the decision trace; allowed
decisions are never explained on the request path.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import inspect
import itertools
import json
import logging
import re
import secrets
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from bastion.adapters.anthropic import AnthropicCodec
from bastion.adapters.mcp import (
    JSONRPCMessage,
    JSONRPCProtocolError,
    MCPCodec,
    MCPEventStream,
    MCPPost,
)
from bastion.adapters.openai import OpenAIChatCodec, OpenAIResponsesCodec
from bastion.adapters.sse import SSEEvent, SSEParser, encode_event
from bastion.adapters.wire import (
    BodyDecoder,
    CallView,
    StreamRewriter,
    StreamStep,
    Verdict,
    anthropic_error,
    can_decode,
    dumps_compact,
    jsonrpc_error,
    loads_strict,
    openai_error,
    protocol_error_body,
    refusal_text,
)
from bastion.audit.tracing import NoopTracer
from bastion.errors import AuthError, ProtocolError, QuarantineError, StoreError
from bastion.events import (
    EMPTY_CONTEXT,
    AuditEvent,
    Context,
    Decision,
    Effect,
    EventKind,
    Identity,
    ModelRequest,
    RequestInfo,
    ToolCall,
    ToolResult,
    ToolSpec,
)
from bastion.redaction import Redactor, block_placeholder
from bastion.session import SessionKey, SessionServices

__all__ = [
    "DEFAULT_ROUTES",
    "Exchange",
    "Forward",
    "Guard",
    "IdentitySource",
    "Reply",
    "ResponseGuard",
    "Route",
    "ToolCatalog",
]

log = logging.getLogger("bastion.adapters")

Protocol_ = Literal["openai", "openai-responses", "anthropic", "mcp"]
Headers = list[tuple[str, str]]

DEFAULT_ROUTES: tuple[tuple[str, str], ...] = (
    ("*/chat/completions", "openai"),
    ("*/responses", "openai-responses"),
    ("*/messages", "anthropic"),
    ("/mcp", "mcp"),
    ("/mcp/*", "mcp"),
)
"""Path globs and the protocol each guards; the first match wins."""

_CODECS: dict[str, Any] = {
    "openai": OpenAIChatCodec,
    "openai-responses": OpenAIResponsesCodec,
    "anthropic": AnthropicCodec,
}
_CREDENTIAL_HEADERS = frozenset({"authorization", "x-api-key", "cookie", "proxy-authorization"})
_HOP_HEADERS = frozenset({"content-length", "content-encoding", "transfer-encoding"})
_POLICY_DENIED = "policy_denied"
# Effects that stop or hold something: their audit records carry the decision trace.
_DENIALS = frozenset({Effect.FORBID, Effect.ASK, Effect.HIDE, Effect.BLOCK})


class PolicyEngine(Protocol):
    """What the pipeline needs from :class:`bastion.policy.Policy`."""

    def decide_call(
        self,
        identity: Identity,
        tool: str | ToolSpec,
        args: Mapping[str, Any],
        context: Context = ...,
        *,
        request: RequestInfo | None = None,
        explain: bool = False,
    ) -> Decision: ...

    def decide_visibility(
        self,
        identity: Identity,
        tool: str | ToolSpec,
        context: Context = ...,
        *,
        request: RequestInfo | None = None,
        explain: bool = False,
    ) -> Decision: ...

    def result_effects(self, tool: str | ToolSpec) -> frozenset[Effect]: ...

    # Optional: ``fixed_result(tool)`` (the classification no rule can change, or
    # None) and ``reads_provenance``, read with getattr, only make the pipeline faster.

    def classify_result(
        self,
        identity: Identity,
        tool: str | ToolSpec,
        args: Mapping[str, Any],
        result: Any,
        context: Context = ...,
        *,
        request: RequestInfo | None = None,
        explain: bool = False,
    ) -> Decision: ...

    def decide_model(
        self,
        identity: Identity,
        model: str | ModelRequest,
        context: Context = ...,
        *,
        request: RequestInfo | None = None,
        explain: bool = False,
    ) -> Decision: ...

    def decide_context(
        self, identity: Identity, *, request: RequestInfo | None = None, explain: bool = False
    ) -> Decision: ...

    def limits(
        self,
        kind: Literal["call", "model"],
        identity: Identity,
        name: str,
        args: Mapping[str, Any] = ...,
        context: Context = ...,
        *,
        request: RequestInfo | None = None,
    ) -> Sequence[Any]: ...


IdentitySource = (
    Identity | Callable[[Mapping[str, str]], Identity | Awaitable[Identity]] | Any | None
)
"""A fixed :class:`Identity`, an ``IdentityResolver`` (anything with ``authenticate``),
a callable taking the lower-case request headers, or None (anonymous)."""


@dataclass(frozen=True, slots=True)
class Route:
    """Which protocol guards a path; ``server`` names an MCP upstream (``tool.server``)."""

    protocol: str
    server: str | None = None


@dataclass(frozen=True, slots=True)
class Reply:
    """An answer Bastion gives itself: a refusal, an error, or a rewritten response."""

    status: int
    headers: Headers
    body: bytes


@dataclass(slots=True)
class Forward:
    """Forward this request upstream: ``body`` with ``headers`` (content-length set)."""

    body: bytes
    headers: Headers
    exchange: Exchange
    provider: str | None = None


def _json_reply(status: int, body: bytes, extra: Iterable[tuple[str, str]] = ()) -> Reply:
    headers = [("content-type", "application/json"), ("content-length", str(len(body)))]
    headers.extend(extra)
    return Reply(status, headers, body)


def _header(headers: Headers, name: str) -> str | None:
    for key, value in headers:
        if key == name:
            return value
    return None


def _without(headers: Headers, names: frozenset[str]) -> Headers:
    return [(k, v) for k, v in headers if k not in names]


def _with_attributes(context: Context, **attributes: Any) -> Context:
    return Context(
        tainted=context.tainted,
        taint_sources=context.taint_sources,
        session=context.session,
        turn=context.turn,
        user_texts=context.user_texts,
        trusted_texts=context.trusted_texts,
        untrusted_texts=context.untrusted_texts,
        attributes={**context.attributes, **attributes},
    )


def _store_unavailable() -> ProtocolError:
    # The store's own message may name hosts and ports: the log has it, the client does not.
    return ProtocolError(
        "Bastion's session store is unavailable, so the request could not be checked",
        status=503,
        code="store_unavailable",
    )


def _denial(kind: EventKind, code: str, reason: str) -> Decision:
    effect = Effect.BLOCK if kind is EventKind.RESULT else Effect.FORBID
    return Decision(kind, effect, rule_ids=(f"bastion:{code}",), reasons=(reason,))


# ---------------------------------------------------------------- content helpers


def _plain_text(content: Any) -> str:
    """The text of a tool output for provenance and taint (strings, text blocks, JSON)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for block in content:
            if isinstance(block, dict):
                if isinstance(block.get("text"), str):
                    parts.append(block["text"])
                elif isinstance(block.get("resource"), dict) and isinstance(
                    block["resource"].get("text"), str
                ):
                    parts.append(block["resource"]["text"])
                elif "content" in block:
                    parts.append(_plain_text(block["content"]))
            elif isinstance(block, str):
                parts.append(block)
        return "\n".join(parts)
    if isinstance(content, dict):
        if isinstance(content.get("content"), list):
            text = _plain_text(content["content"])
            if "structuredContent" in content:
                text += "\n" + json.dumps(content["structuredContent"], ensure_ascii=False)
            return text
        return json.dumps(content, ensure_ascii=False)
    if content is None:
        return ""
    return json.dumps(content, ensure_ascii=False)


_PATH_PART = re.compile(r"\[(\d+|\*)\]|\.?([^.\[\]]+)")


@functools.lru_cache(maxsize=512)
def _parse_path(path: str) -> tuple[str | int, ...]:
    text = path[2:] if path.startswith("$.") else path.lstrip("$")
    parts: list[str | int] = []
    for match in _PATH_PART.finditer(text):
        index, key = match.groups()
        if index is not None:
            parts.append("*" if index == "*" else int(index))
        else:
            parts.append(key)
    return tuple(parts)


def _select(doc: Any, parts: tuple[str | int, ...]) -> list[tuple[Any, str | int]]:
    """(container, key) pairs the path points at (``*`` matches every key or index)."""
    current: list[Any] = [doc]
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        found: list[tuple[Any, str | int]] = []
        for node in current:
            if part == "*":
                if isinstance(node, dict):
                    found.extend((node, k) for k in node)
                elif isinstance(node, list):
                    found.extend((node, k) for k in range(len(node)))
            elif (isinstance(node, dict) and isinstance(part, str) and part in node) or (
                isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)
            ):
                found.append((node, part))
        if last:
            return found
        current = [c[k] for c, k in found]
    return []


def operation_name(protocol: str) -> str:
    """The GenAI ``gen_ai.operation.name`` of a guarded request on a route of ``protocol``."""
    return "mcp" if protocol == "mcp" else "chat"


# ---------------------------------------------------------------- the tool catalog


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    """One advertised tool: its spec (qualified name, server, annotations) and who listed it."""

    spec: ToolSpec
    advertised_by: str
    expires: float
    # The listing that carried it differed from the server's pinned definitions.
    pins_drifted: bool = False
    # This tool itself was added or changed since the pin.
    pin_changed: bool = False


class ToolCatalog:
    """Tool definitions MCP ``tools/list`` replies carried through one :class:`Guard`.

    Keyed by qualified tool name (``server__tool``, as the policy sees it), each
    entry keeps the spec with its MCP annotations and the route that advertised
    it (``/mcp/github``, ``/mcp``). Entries live ``ttl`` seconds after the latest
    listing that carried them; past ``max_size`` the oldest listed go first.

    The model side looks tools up here by name: an LLM request's ``tools`` are
    plain function definitions, so ``tool.readOnlyHint`` and the other
    annotations come from what the MCP server said about the tool of the same
    name. Annotations are hints from that server, trusted only as much as it:
    a server that calls a write tool read-only is believed. Declare them in a
    schema (``bastion check --schema``) for servers you do not control; the
    schema's declaration wins over the server's.
    """

    def __init__(self, *, max_size: int = 10_000, ttl: float = 3600.0) -> None:
        self.max_size = max_size
        self.ttl = ttl
        self._entries: dict[str, CatalogEntry] = {}
        self._enriched: dict[str, tuple[ToolSpec, ToolSpec, ToolSpec]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def remember(
        self,
        specs: Iterable[ToolSpec],
        advertised_by: str,
        *,
        pins_drifted: bool = False,
        pin_changed: Collection[str] = (),
    ) -> None:
        """Record (or refresh) the listed tools, by their qualified names, with their pin state."""
        expires = time.monotonic() + self.ttl
        with self._lock:
            entries = self._entries
            for spec in specs:
                entries.pop(spec.name, None)  # re-inserted last: the newest listing
                entries[spec.name] = CatalogEntry(
                    spec, advertised_by, expires, pins_drifted, spec.name in pin_changed
                )
            while len(entries) > self.max_size:
                del entries[next(iter(entries))]
            if len(self._enriched) > self.max_size:
                self._enriched.clear()

    def entry(self, name: str) -> CatalogEntry | None:
        """The live entry for a qualified tool name, or None."""
        entry = self._entries.get(name)
        if entry is None:
            return None
        if entry.expires < time.monotonic():
            with self._lock:
                if self._entries.get(name) is entry:
                    del self._entries[name]
            return None
        return entry

    def get(self, name: str) -> ToolSpec | None:
        """The advertised spec for a qualified tool name, or None."""
        entry = self.entry(name)
        return entry.spec if entry is not None else None

    def enrich(self, spec: ToolSpec) -> ToolSpec:
        """``spec`` (a model-side function definition) with the advertised annotations and server.

        The model side's own description and schema stay; a spec that already
        carries annotations, or a name no MCP server listed, is returned as is.
        """
        if spec.annotations:
            return spec
        known = self.get(spec.name)
        if known is None or (not known.annotations and known.server == spec.server):
            return spec
        memo = self._enriched.get(spec.name)
        if memo is not None and memo[0] is spec and memo[1] is known:
            return memo[2]
        enriched = ToolSpec(
            name=spec.name,
            description=spec.description or known.description,
            input_schema=spec.input_schema or known.input_schema,
            annotations=known.annotations,
            server=known.server,
        )
        self._enriched[spec.name] = (spec, known, enriched)
        return enriched


def qualified_name(server: str | None, name: str) -> str:
    """The name the policy sees for tool ``name`` of MCP server ``server`` (``server__name``)."""
    return f"{server}__{name}" if server else name


# ---------------------------------------------------------------- routing


def _compile_routes(routes: Mapping[str, str | Route] | Sequence[tuple[str, str | Route]] | None):  # type: ignore[no-untyped-def]
    items = list(routes.items()) if isinstance(routes, Mapping) else list(routes or DEFAULT_ROUTES)
    compiled: list[tuple[re.Pattern[str], Route]] = []
    for pattern, target in items:
        route = target if isinstance(target, Route) else Route(target)
        if route.protocol not in (*_CODECS, "mcp"):
            raise ValueError(f"unknown protocol {route.protocol!r} for route {pattern!r}")
        compiled.append((re.compile(fnmatch.translate(pattern)), route))
    return compiled


# ---------------------------------------------------------------- the guard


OnDecision = Callable[[AuditEvent], None]


class Guard:
    """The configured pipeline shared by :class:`BastionMiddleware` and the transports.

    ``policy``: a :class:`bastion.policy.Policy`. ``identity``: see
    :data:`IdentitySource`. ``routes``: ``{path glob: protocol or Route}``
    (protocols ``openai``, ``openai-responses``, ``anthropic``, ``mcp``;
    default :data:`DEFAULT_ROUTES`). ``session``: :class:`SessionServices`
    (default: in-memory). ``quarantine``: a ``bastion.quarantine.Quarantine``
    (without one, quarantined output is blocked). ``on_decision``: the audit
    hook, called for every decision. ``refusal``: ``"text"`` (refused calls
    replaced by an assistant text) or ``"error"`` (HTTP 403).
    ``mcp_refusal``: ``"result"`` (an ``isError`` tool result) or ``"error"``
    (JSON-RPC error). ``unknown``: ``"pass"`` or ``"deny"`` for paths no route
    guards and non-HTTP scopes other than lifespan. ``max_body_size`` bounds
    request bodies (413) and ``max_response_size`` buffered response bodies;
    ``max_pending`` the bytes a stream may hold while calls are undecided.
    ``catalog``: the :class:`ToolCatalog` of advertised tools (default: a new
    one per guard). ``max_user_text_bytes`` bounds the user texts kept per
    conversation for MCP requests.
    """

    def __init__(
        self,
        policy: PolicyEngine,
        *,
        identity: IdentitySource = None,
        routes: Mapping[str, str | Route] | Sequence[tuple[str, str | Route]] | None = None,
        session: SessionServices | None = None,
        quarantine: Any = None,
        on_decision: OnDecision | None = None,
        refusal: Literal["text", "error"] = "text",
        mcp_refusal: Literal["result", "error"] = "result",
        unknown: Literal["pass", "deny"] = "pass",
        conversation_header: str = "x-bastion-conversation",
        max_body_size: int = 10 * 1024 * 1024,
        max_response_size: int = 32 * 1024 * 1024,
        max_pending: int = 4 * 1024 * 1024,
        catalog: ToolCatalog | None = None,
        max_user_text_bytes: int = 64 * 1024,
        tracer: Any = None,
        audit_all: bool = False,
    ) -> None:
        self.policy = policy
        # Also audit the non-events (tools shown as offered, output trusted as it
        # stands): one record per decision, at the cost of many per request.
        self.audit_all = audit_all
        # OpenTelemetry spans (bastion.audit.tracing); the no-op tracer costs nothing.
        self.tracer = tracer if tracer is not None else NoopTracer()
        self.tracing = not isinstance(self.tracer, NoopTracer)
        self.identity_source = identity
        self._fixed = identity if isinstance(identity, Identity) else None
        self._routes = _compile_routes(routes)
        self._route_cache: dict[str, Route | None] = {}
        self.session = session or SessionServices.open()
        self.quarantine = quarantine
        self.on_decision = on_decision
        self.refusal = refusal
        self.mcp_refusal = mcp_refusal
        self.unknown = unknown
        self.conversation_header = conversation_header.lower()
        self.max_body_size = max_body_size
        self.max_response_size = max_response_size
        self.max_pending = max_pending
        # Tool definitions from MCP tools/list replies, so calls (MCP and model
        # side) see their annotations.
        self.catalog = catalog if catalog is not None else ToolCatalog()
        self.max_user_text_bytes = max_user_text_bytes
        # (conversation key id, hash of the texts) lately stored: an agent resends
        # its whole conversation every turn, and storing the same texts again is waste.
        self._stored_user_texts: dict[tuple[str | None, str, str | None, int], float] = {}

    @property
    def loop_bound(self) -> bool:
        """Whether a part of this guard belongs to one event loop (then run it on that loop only).

        The in-memory session store, a fixed or synchronous identity and no
        quarantine tie nothing to a loop; a Redis store, an identity resolver
        (JWKS fetches) or a quarantine model client (HTTP pools) do, and so does
        anything that does not say otherwise (``loop_bound = False``).
        """
        if getattr(self.session.store, "loop_bound", True):
            return True
        if self.quarantine is not None and getattr(self.quarantine, "loop_bound", True):
            return True
        source = self.identity_source
        if source is None or isinstance(source, Identity):
            return False
        if hasattr(source, "authenticate") or inspect.iscoroutinefunction(source):
            return bool(getattr(source, "loop_bound", True))
        return False

    # -- routing

    def route(self, method: str, path: str) -> Route | None:
        """The route guarding ``path`` (None: not guarded). LLM routes guard POST only."""
        route = self._route_cache.get(path, _MISS)
        if route is _MISS:
            route = next((r for rx, r in self._routes if rx.match(path)), None)
            if len(self._route_cache) > 4096:
                self._route_cache.clear()
            self._route_cache[path] = route
        if route is not None and route.protocol != "mcp" and method != "POST":
            return None
        found: Route | None = route
        return found

    # -- audit

    def audit(self, event: AuditEvent) -> None:
        if self.tracing and event.decision.kind is not EventKind.CALL:
            # Call decisions have a span around them (Exchange.decide_call); the
            # others are recorded here, where the ones that matter are audited.
            with self.tracer.decision(event.decision.kind, event.target) as span:
                span.set_decision(event.decision)
        if self.on_decision is not None:
            self.on_decision(event)

    def _audit_quietly(self, event: AuditEvent) -> None:
        try:
            self.audit(event)
        except Exception:
            log.exception("audit hook failed while recording a denial")

    def deny_unrouted(self, method: str, path: str, protocol: str = "http") -> Reply:
        """The 404 for a path no route guards when ``unknown="deny"`` (audited)."""
        self._audit_quietly(
            AuditEvent(
                _denial(EventKind.CALL, "unrouted", "no route guards this path"),
                Identity.anonymous_identity(),
                path,
                protocol,
                RequestInfo(method=method, path=path),
                detail={"error": "unrouted"},
            )
        )
        return _json_reply(404, dumps_compact(openai_error("not found", type="not_found_error")))

    def reject(self, route: Route, method: str, path: str, exc: ProtocolError) -> Reply:
        """Answer (and audit) traffic refused before the pipeline could read it."""
        info = RequestInfo(method=method, path=path, protocol=route.protocol)
        return Exchange(self, route, info, _ANONYMOUS).error_reply(exc)

    # -- identity

    async def _authenticate(self, headers: Headers) -> Identity:
        if not self.tracing:
            return await self._identify(headers)
        with self.tracer.identity() as span:
            try:
                identity = await self._identify(headers)
            except Exception as exc:
                span.set_error(exc)
                raise
            span.set_identity(identity)
            return identity

    async def _identify(self, headers: Headers) -> Identity:
        if self._fixed is not None:
            return self._fixed
        source: Any = self.identity_source
        if source is None:
            return _ANONYMOUS
        if hasattr(source, "authenticate"):
            from bastion.identity import credential_headers

            raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
            auth = await source.authenticate(credential_headers(raw))
            identity: Identity = auth.identity
            return identity
        value = source(dict(headers))
        if inspect.isawaitable(value):
            value = await value
        if not isinstance(value, Identity):
            raise AuthError("identity callable did not return an Identity", status=500)
        return value

    # -- requests

    async def request(
        self,
        route: Route,
        method: str,
        path: str,
        headers: Headers,
        body: bytes,
        client: str | None = None,
    ) -> Reply | Forward:
        """Guard one request (``headers`` lower-case names). Never raises."""
        info = RequestInfo(
            method=method,
            path=path,
            client=client,
            headers={k: v for k, v in headers if k not in _CREDENTIAL_HEADERS},
            protocol=route.protocol,
            id=_request_id(),
        )
        exchange = Exchange(self, route, info, _ANONYMOUS)
        try:
            exchange.identity = await self._authenticate(headers)
            if route.protocol == "mcp" and method != "POST":
                return Forward(body, headers, exchange)
            body = self._request_body(headers, body)
            headers = _without(headers, _HOP_HEADERS)
            headers.append(("content-length", str(len(body))))
            if route.protocol == "mcp":
                return await exchange.mcp_request(headers, body)
            return await exchange.llm_request(headers, body)
        except Exception as exc:
            return exchange.error_reply(exc)

    def _request_body(self, headers: Headers, body: bytes) -> bytes:
        if len(body) > self.max_body_size:
            raise ProtocolError(
                f"request body larger than {self.max_body_size} bytes",
                status=413,
                code="body_too_large",
            )
        encoding = _header(headers, "content-encoding")
        if encoding and encoding.strip().lower() != "identity":
            return _decode_whole(body, encoding, self.max_body_size, status=415)
        return body

    def spec_for(self, name: str, server: str | None = None) -> ToolSpec:
        """The spec of a tool by its qualified name: as advertised, else from the name alone."""
        spec = self.catalog.get(name)
        if spec is None:
            spec = ToolSpec.named(name, server=server) if server else ToolSpec.named(name)
        return spec


_MISS: Any = object()
_USER_TEXT_TTL = 24 * 3600.0
# A conversation's texts seen lately are not stored again within this time.
_USER_TEXT_RESTORE_SECONDS = 600.0


def _user_text_key(identity: Identity, conversation: str | None) -> str:
    """Store key of a conversation's user texts: the conversation key, always within the identity."""
    key = (
        SessionKey(identity.subject, identity.tenant, "conversation", conversation)
        if conversation
        else SessionKey.for_identity(identity)
    )
    return f"user-texts:{key.id}"


def _decode_texts(raw: bytes | None) -> list[str]:
    if raw is None:
        return []
    try:
        texts = json.loads(raw)
    except ValueError as exc:
        raise StoreError("session store holds user texts that are not JSON") from exc
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise StoreError("session store holds user texts that are not a list of strings")
    return texts


def _newest_within(texts: list[str], limit: int) -> list[str]:
    """The newest texts whose UTF-8 size fits ``limit`` (a single longer text keeps its head)."""
    kept: list[str] = []
    size = 0
    for text in reversed(texts):
        length = len(text.encode("utf-8"))
        if size + length > limit:
            if not kept:
                kept.append(text.encode("utf-8")[:limit].decode("utf-8", errors="ignore"))
            break
        kept.append(text)
        size += length
    kept.reverse()
    return kept


# Request ids: 64 random bits per process and a counter, as 32 hex digits like a
# uuid4's (a uuid4 per request costs a system call for randomness).
_ID_PREFIX = secrets.token_hex(8)
_ID_COUNTER = itertools.count(secrets.randbits(32))


def _request_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER) & 0xFFFFFFFFFFFFFFFF:016x}"


_ANONYMOUS = Identity.anonymous_identity()


def _decode_whole(body: bytes, encoding: str, limit: int, *, status: int) -> bytes:
    if not can_decode(encoding):
        raise ProtocolError(
            f"unsupported content encoding {encoding!r}", status=status, code="unsupported_encoding"
        )
    decoder = BodyDecoder(encoding, max_size=limit)
    out = decoder.feed(body)
    decoder.close()
    return out


# ---------------------------------------------------------------- per-request state


@dataclass(slots=True)
class _CallOutcome:
    allowed: bool
    text: str = ""
    decision: Decision | None = None


@dataclass(slots=True)
class Exchange:
    """One guarded request and its response: identity, context, codec state."""

    guard: Guard
    route: Route
    info: RequestInfo
    identity: Identity
    # Shared until the request sets its own (contexts are immutable).
    context: Context = EMPTY_CONTEXT
    specs: dict[str, ToolSpec] = field(default_factory=dict)
    parsed: Any = None
    session_key: SessionKey | None = None
    # MCP: request id -> ("list", cursor) or ("call", ToolCall)
    pending: dict[str | int, tuple[str, Any]] = field(default_factory=dict)
    local_answers: list[dict[str, Any]] = field(default_factory=list)
    model: str | None = None
    # Token budgets (LimitHits) that apply to this model request.
    token_limits: list[Any] = field(default_factory=list)

    @property
    def protocol(self) -> str:
        return self.route.protocol

    # -- errors and audit

    def event(
        self,
        decision: Decision,
        target: str,
        *,
        arguments: Mapping[str, Any] | None = None,
        detail: Mapping[str, Any] | None = None,
    ) -> AuditEvent:
        return AuditEvent(
            decision,
            self.identity,
            target,
            self.protocol,
            self.info,
            session=self.context.session,
            arguments=arguments,
            taint_sources=self.context.taint_sources,
            detail=detail or {},
        )

    def error_reply(self, exc: BaseException, *, request_id: str | int | None = None) -> Reply:
        """Audit ``exc`` as a denial and answer it in the route's protocol."""
        if isinstance(exc, AuthError):
            proto_exc = ProtocolError(exc.message, status=exc.status, code=exc.code)
            extra = list(exc.headers.items())
        elif isinstance(exc, ProtocolError):
            proto_exc, extra = exc, []
        elif isinstance(exc, StoreError):
            log.error("session store failure; denying: %s", exc)
            proto_exc, extra = _store_unavailable(), []
        else:
            log.exception("unexpected error in the guard pipeline; denying", exc_info=exc)
            proto_exc = ProtocolError(
                "Bastion could not check this request", status=500, code="internal_error"
            )
            extra = []
        self.guard._audit_quietly(
            self.event(
                _denial(EventKind.CALL, proto_exc.code, proto_exc.message),
                self.info.path,
                detail={"error": proto_exc.code, "message": proto_exc.message},
            )
        )
        if self.protocol == "mcp":
            if isinstance(proto_exc, JSONRPCProtocolError):
                rid = request_id if request_id is not None else proto_exc.request_id
                status = 200 if rid is not None else proto_exc.status
                return _json_reply(status, dumps_compact(MCPCodec.error_for(proto_exc, rid)), extra)
            status = 200 if request_id is not None else proto_exc.status
            return _json_reply(
                status, dumps_compact(MCPCodec.error_for(proto_exc, request_id)), extra
            )
        kind: Literal["openai", "anthropic"] = (
            "anthropic" if self.protocol == "anthropic" else "openai"
        )
        status, body = protocol_error_body(kind, proto_exc)
        return _json_reply(status, body, extra)

    def policy_reply(self, message: str) -> Reply:
        """403 in the route's protocol for a policy refusal (already audited)."""
        if self.protocol == "anthropic":
            body = dumps_compact(anthropic_error(message, type="permission_error"))
        else:
            body = dumps_compact(
                openai_error(message, type="permission_error", code=_POLICY_DENIED)
            )
        return _json_reply(403, body)

    # -- deciding calls

    def traced(self, decision: Decision, explain: Callable[[], Decision]) -> Decision:
        """``decision`` with the engine's trace when it is a denial that will be audited.

        ``explain`` decides again with ``explain=True``; only denials pay for it,
        so the common path never explains. The decision itself is kept: only its
        trace comes from the explained run.
        """
        if (
            decision.effect not in _DENIALS
            or decision.trace is not None
            or self.guard.on_decision is None
        ):
            return decision
        try:
            trace = explain().trace
        except Exception:
            log.exception("could not explain a denial for the audit trail")
            return decision
        return dataclasses.replace(decision, trace=trace) if trace is not None else decision

    async def decide_call(
        self, call: ToolCall, spec: ToolSpec, error: str | None, *, label: str | None = None
    ) -> _CallOutcome:
        """Decide one complete call; ``label`` is the tool's name in the refusal text."""
        if not self.guard.tracing:
            return await self._decide_call(call, spec, error, label=label)
        with self.guard.tracer.decision(EventKind.CALL, call.name, call_id=call.id) as span:
            outcome = await self._decide_call(call, spec, error, label=label)
            if outcome.decision is not None:
                span.set_decision(outcome.decision)
            return outcome

    async def _decide_call(
        self, call: ToolCall, spec: ToolSpec, error: str | None, *, label: str | None = None
    ) -> _CallOutcome:
        guard, identity = self.guard, self.identity
        shown = label or call.name
        if error is not None:
            decision = _denial(EventKind.CALL, "invalid_arguments", error)
            guard.audit(self.event(decision, call.name, detail={"error": "invalid_arguments"}))
            return _CallOutcome(False, refusal_text(shown, error), decision)
        decide = guard.policy.decide_call
        decision = decide(identity, spec, call.arguments, self.context, request=self.info)
        if decision.effect is not Effect.ALLOW:
            decision = self.traced(
                decision,
                lambda: decide(
                    identity, spec, call.arguments, self.context, request=self.info, explain=True
                ),
            )
        detail: dict[str, Any] = {}
        effect = decision.effect
        if effect is Effect.ASK:
            approvals = guard.session.approvals
            if await approvals.consume(identity, call.name, call.arguments):
                detail["approval"] = "consumed"
                effect = Effect.ALLOW
            else:
                approval = await approvals.create(
                    identity,
                    call.name,
                    call.arguments,
                    reason=decision.reason,
                    session=self.context.session,
                )
                detail["approval_id"] = approval.id
                guard.audit(
                    self.event(decision, call.name, arguments=call.arguments, detail=detail)
                )
                return _CallOutcome(
                    False,
                    refusal_text(shown, decision.reason, approval_id=approval.id),
                    decision,
                )
        if effect is Effect.ALLOW:
            hits = self._limits("call", call.name, call.arguments)
            hit = await self._over_limit("call", hits) if hits else None
            if hit is not None:
                decision = Decision(
                    EventKind.CALL,
                    Effect.FORBID,
                    rule_ids=(hit.rule_id,),
                    reasons=(hit.reason or f"rate limit {hit.rule_id} reached",),
                )
                detail["limit"] = hit.key
                effect = Effect.FORBID
        guard.audit(self.event(decision, call.name, arguments=call.arguments, detail=detail))
        if effect is Effect.ALLOW:
            return _CallOutcome(True, decision=decision)
        return _CallOutcome(False, refusal_text(shown, decision.reason), decision)

    def _limits(self, kind: Literal["call", "model"], name: str, args: Mapping[str, Any]) -> Any:
        return self.guard.policy.limits(
            kind, self.identity, name, args, self.context, request=self.info
        )

    async def _over_limit(self, kind: Literal["call", "model"], hits: Any) -> Any:
        """The first of ``hits`` (limits that apply) whose budget is used up, counting the others."""
        limiter = self.guard.session.limits
        for hit in hits:
            if hit.unit == "tokens":
                if kind == "model":
                    # Counted once the response tells how many were used.
                    self.token_limits.append(hit)
                status = await limiter.check(self.identity, hit.key, hit.amount, hit.window_seconds)
            else:
                status = await limiter.check_and_count(
                    self.identity, hit.key, hit.amount, hit.window_seconds
                )
            if not status.allowed:
                return hit
        return None

    async def count_tokens(self, tokens: int) -> None:
        """Add the tokens a response used to every token budget this request was checked against."""
        if tokens <= 0:
            return
        limiter = self.guard.session.limits
        for hit in self.token_limits:
            await limiter.add(self.identity, hit.key, hit.window_seconds, tokens)

    # -- classifying tool output

    async def classify(
        self,
        result: ToolResult,
        spec: ToolSpec,
        *,
        traced: bool = True,
        decision: Decision | None = None,
    ) -> tuple[Any, bool, str | None]:
        """Classify one tool output; returns (new content or the same, changed, untrusted text).

        Updates ``self.context`` (taint, trusted and untrusted texts). ``decision``
        is the policy's classification of this output in the current context, when
        the caller already has it.
        """
        guard = self.guard
        if decision is None:
            decision = guard.policy.classify_result(
                self.identity, spec, result.arguments, result, self.context, request=self.info
            )
        content = result.content
        if (
            traced
            and decision.effect is Effect.TRUSTED
            and not decision.paths
            and not decision.redact_patterns
            and not guard.audit_all
        ):
            # The common case, in short: trusted as it stands (not audited, see above).
            self._add_texts(result.name or "<untraced>", None, _plain_text(content))
            return content, False, None
        if decision.effect is Effect.BLOCK:
            context = self.context
            decision = self.traced(
                decision,
                lambda: guard.policy.classify_result(
                    self.identity,
                    spec,
                    result.arguments,
                    result,
                    context,
                    request=self.info,
                    explain=True,
                ),
            )
        changed = False
        detail: dict[str, Any] = {}
        field_paths = [(p, e) for p, e in decision.paths if e is not Effect.REDACT]
        redact_paths = [p for p, e in decision.paths if e is Effect.REDACT]
        if decision.redact_patterns:
            redactor = Redactor.for_patterns(decision.redact_patterns)
            counts: Counter[str] = Counter()
            if redact_paths:
                content, hit = self._at_paths(
                    content, redact_paths, lambda v: redactor.redact_json(v, counts=counts)
                )
                changed = changed or hit
            elif isinstance(content, dict) and isinstance(content.get("content"), list):
                content = redactor.redact_mcp_result(content, counts=counts)
            else:
                content = redactor.redact_json(content, counts=counts)
            if counts:
                changed = True
                detail["redacted"] = dict(counts)
        effect = decision.effect
        untrusted: str | None = None
        trusted: str | None = None
        if effect is Effect.BLOCK:
            content, changed = (
                self._replacement(result, block_placeholder(result.name, decision.reason)),
                True,
            )
        elif effect is Effect.QUARANTINE:
            text, q_detail = await self._quarantine(content, decision, result.name)
            detail.update(q_detail)
            content, changed = self._replacement(result, text), True
        else:
            if field_paths:
                content, fchanged, untrusted, trusted = await self._fields(
                    content, field_paths, decision, result.name, detail
                )
                changed = changed or fchanged
                if effect is Effect.UNTRUSTED:
                    untrusted = _plain_text(content)
                    trusted = None
                elif trusted is None and untrusted is None:
                    trusted = _plain_text(content)
            elif effect is Effect.UNTRUSTED:
                untrusted = _plain_text(content)
            else:
                trusted = _plain_text(content)
            if not traced and untrusted is None:
                # Output no call in the conversation produced: never trust it.
                untrusted, trusted = _plain_text(content), None
                detail["untraced"] = True
        if (
            changed
            or untrusted is not None
            or detail
            or effect is not Effect.TRUSTED
            or guard.audit_all
        ):
            guard.audit(
                self.event(
                    decision, result.name or "<untraced>", arguments=result.arguments, detail=detail
                )
            )
        self._add_texts(result.name or "<untraced>", untrusted, trusted)
        return content, changed, untrusted

    def _add_texts(self, source: str, untrusted: str | None, trusted: str | None) -> None:
        c = self.context
        if untrusted is None:
            # Trusted output changes nothing but the texts `from` reads.
            if not trusted or not getattr(self.guard.policy, "reads_provenance", True):
                return
            self.context = Context(
                c.tainted,
                c.taint_sources,
                c.session,
                c.turn,
                c.user_texts,
                (*c.trusted_texts, trusted),
                c.untrusted_texts,
                c.attributes,
            )
            return
        self.context = Context(
            tainted=True,
            taint_sources=c.taint_sources | {source},
            session=c.session,
            turn=c.turn,
            user_texts=c.user_texts,
            trusted_texts=c.trusted_texts + ((trusted,) if trusted else ()),
            untrusted_texts=c.untrusted_texts + ((untrusted,) if untrusted else ()),
            attributes=c.attributes,
        )

    def _replacement(self, result: ToolResult, text: str) -> Any:
        if isinstance(result.content, dict) and "content" in result.content:
            return {"content": [{"type": "text", "text": text}]}
        return text

    async def _quarantine(
        self, content: Any, decision: Decision, tool: str
    ) -> tuple[str, dict[str, Any]]:
        service = self.guard.quarantine
        if service is None:
            return block_placeholder(tool, "quarantine is not configured"), {
                "quarantine": {"error": "not configured"}
            }
        from bastion.quarantine import QuarantineFailed, QuarantineSpec

        model = getattr(getattr(service, "config", None), "model", None)
        with self.guard.tracer.quarantine(tool=tool, model=model) as span:
            try:
                spec = QuarantineSpec.from_options(decision.options)
                outcome = await service.run(_plain_text(content), spec, tool=tool)
            except (QuarantineError, ValueError) as exc:
                span.set_error(type(exc).__name__)
                detail = exc.report.as_detail() if isinstance(exc, QuarantineFailed) else {}
                detail.setdefault("quarantine", {"error": type(exc).__name__})
                return block_placeholder(tool, "quarantine failed"), detail
        return outcome.text, outcome.report.as_detail()

    def _document(self, content: Any) -> tuple[Any, Callable[[Any], Any]] | None:
        """A JSON document inside ``content`` for field-level rules, and how to put it back."""
        if isinstance(content, dict) and isinstance(content.get("content"), list):
            if isinstance(content.get("structuredContent"), dict):

                def put_structured(doc: Any) -> Any:
                    text = dumps_compact(doc).decode("utf-8")
                    return {"content": [{"type": "text", "text": text}], "structuredContent": doc}

                return content["structuredContent"], put_structured
            texts = [
                b for b in content["content"] if isinstance(b, dict) and b.get("type") == "text"
            ]
            if len(texts) == 1 and len(content["content"]) == 1:
                inner = self._document(texts[0].get("text"))
                if inner is not None:
                    doc, put = inner
                    return doc, lambda d: {"content": [{"type": "text", "text": put(d)}]}
            return None
        if isinstance(content, list) and len(content) == 1 and isinstance(content[0], dict):
            block = content[0]
            if isinstance(block.get("text"), str):
                inner = self._document(block["text"])
                if inner is not None:
                    doc, put = inner
                    return doc, lambda d: [{**block, "text": put(d)}]
            return None
        if isinstance(content, str):
            try:
                doc = loads_strict(content)
            except ProtocolError:
                return None
            if isinstance(doc, dict | list):
                return doc, lambda d: dumps_compact(d).decode("utf-8")
        return None

    def _at_paths(
        self, content: Any, paths: Sequence[str], fn: Callable[[Any], Any]
    ) -> tuple[Any, bool]:
        found = self._document(content)
        if found is None:
            return fn(content), True
        doc, put = found
        hit = False
        for path in paths:
            for container, key in _select(doc, _parse_path(path)):
                new = fn(container[key])
                if new != container[key]:
                    container[key] = new
                    hit = True
        return (put(doc), True) if hit else (content, False)

    async def _fields(
        self,
        content: Any,
        paths: Sequence[tuple[str, Effect]],
        decision: Decision,
        tool: str,
        detail: dict[str, Any],
    ) -> tuple[Any, bool, str | None, str | None]:
        found = self._document(content)
        if found is None:
            # No JSON document to apply field rules to: the strongest field class covers it all.
            if any(e in (Effect.BLOCK, Effect.QUARANTINE) for _, e in paths):
                return (
                    block_placeholder(tool, "field-level rule on unstructured output"),
                    True,
                    None,
                    None,
                )
            if any(e is Effect.UNTRUSTED for _, e in paths):
                return content, False, _plain_text(content), None
            return content, False, None, _plain_text(content)
        doc, put = found
        changed = False
        untrusted: list[str] = []
        for path, effect in paths:
            for container, key in _select(doc, _parse_path(path)):
                value = container[key]
                if effect is Effect.UNTRUSTED:
                    untrusted.append(_plain_text(value))
                elif effect is Effect.BLOCK:
                    container[key] = block_placeholder(tool, decision.reason)
                    changed = True
                elif effect is Effect.QUARANTINE:
                    text, q_detail = await self._quarantine(value, decision, tool)
                    detail.setdefault("fields", {})[path] = q_detail
                    container[key] = text
                    changed = True
        # What remains once untrusted fields are taken out is trusted.
        rest = json.loads(json.dumps(doc))
        for path, effect in paths:
            if effect is Effect.UNTRUSTED:
                for container, key in reversed(_select(rest, _parse_path(path))):
                    del container[key]
        trusted = _plain_text(rest)
        new_content = put(doc) if changed else content
        return new_content, changed, ("\n".join(untrusted) if untrusted else None), trusted

    # -- LLM requests

    async def llm_request(self, headers: Headers, body: bytes) -> Reply | Forward:
        guard, identity = self.guard, self.identity
        codec = _CODECS[self.protocol]
        req = codec.parse_request(body)
        self.parsed = req
        conversation = _header(headers, guard.conversation_header)
        self.context = Context(session=conversation, user_texts=req.user_texts)
        changed = False
        # Model rules.
        provider: str | None = None
        model = req.model
        self.model = model
        if model is not None:
            model_req = ModelRequest(
                model, protocol=self.protocol, max_tokens=getattr(req, "max_tokens", None)
            )
            decision = guard.policy.decide_model(
                identity, model_req, self.context, request=self.info
            )
            if decision.effect is not Effect.ALLOW:
                context = self.context
                decision = self.traced(
                    decision,
                    lambda: guard.policy.decide_model(
                        identity, model_req, context, request=self.info, explain=True
                    ),
                )
                guard.audit(self.event(decision, model))
                return self.policy_reply(f"model {model!r} is not allowed: {decision.reason}")
            hits = self._limits("model", model, {})
            hit = await self._over_limit("model", hits) if hits else None
            if hit is not None:
                default_reason = (
                    f"the token budget of {hit.amount} tokens per {hit.window_seconds:g} s"
                    f" for model {model!r} is used up (limit {hit.rule_id})"
                    if hit.unit == "tokens"
                    else f"limit {hit.rule_id} reached"
                )
                denied = Decision(
                    EventKind.MODEL,
                    Effect.FORBID,
                    rule_ids=(hit.rule_id,),
                    reasons=(hit.reason or default_reason,),
                )
                guard.audit(self.event(denied, model, detail={"limit": hit.key}))
                return _json_reply(
                    429,
                    dumps_compact(
                        anthropic_error(denied.reason, type="rate_limit_error")
                        if self.protocol == "anthropic"
                        else openai_error(
                            denied.reason, type="rate_limit_error", code="rate_limited"
                        )
                    ),
                )
            guard.audit(self.event(decision, model))
            provider = decision.route
        # Initial trust.
        start = guard.policy.decide_context(identity, request=self.info)
        if start.effect is Effect.UNTRUSTED:
            self.context = self.context.with_taint("context")
            guard.audit(self.event(start, "context"))
        if req.user_texts:
            await self._remember_user_texts(conversation, req.user_texts)
        # Tool definitions: a function definition says nothing about the tool
        # (annotations, server); an MCP server that listed the same name did.
        tools = req.tools
        catalog = guard.catalog
        if tools and len(catalog):
            tools = [catalog.enrich(spec) for spec in tools]
        self.specs = specs = {spec.name: spec for spec in tools}
        # Tool outputs in the conversation, in order. The common case (traced output
        # trusted as it stands) is classify()'s first branch, inlined: a conversation
        # carries many outputs and a coroutine per output is a good part of their cost.
        policy = guard.policy
        classify_result, info, trusted = policy.classify_result, self.info, Effect.TRUSTED
        # Output of a tool no result rule names gets the default whatever it holds:
        # when that is to trust it as it stands, only `from` still needs its text.
        fixed_result = None if guard.audit_all else getattr(policy, "fixed_result", None)
        reads_texts = getattr(policy, "reads_provenance", True)
        for view in req.tool_results:
            if fixed_result is not None and view.traced:
                fixed = fixed_result(view.name)
                if (
                    fixed is not None
                    and fixed.effect is trusted
                    and not fixed.paths
                    and not fixed.redact_patterns
                ):
                    if reads_texts:
                        self._add_texts(view.name, None, _plain_text(view.content))
                    continue
            result = view.result
            spec = specs.get(result.name) or guard.spec_for(result.name)
            classified: Decision | None = None
            if view.traced:
                classified = classify_result(
                    identity, spec, result.arguments, result, self.context, request=info
                )
                if (
                    classified.effect is trusted
                    and not classified.paths
                    and not classified.redact_patterns
                    and not guard.audit_all
                ):
                    self._add_texts(result.name or "<untraced>", None, _plain_text(result.content))
                    continue
            content, rewritten, _ = await self.classify(
                result, spec, traced=view.traced, decision=classified
            )
            if rewritten:
                req.replace_tool_result(view.location, content)
                changed = True
        # Visibility of the offered tools.
        if tools:
            keep = []
            decide, context, info, show = (
                guard.policy.decide_visibility,
                self.context,
                self.info,
                Effect.SHOW,
            )
            for spec in tools:
                decision = decide(identity, spec, context, request=info)
                if decision.effect is show:
                    keep.append(spec.name)
                    if guard.audit_all:
                        guard.audit(self.event(decision, spec.name))
                else:
                    decision = self.traced(
                        decision,
                        functools.partial(
                            decide, identity, spec, context, request=info, explain=True
                        ),
                    )
                    guard.audit(self.event(decision, spec.name))
            if len(keep) != len(tools):
                req.keep_tools(keep)
                changed = True
        if changed:
            body = req.to_bytes()
            headers = _without(headers, _HOP_HEADERS)
            headers.append(("content-length", str(len(body))))
        return Forward(body, headers, self, provider)

    async def _remember_user_texts(self, conversation: str | None, texts: tuple[str, ...]) -> None:
        """Keep the user's and system's own texts for MCP requests of the same conversation."""
        guard, identity = self.guard, self.identity
        memo = (identity.tenant, identity.subject, conversation, hash(texts))
        seen = guard._stored_user_texts
        now = time.monotonic()
        stored_at = seen.get(memo)
        if stored_at is not None and now - stored_at < _USER_TEXT_RESTORE_SECONDS:
            return
        store, key = guard.session.store, _user_text_key(identity, conversation)
        kept = _decode_texts(await store.get(key))
        known = set(kept)
        kept.extend(t for t in dict.fromkeys(texts) if t and t not in known)
        kept = _newest_within(kept, guard.max_user_text_bytes)
        payload = json.dumps(kept, ensure_ascii=False).encode("utf-8")
        await store.set(key, payload, _USER_TEXT_TTL)
        if len(seen) >= 4096:
            seen.clear()
        seen[memo] = now

    # -- MCP requests

    async def mcp_request(self, headers: Headers, body: bytes) -> Reply | Forward:
        guard, identity = self.guard, self.identity
        post: MCPPost = MCPCodec.parse_post(body, headers)
        self.session_key = SessionKey.from_request(
            identity,
            dict(headers),
            protocol_version=post.revision,
            conversation_header=guard.conversation_header,
        )
        methods = {m.method for m in post.messages}
        user_texts: list[str] = []
        if "tools/call" in methods:
            # The user's own words from the same conversation's LLM requests, so a
            # value the user typed does not count as coming from untrusted output.
            conversation = _header(headers, guard.conversation_header)
            user_texts = _decode_texts(
                await guard.session.store.get(_user_text_key(identity, conversation))
            )
        start = guard.policy.decide_context(identity, request=self.info)
        self.context = Context(session=self.session_key.id, user_texts=tuple(user_texts))
        if start.effect is Effect.UNTRUSTED:
            self.context = self.context.with_taint("context")
        if "tools/call" in methods or "tools/list" in methods:
            state = await guard.session.taint.get_taint(self.session_key)
            self.context = state.apply(self.context)
        server = self.route.server
        forwarded: list[JSONRPCMessage] = []
        for message in post.messages:
            call = MCPCodec.tool_call(message)
            if call is not None and message.id is not None:
                own_name = call.name
                if server:
                    # The policy sees the gateway's names (server__tool) on every route.
                    call = ToolCall(call.id, qualified_name(server, own_name), call.arguments)
                spec = guard.spec_for(call.name, server)
                entry = guard.catalog.entry(call.name) if len(guard.catalog) else None
                if entry is not None and entry.pins_drifted:
                    base = self.context
                    self.context = _with_attributes(
                        base, pins_drifted=True, pin_changed=entry.pin_changed
                    )
                    outcome = await self.decide_call(call, spec, None, label=own_name)
                    self.context = base
                else:
                    outcome = await self.decide_call(call, spec, None, label=own_name)
                if not outcome.allowed:
                    self.local_answers.append(self._refusal(message.id, outcome, post.revision))
                    continue
                self.pending[message.id] = ("call", call)
            elif message.method == "tools/list" and message.id is not None:
                self.pending[message.id] = ("list", MCPCodec.list_cursor(message))
            forwarded.append(message)
        if not self.local_answers:
            return Forward(body, headers, self)
        if not forwarded:
            answers = self.local_answers
            payload = answers if post.batch else answers[0]
            return _json_reply(200, dumps_compact(payload))
        body = MCPCodec.encode_reply(forwarded)
        headers = _without(headers, _HOP_HEADERS)
        headers.append(("content-length", str(len(body))))
        return Forward(body, headers, self)

    def _refusal(
        self, request_id: str | int, outcome: _CallOutcome, revision: str
    ) -> dict[str, Any]:
        if self.guard.mcp_refusal == "error":
            return MCPCodec.refusal_error(request_id, outcome.text)
        return MCPCodec.refusal_result(request_id, outcome.text, revision=revision)

    async def mcp_message(self, message: JSONRPCMessage) -> JSONRPCMessage:
        """Rewrite one server message that answers a tracked request."""
        if message.kind not in ("response", "error") or message.id is None:
            return message
        if self.info.method == "GET":
            return self._refuse_redelivery(message)
        tracked = self.pending.pop(message.id, None)
        if tracked is None or message.result is None:
            return message
        kind, value = tracked
        if kind == "list":
            return message.with_result(await self._filter_list(message.result, value))
        call: ToolCall = value
        spec = self.guard.spec_for(call.name, self.route.server)
        result = MCPCodec.call_result(message.result, call)
        content, changed, untrusted = await self.classify(result, spec)
        if untrusted is not None and self.session_key is not None:
            await self.guard.session.taint.mark_tainted(self.session_key, call.name, untrusted)
        if not changed:
            return message
        new = dict(message.result)
        new["content"] = content.get("content", []) if isinstance(content, dict) else content
        if isinstance(content, dict) and "structuredContent" in content:
            new["structuredContent"] = content["structuredContent"]
        else:
            new.pop("structuredContent", None)
        if content != result.content and _is_block(content):
            new["isError"] = True
        return message.with_result(new)

    def _refuse_redelivery(self, message: JSONRPCMessage) -> JSONRPCMessage:
        """A response on a GET stream (a resumed or redelivered answer), replaced by an error.

        Bastion checks answers on the POST exchange that asked for them: there it
        knows which tool call (or tools list) an id belongs to. A response
        arriving on a GET stream cannot be tied to a checked request, so it never
        reaches the client unchecked; the client sees a JSON-RPC error for that
        id and may send the request again.
        """
        reason = "a response delivered outside the request that asked for it cannot be checked"
        self.guard.audit(
            self.event(
                _denial(EventKind.RESULT, "redelivered_response", reason),
                self.info.path,
                detail={"error": "redelivered_response", "jsonrpc_id": message.id},
            )
        )
        text = f"Bastion refused this response: {reason}; send the request again"
        return JSONRPCMessage("error", MCPCodec.refusal_error(message.id, text))

    async def _filter_list(self, result: dict[str, Any], cursor: str | None) -> dict[str, Any]:
        guard = self.guard
        own_specs = MCPCodec.list_tools(result)
        server = self.route.server
        own_names: dict[str, str] = {}
        specs = own_specs
        if server:
            # The agent keeps the server's names; the policy sees server__tool.
            own_specs = [dataclasses.replace(s, server=server) for s in own_specs]
            specs = []
            for s in own_specs:
                name = qualified_name(server, s.name)
                own_names[name] = s.name
                specs.append(dataclasses.replace(s, name=name))
        pin_server = f"{server or self.info.path}#{cursor or ''}"
        # Pinned as the server itself names its tools.
        report = await guard.session.pins.check(pin_server, own_specs)
        drifted = {qualified_name(server, n) for n in (*report.added, *report.changed)}
        # Calls see the pin state of the listing that last carried their tool.
        guard.catalog.remember(
            specs, self.info.path, pins_drifted=report.drifted, pin_changed=drifted
        )
        keep: list[str] = []
        reshaped: set[str] = set()
        base = self.context
        for spec in specs:
            own = own_names.get(spec.name, spec.name)
            context = base
            if report.drifted:
                context = _with_attributes(
                    base, pins_drifted=True, pin_changed=spec.name in drifted
                )
            decide = guard.policy.decide_visibility
            decision = decide(self.identity, spec, context, request=self.info)
            detail: dict[str, Any] = {}
            if spec.name in drifted:
                detail["pin"] = {
                    "added": own in report.added,
                    "changed": list(report.changed.get(own, ())),
                }
            if decision.effect is not Effect.SHOW or detail or guard.audit_all:
                decision = self.traced(
                    decision,
                    functools.partial(
                        decide, self.identity, spec, context, request=self.info, explain=True
                    ),
                )
                guard.audit(self.event(decision, spec.name, detail=detail))
            if decision.effect is Effect.SHOW:
                keep.append(own)
                if Effect.QUARANTINE in guard.policy.result_effects(spec):
                    reshaped.add(own)
        listed = MCPCodec.filter_tools(result, keep)
        if reshaped:
            # A quarantined output is Bastion's constrained answer, not the tool's
            # structured result: a client that still held the tool's outputSchema
            # would reject it, so the schema is not advertised.
            listed["tools"] = [
                {k: v for k, v in t.items() if k != "outputSchema"}
                if t.get("name") in reshaped
                else t
                for t in listed["tools"]
            ]
        return listed

    # -- responses

    async def response(self, status: int, headers: Headers) -> ResponseGuard:
        """Decide how to handle the upstream response (``headers`` lower-case names)."""
        checked = ResponseGuard(self, status, headers)
        if checked.failed:
            await checked.complete()  # audit the refusal now; complete() gives it again
        return checked


def _is_block(content: Any) -> bool:
    text = _plain_text(content)
    return text.startswith("[Bastion blocked the output")


# ---------------------------------------------------------------- responses


class _UsageMeter:
    """The tokens a response reports using: its ``usage`` (JSON) or its stream's usage events.

    Counts merge per kind by the largest value seen (Anthropic streams send running
    totals). Only responses to requests under a token budget are metered.
    """

    def __init__(self, usage_of: Callable[[Mapping[str, Any]], dict[str, int] | None]) -> None:
        self._usage_of = usage_of
        self._parser: SSEParser | None = None
        self.counts: dict[str, int] = {}

    def add(self, payload: Any) -> None:
        if not isinstance(payload, dict):
            return
        found = self._usage_of(payload)
        if found:
            counts = self.counts
            for kind, value in found.items():
                if value > counts.get(kind, -1):
                    counts[kind] = value

    def feed(self, chunk: bytes) -> None:
        """Read stream bytes as they came from upstream (malformed events are the rewriter's concern)."""
        if self._parser is None:
            self._parser = SSEParser()
        for event in self._parser.feed(chunk):
            data = event.data
            if data and "usage" in data:
                try:
                    self.add(json.loads(data))
                except ValueError:
                    continue

    @property
    def total(self) -> int:
        return sum(self.counts.values())


class ResponseGuard:
    """How one upstream response goes back to the client; see the module docstring."""

    def __init__(self, exchange: Exchange, status: int, headers: Headers) -> None:
        self.exchange = exchange
        self.status = status
        self.done = False
        self._buffer: list[bytes] = []
        self._size = 0
        self._decoder: BodyDecoder | None = None
        self._rewriter: StreamRewriter | None = None
        self._unsettled: StreamStep | BaseException | None = None
        self._events: MCPEventStream | None = None
        self._stream_kind: str = ""
        self.mode: Literal["pass", "buffer", "stream"] = "pass"
        self.headers = headers
        self._media = ""
        self._fixed: Reply | None = None
        self._meter: _UsageMeter | None = None
        # Constructing never audits (the sync transport builds this off the guard's
        # loop): a setup failure is answered and audited by complete().
        self._setup_error: BaseException | None = None
        try:
            self._setup(headers)
        except Exception as exc:
            self._setup_error = exc
            self.mode = "buffer"
        # Stream mode for an LLM route: feed_sync() may be used instead of feed().
        self.feeds_sync = self._rewriter is not None and self._setup_error is None
        # feed_sync() in short, for chunks of whole events nothing held back may
        # concern (None: go the long way); only when no decoding or metering applies.
        self.pass_through: Callable[[bytes], bytes | None] | None = (
            self._rewriter.feed_through
            if self.feeds_sync
            and self._rewriter is not None
            and self._decoder is None
            and self._meter is None
            else None
        )

    def _setup(self, headers: Headers) -> None:
        ex = self.exchange
        media = (_header(headers, "content-type") or "").split(";")[0].strip().lower()
        if ex.local_answers and self.status == 202:
            # Every forwarded message was a notification: answer the refused calls instead.
            self.mode = "buffer"
            return
        if not 200 <= self.status < 300:
            return
        if ex.info.method != "POST":
            # An MCP GET stream may carry responses (resumption, redelivery): read it.
            if ex.protocol != "mcp" or ex.info.method != "GET":
                return
        elif ex.protocol == "mcp" and not ex.pending and not ex.local_answers:
            return
        encoding = (_header(headers, "content-encoding") or "").strip().lower()
        if encoding and encoding != "identity":
            if not can_decode(encoding):
                raise ProtocolError(
                    f"upstream response uses an undecodable encoding {encoding!r}",
                    status=502,
                    code="unsupported_encoding",
                )
            self._decoder = BodyDecoder(encoding, max_size=ex.guard.max_response_size)
        self._media = media
        if media == "text/event-stream":
            self.mode = "stream"
            if ex.protocol == "mcp":
                self._events = MCPEventStream()
            else:
                codec = _CODECS[ex.protocol]
                self._rewriter = codec.stream_rewriter(max_pending=ex.guard.max_pending)
                if ex.token_limits:
                    self._meter = _UsageMeter(codec.usage_of)
            self.headers = _without(headers, _HOP_HEADERS)
            return
        if media == "application/json" or (media.endswith("+json")):
            self.mode = "buffer"
            return
        raise ProtocolError(
            f"upstream answered with {media or 'no content type'!r}, which Bastion cannot inspect",
            status=502,
            code="invalid_content_type",
        )

    @property
    def failed(self) -> bool:
        """The response cannot be checked: ``complete()`` answers with the error (buffer mode)."""
        return self._setup_error is not None or self._fixed is not None

    # -- buffer mode

    def collect(self, chunk: bytes) -> None:
        """Add a body chunk (buffer mode). Over the size limit the reply becomes an error."""
        if self._fixed is not None or self._setup_error is not None or not chunk:
            return
        self._size += len(chunk)
        if self._size > self.exchange.guard.max_response_size:
            self._fixed = self.exchange.error_reply(
                ProtocolError(
                    "upstream response too large to inspect", status=502, code="response_too_large"
                )
            )
            self._buffer = []
            return
        self._buffer.append(chunk)

    async def complete(self) -> Reply:
        """The response to send (buffer mode). Never raises."""
        if self._setup_error is not None:
            exc, self._setup_error = self._setup_error, None
            self._fixed = self.exchange.error_reply(exc)
        if self._fixed is not None:
            return self._fixed
        body = b"".join(self._buffer)
        self._buffer = []
        try:
            if self._decoder is not None:
                body = self._decoder.feed(body)
                self._decoder.close()
            return await self._complete(body)
        except Exception as exc:
            return self.exchange.error_reply(exc)

    async def _complete(self, body: bytes) -> Reply:
        ex = self.exchange
        headers = _without(self.headers, _HOP_HEADERS)
        if ex.protocol == "mcp":
            if self.status == 202 and ex.local_answers:
                answers = ex.local_answers
                return _json_reply(200, dumps_compact(answers if len(answers) > 1 else answers[0]))
            messages = MCPCodec.parse_reply(body, "application/json")
            out = [await ex.mcp_message(m) for m in messages]
            raws = [m.raw for m in out] + ex.local_answers
            is_list = body.lstrip().startswith(b"[") or len(raws) > 1
            body = dumps_compact(raws if is_list else raws[0])
            return Reply(self.status, [*headers, ("content-length", str(len(body)))], body)
        codec = _CODECS[ex.protocol]
        resp = codec.parse_response(body)
        if ex.token_limits:
            meter = _UsageMeter(codec.usage_of)
            meter.add(resp.body)
            await ex.count_tokens(meter.total)
        refusals: dict[str, str] = {}
        for view in resp.calls:
            outcome = await ex.decide_call(view.call, self._spec(view), view.error)
            if not outcome.allowed:
                refusals[view.call.id] = outcome.text
        if refusals and ex.guard.refusal == "error":
            return ex.policy_reply("; ".join(refusals.values()))
        if refusals:
            resp.refuse(refusals)
            body = resp.to_bytes()
        return Reply(self.status, [*headers, ("content-length", str(len(body)))], body)

    def _spec(self, view: CallView) -> ToolSpec:
        ex = self.exchange
        return ex.specs.get(view.call.name) or ex.guard.spec_for(view.call.name)

    # -- stream mode

    async def feed(self, chunk: bytes) -> bytes:
        """Bytes to send for an upstream chunk (stream mode). Never raises."""
        if self._events is None:
            out = self.feed_sync(chunk)
            return out if out is not None else await self.settle()
        if self.done:
            return b""
        try:
            if self._decoder is not None:
                chunk = self._decoder.feed(chunk)
            return await self._feed_mcp(chunk)
        except Exception as exc:
            return self._abort(exc)

    def feed_sync(self, chunk: bytes) -> bytes | None:
        """:meth:`feed` without an event loop, for LLM streams (:attr:`feeds_sync`).

        Returns the bytes to send, or None when the chunk needs async work (tool
        calls to decide, or an error to audit): then ``await settle()`` gives the
        bytes, on the guard's loop. Never raises; touches only this response's state.
        """
        if self.done:
            return b""
        rewriter = self._rewriter
        assert rewriter is not None
        try:
            if self._decoder is not None:
                chunk = self._decoder.feed(chunk)
                if self._meter is not None:
                    self._meter.feed(chunk)
            else:
                if self._meter is not None:
                    self._meter.feed(chunk)
                through = rewriter.feed_through(chunk)
                if through is not None:
                    return through
            step = rewriter.feed(chunk)
        except Exception as exc:
            self._unsettled = exc
            return None
        if not step.needs_verdict:
            return step.output
        self._unsettled = step
        return None

    async def settle(self) -> bytes:
        """The bytes for the chunk :meth:`feed_sync` left unsettled. Never raises."""
        pending, self._unsettled = self._unsettled, None
        try:
            if isinstance(pending, BaseException):
                raise pending
            if pending is None:
                return b""
            return pending.output + await self._verdicts(pending.needs_verdict)
        except Exception as exc:
            return self._abort(exc)

    async def _verdicts(self, views: Sequence[CallView]) -> bytes:
        ex, rewriter = self.exchange, self._rewriter
        assert rewriter is not None
        out: list[bytes] = []
        pending = list(views)
        while pending:
            view = pending.pop(0)
            outcome = await ex.decide_call(view.call, self._spec(view), view.error)
            if not outcome.allowed and ex.guard.refusal == "error":
                raise _PolicyStop(outcome.text)
            verdict = Verdict.allowed() if outcome.allowed else Verdict.refused(outcome.text)
            step = rewriter.decide(view.call.id, verdict)
            out.append(step.output)
            pending.extend(step.needs_verdict)
        return b"".join(out)

    async def _feed_mcp(self, chunk: bytes) -> bytes:
        assert self._events is not None
        out: list[bytes] = []
        if self.exchange.local_answers:
            answers, self.exchange.local_answers = self.exchange.local_answers, []
            out.extend(
                encode_event(SSEEvent(data=dumps_compact(a).decode("utf-8"))) for a in answers
            )
        for event, messages in self._events.feed(chunk):
            if not messages:
                out.append(MCPEventStream.encode(event))
                continue
            rewritten = [await self.exchange.mcp_message(m) for m in messages]
            if all(a is b for a, b in zip(rewritten, messages, strict=True)):
                out.append(MCPEventStream.encode(event))
            else:
                out.append(
                    MCPEventStream.encode(event, rewritten if len(rewritten) > 1 else rewritten[0])
                )
        return b"".join(out)

    async def close(self) -> bytes:
        """The last bytes once upstream ended (stream mode). Never raises."""
        if self.done:
            return b""
        try:
            tail = b""
            if self._decoder is not None:
                self._decoder.close()
            if self._events is not None:
                tail = await self._feed_mcp(b"")
                self._events.close()
            else:
                assert self._rewriter is not None
                tail = self._rewriter.close()
                if self._meter is not None:
                    await self.exchange.count_tokens(self._meter.total)
            self.done = True
            return tail
        except Exception as exc:
            return self._abort(exc)

    def abort(self, exc: BaseException) -> bytes:
        """End the stream with an error event (audited); for front doors whose upstream failed."""
        if self.done:
            return b""
        return self._abort(exc)

    def _abort(self, exc: BaseException) -> bytes:
        self.done = True
        ex = self.exchange
        if isinstance(exc, _PolicyStop):
            message, code, kind = exc.text, _POLICY_DENIED, "permission_error"
        else:
            if not isinstance(exc, ProtocolError | StoreError):
                log.exception("unexpected error in a guarded stream; ending it", exc_info=exc)
            proto = (
                exc
                if isinstance(exc, ProtocolError)
                else _store_unavailable()
                if isinstance(exc, StoreError)
                else None
            )
            code = proto.code if proto else "internal_error"
            message = proto.message if proto else "Bastion could not check this stream"
            kind = "api_error"
            ex.guard._audit_quietly(
                ex.event(
                    _denial(EventKind.CALL, code, message),
                    ex.info.path,
                    detail={"error": code, "message": message},
                )
            )
        if ex.protocol == "anthropic":
            return encode_event(
                SSEEvent(
                    data=dumps_compact(anthropic_error(message, type=kind)).decode(), event="error"
                )
            )
        if ex.protocol == "mcp":
            ids: list[str | int | None] = [*ex.pending] or [None]
            return b"".join(
                encode_event(
                    SSEEvent(
                        data=dumps_compact(
                            jsonrpc_error(rid, -32603, message, {"reason": code})
                        ).decode()
                    )
                )
                for rid in ids
            )
        error = openai_error(message, type=kind, code=code)
        if ex.protocol == "openai-responses":
            payload = {"type": "error", "code": code, "message": message, "param": None, **error}
            return encode_event(SSEEvent(data=dumps_compact(payload).decode(), event="error"))
        return encode_event(SSEEvent(data=dumps_compact(error).decode()))


class _PolicyStop(Exception):
    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text
