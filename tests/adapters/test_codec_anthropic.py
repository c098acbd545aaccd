from __future__ import annotations

import json
from typing import Any

import anthropic
import httpx2
import pytest
from codec_streams import rewrite, serving, sse

from bastion.adapters.anthropic import AnthropicCodec
from bastion.adapters.sse import SSEParser
from bastion.adapters.wire import CallView, Verdict
from bastion.errors import ProtocolError

REQUEST = {
    "model": "claude-opus-4-6",
    "max_tokens": 1024,
    "system": [{"type": "text", "text": "You manage payments."}],
    "messages": [
        {"role": "user", "content": "Pay the invoice in my inbox"},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Reading."},
                {
                    "type": "tool_use",
                    "id": "toolu_1",
                    "name": "read_inbox",
                    "input": {"folder": "in"},
                },
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_1",
                    "content": [{"type": "text", "text": "IBAN DE00"}],
                },
                {"type": "text", "text": "go on"},
            ],
        },
    ],
    "tools": [
        {"name": "read_inbox", "description": "Read", "input_schema": {"type": "object"}},
        {
            "name": "pay",
            "input_schema": {"type": "object", "properties": {"iban": {"type": "string"}}},
        },
    ],
    "tool_choice": {"type": "tool", "name": "pay"},
}


def test_request_exposes_model_tools_and_user_texts() -> None:
    req = AnthropicCodec.parse_request(json.dumps(REQUEST).encode())
    assert (req.model, req.stream, req.max_tokens) == ("claude-opus-4-6", False, 1024)
    assert [t.name for t in req.tools] == ["read_inbox", "pay"]
    assert req.user_texts == ("You manage payments.", "Pay the invoice in my inbox", "go on")


def test_tool_result_is_traced_to_the_tool_use_block() -> None:
    req = AnthropicCodec.parse_request(json.dumps(REQUEST).encode())
    (view,) = req.tool_results
    assert (view.result.name, dict(view.result.arguments), view.traced) == (
        "read_inbox",
        {"folder": "in"},
        True,
    )
    assert view.result.content == [{"type": "text", "text": "IBAN DE00"}]


def test_tool_result_content_is_rewritten_in_place() -> None:
    req = AnthropicCodec.parse_request(json.dumps(REQUEST).encode())
    req.replace_tool_result(req.tool_results[0].location, "[blocked]")
    body = json.loads(req.to_bytes())
    assert body["messages"][2]["content"][0] == {
        "type": "tool_result",
        "tool_use_id": "toolu_1",
        "content": "[blocked]",
    }
    assert body["messages"][2]["content"][1] == {"type": "text", "text": "go on"}


def test_keep_tools_filters_and_neutralises_a_forced_hidden_tool() -> None:
    req = AnthropicCodec.parse_request(json.dumps(REQUEST).encode())
    req.keep_tools({"read_inbox"})
    body = json.loads(req.to_bytes())
    assert [t["name"] for t in body["tools"]] == ["read_inbox"]
    assert body["tool_choice"] == {"type": "none"}


def test_string_system_and_untraced_tool_result() -> None:
    body = {
        "model": "m",
        "max_tokens": 1,
        "system": "sys",
        "messages": [
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": "nope", "content": "x"}],
            }
        ],
    }
    req = AnthropicCodec.parse_request(json.dumps(body).encode())
    assert req.user_texts == ("sys",)
    assert req.tool_results[0].traced is False


def test_request_with_a_non_json_body_is_refused() -> None:
    with pytest.raises(ProtocolError) as info:
        AnthropicCodec.parse_request(b"{not json")
    assert info.value.code == "invalid_json"


def message(content: list[dict[str, Any]], stop: str = "tool_use") -> dict[str, Any]:
    return {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-opus-4-6",
        "content": content,
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": {"input_tokens": 10, "output_tokens": 5},
    }


PAY = {"type": "tool_use", "id": "toolu_pay", "name": "pay", "input": {"iban": "DE00"}}
READ = {"type": "tool_use", "id": "toolu_read", "name": "read_inbox", "input": {}}


def test_response_tool_use_blocks_become_calls() -> None:
    resp = AnthropicCodec.parse_response(
        json.dumps(message([{"type": "text", "text": "ok"}, PAY, READ])).encode()
    )
    assert [(v.call.id, dict(v.call.arguments), v.position) for v in resp.calls] == [
        ("toolu_pay", {"iban": "DE00"}, (1,)),
        ("toolu_read", {}, (2,)),
    ]


def test_response_refused_block_is_replaced_by_text_and_stop_reason_kept_while_calls_remain() -> (
    None
):
    resp = AnthropicCodec.parse_response(json.dumps(message([PAY, READ])).encode())
    resp.refuse({"toolu_pay": "pay blocked"})
    parsed = anthropic.types.Message.model_validate_json(resp.to_bytes())
    assert [b.type for b in parsed.content] == ["text", "tool_use"]
    assert parsed.stop_reason == "tool_use"


def test_response_with_every_call_refused_ends_the_turn() -> None:
    resp = AnthropicCodec.parse_response(json.dumps(message([PAY])).encode())
    resp.refuse({"toolu_pay": "pay blocked"})
    parsed = anthropic.types.Message.model_validate_json(resp.to_bytes())
    assert parsed.stop_reason == "end_turn"
    assert parsed.content[0].text == "pay blocked"  # type: ignore[union-attr]


