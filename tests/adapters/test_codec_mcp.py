from __future__ import annotations

import json
from typing import Any

import httpx
import httpx2
import pytest
from mcp.client import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.server.mcpserver import MCPServer
from mcp_types import ToolAnnotations

from bastion.adapters.mcp import POLICY_DENIED, JSONRPCProtocolError, MCPCodec, MCPEventStream
from bastion.adapters.sse import SSEEvent
from bastion.errors import ProtocolError
from bastion.events import ToolCall

MODERN = "2026-07-28"
META = {
    "io.modelcontextprotocol/protocolVersion": MODERN,
    "io.modelcontextprotocol/clientCapabilities": {},
}


def build_server() -> MCPServer:
    server = MCPServer("bastion-test")

    @server.tool(annotations=ToolAnnotations(readOnlyHint=True, idempotentHint=True))
    def get_weather(city: str) -> dict[str, Any]:
        """Weather for a city."""
        return {"city": city, "temperature": 21}

    @server.tool(annotations=ToolAnnotations(destructiveHint=True, openWorldHint=True))
    def send_email(to: str, body: str) -> str:
        """Send an e-mail."""
        return f"sent to {to}"

    return server


def post(
    url: str, body: dict[str, Any] | list[Any], headers: dict[str, str] | None = None
) -> httpx.Response:
    base = {"accept": "application/json, text/event-stream", "content-type": "application/json"}
    return httpx.post(
        f"{url}/mcp", content=json.dumps(body), headers={**base, **(headers or {})}, timeout=10
    )


def request(method: str, params: dict[str, Any] | None = None, id: int = 1) -> dict[str, Any]:
    message: dict[str, Any] = {"jsonrpc": "2.0", "id": id, "method": method}
    if params is not None:
        message["params"] = params
    return message


# ---------------------------------------------------------------- POST bodies and headers


def test_single_request_is_parsed_with_the_default_revision() -> None:
    post_ = MCPCodec.parse_post(json.dumps(request("tools/list")).encode(), {})
    assert (post_.revision, post_.stateless, post_.batch) == ("2025-03-26", False, False)
    assert post_.messages[0].kind == "request"


def test_initialize_names_the_revision_when_no_header_is_sent() -> None:
    body = request(
        "initialize",
        {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "c", "version": "1"},
        },
    )
    assert MCPCodec.parse_post(json.dumps(body).encode(), {}).revision == "2025-06-18"


def test_notification_and_response_kinds_are_told_apart() -> None:
    batch = [
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"jsonrpc": "2.0", "id": 5, "result": {}},
    ]
    post_ = MCPCodec.parse_post(json.dumps(batch).encode(), {"MCP-Protocol-Version": "2025-03-26"})
    assert [m.kind for m in post_.messages] == ["notification", "response"]


def test_batch_is_accepted_in_2025_03_26() -> None:
    batch = [request("tools/list", id=1), request("tools/list", id=2)]
    post_ = MCPCodec.parse_post(json.dumps(batch).encode(), {"mcp-protocol-version": "2025-03-26"})
    assert post_.batch and len(post_.requests) == 2


@pytest.mark.parametrize("revision", ["2025-06-18", "2025-11-25", MODERN])
def test_batch_is_refused_in_revisions_without_batching(revision: str) -> None:
    batch = [request("tools/list", {"_meta": META} if revision == MODERN else None)]
    with pytest.raises(JSONRPCProtocolError) as info:
        MCPCodec.parse_post(json.dumps(batch).encode(), {"mcp-protocol-version": revision})
    assert info.value.code == "batch_not_allowed"


def test_malformed_json_is_a_jsonrpc_parse_error() -> None:
    with pytest.raises(JSONRPCProtocolError) as info:
        MCPCodec.parse_post(b'{"jsonrpc": "2.0", ', {})
    assert info.value.jsonrpc_code == -32700
    assert info.value.body()["error"]["code"] == -32700


def test_duplicate_keys_are_a_jsonrpc_parse_error() -> None:
    body = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"get_weather","name":"send_email"}}'
    with pytest.raises(JSONRPCProtocolError) as info:
        MCPCodec.parse_post(body, {})
    assert (info.value.code, info.value.jsonrpc_code) == ("duplicate_key", -32700)


