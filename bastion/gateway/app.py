"""``build_app(config)``: the ``bastion serve`` Starlette app, assembled from the library's parts.

Endpoints (all behind :class:`~bastion.adapters.asgi.BastionMiddleware`, which
authenticates, applies the policy and audits every decision):

- ``POST /v1/chat/completions``, ``POST /v1/responses`` (OpenAI-compatible),
  ``POST /v1/messages`` (Anthropic): proxied to the provider the model routes
  to (the policy's ``route`` first, then the configuration's ``routes``,
  then a provider's ``models``), with the agent's credential replaced by the
  provider key from the vault;
- ``GET /v1/models``: the models this identity may use (policy and key grant);
- ``/mcp/{server}``: a streamable HTTP reverse proxy per upstream MCP server
  (POST, GET streams and DELETE; JSON and SSE replies streamed through;
  ``Mcp-Session-Id`` preserved both ways); the agent sees the server's own tool
  names, the policy the same ``server__tool`` names as on ``/mcp``;
- ``/mcp``: every upstream behind one MCP endpoint, tools named ``server__tool``
  (:mod:`bastion.gateway.aggregate`);
- ``/healthz``, ``/metrics``, ``/.well-known/oauth-protected-resource``, and the
  approval API under ``/approvals``.

One guard serves every endpoint, so what passes one side informs the other:
MCP tool annotations reach the model side's tools and calls, the user's own
messages reach MCP calls of the same conversation, and token budgets are
charged from the providers' usage (see :mod:`bastion.adapters.pipeline`).

Each upstream exchange is audited too (``detail.exchange == "upstream"``: the
provider, the key's fingerprint, the upstream status, latency and any error).
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import httpx
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from bastion.adapters.asgi import BastionMiddleware
from bastion.adapters.pipeline import Route as GuardRoute
from bastion.audit.tracing import bastion_tracer
from bastion.errors import AuthError, BastionError, ProtocolError, UpstreamError
from bastion.events import (
    AuditEvent,
    Decision,
    Effect,
    EventKind,
    Identity,
    ModelRequest,
    RequestInfo,
)
from bastion.gateway.aggregate import AggregateMCP, RemoteError, UpstreamMCPClient
from bastion.gateway.config import GatewayConfig, MCPServerConfig, ProviderConfig
from bastion.gateway.upstream import (
    Exchange,
    Protocol,
    SecretScrubber,
    forward_headers,
    make_client,
    read_body,
    relay,
    request_ids_of,
    send_error,
    timeout_of,
)
from bastion.identity import (
    Authentication,
    IdentityResolver,
    ProviderKeyVault,
    TokenExchanger,
    credential_headers,
)
from bastion.identity.vault import CREDENTIAL_HEADERS
from bastion.policy import Policy, PolicyError
from bastion.session import Approval, SessionServices, approval_routes

__all__ = ["Gateway", "build_app", "decision_line"]

log = logging.getLogger("bastion.gateway")
decisions_log = logging.getLogger("bastion.decisions")

_AGENT_ONLY_HEADERS = CREDENTIAL_HEADERS | {"cookie"}
_MODELS_CACHE_SECONDS = 60.0


def decision_line(event: AuditEvent) -> str:
    """One readable line for a decision: ``FORBID call github__create_issue by alice (rule x: why)``."""
    decision = event.decision
    who = event.identity.subject
    if event.detail.get("exchange") == "upstream":
        provider = event.detail.get("provider") or event.detail.get("server") or "?"
        status = event.detail.get("upstream_status")
        error = event.detail.get("error")
        outcome = f"failed: {error}" if error else f"status {status}"
        latency = event.detail.get("upstream_latency_ms")
        return f"UPSTREAM {provider} {event.target} by {who}: {outcome} ({latency} ms)"
    if decision.defaulted:
        why = f"default {decision.effect.value}"
    elif decision.rule_ids:
        label = "rule" if len(decision.rule_ids) == 1 else "rules"
        why = f"{label} {', '.join(decision.rule_ids)}"
    else:
        why = "no rule"
    if decision.reasons:
        why += ": " + "; ".join(decision.reasons)
    error = event.detail.get("error")
    if error:
        why += f"; error {error}"
    return f"{decision.effect.value.upper()} {decision.kind.value} {event.target} by {who} ({why})"


@dataclass
class Gateway:
    """Everything one running gateway holds; built by :func:`build_app`, kept on ``app.state.gateway``."""

    config: GatewayConfig
    policy: Policy
    resolver: IdentityResolver
    vault: ProviderKeyVault
    session: SessionServices
    client: httpx.AsyncClient
    exchanger: TokenExchanger | None = None
    quarantine: Any = None
    trail: Any = None
    metrics: Any = None
    extra_hooks: list[Callable[[AuditEvent], None]] = field(default_factory=list)
    policy_error: str | None = None
    _models_cache: dict[str, tuple[float, list[str]]] = field(default_factory=dict)

    # -- audit

    def on_decision(self, event: AuditEvent) -> None:
        """The hook the middleware calls for every decision: log line, audit trail, metrics."""
        if self.config.audit.log_decisions:
            try:
                level = logging.DEBUG if event.decision.effect is Effect.SHOW else logging.INFO
                if decisions_log.isEnabledFor(level):
                    decisions_log.log(level, "%s", decision_line(event))
            except Exception:
                log.exception("could not format a decision for the log")
        for hook in self.extra_hooks:
            hook(event)
        if self.trail is not None:
            # An AuditError (fail-closed trail) propagates: the middleware denies.
            self.trail.on_decision(event)
        elif self.metrics is not None:
            self.metrics.observe(event)

    def audit_exchange(
        self,
        identity: Identity,
        target: str,
        protocol: str,
        scope: Scope,
        exchange: Exchange | None,
        *,
        provider: str | None = None,
        server: str | None = None,
        fingerprint: str | None = None,
        error: BaseException | None = None,
    ) -> None:
        problem = error if error is not None else (exchange.error if exchange else None)
        detail: dict[str, Any] = {"exchange": "upstream"}
        if provider is not None:
            detail["provider"] = provider
        if server is not None:
            detail["server"] = server
        if fingerprint is not None:
            detail["provider_key_fingerprint"] = fingerprint
        if exchange is not None:
            detail["upstream_status"] = exchange.status
            detail["upstream_latency_ms"] = exchange.latency_ms
        if problem is not None:
            detail["error"] = getattr(problem, "code", type(problem).__name__)
            detail["error_message"] = str(getattr(problem, "message", problem))
        state = _guard_state(scope) or {}
        client = scope.get("client")
        info = RequestInfo(
            method=scope.get("method", "POST"),
            path=scope.get("path", "/"),
            client=f"{client[0]}:{client[1]}" if client else None,
            protocol=protocol,
            id=state.get("request_id") or RequestInfo().id,
        )
        decision = Decision(
            EventKind.CALL if protocol == "mcp" else EventKind.MODEL,
            Effect.ALLOW,
            rule_ids=("bastion:upstream",),
            reasons=("upstream exchange",),
            route=provider,
        )
        try:
            self.on_decision(AuditEvent(decision, identity, target, protocol, info, detail=detail))
        except Exception:
            # The answer is already on its way; losing this record is logged, not hidden.
            log.exception("could not audit the upstream exchange for %s", target)

    def audit_refusal(
        self, identity: Identity, target: str, protocol: str, scope: Scope, exc: BastionError
    ) -> None:
        """Audit a request the gateway refused itself (e.g. the on-behalf-of exchange failed)."""
        code = str(getattr(exc, "code", type(exc).__name__))
        message = str(getattr(exc, "message", exc))
        state = _guard_state(scope) or {}
        client = scope.get("client")
        info = RequestInfo(
            method=scope.get("method", "POST"),
            path=scope.get("path", "/"),
            client=f"{client[0]}:{client[1]}" if client else None,
            protocol=protocol,
            id=state.get("request_id") or RequestInfo().id,
        )
        decision = Decision(
            EventKind.CALL, Effect.FORBID, rule_ids=(f"bastion:{code}",), reasons=(message,)
        )
        detail = {"error": code, "error_message": message}
        try:
            self.on_decision(AuditEvent(decision, identity, target, protocol, info, detail=detail))
        except Exception:
            log.exception("could not audit the refusal for %s", target)

    # -- identity

    async def authenticate(self, scope: Scope) -> Authentication:
        """The request's authentication (the resolver caches verified credentials)."""
        return await self.resolver.authenticate(credential_headers(scope.get("headers", [])))

    async def mcp_headers(self, server: str, auth: Authentication) -> dict[str, str]:
        """Headers for one MCP upstream: configured ones, plus an on-behalf-of token."""
        cfg = self.config.mcp[server]
        headers = {k.lower(): v for k, v in cfg.headers.items()}
        if cfg.on_behalf_of is not None:
            if self.exchanger is None or auth.token is None:
                raise AuthError(
                    f"MCP server {server!r} needs a user's bearer token (on-behalf-of)",
                    status=403,
                    code="obo_requires_token",
                )
            token = await self.exchanger.exchange(
                auth.token, cfg.on_behalf_of.audience, scope=cfg.on_behalf_of.scope
            )
            headers["authorization"] = token.authorization()
        return headers

    def secrets_of(self, headers: dict[str, str]) -> list[str]:
        """Credential values in upstream headers, to scrub from what comes back."""
        out = []
        for name, value in headers.items():
            if name in CREDENTIAL_HEADERS:
                out.append(value)
                if value.lower().startswith("bearer "):
                    out.append(value[7:])
        return out

    # -- routing

    def provider_for(
        self, family: Literal["openai", "anthropic"], model: str, routed: str | None
    ) -> tuple[str, ProviderConfig]:
        if routed is not None:
            provider = self.config.providers.get(routed)
            if provider is None:
                raise UpstreamError(
                    f"the policy routes model {model!r} to provider {routed!r}, which is not configured",
                    status=500,
                    code="unknown_provider",
                )
            if provider.protocol != family:
                raise UpstreamError(
                    f"the policy routes model {model!r} to provider {routed!r}, which does not speak {family}",
                    status=500,
                    code="provider_protocol_mismatch",
                )
            return routed, provider
        found = self.config.provider_for(family, model)
        if found is None:
            raise ProtocolError(
                f"no provider serves model {model!r}", status=404, code="model_not_found"
            )
        return found

    async def upstream_models(self, name: str, provider: ProviderConfig) -> list[str]:
        cached = self._models_cache.get(name)
        now = time.monotonic()
        if cached is not None and now - cached[0] < _MODELS_CACHE_SECONDS:
            return cached[1]
        names: list[str] = []
        try:
            headers, _key = self.vault.inject(name, dict(provider.headers))
            response = await self.client.get(
                provider.base_url + "/models", headers=headers, params=provider.query or None
            )
            if response.status_code == 200:
                data = response.json().get("data", [])
                names = [
                    m["id"] for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)
                ]
            else:
                log.warning("provider %s: GET /models answered %s", name, response.status_code)
        except (httpx.HTTPError, UpstreamError, ValueError, AttributeError) as exc:
            log.warning("provider %s: could not list models: %s", name, exc)
        self._models_cache[name] = (now, names)
        return names


