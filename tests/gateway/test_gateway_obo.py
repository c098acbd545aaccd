"""On-behalf-of through `bastion serve`: the MCP upstream sees a token exchanged for the user.

A real identity provider (JWKS and an RFC 8693 token endpoint) runs on
127.0.0.1; the agent presents the user's JWT to the gateway; the GitHub-like
MCP server behind it records the Authorization header it receives.
"""

from __future__ import annotations

import base64
import hashlib
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm
from mcp.client.client import Client
from mcp.client.streamable_http import streamable_http_client
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bastion.demo.github_server import GitHubState, build_github_app
from bastion.demo.serving import BackgroundServer

from .harness import Gateway, HeaderRecorder, wait_for

ISSUER = "https://idp.test"
AUDIENCE = "bastion"
UPSTREAM_AUDIENCE = "https://github.test"
CLIENT_ID = "bastion-gateway"
CLIENT_SECRET = "gateway-secret-0123456789"
POLICY = "default call allow\ndefault result trusted\ndefault model allow\n"


@dataclass
class IdP:
    key: Any = field(default_factory=lambda: rsa.generate_private_key(65537, 2048))
    token_hits: int = 0
    token_status: int = 200
    forms: list[dict[str, str]] = field(default_factory=list)

    def app(self) -> Starlette:
        async def jwks(request: Request) -> Response:
            jwk: dict[str, Any] = RSAAlgorithm.to_jwk(self.key.public_key(), as_dict=True)
            jwk.update(kid="k1", use="sig", alg="RS256")
            return JSONResponse({"keys": [jwk]})

        async def token(request: Request) -> Response:
            self.token_hits += 1
            if self.token_status != 200:
                return JSONResponse({"error": "temporarily_unavailable"}, status_code=503)
            form = {k: str(v) for k, v in (await request.form()).items()}
            self.forms.append(form)
            basic = base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
            if request.headers.get("authorization") != f"Basic {basic}":
                return JSONResponse({"error": "invalid_client"}, status_code=401)
            user = hashlib.sha256(form["subject_token"].encode()).hexdigest()[:8]
            return JSONResponse(
                {
                    "access_token": f"downstream-{user}-{self.token_hits}",
                    "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
                    "token_type": "Bearer",
                    "expires_in": 300,
                }
            )

        return Starlette(routes=[Route("/jwks", jwks), Route("/token", token, methods=["POST"])])

    def user_token(self, sub: str) -> str:
        now = int(time.time())
        claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": sub, "iat": now, "exp": now + 300}
        return jwt.encode(claims, self.key, algorithm="RS256", headers={"kid": "k1"})


@dataclass
class Setup:
    idp: IdP
    recorder: HeaderRecorder
    gateway: Gateway


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    idp = IdP()
    recorder = HeaderRecorder(build_github_app(GitHubState()))
    servers = [
        BackgroundServer(idp.app(), name="idp").start(),
        BackgroundServer(recorder, name="github").start(),
    ]
    directory = tmp_path_factory.mktemp("obo")
    (directory / "policy").mkdir()
    (directory / "policy" / "main.policy").write_text(POLICY)
    (directory / "bastion.yaml").write_text(
        textwrap.dedent(
            f"""\
            listen: {{host: 127.0.0.1, port: 0}}
            policy: {{paths: [policy]}}
            identity:
              issuers:
                - issuer: {ISSUER}
                  jwks_url: {servers[0].url}/jwks
                  audiences: [{AUDIENCE}]
                  algorithms: [RS256]
              token_exchange:
                token_endpoint: {servers[0].url}/token
                client_id: {CLIENT_ID}
                client_secret: {CLIENT_SECRET}
            mcp:
              github:
                url: {servers[1].url}/mcp
                on_behalf_of: {{audience: "{UPSTREAM_AUDIENCE}"}}
            audit:
              sinks: [{{path: audit.jsonl}}]
            """
        )
    )
    gateway = Gateway(directory, directory / "bastion.yaml")
    try:
        yield Setup(idp, recorder, gateway)
    finally:
        gateway.stop()
        for server in servers:
            server.stop()


def mcp_as(url: str, token: str) -> Client:
    http = httpx2.AsyncClient(headers={"authorization": f"Bearer {token}"})
    return Client(streamable_http_client(url, http_client=http))


def leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in leaves(sub)]
    return [exc]


