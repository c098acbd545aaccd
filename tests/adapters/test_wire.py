from __future__ import annotations

import gzip
import json
import zlib

import brotli
import pytest
import zstandard

from bastion.adapters.wire import (
    DEFAULT_MAX_DEPTH,
    BodyDecoder,
    anthropic_error,
    can_decode,
    decompress,
    dumps_compact,
    jsonrpc_error,
    loads_strict,
    openai_error,
    parse_arguments,
    protocol_error_body,
)
from bastion.errors import ProtocolError


def code_of(data: bytes | str, **kwargs: int) -> str:
    with pytest.raises(ProtocolError) as info:
        loads_strict(data, **kwargs)
    return info.value.code


def test_valid_json_parses_like_the_standard_library() -> None:
    text = '{"a": [1, 2.5, true, null, "é😀"], "b": {"c": "\\u00e9"}}'
    assert loads_strict(text.encode()) == json.loads(text)


def test_duplicate_top_level_key_is_rejected() -> None:
    assert code_of(b'{"model": "a", "model": "b"}') == "duplicate_key"


def test_duplicate_key_deep_inside_arrays_is_rejected() -> None:
    assert (
        code_of(b'{"messages": [{"role": "user"}, {"role": "tool", "role": "user"}]}')
        == "duplicate_key"
    )


def test_duplicate_key_spelled_with_an_escape_is_rejected() -> None:
    assert code_of(b'{"role": "user", "r\\u006fle": "system"}') == "duplicate_key"


def test_invalid_utf8_is_rejected() -> None:
    assert code_of(b'{"a": "\xc3\x28"}') == "invalid_utf8"


def test_overlong_utf8_encoding_is_rejected() -> None:
    assert code_of(b'{"a": "\xc0\xaf"}') == "invalid_utf8"


def test_lone_high_surrogate_escape_is_rejected() -> None:
    assert code_of(b'{"a": "\\ud83d"}') == "invalid_unicode"


def test_lone_low_surrogate_in_a_key_is_rejected() -> None:
    assert code_of(b'{"\\udc00": 1}') == "invalid_unicode"


def test_escaped_surrogate_pair_is_accepted() -> None:
    assert loads_strict(b'"\\ud83d\\ude00"') == "😀"


def test_escaped_backslash_before_u_is_not_a_surrogate() -> None:
    assert loads_strict(b'"\\\\ud800"') == "\\ud800"


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"[1, NaN]"])
def test_non_finite_numbers_are_rejected(literal: bytes) -> None:
    assert code_of(literal) == "non_finite_number"


def test_nesting_beyond_the_limit_is_rejected() -> None:
    assert code_of(b"[" * 65 + b"]" * 65, max_depth=64) == "too_deep"
    deepest = DEFAULT_MAX_DEPTH
    assert code_of(b"[" * (deepest + 1) + b"]" * (deepest + 1)) == "too_deep"
    assert code_of(b'{"a":' * (deepest + 1) + b"1" + b"}" * (deepest + 1)) == "too_deep"


def test_nesting_at_the_limit_is_accepted() -> None:
    assert loads_strict(b"[" * 64 + b"]" * 64, max_depth=64) is not None
    deepest = DEFAULT_MAX_DEPTH
    text = b"[" * deepest + b"]" * deepest
    assert loads_strict(text) == json.loads(text)


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    assert loads_strict(json.dumps({"s": "[" * 500}).encode()) == {"s": "[" * 500}


def test_extremely_deep_nesting_does_not_crash_the_parser() -> None:
    assert code_of(b"[" * 100000) == "too_deep"


@pytest.mark.parametrize(
    "body", [b"", b"{", b'{"a": 1,}', b"{'a': 1}", b'{"a": 1} x', b"\xef\xbb\xbf{}"]
)
def test_malformed_json_is_invalid_json(body: bytes) -> None:
    assert code_of(body) == "invalid_json"


def test_utf16_body_is_not_sniffed_into_json() -> None:
    assert code_of('{"a": 1}'.encode("utf-16")) == "invalid_utf8"


def test_dumps_compact_is_compact_and_keeps_unicode() -> None:
    assert dumps_compact({"a": [1, "é"]}) == '{"a":[1,"é"]}'.encode()


def test_dumps_compact_refuses_nan() -> None:
    with pytest.raises(ProtocolError):
        dumps_compact({"a": float("nan")})


def test_parse_arguments_reports_text_that_is_not_json() -> None:
    arguments, error = parse_arguments('{"to": "a@b.c"')
    assert arguments == {}
    assert error is not None and "not valid JSON" in error


