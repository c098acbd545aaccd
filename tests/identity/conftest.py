"""A real identity provider on 127.0.0.1: JWKS endpoint and RFC 8693 token endpoint."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import jwt
import pytest
import uvicorn
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bastion.identity import IdentityConfig, IdentityResolver, IssuerConfig

ISSUER = "https://idp.test"
AUDIENCE = "bastion"
CLIENT_ID = "bastion-gateway"
CLIENT_SECRET = "gateway-secret"
TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"


@contextlib.contextmanager
def serve(app: Any) -> Iterator[str]:
    """Run ``app`` under uvicorn in a thread on a free port; yield its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(5)
        sock.close()


def free_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@dataclass
class IdPState:
    jwks: list[dict[str, Any]] = field(default_factory=list)
    jwks_hits: int = 0
    jwks_status: int = 200
    jwks_delay: float = 0.0
    token_hits: int = 0
    token_status: int = 200
    token_delay: float = 0.0
    expires_in: int | None = 300
    issued: int = 0
    last_form: dict[str, str] = field(default_factory=dict)


def _idp_app(state: IdPState) -> Starlette:
    async def jwks(request: Request) -> Response:
        state.jwks_hits += 1
        if state.jwks_delay:
            await asyncio.sleep(state.jwks_delay)
        if state.jwks_status != 200:
            return JSONResponse({"error": "down"}, status_code=state.jwks_status)
        return JSONResponse({"keys": state.jwks})

    async def token(request: Request) -> Response:
        state.token_hits += 1
        if state.token_delay:
            await asyncio.sleep(state.token_delay)
        if state.token_status != 200:
            return JSONResponse(
                {"error": "temporarily_unavailable"}, status_code=state.token_status
            )
        form = {k: str(v) for k, v in (await request.form()).items()}
        state.last_form = form
        expected = "Basic " + base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
        if request.headers.get("authorization") != expected:
            return JSONResponse({"error": "invalid_client"}, status_code=401)
        if form.get("grant_type") != TOKEN_EXCHANGE or not form.get("subject_token"):
            return JSONResponse({"error": "invalid_request"}, status_code=400)
        if form.get("subject_token_type") != "urn:ietf:params:oauth:token-type:access_token":
            return JSONResponse({"error": "invalid_request"}, status_code=400)
        if not form.get("audience"):
            return JSONResponse({"error": "invalid_target"}, status_code=400)
        state.issued += 1
        user = hashlib.sha256(form["subject_token"].encode()).hexdigest()[:8]
        body: dict[str, Any] = {
            "access_token": f"dt-{form['audience']}-{user}-{state.issued}",
            "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
            "token_type": "Bearer",
        }
        if state.expires_in is not None:
            body["expires_in"] = state.expires_in
        return JSONResponse(body)

    return Starlette(
        routes=[Route("/jwks", jwks), Route("/token", token, methods=["POST"])],
    )


@dataclass
class SigningKeyPair:
    kid: str
    alg: str
    private: Any

    def public_jwk(self) -> dict[str, Any]:
        algorithm = RSAAlgorithm if self.alg.startswith(("RS", "PS")) else ECAlgorithm
        jwk: dict[str, Any] = algorithm.to_jwk(self.private.public_key(), as_dict=True)
        jwk.update(kid=self.kid, use="sig", alg=self.alg)
        return jwk


@dataclass
class IdP:
    url: str
    state: IdPState
    rsa1: SigningKeyPair
    rsa2: SigningKeyPair
    ec1: SigningKeyPair

    @property
    def jwks_url(self) -> str:
        return f"{self.url}/jwks"

    @property
    def token_url(self) -> str:
        return f"{self.url}/token"

    def publish(self, *keys: SigningKeyPair) -> None:
        self.state.jwks = [key.public_jwk() for key in keys]

    def claims(self, **overrides: Any) -> dict[str, Any]:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": "alice",
            "iat": now,
            "exp": now + 300,
        }
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not None}

    def token(
        self, key: SigningKeyPair | None = None, *, kid: str | None = "default", **claims: Any
    ) -> str:
        key = key or self.rsa1
        headers = {"kid": key.kid if kid == "default" else kid}
        if headers["kid"] is None:
            del headers["kid"]
        return jwt.encode(self.claims(**claims), key.private, algorithm=key.alg, headers=headers)


@pytest.fixture(scope="session")
def _keys() -> tuple[SigningKeyPair, SigningKeyPair, SigningKeyPair]:
    return (
        SigningKeyPair("rsa-1", "RS256", rsa.generate_private_key(65537, 2048)),
        SigningKeyPair("rsa-2", "RS256", rsa.generate_private_key(65537, 2048)),
        SigningKeyPair("ec-1", "ES256", ec.generate_private_key(ec.SECP256R1())),
    )


@pytest.fixture(scope="session")
def _idp_server() -> Iterator[tuple[str, IdPState]]:
    state = IdPState()
    with serve(_idp_app(state)) as url:
        yield url, state


@pytest.fixture
def idp(
    _idp_server: tuple[str, IdPState],
    _keys: tuple[SigningKeyPair, SigningKeyPair, SigningKeyPair],
) -> IdP:
    url, state = _idp_server
    # Reset in place: the running server holds this object.
    state.__init__()  # type: ignore[misc]
    provider = IdP(url, state, *_keys)
    provider.publish(provider.rsa1, provider.ec1)
    return provider


def issuer_config(idp: IdP, **overrides: Any) -> IssuerConfig:
    values: dict[str, Any] = {
        "issuer": ISSUER,
        "jwks_url": idp.jwks_url,
        "audiences": [AUDIENCE],
        "algorithms": ["RS256", "ES256"],
        "leeway_seconds": 5,
        "jwks_refetch_interval_seconds": 0.3,
    }
    values.update(overrides)
    return IssuerConfig.model_validate(values)


@pytest.fixture
async def resolver(idp: IdP) -> AsyncIterator[IdentityResolver]:
    resolver = IdentityResolver(IdentityConfig(issuers=[issuer_config(idp)]))
    yield resolver
    await resolver.aclose()


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}
