"""Policy test files (``bastion test``): YAML cases of identity + event + expectation.

A test file is named ``<anything>.test.yaml`` and usually sits beside the policy
it tests (``rules/baseline.policy`` and ``rules/baseline.test.yaml``)::

    policy: baseline.policy            # or a list; paths relative to this file
    schema: schema.yaml                # optional
    identities:                        # optional, reusable by name
      alice: {sub: alice, groups: [eng]}
    tools:                             # optional: what the MCP server advertises
      github__get_issue: {annotations: {readOnlyHint: true}}
    cases:
      - name: engineers read issues
        identity: alice                # a name above, or an inline object
        call: github__get_issue        # the event: call, list, result, model or context_start
        args: {repo: acme/api}
        context: {tainted: true, taint_sources: [web__fetch]}
        expect: allow                  # the effect; for list, the visible tool names
        rules: [read-only-tools]       # optional: exactly the rule ids that decided

The events: ``call: TOOL`` (+ ``args``), ``list: [TOOL, ...]`` (expect the visible
names, in order), ``result: TOOL`` (+ ``args``, ``output``; optional expected
``redact`` patterns and ``paths`` {json path: effect}), ``model: NAME`` or
``model: {name, provider, protocol, max_tokens}`` (optional expected ``route``),
``context_start: true`` (the trust a context starts with). Any case may give
``context`` ({tainted, taint_sources, session, turn, user_texts or user_text,
trusted_texts, untrusted_texts, and any other attribute}), ``request`` ({method,
path, client, protocol, headers}), ``reason`` (a substring of the decision's
reason), ``shadow`` (expected shadow-rule hits) and ``defaulted`` (true/false).

A failing case is reported with the decision's explain trace.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from bastion.events import (
    Context,
    Decision,
    Identity,
    ModelRequest,
    RequestInfo,
    RuleTrace,
    ToolSpec,
)
from bastion.policy.diagnostics import Diagnostic, PolicyError

__all__ = [
    "ANONYMOUS",
    "TEST_SUFFIX",
    "CaseResult",
    "TestReport",
    "context_from",
    "decision_to_json",
    "discover",
    "format_decision",
    "format_report",
    "format_trace",
    "identity_from",
    "report_json",
    "run_tests",
    "tool_from",
]

TEST_SUFFIX = ".test.yaml"
ANONYMOUS: Mapping[str, Any] = {"sub": "anonymous", "anonymous": True}
"""The identity of a case or ``bastion explain`` that names none."""

_IDENTITY_KEYS = ("groups", "roles", "email", "tenant", "key_id", "issuer", "scopes")
_CONTEXT_KEYS = ("tainted", "session", "turn")


# ---- the file format (validated at the edge with pydantic) ---------------------


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ToolEntry(_Model):
    description: str = ""
    annotations: dict[str, Any] = Field(default_factory=dict)
    input_schema: dict[str, Any] = Field(default_factory=dict)
    server: str | None = None


class ModelEntry(_Model):
    name: str
    provider: str | None = None
    protocol: str | None = None
    max_tokens: int | None = None


class RequestEntry(_Model):
    method: str = "POST"
    path: str = "/"
    client: str | None = None
    protocol: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)


class Case(_Model):
    name: str
    identity: str | dict[str, Any] = Field(default_factory=lambda: dict(ANONYMOUS))
    call: str | None = None
    list: tuple[str, ...] | None = None
    result: str | None = None
    model: str | ModelEntry | None = None
    context_start: bool = False
    args: dict[str, Any] = Field(default_factory=dict)
    output: Any = None
    is_error: bool = False
    context: dict[str, Any] = Field(default_factory=dict)
    request: RequestEntry | None = None
    expect: str | tuple[str, ...]
    rules: tuple[str, ...] | None = None
    reason: str | None = None
    route: str | None = None
    redact: tuple[str, ...] | None = None
    paths: dict[str, str] | None = None
    shadow: tuple[str, ...] | None = None
    defaulted: bool | None = None

    @model_validator(mode="after")
    def _one_event(self) -> Case:
        given = [k for k in ("call", "list", "result", "model") if getattr(self, k) is not None] + (
            ["context_start"] if self.context_start else []
        )
        if len(given) != 1:
            raise ValueError(
                "a case names exactly one event: call, list, result, model or context_start"
                + (f" (got {', '.join(given)})" if given else "")
            )
        if (self.list is None) != isinstance(self.expect, str):
            raise ValueError(
                "expect is the list of visible tool names for a list event, else an effect"
            )
        return self

    @property
    def event(self) -> str:
        for k in ("call", "list", "result", "model"):
            if getattr(self, k) is not None:
                return k
        return "context_start"


class TestFile(_Model):
    policy: str | tuple[str, ...]
    schema_: str | None = Field(default=None, alias="schema")
    identities: dict[str, dict[str, Any]] = Field(default_factory=dict)
    tools: dict[str, ToolEntry] = Field(default_factory=dict)
    cases: tuple[Case, ...]


# ---- results -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CaseResult:
    """One case's outcome; ``problems`` says what differed, ``trace`` why."""

    file: str
    line: int
    name: str
    passed: bool
    problems: tuple[str, ...] = ()
    decision: Decision | None = None
    visible: tuple[str, ...] | None = None
    trace: str = ""