@pytest.mark.parametrize(
    "message",
    [
        {"jsonrpc": "1.0", "id": 1, "method": "x"},
        {"jsonrpc": "2.0", "id": True, "method": "x"},
        {"jsonrpc": "2.0", "id": 1, "method": 3},
        {"jsonrpc": "2.0", "id": 1, "method": "x", "params": [1]},
        {"jsonrpc": "2.0", "id": 1, "result": {}, "error": {"code": 1, "message": "m"}},
        {"jsonrpc": "2.0", "id": 1, "error": {"code": "x", "message": "m"}},
        [],
        "hello",
    ],
)
def test_invalid_jsonrpc_shapes_are_invalid_requests(message: Any) -> None:
    with pytest.raises(JSONRPCProtocolError) as info:
        MCPCodec.parse_post(json.dumps(message).encode(), {})
    assert info.value.jsonrpc_code == -32600


def modern_call(name: str = "send_email", arguments: dict[str, Any] | None = None) -> bytes:
    params = {"name": name, "arguments": arguments or {"to": "a@b.c", "body": "hi"}, "_meta": META}
    return json.dumps(request("tools/call", params)).encode()


MODERN_HEADERS = {
    "MCP-Protocol-Version": MODERN,
    "Mcp-Method": "tools/call",
    "Mcp-Name": "send_email",
}


def test_stateless_request_with_agreeing_headers_is_accepted() -> None:
    post_ = MCPCodec.parse_post(modern_call(), MODERN_HEADERS)
    assert post_.stateless
    assert MCPCodec.tool_call(post_.messages[0]) == ToolCall(
        "1", "send_email", {"to": "a@b.c", "body": "hi"}
    )


def test_mcp_name_header_that_disagrees_with_the_body_is_refused() -> None:
    with pytest.raises(ProtocolError) as info:
        MCPCodec.parse_post(modern_call(), {**MODERN_HEADERS, "Mcp-Name": "get_weather"})
    assert info.value.code == "header_mismatch"


def test_mcp_method_header_that_disagrees_with_the_body_is_refused() -> None:
    with pytest.raises(ProtocolError) as info:
        MCPCodec.parse_post(modern_call(), {**MODERN_HEADERS, "Mcp-Method": "tools/list"})
    assert info.value.code == "header_mismatch"


def test_missing_mcp_name_is_refused_in_the_stateless_revision() -> None:
    headers = {k: v for k, v in MODERN_HEADERS.items() if k != "Mcp-Name"}
    with pytest.raises(ProtocolError) as info:
        MCPCodec.parse_post(modern_call(), headers)
    assert info.value.code == "header_mismatch"


def test_routing_header_sent_twice_is_refused() -> None:
    pairs = [*MODERN_HEADERS.items(), ("mcp-name", "send_email")]
    with pytest.raises(ProtocolError) as info:
        MCPCodec.parse_post(modern_call(), pairs)
    assert info.value.code == "header_mismatch"


def test_base64_encoded_mcp_name_is_compared_decoded() -> None:
    name = "envoyer_courriel_é"
    headers = {**MODERN_HEADERS, "Mcp-Name": "=?base64?ZW52b3llcl9jb3VycmllbF/DqQ==?="}
    post_ = MCPCodec.parse_post(modern_call(name), headers)
    assert MCPCodec.tool_call(post_.messages[0]).name == name  # type: ignore[union-attr]


def test_disagreeing_headers_are_refused_in_handshake_revisions_too() -> None:
    body = json.dumps(request("tools/call", {"name": "send_email", "arguments": {}})).encode()
    with pytest.raises(ProtocolError) as info:
        MCPCodec.parse_post(body, {"mcp-protocol-version": "2025-11-25", "mcp-name": "get_weather"})
    assert info.value.code == "header_mismatch"


def test_meta_protocol_version_must_agree_with_the_header() -> None:
    with pytest.raises(ProtocolError) as info:
        MCPCodec.parse_post(modern_call(), {**MODERN_HEADERS, "MCP-Protocol-Version": "2025-11-25"})
    assert info.value.code == "header_mismatch"