def _guard_state(scope: Scope) -> dict[str, Any] | None:
    state = scope.get("state")
    if isinstance(state, dict):
        value = state.get("bastion")
        if isinstance(value, dict):
            return value
    return None


def _is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def _model_of(body: bytes) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        raise ProtocolError("the request body is not valid JSON", code="invalid_json") from None
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, str) or not model:
        raise ProtocolError("the request names no model", code="missing_model")
    return model


def _error_status(exc: BaseException) -> tuple[int, str, str, dict[str, str]]:
    if isinstance(exc, AuthError):
        return exc.status, exc.message, exc.code, exc.headers
    if isinstance(exc, ProtocolError | UpstreamError):
        return exc.status, exc.message, exc.code, {}
    return 500, "internal error", "internal_error", {}


class LLMProxy:
    """``POST`` of one LLM endpoint, relayed to the routed provider."""

    def __init__(self, gateway: Gateway, protocol: Protocol, suffix: dict[str, str]) -> None:
        self.gateway = gateway
        self.protocol = protocol
        self.family: Literal["openai", "anthropic"] = (
            "anthropic" if protocol == "anthropic" else "openai"
        )
        self.suffix = suffix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gw = self.gateway
        state = _guard_state(scope)
        if state is None:
            # Only reachable if the guard was bypassed: refuse rather than proxy unchecked.
            await send_error(
                send, self.protocol, 500, "request was not checked by the policy", "unguarded"
            )
            return
        identity: Identity = state.get("identity") or Identity.anonymous_identity()
        model = "?"
        provider_name: str | None = None
        fingerprint: str | None = None
        try:
            body = await read_body(receive, gw.config.max_body_bytes)
            model = _model_of(body)
            auth = await gw.authenticate(scope)
            provider_name, provider = gw.provider_for(self.family, model, state.get("provider"))
            auth.check_model(provider_name, model)
            outgoing = forward_headers(scope["headers"])
            outgoing.update({k.lower(): v for k, v in provider.headers.items()})
            headers, key = gw.vault.inject(provider_name, outgoing)
            fingerprint = key.fingerprint
        except (ProtocolError, AuthError, UpstreamError) as exc:
            status, message, code, extra = _error_status(exc)
            await send_error(send, self.protocol, status, message, code, headers=extra)
            if isinstance(exc, UpstreamError):
                gw.audit_exchange(
                    identity, model, self.protocol, scope, None, provider=provider_name, error=exc
                )
            return
        suffix = self.suffix["anthropic" if provider.kind == "anthropic" else "openai"]
        request = gw.client.build_request(
            "POST",
            provider.base_url + suffix,
            content=body,
            headers=headers,
            params=provider.query or None,
            timeout=timeout_of(provider.timeouts)
            if provider.timeouts
            else httpx.USE_CLIENT_DEFAULT,
        )
        exchange = await relay(
            gw.client,
            request,
            send,
            protocol=self.protocol,
            what=f"provider {provider_name!r}",
            scrubber=SecretScrubber([key.reveal()]),
            max_body_bytes=gw.config.max_body_bytes * 4,
            keep_headers=_keep_llm_header,
            receive=receive,
        )
        gw.audit_exchange(
            identity,
            model,
            self.protocol,
            scope,
            exchange,
            provider=provider_name,
            fingerprint=fingerprint,
        )


