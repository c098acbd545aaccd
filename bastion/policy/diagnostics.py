"""Diagnostics: positioned errors and warnings about policy text."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

__all__ = ["Diagnostic", "PolicyError", "format_diagnostics"]

Severity = Literal["error", "warning"]


@dataclass(frozen=True, slots=True)
class Diagnostic:
    """One finding, printed as ``file:line:col: severity: message``."""

    file: str
    line: int
    col: int
    message: str
    severity: Severity = "error"
    code: str = "error"
    end_line: int = 0
    end_col: int = 0

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}: {self.severity}: {self.message}"

    def to_json(self) -> dict[str, object]:
        return asdict(self)


class PolicyError(Exception):
    """A policy could not be loaded; ``diagnostics`` says where and why."""

    def __init__(self, diagnostics: Sequence[Diagnostic]) -> None:
        self.diagnostics = tuple(diagnostics)
        super().__init__("\n".join(str(d) for d in self.diagnostics) or "invalid policy")

    @property
    def errors(self) -> tuple[Diagnostic, ...]:
        return tuple(d for d in self.diagnostics if d.severity == "error")


def _excerpt(source: str, d: Diagnostic) -> str:
    lines = source.splitlines()
    if not 1 <= d.line <= len(lines):
        return ""
    text = lines[d.line - 1].expandtabs(1)
    col = max(d.col, 1)
    width = 1
    if d.end_line == d.line and d.end_col > d.col:
        width = d.end_col - d.col
    gutter = f"{d.line:>4} | "
    return f"{gutter}{text}\n{' ' * (len(gutter) + col - 1)}{'^' * width}"


def format_diagnostics(
    diagnostics: Iterable[Diagnostic],
    *,
    sources: Mapping[str, str] | None = None,
    fmt: Literal["text", "json"] = "text",
) -> str:
    """Render diagnostics for a terminal (with caret excerpts) or as JSON."""
    items = sorted(diagnostics, key=lambda d: (d.file, d.line, d.col, d.severity))
    if fmt == "json":
        return json.dumps([d.to_json() for d in items], indent=2)
    out: list[str] = []
    for d in items:
        out.append(str(d))
        src = (sources or {}).get(d.file)
        if src is not None:
            ex = _excerpt(src, d)
            if ex:
                out.append(ex)
    return "\n".join(out)