def stream_events(message_start: dict[str, Any] | None = None) -> bytes:
    start = message([], stop=None)  # type: ignore[arg-type]
    start["stop_reason"] = None
    events: list[dict[str, Any]] = [
        {"type": "message_start", "message": start},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "ping"},
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "text_delta", "text": "Paying now."},
        },
        {"type": "content_block_stop", "index": 0},
    ]
    for index, block in ((1, PAY), (2, READ)):
        events.append(
            {"type": "content_block_start", "index": index, "content_block": {**block, "input": {}}}
        )
        text = json.dumps(block["input"])
        for part in (text[:4], text[4:]):
            events.append(
                {
                    "type": "content_block_delta",
                    "index": index,
                    "delta": {"type": "input_json_delta", "partial_json": part},
                }
            )
        events.append({"type": "content_block_stop", "index": index})
    events += [
        {
            "type": "message_delta",
            "delta": {"stop_reason": "tool_use", "stop_sequence": None},
            "usage": {"output_tokens": 30},
        },
        {"type": "message_stop"},
    ]
    return b"".join(sse(e, event=e["type"]) for e in events)


def refuse_pay(view: CallView) -> Verdict:
    return Verdict.refused("pay blocked") if view.call.name == "pay" else Verdict.allowed()


def events_of(data: bytes) -> list[dict[str, Any]]:
    parser = SSEParser()
    events = parser.feed(data)
    parser.close()
    return [json.loads(e.data or "") for e in events]


def test_stream_text_passes_before_any_tool_use() -> None:
    stream = stream_events()
    cut = stream.index(
        b'event: content_block_start\ndata: {"type": "content_block_start", "index": 1'
    )
    step = AnthropicCodec.stream_rewriter().feed(stream[:cut])
    assert [e["type"] for e in events_of(step.output)][-1] == "content_block_stop"


def test_stream_with_one_refused_call_is_accumulated_by_the_real_sdk(serve: Any) -> None:
    seen: list[CallView] = []
    out = rewrite(AnthropicCodec.stream_rewriter(), stream_events(), refuse_pay, seen=seen)
    assert [(v.call.name, dict(v.call.arguments)) for v in seen] == [
        ("pay", {"iban": "DE00"}),
        ("read_inbox", {}),
    ]
    app = serving("/v1/messages", out)
    with serve(app) as url, httpx2.Client() as http:
        client = anthropic.Anthropic(
            base_url=url, api_key="sk-ant-test", http_client=http, max_retries=0
        )
        with client.messages.stream(
            model="claude-opus-4-6", max_tokens=100, messages=[{"role": "user", "content": "pay"}]
        ) as stream:
            final = stream.get_final_message()
    assert [b.type for b in final.content] == ["text", "text", "tool_use"]
    assert final.content[1].text == "pay blocked"  # type: ignore[union-attr]
    assert final.content[2].id == "toolu_read"  # type: ignore[union-attr]
    assert final.stop_reason == "tool_use"


def test_stream_with_every_call_refused_ends_the_turn() -> None:
    out = rewrite(
        AnthropicCodec.stream_rewriter(), stream_events(), lambda v: Verdict.refused("no")
    )
    (delta,) = [e for e in events_of(out) if e["type"] == "message_delta"]
    assert delta["delta"]["stop_reason"] == "end_turn"
    indexes = [e["index"] for e in events_of(out) if e["type"] == "content_block_start"]
    assert indexes == [0, 1, 2]


def test_stream_all_allowed_is_unchanged() -> None:
    stream = stream_events()
    out = rewrite(
        AnthropicCodec.stream_rewriter(), stream, lambda v: Verdict.allowed(), chunk_size=3
    )
    assert events_of(out) == events_of(stream)


def test_stream_input_that_is_not_json_is_surfaced_as_invalid() -> None:
    events = [
        {"type": "content_block_start", "index": 0, "content_block": {**PAY, "input": {}}},
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "input_json_delta", "partial_json": '{"iban": '},
        },
        {"type": "content_block_stop", "index": 0},
    ]
    step = AnthropicCodec.stream_rewriter().feed(b"".join(sse(e, event=e["type"]) for e in events))
    (view,) = step.needs_verdict
    assert not view.valid


def test_stream_cut_inside_a_tool_use_block_fails_on_close() -> None:
    stream = stream_events()
    rewriter = AnthropicCodec.stream_rewriter()
    rewriter.feed(
        stream[
            : stream.index(
                b'event: content_block_stop\ndata: {"type": "content_block_stop", "index": 1'
            )
        ]
    )
    with pytest.raises(ProtocolError) as info:
        rewriter.close()
    assert info.value.code == "truncated_stream"


def test_stream_pending_beyond_the_cap_raises() -> None:
    rewriter = AnthropicCodec.stream_rewriter(max_pending=500)
    rewriter.feed(
        sse({"type": "content_block_start", "index": 0, "content_block": {**PAY, "input": {}}})
    )
    delta = {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "input_json_delta", "partial_json": "x" * 100},
    }
    with pytest.raises(ProtocolError) as info:
        for _ in range(10):
            rewriter.feed(sse(delta))
    assert info.value.code == "pending_too_large"
