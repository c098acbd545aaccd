"""The stream rewriters' byte-level fast path gives what the event-by-event path gives.

The reference below is the rewriter as it was before the fast path: every chunk
goes through the SSE parser and every event through ``_on_event``. The fast path
passes runs of whole events through unparsed when they cannot concern a tool
call, so its bytes may differ (comments and id-only blocks kept, upstream
spelling kept); what must not differ is what a client reads from it: the same
data-bearing events, the same calls surfaced for a verdict, the same error.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.adapters.anthropic import AnthropicStreamRewriter
from bastion.adapters.openai import ChatStreamRewriter, ResponsesStreamRewriter
from bastion.adapters.sse import SSEEvent, SSEParser
from bastion.adapters.wire import StreamRewriter, StreamStep, Verdict
from bastion.errors import ProtocolError


def _reference(cls: type[StreamRewriter]) -> type[StreamRewriter]:
    def feed(self: StreamRewriter, chunk: bytes) -> StreamStep:
        for event in self._parser.feed(chunk):
            if event.data is not None:
                self._on_event(event)
        return self._step()

    return type(f"Reference{cls.__name__}", (cls,), {"feed": feed})


def _run(
    rewriter: StreamRewriter, chunks: list[bytes], refused: set[str]
) -> tuple[list[SSEEvent], list[tuple[str, str, str]], str | None]:
    out = b""
    seen: list[tuple[str, str, str]] = []
    try:
        for chunk in chunks:
            step = rewriter.feed(chunk)
            out += step.output
            pending = list(step.needs_verdict)
            while pending:
                view = pending.pop(0)
                seen.append((view.call.id, view.call.name, json.dumps(dict(view.call.arguments))))
                verdict = (
                    Verdict.refused(f"no {view.call.name}")
                    if view.call.id in refused
                    else Verdict.allowed()
                )
                step = rewriter.decide(view.call.id, verdict)
                out += step.output
                pending.extend(step.needs_verdict)
        out += rewriter.close()
    except ProtocolError as exc:
        return [], seen, exc.code
    parser = SSEParser()
    events = [e for e in parser.feed(out) if e.data is not None]
    parser.close()
    return events, seen, None


def _assert_same(
    cls: type[StreamRewriter], stream: bytes, cuts: list[int], refused: set[str]
) -> None:
    bounds = [0, *sorted(c for c in set(cuts) if 0 < c < len(stream)), len(stream)]
    chunks = [stream[a:b] for a, b in itertools.pairwise(bounds)]
    fast = _run(cls(max_event_size=4096), chunks, refused)
    slow = _run(_reference(cls)(max_event_size=4096), chunks, refused)
    assert fast == slow


# ---------------------------------------------------------------- stream shapes

texts = st.lists(
    st.sampled_from([*'abc xyz,.é☃"\\/{}[]:', "\n", "tool_calls", "tool_use", "\u2028"]),
    max_size=8,
).map("".join)
extras = st.sampled_from(
    [b"", b": keep-alive\n\n", b"id: 9\n\n", b"retry: 100\n\n", b"event: ping\ndata: {}\n\n"]
)
endings = st.sampled_from(["lf", "crlf", "cr", "mixed"])


def _block(payload: dict[str, Any] | str, ascii_only: bool, event: str | None = None) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=ascii_only)
    head = f"event: {event}\n" if event else ""
    return (head + "".join(f"data: {line}\n" for line in data.split("\n")) + "\n").encode()


def _line_ends(stream: bytes, ending: str, draw: Callable[[Any], Any]) -> bytes:
    if ending == "crlf":
        return stream.replace(b"\n", b"\r\n")
    if ending == "cr":
        return stream.replace(b"\n", b"\r")
    if ending == "mixed":
        parts = stream.split(b"\n")
        seps = [draw(st.sampled_from([b"\n", b"\r\n", b"\r"])) for _ in parts[1:]]
        return parts[0] + b"".join(s + p for s, p in zip(seps, parts[1:], strict=True))
    return stream


@st.composite
def chat_streams(draw: Callable[[Any], Any]) -> tuple[bytes, set[str]]:
    ascii_only = draw(st.booleans())
    envelope = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    blocks: list[bytes] = []

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return _block({**envelope, "choices": [choice]}, ascii_only)

    for text in draw(st.lists(texts, max_size=6)):
        blocks.append(chunk({"content": text}))
        blocks.append(draw(extras))
    calls = draw(st.lists(st.sampled_from(["read", "send", "tool_calls"]), max_size=3))
    for k, name in enumerate(calls):
        args = json.dumps({"q": draw(texts)})
        blocks.append(
            chunk(
                {
                    "tool_calls": [
                        {
                            "index": k,
                            "id": f"call_{k}",
                            "type": "function",
                            "function": {"name": name, "arguments": ""},
                        }
                    ]
                }
            )
        )
        for i in range(0, len(args), 5):
            blocks.append(
                chunk({"tool_calls": [{"index": k, "function": {"arguments": args[i : i + 5]}}]})
            )
            blocks.append(draw(extras))
    blocks.append(chunk({}, "tool_calls" if calls else "stop"))
    blocks.append(_block({**envelope, "choices": [], "usage": {"total_tokens": 3}}, ascii_only))
    blocks.append(b"data: [DONE]\n\n")
    stream = _line_ends(b"".join(blocks), draw(endings), draw)
    refused = {f"call_{k}" for k in range(len(calls)) if draw(st.booleans())}
    return stream, refused


@st.composite
def anthropic_streams(draw: Callable[[Any], Any]) -> tuple[bytes, set[str]]:
    ascii_only = draw(st.booleans())
    blocks = [
        _block(
            {"type": "message_start", "message": {"id": "m", "content": []}},
            ascii_only,
            "message_start",
        )
    ]
    refused: set[str] = set()
    kinds = draw(st.lists(st.sampled_from(["text", "tool_use"]), max_size=4))
    for index, kind in enumerate(kinds):
        if kind == "text":
            block: dict[str, Any] = {"type": "text", "text": ""}
        else:
            block = {"type": "tool_use", "id": f"tu_{index}", "name": "send", "input": {}}
            if draw(st.booleans()):
                refused.add(f"tu_{index}")
        start = {"type": "content_block_start", "index": index, "content_block": block}
        blocks.append(_block(start, ascii_only, "content_block_start"))
        for text in draw(st.lists(texts, max_size=3)):
            if kind == "text":
                delta = {"type": "text_delta", "text": text}
            else:
                delta = {"type": "input_json_delta", "partial_json": ""}
            body = {"type": "content_block_delta", "index": index, "delta": delta}
            blocks.append(_block(body, ascii_only, "content_block_delta"))
            blocks.append(draw(extras))
        if kind == "tool_use":
            args = json.dumps({"to": draw(texts)})
            delta = {"type": "input_json_delta", "partial_json": args}
            body = {"type": "content_block_delta", "index": index, "delta": delta}
            blocks.append(_block(body, ascii_only, "content_block_delta"))
        stop = {"type": "content_block_stop", "index": index}
        blocks.append(_block(stop, ascii_only, "content_block_stop"))
    reason = draw(st.sampled_from(["tool_use", "end_turn"]))
    blocks.append(
        _block(
            {"type": "message_delta", "delta": {"stop_reason": reason}}, ascii_only, "message_delta"
        )
    )
    blocks.append(_block({"type": "message_stop"}, ascii_only, "message_stop"))
    return _line_ends(b"".join(blocks), draw(endings), draw), refused


@st.composite
def responses_streams(draw: Callable[[Any], Any]) -> tuple[bytes, set[str]]:
    ascii_only = draw(st.booleans())
    seq = 0
    blocks: list[bytes] = []
    refused: set[str] = set()
    output: list[dict[str, Any]] = []

    def emit(payload: dict[str, Any]) -> None:
        nonlocal seq
        blocks.append(_block({**payload, "sequence_number": seq}, ascii_only, payload["type"]))
        seq += 1

    emit({"type": "response.created", "response": {"id": "r", "output": []}})
    for i, kind in enumerate(draw(st.lists(st.sampled_from(["message", "call"]), max_size=4))):
        if kind == "message":
            item: dict[str, Any] = {"id": f"msg_{i}", "type": "message", "role": "assistant"}
            emit({"type": "response.output_item.added", "output_index": i, "item": item})
            for text in draw(st.lists(texts, max_size=3)):
                emit(
                    {
                        "type": "response.output_text.delta",
                        "output_index": i,
                        "item_id": f"msg_{i}",
                        "delta": text,
                    }
                )
                blocks.append(draw(extras))
        else:
            args = json.dumps({"q": draw(texts)})
            item = {
                "id": f"fc_{i}",
                "type": "function_call",
                "call_id": f"call_{i}",
                "name": "send",
                "arguments": "",
            }
            if draw(st.booleans()):
                refused.add(f"call_{i}")
            emit({"type": "response.output_item.added", "output_index": i, "item": item})
            emit(
                {
                    "type": "response.function_call_arguments.delta",
                    "output_index": i,
                    "item_id": f"fc_{i}",
                    "delta": args,
                }
            )
            item = {**item, "arguments": args}
        emit({"type": "response.output_item.done", "output_index": i, "item": item})
        output.append(item)
    emit({"type": "response.completed", "response": {"id": "r", "output": output}})
    return _line_ends(b"".join(blocks), draw(endings), draw), refused


cut_lists = st.lists(st.integers(1, 4000), max_size=30)


@settings(max_examples=300, deadline=None)
@given(chat_streams(), cut_lists)
def test_chat_fast_path_reads_like_the_event_by_event_path(
    case: tuple[bytes, set[str]], cuts: list[int]
) -> None:
    _assert_same(ChatStreamRewriter, case[0], cuts, case[1])


@settings(max_examples=300, deadline=None)
@given(anthropic_streams(), cut_lists)
def test_anthropic_fast_path_reads_like_the_event_by_event_path(
    case: tuple[bytes, set[str]], cuts: list[int]
) -> None:
    _assert_same(AnthropicStreamRewriter, case[0], cuts, case[1])


@settings(max_examples=300, deadline=None)
@given(responses_streams(), cut_lists)
def test_responses_fast_path_reads_like_the_event_by_event_path(
    case: tuple[bytes, set[str]], cuts: list[int]
) -> None:
    _assert_same(ResponsesStreamRewriter, case[0], cuts, case[1])


@settings(max_examples=200, deadline=None)
@given(
    chat_streams(),
    cut_lists,
    st.sampled_from(["truncate", "bad_utf8", "oversized"]),
    st.integers(0, 10_000),
)
def test_broken_chat_streams_fail_alike_on_both_paths(
    case: tuple[bytes, set[str]], cuts: list[int], damage: str, where: int
) -> None:
    stream, refused = case
    at = where % max(1, len(stream))
    if damage == "truncate":
        stream = stream[:at]
    elif damage == "bad_utf8":
        stream = stream[:at] + b"\xff" + stream[at:]
    else:
        stream = stream[:at] + b"data: " + b"x" * 5000 + b"\n\n" + stream[at:]
    _assert_same(ChatStreamRewriter, stream, cuts, refused)


def test_text_events_pass_through_byte_for_byte() -> None:
    stream = b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n: note\n\n' * 3
    rewriter = ChatStreamRewriter()
    out = rewriter.feed(stream[:50]).output + rewriter.feed(stream[50:]).output
    assert out + rewriter.close() == stream


def test_a_chunk_with_a_tool_call_fragment_takes_the_parsing_path() -> None:
    call = {"index": 0, "id": "c1", "type": "function", "function": {"name": "x", "arguments": ""}}
    chunk = {"choices": [{"index": 0, "delta": {"tool_calls": [call]}}]}
    rewriter = ChatStreamRewriter()
    step = rewriter.feed(f"data: {json.dumps(chunk)}\n\n".encode())
    assert step.output == b""
    assert rewriter.pending_bytes > 0


def test_a_cr_pair_split_before_its_lf_still_ends_the_event() -> None:
    # "\r\r\n" is a line end then an empty line; cut after the first CR.
    stream = b'event: a\r\ndata: {"x": 1}\r\r\nevent: b\ndata: {"y": 2}\n\n'
    cut = stream.index(b"\r\r") + 1
    _assert_same(AnthropicStreamRewriter, stream, [cut], set())
    rewriter = AnthropicStreamRewriter()
    out = rewriter.feed(stream[:cut]).output + rewriter.feed(stream[cut:]).output
    parser = SSEParser()
    assert [e.event for e in parser.feed(out + rewriter.close())] == ["a", "b"]
