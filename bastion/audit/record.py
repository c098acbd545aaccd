"""The audit record: its versioned schema, how an event becomes one, and the hash chain.

A record is built from an :class:`~bastion.events.AuditEvent` off the request path
(in the trail's writer thread) as a plain JSON-ready dict, then sealed by a sink:
``prev_hash`` is the previous record's ``hash`` (``GENESIS_HASH`` for the first)
and ``hash`` is the SHA-256 of the record's canonical JSON without ``hash``.
:class:`AuditRecord` is the documented schema and the model readers validate with.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from bastion.events import AuditEvent, Effect, split_tool_name

__all__ = [
    "DENIAL_EFFECTS",
    "GENESIS_HASH",
    "SCHEMA_VERSION",
    "ArgumentRedaction",
    "AuditIdentity",
    "AuditQuarantine",
    "AuditRecord",
    "AuditRequest",
    "AuditTraceEntry",
    "build_record",
    "canonical_json",
    "format_time",
    "new_record_id",
    "record_hash",
    "seal",
    "seal_json",
]

SCHEMA_VERSION = 1
GENESIS_HASH = "0" * 64

# Effects that stop or hold what the agent asked for: their trace is always kept.
DENIAL_EFFECTS = frozenset({Effect.FORBID, Effect.ASK, Effect.HIDE, Effect.BLOCK})

DEFAULT_SECRET_KEYS = (
    r"(?i)(pass(word|wd|phrase)?|secret|token|api[_-]?key|apikey|auth|credential|"
    r"private[_-]?key|cookie|session[_-]?key|bearer|signature|otp|pin$|cvv|ssn)"
)
DEFAULT_SECRET_VALUES = (
    r"(\b(sk|pk|rk)-[A-Za-z0-9_-]{16,}|\bsk-ant-[A-Za-z0-9_-]{16,}|\bAKIA[0-9A-Z]{16}\b|"
    r"\bgh[pousr]_[A-Za-z0-9]{30,}|\bxox[abposr]-[A-Za-z0-9-]{10,}|"
    r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}|"
    r"(?i:\bbearer\s+[A-Za-z0-9._~+/-]{16,}=*)|-----BEGIN [A-Z ]*PRIVATE KEY-----)"
)
MASK = "[REDACTED]"

# detail keys the record maps to its own fields; everything else lands in `detail`.
_MAPPED_DETAIL = frozenset(
    {
        "quarantine",
        "quarantine_questions",
        "quarantine_answers",
        "quarantine_error",
        "upstream_status",
        "latency_ms",
        "decision_latency_ms",
        "upstream_latency_ms",
        "provider",
        "provider_key_fingerprint",
        "provider_key",
        "error",
    }
)


class AuditIdentity(BaseModel):
    """Who the decision was about (never a credential)."""

    model_config = ConfigDict(frozen=True, extra="allow")

    subject: str
    key_id: str | None = None
    tenant: str | None = None
    groups: list[str] = Field(default_factory=list)
    roles: list[str] = Field(default_factory=list)
    issuer: str | None = None
    auth_method: str = "none"
    anonymous: bool = False


class AuditRequest(BaseModel):
    """The HTTP request the decision belongs to."""

    model_config = ConfigDict(frozen=True, extra="allow")

    method: str | None = None
    path: str | None = None
    client: str | None = None


class AuditQuarantine(BaseModel):
    """The dual-LLM exchange behind a quarantined result."""

    model_config = ConfigDict(frozen=True, extra="allow")

    used: bool = True
    questions: list[Any] = Field(default_factory=list)
    answers: list[Any] = Field(default_factory=list)
    error: str | None = None


class AuditTraceEntry(BaseModel):
    """One rule the engine considered (from ``Decision.trace``)."""

    model_config = ConfigDict(frozen=True, extra="allow")

    rule_id: str
    effect: str
    matched: bool
    shadow: bool
    condition: str
    detail: str
    location: str


class AuditRecord(BaseModel):
    """One audit record, schema version 1.

    ``time`` is UTC ISO 8601 with microseconds (``2026-01-31T12:00:00.000123Z``), so
    records sort and compare as text. ``arguments`` are redacted per the trail's
    :class:`ArgumentRedaction`; ``arguments_digest`` is the SHA-256 of the original
    arguments' canonical JSON. ``trace`` is present when it was captured (always
    for denials, sampled otherwise, and only if the engine produced one).
    ``prev_hash``/``hash`` chain the records of one log.
    """

    model_config = ConfigDict(frozen=True, extra="allow")

    schema_version: int = SCHEMA_VERSION
    id: str
    time: str
    request_id: str | None = None
    session_id: str | None = None
    identity: AuditIdentity
    protocol: str
    route: str | None = None
    request: AuditRequest | None = None
    kind: str
    target: str
    tool_server: str | None = None
    arguments: Any = None
    arguments_digest: str | None = None
    arguments_mode: str = "redact"
    effect: str
    rule_ids: list[str] = Field(default_factory=list)
    reasons: list[str] = Field(default_factory=list)
    shadow_hits: list[str] = Field(default_factory=list)
    defaulted: bool = False
    taint_sources: list[str] = Field(default_factory=list)
    quarantine: AuditQuarantine | None = None
    provider: str | None = None
    provider_key_fingerprint: str | None = None
    upstream_status: int | None = None
    latency_ms: float | None = None
    upstream_latency_ms: float | None = None
    error: str | None = None
    detail: dict[str, Any] = Field(default_factory=dict)
    trace: list[AuditTraceEntry] | None = None
    prev_hash: str = GENESIS_HASH
    hash: str = ""


@dataclass(frozen=True, slots=True)
class ArgumentRedaction:
    """How tool-call arguments are written to the audit log.

    ``mode``: ``"redact"`` (default) keeps the arguments with values under
    secret-looking keys (``secret_keys``) or of secret-looking shape
    (``secret_values``: API keys, JWTs, private keys) masked, long strings cut to
    ``max_chars`` and containers to ``max_items``; ``"digest"`` keeps only the
    SHA-256 of the canonical arguments; ``"none"`` keeps neither; ``"full"`` keeps
    them verbatim (debugging only: secrets reach the log). Except for ``"none"``,
    ``arguments_digest`` is always recorded, so equal arguments can be correlated.
    """

    mode: Literal["redact", "digest", "none", "full"] = "redact"
    secret_keys: str = DEFAULT_SECRET_KEYS
    secret_values: str | None = DEFAULT_SECRET_VALUES
    max_chars: int = 256
    max_items: int = 50
    max_depth: int = 6

    def compile(self) -> _Redactor:
        return _Redactor(self)


class _Redactor:
    __slots__ = ("_keys", "_max_chars", "_max_depth", "_max_items", "_values", "config")

    def __init__(self, config: ArgumentRedaction) -> None:
        self.config = config
        self._keys = re.compile(config.secret_keys)
        self._values = re.compile(config.secret_values) if config.secret_values else None
        self._max_chars = config.max_chars
        self._max_items = config.max_items
        self._max_depth = config.max_depth

    def arguments(self, arguments: Mapping[str, Any] | None) -> tuple[Any, str | None]:
        if arguments is None or self.config.mode == "none":
            return None, None
        digest = hashlib.sha256(canonical_json(jsonable(arguments)).encode()).hexdigest()
        mode = self.config.mode
        if mode == "digest":
            return None, digest
        if mode == "full":
            return jsonable(arguments), digest
        return self.redact(arguments), digest

    def redact(self, value: Any, depth: int = 0) -> Any:
        if isinstance(value, str):
            return self._string(value)
        if value is None or isinstance(value, bool | int | float):
            return value
        if depth >= self._max_depth:
            return f"[{type(value).__name__} nested deeper than {self._max_depth}]"
        if isinstance(value, Mapping):
            out: dict[str, Any] = {}
            for i, (key, item) in enumerate(value.items()):
                if i >= self._max_items:
                    out["…"] = f"[{len(value) - i} more keys]"
                    break
                skey = str(key)
                out[skey] = MASK if self._keys.search(skey) else self.redact(item, depth + 1)
            return out
        if isinstance(value, list | tuple | set | frozenset):
            items = list(value)
            cut = [self.redact(item, depth + 1) for item in items[: self._max_items]]
            if len(items) > self._max_items:
                cut.append(f"[{len(items) - self._max_items} more items]")
            return cut
        return self._string(repr(value))

    def _string(self, value: str) -> str:
        if self._values is not None and self._values.search(value):
            value = self._values.sub(MASK, value)
        if len(value) > self._max_chars:
            return f"{value[: self._max_chars]}…[+{len(value) - self._max_chars} chars]"
        return value


def jsonable(value: Any) -> Any:
    """``value`` with every container made a JSON type and every odd scalar a string."""
    if value is None or isinstance(value, str | bool | int | float):
        return value
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def canonical_json(value: Any) -> str:
    """The one serialisation hashes are computed over: sorted keys, no spaces, UTF-8."""
    return _CANONICAL.encode(value)


def record_hash(record: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the record's canonical JSON without its ``hash`` field."""
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(canonical_json(body).encode()).hexdigest()


