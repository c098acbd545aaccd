"""JWT bearer tokens verified against each issuer's JWKS.

The issuer is chosen by the unverified ``iss`` claim; everything after that is
strict: the header's ``alg`` must be in that issuer's allowlist (asymmetric
only), the key is found by ``kid`` in the issuer's JWKS and must fit the
algorithm, and ``exp`` (required), ``nbf``, ``iat``, ``iss`` and ``aud`` are
enforced with the issuer's leeway. Header parameters that point at keys
(``jku``, ``x5u``, ``jwk``) are ignored, and ``crit`` is refused.
"""

from __future__ import annotations

import asyncio
import logging
import time
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import jwt

from bastion.errors import AuthError, IdentityUnavailable
from bastion.events import Identity
from bastion.identity.config import ClaimMapping, IssuerConfig

__all__ = ["JWKSCache", "JWTVerifier", "SigningKey", "VerifiedToken"]

log = logging.getLogger("bastion.identity.jwt")

# alg -> (kty, allowed curves or None for any of that kty)
_ALG_KEYS: dict[str, tuple[str, frozenset[str] | None]] = {
    **{alg: ("RSA", None) for alg in ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")},
    "ES256": ("EC", frozenset({"P-256"})),
    "ES384": ("EC", frozenset({"P-384"})),
    "ES512": ("EC", frozenset({"P-521"})),
    "EdDSA": ("OKP", frozenset({"Ed25519", "Ed448"})),
}


def _invalid(message: str) -> AuthError:
    return AuthError(message, code="invalid_token")


@dataclass(frozen=True, slots=True)
class SigningKey:
    """One usable public key from a JWKS."""

    kid: str | None
    kty: str
    crv: str | None
    alg: str | None
    key: Any

    def fits(self, alg: str) -> bool:
        """True when this key may verify a signature made with ``alg``."""
        expected = _ALG_KEYS.get(alg)
        if expected is None or expected[0] != self.kty:
            return False
        if expected[1] is not None and self.crv not in expected[1]:
            return False
        return self.alg is None or self.alg == alg


def parse_jwks(document: Any) -> dict[str | None, SigningKey]:
    """The signature keys in a JWKS document; symmetric and unusable keys are skipped."""
    if not isinstance(document, Mapping) or not isinstance(document.get("keys"), list):
        raise ValueError("a JWKS document is an object with a 'keys' list")
    keys: dict[str | None, SigningKey] = {}
    for entry in document["keys"]:
        if not isinstance(entry, Mapping):
            continue
        kty = entry.get("kty")
        if kty not in ("RSA", "EC", "OKP") or entry.get("use", "sig") != "sig":
            continue
        kid = entry.get("kid")
        if kid is not None and not isinstance(kid, str):
            continue
        try:
            parsed = jwt.PyJWK(dict(entry))
        except jwt.PyJWTError as exc:
            log.warning("skipping JWKS key %r: %s", kid, exc)
            continue
        alg = entry.get("alg")
        keys[kid] = SigningKey(
            kid=kid,
            kty=kty,
            crv=entry.get("crv"),
            alg=alg if isinstance(alg, str) else None,
            key=parsed.key,
        )
    return keys


class JWKSCache:
    """One issuer's keys: fetched over HTTP, cached with a TTL, refetched on an unknown kid.

    Every fetch (first load, TTL refresh, unknown ``kid``, retry after failure) is
    rate-limited to one per ``jwks_refetch_interval_seconds``; concurrent callers
    share one in-flight fetch.
    """

    def __init__(
        self,
        config: IssuerConfig,
        client: Callable[[], httpx.AsyncClient],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._client = client
        self._clock = clock
        self._keys: dict[str | None, SigningKey] | None = None
        self._fetched_at = 0.0
        self._last_attempt: float | None = None
        self._inflight: asyncio.Task[None] | None = None
        self.fetches = 0
        if config.jwks is not None:
            self._keys = parse_jwks(config.jwks)

    async def key_for(self, kid: str | None, alg: str) -> SigningKey:
        """The key that must verify a token with this ``kid`` and ``alg``."""
        if self.config.jwks is not None:
            return self._pick(kid, alg)
        now = self._clock()
        fresh = (
            self._keys is not None and now - self._fetched_at < self.config.jwks_cache_ttl_seconds
        )
        if fresh:
            found = self._find(kid, alg)
            if found is not None:
                return found
            if self._may_fetch(now):
                await self._refresh()
            return self._pick(kid, alg)
        if self._may_fetch(now):
            try:
                await self._refresh()
            except IdentityUnavailable:
                if not self._stale_usable(now):
                    raise
                log.warning(
                    "JWKS refresh for %s failed; using keys from the last fetch", self.config.issuer
                )
        elif not self._stale_usable(now):
            raise IdentityUnavailable(
                f"signing keys of {self.config.issuer} are unavailable (JWKS fetch failed recently)"
            )
        return self._pick(kid, alg)

    def _may_fetch(self, now: float) -> bool:
        if self._inflight is not None and not self._inflight.done():
            return True
        return (
            self._last_attempt is None
            or now - self._last_attempt >= self.config.jwks_refetch_interval_seconds
        )

    def _stale_usable(self, now: float) -> bool:
        limit = self.config.jwks_cache_ttl_seconds + self.config.jwks_stale_if_error_seconds
        return self._keys is not None and now - self._fetched_at < limit

    def _find(self, kid: str | None, alg: str) -> SigningKey | None:
        keys = self._keys or {}
        if kid is not None:
            return keys.get(kid)
        candidates = [k for k in keys.values() if k.fits(alg)]
        return candidates[0] if len(candidates) == 1 else None

    def _pick(self, kid: str | None, alg: str) -> SigningKey:
        found = self._find(kid, alg)
        if found is None:
            if kid is None:
                raise _invalid("token has no kid and the issuer has no single key for its alg")
            raise _invalid(f"unknown signing key id {kid!r} for issuer {self.config.issuer}")
        if not found.fits(alg):
            raise _invalid(f"signing key {kid!r} does not fit algorithm {alg}")
        return found

    async def _refresh(self) -> None:
        task = self._inflight
        loop = asyncio.get_running_loop()
        if task is None or task.done() or task.get_loop() is not loop:
            task = loop.create_task(self._fetch())
            self._inflight = task
        # shield: one caller giving up must not cancel the fetch the others wait on
        await asyncio.shield(task)

    async def _fetch(self) -> None:
        url = self.config.jwks_url
        assert url is not None
        self._last_attempt = self._clock()
        self.fetches += 1
        try:
            response = await self._client().get(
                url,
                headers={"accept": "application/json"},
                timeout=self.config.jwks_timeout_seconds,
            )
            if response.status_code != 200:
                raise ValueError(f"HTTP {response.status_code}")
            if len(response.content) > self.config.jwks_max_bytes:
                raise ValueError("JWKS document too large")
            keys = parse_jwks(response.json())
        except (httpx.HTTPError, ValueError) as exc:
            log.error("JWKS fetch for issuer %s from %s failed: %s", self.config.issuer, url, exc)
            raise IdentityUnavailable(
                f"signing keys of {self.config.issuer} are unavailable"
            ) from exc
        self._keys = keys
        self._fetched_at = self._clock()
        log.info("fetched %d signing keys for issuer %s", len(keys), self.config.issuer)


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    """A token that verified: the identity it stands for and when it expires."""

    identity: Identity
    expires_at: float
    claims: Mapping[str, Any]


def _claim(claims: Mapping[str, Any], path: str) -> Any:
    if path in claims:
        return claims[path]
    node: Any = claims
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _first(claims: Mapping[str, Any], paths: Sequence[str]) -> Any:
    for path in paths:
        value = _claim(claims, path)
        if value is not None:
            return value
    return None


def _strings(value: Any, *, split: bool = False) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(value.split()) if split else (value,)
    if isinstance(value, list | tuple):
        return tuple(str(v) for v in value if isinstance(v, str | int | float | bool))
    return ()


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return types.MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value


def map_claims(claims: Mapping[str, Any], mapping: ClaimMapping, issuer: str) -> Identity:
    """Build an :class:`Identity` from verified claims according to ``mapping``."""
    subject = _claim(claims, mapping.subject)
    if not isinstance(subject, str) or not subject:
        raise _invalid(f"token has no usable subject claim {mapping.subject!r}")
    attributes = {
        name: _freeze(value)
        for name, path in mapping.attributes.items()
        if (value := _claim(claims, path)) is not None
    }
    return Identity(
        subject=subject,
        groups=_strings(_first(claims, mapping.groups)),
        roles=_strings(_first(claims, mapping.roles)),
        email=_text(_first(claims, mapping.email)),
        tenant=_text(_first(claims, mapping.tenant)),
        issuer=issuer,
        scopes=_strings(_first(claims, mapping.scopes), split=True),
        auth_method="jwt",
        attributes=types.MappingProxyType(attributes),
    )


class JWTVerifier:
    """Verifies bearer JWTs from any of the configured issuers."""

    def __init__(
        self,
        issuers: Sequence[IssuerConfig],
        client: Callable[[], httpx.AsyncClient],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.issuers = {config.issuer: config for config in issuers}
        self.jwks = {config.issuer: JWKSCache(config, client, clock=clock) for config in issuers}

    async def verify(self, token: str) -> VerifiedToken:
        """Verify ``token`` strictly; ``AuthError`` (401) or ``IdentityUnavailable`` (503)."""
        try:
            unverified = jwt.api_jwt.decode_complete(token, options={"verify_signature": False})
        except (jwt.PyJWTError, ValueError, TypeError) as exc:
            raise _invalid("malformed token") from exc
        header = unverified["header"]
        claims = unverified["payload"]
        if not isinstance(header, dict) or not isinstance(claims, dict):
            raise _invalid("malformed token")
        alg = header.get("alg")
        if not isinstance(alg, str):
            raise _invalid("token header has no alg")
        if "crit" in header:
            raise _invalid("token header has critical extensions Bastion does not understand")
        issuer = claims.get("iss")
        config = self.issuers.get(issuer) if isinstance(issuer, str) else None
        if config is None or not isinstance(issuer, str):
            raise _invalid("token issuer is not trusted")
        if alg not in config.algorithms:
            raise _invalid(f"algorithm {alg!r} is not allowed for issuer {issuer}")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise _invalid("token header kid is not a string")
        key = await self.jwks[issuer].key_for(kid, alg)
        try:
            verified = jwt.decode(
                token,
                key.key,
                algorithms=[alg],
                audience=config.audiences,
                issuer=issuer,
                leeway=config.leeway_seconds,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise _invalid("token has expired") from exc
        except jwt.ImmatureSignatureError as exc:
            raise _invalid("token is not yet valid") from exc
        except jwt.InvalidAudienceError as exc:
            raise _invalid("token audience is not accepted") from exc
        except jwt.InvalidIssuerError as exc:
            raise _invalid("token issuer is not trusted") from exc
        except jwt.MissingRequiredClaimError as exc:
            raise _invalid(f"token lacks the required claim {exc.claim!r}") from exc
        except jwt.InvalidSignatureError as exc:
            raise _invalid("token signature does not verify") from exc
        except (jwt.PyJWTError, ValueError, TypeError) as exc:
            raise _invalid("token is invalid") from exc
        identity = map_claims(verified, config.claims, issuer)
        return VerifiedToken(identity=identity, expires_at=float(verified["exp"]), claims=verified)
