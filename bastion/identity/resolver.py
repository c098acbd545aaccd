"""Turn a request's credential headers into an :class:`~bastion.events.Identity`, once."""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import httpx

from bastion.errors import AuthError, IdentityUnavailable
from bastion.events import Identity
from bastion.identity.config import IdentityConfig
from bastion.identity.keys import KeyStore, VirtualKey
from bastion.identity.oauth import ProtectedResourceMetadata, bearer_challenge
from bastion.identity.tokens import JWTVerifier

__all__ = ["Authentication", "IdentityResolver", "credential_headers"]

log = logging.getLogger("bastion.identity")

_JWT_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_TOKEN68 = re.compile(r"[A-Za-z0-9._~+/-]+=*")
_CREDENTIAL_NAMES = (b"authorization", b"x-api-key")


@dataclass(frozen=True, slots=True)
class Authentication:
    """What authenticating one request established.

    ``identity`` goes to the policy and the audit; ``virtual_key`` is set for API
    and virtual keys (enforce its model grant with ``check_model``); ``token`` is
    the verified bearer JWT, kept for on-behalf-of token exchange (never in repr).
    """

    identity: Identity
    virtual_key: VirtualKey | None = None
    token: str | None = field(default=None, repr=False)
    expires_at: float | None = None

    def check_model(self, provider: str | None, model: str) -> None:
        """``AuthError`` 403 when a virtual key may not use this model; no-op otherwise."""
        if self.virtual_key is not None:
            self.virtual_key.check_model(provider, model)


_ANONYMOUS = Authentication(identity=Identity.anonymous_identity())


