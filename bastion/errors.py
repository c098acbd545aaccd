"""Error types. Each maps to one HTTP or JSON-RPC error, in the adapters, in one place."""

from __future__ import annotations

from collections.abc import Mapping


class BastionError(Exception):
    """Base of every error Bastion raises on purpose."""


class ProtocolError(BastionError):
    """The traffic itself is bad: malformed JSON, duplicate keys, oversized body.

    ``status`` is the HTTP status to answer with; ``code`` a short machine name
    (``invalid_json``, ``duplicate_key``, ``body_too_large``, ``header_mismatch``...).
    """

    def __init__(self, message: str, *, status: int = 400, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code


class AuthError(BastionError):
    """No credential, or one that does not verify (401), or not allowed (403).

    ``headers`` carries e.g. ``WWW-Authenticate`` for the 401 answer.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int = 401,
        code: str = "unauthorized",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.headers = dict(headers or {})


class IdentityUnavailable(AuthError):
    """Identity could not be established because a dependency is down (JWKS, token endpoint)."""

    def __init__(self, message: str, *, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message, status=503, code="identity_unavailable", headers=headers)


class UpstreamError(BastionError):
    """The upstream LLM provider or MCP server failed, timed out or dropped the connection."""

    def __init__(self, message: str, *, status: int = 502, code: str = "upstream_error") -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code


class StoreError(BastionError):
    """The session store (memory or Redis) failed; callers deny."""


class QuarantineError(BastionError):
    """The quarantine LLM failed or answered outside its constraints; the output is blocked."""


class AuditError(BastionError):
    """The audit trail cannot accept records; with fail-closed audit, traffic is denied."""
