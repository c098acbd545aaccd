"""The neutral vocabulary shared by the engine, the adapters and the services.

Codecs turn wire bytes into these values, the engine decides on them, and the
audit trail records them. Everything here is immutable and cheap to build: these
objects sit on the hot path of every guarded request.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "AuditEvent",
    "Context",
    "Decision",
    "Effect",
    "EventKind",
    "Identity",
    "ModelRequest",
    "RequestInfo",
    "RuleTrace",
    "ToolCall",
    "ToolResult",
    "ToolSpec",
    "split_tool_name",
]

SERVER_SEPARATOR = "__"


class EventKind(enum.StrEnum):
    """What a decision is about."""

    CALL = "call"
    VISIBILITY = "visibility"
    RESULT = "result"
    MODEL = "model"
    CONTEXT = "context"


class Effect(enum.StrEnum):
    """Every effect a rule or default can produce, across event kinds."""

    # calls and models
    ALLOW = "allow"
    FORBID = "forbid"
    ASK = "ask"
    # visibility
    SHOW = "show"
    HIDE = "hide"
    # results
    TRUSTED = "trusted"
    UNTRUSTED = "untrusted"
    QUARANTINE = "quarantine"
    REDACT = "redact"
    BLOCK = "block"


def split_tool_name(name: str) -> tuple[str | None, str]:
    """Split the MCP gateway convention ``server__tool`` into (server, tool)."""
    server, sep, rest = name.partition(SERVER_SEPARATOR)
    if sep and server and rest:
        return server, rest
    return None, name


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is calling, as established by the identity layer.

    Policies read ``identity.<name>``: the named fields first, then ``attributes``
    (any mapped claim). ``anonymous`` is true when no credential was presented and
    the configuration let the request through to the policy anyway.
    """

    subject: str
    groups: tuple[str, ...] = ()
    roles: tuple[str, ...] = ()
    email: str | None = None
    tenant: str | None = None
    key_id: str | None = None
    issuer: str | None = None
    scopes: tuple[str, ...] = ()
    auth_method: str = "none"
    anonymous: bool = False
    attributes: Mapping[str, Any] = field(default_factory=dict)

    _FIELDS = frozenset(
        {
            "sub",
            "subject",
            "groups",
            "roles",
            "email",
            "tenant",
            "key_id",
            "issuer",
            "scopes",
            "auth_method",
            "anonymous",
        }
    )

    def get(self, name: str, default: Any = None) -> Any:
        """Return an attribute by its policy name (``sub`` is an alias of ``subject``)."""
        if name == "sub":
            return self.subject
        if name in Identity._FIELDS:
            return getattr(self, name)
        return self.attributes.get(name, default)

    @classmethod
    def anonymous_identity(cls) -> Identity:
        return cls(subject="anonymous", anonymous=True)


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """A tool as advertised to the model: its name, server and MCP annotations."""

    name: str
    description: str = ""
    input_schema: Mapping[str, Any] = field(default_factory=dict)
    annotations: Mapping[str, Any] = field(default_factory=dict)
    server: str | None = None

    @classmethod
    def named(cls, name: str, **kwargs: Any) -> ToolSpec:
        """A spec whose server comes from the ``server__tool`` convention unless given."""
        if "server" not in kwargs:
            kwargs["server"] = split_tool_name(name)[0]
        return cls(name=name, **kwargs)


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A tool call the model asked for, with its complete, parsed arguments."""

    id: str
    name: str
    arguments: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class ToolResult:
    """A tool's output as it appears in the conversation or an MCP reply."""

    call_id: str | None
    name: str
    content: Any
    arguments: Mapping[str, Any] = field(default_factory=dict)
    is_error: bool = False


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """The HTTP request a decision belongs to (``request.*`` in policies)."""

    method: str = "POST"
    path: str = "/"
    client: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    protocol: str | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def get(self, name: str, default: Any = None) -> Any:
        if name in ("method", "path", "client", "protocol", "id"):
            return getattr(self, name)
        if name == "headers":
            return self.headers
        return default