def _keep_llm_header(name: str) -> bool:
    # Provider bookkeeping headers (request ids, rate limits) help the agent; cookies do not.
    return name not in ("set-cookie",)


class MCPProxy:
    """``/mcp/{server}``: streamable HTTP reverse proxy to one upstream MCP server."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gw = self.gateway
        server = scope.get("path_params", {}).get("server", "")
        cfg: MCPServerConfig | None = gw.config.mcp.get(server)
        if cfg is None:
            await send_error(send, "mcp", 404, f"no MCP server named {server!r}", "unknown_server")
            return
        method = scope["method"]
        if method not in ("POST", "GET", "DELETE"):
            await send_error(
                send,
                "mcp",
                405,
                "method not allowed",
                "method_not_allowed",
                headers={"allow": "GET, POST, DELETE"},
            )
            return
        state = _guard_state(scope)
        if state is None:
            await send_error(send, "mcp", 500, "request was not checked by the policy", "unguarded")
            return
        identity: Identity = state.get("identity") or Identity.anonymous_identity()
        body = b""
        ids: list[str | int] = []
        try:
            if method == "POST":
                body = await read_body(receive, gw.config.max_body_bytes)
                ids = request_ids_of(body)
            auth = await gw.authenticate(scope)
            extra = await gw.mcp_headers(server, auth)
        except (ProtocolError, AuthError, UpstreamError) as exc:
            gw.audit_refusal(identity, f"{server}__*", "mcp", scope, exc)
            status, message, code, headers = _error_status(exc)
            await send_error(send, "mcp", status, message, code, request_ids=ids, headers=headers)
            return
        headers = forward_headers(scope["headers"], drop=_AGENT_ONLY_HEADERS)
        headers.update(extra)
        timeouts = cfg.timeouts or gw.config.timeouts
        timeout = timeout_of(timeouts)
        if method == "GET":
            # A GET stream may stay quiet for long; only connecting is bounded.
            timeout = httpx.Timeout(
                connect=timeouts.connect, read=None, write=timeouts.write, pool=timeouts.pool
            )
        query = scope.get("query_string", b"")
        request = gw.client.build_request(
            method,
            cfg.url + (("?" + query.decode("latin-1")) if query else ""),
            content=body if method == "POST" else None,
            headers=headers,
            timeout=timeout,
        )
        exchange = await relay(
            gw.client,
            request,
            send,
            protocol="mcp",
            what=f"MCP server {server!r}",
            scrubber=SecretScrubber(gw.secrets_of(extra)),
            max_body_bytes=gw.config.max_body_bytes * 4,
            request_ids=ids,
            keep_headers=_keep_mcp_header,
            receive=receive,
        )
        if method == "POST" or exchange.error is not None:
            gw.audit_exchange(identity, f"{server}__*", "mcp", scope, exchange, server=server)


def _keep_mcp_header(name: str) -> bool:
    return name not in ("set-cookie", "www-authenticate")


# ------------------------------------------------------------------ plain endpoints


def _models_endpoint(gw: Gateway) -> Callable[[Request], Any]:
    async def models(request: Request) -> Response:
        try:
            auth = await gw.authenticate(request.scope)
        except AuthError as exc:
            status, body = (
                exc.status,
                {
                    "error": {
                        "message": exc.message,
                        "type": "authentication_error",
                        "param": None,
                        "code": exc.code,
                    }
                },
            )
            return JSONResponse(body, status_code=status, headers=exc.headers)
        seen: dict[str, str] = {}
        for name, provider in gw.config.providers.items():
            candidates = [m for m in provider.models if not _is_glob(m)]
            if provider.protocol == "openai" and (
                not provider.models or any(map(_is_glob, provider.models))
            ):
                listed = await gw.upstream_models(name, provider)
                candidates += [
                    m
                    for m in listed
                    if not provider.models
                    or any(fnmatch.fnmatchcase(m, p) for p in provider.models)
                ]
            for model in candidates:
                seen.setdefault(model, name)
        for route in gw.config.routes:
            if not _is_glob(route.model):
                seen.setdefault(route.model, route.provider)
        data = []
        for model, default_provider in seen.items():
            provider_cfg = gw.config.providers[default_provider]
            decision = gw.policy.decide_model(
                auth.identity,
                ModelRequest(model, provider=default_provider, protocol=provider_cfg.protocol),
            )
            if decision.effect is not Effect.ALLOW:
                continue
            provider_name = decision.route or default_provider
            if auth.virtual_key is not None and not auth.virtual_key.allows_model(
                provider_name, model
            ):
                continue
            data.append({"id": model, "object": "model", "created": 0, "owned_by": provider_name})
        return JSONResponse({"object": "list", "data": data})

    return models


def _health_endpoint(gw: Gateway) -> Callable[[Request], Any]:
    async def healthz(request: Request) -> Response:
        audit_ok = gw.trail.healthy if gw.trail is not None else True
        body = {
            "status": "ok" if audit_ok else "degraded",
            "policy": {
                "rules": gw.policy.rule_count,
                "files": len(gw.policy.files),
                "last_reload_error": gw.policy_error,
            },
            "audit": {"healthy": audit_ok},
            "providers": sorted(gw.config.providers),
            "mcp": sorted(gw.config.mcp),
        }
        return JSONResponse(body, status_code=200 if audit_ok else 503)

    return healthz


def _approver_check(gw: Gateway) -> Callable[[Identity, Approval], bool]:
    cfg = gw.config.approvals
    groups = set(cfg.approver_groups)
    subjects = set(cfg.approver_subjects)

    def authorize(approver: Identity, approval: Approval) -> bool:
        if approver.anonymous:
            return False
        return approver.subject in subjects or bool(groups.intersection(approver.groups))

    return authorize


# ------------------------------------------------------------------ assembly


def _quarantine(config: GatewayConfig, environ: Mapping[str, str]) -> Any:
    if config.quarantine is None:
        return None
    from bastion.quarantine import Quarantine, QuarantineConfig

    q = config.quarantine
    return Quarantine(
        QuarantineConfig(
            base_url=q.base_url,
            model=q.model,
            api_key=environ.get(q.key_env) if q.key_env else None,
            timeout=q.timeout_seconds,
            max_rounds=q.max_rounds,
            headers=dict(q.headers),
        )
    )


def _audit(config: GatewayConfig, metrics: Any) -> Any:
    if not config.audit.sinks:
        return None
    from bastion.audit import ArgumentRedaction, AuditTrail, open_sink

    sinks = []
    for sink in config.audit.sinks:
        options: dict[str, Any] = {}
        if not str(sink.path).endswith((".db", ".sqlite", ".sqlite3")):
            options["fsync"] = sink.fsync
            if sink.max_bytes is not None:
                options["max_bytes"] = sink.max_bytes
            if sink.max_files is not None:
                options["max_files"] = sink.max_files
        sinks.append(open_sink(sink.path, **options))
    return AuditTrail(
        sinks,
        redaction=ArgumentRedaction(mode=config.audit.arguments),
        trace_sample_rate=config.audit.trace_sample_rate,
        on_overflow=config.audit.on_overflow,
        queue_size=config.audit.queue_size,
        metrics=metrics,
    )


def _metrics(config: GatewayConfig) -> Any:
    if not config.metrics:
        return None
    from bastion.audit.metrics import BastionMetrics

    return BastionMetrics()


def guard_routes(config: GatewayConfig) -> list[tuple[str, str | GuardRoute]]:
    """The paths the middleware guards and the protocol of each."""
    routes: list[tuple[str, str | GuardRoute]] = [
        ("/v1/chat/completions", "openai"),
        ("/v1/responses", "openai-responses"),
        ("/v1/messages", "anthropic"),
    ]
    if config.aggregate.enabled and config.mcp:
        routes.append(("/mcp", GuardRoute("mcp")))
    routes += [(f"/mcp/{name}", GuardRoute("mcp", server=name)) for name in config.mcp]
    return routes


def build_gateway(
    config: GatewayConfig,
    *,
    policy: Policy | None = None,
    environ: Mapping[str, str] | None = None,
) -> Gateway:
    """The gateway's services (raises ``PolicyError`` for a policy that does not load)."""
    env = environ if environ is not None else os.environ
    if policy is None:
        policy = Policy.load(config.policy.paths, schema=config.policy.schema_path)
    identity_config = config.identity.model_copy(update={"vault": None})
    client = make_client(config.pool, config.timeouts)
    metrics = _metrics(config)
    exchanger = (
        TokenExchanger(config.identity.token_exchange)
        if config.identity.token_exchange is not None
        else None
    )
    return Gateway(
        config=config,
        policy=policy,
        resolver=IdentityResolver(identity_config),
        vault=ProviderKeyVault(config.vault_config(), environ=env),
        session=SessionServices.open(
            None if config.session.store == "memory" else config.session.store
        ),
        client=client,
        exchanger=exchanger,
        quarantine=_quarantine(config, env),
        trail=_audit(config, metrics),
        metrics=metrics,
    )