def test_session_id_is_refused_in_the_stateless_revision() -> None:
    with pytest.raises(ProtocolError):
        MCPCodec.parse_post(modern_call(), {**MODERN_HEADERS, "Mcp-Session-Id": "abc"})


def test_unknown_protocol_version_is_refused() -> None:
    with pytest.raises(ProtocolError) as info:
        MCPCodec.parse_post(
            json.dumps(request("tools/list")).encode(), {"mcp-protocol-version": "1999-01-01"}
        )
    assert info.value.code == "unsupported_protocol_version"


def test_tool_call_arguments_that_are_not_an_object_are_refused() -> None:
    body = json.dumps(request("tools/call", {"name": "x", "arguments": [1]})).encode()
    (message,) = MCPCodec.parse_post(body, {}).messages
    with pytest.raises(ProtocolError):
        MCPCodec.tool_call(message)


def test_list_cursor_is_extracted() -> None:
    (message,) = MCPCodec.parse_post(
        json.dumps(request("tools/list", {"cursor": "c2"})).encode(), {}
    ).messages
    assert MCPCodec.list_cursor(message) == "c2"


def test_refusals_as_tool_error_and_as_jsonrpc_error() -> None:
    assert MCPCodec.refusal_result(7, "blocked") == {
        "jsonrpc": "2.0",
        "id": 7,
        "result": {"content": [{"type": "text", "text": "blocked"}], "isError": True},
    }
    assert MCPCodec.refusal_error(7, "blocked")["error"] == {
        "code": POLICY_DENIED,
        "message": "blocked",
    }


def test_filter_tools_keeps_next_cursor() -> None:
    result = {
        "tools": [{"name": "a", "inputSchema": {}}, {"name": "b", "inputSchema": {}}],
        "nextCursor": "n",
    }
    assert MCPCodec.filter_tools(result, {"b"}) == {
        "tools": [{"name": "b", "inputSchema": {}}],
        "nextCursor": "n",
    }


def test_rewritten_call_result_drops_stale_structured_content() -> None:
    result = {
        "content": [{"type": "text", "text": "secret"}],
        "structuredContent": {"v": "secret"},
        "isError": False,
    }
    assert MCPCodec.rewrite_call_result(result, "[redacted]") == {
        "content": [{"type": "text", "text": "[redacted]"}],
        "isError": False,
    }


def test_event_stream_reply_can_be_rewritten_event_by_event() -> None:
    reply = {"jsonrpc": "2.0", "id": 1, "result": {"content": [{"type": "text", "text": "x"}]}}
    stream = MCPEventStream()
    items = stream.feed(
        b"id: 1\ndata: \n\n: ping\n\nevent: message\nid: 2\ndata: "
        + json.dumps(reply).encode()
        + b"\n\n"
    )
    stream.close()
    assert [messages is None for _, messages in items] == [True, True, False]
    event, messages = items[2]
    assert messages is not None
    new = messages[0].with_result(
        MCPCodec.rewrite_call_result(messages[0].result or {}, "[redacted]")
    )
    encoded = MCPEventStream.encode(event, new)
    assert encoded.startswith(b"event: message\nid: 2\n")
    assert MCPCodec.parse_reply(encoded, "text/event-stream")[0].result == {
        "content": [{"type": "text", "text": "[redacted]"}]
    }


def test_truncated_event_stream_reply_is_an_error() -> None:
    with pytest.raises(ProtocolError):
        MCPCodec.parse_reply(b'event: message\ndata: {"jsonrpc":', "text/event-stream")


# ---------------------------------------------------------------- against the real mcp SDK


