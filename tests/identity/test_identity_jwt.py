"""JWT bearer verification against a real JWKS server, one test per attack."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from pydantic import ValidationError

from bastion.errors import AuthError, IdentityUnavailable
from bastion.identity import IdentityConfig, IdentityResolver, IssuerConfig

from .conftest import AUDIENCE, ISSUER, IdP, bearer, free_port_url, issuer_config


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unsigned(header: dict[str, object], claims: dict[str, object]) -> str:
    return f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"


async def _refused(resolver: IdentityResolver, token: str) -> AuthError:
    with pytest.raises(AuthError) as info:
        await resolver.resolve(bearer(token))
    assert not isinstance(info.value, IdentityUnavailable)
    assert info.value.status == 401
    return info.value


async def test_rsa_token_resolves_to_identity(idp: IdP, resolver: IdentityResolver) -> None:
    identity = await resolver.resolve(bearer(idp.token(sub="alice", groups=["eng", "ops"])))
    assert identity.subject == "alice"
    assert identity.groups == ("eng", "ops")
    assert identity.issuer == ISSUER
    assert identity.auth_method == "jwt"
    assert not identity.anonymous


async def test_ec_token_resolves_to_identity(idp: IdP, resolver: IdentityResolver) -> None:
    identity = await resolver.resolve(bearer(idp.token(idp.ec1, sub="bob")))
    assert identity.subject == "bob"


async def test_token_accepted_in_x_api_key_header(idp: IdP, resolver: IdentityResolver) -> None:
    identity = await resolver.resolve({"x-api-key": idp.token(sub="carol")})
    assert identity.subject == "carol"


async def test_claims_map_to_identity_fields_by_configuration(idp: IdP) -> None:
    config = issuer_config(
        idp,
        claims={
            "groups": ["groups", "realm_access.roles"],
            "tenant": "org.id",
            "attributes": {"department": "dept", "client": "azp"},
        },
    )
    resolver = IdentityResolver(IdentityConfig(issuers=[config]))
    token = idp.token(
        realm_access={"roles": ["admin", "eng"]},
        org={"id": "acme"},
        dept="finance",
        azp="cli",
        email="alice@example.com",
        scp=["files.read", "mail.send"],
    )
    identity = await resolver.resolve(bearer(token))
    await resolver.aclose()
    assert identity.groups == ("admin", "eng")
    assert identity.tenant == "acme"
    assert identity.email == "alice@example.com"
    assert identity.scopes == ("files.read", "mail.send")
    assert identity.get("department") == "finance"
    assert identity.get("client") == "cli"


async def test_space_separated_scope_claim_becomes_scopes(
    idp: IdP, resolver: IdentityResolver
) -> None:
    identity = await resolver.resolve(bearer(idp.token(scope="mcp:tools  mcp:read")))
    assert identity.scopes == ("mcp:tools", "mcp:read")


async def test_alg_none_is_refused(idp: IdP, resolver: IdentityResolver) -> None:
    token = _unsigned({"alg": "none", "typ": "JWT", "kid": "rsa-1"}, idp.claims()) + "."
    error = await _refused(resolver, token)
    assert "none" in error.message


async def test_hs256_signed_with_rsa_public_key_is_refused(
    idp: IdP, resolver: IdentityResolver
) -> None:
    pem = idp.rsa1.private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    signing_input = _unsigned({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}, idp.claims())
    signature = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
    error = await _refused(resolver, f"{signing_input}.{_b64(signature)}")
    assert "HS256" in error.message


def test_issuer_config_refuses_none_and_hmac_algorithms() -> None:
    for alg in ("none", "HS256", "HS512"):
        with pytest.raises(ValidationError):
            IssuerConfig(
                issuer=ISSUER, jwks_url="https://idp/jwks", audiences=["a"], algorithms=[alg]
            )


async def test_algorithm_outside_issuer_allowlist_is_refused(idp: IdP) -> None:
    resolver = IdentityResolver(IdentityConfig(issuers=[issuer_config(idp, algorithms=["RS256"])]))
    await _refused(resolver, idp.token(idp.ec1))
    await resolver.aclose()


async def test_rs256_header_pointing_at_ec_key_is_refused(
    idp: IdP, resolver: IdentityResolver
) -> None:
    token = idp.token(idp.rsa1, kid="ec-1")
    error = await _refused(resolver, token)
    assert "does not fit" in error.message


async def test_expired_token_is_refused(idp: IdP, resolver: IdentityResolver) -> None:
    now = int(time.time())
    error = await _refused(resolver, idp.token(iat=now - 600, exp=now - 60))
    assert "expired" in error.message


async def test_expiry_within_leeway_is_accepted(idp: IdP, resolver: IdentityResolver) -> None:
    now = int(time.time())
    identity = await resolver.resolve(bearer(idp.token(iat=now - 600, exp=now - 2)))
    assert identity.subject == "alice"


async def test_not_yet_valid_token_is_refused(idp: IdP, resolver: IdentityResolver) -> None:
    error = await _refused(resolver, idp.token(nbf=int(time.time()) + 3600))
    assert "not yet valid" in error.message


async def test_token_without_exp_is_refused(idp: IdP, resolver: IdentityResolver) -> None:
    error = await _refused(resolver, idp.token(exp=None))
    assert "exp" in error.message


async def test_wrong_issuer_is_refused(idp: IdP, resolver: IdentityResolver) -> None:
    error = await _refused(resolver, idp.token(iss="https://evil.test"))
    assert "issuer" in error.message
    assert idp.state.jwks_hits == 0


async def test_wrong_audience_is_refused(idp: IdP, resolver: IdentityResolver) -> None:
    error = await _refused(resolver, idp.token(aud="some-other-api"))
    assert "audience" in error.message


async def test_missing_audience_is_refused(idp: IdP, resolver: IdentityResolver) -> None:
    await _refused(resolver, idp.token(aud=None))


async def test_tampered_payload_fails_signature(idp: IdP, resolver: IdentityResolver) -> None:
    header, _, signature = idp.token(sub="alice").split(".")
    forged = _b64(json.dumps(idp.claims(sub="root")).encode())
    error = await _refused(resolver, f"{header}.{forged}.{signature}")
    assert "signature" in error.message


async def test_token_signed_by_unpublished_key_is_refused(
    idp: IdP, resolver: IdentityResolver
) -> None:
    # rsa-2's private key signs, but the token claims to be rsa-1
    await _refused(resolver, idp.token(idp.rsa2, kid="rsa-1"))


async def test_critical_header_extension_is_refused(idp: IdP, resolver: IdentityResolver) -> None:
    token = jwt.encode(
        idp.claims(), idp.rsa1.private, algorithm="RS256", headers={"kid": "rsa-1", "crit": ["exp"]}
    )
    await _refused(resolver, token)


async def test_unknown_kid_after_genuine_rotation_is_accepted_after_refetch(
    idp: IdP, resolver: IdentityResolver
) -> None:
    await resolver.resolve(bearer(idp.token(idp.rsa1)))
    assert idp.state.jwks_hits == 1
    idp.publish(idp.rsa2, idp.ec1)  # the IdP rotates rsa-1 out, rsa-2 in
    await asyncio.sleep(0.35)  # past the refetch interval
    identity = await resolver.resolve(bearer(idp.token(idp.rsa2, sub="dave")))
    assert identity.subject == "dave"
    assert idp.state.jwks_hits == 2


async def test_unknown_kid_without_rotation_is_refused_and_refetch_is_rate_limited(
    idp: IdP, resolver: IdentityResolver
) -> None:
    # Signed up front: RSA signing on a loaded machine must not push the refusals
    # below past the 0.3 s refetch interval.
    unknown = idp.token(idp.rsa2)
    again = idp.token(idp.rsa2, sub="again")
    concurrent = [idp.token(idp.rsa2, sub=f"c{i}") for i in range(10)]
    await resolver.resolve(bearer(idp.token(idp.rsa1)))
    await asyncio.sleep(0.35)
    error = await _refused(resolver, unknown)
    assert "unknown signing key" in error.message
    assert idp.state.jwks_hits == 2  # one refetch for the unknown kid
    for _ in range(20):
        await _refused(resolver, again)
    await asyncio.gather(*(_refused(resolver, token) for token in concurrent))
    assert idp.state.jwks_hits == 2  # no further fetch inside the interval


async def test_concurrent_first_requests_share_one_jwks_fetch(
    idp: IdP, resolver: IdentityResolver
) -> None:
    idp.state.jwks_delay = 0.1
    identities = await asyncio.gather(
        *(resolver.resolve(bearer(idp.token(sub=f"user{i}"))) for i in range(20))
    )
    assert {i.subject for i in identities} == {f"user{i}" for i in range(20)}
    assert idp.state.jwks_hits == 1


async def test_jwks_unreachable_is_503(idp: IdP) -> None:
    resolver = IdentityResolver(
        IdentityConfig(issuers=[issuer_config(idp, jwks_url=free_port_url() + "/jwks")])
    )
    with pytest.raises(IdentityUnavailable) as info:
        await resolver.resolve(bearer(idp.token()))
    assert info.value.status == 503
    await resolver.aclose()


async def test_jwks_server_error_is_503_and_retry_waits_for_interval(
    idp: IdP, resolver: IdentityResolver
) -> None:
    idp.state.jwks_status = 500
    first, second = idp.token(), idp.token(sub="second")  # signed before the interval starts
    with pytest.raises(IdentityUnavailable):
        await resolver.resolve(bearer(first))
    with pytest.raises(IdentityUnavailable):
        await resolver.resolve(bearer(second))
    assert idp.state.jwks_hits == 1
    idp.state.jwks_status = 200
    await asyncio.sleep(0.35)
    assert (await resolver.resolve(bearer(idp.token(sub="third")))).subject == "third"


async def test_oversized_token_is_refused_before_any_parsing(idp: IdP) -> None:
    resolver = IdentityResolver(IdentityConfig(issuers=[issuer_config(idp)], max_token_bytes=2048))
    token = idp.token(padding="x" * 4000)
    error = await _refused(resolver, token)
    assert "too large" in error.message
    assert idp.state.jwks_hits == 0
    await resolver.aclose()


@pytest.mark.parametrize(
    "token",
    [
        "not-a-jwt",
        "a.b.c",
        "eyJhbGciOiJSUzI1NiJ9.!!!.sig",
        "eyJhbGciOiJSUzI1NiJ9..",
        _b64(b"[1,2]") + "." + _b64(b"{}") + ".",
    ],
)
async def test_malformed_token_is_refused(resolver: IdentityResolver, token: str) -> None:
    await _refused(resolver, token)


@pytest.mark.parametrize(
    "value",
    ["Basic YWxpY2U6cGFzcw==", "Bearer", "Bearer ", "Token abc", "Bearer a b", "Bearer é"],
)
async def test_malformed_authorization_header_is_refused(
    resolver: IdentityResolver, value: str
) -> None:
    with pytest.raises(AuthError) as info:
        await resolver.resolve({"authorization": value})
    assert info.value.status == 401
    assert info.value.headers["WWW-Authenticate"].startswith("Bearer")


async def test_repeat_token_is_served_from_cache(idp: IdP, resolver: IdentityResolver) -> None:
    token = idp.token()
    first = await resolver.authenticate(bearer(token))
    idp.state.jwks_status = 500  # the IdP going down does not matter for a verified token
    await asyncio.sleep(0.35)
    second = await resolver.authenticate(bearer(token))
    assert second is first
    assert idp.state.jwks_hits == 1


async def test_cached_token_is_refused_once_expired(idp: IdP, resolver: IdentityResolver) -> None:
    resolver_config = resolver.config.model_copy(
        update={"issuers": [issuer_config(idp, leeway_seconds=0)]}
    )
    strict = IdentityResolver(resolver_config)
    exp = int(time.time()) + 2
    token = idp.token(exp=exp)
    await strict.resolve(bearer(token))
    await asyncio.sleep(exp - time.time() + 0.05)
    await _refused(strict, token)
    await strict.aclose()


async def test_issuer_is_chosen_by_iss_claim_among_several(idp: IdP) -> None:
    other = IssuerConfig(
        issuer="https://other.test",
        jwks={"keys": [idp.ec1.public_jwk()]},
        audiences=["other-api"],
        algorithms=["ES256"],
    )
    resolver = IdentityResolver(IdentityConfig(issuers=[issuer_config(idp), other]))
    mine = await resolver.resolve(bearer(idp.token(idp.rsa1)))
    theirs = await resolver.resolve(
        bearer(idp.token(idp.ec1, iss="https://other.test", aud="other-api", sub="zed"))
    )
    assert (mine.issuer, theirs.issuer, theirs.subject) == (ISSUER, "https://other.test", "zed")
    # a token from the other issuer with our audience does not verify there
    await _refused(resolver, idp.token(idp.ec1, iss="https://other.test", aud=AUDIENCE))
    # nor does a token claiming the other issuer but signed with a key it does not publish
    await _refused(resolver, idp.token(idp.rsa1, iss="https://other.test", aud="other-api"))
    await resolver.aclose()


async def test_no_credential_is_refused_by_default(resolver: IdentityResolver) -> None:
    with pytest.raises(AuthError) as info:
        await resolver.resolve({})
    assert info.value.status == 401
    assert info.value.headers["WWW-Authenticate"] == "Bearer"


async def test_no_credential_is_anonymous_when_allowed(idp: IdP) -> None:
    resolver = IdentityResolver(IdentityConfig(issuers=[issuer_config(idp)], allow_anonymous=True))
    identity = await resolver.resolve({"content-type": "application/json"})
    assert identity.anonymous and identity.subject == "anonymous"
    await resolver.aclose()


async def test_bad_credential_is_refused_even_when_anonymous_is_allowed(idp: IdP) -> None:
    resolver = IdentityResolver(IdentityConfig(issuers=[issuer_config(idp)], allow_anonymous=True))
    await _refused(resolver, idp.token(aud="elsewhere"))
    await resolver.aclose()


async def test_expired_jwks_is_not_used_when_refresh_fails_by_default(idp: IdP) -> None:
    resolver = IdentityResolver(
        IdentityConfig(issuers=[issuer_config(idp, jwks_cache_ttl_seconds=0.2)])
    )
    await resolver.resolve(bearer(idp.token(sub="before")))
    idp.state.jwks_status = 503
    await asyncio.sleep(0.35)
    with pytest.raises(IdentityUnavailable):
        await resolver.resolve(bearer(idp.token(sub="after")))
    await resolver.aclose()


async def test_stale_if_error_keeps_last_keys_for_the_configured_time(idp: IdP) -> None:
    config = issuer_config(idp, jwks_cache_ttl_seconds=0.2, jwks_stale_if_error_seconds=60)
    resolver = IdentityResolver(IdentityConfig(issuers=[config]))
    await resolver.resolve(bearer(idp.token(sub="before")))
    idp.state.jwks_status = 503
    await asyncio.sleep(0.35)
    assert (await resolver.resolve(bearer(idp.token(sub="after")))).subject == "after"
    assert idp.state.jwks_hits == 2
    await resolver.aclose()