def build_app(
    config: GatewayConfig,
    *,
    policy: Policy | None = None,
    environ: Mapping[str, str] | None = None,
    on_decision: Callable[[AuditEvent], None] | None = None,
) -> Starlette:
    """The gateway as a Starlette app (see the module docstring).

    ``policy`` replaces loading ``config.policy.paths``; ``environ`` replaces
    ``os.environ`` for provider keys; ``on_decision`` is called for every
    decision besides the configured audit. The gateway's state is
    ``app.state.gateway`` (a :class:`Gateway`).
    """
    gw = build_gateway(config, policy=policy, environ=environ)
    if on_decision is not None:
        gw.extra_hooks.append(on_decision)
    routes: list[BaseRoute] = [
        Route(
            "/v1/chat/completions",
            LLMProxy(gw, "openai", {"openai": "/chat/completions"}),
            methods=["POST"],
        ),
        Route(
            "/v1/responses", LLMProxy(gw, "responses", {"openai": "/responses"}), methods=["POST"]
        ),
        Route(
            "/v1/messages",
            LLMProxy(gw, "anthropic", {"anthropic": "/v1/messages"}),
            methods=["POST"],
        ),
        Route("/v1/models", _models_endpoint(gw), methods=["GET"]),
        Route("/healthz", _health_endpoint(gw), methods=["GET"]),
    ]
    if config.mcp:
        if config.aggregate.enabled:
            clients = {
                name: UpstreamMCPClient(
                    name,
                    server.url,
                    gw.client,
                    timeout=timeout_of(server.timeouts) if server.timeouts else None,
                    max_reply_bytes=config.max_body_bytes * 4,
                )
                for name, server in config.mcp.items()
            }

            def on_error(
                auth: Any, target: str, exc: UpstreamError | RemoteError | AuthError
            ) -> None:
                scope: Scope = {"method": "POST", "path": "/mcp"}
                if isinstance(exc, AuthError):
                    # e.g. the on-behalf-of exchange failed: the gateway refused.
                    gw.audit_refusal(auth.identity, target, "mcp", scope, exc)
                elif isinstance(exc, UpstreamError):
                    server, _, _ = target.partition("__")
                    gw.audit_exchange(
                        auth.identity, target, "mcp", scope, None, server=server, error=exc
                    )

            aggregate = AggregateMCP(
                clients,
                config=config.aggregate,
                authenticate=gw.authenticate,
                upstream_headers=gw.mcp_headers,
                max_body_bytes=config.max_body_bytes,
                on_error=on_error,
            )
            routes.append(Route("/mcp", aggregate, methods=["GET", "POST", "DELETE"]))
        routes.append(Route("/mcp/{server}", MCPProxy(gw), methods=["GET", "POST", "DELETE"]))
    if gw.metrics is not None:
        routes.append(gw.metrics.route("/metrics"))
    if gw.resolver.resource is not None:
        routes += gw.resolver.resource.routes()
    if config.approvals.enabled:

        async def approver(request: Request) -> Identity:
            return (await gw.authenticate(request.scope)).identity

        routes += approval_routes(
            gw.session.approvals, resolve_identity=approver, authorize=_approver_check(gw)
        )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if config.policy.watch:
            gw.policy.watch(config.policy.check_interval_seconds, on_reload=_reload_reporter(gw))
        if gw.metrics is not None and gw.trail is not None:
            trail = gw.trail
            gw.metrics.track_audit_queue(lambda: trail.stats().queued)
        try:
            yield
        finally:
            gw.policy.stop_watching()
            await gw.client.aclose()
            await gw.resolver.aclose()
            with contextlib.suppress(Exception):
                await gw.session.aclose()
            if gw.trail is not None:
                await gw.trail.aclose()

    middleware = [
        Middleware(
            cast(Any, BastionMiddleware),
            policy=gw.policy,
            identity=gw.resolver,
            routes=guard_routes(config),
            session=gw.session,
            quarantine=gw.quarantine,
            on_decision=gw.on_decision,
            refusal="text" if config.refusal.llm == "message" else "error",
            mcp_refusal=config.refusal.mcp,
            conversation_header=config.session.conversation_header,
            max_body_size=config.max_body_bytes,
            # Spans go to the global OpenTelemetry provider (a no-op until the
            # process configures an SDK, e.g. with opentelemetry-instrument).
            tracer=bastion_tracer(),
            audit_all=config.audit.all_decisions,
        )
    ]
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan)
    app.state.gateway = gw
    return app