@dataclass
class TestReport:
    """Every case of every file run, plus files that could not be run at all."""

    __test__ = False  # not a pytest class

    results: list[CaseResult] = field(default_factory=list)
    errors: list[Diagnostic] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def passed(self) -> int:
        return sum(1 for r in self.results if r.passed)

    @property
    def failed(self) -> int:
        return sum(1 for r in self.results if not r.passed)

    @property
    def ok(self) -> bool:
        return not self.errors and self.failed == 0 and bool(self.results)


# ---- discovery and loading -----------------------------------------------------


def discover(paths: Iterable[str | os.PathLike[str]]) -> list[str]:
    """Test files named by ``paths``: files as given, directories searched for ``*.test.yaml``."""
    out: list[str] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            out.extend(str(f) for f in sorted(path.rglob(f"*{TEST_SUFFIX}")) if f.is_file())
        else:
            out.append(str(path))
    return out


def _case_lines(text: str) -> list[int]:
    """1-based line of each item of the top-level ``cases`` list (for messages)."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return []
    if not isinstance(node, yaml.MappingNode):
        return []
    for key, value in node.value:
        if getattr(key, "value", None) == "cases" and isinstance(value, yaml.SequenceNode):
            return [item.start_mark.line + 1 for item in value.value]
    return []


def _load_file(path: str, report: TestReport) -> tuple[TestFile, list[int]] | None:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        report.errors.append(Diagnostic(path, 1, 1, f"cannot read test file: {exc}", code="io"))
        return None
    report.sources[path] = text
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line, col = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
        problem = getattr(exc, "problem", None) or str(exc)
        report.errors.append(Diagnostic(path, line, col, f"invalid YAML: {problem}", code="test"))
        return None
    lines = _case_lines(text)
    try:
        return TestFile.model_validate(data), lines
    except ValidationError as exc:
        for err in exc.errors():
            loc = err["loc"]
            line = 1
            if len(loc) >= 2 and loc[0] == "cases" and isinstance(loc[1], int):
                line = lines[loc[1]] if loc[1] < len(lines) else 1
            where = ".".join(str(x) for x in loc) or "(file)"
            msg = f"{where}: {err['msg']}"
            report.errors.append(Diagnostic(path, line, 1, msg, code="test"))
        return None


def identity_from(
    spec: str | Mapping[str, Any], named: Mapping[str, Mapping[str, Any]] | None = None
) -> Identity:
    """An Identity from its YAML/JSON description (``sub``, ``groups``..., other keys are attributes)."""
    named = named or {}
    if isinstance(spec, str):
        if spec not in named:
            raise ValueError(f"unknown identity {spec!r} (declare it under 'identities')")
        spec = named[spec]
    data = dict(spec)
    subject = data.pop("sub", data.pop("subject", "anonymous"))
    kwargs: dict[str, Any] = {}
    for key in _IDENTITY_KEYS:
        if key in data:
            value = data.pop(key)
            kwargs[key] = tuple(value) if isinstance(value, list) else value
    if "auth_method" in data:
        kwargs["auth_method"] = str(data.pop("auth_method"))
    if "anonymous" in data:
        kwargs["anonymous"] = bool(data.pop("anonymous"))
    return Identity(subject=str(subject), attributes=data, **kwargs)


def context_from(spec: Mapping[str, Any]) -> Context:
    """A Context from its YAML/JSON description (see the module docstring)."""
    data = dict(spec)
    kwargs: dict[str, Any] = {k: data.pop(k) for k in _CONTEXT_KEYS if k in data}
    if "taint_sources" in data:
        kwargs["taint_sources"] = frozenset(data.pop("taint_sources"))
        kwargs.setdefault("tainted", bool(kwargs["taint_sources"]))
    user = data.pop("user_texts", [])
    if "user_text" in data:
        user = [*user, data.pop("user_text")]
    kwargs["user_texts"] = tuple(str(t) for t in user)
    for key in ("trusted_texts", "untrusted_texts"):
        if key in data:
            kwargs[key] = tuple(str(t) for t in data.pop(key))
    if kwargs.get("untrusted_texts"):
        kwargs.setdefault("tainted", True)
    return Context(attributes=data, **kwargs)


def tool_from(name: str, tools: Mapping[str, ToolEntry]) -> ToolSpec:
    """The ToolSpec of ``name``: as described in ``tools``, else bare."""
    entry = tools.get(name)
    if entry is None:
        return ToolSpec.named(name)
    return ToolSpec.named(
        name,
        description=entry.description,
        annotations=dict(entry.annotations),
        input_schema=dict(entry.input_schema),
        **({"server": entry.server} if entry.server is not None else {}),
    )


# ---- running -------------------------------------------------------------------


def _decide(
    policy: Any, tf: TestFile, case: Case
) -> tuple[Decision | None, tuple[str, ...] | None]:
    identity = identity_from(case.identity, tf.identities)
    context = context_from(case.context)
    request = RequestInfo(**case.request.model_dump()) if case.request is not None else None
    if case.call is not None:
        return (
            policy.decide_call(
                identity,
                tool_from(case.call, tf.tools),
                case.args,
                context,
                request=request,
                explain=True,
            ),
            None,
        )
    if case.list is not None:
        specs = [tool_from(n, tf.tools) for n in case.list]
        visible = policy.visible_tools(identity, specs, context, request=request)
        return None, tuple(t if isinstance(t, str) else t.name for t in visible)
    if case.result is not None:
        return (
            policy.classify_result(
                identity,
                tool_from(case.result, tf.tools),
                case.args,
                {"content": case.output, "isError": case.is_error}
                if case.is_error
                else case.output,
                context,
                explain=True,
            ),
            None,
        )
    if case.model is not None:
        model = (
            ModelRequest(name=case.model)
            if isinstance(case.model, str)
            else ModelRequest(**case.model.model_dump())
        )
        return policy.decide_model(identity, model, context=context, explain=True), None
    return policy.decide_context(identity, request=request, explain=True), None


def _compare(case: Case, decision: Decision | None, visible: tuple[str, ...] | None) -> list[str]:
    problems: list[str] = []
    if case.list is not None:
        if visible != tuple(case.expect):
            problems.append(f"visible: expected {list(case.expect)}, got {list(visible or ())}")
        return problems
    assert decision is not None
    if decision.effect.value != case.expect:
        problems.append(f"effect: expected {case.expect}, got {decision.effect.value}")
    if case.rules is not None and set(decision.rule_ids) != set(case.rules):
        problems.append(f"rules: expected {list(case.rules)}, got {list(decision.rule_ids)}")
    if case.reason is not None and case.reason not in decision.reason:
        problems.append(f"reason: expected it to contain {case.reason!r}, got {decision.reason!r}")
    if case.route is not None and decision.route != case.route:
        problems.append(f"route: expected {case.route!r}, got {decision.route!r}")
    if case.redact is not None and set(decision.redact_patterns) != set(case.redact):
        problems.append(
            f"redact: expected {list(case.redact)}, got {list(decision.redact_patterns)}"
        )
    if case.paths is not None:
        got = {p: e.value for p, e in decision.paths}
        if got != case.paths:
            problems.append(f"paths: expected {case.paths}, got {got}")
    if case.shadow is not None and set(decision.shadow_hits) != set(case.shadow):
        problems.append(f"shadow: expected {list(case.shadow)}, got {list(decision.shadow_hits)}")
    if case.defaulted is not None and decision.defaulted != case.defaulted:
        problems.append(f"defaulted: expected {case.defaulted}, got {decision.defaulted}")
    return problems


def _run_file(path: str, report: TestReport) -> None:
    from bastion.policy.engine import Policy
    from bastion.policy.schema import Schema

    loaded = _load_file(path, report)
    if loaded is None:
        return
    tf, lines = loaded
    base = Path(path).parent
    policies = [tf.policy] if isinstance(tf.policy, str) else list(tf.policy)
    try:
        schema = Schema.load(base / tf.schema_) if tf.schema_ is not None else None
        policy = Policy.load([str(base / p) for p in policies], schema=schema)
    except PolicyError as exc:
        report.errors.extend(exc.diagnostics)
        for d in exc.diagnostics:
            if d.file not in report.sources and os.path.isfile(d.file):
                with contextlib.suppress(OSError, UnicodeDecodeError):
                    report.sources[d.file] = Path(d.file).read_text("utf-8")
        return
    report.sources.update(getattr(policy, "sources", {}) or {})
    for n, case in enumerate(tf.cases):
        line = lines[n] if n < len(lines) else 1
        try:
            decision, visible = _decide(policy, tf, case)
            problems = _compare(case, decision, visible)
        except Exception as exc:  # a broken case fails; it never stops the run
            report.results.append(CaseResult(path, line, case.name, False, (f"error: {exc}",)))
            continue
        trace = ""
        if problems and case.list is not None:
            trace = _visibility_trace(policy, tf, case)
        elif problems and decision is not None:
            trace = format_decision(decision)
        report.results.append(
            CaseResult(
                path, line, case.name, not problems, tuple(problems), decision, visible, trace
            )
        )


def _visibility_trace(policy: Any, tf: TestFile, case: Case) -> str:
    identity = identity_from(case.identity, tf.identities)
    context = context_from(case.context)
    parts: list[str] = []
    for name in case.list or ():
        d = policy.decide_visibility(identity, tool_from(name, tf.tools), context, explain=True)
        parts.append(f"{name}:\n" + _indent(format_decision(d), "  "))
    return "\n".join(parts)


def run_tests(paths: Iterable[str | os.PathLike[str]]) -> TestReport:
    """Run every case of the test files (or directories of them) named by ``paths``."""
    report = TestReport()
    files = discover(paths)
    if not files:
        shown = ", ".join(str(p) for p in paths) if isinstance(paths, Sequence) else "the paths"
        report.errors.append(
            Diagnostic(shown or ".", 1, 1, f"no test files (*{TEST_SUFFIX}) found", code="test")
        )
    for path in files:
        if not os.path.exists(path):
            report.errors.append(Diagnostic(path, 1, 1, "no such test file", code="io"))
            continue
        _run_file(path, report)
    return report


# ---- printing ------------------------------------------------------------------


def _indent(text: str, prefix: str) -> str:
    return "\n".join(prefix + line if line else line for line in text.splitlines())


def format_trace(trace: Sequence[RuleTrace]) -> str:
    """One block per considered rule: match mark, effect, id, location, condition, why."""
    if not trace:
        return "(no rule applies to this event)"
    lines: list[str] = []
    for t in trace:
        mark = "[x]" if t.matched else "[ ]"
        shadow = " (shadow)" if t.shadow else ""
        lines.append(f"{mark} {t.effect:<10} {t.rule_id}{shadow}  {t.location}")
        if t.condition:
            lines.append(f"      {t.condition}")
        if t.detail:
            lines.extend(f"      {d}" for d in t.detail.splitlines())
    return "\n".join(lines)


def format_decision(decision: Decision) -> str:
    """A decision and, when explained, its trace, for people."""
    lines = [f"effect: {decision.effect.value}" + (" (default)" if decision.defaulted else "")]
    if decision.rule_ids:
        lines.append(f"rules: {', '.join(decision.rule_ids)}")
    lines.append(f"reason: {decision.reason}")
    if decision.overridden:
        lines.append(f"overridden: {', '.join(decision.overridden)}")
    if decision.shadow_hits:
        lines.append(f"shadow hits: {', '.join(decision.shadow_hits)}")
    if decision.route is not None:
        lines.append(f"route: {decision.route}")
    if decision.redact_patterns:
        lines.append(f"redact: {', '.join(decision.redact_patterns)}")
    for path, effect in decision.paths:
        lines.append(f"path {path}: {effect.value}")
    if decision.options:
        lines.append(f"options: {dict(decision.options)}")
    if decision.trace is not None:
        lines.append("trace:")
        lines.append(_indent(format_trace(decision.trace), "  "))
    return "\n".join(lines)


def decision_to_json(decision: Decision) -> dict[str, Any]:
    """A decision as plain data (``--format json``)."""
    return {
        "kind": decision.kind.value,
        "effect": decision.effect.value,
        "allowed": decision.allowed,
        "reason": decision.reason,
        "rule_ids": list(decision.rule_ids),
        "reasons": list(decision.reasons),
        "overridden": list(decision.overridden),
        "shadow_hits": list(decision.shadow_hits),
        "defaulted": decision.defaulted,
        "route": decision.route,
        "redact_patterns": list(decision.redact_patterns),
        "paths": {p: e.value for p, e in decision.paths},
        "options": dict(decision.options),
        "trace": None
        if decision.trace is None
        else [
            {
                "rule_id": t.rule_id,
                "effect": t.effect,
                "matched": t.matched,
                "shadow": t.shadow,
                "condition": t.condition,
                "detail": t.detail,
                "location": t.location,
            }
            for t in decision.trace
        ],
    }


def format_report(report: TestReport) -> str:
    """``PASS``/``FAIL`` per case (failures with their trace) and a summary line."""
    from bastion.policy.diagnostics import format_diagnostics

    out: list[str] = []
    if report.errors:
        out.append(format_diagnostics(report.errors, sources=report.sources))
    for r in report.results:
        if r.passed:
            out.append(f"PASS {r.file}:{r.line}: {r.name}")
            continue
        out.append(f"FAIL {r.file}:{r.line}: {r.name}")
        out.extend(f"    {p}" for p in r.problems)
        if r.trace:
            out.append(_indent(r.trace, "    "))
    summary = f"{report.passed} passed, {report.failed} failed"
    if report.errors:
        summary += f", {len(report.errors)} error{'s' if len(report.errors) != 1 else ''}"
    out.append(summary)
    return "\n".join(out)


def report_json(report: TestReport) -> dict[str, Any]:
    """The report as plain data (``bastion test --format json``)."""
    return {
        "passed": report.passed,
        "failed": report.failed,
        "errors": [d.to_json() for d in report.errors],
        "cases": [
            {
                "file": r.file,
                "line": r.line,
                "name": r.name,
                "passed": r.passed,
                "problems": list(r.problems),
                "trace": r.trace,
            }
            for r in report.results
        ],
    }
