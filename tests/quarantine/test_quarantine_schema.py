"""The safe JSON-schema subset: what is refused at construction, what values pass."""

from __future__ import annotations

from typing import Any

import pytest

from bastion.quarantine import SafeSchema, SchemaLimits, SchemaViolation, UnsafeSchemaError

TOKEN = {"type": "string", "pattern": "[A-Z]{2,5}-[0-9]{1,6}", "maxLength": 12}
SAFE = {
    "type": "object",
    "properties": {
        "status": {"type": "string", "enum": ["open", "closed"]},
        "priority": {"type": "integer", "minimum": 1, "maximum": 5},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "ticket": TOKEN,
        "tags": {
            "type": "array",
            "items": {"enum": ["a", "b", 3, True]},
            "maxItems": 4,
            "uniqueItems": True,
        },
        "flags": {
            "type": "object",
            "properties": {"spam": {"type": "boolean"}},
            "required": ["spam"],
        },
    },
    "required": ["status", "priority"],
    "additionalProperties": False,
}


@pytest.fixture(params=["re2", "nfa"])
def safe(request: pytest.FixtureRequest) -> SafeSchema:
    return SafeSchema(SAFE, engine=request.param)


UNSAFE: list[tuple[str, Any, str]] = [
    ("free string", {"type": "string"}, "needs an 'enum' or a 'pattern'"),
    (
        "pattern without maxLength",
        {"type": "string", "pattern": "[a-z]+"},
        "'maxLength' is required",
    ),
    (
        "maxLength above limit",
        {"type": "string", "pattern": "[a-z]+", "maxLength": 500},
        "between 0 and 64",
    ),
    (
        "pattern with spaces",
        {"type": "string", "pattern": "[a-z ]+", "maxLength": 40},
        "whitespace",
    ),
    ("dot pattern", {"type": "string", "pattern": ".+", "maxLength": 40}, "whitespace"),
    ("negated class", {"type": "string", "pattern": "[^<>]+", "maxLength": 40}, "whitespace"),
    ("escaped whitespace", {"type": "string", "pattern": "a\\sb", "maxLength": 40}, "whitespace"),
    (
        "backreference",
        {"type": "string", "pattern": "(a)\\1", "maxLength": 4},
        "unsupported escape",
    ),
    ("lookahead", {"type": "string", "pattern": "(?=a)a", "maxLength": 4}, "look-around"),
    ("possessive", {"type": "string", "pattern": "a++", "maxLength": 4}, "possessive"),
    ("integer without bounds", {"type": "integer"}, "'minimum' is required"),
    ("number with one bound", {"type": "number", "minimum": 0}, "'maximum' is required"),
    ("inverted bounds", {"type": "integer", "minimum": 5, "maximum": 1}, "exceeds"),
    (
        "array without maxItems",
        {"type": "array", "items": {"type": "boolean"}},
        "'maxItems' is required",
    ),
    (
        "open object",
        {"type": "object", "properties": {"a": {"type": "boolean"}}, "additionalProperties": True},
        "false",
    ),
    ("ref", {"$ref": "#/defs/x"}, "needs a 'type'"),
    ("oneOf", {"type": "string", "oneOf": []}, "unsupported keywords"),
    (
        "format",
        {"type": "string", "format": "email", "maxLength": 9, "pattern": "a"},
        "unsupported keywords",
    ),
    ("type list", {"type": ["string", "null"]}, "type must be one of"),
    ("null type", {"type": "null"}, "type must be one of"),
    (
        "required unknown",
        {"type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["b"]},
        "required",
    ),
    ("enum of objects", {"enum": [{"a": 1}]}, "scalars"),
    ("bool bound", {"type": "integer", "minimum": False, "maximum": 3}, "finite number"),
]


@pytest.mark.parametrize(("case", "schema", "message"), UNSAFE, ids=[u[0] for u in UNSAFE])
def test_unsafe_schema_is_refused_with_a_clear_error(case: str, schema: Any, message: str) -> None:
    with pytest.raises(UnsafeSchemaError, match=message):
        SafeSchema(schema)


def test_nesting_deeper_than_the_limit_is_refused() -> None:
    schema: dict[str, Any] = {"type": "boolean"}
    for _ in range(4):
        schema = {"type": "object", "properties": {"x": schema}}
    SafeSchema(schema, limits=SchemaLimits(max_depth=5))
    with pytest.raises(UnsafeSchemaError, match="nested deeper than 4"):
        SafeSchema(schema, limits=SchemaLimits(max_depth=4))


def test_total_patterned_characters_are_bounded() -> None:
    many = {"type": "array", "items": TOKEN, "maxItems": 100}
    with pytest.raises(UnsafeSchemaError, match="patterned characters"):
        SafeSchema(many)
    assert SafeSchema({"type": "array", "items": TOKEN, "maxItems": 10}).free_chars == 120


def test_valid_value_passes_and_integral_float_becomes_int(safe: SafeSchema) -> None:
    value = {
        "status": "open",
        "priority": 3.0,
        "ticket": "AB-12",
        "tags": ["a", 3, True],
        "flags": {"spam": False},
    }
    checked = safe.validate(value)
    assert checked == {
        "status": "open",
        "priority": 3,
        "ticket": "AB-12",
        "tags": ["a", 3, True],
        "flags": {"spam": False},
    }
    assert type(checked["priority"]) is int


INVALID: list[tuple[str, Any, str]] = [
    ("unknown key", {"status": "open", "priority": 1, "comment": "hi"}, "unexpected key"),
    ("missing required", {"status": "open"}, "missing required key 'priority'"),
    ("enum mismatch", {"status": "Open", "priority": 1}, "not one of the allowed values"),
    ("string for integer", {"status": "open", "priority": "1"}, "expected a finite number"),
    ("bool for integer", {"status": "open", "priority": True}, "expected a finite number"),
    ("fraction for integer", {"status": "open", "priority": 1.5}, "expected an integer"),
    ("out of range", {"status": "open", "priority": 6}, "outside"),
    ("nan", {"status": "open", "priority": 1, "score": float("nan")}, "finite"),
    ("pattern mismatch", {"status": "open", "priority": 1, "ticket": "ab-12"}, "does not match"),
    ("pattern partial", {"status": "open", "priority": 1, "ticket": "XAB-12!"}, "does not match"),
    ("whitespace", {"status": "open", "priority": 1, "ticket": "AB-1 2"}, "whitespace"),
    ("too long", {"status": "open", "priority": 1, "ticket": "ABCDE-1234567"}, "length"),
    ("bool in enum as int", {"status": "open", "priority": 1, "tags": [1]}, "not one of"),
    ("duplicates", {"status": "open", "priority": 1, "tags": ["a", "a"]}, "not unique"),
    (
        "too many items",
        {"status": "open", "priority": 1, "tags": ["a", "b", 3, True, "a"]},
        "item count",
    ),
    (
        "nested type",
        {"status": "open", "priority": 1, "flags": {"spam": "no"}},
        r"\$\.flags\.spam: expected a boolean",
    ),
    ("not an object", ["open"], "expected an object"),
]


@pytest.mark.parametrize(("case", "value", "message"), INVALID, ids=[i[0] for i in INVALID])
def test_invalid_value_is_rejected_without_quoting_it(
    safe: SafeSchema, case: str, value: Any, message: str
) -> None:
    with pytest.raises(SchemaViolation, match=message) as info:
        safe.validate(value)
    for secretish in ("hi", "Open", "ab-12", "XAB-12!", "AB-1 2", "ABCDE-1234567"):
        if secretish in str(value):
            assert secretish not in str(info.value)
