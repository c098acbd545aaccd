"""A small, strict JSON-schema subset for what may cross out of quarantine.

The quarantined model reads attacker-controlled text, so anything it says may be
attacker-chosen. What it says reaches the privileged side only as a value that
fits a *safe shape*, checked here:

- ``{"type": "boolean"}``;
- ``{"type": "integer" | "number", "minimum": a, "maximum": b}`` (both bounds,
  finite), or ``{"type": "integer", "enum": [...]}``;
- ``{"type": "string", "enum": [...]}`` (strings the policy author wrote), or
  ``{"type": "string", "pattern": p, "maxLength": n}`` (optional ``minLength``),
  where ``p`` is in the linear-time subset of ``bastion.policy.regex`` without
  word boundaries and with ``^``/``$`` only at its very start/end, is matched
  against the whole string, and cannot match whitespace or control characters:
  a patterned string is one token (an id, a date, an amount), never a sentence
  that could carry instructions;
- ``{"enum": [...]}`` of strings, integers, numbers or booleans;
- ``{"type": "array", "items": <safe>, "maxItems": n}`` (optional ``minItems``,
  ``uniqueItems``);
- ``{"type": "object", "properties": {...}, "required": [...]}`` with
  ``additionalProperties`` absent or false (unknown keys are always rejected).

``title`` and ``description`` are allowed anywhere and ignored. Anything else
(``$ref``, ``oneOf``, ``format``, free strings, type lists, unbounded arrays,
nesting deeper than ``SchemaLimits.max_depth``, more patterned characters in
total than ``SchemaLimits.max_free_chars``) is refused when the schema is built,
with ``UnsafeSchemaError``.

``SafeSchema(schema).validate(value)`` returns the value (integral floats become
ints) or raises ``SchemaViolation``. Validation is linear in the size of the
value, and error messages name the path and the rule, never the offending value
(so an error message can be shown to the privileged model without leaking).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bastion.policy.regex import (
    Alternation,
    Assertion,
    Concat,
    Engine,
    Node,
    Parsed,
    Regex,
    RegexError,
    compile_regex,
    parse,
)

__all__ = ["SafeSchema", "SchemaLimits", "SchemaViolation", "UnsafeSchemaError"]

# Whitespace and control characters a patterned string may never contain.
UNSAFE_CHARS = (
    "".join(chr(code) for code in range(0x20))
    + " \x7f\x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000\ufeff"
    + "".join(chr(code) for code in range(0x2000, 0x200C))
)

MAX_PATTERN_LENGTH = 2000

_COMMON = frozenset({"type", "title", "description"})
_ALLOWED = {
    "boolean": _COMMON,
    "integer": _COMMON | {"minimum", "maximum", "enum"},
    "number": _COMMON | {"minimum", "maximum"},
    "string": _COMMON | {"enum", "pattern", "maxLength", "minLength"},
    "array": _COMMON | {"items", "maxItems", "minItems", "uniqueItems"},
    "object": _COMMON | {"properties", "required", "additionalProperties"},
}


class UnsafeSchemaError(ValueError):
    """A schema is not in the safe subset; the message says which rule and where."""


class SchemaViolation(ValueError):
    """A value does not fit its schema. The message never quotes the value."""


@dataclass(frozen=True, slots=True)
class SchemaLimits:
    """Bounds every safe schema must stay within."""

    max_depth: int = 4
    max_string_length: int = 64
    max_items: int = 100
    max_properties: int = 50
    max_enum: int = 200
    max_free_chars: int = 1024


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _same_scalar(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if _is_number(a) and _is_number(b):
        return bool(a == b)
    return type(a) is type(b) and a == b


def _edge_anchors(node: Node) -> set[Assertion]:
    """The ``^`` that starts ``node`` and the ``$`` that ends it, if any."""
    items = node.items if isinstance(node, Concat) else (node,)
    if not items:
        return set()
    first, last = items[0], items[-1]
    anchors = {first} if isinstance(first, Assertion) and first.kind == "bol" else set()
    return anchors | ({last} if isinstance(last, Assertion) and last.kind == "eol" else set())


def _token_pattern_problem(parsed: Parsed) -> str | None:
    """What a token pattern uses beyond the plain subset: word boundaries, inner anchors."""
    root = parsed.root
    if isinstance(root, Alternation) and any(_edge_anchors(b) for b in root.branches):
        return "an anchored alternation must be grouped: ^(?:a|b)$"
    allowed = _edge_anchors(root)
    for node in parsed.nodes():
        if isinstance(node, Assertion) and node not in allowed:
            if node.kind in ("word", "nonword"):
                return f"word boundaries (\\b, \\B) are not supported (at offset {node.offset})"
            return f"anchors are only allowed at the start and end (at offset {node.offset})"
    return None


class _Node:
    def check(self, value: Any, path: str) -> Any:
        raise NotImplementedError


class _Boolean(_Node):
    def check(self, value: Any, path: str) -> Any:
        if not isinstance(value, bool):
            raise SchemaViolation(f"{path}: expected a boolean")
        return value


@dataclass(slots=True)
class _Numeric(_Node):
    integer: bool
    minimum: float
    maximum: float

    def check(self, value: Any, path: str) -> Any:
        if not _is_number(value) or (isinstance(value, float) and not math.isfinite(value)):
            raise SchemaViolation(f"{path}: expected a finite number")
        if self.integer and isinstance(value, float):
            if not value.is_integer():
                raise SchemaViolation(f"{path}: expected an integer")
            value = int(value)
        if not self.minimum <= value <= self.maximum:
            raise SchemaViolation(f"{path}: outside [{self.minimum}, {self.maximum}]")
        return value


@dataclass(slots=True)
class _Enum(_Node):
    values: tuple[Any, ...]

    def check(self, value: Any, path: str) -> Any:
        for allowed in self.values:
            if _same_scalar(value, allowed):
                return allowed
        raise SchemaViolation(f"{path}: not one of the allowed values")


@dataclass(slots=True)
class _Pattern(_Node):
    pattern: Regex
    min_length: int
    max_length: int

    def check(self, value: Any, path: str) -> Any:
        if not isinstance(value, str):
            raise SchemaViolation(f"{path}: expected a string")
        if not self.min_length <= len(value) <= self.max_length:
            raise SchemaViolation(f"{path}: length outside [{self.min_length}, {self.max_length}]")
        if any(char in UNSAFE_CHARS for char in value):
            raise SchemaViolation(f"{path}: whitespace or control characters")
        if not self.pattern.fullmatch(value):
            raise SchemaViolation(f"{path}: does not match the pattern")
        return value


@dataclass(slots=True)
class _Array(_Node):
    items: _Node
    min_items: int
    max_items: int
    unique: bool

    def check(self, value: Any, path: str) -> Any:
        if not isinstance(value, list):
            raise SchemaViolation(f"{path}: expected an array")
        if not self.min_items <= len(value) <= self.max_items:
            raise SchemaViolation(
                f"{path}: item count outside [{self.min_items}, {self.max_items}]"
            )
        result = [self.items.check(item, f"{path}[{index}]") for index, item in enumerate(value)]
        if self.unique:
            seen = set()
            for item in result:
                key = repr(item)
                if key in seen:
                    raise SchemaViolation(f"{path}: items are not unique")
                seen.add(key)
        return result


@dataclass(slots=True)
class _Object(_Node):
    properties: dict[str, _Node]
    required: frozenset[str]

    def check(self, value: Any, path: str) -> Any:
        if not isinstance(value, dict):
            raise SchemaViolation(f"{path}: expected an object")
        if any(key not in self.properties for key in value):
            raise SchemaViolation(f"{path}: unexpected key")
        missing = sorted(self.required.difference(value))
        if missing:
            raise SchemaViolation(f"{path}: missing required key {missing[0]!r}")
        return {
            key: self.properties[key].check(item, f"{path}.{key}") for key, item in value.items()
        }


class SafeSchema:
    """A schema checked against the safe subset, ready to validate values."""

    def __init__(
        self,
        schema: Mapping[str, Any],
        *,
        limits: SchemaLimits | None = None,
        engine: Engine | None = None,
    ) -> None:
        self.limits = limits or SchemaLimits()
        self.engine = engine
        self.schema = schema
        self._free_chars = 0
        self._root = self._build(schema, "$", depth=1, multiplier=1)

    @property
    def free_chars(self) -> int:
        """The most characters of patterned (model-chosen) strings a value can hold."""
        return self._free_chars

    def validate(self, value: Any) -> Any:
        """Return ``value`` (normalised) if it fits, else raise ``SchemaViolation``."""
        return self._root.check(value, "$")

    def _fail(self, path: str, message: str) -> UnsafeSchemaError:
        return UnsafeSchemaError(f"unsafe schema at {path}: {message}")

    def _bound(self, schema: Mapping[str, Any], key: str, path: str, *, required: bool) -> Any:
        value = schema.get(key)
        if value is None:
            if required:
                raise self._fail(path, f"'{key}' is required")
            return None
        if not _is_number(value) or not math.isfinite(value):
            raise self._fail(path, f"'{key}' must be a finite number")
        return value

    def _count(
        self, schema: Mapping[str, Any], key: str, path: str, default: int | None, ceiling: int
    ) -> int:
        value = schema.get(key, default)
        if value is None:
            raise self._fail(path, f"'{key}' is required")
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= ceiling:
            raise self._fail(path, f"'{key}' must be an integer between 0 and {ceiling}")
        return value

    def _build(self, schema: Any, path: str, *, depth: int, multiplier: int) -> _Node:
        if not isinstance(schema, Mapping):
            raise self._fail(path, "a schema must be an object")
        if depth > self.limits.max_depth:
            raise self._fail(path, f"nested deeper than {self.limits.max_depth}")
        kind = schema.get("type")
        if kind is None:
            if "enum" not in schema:
                raise self._fail(path, "needs a 'type' (or an 'enum')")
            unknown = set(schema) - {"enum", "title", "description"}
            if unknown:
                raise self._fail(path, f"unsupported keywords {sorted(unknown)}")
            return self._enum(schema["enum"], path, (str, int, float, bool))
        if not isinstance(kind, str) or kind not in _ALLOWED:
            raise self._fail(path, f"type must be one of {sorted(_ALLOWED)}")
        unknown = set(schema) - _ALLOWED[kind]
        if unknown:
            raise self._fail(path, f"unsupported keywords for {kind}: {sorted(unknown)}")
        if kind == "boolean":
            return _Boolean()
        if kind == "integer" and "enum" in schema:
            if "minimum" in schema or "maximum" in schema:
                raise self._fail(path, "use either 'enum' or bounds")
            return self._enum(schema["enum"], path, (int,))
        if kind in ("integer", "number"):
            low = self._bound(schema, "minimum", path, required=True)
            high = self._bound(schema, "maximum", path, required=True)
            if low > high:
                raise self._fail(path, "'minimum' exceeds 'maximum'")
            return _Numeric(kind == "integer", low, high)
        if kind == "string":
            return self._string(schema, path, multiplier)
        if kind == "array":
            high = self._count(schema, "maxItems", path, None, self.limits.max_items)
            low = self._count(schema, "minItems", path, 0, high)
            unique = schema.get("uniqueItems", False)
            if not isinstance(unique, bool):
                raise self._fail(path, "'uniqueItems' must be a boolean")
            if "items" not in schema:
                raise self._fail(path, "'items' is required")
            items = self._build(
                schema["items"], f"{path}[]", depth=depth + 1, multiplier=multiplier * max(high, 1)
            )
            return _Array(items, low, high, unique)
        return self._object(schema, path, depth, multiplier)

    def _enum(self, values: Any, path: str, types: tuple[type, ...]) -> _Node:
        if not isinstance(values, list) or not values or len(values) > self.limits.max_enum:
            raise self._fail(path, f"'enum' must be a list of 1 to {self.limits.max_enum} values")
        for value in values:
            ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
            if not ok or (isinstance(value, float) and not math.isfinite(value)):
                raise self._fail(path, "'enum' values must be scalars of the declared type")
        return _Enum(tuple(values))

    def _string(self, schema: Mapping[str, Any], path: str, multiplier: int) -> _Node:
        if "enum" in schema:
            if {"pattern", "maxLength", "minLength"} & set(schema):
                raise self._fail(path, "use either 'enum' or 'pattern'")
            return self._enum(schema["enum"], path, (str,))
        if "pattern" not in schema:
            raise self._fail(path, "a string needs an 'enum' or a 'pattern' with 'maxLength'")
        high = self._count(schema, "maxLength", path, None, self.limits.max_string_length)
        low = self._count(schema, "minLength", path, 0, high)
        source = schema["pattern"]
        if not isinstance(source, str):
            raise self._fail(path, "'pattern' must be a string")
        if len(source) > MAX_PATTERN_LENGTH:
            raise self._fail(path, f"'pattern' longer than {MAX_PATTERN_LENGTH} characters")
        try:
            parsed = parse(source)
            problem = _token_pattern_problem(parsed)
            compiled = compile_regex(source, self.engine)
        except RegexError as exc:
            raise self._fail(path, f"pattern {source!r}: {exc}") from exc
        if problem:
            raise self._fail(path, f"pattern {source!r}: {problem}")
        if parsed.can_match_any_of(UNSAFE_CHARS):
            raise self._fail(path, "the pattern can match whitespace or control characters")
        self._free_chars += high * multiplier
        if self._free_chars > self.limits.max_free_chars:
            raise self._fail(
                path, f"more than {self.limits.max_free_chars} patterned characters in total"
            )
        return _Pattern(compiled, low, high)

    def _object(self, schema: Mapping[str, Any], path: str, depth: int, multiplier: int) -> _Node:
        if schema.get("additionalProperties", False) is not False:
            raise self._fail(path, "'additionalProperties' must be false")
        properties = schema.get("properties")
        if not isinstance(properties, Mapping) or not properties:
            raise self._fail(path, "'properties' must be a non-empty object")
        if len(properties) > self.limits.max_properties:
            raise self._fail(path, f"more than {self.limits.max_properties} properties")
        required = schema.get("required", [])
        if not isinstance(required, list) or any(name not in properties for name in required):
            raise self._fail(path, "'required' must list declared properties")
        nodes: dict[str, _Node] = {}
        for name, sub in properties.items():
            if not isinstance(name, str) or not name.isidentifier() or len(name) > 64:
                raise self._fail(
                    path, "property names must be identifiers of at most 64 characters"
                )
            nodes[name] = self._build(sub, f"{path}.{name}", depth=depth + 1, multiplier=multiplier)
        return _Object(nodes, frozenset(required))