@dataclass(frozen=True, slots=True)
class Context:
    """What is known about the conversation a decision is made in (``context.*``).

    ``untrusted_texts`` and ``trusted_texts`` hold tool output by trust class,
    ``user_texts`` the user's and system's own messages; argument provenance
    (``args.x from untrusted``) is computed from them, indexed once per context.
    """

    tainted: bool = False
    taint_sources: frozenset[str] = frozenset()
    session: str | None = None
    turn: int = 0
    user_texts: tuple[str, ...] = ()
    trusted_texts: tuple[str, ...] = ()
    untrusted_texts: tuple[str, ...] = ()
    attributes: Mapping[str, Any] = field(default_factory=dict)
    _cache: dict[str, Any] = field(default_factory=dict, compare=False, repr=False, hash=False)

    @property
    def user_text(self) -> str:
        return "\n".join(self.user_texts)

    def get(self, name: str, default: Any = None) -> Any:
        if name == "tainted":
            return self.tainted
        if name == "taint_sources":
            return self.taint_sources
        if name == "session":
            return self.session
        if name == "turn":
            return self.turn
        if name == "user_text":
            return self.user_text
        return self.attributes.get(name, default)

    def with_taint(self, source: str, text: str | None = None) -> Context:
        """A copy of this context tainted by ``source`` (and holding its text)."""
        texts = self.untrusted_texts + ((text,) if text else ())
        return Context(
            tainted=True,
            taint_sources=self.taint_sources | {source},
            session=self.session,
            turn=self.turn,
            user_texts=self.user_texts,
            trusted_texts=self.trusted_texts,
            untrusted_texts=texts,
            attributes=self.attributes,
        )


EMPTY_CONTEXT = Context()


@dataclass(frozen=True, slots=True)
class ModelRequest:
    """A request for a model (``model.*`` in policies)."""

    name: str
    provider: str | None = None
    protocol: str | None = None
    max_tokens: int | None = None

    def get(self, name: str, default: Any = None) -> Any:
        if name in ("name", "provider", "protocol", "max_tokens"):
            return getattr(self, name)
        return default


@dataclass(frozen=True, slots=True)
class RuleTrace:
    """One considered rule in an explained decision."""

    rule_id: str
    effect: str
    matched: bool
    shadow: bool
    condition: str
    detail: str
    location: str


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one policy decision.

    ``rule_ids`` and ``reasons`` are those of every matching rule that produced
    the effect (in source order); ``overridden`` the other matching rules whose
    effect lost (an ``allow`` beaten by a ``forbid``); ``shadow_hits`` are
    shadow-mode rules that matched but did not change it. ``defaulted`` is true when no rule
    matched. Result decisions carry what the codecs need to rewrite the output:
    ``redact_patterns`` and ``paths`` (JSON paths with their own trust class), and
    ``options`` (quarantine schema and the like). ``trace`` is set with ``explain``.
    """

    kind: EventKind
    effect: Effect
    rule_ids: tuple[str, ...] = ()
    reasons: tuple[str, ...] = ()
    shadow_hits: tuple[str, ...] = ()
    overridden: tuple[str, ...] = ()
    defaulted: bool = False
    route: str | None = None
    redact_patterns: tuple[str, ...] = ()
    paths: tuple[tuple[str, Effect], ...] = ()
    options: Mapping[str, Any] = field(default_factory=dict)
    trace: tuple[RuleTrace, ...] | None = None

    @property
    def allowed(self) -> bool:
        """True when the event may proceed as is (allow, show, trusted)."""
        return self.effect in (Effect.ALLOW, Effect.SHOW, Effect.TRUSTED)

    @property
    def reason(self) -> str:
        """One human-readable reason: the rules' own reasons, else a generic one."""
        if self.reasons:
            return "; ".join(self.reasons)
        if self.defaulted:
            return f"no rule matched; the default is {self.effect.value}"
        return f"{self.effect.value} by {', '.join(self.rule_ids)}"


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """What the adapters hand to the ``on_decision`` hook for every decision.

    ``target`` is the tool or model name; ``arguments`` the call's arguments (the
    audit layer redacts or digests them); ``detail`` carries adapter-specific
    facts (quarantine questions and answers, upstream status, latency, provider
    key fingerprint, error text for protocol failures).
    """

    decision: Decision
    identity: Identity
    target: str
    protocol: str
    request: RequestInfo | None = None
    session: str | None = None
    arguments: Mapping[str, Any] | None = None
    taint_sources: frozenset[str] = frozenset()
    detail: Mapping[str, Any] = field(default_factory=dict)
