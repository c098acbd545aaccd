"""The optional policy schema: identity and context attributes, and tool declarations.

A schema is YAML (see docs/language.md, "Schema"), validated with pydantic at
load time. The engine reads the tool declarations (``tool.effect``,
``tool.destinations``, ``destinations``, descriptions and annotations of tools
given by name); the checker reads all of it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from bastion.policy.diagnostics import Diagnostic, PolicyError

__all__ = ["ATTRIBUTE_TYPES", "Schema", "ToolDecl"]

ATTRIBUTE_TYPES = frozenset(
    {"string", "number", "boolean", "list[string]", "list[number]", "object", "any"}
)
_TYPE_RE = re.compile(r"^(string|number|boolean|object|any|list\[(string|number)\])$")


def _check_types(value: Mapping[str, str]) -> Mapping[str, str]:
    for name, typ in value.items():
        if not isinstance(typ, str) or not _TYPE_RE.match(typ):
            allowed = ", ".join(sorted(ATTRIBUTE_TYPES))
            raise ValueError(f"attribute {name!r} has unknown type {typ!r} (use one of {allowed})")
    return value


class ToolDecl(BaseModel):
    """One tool: what it does and which arguments say where data goes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    description: str = ""
    effect: Literal["read", "write", "send", "delete"] | None = None
    destinations: tuple[str, ...] = ()
    annotations: dict[str, Any] = Field(default_factory=dict)
    args: dict[str, Any] = Field(default_factory=dict)


class Schema(BaseModel):
    """Identity attributes, tools and context attributes a policy may use."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    identity: dict[str, str] = Field(default_factory=dict)
    tools: dict[str, ToolDecl] = Field(default_factory=dict)
    context: dict[str, str] = Field(default_factory=dict)
    path: str | None = Field(default=None, exclude=True)

    @field_validator("identity", "context")
    @classmethod
    def _known_types(cls, value: dict[str, str]) -> dict[str, str]:
        _check_types(value)
        return value

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None, path: str = "<schema>") -> Schema:
        """Validate a parsed schema document; errors become a PolicyError."""
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise PolicyError([Diagnostic(path, 1, 1, "a schema is a mapping", code="schema")])
        try:
            return cls.model_validate({**data, "path": path})
        except ValidationError as exc:
            diags = [
                Diagnostic(
                    path,
                    1,
                    1,
                    f"schema: {'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}",
                    code="schema",
                )
                for err in exc.errors()
            ]
            raise PolicyError(diags) from None

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Schema:
        """Read a YAML schema file."""
        p = os.fspath(path)
        try:
            with open(p, encoding="utf-8") as f:
                data = yaml.safe_load(f)
        except OSError as exc:
            raise PolicyError(
                [Diagnostic(p, 1, 1, f"cannot read schema: {exc}", code="io")]
            ) from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = mark.line + 1 if mark is not None else 1
            col = mark.column + 1 if mark is not None else 1
            raise PolicyError(
                [Diagnostic(p, line, col, f"invalid YAML: {exc}", code="schema")]
            ) from None
        return cls.from_mapping(data, p)

    def tool(self, name: str) -> ToolDecl | None:
        return self.tools.get(name)
