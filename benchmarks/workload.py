"""The engine benchmark's workload: one seeded set of rules and requests, in every engine's language.

A rule here is engine-neutral (effect, target, a conjunction of conditions); the
``to_*`` functions write the same rules natively for Bastion, Cedar, casbin and
Rego, and ``IndexedBaseline`` decides them by hand with plain dicts and lambdas.
``oracle`` is the obvious scan over every rule: slow, and the definition of the
right answer.

Everything is restricted to what all engines express exactly: only ``allow`` and
``forbid`` (no ``ask``: Cedar, casbin and Rego have no third effect), default
deny, trailing-``*`` globs (casbin's ``keyMatch`` and Rego's ``startswith``),
integer amounts (Cedar has only 64-bit integers), flat arguments and a boolean
``tainted`` that every request carries.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

SERVERS = tuple(f"s{i:02d}" for i in range(50))
VERBS = ("get", "list", "search", "create", "update", "delete", "send", "approve")
NOUNS = ("issue", "repo", "file", "payment", "message")
ACTIONS = tuple(f"{verb}_{noun}" for verb in VERBS for noun in NOUNS)
TOOLS = tuple(f"{server}__{action}" for server in SERVERS for action in ACTIONS)

GROUPS = (*(f"g{i:02d}" for i in range(30)), "contractors")
TENANTS = tuple(f"t{i:02d}" for i in range(20))
ROLES = ("viewer", "developer", "maintainer", "admin", "auditor")
REPO_PREFIXES = ("acme/", "ext/", "other/")
N_IDENTITIES = 400

# Broad rules are few and specific rules many, as in real policies: at most two
# rules per server glob and per (server, verb) glob, so a tool's candidate list
# stays bounded while the exact-name rules grow with the policy.
MAX_SERVER_GLOB_RULES = 2 * len(SERVERS)
MAX_PREFIX_GLOB_RULES = 2 * len(SERVERS) * len(VERBS)


@dataclass(frozen=True, slots=True)
class Cond:
    """One condition: kind is group, tenant, role, level_ge, amount_gt, amount_lt,
    repo_prefix, tainted or not_tainted."""

    kind: str
    value: Any = None


@dataclass(frozen=True, slots=True)
class Rule:
    id: str
    effect: str  # "allow" | "forbid"
    target: str  # "exact" | "server" | "prefix"
    pattern: str  # "s03__get_issue", "s03__*", "s03__get_*"
    conds: tuple[Cond, ...]

    def matches_tool(self, tool: str) -> bool:
        if self.target == "exact":
            return tool == self.pattern
        return tool.startswith(self.pattern[:-1])


@dataclass(frozen=True, slots=True)
class Person:
    subject: str
    groups: tuple[str, ...]
    roles: tuple[str, ...]
    tenant: str
    level: int


@dataclass(frozen=True, slots=True)
class Request:
    tool: str
    person: int  # index into Workload.people
    args: Mapping[str, Any]
    tainted: bool


@dataclass(frozen=True)
class Workload:
    rules: tuple[Rule, ...]
    people: tuple[Person, ...]
    requests: tuple[Request, ...]
    seed: int
    tools: tuple[str, ...] = field(default=TOOLS)


def make_people(rng: random.Random, n: int = N_IDENTITIES) -> tuple[Person, ...]:
    people = []
    for i in range(n):
        k = rng.choice((1, 2, 2, 3, 4))
        groups = tuple(sorted(rng.sample(GROUPS, k)))
        roles = tuple(sorted(rng.sample(ROLES, rng.choice((1, 1, 2)))))
        people.append(Person(f"u{i:04d}", groups, roles, rng.choice(TENANTS), rng.randint(1, 5)))
    return tuple(people)


def _identity_cond(rng: random.Random) -> Cond | None:
    x = rng.random()
    if x < 0.35:
        return Cond("group", rng.choice(GROUPS[:-1]))
    if x < 0.55:
        return Cond("tenant", rng.choice(TENANTS))
    if x < 0.70:
        return Cond("role", rng.choice(ROLES))
    return None


def _extra_allow_cond(rng: random.Random) -> Cond | None:
    x = rng.random()
    if x < 0.20:
        return Cond("level_ge", rng.randint(2, 5))
    if x < 0.40:
        return Cond("amount_lt", rng.choice((100, 200, 500, 1000)))
    if x < 0.55:
        return Cond("repo_prefix", "acme/")
    if x < 0.65:
        return Cond("not_tainted")
    return None


def _forbid_conds(rng: random.Random, target: str) -> tuple[Cond, ...]:
    x = rng.random()
    if x < 0.40 or (x >= 0.90 and target != "exact"):
        return (Cond("tainted"),)
    if x < 0.65:
        return (Cond("amount_gt", rng.choice((500, 1000, 1500))),)
    if x < 0.80:
        return (Cond("group", "contractors"),)
    if x < 0.90:
        return (Cond("repo_prefix", "ext/"),)
    return ()  # an unconditional forbid on one exact tool


def make_rules(rng: random.Random, n: int) -> tuple[Rule, ...]:
    n_server = min(round(n * 0.1), MAX_SERVER_GLOB_RULES)
    n_prefix = min(round(n * 0.2), MAX_PREFIX_GLOB_RULES)
    targets = ["server"] * n_server + ["prefix"] * n_prefix
    targets += ["exact"] * (n - len(targets))
    rng.shuffle(targets)
    server_slots = [s for s in SERVERS for _ in range(2)]
    prefix_slots = [(s, v) for s in SERVERS for v in VERBS for _ in range(2)]
    rng.shuffle(server_slots)
    rng.shuffle(prefix_slots)
    rules = []
    for i, target in enumerate(targets):
        if target == "server":
            pattern = f"{server_slots.pop()}__*"
        elif target == "prefix":
            server, verb = prefix_slots.pop()
            pattern = f"{server}__{verb}_*"
        else:
            pattern = rng.choice(TOOLS)
        if rng.random() < 0.2:
            rules.append(Rule(f"r{i}", "forbid", target, pattern, _forbid_conds(rng, target)))
            continue
        conds = tuple(c for c in (_identity_cond(rng), _extra_allow_cond(rng)) if c is not None)
        rules.append(Rule(f"r{i}", "allow", target, pattern, conds))
    return tuple(rules)


def _tool_for(rng: random.Random, rule: Rule) -> str:
    if rule.target == "exact":
        return rule.pattern
    prefix = rule.pattern[:-1]
    return rng.choice([t for t in _tools_by_server(prefix[:3]) if t.startswith(prefix)])


_BY_SERVER: dict[str, tuple[str, ...]] = {}


def _tools_by_server(server: str) -> tuple[str, ...]:
    if not _BY_SERVER:
        for tool in TOOLS:
            _BY_SERVER.setdefault(tool[:3], ())
            _BY_SERVER[tool[:3]] += (tool,)
    return _BY_SERVER[server]


def _random_args(rng: random.Random) -> dict[str, Any]:
    args: dict[str, Any] = {"title": f"item {rng.randint(0, 999)}"}
    if rng.random() < 0.7:
        args["amount"] = rng.choice(
            (0, 50, 99, 100, 150, 199, 200, 499, 500, 999, 1000, 1500, 2000)
        )
    if rng.random() < 0.6:
        args["repo"] = rng.choice(REPO_PREFIXES) + rng.choice(("web", "api", "infra"))
    return args


def make_requests(
    rng: random.Random, rules: tuple[Rule, ...], people: tuple[Person, ...], n: int
) -> tuple[Request, ...]:
    by_attr: dict[tuple[str, Any], list[int]] = {}
    for i, p in enumerate(people):
        for g in p.groups:
            by_attr.setdefault(("group", g), []).append(i)
        for r in p.roles:
            by_attr.setdefault(("role", r), []).append(i)
        by_attr.setdefault(("tenant", p.tenant), []).append(i)
    requests = []
    for _ in range(n):
        if rules and rng.random() < 0.75:
            # Aim at a rule, and most of the time at an identity its conditions name,
            # so that allows, forbids and near misses are all common.
            rule = rng.choice(rules)
            tool = _tool_for(rng, rule)
            person = rng.randrange(len(people))
            for cond in rule.conds:
                key = (cond.kind, cond.value)
                if key in by_attr and rng.random() < 0.7:
                    person = rng.choice(by_attr[key])
        else:
            tool = rng.choice(TOOLS)
            person = rng.randrange(len(people))
        requests.append(Request(tool, person, _random_args(rng), rng.random() < 0.3))
    return tuple(requests)


def generate(n_rules: int, n_requests: int = 10_000, seed: int = 7) -> Workload:
    """The workload for one policy size; the same arguments always give the same workload."""
    rng = random.Random(f"{seed}:{n_rules}")
    people = make_people(random.Random(seed))
    rules = make_rules(rng, n_rules)
    return Workload(rules, people, make_requests(rng, rules, people, n_requests), seed)


# --- the meaning of a condition, written once for the oracle -----------------------------


def holds(cond: Cond, person: Person, args: Mapping[str, Any], tainted: bool) -> bool:
    kind, value = cond.kind, cond.value
    if kind == "group":
        return bool(value in person.groups)
    if kind == "tenant":
        return bool(person.tenant == value)
    if kind == "role":
        return bool(value in person.roles)
    if kind == "level_ge":
        return bool(person.level >= value)
    if kind == "amount_gt":
        amount = args.get("amount")
        return isinstance(amount, int) and bool(amount > value)
    if kind == "amount_lt":
        amount = args.get("amount")
        return isinstance(amount, int) and bool(amount < value)
    if kind == "repo_prefix":
        repo = args.get("repo")
        return isinstance(repo, str) and repo.startswith(value)
    if kind == "tainted":
        return tainted
    if kind == "not_tainted":
        return not tainted
    raise ValueError(kind)


def oracle(workload: Workload, request: Request) -> bool:
    """Allowed or not, by scanning every rule: forbid overrides allow, default deny."""
    person = workload.people[request.person]
    allowed = False
    for rule in workload.rules:
        if rule.matches_tool(request.tool) and all(
            holds(c, person, request.args, request.tainted) for c in rule.conds
        ):
            if rule.effect == "forbid":
                return False
            allowed = True
    return allowed


# --- the hand-written indexed baseline ----------------------------------------------------

Check = Callable[[Mapping[str, Any], bool, Person], bool]


def _lambda(cond: Cond) -> Check:
    v = cond.value
    kind = cond.kind
    if kind == "group":
        return lambda a, t, p: v in p.groups
    if kind == "tenant":
        return lambda a, t, p: p.tenant == v
    if kind == "role":
        return lambda a, t, p: v in p.roles
    if kind == "level_ge":
        return lambda a, t, p: p.level >= v
    if kind == "amount_gt":
        return lambda a, t, p: (x := a.get("amount")) is not None and x > v
    if kind == "amount_lt":
        return lambda a, t, p: (x := a.get("amount")) is not None and x < v
    if kind == "repo_prefix":
        return lambda a, t, p: (x := a.get("repo")) is not None and x.startswith(v)
    if kind == "tainted":
        return lambda a, t, p: t
    if kind == "not_tainted":
        return lambda a, t, p: not t
    raise ValueError(kind)


def _conjunction(checks: list[Check]) -> Check | None:
    if not checks:
        return None
    if len(checks) == 1:
        return checks[0]
    first, second = checks[0], checks[1]
    if len(checks) == 2:
        return lambda a, t, p: first(a, t, p) and second(a, t, p)
    return lambda a, t, p: all(c(a, t, p) for c in checks)


_IDENTITY_KEYS = {"group": "g:", "tenant": "t:", "role": "r:"}


class IndexedBaseline:
    """The floor: rules expanded over the known tools and bucketed by the identity
    attribute their condition names (group, tenant or role), conditions as lambdas.

    ``keys(person)`` is computed once per identity, as an identity layer would.
    """

    def __init__(self, rules: tuple[Rule, ...], tools: tuple[str, ...] = TOOLS) -> None:
        by_tool: dict[str, dict[str, tuple[list[Check | None], list[Check | None]]]] = {}
        for rule in rules:
            key = "*"
            rest = list(rule.conds)
            for cond in rule.conds:
                if cond.kind in _IDENTITY_KEYS:
                    key = _IDENTITY_KEYS[cond.kind] + cond.value
                    rest.remove(cond)
                    break
            check = _conjunction([_lambda(c) for c in rest])
            expanded = (
                [rule.pattern]
                if rule.target == "exact"
                else [t for t in tools if rule.matches_tool(t)]
            )
            for tool in expanded:
                forbids, allows = by_tool.setdefault(tool, {}).setdefault(key, ([], []))
                (forbids if rule.effect == "forbid" else allows).append(check)
        # Freeze into tuples of (forbids, allows) per key.
        self.index: dict[
            str, dict[str, tuple[tuple[Check | None, ...], tuple[Check | None, ...]]]
        ] = {
            tool: {k: (tuple(f), tuple(a)) for k, (f, a) in buckets.items()}
            for tool, buckets in by_tool.items()
        }

    @staticmethod
    def keys(person: Person) -> tuple[str, ...]:
        return (
            "*",
            *(f"g:{g}" for g in person.groups),
            f"t:{person.tenant}",
            *(f"r:{r}" for r in person.roles),
        )

    def decide(
        self,
        tool: str,
        keys: tuple[str, ...],
        person: Person,
        args: Mapping[str, Any],
        tainted: bool,
    ) -> bool:
        buckets = self.index.get(tool)
        if buckets is None:
            return False
        allowed = False
        for key in keys:
            bucket = buckets.get(key)
            if bucket is None:
                continue
            forbids, allows = bucket
            for check in forbids:
                if check is None or check(args, tainted, person):
                    return False
            if not allowed:
                for check in allows:
                    if check is None or check(args, tainted, person):
                        allowed = True
                        break
        return allowed


# --- Bastion ------------------------------------------------------------------------------


def _bastion_cond(cond: Cond) -> str:
    kind, v = cond.kind, cond.value
    return {
        "group": f'identity.groups has "{v}"',
        "tenant": f'identity.tenant == "{v}"',
        "role": f'identity.roles has "{v}"',
        "level_ge": f"identity.level >= {v}",
        "amount_gt": f"args.amount > {v}",
        "amount_lt": f"args.amount < {v}",
        "repo_prefix": f'args.repo startswith "{v}"',
        "tainted": "context.tainted",
        "not_tainted": "context.tainted",  # written as an `unless` clause
    }[kind]


def to_bastion(rules: tuple[Rule, ...]) -> str:
    lines = ['policy "bench"', "default call deny", ""]
    for rule in rules:
        when = [_bastion_cond(c) for c in rule.conds if c.kind != "not_tainted"]
        clauses = ""
        if when:
            clauses += " when " + " and ".join(when)
        if any(c.kind == "not_tainted" for c in rule.conds):
            clauses += " unless context.tainted"
        lines.append(f'@id("{rule.id}") {rule.effect} call "{rule.pattern}"{clauses}')
    return "\n".join(lines) + "\n"


# --- Cedar --------------------------------------------------------------------------------


def _cedar_cond(cond: Cond) -> str:
    kind, v = cond.kind, cond.value
    return {
        "group": f'principal in Group::"{v}"',
        "tenant": f'principal.tenant == "{v}"',
        "role": f'principal.roles.contains("{v}")',
        "level_ge": f"principal.level >= {v}",
        "amount_gt": f"context.args has amount && context.args.amount > {v}",
        "amount_lt": f"context.args has amount && context.args.amount < {v}",
        "repo_prefix": f'context.args has repo && context.args.repo like "{v}*"',
        "tainted": "context.tainted",
        "not_tainted": "!context.tainted",
    }[kind]


def to_cedar(rules: tuple[Rule, ...]) -> str:
    out = []
    for rule in rules:
        effect = "permit" if rule.effect == "allow" else "forbid"
        if rule.target == "exact":
            resource = f'resource == Tool::"{rule.pattern}"'
            conds = [_cedar_cond(c) for c in rule.conds]
        else:
            # A server is the tools' parent entity; a narrower glob is `like` on the name.
            resource = f'resource in Server::"{rule.pattern[:3]}"'
            conds = [] if rule.target == "server" else [f'resource.name like "{rule.pattern}"']
            conds += [_cedar_cond(c) for c in rule.conds]
        body = "".join(f" when {{ {c} }}" for c in conds)
        out.append(
            f'@id("{rule.id}")\n{effect}(principal, action == Action::"call", {resource}){body};'
        )
    return "\n".join(out) + "\n"


def cedar_entities(workload: Workload) -> list[dict[str, Any]]:
    entities: list[dict[str, Any]] = [
        {"uid": {"type": "Group", "id": g}, "attrs": {}, "parents": []} for g in GROUPS
    ]
    entities += [{"uid": {"type": "Server", "id": s}, "attrs": {}, "parents": []} for s in SERVERS]
    entities += [
        {
            "uid": {"type": "Tool", "id": t},
            "attrs": {"name": t},
            "parents": [{"type": "Server", "id": t[:3]}],
        }
        for t in workload.tools
    ]
    entities += [
        {
            "uid": {"type": "User", "id": p.subject},
            "attrs": {"tenant": p.tenant, "level": p.level, "roles": list(p.roles)},
            "parents": [{"type": "Group", "id": g} for g in p.groups],
        }
        for p in workload.people
    ]
    entities.append({"uid": {"type": "Action", "id": "call"}, "attrs": {}, "parents": []})
    return entities


def cedar_request(workload: Workload, request: Request) -> dict[str, Any]:
    return {
        "principal": f'User::"{workload.people[request.person].subject}"',
        "action": 'Action::"call"',
        "resource": f'Tool::"{request.tool}"',
        "context": {"args": dict(request.args), "tainted": request.tainted},
    }


# --- casbin -------------------------------------------------------------------------------

CASBIN_MODEL = """
[request_definition]
r = sub, obj, args, ctx