def test_real_server_replies_parse_in_a_handshake_revision(serve: Any) -> None:
    app = build_server().streamable_http_app()
    with serve(app) as url:
        init = post(
            url,
            request(
                "initialize",
                {
                    "protocolVersion": "2025-11-25",
                    "capabilities": {},
                    "clientInfo": {"name": "bastion-test", "version": "0"},
                },
            ),
        )
        (init_reply,) = MCPCodec.parse_reply(init.content, init.headers["content-type"])
        assert init_reply.result and init_reply.result["protocolVersion"] == "2025-11-25"
        session = {
            "mcp-session-id": init.headers["mcp-session-id"],
            "mcp-protocol-version": "2025-11-25",
        }
        assert (
            post(
                url, {"jsonrpc": "2.0", "method": "notifications/initialized"}, session
            ).status_code
            == 202
        )
        listed = post(url, request("tools/list", {}, id=2), session)
        (list_reply,) = MCPCodec.parse_reply(listed.content, listed.headers["content-type"])
        called = post(
            url,
            request("tools/call", {"name": "get_weather", "arguments": {"city": "Oslo"}}, id=3),
            session,
        )
        (call_reply,) = MCPCodec.parse_reply(called.content, called.headers["content-type"])
    assert listed.headers["content-type"].startswith("text/event-stream")
    specs = {spec.name: spec for spec in MCPCodec.list_tools(list_reply.result or {})}
    assert specs["get_weather"].annotations["readOnlyHint"] is True
    assert specs["send_email"].annotations["destructiveHint"] is True
    assert specs["send_email"].input_schema["required"] == ["to", "body"]
    filtered = MCPCodec.filter_tools(list_reply.result or {}, {"get_weather"})
    assert [t["name"] for t in filtered["tools"]] == ["get_weather"]
    result = MCPCodec.call_result(
        call_reply.result or {}, ToolCall("3", "get_weather", {"city": "Oslo"})
    )
    assert result.content["structuredContent"] == {"city": "Oslo", "temperature": 21}
    assert result.is_error is False


def test_real_server_json_reply_in_the_stateless_revision(serve: Any) -> None:
    app = build_server().streamable_http_app(json_response=True)
    headers = {"mcp-protocol-version": MODERN, "mcp-method": "tools/call", "mcp-name": "send_email"}
    body = json.loads(modern_call())
    MCPCodec.parse_post(json.dumps(body).encode(), headers)
    with serve(app) as url:
        response = post(url, body, headers)
    (reply,) = MCPCodec.parse_reply(response.content, response.headers["content-type"])
    assert MCPCodec.result_texts(reply.result or {}) == ["sent to a@b.c"]


def test_real_server_and_codec_both_refuse_a_disagreeing_mcp_name(serve: Any) -> None:
    app = build_server().streamable_http_app(json_response=True)
    headers = {
        "mcp-protocol-version": MODERN,
        "mcp-method": "tools/call",
        "mcp-name": "get_weather",
    }
    with pytest.raises(JSONRPCProtocolError) as info:
        MCPCodec.parse_post(modern_call(), headers)
    with serve(app) as url:
        response = post(url, json.loads(modern_call()), headers)
    (reply,) = MCPCodec.parse_reply(response.content, response.headers["content-type"])
    assert reply.error is not None and reply.error["code"] == info.value.jsonrpc_code == -32020


class Recorder(httpx2.AsyncHTTPTransport):
    def __init__(self) -> None:
        super().__init__()
        self.posts: list[tuple[list[tuple[str, str]], bytes]] = []

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        if request.method == "POST":
            self.posts.append((list(request.headers.multi_items()), await request.aread()))
        return await super().handle_async_request(request)


@pytest.mark.parametrize("mode", ["legacy", MODERN])
async def test_every_post_of_the_real_client_parses(serve: Any, mode: str) -> None:
    recorder = Recorder()
    app = build_server().streamable_http_app()
    with serve(app) as url:
        async with (
            httpx2.AsyncClient(transport=recorder) as http,
            Client(streamable_http_client(f"{url}/mcp", http_client=http), mode=mode) as client,
        ):  # type: ignore[arg-type]
            await client.list_tools()
            await client.call_tool("send_email", {"to": "a@b.c", "body": "hello"})
    calls = []
    for headers, body in recorder.posts:
        parsed = MCPCodec.parse_post(body, headers)
        assert parsed.stateless is (mode == MODERN)
        calls += [c for c in map(MCPCodec.tool_call, parsed.messages) if c]
    assert [(c.name, dict(c.arguments)) for c in calls] == [
        ("send_email", {"to": "a@b.c", "body": "hello"})
    ]


def test_comment_events_are_kept_for_forwarding() -> None:
    stream = MCPEventStream()
    ((event, messages),) = stream.feed(b": keepalive\n")
    assert event == SSEEvent(comment="keepalive") and messages is None