def seal(record: Mapping[str, Any], prev_hash: str) -> dict[str, Any]:
    """A copy of ``record`` chained after ``prev_hash``, with its own ``hash`` set."""
    sealed = dict(record)
    sealed.pop("hash", None)
    sealed["prev_hash"] = prev_hash
    sealed["hash"] = hashlib.sha256(canonical_json(sealed).encode()).hexdigest()
    return sealed


def seal_json(record: Mapping[str, Any], prev_hash: str) -> tuple[str, str]:
    """``record`` chained after ``prev_hash``: its hash and its stored JSON text.

    The text is the canonical body with ``hash`` appended last (one serialisation
    instead of two); readers re-canonicalise, so key order in storage is free.
    """
    body = dict(record)
    body.pop("hash", None)
    body["prev_hash"] = prev_hash
    text = canonical_json(body)
    digest = hashlib.sha256(text.encode()).hexdigest()
    return digest, f'{text[:-1]},"hash":"{digest}"}}'


def format_time(epoch: float) -> str:
    """UTC ISO 8601 with microseconds and ``Z``: fixed width, so text order is time order."""
    whole = int(epoch)
    micros = round((epoch - whole) * 1_000_000)
    if micros >= 1_000_000:
        whole, micros = whole + 1, micros - 1_000_000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{micros:06d}Z"