[policy_definition]
p = obj, cond, eft

[policy_effect]
e = some(where (p.eft == allow)) && !some(where (p.eft == deny))

[matchers]
m = keyMatch(r.obj, p.obj) && eval(p.cond)
"""


def _casbin_cond(cond: Cond) -> str:
    kind, v = cond.kind, cond.value
    return {
        "group": f"'{v}' in r.sub.groups",
        "tenant": f"r.sub.tenant == '{v}'",
        "role": f"'{v}' in r.sub.roles",
        "level_ge": f"r.sub.level >= {v}",
        "amount_gt": f"'amount' in r.args and r.args.amount > {v}",
        "amount_lt": f"'amount' in r.args and r.args.amount < {v}",
        "repo_prefix": f"'repo' in r.args and keyMatch(r.args.repo, '{v}*')",
        "tainted": "r.ctx.tainted",
        "not_tainted": "not r.ctx.tainted",
    }[kind]


def to_casbin(rules: tuple[Rule, ...]) -> list[list[str]]:
    """Policy lines ``p, obj, cond, eft`` (the matcher evaluates ``cond`` with eval())."""
    return [
        [
            rule.pattern,
            " and ".join(f"({_casbin_cond(c)})" for c in rule.conds) or "True",
            "allow" if rule.effect == "allow" else "deny",
        ]
        for rule in rules
    ]


# --- Rego ---------------------------------------------------------------------------------


def _rego_cond(cond: Cond) -> str:
    kind, v = cond.kind, cond.value
    return {
        "group": f'"{v}" in input.identity.groups',
        "tenant": f'input.identity.tenant == "{v}"',
        "role": f'"{v}" in input.identity.roles',
        "level_ge": f"input.identity.level >= {v}",
        "amount_gt": f"input.args.amount > {v}",
        "amount_lt": f"input.args.amount < {v}",
        "repo_prefix": f'startswith(input.args.repo, "{v}")',
        "tainted": "input.context.tainted",
        "not_tainted": "not input.context.tainted",
    }[kind]


def to_rego(rules: tuple[Rule, ...]) -> str:
    out = [
        "package bastion",
        "",
        "import rego.v1",
        "",
        "default allow := false",
        "",
        "allow if {",
        "\tpermitted",
        "\tnot forbidden",
        "}",
        "",
    ]
    for rule in rules:
        head = "permitted" if rule.effect == "allow" else "forbidden"
        if rule.target == "exact":
            body = [f'input.tool == "{rule.pattern}"']
        else:
            body = [f'startswith(input.tool, "{rule.pattern[:-1]}")']
        body += [_rego_cond(c) for c in rule.conds]
        out.append(f"# {rule.id}\n{head} if {{\n" + "".join(f"\t{b}\n" for b in body) + "}")
    return "\n".join(out) + "\n"


def rego_input(workload: Workload, request: Request) -> dict[str, Any]:
    p = workload.people[request.person]
    return {
        "tool": request.tool,
        "identity": {
            "sub": p.subject,
            "groups": list(p.groups),
            "roles": list(p.roles),
            "tenant": p.tenant,
            "level": p.level,
        },
        "args": dict(request.args),
        "context": {"tainted": request.tainted},
    }


def describe(workload: Workload) -> dict[str, Any]:
    """Counts that say what the workload is made of."""
    kinds: dict[str, int] = {}
    for rule in workload.rules:
        kinds[f"{rule.effect}/{rule.target}"] = kinds.get(f"{rule.effect}/{rule.target}", 0) + 1
    return {"rules": len(workload.rules), "requests": len(workload.requests), "kinds": kinds}


def iter_policy_texts(workload: Workload) -> Iterator[tuple[str, str]]:
    yield "bastion", to_bastion(workload.rules)
    yield "cedar", to_cedar(workload.rules)
    yield "casbin", json.dumps(to_casbin(workload.rules))
    yield "rego", to_rego(workload.rules)
