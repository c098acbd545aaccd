"""Configuration models for the identity layer (validated at the edge with pydantic).

The gateway embeds :class:`IdentityConfig` under ``identity:`` in its YAML; the key
file (:class:`KeyFile`) and the provider secrets file are separate documents so
they can have tighter file permissions than the main configuration.
"""

from __future__ import annotations

import enum
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

__all__ = [
    "ACCESS_TOKEN_TYPE",
    "ASYMMETRIC_ALGORITHMS",
    "ClaimMapping",
    "IdentityConfig",
    "IssuerConfig",
    "KeyEntry",
    "KeyFile",
    "ProtectedResourceConfig",
    "ProviderKind",
    "ProviderSource",
    "TokenExchangeConfig",
    "VaultConfig",
]

ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"

# Only asymmetric signatures: a JWKS publishes public keys, and accepting an HMAC
# algorithm would let anyone holding the public key mint tokens.
ASYMMETRIC_ALGORITHMS = frozenset(
    {
        "RS256",
        "RS384",
        "RS512",
        "PS256",
        "PS384",
        "PS512",
        "ES256",
        "ES384",
        "ES512",
        "EdDSA",
    }
)

KEY_ID_PATTERN = r"^[a-z0-9]{6,32}$"
KEY_HASH_PATTERN = r"^sha256:[0-9a-f]{64}$"


def _as_list(value: Any) -> Any:
    if isinstance(value, str):
        return [value]
    return value


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ClaimMapping(_Model):
    """Where each identity field comes from in a token's claims.

    Each entry is a list of claim paths tried in order; the first present one wins.
    A path is a claim name or a dotted path into nested objects
    (``realm_access.roles``); a claim whose name itself contains dots (URL-style
    claims) is matched literally first.
    """

    subject: str = "sub"
    groups: list[str] = ["groups"]
    roles: list[str] = ["roles"]
    email: list[str] = ["email"]
    tenant: list[str] = ["tenant", "tid"]
    scopes: list[str] = ["scope", "scp"]
    attributes: dict[str, str] = Field(
        default_factory=dict,
        description="identity attribute name -> claim path, for any further claim",
    )

    _lists = field_validator("groups", "roles", "email", "tenant", "scopes", mode="before")(
        _as_list
    )


