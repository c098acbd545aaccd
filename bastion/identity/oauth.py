"""Bastion as an OAuth 2.1 protected resource, the way MCP clients discover it.

RFC 9728: the metadata document lives at ``/.well-known/oauth-protected-resource``
with the resource's path appended (``https://host/mcp`` ->
``https://host/.well-known/oauth-protected-resource/mcp``); the 401 answer points
at it with ``WWW-Authenticate: Bearer resource_metadata="..."`` (RFC 6750 error
codes added when a token was presented and failed).
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from bastion.identity.config import ProtectedResourceConfig

__all__ = ["WELL_KNOWN_PATH", "ProtectedResourceMetadata", "bearer_challenge"]

WELL_KNOWN_PATH = "/.well-known/oauth-protected-resource"
_UNSAFE = re.compile(r'[^\x20-\x7e]|["\\]')


def _quoted(value: str) -> str:
    return '"' + _UNSAFE.sub("", value) + '"'


def bearer_challenge(
    *,
    resource_metadata: str | None = None,
    error: str | None = None,
    description: str | None = None,
    scope: str | None = None,
) -> str:
    """A ``WWW-Authenticate`` value for the Bearer scheme (RFC 6750 section 3)."""
    params: list[str] = []
    if resource_metadata:
        params.append(f"resource_metadata={_quoted(resource_metadata)}")
    if error:
        params.append(f"error={_quoted(error)}")
    if error and description:
        params.append(f"error_description={_quoted(description)}")
    if scope:
        params.append(f"scope={_quoted(scope)}")
    return "Bearer " + ", ".join(params) if params else "Bearer"


class ProtectedResourceMetadata:
    """The RFC 9728 document for one resource, and the Starlette routes serving it."""

    def __init__(self, config: ProtectedResourceConfig) -> None:
        self.config = config
        parts = urlsplit(config.resource)
        self.suffix = parts.path.rstrip("/")
        if config.metadata_url:
            self.url = config.metadata_url
        else:
            self.url = urlunsplit(
                (parts.scheme, parts.netloc, WELL_KNOWN_PATH + self.suffix, parts.query, "")
            )
        self._document = self._build()

    def _build(self) -> dict[str, Any]:
        config = self.config
        document: dict[str, Any] = {
            "resource": config.resource,
            "authorization_servers": list(config.authorization_servers),
            "bearer_methods_supported": list(config.bearer_methods_supported),
        }
        if config.scopes_supported:
            document["scopes_supported"] = list(config.scopes_supported)
        if config.resource_name:
            document["resource_name"] = config.resource_name
        if config.resource_documentation:
            document["resource_documentation"] = config.resource_documentation
        return document

    def document(self) -> dict[str, Any]:
        """The metadata as a JSON-ready dict (a fresh copy)."""
        return dict(self._document)

    @property
    def paths(self) -> tuple[str, ...]:
        """The paths this document is served at: the suffixed one and the bare one."""
        if self.suffix:
            return (WELL_KNOWN_PATH + self.suffix, WELL_KNOWN_PATH)
        return (WELL_KNOWN_PATH,)

    async def endpoint(self, request: Request) -> JSONResponse:
        """Starlette endpoint answering GET with the document."""
        return JSONResponse(
            self._document,
            headers={"cache-control": "public, max-age=3600", "access-control-allow-origin": "*"},
        )

    def routes(self) -> list[Route]:
        """Routes to add to a Starlette app (or ``Router``) at the host root."""
        return [Route(path, self.endpoint, methods=["GET"]) for path in self.paths]

    def challenge(
        self, *, error: str | None = None, description: str | None = None, scope: str | None = None
    ) -> str:
        """``WWW-Authenticate`` pointing at this document."""
        return bearer_challenge(
            resource_metadata=self.url, error=error, description=description, scope=scope
        )
