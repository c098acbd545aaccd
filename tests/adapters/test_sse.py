from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.adapters.sse import SSEEvent, SSEParser, encode_event
from bastion.errors import ProtocolError


def parse_all(data: bytes, **kwargs: object) -> list[SSEEvent]:
    parser = SSEParser(**kwargs)  # type: ignore[arg-type]
    events = parser.feed(data)
    parser.close()
    return events


def parse_bytewise(data: bytes) -> list[SSEEvent]:
    parser = SSEParser()
    events: list[SSEEvent] = []
    for i in range(len(data)):
        events.extend(parser.feed(data[i : i + 1]))
    parser.close()
    return events


def test_multi_line_data_is_joined_with_newlines() -> None:
    assert parse_all(b"data: one\ndata: two\n\n") == [SSEEvent(data="one\ntwo")]


def test_event_id_and_retry_fields_are_read() -> None:
    events = parse_all(b"event: update\nid: 42\nretry: 1500\ndata: x\n\n")
    assert events == [SSEEvent(data="x", event="update", id="42", retry=1500)]


def test_crlf_cr_and_lf_line_endings_give_the_same_events() -> None:
    lf = b"event: a\ndata: 1\n\ndata: 2\n\n"
    assert parse_all(lf.replace(b"\n", b"\r\n")) == parse_all(lf)
    assert parse_all(lf.replace(b"\n", b"\r")) == parse_all(lf)


def test_crlf_split_between_chunks_is_one_line_break() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\r") == []
    # The LF completing the CRLF must not count as the blank line ending the event.
    assert parser.feed(b"\ndata: b\r") == []
    assert parser.feed(b"\n\r\n") == [SSEEvent(data="a\nb")]


def test_comments_are_skipped_by_default_and_surfaced_on_request() -> None:
    stream = b": keepalive\ndata: x\n\n"
    assert parse_all(stream) == [SSEEvent(data="x")]
    assert parse_all(stream, emit_comments=True) == [
        SSEEvent(comment="keepalive"),
        SSEEvent(data="x"),
    ]


def test_leading_bom_is_dropped_even_when_split() -> None:
    parser = SSEParser()
    assert parser.feed(b"\xef") == []
    assert parser.feed(b"\xbb\xbfdata: x\n\n") == [SSEEvent(data="x")]


def test_field_without_colon_has_empty_value() -> None:
    assert parse_all(b"data\n\n") == [SSEEvent(data="")]


def test_only_one_leading_space_is_stripped_from_a_value() -> None:
    assert parse_all(b"data:  two spaces\ndata:none\n\n") == [SSEEvent(data=" two spaces\nnone")]


def test_unknown_fields_and_bad_retry_are_ignored() -> None:
    assert parse_all(b"foo: bar\nretry: 12a\ndata: x\n\n") == [SSEEvent(data="x")]


def test_id_only_block_is_surfaced_without_data() -> None:
    assert parse_all(b"id: 7\n\n") == [SSEEvent(id="7")]


def test_blank_lines_alone_dispatch_nothing() -> None:
    assert parse_all(b"\n\n\r\n") == []


def test_oversized_event_raises_protocol_error_413() -> None:
    parser = SSEParser(max_event_size=64)
    with pytest.raises(ProtocolError) as info:
        for _ in range(10):
            parser.feed(b"data: " + b"x" * 20 + b"\n")
    assert info.value.status == 413
    assert info.value.code == "sse_event_too_large"


def test_oversized_unterminated_line_raises_before_it_ends() -> None:
    parser = SSEParser(max_event_size=64)
    with pytest.raises(ProtocolError):
        parser.feed(b"data: " + b"y" * 100)


def test_size_limit_is_per_event_not_per_stream() -> None:
    parser = SSEParser(max_event_size=64)
    events = []
    for _ in range(100):
        events += parser.feed(b"data: " + b"z" * 40 + b"\n\n")
    assert len(events) == 100


