"""On-behalf-of: RFC 8693 token exchange for upstream MCP servers.

The user's token is exchanged at the configured token endpoint for one whose
audience is the upstream server, so the tool runs with the user's permissions.
Results are cached per (user token hash, audience, scope) until the issued
token's expiry minus a skew; concurrent requests for the same key share one
exchange. Any failure is ``IdentityUnavailable`` (503): there is deliberately
no fallback to a service credential.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from bastion.errors import IdentityUnavailable
from bastion.identity.config import TokenExchangeConfig

__all__ = ["TOKEN_EXCHANGE_GRANT", "ExchangedToken", "TokenExchanger"]

log = logging.getLogger("bastion.identity.exchange")

TOKEN_EXCHANGE_GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"


@dataclass(frozen=True, slots=True)
class ExchangedToken:
    """A downstream token; ``access_token`` stays out of repr."""

    access_token: str = field(repr=False)
    token_type: str
    audience: str
    expires_at: float | None
    issued_token_type: str | None = None

    def authorization(self) -> str:
        """The ``Authorization`` header value to send upstream."""
        return f"Bearer {self.access_token}"


_CacheKey = tuple[bytes, str, str | None]


class TokenExchanger:
    """Exchanges user tokens for audience-bound downstream tokens (RFC 8693)."""

    def __init__(
        self,
        config: TokenExchangeConfig,
        *,
        http_client: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self._client = http_client
        self._owns_client = http_client is None
        self._clock = clock
        self._cache: dict[_CacheKey, ExchangedToken] = {}
        self._inflight: dict[_CacheKey, asyncio.Task[ExchangedToken]] = {}
        self.exchanges = 0

    async def exchange(
        self, subject_token: str, audience: str, *, scope: str | None = None
    ) -> ExchangedToken:
        """A token for ``audience`` on behalf of the holder of ``subject_token``."""
        scope = scope if scope is not None else self.config.scope
        key: _CacheKey = (hashlib.sha256(subject_token.encode()).digest(), audience, scope)
        cached = self._cache.get(key)
        skew = self.config.expiry_skew_seconds
        if cached is not None and cached.expires_at is not None:
            if self._clock() < cached.expires_at - skew:
                return cached
            del self._cache[key]
        loop = asyncio.get_running_loop()
        task = self._inflight.get(key)
        if task is None or task.done() or task.get_loop() is not loop:
            task = loop.create_task(self._exchange(key, subject_token, audience, scope))
            self._inflight[key] = task
            task.add_done_callback(functools.partial(self._forget, key))
        return await asyncio.shield(task)

    def _forget(self, key: _CacheKey, task: asyncio.Task[ExchangedToken]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]

    async def _exchange(
        self, key: _CacheKey, subject_token: str, audience: str, scope: str | None
    ) -> ExchangedToken:
        config = self.config
        form = {
            "grant_type": TOKEN_EXCHANGE_GRANT,
            "subject_token": subject_token,
            "subject_token_type": config.subject_token_type,
            "audience": audience,
        }
        if config.requested_token_type:
            form["requested_token_type"] = config.requested_token_type
        if scope:
            form["scope"] = scope
        secret = config.client_secret.get_secret_value()
        auth: httpx.BasicAuth | None = None
        if config.client_auth == "client_secret_basic":
            auth = httpx.BasicAuth(config.client_id, secret)
        else:
            form["client_id"] = config.client_id
            form["client_secret"] = secret
        self.exchanges += 1
        try:
            response = await self._http().post(
                config.token_endpoint,
                data=form,
                auth=auth if auth is not None else httpx.USE_CLIENT_DEFAULT,
                headers={"accept": "application/json"},
                timeout=config.timeout_seconds,
            )
            body: Any = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            log.error("token exchange for audience %s failed: %s", audience, type(exc).__name__)
            raise IdentityUnavailable(f"token exchange for {audience} failed") from exc
        if response.status_code != 200 or not isinstance(body, dict):
            error = body.get("error") if isinstance(body, dict) else None
            log.error(
                "token exchange for audience %s refused: HTTP %s %s",
                audience,
                response.status_code,
                error or "",
            )
            detail = f" ({error})" if isinstance(error, str) else ""
            raise IdentityUnavailable(f"token exchange for {audience} was refused{detail}")
        token = body.get("access_token")
        token_type = body.get("token_type", "Bearer")
        expires_in = body.get("expires_in")
        if not isinstance(token, str) or not token or not isinstance(token_type, str):
            raise IdentityUnavailable(f"token exchange for {audience} returned no usable token")
        if token_type.lower() != "bearer":
            raise IdentityUnavailable(
                f"token exchange for {audience} returned an unsupported token type"
            )
        now = self._clock()
        expires_at: float | None = None
        if isinstance(expires_in, int | float) and not isinstance(expires_in, bool):
            expires_at = now + min(
                float(expires_in), config.max_cache_seconds + config.expiry_skew_seconds
            )
        issued = body.get("issued_token_type")
        result = ExchangedToken(
            access_token=token,
            token_type="Bearer",
            audience=audience,
            expires_at=expires_at,
            issued_token_type=issued if isinstance(issued, str) else None,
        )
        # Without expires_in the lifetime is unknown: use it once, never cache it.
        if expires_at is not None and expires_at - config.expiry_skew_seconds > now:
            self._store(key, result)
        return result

    def _store(self, key: _CacheKey, token: ExchangedToken) -> None:
        if len(self._cache) >= self.config.cache_size:
            now = self._clock()
            for stale in [k for k, v in self._cache.items() if (v.expires_at or 0) <= now]:
                del self._cache[stale]
            while len(self._cache) >= self.config.cache_size:
                del self._cache[next(iter(self._cache))]
        self._cache[key] = token

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient()
        return self._client

    async def aclose(self) -> None:
        """Close the HTTP client if this exchanger created it."""
        if self._owns_client and self._client is not None:
            await self._client.aclose()
            self._client = None
