"""Session keys and canonical JSON."""

from __future__ import annotations

import pytest

from bastion.events import Identity
from bastion.session import SessionKey, canonical_json

ALICE = Identity(subject="alice", tenant="acme")
MALLORY = Identity(subject="mallory", tenant="acme")


def test_canonical_json_sorts_keys_and_drops_whitespace() -> None:
    assert (
        canonical_json({"b": [1, {"d": 2, "c": 3}], "a": "x"}) == '{"a":"x","b":[1,{"c":3,"d":2}]}'
    )


def test_canonical_json_normalises_unicode_to_nfc() -> None:
    assert canonical_json({"to": "Jose\u0301"}) == canonical_json({"to": "Jos\u00e9"})
    assert canonical_json({"to": "Jos\u00e9"}) == '{"to":"Jos\u00e9"}'


def test_canonical_json_refuses_keys_that_collide_after_normalisation() -> None:
    with pytest.raises(ValueError, match="collide"):
        canonical_json({"Jose\u0301": 1, "Jos\u00e9": 2})


def test_canonical_json_refuses_nan_and_non_json_values() -> None:
    with pytest.raises(ValueError):
        canonical_json({"x": float("nan")})
    with pytest.raises(ValueError):
        canonical_json({"x": object()})


def test_handshake_revision_keys_by_mcp_session_id() -> None:
    key = SessionKey.from_request(
        ALICE, {"Mcp-Session-Id": "s-1", "MCP-Protocol-Version": "2025-06-18"}
    )
    assert (key.kind, key.value) == ("mcp-session", "s-1")


def test_stateless_revision_ignores_mcp_session_id_and_uses_the_conversation_header() -> None:
    headers = {
        "mcp-session-id": "s-1",
        "mcp-protocol-version": "2026-07-28",
        "X-Bastion-Conversation": "conv-9",
    }
    key = SessionKey.from_request(ALICE, headers)
    assert (key.kind, key.value) == ("conversation", "conv-9")


def test_the_conversation_header_name_is_configurable() -> None:
    key = SessionKey.from_request(
        ALICE, {"X-Thread": "t-1"}, protocol_version="2026-07-28", conversation_header="x-thread"
    )
    assert (key.kind, key.value) == ("conversation", "t-1")


def test_without_session_or_conversation_the_key_is_the_identity() -> None:
    key = SessionKey.from_request(ALICE, {"MCP-Protocol-Version": "2026-07-28"})
    assert key == SessionKey.for_identity(ALICE)
    assert key.kind == "identity"


def test_the_same_session_id_under_another_identity_is_another_key() -> None:
    headers = {"Mcp-Session-Id": "s-1"}
    alice = SessionKey.from_request(ALICE, headers)
    assert SessionKey.from_request(MALLORY, headers).id != alice.id
    other_tenant = Identity(subject="alice", tenant="globex")
    assert SessionKey.from_request(other_tenant, headers).id != alice.id


def test_a_session_id_cannot_impersonate_the_identity_fallback_key() -> None:
    # A client-chosen session id equal to the fallback's value still differs by kind.
    crafted = SessionKey.from_request(ALICE, {"Mcp-Session-Id": "x", "X-Bastion-Conversation": "x"})
    assert crafted.id != SessionKey.for_identity(ALICE).id
    assert crafted.id != SessionKey("alice", "acme", "conversation", "x").id