def test_stream_cut_inside_an_event_is_reported_as_truncated() -> None:
    parser = SSEParser()
    parser.feed(b'data: {"partial": ')
    with pytest.raises(ProtocolError) as info:
        parser.close()
    assert info.value.code == "truncated_stream"


def test_truncation_is_dropped_silently_when_not_strict() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: x\n") == []
    assert parser.close(strict=False) == []


def test_invalid_utf8_raises_protocol_error() -> None:
    with pytest.raises(ProtocolError) as info:
        parse_all(b"data: \xff\xfe\n\n")
    assert info.value.code == "invalid_utf8"


def test_multibyte_character_split_across_chunks_survives() -> None:
    data = "data: héllo 😀\n\n".encode()
    assert parse_bytewise(data) == [SSEEvent(data="héllo 😀")]


def test_encode_round_trips_through_the_parser() -> None:
    event = SSEEvent(data="line1\nline2\r\nline3", event="delta", id="9", retry=10)
    (parsed,) = parse_all(encode_event(event))
    assert parsed == SSEEvent(data="line1\nline2\nline3", event="delta", id="9", retry=10)


def test_encode_rejects_line_breaks_in_event_name() -> None:
    with pytest.raises(ValueError):
        encode_event(SSEEvent(data="x", event="a\nb"))


def test_encode_comment() -> None:
    assert encode_event(SSEEvent(comment="ping")) == b": ping\n"


_line_end = st.sampled_from([b"\n", b"\r", b"\r\n"])
_value = st.text(
    alphabet=st.characters(blacklist_characters="\r\n", blacklist_categories=["Cs"]), max_size=12
)
_field = st.tuples(st.sampled_from(["data", "event", "id", "retry", ":", "data:", "x"]), _value)


@st.composite
def streams(draw: st.DrawFn) -> bytes:
    out = b"\xef\xbb\xbf" if draw(st.booleans()) else b""
    for _ in range(draw(st.integers(0, 6))):
        for name, value in draw(st.lists(_field, max_size=5)):
            if name == ":":
                line = f":{value}"
            elif name.endswith(":"):
                line = name[:-1]
            else:
                line = f"{name}: {value}"
            out += line.encode() + draw(_line_end)
        out += draw(_line_end)
    return out


def outcome(parse: object, stream: bytes) -> object:
    """Events, or the error code: a cut stream must fail the same way however it was chunked."""
    try:
        return parse(stream)  # type: ignore[operator]
    except ProtocolError as exc:
        return exc.code


@settings(max_examples=150, deadline=None)
@given(streams())
def test_byte_at_a_time_parsing_equals_parsing_at_once(stream: bytes) -> None:
    assert outcome(parse_bytewise, stream) == outcome(parse_all, stream)


@settings(max_examples=150, deadline=None)
@given(streams(), st.lists(st.integers(1, 9), min_size=1, max_size=40))
def test_random_chunking_equals_parsing_at_once(stream: bytes, sizes: list[int]) -> None:
    def chunked(data: bytes) -> list[SSEEvent]:
        parser = SSEParser()
        events: list[SSEEvent] = []
        pos = i = 0
        while pos < len(data):
            size = sizes[i % len(sizes)]
            events += parser.feed(data[pos : pos + size])
            pos += size
            i += 1
        parser.close()
        return events

    assert outcome(chunked, stream) == outcome(parse_all, stream)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.builds(
            SSEEvent,
            data=st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=20),
            event=st.none() | st.text(alphabet="abc.", min_size=1, max_size=5),
            id=st.none() | st.text(alphabet="0123456789", max_size=4),
        ),
        max_size=5,
    )
)
def test_encoded_events_parse_back_with_normalised_newlines(events: list[SSEEvent]) -> None:
    stream = b"".join(encode_event(e) for e in events)
    expected = [
        SSEEvent(
            data=e.data.replace("\r\n", "\n").replace("\r", "\n") if e.data else e.data,
            event=e.event,
            id=e.id,
        )
        for e in events
    ]
    assert parse_bytewise(stream) == expected
