"""A reference interpreter for the policy language: a plain tree walk over the AST.

Written from docs/language.md, independently of bastion/policy/compiler.py (it
shares only the parser's AST, the regex module and the provenance index), and
deliberately naive: every decision scans every rule. The differential test
checks that the compiled engine decides exactly like this.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from bastion.events import Context, Identity, ModelRequest, RequestInfo, ToolSpec
from bastion.policy import ast
from bastion.policy.provenance import from_source
from bastion.policy.regex import compile_regex
from bastion.policy.schema import Schema


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


class _Unknown:
    def __repr__(self) -> str:
        return "<unknown>"


NOTHING = _Missing()  # an attribute that is not there
UNSURE = _Unknown()  # partial evaluation: depends on the arguments


@dataclass(frozen=True)
class RefDecision:
    effect: str
    rule_ids: tuple[str, ...] = ()
    overridden: tuple[str, ...] = ()
    shadow_hits: tuple[str, ...] = ()
    defaulted: bool = False
    route: str | None = None
    redact_patterns: tuple[str, ...] = ()
    paths: tuple[tuple[str, str], ...] = ()
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RefLimit:
    rule_id: str
    amount: int
    unit: str
    window_seconds: int
    key: str


def glob(pattern: str, name: str) -> bool:
    rx = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(rx, name, re.DOTALL) is not None


# ---- values ------------------------------------------------------------------


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def is_seq(v: Any) -> bool:
    return isinstance(v, (list, tuple))


class Patterns:
    """A tools/models set as a value."""

    def __init__(self, patterns: Sequence[str]) -> None:
        self.patterns = list(patterns)


def equal(a: Any, b: Any) -> bool:
    if isinstance(a, Patterns):
        a = a.patterns
    if isinstance(b, Patterns):
        b = b.patterns
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is bool and type(b) is bool and a == b
    if is_number(a) or is_number(b):
        return is_number(a) and is_number(b) and a == b
    if isinstance(a, str) or isinstance(b, str):
        return isinstance(a, str) and isinstance(b, str) and a == b
    if a is None or b is None:
        return a is None and b is None
    if is_seq(a) or is_seq(b):
        if not (is_seq(a) and is_seq(b)) or len(a) != len(b):
            return False
        return all(equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return set(a) == set(b) and all(equal(a[k], b[k]) for k in a)
    return False


def member(x: Any, coll: Any) -> bool | None:
    """``x in coll``; None when the test does not apply to these types."""
    if isinstance(coll, Patterns):
        return any(glob(p, x) for p in coll.patterns) if isinstance(x, str) else None
    if isinstance(coll, str):
        return (x in coll) if isinstance(x, str) else None
    if isinstance(coll, Mapping):
        return (x in coll) if isinstance(x, str) else None
    if is_seq(coll):
        return any(equal(x, item) for item in coll)
    return None


def apply_op(op: str, a: Any, b: Any) -> bool:
    if op == "==":
        return equal(a, b)
    if op == "!=":
        return not equal(a, b)
    if op in ("<", "<=", ">", ">="):
        if not ((is_number(a) and is_number(b)) or (isinstance(a, str) and isinstance(b, str))):
            return False
        return {"<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b}[op]
    if op == "in":
        return member(a, b) is True
    if op == "has":
        return member(b, a) is True
    if op == "not in":
        return member(a, b) is False
    if op == "contains":
        if isinstance(a, str):
            return isinstance(b, str) and b in a
        if isinstance(a, Patterns) or is_seq(a):
            return member(b, a) is True
        return False
    if op == "startswith":
        return isinstance(a, str) and isinstance(b, str) and a.startswith(b)
    if op == "endswith":
        return isinstance(a, str) and isinstance(b, str) and a.endswith(b)
    if op == "matches":
        return isinstance(a, str) and compile_regex(b).search(a)
    if op == "like":
        return isinstance(a, str) and glob(b, a)
    raise AssertionError(op)


# ---- the environment -------------------------------------------------------------


@dataclass
class Event:
    kind: str  # which rule kind is being evaluated
    identity: Identity
    args: Any = NOTHING
    tool: Any = NOTHING
    context: Context | None = None
    request: RequestInfo | None = None
    model: Any = NOTHING
    result: Any = NOTHING
    schema: Schema | None = None


def tool_attributes(tool: str | ToolSpec, schema: Schema | None) -> dict[str, Any]:
    spec = ToolSpec.named(tool) if isinstance(tool, str) else tool
    server = spec.server
    if server is None and "__" in spec.name:
        head, _, rest = spec.name.partition("__")
        server = head if head and rest else None
    annotations = dict(spec.annotations)
    out: dict[str, Any] = {}
    description: str | None = spec.description if not isinstance(tool, str) else None
    decl = schema.tools.get(spec.name) if schema else None
    if decl is not None:
        annotations.update(decl.annotations)
        if not description:
            description = decl.description
        if decl.effect:
            out["effect"] = decl.effect
        out["destinations"] = list(decl.destinations)
    out.update(annotations)
    out["annotations"] = annotations
    out["name"] = spec.name
    out["server"] = server
    if description is not None:
        out["description"] = description
    return out


def walk(value: Any, steps: Sequence[str | int]) -> Any:
    for s in steps:
        if isinstance(s, int):
            if not (is_seq(value) and s < len(value)):
                return NOTHING
            value = value[s]
        else:
            if not isinstance(value, Mapping) or s not in value:
                return NOTHING
            value = value[s]
    return value


def identity_mapping(i: Identity) -> dict[str, Any]:
    out = dict(i.attributes)
    out.update(
        sub=i.subject,
        subject=i.subject,
        groups=i.groups,
        roles=i.roles,
        email=i.email,
        tenant=i.tenant,
        key_id=i.key_id,
        issuer=i.issuer,
        scopes=i.scopes,
        auth_method=i.auth_method,
        anonymous=i.anonymous,
    )
    return out


def context_mapping(c: Context) -> dict[str, Any]:
    out = dict(c.attributes)
    out.update(
        tainted=c.tainted,
        taint_sources=sorted(c.taint_sources),
        session=c.session,
        turn=c.turn,
        user_text="\n".join(c.user_texts),
    )
    return out


def request_mapping(r: RequestInfo) -> dict[str, Any]:
    return {
        "method": r.method,
        "path": r.path,
        "client": r.client,
        "protocol": r.protocol,
        "id": r.id,
        "headers": {k.lower(): v for k, v in r.headers.items()},
    }


ARG_KINDS = {"call", "tool", "result", "limit-call"}


def root_value(root: str, ev: Event) -> Any:
    if root == "identity":
        return identity_mapping(ev.identity)
    if root == "args":
        return ev.args if ev.kind in ARG_KINDS else NOTHING
    if root == "tool":
        return ev.tool if ev.kind in ARG_KINDS else NOTHING
    if root == "destinations":
        if ev.kind not in ARG_KINDS:
            return NOTHING
        if ev.args is UNSURE:
            return UNSURE
        out: list[Any] = []
        for d in ev.tool.get("destinations", []):
            v = walk(ev.args, d.split("."))
            if v is NOTHING:
                continue
            out.extend([x for x in v] if is_seq(v) else [v])
        return out
    if root == "context":
        if ev.kind == "context" or ev.context is None:
            return NOTHING
        return context_mapping(ev.context)
    if root == "request":
        if ev.request is None:
            return NOTHING
        return request_mapping(ev.request)
    if root == "model":
        return ev.model if ev.kind in ("model", "limit-model") else NOTHING
    if root == "result":
        return ev.result if ev.kind == "result" else NOTHING
    raise AssertionError(root)


class Interpreter:
    def __init__(self, sets: Mapping[str, ast.SetDecl]) -> None:
        self.sets = sets

    def value(self, e: ast.Expr, ev: Event) -> Any:
        if isinstance(e, ast.Lit):
            return e.value
        if isinstance(e, ast.ListExpr):
            vals = [self.value(i, ev) for i in e.items]
            if UNSURE in vals:
                return UNSURE
            return [v for v in vals if v is not NOTHING]
        if isinstance(e, ast.SetRef):
            decl = self.sets[e.name]
            if decl.set_kind == "values":
                return [i.value for i in decl.items]
            return Patterns([str(i.value) for i in decl.items])
        if isinstance(e, ast.Path):
            base = root_value(e.root, ev)
            if base is UNSURE:
                return UNSURE
            if base is NOTHING:
                return NOTHING
            return walk(base, e.parts)
        if isinstance(e, ast.Concat):
            vals = [self.value(i, ev) for i in e.items]
            if any(v is NOTHING for v in vals):
                return NOTHING
            if any(v is UNSURE for v in vals):
                return UNSURE
            total = vals[0]
            for v in vals[1:]:
                if (isinstance(total, str) and isinstance(v, str)) or (
                    is_number(total) and is_number(v)
                ):
                    total = total + v
                else:
                    return NOTHING
            return total
        t = self.truth(e, ev)
        return UNSURE if t is None else t

    def truth(self, e: ast.Expr, ev: Event) -> bool | None:
        """True, False, or None for unknown."""
        if isinstance(e, ast.And):
            ts = [self.truth(i, ev) for i in e.items]
            if False in ts:
                return False
            return None if None in ts else True
        if isinstance(e, ast.Or):
            ts = [self.truth(i, ev) for i in e.items]
            if True in ts:
                return True
            return None if None in ts else False
        if isinstance(e, ast.Not):
            t = self.truth(e.operand, ev)
            return None if t is None else not t
        if isinstance(e, ast.Compare):
            a = self.value(e.left, ev)
            b = e.right.value if e.op in ("matches", "like") else self.value(e.right, ev)  # type: ignore[union-attr]
            if a is NOTHING or b is NOTHING:
                return False
            if a is UNSURE or b is UNSURE:
                return None
            return apply_op(e.op, a, b)
        if isinstance(e, ast.From):
            if ev.kind == "context" or ev.context is None:
                return False
            v = self.value(e.value, ev)
            if v is NOTHING:
                return False
            if v is UNSURE:
                return None
            return from_source(ev.context, e.source, v)
        v = self.value(e, ev)
        if v is UNSURE:
            return None
        return v is True


# ---- the reference engine ------------------------------------------------------------


@dataclass
class RefRule:
    order: int
    stmt: ast.Rule | ast.LimitRule
    kind: str
    effect: str
    shadow: bool
    patterns: list[str] | None  # None: any name

    @property
    def rid(self) -> str:
        return self.stmt.rule_id

    def targets(self, name: str) -> bool:
        return self.patterns is None or any(glob(p, name) for p in self.patterns)


CALL_DEFAULTS = {"deny": "forbid", "allow": "allow", "ask": "ask"}


class Reference:
    def __init__(self, files: Sequence[ast.PolicyFile], schema: Schema | None = None) -> None:
        self.schema = schema
        self.sets: dict[str, ast.SetDecl] = {}
        self.defaults = {
            "call": "deny",
            "result": "untrusted",
            "model": "deny",
            "context": "trusted",
        }
        self.rules: list[RefRule] = []
        for f in files:
            for st in f.statements:
                if isinstance(st, ast.SetDecl):
                    self.sets[st.name] = st
                elif isinstance(st, ast.Default):
                    self.defaults[st.kind] = st.effect
        for f in files:
            file_shadow = f.mode == "shadow"
            for st in f.statements:
                if not isinstance(st, (ast.Rule, ast.LimitRule)):
                    continue
                mode = next((a.args[0] for a in st.annotations if a.name == "mode"), None)
                shadow = mode == "shadow" or (mode is None and file_shadow)
                if isinstance(st, ast.Rule):
                    kind, effect = st.kind, st.effect
                else:
                    kind, effect = "limit-" + st.kind, "limit"
                t = st.target
                if t.any:
                    pats = None
                elif t.set_name is not None:
                    pats = [str(i.value) for i in self.sets[t.set_name].items]
                else:
                    pats = list(t.patterns)
                self.rules.append(RefRule(len(self.rules), st, kind, effect, shadow, pats))
        self.interp = Interpreter(self.sets)

    def holds(self, r: RefRule, ev: Event) -> bool | None:
        if r.stmt.condition is None:
            return True
        return self.interp.truth(r.stmt.condition, ev)

    def _ranked(
        self, matched: list[RefRule], rank: dict[str, int], default: str, effect_of: dict[int, str]
    ) -> RefDecision:
        live = [r for r in matched if not r.shadow]
        shadow = tuple(r.rid for r in matched if r.shadow)
        if not live:
            return RefDecision(default, shadow_hits=shadow, defaulted=True)
        best = max(rank[r.effect] for r in live)
        return RefDecision(
            effect_of[best],
            rule_ids=tuple(r.rid for r in live if rank[r.effect] == best),
            overridden=tuple(r.rid for r in live if rank[r.effect] != best),
            shadow_hits=shadow,
        )

    def decide_call(
        self,
        identity: Identity,
        tool: str | ToolSpec,
        args: Mapping[str, Any],
        context: Context,
        request: RequestInfo | None = None,
    ) -> RefDecision:
        name = tool if isinstance(tool, str) else tool.name
        tv = tool_attributes(tool, self.schema)
        matched = []
        for r in self.rules:
            if not r.targets(name):
                continue
            if r.kind == "call" or (r.kind == "tool" and r.effect == "hide"):
                ev = Event(r.kind, identity, args, tv, context, request, schema=self.schema)
                if self.holds(r, ev) is True:
                    matched.append(r)
        rank = {"forbid": 3, "hide": 3, "ask": 2, "allow": 1}
        return self._ranked(
            matched, rank, CALL_DEFAULTS[self.defaults["call"]], {3: "forbid", 2: "ask", 1: "allow"}
        )

    def decide_visibility(
        self,
        identity: Identity,
        tool: str | ToolSpec,
        context: Context,
        request: RequestInfo | None = None,
    ) -> RefDecision:
        name = tool if isinstance(tool, str) else tool.name
        tv = tool_attributes(tool, self.schema)
        considered: list[tuple[RefRule, bool | None]] = []
        for r in self.rules:
            if r.kind in ("tool", "call") and r.targets(name):
                ev = Event(r.kind, identity, UNSURE, tv, context, request, schema=self.schema)
                considered.append((r, self.holds(r, ev)))
        shadow = tuple(r.rid for r, t in considered if r.shadow and t is True)
        live = [(r, t) for r, t in considered if not r.shadow]
        hides = [
            r.rid for r, t in live if r.kind == "tool" and r.effect == "hide" and t is not False
        ]
        shows = [r.rid for r, t in live if r.kind == "tool" and r.effect == "show" and t is True]
        if hides:
            return RefDecision("hide", tuple(hides), tuple(shows), shadow)
        if shows:
            return RefDecision("show", tuple(shows), (), shadow)
        forbids = [
            r.rid for r, t in live if r.kind == "call" and r.effect == "forbid" and t is True
        ]
        if forbids:
            sure = [
                r.rid for r, t in live if r.kind == "call" and r.effect != "forbid" and t is True
            ]
            return RefDecision("hide", tuple(forbids), tuple(sure), shadow)
        maybe = [
            r.rid for r, t in live if r.kind == "call" and r.effect != "forbid" and t is not False
        ]
        if maybe:
            return RefDecision("show", tuple(maybe), (), shadow)
        effect = "hide" if self.defaults["call"] == "deny" else "show"
        return RefDecision(effect, (), (), shadow, defaulted=True)

    def classify_result(
        self,
        identity: Identity,
        tool: str | ToolSpec,
        args: Mapping[str, Any],
        result: Any,
        context: Context,
        request: RequestInfo | None = None,
    ) -> RefDecision:
        name = tool if isinstance(tool, str) else tool.name
        tv = tool_attributes(tool, self.schema)
        view = {
            "text": result if isinstance(result, str) else json.dumps(result, sort_keys=True),
            "is_error": False,
            "content": result,
        }
        matched = []
        for r in self.rules:
            if r.kind == "result" and r.targets(name):
                ev = Event(
                    "result", identity, args, tv, context, request, result=view, schema=self.schema
                )
                if self.holds(r, ev) is True:
                    matched.append(r)
        live = [r for r in matched if not r.shadow]
        shadow = tuple(r.rid for r in matched if r.shadow)
        rank = {"block": 4, "quarantine": 3, "untrusted": 2, "trusted": 1}
        names = {v: k for k, v in rank.items()}
        at = lambda r: r.stmt.at  # noqa: E731
        whole = [r for r in live if r.effect != "redact" and not at(r)]
        fields = [r for r in live if r.effect != "redact" and at(r)]
        redacts = [r for r in live if r.effect == "redact"]
        winners: set[int] = {r.order for r in redacts}
        losers: set[int] = set()
        if whole:
            best = max(rank[r.effect] for r in whole)
            effect = names[best]
            for r in whole:
                (winners if rank[r.effect] == best else losers).add(r.order)
            defaulted = False
        else:
            effect, defaulted = self.defaults["result"], True
        per_path: dict[str, int] = {}
        for r in fields:
            for p in at(r):
                per_path[p] = max(per_path.get(p, 0), rank[r.effect])
        for r in fields:
            if any(per_path[p] == rank[r.effect] for p in at(r)):
                winners.add(r.order)
            else:
                losers.add(r.order)
        paths = [(p, names[k]) for p, k in per_path.items()]
        seen_paths: list[str] = []
        patterns: list[str] = []
        for r in redacts:
            for p in at(r):
                if p not in seen_paths:
                    seen_paths.append(p)
            for u in r.stmt.using or ("secrets",):
                if u not in patterns:
                    patterns.append(u)
        paths += [(p, "redact") for p in seen_paths]
        options: dict[str, Any] = {}
        for r in live:
            if r.order in winners and r.effect == "quarantine":
                for k, v in r.stmt.options:
                    if k not in options:
                        options[k] = v
        return RefDecision(
            effect,
            tuple(r.rid for r in live if r.order in winners),
            tuple(r.rid for r in live if r.order in losers),
            shadow,
            defaulted,
            None,
            tuple(patterns),
            tuple(paths),
            options,
        )

    def decide_model(
        self,
        identity: Identity,
        model: str | ModelRequest,
        context: Context,
        request: RequestInfo | None = None,
    ) -> RefDecision:
        m = ModelRequest(model) if isinstance(model, str) else model
        view: dict[str, Any] = {"name": m.name}
        if not isinstance(model, str):
            view.update(provider=m.provider, protocol=m.protocol, max_tokens=m.max_tokens)
        matched = []
        for r in self.rules:
            if r.kind == "model" and r.targets(m.name):
                ev = Event("model", identity, context=context, request=request, model=view)
                if self.holds(r, ev) is True:
                    matched.append(r)
        d = self._ranked(
            matched,
            {"forbid": 2, "allow": 1},
            "forbid" if self.defaults["model"] == "deny" else "allow",
            {2: "forbid", 1: "allow"},
        )
        if d.effect == "allow" and not d.defaulted:
            for r in matched:
                if not r.shadow and r.effect == "allow" and r.stmt.route:  # type: ignore[union-attr]
                    return RefDecision(
                        d.effect, d.rule_ids, d.overridden, d.shadow_hits, False, r.stmt.route
                    )  # type: ignore[union-attr]
        return d

    def decide_context(self, identity: Identity, request: RequestInfo | None = None) -> RefDecision:
        matched = []
        for r in self.rules:
            if r.kind == "context":
                ev = Event("context", identity, request=request)
                if self.holds(r, ev) is True:
                    matched.append(r)
        return self._ranked(
            matched,
            {"untrusted": 2, "trusted": 1},
            self.defaults["context"],
            {2: "untrusted", 1: "trusted"},
        )

    def limits(
        self,
        kind: str,
        identity: Identity,
        name: str,
        args: Mapping[str, Any],
        context: Context,
        request: RequestInfo | None = None,
    ) -> tuple[RefLimit, ...]:
        out = []
        for r in self.rules:
            if r.kind != "limit-" + kind or r.shadow or not r.targets(name):
                continue
            ev = Event(
                r.kind,
                identity,
                args if kind == "call" else NOTHING,
                tool_attributes(name, self.schema) if kind == "call" else NOTHING,
                context,
                request,
                model={"name": name} if kind == "model" else NOTHING,
                schema=self.schema,
            )
            if self.holds(r, ev) is not True:
                continue
            stmt = r.stmt
            assert isinstance(stmt, ast.LimitRule)
            by = stmt.by or ast.Path("identity", ("sub",))
            v = self.interp.value(by, ev)
            if v is NOTHING:
                key = "<missing>"
            elif isinstance(v, str):
                key = v
            else:
                key = json.dumps(v, sort_keys=True, default=str, ensure_ascii=False)
            out.append(
                RefLimit(r.rid, stmt.amount, stmt.unit, stmt.window_seconds, f"{r.rid}|{key}")
            )
        return tuple(out)
