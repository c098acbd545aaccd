"""``Policy``: load, decide, explain, reload.

A Policy holds one ``CompiledPolicy`` in a single attribute. Every decision
reads that attribute once, so a reload, which compiles a complete new
CompiledPolicy aside and then assigns it, is atomic: a decision sees the old
policy or the new one, never a mixture. A reload that fails (syntax error,
unreadable file...) raises ``PolicyError`` and leaves the old policy in place.

No decision ever raises because of the request data: an unexpected error while
evaluating is logged and the decision fails closed (a call or a model is
forbidden, a tool hidden, a result blocked, a context untrusted).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, TypeVar

from bastion.events import (
    EMPTY_CONTEXT,
    Context,
    Decision,
    Effect,
    EventKind,
    Identity,
    ModelRequest,
    RequestInfo,
    ToolSpec,
)
from bastion.policy import ast
from bastion.policy.compiler import (
    MISSING,
    UNKNOWN,
    CompiledPolicy,
    CRule,
    Env,
    LimitHit,
    _limit_key_value,
    compile_policy,
    decision_with_trace,
    fail_closed,
    model_view,
    result_view,
)
from bastion.policy.diagnostics import Diagnostic, PolicyError
from bastion.policy.parser import gc_paused, parse_source
from bastion.policy.schema import Schema

__all__ = ["LimitHit", "Policy"]

log = logging.getLogger("bastion.policy")

T = TypeVar("T", str, ToolSpec)
PathLike = str | os.PathLike[str]
SchemaArg = PathLike | Mapping[str, Any] | Schema | None
ReloadCallback = Callable[[PolicyError | None], None]

_NO_ARGS: Mapping[str, Any] = {}


class _Loaded:
    """What one load produced: compiled policy plus the files behind it."""

    __slots__ = ("compiled", "files", "parsed", "schema", "sources")

    def __init__(
        self,
        compiled: CompiledPolicy,
        parsed: tuple[ast.PolicyFile, ...],
        sources: dict[str, str],
        schema: Schema | None,
    ) -> None:
        self.compiled = compiled
        self.parsed = parsed
        self.files = tuple(pf.path for pf in parsed)
        self.sources = sources
        self.schema = schema


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _expand(paths: Sequence[PathLike]) -> tuple[list[str], list[Diagnostic]]:
    out: list[str] = []
    diags: list[Diagnostic] = []
    for p in paths:
        s = os.fspath(p)
        if os.path.isdir(s):
            out.extend(
                os.path.join(s, n)
                for n in sorted(os.listdir(s))
                if n.endswith(".policy") and os.path.isfile(os.path.join(s, n))
            )
        elif os.path.isfile(s):
            out.append(s)
        else:
            diags.append(Diagnostic(s, 1, 1, "no such policy file or directory", code="io"))
    return out, diags


def _load_schema(schema: SchemaArg) -> Schema | None:
    if schema is None or isinstance(schema, Schema):
        return schema
    if isinstance(schema, Mapping):
        return Schema.from_mapping(schema)
    return Schema.load(schema)


def _build(
    paths: Sequence[PathLike],
    inline: tuple[str, str] | None,
    schema_arg: SchemaArg,
) -> _Loaded:
    with gc_paused():
        return _build_now(paths, inline, schema_arg)


def _build_now(
    paths: Sequence[PathLike],
    inline: tuple[str, str] | None,
    schema_arg: SchemaArg,
) -> _Loaded:
    diags: list[Diagnostic] = []
    schema = None
    try:
        schema = _load_schema(schema_arg)
    except PolicyError as exc:
        diags.extend(exc.diagnostics)
    parsed: list[ast.PolicyFile] = []
    sources: dict[str, str] = {}
    seen: set[str] = set()

    def key(path: str) -> str:
        return os.path.realpath(path) if not path.startswith("<") else path

    def visit(path: str, text: str | None, stack: tuple[str, ...], where: ast.Span | None) -> None:
        k = key(path)
        if k in stack:
            chain = " -> ".join([*(os.path.basename(s) for s in stack), os.path.basename(k)])
            span = where or ast.Span(path, 1, 1)
            diags.append(
                Diagnostic(
                    span.file, span.line, span.col, f"include cycle: {chain}", code="include-cycle"
                )
            )
            return
        if k in seen:
            return
        seen.add(k)
        if text is None:
            try:
                text = _read_text(path)
            except (OSError, UnicodeDecodeError) as exc:
                span = where or ast.Span(path, 1, 1)
                diags.append(
                    Diagnostic(
                        span.file, span.line, span.col, f"cannot read {path}: {exc}", code="io"
                    )
                )
                return
        sources[path] = text
        try:
            pf = parse_source(text, path)
        except PolicyError as exc:
            diags.extend(exc.diagnostics)
            return
        parsed.append(pf)
        base = os.path.dirname(path) if not path.startswith("<") else os.getcwd()
        for st in pf.statements:
            if isinstance(st, ast.Include):
                target = st.path if os.path.isabs(st.path) else os.path.join(base, st.path)
                visit(os.path.normpath(target), None, (*stack, k), st.span)

    if inline is not None:
        name, text = inline
        visit(name, text, (), None)
    files, missing = _expand(paths)
    diags.extend(missing)
    for f in files:
        visit(f, None, (), None)
    if diags:
        raise PolicyError(diags)
    compiled = compile_policy(parsed, schema)
    return _Loaded(compiled, tuple(parsed), sources, schema)


class Policy:
    """A loaded, compiled policy: the one object the adapters ask for decisions.

    Build it with ``Policy.load(paths)`` or ``Policy.from_source(text)``. All
    ``decide_*`` methods are thread-safe and never raise on request data.
    """

    def __init__(
        self,
        loaded: _Loaded,
        paths: tuple[PathLike, ...],
        inline: tuple[str, str] | None,
        schema_arg: SchemaArg,
    ) -> None:
        self._loaded = loaded
        self._paths = paths
        self._inline = inline
        self._schema_arg = schema_arg
        self._reload_lock = threading.Lock()
        self._watch_thread: threading.Thread | None = None
        self._watch_stop = threading.Event()

    # ---- construction ---------------------------------------------------------

    @classmethod
    def load(
        cls,
        paths: PathLike | Sequence[PathLike],
        *,
        schema: SchemaArg = None,
        watch: bool = False,
    ) -> Policy:
        """Load ``.policy`` files and directories (a directory loads its ``*.policy``, sorted).

        Raises ``PolicyError`` with every diagnostic found (syntax errors in all
        files, include cycles, duplicate sets, conflicting defaults, undefined
        sets, invalid regular expressions).
        """
        seq: tuple[PathLike, ...] = (
            (paths,) if isinstance(paths, (str, os.PathLike)) else tuple(paths)
        )
        policy = cls(_build(seq, None, schema), seq, None, schema)
        if watch:
            policy.watch()
        return policy

    @classmethod
    def from_source(cls, text: str, name: str = "<string>", *, schema: SchemaArg = None) -> Policy:
        """Compile policy text; includes resolve relative to ``name``'s directory (else the cwd)."""
        inline = (name, text)
        return cls(_build((), inline, schema), (), inline, schema)

    # ---- introspection -----------------------------------------------------------

    @property
    def rule_count(self) -> int:
        return len(self._loaded.compiled.rules)

    @property
    def files(self) -> tuple[str, ...]:
        return self._loaded.files

    @property
    def sources(self) -> Mapping[str, str]:
        return self._loaded.sources

    @property
    def ast(self) -> tuple[ast.PolicyFile, ...]:
        return self._loaded.parsed

    @property
    def schema(self) -> Schema | None:
        return self._loaded.schema

    @property
    def warnings(self) -> tuple[Diagnostic, ...]:
        return self._loaded.compiled.warnings

    @property
    def reads_provenance(self) -> bool:
        """Whether any rule uses ``from``: only then do tool-output texts matter to decisions."""
        return self._loaded.compiled.reads_provenance

    @property
    def defaults(self) -> Mapping[str, str]:
        """Declared defaults by kind (``call``, ``result``, ``model``, ``context``)."""
        return dict(self._loaded.compiled.defaults)

    # ---- decisions -------------------------------------------------------------

    def decide_call(
        self,
        identity: Identity,
        tool: str | ToolSpec,
        args: Mapping[str, Any],
        context: Context = EMPTY_CONTEXT,
        *,
        request: RequestInfo | None = None,
        explain: bool = False,
    ) -> Decision:
        """Decide a tool call: forbid (or a matching hide) > ask > allow > default."""
        cp = self._loaded.compiled
        try:
            if args is None:
                args = _NO_ARGS
            if explain:
                return self._explain_call(cp, identity, tool, args, context, request)
            if type(tool) is str:
                fn = cp.call_deciders.get(tool) or cp.call_decider(tool)
                return fn(identity, args, context, request)
            name = _name(tool)
            if isinstance(tool, str) or not cp.candidates("call", name).needs_tool:
                return cp.call_decider(name)(identity, args, context, request)
            return cp.call_decider(name)(identity, args, context, request, cp.tool_view_for(tool))
        except Exception:
            log.exception("policy evaluation failed for call %s; forbidding", _label(tool))
            return fail_closed(EventKind.CALL)

    def _explain_call(
        self,
        cp: CompiledPolicy,
        identity: Identity,
        tool: str | ToolSpec,
        args: Mapping[str, Any],
        context: Context,
        request: RequestInfo | None,
    ) -> Decision:
        name = _name(tool)
        cl = cp.candidates("call", name)
        t = cp.tool_view_for(tool)
        return cp.explain_matched(
            cl.rules,
            lambda r: Env(r.kind, identity, args, t, context, request, None, cp.sets),
            cp.decide_call_from,
        )

    def decide_visibility(
        self,
        identity: Identity,
        tool: str | ToolSpec,
        context: Context = EMPTY_CONTEXT,
        *,
        request: RequestInfo | None = None,
        explain: bool = False,
    ) -> Decision:
        """SHOW or HIDE: hide > show > whether some call could be allowed (args unknown)."""
        cp = self._loaded.compiled
        try:
            if explain:
                return self._explain_visibility(cp, identity, tool, context, request)
            name = tool if isinstance(tool, str) else tool.name
            fn = cp.visibility_deciders.get(name) or cp.visibility_decider(name)
            return fn(identity, tool, context, request)
        except Exception:
            log.exception("policy evaluation failed for visibility of %s; hiding", _label(tool))
            return fail_closed(EventKind.VISIBILITY)

    @staticmethod
    def _explain_visibility(
        cp: CompiledPolicy,
        identity: Identity,
        tool: str | ToolSpec,
        context: Context,
        request: RequestInfo | None,
    ) -> Decision:
        cl = cp.candidates("visibility", _name(tool))
        t = cl.tool_view if isinstance(tool, str) else cp.tool_view_for(tool)
        results, traces = cp.explain_rules(
            cl.rules,
            lambda r: Env(r.kind, identity, UNKNOWN, t, context, request, None, cp.sets),
        )
        return decision_with_trace(cp.decide_visibility_from(results), traces)

    def visible_tools(
        self,
        identity: Identity,
        tools: Sequence[T],
        context: Context = EMPTY_CONTEXT,
        *,
        request: RequestInfo | None = None,
    ) -> list[T]:
        """The tools this identity may see, in their input order (the same objects)."""
        return [
            t
            for t in tools
            if self.decide_visibility(identity, t, context, request=request).effect is Effect.SHOW
        ]

    def classify_result(
        self,
        identity: Identity,
        tool: str | ToolSpec,
        args: Mapping[str, Any],
        result: Any,
        context: Context = EMPTY_CONTEXT,
        *,
        request: RequestInfo | None = None,
        explain: bool = False,
    ) -> Decision:
        """Classify a tool's output: block > quarantine > untrusted > trusted > default; redactions and paths."""
        cp = self._loaded.compiled
        try:
            if args is None:
                args = _NO_ARGS
            if explain:
                cl = cp.candidates("result", _name(tool))
                t = cl.tool_view if isinstance(tool, str) else cp.tool_view_for(tool)
                x = result_view(result)
                return cp.explain_matched(
                    cl.rules,
                    lambda r: Env(r.kind, identity, args, t, context, request, x, cp.sets),
                    cp.decide_result_from,
                )
            name = tool if isinstance(tool, str) else tool.name
            fn = cp.result_deciders.get(name) or cp.result_decider(name)
            return fn(identity, tool, args, result, context, request)
        except Exception:
            log.exception("policy evaluation failed for the result of %s; blocking", _label(tool))
            return fail_closed(EventKind.RESULT)

    def fixed_result(self, tool: str) -> Decision | None:
        """The classification every output of ``tool`` gets when no rule can look at it, else None.

        With no rule (enforced or shadow) naming the tool, its outputs get the
        default whatever their content, arguments, identity or context, so an
        adapter need not build or classify them one by one.
        """
        try:
            return self._loaded.compiled.fixed_result(tool)
        except Exception:
            log.exception("policy evaluation failed for the result of %s; blocking", tool)
            return fail_closed(EventKind.RESULT)

    def result_effects(self, tool: str | ToolSpec) -> frozenset[Effect]:
        """Every effect a result of ``tool`` can get: its enforced rules' (whatever their conditions) and the default.

        Adapters use it before the output exists, e.g. to stop advertising an MCP
        ``outputSchema`` that a ``quarantine`` rule would make the output break.
        """
        cp = self._loaded.compiled
        rules = cp.candidates("result", _name(tool)).rules
        effects = {Effect(r.effect) for r in rules if not r.shadow}
        effects.add(cp.default_effect("result"))
        return frozenset(effects)

    def decide_model(
        self,
        identity: Identity,
        model: str | ModelRequest,
        context: Context = EMPTY_CONTEXT,
        *,
        request: RequestInfo | None = None,
        explain: bool = False,
    ) -> Decision:
        """Decide a model request: forbid > allow (first route in source order) > default."""
        cp = self._loaded.compiled
        try:
            name = model if isinstance(model, str) else model.name
            if explain:
                cl = cp.candidates("model", name)
                x = model_view(model)
                return cp.explain_matched(
                    cl.rules,
                    lambda r: Env(r.kind, identity, MISSING, None, context, request, x, cp.sets),
                    cp.decide_model_from,
                )
            fn = cp.model_deciders.get(name) or cp.model_decider(name)
            return fn(identity, model, context, request)
        except Exception:
            log.exception("policy evaluation failed for model %s; forbidding", _label(model))
            return fail_closed(EventKind.MODEL)

    def decide_context(
        self,
        identity: Identity,
        *,
        request: RequestInfo | None = None,
        explain: bool = False,
    ) -> Decision:
        """The trust a new context starts with: untrusted > trusted > default (trusted)."""
        cp = self._loaded.compiled
        try:
            if explain:
                return cp.explain_matched(
                    cp.context_rules,
                    lambda r: Env(
                        r.kind, identity, MISSING, None, EMPTY_CONTEXT, request, None, cp.sets
                    ),
                    cp.decide_context_from,
                )
            return (cp.context_fn or cp.context_decider())(identity, request)
        except Exception:
            log.exception("policy evaluation failed for the initial context; untrusted")
            return fail_closed(EventKind.CONTEXT)

    def limits(
        self,
        kind: Literal["call", "model"],
        identity: Identity,
        name: str,
        args: Mapping[str, Any] = _NO_ARGS,
        context: Context = EMPTY_CONTEXT,
        *,
        request: RequestInfo | None = None,
    ) -> tuple[LimitHit, ...]:
        """The rate limits that apply to a call or model request, each with its counter key.

        Shadow-mode limits are not returned. On an evaluation error, one limit of
        zero is returned (rule id ``policy-evaluation-error``), so the caller denies.
        """
        cp = self._loaded.compiled
        try:
            if args is None:
                args = _NO_ARGS
            cl = cp.candidates(f"limit-{kind}", name)
            t = cl.tool_view
            x = {"name": name} if kind == "model" else None
            hits: list[LimitHit] = []
            for r in cl.rules:
                if r.shadow or not self._holds(cp, r, identity, args, t, context, request, x):
                    continue
                rule = r.rule
                assert isinstance(rule, ast.LimitRule) and r.by is not None
                value = r.by(identity, args, t, context, request, x)
                hits.append(
                    LimitHit(
                        rule_id=r.rule_id,
                        amount=rule.amount,
                        unit=rule.unit,
                        window_seconds=rule.window_seconds,
                        key=f"{r.rule_id}|{_limit_key_value(value)}",
                        reason=rule.reason,
                    )
                )
            return tuple(hits)
        except Exception:
            log.exception(
                "policy evaluation failed for the limits of %s; limiting to zero", _label(name)
            )
            return (
                LimitHit(
                    rule_id="policy-evaluation-error",
                    amount=0,
                    unit="calls" if kind == "call" else "tokens",
                    window_seconds=1,
                    key="policy-evaluation-error",
                    reason="policy evaluation error",
                ),
            )

    @staticmethod
    def _holds(
        cp: CompiledPolicy,
        r: CRule,
        identity: Identity,
        a: Any,
        t: Any,
        c: Any,
        req: Any,
        x: Any,
    ) -> bool:
        if r.hoisted is not None and not cp.hoisted(r, identity):
            return False
        return r.residual is None or bool(r.residual(identity, a, t, c, req, x))

    # ---- reload ----------------------------------------------------------------

    def reload(self) -> tuple[Diagnostic, ...]:
        """Recompile from the same files (and schema) aside, then swap atomically.

        Returns the new policy's warnings. If the new text does not compile, the
        current policy stays in force and ``PolicyError`` is raised with the
        diagnostics.
        """
        with self._reload_lock:
            loaded = _build(self._paths, self._inline, self._schema_arg)
            self._loaded = loaded
            return loaded.compiled.warnings

    def _snapshot(self) -> dict[str, tuple[int, int]]:
        snap: dict[str, tuple[int, int]] = {}
        watched = set(self._loaded.files)
        expanded, _ = _expand(self._paths)
        watched.update(expanded)
        for p in self._paths:
            s = os.fspath(p)
            if os.path.isdir(s):
                watched.add(s)
        if isinstance(self._schema_arg, (str, os.PathLike)):
            watched.add(os.fspath(self._schema_arg))
        for f in watched:
            if f.startswith("<"):
                continue
            try:
                st = os.stat(f)
                snap[f] = (st.st_mtime_ns, st.st_size)
            except OSError:
                snap[f] = (-1, -1)
        return snap

    def watch(self, interval: float = 1.0, on_reload: ReloadCallback | None = None) -> None:
        """Poll the loaded files' modification times and reload on change (a daemon thread).

        ``on_reload`` is called with None after a successful reload and with the
        ``PolicyError`` after a failed one (the old policy stays); failures are
        also logged.
        """
        if self._watch_thread is not None:
            return
        self._watch_stop.clear()
        last = self._snapshot()

        def run() -> None:
            nonlocal last
            while not self._watch_stop.wait(interval):
                try:
                    now = self._snapshot()
                    if now == last:
                        continue
                    last = now
                    try:
                        self.reload()
                    except PolicyError as exc:
                        log.error("policy reload failed; keeping the previous policy:\n%s", exc)
                        if on_reload is not None:
                            on_reload(exc)
                        continue
                    log.info("policy reloaded (%d rules)", self.rule_count)
                    if on_reload is not None:
                        on_reload(None)
                except Exception:
                    log.exception("policy watcher failed; still watching")

        th = threading.Thread(target=run, name="bastion-policy-watch", daemon=True)
        self._watch_thread = th
        th.start()

    def stop_watching(self) -> None:
        """Stop the watcher thread started by ``watch`` (waits for it)."""
        th = self._watch_thread
        if th is None:
            return
        self._watch_stop.set()
        th.join()
        self._watch_thread = None


def _name(tool: str | ToolSpec) -> str:
    return tool if isinstance(tool, str) else tool.name


def _label(obj: object) -> str:
    """A name for a log line that cannot itself fail."""
    try:
        return repr(_name(obj) if isinstance(obj, (str, ToolSpec)) else obj)[:200]
    except Exception:
        return f"<{type(obj).__name__}>"