def upstream_authorizations(recorder: HeaderRecorder) -> list[str]:
    return [h.get("authorization", "") for h in recorder.headers]


async def test_the_upstream_gets_a_token_exchanged_for_the_user_not_the_users_own(
    setup: Setup,
) -> None:
    user_token = setup.idp.user_token("alice")
    setup.recorder.headers.clear()
    async with mcp_as(setup.gateway.url + "/mcp/github", user_token) as mcp:
        result = await mcp.call_tool("list_issues", {"owner": "acme", "repo": "public"})
    assert not result.is_error
    sent = upstream_authorizations(setup.recorder)
    assert sent, "the upstream saw no request"
    expected_user = hashlib.sha256(user_token.encode()).hexdigest()[:8]
    assert all(a.startswith(f"Bearer downstream-{expected_user}-") for a in sent)
    assert not any(user_token in a for a in sent)
    form = setup.idp.forms[-1]
    assert form["audience"] == UPSTREAM_AUDIENCE
    assert form["subject_token"] == user_token
    assert form["grant_type"] == "urn:ietf:params:oauth:grant-type:token-exchange"


async def test_the_exchanged_token_is_cached_per_user_and_audience(setup: Setup) -> None:
    bob = setup.idp.user_token("bob")
    before = setup.idp.token_hits
    async with mcp_as(setup.gateway.url + "/mcp/github", bob) as mcp:
        await mcp.call_tool("list_issues", {"owner": "acme", "repo": "public"})
        await mcp.call_tool("get_issue", {"owner": "acme", "repo": "public", "issue_number": 1})
    # Initialize, notifications, list and two calls all went upstream with one exchange.
    assert setup.idp.token_hits == before + 1
    carol = setup.idp.user_token("carol")
    async with mcp_as(setup.gateway.url + "/mcp/github", carol) as mcp:
        await mcp.call_tool("list_issues", {"owner": "acme", "repo": "public"})
    assert setup.idp.token_hits == before + 2


async def test_a_token_endpoint_that_is_down_refuses_instead_of_falling_back(
    setup: Setup,
) -> None:
    dave = setup.idp.user_token("dave")
    setup.idp.token_status = 503
    setup.recorder.headers.clear()
    try:
        with pytest.raises(Exception) as failure:
            async with mcp_as(setup.gateway.url + "/mcp/github", dave) as mcp:
                await mcp.call_tool("list_issues", {"owner": "acme", "repo": "public"})
    finally:
        setup.idp.token_status = 200
    errors = leaves(failure.value)
    assert any("token exchange" in str(e) and "identity_unavailable" in repr(e) for e in errors)
    assert setup.recorder.headers == []  # nothing reached the upstream for dave
    assert wait_for(
        lambda: any(
            r.get("identity", {}).get("subject") == "dave" and r.get("effect") == "forbid"
            for r in setup.gateway.audit_lines()
        )
    ), setup.gateway.audit_lines()[-3:]


def test_a_request_without_the_users_token_cannot_reach_an_obo_upstream(setup: Setup) -> None:
    response = httpx2.post(
        setup.gateway.url + "/mcp/github",
        json={"jsonrpc": "2.0", "id": 1, "method": "ping"},
        headers={"accept": "application/json, text/event-stream"},
    )
    assert response.status_code == 401
    assert "bearer" in response.headers.get("www-authenticate", "").lower()


def test_the_audit_never_holds_a_bearer_token(setup: Setup) -> None:
    text = Path(setup.gateway.directory / "audit.jsonl").read_text()
    assert "downstream-" not in text
    assert "eyJ" not in text  # no JWT (their header always base64-encodes '{"')


async def test_on_the_aggregated_endpoint_a_failed_exchange_is_refused_and_audited(
    setup: Setup,
) -> None:
    erin = setup.idp.user_token("erin")
    setup.idp.token_status = 503
    setup.recorder.headers.clear()
    try:
        async with mcp_as(setup.gateway.url + "/mcp", erin) as mcp:
            with pytest.raises(Exception) as failure:
                await mcp.call_tool("github__list_issues", {"owner": "acme", "repo": "public"})
    finally:
        setup.idp.token_status = 200
    assert any("token exchange" in str(e) for e in leaves(failure.value))
    assert setup.recorder.headers == []
    assert wait_for(
        lambda: any(
            r.get("identity", {}).get("subject") == "erin" and r.get("effect") == "forbid"
            for r in setup.gateway.audit_lines()
        )
    )