def new_record_id(epoch: float) -> str:
    """32 hex digits: 48-bit millisecond time then 80 random bits (sortable, unique)."""
    return f"{int(epoch * 1000) & 0xFFFFFFFFFFFF:012x}{secrets.token_hex(10)}"


def _fingerprint(secret: str) -> str:
    return "sha256:" + hashlib.sha256(secret.encode()).hexdigest()[:16]


def _quarantine(event: AuditEvent, redactor: _Redactor) -> dict[str, Any] | None:
    detail = event.detail
    raw = detail.get("quarantine")
    questions = detail.get("quarantine_questions")
    answers = detail.get("quarantine_answers")
    error = detail.get("quarantine_error")
    if isinstance(raw, Mapping):
        questions = raw.get("questions", questions)
        answers = raw.get("answers", answers)
        error = raw.get("error", error)
    used = (
        event.decision.effect == Effect.QUARANTINE
        or bool(raw)
        or questions is not None
        or answers is not None
        or error is not None
    )
    if not used:
        return None
    return {
        "used": True,
        "questions": redactor.redact(list(questions or [])),
        "answers": redactor.redact(list(answers or [])),
        "error": None if error is None else str(error),
    }


def _float(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _int(value: Any) -> int | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def build_record(
    event: AuditEvent,
    epoch: float,
    redactor: _Redactor,
    *,
    keep_trace: bool,
    record_id: str | None = None,
) -> dict[str, Any]:
    """The unsealed record for ``event`` decided at ``epoch`` (a JSON-ready dict).

    Adapter facts are read from ``event.detail``: ``latency_ms`` (the decision's
    own time), ``upstream_latency_ms``, ``upstream_status``, ``provider``,
    ``provider_key_fingerprint`` (a raw ``provider_key`` is never written: it is
    replaced by its fingerprint), ``error``, and the quarantine exchange as
    ``quarantine`` (a mapping with ``questions``/``answers``/``error``) or the flat
    ``quarantine_questions``/``quarantine_answers``/``quarantine_error``. Other
    keys are kept, redacted, under ``detail``.
    """
    decision = event.decision
    identity = event.identity
    request = event.request
    detail = event.detail
    arguments, digest = redactor.arguments(event.arguments)
    fingerprint = detail.get("provider_key_fingerprint")
    if fingerprint is None and detail.get("provider_key"):
        fingerprint = _fingerprint(str(detail["provider_key"]))
    extra = {k: v for k, v in detail.items() if k not in _MAPPED_DETAIL}
    latency = detail.get("latency_ms", detail.get("decision_latency_ms"))
    error = detail.get("error")
    trace = None
    if keep_trace and decision.trace is not None:
        trace = [
            {
                "rule_id": t.rule_id,
                "effect": str(t.effect),
                "matched": bool(t.matched),
                "shadow": bool(t.shadow),
                "condition": t.condition,
                "detail": t.detail,
                "location": t.location,
            }
            for t in decision.trace
        ]
    return {
        "schema_version": SCHEMA_VERSION,
        "id": record_id or new_record_id(epoch),
        "time": format_time(epoch),
        "request_id": request.id if request is not None else None,
        "session_id": event.session,
        "identity": {
            "subject": identity.subject,
            "key_id": identity.key_id,
            "tenant": identity.tenant,
            "groups": list(identity.groups),
            "roles": list(identity.roles),
            "issuer": identity.issuer,
            "auth_method": identity.auth_method,
            "anonymous": identity.anonymous,
        },
        "protocol": event.protocol,
        "route": decision.route,
        "request": (
            {"method": request.method, "path": request.path, "client": request.client}
            if request is not None
            else None
        ),
        "kind": decision.kind.value,
        "target": event.target,
        "tool_server": split_tool_name(event.target)[0],
        "arguments": arguments,
        "arguments_digest": digest,
        "arguments_mode": redactor.config.mode,
        "effect": decision.effect.value,
        "rule_ids": list(decision.rule_ids),
        "reasons": list(decision.reasons),
        "shadow_hits": list(decision.shadow_hits),
        "defaulted": decision.defaulted,
        "taint_sources": sorted(event.taint_sources),
        "quarantine": _quarantine(event, redactor),
        "provider": None if detail.get("provider") is None else str(detail["provider"]),
        "provider_key_fingerprint": None if fingerprint is None else str(fingerprint),
        "upstream_status": _int(detail.get("upstream_status")),
        "latency_ms": _float(latency),
        "upstream_latency_ms": _float(detail.get("upstream_latency_ms")),
        "error": None if error is None else redactor.redact(str(error)),
        "detail": redactor.redact(extra) if extra else {},
        "trace": trace,
    }
