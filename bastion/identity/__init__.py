"""Identity: who is calling, and the credentials Bastion holds on their behalf.

Integration (the ASGI middleware and the gateway)::

    from bastion.identity import IdentityConfig, IdentityResolver, credential_headers

    resolver = IdentityResolver(IdentityConfig.model_validate(cfg["identity"]))
    try:
        auth = await resolver.authenticate(credential_headers(scope["headers"]))
    except AuthError as exc:          # 401/403; IdentityUnavailable (a subclass) is 503
        ...answer exc.status with exc.headers (WWW-Authenticate) and audit exc.code
    auth.identity                     # bastion.events.Identity, for the policy and the audit
    auth.check_model(provider, model) # 403 when a virtual key may not use that model
    auth.token                        # the verified JWT, for on-behalf-of exchange

Resolve once per request and keep the :class:`Authentication`. Credentials are
``Authorization: Bearer <jwt|key>`` or ``x-api-key: <jwt|key>``; a key starts
with the configured prefix (``bst_``), a JWT is three base64url segments.
Without any credential the request is refused (401) unless
``allow_anonymous`` is set; a credential that fails is always refused, never
downgraded to anonymous.

- JWTs: :class:`IssuerConfig` per issuer (JWKS URL, audiences, asymmetric
  algorithm allowlist, leeway, :class:`ClaimMapping`). Verification results are
  cached by token hash until ``min(exp, now + verified_cache_seconds)``, so an
  issuer's key removal takes up to that long to reach tokens already seen.
- Keys: :class:`KeyStore` over a YAML key file (reloaded on change; an invalid
  file keeps the last good version and logs an error, no good version -> 503)
  and/or programmatic :class:`KeyEntry` values. ``bastion keys`` is
  :func:`main` (``create`` / ``list`` / ``revoke``).
- Provider keys: :class:`ProviderKeyVault`. Per upstream request::

      headers, key = vault.inject(provider, agent_headers)  # agent credential removed
      audit_detail["provider_key"] = key.fingerprint         # never the key itself

- OAuth resource server (MCP): ``resolver.resource`` is a
  :class:`ProtectedResourceMetadata` when ``IdentityConfig.resource`` is set;
  mount ``resolver.resource.routes()`` at the host root; 401 answers then carry
  ``WWW-Authenticate: Bearer resource_metadata="..."``.
- On-behalf-of: :class:`TokenExchanger` (RFC 8693);
  ``(await exchanger.exchange(auth.token, audience)).authorization()`` is the
  upstream ``Authorization`` value. Failure is 503, never a service credential.

The resolver does not build the vault or the exchanger: construct them from
``IdentityConfig.vault`` / ``IdentityConfig.token_exchange`` where they are used
(``ProviderKeyVault(config.vault)``, ``TokenExchanger(config.token_exchange)``).
"""

from __future__ import annotations

from bastion.identity.cli import main
from bastion.identity.config import (
    ClaimMapping,
    IdentityConfig,
    IssuerConfig,
    KeyEntry,
    KeyFile,
    ProtectedResourceConfig,
    ProviderKind,
    ProviderSource,
    TokenExchangeConfig,
    VaultConfig,
)
from bastion.identity.exchange import ExchangedToken, TokenExchanger
from bastion.identity.keys import (
    KeyStore,
    VirtualKey,
    check_model_access,
    generate_secret,
    hash_secret,
)
from bastion.identity.oauth import WELL_KNOWN_PATH, ProtectedResourceMetadata, bearer_challenge
from bastion.identity.resolver import Authentication, IdentityResolver, credential_headers
from bastion.identity.tokens import JWKSCache, JWTVerifier
from bastion.identity.vault import ProviderKey, ProviderKeyVault, fingerprint

__all__ = [
    "WELL_KNOWN_PATH",
    "Authentication",
    "ClaimMapping",
    "ExchangedToken",
    "IdentityConfig",
    "IdentityResolver",
    "IssuerConfig",
    "JWKSCache",
    "JWTVerifier",
    "KeyEntry",
    "KeyFile",
    "KeyStore",
    "ProtectedResourceConfig",
    "ProtectedResourceMetadata",
    "ProviderKey",
    "ProviderKeyVault",
    "ProviderKind",
    "ProviderSource",
    "TokenExchangeConfig",
    "TokenExchanger",
    "VaultConfig",
    "VirtualKey",
    "bearer_challenge",
    "check_model_access",
    "credential_headers",
    "fingerprint",
    "generate_secret",
    "hash_secret",
    "main",
]
