"""Bastion as an OAuth protected resource for MCP clients (RFC 9728, RFC 6750)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from starlette.applications import Starlette

from bastion.errors import AuthError
from bastion.identity import IdentityConfig, IdentityResolver, ProtectedResourceConfig

from .conftest import IdP, bearer, issuer_config, serve

RESOURCE = ProtectedResourceConfig(
    resource="https://bastion.example/mcp",
    authorization_servers=["https://idp.test"],
    scopes_supported=["mcp:tools", "mcp:read"],
    resource_name="Bastion MCP gateway",
)
METADATA_URL = "https://bastion.example/.well-known/oauth-protected-resource/mcp"


@pytest.fixture
def metadata_server() -> Iterator[str]:
    resolver = IdentityResolver(IdentityConfig(resource=RESOURCE))
    assert resolver.resource is not None
    with serve(Starlette(routes=resolver.resource.routes())) as url:
        yield url


@pytest.mark.parametrize(
    "path", ["/.well-known/oauth-protected-resource/mcp", "/.well-known/oauth-protected-resource"]
)
def test_metadata_document_is_served_at_well_known_paths(metadata_server: str, path: str) -> None:
    response = httpx.get(metadata_server + path)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {
        "resource": "https://bastion.example/mcp",
        "authorization_servers": ["https://idp.test"],
        "bearer_methods_supported": ["header"],
        "scopes_supported": ["mcp:tools", "mcp:read"],
        "resource_name": "Bastion MCP gateway",
    }


def test_metadata_endpoint_only_answers_get(metadata_server: str) -> None:
    response = httpx.post(metadata_server + "/.well-known/oauth-protected-resource/mcp")
    assert response.status_code == 405


async def test_401_without_token_points_at_resource_metadata(idp: IdP) -> None:
    resolver = IdentityResolver(IdentityConfig(issuers=[issuer_config(idp)], resource=RESOURCE))
    with pytest.raises(AuthError) as info:
        await resolver.resolve({})
    assert info.value.status == 401
    assert info.value.headers == {"WWW-Authenticate": f'Bearer resource_metadata="{METADATA_URL}"'}
    await resolver.aclose()


async def test_401_with_failed_token_adds_invalid_token_error(idp: IdP) -> None:
    resolver = IdentityResolver(IdentityConfig(issuers=[issuer_config(idp)], resource=RESOURCE))
    with pytest.raises(AuthError) as info:
        await resolver.resolve(bearer(idp.token(aud="another-resource")))
    challenge = info.value.headers["WWW-Authenticate"]
    assert challenge.startswith(f'Bearer resource_metadata="{METADATA_URL}", error="invalid_token"')
    assert 'error_description="token audience is not accepted"' in challenge
    await resolver.aclose()


async def test_scopes_from_token_become_identity_scopes(idp: IdP) -> None:
    resolver = IdentityResolver(IdentityConfig(issuers=[issuer_config(idp)], resource=RESOURCE))
    identity = await resolver.resolve(bearer(idp.token(scope="mcp:tools mcp:read")))
    assert identity.scopes == ("mcp:tools", "mcp:read")
    assert identity.get("scopes") == ("mcp:tools", "mcp:read")
    await resolver.aclose()


def test_resource_with_root_path_serves_only_the_bare_well_known_path() -> None:
    resolver = IdentityResolver(
        IdentityConfig(
            resource=ProtectedResourceConfig(
                resource="https://api.example", authorization_servers=["https://idp.test"]
            )
        )
    )
    assert resolver.resource is not None
    assert resolver.resource.url == "https://api.example/.well-known/oauth-protected-resource"
    assert resolver.resource.paths == ("/.well-known/oauth-protected-resource",)


async def test_token_without_required_scope_is_403_insufficient_scope(idp: IdP) -> None:
    resource = RESOURCE.model_copy(update={"required_scopes": ["mcp:tools"]})
    resolver = IdentityResolver(IdentityConfig(issuers=[issuer_config(idp)], resource=resource))
    with pytest.raises(AuthError) as info:
        await resolver.resolve(bearer(idp.token(scope="mcp:read")))
    assert info.value.status == 403 and info.value.code == "insufficient_scope"
    challenge = info.value.headers["WWW-Authenticate"]
    assert 'error="insufficient_scope"' in challenge and 'scope="mcp:tools"' in challenge
    identity = await resolver.resolve(bearer(idp.token(scope="mcp:read mcp:tools")))
    assert "mcp:tools" in identity.scopes
    await resolver.aclose()
