from __future__ import annotations

from bastion.adapters.mcp import HANDSHAKE_REVISIONS, STATELESS_REVISION, MCPCodec


def test_refusal_result_carries_result_type_in_the_stateless_revision() -> None:
    answer = MCPCodec.refusal_result(7, "blocked", revision=STATELESS_REVISION)
    assert answer == {
        "jsonrpc": "2.0",
        "id": 7,
        "result": {
            "content": [{"type": "text", "text": "blocked"}],
            "isError": True,
            "resultType": "complete",
        },
    }


def test_refusal_result_has_no_result_type_in_handshake_revisions() -> None:
    for revision in HANDSHAKE_REVISIONS:
        assert "resultType" not in MCPCodec.refusal_result(7, "x", revision=revision)["result"]