def credential_headers(raw: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    """Pick the credential headers out of ASGI ``scope["headers"]``.

    Refuses (401) a repeated ``Authorization`` or ``x-api-key``: two credentials
    in one request are ambiguous, and whichever one a later hop reads could
    differ from the one checked here.
    """
    out: dict[str, str] = {}
    for name, value in raw:
        lowered = name.lower()
        if lowered in _CREDENTIAL_NAMES:
            key = lowered.decode("latin-1")
            if key in out:
                raise AuthError(f"more than one {key} header", code="invalid_request")
            out[key] = value.decode("latin-1")
    return out


class IdentityResolver:
    """Resolves credentials to an identity: JWT bearer, API key or virtual key.

    Credential rule: ``Authorization: Bearer <credential>`` or ``x-api-key:
    <credential>`` (if both are present they must carry the same value). A
    credential starting with the key prefix (``bst_``) is an API/virtual key;
    one shaped ``header.payload.signature`` (base64url) is a JWT; anything else is
    refused. No credential at all is refused too, unless ``allow_anonymous``.
    """

    def __init__(
        self,
        config: IdentityConfig | None = None,
        *,
        keys: KeyStore | None = None,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        self.config = config = config or IdentityConfig()
        if keys is None and (config.key_file is not None or config.keys):
            keys = KeyStore(
                config.key_file,
                config.keys,
                check_interval=config.key_check_interval_seconds,
                prefix=config.key_prefix,
            )
        self.keys = keys
        self._http = http_client
        self._owns_http = http_client is None
        self.jwt = JWTVerifier(config.issuers, self._client)
        self.resource = ProtectedResourceMetadata(config.resource) if config.resource else None
        self._cache: dict[bytes, tuple[float, Authentication]] = {}
        self._required_scopes = frozenset(
            config.resource.required_scopes if config.resource else ()
        )
        self._prefix = config.key_prefix
        self._max = config.max_token_bytes

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(follow_redirects=False)
        return self._http

    async def aclose(self) -> None:
        """Close the HTTP client if the resolver created it."""
        if self._owns_http and self._http is not None:
            await self._http.aclose()
            self._http = None

    async def resolve(self, headers: Mapping[str, str]) -> Identity:
        """The identity of the request; see :meth:`authenticate`."""
        return (await self.authenticate(headers)).identity

    async def authenticate(self, headers: Mapping[str, str]) -> Authentication:
        """Authenticate one request from its (lower-case) headers.

        Raises ``AuthError`` (401, with ``WWW-Authenticate``) for a missing or bad
        credential and ``IdentityUnavailable`` (503) when a dependency (JWKS, key
        file) is down. Call it once per request and keep the result.
        """
        credential = self._credential(headers)
        if credential is None:
            if self.config.allow_anonymous:
                return _ANONYMOUS
            raise self._unauthorized("no credential presented", presented=False)
        try:
            if credential.startswith(self._prefix):
                return self._key(credential)
            if _JWT_SHAPE.fullmatch(credential):
                auth = await self._bearer(credential)
                if self._required_scopes and not self._required_scopes.issubset(
                    auth.identity.scopes
                ):
                    raise self._insufficient_scope()
                return auth
            raise AuthError("unrecognised credential", code="invalid_token")
        except IdentityUnavailable:
            raise
        except AuthError as exc:
            if exc.status == 401:
                raise self._unauthorized(exc.message, presented=True, code=exc.code) from exc
            raise

    def _credential(self, headers: Mapping[str, str]) -> str | None:
        authorization = headers.get("authorization")
        api_key = headers.get("x-api-key")
        bearer: str | None = None
        if authorization is not None:
            if len(authorization) > self._max + 7:
                raise self._unauthorized("credential too large", presented=True)
            scheme, _, value = authorization.strip().partition(" ")
            value = value.strip()
            if scheme.lower() != "bearer" or not value:
                raise self._unauthorized(
                    "Authorization must be 'Bearer <token>'", presented=True, code="invalid_request"
                )
            bearer = value
        if api_key is not None:
            api_key = api_key.strip()
            if not api_key:
                raise self._unauthorized("empty x-api-key", presented=True, code="invalid_request")
        if bearer is not None and api_key is not None and bearer != api_key:
            raise self._unauthorized(
                "Authorization and x-api-key carry different credentials",
                presented=True,
                code="invalid_request",
            )
        credential = bearer if bearer is not None else api_key
        if credential is None:
            return None
        if len(credential) > self._max:
            raise self._unauthorized("credential too large", presented=True)
        if not _TOKEN68.fullmatch(credential):
            raise self._unauthorized("malformed credential", presented=True, code="invalid_request")
        return credential

    def _key(self, secret: str) -> Authentication:
        if self.keys is None:
            raise AuthError("API keys are not configured", code="invalid_key")
        key = self.keys.authenticate(secret)
        return Authentication(identity=key.identity, virtual_key=key, expires_at=key.expires_at)

    async def _bearer(self, token: str) -> Authentication:
        digest = hashlib.sha256(token.encode("ascii")).digest()
        cached = self._cache.get(digest)
        if cached is not None:
            if time.time() < cached[0]:
                return cached[1]
            del self._cache[digest]
        if not self.jwt.issuers:
            raise AuthError("JWT bearer tokens are not configured", code="invalid_token")
        verified = await self.jwt.verify(token)
        result = Authentication(
            identity=verified.identity, token=token, expires_at=verified.expires_at
        )
        if self.config.verified_cache_seconds > 0:
            deadline = min(verified.expires_at, time.time() + self.config.verified_cache_seconds)
            self._remember(digest, deadline, result)
        return result

    def _remember(self, digest: bytes, deadline: float, auth: Authentication) -> None:
        cache = self._cache
        if len(cache) >= self.config.verified_cache_size:
            now = time.time()
            for stale in [k for k, (until, _) in cache.items() if until <= now]:
                del cache[stale]
            # Still full: drop the oldest half in insertion order (cheap, amortised).
            if len(cache) >= self.config.verified_cache_size:
                for old in list(cache)[: max(1, len(cache) // 2)]:
                    del cache[old]
        cache[digest] = (deadline, auth)

    def challenge(
        self, *, error: str | None = None, description: str | None = None
    ) -> dict[str, str]:
        """The ``WWW-Authenticate`` header for a 401 answer."""
        if self.resource is not None:
            value = self.resource.challenge(error=error, description=description)
        else:
            value = bearer_challenge(error=error, description=description)
        return {"WWW-Authenticate": value}

    def _insufficient_scope(self) -> AuthError:
        scope = " ".join(sorted(self._required_scopes))
        assert self.resource is not None
        challenge = self.resource.challenge(
            error="insufficient_scope", description="the token lacks a required scope", scope=scope
        )
        return AuthError(
            f"the token lacks a required scope ({scope})",
            status=403,
            code="insufficient_scope",
            headers={"WWW-Authenticate": challenge},
        )

    def _unauthorized(
        self, message: str, *, presented: bool, code: str = "invalid_token"
    ) -> AuthError:
        if presented:
            error = "invalid_request" if code == "invalid_request" else "invalid_token"
            headers = self.challenge(error=error, description=message)
        else:
            code = "unauthorized"
            headers = self.challenge()
        return AuthError(message, status=401, code=code, headers=headers)
