"""Dual-LLM quarantine: let the agent use untrusted data without reading it.

A ``quarantine`` result rule replaces a tool's output before the main
(privileged) model sees it. A second, quarantined model with no tools reads the
raw output and answers only constrained questions; the replacement text is built
by Bastion from the *checked* answers, so the main model never sees a word the
tool output chose, only:

- the index of an option the privileged side wrote (rendered as that option's
  own text, never the model's),
- a boolean, a number within bounds,
- or a value that fits a safe JSON schema (``bastion.quarantine.schema``): enums,
  bounded numbers, booleans, strings only from an enum or as one whitespace-free
  token matching a linear-time pattern with a ``maxLength``, and bounded arrays
  and objects of those.

Any failure (timeout, HTTP error, not strict JSON, an answer outside its
constraints, an extra key) raises ``QuarantineFailed``, a
``bastion.errors.QuarantineError``: the caller blocks the output (see
``bastion.redaction.block_placeholder``). Raw text is never returned, and error
messages never quote the model.

Use::

    quarantine = Quarantine(QuarantineConfig(base_url="http://127.0.0.1:8001/v1", model="small"))
    spec = QuarantineSpec.from_options(decision.options)    # {"questions": [...]} or {"schema": {...}}
    try:
        result = await quarantine.run(tool_output, spec, tool=result.name)
    except QuarantineError as exc:
        replacement = block_placeholder(result.name, "quarantine failed")
        detail = exc.report.as_detail() if isinstance(exc, QuarantineFailed) else {}
    else:
        replacement, detail = result.text, result.report.as_detail()   # detail -> AuditEvent.detail

Questions: ``Question.choice(id, text, options)``, ``Question.boolean(id,
text)``, ``Question.number(id, text, minimum=, maximum=, integer=False)``,
``Question.value(id, text, schema)``. ``Quarantine.ask(content, questions, tool=,
follow_up=)`` runs several rounds: after each, ``follow_up(answers_so_far)``
(sync or async) returns the next questions or None; more than
``QuarantineConfig.max_rounds`` rounds is a failure. ``Quarantine.extract(content,
schema, tool=)`` has the model fill an object schema directly.

The quarantined model is any OpenAI-compatible ``/v1/chat/completions`` endpoint
(``httpx.AsyncClient``). It gets a strict system prompt with the task and the
answer schema, and the data alone in the user message between random boundary
markers; ``response_format`` asks for JSON. Checked answers are cached per round
by sha256 of (content, questions or schema, model, endpoint, prompt) in a TTL
cache; ``QuarantineReport`` (``result.report`` or ``exc.report``) records the
questions, answers, model, rounds and cache hits for the audit ``detail``.

Quarantined output does not taint the context: the main model never sees it.
"""

from bastion.quarantine.schema import SafeSchema, SchemaLimits, SchemaViolation, UnsafeSchemaError
from bastion.quarantine.service import (
    DEFAULT_SYSTEM_PROMPT,
    FollowUp,
    Quarantine,
    QuarantineConfig,
    QuarantineFailed,
    QuarantineReport,
    QuarantineResult,
    QuarantineSpec,
    Question,
    RoundRecord,
)

__all__ = [
    "DEFAULT_SYSTEM_PROMPT",
    "FollowUp",
    "Quarantine",
    "QuarantineConfig",
    "QuarantineFailed",
    "QuarantineReport",
    "QuarantineResult",
    "QuarantineSpec",
    "Question",
    "RoundRecord",
    "SafeSchema",
    "SchemaLimits",
    "SchemaViolation",
    "UnsafeSchemaError",
]
