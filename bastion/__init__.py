"""Bastion: a policy engine between AI agents and the LLMs and tools they use."""

from bastion.events import (
    EMPTY_CONTEXT,
    AuditEvent,
    Context,
    Decision,
    Effect,
    EventKind,
    Identity,
    ModelRequest,
    RequestInfo,
    RuleTrace,
    ToolCall,
    ToolResult,
    ToolSpec,
)
from bastion.policy import Diagnostic, LimitHit, Policy, PolicyError, Schema

__all__ = [
    "EMPTY_CONTEXT",
    "AuditEvent",
    "Context",
    "Decision",
    "Diagnostic",
    "Effect",
    "EventKind",
    "Identity",
    "LimitHit",
    "ModelRequest",
    "Policy",
    "PolicyError",
    "RequestInfo",
    "RuleTrace",
    "Schema",
    "ToolCall",
    "ToolResult",
    "ToolSpec",
]