def _reload_reporter(gw: Gateway) -> Callable[[PolicyError | None], None]:
    def report(error: PolicyError | None) -> None:
        if error is None:
            gw.policy_error = None
            log.info(
                "policy reloaded: %d rules from %d files",
                gw.policy.rule_count,
                len(gw.policy.files),
            )
        else:
            gw.policy_error = str(error).splitlines()[0] if str(error) else "reload failed"

    return report


def describe(app: Starlette) -> Iterable[str]:
    """What the app serves, as lines for the startup banner."""
    gw: Gateway = app.state.gateway
    config = gw.config
    yield f"policy: {gw.policy.rule_count} rules from {len(gw.policy.files)} files ({', '.join(str(p) for p in config.policy.paths)})"
    for name, provider in config.providers.items():
        yield f"provider {name}: {provider.kind} at {provider.base_url}"
    for name, server in config.mcp.items():
        obo = " (on behalf of the user)" if server.on_behalf_of else ""
        yield f"mcp upstream {name}: {server.url}{obo}"
    endpoints = [
        "POST /v1/chat/completions",
        "POST /v1/responses",
        "POST /v1/messages",
        "GET /v1/models",
    ]
    if config.mcp and config.aggregate.enabled:
        endpoints.append("/mcp (aggregated: " + ", ".join(f"{n}__*" for n in config.mcp) + ")")
    endpoints += [f"/mcp/{name}" for name in config.mcp]
    endpoints.append("GET /healthz")
    if gw.metrics is not None:
        endpoints.append("GET /metrics")
    if gw.resolver.resource is not None:
        endpoints += [f"GET {p}" for p in gw.resolver.resource.paths]
    if config.approvals.enabled:
        endpoints.append("/approvals")
    for endpoint in endpoints:
        yield f"endpoint {endpoint}"
    sinks = ", ".join(str(s.path) for s in config.audit.sinks) or "none (decisions are only logged)"
    yield f"audit: {sinks}"
    yield f"session store: {'memory' if config.session.store == 'memory' else 'redis'}"
