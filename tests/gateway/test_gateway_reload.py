"""Policies, keys and provider keys change under a running ``bastion serve``; shutdown flushes the audit."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import httpx2
import openai
import pytest
from servers.llm import Call

from .harness import ALICE, POLICY, Gateway, Upstreams, secrets_yaml, wait_for

ASK: Any = [{"role": "user", "content": "mail bob"}]
TOOLS: Any = [
    {"type": "function", "function": {"name": "send_email", "parameters": {"type": "object"}}}
]


@pytest.fixture(scope="module")
def gateway(start_gateway: Any) -> Gateway:
    gw: Gateway = start_gateway()
    return gw


@pytest.fixture
def client(gateway: Gateway) -> Iterator[openai.OpenAI]:
    with httpx2.Client() as http:
        yield openai.OpenAI(
            base_url=gateway.url + "/v1", api_key=ALICE, http_client=http, max_retries=0
        )


def send_email_passes(client: openai.OpenAI, upstreams: Upstreams) -> bool:
    upstreams.llm.reply("", Call("m1", "send_email", {"to": "bob@acme.example", "body": "hi"}))
    message = (
        client.chat.completions.create(model="gpt-4o", messages=ASK, tools=TOOLS).choices[0].message
    )
    return bool(message.tool_calls)


def test_an_edited_policy_applies_without_restart_and_a_broken_edit_keeps_it(
    gateway: Gateway, client: openai.OpenAI, upstreams: Upstreams
) -> None:
    policy_file = gateway.directory / "policy" / "main.policy"
    assert not send_email_passes(client, upstreams)
    policy_file.write_text(POLICY.replace('forbid call "send_email"', 'allow call "send_email"'))
    assert wait_for(lambda: send_email_passes(client, upstreams))
    policy_file.write_text(POLICY + "\nforbid call when (\n")
    assert wait_for(
        lambda: (
            httpx.get(gateway.url + "/healthz").json()["policy"]["last_reload_error"] is not None
        )
    )
    assert send_email_passes(client, upstreams)  # still the last good policy
    assert "policy reload failed; keeping the previous policy" in gateway.stderr()


def test_a_rotated_provider_key_is_used_on_the_next_request(
    gateway: Gateway, client: openai.OpenAI, upstreams: Upstreams
) -> None:
    rotated = "sk-rotated-ffffeeeeddddccccbbbb"
    (gateway.directory / "secrets.yaml").write_text(secrets_yaml(openai_key=rotated))
    upstreams.llm.reply("ok")

    def upstream_saw_rotated_key() -> bool:
        client.chat.completions.create(model="gpt-4o", messages=ASK)
        return upstreams.recorder.headers[-1]["authorization"] == f"Bearer {rotated}"

    assert wait_for(upstream_saw_rotated_key)


def test_a_revoked_key_is_refused_without_restart(
    gateway: Gateway, client: openai.OpenAI, upstreams: Upstreams
) -> None:
    keys = gateway.directory / "keys.yaml"
    keys.write_text(
        keys.read_text().replace("subject: alice\n", "subject: alice\n    revoked: true\n")
    )

    def refused() -> bool:
        try:
            client.chat.completions.create(model="gpt-4o", messages=ASK)
        except openai.AuthenticationError:
            return True
        return False

    assert wait_for(refused)


def test_graceful_shutdown_flushes_the_audit(start_gateway: Any, upstreams: Upstreams) -> None:
    # A gateway of its own: the other tests here edit its policy and revoke its key.
    gateway: Gateway = start_gateway()
    with httpx2.Client() as http:
        client = openai.OpenAI(
            base_url=gateway.url + "/v1", api_key=ALICE, http_client=http, max_retries=0
        )
        assert not send_email_passes(client, upstreams)
        policy_file = gateway.directory / "policy" / "main.policy"
        policy_file.write_text(
            POLICY.replace('forbid call "send_email"', 'allow call "send_email"')
        )
        assert wait_for(lambda: send_email_passes(client, upstreams))
    assert gateway.stop() == 0
    records = gateway.audit_lines()
    assert any(r["target"] == "send_email" and r["effect"] == "forbid" for r in records)
    assert any(r["target"] == "send_email" and r["effect"] == "allow" for r in records)
