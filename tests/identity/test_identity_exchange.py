"""On-behalf-of token exchange (RFC 8693) against a real token endpoint."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from bastion.errors import IdentityUnavailable
from bastion.identity import TokenExchangeConfig, TokenExchanger

from .conftest import CLIENT_ID, CLIENT_SECRET, TOKEN_EXCHANGE, IdP, free_port_url


def config(token_endpoint: str, **overrides: object) -> TokenExchangeConfig:
    values: dict[str, object] = {
        "token_endpoint": token_endpoint,
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
    }
    values.update(overrides)
    return TokenExchangeConfig.model_validate(values)


@pytest.fixture
async def exchanger(idp: IdP) -> AsyncIterator[TokenExchanger]:
    exchanger = TokenExchanger(config(idp.token_url))
    yield exchanger
    await exchanger.aclose()


async def test_exchange_returns_downstream_token_for_the_audience(
    idp: IdP, exchanger: TokenExchanger
) -> None:
    user_token = idp.token(sub="alice")
    token = await exchanger.exchange(user_token, "https://github-mcp.internal")
    assert token.access_token.startswith("dt-https://github-mcp.internal-")
    assert token.authorization() == f"Bearer {token.access_token}"
    assert idp.state.last_form["grant_type"] == TOKEN_EXCHANGE
    assert idp.state.last_form["subject_token"] == user_token
    assert idp.state.last_form["audience"] == "https://github-mcp.internal"
    assert token.access_token not in repr(token)


async def test_exchanged_token_is_cached_per_user_and_audience(
    idp: IdP, exchanger: TokenExchanger
) -> None:
    alice, bob = idp.token(sub="alice"), idp.token(sub="bob")
    first = await exchanger.exchange(alice, "aud-a")
    again = await exchanger.exchange(alice, "aud-a")
    other_audience = await exchanger.exchange(alice, "aud-b")
    other_user = await exchanger.exchange(bob, "aud-a")
    assert again.access_token == first.access_token
    assert len({first.access_token, other_audience.access_token, other_user.access_token}) == 3
    assert idp.state.token_hits == 3


async def test_concurrent_exchanges_for_one_key_share_one_request(
    idp: IdP, exchanger: TokenExchanger
) -> None:
    idp.state.token_delay = 0.1
    user_token = idp.token()
    tokens = await asyncio.gather(*(exchanger.exchange(user_token, "aud") for _ in range(15)))
    assert len({t.access_token for t in tokens}) == 1
    assert idp.state.token_hits == 1


async def test_token_near_expiry_is_exchanged_again(idp: IdP) -> None:
    idp.state.expires_in = 31  # with the default 30 s skew it is usable for about a second
    exchanger = TokenExchanger(config(idp.token_url))
    user_token = idp.token()
    first = await exchanger.exchange(user_token, "aud")
    assert (await exchanger.exchange(user_token, "aud")).access_token == first.access_token
    await asyncio.sleep(1.05)
    assert (await exchanger.exchange(user_token, "aud")).access_token != first.access_token
    assert idp.state.token_hits == 2
    await exchanger.aclose()


async def test_token_without_expiry_is_not_cached(idp: IdP, exchanger: TokenExchanger) -> None:
    idp.state.expires_in = None
    user_token = idp.token()
    await exchanger.exchange(user_token, "aud")
    await exchanger.exchange(user_token, "aud")
    assert idp.state.token_hits == 2


async def test_token_endpoint_down_is_503() -> None:
    exchanger = TokenExchanger(config(free_port_url() + "/token"))
    with pytest.raises(IdentityUnavailable) as info:
        await exchanger.exchange("user-token", "aud")
    assert info.value.status == 503
    await exchanger.aclose()


async def test_token_endpoint_error_is_503_and_not_cached(
    idp: IdP, exchanger: TokenExchanger
) -> None:
    idp.state.token_status = 503
    with pytest.raises(IdentityUnavailable):
        await exchanger.exchange("user-token", "aud")
    idp.state.token_status = 200
    token = await exchanger.exchange("user-token", "aud")
    assert token.access_token
    assert idp.state.token_hits == 2


async def test_wrong_client_credentials_are_503_never_a_fallback(idp: IdP) -> None:
    exchanger = TokenExchanger(config(idp.token_url, client_secret="wrong"))
    with pytest.raises(IdentityUnavailable) as info:
        await exchanger.exchange(idp.token(), "aud")
    assert "invalid_client" in info.value.message
    await exchanger.aclose()