def test_parse_arguments_reports_json_that_is_not_an_object() -> None:
    assert parse_arguments("[1, 2]") == ({}, "arguments are not a JSON object")


def test_parse_arguments_treats_empty_text_as_no_arguments() -> None:
    assert parse_arguments("") == ({}, None)


def test_parse_arguments_rejects_duplicate_keys() -> None:
    _, error = parse_arguments('{"to": "me", "to": "attacker"}')
    assert error is not None and "duplicate_key" in error


def test_openai_error_shape() -> None:
    assert openai_error("bad", code="duplicate_key") == {
        "error": {
            "message": "bad",
            "type": "invalid_request_error",
            "param": None,
            "code": "duplicate_key",
        }
    }


def test_anthropic_error_shape() -> None:
    assert anthropic_error("bad") == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "bad"},
    }


def test_jsonrpc_error_shape() -> None:
    assert jsonrpc_error(3, -32600, "bad") == {
        "jsonrpc": "2.0",
        "id": 3,
        "error": {"code": -32600, "message": "bad"},
    }


def test_protocol_error_body_maps_parse_errors_to_jsonrpc_parse_error() -> None:
    status, body = protocol_error_body("jsonrpc", ProtocolError("x", code="duplicate_key"))
    assert status == 400
    assert json.loads(body)["error"]["code"] == -32700


def test_protocol_error_body_gives_anthropic_413_its_type() -> None:
    status, body = protocol_error_body(
        "anthropic", ProtocolError("big", status=413, code="body_too_large")
    )
    assert status == 413
    assert json.loads(body)["error"]["type"] == "request_too_large"


PAYLOAD = b'{"messages": []}' * 500


@pytest.mark.parametrize(
    ("encoding", "compressed"),
    [
        ("gzip", gzip.compress(PAYLOAD)),
        ("deflate", zlib.compress(PAYLOAD)),
        ("br", brotli.compress(PAYLOAD)),
        ("zstd", zstandard.ZstdCompressor().compress(PAYLOAD)),
    ],
)
def test_each_supported_encoding_decodes(encoding: str, compressed: bytes) -> None:
    assert decompress(compressed, encoding, max_size=1 << 20) == PAYLOAD


def test_raw_deflate_under_the_deflate_name_decodes() -> None:
    raw = zlib.compressobj(wbits=-15)
    data = raw.compress(PAYLOAD) + raw.flush()
    assert decompress(data, "deflate", max_size=1 << 20) == PAYLOAD


def test_stacked_encodings_are_undone_in_reverse_order() -> None:
    data = brotli.compress(gzip.compress(PAYLOAD))
    assert decompress(data, "gzip, br", max_size=1 << 20) == PAYLOAD


@pytest.mark.parametrize("encoding", ["gzip", "br", "zstd"])
def test_decompression_bomb_is_stopped_with_413(encoding: str) -> None:
    zeros = b"\0" * (64 * 1024 * 1024)
    bomb = {
        "gzip": lambda: gzip.compress(zeros, compresslevel=9),
        "br": lambda: brotli.compress(zeros),
        "zstd": lambda: zstandard.ZstdCompressor().compress(zeros),
    }[encoding]()
    with pytest.raises(ProtocolError) as info:
        decompress(bomb, encoding, max_size=1 << 20)
    assert (info.value.status, info.value.code) == (413, "body_too_large")


def test_incremental_decoder_counts_output_across_chunks() -> None:
    data = gzip.compress(b"a" * 5000)
    decoder = BodyDecoder("gzip", max_size=4000)
    with pytest.raises(ProtocolError) as info:
        for i in range(0, len(data), 3):
            decoder.feed(data[i : i + 3])
    assert info.value.code == "body_too_large"


def test_truncated_gzip_is_invalid_encoding() -> None:
    data = gzip.compress(PAYLOAD)[:-20]
    with pytest.raises(ProtocolError) as info:
        decompress(data, "gzip", max_size=1 << 20)
    assert info.value.code == "invalid_encoding"


def test_corrupt_gzip_is_invalid_encoding() -> None:
    with pytest.raises(ProtocolError) as info:
        decompress(b"\x1f\x8b not gzip at all", "gzip", max_size=1 << 20)
    assert info.value.code == "invalid_encoding"


def test_unknown_encoding_is_reported_before_decoding() -> None:
    assert not can_decode("compress")
    assert can_decode("gzip, br")
    with pytest.raises(ProtocolError) as info:
        decompress(b"x", "compress", max_size=10)
    assert (info.value.status, info.value.code) == (415, "unsupported_encoding")


def test_identity_encoding_passes_bytes_through() -> None:
    assert decompress(b"plain", "identity", max_size=10) == b"plain"
