"""Provider-key custody: injection, rotation without restart, the key never shown."""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bastion.errors import UpstreamError
from bastion.identity import ProviderKeyVault, ProviderKind, VaultConfig, fingerprint

from .conftest import serve

OLD_KEY = "sk-old-0123456789abcdef0123456789abcdef"
NEW_KEY = "sk-new-fedcba9876543210fedcba9876543210"
AGENT_KEY = "bst_agent0_virtual-key-the-agent-sent"


def write_secrets(path: Path, providers: dict[str, object]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump({"providers": providers}))
    os.replace(tmp, path)


@pytest.fixture
def secrets_file(tmp_path: Path) -> Path:
    path = tmp_path / "provider-keys.yaml"
    write_secrets(path, {"openai": OLD_KEY, "anthropic": {"key": "sk-ant-1", "kind": "anthropic"}})
    return path


def vault_for(path: Path, **config: object) -> ProviderKeyVault:
    return ProviderKeyVault(
        VaultConfig.model_validate({"file": path, "check_interval_seconds": 0, **config})
    )


def test_openai_kind_gets_bearer_and_agent_credentials_are_removed(secrets_file: Path) -> None:
    agent = {
        "Authorization": f"Bearer {AGENT_KEY}",
        "x-api-key": AGENT_KEY,
        "api-key": AGENT_KEY,
        "content-type": "application/json",
    }
    headers, key = vault_for(secrets_file).inject("openai", agent)
    assert headers == {"content-type": "application/json", "authorization": f"Bearer {OLD_KEY}"}
    assert key.fingerprint == fingerprint(OLD_KEY)


def test_anthropic_kind_gets_x_api_key(secrets_file: Path) -> None:
    headers, key = vault_for(secrets_file).inject(
        "anthropic", {"authorization": f"Bearer {AGENT_KEY}", "anthropic-version": "2023-06-01"}
    )
    assert headers == {"anthropic-version": "2023-06-01", "x-api-key": "sk-ant-1"}
    assert key.kind is ProviderKind.ANTHROPIC


def test_configured_kind_applies_to_a_custom_provider(secrets_file: Path) -> None:
    write_secrets(secrets_file, {"azure-east": "az-1"})
    vault = vault_for(secrets_file, providers={"azure-east": {"kind": "azure"}})
    headers, _ = vault.inject("azure-east", {})
    assert headers == {"api-key": "az-1"}


def test_environment_variable_source_and_its_rotation() -> None:
    environ = {"GROQ_KEY": "gsk-1"}
    vault = ProviderKeyVault(
        VaultConfig.model_validate({"providers": {"groq": {"env": "GROQ_KEY"}}}), environ=environ
    )
    first = vault.key_for("groq")
    environ["GROQ_KEY"] = "gsk-2"
    second = vault.key_for("groq")
    assert first.reveal() == "gsk-1" and second.reveal() == "gsk-2"
    assert first.header() == ("authorization", "Bearer gsk-1")  # the in-flight object is unchanged


def test_file_wins_over_environment_for_the_same_provider(secrets_file: Path) -> None:
    vault = ProviderKeyVault(
        VaultConfig.model_validate(
            {"file": secrets_file, "providers": {"openai": {"env": "OPENAI_KEY"}}}
        ),
        environ={"OPENAI_KEY": "sk-env"},
    )
    assert vault.key_for("openai").reveal() == OLD_KEY


def test_missing_provider_key_is_an_upstream_error_not_a_pass_through(secrets_file: Path) -> None:
    with pytest.raises(UpstreamError) as info:
        vault_for(secrets_file).inject("mistral", {"authorization": f"Bearer {AGENT_KEY}"})
    assert info.value.status == 503 and info.value.code == "provider_key_unavailable"


def test_rotated_file_takes_effect_on_next_request(secrets_file: Path) -> None:
    vault = vault_for(secrets_file)
    before = vault.key_for("openai")
    write_secrets(secrets_file, {"openai": NEW_KEY})
    after = vault.key_for("openai")
    assert (before.reveal(), after.reveal()) == (OLD_KEY, NEW_KEY)


def test_invalid_secrets_file_keeps_last_good_keys_without_logging_them(
    secrets_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    vault = vault_for(secrets_file)
    vault.key_for("openai")
    secrets_file.write_text(f"providers:\n  openai: {NEW_KEY}: broken: [\n")
    with caplog.at_level(logging.DEBUG):
        assert vault.key_for("openai").reveal() == OLD_KEY
    assert vault.last_error and "line" in vault.last_error
    assert NEW_KEY not in caplog.text and OLD_KEY not in caplog.text
    assert "last good" in caplog.text


def test_provider_key_never_appears_in_repr_str_or_logs(
    secrets_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG):
        vault = vault_for(secrets_file)
        headers, key = vault.inject("openai", {})
        write_secrets(secrets_file, {"openai": NEW_KEY})
        rotated = vault.key_for("openai")
        logging.getLogger("test").info("using %s and %r via %s", key, rotated, vault)
    shown = " ".join(
        [repr(key), str(key), f"{key}", repr(rotated), repr(vault), str(vault), caplog.text]
    )
    for secret in (OLD_KEY, NEW_KEY, "sk-ant-1"):
        assert secret not in shown
    assert fingerprint(NEW_KEY) in caplog.text  # rotation is logged, by fingerprint
    assert re.fullmatch(r"sha256:[0-9a-f]{12}", key.fingerprint)
    with pytest.raises(TypeError):
        pickle.dumps(key)
    with pytest.raises(AttributeError):
        key._secret = "x"
    assert headers["authorization"] == f"Bearer {OLD_KEY}"


@dataclass
class Upstream:
    valid: set[str]
    seen: list[str] = field(default_factory=list)
    refused: int = 0


@pytest.fixture
def upstream() -> Iterator[tuple[str, Upstream]]:
    state = Upstream(valid={OLD_KEY, NEW_KEY})

    async def completions(request: Request) -> Response:
        presented = request.headers.get("authorization", "").removeprefix("Bearer ")
        await asyncio.sleep(0.2)  # the request is in flight while the key rotates
        if presented not in state.valid or request.headers.get("x-api-key"):
            state.refused += 1
            return JSONResponse({"error": "invalid key"}, status_code=401)
        state.seen.append(presented)
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"])])
    with serve(app) as url:
        yield url, state


async def test_rotation_with_50_requests_in_flight_loses_none(
    secrets_file: Path, upstream: tuple[str, Upstream]
) -> None:
    url, state = upstream
    vault = vault_for(secrets_file)
    agent_headers = {"authorization": f"Bearer {AGENT_KEY}", "x-api-key": AGENT_KEY}
    rotated = asyncio.Event()

    async def one(client: httpx.AsyncClient, index: int) -> int:
        if index >= 25:
            await rotated.wait()
        headers, _ = vault.inject("openai", agent_headers)  # the key is fixed for this request
        response = await client.post(f"{url}/v1/chat/completions", headers=headers, json={})
        return response.status_code

    limits = httpx.Limits(max_connections=100)
    async with httpx.AsyncClient(limits=limits, timeout=10) as client:
        tasks = [asyncio.create_task(one(client, i)) for i in range(50)]
        await asyncio.sleep(0.05)  # the first 25 are on the wire with the old key
        write_secrets(secrets_file, {"openai": NEW_KEY})
        rotated.set()
        statuses = await asyncio.gather(*tasks)
    assert statuses == [200] * 50
    assert state.refused == 0
    assert state.seen.count(OLD_KEY) == 25 and state.seen.count(NEW_KEY) == 25
    assert AGENT_KEY not in state.seen