class IssuerConfig(_Model):
    """One trusted token issuer: where its keys are and what its tokens must say."""

    issuer: str
    jwks_url: str | None = None
    jwks: dict[str, Any] | None = Field(
        default=None, description="a static JWKS document instead of jwks_url"
    )
    audiences: list[str] = Field(min_length=1)
    algorithms: list[str] = ["RS256", "ES256"]
    leeway_seconds: float = Field(default=30.0, ge=0, le=300)
    claims: ClaimMapping = ClaimMapping()
    jwks_cache_ttl_seconds: float = Field(default=300.0, gt=0)
    jwks_refetch_interval_seconds: float = Field(
        default=30.0,
        ge=0,
        description="at most one JWKS fetch per this many seconds (unknown kid, or retry after a failure)",
    )
    jwks_stale_if_error_seconds: float = Field(
        default=0.0,
        ge=0,
        description="keep using expired JWKS keys this long when a refresh fails (0: fail closed)",
    )
    jwks_timeout_seconds: float = Field(default=5.0, gt=0)
    jwks_max_bytes: int = Field(default=1_000_000, gt=0)

    _audiences = field_validator("audiences", mode="before")(_as_list)

    @field_validator("algorithms")
    @classmethod
    def _only_asymmetric(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one algorithm is required")
        for alg in value:
            if alg not in ASYMMETRIC_ALGORITHMS:
                raise ValueError(
                    f"algorithm {alg!r} is not allowed; choose from {sorted(ASYMMETRIC_ALGORITHMS)} "
                    "(none and HMAC algorithms are always refused)"
                )
        return value

    @model_validator(mode="after")
    def _one_key_source(self) -> IssuerConfig:
        if (self.jwks_url is None) == (self.jwks is None):
            raise ValueError(f"issuer {self.issuer!r}: give exactly one of jwks_url or jwks")
        if self.jwks_url is not None and urlsplit(self.jwks_url).scheme not in ("http", "https"):
            raise ValueError(f"issuer {self.issuer!r}: jwks_url must be an http(s) URL")
        return self


class ProtectedResourceConfig(_Model):
    """Bastion as an OAuth 2.1 protected resource (RFC 9728), as MCP expects."""

    resource: str = Field(
        description="this resource's identifier, e.g. https://bastion.example/mcp"
    )
    authorization_servers: list[str] = Field(min_length=1)
    scopes_supported: list[str] = []
    bearer_methods_supported: list[str] = ["header"]
    required_scopes: list[str] = Field(
        default=[],
        description="scopes every bearer JWT must carry (403 insufficient_scope otherwise); keys are exempt",
    )
    resource_name: str | None = None
    resource_documentation: str | None = None
    metadata_url: str | None = Field(
        default=None, description="override the derived /.well-known/oauth-protected-resource URL"
    )

    @field_validator("resource")
    @classmethod
    def _absolute(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.fragment:
            raise ValueError("resource must be an absolute http(s) URL without a fragment")
        return value


class TokenExchangeConfig(_Model):
    """RFC 8693 token exchange for on-behalf-of calls to upstream servers."""

    token_endpoint: str
    client_id: str
    client_secret: SecretStr
    client_auth: Literal["client_secret_basic", "client_secret_post"] = "client_secret_basic"
    subject_token_type: str = ACCESS_TOKEN_TYPE
    requested_token_type: str | None = None
    scope: str | None = None
    expiry_skew_seconds: float = Field(default=30.0, ge=0)
    max_cache_seconds: float = Field(default=3600.0, ge=0)
    cache_size: int = Field(default=10_000, gt=0)
    timeout_seconds: float = Field(default=5.0, gt=0)


class ProviderKind(enum.StrEnum):
    """How a provider expects its key: which header, which form."""

    OPENAI = "openai"  # Authorization: Bearer <key> (every OpenAI-compatible API)
    ANTHROPIC = "anthropic"  # x-api-key: <key>
    AZURE = "azure"  # api-key: <key>


class ProviderSource(_Model):
    """Where one provider's key comes from, and how it is sent."""

    kind: ProviderKind = ProviderKind.OPENAI
    env: str | None = Field(default=None, description="environment variable holding the key")


class VaultConfig(_Model):
    """Provider-key custody: a secrets file and/or environment variables.

    For each provider the secrets file wins when it names the provider; otherwise
    the environment variable is read (on every request, so changing ``os.environ``
    rotates too).
    """

    file: Path | None = None
    check_interval_seconds: float = Field(default=1.0, ge=0)
    providers: dict[str, ProviderSource] = {}


class KeyEntry(_Model):
    """One API or virtual key, as stored in the key file: the hash, never the secret."""

    id: str = Field(pattern=KEY_ID_PATTERN)
    hash: str = Field(pattern=KEY_HASH_PATTERN)
    kind: Literal["api", "virtual"] = "virtual"
    subject: str = Field(min_length=1)
    groups: list[str] = []
    roles: list[str] = []
    email: str | None = None
    tenant: str | None = None
    scopes: list[str] = []
    attributes: dict[str, Any] = {}
    providers: list[str] = Field(default=[], description="provider name globs this key may reach")
    models: list[str] = Field(default=[], description="model name globs this key may use")
    expires: datetime | None = None
    revoked: bool = False
    created: datetime | None = None
    description: str = ""

    @field_validator("expires", "created")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class KeyFile(_Model):
    """The YAML key file: ``version: 1`` and a list of :class:`KeyEntry`."""

    version: Literal[1] = 1
    keys: list[KeyEntry] = []

    @model_validator(mode="after")
    def _unique_ids(self) -> KeyFile:
        seen: set[str] = set()
        for entry in self.keys:
            if entry.id in seen:
                raise ValueError(f"duplicate key id {entry.id!r}")
            seen.add(entry.id)
        return self


class IdentityConfig(_Model):
    """Everything the identity layer needs; embeddable in the gateway's YAML."""

    allow_anonymous: bool = Field(
        default=False,
        description="let requests without any credential through as the anonymous identity",
    )
    issuers: list[IssuerConfig] = []
    key_file: Path | None = None
    keys: list[KeyEntry] = Field(default=[], description="keys given inline (hashes only)")
    key_prefix: str = "bst_"
    key_check_interval_seconds: float = Field(default=1.0, ge=0)
    max_token_bytes: int = Field(default=8192, gt=0)
    verified_cache_seconds: float = Field(default=300.0, ge=0)
    verified_cache_size: int = Field(default=10_000, gt=0)
    resource: ProtectedResourceConfig | None = None
    token_exchange: TokenExchangeConfig | None = None
    vault: VaultConfig | None = None

    @field_validator("key_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        # The prefix is what tells a key from a JWT: it must not be able to start
        # a base64url JWT header ("eyJ...").
        if not re.fullmatch(r"[a-z][a-z0-9]{1,15}_", value):
            raise ValueError(
                "key_prefix must be lower-case letters/digits ending in '_', e.g. 'bst_'"
            )
        return value

    @model_validator(mode="after")
    def _unique_issuers(self) -> IdentityConfig:
        names = [issuer.issuer for issuer in self.issuers]
        if len(names) != len(set(names)):
            raise ValueError("each issuer may be configured once")
        return self
